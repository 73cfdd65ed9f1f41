//! What eventos publishes on RabbitMQ is read by a client that is not
//! eventos: Python's pika with the official CloudEvents SDK (its AMQP
//! binding), in binary and in structured mode. The SDK must see the same
//! id, source, type, subject, time, extensions and data.
//!
//! `scripts/test-deps` sets up `target/interop-venv` with both; the test
//! fails (never skips) when it or RabbitMQ is missing.

use eventos_amqp::{AmqpOptions, AmqpTransport, ContentMode};
use eventos_core::{Publisher as _, StartFrom, Subscriber as _, Subscription, Transport as _};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

async fn roundtrip(mode: ContentMode) {
    let options = AmqpOptions {
        namespace: format!("interop{}", uuid::Uuid::now_v7().simple()),
        mode,
        ..AmqpOptions::default()
    };
    let transport = AmqpTransport::connect(AMQP, options).await.unwrap();
    let topic = "school.enrollment.payment_submitted";
    // Declare the group's queue, then leave it to the Python reader.
    drop(
        transport
            .subscribe(Subscription::new(topic, "python").start(StartFrom::Earliest))
            .await
            .unwrap(),
    );
    let (json, text) = eventos_test_brokers::interop::sample_events("enr-1");
    transport
        .publish(topic, vec![json.clone(), text.clone()])
        .await
        .unwrap();
    let queue = transport.queue_name(topic, "python");
    transport.close().await.unwrap();
    let reader_queue = queue.clone();
    let read = tokio::task::spawn_blocking(move || {
        let args = [AMQP, &reader_queue, "2", "20"].map(str::to_owned);
        eventos_test_brokers::run_interop("read_cloudevents.py", &args)
    })
    .await
    .unwrap();
    eventos_test_brokers::interop::check_read(&read, &json, &text);

    // The queue was this test's alone.
    let connection = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn the_python_cloudevents_sdk_reads_binary_mode() {
    roundtrip(ContentMode::Binary).await;
}

#[tokio::test]
async fn the_python_cloudevents_sdk_reads_structured_mode() {
    roundtrip(ContentMode::Structured).await;
}
