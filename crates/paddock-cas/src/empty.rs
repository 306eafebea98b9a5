//! A layer that makes the empty blob always present, as REAPI requires.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream;
use paddock_reapi::Digest;

use crate::blob::{BlobSink, BlobStore, BlobStream, StoreError, StoredBlob};

pub struct WithEmptyBlob {
    inner: Arc<dyn BlobStore>,
}

impl WithEmptyBlob {
    pub fn new(inner: Arc<dyn BlobStore>) -> Self {
        WithEmptyBlob { inner }
    }
}

#[async_trait]
impl BlobStore for WithEmptyBlob {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        if !digests.iter().any(Digest::is_empty_blob) {
            return self.inner.find_missing(digests).await;
        }
        let others: Vec<Digest> = digests
            .iter()
            .filter(|d| !d.is_empty_blob())
            .copied()
            .collect();
        self.inner.find_missing(&others).await
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobStream>, StoreError> {
        if digest.is_empty_blob() {
            return Ok(Some(Box::pin(stream::empty())));
        }
        self.inner.read(digest, offset).await
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        self.inner.write(digest).await
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        if digest.is_empty_blob() && data.is_empty() {
            return Ok(());
        }
        self.inner.put(digest, data).await
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        self.inner.delete(digest).await
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        self.inner.list().await
    }
}
