//! ByteStream: streaming reads and resumable writes of CAS blobs of any size.
//!
//! An upload whose stream breaks before `finish_write` keeps its partial data (hashed
//! so far, on disk for the disk backend) under its resource name, so the client can
//! ask `QueryWriteStatus` how much arrived and continue from there. Abandoned uploads
//! are dropped after [`UPLOAD_IDLE_LIMIT`], and at most [`MAX_PENDING_UPLOADS`] wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use paddock_cas::{BlobSink, BlobStore};
use paddock_reapi::proto::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use paddock_reapi::resource::{parse_read, parse_write, WriteResource};
use paddock_reapi::Digest;
use parking_lot::Mutex;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::invalid;

/// How long a broken upload waits to be resumed.
const UPLOAD_IDLE_LIMIT: Duration = Duration::from_secs(3600);
/// How many broken uploads may wait at once; the oldest goes first.
const MAX_PENDING_UPLOADS: usize = 1024;
/// The largest `data` in one ReadResponse.
const MAX_READ_CHUNK: usize = 1 << 20;

/// An upload waiting to be resumed.
struct PendingUpload {
    sink: Box<dyn BlobSink>,
    parked_at: Instant,
}

/// Identifies an upload: the client's uuid, the blob and the instance.
type UploadKey = (String, String, Digest);

fn upload_key(resource: &WriteResource) -> UploadKey {
    (
        resource.instance.clone(),
        resource.uuid.clone(),
        resource.digest,
    )
}

pub struct ByteStreamService {
    cas: Arc<dyn BlobStore>,
    pending: Mutex<HashMap<UploadKey, PendingUpload>>,
    /// Uploads whose stream is open, and how much each has committed so far.
    active: Mutex<HashMap<UploadKey, Arc<AtomicU64>>>,
}

/// Keeps an open upload visible to QueryWriteStatus until its stream ends.
struct ActiveUpload<'a> {
    service: &'a ByteStreamService,
    key: UploadKey,
    committed: Arc<AtomicU64>,
}

impl ActiveUpload<'_> {
    fn record(&self, written: u64) {
        self.committed.store(written, Ordering::Relaxed);
    }
}

impl Drop for ActiveUpload<'_> {
    fn drop(&mut self) {
        let mut active = self.service.active.lock();
        if active
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.committed))
        {
            active.remove(&self.key);
        }
    }
}

impl ByteStreamService {
    pub fn new(cas: Arc<dyn BlobStore>) -> Self {
        ByteStreamService {
            cas,
            pending: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
        }
    }

    fn activate(&self, resource: &WriteResource, written: u64) -> ActiveUpload<'_> {
        let committed = Arc::new(AtomicU64::new(written));
        self.active
            .lock()
            .insert(upload_key(resource), committed.clone());
        ActiveUpload {
            service: self,
            key: upload_key(resource),
            committed,
        }
    }

    fn park(&self, key: UploadKey, sink: Box<dyn BlobSink>) {
        let mut pending = self.pending.lock();
        pending.retain(|_, upload| upload.parked_at.elapsed() < UPLOAD_IDLE_LIMIT);
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

    async fn exists(&self, digest: &Digest) -> Result<bool, Status> {
        Ok(self.cas.find_missing(&[*digest]).await?.is_empty())
    }

    /// Finds where an upload starting at `offset` continues: a fresh sink at 0, or the
    /// parked one if it holds exactly `offset` bytes.
    async fn sink_at(
        &self,
        resource: &WriteResource,
        offset: i64,
    ) -> Result<Box<dyn BlobSink>, Status> {
        let key = upload_key(resource);
        let parked = self.pending.lock().remove(&key);
        if offset == 0 {
            return Ok(self.cas.write(&resource.digest).await?);
        }
        match parked {
            Some(upload) if upload.sink.written() == offset as u64 => Ok(upload.sink),
            Some(upload) => {
                let committed = upload.sink.written();
                self.pending.lock().insert(key, upload);
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

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReceiverStream<Result<ReadResponse, Status>>;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let request = request.into_inner();
        let resource = parse_read(&request.resource_name).map_err(invalid)?;
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
        let offset = request.read_offset as u64;
        let mut remaining = match request.read_limit {
            0 => digest.size() - offset,
            limit => (limit as u64).min(digest.size() - offset),
        };
        let mut stream = self
            .cas
            .read(&digest, offset)
            .await?
            .ok_or_else(|| Status::not_found(format!("blob {digest} is not in the CAS")))?;

        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while remaining > 0 {
                let chunk: Bytes = match stream.next().await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                    None => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!("blob {digest} ended early"))))
                            .await;
                        return;
                    }
                };
                let chunk = chunk.slice(..(remaining.min(chunk.len() as u64) as usize));
                remaining -= chunk.len() as u64;
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
        let mut stream = request.into_inner();
        let first = match stream.next().await {
            Some(message) => message?,
            None => return Err(invalid("write stream carried no request")),
        };
        let resource = parse_write(&first.resource_name).map_err(invalid)?;
        let digest = resource.digest;
        if first.write_offset < 0 || first.write_offset as u64 > digest.size() {
            return Err(Status::out_of_range(format!(
                "write_offset {} is outside blob {digest}",
                first.write_offset
            )));
        }
        let done = WriteResponse {
            committed_size: digest.size() as i64,
        };
        if self.exists(&digest).await? {
            // Someone already uploaded it: the write is complete at once.
            self.pending.lock().remove(&upload_key(&resource));
            return Ok(Response::new(done));
        }
        let mut sink = self.sink_at(&resource, first.write_offset).await?;
        let upload = self.activate(&resource, sink.written());
        let mut message = first;
        loop {
            if !message.resource_name.is_empty()
                && parse_write(&message.resource_name).ok().as_ref() != Some(&resource)
            {
                return Err(invalid("resource_name changed in the middle of a write"));
            }
            if message.write_offset as u64 != sink.written() {
                return Err(invalid(format!(
                    "write_offset {} does not follow the {} bytes written so far",
                    message.write_offset,
                    sink.written()
                )));
            }
            let len = message.data.len() as u64;
            if len > 0 {
                sink.write(Bytes::from(message.data))
                    .await
                    .map_err(Status::from)?;
                upload.record(sink.written());
                metrics::counter!("paddock_cas_bytes_written_total").increment(len);
            }
            if message.finish_write {
                if sink.written() != digest.size() {
                    return Err(invalid(format!(
                        "upload finished after {} bytes, but digest {digest} promises {}",
                        sink.written(),
                        digest.size()
                    )));
                }
                sink.commit().await.map_err(Status::from)?;
                return Ok(Response::new(done));
            }
            message = match stream.next().await {
                Some(Ok(m)) => m,
                Some(Err(status)) => {
                    // The stream broke: keep what arrived for a resumed upload.
                    self.park(upload_key(&resource), sink);
                    return Err(status);
                }
                None => {
                    let committed = sink.written() as i64;
                    self.park(upload_key(&resource), sink);
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
        let resource = parse_write(&request.into_inner().resource_name).map_err(invalid)?;
        if self.exists(&resource.digest).await? {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: resource.digest.size() as i64,
                complete: true,
            }));
        }
        let key = upload_key(&resource);
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
