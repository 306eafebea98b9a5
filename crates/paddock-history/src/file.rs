//! The history in a file under the data directory, for a server that shares no
//! database: a header line, then one JSON [`Entry`] per line, appended in batches
//! (one write and one `fdatasync` each). At start-up and whenever it has grown well
//! past what the bounds keep (or an hour has passed), it is rewritten with only
//! what is kept, beside itself and renamed, so a crash leaves the old file or the
//! new one. A torn last line (the process died mid-write) is dropped, as is any line
//! this Paddock cannot read: the history is a view, and the rest of it is still
//! worth showing.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::keeping::{HistoryStore, HistoryStoreError};
use crate::{Entry, History};

/// The header's key; its value is the format's version.
const HEADER: &str = "paddock_history";
/// The format this Paddock writes; it reads no newer one.
const VERSION: u64 = 1;
/// The file is rewritten once it has this many lines (or bytes) more than twice
/// what was kept at the last rewrite...
const REWRITE_AFTER: usize = 10_000;
const REWRITE_AFTER_BYTES: u64 = 64 << 20;
/// ...or when the last rewrite is this old, so that what ages out goes.
const REWRITE_EVERY: Duration = Duration::from_secs(3600);
/// Who builds what is the server's to know: the file is its user's alone.
const MODE: u32 = 0o600;

/// The file's first line.
fn header() -> String {
    format!("{{\"{HEADER}\":{VERSION}}}\n")
}

/// The history's file.
pub struct HistoryFile {
    path: PathBuf,
    state: Arc<Mutex<FileState>>,
}

#[derive(Default)]
struct FileState {
    /// Lines in the file, less the header.
    lines: usize,
    /// Lines kept at the last rewrite.
    kept: usize,
    /// Bytes in the file, and kept at the last rewrite.
    bytes: u64,
    kept_bytes: u64,
    rewritten: Option<Instant>,
}

impl HistoryFile {
    /// The history file in `directory` (the data directory).
    pub fn in_directory(directory: &Path) -> HistoryFile {
        HistoryFile {
            path: directory.join("history.jsonl"),
            state: Arc::default(),
        }
    }

    fn error(path: &Path, error: std::io::Error) -> HistoryStoreError {
        HistoryStoreError::File {
            path: path.to_owned(),
            error,
        }
    }

    /// The entries in the file (none if there is no file).
    fn read(path: &Path) -> Result<Vec<Entry>, HistoryStoreError> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HistoryFile::error(path, e)),
        };
        // Lines are read as bytes: a torn line may end inside a character.
        let mut lines = BufReader::new(file).split(b'\n');
        let header = match lines.next() {
            None => return Ok(Vec::new()),
            Some(line) => line.map_err(|e| HistoryFile::error(path, e))?,
        };
        let version = serde_json::from_slice::<serde_json::Value>(&header)
            .ok()
            .and_then(|v| v.get(HEADER).and_then(serde_json::Value::as_u64));
        match version {
            Some(v) if v > VERSION => {
                return Err(HistoryStoreError::Newer {
                    path: path.to_owned(),
                    version: v,
                })
            }
            Some(_) => {}
            None => {
                return Err(HistoryFile::error(
                    path,
                    std::io::Error::other("it does not start with a history header"),
                ))
            }
        }
        let mut entries = Vec::new();
        let mut unreadable = 0usize;
        for line in lines {
            let line = line.map_err(|e| HistoryFile::error(path, e))?;
            match std::str::from_utf8(&line).ok().and_then(Entry::from_json) {
                Some(entry) => entries.push(entry),
                None => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::warn!(
                path = %path.display(),
                unreadable,
                "lines of the history file could not be read and were passed over"
            );
        }
        Ok(entries)
    }

    /// Writes `entries` as the whole file, beside it first; its length.
    fn rewrite(path: &Path, entries: &[&Entry]) -> std::io::Result<u64> {
        let beside = path.with_extension("jsonl.new");
        let mut text = header();
        for entry in entries {
            text.push_str(&entry.to_json());
            text.push('\n');
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(MODE)
            .open(&beside)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&beside, path)?;
        if let Some(directory) = path.parent() {
            File::open(directory)?.sync_all()?;
        }
        Ok(text.len() as u64)
    }
}

#[async_trait]
impl HistoryStore for HistoryFile {
    async fn load(&self) -> Result<Vec<Entry>, HistoryStoreError> {
        let path = self.path.clone();
        let entries = tokio::task::spawn_blocking(move || HistoryFile::read(&path))
            .await
            .expect("reading the history does not panic")?;
        let bytes = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        let mut state = self.state.lock();
        state.lines = entries.len();
        state.bytes = bytes;
        Ok(entries)
    }

    async fn append(&self, entries: &[Entry]) -> Result<(), HistoryStoreError> {
        let mut text = String::new();
        for entry in entries {
            text.push_str(&entry.to_json());
            text.push('\n');
        }
        let (path, state, count) = (self.path.clone(), self.state.clone(), entries.len());
        tokio::task::spawn_blocking(move || {
            let mut state = state.lock();
            let error = |e| HistoryFile::error(&path, e);
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(MODE)
                .open(&path)
                .map_err(error)?;
            let mut length = file.metadata().map_err(error)?.len();
            if length == 0 {
                // The header goes alone and lasting, so that no crash tears it.
                file.write_all(header().as_bytes())
                    .and_then(|()| file.sync_data())
                    .map_err(error)?;
                length = header().len() as u64;
            }
            let written = file
                .write_all(text.as_bytes())
                .and_then(|()| file.sync_data());
            if let Err(e) = written {
                // Nothing of a failed batch stays: it is handed over again whole.
                let _ = file.set_len(length);
                return Err(error(e));
            }
            state.lines += count;
            state.bytes += text.len() as u64;
            Ok(())
        })
        .await
        .expect("appending to the history does not panic")
    }

    async fn news(&self) -> Result<Vec<Entry>, HistoryStoreError> {
        Ok(Vec::new())
    }

    async fn trim(&self, history: &Arc<History>) -> Result<(), HistoryStoreError> {
        let due = {
            let state = self.state.lock();
            state.lines > 2 * state.kept + REWRITE_AFTER
                || state.bytes > 2 * state.kept_bytes + REWRITE_AFTER_BYTES
                || state
                    .rewritten
                    .is_none_or(|at| at.elapsed() >= REWRITE_EVERY)
        };
        if !due {
            return Ok(());
        }
        let (path, state, history) = (self.path.clone(), self.state.clone(), history.clone());
        tokio::task::spawn_blocking(move || {
            // Appends wait: nothing is written between the reading and the renaming.
            let mut state = state.lock();
            let entries = HistoryFile::read(&path)?;
            let now = SystemTime::now();
            let kept: Vec<&Entry> = crate::without_replaced(&entries)
                .into_iter()
                .filter(|entry| {
                    history.keeps(entry, now)
                        && entry
                            .invocation()
                            .is_none_or(|(identity, id)| history.holds(identity, id))
                })
                .collect();
            let bytes =
                HistoryFile::rewrite(&path, &kept).map_err(|e| HistoryFile::error(&path, e))?;
            state.lines = kept.len();
            state.kept = kept.len();
            state.bytes = bytes;
            state.kept_bytes = bytes;
            state.rewritten = Some(Instant::now());
            Ok(())
        })
        .await
        .expect("rewriting the history does not panic")
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::asker;
    use crate::Outcome;
    use paddock_config::HistoryConfig;
    use paddock_reapi::Digest;

    #[tokio::test]
    async fn the_history_outlives_the_process_and_the_file_keeps_to_the_bounds() {
        let directory = tempfile::tempdir().unwrap();
        let config = HistoryConfig {
            max_invocations: 2,
            ..HistoryConfig::default()
        };
        let history = Arc::new(History::journaled(config.clone()));
        let file = HistoryFile::in_directory(directory.path());
        for (n, id) in ["a", "b", "c"].iter().enumerate() {
            history.action(&asker(id), Digest::of(&[n as u8]), Outcome::Cached, None);
        }
        for exit in ["RUNNING", "SUCCESS"] {
            history.build_event("c", "alice", |r| r.exit = Some(exit.into()));
            let (unsaved, lost) = history.take_unsaved(false);
            assert_eq!(lost, 0);
            file.append(&unsaved).await.unwrap();
        }
        // A torn last line, as a crash mid-write leaves, cut inside a character.
        let path = directory.path().join("history.jsonl");
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"kind\":\"action\",\"target\":\"\xe2\x80")
            .unwrap();

        let again = Arc::new(History::journaled(config));
        let file = HistoryFile::in_directory(directory.path());
        again.restore(file.load().await.unwrap());
        let (listed, total) = again.invocations(|_, _| true, 0, 10);
        assert_eq!(total, 2);
        assert_eq!(listed[0].id, "c");
        assert_eq!(listed[0].exit.as_deref(), Some("SUCCESS"));
        assert!(!again.holds("alice", "a"));

        // The rewrite keeps the two invocations' actions and the last report only.
        file.trim(&again).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1 + 2 + 1, "{text}");
        assert!(
            text.contains("SUCCESS") && !text.contains("RUNNING"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_newer_format_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(
            directory.path().join("history.jsonl"),
            "{\"paddock_history\":99}\n",
        )
        .unwrap();
        let error = HistoryFile::in_directory(directory.path())
            .load()
            .await
            .unwrap_err();
        assert!(matches!(
            error,
            HistoryStoreError::Newer { version: 99, .. }
        ));
    }
}
