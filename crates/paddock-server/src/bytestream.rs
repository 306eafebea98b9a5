//! ByteStream: streaming reads and resumable writes of CAS blobs of any size.
//!
//! An upload whose stream breaks before `finish_write` keeps its partial data (hashed
//! so far, on disk for the disk backend) under its resource name, so the client can
//! ask `QueryWriteStatus` how much arrived and continue from there. Abandoned uploads
//! are dropped after `parked_upload_lifetime`.
//!
//! What uploads hold is bounded per identity (`[auth.quotas]`): bytes of uploads
//! under way, open or parked (`max_upload_bytes`), and parked uploads by count and
//! bytes; a caller at a bound is answered RESOURCE_EXHAUSTED naming it. The bytes
//! themselves also count against the store's own bound while they last; when uploads
//! fill it, parked ones (oldest first) give way to those still moving.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use paddock_cas::{BlobSink, BlobStore, BlobStream, StoreError};
use paddock_config::{Permission, QuotaConfig};
use paddock_reapi::proto::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use paddock_reapi::resource::{parse_read, parse_write, Compressor, WriteResource};
use paddock_reapi::Digest;
use parking_lot::Mutex;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{method, principal, require};
use crate::invalid;
use paddock_cas::compression::{compress, Decompressor};

/// How many broken uploads may wait at once, whoever they belong to; the oldest
/// goes first.
const MAX_PENDING_UPLOADS: usize = 4096;
/// The largest `data` in one ReadResponse.
const MAX_READ_CHUNK: usize = 1 << 20;

/// An upload waiting to be resumed.
struct PendingUpload {
    sink: Box<dyn BlobSink>,
    parked_at: Instant,
}

/// Identifies an upload: whose it is, the instance, the client's uuid and the blob.
/// One identity never sees, resumes or replaces another's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct UploadKey {
    identity: String,
    instance: String,
    uuid: String,
    digest: Digest,
}

fn upload_key(resource: &WriteResource, identity: &str) -> UploadKey {
    UploadKey {
        identity: identity.to_owned(),
        instance: resource.instance.clone(),
        uuid: resource.uuid.clone(),
        digest: resource.digest,
    }
}

pub struct ByteStreamService {
    cas: Arc<dyn BlobStore>,
    quotas: QuotaConfig,
    pending: Mutex<HashMap<UploadKey, PendingUpload>>,
    /// Uploads whose stream is open, and how much each has committed so far.
    active: Mutex<HashMap<UploadKey, Arc<AtomicU64>>>,
    /// Bytes each identity's open uploads hold.
    open_bytes: Mutex<HashMap<String, u64>>,
}

/// Keeps an open upload visible to QueryWriteStatus, and its bytes counted against
/// its identity, until its stream ends.
struct ActiveUpload<'a> {
    service: &'a ByteStreamService,
    key: UploadKey,
    committed: Arc<AtomicU64>,
    /// The bytes counted against the identity.
    counted: u64,
}

impl ActiveUpload<'_> {
    /// Counts the upload as `total` bytes, refusing what would take its identity
    /// past its bound on uploads under way.
    fn charge_to(&mut self, total: u64) -> Result<(), Status> {
        let more = total.saturating_sub(self.counted);
        if more > 0 {
            self.service.charge(&self.key.identity, more)?;
            self.counted += more;
        }
        Ok(())
    }

    /// What QueryWriteStatus reports while the stream is open.
    fn show(&self, written: u64) {
        self.committed.store(written, Ordering::Relaxed);
    }
}

impl Drop for ActiveUpload<'_> {
    fn drop(&mut self) {
        self.service.uncharge(&self.key.identity, self.counted);
        let mut active = self.service.active.lock();
        if active
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.committed))
        {
            active.remove(&self.key);
        }
    }
}

fn exhausted(who: &str, what: String, key: &str) -> Status {
    tracing::warn!(%who, limit = key, "refused: {what}");
    metrics::counter!("paddock_quota_refusals_total", "quota" => key.to_owned()).increment(1);
    Status::resource_exhausted(format!("{who} {what} (auth.quotas.{key})"))
}

impl ByteStreamService {
    pub fn new(cas: Arc<dyn BlobStore>, quotas: QuotaConfig) -> Self {
        ByteStreamService {
            cas,
            quotas,
            pending: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            open_bytes: Mutex::new(HashMap::new()),
        }
    }

    /// What `identity`'s parked uploads hold: how many, and their bytes.
    fn parked(&self, identity: &str) -> (usize, u64) {
        let pending = self.pending.lock();
        pending
            .iter()
            .filter(|(key, _)| key.identity == identity)
            .fold((0, 0), |(n, bytes), (_, u)| {
                (n + 1, bytes + u.sink.written())
            })
    }

    /// Counts `bytes` more of `identity`'s open uploads, if its uploads under way
    /// (open and parked) stay within `max_upload_bytes`.
    fn charge(&self, identity: &str, bytes: u64) -> Result<(), Status> {
        let (_, parked) = self.parked(identity);
        let mut open = self.open_bytes.lock();
        let held = open.get(identity).copied().unwrap_or(0);
        let max = self.quotas.max_upload_bytes.bytes();
        if held + parked + bytes > max {
            return Err(exhausted(
                identity,
                format!(
                    "has {} bytes of uploads under way, the most allowed is {max}",
                    held + parked
                ),
                "max_upload_bytes",
            ));
        }
        *open.entry(identity.to_owned()).or_default() += bytes;
        Ok(())
    }

    fn uncharge(&self, identity: &str, bytes: u64) {
        let mut open = self.open_bytes.lock();
        if let Some(held) = open.get_mut(identity) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                open.remove(identity);
            }
        }
    }

    /// Refuses a new upload while its identity's parked uploads are at a bound.
    fn check_parked(&self, identity: &str) -> Result<(), Status> {
        self.expire();
        let (count, bytes) = self.parked(identity);
        let lifetime = self.quotas.parked_upload_lifetime;
        if count >= self.quotas.max_parked_uploads {
            return Err(exhausted(
                identity,
                format!("has {count} broken uploads waiting to be resumed, the most allowed; resume them, or they expire {lifetime} after they broke"),
                "max_parked_uploads",
            ));
        }
        let max = self.quotas.max_parked_bytes.bytes();
        if bytes >= max {
            return Err(exhausted(
                identity,
                format!("has {bytes} bytes in broken uploads waiting to be resumed, the most allowed is {max}; resume them, or they expire {lifetime} after they broke"),
                "max_parked_bytes",
            ));
        }
        Ok(())
    }

    fn activate(&self, key: UploadKey) -> ActiveUpload<'_> {
        let committed = Arc::new(AtomicU64::new(0));
        self.active.lock().insert(key.clone(), committed.clone());
        ActiveUpload {
            service: self,
            key,
            committed,
            counted: 0,
        }
    }

    fn expire(&self) {
        let lifetime = self.quotas.parked_upload_lifetime.get();
        self.pending
            .lock()
            .retain(|_, upload| upload.parked_at.elapsed() < lifetime);
    }

    /// Keeps a broken upload for resumption, if its identity's parked uploads stay
    /// within their bounds; otherwise it is dropped (and its bytes with it).
    fn park(&self, key: UploadKey, sink: Box<dyn BlobSink>) {
        self.expire();
        let identity = key.identity.as_str();
        let (count, bytes) = self.parked(identity);
        if count >= self.quotas.max_parked_uploads
            || bytes + sink.written() > self.quotas.max_parked_bytes.bytes()
        {
            tracing::info!(who = %identity, "a broken upload is not kept: its owner's parked uploads are at their bound");
            return;
        }
        let mut pending = self.pending.lock();
        while pending.len() >= MAX_PENDING_UPLOADS {
            let oldest = pending
                .iter()
                .min_by_key(|(_, u)| u.parked_at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => pending.remove(&k),
                None => break,
            };
        }
        pending.insert(
            key,
            PendingUpload {
                sink,
                parked_at: Instant::now(),
            },
        );
    }

    /// Drops the oldest parked upload, whoever's it is, giving back what it holds of
    /// the store; false if none is parked.
    fn drop_oldest_parked(&self) -> bool {
        let mut pending = self.pending.lock();
        let oldest = pending
            .iter()
            .min_by_key(|(_, u)| u.parked_at)
            .map(|(k, _)| k.clone());
        match oldest.and_then(|k| pending.remove_entry(&k)) {
            Some((key, upload)) => {
                tracing::info!(who = %key.identity, bytes = upload.sink.written(), "dropped a broken upload to make room in the store");
                true
            }
            None => false,
        }
    }

    /// Writes a chunk; when uploads under way have filled the store, broken uploads
    /// (kept only in case they are resumed) give way to one that is moving.
    async fn write_chunk(&self, sink: &mut Box<dyn BlobSink>, chunk: Bytes) -> Result<(), Status> {
        loop {
            match sink.write(chunk.clone()).await {
                Err(StoreError::Full { .. }) if self.drop_oldest_parked() => continue,
                written => return written.map_err(Status::from),
            }
        }
    }

    async fn exists(&self, digest: &Digest) -> Result<bool, Status> {
        Ok(self.cas.find_missing(&[*digest]).await?.is_empty())
    }

    /// Finds where the upload `key` starting at `offset` continues: a fresh sink at
    /// 0, or the parked one if it holds exactly `offset` bytes.
    async fn sink_at(&self, key: &UploadKey, offset: i64) -> Result<Box<dyn BlobSink>, Status> {
        let parked = self.pending.lock().remove(key);
        if offset == 0 {
            self.check_parked(&key.identity)?;
            return Ok(self.cas.write(&key.digest).await?);
        }
        match parked {
            Some(upload) if upload.sink.written() == offset as u64 => Ok(upload.sink),
            Some(upload) => {
                let committed = upload.sink.written();
                self.pending.lock().insert(key.clone(), upload);
                Err(invalid(format!(
                    "write_offset {offset} does not match the committed size {committed}; resume from QueryWriteStatus"
                )))
            }
            None => Err(invalid(format!(
                "write_offset {offset} given, but no partial upload exists for this resource; start at 0"
            ))),
        }
    }
}

/// Passes a blob's stream on, failing it if it holds other than `expected` bytes,
/// so that a short blob cannot pass for a whole one once compressed.
fn exactly(source: BlobStream, digest: Digest, expected: u64) -> BlobStream {
    futures::stream::unfold(
        (source, 0u64, false),
        move |(mut source, seen, ended)| async move {
            if ended {
                return None;
            }
            let failed = |e| Some((Err(e), (futures::stream::empty().boxed(), seen, true)));
            match source.next().await {
                Some(Ok(chunk)) => {
                    let seen = seen + chunk.len() as u64;
                    if seen > expected {
                        return failed(StoreError::TooMuchData { digest, expected });
                    }
                    Some((Ok(chunk), (source, seen, false)))
                }
                Some(Err(e)) => failed(e),
                None if seen == expected => None,
                None => failed(StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("blob {digest} ended after {seen} of {expected} bytes"),
                ))),
            }
        },
    )
    .boxed()
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReceiverStream<Result<ReadResponse, Status>>;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let (caller, method) = (principal(&request)?, method(&request));
        let request = request.into_inner();
        let resource = parse_read(&request.resource_name).map_err(invalid)?;
        require(&caller, method, Permission::CasRead, &resource.instance)?;
        let digest = resource.digest;
        if request.read_offset < 0 || request.read_offset as u64 > digest.size() {
            return Err(Status::out_of_range(format!(
                "read_offset {} is outside blob {digest}",
                request.read_offset
            )));
        }
        if request.read_limit < 0 {
            return Err(invalid(format!(
                "read_limit {} is negative",
                request.read_limit
            )));
        }
        if resource.compressor != Compressor::Identity && request.read_limit != 0 {
            return Err(invalid(
                "read_limit must be 0 when reading compressed-blobs",
            ));
        }
        let offset = request.read_offset as u64;
        let mut remaining = match request.read_limit {
            0 => digest.size() - offset,
            limit => (limit as u64).min(digest.size() - offset),
        };
        let stream = self
            .cas
            .read(&digest, offset)
            .await?
            .ok_or_else(|| Status::not_found(format!("blob {digest} is not in the CAS")))?;
        let mut stream = match resource.compressor {
            Compressor::Identity => stream,
            Compressor::Zstd => {
                // The compressed length is known only at the end: the whole stream
                // is sent, once the blob is checked to be exactly as long as it says.
                remaining = u64::MAX;
                compress(exactly(stream, digest, digest.size() - offset))
            }
        };

        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while remaining > 0 {
                let chunk: Bytes = match stream.next().await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                    None if remaining == u64::MAX => return,
                    None => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!("blob {digest} ended early"))))
                            .await;
                        return;
                    }
                };
                let chunk = chunk.slice(..(remaining.min(chunk.len() as u64) as usize));
                if remaining != u64::MAX {
                    remaining -= chunk.len() as u64;
                }
                for piece in chunk.chunks(MAX_READ_CHUNK) {
                    metrics::counter!("paddock_cas_bytes_read_total").increment(piece.len() as u64);
                    let response = ReadResponse {
                        data: piece.to_vec(),
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let (caller, method) = (principal(&request)?, method(&request));
        let mut stream = request.into_inner();
        let first = match stream.next().await {
            Some(message) => message?,
            None => return Err(invalid("write stream carried no request")),
        };
        let resource = parse_write(&first.resource_name).map_err(invalid)?;
        require(&caller, method, Permission::CasWrite, &resource.instance)?;
        let digest = resource.digest;
        if first.write_offset < 0 || first.write_offset as u64 > digest.size() {
            return Err(Status::out_of_range(format!(
                "write_offset {} is outside blob {digest}",
                first.write_offset
            )));
        }
        let done = WriteResponse {
            // REAPI: a compressed upload that finds the blob there already says so
            // with -1, how much of it the client would have sent being unknown.
            committed_size: match resource.compressor {
                Compressor::Identity => digest.size() as i64,
                Compressor::Zstd => -1,
            },
        };
        let key = upload_key(&resource, caller.name());
        if self.exists(&digest).await? {
            // Someone already uploaded it: the write is complete at once.
            self.pending.lock().remove(&key);
            return Ok(Response::new(done));
        }
        let mut sink = self.sink_at(&key, first.write_offset).await?;
        let mut upload = self.activate(key.clone());
        upload.charge_to(sink.written())?;
        upload.show(sink.written());
        // A compressed upload starts at an offset into the uncompressed blob (where a
        // resumed one continues) and then counts the compressed bytes it sends.
        let mut decompressor = match resource.compressor {
            Compressor::Identity => None,
            Compressor::Zstd => {
                Some(Decompressor::new(digest.size() - sink.written()).map_err(invalid)?)
            }
        };
        let mut sent = sink.written();
        let mut message = first;
        loop {
            if !message.resource_name.is_empty()
                && parse_write(&message.resource_name).ok().as_ref() != Some(&resource)
            {
                return Err(invalid("resource_name changed in the middle of a write"));
            }
            if message.write_offset as u64 != sent {
                return Err(invalid(format!(
                    "write_offset {} does not follow the {sent} bytes sent so far",
                    message.write_offset,
                )));
            }
            let len = message.data.len() as u64;
            if len > 0 {
                sent += len;
                let data = Bytes::from(message.data);
                match &mut decompressor {
                    None => {
                        upload.charge_to(sink.written() + len)?;
                        self.write_chunk(&mut sink, data).await?;
                        metrics::counter!("paddock_cas_bytes_written_total").increment(len);
                    }
                    Some(decompressor) => {
                        let mut at = 0;
                        while let Some(piece) =
                            decompressor.step(&data, &mut at).map_err(invalid)?
                        {
                            let plain = piece.len() as u64;
                            upload.charge_to(sink.written() + plain)?;
                            self.write_chunk(&mut sink, piece).await?;
                            metrics::counter!("paddock_cas_bytes_written_total").increment(plain);
                        }
                    }
                }
                upload.show(sink.written());
            }
            if message.finish_write {
                if let Some(decompressor) = &decompressor {
                    decompressor.finish().map_err(invalid)?;
                }
                if sink.written() != digest.size() {
                    return Err(invalid(format!(
                        "upload finished after {} bytes, but digest {digest} promises {}",
                        sink.written(),
                        digest.size()
                    )));
                }
                sink.commit().await.map_err(Status::from)?;
                // Whole: what was sent, as ByteStream counts it (for a compressed
                // upload, its first offset and the compressed bytes after it).
                return Ok(Response::new(WriteResponse {
                    committed_size: sent as i64,
                }));
            }
            let idle = self.quotas.upload_idle_timeout.get();
            let next = match tokio::time::timeout(idle, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    // A stalled client: the upload waits for it, parked, holding
                    // nothing a moving upload needs.
                    drop(upload);
                    self.park(key, sink);
                    return Err(Status::deadline_exceeded(format!(
                        "the upload sent nothing for {} (auth.quotas.upload_idle_timeout); resume it with QueryWriteStatus",
                        self.quotas.upload_idle_timeout
                    )));
                }
            };
            message = match next {
                Some(Ok(m)) => m,
                Some(Err(status)) => {
                    // The stream broke: keep what arrived for a resumed upload.
                    drop(upload);
                    self.park(key, sink);
                    return Err(status);
                }
                None => {
                    let committed = sink.written() as i64;
                    drop(upload);
                    self.park(key, sink);
                    return Ok(Response::new(WriteResponse {
                        committed_size: committed,
                    }));
                }
            };
        }
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let (caller, method) = (principal(&request)?, method(&request));
        let resource = parse_write(&request.into_inner().resource_name).map_err(invalid)?;
        require(&caller, method, Permission::CasWrite, &resource.instance)?;
        if self.exists(&resource.digest).await? {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: resource.digest.size() as i64,
                complete: true,
            }));
        }
        let key = upload_key(&resource, caller.name());
        let committed = match self.pending.lock().get(&key) {
            Some(upload) => Some(upload.sink.written()),
            None => self
                .active
                .lock()
                .get(&key)
                .map(|c| c.load(Ordering::Relaxed)),
        };
        match committed {
            Some(committed) => Ok(Response::new(QueryWriteStatusResponse {
                committed_size: committed as i64,
                complete: false,
            })),
            None => Err(Status::not_found(format!(
                "no upload in progress for {}",
                resource.digest
            ))),
        }
    }
}
