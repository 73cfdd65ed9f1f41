//! The demonstration flow behind `eventos demo`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use eventos::middleware::DeadLettered;
use eventos::{Backoff, Bus, HandlerError, Message, Route, Router, Transport, TypedEvent, typed};
use eventos_memory::MemoryTransport;
use rand::Rng as _;
use serde::{Deserialize, Serialize};

/// Options of `eventos demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Publish this many payments, wait until every one is settled, print
    /// the summary and exit (default: run until Ctrl-C).
    #[arg(long)]
    events: Option<u64>,
    /// Payments published per second.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: u64,
    /// Probability that an anti-fraud check fails transiently (and is
    /// retried), from 0 to 1.
    #[arg(long, default_value_t = 0.2, value_parser = parse_probability)]
    fail_rate: f64,
    /// How long in-flight work may take to finish after Ctrl-C.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
}

fn parse_probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!(
            "`{s}` is not a probability: use a number from 0 to 1, e.g. 0.2"
        )),
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: use e.g. 500ms, 10s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!(
            "`{s}` has an unknown unit: use ms, s or m, e.g. 10s"
        )),
    }
}

const PAYMENTS: &str = "demo.payments";
const CHECKS: &str = "demo.checks";
const REJECTIONS: &str = "demo.rejections";

/// Amounts at or above this are refused by the anti-fraud rules.
const SUSPICIOUS_CENTS: u64 = 95_000;

#[derive(Debug, Serialize, Deserialize)]
struct PaymentSubmitted {
    payment_id: u64,
    amount_cents: u64,
}
impl TypedEvent for PaymentSubmitted {
    const TYPE: &'static str = "demo.payment_submitted.v1";
    fn subject(&self) -> Option<String> {
        Some(format!("payment-{}", self.payment_id))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct PaymentChecked {
    payment_id: u64,
}
impl TypedEvent for PaymentChecked {
    const TYPE: &'static str = "demo.payment_checked.v1";
}

#[derive(Debug, Serialize, Deserialize)]
struct PaymentRejected {
    payment_id: u64,
    reason: String,
}
impl TypedEvent for PaymentRejected {
    const TYPE: &'static str = "demo.payment_rejected.v1";
}

#[derive(Debug, Default)]
struct Tally {
    published: AtomicU64,
    checked: AtomicU64,
    rejected: AtomicU64,
    counted: AtomicU64,
    amount_cents: AtomicU64,
}

impl Tally {
    fn settled(&self) -> u64 {
        self.checked.load(Ordering::Relaxed) + self.rejected.load(Ordering::Relaxed)
    }
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let bus = Bus::new(transport.clone(), "/eventos/demo");
    let tally = Arc::new(Tally::default());
    let fail_rate = args.fail_rate;

    let antifraud = {
        let bus = bus.clone();
        typed(move |p: PaymentSubmitted, _msg: Message| {
            let bus = bus.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                if p.amount_cents >= SUSPICIOUS_CENTS {
                    return Err(HandlerError::permanent(format!(
                        "amount {} exceeds the review threshold",
                        p.amount_cents
                    )));
                }
                if rand::rng().random_bool(fail_rate) {
                    return Err(HandlerError::transient("scoring service unavailable"));
                }
                bus.emit(
                    CHECKS,
                    &PaymentChecked {
                        payment_id: p.payment_id,
                    },
                )
                .await?;
                Ok(())
            }
        })
    };
    let on_rejected = {
        let bus = bus.clone();
        move |failed: DeadLettered| {
            let bus = bus.clone();
            async move {
                let p: PaymentSubmitted = failed.event.decode()?;
                bus.emit(
                    REJECTIONS,
                    &PaymentRejected {
                        payment_id: p.payment_id,
                        reason: failed.error,
                    },
                )
                .await?;
                Ok(())
            }
        }
    };
    let metrics = {
        let tally = tally.clone();
        typed(move |p: PaymentSubmitted, _msg: Message| {
            let tally = tally.clone();
            async move {
                tally.counted.fetch_add(1, Ordering::Relaxed);
                tally
                    .amount_cents
                    .fetch_add(p.amount_cents, Ordering::Relaxed);
                Ok::<(), HandlerError>(())
            }
        })
    };
    let ledger = {
        let tally = tally.clone();
        typed(move |_c: PaymentChecked, _msg: Message| {
            let tally = tally.clone();
            async move {
                tally.checked.fetch_add(1, Ordering::Relaxed);
                Ok::<(), HandlerError>(())
            }
        })
    };
    let notifier = {
        let tally = tally.clone();
        typed(move |_r: PaymentRejected, _msg: Message| {
            let tally = tally.clone();
            async move {
                tally.rejected.fetch_add(1, Ordering::Relaxed);
                Ok::<(), HandlerError>(())
            }
        })
    };

    let retry = Backoff::new(Duration::from_millis(20), Duration::from_millis(500), 8);
    let router = Router::new(transport.clone())
        .shutdown_timeout(args.shutdown_timeout)
        .route(
            Route::new(PAYMENTS, "antifraud", antifraud)
                .retry(retry)
                .timeout(Duration::from_secs(5))
                .concurrency(64)
                .on_dead_letter(on_rejected),
        )
        .route(Route::new(PAYMENTS, "metrics", metrics).concurrency(64))
        .route(Route::new(CHECKS, "ledger", ledger).concurrency(64))
        .route(Route::new(REJECTIONS, "notifier", notifier));
    let stats = router.stats();
    let running = router.start().await.context("starting the router")?;

    println!(
        "eventos demo: transport={} (in memory: queued work is lost if the process dies)",
        transport.name()
    );
    println!(
        "flow: {PAYMENTS} -> antifraud (retries, dead-letter -> {REJECTIONS}) -> {CHECKS}; {PAYMENTS} -> metrics"
    );
    match args.events {
        Some(n) => println!(
            "publishing {n} payments at {}/s; Ctrl-C to stop early",
            args.rate
        ),
        None => println!("publishing {}/s until Ctrl-C", args.rate),
    }

    let started = Instant::now();
    let publisher = tokio::spawn(publish(bus.clone(), tally.clone(), args.rate, args.events));
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut check = tokio::time::interval(Duration::from_millis(50));
    let shutdown = eventos::shutdown_signal();
    tokio::pin!(shutdown);
    let mut interrupted = false;
    loop {
        tokio::select! {
            () = &mut shutdown => { interrupted = true; break; }
            _ = check.tick() => {}
            _ = ticker.tick() => {
                let s = stats.snapshot();
                println!(
                    "{:>5.1}s published={} checked={} rejected={} retries={} dead-lettered={}",
                    started.elapsed().as_secs_f64(),
                    tally.published.load(Ordering::Relaxed),
                    tally.checked.load(Ordering::Relaxed),
                    tally.rejected.load(Ordering::Relaxed),
                    s.retried,
                    s.dead_lettered,
                );
            }
        }
        if let Some(n) = args.events
            && publisher.is_finished()
            && tally.settled() >= n
            && tally.counted.load(Ordering::Relaxed) >= n
        {
            break;
        }
    }
    publisher.abort();
    if interrupted {
        println!(
            "shutting down: draining in-flight work (up to {:?})",
            args.shutdown_timeout
        );
    }
    running.shutdown().await.context("draining the router")?;
    transport.close().await.context("closing the transport")?;
    let s = stats.snapshot();
    println!(
        "done in {:.1}s: published={} checked={} rejected={} counted={} amount_cents={} acked={} retries={} dead-lettered={}",
        started.elapsed().as_secs_f64(),
        tally.published.load(Ordering::Relaxed),
        tally.checked.load(Ordering::Relaxed),
        tally.rejected.load(Ordering::Relaxed),
        tally.counted.load(Ordering::Relaxed),
        tally.amount_cents.load(Ordering::Relaxed),
        s.acked,
        s.retried,
        s.dead_lettered,
    );
    Ok(())
}

async fn publish(bus: Bus, tally: Arc<Tally>, rate: u64, limit: Option<u64>) {
    // Publish in small batches on a fixed tick so high rates do not need a
    // timer per event.
    let ticks_per_s = rate.min(100);
    let mut ticker =
        tokio::time::interval(Duration::from_secs(1) / u32::try_from(ticks_per_s).unwrap_or(100));
    let mut next_id = 0u64;
    let mut owed = 0u64;
    loop {
        ticker.tick().await;
        owed += rate;
        let batch = owed / ticks_per_s;
        owed %= ticks_per_s;
        let mut events = Vec::new();
        for _ in 0..batch {
            if limit.is_some_and(|n| next_id >= n) {
                break;
            }
            // Roughly 1 in 20 payments is large enough to be refused.
            let amount_cents = rand::rng().random_range(500..100_000);
            match bus.event(&PaymentSubmitted {
                payment_id: next_id,
                amount_cents,
            }) {
                Ok(e) => events.push(e),
                Err(e) => tracing::error!(error = %e, "cannot encode a demo payment"),
            }
            next_id += 1;
        }
        let count = events.len() as u64;
        if count > 0 {
            if let Err(e) = bus.publish(PAYMENTS, events).await {
                tracing::error!(error = %e, "publish failed");
                return;
            }
            tally.published.fetch_add(count, Ordering::Relaxed);
        }
        if limit.is_some_and(|n| next_id >= n) {
            return;
        }
    }
}
