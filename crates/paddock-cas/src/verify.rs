//! A layer that hashes every blob on its way in (and, if asked, on its way out).
//!
//! Writes: each chunk is hashed as it streams; a sink that receives more bytes than
//! its digest promises fails at once, and one whose hash differs fails on commit,
//! before the store below makes anything visible.
//!
//! Reads, as [`ReadVerification`] says: never, on a blob's first read since start-up,
//! or always. A verified read hashes the whole blob as it streams and holds the last
//! chunk back until the hash matches, so a client never receives the complete body of
//! a corrupt blob. A corrupt blob is deleted, so that it reads as missing and can be
//! uploaded again. With `Once`, blobs this process wrote or has verified are trusted
//! (up to [`TRUSTED_CAPACITY`] of them; beyond that the least recently used are
//! verified again on their next read).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use hashlink::LinkedHashMap;
use paddock_config::ReadVerification;
use paddock_reapi::{Digest, DigestHasher};
use parking_lot::Mutex;

use crate::blob::{BlobSink, BlobStore, BlobStream, StoreError, StoredBlob};

/// How many blobs the layer remembers as verified.
const TRUSTED_CAPACITY: usize = 1 << 20;

pub struct Verifying {
    inner: Arc<dyn BlobStore>,
    reads: ReadVerification,
    trusted: Arc<Trusted>,
}

/// The blobs known to be intact since this process started.
#[derive(Default)]
struct Trusted(Mutex<LinkedHashMap<Digest, ()>>);

impl Trusted {
    fn add(&self, digest: Digest) {
        let mut set = self.0.lock();
        set.replace(digest, ());
        while set.len() > TRUSTED_CAPACITY {
            set.pop_front();
        }
    }

    fn contains(&self, digest: &Digest) -> bool {
        let mut set = self.0.lock();
        let found = set.contains_key(digest);
        if found {
            set.to_back(digest);
        }
        found
    }

    fn remove(&self, digest: &Digest) {
        self.0.lock().remove(digest);
    }
}

impl Verifying {
    pub fn new(inner: Arc<dyn BlobStore>, reads: ReadVerification) -> Self {
        Verifying {
            inner,
            reads,
            trusted: Arc::default(),
        }
    }

    fn trust(&self, digest: &Digest) {
        if self.reads == ReadVerification::Once {
            self.trusted.add(*digest);
        }
    }

    fn needs_verification(&self, digest: &Digest) -> bool {
        match self.reads {
            ReadVerification::Never => false,
            ReadVerification::Once => !self.trusted.contains(digest),
            ReadVerification::Always => true,
        }
    }
}

fn check(expected: &Digest, hasher: DigestHasher) -> Result<(), StoreError> {
    let actual = hasher.finish();
    if actual != *expected {
        return Err(StoreError::DigestMismatch {
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

#[async_trait]
impl BlobStore for Verifying {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        self.inner.find_missing(digests).await
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobStream>, StoreError> {
        if !self.needs_verification(digest) {
            return self.inner.read(digest, offset).await;
        }
        let Some(stream) = self.inner.read(digest, 0).await? else {
            return Ok(None);
        };
        let trusted = (self.reads == ReadVerification::Once).then(|| self.trusted.clone());
        Ok(Some(verified_stream(
            stream,
            *digest,
            offset,
            self.inner.clone(),
            trusted,
        )))
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        let trusted = (self.reads == ReadVerification::Once).then(|| self.trusted.clone());
        Ok(Box::new(VerifyingSink {
            inner: self.inner.write(digest).await?,
            digest: *digest,
            hasher: DigestHasher::new(),
            trusted,
        }))
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        let mut hasher = DigestHasher::new();
        hasher.update(&data);
        check(digest, hasher)?;
        self.inner.put(digest, data).await?;
        self.trust(digest);
        Ok(())
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        self.trusted.remove(digest);
        self.inner.delete(digest).await
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        self.inner.list().await
    }
}

/// Hashes the whole blob, skips the first `offset` bytes of output, and withholds the
/// final chunk until the hash is known to match; then records the blob in `trusted`.
fn verified_stream(
    mut stream: BlobStream,
    digest: Digest,
    offset: u64,
    store: Arc<dyn BlobStore>,
    trusted: Option<Arc<Trusted>>,
) -> BlobStream {
    let verified = async_stream(move |tx| async move {
        let mut hasher = DigestHasher::new();
        let mut held: Option<Bytes> = None;
        let mut position = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            hasher.update(&chunk);
            let start = position;
            position += chunk.len() as u64;
            if position <= offset {
                continue;
            }
            let visible = chunk.slice(offset.saturating_sub(start) as usize..);
            if let Some(previous) = held.replace(visible) {
                if tx.send(Ok(previous)).await.is_err() {
                    return;
                }
            }
        }
        if hasher.finish() != digest {
            tracing::error!(%digest, "blob is corrupt in storage; removing it");
            metrics::counter!("paddock_store_corrupt_blobs_total").increment(1);
            if let Err(e) = store.delete(&digest).await {
                tracing::warn!(%digest, error = %e, "could not remove a corrupt blob");
            }
            let _ = tx.send(Err(StoreError::Corrupt(digest))).await;
            return;
        }
        if let Some(trusted) = trusted {
            trusted.add(digest);
        }
        if let Some(last) = held {
            let _ = tx.send(Ok(last)).await;
        }
    });
    Box::pin(verified)
}

/// Runs `body` as a producer task feeding a stream through a small channel.
fn async_stream<F, Fut>(
    body: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<Bytes, StoreError>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, StoreError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

struct VerifyingSink {
    inner: Box<dyn BlobSink>,
    digest: Digest,
    hasher: DigestHasher,
    trusted: Option<Arc<Trusted>>,
}

#[async_trait]
impl BlobSink for VerifyingSink {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        if self.hasher.len() + chunk.len() as u64 > self.digest.size() {
            return Err(StoreError::TooMuchData {
                digest: self.digest,
                expected: self.digest.size(),
            });
        }
        // Hashed once written: a chunk the store refused (full, say) may come again.
        self.inner.write(chunk.clone()).await?;
        self.hasher.update(&chunk);
        Ok(())
    }

    fn written(&self) -> u64 {
        self.inner.written()
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        check(&self.digest, self.hasher)?;
        self.inner.commit().await?;
        if let Some(trusted) = self.trusted {
            trusted.add(self.digest);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_all, MemoryStore};

    #[tokio::test]
    async fn mismatched_writes_are_never_visible() {
        let memory = Arc::new(MemoryStore::new());
        let store = Verifying::new(memory.clone(), ReadVerification::Always);
        let digest = Digest::of(b"right");
        assert!(matches!(
            store.put(&digest, Bytes::from_static(b"wrong")).await,
            Err(StoreError::DigestMismatch { .. })
        ));
        let mut sink = store.write(&digest).await.unwrap();
        assert!(matches!(
            sink.write(Bytes::from_static(b"too long")).await,
            Err(StoreError::TooMuchData { .. })
        ));
        let mut sink = store.write(&digest).await.unwrap();
        sink.write(Bytes::from_static(b"wrung")).await.unwrap();
        assert!(sink.commit().await.is_err());
        assert_eq!(memory.find_missing(&[digest]).await.unwrap(), vec![digest]);
    }

    #[tokio::test]
    async fn corrupt_blobs_fail_and_are_removed() {
        let memory = Arc::new(MemoryStore::new());
        let digest = Digest::of(b"original");
        // Plant bad data under the digest, as a bad disk would.
        memory
            .put(&digest, Bytes::from_static(b"tampered"))
            .await
            .unwrap();
        let store = Verifying::new(memory.clone(), ReadVerification::Once);
        assert!(matches!(
            read_all(&store, &digest).await,
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(memory.find_missing(&[digest]).await.unwrap(), vec![digest]);
    }

    #[tokio::test]
    async fn once_trusts_what_it_wrote_or_verified() {
        let memory = Arc::new(MemoryStore::new());
        let store = Verifying::new(memory.clone(), ReadVerification::Once);
        let digest = Digest::of(b"original");
        store
            .put(&digest, Bytes::from_static(b"original"))
            .await
            .unwrap();
        // Damage after a verified write goes unnoticed until the next start-up.
        memory
            .put(&digest, Bytes::from_static(b"tampered"))
            .await
            .unwrap();
        assert!(read_all(&store, &digest).await.is_ok());
        // A fresh layer (a restart) verifies on first read.
        let restarted = Verifying::new(memory.clone(), ReadVerification::Once);
        assert!(matches!(
            read_all(&restarted, &digest).await,
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn verified_reads_honour_offsets() {
        let store = Verifying::new(Arc::new(MemoryStore::new()), ReadVerification::Always);
        let data = Bytes::from_static(b"0123456789");
        let digest = Digest::of(&data);
        store.put(&digest, data).await.unwrap();
        let mut stream = store.read(&digest, 4).await.unwrap().unwrap();
        let mut got = Vec::new();
        while let Some(c) = stream.next().await {
            got.extend_from_slice(&c.unwrap());
        }
        assert_eq!(got, b"456789");
    }
}
