//! `eventos bench nats` against the nats-server the README's test command
//! starts: it runs both sides and ends with its summary line; an
//! unreachable server is one line naming it.

mod common;

use eventos_test_brokers::Broker;

#[test]
fn a_short_run_ends_with_the_summary_line() {
    let url = Broker::Nats.require();
    common::bench_summary(
        &["nats", "--url", &url, "--events", "300"],
        "nats",
        &[
            "raw async-nats publish",
            "raw async-nats consume",
            "eventos-nats publish",
            "eventos-nats consume",
            "eventos-nats end to end",
        ],
    );
}

#[test]
fn an_unreachable_server_is_named_in_one_line() {
    let (error, stderr) =
        common::bench_error(&["nats", "--url", "nats://127.0.0.1:1", "--events", "100"]);
    assert!(
        error.contains("cannot connect to NATS at")
            && error.contains("127.0.0.1:1")
            && error.contains("scripts/services start nats"),
        "{stderr}"
    );
}
