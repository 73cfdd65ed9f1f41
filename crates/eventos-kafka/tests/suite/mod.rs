//! The Kafka harness of the conformance suite, in either content mode.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use eventos_conformance::{Harness, RestartGate, run};
use eventos_core::Transport;
use eventos_kafka::{ContentMode, KafkaOptions, KafkaTransport};
use eventos_test_brokers::Broker;
use futures::future::BoxFuture;

const QUIET_WAIT: Duration = Duration::from_secs(15);

static GATE: RestartGate = RestartGate::new();

/// The real Kafka, events written in `mode`.
struct Kafka {
    mode: ContentMode,
}

impl Harness for Kafka {
    fn name(&self) -> &str {
        match self.mode {
            ContentMode::Binary => "kafka",
            ContentMode::Structured => "kafka-structured",
        }
    }

    fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>> {
        let mode = self.mode;
        Box::pin(GATE.open(
            async move {
                let url = format!("kafka://{}", Broker::Kafka.require());
                let options = KafkaOptions {
                    mode,
                    ..KafkaOptions::default()
                };
                KafkaTransport::connect(&url, options).unwrap_or_else(|e| panic!("{e}"))
            },
            |_, _| {},
        ))
    }

    fn restart_broker(&self) -> Option<BoxFuture<'static, ()>> {
        Some(Box::pin(GATE.restart(QUIET_WAIT, || {
            Broker::Kafka.restart();
        })))
    }
}

/// Runs the suite with events written in `mode`.
pub(crate) fn main(mode: ContentMode) -> ExitCode {
    run(Kafka { mode })
}
