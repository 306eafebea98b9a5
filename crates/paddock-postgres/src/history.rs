//! The history of recent builds (`paddock-history`) in the `history_entries` table,
//! so that every server shows every server's builds. Each server appends its
//! changes in batches and reads the others' in id order once a second. Ids come
//! from a sequence, so a row can commit after a later id was read: the ids skipped
//! are asked for again for a minute before they are taken as rows that never were.
//! A build report replaces its invocation's earlier row in the same transaction.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use paddock_history::{Entry, History, HistoryStore, HistoryStoreError};

use crate::database::Database;

/// Rows read at once.
const PAGE: i64 = 10_000;
/// Rows written in one statement at most.
const BATCH: usize = 1_000;
/// How long an id skipped over is looked for.
const GAP_WAIT: Duration = Duration::from_secs(60);
/// Ids skipped over that are looked for at once, at most (the lowest go first).
const GAPS_KEPT: usize = 10_000;

pub struct PgHistory {
    database: Database,
    /// This server process, in the rows it writes: its own are not read back.
    writer: String,
    cursor: parking_lot::Mutex<Cursor>,
}

#[derive(Default)]
struct Cursor {
    /// The highest id read.
    last: i64,
    /// Ids below `last` not read yet, and when each was first skipped.
    gaps: BTreeMap<i64, Instant>,
}

impl Cursor {
    /// Notes that the row `id` was read.
    fn read(&mut self, id: i64) {
        if id <= self.last {
            self.gaps.remove(&id);
            return;
        }
        let now = Instant::now();
        let skipped_from = (self.last + 1).max(id - GAPS_KEPT as i64);
        for skipped in skipped_from..id {
            self.gaps.insert(skipped, now);
        }
        self.last = id;
        while self.gaps.len() > GAPS_KEPT {
            self.gaps.pop_first();
        }
    }

    /// The ids still looked for; those skipped too long ago are given up.
    fn looked_for(&mut self) -> Vec<i64> {
        self.gaps.retain(|_, since| since.elapsed() < GAP_WAIT);
        self.gaps.keys().copied().collect()
    }
}

impl PgHistory {
    pub fn new(database: Database) -> PgHistory {
        PgHistory {
            database,
            writer: uuid::Uuid::new_v4().to_string(),
            cursor: Default::default(),
        }
    }

    fn unavailable(&self, error: impl ToString) -> HistoryStoreError {
        HistoryStoreError::Unavailable {
            store: self.describe(),
            error: error.to_string(),
        }
    }

    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, HistoryStoreError> {
        self.database
            .rows(sql, params)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// The entries in `rows` (id, writer, entry) that others wrote, noting each id.
    fn take(&self, rows: &[tokio_postgres::Row]) -> Vec<Entry> {
        let mut cursor = self.cursor.lock();
        let mut entries = Vec::new();
        let mut unreadable = 0usize;
        for row in rows {
            let (id, writer, text): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
            cursor.read(id);
            if writer == self.writer {
                continue;
            }
            match Entry::from_json(&text) {
                Some(entry) => entries.push(entry),
                None => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::warn!(
                unreadable,
                "rows of history_entries could not be read and were passed over"
            );
        }
        entries
    }
}

#[async_trait]
impl HistoryStore for PgHistory {
    async fn load(&self) -> Result<Vec<Entry>, HistoryStoreError> {
        let mut entries = Vec::new();
        loop {
            let last = self.cursor.lock().last;
            let rows = self
                .rows(
                    "SELECT id, writer, entry FROM history_entries WHERE id > $1
                     ORDER BY id LIMIT $2",
                    &[&last, &PAGE],
                )
                .await?;
            entries.extend(self.take(&rows));
            if (rows.len() as i64) < PAGE {
                // Most ids skipped over by then are rows trimmed long ago: only the
                // newest few could still be committing.
                let mut cursor = self.cursor.lock();
                let recent = cursor.last - 1_000;
                cursor.gaps.retain(|id, _| *id > recent);
                return Ok(entries);
            }
        }
    }

    async fn append(&self, entries: &[Entry]) -> Result<(), HistoryStoreError> {
        // A batch carries one report per invocation: the newest.
        let written = paddock_history::without_replaced(entries);
        let (replaced_identities, replaced_invocations): (Vec<&str>, Vec<&str>) = written
            .iter()
            .filter(|e| matches!(e, Entry::Build(_)))
            .filter_map(|e| e.invocation())
            .unzip();
        let db = &self.database;
        let mut client = db.client().await.map_err(|e| self.unavailable(e))?;
        let tx = db
            .timed(client.transaction())
            .await
            .map_err(|e| self.unavailable(e))?;
        if !replaced_identities.is_empty() {
            db.timed(tx.execute(
                "DELETE FROM history_entries h
                 USING unnest($1::text[], $2::text[]) AS k(identity, invocation)
                 WHERE h.kind = 'build' AND h.identity = k.identity
                   AND h.invocation = k.invocation",
                &[&replaced_identities, &replaced_invocations],
            ))
            .await
            .map_err(|e| self.unavailable(e))?;
        }
        for batch in written.chunks(BATCH) {
            let at: Vec<SystemTime> = batch.iter().map(|e| e.at()).collect();
            let kind: Vec<&str> = batch.iter().map(|e| e.kind()).collect();
            let identity: Vec<Option<&str>> =
                batch.iter().map(|e| e.invocation().map(|k| k.0)).collect();
            let invocation: Vec<Option<&str>> =
                batch.iter().map(|e| e.invocation().map(|k| k.1)).collect();
            let entry: Vec<String> = batch.iter().map(|e| e.to_json()).collect();
            db.timed(tx.execute(
                "INSERT INTO history_entries (writer, at, kind, identity, invocation, entry)
                 SELECT $1, * FROM unnest($2::timestamptz[], $3::text[], $4::text[],
                                          $5::text[], $6::text[])",
                &[&self.writer, &at, &kind, &identity, &invocation, &entry],
            ))
            .await
            .map_err(|e| self.unavailable(e))?;
        }
        db.timed(tx.commit()).await.map_err(|e| self.unavailable(e))
    }

    async fn news(&self) -> Result<Vec<Entry>, HistoryStoreError> {
        let (last, looked_for) = {
            let mut cursor = self.cursor.lock();
            (cursor.last, cursor.looked_for())
        };
        let rows = self
            .rows(
                "SELECT id, writer, entry FROM history_entries
                 WHERE id > $1 OR id = ANY($2) ORDER BY id LIMIT $3",
                &[&last, &looked_for, &PAGE],
            )
            .await?;
        Ok(self.take(&rows))
    }

    async fn trim(&self, history: &Arc<History>) -> Result<(), HistoryStoreError> {
        let now = SystemTime::now();
        let (kinds, cutoffs): (Vec<&str>, Vec<SystemTime>) = history
            .retention()
            .iter()
            .map(|(kind, kept_for)| (*kind, now.checked_sub(*kept_for).unwrap_or(now)))
            .unzip();
        let max_invocations = history.config().max_invocations.max(1) as i64;
        let db = &self.database;
        let client = db.client().await.map_err(|e| self.unavailable(e))?;
        // Rows dated well ahead (a server whose clock ran ahead) are no one's to keep.
        let ahead = now + paddock_history::FUTURE_SLACK;
        db.execute(
            &client,
            "DELETE FROM history_entries h
             USING unnest($1::text[], $2::timestamptz[]) AS k(kind, cutoff)
             WHERE h.kind = k.kind AND (h.at < k.cutoff OR h.at > $3)",
            &[&kinds, &cutoffs, &ahead],
        )
        .await
        .map_err(|e| self.unavailable(e))?;
        db.execute(
            &client,
            "DELETE FROM history_entries h
             USING (SELECT identity, invocation FROM history_entries
                    WHERE invocation IS NOT NULL
                    GROUP BY identity, invocation
                    ORDER BY max(at) DESC, identity, invocation OFFSET $1) old
             WHERE h.identity = old.identity AND h.invocation = old.invocation",
            &[&max_invocations],
        )
        .await
        .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} (history_entries)", self.database.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_skipped_over_are_looked_for_until_read() {
        let mut cursor = Cursor::default();
        cursor.read(1);
        cursor.read(4);
        assert_eq!(cursor.looked_for(), vec![2, 3]);
        cursor.read(3);
        assert_eq!(cursor.looked_for(), vec![2]);
        cursor.read(5);
        assert_eq!(cursor.last, 5);
        cursor.read(5 + 3 * GAPS_KEPT as i64);
        assert_eq!(cursor.looked_for().len(), GAPS_KEPT);
    }
}
