//! The operations clients follow: one per Execute call, live while its execution
//! runs, and kept after it finishes (for `operation_retention`, and at most
//! `max_finished` per identity) so that WaitExecution and GetOperation can find it.
//!
//! What a finished operation keeps is small: a cache hit keeps only the key of its
//! result (read again from the ActionCache if anyone asks), and the operations of one
//! execution share its response. So a client that asks for the same large cached
//! result a thousand times does not make the server hold a thousand copies of it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use paddock_cas::ActionKey;
use paddock_reapi::proto::re::ExecuteResponse;
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::shared::ExecutionId;
use crate::{JobId, Snapshot, Stage};

/// Who started an operation, and on which instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub identity: String,
    pub instance: String,
}

/// What an unfinished operation follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behind {
    /// An execution in this scheduler.
    Job(JobId),
    /// An execution in the queue servers share, which any of them may run.
    Shared(ExecutionId),
}

impl Behind {
    fn job(self) -> Option<JobId> {
        match self {
            Behind::Job(job) => Some(job),
            Behind::Shared(_) => None,
        }
    }
}

/// One operation.
struct Entry {
    kept: Kept,
    /// The execution behind the operation, until it finishes.
    job: Option<Behind>,
    finished_at: Option<Instant>,
    owner: Owner,
}

enum Kept {
    /// Followed through its channel: queued, running, or finished with its response.
    Live(watch::Sender<Snapshot>),
    /// A finished cache hit: the key of its result.
    Hit(ActionKey),
}

/// What a lookup finds.
pub(crate) enum Found {
    /// A channel that has (or will have) the operation's whole state, and the
    /// execution behind it while it runs.
    Live(watch::Receiver<Snapshot>, Option<JobId>),
    /// A finished cache hit, whose result is read again from the ActionCache.
    Hit(ActionKey),
}

pub(crate) struct Operations {
    entries: HashMap<String, Entry>,
    /// Unfinished operations, per identity.
    in_flight: HashMap<String, usize>,
    /// Finished operations, per identity, oldest first (some may be gone already).
    finished: HashMap<String, VecDeque<String>>,
    max_finished: usize,
    clock: SharedClock,
}

impl Operations {
    pub fn new(max_finished: usize, clock: SharedClock) -> Operations {
        Operations {
            entries: HashMap::new(),
            in_flight: HashMap::new(),
            finished: HashMap::new(),
            max_finished: max_finished.max(1),
            clock,
        }
    }

    /// How many unfinished operations `identity` has.
    pub fn in_flight(&self, identity: &str) -> usize {
        self.in_flight.get(identity).copied().unwrap_or(0)
    }

    /// A new operation following `job`, as `snapshot` says it stands.
    pub fn open(
        &mut self,
        snapshot: Snapshot,
        owner: Owner,
        job: JobId,
    ) -> watch::Receiver<Snapshot> {
        *self.in_flight.entry(owner.identity.clone()).or_default() += 1;
        self.open_behind(snapshot, owner, Behind::Job(job))
    }

    fn open_behind(
        &mut self,
        snapshot: Snapshot,
        owner: Owner,
        behind: Behind,
    ) -> watch::Receiver<Snapshot> {
        let name = snapshot.name.clone();
        let (tx, rx) = watch::channel(snapshot);
        self.entries.insert(
            name,
            Entry {
                kept: Kept::Live(tx),
                job: Some(behind),
                finished_at: None,
                owner,
            },
        );
        rx
    }

    /// A new operation following `execution` in the shared queue, as `snapshot` says
    /// it stands; the shared queue counts it against its owner.
    pub fn follow(
        &mut self,
        snapshot: Snapshot,
        owner: Owner,
        execution: ExecutionId,
    ) -> watch::Receiver<Snapshot> {
        self.open_behind(snapshot, owner, Behind::Shared(execution))
    }

    /// The shared execution an unfinished operation follows, if it follows one.
    pub fn following(&self, name: &str) -> Option<ExecutionId> {
        match self.entries.get(name)?.job? {
            Behind::Shared(execution) => Some(execution),
            Behind::Job(_) => None,
        }
    }

    /// An operation that is finished the moment it exists (missing inputs, say).
    pub fn answered(&mut self, snapshot: Snapshot, owner: Owner) -> watch::Receiver<Snapshot> {
        let name = snapshot.name.clone();
        let (tx, rx) = watch::channel(snapshot);
        self.keep_finished(name, Kept::Live(tx), owner);
        rx
    }

    /// A cache hit: the caller gets the whole answer; the table keeps only its key.
    pub fn hit(
        &mut self,
        snapshot: Snapshot,
        owner: Owner,
        key: ActionKey,
    ) -> watch::Receiver<Snapshot> {
        let name = snapshot.name.clone();
        let (_, rx) = watch::channel(snapshot);
        self.keep_finished(name, Kept::Hit(key), owner);
        rx
    }

    fn keep_finished(&mut self, name: String, kept: Kept, owner: Owner) {
        let identity = owner.identity.clone();
        self.entries.insert(
            name.clone(),
            Entry {
                kept,
                job: None,
                finished_at: Some(self.clock.now()),
                owner,
            },
        );
        self.count_finished(name, &identity);
    }

    /// Remembers that `name` finished, forgetting the identity's oldest finished
    /// operation beyond its bound.
    fn count_finished(&mut self, name: String, identity: &str) {
        let finished = self.finished.entry(identity.to_owned()).or_default();
        finished.push_back(name);
        while finished.len() > self.max_finished {
            if let Some(old) = finished.pop_front() {
                if self.entries.get(&old).is_some_and(|e| e.job.is_none()) {
                    self.entries.remove(&old);
                }
            }
        }
    }

    /// Counts an execution against `identity` that none of its operations follows
    /// (all deleted), until [`Operations::settle`] says it ended.
    pub fn charge(&mut self, identity: &str) {
        *self.in_flight.entry(identity.to_owned()).or_default() += 1;
    }

    /// One of `identity`'s executions ended.
    pub fn settle(&mut self, identity: &str) {
        if let Some(count) = self.in_flight.get_mut(identity) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.in_flight.remove(identity);
            }
        }
    }

    pub fn find(&self, name: &str) -> Option<Found> {
        let entry = self.entries.get(name)?;
        Some(match &entry.kept {
            Kept::Live(tx) => Found::Live(tx.subscribe(), entry.job.and_then(Behind::job)),
            Kept::Hit(key) => Found::Hit(key.clone()),
        })
    }

    /// Who started an operation, and where.
    pub fn owner(&self, name: &str) -> Option<&Owner> {
        self.entries.get(name).map(|e| &e.owner)
    }

    /// Where a live operation stands.
    pub fn current(&self, name: &str) -> Option<Snapshot> {
        match &self.entries.get(name)?.kept {
            Kept::Live(tx) => Some(tx.borrow().clone()),
            Kept::Hit(_) => None,
        }
    }

    /// Tells a live operation where it stands now, if that changed.
    pub fn update(&self, snapshot: Snapshot) {
        if let Some(Entry {
            kept: Kept::Live(tx),
            ..
        }) = self.entries.get(&snapshot.name)
        {
            tx.send_if_modified(|s| {
                let changed = s.stage != snapshot.stage || s.worker != snapshot.worker;
                *s = snapshot;
                changed
            });
        }
    }

    /// Finishes an operation with `response` (shared by every operation of its
    /// execution). Returns false if it was not live.
    pub fn finish(&mut self, name: &str, response: Arc<ExecuteResponse>) -> bool {
        let Some(entry) = self.entries.get_mut(name) else {
            return false;
        };
        let Some(behind) = entry.job.take() else {
            return false;
        };
        entry.finished_at = Some(self.clock.now());
        if let Kept::Live(tx) = &entry.kept {
            tx.send_modify(|s| {
                s.stage = Stage::Completed;
                s.worker = None;
                s.response = Some(response);
            });
        }
        let identity = entry.owner.identity.clone();
        if let Behind::Job(_) = behind {
            self.settle(&identity);
        }
        self.count_finished(name.to_owned(), &identity);
        true
    }

    /// The execution behind an unfinished operation.
    pub fn job(&self, name: &str) -> Option<JobId> {
        self.entries.get(name).and_then(|e| e.job?.job())
    }

    /// Forgets an operation; returns whether there was one and the execution it
    /// followed, if it was unfinished. An unfinished one still counts against its
    /// owner until [`Operations::settle`] says its execution ended.
    pub fn remove(&mut self, name: &str) -> Option<Option<JobId>> {
        let entry = self.entries.remove(name)?;
        Some(entry.job.and_then(Behind::job))
    }

    /// Forgets finished operations older than `retention`. Each identity's finished
    /// operations are kept in the order they finished, so only the expired ones and
    /// one more per identity are looked at.
    pub fn expire(&mut self, now: Instant, retention: Duration) {
        let entries = &mut self.entries;
        self.finished.retain(|_, names| {
            while let Some(front) = names.front() {
                let expired = match entries.get(front) {
                    None => true, // deleted, or forgotten beyond the bound
                    Some(entry) => {
                        entry.job.is_none()
                            && entry
                                .finished_at
                                .is_some_and(|t| now.duration_since(t) >= retention)
                    }
                };
                if !expired {
                    break;
                }
                if let Some(name) = names.pop_front() {
                    entries.remove(&name);
                }
            }
            !names.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_reapi::Digest;

    fn snapshot(name: &str) -> Snapshot {
        Snapshot {
            name: name.to_owned(),
            action_digest: Digest::of(name.as_bytes()),
            stage: Stage::Queued,
            worker: None,
            response: None,
        }
    }

    fn owner(identity: &str) -> Owner {
        Owner {
            identity: identity.to_owned(),
            instance: "main".to_owned(),
        }
    }

    #[test]
    fn unfinished_operations_count_against_their_owner_until_they_finish() {
        let mut operations = Operations::new(10, Arc::new(crate::clock::SystemClock));
        let _a = operations.open(snapshot("a"), owner("alice"), 1);
        let _b = operations.open(snapshot("b"), owner("alice"), 2);
        let _c = operations.open(snapshot("c"), owner("bob"), 2);
        assert_eq!(
            (operations.in_flight("alice"), operations.in_flight("bob")),
            (2, 1)
        );
        let response = Arc::new(ExecuteResponse::default());
        assert!(operations.finish("a", response.clone()));
        assert!(
            !operations.finish("a", response.clone()),
            "finished once only"
        );
        assert_eq!(operations.in_flight("alice"), 1);
        // Removed while unfinished: it counts until its execution says it ended.
        assert_eq!(operations.remove("b"), Some(Some(2)));
        assert_eq!(operations.in_flight("alice"), 1);
        operations.settle("alice");
        assert_eq!(operations.in_flight("alice"), 0);
        assert_eq!(operations.owner("c"), Some(&owner("bob")));
    }

    #[test]
    fn finished_operations_are_bounded_per_identity_and_hits_keep_only_their_key() {
        let mut operations = Operations::new(3, Arc::new(crate::clock::SystemClock));
        for i in 0..5 {
            let name = format!("hit-{i}");
            let key = ActionKey {
                instance: "main".into(),
                action: Digest::of(name.as_bytes()),
            };
            let mut done = snapshot(&name);
            done.stage = Stage::Completed;
            done.response = Some(Arc::new(ExecuteResponse::default()));
            let _ = operations.hit(done, owner("alice"), key);
        }
        let _other = operations.answered(snapshot("bobs"), owner("bob"));
        // Alice's two oldest are forgotten; Bob's is not hers to lose.
        assert!(operations.find("hit-0").is_none() && operations.find("hit-1").is_none());
        assert!(matches!(operations.find("hit-4"), Some(Found::Hit(_))));
        assert!(matches!(
            operations.find("bobs"),
            Some(Found::Live(_, None))
        ));
        operations.expire(
            Instant::now() + Duration::from_secs(3600),
            Duration::from_secs(60),
        );
        assert!(operations.find("hit-4").is_none() && operations.find("bobs").is_none());
    }

    #[test]
    fn only_finished_operations_past_their_retention_expire() {
        let mut operations = Operations::new(100, Arc::new(crate::clock::SystemClock));
        let response = Arc::new(ExecuteResponse::default());
        let _early = operations.open(snapshot("early"), owner("alice"), 1);
        let _running = operations.open(snapshot("running"), owner("alice"), 2);
        let _deleted = operations.open(snapshot("deleted"), owner("alice"), 3);
        operations.finish("early", response.clone());
        operations.finish("deleted", response.clone());
        operations.remove("deleted");
        let retention = Duration::from_secs(60);
        // Not yet: nothing goes.
        operations.expire(Instant::now(), retention);
        assert!(operations.find("early").is_some());
        let later = Instant::now() + Duration::from_secs(61);
        let _late = operations.open(snapshot("late"), owner("alice"), 4);
        operations.expire(later, retention);
        assert!(
            operations.find("early").is_none(),
            "finished over a minute ago"
        );
        assert!(operations.find("running").is_some(), "unfinished");
        assert!(operations.find("late").is_some(), "unfinished");
        operations.finish("late", response);
        operations.expire(Instant::now(), retention);
        assert!(operations.find("late").is_some(), "finished just now");
        operations.expire(later + Duration::from_secs(61), retention);
        assert!(operations.find("late").is_none());
        assert!(operations.find("running").is_some());
    }
}
