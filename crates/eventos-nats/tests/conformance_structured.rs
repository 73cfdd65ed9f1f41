//! The conformance suite again, every event written in the CloudEvents
//! structured content mode (`application/cloudevents+json` bodies),
//! dead letters included. Same server and rules as `conformance.rs`.

mod suite;

fn main() -> std::process::ExitCode {
    suite::main(eventos_nats::ContentMode::Structured)
}
