//! CloudEvents over ZeroMQ between eventos and a client that is not
//! eventos: pyzmq (libzmq itself, not the pure-Rust library eventos uses)
//! with the official CloudEvents SDK for Python, both ways. Every
//! attribute, extension and the data must come through.
//!
//! `scripts/test-deps` sets up `target/interop-venv`; the test fails
//! (never skips) when it is missing.

use std::time::Duration;

use eventos_core::{Event, Publisher as _, Subscriber as _, Subscription, Transport as _};
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
    assert_eq!(read.len(), 2, "{read:?}");
    let (a, b) = (&read[0], &read[1]);
    assert_eq!(a["topic"], topic.as_str());
    assert_eq!(a["attempt"], 1);
    assert_eq!(a["attributes"]["id"], json.id());
    assert_eq!(a["attributes"]["specversion"], "1.0");
    assert_eq!(a["attributes"]["source"], "/school/enrollment");
    assert_eq!(
        a["attributes"]["type"],
        "school.enrollment.payment_submitted.v1"
    );
    assert_eq!(a["attributes"]["subject"], "enr-1 ü");
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
    let attributes = &written["attributes"];
    assert_eq!(event.id(), attributes["id"].as_str().unwrap());
    assert_eq!(event.source(), "/python");
    assert_eq!(event.ty(), "school.python.note.v1");
    assert_eq!(event.subject(), Some("python-1"));
    assert_eq!(event.extension_str("correlationid"), Some("corr-py"));
    assert_eq!(event.datacontenttype(), Some("application/json"));
    let data: serde_json::Value = serde_json::from_slice(event.data().unwrap()).unwrap();
    assert_eq!(data, serde_json::json!({"from": "python", "n": 7}));
    let sent =
        eventos_core::chrono::DateTime::parse_from_rfc3339(attributes["time"].as_str().unwrap())
            .unwrap()
            .to_utc();
    assert_eq!(event.time(), Some(sent));
    drop(stream);
    node.close().await.unwrap();
}
