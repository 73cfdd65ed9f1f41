//! The store's writer: concurrent writes share rounds (one commit, one
//! sync), each under its own savepoint; reads never wait for it; the
//! write-ahead log is checkpointed in the background.

use std::time::{Duration, Instant};

use eventos_outbox::rusqlite::Connection;
use eventos_outbox::{OutboxError, Store};

async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("svc.db")).await.unwrap();
    sqlx::query("CREATE TABLE things (n INTEGER PRIMARY KEY)")
        .execute(store.pool())
        .await
        .unwrap();
    (dir, store)
}

async fn stored(store: &Store) -> Vec<i64> {
    sqlx::query_scalar("SELECT n FROM things ORDER BY n")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

fn insert(c: &Connection, n: i64) -> Result<(), OutboxError> {
    c.prepare_cached("INSERT INTO things (n) VALUES (?)")?
        .execute([n])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits_and_a_failing_one_rolls_back_alone() {
    let (_dir, store) = store().await;
    // Every seventh write inserts its row and then fails, or panics.
    let writes = (0..500i64).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(move |c: &Connection| {
                    insert(c, n)?;
                    match n % 7 {
                        0 => Err(OutboxError::WriterGone),
                        3 if n % 2 == 1 => panic!("write {n} panics"),
                        _ => Ok(n),
                    }
                })
                .await
        })
    });
    let results = futures::future::join_all(writes).await;
    let mut kept = Vec::new();
    for (n, result) in (0..500i64).zip(results) {
        match (n % 7, n % 2, result.unwrap()) {
            (0, _, Err(OutboxError::WriterGone)) => {}
            (3, 1, Err(OutboxError::WritePanicked)) => {}
            (_, _, Ok(got)) => {
                assert_eq!(got, n);
                kept.push(n);
            }
            (_, _, other) => panic!("write {n}: {other:?}"),
        }
    }
    assert_eq!(
        stored(&store).await,
        kept,
        "exactly the writes that succeeded"
    );
    let stats = store.stats();
    assert_eq!(stats.writes, kept.len() as u64);
    assert_eq!(stats.failed_writes, 500 - kept.len() as u64);
    assert!(
        stats.commits * 4 <= 500,
        "500 concurrent writes took {} commits",
        stats.commits
    );
    // A constraint violation is the write's own failure too.
    let dup = store.write(|c: &Connection| insert(c, 1)).await;
    assert!(matches!(dup, Err(OutboxError::Sqlite(_))), "{dup:?}");
    store.write(|c: &Connection| insert(c, 1000)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_wait_for_a_write_in_progress() {
    let (_dir, store) = store().await;
    store.write(|c: &Connection| insert(c, 1)).await.unwrap();
    // The write blocks the writer's thread on purpose: a plain channel.
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let (inside, entered) = tokio::sync::oneshot::channel::<()>();
    let slow = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(move |c: &Connection| {
                    insert(c, 2)?;
                    inside.send(()).unwrap();
                    hold.recv().unwrap();
                    Ok::<_, OutboxError>(())
                })
                .await
        })
    };
    entered.await.unwrap();
    // The writer holds its transaction open; a read sees the last commit.
    let read = tokio::time::timeout(Duration::from_secs(5), stored(&store))
        .await
        .expect("a read while a write is in progress");
    assert_eq!(read, vec![1]);
    release.send(()).unwrap();
    slow.await.unwrap().unwrap();
    assert_eq!(stored(&store).await, vec![1, 2]);
}

/// A store with a table of blobs, and its file's path.
async fn blob_store() -> (tempfile::TempDir, std::path::PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    let store = Store::open(&path).await.unwrap();
    sqlx::query("CREATE TABLE blobs (b BLOB NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    (dir, path, store)
}

/// Writes one 8 KiB blob: larger than a page, so the log grows by about
/// what is written.
async fn insert_blob(store: &Store) {
    store
        .write(|c: &Connection| {
            c.prepare_cached("INSERT INTO blobs (b) VALUES (?)")?
                .execute([vec![1u8; 8192]])?;
            Ok::<_, OutboxError>(())
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_is_checkpointed_in_the_background() {
    let (_dir, path, store) = blob_store().await;
    for _ in 0..50 {
        insert_blob(&store).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().checkpoints == 0 {
        assert!(Instant::now() < deadline, "no checkpoint in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The pages are in the database file itself now, not only in the log.
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size > 50 * 8192, "database file is {size} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_constant_writes_the_write_ahead_log_starts_over_instead_of_growing() {
    let (_dir, path, store) = blob_store().await;
    // Writers that never pause, for long enough that the writer has had
    // to complete checkpoints of its own (it does twice a second). Left
    // to grow, the log ends up larger than everything written.
    let started = Instant::now();
    let writers = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut written = 0u64;
            while started.elapsed() < Duration::from_secs(5) || written < 400 {
                insert_blob(&store).await;
                written += 1;
            }
            written
        })
    });
    let written: u64 = futures::future::join_all(writers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();
    let wal = std::fs::metadata(path.with_extension("db-wal"))
        .unwrap()
        .len();
    // Rows larger than a page: the log holds about what was written
    // since it last started over, not one frame per small row's page.
    let bytes = written * 8192;
    assert!(
        wal < bytes * 2 / 3,
        "the log holds {wal} bytes after {bytes} bytes were written: it never started over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsynced_writes_alone_skip_the_sync_and_the_writer_goes_back_to_full_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    let store = Store::open(&path).await.unwrap();
    sqlx::query("CREATE TABLE things (n INTEGER PRIMARY KEY)")
        .execute(store.pool())
        .await
        .unwrap();
    let synchronous = |store: &Store| {
        let store = store.clone();
        async move {
            store
                .read(|c: &Connection| {
                    Ok::<i64, OutboxError>(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
                })
                .await
                .unwrap()
        }
    };
    assert_eq!(synchronous(&store).await, 2, "FULL before any write");

    let before = store.stats();
    store
        .write_unsynced(|c: &Connection| insert(c, 1))
        .await
        .unwrap();
    let after = store.stats();
    assert_eq!(after.unsynced_commits, before.unsynced_commits + 1);
    assert_eq!(after.commits, before.commits, "no synced round for it");
    assert_eq!(synchronous(&store).await, 2, "FULL again after it");
    assert_eq!(stored(&store).await, vec![1], "readers see it at once");

    // A failing unsynced write leaves the writer at FULL too.
    let failed = store.write_unsynced(|c: &Connection| insert(c, 1)).await;
    assert!(matches!(failed, Err(OutboxError::Sqlite(_))), "{failed:?}");
    assert_eq!(synchronous(&store).await, 2);

    // Sharing a round with a durable write, it is synced with it.
    let before = store.stats();
    let (a, b) = tokio::join!(
        store.write(|c: &Connection| insert(c, 2)),
        store.write_unsynced(|c: &Connection| insert(c, 3)),
    );
    a.unwrap();
    b.unwrap();
    let after = store.stats();
    assert!(after.commits > before.commits, "the durable write synced");
    store.write(|c: &Connection| insert(c, 4)).await.unwrap();
    store.close().await;

    let reopened = Store::open(&path).await.unwrap();
    assert_eq!(stored(&reopened).await, vec![1, 2, 3, 4]);
}
