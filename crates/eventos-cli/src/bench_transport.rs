//! The half of the broker benches that is the same for every transport:
//! publishing, consuming and the router end to end through any
//! `Transport`, timed the same way, so only the raw baselines differ.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use eventos::{HandlerError, Message, Route, Router, Transport};
use eventos_core::{Bytes, StartFrom, Subscription};
use futures::StreamExt as _;

use crate::bench_event::bench_event;

/// A case that has not finished by then has stalled.
pub(crate) const CASE_LIMIT: Duration = Duration::from_secs(600);

/// The load a broker bench puts on its broker, the same for the raw
/// baseline and for eventos.
#[derive(Debug, clap::Args)]
pub(crate) struct Load {
    /// Events per measurement.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    events: u64,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    publishers: u64,
    /// Events per publish call (each call waits until the broker has taken
    /// them all: confirms, delivery reports).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch: u64,
    /// Unsettled deliveries a consumer may hold.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_535))]
    prefetch: u64,
}

impl Load {
    /// Events, publishers, batch and prefetch, in the types the cases take
    /// (the parsers' ranges make every conversion exact).
    pub(crate) fn get(&self) -> (u64, usize, usize, u16) {
        (
            self.events,
            usize::try_from(self.publishers).unwrap_or(16),
            usize::try_from(self.batch).unwrap_or(16),
            u16::try_from(self.prefetch).unwrap_or(256),
        )
    }
}

pub(crate) struct Measured {
    pub(crate) events: u64,
    pub(crate) elapsed: Duration,
    /// For a consume: how long until the first record was in hand (the
    /// group's join, the first fetch), within `elapsed`.
    pub(crate) first: Option<Duration>,
}

impl Measured {
    pub(crate) fn per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

pub(crate) fn report(label: &str, m: &Measured) {
    let first = m.first.map_or_else(String::new, |first| {
        format!(", the first after {:.0} ms", first.as_secs_f64() * 1000.0)
    });
    println!(
        "  {label:<52} {:>9.0} events/s  ({} in {:.2} s{first})",
        m.per_s(),
        m.events,
        m.elapsed.as_secs_f64()
    );
}

/// The median of `rounds` by throughput: the middle one, or the upper of
/// the middle two.
pub(crate) fn median(mut rounds: Vec<Measured>) -> Measured {
    rounds.sort_by(|a, b| a.per_s().total_cmp(&b.per_s()));
    rounds.swap_remove(rounds.len() / 2)
}

/// Splits `n` events into per-publisher counts.
fn shares(n: u64, publishers: usize) -> Vec<u64> {
    let p = publishers as u64;
    (0..p).map(|i| n / p + u64::from(i < n % p)).collect()
}

/// Times `publishers` tasks publishing `n` events between them, `batch`
/// per call: `publish(k)` publishes `k` events and returns once the broker
/// has taken them all. `what` names the side in the stall message.
pub(crate) async fn timed_publishers<F, Fut>(
    n: u64,
    publishers: usize,
    batch: usize,
    what: &str,
    publish: F,
) -> anyhow::Result<Measured>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for share in shares(n, publishers) {
        let publish = publish.clone();
        tasks.push(tokio::spawn(async move {
            let mut left = share;
            while left > 0 {
                let k = left.min(batch as u64);
                publish(k).await?;
                left -= k;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        tokio::time::timeout(CASE_LIMIT, task)
            .await
            .with_context(|| format!("the {what} publish stalled"))???;
    }
    Ok(Measured {
        events: n,
        elapsed: started.elapsed(),
        first: None,
    })
}

pub(crate) async fn eventos_publish(
    transport: &Arc<dyn Transport>,
    topic: &str,
    payload: &Bytes,
    n: u64,
    publishers: usize,
    batch: usize,
) -> anyhow::Result<Measured> {
    let (transport, topic, payload) = (transport.clone(), topic.to_owned(), payload.clone());
    timed_publishers(n, publishers, batch, "eventos", move |k| {
        let (transport, topic, payload) = (transport.clone(), topic.clone(), payload.clone());
        async move {
            let events = (0..k).map(|_| bench_event(&payload)).collect();
            transport.publish(&topic, events).await?;
            anyhow::Ok(())
        }
    })
    .await
}

/// Reads `n` events of `topic` as `group` from the earliest, acking each;
/// the subscribe (the group's join) is timed.
pub(crate) async fn eventos_consume(
    transport: &Arc<dyn Transport>,
    topic: &str,
    group: &str,
    n: u64,
    prefetch: u16,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let mut stream = transport
        .subscribe(
            Subscription::new(topic, group)
                .start(StartFrom::Earliest)
                .prefetch(usize::from(prefetch)),
        )
        .await?;
    let mut seen = 0;
    let mut first = None;
    let consume = async {
        while seen < n {
            let delivery = stream
                .next()
                .await
                .context("the eventos subscription ended")??;
            first.get_or_insert_with(|| started.elapsed());
            delivery.ack().await?;
            seen += 1;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(CASE_LIMIT, consume)
        .await
        .context("the eventos consume stalled")??;
    Ok(Measured {
        events: n,
        elapsed: started.elapsed(),
        first,
    })
}

pub(crate) async fn e2e(
    transport: &Arc<dyn Transport>,
    topic: &str,
    payload: &Bytes,
    n: u64,
    publishers: usize,
    batch: usize,
    prefetch: u16,
) -> anyhow::Result<Measured> {
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (handled, done) = (handled.clone(), done.clone());
        eventos::handler_fn(move |_msg: Message| {
            let (handled, done) = (handled.clone(), done.clone());
            async move {
                if handled.fetch_add(1, Ordering::Relaxed) + 1 >= n {
                    done.notify_one();
                }
                Ok::<(), HandlerError>(())
            }
        })
    };
    let running = Router::new(transport.clone())
        .route(
            Route::new(topic, "bench", handler)
                .no_retry()
                .concurrency(usize::from(prefetch)),
        )
        .start()
        .await
        .context("cannot start the router")?;
    let started = Instant::now();
    let finished = done.notified();
    eventos_publish(transport, topic, payload, n, publishers, batch).await?;
    if handled.load(Ordering::Relaxed) < n {
        tokio::time::timeout(CASE_LIMIT, finished)
            .await
            .context("the end-to-end run stalled")?;
    }
    let elapsed = started.elapsed();
    running.shutdown().await?;
    Ok(Measured {
        events: n,
        elapsed,
        first: None,
    })
}
