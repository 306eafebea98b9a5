//! The scheduler's policy on a clock the tests move: fairness, priorities,
//! retries, lease expiry, quarantine and release, speculation, orphans and
//! retention, with workers that are in-process sessions (no transport, no
//! processes) and a memory CAS and ActionCache.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use paddock_cas::{ActionCache, BlobStore, MemoryActionCache, MemoryStore, WithEmptyBlob};
use paddock_config::{SchedulerConfig, Span};
use paddock_proto::worker::v1 as wire;
use paddock_reapi::proto::re::{
    Action, ActionResult, Command, ExecuteRequest, ExecutionPolicy, OutputFile,
};
use paddock_reapi::Digest;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Code;

use crate::clock::{Clock, ManualClock};
use crate::{Bounds, OperationWatch, Requester, Scheduler, Stage};

struct Farm {
    scheduler: Scheduler,
    clock: Arc<ManualClock>,
    cas: Arc<dyn BlobStore>,
    action_cache: Arc<dyn ActionCache>,
}

impl Farm {
    async fn new(config: SchedulerConfig) -> Farm {
        let cas = Arc::new(WithEmptyBlob::new(Arc::new(MemoryStore::new())));
        Farm::with(config, cas, crate::Lasting::default()).await
    }

    /// A farm over `cas` whose state outlives it as `lasting` says, with the
    /// scheduler's timers (and journal writer) running.
    async fn with(
        config: SchedulerConfig,
        cas: Arc<dyn BlobStore>,
        lasting: crate::Lasting,
    ) -> Farm {
        let clock = Arc::new(ManualClock::new());
        let action_cache: Arc<dyn ActionCache> = Arc::new(MemoryActionCache::new(10_000));
        let bounds = Bounds {
            max_tree_directories: 1_000,
            max_executions: 10_000,
            max_finished_operations: 10_000,
            max_worker_names: 100,
        };
        let scheduler = Scheduler::with_clock(
            config,
            cas.clone(),
            action_cache.clone(),
            bounds,
            lasting,
            clock.clone(),
        )
        .await
        .expect("a scheduler with readable saved state");
        tokio::spawn(scheduler.clone().run());
        Farm {
            scheduler,
            clock,
            cas,
            action_cache,
        }
    }

    /// Uploads a distinct action running `program` and returns its digest.
    async fn action(&self, program: &str, tag: &str, cacheable: bool) -> Digest {
        self.action_on(program, tag, cacheable, &[]).await
    }

    /// [`Farm::action`], needing `platform`.
    async fn action_on(
        &self,
        program: &str,
        tag: &str,
        cacheable: bool,
        platform: &[(&str, &str)],
    ) -> Digest {
        let properties = platform
            .iter()
            .map(
                |(name, value)| paddock_reapi::proto::re::platform::Property {
                    name: (*name).into(),
                    value: (*value).into(),
                },
            )
            .collect();
        let command = Command {
            arguments: vec![program.into(), tag.into()],
            ..Default::default()
        }
        .encode_to_vec();
        let command_digest = Digest::of(&command);
        let action = Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(Digest::of(b"").to_proto()),
            do_not_cache: !cacheable,
            platform: Some(paddock_reapi::proto::re::Platform { properties }),
            ..Default::default()
        }
        .encode_to_vec();
        let digest = Digest::of(&action);
        self.cas.put(&command_digest, command.into()).await.unwrap();
        self.cas.put(&digest, action.into()).await.unwrap();
        digest
    }

    async fn execute(&self, action: Digest, priority: i32, invocation: &str) -> OperationWatch {
        let request = ExecuteRequest {
            action_digest: Some(action.to_proto()),
            execution_policy: Some(ExecutionPolicy { priority }),
            ..Default::default()
        };
        let requester = Requester {
            identity: "alice".into(),
            invocation: invocation.into(),
            mnemonic: "Test".into(),
        };
        self.scheduler.execute(request, requester).await.unwrap()
    }

    /// Moves the clock on and runs the periodic sweep, as the server's timer would.
    fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.scheduler.inner.sweep();
    }

    /// Lets `by` pass a second at a time, the `alive` workers beating each second
    /// (a worker not among them falls silent).
    async fn pass(&self, by: Duration, alive: &[&Worker]) {
        let mut left = by;
        while !left.is_zero() {
            let step = left.min(Duration::from_secs(1));
            left -= step;
            for worker in alive {
                worker.heartbeat(self).await;
            }
            self.advance(step);
        }
    }

    fn standing(&self, worker: &str) -> String {
        let reports = self.scheduler.workers();
        let report = reports.iter().find(|w| w.name == worker).unwrap();
        report.standing.clone()
    }
}

/// A worker session driven by the test.
struct Worker {
    name: String,
    session: u64,
    outbound: mpsc::UnboundedReceiver<wire::SchedulerMessage>,
    /// What it was given and has not answered (its heartbeats list these).
    running: Vec<String>,
}

impl Worker {
    async fn connect(farm: &Farm, name: &str, capacity: u32) -> Worker {
        Worker::offering(farm, name, capacity, &[]).await
    }

    /// A worker in pool `linux` that also offers `properties`.
    async fn offering(
        farm: &Farm,
        name: &str,
        capacity: u32,
        properties: &[(&str, &str)],
    ) -> Worker {
        let mut offered = vec![wire::Property {
            name: "Pool".into(),
            value: "linux".into(),
        }];
        offered.extend(properties.iter().map(|(name, value)| wire::Property {
            name: (*name).into(),
            value: (*value).into(),
        }));
        let register = wire::Register {
            name: name.into(),
            properties: offered,
            capacity,
        };
        let connection = farm
            .scheduler
            .connect_worker(register, "workers", Arc::new(|_: &str| true))
            .await
            .unwrap();
        Worker {
            name: name.into(),
            session: connection.session,
            outbound: connection.outbound,
            running: Vec::new(),
        }
    }

    /// Assignments (and cancellations) sent so far and not yet taken.
    fn inbox(&mut self) -> (Vec<wire::Assignment>, Vec<String>) {
        use wire::scheduler_message::Message as M;
        let (mut assigned, mut cancelled) = (Vec::new(), Vec::new());
        while let Ok(message) = self.outbound.try_recv() {
            match message.message {
                Some(M::Assignment(a)) => {
                    self.running.push(a.assignment_id.clone());
                    assigned.push(a);
                }
                Some(M::Cancel(c)) => {
                    self.running.retain(|r| *r != c.assignment_id);
                    cancelled.push(c.assignment_id);
                }
                _ => {}
            }
        }
        (assigned, cancelled)
    }

    fn assignments(&mut self) -> Vec<wire::Assignment> {
        self.inbox().0
    }

    /// The one assignment sent since last asked.
    fn assignment(&mut self) -> wire::Assignment {
        let mut assigned = self.assignments();
        assert_eq!(assigned.len(), 1, "{} expected one assignment", self.name);
        assigned.remove(0)
    }

    async fn send(&self, farm: &Farm, message: wire::worker_message::Message) {
        farm.scheduler
            .worker_message(
                self.session,
                wire::WorkerMessage {
                    message: Some(message),
                },
            )
            .await;
    }

    /// Runs an assignment as a real worker would, given what the tests' commands
    /// are: the synthetic canary writes its line to `canary.txt`; anything else
    /// exits 0 with no outputs.
    async fn succeed(&mut self, farm: &Farm, assignment: &wire::Assignment) {
        let command = Command::decode(assignment.command.as_slice()).unwrap();
        let mut result = ActionResult::default();
        if command.output_paths == ["canary.txt"] {
            let script = &command.arguments[2];
            let line = script
                .strip_prefix("printf '")
                .and_then(|s| s.strip_suffix("' > canary.txt"))
                .unwrap()
                .replace("\\n", "\n");
            let digest = Digest::of(line.as_bytes());
            farm.cas.put(&digest, Bytes::from(line)).await.unwrap();
            result.output_files.push(OutputFile {
                path: "canary.txt".into(),
                digest: Some(digest.to_proto()),
                ..Default::default()
            });
        }
        self.complete(farm, assignment, result).await;
    }

    async fn complete(&mut self, farm: &Farm, assignment: &wire::Assignment, result: ActionResult) {
        use wire::finished::Outcome;
        self.running.retain(|r| *r != assignment.assignment_id);
        let completed = wire::Completed {
            action_result: result.encode_to_vec(),
            ..Default::default()
        };
        self.send(
            farm,
            wire::worker_message::Message::Finished(wire::Finished {
                assignment_id: assignment.assignment_id.clone(),
                outcome: Some(Outcome::Completed(completed)),
            }),
        )
        .await;
    }

    /// Fails an assignment as the worker's own fault (a broken disk, say).
    async fn fail(&mut self, farm: &Farm, assignment: &wire::Assignment) {
        use wire::finished::Outcome;
        self.running.retain(|r| *r != assignment.assignment_id);
        let failed = wire::Failed {
            code: Code::Internal as i32,
            message: "the worker's disk failed".into(),
            fault: wire::Fault::Worker as i32,
            ..Default::default()
        };
        self.send(
            farm,
            wire::worker_message::Message::Finished(wire::Finished {
                assignment_id: assignment.assignment_id.clone(),
                outcome: Some(Outcome::Failed(failed)),
            }),
        )
        .await;
    }

    async fn heartbeat(&self, farm: &Farm) {
        let beat = wire::Heartbeat {
            running: self.running.clone(),
            cache: None,
        };
        self.send(farm, wire::worker_message::Message::Heartbeat(beat))
            .await;
    }
}

fn action_of(assignment: &wire::Assignment) -> Digest {
    let digest = assignment.action_digest.as_ref().unwrap();
    Digest::parse(&digest.hash, digest.size_bytes).unwrap()
}

fn response(watch: &OperationWatch) -> Option<Arc<paddock_reapi::proto::re::ExecuteResponse>> {
    let snapshot = watch.updates.borrow();
    (snapshot.stage == Stage::Completed).then(|| snapshot.response.clone().unwrap())
}

fn code(watch: &OperationWatch) -> Option<i32> {
    response(watch).map(|r| r.status.as_ref().map_or(0, |s| s.code))
}

#[tokio::test]
async fn priority_first_then_invocations_in_turn_then_arrival() {
    let farm = Farm::new(SchedulerConfig::default()).await;
    let mut names = std::collections::HashMap::new();
    let mut watches = Vec::new();
    for (tag, priority, invocation) in [
        ("big-1", 0, "big"),
        ("big-2", 0, "big"),
        ("big-3", 0, "big"),
        ("small-1", 0, "small"),
        ("urgent", -5, "other"),
        ("small-2", 0, "small"),
        ("idle", 10, "big"),
    ] {
        let action = farm.action("true", tag, false).await;
        names.insert(action, tag);
        watches.push(farm.execute(action, priority, invocation).await);
    }
    let mut worker = Worker::connect(&farm, "w", 1).await;
    let mut order = Vec::new();
    for _ in 0..watches.len() {
        let assignment = worker.assignment();
        order.push(names[&action_of(&assignment)]);
        worker.succeed(&farm, &assignment).await;
    }
    assert_eq!(
        order,
        ["urgent", "big-1", "small-1", "big-2", "small-2", "big-3", "idle"]
    );
    assert!(watches.iter().all(|w| code(w) == Some(0)));
}

#[tokio::test]
async fn a_silent_workers_lease_expires_and_its_action_is_answered_once_elsewhere() {
    let farm = Farm::new(SchedulerConfig::default()).await;
    let mut a = Worker::connect(&farm, "a", 1).await;
    let action = farm.action("true", "lease", true).await;
    let watch = farm.execute(action, 0, "build").await;
    let first = a.assignment();
    let mut b = Worker::connect(&farm, "b", 1).await;
    // B keeps beating; A falls silent. Within the heartbeat timeout nothing moves.
    farm.pass(Duration::from_secs(10), &[&b]).await;
    assert!(b.assignments().is_empty(), "A's lease has not expired yet");
    farm.pass(Duration::from_secs(1), &[&b]).await;
    let second = b.assignment();
    assert_eq!(action_of(&second), action);
    assert_eq!(code(&watch), None);
    // A's result arrives late: it is discarded, and B's answers the operation.
    let stale = ActionResult {
        exit_code: 7,
        ..Default::default()
    };
    a.complete(&farm, &first, stale).await;
    assert_eq!(code(&watch), None, "a lost session's result is not taken");
    b.succeed(&farm, &second).await;
    let answer = response(&watch).unwrap();
    assert_eq!(answer.result.as_ref().unwrap().exit_code, 0);
    assert_eq!(farm.standing("a"), "active", "one loss is not an anomaly");
    let key = paddock_cas::ActionKey {
        instance: String::new(),
        action,
    };
    let cached = farm.action_cache.get(&key).await.unwrap().unwrap();
    assert_eq!(cached.exit_code, 0);
}

#[tokio::test]
async fn a_worker_fault_is_retried_elsewhere_until_max_attempts() {
    let config = SchedulerConfig {
        max_attempts: 3,
        ..Default::default()
    };
    let farm = Farm::new(config).await;
    let mut workers = Vec::new();
    for name in ["a", "b", "c", "d"] {
        workers.push(Worker::connect(&farm, name, 1).await);
    }
    let action = farm.action("true", "flaky", false).await;
    let watch = farm.execute(action, 0, "build").await;
    let mut tried = Vec::new();
    for _ in 0..3 {
        assert_eq!(code(&watch), None);
        let (i, assignment) = workers
            .iter_mut()
            .enumerate()
            .find_map(|(i, w)| w.assignments().pop().map(|a| (i, a)))
            .expect("the action went somewhere");
        tried.push(workers[i].name.clone());
        workers[i].fail(&farm, &assignment).await;
    }
    tried.sort();
    tried.dedup();
    assert_eq!(
        tried.len(),
        3,
        "each retry goes to a worker that has not failed it"
    );
    assert_eq!(code(&watch), Some(Code::Unavailable as i32));
    assert!(workers.iter_mut().all(|w| w.assignments().is_empty()));
}

#[tokio::test]
async fn a_failing_worker_is_quarantined_then_probed_and_released_on_the_clock() {
    let mut config = SchedulerConfig::default();
    config.quarantine.min_samples = 8;
    config.quarantine.canaries = 2;
    config.quarantine.cooldown = Span::secs(300);
    let farm = Farm::new(config).await;
    let mut good = Vec::new();
    for name in ["good-1", "good-2", "good-3"] {
        good.push(Worker::connect(&farm, name, 1).await);
    }
    let mut bad = Worker::connect(&farm, "bad", 1).await;
    // Work for everyone; the bad worker fails all of its own (each retried elsewhere).
    let mut round = 0;
    while farm.standing("bad") == "active" {
        assert!(round < 40, "never quarantined");
        round += 1;
        let mut watches = Vec::new();
        for i in 0..4 {
            let action = farm.action("true", &format!("{round}-{i}"), true).await;
            watches.push(farm.execute(action, 0, "build").await);
        }
        while watches.iter().any(|w| code(w).is_none()) {
            for assignment in bad.assignments() {
                bad.fail(&farm, &assignment).await;
            }
            for worker in &mut good {
                for assignment in worker.assignments() {
                    worker.succeed(&farm, &assignment).await;
                }
            }
        }
        assert!(watches.iter().all(|w| code(w) == Some(0)));
    }
    assert_eq!(farm.standing("bad"), "quarantined");
    // Quarantined: clients' work goes to the others.
    let action = farm.action("true", "after", false).await;
    let watch = farm.execute(action, 0, "build").await;
    assert!(bad.assignments().is_empty());
    for worker in &mut good {
        for assignment in worker.assignments() {
            worker.succeed(&farm, &assignment).await;
        }
    }
    assert_eq!(code(&watch), Some(0));
    // Not probed before its cool-down is over.
    let everyone = [&good[0], &good[1], &good[2], &bad];
    farm.pass(Duration::from_secs(299), &everyone).await;
    assert_eq!(farm.standing("bad"), "quarantined");
    farm.pass(Duration::from_secs(2), &everyone).await;
    assert_eq!(farm.standing("bad"), "probing");
    // Its canaries: a real action a healthy worker ran, and a synthetic one. It
    // gets nothing else while probed.
    let mut canaries = Vec::new();
    while canaries.len() < 2 {
        let assigned = bad.assignments();
        assert!(!assigned.is_empty(), "canaries come one at a time");
        for assignment in assigned {
            bad.succeed(&farm, &assignment).await;
            canaries.push(assignment);
        }
    }
    assert_eq!(
        farm.standing("bad"),
        "active",
        "released after its canaries"
    );
}

#[tokio::test]
async fn a_failed_canary_doubles_the_cool_down() {
    let mut config = SchedulerConfig::default();
    config.quarantine.canaries = 1;
    config.quarantine.cooldown = Span::secs(100);
    let farm = Farm::new(config).await;
    let mut w = Worker::connect(&farm, "w", 1).await;
    // Quarantined as the statistics would, due for probing at once.
    let standing = crate::health::Standing::Quarantined {
        manual: false,
        probe_at: Some(farm.clock.now()),
        strikes: 0,
    };
    farm.scheduler
        .inner
        .state
        .lock()
        .fleet
        .set("w", standing, "anomalous".into());
    farm.advance(Duration::from_millis(1));
    assert_eq!(farm.standing("w"), "probing");
    let canary = w.assignment();
    let wrong = ActionResult::default(); // no canary.txt
    w.complete(&farm, &canary, wrong).await;
    assert_eq!(farm.standing("w"), "quarantined");
    farm.pass(Duration::from_secs(199), &[&w]).await;
    assert_eq!(farm.standing("w"), "quarantined", "200 s after one strike");
    farm.pass(Duration::from_secs(2), &[&w]).await;
    assert_eq!(farm.standing("w"), "probing");
    let canary = w.assignment();
    w.succeed(&farm, &canary).await;
    assert_eq!(farm.standing("w"), "active");
}

#[tokio::test]
async fn a_straggler_gets_a_speculative_copy_and_the_first_result_wins() {
    let mut config = SchedulerConfig::default();
    config.speculation.enabled = true;
    config.speculation.min_samples = 2;
    config.speculation.multiple = 3.0;
    config.speculation.min_runtime = Span::secs(5);
    let farm = Farm::new(config).await;
    let mut slow = Worker::connect(&farm, "slow", 1).await;
    // Two similar actions take 4 s each.
    for i in 0..2 {
        let action = farm.action("compile", &format!("quick-{i}"), false).await;
        let watch = farm.execute(action, 0, "build").await;
        let assignment = slow.assignment();
        farm.pass(Duration::from_secs(4), &[&slow]).await;
        slow.succeed(&farm, &assignment).await;
        assert_eq!(code(&watch), Some(0));
    }
    let action = farm.action("compile", "slow", false).await;
    let watch = farm.execute(action, 0, "build").await;
    let straggler = slow.assignment();
    let mut fast = Worker::connect(&farm, "fast", 1).await;
    // Three times the median is 12 s: no copy before.
    farm.pass(Duration::from_secs(12), &[&slow, &fast]).await;
    assert!(fast.assignments().is_empty(), "no copy within 12 s");
    farm.pass(Duration::from_secs(1), &[&slow, &fast]).await;
    let copy = fast.assignment();
    assert_eq!(action_of(&copy), action);
    fast.succeed(&farm, &copy).await;
    assert_eq!(code(&watch), Some(0), "the copy answered");
    let (_, cancelled) = slow.inbox();
    assert_eq!(
        cancelled,
        [straggler.assignment_id],
        "the straggler is stopped"
    );
}

#[tokio::test]
async fn an_execution_nobody_waits_for_is_cancelled_after_the_grace() {
    let config = SchedulerConfig {
        orphan_grace: Span::secs(10),
        ..Default::default()
    };
    let farm = Farm::new(config).await;
    let mut w = Worker::connect(&farm, "w", 1).await;
    let action = farm.action("true", "orphan", false).await;
    let watch = farm.execute(action, 0, "build").await;
    let name = watch.updates.borrow().name.clone();
    let assignment = w.assignment();
    drop(watch);
    farm.pass(Duration::from_secs(9), &[&w]).await;
    // A client re-attaching within the grace keeps it alive.
    let again = farm.scheduler.watch(&name).await.unwrap();
    farm.pass(Duration::from_secs(20), &[&w]).await;
    assert!(w.inbox().1.is_empty());
    drop(again);
    farm.pass(Duration::from_secs(10), &[&w]).await;
    assert!(w.inbox().1.is_empty(), "not before the grace is over");
    farm.pass(Duration::from_secs(1), &[&w]).await;
    let (_, cancelled) = w.inbox();
    assert_eq!(cancelled, [assignment.assignment_id]);
    let snapshot = farm.scheduler.get(&name).await.unwrap();
    let status = snapshot.response.unwrap().status.clone().unwrap();
    assert_eq!(status.code, Code::Cancelled as i32);
}

#[tokio::test]
async fn finished_operations_are_kept_for_their_retention() {
    let config = SchedulerConfig {
        operation_retention: Span::secs(600),
        ..Default::default()
    };
    let farm = Farm::new(config).await;
    let mut w = Worker::connect(&farm, "w", 1).await;
    let action = farm.action("true", "kept", false).await;
    let watch = farm.execute(action, 0, "build").await;
    let name = watch.updates.borrow().name.clone();
    let assignment = w.assignment();
    w.succeed(&farm, &assignment).await;
    farm.pass(Duration::from_secs(599), &[&w]).await;
    assert!(farm.scheduler.get(&name).await.is_some());
    farm.pass(Duration::from_secs(2), &[&w]).await;
    assert!(farm.scheduler.get(&name).await.is_none());
}

#[tokio::test]
async fn queued_executions_and_their_operations_outlive_the_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let lasting = || crate::Lasting {
        executions: Some(crate::ExecutionJournal::in_directory(dir.path())),
        ..Default::default()
    };
    let cas: Arc<dyn BlobStore> = Arc::new(WithEmptyBlob::new(Arc::new(MemoryStore::new())));
    let farm = Farm::with(SchedulerConfig::default(), cas.clone(), lasting()).await;
    let merged = farm.action("true", "merged", true).await;
    let cancelled = farm.action("true", "cancelled", false).await;
    let deleted = farm.action("true", "deleted", false).await;
    let gone = farm.action("true", "gone", false).await;
    let mut names = Vec::new();
    for action in [merged, merged, cancelled, deleted, gone] {
        let watch = farm.execute(action, 0, "build").await;
        names.push(watch.updates.borrow().name.clone());
    }
    assert!(farm.scheduler.cancel(&names[2]).await.unwrap());
    assert!(farm.scheduler.delete(&names[3]).await.unwrap());
    let change = farm.scheduler.inner.state.lock().unjournaled.changes();
    farm.scheduler.inner.journaled(change).await;
    drop(farm);
    // The action of one execution leaves the CAS while the scheduler is down.
    cas.delete(&gone).await.unwrap();

    let farm = Farm::with(SchedulerConfig::default(), cas, lasting()).await;
    for name in &names[..2] {
        let snapshot = farm.scheduler.get(name).await.expect("kept by name");
        assert_eq!(snapshot.stage, Stage::Queued);
        assert_eq!(snapshot.action_digest, merged);
    }
    assert!(farm.scheduler.get(&names[2]).await.is_none(), "cancelled");
    assert!(farm.scheduler.get(&names[3]).await.is_none(), "deleted");
    let answered = farm.scheduler.get(&names[4]).await.unwrap();
    let status = answered.response.unwrap().status.clone().unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    // A client re-attaches; a worker runs the merged execution once, and the deleted
    // operation's execution, which runs on for the cache.
    let watch = farm.scheduler.watch(&names[0]).await.unwrap();
    let mut worker = Worker::connect(&farm, "w", 4).await;
    let assigned = worker.assignments();
    let mut ran: Vec<Digest> = assigned.iter().map(action_of).collect();
    ran.sort();
    let mut expected = vec![merged, deleted];
    expected.sort();
    assert_eq!(ran, expected);
    for assignment in &assigned {
        worker.succeed(&farm, assignment).await;
    }
    assert_eq!(code(&watch), Some(0));
    let other = farm.scheduler.get(&names[1]).await.unwrap();
    assert_eq!(other.stage, Stage::Completed);
    // Nothing is left to take back a third time.
    let change = farm.scheduler.inner.state.lock().unjournaled.changes();
    farm.scheduler.inner.journaled(change).await;
    let left = crate::ExecutionJournal::in_directory(dir.path())
        .load()
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_free_worker_takes_work_it_can_run_however_deep_the_rest_is() {
    let farm = Farm::new(SchedulerConfig::default()).await;
    let gpu = [("gpu", "a100")];
    let mut names = std::collections::HashMap::new();
    let mut watches = Vec::new();
    // Plenty of work only GPU workers can run, queued first and more urgent...
    for i in 0..50 {
        let action = farm
            .action_on("train", &format!("gpu-{i}"), false, &gpu)
            .await;
        watches.push(farm.execute(action, -1, "ml").await);
    }
    // ...then work any worker can run.
    for (tag, priority) in [("late-urgent", -1), ("plain-1", 0), ("plain-2", 0)] {
        let action = farm.action("true", tag, false).await;
        names.insert(action, tag);
        watches.push(farm.execute(action, priority, "build").await);
    }
    let mut cpu = Worker::connect(&farm, "cpu", 1).await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let assignment = cpu.assignment();
        order.push(names[&action_of(&assignment)]);
        cpu.succeed(&farm, &assignment).await;
    }
    assert_eq!(order, ["late-urgent", "plain-1", "plain-2"]);
    assert!(cpu.assignments().is_empty(), "nothing it cannot run");
    // A GPU worker can run both kinds: the more urgent first, then the first queued.
    farm.scheduler.worker_gone(cpu.session);
    let plain = farm.action("true", "plain-3", false).await;
    names.insert(plain, "plain-3");
    watches.push(farm.execute(plain, -1, "build").await);
    let mut trainer = Worker::offering(&farm, "trainer", 1, &gpu).await;
    let first = trainer.assignment();
    assert_ne!(action_of(&first), plain, "the GPU work was queued first");
    trainer.succeed(&farm, &first).await;
    for _ in 0..49 {
        let assignment = trainer.assignment();
        trainer.succeed(&farm, &assignment).await;
    }
    let last = trainer.assignment();
    assert_eq!(action_of(&last), plain);
    trainer.succeed(&farm, &last).await;
    assert!(watches.iter().all(|w| code(w) == Some(0)));
}
