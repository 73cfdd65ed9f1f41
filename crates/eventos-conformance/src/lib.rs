//! The universal test suite every eventos transport must pass.
//!
//! A transport is a promise about events: they arrive, they arrive whole,
//! every group sees them, a retry comes back no sooner than asked, a dead
//! letter says why, nothing acked comes back and nothing unsettled is lost.
//! This crate writes those promises down once, as executable cases, so the
//! in-memory transport, the embedded log and every broker binding are held
//! to the same contract (the one in [`eventos_core`]) and cannot drift apart.
//! It is modelled on Watermill's universal pub/sub suite.
//!
//! # The decision that shaped it
//!
//! **Capabilities decide which cases run, and a skipped case is visible.**
//! A transport states what it promises in [`Capabilities`]; the suite reads
//! them from a freshly opened transport and runs every case those flags
//! allow. A case the transport does not claim to support (per-key ordering,
//! replay, persistence, broker restarts, …) becomes an *ignored* trial
//! whose kind names the missing claim, e.g.
//! `test [needs per_key_ordering] per_key_ordering ... ignored`. It is never
//! reported as passed: forced with `--include-ignored`, it still reports
//! ignored with the reason. A shared suite without such flags ends up with
//! one case and a "TODO: all transports need to satisfy this"; with flags,
//! every claim is a tested claim and every gap is on screen.
//!
//! Other choices follow from running against real brokers too:
//!
//! * every case gets its own transport, its own multi-thread tokio runtime
//!   and topic and group names no other case or run uses
//!   (`conf.<case>.<uuid>.<label>`), so cases can run in parallel against
//!   one broker and leftovers of an earlier run never leak in;
//! * time is real, not paused, since a broker does not share tokio's clock;
//!   waits are event-driven with per-step deadlines, and "nothing more
//!   arrives" checks wait a fixed ~400 ms;
//! * every case has an overall deadline, so a hanging transport fails with
//!   a message instead of hanging the test run;
//! * failure messages say what was expected and what happened instead.
//!
//! # Wiring a transport
//!
//! Add the suite as a dev-dependency and a test target without libtest's
//! harness:
//!
//! ```toml
//! [dev-dependencies]
//! eventos-conformance.workspace = true
//!
//! [[test]]
//! name = "conformance"
//! harness = false
//! ```
//!
//! and implement [`Harness`] in `tests/conformance.rs`:
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use eventos_conformance::Harness;
//! use eventos_core::Transport;
//! use futures::future::BoxFuture;
//!
//! struct MyHarness;
//!
//! impl Harness for MyHarness {
//!     fn name(&self) -> &str {
//!         "mine"
//!     }
//!
//!     fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>> {
//!         Box::pin(async {
//!             // Connect to the broker or storage the test environment set up.
//!             # let transport: Arc<dyn Transport> = unimplemented!();
//!             transport
//!         })
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     eventos_conformance::run(MyHarness)
//! }
//! ```
//!
//! A harness whose every `open` gets storage of its own (an embedded log in
//! a temporary directory) also overrides [`Harness::reopen`], so the
//! persistence cases reopen what they closed; one that can restart its
//! broker implements [`Harness::restart_broker`].
//!
//! `cargo test -p my-transport --test conformance -- --list` lists the
//! cases; the usual libtest arguments (filters, `--exact`, `--test-threads`,
//! `--ignored`) work.
//!
//! This crate has no feature flags.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use eventos_core::{Capabilities, Transport};
use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Completion, Failed, Trial};

#[macro_use]
mod support;
mod cases;
mod gate;

pub use gate::RestartGate;

use cases::{CASES, Case, Need};
use support::Ctx;

/// How long a case may take in all, opening the transport included (a case
/// that restarts the broker, longer: [`Case::time_limit`]).
const CASE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long closing the transport after a case may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past its deadline a case's thread is waited for before the case
/// is failed from outside its runtime.
const WATCHDOG_GRACE: Duration = Duration::from_secs(10);

/// What the suite needs from a transport's test setup.
///
/// # Contract
///
/// Every case calls [`Harness::open`] for a transport of its own and closes
/// it when done; cases run in parallel, so transports opened by one harness
/// must be usable side by side.
pub trait Harness: Send + Sync + 'static {
    /// Human name for messages, e.g. `"memory"`.
    fn name(&self) -> &str;

    /// Opens a transport.
    ///
    /// Called once at startup to read the capabilities, then once per case
    /// (each case gets its own). Cases run in parallel and use names no other
    /// case uses, so transports may share one broker or storage, or each
    /// have their own. Failing to open is a broken test environment: panic
    /// with a message saying what is missing.
    fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>>;

    /// Opens a transport again on the broker or storage of `closed`, which
    /// the case has just closed; the persistence cases check what survived.
    ///
    /// The default calls [`Harness::open`], which is right when every
    /// transport of the harness shares one broker or storage, and for a
    /// non-persistent transport (whose persistence cases do not run). A
    /// harness that gives each `open` storage of its own (an embedded log in
    /// a temporary directory) overrides it, finding that storage by the
    /// identity of `closed`: `Arc::as_ptr(closed).cast::<()>()` is unique
    /// while the case holds `closed`, which it does until the case ends.
    fn reopen(&self, closed: &Arc<dyn Transport>) -> BoxFuture<'static, Arc<dyn Transport>> {
        let _ = closed;
        self.open()
    }

    /// Restarts the broker, if this harness can; the future resolves once the
    /// broker accepts connections again.
    ///
    /// `None` (the default) means it cannot, and the broker-restart cases are
    /// then ignored with that reason. The suite calls this once at startup,
    /// without polling the future, to learn whether restarts are possible, so
    /// the returned future must do nothing until it is polled (an `async`
    /// block does exactly that).
    fn restart_broker(&self) -> Option<BoxFuture<'static, ()>> {
        None
    }
}

/// Runs every case as a named libtest trial and returns the process exit
/// code.
///
/// Call it from the `main` of a `harness = false` test target:
/// `fn main() -> ExitCode { eventos_conformance::run(MyHarness) }`. It reads
/// the command line as libtest does.
///
/// A failing case is a failed trial, never a panic here. If no transport can
/// be opened at startup to read the capabilities, nothing runs and the exit
/// code is a failure; a harness that panics while opening panics this too.
pub fn run(harness: impl Harness) -> ExitCode {
    let args = Arguments::from_args();
    let harness: Arc<dyn Harness> = Arc::new(harness);
    let profile = match Profile::probe(&harness) {
        Ok(profile) => profile,
        Err(message) => {
            eprintln!(
                "error: conformance suite for transport {:?} cannot start: {message}",
                harness.name()
            );
            return ExitCode::FAILURE;
        }
    };
    let trials = CASES
        .iter()
        .map(|case| trial(case, &harness, &profile))
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// What the transport under test claims, read once at startup.
#[derive(Debug, Clone)]
pub(crate) struct Profile {
    harness: String,
    transport: &'static str,
    capabilities: Capabilities,
    can_restart_broker: bool,
}

impl Profile {
    fn probe(harness: &Arc<dyn Harness>) -> Result<Self, String> {
        let runtime = runtime("conf-probe")?;
        let result = runtime.block_on(async {
            let transport = tokio::time::timeout(CASE_TIMEOUT, harness.open())
                .await
                .map_err(|_| format!("harness.open() did not finish within {CASE_TIMEOUT:?}"))?;
            let profile = Profile {
                harness: harness.name().to_owned(),
                transport: transport.name(),
                capabilities: transport.capabilities(),
                // Dropped unpolled: the trait asks for a lazy future.
                can_restart_broker: harness.restart_broker().is_some(),
            };
            match tokio::time::timeout(CLOSE_TIMEOUT, transport.close()).await {
                Ok(Ok(())) => Ok(profile),
                Ok(Err(e)) => Err(format!("closing the probe transport failed: {e}")),
                Err(_) => Err(format!(
                    "closing the probe transport did not finish within {CLOSE_TIMEOUT:?}"
                )),
            }
        });
        runtime.shutdown_timeout(Duration::from_secs(1));
        result
    }
}

fn runtime(name: &str) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name(name)
        .build()
        .map_err(|e| format!("cannot start a tokio runtime: {e}"))
}

fn trial(case: &'static Case, harness: &Arc<dyn Harness>, profile: &Profile) -> Trial {
    let unmet: Vec<Need> = case
        .needs
        .iter()
        .copied()
        .filter(|need| !need.met(profile))
        .collect();
    if unmet.is_empty() {
        let harness = harness.clone();
        let capabilities = profile.capabilities;
        return Trial::test(case.name, move || {
            run_case(case, harness, capabilities).map_err(Failed::from)
        });
    }
    let kind = unmet.iter().map(|need| need.label()).collect::<Vec<_>>();
    let reason = unmet
        .iter()
        .map(|need| need.reason(profile))
        .collect::<Vec<_>>()
        .join("; ");
    // Forced with --include-ignored it still reports ignored, never passed.
    Trial::ignorable_test(case.name, move || Ok(Completion::ignored_with(reason)))
        .with_kind(format!("needs {}", kind.join(", ")))
        .with_ignored_flag(true)
}

/// Runs one case on a thread of its own, so that a deadline still holds when
/// the case's runtime cannot: a task that never yields starves tokio's timer
/// along with everything else on the workers.
fn run_case(
    case: &'static Case,
    harness: Arc<dyn Harness>,
    capabilities: Capabilities,
) -> Result<(), String> {
    let (done, outcome) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("conf-{}", case.name))
        .spawn(move || {
            let _ = done.send(run_case_in_runtime(case, harness, capabilities));
        })
        .map_err(|e| format!("cannot start a thread for the case: {e}"))?;
    let limit = case.time_limit(CASE_TIMEOUT);
    match outcome.recv_timeout(limit + WATCHDOG_GRACE) {
        Ok(result) => result,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "case did not finish within {limit:?}, and its runtime did not even notice \
             its own deadline: a task is spinning or blocking a worker thread (a stream that is \
             always ready without yielding does this). The case's runtime is abandoned."
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => Err(format!("the case panicked: {}", panic_message(&*panic))),
            Ok(()) => Err("the case's thread ended without a result".to_owned()),
        },
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn run_case_in_runtime(
    case: &'static Case,
    harness: Arc<dyn Harness>,
    capabilities: Capabilities,
) -> Result<(), String> {
    let runtime = runtime(&format!("conf-{}", case.name))?;
    let result = runtime.block_on(async move {
        let limit = case.time_limit(CASE_TIMEOUT);
        let deadline = tokio::time::Instant::now() + limit;
        let transport = tokio::time::timeout_at(deadline, harness.open())
            .await
            .map_err(|_| format!("harness.open() did not finish within {limit:?}"))?;
        let ctx = Ctx::new(case.name, harness, transport.clone(), capabilities);
        let outcome = tokio::time::timeout_at(deadline, (case.run)(ctx)).await;
        let closed = tokio::time::timeout(CLOSE_TIMEOUT, transport.close()).await;
        match outcome {
            Err(_) => {
                return Err(format!(
                    "case did not finish within {limit:?}: a transport call or a wait \
                     hung without failing on its own deadline"
                ));
            }
            Ok(Err(message)) => return Err(message),
            Ok(Ok(())) => {}
        }
        // Some cases close the transport themselves; closing twice may say so.
        match closed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.kind() == eventos_core::TransportErrorKind::Closed => Ok(()),
            Ok(Err(e)) => Err(format!(
                "the case passed, but closing the transport afterwards failed: {e}"
            )),
            Err(_) => Err(format!(
                "the case passed, but closing the transport afterwards did not finish within \
                 {CLOSE_TIMEOUT:?}"
            )),
        }
    });
    // Tasks a failed case left behind must not keep the trial thread.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_is_object_safe() {
        fn takes(_: Option<&dyn Harness>) {}
        takes(None);
    }

    #[test]
    fn case_names_are_unique_and_valid_in_topic_names() {
        let mut seen = std::collections::HashSet::new();
        for case in CASES {
            assert!(seen.insert(case.name), "duplicate case {}", case.name);
            let topic = format!("conf.{}.{}.dlq.x", case.name, uuid::Uuid::now_v7().simple());
            eventos_core::validate_name("topic", &topic).unwrap();
        }
        assert!(CASES.len() >= 20, "only {} cases", CASES.len());
    }
}
