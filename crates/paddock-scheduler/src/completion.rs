//! What happens when a worker finishes an assignment: the result is judged (valid,
//! or the worker's fault), the worker's health is told, and then, by the kind of
//! execution, the clients get their answer (and the ActionCache the result), a
//! verification compares runs, or a canary passes or fails its worker.

use std::collections::HashSet;

use bytes::Bytes;
use paddock_proto::worker::v1 as wire;
use paddock_reapi::proto::re::{ActionResult, Command, ExecuteResponse};
use paddock_reapi::{status, Digest};
use prost::Message;
use tonic::Code;

use crate::health::Outcome;
use crate::results::{self, Outputs};
use crate::state::{JobKind, JobState, Known, State};
use crate::{Inner, JobId, SessionId};

/// Recent results kept for canaries, and timeouts remembered.
const KNOWN: usize = 64;
const TIMEOUTS: usize = 1024;

/// A result that passed every check.
struct Valid {
    result: ActionResult,
    outputs: Outputs,
    timed_out: bool,
    message: String,
}

enum Verdict {
    /// The command ran and its result is usable.
    Ran(Valid),
    /// The action's own fault (missing inputs, a bad command): every worker would
    /// answer the same.
    Answer(ExecuteResponse),
    /// The worker's fault: another worker may do better.
    WorkerFault(String),
    /// A shared service failed under the worker (the CAS, a registry): another
    /// attempt may do better, and the worker is not to blame.
    Retry(String),
    /// The worker lacks what the action demands (its toolchain differs from the
    /// action's manifest): another worker may match, and this one is not to blame.
    Decline(String),
}

/// The most digests a worker's "inputs missing" report may name.
const MAX_MISSING: usize = 10_000;

/// Whose fault a worker's failure report says it is (older workers said only
/// whether another worker could retry).
fn whose(failed: &wire::Failed) -> wire::Fault {
    match wire::Fault::try_from(failed.fault).unwrap_or(wire::Fault::Unspecified) {
        wire::Fault::Unspecified if !failed.retryable => wire::Fault::Action,
        wire::Fault::Unspecified => wire::Fault::Worker,
        fault => fault,
    }
}

impl Inner {
    /// A heartbeat lists what the worker runs. An assignment it no longer lists, once
    /// it has had time to arrive (two heartbeat intervals after it was sent), is
    /// lost: its attempt fails, as the worker's fault. A worker sends an
    /// assignment's result before it stops listing it, so a result is never
    /// overtaken.
    pub(crate) fn reconcile(&self, session: SessionId, reported: &[String]) {
        let grace = self.config.heartbeat_interval.get() * 2;
        let now = self.clock.now();
        let mut state = self.state.lock();
        let Some(worker) = state.workers.get(&session) else {
            return;
        };
        let reported: HashSet<&str> = reported.iter().map(String::as_str).collect();
        let sent_at = |job: &JobId, assignment: &str| match state.jobs.get(job).map(|j| &j.state) {
            Some(JobState::Running(attempts)) => attempts
                .iter()
                .find(|a| a.assignment == assignment)
                .map(|a| a.started),
            _ => None,
        };
        let lost: Vec<(String, JobId)> = worker
            .running()
            .iter()
            .filter(|(assignment, _)| !reported.contains(assignment.as_str()))
            .filter(|(assignment, job)| {
                sent_at(job, assignment).is_some_and(|t| now.duration_since(t) > grace)
            })
            .map(|(assignment, job)| (assignment.clone(), *job))
            .collect();
        if lost.is_empty() {
            return;
        }
        let name = worker.name.clone();
        for (assignment, job) in lost {
            if let Some(worker) = state.workers.get_mut(&session) {
                worker.release(&assignment, now);
            }
            metrics::counter!("paddock_lost_assignments_total").increment(1);
            let transition = state.fleet.record(&name, Outcome::InfraFailure);
            self.transition(transition);
            self.attempt_failed(
                &mut state,
                job,
                &assignment,
                &format!("worker {name} no longer reports it running"),
            );
        }
        self.dispatch(&mut state);
    }

    pub(crate) fn started(&self, session: SessionId, assignment: &str) {
        let state = self.state.lock();
        if let Some(worker) = state.workers.get(&session) {
            if let Some(job) = worker.running().get(assignment) {
                tracing::debug!(action = %state.jobs[job].key.action, worker = %worker.name, "started");
            }
        }
    }

    pub(crate) async fn finished(&self, session: SessionId, finished: wire::Finished) {
        use wire::finished::Outcome as W;
        let arrived = self.clock.now();
        let assignment = finished.assignment_id;
        let job = {
            let state = self.state.lock();
            state.workers.get(&session).and_then(|w| {
                let job = state.jobs.get(w.running().get(&assignment)?)?;
                Some((
                    job.id,
                    job.key.clone(),
                    job.command.clone(),
                    job.cacheable && job.kind.is_client(),
                    w.name.clone(),
                ))
            })
        };
        let Some((job_id, key, command, cacheable, worker_name)) = job else {
            tracing::info!(%assignment, "discarding a result for an assignment no longer current");
            metrics::counter!("paddock_late_results_total").increment(1);
            return;
        };
        // Judged before taking the lock again: checking a result reads the CAS.
        let verdict = match finished.outcome {
            Some(W::Completed(completed)) => {
                match self.judge(&command, completed, &worker_name).await {
                    Ok(valid) => Verdict::Ran(valid),
                    Err(reason) => {
                        metrics::counter!("paddock_invalid_results_total").increment(1);
                        Verdict::WorkerFault(format!("its result was refused: {reason}"))
                    }
                }
            }
            Some(W::MissingInputs(missing)) => self.check_missing(missing).await,
            Some(W::Failed(failed)) => match whose(&failed) {
                wire::Fault::Action => Verdict::Answer(ExecuteResponse {
                    status: Some(status::status(Code::from_i32(failed.code), failed.message)),
                    ..Default::default()
                }),
                wire::Fault::Infrastructure => Verdict::Retry(failed.message),
                wire::Fault::Mismatch => Verdict::Decline(failed.message),
                wire::Fault::Worker | wire::Fault::Unspecified => {
                    Verdict::WorkerFault(failed.message)
                }
            },
            None => Verdict::WorkerFault("it reported no outcome".into()),
        };
        let current = || {
            let state = self.state.lock();
            state
                .workers
                .get(&session)
                .and_then(|w| w.running().get(&assignment))
                == Some(&job_id)
        };
        if let Verdict::Ran(valid) = &verdict {
            // Only a current attempt's result is cached: one cancelled, lost or
            // overtaken while it was checked is not.
            if cacheable && !valid.timed_out && valid.result.exit_code == 0 && current() {
                if let Err(e) = self.action_cache.put(&key, &valid.result).await {
                    tracing::warn!(action = %key.action, error = %e, "could not write the ActionCache");
                }
            }
        }

        let mut state = self.state.lock();
        let current = state
            .workers
            .get(&session)
            .and_then(|w| w.running().get(&assignment))
            == Some(&job_id);
        if !current {
            return; // cancelled or lost while the result was being checked
        }
        let worker = {
            let w = state.workers.get_mut(&session).expect("checked above");
            w.release(&assignment, self.clock.now());
            w.name.clone()
        };
        match verdict {
            Verdict::WorkerFault(reason) => {
                let canary = matches!(state.jobs[&job_id].kind, JobKind::Canary { .. });
                let transition = match canary {
                    true => state.fleet.canary(&worker, false, &reason),
                    false => state.fleet.record(&worker, Outcome::InfraFailure),
                };
                self.transition(transition);
                self.attempt_failed(
                    &mut state,
                    job_id,
                    &assignment,
                    &format!("worker {worker} failed: {reason}"),
                );
            }
            Verdict::Retry(reason) => {
                self.attempt_failed(
                    &mut state,
                    job_id,
                    &assignment,
                    &format!("on worker {worker}, a shared service failed: {reason}"),
                );
            }
            Verdict::Decline(reason) => {
                self.attempt_failed(
                    &mut state,
                    job_id,
                    &assignment,
                    &format!("worker {worker} declined it: {reason}"),
                );
            }
            Verdict::Answer(response) => {
                if state.jobs[&job_id].kind.is_client() {
                    let outcome = match response.status.as_ref().map(|s| s.code) {
                        Some(c) if c == Code::FailedPrecondition as i32 => "missing_blobs",
                        _ => "failed",
                    };
                    metrics::counter!("paddock_executions_total", "outcome" => outcome)
                        .increment(1);
                }
                state.complete(job_id, response);
            }
            Verdict::Ran(valid) => self.ran(&mut state, job_id, &assignment, &worker, valid),
        }
        let running = |state: &State| state.workers.get(&session).map(|w| w.running().len());
        let before = running(&state);
        self.dispatch(&mut state);
        if running(&state) > before {
            // The slot the result freed went straight to queued work: how long that
            // took, from the result's arrival (checking it, waiting for the lock,
            // choosing the job).
            let took = self.clock.now().duration_since(arrived);
            metrics::histogram!("paddock_slot_refill_seconds").record(took.as_secs_f64());
        }
    }

    /// Checks a worker's claim that inputs are missing against the CAS: the client
    /// hears of the blobs that really are; a worker that claims what the CAS holds
    /// (or names nothing sensible) has failed.
    async fn check_missing(&self, missing: wire::MissingInputs) -> Verdict {
        if missing.digests.is_empty() || missing.digests.len() > MAX_MISSING {
            return Verdict::WorkerFault(format!(
                "it reported {} inputs missing",
                missing.digests.len()
            ));
        }
        let Ok(claimed) = missing
            .digests
            .iter()
            .map(|d| Digest::parse(&d.hash, d.size_bytes))
            .collect::<Result<Vec<Digest>, _>>()
        else {
            return Verdict::WorkerFault("it reported a malformed digest as missing".into());
        };
        let really = match self.cas.find_missing(&claimed).await {
            Ok(really) => really,
            Err(e) => return Verdict::Retry(format!("checking its missing inputs: {e}")),
        };
        if really.len() < claimed.len() {
            metrics::counter!("paddock_false_missing_reports_total").increment(1);
            return Verdict::WorkerFault(format!(
                "it reported {} inputs missing that the CAS holds",
                claimed.len() - really.len()
            ));
        }
        let list: Vec<String> = really.iter().map(Digest::to_string).collect();
        Verdict::Answer(ExecuteResponse {
            status: Some(status::missing_blobs(
                format!("inputs are not in the CAS: missing {}", list.join(", ")),
                &really,
            )),
            ..Default::default()
        })
    }

    /// Decodes and checks a completed assignment's result. The worker named in its
    /// metadata is the one the scheduler knows ran it (a name bound to the worker's
    /// identity), whatever the worker wrote there.
    async fn judge(
        &self,
        command: &Bytes,
        completed: wire::Completed,
        worker: &str,
    ) -> Result<Valid, String> {
        let mut result = ActionResult::decode(completed.action_result.as_slice())
            .map_err(|e| format!("its ActionResult does not decode: {e}"))?;
        result.execution_metadata.get_or_insert_default().worker = worker.to_owned();
        let command = Command::decode(command.clone()).map_err(|e| e.to_string())?;
        results::check(
            self.cas.as_ref(),
            &command,
            &result,
            self.bounds.max_tree_directories,
        )
        .await?;
        Ok(Valid {
            outputs: Outputs::of(&result),
            result,
            timed_out: completed.timed_out,
            message: completed.message,
        })
    }

    /// A valid result: health, then by the kind of execution.
    fn ran(&self, state: &mut State, job_id: JobId, assignment: &str, worker: &str, valid: Valid) {
        let succeeded = !valid.timed_out && valid.result.exit_code == 0;
        let outcome = match succeeded {
            true => Outcome::Success,
            false => Outcome::NonzeroExit,
        };
        let transition = state.fleet.record(worker, outcome);
        self.transition(transition);
        let job = state.jobs.get_mut(&job_id).expect("a current job exists");
        let attempt = match &mut job.state {
            JobState::Running(attempts) => attempts
                .iter()
                .position(|a| a.assignment == assignment)
                .map(|i| attempts.remove(i)),
            JobState::Queued => None,
        };
        let template = Known {
            key: job.key.clone(),
            action: job.action.clone(),
            command: job.command.clone(),
            platform: job.platform.clone(),
            timeout: job.timeout,
            worker: worker.to_owned(),
            outputs: valid.outputs.clone(),
        };
        match std::mem::replace(&mut job.kind, JobKind::Client) {
            JobKind::Canary {
                worker: probed,
                expected,
            } => {
                let passed = valid.outputs == expected;
                metrics::counter!("paddock_canaries_total", "result" => if passed { "passed" } else { "failed" })
                    .increment(1);
                let transition =
                    state
                        .fleet
                        .canary(&probed, passed, "its outputs differ from the known ones");
                self.transition(transition);
                state.complete(job_id, ExecuteResponse::default());
            }
            JobKind::Verify { mut runs } => {
                runs.push((worker.to_owned(), valid.outputs, valid.result));
                state.complete(job_id, ExecuteResponse::default());
                self.compare(state, &template, runs);
            }
            JobKind::Client => {
                let (key, cacheable, timeout) = (job.key.clone(), job.cacheable, job.timeout);
                let fingerprint = job.fingerprint;
                if let Some(attempt) = &attempt {
                    if succeeded {
                        state.history.record(
                            fingerprint,
                            self.clock.now().duration_since(attempt.started),
                        );
                    }
                    if attempt.speculative {
                        metrics::counter!("paddock_speculative_executions_total", "event" => "won")
                            .increment(1);
                        tracing::info!(action = %key.action, %worker, "a speculative copy finished first");
                    }
                }
                self.check_timeouts(state, &key, worker, valid.timed_out, timeout);
                if succeeded && cacheable && state.fleet.takes_work(worker) {
                    if state.known.len() >= KNOWN {
                        state.known.pop_front();
                    }
                    state.known.push_back(template.clone());
                    let rate = self.config.quarantine.verify_sample_rate;
                    if rate > 0.0 && rand::random::<f64>() < rate {
                        let runs = vec![(
                            worker.to_owned(),
                            valid.outputs.clone(),
                            valid.result.clone(),
                        )];
                        self.verify(state, &template, runs);
                    }
                }
                let status = if valid.timed_out {
                    metrics::counter!("paddock_executions_total", "outcome" => "timed_out")
                        .increment(1);
                    status::status(
                        Code::DeadlineExceeded,
                        "the action exceeded its timeout and was killed",
                    )
                } else {
                    let outcome = if valid.result.exit_code == 0 {
                        "success"
                    } else {
                        "nonzero_exit"
                    };
                    metrics::counter!("paddock_executions_total", "outcome" => outcome)
                        .increment(1);
                    status::ok()
                };
                state.complete(
                    job_id,
                    ExecuteResponse {
                        result: Some(valid.result),
                        cached_result: false,
                        status: Some(status),
                        message: valid.message,
                        ..Default::default()
                    },
                );
            }
        }
    }

    /// A timeout counts against its worker once the same action finishes in time on
    /// another.
    fn check_timeouts(
        &self,
        state: &mut State,
        key: &paddock_cas::ActionKey,
        worker: &str,
        timed_out: bool,
        timeout: std::time::Duration,
    ) {
        if timed_out {
            if state.timeouts.len() >= TIMEOUTS {
                state.timeouts.pop_front();
            }
            state
                .timeouts
                .replace(key.clone(), (worker.to_owned(), timeout));
            return;
        }
        let Some((slow, _)) = state.timeouts.remove(key) else {
            return;
        };
        if slow != worker {
            tracing::warn!(action = %key.action, %slow, fast = %worker, "an action that timed out finished in time on another worker");
            let transition = state.fleet.record(&slow, Outcome::InfraFailure);
            self.transition(transition);
        }
    }

    /// Compares the runs of a verified action: two that agree settle it; two that
    /// differ call for a third; with three, the odd one out is recorded against its
    /// worker (and if it was the cached one, the cache gets the majority's result).
    fn compare(
        &self,
        state: &mut State,
        template: &Known,
        runs: Vec<(String, Outputs, ActionResult)>,
    ) {
        let agree = |a: usize, b: usize| runs[a].1 == runs[b].1;
        match runs.len() {
            2 if agree(0, 1) => {
                metrics::counter!("paddock_verifications_total", "result" => "agreed").increment(1);
            }
            2 => {
                tracing::warn!(action = %template.key.action, first = %runs[0].0, second = %runs[1].0, "two workers disagree on an action; asking a third");
                metrics::counter!("paddock_verifications_total", "result" => "disputed")
                    .increment(1);
                self.verify(state, template, runs);
            }
            _ => {
                let odd = if agree(2, 0) {
                    Some(1)
                } else if agree(2, 1) {
                    Some(0)
                } else {
                    None
                };
                let Some(odd) = odd else {
                    tracing::info!(action = %template.key.action, "three runs, three results: the action is not deterministic");
                    metrics::counter!("paddock_verifications_total", "result" => "undecided")
                        .increment(1);
                    return;
                };
                let culprit = runs[odd].0.clone();
                tracing::warn!(action = %template.key.action, worker = %culprit, "a worker's result differs from what two others agree on");
                metrics::counter!("paddock_verifications_total", "result" => "disagreement")
                    .increment(1);
                if odd == 0 {
                    // The cached result was the odd one: the majority's replaces it.
                    let (cache, key, result) = (
                        self.action_cache.clone(),
                        template.key.clone(),
                        runs[2].2.clone(),
                    );
                    tokio::spawn(async move {
                        if let Err(e) = cache.put(&key, &result).await {
                            tracing::warn!(action = %key.action, error = %e, "could not replace a disputed ActionCache entry");
                        }
                    });
                }
                let transition = state.fleet.record(&culprit, Outcome::Disagreement);
                self.transition(transition);
            }
        }
    }
}
