//! Counters across every `paddock cc` run, in one file under the cache directory,
//! updated under an advisory lock (`--stats`, `--zero-stats`); and notices said once
//! per build rather than once per file.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Stats {
    /// Compiles answered from the farm's cache.
    pub hits: u64,
    /// Compiles looked up and not found (remote runs, and cache-only local compiles).
    pub misses: u64,
    /// Compiles run on the farm.
    pub remote: u64,
    /// Compiles run here, by choice: not a compile the farm runs, or local mode.
    pub local: u64,
    /// Why commands ran locally by choice.
    pub local_reasons: BTreeMap<String, u64>,
    /// Compiles meant for the farm that ran here after all, by why.
    pub fallbacks: BTreeMap<String, u64>,
    /// Results uploaded by cache-only mode.
    pub uploads: u64,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
    /// Time spent in `paddock cc`, compiles included.
    pub seconds: f64,
}

impl Stats {
    fn add(&mut self, d: &Stats) {
        self.hits += d.hits;
        self.misses += d.misses;
        self.remote += d.remote;
        self.local += d.local;
        self.uploads += d.uploads;
        self.bytes_uploaded += d.bytes_uploaded;
        self.bytes_downloaded += d.bytes_downloaded;
        self.seconds += d.seconds;
        for (k, v) in &d.local_reasons {
            *self.local_reasons.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &d.fallbacks {
            *self.fallbacks.entry(k.clone()).or_default() += v;
        }
    }

    pub fn render(&self) -> String {
        let compiles = self.hits + self.remote + self.local + self.fallbacks.values().sum::<u64>();
        let mut out = String::new();
        let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<28}{v}\n"));
        line(&mut out, "commands", compiles.to_string());
        line(&mut out, "cache hits", self.hits.to_string());
        line(&mut out, "cache misses", self.misses.to_string());
        line(&mut out, "run on the farm", self.remote.to_string());
        line(&mut out, "run locally", self.local.to_string());
        for (reason, n) in &self.local_reasons {
            line(&mut out, "  because", format!("{n} × {reason}"));
        }
        line(
            &mut out,
            "fallbacks to local",
            self.fallbacks.values().sum::<u64>().to_string(),
        );
        for (reason, n) in &self.fallbacks {
            line(&mut out, "  because", format!("{n} × {reason}"));
        }
        line(&mut out, "results uploaded", self.uploads.to_string());
        line(&mut out, "bytes uploaded", self.bytes_uploaded.to_string());
        line(
            &mut out,
            "bytes downloaded",
            self.bytes_downloaded.to_string(),
        );
        line(
            &mut out,
            "time in paddock cc",
            format!("{:.1} s", self.seconds),
        );
        out
    }
}

fn locked(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("stats.json"))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

fn read(file: &mut std::fs::File) -> Stats {
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    serde_json::from_str(&text).unwrap_or_default()
}

fn write(file: &mut std::fs::File, stats: &Stats) -> std::io::Result<()> {
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(serde_json::to_string_pretty(stats)?.as_bytes())
}

/// Adds a run's counts to the totals.
pub fn record(dir: &Path, delta: &Stats) -> std::io::Result<()> {
    let mut file = locked(dir)?;
    let mut stats = read(&mut file);
    stats.add(delta);
    write(&mut file, &stats)
}

pub fn load(dir: &Path) -> std::io::Result<Stats> {
    Ok(read(&mut locked(dir)?))
}

pub fn zero(dir: &Path) -> std::io::Result<()> {
    write(&mut locked(dir)?, &Stats::default())
}

/// Whether a notice of `kind` is due: not said within `quiet`. Saying it is
/// recorded at once, so concurrent compiles of one build say it once.
pub fn notice_due(dir: &Path, kind: &str, quiet: Duration) -> bool {
    let notices = dir.join("notices");
    if std::fs::create_dir_all(&notices).is_err() {
        return true;
    }
    let Ok(_lock) = locked(dir) else {
        return true;
    };
    let marker = notices.join(kind);
    let recent = std::fs::metadata(&marker)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < quiet);
    if !recent {
        let _ = std::fs::write(&marker, b"");
    }
    !recent
}

/// Whether something of `kind` happened within `within` (a notice's marker).
pub fn recently(dir: &Path, kind: &str, within: Duration) -> bool {
    std::fs::metadata(dir.join("notices").join(kind))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < within)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_notices_are_said_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut delta = Stats {
            hits: 1,
            ..Default::default()
        };
        delta.fallbacks.insert("unreachable".into(), 1);
        record(dir.path(), &delta).unwrap();
        record(dir.path(), &delta).unwrap();
        let total = load(dir.path()).unwrap();
        assert_eq!(total.hits, 2);
        assert_eq!(total.fallbacks["unreachable"], 2);
        zero(dir.path()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Stats::default());
        let quiet = Duration::from_secs(60);
        assert!(notice_due(dir.path(), "x", quiet));
        assert!(!notice_due(dir.path(), "x", quiet));
        assert!(recently(dir.path(), "x", quiet));
    }
}
