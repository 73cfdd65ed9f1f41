//! Settled at most once; put back when dropped unsettled.

use eventos_core::{Acker, DeliveryInfo, Event, Outcome, TransportError, TransportErrorKind};
use futures::future::BoxFuture;

use crate::pull::Permit;

/// What a transport does to settle one delivery, or to give it back.
pub trait Settle: Send + 'static {
    /// Carries out `outcome`. Called at most once.
    fn settle(
        self,
        event: &Event,
        info: &DeliveryInfo,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>>;

    /// The delivery was dropped unsettled (its handler's task aborted, the
    /// process shutting down): make the event deliverable again, now.
    /// Must not block; it runs inside a `Drop`.
    fn unsettled(self);
}

/// An [`Acker`] over a [`Settle`]: the contract's "exactly once, never
/// lost" in one place. The first settlement runs; a second one is refused
/// with [`already_settled`]; a drop without settlement calls
/// [`Settle::unsettled`]. Either way the delivery's prefetch [`Permit`], if
/// it holds one, is released first, so the consumer may take the next one
/// while this settlement is still being written.
pub struct OnceAcker<S: Settle> {
    settle: Option<S>,
    permit: Option<Permit>,
}

impl<S: Settle> OnceAcker<S> {
    /// An acker holding no prefetch permit (the broker counts for itself).
    pub fn new(settle: S) -> Self {
        Self {
            settle: Some(settle),
            permit: None,
        }
    }

    /// An acker that releases `permit` when settled or dropped.
    pub fn with_permit(settle: S, permit: Permit) -> Self {
        Self {
            settle: Some(settle),
            permit: Some(permit),
        }
    }
}

/// The error for a delivery settled twice.
pub fn already_settled() -> TransportError {
    TransportError::new(TransportErrorKind::Settled, "delivery already settled")
}

impl<S: Settle> Acker for OnceAcker<S> {
    fn settle(
        mut self: Box<Self>,
        event: &Event,
        info: &DeliveryInfo,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        let Some(settle) = self.settle.take() else {
            return Box::pin(std::future::ready(Err(already_settled())));
        };
        drop(self.permit.take());
        settle.settle(event, info, outcome)
    }
}

impl<S: Settle> Drop for OnceAcker<S> {
    fn drop(&mut self) {
        if let Some(settle) = self.settle.take() {
            drop(self.permit.take());
            settle.unsettled();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::pull::Prefetch;

    /// Records what happened to it.
    struct Probe(Arc<Mutex<Vec<&'static str>>>);

    impl Settle for Probe {
        fn settle(
            self,
            _: &Event,
            _: &DeliveryInfo,
            outcome: Outcome,
        ) -> BoxFuture<'static, Result<(), TransportError>> {
            self.0.lock().unwrap().push(outcome.label());
            Box::pin(std::future::ready(Ok(())))
        }

        fn unsettled(self) {
            self.0.lock().unwrap().push("unsettled");
        }
    }

    fn info() -> DeliveryInfo {
        DeliveryInfo {
            topic: "t".into(),
            group: "g".into(),
            attempt: 1,
        }
    }

    #[tokio::test]
    async fn settles_once_refuses_the_second_and_puts_back_a_dropped_one() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let wake = Arc::new(tokio::sync::Notify::new());
        let prefetch = Prefetch::new(1, wake);
        let event = Event::builder("/test", "x").build().unwrap();

        let acker = OnceAcker::with_permit(Probe(seen.clone()), prefetch.acquire());
        assert!(prefetch.is_full());
        let delivery =
            eventos_core::Delivery::new(Arc::new(event.clone()), info(), Box::new(acker));
        delivery.ack().await.unwrap();
        assert!(!prefetch.is_full(), "settling released the permit");

        let acker = OnceAcker::with_permit(Probe(seen.clone()), prefetch.acquire());
        drop(acker);
        assert!(!prefetch.is_full(), "dropping released the permit");

        // The contract's Acker is consumed by `settle`, so a second
        // settlement needs an acker whose settle was taken already.
        let mut twice = Box::new(OnceAcker::new(Probe(seen.clone())));
        drop(twice.settle.take());
        let refused = Acker::settle(twice, &event, &info(), Outcome::Ack).await;
        assert_eq!(refused.unwrap_err().kind(), TransportErrorKind::Settled);

        assert_eq!(*seen.lock().unwrap(), vec!["ack", "unsettled"]);
    }
}
