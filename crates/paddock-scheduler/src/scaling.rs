//! The autoscaling signal: for each pool of workers (workers sharing the value of the
//! quarantine's `pool_property`), how much work waits, what serves it, and how many
//! workers the pool should have, `desired_workers`, for an autoscaler to follow (a
//! HorizontalPodAutoscaler on an external metric, or KEDA's Prometheus scaler).
//!
//! The rule: a pool is short when more actions wait than `queued_per_slot` (2) per
//! slot of its active workers, and then wants as many workers (of its usual size) as
//! keep that ratio; it has too many when more than `idle_fraction` (20%) of its
//! active workers have run nothing for `idle_after` (5 minutes), and then wants the
//! idle ones gone. Connected workers that take no work (draining, quarantined,
//! probing) are counted on top: they hold a replica but serve nothing.
//!
//! An action that names no pool is counted in pool `""`, the pool of workers without
//! the property. Pools reported are those of the workers the scheduler knows (for an
//! hour after they leave) and the configured `pools`, never one a client names. In
//! `/metrics` at most [`MAX_POOL_SERIES`] pools get series of their own over the
//! server's life (the rest are summed under `pool="(other)"`), so workers cannot grow
//! the metrics either.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use paddock_config::AutoscalingConfig;

use crate::state::{JobState, State};
use crate::Inner;

/// How often the gauges are brought up to date.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Pools with series of their own in `/metrics`, at most.
const MAX_POOL_SERIES: usize = 256;
const OTHER_POOLS: &str = "(other)";

/// The pools given series in `/metrics`, and when they were last set.
#[derive(Default)]
pub(crate) struct PoolGauges {
    at: Option<Instant>,
    labelled: BTreeSet<String>,
}

/// One pool's load and the workers it should have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolLoad {
    pub pool: String,
    /// Client actions waiting for a worker.
    pub queued: usize,
    /// Connected workers, taking work or not.
    pub workers: usize,
    /// Capacity of the connected workers that take work.
    pub slots: usize,
    /// Actions running on the pool's workers.
    pub running: usize,
    /// Workers taking work that have run nothing for `idle_after`.
    pub idle_workers: usize,
    pub desired_workers: usize,
}

/// What the rule needs to know of a pool.
#[derive(Debug, Clone, Copy, Default)]
struct Counted {
    queued: usize,
    active: usize,
    inactive: usize,
    slots: usize,
    running: usize,
    idle: usize,
}

/// The workers a pool should have; `slots_per_worker` sizes the workers to add (the
/// pool's own, or the fleet's when the pool has none).
fn desired(config: &AutoscalingConfig, c: Counted, slots_per_worker: f64) -> usize {
    // The configuration is checked (above 0); the floor only keeps arithmetic sane.
    let per_slot = config.queued_per_slot.max(0.001);
    let active = if c.queued as f64 > c.slots as f64 * per_slot {
        let needed = (c.queued as f64 / (slots_per_worker.max(1.0) * per_slot)).ceil();
        // `as` saturates; no pool wants more workers than actions.
        (needed as usize).min(c.queued).max(c.active)
    } else if c.idle as f64 > config.idle_fraction * c.active as f64 {
        let busy = c.active - c.idle;
        // Something waiting or running keeps one worker.
        busy.max(usize::from(c.queued + c.running > 0))
    } else {
        c.active
    };
    active.saturating_add(c.inactive)
}

impl Inner {
    /// Every reported pool's load, by pool name.
    pub(crate) fn pools(&self, state: &State, now: Instant) -> Vec<PoolLoad> {
        let config = &self.config.autoscaling;
        let property = &self.config.quarantine.pool_property;
        let known: BTreeSet<&str> = state
            .fleet
            .records()
            .map(|(_, record)| record.pool.as_str())
            .chain(config.pools.iter().map(String::as_str))
            .collect();
        let mut pools: BTreeMap<&str, Counted> =
            known.iter().map(|p| (*p, Counted::default())).collect();
        for job_id in state.queue.jobs() {
            let job = &state.jobs[&job_id];
            if !job.kind.is_client() || !matches!(job.state, JobState::Queued) {
                continue;
            }
            let pool = job
                .platform
                .iter()
                .find(|(name, _)| name == property)
                .map_or("", |(_, value)| value.as_str());
            // A pool no worker has and nobody configured is not reported.
            if let Some(counted) = pools.get_mut(pool) {
                counted.queued += 1;
            } else if pool.is_empty() {
                pools.entry("").or_default().queued += 1;
            }
        }
        for worker in state.workers.values() {
            let Some(record) = state.fleet.get(&worker.name) else {
                continue;
            };
            let counted = pools.entry(record.pool.as_str()).or_default();
            counted.running += worker.running().len();
            if record.standing.takes_work() {
                counted.active += 1;
                counted.slots += worker.capacity;
                if worker.idle_for(now) >= config.idle_after.get() {
                    counted.idle += 1;
                }
            } else {
                counted.inactive += 1;
            }
        }
        let (fleet_slots, fleet_active) = pools
            .values()
            .fold((0, 0), |(s, a), c| (s + c.slots, a + c.active));
        let fleet_size = match fleet_active {
            0 => 1.0,
            n => fleet_slots as f64 / n as f64,
        };
        pools
            .into_iter()
            .map(|(pool, c)| {
                let size = match c.active {
                    0 => fleet_size,
                    n => c.slots as f64 / n as f64,
                };
                PoolLoad {
                    pool: pool.to_owned(),
                    queued: c.queued,
                    workers: c.active + c.inactive,
                    slots: c.slots,
                    running: c.running,
                    idle_workers: c.idle,
                    desired_workers: desired(config, c, size),
                }
            })
            .collect()
    }

    /// Sets the per-pool gauges, every [`REPORT_EVERY`] (counting the queue costs a
    /// pass over it; autoscalers look every 15 s or so); pools that are no longer
    /// reported go to zero.
    pub(crate) fn report_pools(&self) {
        let mut gauges = self.pool_gauges.lock();
        let now = self.clock.now();
        if gauges
            .at
            .is_some_and(|at| now.duration_since(at) < REPORT_EVERY)
        {
            return;
        }
        gauges.at = Some(now);
        let loads = self.pools(&self.state.lock(), now);
        let labelled = &mut gauges.labelled;
        let mut by_label: BTreeMap<String, PoolLoad> = BTreeMap::new();
        for load in loads {
            let label = match labelled.contains(&load.pool) || labelled.len() < MAX_POOL_SERIES {
                true => load.pool.clone(),
                false => OTHER_POOLS.to_owned(),
            };
            labelled.insert(label.clone());
            let sum = by_label.entry(label).or_default();
            sum.queued += load.queued;
            sum.workers += load.workers;
            sum.slots += load.slots;
            sum.running += load.running;
            sum.idle_workers += load.idle_workers;
            sum.desired_workers = sum.desired_workers.saturating_add(load.desired_workers);
        }
        // Pools no longer reported go to zero.
        for pool in labelled.iter() {
            let load = by_label.get(pool).cloned().unwrap_or_default();
            for (name, value) in [
                ("paddock_pool_queued", load.queued),
                ("paddock_pool_workers", load.workers),
                ("paddock_pool_slots", load.slots),
                ("paddock_pool_running", load.running),
                ("paddock_pool_idle_workers", load.idle_workers),
                ("paddock_pool_desired_workers", load.desired_workers),
            ] {
                metrics::gauge!(name, "pool" => pool.clone()).set(value as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(queued: usize, active: usize, slots: usize, idle: usize) -> Counted {
        Counted {
            queued,
            active,
            slots,
            idle,
            ..Counted::default()
        }
    }

    #[test]
    fn a_deep_queue_asks_for_workers_of_the_pool_s_size() {
        let config = AutoscalingConfig::default();
        // 4 workers of 8 slots: short once more than 64 wait.
        assert_eq!(desired(&config, counted(64, 4, 32, 0), 8.0), 4);
        assert_eq!(desired(&config, counted(65, 4, 32, 0), 8.0), 5);
        assert_eq!(desired(&config, counted(1_000, 4, 32, 0), 8.0), 63);
        // From zero: sized like the rest of the fleet.
        assert_eq!(desired(&config, counted(10, 0, 0, 0), 4.0), 2);
    }

    #[test]
    fn idle_workers_beyond_the_fraction_are_let_go() {
        let config = AutoscalingConfig::default();
        // 2 of 10 idle: not more than 20%.
        assert_eq!(desired(&config, counted(0, 10, 40, 2), 4.0), 10);
        assert_eq!(desired(&config, counted(0, 10, 40, 3), 4.0), 7);
        // All idle and nothing to do: none; something queued keeps one.
        assert_eq!(desired(&config, counted(0, 3, 12, 3), 4.0), 0);
        assert_eq!(desired(&config, counted(1, 3, 12, 3), 4.0), 1);
    }

    #[test]
    fn workers_that_take_no_work_are_counted_on_top() {
        let config = AutoscalingConfig::default();
        let c = Counted {
            inactive: 2,
            ..counted(0, 3, 12, 0)
        };
        assert_eq!(desired(&config, c, 4.0), 5);
    }
}
