//! The `--metrics-listen` endpoint: HTTP/1.1 on its own TCP address, `GET /metrics` (and `HEAD`)
//! answered in the Prometheus text format; any other path is 404, another method on `/metrics`
//! 405.
//!
//! Whoever reaches the port may connect, so a client gets little: at most [`MAX_CONNECTIONS`] are
//! served at once (more wait to be accepted), [`HEADER_TIMEOUT`] to send its request head of at most
//! [`MAX_REQUEST_HEAD`] bytes (hyper answers 431 past that, 400 to what is not HTTP), one request
//! per connection, and [`CONNECTION_TIMEOUT`] for all of it, reading the answer included. One
//! scrape collects at a time; others wait their turn.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};

use crate::exposition::CONTENT_TYPE as EXPOSITION_TYPE;
use crate::state::Context;

/// The path served.
pub const PATH: &str = "/metrics";
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may last in all.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head read (hyper's smallest buffer limit).
pub const MAX_REQUEST_HEAD: usize = 8192;

struct Shared {
    ctx: Arc<Context>,
    /// Held while a scrape collects, so that concurrent scrapes do not multiply the work
    /// (each asks every vmm).
    scraping: Mutex<()>,
}

/// Serves `/metrics` on `listener` until `stopped` resolves.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, stopped: impl Future<Output = ()>) {
    let shared = Arc::new(Shared {
        ctx,
        scraping: Mutex::new(()),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(stopped);
    loop {
        // A slot first: while every slot is taken, new connections wait in the kernel's backlog
        // (until a slow client's time is up) instead of being refused.
        let slot = tokio::select! {
            _ = &mut stopped => return,
            slot = slots.clone().acquire_owned() => slot,
        };
        // Never closed, so never an error.
        let Ok(slot) = slot else { return };
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: the next accept may work; the agent goes on.
                tracing::warn!(error = %e, "metrics: cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, shared).await;
            drop(slot);
        });
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let service = hyper::service::service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(answer(request, &shared).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics: connection ended"),
        Err(_) => tracing::debug!(%peer, "metrics: connection took too long; closed"),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn answer(request: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if request.uri().path() != PATH {
        return plain(StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let text = {
        let _turn = shared.scraping.lock().await;
        crate::metrics::render(&shared.ctx).await
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(EXPOSITION_TYPE));
    response
}
