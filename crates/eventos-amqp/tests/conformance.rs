//! The universal conformance suite, run against a real RabbitMQ.
//!
//! The broker is the one at `EVENTOS_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). If it cannot be reached the
//! run fails, never skips: a broker test that quietly did not run is a
//! failure in CI.
//!
//! Every case's topics and groups have unique names, under the namespace
//! `eventos-conformance`. The broker is shared, so the run deletes exactly
//! the queues its cases declared (each group's, and the parked dead-letter
//! queue of each topic) once every case is over, and nothing else; the
//! namespace's exchange and delay buckets stay for the next run. A run
//! killed halfway leaves its queues behind, harmless under names no other
//! run uses.
//!
//! The broker-restart case restarts the node's application with
//! `rabbitmqctl stop_app`, `start_app` and `await_startup`. One restart at
//! a time (a process-wide mutex). Other cases survive a restart (their
//! transports reconnect), but the suite's strict no-duplicate checks would
//! then see the redeliveries that at-least-once allows, so the restart
//! first holds back cases that have not opened their transport yet and
//! waits, for a bounded time, for the running ones to close theirs.

use std::collections::BTreeSet;
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventos_amqp::{AmqpOptions, AmqpTransport, ContentMode, PARKED_GROUP, QueueType};
use eventos_conformance::{Harness, RestartGate};
use eventos_core::{Subscription, Transport, dead_letter_topic, validate_name};
use futures::future::BoxFuture;
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};

/// How long a restart waits for other cases to close their transports:
/// longer than the inspection case, whose counts come from statistics a
/// restart resets.
const QUIET_WAIT: Duration = Duration::from_secs(25);

static GATE: RestartGate = RestartGate::new();

static DECLARED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn url() -> String {
    std::env::var("EVENTOS_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The transport's options; `EVENTOS_AMQP_QUEUE_TYPE=classic` and
/// `EVENTOS_AMQP_MODE=structured` run the suite on the other variants (each
/// queue type in a namespace of its own, since a queue keeps its type).
fn options() -> AmqpOptions {
    let var = |name: &str| std::env::var(name).unwrap_or_default().to_ascii_lowercase();
    let (queue_type, namespace) = match var("EVENTOS_AMQP_QUEUE_TYPE").as_str() {
        "" | "quorum" => (QueueType::Quorum, "eventos-conformance"),
        "classic" => (QueueType::Classic, "eventos-conformance-classic"),
        other => panic!("EVENTOS_AMQP_QUEUE_TYPE={other:?}: use quorum or classic"),
    };
    let mode = match var("EVENTOS_AMQP_MODE").as_str() {
        "" | "binary" => ContentMode::Binary,
        "structured" => ContentMode::Structured,
        other => panic!("EVENTOS_AMQP_MODE={other:?}: use binary or structured"),
    };
    AmqpOptions {
        queue_type,
        namespace: namespace.to_owned(),
        mode,
        ..AmqpOptions::default()
    }
}

struct Amqp;

impl Harness for Amqp {
    fn name(&self) -> &str {
        "amqp"
    }

    fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>> {
        Box::pin(GATE.open(
            async {
                AmqpTransport::connect(&url(), options())
                    .await
                    .unwrap_or_else(|e| panic!("{e} (set EVENTOS_AMQP_URL to use another broker)"))
            },
            note_declared,
        ))
    }

    fn restart_broker(&self) -> Option<BoxFuture<'static, ()>> {
        Some(Box::pin(GATE.restart(QUIET_WAIT, || {
            for step in ["stop_app", "start_app", "await_startup"] {
                rabbitmqctl(step);
            }
        })))
    }
}

/// Notes the queues a subscription declares (the group's, and the parked
/// dead-letter queue of its topic), for the clean-up.
fn note_declared(amqp: &AmqpTransport, subscription: &Subscription) {
    let (topic, group) = (&subscription.topic, &subscription.group);
    if validate_name("topic", topic).is_ok() && validate_name("group", group).is_ok() {
        let mut declared = DECLARED.lock().unwrap();
        declared.insert(amqp.queue_name(topic, group));
        declared.insert(amqp.queue_name(&dead_letter_topic(topic), PARKED_GROUP));
    }
}

fn rabbitmqctl(step: &str) {
    let output = Command::new("rabbitmqctl")
        .arg(step)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `rabbitmqctl {step}`: {e}; is RabbitMQ installed here?")
        });
    assert!(
        output.status.success(),
        "`rabbitmqctl {step}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// Deletes the queues the run declared; a queue that is already gone
/// counts as deleted.
fn delete_declared() {
    let queues = std::mem::take(&mut *DECLARED.lock().unwrap());
    if queues.is_empty() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the clean-up");
    let result = runtime.block_on(async {
        let conn = Connection::connect(&url(), ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        for queue in &queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        conn.close(200, "clean-up done".into()).await
    });
    if let Err(e) = result {
        eprintln!(
            "note: could not delete the {} queues of this run: {e}",
            queues.len()
        );
    }
}

fn main() -> ExitCode {
    let code = eventos_conformance::run(Amqp);
    delete_declared();
    code
}
