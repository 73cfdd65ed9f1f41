//! Apache Kafka, as `scripts/test-deps` runs it: a metadata request names
//! the one broker, and a record produced idempotently with `acks=all` is
//! consumed in a consumer group, key, payload and header intact.

mod common;

use std::time::Duration;

use common::{create_topic, delete_topic, kafka_admin, kafka_produce, kafka_read, unique};

#[tokio::test(flavor = "multi_thread")]
async fn metadata_names_the_single_broker_and_a_new_topic() {
    let admin = kafka_admin();
    let topic = unique("eventos-smoke-meta");
    create_topic(&admin, &topic).await;
    // A created topic reaches the broker's metadata cache a moment after
    // the create answers: ask until it is known, within a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metadata = loop {
        let metadata = tokio::task::block_in_place(|| {
            admin
                .inner()
                .fetch_metadata(Some(&topic), Duration::from_secs(30))
                .expect("a metadata response")
        });
        let known = metadata.topics().iter().all(|t| t.error().is_none());
        if known || std::time::Instant::now() >= deadline {
            break metadata;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let brokers: Vec<_> = metadata
        .brokers()
        .iter()
        .map(|b| (b.id(), b.port()))
        .collect();
    assert_eq!(brokers, [(1, 9092)], "one broker, node 1, on 9092");
    let topics = metadata.topics();
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0].name(), topic);
    assert_eq!(topics[0].error(), None, "the topic is known to the broker");
    assert_eq!(topics[0].partitions().len(), 1);
    delete_topic(&admin, &topic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_is_produced_and_consumed_in_a_group() {
    let admin = kafka_admin();
    let topic = unique("eventos-smoke");
    create_topic(&admin, &topic).await;
    assert_eq!(kafka_produce(&topic, "student-1", "evt-1").await, 0);
    let read = kafka_read(&topic, &unique("smoke"), 1).await;
    assert_eq!(read, [("student-1".to_owned(), "evt-1".to_owned())]);
    delete_topic(&admin, &topic).await;
}
