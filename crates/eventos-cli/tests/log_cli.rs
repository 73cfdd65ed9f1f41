//! `eventos log …` and `eventos bench log` as a user runs them: the real
//! binary against a data directory the log itself wrote.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use eventos_core::{Event, Publisher, Subscriber, Subscription, Transport};
use eventos_log::LogTransport;
use futures::StreamExt as _;

fn eventos(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args(args)
        .env_remove("EVENTOS_DATA_DIR")
        .output()
        .expect("the eventos binary runs")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The value after `label` on the line that starts with it.
fn value<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
        .trim()
}

/// The whitespace-separated columns of the row that starts with `first`.
fn row<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{text}"))
}

fn order(n: u32) -> Event {
    Event::builder("/shop", "shop.order_placed.v1")
        .subject(format!("order-{n}"))
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

/// Ten orders; group `billing` acks 0, 1 and 3, retries 2 in an hour and
/// dead-letters 4; 5 to 9 are never delivered.
fn populate(dir: &Path) -> Vec<Event> {
    let events: Vec<Event> = (0..10).map(order).collect();
    let published = events.clone();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let log = LogTransport::open(dir).unwrap();
        let mut stream = log
            .subscribe(Subscription::new("orders", "billing"))
            .await
            .unwrap();
        log.publish("orders", published).await.unwrap();
        for i in 0..5 {
            let d = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("a delivery in time")
                .unwrap()
                .unwrap();
            match i {
                2 => d.retry_after(Duration::from_secs(3600)).await.unwrap(),
                4 => d
                    .dead_letter("bad order", Some("no such customer".into()))
                    .await
                    .unwrap(),
                _ => d.ack().await.unwrap(),
            }
        }
        drop(stream);
        log.close().await.unwrap();
    });
    events
}

#[test]
fn topics_lists_every_topic_with_its_segments() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path());
    let out = stdout(&eventos(&[
        "log",
        "topics",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]));
    let header = row(&out, "TOPIC");
    assert_eq!(
        header,
        ["TOPIC", "SEGMENTS", "BYTES", "FIRST", "OFFSET", "GROUPS"]
    );
    let orders = row(&out, "orders");
    assert_eq!((orders[1], orders[3], orders[4]), ("1", "0", "1"), "{out}");
    assert!(orders[2].parse::<u64>().unwrap() > 0);
    let dlq = row(&out, "orders.dlq");
    assert_eq!((dlq[1], dlq[4]), ("1", "0"), "{out}");
}

#[test]
fn stat_reports_offsets_controls_and_each_groups_position() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path());
    let path = dir.path().to_str().unwrap();
    let out = stdout(&eventos(&[
        "log",
        "stat",
        "--topic",
        "orders",
        "--data-dir",
        path,
    ]));
    assert_eq!(value(&out, "topic:"), "orders");
    assert!(
        value(&out, "data directory:").ends_with("(not in use)"),
        "{out}"
    );
    assert_eq!(value(&out, "first offset:"), "0");
    assert_eq!(value(&out, "next offset:"), "10");
    assert_eq!(value(&out, "events:"), "10");
    assert_eq!(value(&out, "control records:"), "5");
    assert_eq!(value(&out, "tail:"), "clean");
    assert_eq!(
        row(&out, "GROUP"),
        [
            "GROUP",
            "CURSOR",
            "UNSETTLED",
            "RETRIES",
            "DEAD-LETTERED",
            "ACKED"
        ]
    );
    // 0 and 1 settled, so the cursor is at 2 (waiting for its retry); 3
    // and 4 are settled ahead of it; 2 and 5..9 are unsettled.
    assert_eq!(row(&out, "billing"), ["billing", "2", "6", "1", "1", "3"]);

    // The dead letter went to its own topic.
    let dlq = stdout(&eventos(&[
        "log",
        "stat",
        "--topic",
        "orders.dlq",
        "--data-dir",
        path,
    ]));
    assert_eq!(value(&dlq, "events:"), "1");
    assert_eq!(value(&dlq, "groups:"), "none");
}

#[test]
fn the_data_dir_comes_from_the_environment_too() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .args(["log", "stat", "--topic", "orders"])
        .env("EVENTOS_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(value(&stdout(&out), "events:"), "10");
}

#[test]
fn dump_prints_cloudevents_json_one_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let published = populate(dir.path());
    let path = dir.path().to_str().unwrap();
    let out = stdout(&eventos(&[
        "log",
        "dump",
        "--topic",
        "orders",
        "--data-dir",
        path,
    ]));
    let dumped: Vec<Event> = out
        .lines()
        .map(|l| Event::from_json(l.as_bytes()).unwrap())
        .collect();
    assert_eq!(dumped, published, "every event, in order, as published");

    let out = stdout(&eventos(&[
        "log",
        "dump",
        "--topic",
        "orders",
        "--data-dir",
        path,
        "--from",
        "3",
        "--limit",
        "4",
    ]));
    let ids: Vec<String> = out
        .lines()
        .map(|l| Event::from_json(l.as_bytes()).unwrap().id().to_owned())
        .collect();
    let want: Vec<String> = published[3..7].iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(ids, want);
}

#[test]
fn dump_as_text_is_one_readable_line_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let published = populate(dir.path());
    let out = stdout(&eventos(&[
        "log",
        "dump",
        "--topic",
        "orders",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--format",
        "text",
        "--from",
        "8",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let cols: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(cols[0], "8");
    assert!(
        cols[1].ends_with('Z'),
        "an RFC 3339 append time: {}",
        cols[1]
    );
    assert_eq!(cols[2], "shop.order_placed.v1");
    assert_eq!(cols[3], format!("id={}", published[8].id()));
    assert!(lines[0].contains("subject=order-8"), "{}", lines[0]);
    assert!(lines[0].ends_with(r#"data={"n":8}"#), "{}", lines[0]);
}

#[test]
fn stat_reports_a_torn_tail_and_leaves_it() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path());
    let segment = dir.path().join("topics/orders/00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).unwrap();
    let clean = bytes.len();
    // Half of a record: its header says 64 bytes follow; 5 do.
    bytes.extend_from_slice(&64u32.to_le_bytes());
    bytes.extend_from_slice(&[0; 9]);
    std::fs::write(&segment, &bytes).unwrap();

    let out = stdout(&eventos(&[
        "log",
        "stat",
        "--topic",
        "orders",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]));
    let tail = value(&out, "tail:");
    assert!(
        tail.contains(&format!("at byte {clean}: 13 bytes"))
            && tail.contains("torn record at the end")
            && tail.contains("the next open of the log cuts it"),
        "{tail}"
    );
    assert_eq!(value(&out, "events:"), "10");
    assert_eq!(std::fs::read(&segment).unwrap().len(), clean + 13);
}

#[test]
fn bad_input_gets_one_line_saying_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path());
    let path = dir.path().to_str().unwrap();
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["log", "topics", "--data-dir", missing],
            "pass --data-dir pointing at",
        ),
        (
            vec!["log", "stat", "--topic", "orders", "--data-dir", missing],
            "(it does not exist)",
        ),
        (
            vec!["log", "stat", "--topic", "nope", "--data-dir", path],
            "no topic `nope` in",
        ),
        (
            vec!["log", "dump", "--topic", "nope", "--data-dir", path],
            "; topics: orders, orders.dlq",
        ),
    ] {
        let out = eventos(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_ne!(out.status.code(), Some(0));
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expect),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn bench_log_ends_with_its_summary_line() {
    let dir = tempfile::tempdir().unwrap();
    let bench_dir = dir.path().join("bench");
    let out = stdout(&eventos(&[
        "bench",
        "log",
        "--events",
        "2000",
        "--dir",
        bench_dir.to_str().unwrap(),
    ]));
    let last = out.lines().last().unwrap();
    let rest = last
        .strip_prefix("log ")
        .unwrap_or_else(|| panic!("{last:?}"));
    let fields: Vec<(&str, &str)> = rest
        .split(' ')
        .map(|kv| kv.split_once('=').unwrap())
        .collect();
    let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys,
        [
            "e2e_events_per_s",
            "raw_bound_per_s",
            "ratio",
            "fsyncs_per_event"
        ]
    );
    let e2e: u64 = fields[0].1.parse().unwrap();
    let raw: u64 = fields[1].1.parse().unwrap();
    assert!(e2e > 0 && raw > 0, "{last}");
    for (key, v) in &fields[2..] {
        assert!(v.contains('.'), "{key} is a decimal: {last}");
        assert!(v.parse::<f64>().unwrap() > 0.0, "{last}");
    }

    // Every event of the end-to-end case was acked durably: the log says
    // so after the bench has closed it.
    let e2e_dir = bench_dir.join("e2e-64x1");
    let stat = stdout(&eventos(&[
        "log",
        "stat",
        "--topic",
        "bench.events",
        "--data-dir",
        e2e_dir.to_str().unwrap(),
    ]));
    assert_eq!(value(&stat, "events:"), "2000");
    assert_eq!(row(&stat, "bench")[1..3], ["2000", "0"]);
}
