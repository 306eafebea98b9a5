//! What the scheduler keeps across its own restarts: every worker's health record
//! (standing, quarantine and its cool-down, health window, totals) and the identity
//! each worker name is bound to, so that a restart neither lifts a quarantine nor
//! frees a name for an impostor.
//!
//! The records go to a [`RecordStore`]. In one process that is [`StateFile`]: one
//! JSON file under the data directory, replaced atomically (written beside it,
//! synced, renamed), so a crash leaves the old file or the new one, never half of
//! one. Servers sharing a database keep them there (`paddock-postgres`): each writes
//! the records it changed unless another server wrote them first (then it takes
//! theirs), takes a connecting worker's record from the database, and looks every
//! few seconds for records of its own workers that others changed (an operator's
//! order given to another server). A store that cannot be read,
//! or was written by a newer Paddock, stops the start-up with a message rather than
//! being taken as empty: forgetting quarantines silently is what it is for
//! preventing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
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
    /// When the worker was last connected or finished something...
    pub last_seen: SystemTime,
    /// ...and when the record was saved: how long it had been away then is what
    /// counts after a restart, not the time the scheduler was down.
    pub saved_at: SystemTime,
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

/// Where the workers' records outlive the scheduler.
#[async_trait]
pub trait RecordStore: Send + Sync + 'static {
    /// Everything saved (nothing, the first time).
    async fn load(&self) -> Result<Saved, SavedStateError>;
    /// The records among `names` that another server sharing the store wrote since
    /// this one last read or wrote them (never any, for a store with one writer).
    async fn changed_elsewhere(
        &self,
        names: &[String],
    ) -> Result<Vec<SavedWorker>, SavedStateError>;
    /// Saves the records: `saved` has them all, `changed` names those that changed
    /// since the last save. Returns the names it left alone because another server
    /// wrote them first: this server's copies of those are stale.
    async fn store(
        &self,
        saved: Saved,
        changed: BTreeSet<String>,
    ) -> Result<Vec<String>, SavedStateError>;
    /// Where the records are, for logs.
    fn describe(&self) -> String;
}

/// One worker's record, and the identity its name is bound to.
pub type SavedWorker = (SavedRecord, Option<String>);

/// Why the saved state could not be taken back or saved.
#[derive(Debug)]
pub enum SavedStateError {
    Unreadable {
        path: PathBuf,
        error: std::io::Error,
    },
    Unwritable {
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
    /// The executions journal cannot be read or rewritten.
    Journal {
        path: PathBuf,
        error: String,
    },
    /// A shared store could not be reached or refused the request.
    Unavailable {
        store: String,
        error: String,
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
            SavedStateError::Unwritable { path, error } => write!(
                f,
                "the scheduler's saved state {} cannot be written: {error}",
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
            SavedStateError::Journal { path, error } => write!(
                f,
                "the executions journal {}: {error}; move it aside to start without it \
                 (the executions queued in it would be forgotten, and their clients \
                 would have to call Execute again)",
                path.display()
            ),
            SavedStateError::Unavailable { store, error } => {
                write!(f, "the workers' records in {store}: {error}")
            }
        }
    }
}

impl std::error::Error for SavedStateError {}

/// The file the scheduler's records are saved in.
#[derive(Clone)]
pub struct StateFile {
    path: PathBuf,
    /// One writer at a time: the periodic save and the one at shutdown share the
    /// temporary file.
    writing: Arc<Mutex<()>>,
}

impl StateFile {
    /// The file `scheduler.json` in `directory` (made if missing, as is the file).
    pub fn in_directory(directory: &Path) -> StateFile {
        StateFile {
            path: directory.join("scheduler.json"),
            writing: Arc::new(Mutex::new(())),
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
    pub fn write(&self, saved: Saved) -> std::io::Result<()> {
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

#[async_trait]
impl RecordStore for StateFile {
    async fn load(&self) -> Result<Saved, SavedStateError> {
        StateFile::load(self)
    }

    async fn changed_elsewhere(&self, _: &[String]) -> Result<Vec<SavedWorker>, SavedStateError> {
        Ok(Vec::new())
    }

    async fn store(
        &self,
        saved: Saved,
        _: BTreeSet<String>,
    ) -> Result<Vec<String>, SavedStateError> {
        let file = self.clone();
        // Off the runtime's threads: the file is synced.
        tokio::task::spawn_blocking(move || file.write(saved))
            .await
            .map_err(std::io::Error::other)
            .and_then(|written| written)
            .map_err(|error| SavedStateError::Unwritable {
                path: self.path.clone(),
                error,
            })?;
        Ok(Vec::new())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
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
            last_seen: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_100),
            saved_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_200),
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
        file.write(saved.clone()).unwrap();
        assert_eq!(file.load().unwrap(), saved);
        file.write(Saved::default()).unwrap();
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
