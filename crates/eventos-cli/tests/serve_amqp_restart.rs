//! The broker restarts mid-run (`rabbitmqctl stop_app` / `start_app`) under
//! an API process and a worker process: the API keeps accepting (each
//! enrollment waits in its service's outbox), publishers resume when the
//! broker is back, consumers resume, and every accepted enrollment reaches
//! its final state.
//!
//! Its own test binary: it stops the broker every other RabbitMQ test uses,
//! and cargo runs test binaries one after another.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the broker's app again even if the test fails half-way, so the
/// tests after it find a broker.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
        let _ = Command::new("rabbitmqctl").arg("await_startup").output();
    }
}

async fn enroll(http: &reqwest::Client, base: &str, i: usize) -> String {
    let card = if i % 4 == 3 {
        "4000 0000 0000 0002"
    } else {
        "4242 4242 4242 4242"
    };
    let response = http
        .post(format!("{base}/enrollments"))
        .json(&serde_json::json!({
            "student": {"name": format!("Student {i}"), "email": format!("r{i}@example.com")},
            "course_id": "rust-101",
            "payment": {"card_number": card, "expiry": "12/30", "cvv": "123",
                        "holder": format!("Student {i}"), "amount_cents": 1000, "currency": "EUR"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        202,
        "accepted even while the broker is down"
    );
    let json: serde_json::Value = response.json().await.unwrap();
    json["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let namespace = format!("t{}", uuid::Uuid::now_v7().simple());
    let config = dir.path().join("eventos.toml");
    std::fs::write(
        &config,
        format!(
            "[amqp]\nnamespace = \"{namespace}\"\nqueue_expires_secs = 300\n[antifraud]\nlatency_ms = [100, 400]\nmax_per_card = 100000\nmax_per_email = 100000\n[billing]\ngateway_latency_ms = [5, 20]\n"
        ),
    )
    .unwrap();
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let api = common::serve_amqp(&dir.path().join("api"), &config, "enrollment,contact", port);
    let worker = common::serve_amqp(
        &dir.path().join("worker"),
        &config,
        "antifraud,billing,metrics,mailer,notifier",
        common::free_port(),
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(enroll(&http, &base, i).await);
    }
    // Stop the broker with those in flight; accept more while it is down.
    let guard = RestartGuard;
    rabbitmqctl(&["stop_app"]);
    for i in 40..80 {
        ids.push(enroll(&http, &base, i).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    drop(guard);
    for i in 80..100 {
        ids.push(enroll(&http, &base, i).await);
    }

    let deadline = Instant::now() + Duration::from_secs(120);
    for (i, id) in ids.iter().enumerate() {
        let want = if i % 4 == 3 {
            "payment_failed"
        } else {
            "active"
        };
        common::status_becomes(&http, &format!("{base}/enrollments/{id}"), want, deadline).await;
    }
    worker.interrupt();
    api.interrupt();
    common::delete_namespace(common::AMQP, &namespace).await;
}
