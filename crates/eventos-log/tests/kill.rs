//! Crash consistency by SIGKILL: a child process publishes and consumes
//! under load and is killed at random moments, round after round, on the
//! same data directory. Every publish it reported as returned is checked to
//! be in the log; every ack it reported as returned must never be followed
//! by a redelivery; redeliveries of unacked events (at-least-once) are
//! counted and reported.
//!
//! The child is this very test binary, started with `EVENTOS_KILL_CHILD`
//! set (the pattern sled's crash tests use). It prints one line per fact —
//! `P <id>` after a publish returned, `D <id> <attempt>` on a delivery,
//! `R <id>` after a retry was stored, `A <id>` after an ack returned — and
//! the parent reads only complete lines. Rounds: 20, or `EVENTOS_KILL_ROUNDS`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use eventos_core::{Event, Publisher, StartFrom, Subscriber, Subscription, Transport};
use eventos_log::LogTransport;
use futures::StreamExt as _;
use rand::Rng as _;

const CHILD_ENV: &str = "EVENTOS_KILL_CHILD";

fn main() -> ExitCode {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return ExitCode::SUCCESS;
    }
    // Honour `cargo test -- --list` and filters the way libtest would.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("sigkill_rounds_lose_no_acknowledged_write: test");
        return ExitCode::SUCCESS;
    }
    if let Some(filter) = args.iter().find(|a| !a.starts_with('-'))
        && !"sigkill_rounds_lose_no_acknowledged_write".contains(filter.as_str())
    {
        return ExitCode::SUCCESS;
    }
    parent();
    ExitCode::SUCCESS
}

fn child(dir: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let log = LogTransport::open(dir).expect("the child opens the log");
        let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let run = std::process::id();
        for p in 0..2u32 {
            let log = log.clone();
            let out = out.clone();
            tokio::spawn(async move {
                for n in 0u64.. {
                    let events: Vec<Event> = (0..8)
                        .map(|i| {
                            Event::builder("/kill", "test.kill.v1")
                                .id(format!("{run}-{p}-{n}-{i}"))
                                .json(&(n * 8 + i))
                                .unwrap()
                                .build()
                                .unwrap()
                        })
                        .collect();
                    let ids: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
                    log.publish("t", events).await.expect("publish");
                    let mut out = out.lock().unwrap();
                    for id in ids {
                        writeln!(out, "P {id}").unwrap();
                    }
                    out.flush().unwrap();
                }
            });
        }
        let mut stream = log
            .subscribe(Subscription::new("t", "g").start(StartFrom::Earliest))
            .await
            .unwrap();
        // Acks run concurrently, as under the router, so they share syncs.
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        while let Some(next) = stream.next().await {
            let permit = slots.clone().acquire_owned().await.unwrap();
            let d = next.expect("delivery");
            let id = d.event().id().to_owned();
            {
                let mut out = out.lock().unwrap();
                writeln!(out, "D {id} {}", d.attempt()).unwrap();
                out.flush().unwrap();
            }
            let out = out.clone();
            tokio::spawn(async move {
                let n: u64 = d.event().decode_data().unwrap();
                if n.is_multiple_of(11) && d.attempt() == 1 {
                    d.retry_after(Duration::from_millis(5))
                        .await
                        .expect("retry");
                    let mut out = out.lock().unwrap();
                    writeln!(out, "R {id}").unwrap();
                    out.flush().unwrap();
                } else {
                    d.ack().await.expect("ack");
                    let mut out = out.lock().unwrap();
                    writeln!(out, "A {id}").unwrap();
                    out.flush().unwrap();
                }
                drop(permit);
            });
        }
    });
}

#[derive(Default)]
struct Ledger {
    published: HashSet<String>,
    acked: HashSet<String>,
    deliveries: HashMap<String, u32>,
    retried: HashMap<String, u32>,
    redelivered_after_ack: Vec<String>,
}

impl Ledger {
    fn read(&mut self, line: &str) {
        let mut parts = line.split(' ');
        match (parts.next(), parts.next()) {
            (Some("P"), Some(id)) => {
                self.published.insert(id.to_owned());
            }
            (Some("R"), Some(id)) => {
                *self.retried.entry(id.to_owned()).or_default() += 1;
            }
            (Some("A"), Some(id)) => {
                self.acked.insert(id.to_owned());
            }
            (Some("D"), Some(id)) => {
                if self.acked.contains(id) {
                    self.redelivered_after_ack.push(id.to_owned());
                }
                *self.deliveries.entry(id.to_owned()).or_default() += 1;
            }
            _ => panic!("unexpected child output {line:?}"),
        }
    }
}

fn parent() {
    let rounds: u32 = std::env::var("EVENTOS_KILL_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut ledger = Ledger::default();
    let mut rng = rand::rng();
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            // A line cut by the kill has no newline: it never happened.
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if line.ends_with('\n') {
                    lines.push(line.trim_end().to_owned());
                }
                line.clear();
            }
            lines
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(150..600)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the child was killed, not finished"
        );
        let lines = reader.join().unwrap();
        for line in &lines {
            ledger.read(line);
        }
        eprintln!(
            "round {round}: {} lines; published {} acked {} so far",
            lines.len(),
            ledger.published.len(),
            ledger.acked.len()
        );
    }
    assert!(
        ledger.published.len() > 1000,
        "the child did real work: {}",
        ledger.published.len()
    );

    // Reopen in this process and drain: every reported publish is there,
    // and the group gives back exactly what was never acked.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (present, rest) = rt.block_on(async {
        let log = LogTransport::open(dir.path()).unwrap();
        let present = drain(&log, "verify").await;
        let rest = drain(&log, "g").await;
        log.close().await.unwrap();
        (present, rest)
    });
    let lost: Vec<&String> = ledger
        .published
        .iter()
        .filter(|id| !present.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged publishes lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let acked_again: Vec<&String> = rest
        .iter()
        .filter(|id| ledger.acked.contains(*id))
        .collect();
    assert!(
        acked_again.is_empty(),
        "acked events redelivered after reopen: {acked_again:?}"
    );
    assert!(
        ledger.redelivered_after_ack.is_empty(),
        "acked events redelivered across kills: {:?}",
        ledger.redelivered_after_ack
    );
    // Deliveries beyond the first and beyond each stored retry: the ones a
    // kill caused (the event was in flight, unacked, when the child died).
    let duplicates: u32 = ledger
        .deliveries
        .iter()
        .map(|(id, n)| n.saturating_sub(1 + ledger.retried.get(id).copied().unwrap_or(0)))
        .sum();
    let retries: u32 = ledger.retried.values().sum();
    eprintln!(
        "{rounds} SIGKILL rounds: {} published, {} acked, {} still pending at the end, {retries} stored retries, {duplicates} redeliveries of events unacked when a kill came (at-least-once), 0 lost",
        ledger.published.len(),
        ledger.acked.len(),
        rest.len()
    );
    println!("test sigkill_rounds_lose_no_acknowledged_write ... ok");
}

/// Reads a group to its end, acking concurrently; returns the ids seen.
async fn drain(log: &LogTransport, group: &str) -> HashSet<String> {
    let mut stream = log
        .subscribe(Subscription::new("t", group).start(StartFrom::Earliest))
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let mut acks = tokio::task::JoinSet::new();
    loop {
        let stats = log.group_stats("t", group).unwrap();
        if stats.cursor == stats.end {
            return seen;
        }
        let next = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
        match next {
            Ok(Some(d)) => {
                let d = d.unwrap();
                seen.insert(d.event().id().to_owned());
                acks.spawn(async move { d.ack().await.unwrap() });
            }
            Ok(None) => panic!("stream of {group} ended"),
            // Nothing ready: the acks in flight must land first.
            Err(_) => {
                assert!(!acks.is_empty(), "group {group} stuck at {stats:?}");
                while acks.join_next().await.is_some() {}
            }
        }
    }
}
