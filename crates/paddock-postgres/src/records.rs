//! The workers' health records and name bindings in the `worker_records` table.
//!
//! Each row has a version. A server writes a record only at the version it last read
//! or wrote (an update conditional on it), so servers never overwrite each other's
//! news: a write that finds another version is left undone and reported, and the
//! scheduler takes the newer record instead. Records not written for a day are
//! deleted (connected workers' records are written at least every ten minutes).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use paddock_scheduler::{RecordStore, Saved, SavedRecord, SavedStateError, SavedWorker};

use crate::database::Database;

/// How often records nobody wrote for a day are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3_600);

pub struct PgRecords {
    database: Database,
    /// The version of each record as this server last read or wrote it.
    versions: parking_lot::Mutex<HashMap<String, i64>>,
    purged: parking_lot::Mutex<Option<Instant>>,
}

impl PgRecords {
    pub fn new(database: Database) -> PgRecords {
        PgRecords {
            database,
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

    /// Writes one record at the version this server knows; `false` if another
    /// server's write came first.
    async fn write(
        &self,
        client: &tokio_postgres::Client,
        record: &SavedRecord,
        identity: Option<&String>,
    ) -> Result<bool, SavedStateError> {
        let json = serde_json::to_string(record).map_err(|e| self.unavailable(e))?;
        let known = self.versions.lock().get(&record.name).copied();
        let written = match known {
            Some(version) => {
                self.database
                    .timed(client.query_opt(
                        "UPDATE worker_records
                         SET record = $2::text::jsonb, identity = $3, version = version + 1,
                             saved_at = now()
                         WHERE name = $1 AND version = $4
                         RETURNING version",
                        &[&record.name, &json, &identity, &version],
                    ))
                    .await
            }
            None => {
                self.database
                    .timed(client.query_opt(
                        "INSERT INTO worker_records (name, record, identity, version, saved_at)
                         VALUES ($1, $2::text::jsonb, $3, 1, now())
                         ON CONFLICT (name) DO NOTHING
                         RETURNING version",
                        &[&record.name, &json, &identity],
                    ))
                    .await
            }
        }
        .map_err(|e| self.unavailable(e))?;
        match written {
            Some(row) => {
                self.versions.lock().insert(record.name.clone(), row.get(0));
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[async_trait]
impl RecordStore for PgRecords {
    async fn load(&self) -> Result<Saved, SavedStateError> {
        let client = self
            .database
            .client()
            .await
            .map_err(|e| self.unavailable(e))?;
        let rows = self
            .database
            .timed(client.query(
                "SELECT name, record::text, identity, version FROM worker_records",
                &[],
            ))
            .await
            .map_err(|e| self.unavailable(e))?;
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
        let client = self
            .database
            .client()
            .await
            .map_err(|e| self.unavailable(e))?;
        let rows = self
            .database
            .timed(client.query(
                "SELECT w.name, w.record::text, w.identity, w.version
                 FROM worker_records w
                 JOIN unnest($1::text[], $2::bigint[]) AS k(name, version) USING (name)
                 WHERE w.version <> k.version",
                &[&names, &known],
            ))
            .await
            .map_err(|e| self.unavailable(e))?;
        rows.iter().map(|row| self.take(row)).collect()
    }

    async fn store(
        &self,
        saved: Saved,
        changed: BTreeSet<String>,
    ) -> Result<Vec<String>, SavedStateError> {
        let client = self
            .database
            .client()
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut conflicts = Vec::new();
        for record in saved.workers.iter().filter(|r| changed.contains(&r.name)) {
            if !self
                .write(&client, record, saved.bindings.get(&record.name))
                .await?
            {
                conflicts.push(record.name.clone());
            }
        }
        let due = self
            .purged
            .lock()
            .is_none_or(|at| at.elapsed() >= PURGE_EVERY);
        if due {
            self.database
                .timed(client.execute(
                    "DELETE FROM worker_records WHERE saved_at < now() - interval '1 day'",
                    &[],
                ))
                .await
                .map_err(|e| self.unavailable(e))?;
            *self.purged.lock() = Some(Instant::now());
        }
        Ok(conflicts)
    }

    fn describe(&self) -> String {
        self.database.describe().to_owned()
    }
}
