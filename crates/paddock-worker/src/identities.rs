//! The identities a worker's actions run as: each running action has a uid and gid
//! that no other running action has, so that two actions on one worker can neither
//! signal nor reach each other's files even if something were shared, and one
//! action's per-user limits (processes, quotas) never count against another's.

use paddock_runner::{Identities, Identity};
use parking_lot::Mutex;

pub struct IdentityPool {
    identities: Identities,
    /// Whether each identity is taken.
    taken: Mutex<Vec<bool>>,
}

/// An identity held by one action; it is free again when this is dropped.
pub struct Held<'a> {
    pool: &'a IdentityPool,
    index: u32,
}

impl IdentityPool {
    pub fn new(identities: Identities) -> IdentityPool {
        IdentityPool {
            identities,
            taken: Mutex::new(vec![false; identities.count as usize]),
        }
    }

    /// A free identity, or a message saying that there is none.
    pub fn take(&self) -> Result<Held<'_>, String> {
        let mut taken = self.taken.lock();
        let Some(index) = taken.iter().position(|t| !t) else {
            return Err(format!(
                "all {} identities are in use (worker.sandbox.identities must be at least the worker's capacity)",
                self.identities.count
            ));
        };
        taken[index] = true;
        Ok(Held {
            pool: self,
            index: index as u32,
        })
    }
}

impl Held<'_> {
    pub fn identity(&self) -> Identity {
        self.pool.identities.get(self.index)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.pool.taken.lock()[self.index as usize] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_actions_never_share_an_identity() {
        let pool = IdentityPool::new(Identities {
            uid: 5000,
            gid: 6000,
            count: 2,
        });
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_ne!(a.identity(), b.identity());
        assert!(pool.take().is_err());
        let freed = a.identity();
        drop(a);
        assert_eq!(pool.take().unwrap().identity(), freed);
        assert_eq!(b.identity().gid - b.identity().uid, 1000);
    }
}
