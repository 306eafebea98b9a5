//! Blobs in an S3-compatible object store: the backend that lets the CAS outgrow one
//! machine and outlive it.
//!
//! [`ObjectStoreBlobs`] implements [`BlobStore`] over the `object_store` crate (S3
//! here; GCS and Azure sit behind the same interface). Each blob is one object,
//! `{prefix}/cas/sha256/{hash}-{size}`. Small blobs are written with one PUT; blobs
//! larger than a part are streamed as a multipart upload, a few parts in flight at
//! once (so at most that many in memory), and an upload abandoned before its commit
//! is aborted, so nothing partial
//! is ever visible: S3 shows an object only once its PUT or its multipart upload
//! completes. Reads stream, from an offset with a ranged GET.
//!
//! A blob of up to one part that compresses by an eighth or more is stored
//! compressed with zstd (`Content-Encoding: zstd`); reads decompress it, bounded by
//! the digest's size. Larger blobs are stored as they are, so that their ranged
//! reads stay ranged GETs.
//!
//! This layer knows nothing of indexes or leases: it is the slow, shared store under
//! [`paddock_cas::Indexed`] (which answers `find_missing` from the database) and
//! [`paddock_cas::FastSlow`] (which keeps hot blobs on local disk). Credentials are
//! the process's own: from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), a shared credentials file
//! ([`credentials`]), a web identity token file, or the instance's metadata service;
//! never from the configuration itself, and never from clients.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload,
    ObjectStore, ObjectStoreExt, PutOptions, PutPayload, PutPayloadMut, RetryConfig, UploadPart,
};
use paddock_cas::compression::decompress;
use paddock_cas::{skip, BlobSink, BlobStore, BlobStream, StoreError, StoredBlob, READ_CHUNK};
use paddock_config::S3Config;
use paddock_reapi::Digest;

pub mod credentials;

/// Requests for existence sent at once, when nothing answers from an index.
const HEAD_CONCURRENCY: usize = 32;
/// Parts of one multipart upload sent at once: what hides a store's latency, at
/// the cost of this many parts held in memory per upload.
const PARTS_IN_FLIGHT: usize = 3;
/// Blobs smaller than this are stored as they are: too little to gain.
const MIN_COMPRESSED: usize = 1024;
/// The zstd level of stored blobs: written once, read many times.
const STORED_LEVEL: i32 = 3;
const ZSTD: &str = "zstd";

pub struct ObjectStoreBlobs {
    store: Arc<dyn ObjectStore>,
    /// Where blobs live: `{prefix}/cas/sha256`.
    root: Path,
    part_size: usize,
    describe: String,
}

impl ObjectStoreBlobs {
    /// A client for the bucket `config` names. Nothing is sent until the first call.
    pub fn connect(config: &S3Config) -> Result<ObjectStoreBlobs, StoreError> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(config.request_timeout.get())
                    .with_connect_timeout(Duration::from_secs(5)),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
            });
        if let Some(path) = credentials::file_to_read(config.credentials_file.as_deref()) {
            let found = credentials::read(&path, None)
                .map_err(|e| StoreError::Unavailable(format!("[storage.s3]: {e}")))?;
            builder = builder
                .with_access_key_id(found.access_key_id)
                .with_secret_access_key(found.secret_access_key);
            if let Some(token) = found.session_token {
                builder = builder.with_token(token);
            }
        }
        if let Some(endpoint) = &config.endpoint {
            if endpoint.starts_with("http://") && !loopback(endpoint) {
                tracing::warn!(%endpoint, "the object store is reached in the clear: blobs and request signatures cross the network unencrypted");
            }
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = builder
            .build()
            .map_err(|e| StoreError::Unavailable(format!("[storage.s3]: {e}")))?;
        let root = config
            .prefix
            .split('/')
            .filter(|s| !s.is_empty())
            .chain(["cas", "sha256"])
            .collect::<Path>();
        Ok(ObjectStoreBlobs {
            store: Arc::new(store),
            describe: format!(
                "{}/{}/{root}",
                config.endpoint.as_deref().unwrap_or("s3:/"),
                config.bucket
            ),
            root,
            part_size: config.part_size.bytes() as usize,
        })
    }

    fn path(&self, digest: &Digest) -> Path {
        self.root
            .clone()
            .join(format!("{}-{}", digest.hash_hex(), digest.size()).as_str())
    }

    /// Where blobs go, for logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Checks that the bucket answers and takes these credentials.
    pub async fn check(&self) -> Result<(), StoreError> {
        let probe = self.root.clone().join("probe");
        match self.store.head(&probe).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(failed(e)),
        }
    }

    async fn exists(&self, digest: &Digest) -> Result<bool, StoreError> {
        let head = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match self.store.get_opts(&self.path(digest), head).await {
            Ok(found) => Ok(compressed(&found) || found.meta.size == digest.size()),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(failed(e)),
        }
    }

    /// The object, whole or (for a raw blob) from `offset`.
    async fn get(
        &self,
        digest: &Digest,
        offset: u64,
        whole: bool,
    ) -> Result<Option<object_store::GetResult>, StoreError> {
        let options = GetOptions {
            range: (offset > 0 && !whole).then_some(GetRange::Offset(offset)),
            ..GetOptions::default()
        };
        match self.store.get_opts(&self.path(digest), options).await {
            Ok(found) => Ok(Some(found)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(failed(e)),
        }
    }

    /// Whether the blob may have been stored compressed (and so cannot be read
    /// from an offset with a ranged GET).
    fn may_be_compressed(&self, digest: &Digest) -> bool {
        digest.size() as usize <= self.part_size && digest.size() as usize >= MIN_COMPRESSED
    }
}

/// Whether an object was stored compressed.
fn compressed(found: &object_store::GetResult) -> bool {
    found
        .attributes
        .get(&Attribute::ContentEncoding)
        .is_some_and(|e| e.as_ref() == ZSTD)
}

/// Whether an `http://` endpoint names this machine.
fn loopback(endpoint: &str) -> bool {
    let host = endpoint
        .trim_start_matches("http://")
        .split(['/', '?'])
        .next()
        .unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => name,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The store's errors are the infrastructure's: the call may be retried.
fn failed(e: object_store::Error) -> StoreError {
    StoreError::Unavailable(format!("the object store failed: {e}"))
}

#[async_trait]
impl BlobStore for ObjectStoreBlobs {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let answers: Vec<Result<Option<Digest>, StoreError>> =
            futures::stream::iter(digests.iter().copied())
                .map(|digest| async move { Ok((!self.exists(&digest).await?).then_some(digest)) })
                .buffered(HEAD_CONCURRENCY)
                .collect()
                .await;
        answers.into_iter().filter_map(Result::transpose).collect()
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobStream>, StoreError> {
        if offset >= digest.size() {
            // S3 refuses a range that starts at the end; the answer is no bytes.
            return Ok(self
                .exists(digest)
                .await?
                .then(|| futures::stream::empty().boxed()));
        }
        let mut whole = self.may_be_compressed(digest);
        let mut found = match self.get(digest, offset, whole).await? {
            Some(found) => found,
            None => return Ok(None),
        };
        if compressed(&found) && !whole {
            // Stored compressed by a server with larger parts: a range of the
            // compressed bytes is of no use.
            whole = true;
            found = match self.get(digest, offset, whole).await? {
                Some(found) => found,
                None => return Ok(None),
            };
        }
        if compressed(&found) {
            let stream = found.into_stream().map_err(failed).boxed();
            return Ok(Some(in_chunks(skip(decompress(stream, *digest), offset))));
        }
        if found.meta.size != digest.size() {
            tracing::warn!(%digest, size = found.meta.size, "removing an object of the wrong size");
            self.delete(digest).await?;
            return Ok(None);
        }
        let stream = found.into_stream().map_err(failed).boxed();
        let unread = if whole { offset } else { 0 };
        Ok(Some(in_chunks(skip(stream, unread))))
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        Ok(Box::new(ObjectSink {
            store: self.store.clone(),
            path: self.path(digest),
            multipart: digest.size() as usize > self.part_size,
            part_size: self.part_size,
            part: PutPayloadMut::new(),
            upload: None,
            in_flight: FuturesUnordered::new(),
            written: 0,
        }))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        match self.store.delete(&self.path(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(failed(e)),
        }
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        let objects: Vec<_> = self
            .store
            .list(Some(&self.root))
            .try_collect()
            .await
            .map_err(failed)?;
        Ok(objects
            .into_iter()
            .filter_map(|object| {
                let name = object.location.filename()?;
                let (hash, size) = name.split_once('-')?;
                let digest = Digest::parse_parts(hash, size).ok()?;
                // A compressed object is smaller than its blob: the name decides.
                Some(StoredBlob {
                    digest,
                    last_used: object.last_modified.into(),
                })
            })
            .collect())
    }
}

/// The blob compressed, if that saves an eighth or more of it.
fn compress_if_smaller(body: PutPayload) -> Option<PutPayload> {
    let raw = body.content_length();
    if raw < MIN_COMPRESSED {
        return None;
    }
    let mut whole = Vec::with_capacity(raw);
    for chunk in body.iter() {
        whole.extend_from_slice(chunk);
    }
    let packed = zstd::bulk::compress(&whole, STORED_LEVEL).ok()?;
    (packed.len() <= raw - raw / 8).then(|| PutPayload::from(packed))
}

/// Regroups what the HTTP client hands out (often a few KiB at a time) into chunks
/// of up to [`READ_CHUNK`], so that a ByteStream read sends few, full messages.
fn in_chunks(source: BlobStream) -> BlobStream {
    futures::stream::unfold(
        (source, BytesMut::new(), false),
        |(mut source, mut pending, mut ended)| async move {
            while !ended && pending.len() < READ_CHUNK {
                match source.next().await {
                    Some(Ok(chunk)) => pending.extend_from_slice(&chunk),
                    Some(Err(e)) => return Some((Err(e), (source, pending, true))),
                    None => ended = true,
                }
            }
            if pending.is_empty() {
                return None;
            }
            let take = pending.len().min(READ_CHUNK);
            let chunk = pending.split_to(take).freeze();
            Some((Ok(chunk), (source, pending, ended)))
        },
    )
    .boxed()
}

/// An object being written: one PUT at commit for a blob up to a part's size, a
/// multipart upload (a few parts in memory at a time) for a larger one.
struct ObjectSink {
    store: Arc<dyn ObjectStore>,
    path: Path,
    multipart: bool,
    part_size: usize,
    part: PutPayloadMut,
    upload: Option<Box<dyn MultipartUpload>>,
    /// Parts sent and not yet acknowledged.
    in_flight: FuturesUnordered<UploadPart>,
    written: u64,
}

impl ObjectSink {
    /// Sends the part gathered so far, once fewer than [`PARTS_IN_FLIGHT`] are
    /// under way.
    async fn send_part(&mut self) -> Result<(), StoreError> {
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.part_done().await?;
        }
        let part = std::mem::take(&mut self.part).freeze();
        let upload = match &mut self.upload {
            Some(upload) => upload,
            None => self
                .upload
                .insert(self.store.put_multipart(&self.path).await.map_err(failed)?),
        };
        self.in_flight.push(upload.put_part(part));
        Ok(())
    }

    /// Waits for one part under way to be acknowledged.
    async fn part_done(&mut self) -> Result<(), StoreError> {
        match self.in_flight.next().await {
            Some(result) => result.map_err(failed),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl BlobSink for ObjectSink {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.written += chunk.len() as u64;
        self.part.push(chunk);
        if self.multipart && self.part.content_length() >= self.part_size {
            self.send_part().await?;
        }
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        if !self.multipart {
            let body = std::mem::take(&mut self.part).freeze();
            let packed = {
                let body = body.clone();
                tokio::task::spawn_blocking(move || compress_if_smaller(body))
                    .await
                    .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
            };
            let (body, options) = match packed {
                Some(packed) => {
                    let mut attributes = Attributes::new();
                    attributes.insert(Attribute::ContentEncoding, ZSTD.into());
                    let options = PutOptions {
                        attributes,
                        ..PutOptions::default()
                    };
                    (packed, options)
                }
                None => (body, PutOptions::default()),
            };
            self.store
                .put_opts(&self.path, body, options)
                .await
                .map_err(failed)?;
            return Ok(());
        }
        if self.part.content_length() > 0 || self.upload.is_none() {
            self.send_part().await?;
        }
        while !self.in_flight.is_empty() {
            self.part_done().await?;
        }
        let mut upload = self.upload.take().expect("a part was sent");
        if let Err(e) = upload.complete().await {
            abort(upload);
            return Err(failed(e));
        }
        Ok(())
    }
}

impl Drop for ObjectSink {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            abort(upload);
        }
    }
}

/// Aborts an unfinished multipart upload in the background, so that the store frees
/// its parts (a bucket lifecycle rule for incomplete uploads catches any this misses,
/// for example when the process dies).
fn abort(mut upload: Box<dyn MultipartUpload>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(e) = upload.abort().await {
                tracing::debug!(error = %e, "could not abort an abandoned multipart upload");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tells_loopback_endpoints_apart() {
        for yes in [
            "http://127.0.0.1:9000",
            "http://localhost",
            "http://[::1]:9000/x",
        ] {
            assert!(super::loopback(yes), "{yes}");
        }
        for no in [
            "http://10.0.0.1:9000",
            "http://minio.internal:9000",
            "http://[2001:db8::1]",
        ] {
            assert!(!super::loopback(no), "{no}");
        }
    }
}
