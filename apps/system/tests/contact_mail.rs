//! The contact flow end to end: HTTP → contact → log → mailer → a real SMTP
//! server (aiosmtpd) → back to the contact timeline; and, when mail finally
//! fails, the notifier's notice; and an SMTP outage far longer than the
//! whole retry budget, during which nothing is given up.

use std::time::{Duration, Instant};

use eventos::Backoff;
use eventos::middleware::Breaker;
use futures::StreamExt as _;
use school_system::{System, SystemConfig, start};
use school_testkit::{Mode, SmtpServer};

async fn system(dir: &std::path::Path, smtp: &SmtpServer) -> System {
    let mut config = SystemConfig::new(dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.smtp = Some(smtp.url());
    config.mail_retry = Backoff::new(Duration::from_millis(100), Duration::from_millis(400), 5);
    // These tests follow one message's own retries; the circuit breaker
    // (which would pause the mailer after a few unreachable tries) has its
    // own test below.
    config.mail_breaker = Breaker::default().failures_to_open(1000);
    config.notifications_key = Some(NOTIFICATIONS_KEY.into());
    start(config).await.unwrap()
}

const NOTIFICATIONS_KEY: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";

/// Ana's notifications token, as the contact service hands it out.
fn ana_token() -> String {
    school_http::NotificationKey::from_hex(NOTIFICATIONS_KEY)
        .unwrap()
        .token(&"ana@example.com".parse().unwrap())
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
    let accepted = response.json::<serde_json::Value>().await.unwrap();
    assert_eq!(accepted["notifications_token"], ana_token());
    accepted["id"].as_str().unwrap().to_owned()
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
    let json: serde_json::Value = reqwest::get(format!(
        "{base}/notifications?email=ana@example.com&token={}",
        ana_token()
    ))
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
        // The server's answer (451) is for the log, not the sender.
        assert_eq!(
            e["detail"].as_str().unwrap().split("; retrying").next(),
            Some("the school's mail server asked us to try again later"),
            "{view}"
        );
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
    assert_eq!(
        view["timeline"][1]["detail"],
        "the mail server refused the message; given up after 1 attempt",
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
    let text = list[1]["text"].as_str().unwrap();
    assert!(
        text.contains("the mail server refused the message") && !text.contains("550"),
        "{text}"
    );
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
            // Regression: the detail named the server's address.
            assert!(
                detail.starts_with("the school's mail server did not answer; retrying within "),
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
    let server = smtp.url();
    let server = server.trim_start_matches("smtp://");
    assert!(!view.to_string().contains(server), "{view:#}");
    assert!(!view.to_string().contains("127.0.0.1"), "{view:#}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = notifications(&base).await;
        if list.iter().any(|n| n["kind"] == "contact_message_failed") {
            let text = serde_json::to_string(&list).unwrap();
            assert!(!text.contains("127.0.0.1"), "{text}");
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

/// The SMTP server is down for 40 s — longer than the whole default retry
/// budget before the circuit breaker (about 31 s), and some 35 times the
/// budget configured here (at most 1.1 s) — with 200 messages queued. The
/// mailer pauses after three unreachable tries and checks the server
/// instead; every sender is told once that their message is late; when
/// the server is back every message goes out, and nobody hears that their
/// message failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_outage_longer_than_the_retry_budget_loses_no_message() {
    const MESSAGES: usize = 200;
    const OUTAGE: Duration = Duration::from_secs(40);
    let dir = tempfile::tempdir().unwrap();
    let mut smtp = SmtpServer::start();
    smtp.stop();
    let mut config = SystemConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.smtp = Some(smtp.url());
    config.mail_retry = Backoff::new(Duration::from_millis(100), Duration::from_millis(400), 5);
    config.mail_breaker = Breaker::default()
        .failures_to_open(3)
        .pauses(Duration::from_millis(100), Duration::from_secs(2));
    config.still_trying_after = Duration::from_secs(3);
    config.notifications_key = Some(NOTIFICATIONS_KEY.into());
    let system = start(config).await.unwrap();
    let base = format!("http://{}", system.addr());
    let outage_ends = Instant::now() + OUTAGE;

    let ids: Vec<String> = futures::stream::iter(0..MESSAGES)
        .map(|_| submit(&base))
        .buffer_unordered(16)
        .collect()
        .await;
    assert_eq!(ids.len(), MESSAGES);

    // Every sender hears, once, that the message is late; none that it
    // failed.
    let delayed = loop {
        let list = notifications(&base).await;
        let failed = list
            .iter()
            .filter(|n| n["kind"] == "contact_message_failed")
            .count();
        assert_eq!(failed, 0, "a message was given up during the outage");
        let delayed = list
            .iter()
            .filter(|n| n["kind"] == "contact_message_delayed")
            .count();
        if delayed == MESSAGES {
            break list;
        }
        assert!(
            Instant::now() < outage_ends,
            "{delayed} of {MESSAGES} senders told by the end of the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        delayed[0]["text"]
            .as_str()
            .unwrap()
            .contains("We keep trying")
    );
    assert!(
        !delayed[0]["emailed"].as_bool().unwrap(),
        "no mail about a mail server that is down"
    );

    // The rest of the outage: still nothing given up.
    while Instant::now() < outage_ends {
        let failed = notifications(&base)
            .await
            .iter()
            .filter(|n| n["kind"] == "contact_message_failed")
            .count();
        assert_eq!(failed, 0, "a message was given up during the outage");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    smtp.restart();

    let mails = smtp.wait_for(MESSAGES, Duration::from_secs(60)).await;
    assert_eq!(mails.len(), MESSAGES, "every message reached the school");
    for id in &ids {
        let view = status_becomes(&base, id, "sent").await;
        let timeline = view["timeline"].as_array().unwrap();
        let kinds: Vec<&str> = timeline
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        assert!(
            kinds.contains(&"school.contact.message_delayed.v1"),
            "{view:#}"
        );
        assert!(!kinds.contains(&"school.mail.email_failed.v1"), "{view:#}");
        // Only the tries before the circuit opened were spent.
        let sent = timeline.last().unwrap();
        assert!(sent["attempt"].as_u64().unwrap() <= 3, "{view:#}");
    }
    let list = notifications(&base).await;
    assert_eq!(
        list.len(),
        MESSAGES,
        "one notice each, and no failure: {list:?}"
    );
    system.shutdown().await.unwrap();
}
