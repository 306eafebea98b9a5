//! Keeping the history lasting: the [`HistoryStore`] trait that a file under the
//! data directory ([`crate::HistoryFile`]) or a shared database implements, and the
//! [`keep`] loop that hands the history's changes to it once a second, applies what
//! other servers wrote, and has the store drop what the bounds no longer keep.
//!
//! The history is a view for people: when the store cannot be reached, changes wait
//! in memory (bounded) and the pages go on showing what this server knows.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Entry, History};

/// How often changes are handed to the store and other servers' changes read.
const EVERY: Duration = Duration::from_secs(1);
/// How often the store is asked to drop what the bounds no longer keep.
const TRIM_EVERY: Duration = Duration::from_secs(600);
/// Changes kept for a store that cannot take them, at most; past it the oldest go.
const PENDING_KEPT: usize = 100_000;
/// Changes handed to the store at once: each batch is kept whole or not at all, so
/// a failure part way through a backlog never stores a change twice.
const BATCH: usize = 1_000;

/// Where the history outlives the process.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Every change kept, oldest first, to rebuild the history at start-up.
    async fn load(&self) -> Result<Vec<Entry>, HistoryStoreError>;
    /// Keeps `entries` (made here), in order: all of them, or none on an error.
    async fn append(&self, entries: &[Entry]) -> Result<(), HistoryStoreError>;
    /// Changes other servers sharing the store made since the last call, in order
    /// (never any, for a store with one writer).
    async fn news(&self) -> Result<Vec<Entry>, HistoryStoreError>;
    /// Drops what `history`'s bounds no longer keep.
    async fn trim(&self, history: &Arc<History>) -> Result<(), HistoryStoreError>;
    /// Where the history is kept, for logs.
    fn describe(&self) -> String;
}

/// Why the store could not read or keep the history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryStoreError {
    #[error("the history {}: {error}", path.display())]
    File {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "the history {} has format {version}, newer than this Paddock's: run the newer \
         Paddock, or move the file aside to start without the history in it",
        path.display()
    )]
    Newer { path: PathBuf, version: u64 },
    #[error("the history in {store}: {error}")]
    Unavailable { store: String, error: String },
}

/// Hands `history`'s changes to `store` once a second, applies other servers'
/// changes, and trims the store every ten minutes, until `shutdown`; then hands over
/// what is left.
pub async fn keep(
    history: Arc<History>,
    store: Arc<dyn HistoryStore>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut pending: Vec<Entry> = Vec::new();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmed = tokio::time::Instant::now();
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut shutdown => true,
        };
        let (unsaved, lost) = history.take_unsaved(stopping);
        let mut lost = lost;
        pending.extend(unsaved);
        if pending.len() > PENDING_KEPT {
            let over = pending.len() - PENDING_KEPT;
            pending.drain(..over);
            lost += over as u64;
        }
        if lost > 0 {
            tracing::warn!(
                lost,
                store = %store.describe(),
                "changes to the history were dropped: the store fell too far behind"
            );
        }
        let mut result = Ok(());
        let mut stored = 0;
        for batch in pending.chunks(BATCH) {
            result = store.append(batch).await;
            if result.is_err() {
                break;
            }
            stored += batch.len();
        }
        pending.drain(..stored);
        if stopping {
            if let Err(error) = result {
                tracing::warn!(%error, unsaved = pending.len(), "the history's last changes were not kept");
            }
            return;
        }
        if result.is_ok() {
            result = store.news().await.map(|news| history.restore(news));
        }
        if result.is_ok() && trimmed.elapsed() >= TRIM_EVERY {
            trimmed = tokio::time::Instant::now();
            result = store.trim(&history).await;
        }
        match result {
            Err(error) if !failing => {
                tracing::warn!(%error, unsaved = pending.len(), "the history cannot be kept; retrying");
                failing = true;
            }
            Ok(()) if failing => {
                tracing::info!(store = %store.describe(), "the history is kept again");
                failing = false;
            }
            _ => {}
        }
    }
}
