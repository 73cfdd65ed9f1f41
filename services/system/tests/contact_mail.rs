//! The contact flow end to end: HTTP → contact → log → mailer → a real SMTP
//! server (aiosmtpd) → back to the contact timeline; and, when mail finally
//! fails, the notifier's notice.

use std::time::Duration;

use eventos::Backoff;
use school_system::{System, SystemConfig, start};
use school_testkit::{Mode, SmtpServer};

async fn system(dir: &std::path::Path, smtp: &SmtpServer) -> System {
    let mut config = SystemConfig::new(dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.smtp = Some(smtp.url());
    config.mail_retry = Backoff::new(Duration::from_millis(100), Duration::from_millis(400), 5);
    start(config).await.unwrap()
}

async fn submit(base: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!("{base}/contact"))
        .json(&serde_json::json!({
            "name": "Ana Lima",
            "email": "ana@example.com",
            "subject": "Visit on Friday",
            "message": "Can I visit the school on Friday?"
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn status_becomes(base: &str, id: &str, want: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let view: serde_json::Value = reqwest::get(format!("{base}/contact/{id}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["status"] == want {
            return view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status never became {want}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn notifications(base: &str) -> Vec<serde_json::Value> {
    let json: serde_json::Value =
        reqwest::get(format!("{base}/notifications?email=ana@example.com"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    json["notifications"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_contact_message_is_mailed_to_the_school() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start();
    let system = system(dir.path(), &smtp).await;
    let base = format!("http://{}", system.addr());
    let id = submit(&base).await;
    let view = status_becomes(&base, &id, "sent").await;
    let mails = smtp.messages();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.subject.as_deref(), Some("[contact] Visit on Friday"));
    assert!(
        mail.header("To")
            .unwrap()
            .contains("admissions@school.example")
    );
    assert!(mail.header("Reply-To").unwrap().contains("ana@example.com"));
    assert!(mail.body.contains("Can I visit the school on Friday?"));
    assert_eq!(view["timeline"][1]["type"], "school.mail.email_sent.v1");
    assert!(notifications(&base).await.is_empty());
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn smtp_down_is_retried_and_delivered_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut smtp = SmtpServer::start();
    smtp.set_mode(Mode::TempFail);
    let system = system(dir.path(), &smtp).await;
    let base = format!("http://{}", system.addr());
    let id = submit(&base).await;
    smtp.wait_for_rejected(2, Duration::from_secs(10)).await;
    smtp.set_mode(Mode::Accept);
    let view = status_becomes(&base, &id, "sent").await;
    let timeline = view["timeline"].as_array().unwrap();
    let sent = timeline.last().unwrap();
    assert_eq!(sent["type"], "school.mail.email_sent.v1", "{view}");
    assert!(sent["attempt"].as_u64().unwrap() >= 3, "{view}");
    // Each refused try is in the timeline, in order, with its error.
    let deferred: Vec<_> = timeline
        .iter()
        .filter(|e| e["type"] == "school.mail.email_deferred.v1")
        .collect();
    assert!(deferred.len() >= 2, "{view}");
    for (i, e) in deferred.iter().enumerate() {
        assert_eq!(e["attempt"].as_u64().unwrap(), i as u64 + 1, "{view}");
        assert!(e["detail"].as_str().unwrap().contains("451"), "{view}");
    }
    assert_eq!(smtp.messages().len(), 1);
    assert!(
        notifications(&base).await.is_empty(),
        "delivered in time: no notice"
    );
    let _ = &mut smtp;
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn mail_that_finally_fails_is_told_to_the_student() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start();
    smtp.set_mode(Mode::PermFail);
    let system = system(dir.path(), &smtp).await;
    let base = format!("http://{}", system.addr());
    let id = submit(&base).await;
    let view = status_becomes(&base, &id, "failed").await;
    assert!(
        view["timeline"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("550"),
        "{view}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let list = loop {
        let list = notifications(&base).await;
        if list.len() >= 2 {
            break list;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "notifications: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(list[0]["kind"], "contact_message_failed");
    // The notice mail to the student failed too (the server refuses all),
    // which is recorded without starting a loop.
    assert_eq!(list[1]["kind"], "notice_failed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(notifications(&base).await.len(), 2);
    system.shutdown().await.unwrap();
}

fn ms(time: &serde_json::Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(time.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

#[tokio::test]
async fn smtp_down_throughout_shows_growing_retries_then_the_notification() {
    let dir = tempfile::tempdir().unwrap();
    let mut smtp = SmtpServer::start();
    smtp.stop();
    let system = system(dir.path(), &smtp).await;
    let base = format!("http://{}", system.addr());
    let id = submit(&base).await;
    let view = status_becomes(&base, &id, "failed").await;
    let timeline = view["timeline"].as_array().unwrap();
    let deferred: Vec<_> = timeline
        .iter()
        .filter(|e| e["type"] == "school.mail.email_deferred.v1")
        .collect();
    // Five attempts: four deferred (each with its retry window), then the
    // failure.
    assert_eq!(deferred.len(), 4, "{view:#}");
    let windows: Vec<u64> = deferred
        .iter()
        .map(|e| {
            let detail = e["detail"].as_str().unwrap();
            assert!(
                detail.contains("connection")
                    || detail.contains("refused")
                    || detail.contains("smtp"),
                "{detail}"
            );
            let within = detail.rsplit("retrying within ").next().unwrap();
            within.trim_end_matches(" ms").parse().unwrap()
        })
        .collect();
    assert_eq!(windows, vec![100, 200, 400, 400], "{view:#}");
    // Every actual pause stayed inside the window announced before it
    // (plus scheduling slack).
    for pair in deferred.windows(2) {
        let gap = ms(&pair[1]["time"]) - ms(&pair[0]["time"]);
        let window = windows[pair[0]["attempt"].as_u64().unwrap() as usize - 1];
        assert!(
            gap <= window as i64 + 1500,
            "gap {gap} ms > window {window} ms: {view:#}"
        );
    }
    let failed = timeline.last().unwrap();
    assert_eq!(failed["type"], "school.mail.email_failed.v1", "{view:#}");
    assert_eq!(failed["attempt"], 5);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = notifications(&base).await;
        if list.iter().any(|n| n["kind"] == "contact_message_failed") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no notification: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    system.shutdown().await.unwrap();
}
