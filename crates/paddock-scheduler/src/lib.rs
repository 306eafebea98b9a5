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

mod matching;
mod queue;
mod state;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

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

pub use matching::{Offer, Policies};
use queue::FairQueue;
use state::{Job, JobState, OperationEntry, State, WorkerSession};

/// Identifies one execution.
pub type JobId = u64;
/// Identifies one connection of a worker.
pub type SessionId = u64;

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
    /// Set when, and only when, the stage is Completed.
    pub response: Option<ExecuteResponse>,
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
                    job.orphaned_since = Some(Instant::now());
                }
            }
        }
    }
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
    closing: watch::Sender<bool>,
    cas: Arc<dyn BlobStore>,
    action_cache: Arc<dyn ActionCache>,
    config: SchedulerConfig,
    policies: Policies,
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

fn store_error(e: paddock_cas::StoreError) -> Status {
    Status::new(e.code(), e.to_string())
}

impl Scheduler {
    /// A scheduler over the server's CAS and ActionCache. Call [`Scheduler::run`] to
    /// drive its timers.
    pub fn new(
        config: SchedulerConfig,
        cas: Arc<dyn BlobStore>,
        action_cache: Arc<dyn ActionCache>,
    ) -> Self {
        let policies = Policies::new(config.property_policies.clone());
        Scheduler {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                closing: watch::channel(false).0,
                cas,
                action_cache,
                config,
                policies,
            }),
        }
    }

    /// Runs the periodic work (lost workers, orphaned executions, unsatisfiable
    /// actions, expired operations) until the scheduler is dropped.
    pub async fn run(self) {
        let weak = Arc::downgrade(&self.inner);
        drop(self);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else {
                return;
            };
            inner.sweep();
        }
    }

    /// Stops for good: every worker session ends (workers reconnect elsewhere or later)
    /// and every client following an operation is told to go away, so that a graceful
    /// shutdown is not held up by long-lived streams.
    pub fn shutdown(&self) {
        let inner = &self.inner;
        inner.closing.send_replace(true);
        let mut state = inner.state.lock();
        state.workers.clear();
        inner.report(&state);
    }

    /// Starts (or joins) an execution, or answers from the ActionCache.
    pub async fn execute(
        &self,
        request: ExecuteRequest,
        invocation: String,
    ) -> Result<OperationWatch, Status> {
        let inner = &self.inner;
        check_digest_function(request.digest_function).map_err(|e| invalid(e.to_string()))?;
        let action_digest = Digest::from_proto(request.action_digest.as_ref())
            .map_err(|e| invalid(format!("action_digest: {e}")))?;
        let priority = request
            .execution_policy
            .as_ref()
            .map(|p| p.priority)
            .unwrap_or(0);
        let key = ActionKey {
            instance: request.instance_name.clone(),
            action: action_digest,
        };

        if !request.skip_cache_lookup {
            if let Some(result) = inner.action_cache.get(&key).await.map_err(store_error)? {
                metrics::counter!("paddock_executions_total", "outcome" => "cache_hit")
                    .increment(1);
                let response = ExecuteResponse {
                    result: Some(result),
                    cached_result: true,
                    status: Some(status::ok()),
                    ..Default::default()
                };
                return Ok(inner.finished_operation(action_digest, response));
            }
        }

        let Some(action_bytes) = read_all(inner.cas.as_ref(), &action_digest)
            .await
            .map_err(store_error)?
        else {
            return Ok(inner.missing(action_digest, vec![action_digest], "the Action"));
        };
        let action = Action::decode(action_bytes.clone())
            .map_err(|e| invalid(format!("blob {action_digest} is not an Action: {e}")))?;
        let command_digest = Digest::from_proto(action.command_digest.as_ref())
            .map_err(|e| invalid(format!("Action.command_digest: {e}")))?;
        let input_root = Digest::from_proto(action.input_root_digest.as_ref())
            .map_err(|e| invalid(format!("Action.input_root_digest: {e}")))?;
        let command_bytes = read_all(inner.cas.as_ref(), &command_digest)
            .await
            .map_err(store_error)?;
        let mut missing = inner
            .cas
            .find_missing(&[input_root])
            .await
            .map_err(store_error)?;
        if command_bytes.is_none() {
            missing.insert(0, command_digest);
        }
        let Some(command_bytes) = command_bytes.filter(|_| missing.is_empty()) else {
            return Ok(inner.missing(action_digest, missing, "the Command or input root"));
        };
        let command = Command::decode(command_bytes.clone())
            .map_err(|e| invalid(format!("blob {command_digest} is not a Command: {e}")))?;
        validate::command(&command).map_err(invalid)?;
        let timeout = match action.timeout.as_ref() {
            None => inner.config.default_timeout.get(),
            Some(t) => match paddock_reapi::time::duration(t) {
                None => return Err(invalid("Action.timeout is negative or malformed")),
                Some(d) if d.is_zero() => inner.config.default_timeout.get(),
                Some(d) if d > inner.config.max_timeout.get() => {
                    return Err(invalid(format!(
                        "Action.timeout of {}s exceeds this server's maximum of {}s",
                        d.as_secs(),
                        inner.config.max_timeout.get().as_secs()
                    )))
                }
                Some(d) => d,
            },
        };

        let platform = paddock_reapi::platform(&action, &command);
        inner.policies.check(&platform).map_err(invalid)?;
        let job = Job {
            id: 0,
            key,
            digest: action_digest,
            action: action_bytes,
            command: command_bytes,
            platform,
            timeout,
            priority,
            invocation,
            cacheable: !action.do_not_cache,
            queued_at: SystemTime::now(),
            attempts: 0,
            state: JobState::Queued,
            operations: Vec::new(),
            waiters: 0,
            orphaned_since: None,
            unsatisfiable_since: None,
        };
        let mut state = inner.state.lock();
        let job_id = match state.merge.get(&job.key).copied().filter(|_| job.cacheable) {
            Some(existing) => {
                metrics::counter!("paddock_executions_merged_total").increment(1);
                existing
            }
            None => state.enqueue(job),
        };
        let watch = inner.attach_operation(&mut state, job_id);
        inner.dispatch(&mut state);
        Ok(watch)
    }

    /// Follows an existing operation (WaitExecution); `None` if unknown or expired.
    pub fn watch(&self, name: &str) -> Option<OperationWatch> {
        let inner = &self.inner;
        let mut state = inner.state.lock();
        let entry = state.operations.get(name)?;
        let updates = entry.updates.subscribe();
        let job = entry.job;
        let waiter = job.map(|job| inner.add_waiter(&mut state, job));
        Some(OperationWatch {
            updates,
            closing: inner.closing.subscribe(),
            _waiter: waiter,
        })
    }

    /// The current state of an operation (GetOperation). A client polling this way
    /// counts as waiting: the execution is not cancelled as orphaned while it polls.
    pub fn get(&self, name: &str) -> Option<Snapshot> {
        let mut state = self.inner.state.lock();
        let entry = state.operations.get(name)?;
        let snapshot = entry.updates.borrow().clone();
        if let Some(job) = entry.job.and_then(|id| state.jobs.get_mut(&id)) {
            if job.waiters == 0 {
                job.orphaned_since = Some(Instant::now());
            }
        }
        Some(snapshot)
    }

    /// Cancels one operation (CancelOperation). The execution itself stops when no
    /// operation needs it any more. Returns false if the operation is unknown.
    pub fn cancel(&self, name: &str) -> bool {
        let inner = &self.inner;
        let mut state = inner.state.lock();
        let Some(entry) = state.operations.get_mut(name) else {
            return false;
        };
        let Some(job_id) = entry.job.take() else {
            return true; // already finished
        };
        entry.finished_at = Some(Instant::now());
        let cancelled = status::status(Code::Cancelled, "the operation was cancelled");
        entry.finish(ExecuteResponse {
            status: Some(cancelled),
            ..Default::default()
        });
        let orphan = match state.jobs.get_mut(&job_id) {
            Some(job) => {
                job.operations.retain(|op| op != name);
                job.operations.is_empty()
            }
            None => false,
        };
        if orphan {
            inner.abort_job(&mut state, job_id, "every operation was cancelled");
        }
        true
    }

    /// Forgets an operation (DeleteOperation): the client is no longer interested,
    /// but the execution is not cancelled for that. False if unknown.
    pub fn delete(&self, name: &str) -> bool {
        let mut state = self.inner.state.lock();
        let Some(entry) = state.operations.remove(name) else {
            return false;
        };
        if let Some(job) = entry.job.and_then(|id| state.jobs.get_mut(&id)) {
            job.operations.retain(|op| op != name);
        }
        true
    }

    /// Registers a worker's new session; an older session of the same name ends.
    pub fn connect_worker(&self, register: wire::Register) -> Result<WorkerConnection, Status> {
        let inner = &self.inner;
        if register.name.trim().is_empty() {
            return Err(invalid("a worker must have a name"));
        }
        if register.capacity == 0 {
            return Err(invalid("a worker's capacity must be at least 1"));
        }
        if *inner.closing.borrow() {
            return Err(Status::unavailable("the scheduler is shutting down"));
        }
        let offer = Offer::new(register.properties.into_iter().map(|p| (p.name, p.value)));
        let (tx, outbound) = mpsc::unbounded_channel();
        let mut state = inner.state.lock();
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
        tracing::info!(worker = %register.name, capacity = register.capacity, properties = %offer, "worker connected");
        state.workers.insert(
            session,
            WorkerSession {
                session,
                name: register.name,
                offer,
                capacity: register.capacity as usize,
                running: Default::default(),
                outbound: tx,
                last_seen: Instant::now(),
            },
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
                Some(worker) => worker.last_seen = Instant::now(),
                None => return, // a session already declared lost
            }
        }
        match message.message {
            Some(M::Heartbeat(_)) | Some(M::Register(_)) | None => {}
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
}

impl Inner {
    /// An operation that is complete the moment it is created.
    fn finished_operation(
        &self,
        action_digest: Digest,
        response: ExecuteResponse,
    ) -> OperationWatch {
        let mut state = self.state.lock();
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let snapshot = Snapshot {
            name: name.clone(),
            action_digest,
            stage: Stage::Completed,
            worker: None,
            response: Some(response),
        };
        let (tx, updates) = watch::channel(snapshot);
        state.operations.insert(
            name,
            OperationEntry {
                updates: tx,
                job: None,
                finished_at: Some(Instant::now()),
            },
        );
        OperationWatch {
            updates,
            closing: self.closing.subscribe(),
            _waiter: None,
        }
    }

    fn missing(&self, action_digest: Digest, missing: Vec<Digest>, what: &str) -> OperationWatch {
        metrics::counter!("paddock_executions_total", "outcome" => "missing_blobs").increment(1);
        let list: Vec<String> = missing.iter().map(Digest::to_string).collect();
        let status = status::missing_blobs(
            format!("{what} is not in the CAS: missing {}", list.join(", ")),
            &missing,
        );
        self.finished_operation(
            action_digest,
            ExecuteResponse {
                status: Some(status),
                ..Default::default()
            },
        )
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

    fn attach_operation(self: &Arc<Self>, state: &mut State, job_id: JobId) -> OperationWatch {
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let job = &state.jobs[&job_id];
        let (tx, updates) = watch::channel(job.snapshot(&name, state));
        state
            .jobs
            .get_mut(&job_id)
            .expect("job exists")
            .operations
            .push(name.clone());
        state.operations.insert(
            name,
            OperationEntry {
                updates: tx,
                job: Some(job_id),
                finished_at: None,
            },
        );
        let waiter = self.add_waiter(state, job_id);
        OperationWatch {
            updates,
            closing: self.closing.subscribe(),
            _waiter: Some(waiter),
        }
    }

    /// Offers queued actions to workers with free slots until no more can start.
    fn dispatch(&self, state: &mut State) {
        loop {
            if state.queue.is_empty() {
                break;
            }
            let free: Vec<(SessionId, usize)> = state
                .workers
                .values()
                .filter(|w| w.running.len() < w.capacity)
                .map(|w| (w.session, w.capacity - w.running.len()))
                .collect();
            if free.is_empty() {
                break;
            }
            let choice = state.queue.in_order().find_map(|job_id| {
                let job = &state.jobs[&job_id];
                free.iter()
                    .filter(|(s, _)| {
                        self.policies
                            .satisfies(&state.workers[s].offer, &job.platform)
                    })
                    .max_by_key(|(_, slots)| *slots)
                    .map(|(s, _)| (job_id, *s))
            });
            let Some((job_id, session)) = choice else {
                break;
            };
            self.assign(state, job_id, session);
        }
        self.report(state);
    }

    fn assign(&self, state: &mut State, job_id: JobId, session: SessionId) {
        let assignment_id = uuid::Uuid::new_v4().to_string();
        let job = state.jobs.get_mut(&job_id).expect("queued job exists");
        state
            .queue
            .remove(job.priority, &job.invocation, job_id, true);
        job.attempts += 1;
        job.unsatisfiable_since = None;
        job.state = JobState::Running {
            session,
            assignment: assignment_id.clone(),
        };
        let queued_at_micros = job
            .queued_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as i64;
        let assignment = wire::Assignment {
            assignment_id: assignment_id.clone(),
            instance_name: job.key.instance.clone(),
            action_digest: Some(wire::Digest {
                hash: job.digest.hash_hex(),
                size_bytes: job.digest.size() as i64,
            }),
            action: job.action.to_vec(),
            command: job.command.to_vec(),
            timeout_ms: job.timeout.as_millis() as u64,
            queued_at_micros,
        };
        let worker = state.workers.get_mut(&session).expect("free worker exists");
        worker.running.insert(assignment_id, job_id);
        let _ = worker.outbound.send(wire::SchedulerMessage {
            message: Some(wire::scheduler_message::Message::Assignment(assignment)),
        });
        tracing::debug!(action = %state.jobs[&job_id].digest, worker = %worker.name, "assigned");
        state.notify(job_id);
    }

    fn started(&self, session: SessionId, assignment: &str) {
        let state = self.state.lock();
        if let Some(worker) = state.workers.get(&session) {
            if let Some(job) = worker.running.get(assignment) {
                tracing::debug!(action = %state.jobs[job].digest, worker = %worker.name, "started");
            }
        }
    }

    async fn finished(&self, session: SessionId, finished: wire::Finished) {
        use wire::finished::Outcome;
        let assignment = finished.assignment_id;
        let job = {
            let state = self.state.lock();
            state
                .workers
                .get(&session)
                .and_then(|w| w.running.get(&assignment))
                .and_then(|job_id| state.jobs.get(job_id))
                .map(|job| (job.id, job.key.clone(), job.cacheable))
        };
        let Some((job_id, key, cacheable)) = job else {
            tracing::info!(%assignment, "discarding a result for an assignment no longer current");
            metrics::counter!("paddock_late_results_total").increment(1);
            return;
        };
        let outcome = match finished.outcome {
            Some(Outcome::Completed(completed)) => {
                match self.accept_result(&key, cacheable, completed).await {
                    Ok(response) => Ok(response),
                    Err(reason) => Err((reason, true)),
                }
            }
            Some(Outcome::MissingInputs(missing)) => {
                let digests: Vec<Digest> = missing
                    .digests
                    .iter()
                    .filter_map(|d| Digest::parse(&d.hash, d.size_bytes).ok())
                    .collect();
                let list: Vec<String> = digests.iter().map(Digest::to_string).collect();
                metrics::counter!("paddock_executions_total", "outcome" => "missing_blobs")
                    .increment(1);
                Ok(ExecuteResponse {
                    status: Some(status::missing_blobs(
                        format!("inputs are not in the CAS: missing {}", list.join(", ")),
                        &digests,
                    )),
                    ..Default::default()
                })
            }
            Some(Outcome::Failed(failed)) if !failed.retryable => {
                metrics::counter!("paddock_executions_total", "outcome" => "failed").increment(1);
                Ok(ExecuteResponse {
                    status: Some(status::status(Code::from_i32(failed.code), failed.message)),
                    ..Default::default()
                })
            }
            Some(Outcome::Failed(failed)) => Err((failed.message, true)),
            None => Err(("the worker reported no outcome".to_owned(), true)),
        };
        let mut state = self.state.lock();
        let current = state
            .workers
            .get(&session)
            .and_then(|w| w.running.get(&assignment))
            == Some(&job_id);
        if !current {
            return; // cancelled or lost while the result was being stored
        }
        if let Some(worker) = state.workers.get_mut(&session) {
            worker.running.remove(&assignment);
        }
        match outcome {
            Ok(response) => state.complete(job_id, response),
            Err((reason, _)) => {
                let worker = state
                    .workers
                    .get(&session)
                    .map(|w| w.name.clone())
                    .unwrap_or_default();
                self.retry_or_fail(
                    &mut state,
                    job_id,
                    &format!("worker {worker} failed: {reason}"),
                );
            }
        }
        self.dispatch(&mut state);
    }

    /// Checks a worker's result and writes it to the ActionCache when it may be cached.
    /// An unusable result is the worker's fault: the error says why.
    async fn accept_result(
        &self,
        key: &ActionKey,
        cacheable: bool,
        completed: wire::Completed,
    ) -> Result<ExecuteResponse, String> {
        let result = ActionResult::decode(completed.action_result.as_slice())
            .map_err(|e| format!("its ActionResult does not decode: {e}"))?;
        validate::action_result(&result)
            .map_err(|e| format!("its ActionResult is invalid: {e}"))?;
        let status = if completed.timed_out {
            metrics::counter!("paddock_executions_total", "outcome" => "timed_out").increment(1);
            status::status(
                Code::DeadlineExceeded,
                "the action exceeded its timeout and was killed",
            )
        } else {
            let outcome = if result.exit_code == 0 {
                "success"
            } else {
                "nonzero_exit"
            };
            metrics::counter!("paddock_executions_total", "outcome" => outcome).increment(1);
            status::ok()
        };
        if cacheable && !completed.timed_out && result.exit_code == 0 {
            if let Err(e) = self.action_cache.put(key, &result).await {
                tracing::warn!(action = %key.action, error = %e, "could not write the ActionCache");
            }
        }
        Ok(ExecuteResponse {
            result: Some(result),
            cached_result: false,
            status: Some(status),
            message: completed.message,
            ..Default::default()
        })
    }

    /// Puts a job back in the queue after its worker failed it, unless it has used up
    /// its attempts.
    fn retry_or_fail(&self, state: &mut State, job_id: JobId, reason: &str) {
        let max = self.config.max_attempts.max(1);
        let Some(job) = state.jobs.get_mut(&job_id) else {
            return;
        };
        if job.attempts >= max {
            tracing::warn!(action = %job.digest, attempts = job.attempts, %reason, "giving up on an action");
            metrics::counter!("paddock_executions_total", "outcome" => "lost").increment(1);
            let message = format!(
                "the action failed on {} workers; last: {reason}",
                job.attempts
            );
            state.complete(
                job_id,
                ExecuteResponse {
                    status: Some(status::status(Code::Unavailable, message)),
                    ..Default::default()
                },
            );
            return;
        }
        tracing::info!(action = %job.digest, %reason, "requeueing an action");
        metrics::counter!("paddock_executions_requeued_total").increment(1);
        job.state = JobState::Queued;
        let (priority, invocation) = (job.priority, job.invocation.clone());
        state.queue.push(priority, &invocation, job_id, true);
        state.notify(job_id);
    }

    /// Removes a worker session; its running actions are requeued.
    fn drop_worker(&self, state: &mut State, session: SessionId, reason: &str) {
        let Some(worker) = state.workers.remove(&session) else {
            return;
        };
        tracing::warn!(worker = %worker.name, running = worker.running.len(), %reason, "worker lost");
        for (_, job_id) in worker.running {
            self.retry_or_fail(
                state,
                job_id,
                &format!("worker {} was lost: {reason}", worker.name),
            );
        }
        self.report(state);
        self.dispatch(state);
    }

    /// Stops an execution: out of the queue, or cancelled on its worker.
    fn abort_job(&self, state: &mut State, job_id: JobId, reason: &str) {
        let Some(job) = state.jobs.get(&job_id) else {
            return;
        };
        tracing::info!(action = %job.digest, %reason, "cancelling an execution");
        metrics::counter!("paddock_executions_total", "outcome" => "cancelled").increment(1);
        if let JobState::Running {
            session,
            assignment,
        } = &job.state
        {
            if let Some(worker) = state.workers.get_mut(session) {
                worker.running.remove(assignment);
                let _ = worker.outbound.send(wire::SchedulerMessage {
                    message: Some(wire::scheduler_message::Message::Cancel(wire::Cancel {
                        assignment_id: assignment.clone(),
                    })),
                });
            }
        }
        state.complete(
            job_id,
            ExecuteResponse {
                status: Some(status::status(
                    Code::Cancelled,
                    format!("cancelled: {reason}"),
                )),
                ..Default::default()
            },
        );
        self.dispatch(state);
    }

    fn sweep(&self) {
        let now = Instant::now();
        let mut state = self.state.lock();
        let timeout = self.config.heartbeat_timeout.get();
        let silent: Vec<SessionId> = state
            .workers
            .values()
            .filter(|w| now.duration_since(w.last_seen) > timeout)
            .map(|w| w.session)
            .collect();
        for session in silent {
            self.drop_worker(&mut state, session, "it missed its heartbeats");
        }

        let grace = self.config.orphan_grace.get();
        let orphans: Vec<JobId> = state
            .jobs
            .values()
            // An execution whose operations were all deleted runs on for the cache:
            // DeleteOperation does not cancel.
            .filter(|j| !j.operations.is_empty())
            .filter(|j| {
                j.orphaned_since
                    .is_some_and(|t| now.duration_since(t) > grace)
            })
            .map(|j| j.id)
            .collect();
        for job_id in orphans {
            self.abort_job(&mut state, job_id, "no client is waiting for it");
        }

        self.fail_unsatisfiable(&mut state, now);

        let retention = self.config.operation_retention.get();
        state.operations.retain(|_, op| {
            op.finished_at
                .is_none_or(|t| now.duration_since(t) < retention)
        });
        self.dispatch(&mut state);
    }

    /// Fails queued actions that no connected worker could run, once they have waited
    /// `unsatisfiable_grace` for one to join.
    fn fail_unsatisfiable(&self, state: &mut State, now: Instant) {
        let grace = self.config.unsatisfiable_grace.get();
        let mut verdicts: std::collections::HashMap<Vec<(String, String)>, bool> =
            Default::default();
        let queued: Vec<JobId> = state.queue.in_order().collect();
        let mut doomed = Vec::new();
        for job_id in queued {
            let platform = state.jobs[&job_id].platform.clone();
            let satisfiable = *verdicts.entry(platform).or_insert_with_key(|platform| {
                state
                    .workers
                    .values()
                    .any(|w| self.policies.satisfies(&w.offer, platform))
            });
            let job = state.jobs.get_mut(&job_id).expect("queued job exists");
            if satisfiable {
                job.unsatisfiable_since = None;
                continue;
            }
            let since = *job.unsatisfiable_since.get_or_insert(now);
            if now.duration_since(since) >= grace {
                doomed.push(job_id);
            }
        }
        for job_id in doomed {
            let job = &state.jobs[&job_id];
            let wanted: Vec<String> = job
                .platform
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let offers: Vec<String> = state
                .workers
                .values()
                .map(|w| {
                    let unmet: Vec<String> = self
                        .policies
                        .unmet(&w.offer, &job.platform)
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    format!("{} (lacks {})", w.name, unmet.join(", "))
                })
                .collect();
            let message = format!(
                "no connected worker can run this action, which requires platform [{}]; waited {}s; workers: {}",
                wanted.join(", "),
                grace.as_secs(),
                if offers.is_empty() { "none connected".to_owned() } else { offers.join("; ") }
            );
            tracing::warn!(action = %job.digest, %message, "failing an unsatisfiable action");
            metrics::counter!("paddock_executions_total", "outcome" => "unsatisfiable")
                .increment(1);
            state.complete(
                job_id,
                ExecuteResponse {
                    status: Some(status::status(Code::FailedPrecondition, message)),
                    ..Default::default()
                },
            );
        }
    }

    fn report(&self, state: &State) {
        let running: usize = state.workers.values().map(|w| w.running.len()).sum();
        let capacity: usize = state.workers.values().map(|w| w.capacity).sum();
        metrics::gauge!("paddock_queue_length").set(state.queue.len() as f64);
        metrics::gauge!("paddock_actions_running").set(running as f64);
        metrics::gauge!("paddock_workers_connected").set(state.workers.len() as f64);
        metrics::gauge!("paddock_worker_capacity").set(capacity as f64);
    }
}
