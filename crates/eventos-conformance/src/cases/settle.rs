//! Settling: every delivery ends in ack, retry or dead letter, and one that
//! is never settled is not lost.

use std::time::Duration;

use eventos_core::{
    Delivery, DeliveryStream, Outcome, StartFrom, Subscription, dead_letter_topic, ext,
};
use tokio::time::Instant;

use crate::support::{
    CaseResult, Ctx, QUIET, RECEIVE_TIMEOUT, ack, expect_quiet, next_delivery, settle,
};

/// Clock granularity allowed when checking a retry came no sooner than
/// asked: timers on some platforms fire up to a tick early relative to
/// `Instant`.
const EPSILON: Duration = Duration::from_millis(10);

/// Waits for a delivery of the event `id`, failing if another arrives.
async fn expect_event(
    stream: &mut DeliveryStream,
    id: &str,
    within: Duration,
    what: &str,
) -> Result<Delivery, String> {
    let delivery = next_delivery(stream, within, what).await?;
    ensure!(
        delivery.event().id() == id,
        "expected {what} (event {id}), but event {} arrived (attempt {})",
        delivery.event().id(),
        delivery.attempt()
    );
    Ok(delivery)
}

/// An acked event is never delivered to the group again, and the group goes
/// on receiving.
pub(crate) async fn ack_is_final(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;
    let first = ctx.numbered(1);
    ctx.publish(&topic, vec![first.clone()]).await?;
    let delivery = expect_event(&mut stream, first.id(), RECEIVE_TIMEOUT, "the event").await?;
    ack(delivery).await?;
    expect_quiet(&mut stream, QUIET, "no redelivery of the acked event").await?;
    let second = ctx.numbered(2);
    ctx.publish(&topic, vec![second.clone()]).await?;
    let delivery = expect_event(
        &mut stream,
        second.id(),
        RECEIVE_TIMEOUT,
        "the event published after the ack",
    )
    .await?;
    ack(delivery).await
}

/// Each retry redelivers the same event with the attempt one higher.
///
/// Runs whatever the capabilities say: without `delayed_retry` the delay may
/// not be honoured, but the redelivery must still come.
pub(crate) async fn retry_increments_attempt(ctx: Ctx) -> CaseResult {
    const RETRIES: u32 = 3;
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;
    let sent = ctx.numbered(1);
    ctx.publish(&topic, vec![sent.clone()]).await?;
    for attempt in 1..=RETRIES + 1 {
        let delivery = expect_event(
            &mut stream,
            sent.id(),
            RECEIVE_TIMEOUT,
            &format!("attempt {attempt} of the event"),
        )
        .await?;
        ensure!(
            delivery.attempt() == attempt,
            "expected attempt {attempt} after {} retries, got attempt {}",
            attempt - 1,
            delivery.attempt()
        );
        ensure!(
            delivery.event().data() == sent.data(),
            "the payload changed between attempts"
        );
        let outcome = if attempt <= RETRIES {
            Outcome::Retry {
                after: Duration::from_millis(50),
            }
        } else {
            Outcome::Ack
        };
        settle(delivery, outcome).await?;
    }
    expect_quiet(&mut stream, QUIET, "no delivery after the final ack").await
}

/// A retry comes back no sooner than the delay asked for, as attempt 2.
///
/// The delay is measured from the moment `settle` was *called*: that is the
/// only point a correct transport is certain to have been told, while the
/// call's return may come after the broker already started the clock (a
/// delayed publish confirmed over the network).
pub(crate) async fn retry_after_redelivers_no_earlier_than_asked(ctx: Ctx) -> CaseResult {
    const AFTER: Duration = Duration::from_millis(800);
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;
    let sent = ctx.numbered(1);
    ctx.publish(&topic, vec![sent.clone()]).await?;
    let delivery = expect_event(&mut stream, sent.id(), RECEIVE_TIMEOUT, "the event").await?;
    ensure!(
        delivery.attempt() == 1,
        "expected attempt 1 on first delivery, got {}",
        delivery.attempt()
    );
    let called = Instant::now();
    settle(delivery, Outcome::Retry { after: AFTER }).await?;
    let returned = Instant::now();
    let again = expect_event(
        &mut stream,
        sent.id(),
        AFTER + RECEIVE_TIMEOUT,
        "the retried event",
    )
    .await?;
    let arrived = Instant::now();
    let attempt = again.attempt();
    ack(again).await?;
    let since_call = arrived - called;
    ensure!(
        since_call + EPSILON >= AFTER,
        "asked to retry after {AFTER:?}, but the event came back {since_call:?} after settle was \
         called ({:?} after it returned)",
        arrived - returned
    );
    ensure!(
        attempt == 2,
        "expected the retried event as attempt 2, got attempt {attempt}"
    );
    Ok(())
}

/// A retry by one group is that group's business: the other group, which
/// acked, does not see the event again.
pub(crate) async fn retry_stays_in_its_group(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let mut retrying = ctx.join(&topic, &ctx.name("retrying")).await?;
    let mut acking = ctx.join(&topic, &ctx.name("acking")).await?;
    let sent = ctx.numbered(1);
    ctx.publish(&topic, vec![sent.clone()]).await?;

    let delivery = expect_event(
        &mut acking,
        sent.id(),
        RECEIVE_TIMEOUT,
        "the event in the acking group",
    )
    .await?;
    ack(delivery).await?;
    let delivery = expect_event(
        &mut retrying,
        sent.id(),
        RECEIVE_TIMEOUT,
        "the event in the retrying group",
    )
    .await?;
    settle(
        delivery,
        Outcome::Retry {
            after: Duration::from_millis(50),
        },
    )
    .await?;
    let again = expect_event(
        &mut retrying,
        sent.id(),
        RECEIVE_TIMEOUT,
        "the retried event in the retrying group",
    )
    .await?;
    ensure!(
        again.attempt() == 2,
        "expected the retry as attempt 2 in the retrying group, got {}",
        again.attempt()
    );
    ack(again).await?;
    let (a, b) = futures::join!(
        expect_quiet(
            &mut acking,
            QUIET,
            "nothing more in the group that acked, although another group retried"
        ),
        expect_quiet(&mut retrying, QUIET, "nothing more after the ack"),
    );
    a.and(b)
}

/// A dead-lettered event lands on the dead-letter topic with the reason
/// and provenance, and is not redelivered to its group.
pub(crate) async fn dead_letter_lands_with_reason(ctx: Ctx) -> CaseResult {
    const REASON: &str = "retries exhausted after 1 attempt";
    const ERROR: &str = "card declined: insufficient funds";
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let dlq = dead_letter_topic(&topic);
    // Joined first, so the dead letter is waiting whether or not the
    // transport can replay.
    let mut dead_letters = ctx
        .subscribe(Subscription::new(&dlq, ctx.name("dlq")).start(StartFrom::Earliest))
        .await?;
    let mut stream = ctx.join(&topic, &group).await?;
    let sent = ctx.numbered(7);
    ctx.publish(&topic, vec![sent.clone()]).await?;
    let delivery = expect_event(&mut stream, sent.id(), RECEIVE_TIMEOUT, "the event").await?;
    let attempt = delivery.attempt();
    settle(
        delivery,
        Outcome::DeadLetter(eventos_core::DeadLetter {
            reason: REASON.to_owned(),
            error: Some(ERROR.to_owned()),
        }),
    )
    .await?;

    let dead = expect_event(
        &mut dead_letters,
        sent.id(),
        RECEIVE_TIMEOUT,
        &format!("the dead letter on {dlq:?}"),
    )
    .await?;
    let got = dead.event().clone();
    let dead_topic = dead.info().topic.clone();
    ack(dead).await?;

    let mut wrong = Vec::new();
    if *dead_topic != *dlq {
        wrong.push(format!(
            "delivery topic: expected {dlq:?}, got {dead_topic:?}"
        ));
    }
    if got.data() != sent.data() {
        wrong.push(format!(
            "payload: expected {:?}, got {:?}",
            sent.data(),
            got.data()
        ));
    }
    if (got.source(), got.ty()) != (sent.source(), sent.ty()) {
        wrong.push(format!(
            "source/type: expected {:?}/{:?}, got {:?}/{:?}",
            sent.source(),
            sent.ty(),
            got.source(),
            got.ty()
        ));
    }
    let attempt = attempt.to_string();
    for (name, expected) in [
        (ext::DEAD_LETTER_REASON, REASON),
        (ext::DEAD_LETTER_ERROR, ERROR),
        (ext::DEAD_LETTER_ATTEMPTS, attempt.as_str()),
        (ext::DEAD_LETTER_TOPIC, topic.as_str()),
        (ext::DEAD_LETTER_GROUP, group.as_str()),
    ] {
        let actual = got.extension(name).map(ToString::to_string);
        if actual.as_deref() != Some(expected) {
            wrong.push(format!(
                "extension {name}: expected {expected:?}, got {actual:?}"
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "the dead letter is not the event with its reason:\n  {}",
        wrong.join("\n  ")
    );
    expect_quiet(
        &mut stream,
        QUIET,
        "no redelivery of the dead-lettered event to its group",
    )
    .await
}

/// A delivery dropped without settling (its handler task aborted) comes
/// back to the same, still subscribed, member.
pub(crate) async fn dropped_settlement_is_redelivered(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;
    let sent = ctx.numbered(1);
    ctx.publish(&topic, vec![sent.clone()]).await?;
    let delivery = expect_event(&mut stream, sent.id(), RECEIVE_TIMEOUT, "the event").await?;
    drop(delivery);
    let again = expect_event(
        &mut stream,
        sent.id(),
        RECEIVE_TIMEOUT,
        "the event again after its delivery was dropped unsettled",
    )
    .await?;
    let attempt = again.attempt();
    ack(again).await?;
    check_redelivery_attempt(&ctx, attempt)?;
    expect_quiet(&mut stream, QUIET, "nothing more after the ack").await
}

/// A delivery left unsettled when its member goes away reaches another
/// member of the group.
///
/// The second member joins before the first leaves, so the case holds for
/// transports that do not buffer for idle groups too.
pub(crate) async fn unsettled_delivery_is_redelivered(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let mut leaving = ctx
        .subscribe(Subscription::new(&topic, &group).prefetch(1))
        .await?;
    let sent = ctx.numbered(1);
    ctx.publish(&topic, vec![sent.clone()]).await?;
    let delivery = expect_event(&mut leaving, sent.id(), RECEIVE_TIMEOUT, "the event").await?;
    let mut staying = ctx.join(&topic, &group).await?;
    drop(delivery);
    drop(leaving);
    let again = expect_event(
        &mut staying,
        sent.id(),
        RECEIVE_TIMEOUT,
        "the unsettled event at the member that stayed",
    )
    .await?;
    let attempt = again.attempt();
    ack(again).await?;
    check_redelivery_attempt(&ctx, attempt)?;
    expect_quiet(&mut staying, QUIET, "nothing more after the ack").await
}

/// The contract counts every redelivery; some brokers cannot tell one from
/// a first delivery, so attempt 1 is accepted with a note, 0 never.
fn check_redelivery_attempt(ctx: &Ctx, attempt: u32) -> CaseResult {
    ensure!(
        attempt >= 1,
        "attempt numbers are 1-based, but the redelivery came with attempt {attempt}"
    );
    if attempt == 1 {
        eprintln!(
            "note: {}: transport {:?} redelivered an unsettled event as attempt 1; the contract \
             asks for 2",
            ctx.case,
            ctx.transport.name()
        );
    }
    Ok(())
}
