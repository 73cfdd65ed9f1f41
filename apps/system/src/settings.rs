//! The settings file: every knob of the system in one TOML file, each
//! overridable by an `EVENTOS_*` environment variable.
//!
//! Precedence, lowest first: built-in defaults, the file, environment
//! variables, command-line flags. Top-level keys map to `EVENTOS_<KEY>`
//! (read by the command line, e.g. `EVENTOS_DATA_DIR`); keys in a section
//! map to `EVENTOS_<SECTION>__<KEY>` (e.g.
//! `EVENTOS_ANTIFRAUD__SCORE_THRESHOLD=80`). Unknown keys are errors that
//! name the key, so a typo cannot silently leave a default in place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::SystemConfig;

/// The mailer's retry policy (`[mail]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailSettings {
    /// Where contact-form messages are mailed.
    pub school_inbox: String,
    /// Upper bound of the first retry's delay, ms.
    pub retry_base_ms: u64,
    /// Cap of any retry's delay, ms.
    pub retry_cap_ms: u64,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Mails in a row that find the SMTP server unreachable before the
    /// mailer pauses and checks the server instead of trying mail.
    pub breaker_failures: u32,
    /// The first check of a paused mailer, ms after it paused.
    pub breaker_first_pause_ms: u64,
    /// The longest pause between checks, ms.
    pub breaker_max_pause_ms: u64,
    /// How long after a contact message is accepted its sender is told it
    /// has not gone out yet (once), ms.
    pub still_trying_after_ms: u64,
}

impl Default for MailSettings {
    fn default() -> Self {
        let retry = school_mailer::default_backoff();
        let breaker = school_mailer::default_breaker();
        let contact = school_contact::ContactConfig::default();
        Self {
            school_inbox: contact.school_inbox,
            retry_base_ms: millis(retry.base),
            retry_cap_ms: millis(retry.cap),
            max_attempts: retry.max_attempts,
            breaker_failures: breaker.threshold(),
            breaker_first_pause_ms: millis(breaker.first_pause()),
            breaker_max_pause_ms: millis(breaker.max_pause()),
            still_trying_after_ms: millis(contact.still_trying_after),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The HTTP edge (`[http]`): timeouts and limits every connection and
/// request meets before a service sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// A request's headers must have arrived this long after the
    /// connection opened or answered its previous request, ms. One timer
    /// in hyper, so it is also the idle (keep-alive) timeout.
    pub header_timeout_ms: u64,
    /// The longest pause while a request body arrives, ms (answered 408).
    pub body_timeout_ms: u64,
    /// How long a request may take from its headers to its answer, body
    /// included, ms (answered 503). An event stream counts until its
    /// answer starts, not while it streams.
    pub request_timeout_ms: u64,
    /// Connections open at once; one more is answered 503 and closed.
    /// Keep it well under the process's open-file limit (`ulimit -n`).
    pub max_connections: usize,
    /// Requests being answered at once; one more is answered 503.
    pub max_requests: usize,
    /// Event streams one client (remote IP address) may hold open; one
    /// more is answered 429.
    pub sse_per_client: usize,
    /// Event streams all clients together may hold open; one more is
    /// answered 503. Each holds a connection, so keep it under
    /// `max_connections`.
    pub sse_max_streams: usize,
    /// How long an event stream may stay silent before a ping, ms; a
    /// client that has gone is found at the ping and its stream ended.
    pub sse_keep_alive_ms: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        let sse = school_http::SseLimits::default();
        Self {
            header_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            max_connections: 512,
            max_requests: 256,
            sse_per_client: sse.per_client,
            sse_max_streams: sse.total,
            sse_keep_alive_ms: millis(sse.keep_alive),
        }
    }
}

impl HttpSettings {
    /// The limits of the event streams.
    pub fn sse_limits(&self) -> school_http::SseLimits {
        school_http::SseLimits {
            per_client: self.sse_per_client,
            total: self.sse_max_streams,
            keep_alive: Duration::from_millis(self.sse_keep_alive_ms),
        }
    }
}

/// Who may read notifications (`[notifications]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationSettings {
    /// The key of notifications tokens, 64 hex digits. Without one, a key
    /// is generated on first run and kept in the data directory; processes
    /// that split the contact or enrollment service from the notifier must
    /// be given the same key here.
    pub token_key: Option<String>,
}

/// Everything `eventos up` can be told.
///
/// Unknown keys are errors, checked by hand: a transport's section
/// (`[amqp]`) belongs to the transport, which reads it, so the settings
/// keep every table they do not know and ask the registry whose it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Where the databases, the log and the mail files live.
    pub data_dir: PathBuf,
    /// The HTTP address.
    pub listen: SocketAddr,
    /// The transport: `log` (durable, the default), `log:<dir>` or a
    /// directory path, `memory`, or a broker URL (`amqp://…`).
    pub transport: String,
    /// SMTP server URL; without one, mail is written as `.eml` files.
    pub smtp: Option<String>,
    /// How long in-flight work may take to finish on shutdown, seconds.
    pub shutdown_timeout_secs: u64,
    /// How long, once shutdown starts, HTTP keeps being served while
    /// `/readyz` answers 503, ms; set it to the load balancer's check
    /// interval so it stops routing here first.
    pub shutdown_grace_ms: u64,
    /// The HTTP edge.
    pub http: HttpSettings,
    /// The mailer.
    pub mail: MailSettings,
    /// Who may read notifications.
    pub notifications: NotificationSettings,
    /// The enrollment service.
    pub enrollment: school_enrollment::EnrollmentConfig,
    /// The anti-fraud service.
    pub antifraud: school_antifraud::AntifraudConfig,
    /// The billing service and its simulated gateway.
    pub billing: school_billing::BillingConfig,
    /// Every other key: the transports' sections (`[amqp]`), read by
    /// their transport; anything else is refused by [`Settings::load`].
    #[serde(flatten)]
    pub transports: BTreeMap<String, serde_json::Value>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("eventos-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            transport: "log".into(),
            smtp: None,
            shutdown_timeout_secs: 10,
            shutdown_grace_ms: 0,
            http: HttpSettings::default(),
            mail: MailSettings::default(),
            notifications: NotificationSettings::default(),
            enrollment: school_enrollment::EnrollmentConfig::default(),
            antifraud: school_antifraud::AntifraudConfig::default(),
            billing: school_billing::BillingConfig::default(),
            transports: BTreeMap::new(),
        }
    }
}

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(String);

impl Settings {
    /// Defaults, then `file` (if given), then `EVENTOS_<SECTION>__<KEY>`
    /// variables from `env` (pass `std::env::vars()`).
    ///
    /// # Errors
    ///
    /// A missing or unreadable file, bad TOML, an unknown key or a value of
    /// the wrong type — the message names the file or variable and the key.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SettingsError(format!(
                    "config file {} does not exist; check the path given to --config",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only sectioned keys: the top-level ones are the command line's
        // (and EVENTOS_* is shared with unrelated variables).
        let nested: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("EVENTOS_") && k.contains("__"))
            .collect();
        for (key, value) in nested {
            let path = key["EVENTOS_".len()..]
                .to_ascii_lowercase()
                .replace("__", ".");
            let parsed: figment::value::Value = value
                .parse()
                .unwrap_or_else(|_| figment::value::Value::from(value.clone()));
            figment = figment.merge(Serialized::global(&path, parsed));
        }
        let settings: Self = figment.extract().map_err(|e| SettingsError(one_line(&e)))?;
        settings.check_transports(&crate::transports())?;
        Ok(settings)
    }

    /// The transport URL names a known transport, and every key left over
    /// is the section of one, with options it accepts.
    fn check_transports(&self, registry: &eventos_kit::Registry) -> Result<(), SettingsError> {
        registry
            .lookup(&self.transport)
            .map_err(|e| SettingsError(format!("invalid settings: `transport`: {e}")))?;
        for (key, value) in &self.transports {
            let Some(engine) = registry.by_section(key) else {
                let sections: Vec<&str> = registry.sections().collect();
                return Err(SettingsError(format!(
                    "invalid settings: unknown key `{key}`; the transports' sections are {}",
                    sections.join(", ")
                )));
            };
            engine
                .check_options(value)
                .map_err(|e| SettingsError(format!("invalid settings: {e}")))?;
        }
        Ok(())
    }

    /// The runtime configuration these settings describe.
    pub fn into_config(self) -> SystemConfig {
        let mut config = SystemConfig::new(&self.data_dir);
        config.listen = self.listen;
        config.transport = self.transport;
        config.smtp = self.smtp;
        config.school_inbox = self.mail.school_inbox;
        config.shutdown_timeout = Duration::from_secs(self.shutdown_timeout_secs);
        config.shutdown_grace = Duration::from_millis(self.shutdown_grace_ms);
        config.mail_retry = eventos::Backoff::new(
            Duration::from_millis(self.mail.retry_base_ms),
            Duration::from_millis(self.mail.retry_cap_ms),
            self.mail.max_attempts,
        );
        config.mail_breaker = eventos::middleware::Breaker::default()
            .failures_to_open(self.mail.breaker_failures)
            .pauses(
                Duration::from_millis(self.mail.breaker_first_pause_ms),
                Duration::from_millis(self.mail.breaker_max_pause_ms),
            );
        config.still_trying_after = Duration::from_millis(self.mail.still_trying_after_ms);
        config.transport_options = self.transports;
        config.http = self.http;
        config.notifications_key = self.notifications.token_key;
        config.enrollment = self.enrollment;
        config.antifraud = self.antifraud;
        config.billing = self.billing;
        config
    }
}

fn one_line(e: &figment::Error) -> String {
    let mut out = Vec::new();
    for e in e.clone() {
        let mut line = String::new();
        if !e.path.is_empty() {
            line.push_str(&format!("`{}`: ", e.path.join(".")));
        }
        line.push_str(&e.kind.to_string());
        if let Some(source) = e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
            line.push_str(&format!(" (in {source})"));
        } else if let Some(m) = &e.metadata {
            line.push_str(&format!(" (from {})", m.name));
        }
        out.push(line);
    }
    format!("invalid settings: {}", out.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eventos.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let (_d, path) = file(
            "listen = \"127.0.0.1:9000\"\ntransport = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n[enrollment]\nmode = \"optimistic\"\n[antifraud]\nscore_threshold = 50\n",
        );
        let env = [
            ("EVENTOS_ANTIFRAUD__SCORE_THRESHOLD".into(), "90".into()),
            ("EVENTOS_MAIL__MAX_ATTEMPTS".into(), "3".into()),
            // Unrelated variables with the prefix are not settings.
            ("EVENTOS_CI".into(), "1".into()),
        ];
        let s = Settings::load(Some(&path), env).unwrap();
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.transport, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.enrollment.mode, school_events::AcceptanceMode::Optimistic);
        assert_eq!(s.antifraud.score_threshold, 90);
        assert_eq!(s.mail.max_attempts, 3);
        assert_eq!(s.data_dir, PathBuf::from("eventos-data"));
        assert_eq!(s.into_config().mail_retry.max_attempts(), 3);
    }

    #[test]
    fn mistakes_are_named() {
        let (_d, path) = file("[antifraud]\nscore_treshold = 50\n");
        let e = Settings::load(Some(&path), []).unwrap_err().to_string();
        assert!(
            e.contains("score_treshold") && e.contains("eventos.toml"),
            "{e}"
        );
        let (_d, path) = file("transport = \"foo://x\"\n");
        let e = Settings::load(Some(&path), []).unwrap_err().to_string();
        assert!(
            e.contains("foo://x") && e.contains("amqp") && e.contains("memory"),
            "{e}"
        );
        // A transport's section is the transport's to check.
        let (_d, path) = file("[amqp]\nnamespac = \"x\"\n");
        let e = Settings::load(Some(&path), []).unwrap_err().to_string();
        assert!(e.contains("[amqp]") && e.contains("namespac"), "{e}");
        let e = Settings::load(None, [("EVENTOS_AMQP__QUEUE_TYPE".into(), "fancy".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("fancy"), "{e}");
        // Neither a section of anyone nor a key of the settings.
        let (_d, path) = file("listn = \"127.0.0.1:1\"\n");
        let e = Settings::load(Some(&path), []).unwrap_err().to_string();
        assert!(e.contains("unknown key `listn`"), "{e}");
        let (_d, path) = file("[enrollment]\nmode = \"sometimes\"\n");
        let e = Settings::load(Some(&path), []).unwrap_err().to_string();
        assert!(e.contains("mode") && e.contains("sometimes"), "{e}");
        let e = Settings::load(Some(Path::new("/nope/eventos.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = Settings::load(
            None,
            [("EVENTOS_BILLING__MAX_ATTEMPTS".into(), "many".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_attempts"), "{e}");
    }
}
