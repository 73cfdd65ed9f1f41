//! The NATS JetStream transport for eventos: the light persistent broker,
//! one binary, that many teams start with.
//!
//! [`NatsTransport::connect`] opens one NATS connection; publishing and
//! every subscription share it. It keeps the transport contract of
//! [`eventos_core`] — fan-out to groups, competing members, replay,
//! delayed retries, dead letters, durable publishes — and says what it
//! cannot in its [`Capabilities`].
//!
//! # The decisions that shaped it
//!
//! **A stream per topic, file storage.** Each topic is a JetStream stream
//! (`<namespace>_<topic>`, characters a stream name cannot hold replaced,
//! with a hash of the topic appended whenever one was) capturing the one
//! subject `<namespace>.<topic>`, which is what another NATS client
//! publishes to or subscribes on. A stream per topic rather than one for
//! everything keeps a topic's retention, size and deletion its own, and a
//! dead-letter topic `<topic>.dlq` is a stream like any other. Streams are
//! created by the transport, with limits retention ([`NatsOptions::max_age`],
//! seven days by default), the first time a topic is published to or
//! subscribed.
//!
//! **A durable pull consumer per group, explicit acks.** Members of a
//! group pull from the same durable consumer, so JetStream hands each
//! message to one of them; a new group starts at the stream's first
//! message or at its end ([`StartFrom`](eventos_core::StartFrom)), and a
//! group that exists keeps its position. A member pulls in batches of its
//! prefetch and takes no more from the batch than its prefetch allows.
//! [`DeliveryInfo::attempt`](eventos_core::DeliveryInfo) is JetStream's own
//! delivery count.
//!
//! **Retry-after is a NAK with a delay**, kept by the server: the event
//! comes back to the same group, no sooner than asked (the delay starts
//! when the server reads the NAK, after settle was called), to whichever
//! member pulls next. A dead letter ([`Outcome::DeadLetter`]) is published
//! to `<topic>.dlq` and, once JetStream acknowledged it, the original is
//! acked with a confirmed (double) ack, so a crash in between duplicates a
//! dead letter and never loses one. A delivery dropped unsettled is NAKed
//! at once; one the server never hears about (a process killed) comes back
//! after [`NatsOptions::ack_wait`].
//!
//! **Inspection from the server** (the `inspect` module): a group's
//! pending and unacked counts from its consumer, its retries from markers
//! in the namespace's `<namespace>_retries` stream (JetStream does not say
//! which unacked messages wait for a delayed NAK), dead letters read from
//! `<topic>.dlq`, which keeps them without a time limit. Any process sees
//! the same counts.
//!
//! **No per-key ordering.** JetStream keeps a stream's order, but members
//! of one group overlap, and a retried event comes back after its key's
//! later ones. (`max_ack_pending = 1` would order a group at the cost of
//! one event in flight for all its members; it is not what a group wants.)
//!
//! **Publish waits for the JetStream acknowledgement** of every event of
//! the batch, sent before any is awaited, so a batch costs one round trip,
//! not one per event.
//!
//! **CloudEvents NATS binding, both modes.** Binary mode (the default)
//! puts every attribute in a `ce-` header, percent-encoded as the binding
//! asks; structured mode sends the JSON format as
//! `application/cloudevents+json`. Both are read.
//!
//! **Server version: 2.10.0 or newer.** Older servers ignore consumer
//! settings they do not know rather than refusing them; [`NatsTransport::connect`]
//! refuses such a server, and one without JetStream, with a message
//! saying so.
//!
//! **Reconnection** is the client's: `async-nats` reconnects with backoff
//! and resubscribes; a member whose pull stream failed pulls again, and a
//! publish that could not be acknowledged in [`NatsOptions::publish_timeout`]
//! fails with a transient error for the caller to retry.
//!
//! [`NatsEngine`] is its registry entry (`nats://`, the `[nats]`
//! settings).
//!
//! No feature flags of its own.

mod codec;
mod consumer;
mod engine;
mod inspect;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use eventos_core::{
    Capabilities, DeliveryStream, Event, GroupCounts, Publisher, Subscriber, Subscription,
    Transport, TransportError, TransportErrorKind, redact_url,
};
use eventos_kit::{Lifecycle, lock};
use futures::future::BoxFuture;

pub use engine::{NatsEngine, NatsSection};

/// The oldest nats-server the transport talks to.
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 10, 0);

/// Room left in a NATS message for the headers of a binary-mode event.
const HEADER_ROOM: usize = 16 * 1024;

/// How events are laid out in NATS messages (both are always read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Attributes in `ce-` headers, the payload as the body.
    #[default]
    Binary,
    /// The CloudEvents JSON format as the body.
    Structured,
}

/// How to connect and what to create. `..NatsOptions::default()` fills in
/// the rest.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// How published events are encoded.
    pub mode: ContentMode,
    /// The first token of every subject and the prefix of every stream,
    /// so several systems or test runs can share a server. Default
    /// `eventos`.
    pub namespace: String,
    /// How long JetStream waits for a delivery to be settled before it
    /// hands it out again (a member that died). Default 30 s.
    pub ack_wait: Duration,
    /// How long a topic's stream keeps an event (what a new group can
    /// replay). Default seven days.
    pub max_age: Duration,
    /// Replicas of the streams the transport creates. Default 1, right
    /// for one server; a cluster wants 3.
    pub replicas: usize,
    /// How long a publish waits for JetStream's acknowledgement before it
    /// fails with a transient error. Default 10 s.
    pub publish_timeout: Duration,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            mode: ContentMode::Binary,
            namespace: "eventos".to_owned(),
            ack_wait: Duration::from_secs(30),
            max_age: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
            publish_timeout: Duration::from_secs(10),
        }
    }
}

/// What the transport's handles share.
pub(crate) struct Shared {
    client: async_nats::Client,
    js: jetstream::Context,
    options: NatsOptions,
    lifecycle: Lifecycle,
    /// Streams known to exist, by name.
    streams: Mutex<HashSet<String>>,
    /// The largest payload accepted in the publishing mode.
    max_payload: usize,
}

/// `name` as a JetStream stream or consumer name may hold it: what is
/// not a letter, digit, `_` or `-` becomes `_`, and a name that changed
/// gets a hash of the original, so `a.b` and `a_b` stay apart.
pub(crate) fn safe_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe == name {
        return safe;
    }
    let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).simple();
    format!("{safe}_{}", &hash.to_string()[..8])
}

impl Shared {
    /// The stream of `topic`.
    pub(crate) fn stream_name(&self, topic: &str) -> String {
        safe_name(&format!("{}_{topic}", self.options.namespace))
    }

    /// The subject `topic`'s events are published on: the topic itself
    /// under the namespace where it is a valid subject (no empty token),
    /// its stream's name otherwise.
    pub(crate) fn subject(&self, topic: &str) -> String {
        if topic.split('.').any(str::is_empty) {
            format!("{}.{}", self.options.namespace, safe_name(topic))
        } else {
            format!("{}.{topic}", self.options.namespace)
        }
    }

    /// Creates `topic`'s stream unless it is known to exist.
    pub(crate) async fn ensure_stream(&self, topic: &str) -> Result<String, TransportError> {
        let name = self.stream_name(topic);
        if lock(&self.streams).contains(&name) {
            return Ok(name);
        }
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![self.subject(topic)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            // Dead letters stay until someone deals with them.
            max_age: if topic.ends_with(".dlq") {
                Duration::ZERO
            } else {
                self.options.max_age
            },
            num_replicas: self.options.replicas,
            ..Default::default()
        };
        self.js.get_or_create_stream(config).await.map_err(|e| {
            unavailable(
                &format!("creating the JetStream stream {name:?} of topic {topic:?}"),
                &e,
            )
        })?;
        lock(&self.streams).insert(name.clone());
        Ok(name)
    }

    /// Publishes `events` to `topic` and returns once JetStream stored
    /// them all.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        events: &[Event],
    ) -> Result<(), TransportError> {
        self.ensure_stream(topic).await?;
        let subject = self.subject(topic);
        let what = format!("publishing to NATS subject {subject:?}");
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let encoded = codec::encode(event, self.options.mode);
            let ack = self
                .js
                .publish_with_headers(subject.clone(), encoded.headers, encoded.body)
                .await
                .map_err(|e| unavailable(&what, &e))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| unavailable(&what, &e))?;
        }
        Ok(())
    }
}

impl Shared {
    /// Waits until what this connection has queued (acks and NAKs sent
    /// without an answer) is out, reconnecting first if it must, for at
    /// most `limit`. A NAK queued while the server restarts is otherwise lost
    /// with the last handle on the connection, and its event waits out the
    /// ack wait.
    pub(crate) async fn flush_out(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.client.connection_state() == async_nats::connection::State::Connected
                && tokio::time::timeout(Duration::from_secs(5), self.client.flush())
                    .await
                    .is_ok_and(|flushed| flushed.is_ok())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(
            "NATS acks or NAKs may not have reached the server; JetStream hands those events out again after the ack wait"
        );
    }
}

/// A transient failure talking to NATS, naming what was being done.
pub(crate) fn unavailable(what: &str, e: &dyn std::fmt::Display) -> TransportError {
    TransportError::new(TransportErrorKind::Unavailable, format!("{what}: {e}"))
}

/// Parses a server version such as `2.10.24` or `2.11.0-RC.1`.
fn parse_version(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(str::parse::<u64>);
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let patch = parts.next().unwrap_or(Ok(0)).ok()?;
    Some((major, minor, patch))
}

/// Refuses a server older than [`MIN_SERVER_VERSION`], in one line.
fn check_version(version: &str) -> Result<(), String> {
    let (a, b, c) = MIN_SERVER_VERSION;
    match parse_version(version) {
        Some(found) if found >= MIN_SERVER_VERSION => Ok(()),
        Some(_) => Err(format!(
            "nats-server {version} is older than {a}.{b}.{c}, the oldest eventos-nats supports \
             (older servers ignore consumer settings it relies on): upgrade the server"
        )),
        None => Err(format!(
            "nats-server reports a version eventos-nats cannot read: {version:?}"
        )),
    }
}

/// The NATS JetStream transport. Cloning shares the connection.
#[derive(Clone)]
pub struct NatsTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl NatsTransport {
    /// Connects to the server at `url` (`nats://127.0.0.1:4222`, with
    /// `user:password@` if it wants them) and checks that it runs
    /// JetStream on a supported version.
    ///
    /// # Errors
    ///
    /// One line naming the problem: the server unreachable, too old, or
    /// without JetStream.
    pub async fn connect(url: &str, options: NatsOptions) -> Result<Self, TransportError> {
        let shown = redact_url(url);
        let client = async_nats::ConnectOptions::new()
            .name("eventos")
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| unavailable(&format!("connecting to NATS at {shown}"), &e))?;
        let info = client.server_info();
        check_version(&info.version)
            .map_err(|m| TransportError::new(TransportErrorKind::Other, m))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(options.publish_timeout)
            .build(client.clone());
        js.query_account().await.map_err(|e| {
            TransportError::new(
                TransportErrorKind::Other,
                format!(
                    "NATS at {shown} does not answer JetStream requests ({e}): start nats-server with JetStream enabled (-js)"
                ),
            )
        })?;
        let limit = info.max_payload.saturating_sub(HEADER_ROOM);
        let max_payload = match options.mode {
            ContentMode::Binary => limit,
            // A binary payload travels as base64 in the JSON format, a
            // third larger.
            ContentMode::Structured => limit / 4 * 3,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                js,
                options,
                lifecycle: Lifecycle::new(),
                streams: Mutex::new(HashSet::new()),
                max_payload,
            }),
        })
    }

    /// The JetStream stream that holds `topic`: for operators and tests.
    pub fn stream_name(&self, topic: &str) -> String {
        self.shared.stream_name(topic)
    }

    /// The subject `topic`'s events are published on.
    pub fn subject(&self, topic: &str) -> String {
        self.shared.subject(topic)
    }

    /// The durable consumer of `group`.
    pub fn consumer_name(group: &str) -> String {
        safe_name(group)
    }
}

impl Publisher for NatsTransport {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let shared = &self.shared;
            shared
                .lifecycle
                .check_publish("nats", topic, &events, shared.max_payload)?;
            if events.is_empty() {
                return Ok(());
            }
            shared.publish(topic, &events).await
        })
    }
}

impl Subscriber for NatsTransport {
    fn subscribe(
        &self,
        subscription: Subscription,
    ) -> BoxFuture<'_, Result<DeliveryStream, TransportError>> {
        Box::pin(async move {
            self.shared.lifecycle.check_subscribe(&subscription)?;
            consumer::subscribe(self.shared.clone(), subscription).await
        })
    }
}

impl Transport for NatsTransport {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_publish: true,
            persistent: true,
            consumer_groups: true,
            buffers_idle_groups: true,
            per_key_ordering: false,
            delayed_retry: true,
            replay: true,
            survives_broker_restart: true,
            max_payload_bytes: self.shared.max_payload,
            inspection: true,
        }
    }

    fn group_counts<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<GroupCounts>, TransportError>> {
        Box::pin(async move {
            self.shared.lifecycle.check_open()?;
            inspect::group_counts(&self.shared, topic, group).await
        })
    }

    fn dead_letters<'a>(
        &'a self,
        topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, TransportError>> {
        Box::pin(async move {
            self.shared.lifecycle.check_open()?;
            inspect::dead_letters(&self.shared, topic, limit).await
        })
    }

    fn dead_letter<'a>(
        &'a self,
        topic: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Event>, TransportError>> {
        Box::pin(async move {
            self.shared.lifecycle.check_open()?;
            inspect::dead_letter(&self.shared, topic, id).await
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            if self.shared.lifecycle.close() {
                // Acks and NAKs still queued go out before the close, over
                // a reconnection if the server is restarting.
                self.shared.flush_out(Duration::from_secs(10)).await;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_what_they_can_and_stay_apart() {
        assert_eq!(safe_name("billing-charges_v1"), "billing-charges_v1");
        let dotted = safe_name("a.b");
        assert!(dotted.starts_with("a_b_") && dotted.len() == 12, "{dotted}");
        assert_ne!(dotted, safe_name("a_b"));
        assert_ne!(safe_name("a.b"), safe_name("a-b.x"));
    }

    #[test]
    fn servers_older_than_2_10_are_refused_by_name() {
        assert!(check_version("2.10.0").is_ok());
        assert!(check_version("2.12.1").is_ok());
        assert!(check_version("3.0.0-RC.1").is_ok());
        let old = check_version("2.9.25").unwrap_err();
        assert!(old.contains("2.9.25") && old.contains("2.10.0"), "{old}");
        assert!(check_version("nonsense").is_err());
    }
}
