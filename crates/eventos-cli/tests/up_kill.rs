//! `eventos up` killed with SIGKILL while 200 enrollments are in flight,
//! then started again on the same data directory: every enrollment the API
//! accepted reaches the final state its test card calls for, no card is
//! charged twice, no student gets two different welcome mails — and no card
//! number is left in the data directory or the process's logs.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use school_testkit::SmtpServer;

const ENROLLMENTS: usize = 200;

/// (card, the final state it leads to under await_payment)
const CARDS: [(&str, &str); 4] = [
    ("4242 4242 4242 4242", "active"),
    ("4000 0000 0000 0002", "payment_failed"),
    ("4000 0000 0000 0119", "active"),
    ("4100 0000 0000 0019", "rejected"),
];

fn card_of(i: usize) -> (&'static str, &'static str) {
    // Mostly approvals, so most of the work (charge, welcome mail) is real.
    match i % 10 {
        7 => CARDS[1],
        8 => CARDS[2],
        9 => CARDS[3],
        _ => CARDS[0],
    }
}

const SETTINGS: &str = r#"
[antifraud]
# Slow enough that work is in flight when the kill comes.
latency_ms = [200, 900]
# One card for 140 students is a test, not a fraud ring.
max_per_card = 100000
max_per_email = 100000

[billing]
gateway_latency_ms = [20, 80]
retry_base_ms = 100
retry_cap_ms = 400

[mail]
retry_base_ms = 100
retry_cap_ms = 400
"#;

/// Starts `eventos up`; returns once it serves, with its logs going to
/// `log` (appended: both runs are scanned).
fn up(dir: &Path, port: u16, smtp: &str, config: &Path, log: &Path) -> common::Serving {
    common::spawn_serving(
        common::eventos_up(dir, port, config, log)
            .args(["--smtp", smtp])
            // Everything the services log, for the scan at the end.
            .env("EVENTOS_LOG", "debug")
            // An override through the environment, on top of the file.
            .env("EVENTOS_ANTIFRAUD__SCORE_THRESHOLD", "70"),
        "eventos up",
    )
}

fn body(i: usize) -> serde_json::Value {
    let (card, _) = card_of(i);
    serde_json::json!({
        "student": {"name": format!("Student {i}"), "email": format!("student{i}@example.com")},
        "course_id": "rust-101",
        "payment": {
            "card_number": card, "expiry": "12/30", "cvv": "123",
            "holder": format!("Student {i}"), "amount_cents": 49900, "currency": "EUR"
        }
    })
}

async fn submit(http: &reqwest::Client, base: &str, i: usize) -> Option<String> {
    let response = http
        .post(format!("{base}/enrollments"))
        .header("idempotency-key", format!("kill-test-{i}"))
        .json(&body(i))
        .send()
        .await
        .ok()?;
    if response.status() != 202 {
        return None;
    }
    let json: serde_json::Value = response.json().await.ok()?;
    Some(json["id"].as_str()?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_200_enrollments_in_flight_loses_nothing_and_charges_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("eventos.toml");
    std::fs::write(&config, SETTINGS).unwrap();
    let log = dir.path().join("eventos.log");
    let smtp = SmtpServer::start();
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let mut first = up(&data, port, &smtp.url(), &config, &log);
    // 200 students submit at once (32 connections); the process is killed
    // once 120 are accepted, with the rest still arriving.
    let accepted = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..ENROLLMENTS {
        let (http, base, accepted, gate) =
            (http.clone(), base.clone(), accepted.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let id = submit(&http, &base, i).await;
            if id.is_some() {
                accepted.fetch_add(1, Ordering::SeqCst);
            }
            id
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted.load(Ordering::SeqCst) < 120 {
        assert!(
            Instant::now() < deadline,
            "the API never accepted 120 enrollments"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill(); // SIGKILL
    let mut ids: BTreeMap<usize, String> = BTreeMap::new();
    for (i, task) in tasks.into_iter().enumerate() {
        if let Some(id) = task.await.unwrap() {
            ids.insert(i, id);
        }
    }
    let before_kill = ids.len();
    assert!(
        before_kill < ENROLLMENTS,
        "the kill came after every request was answered"
    );

    let second = up(&data, port, &smtp.url(), &config, &log);
    // A client that got no answer retries with its Idempotency-Key: an
    // enrollment committed before the kill is given back, not made twice.
    for i in 0..ENROLLMENTS {
        if let Some(id) = ids.get(&i) {
            // An answered request replayed gives the same enrollment.
            if i % 25 == 0 {
                assert_eq!(submit(&http, &base, i).await.as_ref(), Some(id));
            }
            continue;
        }
        let id = submit(&http, &base, i)
            .await
            .expect("a retried request is accepted");
        ids.insert(i, id);
    }
    assert_eq!(ids.len(), ENROLLMENTS);

    // Every enrollment reaches the state its card calls for.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pending: Vec<usize> = (0..ENROLLMENTS).collect();
    let mut views: HashMap<usize, serde_json::Value> = HashMap::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for i in pending {
            let view = common::get_json(&http, &format!("{base}/enrollments/{}", ids[&i])).await;
            if view["status"] == card_of(i).1 {
                views.insert(i, view);
            } else {
                assert_ne!(view["status"], "", "{view}");
                still.push(i);
            }
        }
        pending = still;
        if !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} enrollments never reached their final state, e.g. {}",
                pending.len(),
                ids[&pending[0]]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let active: Vec<usize> = (0..ENROLLMENTS)
        .filter(|i| card_of(*i).1 == "active")
        .collect();

    // Welcome mail: every active student gets one (one Message-ID); nobody
    // else gets any.
    let deadline = Instant::now() + Duration::from_secs(60);
    let welcomes = loop {
        let mut by_student: HashMap<String, Vec<String>> = HashMap::new();
        for m in smtp.messages() {
            if m.subject.as_deref() == Some("Welcome to rust-101") {
                by_student
                    .entry(m.to_addresses()[0].to_owned())
                    .or_default()
                    .push(m.message_id.clone().unwrap());
            }
        }
        if by_student.len() >= active.len() || Instant::now() > deadline {
            break by_student;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(welcomes.len(), active.len(), "welcome mails: {welcomes:?}");
    let mut copies = 0;
    for i in &active {
        let ids = &welcomes[&format!("student{i}@example.com")];
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "student {i} got different welcome mails: {ids:?}"
        );
        copies += ids.len() - 1;
    }

    // Stop cleanly, then look at the gateway's ledger: money was taken once
    // per active enrollment and never for the others.
    second.interrupt();
    let gateway = school_billing::SimulatedGateway::open(&data.join("gateway.db"), [0, 0])
        .await
        .unwrap();
    assert_eq!(
        gateway.max_captures_per_key().await.unwrap(),
        1,
        "a card was charged twice"
    );
    let ledger = gateway.ledger().await.unwrap();
    let charged: std::collections::HashSet<_> =
        ledger.iter().map(|c| c.idempotency_key.clone()).collect();
    for i in 0..ENROLLMENTS {
        assert_eq!(
            charged.contains(&ids[&i]),
            card_of(i).1 == "active",
            "enrollment {i} ({}) charged: {}",
            card_of(i).1,
            charged.contains(&ids[&i])
        );
    }

    // No card number anywhere: data directory, logs, mail.
    let needles: Vec<String> = CARDS
        .iter()
        .flat_map(|(c, _)| [c.to_string(), c.replace(' ', "")])
        .collect();
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let mut found = school_testkit::files_containing(&data, &needles);
    found.extend(school_testkit::files_containing(&smtp.maildir(), &needles));
    found.extend(school_testkit::files_containing(dir.path(), &needles));
    assert!(found.is_empty(), "card numbers kept: {found:#?}");
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("enrollment accepted"),
        "the debug logs were captured"
    );
    eprintln!(
        "{before_kill} accepted before the kill, {} after; {} active, {} welcome mails resent with the same Message-ID",
        ENROLLMENTS - before_kill,
        active.len(),
        copies
    );
}
