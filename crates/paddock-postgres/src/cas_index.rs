//! The index of blobs in the object store (`cas_blobs`), shared by every server, and
//! the bookkeeping of its collections (`cas_collecting`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use paddock_cas::{BlobIndex, StoreError};
use paddock_reapi::Digest;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::cas_filter::{self, Listing};
use crate::database::{Database, DatabaseError};

/// Taken by the server collecting, so that one collects at a time.
const COLLECT_LOCK: i64 = 0x7061_6464_6f63_6b33; // "paddock3"

/// A deletion unfinished this long belongs to a collector that died.
const ABANDONED_AFTER_SECONDS: f64 = 300.0;

/// How long a writer waits for a collection to delete the blob it writes.
const COLLECTION_WAIT: Duration = Duration::from_secs(60);

/// Beyond the renewal interval, how far back lookups look for unlisted blobs: more
/// than an unlisting takes to commit once its row is deleted.
const UNLISTED_MARGIN: Duration = Duration::from_secs(300);

/// Unlisted blobs a lookup reads at most; past it (the bucket lost many blobs at
/// once), every blob trusted from memory is probed.
const UNLISTED_MAX: i64 = 10_000;

#[derive(Clone)]
pub struct PgBlobIndex {
    database: Database,
    /// A lease is renewed only when it is older than this, so that hot blobs cost
    /// reads, not writes; collection allows for it.
    renewal: Duration,
    /// What the index surely lacks, and which leases are fresh, kept up to date
    /// by a task of its own.
    listing: Arc<Listing>,
}

impl PgBlobIndex {
    /// An index whose leases last `lease` (renewed once they are
    /// [`paddock_cas::lease_renewal`] old). Starts the task that keeps its filter
    /// of listed blobs, which ends when the index is dropped.
    pub fn new(database: Database, lease: Duration) -> PgBlobIndex {
        let renewal = paddock_cas::lease_renewal(lease);
        let listing = Arc::new(Listing::new(renewal));
        tokio::spawn(cas_filter::keep(database.clone(), Arc::downgrade(&listing)));
        PgBlobIndex {
            database,
            renewal,
            listing,
        }
    }
}

fn unavailable(e: DatabaseError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The columns a list of digests is sent as.
fn columns(digests: &[Digest]) -> (Vec<&[u8]>, Vec<i64>) {
    digests
        .iter()
        .map(|d| (d.hash().as_slice(), d.size() as i64))
        .unzip()
}

fn digest(row: &Row) -> Option<Digest> {
    let hash: &[u8] = row.get(0);
    let size: i64 = row.get(1);
    Some(Digest::new(
        hash.try_into().ok()?,
        u64::try_from(size).ok()?,
    ))
}

impl PgBlobIndex {
    /// How far back, in seconds, unlisted blobs are looked for: a blob is trusted
    /// from memory for at most a renewal interval after the statement that found
    /// it listed, and an unlisting that statement missed was logged (as its row
    /// was deleted) no earlier than a little before that statement began; the
    /// margin covers that little.
    fn unlisted_window(&self) -> f64 {
        self.renewal.as_secs_f64() + UNLISTED_MARGIN.as_secs_f64()
    }

    /// The blobs unlisted lately (see [`PgBlobIndex::unlisted_window`]); `None`
    /// if there are more than [`UNLISTED_MAX`].
    async fn unlisted(&self) -> Result<Option<HashSet<Digest>>, StoreError> {
        let rows = self
            .query(
                "SELECT hash, size FROM cas_unlisted
                 WHERE at > now() - make_interval(secs => $1) LIMIT $2",
                &[&self.unlisted_window(), &(UNLISTED_MAX + 1)],
            )
            .await?;
        Ok((rows.len() as i64 <= UNLISTED_MAX).then(|| rows.iter().filter_map(digest).collect()))
    }

    /// Runs one statement on a connection from the pool.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.database.rows(sql, params).await.map_err(unavailable)
    }

    /// As [`PgBlobIndex::query`], for a statement whose rows are not wanted.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<(), StoreError> {
        let db = &self.database;
        let client = db.client().await.map_err(unavailable)?;
        db.execute(&client, sql, params)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    /// Which of `digests` are listed, renewing their leases where stale.
    async fn listed(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let (hashes, sizes) = columns(digests);
        // One statement: the listed ones, and their leases renewed where stale.
        // Stale rows are locked in key order (as every statement here locks
        // several), so concurrent renewals and collections queue rather than
        // deadlock; a stale row a collection deleted meanwhile is not renewed and
        // not reported. The answer is one row: the positions (from 1) of the
        // digests listed, rather than a row per digest.
        let rows = self
            .query(
                "WITH found AS (
                     SELECT w.n, b.hash, b.size,
                            b.last_access < now() - make_interval(secs => $3) AS stale
                     FROM unnest($1::bytea[], $2::int8[]) WITH ORDINALITY AS w(hash, size, n)
                     JOIN cas_blobs b USING (hash, size)
                 ), locked AS (
                     SELECT c.ctid, f.n FROM cas_blobs c JOIN found f USING (hash, size)
                     WHERE f.stale ORDER BY c.hash, c.size FOR UPDATE OF c
                 ), renewed AS (
                     UPDATE cas_blobs b SET last_access = now() FROM locked l
                     WHERE b.ctid = l.ctid
                     RETURNING l.n
                 )
                 SELECT ARRAY(SELECT n FROM found WHERE NOT stale)
                        || ARRAY(SELECT n FROM renewed)",
                &[&hashes, &sizes, &self.renewal.as_secs_f64()],
            )
            .await?;
        let positions: Vec<i64> = rows.first().map(|r| r.get(0)).unwrap_or_default();
        Ok(positions
            .into_iter()
            .filter_map(|n| digests.get(usize::try_from(n).ok()?.checked_sub(1)?))
            .copied()
            .collect())
    }
}

/// Digests looked up by one statement; a larger request is split into statements
/// that run at once on several connections (and so on several of the database's
/// cores), since 10,000 index probes take one core several milliseconds. Each
/// statement also costs a plan and a pass over its arguments, so slices are not
/// small: 10,000 digests as two statements took 21 to 28 ms end to end on a
/// 2-core machine, against 27 to 30 as one and 34 to 42 as three or four.
const LOOKUP_SLICE: usize = 5_000;

impl PgBlobIndex {
    /// Which of `digests` are listed: probed in slices at once.
    async fn probed(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let slices = futures::future::try_join_all(
            digests.chunks(LOOKUP_SLICE).map(|slice| self.listed(slice)),
        )
        .await?;
        Ok(slices.into_iter().flatten().collect())
    }
}

#[async_trait]
impl BlobIndex for PgBlobIndex {
    async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        // Digests the filter lacks can only have been listed at or above its
        // horizon, and those rows are few; of the others, those whose leases are
        // fresh are listed unless unlisted since; the rest are probed.
        let (maybe, outside, horizon) = match self.listing.split(digests) {
            Some((maybe, outside, horizon)) if !outside.is_empty() => {
                (maybe, outside, Some(horizon))
            }
            _ => (digests.to_vec(), Vec::new(), None),
        };
        let (fresh, probe) = self.listing.fresh().split(maybe);
        let recently = async {
            match horizon {
                Some(horizon) => cas_filter::recent(&self.database, horizon)
                    .await
                    .map_err(unavailable),
                None => Ok(Some(Vec::new())),
            }
        };
        let unlisted = async {
            match fresh.is_empty() {
                true => Ok(Vec::new()),
                false => self.unlisted_lately(&fresh).await,
            }
        };
        let (probed, recent, unlisted) =
            futures::try_join!(self.probed(&probe), recently, unlisted)?;
        let mut found: HashSet<Digest> = probed.into_iter().collect();
        // Probed after all: fresh leases of blobs unlisted since, stale rows
        // listed lately, and (until the rest are checked with no wait before the
        // answer) fresh leases that stopped being fresh while statements ran.
        let unlisted: HashSet<Digest> = unlisted.into_iter().collect();
        let (mut again, mut fresh): (Vec<Digest>, Vec<Digest>) =
            fresh.into_iter().partition(|d| unlisted.contains(d));
        match recent {
            Some(rows) => {
                let outside: HashSet<&Digest> = outside.iter().collect();
                let renewal = self.renewal.as_secs_f64();
                for (digest, age) in rows.into_iter().filter(|(d, _)| outside.contains(d)) {
                    match age > renewal {
                        // A stale lease is renewed, and the blob found, only as a
                        // probe does it: locked, so that a collection cannot take
                        // it between.
                        true => again.push(digest),
                        false => _ = found.insert(digest),
                    }
                }
            }
            // More listed lately than is worth reading: probe them all.
            None => again.extend(outside),
        }
        loop {
            let (still, expired) = self.listing.fresh().split(fresh);
            fresh = still;
            again.extend(expired);
            if again.is_empty() {
                break;
            }
            found.extend(self.probed(&std::mem::take(&mut again)).await?);
        }
        found.extend(fresh);
        Ok(digests
            .iter()
            .filter(|d| !found.contains(d))
            .copied()
            .collect())
    }

    async fn touch(&self, digests: &[Digest]) -> Result<(), StoreError> {
        if digests.is_empty() {
            return Ok(());
        }
        let (hashes, sizes) = columns(digests);
        self.execute(
            "WITH locked AS (
             SELECT c.ctid FROM cas_blobs c
             JOIN unnest($1::bytea[], $2::int8[]) AS u(hash, size) USING (hash, size)
             WHERE c.last_access < now() - make_interval(secs => $3)
             ORDER BY c.hash, c.size FOR UPDATE OF c
         )
         UPDATE cas_blobs b SET last_access = now() FROM locked l WHERE b.ctid = l.ctid",
            &[&hashes, &sizes, &self.renewal.as_secs_f64()],
        )
        .await
    }

    async fn prepare_write(&self, digest: &Digest) -> Result<bool, StoreError> {
        let hash = digest.hash().as_slice();
        let size = digest.size() as i64;
        let deadline = tokio::time::Instant::now() + COLLECTION_WAIT;
        loop {
            let rows = self
                .query(
                    "WITH renewed AS (
                         UPDATE cas_blobs SET last_access = now()
                         WHERE hash = $1 AND size = $2 RETURNING 1
                     )
                     SELECT EXISTS (SELECT 1 FROM renewed),
                            EXISTS (SELECT 1 FROM cas_collecting WHERE hash = $1 AND size = $2)",
                    &[&hash, &size],
                )
                .await?;
            let row = rows.first().ok_or_else(|| {
                StoreError::Unavailable("the database answered no row to a lookup".into())
            })?;
            let (listed, collecting): (bool, bool) = (row.get(0), row.get(1));
            if listed || !collecting {
                return Ok(listed);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(StoreError::Unavailable(format!(
                    "blob {digest} is being deleted by a collection that has not finished within {COLLECTION_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn admit(&self, digest: &Digest) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO cas_blobs (hash, size) VALUES ($1, $2)
         ON CONFLICT (hash, size) DO UPDATE SET last_access = now()",
            &[&digest.hash().as_slice(), &(digest.size() as i64)],
        )
        .await
    }

    async fn unlisted_lately(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        Ok(match self.unlisted().await? {
            Some(unlisted) => digests
                .iter()
                .filter(|d| unlisted.contains(d))
                .copied()
                .collect(),
            None => digests.to_vec(),
        })
    }

    async fn forget(&self, digest: &Digest) -> Result<(), StoreError> {
        self.listing.fresh().forget(digest);
        // Logged, for other servers that trust the blob's fresh lease; the log's
        // rows older than any such trust go meanwhile.
        self.execute(
            "WITH gone AS (
                 DELETE FROM cas_blobs WHERE hash = $1 AND size = $2 RETURNING hash, size
             ), logged AS (
                 INSERT INTO cas_unlisted (hash, size, at)
                 SELECT hash, size, clock_timestamp() FROM gone
             )
             DELETE FROM cas_unlisted WHERE at < now() - make_interval(secs => $3)",
            &[
                &digest.hash().as_slice(),
                &(digest.size() as i64),
                &(self.unlisted_window() * 2.0),
            ],
        )
        .await
    }

    async fn select_garbage(
        &self,
        capacity: u64,
        lease: Duration,
        batch: usize,
    ) -> Result<Option<Vec<Digest>>, StoreError> {
        let db = &self.database;
        let mut client = db.client().await.map_err(unavailable)?;
        let tx = db.timed(client.transaction()).await.map_err(unavailable)?;
        let locked: bool = db
            .timed(tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&COLLECT_LOCK]))
            .await
            .map_err(unavailable)?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let abandoned = db
            .timed(tx.query(
                "UPDATE cas_collecting SET since = now()
                 WHERE since < now() - make_interval(secs => $1) RETURNING hash, size",
                &[&ABANDONED_AFTER_SECONDS],
            ))
            .await
            .map_err(unavailable)?;
        let total: i64 = db
            .timed(tx.query_one("SELECT coalesce(sum(size), 0)::int8 FROM cas_blobs", &[]))
            .await
            .map_err(unavailable)?
            .get(0);
        let excess = total.saturating_sub(i64::try_from(capacity).unwrap_or(i64::MAX));
        // Leases are renewed only once a renewal interval old, and blobs found
        // listed are answered without a probe for another interval (their
        // renewals noted, written later): allow for both, and half an interval for
        // the statements of a lookup that found a lease fresh when it began, so
        // that a lease holds in full even if the server that owed the renewal
        // stopped before writing it.
        let cutoff = (lease + self.renewal * 5 / 2).as_secs_f64();
        let chosen = if excess > 0 {
            db.timed(tx.query(
                "WITH oldest AS (
                     SELECT hash, size, (sum(size) OVER (ORDER BY last_access, hash))::int8 AS running
                     FROM cas_blobs
                     WHERE last_access < now() - make_interval(secs => $1)
                     ORDER BY last_access, hash LIMIT $2
                 ), chosen AS (
                     SELECT b.hash, b.size FROM cas_blobs b JOIN oldest o USING (hash, size)
                     WHERE o.running - o.size < $3::int8
                       AND b.last_access < now() - make_interval(secs => $1)
                     ORDER BY b.hash, b.size FOR UPDATE OF b
                 ), gone AS (
                     DELETE FROM cas_blobs b USING chosen c
                     WHERE b.hash = c.hash AND b.size = c.size
                     RETURNING b.hash, b.size
                 )
                 INSERT INTO cas_collecting (hash, size) SELECT hash, size FROM gone
                 ON CONFLICT (hash, size) DO UPDATE SET since = now()
                 RETURNING hash, size",
                &[&cutoff, &(batch as i64), &excess],
            ))
            .await
            .map_err(unavailable)?
        } else {
            Vec::new()
        };
        db.timed(tx.commit()).await.map_err(unavailable)?;
        Ok(Some(
            abandoned
                .iter()
                .chain(chosen.iter())
                .filter_map(digest)
                .collect(),
        ))
    }

    async fn collected(&self, digests: &[Digest]) -> Result<(), StoreError> {
        if digests.is_empty() {
            return Ok(());
        }
        let (hashes, sizes) = columns(digests);
        self.execute(
            "DELETE FROM cas_collecting c USING unnest($1::bytea[], $2::int8[]) AS g(hash, size)
         WHERE c.hash = g.hash AND c.size = g.size",
            &[&hashes, &sizes],
        )
        .await
    }
}
