//! The NATS harness of the conformance suite, in either content mode.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use eventos_conformance::{Harness, RestartGate, run};
use eventos_core::Transport;
use eventos_nats::{ContentMode, NatsOptions, NatsTransport};
use eventos_test_brokers::Broker;
use futures::future::BoxFuture;

const QUIET_WAIT: Duration = Duration::from_secs(15);

static GATE: RestartGate = RestartGate::new();

/// The real nats-server with JetStream, events written in `mode`.
struct Nats {
    mode: ContentMode,
}

impl Harness for Nats {
    fn name(&self) -> &str {
        match self.mode {
            ContentMode::Binary => "nats",
            ContentMode::Structured => "nats-structured",
        }
    }

    fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>> {
        let mode = self.mode;
        Box::pin(GATE.open(
            async move {
                let url = Broker::Nats.require();
                let options = NatsOptions {
                    mode,
                    ..NatsOptions::default()
                };
                NatsTransport::connect(&url, options)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            },
            |_, _| {},
        ))
    }

    fn restart_broker(&self) -> Option<BoxFuture<'static, ()>> {
        Some(Box::pin(GATE.restart(QUIET_WAIT, || {
            Broker::Nats.restart();
        })))
    }
}

/// Runs the suite with events written in `mode`.
pub(crate) fn main(mode: ContentMode) -> ExitCode {
    run(Nats { mode })
}
