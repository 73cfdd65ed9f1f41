//! `eventos demo` and `eventos up` as a user runs them: the real binary,
//! its output, its exit code.

use std::process::Command;

fn eventos(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args(args)
        .output()
        .expect("the eventos binary runs")
}

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        .parse()
        .unwrap()
}

#[test]
fn demo_settles_every_published_event_and_exits() {
    let out = eventos(&[
        "demo",
        "--events",
        "400",
        "--rate",
        "4000",
        "--fail-rate",
        "0.3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = stdout
        .lines()
        .find(|l| l.starts_with("done in"))
        .unwrap_or_else(|| panic!("no summary in:\n{stdout}"));
    assert_eq!(field(done, "published"), 400);
    assert_eq!(field(done, "checked") + field(done, "rejected"), 400);
    assert_eq!(field(done, "counted"), 400);
    assert!(
        field(done, "retries") > 0,
        "a 30% failure rate must cause retries: {done}"
    );
    assert_eq!(field(done, "dead-lettered"), field(done, "rejected"));
}

#[test]
fn bad_flags_get_one_line_saying_how_to_fix_them() {
    for (args, expect) in [
        (
            &["demo", "--fail-rate", "1.5"][..],
            "use a number from 0 to 1",
        ),
        (
            &["demo", "--shutdown-timeout", "soon"][..],
            "use e.g. 500ms, 10s or 2m",
        ),
        (&["demo", "--rate", "0"][..], "--rate"),
        (&["up", "--listen", "nowhere"][..], "--listen"),
        (&["up", "--transport", "kafka"][..], "--transport"),
        // An unknown scheme is answered with every known one.
        (
            &["up", "--transport", "foo://x"][..],
            "unknown transport \"foo://x\": use log or a directory path, memory, amqp, amqps (e.g. amqp://guest:guest@127.0.0.1:5672/%2f), nats (e.g. nats://127.0.0.1:4222), zmq (e.g. zmq://127.0.0.1:5560), or kafka (e.g. kafka://127.0.0.1:9092)",
        ),
        (
            &["up", "--smtp", "mail.example.com"][..],
            "is not an SMTP URL",
        ),
    ] {
        let out = eventos(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(expect),
            "{args:?}: {first}"
        );
    }
}
