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
//! The queue itself is the kit's [`GroupQueue`], the stream its pull loop,
//! the acker its [`OnceAcker`]: what is left here is fan-out and wiring.
//!
//! No feature flags.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use eventos_core::{
    Capabilities, Delivery, DeliveryInfo, DeliveryStream, Event, GroupCounts, Outcome, Publisher,
    Subscriber, Subscription, Transport, TransportError, check_payloads, dead_letter_event,
    dead_letter_topic, ext, validate_name,
};
use eventos_kit::{
    Gate, GroupQueue, Lifecycle, OnceAcker, Prefetch, Pull, Queued, Settle, Step, lock, pull_stream,
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
    /// Every dead letter, by the topic it was dead-lettered from: kept
    /// whether or not anyone subscribes to `<topic>.dlq`, for as long as
    /// the process lives.
    dead: Mutex<HashMap<String, Vec<Arc<Event>>>>,
    lifecycle: Lifecycle,
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
    queue: Mutex<GroupQueue<Arc<Event>>>,
    notify: Arc<Notify>,
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
                dead: Mutex::new(HashMap::new()),
                lifecycle: Lifecycle::new(),
                max_payload_bytes,
            }),
        }
    }

    /// Queue counts of one group, or `None` if it never subscribed.
    pub fn stats(&self, topic: &str, group: &str) -> Option<GroupStats> {
        let topic = lock(&self.inner.topics).get(topic).cloned()?;
        let group = lock(&topic.groups).get(group).cloned()?;
        let counts = lock(&group.queue).counts();
        Some(GroupStats {
            ready: counts.ready,
            delayed: counts.delayed,
            blocked: counts.blocked,
            in_flight: counts.in_flight,
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
                let mut queue = lock(&group.queue);
                for event in &events {
                    queue.push(event.clone());
                }
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

impl Publisher for MemoryTransport {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self
            .inner
            .lifecycle
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
            self.inner.lifecycle.check_subscribe(&subscription)?;
            let topic = self.inner.topic(&subscription.topic);
            let group = lock(&topic.groups)
                .entry(subscription.group.clone())
                .or_insert_with(|| {
                    Arc::new(Group {
                        topic: topic.name.clone(),
                        name: subscription.group.as_str().into(),
                        queue: Mutex::new(GroupQueue::default()),
                        notify: Arc::new(Notify::new()),
                    })
                })
                .clone();
            let prefetch = Prefetch::new(subscription.prefetch, group.notify.clone());
            Ok(pull_stream(Consumer {
                inner: self.inner.clone(),
                group,
                prefetch,
            }))
        })
    }
}

/// One subscriber: its group and its prefetch.
struct Consumer {
    inner: Arc<Inner>,
    group: Arc<Group>,
    prefetch: Prefetch,
}

impl Pull for Consumer {
    fn gate(&self) -> Gate<'_> {
        Gate::new(&self.inner.lifecycle, &self.prefetch)
    }

    fn step(&self) -> Step {
        let mut queue = lock(&self.group.queue);
        let Some(queued) = queue.take(Instant::now()) else {
            return Step::Wait(queue.next_due());
        };
        drop(queue);
        let info = DeliveryInfo {
            topic: self.group.topic.clone(),
            group: self.group.name.clone(),
            attempt: queued.attempt,
        };
        let event = queued.item.clone();
        let acker = OnceAcker::with_permit(
            MemorySettle {
                inner: self.inner.clone(),
                group: self.group.clone(),
                queued,
            },
            self.prefetch.acquire(),
        );
        Step::Deliver(Delivery::new(event, info, Box::new(acker)))
    }
}

/// A delivery's way back into its group's queue.
struct MemorySettle {
    inner: Arc<Inner>,
    group: Arc<Group>,
    queued: Queued<Arc<Event>>,
}

impl Settle for MemorySettle {
    fn settle(
        self,
        event: &Event,
        info: &DeliveryInfo,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        let MemorySettle {
            inner,
            group,
            queued,
        } = self;
        let result = match outcome {
            Outcome::Ack => {
                lock(&group.queue).ack(queued);
                Ok(())
            }
            Outcome::Retry { after } => {
                lock(&group.queue).retry(queued, Instant::now() + after);
                Ok(())
            }
            Outcome::DeadLetter(dead_letter) => {
                let dl = dead_letter_event(event, info, &dead_letter);
                // Dead-lettering still works after close: the delivery was
                // handed out before, and its outcome must not be lost.
                match inner.publish_now(&dead_letter_topic(&info.topic), vec![dl.clone()]) {
                    Ok(()) => {
                        lock(&inner.dead)
                            .entry(info.topic.to_string())
                            .or_default()
                            .push(Arc::new(dl));
                        lock(&group.queue).ack(queued);
                        Ok(())
                    }
                    Err(e) => {
                        lock(&group.queue).put_back(queued);
                        Err(e)
                    }
                }
            }
        };
        group.notify.notify_waiters();
        Box::pin(std::future::ready(result))
    }

    fn unsettled(self) {
        lock(&self.group.queue).put_back(self.queued);
        self.group.notify.notify_waiters();
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
            inspection: true,
        }
    }

    fn close(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        self.inner.lifecycle.close();
        self.inner.notify_all();
        Box::pin(std::future::ready(Ok(())))
    }

    fn group_counts<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<GroupCounts>, TransportError>> {
        let counts = self.group(topic, group).map(|g| {
            let queue = lock(&g.queue).counts();
            let dead_lettered = lock(&self.inner.dead).get(topic).map_or(0, |dead| {
                dead.iter()
                    .filter(|e| e.extension_str(ext::DEAD_LETTER_GROUP) == Some(group))
                    .count()
            });
            let mut counts = GroupCounts::default();
            counts.ready = as_u64(queue.ready + queue.blocked);
            counts.in_flight = as_u64(queue.in_flight);
            counts.retrying = as_u64(queue.delayed);
            counts.next_retry = queue.next_due.map(wall_clock);
            counts.dead_lettered = as_u64(dead_lettered);
            counts
        });
        Box::pin(std::future::ready(Ok(counts)))
    }

    fn dead_letters<'a>(
        &'a self,
        topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, TransportError>> {
        let dead = lock(&self.inner.dead)
            .get(topic)
            .map_or_else(Vec::new, |dead| {
                dead.iter().take(limit).map(|e| Event::clone(e)).collect()
            });
        Box::pin(std::future::ready(Ok(dead)))
    }

    fn dead_letter<'a>(
        &'a self,
        topic: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Event>, TransportError>> {
        let found = lock(&self.inner.dead)
            .get(topic)
            .and_then(|dead| dead.iter().find(|e| e.id() == id).map(|e| Event::clone(e)));
        Box::pin(std::future::ready(Ok(found)))
    }
}

impl MemoryTransport {
    fn group(&self, topic: &str, group: &str) -> Option<Arc<Group>> {
        let topic = lock(&self.inner.topics).get(topic).cloned()?;
        lock(&topic.groups).get(group).cloned()
    }
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A monotonic instant as the wall-clock time it falls at.
fn wall_clock(at: Instant) -> std::time::SystemTime {
    let now = Instant::now();
    let wall = std::time::SystemTime::now();
    if at >= now {
        wall + (at - now)
    } else {
        wall - (now - at)
    }
}

/// The memory transport's entry in a [`Registry`](eventos_kit::Registry):
/// named `memory` (or `memory:`).
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryEngine;

impl eventos_kit::Engine for MemoryEngine {
    fn schemes(&self) -> &'static [&'static str] {
        &["memory"]
    }

    fn example(&self) -> &'static str {
        "memory"
    }

    fn process_local(&self) -> bool {
        true
    }

    fn describe(&self, _: &eventos_kit::Target<'_>) -> String {
        "memory (queued work is lost if the process dies)".into()
    }

    fn open<'a>(
        &'a self,
        _: eventos_kit::Target<'a>,
    ) -> BoxFuture<'a, Result<eventos_kit::Opened, eventos_kit::OpenError>> {
        Box::pin(async {
            Ok(eventos_kit::Opened {
                transport: Arc::new(MemoryTransport::new()),
                metrics: None,
            })
        })
    }
}
