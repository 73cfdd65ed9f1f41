//! The in-process transport: every group is a queue in memory.
//!
//! It is the fastest way to run eventos and the one the router's own tests
//! use, and it keeps everything the contract promises *while the process
//! lives*: fan-out across groups, competing consumers inside a group,
//! per-key ordering, stored (not slept) retries, dead-letter topics. It
//! keeps nothing across a restart: whatever is queued when the process dies
//! is lost, which [`Capabilities`] says (`persistent: false`,
//! `durable_publish: false`). Use the embedded log when that matters.
//!
//! # Design
//!
//! A topic fans out to its groups at publish time; a group that does not
//! exist yet has nothing to catch up on (no replay). Inside a group, a
//! delivery holds its `subject` as a key lock: later events with the same
//! subject wait behind it until it is acked or dead-lettered, which is what
//! makes per-key ordering hold with many consumers — a retry keeps the lock,
//! so a key is never overtaken by its own successor. Streams are pull-based,
//! so a consumer never holds work it has not asked for (nor more unsettled
//! deliveries than its prefetch), and an acker dropped
//! unsettled puts its event back at the front of the queue.
//!
//! No feature flags.

use std::cmp::Reverse;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use eventos_core::{
    Acker, Capabilities, Delivery, DeliveryInfo, DeliveryStream, Event, Outcome, Publisher,
    Subscriber, Subscription, Transport, TransportError, TransportErrorKind, check_payloads,
    dead_letter_event, dead_letter_topic, validate_name,
};
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The largest payload accepted by default.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

/// The in-process transport. Cloning shares the same queues.
#[derive(Clone, Debug)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct Inner {
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    closed: AtomicBool,
    max_payload_bytes: usize,
}

#[derive(Debug)]
struct Topic {
    name: Arc<str>,
    groups: Mutex<HashMap<String, Arc<Group>>>,
}

#[derive(Debug)]
struct Group {
    topic: Arc<str>,
    name: Arc<str>,
    state: Mutex<GroupState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct GroupState {
    ready: VecDeque<Entry>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    /// Events waiting for their key to be released, per key, in order.
    blocked: HashMap<String, VecDeque<Entry>>,
    keys_in_flight: HashSet<String>,
    in_flight: usize,
    seq: u64,
}

#[derive(Debug)]
struct Entry {
    event: Arc<Event>,
    attempt: u32,
    /// Whether this entry owns its subject's key lock.
    holds_key: bool,
}

#[derive(Debug)]
struct Delayed {
    due: Instant,
    seq: u64,
    entry: Entry,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// Counts for one group, for dashboards and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupStats {
    /// Deliverable now.
    pub ready: usize,
    /// Waiting for a retry delay.
    pub delayed: usize,
    /// Waiting behind an in-flight event with the same subject.
    pub blocked: usize,
    /// Handed out and not settled.
    pub in_flight: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain queues behind,
    // which stay consistent enough to keep serving; never propagate poison.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MemoryTransport {
    /// An empty transport accepting payloads up to
    /// [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub fn new() -> Self {
        Self::with_max_payload_bytes(DEFAULT_MAX_PAYLOAD_BYTES)
    }

    /// An empty transport with another payload limit.
    pub fn with_max_payload_bytes(max_payload_bytes: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                topics: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
                max_payload_bytes,
            }),
        }
    }

    /// Queue counts of one group, or `None` if it never subscribed.
    pub fn stats(&self, topic: &str, group: &str) -> Option<GroupStats> {
        let topic = lock(&self.inner.topics).get(topic).cloned()?;
        let group = lock(&topic.groups).get(group).cloned()?;
        let st = lock(&group.state);
        Some(GroupStats {
            ready: st.ready.len(),
            delayed: st.delayed.len(),
            blocked: st.blocked.values().map(VecDeque::len).sum(),
            in_flight: st.in_flight,
        })
    }
}

impl Inner {
    fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = lock(&self.topics);
        topics
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Topic {
                    name: name.into(),
                    groups: Mutex::new(HashMap::new()),
                })
            })
            .clone()
    }

    fn check_open(&self) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            Err(TransportError::closed())
        } else {
            Ok(())
        }
    }

    fn publish_now(&self, topic: &str, events: Vec<Event>) -> Result<(), TransportError> {
        validate_name("topic", topic)?;
        check_payloads("memory", &events, self.max_payload_bytes)?;
        if events.is_empty() {
            return Ok(());
        }
        let topic = self.topic(topic);
        let groups = lock(&topic.groups);
        if groups.is_empty() {
            return Ok(());
        }
        let events: Vec<Arc<Event>> = events.into_iter().map(Arc::new).collect();
        for group in groups.values() {
            {
                let mut st = lock(&group.state);
                st.ready.extend(events.iter().map(|event| Entry {
                    event: event.clone(),
                    attempt: 1,
                    holds_key: false,
                }));
            }
            group.notify.notify_waiters();
        }
        Ok(())
    }

    fn notify_all(&self) {
        for topic in lock(&self.topics).values() {
            for group in lock(&topic.groups).values() {
                group.notify.notify_waiters();
            }
        }
    }
}

impl GroupState {
    fn promote_due(&mut self, now: Instant) {
        while let Some(Reverse(d)) = self.delayed.peek() {
            if d.due > now {
                break;
            }
            let Some(Reverse(d)) = self.delayed.pop() else {
                break;
            };
            self.ready.push_back(d.entry);
        }
    }

    fn take(&mut self) -> Option<Entry> {
        while let Some(mut entry) = self.ready.pop_front() {
            if !entry.holds_key
                && let Some(key) = entry.event.subject()
            {
                if self.keys_in_flight.contains(key) {
                    self.blocked
                        .entry(key.to_owned())
                        .or_default()
                        .push_back(entry);
                    continue;
                }
                self.keys_in_flight.insert(key.to_owned());
                entry.holds_key = true;
            }
            self.in_flight += 1;
            return Some(entry);
        }
        None
    }

    /// Releases the key lock of a settled entry, handing it to the next
    /// event with that key, if any.
    fn release(&mut self, entry: &Entry) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(key) = entry.event.subject().filter(|_| entry.holds_key) else {
            return;
        };
        match self.blocked.entry(key.to_owned()) {
            MapEntry::Occupied(mut waiting) => {
                if let Some(mut next) = waiting.get_mut().pop_front() {
                    next.holds_key = true;
                    self.ready.push_front(next);
                }
                if waiting.get().is_empty() {
                    waiting.remove();
                }
            }
            MapEntry::Vacant(_) => {
                self.keys_in_flight.remove(key);
            }
        }
    }

    fn delay(&mut self, mut entry: Entry, due: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        entry.attempt += 1;
        self.seq += 1;
        let seq = self.seq;
        self.delayed.push(Reverse(Delayed { due, seq, entry }));
    }

    fn requeue_front(&mut self, mut entry: Entry) {
        self.in_flight = self.in_flight.saturating_sub(1);
        entry.attempt += 1;
        self.ready.push_front(entry);
    }
}

impl Publisher for MemoryTransport {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self
            .inner
            .check_open()
            .and_then(|()| self.inner.publish_now(topic, events));
        Box::pin(std::future::ready(result))
    }
}

impl Subscriber for MemoryTransport {
    fn subscribe(
        &self,
        subscription: Subscription,
    ) -> BoxFuture<'_, Result<DeliveryStream, TransportError>> {
        Box::pin(async move {
            self.inner.check_open()?;
            validate_name("topic", &subscription.topic)?;
            validate_name("group", &subscription.group)?;
            let topic = self.inner.topic(&subscription.topic);
            let group = lock(&topic.groups)
                .entry(subscription.group.clone())
                .or_insert_with(|| {
                    Arc::new(Group {
                        topic: topic.name.clone(),
                        name: subscription.group.as_str().into(),
                        state: Mutex::new(GroupState::default()),
                        notify: Notify::new(),
                    })
                })
                .clone();
            let consumer = Consumer {
                inner: self.inner.clone(),
                group,
                held: Arc::new(AtomicUsize::new(0)),
                prefetch: subscription.prefetch.max(1),
            };
            let stream = futures::stream::unfold(consumer, |consumer| async move {
                let delivery = consumer.next().await?;
                Some((Ok(delivery), consumer))
            });
            Ok(Box::pin(stream) as DeliveryStream)
        })
    }
}

/// One subscriber: its group, and how many unsettled deliveries it holds
/// against its prefetch.
struct Consumer {
    inner: Arc<Inner>,
    group: Arc<Group>,
    held: Arc<AtomicUsize>,
    prefetch: usize,
}

impl Consumer {
    async fn next(&self) -> Option<Delivery> {
        let (inner, group) = (&self.inner, &self.group);
        loop {
            let notified = group.notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a publish or settlement between
            // the look and the wait still wakes us.
            notified.as_mut().enable();
            if inner.closed.load(Ordering::Acquire) {
                return None;
            }
            // At the prefetch limit, wait for a settlement (which notifies).
            let full = self.held.load(Ordering::Acquire) >= self.prefetch;
            let next_due = if full {
                None
            } else {
                let mut st = lock(&group.state);
                st.promote_due(Instant::now());
                if let Some(entry) = st.take() {
                    let info = DeliveryInfo {
                        topic: group.topic.clone(),
                        group: group.name.clone(),
                        attempt: entry.attempt,
                    };
                    let event = entry.event.clone();
                    self.held.fetch_add(1, Ordering::AcqRel);
                    let acker = MemoryAcker {
                        inner: inner.clone(),
                        group: group.clone(),
                        held: self.held.clone(),
                        entry: Some(entry),
                    };
                    return Some(Delivery::new(event, info, Box::new(acker)));
                }
                st.delayed.peek().map(|Reverse(d)| d.due)
            };
            match next_due {
                Some(due) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

struct MemoryAcker {
    inner: Arc<Inner>,
    group: Arc<Group>,
    /// The subscriber's count of unsettled deliveries.
    held: Arc<AtomicUsize>,
    entry: Option<Entry>,
}

impl Acker for MemoryAcker {
    fn settle(
        mut self: Box<Self>,
        event: &Event,
        info: &DeliveryInfo,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        let Some(entry) = self.entry.take() else {
            return Box::pin(std::future::ready(Err(TransportError::new(
                TransportErrorKind::Settled,
                "delivery already settled",
            ))));
        };
        self.held.fetch_sub(1, Ordering::AcqRel);
        let result = match outcome {
            Outcome::Ack => {
                lock(&self.group.state).release(&entry);
                Ok(())
            }
            Outcome::Retry { after } => {
                lock(&self.group.state).delay(entry, Instant::now() + after);
                Ok(())
            }
            Outcome::DeadLetter(dead_letter) => {
                let dl = dead_letter_event(event, info, &dead_letter);
                // Dead-lettering still works after close: the delivery was
                // handed out before, and its outcome must not be lost.
                match self
                    .inner
                    .publish_now(&dead_letter_topic(&info.topic), vec![dl])
                {
                    Ok(()) => {
                        lock(&self.group.state).release(&entry);
                        Ok(())
                    }
                    Err(e) => {
                        lock(&self.group.state).requeue_front(entry);
                        Err(e)
                    }
                }
            }
        };
        self.group.notify.notify_waiters();
        Box::pin(std::future::ready(result))
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            self.held.fetch_sub(1, Ordering::AcqRel);
            lock(&self.group.state).requeue_front(entry);
            self.group.notify.notify_waiters();
        }
    }
}

impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_publish: false,
            persistent: false,
            consumer_groups: true,
            buffers_idle_groups: true,
            per_key_ordering: true,
            delayed_retry: true,
            replay: false,
            survives_broker_restart: false,
            max_payload_bytes: self.inner.max_payload_bytes,
        }
    }

    fn close(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.notify_all();
        Box::pin(std::future::ready(Ok(())))
    }
}
