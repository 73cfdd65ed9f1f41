//! `eventos bench amqp` against the RabbitMQ the README's test command
//! starts: it runs both sides and ends with its summary line; an
//! unreachable broker is one line naming it.

mod common;

use eventos_test_brokers::Broker;

#[test]
fn a_short_run_ends_with_the_summary_line() {
    let url = Broker::RabbitMq.require();
    common::bench_summary(
        &["amqp", "--url", &url, "--events", "300"],
        "amqp",
        &[
            "raw lapin publish",
            "raw lapin consume",
            "eventos-amqp publish",
            "eventos-amqp consume",
            "eventos-amqp end to end",
        ],
    );
}

#[test]
fn an_unreachable_broker_is_named_in_one_line() {
    let (error, stderr) = common::bench_error(&[
        "amqp",
        "--url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "--events",
        "100",
    ]);
    assert!(
        error.contains("cannot connect to RabbitMQ at")
            && error.contains("127.0.0.1:1")
            && error.contains("scripts/services start rabbitmq"),
        "{stderr}"
    );
}
