//! NATS with JetStream, as `scripts/test-deps` runs it: a current server
//! (not Debian's 2.9, which ignores 2.10+ settings), and a message
//! published to a file-backed stream read back by a durable pull consumer.

mod common;

use common::{create_stream, jetstream, nats_publish, nats_read, unique};

#[tokio::test]
async fn the_server_is_2_11_or_newer_with_jetstream() {
    let (client, js) = jetstream().await;
    let info = client.server_info();
    let mut parts = info
        .version
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        (major, minor) >= (2, 11),
        "nats-server {} is older than 2.11: scripts/test-deps builds the pinned one",
        info.version
    );
    assert!(info.jetstream, "the server runs without JetStream (-js)");
    // The JetStream API answers for the default account.
    js.query_account().await.expect("JetStream account info");
}

#[tokio::test]
async fn a_jetstream_message_is_published_and_read_back() {
    let (_client, js) = jetstream().await;
    let name = unique("eventos-smoke");
    let stream = create_stream(&js, &name).await;
    assert_eq!(nats_publish(&js, &name, "evt-1").await, 1);
    assert_eq!(nats_read(&stream, "smoke", 1).await, ["evt-1"]);
    js.delete_stream(&name).await.expect("delete the stream");
}
