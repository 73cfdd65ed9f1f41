//! Decide: the one place where a handler's result becomes an outcome.

use std::task::{Context, Poll};

use eventos_core::{DeadLetter, Outcome};
use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::{HandlerError, Message};

/// What the stack decided about one delivery: the outcome the router
/// settles it with, and the handler's error if it failed. Computed once,
/// just outside the retry layer, and passed outwards as a value, so the
/// dead-letter hook, the trace, the metrics and the router all act on the
/// same decision.
#[derive(Debug)]
pub struct Decided {
    outcome: Outcome,
    error: Option<HandlerError>,
}

impl Decided {
    /// `Ok` acks. An error the retry layer scheduled is retried after its
    /// delay. Any other error is dead-lettered with the reason the retry
    /// layer gave — or `no retry policy` when the route has none.
    pub(crate) fn from_result(result: Result<(), HandlerError>) -> Self {
        match result {
            Ok(()) => Self {
                outcome: Outcome::Ack,
                error: None,
            },
            Err(e) => {
                let outcome = match e.retry_after() {
                    Some(after) => Outcome::Retry { after },
                    None => Outcome::DeadLetter(DeadLetter {
                        reason: e.reason().unwrap_or("no retry policy").to_owned(),
                        error: Some(error_chain(&e)),
                    }),
                };
                Self {
                    outcome,
                    error: Some(e),
                }
            }
        }
    }

    /// The outcome the delivery is settled with.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    /// The handler's error, if it failed.
    pub fn error(&self) -> Option<&HandlerError> {
        self.error.as_ref()
    }

    /// The outcome, for the settlement.
    pub(crate) fn into_outcome(self) -> Outcome {
        self.outcome
    }

    /// Retried after `after` instead (a dead-letter hook that failed: the
    /// reaction must not be lost).
    pub(crate) fn retry_instead(&mut self, after: std::time::Duration) {
        self.outcome = Outcome::Retry { after };
    }
}

/// `error: cause: cause`, as one line: the error and each source it does
/// not already say.
fn error_chain(e: &HandlerError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e.inner());
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Turns the inner stack's result into a [`Decided`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DecideLayer;

impl<S> Layer<S> for DecideLayer {
    type Service = Decide<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Decide { inner }
    }
}

/// The service of [`DecideLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Decide<S> {
    inner: S,
}

impl<S> Service<Message> for Decide<S>
where
    S: Service<Message, Response = (), Error = HandlerError>,
    S::Future: Send + 'static,
{
    type Response = Decided;
    // Only readiness can fail (and the router backs off); a call always
    // ends in a decision.
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Decided, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let fut = self.inner.call(msg);
        Box::pin(async move { Ok(Decided::from_result(fut.await)) })
    }
}
