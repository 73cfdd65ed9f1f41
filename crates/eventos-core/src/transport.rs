//! The transport contract: publish, subscribe, settle.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::error::{TransportError, TransportErrorKind};
use crate::event::{Event, ext};

/// What a transport can promise. The conformance suite runs a case only
/// where the flags say the transport supports it, and shows the rest as
/// ignored, so a flag is a claim that is tested.
///
/// Build one with struct-update syntax (`..Capabilities::default()`) so new
/// flags do not break transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `publish` returns only after the events are durably stored
    /// (fsync, publisher confirm, broker ack).
    pub durable_publish: bool,
    /// Published events and group state survive a restart of the process
    /// that owns the transport (or of the broker).
    pub persistent: bool,
    /// Every group sees every event; members of one group compete.
    pub consumer_groups: bool,
    /// Events published while a group has no subscriber wait for it.
    pub buffers_idle_groups: bool,
    /// Within a group, events with the same `subject` are handed out one at
    /// a time, in publish order, even with several consumers. Events
    /// without a subject are not ordered.
    pub per_key_ordering: bool,
    /// [`Outcome::Retry`] redelivers after the requested delay, not sooner.
    pub delayed_retry: bool,
    /// A new group can start from the earliest retained event.
    pub replay: bool,
    /// Subscriptions and publishers resume by themselves after the broker
    /// restarts.
    pub survives_broker_restart: bool,
    /// The largest payload (`data`, not the whole encoded event) the
    /// transport accepts, in bytes.
    pub max_payload_bytes: usize,
    /// [`Transport::group_counts`], [`Transport::dead_letters`] and
    /// [`Transport::dead_letter`] answer, and dead letters are kept on
    /// `<topic>.dlq` whether or not anyone subscribes to it (across
    /// restarts where `persistent` holds too).
    pub inspection: bool,
}

impl Default for Capabilities {
    /// Nothing promised but a 1 MiB payload.
    fn default() -> Self {
        Self {
            durable_publish: false,
            persistent: false,
            consumer_groups: false,
            buffers_idle_groups: false,
            per_key_ordering: false,
            delayed_retry: false,
            replay: false,
            survives_broker_restart: false,
            max_payload_bytes: 1024 * 1024,
            inspection: false,
        }
    }
}

/// Where a group that does not exist yet starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The oldest retained event (where [`Capabilities::replay`] holds;
    /// otherwise the same as `Latest`).
    #[default]
    Earliest,
    /// Only events published after the group is created.
    Latest,
}

/// What to consume: a topic, as a member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The topic.
    pub topic: String,
    /// The consumer group; members of one group share the work.
    pub group: String,
    /// Where a new group starts.
    pub start: StartFrom,
    /// How many unsettled deliveries this subscriber may hold (the broker's
    /// prefetch / QoS); the router sets it from the route's concurrency.
    pub prefetch: usize,
}

impl Subscription {
    /// A subscription of `group` to `topic`, starting at
    /// [`StartFrom::Earliest`] with a prefetch of 64.
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            group: group.into(),
            start: StartFrom::Earliest,
            prefetch: 64,
        }
    }

    /// Sets where a new group starts.
    #[must_use]
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Sets the prefetch (at least 1).
    #[must_use]
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }
}

/// A stream of deliveries. A transient error (broker unreachable) is
/// yielded and the stream goes on; the stream ends when the subscription is
/// cancelled or the transport closed.
///
/// Polling must be cancel-safe: dropping a pending `next()` future (the
/// router does, when shutdown wins a `select!`) loses no delivery.
pub type DeliveryStream = BoxStream<'static, Result<Delivery, TransportError>>;

/// Sends events to topics.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `events` to `topic`, in order. Returns once the transport
    /// has accepted all of them — durably where
    /// [`Capabilities::durable_publish`] says so.
    ///
    /// # Errors
    ///
    /// [`TransportErrorKind::InvalidName`] for a bad topic name;
    /// [`TransportErrorKind::Rejected`] for a payload over
    /// [`Capabilities::max_payload_bytes`]; [`TransportErrorKind::Closed`]
    /// after [`Transport::close`]; transient kinds when the broker is down.
    /// On error, any prefix of the batch may have been accepted.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>>;
}

/// Receives events from topics.
pub trait Subscriber: Send + Sync + 'static {
    /// Joins `subscription.group` on `subscription.topic`. When the future
    /// resolves the group exists, so every event published afterwards
    /// reaches it (a transport whose group join is asynchronous waits for
    /// the join). Dropping the stream leaves the group; deliveries held but
    /// not settled then are redelivered to other members.
    ///
    /// # Errors
    ///
    /// [`TransportErrorKind::InvalidName`] for a bad topic or group name;
    /// [`TransportErrorKind::Closed`] after [`Transport::close`].
    fn subscribe(
        &self,
        subscription: Subscription,
    ) -> BoxFuture<'_, Result<DeliveryStream, TransportError>>;
}

/// What one group holds on one topic, as its transport sees it: for
/// dashboards, `eventos dlq` and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct GroupCounts {
    /// Deliverable now (or as soon as a consumer asks).
    pub ready: u64,
    /// Handed out and not settled; where a broker pushes ahead of what the
    /// subscriber took (RabbitMQ's prefetch), what it pushed counts too.
    pub in_flight: u64,
    /// Waiting for a retry delay.
    pub retrying: u64,
    /// When the earliest retry is due.
    pub next_retry: Option<std::time::SystemTime>,
    /// Dead-lettered by this group, kept on `<topic>.dlq`.
    pub dead_lettered: u64,
}

fn unsupported<T: Send + 'static>(
    transport: &str,
    what: &str,
) -> BoxFuture<'static, Result<T, TransportError>> {
    let error = TransportError::new(
        TransportErrorKind::Unsupported,
        format!(
            "the {transport} transport cannot {what} (its capabilities say `inspection: false`)"
        ),
    );
    Box::pin(std::future::ready(Err(error)))
}

/// A complete transport: publisher, subscriber, capabilities, lifecycle.
pub trait Transport: Publisher + Subscriber {
    /// A short name for logs and metrics (`memory`, `log`, `amqp`, …).
    fn name(&self) -> &'static str;

    /// What this transport promises.
    fn capabilities(&self) -> Capabilities;

    /// Ends every open stream, refuses further publishes and subscriptions,
    /// and releases resources. Settling a delivery obtained before still
    /// works where the transport can do it. Closing twice is not an error.
    fn close(&self) -> BoxFuture<'_, Result<(), TransportError>>;

    /// What `group` holds on `topic`; `None` if the transport knows no
    /// such group.
    ///
    /// # Errors
    ///
    /// [`TransportErrorKind::Unsupported`] where
    /// [`Capabilities::inspection`] is false; transient kinds.
    fn group_counts<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<GroupCounts>, TransportError>> {
        let _ = (topic, group);
        unsupported(self.name(), "count a group's events")
    }

    /// The dead letters of `topic` (the events on `<topic>.dlq`), oldest
    /// first, at most `limit`.
    ///
    /// # Errors
    ///
    /// As [`Transport::group_counts`].
    fn dead_letters<'a>(
        &'a self,
        topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, TransportError>> {
        let _ = (topic, limit);
        unsupported(self.name(), "list dead letters")
    }

    /// The dead letter of `topic` with event id `id`, if there is one.
    ///
    /// # Errors
    ///
    /// As [`Transport::group_counts`].
    fn dead_letter<'a>(
        &'a self,
        topic: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Event>, TransportError>> {
        let _ = (topic, id);
        unsupported(self.name(), "fetch a dead letter")
    }
}

/// The name of the dead-letter topic of `topic`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Checks a topic or group name: 1–200 ASCII letters, digits, `.`, `_` or
/// `-`, not starting with `.`.
///
/// # Errors
///
/// [`TransportErrorKind::InvalidName`] naming the problem.
pub fn validate_name(what: &str, name: &str) -> Result<(), TransportError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(TransportError::new(
            TransportErrorKind::InvalidName,
            format!(
                "invalid {what} name {name:?}: use 1-200 ASCII letters, digits, '.', '_' or '-', not starting with '.'"
            ),
        ))
    }
}

/// Checks a batch against a transport's payload limit, so every transport
/// refuses the same way.
///
/// # Errors
///
/// [`TransportErrorKind::Rejected`] naming the first event over `max` bytes.
pub fn check_payloads(transport: &str, events: &[Event], max: usize) -> Result<(), TransportError> {
    match events.iter().find(|e| e.data_len() > max) {
        None => Ok(()),
        Some(big) => Err(TransportError::new(
            TransportErrorKind::Rejected,
            format!(
                "event {} has a {}-byte payload; the {transport} transport accepts at most {max} bytes",
                big.id(),
                big.data_len()
            ),
        )),
    }
}

/// Where a delivery came from and how many times it has been tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// The topic it was consumed from.
    pub topic: Arc<str>,
    /// The group that consumed it.
    pub group: Arc<str>,
    /// 1 on first delivery. Every [`Outcome::Retry`] increments it; other
    /// redeliveries (lease expiry, a dropped acker, a crash) increment it
    /// where the transport can count them — brokers that cannot may report
    /// 1 again.
    pub attempt: u32,
}

/// Why an event was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The decision, e.g. `retries exhausted after 5 attempts`.
    pub reason: String,
    /// The last handler error, if there was one.
    pub error: Option<String>,
}

/// How a delivery is settled. Every delivery ends in exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; never deliver it to this group again.
    Ack,
    /// Deliver it to this group again, no sooner than `after` counted from
    /// the call that settles it, with the attempt count incremented.
    Retry {
        /// The minimum delay before redelivery.
        after: Duration,
    },
    /// Give up: move it to [`dead_letter_topic`] with the reason.
    DeadLetter(DeadLetter),
}

impl Outcome {
    /// A short label for logs and metrics: `ack`, `retry`, `dead_letter`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Retry { .. } => "retry",
            Outcome::DeadLetter(_) => "dead_letter",
        }
    }
}

/// The transport side of a delivery: carries out its outcome.
///
/// # Contract
///
/// `settle` is called at most once. If the acker is dropped without being
/// settled (the handler's task was aborted, the process is shutting down),
/// the transport must make the event deliverable again — never lose it.
pub trait Acker: Send + 'static {
    /// Carries out `outcome` for the delivery described by `info`.
    fn settle(
        self: Box<Self>,
        event: &Event,
        info: &DeliveryInfo,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>>;
}

/// One event handed to one consumer, to be settled exactly once.
pub struct Delivery {
    event: Arc<Event>,
    info: DeliveryInfo,
    acker: Box<dyn Acker>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("event", &self.event.id())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Assembles a delivery; for transport implementations.
    pub fn new(event: Arc<Event>, info: DeliveryInfo, acker: Box<dyn Acker>) -> Self {
        Self { event, info, acker }
    }

    /// The event.
    pub fn event(&self) -> &Arc<Event> {
        &self.event
    }

    /// Topic, group and attempt.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// The 1-based attempt number.
    pub fn attempt(&self) -> u32 {
        self.info.attempt
    }

    /// Splits the delivery so the event can go to a handler while the
    /// settlement waits for its result.
    pub fn into_parts(self) -> (Arc<Event>, DeliveryInfo, Settlement) {
        let Delivery { event, info, acker } = self;
        let settlement = Settlement {
            event: event.clone(),
            info: info.clone(),
            acker,
        };
        (event, info, settlement)
    }

    /// Settles with `outcome`.
    ///
    /// # Errors
    ///
    /// The transport's error; the event is then redelivered later, since
    /// the outcome may not have been recorded.
    pub async fn settle(self, outcome: Outcome) -> Result<(), TransportError> {
        self.into_parts().2.settle(outcome).await
    }

    /// Settles with [`Outcome::Ack`].
    ///
    /// # Errors
    ///
    /// As [`Delivery::settle`].
    pub async fn ack(self) -> Result<(), TransportError> {
        self.settle(Outcome::Ack).await
    }

    /// Settles with [`Outcome::Retry`].
    ///
    /// # Errors
    ///
    /// As [`Delivery::settle`].
    pub async fn retry_after(self, after: Duration) -> Result<(), TransportError> {
        self.settle(Outcome::Retry { after }).await
    }

    /// Settles with [`Outcome::DeadLetter`].
    ///
    /// # Errors
    ///
    /// As [`Delivery::settle`].
    pub async fn dead_letter(
        self,
        reason: impl Into<String>,
        error: Option<String>,
    ) -> Result<(), TransportError> {
        self.settle(Outcome::DeadLetter(DeadLetter {
            reason: reason.into(),
            error,
        }))
        .await
    }
}

/// The settling half of a [`Delivery`] (see [`Delivery::into_parts`]).
/// Dropping it unsettled makes the event deliverable again.
pub struct Settlement {
    event: Arc<Event>,
    info: DeliveryInfo,
    acker: Box<dyn Acker>,
}

impl fmt::Debug for Settlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settlement")
            .field("event", &self.event.id())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Settlement {
    /// The delivery's topic, group and attempt.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// Carries out `outcome`.
    ///
    /// # Errors
    ///
    /// As [`Delivery::settle`].
    pub async fn settle(self, outcome: Outcome) -> Result<(), TransportError> {
        let Settlement { event, info, acker } = self;
        acker.settle(&event, &info, outcome).await
    }
}

/// The copy of `event` that goes to the dead-letter topic: same id and
/// payload, with the reason, attempt count, last error, topic and group in
/// extensions. Every transport uses this so dead letters look the same
/// everywhere.
pub fn dead_letter_event(event: &Event, info: &DeliveryInfo, dead_letter: &DeadLetter) -> Event {
    let mut dl = event.clone();
    let mut set = |name: &str, value: crate::ExtensionValue| {
        dl.extensions.insert(name.to_owned(), value);
    };
    set(ext::DEAD_LETTER_REASON, dead_letter.reason.clone().into());
    set(ext::DEAD_LETTER_ATTEMPTS, info.attempt.into());
    set(ext::DEAD_LETTER_TOPIC, info.topic.as_ref().into());
    set(ext::DEAD_LETTER_GROUP, info.group.as_ref().into());
    if let Some(error) = &dead_letter.error {
        set(ext::DEAD_LETTER_ERROR, error.clone().into());
    }
    dl
}
