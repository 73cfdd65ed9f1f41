//! The universal conformance suite, run against the in-memory transport.
//!
//! Each `open` returns a brand-new transport: memory keeps nothing across a
//! close, says so (`persistent: false`), and the reopen cases are ignored.
//! There is no broker to restart, so neither are those cases run.

use std::process::ExitCode;
use std::sync::Arc;

use eventos_conformance::Harness;
use eventos_core::Transport;
use eventos_memory::MemoryTransport;
use futures::future::BoxFuture;

struct Memory;

impl Harness for Memory {
    fn name(&self) -> &str {
        "memory"
    }

    fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>> {
        Box::pin(async { Arc::new(MemoryTransport::new()) as Arc<dyn Transport> })
    }
}

fn main() -> ExitCode {
    eventos_conformance::run(Memory)
}
