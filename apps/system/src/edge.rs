//! The HTTP edge: the accept loop and the limits every request passes
//! before it reaches a service.
//!
//! `axum::serve` has no timeouts and no limits, so a client that sends
//! headers slowly, announces a body it never sends or just holds sockets
//! open keeps them forever, and a few thousand such sockets exhaust the
//! process's open files. Here each connection is served by hyper's HTTP/1
//! connection builder with a header timeout, and the service is axum behind
//! tower layers:
//!
//! ```text
//! accept ─ connection cap (else 503 and close) ─ hyper (header/idle timeout)
//!   ─ HandleError (503 / 408 problems) ─ LoadShed ─ ConcurrencyLimit
//!   ─ Timeout (whole request) ─ RequestBodyTimeout (pauses in a body)
//!   ─ axum (413 from Content-Length, then the services)
//! ```
//!
//! Shutdown stops accepting, ends the event streams, asks every connection
//! to close once its request is answered (idle ones close at once), and
//! drops whatever is still open at the deadline.

use std::sync::Arc;
use std::time::Duration;

use axum::BoxError;
use axum::error_handling::HandleErrorLayer;
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse as _, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use school_http::{Problem, SseStreams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::{ServiceBuilder, ServiceExt as _};

use crate::HttpSettings;

/// Seconds a client refused for load is told to wait.
const RETRY_AFTER_SECS: u32 = 1;

/// Connections over the cap that are answered (503, then closed) at once;
/// beyond these, a connection over the cap is closed without an answer, so
/// that a flood cannot turn refusals into a new way of holding sockets.
const REFUSALS_AT_ONCE: usize = 128;

/// How long a refused connection is kept to deliver its 503: short, so
/// that the refusals at once are free again for the next ones.
const REFUSAL_TIMEOUT: Duration = Duration::from_millis(200);

/// The limits, checked, as the edge uses them.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    header_timeout: Duration,
    body_timeout: Duration,
    request_timeout: Duration,
    max_connections: usize,
    max_requests: usize,
}

impl Limits {
    pub(crate) fn new(s: &HttpSettings) -> anyhow::Result<Self> {
        let positive = |name: &str, v: u64| {
            anyhow::ensure!(v > 0, "http.{name} is 0; set it to at least 1");
            Ok(())
        };
        positive("header_timeout_ms", s.header_timeout_ms)?;
        positive("body_timeout_ms", s.body_timeout_ms)?;
        positive("request_timeout_ms", s.request_timeout_ms)?;
        positive("max_connections", s.max_connections as u64)?;
        positive("max_requests", s.max_requests as u64)?;
        positive("sse_per_client", s.sse_per_client as u64)?;
        positive("sse_max_streams", s.sse_max_streams as u64)?;
        positive("sse_keep_alive_ms", s.sse_keep_alive_ms)?;
        Ok(Self {
            header_timeout: Duration::from_millis(s.header_timeout_ms),
            body_timeout: Duration::from_millis(s.body_timeout_ms),
            request_timeout: Duration::from_millis(s.request_timeout_ms),
            max_connections: s.max_connections.min(Semaphore::MAX_PERMITS),
            max_requests: s.max_requests.min(Semaphore::MAX_PERMITS),
        })
    }
}

/// Serves `app` on `listener` until `stop`, then closes every connection
/// within `deadline`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    sse: SseStreams,
    stop: CancellationToken,
    deadline: Duration,
) {
    let max_requests = limits.max_requests;
    let request_timeout = limits.request_timeout;
    let service = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(refusals(
            max_requests,
            request_timeout,
        )))
        .load_shed()
        .concurrency_limit(limits.max_requests)
        .timeout(limits.request_timeout)
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.body_timeout,
        ))
        .service(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let http = Arc::new(http);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let full = Arc::new(full_answer(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (socket, remote) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, mostly: wait for some to
                        // be given back instead of spinning.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                        let full = full.clone();
                        connections.spawn(async move {
                            refuse(socket, &full).await;
                            drop(refusal);
                        });
                    }
                    continue;
                };
                let _ = socket.set_nodelay(true);
                detect_dead_peers(&socket);
                let service = TowerToHyperService::new(service.clone().map_request(
                    move |mut request: axum::http::Request<hyper::body::Incoming>| {
                        request.extensions_mut().insert(ConnectInfo(remote));
                        request
                    },
                ));
                let http = http.clone();
                let stop = stop.clone();
                connections.spawn(async move {
                    let connection = http.serve_connection(TokioIo::new(socket), service);
                    let mut connection = std::pin::pin!(connection);
                    let served = tokio::select! {
                        served = connection.as_mut() => served,
                        () = stop.cancelled() => {
                            connection.as_mut().graceful_shutdown();
                            connection.await
                        }
                    };
                    if let Err(e) = served {
                        tracing::debug!(error = %e, %remote, "http connection ended");
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    sse.close_all();
    let closed = tokio::time::timeout(deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if closed.is_err() {
        tracing::warn!(
            open = connections.len(),
            "http connections still open at the shutdown deadline were dropped"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// A named signature: a closure written in place is inferred as generic
/// over the error's lifetime, which the spawned connection cannot hold.
fn refusals(
    max_requests: usize,
    request_timeout: Duration,
) -> impl Fn(BoxError) -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    move |e| std::future::ready(refusal(&e, max_requests, request_timeout))
}

/// The problem for a request a layer refused.
fn refusal(e: &BoxError, max_requests: usize, request_timeout: Duration) -> Response {
    if e.is::<tower::load_shed::error::Overloaded>() {
        Problem::unavailable(format!(
            "the server is answering its limit of {max_requests} requests at once; retry in a second"
        ))
        .retry_after(RETRY_AFTER_SECS)
        .into_response()
    } else if e.is::<tower::timeout::error::Elapsed>() {
        Problem::unavailable(format!(
            "the request was not answered within {} ms; retry in a moment",
            request_timeout.as_millis()
        ))
        .retry_after(RETRY_AFTER_SECS)
        .into_response()
    } else {
        tracing::warn!(error = %e, "a request failed in the http edge");
        Problem::unavailable("the request could not be served; retry in a moment")
            .retry_after(RETRY_AFTER_SECS)
            .into_response()
    }
}

/// The whole HTTP answer to a connection over the cap, written before its
/// request is read: there is no connection to read it on.
fn full_answer(max_connections: usize) -> Vec<u8> {
    let problem = Problem::unavailable(format!(
        "the server holds its limit of {max_connections} connections; retry in a second"
    ));
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let mut answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\nretry-after: {RETRY_AFTER_SECS}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        school_http::PROBLEM_CONTENT_TYPE,
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    answer
}

/// A client that vanishes without closing (its network gone) sends no FIN:
/// an event stream to it would go on filling the kernel's buffer, and an
/// idle keep-alive connection would hold its slot, until the kernel gives
/// up after many minutes. Keepalive probes (after 30 s idle, every 10 s,
/// 3 unanswered) and a 60 s limit on unacknowledged data close it within
/// about a minute.
fn detect_dead_peers(socket: &TcpStream) {
    let sock = socket2::SockRef::from(socket);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on a connection");
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = sock.set_tcp_user_timeout(Some(Duration::from_secs(60))) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT on a connection");
    }
}

async fn refuse(mut socket: TcpStream, answer: &[u8]) {
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        socket.write_all(answer).await?;
        socket.shutdown().await?;
        // Read until the client closes: closing with its request unread
        // would reset the connection and could discard the answer before
        // the client reads it.
        let mut sink = [0u8; 1024];
        while socket.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_problem_answer() {
        let answer = String::from_utf8(full_answer(20)).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("retry-after: 1"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["status"], 503);
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("20 connections")
        );
    }
}
