//! A layer that keeps a remote store's contents in an index, and collects its garbage.
//!
//! An object store answers "do you have X" one blob and one round trip at a time, and
//! several servers write it at once, so the layer keeps a [`BlobIndex`] (a database
//! table) of what the store below holds, and answers `find_missing` from it in one
//! query. The index follows the store, never leads it: a blob is listed only after
//! the store has committed it, and a blob listed but missing from the store is
//! dropped from the index when a read finds it gone, and reads as missing.
//!
//! Every use of a blob (written, read, found by `find_missing`, which is also how
//! the ActionCache checks a result's outputs) renews its lease. Collection removes
//! least recently used blobs while the store is over its bound, but never one
//! used within the lease: clients that were told a blob exists may count on it for
//! that long. Collection unlists a batch of blobs and marks them as being deleted
//! before it deletes them from the store; a writer of one of those blobs waits
//! until the deletion is over and uploads it again, so a deletion cannot remove an
//! upload that the index goes on to list.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use paddock_reapi::Digest;

use crate::blob::{BlobSink, BlobStore, BlobStream, StoreError, StoredBlob};

/// Blobs a store holds durably, with when each was last used.
#[async_trait]
pub trait BlobIndex: Send + Sync + 'static {
    /// The digests among `digests` the index does not list; it renews the lease of
    /// those it does.
    async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError>;

    /// Renews a listed blob's lease.
    async fn touch(&self, digest: &Digest) -> Result<(), StoreError>;

    /// Before an upload: whether the blob is listed already (its lease renewed);
    /// if it is being collected, waits until the store no longer holds it.
    async fn prepare_write(&self, digest: &Digest) -> Result<bool, StoreError>;

    /// Lists a blob that the store now holds durably.
    async fn admit(&self, digest: &Digest) -> Result<(), StoreError>;

    /// Unlists a blob the store turned out not to hold.
    async fn forget(&self, digest: &Digest) -> Result<(), StoreError>;

    /// Unlists the next batch of at most `batch` blobs to collect, least recently
    /// used first, none used within `lease`, only as many as bring the listed total
    /// under `capacity`, and marks them as being deleted; also hands back the
    /// deletions a collector that died left unfinished. `None` when another server
    /// is collecting.
    async fn select_garbage(
        &self,
        capacity: u64,
        lease: Duration,
        batch: usize,
    ) -> Result<Option<Vec<Digest>>, StoreError>;

    /// The store no longer holds `digests`, which [`BlobIndex::select_garbage`]
    /// handed out.
    async fn collected(&self, digests: &[Digest]) -> Result<(), StoreError>;
}

/// When blobs are collected.
#[derive(Debug, Clone, Copy)]
pub struct Collection {
    /// The store's bound in bytes.
    pub capacity: u64,
    /// Blobs used within this time are kept whatever the bound.
    pub lease: Duration,
    /// How often a collection runs.
    pub interval: Duration,
}

/// Blobs unlisted and deleted at a time.
const COLLECT_BATCH: usize = 1_000;
/// Deletions sent to the store at once.
const DELETE_CONCURRENCY: usize = 16;

pub struct Indexed {
    index: Arc<dyn BlobIndex>,
    store: Arc<dyn BlobStore>,
    collection: Collection,
}

impl Indexed {
    pub fn new(
        index: Arc<dyn BlobIndex>,
        store: Arc<dyn BlobStore>,
        collection: Collection,
    ) -> Indexed {
        Indexed {
            index,
            store,
            collection,
        }
    }

    /// Collects garbage every `collection.interval` while the process runs.
    pub fn spawn_collector(self: &Arc<Self>) {
        let layer = Arc::downgrade(self);
        let interval = self.collection.interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(layer) = layer.upgrade() else {
                    return;
                };
                if let Err(e) = layer.collect().await {
                    tracing::warn!(error = %e, "collecting the CAS's garbage failed; trying again at the next interval");
                }
            }
        });
    }

    /// One collection: batches of blobs unlisted and deleted until the store fits
    /// its bound or only leased blobs are left; the number of blobs deleted.
    pub async fn collect(&self) -> Result<u64, StoreError> {
        let started = Instant::now();
        let (mut blobs, mut bytes) = (0u64, 0u64);
        loop {
            let Some(batch) = self
                .index
                .select_garbage(
                    self.collection.capacity,
                    self.collection.lease,
                    COLLECT_BATCH,
                )
                .await?
            else {
                return Ok(0);
            };
            if batch.is_empty() {
                break;
            }
            let deleted: Vec<Result<Digest, StoreError>> = futures::stream::iter(batch)
                .map(|digest| async move { self.store.delete(&digest).await.map(|()| digest) })
                .buffer_unordered(DELETE_CONCURRENCY)
                .collect()
                .await;
            let mut done = Vec::with_capacity(deleted.len());
            for result in deleted {
                match result {
                    Ok(digest) => done.push(digest),
                    // Left marked: a later collection finishes it.
                    Err(e) => tracing::warn!(error = %e, "could not delete a collected blob"),
                }
            }
            self.index.collected(&done).await?;
            blobs += done.len() as u64;
            bytes += done.iter().map(|d| d.size()).sum::<u64>();
            if done.is_empty() {
                break;
            }
        }
        metrics::counter!("paddock_cas_collected_blobs_total").increment(blobs);
        metrics::counter!("paddock_cas_collected_bytes_total").increment(bytes);
        metrics::histogram!("paddock_cas_collection_seconds")
            .record(started.elapsed().as_secs_f64());
        if blobs > 0 {
            tracing::info!(
                blobs,
                bytes,
                seconds = started.elapsed().as_secs_f64(),
                "collected the CAS's least recently used blobs"
            );
        }
        Ok(blobs)
    }
}

#[async_trait]
impl BlobStore for Indexed {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        self.index.missing(digests).await
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobStream>, StoreError> {
        match self.store.read(digest, offset).await? {
            Some(stream) => {
                if let Err(e) = self.renew(digest).await {
                    // The blob is here and intact; only its lease was not renewed.
                    tracing::warn!(%digest, error = %e, "could not renew a blob's lease");
                }
                Ok(Some(stream))
            }
            None => {
                self.index.forget(digest).await?;
                Ok(None)
            }
        }
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        if self.index.prepare_write(digest).await? {
            if self.store.find_missing(&[*digest]).await?.is_empty() {
                return Ok(Box::new(AlreadyStored { written: 0 }));
            }
            tracing::warn!(%digest, "the CAS index listed a blob its store did not hold; storing it again");
            self.index.forget(digest).await?;
        }
        Ok(Box::new(Admitting {
            digest: *digest,
            inner: self.store.write(digest).await?,
            index: self.index.clone(),
        }))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        self.index.forget(digest).await?;
        self.store.delete(digest).await
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        self.store.list().await
    }

    async fn renew(&self, digest: &Digest) -> Result<(), StoreError> {
        self.index.touch(digest).await
    }
}

/// A write to the store, listed in the index once committed.
struct Admitting {
    digest: Digest,
    inner: Box<dyn BlobSink>,
    index: Arc<dyn BlobIndex>,
}

#[async_trait]
impl BlobSink for Admitting {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.inner.write(chunk).await
    }

    fn written(&self) -> u64 {
        self.inner.written()
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.inner.commit().await?;
        self.index.admit(&self.digest).await
    }
}

/// A write of a blob the store holds already: the bytes are counted (a layer above
/// still hashes them) and dropped.
struct AlreadyStored {
    written: u64,
}

#[async_trait]
impl BlobSink for AlreadyStored {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.written += chunk.len() as u64;
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}
