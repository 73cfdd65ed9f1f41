//! Retry: decide, after a failure, whether and when to try again.
//!
//! The layer never sleeps: it annotates the error with a delay and the
//! router settles the delivery as [`Outcome::Retry`](eventos_core::Outcome),
//! so the transport stores the retry and the worker is free meanwhile.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use eventos_core::DeliveryInfo;
use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::{Backoff, HandlerError, Message};

/// Decides whether a failed attempt is retried, and after how long.
pub trait RetryPolicy: Send + Sync + 'static {
    /// `Some(delay)` to retry after `delay`; `None` to give up. Called only
    /// for transient errors: permanent ones are never retried.
    fn retry(&self, info: &DeliveryInfo, error: &HandlerError) -> Option<Duration>;
}

impl RetryPolicy for Backoff {
    fn retry(&self, info: &DeliveryInfo, _error: &HandlerError) -> Option<Duration> {
        self.delay(info.attempt, &mut rand::rng())
    }
}

/// Applies a [`RetryPolicy`] to every failure.
#[derive(Clone)]
pub struct RetryLayer {
    policy: Arc<dyn RetryPolicy>,
}

impl std::fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer").finish_non_exhaustive()
    }
}

impl RetryLayer {
    /// A layer applying `policy`.
    pub fn new(policy: impl RetryPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service of [`RetryLayer`].
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    policy: Arc<dyn RetryPolicy>,
}

impl<S> std::fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry").finish_non_exhaustive()
    }
}

impl<S> Service<Message> for Retry<S>
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
        let info = msg.info().clone();
        let policy = self.policy.clone();
        let fut = self.inner.call(msg);
        Box::pin(async move {
            let Err(mut error) = fut.await else {
                return Ok(());
            };
            classify(policy.as_ref(), &info, &mut error);
            Err(error)
        })
    }
}

fn classify(policy: &dyn RetryPolicy, info: &DeliveryInfo, error: &mut HandlerError) {
    if !error.is_transient() {
        error.set_retry_after(None);
        error.set_reason(format!("permanent error on attempt {}", info.attempt));
        return;
    }
    match policy.retry(info, error) {
        Some(delay) => error.set_retry_after(Some(delay)),
        None => {
            error.set_retry_after(None);
            error.set_reason(format!("retries exhausted after {} attempts", info.attempt));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policy_is_object_safe() {
        fn assert_object_safe(_: &dyn RetryPolicy) {}
        assert_object_safe(&Backoff::default());
    }
}
