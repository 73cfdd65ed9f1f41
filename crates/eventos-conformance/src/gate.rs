//! Restarting a shared broker while other cases run on it.
//!
//! Cases run in parallel on one broker. Each transport survives a restart
//! (it reconnects), but the suite's strict no-duplicate checks would then
//! see the redeliveries at-least-once allows. So a harness that restarts
//! its broker opens every transport through a [`RestartGate`]: a restart
//! holds back cases that have not opened their transport yet and waits,
//! for a bounded time, for the running ones to close theirs.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use eventos_core::{
    Capabilities, DeliveryStream, Event, GroupCounts, Publisher, Subscriber, Subscription,
    Transport, TransportError,
};
use futures::future::BoxFuture;
use tokio::sync::{Mutex, RwLock};

/// Counts the transports open on a broker and keeps restarts apart from
/// them. One per harness, in a `static`.
pub struct RestartGate {
    open: AtomicUsize,
    gate: RwLock<()>,
    restart: Mutex<()>,
}

impl Default for RestartGate {
    fn default() -> Self {
        Self::new()
    }
}

impl RestartGate {
    /// A gate with nothing open.
    pub const fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            gate: RwLock::const_new(()),
            restart: Mutex::const_new(()),
        }
    }

    /// Opens a transport with `open`, unless a restart is under way (then
    /// after it), and counts it until it is closed or dropped. `watch` sees
    /// every subscription first (to note what a run declared, say).
    pub async fn open<T, F>(
        &'static self,
        open: F,
        watch: fn(&T, &Subscription),
    ) -> Arc<dyn Transport>
    where
        T: Transport + 'static,
        F: Future<Output = T>,
    {
        let _gate = self.gate.read().await;
        let inner = open.await;
        self.open.fetch_add(1, Ordering::AcqRel);
        Arc::new(Counted {
            inner,
            gate: self,
            counted: AtomicBool::new(true),
            watch,
        })
    }

    /// Runs `restart` (blocking: a script, a CLI) once no transport but the
    /// restarting case's own is open, or after `quiet_wait`; one restart at
    /// a time, and no transport opens meanwhile.
    pub async fn restart(&'static self, quiet_wait: Duration, restart: fn()) {
        let _one_at_a_time = self.restart.lock().await;
        let _gate = self.gate.write().await;
        let deadline = tokio::time::Instant::now() + quiet_wait;
        while self.open.load(Ordering::Acquire) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::task::spawn_blocking(restart)
            .await
            .expect("the restart panicked");
    }
}

/// A transport counted as open on its gate until closed or dropped.
struct Counted<T: Transport> {
    inner: T,
    gate: &'static RestartGate,
    counted: AtomicBool,
    watch: fn(&T, &Subscription),
}

impl<T: Transport> Counted<T> {
    fn uncount(&self) {
        if self.counted.swap(false, Ordering::AcqRel) {
            self.gate.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<T: Transport> Drop for Counted<T> {
    fn drop(&mut self) {
        self.uncount();
    }
}

impl<T: Transport> Publisher for Counted<T> {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        self.inner.publish(topic, events)
    }
}

impl<T: Transport> Subscriber for Counted<T> {
    fn subscribe(
        &self,
        subscription: Subscription,
    ) -> BoxFuture<'_, Result<DeliveryStream, TransportError>> {
        (self.watch)(&self.inner, &subscription);
        self.inner.subscribe(subscription)
    }
}

impl<T: Transport> Transport for Counted<T> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let result = self.inner.close().await;
            self.uncount();
            result
        })
    }

    fn group_counts<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<GroupCounts>, TransportError>> {
        self.inner.group_counts(topic, group)
    }

    fn dead_letters<'a>(
        &'a self,
        topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, TransportError>> {
        self.inner.dead_letters(topic, limit)
    }

    fn dead_letter<'a>(
        &'a self,
        topic: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Event>, TransportError>> {
        self.inner.dead_letter(topic, id)
    }
}
