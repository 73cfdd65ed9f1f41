//! Two members of one consumer group, in two processes, on the real Kafka
//! that `scripts/test-deps` runs. They split the topic's partitions; one
//! is SIGKILLed mid-run; the other takes its partitions over and every
//! event is handled. The events handled twice are counted, and each must
//! be one the dead member had handled past its group's last commit: the
//! offsets committed are read the moment it dies, before the survivor
//! takes over. Fails, never skips, when Kafka is down.
//!
//! The same binary is the member: run with `EVENTOS_KAFKA_MEMBER` set, it
//! subscribes, writes each event's id to its file as it handles it, and
//! acks.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eventos_core::{Event, Publisher, StartFrom, Subscriber, Subscription};
use eventos_kafka::{KafkaOptions, KafkaTransport};
use eventos_test_brokers::Broker;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const EVENTS: usize = 3000;
const PREFETCH: usize = 32;
/// The work each event takes in a member, so the run lasts long enough to
/// kill one in the middle of it.
const WORK: Duration = Duration::from_millis(3);
const TOPIC: &str = "members";
const GROUP: &str = "workers";
const DEADLINE: Duration = Duration::from_secs(90);

fn main() -> std::process::ExitCode {
    if let Ok(out) = std::env::var("EVENTOS_KAFKA_MEMBER") {
        runtime().block_on(member(PathBuf::from(out)));
        return std::process::ExitCode::SUCCESS;
    }
    let args = libtest_mimic::Arguments::from_args();
    let trial =
        libtest_mimic::Trial::test("a_killed_member_s_partitions_go_to_the_survivor", || {
            runtime().block_on(a_killed_member_s_partitions_go_to_the_survivor());
            Ok(())
        });
    libtest_mimic::run(&args, vec![trial]).exit_code()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn options(namespace: &str) -> KafkaOptions {
    KafkaOptions {
        namespace: namespace.to_owned(),
        ..KafkaOptions::default()
    }
}

/// One member: handles every event it is given, writing its id first.
async fn member(out: PathBuf) {
    let url = std::env::var("EVENTOS_KAFKA_URL").expect("EVENTOS_KAFKA_URL");
    let namespace = std::env::var("EVENTOS_KAFKA_NAMESPACE").expect("EVENTOS_KAFKA_NAMESPACE");
    let transport = KafkaTransport::connect(&url, options(&namespace)).expect("connect");
    let mut stream = transport
        .subscribe(
            Subscription::new(TOPIC, GROUP)
                .start(StartFrom::Earliest)
                .prefetch(PREFETCH),
        )
        .await
        .expect("subscribe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
        .expect("the member's file");
    println!("ready");
    std::io::stdout().flush().expect("stdout");
    while let Some(delivery) = stream.next().await {
        let Ok(delivery) = delivery else { continue };
        tokio::time::sleep(WORK).await;
        // One write per line: a kill leaves at most a torn last line.
        file.write_all(format!("{}\n", delivery.event().id()).as_bytes())
            .expect("write");
        delivery.ack().await.expect("ack");
    }
}

/// The ids in a member's file, in the order handled (a torn last line
/// left out).
fn handled(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A member process, killed when dropped: a failing test leaves none
/// behind.
struct Member(Child);

impl Member {
    fn kill(&mut self) {
        self.0.kill().expect("SIGKILL a member");
        self.0.wait().expect("reap it");
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(out: &Path, url: &str, namespace: &str) -> Member {
    let mut child = Command::new(std::env::current_exe().expect("this binary"))
        .env("EVENTOS_KAFKA_MEMBER", out)
        .env("EVENTOS_KAFKA_URL", url)
        .env("EVENTOS_KAFKA_NAMESPACE", namespace)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("a member process");
    // Waits for its "ready": the group has taken it in.
    let stdout = child.stdout.take().expect("the member's stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let ready = lines.next().and_then(Result::ok);
        let _ = tx.send(ready);
        for _ in lines {}
    });
    let ready = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the member to join within a minute");
    assert_eq!(ready.as_deref(), Some("ready"), "the member did not start");
    Member(child)
}

/// Waits, polling, until `done` holds, failing with `what` at the deadline.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The group's committed offset per partition of `topic` (absent: none).
fn committed(servers: &str, group_id: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("the committed offsets")
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Where each event of `topic` is: id -> (partition, offset).
fn placement(servers: &str, topic: &str, partitions: i32, n: usize) -> HashMap<String, (i32, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", format!("placement-{}", uuid::Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition_offset(topic, partition, Offset::Beginning)
            .expect("a partition");
    }
    consumer.assign(&list).expect("assign");
    let mut found = HashMap::new();
    let deadline = Instant::now() + DEADLINE;
    while found.len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out reading the topic back"
        );
        let Some(record) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let record = record.expect("a record");
        let event = eventos_kafka::event_from_record(&record).expect("an event");
        found.insert(event.id().to_owned(), (record.partition(), record.offset()));
    }
    found
}

async fn a_killed_member_s_partitions_go_to_the_survivor() {
    let servers = Broker::Kafka.require().to_string();
    let url = format!("kafka://{servers}");
    let namespace = format!("test.members.{}", uuid::Uuid::now_v7().simple());
    let options = options(&namespace);
    let partitions = options.partitions;
    let transport = KafkaTransport::connect(&url, options).expect("connect");
    let dir = std::env::temp_dir().join(format!("eventos-members-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let (a_out, b_out) = (dir.join("a"), dir.join("b"));

    let mut a = spawn(&a_out, &url, &namespace);
    let mut b = spawn(&b_out, &url, &namespace);
    let events: Vec<Event> = (0..EVENTS)
        .map(|n| {
            Event::builder("urn:eventos:test", "eventos.test.members.v1")
                .subject(format!("students/{n}"))
                .data("application/json", format!(r#"{{"n":{n}}}"#))
                .build()
                .expect("an event")
        })
        .collect();
    for chunk in events.chunks(500) {
        transport
            .publish(TOPIC, chunk.to_vec())
            .await
            .expect("publish");
    }

    // Both at work, the first well into its share: then it dies.
    let counts = eventos_core::Transport::group_counts(&transport, TOPIC, GROUP)
        .await
        .expect("the group's counts")
        .expect("the group is known to Kafka");
    assert!(
        counts.ready > 0,
        "{EVENTS} published, none ready: {counts:?}"
    );
    until("both members to handle events", || {
        handled(&a_out).len() >= EVENTS / 8 && !handled(&b_out).is_empty()
    })
    .await;
    a.kill();
    let physical = format!("{namespace}.{TOPIC}");
    let group_id = format!("{GROUP}@{physical}");
    let at_death = committed(&servers, &group_id, &physical, partitions);
    let a_ids = handled(&a_out);

    let all: HashSet<String> = events.iter().map(|e| e.id().to_owned()).collect();
    until("the survivor to handle every event", || {
        let mut seen: HashSet<String> = a_ids.iter().cloned().collect();
        seen.extend(handled(&b_out));
        all.is_subset(&seen)
    })
    .await;
    // Seen from this process, which holds no member: the survivor's
    // commits reach the end of every partition.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let counts = eventos_core::Transport::group_counts(&transport, TOPIC, GROUP)
            .await
            .expect("the group's counts")
            .expect("the group is known to Kafka");
        if counts.ready == 0 && counts.in_flight == 0 && counts.retrying == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group never caught up: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.kill();
    let b_ids = handled(&b_out);

    let place = placement(&servers, &physical, partitions, EVENTS);
    let uncommitted: HashSet<&String> = a_ids
        .iter()
        .filter(|id| {
            let (partition, offset) = place[*id];
            at_death.get(&partition).is_none_or(|&c| offset >= c)
        })
        .collect();
    let a_set: HashSet<&String> = a_ids.iter().collect();
    let mut b_count: HashMap<&String, usize> = HashMap::new();
    for id in &b_ids {
        *b_count.entry(id).or_default() += 1;
    }
    let taken_over: Vec<&String> = b_count
        .keys()
        .copied()
        .filter(|id| a_set.contains(id))
        .collect();
    let survivor_twice = b_count.values().filter(|&&c| c > 1).count();
    println!(
        "kafka two members, {EVENTS} events: the killed one handled {} ({} past its last commit), the survivor {}; handled again after the kill: {}; handled twice by the survivor itself: {survivor_twice}",
        a_ids.len(),
        uncommitted.len(),
        b_ids.len(),
        taken_over.len(),
    );
    let a_partitions: HashSet<i32> = a_ids.iter().map(|id| place[id].0).collect();
    let b_partitions: HashSet<i32> = b_ids.iter().map(|id| place[id].0).collect();
    assert!(
        a_partitions.len() < usize::try_from(partitions).unwrap_or(0),
        "the first member had every partition: the group did not split them"
    );
    assert!(
        b_partitions.len() == usize::try_from(partitions).unwrap_or(0),
        "the survivor did not take every partition over: {b_partitions:?}"
    );
    // The survivor reads the dead member's partitions from their last
    // commit: everything past it again, nothing before it.
    assert_eq!(
        taken_over.len(),
        uncommitted.len(),
        "the survivor did not handle again exactly what the killed member had not committed"
    );
    for id in &taken_over {
        assert!(
            uncommitted.contains(id),
            "{id} was committed by the killed member and handled again by the survivor"
        );
    }
    // Its own in-flight deliveries, taken back by the rebalance when the
    // dead member's session ended, at most one prefetch per rebalance.
    assert!(
        survivor_twice <= 2 * PREFETCH,
        "the survivor handled {survivor_twice} of its own events twice"
    );
    drop(transport);
    let _ = std::fs::remove_dir_all(&dir);
}
