//! Several servers sharing one queue: the protocol by which replicas cooperate
//! through a [`SharedQueue`] (PostgreSQL, in `paddock-postgres`).
//!
//! With a shared queue, Execute on any replica puts the execution (and its
//! operation) in the shared queue, where a live execution of the same cacheable
//! action is joined instead. Each replica claims queued executions for the workers
//! connected to it, as many as they have free slots and only of the classes
//! (instance and platform) they can run, under a lease it renews while they run; it
//! runs them with the same policy as any other job (dispatch, retries on its own
//! workers, health, speculation) and reports where each stands (started on a worker,
//! done with its response, or released for another replica after a worker failed
//! it). A replica that dies stops renewing: its executions go back to the queue when
//! their leases expire, and a result it reports afterwards is refused, so each
//! execution is answered once. Every replica follows the operations its own clients
//! hold, whichever replica runs them, from the shared queue's notices (and a poll,
//! should notices be lost); WaitExecution and GetOperation on any replica find an
//! operation started on any other.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use paddock_cas::ActionKey;
use paddock_reapi::proto::re::ExecuteResponse;
use paddock_reapi::Digest;
use prost::Message;
use tokio::sync::broadcast;
use tonic::Status;

use crate::history::Fingerprint;
use crate::operations::Owner;
use crate::queue::Class;
use crate::state::Job;
use crate::{failed_response, missing_response, Inner, OperationWatch, Prepared, Snapshot, Stage};

/// Names an execution in the shared queue.
pub type ExecutionId = uuid::Uuid;

/// Why the shared queue could not be used (the database is unreachable, say).
#[derive(Debug, Clone)]
pub struct SharedError(pub String);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the shared queue: {}", self.0)
    }
}

impl From<SharedError> for Status {
    fn from(e: SharedError) -> Status {
        Status::unavailable(e.to_string())
    }
}

/// An execution to queue, with the operation of the client that asked for it.
#[derive(Debug, Clone)]
pub struct Submission {
    pub operation: String,
    pub identity: String,
    pub key: ActionKey,
    pub class: Class,
    pub priority: i32,
    pub invocation: String,
    pub cacheable: bool,
    pub fingerprint: Fingerprint,
}

/// An execution a replica claimed: its attempt, and what it needs to run it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: ExecutionId,
    pub attempt: i32,
    pub failures: u32,
    pub key: ActionKey,
    pub priority: i32,
    pub invocation: String,
    pub fingerprint: Fingerprint,
    /// Workers that failed it: others are preferred.
    pub avoid: Vec<String>,
}

/// What became of an attempt a replica holds.
#[derive(Debug, Clone)]
pub enum Progress {
    Started {
        id: ExecutionId,
        attempt: i32,
        worker: String,
    },
    /// Finished: the response every operation of it gets.
    Done {
        id: ExecutionId,
        attempt: i32,
        response: Vec<u8>,
    },
    /// Back to the queue, for any replica: `worker` failed it.
    Released {
        id: ExecutionId,
        attempt: i32,
        worker: String,
    },
}

/// Where an execution stands in the shared queue.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionStanding {
    pub id: ExecutionId,
    pub stage: SharedStage,
    pub attempt: i32,
    /// The replica holding it, while one does.
    pub replica: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SharedStage {
    Queued,
    Running {
        worker: String,
    },
    /// The encoded `ExecuteResponse`.
    Done {
        response: Vec<u8>,
    },
}

/// An operation as the shared queue keeps it.
#[derive(Debug, Clone)]
pub struct SharedOperation {
    pub execution: ExecutionId,
    pub owner: Owner,
    pub action: Digest,
    pub cancelled: bool,
}

/// What the shared queue announces.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Something was queued (or went back to the queue).
    Queued,
    /// An execution changed.
    Changed(ExecutionId),
    /// Notices may have been lost (the listening connection was re-made): look again.
    Resync,
}

/// The queue replicas share. Every method is one round trip (or one transaction).
#[async_trait]
pub trait SharedQueue: Send + Sync {
    /// This replica, as the queue names it in the executions it holds.
    fn replica(&self) -> &str;
    /// Queues an execution with the submission's operation, or adds the operation to
    /// the live execution of the same cacheable action; returns the execution.
    async fn submit(&self, submission: &Submission) -> Result<ExecutionId, SharedError>;
    /// How many executions `identity` has queued or running.
    async fn unfinished(&self, identity: &str) -> Result<usize, SharedError>;
    /// The classes with queued executions.
    async fn classes(&self) -> Result<Vec<Class>, SharedError>;
    /// Claims up to `count` queued executions of `classes` for this replica, in
    /// queue order (priority, turns across invocations, arrival), skipping those
    /// another replica is claiming at the same moment.
    async fn claim(&self, classes: &[Class], count: usize) -> Result<Vec<Claimed>, SharedError>;
    /// Reports what became of attempts this replica holds; a report for an attempt it
    /// no longer holds (its lease expired) is ignored.
    async fn record(&self, progress: &[Progress]) -> Result<(), SharedError>;
    /// Renews this replica's leases on the executions it `holds` (only those: a
    /// claim whose answer was lost on the way is left to expire), sends executions
    /// whose leases expired back to the queue (or fails them after
    /// `max_attempts`), and forgets finished ones past their retention.
    async fn keep(&self, holds: &[ExecutionId]) -> Result<(), SharedError>;
    /// Where executions stand (those the queue no longer has are left out).
    async fn standings(&self, ids: &[ExecutionId]) -> Result<Vec<ExecutionStanding>, SharedError>;
    /// An operation, by name.
    async fn operation(&self, name: &str) -> Result<Option<SharedOperation>, SharedError>;
    /// Cancels an operation; its execution ends (CANCELLED) if no other operation
    /// follows it. False if there is no such operation.
    async fn cancel(&self, name: &str) -> Result<bool, SharedError>;
    /// Forgets an operation (its execution runs on). False if there is none.
    async fn delete(&self, name: &str) -> Result<bool, SharedError>;
    /// The queue's notices.
    fn notices(&self) -> broadcast::Receiver<Notice>;
}

/// How often a replica renews its leases (and looks for expired ones).
const KEEP_EVERY: Duration = Duration::from_secs(2);
/// How often everything followed is looked up even without a notice: a safety
/// net (the notices' connection being re-made already triggers a look).
const POLL_EVERY: Duration = Duration::from_secs(30);

/// A shared queue as a replica uses it, with what it holds and follows.
pub(crate) struct Sharing {
    pub queue: Arc<dyn SharedQueue>,
    /// Wakes the replica's loop: progress to report, slots to fill.
    pub wake: tokio::sync::Notify,
}

/// A replica's part of the shared state, kept with the scheduler's.
#[derive(Default)]
pub(crate) struct Replica {
    /// Progress not yet reported.
    progress: Vec<Progress>,
    /// Executions this replica holds, and the job running each.
    held: HashMap<ExecutionId, crate::JobId>,
    /// Executions this replica's clients follow, and their operations here.
    followed: HashMap<ExecutionId, Vec<String>>,
}

impl Replica {
    /// An operation here stops following `execution`.
    pub fn unfollow(&mut self, execution: ExecutionId, name: &str) {
        if let Some(names) = self.followed.get_mut(&execution) {
            names.retain(|n| n != name);
            if names.is_empty() {
                self.followed.remove(&execution);
            }
        }
    }

    /// An attempt of a held execution started on `worker`.
    pub fn started(&mut self, job: &Job, worker: &str) {
        if let Some((id, attempt)) = job.shared {
            self.progress.push(Progress::Started {
                id,
                attempt,
                worker: worker.to_owned(),
            });
        }
    }

    /// A held execution finished with `response`.
    pub fn done(&mut self, job: &Job, response: &ExecuteResponse) {
        if let Some((id, attempt)) = job.shared {
            self.held.remove(&id);
            self.progress.push(Progress::Done {
                id,
                attempt,
                response: response.encode_to_vec(),
            });
        }
    }

    /// A held execution goes back to the shared queue: `worker` failed it.
    pub fn released(&mut self, job: &Job, worker: &str) {
        if let Some((id, attempt)) = job.shared {
            self.held.remove(&id);
            self.progress.push(Progress::Released {
                id,
                attempt,
                worker: worker.to_owned(),
            });
        }
    }
}

impl Inner {
    /// Execute with a shared queue: the execution goes there, and the caller follows
    /// its operation.
    pub(crate) async fn submit_shared(
        &self,
        sharing: &Sharing,
        submission: Submission,
        owner: Owner,
    ) -> Result<OperationWatch, Status> {
        let held = sharing.queue.unfinished(&owner.identity).await?;
        self.check_held(&owner.identity, held)?;
        let execution = sharing.queue.submit(&submission).await?;
        sharing.wake.notify_one();
        let watch = self.follow(
            submission.operation,
            owner,
            submission.key.action,
            execution,
        );
        // It may have joined an execution that is further along, or done.
        self.follow_up(sharing, &[execution]).await;
        Ok(watch)
    }

    /// A local operation following `execution`, named `name`.
    fn follow(
        &self,
        name: String,
        owner: Owner,
        action: Digest,
        execution: ExecutionId,
    ) -> OperationWatch {
        let snapshot = Snapshot {
            name: name.clone(),
            action_digest: action,
            stage: Stage::Queued,
            worker: None,
            response: None,
        };
        let mut state = self.state.lock();
        let updates = state.operations.follow(snapshot, owner, execution);
        state
            .replica
            .followed
            .entry(execution)
            .or_default()
            .push(name);
        OperationWatch {
            updates,
            closing: self.closing.subscribe(),
            _waiter: None,
        }
    }

    /// An operation another replica started (or this one before a restart), found
    /// in the shared queue and followed from now on; `None` if there is none.
    pub(crate) async fn find_shared(&self, name: &str) -> Option<Owner> {
        let sharing = self.sharing.as_ref()?;
        let found = match sharing.queue.operation(name).await {
            Ok(found) => found?,
            Err(e) => {
                tracing::warn!(operation = %name, error = %e, "cannot look up an operation in the shared queue");
                return None;
            }
        };
        if self.state.lock().operations.owner(name).is_some() {
            return Some(found.owner); // found meanwhile
        }
        let owner = found.owner.clone();
        let _ = self.follow(name.to_owned(), found.owner, found.action, found.execution);
        if found.cancelled {
            self.state
                .lock()
                .operations
                .finish(name, cancelled_response());
        } else {
            self.follow_up(sharing, &[found.execution]).await;
        }
        Some(owner)
    }

    /// Looks up executions this replica follows or holds and brings its operations
    /// and jobs in line: operations see the stage and, at the end, the response; a
    /// held execution that another replica took over (its lease expired) or that
    /// ended (cancelled) stops here.
    async fn follow_up(&self, sharing: &Sharing, ids: &[ExecutionId]) {
        if ids.is_empty() {
            return;
        }
        let standings = match sharing.queue.standings(ids).await {
            Ok(standings) => standings,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up executions in the shared queue");
                return;
            }
        };
        let me = sharing.queue.replica();
        let mut state = self.state.lock();
        for standing in standings {
            if let Some(&job_id) = state.replica.held.get(&standing.id) {
                let ours = state.jobs.get(&job_id).and_then(|j| j.shared)
                    == Some((standing.id, standing.attempt))
                    && standing.replica.as_deref() == Some(me);
                if !ours {
                    tracing::info!(execution = %standing.id, "an execution this server held was taken over or ended");
                    state.replica.held.remove(&standing.id);
                    state.remove_job(job_id);
                }
            }
            let Some(names) = state.replica.followed.get(&standing.id).cloned() else {
                continue;
            };
            match standing.stage {
                SharedStage::Done { response } => {
                    let response =
                        ExecuteResponse::decode(response.as_slice()).unwrap_or_else(|e| {
                            ExecuteResponse {
                                status: Some(paddock_reapi::status::status(
                                    tonic::Code::Internal,
                                    format!("the shared queue holds a malformed response: {e}"),
                                )),
                                ..Default::default()
                            }
                        });
                    let response = Arc::new(response);
                    for name in &names {
                        state.operations.finish(name, response.clone());
                    }
                    state.replica.followed.remove(&standing.id);
                }
                stage => {
                    let (stage, worker) = match stage {
                        SharedStage::Running { worker } => (Stage::Executing, Some(worker)),
                        _ => (Stage::Queued, None),
                    };
                    for name in &names {
                        if let Some(mut snapshot) = state.operations.current(name) {
                            snapshot.stage = stage;
                            snapshot.worker = worker.clone();
                            state.operations.update(snapshot);
                        }
                    }
                }
            }
        }
    }

    /// Claims as much queued work as this replica's free workers can take, and
    /// queues it here.
    async fn claim(&self, sharing: &Sharing) -> Result<(), SharedError> {
        if self.state.lock().free_slots().is_empty() {
            return Ok(());
        }
        let classes = sharing.queue.classes().await?;
        let (runnable, count) = {
            let state = self.state.lock();
            let free = state.free_slots();
            let runnable: Vec<Class> = classes
                .into_iter()
                .filter(|class| free.iter().any(|(s, _)| self.runs_class(&state, class, *s)))
                .collect();
            let slots: usize = free
                .iter()
                .filter(|(s, _)| runnable.iter().any(|c| self.runs_class(&state, c, *s)))
                .map(|(_, n)| n)
                .sum();
            // What is claimed but not yet on a worker counts against the slots.
            let waiting = state.queue.len();
            (runnable, slots.saturating_sub(waiting))
        };
        if runnable.is_empty() || count == 0 {
            return Ok(());
        }
        let claimed = sharing.queue.claim(&runnable, count).await?;
        for claim in claimed {
            let prepared = self.prepare(claim.key.clone(), "").await;
            let mut state = self.state.lock();
            match prepared {
                Ok(Prepared::Job(job)) => {
                    let job = Job {
                        priority: claim.priority,
                        invocation: claim.invocation,
                        fingerprint: claim.fingerprint,
                        failures: claim.failures,
                        avoid: claim.avoid,
                        shared: Some((claim.id, claim.attempt)),
                        ..*job
                    };
                    let job_id = state.enqueue(job);
                    state.replica.held.insert(claim.id, job_id);
                }
                // Answered here: it cannot run anywhere.
                Ok(Prepared::Missing(missing, what)) => {
                    let response = missing_response(&missing, what);
                    state.replica.progress.push(Progress::Done {
                        id: claim.id,
                        attempt: claim.attempt,
                        response: response.encode_to_vec(),
                    });
                }
                Err(status) => state.replica.progress.push(Progress::Done {
                    id: claim.id,
                    attempt: claim.attempt,
                    response: failed_response(&status).encode_to_vec(),
                }),
            }
        }
        let mut state = self.state.lock();
        self.dispatch(&mut state);
        Ok(())
    }

    /// Reports the progress gathered since the last report; kept for the next try
    /// if the queue cannot take it now.
    async fn report_progress(&self, sharing: &Sharing) -> Result<(), SharedError> {
        let progress = std::mem::take(&mut self.state.lock().replica.progress);
        if progress.is_empty() {
            return Ok(());
        }
        if let Err(e) = sharing.queue.record(&progress).await {
            let mut state = self.state.lock();
            let newer = std::mem::take(&mut state.replica.progress);
            state.replica.progress = progress;
            state.replica.progress.extend(newer);
            return Err(e);
        }
        Ok(())
    }

    /// Everything this replica follows or holds.
    fn watched(&self) -> Vec<ExecutionId> {
        let state = self.state.lock();
        let mut ids: HashSet<ExecutionId> = state.replica.followed.keys().copied().collect();
        ids.extend(state.replica.held.keys().copied());
        ids.into_iter().collect()
    }
}

/// The cancellation every operation of a cancelled execution ends with.
pub(crate) fn cancelled_response() -> Arc<ExecuteResponse> {
    Arc::new(ExecuteResponse {
        status: Some(paddock_reapi::status::status(
            tonic::Code::Cancelled,
            "the operation was cancelled",
        )),
        ..Default::default()
    })
}

/// A replica's work with the shared queue, until the scheduler is dropped: report
/// progress, follow what changed, claim work for free slots, keep the leases.
/// While the queue cannot be reached, the replica takes no new work (what it holds
/// runs on; its reports wait) and says so once, and again when it is back.
pub(crate) async fn replicate(weak: Weak<Inner>) {
    let Some(mut notices) = weak
        .upgrade()
        .and_then(|inner| Some(inner.sharing.as_ref()?.queue.notices()))
    else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut kept, mut polled) = (Instant::now(), Instant::now());
    let mut failing = false;
    loop {
        let mut changed: HashSet<ExecutionId> = HashSet::new();
        let mut everything = false;
        {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let Some(sharing) = &inner.sharing else {
                return;
            };
            tokio::select! {
                _ = tick.tick() => {}
                _ = sharing.wake.notified() => {}
                notice = notices.recv() => match notice {
                    Ok(Notice::Changed(id)) => { changed.insert(id); }
                    Ok(Notice::Queued) => {}
                    Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => everything = true,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
        // Whatever else has arrived, in the same round.
        loop {
            match notices.try_recv() {
                Ok(Notice::Changed(id)) => {
                    changed.insert(id);
                }
                Ok(Notice::Queued) => {}
                Ok(Notice::Resync) | Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    everything = true
                }
                Err(_) => break,
            }
        }
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let Some(sharing) = &inner.sharing else {
            return;
        };
        let mut result = inner.report_progress(sharing).await;
        if everything || polled.elapsed() >= POLL_EVERY {
            polled = Instant::now();
            changed.extend(inner.watched());
        } else {
            let state = inner.state.lock();
            changed.retain(|id| {
                state.replica.followed.contains_key(id) || state.replica.held.contains_key(id)
            });
        }
        let changed: Vec<ExecutionId> = changed.into_iter().collect();
        for chunk in changed.chunks(1_000) {
            inner.follow_up(sharing, chunk).await;
        }
        if result.is_ok() && kept.elapsed() >= KEEP_EVERY {
            kept = Instant::now();
            let holds: Vec<ExecutionId> = inner.state.lock().replica.held.keys().copied().collect();
            result = sharing.queue.keep(&holds).await;
        }
        if result.is_ok() {
            result = inner.claim(sharing).await;
        }
        metrics::gauge!("paddock_shared_queue_up").set(f64::from(u8::from(result.is_ok())));
        match (&result, failing) {
            (Err(e), false) => {
                tracing::error!(error = %e, "the shared queue fails: this server takes no new work until it answers");
                failing = true;
            }
            (Ok(()), true) => {
                tracing::warn!("the shared queue answers again: this server takes work again");
                failing = false;
            }
            _ => {}
        }
        if failing {
            // Not every round: a database that is down is asked again shortly.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
