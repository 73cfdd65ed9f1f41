//! CloudEvents on Kafka between eventos and a client that is not eventos:
//! confluent-kafka with the official CloudEvents SDK for Python (its Kafka
//! binding), in both content modes and both directions. Every attribute,
//! extension, the data and the key must come through.
//!
//! `scripts/test-deps` sets up `target/interop-venv`; the test fails
//! (never skips) when it or Kafka is missing.

use std::time::Duration;

use eventos_core::{Publisher as _, Subscriber as _, Subscription, Transport as _};
use eventos_kafka::{ContentMode, KafkaOptions, KafkaTransport};
use eventos_test_brokers::Broker;
use futures::StreamExt;

/// Runs the Python side with `args`; its JSON lines.
async fn python(args: Vec<String>) -> Vec<serde_json::Value> {
    tokio::task::spawn_blocking(move || {
        eventos_test_brokers::run_interop("kafka_cloudevents.py", &args)
    })
    .await
    .unwrap()
}

fn transport(mode: ContentMode) -> KafkaTransport {
    let url = format!("kafka://{}", Broker::Kafka.require());
    KafkaTransport::connect(
        &url,
        KafkaOptions {
            mode,
            ..KafkaOptions::default()
        },
    )
    .unwrap()
}

fn unique(label: &str) -> String {
    format!("interop.{label}.{}", uuid::Uuid::now_v7().simple())
}

async fn python_reads(mode: ContentMode) {
    let kafka = transport(mode);
    let topic = unique("to-python");
    let (json, text) = eventos_test_brokers::interop::sample_events("enr-1");
    kafka
        .publish(&topic, vec![json.clone(), text.clone()])
        .await
        .unwrap();
    kafka.close().await.unwrap();
    let read = python(vec![
        "read".into(),
        Broker::Kafka.require(),
        topic,
        "2".into(),
        "30".into(),
    ])
    .await;
    eventos_test_brokers::interop::check_read(&read, &json, &text);
    assert_eq!(read[0]["key"], "enr-1", "the subject is the key");
}

async fn eventos_reads(mode: &str) {
    let kafka = transport(ContentMode::Binary);
    let topic = unique("from-python");
    // Subscribing creates the topic (the broker does not on first use).
    let mut stream = kafka
        .subscribe(Subscription::new(&topic, "eventos"))
        .await
        .unwrap();
    let written = python(vec![
        "write".into(),
        Broker::Kafka.require(),
        topic,
        mode.into(),
    ])
    .await;
    let written = &written[0];
    let delivery = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the Python event within 30 s")
        .expect("a delivery")
        .expect("no stream error");
    let event = delivery.event().clone();
    delivery.ack().await.unwrap();
    eventos_test_brokers::interop::check_written(&event, written, mode);
    kafka.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_cloudevents_sdk_reads_binary_mode() {
    python_reads(ContentMode::Binary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_cloudevents_sdk_reads_structured_mode() {
    python_reads(ContentMode::Structured).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventos_reads_what_python_wrote_in_binary_mode() {
    eventos_reads("binary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventos_reads_what_python_wrote_in_structured_mode() {
    eventos_reads("structured").await;
}
