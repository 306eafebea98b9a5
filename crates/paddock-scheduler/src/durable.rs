//! Clients' executions kept across restarts: every queued or running execution a
//! client asked for, with the names and owners of its operations, goes to a
//! journal under the data directory before the client hears of its operation. A
//! scheduler started on the same directory queues them again (reading the Action
//! and Command back from the CAS) under the same operation names, so a client that
//! re-attaches with WaitExecution gets its answer, and nothing it was told is queued
//! is forgotten. An attempt that was running when the process died runs again.
//!
//! The journal is a file of JSON lines, appended in batches (one write and one
//! `fdatasync` per batch, however many clients wait on it): `put` gives an
//! execution's current state, `end` says it finished. It is folded and rewritten
//! whole when it is read and whenever it has grown well past what is live, written
//! beside it and renamed, so a crash leaves the old journal or the new one. A torn
//! last line (the process died mid-write) is dropped; anything else unreadable stops
//! the start-up rather than being taken as empty.
//!
//! Not kept: verifications and canaries (started again as needed), and the
//! scheduler's knowledge of which worker ran what (workers reconnect, and are told
//! to stop what the new scheduler did not give them).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Duration, SystemTime};

use paddock_cas::ActionKey;
use paddock_reapi::Digest;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::history::Fingerprint;
use crate::operations::Owner;
use crate::saved::SavedStateError;
use crate::state::{Job, JobKind};
use crate::{completed, failed_response, missing_response, Inner, JobId, Prepared};

/// The format this Paddock writes; it reads no newer one.
const VERSION: u32 = 1;

/// The journal is rewritten once it has this many lines more than twice the live
/// executions.
const COMPACT_AFTER: usize = 10_000;

/// How long an Execute call waits for its execution to reach the journal before it
/// answers anyway (the failure is logged and counted).
const WAIT_FOR_JOURNAL: Duration = Duration::from_secs(10);

/// A client's execution as kept: enough to queue it again from the CAS and to
/// answer its operations by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SavedExecution {
    pub token: String,
    pub instance: String,
    pub action_hash: String,
    pub action_size: i64,
    pub priority: i32,
    pub invocation: String,
    pub fingerprint: Fingerprint,
    pub queued_at: SystemTime,
    pub failures: u32,
    /// Its operations: name and the identity that owns each.
    pub operations: Vec<(String, String)>,
    /// Owners of its deleted operations, whose quotas it counts against.
    pub charged: Vec<String>,
}

impl SavedExecution {
    fn of(job: &Job, owners: impl Fn(&str) -> Option<String>) -> SavedExecution {
        SavedExecution {
            token: job.token.clone(),
            instance: job.key.instance.clone(),
            action_hash: job.key.action.hash_hex(),
            action_size: job.key.action.size() as i64,
            priority: job.priority,
            invocation: job.invocation.clone(),
            fingerprint: job.fingerprint,
            queued_at: job.queued_at,
            failures: job.failures,
            operations: job
                .operations
                .iter()
                .filter_map(|name| Some((name.clone(), owners(name)?)))
                .collect(),
            charged: job.charged.clone(),
        }
    }

    /// The action it runs; `None` if the journal was tampered with.
    pub fn key(&self) -> Option<ActionKey> {
        let action = Digest::parse(&self.action_hash, self.action_size).ok()?;
        Some(ActionKey {
            instance: self.instance.clone(),
            action,
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Version(u32),
    Put(SavedExecution),
    End(String),
}

/// Where clients' executions outlive the process: `executions.journal` in the
/// data directory.
pub struct ExecutionJournal {
    path: PathBuf,
}

impl ExecutionJournal {
    pub fn in_directory(directory: &Path) -> ExecutionJournal {
        ExecutionJournal {
            path: directory.join("executions.journal"),
        }
    }

    pub(crate) fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// The executions the journal holds (none if there is no journal yet: it is
    /// made), rewritten compacted so that appending starts from a clean end.
    pub(crate) fn load(&self) -> Result<Vec<SavedExecution>, SavedStateError> {
        let malformed = |error: String| SavedStateError::Journal {
            path: self.path.clone(),
            error,
        };
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.rewrite(&[])
                    .map_err(|e| malformed(format!("creating it: {e}")))?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(malformed(e.to_string())),
        };
        let mut live: HashMap<String, SavedExecution> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut lines = BufReader::new(file).split(b'\n').enumerate().peekable();
        while let Some((number, line)) = lines.next() {
            let line = line.map_err(|e| malformed(e.to_string()))?;
            if line.is_empty() {
                continue;
            }
            let parsed: Line = match serde_json::from_slice(&line) {
                Ok(parsed) => parsed,
                Err(e) if lines.peek().is_none() => {
                    tracing::warn!(journal = %self.describe(), error = %e, "dropped a torn last line of the executions journal");
                    break;
                }
                Err(e) => return Err(malformed(format!("line {}: {e}", number + 1))),
            };
            match parsed {
                Line::Version(version) if version > VERSION => {
                    return Err(malformed(format!(
                        "it has format {version}, newer than this Paddock's {VERSION}"
                    )))
                }
                Line::Version(_) => {}
                Line::Put(execution) => {
                    if !live.contains_key(&execution.token) {
                        order.push(execution.token.clone());
                    }
                    live.insert(execution.token.clone(), execution);
                }
                Line::End(token) => {
                    live.remove(&token);
                }
            }
        }
        let executions: Vec<SavedExecution> =
            order.into_iter().filter_map(|t| live.remove(&t)).collect();
        self.rewrite(&executions)
            .map_err(|e| malformed(format!("rewriting it: {e}")))?;
        Ok(executions)
    }

    /// Replaces the journal with one holding `executions`, durably.
    fn rewrite(&self, executions: &[SavedExecution]) -> std::io::Result<File> {
        let directory = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(directory)?;
        let temporary = self.path.with_extension("journal.new");
        let mut out = std::io::BufWriter::new(File::create(&temporary)?);
        write_line(&mut out, &Line::Version(VERSION))?;
        for execution in executions {
            write_line(&mut out, &Line::Put(execution.clone()))?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &self.path)?;
        File::open(directory)?.sync_all()?;
        OpenOptions::new().append(true).open(&self.path)
    }

    fn append(&self, lines: &[Line]) -> std::io::Result<()> {
        let mut buffer = Vec::new();
        for line in lines {
            write_line(&mut buffer, line)?;
        }
        let mut file = OpenOptions::new().append(true).open(&self.path)?;
        file.write_all(&buffer)?;
        file.sync_data()
    }
}

fn write_line(out: &mut impl Write, line: &Line) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")
}

/// What the journal has not been told yet, kept with the scheduler's state.
#[derive(Default)]
pub(crate) struct Unjournaled {
    enabled: bool,
    /// Counts changes; the journal is complete up to a number once it was written.
    changes: u64,
    dirty: HashSet<JobId>,
    ended: Vec<String>,
}

impl Unjournaled {
    pub fn enabled() -> Unjournaled {
        Unjournaled {
            enabled: true,
            ..Default::default()
        }
    }

    /// Notes that a client's execution changed (queued, an operation added or
    /// removed, retried); returns the change's number.
    pub fn changed(&mut self, job: &Job) -> u64 {
        if self.enabled && job.kind.is_client() {
            self.changes += 1;
            self.dirty.insert(job.id);
        }
        self.changes
    }

    /// Notes that a client's execution ended.
    pub fn ended(&mut self, job: &Job) {
        if job.kind.is_client() {
            self.dirty.remove(&job.id);
            self.forget(job.token.clone());
        }
    }

    /// Notes that the journal's execution `token` is over.
    fn forget(&mut self, token: String) {
        if self.enabled {
            self.changes += 1;
            self.ended.push(token);
        }
    }

    pub fn changes(&self) -> u64 {
        self.changes
    }
}

/// The journal as the scheduler writes it.
pub(crate) struct Journaling {
    journal: ExecutionJournal,
    /// The change number the journal is complete up to.
    written: watch::Sender<u64>,
    wake: Notify,
}

impl Journaling {
    pub fn new(journal: ExecutionJournal) -> Journaling {
        Journaling {
            journal,
            written: watch::channel(0).0,
            wake: Notify::new(),
        }
    }
}

impl Inner {
    /// Queues again the executions a journal kept, under their operations' names,
    /// each waiting `orphan_grace` from now for a client to re-attach. One whose
    /// action can no longer run (its blobs left the CAS) is answered instead.
    pub(crate) async fn restore(&self, saved: Vec<SavedExecution>) {
        let (mut queued, mut answered) = (0usize, 0usize);
        for execution in saved {
            let Some(key) = execution.key() else {
                tracing::warn!(token = %execution.token, "skipped a journaled execution with a malformed digest");
                continue;
            };
            let prepared = self.prepare(key.clone(), "").await;
            let mut state = self.state.lock();
            let owner = |identity: String| Owner {
                identity,
                instance: key.instance.clone(),
            };
            let failed = match prepared {
                Ok(Prepared::Job(job)) => {
                    let job = Job {
                        token: execution.token,
                        priority: execution.priority,
                        invocation: execution.invocation,
                        fingerprint: execution.fingerprint,
                        failures: execution.failures,
                        charged: execution.charged,
                        ..*job
                    };
                    let id = state.enqueue(job);
                    let job = state.jobs.get_mut(&id).expect("just queued");
                    job.queued_at = execution.queued_at;
                    job.orphaned_since = Some(self.clock.now());
                    for identity in job.charged.clone() {
                        state.operations.charge(&identity);
                    }
                    for (name, identity) in execution.operations {
                        Inner::open_operation(&mut state, id, name, owner(identity));
                    }
                    queued += 1;
                    continue;
                }
                Ok(Prepared::Missing(missing, what)) => missing_response(&missing, what),
                Err(status) => failed_response(&status),
            };
            for (name, identity) in execution.operations {
                let snapshot = completed(name, key.action, failed.clone());
                state.operations.answered(snapshot, owner(identity));
            }
            state.unjournaled.forget(execution.token);
            answered += 1;
        }
        if queued + answered > 0 {
            tracing::info!(
                queued,
                answered,
                "took back the executions the journal kept"
            );
        }
    }

    /// Waits until the journal holds change `change` (at once without a journal).
    pub(crate) async fn journaled(&self, change: u64) {
        let Some(journaling) = &self.journaling else {
            return;
        };
        journaling.wake.notify_one();
        let mut written = journaling.written.subscribe();
        let waited =
            tokio::time::timeout(WAIT_FOR_JOURNAL, written.wait_for(|upto| *upto >= change)).await;
        if waited.is_err() {
            tracing::error!(journal = %journaling.journal.describe(), "an execution was not journaled in time: it would be forgotten if the server stopped now");
        }
    }

    /// This scheduler's executions as the journal should hold them, live ones
    /// in the order they were queued.
    fn journal_lines(&self, whole: bool) -> (u64, Vec<Line>, usize) {
        let mut state = self.state.lock();
        let state = &mut *state;
        let owners = |name: &str| {
            state
                .operations
                .owner(name)
                .map(|owner| owner.identity.clone())
        };
        let upto = state.unjournaled.changes;
        let dirty = std::mem::take(&mut state.unjournaled.dirty);
        let ended = std::mem::take(&mut state.unjournaled.ended);
        let live = state.jobs.values().filter(|j| j.kind.is_client()).count();
        if whole {
            let mut jobs: Vec<&Job> = state
                .jobs
                .values()
                .filter(|j| matches!(j.kind, JobKind::Client))
                .collect();
            jobs.sort_by_key(|j| j.id);
            let lines = jobs
                .into_iter()
                .map(|j| Line::Put(SavedExecution::of(j, owners)))
                .collect();
            return (upto, lines, live);
        }
        let mut lines: Vec<Line> = ended.into_iter().map(Line::End).collect();
        lines.extend(
            dirty
                .iter()
                .filter_map(|id| state.jobs.get(id))
                .map(|j| Line::Put(SavedExecution::of(j, owners))),
        );
        (upto, lines, live)
    }
}

/// Writes the journal until the scheduler is dropped: whatever changed, in one
/// batch, whenever an Execute call waits or a quarter second has passed.
pub(crate) async fn keep_journal(weak: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Lines written since the journal was last rewritten whole; after a failed
    // write it is rewritten whole, so no batch is lost to the failure.
    let mut appended = 0usize;
    let mut whole = false;
    loop {
        {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let Some(journaling) = &inner.journaling else {
                return;
            };
            let woken = async { journaling.wake.notified().await };
            tokio::select! {
                _ = tick.tick() => {}
                _ = woken => {}
            }
        }
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let Some(journaling) = &inner.journaling else {
            return;
        };
        let (upto, lines, live) = inner.journal_lines(whole);
        if upto == *journaling.written.borrow() && !whole {
            continue;
        }
        let rewrite = whole || appended + lines.len() > COMPACT_AFTER + 2 * live;
        let (lines, live) = match rewrite && !whole {
            // The batch taken is part of the whole: take the whole instead.
            true => {
                let (_, all, live) = inner.journal_lines(true);
                (all, live)
            }
            false => (lines, live),
        };
        let count = lines.len();
        let path = journaling.journal.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let journal = ExecutionJournal { path };
            match rewrite {
                true => {
                    let executions: Vec<SavedExecution> = lines
                        .into_iter()
                        .filter_map(|l| match l {
                            Line::Put(e) => Some(e),
                            _ => None,
                        })
                        .collect();
                    journal.rewrite(&executions).map(drop)
                }
                false => journal.append(&lines),
            }
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match written {
            Ok(()) => {
                appended = if rewrite { live } else { appended + count };
                whole = false;
                journaling.written.send_replace(upto);
            }
            Err(e) => {
                tracing::error!(journal = %journaling.journal.describe(), error = %e, "cannot write the executions journal; retrying");
                metrics::counter!("paddock_journal_failures_total").increment(1);
                whole = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn execution(token: &str) -> SavedExecution {
        SavedExecution {
            token: token.into(),
            instance: "main".into(),
            action_hash: Digest::of(token.as_bytes()).hash_hex(),
            action_size: token.len() as i64,
            priority: 0,
            invocation: "build".into(),
            fingerprint: [0; 16],
            queued_at: SystemTime::UNIX_EPOCH,
            failures: 0,
            operations: vec![(format!("operations/{token}"), "alice".into())],
            charged: Vec::new(),
        }
    }

    #[test]
    fn the_journal_folds_puts_and_ends_and_drops_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let journal = ExecutionJournal::in_directory(dir.path());
        assert!(journal.load().unwrap().is_empty(), "no journal yet");
        let mut changed = execution("a");
        changed.failures = 2;
        journal
            .append(&[
                Line::Put(execution("a")),
                Line::Put(execution("b")),
                Line::Put(execution("c")),
                Line::End("b".into()),
                Line::Put(changed.clone()),
            ])
            .unwrap();
        // The process died in the middle of a line.
        let mut file = OpenOptions::new().append(true).open(&journal.path).unwrap();
        file.write_all(b"{\"put\":{\"token\":\"d\",\"inst").unwrap();
        let loaded = journal.load().unwrap();
        assert_eq!(loaded, vec![changed.clone(), execution("c")]);
        // Rewritten compacted: read again, the same.
        let text = std::fs::read_to_string(&journal.path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert_eq!(journal.load().unwrap(), vec![changed, execution("c")]);
    }

    #[test]
    fn a_journal_from_a_newer_paddock_or_with_a_bad_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let journal = ExecutionJournal::in_directory(dir.path());
        std::fs::write(&journal.path, "{\"version\":99}\n").unwrap();
        let error = journal.load().unwrap_err().to_string();
        assert!(error.contains("format 99"), "{error}");
        std::fs::write(
            &journal.path,
            "{\"version\":1}\nnot json\n{\"end\":\"x\"}\n",
        )
        .unwrap();
        let error = journal.load().unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("move it aside"), "{error}");
    }
}
