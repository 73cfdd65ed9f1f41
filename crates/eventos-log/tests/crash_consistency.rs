//! Crash consistency by fault injection: the log runs on a simulated disk
//! that crashes at the k-th sync, for every k the workload reaches; the
//! disk is then taken as a power loss would leave it (synced bytes plus a
//! torn part of the rest) and reopened. Whatever publish or ack returned
//! `Ok` before the crash must be there; the log must be an intact prefix of
//! what was written; group state must agree with the acks.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventos_core::{Event, Publisher, StartFrom, Subscriber, Subscription, Transport};
use eventos_log::storage::{Fault, SimStorage, Storage};
use eventos_log::{LogConfig, LogTransport};
use futures::StreamExt as _;

const PUBLISHERS: u32 = 3;
const BATCHES: u32 = 6;
const BATCH: u32 = 4;

#[derive(Default, Debug)]
struct Outcome {
    /// Ids whose publish returned Ok, per publisher, in publish order.
    published: HashMap<u32, Vec<String>>,
    /// Every id a publish was attempted for.
    attempted: BTreeSet<String>,
    /// Ids whose ack returned Ok.
    acked: BTreeSet<String>,
    /// Ids an ack was attempted for: one that failed in the crash may or
    /// may not have reached the disk.
    ack_attempted: BTreeSet<String>,
}

fn event(publisher: u32, n: u32) -> Event {
    Event::builder("/crash", "test.crash.v1")
        .id(format!("p{publisher}-{n:04}"))
        .json(&n)
        .unwrap()
        .build()
        .unwrap()
}

fn open(storage: &SimStorage) -> LogTransport {
    LogConfig::new("/data")
        .segment_bytes(4096)
        .storage(Arc::new(storage.clone()) as Arc<dyn Storage>)
        .open()
        .expect("the simulated disk opens")
}

/// Publishes from several tasks while a consumer acks (retrying every
/// third event once), until everything is done or the disk has crashed.
async fn workload(log: &LogTransport) -> Outcome {
    let out = Arc::new(Mutex::new(Outcome::default()));
    let Ok(mut stream) = log
        .subscribe(Subscription::new("t", "g").start(StartFrom::Earliest))
        .await
    else {
        return Arc::try_unwrap(out).unwrap().into_inner().unwrap();
    };
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let log = log.clone();
        let out = out.clone();
        publishers.push(tokio::spawn(async move {
            for b in 0..BATCHES {
                let events: Vec<Event> = (0..BATCH).map(|i| event(p, b * BATCH + i)).collect();
                let ids: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
                out.lock().unwrap().attempted.extend(ids.iter().cloned());
                if log.publish("t", events).await.is_err() {
                    return;
                }
                out.lock()
                    .unwrap()
                    .published
                    .entry(p)
                    .or_default()
                    .extend(ids);
            }
        }));
    }
    let total = (PUBLISHERS * BATCHES * BATCH) as usize;
    let consumer = {
        let out = out.clone();
        async move {
            loop {
                let Ok(Some(Ok(d))) =
                    tokio::time::timeout(Duration::from_millis(50), stream.next()).await
                else {
                    return;
                };
                let id = d.event().id().to_owned();
                let n: u32 = d.event().decode_data().unwrap();
                let result = if n.is_multiple_of(3) && d.attempt() == 1 {
                    d.retry_after(Duration::from_millis(1))
                        .await
                        .map(|()| false)
                } else {
                    out.lock().unwrap().ack_attempted.insert(id.clone());
                    d.ack().await.map(|()| true)
                };
                match result {
                    Ok(true) => {
                        let mut o = out.lock().unwrap();
                        o.acked.insert(id);
                        if o.acked.len() == total {
                            return;
                        }
                    }
                    Ok(false) => {}
                    Err(_) => return,
                }
            }
        }
    };
    consumer.await;
    for p in publishers {
        p.await.unwrap();
    }
    Arc::try_unwrap(out).unwrap().into_inner().unwrap()
}

/// Reads what is left of a topic for `group` (all of it, for a new
/// group), acking as it goes, until the group's cursor reaches the end.
async fn read_all(log: &LogTransport, group: &str) -> Vec<(String, u32)> {
    let mut stream = log
        .subscribe(Subscription::new("t", group).start(StartFrom::Earliest))
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let stats = log.group_stats("t", group).unwrap();
        if stats.cursor == stats.end {
            return got;
        }
        let d = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap_or_else(|_| panic!("group {group} stuck at {stats:?}"))
            .unwrap()
            .unwrap();
        got.push((d.event().id().to_owned(), d.attempt()));
        d.ack().await.unwrap();
    }
}

async fn check_after_crash(k: u64, crashed: &SimStorage, out: &Outcome, torn: f64) {
    let disk = crashed.after_crash(torn);
    let log = open(&disk);
    let context = format!("crash at sync {k}, torn {torn}");

    // Every Ok publish survived, the log holds nothing never attempted, and
    // each publisher's events are in its publish order (an intact prefix).
    let all = read_all(&log, "verify").await;
    let ids: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
    let present: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(
        present.len(),
        ids.len(),
        "{context}: duplicate offsets in {ids:?}"
    );
    for (p, published) in &out.published {
        for id in published {
            assert!(
                present.contains(id.as_str()),
                "{context}: acknowledged publish {id} lost"
            );
        }
        let order: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| id.starts_with(&format!("p{p}-")))
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(
            order, sorted,
            "{context}: publisher {p}'s events out of order"
        );
    }
    for id in &ids {
        assert!(
            out.attempted.contains(*id),
            "{context}: {id} was never published"
        );
    }

    // The group resumes: nothing acked comes back; everything else does.
    let rest = read_all(&log, "g").await;
    for (id, _) in &rest {
        assert!(
            !out.acked.contains(id),
            "{context}: {id} was acked, yet redelivered"
        );
    }
    let rest_ids: BTreeSet<&str> = rest.iter().map(|(id, _)| id.as_str()).collect();
    for id in &present {
        assert!(
            out.ack_attempted.contains(*id) || rest_ids.contains(id),
            "{context}: {id} was never acked, yet not redelivered"
        );
    }
    log.close().await.unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn crash_at_every_sync_keeps_every_acknowledged_write() {
    let rt = runtime();
    let total_syncs = rt.block_on(async {
        let disk = SimStorage::new(Fault::None);
        let log = open(&disk);
        let out = workload(&log).await;
        assert_eq!(out.acked.len(), (PUBLISHERS * BATCHES * BATCH) as usize);
        log.close().await.unwrap();
        disk.syncs()
    });
    assert!(
        total_syncs > 20,
        "the workload syncs enough to be interesting: {total_syncs}"
    );
    let mut crashes = 0;
    for k in 1..=total_syncs + 1 {
        rt.block_on(async {
            let disk = SimStorage::new(Fault::CrashAtSync(k));
            let log = open(&disk);
            let out = workload(&log).await;
            let _ = log.close().await;
            if disk.has_crashed() {
                crashes += 1;
            }
            for torn in [0.0, 0.5, 1.0] {
                check_after_crash(k, &disk, &out, torn).await;
            }
        });
    }
    assert!(
        crashes as u64 >= total_syncs * 9 / 10,
        "{crashes} of {total_syncs} runs crashed"
    );
}

#[test]
fn a_failed_write_fails_that_publish_and_the_log_recovers_by_itself() {
    let rt = runtime();
    rt.block_on(async {
        let disk = SimStorage::new(Fault::FailAppend(3));
        let log = open(&disk);
        let mut results = Vec::new();
        for b in 0..5 {
            results.push(log.publish("t", vec![event(0, b)]).await.is_ok());
        }
        assert_eq!(results, vec![true, true, false, true, true]);
        assert_eq!(log.stats().failed_rounds, 1);
        // The half-written record was cut at once: consumers and a reopen
        // see exactly the acknowledged events.
        let live = read_all(&log, "live").await;
        let ids: Vec<&str> = live.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, vec!["p0-0000", "p0-0001", "p0-0003", "p0-0004"]);
        log.close().await.unwrap();
        let log = open(&disk);
        assert!(log.recovery_report().cuts.is_empty(), "nothing left to cut");
        let all = read_all(&log, "verify").await;
        let ids: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, vec!["p0-0000", "p0-0001", "p0-0003", "p0-0004"]);
    });
}

#[test]
fn a_full_disk_refuses_every_publish_until_space_returns_then_takes_them_again() {
    let rt = runtime();
    rt.block_on(async {
        let disk = SimStorage::new(Fault::FullFrom(4));
        let log = open(&disk);
        let mut acked = Vec::new();
        let mut refused = 0;
        for b in 0..10 {
            match log.publish("t", vec![event(0, b)]).await {
                Ok(()) => acked.push(b),
                Err(e) => {
                    assert!(e.is_transient(), "a full disk is worth retrying: {e}");
                    refused += 1;
                }
            }
        }
        assert_eq!(acked, [0, 1, 2]);
        assert_eq!(refused, 7);
        disk.free_space();
        for b in 10..15 {
            log.publish("t", vec![event(0, b)]).await.unwrap();
            acked.push(b);
        }
        let want: Vec<String> = acked.iter().map(|b| format!("p0-{b:04}")).collect();
        let live: Vec<String> = read_all(&log, "live")
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(live, want, "exactly the acknowledged events, in order");
        log.close().await.unwrap();
        let log = open(&disk);
        let reopened: Vec<String> = read_all(&log, "verify")
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(reopened, want);
    });
}
