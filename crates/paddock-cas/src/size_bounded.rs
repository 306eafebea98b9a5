//! A layer that keeps a store under a size bound by evicting least recently used blobs.
//!
//! The layer keeps an in-memory index of everything below it (rebuilt from
//! [`BlobStore::list`] at start-up, oldest first), so it answers `find_missing` without
//! touching the store underneath, and it is the one place that knows the store's size.
//!
//! Uploads under way count too: every byte a sink has taken is reserved until the
//! blob is committed (and becomes part of the store) or abandoned, so that partial
//! uploads cannot fill the disk beneath a bounded store. Stored blobs are evicted to
//! make room for them; when reservations alone would pass the bound, writes are
//! refused with RESOURCE_EXHAUSTED.

use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use hashlink::LinkedHashMap;
use paddock_reapi::Digest;
use parking_lot::Mutex;

use crate::blob::{BlobSink, BlobStore, BlobStream, StoreError, StoredBlob};

pub struct SizeBounded {
    shared: Arc<Shared>,
}

/// What the layer and its in-flight sinks share.
struct Shared {
    inner: Arc<dyn BlobStore>,
    capacity: u64,
    name: &'static str,
    state: Mutex<Index>,
}

/// Blobs in least- to most-recently-used order, with their total size, and the bytes
/// uploads under way hold.
#[derive(Default)]
struct Index {
    blobs: LinkedHashMap<Digest, ()>,
    total: u64,
    reserved: u64,
}

impl Index {
    fn insert(&mut self, digest: Digest) {
        if self.blobs.insert(digest, ()).is_none() {
            self.total += digest.size();
        } else {
            self.blobs.to_back(&digest);
        }
    }

    fn remove(&mut self, digest: &Digest) {
        if self.blobs.remove(digest).is_some() {
            self.total -= digest.size();
        }
    }

    /// Removes least recently used blobs until they and the reservations fit
    /// `capacity`.
    fn evict_to(&mut self, capacity: u64) -> Vec<Digest> {
        let mut evicted = Vec::new();
        while self.total + self.reserved > capacity {
            let Some((digest, ())) = self.blobs.pop_front() else {
                break;
            };
            self.total -= digest.size();
            evicted.push(digest);
        }
        evicted
    }
}

impl SizeBounded {
    /// Wraps `inner`, indexing what it already holds and evicting down to `capacity`.
    /// `name` labels this store's metrics.
    pub async fn new(
        inner: Arc<dyn BlobStore>,
        capacity: u64,
        name: &'static str,
    ) -> Result<Self, StoreError> {
        let mut found: Vec<StoredBlob> = inner.list().await?;
        found.sort_by_key(|b| b.last_used);
        let mut index = Index::default();
        for blob in found {
            index.insert(blob.digest);
        }
        let evicted = index.evict_to(capacity);
        let (blobs, bytes) = (index.blobs.len(), index.total);
        let shared = Shared {
            inner,
            capacity,
            name,
            state: Mutex::new(index),
        };
        shared.remove_evicted(evicted).await;
        shared.report();
        tracing::info!(
            store = name,
            blobs,
            bytes,
            capacity,
            "blob store index recovered"
        );
        Ok(SizeBounded {
            shared: Arc::new(shared),
        })
    }

    /// Bytes currently held.
    pub fn size(&self) -> u64 {
        self.shared.state.lock().total
    }

    /// Bytes that uploads under way hold.
    pub fn reserved(&self) -> u64 {
        self.shared.state.lock().reserved
    }
}

impl Shared {
    async fn remove_evicted(&self, evicted: Vec<Digest>) {
        if evicted.is_empty() {
            return;
        }
        metrics::counter!("paddock_store_evictions_total", "store" => self.name)
            .increment(evicted.len() as u64);
        for digest in evicted {
            if let Err(e) = self.inner.delete(&digest).await {
                tracing::warn!(%digest, error = %e, "could not delete an evicted blob");
            }
        }
    }

    fn report(&self) {
        let (count, total, reserved) = {
            let state = self.state.lock();
            (state.blobs.len(), state.total, state.reserved)
        };
        metrics::gauge!("paddock_store_bytes", "store" => self.name).set(total as f64);
        metrics::gauge!("paddock_store_reserved_bytes", "store" => self.name).set(reserved as f64);
        metrics::gauge!("paddock_store_blobs", "store" => self.name).set(count as f64);
        metrics::gauge!("paddock_store_capacity_bytes", "store" => self.name)
            .set(self.capacity as f64);
    }

    fn check_fits(&self, digest: &Digest) -> Result<(), StoreError> {
        if digest.size() > self.capacity {
            return Err(StoreError::TooLarge {
                digest: *digest,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Reserves `bytes` more for an upload under way, evicting stored blobs to make
    /// room; refused when reservations alone would pass the bound.
    async fn reserve(&self, bytes: u64) -> Result<(), StoreError> {
        let evicted = {
            let mut state = self.state.lock();
            if state.reserved + bytes > self.capacity {
                return Err(StoreError::Full {
                    reserved: state.reserved,
                    capacity: self.capacity,
                });
            }
            state.reserved += bytes;
            state.evict_to(self.capacity)
        };
        self.remove_evicted(evicted).await;
        self.report();
        Ok(())
    }

    fn release(&self, bytes: u64) {
        let mut state = self.state.lock();
        state.reserved = state.reserved.saturating_sub(bytes);
    }

    /// Adds a written blob, whose `reserved` bytes (if it was uploaded through a
    /// sink) become part of the store.
    async fn admit(&self, digest: Digest, reserved: u64) {
        let evicted = {
            let mut state = self.state.lock();
            state.reserved = state.reserved.saturating_sub(reserved);
            state.insert(digest);
            // Evict the oldest first; the blob just written is the newest.
            state.evict_to(self.capacity)
        };
        self.remove_evicted(evicted).await;
        self.report();
    }
}

#[async_trait]
impl BlobStore for SizeBounded {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let mut state = self.shared.state.lock();
        Ok(digests
            .iter()
            .filter(|d| state.blobs.to_back(d).is_none())
            .copied()
            .collect())
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobStream>, StoreError> {
        let shared = &self.shared;
        if !shared.state.lock().blobs.contains_key(digest) {
            return Ok(None);
        }
        match shared.inner.read(digest, offset).await? {
            Some(stream) => {
                shared.state.lock().blobs.to_back(digest);
                Ok(Some(stream))
            }
            None => {
                // It vanished underneath (removed as corrupt, or by hand): forget it.
                shared.state.lock().remove(digest);
                shared.report();
                Ok(None)
            }
        }
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        self.shared.check_fits(digest)?;
        Ok(Box::new(BoundedSink {
            inner: self.shared.inner.write(digest).await?,
            digest: *digest,
            shared: self.shared.clone(),
            reserved: 0,
        }))
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        self.shared.check_fits(digest)?;
        self.shared.inner.put(digest, data).await?;
        self.shared.admit(*digest, 0).await;
        Ok(())
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        self.shared.state.lock().remove(digest);
        self.shared.report();
        self.shared.inner.delete(digest).await
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        self.shared.inner.list().await
    }
}

/// An upload into the bounded store, holding a reservation for what it has taken.
struct BoundedSink {
    inner: Box<dyn BlobSink>,
    digest: Digest,
    shared: Arc<Shared>,
    reserved: u64,
}

#[async_trait]
impl BlobSink for BoundedSink {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        // Never more than the blob's size: the sink below refuses the excess anyway.
        let more = (chunk.len() as u64).min(self.digest.size().saturating_sub(self.reserved));
        self.shared.reserve(more).await?;
        self.reserved += more;
        self.inner.write(chunk).await
    }

    fn written(&self) -> u64 {
        self.inner.written()
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let reserved = std::mem::take(&mut self.reserved);
        let shared = self.shared.clone();
        let digest = self.digest;
        // Taken out of the box so that dropping it cannot release the reservation twice.
        let inner = std::mem::replace(&mut self.inner, Box::new(Committed));
        match inner.commit().await {
            Ok(()) => {
                shared.admit(digest, reserved).await;
                Ok(())
            }
            Err(e) => {
                shared.release(reserved);
                shared.report();
                Err(e)
            }
        }
    }
}

impl Drop for BoundedSink {
    fn drop(&mut self) {
        if self.reserved > 0 {
            self.shared.release(self.reserved);
            self.shared.report();
        }
    }
}

/// Stands in for a sink that has been committed.
struct Committed;

#[async_trait]
impl BlobSink for Committed {
    async fn write(&mut self, _: Bytes) -> Result<(), StoreError> {
        Err(StoreError::Io(io::Error::other(
            "the upload was already committed",
        )))
    }

    fn written(&self) -> u64 {
        0
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    fn blob(i: u8, len: usize) -> (Digest, Bytes) {
        let data = Bytes::from(vec![i; len]);
        (Digest::of(&data), data)
    }

    #[tokio::test]
    async fn evicts_least_recently_used_first() {
        let store = SizeBounded::new(Arc::new(MemoryStore::new()), 300, "test")
            .await
            .unwrap();
        let (a, ad) = blob(1, 100);
        let (b, bd) = blob(2, 100);
        let (c, cd) = blob(3, 100);
        let (d, dd) = blob(4, 100);
        store.put(&a, ad).await.unwrap();
        store.put(&b, bd).await.unwrap();
        store.put(&c, cd).await.unwrap();
        // Touch `a`, so `b` is now the least recently used.
        assert!(store.find_missing(&[a]).await.unwrap().is_empty());
        store.put(&d, dd).await.unwrap();
        assert_eq!(store.find_missing(&[a, b, c, d]).await.unwrap(), vec![b]);
        assert_eq!(store.size(), 300);
    }

    #[tokio::test]
    async fn refuses_a_blob_larger_than_the_store() {
        let store = SizeBounded::new(Arc::new(MemoryStore::new()), 10, "test")
            .await
            .unwrap();
        let (big, data) = blob(1, 11);
        assert!(matches!(
            store.put(&big, data).await,
            Err(StoreError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn uploads_under_way_count_against_the_bound_until_they_end() {
        let store = SizeBounded::new(Arc::new(MemoryStore::new()), 300, "test")
            .await
            .unwrap();
        let (a, ad) = blob(1, 100);
        store.put(&a, ad).await.unwrap();
        let (big, big_data) = blob(2, 250);
        let mut sink = store.write(&big).await.unwrap();
        sink.write(big_data.slice(..150)).await.unwrap();
        // 150 reserved beside 100 stored fits; 250 reserved does not, so `a` goes.
        assert_eq!((store.size(), store.reserved()), (100, 150));
        sink.write(big_data.slice(150..)).await.unwrap();
        assert_eq!((store.size(), store.reserved()), (0, 250));
        assert_eq!(store.find_missing(&[a]).await.unwrap(), vec![a]);
        // A second upload cannot reserve past the bound: refused, not stored.
        let (other, other_data) = blob(3, 100);
        let mut second = store.write(&other).await.unwrap();
        let refused = second.write(other_data.clone()).await.unwrap_err();
        assert!(matches!(
            refused,
            StoreError::Full {
                reserved: 250,
                capacity: 300
            }
        ));
        drop(second);
        // Committed: the reservation becomes the blob.
        sink.commit().await.unwrap();
        assert_eq!((store.size(), store.reserved()), (250, 0));
        // Abandoned: the reservation is given back.
        let mut third = store.write(&other).await.unwrap();
        third.write(other_data.slice(..40)).await.unwrap();
        assert_eq!(store.reserved(), 40);
        drop(third);
        assert_eq!((store.size(), store.reserved()), (250, 0));
    }
}
