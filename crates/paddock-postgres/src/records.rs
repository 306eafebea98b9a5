//! The workers' health records and name bindings in the `worker_records` table.
//!
//! Each server writes the records it changed (those of the workers connected to it),
//! never a whole snapshot, so servers do not overwrite each other's news; a worker
//! connecting to a server has its record read afresh ([`RecordStore::load_worker`]).
//! Records not written for a day (the scheduler forgets a quarantined worker's after
//! a day away) are deleted.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use paddock_scheduler::{RecordStore, Saved, SavedRecord, SavedStateError, SavedWorker};
use tokio::sync::Mutex;

use crate::database::Database;

/// How often records nobody wrote for a day are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3_600);

pub struct PgRecords {
    database: Database,
    purged: Mutex<Option<Instant>>,
}

impl PgRecords {
    pub fn new(database: Database) -> PgRecords {
        PgRecords {
            database,
            purged: Mutex::new(None),
        }
    }

    fn unavailable(&self, error: impl ToString) -> SavedStateError {
        SavedStateError::Unavailable {
            store: self.describe(),
            error: error.to_string(),
        }
    }

    fn parse(&self, name: &str, record: &str) -> Result<SavedRecord, SavedStateError> {
        serde_json::from_str(record).map_err(|e| {
            self.unavailable(format!("the record of worker {name:?} is malformed: {e}"))
        })
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
        let rows = client
            .query(
                "SELECT name, record::text, identity FROM worker_records",
                &[],
            )
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut saved = Saved::default();
        for row in rows {
            let (name, record, identity): (String, String, Option<String>) =
                (row.get(0), row.get(1), row.get(2));
            saved.workers.push(self.parse(&name, &record)?);
            if let Some(identity) = identity {
                saved.bindings.insert(name, identity);
            }
        }
        Ok(saved)
    }

    async fn load_worker(&self, name: &str) -> Result<Option<SavedWorker>, SavedStateError> {
        let client = self
            .database
            .client()
            .await
            .map_err(|e| self.unavailable(e))?;
        let row = client
            .query_opt(
                "SELECT record::text, identity FROM worker_records WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(|e| self.unavailable(e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let record: String = row.get(0);
        Ok(Some((self.parse(name, &record)?, row.get(1))))
    }

    async fn store(&self, saved: Saved, changed: BTreeSet<String>) -> Result<(), SavedStateError> {
        let mut names = Vec::new();
        let mut records = Vec::new();
        let mut identities = Vec::new();
        for record in saved.workers.iter().filter(|r| changed.contains(&r.name)) {
            names.push(record.name.clone());
            records.push(serde_json::to_string(record).map_err(|e| self.unavailable(e))?);
            identities.push(saved.bindings.get(&record.name).cloned());
        }
        let client = self
            .database
            .client()
            .await
            .map_err(|e| self.unavailable(e))?;
        if !names.is_empty() {
            client
                .execute(
                    "INSERT INTO worker_records (name, record, identity, saved_at)
                     SELECT name, record::jsonb, identity, now()
                     FROM unnest($1::text[], $2::text[], $3::text[]) AS t(name, record, identity)
                     ON CONFLICT (name) DO UPDATE
                     SET record = excluded.record, identity = excluded.identity,
                         saved_at = excluded.saved_at",
                    &[&names, &records, &identities],
                )
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        let mut purged = self.purged.lock().await;
        if purged.is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
            client
                .execute(
                    "DELETE FROM worker_records WHERE saved_at < now() - interval '1 day'",
                    &[],
                )
                .await
                .map_err(|e| self.unavailable(e))?;
            *purged = Some(Instant::now());
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.database.describe().to_owned()
    }
}
