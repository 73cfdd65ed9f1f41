//! Publishing to the real Kafka that `scripts/test-deps` runs: what lands
//! on the topic, read back with a plain rdkafka consumer, and the errors a
//! user meets first. Fails, never skips, when Kafka is down.

use std::collections::BTreeMap;
use std::time::Duration;

use eventos_core::{Event, Publisher, Transport, TransportErrorKind, ext};
use eventos_kafka::{ContentMode, KafkaOptions, KafkaTransport, event_from_record};
use eventos_test_brokers::Broker;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;

const WAIT: Duration = Duration::from_secs(30);

fn url() -> String {
    format!("kafka://{}", Broker::Kafka.require())
}

fn unique(label: &str) -> String {
    format!("test.{label}.{}", uuid::Uuid::now_v7().simple())
}

fn event(subject: &str, n: u32) -> Event {
    Event::builder("urn:eventos:test", "eventos.test.kafka.v1")
        .subject(subject)
        .data("application/json", format!(r#"{{"n":{n}}}"#))
        .extension(ext::CORRELATION_ID, "corr-1")
        .and_then(|b| b.build())
        .unwrap()
}

/// Every record of `topic`, read from the start with a raw consumer:
/// (partition, key, header names, event).
async fn read_all(topic: &str, n: usize) -> Vec<(i32, Option<String>, Vec<String>, Event)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", Broker::Kafka.require())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut read = Vec::new();
    while read.len() < n {
        let record = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("a record within the deadline")
            .expect("a record");
        let names = record
            .headers()
            .map(|h| h.iter().map(|h| h.key.to_owned()).collect())
            .unwrap_or_default();
        let key = record
            .key()
            .map(|k| String::from_utf8(k.to_vec()).expect("a UTF-8 key"));
        let event = event_from_record(&record).expect("a CloudEvent");
        read.push((record.partition(), key, names, event));
    }
    read
}

async fn delete_topic(topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", Broker::Kafka.require())
        .create()
        .expect("an admin client");
    admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("delete the topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_land_in_both_modes_keyed_by_subject_in_order() {
    for mode in [ContentMode::Binary, ContentMode::Structured] {
        let publisher = KafkaTransport::connect(
            &url(),
            KafkaOptions {
                mode,
                ..KafkaOptions::default()
            },
        )
        .unwrap();
        let topic = unique("wire");
        let sent: Vec<_> = (0..20)
            .map(|n| {
                event(
                    if n % 2 == 0 {
                        "students/1"
                    } else {
                        "students/2"
                    },
                    n,
                )
            })
            .collect();
        publisher.publish(&topic, sent.clone()).await.unwrap();
        let read = read_all(&topic, sent.len()).await;
        for subject in ["students/1", "students/2"] {
            let of: Vec<_> = read
                .iter()
                .filter(|(_, key, _, _)| key.as_deref() == Some(subject))
                .collect();
            let partitions: std::collections::HashSet<_> = of.iter().map(|r| r.0).collect();
            assert_eq!(partitions.len(), 1, "{mode:?}: one key, one partition");
            let got: Vec<_> = of.iter().map(|r| r.3.clone()).collect();
            let want: Vec<_> = sent
                .iter()
                .filter(|e| e.subject() == Some(subject))
                .cloned()
                .collect();
            assert_eq!(
                got, want,
                "{mode:?}: every attribute back, in publish order"
            );
        }
        let names = &read[0].2;
        match mode {
            ContentMode::Binary => {
                for name in [
                    "ce_specversion",
                    "ce_id",
                    "ce_type",
                    "ce_correlationid",
                    "content-type",
                ] {
                    assert!(
                        names.iter().any(|n| n == name),
                        "{name} missing from {names:?}"
                    );
                }
            }
            ContentMode::Structured => assert_eq!(names, &["content-type"]),
        }
        publisher.close().await.unwrap();
        delete_topic(&topic).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_after_close_is_refused() {
    let publisher = KafkaTransport::connect(&url(), KafkaOptions::default()).unwrap();
    publisher.close().await.unwrap();
    let err = publisher
        .publish(&unique("closed"), vec![event("s", 1)])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_fails_the_publish_in_time_in_one_line() {
    let publisher = KafkaTransport::connect(
        "kafka://127.0.0.1:1",
        KafkaOptions {
            publish_timeout: Duration::from_secs(2),
            ..KafkaOptions::default()
        },
    )
    .unwrap();
    let err = tokio::time::timeout(WAIT, publisher.publish("t", vec![event("s", 1)]))
        .await
        .expect("the publish gives up within its timeout")
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Unavailable, "{err}");
    let message = err.to_string();
    assert!(!message.contains('\n'), "{message}");
    assert!(message.contains("127.0.0.1:1"), "{message}");
}

#[test]
fn bad_urls_and_settings_are_named() {
    for (url, why) in [
        ("127.0.0.1:9092", "does not start with kafka://"),
        ("kafka://", "names no broker"),
        ("kafka://host", "has no port"),
        ("kafka://host:port", "is not host:port"),
    ] {
        let err = KafkaTransport::connect(url, KafkaOptions::default()).unwrap_err();
        assert!(err.to_string().contains(why), "{url}: {err}");
    }
    let err = KafkaTransport::connect(
        "kafka://127.0.0.1:9092",
        KafkaOptions {
            client: BTreeMap::from([("no.such.setting".to_owned(), "1".to_owned())]),
            ..KafkaOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("the Kafka client settings are refused"),
        "{err}"
    );
}
