//! Pull-based delivery streams, bounded by the prefetch.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use eventos_core::{Delivery, DeliveryStream, TransportError};
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lifecycle::Lifecycle;

/// How many unsettled deliveries one subscriber holds, against its
/// prefetch. Each delivery handed out holds a [`Permit`]; releasing the
/// one that made the count full wakes `wake` (the group's notify, which
/// the subscriber waits on), so a subscriber at its limit resumes as soon
/// as it may.
#[derive(Debug, Clone)]
pub struct Prefetch {
    held: Arc<AtomicUsize>,
    limit: usize,
    wake: Arc<Notify>,
}

impl Prefetch {
    /// A limit of `limit` (at least 1) unsettled deliveries.
    pub fn new(limit: usize, wake: Arc<Notify>) -> Self {
        Self {
            held: Arc::new(AtomicUsize::new(0)),
            limit: limit.max(1),
            wake,
        }
    }

    /// Whether the subscriber holds as many as it may.
    pub fn is_full(&self) -> bool {
        self.held.load(Ordering::Acquire) >= self.limit
    }

    /// How many more deliveries the subscriber may hold now: what a
    /// transport that asks its broker for deliveries asks for.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.held.load(Ordering::Acquire))
    }

    /// The most deliveries the subscriber may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts one more delivery held. Call it with the delivery in hand,
    /// after [`Prefetch::is_full`] said no: a permit taken and dropped
    /// unused would wake the subscriber for nothing.
    pub fn acquire(&self) -> Permit {
        self.held.fetch_add(1, Ordering::AcqRel);
        Permit {
            prefetch: self.clone(),
        }
    }
}

/// One delivery's share of the prefetch; released when dropped.
#[derive(Debug)]
pub struct Permit {
    prefetch: Prefetch,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let before = self.prefetch.held.fetch_sub(1, Ordering::AcqRel);
        if before >= self.prefetch.limit {
            self.prefetch.wake.notify_waiters();
        }
    }
}

/// What a subscriber found when it looked at its group once.
#[derive(Debug)]
pub enum Step {
    /// A delivery, holding a [`Permit`] of the subscriber's prefetch.
    Deliver(Delivery),
    /// A failure to report; the stream goes on after it.
    Fail(TransportError),
    /// Work was done (a chunk read into the group): look again at once.
    Again,
    /// Nothing to hand out: wait for the group's notify, or until the
    /// deadline (a retry or a lease coming due).
    Wait(Option<Instant>),
}

/// What a subscriber waits on: its transport's lifecycle (the stream ends
/// once it is closed; the transport wakes every group when it closes), and
/// its prefetch, whose notify is the group's (woken whenever the group
/// changes: a publish, a settlement).
#[derive(Debug, Clone, Copy)]
pub struct Gate<'a> {
    lifecycle: &'a Lifecycle,
    prefetch: &'a Prefetch,
}

impl<'a> Gate<'a> {
    /// The gate of a subscriber with `prefetch`, on a transport with
    /// `lifecycle`.
    pub fn new(lifecycle: &'a Lifecycle, prefetch: &'a Prefetch) -> Self {
        Self {
            lifecycle,
            prefetch,
        }
    }
}

/// A subscriber that hands out deliveries when asked.
pub trait Pull: Send + Sync + 'static {
    /// What it waits on.
    fn gate(&self) -> Gate<'_>;
    /// Looks at the group once, under its lock, without waiting. Called
    /// only while the prefetch has room.
    fn step(&self) -> Step;
}

/// The next delivery of `source`, or `None` once its transport closed.
///
/// Cancel-safe: it holds nothing across an await but its registration
/// with the group's notify, which it takes before it looks, so a change
/// between the look and the wait still wakes it.
pub async fn pull<P: Pull + ?Sized>(source: &P) -> Option<Result<Delivery, TransportError>> {
    let gate = source.gate();
    loop {
        let notified = gate.prefetch.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if gate.lifecycle.is_closed() {
            return None;
        }
        if gate.prefetch.is_full() {
            notified.await;
            continue;
        }
        match source.step() {
            Step::Deliver(delivery) => return Some(Ok(delivery)),
            Step::Fail(error) => return Some(Err(error)),
            Step::Again => {}
            Step::Wait(Some(deadline)) => {
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(deadline) => {}
                }
            }
            Step::Wait(None) => notified.await,
        }
    }
}

/// The contract's [`DeliveryStream`] over `source`.
pub fn pull_stream<P: Pull>(source: P) -> DeliveryStream {
    fn next<P: Pull>(
        source: P,
    ) -> BoxFuture<'static, Option<(Result<Delivery, TransportError>, P)>> {
        Box::pin(async move {
            let item = pull(&source).await?;
            Some((item, source))
        })
    }
    Box::pin(futures::stream::unfold(source, next))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use eventos_core::{DeliveryInfo, Event, Outcome};
    use futures::StreamExt;

    use super::*;
    use crate::acker::{OnceAcker, Settle};

    struct Ack;
    impl Settle for Ack {
        fn settle(
            self,
            _: &Event,
            _: &DeliveryInfo,
            _: Outcome,
        ) -> BoxFuture<'static, Result<(), TransportError>> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn unsettled(self) {}
    }

    /// A queue of events behind a lock.
    struct Source {
        lifecycle: Arc<Lifecycle>,
        prefetch: Prefetch,
        queue: Arc<Mutex<Vec<Event>>>,
    }

    impl Pull for Source {
        fn gate(&self) -> Gate<'_> {
            Gate::new(&self.lifecycle, &self.prefetch)
        }
        fn step(&self) -> Step {
            match self.queue.lock().unwrap().pop() {
                Some(event) => {
                    let acker = OnceAcker::with_permit(Ack, self.prefetch.acquire());
                    let info = DeliveryInfo {
                        topic: "t".into(),
                        group: "g".into(),
                        attempt: 1,
                    };
                    Step::Deliver(Delivery::new(Arc::new(event), info, Box::new(acker)))
                }
                None => Step::Wait(None),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn holds_no_more_than_the_prefetch_and_resumes_on_a_settlement() {
        let wake = Arc::new(Notify::new());
        let lifecycle = Arc::new(Lifecycle::new());
        let queue = Arc::new(Mutex::new(
            (0..3)
                .map(|_| Event::builder("/test", "x").build().unwrap())
                .collect::<Vec<_>>(),
        ));
        let mut stream = pull_stream(Source {
            lifecycle: lifecycle.clone(),
            prefetch: Prefetch::new(2, wake.clone()),
            queue: queue.clone(),
        });
        let first = stream.next().await.unwrap().unwrap();
        let _second = stream.next().await.unwrap().unwrap();
        // At the limit: the third waits although it is there.
        let third = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
        assert!(third.is_err(), "a third delivery beyond a prefetch of 2");
        assert_eq!(queue.lock().unwrap().len(), 1, "and it was not taken");
        first.ack().await.unwrap();
        let third = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
        assert!(
            matches!(third, Ok(Some(Ok(_)))),
            "resumed by the settlement"
        );
        lifecycle.close();
        wake.notify_waiters();
        assert!(stream.next().await.is_none(), "the stream ends at close");
    }
}
