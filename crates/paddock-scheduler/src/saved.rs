//! What the scheduler keeps across its own restarts: every worker's health record
//! (standing, quarantine and its cool-down, health window, totals) and the identity
//! each worker name is bound to, so that a restart neither lifts a quarantine nor
//! frees a name for an impostor.
//!
//! The records live in one JSON file under the data directory, replaced atomically
//! (written beside it, synced, renamed), so a crash leaves the old file or the new
//! one, never half of one. A file that cannot be read, or was written by a newer
//! Paddock, stops the start-up with a message rather than being taken as empty:
//! forgetting quarantines silently is what this file is for preventing.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::health::{Counts, Outcome};

/// The format this Paddock writes; it reads no newer one.
const VERSION: u32 = 1;

/// One worker's health record as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedRecord {
    pub name: String,
    pub pool: String,
    pub standing: SavedStanding,
    pub reason: String,
    pub since: SystemTime,
    pub window: Vec<Outcome>,
    pub totals: Counts,
}

/// A standing as saved: times are wall-clock times, and a worker that was being
/// probed is saved as due for probing again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "standing")]
pub enum SavedStanding {
    Active,
    Draining,
    Quarantined {
        manual: bool,
        probe_at: Option<SystemTime>,
        strikes: u32,
    },
}

/// Everything saved.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub workers: Vec<SavedRecord>,
    /// Worker name → the identity it is bound to.
    pub bindings: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct Contents {
    version: u32,
    #[serde(flatten)]
    saved: Saved,
}

/// Why the saved state could not be taken back.
#[derive(Debug)]
pub enum SavedStateError {
    Unreadable {
        path: PathBuf,
        error: std::io::Error,
    },
    Malformed {
        path: PathBuf,
        error: String,
    },
    Newer {
        path: PathBuf,
        version: u32,
    },
}

impl fmt::Display for SavedStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let advice = "move it aside to start without it (the quarantines and health \
                      windows in it would be forgotten)";
        match self {
            SavedStateError::Unreadable { path, error } => write!(
                f,
                "the scheduler's saved state {} cannot be read: {error}; {advice}",
                path.display()
            ),
            SavedStateError::Malformed { path, error } => write!(
                f,
                "the scheduler's saved state {} is malformed: {error}; {advice}",
                path.display()
            ),
            SavedStateError::Newer { path, version } => write!(
                f,
                "the scheduler's saved state {} has format {version}, newer than this \
                 Paddock's {VERSION}: run the newer Paddock, or {advice}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for SavedStateError {}

/// The file the scheduler's records are saved in.
pub struct StateFile {
    path: PathBuf,
    /// One writer at a time: the periodic save and the one at shutdown share the
    /// temporary file.
    writing: Mutex<()>,
}

impl StateFile {
    /// The file `scheduler.json` in `directory` (made if missing, as is the file).
    pub fn in_directory(directory: &Path) -> StateFile {
        StateFile {
            path: directory.join("scheduler.json"),
            writing: Mutex::new(()),
        }
    }

    /// What was saved, or nothing if the file does not exist yet.
    pub fn load(&self) -> Result<Saved, SavedStateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Saved::default()),
            Err(error) => {
                return Err(SavedStateError::Unreadable {
                    path: self.path.clone(),
                    error,
                })
            }
        };
        let malformed = |error: serde_json::Error| SavedStateError::Malformed {
            path: self.path.clone(),
            error: error.to_string(),
        };
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let Version { version } = serde_json::from_slice(&bytes).map_err(malformed)?;
        if version > VERSION {
            return Err(SavedStateError::Newer {
                path: self.path.clone(),
                version,
            });
        }
        let contents: Contents = serde_json::from_slice(&bytes).map_err(malformed)?;
        Ok(contents.saved)
    }

    /// Replaces the file with `saved`, durably.
    pub fn store(&self, saved: Saved) -> std::io::Result<()> {
        let _one_writer = self.writing.lock();
        let directory = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(directory)?;
        let temporary = self.path.with_extension("json.new");
        let mut file = std::fs::File::create(&temporary)?;
        let contents = Contents {
            version: VERSION,
            saved,
        };
        serde_json::to_writer(&mut file, &contents)?;
        file.flush()?;
        file.sync_all()?;
        std::fs::rename(&temporary, &self.path)?;
        std::fs::File::open(directory)?.sync_all()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(name: &str, standing: SavedStanding) -> SavedRecord {
        SavedRecord {
            name: name.into(),
            pool: "cpp".into(),
            standing,
            reason: "because".into(),
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            window: vec![Outcome::Success, Outcome::InfraFailure],
            totals: Counts {
                outcomes: 7,
                infra_failures: 1,
                nonzero_exits: 2,
                disagreements: 0,
            },
        }
    }

    #[test]
    fn what_is_stored_is_loaded_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_directory(&dir.path().join("state"));
        assert_eq!(file.load().unwrap(), Saved::default());
        let saved = Saved {
            workers: vec![
                record("a", SavedStanding::Active),
                record(
                    "b",
                    SavedStanding::Quarantined {
                        manual: false,
                        probe_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(5)),
                        strikes: 2,
                    },
                ),
            ],
            bindings: [("a".to_owned(), "ci".to_owned())].into(),
        };
        file.store(saved.clone()).unwrap();
        assert_eq!(file.load().unwrap(), saved);
        file.store(Saved::default()).unwrap();
        assert_eq!(file.load().unwrap(), Saved::default());
    }

    #[test]
    fn a_malformed_or_newer_file_is_refused_not_taken_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_directory(dir.path());
        std::fs::write(file.path(), b"{\"version\": 1, \"workers\": [").unwrap();
        let error = file.load().unwrap_err();
        assert!(
            matches!(error, SavedStateError::Malformed { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("move it aside"), "{error}");
        std::fs::write(
            file.path(),
            b"{\"version\": 99, \"workers\": [], \"bindings\": {}}",
        )
        .unwrap();
        let error = file.load().unwrap_err();
        assert!(
            matches!(error, SavedStateError::Newer { version: 99, .. }),
            "{error}"
        );
    }
}
