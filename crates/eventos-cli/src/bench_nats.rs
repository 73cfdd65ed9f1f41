//! `eventos bench nats`: what eventos-nats costs over NATS JetStream
//! itself.
//!
//! The same work on the same server in one run, in rounds that take raw
//! `async-nats` (the baseline: JetStream publishes of the same bytes and
//! headers, each awaited for its acknowledgement, and a durable pull
//! consumer's message stream with explicit acks, batches of the prefetch)
//! and eventos-nats in turn, so that what the shared machine does to one
//! it does to the other; the medians are compared. Then publish → router
//! → ack end to end. The last line is one `key=value` summary for
//! scripts.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};
use eventos::Transport;
use eventos_core::{Binding, Bytes, Event, StartFrom, Subscription};
use eventos_nats::{NatsOptions, NatsTransport};
use futures::StreamExt as _;

use crate::bench_event::bench_event;
use crate::bench_transport::{
    CASE_LIMIT, Load, Measured, e2e, eventos_consume, eventos_publish, median, report,
    timed_publishers,
};

/// Options of `eventos bench nats`.
#[derive(Debug, clap::Args)]
pub(crate) struct NatsBenchArgs {
    /// The server.
    #[arg(
        long,
        env = "EVENTOS_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    url: String,
    #[command(flatten)]
    load: Load,
    /// Rounds of each case, each side in turn; the medians are compared.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    rounds: u64,
}

const PAYLOAD_BYTES: usize = 64;
const TOPIC: &str = "bench.events";

/// What the raw baseline publishes: the headers eventos-nats writes in
/// binary mode, so both sides move the same bytes.
fn raw_headers(event: &Event) -> async_nats::HeaderMap {
    let parts = event.to_binary(Binding::HTTP);
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in parts.headers {
        headers.insert(name.as_str(), value);
    }
    if let Some(ct) = parts.content_type {
        headers.insert("content-type", ct);
    }
    headers
}

pub(crate) async fn run(args: NatsBenchArgs) -> anyhow::Result<()> {
    let (n, publishers, batch, prefetch) = args.load.get();
    let rounds = usize::try_from(args.rounds).unwrap_or(5);
    let payload = Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    println!(
        "eventos bench nats: {n} events per case, {PAYLOAD_BYTES}-byte payloads, {publishers} publishers x {batch} per acknowledged publish, prefetch {prefetch}, file storage, medians of {rounds} rounds"
    );
    let shown = eventos_core::redact_url(&args.url);
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(&args.url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {shown}; is it running? (scripts/services start nats)"
            )
        })?;
    let js = jetstream::new(client.clone());

    let raw_stream = format!("bench_raw_{run_id}");
    let raw_subject = format!("benchraw{run_id}.events");
    js.create_stream(stream::Config {
        name: raw_stream.clone(),
        subjects: vec![raw_subject.clone()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("creating the baseline stream")?;
    let options = NatsOptions {
        namespace: format!("bench{run_id}"),
        ..NatsOptions::default()
    };
    let nats = NatsTransport::connect(&args.url, options)
        .await
        .context("connecting eventos-nats")?;
    let streams = [nats.stream_name(TOPIC), nats.stream_name("bench.e2e")];
    let transport: Arc<dyn Transport> = Arc::new(nats);

    let (mut raw_publishes, mut publishes) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let raw = raw_publish(&js, &raw_subject, &payload, n, publishers, batch).await?;
        let ours = eventos_publish(&transport, TOPIC, &payload, n, publishers, batch).await?;
        println!(
            "  publish round {round}/{rounds}: raw {:.0}, eventos {:.0} events/s (ratio {:.3})",
            raw.per_s(),
            ours.per_s(),
            ours.per_s() / raw.per_s()
        );
        raw_publishes.push(raw);
        publishes.push(ours);
    }
    // Each consume round a new group, reading the first `n` from the start.
    let (mut raw_consumes, mut consumes) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let group = format!("bench{round}");
        let raw = raw_consume(&js, &raw_stream, &group, n, prefetch).await?;
        let ours = eventos_consume(&transport, TOPIC, &group, n, prefetch).await?;
        println!(
            "  consume round {round}/{rounds}: raw {:.0}, eventos {:.0} events/s (ratio {:.3})",
            raw.per_s(),
            ours.per_s(),
            ours.per_s() / raw.per_s()
        );
        raw_consumes.push(raw);
        consumes.push(ours);
    }
    let (raw_publish, publish) = (median(raw_publishes), median(publishes));
    let (raw_consume, consume) = (median(raw_consumes), median(consumes));
    println!("medians:");
    report("raw async-nats publish (acknowledged)", &raw_publish);
    report("raw async-nats consume (acked)", &raw_consume);
    report("eventos-nats publish (acknowledged)", &publish);
    report("eventos-nats consume (acked)", &consume);

    // End to end: publishers and the router at once, the group there
    // before the first event, as a deployed consumer would be.
    let e2e_topic = "bench.e2e";
    drop(
        transport
            .subscribe(Subscription::new(e2e_topic, "bench").start(StartFrom::Earliest))
            .await?,
    );
    let e2e = e2e(
        &transport, e2e_topic, &payload, n, publishers, batch, prefetch,
    )
    .await?;
    report("eventos-nats end to end (publish -> router -> ack)", &e2e);
    transport.close().await?;
    for name in streams.iter().chain([&raw_stream]) {
        let _ = js.delete_stream(name).await;
    }

    let publish_ratio = publish.per_s() / raw_publish.per_s();
    let consume_ratio = consume.per_s() / raw_consume.per_s();
    println!();
    println!(
        "ratios (1.0 = as fast as raw async-nats on this server, this run): publish {publish_ratio:.3}, consume {consume_ratio:.3}"
    );
    println!(
        "nats publish_ratio={publish_ratio:.3} consume_ratio={consume_ratio:.3} e2e_events_per_s={:.0}",
        e2e.per_s()
    );
    std::io::stdout().flush()?;
    Ok(())
}

async fn raw_publish(
    js: &jetstream::Context,
    subject: &str,
    payload: &Bytes,
    n: u64,
    publishers: usize,
    batch: usize,
) -> anyhow::Result<Measured> {
    let (js, subject, payload) = (js.clone(), subject.to_owned(), payload.clone());
    timed_publishers(n, publishers, batch, "raw", move |k| {
        let (js, subject, payload) = (js.clone(), subject.clone(), payload.clone());
        async move {
            let mut acks = Vec::with_capacity(usize::try_from(k).unwrap_or(0));
            for _ in 0..k {
                let event = bench_event(&payload);
                let body = event.data().cloned().unwrap_or_default();
                acks.push(
                    js.publish_with_headers(subject.clone(), raw_headers(&event), body)
                        .await?,
                );
            }
            for ack in acks {
                ack.await?;
            }
            anyhow::Ok(())
        }
    })
    .await
}

async fn raw_consume(
    js: &jetstream::Context,
    stream: &str,
    group: &str,
    n: u64,
    prefetch: u16,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let consumer: consumer::PullConsumer = js
        .get_stream_no_info(stream)
        .await?
        .create_consumer(consumer::pull::Config {
            durable_name: Some(group.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .context("creating the baseline consumer")?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(usize::from(prefetch))
        .messages()
        .await?;
    let mut seen = 0;
    let mut first = None;
    let consume = async {
        while seen < n {
            let message = messages
                .next()
                .await
                .context("the baseline consumer ended")?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            first.get_or_insert_with(|| started.elapsed());
            message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            seen += 1;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(CASE_LIMIT, consume)
        .await
        .context("the raw consume stalled")??;
    Ok(Measured {
        events: n,
        elapsed: started.elapsed(),
        first,
    })
}
