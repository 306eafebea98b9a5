//! What the farm remembers of recent builds, for people to look at: invocations (a
//! tool's run, named by RequestMetadata's `tool_invocation_id`), the actions each was
//! served and how (run on a worker, or from the cache), the targets and tests Bazel
//! reported through its build events, throughput by minute, queue depth by pool, and
//! the fleet's changes of standing.
//!
//! Everything is bounded ([`HistoryConfig`]): invocations by count and by age (the
//! least recently heard of go first), actions and targets per invocation by count
//! (later ones are counted, not kept), and the time series to a day of minutes. The
//! history lives in the server's memory; it is a view for people, never an input to
//! a decision about caching or scheduling.

mod entry;
mod file;
mod keeping;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use paddock_config::HistoryConfig;
use paddock_reapi::proto::re::{ActionResult, RequestMetadata};
use paddock_reapi::Digest;
use parking_lot::Mutex;
use prost::Message;
use serde::{Deserialize, Serialize};

pub use entry::{without_replaced, ActionEntry, BuildEntry, Entry, HealthEntry, QueueDepth};
pub use file::HistoryFile;
pub use keeping::{keep, HistoryStore, HistoryStoreError};

/// The minutes of throughput and queue depth kept: a day.
const MINUTES_KEPT: usize = 24 * 60;
/// Changes of standing kept.
const STANDING_CHANGES_KEPT: usize = 1000;
/// Samples of each worker's health kept (one a minute): an hour.
const HEALTH_SAMPLES_KEPT: usize = 60;
/// Changes waiting to be handed to the store at most; past it, the oldest go.
const UNSAVED_KEPT: usize = 100_000;
/// How often an unfinished build's report is taken for the store at most.
const BUILD_SAVED_EVERY: Duration = Duration::from_secs(30);
/// How far ahead of this server's clock a change may be dated and still be taken:
/// a server whose clock runs far ahead must not push every minute out of the charts.
pub const FUTURE_SLACK: Duration = Duration::from_secs(300);
/// Executions remembered per instance and mnemonic as candidates for "the same
/// action, earlier".
const EXECUTIONS_KEPT_PER_MNEMONIC: usize = 10_000;
/// Distinct (instance, mnemonic) lists kept before unused ones are dropped.
const MNEMONICS_KEPT: usize = 10_000;
/// Longest invocation id, mnemonic or tool name kept, in bytes.
pub const MAX_NAME: usize = 256;
/// Longest label, target or message kept, in bytes.
pub const MAX_TEXT: usize = 4096;
/// Largest ActionResult kept whole (encoded); larger ones are kept in part.
const MAX_RESULT_KEPT: usize = 64 << 10;

/// How an action was served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Run on a worker; the command exited with this code.
    Executed { exit_code: i32 },
    /// Answered from the ActionCache.
    Cached,
    /// Not run to completion: the gRPC status the client was given.
    Failed { code: String, message: String },
}

impl Outcome {
    /// A short word for pages and filters.
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Executed { exit_code: 0 } => "executed",
            Outcome::Executed { .. } => "exited non-zero",
            Outcome::Cached => "cached",
            Outcome::Failed { .. } => "failed",
        }
    }

    fn failed(&self) -> bool {
        !matches!(self, Outcome::Executed { exit_code: 0 } | Outcome::Cached)
    }
}

/// Who asked for an action, and what their client said about it.
#[derive(Debug, Clone, Default)]
pub struct Asker {
    pub instance: String,
    pub identity: String,
    pub metadata: RequestMetadata,
}

/// One action served within an invocation.
#[derive(Debug, Clone)]
pub struct ActionRecord {
    /// Increases with every record the history takes: later is larger.
    pub seq: u64,
    pub digest: Digest,
    pub instance: String,
    pub identity: String,
    pub invocation: String,
    pub mnemonic: String,
    pub target: String,
    pub outcome: Outcome,
    pub at: SystemTime,
    /// What the worker or the cache answered, when there was an answer.
    pub result: Option<Arc<ActionResult>>,
}

/// A target Bazel reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetState {
    pub kind: String,
    /// `None` until Bazel says whether it built.
    pub success: Option<bool>,
}

/// A test Bazel reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestState {
    /// Bazel's word: `PASSED`, `FAILED`, `FLAKY`, `TIMEOUT`, …
    pub status: String,
    pub attempts: u32,
    pub duration: Option<Duration>,
    pub cached: bool,
    /// Each log Bazel named (`test.log`, `test.xml`, …) with its URI
    /// (`bytestream://…/blobs/HASH/SIZE` when the farm holds it).
    pub logs: Vec<(String, String)>,
}

/// What Bazel's build events told of an invocation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BuildReport {
    pub command: String,
    pub patterns: Vec<String>,
    pub tool_version: String,
    pub started: Option<SystemTime>,
    pub finished: Option<SystemTime>,
    /// Bazel's exit code name (`SUCCESS`, `BUILD_FAILURE`, …) once finished.
    pub exit: Option<String>,
    pub targets: BTreeMap<String, TargetState>,
    pub tests: BTreeMap<String, TestState>,
    /// Targets and tests not kept because of the bound.
    pub dropped: u64,
}

/// One invocation, as much of it as is kept.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub id: String,
    pub identity: String,
    pub instance: String,
    pub tool: String,
    pub first_seen: Option<SystemTime>,
    pub last_seen: Option<SystemTime>,
    pub executed: u64,
    pub cached: u64,
    pub failed: u64,
    /// Actions served but not kept because of the bound.
    pub dropped: u64,
    /// Shared, so that a page copies the list without copying the records.
    pub actions: Vec<Arc<ActionRecord>>,
    pub build: Option<BuildReport>,
}

impl Invocation {
    /// From the first action or event to the last heard of.
    pub fn duration(&self) -> Duration {
        let start = [self.first_seen, self.build.as_ref().and_then(|b| b.started)]
            .into_iter()
            .flatten()
            .min();
        let end = [self.last_seen, self.build.as_ref().and_then(|b| b.finished)]
            .into_iter()
            .flatten()
            .max();
        match (start, end) {
            (Some(s), Some(e)) => e.duration_since(s).unwrap_or_default(),
            _ => Duration::ZERO,
        }
    }
}

/// An invocation's summary for lists.
#[derive(Debug, Clone)]
pub struct InvocationSummary {
    pub id: String,
    pub identity: String,
    pub instance: String,
    pub tool: String,
    pub first_seen: Option<SystemTime>,
    pub duration: Duration,
    pub executed: u64,
    pub cached: u64,
    pub failed: u64,
    /// Bazel's exit name, when build events said it.
    pub exit: Option<String>,
}

/// Throughput and queue depth in one minute.
#[derive(Debug, Clone, Default)]
pub struct Minute {
    /// Whole minutes since the Unix epoch.
    pub minute: u64,
    pub executed: u64,
    pub cached: u64,
    pub failed: u64,
    /// The deepest queue seen in the minute, by pool.
    pub queued: BTreeMap<String, u64>,
}

/// A worker's change of standing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StandingChange {
    pub worker: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub at: SystemTime,
}

/// One sample of a worker's health window: outcomes and failures in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSample {
    pub outcomes: u64,
    pub failures: u64,
}

/// The history. Cheap to share; every method takes the lock briefly.
pub struct History {
    config: HistoryConfig,
    /// Whether changes are collected for a store.
    journaled: bool,
    inner: Mutex<Inner>,
}

/// An invocation as the history keys it: its identity, then its id. Two identities
/// using the same id have two invocations, so nobody can add to another's.
type Key = (String, String);

#[derive(Default)]
struct Inner {
    seq: u64,
    invocations: HashMap<Key, Invocation>,
    /// Where each action digest was recorded: by invocation, indexes in its actions.
    by_action: HashMap<Digest, HashMap<Key, Vec<usize>>>,
    /// Executed actions by (instance, mnemonic), oldest first: (invocation, index).
    executions: HashMap<(String, String), VecDeque<(Key, usize)>>,
    minutes: VecDeque<Minute>,
    standing: VecDeque<StandingChange>,
    health: BTreeMap<String, VecDeque<HealthSample>>,
    /// Changes made here and not yet taken for the store (when journaled).
    unsaved: VecDeque<Entry>,
    /// Invocations whose build report changed since it was last taken: the report
    /// is taken whole, at most every [`BUILD_SAVED_EVERY`] unless it is finished,
    /// so that a long build's events make few entries.
    changed_builds: HashSet<Key>,
    /// When each invocation's report was last taken.
    builds_saved: HashMap<Key, Instant>,
    /// Changes dropped because the store fell too far behind.
    unsaved_lost: u64,
}

fn unix_minute(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 60
}

/// Cuts `text` to at most `max` bytes, at a character boundary.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// What is kept of a result: all of it when small; otherwise what the pages need
/// most (exit code, timings and worker, the streams' digests).
fn kept(result: Arc<ActionResult>) -> Arc<ActionResult> {
    let mut result = result;
    if !result.stdout_raw.is_empty() || !result.stderr_raw.is_empty() {
        let r = Arc::make_mut(&mut result);
        r.stdout_raw.clear();
        r.stderr_raw.clear();
    }
    if result.encoded_len() <= MAX_RESULT_KEPT {
        return result;
    }
    Arc::new(ActionResult {
        exit_code: result.exit_code,
        stdout_digest: result.stdout_digest.clone(),
        stderr_digest: result.stderr_digest.clone(),
        execution_metadata: result.execution_metadata.clone(),
        ..ActionResult::default()
    })
}

impl Inner {
    /// The minute of `at`, kept in order: a change that arrives late (another
    /// server's, or one read back) lands in its own minute. `None` for a minute
    /// older than a day before the newest.
    fn minute(&mut self, at: SystemTime) -> Option<&mut Minute> {
        let minute = unix_minute(at);
        let newest = self.minutes.back().map_or(0, |m| m.minute);
        if minute > newest || self.minutes.is_empty() {
            self.minutes.push_back(Minute {
                minute,
                ..Minute::default()
            });
            while self
                .minutes
                .front()
                .is_some_and(|m| m.minute + MINUTES_KEPT as u64 <= minute)
            {
                self.minutes.pop_front();
            }
            return self.minutes.back_mut();
        }
        if minute + MINUTES_KEPT as u64 <= newest {
            return None;
        }
        let index = match self.minutes.binary_search_by_key(&minute, |m| m.minute) {
            Ok(index) => index,
            Err(index) => {
                self.minutes.insert(
                    index,
                    Minute {
                        minute,
                        ..Minute::default()
                    },
                );
                index
            }
        };
        self.minutes.get_mut(index)
    }

    fn forget(&mut self, key: &Key) {
        let Some(gone) = self.invocations.remove(key) else {
            return;
        };
        for action in &gone.actions {
            if let Some(places) = self.by_action.get_mut(&action.digest) {
                places.remove(key);
                if places.is_empty() {
                    self.by_action.remove(&action.digest);
                }
            }
        }
        // Executions of forgotten invocations are skipped when read; the lists of
        // mnemonics nobody uses any more go once there are too many.
        if self.executions.len() > MNEMONICS_KEPT {
            let invocations = &self.invocations;
            self.executions
                .retain(|_, places| places.iter().any(|(k, _)| invocations.contains_key(k)));
        }
    }

    /// Drops invocations past the bounds: too old, then the least recently heard of.
    fn trim(&mut self, config: &HistoryConfig, now: SystemTime, keep: &Key) {
        let too_old = |i: &Invocation| {
            i.last_seen
                .and_then(|seen| now.duration_since(seen).ok())
                .is_some_and(|age| age > config.max_age.get())
        };
        let old: Vec<Key> = self
            .invocations
            .iter()
            .filter(|(k, i)| *k != keep && too_old(i))
            .map(|(k, _)| k.clone())
            .collect();
        for key in old {
            self.forget(&key);
        }
        while self.invocations.len() > config.max_invocations.max(1) {
            let Some(oldest) = self
                .invocations
                .iter()
                .filter(|(k, _)| *k != keep)
                .min_by_key(|(_, i)| i.last_seen)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.forget(&oldest);
        }
    }

    fn invocation(&mut self, config: &HistoryConfig, key: &Key, at: SystemTime) -> &mut Invocation {
        if !self.invocations.contains_key(key) {
            self.invocations.insert(
                key.clone(),
                Invocation {
                    id: key.1.clone(),
                    identity: key.0.clone(),
                    first_seen: Some(at),
                    ..Invocation::default()
                },
            );
            self.trim(config, SystemTime::now(), key);
        }
        let invocation = self
            .invocations
            .get_mut(key)
            .expect("the invocation was just ensured");
        invocation.first_seen = invocation.first_seen.min(Some(at));
        invocation.last_seen = invocation.last_seen.max(Some(at));
        invocation
    }

    fn record(&self, (key, index): &(Key, usize)) -> Option<&ActionRecord> {
        self.invocations
            .get(key)?
            .actions
            .get(*index)
            .map(Arc::as_ref)
    }

    fn apply(&mut self, config: &HistoryConfig, entry: &Entry) {
        match entry {
            Entry::Action(e) => self.apply_action(config, e),
            Entry::Build(e) => {
                let key = (e.identity.clone(), e.invocation.clone());
                let invocation = self.invocation(config, &key, e.at);
                invocation.build = Some(e.report.clone());
                name_tool(invocation);
            }
            Entry::Standing(change) => {
                // Servers sharing the workers' records each see the same change.
                let seen =
                    self.standing.iter().rev().take(100).any(|c| {
                        (&c.worker, &c.to, c.at) == (&change.worker, &change.to, change.at)
                    });
                if seen {
                    return;
                }
                self.standing.push_back(change.clone());
                while self.standing.len() > STANDING_CHANGES_KEPT {
                    self.standing.pop_front();
                }
            }
            Entry::QueueDepth(e) => {
                if let Some(minute) = self.minute(e.at) {
                    let deepest = minute.queued.entry(e.pool.clone()).or_default();
                    *deepest = (*deepest).max(e.queued);
                }
            }
            Entry::Health(e) => {
                let samples = self.health.entry(e.worker.clone()).or_default();
                samples.push_back(e.sample);
                while samples.len() > HEALTH_SAMPLES_KEPT {
                    samples.pop_front();
                }
            }
        }
    }

    fn apply_action(&mut self, config: &HistoryConfig, e: &ActionEntry) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(minute) = self.minute(e.at) {
            match &e.outcome {
                Outcome::Cached => minute.cached += 1,
                o if o.failed() => minute.failed += 1,
                _ => minute.executed += 1,
            }
        }
        let key = (e.identity.clone(), e.invocation.clone());
        let invocation = self.invocation(config, &key, e.at);
        if invocation.instance.is_empty() {
            invocation.instance = e.instance.clone();
        }
        if invocation.tool.is_empty() {
            invocation.tool = e.tool.clone();
        }
        match &e.outcome {
            Outcome::Cached => invocation.cached += 1,
            o if o.failed() => invocation.failed += 1,
            _ => invocation.executed += 1,
        }
        if invocation.actions.len() >= config.max_actions_per_invocation {
            invocation.dropped += 1;
            return;
        }
        let index = invocation.actions.len();
        invocation.actions.push(Arc::new(ActionRecord {
            seq,
            digest: e.digest,
            instance: e.instance.clone(),
            identity: e.identity.clone(),
            invocation: e.invocation.clone(),
            mnemonic: e.mnemonic.clone(),
            target: e.target.clone(),
            outcome: e.outcome.clone(),
            at: e.at,
            result: e.result.clone(),
        }));
        if let Outcome::Executed { .. } = e.outcome {
            let executions = self
                .executions
                .entry((e.instance.clone(), e.mnemonic.clone()))
                .or_default();
            executions.push_back((key.clone(), index));
            if executions.len() > EXECUTIONS_KEPT_PER_MNEMONIC {
                executions.pop_front();
            }
        }
        self.by_action
            .entry(e.digest)
            .or_default()
            .entry(key)
            .or_default()
            .push(index);
    }

    /// Keeps a change made here for the store.
    fn unsaved(&mut self, entry: Entry) {
        if self.unsaved.len() >= UNSAVED_KEPT {
            self.unsaved.pop_front();
            self.unsaved_lost += 1;
        }
        self.unsaved.push_back(entry);
    }
}

/// Bazel's build events name its version; its RequestMetadata may not.
fn name_tool(invocation: &mut Invocation) {
    let Some(report) = &invocation.build else {
        return;
    };
    if !report.tool_version.is_empty() && !invocation.tool.contains(&report.tool_version) {
        invocation.tool = format!("bazel {}", clip(&report.tool_version, MAX_NAME));
    }
}

/// The invocation an asker's actions belong to: its tool's invocation id, or one per
/// instance for clients that send none.
fn invocation_key(asker: &Asker) -> Key {
    let id = match asker.metadata.tool_invocation_id.trim() {
        "" => format!("unnamed:{}", clip(&asker.instance, MAX_NAME)),
        id => clip(id, MAX_NAME),
    };
    (asker.identity.clone(), id)
}

impl History {
    /// A history kept in memory only.
    pub fn new(config: HistoryConfig) -> History {
        History {
            config,
            journaled: false,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A history whose changes are collected for a store ([`keep`] hands them over).
    pub fn journaled(config: HistoryConfig) -> History {
        History {
            journaled: true,
            ..History::new(config)
        }
    }

    /// The bounds it keeps to.
    pub fn config(&self) -> &HistoryConfig {
        &self.config
    }

    /// Applies changes read from a store (at start-up, or another server's), in
    /// their order; those too old for the bounds are passed over.
    pub fn restore(&self, entries: impl IntoIterator<Item = Entry>) {
        let now = SystemTime::now();
        let mut inner = self.inner.lock();
        for entry in entries {
            if self.keeps(&entry, now) {
                inner.apply(&self.config, &entry);
            }
        }
    }

    /// The changes made here since the last call, oldest first (build reports as
    /// they now stand: finished ones, and others at most every 30 s, or all of
    /// them when `all`), and how many were dropped because nobody took them in time.
    pub fn take_unsaved(&self, all: bool) -> (Vec<Entry>, u64) {
        let mut inner = self.inner.lock();
        let changed = std::mem::take(&mut inner.changed_builds);
        let now = SystemTime::now();
        for key in changed {
            let Some(report) = inner.invocations.get(&key).and_then(|i| i.build.clone()) else {
                continue;
            };
            let due = all
                || report.exit.is_some()
                || inner
                    .builds_saved
                    .get(&key)
                    .is_none_or(|at| at.elapsed() >= BUILD_SAVED_EVERY);
            if !due {
                inner.changed_builds.insert(key);
                continue;
            }
            inner.builds_saved.insert(key.clone(), Instant::now());
            inner.unsaved(Entry::Build(BuildEntry {
                at: now,
                identity: key.0,
                invocation: key.1,
                report,
            }));
        }
        if inner.builds_saved.len() > self.config.max_invocations.max(1) * 2 {
            let invocations = &inner.invocations;
            let live: HashSet<Key> = inner
                .builds_saved
                .keys()
                .filter(|k| invocations.contains_key(*k))
                .cloned()
                .collect();
            inner.builds_saved.retain(|k, _| live.contains(k));
        }
        let lost = std::mem::take(&mut inner.unsaved_lost);
        (inner.unsaved.drain(..).collect(), lost)
    }

    /// How long entries of each kind are kept at most, by [`Entry::kind`].
    pub fn retention(&self) -> [(&'static str, Duration); 5] {
        let max_age = self.config.max_age.get();
        [
            ("action", max_age),
            ("build", max_age),
            ("standing", max_age),
            ("queue_depth", Duration::from_secs(60 * MINUTES_KEPT as u64)),
            (
                "health",
                Duration::from_secs(60 * HEALTH_SAMPLES_KEPT as u64),
            ),
        ]
    }

    /// Whether an entry is still young enough for its kind's [`History::retention`].
    /// Entries dated well ahead of this server's clock are not kept either.
    pub fn keeps(&self, entry: &Entry, now: SystemTime) -> bool {
        if entry
            .at()
            .duration_since(now)
            .is_ok_and(|ahead| ahead > FUTURE_SLACK)
        {
            return false;
        }
        let age = now.duration_since(entry.at()).unwrap_or_default();
        self.retention()
            .iter()
            .any(|(kind, kept_for)| *kind == entry.kind() && age <= *kept_for)
    }

    /// Whether `identity`'s invocation `id` is kept.
    pub fn holds(&self, identity: &str, id: &str) -> bool {
        let key = (identity.to_owned(), id.to_owned());
        self.inner.lock().invocations.contains_key(&key)
    }

    fn change(&self, mut entry: Entry) {
        let mut inner = self.inner.lock();
        if let Entry::Action(e) = &mut entry {
            // Past the bound an action is only counted: its result is not kept, in
            // memory or in the store.
            let key = (e.identity.clone(), e.invocation.clone());
            let full = inner
                .invocations
                .get(&key)
                .is_some_and(|i| i.actions.len() >= self.config.max_actions_per_invocation);
            if full {
                e.result = None;
            }
        }
        inner.apply(&self.config, &entry);
        if self.journaled {
            inner.unsaved(entry);
        }
    }

    /// Records an action served to `asker`.
    pub fn action(
        &self,
        asker: &Asker,
        digest: Digest,
        outcome: Outcome,
        result: Option<Arc<ActionResult>>,
    ) {
        let (identity, invocation) = invocation_key(asker);
        let outcome = match outcome {
            Outcome::Failed { code, message } => Outcome::Failed {
                code,
                message: clip(&message, MAX_TEXT),
            },
            other => other,
        };
        let tool = match &asker.metadata.tool_details {
            Some(tool) => clip(
                format!("{} {}", tool.tool_name, tool.tool_version).trim(),
                MAX_NAME,
            ),
            None => String::new(),
        };
        self.change(Entry::Action(ActionEntry {
            at: SystemTime::now(),
            identity,
            invocation,
            instance: asker.instance.clone(),
            tool,
            digest,
            mnemonic: clip(&asker.metadata.action_mnemonic, MAX_NAME),
            target: clip(&asker.metadata.target_id, MAX_TEXT),
            outcome,
            result: result.map(kept),
        }));
    }

    /// Applies what a build event says to `identity`'s invocation `invocation`.
    /// Reports are bounded: past `max_targets_per_invocation` targets and tests,
    /// later ones are counted, not kept.
    pub fn build_event(
        &self,
        invocation: &str,
        identity: &str,
        change: impl FnOnce(&mut BuildReport),
    ) {
        let now = SystemTime::now();
        let key = (identity.to_owned(), clip(invocation, MAX_NAME));
        let mut inner = self.inner.lock();
        let max_targets = self.config.max_targets_per_invocation;
        let entry = inner.invocation(&self.config, &key, now);
        let report = entry.build.get_or_insert_with(BuildReport::default);
        change(report);
        while report.targets.len() + report.tests.len() > max_targets {
            // Keep the first ones reported: later additions are the ones dropped.
            let last_target = report.targets.keys().next_back().cloned();
            let removed = match last_target {
                Some(label) if report.targets.len() >= report.tests.len() => {
                    report.targets.remove(&label).is_some()
                }
                _ => report.tests.pop_last().is_some(),
            };
            if !removed {
                break;
            }
            report.dropped += 1;
        }
        name_tool(entry);
        if self.journaled {
            inner.changed_builds.insert(key);
        }
    }

    /// The invocations `visible` lets through (given identity and instance), most
    /// recently started first, `offset` and `limit` for pages; and how many there are.
    pub fn invocations(
        &self,
        visible: impl Fn(&str, &str) -> bool,
        offset: usize,
        limit: usize,
    ) -> (Vec<InvocationSummary>, usize) {
        let inner = self.inner.lock();
        let mut all: Vec<&Invocation> = inner
            .invocations
            .values()
            .filter(|i| visible(&i.identity, &i.instance))
            .collect();
        all.sort_by(|a, b| {
            b.first_seen
                .cmp(&a.first_seen)
                .then(a.id.cmp(&b.id))
                .then(a.identity.cmp(&b.identity))
        });
        let total = all.len();
        let page = all
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|i| InvocationSummary {
                id: i.id.clone(),
                identity: i.identity.clone(),
                instance: i.instance.clone(),
                tool: i.tool.clone(),
                first_seen: i.first_seen,
                duration: i.duration(),
                executed: i.executed,
                cached: i.cached,
                failed: i.failed,
                exit: i.build.as_ref().and_then(|b| b.exit.clone()),
            })
            .collect();
        (page, total)
    }

    /// Applies `read` to the invocation with this id that `visible` lets through
    /// (given identity and instance): `preferred`'s own if it has one.
    pub fn with_invocation<T>(
        &self,
        id: &str,
        preferred: &str,
        visible: impl Fn(&str, &str) -> bool,
        read: impl FnOnce(&Invocation) -> T,
    ) -> Option<T> {
        let inner = self.inner.lock();
        let own = inner
            .invocations
            .get(&(preferred.to_owned(), id.to_owned()));
        let found = own.or_else(|| {
            inner
                .invocations
                .values()
                .filter(|i| i.id == id && visible(&i.identity, &i.instance))
                .min_by(|a, b| a.identity.cmp(&b.identity))
        })?;
        visible(&found.identity, &found.instance).then(|| read(found))
    }

    /// The most recent records (at most `limit`) of an action digest, oldest first.
    pub fn action_records(&self, digest: &Digest, limit: usize) -> Vec<ActionRecord> {
        let inner = self.inner.lock();
        let mut records: Vec<&ActionRecord> = inner
            .by_action
            .get(digest)
            .into_iter()
            .flat_map(|places| places.iter())
            .flat_map(|(key, indexes)| indexes.iter().map(move |i| (key.clone(), *i)))
            .filter_map(|place| inner.record(&place))
            .collect();
        records.sort_by_key(|r| std::cmp::Reverse(r.seq));
        let mut records: Vec<ActionRecord> = records.into_iter().take(limit).cloned().collect();
        records.reverse();
        records
    }

    /// Executed actions recorded before `before`, most recent first, with
    /// `mnemonic` on `instance` and that `visible` lets through (given identity and
    /// instance): the candidates for "the same action, earlier"; at most `limit`.
    pub fn earlier_executions(
        &self,
        instance: &str,
        mnemonic: &str,
        before: u64,
        visible: impl Fn(&str, &str) -> bool,
        limit: usize,
    ) -> Vec<ActionRecord> {
        let inner = self.inner.lock();
        let key = (instance.to_owned(), mnemonic.to_owned());
        let Some(executions) = inner.executions.get(&key) else {
            return Vec::new();
        };
        // Places of forgotten invocations are skipped here rather than hunted down
        // when they go.
        executions
            .iter()
            .rev()
            .filter_map(|place| inner.record(place))
            .filter(|a| {
                a.seq < before
                    && a.instance == instance
                    && a.mnemonic == mnemonic
                    && matches!(a.outcome, Outcome::Executed { .. })
                    && visible(&a.identity, &a.instance)
            })
            .take(limit)
            .cloned()
            .collect()
    }

    /// The queue depth each pool had, noted once in a while by whoever watches the
    /// scheduler; the deepest in a minute is kept (and journaled when it deepens).
    pub fn queue_depth(&self, pool: &str, queued: u64) {
        let at = SystemTime::now();
        let deeper = {
            let mut inner = self.inner.lock();
            inner
                .minute(at)
                .is_some_and(|m| m.queued.get(pool).is_none_or(|&deepest| queued > deepest))
        };
        if deeper {
            self.change(Entry::QueueDepth(QueueDepth {
                at,
                pool: pool.to_owned(),
                queued,
            }));
        }
    }

    /// The last `count` minutes, oldest first.
    pub fn minutes(&self, count: usize) -> Vec<Minute> {
        let inner = self.inner.lock();
        let skip = inner.minutes.len().saturating_sub(count);
        inner.minutes.iter().skip(skip).cloned().collect()
    }

    /// Notes a worker's change of standing.
    pub fn standing_changed(&self, change: StandingChange) {
        self.change(Entry::Standing(change));
    }

    /// Changes of standing, most recent first, for `worker` or for all.
    pub fn standing_changes(&self, worker: Option<&str>, limit: usize) -> Vec<StandingChange> {
        let inner = self.inner.lock();
        inner
            .standing
            .iter()
            .rev()
            .filter(|c| worker.is_none_or(|w| c.worker == w))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Notes a sample of a worker's health window.
    pub fn health_sample(&self, worker: &str, sample: HealthSample) {
        self.change(Entry::Health(HealthEntry {
            at: SystemTime::now(),
            worker: worker.to_owned(),
            sample,
        }));
    }

    /// A worker's health samples, oldest first.
    pub fn health(&self, worker: &str) -> Vec<HealthSample> {
        let inner = self.inner.lock();
        inner
            .health
            .get(worker)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use paddock_config::Span;

    pub(crate) fn asker(invocation: &str) -> Asker {
        Asker {
            instance: "main".into(),
            identity: "alice".into(),
            metadata: RequestMetadata {
                tool_invocation_id: invocation.into(),
                action_mnemonic: "CppCompile".into(),
                ..Default::default()
            },
        }
    }

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn get(history: &History, id: &str) -> Option<Invocation> {
        history.with_invocation(id, "alice", |_, _| true, Invocation::clone)
    }

    #[test]
    fn invocations_are_bounded_by_count_and_forget_their_actions() {
        let history = History::new(HistoryConfig {
            max_invocations: 2,
            ..HistoryConfig::default()
        });
        for (n, id) in ["a", "b", "c"].iter().enumerate() {
            history.action(&asker(id), digest(n as u8), Outcome::Cached, None);
        }
        let (list, total) = history.invocations(|_, _| true, 0, 10);
        assert_eq!(total, 2);
        assert_eq!(list[0].id, "c");
        assert!(get(&history, "a").is_none());
        assert!(history.action_records(&digest(0), 10).is_empty());
        assert_eq!(history.action_records(&digest(2), 10).len(), 1);
    }

    #[test]
    fn old_invocations_are_forgotten() {
        let history = History::new(HistoryConfig {
            max_age: Span::millis(1),
            ..HistoryConfig::default()
        });
        history.action(&asker("old"), digest(1), Outcome::Cached, None);
        std::thread::sleep(Duration::from_millis(20));
        history.action(&asker("new"), digest(2), Outcome::Cached, None);
        assert!(get(&history, "old").is_none());
        assert!(get(&history, "new").is_some());
    }

    #[test]
    fn actions_past_the_bound_are_counted_not_kept() {
        let history = History::new(HistoryConfig {
            max_actions_per_invocation: 2,
            ..HistoryConfig::default()
        });
        for n in 0..5 {
            let outcome = if n == 4 {
                Outcome::Failed {
                    code: "UNAVAILABLE".into(),
                    message: "gone".into(),
                }
            } else {
                Outcome::Executed { exit_code: 0 }
            };
            history.action(&asker("i"), digest(n), outcome, None);
        }
        let i = get(&history, "i").unwrap();
        assert_eq!((i.executed, i.failed, i.dropped), (4, 1, 3));
        assert_eq!(i.actions.len(), 2);
        let minutes = history.minutes(1);
        assert_eq!(minutes[0].executed, 4);
    }

    #[test]
    fn earlier_executions_are_the_same_mnemonic_most_recent_first() {
        let history = History::new(HistoryConfig::default());
        history.action(
            &asker("i"),
            digest(1),
            Outcome::Executed { exit_code: 0 },
            None,
        );
        history.action(&asker("j"), digest(2), Outcome::Cached, None);
        history.action(
            &asker("j"),
            digest(3),
            Outcome::Executed { exit_code: 0 },
            None,
        );
        let later = history.action_records(&digest(3), 10)[0].seq;
        let earlier = history.earlier_executions("main", "CppCompile", later, |_, _| true, 10);
        assert_eq!(earlier.len(), 1);
        assert_eq!(earlier[0].digest, digest(1));
    }

    #[test]
    fn late_changes_land_in_their_own_minute_and_shared_changes_count_once() {
        let history = History::new(HistoryConfig::default());
        let now = SystemTime::now();
        let served = |at, outcome| {
            Entry::Action(ActionEntry {
                at,
                identity: "alice".into(),
                invocation: "i".into(),
                instance: "main".into(),
                tool: String::new(),
                digest: digest(1),
                mnemonic: String::new(),
                target: String::new(),
                outcome,
                result: None,
            })
        };
        let earlier = now - Duration::from_secs(180);
        history.restore([
            served(now, Outcome::Cached),
            served(earlier, Outcome::Executed { exit_code: 0 }),
        ]);
        let minutes = history.minutes(10);
        assert_eq!(minutes.len(), 2);
        assert!(minutes[0].minute < minutes[1].minute);
        assert_eq!((minutes[0].executed, minutes[1].cached), (1, 1));
        assert_eq!(get(&history, "i").unwrap().first_seen, Some(earlier));
        // Too old for the bounds: passed over.
        history.restore([served(
            now - Duration::from_secs(8 * 24 * 3600),
            Outcome::Cached,
        )]);
        assert_eq!(get(&history, "i").unwrap().cached, 1);

        let change = StandingChange {
            worker: "w".into(),
            from: "active".into(),
            to: "quarantined".into(),
            reason: "canaries failed".into(),
            at: now,
        };
        history.restore([Entry::Standing(change.clone()), Entry::Standing(change)]);
        assert_eq!(history.standing_changes(None, 10).len(), 1);
    }

    #[test]
    fn unfinished_reports_are_saved_at_most_every_half_minute_and_the_future_is_refused() {
        let history = History::journaled(HistoryConfig::default());
        let builds = |(entries, _): (Vec<Entry>, u64)| {
            entries
                .iter()
                .filter(|e| matches!(e, Entry::Build(_)))
                .count()
        };
        history.build_event("b", "alice", |r| r.command = "build".into());
        assert_eq!(builds(history.take_unsaved(false)), 1);
        history.build_event("b", "alice", |r| r.patterns.push("//...".into()));
        assert_eq!(builds(history.take_unsaved(false)), 0, "too soon");
        assert_eq!(builds(history.take_unsaved(true)), 1, "all, when stopping");
        history.build_event("b", "alice", |r| r.exit = Some("SUCCESS".into()));
        assert_eq!(builds(history.take_unsaved(false)), 1, "finished");

        let ahead = SystemTime::now() + Duration::from_secs(3600);
        history.restore([Entry::QueueDepth(QueueDepth {
            at: ahead,
            pool: "p".into(),
            queued: 9,
        })]);
        assert!(history.minutes(10).iter().all(|m| m.queued.is_empty()));
    }

    #[test]
    fn build_events_are_bounded() {
        let history = History::new(HistoryConfig {
            max_targets_per_invocation: 3,
            ..HistoryConfig::default()
        });
        history.build_event("b", "alice", |report| {
            for n in 0..5 {
                report
                    .targets
                    .insert(format!("//:t{n}"), TargetState::default());
            }
        });
        // Another identity's events under the same id make an invocation of its own.
        history.build_event("b", "mallory", |report| {
            report.exit = Some("SUCCESS".into())
        });
        let mallorys = history.with_invocation("b", "mallory", |_, _| true, Invocation::clone);
        assert_eq!(mallorys.unwrap().identity, "mallory");
        let report = get(&history, "b").unwrap().build.unwrap();
        assert_eq!(report.exit, None);
        assert_eq!(report.targets.len(), 3);
        assert_eq!(report.dropped, 2);
    }
}
