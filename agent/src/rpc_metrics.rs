//! A tower layer on the gRPC servers that counts every call by method and status code, with its
//! duration, into [`Metrics`].
//!
//! A call is counted when its response ends, because that is when gRPC knows how it went: an
//! error answered at once carries `grpc-status` in the response headers, a success (and an error
//! in the middle of a stream) in the trailers after the body. A response dropped before its end
//! (the client went away) counts as CANCELLED.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::body::{Body, Frame, SizeHint};
use tonic::codegen::http;

use crate::metrics::Metrics;

/// Adds the RPC counters to a server's services.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl RpcMetricsLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        RpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// A service that counts the calls of the service it wraps.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Records one call once its outcome is known; at most once.
struct Call {
    metrics: Arc<Metrics>,
    method: String,
    start: Instant,
}

impl Call {
    fn finish(self, code: tonic::Code) {
        self.metrics.observe_rpc(self.method, code, self.start.elapsed());
    }
}

/// The status code in a `grpc-status` header or trailer.
fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<ObservedBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = Call {
            method: self.metrics.method_label(request.uri().path()),
            metrics: self.metrics.clone(),
            start: Instant::now(),
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    let call = match grpc_code(response.headers()) {
                        // Trailers-only: the whole answer is in the headers.
                        Some(code) => {
                            call.finish(code);
                            None
                        }
                        None => Some(call),
                    };
                    Ok(response.map(|body| ObservedBody { inner: body, call }))
                }
                Err(e) => {
                    // The transport failed the call before any answer.
                    call.finish(tonic::Code::Unknown);
                    Err(e)
                }
            }
        })
    }
}

/// A response body that records its call when its trailers come, it ends, or it is dropped.
pub struct ObservedBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.finish(tonic::Code::Cancelled);
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body + Unpin,
{
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
                    if let Some(call) = self.call.take() {
                        call.finish(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = self.call.take() {
                    call.finish(tonic::Code::Internal);
                }
            }
            // Ended without a status: not a well-formed gRPC answer.
            Poll::Ready(None) => {
                if let Some(call) = self.call.take() {
                    call.finish(tonic::Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::convert::Infallible;

    use http_body_util::StreamBody;
    use hyper::body::Bytes;
    use tower::{Layer, Service, ServiceExt};

    fn count(metrics: &Metrics, method: &str, code: &str) -> u64 {
        let mut e = crate::exposition::Exposition::new();
        metrics.write_kept(&mut e);
        let prefix = format!("vmmagent_rpc_requests_total{{method=\"{method}\",code=\"{code}\"}} ");
        e.finish()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    type Frames = tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;

    /// Answers `/a.S/Err` NOT_FOUND in the headers, `/a.S/Ok` with a message and OK in the
    /// trailers, anything else with an empty body.
    async fn answer(request: http::Request<()>) -> Result<http::Response<StreamBody<Frames>>, Infallible> {
        let mut frames = Vec::new();
        let mut headers = http::HeaderMap::new();
        match request.uri().path() {
            "/a.S/Err" => {
                headers.insert("grpc-status", http::HeaderValue::from_static("5"));
            }
            "/a.S/Ok" => {
                frames.push(Ok(Frame::data(Bytes::from_static(b"message"))));
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                frames.push(Ok(Frame::trailers(trailers)));
            }
            _ => {}
        }
        let mut response = http::Response::new(StreamBody::new(tokio_stream::iter(frames)));
        *response.headers_mut() = headers;
        Ok(response)
    }

    async fn drain<B: Body + Unpin>(mut body: B) {
        while std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
            .await
            .is_some()
        {}
    }

    #[tokio::test]
    async fn calls_are_counted_by_the_status_in_headers_or_trailers() {
        let known = ["/a.S/Ok", "/a.S/Err", "/a.S/Bare"].map(String::from);
        let metrics = Arc::new(Metrics::with_methods(HashSet::from(known)));
        let mut svc = RpcMetricsLayer::new(metrics.clone()).layer(tower::service_fn(answer));
        let request = |path: &str| http::Request::builder().uri(path).body(()).unwrap();

        // Trailers-only error: counted before the body is read.
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(request("/a.S/Err"))
            .await
            .unwrap();
        assert_eq!(count(&metrics, "/a.S/Err", "NOT_FOUND"), 1);
        drain(response.into_body()).await;
        assert_eq!(count(&metrics, "/a.S/Err", "NOT_FOUND"), 1, "counted once");

        // Success: counted when the trailers come.
        let response = svc.ready().await.unwrap().call(request("/a.S/Ok")).await.unwrap();
        assert_eq!(count(&metrics, "/a.S/Ok", "OK"), 0);
        drain(response.into_body()).await;
        assert_eq!(count(&metrics, "/a.S/Ok", "OK"), 1);

        // A body that ends without a status is no gRPC answer.
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(request("/a.S/Bare"))
            .await
            .unwrap();
        drain(response.into_body()).await;
        assert_eq!(count(&metrics, "/a.S/Bare", "UNKNOWN"), 1);

        // Dropped before its end: the client went away. Unknown paths share one label.
        let response = svc.ready().await.unwrap().call(request("/x.Y/Z")).await.unwrap();
        drop(response);
        assert_eq!(count(&metrics, "unknown", "CANCELLED"), 1);
    }
}
