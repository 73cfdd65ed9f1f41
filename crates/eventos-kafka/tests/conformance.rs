//! The universal conformance suite, run against the real Kafka that
//! `scripts/test-deps` starts (`EVENTOS_KAFKA_BOOTSTRAP`, default
//! `127.0.0.1:9092`). If it cannot be reached the run fails, never skips.
//!
//! Every case's topics and groups have unique names, so cases share the
//! broker. The broker-restart case bounces it with
//! `scripts/services restart kafka`, one restart at a time; cases that
//! have not opened their transport yet wait for it, and the restart waits,
//! for a bounded time, for running ones to close theirs, since the
//! suite's strict no-duplicate checks would otherwise see the redeliveries
//! at-least-once allows.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventos_conformance::{Harness, run};
use eventos_core::{
    Capabilities, DeliveryStream, Event, Publisher, Subscriber, Subscription, Transport,
    TransportError,
};
use eventos_kafka::{KafkaOptions, KafkaTransport};
use eventos_test_brokers::Broker;
use futures::future::BoxFuture;
use tokio::sync::RwLock;

const QUIET_WAIT: Duration = Duration::from_secs(15);

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

struct Kafka;

impl Harness for Kafka {
    fn name(&self) -> &str {
        "kafka"
    }

    fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>> {
        Box::pin(async {
            let _gate = CENSUS.gate.read().await;
            let url = format!("kafka://{}", Broker::Kafka.require());
            let transport = KafkaTransport::connect(&url, KafkaOptions::default())
                .unwrap_or_else(|e| panic!("{e}"));
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
            let deadline = tokio::time::Instant::now() + QUIET_WAIT;
            while CENSUS.open.load(Ordering::Acquire) > 1 && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::task::spawn_blocking(|| Broker::Kafka.restart())
                .await
                .expect("the restart thread panicked");
        }))
    }
}

/// A transport counted as open until closed or dropped.
struct Counted {
    inner: KafkaTransport,
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
    run(Kafka)
}
