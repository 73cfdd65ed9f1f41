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
//!
//! Laid out along its seams: `wire` (the request and the views), `validate`
//! (the body and the idempotency key, before anything is stored), `state`
//! (the transition table, what each status says, the student's mails),
//! `http` (the endpoints); this file keeps the service itself — accepting,
//! applying verdicts, reading — and its SQL.

mod card;
mod currency;
mod http;
mod state;
mod validate;
mod wire;

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
use http::{show, stream, submit};
pub use state::{Status, Verdict, transition};
use state::{is_enrollment_mail, mode_name, notice, parse_mode};
use validate::{Checked, idempotency_key, key_conflict, validate};
pub use wire::{
    Accepted, Change, EnrollmentView, NewEnrollment, NewPayment, NewStudent, PaymentView,
};

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

struct Row {
    status: Status,
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
        let message = Status::parse(&status).map_or("", Status::message);
        Ok(Some(Accepted {
            id: row.get("id"),
            message: message.into(),
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
            AcceptanceMode::AwaitPayment => Status::PaymentProcessing,
            AcceptanceMode::Optimistic => Status::Active,
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
                        status,
                        mode,
                        course_id: c.course_id.clone(),
                        student_name: c.student.name.clone(),
                        student_email: c.student.email.clone(),
                        created_ms: now,
                    };
                    Self::announce(tx, &id, &row, Status::Active, None, now)?;
                }
                Ok::<_, StoreError>(())
            })
            .await?;
        tracing::info!(enrollment = %id, course = %c.course_id, last4 = %c.payment.card.last4, %status, "enrollment accepted");
        Ok(Accepted {
            id,
            status: status.as_str().into(),
            message: status.message().into(),
            notifications_token: String::new(),
        })
    }

    /// Enqueues what reaching `status` causes: the lifecycle event and the
    /// student's mail, with their timeline entries.
    fn announce(
        tx: &Connection,
        id: &str,
        row: &Row,
        status: Status,
        reason: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        if status == Status::Active {
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
                status: status.as_str().to_owned(),
                reason: reason.unwrap_or_default().to_owned(),
            };
            let event = Context::new_event(SOURCE, &rejected)?;
            enqueue(tx, topics::ENROLLMENT_REJECTED, &event)?;
            add_entry(
                tx,
                id,
                &own_entry(
                    EnrollmentRejected::TYPE,
                    Some(status.as_str().to_owned()),
                    now,
                ),
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
                let mut status = row.status;
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
                    if let Some(next) = transition(row.mode, row.status, verdict) {
                        // Only a refusal has a reason to show.
                        let reason = entry.detail.as_deref().filter(|_| next != Status::Active);
                        tx.prepare_cached(
                            "UPDATE enrollments SET status = ?, reason = ?, updated_ms = ? WHERE id = ? AND status = ?",
                        )
                        .and_then(|mut s| s.execute(params![next, reason, now, id, row.status]))
                        .transient()?;
                        Self::announce(tx, &id, &row, next, reason, now).transient()?;
                        status = next;
                    }
                }
                Ok::<_, HandlerError>(Some((id, status.as_str().to_owned())))
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
            status: r.get::<_, Status>("status")?,
            mode: parse_mode(&r.get::<_, String>("mode")?),
            course_id: r.get::<_, String>("course_id")?,
            student_name: r.get::<_, String>("student_name")?,
            student_email: r.get::<_, String>("student_email")?,
            created_ms: r.get::<_, i64>("created_ms")?,
        })
    })
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_notice_is_told_apart_from_other_mail_by_its_id() {
        let id = "0193c0de-0000-7000-8000-000000000001";
        for status in [
            Status::Active,
            Status::Rejected,
            Status::PaymentFailed,
            Status::Suspended,
        ] {
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
            for status in [Status::Rejected, Status::PaymentFailed, Status::Suspended] {
                assert_eq!(transition(AwaitPayment, status, verdict), None);
                assert_eq!(transition(Optimistic, status, verdict), None);
            }
            assert_eq!(transition(AwaitPayment, Status::Active, verdict), None);
        }
        assert_eq!(
            transition(AwaitPayment, Status::PaymentProcessing, Verdict::Captured),
            Some(Status::Active)
        );
        assert_eq!(
            transition(Optimistic, Status::Active, Verdict::Declined),
            Some(Status::Suspended)
        );
        assert_eq!(
            transition(Optimistic, Status::Active, Verdict::Captured),
            None
        );
    }

    #[test]
    fn a_status_is_stored_and_shown_by_its_name() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(status.as_str())
            );
            assert!(!status.message().is_empty());
        }
        assert_eq!(Status::parse("pending"), None);
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
