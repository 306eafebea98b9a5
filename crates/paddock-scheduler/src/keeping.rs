//! Keeping the workers' records in their [`RecordStore`]: what is saved when, and
//! how a server sharing the store takes in what other servers wrote.
//!
//! Saving runs in a task of its own, so a slow or silent store never holds up the
//! scheduler's timers: a change of standing is saved at once (woken by
//! `Inner::save_now`), outcomes every [`SAVE_OUTCOMES_EVERY`], everything at a
//! graceful stop, and a failed save is retried with back-off. Every
//! [`PULL_EVERY`] the records of the workers connected here are compared with the
//! store's, so an operator's order given to another server reaches the server
//! whose worker it concerns; a connecting worker's record is read afresh.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tonic::Status;

use crate::health::Unsaved;
use crate::saved::{RecordStore, Saved, SavedStateError, SavedWorker};
use crate::Inner;

/// How long outcomes (not changes of standing, which are saved at once) may wait to
/// be saved: a crash loses at most this much of the health windows.
const SAVE_OUTCOMES_EVERY: Duration = Duration::from_secs(5);

/// How often the records of the workers connected here are compared with the store.
const PULL_EVERY: Duration = Duration::from_secs(5);

/// How often connected workers' records are saved as seen, so that a restart (or
/// another server) knows they were there.
const TOUCH_EVERY: Duration = Duration::from_secs(600);

/// The longest pause between retries of a failed save.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The records' store, and the state of saving to it.
pub(crate) struct Keeping {
    store: Arc<dyn RecordStore>,
    /// When outcomes were last saved.
    outcomes_saved: Mutex<Instant>,
    /// When connected workers were last noted as seen.
    touched: Mutex<Instant>,
    /// Held while saving or taking in others' records: one at a time, so that a
    /// record read from the store is never overwritten by a save taken before it.
    saving: tokio::sync::Mutex<()>,
}

impl Keeping {
    /// Keeping in `store`, with the scheduler's time `now`.
    pub(crate) fn new(store: Arc<dyn RecordStore>, now: Instant) -> Keeping {
        Keeping {
            store,
            outcomes_saved: Mutex::new(Instant::now()),
            touched: Mutex::new(now),
            saving: tokio::sync::Mutex::new(()),
        }
    }
}

/// Saves and pulls records until the scheduler is dropped.
pub(crate) async fn keep_records(weak: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::ZERO;
    let mut retry_at = Instant::now();
    let mut pulled = Instant::now();
    loop {
        {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            if inner.records.is_none() {
                return;
            }
            let save_now = async { inner.save_now.notified().await };
            tokio::select! {
                _ = tick.tick() => {}
                _ = save_now => {}
            }
        }
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if Instant::now() < retry_at {
            continue;
        }
        let mut failed = inner.save_due(false).await.is_err();
        if pulled.elapsed() >= PULL_EVERY && !failed {
            pulled = Instant::now();
            let here: Vec<String> = {
                let state = inner.state.lock();
                let names: HashSet<&String> = state.workers.values().map(|w| &w.name).collect();
                names.into_iter().cloned().collect()
            };
            failed = inner.refresh(&here).await.is_err();
        }
        backoff = match failed {
            true => (backoff * 2).clamp(Duration::from_millis(500), MAX_BACKOFF),
            false => Duration::ZERO,
        };
        retry_at = Instant::now() + backoff;
    }
}

impl Inner {
    /// Whether connected workers are due to be noted as seen (see [`TOUCH_EVERY`]).
    pub(crate) fn due_to_touch(&self, now: Instant) -> bool {
        let Some(keeping) = &self.records else {
            return false;
        };
        let mut touched = keeping.touched.lock();
        if now.duration_since(*touched) < TOUCH_EVERY {
            return false;
        }
        *touched = now;
        true
    }

    /// Takes in the records among `names` that other servers sharing the store
    /// wrote since this one last did: a connecting worker's (a quarantine decided
    /// elsewhere), or an operator's order given to another server.
    pub(crate) async fn refresh(&self, names: &[String]) -> Result<(), SavedStateError> {
        let Some(keeping) = &self.records else {
            return Ok(());
        };
        let _one_at_a_time = keeping.saving.lock().await;
        self.refresh_locked(keeping, names).await
    }

    async fn refresh_locked(
        &self,
        keeping: &Keeping,
        names: &[String],
    ) -> Result<(), SavedStateError> {
        if names.is_empty() {
            return Ok(());
        }
        let found = keeping
            .store
            .changed_elsewhere(names)
            .await
            .inspect_err(|e| {
                tracing::error!(error = %e, "could not read the workers' records");
            })?;
        self.adopt(found);
        Ok(())
    }

    /// Takes records written by another server (see [`crate::health::Fleet::adopt`]).
    /// A session here whose identity is not the one the name is bound to in the
    /// store (two identities claimed a new name on two servers at once) is ended.
    fn adopt(&self, found: Vec<SavedWorker>) {
        if found.is_empty() {
            return;
        }
        let mut state = self.state.lock();
        for (record, identity) in found {
            let name = record.name.clone();
            let sessions: Vec<u64> = state
                .workers
                .values()
                .filter(|w| w.name == name)
                .map(|w| w.session)
                .collect();
            let was = state.fleet.get(&name).map(|r| r.standing.name());
            state.fleet.adopt(record, !sessions.is_empty());
            let is = state.fleet.get(&name).map(|r| r.standing.name());
            if was.is_some() && was != is {
                tracing::warn!(worker = %name, from = was.unwrap_or(""), to = is.unwrap_or("forgotten"), "worker standing changed on another server");
            }
            let Some(identity) = identity else {
                continue;
            };
            let previous = state.bindings.insert(name.clone(), identity.clone());
            if previous.is_some_and(|p| p != identity) {
                for session in sessions {
                    self.drop_worker(
                        &mut state,
                        session,
                        "its name is bound to another identity on another server",
                    );
                }
            }
        }
        self.dispatch(&mut state);
    }

    /// What to save now, if anything: changes of standing at once, outcomes every
    /// [`SAVE_OUTCOMES_EVERY`], everything when `finally`.
    fn to_save(&self, finally: bool) -> Option<(Saved, BTreeSet<String>)> {
        let last = &self.records.as_ref()?.outcomes_saved;
        let mut state = self.state.lock();
        let due = match state.fleet.unsaved() {
            Unsaved::Nothing => false,
            Unsaved::Outcomes => finally || last.lock().elapsed() >= SAVE_OUTCOMES_EVERY,
            Unsaved::Standings => true,
        };
        if !due {
            return None;
        }
        *last.lock() = Instant::now();
        let (workers, changed) = state.fleet.saved();
        let saved = Saved {
            workers,
            bindings: state
                .bindings
                .iter()
                .map(|(name, identity)| (name.clone(), identity.clone()))
                .collect(),
        };
        Some((saved, changed))
    }

    /// Saves what is due (see [`Inner::to_save`]). Returns the names whose records
    /// another server had written first: this server has taken theirs instead. A
    /// failure is logged, and the changes are saved again later.
    pub(crate) async fn save_due(&self, finally: bool) -> Result<Vec<String>, SavedStateError> {
        let Some(keeping) = &self.records else {
            return Ok(Vec::new());
        };
        let _one_at_a_time = keeping.saving.lock().await;
        self.save_locked(keeping, finally).await
    }

    async fn save_locked(
        &self,
        keeping: &Keeping,
        finally: bool,
    ) -> Result<Vec<String>, SavedStateError> {
        let Some((saved, changed)) = self.to_save(finally) else {
            return Ok(Vec::new());
        };
        let conflicts = match keeping.store.store(saved, changed.clone()).await {
            Ok(conflicts) => conflicts,
            Err(e) => {
                tracing::error!(error = %e, "could not save the workers' records; retrying");
                metrics::counter!("paddock_state_save_failures_total").increment(1);
                self.state.lock().fleet.mark_unsaved(changed);
                return Err(e);
            }
        };
        if !conflicts.is_empty() {
            if let Err(e) = self.refresh_locked(keeping, &conflicts).await {
                // Saved again (and so read again) at the next attempt.
                self.state
                    .lock()
                    .fleet
                    .mark_unsaved(conflicts.iter().cloned().collect());
                return Err(e);
            }
        }
        Ok(conflicts)
    }

    /// Carries out an operator's order on the worker's record as the store has it,
    /// and saves it before answering; nothing else saves or reads records in
    /// between, so an order that another server's write overtook is reported.
    pub(crate) async fn order(
        &self,
        worker: &str,
        apply: impl FnOnce(&mut crate::state::State) -> Result<(), Status>,
    ) -> Result<(), Status> {
        let Some(keeping) = &self.records else {
            return apply(&mut self.state.lock());
        };
        let _one_at_a_time = keeping.saving.lock().await;
        self.refresh_locked(keeping, &[worker.to_owned()])
            .await
            .map_err(|e| Status::unavailable(format!("cannot read the worker's record: {e}")))?;
        apply(&mut self.state.lock())?;
        match self.save_locked(keeping, false).await {
            Ok(conflicts) if conflicts.iter().any(|c| c == worker) => Err(Status::aborted(
                "the worker's record changed on another server meanwhile; give the order again",
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(Status::unavailable(format!(
                "the order holds on this server, but saving it failed (retried in the \
                 background): {e}"
            ))),
        }
    }
}
