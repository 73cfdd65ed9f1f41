//! CloudEvents on NATS between eventos and a client that is not eventos:
//! nats-py with the official CloudEvents SDK for Python, in both content
//! modes and both directions. Every attribute, extension and the data must
//! come through.
//!
//! `scripts/test-deps` sets up `target/interop-venv`; the test fails
//! (never skips) when it or NATS is missing.

use std::time::Duration;

use eventos_core::{Event, Publisher as _, Subscriber as _, Subscription, Transport as _};
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
    let json = Event::builder(
        "/school/enrollment",
        "school.enrollment.payment_submitted.v1",
    )
    .subject("enr-1 ü")
    .json(&serde_json::json!({"enrollment_id": "enr-1", "amount_cents": 49900}))
    .unwrap()
    .extension("correlationid", "corr-1")
    .unwrap()
    .build()
    .unwrap();
    let text = Event::builder("/school/contact", "school.contact.note.v1")
        .subject("enr-1")
        .data("text/plain", "olá, mundo")
        .build()
        .unwrap();
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
    assert_eq!(read.len(), 2, "{read:?}");
    let (a, b) = (&read[0], &read[1]);
    assert_eq!(a["attributes"]["id"], json.id());
    assert_eq!(a["attributes"]["specversion"], "1.0");
    assert_eq!(a["attributes"]["source"], "/school/enrollment");
    assert_eq!(
        a["attributes"]["type"],
        "school.enrollment.payment_submitted.v1"
    );
    assert_eq!(a["attributes"]["subject"], "enr-1 ü", "percent-decoded");
    assert_eq!(a["attributes"]["correlationid"], "corr-1");
    assert_eq!(a["attributes"]["datacontenttype"], "application/json");
    let sent = json.time().unwrap();
    let got = eventos_core::chrono::DateTime::parse_from_rfc3339(
        a["attributes"]["time"].as_str().unwrap(),
    )
    .unwrap()
    .to_utc();
    assert!(
        (sent - got).num_microseconds().unwrap().abs() < 1,
        "{sent} vs {got}"
    );
    assert_eq!(a["data"]["amount_cents"], 49900);
    assert_eq!(b["attributes"]["id"], text.id());
    assert_eq!(b["attributes"]["datacontenttype"], "text/plain");
    assert_eq!(b["data"], "olá, mundo");
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
    let attributes = &written["attributes"];
    assert_eq!(event.id(), attributes["id"].as_str().unwrap(), "{mode}");
    assert_eq!(event.source(), "/python");
    assert_eq!(event.ty(), "school.python.note.v1");
    assert_eq!(event.subject(), Some("python-1"));
    assert_eq!(event.extension_str("correlationid"), Some("corr-py"));
    assert_eq!(event.datacontenttype(), Some("application/json"));
    let data: serde_json::Value = serde_json::from_slice(event.data().unwrap()).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"from": "python", "n": 7}),
        "{mode}"
    );
    let sent =
        eventos_core::chrono::DateTime::parse_from_rfc3339(attributes["time"].as_str().unwrap())
            .unwrap()
            .to_utc();
    assert_eq!(event.time(), Some(sent), "{mode}");
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
