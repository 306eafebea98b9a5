//! The scheduler's state, guarded by one lock: executions, operations, workers.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use paddock_cas::ActionKey;
use paddock_proto::worker::v1 as wire;
use paddock_reapi::proto::re::ExecuteResponse;
use paddock_reapi::Digest;
use tokio::sync::{mpsc, watch};

use crate::{FairQueue, JobId, Offer, SessionId, Snapshot, Stage};

#[derive(Default)]
pub(crate) struct State {
    pub jobs: HashMap<JobId, Job>,
    /// The in-flight execution of each cacheable action, for merging.
    pub merge: HashMap<ActionKey, JobId>,
    pub queue: FairQueue,
    pub workers: HashMap<SessionId, WorkerSession>,
    pub operations: HashMap<String, OperationEntry>,
    next_id: u64,
}

/// One execution of an action, shared by every operation that asked for it.
pub(crate) struct Job {
    pub id: JobId,
    pub key: ActionKey,
    pub digest: Digest,
    pub action: Bytes,
    pub command: Bytes,
    pub platform: Vec<(String, String)>,
    pub timeout: Duration,
    pub priority: i32,
    pub invocation: String,
    pub cacheable: bool,
    pub queued_at: SystemTime,
    /// How many workers have been given this execution.
    pub attempts: u32,
    pub state: JobState,
    pub operations: Vec<String>,
    /// Clients currently streaming one of its operations.
    pub waiters: usize,
    pub orphaned_since: Option<Instant>,
    pub unsatisfiable_since: Option<Instant>,
}

pub(crate) enum JobState {
    Queued,
    Running {
        session: SessionId,
        assignment: String,
    },
}

pub(crate) struct OperationEntry {
    pub updates: watch::Sender<Snapshot>,
    /// The execution behind the operation, until it finishes.
    pub job: Option<JobId>,
    pub finished_at: Option<Instant>,
}

impl OperationEntry {
    pub fn finish(&self, response: ExecuteResponse) {
        self.updates.send_modify(|s| {
            s.stage = Stage::Completed;
            s.worker = None;
            s.response = Some(response);
        });
    }
}

pub(crate) struct WorkerSession {
    pub session: SessionId,
    pub name: String,
    pub offer: Offer,
    pub capacity: usize,
    /// Assignment id to execution.
    pub running: HashMap<String, JobId>,
    pub outbound: mpsc::UnboundedSender<wire::SchedulerMessage>,
    pub last_seen: Instant,
}

impl Job {
    pub fn snapshot(&self, name: &str, state: &State) -> Snapshot {
        let (stage, worker) = match &self.state {
            JobState::Queued => (Stage::Queued, None),
            JobState::Running { session, .. } => (
                Stage::Executing,
                state.workers.get(session).map(|w| w.name.clone()),
            ),
        };
        Snapshot {
            name: name.to_owned(),
            action_digest: self.digest,
            stage,
            worker,
            response: None,
        }
    }
}

impl State {
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Adds a new execution to the queue and returns its id.
    pub fn enqueue(&mut self, mut job: Job) -> JobId {
        let id = self.next_id();
        job.id = id;
        if job.cacheable {
            self.merge.insert(job.key.clone(), id);
        }
        self.queue.push(job.priority, &job.invocation, id, false);
        self.jobs.insert(id, job);
        id
    }

    /// Tells every operation of an execution where it stands now.
    pub fn notify(&self, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        for name in &job.operations {
            if let Some(entry) = self.operations.get(name) {
                let snapshot = job.snapshot(name, self);
                entry.updates.send_if_modified(|s| {
                    let changed = s.stage != snapshot.stage || s.worker != snapshot.worker;
                    *s = snapshot;
                    changed
                });
            }
        }
    }

    /// Ends an execution with `response` for every operation still attached to it.
    pub fn complete(&mut self, job_id: JobId, response: ExecuteResponse) {
        let Some(job) = self.jobs.remove(&job_id) else {
            return;
        };
        if self.merge.get(&job.key) == Some(&job_id) {
            self.merge.remove(&job.key);
        }
        match &job.state {
            JobState::Queued => {
                self.queue
                    .remove(job.priority, &job.invocation, job_id, false);
            }
            JobState::Running {
                session,
                assignment,
            } => {
                if let Some(worker) = self.workers.get_mut(session) {
                    worker.running.remove(assignment);
                }
            }
        }
        let now = Instant::now();
        for name in &job.operations {
            if let Some(entry) = self.operations.get_mut(name) {
                entry.job = None;
                entry.finished_at = Some(now);
                entry.finish(response.clone());
            }
        }
    }
}
