//! eventos: asynchronous events for microservices.
//!
//! A service answers its caller at once and emits an event; other services
//! consume it through a [`Router`]. This crate is the router, its
//! middleware and the facade most applications depend on; the envelope and
//! the transport contract live in [`eventos_core`] (re-exported here), and
//! each transport in its own crate.
//!
//! # The decisions that shaped it
//!
//! * **Handlers are tower services; middleware are tower layers.** A handler
//!   is a `Service<Message, Response = (), Error = HandlerError>`; retry,
//!   dead-letter, timeout, catch-panic, tracing and metrics are
//!   [`Layer`](tower::Layer)s ([`middleware`]), so any tower layer fits too.
//!   There is no second middleware system.
//! * **Handlers never ack.** A handler returns `Ok` or a [`HandlerError`]
//!   that says transient or permanent; the middleware classify it and the
//!   router settles every delivery with exactly one
//!   [`Outcome`](eventos_core::Outcome), computed once as a
//!   [`Decided`](middleware::Decided).
//! * **Retries are stored, not slept.** The retry layer picks a delay
//!   ([`Backoff`]: exponential, full jitter, capped) and the transport
//!   redelivers after it, so a retry survives a restart where the transport
//!   is persistent, and a worker never idles on a sleep.
//! * **Causality travels with the work.** While a handler runs, its event's
//!   correlation id, id (as causation) and trace are the current
//!   [`Context`]; [`Bus`] stamps them onto every event it publishes.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use eventos::{typed, Bus, HandlerError, Message, Route, Router, TypedEvent};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Ping { n: u32 }
//! impl TypedEvent for Ping { const TYPE: &'static str = "example.ping.v1"; }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let transport = Arc::new(eventos_memory::MemoryTransport::new());
//! let bus = Bus::new(transport.clone(), "/example");
//! let (done, mut seen) = tokio::sync::mpsc::unbounded_channel();
//! let router = Router::new(transport).route(Route::new(
//!     "pings",
//!     "printer",
//!     typed(move |ping: Ping, _msg: Message| {
//!         let done = done.clone();
//!         async move {
//!             done.send(ping.n).ok();
//!             Ok::<(), HandlerError>(())
//!         }
//!     }),
//! ));
//! // `start` returns once every route is subscribed; `run(signal)` would
//! // also wait for the signal and drain.
//! let running = router.start().await.unwrap();
//! bus.emit("pings", &Ping { n: 7 }).await.unwrap();
//! assert_eq!(seen.recv().await, Some(7));
//! running.shutdown().await.unwrap();
//! # }
//! ```
//!
//! No feature flags.

mod backoff;
mod bus;
mod context;
mod error;
mod handler;
mod message;
pub mod middleware;
mod router;

pub use backoff::Backoff;
pub use bus::{Bus, PublishError};
pub use context::Context;
pub use error::{BoxError, ErrorKind, HandlerError, ResultExt};
pub use handler::{Typed, handler_fn, typed, typed_with};
pub use message::Message;
pub use router::{
    BoxHandler, Route, Router, RouterError, RouterStats, RunningRouter, StatsSnapshot,
};

pub use eventos_core::{
    self as core, Capabilities, DeadLetter, Delivery, DeliveryInfo, Event, EventError,
    ExtensionValue, Outcome, Publisher, StartFrom, Subscriber, Subscription, Transport,
    TransportError, TransportErrorKind, TypedEvent, dead_letter_topic, ext, redact_url,
};

/// Completes on Ctrl-C or, on Unix, SIGTERM: the usual trigger for
/// [`Router::run`]'s graceful shutdown.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
