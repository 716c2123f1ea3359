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
    /// Anonymous calls per second and client address to the routes that reach the node
    /// (`proof`, `proof.ots`, `verify`), with bursts of twice that; 0 = no limit
    /// (`[gateway] http_anonymous_per_sec`, default 20). The admin token is never limited.
    pub anonymous_per_sec: u32,
    /// Limit loopback clients too (`http_rate_limit_loopback`, default false: local tools
    /// and tests are the operator's own). Behind a reverse proxy on the same host every
    /// client is loopback: set it, or limit in the proxy.
    pub limit_loopback: bool,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            anonymous_per_sec: 20,
            limit_loopback: false,
        }
    }
}

/// Token buckets per client address ([`HttpLimits::anonymous_per_sec`]).
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    loopback: bool,
    buckets: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (f64, std::time::Instant)>>,
}

/// Client addresses remembered at most; idle ones are forgotten first.
const MAX_CLIENTS: usize = 65_536;

impl RateLimiter {
    pub fn new(limits: &HttpLimits) -> RateLimiter {
        let per_sec = f64::from(limits.anonymous_per_sec);
        RateLimiter { per_sec, burst: (2.0 * per_sec).max(1.0), loopback: limits.limit_loopback, buckets: Default::default() }
    }

    /// Take a token for `ip`: `Err(wait)` when its bucket is empty, with the time until
    /// the next token.
    pub fn check(&self, ip: std::net::IpAddr) -> Result<(), Duration> {
        if self.per_sec == 0.0 || (ip.is_loopback() && !self.loopback) {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= MAX_CLIENTS && !b.contains_key(&ip) {
            // A full bucket is a client idle for burst/rate seconds: forgetting it changes nothing.
            let full = Duration::from_secs_f64(self.burst / self.per_sec);
            b.retain(|_, (_, t)| now.duration_since(*t) < full);
            if b.len() >= MAX_CLIENTS {
                return Err(Duration::from_secs(1)); // too many clients at once: everyone waits
            }
        }
        let (tokens, at) = b.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_sec))
        }
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
    let secs = limits.request_timeout.as_secs_f64();
    let app = app
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.request_timeout))
        // The timeout answers with an empty body: give it the API's `{error, code}` form.
        .layer(axum::middleware::map_response(move |r: axum::response::Response| async move {
            if r.status() == StatusCode::REQUEST_TIMEOUT && !r.headers().contains_key(axum::http::header::CONTENT_TYPE) {
                let body =
                    serde_json::json!({ "error": format!("the request was not complete within {secs} s"), "code": "request_timeout" });
                return axum::response::IntoResponse::into_response((StatusCode::REQUEST_TIMEOUT, axum::Json(body)));
            }
            r
        }));
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
    let body = format!(
        "{{\"error\":\"the gateway has {cap} connections open, the most it accepts; try again\",\"code\":\"too_many_connections\"}}"
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn a_client_gets_its_burst_then_its_rate_and_others_are_not_affected() {
        let l = RateLimiter::new(&HttpLimits { anonymous_per_sec: 5, ..Default::default() });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..10 {
            assert!(l.check(a).is_ok());
        }
        let wait = l.check(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200), "{wait:?}");
        assert!(l.check(b).is_ok(), "another client has its own bucket");
        std::thread::sleep(Duration::from_millis(250));
        assert!(l.check(a).is_ok(), "a token came back after 1/rate");
    }

    #[test]
    fn loopback_and_zero_are_not_limited_unless_asked() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let free = RateLimiter::new(&HttpLimits { anonymous_per_sec: 1, ..Default::default() });
        assert!((0..100).all(|_| free.check(lo).is_ok()));
        let strict = RateLimiter::new(&HttpLimits { anonymous_per_sec: 1, limit_loopback: true, ..Default::default() });
        assert!(strict.check(lo).is_ok() && strict.check(lo).is_ok());
        assert!(strict.check(lo).is_err());
        let off = RateLimiter::new(&HttpLimits { anonymous_per_sec: 0, limit_loopback: true, ..Default::default() });
        assert!((0..100).all(|_| off.check(lo).is_ok()));
    }
}
