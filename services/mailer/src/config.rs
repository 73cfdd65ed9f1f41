//! How the mailer is configured.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `From` of every mail unless configured otherwise.
pub const DEFAULT_FROM: &str = "Eventos School <no-reply@school.example>";

/// How the mailer runs. [`MailerConfig::new`] has the defaults; the other
/// methods change one knob each.
///
/// ```
/// use std::time::Duration;
/// use school_mailer::MailerConfig;
///
/// let config = MailerConfig::new("/var/lib/school")
///     .smtp_url("smtps://mailer:secret@smtp.school.example")
///     .from_address("School office <office@school.example>")
///     .smtp_timeout(Duration::from_secs(5));
/// assert_eq!(config.mail_dir(), None); // SMTP is configured: no .eml files
/// // The password never shows in logs or debug output.
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone)]
pub struct MailerConfig {
    pub(crate) data_dir: PathBuf,
    pub(crate) smtp_url: Option<String>,
    pub(crate) from: String,
    pub(crate) smtp_timeout: Duration,
    pub(crate) attempt_timeout: Duration,
    pub(crate) breaker: eventos::middleware::Breaker,
}

impl std::fmt::Debug for MailerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailerConfig")
            .field("data_dir", &self.data_dir)
            .field("smtp", &self.smtp_url.as_deref().map(redact_url))
            .field("from", &self.from)
            .field("smtp_timeout", &self.smtp_timeout)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl MailerConfig {
    /// Defaults: no SMTP server (mail is written as `.eml` files into
    /// `<data_dir>/mail/`), `From:` [`DEFAULT_FROM`], a 10 s SMTP timeout
    /// and a 25 s limit per attempt.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            smtp_url: None,
            from: DEFAULT_FROM.to_owned(),
            smtp_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(25),
            breaker: default_breaker(),
        }
    }

    /// Sends through the SMTP server at `url`, as lettre reads it:
    /// `smtp://host:port` (plain), `smtp://host:587?tls=required`
    /// (STARTTLS), `smtps://host` (TLS from the start); credentials as
    /// `smtps://user:password@host`.
    #[must_use]
    pub fn smtp_url(mut self, url: impl Into<String>) -> Self {
        self.smtp_url = Some(url.into());
        self
    }

    /// The `From` mailbox, e.g. `School office <office@school.example>`.
    #[must_use]
    pub fn from_address(mut self, mailbox: impl Into<String>) -> Self {
        self.from = mailbox.into();
        self
    }

    /// How long one SMTP operation (connect, a command, TLS) may take.
    #[must_use]
    pub fn smtp_timeout(mut self, timeout: Duration) -> Self {
        self.smtp_timeout = timeout;
        self
    }

    /// How long one delivery attempt may take in all; a slower one fails
    /// transiently and is retried. Keep it below the transport's
    /// visibility timeout (30 s on the embedded log), or a slow attempt is
    /// handed to a second consumer while it still runs.
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// When the route pauses because the SMTP server is down for every
    /// mail, and how often it checks whether the server is back (see
    /// [`default_breaker`]). The probe is the mailer's own check (connect
    /// and `NOOP`), so no mail spends an attempt while the server is down.
    #[must_use]
    pub fn circuit_breaker(mut self, breaker: eventos::middleware::Breaker) -> Self {
        self.breaker = breaker;
        self
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The mailer's database: `<data_dir>/mailer.db`.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("mailer.db")
    }

    /// Where mail is written when no SMTP server is configured:
    /// `<data_dir>/mail/`; `None` when one is.
    pub fn mail_dir(&self) -> Option<PathBuf> {
        self.smtp_url.is_none().then(|| self.data_dir.join("mail"))
    }

    /// The SMTP server without credentials or parameters (for logs), if
    /// one is configured.
    pub fn smtp_server(&self) -> Option<String> {
        self.smtp_url.as_deref().map(redact_url)
    }
}

/// `scheme://host:port` of an SMTP URL: no user, password or query, so it
/// can be logged.
/// The mailer's circuit breaker: 5 mails in a row that find the server
/// unreachable pause the route; it checks the server after 1 s, then 2, 4,
/// … up to every 60 s, and resumes on the first answer.
pub fn default_breaker() -> eventos::middleware::Breaker {
    eventos::middleware::Breaker::default()
        .failures_to_open(5)
        .pauses(Duration::from_secs(1), Duration::from_secs(60))
}

pub(crate) use eventos::redact_url;
