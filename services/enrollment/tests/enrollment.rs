//! The enrollment service over HTTP and events (SQLite in a temp dir, the
//! memory transport): validation, idempotency, tokenization, and the state
//! machine driven by the verdicts other services emit.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use eventos::{Bus, Router, StartFrom, Subscriber, Subscription};
use eventos_memory::MemoryTransport;
use eventos_outbox::{Relay, Store};
use futures::StreamExt as _;
use school_enrollment::{Accepted, Enrollment, EnrollmentView, FingerprintKey};
use school_events::{
    AcceptanceMode, EmailRequested, FraudCheckFailed, PaymentCaptured, PaymentDeclined,
    PaymentSubmitted, topics,
};
use school_http::{NotificationKey, holds_card_number};
use tower::ServiceExt as _;

static NOTIFICATIONS: std::sync::LazyLock<NotificationKey> =
    std::sync::LazyLock::new(NotificationKey::random);

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

async fn service(mode: AcceptanceMode) -> (tempfile::TempDir, Enrollment) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("enrollment.db"))
        .await
        .unwrap();
    let key = FingerprintKey::from_hex(KEY).unwrap();
    let enrollment = Enrollment::new(store, key, mode)
        .await
        .unwrap()
        .with_notifications_key(NOTIFICATIONS.clone());
    (dir, enrollment)
}

struct Reply {
    status: StatusCode,
    content_type: Option<String>,
    location: Option<String>,
    replayed: bool,
    json: serde_json::Value,
}

async fn call(service: &Enrollment, req: Request<Body>) -> Reply {
    let response = service.http().oneshot(req).await.unwrap();
    let header = |name: header::HeaderName| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let content_type = header(header::CONTENT_TYPE);
    let location = header(header::LOCATION);
    let replayed = response.headers().contains_key("idempotent-replayed");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    Reply {
        status,
        content_type,
        location,
        replayed,
        json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    }
}

fn post(body: impl Into<Body>, content_type: Option<&str>, key: Option<&str>) -> Request<Body> {
    let mut b = Request::post("/enrollments");
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(body.into()).unwrap()
}

fn body(card: &str) -> serde_json::Value {
    serde_json::json!({
        "student": {"name": "Ana Lima", "email": "ana@example.com"},
        "course_id": "rust-101",
        "payment": {
            "card_number": card,
            "expiry": "12/30",
            "cvv": "123",
            "holder": "Ana Lima",
            "amount_cents": 49900,
            "currency": "EUR"
        }
    })
}

fn with(mut v: serde_json::Value, pointer: &str, value: serde_json::Value) -> String {
    *v.pointer_mut(pointer).unwrap() = value;
    v.to_string()
}

fn without(mut v: serde_json::Value, parent: &str, field: &str) -> String {
    v.pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(field);
    v.to_string()
}

const CARD: &str = "4242 4242 4242 4242";

#[tokio::test]
async fn malformed_input_gets_its_documented_problem_and_never_a_500() {
    let (_dir, service) = service(AcceptanceMode::AwaitPayment).await;
    let good = body(CARD);
    let json = Some("application/json");
    let mut unknown = good.clone();
    unknown["payment"]["pin"] = serde_json::json!("1234");
    type Case<'a> = (
        &'a str,
        String,
        Option<&'a str>,
        StatusCode,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "bad json",
            "{\"student\":".into(),
            json,
            StatusCode::BAD_REQUEST,
            "malformed-json",
            None,
        ),
        (
            "not an object",
            "[1,2]".into(),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "wrong type: amount as string",
            with(good.clone(), "/payment/amount_cents", "499".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "wrong type: negative amount",
            with(good.clone(), "/payment/amount_cents", (-5).into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "wrong type: card as number",
            with(
                good.clone(),
                "/payment/card_number",
                4_242_424_242_424_242_u64.into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "wrong type: cvv as a number",
            with(good.clone(), "/payment/cvv", 987.into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "wrong type: cvv as a float",
            with(good.clone(), "/payment/cvv", serde_json::json!(987.5)),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "wrong type: a four-digit cvv as a negative number",
            with(good.clone(), "/payment/cvv", (-9870).into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "wrong type: card as a float",
            with(
                good.clone(),
                "/payment/card_number",
                serde_json::json!(4_242_424_242_424_242.0_f64),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "wrong type: a card with dots as the amount",
            with(
                good.clone(),
                "/payment/amount_cents",
                "4242.4242.4242.4242".into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "wrong type: a cvv as the amount",
            with(good.clone(), "/payment/amount_cents", "987".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "unknown field: CVV in upper case, nested in the student",
            with(
                good.clone(),
                "/student",
                serde_json::json!({"name": "Ana", "email": "ana@example.com", "CVV": 987}),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "card number in the name, with spaces",
            with(
                good.clone(),
                "/student/name",
                "Ana 4242 4242 4242 4242".into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/name"),
        ),
        (
            "card number in the name, with dots",
            with(good.clone(), "/student/name", "4242.4242.4242.4242".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/name"),
        ),
        (
            "card number in the name, with NBSP",
            with(
                good.clone(),
                "/student/name",
                "4242\u{a0}4242\u{a0}4242\u{a0}4242".into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/name"),
        ),
        (
            "card number in the holder, with slashes",
            with(
                good.clone(),
                "/payment/holder",
                "Ana 4242/4242/4242/4242".into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/holder"),
        ),
        (
            "card number in the holder, with tabs",
            with(
                good.clone(),
                "/payment/holder",
                "4242\t4242\t4242\t4242".into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/holder"),
        ),
        (
            "card number as the course id",
            with(good.clone(), "/course_id", "4242424242424242".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/course_id"),
        ),
        (
            "card number in the e-mail address",
            with(
                good.clone(),
                "/student/email",
                "4242424242424242@example.com".into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/email"),
        ),
        (
            "missing field: student",
            without(good.clone(), "", "student"),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "missing field: cvv",
            without(good.clone(), "/payment", "cvv"),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "unknown field",
            unknown.to_string(),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "bad luhn",
            with(
                good.clone(),
                "/payment/card_number",
                "4242 4242 4242 4241".into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/card_number"),
        ),
        (
            "not a card number",
            with(good.clone(), "/payment/card_number", "4242-abcd".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/card_number"),
        ),
        (
            "past expiry",
            with(good.clone(), "/payment/expiry", "01/20".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/expiry"),
        ),
        (
            "malformed expiry",
            with(good.clone(), "/payment/expiry", "2030-12".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/expiry"),
        ),
        (
            "bad cvv",
            with(good.clone(), "/payment/cvv", "12a".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/cvv"),
        ),
        (
            "zero amount",
            with(good.clone(), "/payment/amount_cents", 0.into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/amount_cents"),
        ),
        (
            "unknown currency",
            with(good.clone(), "/payment/currency", "EURO".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/currency"),
        ),
        (
            "amount above the maximum",
            with(good.clone(), "/payment/amount_cents", 100_000_001.into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/amount_cents"),
        ),
        (
            "amount of 2^63, which a database integer cannot hold",
            with(good.clone(), "/payment/amount_cents", (1_u64 << 63).into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/amount_cents"),
        ),
        (
            "amount of u64::MAX",
            with(good.clone(), "/payment/amount_cents", u64::MAX.into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/amount_cents"),
        ),
        (
            "amount beyond u64",
            with(
                good.clone(),
                "/payment/amount_cents",
                serde_json::from_str("18446744073709551616").unwrap(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            None,
        ),
        (
            "e-mail with a display name in angle brackets",
            with(
                good.clone(),
                "/student/email",
                "x<evil@attacker.example>".into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/email"),
        ),
        (
            "e-mail with a quoted local part",
            with(good.clone(), "/student/email", "\"a,b\"@example.com".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/email"),
        ),
        (
            "e-mail with a comment",
            with(
                good.clone(),
                "/student/email",
                "a(comment)@example.com".into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/email"),
        ),
        (
            "e-mail with a non-ASCII local part",
            with(good.clone(), "/student/email", "ü@exämple.de".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/email"),
        ),
        (
            "NUL in the name",
            with(good.clone(), "/student/name", "Ana\0Lima".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/name"),
        ),
        (
            "form feed in the holder",
            with(good.clone(), "/payment/holder", "Ana\u{c}Lima".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/holder"),
        ),
        (
            "NUL in the e-mail",
            with(good.clone(), "/student/email", "ana\0@example.com".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/email"),
        ),
        (
            "NUL in the card number",
            with(
                good.clone(),
                "/payment/card_number",
                "4242 4242 4242 4242\0".into(),
            ),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/card_number"),
        ),
        (
            "vertical tab in the course id",
            with(good.clone(), "/course_id", "rust-101\u{b}".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/course_id"),
        ),
        (
            "tab in the expiry",
            with(good.clone(), "/payment/expiry", "12/30\t".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/expiry"),
        ),
        (
            "lower-case currency",
            with(good.clone(), "/payment/currency", "eur".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/payment/currency"),
        ),
        (
            "bad e-mail",
            with(good.clone(), "/student/email", "ana-at-example.com".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/email"),
        ),
        (
            "empty name",
            with(good.clone(), "/student/name", " ".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/student/name"),
        ),
        (
            "bad course id",
            with(good.clone(), "/course_id", "rust 101!".into()),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some("/course_id"),
        ),
        (
            "wrong content type",
            good.to_string(),
            Some("text/plain"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            None,
        ),
        (
            "no content type",
            good.to_string(),
            None,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            None,
        ),
        (
            "oversize body",
            with(good.clone(), "/student/name", "x".repeat(70 * 1024).into()),
            json,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            None,
        ),
    ];
    for (name, body, ct, status, kind, pointer) in cases {
        let reply = call(&service, post(body, ct, None)).await;
        assert_eq!(reply.status, status, "{name}: {}", reply.json);
        assert_eq!(
            reply.content_type.as_deref(),
            Some("application/problem+json"),
            "{name}"
        );
        assert_eq!(
            reply.json["type"],
            format!("/problems/{kind}"),
            "{name}: {}",
            reply.json
        );
        let detail = reply.json["detail"].as_str().unwrap();
        assert!(!detail.is_empty(), "{name}");
        // No error echoes a card number (in any form) or a CVV.
        let text = reply.json.to_string();
        assert!(!holds_card_number(&text), "{name}: {text}");
        assert!(!text.contains("4242"), "{name}: {text}");
        assert!(!text.contains("987"), "{name}: {text}");
        if let Some(pointer) = pointer {
            let pointers: Vec<_> = reply.json["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["pointer"].as_str().unwrap())
                .collect();
            assert_eq!(pointers, vec![pointer], "{name}");
        }
    }
    let bad_key = call(&service, post(good.to_string(), json, Some("ключ"))).await;
    assert_eq!(bad_key.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_key.json["type"], "/problems/invalid-idempotency-key");
    let mut two_keys = post(good.to_string(), json, Some("k-1"));
    two_keys
        .headers_mut()
        .append("idempotency-key", "k-2".parse().unwrap());
    let two_keys = call(&service, two_keys).await;
    assert_eq!(
        two_keys.status,
        StatusCode::BAD_REQUEST,
        "{}",
        two_keys.json
    );
    assert_eq!(
        two_keys.content_type.as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(two_keys.json["type"], "/problems/duplicate-idempotency-key");

    // Ids that cannot be one are a 404 that does not echo them.
    let long = "a".repeat(10 * 1024);
    let unknown = "0190c3f4-6f1e-7a5b-9c2d-3e4f5a6b7c8d";
    let too_long = format!("{unknown}0");
    for id in ["nope", long.as_str(), too_long.as_str(), "%FF%FE", unknown] {
        for path in [
            format!("/enrollments/{id}"),
            format!("/enrollments/{id}/events"),
        ] {
            let missing = call(&service, Request::get(&path).body(Body::empty()).unwrap()).await;
            assert_eq!(missing.status, StatusCode::NOT_FOUND, "{path:.60}");
            assert_eq!(
                missing.content_type.as_deref(),
                Some("application/problem+json"),
                "{path:.60}"
            );
            assert_eq!(missing.json["type"], "/problems/not-found");
            let text = missing.json.to_string();
            assert!(!text.contains(id), "{id:.40}… echoed: {text:.200}");
        }
    }
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM enrollments")
        .fetch_one(service.store().pool())
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing invalid was stored");
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_enrollment_or_a_conflict() {
    let (_dir, service) = service(AcceptanceMode::AwaitPayment).await;
    let json = Some("application/json");
    let first = call(&service, post(body(CARD).to_string(), json, Some("k-1"))).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.json);
    assert!(!first.replayed);
    // The same values written differently are the same request.
    let pretty = serde_json::to_string_pretty(&body(CARD)).unwrap();
    let again = call(&service, post(pretty, json, Some("k-1"))).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert!(again.replayed);
    assert_eq!(again.json["id"], first.json["id"]);
    // Both answers hand out the student's notifications token.
    let token = first.json["notifications_token"].as_str().unwrap();
    assert!(NOTIFICATIONS.verify(&"ana@example.com".parse().unwrap(), token));
    assert_eq!(again.json["notifications_token"], token);
    assert_eq!(again.location, first.location);
    let other = with(body(CARD), "/payment/amount_cents", 100.into());
    let conflict = call(&service, post(other, json, Some("k-1"))).await;
    assert_eq!(conflict.status, StatusCode::CONFLICT, "{}", conflict.json);
    assert_eq!(conflict.json["type"], "/problems/idempotency-key-reused");
    // Without a key, every request is a new enrollment.
    let a = call(&service, post(body(CARD).to_string(), json, None)).await;
    let b = call(&service, post(body(CARD).to_string(), json, None)).await;
    assert_ne!(a.json["id"], b.json["id"]);
    // Concurrent requests with one key make one enrollment.
    let replies = futures::future::join_all(
        (0..8).map(|_| call(&service, post(body(CARD).to_string(), json, Some("k-race")))),
    )
    .await;
    let ids: std::collections::HashSet<_> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.json);
            r.json["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
}

async fn wait_for(service: &Enrollment, id: &str, status: &str) -> EnrollmentView {
    school_testkit::eventually(
        &format!("enrollment {id} {status}"),
        Duration::from_secs(10),
        || async { service.view(id).await.unwrap().status == status },
    )
    .await;
    service.view(id).await.unwrap()
}

/// Accepts one enrollment and returns it with the `PaymentSubmitted` the
/// relay published.
async fn accept(
    service: &Enrollment,
    transport: &Arc<MemoryTransport>,
    card: &str,
) -> (Accepted, PaymentSubmitted) {
    let mut submitted = transport
        .subscribe(Subscription::new(topics::PAYMENT_SUBMITTED, "probe").start(StartFrom::Earliest))
        .await
        .unwrap();
    let reply = call(
        service,
        post(body(card).to_string(), Some("application/json"), None),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.json);
    let accepted: Accepted = serde_json::from_value(reply.json).unwrap();
    assert_eq!(
        reply.location,
        Some(format!("/enrollments/{}", accepted.id))
    );
    Relay::new(service.store().clone(), transport.clone())
        .relay_once()
        .await
        .unwrap();
    loop {
        let d = tokio::time::timeout(Duration::from_secs(5), submitted.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let event: PaymentSubmitted = d.event().decode().unwrap();
        d.ack().await.unwrap();
        if event.enrollment_id == accepted.id {
            return (accepted, event);
        }
    }
}

/// Subscribes to the mail requests before anything is relayed.
async fn mail_probe(transport: &Arc<MemoryTransport>) -> eventos::core::DeliveryStream {
    transport
        .subscribe(
            Subscription::new(topics::MAIL_REQUESTS, "mail-probe").start(StartFrom::Earliest),
        )
        .await
        .unwrap()
}

async fn mails(
    mut sub: eventos::core::DeliveryStream,
    transport: &Arc<MemoryTransport>,
    service: &Enrollment,
) -> Vec<EmailRequested> {
    Relay::new(service.store().clone(), transport.clone())
        .relay_once()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        out.push(d.event().decode().unwrap());
        d.ack().await.unwrap();
    }
    out
}

#[tokio::test]
async fn the_card_is_tokenized_and_a_capture_activates_once() {
    let (dir, service) = service(AcceptanceMode::AwaitPayment).await;
    let transport = Arc::new(MemoryTransport::new());
    let probe = mail_probe(&transport).await;
    let (accepted, submitted) = accept(&service, &transport, CARD).await;
    assert_eq!(accepted.status, "payment_processing");
    let card = &submitted.payment.card;
    assert_eq!((card.bin.as_str(), card.last4.as_str()), ("424242", "4242"));
    assert_eq!(card.fingerprint.len(), 64);
    assert_eq!(submitted.mode, AcceptanceMode::AwaitPayment);

    let running = service
        .routes()
        .into_iter()
        .fold(Router::new(transport.clone()), Router::route)
        .start()
        .await
        .unwrap();
    let bus = Bus::new(transport.clone(), "/school/billing");
    let captured = bus
        .event(&PaymentCaptured {
            enrollment_id: accepted.id.clone(),
            charge_id: "ch_1".into(),
            amount_cents: 49900,
            currency: "EUR".into(),
            attempt: 3,
        })
        .unwrap();
    // Delivered twice: applied once.
    bus.publish(topics::PAYMENT_CAPTURED, vec![captured.clone(), captured])
        .await
        .unwrap();
    let view = wait_for(&service, &accepted.id, "active").await;
    assert_eq!(view.payment.status, "captured");
    assert_eq!(view.reason, None, "an activation has no reason");
    assert_eq!(view.payment.card_last4, "4242");
    let kinds: Vec<_> = view.timeline.iter().map(|t| t.kind.as_str()).collect();
    assert_eq!(
        kinds,
        vec![
            "school.enrollment.payment_submitted.v1",
            "school.billing.payment_captured.v1",
            "school.enrollment.enrollment_activated.v1",
            "school.mail.email_requested.v1",
        ]
    );
    let capture = &view.timeline[1];
    assert_eq!((capture.service.as_str(), capture.attempt), ("billing", 3));
    // A late decline cannot undo a final state.
    let declined = bus
        .event(&PaymentDeclined {
            enrollment_id: accepted.id.clone(),
            code: "card_declined".into(),
            reason: "declined".into(),
            amount_cents: 49900,
            currency: "EUR".into(),
            attempt: 1,
        })
        .unwrap();
    let declined_id = declined.id().to_owned();
    bus.publish(topics::PAYMENT_DECLINED, vec![declined])
        .await
        .unwrap();
    // Handled (its id is in the inbox), and the enrollment is still active.
    school_testkit::eventually(
        "the late decline handled",
        Duration::from_secs(10),
        || async {
            let handled: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM eventos_inbox WHERE event_id = ?")
                    .bind(&declined_id)
                    .fetch_one(service.store().pool())
                    .await
                    .unwrap();
            handled > 0
        },
    )
    .await;
    assert_eq!(service.view(&accepted.id).await.unwrap().status, "active");
    running.shutdown().await.unwrap();

    let welcome = mails(probe, &transport, &service).await;
    assert_eq!(welcome.len(), 1, "{welcome:?}");
    assert_eq!(welcome[0].mail_id, format!("welcome-{}", accepted.id));
    assert_eq!(welcome[0].to, "ana@example.com");

    // The card number is nowhere in the database files.
    service.store().close().await;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("4242424242424242") && !text.contains("4242 4242 4242 4242"));
    }
}

#[tokio::test]
async fn optimistic_mode_enrolls_at_once_and_suspends_on_a_fraud_verdict() {
    let (_dir, service) = service(AcceptanceMode::Optimistic).await;
    let transport = Arc::new(MemoryTransport::new());
    let probe = mail_probe(&transport).await;
    let (accepted, submitted) = accept(&service, &transport, "4100 0000 0000 0019").await;
    assert_eq!(accepted.status, "active");
    assert_eq!(submitted.mode, AcceptanceMode::Optimistic);
    let running = service
        .routes()
        .into_iter()
        .fold(Router::new(transport.clone()), Router::route)
        .start()
        .await
        .unwrap();
    let bus = Bus::new(transport.clone(), "/school/antifraud");
    let failed = bus
        .event(&FraudCheckFailed {
            enrollment_id: accepted.id.clone(),
            score: 100,
            reasons: vec!["card BIN 410000 is on the deny list".into()],
            mode: AcceptanceMode::Optimistic,
        })
        .unwrap();
    bus.publish(topics::FRAUD_FAILED, vec![failed])
        .await
        .unwrap();
    let view = wait_for(&service, &accepted.id, "suspended").await;
    // Regression: the reason quoted the anti-fraud rule that fired.
    assert_eq!(
        view.reason.as_deref(),
        Some("the payment did not pass our fraud checks")
    );
    let text = serde_json::to_string(&view).unwrap();
    assert!(
        !text.contains("deny list") && !text.contains("410000"),
        "{text}"
    );
    running.shutdown().await.unwrap();
    let sent: Vec<_> = mails(probe, &transport, &service)
        .await
        .into_iter()
        .map(|m| m.mail_id)
        .collect();
    assert_eq!(
        sent,
        vec![
            format!("welcome-{}", accepted.id),
            format!("suspended-{}", accepted.id)
        ]
    );
}
