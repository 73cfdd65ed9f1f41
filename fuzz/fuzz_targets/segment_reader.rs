//! Fuzzes the log's record and segment reader: any bytes, as a segment,
//! must scan, recover and read back without a panic, and recovery must keep
//! exactly the records the scan accepts.
//!
//! `cargo fuzz run segment_reader -s none` (stable toolchain).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    eventos_log::fuzzing::segment(data);
});
