//! The scheduler: executions, operations, the queue, platform matching, worker
//! sessions and retries.
//!
//! This crate is policy. It knows nothing of gRPC transport: `paddock-server` turns
//! Execute calls into [`Scheduler::execute`] and worker streams into
//! [`Scheduler::connect_worker`] and [`Scheduler::worker_message`], and renders the
//! [`Snapshot`]s it gets back as `google.longrunning.Operation`s.
//!
//! One action digest (per instance name) has at most one execution in flight; each
//! Execute call gets its own operation, and operations of identical actions share the
//! execution. An execution whose clients have all gone away is cancelled after a grace
//! period, so that a client can re-attach with WaitExecution in between.
//!
//! Trust: no worker's result is cached or returned before it is checked against the
//! command and the CAS ([`results`]); every outcome feeds the worker's health
//! ([`health`]), and a worker anomalous against its pool is quarantined, then probed
//! with canaries. Stragglers get speculative copies ([`history`]), and a sample of
//! results can be re-run elsewhere and compared.

mod clock;
mod completion;
#[cfg(test)]
mod core_tests;
mod dispatch;
mod durable;
pub mod health;
mod history;
mod keeping;
mod matching;
mod operations;
mod queue;
pub mod results;
mod saved;
mod scaling;
mod shared;
mod state;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use clock::{SharedClock, SystemClock};
use health::{Counts, Standing};

use paddock_cas::{read_all, ActionCache, ActionKey, BlobStore};
use paddock_config::SchedulerConfig;
use paddock_proto::worker::v1 as wire;
use paddock_reapi::digest::check_digest_function;
use paddock_reapi::proto::re::{Action, ActionResult, Command, ExecuteRequest, ExecuteResponse};
use paddock_reapi::{status, validate, Digest};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

pub use durable::ExecutionJournal;
pub use matching::{Offer, Policies};
use operations::Found;
pub use operations::Owner;
pub use queue::Class;
pub use saved::{
    RecordStore, Saved, SavedRecord, SavedStanding, SavedStateError, SavedWorker, StateFile,
};
pub use scaling::PoolLoad;
pub use shared::{
    Claimed, ExecutionId, ExecutionStanding, Notice, Progress, SharedError, SharedOperation,
    SharedQueue, SharedStage, Submission,
};
use state::{Job, JobKind, State, WorkerSession};

/// Whether a worker may run actions of an instance.
pub type Serves = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Identifies one execution.
pub type JobId = u64;
/// Identifies one connection of a worker.
pub type SessionId = u64;

/// The range of `ExecutionPolicy.priority` the scheduler orders by; priorities
/// outside it are clamped to it.
pub const PRIORITY_RANGE: (i32, i32) = (-1000, 1000);

/// Where an operation stands, in REAPI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Queued,
    Executing,
    Completed,
}

/// An operation as its clients see it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub name: String,
    pub action_digest: Digest,
    pub stage: Stage,
    /// The worker running the action, while it runs.
    pub worker: Option<String>,
    /// Set when, and only when, the stage is Completed; shared by every operation of
    /// the execution.
    pub response: Option<Arc<ExecuteResponse>>,
}

/// A client's view of one operation; while it is held, the execution has a waiter.
pub struct OperationWatch {
    pub updates: watch::Receiver<Snapshot>,
    /// Turns true when the scheduler shuts down: the client should go elsewhere.
    pub closing: watch::Receiver<bool>,
    _waiter: Option<Waiter>,
}

/// Counts one waiting client of an execution for as long as it lives.
struct Waiter {
    scheduler: Weak<Inner>,
    job: JobId,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(inner) = self.scheduler.upgrade() {
            let mut state = inner.state.lock();
            if let Some(job) = state.jobs.get_mut(&self.job) {
                job.waiters -= 1;
                if job.waiters == 0 {
                    job.orphaned_since = Some(inner.clock.now());
                }
            }
        }
    }
}

/// An action made ready to queue, or the blobs it lacks.
enum Prepared {
    Job(Box<Job>),
    Missing(Vec<Digest>, &'static str),
}

/// Who asked for an execution: the caller's identity (what quotas count), and from
/// the client's RequestMetadata, its invocation and the action's mnemonic.
#[derive(Debug, Clone, Default)]
pub struct Requester {
    pub identity: String,
    /// `tool_invocation_id`: the unit of fair queueing.
    pub invocation: String,
    /// `action_mnemonic` (e.g. `CppCompile`): what similar actions share.
    pub mnemonic: String,
}

/// A worker as operators see it.
#[derive(Debug, Clone)]
pub struct WorkerReport {
    pub name: String,
    /// The identity the worker's name is bound to.
    pub identity: String,
    pub pool: String,
    /// `active`, `draining`, `quarantined` or `probing`.
    pub standing: String,
    pub reason: String,
    pub since: SystemTime,
    pub connected: bool,
    pub capacity: usize,
    pub running: usize,
    /// The platform properties its connected sessions offer.
    pub properties: Vec<(String, String)>,
    /// Over the health window, and since the scheduler started.
    pub recent: Counts,
    pub totals: Counts,
}

/// What an operator asks of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerCommand {
    /// No new work; what runs finishes.
    Drain,
    /// No work until released.
    Quarantine,
    /// Back to work, statistics cleared.
    Release,
}

/// A worker's session as the transport sees it: its id and what to send it.
pub struct WorkerConnection {
    pub session: SessionId,
    pub outbound: mpsc::UnboundedReceiver<wire::SchedulerMessage>,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    clock: SharedClock,
    /// Where clients' executions outlive the process.
    journaling: Option<durable::Journaling>,
    /// The queue shared with other servers, if there is one.
    sharing: Option<shared::Sharing>,
    closing: watch::Sender<bool>,
    cas: Arc<dyn BlobStore>,
    action_cache: Arc<dyn ActionCache>,
    config: SchedulerConfig,
    policies: Policies,
    bounds: Bounds,
    /// Where the fleet's records outlive the process.
    records: Option<keeping::Keeping>,
    pool_gauges: Mutex<scaling::PoolGauges>,
    /// When queued actions were last judged for workers able to run them.
    unsatisfiable_judged: Mutex<Option<Instant>>,
    /// Wakes the saving of the records when a standing changed.
    save_now: tokio::sync::Notify,
}

/// Where the scheduler's state outlives its process; by default, nowhere.
#[derive(Default)]
pub struct Lasting {
    /// The workers' records: health, quarantines, name bindings.
    pub records: Option<Arc<dyn RecordStore>>,
    /// Clients' queued and running executions, with their operations.
    pub executions: Option<ExecutionJournal>,
    /// The queue this server shares with others: executions and operations live
    /// there instead of in this process.
    pub shared: Option<Arc<dyn SharedQueue>>,
}

/// What the scheduler holds at most.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The most distinct directories a result's output tree may have.
    pub max_tree_directories: usize,
    /// Executions one identity may have queued or running (one per Execute call).
    pub max_executions: usize,
    /// Finished operations kept per identity for WaitExecution and GetOperation.
    pub max_finished_operations: usize,
    /// Worker names one identity may have bound at once.
    pub max_worker_names: usize,
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

fn store_error(e: paddock_cas::StoreError) -> Status {
    Status::new(e.code(), e.to_string())
}

impl Scheduler {
    /// A scheduler over the server's CAS and ActionCache, within `bounds`, taking
    /// back the workers' records from `records` and keeping them there. Call
    /// [`Scheduler::run`] to drive its timers.
    pub async fn new(
        config: SchedulerConfig,
        cas: Arc<dyn BlobStore>,
        action_cache: Arc<dyn ActionCache>,
        bounds: Bounds,
        lasting: Lasting,
    ) -> Result<Self, SavedStateError> {
        Self::with_clock(
            config,
            cas,
            action_cache,
            bounds,
            lasting,
            Arc::new(SystemClock),
        )
        .await
    }

    /// [`Scheduler::new`] on the time of `clock`.
    async fn with_clock(
        config: SchedulerConfig,
        cas: Arc<dyn BlobStore>,
        action_cache: Arc<dyn ActionCache>,
        bounds: Bounds,
        lasting: Lasting,
        clock: SharedClock,
    ) -> Result<Self, SavedStateError> {
        let Lasting {
            records,
            executions,
            shared,
        } = lasting;
        let policies = Policies::new(config.property_policies.clone());
        let mut state = State::new(
            health::Fleet::new(config.quarantine.clone(), clock.clone()),
            bounds.max_finished_operations,
            clock.clone(),
        );
        if let Some(store) = &records {
            let saved = store.load().await?;
            let workers = saved.workers.len();
            state.fleet.restore(saved.workers);
            state.bindings.extend(saved.bindings);
            tracing::info!(workers, from = %store.describe(), "took back the workers' records");
        }
        let saved_executions = match &executions {
            Some(journal) => {
                state.unjournaled = durable::Unjournaled::enabled();
                journal.load()?
            }
            None => Vec::new(),
        };
        let scheduler = Scheduler {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                closing: watch::channel(false).0,
                cas,
                action_cache,
                config,
                policies,
                bounds,
                records: records.map(|store| keeping::Keeping::new(store, clock.now())),
                clock,
                pool_gauges: Default::default(),
                unsatisfiable_judged: Default::default(),
                save_now: Default::default(),
                journaling: executions.map(durable::Journaling::new),
                sharing: shared.map(|queue| shared::Sharing {
                    queue,
                    wake: Default::default(),
                }),
            }),
        };
        scheduler.inner.restore(saved_executions).await;
        Ok(scheduler)
    }

    /// Runs the periodic work (lost workers, orphaned executions, unsatisfiable
    /// actions, expired operations) until the scheduler is dropped.
    pub async fn run(self) {
        let weak = Arc::downgrade(&self.inner);
        drop(self);
        tokio::spawn(keeping::keep_records(weak.clone()));
        tokio::spawn(durable::keep_journal(weak.clone()));
        tokio::spawn(shared::replicate(weak.clone()));
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else {
                return;
            };
            inner.sweep();
            inner.report(&inner.state.lock());
            inner.report_pools();
        }
    }

    /// Stops for good: every worker session ends (workers reconnect elsewhere or later)
    /// and every client following an operation is told to go away, so that a graceful
    /// shutdown is not held up by long-lived streams.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        {
            let mut state = inner.state.lock();
            inner.closing.send_replace(true);
            state.workers.clear();
            inner.report(&state);
        }
        let _ = inner.save_due(true).await; // logged; nothing more to do on the way out
                                            // What ended lately, so that a restart does not run it again.
        let change = inner.state.lock().unjournaled.changes();
        inner.journaled(change).await;
    }

    /// Starts (or joins) an execution, or answers from the ActionCache.
    pub async fn execute(
        &self,
        request: ExecuteRequest,
        requester: Requester,
    ) -> Result<OperationWatch, Status> {
        let inner = &self.inner;
        check_digest_function(request.digest_function).map_err(|e| invalid(e.to_string()))?;
        let action_digest = Digest::from_proto(request.action_digest.as_ref())
            .map_err(|e| invalid(format!("action_digest: {e}")))?;
        let priority = request
            .execution_policy
            .as_ref()
            .map(|p| p.priority.clamp(PRIORITY_RANGE.0, PRIORITY_RANGE.1))
            .unwrap_or(0);
        let key = ActionKey {
            instance: request.instance_name.clone(),
            action: action_digest,
        };
        let owner = Owner {
            identity: requester.identity.clone(),
            instance: request.instance_name.clone(),
        };

        if !request.skip_cache_lookup {
            if let Some(result) = inner.action_cache.get(&key).await.map_err(store_error)? {
                metrics::counter!("paddock_executions_total", "outcome" => "cache_hit")
                    .increment(1);
                return Ok(inner.cache_hit(owner, key, result));
            }
        }

        let mut job = match inner
            .prepare(key.clone(), requester.mnemonic.as_str())
            .await?
        {
            Prepared::Job(job) => *job,
            Prepared::Missing(missing, what) => {
                return Ok(inner.missing(owner, action_digest, missing, what))
            }
        };
        job.priority = priority;
        job.invocation = requester.invocation;
        if let Some(sharing) = &inner.sharing {
            let submission = shared::Submission {
                operation: operation_name(),
                identity: owner.identity.clone(),
                class: job.queue_class(),
                key,
                priority,
                invocation: job.invocation.clone(),
                cacheable: job.cacheable,
                fingerprint: job.fingerprint,
            };
            return inner.submit_shared(sharing, submission, owner).await;
        }
        let (watch, change) = {
            let mut state = inner.state.lock();
            // Counted under the lock that enqueueing takes; a cache hit, above, queues
            // nothing and counts against nothing.
            inner.check_quota(&state, &owner.identity)?;
            let job_id = match state.merge.get(&job.key).copied().filter(|_| job.cacheable) {
                Some(existing) => {
                    metrics::counter!("paddock_executions_merged_total").increment(1);
                    existing
                }
                None => state.enqueue(job),
            };
            let watch = inner.attach_operation(&mut state, job_id, owner);
            inner.dispatch(&mut state);
            (watch, state.unjournaled.changes())
        };
        // The client hears of its operation once a restart would not lose it.
        inner.journaled(change).await;
        Ok(watch)
    }

    /// Who started an operation, and on which instance; `None` if unknown or expired.
    /// With a shared queue, an operation another server started is found there (and
    /// followed here from then on).
    pub async fn owner(&self, name: &str) -> Option<Owner> {
        let local = self.inner.state.lock().operations.owner(name).cloned();
        match local {
            Some(owner) => Some(owner),
            None => self.inner.find_shared(name).await,
        }
    }

    /// Follows an existing operation (WaitExecution); `None` if unknown or expired.
    pub async fn watch(&self, name: &str) -> Option<OperationWatch> {
        let inner = &self.inner;
        self.owner(name).await?;
        let key = {
            let mut state = inner.state.lock();
            match state.operations.find(name)? {
                Found::Live(updates, job) => {
                    let waiter = job.map(|job| inner.add_waiter(&mut state, job));
                    return Some(OperationWatch {
                        updates,
                        closing: inner.closing.subscribe(),
                        _waiter: waiter,
                    });
                }
                Found::Hit(key) => key,
            }
        };
        let (_, updates) = watch::channel(inner.hit_snapshot(name, key).await);
        Some(OperationWatch {
            updates,
            closing: inner.closing.subscribe(),
            _waiter: None,
        })
    }

    /// The current state of an operation (GetOperation). A client polling this way
    /// counts as waiting: the execution is not cancelled as orphaned while it polls.
    pub async fn get(&self, name: &str) -> Option<Snapshot> {
        self.owner(name).await?;
        let key = {
            let mut state = self.inner.state.lock();
            match state.operations.find(name)? {
                Found::Live(updates, job) => {
                    if let Some(job) = job.and_then(|id| state.jobs.get_mut(&id)) {
                        if job.waiters == 0 {
                            job.orphaned_since = Some(self.inner.clock.now());
                        }
                    }
                    let snapshot = updates.borrow().clone();
                    return Some(snapshot);
                }
                Found::Hit(key) => key,
            }
        };
        Some(self.inner.hit_snapshot(name, key).await)
    }

    /// Cancels one operation (CancelOperation). The execution itself stops when no
    /// operation needs it any more. Returns false if the operation is unknown.
    pub async fn cancel(&self, name: &str) -> Result<bool, Status> {
        let inner = &self.inner;
        if let Some(sharing) = &inner.sharing {
            let following = inner.state.lock().operations.following(name);
            if let Some(execution) = following {
                if !sharing.queue.cancel(name).await? {
                    return Ok(false);
                }
                let mut state = inner.state.lock();
                state.operations.finish(name, shared::cancelled_response());
                state.replica.unfollow(execution, name);
                sharing.wake.notify_one();
                return Ok(true);
            }
        }
        Ok(self.cancel_here(name))
    }

    /// [`Scheduler::cancel`] for an operation of this scheduler's own.
    fn cancel_here(&self, name: &str) -> bool {
        let inner = &self.inner;
        let mut guard = inner.state.lock();
        let state = &mut *guard;
        let Some(job_id) = state.operations.job(name) else {
            // Unknown, or already finished.
            return state.operations.owner(name).is_some();
        };
        let cancelled = status::status(Code::Cancelled, "the operation was cancelled");
        state.operations.finish(
            name,
            Arc::new(ExecuteResponse {
                status: Some(cancelled),
                ..Default::default()
            }),
        );
        let orphan = match state.jobs.get_mut(&job_id) {
            Some(job) => {
                job.operations.retain(|op| op != name);
                state.unjournaled.changed(job);
                job.operations.is_empty()
            }
            None => false,
        };
        if orphan {
            inner.abort_job(state, job_id, "every operation was cancelled");
        }
        true
    }

    /// Forgets an operation (DeleteOperation): the client is no longer interested,
    /// but the execution is not cancelled for that. False if unknown.
    pub async fn delete(&self, name: &str) -> Result<bool, Status> {
        let inner = &self.inner;
        if let Some(sharing) = &inner.sharing {
            let following = inner.state.lock().operations.following(name);
            if let Some(execution) = following {
                let found = sharing.queue.delete(name).await?;
                let mut state = inner.state.lock();
                state.operations.remove(name);
                state.replica.unfollow(execution, name);
                return Ok(found);
            }
        }
        Ok(self.delete_here(name))
    }

    /// [`Scheduler::delete`] for an operation of this scheduler's own.
    fn delete_here(&self, name: &str) -> bool {
        let mut guard = self.inner.state.lock();
        let state = &mut *guard;
        let Some(owner) = state.operations.owner(name).cloned() else {
            return false;
        };
        if let Some(job_id) = state.operations.remove(name).flatten() {
            match state.jobs.get_mut(&job_id) {
                Some(job) => {
                    job.operations.retain(|op| op != name);
                    // The execution runs on, and counts against its owner until it ends.
                    job.charged.push(owner.identity);
                    state.unjournaled.changed(job);
                }
                None => state.operations.settle(&owner.identity),
            }
        }
        true
    }

    /// Registers a worker's new session, for `identity` (who its credentials say it
    /// is), to run actions of the instances `serves` accepts. A worker's name belongs to the identity that first connected with it,
    /// for as long as the scheduler remembers the worker: another session from the
    /// same identity replaces the old one; one from another identity is refused.
    pub async fn connect_worker(
        &self,
        register: wire::Register,
        identity: &str,
        serves: Serves,
    ) -> Result<WorkerConnection, Status> {
        let inner = &self.inner;
        if register.name.trim().is_empty() {
            return Err(invalid("a worker must have a name"));
        }
        if register.name.len() > 256 || register.name.chars().any(char::is_control) {
            return Err(invalid(
                "a worker's name must be at most 256 bytes, without control characters",
            ));
        }
        if register.capacity == 0 {
            return Err(invalid("a worker's capacity must be at least 1"));
        }
        // Its record as other servers sharing the store may have left it.
        inner
            .refresh(std::slice::from_ref(&register.name))
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "the scheduler cannot read this worker's record now: {e}"
                ))
            })?;
        let offer = Offer::new(register.properties.into_iter().map(|p| (p.name, p.value)));
        let (tx, outbound) = mpsc::unbounded_channel();
        let mut state = inner.state.lock();
        // Checked under the lock that `shutdown` takes, so no session can slip in
        // after it has ended them all.
        if *inner.closing.borrow() {
            return Err(Status::unavailable("the scheduler is shutting down"));
        }
        let bound = state.bindings.values().filter(|o| *o == identity).count();
        let max = inner.bounds.max_worker_names;
        if bound >= max && !state.bindings.contains_key(&register.name) {
            metrics::counter!("paddock_quota_refusals_total", "quota" => "max_worker_names")
                .increment(1);
            return Err(Status::resource_exhausted(format!(
                "{identity} has {bound} worker names, the most allowed \
                 (auth.quotas.max_worker_names); names are kept an hour after their worker leaves"
            )));
        }
        if let Some(owner) = state.bindings.get(&register.name) {
            if owner != identity {
                tracing::warn!(worker = %register.name, %identity, "refused: a worker's name used by another identity");
                metrics::counter!("paddock_auth_refusals_total", "kind" => "worker_name", "method" => "Scheduler/Session")
                    .increment(1);
                return Err(Status::permission_denied(format!(
                    "the worker name {:?} belongs to another identity",
                    register.name
                )));
            }
        }
        state
            .bindings
            .insert(register.name.clone(), identity.to_owned());
        let pool = offer
            .values(&inner.config.quarantine.pool_property)
            .next()
            .cloned()
            .unwrap_or_default();
        let record = state.fleet.enroll(&register.name, pool);
        if !record.standing.takes_work() {
            tracing::warn!(worker = %register.name, standing = record.standing.name(), reason = %record.reason, "a worker that is not active connected");
        }
        let previous: Vec<SessionId> = state
            .workers
            .values()
            .filter(|w| w.name == register.name)
            .map(|w| w.session)
            .collect();
        for session in previous {
            inner.drop_worker(&mut state, session, "it connected again");
        }
        let session = state.next_id();
        let heartbeat_interval_ms = inner.config.heartbeat_interval.get().as_millis() as u32;
        let _ = tx.send(wire::SchedulerMessage {
            message: Some(wire::scheduler_message::Message::Registered(
                wire::Registered {
                    heartbeat_interval_ms,
                },
            )),
        });
        tracing::info!(worker = %register.name, %identity, capacity = register.capacity, properties = %offer, "worker connected");
        state.workers.insert(
            session,
            WorkerSession::new(
                session,
                register.name,
                serves,
                offer,
                register.capacity as usize,
                tx,
                inner.clock.now(),
            ),
        );
        inner.report(&state);
        inner.dispatch(&mut state);
        Ok(WorkerConnection { session, outbound })
    }

    /// Handles one message on a worker's stream.
    pub async fn worker_message(&self, session: SessionId, message: wire::WorkerMessage) {
        use wire::worker_message::Message as M;
        let inner = &self.inner;
        {
            let mut state = inner.state.lock();
            match state.workers.get_mut(&session) {
                Some(worker) => worker.last_seen = inner.clock.now(),
                None => {
                    // A session already declared lost: what it says now is late.
                    if matches!(message.message, Some(M::Finished(_))) {
                        metrics::counter!("paddock_late_results_total").increment(1);
                    }
                    return;
                }
            }
        }
        match message.message {
            Some(M::Heartbeat(beat)) => {
                if let Some(cache) = beat.cache {
                    inner.note_cache(session, cache);
                }
                inner.reconcile(session, &beat.running);
            }
            Some(M::Register(_)) | None => {}
            Some(M::Started(started)) => inner.started(session, &started.assignment_id),
            Some(M::Finished(finished)) => inner.finished(session, finished).await,
        }
    }

    /// The worker's stream ended: its actions go back to the queue.
    pub fn worker_gone(&self, session: SessionId) {
        let inner = &self.inner;
        let mut state = inner.state.lock();
        inner.drop_worker(&mut state, session, "its stream ended");
    }

    /// Every worker the scheduler knows, connected or not, by name.
    pub fn workers(&self) -> Vec<WorkerReport> {
        let state = self.inner.state.lock();
        let mut reports: Vec<WorkerReport> = state
            .fleet
            .records()
            .map(|(name, record)| {
                let sessions: Vec<&WorkerSession> =
                    state.workers.values().filter(|w| &w.name == name).collect();
                WorkerReport {
                    name: name.clone(),
                    identity: state.bindings.get(name).cloned().unwrap_or_default(),
                    pool: record.pool.clone(),
                    standing: record.standing.name().to_owned(),
                    reason: record.reason.clone(),
                    since: record.since,
                    connected: !sessions.is_empty(),
                    capacity: sessions.iter().map(|w| w.capacity).sum(),
                    running: sessions.iter().map(|w| w.running().len()).sum(),
                    properties: sessions
                        .iter()
                        .flat_map(|w| w.offer.pairs())
                        .map(|(n, v)| (n.clone(), v.clone()))
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                    recent: record.recent(),
                    totals: record.totals,
                }
            })
            .collect();
        reports.sort_by(|a, b| a.name.cmp(&b.name));
        reports
    }

    /// Each pool's load and the workers it should have: the autoscaling signal.
    pub fn pools(&self) -> Vec<PoolLoad> {
        let state = self.inner.state.lock();
        self.inner.pools(&state, self.inner.clock.now())
    }

    /// An operator's order for a worker; NOT_FOUND if no such worker ever connected.
    /// The order is saved before it is acknowledged.
    pub async fn command_worker(
        &self,
        name: &str,
        command: WorkerCommand,
        reason: &str,
    ) -> Result<WorkerReport, Status> {
        let inner = &self.inner;
        let reason = match reason.trim() {
            "" => "an operator's order".to_owned(),
            r => format!("an operator's order: {r}"),
        };
        let standing = match command {
            WorkerCommand::Drain => Standing::Draining,
            WorkerCommand::Quarantine => Standing::Quarantined {
                manual: true,
                probe_at: None,
                strikes: 0,
            },
            WorkerCommand::Release => Standing::Active,
        };
        // The order applies to the record as it stands, wherever the worker is.
        inner
            .order(name, |state| {
                if state.fleet.get(name).is_none() {
                    return Err(Status::not_found(format!(
                        "no worker named {name:?} has connected"
                    )));
                }
                let transition = state.fleet.set(name, standing, reason);
                inner.transition(transition);
                inner.dispatch(state);
                Ok(())
            })
            .await?;
        self.workers()
            .into_iter()
            .find(|w| w.name == name)
            .ok_or_else(|| Status::not_found(name.to_owned()))
    }
}

fn operation_name() -> String {
    format!("operations/{}", uuid::Uuid::new_v4())
}

fn completed(name: String, action_digest: Digest, response: ExecuteResponse) -> Snapshot {
    Snapshot {
        name,
        action_digest,
        stage: Stage::Completed,
        worker: None,
        response: Some(Arc::new(response)),
    }
}

/// An answer that carries `status` (an action that can no longer be run).
fn failed_response(status: &Status) -> ExecuteResponse {
    ExecuteResponse {
        status: Some(status::status(status.code(), status.message())),
        ..Default::default()
    }
}

/// FAILED_PRECONDITION, naming the blobs the action needs that the CAS lacks.
fn missing_response(missing: &[Digest], what: &str) -> ExecuteResponse {
    let list: Vec<String> = missing.iter().map(Digest::to_string).collect();
    let status = status::missing_blobs(
        format!("{what} is not in the CAS: missing {}", list.join(", ")),
        missing,
    );
    ExecuteResponse {
        status: Some(status),
        ..Default::default()
    }
}

fn hit_response(result: ActionResult) -> ExecuteResponse {
    ExecuteResponse {
        result: Some(result),
        cached_result: true,
        status: Some(status::ok()),
        ..Default::default()
    }
}

impl Inner {
    /// An execution of the action `key` names, read from the CAS and checked, not yet
    /// queued (no priority or invocation); or which of its blobs are missing.
    async fn prepare(&self, key: ActionKey, mnemonic: &str) -> Result<Prepared, Status> {
        let action_digest = key.action;
        let Some(action_bytes) = read_all(self.cas.as_ref(), &action_digest)
            .await
            .map_err(store_error)?
        else {
            return Ok(Prepared::Missing(vec![action_digest], "the Action"));
        };
        let action = Action::decode(action_bytes.clone())
            .map_err(|e| invalid(format!("blob {action_digest} is not an Action: {e}")))?;
        let command_digest = Digest::from_proto(action.command_digest.as_ref())
            .map_err(|e| invalid(format!("Action.command_digest: {e}")))?;
        let input_root = Digest::from_proto(action.input_root_digest.as_ref())
            .map_err(|e| invalid(format!("Action.input_root_digest: {e}")))?;
        let command_bytes = read_all(self.cas.as_ref(), &command_digest)
            .await
            .map_err(store_error)?;
        let mut missing = self
            .cas
            .find_missing(&[input_root])
            .await
            .map_err(store_error)?;
        if command_bytes.is_none() {
            missing.insert(0, command_digest);
        }
        let Some(command_bytes) = command_bytes.filter(|_| missing.is_empty()) else {
            return Ok(Prepared::Missing(missing, "the Command or input root"));
        };
        let command = Command::decode(command_bytes.clone())
            .map_err(|e| invalid(format!("blob {command_digest} is not a Command: {e}")))?;
        validate::command(&command).map_err(invalid)?;
        let timeout = match action.timeout.as_ref() {
            None => self.config.default_timeout.get(),
            Some(t) => match paddock_reapi::time::duration(t) {
                None => return Err(invalid("Action.timeout is negative or malformed")),
                Some(d) if d.is_zero() => self.config.default_timeout.get(),
                Some(d) if d > self.config.max_timeout.get() => {
                    return Err(invalid(format!(
                        "Action.timeout of {}s exceeds this server's maximum of {}s",
                        d.as_secs(),
                        self.config.max_timeout.get().as_secs()
                    )))
                }
                Some(d) => d,
            },
        };

        let platform = paddock_reapi::platform(&action, &command);
        self.policies.check(&platform).map_err(invalid)?;
        let inputs = self.inputs_of(input_root).await;
        let program = command.arguments.first().map(String::as_str).unwrap_or("");
        let fingerprint = history::fingerprint(mnemonic, program, &platform);
        let job = Job {
            cacheable: !action.do_not_cache,
            fingerprint,
            inputs,
            ..Job::new(
                key,
                action_bytes,
                command_bytes,
                platform,
                timeout,
                JobKind::Client,
            )
        };
        Ok(Prepared::Job(Box::new(job)))
    }

    /// RESOURCE_EXHAUSTED if `identity` already has as many executions queued or
    /// running as it may.
    fn check_quota(&self, state: &State, identity: &str) -> Result<(), Status> {
        self.check_held(identity, state.operations.in_flight(identity))
    }

    /// RESOURCE_EXHAUSTED if `held` executions are as many as `identity` may have.
    fn check_held(&self, identity: &str, held: usize) -> Result<(), Status> {
        let max = self.bounds.max_executions;
        if held < max {
            return Ok(());
        }
        tracing::warn!(who = %identity, held, "refused: the executions quota");
        metrics::counter!("paddock_quota_refusals_total", "quota" => "max_executions").increment(1);
        Err(Status::resource_exhausted(format!(
            "{identity} has {held} executions queued or running, the most allowed \
             (auth.quotas.max_executions); wait for some to finish"
        )))
    }

    /// An operation answered from the ActionCache: the caller gets the result, the
    /// operation keeps only its key.
    fn cache_hit(&self, owner: Owner, key: ActionKey, result: ActionResult) -> OperationWatch {
        let snapshot = completed(operation_name(), key.action, hit_response(result));
        let updates = self.state.lock().operations.hit(snapshot, owner, key);
        OperationWatch {
            updates,
            closing: self.closing.subscribe(),
            _waiter: None,
        }
    }

    /// A finished cache hit as it stands now: its result read again from the
    /// ActionCache.
    async fn hit_snapshot(&self, name: &str, key: ActionKey) -> Snapshot {
        let response = match self.action_cache.get(&key).await {
            Ok(Some(result)) => hit_response(result),
            Ok(None) => ExecuteResponse {
                status: Some(status::status(
                    Code::NotFound,
                    "the cached result this operation returned has left the ActionCache since; call Execute again",
                )),
                ..Default::default()
            },
            Err(e) => ExecuteResponse {
                status: Some(status::status(e.code(), e.to_string())),
                ..Default::default()
            },
        };
        completed(name.to_owned(), key.action, response)
    }

    /// An operation that is complete the moment it is created.
    fn answered(
        &self,
        owner: Owner,
        action_digest: Digest,
        response: ExecuteResponse,
    ) -> OperationWatch {
        let snapshot = completed(operation_name(), action_digest, response);
        let updates = self.state.lock().operations.answered(snapshot, owner);
        OperationWatch {
            updates,
            closing: self.closing.subscribe(),
            _waiter: None,
        }
    }

    fn missing(
        &self,
        owner: Owner,
        action_digest: Digest,
        missing: Vec<Digest>,
        what: &str,
    ) -> OperationWatch {
        metrics::counter!("paddock_executions_total", "outcome" => "missing_blobs").increment(1);
        self.answered(owner, action_digest, missing_response(&missing, what))
    }

    fn add_waiter(self: &Arc<Self>, state: &mut State, job: JobId) -> Waiter {
        if let Some(j) = state.jobs.get_mut(&job) {
            j.waiters += 1;
            j.orphaned_since = None;
        }
        Waiter {
            scheduler: Arc::downgrade(self),
            job,
        }
    }

    fn attach_operation(
        self: &Arc<Self>,
        state: &mut State,
        job_id: JobId,
        owner: Owner,
    ) -> OperationWatch {
        let updates = Self::open_operation(state, job_id, operation_name(), owner);
        let waiter = self.add_waiter(state, job_id);
        OperationWatch {
            updates,
            closing: self.closing.subscribe(),
            _waiter: Some(waiter),
        }
    }

    /// A new operation named `name` following `job_id`.
    fn open_operation(
        state: &mut State,
        job_id: JobId,
        name: String,
        owner: Owner,
    ) -> watch::Receiver<Snapshot> {
        let job = state.jobs.get_mut(&job_id).expect("job exists");
        let snapshot = job.snapshot(&name);
        job.operations.push(name);
        state.unjournaled.changed(job);
        state.operations.open(snapshot, owner, job_id)
    }

    fn report(&self, state: &State) {
        let running: usize = state.workers.values().map(|w| w.running().len()).sum();
        let capacity: usize = state.workers.values().map(|w| w.capacity).sum();
        metrics::gauge!("paddock_queue_length").set(state.queue.len() as f64);
        metrics::gauge!("paddock_actions_running").set(running as f64);
        metrics::gauge!("paddock_workers_connected").set(state.workers.len() as f64);
        metrics::gauge!("paddock_worker_capacity").set(capacity as f64);
        let mut standings: std::collections::BTreeMap<&str, usize> =
            ["active", "draining", "quarantined", "probing"]
                .map(|s| (s, 0))
                .into();
        for (_, record) in state.fleet.records() {
            *standings.entry(record.standing.name()).or_default() += 1;
        }
        for (standing, count) in standings {
            metrics::gauge!("paddock_workers", "standing" => standing).set(count as f64);
        }
    }

    /// What a worker holding an action's inputs has laid out before: the input root
    /// and its subdirectories (a hint: nothing if the root cannot be read).
    async fn inputs_of(&self, root: Digest) -> Vec<Digest> {
        /// Enough subdirectories to tell trees apart, few enough to test quickly.
        const SUBDIRECTORIES: usize = 64;
        let mut inputs = vec![root];
        if !self.config.locality {
            return inputs;
        }
        if let Ok(Some(bytes)) = read_all(self.cas.as_ref(), &root).await {
            if let Ok(directory) = paddock_reapi::proto::re::Directory::decode(bytes) {
                inputs.extend(
                    directory
                        .directories
                        .iter()
                        .filter_map(|d| Digest::from_proto(d.digest.as_ref()).ok())
                        .take(SUBDIRECTORIES),
                );
            }
        }
        inputs
    }

    /// Takes a worker's summary of the inputs it holds; a malformed one is ignored.
    fn note_cache(&self, session: SessionId, cache: wire::CacheSummary) {
        match paddock_reapi::filter::DigestFilter::from_parts(cache.bloom, cache.hashes) {
            Ok(filter) => {
                if let Some(worker) = self.state.lock().workers.get_mut(&session) {
                    worker.note_cache(filter);
                }
            }
            Err(e) => tracing::warn!(session, error = %e, "ignored a worker's cache summary"),
        }
    }

    /// Logs and counts a change of a worker's standing.
    fn transition(&self, transition: Option<health::Transition>) {
        if let Some(t) = transition {
            self.save_now.notify_one();
            tracing::warn!(worker = %t.worker, from = t.from, to = t.to, reason = %t.reason, "worker standing changed");
            metrics::counter!("paddock_worker_transitions_total", "to" => t.to).increment(1);
        }
    }
}
