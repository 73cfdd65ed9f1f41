//! The middleware: tower layers around a handler.
//!
//! The layers inside the decision (retry and below, yours included) wrap a
//! `Service<Message, Response = (), Error = HandlerError>` and are one
//! themselves, so they compose with each other and with any tower layer
//! that does not change the request type; the layers above it see a
//! [`Decided`]. A [`Route`](crate::Route)
//! assembles the standard stack in this order, outermost first:
//!
//! | layer | why it sits there |
//! |---|---|
//! | [`MetricsLayer`] | counts the *final* outcome and the whole latency |
//! | [`TraceLayer`] | one span per delivery; sets the causal [`Context`](crate::Context) for everything inside, hooks included |
//! | [`DeadLetterLayer`] | sees only failures the retry layer gave up on |
//! | [`RetryLayer`] | classifies every failure: retry after a delay, or give up with a reason |
//! | [`CircuitBreakerLayer`] (opt-in) | sees each attempt's own result; while open, keeps the route from taking deliveries |
//! | [`TimeoutLayer`] | a slow attempt is a transient failure the retry layer can retry |
//! | [`CatchPanicLayer`] | a panic becomes a failure before anything else sees it |
//! | your layers ([`Route::layer`](crate::Route::layer)) | closest to the handler |
//!
//! The router waits for the stack to be ready (`poll_ready`) before it
//! takes a delivery from the transport, so a layer that is not ready — the
//! circuit breaker while open — pauses the route without holding events.
//!
//! Concurrency is limited by the router itself ([`Route::concurrency`](crate::Route::concurrency)),
//! before a delivery is taken from the transport, so a busy route never
//! holds deliveries it cannot start.

mod catch_panic;
mod circuit_breaker;
mod dead_letter;
mod decide;
mod metrics;
mod retry;
mod timeout;
mod trace;

pub use catch_panic::{CatchPanic, CatchPanicLayer, Panicked};
pub use circuit_breaker::{Breaker, CircuitBreaker, CircuitBreakerLayer};
pub use dead_letter::{DeadLetterHook, DeadLetterLayer, DeadLettered, DeadLettering};
pub(crate) use decide::DecideLayer;
pub use decide::Decided;
pub use metrics::{Metrics, MetricsLayer};
pub use retry::{Retry, RetryLayer, RetryPolicy};
pub use timeout::{TimedOut, Timeout, TimeoutLayer};
pub use trace::{Trace, TraceLayer};
