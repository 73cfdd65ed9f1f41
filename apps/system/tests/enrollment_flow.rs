//! Enrollment end to end over HTTP on the embedded log, with a real SMTP
//! server: each test card of the simulated gateway reaches its documented
//! state, the student gets the right mail, optimistic acceptance suspends a
//! fraudulent enrollment and tells the student — and afterwards no card
//! number is anywhere: not in the data directory, not in the mail, not in
//! the logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventos::Backoff;
use school_events::AcceptanceMode;
use school_system::{System, SystemConfig, start};
use school_testkit::{SmtpServer, files_containing};

const APPROVED: &str = "4242 4242 4242 4242";
const DECLINED: &str = "4000 0000 0000 0002";
const TIMEOUT: &str = "4000 0000 0000 0119";
const FRAUD: &str = "4100 0000 0000 0019";
const ALL_CARDS: [&str; 4] = [APPROVED, DECLINED, TIMEOUT, FRAUD];
/// The approved card, as a person might type it into a text field.
const HIDDEN_IN_TEXT: [&str; 3] = [
    "Ana 4242.4242.4242.4242",
    "4242\u{a0}4242\u{a0}4242\u{a0}4242",
    "my card: 4242\t4242\t4242\t4242",
];

/// Every log line of the process, at debug level, for the final scan.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> Captured {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    captured
}

async fn running(dir: &std::path::Path, smtp: &SmtpServer, mode: AcceptanceMode) -> System {
    let mut config = SystemConfig::new(dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.smtp = Some(smtp.url());
    config.mail_retry = Backoff::new(Duration::from_millis(100), Duration::from_millis(400), 5);
    config.enrollment.mode = mode;
    config.antifraud.latency_ms = [10, 50];
    config.billing.gateway_latency_ms = [0, 10];
    config.billing.retry_base_ms = 50;
    config.billing.retry_cap_ms = 200;
    start(config).await.unwrap()
}

async fn enroll(base: &str, email: &str, card: &str) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("{base}/enrollments"))
        .json(&serde_json::json!({
            "student": {"name": "Ana Lima", "email": email},
            "course_id": "rust-101",
            "payment": {
                "card_number": card, "expiry": "12/30", "cvv": "123",
                "holder": "Ana Lima", "amount_cents": 49900, "currency": "EUR"
            }
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        location,
        format!("/enrollments/{}", json["id"].as_str().unwrap())
    );
    json
}

async fn becomes(base: &str, id: &str, want: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view: serde_json::Value = reqwest::get(format!("{base}/enrollments/{id}"))
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
            "enrollment never became {want}: {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kinds(view: &serde_json::Value) -> Vec<String> {
    view["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

async fn mail_to(smtp: &SmtpServer, to: &str, subject_start: &str) -> school_testkit::ReceivedMail {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(m) = smtp.messages().into_iter().find(|m| {
            m.to_addresses().contains(&to)
                && m.subject
                    .as_deref()
                    .is_some_and(|s| s.starts_with(subject_start))
        }) {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no mail to {to} starting {subject_start:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_test_card_reaches_its_state_and_no_card_number_is_kept() {
    let logs = capture_logs();
    let smtp = SmtpServer::start();

    // await_payment: the answer says the payment is being processed.
    let dir = tempfile::tempdir().unwrap();
    let system = running(dir.path(), &smtp, AcceptanceMode::AwaitPayment).await;
    let base = format!("http://{}", system.addr());
    let approved = enroll(&base, "approved@example.com", APPROVED).await;
    assert_eq!(approved["status"], "payment_processing");
    let fraud = enroll(&base, "fraud@example.com", FRAUD).await;
    let declined = enroll(&base, "declined@example.com", DECLINED).await;
    let timeout = enroll(&base, "timeout@example.com", TIMEOUT).await;
    let id = |v: &serde_json::Value| v["id"].as_str().unwrap().to_owned();

    // Regression: a card number typed into the name or the holder was
    // stored, logged, published and mailed. Now it is refused.
    let client = reqwest::Client::new();
    for (name, holder) in [
        (HIDDEN_IN_TEXT[0], "Ana Lima"),
        ("Ana Lima", HIDDEN_IN_TEXT[1]),
    ] {
        let response = client
            .post(format!("{base}/enrollments"))
            .json(&serde_json::json!({
                "student": {"name": name, "email": "hidden@example.com"},
                "course_id": "rust-101",
                "payment": {
                    "card_number": APPROVED, "expiry": "12/30", "cvv": 987,
                    "holder": holder, "amount_cents": 49900, "currency": "EUR"
                }
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422);
        let text = response.text().await.unwrap();
        assert!(!text.contains("4242") && !text.contains("987"), "{text}");
    }
    // ...and a card number in a contact message is masked.
    let response = client
        .post(format!("{base}/contact"))
        .json(&serde_json::json!({
            "name": HIDDEN_IN_TEXT[0], "email": "hidden@example.com",
            "subject": HIDDEN_IN_TEXT[1], "message": HIDDEN_IN_TEXT[2],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let school = mail_to(&smtp, "admissions@school.example", "[contact]").await;
    assert!(
        school.body.contains("•••• •••• •••• 4242"),
        "{}",
        school.body
    );

    let view = becomes(&base, &id(&approved), "active").await;
    assert_eq!(view["payment"]["status"], "captured");
    assert_eq!(view["payment"]["card_last4"], "4242");
    let k = kinds(&view);
    for expected in [
        "school.enrollment.payment_submitted.v1",
        "school.antifraud.fraud_check_passed.v1",
        "school.billing.payment_captured.v1",
        "school.enrollment.enrollment_activated.v1",
    ] {
        assert!(
            k.contains(&expected.to_owned()),
            "{expected} missing: {k:?}"
        );
    }
    let welcome = mail_to(&smtp, "approved@example.com", "Welcome to rust-101").await;
    assert!(
        welcome.body.contains("You are enrolled in rust-101"),
        "{}",
        welcome.body
    );
    // The mail's delivery comes back to the enrollment's timeline.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !kinds(&becomes(&base, &id(&approved), "active").await)
        .contains(&"school.mail.email_sent.v1".to_owned())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "email_sent never reached the timeline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let view = becomes(&base, &id(&fraud), "rejected").await;
    assert_eq!(
        view["reason"], "the payment did not pass our fraud checks",
        "{view:#}"
    );
    assert!(!view.to_string().contains("deny list"), "{view:#}");
    assert_eq!(
        view["payment"]["status"], "pending",
        "a fraud card is never charged"
    );
    mail_to(
        &smtp,
        "fraud@example.com",
        "Your enrollment in rust-101 was not accepted",
    )
    .await;

    let view = becomes(&base, &id(&declined), "payment_failed").await;
    assert!(
        view["reason"].as_str().unwrap().contains("card_declined"),
        "{view:#}"
    );
    mail_to(&smtp, "declined@example.com", "Your payment for rust-101").await;

    let view = becomes(&base, &id(&timeout), "active").await;
    let capture = view["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "school.billing.payment_captured.v1")
        .unwrap();
    assert_eq!(capture["service"], "billing");
    assert_eq!(
        capture["attempt"], 3,
        "two gateway timeouts were retried: {view:#}"
    );

    // The payment metrics saw all of it.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "school_payments_submitted_total 4",
        "school_fraud_checks_total{verdict=\"failed\"} 1",
        "school_payments_total{outcome=\"captured\"} 2",
        "school_payments_total{outcome=\"declined\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }
    system.shutdown().await.unwrap();

    // optimistic: enrolled at once, suspended when the fraud check fails,
    // and the captured charge is refunded.
    let dir2 = tempfile::tempdir().unwrap();
    let system = running(dir2.path(), &smtp, AcceptanceMode::Optimistic).await;
    let base = format!("http://{}", system.addr());
    let fraud = enroll(&base, "optimist@example.com", FRAUD).await;
    assert_eq!(fraud["status"], "active");
    let view = becomes(&base, &id(&fraud), "suspended").await;
    assert_eq!(
        view["reason"], "the payment did not pass our fraud checks",
        "{view:#}"
    );
    assert!(!view.to_string().contains("deny list"), "{view:#}");
    mail_to(&smtp, "optimist@example.com", "Welcome to rust-101").await;
    let notice = mail_to(
        &smtp,
        "optimist@example.com",
        "Your enrollment in rust-101 is suspended",
    )
    .await;
    assert!(notice.body.contains("suspended"), "{}", notice.body);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let view = becomes(&base, &id(&fraud), "suspended").await;
        if view["payment"]["status"] == "refunded" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never refunded: {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    system.shutdown().await.unwrap();

    // No card number anywhere.
    let needles: Vec<String> = ALL_CARDS
        .iter()
        .flat_map(|c| [c.to_string(), c.replace(' ', "")])
        .chain(HIDDEN_IN_TEXT.iter().map(|t| (*t).to_owned()))
        .collect();
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let mut found = files_containing(dir.path(), &needles);
    found.extend(files_containing(dir2.path(), &needles));
    found.extend(files_containing(&smtp.maildir(), &needles));
    assert!(found.is_empty(), "card numbers kept: {found:#?}");
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("enrollment accepted"),
        "the logs were captured"
    );
    for card in ALL_CARDS {
        assert!(
            !logs.contains(&card.replace(' ', "")) && !logs.contains(card),
            "{card} in the logs"
        );
    }
    for text in HIDDEN_IN_TEXT {
        assert!(!logs.contains(text), "{text:?} in the logs");
    }
}
