//! `eventos bench zmq` over loopback TCP, both spools: it runs both sides
//! and ends with its summary line.

mod common;

#[test]
fn a_short_run_ends_with_the_summary_line() {
    for spool in ["memory", "log"] {
        common::bench_summary(
            &["zmq", "--events", "300", "--rounds", "1", "--spool", spool],
            "zmq",
            &[
                "raw zeromq PUSH",
                "raw zeromq PULL",
                "eventos-zmq publish",
                "eventos-zmq consume",
                "eventos-zmq end to end",
            ],
        );
    }
}
