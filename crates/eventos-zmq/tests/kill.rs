//! At-least-once between live peers, proven with the real `kill -9` of a
//! process holding work:
//!
//! * a consumer SIGKILLed while it holds unacked events: those events go
//!   to another consumer of its group;
//! * a publisher spooling in the embedded log, SIGKILLed while it
//!   publishes and started again on the same directory and address:
//!   every event whose publish returned reaches the consumer.
//!
//! The test binary is its own child: run with `EVENTOS_ZMQ_ROLE` set, it
//! plays the part named there instead of running the tests.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventos_core::{Event, Publisher, Subscriber, Subscription, Transport};
use eventos_zmq::{Spool, Topology, ZmqOptions, ZmqTransport};
use futures::StreamExt;
use libtest_mimic::{Arguments, Failed, Trial};

const ROLE: &str = "EVENTOS_ZMQ_ROLE";
const TOPIC: &str = "kill.orders";
const GROUP: &str = "billing";
const DEADLINE: Duration = Duration::from_secs(60);

fn options(bind: Option<String>, peers: Vec<String>, spool: Spool) -> ZmqOptions {
    ZmqOptions {
        bind,
        peers,
        spool,
        heartbeat: Duration::from_millis(100),
        peer_timeout: Duration::from_secs(1),
        ..ZmqOptions::default()
    }
}

fn event(n: usize) -> Event {
    Event::builder("/kill", "test.kill.order.v1")
        .subject(format!("order-{n}"))
        .json(&serde_json::json!({ "n": n }))
        .expect("a JSON payload")
        .build()
        .expect("a valid event")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A child process and the complete lines it printed so far.
struct Kid {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Kid {
    fn spawn(role: &str, env: &[(&str, String)]) -> Kid {
        let mut command = Command::new(std::env::current_exe().expect("the test binary's path"));
        command
            .env(ROLE, role)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("starting the child process");
        let stdout = child.stdout.take().expect("the child's stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            // A line cut short by the kill has no newline: not counted.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.ends_with('\n') {
                    sink.lock().unwrap().push(line.trim_end().to_owned());
                }
                line.clear();
            }
        });
        Kid { child, lines }
    }

    fn lines_with(&self, prefix: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix(prefix).map(str::to_owned))
            .collect()
    }

    async fn wait_for(&mut self, what: &str, prefix: &str, count: usize) -> Result<(), Failed> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let seen = self.lines_with(prefix).len();
            if seen >= count {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the child exited ({status}) before {what}: {seen} of {count}"
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err(format!("{what}: only {seen} of {count} within {DEADLINE:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        // SIGKILL: no destructor, no goodbye on the socket.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Child: joins the group at the publisher `EVENTOS_ZMQ_PEER` and holds
/// every delivery without settling it.
fn hold() {
    runtime().block_on(async move {
        // Either it connects to the publisher, or (consumers binding) it
        // binds a hub the publisher connects to.
        let node = match std::env::var("EVENTOS_ZMQ_PEER") {
            Ok(peer) => ZmqTransport::open(options(None, vec![peer], Spool::Memory)).await,
            Err(_) => {
                let hub = std::env::var("EVENTOS_ZMQ_BIND").expect("EVENTOS_ZMQ_BIND");
                ZmqTransport::open(ZmqOptions {
                    topology: Topology::ConsumersBind,
                    ..options(Some(hub), Vec::new(), Spool::Memory)
                })
                .await
            }
        }
        .expect("a consuming node");
        let mut stream = node
            .subscribe(Subscription::new(TOPIC, GROUP).prefetch(50))
            .await
            .expect("joining the group");
        say("joined");
        let mut held = Vec::new();
        while let Some(delivery) = stream.next().await {
            if let Ok(delivery) = delivery {
                say(&format!("held {}", delivery.event().id()));
                held.push(delivery);
            }
        }
    });
}

/// Child: a publisher spooling in the log at `EVENTOS_ZMQ_DIR`, bound to
/// `EVENTOS_ZMQ_BIND`; publishes batches of ten for as long as it lives
/// when `EVENTOS_ZMQ_PUBLISH` is set, printing the ids of every batch
/// whose publish returned.
fn publish() {
    let dir = std::env::var("EVENTOS_ZMQ_DIR").expect("EVENTOS_ZMQ_DIR");
    let bind = std::env::var("EVENTOS_ZMQ_BIND").expect("EVENTOS_ZMQ_BIND");
    let publishing = std::env::var_os("EVENTOS_ZMQ_PUBLISH").is_some();
    runtime().block_on(async move {
        let node = ZmqTransport::open(options(Some(bind), Vec::new(), Spool::Log(dir.into())))
            .await
            .expect("a publishing node");
        say("bound");
        if !publishing {
            std::future::pending::<()>().await;
        }
        for batch in 0.. {
            let events: Vec<Event> = (0..10).map(|i| event(batch * 10 + i)).collect();
            let ids: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
            if node.publish(TOPIC, events).await.is_ok() {
                for id in ids {
                    say(&format!("acked {id}"));
                }
            }
        }
    });
}

/// Collects what a group member gets, acking each delivery.
fn collect(
    mut stream: eventos_core::DeliveryStream,
) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let task = tokio::spawn(async move {
        while let Some(delivery) = stream.next().await {
            let Ok(delivery) = delivery else { continue };
            let id = delivery.event().id().to_owned();
            if delivery.ack().await.is_ok() {
                sink.lock().unwrap().push(id);
            }
        }
    });
    (got, task)
}

async fn until_all(
    got: &Mutex<Vec<String>>,
    want: &HashSet<String>,
    what: &str,
) -> Result<(), Failed> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen: HashSet<String> = got.lock().unwrap().iter().cloned().collect();
        let missing = want.difference(&seen).count();
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what}: {missing} of {} events never arrived within {DEADLINE:?}",
                want.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn duplicates(got: &[String]) -> usize {
    got.len() - got.iter().collect::<HashSet<_>>().len()
}

fn killed_consumer_work_goes_to_another() -> Result<(), Failed> {
    killed_consumer(false)
}

fn killed_consumer_work_goes_to_another_with_consumers_binding() -> Result<(), Failed> {
    killed_consumer(true)
}

/// Waits until `group` exists at `publisher` (a hello reached it).
async fn until_group(publisher: &ZmqTransport, group: &str) -> Result<(), Failed> {
    let deadline = Instant::now() + DEADLINE;
    while publisher.group_counts(TOPIC, group).await?.is_none() {
        if Instant::now() > deadline {
            return Err(format!("{group} never joined at the publisher").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn killed_consumer(consumers_bind: bool) -> Result<(), Failed> {
    runtime().block_on(async {
        let (publisher, mut holder, survivor) = if consumers_bind {
            // The holder and the survivor bind hubs; the publisher connects
            // to both.
            let holder_hub = format!("tcp://127.0.0.1:{}", free_port());
            let holder = Kid::spawn("hold", &[("EVENTOS_ZMQ_BIND", holder_hub.clone())]);
            let survivor = ZmqTransport::open(ZmqOptions {
                topology: Topology::ConsumersBind,
                ..options(Some("tcp://127.0.0.1:0".into()), Vec::new(), Spool::Memory)
            })
            .await?;
            let survivor_hub = survivor.endpoint().expect("bound").to_owned();
            let publisher = ZmqTransport::open(ZmqOptions {
                topology: Topology::ConsumersBind,
                ..options(None, vec![holder_hub, survivor_hub], Spool::Memory)
            })
            .await?;
            (publisher, holder, survivor)
        } else {
            let publisher = ZmqTransport::open(options(
                Some("tcp://127.0.0.1:0".into()),
                Vec::new(),
                Spool::Memory,
            ))
            .await?;
            let endpoint = publisher.endpoint().expect("bound").to_owned();
            let holder = Kid::spawn("hold", &[("EVENTOS_ZMQ_PEER", endpoint.clone())]);
            let survivor = ZmqTransport::open(options(None, vec![endpoint], Spool::Memory)).await?;
            (publisher, holder, survivor)
        };
        holder.wait_for("the holder joining", "joined", 1).await?;
        until_group(&publisher, GROUP).await?;

        let first: Vec<Event> = (0..50).map(event).collect();
        let mut all: HashSet<String> = first.iter().map(|e| e.id().to_owned()).collect();
        publisher.publish(TOPIC, first).await?;
        holder.wait_for("the holder taking its prefetch", "held ", 50).await?;

        let stream = survivor
            .subscribe(Subscription::new(TOPIC, GROUP).prefetch(50))
            .await?;
        let (got, _task) = collect(stream);
        let rest: Vec<Event> = (50..200).map(event).collect();
        all.extend(rest.iter().map(|e| e.id().to_owned()));
        publisher.publish(TOPIC, rest).await?;

        let held: HashSet<String> = holder.lines_with("held ").into_iter().collect();
        holder.kill();
        until_all(&got, &all, "after the holder's kill").await?;
        let got = got.lock().unwrap().clone();
        let seen: HashSet<&String> = got.iter().collect();
        let redelivered = held.iter().filter(|id| seen.contains(id)).count();
        println!(
            "zmq consumer kill -9 ({}): published {}, held by the killed consumer {}, redelivered to the survivor {redelivered}, lost 0, duplicates {}",
            if consumers_bind { "consumers bind" } else { "publishers bind" },
            all.len(),
            held.len(),
            duplicates(&got)
        );
        if redelivered != held.len() {
            return Err(format!("{} held events were not redelivered", held.len() - redelivered).into());
        }
        survivor.close().await?;
        publisher.close().await?;
        Ok(())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn killed_log_publisher_loses_nothing_it_acked() -> Result<(), Failed> {
    runtime().block_on(async {
        let dir = tempfile::tempdir()?;
        let bind = format!("tcp://127.0.0.1:{}", free_port());
        let env = [
            ("EVENTOS_ZMQ_DIR", dir.path().display().to_string()),
            ("EVENTOS_ZMQ_BIND", bind.clone()),
        ];
        let mut publishing = env.to_vec();
        publishing.push(("EVENTOS_ZMQ_PUBLISH", "1".to_owned()));
        let mut publisher = Kid::spawn("publish", &publishing);
        publisher.wait_for("the publisher binding", "bound", 1).await?;

        let consumer = ZmqTransport::open(options(None, vec![bind], Spool::Memory)).await?;
        let stream = consumer
            .subscribe(Subscription::new(TOPIC, GROUP).prefetch(64))
            .await?;
        let (got, _task) = collect(stream);
        publisher.wait_for("acknowledged publishes", "acked ", 500).await?;
        // Killed mid-flow: some events consumed, some in flight, some only
        // in the spool.
        let deadline = Instant::now() + DEADLINE;
        while got.lock().unwrap().len() < 100 {
            if Instant::now() > deadline {
                return Err("the consumer received under 100 events before the kill".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        publisher.kill();
        let acked: HashSet<String> = publisher.lines_with("acked ").into_iter().collect();
        let before_restart = got.lock().unwrap().len();

        let restarted = Kid::spawn("publish", &env);
        until_all(&got, &acked, "after the publisher's restart").await?;
        let got = got.lock().unwrap().clone();
        println!(
            "zmq log-spool publisher kill -9: acknowledged before the kill {}, received before the restart {before_restart}, received in all {} (every acknowledged one), lost 0, duplicates {}",
            acked.len(),
            got.len(),
            duplicates(&got)
        );
        drop(restarted);
        consumer.close().await?;
        Ok(())
    })
}

fn main() -> std::process::ExitCode {
    match std::env::var(ROLE).as_deref() {
        Ok("hold") => {
            hold();
            return std::process::ExitCode::SUCCESS;
        }
        Ok("publish") => {
            publish();
            return std::process::ExitCode::SUCCESS;
        }
        _ => {}
    }
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test(
            "killed_consumer_work_goes_to_another",
            killed_consumer_work_goes_to_another,
        ),
        Trial::test(
            "killed_consumer_work_goes_to_another_with_consumers_binding",
            killed_consumer_work_goes_to_another_with_consumers_binding,
        ),
        Trial::test(
            "killed_log_publisher_loses_nothing_it_acked",
            killed_log_publisher_loses_nothing_it_acked,
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}
