//! Faults a worker can be told to inject, to test the farm's defences against bad
//! machines. Never for production: a worker with faults lies on purpose. They are
//! set only through `paddock worker --dangerous-fault-injection SPEC`, and a worker
//! with any announces it loudly.
//!
//! SPEC is a comma-separated list of:
//! - `fail-setup=P`: with probability P, the sandbox "fails to set up" (a retryable
//!   worker failure, as a broken runtime gives);
//! - `corrupt-outputs=P`: with probability P, output files are uploaded with bytes
//!   other than those hashed, upload errors are ignored and the result is reported
//!   anyway (bad memory or a bad disk, and a worker that does not notice);
//! - `alter-outputs=P`: with probability P, output files are changed before they
//!   are hashed, so the result is consistent but wrong (a broken toolchain): only
//!   comparing with other workers can catch it;
//! - `delay=DURATION`: every command starts this much later (a slow machine);
//! - `panic=P`: with probability P, the worker's task for an assignment panics (a
//!   bug in the worker).

use std::path::Path;

use paddock_fs::Dir;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    pub fail_setup: f64,
    pub corrupt_outputs: f64,
    pub alter_outputs: f64,
    pub delay: Duration,
    pub panic: f64,
}

impl Faults {
    pub fn any(&self) -> bool {
        *self != Faults::default()
    }

    /// Rolls the dice for a fault of probability `p`.
    pub fn strikes(p: f64) -> bool {
        p > 0.0 && rand::random::<f64>() < p
    }

    /// Appends a line to every regular file at an output path (beneath the input
    /// root `root`, following no symlink), before the outputs are hashed.
    pub fn alter(root: &Dir, working_directory: &str, output_paths: &[&String]) {
        use std::io::Write;
        for path in output_paths {
            let at = Path::new(working_directory).join(path);
            if let Ok(Some(mut file)) = root.append_to(&at) {
                let _ = file.write_all(b"\naltered by fault injection\n");
            }
        }
    }

    /// Bytes that differ from `original` in one place.
    pub fn corrupt(original: &[u8]) -> Vec<u8> {
        let mut bytes = original.to_vec();
        match bytes.first_mut() {
            Some(first) => *first ^= 0xff,
            None => bytes.push(0),
        }
        bytes
    }
}

impl FromStr for Faults {
    type Err = String;

    fn from_str(spec: &str) -> Result<Faults, String> {
        let mut faults = Faults::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected NAME=VALUE"))?;
            let probability = || -> Result<f64, String> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or_else(|| format!("{name}: {value:?} is not a probability in [0, 1]"))
            };
            match name {
                "fail-setup" => faults.fail_setup = probability()?,
                "corrupt-outputs" => faults.corrupt_outputs = probability()?,
                "alter-outputs" => faults.alter_outputs = probability()?,
                "panic" => faults.panic = probability()?,
                "delay" => {
                    faults.delay = value
                        .parse::<paddock_config::Span>()
                        .map_err(|e| format!("delay: {e}"))?
                        .get()
                }
                other => {
                    return Err(format!(
                        "unknown fault {other:?}: use fail-setup, corrupt-outputs, alter-outputs, delay or panic"
                    ))
                }
            }
        }
        Ok(faults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let f: Faults = "fail-setup=0.5, corrupt-outputs=1,delay=2s"
            .parse()
            .unwrap();
        assert_eq!(f.fail_setup, 0.5);
        assert_eq!(f.corrupt_outputs, 1.0);
        assert_eq!(f.delay, Duration::from_secs(2));
        assert!(f.any());
        assert!(!Faults::default().any());
        assert!("fail-setup=2".parse::<Faults>().is_err());
        assert!("explode=1".parse::<Faults>().is_err());
        assert_ne!(Faults::corrupt(b"abc"), b"abc");
        assert_ne!(Faults::corrupt(b""), b"");
    }
}
