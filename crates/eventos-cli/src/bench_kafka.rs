//! `eventos bench kafka`: what eventos-kafka costs over Kafka itself.
//!
//! As `bench amqp`: the same work twice in one run on the same broker,
//! once with raw rdkafka (the baseline: an idempotent `acks=all` producer
//! with the transport's settings, sending the same value and `ce_` headers
//! in batches that each wait for their delivery reports; a consumer that
//! reads every header as text and copies the value, as any CloudEvents
//! consumer must, and stores each offset for librdkafka's auto-commit, the
//! commit policy the transport keeps, fetching with the transport's
//! settings) and once through eventos-kafka, with
//! the ratios and an end-to-end figure. A second raw consumer leaves the
//! records unread (librdkafka parses headers only when asked), for a floor
//! printed on its own line. The last line is one `key=value` summary.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use eventos::Transport;
use eventos_core::{Bytes, Event, StartFrom, Subscription};
use eventos_kafka::{KafkaOptions, KafkaTransport};
use futures::StreamExt as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::bench_event::bench_event;
use crate::bench_transport::{
    CASE_LIMIT, Load, Measured, e2e, eventos_consume, eventos_publish, median, report,
    timed_publishers,
};

/// Options of `eventos bench kafka`.
#[derive(Debug, clap::Args)]
pub(crate) struct KafkaBenchArgs {
    /// The cluster.
    #[arg(long, default_value = "kafka://127.0.0.1:9092")]
    url: String,
    #[command(flatten)]
    load: Load,
    /// Consume rounds, each side in turn; the medians are compared.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    rounds: u64,
}

const PAYLOAD_BYTES: usize = 64;
const TOPIC: &str = "bench.events";
const E2E_TOPIC: &str = "bench.e2e";

/// The headers eventos-kafka writes in binary mode for the bench event, so
/// both sides move the same bytes.
fn raw_headers(event: &Event) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    let time = event.time().map(|t| t.to_rfc3339()).unwrap_or_default();
    for (key, value) in [
        ("ce_specversion", "1.0"),
        ("ce_id", event.id()),
        ("ce_source", event.source()),
        ("ce_type", event.ty()),
        ("ce_time", time.as_str()),
        ("content-type", "application/json"),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

pub(crate) async fn run(args: KafkaBenchArgs) -> anyhow::Result<()> {
    let (n, publishers, batch, prefetch) = args.load.get();
    let rounds = usize::try_from(args.rounds).unwrap_or(5);
    let payload = Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    let servers =
        eventos_kafka::bootstrap_servers(&args.url).map_err(|e| anyhow::anyhow!("{e}"))?;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let options = KafkaOptions {
        namespace: format!("bench{run_id}"),
        ..KafkaOptions::default()
    };
    println!(
        "eventos bench kafka: {n} events per case, {PAYLOAD_BYTES}-byte payloads, {publishers} publishers x {batch} per publish, prefetch {prefetch}, {} partitions, medians of {rounds} consume rounds",
        options.partitions
    );

    // Raw rdkafka: the cluster's own pace for this work.
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", &servers);
    let admin: AdminClient<DefaultClientContext> = base.create()?;
    // Asked first, so an unreachable cluster is said in seconds.
    let probe: BaseConsumer = base.create()?;
    tokio::task::spawn_blocking(move || probe.fetch_metadata(None, Duration::from_secs(10)))
        .await?
        .with_context(|| {
            format!(
                "cannot reach Kafka at {servers}; is it running? (scripts/services start kafka)"
            )
        })?;
    let raw_topic = format!("bench.raw.{run_id}");
    let created = admin
        .create_topics(
            [&NewTopic::new(
                &raw_topic,
                options.partitions,
                TopicReplication::Fixed(options.replication_factor),
            )],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .with_context(|| {
            format!(
                "cannot reach Kafka at {servers}; is it running? (scripts/services start kafka)"
            )
        })?;
    for result in created {
        result.map_err(|(topic, code)| anyhow::anyhow!("creating {topic}: {code}"))?;
    }
    let raw_publish = raw_publish(&base, &raw_topic, &payload, n, publishers, batch).await?;
    report("raw rdkafka publish (idempotent, acks=all)", &raw_publish);

    // eventos-kafka: the same work through the transport.
    let kafka =
        KafkaTransport::connect(&args.url, options.clone()).context("connecting eventos-kafka")?;
    let transport: Arc<dyn Transport> = Arc::new(kafka.clone());
    // The groups exist before publishing, as a deployed consumer's would:
    // one per consume round, each reading the topic from the start.
    let groups: Vec<String> = (1..=rounds).map(|r| format!("bench{r}")).collect();
    let subscriptions = groups
        .iter()
        .map(|group| (TOPIC, group.as_str()))
        .chain([(E2E_TOPIC, "bench")]);
    for (topic, group) in subscriptions {
        drop(
            transport
                .subscribe(Subscription::new(topic, group).start(StartFrom::Earliest))
                .await?,
        );
    }
    // Its producer's first record is not timed either.
    transport
        .publish(TOPIC, vec![bench_event(&payload)])
        .await?;
    let publish = eventos_publish(&transport, TOPIC, &payload, n, publishers, batch).await?;
    report("eventos-kafka publish", &publish);

    // Consumes, round by round, each side in turn: a case lasts a fraction
    // of a second, so one round of each swings with whatever else the
    // machine does; the medians of rounds taken side by side do not.
    let (mut bare, mut raw, mut ours) = (Vec::new(), Vec::new(), Vec::new());
    for (round, group) in groups.iter().enumerate() {
        let b = raw_consume(&base, &raw_topic, n, Read::Nothing, round).await?;
        let r = raw_consume(&base, &raw_topic, n, Read::HeadersAndValue, round).await?;
        let o = eventos_consume(&transport, TOPIC, group, n, prefetch).await?;
        let ms = |m: &Measured| m.first.unwrap_or_default().as_secs_f64() * 1000.0;
        println!(
            "  consume round {}/{rounds}: unread {:.0}, raw {:.0}, eventos {:.0} events/s (ratio {:.3}); first record after {:.0}, {:.0}, {:.0} ms",
            round + 1,
            b.per_s(),
            r.per_s(),
            o.per_s(),
            o.per_s() / r.per_s(),
            ms(&b),
            ms(&r),
            ms(&o),
        );
        bare.push(b);
        raw.push(r);
        ours.push(o);
    }
    let (bare_consume, raw_consume, consume) = (median(bare), median(raw), median(ours));
    report(
        "raw rdkafka consume (offsets stored, records unread)",
        &bare_consume,
    );
    report(
        "raw rdkafka consume (offsets stored, headers and value read)",
        &raw_consume,
    );
    report("eventos-kafka consume (acked)", &consume);
    let e2e = e2e(
        &transport, E2E_TOPIC, &payload, n, publishers, batch, prefetch,
    )
    .await?;
    report("eventos-kafka end to end (publish -> router -> ack)", &e2e);
    transport.close().await?;

    // The run's topics only.
    let ns = &options.namespace;
    let mut topics = vec![raw_topic];
    for topic in [TOPIC, E2E_TOPIC] {
        topics.push(format!("{ns}.{topic}"));
    }
    for group in &groups {
        topics.extend(kafka.retry_topics(TOPIC, group));
    }
    topics.extend(kafka.retry_topics(E2E_TOPIC, "bench"));
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;

    let publish_ratio = publish.per_s() / raw_publish.per_s();
    let consume_ratio = consume.per_s() / raw_consume.per_s();
    println!();
    println!(
        "consume against records left unread: {:.3} (what reading a record's headers costs in librdkafka is in the ratio's baseline)",
        consume.per_s() / bare_consume.per_s()
    );
    println!(
        "ratios (1.0 = as fast as raw rdkafka on this cluster, this run): publish {publish_ratio:.3}, consume {consume_ratio:.3}"
    );
    println!(
        "kafka publish_ratio={publish_ratio:.3} consume_ratio={consume_ratio:.3} e2e_events_per_s={:.0}",
        e2e.per_s()
    );
    std::io::stdout().flush()?;
    Ok(())
}

/// The producer eventos-kafka makes, with the same settings.
fn producer(base: &ClientConfig) -> anyhow::Result<FutureProducer> {
    let mut config = base.clone();
    for (key, value) in eventos_kafka::PRODUCER_SETTINGS {
        config.set(*key, *value);
    }
    Ok(config.create()?)
}

async fn raw_publish(
    base: &ClientConfig,
    topic: &str,
    payload: &Bytes,
    n: u64,
    publishers: usize,
    batch: usize,
) -> anyhow::Result<Measured> {
    // One producer shared by every publisher, as the transport has; its
    // first record (connecting, the idempotent producer id) is not timed.
    let producer = producer(base)?;
    let warm = bench_event(payload);
    producer
        .send(
            FutureRecord::<(), [u8]>::to(topic)
                .payload(warm.data().map_or(&[][..], |d| &d[..]))
                .headers(raw_headers(&warm)),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("the first record was not stored: {e}"))?;
    let (topic, payload) = (topic.to_owned(), payload.clone());
    timed_publishers(n, publishers, batch, "raw", move |k| {
        let (producer, topic, payload) = (producer.clone(), topic.clone(), payload.clone());
        async move {
            let mut reports = Vec::with_capacity(usize::try_from(k).unwrap_or(0));
            for _ in 0..k {
                let event = bench_event(&payload);
                let value = event.data().map_or(&[][..], |d| &d[..]);
                let record = FutureRecord::<(), [u8]>::to(&topic)
                    .payload(value)
                    .headers(raw_headers(&event));
                let report = producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!("queueing a record: {e}"))?;
                reports.push(report);
            }
            for report in reports {
                report
                    .await
                    .context("the producer went away")?
                    .map_err(|(e, _)| anyhow::anyhow!("a record was not stored: {e}"))?;
            }
            anyhow::Ok(())
        }
    })
    .await
}

/// How much of each record the raw consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Nothing: the offset is stored, the record left as it came.
    Nothing,
    /// Every header and the value, into memory of its own: the least a
    /// consumer of CloudEvents does with a record (librdkafka parses a
    /// record's headers only when they are asked for).
    HeadersAndValue,
}

async fn raw_consume(
    base: &ClientConfig,
    topic: &str,
    n: u64,
    read: Read,
    round: usize,
) -> anyhow::Result<Measured> {
    let mut config = base.clone();
    config
        .set("group.id", format!("bench-raw-{read:?}-{round}@{topic}"))
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    // Fetching as the transport's members do: with librdkafka's defaults
    // a consumer slower than its fetches stalls for a second every 100 000
    // records or so, and the ratio would measure that.
    for (key, value) in eventos_kafka::FETCH_SETTINGS {
        config.set(*key, *value);
    }
    let consumer: StreamConsumer = config.create()?;
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let mut seen = 0;
    let mut first = None;
    let consume = async {
        let mut records = consumer.stream();
        while seen < n {
            let record = records
                .next()
                .await
                .context("the consumer's stream ended")??;
            first.get_or_insert_with(|| started.elapsed());
            if read == Read::HeadersAndValue {
                let mut text = 0;
                for header in record.headers().into_iter().flat_map(|h| h.iter()) {
                    text += header
                        .value
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .map_or(0, str::len);
                }
                let value = Bytes::copy_from_slice(record.payload().unwrap_or_default());
                std::hint::black_box((text, value));
            }
            consumer.store_offset_from_message(&record)?;
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
