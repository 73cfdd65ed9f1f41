//! What can go wrong, and whether retrying can help.

use std::path::PathBuf;

use eventos::{ErrorKind, EventError, HandlerError};
use eventos_outbox::OutboxError;

/// An SMTP client error (lettre's).
pub type SmtpError = lettre::transport::smtp::Error;

/// Why a mail was not sent, or the mailer could not start.
///
/// [`MailerError::kind`] says whether retrying can help; converting into a
/// [`HandlerError`] keeps that, so the router retries or dead-letters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailerError {
    /// The configuration is unusable (bad `From`, bad SMTP URL).
    #[error("invalid mailer configuration: {0}")]
    Config(String),
    /// The data directory cannot be created.
    #[error("cannot create the mailer data directory {path}: {source}; check its permissions")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The request itself is unsendable (bad address, bad mail id).
    /// Permanent: the same request will never be sendable.
    #[error("mail {mail_id} cannot be sent: {reason}")]
    InvalidMail {
        /// The mail.
        mail_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The SMTP server answered 4xx: it may take the mail later.
    #[error("smtp server {server} refused mail {mail_id} for now: {source}")]
    SmtpTransient {
        /// The server, without credentials.
        server: String,
        /// The mail.
        mail_id: String,
        /// lettre's error, with the server's answer.
        #[source]
        source: SmtpError,
    },
    /// The SMTP server answered 5xx: it will not take this mail.
    #[error("smtp server {server} refused mail {mail_id}: {source}")]
    SmtpPermanent {
        /// The server, without credentials.
        server: String,
        /// The mail.
        mail_id: String,
        /// lettre's error, with the server's answer.
        #[source]
        source: SmtpError,
    },
    /// No answer at all: connection refused, timeout, TLS or I/O failure.
    /// Transient: the server may be back later.
    #[error(
        "cannot send mail {mail_id} through {server}: {source}; check that the smtp server is up and reachable"
    )]
    SmtpUnreachable {
        /// The server, without credentials.
        server: String,
        /// The mail.
        mail_id: String,
        /// lettre's error.
        #[source]
        source: SmtpError,
    },
    /// Writing the `.eml` file failed.
    #[error("cannot write mail {mail_id} to {path}: {source}")]
    File {
        /// The mail.
        mail_id: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The mailer's database failed.
    #[error("mailer database: {0}")]
    Store(#[from] OutboxError),
    /// An event the mailer emits could not be encoded.
    #[error("cannot encode an event: {0}")]
    Event(#[from] EventError),
}

impl MailerError {
    /// Whether retrying can help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MailerError::Config(_)
            | MailerError::InvalidMail { .. }
            | MailerError::SmtpPermanent { .. }
            | MailerError::Event(_) => ErrorKind::Permanent,
            // No answer, or "421 service not available": the server is
            // down for every mail, not refusing this one; the route's
            // circuit breaker pauses on it.
            MailerError::SmtpUnreachable { .. } => ErrorKind::Unavailable,
            MailerError::SmtpTransient { source, .. } if is_421(source) => ErrorKind::Unavailable,
            // A file system or database failure (disk full, locked, a
            // storage hiccup) may well pass: retry rather than lose mail.
            MailerError::DataDir { .. }
            | MailerError::SmtpTransient { .. }
            | MailerError::File { .. }
            | MailerError::Store(_) => ErrorKind::Transient,
        }
    }

    /// What the person concerned is told about this failure: a plain
    /// sentence without the server's address, a file path or the server's
    /// own words, which are for the log (this error's `Display`).
    pub fn public_reason(&self) -> &'static str {
        match self {
            MailerError::SmtpUnreachable { .. } => "the school's mail server did not answer",
            MailerError::SmtpTransient { source, .. } if is_421(source) => {
                "the school's mail server did not answer"
            }
            MailerError::SmtpTransient { .. } => {
                "the school's mail server asked us to try again later"
            }
            MailerError::SmtpPermanent { .. } => "the mail server refused the message",
            MailerError::InvalidMail { .. } => "the message cannot be sent to this address",
            MailerError::Config(_) => "the school's mail service is not set up right",
            MailerError::DataDir { .. }
            | MailerError::File { .. }
            | MailerError::Store(_)
            | MailerError::Event(_) => "the school's mail service had an internal problem",
        }
    }

    /// Whether retrying can help.
    pub fn is_transient(&self) -> bool {
        self.kind() != ErrorKind::Permanent
    }

    /// Classifies lettre's error for `mail_id`: 4xx transient, 5xx
    /// permanent, anything else (no answer) unreachable, hence transient —
    /// lettre reports a refused connection as neither 4xx nor 5xx.
    ///
    /// A refusal of the mail's *form* is permanent whatever its code: the
    /// server (RFC 6531's `5.6.7`, or any answer naming `SMTPUTF8`) or
    /// lettre itself, before sending, saying that the server lacks
    /// `SMTPUTF8` or `8BITMIME`. The same mail to the same server will be
    /// refused again, so retrying only delays the failure notice.
    pub(crate) fn smtp(server: &str, mail_id: &str, source: SmtpError) -> Self {
        let (server, mail_id) = (server.to_owned(), mail_id.to_owned());
        if source.is_permanent() || refuses_the_form(&source) {
            MailerError::SmtpPermanent {
                server,
                mail_id,
                source,
            }
        } else if source.is_transient() {
            MailerError::SmtpTransient {
                server,
                mail_id,
                source,
            }
        } else {
            MailerError::SmtpUnreachable {
                server,
                mail_id,
                source,
            }
        }
    }
}

/// "421 Service not available, closing transmission channel" (RFC 5321).
fn is_421(e: &SmtpError) -> bool {
    e.status().is_some_and(|code| code.to_string() == "421")
}

/// Whether `e` (with its sources) refuses the mail for needing an
/// extension the server does not have.
fn refuses_the_form(e: &SmtpError) -> bool {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    let text = text.to_ascii_uppercase();
    ["SMTPUTF8", "5.6.7", "8BITMIME"]
        .iter()
        .any(|needle| text.contains(needle))
}

impl From<MailerError> for HandlerError {
    fn from(e: MailerError) -> Self {
        HandlerError::new(e.kind(), e)
    }
}
