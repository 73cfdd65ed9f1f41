//! `eventos bench amqp`: what eventos-amqp costs over RabbitMQ itself.
//!
//! The broker sets the pace, and it differs from machine to machine, so the
//! bench runs the same work twice in one run, on the same broker: once with
//! raw `lapin` (the baseline: confirmed publishes of the same bytes and
//! headers, manual acks with the same prefetch) and once through
//! eventos-amqp. It reports both, the ratios, and an end-to-end figure
//! (publish → router → handler → ack). The last line is one `key=value`
//! summary for scripts.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use eventos::Transport;
use eventos_amqp::{AmqpOptions, AmqpTransport, QueueType};
use eventos_core::{Bytes, Event, StartFrom, Subscription};
use futures::StreamExt as _;

use crate::bench_event::bench_event;
use crate::bench_transport::{
    CASE_LIMIT, Load, Measured, e2e, eventos_consume, eventos_publish, report, timed_publishers,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// Options of `eventos bench amqp`.
#[derive(Debug, clap::Args)]
pub(crate) struct AmqpBenchArgs {
    /// The broker.
    #[arg(
        long,
        env = "EVENTOS_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    url: String,
    #[command(flatten)]
    load: Load,
    /// Queue type: quorum (the default, as eventos declares) or classic.
    #[arg(long, default_value = "quorum", value_parser = ["quorum", "classic"])]
    queue_type: String,
}

const PAYLOAD_BYTES: usize = 64;
const TOPIC: &str = "bench.events";

/// What the raw baseline publishes: the body and headers eventos-amqp
/// writes in binary mode, so both sides move the same bytes.
fn raw_properties(event: &Event) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut put = |k: &str, v: &str| {
        headers.insert(
            ShortString::from(format!("cloudEvents:{k}")),
            AMQPValue::LongString(v.into()),
        );
    };
    put("specversion", "1.0");
    put("id", event.id());
    put("source", event.source());
    put("type", event.ty());
    if let Some(time) = event.time() {
        put("time", &time.to_rfc3339());
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

fn queue_args(queue_type: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.into()),
    );
    // Removed by the broker if the bench dies before it deletes them.
    args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    args
}

pub(crate) async fn run(args: AmqpBenchArgs) -> anyhow::Result<()> {
    let (n, publishers, batch, prefetch) = args.load.get();
    let payload = Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    println!(
        "eventos bench amqp: {n} events per case, {PAYLOAD_BYTES}-byte payloads, {publishers} publishers x {batch} per confirmed publish, prefetch {prefetch}, {} queues",
        args.queue_type
    );

    // Raw lapin: the broker's own pace for this work.
    let connection = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .with_context(|| {
            format!(
                "cannot connect to RabbitMQ at {}; is it running? (scripts/services start rabbitmq)",
                eventos_core::redact_url(&args.url)
            )
        })?;
    let raw_queue = format!("bench.raw.{run_id}");
    let setup = connection.create_channel().await?;
    setup
        .queue_declare(
            raw_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            queue_args(&args.queue_type),
        )
        .await
        .context("declaring the baseline queue")?;
    let raw_publish = raw_publish(&connection, &raw_queue, &payload, n, publishers, batch).await?;
    report("raw lapin publish (confirmed)", &raw_publish);
    let raw_consume = raw_consume(&connection, &raw_queue, n, prefetch).await?;
    report("raw lapin consume (acked)", &raw_consume);

    // eventos-amqp: the same work through the transport.
    let options = AmqpOptions {
        namespace: format!("bench{run_id}"),
        queue_type: if args.queue_type == "classic" {
            QueueType::Classic
        } else {
            QueueType::Quorum
        },
        queue_expires: Some(Duration::from_secs(600)),
        ..AmqpOptions::default()
    };
    let transport: Arc<dyn Transport> = Arc::new(
        AmqpTransport::connect(&args.url, options.clone())
            .await
            .context("connecting eventos-amqp")?,
    );
    // Declare the group's queue before publishing, as a deployed consumer
    // would have.
    drop(
        transport
            .subscribe(Subscription::new(TOPIC, "bench").start(StartFrom::Earliest))
            .await?,
    );
    let publish = eventos_publish(&transport, TOPIC, &payload, n, publishers, batch).await?;
    report("eventos-amqp publish (confirmed)", &publish);
    let consume = eventos_consume(&transport, TOPIC, "bench", n, prefetch).await?;
    report("eventos-amqp consume (acked)", &consume);

    // End to end: publishers and the router at once.
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
    report("eventos-amqp end to end (publish -> router -> ack)", &e2e);
    transport.close().await?;
    let _ = setup
        .queue_delete(raw_queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "bench done".into()).await;

    let publish_ratio = publish.per_s() / raw_publish.per_s();
    let consume_ratio = consume.per_s() / raw_consume.per_s();
    println!();
    println!(
        "ratios (1.0 = as fast as raw lapin on this broker, this run): publish {publish_ratio:.3}, consume {consume_ratio:.3}"
    );
    println!(
        "amqp publish_ratio={publish_ratio:.3} consume_ratio={consume_ratio:.3} e2e_events_per_s={:.0}",
        e2e.per_s()
    );
    std::io::stdout().flush()?;
    Ok(())
}

async fn raw_publish(
    connection: &Connection,
    queue: &str,
    payload: &Bytes,
    n: u64,
    publishers: usize,
    batch: usize,
) -> anyhow::Result<Measured> {
    // One confirm channel, shared by every publisher, as eventos-amqp has.
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (queue, payload) = (queue.to_owned(), payload.clone());
    timed_publishers(n, publishers, batch, "raw", move |k| {
        let (channel, queue, payload) = (channel.clone(), queue.clone(), payload.clone());
        async move {
            let mut confirms = Vec::with_capacity(usize::try_from(k).unwrap_or(0));
            for _ in 0..k {
                let event = bench_event(&payload);
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        event.data().map_or(&[][..], |d| &d[..]),
                        raw_properties(&event),
                    )
                    .await?;
                confirms.push(confirm);
            }
            for confirm in confirms {
                let confirmation = confirm.await?;
                anyhow::ensure!(
                    confirmation.is_ack(),
                    "the broker did not confirm a publish"
                );
            }
            anyhow::Ok(())
        }
    })
    .await
}

async fn raw_consume(
    connection: &Connection,
    queue: &str,
    n: u64,
    prefetch: u16,
) -> anyhow::Result<Measured> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut seen = 0;
    let consume = async {
        while seen < n {
            let delivery = consumer
                .next()
                .await
                .context("the baseline consumer ended")??;
            delivery.ack(BasicAckOptions::default()).await?;
            seen += 1;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(CASE_LIMIT, consume)
        .await
        .context("the raw consume stalled")??;
    let elapsed = started.elapsed();
    let _ = channel.close(200, "done".into()).await;
    Ok(Measured {
        events: n,
        elapsed,
        first: None,
    })
}
