//! What the tests that run the `eventos` binary share.

#![allow(dead_code)] // Each test binary uses its own part.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};

/// A port nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Spawns `command` (an `eventos up` or `serve`) with its stdout piped and
/// returns once it prints that it serves. Its stdout keeps being read, so
/// its shutdown lines have a reader.
pub(crate) fn spawn_serving(command: &mut Command, what: &str) -> Child {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("Ctrl-C") {
            std::thread::spawn(move || lines.for_each(drop));
            return child;
        }
    }
    let status = child.wait().unwrap();
    panic!("{what} exited before serving ({status})");
}

/// Ctrl-C for `child`; it must drain and exit cleanly.
pub(crate) fn interrupt(mut child: Child) {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status}");
}
