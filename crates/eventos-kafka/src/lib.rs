//! The Apache Kafka transport for eventos: for the volume, retention and
//! replay teams move to Kafka for.
//!
//! [`KafkaTransport::connect`] makes one idempotent producer for the
//! transport and one Kafka consumer per subscription; it keeps the
//! transport contract of [`eventos_core`] — fan-out to groups, competing
//! members, replay, stored retries, dead letters, durable publishes.
//!
//! # The decisions that shaped it
//!
//! **rdkafka over librdkafka, bundled.** librdkafka is the client every
//! other language's Kafka library wraps, the one whose producer
//! idempotence and consumer group protocol are proven at scale; the
//! `cmake-build` feature compiles 2.11 or newer into the binary, since the
//! older ones some distributions carry mis-negotiate with Kafka 4.
//!
//! **Idempotent, `acks=all`, one answer per batch.** [`Publisher::publish`]
//! hands every event of the batch to librdkafka before waiting for any, so
//! they travel in librdkafka's own batches, not one round trip each, and
//! returns once every delivery report is in: stored by every in-sync
//! replica. Idempotence keeps a retried send from duplicating or
//! reordering a record within its partition.
//!
//! **The subject is the key.** Kafka orders within a partition, and the
//! default partitioner puts one key in one partition, so events about one
//! subject stay in publish order, the order eventos promises per key.
//! Events without a subject are spread by librdkafka's default partitioner.
//!
//! **Topics are created by the transport**, with [`KafkaOptions::partitions`]
//! and [`KafkaOptions::replication_factor`], the first time a topic is
//! published to, rather than left to the broker's auto-creation, whose
//! settings are the broker operator's and usually off in production.
//!
//! **Consumers, offsets, retries:** see the `consumer` module: a Kafka
//! consumer group per eventos group and topic, offsets committed over the
//! settled prefix only (the kit's [`eventos_kit::SettledCursor`]), retries
//! in retry topics of the group's own by delay tier
//! (`<topic>.retry.<group>.<tier>`), held in memory until due, a bounded
//! number per partition, dead letters on `<topic>.dlq`. A member whose prefetch stays full keeps
//! polling with its partitions paused, so a busy member never holds up its
//! group's rebalances.
//!
//! **Inspection as far as Kafka lets us** (the `inspect` module): lag
//! from committed offsets and partition ends, retries and dead letters by
//! reading their topics. Kafka cannot say what a member in another
//! process has in hand, so there it counts as ready; this process's own
//! members add their cursors, which tell ready from in flight.
//!
//! [`KafkaEngine`] is its registry entry (`kafka://`, the `[kafka]`
//! settings).
//!
//! No feature flags of its own.

mod codec;
mod consumer;
mod engine;
mod inspect;

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use std::sync::Arc;

use eventos_core::{
    Capabilities, DeliveryStream, Event, GroupCounts, Publisher, Subscriber, Subscription,
    Transport, TransportError, TransportErrorKind,
};
use eventos_kit::{Lifecycle, lock};
use futures::future::BoxFuture;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

pub use engine::{KafkaEngine, KafkaSection};

/// The largest payload accepted by default: under the 1 MB that Kafka
/// brokers accept per record batch unless their operator raised it, with
/// room left for headers.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 900 * 1024;

/// The librdkafka settings of the transport's producer (before the
/// `[kafka]` client overrides): public so that a baseline measured against
/// the transport can produce the same way.
pub const PRODUCER_SETTINGS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "2"),
    // Events without a subject (no key) are spread one by one over the
    // partitions, so a group's members share them; sticky batches would
    // put a whole burst in one partition.
    ("sticky.partitioning.linger.ms", "0"),
];

pub use consumer::FETCH_SETTINGS;

/// How events are laid out in Kafka records (both are always read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Attributes in `ce_` headers, the payload as the value.
    #[default]
    Binary,
    /// The CloudEvents JSON format as the value.
    Structured,
}

/// How to connect and what to create. `..KafkaOptions::default()` fills in
/// the rest.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// How published events are encoded.
    pub mode: ContentMode,
    /// Partitions of the topics the transport creates. Default 6: room for
    /// six members of a group to share a topic.
    pub partitions: i32,
    /// Replication factor of the topics the transport creates. Default 1,
    /// right for one broker; production clusters want 3.
    pub replication_factor: i32,
    /// The largest payload accepted in binary mode, where it is the record's
    /// value as is. Structured mode accepts three quarters of it: a binary
    /// payload travels there as base64, a third larger, and the record
    /// must still fit the broker's `message.max.bytes` (1 MiB by default).
    pub max_payload_bytes: usize,
    /// How long a publish may wait for Kafka before it fails with a
    /// transient error (librdkafka's `message.timeout.ms`). Default 30 s.
    pub publish_timeout: Duration,
    /// librdkafka settings passed through as they are (`linger.ms`,
    /// `security.protocol`, …); they override the transport's own.
    pub client: BTreeMap<String, String>,
    /// A prefix for every topic (and so every consumer group) the
    /// transport uses, `<namespace>.<topic>`, so several systems or test
    /// runs can share a cluster; empty (the default) uses the topics' own
    /// names, as other Kafka clients see them.
    pub namespace: String,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            mode: ContentMode::Binary,
            partitions: 6,
            replication_factor: 1,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            publish_timeout: Duration::from_secs(30),
            client: BTreeMap::new(),
            namespace: String::new(),
        }
    }
}

/// The bootstrap servers of a `kafka://host:port[,host:port]` URL.
///
/// # Errors
///
/// One line saying what is wrong with the URL.
pub fn bootstrap_servers(url: &str) -> Result<String, TransportError> {
    let invalid = |why: &str| {
        TransportError::new(
            TransportErrorKind::Other,
            format!("invalid Kafka URL {url:?}: {why}; write kafka://host:9092[,host:9092]"),
        )
    };
    let rest = url
        .strip_prefix("kafka://")
        .ok_or_else(|| invalid("it does not start with kafka://"))?;
    let servers = rest.split(['/', '?']).next().unwrap_or_default();
    if servers.is_empty() {
        return Err(invalid("it names no broker"));
    }
    for server in servers.split(',') {
        let (host, port) = server
            .rsplit_once(':')
            .ok_or_else(|| invalid(&format!("{server:?} has no port")))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(invalid(&format!("{server:?} is not host:port")));
        }
    }
    Ok(servers.to_owned())
}

/// Reads an event from a Kafka record in either content mode, as this
/// transport writes them and as other CloudEvents producers do: for
/// consumers of eventos topics that use their own Kafka client.
///
/// # Errors
///
/// A message saying why the record is not a CloudEvent.
pub fn event_from_record<M: rdkafka::Message>(record: &M) -> Result<Event, String> {
    codec::decode(record.headers(), record.payload())
}

fn kafka_error(what: &str, e: &KafkaError) -> TransportError {
    let kind = match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => TransportErrorKind::Rejected,
        Some(RDKafkaErrorCode::InvalidTopic) => TransportErrorKind::InvalidName,
        _ => TransportErrorKind::Unavailable,
    };
    TransportError::new(kind, format!("{what}: {e}"))
}

/// Whether `e` says a partition's leader is not settled yet: a topic just
/// created, or a leader moving; asking again shortly answers.
fn leader_moving(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownTopicOrPartition
        )
    )
}

/// What the transport's parts share: the producer, the admin client, the
/// options.
pub(crate) struct Shared {
    pub(crate) producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    pub(crate) options: KafkaOptions,
    /// The client settings every consumer starts from.
    pub(crate) base: ClientConfig,
    /// Topics created (or found) since the transport started.
    created: Mutex<HashSet<String>>,
    pub(crate) lifecycle: Lifecycle,
    pub(crate) servers: String,
    /// This process's consumer-group members, for inspection.
    pub(crate) members: consumer::Members,
}

impl Shared {
    /// The largest payload a publish accepts in the content mode chosen.
    pub(crate) fn max_payload_bytes(&self) -> usize {
        let max = self.options.max_payload_bytes;
        match self.options.mode {
            ContentMode::Binary => max,
            ContentMode::Structured => max / 4 * 3,
        }
    }

    /// The Kafka topic of an eventos topic: under the namespace, if set.
    pub(crate) fn physical(&self, topic: &str) -> String {
        if self.options.namespace.is_empty() {
            topic.to_owned()
        } else {
            format!("{}.{topic}", self.options.namespace)
        }
    }

    /// Creates `topic` unless this transport did already; a topic that
    /// exists is fine.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<(), TransportError> {
        self.ensure_topics(&[topic]).await
    }

    /// Creates those of `topics` this transport has not created yet, in one
    /// request, and waits until the cluster's metadata lists them all.
    pub(crate) async fn ensure_topics(&self, topics: &[&str]) -> Result<(), TransportError> {
        let missing: Vec<&str> = {
            let created = lock(&self.created);
            topics
                .iter()
                .copied()
                .filter(|t| !created.contains(*t))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|topic| {
                NewTopic::new(
                    topic,
                    self.options.partitions,
                    TopicReplication::Fixed(self.options.replication_factor),
                )
            })
            .collect();
        let admin_options = AdminOptions::new()
            .request_timeout(Some(self.options.publish_timeout))
            .operation_timeout(Some(self.options.publish_timeout));
        let what = format!(
            "creating Kafka topic {:?} on {}",
            missing.join(", "),
            self.servers
        );
        let results = self
            .admin
            .create_topics(&new, &admin_options)
            .await
            .map_err(|e| kafka_error(&what, &e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    let what = format!("creating Kafka topic {topic:?} on {}", self.servers);
                    return Err(kafka_error(&what, &KafkaError::AdminOp(code)));
                }
            }
        }
        self.await_metadata(&missing, &what).await?;
        lock(&self.created).extend(missing.iter().map(|t| (*t).to_owned()));
        Ok(())
    }

    /// Waits until the cluster's metadata lists every one of `topics` with
    /// its partitions. A topic reaches the metadata a moment after its
    /// creation is answered, and a consumer that subscribes before would
    /// be assigned without it, then rebalance once it appears: taking back
    /// every delivery in hand.
    async fn await_metadata(&self, topics: &[&str], what: &str) -> Result<(), TransportError> {
        let producer = self.producer.clone();
        let timeout = self.options.publish_timeout;
        let mut waiting: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let task_what = what.to_owned();
        tokio::task::spawn_blocking(move || {
            let what = task_what;
            let deadline = std::time::Instant::now() + timeout;
            loop {
                // One by one: rdkafka asks for one topic or for all of
                // the cluster's.
                let mut still = Vec::new();
                for topic in waiting {
                    let metadata = producer
                        .client()
                        .fetch_metadata(Some(&topic), timeout)
                        .map_err(|e| kafka_error(&what, &e))?;
                    // Every partition led, too: before that, asking for a
                    // partition's end or offsets is refused.
                    let ready = metadata.topics().iter().any(|t| {
                        t.name() == topic
                            && t.error().is_none()
                            && !t.partitions().is_empty()
                            && t.partitions()
                                .iter()
                                .all(|p| p.error().is_none() && p.leader() >= 0)
                    });
                    if !ready {
                        still.push(topic);
                    }
                }
                waiting = still;
                if waiting.is_empty() {
                    return Ok(());
                }
                if std::time::Instant::now() >= deadline {
                    return Err(TransportError::new(
                        TransportErrorKind::Unavailable,
                        format!(
                            "{what}: {} not in the cluster's metadata after {timeout:?}",
                            waiting.join(", ")
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .map_err(|e| {
            TransportError::new(
                TransportErrorKind::Other,
                format!("{what}: the metadata task failed: {e}"),
            )
        })?
    }

    /// Produces `records` to `topic` and returns once Kafka stored them
    /// all. Everything is queued before anything is awaited, so librdkafka
    /// batches the lot; a full queue is waited out on what is in flight.
    pub(crate) async fn produce(
        &self,
        topic: &str,
        records: &[codec::Encoded],
    ) -> Result<(), TransportError> {
        let what = format!("publishing to Kafka topic {topic:?}");
        let mut pending = Vec::with_capacity(records.len());
        for record in records {
            let headers = record.owned_headers();
            loop {
                let mut future = FutureRecord::to(topic)
                    .payload(&record.value)
                    .headers(headers.clone());
                if let Some(key) = &record.key {
                    future = future.key(key);
                }
                match self.producer.send_result(future) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(kafka_error(&what, &e)),
                }
            }
        }
        let mut first_error = None;
        for delivery in pending {
            let failed = match delivery.await {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => Some(kafka_error(&what, &e)),
                Err(_) => Some(TransportError::new(
                    TransportErrorKind::Unavailable,
                    format!("{what}: the producer went away before Kafka answered"),
                )),
            };
            if first_error.is_none() {
                first_error = failed;
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The Kafka transport. Cloning shares the producer.
#[derive(Clone)]
pub struct KafkaTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("servers", &self.shared.servers)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl KafkaTransport {
    /// A transport for the cluster at `url` (`kafka://127.0.0.1:9092`).
    /// librdkafka connects lazily; the first publish or subscription says
    /// whether the cluster answers.
    ///
    /// # Errors
    ///
    /// One line naming the problem: a bad URL, or a client setting
    /// librdkafka refuses.
    pub fn connect(url: &str, options: KafkaOptions) -> Result<Self, TransportError> {
        let servers = bootstrap_servers(url)?;
        let mut base = ClientConfig::new();
        base.set("bootstrap.servers", &servers);
        for (key, value) in &options.client {
            base.set(key, value);
        }
        let mut config = base.clone();
        for (key, value) in PRODUCER_SETTINGS {
            config.set(*key, *value);
        }
        config.set(
            "message.timeout.ms",
            options.publish_timeout.as_millis().to_string(),
        );
        for (key, value) in &options.client {
            config.set(key, value);
        }
        let producer: FutureProducer = config.create().map_err(|e| refused(&e))?;
        let admin: AdminClient<DefaultClientContext> = base.create().map_err(|e| refused(&e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                producer,
                admin,
                options,
                base,
                created: Mutex::new(HashSet::new()),
                lifecycle: Lifecycle::new(),
                servers,
                members: consumer::Members::default(),
            }),
        })
    }

    /// The topics that hold `group`'s retries of `topic`, one per delay
    /// tier, shortest first: for operators and tests.
    pub fn retry_topics(&self, topic: &str, group: &str) -> Vec<String> {
        consumer::retry_topics(&self.shared.physical(topic), group)
    }
}

fn refused(e: &KafkaError) -> TransportError {
    TransportError::new(
        TransportErrorKind::Other,
        format!("the Kafka client settings are refused: {e}"),
    )
}

impl Publisher for KafkaTransport {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let shared = &self.shared;
            shared
                .lifecycle
                .check_publish("kafka", topic, &events, shared.max_payload_bytes())?;
            if events.is_empty() {
                return Ok(());
            }
            let topic = shared.physical(topic);
            shared.ensure_topic(&topic).await?;
            let encoded: Vec<_> = events
                .iter()
                .map(|e| codec::encode(e, shared.options.mode, codec::Stamp::default()))
                .collect();
            shared.produce(&topic, &encoded).await
        })
    }
}

impl Subscriber for KafkaTransport {
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

impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_publish: true,
            persistent: true,
            consumer_groups: true,
            buffers_idle_groups: true,
            // A partition keeps one key's order, but a member holds up to
            // its prefetch at once and retries come back later.
            per_key_ordering: false,
            delayed_retry: true,
            replay: true,
            survives_broker_restart: true,
            max_payload_bytes: self.shared.max_payload_bytes(),
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
                let producer = self.shared.producer.clone();
                let _ =
                    tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
                        .await;
            }
            Ok(())
        })
    }
}
