//! CloudEvents over ZeroMQ between eventos and a client that is not
//! eventos: pyzmq (libzmq itself, not the pure-Rust library eventos uses)
//! with the official CloudEvents SDK for Python, both ways. Every
//! attribute, extension and the data must come through.
//!
//! `scripts/test-deps` sets up `target/interop-venv`; the test fails
//! (never skips) when it is missing.

use std::time::Duration;

use eventos_core::{Publisher as _, Subscriber as _, Subscription, Transport as _};
use eventos_zmq::{Spool, ZmqOptions, ZmqTransport};
use futures::StreamExt;

/// Runs the Python side with `args`; its JSON lines.
async fn python(args: Vec<String>) -> Vec<serde_json::Value> {
    tokio::task::spawn_blocking(move || {
        eventos_test_brokers::run_interop("zmq_cloudevents.py", &args)
    })
    .await
    .unwrap()
}

fn unique(label: &str) -> String {
    format!("interop.{label}.{}", uuid::Uuid::now_v7().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pyzmq_consumer_reads_and_acks_what_eventos_publishes() {
    // The log spool replays a new group from the start, so the Python
    // member may join after the events are in.
    let spool = tempfile::tempdir().unwrap();
    let node = ZmqTransport::open(ZmqOptions {
        spool: Spool::Log(spool.path().to_owned()),
        ..ZmqOptions::default()
    })
    .await
    .unwrap();
    let endpoint = node.endpoint().unwrap().to_owned();
    let topic = unique("to-python");
    let (json, text) = eventos_test_brokers::interop::sample_events("enr-1 ü");
    node.publish(&topic, vec![json.clone(), text.clone()])
        .await
        .unwrap();
    let read = python(vec![
        "consume".into(),
        endpoint,
        topic.clone(),
        "python".into(),
        "2".into(),
        "30".into(),
    ])
    .await;
    eventos_test_brokers::interop::check_read(&read, &json, &text);
    // Its acks are carried out: nothing is left for the group.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let counts = node.group_counts(&topic, "python").await.unwrap().unwrap();
        if (counts.ready, counts.in_flight) == (0, 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Python acks were not carried out: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventos_consumes_from_a_pyzmq_publisher() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let published = tokio::spawn(python(vec!["publish".into(), endpoint.clone()]));
    let node = ZmqTransport::open(ZmqOptions {
        bind: None,
        peers: vec![endpoint],
        join_timeout: Duration::from_secs(20),
        ..ZmqOptions::default()
    })
    .await
    .unwrap();
    let topic = unique("from-python");
    let mut stream = node
        .subscribe(Subscription::new(&topic, "eventos"))
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the Python event within 30 s")
        .expect("a delivery")
        .expect("no stream error");
    let event = delivery.event().clone();
    assert_eq!(delivery.info().topic.as_ref(), topic);
    delivery.ack().await.unwrap();
    let written = published.await.unwrap();
    let written = &written[0];
    assert_eq!(written["outcome"], "ack");
    eventos_test_brokers::interop::check_written(&event, written, "");
    drop(stream);
    node.close().await.unwrap();
}
