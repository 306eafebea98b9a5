//! Per-RPC metrics for every gRPC call: a count by status code and a latency histogram
//! that covers the whole call, streamed responses included.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use tower::{Layer, Service};

#[derive(Clone, Copy)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

/// Every RPC Paddock serves, as metrics and logs name them.
const RPCS: &[&str] = &[
    "Capabilities/GetCapabilities",
    "ContentAddressableStorage/FindMissingBlobs",
    "ContentAddressableStorage/BatchUpdateBlobs",
    "ContentAddressableStorage/BatchReadBlobs",
    "ContentAddressableStorage/GetTree",
    "ContentAddressableStorage/SplitBlob",
    "ContentAddressableStorage/SpliceBlob",
    "ByteStream/Read",
    "ByteStream/Write",
    "ByteStream/QueryWriteStatus",
    "ActionCache/GetActionResult",
    "ActionCache/UpdateActionResult",
    "Execution/Execute",
    "Execution/WaitExecution",
    "Operations/ListOperations",
    "Operations/GetOperation",
    "Operations/DeleteOperation",
    "Operations/CancelOperation",
    "Operations/WaitOperation",
    "Scheduler/Session",
    "Admin/ListWorkers",
    "Admin/CommandWorker",
    "Admin/InvalidateActionResults",
    "PublishBuildEvent/PublishLifecycleEvent",
    "PublishBuildEvent/PublishBuildToolEventStream",
];

/// `/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs` →
/// `ContentAddressableStorage/FindMissingBlobs`; anything else is `unknown`, so that
/// what callers send never becomes a label of its own.
pub(crate) fn rpc_name(path: &str) -> &'static str {
    let path = path.trim_start_matches('/');
    let Some((service, method)) = path.split_once('/') else {
        return "unknown";
    };
    let service = service.rsplit('.').next().unwrap_or(service);
    RPCS.iter()
        .copied()
        .find(|known| known.split_once('/') == Some((service, method)))
        .unwrap_or("unknown")
}

fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(value))
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let rpc = rpc_name(request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let code = grpc_code(response.headers());
            Ok(response.map(|inner| MeteredBody {
                inner,
                call: Some(Call { rpc, started, code }),
            }))
        })
    }
}

struct Call {
    rpc: &'static str,
    started: Instant,
    code: Option<tonic::Code>,
}

impl Call {
    fn record(self, code: tonic::Code) {
        let code = format!("{code:?}");
        metrics::counter!("paddock_grpc_requests_total", "rpc" => self.rpc, "code" => code)
            .increment(1);
        metrics::histogram!("paddock_grpc_request_duration_seconds", "rpc" => self.rpc)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// A response body that records its call when the last frame (the trailers holding
/// `grpc-status`) goes out, or as cancelled if the client leaves first.
pub struct MeteredBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
                    if let Some(call) = self.call.as_mut() {
                        call.code = Some(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = self.call.take() {
                    call.record(tonic::Code::Internal);
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = self.call.take() {
                    let code = call.code.unwrap_or(tonic::Code::Ok);
                    call.record(code);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            // Trailers-only responses (errors) end without a final frame being polled.
            let code = call.code.unwrap_or(tonic::Code::Cancelled);
            call.record(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rpc_name;

    #[test]
    fn names_rpcs_by_service_and_method() {
        assert_eq!(
            rpc_name("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"),
            "ContentAddressableStorage/FindMissingBlobs"
        );
        assert_eq!(
            rpc_name("/google.bytestream.ByteStream/Read"),
            "ByteStream/Read"
        );
        for made_up in [
            "/x.Y/Z",
            "/google.bytestream.ByteStream/Reed",
            "nothing",
            "",
        ] {
            assert_eq!(rpc_name(made_up), "unknown");
        }
    }
}
