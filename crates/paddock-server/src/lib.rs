//! Paddock's gRPC front: the REAPI services for clients, and the worker protocol
//! with the CAS for workers, each on a listener of its own.
//!
//! This crate is protocol code. It validates requests, translates them into calls on
//! the stores (`paddock-cas`) and the scheduler (`paddock-scheduler`), and answers with
//! the status codes the REAPI specifies; what to store, evict or schedule is decided
//! elsewhere. Who may call what is decided by `paddock-auth`: every request passes
//! [`auth`] first, and each RPC asks for the permission it needs on its instance.
//! [`serve`] runs services, over TLS or plain text, with per-RPC metrics until
//! shutdown.

mod action_cache;
mod admin;
mod auth;
mod bes;
mod bytestream;
mod capabilities;
mod cas;
mod execution;
mod history;
mod rpc_metrics;
mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use paddock_cas::{ActionCache, BlobStore};
use paddock_config::QuotaConfig;
use paddock_reapi::proto::{bytestream as bs, re};
use paddock_tls::{Protocol, ServerTls};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::Connected;

pub use action_cache::ActionCacheService;
pub use admin::AdminService;
pub use bes::BuildEventService;
pub use bytestream::ByteStreamService;
pub use capabilities::CapabilitiesService;
pub use cas::CasService;
pub use execution::{ExecutionService, OperationsService};
pub use workers::WorkerService;

pub use auth::{Audience, Callers};

/// The stores behind the cache services, and the history where the actions they
/// serve are noted for people to look at.
#[derive(Clone)]
pub struct Storage {
    pub cas: Arc<dyn BlobStore>,
    pub action_cache: Arc<dyn ActionCache>,
    pub history: Arc<paddock_history::History>,
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
/// ActionCache. Served on both listeners; clones of the routes share the services'
/// state (uploads under way, and their quotas).
pub fn cache_routes(
    storage: &Storage,
    limits: Limits,
    quotas: &QuotaConfig,
    execution_enabled: bool,
) -> Routes {
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
        bs::byte_stream_server::ByteStreamServer::new(ByteStreamService::new(
            storage.cas.clone(),
            quotas.clone(),
        ))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
    )
    .add_service(
        re::action_cache_server::ActionCacheServer::new(ActionCacheService::new(storage.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
}

/// What clients use: `cache` and the execution services over `scheduler` (Execution,
/// Operations, and the operators' protocol).
pub fn client_routes(
    cache: Routes,
    storage: &Storage,
    scheduler: &paddock_scheduler::Scheduler,
) -> Routes {
    cache
        .add_service(re::execution_server::ExecutionServer::new(
            ExecutionService::new(scheduler.clone(), storage.clone()),
        ))
        .add_service(
            paddock_reapi::proto::longrunning::operations_server::OperationsServer::new(
                OperationsService::new(scheduler.clone()),
            ),
        )
        .add_service(paddock_proto::admin::v1::admin_server::AdminServer::new(
            AdminService::new(scheduler.clone(), storage.clone()),
        ))
        .add_service(
            paddock_proto::google::devtools::build::v1::publish_build_event_server::PublishBuildEventServer::new(
                BuildEventService::new(storage.history.clone()),
            ),
        )
}

/// What workers use: `cache` (for their actions' inputs and outputs) and the worker
/// protocol over `scheduler`.
pub fn worker_routes(cache: Routes, scheduler: &paddock_scheduler::Scheduler) -> Routes {
    cache.add_service(
        paddock_proto::worker::v1::scheduler_server::SchedulerServer::new(WorkerService::new(
            scheduler.clone(),
        ))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20),
    )
}

/// How long calls still in flight at shutdown may take to finish before their
/// connections are closed under them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Who is served on a listener, and how they are told apart.
#[derive(Clone)]
pub struct Access {
    pub callers: Callers,
    pub audience: Audience,
}

/// Serves `routes` on `listener` (through TLS when `tls` is given) as `access` says,
/// until `shutdown` resolves, then lets in-flight calls finish for up to
/// [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    routes: Routes,
    access: Access,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    match tls {
        Some(tls) => {
            let incoming = paddock_tls::incoming(listener, tls, Protocol::Grpc);
            serve_incoming(incoming, routes, access, shutdown).await
        }
        None => {
            // Latency-bound calls (GetActionResult, FindMissingBlobs) must not wait on Nagle.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            serve_incoming(incoming, routes, access, shutdown).await
        }
    }
}

/// Serves `routes` over connections made inside this process (workers the server
/// runs itself), whose caller is always `principal`.
pub async fn serve_local(
    connections: tokio::sync::mpsc::Receiver<tokio::io::DuplexStream>,
    routes: Routes,
    principal: Arc<paddock_auth::Principal>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming = futures::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(connections),
        Ok::<_, std::io::Error>,
    );
    let access = Access {
        callers: Callers::Fixed(principal),
        audience: Audience::Workers,
    };
    serve_incoming(incoming, routes, access, shutdown).await
}

async fn serve_incoming<I, IO, IE>(
    incoming: I,
    routes: Routes,
    access: Access,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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
    let layers = tower::ServiceBuilder::new()
        .layer(rpc_metrics::RpcMetricsLayer)
        .layer(auth::AuthLayer::new(access.callers, access.audience));
    let served = tonic::transport::Server::builder()
        // Large windows let one ByteStream call move a gigabyte a second on loopback.
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .max_frame_size(Some((1 << 20) - 1))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .layer(layers)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::select! {
        served = served => served,
        _ = deadline => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "calls still in flight after the shutdown grace period; stopping without them");
            Ok(())
        }
    }
}

/// Maps a malformed-argument error to INVALID_ARGUMENT.
fn invalid(error: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::invalid_argument(error.to_string())
}
