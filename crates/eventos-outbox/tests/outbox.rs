//! The outbox and inbox against a real SQLite file and the memory
//! transport.

use std::sync::Arc;
use std::time::Duration;

use eventos_core::{Event, StartFrom, Subscriber, Subscription, Transport};
use eventos_memory::MemoryTransport;
use eventos_outbox::rusqlite::{self, Connection};
use eventos_outbox::{OutboxError, Relay, Store, enqueue, first_delivery};
use futures::StreamExt as _;

/// A write that changes something and then refuses: rolled back.
#[derive(Debug)]
enum Refused {
    Refused,
    Store(#[expect(dead_code, reason = "shown by Debug when a test fails")] OutboxError),
}

impl From<OutboxError> for Refused {
    fn from(e: OutboxError) -> Self {
        Self::Store(e)
    }
}

impl From<rusqlite::Error> for Refused {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(e.into())
    }
}

fn event(n: u32) -> Event {
    Event::builder("/svc", "test.n.v1")
        .json(&n)
        .unwrap()
        .build()
        .unwrap()
}

async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("svc.db")).await.unwrap();
    sqlx::query("CREATE TABLE things (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    (dir, store)
}

/// A probe on `topic`, subscribed before anything is published: the memory
/// transport keeps nothing for a group that does not exist yet.
async fn probe(transport: &MemoryTransport, topic: &str) -> eventos_core::DeliveryStream {
    transport
        .subscribe(Subscription::new(topic, "probe").start(StartFrom::Earliest))
        .await
        .unwrap()
}

/// The next `count` events' payloads from a [`probe`].
async fn received(mut s: eventos_core::DeliveryStream, count: usize) -> Vec<u32> {
    let mut got = Vec::new();
    while got.len() < count {
        let d = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("in time")
            .unwrap()
            .unwrap();
        got.push(d.event().decode_data().unwrap());
        d.ack().await.unwrap();
    }
    got
}

#[tokio::test]
async fn committed_state_and_events_go_together() {
    let (_dir, store) = store().await;
    let transport = MemoryTransport::new();
    let probe = tokio::spawn(received(probe(&transport, "things").await, 3));
    for n in 0..3 {
        store
            .write(move |c: &Connection| {
                c.execute("INSERT INTO things (n) VALUES (?)", [n])?;
                enqueue(c, "things", &event(n))
            })
            .await
            .unwrap();
    }
    // A write that fails leaves neither state nor event.
    let refused = store
        .write(|c: &Connection| {
            c.execute("INSERT INTO things (n) VALUES (99)", [])?;
            enqueue(c, "things", &event(99))?;
            Err::<(), _>(Refused::Refused)
        })
        .await;
    assert!(matches!(refused, Err(Refused::Refused)), "{refused:?}");

    assert_eq!(store.unsent().await.unwrap(), 3);
    let relay = Relay::new(store.clone(), Arc::new(transport.clone()));
    assert_eq!(relay.relay_once().await.unwrap(), 3);
    assert_eq!(store.unsent().await.unwrap(), 0);
    assert_eq!(probe.await.unwrap(), vec![0, 1, 2], "in commit order");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM things")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 3);
}

#[tokio::test]
async fn unsent_rows_survive_a_failed_publish_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    {
        let store = Store::open(&path).await.unwrap();
        store
            .write(|c: &Connection| {
                enqueue(c, "a", &event(1))?;
                enqueue(c, "b", &event(2))?;
                enqueue(c, "a", &event(3))
            })
            .await
            .unwrap();
        // The transport is down: nothing is marked sent.
        let down = MemoryTransport::new();
        down.close().await.unwrap();
        let relay = Relay::new(store.clone(), Arc::new(down));
        assert!(relay.relay_once().await.is_err());
        assert_eq!(store.unsent().await.unwrap(), 3);
        store.close().await;
    }
    // After a restart the relay sends everything, in order per topic.
    let store = Store::open(&path).await.unwrap();
    let transport = MemoryTransport::new();
    let a = tokio::spawn(received(probe(&transport, "a").await, 2));
    let b = tokio::spawn(received(probe(&transport, "b").await, 1));
    let relay = Relay::new(store.clone(), Arc::new(transport.clone()));
    let running = tokio::spawn(relay.run(std::future::pending()));
    assert_eq!(a.await.unwrap(), vec![1, 3]);
    assert_eq!(b.await.unwrap(), vec![2]);
    // Rows are marked sent just after their publish returns.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.unsent().await.unwrap() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.abort();
    assert_eq!(store.unsent().await.unwrap(), 0);
}

#[tokio::test]
async fn the_relay_wakes_on_commit() {
    let (_dir, store) = store().await;
    let transport = MemoryTransport::new();
    let mut probe = probe(&transport, "things").await;
    let relay = Relay::new(store.clone(), Arc::new(transport.clone()));
    let running = tokio::spawn(relay.run(std::future::pending()));
    // A first event through, and its row marked: the relay has made its
    // passes and waits, so what the second write tests is the wake.
    store
        .write(|c: &Connection| enqueue(c, "things", &event(4)))
        .await
        .unwrap();
    let (first, rest) = probe.into_future().await;
    probe = rest;
    let first = first.unwrap().unwrap();
    assert_eq!(first.event().decode_data::<u32>().unwrap(), 4);
    first.ack().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.unsent().await.unwrap() > 0 {
        assert!(std::time::Instant::now() < deadline, "never marked sent");
        tokio::task::yield_now().await;
    }
    let started = std::time::Instant::now();
    store
        .write(|c: &Connection| enqueue(c, "things", &event(5)))
        .await
        .unwrap();
    assert_eq!(received(probe, 1).await, vec![5]);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "woken, not polled: {:?}",
        started.elapsed()
    );
    running.abort();
}

#[tokio::test]
async fn the_inbox_admits_each_event_once_per_consumer() {
    let (_dir, store) = store().await;
    let firsts = store
        .write(|c: &Connection| {
            Ok::<_, OutboxError>([
                first_delivery(c, "billing", "e1")?,
                first_delivery(c, "billing", "e1")?,
                first_delivery(c, "metrics", "e1")?,
            ])
        })
        .await
        .unwrap();
    assert_eq!(firsts, [true, false, true], "consumers are independent");

    // A handler whose write fails did not handle the event.
    let failed = store
        .write(|c: &Connection| {
            assert!(first_delivery(c, "billing", "e2")?);
            Err::<(), _>(Refused::Refused)
        })
        .await;
    assert!(failed.is_err());
    let again = store
        .write(|c: &Connection| {
            Ok::<_, OutboxError>([
                first_delivery(c, "billing", "e2")?,
                first_delivery(c, "billing", "e1")?,
            ])
        })
        .await
        .unwrap();
    assert_eq!(again, [true, false]);
}

#[tokio::test]
async fn a_rolled_back_insert_between_commits_sends_each_row_once() {
    let (_dir, store) = store().await;
    for (n, commit) in [(1, true), (2, false), (3, true)] {
        let done = store
            .write(move |c: &Connection| {
                enqueue(c, "things", &event(n))?;
                if commit {
                    Ok(())
                } else {
                    Err(Refused::Refused)
                }
            })
            .await;
        assert_eq!(done.is_ok(), commit);
    }
    let transport = MemoryTransport::new();
    let probe = tokio::spawn(received(probe(&transport, "things").await, 2));
    let relay = Relay::new(store.clone(), Arc::new(transport.clone()));
    assert_eq!(relay.relay_once().await.unwrap(), 2);
    assert_eq!(store.unsent().await.unwrap(), 0, "both rows marked sent");
    assert_eq!(relay.relay_once().await.unwrap(), 0, "nothing sent twice");
    assert_eq!(probe.await.unwrap(), vec![1, 3]);
}

/// Regression: databases were created world-readable (0644), and with
/// them their `-wal` and `-shm`.
#[cfg(unix)]
#[tokio::test]
async fn the_database_and_its_wal_and_shm_are_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let (dir, store) = store().await;
    store
        .write(|c: &Connection| enqueue(c, "t", &event(1)))
        .await
        .unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    for name in ["svc.db", "svc.db-wal", "svc.db-shm"] {
        assert_eq!(mode(name), 0o600, "{name}");
    }
    drop(store);
    // An older, world-readable database is tightened when opened.
    let old = dir.path().join("old.db");
    std::fs::write(&old, b"").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = Store::open(&old).await.unwrap();
    assert_eq!(mode("old.db"), 0o600);
}

/// A transport that refuses one topic while `down` is set.
struct OneTopicDown {
    inner: MemoryTransport,
    topic: &'static str,
    down: std::sync::atomic::AtomicBool,
}

impl eventos_core::Publisher for OneTopicDown {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> futures::future::BoxFuture<'a, Result<(), eventos_core::TransportError>> {
        Box::pin(async move {
            if topic == self.topic && self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(eventos_core::TransportError::new(
                    eventos_core::TransportErrorKind::Unavailable,
                    "down for this test",
                ));
            }
            self.inner.publish(topic, events).await
        })
    }
}

#[tokio::test]
async fn interleaved_topics_go_out_in_one_pass_and_a_refused_topic_waits_alone_in_order() {
    let (_dir, store) = store().await;
    // An entity's events go to several topics, interleaved in the outbox.
    store
        .write(|c: &Connection| {
            for n in 0..6 {
                enqueue(c, if n % 2 == 0 { "a" } else { "b" }, &event(n))?;
            }
            Ok::<_, OutboxError>(())
        })
        .await
        .unwrap();
    let transport = MemoryTransport::new();
    let a = tokio::spawn(received(probe(&transport, "a").await, 3));
    let b = tokio::spawn(received(probe(&transport, "b").await, 3));
    let publisher = Arc::new(OneTopicDown {
        inner: transport.clone(),
        topic: "b",
        down: true.into(),
    });
    let relay = Relay::new(store.clone(), Arc::clone(&publisher) as _);
    assert!(relay.relay_once().await.is_err(), "topic b was refused");
    assert_eq!(a.await.unwrap(), vec![0, 2, 4], "a went out, in order");
    assert_eq!(store.unsent().await.unwrap(), 3, "b's rows wait");
    publisher
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(relay.relay_once().await.unwrap(), 3);
    assert_eq!(b.await.unwrap(), vec![1, 3, 5], "b, in order, once");
    assert_eq!(store.unsent().await.unwrap(), 0);
    assert_eq!(relay.relay_once().await.unwrap(), 0, "nothing sent twice");
}

#[tokio::test]
async fn once_runs_the_effects_with_the_inbox_record_and_not_again() {
    let (_dir, store) = store().await;
    let effects = |store: &Store| {
        let store = store.clone();
        async move {
            store
                .once("billing", "e1", |c: &Connection| {
                    enqueue(c, "things", &event(1))?;
                    Ok::<_, OutboxError>("charged")
                })
                .await
        }
    };
    assert_eq!(effects(&store).await.unwrap(), Some("charged"));
    // A redelivery: nothing runs, nothing is enqueued again.
    assert_eq!(effects(&store).await.unwrap(), None);
    assert_eq!(store.unsent().await.unwrap(), 1);
    // Another consumer handles the same event on its own.
    let other = store
        .once("metrics", "e1", |_: &Connection| Ok::<_, OutboxError>(()))
        .await
        .unwrap();
    assert_eq!(other, Some(()));
    // A failing handling rolls its inbox record back with it, so the
    // retry runs again.
    let failed = store
        .once("billing", "e2", |c: &Connection| {
            enqueue(c, "things", &event(2))?;
            Err::<(), _>(OutboxError::WriterGone)
        })
        .await;
    assert!(matches!(failed, Err(OutboxError::WriterGone)), "{failed:?}");
    assert_eq!(
        store.unsent().await.unwrap(),
        1,
        "its event rolled back too"
    );
    let retried = store
        .once("billing", "e2", |_: &Connection| Ok::<_, OutboxError>(()))
        .await
        .unwrap();
    assert_eq!(retried, Some(()), "the retry runs");
}
