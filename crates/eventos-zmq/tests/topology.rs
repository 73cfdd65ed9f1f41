//! Several publishers and several consumers of one topic, each a node of
//! its own on 127.0.0.1: every group gets every event of every publisher,
//! and the members of a group share them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use eventos_core::{Event, Publisher as _, Subscriber as _, Subscription, Transport as _};
use eventos_zmq::{ZmqOptions, ZmqTransport};
use futures::StreamExt;

const TOPIC: &str = "topology.orders";
const PER_PUBLISHER: usize = 100;

fn event(publisher: usize, n: usize) -> Event {
    Event::builder(format!("/publisher/{publisher}"), "test.topology.order.v1")
        .subject(format!("order-{publisher}-{n}"))
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

/// Acks and collects ids from `stream` until `want` ids are seen among
/// `streams` together or the deadline passes.
async fn drain(streams: &mut [eventos_core::DeliveryStream], want: usize) -> Vec<Vec<String>> {
    let mut got = vec![Vec::new(); streams.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.iter().map(Vec::len).sum::<usize>() < want && Instant::now() < deadline {
        for (i, stream) in streams.iter_mut().enumerate() {
            if let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(Duration::from_millis(20), stream.next()).await
            {
                got[i].push(delivery.event().id().to_owned());
                delivery.ack().await.unwrap();
            }
        }
    }
    got
}

/// Drains both groups and checks that each got every event once and that
/// both members of `billing` took some.
async fn check(
    billing: &mut [eventos_core::DeliveryStream],
    metrics: &mut [eventos_core::DeliveryStream],
    all: &HashSet<String>,
    run: &str,
) {
    let shared = drain(billing, all.len()).await;
    let alone = drain(metrics, all.len()).await;
    for (group, got) in [("billing", shared.concat()), ("metrics", alone.concat())] {
        let seen: HashSet<String> = got.iter().cloned().collect();
        assert_eq!(
            &seen, all,
            "{group} did not get every event of both publishers"
        );
        assert_eq!(got.len(), all.len(), "{group} got duplicates");
    }
    assert!(
        shared.iter().all(|member| !member.is_empty()),
        "both members of billing took some: {} and {}",
        shared[0].len(),
        shared[1].len()
    );
    println!(
        "{run} x {PER_PUBLISHER}: billing members took {} and {}, metrics {}",
        shared[0].len(),
        shared[1].len(),
        alone[0].len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_gets_every_publishers_events_and_members_share_them() {
    let publishers = [
        ZmqTransport::open(ZmqOptions::default()).await.unwrap(),
        ZmqTransport::open(ZmqOptions::default()).await.unwrap(),
    ];
    let peers: Vec<String> = publishers
        .iter()
        .map(|p| p.endpoint().unwrap().to_owned())
        .collect();
    let consumer = |peers: Vec<String>| async move {
        ZmqTransport::open(ZmqOptions {
            bind: None,
            peers,
            ..ZmqOptions::default()
        })
        .await
        .unwrap()
    };
    let (a, b, c) = (
        consumer(peers.clone()).await,
        consumer(peers.clone()).await,
        consumer(peers).await,
    );
    // Group "billing" has two members in two nodes; "metrics" one.
    let sub = |group: &str| Subscription::new(TOPIC, group).prefetch(8);
    let mut billing = vec![
        a.subscribe(sub("billing")).await.unwrap(),
        b.subscribe(sub("billing")).await.unwrap(),
    ];
    let mut metrics = vec![c.subscribe(sub("metrics")).await.unwrap()];

    let mut all = HashSet::new();
    for (i, publisher) in publishers.iter().enumerate() {
        let events: Vec<Event> = (0..PER_PUBLISHER).map(|n| event(i, n)).collect();
        all.extend(events.iter().map(|e| e.id().to_owned()));
        publisher.publish(TOPIC, events).await.unwrap();
    }

    check(&mut billing, &mut metrics, &all, "2 publishers").await;
    drop((billing, metrics));
    for node in [a, b, c].iter().chain(&publishers) {
        node.close().await.unwrap();
    }
}

/// Waits until `group` exists in the spool of `publisher` (its consumers'
/// hellos arrived), so what it publishes next reaches the group.
async fn until_group(publisher: &ZmqTransport, group: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while publisher
        .group_counts(TOPIC, group)
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "{group} never joined at a publisher"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_consumers_binding_publishers_that_connect_reach_every_group() {
    use eventos_zmq::Topology;
    let hub = || async {
        ZmqTransport::open(ZmqOptions {
            topology: Topology::ConsumersBind,
            ..ZmqOptions::default()
        })
        .await
        .unwrap()
    };
    let (a, b, c) = (hub().await, hub().await, hub().await);
    let hubs: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|node| node.endpoint().unwrap().to_owned())
        .collect();
    let sub = |group: &str| Subscription::new(TOPIC, group).prefetch(8);
    let mut billing = vec![
        a.subscribe(sub("billing")).await.unwrap(),
        b.subscribe(sub("billing")).await.unwrap(),
    ];
    let mut metrics = vec![c.subscribe(sub("metrics")).await.unwrap()];
    // Publishers that bind nothing: they connect to the hubs.
    let publisher = || async {
        ZmqTransport::open(ZmqOptions {
            topology: Topology::ConsumersBind,
            bind: None,
            peers: hubs.clone(),
            ..ZmqOptions::default()
        })
        .await
        .unwrap()
    };
    let publishers = [publisher().await, publisher().await];
    let mut all = HashSet::new();
    for (i, node) in publishers.iter().enumerate() {
        until_group(node, "billing").await;
        until_group(node, "metrics").await;
        let events: Vec<Event> = (0..PER_PUBLISHER).map(|n| event(i, n)).collect();
        all.extend(events.iter().map(|e| e.id().to_owned()));
        node.publish(TOPIC, events).await.unwrap();
    }
    check(
        &mut billing,
        &mut metrics,
        &all,
        "consumers binding, 2 connecting publishers",
    )
    .await;
    drop((billing, metrics));
    for node in [a, b, c].iter().chain(&publishers) {
        node.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_held_past_the_ack_timeout_goes_to_another_member() {
    let node = ZmqTransport::open(ZmqOptions {
        ack_timeout: Duration::from_millis(300),
        ..ZmqOptions::default()
    })
    .await
    .unwrap();
    let sub = Subscription::new(TOPIC, "mailer").prefetch(1);
    let mut stuck = node.subscribe(sub.clone()).await.unwrap();
    let sent = event(0, 1);
    node.publish(TOPIC, vec![sent.clone()]).await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(10), stuck.next())
        .await
        .expect("the first member gets it")
        .unwrap()
        .unwrap();
    assert_eq!(held.event().id(), sent.id());
    // A live member that never settles: its heartbeats go on, the ack
    // timeout takes the event back.
    let mut other = node.subscribe(sub).await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), other.next())
        .await
        .expect("the other member gets it once the ack timeout passed")
        .unwrap()
        .unwrap();
    assert_eq!(again.event().id(), sent.id());
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    // The late settlement of the first is refused: the event was not its
    // to settle any more.
    let late = held.retry_after(Duration::ZERO).await;
    assert!(
        late.as_ref()
            .is_err_and(|e| e.to_string().contains("ack timeout")),
        "{late:?}"
    );
    drop((stuck, other));
    node.close().await.unwrap();
}
