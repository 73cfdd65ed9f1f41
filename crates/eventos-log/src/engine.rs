//! The log's entry in a transport registry: named `log`, `log:<dir>` or a
//! directory path.

use std::fmt::Write as _;
use std::sync::Arc;

use eventos_kit::{Engine, OpenError, Opened, Target, directory};
use futures::future::BoxFuture;

use crate::LogTransport;

/// Opens the embedded log in `<data-dir>/log`, or in the directory the URL
/// names.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogEngine;

impl Engine for LogEngine {
    fn schemes(&self) -> &'static [&'static str] {
        &["log"]
    }

    fn example(&self) -> &'static str {
        "log"
    }

    fn opens_paths(&self) -> bool {
        true
    }

    fn process_local(&self) -> bool {
        true
    }

    fn describe(&self, target: &Target<'_>) -> String {
        format!("log (durable) in {}", directory(target, "log").display())
    }

    fn open<'a>(&'a self, target: Target<'a>) -> BoxFuture<'a, Result<Opened, OpenError>> {
        let dir = directory(&target, "log");
        Box::pin(async move {
            let shown = dir.display().to_string();
            let log = tokio::task::spawn_blocking(move || LogTransport::open(dir))
                .await
                .map_err(|e| OpenError(format!("opening the log in {shown}: {e}")))?
                .map_err(|e| OpenError(format!("opening the log in {shown}: {e}")))?;
            let report = log.recovery_report();
            if !report.cuts.is_empty() {
                tracing::warn!(
                    cuts = report.cuts.len(),
                    "the log was cut back to its last valid records"
                );
            }
            let log = Arc::new(log);
            let counted = Arc::clone(&log);
            Ok(Opened {
                transport: log,
                metrics: Some(Box::new(move || metrics(&counted))),
            })
        })
    }
}

/// The log's syncs and appends in the Prometheus text format: what
/// `eventos bench accept` divides by the messages accepted.
fn metrics(log: &LogTransport) -> String {
    let stats = log.stats();
    let mut text = String::new();
    for (name, help, value) in [
        (
            "eventos_log_syncs_total",
            "fdatasyncs of the embedded log.",
            stats.syncs,
        ),
        (
            "eventos_log_events_appended_total",
            "Events the embedded log made durable.",
            stats.events_appended,
        ),
    ] {
        let _ = writeln!(
            text,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    text
}
