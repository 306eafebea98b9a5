//! Watching the scheduler for the pages: each second, the workers' standings (a
//! change is noted with the scheduler's reason and time) and each pool's queue
//! depth; each minute, each connected worker's health window.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use paddock_history::{HealthSample, History, StandingChange};
use paddock_scheduler::Scheduler;

/// How often the scheduler is looked at.
const EVERY: Duration = Duration::from_secs(1);
/// Looks between health samples: a minute.
const HEALTH_EVERY: u32 = 60;

/// Watches `scheduler` into `history` until `shutdown` resolves.
pub async fn watch(
    history: Arc<History>,
    scheduler: Scheduler,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut standings: HashMap<String, String> = HashMap::new();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut looks: u32 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut shutdown => return,
        }
        let workers = scheduler.workers();
        for worker in &workers {
            let before = standings.insert(worker.name.clone(), worker.standing.clone());
            let changed = match &before {
                Some(was) => was != &worker.standing,
                // First seen: only a standing other than the usual is news.
                None => worker.standing != "active",
            };
            if changed {
                history.standing_changed(StandingChange {
                    worker: worker.name.clone(),
                    from: before.unwrap_or_default(),
                    to: worker.standing.clone(),
                    reason: worker.reason.clone(),
                    at: worker.since,
                });
            }
        }
        for pool in scheduler.pools() {
            history.queue_depth(&pool.pool, pool.queued as u64);
        }
        if looks.is_multiple_of(HEALTH_EVERY) {
            // Sampled by the server the worker is connected to: servers sharing state
            // know every worker's record, and one sample a minute is enough.
            for worker in workers.iter().filter(|w| w.connected) {
                let r = worker.recent;
                history.health_sample(
                    &worker.name,
                    HealthSample {
                        outcomes: r.outcomes as u64,
                        failures: (r.infra_failures + r.nonzero_exits + r.disagreements) as u64,
                    },
                );
            }
        }
        looks = looks.wrapping_add(1);
    }
}
