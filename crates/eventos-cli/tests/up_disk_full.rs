//! `eventos up` on a disk that fills up and is freed again, a real tmpfs:
//! every request is answered `202` or `503` (problem+json, `Retry-After`),
//! never anything else, also on a disk so nearly full that some writes
//! fit and others do not; `/readyz` says 503 while the disk is full; when
//! space returns the system recovers by itself, without a restart; and
//! every request that got a `202` is carried through — contact messages
//! mailed, enrollments active — also after a restart.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use eventos_test_brokers::TinyFs;

const CONFIG: &str = r#"
[antifraud]
latency_ms = [5, 20]
max_per_card = 100000
max_per_email = 100000

[billing]
gateway_latency_ms = [5, 20]
retry_base_ms = 100
retry_cap_ms = 400

[mail]
retry_base_ms = 100
retry_cap_ms = 400
"#;

fn up(dir: &Path, port: u16, config: &Path, log: &Path) -> common::Serving {
    common::spawn_serving(
        &mut common::eventos_up(dir, port, config, log),
        "eventos up",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Contact,
    Enrollment,
}

/// One request; `Ok(id)` for a 202, `Err(status)` for a 503. Anything else
/// fails the test.
async fn submit(http: &reqwest::Client, base: &str, kind: Kind, i: usize) -> Result<String, u16> {
    let request = match kind {
        Kind::Contact => http.post(format!("{base}/contact")).json(&serde_json::json!({
            "name": "Ana Lima", "email": format!("ana{i}@example.com"),
            "subject": format!("Question {i}"), "message": "Is there a course on Friday?"
        })),
        Kind::Enrollment => http
            .post(format!("{base}/enrollments"))
            .header("idempotency-key", format!("disk-full-{i}"))
            .json(&serde_json::json!({
                "student": {"name": format!("Student {i}"), "email": format!("student{i}@example.com")},
                "course_id": "rust-101",
                "payment": {
                    "card_number": "4242 4242 4242 4242", "expiry": "12/30", "cvv": "123",
                    "holder": format!("Student {i}"), "amount_cents": 49900, "currency": "EUR"
                }
            })),
    };
    let response = request.send().await.expect("the server answers");
    let status = response.status().as_u16();
    match status {
        202 => {
            let json: serde_json::Value = response.json().await.unwrap();
            Ok(json["id"].as_str().unwrap().to_owned())
        }
        503 => {
            assert!(
                response.headers().contains_key("retry-after"),
                "503 without Retry-After"
            );
            let ty = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            assert_eq!(ty, "application/problem+json");
            Err(status)
        }
        other => panic!(
            "{kind:?} {i}: answered {other}: {}",
            response.text().await.unwrap_or_default()
        ),
    }
}

async fn readyz(http: &reqwest::Client, base: &str) -> u16 {
    http.get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Waits until every accepted request has reached its final state.
async fn all_done(
    http: &reqwest::Client,
    base: &str,
    accepted: &[(Kind, String)],
    within: Duration,
) {
    let deadline = Instant::now() + within;
    for (kind, id) in accepted {
        let (path, want) = match kind {
            Kind::Contact => ("contact", "sent"),
            Kind::Enrollment => ("enrollments", "active"),
        };
        common::status_becomes(http, &format!("{base}/{path}/{id}"), want, deadline).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_503_loses_nothing_accepted_and_recovers_by_itself() {
    let Some(fs) = TinyFs::mount(48 << 20) else {
        return;
    };
    let outside = tempfile::tempdir().unwrap();
    let config = outside.path().join("eventos.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let log = outside.path().join("eventos.log");
    let data = fs.path().join("data");
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let server = up(&data, port, &config, &log);

    let mut accepted: Vec<(Kind, String)> = Vec::new();
    let mut refused = 0;
    let kinds = [Kind::Contact, Kind::Enrollment];
    for i in 0..20 {
        let kind = kinds[i % 2];
        accepted.push((
            kind,
            submit(&http, &base, kind, i)
                .await
                .expect("a 202 before the disk fills"),
        ));
    }
    all_done(&http, &base, &accepted, Duration::from_secs(60)).await;

    fs.fill();
    // A store's write-ahead log reuses the blocks it already has after a
    // checkpoint, so commits that fit in them stay durable on a full disk
    // and are rightly accepted; how many depends on where the log stood.
    // Past that room every write is refused.
    let mut tried = 0;
    for i in 1000..1500 {
        let kind = kinds[i % 2];
        tried += 1;
        match submit(&http, &base, kind, i).await {
            Ok(id) => accepted.push((kind, id)),
            Err(_) => refused += 1,
        }
        if refused >= 40 {
            break;
        }
    }
    assert!(
        refused >= 40,
        "the full disk refused only {refused} of {tried} requests"
    );
    assert_eq!(
        readyz(&http, &base).await,
        503,
        "not ready while the disk is full"
    );
    let full_accepted = accepted.len() - 20;

    // Nearly full: a little room, taken by whichever writes come first.
    fs.release(256 << 10);
    for i in 300..380 {
        let kind = kinds[i % 2];
        match submit(&http, &base, kind, i).await {
            Ok(id) => accepted.push((kind, id)),
            Err(_) => refused += 1,
        }
    }
    let nearly_accepted = accepted.len() - 20 - full_accepted;

    fs.free();
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(&http, &base).await != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready 30 s after space returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 200..220 {
        let kind = kinds[i % 2];
        accepted.push((
            kind,
            submit(&http, &base, kind, i)
                .await
                .expect("a 202 once space is back"),
        ));
    }
    all_done(&http, &base, &accepted, Duration::from_secs(90)).await;

    // Every contact message that got a 202 is a mail on disk.
    for (kind, id) in &accepted {
        if *kind == Kind::Contact {
            let mail = data.join("mail").join(format!("contact-{id}.eml"));
            assert!(mail.exists(), "no mail for accepted message {id}");
        }
    }

    // And it all holds after a restart.
    server.interrupt();
    let _server = up(&data, port, &config, &log);
    all_done(&http, &base, &accepted, Duration::from_secs(30)).await;
    eprintln!(
        "accepted {} ({full_accepted} while the disk was full, {nearly_accepted} while nearly full), refused {refused} with 503, all {} delivered",
        accepted.len(),
        accepted.len()
    );
}
