//! The conformance suite against the real nats-server that
//! `scripts/test-deps` builds and starts, events in the CloudEvents binary
//! content mode (`ce-` headers).

mod suite;

fn main() -> std::process::ExitCode {
    suite::main(eventos_nats::ContentMode::Binary)
}
