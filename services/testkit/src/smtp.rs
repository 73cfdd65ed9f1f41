//! A real SMTP server for tests: `aiosmtpd` with the handler in
//! `smtp/eventos_smtp.py`.

use std::fs;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::mail::{Envelope, ReceivedMail};

/// The interpreter that has `aiosmtpd`: Debian's, not whichever `python3`
/// comes first on `PATH` (a version manager's may lack the package).
const DEFAULT_PYTHON: &str = "/usr/bin/python3";

/// How long the server may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How the server answers every message, from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `250`: the message is taken and kept.
    #[default]
    Accept,
    /// `451`: a transient refusal; a client should retry later.
    TempFail,
    /// `550`: a permanent refusal; retrying cannot help.
    PermFail,
    /// `451 4.6.7 SMTPUTF8 is required`: a transient code refusing the
    /// mail's form, which the same mail will meet again.
    NeedsSmtpUtf8,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Accept => "accept",
            Mode::TempFail => "tempfail",
            Mode::PermFail => "permfail",
            Mode::NeedsSmtpUtf8 => "smtputf8",
        }
    }
}

/// A running `aiosmtpd` on `127.0.0.1`, keeping what it receives in a
/// temporary directory. Killed on drop.
///
/// ```no_run
/// # async fn example() {
/// use std::time::Duration;
/// use school_testkit::{Mode, SmtpServer};
///
/// let mut server = SmtpServer::start();
/// // … point the code under test at server.url() and send a mail …
/// let mails = server.wait_for(1, Duration::from_secs(5)).await;
/// assert_eq!(mails[0].to_addresses(), ["ana@example.org"]);
///
/// server.set_mode(Mode::TempFail); // the next messages get `451`
/// server.stop(); // connections are refused…
/// server.restart(); // …until it is back, on the same port
/// # }
/// ```
#[derive(Debug)]
pub struct SmtpServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl SmtpServer {
    /// Starts a server on a free port and returns once it accepts TCP
    /// connections, answering [`Mode::Accept`].
    ///
    /// This (like [`restart`](Self::restart)) blocks the calling thread
    /// while Python starts, a few hundred milliseconds: async tests that
    /// restart a server under a running router use a multi-thread runtime.
    ///
    /// # Panics
    ///
    /// If `aiosmtpd` is not installed (the message says to install
    /// `python3-aiosmtpd`), or the server does not start listening.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("eventos-smtp-")
            .tempdir()
            .expect("cannot create a temporary directory for the SMTP server");
        let mut server = Self {
            port: 0,
            dir,
            child: None,
        };
        server.set_mode(Mode::Accept);
        // Another process may take the port between our probe and the
        // server's bind; try a few fresh ones before giving up.
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(Spawn::PortTaken(log)) => last_error = log,
                Err(Spawn::Failed(message)) => panic!("{message}"),
            }
        }
        panic!("the SMTP server found no free port after 5 tries: {last_error}");
    }

    /// `smtp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// The port it listens on (kept across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where messages are kept: `new/` (accepted), `rejected/` (refused by
    /// [`Mode::TempFail`] / [`Mode::PermFail`]), each as `NAME.eml` with
    /// its envelope in `NAME.json`.
    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("maildir")
    }

    /// How the server answers messages from now on (also while stopped:
    /// the mode survives a restart).
    ///
    /// # Panics
    ///
    /// If the mode file cannot be written.
    pub fn set_mode(&self, mode: Mode) {
        // Write then rename, so the handler never reads half a word.
        let tmp = self.dir.path().join("mode.tmp");
        fs::write(&tmp, mode.as_str()).expect("cannot write the SMTP server's mode file");
        fs::rename(&tmp, self.mode_file()).expect("cannot replace the SMTP server's mode file");
    }

    /// The messages accepted so far, in arrival order.
    ///
    /// # Panics
    ///
    /// If a stored message cannot be read or parsed.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        read_mails(&self.maildir().join("new"))
    }

    /// The messages refused so far (answered `451` or `550`), in arrival
    /// order: one per attempt a client made.
    ///
    /// # Panics
    ///
    /// If a stored message cannot be read or parsed.
    pub fn rejected(&self) -> Vec<ReceivedMail> {
        read_mails(&self.maildir().join("rejected"))
    }

    /// Waits until at least `n` messages were accepted, and returns them.
    ///
    /// # Panics
    ///
    /// If fewer than `n` arrive within `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        self.wait(n, timeout, "accepted", Self::messages).await
    }

    /// Waits until at least `n` messages were refused, and returns them.
    ///
    /// # Panics
    ///
    /// If fewer than `n` are refused within `timeout`.
    pub async fn wait_for_rejected(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        self.wait(n, timeout, "refused", Self::rejected).await
    }

    async fn wait(
        &self,
        n: usize,
        timeout: Duration,
        what: &str,
        read: fn(&Self) -> Vec<ReceivedMail>,
    ) -> Vec<ReceivedMail> {
        let deadline = Instant::now() + timeout;
        loop {
            let mails = read(self);
            if mails.len() >= n {
                return mails;
            }
            assert!(
                Instant::now() < deadline,
                "the SMTP server {what} {} messages within {timeout:?}; {n} expected",
                mails.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server: from now on connections to its port are refused.
    /// What it received is kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Killed, not asked to stop: this is the server going away, as
            // a crash or a lost host would.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (stopping it first if it
    /// runs), and returns once it accepts connections.
    ///
    /// # Panics
    ///
    /// If it cannot listen on its port again.
    pub fn restart(&mut self) {
        self.stop();
        match self.spawn() {
            Ok(()) => {}
            Err(Spawn::PortTaken(log) | Spawn::Failed(log)) => {
                panic!(
                    "the SMTP server cannot listen on port {} again: {log}",
                    self.port
                )
            }
        }
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn mode_file(&self) -> PathBuf {
        self.dir.path().join("mode")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn spawn(&mut self) -> Result<(), Spawn> {
        let python = std::env::var_os("EVENTOS_SMTP_PYTHON")
            .map_or_else(|| PathBuf::from(DEFAULT_PYTHON), PathBuf::from);
        let handler_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("smtp");
        let log = fs::File::create(self.log_file())
            .map_err(|e| Spawn::Failed(format!("cannot create the SMTP server's log file: {e}")))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Spawn::Failed(format!("cannot share the SMTP server's log file: {e}")))?;
        let child = Command::new(&python)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["-c", "eventos_smtp.MaildirHandler"])
            .arg(self.maildir())
            .arg(self.mode_file())
            .arg(std::process::id().to_string())
            .env("PYTHONPATH", &handler_dir)
            // Keep the source tree free of __pycache__.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("PYTHONHOME")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Spawn::Failed(format!(
                    "{} not found: install python3-aiosmtpd (apt-get install python3-aiosmtpd), \
                     or set EVENTOS_SMTP_PYTHON to a Python that has aiosmtpd",
                    python.display()
                )));
            }
            Err(e) => {
                return Err(Spawn::Failed(format!(
                    "cannot run {}: {e}",
                    python.display()
                )));
            }
        };
        self.child = Some(child);
        self.wait_listening()
    }

    fn wait_listening(&mut self) -> Result<(), Spawn> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                let log = fs::read_to_string(self.log_file()).unwrap_or_default();
                return Err(if log.contains("No module named aiosmtpd") {
                    Spawn::Failed(
                        "aiosmtpd is missing: install python3-aiosmtpd \
                         (apt-get install python3-aiosmtpd)"
                            .to_owned(),
                    )
                } else if log.contains("Address already in use") {
                    Spawn::PortTaken(log)
                } else {
                    Spawn::Failed(format!("the SMTP server exited ({status}): {log}"))
                });
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                let log = fs::read_to_string(self.log_file()).unwrap_or_default();
                return Err(Spawn::Failed(format!(
                    "the SMTP server did not listen on port {} within {START_TIMEOUT:?}: {log}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Spawn {
    /// The port was taken: try another.
    PortTaken(String),
    /// Anything else: give up with this message.
    Failed(String),
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port on 127.0.0.1")
}

/// Every `*.eml` in `dir` with its envelope, in name (arrival) order.
fn read_mails(dir: &Path) -> Vec<ReceivedMail> {
    let mut names: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect(),
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("cannot read {}: {e}", dir.display()),
    };
    names.sort();
    names
        .into_iter()
        .map(|path| {
            let raw =
                fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let raw = String::from_utf8_lossy(&raw);
            let mut mail =
                ReceivedMail::parse(&raw).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            mail.envelope = fs::read(path.with_extension("json"))
                .ok()
                .and_then(|json| serde_json::from_slice::<Envelope>(&json).ok());
            mail
        })
        .collect()
}
