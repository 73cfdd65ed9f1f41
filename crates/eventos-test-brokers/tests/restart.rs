//! `scripts/services restart <broker>` brings each broker back with its
//! data: what was acknowledged before the restart is read after it, and
//! the broker takes new writes. One test per broker; each restarts only its
//! own, and no other test binary runs while this one does.

mod common;

use common::{
    WAIT, amqp, create_stream, create_topic, delete_topic, jetstream, kafka_admin, kafka_produce,
    kafka_read, nats_publish, nats_read, unique,
};
use eventos_test_brokers::Broker;
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread")]
async fn nats_keeps_its_streams_across_a_restart() {
    let name = unique("eventos-restart");
    {
        let (_client, js) = jetstream().await;
        create_stream(&js, &name).await;
        assert_eq!(nats_publish(&js, &name, "before").await, 1);
    }
    tokio::task::spawn_blocking(|| Broker::Nats.restart())
        .await
        .unwrap();
    let (_client, js) = jetstream().await;
    assert_eq!(nats_publish(&js, &name, "after").await, 2);
    let stream = js.get_stream(&name).await.expect("the stream survived");
    assert_eq!(nats_read(&stream, "restart", 2).await, ["before", "after"]);
    js.delete_stream(&name).await.expect("delete the stream");
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_keeps_its_topics_and_offsets_across_a_restart() {
    let topic = unique("eventos-restart");
    let group = unique("restart");
    create_topic(&kafka_admin(), &topic).await;
    kafka_produce(&topic, "k", "before").await;
    assert_eq!(kafka_read(&topic, &group, 1).await[0].1, "before");
    tokio::task::spawn_blocking(|| Broker::Kafka.restart())
        .await
        .unwrap();
    assert_eq!(kafka_produce(&topic, "k", "after").await, 1);
    // The group's committed offset survived: it resumes after "before".
    assert_eq!(kafka_read(&topic, &group, 1).await[0].1, "after");
    delete_topic(&kafka_admin(), &topic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_keeps_its_quorum_queues_across_a_restart() {
    let queue = unique("eventos-restart");
    {
        let conn = amqp().await;
        let channel = conn.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.as_str().into(), durable, args)
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"before",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "the broker confirmed the publish");
        conn.close(200, "bye".into()).await.unwrap();
    }
    tokio::task::spawn_blocking(|| Broker::RabbitMq.restart())
        .await
        .unwrap();
    let conn = amqp().await;
    let channel = conn.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "restart".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = timeout(WAIT, consumer.next())
        .await
        .expect("no delivery after the restart in time")
        .expect("the consumer ended")
        .expect("a delivery");
    assert_eq!(delivery.data, b"before");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}
