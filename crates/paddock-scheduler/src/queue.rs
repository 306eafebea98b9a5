//! The queue of actions waiting for a worker.
//!
//! One queue per class of action (its instance and platform: what a worker must
//! serve and offer to run it), so that a free worker looks only at the classes it can
//! run, however deep the others are. Within a class: by priority first (lower
//! `ExecutionPolicy.priority` runs sooner); within a priority, round robin across
//! `tool_invocation_id`s, so one huge build cannot starve a small one; within an
//! invocation, first in, first out. Across classes a worker able to run several takes
//! the lowest priority first, then the job queued first.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::JobId;

/// What a job needs of a worker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Class {
    pub instance: String,
    pub platform: Vec<(String, String)>,
    /// The one worker that may run it (a canary), if only one may.
    pub only_on: Option<String>,
}

/// Names a class while it has queued jobs.
pub type ClassId = u64;

/// Every class's queue. A class is forgotten once its queue is empty, so the
/// platforms clients name cannot grow it beyond what is queued.
#[derive(Default)]
pub struct Queues {
    ids: HashMap<Class, ClassId>,
    classes: HashMap<ClassId, (Class, FairQueue)>,
    next: ClassId,
    len: usize,
}

impl Queues {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a job to its class's queue (see [`FairQueue::push`]); returns the class,
    /// which removing it takes.
    pub fn push(
        &mut self,
        class: Class,
        priority: i32,
        invocation: &str,
        job: JobId,
        front: bool,
    ) -> ClassId {
        let id = match self.ids.get(&class) {
            Some(id) => *id,
            None => {
                self.next += 1;
                self.ids.insert(class.clone(), self.next);
                self.classes
                    .insert(self.next, (class, FairQueue::default()));
                self.next
            }
        };
        let (_, queue) = self.classes.get_mut(&id).expect("interned above");
        queue.push(priority, invocation, job, front);
        self.len += 1;
        id
    }

    /// Removes a job from its class's queue (see [`FairQueue::remove`]).
    pub fn remove(
        &mut self,
        class: ClassId,
        priority: i32,
        invocation: &str,
        job: JobId,
        dispatched: bool,
    ) -> bool {
        let Some((_, queue)) = self.classes.get_mut(&class) else {
            return false;
        };
        if !queue.remove(priority, invocation, job, dispatched) {
            return false;
        }
        self.len -= 1;
        if queue.is_empty() {
            if let Some((class, _)) = self.classes.remove(&class) {
                self.ids.remove(&class);
            }
        }
        true
    }

    /// Every class with queued jobs, and its queue.
    pub fn classes(&self) -> impl Iterator<Item = (&Class, &FairQueue)> {
        self.classes.values().map(|(class, queue)| (class, queue))
    }

    /// Every queued job, class by class.
    pub fn jobs(&self) -> impl Iterator<Item = JobId> + '_ {
        self.classes().flat_map(|(_, queue)| queue.in_order())
    }
}

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
        assert_eq!(q.in_order().count(), 8);
        assert_eq!(take_all(&mut q, &meta), vec![20, 1, 10, 2, 11, 3, 4, 5]);
        assert!(q.is_empty());
    }

    #[test]
    fn each_class_has_its_queue_and_an_empty_one_is_forgotten() {
        let linux = vec![("OSFamily".to_owned(), "linux".to_owned())];
        let arm = vec![("Arch".to_owned(), "arm64".to_owned())];
        let class = |instance: &str, platform: &Vec<(String, String)>| Class {
            instance: instance.into(),
            platform: platform.clone(),
            only_on: None,
        };
        let mut q = Queues::default();
        let a = q.push(class("main", &linux), 0, "x", 1, false);
        let b = q.push(class("main", &arm), 0, "x", 2, false);
        let c = q.push(class("other", &linux), 0, "x", 3, false);
        assert_eq!(q.push(class("main", &linux), 0, "y", 4, false), a);
        assert!(a != b && b != c && a != c);
        assert_eq!(q.len(), 4);
        let of = |q: &Queues, instance: &str| -> Vec<JobId> {
            q.classes()
                .filter(|(class, _)| class.instance == instance && class.platform == linux)
                .flat_map(|(_, queue)| queue.in_order())
                .collect()
        };
        assert_eq!(of(&q, "main"), vec![1, 4]);
        assert!(q.remove(b, 0, "x", 2, true));
        assert!(!q.remove(b, 0, "x", 2, true));
        assert_eq!(q.classes().count(), 2, "the emptied class is gone");
        let mut all: Vec<JobId> = q.jobs().collect();
        all.sort();
        assert_eq!(all, vec![1, 3, 4]);
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
