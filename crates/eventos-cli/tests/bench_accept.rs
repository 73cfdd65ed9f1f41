//! `eventos bench accept` against a real `eventos up`: it reports every
//! case it ran with the syncs each accepted message cost (read from the
//! system's counters, so they are there and add up), and the messages it
//! sent were really accepted and stored.

mod common;

use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_accept_reports_rates_latencies_and_syncs_of_a_running_system() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("eventos.toml");
    std::fs::write(&config, "[antifraud]\nlatency_ms = [0, 0]\n").unwrap();
    let port = common::free_port();
    let up = common::spawn_serving(
        &mut common::eventos_up(
            &dir.path().join("data"),
            port,
            &config,
            &dir.path().join("up.log"),
        ),
        "eventos up",
    );

    let stdout = bench(port, &["--clients", "4", "--seconds", "1"]);
    for row in ["GET /healthz", "POST /contact", "POST /enrollments"] {
        assert!(stdout.contains(row), "no {row} row:\n{stdout}");
    }
    let summary = stdout.lines().last().unwrap();
    let value = |key: &str| summary_value(summary, key);
    for case in ["healthz", "contact", "enrollments"] {
        assert!(value(&format!("{case}_per_s")) > 0.0, "{summary}");
        assert!(
            value(&format!("{case}_p99_ms")) >= value(&format!("{case}_p50_ms")),
            "{summary}"
        );
    }
    // Every accepted message was stored with at least its share of one
    // commit, and group commit keeps it well under one sync per statement.
    for case in ["contact", "enrollments"] {
        let syncs = value(&format!("{case}_syncs_per_msg"));
        assert!(
            syncs > 0.0 && syncs < 10.0,
            "{case}: {syncs} syncs per message"
        );
    }

    // What the bench was told was accepted is there: the contact store's
    // writes cover every accepted contact message.
    let http = reqwest::Client::new();
    let metrics = fetch_metrics(&http, port).await;
    let writes: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("eventos_store_writes_total{store=\"contact\"} "))
        .expect("contact store writes on /metrics")
        .parse()
        .unwrap();
    assert!(
        writes >= value("contact_per_s") * 0.9,
        "{writes} contact writes for {} accepted per second",
        value("contact_per_s")
    );

    // The pipeline case follows every message it sent to its end: once it
    // returns, each accepted message's mail is back on its timeline.
    let stdout = bench(
        port,
        &["--clients", "2", "--seconds", "2", "--cases", "pipeline"],
    );
    assert!(stdout.contains("backlog"), "no per-second lines:\n{stdout}");
    let summary = stdout.lines().last().unwrap();
    let value = |key: &str| summary_value(summary, key);
    assert!(value("pipeline_per_s") > 0.0, "{summary}");
    assert!(value("pipeline_done_per_s") > 0.0, "{summary}");
    let syncs = value("pipeline_syncs_per_msg");
    assert!(syncs > 0.0 && syncs < 10.0, "{summary}");
    let metrics = fetch_metrics(&http, port).await;
    let counter = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} on /metrics"))
            .parse()
            .unwrap()
    };
    let mail_back = counter(
        r#"eventos_deliveries_total{topic="school.mail.sent",group="contact",outcome="ack"} "#,
    );
    let contact_writes = counter("eventos_store_writes_total{store=\"contact\"} ");
    assert!(
        mail_back > 0.0 && mail_back <= contact_writes,
        "{mail_back} mails back for {contact_writes} contact writes"
    );
    up.interrupt();
}

/// Runs `eventos bench accept` against `127.0.0.1:port` with `args`; its
/// stdout, once it has succeeded.
fn bench(port: u16, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args(["bench", "accept", "--target", &format!("127.0.0.1:{port}")])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The value of `key` in the bench's `key=value` summary line.
fn summary_value(summary: &str, key: &str) -> f64 {
    summary
        .split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {summary}"))
        .parse()
        .unwrap()
}

async fn fetch_metrics(http: &reqwest::Client, port: u16) -> String {
    http.get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[test]
fn bench_accept_says_in_one_line_when_nothing_listens() {
    let port = common::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args(["bench", "accept", "--target", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nothing answers") && stderr.contains("eventos up"),
        "{stderr}"
    );
}
