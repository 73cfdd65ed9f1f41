//! The contact service over HTTP and events (SQLite in a temp dir, the
//! memory transport).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use eventos::{Bus, Router, StartFrom, Subscriber, Subscription};
use eventos_memory::MemoryTransport;
use eventos_outbox::{Relay, Store};
use futures::StreamExt as _;
use school_contact::{Accepted, Contact, ContactConfig, MessageView};
use school_events::{EmailFailed, EmailRequested, EmailSent, MailPurpose, topics};
use tower::ServiceExt as _;

async fn service() -> (tempfile::TempDir, Contact) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("contact.db")).await.unwrap();
    let contact = Contact::new(store, ContactConfig::default()).await.unwrap();
    (dir, contact)
}

/// A consumer of the mail requests the service publishes.
async fn mail_probe() -> (Arc<MemoryTransport>, eventos::core::DeliveryStream) {
    let transport = Arc::new(MemoryTransport::new());
    let requests = transport
        .subscribe(Subscription::new(topics::MAIL_REQUESTS, "probe").start(StartFrom::Earliest))
        .await
        .unwrap();
    (transport, requests)
}

/// Relays the one event `contact` enqueued and returns its delivery.
async fn relay_one(
    contact: &Contact,
    transport: &Arc<MemoryTransport>,
    requests: &mut eventos::core::DeliveryStream,
) -> eventos::Delivery {
    let relay = Relay::new(contact.store().clone(), transport.clone());
    assert_eq!(relay.relay_once().await.unwrap(), 1);
    tokio::time::timeout(Duration::from_secs(5), requests.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

fn contact_key(contact: &Contact) -> school_http::NotificationKey {
    contact.config().notifications_key.clone()
}

async fn call(
    contact: &Contact,
    req: Request<Body>,
) -> (StatusCode, Option<String>, String, serde_json::Value) {
    let response = contact.http().oneshot(req).await.unwrap();
    let status = response.status();
    let ct = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    let location = response
        .headers()
        .get(header::LOCATION)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, ct, location, json)
}

fn post(body: impl Into<Body>, content_type: Option<&str>) -> Request<Body> {
    let mut b = Request::post("/contact");
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    b.body(body.into()).unwrap()
}

const GOOD: &str = r#"{"name":"Ana","email":"ana@example.com","subject":"Visit","message":"Can I visit on Friday?"}"#;

#[tokio::test]
async fn malformed_input_gets_its_documented_problem() {
    let (_dir, contact) = service().await;
    let big = format!(
        r#"{{"name":"Ana","email":"ana@example.com","subject":"s","message":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let cases: Vec<(&str, String, Option<&str>, StatusCode, &str)> = vec![
        (
            "bad json",
            "{".into(),
            Some("application/json"),
            StatusCode::BAD_REQUEST,
            "malformed-json",
        ),
        (
            "wrong type",
            r#"{"name":1,"email":"a@b.co","subject":"s","message":"m"}"#.into(),
            Some("application/json"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (
            "missing field",
            r#"{"name":"A","email":"a@b.co","subject":"s"}"#.into(),
            Some("application/json"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (
            "unknown field",
            r#"{"name":"A","email":"a@b.co","subject":"s","message":"m","x":1}"#.into(),
            Some("application/json"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (
            "bad e-mail",
            r#"{"name":"A","email":"not-an-email","subject":"s","message":"m"}"#.into(),
            Some("application/json"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
        ),
        (
            "empty message",
            r#"{"name":"A","email":"a@b.co","subject":"s","message":"  "}"#.into(),
            Some("application/json"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
        ),
        (
            "wrong content type",
            GOOD.into(),
            Some("text/plain"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
        ),
        (
            "no content type",
            GOOD.into(),
            None,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
        ),
        (
            "oversize body",
            big,
            Some("application/json"),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
        ),
    ];
    for (name, body, ct, status, kind) in cases {
        let (got, content_type, _, json) = call(&contact, post(body, ct)).await;
        assert_eq!(got, status, "{name}: {json}");
        assert_eq!(
            content_type.as_deref(),
            Some("application/problem+json"),
            "{name}"
        );
        assert_eq!(json["type"], format!("/problems/{kind}"), "{name}: {json}");
        assert!(!json["detail"].as_str().unwrap().is_empty(), "{name}");
    }

    // Values a hostile client sent, each refused as a 422 naming its field.
    let good: serde_json::Value = serde_json::from_str(GOOD).unwrap();
    let fields: Vec<(&str, &str, &str)> = vec![
        ("name", "Ana\0", "NUL in the name"),
        ("name", "Ana\u{1b}[31m", "escape in the name"),
        (
            "subject",
            "Visit\u{b}Bcc: evil@attacker.example",
            "vertical tab in the subject",
        ),
        (
            "subject",
            "Visit\u{c}Bcc: evil@attacker.example",
            "form feed in the subject",
        ),
        (
            "subject",
            "Visit\r\nBcc: evil@attacker.example",
            "line break in the subject",
        ),
        (
            "subject",
            "Visit\u{85}Bcc: evil@attacker.example",
            "C1 next line in the subject",
        ),
        (
            "subject",
            "Visit\u{2028}Bcc: x",
            "line separator in the subject",
        ),
        ("message", "hello\0world", "NUL in the message"),
        (
            "message",
            "hello\rworld",
            "lone carriage return in the message",
        ),
        ("message", "hello\u{7f}", "DEL in the message"),
        (
            "email",
            "x<evil@attacker.example>",
            "angle brackets in the address",
        ),
        ("email", "Ana <ana@example.com>", "a display name"),
        ("email", "\"a,b\"@example.com", "a quoted local part"),
        ("email", "a(comment)@example.com", "a comment"),
        ("email", "a@example.com,b@example.com", "a list"),
        ("email", "ana\0@example.com", "NUL in the address"),
        ("email", "ü@exämple.de", "a non-ASCII local part"),
        ("email", "ana@exa_mple.com", "a bad domain"),
        (
            "email",
            "4242.4242.4242.4242@example.com",
            "a card number in the address",
        ),
    ];
    for (field, value, name) in fields {
        let mut body = good.clone();
        body[field] = value.into();
        let (got, content_type, _, json) =
            call(&contact, post(body.to_string(), Some("application/json"))).await;
        assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {json}");
        assert_eq!(
            content_type.as_deref(),
            Some("application/problem+json"),
            "{name}"
        );
        assert_eq!(json["type"], "/problems/validation", "{name}: {json}");
        assert_eq!(
            json["errors"].as_array().unwrap().len(),
            1,
            "{name}: {json}"
        );
        assert_eq!(json["errors"][0]["pointer"], format!("/{field}"), "{name}");
        assert!(
            !school_http::holds_card_number(&json.to_string()),
            "{name}: {json}"
        );
    }
    // A message body keeps its line breaks and tabs.
    let mut multi = good.clone();
    multi["message"] = "line one\n\tline two".into();
    let (got, _, _, json) = call(&contact, post(multi.to_string(), Some("application/json"))).await;
    assert_eq!(got, StatusCode::ACCEPTED, "{json}");

    // Ids that cannot be one are a 404 that does not echo them.
    let long = "a".repeat(10 * 1024);
    let unknown = "0190c3f4-6f1e-7a5b-9c2d-3e4f5a6b7c8d";
    let too_long = format!("{unknown}0");
    for id in ["nope", long.as_str(), too_long.as_str(), "%FF%FE", unknown] {
        let (status, content_type, _, json) = call(
            &contact,
            Request::get(format!("/contact/{id}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{json}");
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
        assert_eq!(json["type"], "/problems/not-found", "{json}");
        let text = json.to_string();
        assert!(!text.contains(id), "{id:.40}… echoed: {text:.200}");
    }
}

/// Regression: a card number typed into a contact message was stored,
/// published and mailed as it was.
#[tokio::test]
async fn card_numbers_in_a_message_are_masked_before_anything_keeps_them() {
    let (dir, contact) = service().await;
    let (transport, mut requests) = mail_probe().await;
    let body = serde_json::json!({
        "name": "Ana 4242.4242.4242.4242",
        "email": "ana@example.com",
        "subject": "Card 4242\u{a0}4242\u{a0}4242\u{a0}4242",
        "message": "My card is 4242\t4242\t4242\t4242, exp 12/30; my friend's is 5555/5555/5555/4444.",
    });
    let (status, _, _, json) =
        call(&contact, post(body.to_string(), Some("application/json"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    let d = relay_one(&contact, &transport, &mut requests).await;
    let mail: EmailRequested = d.event().decode().unwrap();
    assert_eq!(mail.subject, "[contact] Card •••• •••• •••• 4242");
    assert!(
        mail.body
            .starts_with("From: Ana •••• •••• •••• 4242 <ana@example.com>"),
        "{}",
        mail.body
    );
    assert!(
        mail.body.contains(
            "My card is •••• •••• •••• 4242, exp 12/30; my friend's is •••• •••• •••• 4444."
        ),
        "{}",
        mail.body
    );
    let published = String::from_utf8_lossy(d.event().data().unwrap()).into_owned();
    assert!(!school_http::holds_card_number(&published), "{published}");
    drop(d);
    let needles = [
        "4242424242424242",
        "5555555555554444",
        "4242.4242",
        "4242\t4242",
        "5555/5555",
    ];
    let found = school_testkit::files_containing(dir.path(), &needles);
    assert!(found.is_empty(), "card numbers kept: {found:#?}");
}

#[tokio::test]
async fn the_address_is_stored_and_mailed_normalized() {
    let (_dir, contact) = service().await;
    let (transport, mut requests) = mail_probe().await;
    let body = r#"{"name":"Ana","email":" ana@Exämple.DE ","subject":"Visit","message":"Hi"}"#;
    let (status, _, _, json) = call(&contact, post(body, Some("application/json"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    // The token opens the normalized address's notifications.
    let accepted: Accepted = serde_json::from_value(json).unwrap();
    let key = contact_key(&contact);
    assert!(key.verify(
        &"ana@xn--exmple-cua.de".parse().unwrap(),
        &accepted.notifications_token
    ));
    let d = relay_one(&contact, &transport, &mut requests).await;
    let mail: EmailRequested = d.event().decode().unwrap();
    assert_eq!(mail.reply_to.as_deref(), Some("ana@xn--exmple-cua.de"));
    assert_eq!(mail.requester_email, "ana@xn--exmple-cua.de");
}

#[tokio::test]
async fn a_message_is_accepted_at_once_and_follows_its_mail() {
    let (_dir, contact) = service().await;
    let (transport, mut requests) = mail_probe().await;
    let (status, _, location, json) = call(&contact, post(GOOD, Some("application/json"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    let accepted: Accepted = serde_json::from_value(json).unwrap();
    assert_eq!(accepted.status, "queued");
    assert_eq!(location, format!("/contact/{}", accepted.id));

    // The outbox relay publishes the mail request.
    let d = relay_one(&contact, &transport, &mut requests).await;
    let mail: EmailRequested = d.event().decode().unwrap();
    assert_eq!(mail.about, accepted.id);
    assert_eq!(mail.reply_to.as_deref(), Some("ana@example.com"));
    assert_eq!(mail.to, "admissions@school.example");
    assert!(mail.body.contains("Can I visit on Friday?"));
    d.ack().await.unwrap();

    // The mail's outcome reaches the message, once however often delivered.
    let running = contact
        .routes()
        .into_iter()
        .fold(Router::new(transport.clone()), Router::route)
        .start()
        .await
        .unwrap();
    let bus = Bus::new(transport.clone(), "/school/mailer");
    let sent = EmailSent {
        mail_id: mail.mail_id.clone(),
        about: accepted.id.clone(),
        attempt: 2,
    };
    let ev = bus.event(&sent).unwrap();
    bus.publish(topics::MAIL_SENT, vec![ev.clone(), ev])
        .await
        .unwrap();
    let view = wait_for(&contact, &accepted.id, "sent").await;
    assert_eq!(
        view.timeline
            .iter()
            .map(|t| t.kind.as_str())
            .collect::<Vec<_>>(),
        vec!["received", "school.mail.email_sent.v1"],
        "a redelivered event changes nothing twice"
    );
    assert_eq!(view.timeline[1].attempt, 2);
    assert_eq!(view.timeline[1].service, "mailer");

    // A failure for another message id is ignored; ours marks it failed.
    let failed = EmailFailed {
        mail_id: mail.mail_id,
        purpose: MailPurpose::ContactMessage,
        about: accepted.id.clone(),
        requester_email: "ana@example.com".into(),
        subject: mail.subject,
        reason: "permanent error on attempt 1".into(),
        attempts: 1,
    };
    bus.emit(topics::MAIL_FAILURES, &failed).await.unwrap();
    let view = wait_for(&contact, &accepted.id, "failed").await;
    assert!(
        view.timeline[2]
            .detail
            .as_deref()
            .unwrap()
            .contains("permanent error")
    );
    running.shutdown().await.unwrap();
}

async fn wait_for(contact: &Contact, id: &str, status: &str) -> MessageView {
    school_testkit::eventually(
        &format!("message {id} {status}"),
        Duration::from_secs(5),
        || async { contact.view(id).await.unwrap().status == status },
    )
    .await;
    contact.view(id).await.unwrap()
}
