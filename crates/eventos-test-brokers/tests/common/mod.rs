//! One write and one read on each broker, with its own client: what the
//! smoke tests check once and the restart tests check on both sides of a
//! restart. Every wait has a deadline.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use eventos_test_brokers::Broker;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::time::timeout;

/// The deadline of every single wait.
pub const WAIT: Duration = Duration::from_secs(30);

/// A name no other run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

// --- NATS ----------------------------------------------------------------

/// A JetStream context on the local server.
pub async fn jetstream() -> (async_nats::Client, jetstream::Context) {
    let url = Broker::Nats.require();
    let client = timeout(WAIT, async_nats::connect(&url))
        .await
        .expect("connecting to NATS timed out")
        .unwrap_or_else(|e| panic!("cannot connect to NATS at {url}: {e}"));
    let js = jetstream::new(client.clone());
    (client, js)
}

/// A file-backed stream `name` over the subject `name`.
pub async fn create_stream(js: &jetstream::Context, name: &str) -> stream::Stream {
    timeout(
        WAIT,
        js.create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![name.to_owned()],
            storage: stream::StorageType::File,
            ..Default::default()
        }),
    )
    .await
    .expect("creating the stream timed out")
    .expect("create the stream")
}

/// Publishes `payload` to the subject `subject` with a `ce-id` header and
/// waits for JetStream's acknowledgement; returns the stream sequence.
pub async fn nats_publish(js: &jetstream::Context, subject: &str, payload: &str) -> u64 {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("ce-id", payload);
    let ack = timeout(WAIT, async {
        js.publish_with_headers(subject.to_owned(), headers, payload.to_owned().into())
            .await
            .expect("publish")
            .await
            .expect("JetStream acknowledgement")
    })
    .await
    .expect("the JetStream publish timed out");
    assert_eq!(ack.stream, subject, "the acknowledgement names the stream");
    ack.sequence
}

/// Reads `n` messages through the durable pull consumer `durable`,
/// checks each one's `ce-id` header against its payload, acknowledges
/// them, and returns the payloads in order.
pub async fn nats_read(stream: &stream::Stream, durable: &str, n: usize) -> Vec<String> {
    let consumer = timeout(
        WAIT,
        stream.get_or_create_consumer(
            durable,
            consumer::pull::Config {
                durable_name: Some(durable.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("creating the consumer timed out")
    .expect("create the consumer");
    let mut messages = consumer
        .fetch()
        .max_messages(n)
        .expires(WAIT)
        .messages()
        .await
        .expect("fetch");
    let mut read = Vec::new();
    while read.len() < n {
        let message = timeout(WAIT, messages.next())
            .await
            .expect("no message from JetStream in time")
            .expect("the fetch ended early")
            .expect("a message");
        let payload = String::from_utf8(message.payload.to_vec()).unwrap();
        let id = message.headers.as_ref().and_then(|h| h.get("ce-id"));
        assert_eq!(
            id.map(|v| v.as_str()),
            Some(payload.as_str()),
            "header travels"
        );
        timeout(WAIT, message.double_ack())
            .await
            .expect("the ack timed out")
            .expect("ack");
        read.push(payload);
    }
    read
}

// --- Kafka ---------------------------------------------------------------

fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", Broker::Kafka.require());
    config
}

/// An admin client on the local broker.
pub fn kafka_admin() -> AdminClient<DefaultClientContext> {
    kafka_config().create().expect("an admin client")
}

/// Creates the topic `name`, one partition, one replica (the broker does
/// not create topics on first use).
pub async fn create_topic(admin: &AdminClient<DefaultClientContext>, name: &str) {
    let options = AdminOptions::new().operation_timeout(Some(WAIT));
    let results = timeout(
        WAIT,
        admin.create_topics(
            &[NewTopic::new(name, 1, TopicReplication::Fixed(1))],
            &options,
        ),
    )
    .await
    .expect("creating the topic timed out")
    .expect("create the topic");
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("cannot create topic {topic}: {code}"));
    }
}

/// Deletes the topic `name`.
pub async fn delete_topic(admin: &AdminClient<DefaultClientContext>, name: &str) {
    let options = AdminOptions::new().operation_timeout(Some(WAIT));
    let results = timeout(WAIT, admin.delete_topics(&[name], &options))
        .await
        .expect("deleting the topic timed out")
        .expect("delete the topic");
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("cannot delete topic {topic}: {code}"));
    }
}

/// Produces one record (key, payload, a `ce_id` header) with
/// `acks=all` on an idempotent producer and waits for its delivery report;
/// returns its offset.
pub async fn kafka_produce(topic: &str, key: &str, payload: &str) -> i64 {
    let producer: FutureProducer = kafka_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("a producer");
    let record =
        FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(OwnedHeaders::new().insert(Header {
                key: "ce_id",
                value: Some(payload),
            }));
    let delivery = producer
        .send(record, WAIT)
        .await
        .unwrap_or_else(|(e, _)| panic!("cannot produce to {topic}: {e}"));
    assert_eq!(delivery.partition, 0);
    delivery.offset
}

/// Reads `n` records from the start of `topic` in the consumer group
/// `group`, checks each one's `ce_id` header against its payload, commits
/// them, and returns `(key, payload)` in order.
pub async fn kafka_read(topic: &str, group: &str, n: usize) -> Vec<(String, String)> {
    let consumer: StreamConsumer = kafka_config()
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut read = Vec::new();
    while read.len() < n {
        let message = timeout(WAIT, consumer.recv())
            .await
            .expect("no record from Kafka in time")
            .expect("a record");
        let text = |b: Option<&[u8]>| String::from_utf8(b.unwrap_or_default().to_vec()).unwrap();
        let payload = text(message.payload());
        let header = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "ce_id"))
            .and_then(|h| h.value);
        assert_eq!(header, Some(payload.as_bytes()), "header travels");
        consumer
            .commit_message(&message, CommitMode::Sync)
            .expect("commit");
        read.push((text(message.key()), payload));
    }
    read
}

// --- RabbitMQ ------------------------------------------------------------

/// A connection to the local RabbitMQ.
pub async fn amqp() -> lapin::Connection {
    let url = Broker::RabbitMq.require();
    timeout(
        WAIT,
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
    )
    .await
    .expect("connecting to RabbitMQ timed out")
    .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ at {url}: {e}"))
}
