//! Logs and metrics for every Paddock process.
//!
//! Logs go through `tracing` (plain or JSON lines, filtered by `RUST_LOG`). Metrics go
//! through the `metrics` facade into one process-wide Prometheus recorder, which
//! [`serve_metrics`] exposes as `GET /metrics` on its own HTTP port (HTTPS when the
//! server has TLS).

use std::convert::Infallible;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use paddock_tls::{Protocol, ServerTls};
use tokio::net::TcpListener;

/// Latency buckets in seconds, from 50 µs to 10 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];

/// Sets up logging to stderr; `RUST_LOG` overrides `default_filter`.
pub fn init_logging(json: bool, default_filter: &str) {
    init_logging_to(json, default_filter, std::io::stderr);
}

/// Sets up logging to `writer`; `RUST_LOG` overrides `default_filter`.
pub fn init_logging_to<W>(json: bool, default_filter: &str, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide metrics recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        handle
    })
}

/// Serves `GET /metrics` in the Prometheus text format until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()>,
) {
    let handle = metrics();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener failed to accept");
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let service = service_fn(
            move |request: hyper::Request<hyper::body::Incoming>| async move {
                let response = if request.uri().path() == "/metrics" {
                    handle.run_upkeep();
                    http::Response::builder()
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(handle.render())))
                } else {
                    http::Response::builder()
                        .status(http::StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                };
                Ok::<_, Infallible>(response.expect("static response parts are valid"))
            },
        );
        let tls = tls.clone();
        tokio::spawn(async move {
            let http = hyper::server::conn::http1::Builder::new();
            let _ = match tls {
                Some(tls) => match tls.accept(stream, Protocol::Http1).await {
                    Some(stream) => http.serve_connection(TokioIo::new(stream), service).await,
                    None => return,
                },
                None => http.serve_connection(TokioIo::new(stream), service).await,
            };
        });
    }
}
