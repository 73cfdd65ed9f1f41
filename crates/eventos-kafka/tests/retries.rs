//! Retries on the real Kafka that `scripts/test-deps` runs: each goes to
//! its group's topic of the delay tier it falls in, comes back no sooner
//! than due, to that group only; a retry partition holding more copies
//! than its bound is paused, not let grow, and loses none; a new member
//! takes up the retries of a topic with nothing new on it. Fails, never
//! skips, when Kafka is down.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use eventos_core::{Event, Publisher, Subscriber, Subscription, Transport};
use eventos_kafka::{KafkaOptions, KafkaTransport};
use eventos_test_brokers::Broker;
use futures::StreamExt as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

const WAIT: Duration = Duration::from_secs(60);

fn transport() -> KafkaTransport {
    let url = format!("kafka://{}", Broker::Kafka.require());
    KafkaTransport::connect(
        &url,
        KafkaOptions {
            namespace: format!("test.{}", uuid::Uuid::now_v7().simple()),
            ..KafkaOptions::default()
        },
    )
    .expect("a transport")
}

fn event(subject: &str, n: usize) -> Event {
    Event::builder("urn:eventos:test", "eventos.test.retry.v1")
        .subject(subject)
        .data("application/json", format!(r#"{{"n":{n}}}"#))
        .build()
        .expect("an event")
}

/// How many records `topic` holds, summed over its partitions.
fn records_in(topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", Broker::Kafka.require())
        .create()
        .expect("a consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    assert!(partitions > 0, "{topic} exists");
    (0..partitions)
        .map(|p| {
            let p = i32::try_from(p).expect("a partition number");
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            high - low
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_its_tier_comes_back_when_due_and_to_its_group_only() {
    let kafka = transport();
    let topic = "tiers";
    let mut retrying = kafka
        .subscribe(Subscription::new(topic, "retrying"))
        .await
        .expect("subscribe");
    let mut other = kafka
        .subscribe(Subscription::new(topic, "other"))
        .await
        .expect("subscribe");
    // By subject: how long its first delivery asks to wait.
    let delays = HashMap::from([
        ("short", Duration::from_millis(300)),
        ("medium", Duration::from_millis(2500)),
        ("none", Duration::ZERO),
    ]);
    let events: Vec<_> = ["short", "medium", "none"]
        .iter()
        .enumerate()
        .map(|(n, s)| event(s, n))
        .collect();
    kafka.publish(topic, events).await.expect("publish");

    let deadline = tokio::time::Instant::now() + WAIT;
    let mut asked = HashMap::new();
    let mut back = HashMap::new();
    while back.len() < 2 {
        let delivery = tokio::time::timeout_at(deadline, retrying.next())
            .await
            .expect("every retry back within the deadline")
            .expect("the stream goes on")
            .expect("a delivery");
        let subject = delivery.event().subject().expect("a subject").to_owned();
        let delay = delays[subject.as_str()];
        match delivery.attempt() {
            1 if delay > Duration::ZERO => {
                asked.insert(subject, Instant::now() + delay);
                delivery.retry_after(delay).await.expect("retry");
            }
            1 => delivery.ack().await.expect("ack"),
            attempt => {
                assert_eq!(attempt, 2, "{subject}: one retry asked, one made");
                let due = asked[&subject];
                assert!(
                    Instant::now() >= due,
                    "{subject}: back {:?} before it was due",
                    due - Instant::now()
                );
                back.insert(subject, attempt);
                delivery.ack().await.expect("ack");
            }
        }
    }
    // The other group read each event once and has nothing waiting.
    for _ in 0..3 {
        let delivery = tokio::time::timeout_at(deadline, other.next())
            .await
            .expect("the other group's deliveries")
            .expect("the stream goes on")
            .expect("a delivery");
        assert_eq!(delivery.attempt(), 1);
        delivery.ack().await.expect("ack");
    }
    let retry_topics = kafka.retry_topics(topic, "retrying");
    let in_tiers: Vec<_> = retry_topics.iter().map(|t| records_in(t)).collect();
    assert_eq!(
        in_tiers,
        [1, 1, 0, 0, 0],
        "300 ms in the 1 s tier, 2.5 s in the 10 s tier: {retry_topics:?}"
    );
    for topic in kafka.retry_topics(topic, "other") {
        assert_eq!(
            records_in(&topic),
            0,
            "{topic}: the other group retried nothing"
        );
    }
    kafka.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_partition_past_its_bound_is_paused_and_loses_nothing() {
    // One subject, so every retry lands in one partition: 2500 copies
    // there, past the 1000 one partition holds at a time.
    const N: usize = 2500;
    let kafka = transport();
    let topic = "bound";
    let mut stream = kafka
        .subscribe(Subscription::new(topic, "g").prefetch(N * 2))
        .await
        .expect("subscribe");
    let events: Vec<_> = (0..N).map(|n| event("one-key", n)).collect();
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e.id().to_owned()).collect();
    kafka.publish(topic, events).await.expect("publish");

    let delay = Duration::from_secs(2);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut first = HashMap::new();
    let mut second = HashMap::new();
    // Settled side by side, as a router would: one at a time, each retry's
    // produce would take longer than the delay.
    let mut settling = tokio::task::JoinSet::new();
    while second.len() < N {
        let delivery = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {N} retries back in time", second.len()))
            .expect("the stream goes on")
            .expect("a delivery");
        let id = delivery.event().id().to_owned();
        match delivery.attempt() {
            1 => {
                assert!(
                    first.insert(id, Instant::now() + delay).is_none(),
                    "read once"
                );
                settling.spawn(delivery.retry_after(delay));
            }
            attempt => {
                assert_eq!(attempt, 2, "one retry each");
                assert!(Instant::now() >= first[&id], "not before due");
                assert!(second.insert(id, ()).is_none(), "retried once");
                settling.spawn(delivery.ack());
            }
        }
    }
    while let Some(settled) = settling.join_next().await {
        settled.expect("a settle task").expect("settled");
    }
    assert_eq!(
        second
            .keys()
            .cloned()
            .collect::<std::collections::HashSet<_>>(),
        ids
    );
    // Inspection reads every tier: nothing left waiting or in hand.
    loop {
        let counts = kafka
            .group_counts(topic, "g")
            .await
            .expect("counts")
            .expect("a known group");
        if counts.ready == 0 && counts.in_flight == 0 && counts.retrying == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still counted after every retry was acked: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tiers = kafka.retry_topics(topic, "g");
    assert_eq!(records_in(&tiers[1]), i64::try_from(N).expect("a count"));
    kafka.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_takes_up_the_retries_of_an_idle_topic() {
    // A member holds its retry partitions back after an assignment until
    // the main topic's first records come; here none come, and the retry
    // must come back all the same.
    let kafka = transport();
    let topic = "idle";
    let subscription = || Subscription::new(topic, "g");
    let mut stream = kafka.subscribe(subscription()).await.expect("subscribe");
    kafka
        .publish(topic, vec![event("k", 1)])
        .await
        .expect("publish");
    let deadline = tokio::time::Instant::now() + WAIT;
    let first = tokio::time::timeout_at(deadline, stream.next())
        .await
        .expect("the event in time")
        .expect("the stream goes on")
        .expect("a delivery");
    let id = first.event().id().to_owned();
    let due = Instant::now() + Duration::from_millis(300);
    first
        .retry_after(Duration::from_millis(300))
        .await
        .expect("retry");
    drop(stream);

    let mut stream = kafka
        .subscribe(subscription())
        .await
        .expect("subscribe again");
    let again = tokio::time::timeout_at(deadline, stream.next())
        .await
        .expect("the retry in time, with nothing new on the topic")
        .expect("the stream goes on")
        .expect("a delivery");
    assert_eq!(again.event().id(), id);
    assert_eq!(again.attempt(), 2);
    assert!(Instant::now() >= due, "not before due");
    again.ack().await.expect("ack");
    kafka.close().await.expect("close");
}
