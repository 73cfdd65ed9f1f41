//! Catch-panic: a panicking handler is a failed attempt, not a dead worker.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::task::{Context, Poll};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::{HandlerError, Message};

/// The error of an attempt whose handler panicked.
#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {0}")]
pub struct Panicked(pub String);

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Turns a panic — in `call` or while polling the handler's future — into a
/// transient [`HandlerError`]: a panic may come from a transient state
/// (a poisoned connection, a race), so it is retried like any failure and
/// dead-lettered if it keeps happening.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatchPanicLayer;

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic { inner }
    }
}

/// The service of [`CatchPanicLayer`].
#[derive(Debug, Clone)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S> Service<Message> for CatchPanic<S>
where
    S: Service<Message, Response = (), Error = HandlerError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<(), HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        // Unwind safety: after a panic the message is dropped and the
        // service is only used again through `call`, whose state a handler
        // must not leave half-updated across an await anyway; tower's own
        // catch-panic layer makes the same trade.
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(msg))) {
            Ok(fut) => Box::pin(async move {
                match AssertUnwindSafe(fut).catch_unwind().await {
                    Ok(result) => result,
                    Err(payload) => Err(HandlerError::transient(Panicked(panic_message(
                        payload.as_ref(),
                    )))),
                }
            }),
            Err(payload) => Box::pin(std::future::ready(Err(HandlerError::transient(Panicked(
                panic_message(payload.as_ref()),
            ))))),
        }
    }
}
