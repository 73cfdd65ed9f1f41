//! The universal conformance suite, run against the real Kafka that
//! `scripts/test-deps` starts (`EVENTOS_KAFKA_BOOTSTRAP`, default
//! `127.0.0.1:9092`). If it cannot be reached the run fails, never skips.
//!
//! Every case's topics and groups have unique names, so cases share the
//! broker. The broker-restart case bounces it with
//! `scripts/services restart kafka`, one restart at a time; cases that
//! have not opened their transport yet wait for it, and the restart waits,
//! for a bounded time, for running ones to close theirs, since the
//! suite's strict no-duplicate checks would otherwise see the redeliveries
//! at-least-once allows.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use eventos_conformance::{Harness, RestartGate, run};
use eventos_core::Transport;
use eventos_kafka::{KafkaOptions, KafkaTransport};
use eventos_test_brokers::Broker;
use futures::future::BoxFuture;

const QUIET_WAIT: Duration = Duration::from_secs(15);

static GATE: RestartGate = RestartGate::new();

struct Kafka;

impl Harness for Kafka {
    fn name(&self) -> &str {
        "kafka"
    }

    fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>> {
        Box::pin(GATE.open(
            async {
                let url = format!("kafka://{}", Broker::Kafka.require());
                KafkaTransport::connect(&url, KafkaOptions::default())
                    .unwrap_or_else(|e| panic!("{e}"))
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

fn main() -> ExitCode {
    run(Kafka)
}
