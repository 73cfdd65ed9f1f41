//! The mailer: sends each requested mail once, records it, and says so.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use eventos::middleware::DeadLettered;
use eventos::{Bus, Publisher};
use eventos_outbox::rusqlite::{Connection, params};
use eventos_outbox::{KeyLocks, OutboxError, Relay, Store, enqueue};
use lettre::message::Mailbox;
use school_events::{EmailDeferred, EmailFailed, EmailRequested, EmailSent, topics};

use crate::compose::{compose, parse_from};
use crate::outbound::Outbound;
use crate::{GROUP, MailerConfig, MailerError};

/// The mailer's migrations (its sent-mail table), embedded.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The inbox consumer under which a mail's failure is recorded, so it is
/// reported once however often its dead letter is handled.
const FAILED_CONSUMER: &str = "mailer.failed";

/// Inbox consumer name under which deferred attempts are recorded, keyed
/// `<mail_id>#<attempt>`, so a redelivered attempt is reported once.
const DEFERRED_CONSUMER: &str = "mailer.deferred";

/// What [`Mailer::deliver`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The mail went out now; `EmailSent` is in the outbox.
    Sent,
    /// The mail had already been sent; nothing was done.
    AlreadySent,
}

/// What [`Mailer::on_dead_letter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// `EmailFailed` is in the outbox.
    Failed,
    /// This mail's failure had already been reported.
    AlreadyReported,
    /// The dead-lettered event is not an `EmailRequested` (its payload does
    /// not decode): there is nobody to tell.
    Undecodable,
}

/// Sends requested mail. Cloning shares it.
///
/// Open one with [`Mailer::open`], consume [`topics::MAIL_REQUESTS`] with
/// [`route`](crate::route), and run [`Mailer::relay`] so the events it
/// records (`EmailSent`, `EmailFailed`) are published.
#[derive(Clone)]
pub struct Mailer {
    inner: Arc<Inner>,
}

struct Inner {
    config: MailerConfig,
    from: Mailbox,
    outbound: Outbound,
    store: Store,
    bus: Bus,
    locks: KeyLocks,
    /// The public reason of each mail's last failure, for its
    /// `EmailFailed`: the dead-letter hook sees only the error's text,
    /// which names the server. Lost on a restart; then a generic sentence.
    last_failure: std::sync::Mutex<std::collections::HashMap<String, &'static str>>,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Mailer {
    /// Opens the mailer: checks the configuration, creates the data
    /// directory (and `mail/` in file mode), opens `mailer.db` and brings
    /// its schema up to date. `bus` stamps the events the mailer emits (its
    /// source names the mailer, e.g. [`SOURCE`](crate::SOURCE)); they are
    /// published by the [relay](Self::relay), not through the bus.
    ///
    /// # Errors
    ///
    /// [`MailerError::Config`] for a bad `From` or SMTP URL;
    /// [`MailerError::DataDir`] or [`MailerError::Store`] if the directory
    /// or database cannot be opened.
    pub async fn open(config: MailerConfig, bus: Bus) -> Result<Self, MailerError> {
        let from = parse_from(&config.from)?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| MailerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let outbound = Outbound::from_config(&config)?;
        let store = Store::open(&config.database_path()).await?;
        store.migrate(&MIGRATOR).await?;
        match config.smtp_server() {
            Some(server) => tracing::info!(%server, "mailer sends through smtp"),
            None => tracing::info!(
                dir = %config.data_dir.join("mail").display(),
                "no smtp server configured; mail is written as .eml files"
            ),
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                from,
                outbound,
                store,
                bus,
                locks: KeyLocks::default(),
                last_failure: std::sync::Mutex::default(),
            }),
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &MailerConfig {
        &self.inner.config
    }

    /// Its database (outbox, inbox, sent mail).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The relay that publishes the mailer's outbox through `publisher`;
    /// run it (`Relay::run`) beside the router.
    pub fn relay(&self, publisher: Arc<dyn Publisher>) -> Relay {
        Relay::new(self.inner.store.clone(), publisher)
    }

    /// Whether `mail_id` has been sent.
    ///
    /// # Errors
    ///
    /// [`MailerError::Store`].
    pub async fn is_sent(&self, mail_id: &str) -> Result<bool, MailerError> {
        // On the writer, between rounds: asked once per mail, right after
        // the write that could have recorded it, and a pooled read would
        // cost two trips to the driver's thread.
        let mail_id = mail_id.to_owned();
        let found = self
            .inner
            .store
            .read(move |c: &Connection| {
                c.prepare_cached("SELECT 1 FROM mailer_sent WHERE mail_id = ?")?
                    .exists([mail_id])
                    .map_err(eventos_outbox::OutboxError::from)
            })
            .await?;
        Ok(found)
    }

    /// Whether mail can go out now (the SMTP server answers, or mail is
    /// written to files): the circuit breaker's probe while the route is
    /// paused.
    pub async fn reachable(&self) -> bool {
        self.inner.outbound.reachable().await
    }

    /// Sends `request` unless its mail was already sent; `attempt` is the
    /// delivery attempt, reported in `EmailSent`.
    ///
    /// On success, one transaction records the mail as sent, marks
    /// `mail_id` handled in the inbox and enqueues `EmailSent` to
    /// [`topics::MAIL_SENT`]. Deliveries of one mail id take turns in this
    /// process, so a duplicate finds the first recorded and sends nothing.
    ///
    /// A crash (or a database failure) after the server accepted the mail
    /// and before that commit means the mail is sent again on the retry:
    /// SMTP has no way to ask "did you already take this?", so that window
    /// cannot be closed. Receivers can spot the duplicate by its
    /// `Message-ID`, which is the same every time.
    ///
    /// # Errors
    ///
    /// [`MailerError`]: permanent for an unsendable request or a 5xx
    /// answer, transient for a 4xx answer, no answer, or a local failure.
    pub async fn deliver(
        &self,
        request: &EmailRequested,
        attempt: u32,
    ) -> Result<Delivered, MailerError> {
        let inner = &*self.inner;
        let mail_id = request.mail_id.as_str();
        let _turn = inner.locks.lock(mail_id).await;
        if self.is_sent(mail_id).await? {
            tracing::debug!(mail_id, "mail already sent; nothing to do");
            return Ok(Delivered::AlreadySent);
        }
        let message = compose(request, &inner.from)?;
        if let Err(e) = inner.outbound.send(mail_id, message).await {
            tracing::info!(mail_id, attempt, error = %e, "mail not sent");
            return Err(e);
        }

        let sent = inner.bus.event(&EmailSent {
            mail_id: request.mail_id.clone(),
            about: request.about.clone(),
            attempt,
        })?;
        let (id, about, via) = (
            mail_id.to_owned(),
            request.about.clone(),
            inner.outbound.via(),
        );
        let recorded = inner
            .store
            .once(GROUP, id.clone(), move |tx: &Connection| {
                tx.prepare_cached(
                    "INSERT INTO mailer_sent (mail_id, about, attempt, via, sent_ms) VALUES (?, ?, ?, ?, ?)",
                )?
                .execute(params![id, about, attempt, via, now_ms()])?;
                enqueue(tx, topics::MAIL_SENT, &sent)?;
                Ok::<_, OutboxError>(())
            })
            .await?
            .is_some();
        if !recorded {
            // Recorded by another process between our check and now; the
            // mail went out twice (the edge described above). Its event is
            // already in the outbox.
            tracing::warn!(
                mail_id,
                "mail was sent by another mailer at the same time; recorded once"
            );
            return Ok(Delivered::AlreadySent);
        }
        // Never the body: it is the sender's words, not an operator's.
        tracing::info!(mail_id, about = %request.about, purpose = ?request.purpose, attempt, via = inner.outbound.via(), "mail sent");
        Ok(Delivered::Sent)
    }

    /// Records that `attempt` of a mail failed and will be retried:
    /// enqueues [`EmailDeferred`] (once per mail and attempt), so whoever
    /// follows the mail sees each try and the growing pauses between them.
    /// A failure to record is logged and otherwise ignored: the retry itself
    /// does not depend on it.
    pub async fn defer(
        &self,
        request: &EmailRequested,
        attempt: u32,
        error: &MailerError,
        retry_within: std::time::Duration,
    ) {
        let recorded = async {
            let event = self.inner.bus.event(&EmailDeferred {
                mail_id: request.mail_id.clone(),
                about: request.about.clone(),
                attempt,
                // Timelines show it; the detail is in the log.
                error: error.public_reason().to_owned(),
                retry_within_ms: u64::try_from(retry_within.as_millis()).unwrap_or(u64::MAX),
            })?;
            let key = format!("{}#{attempt}", request.mail_id);
            self.inner
                .store
                .once(DEFERRED_CONSUMER, key, move |tx: &Connection| {
                    enqueue(tx, topics::MAIL_DEFERRED, &event)?;
                    Ok::<_, OutboxError>(())
                })
                .await?;
            Ok::<(), MailerError>(())
        };
        if let Err(e) = recorded.await {
            tracing::warn!(mail_id = %request.mail_id, attempt, error = %e, "cannot record the deferred attempt");
        }
    }

    /// Remembers why `mail_id` failed last, for its `EmailFailed` should
    /// it be given up.
    pub fn note_failure(&self, mail_id: &str, error: &MailerError) {
        if let Ok(mut last) = self.inner.last_failure.lock() {
            last.insert(mail_id.to_owned(), error.public_reason());
        }
    }

    /// The reaction to a dead-lettered `EmailRequested`: in one
    /// transaction, records the failure in the inbox (so it is reported
    /// once) and enqueues `EmailFailed` to [`topics::MAIL_FAILURES`], with
    /// the reason and the number of attempts.
    ///
    /// # Errors
    ///
    /// [`MailerError::Store`] if the database fails; the router then
    /// retries the delivery, so the reaction is not lost.
    pub async fn on_dead_letter(&self, failed: &DeadLettered) -> Result<Reported, MailerError> {
        let request: EmailRequested = match failed.event.decode() {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(event = %failed.event.id(), error = %e, "dead-lettered mail request does not decode; nobody to tell");
                return Ok(Reported::Undecodable);
            }
        };
        let public = self
            .inner
            .last_failure
            .lock()
            .ok()
            .and_then(|last| last.get(&request.mail_id).copied())
            .unwrap_or("the mail could not be delivered");
        let attempts = failed.info.attempt;
        let event = self.inner.bus.event(&EmailFailed {
            mail_id: request.mail_id.clone(),
            purpose: request.purpose,
            about: request.about.clone(),
            requester_email: request.requester_email.clone(),
            subject: request.subject.clone(),
            // The student reads this; the error itself goes to the log.
            reason: format!(
                "{public}; given up after {attempts} attempt{}",
                if attempts == 1 { "" } else { "s" }
            ),
            attempts,
        })?;
        let id = request.mail_id.clone();
        let first = self
            .inner
            .store
            .once(FAILED_CONSUMER, id, move |tx: &Connection| {
                enqueue(tx, topics::MAIL_FAILURES, &event)?;
                Ok::<_, OutboxError>(())
            })
            .await?
            .is_some();
        if !first {
            return Ok(Reported::AlreadyReported);
        }
        if let Ok(mut last) = self.inner.last_failure.lock() {
            last.remove(&request.mail_id);
        }
        tracing::warn!(
            mail_id = %request.mail_id,
            about = %request.about,
            attempts = failed.info.attempt,
            reason = %failed.reason,
            error = %failed.error,
            "mail given up; email_failed emitted"
        );
        Ok(Reported::Failed)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
