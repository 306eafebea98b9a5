//! The one trait every blob store implements, and the errors stores report.

use std::io;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;
use paddock_reapi::Digest;

/// The largest chunk a store hands out when it streams a blob.
pub const READ_CHUNK: usize = 1024 * 1024;

/// A blob's bytes, from the requested offset to its end, in chunks.
pub type BlobStream = BoxStream<'static, Result<Bytes, StoreError>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} is not in the store")]
    NotFound(Digest),
    #[error("data does not match digest {expected}: it hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("more data than the {expected} bytes that digest {digest} promises")]
    TooMuchData { digest: Digest, expected: u64 },
    #[error("blob {digest} is larger than the store's capacity of {capacity} bytes")]
    TooLarge { digest: Digest, capacity: u64 },
    #[error("blob {0} was corrupt in storage and has been removed; upload it again")]
    Corrupt(Digest),
    #[error("uploads under way already hold {reserved} of the store's {capacity} bytes; try again when they finish")]
    Full { reserved: u64, capacity: u64 },
    #[error("storage I/O error: {0}")]
    Io(#[from] io::Error),
    /// A store elsewhere (a database) cannot be reached or answer now; the call may
    /// be retried.
    #[error("{0}; try again")]
    Unavailable(String),
}

impl StoreError {
    /// The gRPC status code a client should see for this error.
    pub fn code(&self) -> tonic::Code {
        match self {
            StoreError::NotFound(_) | StoreError::Corrupt(_) => tonic::Code::NotFound,
            StoreError::DigestMismatch { .. } | StoreError::TooMuchData { .. } => {
                tonic::Code::InvalidArgument
            }
            StoreError::TooLarge { .. } | StoreError::Full { .. } => tonic::Code::ResourceExhausted,
            StoreError::Io(_) => tonic::Code::Internal,
            StoreError::Unavailable(_) => tonic::Code::Unavailable,
        }
    }
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// What a persistent store holds, as found when it starts.
#[derive(Debug, Clone)]
pub struct StoredBlob {
    pub digest: Digest,
    pub last_used: SystemTime,
}

/// A content-addressed blob store.
///
/// Stores never make partial data visible: a blob appears only when a [`BlobSink`] is
/// committed, and dropping a sink abandons its data.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The digests among `digests` that the store does not hold.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError>;

    /// Streams a blob from `offset` (at most its size) to its end; `None` if absent.
    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobStream>, StoreError>;

    /// Starts writing a blob. Nothing is visible until the sink is committed.
    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError>;

    /// Stores a blob that is already in memory.
    async fn put(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        let mut sink = self.write(digest).await?;
        sink.write(data).await?;
        sink.commit().await
    }

    /// Removes a blob if present.
    async fn delete(&self, digest: &Digest) -> Result<(), StoreError>;

    /// Lists what a persistent store holds; empty for stores that start empty.
    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError>;

    /// Marks a blob as used without reading it, for a store whose blobs are kept
    /// by use (a read served by a copy elsewhere counts). Most stores keep
    /// nothing by use.
    async fn renew(&self, _digest: &Digest) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A blob being written. Data becomes visible only on [`commit`](BlobSink::commit).
#[async_trait]
pub trait BlobSink: Send {
    /// Appends `chunk`. Refused with [`StoreError::Full`], it took none of the chunk,
    /// which may be offered again.
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError>;

    /// Bytes accepted so far; what a resumed upload continues from.
    fn written(&self) -> u64;

    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// Reads a whole blob into memory; `None` if absent.
pub async fn read_all(store: &dyn BlobStore, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
    let Some(mut stream) = store.read(digest, 0).await? else {
        return Ok(None);
    };
    let mut out = BytesMut::with_capacity(digest.size() as usize);
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(Some(out.freeze()))
}

/// A blob's stream without its first `count` bytes.
pub fn skip(source: BlobStream, count: u64) -> BlobStream {
    if count == 0 {
        return source;
    }
    let mut left = count;
    source
        .filter_map(move |chunk| {
            let rest = match chunk {
                Ok(mut chunk) => {
                    let dropped = left.min(chunk.len() as u64);
                    left -= dropped;
                    let rest = chunk.split_off(dropped as usize);
                    (!rest.is_empty()).then_some(Ok(rest))
                }
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(rest)
        })
        .boxed()
}
