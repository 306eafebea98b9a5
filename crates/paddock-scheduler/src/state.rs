//! The scheduler's state, guarded by one lock: executions, operations, workers.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hashlink::LinkedHashMap;
use paddock_cas::ActionKey;
use paddock_proto::worker::v1 as wire;
use paddock_reapi::filter::DigestFilter;
use paddock_reapi::proto::re::{ActionResult, ExecuteResponse};
use paddock_reapi::Digest;
use tokio::sync::mpsc;

use crate::clock::SharedClock;
use crate::durable::Unjournaled;
use crate::health::Fleet;
use crate::history::{Fingerprint, History};
use crate::operations::Operations;
use crate::queue::{Class, ClassId, Queues};
use crate::results::Outputs;
use crate::shared::{ExecutionId, Replica};
use crate::{JobId, Offer, SessionId, Snapshot, Stage};

pub(crate) struct State {
    pub jobs: HashMap<JobId, Job>,
    /// The in-flight execution of each cacheable action, for merging.
    pub merge: HashMap<ActionKey, JobId>,
    pub queue: Queues,
    pub workers: HashMap<SessionId, WorkerSession>,
    pub operations: Operations,
    /// Every worker's health, by name.
    pub fleet: Fleet,
    /// The identity each worker name belongs to, for as long as the fleet remembers
    /// the worker.
    pub bindings: HashMap<String, String>,
    /// How long similar actions took.
    pub history: History,
    /// Recent results that healthy workers produced, to probe quarantined ones with.
    pub known: VecDeque<Known>,
    /// Actions that recently timed out, and where: if one then finishes in time on
    /// another worker, the timeout counts against the first.
    pub timeouts: LinkedHashMap<ActionKey, (String, Duration)>,
    /// Clients' executions changed since the journal was last written.
    pub unjournaled: Unjournaled,
    /// What this replica holds, follows and has to report, with a shared queue.
    pub replica: Replica,
    next_id: u64,
    clock: SharedClock,
}

/// A result whose action can be run again to check a worker.
#[derive(Clone)]
pub(crate) struct Known {
    pub key: ActionKey,
    pub action: Bytes,
    pub command: Bytes,
    pub platform: Vec<(String, String)>,
    pub timeout: Duration,
    pub worker: String,
    pub outputs: Outputs,
}

/// One execution of an action, shared by every operation that asked for it.
pub(crate) struct Job {
    pub id: JobId,
    /// Names it across restarts, in the executions journal.
    pub token: String,
    pub key: ActionKey,
    pub action: Bytes,
    pub command: Bytes,
    pub platform: Vec<(String, String)>,
    pub timeout: Duration,
    pub priority: i32,
    pub invocation: String,
    pub cacheable: bool,
    pub queued_at: SystemTime,
    /// Attempts that failed on a worker (crash, lost, set-up, an unusable result).
    pub failures: u32,
    pub state: JobState,
    pub operations: Vec<String>,
    /// Owners of deleted operations of it, whose quotas it counts against until it
    /// ends.
    pub charged: Vec<String>,
    /// Clients currently streaming one of its operations.
    pub waiters: usize,
    pub orphaned_since: Option<Instant>,
    pub unsatisfiable_since: Option<Instant>,
    pub kind: JobKind,
    /// Workers that must not run it (a verification runs somewhere new).
    pub exclude: Vec<String>,
    /// Workers that failed it: others are preferred while any is connected.
    pub avoid: Vec<String>,
    pub fingerprint: Fingerprint,
    /// Whether a speculative copy has been started.
    pub speculated: bool,
    /// Its input root's digest and those of the root's subdirectories: what a
    /// worker that holds its inputs has laid out before.
    pub inputs: Vec<Digest>,
    /// Its queue, while it is queued.
    pub class: ClassId,
    /// Its execution in the shared queue and the attempt this replica holds.
    pub shared: Option<(ExecutionId, i32)>,
}

/// Why an execution exists.
pub(crate) enum JobKind {
    /// A client asked for it.
    Client,
    /// A finished action run again elsewhere to compare: the runs so far, each with
    /// its worker, outputs and result.
    Verify {
        runs: Vec<(String, Outputs, ActionResult)>,
    },
    /// A known action run on a worker being probed.
    Canary { worker: String, expected: Outputs },
}

impl JobKind {
    pub fn is_client(&self) -> bool {
        matches!(self, JobKind::Client)
    }

    /// The one worker that may run it, if only one may.
    pub fn only_on(&self) -> Option<&str> {
        match self {
            JobKind::Canary { worker, .. } => Some(worker),
            _ => None,
        }
    }
}

pub(crate) enum JobState {
    Queued,
    /// On one worker, or more while a speculative copy runs.
    Running(Vec<Attempt>),
}

pub(crate) struct Attempt {
    pub session: SessionId,
    pub assignment: String,
    pub worker: String,
    pub started: Instant,
    pub speculative: bool,
}

pub(crate) struct WorkerSession {
    pub session: SessionId,
    pub name: String,
    /// Which instances' actions it may run (those its identity may serve).
    pub serves: crate::Serves,
    pub offer: Offer,
    pub capacity: usize,
    /// Assignment id to execution.
    running: HashMap<String, JobId>,
    /// Since when it has run nothing, if it runs nothing.
    idle_since: Option<Instant>,
    /// The input directories it says it laid out lately.
    cache: Option<DigestFilter>,
    pub outbound: mpsc::UnboundedSender<wire::SchedulerMessage>,
    pub last_seen: Instant,
}

impl WorkerSession {
    pub fn new(
        session: SessionId,
        name: String,
        serves: crate::Serves,
        offer: Offer,
        capacity: usize,
        outbound: mpsc::UnboundedSender<wire::SchedulerMessage>,
        now: Instant,
    ) -> WorkerSession {
        WorkerSession {
            session,
            name,
            serves,
            offer,
            capacity,
            running: HashMap::new(),
            idle_since: Some(now),
            cache: None,
            outbound,
            last_seen: now,
        }
    }

    pub fn serves(&self, instance: &str) -> bool {
        (self.serves)(instance)
    }

    /// Assignment id to execution, for what it runs.
    pub fn running(&self) -> &HashMap<String, JobId> {
        &self.running
    }

    /// What it ran when it was lost.
    pub fn into_running(self) -> HashMap<String, JobId> {
        self.running
    }

    pub fn assign(&mut self, assignment: String, job: JobId) {
        self.running.insert(assignment, job);
        self.idle_since = None;
    }

    /// Forgets an assignment (finished, lost or cancelled).
    pub fn release(&mut self, assignment: &str, now: Instant) {
        self.running.remove(assignment);
        if self.running.is_empty() {
            self.idle_since.get_or_insert(now);
        }
    }

    /// How long it has run nothing (zero while it runs something).
    pub fn idle_for(&self, now: Instant) -> Duration {
        self.idle_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    /// Takes the worker's latest summary of its inputs cache.
    pub fn note_cache(&mut self, cache: DigestFilter) {
        self.cache = Some(cache);
    }

    /// How much of a job's inputs the worker seems to hold: the whole input root
    /// counts for more than any number of its subdirectories.
    pub fn holds(&self, inputs: &[Digest]) -> usize {
        let Some(cache) = &self.cache else {
            return 0;
        };
        let mut held = inputs.iter().map(|d| cache.contains(d));
        match held.next() {
            Some(true) => 1 + inputs.len(),
            Some(false) => held.filter(|h| *h).count(),
            None => 0,
        }
    }

    /// Tells the worker to stop an assignment and forgets it.
    pub fn cancel(&mut self, assignment: &str, now: Instant) {
        self.release(assignment, now);
        let _ = self.outbound.send(wire::SchedulerMessage {
            message: Some(wire::scheduler_message::Message::Cancel(wire::Cancel {
                assignment_id: assignment.to_owned(),
            })),
        });
    }
}

impl Job {
    /// An execution not yet queued, with no priority, invocation or constraints;
    /// `State::enqueue` gives it its id.
    pub fn new(
        key: ActionKey,
        action: Bytes,
        command: Bytes,
        platform: Vec<(String, String)>,
        timeout: Duration,
        kind: JobKind,
    ) -> Job {
        Job {
            id: 0,
            token: uuid::Uuid::new_v4().simple().to_string(),
            key,
            action,
            command,
            platform,
            timeout,
            priority: 0,
            invocation: String::new(),
            cacheable: false,
            queued_at: SystemTime::UNIX_EPOCH, // set when it is queued
            failures: 0,
            state: JobState::Queued,
            operations: Vec::new(),
            charged: Vec::new(),
            waiters: 0,
            orphaned_since: None,
            unsatisfiable_since: None,
            kind,
            exclude: Vec::new(),
            avoid: Vec::new(),
            fingerprint: [0; 16],
            speculated: false,
            inputs: Vec::new(),
            class: 0,
            shared: None,
        }
    }

    /// What it needs of a worker, which decides the queue it waits in.
    pub fn queue_class(&self) -> Class {
        Class {
            instance: self.key.instance.clone(),
            platform: self.platform.clone(),
            only_on: self.kind.only_on().map(str::to_owned),
        }
    }

    pub fn snapshot(&self, name: &str) -> Snapshot {
        let (stage, worker) = match &self.state {
            JobState::Queued => (Stage::Queued, None),
            JobState::Running(attempts) => {
                (Stage::Executing, attempts.first().map(|a| a.worker.clone()))
            }
        };
        Snapshot {
            name: name.to_owned(),
            action_digest: self.key.action,
            stage,
            worker,
            response: None,
        }
    }
}

impl State {
    pub fn new(fleet: Fleet, max_finished_operations: usize, clock: SharedClock) -> State {
        State {
            jobs: HashMap::new(),
            merge: HashMap::new(),
            queue: Queues::default(),
            workers: HashMap::new(),
            operations: Operations::new(max_finished_operations, clock.clone()),
            fleet,
            bindings: HashMap::new(),
            history: History::default(),
            known: VecDeque::new(),
            timeouts: LinkedHashMap::new(),
            unjournaled: Unjournaled::default(),
            replica: Replica::default(),
            next_id: 0,
            clock,
        }
    }

    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Adds a new execution to the queue and returns its id.
    pub fn enqueue(&mut self, mut job: Job) -> JobId {
        let id = self.next_id();
        job.id = id;
        job.queued_at = self.clock.wall();
        // An execution from the shared queue was merged there.
        if job.cacheable && job.kind.is_client() && job.shared.is_none() {
            self.merge.insert(job.key.clone(), id);
        }
        job.class = self
            .queue
            .push(job.queue_class(), job.priority, &job.invocation, id, false);
        self.unjournaled.changed(&job);
        self.jobs.insert(id, job);
        id
    }

    /// Tells every operation of an execution where it stands now.
    pub fn notify(&self, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        for name in &job.operations {
            self.operations.update(job.snapshot(name));
        }
    }

    /// Stops an attempt on its worker, if it still runs there.
    pub fn cancel_attempt(&mut self, attempt: &Attempt) {
        if let Some(worker) = self.workers.get_mut(&attempt.session) {
            if worker.running.contains_key(&attempt.assignment) {
                worker.cancel(&attempt.assignment, self.clock.now());
            }
        }
    }

    /// Each worker with free slots, and how many.
    pub fn free_slots(&self) -> Vec<(SessionId, usize)> {
        self.workers
            .values()
            .filter(|w| w.running().len() < w.capacity)
            .map(|w| (w.session, w.capacity - w.running().len()))
            .collect()
    }

    /// Takes a job out of the state: out of the queue, or stopped on its workers.
    pub fn remove_job(&mut self, job_id: JobId) -> Option<Job> {
        let job = self.jobs.remove(&job_id)?;
        if self.merge.get(&job.key) == Some(&job_id) {
            self.merge.remove(&job.key);
        }
        match &job.state {
            JobState::Queued => {
                self.queue
                    .remove(job.class, job.priority, &job.invocation, job_id, false);
            }
            JobState::Running(attempts) => {
                // Whatever still runs (a speculative copy) is not needed any more.
                for attempt in attempts {
                    self.cancel_attempt(attempt);
                }
            }
        }
        Some(job)
    }

    /// Ends an execution with `response` for every operation still attached to it.
    pub fn complete(&mut self, job_id: JobId, response: ExecuteResponse) {
        let Some(job) = self.remove_job(job_id) else {
            return;
        };
        self.unjournaled.ended(&job);
        self.replica.done(&job, &response);
        // One response, shared by every operation that asked for it.
        let response = Arc::new(response);
        for name in &job.operations {
            self.operations.finish(name, response.clone());
        }
        for identity in &job.charged {
            self.operations.settle(identity);
        }
    }
}
