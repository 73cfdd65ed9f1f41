//! The conformance suite over ZeroMQ sockets on 127.0.0.1, publishers
//! spooling in the embedded log: durable publishes, and what a node held
//! survives its reopening.

mod suite;

fn main() -> std::process::ExitCode {
    suite::main(suite::SpoolKind::Log)
}
