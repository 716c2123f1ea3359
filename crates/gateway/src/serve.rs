//! The HTTP server: the API router served connection by connection with the limits a
//! listener on a network needs (issue 13, "HTTP has no timeouts and no limits"):
//!
//! * at most [`HttpLimits::max_connections`] connections at once; one more is answered
//!   `503` with `Retry-After` and closed, so a flood of connections costs a file
//!   descriptor for a moment, never the server;
//! * a request's head must arrive within [`HttpLimits::header_timeout`] (hyper's header
//!   read timeout, which also closes a connection that never sends a byte and one idle
//!   between keep-alive requests);
//! * a whole request, its body included, within [`HttpLimits::request_timeout`] (`408`):
//!   a slow body holds one connection slot for that long at most.
//!
//! What a route may read (body limits) and how often an anonymous client may call the
//! routes that reach the Bitcoin node (rate limits) are the router's ([`crate::http`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Limits of the HTTP listener (`[gateway] http_max_connections`, `http_header_timeout_ms`,
/// `http_request_timeout_ms`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits { max_connections: 4096, header_timeout: Duration::from_secs(10), request_timeout: Duration::from_secs(30) }
    }
}

/// Bind the HTTP listener with a listen backlog as deep as the connection cap (the kernel
/// caps it at `net.core.somaxconn`): with the default 1,024 a burst of connections overflows
/// the accept queue and clients wait for SYN retransmissions (seconds) before they are even
/// seen, let alone answered.
pub fn bind(addr: SocketAddr, limits: &HttpLimits) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(limits.max_connections).unwrap_or(u32::MAX).max(1024))
}

/// Serve `app` on `listener` until `stop` completes; then stop accepting and give the
/// connections open their current request (at most the request timeout).
pub async fn serve(listener: TcpListener, app: Router, limits: HttpLimits, stop: impl Future<Output = ()>) {
    let app = app.layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.request_timeout));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted.
                    tracing::warn!("HTTP: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req.map(axum::body::Body::new))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("HTTP connection from {peer}: {e}");
            }
            drop(slot);
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.request_timeout) => tracing::warn!("HTTP: connections still open at shutdown were dropped"),
    }
}

/// Over the connection cap: a short `503` and close, without reading the request.
async fn refuse(mut stream: TcpStream, cap: usize) {
    tracing::warn!("HTTP: {cap} connections open, the most allowed; refusing one more");
    let body = format!("{{\"error\":\"the gateway has {cap} connections open, the most it accepts; try again\",\"code\":\"too_many_connections\"}}");
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The client's address, as the accept loop saw it.
pub fn peer(ext: &axum::http::Extensions) -> Option<SocketAddr> {
    ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}
