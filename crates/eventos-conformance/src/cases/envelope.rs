//! The event arrives as it was sent, with an honest delivery record.

use eventos_core::chrono::{TimeZone, Utc};
use eventos_core::{Event, ext};
use rand::RngCore;

use crate::support::{CaseResult, Ctx, RECEIVE_TIMEOUT, ack, next_delivery};

/// Every CloudEvents attribute survives the trip.
///
/// Binary bindings carry extensions as header strings, so extensions are
/// compared by their string form; everything else must be exact, down to the
/// nanoseconds of `time` and every byte of a payload that is not UTF-8.
pub(crate) async fn roundtrip_every_attribute(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;

    let time = Utc
        .timestamp_opt(1_700_000_000, 123_456_789)
        .single()
        .ok_or("the fixed test timestamp is invalid")?;
    // Every byte value, then sequences that are invalid UTF-8 on purpose.
    let mut data: Vec<u8> = (0..=255u8).collect();
    data.extend_from_slice(&[0xc3, 0x28, 0xff, 0xfe, 0x00, 0xed, 0xa0, 0x80]);
    let sent = Event::builder(
        "https://example.com/conformance/every-attribute?x=1&y=2",
        "com.example.conformance.every_attribute.v1",
    )
    .id(format!("every-attribute-{}", uuid::Uuid::now_v7()))
    .subject("students/42/enrollments/7")
    .time(Some(time))
    .dataschema("https://example.com/schemas/every-attribute.v1.json")
    .data("application/vnd.example.thrift+binary", data)
    .extension("strext", "hello, wörld ☃; a=b,c")
    .and_then(|b| b.extension("emptyext", ""))
    .and_then(|b| b.extension("intext", 42i64))
    .and_then(|b| b.extension("negext", -2_147_483_648i64))
    .and_then(|b| b.extension("boolext", true))
    .and_then(|b| b.extension("falseext", false))
    .and_then(|b| {
        b.extension(
            ext::TRACEPARENT,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
    })
    .and_then(|b| b.extension(ext::CORRELATION_ID, "corr-every-attribute"))
    .and_then(|b| b.build())
    .map_err(|e| format!("building the test event failed: {e}"))?;

    ctx.publish(&topic, vec![sent.clone()]).await?;
    let delivery = next_delivery(&mut stream, RECEIVE_TIMEOUT, "the published event").await?;
    let got = delivery.event().clone();
    ack(delivery).await?;

    let mut wrong = Vec::new();
    let mut check = |attribute: &str, expected: String, actual: String| {
        if expected != actual {
            wrong.push(format!("{attribute}: expected {expected}, got {actual}"));
        }
    };
    check("id", format!("{:?}", sent.id()), format!("{:?}", got.id()));
    check(
        "source",
        format!("{:?}", sent.source()),
        format!("{:?}", got.source()),
    );
    check(
        "type",
        format!("{:?}", sent.ty()),
        format!("{:?}", got.ty()),
    );
    check(
        "subject",
        format!("{:?}", sent.subject()),
        format!("{:?}", got.subject()),
    );
    check(
        "time",
        format!("{:?}", sent.time()),
        format!("{:?}", got.time()),
    );
    check(
        "datacontenttype",
        format!("{:?}", sent.datacontenttype()),
        format!("{:?}", got.datacontenttype()),
    );
    check(
        "dataschema",
        format!("{:?}", sent.dataschema()),
        format!("{:?}", got.dataschema()),
    );
    for (name, value) in sent.extensions() {
        check(
            &format!("extension {name}"),
            format!("{:?}", Some(value.to_string())),
            format!("{:?}", got.extension(name).map(ToString::to_string)),
        );
    }
    for name in got.extensions().keys() {
        // A transport may stamp the consumer's attempt on the copy it hands
        // out; any other addition would change what the handler sees.
        if sent.extension(name).is_none() && name != ext::ATTEMPT {
            wrong.push(format!(
                "extension {name}: not sent, but arrived as {:?}",
                got.extension(name).map(ToString::to_string)
            ));
        }
    }
    if let Some(difference) = compare_bytes(sent.data(), got.data()) {
        wrong.push(format!("data: {difference}"));
    }
    ensure!(
        wrong.is_empty(),
        "the event did not arrive as sent:\n  {}",
        wrong.join("\n  ")
    );
    Ok(())
}

/// The delivery says where it came from and that it is the first attempt.
pub(crate) async fn stream_delivers_the_attempt_and_topic(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let mut stream = ctx.join(&topic, &group).await?;
    let sent = ctx.numbered(1);
    ctx.publish(&topic, vec![sent.clone()]).await?;
    let delivery = next_delivery(&mut stream, RECEIVE_TIMEOUT, "the published event").await?;
    let info = delivery.info().clone();
    let (id, attempt) = (delivery.event().id().to_owned(), delivery.attempt());
    ack(delivery).await?;
    ensure!(
        id == sent.id(),
        "expected event {}, got event {id}",
        sent.id()
    );
    ensure!(
        *info.topic == *topic,
        "expected DeliveryInfo.topic {topic:?}, got {:?}",
        info.topic
    );
    ensure!(
        *info.group == *group,
        "expected DeliveryInfo.group {group:?}, got {:?}",
        info.group
    );
    ensure!(
        info.attempt == 1 && attempt == 1,
        "expected attempt 1 on first delivery, got DeliveryInfo.attempt {} (Delivery::attempt {attempt})",
        info.attempt
    );
    Ok(())
}

/// A payload of `min(1 MiB, max_payload_bytes)` random bytes round-trips
/// byte for byte: the limit a transport claims is a size it must carry.
pub(crate) async fn one_mib_payload(ctx: Ctx) -> CaseResult {
    let size = (1024 * 1024).min(ctx.caps.max_payload_bytes);
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;
    let mut data = vec![0u8; size];
    rand::rng().fill_bytes(&mut data);
    let sent = Event::builder(ctx.source(), "eventos.conformance.large.v1")
        .data("application/octet-stream", data)
        .build()
        .map_err(|e| format!("building the test event failed: {e}"))?;
    ctx.publish(&topic, vec![sent.clone()]).await?;
    let delivery = next_delivery(
        &mut stream,
        RECEIVE_TIMEOUT,
        &format!("the {size}-byte event"),
    )
    .await?;
    let got = delivery.event().clone();
    ack(delivery).await?;
    ensure!(
        got.id() == sent.id(),
        "expected event {}, got {}",
        sent.id(),
        got.id()
    );
    if let Some(difference) = compare_bytes(sent.data(), got.data()) {
        return Err(format!("the {size}-byte payload changed: {difference}"));
    }
    Ok(())
}

/// Describes how two payloads differ, or `None` if they are equal.
fn compare_bytes(expected: Option<&bytes::Bytes>, actual: Option<&bytes::Bytes>) -> Option<String> {
    match (expected, actual) {
        (None, None) => None,
        (Some(_), None) => Some("expected a payload, got none".into()),
        (None, Some(a)) => Some(format!("expected no payload, got {} bytes", a.len())),
        (Some(e), Some(a)) if e == a => None,
        (Some(e), Some(a)) => {
            let first = e.iter().zip(a.iter()).position(|(x, y)| x != y);
            Some(match first {
                Some(i) => format!(
                    "expected {} bytes, got {}; first difference at offset {i}: expected {:#04x}, got {:#04x}",
                    e.len(),
                    a.len(),
                    e[i],
                    a[i]
                ),
                None => format!(
                    "expected {} bytes, got {} (one is a prefix of the other)",
                    e.len(),
                    a.len()
                ),
            })
        }
    }
}
