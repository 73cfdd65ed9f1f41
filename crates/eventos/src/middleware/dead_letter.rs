//! Dead-letter: let the application react when a delivery is given up.
//!
//! The transport moves the event to `<topic>.dlq` when the router settles
//! it; this layer is for the *business* reaction — emit an
//! `…email_failed` event, record a notification — which must happen exactly
//! when, and only when, the event is dead-lettered.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use eventos_core::{DeliveryInfo, Event, Outcome};
use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::middleware::Decided;
use crate::{HandlerError, Message};

/// A delivery that is being dead-lettered.
#[derive(Debug, Clone)]
pub struct DeadLettered {
    /// The event.
    pub event: Arc<Event>,
    /// Topic, group, and the attempt that failed last.
    pub info: DeliveryInfo,
    /// Why it is given up, e.g. `retries exhausted after 5 attempts`.
    pub reason: String,
    /// The last handler error.
    pub error: String,
}

/// Called once for every dead-lettered delivery, inside the delivery's
/// trace context (events it publishes are caused by the failed event).
///
/// If the hook fails, the delivery is retried later so the reaction is not
/// lost; hooks should therefore be idempotent.
pub trait DeadLetterHook: Send + Sync + 'static {
    /// Reacts to `failed`.
    fn on_dead_letter(&self, failed: DeadLettered) -> BoxFuture<'static, Result<(), HandlerError>>;
}

impl<F, Fut> DeadLetterHook for F
where
    F: Fn(DeadLettered) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn on_dead_letter(&self, failed: DeadLettered) -> BoxFuture<'static, Result<(), HandlerError>> {
        Box::pin(self(failed))
    }
}

/// Runs a [`DeadLetterHook`] for deliveries decided to be dead-lettered.
#[derive(Clone)]
pub struct DeadLetterLayer {
    hook: Arc<dyn DeadLetterHook>,
}

impl std::fmt::Debug for DeadLetterLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterLayer").finish_non_exhaustive()
    }
}

impl DeadLetterLayer {
    /// A layer calling `hook`.
    pub fn new(hook: impl DeadLetterHook) -> Self {
        Self {
            hook: Arc::new(hook),
        }
    }
}

impl<S> Layer<S> for DeadLetterLayer {
    type Service = DeadLettering<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DeadLettering {
            inner,
            hook: self.hook.clone(),
        }
    }
}

/// The service of [`DeadLetterLayer`].
#[derive(Clone)]
pub struct DeadLettering<S> {
    inner: S,
    hook: Arc<dyn DeadLetterHook>,
}

impl<S> std::fmt::Debug for DeadLettering<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLettering").finish_non_exhaustive()
    }
}

/// The delay before retrying a delivery whose hook failed: grows with the
/// attempt, at most 30 s.
fn hook_retry_delay(attempt: u32) -> Duration {
    Duration::from_secs(u64::from(attempt.clamp(1, 30)))
}

impl<S> Service<Message> for DeadLettering<S>
where
    S: Service<Message, Response = Decided, Error = HandlerError>,
    S::Future: Send + 'static,
{
    type Response = Decided;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Decided, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let event = msg.event_arc().clone();
        let info = msg.info().clone();
        let hook = self.hook.clone();
        let fut = self.inner.call(msg);
        Box::pin(async move {
            let mut decided = fut.await?;
            let Outcome::DeadLetter(dead_letter) = decided.outcome() else {
                return Ok(decided);
            };
            let failed = DeadLettered {
                event,
                reason: dead_letter.reason.clone(),
                error: decided.error().map(ToString::to_string).unwrap_or_default(),
                info,
            };
            let attempt = failed.info.attempt;
            if let Err(hook_error) = hook.on_dead_letter(failed).await {
                tracing::warn!(
                    error = %hook_error,
                    "dead-letter hook failed; the delivery will be retried so the reaction is not lost"
                );
                decided.retry_instead(hook_retry_delay(attempt));
            }
            Ok(decided)
        })
    }
}
