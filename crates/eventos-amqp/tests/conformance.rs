//! The universal conformance suite, run against a real RabbitMQ.
//!
//! The broker is the one at `EVENTOS_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). If it cannot be reached the
//! run fails, never skips: a broker test that quietly did not run is a
//! failure in CI.
//!
//! Every case's topics and groups have unique names, under the namespace
//! `eventos-conformance`, and their queues carry a 15-minute `x-expires`
//! so RabbitMQ removes what a run leaves behind; nothing is ever deleted
//! by the tests, since the broker is shared.
//!
//! The broker-restart case restarts the node's application with
//! `rabbitmqctl stop_app`, `start_app` and `await_startup`. One restart at
//! a time (a process-wide mutex). Other cases survive a restart (their
//! transports reconnect), but the suite's strict no-duplicate checks would
//! then see the redeliveries that at-least-once allows, so the restart
//! first holds back cases that have not opened their transport yet and
//! waits, for a bounded time, for the running ones to close theirs.

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventos_amqp::{AmqpOptions, AmqpTransport, ContentMode, QueueType};
use eventos_conformance::Harness;
use eventos_core::{
    Capabilities, DeliveryStream, Event, Publisher, Subscriber, Subscription, Transport,
    TransportError,
};
use futures::future::BoxFuture;
use tokio::sync::RwLock;

/// How long a restart waits for other cases to close their transports.
const QUIET_WAIT: Duration = Duration::from_secs(15);

/// Transports open in this process, and the gate a restart closes.
struct Census {
    open: AtomicUsize,
    gate: RwLock<()>,
    restart: tokio::sync::Mutex<()>,
}

static CENSUS: Census = Census {
    open: AtomicUsize::new(0),
    gate: RwLock::const_new(()),
    restart: tokio::sync::Mutex::const_new(()),
};

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
        queue_expires: Some(Duration::from_secs(15 * 60)),
        ..AmqpOptions::default()
    }
}

struct Amqp;

impl Harness for Amqp {
    fn name(&self) -> &str {
        "amqp"
    }

    fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>> {
        Box::pin(async {
            // Waits while a restart is under way.
            let _gate = CENSUS.gate.read().await;
            let options = options();
            let transport = AmqpTransport::connect(&url(), options)
                .await
                .unwrap_or_else(|e| panic!("{e} (set EVENTOS_AMQP_URL to use another broker)"));
            CENSUS.open.fetch_add(1, Ordering::AcqRel);
            Arc::new(Counted {
                inner: transport,
                counted: AtomicUsize::new(1),
            }) as Arc<dyn Transport>
        })
    }

    fn restart_broker(&self) -> Option<BoxFuture<'static, ()>> {
        Some(Box::pin(async {
            let _one_at_a_time = CENSUS.restart.lock().await;
            let _gate = CENSUS.gate.write().await;
            // The restarting case holds one transport of its own.
            let deadline = tokio::time::Instant::now() + QUIET_WAIT;
            while CENSUS.open.load(Ordering::Acquire) > 1 && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::task::spawn_blocking(|| {
                for step in ["stop_app", "start_app", "await_startup"] {
                    rabbitmqctl(step);
                }
            })
            .await
            .expect("the rabbitmqctl thread panicked");
        }))
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

/// A transport counted in [`CENSUS`] until closed or dropped.
struct Counted {
    inner: AmqpTransport,
    counted: AtomicUsize,
}

impl Counted {
    fn uncount(&self) {
        if self.counted.swap(0, Ordering::AcqRel) == 1 {
            CENSUS.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.uncount();
    }
}

impl Publisher for Counted {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        self.inner.publish(topic, events)
    }
}

impl Subscriber for Counted {
    fn subscribe(
        &self,
        subscription: Subscription,
    ) -> BoxFuture<'_, Result<DeliveryStream, TransportError>> {
        self.inner.subscribe(subscription)
    }
}

impl Transport for Counted {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let result = self.inner.close().await;
            self.uncount();
            result
        })
    }
}

fn main() -> ExitCode {
    eventos_conformance::run(Amqp)
}
