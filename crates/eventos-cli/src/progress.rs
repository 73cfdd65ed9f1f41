//! A progress bar for long scans: on stderr, only when stderr is a
//! terminal, and only once a scan has run long enough to be worth one — a
//! bar that flashes for a fast scan is noise, and one written into a log
//! file or a pipe is garbage.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use eventos_log::inspect::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A scan shorter than this shows no bar.
const SHOW_AFTER: Duration = Duration::from_millis(400);

/// Feeds [`Progress`] reports to a bar that appears when the scan turns
/// out to be long.
#[derive(Debug)]
pub(crate) struct Bar {
    what: &'static str,
    started: Instant,
    enabled: bool,
    bar: Option<ProgressBar>,
}

impl Bar {
    /// A bar labelled `what` (e.g. `scanning`).
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            started: Instant::now(),
            enabled: std::io::stderr().is_terminal(),
            bar: None,
        }
    }

    /// Records how far the scan has come.
    pub(crate) fn update(&mut self, p: Progress) {
        if !self.enabled || p.done >= p.total {
            if let Some(bar) = &self.bar {
                bar.set_position(p.done);
            }
            return;
        }
        if self.bar.is_none() && self.started.elapsed() >= SHOW_AFTER {
            let bar = ProgressBar::with_draw_target(Some(p.total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
            )
            .map(|s| s.progress_chars("=> "));
            if let Ok(style) = style {
                bar.set_style(style);
            }
            bar.set_message(self.what);
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_length(p.total);
            bar.set_position(p.done);
        }
    }

    /// Removes the bar, so what follows on the terminal starts clean.
    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}
