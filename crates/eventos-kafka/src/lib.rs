//! The Apache Kafka transport for eventos: for the volume, retention and
//! replay teams move to Kafka for.
//!
//! This is its first half: events published with the CloudEvents Kafka
//! binding by an idempotent producer that answers only once Kafka has
//! stored every event of a batch. Consuming, retry topics and the
//! registry entry follow on the same pieces.
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
//! No feature flags of its own; the CLI carries this crate behind one.

mod codec;

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use eventos_core::{Event, Publisher, TransportError, TransportErrorKind};
use eventos_kit::{Lifecycle, lock};
use futures::future::BoxFuture;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// The largest payload accepted by default: under the 1 MB that Kafka
/// brokers accept per record batch unless their operator raised it, with
/// room left for headers.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 900 * 1024;

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
    /// The largest payload accepted.
    pub max_payload_bytes: usize,
    /// How long a publish may wait for Kafka before it fails with a
    /// transient error (librdkafka's `message.timeout.ms`). Default 30 s.
    pub publish_timeout: Duration,
    /// librdkafka settings passed through as they are (`linger.ms`,
    /// `security.protocol`, …); they override the transport's own.
    pub client: BTreeMap<String, String>,
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
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidTopic) => {
            TransportErrorKind::Rejected
        }
        _ => TransportErrorKind::Unavailable,
    };
    TransportError::new(kind, format!("{what}: {e}"))
}

/// Publishes events to Kafka.
pub struct KafkaPublisher {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    options: KafkaOptions,
    /// Topics created (or found) since this publisher started.
    created: Mutex<HashSet<String>>,
    lifecycle: Lifecycle,
    servers: String,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("servers", &self.servers)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A publisher to the cluster at `url` (`kafka://127.0.0.1:9092`).
    /// librdkafka connects lazily; the first publish says whether the
    /// cluster answers.
    ///
    /// # Errors
    ///
    /// One line naming the problem: a bad URL, or a client setting
    /// librdkafka refuses.
    pub fn new(url: &str, options: KafkaOptions) -> Result<Self, TransportError> {
        let servers = bootstrap_servers(url)?;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set(
                "message.timeout.ms",
                options.publish_timeout.as_millis().to_string(),
            );
        for (key, value) in &options.client {
            config.set(key, value);
        }
        let refused = |e: KafkaError| {
            TransportError::new(
                TransportErrorKind::Other,
                format!("the Kafka client settings are refused: {e}"),
            )
        };
        let producer: FutureProducer = config.create().map_err(refused)?;
        let admin: AdminClient<DefaultClientContext> = config.create().map_err(refused)?;
        Ok(Self {
            producer,
            admin,
            options,
            created: Mutex::new(HashSet::new()),
            lifecycle: Lifecycle::new(),
            servers,
        })
    }

    /// Creates `topic` unless this publisher did already; a topic that
    /// exists is fine.
    async fn ensure_topic(&self, topic: &str) -> Result<(), TransportError> {
        if lock(&self.created).contains(topic) {
            return Ok(());
        }
        let new = NewTopic::new(
            topic,
            self.options.partitions,
            TopicReplication::Fixed(self.options.replication_factor),
        );
        let admin_options = AdminOptions::new()
            .request_timeout(Some(self.options.publish_timeout))
            .operation_timeout(Some(self.options.publish_timeout));
        let what = format!("creating Kafka topic {topic:?} on {}", self.servers);
        let results = self
            .admin
            .create_topics([&new], &admin_options)
            .await
            .map_err(|e| kafka_error(&what, &e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(kafka_error(&what, &KafkaError::AdminOp(code)));
                }
            }
        }
        lock(&self.created).insert(topic.to_owned());
        Ok(())
    }

    /// Refuses further publishes and waits for what is queued.
    pub async fn close(&self) {
        if self.lifecycle.close() {
            let producer = self.producer.clone();
            let _ =
                tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
        }
    }
}

impl Publisher for KafkaPublisher {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            self.lifecycle.check_publish(
                "kafka",
                topic,
                &events,
                self.options.max_payload_bytes,
            )?;
            if events.is_empty() {
                return Ok(());
            }
            self.ensure_topic(topic).await?;
            let encoded: Vec<_> = events
                .iter()
                .map(|e| codec::encode(e, self.options.mode))
                .collect();
            let what = format!("publishing to Kafka topic {topic:?}");
            // Everything is queued before anything is awaited, so librdkafka
            // batches the lot; a full queue is waited out on what is
            // already in flight.
            let mut pending = Vec::with_capacity(encoded.len());
            for record in &encoded {
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
        })
    }
}
