//! ContentAddressableStorage: existence checks, batch transfers and GetTree.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use paddock_cas::{read_all, BlobStore, StoreError};
use paddock_reapi::digest::check_digest_function;
use paddock_reapi::proto::re::{
    batch_read_blobs_response, batch_update_blobs_response, compressor,
    content_addressable_storage_server::ContentAddressableStorage, BatchReadBlobsRequest,
    BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse, Directory,
    FindMissingBlobsRequest, FindMissingBlobsResponse, GetChunkMappingRequest,
    GetChunkMappingResponse, GetTreeRequest, GetTreeResponse, RegisterChunkMappingRequest,
    RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest,
    SplitBlobResponse,
};
use paddock_reapi::{status, Digest};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use paddock_config::Permission;

use crate::auth::authorize;
use crate::{invalid, Limits};

/// The most directories one GetTree page holds, whatever the client asks for.
const MAX_TREE_PAGE: usize = 1000;
/// How many blobs of one batch are read or written at once: enough to keep the
/// store busy, few enough that a batch of thousands of tiny blobs does not open
/// thousands of files at a time.
const BATCH_PARALLELISM: usize = 64;

pub struct CasService {
    cas: Arc<dyn BlobStore>,
    limits: Limits,
}

impl CasService {
    /// A batch of more blobs than the limit is refused whatever their size: each
    /// costs the server work, even when empty.
    fn check_count(&self, count: usize) -> Result<(), Status> {
        match count > self.limits.max_batch_blobs {
            true => Err(invalid(format!(
                "a batch of {count} blobs is more than this server takes in one call ({}, storage.max_batch_blobs); split it",
                self.limits.max_batch_blobs
            ))),
            false => Ok(()),
        }
    }

    pub fn new(cas: Arc<dyn BlobStore>, limits: Limits) -> Self {
        CasService { cas, limits }
    }
}

fn parse_digests(digests: &[paddock_reapi::proto::re::Digest]) -> Result<Vec<Digest>, Status> {
    digests
        .iter()
        .enumerate()
        .map(|(i, d)| Digest::from_proto(Some(d)).map_err(|e| invalid(format!("digest #{i}: {e}"))))
        .collect()
}

fn store_status(error: &StoreError) -> paddock_reapi::proto::rpc::Status {
    status::status(error.code(), error.to_string())
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        authorize(
            &request,
            Permission::CasRead,
            &request.get_ref().instance_name,
        )?;
        let request = request.into_inner();
        check_digest_function(request.digest_function).map_err(invalid)?;
        let digests = parse_digests(&request.blob_digests)?;
        let missing = self.cas.find_missing(&digests).await?;
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        authorize(
            &request,
            Permission::CasWrite,
            &request.get_ref().instance_name,
        )?;
        let request = request.into_inner();
        check_digest_function(request.digest_function).map_err(invalid)?;
        self.check_count(request.requests.len())?;
        let total: u64 = request.requests.iter().map(|r| r.data.len() as u64).sum();
        if total > self.limits.max_batch_size {
            return Err(invalid(format!(
                "batch of {total} bytes exceeds max_batch_total_size_bytes ({}); use ByteStream",
                self.limits.max_batch_size
            )));
        }
        let uploads = request.requests.into_iter().map(|blob| async move {
            let echoed = blob.digest.clone();
            let outcome = async {
                let digest = Digest::from_proto(blob.digest.as_ref())
                    .map_err(|e| status::status(Code::InvalidArgument, e.to_string()))?;
                if blob.compressor != compressor::Value::Identity as i32 {
                    return Err(status::status(
                        Code::InvalidArgument,
                        format!("compressor {} is not supported", blob.compressor),
                    ));
                }
                if blob.data.len() as u64 != digest.size() {
                    return Err(status::status(
                        Code::InvalidArgument,
                        format!(
                            "digest {digest} promises {} bytes but {} were sent",
                            digest.size(),
                            blob.data.len()
                        ),
                    ));
                }
                let len = blob.data.len() as u64;
                self.cas
                    .put(&digest, Bytes::from(blob.data))
                    .await
                    .map_err(|e| store_status(&e))?;
                metrics::counter!("paddock_cas_bytes_written_total").increment(len);
                Ok(())
            }
            .await;
            batch_update_blobs_response::Response {
                digest: echoed,
                status: Some(outcome.err().unwrap_or_else(status::ok)),
            }
        });
        Ok(Response::new(BatchUpdateBlobsResponse {
            responses: futures::stream::iter(uploads)
                .buffered(BATCH_PARALLELISM)
                .collect()
                .await,
        }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        authorize(
            &request,
            Permission::CasRead,
            &request.get_ref().instance_name,
        )?;
        let request = request.into_inner();
        check_digest_function(request.digest_function).map_err(invalid)?;
        self.check_count(request.digests.len())?;
        let total: u64 = request
            .digests
            .iter()
            .map(|d| d.size_bytes.max(0) as u64)
            .fold(0, u64::saturating_add);
        if total > self.limits.max_batch_size {
            return Err(invalid(format!(
                "batch of {total} bytes exceeds max_batch_total_size_bytes ({}); use ByteStream",
                self.limits.max_batch_size
            )));
        }
        let reads = request.digests.into_iter().map(|requested| async move {
            let outcome = async {
                let digest = Digest::from_proto(Some(&requested))
                    .map_err(|e| status::status(Code::InvalidArgument, e.to_string()))?;
                match read_all(self.cas.as_ref(), &digest).await {
                    Ok(Some(data)) => Ok(data),
                    Ok(None) => Err(status::status(
                        Code::NotFound,
                        format!("blob {digest} is not in the CAS"),
                    )),
                    Err(e) => Err(store_status(&e)),
                }
            }
            .await;
            let (data, status) = match outcome {
                Ok(data) => {
                    metrics::counter!("paddock_cas_bytes_read_total").increment(data.len() as u64);
                    (data.to_vec(), status::ok())
                }
                Err(s) => (Vec::new(), s),
            };
            batch_read_blobs_response::Response {
                digest: Some(requested),
                data,
                compressor: compressor::Value::Identity as i32,
                status: Some(status),
            }
        });
        Ok(Response::new(BatchReadBlobsResponse {
            responses: futures::stream::iter(reads)
                .buffered(BATCH_PARALLELISM)
                .collect()
                .await,
        }))
    }

    type GetTreeStream = ReceiverStream<Result<GetTreeResponse, Status>>;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        authorize(
            &request,
            Permission::CasRead,
            &request.get_ref().instance_name,
        )?;
        let request = request.into_inner();
        check_digest_function(request.digest_function).map_err(invalid)?;
        let root = Digest::from_proto(request.root_digest.as_ref())
            .map_err(|e| invalid(format!("root_digest: {e}")))?;
        if request.page_size < 0 {
            return Err(invalid(format!(
                "page_size {} is negative",
                request.page_size
            )));
        }
        let page_size = match request.page_size as usize {
            0 => MAX_TREE_PAGE,
            n => n.min(MAX_TREE_PAGE),
        };
        let skip: usize = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse().map_err(|_| {
                invalid(format!(
                    "page_token {:?} was not issued by this server",
                    request.page_token
                ))
            })?
        };
        let root_dir = read_directory(self.cas.as_ref(), &root)
            .await?
            .ok_or_else(|| Status::not_found(format!("tree root {root} is not in the CAS")))?;

        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let cas = self.cas.clone();
        let bound = self.limits.max_tree_directories;
        tokio::spawn(async move {
            let result = walk_tree(cas.as_ref(), root, root_dir, skip, page_size, bound, &tx).await;
            if let Err(status) = result {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn split_blob(
        &self,
        _request: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "blob splitting is not supported (split_blob_support is false)",
        ))
    }

    async fn splice_blob(
        &self,
        _request: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "blob splicing is not supported (splice_blob_support is false)",
        ))
    }

    type GetChunkMappingStream = ReceiverStream<Result<GetChunkMappingResponse, Status>>;

    async fn get_chunk_mapping(
        &self,
        _request: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("chunk mappings are not supported"))
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("chunk mappings are not supported"))
    }
}

/// Reads and decodes a Directory; `None` if the blob is absent (or was corrupt).
async fn read_directory(cas: &dyn BlobStore, digest: &Digest) -> Result<Option<Directory>, Status> {
    let bytes = match read_all(cas, digest).await {
        Ok(Some(b)) => b,
        Ok(None) | Err(StoreError::Corrupt(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Directory::decode(bytes)
        .map(Some)
        .map_err(|e| invalid(format!("blob {digest} is not a Directory: {e}")))
}

/// Walks the tree breadth first, each distinct directory once, and streams it in pages.
/// The page token is the number of directories already delivered, so a resumed call
/// retraces the same deterministic order and skips what the client has. A tree of
/// more than `bound` distinct directories is refused with RESOURCE_EXHAUSTED.
async fn walk_tree(
    cas: &dyn BlobStore,
    root: Digest,
    root_dir: Directory,
    skip: usize,
    page_size: usize,
    bound: usize,
    tx: &tokio::sync::mpsc::Sender<Result<GetTreeResponse, Status>>,
) -> Result<(), Status> {
    let mut seen = HashSet::from([root]);
    let mut queue: VecDeque<Directory> = VecDeque::from([root_dir]);
    let mut position = 0usize;
    let mut page = Vec::new();
    while let Some(dir) = queue.pop_front() {
        for child in &dir.directories {
            // A malformed child digest cannot be fetched; like a missing one, it is left out.
            let Ok(digest) = Digest::from_proto(child.digest.as_ref()) else {
                continue;
            };
            if seen.insert(digest) {
                if seen.len() > bound {
                    return Err(Status::resource_exhausted(format!(
                        "the tree {root} has more than {bound} distinct directories (storage.max_tree_directories)"
                    )));
                }
                // A missing or undecodable subdirectory is omitted, as REAPI allows.
                if let Ok(Some(sub)) = read_directory(cas, &digest).await {
                    queue.push_back(sub);
                }
            }
        }
        position += 1;
        if position <= skip {
            continue;
        }
        page.push(dir);
        if page.len() == page_size && !queue.is_empty() {
            let response = GetTreeResponse {
                directories: std::mem::take(&mut page),
                next_page_token: position.to_string(),
            };
            if tx.send(Ok(response)).await.is_err() {
                return Ok(());
            }
        }
    }
    let _ = tx
        .send(Ok(GetTreeResponse {
            directories: page,
            next_page_token: String::new(),
        }))
        .await;
    Ok(())
}
