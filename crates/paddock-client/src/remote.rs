//! A connection to a REAPI server and the blob transfers every client needs.

use std::io;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use paddock_reapi::proto::bytestream::{
    byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest,
};
use paddock_reapi::proto::re::{
    action_cache_client::ActionCacheClient, batch_update_blobs_request,
    capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
    execution_client::ExecutionClient, BatchReadBlobsRequest, BatchUpdateBlobsRequest,
    FindMissingBlobsRequest, GetCapabilitiesRequest,
};
use paddock_reapi::{resource, Digest, DigestHasher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use crate::transport::{endpoint, Credentials, Transport};
use tonic::Code;

/// The chunk size of ByteStream uploads.
const WRITE_CHUNK: usize = 1 << 20;
/// The most digests one FindMissingBlobs call carries.
const FIND_MISSING_BATCH: usize = 10_000;
/// The batch limit assumed when the server sets none.
const DEFAULT_BATCH_LIMIT: u64 = 4 << 20;
/// Room left in each batch for message framing.
const BATCH_OVERHEAD: u64 = 64 << 10;
/// What each blob adds to a batch message beside its bytes (its digest, its status,
/// the framing): many tiny blobs make a message far larger than their bytes.
const PER_BLOB_OVERHEAD: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{:?}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("blob {0} is not in the remote CAS")]
    NotFound(Digest),
    #[error("{0}")]
    Protocol(String),
}

impl ClientError {
    /// The gRPC code behind this error, if it came from the server.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Rpc(s) => Some(s.code()),
            ClientError::NotFound(_) => Some(Code::NotFound),
            _ => None,
        }
    }
}

/// Where the bytes of a blob to upload come from.
#[derive(Debug, Clone)]
pub enum Source {
    Memory(Bytes),
    File(std::path::PathBuf),
}

/// A REAPI server and an instance name on it.
#[derive(Clone)]
pub struct Remote {
    channel: Transport,
    instance: String,
    max_batch: u64,
}

impl Remote {
    /// Connects without credentials (see [`Remote::connect_with`]).
    pub async fn connect(url: &str, instance: &str) -> Result<Remote, ClientError> {
        Remote::connect_with(url, instance, &Credentials::default()).await
    }

    /// Connects (`grpc://` or, with TLS, `grpcs://`) with `credentials` and reads the
    /// server's batch limit from its capabilities.
    pub async fn connect_with(
        url: &str,
        instance: &str,
        credentials: &Credentials,
    ) -> Result<Remote, ClientError> {
        let channel = endpoint(url, credentials)?.connect().await?;
        Remote::over(channel, instance, credentials.token.as_deref()).await
    }

    /// A server reached through `channel` (made by the caller: a connection in the
    /// same process, say), with `token` on every call.
    pub async fn over(
        channel: Channel,
        instance: &str,
        token: Option<&str>,
    ) -> Result<Remote, ClientError> {
        let channel = Transport::new(channel, token)?;
        let capabilities = CapabilitiesClient::new(channel.clone())
            .get_capabilities(GetCapabilitiesRequest {
                instance_name: instance.to_owned(),
            })
            .await?
            .into_inner();
        let advertised = capabilities
            .cache_capabilities
            .map(|c| c.max_batch_total_size_bytes)
            .unwrap_or(0);
        let max_batch = match advertised {
            n if n > 0 => n as u64,
            _ => DEFAULT_BATCH_LIMIT,
        };
        Ok(Remote {
            channel,
            instance: instance.to_owned(),
            max_batch,
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The same server and connection, under another instance name.
    pub fn with_instance(&self, instance: &str) -> Remote {
        Remote {
            instance: instance.to_owned(),
            ..self.clone()
        }
    }

    pub fn channel(&self) -> Transport {
        self.channel.clone()
    }

    /// The largest blob (and batch) worth sending in one batch call rather than a stream.
    pub fn batch_budget(&self) -> u64 {
        self.max_batch.saturating_sub(BATCH_OVERHEAD).max(1)
    }

    /// The largest message this client accepts: a full batch answer and its framing.
    fn max_message(&self) -> usize {
        (self.max_batch as usize)
            .saturating_mul(2)
            .saturating_add(1 << 20)
            .max(4 << 20)
    }

    pub fn cas(&self) -> ContentAddressableStorageClient<Transport> {
        ContentAddressableStorageClient::new(self.channel())
            .max_decoding_message_size(self.max_message())
    }

    pub fn bytestream(&self) -> ByteStreamClient<Transport> {
        ByteStreamClient::new(self.channel()).max_decoding_message_size(self.max_message())
    }

    pub fn action_cache(&self) -> ActionCacheClient<Transport> {
        ActionCacheClient::new(self.channel()).max_decoding_message_size(self.max_message())
    }

    pub fn execution(&self) -> ExecutionClient<Transport> {
        ExecutionClient::new(self.channel()).max_decoding_message_size(self.max_message())
    }

    /// The digests among `digests` that the server lacks.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, ClientError> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(FIND_MISSING_BATCH) {
            let response = self
                .cas()
                .find_missing_blobs(FindMissingBlobsRequest {
                    instance_name: self.instance.clone(),
                    blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                    digest_function: 0,
                })
                .await?
                .into_inner();
            for d in response.missing_blob_digests {
                missing.push(Digest::from_proto(Some(&d)).map_err(|e| {
                    ClientError::Protocol(format!("server returned a bad digest: {e}"))
                })?);
            }
        }
        Ok(missing)
    }

    /// Uploads whichever of `blobs` the server lacks: small ones in batches, large ones
    /// streamed through ByteStream (from their files, without holding them in memory).
    /// Returns how many bytes it sent.
    pub async fn upload_missing(&self, blobs: Vec<(Digest, Source)>) -> Result<u64, ClientError> {
        let mut unique: std::collections::HashMap<Digest, Source> = blobs.into_iter().collect();
        let digests: Vec<Digest> = unique.keys().copied().collect();
        let missing = self.find_missing(&digests).await?;
        let sent = missing.iter().map(Digest::size).sum();
        let budget = self.batch_budget();
        let mut small = Vec::new();
        for digest in missing {
            let source = unique
                .remove(&digest)
                .expect("missing digests were asked about");
            match source {
                Source::Memory(data) if digest.size() <= budget => small.push((digest, data)),
                Source::File(path) if digest.size() <= budget => {
                    small.push((digest, Bytes::from(tokio::fs::read(&path).await?)))
                }
                Source::Memory(data) => self.write_blob(&digest, data).await?,
                Source::File(path) => {
                    let file = tokio::fs::File::open(&path).await?;
                    self.write_stream(&digest, file_chunks(file)).await?
                }
            }
        }
        self.upload(small).await?;
        Ok(sent)
    }

    /// Uploads `blobs` without asking what the server has.
    pub async fn upload(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), ClientError> {
        let budget = self.batch_budget();
        let (small, large): (Vec<_>, Vec<_>) =
            blobs.into_iter().partition(|(d, _)| d.size() <= budget);
        let mut batch = Vec::new();
        let mut batch_size = 0u64;
        for (digest, data) in small {
            let cost = digest.size() + PER_BLOB_OVERHEAD;
            if batch_size + cost > budget && !batch.is_empty() {
                self.batch_update(std::mem::take(&mut batch)).await?;
                batch_size = 0;
            }
            batch_size += cost;
            batch.push((digest, data));
        }
        if !batch.is_empty() {
            self.batch_update(batch).await?;
        }
        for (digest, data) in large {
            self.write_blob(&digest, data).await?;
        }
        Ok(())
    }

    /// One BatchUpdateBlobs call; any blob's failure fails the whole upload.
    pub async fn batch_update(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), ClientError> {
        let response = self
            .cas()
            .batch_update_blobs(BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests: blobs
                    .into_iter()
                    .map(|(d, data)| batch_update_blobs_request::Request {
                        digest: Some(d.to_proto()),
                        data: data.to_vec(),
                        compressor: 0,
                    })
                    .collect(),
                digest_function: 0,
            })
            .await?
            .into_inner();
        for r in response.responses {
            let status = r.status.unwrap_or_default();
            if status.code != Code::Ok as i32 {
                return Err(tonic::Status::new(Code::from_i32(status.code), status.message).into());
            }
        }
        Ok(())
    }

    /// Uploads one in-memory blob through ByteStream.
    pub async fn write_blob(&self, digest: &Digest, data: Bytes) -> Result<(), ClientError> {
        let chunks = futures::stream::iter(
            (0..data.len().max(1))
                .step_by(WRITE_CHUNK)
                .map(move |at| {
                    Ok(data.slice(at.min(data.len())..(at + WRITE_CHUNK).min(data.len())))
                })
                .collect::<Vec<Result<Bytes, io::Error>>>(),
        );
        self.write_stream(digest, chunks).await
    }

    /// Uploads a file through ByteStream (hashing it first), returning its digest.
    pub async fn upload_file(&self, path: &Path) -> Result<Digest, ClientError> {
        let digest = hash_file(path).await?;
        if self.find_missing(&[digest]).await?.is_empty() {
            return Ok(digest);
        }
        if digest.size() <= self.batch_budget() {
            let data = Bytes::from(tokio::fs::read(path).await?);
            self.batch_update(vec![(digest, data)]).await?;
            return Ok(digest);
        }
        let file = tokio::fs::File::open(path).await?;
        let chunks = file_chunks(file);
        self.write_stream(&digest, chunks).await?;
        Ok(digest)
    }

    /// Uploads a blob through ByteStream from a stream of chunks.
    pub async fn write_stream(
        &self,
        digest: &Digest,
        chunks: impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
    ) -> Result<(), ClientError> {
        let name = resource::write_name(&self.instance, &uuid::Uuid::new_v4().to_string(), digest);
        let size = digest.size();
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let feeder = tokio::spawn(async move {
            let mut chunks = std::pin::pin!(chunks);
            let mut offset = 0u64;
            let mut first = true;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                offset += chunk.len() as u64;
                let request = WriteRequest {
                    resource_name: if first { name.clone() } else { String::new() },
                    write_offset: (offset - chunk.len() as u64) as i64,
                    finish_write: offset == size,
                    data: chunk.to_vec(),
                };
                first = false;
                if tx.send(request).await.is_err() {
                    break;
                }
            }
            if first {
                // An empty blob still needs one request to name it and finish it.
                let _ = tx
                    .send(WriteRequest {
                        resource_name: name.clone(),
                        write_offset: 0,
                        finish_write: true,
                        data: Vec::new(),
                    })
                    .await;
            }
            Ok::<u64, io::Error>(offset)
        });
        let response = self
            .bytestream()
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let sent = feeder.await.map_err(io::Error::other)??;
        let committed = response?.into_inner().committed_size;
        if sent != size {
            return Err(ClientError::Protocol(format!(
                "the data for {digest} was {sent} bytes long"
            )));
        }
        if committed != size as i64 {
            return Err(ClientError::Protocol(format!(
                "server committed {committed} of {size} bytes for {digest}"
            )));
        }
        Ok(())
    }

    /// Reads a whole blob into memory (batch for small blobs, ByteStream for large),
    /// checking its digest.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Bytes, ClientError> {
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        let data = if digest.size() <= self.batch_budget() {
            let response = self
                .cas()
                .batch_read_blobs(BatchReadBlobsRequest {
                    instance_name: self.instance.clone(),
                    digests: vec![digest.to_proto()],
                    ..Default::default()
                })
                .await?
                .into_inner();
            let blob = response
                .responses
                .into_iter()
                .next()
                .ok_or_else(|| ClientError::Protocol("empty BatchReadBlobs response".into()))?;
            let status = blob.status.unwrap_or_default();
            if status.code == Code::NotFound as i32 {
                return Err(ClientError::NotFound(*digest));
            }
            if status.code != Code::Ok as i32 {
                return Err(tonic::Status::new(Code::from_i32(status.code), status.message).into());
            }
            Bytes::from(blob.data)
        } else {
            let mut out = BytesMut::with_capacity(digest.size() as usize);
            let mut stream = self.read_stream(digest, 0).await?;
            while let Some(chunk) = stream.next().await {
                out.extend_from_slice(&chunk?);
            }
            out.freeze()
        };
        let actual = Digest::of(&data);
        if actual != *digest {
            return Err(ClientError::Protocol(format!(
                "server sent {actual} for blob {digest}"
            )));
        }
        Ok(data)
    }

    /// Groups small blobs into batches that each fit one batch call (their bytes and
    /// what each adds to the message).
    pub fn batches(&self, digests: &[Digest]) -> Vec<Vec<Digest>> {
        let budget = self.batch_budget();
        let mut batches: Vec<Vec<Digest>> = Vec::new();
        let mut size = 0u64;
        for digest in digests {
            let cost = digest.size() + PER_BLOB_OVERHEAD;
            if batches.is_empty() || size + cost > budget {
                batches.push(Vec::new());
                size = 0;
            }
            size += cost;
            batches
                .last_mut()
                .expect("a batch was just pushed")
                .push(*digest);
        }
        batches
    }

    /// Reads small blobs in as few BatchReadBlobs calls as the batch limit allows,
    /// checking each digest. Each blob gets its own outcome.
    pub async fn read_blobs(
        &self,
        digests: &[Digest],
    ) -> Vec<(Digest, Result<Bytes, ClientError>)> {
        let batches = self.batches(digests);
        let calls = batches.into_iter().map(|batch| async move {
            let response = self
                .cas()
                .batch_read_blobs(BatchReadBlobsRequest {
                    instance_name: self.instance.clone(),
                    digests: batch.iter().map(Digest::to_proto).collect(),
                    ..Default::default()
                })
                .await;
            match response {
                Err(status) => batch
                    .into_iter()
                    .map(|d| (d, Err(ClientError::Rpc(status.clone()))))
                    .collect::<Vec<_>>(),
                Ok(response) => {
                    // Match answers by digest: REAPI does not promise to keep the order.
                    let mut answers: std::collections::HashMap<Digest, _> = response
                        .into_inner()
                        .responses
                        .into_iter()
                        .filter_map(|r| Some((Digest::from_proto(r.digest.as_ref()).ok()?, r)))
                        .collect();
                    batch
                        .into_iter()
                        .map(|digest| {
                            let outcome = match answers.remove(&digest) {
                                None => {
                                    Err(ClientError::Protocol(format!("no answer for {digest}")))
                                }
                                Some(blob) => {
                                    let status = blob.status.unwrap_or_default();
                                    if status.code == Code::NotFound as i32 {
                                        Err(ClientError::NotFound(digest))
                                    } else if status.code != Code::Ok as i32 {
                                        Err(tonic::Status::new(
                                            Code::from_i32(status.code),
                                            status.message,
                                        )
                                        .into())
                                    } else if Digest::of(&blob.data) != digest {
                                        Err(ClientError::Protocol(format!(
                                            "server sent wrong data for {digest}"
                                        )))
                                    } else {
                                        Ok(Bytes::from(blob.data))
                                    }
                                }
                            };
                            (digest, outcome)
                        })
                        .collect()
                }
            }
        });
        // A few calls at a time: each one holds its blobs (and the server's files) open.
        futures::stream::iter(calls)
            .buffer_unordered(4)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Streams a blob from `offset` through ByteStream, unchecked.
    pub async fn read_stream(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>> + use<>, ClientError> {
        let response = self
            .bytestream()
            .read(ReadRequest {
                resource_name: resource::read_name(&self.instance, digest),
                read_offset: offset as i64,
                read_limit: 0,
            })
            .await;
        let digest = *digest;
        let stream = match response {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Err(ClientError::NotFound(digest)),
            Err(s) => return Err(s.into()),
        };
        Ok(stream.map(move |r| match r {
            Ok(r) => Ok(Bytes::from(r.data)),
            Err(s) if s.code() == Code::NotFound => Err(ClientError::NotFound(digest)),
            Err(s) => Err(s.into()),
        }))
    }

    /// Downloads a blob into a file, checking its digest before the file is renamed
    /// into place.
    pub async fn read_to_file(&self, digest: &Digest, path: &Path) -> Result<(), ClientError> {
        let partial = path.with_extension("paddock-partial");
        let written = self.stream_to(digest, &partial).await;
        if written.is_err() {
            // Nothing half-written is left behind.
            let _ = tokio::fs::remove_file(&partial).await;
        }
        written?;
        tokio::fs::rename(&partial, path).await?;
        Ok(())
    }

    /// Streams a blob into `file`, checking it against its digest.
    async fn stream_to(&self, digest: &Digest, file: &Path) -> Result<(), ClientError> {
        let mut out = tokio::fs::File::create(file).await?;
        let mut hasher = DigestHasher::new();
        if !digest.is_empty_blob() {
            let mut stream = self.read_stream(digest, 0).await?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                out.write_all(&chunk).await?;
            }
        }
        out.flush().await?;
        let actual = hasher.finish();
        if actual != *digest {
            return Err(ClientError::Protocol(format!(
                "server sent {actual} for blob {digest}"
            )));
        }
        Ok(())
    }
}

/// Hashes a file without holding it in memory.
pub async fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = DigestHasher::new();
    let mut buf = vec![0u8; WRITE_CHUNK];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// A file as a stream of chunks of at most [`WRITE_CHUNK`] bytes.
fn file_chunks(
    file: tokio::fs::File,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    futures::stream::unfold(file, |mut file| async move {
        let mut buf = BytesMut::zeroed(WRITE_CHUNK);
        let mut filled = 0;
        while filled < WRITE_CHUNK {
            match file.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Some((Err(e), file)),
            }
        }
        if filled == 0 {
            return None;
        }
        buf.truncate(filled);
        Some((Ok(buf.freeze()), file))
    })
}
