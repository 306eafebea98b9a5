//! Who is calling: every request goes through [`AuthLayer`], which establishes its
//! principal (from its `authorization` header and the client certificate TLS
//! verified) or answers UNAUTHENTICATED; each RPC then asks [`authorize`] for the
//! permission it needs on its instance, which answers PERMISSION_DENIED naming both.
//! Every refusal is logged with the identity, the method and the instance, and
//! counted; no credential is ever logged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use paddock_auth::{Authenticator, Principal};
use paddock_config::Permission;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tower::{Layer, Service};

/// How a listener tells its callers apart.
#[derive(Clone)]
pub enum Callers {
    /// By their credentials.
    Authenticated(Arc<Authenticator>),
    /// Everyone on this listener is this principal (workers in the server's own
    /// process, over connections that never leave it).
    Fixed(Arc<Principal>),
}

impl Callers {
    /// Everyone may do everything (a server on loopback without `[auth]`).
    pub fn anyone() -> Callers {
        Callers::Fixed(Arc::new(Principal::anonymous()))
    }
}

/// Who a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Clients: what they may do is what they were granted.
    Clients,
    /// Workers: the `worker` permission brings the CAS of the instances served
    /// ([`Principal::serving_workers`]).
    Workers,
}

/// The method a request calls, for messages and refusal logs.
#[derive(Debug, Clone, Copy)]
pub struct Method(pub &'static str);

#[derive(Clone)]
pub struct AuthLayer {
    callers: Callers,
    audience: Audience,
}

impl AuthLayer {
    pub fn new(callers: Callers, audience: Audience) -> AuthLayer {
        AuthLayer { callers, audience }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            callers: self.callers.clone(),
            audience: self.audience,
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    callers: Callers,
    audience: Audience,
}

/// How many refusals are logged per second at most; the rest are counted, and the
/// next logged line says how many were not logged.
const REFUSALS_LOGGED_PER_SECOND: u64 = 100;

/// Lets through at most [`REFUSALS_LOGGED_PER_SECOND`] log lines a second, so that a
/// stream of bad requests cannot flood the log.
fn may_log() -> Option<u64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SECOND: AtomicU64 = AtomicU64::new(0);
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if SECOND.swap(now, Ordering::Relaxed) != now {
        LOGGED.store(0, Ordering::Relaxed);
    }
    if LOGGED.fetch_add(1, Ordering::Relaxed) < REFUSALS_LOGGED_PER_SECOND {
        Some(SUPPRESSED.swap(0, Ordering::Relaxed))
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        None
    }
}

fn refused(kind: &'static str, who: &str, method: &'static str, instance: &str, why: &str) {
    if let Some(suppressed) = may_log() {
        tracing::warn!(%who, %method, %instance, reason = %why, not_logged_before = suppressed, "refused: {kind}");
    }
    metrics::counter!("paddock_auth_refusals_total", "kind" => kind, "method" => method)
        .increment(1);
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let method = crate::rpc_metrics::rpc_name(request.uri().path());
        let principal = match &self.callers {
            Callers::Fixed(principal) => Ok(principal.clone()),
            Callers::Authenticated(authenticator) => {
                let authorization = request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                let certificates = request
                    .extensions()
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|info| info.peer_certs());
                let leaf = certificates.as_ref().and_then(|c| c.first());
                authenticator.authenticate(authorization, leaf.map(|c| c.as_ref()))
            }
        };
        match principal {
            Ok(principal) => {
                let principal = match self.audience {
                    Audience::Clients => principal,
                    Audience::Workers => Arc::new(principal.serving_workers()),
                };
                request.extensions_mut().insert(principal);
                request.extensions_mut().insert(Method(method));
                let response = self.inner.call(request);
                Box::pin(response)
            }
            Err(unauthenticated) => {
                refused("unauthenticated", "?", method, "", &unauthenticated.0);
                let status = Status::unauthenticated(unauthenticated.0);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The caller of a request that came through [`AuthLayer`].
pub fn principal<T>(request: &tonic::Request<T>) -> Result<Arc<Principal>, Status> {
    request
        .extensions()
        .get::<Arc<Principal>>()
        .cloned()
        .ok_or_else(|| Status::internal("the request did not pass authentication"))
}

/// The caller, if it may do `permission` on `instance`; PERMISSION_DENIED otherwise.
pub fn authorize<T>(
    request: &tonic::Request<T>,
    permission: Permission,
    instance: &str,
) -> Result<Arc<Principal>, Status> {
    let principal = principal(request)?;
    require(&principal, method(request), permission, instance)?;
    Ok(principal)
}

/// The method a request calls (for calls whose instance is known only later, in a
/// stream).
pub fn method<T>(request: &tonic::Request<T>) -> &'static str {
    request
        .extensions()
        .get::<Method>()
        .map_or("unknown", |m| m.0)
}

/// Whether `principal`, calling `method`, may do `permission` on `instance`.
pub fn require(
    principal: &Principal,
    method: &'static str,
    permission: Permission,
    instance: &str,
) -> Result<(), Status> {
    principal.require(permission, instance).map_err(|denied| {
        refused(
            "denied",
            principal.name(),
            method,
            instance,
            &denied.to_string(),
        );
        Status::permission_denied(denied.to_string())
    })
}
