//! The conformance suite with the topology reversed: each node binds a
//! hub for its consumers and its publisher connects to it over real
//! sockets on 127.0.0.1, publishers spooling in memory.

mod suite;

fn main() -> std::process::ExitCode {
    suite::main(suite::SpoolKind::MemoryConsumersBind)
}
