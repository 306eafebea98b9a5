//! A blob store that keeps everything in memory; unbounded on its own.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream;
use paddock_reapi::Digest;
use parking_lot::RwLock;

use crate::blob::{BlobSink, BlobStore, BlobStream, StoreError, StoredBlob, READ_CHUNK};

#[derive(Default)]
pub struct MemoryStore {
    blobs: Arc<RwLock<HashMap<Digest, Bytes>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl BlobStore for MemoryStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let blobs = self.blobs.read();
        Ok(digests
            .iter()
            .filter(|d| !blobs.contains_key(d))
            .copied()
            .collect())
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobStream>, StoreError> {
        let Some(data) = self.blobs.read().get(digest).cloned() else {
            return Ok(None);
        };
        let start = (offset as usize).min(data.len());
        let chunks: Vec<Result<Bytes, StoreError>> = data
            .slice(start..)
            .chunks(READ_CHUNK)
            .map(|c| Ok(data.slice_ref(c)))
            .collect();
        Ok(Some(Box::pin(stream::iter(chunks))))
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        Ok(Box::new(MemorySink {
            blobs: self.blobs.clone(),
            digest: *digest,
            // Reserve up front (within reason) so large blobs are not copied as they grow.
            data: BytesMut::with_capacity(digest.size().min(64 << 20) as usize),
        }))
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        self.blobs.write().insert(*digest, data);
        Ok(())
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        self.blobs.write().remove(digest);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        Ok(Vec::new())
    }
}

struct MemorySink {
    blobs: Arc<RwLock<HashMap<Digest, Bytes>>>,
    digest: Digest,
    data: BytesMut,
}

#[async_trait]
impl BlobSink for MemorySink {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.data.extend_from_slice(&chunk);
        Ok(())
    }

    fn written(&self) -> u64 {
        self.data.len() as u64
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.blobs.write().insert(self.digest, self.data.freeze());
        Ok(())
    }
}
