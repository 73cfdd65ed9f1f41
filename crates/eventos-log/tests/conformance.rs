//! Placeholder until the conformance harness for the log lands.

fn main() {}
