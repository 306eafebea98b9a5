//! The ActionCache in the `action_cache` table, shared by every server.

use async_trait::async_trait;
use paddock_cas::{ActionCache, ActionKey, ResultFilter, StoreError};
use paddock_reapi::proto::re::ActionResult;
use prost::Message;

use crate::database::{Database, DatabaseError};

/// Entries read and judged at a time by an invalidation, or evicted at a time.
const PAGE: i64 = 1_000;
const EVICT_BATCH: i64 = 10_000;

/// Taken by the server trimming the cache, so that one trims at a time.
const TRIM_LOCK: i64 = 0x7061_6464_6f63_6b32; // "paddock2"

/// The ActionCache in PostgreSQL, holding at most `max_entries` (least recently used
/// go first, trimmed every minute by [`crate::maintain`]).
#[derive(Clone)]
pub struct PgActionCache {
    database: Database,
    max_entries: usize,
}

impl PgActionCache {
    pub fn new(database: Database, max_entries: usize) -> PgActionCache {
        PgActionCache {
            database,
            max_entries: max_entries.max(1),
        }
    }

    /// Removes the least recently used entries beyond the bound, in batches, unless
    /// another server is at it; returns how many went. The lock is the transaction's,
    /// so it ends with it whatever happens to the connection.
    pub async fn trim(&self) -> Result<u64, DatabaseError> {
        let db = &self.database;
        let mut client = db.client().await?;
        let tx = db.timed(client.transaction()).await?;
        let locked: bool = db
            .timed(tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&TRIM_LOCK]))
            .await?
            .get(0);
        if !locked {
            return Ok(0);
        }
        let count: i64 = db
            .timed(tx.query_one("SELECT count(*) FROM action_cache", &[]))
            .await?
            .get(0);
        let mut excess = count - self.max_entries as i64;
        let mut removed = 0;
        while excess > 0 {
            let batch = excess.min(EVICT_BATCH);
            let gone = db
                .timed(tx.execute(
                    "DELETE FROM action_cache a USING (
                         SELECT instance_name, action_hash, action_size FROM action_cache
                         ORDER BY coalesce(last_hit_at, stored_at) LIMIT $1
                     ) old
                     WHERE a.instance_name = old.instance_name
                       AND a.action_hash = old.action_hash
                       AND a.action_size = old.action_size",
                    &[&batch],
                ))
                .await?;
            if gone == 0 {
                break;
            }
            removed += gone;
            excess -= gone as i64;
        }
        db.timed(tx.commit()).await?;
        metrics::counter!("paddock_action_cache_evictions_total").increment(removed);
        Ok(removed)
    }
}

fn unavailable(e: DatabaseError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn size(key: &ActionKey) -> i64 {
    key.action.size() as i64
}

#[async_trait]
impl ActionCache for PgActionCache {
    async fn get(&self, key: &ActionKey) -> Result<Option<ActionResult>, StoreError> {
        let db = &self.database;
        let client = db.client().await.map_err(unavailable)?;
        let hash = key.action.hash().as_slice();
        let found = db
            .timed(client.query_opt(
                "SELECT result, coalesce(last_hit_at < now() - interval '1 minute', true)
                 FROM action_cache
                 WHERE instance_name = $1 AND action_hash = $2 AND action_size = $3",
                &[&key.instance, &hash, &size(key)],
            ))
            .await
            .map_err(unavailable)?;
        let Some(row) = found else {
            return Ok(None);
        };
        let (bytes, stale): (Vec<u8>, bool) = (row.get(0), row.get(1));
        if stale {
            // Marks the entry used, for eviction and for the UI; a minute's precision
            // keeps a hot entry's hits reads.
            db.timed(client.execute(
                "UPDATE action_cache SET last_hit_at = now()
                 WHERE instance_name = $1 AND action_hash = $2 AND action_size = $3",
                &[&key.instance, &hash, &size(key)],
            ))
            .await
            .map_err(unavailable)?;
        }
        match ActionResult::decode(bytes.as_slice()) {
            Ok(result) => Ok(Some(result)),
            Err(e) => {
                tracing::error!(action = %key.action, error = %e, "an ActionCache row does not decode; treating it as missing");
                Ok(None)
            }
        }
    }

    async fn put(&self, key: &ActionKey, result: &ActionResult) -> Result<(), StoreError> {
        let db = &self.database;
        let client = db.client().await.map_err(unavailable)?;
        let worker = result
            .execution_metadata
            .as_ref()
            .map(|m| m.worker.as_str())
            .unwrap_or("");
        db.timed(client.execute(
            "INSERT INTO action_cache
                 (instance_name, action_hash, action_size, result, worker, stored_at)
             VALUES ($1, $2, $3, $4, $5, now())
             ON CONFLICT (instance_name, action_hash, action_size) DO UPDATE
             SET result = excluded.result, worker = excluded.worker,
                 stored_at = excluded.stored_at, last_hit_at = NULL",
            &[
                &key.instance,
                &key.action.hash().as_slice(),
                &size(key),
                &result.encode_to_vec(),
                &worker,
            ],
        ))
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn delete(&self, key: &ActionKey) -> Result<bool, StoreError> {
        let db = &self.database;
        let client = db.client().await.map_err(unavailable)?;
        let removed = db
            .timed(client.execute(
                "DELETE FROM action_cache
                 WHERE instance_name = $1 AND action_hash = $2 AND action_size = $3",
                &[&key.instance, &key.action.hash().as_slice(), &size(key)],
            ))
            .await
            .map_err(unavailable)?;
        Ok(removed > 0)
    }

    async fn remove_where(&self, doomed: &ResultFilter) -> Result<u64, StoreError> {
        let db = &self.database;
        let client = db.client().await.map_err(unavailable)?;
        let mut after: (String, Vec<u8>, i64) = (String::new(), Vec::new(), -1);
        let mut removed = 0;
        loop {
            let rows = db
                .timed(client.query(
                    "SELECT instance_name, action_hash, action_size, result FROM action_cache
                     WHERE (instance_name, action_hash, action_size) > ($1, $2, $3)
                     ORDER BY instance_name, action_hash, action_size LIMIT $4",
                    &[&after.0, &after.1, &after.2, &PAGE],
                ))
                .await
                .map_err(unavailable)?;
            let Some(last) = rows.last() else {
                return Ok(removed);
            };
            after = (last.get(0), last.get(1), last.get(2));
            for row in &rows {
                let bytes: Vec<u8> = row.get(3);
                if !ActionResult::decode(bytes.as_slice()).is_ok_and(|r| doomed(&r)) {
                    continue;
                }
                let (instance, hash, size): (String, Vec<u8>, i64) =
                    (row.get(0), row.get(1), row.get(2));
                removed += db
                    .timed(client.execute(
                        "DELETE FROM action_cache
                         WHERE instance_name = $1 AND action_hash = $2 AND action_size = $3",
                        &[&instance, &hash, &size],
                    ))
                    .await
                    .map_err(unavailable)?;
            }
        }
    }
}
