//! `eventos bench log`: how close the embedded log comes to what the disk
//! allows.
//!
//! Absolute numbers depend on the machine; the ratio to a bound measured
//! in the same run, on the same disk, does not. So the bench first times
//! the cheapest durable thing possible — appending records of the log's
//! own size to a file with one `fdatasync` per batch — and then reports
//! the log's durable publish and end-to-end throughput against it, with
//! the `fdatasync`s each event cost. The last line is one
//! `key=value` summary for scripts.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use eventos::{HandlerError, Message, Publisher, Route, Router, Transport, handler_fn};
use eventos_core::Bytes;
use eventos_log::LogTransport;

use crate::bench_event::bench_event;

/// Options of `eventos bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    target: BenchTarget,
}

#[derive(Debug, clap::Subcommand)]
enum BenchTarget {
    /// Durable publish and publish → handler → ack throughput of the
    /// embedded log, as a ratio of the disk's bound measured in the same
    /// run.
    Log(LogBenchArgs),
    /// Confirmed publish and acked consume through eventos-amqp, as ratios
    /// of raw lapin doing the same work on the same broker in the same run;
    /// and publish -> router -> ack end to end.
    Amqp(crate::bench_amqp::AmqpBenchArgs),
    /// Idempotent acks=all publish and consume through eventos-kafka, as
    /// ratios of raw rdkafka doing the same work on the same cluster in the
    /// same run; and publish -> router -> ack end to end.
    #[cfg(feature = "kafka")]
    Kafka(crate::bench_kafka::KafkaBenchArgs),
    /// Acknowledged JetStream publish and acked pull consume through
    /// eventos-nats, as ratios of raw async-nats doing the same work on the
    /// same server in the same run; and publish -> router -> ack end to
    /// end.
    Nats(crate::bench_nats::NatsBenchArgs),
    /// Spooled publish and credit-and-ack consume through eventos-zmq, as
    /// ratios of raw zeromq PUSH/PULL moving the same frames in the same
    /// run (what the ack protocol costs); and publish -> router -> ack end
    /// to end.
    Zmq(crate::bench_zmq::ZmqBenchArgs),
    /// POST /contact and POST /enrollments against a running system, at a
    /// fixed number of clients, next to GET /healthz measured the same way
    /// in the same run; with the syncs each accepted message cost.
    Accept(crate::bench_accept::AcceptBenchArgs),
}

#[derive(Debug, clap::Args)]
struct LogBenchArgs {
    /// Events per measurement.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(64..=100_000_000))]
    events: u64,
    /// Where to write: a new or empty directory on the disk to measure,
    /// kept afterwards (default: a temporary directory, removed
    /// afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Deliveries the end-to-end route handles at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    concurrency: u64,
}

/// Concurrent publishers in the multi-publisher cases.
const PUBLISHERS: usize = 64;
/// Events per publish call in the batched cases.
const BATCH: usize = 16;
/// The single-publisher case pays one `fdatasync` per event, so it stops
/// after this many events or [`SINGLE_PUBLISHER_BUDGET`], whichever comes
/// first: N of them would take minutes and say nothing new.
const SINGLE_PUBLISHER_MAX: u64 = 2000;
const SINGLE_PUBLISHER_BUDGET: Duration = Duration::from_secs(2);
/// Batch sizes tried for the raw bound.
const RAW_BATCHES: [usize; 6] = [1, 16, 64, 256, 1024, 4096];
/// Time spent on each raw batch size (at least three batches are timed).
const RAW_BUDGET: Duration = Duration::from_secs(1);
/// A case that has not finished by then has stalled.
const CASE_LIMIT: Duration = Duration::from_secs(600);
/// Payload bytes; with the envelope and the log's framing a record is
/// about 200 bytes.
const PAYLOAD_BYTES: usize = 64;
const TOPIC: &str = "bench.events";

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.target {
        BenchTarget::Log(args) => log(args).await,
        BenchTarget::Amqp(args) => crate::bench_amqp::run(args).await,
        #[cfg(feature = "kafka")]
        BenchTarget::Kafka(args) => crate::bench_kafka::run(args).await,
        BenchTarget::Nats(args) => crate::bench_nats::run(args).await,
        BenchTarget::Zmq(args) => crate::bench_zmq::run(args).await,
        BenchTarget::Accept(args) => crate::bench_accept::run(args).await,
    }
}

/// The bench's working directory: a temporary one, or the user's.
enum WorkDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl WorkDir {
    fn new(dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let Some(dir) = dir else {
            let temp = tempfile::Builder::new()
                .prefix("eventos-bench-")
                .tempdir()
                .context("cannot create a temporary directory: pass --dir")?;
            return Ok(Self::Temp(temp));
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
        if entries.next().is_some() {
            anyhow::bail!(
                "{} is not empty: pass --dir a new or empty directory (the bench fills it)",
                dir.display()
            );
        }
        Ok(Self::Kept(dir))
    }

    fn path(&self) -> &Path {
        match self {
            Self::Temp(t) => t.path(),
            Self::Kept(p) => p,
        }
    }
}

/// What one publish or end-to-end case measured.
#[derive(Debug, Clone)]
struct Case {
    label: String,
    events: u64,
    elapsed: Duration,
    /// Per publish call, sorted.
    latencies: Vec<Duration>,
    syncs: u64,
    /// Process CPU time (all threads) during the case, where known.
    cpu: Option<Duration>,
}

impl Case {
    fn per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn syncs_per_event(&self) -> f64 {
        self.syncs as f64 / self.events as f64
    }

    fn cpu_us_per_event(&self) -> Option<f64> {
        self.cpu.map(|c| c.as_secs_f64() * 1e6 / self.events as f64)
    }

    /// How many cores the case kept busy on average: near the core count,
    /// it is CPU-bound; well below, it waits (for `fdatasync`, mostly).
    fn cores_busy(&self) -> Option<f64> {
        self.cpu
            .map(|c| c.as_secs_f64() / self.elapsed.as_secs_f64())
    }

    fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        // Nearest rank.
        let rank = (q * self.latencies.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.latencies.len()) - 1;
        self.latencies[i].as_secs_f64() * 1000.0
    }
}

async fn log(args: LogBenchArgs) -> anyhow::Result<()> {
    let work = WorkDir::new(args.dir)?;
    let root = work.path().to_path_buf();
    let n = args.events;
    let concurrency = usize::try_from(args.concurrency).unwrap_or(1024);
    let payload = Bytes::from(payload());

    let record_bytes = probe_record_bytes(&root.join("probe"), &payload).await?;
    println!(
        "eventos bench log: {n} events per case, {record_bytes}-byte records, {} cores, in {}{}",
        std::thread::available_parallelism().map_or(1, usize::from),
        root.display(),
        match work {
            WorkDir::Temp(_) => " (removed afterwards)",
            WorkDir::Kept(_) => "",
        }
    );

    println!();
    println!(
        "raw bound: {record_bytes}-byte appends to one file, one fdatasync per batch (up to {}s per batch size)",
        RAW_BUDGET.as_secs()
    );
    let raw = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || raw_bound(&root, record_bytes, n))
            .await
            .context("the raw bound measurement failed")??
    };
    println!(
        "  {:>6}  {:>8}  {:>10}  {:>13}",
        "batch", "events", "events/s", "ms/fdatasync"
    );
    for r in &raw {
        println!(
            "  {:>6}  {:>8}  {:>10.0}  {:>13.2}",
            r.batch,
            r.events,
            r.per_s(),
            r.sync_ms()
        );
    }
    let best = raw
        .iter()
        .max_by(|a, b| a.per_s().total_cmp(&b.per_s()))
        .context("no raw measurement")?;
    let raw_bound = best.per_s();
    println!(
        "  best: {raw_bound:.0} events/s at {} per fdatasync; a lone fdatasync takes {:.2} ms",
        best.batch,
        raw[0].sync_ms()
    );

    println!();
    println!("durable publish: each call returns after the fdatasync that covers it");
    let mut publish = Vec::new();
    let single = Load {
        publishers: 1,
        per_call: 1,
        total: n.min(SINGLE_PUBLISHER_MAX),
        budget: Some(SINGLE_PUBLISHER_BUDGET),
    };
    publish.push(
        publish_case(&root.join("publish-1x1"), &payload, single)
            .await
            .context("1 publisher")?,
    );
    for per_call in [1, BATCH] {
        let load = Load {
            publishers: PUBLISHERS,
            per_call,
            total: n,
            budget: None,
        };
        let dir = root.join(format!("publish-{PUBLISHERS}x{per_call}"));
        publish.push(
            publish_case(&dir, &payload, load)
                .await
                .with_context(|| load.label())?,
        );
    }
    print_cases(&publish, raw_bound);
    if publish[0].events < n {
        println!(
            "  (1 publisher: {} events, not {n}: each call waits for its own fdatasync, so {n} calls would take about {:.0} s)",
            publish[0].events,
            n as f64 / publish[0].per_s()
        );
    }

    println!();
    println!(
        "end to end: publish -> router -> handler -> durable ack (route concurrency {concurrency})"
    );
    let mut e2e = Vec::new();
    for per_call in [1, BATCH] {
        let load = Load {
            publishers: PUBLISHERS,
            per_call,
            total: n,
            budget: None,
        };
        let dir = root.join(format!("e2e-{PUBLISHERS}x{per_call}"));
        e2e.push(
            e2e_case(&dir, &payload, load, concurrency)
                .await
                .with_context(|| format!("end to end, {}", load.label()))?,
        );
    }
    print_cases(&e2e, raw_bound);
    println!("  (p50/p99: one publish call; cores busy: process CPU time / wall time)");

    // The headline is the unbatched case: it is what a service that
    // publishes each event as it happens gets.
    let head = &e2e[0];
    println!();
    println!(
        "summary: end to end with {}, against the best raw batch",
        head.label
    );
    println!(
        "log e2e_events_per_s={:.0} raw_bound_per_s={raw_bound:.0} ratio={:.3} fsyncs_per_event={:.4}",
        head.per_s(),
        head.per_s() / raw_bound,
        head.syncs_per_event()
    );
    std::io::stdout().flush()?;
    drop(work);
    Ok(())
}

fn payload() -> Vec<u8> {
    let mut p = br#"{"n":0,"pad":""#.to_vec();
    p.resize(PAYLOAD_BYTES - 2, b'x');
    p.extend_from_slice(br#""}"#);
    p
}

/// The size of one record as the log writes it, framing included, so the
/// raw bound appends exactly as many bytes per event.
async fn probe_record_bytes(dir: &Path, payload: &Bytes) -> anyhow::Result<usize> {
    let log = open_log(dir)?;
    let before = log.stats().bytes_written;
    log.publish(TOPIC, vec![bench_event(payload)])
        .await
        .context("cannot publish to the log")?;
    let bytes = log.stats().bytes_written - before;
    log.close().await.context("cannot close the log")?;
    Ok(usize::try_from(bytes).unwrap_or(200))
}

fn open_log(dir: &Path) -> anyhow::Result<LogTransport> {
    LogTransport::open(dir).with_context(|| format!("cannot open a log in {}", dir.display()))
}

/// One batch size of the raw bound.
#[derive(Debug)]
struct RawRow {
    batch: usize,
    events: u64,
    syncs: u64,
    elapsed: Duration,
}

impl RawRow {
    fn per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn sync_ms(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1000.0 / self.syncs as f64
    }
}

/// Appends `record_bytes`-byte records to a fresh file in batches, one
/// `write` and one `fdatasync` per batch, for each batch size: the most a
/// durable append log can do on this disk, with no framing, no checksums,
/// no threads and no wake-ups.
fn raw_bound(dir: &Path, record_bytes: usize, events: u64) -> anyhow::Result<Vec<RawRow>> {
    let mut rows = Vec::new();
    for batch in RAW_BATCHES {
        let path = dir.join(format!("raw-{batch}.bin"));
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let buf = vec![0xA5u8; batch * record_bytes];
        let started = Instant::now();
        let mut row = RawRow {
            batch,
            events: 0,
            syncs: 0,
            elapsed: Duration::ZERO,
        };
        // At least three syncs, however large the batch, so one slow sync
        // does not decide a row.
        while row.syncs < 3 || (row.events < events && started.elapsed() < RAW_BUDGET) {
            file.write_all(&buf)
                .and_then(|()| file.sync_data())
                .with_context(|| format!("cannot write {}", path.display()))?;
            row.events += batch as u64;
            row.syncs += 1;
        }
        row.elapsed = started.elapsed();
        drop(file);
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        rows.push(row);
    }
    Ok(rows)
}

/// How the publishers load the log.
#[derive(Debug, Clone, Copy)]
struct Load {
    publishers: usize,
    per_call: usize,
    /// Events to publish in all.
    total: u64,
    /// Stop claiming new calls after this long.
    budget: Option<Duration>,
}

impl Load {
    fn label(&self) -> String {
        format!(
            "{} publisher{} x {} event{}/call",
            self.publishers,
            if self.publishers == 1 { "" } else { "s" },
            self.per_call,
            if self.per_call == 1 { "" } else { "s" }
        )
    }
}

/// What the publishers did: every call's latency, sorted, and the events
/// published.
struct Published {
    latencies: Vec<Duration>,
    events: u64,
}

/// Publishes on a fresh log with no consumers.
async fn publish_case(dir: &Path, payload: &Bytes, load: Load) -> anyhow::Result<Case> {
    let log = open_log(dir)?;
    let syncs = log.stats().syncs;
    let cpu = cpu_time();
    let started = Instant::now();
    let published = tokio::time::timeout(CASE_LIMIT, publish_all(&log, payload, load))
        .await
        .context("stalled: no progress within the case limit")??;
    let elapsed = started.elapsed();
    let cpu = cpu_time()
        .zip(cpu)
        .map(|(after, before)| after.saturating_sub(before));
    let syncs = log.stats().syncs - syncs;
    log.close().await.context("cannot close the log")?;
    Ok(Case {
        label: load.label(),
        events: published.events,
        elapsed,
        latencies: published.latencies,
        syncs,
        cpu,
    })
}

/// Runs the publishers.
async fn publish_all(log: &LogTransport, payload: &Bytes, load: Load) -> anyhow::Result<Published> {
    let claimed = Arc::new(AtomicU64::new(0));
    let deadline = load.budget.map(|b| Instant::now() + b);
    let per_call = load.per_call as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..load.publishers {
        let (log, payload, claimed) = (log.clone(), payload.clone(), claimed.clone());
        tasks.spawn(async move {
            let mut done = Published {
                latencies: Vec::new(),
                events: 0,
            };
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok::<_, anyhow::Error>(done);
                }
                // Claim a call's worth of events, so the total is exact
                // however the calls interleave.
                let start = claimed.fetch_add(per_call, Ordering::Relaxed);
                if start >= load.total {
                    return Ok(done);
                }
                let count = (load.total - start).min(per_call);
                let events = (0..count).map(|_| bench_event(&payload)).collect();
                let t = Instant::now();
                log.publish(TOPIC, events).await.context("publish failed")?;
                done.latencies.push(t.elapsed());
                done.events += count;
            }
        });
    }
    let mut all = Published {
        latencies: Vec::new(),
        events: 0,
    };
    while let Some(joined) = tasks.join_next().await {
        let done = joined.context("a publisher task failed")??;
        all.latencies.extend(done.latencies);
        all.events += done.events;
    }
    all.latencies.sort_unstable();
    Ok(all)
}

/// Publishes `total` events while a router consumes them with a handler
/// that only acks; the clock stops when the group's durable cursor has
/// passed the last event.
async fn e2e_case(
    dir: &Path,
    payload: &Bytes,
    load: Load,
    concurrency: usize,
) -> anyhow::Result<Case> {
    let total = load.total;
    let log = open_log(dir)?;
    let transport: Arc<dyn Transport> = Arc::new(log.clone());
    let handler = handler_fn(|_msg: Message| async { Ok::<(), HandlerError>(()) });
    let running = Router::new(transport.clone())
        .route(
            Route::new(TOPIC, "bench", handler)
                .no_retry()
                .concurrency(concurrency),
        )
        .start()
        .await
        .context("cannot start the router")?;
    let syncs = log.stats().syncs;
    let cpu = cpu_time();
    let started = Instant::now();
    let work = async {
        let published = publish_all(&log, payload, load).await?;
        // The cursor moves only once an ack is durable.
        let mut tick = tokio::time::interval(Duration::from_micros(500));
        loop {
            tick.tick().await;
            if log
                .group_stats(TOPIC, "bench")
                .is_some_and(|g| g.cursor >= total)
            {
                return Ok::<_, anyhow::Error>(published.latencies);
            }
        }
    };
    let latencies = tokio::time::timeout(CASE_LIMIT, work)
        .await
        .context("stalled: not every event was acked within the case limit")??;
    let elapsed = started.elapsed();
    let cpu = cpu_time()
        .zip(cpu)
        .map(|(after, before)| after.saturating_sub(before));
    let syncs = log.stats().syncs - syncs;
    running.shutdown().await.context("cannot stop the router")?;
    transport.close().await.context("cannot close the log")?;
    Ok(Case {
        label: load.label(),
        events: total,
        elapsed,
        latencies,
        syncs,
        cpu,
    })
}

/// CPU time this process has used, all threads, user and system; `None`
/// where `/proc` does not tell.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // `utime` and `stime`, fields 14 and 15 of proc(5), in USER_HZ ticks
    // (100 a second on Linux).
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn print_cases(cases: &[Case], raw_bound: f64) {
    let width = cases.iter().map(|c| c.label.len()).max().unwrap_or(0);
    println!(
        "  {:<width$}  {:>7}  {:>9}  {:>6}  {:>6}  {:>12}  {:>6}  {:>9}  {:>10}",
        "case",
        "events",
        "events/s",
        "p50 ms",
        "p99 ms",
        "fsyncs/event",
        "vs raw",
        "cpu us/ev",
        "cores busy"
    );
    let or_dash = |v: Option<f64>, decimals: usize| {
        v.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
    };
    for c in cases {
        println!(
            "  {:<width$}  {:>7}  {:>9.0}  {:>6.2}  {:>6.2}  {:>12.4}  {:>6.3}  {:>9}  {:>10}",
            c.label,
            c.events,
            c.per_s(),
            c.percentile_ms(0.50),
            c.percentile_ms(0.99),
            c.syncs_per_event(),
            c.per_s() / raw_bound,
            or_dash(c.cpu_us_per_event(), 1),
            or_dash(c.cores_busy(), 2),
        );
    }
}
