//! The conformance suite again, every event written in the CloudEvents
//! structured content mode (`application/cloudevents+json` values): the
//! retry copies, dead letters and put-backs the transport writes itself
//! included. Same broker and rules as `conformance.rs`.

mod suite;

fn main() -> std::process::ExitCode {
    suite::main(eventos_kafka::ContentMode::Structured)
}
