//! What the conformance suite cannot see: the wire format read with a raw
//! AMQP client, the precision of delayed retries, parked dead letters,
//! connection errors, and publishing through a broker restart.
//!
//! Needs the RabbitMQ at `EVENTOS_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`); without it these tests fail,
//! they never skip. Queues the tests declare themselves are exclusive, so
//! RabbitMQ removes them with the test's connection; each test deletes the
//! transport's queues it caused, and only those, when it passes.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use eventos_amqp::{
    AmqpOptions, AmqpTransport, ContentMode, DELAY_LADDER_MS, PARKED_GROUP, delay_bucket,
};
use eventos_core::{
    DeliveryStream, Event, Publisher, Subscriber, Subscription, Transport, TransportErrorKind,
    dead_letter_topic, ext,
};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::RwLock;

const NAMESPACE: &str = "eventos-test";
const WAIT: Duration = Duration::from_secs(10);

/// Broker restarts take the write side; every other test the read side.
static BROKER: RwLock<()> = RwLock::const_new(());

fn url() -> String {
    std::env::var("EVENTOS_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn options(mode: ContentMode) -> AmqpOptions {
    AmqpOptions {
        namespace: NAMESPACE.to_owned(),
        mode,
        ..AmqpOptions::default()
    }
}

async fn transport(mode: ContentMode) -> AmqpTransport {
    AmqpTransport::connect(&url(), options(mode))
        .await
        .unwrap_or_else(|e| panic!("{e} (set EVENTOS_AMQP_URL to use another broker)"))
}

fn unique(label: &str) -> String {
    format!("test.{label}.{}", uuid::Uuid::now_v7().simple())
}

fn event() -> Event {
    Event::builder("urn:eventos:test", "eventos.test.wire.v1")
        .subject("students/42")
        .data("application/json", r#"{"n":1}"#)
        .extension(ext::CORRELATION_ID, "corr-1")
        .and_then(|b| b.build())
        .unwrap()
}

/// Deletes queues this test caused the transport to declare.
async fn delete_queues(queues: &[String]) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("a connection for the clean-up");
    let channel = conn.create_channel().await.unwrap();
    for queue in queues {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    conn.close(200, "clean-up done".into()).await.unwrap();
}

/// A raw consumer of everything published to `topic`, on an exclusive queue.
async fn raw_tap(topic: &str) -> (Connection, lapin::Consumer) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("a raw connection to RabbitMQ");
    let channel = conn.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            NAMESPACE.into(),
            topic.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, consumer)
}

async fn next_raw(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a message on the raw tap")
        .expect("the raw consumer is open")
        .expect("a delivery")
}

fn header(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

async fn next(stream: &mut DeliveryStream) -> eventos_core::Delivery {
    loop {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(delivery))) => return delivery,
            Ok(Some(Err(e))) if e.is_transient() => {}
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_puts_attributes_in_cloud_events_headers() {
    let _broker = BROKER.read().await;
    let topic = unique("binary");
    let (_conn, mut tap) = raw_tap(&topic).await;
    let amqp = transport(ContentMode::Binary).await;
    let sent = event();
    amqp.publish(&topic, vec![sent.clone()]).await.unwrap();

    let raw = next_raw(&mut tap).await;
    assert_eq!(header(&raw, "cloudEvents:id").as_deref(), Some(sent.id()));
    assert_eq!(
        header(&raw, "cloudEvents:specversion").as_deref(),
        Some("1.0")
    );
    assert_eq!(
        header(&raw, "cloudEvents:source").as_deref(),
        Some("urn:eventos:test")
    );
    assert_eq!(
        header(&raw, "cloudEvents:type").as_deref(),
        Some("eventos.test.wire.v1")
    );
    assert_eq!(
        header(&raw, "cloudEvents:subject").as_deref(),
        Some("students/42")
    );
    assert_eq!(
        header(&raw, "cloudEvents:correlationid").as_deref(),
        Some("corr-1")
    );
    assert!(header(&raw, "cloudEvents:time").is_some());
    assert_eq!(
        header(&raw, "cloudEvents:datacontenttype"),
        None,
        "datacontenttype travels in the content_type property"
    );
    assert_eq!(
        raw.properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(raw.properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(raw.data, br#"{"n":1}"#);
    amqp.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_sends_the_json_event_format() {
    let _broker = BROKER.read().await;
    let topic = unique("structured");
    let (_conn, mut tap) = raw_tap(&topic).await;
    let amqp = transport(ContentMode::Structured).await;
    let sent = event();
    amqp.publish(&topic, vec![sent.clone()]).await.unwrap();

    let raw = next_raw(&mut tap).await;
    assert_eq!(
        raw.properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/cloudevents+json")
    );
    assert_eq!(header(&raw, "cloudEvents:id"), None);
    let doc: serde_json::Value = serde_json::from_slice(&raw.data).unwrap();
    assert_eq!(doc["id"], sent.id());
    assert_eq!(doc["specversion"], "1.0");
    assert_eq!(doc["data"]["n"], 1);
    assert_eq!(Event::from_json(&raw.data).unwrap(), sent);
    amqp.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reads_both_content_modes() {
    let _broker = BROKER.read().await;
    let topic = unique("modes");
    let reader = transport(ContentMode::Binary).await;
    let mut stream = reader
        .subscribe(Subscription::new(&topic, "reader"))
        .await
        .unwrap();
    let structured = transport(ContentMode::Structured).await;
    let (a, b) = (event(), event());
    structured.publish(&topic, vec![a.clone()]).await.unwrap();
    reader.publish(&topic, vec![b.clone()]).await.unwrap();
    for expected in [a, b] {
        let delivery = next(&mut stream).await;
        assert_eq!(**delivery.event(), expected);
        delivery.ack().await.unwrap();
    }
    structured.close().await.unwrap();
    reader.close().await.unwrap();
    delete_queues(&[reader.queue_name(&topic, "reader")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_300ms_comes_back_no_sooner() {
    const AFTER: Duration = Duration::from_millis(300);
    let _broker = BROKER.read().await;
    let topic = unique("retry");
    let amqp = transport(ContentMode::Binary).await;
    let mut stream = amqp
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .unwrap();
    amqp.publish(&topic, vec![event()]).await.unwrap();
    let mut delivery = next(&mut stream).await;
    for attempt in 1..=3u32 {
        assert_eq!(delivery.attempt(), attempt);
        let called = Instant::now();
        delivery.retry_after(AFTER).await.unwrap();
        delivery = next(&mut stream).await;
        let waited = called.elapsed();
        assert!(
            waited >= AFTER,
            "came back after {waited:?}, asked {AFTER:?}"
        );
        // The 300 ms bucket, plus broker and scheduling latency.
        assert!(
            waited < AFTER + Duration::from_millis(700),
            "came back after {waited:?}"
        );
    }
    assert_eq!(delivery.attempt(), 4);
    // No delay at all skips the buckets and still counts the attempt.
    delivery.retry_after(Duration::ZERO).await.unwrap();
    let last = next(&mut stream).await;
    assert_eq!(last.attempt(), 5);
    last.ack().await.unwrap();
    amqp.close().await.unwrap();
    delete_queues(&[amqp.queue_name(&topic, "g")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_arriving_before_its_due_time_waits_for_the_rest() {
    let _broker = BROKER.read().await;
    let topic = unique("due");
    let amqp = transport(ContentMode::Binary).await;
    let mut stream = amqp
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .unwrap();
    // As a retry past the last bucket comes back: stamped, straight into
    // the group's queue, with a due time still ahead.
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let sent = event();
    let parts = sent.to_binary(eventos_core::Binding::AMQP);
    let mut headers = FieldTable::default();
    for (k, v) in parts.headers {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    let due = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 400;
    headers.insert("x-eventos-due".into(), AMQPValue::LongLongInt(due));
    headers.insert("x-eventos-attempt".into(), AMQPValue::LongLongInt(4));
    let started = Instant::now();
    channel
        .basic_publish(
            "".into(),
            amqp.queue_name(&topic, "g").into(),
            BasicPublishOptions::default(),
            br#"{"n":1}"#,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let delivery = next(&mut stream).await;
    assert!(
        started.elapsed() >= Duration::from_millis(390),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(delivery.event().id(), sent.id());
    assert_eq!(delivery.attempt(), 4);
    delivery.ack().await.unwrap();
    amqp.close().await.unwrap();
    delete_queues(&[amqp.queue_name(&topic, "g")]).await;
}

#[test]
fn the_delay_ladder_rounds_up_never_down() {
    let ms = Duration::from_millis;
    assert_eq!(delay_bucket(Duration::ZERO), ms(50));
    assert_eq!(delay_bucket(ms(1)), ms(50));
    assert_eq!(delay_bucket(ms(50)), ms(50));
    assert_eq!(delay_bucket(ms(51)), ms(75));
    assert_eq!(delay_bucket(ms(300)), ms(300));
    assert_eq!(delay_bucket(ms(301)), ms(500));
    assert_eq!(delay_bucket(ms(800)), ms(1_000));
    assert_eq!(
        delay_bucket(Duration::from_secs(3600)),
        Duration::from_secs(3600)
    );
    let last = ms(*DELAY_LADDER_MS.last().unwrap());
    assert_eq!(last, Duration::from_secs(24 * 3600));
    assert_eq!(delay_bucket(Duration::from_secs(3 * 24 * 3600)), last);
    for asked in (0..90_000u64).step_by(7).map(ms) {
        let bucket = delay_bucket(asked);
        assert!(bucket >= asked, "{asked:?} -> {bucket:?}");
        assert!(
            bucket.as_millis() * 3 <= asked.as_millis().max(50) * 5,
            "{asked:?} -> {bucket:?} overshoots by more than 5/3"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_one_line_without_the_password() {
    let err = AmqpTransport::connect(
        "amqp://guest:s3cret@127.0.0.1:1/%2f",
        AmqpOptions::default(),
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    assert_eq!(err.kind(), TransportErrorKind::Unavailable);
    assert!(!message.contains("s3cret"), "{message}");
    assert!(!message.contains('\n'), "{message}");
    assert!(
        message.starts_with("cannot connect to RabbitMQ at amqp://127.0.0.1:1/%2f: connection refused; is the broker running?"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_says_so() {
    let _broker = BROKER.read().await;
    let bad = url().replacen("guest:guest@", "guest:wrong-password@", 1);
    let err = AmqpTransport::connect(&bad, AmqpOptions::default())
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("login refused"), "{message}");
    assert!(!message.contains("wrong-password"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_topic_no_group_joined_reaches_no_one_and_succeeds() {
    let _broker = BROKER.read().await;
    let amqp = transport(ContentMode::Binary).await;
    let topic = unique("nobody");
    amqp.publish(&topic, vec![event(), event()]).await.unwrap();
    // A group joining afterwards starts at what comes next (no replay).
    let mut stream = amqp
        .subscribe(Subscription::new(&topic, "late"))
        .await
        .unwrap();
    let after = event();
    amqp.publish(&topic, vec![after.clone()]).await.unwrap();
    let delivery = next(&mut stream).await;
    assert_eq!(delivery.event().id(), after.id());
    delivery.ack().await.unwrap();
    amqp.close().await.unwrap();
    delete_queues(&[amqp.queue_name(&topic, "late")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_wait_in_the_parked_queue() {
    let _broker = BROKER.read().await;
    let amqp = transport(ContentMode::Binary).await;
    let topic = unique("parked");
    let mut stream = amqp
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .unwrap();
    let sent = event();
    amqp.publish(&topic, vec![sent.clone()]).await.unwrap();
    next(&mut stream)
        .await
        .dead_letter("gave up", Some("boom".to_owned()))
        .await
        .unwrap();
    // Nobody subscribed to the dead-letter topic when it was published.
    let mut parked = amqp
        .subscribe(Subscription::new(dead_letter_topic(&topic), PARKED_GROUP))
        .await
        .unwrap();
    let dead = next(&mut parked).await;
    assert_eq!(dead.event().id(), sent.id());
    assert_eq!(
        dead.event().extension_str(ext::DEAD_LETTER_REASON),
        Some("gave up")
    );
    assert_eq!(
        dead.event().extension_str(ext::DEAD_LETTER_GROUP),
        Some("g")
    );
    dead.ack().await.unwrap();
    amqp.close().await.unwrap();
    delete_queues(&[
        amqp.queue_name(&topic, "g"),
        amqp.queue_name(&dead_letter_topic(&topic), PARKED_GROUP),
    ])
    .await;
}

fn rabbitmqctl(step: &str) {
    let status = Command::new("rabbitmqctl")
        .arg(step)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {step}: {e}"));
    assert!(
        status.status.success(),
        "rabbitmqctl {step} failed: {status:?}"
    );
}

/// Events published one by one while the broker restarts all arrive:
/// publishes in flight are retried, the subscription comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_the_broker_restarts() {
    const EVENTS: usize = 150;
    let _broker = BROKER.write().await;
    let amqp = transport(ContentMode::Binary).await;
    let topic = unique("restart");
    let mut stream = amqp
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .unwrap();
    let events: Vec<Event> = (0..EVENTS).map(|_| event()).collect();
    let expected: HashSet<String> = events.iter().map(|e| e.id().to_owned()).collect();

    let publisher = {
        let amqp = amqp.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for event in events {
                amqp.publish(&topic, vec![event]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let restart = tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::task::spawn_blocking(|| {
            for step in ["stop_app", "start_app", "await_startup"] {
                rabbitmqctl(step);
            }
        })
        .await
        .unwrap();
    });

    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < EVENTS {
        assert!(
            Instant::now() < deadline,
            "only {} of {EVENTS} arrived",
            seen.len()
        );
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(delivery))) => {
                seen.insert(delivery.event().id().to_owned());
                // An ack lost with the connection means a redelivery, not
                // a failure.
                let _ = delivery.ack().await;
            }
            Ok(Some(Err(e))) => assert!(e.is_transient(), "{e}"),
            other => panic!("the stream stopped: {other:?}"),
        }
    }
    restart.await.unwrap();
    publisher.await.unwrap();
    assert_eq!(seen, expected);
    amqp.close().await.unwrap();
    delete_queues(&[amqp.queue_name(&topic, "g")]).await;
}

/// A retry waiting in its delay bucket is stored by the broker, not held
/// by the process: it comes back after a broker restart, still counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_retry_survives_a_broker_restart() {
    const AFTER: Duration = Duration::from_secs(3);
    let _broker = BROKER.write().await;
    let amqp = transport(ContentMode::Binary).await;
    let topic = unique("retry-restart");
    let mut stream = amqp
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .unwrap();
    let sent = event();
    amqp.publish(&topic, vec![sent.clone()]).await.unwrap();
    let called = Instant::now();
    next(&mut stream).await.retry_after(AFTER).await.unwrap();
    tokio::task::spawn_blocking(|| {
        for step in ["stop_app", "start_app", "await_startup"] {
            rabbitmqctl(step);
        }
    })
    .await
    .unwrap();
    let again = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(delivery))) => break delivery,
            Ok(Some(Err(e))) => assert!(e.is_transient(), "{e}"),
            other => panic!("the stream stopped: {other:?}"),
        }
    };
    assert!(called.elapsed() >= AFTER, "{:?}", called.elapsed());
    assert_eq!(again.event().id(), sent.id());
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    amqp.close().await.unwrap();
    delete_queues(&[amqp.queue_name(&topic, "g")]).await;
}

/// Counts are per group: a group whose name extends another's (`g`, `g2`)
/// shares neither its delay queues nor its dead-letter count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_counts_each_group_apart() {
    let _broker = BROKER.read().await;
    let amqp = transport(ContentMode::Binary).await;
    let topic = unique("inspect");
    let mut g = amqp
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .unwrap();
    let mut g2 = amqp
        .subscribe(Subscription::new(&topic, "g2"))
        .await
        .unwrap();
    amqp.publish(&topic, vec![event(), event()]).await.unwrap();
    for _ in 0..2 {
        next(&mut g)
            .await
            .retry_after(Duration::from_secs(120))
            .await
            .unwrap();
    }
    next(&mut g2)
        .await
        .dead_letter("counted apart", None)
        .await
        .unwrap();
    next(&mut g2).await.ack().await.unwrap();
    let deadline = Instant::now() + WAIT;
    let (of_g, of_g2) = loop {
        let of_g = amqp.group_counts(&topic, "g").await.unwrap().unwrap();
        let of_g2 = amqp.group_counts(&topic, "g2").await.unwrap().unwrap();
        if (
            of_g.retrying,
            of_g.dead_lettered,
            of_g2.retrying,
            of_g2.dead_lettered,
        ) == (2, 0, 0, 1)
            && of_g2.in_flight == 0
        {
            break (of_g, of_g2);
        }
        assert!(
            Instant::now() < deadline,
            "counts stayed g {of_g:?}, g2 {of_g2:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(of_g.next_retry.is_some(), "{of_g:?}");
    assert_eq!(of_g2.next_retry, None, "{of_g2:?}");
    let listed = amqp.dead_letters(&topic, 10).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].extension_str(ext::DEAD_LETTER_GROUP), Some("g2"));
    // Peeking left every message where it was.
    let again = amqp.group_counts(&topic, "g").await.unwrap().unwrap();
    assert_eq!(again.retrying, 2, "{again:?}");
    assert_eq!(amqp.dead_letters(&topic, 10).await.unwrap().len(), 1);
    drop((g, g2));
    amqp.close().await.unwrap();
    delete_queues(&[
        amqp.queue_name(&topic, "g"),
        amqp.queue_name(&topic, "g2"),
        amqp.queue_name(&dead_letter_topic(&topic), PARKED_GROUP),
    ])
    .await;
}

/// Without the management API, inspection fails in one line that says how
/// to enable it, after `retry_for`; a refused login there says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_without_the_management_api_says_how_to_enable_it() {
    let _broker = BROKER.read().await;
    let closed = AmqpTransport::connect(
        &url(),
        AmqpOptions {
            management_url: Some("http://127.0.0.1:1".to_owned()),
            retry_for: Duration::from_millis(300),
            ..options(ContentMode::Binary)
        },
    )
    .await
    .unwrap();
    let err = closed.group_counts("t", "g").await.unwrap_err();
    let message = err.to_string();
    assert_eq!(err.kind(), TransportErrorKind::Unavailable);
    assert!(!message.contains('\n'), "{message}");
    assert!(
        message.starts_with("the RabbitMQ management API at http://127.0.0.1:1 does not answer")
            && message.ends_with(
                "inspection needs it: rabbitmq-plugins enable rabbitmq_management, or set [amqp] management_url"
            ),
        "{message}"
    );
    closed.close().await.unwrap();

    let refused = AmqpTransport::connect(
        &url(),
        AmqpOptions {
            management_url: Some("http://guest:wrong-password@127.0.0.1:15672".to_owned()),
            ..options(ContentMode::Binary)
        },
    )
    .await
    .unwrap();
    let message = refused
        .group_counts("t", "g")
        .await
        .unwrap_err()
        .to_string();
    assert!(message.contains("refused user \"guest\""), "{message}");
    assert!(!message.contains("wrong-password"), "{message}");
    refused.close().await.unwrap();
}
