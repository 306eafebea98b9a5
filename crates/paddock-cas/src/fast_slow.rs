//! A layer that puts a small, fast store (local disk) in front of a large, slow one
//! (an object store shared by several servers).
//!
//! The slow store is the truth: `find_missing` asks it alone, every write reaches it
//! before it is acknowledged, and the fast store is only ever a copy. Writes go to
//! both as they stream (write-through); a read that misses the fast store streams
//! from the slow one and copies what it reads into the fast one (read-through), so
//! that the next read, or the next worker fetching the same input, is local. Such a
//! read is hashed as it streams and its last chunk is held back until the hash
//! matches, so neither the reader nor the fast store ever gets the whole of a
//! corrupt object (which is removed from the slow store); the copy continues if the
//! reader goes away, so an interrupted read still warms the tier.
//!
//! A read served by the fast copy still renews the shared blob's lease below.
//! Deleting removes only the fast copy: the slow store is shared, and what leaves it
//! is its own collector's decision. A fast copy found corrupt is deleted by the
//! layer above, and the next read goes to the slow store.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use paddock_reapi::{Digest, DigestHasher};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::blob::{BlobSink, BlobStore, BlobStream, StoreError, StoredBlob};

/// Chunks a read-through copy may run ahead of its reader.
const READ_AHEAD: usize = 4;

pub struct FastSlow {
    fast: Arc<dyn BlobStore>,
    slow: Arc<dyn BlobStore>,
}

impl FastSlow {
    pub fn new(fast: Arc<dyn BlobStore>, slow: Arc<dyn BlobStore>) -> FastSlow {
        FastSlow { fast, slow }
    }
}

#[async_trait]
impl BlobStore for FastSlow {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        self.slow.find_missing(digests).await
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobStream>, StoreError> {
        match self.fast.read(digest, offset).await {
            Ok(Some(stream)) => {
                metrics::counter!("paddock_fast_tier_reads_total", "tier" => "fast").increment(1);
                // The read is a use of the shared blob, which keeps it; the reader
                // need not wait for that to be noted.
                let (slow, digest) = (self.slow.clone(), *digest);
                tokio::spawn(async move {
                    if let Err(e) = slow.renew(&digest).await {
                        tracing::warn!(%digest, error = %e, "could not renew a blob's lease");
                    }
                });
                return Ok(Some(stream));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%digest, error = %e, "the fast tier failed a read; reading the slow store")
            }
        }
        metrics::counter!("paddock_fast_tier_reads_total", "tier" => "slow").increment(1);
        if offset > 0 {
            // A resumed read: copying needs the blob from its start.
            return self.slow.read(digest, offset).await;
        }
        let Some(source) = self.slow.read(digest, 0).await? else {
            return Ok(None);
        };
        let copy = match self.fast.write(digest).await {
            Ok(sink) => sink,
            Err(e) => {
                tracing::debug!(%digest, error = %e, "not copying a blob into the fast tier");
                return Ok(Some(source));
            }
        };
        let (sender, receiver) = mpsc::channel(READ_AHEAD);
        tokio::spawn(copy_through(
            *digest,
            source,
            copy,
            sender,
            self.slow.clone(),
        ));
        Ok(Some(ReceiverStream::new(receiver).boxed()))
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        let slow = self.slow.write(digest).await?;
        let fast = match self.fast.write(digest).await {
            Ok(sink) => Some(sink),
            Err(e) => {
                tracing::debug!(%digest, error = %e, "writing a blob past the fast tier");
                None
            }
        };
        Ok(Box::new(BothSink { slow, fast }))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        self.fast.delete(digest).await
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        self.slow.list().await
    }
}

/// Forwards a blob from the slow store to a reader, copying it into the fast store,
/// where it is committed only if the whole blob arrived and hashes to its digest.
async fn copy_through(
    digest: Digest,
    mut source: BlobStream,
    mut copy: Box<dyn BlobSink>,
    reader: mpsc::Sender<Result<Bytes, StoreError>>,
    slow: Arc<dyn BlobStore>,
) {
    let mut hasher = DigestHasher::new();
    let mut copying = true;
    // The last chunk waits for the hash: a reader never receives the whole of a
    // corrupt blob.
    let mut held: Option<Bytes> = None;
    while let Some(chunk) = source.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                if matches!(e, StoreError::Corrupt(_)) {
                    remove_corrupt(&slow, &digest).await;
                }
                let _ = reader.send(Err(e)).await;
                return;
            }
        };
        hasher.update(&chunk);
        if copying && copy.write(chunk.clone()).await.is_err() {
            copying = false;
        }
        if let Some(previous) = held.replace(chunk) {
            // A reader that went away does not stop the copy.
            let _ = reader.send(Ok(previous)).await;
        }
    }
    let actual = hasher.finish();
    if actual != digest {
        tracing::error!(%digest, %actual, "the slow store holds a corrupt blob");
        remove_corrupt(&slow, &digest).await;
        let _ = reader.send(Err(StoreError::Corrupt(digest))).await;
        return;
    }
    if let Some(last) = held {
        let _ = reader.send(Ok(last)).await;
    }
    if copying {
        if let Err(e) = copy.commit().await {
            tracing::debug!(%digest, error = %e, "could not keep a copy in the fast tier");
        }
    }
}

/// Removes a blob found corrupt from the slow store, so that it reads as missing
/// and can be uploaded again.
async fn remove_corrupt(slow: &Arc<dyn BlobStore>, digest: &Digest) {
    metrics::counter!("paddock_store_corrupt_blobs_total").increment(1);
    if let Err(e) = slow.delete(digest).await {
        tracing::warn!(%digest, error = %e, "could not remove a corrupt blob");
    }
}

/// A write to the slow store, copied to the fast one while the fast one takes it.
struct BothSink {
    slow: Box<dyn BlobSink>,
    fast: Option<Box<dyn BlobSink>>,
}

#[async_trait]
impl BlobSink for BothSink {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        // The slow store first: a refusal there is the write's, and leaves the fast
        // copy behind the slow one by nothing.
        self.slow.write(chunk.clone()).await?;
        if let Some(fast) = &mut self.fast {
            if fast.write(chunk).await.is_err() {
                self.fast = None;
            }
        }
        Ok(())
    }

    fn written(&self) -> u64 {
        self.slow.written()
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.slow.commit().await?;
        if let Some(fast) = self.fast {
            if let Err(e) = fast.commit().await {
                tracing::debug!(error = %e, "could not keep a copy in the fast tier");
            }
        }
        Ok(())
    }
}
