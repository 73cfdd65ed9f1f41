//! What a transport refuses, and that refusing leaves it working.

use eventos_core::{Event, Subscription, TransportErrorKind};

use crate::support::{
    CaseResult, Ctx, OP_TIMEOUT, QUIET, RECEIVE_TIMEOUT, ack, describe, expect_quiet, next_delivery,
};

/// A payload one byte over `max_payload_bytes` is rejected as `Rejected`,
/// nothing is delivered, and the next event goes through.
pub(crate) async fn oversize_payload_is_rejected(ctx: Ctx) -> CaseResult {
    let size = ctx.caps.max_payload_bytes + 1;
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;
    let oversize = Event::builder(ctx.source(), "eventos.conformance.oversize.v1")
        .data("application/octet-stream", vec![0x5a; size])
        .build()
        .map_err(|e| format!("building the test event failed: {e}"))?;
    let what = format!(
        "publishing a {size}-byte payload (max_payload_bytes is {})",
        ctx.caps.max_payload_bytes
    );
    let result = tokio::time::timeout(OP_TIMEOUT, ctx.transport.publish(&topic, vec![oversize]))
        .await
        .map_err(|_| format!("{what} did not return within {OP_TIMEOUT:?}"))?;
    match result {
        Ok(()) => {
            return Err(format!(
                "expected {what} to fail with kind Rejected, but it succeeded"
            ));
        }
        Err(e) if e.kind() == TransportErrorKind::Rejected => {}
        Err(e) => {
            return Err(format!(
                "expected {what} to fail with kind Rejected, but it failed with {}",
                describe(&e)
            ));
        }
    }
    expect_quiet(&mut stream, QUIET, "no delivery of the rejected event").await?;
    let sentinel = ctx.numbered(1);
    ctx.publish(&topic, vec![sentinel.clone()]).await?;
    let delivery = next_delivery(
        &mut stream,
        RECEIVE_TIMEOUT,
        "the event published after the rejected one",
    )
    .await?;
    let got = delivery.event().id().to_owned();
    ack(delivery).await?;
    ensure!(
        got == sentinel.id(),
        "expected the event published after the rejected one ({}), got {got}",
        sentinel.id()
    );
    Ok(())
}

/// Topic and group names outside the naming rule fail with `InvalidName`,
/// on publish and on subscribe; a name at the 200-character limit works.
pub(crate) async fn invalid_names_are_rejected(ctx: Ctx) -> CaseResult {
    let good_topic = ctx.name("t");
    let good_group = ctx.name("g");
    let too_long = format!("{}.{}", good_topic, "x".repeat(200 - good_topic.len()));
    let bad = ["", ".x", "a b", "caf\u{e9}", "a/b", "a*", too_long.as_str()];
    let mut wrong = Vec::new();
    for name in bad {
        let publish = ctx.transport.publish(name, vec![ctx.numbered(1)]);
        check_invalid(&mut wrong, format!("publish to topic {name:?}"), publish).await?;
        let sub = ctx
            .transport
            .subscribe(Subscription::new(name, &good_group));
        check_invalid(&mut wrong, format!("subscribe to topic {name:?}"), sub).await?;
        let sub = ctx
            .transport
            .subscribe(Subscription::new(&good_topic, name));
        check_invalid(&mut wrong, format!("subscribe with group {name:?}"), sub).await?;
    }
    ensure!(
        wrong.is_empty(),
        "invalid names were not refused with kind InvalidName:\n  {}",
        wrong.join("\n  ")
    );

    // The limit itself is a valid name: 200 characters, accepted everywhere.
    let longest = &too_long[..200];
    let mut stream = ctx.join(longest, longest).await?;
    let sent = ctx.numbered(2);
    ctx.publish(longest, vec![sent.clone()]).await?;
    let delivery = next_delivery(
        &mut stream,
        RECEIVE_TIMEOUT,
        "the event on a topic with a 200-character name",
    )
    .await?;
    let got = delivery.event().id().to_owned();
    ack(delivery).await?;
    ensure!(
        got == sent.id(),
        "expected event {} on the 200-character topic, got {got}",
        sent.id()
    );
    Ok(())
}

/// Records in `wrong` unless `call` fails with `InvalidName`.
async fn check_invalid<T>(
    wrong: &mut Vec<String>,
    what: String,
    call: impl Future<Output = Result<T, eventos_core::TransportError>>,
) -> CaseResult {
    let result = tokio::time::timeout(OP_TIMEOUT, call)
        .await
        .map_err(|_| format!("{what} did not return within {OP_TIMEOUT:?}"))?;
    match result {
        Ok(_) => wrong.push(format!("{what}: succeeded")),
        Err(e) if e.kind() == TransportErrorKind::InvalidName => {}
        Err(e) => wrong.push(format!("{what}: failed with {}", describe(&e))),
    }
    Ok(())
}
