//! `eventos bench amqp` against the RabbitMQ the README's test command
//! starts: it runs both sides and ends with its summary line; an
//! unreachable broker is one line naming it.

use std::process::Command;

use eventos_test_brokers::Broker;

#[test]
fn a_short_run_ends_with_the_summary_line() {
    let url = Broker::RabbitMq.require();
    let out = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args(["bench", "amqp", "--url", &url, "--events", "300"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let fields: Vec<&str> = last.split(' ').collect();
    assert_eq!(fields.len(), 4, "{last}");
    assert_eq!(fields[0], "amqp", "{last}");
    for (field, key) in
        fields[1..]
            .iter()
            .zip(["publish_ratio", "consume_ratio", "e2e_events_per_s"])
    {
        let (name, value) = field.split_once('=').unwrap_or_default();
        assert_eq!(name, key, "{last}");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{last}"));
        assert!(value > 0.0, "{last}");
    }
    for case in [
        "raw lapin publish",
        "raw lapin consume",
        "eventos-amqp publish",
        "eventos-amqp consume",
        "eventos-amqp end to end",
    ] {
        assert!(stdout.contains(case), "{case} missing: {stdout}");
    }
}

#[test]
fn an_unreachable_broker_is_named_in_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args([
            "bench",
            "amqp",
            "--url",
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "--events",
            "100",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        error.contains("cannot connect to RabbitMQ at")
            && error.contains("127.0.0.1:1")
            && error.contains("scripts/services start rabbitmq"),
        "{stderr}"
    );
}
