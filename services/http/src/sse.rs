//! Server-sent event streams with bounds: how many one client and all
//! clients may hold open, pings that find a client gone, and an end on
//! shutdown.
//!
//! A stream is a `Stream` of events built straight from what it follows
//! (a broadcast receiver, a backlog) and owned by the response body, never
//! a spawned task feeding a channel: when the connection goes, hyper drops
//! the body and with it the receiver and the stream's [`SsePermit`]. A
//! client that vanishes without closing is found by the keep-alive ping,
//! whose write fails, rather than by the next event, which may never come.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;

use crate::Problem;

/// How many streams may be open, and how often an idle one is pinged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseLimits {
    /// Streams one client (remote IP address) may hold open at once.
    pub per_client: usize,
    /// Streams all clients together may hold open at once.
    pub total: usize,
    /// How long a stream may stay silent before a ping (an SSE comment)
    /// is written; a client that has gone is found at the ping.
    pub keep_alive: Duration,
}

impl Default for SseLimits {
    fn default() -> Self {
        Self {
            per_client: 8,
            total: 256,
            keep_alive: Duration::from_secs(15),
        }
    }
}

/// The open streams of a process, shared by every endpoint that streams,
/// so the limits hold across them.
#[derive(Debug, Clone, Default)]
pub struct SseStreams {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    limits: SseLimits,
    open: Mutex<Open>,
    closing: CancellationToken,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// One open stream, counted until it is dropped.
#[derive(Debug)]
pub struct SsePermit {
    streams: Arc<Inner>,
    client: Option<IpAddr>,
}

impl Drop for SsePermit {
    fn drop(&mut self) {
        let mut open = self.streams.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(ip) = self.client
            && let Some(n) = open.per_client.get_mut(&ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_client.remove(&ip);
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // The counts stay consistent under every panic: each change is one
        // statement.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Seconds a refused client is told to wait before trying again.
const RETRY_AFTER_SECS: u32 = 5;

impl SseStreams {
    /// Streams bounded by `limits`.
    pub fn new(limits: SseLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                ..Inner::default()
            }),
        }
    }

    /// The limits.
    pub fn limits(&self) -> SseLimits {
        self.inner.limits
    }

    /// Admits one more stream for `client`.
    ///
    /// # Errors
    ///
    /// 429 if the client already holds its share, 503 if all streams are
    /// taken or the server is shutting down; both with `Retry-After`.
    pub fn open(&self, client: ClientIp) -> Result<SsePermit, Problem> {
        if self.inner.closing.is_cancelled() {
            return Err(
                Problem::unavailable("the server is shutting down; reconnect in a moment")
                    .retry_after(RETRY_AFTER_SECS),
            );
        }
        let limits = self.inner.limits;
        let mut open = self.inner.lock();
        if open.total >= limits.total {
            return Err(Problem::unavailable(format!(
                "all {} event streams are taken; retry later",
                limits.total
            ))
            .retry_after(RETRY_AFTER_SECS));
        }
        if let Some(ip) = client.0 {
            let mine = open.per_client.entry(ip).or_default();
            if *mine >= limits.per_client {
                return Err(Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too-many-streams",
                    "Too many event streams",
                    format!(
                        "this client already has {} event streams open; close one before opening another",
                        limits.per_client
                    ),
                )
                .retry_after(RETRY_AFTER_SECS));
            }
            *mine += 1;
        }
        open.total += 1;
        Ok(SsePermit {
            streams: self.inner.clone(),
            client: client.0,
        })
    }

    /// How many streams are open now.
    pub fn live(&self) -> usize {
        self.inner.lock().total
    }

    /// Ends every open stream and refuses new ones: for shutdown, so that
    /// streaming connections finish and close like any other.
    pub fn close_all(&self) {
        self.inner.closing.cancel();
    }

    /// The response for `events`: it holds `permit` while it lasts, pings
    /// at the keep-alive interval and ends at [`close_all`](Self::close_all).
    pub fn respond<S>(
        &self,
        permit: SsePermit,
        events: S,
    ) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<S>>
    where
        S: Stream<Item = Event> + Send + 'static,
    {
        let closing = self.inner.closing.clone().cancelled_owned();
        let events = events.take_until(closing).map(move |event| {
            let _counted = &permit;
            Ok(event)
        });
        Sse::new(events).keep_alive(KeepAlive::new().interval(self.inner.limits.keep_alive))
    }
}

/// The remote IP address of the request's connection, when the server
/// recorded it (`ConnectInfo<SocketAddr>`); never a rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> ClientIp {
        ClientIp(Some(IpAddr::from([127, 0, 0, last])))
    }

    #[test]
    fn limits_per_client_and_in_total_and_permits_give_back() {
        let streams = SseStreams::new(SseLimits {
            per_client: 2,
            total: 3,
            keep_alive: Duration::from_secs(1),
        });
        let a1 = streams.open(ip(1)).unwrap();
        let _a2 = streams.open(ip(1)).unwrap();
        assert_eq!(streams.open(ip(1)).unwrap_err().status, 429);
        let _b1 = streams.open(ip(2)).unwrap();
        let full = streams.open(ip(3)).unwrap_err();
        assert_eq!((full.status, full.retry_after), (503, Some(5)));
        assert_eq!(streams.live(), 3);
        drop(a1);
        assert_eq!(streams.live(), 2);
        let _a3 = streams.open(ip(1)).unwrap();
        streams.close_all();
        assert_eq!(streams.open(ip(4)).unwrap_err().status, 503);
    }
}
