//! Worker health: what each worker's recent actions came to, whether that is
//! anomalous against the other workers of its pool, and the states a worker goes
//! through (active, draining, quarantined, probed with canaries).
//!
//! Two signals are kept per worker over a sliding window of its latest outcomes:
//! infrastructure failures (sandbox or resolver set-up, uploads, results that fail
//! validation, crashes, lost heartbeats, timeouts of actions that then finish in time
//! elsewhere, and disagreements with other workers on the same action), and
//! separately non-zero exit codes. A worker is anomalous when, given the rate of the
//! rest of its pool, a count at least as high as its own would be very unlikely
//! (a one-sided binomial test). Judging against the pool, not a fixed threshold,
//! means that a pool where everything fails (a broken commit, an outage of a
//! shared service) quarantines nobody, while one bad worker among healthy ones is
//! caught as soon as it has `min_samples` outcomes.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use paddock_config::QuarantineConfig;
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SharedClock};
use crate::saved::{SavedRecord, SavedStanding};

/// What one action came to on one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The command ran and its result was valid (exit code 0).
    Success,
    /// The command ran and exited non-zero: the action's business, usually.
    NonzeroExit,
    /// The worker failed the action, or its result was unusable.
    InfraFailure,
    /// The worker's result differed from what two other workers agreed on.
    Disagreement,
}

impl Outcome {
    fn infrastructure(self) -> bool {
        matches!(self, Outcome::InfraFailure | Outcome::Disagreement)
    }
}

/// Counts over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub outcomes: usize,
    pub infra_failures: usize,
    pub nonzero_exits: usize,
    pub disagreements: usize,
}

impl std::ops::SubAssign for Counts {
    fn sub_assign(&mut self, other: Counts) {
        self.outcomes -= other.outcomes;
        self.infra_failures -= other.infra_failures;
        self.nonzero_exits -= other.nonzero_exits;
        self.disagreements -= other.disagreements;
    }
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.outcomes += other.outcomes;
        self.infra_failures += other.infra_failures;
        self.nonzero_exits += other.nonzero_exits;
        self.disagreements += other.disagreements;
    }
}

/// Where a worker stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Standing {
    /// Takes work.
    Active,
    /// Takes no new work (an operator's request); what runs finishes.
    Draining,
    /// Takes no work but canaries. An automatic quarantine is probed after its
    /// cool-down; an operator's lasts until released.
    Quarantined {
        manual: bool,
        /// When probing may start.
        probe_at: Option<Instant>,
        /// Failed probes so far, which lengthen the next cool-down.
        strikes: u32,
    },
    /// Running its canaries: released when all pass.
    Probing { strikes: u32, passed: usize },
}

impl Standing {
    pub fn name(&self) -> &'static str {
        match self {
            Standing::Active => "active",
            Standing::Draining => "draining",
            Standing::Quarantined { .. } => "quarantined",
            Standing::Probing { .. } => "probing",
        }
    }

    /// Whether the worker may be given clients' actions.
    pub fn takes_work(&self) -> bool {
        matches!(self, Standing::Active)
    }
}

/// One worker's health, kept by name across its reconnections.
#[derive(Debug, Clone)]
pub struct Record {
    pub pool: String,
    pub standing: Standing,
    /// Why it stands where it does (for operators and logs).
    pub reason: String,
    pub since: SystemTime,
    window: VecDeque<Outcome>,
    /// The counts of `window`, kept as it changes: judging a worker sums its whole
    /// pool's, once per outcome.
    recent: Counts,
    /// Every outcome since the scheduler started.
    pub totals: Counts,
    /// When the worker last connected or finished something.
    seen: Instant,
}

impl Record {
    fn new(pool: String, clock: &dyn Clock) -> Record {
        Record {
            pool,
            standing: Standing::Active,
            reason: "connected".into(),
            since: clock.wall(),
            window: VecDeque::new(),
            recent: Counts::default(),
            totals: Counts::default(),
            seen: clock.now(),
        }
    }

    pub fn recent(&self) -> Counts {
        self.recent
    }

    /// Adds an outcome to the window, dropping the oldest beyond `size`.
    fn push(&mut self, outcome: Outcome, size: usize) {
        self.window.push_back(outcome);
        self.recent += count(outcome);
        while self.window.len() > size {
            if let Some(oldest) = self.window.pop_front() {
                self.recent -= count(oldest);
            }
        }
    }

    fn clear_window(&mut self) {
        self.window.clear();
        self.recent = Counts::default();
    }
}

fn count(outcome: Outcome) -> Counts {
    Counts {
        outcomes: 1,
        infra_failures: outcome.infrastructure() as usize,
        nonzero_exits: (outcome == Outcome::NonzeroExit) as usize,
        disagreements: (outcome == Outcome::Disagreement) as usize,
    }
}

/// How long a worker that is away is remembered, by where it stands.
fn remembered_for(standing: &Standing) -> Duration {
    match standing {
        Standing::Active => Duration::from_secs(3_600),
        _ => Duration::from_secs(86_400),
    }
}

/// A change of standing, to log and count.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub worker: String,
    pub from: &'static str,
    pub to: &'static str,
    pub reason: String,
}

/// Every worker's health.
pub struct Fleet {
    config: QuarantineConfig,
    clock: SharedClock,
    records: HashMap<String, Record>,
    /// How urgently the records need saving, and which changed since they last were.
    unsaved: Unsaved,
    changed: BTreeSet<String>,
}

/// How urgently the records need saving.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unsaved {
    #[default]
    Nothing,
    /// Outcomes in the windows: saved within a few seconds.
    Outcomes,
    /// A standing or a worker: saved at once.
    Standings,
}

impl Fleet {
    pub fn new(config: QuarantineConfig, clock: SharedClock) -> Fleet {
        Fleet {
            config,
            clock,
            records: HashMap::new(),
            unsaved: Unsaved::Nothing,
            changed: BTreeSet::new(),
        }
    }

    /// What has changed since [`Fleet::saved`] was last called.
    pub fn unsaved(&self) -> Unsaved {
        self.unsaved
    }

    /// Every record as it is kept across restarts, and the names of those that
    /// changed since the last call; what is returned counts as saved.
    pub fn saved(&mut self) -> (Vec<SavedRecord>, BTreeSet<String>) {
        self.unsaved = Unsaved::Nothing;
        let changed = std::mem::take(&mut self.changed);
        let (now, wall) = (self.clock.now(), self.clock.wall());
        let records = self
            .records
            .iter()
            .map(|(name, record)| SavedRecord {
                name: name.clone(),
                pool: record.pool.clone(),
                standing: match record.standing {
                    Standing::Active => SavedStanding::Active,
                    Standing::Draining => SavedStanding::Draining,
                    Standing::Quarantined {
                        manual,
                        probe_at,
                        strikes,
                    } => SavedStanding::Quarantined {
                        manual,
                        probe_at: probe_at.map(|at| wall + at.saturating_duration_since(now)),
                        strikes,
                    },
                    // Its canaries do not outlive the scheduler: it probes again.
                    Standing::Probing { strikes, .. } => SavedStanding::Quarantined {
                        manual: false,
                        probe_at: Some(wall),
                        strikes,
                    },
                },
                reason: record.reason.clone(),
                since: record.since,
                window: record.window.iter().copied().collect(),
                totals: record.totals,
                last_seen: wall - now.saturating_duration_since(record.seen),
                saved_at: wall,
            })
            .collect();
        (records, changed)
    }

    /// Takes back records saved by an earlier scheduler. A worker is remembered for
    /// as long as it was away when its record was saved, plus the time since: the
    /// scheduler's own downtime does not count against it.
    pub fn restore(&mut self, saved: Vec<SavedRecord>) {
        for saved in saved {
            let name = saved.name.clone();
            if let Some(record) = self.revive(saved) {
                self.records.insert(name, record);
            }
        }
    }

    /// Takes a record that another server sharing the store wrote. For a worker
    /// connected `here`, this server owns its outcomes (window, totals) and takes
    /// only a newer decision on its standing (an operator's order, a quarantine);
    /// otherwise the record is taken whole, or forgotten if it is too old to keep.
    pub fn adopt(&mut self, saved: SavedRecord, here: bool) {
        let name = saved.name.clone();
        let Some(theirs) = self.revive(saved) else {
            if !here {
                self.records.remove(&name);
            }
            return;
        };
        match self.records.get_mut(&name) {
            Some(ours) if here => {
                if theirs.since > ours.since {
                    ours.standing = theirs.standing;
                    ours.reason = theirs.reason;
                    ours.since = theirs.since;
                }
            }
            _ => {
                self.records.insert(name, theirs);
            }
        }
    }

    /// A saved record as this scheduler holds it; `None` if its worker has been away
    /// too long to remember.
    fn revive(&self, record: SavedRecord) -> Option<Record> {
        let window = self.config.window.max(1);
        let (now, wall) = (self.clock.now(), self.clock.wall());
        let standing = match record.standing {
            SavedStanding::Active => Standing::Active,
            SavedStanding::Draining => Standing::Draining,
            SavedStanding::Quarantined {
                manual,
                probe_at,
                strikes,
            } => Standing::Quarantined {
                manual,
                // A probe time beyond what Instant can hold is probed now.
                probe_at: probe_at.map(|at| {
                    now.checked_add(at.duration_since(wall).unwrap_or(Duration::ZERO))
                        .unwrap_or(now)
                }),
                strikes,
            },
        };
        let away = record
            .saved_at
            .duration_since(record.last_seen)
            .unwrap_or(Duration::ZERO);
        if away >= remembered_for(&standing) {
            return None;
        }
        let skip = record.window.len().saturating_sub(window);
        let kept: VecDeque<Outcome> = record.window.into_iter().skip(skip).collect();
        let mut recent = Counts::default();
        for outcome in &kept {
            recent += count(*outcome);
        }
        Some(Record {
            pool: record.pool,
            standing,
            reason: record.reason,
            since: record.since,
            window: kept,
            recent,
            totals: record.totals,
            seen: now.checked_sub(away).unwrap_or(now),
        })
    }

    /// Marks a worker's record as changed, to be saved as urgently as `what` says.
    pub fn mark_changed(&mut self, worker: &str, what: Unsaved) {
        self.unsaved = self.unsaved.max(what);
        if !self.changed.contains(worker) {
            self.changed.insert(worker.to_owned());
        }
    }

    /// Notes that a connected worker is still there, so that its record says so when
    /// it is next saved.
    pub fn touch(&mut self, worker: &str) {
        if let Some(record) = self.records.get_mut(worker) {
            record.seen = self.clock.now();
            self.mark_changed(worker, Unsaved::Outcomes);
        }
    }

    /// Marks records as needing a save again, after one failed.
    pub fn mark_unsaved(&mut self, changed: BTreeSet<String>) {
        self.unsaved = Unsaved::Standings;
        self.changed.extend(changed);
    }

    /// The record of `worker`, made on first sight (in `pool`). A known worker keeps
    /// its standing and statistics when it reconnects: restarting does not lift a
    /// quarantine.
    pub fn enroll(&mut self, worker: &str, pool: String) -> &Record {
        let fresh = !self.records.contains_key(worker);
        if fresh || self.records[worker].pool != pool {
            self.mark_changed(worker, Unsaved::Standings);
        }
        let clock = self.clock.as_ref();
        let record = self
            .records
            .entry(worker.to_owned())
            .or_insert_with(|| Record::new(pool.clone(), clock));
        record.pool = pool;
        record.seen = clock.now();
        record
    }

    /// Forgets workers gone for a while, so that a fleet with ephemeral names (an
    /// autoscaled one) does not grow the scheduler's memory: active ones after an
    /// hour, drained and quarantined ones after a day (a worker back within the day
    /// is still quarantined).
    pub fn forget_gone(&mut self, connected: &HashSet<String>, now: Instant) {
        let before = self.records.len();
        self.records.retain(|name, record| {
            connected.contains(name)
                || now.duration_since(record.seen) < remembered_for(&record.standing)
        });
        if self.records.len() != before {
            self.unsaved = Unsaved::Standings;
        }
    }

    pub fn get(&self, worker: &str) -> Option<&Record> {
        self.records.get(worker)
    }

    pub fn records(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.records.iter()
    }

    pub fn takes_work(&self, worker: &str) -> bool {
        self.records
            .get(worker)
            .is_none_or(|r| r.standing.takes_work())
    }

    /// Records an outcome; returns the quarantine it triggers, if any.
    pub fn record(&mut self, worker: &str, outcome: Outcome) -> Option<Transition> {
        let window = self.config.window.max(1);
        if !self.records.contains_key(worker) {
            return None;
        }
        self.mark_changed(worker, Unsaved::Outcomes);
        let record = self.records.get_mut(worker)?;
        record.seen = self.clock.now();
        record.totals += count(outcome);
        record.push(outcome, window);
        if !self.config.enabled || !record.standing.takes_work() {
            return None;
        }
        // Judging sums the whole pool. A success cannot make a worker more anomalous
        // than it was, except by giving it its first `min_samples`; whatever else a
        // pool's successes change is judged by the periodic review.
        let first_judgeable = record.window.len() == self.config.min_samples.max(1);
        if outcome == Outcome::Success && !first_judgeable {
            return None;
        }
        let reason = self.anomaly(worker)?;
        self.quarantine(worker, reason)
    }

    fn quarantine(&mut self, worker: &str, reason: String) -> Option<Transition> {
        self.set(
            worker,
            Standing::Quarantined {
                manual: false,
                probe_at: Some(self.clock.now() + self.config.cooldown.get()),
                strikes: 0,
            },
            reason,
        )
    }

    /// Judges every active worker with failures against the rest of its pool as it
    /// stands now, so that a worker whose failures all came before its pool had
    /// outcomes enough to compare with is caught once the pool has them. Each
    /// worker's window is counted once. Only workers `here` (connected to this
    /// server) are judged: another server judges its own with fresher windows.
    /// Returns the quarantines it decides.
    pub fn review(&mut self, here: &HashSet<String>) -> Vec<Transition> {
        if !self.config.enabled {
            return Vec::new();
        }
        let mut pools: HashMap<&str, Counts> = HashMap::new();
        let mut suspects = Vec::new();
        for (name, record) in &self.records {
            if !record.standing.takes_work() {
                continue;
            }
            let own = record.recent();
            *pools.entry(record.pool.as_str()).or_default() += own;
            if own.infra_failures + own.nonzero_exits > 0 && here.contains(name) {
                suspects.push((name.clone(), record.pool.clone(), own));
            }
        }
        let verdicts: Vec<(String, String)> = suspects
            .into_iter()
            .filter_map(|(name, pool, own)| {
                let mut rest = pools[pool.as_str()];
                rest -= own;
                self.judge(own, rest, &pool).map(|reason| (name, reason))
            })
            .collect();
        verdicts
            .into_iter()
            .filter_map(|(name, reason)| self.quarantine(&name, reason))
            .collect()
    }

    /// Why `worker` is anomalous against its pool, if it is.
    pub fn anomaly(&self, worker: &str) -> Option<String> {
        let record = self.records.get(worker)?;
        let own = record.recent();
        let mut pool = Counts::default();
        for (name, other) in &self.records {
            if name != worker && other.pool == record.pool && other.standing.takes_work() {
                pool += other.recent();
            }
        }
        self.judge(own, pool, &record.pool)
    }

    /// Whether a worker's counts are improbable against the rest of its pool's.
    fn judge(&self, own: Counts, pool: Counts, pool_name: &str) -> Option<String> {
        let min = self.config.min_samples.max(1);
        if own.outcomes < min || pool.outcomes < min {
            return None;
        }
        let alpha = self.config.significance;
        for (what, mine, theirs) in [
            (
                "infrastructure failures",
                own.infra_failures,
                pool.infra_failures,
            ),
            ("non-zero exits", own.nonzero_exits, pool.nonzero_exits),
        ] {
            // The pool's rate, smoothed so that a spotless pool is not taken as a
            // rate of exactly zero.
            let rate = (theirs as f64 + 1.0) / (pool.outcomes as f64 + 2.0);
            let tail = binomial_upper_tail(own.outcomes, mine, rate);
            if tail < alpha && mine as f64 / own.outcomes as f64 > rate {
                return Some(format!(
                    "{what}: {mine} of its last {} actions, against {theirs} of {} on the rest of pool {pool_name:?} (p = {tail:.2e})",
                    own.outcomes, pool.outcomes
                ));
            }
        }
        None
    }

    /// Sets a worker's standing; returns the transition if it changed.
    pub fn set(&mut self, worker: &str, standing: Standing, reason: String) -> Option<Transition> {
        let record = self.records.get_mut(worker)?;
        let from = record.standing.name();
        let to = standing.name();
        let changed = from != to;
        if matches!(standing, Standing::Active) && changed {
            // A fresh start: the window that got it quarantined is history.
            record.clear_window();
        }
        record.standing = standing;
        record.reason = reason.clone();
        record.since = self.clock.wall();
        self.mark_changed(worker, Unsaved::Standings);
        changed.then(|| Transition {
            worker: worker.to_owned(),
            from,
            to,
            reason,
        })
    }

    /// Quarantined workers `here` (connected to this server) whose cool-down is over:
    /// they start probing. One that is away is probed when it is back.
    pub fn due_for_probing(
        &mut self,
        now: Instant,
        here: &HashSet<String>,
    ) -> Vec<(String, Transition)> {
        let due: Vec<(String, u32)> = self
            .records
            .iter()
            .filter(|(name, _)| here.contains(*name))
            .filter_map(|(name, r)| match r.standing {
                Standing::Quarantined {
                    manual: false,
                    probe_at: Some(at),
                    strikes,
                } if at <= now => Some((name.clone(), strikes)),
                _ => None,
            })
            .collect();
        due.into_iter()
            .filter_map(|(name, strikes)| {
                let transition = self.set(
                    &name,
                    Standing::Probing { strikes, passed: 0 },
                    "cool-down over: running canaries".into(),
                )?;
                Some((name, transition))
            })
            .collect()
    }

    /// A canary's verdict on a probing worker: released after `canaries` passes,
    /// back in quarantine (for longer) at the first failure.
    pub fn canary(&mut self, worker: &str, passed: bool, detail: &str) -> Option<Transition> {
        let needed = self.config.canaries.max(1);
        let cooldown = self.config.cooldown.get();
        let record = self.records.get_mut(worker)?;
        let Standing::Probing {
            strikes,
            passed: so_far,
        } = record.standing
        else {
            return None;
        };
        if !passed {
            let strikes = strikes + 1;
            let wait = cooldown * 2u32.pow(strikes.min(4));
            return self.set(
                worker,
                Standing::Quarantined {
                    manual: false,
                    probe_at: Some(self.clock.now() + wait),
                    strikes,
                },
                format!(
                    "failed a canary: {detail}; next probe in {}s",
                    wait.as_secs()
                ),
            );
        }
        if so_far + 1 < needed {
            record.standing = Standing::Probing {
                strikes,
                passed: so_far + 1,
            };
            return None;
        }
        self.set(
            worker,
            Standing::Active,
            format!("passed {needed} canaries"),
        )
    }
}

/// P(X ≥ k) for X ~ Binomial(n, p), summed in log space so that it stays accurate
/// for tiny tails.
pub fn binomial_upper_tail(n: usize, k: usize, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut log_choose = 0.0f64; // ln C(n, 0)
    let mut total = 0.0;
    for i in 0..=n {
        if i > 0 {
            log_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        if i >= k {
            total += (log_choose + i as f64 * lp + (n - i) as f64 * lq).exp();
        }
    }
    total.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use std::sync::Arc;

    /// Every worker the fleet knows, as if connected.
    fn all(fleet: &Fleet) -> HashSet<String> {
        fleet.records().map(|(name, _)| name.clone()).collect()
    }

    fn fleet() -> Fleet {
        Fleet::new(
            QuarantineConfig {
                min_samples: 8,
                ..QuarantineConfig::default()
            },
            Arc::new(SystemClock),
        )
    }

    #[test]
    fn binomial_tails() {
        assert!((binomial_upper_tail(10, 0, 0.3) - 1.0).abs() < 1e-12);
        assert!((binomial_upper_tail(1, 1, 0.25) - 0.25).abs() < 1e-12);
        // P(X >= 8 | 10, 0.5) = (45 + 10 + 1) / 1024
        assert!((binomial_upper_tail(10, 8, 0.5) - 56.0 / 1024.0).abs() < 1e-12);
        assert!(binomial_upper_tail(100, 50, 0.01) < 1e-50);
    }

    #[test]
    fn records_saved_and_restored_keep_standings_windows_and_cool_downs() {
        let mut fleet = fleet();
        for w in ["a", "b", "bad", "probing"] {
            fleet.enroll(w, "pool".into());
        }
        assert_eq!(fleet.unsaved(), Unsaved::Standings);
        fleet.saved();
        assert_eq!(fleet.unsaved(), Unsaved::Nothing);
        for _ in 0..8 {
            fleet.record("a", Outcome::Success);
            fleet.record("b", Outcome::Success);
        }
        assert_eq!(fleet.unsaved(), Unsaved::Outcomes);
        let mut caught = None;
        for _ in 0..8 {
            caught = caught.or(fleet.record("bad", Outcome::InfraFailure));
        }
        assert_eq!(caught.expect("quarantined").to, "quarantined");
        assert_eq!(fleet.unsaved(), Unsaved::Standings);
        fleet.set(
            "probing",
            Standing::Probing {
                strikes: 3,
                passed: 1,
            },
            "canaries".into(),
        );

        let mut restored = self::fleet();
        let (records, changed) = fleet.saved();
        assert_eq!(
            changed,
            ["a", "b", "bad", "probing"].map(String::from).into()
        );
        restored.restore(records);
        assert_eq!(fleet.unsaved(), Unsaved::Nothing);
        for w in ["a", "b", "bad"] {
            let (was, is) = (fleet.get(w).unwrap(), restored.get(w).unwrap());
            assert_eq!(is.standing.name(), was.standing.name(), "{w}");
            assert_eq!((is.recent(), is.totals), (was.recent(), was.totals), "{w}");
            assert_eq!(is.reason, was.reason);
        }
        let Standing::Quarantined {
            manual: false,
            probe_at: Some(probe_at),
            ..
        } = restored.get("bad").unwrap().standing
        else {
            panic!("not quarantined")
        };
        let left = probe_at.saturating_duration_since(Instant::now());
        assert!(left > QuarantineConfig::default().cooldown.get() - Duration::from_secs(5));
        // Its canaries died with the scheduler: it is due for probing again.
        assert!(!restored.takes_work("probing"));
        let due = restored.due_for_probing(Instant::now(), &all(&restored));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, "probing");
        assert!(matches!(
            restored.get("probing").unwrap().standing,
            Standing::Probing {
                strikes: 3,
                passed: 0
            }
        ));
    }

    #[test]
    fn records_from_another_server_give_their_standing_but_not_their_outcomes() {
        let mut here = fleet();
        here.enroll("w", "pool".into());
        for _ in 0..5 {
            here.record("w", Outcome::Success);
        }
        // Another server quarantined it later (an operator's order there).
        let mut there = fleet();
        there.enroll("w", "pool".into());
        there.record("w", Outcome::InfraFailure);
        std::thread::sleep(Duration::from_millis(5));
        there.set(
            "w",
            Standing::Quarantined {
                manual: true,
                probe_at: None,
                strikes: 0,
            },
            "an operator's order".into(),
        );
        let (theirs, _) = there.saved();
        let mut connected_here = fleet();
        connected_here.restore(here.saved().0);
        connected_here.adopt(theirs[0].clone(), true);
        let w = connected_here.get("w").unwrap();
        assert_eq!(w.standing.name(), "quarantined");
        assert_eq!(w.recent().outcomes, 5, "this server's outcomes are kept");
        // For a worker that is elsewhere, their record is taken whole...
        let mut elsewhere = fleet();
        elsewhere.restore(here.saved().0);
        elsewhere.adopt(theirs[0].clone(), false);
        let w = elsewhere.get("w").unwrap();
        assert_eq!((w.standing.name(), w.recent().outcomes), ("quarantined", 1));
        // ...and an older decision does not undo a newer one here.
        let (older, _) = here.saved(); // active since before the quarantine
        connected_here.adopt(older[0].clone(), true);
        assert_eq!(
            connected_here.get("w").unwrap().standing.name(),
            "quarantined"
        );
        // A record saved when its worker had long been away is forgotten.
        let mut stale = older[0].clone();
        stale.last_seen = stale.saved_at - Duration::from_secs(7_200);
        elsewhere.adopt(stale, false);
        assert!(elsewhere.get("w").is_none());
    }

    #[test]
    fn a_success_that_makes_a_failing_worker_judgeable_gets_it_judged() {
        let mut fleet = fleet();
        for w in ["a", "b", "flaky"] {
            fleet.enroll(w, String::new());
        }
        for _ in 0..20 {
            fleet.record("a", Outcome::Success);
            fleet.record("b", Outcome::Success);
        }
        for _ in 0..7 {
            assert!(fleet.record("flaky", Outcome::InfraFailure).is_none());
        }
        // Its eighth outcome, a success, gives it min_samples: judged at once.
        let caught = fleet
            .record("flaky", Outcome::Success)
            .expect("quarantined");
        assert_eq!(caught.to, "quarantined");
        // Successes of healthy workers judge nobody on the spot.
        assert!(fleet.record("a", Outcome::Success).is_none());
    }

    #[test]
    fn a_worker_that_failed_before_its_pool_had_outcomes_is_caught_later() {
        let mut fleet = fleet();
        for w in ["a", "b", "fast-failer"] {
            fleet.enroll(w, String::new());
        }
        // It fails everything before the others have finished anything: nothing to
        // compare with yet.
        for _ in 0..10 {
            assert!(fleet.record("fast-failer", Outcome::InfraFailure).is_none());
        }
        assert!(fleet.review(&all(&fleet)).is_empty());
        for _ in 0..8 {
            fleet.record("a", Outcome::Success);
            fleet.record("b", Outcome::Success);
        }
        let caught = fleet.review(&all(&fleet));
        assert_eq!(caught.len(), 1);
        assert_eq!(caught[0].worker, "fast-failer");
        assert!(!fleet.takes_work("fast-failer"));
        assert!(fleet.takes_work("a") && fleet.takes_work("b"));
        assert!(fleet.review(&all(&fleet)).is_empty(), "judged once");
    }

    #[test]
    fn one_bad_worker_among_healthy_ones_is_caught_at_the_minimum_sample() {
        let mut fleet = fleet();
        for w in ["a", "b", "c"] {
            fleet.enroll(w, String::new());
        }
        for _ in 0..20 {
            assert!(fleet.record("a", Outcome::Success).is_none());
            assert!(fleet.record("b", Outcome::Success).is_none());
        }
        let mut caught = None;
        for i in 1..=20 {
            if let Some(t) = fleet.record("c", Outcome::InfraFailure) {
                caught = Some((i, t));
                break;
            }
        }
        let (after, transition) = caught.expect("quarantined");
        assert_eq!(after, 8, "caught as soon as it has min_samples outcomes");
        assert_eq!((transition.from, transition.to), ("active", "quarantined"));
        assert!(transition
            .reason
            .contains("infrastructure failures: 8 of its last 8"));
        assert!(!fleet.takes_work("c"));
    }

    #[test]
    fn a_pool_where_everything_fails_quarantines_nobody() {
        let mut fleet = fleet();
        for w in ["a", "b", "c"] {
            fleet.enroll(w, String::new());
        }
        for _ in 0..50 {
            for w in ["a", "b", "c"] {
                assert!(fleet.record(w, Outcome::NonzeroExit).is_none());
                assert!(fleet.record(w, Outcome::InfraFailure).is_none());
            }
        }
    }

    #[test]
    fn pools_are_judged_apart_and_a_lone_worker_is_not_judged() {
        let mut fleet = fleet();
        fleet.enroll("gpu", "gpu".into());
        fleet.enroll("cpu1", "cpu".into());
        fleet.enroll("cpu2", "cpu".into());
        for _ in 0..20 {
            fleet.record("cpu1", Outcome::Success);
            fleet.record("cpu2", Outcome::Success);
            // Nothing to compare the only GPU worker with.
            assert!(fleet.record("gpu", Outcome::NonzeroExit).is_none());
        }
    }

    #[test]
    fn probes_release_or_extend_a_quarantine() {
        let mut fleet = Fleet::new(
            QuarantineConfig {
                canaries: 2,
                cooldown: paddock_config::Span::secs(0),
                ..QuarantineConfig::default()
            },
            Arc::new(SystemClock),
        );
        fleet.enroll("w", String::new());
        fleet.set(
            "w",
            Standing::Quarantined {
                manual: false,
                probe_at: Some(Instant::now()),
                strikes: 0,
            },
            "test".into(),
        );
        let due = fleet.due_for_probing(Instant::now(), &all(&fleet));
        assert_eq!(due.len(), 1);
        assert!(fleet.canary("w", true, "").is_none());
        let failed = fleet.canary("w", false, "wrong output").unwrap();
        assert_eq!(failed.to, "quarantined");
        assert!(matches!(
            fleet.get("w").unwrap().standing,
            Standing::Quarantined { strikes: 1, .. }
        ));
        fleet.due_for_probing(Instant::now() + Duration::from_secs(1), &all(&fleet));
        assert!(fleet.canary("w", true, "").is_none());
        let released = fleet.canary("w", true, "").unwrap();
        assert_eq!(released.to, "active");
        assert_eq!(fleet.get("w").unwrap().recent().outcomes, 0);
    }

    #[test]
    fn workers_long_gone_are_forgotten() {
        let mut fleet = fleet();
        fleet.enroll("here", String::new());
        fleet.enroll("gone", String::new());
        let later = Instant::now() + Duration::from_secs(7200);
        fleet.forget_gone(&["here".to_owned()].into_iter().collect(), later);
        assert!(fleet.get("here").is_some());
        assert!(fleet.get("gone").is_none());
    }

    #[test]
    fn an_operators_quarantine_is_never_probed() {
        let mut fleet = fleet();
        fleet.enroll("w", String::new());
        fleet.set(
            "w",
            Standing::Quarantined {
                manual: true,
                probe_at: None,
                strikes: 0,
            },
            "operator".into(),
        );
        assert!(fleet
            .due_for_probing(Instant::now() + Duration::from_secs(3600), &all(&fleet))
            .is_empty());
    }
}
