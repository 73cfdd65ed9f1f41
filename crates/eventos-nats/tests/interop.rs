//! CloudEvents on NATS between eventos and a client that is not eventos:
//! nats-py with the official CloudEvents SDK for Python, in both content
//! modes and both directions. Every attribute, extension and the data must
//! come through.
//!
//! `scripts/test-deps` sets up `target/interop-venv`; the test fails
//! (never skips) when it or NATS is missing.

use std::time::Duration;

use eventos_core::{Publisher as _, Subscriber as _, Subscription, Transport as _};
use eventos_nats::{ContentMode, NatsOptions, NatsTransport};
use eventos_test_brokers::Broker;
use futures::StreamExt;

/// Runs the Python side with `args`; its JSON lines.
async fn python(args: Vec<String>) -> Vec<serde_json::Value> {
    tokio::task::spawn_blocking(move || {
        eventos_test_brokers::run_interop("nats_cloudevents.py", &args)
    })
    .await
    .unwrap()
}

async fn transport(mode: ContentMode) -> NatsTransport {
    NatsTransport::connect(
        &Broker::Nats.require(),
        NatsOptions {
            mode,
            ..NatsOptions::default()
        },
    )
    .await
    .unwrap()
}

fn unique(label: &str) -> String {
    format!("interop.{label}.{}", uuid::Uuid::now_v7().simple())
}

async fn python_reads(mode: ContentMode) {
    let nats = transport(mode).await;
    let topic = unique("to-python");
    let (json, text) = eventos_test_brokers::interop::sample_events("enr-1 ü");
    nats.publish(&topic, vec![json.clone(), text.clone()])
        .await
        .unwrap();
    let (stream, subject) = (nats.stream_name(&topic), nats.subject(&topic));
    nats.close().await.unwrap();
    let read = python(vec![
        "read".into(),
        Broker::Nats.require(),
        stream,
        subject,
        "2".into(),
        "30".into(),
    ])
    .await;
    eventos_test_brokers::interop::check_read(&read, &json, &text);
}

async fn eventos_reads(mode: &str) {
    let nats = transport(ContentMode::Binary).await;
    let topic = unique("from-python");
    // Subscribing creates the stream the Python side publishes into.
    let mut stream = nats
        .subscribe(Subscription::new(&topic, "eventos"))
        .await
        .unwrap();
    let written = python(vec![
        "write".into(),
        Broker::Nats.require(),
        nats.subject(&topic),
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
    drop(stream);
    nats.close().await.unwrap();
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
