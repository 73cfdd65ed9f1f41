//! Test support for the reference system.
//!
//! The services are tested against the real things they talk to, started
//! by the test itself: a mock that agrees with the code under test proves
//! little about how a real server answers. This crate holds those helpers.
//!
//! * [`SmtpServer`] — a real SMTP server (Debian's `python3-aiosmtpd`) on a
//!   free loopback port, with a handler shipped in this crate
//!   (`smtp/eventos_smtp.py`) that keeps every message it takes as one file
//!   and can be told, while it runs, to answer `451` or `550` instead
//!   ([`Mode`]). It can be stopped and restarted on the same port, to test
//!   "the server was down, then came back"; it is killed on `Drop`, and
//!   exits by itself if the test process dies.
//! * [`ReceivedMail`] — a message as received (or written to an `.eml`
//!   file), parsed into the headers and body a test asserts on.
//! * [`files_containing`] — what a run left on disk that holds a given
//!   text (the card-number scans).
//! * [`eventually`] — waiting for a condition with a deadline, the one
//!   way the tests wait for what happens asynchronously.
//!
//! # The decision that shaped it
//!
//! The handler is a Python file run by the packaged `aiosmtpd`, not a
//! server written here: the point is to meet an SMTP implementation we did
//! not write. Its mode is a file the handler reads for every message, so a
//! test switches the answer without restarting anything, and everything it
//! receives lands on disk, where the test reads it without a protocol of its
//! own.
//!
//! # Requirements
//!
//! `python3-aiosmtpd` (`apt-get install python3-aiosmtpd`), run with
//! `/usr/bin/python3` — or the interpreter named by `EVENTOS_SMTP_PYTHON`.
//! Without it, [`SmtpServer::start`] panics and says what to install.
//!
//! No feature flags.

mod mail;
mod scan;
mod smtp;
mod wait;

pub use mail::{Envelope, MailParseError, Mailbox, ReceivedMail};
pub use scan::files_containing;
pub use smtp::{Mode, SmtpServer};
pub use wait::eventually;
