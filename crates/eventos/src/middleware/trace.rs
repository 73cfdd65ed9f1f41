//! Tracing: one span per delivery, and the causal context for the handler.

use std::task::{Context as TaskContext, Poll};

use futures::future::BoxFuture;
use tower::{Layer, Service};
use tracing::Instrument as _;

use eventos_core::Outcome;

use crate::middleware::Decided;
use crate::{Context, HandlerError, Message};

/// Opens a `delivery` span (topic, group, event id and type, attempt,
/// trace and correlation ids) around each attempt, makes the causal
/// [`Context`] of the event current inside it, and logs the outcome:
/// `debug` on ack, `warn` on retry, `error` on dead-letter.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Trace { inner }
    }
}

/// The service of [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
}

impl<S> Service<Message> for Trace<S>
where
    S: Service<Message, Response = Decided, Error = HandlerError>,
    S::Future: Send + 'static,
{
    type Response = Decided;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Decided, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let ctx = Context::from_event(msg.event());
        let span = tracing::info_span!(
            "delivery",
            topic = %msg.topic(),
            group = %msg.group(),
            event_id = %msg.event().id(),
            event_type = %msg.event().ty(),
            attempt = msg.attempt(),
            trace_id = %ctx.trace_id,
            correlation_id = %ctx.correlation_id,
        );
        let fut = {
            let _entered = span.enter();
            self.inner.call(msg)
        };
        Box::pin(
            ctx.scope(async move {
                let decided = fut.await?;
                let error = decided.error().map(ToString::to_string).unwrap_or_default();
                match decided.outcome() {
                    Outcome::Ack => tracing::debug!("acked"),
                    Outcome::Retry { after } => {
                        tracing::warn!(%error, retry_in = ?after, "handler failed; will retry");
                    }
                    Outcome::DeadLetter(dl) => {
                        tracing::error!(%error, reason = %dl.reason, "handler failed; dead-lettering");
                    }
                }
                Ok(decided)
            })
            .instrument(span),
        )
    }
}
