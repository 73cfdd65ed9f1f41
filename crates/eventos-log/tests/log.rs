//! The log as a user sees it: publish, consume, settle, close, reopen.

use std::sync::Arc;
use std::time::Duration;

use eventos_core::{
    Delivery, DeliveryStream, Event, Publisher, StartFrom, Subscriber, Subscription, Transport,
    TransportErrorKind,
};
use eventos_log::{LogConfig, LogError, LogTransport, Retention};
use futures::StreamExt as _;

fn event(n: u32) -> Event {
    Event::builder("/test", "test.n.v1")
        .subject(format!("k{}", n % 3))
        .json(&n)
        .unwrap()
        .build()
        .unwrap()
}

fn n(d: &Delivery) -> u32 {
    d.event().decode_data().unwrap()
}

async fn next(s: &mut DeliveryStream) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("a delivery in time")
        .expect("open stream")
        .expect("no error")
}

async fn sub(log: &LogTransport, topic: &str, group: &str) -> DeliveryStream {
    log.subscribe(Subscription::new(topic, group).start(StartFrom::Earliest))
        .await
        .unwrap()
}

#[tokio::test]
async fn publish_consume_ack_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogTransport::open(dir.path()).unwrap();
    let mut s = sub(&log, "t", "g").await;
    log.publish("t", (0..10).map(event).collect())
        .await
        .unwrap();
    for i in 0..4 {
        let d = next(&mut s).await;
        assert_eq!(n(&d), i);
        d.ack().await.unwrap();
    }
    drop(s);
    log.close().await.unwrap();
    drop(log);

    let log = LogTransport::open(dir.path()).unwrap();
    let mut s = sub(&log, "t", "g").await;
    for i in 4..10 {
        let d = next(&mut s).await;
        assert_eq!(n(&d), i, "acked events are not redelivered after reopen");
        d.ack().await.unwrap();
    }
    let stats = log.group_stats("t", "g").unwrap();
    assert_eq!((stats.cursor, stats.end), (10, 10));
}

#[tokio::test]
async fn a_second_opener_is_told_who_holds_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _log = LogTransport::open(dir.path()).unwrap();
    let err = LogTransport::open(dir.path()).unwrap_err();
    assert!(matches!(err, LogError::Locked { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("process {}", std::process::id())) && text.contains("in use by"),
        "{text}"
    );
}

#[tokio::test]
async fn retries_are_stored_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = LogTransport::open(dir.path()).unwrap();
        let mut s = sub(&log, "t", "g").await;
        log.publish("t", vec![event(7)]).await.unwrap();
        let d = next(&mut s).await;
        assert_eq!(d.attempt(), 1);
        d.retry_after(Duration::from_millis(700)).await.unwrap();
        log.close().await.unwrap();
    }
    let started = std::time::Instant::now();
    let log = LogTransport::open(dir.path()).unwrap();
    let mut s = sub(&log, "t", "g").await;
    let d = next(&mut s).await;
    assert_eq!((n(&d), d.attempt()), (7, 2));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the stored due time is honoured after reopen"
    );
    d.ack().await.unwrap();
}

#[tokio::test]
async fn dead_letters_land_in_the_dlq_topic_durably() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = LogTransport::open(dir.path()).unwrap();
        let mut s = sub(&log, "t", "g").await;
        log.publish("t", vec![event(1)]).await.unwrap();
        next(&mut s)
            .await
            .dead_letter("boom", Some("last error".into()))
            .await
            .unwrap();
        log.close().await.unwrap();
    }
    let log = LogTransport::open(dir.path()).unwrap();
    let mut dlq = sub(&log, "t.dlq", "inspector").await;
    let d = next(&mut dlq).await;
    assert_eq!(d.event().extension_str("deadletterreason"), Some("boom"));
    assert_eq!(n(&d), 1);
}

#[tokio::test]
async fn expired_leases_are_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogConfig::new(dir.path())
        .visibility_timeout(Duration::from_millis(200))
        .open()
        .unwrap();
    let mut a = sub(&log, "t", "g").await;
    log.publish("t", vec![event(1)]).await.unwrap();
    let held = next(&mut a).await;
    let again = next(&mut a).await;
    assert_eq!((n(&again), again.attempt()), (1, 2));
    let err = held.ack().await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Settled);
    again.ack().await.unwrap();
    assert_eq!(log.stats().redeliveries, 1);
}

#[tokio::test]
async fn segments_roll_and_consumed_ones_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogConfig::new(dir.path())
        .segment_bytes(4096)
        .retention(Retention {
            max_age: Some(Duration::ZERO),
            max_bytes: None,
        })
        .open()
        .unwrap();
    let log = Arc::new(log);
    let mut s = sub(&log, "t", "g").await;
    for chunk in 0..20 {
        log.publish("t", (chunk * 10..chunk * 10 + 10).map(event).collect())
            .await
            .unwrap();
    }
    let topic_dir = dir.path().join("topics").join("t");
    let segments = || {
        std::fs::read_dir(&topic_dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "log")
            })
            .count()
    };
    assert!(
        segments() > 3,
        "200 events in 4 KiB segments roll: {}",
        segments()
    );
    for i in 0..200 {
        let d = next(&mut s).await;
        assert_eq!(n(&d), i);
        d.ack().await.unwrap();
    }
    // Retention runs on the writer's one-second tick.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while segments() > 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(segments(), 1, "consumed sealed segments are removed");
    // The next offset carries on after a reopen.
    drop(s);
    log.close().await.unwrap();
    let log = LogTransport::open(dir.path()).unwrap();
    let mut s = sub(&log, "t", "g").await;
    log.publish("t", vec![event(200)]).await.unwrap();
    let d = next(&mut s).await;
    assert_eq!(n(&d), 200);
    assert_eq!(log.group_stats("t", "g").unwrap().end, 201);
}

#[tokio::test]
async fn new_group_can_start_at_latest() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogTransport::open(dir.path()).unwrap();
    log.publish("t", vec![event(1)]).await.unwrap();
    let mut late = log
        .subscribe(Subscription::new("t", "late").start(StartFrom::Latest))
        .await
        .unwrap();
    let mut early = sub(&log, "t", "early").await;
    log.publish("t", vec![event(2)]).await.unwrap();
    assert_eq!(n(&next(&mut late).await), 2);
    assert_eq!(n(&next(&mut early).await), 1);
}

/// The segment file of topic `t`.
fn segment(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("topics/t/00000000000000000000.log")
}

async fn ten_events(dir: &std::path::Path) {
    let log = LogTransport::open(dir).unwrap();
    for i in 0..10 {
        log.publish("t", vec![event(i)]).await.unwrap();
    }
    log.close().await.unwrap();
}

async fn read_back(log: &LogTransport) -> Vec<u32> {
    let mut s = sub(log, "t", "reader").await;
    let mut got = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(300), s.next()).await {
        got.push(n(&d));
        d.ack().await.unwrap();
    }
    got
}

#[tokio::test]
async fn a_torn_final_record_is_cut_on_open() {
    let dir = tempfile::tempdir().unwrap();
    ten_events(dir.path()).await;
    let path = segment(dir.path());
    let len = std::fs::metadata(&path).unwrap().len();
    // A write that reached the disk only halfway: the last record loses
    // its final bytes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let log = LogTransport::open(dir.path()).unwrap();
    let cuts = &log.recovery_report().cuts;
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    assert!(cuts[0].reason.contains("torn"), "{cuts:?}");
    assert_eq!(read_back(&log).await, (0..9).collect::<Vec<_>>());
    // The cut is durable and the log appends after it.
    log.publish("t", vec![event(99)]).await.unwrap();
    assert_eq!(log.group_stats("t", "reader").unwrap().end, 10);
}

#[tokio::test]
async fn a_flipped_bit_is_detected_and_the_log_cut_there() {
    let dir = tempfile::tempdir().unwrap();
    ten_events(dir.path()).await;
    let path = segment(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // Flip one bit in the middle of the file: inside the record of event 5
    // or so, never a record boundary the scan could skip over.
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let log = LogTransport::open(dir.path()).unwrap();
    let cuts = &log.recovery_report().cuts;
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    assert!(
        cuts[0].at <= at as u64,
        "cut at or before the damage: {cuts:?}"
    );
    let got = read_back(&log).await;
    assert!(
        got.len() < 10 && got.len() >= 3,
        "an intact prefix survives: {got:?}"
    );
    assert_eq!(
        got,
        (0..got.len() as u32).collect::<Vec<_>>(),
        "and only it"
    );
}

/// Regression: segments and the lock file were 0644, directories 0755.
#[cfg(unix)]
#[tokio::test]
async fn segments_lock_and_directories_are_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("log");
    ten_events(&root).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for d in [root.clone(), root.join("topics"), root.join("topics/t")] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    for f in [segment(&root), root.join("LOCK")] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}
