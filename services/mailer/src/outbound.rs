//! Where composed mail goes: an SMTP server, or `.eml` files.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};

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
    Files { dir: PathBuf, files: MailDrop },
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
                let files =
                    MailDrop::start(dir.clone()).map_err(|source| MailerError::DataDir {
                        path: dir.clone(),
                        source,
                    })?;
                Ok(Outbound::Files { dir, files })
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
            Outbound::Files { dir, files } => {
                let path = dir.join(format!("{mail_id}.eml"));
                let written = files.write(path.clone(), message.formatted()).await;
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

/// Mail files per round at most.
const DROP_ROUND_MAX: usize = 256;

type MailFile = (PathBuf, Vec<u8>, oneshot::Sender<std::io::Result<()>>);

/// Writes `.eml` files so a reader sees each whole or not at all, and a
/// file once written survives a crash — with two syncs per round of
/// files, not two per file. Each file is written under a hidden
/// temporary name; then one `syncfs` makes every file of the round
/// durable, each is renamed to its `.eml` name, and one sync of the
/// directory makes the renames durable. Under load a round carries every
/// mail that arrived while the last one synced.
#[derive(Debug, Clone)]
pub(crate) struct MailDrop {
    files: mpsc::UnboundedSender<MailFile>,
}

impl MailDrop {
    fn start(dir: PathBuf) -> std::io::Result<Self> {
        let (files, mut queue) = mpsc::unbounded_channel::<MailFile>();
        std::thread::Builder::new()
            .name("mail-drop".into())
            .spawn(move || {
                let mut round = Vec::with_capacity(DROP_ROUND_MAX);
                while queue
                    .blocking_recv()
                    .map(|first| round.push(first))
                    .is_some()
                {
                    while round.len() < DROP_ROUND_MAX {
                        match queue.try_recv() {
                            Ok(next) => round.push(next),
                            Err(_) => break,
                        }
                    }
                    write_round(&dir, &mut round);
                }
            })?;
        Ok(Self { files })
    }

    /// Writes `bytes` to `target`; returns once the file is durable.
    async fn write(&self, target: PathBuf, bytes: Vec<u8>) -> std::io::Result<()> {
        let (done, written) = oneshot::channel();
        self.files
            .send((target, bytes, done))
            .map_err(|_| std::io::Error::other("the mail writer has stopped"))?;
        written
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the mail writer has stopped")))
    }
}

/// One round of [`MailDrop`]: answers every file in `round`.
fn write_round(dir: &Path, round: &mut Vec<MailFile>) {
    let mut staged = Vec::with_capacity(round.len());
    for (target, bytes, done) in round.drain(..) {
        let tmp = temporary(dir, &target);
        match write_file(&tmp, &bytes) {
            Ok(()) => staged.push((tmp, target, done)),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                let _ = done.send(Err(e));
            }
        }
    }
    if staged.is_empty() {
        return;
    }
    // One sync for every file of the round: syncfs flushes the whole
    // filesystem the directory is on, so each file's data is on disk
    // before any rename makes it visible.
    let synced = fs::File::open(dir).and_then(|d| rustix::fs::syncfs(&d).map_err(Into::into));
    if let Err(e) = synced {
        for (tmp, _, done) in staged {
            let _ = fs::remove_file(&tmp);
            let _ = done.send(Err(std::io::Error::new(e.kind(), e.to_string())));
        }
        return;
    }
    let mut renamed = Vec::with_capacity(staged.len());
    for (tmp, target, done) in staged {
        match fs::rename(&tmp, &target) {
            Ok(()) => renamed.push(done),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                let _ = done.send(Err(e));
            }
        }
    }
    let synced = fs::File::open(dir).and_then(|d| d.sync_all());
    metrics::counter!("school_mail_file_syncs_total").increment(2);
    for done in renamed {
        let _ = done.send(match &synced {
            Ok(()) => Ok(()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        });
    }
}

/// Hidden and not ending in `.eml`: nothing looking for mail picks it up.
fn temporary(dir: &Path, target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.tmp"))
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // The mail holds a sender's words: owner-only, like every data file.
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}
