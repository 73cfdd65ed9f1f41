//! Closing, reopening and broker restarts.

use std::time::Duration;

use eventos_core::{Subscription, TransportErrorKind};
use futures::StreamExt;
use tokio::time::Instant;

use crate::support::{
    CaseResult, Ctx, OP_TIMEOUT, QUIET, RECEIVE_TIMEOUT, ack, describe, expect_quiet, ids,
    next_delivery, receive_all, subscribe_on,
};

/// How long an open stream may take to end after `close()`.
const STREAM_END_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the harness's broker restart may take: as long as the
/// services script itself allows a stop (30 s) and a start (120 s), since
/// a loaded machine's RabbitMQ took over 30 s to come back. The
/// transport's recovery is timed from the broker's return, by
/// [`RESTART_TIMEOUT`].
pub(crate) const BROKER_RESTART_LIMIT: Duration = Duration::from_secs(180);
/// How long publishing may keep failing transiently, and the next delivery
/// may take, once the restarted broker is back.
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

/// `close()` ends every open stream and refuses later publishes and
/// subscriptions with `Closed`.
pub(crate) async fn close_ends_streams(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let mut stream = ctx.join(&topic, &group).await?;
    // A stream that has delivered is surely connected; an idle one might
    // not be yet, and would end trivially.
    let warmup = ctx.numbered(1);
    ctx.publish(&topic, vec![warmup.clone()]).await?;
    receive_all(
        &mut stream,
        &topic,
        &[warmup.id().to_owned()],
        "warm-up event",
    )
    .await?;

    tokio::time::timeout(OP_TIMEOUT, ctx.transport.close())
        .await
        .map_err(|_| format!("close() did not return within {OP_TIMEOUT:?}"))?
        .map_err(|e| format!("close() failed: {}", describe(&e)))?;

    let deadline = Instant::now() + STREAM_END_TIMEOUT;
    loop {
        tokio::task::coop::consume_budget().await;
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(None) => break,
            // An error saying why the stream ends is fine; it must end next.
            Ok(Some(Err(_))) => {}
            Ok(Some(Ok(delivery))) => {
                return Err(format!(
                    "expected the stream to end after close(), but it delivered event {}",
                    delivery.event().id()
                ));
            }
            Err(_) => {
                return Err(format!(
                    "expected the open stream to end within {STREAM_END_TIMEOUT:?} of close(), \
                     but it is still open"
                ));
            }
        }
    }

    let publish = tokio::time::timeout(
        OP_TIMEOUT,
        ctx.transport.publish(&topic, vec![ctx.numbered(2)]),
    )
    .await
    .map_err(|_| format!("publish after close() did not return within {OP_TIMEOUT:?}"))?;
    match publish {
        Err(e) if e.kind() == TransportErrorKind::Closed => {}
        Err(e) => {
            return Err(format!(
                "expected publish after close() to fail with kind Closed, got {}",
                describe(&e)
            ));
        }
        Ok(()) => {
            return Err(
                "expected publish after close() to fail with kind Closed, but it succeeded".into(),
            );
        }
    }
    let subscribe = tokio::time::timeout(
        OP_TIMEOUT,
        ctx.transport.subscribe(Subscription::new(&topic, &group)),
    )
    .await
    .map_err(|_| format!("subscribe after close() did not return within {OP_TIMEOUT:?}"))?;
    match subscribe {
        Err(e) if e.kind() == TransportErrorKind::Closed => Ok(()),
        Err(e) => Err(format!(
            "expected subscribe after close() to fail with kind Closed, got {}",
            describe(&e)
        )),
        Ok(_) => Err(
            "expected subscribe after close() to fail with kind Closed, but it returned a stream"
                .into(),
        ),
    }
}

/// A persistent transport, closed and opened again, still has what the
/// group had not acked, and only that.
pub(crate) async fn survives_reopen(ctx: Ctx) -> CaseResult {
    const EVENTS: u64 = 100;
    const ACKED: usize = 40;
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let mut stream = ctx.join(&topic, &group).await?;
    let events: Vec<_> = (0..EVENTS).map(|n| ctx.numbered(n)).collect();
    let all = ids(&events);
    ctx.publish(&topic, events).await?;
    let mut acked = Vec::new();
    for i in 0..ACKED {
        let delivery = next_delivery(
            &mut stream,
            RECEIVE_TIMEOUT,
            &format!("event {} of the {ACKED} to ack before closing", i + 1),
        )
        .await?;
        acked.push(delivery.event().id().to_owned());
        ack(delivery).await?;
    }
    drop(stream);
    tokio::time::timeout(OP_TIMEOUT, ctx.transport.close())
        .await
        .map_err(|_| format!("close() did not return within {OP_TIMEOUT:?}"))?
        .map_err(|e| format!("close() failed: {}", describe(&e)))?;

    let reopened = tokio::time::timeout(OP_TIMEOUT, ctx.harness.reopen(&ctx.transport))
        .await
        .map_err(|_| format!("reopening with harness.reopen() took over {OP_TIMEOUT:?}"))?;
    let result = async {
        let mut stream = subscribe_on(&reopened, Subscription::new(&topic, &group)).await?;
        let expected: Vec<String> = all
            .iter()
            .filter(|id| !acked.contains(id))
            .cloned()
            .collect();
        let tally = receive_all(
            &mut stream,
            &topic,
            &expected,
            "events not acked before the transport was closed",
        )
        .await?;
        ensure!(
            tally.unexpected.is_empty(),
            "after reopening, {} event(s) acked before closing came back: {:?}",
            tally.unexpected.len(),
            tally.unexpected
        );
        ensure!(
            tally.duplicates.is_empty(),
            "after reopening, events arrived twice: {:?}",
            tally.duplicates
        );
        expect_quiet(
            &mut stream,
            QUIET,
            "no redelivery of acked events after reopening",
        )
        .await
    }
    .await;
    let _ = tokio::time::timeout(OP_TIMEOUT, reopened.close()).await;
    result
}

/// Publishers and subscribers ride out a broker restart: an event published
/// before and one published after both reach the group.
pub(crate) async fn reconnect_after_broker_restart(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;
    let before = ctx.numbered(1);
    ctx.publish(&topic, vec![before.clone()]).await?;
    receive_all(
        &mut stream,
        &topic,
        &[before.id().to_owned()],
        "event published before the restart",
    )
    .await?;

    let restart = ctx
        .harness
        .restart_broker()
        .ok_or("the harness said at startup it could restart the broker, but now returns None")?;
    tokio::time::timeout(BROKER_RESTART_LIMIT, restart)
        .await
        .map_err(|_| format!("restarting the broker took over {BROKER_RESTART_LIMIT:?}"))?;

    let after = ctx.numbered(2);
    let deadline = Instant::now() + RESTART_TIMEOUT;
    let mut failures = 0usize;
    loop {
        let attempt =
            tokio::time::timeout_at(deadline, ctx.transport.publish(&topic, vec![after.clone()]))
                .await;
        match attempt {
            Ok(Ok(())) => break,
            Ok(Err(e)) if e.is_transient() && Instant::now() < deadline => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(e)) => {
                return Err(format!(
                    "publishing after the broker restart failed (after {failures} transient \
                     failure(s)): {}",
                    describe(&e)
                ));
            }
            Err(_) => {
                return Err(format!(
                    "publishing after the broker restart did not succeed within \
                     {RESTART_TIMEOUT:?} ({failures} transient failure(s))"
                ));
            }
        }
    }
    let delivery = next_delivery(
        &mut stream,
        RESTART_TIMEOUT,
        "the event published after the restart",
    )
    .await?;
    let got = delivery.event().id().to_owned();
    ack(delivery).await?;
    ensure!(
        got == after.id(),
        "expected the event published after the restart ({}), got {got} (the one from before \
         is {})",
        after.id(),
        before.id()
    );
    Ok(())
}
