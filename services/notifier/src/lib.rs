//! The notifier: when mail fails, the person concerned is told.
//!
//! On [`EmailFailed`] for a contact message it records a notification the
//! student can read (`GET /notifications?email=…`, or live with
//! `GET /notifications/stream?email=…` as server-sent events) and, in the
//! same transaction, asks the mailer to e-mail them about it. When a notice
//! to a student itself fails, the notification is recorded and nothing more
//! is mailed — a failing address must not start a loop of failure mail.
//!
//! On [`ContactMessageDelayed`] — a message still not sent after the
//! contact service's first window — it records a "still trying" notice and
//! mails nothing: the mail server is what is failing, and the final word
//! (sent, or failed with a mail) comes later.
//!
//! Reading notifications takes the address and its token
//! (`?token=…` or `Authorization: Bearer …`): an HMAC of the address under
//! the system's [`NotificationKey`], handed out by the contact and
//! enrollment services when they accept a message or an enrollment. The
//! notifier checks it by computing it again, so it asks no other service
//! and stores nothing about tokens. No token is a 401; a token that is not
//! the address's is a 404, the same answer as for an address with nothing
//! to read.
//!
//! The service names no transport: it takes a `Store` and gives back an HTTP
//! router and event routes.

use std::collections::HashSet;
use std::convert::Infallible;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use eventos::{Context, HandlerError, Message, Route, typed_with};
use eventos_outbox::rusqlite::{Connection, params};
use eventos_outbox::{OutboxError, Store, enqueue};
use futures::{Stream, StreamExt as _};
use school_events::{ContactMessageDelayed, EmailFailed, EmailRequested, MailPurpose, topics};
use school_http::{
    ClientIp, EmailAddress, FieldError, NotificationKey, Problem, SseStreams, now_ms, rfc3339_ms,
};
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

/// The migrations of the notifier database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The CloudEvents `source` of events this service emits.
pub const SOURCE: &str = "/school/notifier";

/// The consumer group of this service.
pub const GROUP: &str = "notifier";

/// A notification, as the student reads it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Notification {
    /// Its id.
    pub id: String,
    /// Whom it is for.
    pub email: String,
    /// `contact_message_failed`, `contact_message_delayed` or
    /// `notice_failed`.
    pub kind: String,
    /// The entity it is about.
    pub about: String,
    /// What to tell the student.
    pub text: String,
    /// Whether an e-mail about it was requested.
    pub emailed: bool,
    /// RFC 3339 time.
    pub created_at: String,
}

/// The notifier service.
#[derive(Debug, Clone)]
pub struct Notifier {
    store: Store,
    key: NotificationKey,
    live: broadcast::Sender<Notification>,
    sse: SseStreams,
}

/// `?email=&token=` of the notification endpoints.
#[derive(Debug, Deserialize)]
pub struct ByEmail {
    /// Whose notifications.
    pub email: Option<String>,
    /// The address's token (else in `Authorization: Bearer`).
    pub token: Option<String>,
}

/// Why a reader is turned away: a problem, with `WWW-Authenticate` on a 401.
struct Refused(Problem);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let unauthorized = self.0.status == StatusCode::UNAUTHORIZED.as_u16();
        let mut response = self.0.into_response();
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"notifications\""),
            );
        }
        response
    }
}

impl From<Problem> for Refused {
    fn from(p: Problem) -> Self {
        Self(p)
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The address asked for, if the request carries its token.
fn authorized(key: &NotificationKey, q: &ByEmail, headers: &HeaderMap) -> Result<String, Refused> {
    let email = email_param(q)?;
    let Some(token) = q.token.as_deref().or_else(|| bearer(headers)) else {
        return Err(Refused(Problem::new(
            StatusCode::UNAUTHORIZED,
            "token-required",
            "Token required",
            "pass the notifications token the school gave you when it accepted your message or enrollment, as ?token= or Authorization: Bearer",
        )));
    };
    let address = EmailAddress::parse(&email).map_err(|_| Problem::not_found("notifications"))?;
    if key.verify(&address, token) {
        Ok(email)
    } else {
        Err(Refused(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "no notifications for this address and token; use the token from the answer to your message or enrollment",
        )))
    }
}

/// The form notifications are kept and looked up under: the address as
/// the forms normalized it (punycode domain), lower-cased.
fn email_key(raw: &str) -> Option<String> {
    EmailAddress::parse(raw.trim())
        .ok()
        .map(|a| a.to_string().to_ascii_lowercase())
}

fn email_param(q: &ByEmail) -> Result<String, Problem> {
    match q.email.as_deref().and_then(email_key) {
        Some(e) => Ok(e),
        None => Err(Problem::validation(vec![FieldError {
            pointer: "?email".into(),
            detail: "pass the student's e-mail address, e.g. /notifications?email=ana@example.com"
                .into(),
        }])),
    }
}

fn unavailable(e: &dyn std::fmt::Display) -> Problem {
    tracing::error!(error = %e, "notifier database unavailable");
    Problem::unavailable("notifications cannot be read right now; try again in a moment")
}

impl Notifier {
    /// The service on `store` (its migrations are run); `key` checks the tokens readers present; it must be the key the
    /// contact and enrollment services issue them with.
    pub async fn new(
        store: Store,
        key: NotificationKey,
    ) -> Result<Self, eventos_outbox::OutboxError> {
        store.migrate(&MIGRATOR).await?;
        let (live, _) = broadcast::channel(256);
        Ok(Self {
            store,
            key,
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

    /// The service's database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// `GET /notifications?email=&token=` and
    /// `GET /notifications/stream?email=&token=`.
    pub fn http(&self) -> axum::Router {
        axum::Router::new()
            .route("/notifications", get(list))
            .route("/notifications/stream", get(stream))
            .with_state(self.clone())
    }

    /// The event route: react to failed mail.
    pub fn routes(&self) -> Vec<Route> {
        vec![
            Route::new(
                topics::MAIL_FAILURES,
                GROUP,
                typed_with(
                    self.clone(),
                    |this, e: EmailFailed, msg: Message| async move { this.on_failed(e, msg).await },
                ),
            ),
            Route::new(
                topics::CONTACT_DELAYED,
                GROUP,
                typed_with(
                    self.clone(),
                    |this, e: ContactMessageDelayed, msg: Message| async move {
                        this.on_delayed(e, msg).await
                    },
                ),
            ),
        ]
    }

    /// Notifications for `email`, newest last.
    ///
    /// # Errors
    ///
    /// A 503 problem if the database is unavailable.
    pub async fn for_email(&self, email: &str) -> Result<Vec<Notification>, Problem> {
        let rows = sqlx::query(
            "SELECT id, email, kind, about, text, emailed, created_ms FROM notifications WHERE email = ? ORDER BY created_ms, id",
        )
        .bind(email)
        .fetch_all(self.store.pool())
        .await
        .map_err(|e| unavailable(&e))?;
        Ok(rows
            .iter()
            .map(|r| Notification {
                id: r.get("id"),
                email: r.get("email"),
                kind: r.get("kind"),
                about: r.get("about"),
                text: r.get("text"),
                emailed: r.get::<i64, _>("emailed") != 0,
                created_at: rfc3339_ms(r.get("created_ms")),
            })
            .collect())
    }

    async fn on_delayed(&self, e: ContactMessageDelayed, msg: Message) -> Result<(), HandlerError> {
        let text = format!(
            "Your message \"{}\" has not reached the school yet: the school's mail server is not taking mail right now. We keep trying and will tell you here if it finally fails.",
            e.subject
        );
        let email = email_key(&e.email).unwrap_or_else(|| e.email.trim().to_ascii_lowercase());
        self.notify(
            &msg,
            email,
            "contact_message_delayed",
            e.message_id,
            text,
            None,
        )
        .await
    }

    async fn on_failed(&self, e: EmailFailed, msg: Message) -> Result<(), HandlerError> {
        // An address no form would accept (from an older version) is kept
        // as it came: the notice is still recorded, and the mailer refuses
        // to send to it.
        let email = email_key(&e.requester_email)
            .unwrap_or_else(|| e.requester_email.trim().to_ascii_lowercase());
        let (kind, text, mail) = match e.purpose {
            MailPurpose::ContactMessage => {
                let text = format!(
                    "We couldn't send your message \"{}\" to the school. Please try again later, or call the office.",
                    e.subject.trim_start_matches("[contact] ")
                );
                let mail = EmailRequested {
                    mail_id: format!("notice-{}", e.mail_id),
                    purpose: MailPurpose::StudentNotice,
                    about: e.about.clone(),
                    to: email.clone(),
                    reply_to: None,
                    requester_email: email.clone(),
                    subject: "We couldn't send your message".into(),
                    body: text.clone(),
                };
                ("contact_message_failed", text, Some(mail))
            }
            MailPurpose::StudentNotice => (
                "notice_failed",
                format!(
                    "We couldn't e-mail you about \"{}\": {}.",
                    e.subject, e.reason
                ),
                None,
            ),
        };
        self.notify(&msg, email, kind, e.about, text, mail).await
    }

    /// Records a notification, once per event, and the mail about it if
    /// any, in one transaction; then tells live listeners.
    async fn notify(
        &self,
        msg: &Message,
        email: String,
        kind: &str,
        about: String,
        text: String,
        mail: Option<EmailRequested>,
    ) -> Result<(), HandlerError> {
        let notification = Notification {
            id: uuid::Uuid::now_v7().to_string(),
            email,
            kind: kind.into(),
            about,
            text,
            emailed: mail.is_some(),
            created_at: rfc3339_ms(now_ms()),
        };
        let mail = mail.map(|m| Context::new_event(SOURCE, &m)).transpose()?;
        let event_id = msg.event().id().to_owned();
        let row = notification.clone();
        let first = self
            .store
            .once(GROUP, event_id, move |tx: &Connection| {
                tx.prepare_cached(
                    "INSERT INTO notifications (id, email, kind, about, text, emailed, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                )?
                .execute(params![
                    row.id,
                    row.email,
                    row.kind,
                    row.about,
                    row.text,
                    i64::from(row.emailed),
                    now_ms()
                ])?;
                if let Some(event) = mail {
                    enqueue(tx, topics::MAIL_REQUESTS, &event)?;
                }
                Ok::<_, OutboxError>(())
            })
            .await?;
        if first.is_none() {
            return Ok(());
        }
        // Nobody listening is fine: the notification is stored.
        let _ = self.live.send(notification);
        Ok(())
    }
}

/// The query, or a 400 that does not repeat it (it may hold the token).
fn query(
    q: Result<Query<ByEmail>, axum::extract::rejection::QueryRejection>,
) -> Result<ByEmail, Problem> {
    q.map(|Query(q)| q).map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-query",
            "Invalid query",
            "pass only ?email= and ?token=, each once",
        )
    })
}

#[derive(Serialize)]
struct Listing {
    email: String,
    notifications: Vec<Notification>,
}

async fn list(
    State(notifier): State<Notifier>,
    headers: HeaderMap,
    q: Result<Query<ByEmail>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Listing>, Refused> {
    let email = authorized(&notifier.key, &query(q)?, &headers)?;
    let notifications = notifier.for_email(&email).await?;
    Ok(axum::Json(Listing {
        email,
        notifications,
    }))
}

/// Server-sent events: every stored notification for the address, then each
/// new one as it is recorded; bounded and ended by the service's
/// [`SseStreams`].
async fn stream(
    State(notifier): State<Notifier>,
    client: ClientIp,
    headers: HeaderMap,
    q: Result<Query<ByEmail>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Refused> {
    let email = authorized(&notifier.key, &query(q)?, &headers)?;
    let permit = notifier.sse.open(client)?;
    // Subscribe before reading the backlog, so nothing falls in between.
    let live = BroadcastStream::new(notifier.live.subscribe());
    let backlog = notifier.for_email(&email).await?;
    let mut seen: HashSet<String> = backlog.iter().map(|n| n.id.clone()).collect();
    let new = live.filter_map(move |n| {
        std::future::ready(match n {
            // The backlog may already hold one that was also broadcast.
            Ok(n) if n.email == email && seen.insert(n.id.clone()) => Some(n),
            _ => None,
        })
    });
    let events = futures::stream::iter(backlog).chain(new).map(|n| {
        SseEvent::default()
            .event("notification")
            .id(n.id.clone())
            .json_data(&n)
            .unwrap_or_default()
    });
    Ok(notifier.sse.respond(permit, events))
}
