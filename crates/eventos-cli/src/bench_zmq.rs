//! `eventos bench zmq`: what eventos-zmq's at-least-once costs over
//! ZeroMQ itself.
//!
//! The baseline is raw `zeromq` PUSH/PULL over loopback TCP moving the
//! same frames eventos-zmq sends (topic, CloudEvents JSON, tag, attempt),
//! fire-and-forget: no spool, no credit, no acks. eventos-zmq's publish
//! is the node taking the events into its spool; its consume is a group
//! member reading them over its DEALER link, acking each and waiting for
//! nothing but its credit. So the consume ratio is what the ack protocol
//! costs. Rounds alternate the two sides so the shared machine treats
//! both alike, and the medians are compared. Then publish → router → ack
//! end to end. The last line is one `key=value` summary for scripts.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use eventos::Transport;
use eventos_core::{Bytes, StartFrom, Subscription};
use eventos_zmq::{Spool, ZmqOptions, ZmqTransport};
use zeromq::{PullSocket, PushSocket, Socket as _, SocketRecv as _, SocketSend as _, ZmqMessage};

use crate::bench_event::bench_event;
use crate::bench_transport::{
    CASE_LIMIT, Load, Measured, e2e, eventos_consume, eventos_publish, median, report,
    timed_publishers,
};

/// Which spool the node under test keeps.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SpoolArg {
    Memory,
    Log,
}

/// Options of `eventos bench zmq`.
#[derive(Debug, clap::Args)]
pub(crate) struct ZmqBenchArgs {
    #[command(flatten)]
    load: Load,
    /// Rounds of each case, each side in turn; the medians are compared.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    rounds: u64,
    /// The node's spool: memory, or the embedded log (fsynced publishes)
    /// in a temporary directory.
    #[arg(long, value_enum, default_value_t = SpoolArg::Memory)]
    spool: SpoolArg,
}

const PAYLOAD_BYTES: usize = 64;
const TOPIC: &str = "bench.events";
const E2E_TOPIC: &str = "bench.e2e";

pub(crate) async fn run(args: ZmqBenchArgs) -> anyhow::Result<()> {
    let (n, publishers, batch, prefetch) = args.load.get();
    let rounds = usize::try_from(args.rounds).unwrap_or(5);
    let payload = Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    let dir = tempfile::tempdir().context("creating a temporary directory for the spool")?;
    let spool = match args.spool {
        SpoolArg::Memory => Spool::Memory,
        SpoolArg::Log => Spool::Log(dir.path().join("spool")),
    };
    println!(
        "eventos bench zmq: {n} events per case, {PAYLOAD_BYTES}-byte payloads, {publishers} publishers x {batch} per publish, prefetch {prefetch}, {} spool, loopback TCP, medians of {rounds} rounds",
        match args.spool {
            SpoolArg::Memory => "memory",
            SpoolArg::Log => "log",
        }
    );
    let node = ZmqTransport::open(ZmqOptions {
        spool,
        ..ZmqOptions::default()
    })
    .await
    .context("opening a ZeroMQ node on 127.0.0.1")?;
    let transport: Arc<dyn Transport> = Arc::new(node);
    // Every consume round's group exists before the events it reads (a
    // memory spool has nothing to replay).
    for round in 1..=rounds {
        let group = format!("bench{round}");
        drop(
            transport
                .subscribe(Subscription::new(TOPIC, group).start(StartFrom::Earliest))
                .await?,
        );
    }
    drop(
        transport
            .subscribe(Subscription::new(E2E_TOPIC, "bench").start(StartFrom::Earliest))
            .await?,
    );

    let (mut raw_publishes, mut publishes) = (Vec::new(), Vec::new());
    let (mut raw_consumes, mut consumes) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (raw_publish, raw_consume) = raw(&payload, n, publishers, batch).await?;
        let ours = eventos_publish(&transport, TOPIC, &payload, n, publishers, batch).await?;
        println!(
            "  publish round {round}/{rounds}: raw PUSH {:.0}, eventos {:.0} events/s (ratio {:.3})",
            raw_publish.per_s(),
            ours.per_s(),
            ours.per_s() / raw_publish.per_s()
        );
        raw_publishes.push(raw_publish);
        publishes.push(ours);
        let group = format!("bench{round}");
        let ours = eventos_consume(&transport, TOPIC, &group, n, prefetch).await?;
        println!(
            "  consume round {round}/{rounds}: raw PULL {:.0}, eventos {:.0} events/s (ratio {:.3})",
            raw_consume.per_s(),
            ours.per_s(),
            ours.per_s() / raw_consume.per_s()
        );
        raw_consumes.push(raw_consume);
        consumes.push(ours);
    }
    let (raw_publish, publish) = (median(raw_publishes), median(publishes));
    let (raw_consume, consume) = (median(raw_consumes), median(consumes));
    println!("medians:");
    report("raw zeromq PUSH (fire and forget)", &raw_publish);
    report("raw zeromq PULL (no acks)", &raw_consume);
    report("eventos-zmq publish (into the spool)", &publish);
    report("eventos-zmq consume (credit, acked)", &consume);

    let e2e = e2e(
        &transport, E2E_TOPIC, &payload, n, publishers, batch, prefetch,
    )
    .await?;
    report("eventos-zmq end to end (publish -> router -> ack)", &e2e);
    transport.close().await?;

    let publish_ratio = publish.per_s() / raw_publish.per_s();
    let consume_ratio = consume.per_s() / raw_consume.per_s();
    println!();
    println!(
        "ratios (1.0 = as fast as raw zeromq PUSH/PULL of the same frames, this run): publish {publish_ratio:.3}, consume {consume_ratio:.3} (the consume ratio is what credit and acks cost)"
    );
    println!(
        "zmq publish_ratio={publish_ratio:.3} consume_ratio={consume_ratio:.3} e2e_events_per_s={:.0}",
        e2e.per_s()
    );
    std::io::stdout().flush()?;
    Ok(())
}

/// The frames of one delivery as eventos-zmq sends them.
fn frames(payload: &Bytes, tag: u64) -> ZmqMessage {
    let event = bench_event(payload);
    let frames = vec![
        Bytes::from_static(TOPIC.as_bytes()),
        Bytes::from(event.to_json()),
        Bytes::from(tag.to_string()),
        Bytes::from_static(b"1"),
    ];
    ZmqMessage::try_from(frames).expect("four frames")
}

/// One raw round: `publishers` PUSH sockets send `n` deliveries' frames
/// to one PULL. Returns the send side's time and the receive side's (from
/// the first send to the last receipt).
async fn raw(
    payload: &Bytes,
    n: u64,
    publishers: usize,
    batch: usize,
) -> anyhow::Result<(Measured, Measured)> {
    let mut pull = PullSocket::new();
    let endpoint = pull
        .bind("tcp://127.0.0.1:0")
        .await
        .context("binding the baseline's PULL socket")?
        .to_string();
    let mut pushes = Vec::new();
    for _ in 0..publishers {
        let mut push = PushSocket::new();
        push.connect(&endpoint)
            .await
            .context("connecting a baseline PUSH socket")?;
        pushes.push(push);
    }
    let started = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut first = None;
        for _ in 0..n {
            pull.recv().await?;
            first.get_or_insert_with(|| started.elapsed());
        }
        anyhow::Ok((first, started.elapsed()))
    });
    let pool = Arc::new(Mutex::new(pushes));
    let payload = payload.clone();
    let sent = timed_publishers(n, publishers, batch, "raw PUSH", move |k| {
        let (pool, payload) = (pool.clone(), payload.clone());
        async move {
            // One socket per publisher task: there are as many as tasks.
            let mut push = pool
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop()
                .context("a PUSH socket for every publisher")?;
            let mut result = Ok(());
            for tag in 0..k {
                if let Err(e) = push.send(frames(&payload, tag)).await {
                    result = Err(e);
                    break;
                }
            }
            pool.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(push);
            result.context("a baseline PUSH send failed")
        }
    })
    .await?;
    let (first, elapsed) = tokio::time::timeout(CASE_LIMIT, receiver)
        .await
        .context("the baseline PULL stalled")???;
    Ok((
        sent,
        Measured {
            events: n,
            elapsed: elapsed.max(Duration::from_micros(1)),
            first,
        },
    ))
}
