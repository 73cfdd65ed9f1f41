//! The mailer of the reference system: sends the mail other services ask
//! for ([`EmailRequested`] on
//! [`topics::MAIL_REQUESTS`]), retries what fails transiently, and says how
//! it ended — [`EmailSent`](school_events::EmailSent) on
//! [`topics::MAIL_SENT`], or, once it gives up,
//! [`EmailFailed`](school_events::EmailFailed) on [`topics::MAIL_FAILURES`]
//! so the person concerned can be told.
//!
//! The crate is domain and handlers only: it names no transport. It takes
//! a [`Bus`](eventos::Bus) (to stamp the events it emits), keeps its own
//! SQLite [`Store`](eventos_outbox::Store), and hands back a
//! [`Route`] and a [`Relay`](eventos_outbox::Relay) for
//! the wiring to run.
//!
//! ```no_run
//! # async fn wiring(transport: std::sync::Arc<dyn eventos::Transport>) -> Result<(), Box<dyn std::error::Error>> {
//! use school_mailer::{Mailer, MailerConfig, SOURCE, default_backoff, route};
//!
//! let bus = eventos::Bus::new(transport.clone(), SOURCE);
//! let mailer = Mailer::open(MailerConfig::new("/var/lib/school"), bus).await?;
//! let relay = mailer.relay(transport.clone());
//! tokio::spawn(relay.run(eventos::shutdown_signal()));
//! eventos::Router::new(transport)
//!     .route(route(mailer, default_backoff()))
//!     .run(eventos::shutdown_signal())
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # The decisions that shaped it
//!
//! * **SMTP when configured, `.eml` files otherwise.** With an SMTP URL
//!   ([`MailerConfig::smtp_url`]) mail goes out through lettre (rustls for
//!   TLS, no OpenSSL to install). Without one — the embedded default — each
//!   mail is written as an RFC 5322 file `<data-dir>/mail/<mail_id>.eml`
//!   (temporary file, fsync, rename: a reader never sees half a mail), so
//!   the whole system runs with nothing installed and the mail can still be
//!   read.
//! * **The server's answer decides retry or give up.** A 4xx answer is
//!   transient and retried; a 5xx answer is permanent and dead-lettered on
//!   that attempt; no answer at all (connection refused, timeout, TLS, I/O)
//!   is transient — lettre reports a refused connection as neither 4xx nor
//!   5xx, and a server that is down now may be up soon. A request that can
//!   never be sent (a bad address or mail id) is permanent, and so is a
//!   refusal of the mail's form (`5.6.7`, `SMTPUTF8`, `8BITMIME`, from the
//!   server or from lettre before sending), whatever its code.
//! * **Addresses are parsed as the forms parse them** (`school_http::EmailAddress`):
//!   a bare `local@domain`, the domain in punycode, so nothing sent needs
//!   SMTPUTF8. Every header value loses its control characters, not only CR
//!   and LF; the body keeps line breaks and tabs only.
//! * **Retries follow [`default_backoff`]:** exponential with full jitter,
//!   base 1 s, cap 2 h, 40 attempts, so a mail that keeps being refused is
//!   given up about a day after its first try. Retries are stored by the
//!   transport, not slept. Each attempt is limited to
//!   [`MailerConfig::attempt_timeout`] (25 s), below the
//!   embedded log's 30 s visibility timeout, so a hung server never gets a
//!   mail handed to two consumers at once.
//! * **Each mail is sent once as far as the mailer can tell.** Its own
//!   database (`<data-dir>/mailer.db`) has an inbox keyed by `mail_id`
//!   (not by event id: two requests for one mail are one mail) and a table
//!   of sent mail. A mail already sent is acknowledged without sending;
//!   deliveries of one `mail_id` take turns in the process. A success is
//!   recorded in **one transaction**: the sent row, the inbox row and the
//!   `EmailSent` outbox row.
//! * **The one duplicate that cannot be ruled out:** a crash, timeout or
//!   database failure after the SMTP server accepted a mail and before that
//!   transaction commits makes the retry send it again. SMTP cannot be asked
//!   whether it already took a message, so delivery stays at-least-once;
//!   the repeated mail carries the same `Message-ID: <mail_id@eventos>`.
//! * **A server that is down pauses the route.** No answer at all, or
//!   `421`, is [unavailable](eventos::HandlerError::unavailable): after five
//!   in a row the route's circuit breaker ([`default_breaker`]) stops
//!   taking mail and checks the server (connect, `NOOP`) after 1 s, 2 s, …
//!   up to every minute; the first answer resumes it. Queued mail keeps its
//!   attempts however long the outage, so an outage of hours makes no one
//!   hear that their message failed.
//! * **Every failed try is an event too.** A transient failure that will be
//!   retried enqueues [`EmailDeferred`](school_events::EmailDeferred) on
//!   [`topics::MAIL_DEFERRED`] (the attempt and the error), so a timeline
//!   shows each try and the growing pauses between them.
//! * **Giving up is an event.** A dead-letter hook ([`Mailer::on_dead_letter`])
//!   enqueues `EmailFailed` (the reason, the last error, the attempts) in
//!   one transaction, once per mail; if the database fails the hook fails,
//!   and the router retries the delivery so the reaction is not lost.
//! * **Bodies are not logged.** Logs name the mail id, what it is about,
//!   its purpose and the attempt — never the body (the sender's own words).
//!   Card numbers never reach a mail request in the first place.
//!
//! No feature flags.

mod compose;
mod config;
mod error;
mod mailer;
mod outbound;

use std::time::Duration;

use eventos::middleware::DeadLettered;
use eventos::{Backoff, HandlerError, Message, Route, typed};
use school_events::{EmailRequested, topics};

pub use config::{DEFAULT_FROM, MailerConfig, default_breaker};
pub use error::{MailerError, SmtpError};
pub use mailer::{Delivered, Mailer, Reported};

/// The consumer group of the mailer on [`topics::MAIL_REQUESTS`]; also its
/// inbox consumer name.
pub const GROUP: &str = "mailer";

/// The CloudEvents `source` for the mailer's events.
pub const SOURCE: &str = "/school/mailer";

/// The mailer's retry policy: exponential backoff with full jitter, base
/// 1 s, cap 2 h, 40 attempts in all (the first included). The ceilings add
/// up to 54 h and the jitter draws each pause below its ceiling, so a mail
/// that keeps failing is given up about a day after its first try (27 h on
/// average). An outage of the server itself does not spend these attempts:
/// the route's circuit breaker pauses it ([`default_breaker`]).
pub fn default_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(2 * 3600), 40)
}

/// The route that consumes [`topics::MAIL_REQUESTS`] as group [`GROUP`]:
/// [`Mailer::deliver`] for each request, retried per `policy` (usually
/// [`default_backoff`]), each attempt limited to the configured
/// [`attempt_timeout`](MailerConfig::attempt_timeout),
/// [`Mailer::on_dead_letter`] as the dead-letter hook, and the configured
/// [circuit breaker](MailerConfig::circuit_breaker) probing with
/// [`Mailer::reachable`].
pub fn route(mailer: Mailer, policy: Backoff) -> Route {
    let attempt_timeout = mailer.config().attempt_timeout;
    let prober = mailer.clone();
    let breaker = mailer.config().breaker.clone().probe(move || {
        let mailer = prober.clone();
        async move { mailer.reachable().await }
    });
    let max_attempts = policy.max_attempts();
    let ceiling = policy;
    let hook = mailer.clone();
    Route::new(
        topics::MAIL_REQUESTS,
        GROUP,
        typed(move |request: EmailRequested, msg: Message| {
            let mailer = mailer.clone();
            async move {
                let attempt = msg.attempt();
                match mailer.deliver(&request, attempt).await {
                    Ok(_) => Ok::<(), HandlerError>(()),
                    Err(e) => {
                        mailer.note_failure(&request.mail_id, &e);
                        // The last attempt is reported by the dead-letter
                        // hook as `EmailFailed`, not as deferred.
                        if e.is_transient() && attempt < max_attempts {
                            mailer
                                .defer(&request, attempt, &e, ceiling.ceiling(attempt))
                                .await;
                        }
                        Err(e.into())
                    }
                }
            }
        }),
    )
    .retry(policy)
    // Enough mail in flight for the mail files' and the store's rounds to
    // fill; few enough that an SMTP server sees a bounded number of
    // connections (one per mail).
    .concurrency(64)
    .timeout(attempt_timeout)
    .circuit_breaker(breaker)
    .on_dead_letter(move |failed: DeadLettered| {
        let mailer = hook.clone();
        async move {
            mailer
                .on_dead_letter(&failed)
                .await
                .map(drop)
                // Whatever the cause, a failed reaction is retried: the
                // person concerned must hear of the failure.
                .map_err(HandlerError::transient)
        }
    })
}
