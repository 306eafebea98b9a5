//! What the index surely lacks: a Bloom filter of the digests `cas_blobs` listed as
//! of a horizon, kept by each server, so that FindMissingBlobs of digests nobody
//! uploaded costs one small statement instead of a probe of the table per digest.
//!
//! Every row records the transaction that listed it (`admitted`, an `xid8`). The
//! filter is built from the whole table and brought up to date once a second with
//! the rows listed by transactions at or above its horizon; the new horizon is the
//! oldest transaction still running in the snapshot those rows were read in, so
//! every transaction below it had finished and its rows were read (now or
//! earlier). A digest the filter lacks was therefore either never listed, or listed
//! by a transaction at or above the horizon, which [`recent`] reads at request
//! time. Rows deleted since (collections, repairs) stay in the filter: they cost a
//! probe, never a wrong answer. The filter is rebuilt once more digests went in
//! than it was sized for. What the refreshes read also tells which leases are
//! fresh ([`FreshLeases`]).

use std::sync::Weak;
use std::time::{Duration, Instant};

use paddock_reapi::Digest;
use parking_lot::RwLock;

use crate::cas_fresh::FreshLeases;
use crate::database::{Database, DatabaseError};

/// Bits per digest the filter is sized for (with [`PROBES`], about 1% false
/// positives at capacity).
const BITS_PER_DIGEST: u64 = 10;
/// Bits set per digest.
const PROBES: u64 = 7;
/// The least a filter is sized for: 1 Mi digests, 1.25 MiB.
const MIN_CAPACITY: u64 = 1 << 20;
/// The most: 128 Mi digests, 160 MiB. Past it the filter fills and answers "may
/// hold" more often, which costs probes, not wrong answers.
const MAX_CAPACITY: u64 = 1 << 27;
/// Rows one refresh reads at most. Past it (a long transaction holding the horizon
/// back) the rows read are added but the horizon stays, and lookups read more.
const REFRESH_MAX: i64 = 100_000;
/// How often the filter is brought up to date.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Rows read per statement while building.
const BUILD_PAGE: i64 = 50_000;
/// Rows [`recent`] reads at most; past it, lookups probe the table instead.
pub(crate) const RECENT_MAX: i64 = 20_000;

/// The filter and its horizon.
pub(crate) struct ListedFilter {
    bits: Vec<u64>,
    /// How many digests went in.
    entries: u64,
    /// How many it was sized for.
    capacity: u64,
    /// Every transaction below it had finished when the filter was last brought
    /// up to date, and the rows it listed are in the filter.
    horizon: i64,
}

impl ListedFilter {
    fn new(capacity: u64, horizon: i64) -> ListedFilter {
        let capacity = capacity.clamp(MIN_CAPACITY, MAX_CAPACITY);
        let words = (capacity * BITS_PER_DIGEST).div_ceil(64);
        ListedFilter {
            bits: vec![0; words as usize],
            entries: 0,
            capacity,
            horizon,
        }
    }

    /// The bits of `digest`: double hashing over its hash, which SHA-256 already
    /// spreads evenly (a client choosing digests to collide only costs itself
    /// probes of the table).
    fn positions(&self, digest: &Digest) -> impl Iterator<Item = usize> {
        let hash = digest.hash();
        let word = |at: usize| u64::from_le_bytes(hash[at..at + 8].try_into().expect("8 bytes"));
        let first = word(0) ^ digest.size().wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let step = word(8) | 1;
        let bits = self.bits.len() as u64 * 64;
        (0..PROBES).map(move |i| (first.wrapping_add(i.wrapping_mul(step)) % bits) as usize)
    }

    fn insert(&mut self, digest: &Digest) {
        // Rows read again (while a long transaction holds the horizon back) are not
        // counted twice towards the rebuild.
        if self.may_hold(digest) {
            return;
        }
        for bit in self.positions(digest).collect::<Vec<_>>() {
            self.bits[bit / 64] |= 1 << (bit % 64);
        }
        self.entries += 1;
    }

    /// Whether `digest` may have been listed below the horizon.
    fn may_hold(&self, digest: &Digest) -> bool {
        self.positions(digest)
            .all(|bit| self.bits[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

/// What the refreshes learn, as lookups see it.
pub(crate) struct Listing {
    /// `None` until the first build is done.
    filter: RwLock<Option<ListedFilter>>,
    fresh: FreshLeases,
}

impl Listing {
    /// For leases renewed once `renewal` old.
    pub(crate) fn new(renewal: Duration) -> Listing {
        Listing {
            filter: RwLock::new(None),
            fresh: FreshLeases::new(renewal),
        }
    }

    /// Splits `digests` into those the index may list (to probe) and those it
    /// surely did not below the horizon, with the horizon; `None` while there is no
    /// filter.
    pub(crate) fn split(&self, digests: &[Digest]) -> Option<(Vec<Digest>, Vec<Digest>, i64)> {
        let filter = self.filter.read();
        let filter = filter.as_ref()?;
        let (maybe, outside) = digests.iter().partition(|d| filter.may_hold(d));
        Some((maybe, outside, filter.horizon))
    }

    pub(crate) fn fresh(&self) -> &FreshLeases {
        &self.fresh
    }
}

fn digest(hash: &[u8], size: i64) -> Option<Digest> {
    Some(Digest::new(
        hash.try_into().ok()?,
        u64::try_from(size).ok()?,
    ))
}

/// The oldest transaction running now: every one below it has finished.
const HORIZON: &str = "pg_snapshot_xmin(pg_current_snapshot())::text::int8";

/// How long ago a row's lease was renewed, in seconds by the database's clock.
const LEASE_AGE: &str = "extract(epoch FROM now() - b.last_access)::float8";

/// Digests listed by transactions at or above `horizon` (at most [`RECENT_MAX`],
/// `None` past it), each with the age of its lease in seconds.
pub(crate) async fn recent(
    database: &Database,
    horizon: i64,
) -> Result<Option<Vec<(Digest, f64)>>, DatabaseError> {
    let rows = database
        .rows(
            &format!("SELECT hash, size, {LEASE_AGE} FROM cas_blobs b WHERE admitted >= $1::text::xid8 LIMIT $2"),
            &[&horizon.to_string(), &(RECENT_MAX + 1)],
        )
        .await?;
    if rows.len() as i64 > RECENT_MAX {
        return Ok(None);
    }
    Ok(Some(
        rows.iter()
            .filter_map(|r| Some((digest(r.get(0), r.get(1))?, r.get(2))))
            .collect(),
    ))
}

/// A filter of the whole table, read in pages of keys, sized for twice what the
/// table is estimated to hold or `known` (what the last filter held), whichever is more.
async fn build(
    database: &Database,
    known: u64,
    fresh: &FreshLeases,
) -> Result<ListedFilter, DatabaseError> {
    let client = database.client().await?;
    // The horizon is taken first: every transaction below it had finished, so the
    // rows it listed are in every page read after.
    let row = database
        .query(
            &client,
            &format!("SELECT {HORIZON}, greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = 'cas_blobs'::regclass"),
            &[],
        )
        .await?;
    let (horizon, estimate): (i64, i64) = row
        .first()
        .map(|r| (r.get(0), r.get(1)))
        .ok_or_else(|| DatabaseError::Query("no answer to the horizon".into()))?;
    let mut filter = ListedFilter::new((estimate.max(0) as u64).max(known) * 2, horizon);
    let mut after: (Vec<u8>, i64) = (Vec::new(), -1);
    loop {
        let sent = Instant::now();
        let rows = database
            .query(
                &client,
                &format!(
                    "SELECT hash, size, {LEASE_AGE} FROM cas_blobs b WHERE (hash, size) > ($1, $2)
                     ORDER BY hash, size LIMIT $3"
                ),
                &[&after.0, &after.1, &BUILD_PAGE],
            )
            .await?;
        let read: Vec<(Digest, f64)> = rows
            .iter()
            .filter_map(|r| Some((digest(r.get(0), r.get(1))?, r.get(2))))
            .collect();
        for (d, _) in &read {
            filter.insert(d);
        }
        fresh.learn(sent, read);
        match rows.last() {
            Some(last) if rows.len() as i64 == BUILD_PAGE => after = (last.get(0), last.get(1)),
            _ => return Ok(filter),
        }
    }
}

/// Adds the rows listed at or above the filter's horizon, and moves the horizon.
async fn refresh(database: &Database, listing: &Listing) -> Result<(), DatabaseError> {
    let Some(horizon) = listing.filter.read().as_ref().map(|f| f.horizon) else {
        return Ok(());
    };
    let sent = Instant::now();
    let rows = database
        .rows(
            &format!(
                "WITH h AS (SELECT {HORIZON} AS horizon)
                 SELECT h.horizon, b.hash, b.size, {LEASE_AGE}
                 FROM h LEFT JOIN cas_blobs b ON b.admitted >= $1::text::xid8 LIMIT $2"
            ),
            &[&horizon.to_string(), &(REFRESH_MAX + 1)],
        )
        .await?;
    let read: Vec<(Digest, f64)> = rows
        .iter()
        .filter_map(|row| {
            let (hash, size, age): (Option<&[u8]>, Option<i64>, Option<f64>) =
                (row.get(1), row.get(2), row.get(3));
            Some((digest(hash?, size?)?, age?))
        })
        .collect();
    {
        let mut guard = listing.filter.write();
        let Some(filter) = guard.as_mut() else {
            return Ok(());
        };
        for (d, _) in &read {
            filter.insert(d);
        }
        if rows.len() as i64 <= REFRESH_MAX {
            if let Some(row) = rows.first() {
                filter.horizon = row.get(0);
            }
        }
    }
    listing.fresh.learn(sent, read);
    Ok(())
}

/// Builds the filter, then keeps it up to date (rebuilding it once it holds more
/// than it was sized for) for as long as the index it serves exists.
pub(crate) async fn keep(database: Database, listing: Weak<Listing>) {
    let mut failing = false;
    loop {
        let Some(listing) = listing.upgrade() else {
            return;
        };
        let held = listing
            .filter
            .read()
            .as_ref()
            .map(|f| (f.entries, f.capacity));
        let done = if held.is_none_or(|(entries, capacity)| entries > capacity) {
            build(
                &database,
                held.map_or(0, |(entries, _)| entries),
                &listing.fresh,
            )
            .await
            .map(|built| *listing.filter.write() = Some(built))
        } else {
            refresh(&database, &listing).await
        };
        drop(listing);
        match done {
            Err(error) if !failing => {
                tracing::warn!(%error, "the filter of listed blobs cannot be brought up to date; lookups probe the index");
                failing = true;
            }
            Ok(()) if failing => failing = false,
            _ => {}
        }
        tokio::time::sleep(REFRESH_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_put_in_is_always_held_and_others_rarely() {
        let mut filter = ListedFilter::new(0, 0);
        let listed: Vec<Digest> = (0u32..50_000)
            .map(|n| Digest::of(&n.to_le_bytes()))
            .collect();
        for d in &listed {
            filter.insert(d);
        }
        assert!(listed.iter().all(|d| filter.may_hold(d)));
        let others = (50_000u32..150_000)
            .filter(|n| filter.may_hold(&Digest::of(&n.to_le_bytes())))
            .count();
        assert!(others < 100, "{others} false positives in 100,000");
        // The same hash with another size is another digest.
        let d = listed[0];
        assert!(!filter.may_hold(&Digest::new(*d.hash(), d.size() + 1)));
    }
}
