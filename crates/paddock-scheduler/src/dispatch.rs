//! Giving work to workers and taking it back: dispatch (with each job's constraints
//! and each worker's standing), speculative copies of stragglers, canaries for
//! probed workers, retries, lost workers, cancellations and the periodic sweep.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use paddock_cas::ActionKey;
use paddock_proto::worker::v1 as wire;
use paddock_reapi::proto::re::{
    Action, ActionResult, Command, Directory, ExecuteResponse, OutputFile,
};
use paddock_reapi::{status, Digest};
use prost::Message;
use tonic::Code;

use crate::health::{Outcome, Unsaved};
use crate::queue::Class;
use crate::results::Outputs;
use crate::state::{Attempt, Job, JobKind, JobState, Known, State};
use crate::{Inner, JobId, SessionId};

/// The lowest priority: checks run when clients' work leaves room.
const BACKGROUND: i32 = i32::MAX;
/// How long a canary may run.
const CANARY_TIMEOUT: Duration = Duration::from_secs(60);

/// An action's platform properties, as the scheduler matches them.
type Platform = [(String, String)];

impl Inner {
    /// Whether the worker on `session` may run `job`.
    fn eligible(&self, state: &State, job: &Job, session: SessionId) -> bool {
        let worker = &state.workers[&session];
        let allowed = match job.kind.only_on() {
            Some(only) => worker.name == only,
            None => state.fleet.takes_work(&worker.name) && !job.exclude.contains(&worker.name),
        };
        allowed
            && worker.serves(&job.key.instance)
            && self.policies.satisfies(&worker.offer, &job.platform)
    }

    /// Offers queued actions to workers with free slots until no more can start.
    pub(crate) fn dispatch(&self, state: &mut State) {
        if state.queue.is_empty() {
            return;
        }
        // Free slots per worker, counted once and kept up to date as jobs go out.
        let mut free = state.free_slots();
        while !free.is_empty() && !state.queue.is_empty() {
            let Some((job_id, session)) = self.next_assignment(state, &free) else {
                break;
            };
            self.assign(state, job_id, session, false);
            if let Some(i) = free.iter().position(|(s, _)| *s == session) {
                free[i].1 -= 1;
                if free[i].1 == 0 {
                    free.swap_remove(i);
                }
            }
        }
    }

    /// The queued job to start next, and the free worker to start it on. Only the
    /// classes some free worker can run are looked at; among them the lowest
    /// priority goes first, then the job queued first; within a class, its fair
    /// order, past jobs no free worker may take (a retry waiting for a worker that
    /// has not failed it, a check that must run somewhere new).
    fn next_assignment(
        &self,
        state: &State,
        free: &[(SessionId, usize)],
    ) -> Option<(JobId, SessionId)> {
        let mut best: Option<(i32, JobId, SessionId)> = None;
        for (class, queue) in state.queue.classes() {
            let able: Vec<(SessionId, usize)> = free
                .iter()
                .filter(|(s, _)| self.runs_class(state, class, *s))
                .copied()
                .collect();
            if able.is_empty() {
                continue;
            }
            for job_id in queue.in_order() {
                let job = &state.jobs[&job_id];
                if best.is_some_and(|(priority, _, _)| job.priority > priority) {
                    break; // nothing later in this class can come first
                }
                let Some(session) = self.best_worker(state, job, &able) else {
                    continue;
                };
                if best.is_none_or(|(p, id, _)| (job.priority, job_id) < (p, id)) {
                    best = Some((job.priority, job_id, session));
                }
                break;
            }
        }
        best.map(|(_, job_id, session)| (job_id, session))
    }

    /// Whether the worker on `session` may run the jobs of `class`, as far as the
    /// class says (a job may add constraints of its own).
    pub(crate) fn runs_class(&self, state: &State, class: &Class, session: SessionId) -> bool {
        let worker = &state.workers[&session];
        let allowed = match &class.only_on {
            Some(only) => worker.name == *only,
            None => state.fleet.takes_work(&worker.name),
        };
        allowed
            && worker.serves(&class.instance)
            && self.policies.satisfies(&worker.offer, &class.platform)
    }

    /// Among the free workers `able` to run its class, the one to run `job` on:
    /// where its inputs already are, then where most slots are free. A retry goes
    /// to a worker that has not failed it, unless no such worker is connected.
    fn best_worker(
        &self,
        state: &State,
        job: &Job,
        able: &[(SessionId, usize)],
    ) -> Option<SessionId> {
        let fresh = |s: &SessionId| !job.avoid.contains(&state.workers[s].name);
        let wait_for_fresh = !job.avoid.is_empty()
            && state
                .workers
                .keys()
                .any(|s| fresh(s) && self.eligible(state, job, *s));
        let locality = |s: &SessionId| match self.config.locality {
            true => state.workers[s].holds(&job.inputs),
            false => 0,
        };
        able.iter()
            .filter(|(s, _)| !job.exclude.contains(&state.workers[s].name))
            .filter(|(s, _)| !wait_for_fresh || fresh(s))
            .max_by_key(|(s, slots)| (locality(s), *slots))
            .map(|(s, _)| *s)
    }

    /// Sends a job to a worker: its first attempt (out of the queue), or a
    /// speculative copy beside the running one.
    fn assign(&self, state: &mut State, job_id: JobId, session: SessionId, speculative: bool) {
        let assignment_id = uuid::Uuid::new_v4().to_string();
        let worker_name = state.workers[&session].name.clone();
        let job = state.jobs.get_mut(&job_id).expect("the job exists");
        if !speculative {
            state.replica.started(job, &worker_name);
            state
                .queue
                .remove(job.class, job.priority, &job.invocation, job_id, true);
        }
        job.unsatisfiable_since = None;
        let attempt = Attempt {
            session,
            assignment: assignment_id.clone(),
            worker: worker_name,
            started: self.clock.now(),
            speculative,
        };
        match &mut job.state {
            JobState::Running(attempts) => attempts.push(attempt),
            JobState::Queued => job.state = JobState::Running(vec![attempt]),
        }
        let queued_at_micros = paddock_reapi::time::unix_micros(job.queued_at);
        let assignment = wire::Assignment {
            assignment_id: assignment_id.clone(),
            instance_name: job.key.instance.clone(),
            action_digest: Some(wire::Digest {
                hash: job.key.action.hash_hex(),
                size_bytes: job.key.action.size() as i64,
            }),
            action: job.action.to_vec(),
            command: job.command.to_vec(),
            timeout_ms: job.timeout.as_millis() as u64,
            queued_at_micros,
        };
        let worker = state
            .workers
            .get_mut(&session)
            .expect("a free worker exists");
        worker.assign(assignment_id, job_id);
        let _ = worker.outbound.send(wire::SchedulerMessage {
            message: Some(wire::scheduler_message::Message::Assignment(assignment)),
        });
        tracing::debug!(action = %state.jobs[&job_id].key.action, worker = %worker.name, speculative, "assigned");
        state.notify(job_id);
    }

    /// An attempt of a job failed on its worker: if no other attempt runs, the job
    /// goes back to the queue (to be tried elsewhere first), unless it has failed too
    /// often.
    pub(crate) fn attempt_failed(
        &self,
        state: &mut State,
        job_id: JobId,
        assignment: &str,
        reason: &str,
    ) {
        let Some(job) = state.jobs.get_mut(&job_id) else {
            return;
        };
        if let JobState::Running(attempts) = &mut job.state {
            if let Some(failed) = attempts.iter().find(|a| a.assignment == assignment) {
                if !job.avoid.contains(&failed.worker) {
                    job.avoid.push(failed.worker.clone());
                }
            }
            attempts.retain(|a| a.assignment != assignment);
            if !attempts.is_empty() {
                return; // a copy runs on elsewhere
            }
        }
        job.failures += 1;
        let max = self.config.max_attempts.max(1);
        if !job.kind.is_client() {
            // A verification or canary that could not run proves nothing; a canary
            // that failed is judged by the caller.
            state.complete(job_id, ExecuteResponse::default());
            return;
        }
        if job.failures >= max {
            tracing::warn!(action = %job.key.action, failures = job.failures, %reason, "giving up on an action");
            metrics::counter!("paddock_executions_total", "outcome" => "lost").increment(1);
            let message = format!(
                "the action failed {} times (retried on another worker where one was free); last: {reason}",
                job.failures
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
        if job.shared.is_some() {
            // Back to the shared queue, where any replica may take it.
            let worker = job.avoid.last().cloned().unwrap_or_default();
            tracing::info!(action = %job.key.action, %reason, "releasing an action to the shared queue");
            metrics::counter!("paddock_executions_requeued_total").increment(1);
            state.replica.released(job, &worker);
            state.remove_job(job_id);
            return;
        }
        tracing::info!(action = %job.key.action, %reason, "requeueing an action");
        metrics::counter!("paddock_executions_requeued_total").increment(1);
        job.state = JobState::Queued;
        state.unjournaled.changed(job);
        job.class = state.queue.push(
            job.queue_class(),
            job.priority,
            &job.invocation,
            job_id,
            true,
        );
        state.notify(job_id);
    }

    /// Removes a worker session; its running actions count against it and run
    /// elsewhere.
    pub(crate) fn drop_worker(&self, state: &mut State, session: SessionId, reason: &str) {
        let Some(worker) = state.workers.remove(&session) else {
            return;
        };
        tracing::warn!(worker = %worker.name, running = worker.running().len(), %reason, "worker lost");
        let name = worker.name.clone();
        // Saved promptly: it may reconnect to another server sharing the records.
        state.fleet.mark_changed(&name, Unsaved::Standings);
        for (assignment, job_id) in worker.into_running() {
            let canary = matches!(
                state.jobs.get(&job_id).map(|j| &j.kind),
                Some(JobKind::Canary { .. })
            );
            let transition = match canary {
                true => state.fleet.canary(&name, false, "lost during a canary"),
                false => state.fleet.record(&name, Outcome::InfraFailure),
            };
            self.transition(transition);
            self.attempt_failed(
                state,
                job_id,
                &assignment,
                &format!("worker {name} was lost: {reason}"),
            );
        }
        self.dispatch(state);
    }

    /// Stops an execution: out of the queue, or cancelled on its workers.
    pub(crate) fn abort_job(&self, state: &mut State, job_id: JobId, reason: &str) {
        let Some(job) = state.jobs.get(&job_id) else {
            return;
        };
        tracing::info!(action = %job.key.action, %reason, "cancelling an execution");
        metrics::counter!("paddock_executions_total", "outcome" => "cancelled").increment(1);
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

    pub(crate) fn sweep(&self) {
        let now = self.clock.now();
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

        if self.due_to_judge_unsatisfiable(now) {
            self.fail_unsatisfiable(&mut state, now);
        }
        let connected: HashSet<String> = state.workers.values().map(|w| w.name.clone()).collect();
        for transition in state.fleet.review(&connected) {
            self.transition(Some(transition));
        }
        self.start_probes(&mut state, now, &connected);
        state.fleet.forget_gone(&connected, now);
        if self.due_to_touch(now) {
            for name in &connected {
                state.fleet.touch(name);
            }
        }
        let State {
            bindings, fleet, ..
        } = &mut *state;
        bindings.retain(|name, _| fleet.get(name).is_some());
        self.speculate(&mut state, now);

        let retention = self.config.operation_retention.get();
        state.operations.expire(now, retention);
        self.dispatch(&mut state);
    }

    /// Fails queued actions that no connected worker could run, once they have waited
    /// `unsatisfiable_grace` for one to join. Checks (verifications, canaries) that
    /// cannot run are dropped the same way.
    /// The pass over every queued action for unsatisfiable ones runs a few times per
    /// `unsatisfiable_grace` (at most once a second), not at every sweep: with a
    /// deep queue it is the sweep's largest cost.
    fn due_to_judge_unsatisfiable(&self, now: Instant) -> bool {
        let every = (self.config.unsatisfiable_grace.get() / 4).min(Duration::from_secs(1));
        let mut judged = self.unsatisfiable_judged.lock();
        if judged.is_some_and(|at| now.duration_since(at) < every) {
            return false;
        }
        *judged = Some(now);
        true
    }

    fn fail_unsatisfiable(&self, state: &mut State, now: Instant) {
        let grace = self.config.unsatisfiable_grace.get();
        let queued: Vec<JobId> = state.queue.jobs().collect();
        let mut doomed = Vec::new();
        // Clients' actions are judged by instance and platform alone: once per
        // distinct pair, not once per queued action.
        let mut judged: HashMap<(&str, &Platform), bool> = HashMap::new();
        let mut satisfiable_now = Vec::with_capacity(queued.len());
        for job_id in &queued {
            let job = &state.jobs[job_id];
            // A client's action waits for drained or quarantined workers that could
            // run it (an operator may be draining the whole fleet); a check that no
            // eligible worker can run is dropped.
            let satisfiable = match job.kind.is_client() {
                true => *judged
                    .entry((job.key.instance.as_str(), job.platform.as_slice()))
                    .or_insert_with(|| {
                        state.workers.values().any(|w| {
                            w.serves(&job.key.instance)
                                && self.policies.satisfies(&w.offer, &job.platform)
                        })
                    }),
                false => state
                    .workers
                    .values()
                    .any(|w| self.eligible(state, job, w.session)),
            };
            satisfiable_now.push(satisfiable);
        }
        for (job_id, satisfiable) in queued.into_iter().zip(satisfiable_now) {
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
            if let JobKind::Canary { worker, .. } = &job.kind {
                let worker = worker.clone();
                let transition =
                    state
                        .fleet
                        .canary(&worker, false, "it did not come to run its canary");
                self.transition(transition);
            }
            if !job.kind.is_client() {
                state.complete(job_id, ExecuteResponse::default());
                continue;
            }
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
            tracing::warn!(action = %job.key.action, %message, "failing an unsatisfiable action");
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

    /// Starts speculative copies of stragglers: clients' actions running far longer
    /// than similar ones did, when a worker is free and the budget allows.
    fn speculate(&self, state: &mut State, now: Instant) {
        let config = &self.config.speculation;
        if !config.enabled {
            return;
        }
        let capacity: usize = state.workers.values().map(|w| w.capacity).sum();
        let budget = ((capacity as f64 * config.max_fraction) as usize).max(1);
        let copies = state
            .jobs
            .values()
            .filter_map(|j| match &j.state {
                JobState::Running(attempts) => {
                    Some(attempts.iter().filter(|a| a.speculative).count())
                }
                JobState::Queued => None,
            })
            .sum::<usize>();
        let mut room = budget.saturating_sub(copies);
        let stragglers: Vec<(JobId, String)> = state
            .jobs
            .values()
            .filter(|j| j.kind.is_client() && !j.speculated)
            .filter_map(|j| {
                let JobState::Running(attempts) = &j.state else {
                    return None;
                };
                let [only] = attempts.as_slice() else {
                    return None;
                };
                let expected = state.history.expected(&j.fingerprint, config.min_samples)?;
                let limit = expected
                    .mul_f64(config.multiple)
                    .max(config.min_runtime.get());
                (now.duration_since(only.started) > limit).then(|| (j.id, only.worker.clone()))
            })
            .collect();
        for (job_id, running_on) in stragglers {
            if room == 0 {
                break;
            }
            let job = &state.jobs[&job_id];
            let free = state
                .workers
                .values()
                .filter(|w| w.running().len() < w.capacity && w.name != running_on)
                .filter(|w| self.eligible(state, job, w.session))
                .max_by_key(|w| w.capacity - w.running().len())
                .map(|w| w.session);
            let Some(session) = free else {
                continue;
            };
            tracing::info!(action = %job.key.action, slow = %running_on, "starting a speculative copy of a straggler");
            metrics::counter!("paddock_speculative_executions_total", "event" => "started")
                .increment(1);
            state
                .jobs
                .get_mut(&job_id)
                .expect("the job exists")
                .speculated = true;
            self.assign(state, job_id, session, true);
            room -= 1;
        }
    }

    /// Workers whose quarantine cool-down is over get their canaries.
    fn start_probes(&self, state: &mut State, now: Instant, here: &HashSet<String>) {
        for (worker, transition) in state.fleet.due_for_probing(now, here) {
            self.transition(Some(transition));
            let session = state.workers.values().find(|w| w.name == worker);
            let offer = session.map(|w| (w.offer.clone(), w.serves.clone()));
            // Real actions that healthy workers ran check the worker's toolchain; at
            // least one canary is new, with outputs no worker has uploaded, so that
            // the worker's own uploads are checked too.
            let wanted = self.config.quarantine.canaries.max(1);
            let mut picked: Vec<Known> = match &offer {
                Some((offer, serves)) => state
                    .known
                    .iter()
                    .rev()
                    .filter(|k| {
                        k.worker != worker
                            && serves(&k.key.instance)
                            && self.policies.satisfies(offer, &k.platform)
                    })
                    .take(wanted - 1)
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            while picked.len() < wanted {
                picked.push(self.synthetic_canary());
            }
            for known in picked {
                let kind = JobKind::Canary {
                    worker: worker.clone(),
                    expected: known.outputs,
                };
                let job = Job {
                    priority: BACKGROUND,
                    invocation: format!("paddock-canary-{worker}"),
                    ..Job::new(
                        known.key,
                        known.action,
                        known.command,
                        known.platform,
                        known.timeout,
                        kind,
                    )
                };
                state.enqueue(job);
            }
        }
    }

    /// A canary whose result is known without any worker: `/bin/sh` writes a line
    /// with a fresh nonce to a file, in an empty input root (the empty blob, always
    /// in the CAS).
    fn synthetic_canary(&self) -> Known {
        let line = format!("paddock canary {:016x}\n", rand::random::<u64>());
        let command = Command {
            arguments: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("printf '{}' > canary.txt", line.replace('\n', "\\n")),
            ],
            output_paths: vec!["canary.txt".into()],
            ..Default::default()
        };
        let command_bytes = Bytes::from(command.encode_to_vec());
        let root = Bytes::from(Directory::default().encode_to_vec());
        let action = Action {
            command_digest: Some(Digest::of(&command_bytes).to_proto()),
            input_root_digest: Some(Digest::of(&root).to_proto()),
            do_not_cache: true,
            ..Default::default()
        };
        let action_bytes = Bytes::from(action.encode_to_vec());
        let expected = ActionResult {
            output_files: vec![OutputFile {
                path: "canary.txt".into(),
                digest: Some(Digest::of(line.as_bytes()).to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        };
        Known {
            key: ActionKey {
                instance: String::new(),
                action: Digest::of(&action_bytes),
            },
            action: action_bytes,
            command: command_bytes,
            platform: Vec::new(),
            timeout: CANARY_TIMEOUT,
            worker: String::new(),
            outputs: Outputs::of(&expected),
        }
    }

    /// Queues another run of a finished action on a worker that has not run it, to
    /// compare with the `runs` so far.
    pub(crate) fn verify(
        &self,
        state: &mut State,
        template: &Known,
        runs: Vec<(String, Outputs, ActionResult)>,
    ) {
        let exclude = runs.iter().map(|(w, _, _)| w.clone()).collect();
        let job = Job {
            priority: BACKGROUND,
            invocation: "paddock-verification".into(),
            exclude,
            ..Job::new(
                template.key.clone(),
                template.action.clone(),
                template.command.clone(),
                template.platform.clone(),
                template.timeout,
                JobKind::Verify { runs },
            )
        };
        state.enqueue(job);
    }
}
