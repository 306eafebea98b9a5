//! The queue of actions waiting for a worker.
//!
//! Order: by priority first (lower `ExecutionPolicy.priority` runs sooner); within a
//! priority, round robin across `tool_invocation_id`s, so one huge build cannot starve
//! a small one; within an invocation, first in, first out.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::JobId;

#[derive(Default)]
pub struct FairQueue {
    levels: BTreeMap<i32, Level>,
    len: usize,
}

/// One priority: invocations in turn order, each with its jobs in arrival order.
#[derive(Default)]
struct Level {
    turns: VecDeque<String>,
    jobs: HashMap<String, VecDeque<JobId>>,
}

impl FairQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a job at the back of its invocation's line (or the front, for a retry).
    pub fn push(&mut self, priority: i32, invocation: &str, job: JobId, front: bool) {
        let level = self.levels.entry(priority).or_default();
        let line = level.jobs.entry(invocation.to_owned()).or_insert_with(|| {
            level.turns.push_back(invocation.to_owned());
            VecDeque::new()
        });
        if front {
            line.push_front(job);
        } else {
            line.push_back(job);
        }
        self.len += 1;
    }

    /// Jobs in the order they should be offered to workers.
    pub fn in_order(&self) -> impl Iterator<Item = JobId> + '_ {
        self.levels.values().flat_map(|level| {
            level
                .turns
                .iter()
                .flat_map(move |inv| level.jobs[inv].iter().copied())
        })
    }

    /// Removes a job (dispatched or cancelled). A dispatched job sends its invocation
    /// to the back of the turn order.
    pub fn remove(
        &mut self,
        priority: i32,
        invocation: &str,
        job: JobId,
        dispatched: bool,
    ) -> bool {
        let Some(level) = self.levels.get_mut(&priority) else {
            return false;
        };
        let Some(line) = level.jobs.get_mut(invocation) else {
            return false;
        };
        let Some(at) = line.iter().position(|j| *j == job) else {
            return false;
        };
        line.remove(at);
        self.len -= 1;
        let emptied = line.is_empty();
        if emptied {
            level.jobs.remove(invocation);
        }
        if emptied || dispatched {
            if let Some(turn) = level.turns.iter().position(|i| i == invocation) {
                level.turns.remove(turn);
                if !emptied {
                    level.turns.push_back(invocation.to_owned());
                }
            }
        }
        if level.jobs.is_empty() {
            self.levels.remove(&priority);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_all(q: &mut FairQueue, meta: &HashMap<JobId, (i32, &str)>) -> Vec<JobId> {
        let mut order = Vec::new();
        loop {
            let Some(job) = q.in_order().next() else {
                break;
            };
            let (p, inv) = meta[&job];
            assert!(q.remove(p, inv, job, true));
            order.push(job);
        }
        order
    }

    #[test]
    fn priority_then_round_robin_then_fifo() {
        let mut q = FairQueue::default();
        let mut meta = HashMap::new();
        let mut add = |q: &mut FairQueue, id: JobId, p: i32, inv: &'static str| {
            q.push(p, inv, id, false);
            meta.insert(id, (p, inv));
        };
        // A big build queues five actions, then a small one queues two.
        for id in 1..=5 {
            add(&mut q, id, 0, "big");
        }
        add(&mut q, 10, 0, "small");
        add(&mut q, 11, 0, "small");
        // An urgent action from a third invocation.
        add(&mut q, 20, -5, "urgent");
        assert_eq!(q.len(), 8);
        assert_eq!(take_all(&mut q, &meta), vec![20, 1, 10, 2, 11, 3, 4, 5]);
        assert!(q.is_empty());
    }

    #[test]
    fn retries_go_first_and_cancelled_jobs_leave() {
        let mut q = FairQueue::default();
        q.push(0, "a", 1, false);
        q.push(0, "a", 2, false);
        q.push(0, "a", 3, true);
        assert_eq!(q.in_order().collect::<Vec<_>>(), vec![3, 1, 2]);
        assert!(q.remove(0, "a", 1, false));
        assert!(!q.remove(0, "a", 1, false));
        assert_eq!(q.in_order().collect::<Vec<_>>(), vec![3, 2]);
    }
}
