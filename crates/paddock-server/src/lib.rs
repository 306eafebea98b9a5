//! Paddock's gRPC front: every REAPI service on one port.
//!
//! This crate is protocol code. It validates requests, translates them into calls on
//! the stores (`paddock-cas`) and the scheduler (`paddock-scheduler`), and answers with
//! the status codes the REAPI specifies; what to store, evict or schedule is decided
//! elsewhere. [`serve`] runs the services
//! with per-RPC metrics until shutdown.

mod action_cache;
mod admin;
mod bytestream;
mod capabilities;
mod cas;
mod execution;
mod rpc_metrics;
mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use paddock_cas::{ActionCache, BlobStore};
use paddock_reapi::proto::{bytestream as bs, re};
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use action_cache::ActionCacheService;
pub use admin::AdminService;
pub use bytestream::ByteStreamService;
pub use capabilities::CapabilitiesService;
pub use cas::CasService;
pub use execution::{ExecutionService, OperationsService};
pub use workers::WorkerService;

/// The stores behind the cache services.
#[derive(Clone)]
pub struct Storage {
    pub cas: Arc<dyn BlobStore>,
    pub action_cache: Arc<dyn ActionCache>,
}

/// Limits the server advertises and enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most a batch request may carry, in bytes of blob data.
    pub max_batch_size: u64,
    /// The most blobs one batch call may name.
    pub max_batch_blobs: usize,
    /// The most distinct directories GetTree walks in one tree.
    pub max_tree_directories: usize,
}

impl Limits {
    /// The largest gRPC message accepted: well beyond a full batch, so that an
    /// oversized batch still arrives and is answered with REAPI's INVALID_ARGUMENT
    /// (tonic would refuse a larger message itself, with OUT_OF_RANGE), and so that
    /// clients writing large ByteStream chunks are served.
    pub fn max_message_size(&self) -> usize {
        (self.max_batch_size as usize)
            .saturating_mul(4)
            .saturating_add(1 << 20)
            .max(64 << 20)
    }
}

/// The REAPI cache services: Capabilities, ContentAddressableStorage, ByteStream and
/// ActionCache.
pub fn cache_routes(storage: &Storage, limits: Limits, execution_enabled: bool) -> Routes {
    let max = limits.max_message_size();
    Routes::new(re::capabilities_server::CapabilitiesServer::new(
        CapabilitiesService::new(limits, execution_enabled),
    ))
    .add_service(
        re::content_addressable_storage_server::ContentAddressableStorageServer::new(
            CasService::new(storage.cas.clone(), limits),
        )
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
    )
    .add_service(
        bs::byte_stream_server::ByteStreamServer::new(ByteStreamService::new(storage.cas.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
    .add_service(
        re::action_cache_server::ActionCacheServer::new(ActionCacheService::new(storage.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
}

/// The execution services, over `scheduler`: Execution, Operations, the worker
/// protocol and the operators' protocol.
pub fn execution_routes(
    routes: Routes,
    storage: &Storage,
    scheduler: &paddock_scheduler::Scheduler,
) -> Routes {
    routes
        .add_service(re::execution_server::ExecutionServer::new(
            ExecutionService::new(scheduler.clone(), storage.clone()),
        ))
        .add_service(
            paddock_reapi::proto::longrunning::operations_server::OperationsServer::new(
                OperationsService::new(scheduler.clone()),
            ),
        )
        .add_service(
            paddock_proto::worker::v1::scheduler_server::SchedulerServer::new(WorkerService::new(
                scheduler.clone(),
            ))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        )
        .add_service(paddock_proto::admin::v1::admin_server::AdminServer::new(
            AdminService::new(scheduler.clone(), storage.clone()),
        ))
}

/// How long calls still in flight at shutdown may take to finish before their
/// connections are closed under them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `routes` on `listener` until `shutdown` resolves, then lets in-flight
/// calls finish for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (began, draining) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = began.send(());
    };
    // A client that keeps a stream open (or a stalled upload) must not keep the
    // server from stopping.
    let deadline = async move {
        match draining.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = serve_until(listener, routes, shutdown) => served,
        _ = deadline => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "calls still in flight after the shutdown grace period; stopping without them");
            Ok(())
        }
    }
}

async fn serve_until(
    listener: TcpListener,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // Latency-bound calls (GetActionResult, FindMissingBlobs) must not wait on Nagle.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        // Large windows let one ByteStream call move a gigabyte a second on loopback.
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .max_frame_size(Some((1 << 20) - 1))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .layer(rpc_metrics::RpcMetricsLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Maps a malformed-argument error to INVALID_ARGUMENT.
fn invalid(error: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::invalid_argument(error.to_string())
}
