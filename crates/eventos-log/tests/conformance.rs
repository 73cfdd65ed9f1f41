//! The universal conformance suite, run against the embedded log.
//!
//! Every case gets a data directory of its own (the log locks its
//! directory, so cases running side by side cannot share one); the
//! persistence cases reopen the directory of the transport they closed.
//! The whole run's directories live under one temporary directory removed
//! at exit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use eventos_conformance::Harness;
use eventos_core::Transport;
use eventos_log::LogConfig;
use futures::future::BoxFuture;

struct Log {
    root: tempfile::TempDir,
    next: AtomicU64,
    /// Which directory each open transport lives in, by its address.
    dirs: Mutex<HashMap<usize, PathBuf>>,
}

impl Log {
    fn open_dir(&self, dir: PathBuf) -> BoxFuture<'static, Arc<dyn Transport>> {
        let log: Arc<dyn Transport> = Arc::new(
            LogConfig::new(&dir)
                // Small segments, so the suite crosses segment boundaries.
                .segment_bytes(256 * 1024)
                .open()
                .unwrap_or_else(|e| panic!("cannot open the log in {}: {e}", dir.display())),
        );
        self.dirs
            .lock()
            .unwrap()
            .insert(Arc::as_ptr(&log).cast::<()>() as usize, dir);
        Box::pin(async move { log })
    }
}

impl Harness for Log {
    fn name(&self) -> &str {
        "log"
    }

    fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.open_dir(self.root.path().join(format!("case-{n}")))
    }

    fn reopen(&self, closed: &Arc<dyn Transport>) -> BoxFuture<'static, Arc<dyn Transport>> {
        let key = Arc::as_ptr(closed).cast::<()>() as usize;
        let dir = self.dirs.lock().unwrap()[&key].clone();
        self.open_dir(dir)
    }
}

fn main() -> ExitCode {
    let harness = Log {
        root: tempfile::tempdir().expect("a temporary directory"),
        next: AtomicU64::new(0),
        dirs: Mutex::new(HashMap::new()),
    };
    eventos_conformance::run(harness)
}
