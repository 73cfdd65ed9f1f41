//! Enrollment: a student asks to join a course and pays; the school answers
//! at once and follows the payment behind the scenes.
//!
//! `POST /enrollments` validates the request, tokenizes the card, stores the
//! enrollment and enqueues [`PaymentSubmitted`] in **one transaction** (the
//! outbox), and answers `202 Accepted` with a `Location`. Anti-fraud and
//! billing take it from there; their verdicts come back as events and move
//! the enrollment along, each applied once (the inbox) together with the
//! events and mail it causes. `GET /enrollments/{id}` shows the status and
//! the timeline of every event that touched it;
//! `GET /enrollments/{id}/events` streams the changes (server-sent events).
//!
//! # The decisions that shaped it
//!
//! * **The card stops here.** The number and CVV are checked (Luhn, expiry,
//!   CVV form) and reduced to a [`CardToken`](school_events::CardToken):
//!   BIN, last four, and an HMAC fingerprint under a key from the config or
//!   generated on first run. Neither is stored, logged, put in an event or
//!   echoed in an error (a parse error quotes no value). A card number typed
//!   into any other field (a name, the holder, the course id) is refused.
//! * **Two ways to answer, chosen by the school** ([`AcceptanceMode`]):
//!   `await_payment` (the default) says "your payment is being processed"
//!   and activates only after the fraud check passed and the charge was
//!   captured; `optimistic` enrolls at once and suspends the enrollment if
//!   the fraud check or the charge fails later. Either way the student is
//!   e-mailed about the outcome.
//! * **`Idempotency-Key` makes retries safe.** The same key with the same
//!   body gives back the same enrollment (with `Idempotent-Replayed: true`);
//!   the same key with another body is a 409. The body is remembered only
//!   as a keyed digest.
//! * **Transitions are a table, not scattered ifs** ([`transition`]): each
//!   verdict event moves a status to the next one or leaves it alone, so a
//!   late or repeated event cannot undo a final state.
//!
//! The service names no transport: it takes a `Store` and gives back an HTTP
//! router and event routes; the binary wires them.

mod card;
mod currency;

use std::convert::Infallible;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::routing::{get, post};
use eventos::{Context, HandlerError, Message, ResultExt as _, Route, TypedEvent, typed_with};
use eventos_outbox::rusqlite::{self, Connection, OptionalExtension as _, params};
use eventos_outbox::{OutboxError, Store, enqueue};
use futures::{Stream, StreamExt as _};
use school_events::{
    AcceptanceMode, EmailDeferred, EmailFailed, EmailRequested, EmailSent, EnrollmentActivated,
    EnrollmentRejected, FraudCheckFailed, FraudCheckPassed, MailPurpose, PaymentCaptured,
    PaymentDeclined, PaymentDetails, PaymentRefunded, PaymentSubmitted, Student, topics,
};
pub use school_http::TimelineEntry;
use school_http::{
    CONTROL_DETAIL, ClientIp, EmailAddress, FieldError, MAX_BODY_BYTES, NotificationKey, PathId,
    Problem, SseStreams, StrictJson, has_control, holds_card_number, now_ms, rfc3339_ms,
};
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

/// Why an enrollment is refused after a failed fraud check, as the student
/// reads it.
const FRAUD_REFUSED: &str = "the payment did not pass our fraud checks";

/// The detail of a field error for a card number in a text field. It does
/// not repeat the number.
const CARD_IN_TEXT_DETAIL: &str =
    "remove the card number from this field; give it only in /payment/card_number";

pub use card::{FingerprintKey, KeyError, luhn};
pub use currency::is_iso_4217;

/// The migrations of the enrollment database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The CloudEvents `source` of events this service emits.
pub const SOURCE: &str = "/school/enrollment";

/// The consumer group of this service.
pub const GROUP: &str = "enrollment";

/// The largest amount one enrollment may charge, in the currency's minor
/// units: 1 000 000.00 in a two-decimal currency. Far above any course fee,
/// and far below where sums of amounts could overflow a 64-bit counter
/// downstream (metrics, the ledger). Larger amounts are a 422.
pub const MAX_AMOUNT_CENTS: u64 = 100_000_000;

/// Settings of the enrollment service (the `[enrollment]` section of the
/// config file).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// How requests are answered.
    pub mode: AcceptanceMode,
    /// The card fingerprint key, 64 hex digits. Without one, a key is
    /// generated on first run and kept in the data directory.
    pub card_fingerprint_key: Option<String>,
}

/// The body of `POST /enrollments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEnrollment {
    /// Who enrolls.
    pub student: NewStudent,
    /// In which course.
    pub course_id: String,
    /// How they pay.
    pub payment: NewPayment,
}

/// The student part of the request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewStudent {
    /// Full name.
    pub name: String,
    /// E-mail address.
    pub email: String,
}

/// The payment part of the request. It holds the card: it lives only for
/// the request and is dropped once tokenized.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPayment {
    /// The card number (spaces and dashes allowed).
    pub card_number: String,
    /// `MM/YY` or `MM/YYYY`.
    pub expiry: String,
    /// Three or four digits.
    pub cvv: String,
    /// The name on the card.
    pub holder: String,
    /// Amount in the currency's minor unit, 1 to [`MAX_AMOUNT_CENTS`].
    pub amount_cents: u64,
    /// ISO 4217 code, e.g. `EUR`.
    pub currency: String,
}

impl std::fmt::Debug for NewPayment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewPayment")
            .field("holder", &self.holder)
            .field("amount_cents", &self.amount_cents)
            .field("currency", &self.currency)
            .finish_non_exhaustive()
    }
}

/// The answer to `POST /enrollments`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Accepted {
    /// The enrollment's id.
    pub id: String,
    /// `payment_processing` (await_payment) or `active` (optimistic), or the
    /// current status when an idempotent request is replayed.
    pub status: String,
    /// What to tell the student.
    pub message: String,
    /// What reads the student's notifications
    /// (`GET /notifications?email=…&token=…`).
    pub notifications_token: String,
}

/// The payment as `GET /enrollments/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PaymentView {
    /// Minor units.
    pub amount_cents: u64,
    /// ISO 4217.
    pub currency: String,
    /// Card brand.
    pub card_brand: String,
    /// The last four digits.
    pub card_last4: String,
    /// `pending`, `captured`, `declined`, `refunded`.
    pub status: String,
}

/// The answer to `GET /enrollments/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollmentView {
    /// The id.
    pub id: String,
    /// `payment_processing`, `active`, `rejected`, `payment_failed` or
    /// `suspended`.
    pub status: String,
    /// How it was accepted.
    pub mode: AcceptanceMode,
    /// The course.
    pub course_id: String,
    /// The student.
    pub student: Student,
    /// The payment.
    pub payment: PaymentView,
    /// Why it was rejected or suspended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// What happened, oldest first.
    pub timeline: Vec<TimelineEntry>,
}

/// A change streamed by `GET /enrollments/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Change {
    /// The enrollment.
    pub id: String,
    /// Its status after the change.
    pub status: String,
    /// What happened.
    pub entry: TimelineEntry,
}

/// What a verdict does to an enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The fraud check passed.
    FraudPassed,
    /// The fraud check failed.
    FraudFailed,
    /// The charge was captured.
    Captured,
    /// The charge was declined.
    Declined,
    /// A capture was refunded.
    Refunded,
}

/// The status an enrollment moves to, if any: the whole state machine.
///
/// `await_payment`: `payment_processing` → `active` on capture, `rejected`
/// on a failed fraud check, `payment_failed` on a decline. `optimistic`:
/// `active` → `suspended` on a failed fraud check or a decline. Anything
/// else (a pass, a refund, a verdict after a final state) changes no status.
pub fn transition(mode: AcceptanceMode, status: &str, verdict: Verdict) -> Option<&'static str> {
    match (mode, status, verdict) {
        (AcceptanceMode::AwaitPayment, "payment_processing", Verdict::Captured) => Some("active"),
        (AcceptanceMode::AwaitPayment, "payment_processing", Verdict::FraudFailed) => {
            Some("rejected")
        }
        (AcceptanceMode::AwaitPayment, "payment_processing", Verdict::Declined) => {
            Some("payment_failed")
        }
        (AcceptanceMode::Optimistic, "active", Verdict::FraudFailed | Verdict::Declined) => {
            Some("suspended")
        }
        _ => None,
    }
}

/// The enrollment service.
#[derive(Debug, Clone)]
pub struct Enrollment {
    store: Store,
    key: FingerprintKey,
    notifications: NotificationKey,
    mode: AcceptanceMode,
    live: broadcast::Sender<Change>,
    sse: SseStreams,
}

fn unavailable(e: &dyn std::fmt::Display) -> Problem {
    tracing::error!(error = %e, "enrollment database unavailable");
    Problem::unavailable(
        "the enrollment could not be stored right now; nothing was accepted or charged, try again in a moment",
    )
}

fn mode_name(mode: AcceptanceMode) -> &'static str {
    match mode {
        AcceptanceMode::AwaitPayment => "await_payment",
        AcceptanceMode::Optimistic => "optimistic",
    }
}

fn parse_mode(s: &str) -> AcceptanceMode {
    if s == "optimistic" {
        AcceptanceMode::Optimistic
    } else {
        AcceptanceMode::AwaitPayment
    }
}

fn message_for(status: &str) -> &'static str {
    match status {
        "payment_processing" => "your payment is being processed; we will e-mail you the outcome",
        "active" => "you are enrolled; we will e-mail you the details",
        "rejected" => "the payment was refused by our fraud checks",
        "payment_failed" => "the payment could not be taken",
        "suspended" => "the enrollment is suspended: the payment could not be confirmed",
        _ => "",
    }
}

#[derive(Clone)]
struct Checked {
    student: Student,
    course_id: String,
    payment: PaymentDetails,
}

fn validate(req: &NewEnrollment, key: &FingerprintKey) -> Result<Checked, Problem> {
    let mut errors = Vec::new();
    let mut fail = |pointer: &str, detail: &str| {
        // One error per field: the first thing wrong with it.
        if !errors.iter().any(|e: &FieldError| e.pointer == pointer) {
            errors.push(FieldError {
                pointer: pointer.into(),
                detail: detail.into(),
            });
        }
    };
    let p = &req.payment;
    for (pointer, text) in [
        ("/student/name", &req.student.name),
        ("/student/email", &req.student.email),
        ("/course_id", &req.course_id),
        ("/payment/card_number", &p.card_number),
        ("/payment/expiry", &p.expiry),
        ("/payment/cvv", &p.cvv),
        ("/payment/holder", &p.holder),
        ("/payment/currency", &p.currency),
    ] {
        if has_control(text, false) {
            fail(pointer, CONTROL_DETAIL);
        }
    }
    // A card number typed into a text field would be stored, logged,
    // published and mailed with it; the card goes in its own field only.
    for (pointer, text) in [
        ("/student/name", &req.student.name),
        ("/student/email", &req.student.email),
        ("/course_id", &req.course_id),
        ("/payment/expiry", &p.expiry),
        ("/payment/holder", &p.holder),
        ("/payment/currency", &p.currency),
    ] {
        if holds_card_number(text) {
            fail(pointer, CARD_IN_TEXT_DETAIL);
        }
    }
    let len = |s: &str| s.trim().chars().count();
    if !(1..=200).contains(&len(&req.student.name)) {
        fail("/student/name", "give a name of 1 to 200 characters");
    }
    let email = EmailAddress::parse(req.student.email.trim());
    if let Err(e) = &email {
        fail("/student/email", &e.to_string());
    }
    let course = req.course_id.trim();
    if course.is_empty()
        || course.len() > 64
        || !course
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        fail(
            "/course_id",
            "give a course id of 1 to 64 letters, digits, '-' or '_', like rust-101",
        );
    }
    let digits = match card::digits(&p.card_number) {
        Some(d) if card::luhn(&d) => Some(d),
        Some(_) => {
            fail(
                "/payment/card_number",
                "the card number fails its check digit (Luhn); check for a typo",
            );
            None
        }
        None => {
            fail(
                "/payment/card_number",
                "give the card number as 12 to 19 digits (spaces or dashes allowed)",
            );
            None
        }
    };
    let expiry = match card::expiry(&p.expiry) {
        Some((m, y)) if card::expired(m, y, chrono::Utc::now()) => {
            fail(
                "/payment/expiry",
                "the card has expired; use a card valid this month or later",
            );
            None
        }
        Some(e) => Some(e),
        None => {
            fail("/payment/expiry", "give the expiry as MM/YY, like 12/30");
            None
        }
    };
    if !card::cvv_ok(&p.cvv) {
        fail("/payment/cvv", "give the 3 or 4 digits on the card");
    }
    if !(1..=200).contains(&len(&p.holder)) {
        fail("/payment/holder", "give the name on the card");
    }
    if !(1..=MAX_AMOUNT_CENTS).contains(&p.amount_cents) {
        fail(
            "/payment/amount_cents",
            &format!(
                "give an amount of 1 to {MAX_AMOUNT_CENTS} minor units (cents), like 49900 for 499.00"
            ),
        );
    }
    if !currency::is_iso_4217(&p.currency) {
        fail(
            "/payment/currency",
            "give an ISO 4217 currency code in capitals, like EUR or USD",
        );
    }
    match (errors.is_empty(), digits, expiry, email) {
        (true, Some(digits), Some((month, year)), Ok(email)) => Ok(Checked {
            student: Student {
                name: req.student.name.trim().to_owned(),
                email: email.to_string(),
            },
            course_id: course.to_owned(),
            payment: PaymentDetails {
                amount_cents: p.amount_cents,
                currency: p.currency.clone(),
                holder: p.holder.trim().to_owned(),
                card: card::tokenize(key, &digits, month, year),
            },
        }),
        _ => Err(Problem::validation(errors)),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    // Which of two keys was meant is a guess, and a wrong guess replays
    // another request's enrollment or makes a second one.
    if values.next().is_some() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "duplicate-idempotency-key",
            "Duplicate Idempotency-Key",
            "send the Idempotency-Key header once, with one key",
        ));
    }
    match value.to_str() {
        Ok(k) if (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(k.to_owned()))
        }
        _ => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            "the Idempotency-Key header must be 1 to 255 visible ASCII characters, e.g. a UUID",
        )),
    }
}

fn key_conflict() -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        "this Idempotency-Key was already used with a different request; use a new key for a new enrollment",
    )
}

/// Why a change could not be committed (it was not, as a whole).
#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Database(#[from] rusqlite::Error),
    #[error("cannot encode an event: {0}")]
    Event(#[from] eventos::EventError),
}

fn is_unique_violation(e: &StoreError) -> bool {
    // The extended codes sqlx counted as a unique violation.
    matches!(
        e,
        StoreError::Database(rusqlite::Error::SqliteFailure(d, _))
            | StoreError::Outbox(OutboxError::Sqlite(rusqlite::Error::SqliteFailure(d, _)))
            if d.code == rusqlite::ErrorCode::ConstraintViolation
                && matches!(
                    d.extended_code,
                    rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                        | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                )
    )
}

fn add_entry(
    tx: &Connection,
    enrollment_id: &str,
    entry: &TimelineEntry,
    at_ms: i64,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "INSERT INTO enrollment_timeline (enrollment_id, at_ms, event_type, service, attempt, detail) VALUES (?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![
        enrollment_id,
        at_ms,
        entry.kind,
        entry.service,
        entry.attempt,
        entry.detail
    ])?;
    Ok(())
}

fn own_entry(kind: &str, detail: Option<String>, at_ms: i64) -> TimelineEntry {
    TimelineEntry {
        kind: kind.to_owned(),
        time: rfc3339_ms(at_ms),
        service: "enrollment".into(),
        attempt: 1,
        detail,
    }
}

/// Whether `mail_id` is one of this service's mails to the student about
/// enrollment `about` ([`notice`]'s slugs). Most mail is about other
/// things (contact messages): telling them apart by name costs no read and
/// no write.
fn is_enrollment_mail(mail_id: &str, about: &str) -> bool {
    mail_id
        .strip_suffix(about)
        .and_then(|slug| slug.strip_suffix('-'))
        .is_some_and(|slug| NOTICE_SLUGS.contains(&slug))
}

/// The first part of the id of every mail [`notice`] writes.
const NOTICE_SLUGS: [&str; 4] = ["welcome", "rejected", "payment-failed", "suspended"];

/// What a mail to the student says, per status reached.
fn notice(status: &str, course: &str, reason: Option<&str>) -> (&'static str, String, String) {
    let why = reason
        .map(|r| format!("\n\nReason: {r}"))
        .unwrap_or_default();
    match status {
        "active" => (
            "welcome",
            format!("Welcome to {course}"),
            format!("You are enrolled in {course}. See you in class!"),
        ),
        "rejected" => (
            "rejected",
            format!("Your enrollment in {course} was not accepted"),
            format!(
                "We could not accept your enrollment in {course}: the payment did not pass our checks. No money was taken.{why}"
            ),
        ),
        "payment_failed" => (
            "payment-failed",
            format!("Your payment for {course} did not go through"),
            format!(
                "We could not take the payment for {course}, so you are not enrolled yet. Please try again with another card.{why}"
            ),
        ),
        _ => (
            "suspended",
            format!("Your enrollment in {course} is suspended"),
            format!(
                "Your enrollment in {course} is suspended because the payment could not be confirmed. Any money taken is refunded.{why}"
            ),
        ),
    }
}

struct Row {
    status: String,
    mode: AcceptanceMode,
    course_id: String,
    student_name: String,
    student_email: String,
    created_ms: i64,
}

impl Enrollment {
    /// The service on `store` (its migrations are run), fingerprinting cards
    /// with `key`.
    ///
    /// # Errors
    ///
    /// If the migrations fail.
    pub async fn new(
        store: Store,
        key: FingerprintKey,
        mode: AcceptanceMode,
    ) -> Result<Self, OutboxError> {
        store.migrate(&MIGRATOR).await?;
        let (live, _) = broadcast::channel(1024);
        Ok(Self {
            store,
            key,
            notifications: NotificationKey::random(),
            mode,
            live,
            sse: SseStreams::default(),
        })
    }

    /// The same service, its event streams counted and bounded by `sse`
    /// (shared with the process's other streaming endpoints).
    #[must_use]
    pub fn with_sse(self, sse: SseStreams) -> Self {
        Self { sse, ..self }
    }

    /// Issues notifications tokens under `key`, the key the notifier checks
    /// them with (without it, a random key of this instance's own).
    #[must_use]
    pub fn with_notifications_key(mut self, key: NotificationKey) -> Self {
        self.notifications = key;
        self
    }

    /// The service's database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// `POST /enrollments`, `GET /enrollments/{id}`, `GET /enrollments/{id}/events`.
    pub fn http(&self) -> axum::Router {
        axum::Router::new()
            .route("/enrollments", post(submit))
            .route("/enrollments/{id}", get(show))
            .route("/enrollments/{id}/events", get(stream))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.clone())
    }

    /// The event routes: every verdict and every mail about an enrollment.
    pub fn routes(&self) -> Vec<Route> {
        fn route<T: TypedEvent>(
            this: &Enrollment,
            topic: &str,
            f: fn(&T) -> Option<(String, Effect)>,
        ) -> Route {
            let this = this.clone();
            Route::new(
                topic,
                GROUP,
                typed_with(this, move |this, e: T, msg: Message| async move {
                    match f(&e) {
                        Some((id, what)) => this.apply(&msg, &id, what).await,
                        None => Ok(()),
                    }
                }),
            )
            // One short write each: overlapping deliveries share the
            // store's rounds, and its syncs.
            .concurrency(256)
        }
        vec![
            route(self, topics::FRAUD_PASSED, |e: &FraudCheckPassed| {
                Some((
                    e.enrollment_id.clone(),
                    Effect::Verdict(Verdict::FraudPassed, 1, Some(format!("score {}", e.score))),
                ))
            }),
            route(self, topics::FRAUD_FAILED, |e: &FraudCheckFailed| {
                // The rules that fired are the school's to read, not the
                // student's (nor a fraudster's): they go to the log; the
                // timeline, the reason and the mail get a plain sentence.
                tracing::info!(enrollment = %e.enrollment_id, score = e.score, reasons = %e.reasons.join("; "), "fraud check failed");
                Some((
                    e.enrollment_id.clone(),
                    Effect::Verdict(Verdict::FraudFailed, 1, Some(FRAUD_REFUSED.to_owned())),
                ))
            }),
            route(self, topics::PAYMENT_CAPTURED, |e: &PaymentCaptured| {
                Some((
                    e.enrollment_id.clone(),
                    Effect::Verdict(
                        Verdict::Captured,
                        e.attempt,
                        Some(format!("charge {}", e.charge_id)),
                    ),
                ))
            }),
            route(self, topics::PAYMENT_DECLINED, |e: &PaymentDeclined| {
                Some((
                    e.enrollment_id.clone(),
                    Effect::Verdict(
                        Verdict::Declined,
                        e.attempt,
                        Some(format!("{}: {}", e.code, e.reason)),
                    ),
                ))
            }),
            route(self, topics::PAYMENT_REFUNDED, |e: &PaymentRefunded| {
                // The reason of a refund is the fraud rule that fired, or
                // another of the school's own: for the log.
                tracing::info!(enrollment = %e.enrollment_id, charge = %e.charge_id, reason = %e.reason, "payment refunded");
                Some((
                    e.enrollment_id.clone(),
                    Effect::Verdict(
                        Verdict::Refunded,
                        1,
                        Some(format!("charge {} refunded", e.charge_id)),
                    ),
                ))
            }),
            route(self, topics::MAIL_SENT, |e: &EmailSent| {
                if !is_enrollment_mail(&e.mail_id, &e.about) {
                    return None;
                }
                Some((
                    e.about.clone(),
                    Effect::Mail(e.attempt, Some(e.mail_id.clone())),
                ))
            }),
            route(self, topics::MAIL_DEFERRED, |e: &EmailDeferred| {
                if !is_enrollment_mail(&e.mail_id, &e.about) {
                    return None;
                }
                Some((
                    e.about.clone(),
                    Effect::Mail(
                        e.attempt,
                        Some(format!(
                            "{}: {}; retrying within {} ms",
                            e.mail_id, e.error, e.retry_within_ms
                        )),
                    ),
                ))
            }),
            route(self, topics::MAIL_FAILURES, |e: &EmailFailed| {
                if !is_enrollment_mail(&e.mail_id, &e.about) {
                    return None;
                }
                Some((
                    e.about.clone(),
                    Effect::Mail(
                        e.attempts,
                        Some(format!(
                            "{}: {} after {} attempts",
                            e.mail_id, e.reason, e.attempts
                        )),
                    ),
                ))
            }),
        ]
    }

    async fn accept(
        &self,
        req: NewEnrollment,
        key: Option<String>,
    ) -> Result<(Accepted, bool), Problem> {
        let checked = validate(&req, &self.key)?;
        let token = EmailAddress::parse(&checked.student.email)
            .map(|a| self.notifications.token(&a))
            .unwrap_or_default();
        let with_token = |(accepted, replayed): (Accepted, bool)| {
            (
                Accepted {
                    notifications_token: token.clone(),
                    ..accepted
                },
                replayed,
            )
        };
        self.accept_checked(req, key, checked).await.map(with_token)
    }

    async fn accept_checked(
        &self,
        req: NewEnrollment,
        key: Option<String>,
        checked: Checked,
    ) -> Result<(Accepted, bool), Problem> {
        // The digest covers the request as parsed, so formatting of the
        // JSON does not matter, only its values.
        let digest = key.as_ref().map(|_| {
            self.key
                .digest(&serde_json::to_vec(&req).unwrap_or_default())
        });
        drop(req);
        if let (Some(key), Some(digest)) = (&key, &digest)
            && let Some(replayed) = self.replay(key, digest).await?
        {
            return Ok((replayed, true));
        }
        match self
            .insert(checked, key.as_deref().zip(digest.as_deref()))
            .await
        {
            Ok(accepted) => Ok((accepted, false)),
            // Two requests with one key raced; the other one won.
            Err(e) if is_unique_violation(&e) => match (&key, &digest) {
                (Some(key), Some(digest)) => match self.replay(key, digest).await? {
                    Some(replayed) => Ok((replayed, true)),
                    None => Err(unavailable(&e)),
                },
                _ => Err(unavailable(&e)),
            },
            Err(e) => Err(unavailable(&e)),
        }
    }

    async fn replay(&self, key: &str, digest: &str) -> Result<Option<Accepted>, Problem> {
        let row = sqlx::query(
            "SELECT k.request_digest, e.id, e.status FROM enrollment_idempotency k JOIN enrollments e ON e.id = k.enrollment_id WHERE k.idempotency_key = ?",
        )
        .bind(key)
        .fetch_optional(self.store.pool())
        .await
        .map_err(|e| unavailable(&e))?;
        let Some(row) = row else { return Ok(None) };
        if row.get::<String, _>("request_digest") != digest {
            return Err(key_conflict());
        }
        let status: String = row.get("status");
        Ok(Some(Accepted {
            id: row.get("id"),
            message: message_for(&status).into(),
            status,
            notifications_token: String::new(),
        }))
    }

    async fn insert(
        &self,
        c: Checked,
        idempotency: Option<(&str, &str)>,
    ) -> Result<Accepted, StoreError> {
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let status = match self.mode {
            AcceptanceMode::AwaitPayment => "payment_processing",
            AcceptanceMode::Optimistic => "active",
        };
        let submitted = PaymentSubmitted {
            enrollment_id: id.clone(),
            student: c.student.clone(),
            course_id: c.course_id.clone(),
            payment: c.payment.clone(),
            mode: self.mode,
            submitted_at_ms: now,
        };
        let event = Context::new_event(SOURCE, &submitted)?;
        let mode = self.mode;
        let idempotency = idempotency.map(|(key, digest)| (key.to_owned(), digest.to_owned()));
        let (row_id, checked) = (id.clone(), c.clone());
        self.store
            .write(move |tx: &Connection| {
                let (id, c) = (row_id, checked);
                tx.prepare_cached(
                    "INSERT INTO enrollments (id, student_name, student_email, course_id, amount_cents, currency, card_brand, card_last4, mode, status, payment_status, created_ms, updated_ms)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                )?
                .execute(params![
                    id,
                    c.student.name,
                    c.student.email,
                    c.course_id,
                    // At most MAX_AMOUNT_CENTS, so it fits.
                    i64::try_from(c.payment.amount_cents).unwrap_or(i64::MAX),
                    c.payment.currency,
                    c.payment.card.brand,
                    c.payment.card.last4,
                    mode_name(mode),
                    status,
                    now,
                    now
                ])?;
                if let Some((key, digest)) = idempotency {
                    tx.prepare_cached(
                        "INSERT INTO enrollment_idempotency (idempotency_key, request_digest, enrollment_id, created_ms) VALUES (?, ?, ?, ?)",
                    )?
                    .execute(params![key, digest, id, now])?;
                }
                enqueue(tx, topics::PAYMENT_SUBMITTED, &event)?;
                let detail = format!(
                    "{} {} on {} •••• {}",
                    c.payment.amount_cents, c.payment.currency, c.payment.card.brand, c.payment.card.last4
                );
                add_entry(
                    tx,
                    &id,
                    &own_entry(PaymentSubmitted::TYPE, Some(detail), now),
                    now,
                )?;
                if mode == AcceptanceMode::Optimistic {
                    let row = Row {
                        status: status.into(),
                        mode,
                        course_id: c.course_id.clone(),
                        student_name: c.student.name.clone(),
                        student_email: c.student.email.clone(),
                        created_ms: now,
                    };
                    Self::announce(tx, &id, &row, "active", None, now)?;
                }
                Ok::<_, StoreError>(())
            })
            .await?;
        tracing::info!(enrollment = %id, course = %c.course_id, last4 = %c.payment.card.last4, status, "enrollment accepted");
        Ok(Accepted {
            id,
            status: status.into(),
            message: message_for(status).into(),
            notifications_token: String::new(),
        })
    }

    /// Enqueues what reaching `status` causes: the lifecycle event and the
    /// student's mail, with their timeline entries.
    fn announce(
        tx: &Connection,
        id: &str,
        row: &Row,
        status: &str,
        reason: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        if status == "active" {
            let activated = EnrollmentActivated {
                enrollment_id: id.to_owned(),
                course_id: row.course_id.clone(),
                mode: row.mode,
                submitted_at_ms: row.created_ms,
                activated_at_ms: now,
            };
            let event = Context::new_event(SOURCE, &activated)?;
            enqueue(tx, topics::ENROLLMENT_ACTIVATED, &event)?;
            add_entry(
                tx,
                id,
                &own_entry(EnrollmentActivated::TYPE, None, now),
                now,
            )?;
        } else {
            let rejected = EnrollmentRejected {
                enrollment_id: id.to_owned(),
                status: status.to_owned(),
                reason: reason.unwrap_or_default().to_owned(),
            };
            let event = Context::new_event(SOURCE, &rejected)?;
            enqueue(tx, topics::ENROLLMENT_REJECTED, &event)?;
            add_entry(
                tx,
                id,
                &own_entry(EnrollmentRejected::TYPE, Some(status.to_owned()), now),
                now,
            )?;
        }
        let (slug, subject, body) = notice(status, &row.course_id, reason);
        let mail = EmailRequested {
            mail_id: format!("{slug}-{id}"),
            purpose: MailPurpose::StudentNotice,
            about: id.to_owned(),
            to: row.student_email.clone(),
            reply_to: None,
            requester_email: row.student_email.clone(),
            subject,
            body: format!("Dear {},\n\n{body}\n", row.student_name),
        };
        let event = Context::new_event(SOURCE, &mail)?;
        enqueue(tx, topics::MAIL_REQUESTS, &event)?;
        add_entry(
            tx,
            id,
            &own_entry(EmailRequested::TYPE, Some(mail.mail_id.clone()), now),
            now,
        )?;
        Ok(())
    }

    /// Applies one consumed event to its enrollment, once per event id.
    async fn apply(&self, msg: &Message, id: &str, what: Effect) -> Result<(), HandlerError> {
        let event = msg.event();
        let (attempt, detail) = match &what {
            Effect::Verdict(_, attempt, detail) | Effect::Mail(attempt, detail) => {
                (*attempt, detail.clone())
            }
        };
        let now = now_ms();
        let entry = TimelineEntry {
            kind: event.ty().to_owned(),
            time: rfc3339_ms(now),
            service: event
                .source()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
            attempt,
            detail,
        };
        let event_id = event.id().to_owned();
        let (id, shown) = (id.to_owned(), entry.clone());
        let changed = self
            .store
            .once(GROUP, event_id, move |tx: &Connection| {
                let Some(row) = load(tx, &id).transient()? else {
                    // Mail about other things (contact messages) and
                    // verdicts for enrollments this database does not hold
                    // are not ours.
                    return Ok(None);
                };
                add_entry(tx, &id, &entry, now).transient()?;
                let mut status = row.status.clone();
                if let Effect::Verdict(verdict, ..) = what {
                    let payment_status = match verdict {
                        Verdict::Captured => Some("captured"),
                        Verdict::Declined => Some("declined"),
                        Verdict::Refunded => Some("refunded"),
                        Verdict::FraudPassed | Verdict::FraudFailed => None,
                    };
                    if let Some(p) = payment_status {
                        tx.prepare_cached(
                            "UPDATE enrollments SET payment_status = ?, updated_ms = ? WHERE id = ?",
                        )
                        .and_then(|mut s| s.execute(params![p, now, id]))
                        .transient()?;
                    }
                    if let Some(next) = transition(row.mode, &row.status, verdict) {
                        // Only a refusal has a reason to show.
                        let reason = entry.detail.as_deref().filter(|_| next != "active");
                        tx.prepare_cached(
                            "UPDATE enrollments SET status = ?, reason = ?, updated_ms = ? WHERE id = ? AND status = ?",
                        )
                        .and_then(|mut s| s.execute(params![next, reason, now, id, row.status]))
                        .transient()?;
                        Self::announce(tx, &id, &row, next, reason, now).transient()?;
                        next.clone_into(&mut status);
                    }
                }
                Ok::<_, HandlerError>(Some((id, status)))
            })
            .await?
            .flatten();
        let Some((id, status)) = changed else {
            return Ok(());
        };
        let entry = shown;
        // Nobody listening is fine: the change is stored.
        let _ = self.live.send(Change { id, status, entry });
        Ok(())
    }

    /// The status and timeline of an enrollment.
    ///
    /// # Errors
    ///
    /// A 404 problem for an unknown id, 503 if the database is unavailable.
    pub async fn view(&self, id: &str) -> Result<EnrollmentView, Problem> {
        let r = sqlx::query("SELECT * FROM enrollments WHERE id = ?")
            .bind(id)
            .fetch_optional(self.store.pool())
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(|| Problem::not_found("this enrollment"))?;
        let entries = sqlx::query(
            "SELECT at_ms, event_type, service, attempt, detail FROM enrollment_timeline WHERE enrollment_id = ? ORDER BY seq",
        )
        .bind(id)
        .fetch_all(self.store.pool())
        .await
        .map_err(|e| unavailable(&e))?;
        Ok(EnrollmentView {
            id: id.to_owned(),
            status: r.get("status"),
            mode: parse_mode(r.get("mode")),
            course_id: r.get("course_id"),
            student: Student {
                name: r.get("student_name"),
                email: r.get("student_email"),
            },
            payment: PaymentView {
                amount_cents: u64::try_from(r.get::<i64, _>("amount_cents")).unwrap_or(0),
                currency: r.get("currency"),
                card_brand: r.get("card_brand"),
                card_last4: r.get("card_last4"),
                status: r.get("payment_status"),
            },
            reason: r.get("reason"),
            created_at: rfc3339_ms(r.get("created_ms")),
            updated_at: rfc3339_ms(r.get("updated_ms")),
            timeline: entries
                .iter()
                .map(|e| TimelineEntry {
                    kind: e.get("event_type"),
                    time: rfc3339_ms(e.get("at_ms")),
                    service: e.get("service"),
                    attempt: u32::try_from(e.get::<i64, _>("attempt")).unwrap_or(0),
                    detail: e.get("detail"),
                })
                .collect(),
        })
    }

    /// How many enrollments are in each status.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn counts(&self) -> Result<Vec<(String, u64)>, OutboxError> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM enrollments GROUP BY status ORDER BY status",
        )
        .fetch_all(self.store.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get("status"),
                    u64::try_from(r.get::<i64, _>("n")).unwrap_or(0),
                )
            })
            .collect())
    }
}

/// What a consumed event is, for [`Enrollment::apply`]: a verdict (with the
/// attempt that produced it and a detail) or news about a mail.
#[derive(Debug, Clone)]
enum Effect {
    Verdict(Verdict, u32, Option<String>),
    Mail(u32, Option<String>),
}

fn load(tx: &Connection, id: &str) -> Result<Option<Row>, rusqlite::Error> {
    tx.prepare_cached(
        "SELECT status, mode, course_id, student_name, student_email, created_ms FROM enrollments WHERE id = ?",
    )?
    .query_row(params![id], |r| {
        Ok(Row {
            status: r.get::<_, String>("status")?,
            mode: parse_mode(&r.get::<_, String>("mode")?),
            course_id: r.get::<_, String>("course_id")?,
            student_name: r.get::<_, String>("student_name")?,
            student_email: r.get::<_, String>("student_email")?,
            created_ms: r.get::<_, i64>("created_ms")?,
        })
    })
    .optional()
}

async fn submit(
    State(enrollment): State<Enrollment>,
    headers: HeaderMap,
    body: Result<StrictJson<NewEnrollment>, Problem>,
) -> Result<impl IntoResponse, Problem> {
    // StrictJson's rejections quote no value and no long digit run.
    let StrictJson(req) = body?;
    let key = idempotency_key(&headers)?;
    let (accepted, replayed) = enrollment.accept(req, key).await?;
    let mut out = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/enrollments/{}", accepted.id)) {
        out.insert(header::LOCATION, location);
    }
    if replayed {
        out.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok((StatusCode::ACCEPTED, out, axum::Json(accepted)))
}

fn path_id(id: Result<PathId, Problem>) -> Result<String, Problem> {
    id.map(|PathId(id)| id)
        .map_err(|_| Problem::not_found("this enrollment"))
}

async fn show(
    State(enrollment): State<Enrollment>,
    id: Result<PathId, Problem>,
) -> Result<axum::Json<EnrollmentView>, Problem> {
    let id = path_id(id)?;
    enrollment.view(&id).await.map(axum::Json)
}

/// Server-sent events: the enrollment as it is now (`snapshot`), then each
/// change (`change`) as it is committed; bounded and ended by the
/// service's [`SseStreams`].
async fn stream(
    State(enrollment): State<Enrollment>,
    client: ClientIp,
    id: Result<PathId, Problem>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    let id = path_id(id)?;
    let permit = enrollment.sse.open(client)?;
    // Subscribe before reading, so no change falls in between.
    let live = BroadcastStream::new(enrollment.live.subscribe());
    let view = enrollment.view(&id).await?;
    let snapshot = SseEvent::default()
        .event("snapshot")
        .json_data(&view)
        .unwrap_or_default();
    // A lagging stream skips what it missed, as the snapshot it can fetch
    // again holds it.
    let changes = live.filter_map(move |change| {
        std::future::ready(match change {
            Ok(change) if change.id == id => Some(
                SseEvent::default()
                    .event("change")
                    .json_data(&change)
                    .unwrap_or_default(),
            ),
            _ => None,
        })
    });
    Ok(enrollment.sse.respond(
        permit,
        futures::stream::once(std::future::ready(snapshot)).chain(changes),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_notice_is_told_apart_from_other_mail_by_its_id() {
        let id = "0193c0de-0000-7000-8000-000000000001";
        for status in ["active", "rejected", "payment_failed", "suspended"] {
            let (slug, _, _) = notice(status, "rust-101", None);
            assert!(is_enrollment_mail(&format!("{slug}-{id}"), id), "{status}");
        }
        assert!(!is_enrollment_mail(&format!("contact-{id}"), id));
        assert!(!is_enrollment_mail(&format!("welcome-{id}"), "another"));
        assert!(!is_enrollment_mail(id, id));
    }

    #[test]
    fn final_states_stay_final() {
        use AcceptanceMode::{AwaitPayment, Optimistic};
        for verdict in [
            Verdict::FraudPassed,
            Verdict::FraudFailed,
            Verdict::Captured,
            Verdict::Declined,
            Verdict::Refunded,
        ] {
            for status in ["rejected", "payment_failed", "suspended"] {
                assert_eq!(transition(AwaitPayment, status, verdict), None);
                assert_eq!(transition(Optimistic, status, verdict), None);
            }
            assert_eq!(transition(AwaitPayment, "active", verdict), None);
        }
        assert_eq!(
            transition(AwaitPayment, "payment_processing", Verdict::Captured),
            Some("active")
        );
        assert_eq!(
            transition(Optimistic, "active", Verdict::Declined),
            Some("suspended")
        );
        assert_eq!(transition(Optimistic, "active", Verdict::Captured), None);
    }

    #[test]
    fn the_payment_debug_form_holds_no_card() {
        let p = NewPayment {
            card_number: "4242424242424242".into(),
            expiry: "12/30".into(),
            cvv: "123".into(),
            holder: "Ana".into(),
            amount_cents: 1,
            currency: "EUR".into(),
        };
        let text = format!("{p:?}");
        assert!(!text.contains("4242") && !text.contains("123"), "{text}");
    }
}
