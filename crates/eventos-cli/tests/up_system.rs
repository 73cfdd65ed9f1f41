//! `eventos up` as a user runs it: start the binary, use the HTTP API as the
//! README's curl lines do, press Ctrl-C (SIGINT), and find the mail on disk.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test]
async fn up_serves_the_contact_form_and_drains_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args(["up", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("Ctrl-C");
        banner.push(line);
        if done {
            break;
        }
    }
    let banner = banner.join("\n");
    assert!(
        banner.contains(&format!("POST http://127.0.0.1:{port}/contact")),
        "{banner}"
    );
    assert!(banner.contains("log (durable)"), "{banner}");

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let accepted: serde_json::Value = http
        .post(format!("{base}/contact"))
        .json(&serde_json::json!({"name": "Ana", "email": "ana@example.com", "subject": "Hi", "message": "Hello"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    common::status_becomes(&http, &format!("{base}/contact/{id}"), "sent", deadline).await;
    let bad = http
        .post(format!("{base}/contact"))
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit {exit:?}, output {rest:?}");
    assert_eq!(rest.last().map(String::as_str), Some("stopped"), "{rest:?}");
    let eml = std::fs::read_dir(dir.path().join("mail")).unwrap().count();
    assert_eq!(eml, 1, "the mail was written as an .eml file");

    // The README's inspection command takes the system's data directory.
    let topics = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args(["log", "topics", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&topics.stdout);
    assert!(
        topics.status.success(),
        "{}",
        String::from_utf8_lossy(&topics.stderr)
    );
    assert!(listing.contains("school.mail.requests"), "{listing}");
}

#[test]
fn a_second_up_on_the_same_data_dir_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut first = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args(["up", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().starts_with("Ctrl-C")));
    let second = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args([
            "up",
            "--listen",
            &format!("127.0.0.1:{}", common::free_port()),
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(line.contains("is in use by process"), "{stderr}");
}
