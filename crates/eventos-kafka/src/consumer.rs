//! Subscriptions: one Kafka consumer per subscription, reading the topic
//! and the group's retry topics, committing an offset only once everything
//! before it is settled.
//!
//! **One Kafka consumer group per eventos group and topic**
//! (`<group>@<topic>`), so a group's subscriptions to different topics
//! never rebalance each other: with Kafka's eager rebalancing every member
//! of a group gives up all its partitions whenever any member comes or
//! goes.
//!
//! **Offsets over the settled prefix.** Each assigned partition has a
//! [`SettledCursor`]; a settled delivery marks its offset, and when the
//! positions that moved are stored and committed every 100 ms (and
//! librdkafka's auto-commit, every second, sends again what failed). A commit therefore never passes an unsettled delivery:
//! after a crash or a rebalance, whatever was not settled is read again
//! (at least once). When partitions are revoked, the stored offsets are
//! committed before the revocation completes and the partitions' cursors
//! are dropped; a delivery from such a partition settled later changes
//! nothing, and the partition's new owner reads it again.
//!
//! **Retries in topics of the group's own, by delay tier**,
//! `<topic>.retry.<group>.<tier>` for the tiers `1s`, `10s`, `1m`, `10m`
//! and `long` (a retry goes to the shortest tier that takes its delay): a
//! retry is a copy stamped with its next attempt and due time, produced
//! there before the original's offset is marked. The group's consumer
//! reads the tiers with the main topic and holds each copy in memory
//! until it is due, so the main topic's partitions never wait for a
//! retry. Only that group reads its tiers, so no other group sees the
//! event again. A held copy is not committed, so a crash only reads it
//! again; since one tier's copies come due in about the order they were
//! read, a long retry does not keep shorter ones uncommitted behind it.
//! Retries come back after their key's later events: retried events
//! leave their key's order.
//!
//! **Precision and memory:** a tier is read as soon as a copy lands, and
//! the copy is handed out by a timer at its due time, so a retry is never
//! early and is late by a timer tick, milliseconds, while the member
//! runs. One retry partition holds at most [`HOLD`] copies not yet due;
//! past that it is paused until half of them have come due, and a copy
//! left unread meanwhile is late by at most its tier's width (the `long`
//! tier's by its longest delay in hand). After a crash or a rebalance,
//! copies already due are handed out as soon as the new owner has read
//! them, which it starts once the main topic's first records are in, or
//! [`RETRIES_AFTER`] after its assignment, whichever is sooner; the
//! timers of revoked partitions are dropped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use eventos_core::{
    Delivery, DeliveryInfo, DeliveryStream, Event, Outcome, StartFrom, Subscription,
    TransportError, TransportErrorKind, dead_letter_event, dead_letter_topic,
};
use eventos_kit::{OnceAcker, Prefetch, Settle, SettledCursor, clock, lock};
use futures::future::BoxFuture;
use futures::future::FutureExt as _;
use futures::{Stream, StreamExt as _};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{Notify, mpsc};

use crate::codec::{self, Stamp};
use crate::{Shared, kafka_error};

/// How long a member at its prefetch waits for room before it pauses its
/// partitions to poll on.
const PAUSE_AFTER: Duration = Duration::from_millis(200);

/// How long a member just assigned its partitions holds back its retry
/// tiers' unless the main topic's records come first. Its partitions'
/// first fetch goes out with whichever have their start positions by then,
/// often empty retry partitions alone, and the broker holds a fetch of
/// empty partitions for `fetch.wait.max.ms` while the main topic's wait
/// behind it: a new member reached its first event 65 ms later than a
/// consumer of the main topic alone.
const RETRIES_AFTER: Duration = Duration::from_millis(200);

/// How often the settled positions that moved are stored and committed:
/// storing once per settlement cost more than the rest of a delivery.
const STORE_EVERY: Duration = Duration::from_millis(100);

/// The most records read and handed out in one go: the stream's task is
/// woken once per batch rather than once per record, yet the pump still
/// looks at its commit timer and its end between batches.
const BATCH: usize = 512;

/// How long a subscription waits for the group to take it in.
const JOIN_WAIT: Duration = Duration::from_secs(15);

/// The longest topic name Kafka accepts.
const MAX_TOPIC: usize = 249;

/// The retry delay tiers, by name and the longest delay each takes; the
/// last takes any delay. A tier's copies come due in about the order they
/// are read, so a long delay never holds up a short one's commit, and a
/// paused tier (see [`HOLD`]) is late by no more than its width.
const TIERS: [(&str, Duration); 5] = [
    ("1s", Duration::from_secs(1)),
    ("10s", Duration::from_secs(10)),
    ("1m", Duration::from_secs(60)),
    ("10m", Duration::from_secs(600)),
    ("long", Duration::MAX),
];

/// The most copies not yet due that one retry partition holds in memory:
/// past it the partition is paused, and resumed once half have come due.
const HOLD: usize = 1000;

/// The tier a retry after `after` goes to.
fn tier_of(after: Duration) -> usize {
    TIERS
        .iter()
        .position(|(_, longest)| after <= *longest)
        .unwrap_or(TIERS.len() - 1)
}

/// The topics that hold `group`'s retries of `topic`, one per tier.
pub(crate) fn retry_topics(topic: &str, group: &str) -> Vec<String> {
    TIERS
        .iter()
        .map(|(tier, _)| retry_topic(topic, group, tier))
        .collect()
}

/// The topic that holds `group`'s retries of `topic` in `tier`:
/// `<topic>.retry.<group>.<tier>` (tier names have no dot, so no two
/// groups share one), or, where that is longer than Kafka allows, a
/// readable prefix of it and a hash of the whole.
fn retry_topic(topic: &str, group: &str, tier: &str) -> String {
    let full = format!("{topic}.retry.{group}.{tier}");
    if full.len() <= MAX_TOPIC {
        return full;
    }
    let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, full.as_bytes()).simple();
    let keep = MAX_TOPIC - 1 - 32;
    // Topic and group names are ASCII, so any byte index is a boundary.
    format!("{}.{hash}", &full[..keep])
}

/// Which of a subscription's topics a record came from: the main one or
/// a retry tier's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Main,
    Retry(usize),
}

/// One assigned partition's settled-offset cursor.
struct Part {
    cursor: SettledCursor,
    /// The next offset the consumer should read; offsets it skips (control
    /// records) count as settled.
    next: u64,
    /// The assignment this cursor belongs to.
    generation: u64,
    /// The cursor moved since its position was last stored.
    moved: bool,
    /// Retry copies read and held until due.
    held: usize,
    /// Paused for holding [`HOLD`] copies.
    held_paused: bool,
}

/// The cursors of every partition a consumer holds.
pub(crate) struct Offsets {
    /// The Kafka names of the main topic and of the retry tiers'.
    main: String,
    retry: Vec<String>,
    generation: u64,
    parts: HashMap<(Source, i32), Part>,
}

impl Offsets {
    fn new(main: String, retry: Vec<String>) -> Self {
        Offsets {
            main,
            retry,
            generation: 0,
            parts: HashMap::new(),
        }
    }

    fn source(&self, topic: &str) -> Source {
        if topic == self.main {
            return Source::Main;
        }
        self.retry
            .iter()
            .position(|t| t == topic)
            .map_or(Source::Main, Source::Retry)
    }

    fn topic(&self, source: Source) -> &str {
        match source {
            Source::Main => &self.main,
            Source::Retry(tier) => &self.retry[tier],
        }
    }

    /// The positions of the cursors that moved since the last call, to
    /// store for the next commit; `None` if none did.
    fn take_moved(&mut self) -> Option<TopicPartitionList> {
        let mut list = None;
        for (&(source, partition), part) in &mut self.parts {
            if !std::mem::take(&mut part.moved) {
                continue;
            }
            let topic = match source {
                Source::Main => &self.main,
                Source::Retry(tier) => &self.retry[tier],
            };
            let position = i64::try_from(part.cursor.position()).unwrap_or(i64::MAX);
            let list = list.get_or_insert_with(TopicPartitionList::new);
            if let Err(e) = list.add_partition_offset(topic, partition, Offset::Offset(position)) {
                tracing::debug!(topic, partition, error = %e, "offset not listed");
            }
        }
        list
    }
}

/// What one member of this process holds of one partition, for
/// inspection: its settled position, the next offset it reads, and which
/// offsets in between are settled.
pub(crate) struct Held {
    pub(crate) position: u64,
    pub(crate) next: u64,
    pub(crate) settled: HashSet<u64>,
}

/// This process's members, by group id: inspection adds what they hold to
/// what the broker knows (committed offsets only).
#[derive(Default)]
pub(crate) struct Members(Mutex<HashMap<String, Vec<Weak<Mutex<Offsets>>>>>);

impl Members {
    fn add(&self, group_id: &str, offsets: &Arc<Mutex<Offsets>>) {
        let mut members = lock(&self.0);
        members.retain(|_, list| {
            list.retain(|m| m.strong_count() > 0);
            !list.is_empty()
        });
        members
            .entry(group_id.to_owned())
            .or_default()
            .push(Arc::downgrade(offsets));
    }

    /// Whether a member of `group_id` runs in this process.
    pub(crate) fn knows(&self, group_id: &str) -> bool {
        lock(&self.0)
            .get(group_id)
            .is_some_and(|list| list.iter().any(|m| m.strong_count() > 0))
    }

    /// What this process's members of `group_id` hold, by (Kafka topic,
    /// partition). A partition is one member's at a time; the latest
    /// assignment wins where two report one.
    pub(crate) fn held(&self, group_id: &str) -> HashMap<(String, i32), Held> {
        let members: Vec<_> = lock(&self.0)
            .get(group_id)
            .map(|list| list.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default();
        let mut held = HashMap::new();
        for member in members {
            let offsets = lock(&member);
            for (&(source, partition), part) in &offsets.parts {
                if part.generation != offsets.generation {
                    continue;
                }
                let topic = offsets.topic(source).to_owned();
                let position = part.cursor.position();
                let settled = (position..part.next)
                    .filter(|&o| part.cursor.is_settled(o))
                    .collect();
                held.insert(
                    (topic, partition),
                    Held {
                        position,
                        next: part.next,
                        settled,
                    },
                );
            }
        }
        held
    }
}

/// Stores `list`, each partition's next offset to read, for the next
/// commit. (`store_offsets`, not `store_offset`: librdkafka's
/// single-offset store takes a message's offset and commits the one after
/// it.)
fn store<C: Consumer<X>, X: ConsumerContext>(consumer: &C, list: Option<TopicPartitionList>) {
    let Some(list) = list else { return };
    if let Err(e) = consumer.store_offsets(&list) {
        tracing::debug!(error = %e, "offsets not stored (partitions revoked?)");
    }
}

/// Commits and forgets revoked partitions before they go; tells the
/// subscription when the group has given it its share.
struct Ctx {
    offsets: Arc<Mutex<Offsets>>,
    assigned: Arc<Assigned>,
    /// Tells the held retries that partitions went.
    revoked: Arc<Notify>,
}

/// Whether the group has assigned this member its partitions yet.
#[derive(Default)]
struct Assigned {
    done: AtomicBool,
    wake: Notify,
    /// Since when the retry partitions of the last assignment have been
    /// held back (see [`RETRIES_AFTER`]), while they are.
    retries_held: Mutex<Option<std::time::Instant>>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            // A partition paused before the rebalance starts afresh: its
            // new cursor holds nothing. (A full prefetch pauses it again
            // once a record arrives.) The retry tiers' wait until the main
            // topic's first fetch is answered (see [`RETRIES_AFTER`]).
            let main = lock(&self.offsets).main.clone();
            let (mut now, mut later) = (TopicPartitionList::new(), TopicPartitionList::new());
            for element in assigned.elements() {
                let list = if element.topic() == main {
                    &mut now
                } else {
                    &mut later
                };
                list.add_partition(element.topic(), element.partition());
            }
            if let Err(e) = consumer.resume(&now) {
                tracing::debug!(error = %e, "cannot resume newly assigned partitions");
            }
            if later.count() > 0 {
                match consumer.pause(&later) {
                    Ok(()) => {
                        *lock(&self.assigned.retries_held) = Some(std::time::Instant::now());
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot hold back the retry partitions"),
                }
            }
            self.assigned.done.store(true, Ordering::Release);
            self.assigned.wake.notify_waiters();
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            // The revoked partitions' deliveries stop counting first, then
            // what was settled is committed: a settlement after this
            // point changes nothing, and the new owner reads it again.
            let moved = {
                let mut offsets = lock(&self.offsets);
                offsets.generation += 1;
                let moved = offsets.take_moved();
                for element in revoked.elements() {
                    let source = offsets.source(element.topic());
                    offsets.parts.remove(&(source, element.partition()));
                }
                moved
            };
            self.revoked.notify_waiters();
            store(consumer, moved);
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                // Nothing stored since the last commit is the common case.
                if !matches!(
                    e,
                    KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)
                ) {
                    tracing::warn!(error = %e, "cannot commit before a rebalance; the new owner reads the uncommitted events again");
                }
            }
        }
    }
}

type KafkaConsumer = StreamConsumer<Ctx>;

/// What a subscription's pump, stream and ackers share.
struct Sub {
    shared: Arc<Shared>,
    topic: Arc<str>,
    /// The Kafka topic: `topic` under the namespace.
    physical: String,
    group: Arc<str>,
    /// The retry tiers' Kafka topics, shortest first.
    retry_topics: Vec<String>,
    offsets: Arc<Mutex<Offsets>>,
    /// Woken when partitions are revoked.
    revoked: Arc<Notify>,
    /// Retry partitions paused for holding too many copies that have room
    /// again, for the pump to resume.
    to_resume: Mutex<Vec<(Source, i32)>>,
    /// Wakes the pump when `to_resume` grows.
    held_room: Notify,
    /// Deliveries dropped unsettled whose copy is still being produced;
    /// the subscription's end waits for them, so that their offsets are in
    /// its last commit.
    putting_back: AtomicUsize,
    /// The stream was dropped and what it still held given back.
    stream_gone: AtomicBool,
    /// Wakes the subscription's end when either changes.
    put_back: Notify,
}

impl Sub {
    /// Registers a record just read: its partition's cursor, created at the
    /// first offset read in this assignment. Returns the assignment.
    fn register(&self, source: Source, partition: i32, offset: u64) -> u64 {
        let mut offsets = lock(&self.offsets);
        let generation = offsets.generation;
        let part = offsets
            .parts
            .entry((source, partition))
            .or_insert_with(|| Part {
                cursor: SettledCursor::at(offset),
                next: offset,
                generation,
                moved: false,
                held: 0,
                held_paused: false,
            });
        for skipped in part.next..offset {
            part.moved |= part.cursor.settle(skipped);
        }
        part.next = part.next.max(offset + 1);
        generation
    }

    /// Marks `offset` settled, for the next store if the settled prefix
    /// grew. A partition revoked since is left alone.
    fn settled(&self, source: Source, partition: i32, offset: u64, generation: u64) {
        let mut offsets = lock(&self.offsets);
        let Some(part) = offsets.parts.get_mut(&(source, partition)) else {
            return;
        };
        if part.generation == generation {
            part.moved |= part.cursor.settle(offset);
        }
    }

    /// Whether the delivery of assignment `generation` from `partition`
    /// is still this consumer's to settle.
    fn owns(&self, source: Source, partition: i32, generation: u64) -> bool {
        lock(&self.offsets)
            .parts
            .get(&(source, partition))
            .is_some_and(|p| p.generation == generation)
    }

    /// Counts a retry copy held until due; true if its partition now holds
    /// [`HOLD`] and is to be paused.
    fn hold(&self, source: Source, partition: i32, generation: u64) -> bool {
        let mut offsets = lock(&self.offsets);
        let Some(part) = offsets.parts.get_mut(&(source, partition)) else {
            return false;
        };
        if part.generation != generation {
            return false;
        }
        part.held += 1;
        let pause = part.held >= HOLD && !part.held_paused;
        part.held_paused |= pause;
        pause
    }

    /// Counts a held copy out, once it is due (or dropped); a partition
    /// paused for holding too many is handed to the pump to resume once
    /// half of them are gone.
    fn unhold(&self, source: Source, partition: i32, generation: u64) {
        let mut offsets = lock(&self.offsets);
        let Some(part) = offsets.parts.get_mut(&(source, partition)) else {
            return;
        };
        if part.generation != generation {
            return;
        }
        part.held = part.held.saturating_sub(1);
        if part.held_paused && part.held <= HOLD / 2 {
            part.held_paused = false;
            drop(offsets);
            lock(&self.to_resume).push((source, partition));
            self.held_room.notify_one();
        }
    }

    /// Stores the positions that moved, for librdkafka's next commit.
    fn store_moved(&self, consumer: &KafkaConsumer) -> bool {
        let moved = lock(&self.offsets).take_moved();
        let any = moved.is_some();
        store(consumer, moved);
        any
    }

    /// Stores the positions that moved and commits them at once, without
    /// waiting for the answer: a settled event is committed within
    /// [`STORE_EVERY`], not librdkafka's auto-commit second, which stays
    /// as the backstop that commits again after a failed attempt.
    fn commit_moved(&self, consumer: &KafkaConsumer) {
        if self.store_moved(consumer)
            && let Err(e) = consumer.commit_consumer_state(CommitMode::Async)
        {
            tracing::debug!(error = %e, "commit not sent; the next auto-commit sends it");
        }
    }
}

/// Creates the group's topics and its join position, then starts the
/// consumer. Returns once events published afterwards will reach the
/// group.
pub(crate) async fn subscribe(
    shared: Arc<Shared>,
    subscription: Subscription,
) -> Result<DeliveryStream, TransportError> {
    // `topic` is the Kafka topic (under the namespace, if one is set);
    // deliveries name the subscription's own.
    let topic = shared.physical(&subscription.topic);
    let group = subscription.group.clone();
    let retry = retry_topics(&topic, &group);
    {
        let mut all = vec![topic.as_str()];
        all.extend(retry.iter().map(String::as_str));
        shared.ensure_topics(&all).await?;
    }
    let group_id = format!("{group}@{topic}");
    if subscription.start == StartFrom::Latest {
        join_at_the_end(&shared, &group_id, &topic).await?;
    }
    let offsets = Arc::new(Mutex::new(Offsets::new(topic.clone(), retry.clone())));
    shared.members.add(&group_id, &offsets);
    let assigned = Arc::new(Assigned::default());
    let revoked = Arc::new(Notify::new());
    let mut config = shared.base.clone();
    config
        .set("group.id", &group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    for (key, value) in FETCH_SETTINGS {
        config.set(*key, *value);
    }
    for (key, value) in &shared.options.client {
        config.set(key, value);
    }
    let consumer: KafkaConsumer = config
        .create_with_context(Ctx {
            offsets: offsets.clone(),
            assigned: assigned.clone(),
            revoked: revoked.clone(),
        })
        .map_err(|e| crate::refused(&e))?;
    let mut topics = vec![topic.as_str()];
    topics.extend(retry.iter().map(String::as_str));
    consumer
        .subscribe(&topics)
        .map_err(|e| kafka_error(&format!("subscribing {group_id:?}"), &e))?;
    let consumer = Arc::new(consumer);
    let sub = Arc::new(Sub {
        shared: shared.clone(),
        topic: subscription.topic.as_str().into(),
        physical: topic.clone(),
        group: group.as_str().into(),
        retry_topics: retry,
        offsets,
        revoked,
        to_resume: Mutex::new(Vec::new()),
        held_room: Notify::new(),
        putting_back: AtomicUsize::new(0),
        stream_gone: AtomicBool::new(false),
        put_back: Notify::new(),
    });
    let (tx, rx) = mpsc::unbounded_channel::<Batch>();
    let wake = Arc::new(Notify::new());
    let pump = Pump {
        consumer,
        sub: sub.clone(),
        assigned: assigned.clone(),
        tx,
        prefetch: Prefetch::new(subscription.prefetch, wake.clone()),
        wake,
    };
    tokio::spawn(pump.run());
    // Returns once the group has taken this member in, so that members
    // joined one after another share the partitions before events flow
    // rather than the first taking them all until a rebalance. A group
    // slow to settle (a member that left without saying so) is waited for
    // no longer than a session.
    let deadline = tokio::time::Instant::now() + JOIN_WAIT;
    loop {
        let notified = assigned.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if assigned.done.load(Ordering::Acquire) {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            tracing::warn!(%topic, %group, "the consumer group has not assigned partitions yet; going on");
            break;
        }
    }
    Ok(Box::pin(KafkaStream {
        sub,
        rx,
        batch: Vec::new().into_iter(),
    }))
}

/// Commits the end of every partition for a group that has no committed
/// offset yet, so that it starts with what is published from now on.
async fn join_at_the_end(
    shared: &Shared,
    group_id: &str,
    topic: &str,
) -> Result<(), TransportError> {
    let mut config = shared.base.clone();
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config.create().map_err(|e| crate::refused(&e))?;
    let timeout = shared.options.publish_timeout;
    let (topic, group_id) = (topic.to_owned(), group_id.to_owned());
    tokio::task::spawn_blocking(move || {
        let what = format!("placing new group {group_id:?} at the end of {topic:?}");
        let fail = |e: KafkaError| kafka_error(&what, &e);
        let deadline = std::time::Instant::now() + timeout;
        // A topic just created reaches the metadata a moment later.
        let partitions = loop {
            let metadata = consumer
                .fetch_metadata(Some(&topic), timeout)
                .map_err(fail)?;
            let count = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map_or(0, |t| t.partitions().len());
            if count > 0 {
                break i32::try_from(count).unwrap_or(i32::MAX);
            }
            if std::time::Instant::now() >= deadline {
                return Err(TransportError::new(
                    TransportErrorKind::Unavailable,
                    format!("{what}: the topic has no partitions in the metadata yet"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut all = TopicPartitionList::new();
        for partition in 0..partitions {
            all.add_partition(&topic, partition);
        }
        let committed = consumer.committed_offsets(all, timeout).map_err(fail)?;
        if committed
            .elements()
            .iter()
            .any(|e| e.offset() != Offset::Invalid)
        {
            return Ok(());
        }
        let mut ends = TopicPartitionList::new();
        for partition in 0..partitions {
            let (_, high) = consumer
                .fetch_watermarks(&topic, partition, timeout)
                .map_err(fail)?;
            ends.add_partition_offset(&topic, partition, Offset::Offset(high))
                .map_err(fail)?;
        }
        consumer.commit(&ends, CommitMode::Sync).map_err(fail)
    })
    .await
    .map_err(|e| {
        TransportError::new(
            TransportErrorKind::Other,
            format!("the join-position task failed: {e}"),
        )
    })?
}

/// How a group's member fetches (before the `[kafka]` client overrides):
/// public so that a baseline measured against the transport can fetch the
/// same way.
pub const FETCH_SETTINGS: &[(&str, &str)] = &[
    // An empty partition's fetch is held this long by the broker, and
    // while it is, the member's other partitions wait for theirs: with the
    // default (500 ms) the empty retry topic delayed a new member's first
    // events by half a second. Shorter costs an idle member more fetch
    // requests (20 a second per broker at 50 ms); 20 ms bought another
    // 30 ms of first-event latency for 2.5 times the idle requests, which
    // is not worth it.
    ("fetch.wait.max.ms", "50"),
    // librdkafka reads ahead up to these bounds (by default 100 000
    // records or 64 MiB per member), then waits `fetch.queue.backoff.ms`
    // (by default a second) before fetching again: a member whose handlers
    // were slower than the fetch stalled for 0.7 s every 120 000 events. A
    // shorter read-ahead bounds the memory each subscription takes; a
    // short backoff keeps it fed.
    ("queued.min.messages", "20000"),
    ("queued.max.messages.kbytes", "16384"),
    ("fetch.queue.backoff.ms", "20"),
];

/// Deliveries handed to the stream together.
type Batch = Vec<Result<Delivery, TransportError>>;

/// The stream handed to the subscriber.
struct KafkaStream {
    sub: Arc<Sub>,
    rx: mpsc::UnboundedReceiver<Batch>,
    /// What is left of the last batch received.
    batch: std::vec::IntoIter<Result<Delivery, TransportError>>,
}

impl Stream for KafkaStream {
    type Item = Result<Delivery, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.sub.shared.lifecycle.is_closed() {
            return Poll::Ready(None);
        }
        loop {
            if let Some(item) = self.batch.next() {
                return Poll::Ready(Some(item));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(batch)) => self.batch = batch.into_iter(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for KafkaStream {
    fn drop(&mut self) {
        // Given back here, on this thread, before the subscription's end
        // is told: left to the channel, they would be dropped whenever its
        // last sender goes, after the end had committed without them.
        self.batch = Vec::new().into_iter();
        self.rx.close();
        while let Ok(batch) = self.rx.try_recv() {
            drop(batch);
        }
        self.sub.stream_gone.store(true, Ordering::Release);
        self.sub.put_back.notify_waiters();
    }
}

/// A delivery read and ready to hand out.
struct Ready {
    event: Arc<Event>,
    info: DeliveryInfo,
    settle: KafkaSettle,
}

/// Moves records from the consumer to the stream, within the prefetch.
struct Pump {
    consumer: Arc<KafkaConsumer>,
    sub: Arc<Sub>,
    assigned: Arc<Assigned>,
    tx: mpsc::UnboundedSender<Batch>,
    prefetch: Prefetch,
    wake: Arc<Notify>,
}

impl Pump {
    async fn run(self) {
        self.pump().await;
        self.finish().await;
    }

    /// While the prefetch stays full (past [`PAUSE_AFTER`]) the consumer
    /// keeps polling, with its partitions paused: a member that stopped
    /// polling would hold up every rebalance of its group until the broker
    /// gave up on it. A record that
    /// arrives all the same (from a partition just assigned) waits in
    /// `overflow`.
    async fn pump(&self) {
        let mut closed = Box::pin(self.sub.shared.lifecycle.closed());
        // One stream for the pump's life: `recv` registers and drops a
        // waker slot per record.
        let mut records = self.consumer.stream();
        let mut overflow = VecDeque::new();
        let mut paused = false;
        // Since when the prefetch has been full, while it is.
        let mut full_since = None;
        let mut store = tokio::time::interval(STORE_EVERY);
        store.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            while !self.prefetch.is_full() {
                let Some(ready) = overflow.pop_front() else {
                    break;
                };
                self.deliver(ready, &mut batch);
            }
            self.flush(&mut batch);
            // Armed before the check, so a release in between is not
            // missed.
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let full = self.prefetch.is_full();
            if !full {
                full_since = None;
                if paused {
                    self.pause(false);
                    paused = false;
                }
            }
            if full && !paused {
                // Room usually comes back at once. Pausing makes librdkafka
                // drop what it fetched ahead and fetch it again on resume,
                // so only a member that stays full pauses (and polls on).
                let since = *full_since.get_or_insert_with(tokio::time::Instant::now);
                tokio::select! {
                    () = &mut closed => break,
                    () = self.tx.closed() => break,
                    () = notified => {}
                    // Resumed with the rest once there is room.
                    () = self.sub.held_room.notified() => {}
                    _ = store.tick() => self.sub.commit_moved(&self.consumer),
                    () = tokio::time::sleep_until(since + PAUSE_AFTER) => {
                        self.pause(true);
                        paused = true;
                    }
                }
                continue;
            }
            tokio::select! {
                () = &mut closed => break,
                () = self.tx.closed() => break,
                () = notified, if full => {}
                () = self.sub.held_room.notified(), if !paused => self.resume_held(),
                _ = store.tick() => {
                    self.sub.commit_moved(&self.consumer);
                    if !paused {
                        self.release_retries(false);
                    }
                }
                received = records.next() => {
                    let Some(mut received) = received else { break };
                    let mut main_seen = false;
                    // What librdkafka already holds is taken at once, in
                    // one batch: a wake of the stream's task per record
                    // cost more than the rest of a delivery.
                    loop {
                        match received {
                            Ok(record) => {
                                main_seen = main_seen || record.topic() == self.sub.physical;
                                if let Some(ready) = self.prepare(&record, paused) {
                                    if self.prefetch.is_full() {
                                        overflow.push_back(ready);
                                        self.pause(true);
                                        paused = true;
                                    } else {
                                        self.deliver(ready, &mut batch);
                                    }
                                }
                            }
                            Err(e) => {
                                self.flush(&mut batch);
                                tracing::warn!(topic = %self.sub.topic, group = %self.sub.group, error = %e, "Kafka consumer error");
                                let _ = self.tx.send(vec![Err(kafka_error(
                                    &format!("consuming {:?} as group {:?}", self.sub.topic, self.sub.group),
                                    &e,
                                ))]);
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                break;
                            }
                        }
                        // A record taken while the prefetch is full would
                        // have to pause the partitions (see above).
                        if paused || batch.len() >= BATCH || self.prefetch.is_full() {
                            break;
                        }
                        match records.next().now_or_never() {
                            Some(Some(next)) => received = next,
                            _ => break,
                        }
                    }
                    if main_seen && !paused {
                        self.release_retries(true);
                    }
                }
            }
        }
    }

    /// Hands out what `batch` holds, in one message to the stream.
    fn flush(&self, batch: &mut Batch) {
        if !batch.is_empty() {
            let _ = self.tx.send(std::mem::take(batch));
        }
    }

    /// Pauses or resumes every partition assigned now, except that retry
    /// partitions holding too many copies stay paused.
    fn pause(&self, pause: bool) {
        let Ok(mut assignment) = self.consumer.assignment() else {
            return;
        };
        if !pause {
            lock(&self.sub.to_resume).clear();
            *lock(&self.assigned.retries_held) = None;
            let offsets = lock(&self.sub.offsets);
            let keep_paused: Vec<(String, i32)> = offsets
                .parts
                .iter()
                .filter(|(_, part)| part.held_paused && part.generation == offsets.generation)
                .map(|(&(source, partition), _)| (offsets.topic(source).to_owned(), partition))
                .collect();
            drop(offsets);
            if !keep_paused.is_empty() {
                let mut rest = TopicPartitionList::new();
                for element in assignment.elements() {
                    let (topic, partition) = (element.topic(), element.partition());
                    if !keep_paused
                        .iter()
                        .any(|(t, p)| t == topic && *p == partition)
                    {
                        rest.add_partition(topic, partition);
                    }
                }
                assignment = rest;
            }
        }
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, pause, "cannot pause or resume partitions");
        }
    }

    /// Resumes the retry partitions held back since the last assignment,
    /// once the main topic's records have come (`main_seen`) or after
    /// [`RETRIES_AFTER`]; those paused for holding too many copies stay
    /// paused. Not while the whole member is paused for its prefetch: its
    /// resumption takes them along.
    fn release_retries(&self, main_seen: bool) {
        let mut held = lock(&self.assigned.retries_held);
        let Some(since) = *held else { return };
        if !main_seen && since.elapsed() < RETRIES_AFTER {
            return;
        }
        *held = None;
        drop(held);
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let offsets = lock(&self.sub.offsets);
        let mut retries = TopicPartitionList::new();
        for element in assignment.elements() {
            let (topic, partition) = (element.topic(), element.partition());
            let source = offsets.source(topic);
            let held_paused = offsets
                .parts
                .get(&(source, partition))
                .is_some_and(|p| p.held_paused && p.generation == offsets.generation);
            if source != Source::Main && !held_paused {
                retries.add_partition(topic, partition);
            }
        }
        drop(offsets);
        if let Err(e) = self.consumer.resume(&retries) {
            tracing::debug!(error = %e, "cannot resume the retry partitions");
        }
    }

    /// Pauses or resumes one retry partition: only that one, since pausing
    /// or resuming a partition drops what librdkafka fetched ahead of it.
    fn pause_one(&self, source: Source, partition: i32, pause: bool) {
        let topic = lock(&self.sub.offsets).topic(source).to_owned();
        let mut list = TopicPartitionList::new();
        list.add_partition(&topic, partition);
        let result = if pause {
            self.consumer.pause(&list)
        } else {
            self.consumer.resume(&list)
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, topic, partition, pause, "cannot pause or resume a retry partition");
        }
    }

    /// Resumes the retry partitions that have room again.
    fn resume_held(&self) {
        let list = std::mem::take(&mut *lock(&self.sub.to_resume));
        for (source, partition) in list {
            self.pause_one(source, partition, false);
        }
    }

    /// Hands a delivery out, unless its partition was revoked since it was
    /// read (the new owner reads it again).
    fn deliver(&self, ready: Ready, batch: &mut Batch) {
        let Ready {
            event,
            info,
            settle,
        } = ready;
        if !self
            .sub
            .owns(settle.source, settle.partition, settle.generation)
        {
            return;
        }
        let acker = OnceAcker::with_permit(settle, self.prefetch.acquire());
        batch.push(Ok(Delivery::new(event, info, Box::new(acker))));
    }

    /// Reads a record into a delivery to hand out now; a retry not due yet
    /// is held aside until it is, and a record that is no CloudEvent is
    /// skipped. `paused`: every partition is paused for the prefetch.
    fn prepare(&self, record: &BorrowedMessage<'_>, paused: bool) -> Option<Ready> {
        let source = if record.topic() == self.sub.physical {
            Source::Main
        } else {
            self.sub
                .retry_topics
                .iter()
                .position(|t| t == record.topic())
                .map_or(Source::Main, Source::Retry)
        };
        let partition = record.partition();
        let offset = u64::try_from(record.offset()).unwrap_or(0);
        let generation = self.sub.register(source, partition, offset);
        let event = match codec::decode(record.headers(), record.payload()) {
            Ok(event) => Arc::new(event),
            Err(reason) => {
                tracing::error!(topic = record.topic(), partition, offset, %reason, "skipping a record that is not a CloudEvent");
                self.sub.settled(source, partition, offset, generation);
                return None;
            }
        };
        let stamp = if matches!(source, Source::Retry(_)) {
            Stamp::read(record.headers())
        } else {
            Stamp {
                attempt: 1,
                due_ms: None,
            }
        };
        let settle = KafkaSettle {
            sub: self.sub.clone(),
            event: event.clone(),
            source,
            partition,
            offset,
            generation,
            attempt: stamp.attempt,
        };
        let info = DeliveryInfo {
            topic: self.sub.topic.clone(),
            group: self.sub.group.clone(),
            attempt: stamp.attempt,
        };
        let ready = Ready {
            event,
            info,
            settle,
        };
        let early = stamp.due_ms.map_or(0, |due| due - clock::now_ms());
        if early <= 0 {
            return Some(ready);
        }
        // Not due yet: held aside, so the partition goes on meanwhile.
        if self.sub.hold(source, partition, generation) && !paused {
            self.pause_one(source, partition, true);
        }
        let due =
            tokio::time::Instant::now() + Duration::from_millis(u64::try_from(early).unwrap_or(0));
        tokio::spawn(hold_until(
            due,
            ready,
            self.tx.clone(),
            self.prefetch.clone(),
        ));
        None
    }

    /// Leaves the group: waits (briefly) for the stream to give back what
    /// it held and for those deliveries to be put back, then closes the
    /// consumer, which commits what is settled as its partitions are
    /// revoked, so the other members take them at once.
    async fn finish(self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let notified = self.sub.put_back.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let gone = self.sub.stream_gone.load(Ordering::Acquire)
                || self.sub.shared.lifecycle.is_closed();
            if gone && self.sub.putting_back.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let consumer = self.consumer;
        let sub = self.sub;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = sub.store_moved(&consumer);
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
            // The last reference: dropping closes the consumer, leaving the
            // group.
            drop(consumer);
        })
        .await;
    }
}

/// Holds a retry copy until `due`, then hands it out, unless its
/// partition was revoked meanwhile (its new owner reads the copy again).
async fn hold_until(
    due: tokio::time::Instant,
    ready: Ready,
    tx: mpsc::UnboundedSender<Batch>,
    prefetch: Prefetch,
) {
    let sub = ready.settle.sub.clone();
    let (source, partition, generation) = (
        ready.settle.source,
        ready.settle.partition,
        ready.settle.generation,
    );
    let mut closed = Box::pin(sub.shared.lifecycle.closed());
    loop {
        let revoked = sub.revoked.notified();
        tokio::select! {
            () = &mut closed => return,
            () = tx.closed() => return,
            () = revoked => {
                if sub.owns(source, partition, generation) {
                    continue;
                }
                return;
            }
            () = tokio::time::sleep_until(due) => break,
        }
    }
    sub.unhold(source, partition, generation);
    if !sub.owns(source, partition, generation) {
        return;
    }
    let Ready {
        event,
        info,
        settle,
    } = ready;
    let acker = OnceAcker::with_permit(settle, prefetch.acquire());
    let _ = tx.send(vec![Ok(Delivery::new(event, info, Box::new(acker)))]);
}

/// Settles one delivery: marks its offset once what its outcome produces
/// is stored.
struct KafkaSettle {
    sub: Arc<Sub>,
    event: Arc<Event>,
    /// The record's own topic (the main one or a retry tier's).
    source: Source,
    partition: i32,
    offset: u64,
    generation: u64,
    /// The attempt this delivery is.
    attempt: u32,
}

impl KafkaSettle {
    /// Produces a copy of the event into the group's retry topic of the
    /// tier `after` falls in.
    async fn send_retry(&self, attempt: u32, after: Duration) -> Result<(), TransportError> {
        let stamp = Stamp {
            attempt,
            due_ms: Some(clock::due_ms(after)),
        };
        let shared = &self.sub.shared;
        let copy = codec::encode(&self.event, shared.options.mode, stamp);
        let topic = &self.sub.retry_topics[tier_of(after)];
        shared.produce(topic, &[copy]).await
    }

    fn done(&self) {
        self.sub
            .settled(self.source, self.partition, self.offset, self.generation);
    }
}

impl Settle for KafkaSettle {
    fn settle(
        self,
        event: &Event,
        info: &DeliveryInfo,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        // The common case, at once: `settled` leaves a partition revoked
        // since alone, so there is nothing to wait for or to check first.
        if matches!(outcome, Outcome::Ack) {
            self.done();
            return Box::pin(std::future::ready(Ok(())));
        }
        let dead = match &outcome {
            Outcome::DeadLetter(dl) => Some(dead_letter_event(event, info, dl)),
            _ => None,
        };
        let attempt = info.attempt.saturating_add(1);
        Box::pin(async move {
            // A partition revoked since goes to its new owner from the last
            // commit, this event included: producing what the outcome asks
            // would do it twice.
            if !self.sub.owns(self.source, self.partition, self.generation) {
                return Ok(());
            }
            match outcome {
                Outcome::Ack => {}
                Outcome::Retry { after } => self.send_retry(attempt, after).await?,
                Outcome::DeadLetter(_) => {
                    let shared = &self.sub.shared;
                    let dlq = dead_letter_topic(&self.sub.physical);
                    shared.ensure_topic(&dlq).await?;
                    let dead = dead.expect("a dead letter for a dead-letter outcome");
                    let encoded = codec::encode(&dead, shared.options.mode, Stamp::default());
                    shared.produce(&dlq, &[encoded]).await?;
                }
            }
            self.done();
            Ok(())
        })
    }

    fn unsettled(self) {
        // Put back by producing it again as a retry due now; without a
        // runtime (the process ending) the uncommitted offset brings it
        // back on the next start instead.
        // A partition revoked since is read again by its new owner.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.sub.owns(self.source, self.partition, self.generation) {
            return;
        }
        self.sub.putting_back.fetch_add(1, Ordering::AcqRel);
        runtime.spawn(async move {
            match self
                .send_retry(self.attempt.saturating_add(1), Duration::ZERO)
                .await
            {
                Ok(()) => self.done(),
                Err(e) => {
                    tracing::warn!(topic = %self.sub.topic, error = %e, "cannot put back a delivery dropped unsettled; it is read again after a restart");
                }
            }
            self.sub.putting_back.fetch_sub(1, Ordering::AcqRel);
            self.sub.put_back.notify_waiters();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_goes_to_the_shortest_tier_that_takes_its_delay() {
        let tier = |ms| TIERS[tier_of(Duration::from_millis(ms))].0;
        assert_eq!(tier(0), "1s");
        assert_eq!(tier(1000), "1s");
        assert_eq!(tier(1001), "10s");
        assert_eq!(tier(60_000), "1m");
        assert_eq!(tier(600_001), "long");
        assert_eq!(TIERS[tier_of(Duration::MAX)].0, "long");
    }

    #[test]
    fn retry_topics_fit_kafka_and_stay_apart() {
        assert_eq!(
            retry_topics("a.b", "g"),
            [
                "a.b.retry.g.1s",
                "a.b.retry.g.10s",
                "a.b.retry.g.1m",
                "a.b.retry.g.10m",
                "a.b.retry.g.long"
            ]
        );
        let (topic, group) = ("t".repeat(200), "g".repeat(200));
        let long = retry_topic(&topic, &group, "1s");
        assert_eq!(long.len(), MAX_TOPIC);
        assert_ne!(
            long,
            retry_topic(&topic, &format!("{}h", "g".repeat(199)), "1s")
        );
        assert_ne!(long, retry_topic(&topic, &group, "10s"));
        assert!(
            long.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        );
    }
}
