//! What the index surely lists, for a little while: the blobs whose rows the
//! filter's refreshes read with a lease renewed within the renewal interval.
//!
//! A probe of such a row would find it and leave its lease as it is (leases are
//! renewed only once a renewal interval old), and no collection can take it within
//! that time (collection leaves a lease and more), so FindMissingBlobs
//! answers for these blobs without probing the table, which is most of its cost
//! for blobs this server has never seen. A row is deleted within its lease only
//! when a server finds the store lost the blob; each such deletion is logged in
//! `cas_unlisted`, which the lookup reads (one small statement) and probes what it
//! names: so the answer is the one a probe would give.
//!
//! Ages are the database's, counted on this process's clock from when the refresh
//! was sent (no later than the database's `now()` of it), so a lease is never
//! trusted for longer than it needs no renewal, whatever the clocks say.

use std::time::{Duration, Instant};

use hashlink::LinkedHashMap;
use paddock_reapi::Digest;
use parking_lot::Mutex;

/// How many blobs are remembered at most (about 100 MiB); past it the oldest go,
/// which costs their probes.
const CAPACITY: usize = 1 << 20;

/// Entries added under one hold of the lock.
const LEARNED_AT_ONCE: usize = 10_000;

/// Blobs the index lists, each until when its lease surely needs no renewal.
pub(crate) struct FreshLeases {
    until: Mutex<LinkedHashMap<Digest, Instant>>,
    renewal: Duration,
}

impl FreshLeases {
    /// For leases renewed once `renewal` old.
    pub(crate) fn new(renewal: Duration) -> FreshLeases {
        FreshLeases {
            until: Mutex::new(LinkedHashMap::new()),
            renewal,
        }
    }

    /// Notes rows read by a statement sent at `sent`, each with the age of its
    /// lease (`now() - last_access` in seconds, by the database's clock).
    pub(crate) fn learn(&self, sent: Instant, rows: impl IntoIterator<Item = (Digest, f64)>) {
        let renewal = self.renewal.as_secs_f64();
        let fresh: Vec<(Digest, Instant)> = rows
            .into_iter()
            .filter_map(|(digest, age)| {
                // Negative ages (renewed after the statement began) count as none.
                let left = renewal - age.max(0.0);
                (left > 0.0 && left.is_finite())
                    .then(|| (digest, sent + Duration::from_secs_f64(left)))
            })
            .collect();
        // In slices, so that lookups are not held up behind a large refresh.
        for slice in fresh.chunks(LEARNED_AT_ONCE) {
            let mut until = self.until.lock();
            until.extend(slice.iter().copied());
            // Entries are roughly in order of expiry; the bound is exact.
            let now = Instant::now();
            while until
                .front()
                .is_some_and(|(_, at)| *at <= now || until.len() > CAPACITY)
            {
                until.pop_front();
            }
        }
    }

    /// Splits `digests` into those surely listed now and the rest.
    pub(crate) fn split(&self, digests: Vec<Digest>) -> (Vec<Digest>, Vec<Digest>) {
        let now = Instant::now();
        let until = self.until.lock();
        if until.is_empty() {
            return (Vec::new(), digests);
        }
        digests
            .into_iter()
            .partition(|d| until.get(d).is_some_and(|at| *at > now))
    }

    /// Drops a blob this server unlisted.
    pub(crate) fn forget(&self, digest: &Digest) {
        self.until.lock().remove(digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_trusted_only_while_it_needs_no_renewal() {
        let fresh = FreshLeases::new(Duration::from_secs(60));
        let [young, old, renewed_later, gone] = [1u8, 2, 3, 4].map(|n| Digest::of(&[n]));
        let sent = Instant::now();
        fresh.learn(
            sent,
            [
                (young, 1.0),
                (old, 60.5),
                (renewed_later, -3.0),
                (gone, 2.0),
            ],
        );
        fresh.forget(&gone);
        let (listed, rest) = fresh.split(vec![young, old, renewed_later, gone]);
        assert_eq!(listed, vec![young, renewed_later]);
        assert_eq!(rest, vec![old, gone]);

        // Learned from a statement sent long enough ago, nothing is trusted.
        let fresh = FreshLeases::new(Duration::from_millis(50));
        fresh.learn(Instant::now(), [(young, 0.0)]);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(fresh.split(vec![young]).0, Vec::<Digest>::new());
    }
}
