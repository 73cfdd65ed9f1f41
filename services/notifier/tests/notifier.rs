//! The notifier over events and HTTP (SQLite in a temp dir, the memory
//! transport).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use eventos::{Bus, Router, StartFrom, Subscriber, Subscription};
use eventos_memory::MemoryTransport;
use eventos_outbox::{Relay, Store};
use futures::StreamExt as _;
use school_events::{EmailFailed, EmailRequested, MailPurpose, topics};
use school_http::NotificationKey;
use school_notifier::Notifier;
use tower::ServiceExt as _;

async fn notifier(dir: &tempfile::TempDir, key: NotificationKey) -> Notifier {
    Notifier::new(
        Store::open(&dir.path().join("notifier.db")).await.unwrap(),
        key,
    )
    .await
    .unwrap()
}

fn token(key: &NotificationKey, email: &str) -> String {
    key.token(&email.parse().unwrap())
}

fn failed(purpose: MailPurpose, mail_id: &str) -> EmailFailed {
    EmailFailed {
        mail_id: mail_id.into(),
        purpose,
        about: "msg-1".into(),
        requester_email: "Ana@Example.com".into(),
        subject: "[contact] Visit".into(),
        reason: "retries exhausted after 6 attempts".into(),
        attempts: 6,
    }
}

async fn get(notifier: &Notifier, uri: &str) -> (StatusCode, serde_json::Value) {
    let (status, _, json) =
        get_with(notifier, Request::get(uri).body(Body::empty()).unwrap()).await;
    (status, json)
}

async fn get_with(
    notifier: &Notifier,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    let response = notifier.http().oneshot(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    // A stream that was let in never ends: its headers are the answer.
    if headers
        .get("content-type")
        .is_some_and(|v| v == "text/event-stream")
    {
        return (status, headers, serde_json::Value::Null);
    }
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or_default(),
    )
}

#[tokio::test]
async fn a_failed_contact_message_is_told_to_the_student_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = NotificationKey::random();
    let notifier = notifier(&dir, key.clone()).await;
    let ana = format!(
        "/notifications?email=ana@example.com&token={}",
        token(&key, "ana@example.com")
    );
    let transport = Arc::new(MemoryTransport::new());
    let mut mail = transport
        .subscribe(Subscription::new(topics::MAIL_REQUESTS, "probe").start(StartFrom::Earliest))
        .await
        .unwrap();
    let running = notifier
        .routes()
        .into_iter()
        .fold(Router::new(transport.clone()), Router::route)
        .start()
        .await
        .unwrap();
    let bus = Bus::new(transport.clone(), "/school/mailer");
    let ev = bus
        .event(&failed(MailPurpose::ContactMessage, "contact-1"))
        .unwrap();
    // Delivered twice: one notification, one mail.
    bus.publish(topics::MAIL_FAILURES, vec![ev.clone(), ev])
        .await
        .unwrap();
    bus.emit(
        topics::MAIL_FAILURES,
        &failed(MailPurpose::StudentNotice, "notice-contact-1"),
    )
    .await
    .unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let list = loop {
        let (status, json) = get(&notifier, &ana).await;
        assert_eq!(status, StatusCode::OK);
        let list = json["notifications"].as_array().unwrap().clone();
        if list.len() >= 2 || std::time::Instant::now() > deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    running.shutdown().await.unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["kind"], "contact_message_failed");
    assert!(
        list[0]["text"]
            .as_str()
            .unwrap()
            .contains("We couldn't send your message \"Visit\"")
    );
    assert_eq!(list[0]["emailed"], true);
    assert_eq!(list[1]["kind"], "notice_failed");
    assert_eq!(
        list[1]["emailed"], false,
        "a failed notice does not start a mail loop"
    );

    let relay = Relay::new(notifier.store().clone(), transport.clone());
    assert_eq!(
        relay.relay_once().await.unwrap(),
        1,
        "exactly one notice mail"
    );
    let d = tokio::time::timeout(Duration::from_secs(5), mail.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let notice: EmailRequested = d.event().decode().unwrap();
    assert_eq!(notice.to, "ana@example.com");
    assert_eq!(notice.purpose, MailPurpose::StudentNotice);
}

#[tokio::test]
async fn the_email_parameter_is_required_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let notifier = notifier(&dir, NotificationKey::random()).await;
    for uri in [
        "/notifications",
        "/notifications?email=nope",
        "/notifications?email=x%3Cevil@attacker.example%3E",
        "/notifications?email=a%00@example.com",
        "/notifications/stream",
        "/notifications/stream?email=%22a,b%22@example.com",
    ] {
        let (status, json) = get(&notifier, uri).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{uri}: {json}");
        assert!(
            json["detail"].as_str().unwrap().contains("email"),
            "{uri}: {json}"
        );
    }
}

/// Regression: `GET /notifications?email=` let anyone read anyone's
/// notifications.
#[tokio::test]
async fn notifications_are_read_only_with_the_address_token() {
    let dir = tempfile::tempdir().unwrap();
    let key = NotificationKey::random();
    let notifier = notifier(&dir, key.clone()).await;
    let ana = token(&key, "ana@example.com");
    let rui = token(&key, "rui@example.com");
    let other_key = token(&NotificationKey::random(), "ana@example.com");
    for path in ["/notifications", "/notifications/stream"] {
        let req = |query: &str, bearer: Option<&str>| {
            let mut b = Request::get(format!("{path}?email=Ana@Example.com{query}"));
            if let Some(t) = bearer {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            b.body(Body::empty()).unwrap()
        };
        let (status, headers, json) = get_with(&notifier, req("", None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {json}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert!(headers.contains_key("www-authenticate"), "{path}");
        assert!(json["detail"].as_str().unwrap().contains("token"), "{json}");
        let (status, _, _) = get_with(&notifier, req("", Some(""))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: empty bearer");
        for wrong in [rui.as_str(), other_key.as_str(), "nope", ""] {
            for (query, bearer) in [
                (format!("&token={wrong}"), None),
                (String::new(), Some(wrong)),
            ] {
                if bearer == Some("") {
                    continue;
                }
                let (status, headers, json) = get_with(&notifier, req(&query, bearer)).await;
                assert_eq!(
                    status,
                    StatusCode::NOT_FOUND,
                    "{path} {query} {bearer:?}: {json}"
                );
                assert_eq!(headers["content-type"], "application/problem+json");
                assert!(
                    !json.to_string().contains(wrong) || wrong.is_empty(),
                    "{json}"
                );
            }
        }
        let (status, _, json) = get_with(&notifier, req("&token=a&token=b", None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {json}");
        assert_eq!(json["type"], "/problems/invalid-query");
        for (query, bearer) in [
            (format!("&token={ana}"), None),
            (String::new(), Some(ana.as_str())),
        ] {
            let (status, headers, _) = get_with(&notifier, req(&query, bearer)).await;
            assert_eq!(status, StatusCode::OK, "{path} {query} {bearer:?}");
            if path.ends_with("stream") {
                assert_eq!(headers["content-type"], "text/event-stream");
            }
        }
    }
}
