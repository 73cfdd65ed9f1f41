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

mod suite;

fn main() -> std::process::ExitCode {
    suite::main(eventos_kafka::ContentMode::Binary)
}
