//! The workers' health records and name bindings in the `worker_records` table.
//!
//! Each row has a version (from one sequence, never reused). A server writes a
//! record only at the version it last read or wrote, or as a new row when there is
//! none, all of a save in one statement; a record that another server wrote in
//! between is left alone and reported, and the scheduler takes the newer one. A row
//! this server process wrote itself (say, a write that committed after its caller
//! stopped waiting) is never taken as another server's news. Records not written for
//! a day are deleted; connected workers' records are written at least every ten
//! minutes.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use paddock_scheduler::{RecordStore, Saved, SavedRecord, SavedStateError, SavedWorker};

use crate::database::Database;

/// How often records nobody wrote for a day are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3_600);

pub struct PgRecords {
    database: Database,
    /// This server process, in the rows it writes.
    writer: String,
    /// The version of each record as this server last read or wrote it.
    versions: parking_lot::Mutex<HashMap<String, i64>>,
    purged: parking_lot::Mutex<Option<Instant>>,
}

impl PgRecords {
    pub fn new(database: Database) -> PgRecords {
        PgRecords {
            database,
            writer: uuid::Uuid::new_v4().to_string(),
            versions: Default::default(),
            purged: Default::default(),
        }
    }

    fn unavailable(&self, error: impl ToString) -> SavedStateError {
        SavedStateError::Unavailable {
            store: self.describe(),
            error: error.to_string(),
        }
    }

    /// A row as the scheduler takes it, noting its version.
    fn take(&self, row: &tokio_postgres::Row) -> Result<SavedWorker, SavedStateError> {
        let (name, record, identity, version): (String, String, Option<String>, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let record: SavedRecord = serde_json::from_str(&record).map_err(|e| {
            self.unavailable(format!("the record of worker {name:?} is malformed: {e}"))
        })?;
        self.versions.lock().insert(name, version);
        Ok((record, identity))
    }

    /// The rows a query returns, within the database's deadline.
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, SavedStateError> {
        self.database
            .rows(sql, params)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// Deletes records nobody wrote for a day, once an hour; a failure only delays it.
    async fn purge(&self, client: &tokio_postgres::Client) {
        let due = self
            .purged
            .lock()
            .is_none_or(|at| at.elapsed() >= PURGE_EVERY);
        if !due {
            return;
        }
        let purged = self
            .database
            .timed(client.execute(
                "DELETE FROM worker_records WHERE saved_at < now() - interval '1 day'",
                &[],
            ))
            .await;
        match purged {
            Ok(_) => *self.purged.lock() = Some(Instant::now()),
            Err(e) => tracing::warn!(error = %e, "could not delete old workers' records"),
        }
    }
}

#[async_trait]
impl RecordStore for PgRecords {
    async fn load(&self) -> Result<Saved, SavedStateError> {
        let rows = self
            .rows(
                "SELECT name, record::text, identity, version FROM worker_records",
                &[],
            )
            .await?;
        let mut saved = Saved::default();
        for row in &rows {
            let (record, identity) = self.take(row)?;
            if let Some(identity) = identity {
                saved.bindings.insert(record.name.clone(), identity);
            }
            saved.workers.push(record);
        }
        Ok(saved)
    }

    async fn changed_elsewhere(
        &self,
        names: &[String],
    ) -> Result<Vec<SavedWorker>, SavedStateError> {
        let known: Vec<i64> = {
            let versions = self.versions.lock();
            names
                .iter()
                .map(|n| versions.get(n).copied().unwrap_or(0))
                .collect()
        };
        let rows = self
            .rows(
                "SELECT w.name, w.record::text, w.identity, w.version, w.writer = $3
                 FROM worker_records w
                 JOIN unnest($1::text[], $2::bigint[]) AS k(name, version) USING (name)
                 WHERE w.version <> k.version",
                &[&names, &known, &self.writer],
            )
            .await?;
        let mut found = Vec::new();
        for row in &rows {
            let ours: bool = row.get(4);
            if ours {
                // Our own write, known now: what this server holds is newer still.
                self.versions.lock().insert(row.get(0), row.get(3));
            } else {
                found.push(self.take(row)?);
            }
        }
        Ok(found)
    }

    async fn store(
        &self,
        saved: Saved,
        changed: BTreeSet<String>,
    ) -> Result<Vec<String>, SavedStateError> {
        let mut names = Vec::new();
        let mut records = Vec::new();
        let mut identities = Vec::new();
        let mut known = Vec::new();
        {
            let versions = self.versions.lock();
            for record in saved.workers.iter().filter(|r| changed.contains(&r.name)) {
                names.push(record.name.clone());
                records.push(serde_json::to_string(record).map_err(|e| self.unavailable(e))?);
                identities.push(saved.bindings.get(&record.name).cloned());
                known.push(versions.get(&record.name).copied().unwrap_or(0));
            }
        }
        let client = self
            .database
            .client()
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut conflicts = Vec::new();
        if !names.is_empty() {
            // One statement: rows at the version this server knows are updated, names
            // without a row are inserted, anything else is another server's.
            let written = self
                .database
                .timed(client.query(
                    "WITH input AS (
                         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
                             AS t(name, record, identity, known)
                     ), updated AS (
                         UPDATE worker_records w
                         SET record = i.record::jsonb, identity = i.identity,
                             version = nextval('worker_record_versions'), writer = $5,
                             saved_at = now()
                         FROM input i
                         WHERE w.name = i.name AND w.version = i.known
                         RETURNING w.name, w.version
                     ), inserted AS (
                         INSERT INTO worker_records
                             (name, record, identity, version, writer, saved_at)
                         SELECT i.name, i.record::jsonb, i.identity,
                                nextval('worker_record_versions'), $5, now()
                         FROM input i
                         WHERE NOT EXISTS (SELECT 1 FROM worker_records w WHERE w.name = i.name)
                         ON CONFLICT (name) DO NOTHING
                         RETURNING name, version
                     )
                     SELECT name, version FROM updated
                     UNION ALL SELECT name, version FROM inserted",
                    &[&names, &records, &identities, &known, &self.writer],
                ))
                .await
                .map_err(|e| self.unavailable(e))?;
            let mut versions = self.versions.lock();
            let mut done = BTreeSet::new();
            for row in &written {
                let name: String = row.get(0);
                versions.insert(name.clone(), row.get(1));
                done.insert(name);
            }
            conflicts = names.into_iter().filter(|n| !done.contains(n)).collect();
        }
        // Names this server no longer holds need no version.
        let held: BTreeSet<&String> = saved.workers.iter().map(|r| &r.name).collect();
        self.versions.lock().retain(|name, _| held.contains(name));
        self.purge(&client).await;
        Ok(conflicts)
    }

    fn describe(&self) -> String {
        self.database.describe().to_owned()
    }
}
