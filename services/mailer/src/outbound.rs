//! Where composed mail goes: an SMTP server, or `.eml` files.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};

use crate::MailerError;
use crate::config::MailerConfig;

/// How mail leaves the mailer.
pub(crate) enum Outbound {
    /// Through an SMTP server; a connection per mail (no pool: mail is
    /// infrequent here, and a pooled connection that died with its server
    /// would only add a failed attempt after the server comes back).
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        /// `scheme://host:port`, for errors and logs.
        server: String,
    },
    /// As `<mail_id>.eml` files in a directory.
    Files { dir: PathBuf },
}

impl Outbound {
    /// The outbound the configuration asks for; creates the mail directory
    /// in file mode.
    pub(crate) fn from_config(config: &MailerConfig) -> Result<Self, MailerError> {
        match &config.smtp_url {
            Some(url) => {
                let server = crate::config::redact_url(url);
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| {
                        MailerError::Config(format!(
                            "smtp url {server} is not usable ({e}); write it as smtp://host:port, \
                             smtp://host:587?tls=required or smtps://user:password@host"
                        ))
                    })?
                    .timeout(Some(config.smtp_timeout))
                    .build();
                Ok(Outbound::Smtp { transport, server })
            }
            None => {
                let dir = config.data_dir.join("mail");
                fs::create_dir_all(&dir)
                    .and_then(|()| owner_only_dir(&dir))
                    .map_err(|source| MailerError::DataDir {
                        path: dir.clone(),
                        source,
                    })?;
                Ok(Outbound::Files { dir })
            }
        }
    }

    /// `smtp` or `file`, as recorded with a sent mail.
    pub(crate) fn via(&self) -> &'static str {
        match self {
            Outbound::Smtp { .. } => "smtp",
            Outbound::Files { .. } => "file",
        }
    }

    /// Sends `message`.
    /// Whether mail can go out now: the SMTP server accepts a connection
    /// and answers `NOOP`; files can always be written to.
    pub(crate) async fn reachable(&self) -> bool {
        match self {
            Outbound::Smtp { transport, server } => match transport.test_connection().await {
                Ok(answered) => answered,
                Err(e) => {
                    tracing::debug!(%server, error = %e, "smtp server still unreachable");
                    false
                }
            },
            Outbound::Files { .. } => true,
        }
    }

    pub(crate) async fn send(&self, mail_id: &str, message: Message) -> Result<(), MailerError> {
        match self {
            Outbound::Smtp { transport, server } => transport
                .send(message)
                .await
                .map(drop)
                .map_err(|e| MailerError::smtp(server, mail_id, e)),
            Outbound::Files { dir } => {
                let path = dir.join(format!("{mail_id}.eml"));
                let bytes = message.formatted();
                let (dir, target) = (dir.clone(), path.clone());
                let written =
                    tokio::task::spawn_blocking(move || write_atomic(&dir, &target, &bytes))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                written.map_err(|source| MailerError::File {
                    mail_id: mail_id.to_owned(),
                    path,
                    source,
                })
            }
        }
    }
}

/// Makes `dir` owner-only (0700).
fn owner_only_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `target` so a reader sees all of it or nothing: into a
/// hidden temporary file, synced, renamed over `target`, and the directory
/// synced so the rename survives a crash.
fn write_atomic(dir: &Path, target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Hidden and not ending in `.eml`: nothing looking for mail picks it up.
    let tmp = dir.join(format!(".{name}.tmp"));
    // The mail holds a sender's words: owner-only, like every data file.
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, target)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use school_testkit::SmtpServer;

    use super::*;

    /// Regression: a mail the client refuses to send because the server
    /// lacks SMTPUTF8 was classified "unreachable" and retried for ever.
    /// `compose` no longer builds such a mail; a message built by hand still
    /// shows how one is classified. aiosmtpd, as the testkit runs it, does
    /// not offer SMTPUTF8.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_without_smtputf8_is_a_permanent_refusal() {
        let server = SmtpServer::start();
        let dir = tempfile::tempdir().unwrap();
        let config = MailerConfig::new(dir.path())
            .smtp_url(server.url())
            .smtp_timeout(Duration::from_secs(5));
        let outbound = Outbound::from_config(&config).unwrap();
        let message = Message::builder()
            .from("no-reply@school.example".parse().unwrap())
            .to("ü@exämple.de".parse().unwrap())
            .subject("utf-8 envelope")
            .body(String::from("hello"))
            .unwrap();
        let e = outbound.send("utf8-1", message).await.unwrap_err();
        assert!(matches!(e, MailerError::SmtpPermanent { .. }), "{e}");
        assert!(!e.is_transient(), "{e}");
        assert!(e.to_string().contains("SMTPUTF8"), "{e}");
    }
}
