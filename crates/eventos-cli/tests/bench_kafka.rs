//! `eventos bench kafka` against the Kafka the README's test command
//! starts: it runs both sides and ends with its summary line; an
//! unreachable cluster is one line naming it.

mod common;

use eventos_test_brokers::Broker;

#[test]
fn a_short_run_ends_with_the_summary_line() {
    let url = format!("kafka://{}", Broker::Kafka.require());
    common::bench_summary(
        &["kafka", "--url", &url, "--events", "300", "--rounds", "2"],
        "kafka",
        &[
            "raw rdkafka publish",
            "raw rdkafka consume",
            "eventos-kafka publish",
            "eventos-kafka consume",
            "eventos-kafka end to end",
            "consume round 1/2",
            "consume round 2/2",
        ],
    );
}

#[test]
fn an_unreachable_cluster_is_named_in_one_line() {
    let (error, stderr) =
        common::bench_error(&["kafka", "--url", "kafka://127.0.0.1:1", "--events", "100"]);
    assert!(
        error.contains("cannot reach Kafka at 127.0.0.1:1")
            && error.contains("scripts/services start kafka"),
        "{stderr}"
    );
}
