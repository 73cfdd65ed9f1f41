//! The contact form: a student's message is accepted at once and mailed to
//! the school behind the scenes.
//!
//! `POST /contact` validates the message, stores it and enqueues an
//! [`EmailRequested`] for the mailer in **one transaction** (the outbox),
//! and answers `202 Accepted` — the caller never waits for SMTP. The
//! service then follows the mail: [`EmailSent`] marks the message `sent`,
//! [`EmailFailed`] marks it `failed` (the notifier tells the student).
//! A message that has not gone out [`ContactConfig::still_trying_after`]
//! after it was accepted (the mail server is down, say) gets one
//! [`ContactMessageDelayed`]: the notifier tells the student it is late, not
//! lost ([`Contact::run_delay_notices`]).
//! `GET /contact/{id}` shows the status and the timeline of every event that
//! touched the message.
//!
//! A card number in the name, subject or message is masked to its last
//! four digits (`•••• •••• •••• 4242`) before anything is stored, mailed or
//! published; in the address it is refused.
//!
//! The service names no transport: it takes a `Store` for its database and
//! gives back an HTTP router and event routes; the binary wires them.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use eventos::{Context, HandlerError, Message, Route, TypedEvent as _, typed_with};
use eventos_outbox::rusqlite::{self, Connection, params};
use eventos_outbox::{OutboxError, Store, enqueue};
use school_events::{
    ContactMessageDelayed, EmailDeferred, EmailFailed, EmailRequested, EmailSent, MailPurpose,
    topics,
};
pub use school_http::TimelineEntry;
use school_http::{
    CONTROL_DETAIL, EmailAddress, FieldError, MAX_BODY_BYTES, NotificationKey, PathId, Problem,
    StrictJson, has_control, holds_card_number, mask_card_numbers, now_ms, rfc3339_ms,
};
use serde::{Deserialize, Serialize};
use sqlx::Row as _;

/// The migrations of the contact database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The CloudEvents `source` of events this service emits.
pub const SOURCE: &str = "/school/contact";

/// The consumer group of this service.
pub const GROUP: &str = "contact";

/// Settings of the contact service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactConfig {
    /// Where contact messages are mailed.
    pub school_inbox: String,
    /// How long after a message is accepted its sender is told, once, that
    /// it has not gone out yet and is still being tried.
    pub still_trying_after: Duration,
    /// The key notifications tokens are issued under: the notifier's.
    pub notifications_key: NotificationKey,
}

impl Default for ContactConfig {
    /// Mail to `admissions@school.example`; "still trying" after an hour;
    /// a random notifications key.
    fn default() -> Self {
        Self {
            school_inbox: "admissions@school.example".into(),
            still_trying_after: Duration::from_secs(3600),
            // Tokens of a random key open nothing a notifier elsewhere
            // keeps; the system passes its shared key.
            notifications_key: NotificationKey::random(),
        }
    }
}

/// Most messages one sweep notices; the next sweep takes the rest.
const DELAY_SWEEP_BATCH: i64 = 500;

/// The contact service.
#[derive(Debug, Clone)]
pub struct Contact {
    store: Store,
    config: Arc<ContactConfig>,
}

/// The body of `POST /contact`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMessage {
    /// Who writes.
    pub name: String,
    /// Where to answer.
    pub email: String,
    /// About what.
    pub subject: String,
    /// The message.
    pub message: String,
}

/// The answer to `POST /contact`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Accepted {
    /// The message's id.
    pub id: String,
    /// `queued`.
    pub status: String,
    /// What reads the sender's notifications
    /// (`GET /notifications?email=…&token=…`).
    pub notifications_token: String,
}

/// The answer to `GET /contact/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageView {
    /// The id.
    pub id: String,
    /// `queued`, `sent` or `failed`.
    pub status: String,
    /// The subject as written.
    pub subject: String,
    /// What happened, oldest first.
    pub timeline: Vec<TimelineEntry>,
}

/// A message as checked: trimmed, its address normalized.
struct Checked {
    name: String,
    email: EmailAddress,
    subject: String,
    message: String,
}

fn validate(m: &NewMessage) -> Result<Checked, Problem> {
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
    for (pointer, text, multiline) in [
        ("/name", &m.name, false),
        ("/email", &m.email, false),
        ("/subject", &m.subject, false),
        ("/message", &m.message, true),
    ] {
        if has_control(text, multiline) {
            fail(pointer, CONTROL_DETAIL);
        }
    }
    let len = |s: &str| s.trim().chars().count();
    if !(1..=200).contains(&len(&m.name)) {
        fail("/name", "give a name of 1 to 200 characters");
    }
    let email = EmailAddress::parse(m.email.trim());
    if let Err(e) = &email {
        fail("/email", &e.to_string());
    }
    if !(1..=200).contains(&len(&m.subject)) {
        fail("/subject", "give a subject of 1 to 200 characters");
    }
    if !(1..=10_000).contains(&len(&m.message)) {
        fail("/message", "write a message of 1 to 10000 characters");
    }
    // An address cannot be masked and still be one.
    if holds_card_number(&m.email) {
        fail(
            "/email",
            "remove the card number from the address; never send card numbers in a message",
        );
    }
    // A card number someone typed into a message would be stored, mailed
    // and published with it; the school needs none of it but the last four.
    let masked = |text: &str| mask_card_numbers(text).into_owned();
    match email {
        Ok(email) if errors.is_empty() => Ok(Checked {
            name: masked(m.name.trim()),
            email,
            subject: masked(m.subject.trim()),
            message: masked(&m.message),
        }),
        _ => Err(Problem::validation(errors)),
    }
}

fn unavailable(e: &dyn std::fmt::Display) -> Problem {
    tracing::error!(error = %e, "contact database unavailable");
    Problem::unavailable(
        "the message could not be stored right now; nothing was accepted, try again in a moment",
    )
}

fn timeline(
    tx: &Connection,
    message_id: &str,
    kind: &str,
    service: &str,
    attempt: u32,
    detail: Option<&str>,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "INSERT INTO contact_timeline (message_id, at_ms, event_type, service, attempt, detail) VALUES (?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![message_id, now_ms(), kind, service, attempt, detail])?;
    Ok(())
}

impl Contact {
    /// The service on `store` (its migrations are run).
    ///
    /// # Errors
    ///
    /// If the migrations fail.
    pub async fn new(
        store: Store,
        config: ContactConfig,
    ) -> Result<Self, eventos_outbox::OutboxError> {
        store.migrate(&MIGRATOR).await?;
        Ok(Self {
            store,
            config: Arc::new(config),
        })
    }

    /// The service's database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The settings it runs with.
    pub fn config(&self) -> &ContactConfig {
        &self.config
    }

    /// `POST /contact` and `GET /contact/{id}`.
    pub fn http(&self) -> axum::Router {
        axum::Router::new()
            .route("/contact", post(submit))
            .route("/contact/{id}", get(show))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.clone())
    }

    /// The event routes: follow the mail of each message.
    pub fn routes(&self) -> Vec<Route> {
        let sent = typed_with(
            self.clone(),
            |this, e: EmailSent, msg: Message| async move { this.on_sent(e, msg).await },
        );
        let failed = typed_with(
            self.clone(),
            |this, e: EmailFailed, msg: Message| async move { this.on_failed(e, msg).await },
        );
        let deferred = typed_with(
            self.clone(),
            |this, e: EmailDeferred, msg: Message| async move { this.on_deferred(e, msg).await },
        );
        // Each outcome is one short write; the more of them overlap, the
        // more share a round of the store's writer, and a sync.
        vec![
            Route::new(topics::MAIL_SENT, GROUP, sent).concurrency(256),
            Route::new(topics::MAIL_FAILURES, GROUP, failed).concurrency(256),
            Route::new(topics::MAIL_DEFERRED, GROUP, deferred).concurrency(256),
        ]
    }

    /// Tells the sender of every message still not sent
    /// [`ContactConfig::still_trying_after`] after it was accepted, once
    /// per message, until `shutdown` completes: a sweep every quarter of
    /// that window (between 50 ms and 30 s). The notice is decided here,
    /// not by the mailer, because while the mail server is down the mailer
    /// is paused and tries nothing: only the contact service knows how long
    /// each message has been waiting.
    pub async fn run_delay_notices(self, shutdown: impl std::future::Future<Output = ()>) {
        let every = (self.config.still_trying_after / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::pin!(shutdown);
        loop {
            match self.notice_delayed().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(
                        messages = n,
                        "late contact messages; their senders are told"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look for late contact messages; retrying");
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One sweep of [`Contact::run_delay_notices`]: marks the late
    /// messages, adds the entry to their timelines and enqueues their
    /// [`ContactMessageDelayed`], all in one transaction. Returns how many.
    ///
    /// # Errors
    ///
    /// If the database fails; nothing is marked then.
    pub async fn notice_delayed(&self) -> Result<usize, eventos::BoxError> {
        let now = now_ms();
        let window = i64::try_from(self.config.still_trying_after.as_millis()).unwrap_or(i64::MAX);
        let batch = DELAY_SWEEP_BATCH;
        let count = self
            .store
            .write(move |tx: &Connection| {
                let late = tx
                    .prepare_cached(
                        "SELECT id, email, subject, created_ms FROM contact_messages \
                         WHERE delayed_ms IS NULL AND status NOT IN ('sent', 'failed') AND created_ms <= ? \
                         ORDER BY created_ms LIMIT ?",
                    )?
                    .query_map(params![now.saturating_sub(window), batch], |row| {
                        Ok((
                            row.get::<_, String>("id")?,
                            row.get::<_, String>("email")?,
                            row.get::<_, String>("subject")?,
                            row.get::<_, i64>("created_ms")?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                for (id, email, subject, created_ms) in &late {
                    let waiting_ms = u64::try_from(now - created_ms).unwrap_or(0);
                    tx.prepare_cached("UPDATE contact_messages SET delayed_ms = ? WHERE id = ?")?
                        .execute(params![now, id])?;
                    let detail = format!(
                        "not sent after {} s; still trying, the sender is told",
                        waiting_ms / 1000
                    );
                    timeline(tx, id, ContactMessageDelayed::TYPE, GROUP, 0, Some(&detail))?;
                    let delayed = ContactMessageDelayed {
                        message_id: id.clone(),
                        email: email.clone(),
                        subject: subject.clone(),
                        waiting_ms,
                    };
                    let event = Context::new_event(SOURCE, &delayed)?;
                    enqueue(tx, topics::CONTACT_DELAYED, &event)?;
                }
                Ok::<_, eventos::BoxError>(late.len())
            })
            .await?;
        Ok(count)
    }

    async fn accept(&self, m: NewMessage) -> Result<Accepted, Problem> {
        let m = validate(&m)?;
        let id = uuid::Uuid::now_v7().to_string();
        let email = m.email.to_string();
        let mail = EmailRequested {
            mail_id: format!("contact-{id}"),
            purpose: MailPurpose::ContactMessage,
            about: id.clone(),
            to: self.config.school_inbox.clone(),
            reply_to: Some(email.clone()),
            requester_email: email.clone(),
            subject: format!("[contact] {}", m.subject),
            body: format!("From: {} <{}>\n\n{}", m.name, email, m.message),
        };
        let ev = Context::new_event(SOURCE, &mail).map_err(|e| unavailable(&e))?;
        let now = now_ms();
        let notifications_token = self.config.notifications_key.token(&m.email);
        let row_id = id.clone();
        self.store
            .write(move |tx: &Connection| {
                tx.prepare_cached(
                    "INSERT INTO contact_messages (id, name, email, subject, message, status, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                )?
                .execute(params![row_id, m.name, email, m.subject, m.message, now, now])?;
                timeline(tx, &row_id, "received", "contact", 1, None)?;
                enqueue(tx, topics::MAIL_REQUESTS, &ev)
            })
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(Accepted {
            id,
            status: "queued".into(),
            notifications_token,
        })
    }

    /// The status and timeline of a message.
    ///
    /// # Errors
    ///
    /// A 404 problem for an unknown id, 503 if the database is unavailable.
    pub async fn view(&self, id: &str) -> Result<MessageView, Problem> {
        let row = sqlx::query("SELECT status, subject FROM contact_messages WHERE id = ?")
            .bind(id)
            .fetch_optional(self.store.pool())
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(|| Problem::not_found("this contact message"))?;
        let entries = sqlx::query(
            "SELECT at_ms, event_type, service, attempt, detail FROM contact_timeline WHERE message_id = ? ORDER BY seq",
        )
        .bind(id)
        .fetch_all(self.store.pool())
        .await
        .map_err(|e| unavailable(&e))?;
        let timeline = entries
            .iter()
            .map(|r| TimelineEntry {
                kind: r.get("event_type"),
                time: rfc3339_ms(r.get("at_ms")),
                service: r.get("service"),
                attempt: u32::try_from(r.get::<i64, _>("attempt")).unwrap_or(0),
                detail: r.get("detail"),
            })
            .collect();
        Ok(MessageView {
            id: id.to_owned(),
            status: row.get("status"),
            subject: row.get("subject"),
            timeline,
        })
    }

    /// Applies a mail outcome to its message, once per event; a `status` of
    /// `None` adds to the timeline only.
    async fn record(
        &self,
        msg: &Message,
        about: &str,
        status: Option<&str>,
        attempt: u32,
        detail: Option<&str>,
    ) -> Result<(), HandlerError> {
        let event_id = msg.event().id().to_owned();
        let ty = msg.event().ty().to_owned();
        let service = msg
            .event()
            .source()
            .rsplit('/')
            .next()
            .unwrap_or("mailer")
            .to_owned();
        let (about, status, detail) = (
            about.to_owned(),
            status.map(str::to_owned),
            detail.map(str::to_owned),
        );
        self.store
            .once(GROUP, event_id, move |tx: &Connection| {
                // A deferral arriving after the final outcome must not
                // undo it.
                let updated = tx
                    .prepare_cached(
                        "UPDATE contact_messages SET status = COALESCE(?, status), updated_ms = ? WHERE id = ?",
                    )?
                    .execute(params![status, now_ms(), about])?;
                // Mail about other things (student notices) is not ours to
                // track.
                if updated == 1 {
                    timeline(tx, &about, &ty, &service, attempt, detail.as_deref())?;
                }
                Ok::<_, OutboxError>(())
            })
            .await?;
        Ok(())
    }

    /// Only the message's own mail is followed; the notice to the student
    /// about it (same `about`) is the notifier's.
    fn is_ours(mail_id: &str, about: &str) -> bool {
        mail_id.strip_prefix("contact-") == Some(about)
    }

    async fn on_sent(&self, e: EmailSent, msg: Message) -> Result<(), HandlerError> {
        if !Self::is_ours(&e.mail_id, &e.about) {
            return Ok(());
        }
        self.record(&msg, &e.about, Some("sent"), e.attempt, None)
            .await
    }

    async fn on_deferred(&self, e: EmailDeferred, msg: Message) -> Result<(), HandlerError> {
        if !Self::is_ours(&e.mail_id, &e.about) {
            return Ok(());
        }
        let detail = format!("{}; retrying within {} ms", e.error, e.retry_within_ms);
        self.record(&msg, &e.about, None, e.attempt, Some(&detail))
            .await
    }

    async fn on_failed(&self, e: EmailFailed, msg: Message) -> Result<(), HandlerError> {
        if e.purpose != MailPurpose::ContactMessage {
            return Ok(());
        }
        self.record(&msg, &e.about, Some("failed"), e.attempts, Some(&e.reason))
            .await
    }
}

async fn submit(
    State(contact): State<Contact>,
    body: Result<StrictJson<NewMessage>, Problem>,
) -> Result<impl IntoResponse, Problem> {
    let StrictJson(m) = body?;
    let accepted = contact.accept(m).await?;
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/contact/{}", accepted.id)) {
        headers.insert(header::LOCATION, location);
    }
    Ok((StatusCode::ACCEPTED, headers, axum::Json(accepted)))
}

async fn show(
    State(contact): State<Contact>,
    id: Result<PathId, Problem>,
) -> Result<axum::Json<MessageView>, Problem> {
    let PathId(id) = id.map_err(|_| Problem::not_found("this contact message"))?;
    contact.view(&id).await.map(axum::Json)
}
