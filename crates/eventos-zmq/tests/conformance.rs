//! The conformance suite over ZeroMQ sockets on 127.0.0.1, publishers
//! spooling in memory.

mod suite;

fn main() -> std::process::ExitCode {
    suite::main(suite::SpoolKind::Memory)
}
