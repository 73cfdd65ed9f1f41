//! A full disk under a store, on a real tmpfs: every commit either
//! succeeds and is kept, or fails and leaves nothing; after a failed commit
//! the writer's connection is not left inside its transaction (where later
//! rounds would nest as savepoints that never reach the disk, holding the
//! write lock); and the store takes writes again when space returns,
//! without being reopened.

use eventos_core::Event;
use eventos_outbox::rusqlite::{Connection, params};
use eventos_outbox::{OutboxError, Store, enqueue};
use eventos_test_brokers::TinyFs;

/// One request's work: a row of its own and an outbox event, in one
/// transaction. `Ok` means committed.
async fn write(store: &Store, id: i64) -> Result<(), String> {
    store
        .write(move |c: &Connection| {
            c.prepare_cached("INSERT INTO requests (id, body) VALUES (?, ?)")?
                .execute(params![id, vec![7u8; 3000]])?;
            let event = Event::builder("/test", "test.request.v1").build().unwrap();
            enqueue(c, "requests", &event)
        })
        .await
        .map_err(|e: OutboxError| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_commits_cleanly_and_the_store_recovers_when_space_returns() {
    let Some(fs) = TinyFs::mount(3 << 20) else {
        return;
    };
    let path = fs.path().join("service.db");
    let store = Store::open(&path).await.unwrap();
    sqlx::query("CREATE TABLE requests (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    for id in 0..5 {
        write(&store, id).await.unwrap();
    }

    fs.fill();
    let mut acked: Vec<i64> = (0..5).collect();
    let mut refused = Vec::new();
    for id in 100..160 {
        match write(&store, id).await {
            Ok(()) => acked.push(id),
            Err(e) => {
                assert!(
                    !e.contains("locked"),
                    "a stuck transaction holds the lock: {e}"
                );
                refused.push(id);
            }
        }
    }
    assert!(
        refused.len() >= 50,
        "the full disk refused {} of 60",
        refused.len()
    );

    fs.free();
    for id in 200..240 {
        write(&store, id)
            .await
            .unwrap_or_else(|e| panic!("write {id} after space returned: {e}"));
        acked.push(id);
    }

    // What was acknowledged is there, and nothing else: live, and after a
    // reopen.
    assert_eq!(stored(&store).await, acked);
    store.close().await;
    let reopened = Store::open(&path).await.unwrap();
    assert_eq!(stored(&reopened).await, acked);
    assert_eq!(
        reopened.unsent().await.unwrap(),
        acked.len() as u64,
        "one outbox event per acknowledged request, none for a refused one"
    );
}

async fn stored(store: &Store) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM requests ORDER BY id")
        .fetch_all(store.pool())
        .await
        .unwrap()
}
