//! How long similar actions took, for spotting stragglers.
//!
//! Actions are similar when they share a fingerprint: the client's action mnemonic
//! (Bazel sends `CppCompile`, `Javac`, ...), the program that runs, and the platform.
//! The expected time of a fingerprint is the median of its latest runs.

use std::collections::VecDeque;
use std::time::Duration;

use hashlink::LinkedHashMap;
use sha2::{Digest as _, Sha256};

/// Runs remembered per fingerprint, and fingerprints remembered.
const RUNS: usize = 32;
const FINGERPRINTS: usize = 4096;

pub type Fingerprint = [u8; 16];

/// The fingerprint of an action.
pub fn fingerprint(mnemonic: &str, program: &str, platform: &[(String, String)]) -> Fingerprint {
    let mut sha = Sha256::new();
    for part in [mnemonic, program] {
        sha.update(part.as_bytes());
        sha.update([0]);
    }
    for (name, value) in platform {
        sha.update(name.as_bytes());
        sha.update([1]);
        sha.update(value.as_bytes());
        sha.update([0]);
    }
    sha.finalize()[..16].try_into().expect("16 bytes")
}

#[derive(Default)]
pub struct History {
    runs: LinkedHashMap<Fingerprint, VecDeque<Duration>>,
}

impl History {
    pub fn record(&mut self, fingerprint: Fingerprint, took: Duration) {
        if !self.runs.contains_key(&fingerprint) {
            if self.runs.len() >= FINGERPRINTS {
                self.runs.pop_front();
            }
            self.runs.insert(fingerprint, VecDeque::new());
        }
        let runs = self.runs.get_mut(&fingerprint).expect("just made");
        runs.push_back(took);
        if runs.len() > RUNS {
            runs.pop_front();
        }
        self.runs.to_back(&fingerprint);
    }

    /// The median of the fingerprint's runs, once it has `min_samples` of them.
    pub fn expected(&self, fingerprint: &Fingerprint, min_samples: usize) -> Option<Duration> {
        let runs = self.runs.get(fingerprint)?;
        if runs.len() < min_samples.max(1) {
            return None;
        }
        let mut sorted: Vec<Duration> = runs.iter().copied().collect();
        sorted.sort();
        Some(sorted[sorted.len() / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_need_enough_runs() {
        let mut history = History::default();
        let cc = fingerprint("CppCompile", "/usr/bin/gcc", &[]);
        let link = fingerprint("CppLink", "/usr/bin/gcc", &[]);
        assert_ne!(cc, link);
        for ms in [10, 30, 20, 1000] {
            history.record(cc, Duration::from_millis(ms));
        }
        assert_eq!(history.expected(&cc, 5), None);
        history.record(cc, Duration::from_millis(15));
        assert_eq!(history.expected(&cc, 5), Some(Duration::from_millis(20)));
        assert_eq!(history.expected(&link, 1), None);
    }
}
