//! Open, then closed for good.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use eventos_core::{Event, Subscription, TransportError, check_payloads, validate_name};
use tokio::sync::watch;

/// A transport's open/closed state. Closing is one-way: streams end,
/// publishes and subscriptions are refused with
/// [`TransportError::closed`], and every task waiting on
/// [`Lifecycle::closed`] wakes.
#[derive(Debug)]
pub struct Lifecycle {
    closed: AtomicBool,
    signal: watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// Open.
    pub fn new() -> Self {
        Self {
            closed: AtomicBool::new(false),
            signal: watch::Sender::new(false),
        }
    }

    /// Whether [`Lifecycle::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// `Ok` while open.
    ///
    /// # Errors
    ///
    /// [`TransportError::closed`] once closed.
    pub fn check_open(&self) -> Result<(), TransportError> {
        if self.is_closed() {
            Err(TransportError::closed())
        } else {
            Ok(())
        }
    }

    /// Admits a publish the way every transport does: open, a valid topic
    /// name, every payload within `max` bytes.
    ///
    /// # Errors
    ///
    /// [`TransportError::closed`], or the contract's `InvalidName` and
    /// `Rejected` errors, naming `transport`.
    pub fn check_publish(
        &self,
        transport: &str,
        topic: &str,
        events: &[Event],
        max: usize,
    ) -> Result<(), TransportError> {
        self.check_open()?;
        validate_name("topic", topic)?;
        check_payloads(transport, events, max)
    }

    /// Admits a subscription: open, valid topic and group names.
    ///
    /// # Errors
    ///
    /// [`TransportError::closed`], or the contract's `InvalidName` error.
    pub fn check_subscribe(&self, subscription: &Subscription) -> Result<(), TransportError> {
        self.check_open()?;
        validate_name("topic", &subscription.topic)?;
        validate_name("group", &subscription.group)
    }

    /// Closes; returns whether this call did (closing twice is no error).
    pub fn close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::AcqRel);
        self.signal.send_replace(true);
        first
    }

    /// Resolves once closed (at once if already). Owns what it needs, so a
    /// spawned task can hold it; resolves too if the lifecycle is dropped,
    /// since nothing can use a transport that is gone.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut signal = self.signal.subscribe();
        async move {
            // The guard `wait_for` returns is not `Send`: dropped here.
            let _ = signal.wait_for(|closed| *closed).await.is_ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closing_refuses_wakes_waiters_and_is_idempotent() {
        let lifecycle = std::sync::Arc::new(Lifecycle::new());
        assert!(lifecycle.check_open().is_ok());
        let waiter = tokio::spawn(lifecycle.closed());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(lifecycle.close());
        assert!(!lifecycle.close(), "the second close is not the first");
        waiter.await.unwrap();
        assert_eq!(
            lifecycle.check_open().unwrap_err().kind(),
            eventos_core::TransportErrorKind::Closed
        );
        // Asked after the close: resolves at once.
        lifecycle.closed().await;
    }
}
