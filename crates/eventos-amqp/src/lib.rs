//! The RabbitMQ transport: eventos over AMQP 0-9-1, for when one machine
//! is not enough and the services run as separate processes around a
//! broker.
//!
//! [`AmqpTransport::connect`] opens one connection; publishing and every
//! subscription share it (a channel each). It keeps the whole transport
//! contract of [`eventos_core`] — fan-out to groups, competing members,
//! stored retries, dead letters, durable publishes — and says what it
//! cannot in its [`Capabilities`]: no per-key ordering with several members
//! (a queue hands out in order, but competing consumers overlap) and no
//! replay (a queue holds what arrived after the group joined, not the
//! topic's history).
//!
//! # The decisions that shaped it
//!
//! **One durable direct exchange per namespace, the topic as routing key.**
//! Everything is published to the exchange named by
//! [`AmqpOptions::namespace`] (`eventos` by default) with the topic as the
//! routing key; each group has a durable queue `<namespace>/<topic>/<group>`
//! bound with that key. An exchange per topic was the alternative: it
//! would show topics in the management UI, but every publish to a topic not
//! yet declared would first need its own declaration (publishing to a
//! missing exchange closes the channel in AMQP 0-9-1), redone after every
//! reconnection, while routing in one direct exchange is a single exact
//! match however many topics there are. The namespace keeps several
//! deployments (or test runs) on one vhost apart; names longer than
//! RabbitMQ's 255 bytes keep a readable prefix and end in a hash.
//!
//! **Quorum queues by default, classic as an option** ([`QueueType`]).
//! Quorum queues are replicated, survive a node restart by design, count
//! redeliveries (`x-delivery-count`, so [`DeliveryInfo::attempt`] counts
//! them) and support at-least-once dead-lettering; classic queues are
//! lighter on a single node. Declaring a queue that exists with another
//! type fails with a message saying so.
//!
//! **Publisher confirms, mandatory publishing.** [`Publisher::publish`]
//! sends the batch in order on a confirm-mode channel and returns once
//! RabbitMQ confirmed every event, i.e. stored it in every queue it routes
//! to (persistent messages, durable queues). A nack fails the publish with
//! [`TransportErrorKind::Unavailable`]. Every message is mandatory: a topic
//! no group has joined routes to no queue, RabbitMQ returns the event, and
//! the publish succeeds with the event delivered to no one — the contract
//! every transport without replay keeps (a group sees what is published
//! after it joined). Groups that joined once keep their durable queue, so
//! events wait for an idle group ([`Capabilities::buffers_idle_groups`]).
//!
//! **Retries without plugins: a ladder of delay queues.** A retry is a copy
//! of the event, stamped with the next attempt (`x-eventos-attempt`) and
//! its due time (`x-eventos-due`), published to the group's *delay queue*
//! for the bucket its delay rounds **up** to in [`DELAY_LADDER_MS`]
//! (50 ms … 24 h, steps of at most 5/3): `<group queue>~<ms>ms`, with that
//! `x-message-ttl`, whose expired messages are dead-lettered through the
//! default exchange to the group's queue. Delay queues are per group, not
//! shared, so that what a group has waiting is the depth of its own delay
//! queues, which inspection reports; RabbitMQ deletes one unused for ten
//! minutes past its bucket (`x-expires`; the transport declares it again
//! before using it once half of that has passed). Only after the copy is confirmed is the original acked, so a
//! crash in between duplicates the event and never loses it. Precision: a
//! retry never comes back sooner than asked (the TTL starts after settle
//! was called); it comes back at most ~1.7× the delay later, plus the
//! broker's latency (a few ms). Delays beyond 24 h wait in the last bucket
//! again until due, and a copy that arrives before its due time waits again
//! for the rest. A bucket queue has one TTL, so its messages expire in
//! arrival order at its head — the reason for fixed buckets rather than
//! per-message TTLs, which RabbitMQ only expires at the head of a queue.
//! The RabbitMQ delayed-message plugin would be exact, but it is a plugin,
//! not replicated, and not installed by default.
//!
//! **Dead-lettering guarantees on RabbitMQ 3.10.** Quorum queues support
//! message TTL from 3.10, and 3.10 added `x-dead-letter-strategy:
//! at-least-once` for them, which keeps an expired message in its queue
//! until the target queue has confirmed it; it requires `x-overflow:
//! reject-publish` (without it RabbitMQ falls back to at-most-once).
//! Quorum delay buckets are declared with both, so a retry survives a
//! broker restart or crash at any moment. Classic queues dead-letter at
//! most once: a broker crash in the instant of expiry can lose a retry,
//! which is why quorum is the default. At-least-once has one slow path: a
//! copy whose forwarding RabbitMQ did not get confirmed (a retry that
//! expires while the broker starts, before the group's queue is up) is
//! forwarded again only after `dead_letter_worker_publisher_confirm_timeout`,
//! three minutes by default; lower it in `advanced.config` (the test broker
//! of `scripts/services` uses 5 s) if retries must come back promptly
//! after a restart. A dead letter
//! ([`Outcome::DeadLetter`]) does not use broker dead-lettering at all:
//! the transport publishes [`eventos_core::dead_letter_event`] (reason,
//! attempts, topic, group in extensions) to
//! [`eventos_core::dead_letter_topic`] `<topic>.dlq` with a confirm, then
//! acks the original. So that no dead letter is dropped for
//! want of a queue, the transport first declares the queue of the
//! [`PARKED_GROUP`] on `<topic>.dlq`, which keeps every dead letter of the
//! topic until an operator subscribes to `<topic>.dlq` as that group;
//! other groups of `<topic>.dlq` get their own copies as on any topic.
//!
//! **CloudEvents AMQP binding, both content modes.** Binary mode (the
//! default, [`ContentMode`]) puts every attribute in a `cloudEvents:`
//! header (core's [`Binding::AMQP`](eventos_core::Binding::AMQP) mapping,
//! not a copy of it), `datacontenttype` in the `content_type` property and
//! the payload as the body; structured mode sends the JSON event format as
//! `application/cloudevents+json`. A consumer reads both, choosing by the
//! content type as the binding specifies.
//!
//! **Reconnection with backoff.** When the connection drops (a broker
//! restart), the next operation reconnects, waiting between attempts with
//! exponential backoff and jitter (`backon`, 50 ms to 2 s) for at most
//! [`AmqpOptions::retry_for`]. A publish in progress republishes what was
//! not confirmed (duplicates are allowed, loss is not); each subscription
//! re-declares its queue and consumes again; unacked deliveries are
//! requeued by RabbitMQ, never dropped by the transport. Settling a
//! delivery whose channel died fails with
//! [`TransportErrorKind::Unavailable`] saying it will be redelivered.
//!
//! **Ack, prefetch, cancellation.** Consumers ack manually; the prefetch
//! (`basic.qos`) is [`Subscription::prefetch`]. An acker dropped unsettled
//! nacks with requeue. A message that is not a CloudEvent in either mode
//! (another producer's) is logged and rejected without requeue, since it
//! would fail the same way forever. A dropped stream cancels its consumer,
//! and a publish made afterwards on the same transport waits for RabbitMQ
//! to confirm the cancellation, so it is never handed to the member that
//! left.
//!
//! **Inspection through the management API.** [`Transport::group_counts`]
//! reads a group queue's ready and unacknowledged depths from the
//! `rabbitmq_management` plugin ([`AmqpOptions::management_url`], by
//! default port 15672 of the AMQP host with its credentials): AMQP tells
//! only the ready depth. Those are the broker's statistics, a few seconds
//! old; messages RabbitMQ has pushed to a consumer ahead of what it took
//! (its prefetch) count as in flight. What waits for a retry, its next due
//! time, and the dead letters (listed, fetched by id, counted per group)
//! are read by peeking: `basic.get` up to 10 000 messages, then one
//! `basic.nack` with requeue. A peek hides those messages from consumers
//! for its round trip and counts as a delivery in a quorum queue's
//! `x-delivery-count` of the parked dead letters; a delay queue's count
//! does not follow the copy back to its group.
//!
//! Resources are never deleted by the transport. [`AmqpOptions::queue_expires`]
//! (`x-expires`, off by default) lets RabbitMQ remove group queues unused
//! for that long; it suits disposable groups, not production ones, whose
//! queue must outlive any pause. The tests use unique names and delete
//! exactly the queues they caused instead.
//!
//! # Feature flags
//!
//! None. TLS (`amqps://`) uses rustls with the *ring* provider and the
//! system's root certificates (lapin features `rustls--ring` and
//! `rustls-native-certs`): lapin's default features are off because they
//! build aws-lc (a C and CMake build), and OpenSSL is not used. *ring*
//! compiles a little C and assembly of its own, which the workspace
//! already builds for lettre's TLS.

mod codec;
mod consumer;
mod engine;
mod inspect;
mod link;
mod names;

use std::sync::Arc;
use std::time::Duration;

use eventos_core::{
    Capabilities, DeliveryStream, Event, GroupCounts, Publisher, Subscriber, Subscription,
    Transport, TransportError, TransportErrorKind, validate_name,
};
#[cfg(doc)]
use eventos_core::{DeliveryInfo, Outcome};
use futures::future::BoxFuture;

use crate::link::{Outgoing, Shared, Unroutable};

pub use engine::{AmqpEngine, AmqpSection};
pub use names::{DELAY_LADDER_MS, PARKED_GROUP, delay_bucket};

/// The largest payload accepted by default: 16 MiB, well inside RabbitMQ's
/// default `max_message_size` (128 MiB) and small enough for quorum queues.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

/// The kind of queue declared for groups and delay buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated Raft queues; at-least-once dead-lettering for retries.
    #[default]
    Quorum,
    /// Classic queues: lighter, single node, at-most-once dead-lettering.
    Classic,
}

/// How events are laid out in AMQP messages (both are always read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Attributes in `cloudEvents:` headers, the payload as the body.
    #[default]
    Binary,
    /// The CloudEvents JSON format as the body.
    Structured,
}

/// How to connect and what to declare. `..AmqpOptions::default()` fills in
/// the rest.
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    /// Queue type of group queues and delay buckets.
    pub queue_type: QueueType,
    /// Prefix of every exchange and queue name; 1-64 letters, digits, `.`,
    /// `_` or `-`. Default `eventos`.
    pub namespace: String,
    /// How published events are encoded.
    pub mode: ContentMode,
    /// The largest payload accepted.
    pub max_payload_bytes: usize,
    /// How long an operation keeps reconnecting while RabbitMQ is
    /// unreachable before it fails with a transient error. Default 30 s.
    pub retry_for: Duration,
    /// How long one connection attempt may take. Default 30 s.
    pub connect_timeout: Duration,
    /// `x-expires` of group queues: RabbitMQ deletes a queue with no
    /// consumer unused for this long, events and all. `None` (the default)
    /// keeps queues until an operator removes them; set it only where
    /// groups are disposable, as in tests.
    pub queue_expires: Option<Duration>,
    /// The management API inspection reads depths from
    /// (`http://user:password@host:15672`). `None` (the default) means port
    /// 15672 of the AMQP host, with the AMQP URL's credentials.
    pub management_url: Option<String>,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        Self {
            queue_type: QueueType::Quorum,
            namespace: "eventos".to_owned(),
            mode: ContentMode::Binary,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            retry_for: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            queue_expires: None,
            management_url: None,
        }
    }
}

/// The RabbitMQ transport. Cloning shares the connection.
#[derive(Clone)]
pub struct AmqpTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("broker", &self.shared.shown)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl AmqpTransport {
    /// Connects to RabbitMQ at `url` (`amqp://user:password@host:5672/%2f`;
    /// `%2f` is the vhost `/`) and declares the namespace's exchange.
    ///
    /// # Errors
    ///
    /// One line saying what is wrong and how to fix it, never the
    /// password: [`TransportErrorKind::Unavailable`] when the broker cannot
    /// be reached, [`TransportErrorKind::Other`] when it refuses the login
    /// or the vhost, [`TransportErrorKind::InvalidName`] for a bad
    /// namespace.
    pub async fn connect(url: &str, options: AmqpOptions) -> Result<Self, TransportError> {
        let ns = &options.namespace;
        if ns.len() > 64 || validate_name("namespace", ns).is_err() {
            return Err(TransportError::new(
                TransportErrorKind::InvalidName,
                format!(
                    "invalid namespace {ns:?}: use 1-64 ASCII letters, digits, '.', '_' or '-', not starting with '.'"
                ),
            ));
        }
        Ok(Self {
            shared: Shared::connect(url, options).await?,
        })
    }

    /// The name of the queue of `group` on `topic`, for operators and
    /// tests.
    pub fn queue_name(&self, topic: &str, group: &str) -> String {
        self.shared.names.queue(topic, group)
    }
}

impl Publisher for AmqpTransport {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let max = shared.options.max_payload_bytes;
            shared
                .lifecycle
                .check_publish("amqp", topic, &events, max)?;
            if events.is_empty() {
                return Ok(());
            }
            let mut messages = Vec::with_capacity(events.len());
            for event in &events {
                messages.push(Outgoing {
                    exchange: shared.names.exchange().to_owned(),
                    routing_key: topic.to_owned(),
                    message: codec::encode(event, shared.options.mode, codec::Stamp::default())?,
                    id: event.id().to_owned(),
                    unroutable: Unroutable::Accept,
                });
            }
            shared.publish(messages).await
        })
    }
}

impl Subscriber for AmqpTransport {
    fn subscribe(
        &self,
        subscription: Subscription,
    ) -> BoxFuture<'_, Result<DeliveryStream, TransportError>> {
        Box::pin(async move {
            self.shared.lifecycle.check_subscribe(&subscription)?;
            let stream = consumer::subscribe(self.shared.clone(), subscription).await?;
            Ok(Box::pin(stream) as DeliveryStream)
        })
    }
}

impl Transport for AmqpTransport {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_publish: true,
            persistent: true,
            consumer_groups: true,
            buffers_idle_groups: true,
            per_key_ordering: false,
            delayed_retry: true,
            replay: false,
            survives_broker_restart: true,
            max_payload_bytes: self.shared.options.max_payload_bytes,
            // Through the management API (see `inspect`).
            inspection: true,
        }
    }

    fn close(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            self.shared.close().await;
            Ok(())
        })
    }

    fn group_counts<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<GroupCounts>, TransportError>> {
        Box::pin(async move {
            self.shared.check_open()?;
            inspect::group_counts(&self.shared, topic, group).await
        })
    }

    fn dead_letters<'a>(
        &'a self,
        topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, TransportError>> {
        Box::pin(async move {
            self.shared.check_open()?;
            inspect::dead_letters(&self.shared, topic, limit).await
        })
    }

    fn dead_letter<'a>(
        &'a self,
        topic: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Event>, TransportError>> {
        Box::pin(async move {
            self.shared.check_open()?;
            inspect::dead_letter(&self.shared, topic, id).await
        })
    }
}
