//! `eventos up` killed with SIGKILL in the middle of sustained contact
//! traffic (16 clients sending as fast as they are answered, the pipeline
//! busy behind them), then started again on the same data directory: every
//! message answered `202` before the kill has its mail written and reaches
//! `sent`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const CLIENTS: usize = 16;
/// Accepted messages after which the kill comes, clients still sending.
const KILL_AFTER: usize = 4000;

async fn client(
    http: reqwest::Client,
    base: String,
    client: usize,
    accepted: Arc<AtomicUsize>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0.. {
        let body = serde_json::json!({
            "name": "Ana Lima",
            "email": format!("ana.{client}.{n}@example.com"),
            "subject": format!("Question {n}"),
            "message": "Is there a Rust course on Friday evenings?",
        });
        // The process dies under us: the request in flight has no answer,
        // and this client is done.
        let Ok(response) = http
            .post(format!("{base}/contact"))
            .json(&body)
            .send()
            .await
        else {
            break;
        };
        if response.status() != reqwest::StatusCode::ACCEPTED {
            break;
        }
        let Ok(answer) = response.json::<serde_json::Value>().await else {
            break;
        };
        ids.push(answer["id"].as_str().unwrap().to_owned());
        accepted.fetch_add(1, Ordering::SeqCst);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_sustained_contact_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("eventos.toml");
    std::fs::write(&config, "").unwrap();
    let log = dir.path().join("eventos.log");
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let mut first = common::spawn_serving(
        &mut common::eventos_up(&data, port, &config, &log),
        "eventos up",
    );
    let accepted = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(http.clone(), base.clone(), c, Arc::clone(&accepted))))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while accepted.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(
            Instant::now() < deadline,
            "the API never accepted {KILL_AFTER} messages"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill(); // SIGKILL, with every client mid-request
    let mut ids = Vec::new();
    for c in clients {
        ids.extend(c.await.unwrap());
    }
    assert!(ids.len() >= KILL_AFTER);
    // The kill came with the pipeline busy: acknowledged messages whose
    // mail was not written yet.
    let written = std::fs::read_dir(data.join("mail"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".eml"))
            })
            .count()
        })
        .unwrap_or(0);
    assert!(
        written < ids.len(),
        "every mail was written before the kill: {written} of {}",
        ids.len()
    );

    let second = common::spawn_serving(
        &mut common::eventos_up(&data, port, &config, &log),
        "eventos up (after the kill)",
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut pending = ids.clone();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for id in pending {
            let view = common::get_json(&http, &format!("{base}/contact/{id}")).await;
            assert_ne!(view["status"], "failed", "{view}");
            assert!(
                view["status"].is_string(),
                "an acknowledged message is gone: {id}: {view}"
            );
            if view["status"] != "sent" {
                still.push(id);
            }
        }
        pending = still;
        if !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} of {} acknowledged messages never reached sent, e.g. {}",
                pending.len(),
                ids.len(),
                pending[0]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Each one's mail is on disk, whole.
    for id in &ids {
        let mail = data.join("mail").join(format!("contact-{id}.eml"));
        let text =
            std::fs::read_to_string(&mail).unwrap_or_else(|e| panic!("{}: {e}", mail.display()));
        assert!(
            text.contains("Is there a Rust course"),
            "{}",
            mail.display()
        );
    }
    second.interrupt();
}
