//! Publishing and receiving: order, isolation, where a new group starts,
//! how much a subscriber holds.

use std::collections::HashSet;
use std::time::Duration;

use eventos_core::{StartFrom, Subscription};
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;

use crate::support::{
    CaseResult, Ctx, QUIET, RECEIVE_TIMEOUT, ack, describe, expect_quiet, ids, next_delivery,
    number, publish_on, receive_all, sample,
};

/// A batch published in one call reaches a single consumer in publish order.
///
/// The events share a subject so that transports which partition by key
/// (Kafka) keep them on one partition: order across keys is not promised,
/// order within one publish call to one key is. Each delivery is acked
/// before the next is awaited, since a transport with per-key ordering hands
/// out one event of a key at a time.
pub(crate) async fn publish_batch_preserves_order(ctx: Ctx) -> CaseResult {
    const COUNT: u64 = 100;
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;
    let batch: Vec<_> = (0..COUNT).map(|n| ctx.keyed(n, "order-key")).collect();
    ctx.publish(&topic, batch).await?;
    let mut received = Vec::new();
    for position in 0..COUNT {
        let delivery = next_delivery(
            &mut stream,
            RECEIVE_TIMEOUT,
            &format!("event #{position} of the batch of {COUNT}"),
        )
        .await?;
        let n = number(delivery.event())?;
        ack(delivery).await?;
        received.push(n);
        ensure!(
            n == position,
            "expected the batch in publish order, but position {position} held event #{n} \
             (received so far: {received:?})"
        );
    }
    Ok(())
}

/// A subscriber of one topic sees none of another topic's events.
pub(crate) async fn topics_are_isolated(ctx: Ctx) -> CaseResult {
    let (topic_a, topic_b) = (ctx.name("a"), ctx.name("b"));
    let mut stream_a = ctx.join(&topic_a, &ctx.name("ga")).await?;
    let mut stream_b = ctx.join(&topic_b, &ctx.name("gb")).await?;
    let events_a: Vec<_> = (0..5).map(|n| ctx.numbered(n)).collect();
    let events_b: Vec<_> = (100..105).map(|n| ctx.numbered(n)).collect();
    let (ids_a, ids_b) = (ids(&events_a), ids(&events_b));
    ctx.publish(&topic_a, events_a).await?;
    ctx.publish(&topic_b, events_b).await?;

    for (stream, topic, expected, other) in [
        (&mut stream_a, &topic_a, &ids_a, &ids_b),
        (&mut stream_b, &topic_b, &ids_b, &ids_a),
    ] {
        let tally = receive_all(stream, topic, expected, &format!("events of {topic:?}")).await?;
        let leaked: Vec<_> = tally
            .unexpected
            .iter()
            .filter(|id| other.contains(id))
            .collect();
        ensure!(
            leaked.is_empty(),
            "a subscriber of {topic:?} received {} event(s) published to the other topic: {leaked:?}",
            leaked.len()
        );
        ensure!(
            tally.unexpected.is_empty() && tally.duplicates.is_empty(),
            "a subscriber of {topic:?} received unexpected {:?} and duplicates {:?}",
            tally.unexpected,
            tally.duplicates
        );
    }
    let (quiet_a, quiet_b) = futures::join!(
        expect_quiet(&mut stream_a, QUIET, "no more deliveries on topic a"),
        expect_quiet(&mut stream_b, QUIET, "no more deliveries on topic b"),
    );
    quiet_a.and(quiet_b)
}

/// Publishing nothing succeeds and delivers nothing; the subscription then
/// still works.
pub(crate) async fn empty_batch_is_ok(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;
    ctx.publish(&topic, Vec::new()).await?;
    expect_quiet(&mut stream, QUIET, "no delivery after an empty publish").await?;
    // Without this, a subscription that never worked would pass the check.
    let sentinel = ctx.numbered(1);
    ctx.publish(&topic, vec![sentinel.clone()]).await?;
    let tally = receive_all(
        &mut stream,
        &topic,
        &[sentinel.id().to_owned()],
        "event published after the empty batch",
    )
    .await?;
    ensure!(
        tally.events.len() == 1,
        "expected only the event published after the empty batch, got {} deliveries: {:?}",
        tally.events.len(),
        tally.events.iter().map(|e| e.id()).collect::<Vec<_>>()
    );
    Ok(())
}

/// A new group that starts at `Latest` sees only what is published after it
/// joined.
///
/// With consumer groups, an existing group keeps the first event retained
/// in the transport, which is what makes skipping it meaningful; without
/// them the first event is published with nobody listening.
pub(crate) async fn new_group_starts_at_latest(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let mut existing = if ctx.caps.consumer_groups {
        Some(ctx.join(&topic, &ctx.name("existing")).await?)
    } else {
        None
    };
    let before = ctx.numbered(1);
    ctx.publish(&topic, vec![before.clone()]).await?;
    if let Some(stream) = existing.as_mut() {
        receive_all(stream, &topic, &[before.id().to_owned()], "first event").await?;
    }

    let sub = Subscription::new(&topic, ctx.name("late")).start(StartFrom::Latest);
    let mut late = ctx.subscribe(sub).await?;
    let after = ctx.numbered(2);
    ctx.publish(&topic, vec![after.clone()]).await?;
    let delivery = next_delivery(
        &mut late,
        RECEIVE_TIMEOUT,
        "the event published after the Latest group joined",
    )
    .await?;
    let got = delivery.event().id().to_owned();
    ack(delivery).await?;
    ensure!(
        got == after.id(),
        "a group starting at Latest got event {got}; expected only the event published after it \
         joined ({}), not the one published before ({})",
        after.id(),
        before.id()
    );
    expect_quiet(&mut late, QUIET, "nothing more for the Latest group").await
}

/// A new group that starts at `Earliest` reads what was published before it
/// existed.
pub(crate) async fn new_group_replays_from_earliest(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let before = ctx.numbered(1);
    ctx.publish(&topic, vec![before.clone()]).await?;
    let sub = Subscription::new(&topic, ctx.name("g")).start(StartFrom::Earliest);
    let mut stream = ctx.subscribe(sub).await?;
    receive_all(
        &mut stream,
        &topic,
        &[before.id().to_owned()],
        "event published before the group existed",
    )
    .await?;
    expect_quiet(&mut stream, QUIET, "nothing more for the replaying group").await
}

/// A subscriber holds at most `prefetch` unsettled deliveries; settling one
/// makes room for the next. The router sizes its concurrency on this.
pub(crate) async fn prefetch_limits_unsettled_deliveries(ctx: Ctx) -> CaseResult {
    const PREFETCH: usize = 2;
    let topic = ctx.name("t");
    let sub = Subscription::new(&topic, ctx.name("g")).prefetch(PREFETCH);
    let mut stream = ctx.subscribe(sub).await?;
    // Distinct subjects, so per-key ordering does not hold events back.
    let events: Vec<_> = (0..5).map(|n| ctx.keyed(n, &format!("key-{n}"))).collect();
    let expected = ids(&events);
    ctx.publish(&topic, events).await?;

    let mut held = Vec::new();
    for i in 0..PREFETCH {
        held.push(
            next_delivery(
                &mut stream,
                RECEIVE_TIMEOUT,
                &format!("delivery {} of {PREFETCH} allowed by the prefetch", i + 1),
            )
            .await?,
        );
    }
    expect_quiet(
        &mut stream,
        QUIET,
        &format!("no delivery beyond prefetch {PREFETCH} while {PREFETCH} are unsettled"),
    )
    .await?;
    let mut seen: Vec<String> = held.iter().map(|d| d.event().id().to_owned()).collect();
    ack(held.remove(0)).await?;
    let next = next_delivery(
        &mut stream,
        RECEIVE_TIMEOUT,
        "another delivery once one of the held ones was acked",
    )
    .await?;
    seen.push(next.event().id().to_owned());
    held.push(next);
    for delivery in held {
        ack(delivery).await?;
    }
    let rest: Vec<String> = expected
        .iter()
        .filter(|id| !seen.contains(id))
        .cloned()
        .collect();
    let tally = receive_all(&mut stream, &topic, &rest, "remaining events").await?;
    ensure!(
        tally.unexpected.is_empty() && tally.duplicates.is_empty(),
        "after acking, unexpected {:?} and duplicates {:?} arrived",
        tally.unexpected,
        tally.duplicates
    );
    Ok(())
}

/// Dropping a pending `next()` loses no delivery: the router does exactly
/// that when shutdown wins a `select!`, and so does every timeout around a
/// poll.
pub(crate) async fn cancelled_next_loses_nothing(ctx: Ctx) -> CaseResult {
    const EVENTS: u64 = 200;
    let topic = ctx.name("t");
    let mut stream = ctx.join(&topic, &ctx.name("g")).await?;
    let events: Vec<_> = (0..EVENTS).map(|n| ctx.numbered(n)).collect();
    let expected = ids(&events);
    let (transport, publish_topic) = (ctx.transport.clone(), topic.clone());
    // Trickled, so the consumer often finds nothing and cancels a poll that
    // has already registered its interest.
    let publisher = tokio::spawn(async move {
        for (i, event) in events.into_iter().enumerate() {
            publish_on(&transport, &publish_topic, vec![event]).await?;
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Ok::<(), String>(())
    });

    let mut missing: HashSet<&str> = expected.iter().map(String::as_str).collect();
    let mut again = Vec::new();
    let mut cancelled = 0usize;
    let mut progress = Instant::now();
    while !missing.is_empty() {
        tokio::task::coop::consume_budget().await;
        let polled = match stream.next().now_or_never() {
            Some(item) => Some(item),
            None => {
                cancelled += 1;
                match tokio::time::timeout(Duration::from_millis(1), stream.next()).await {
                    Ok(item) => Some(item),
                    Err(_) => {
                        cancelled += 1;
                        None
                    }
                }
            }
        };
        match polled {
            None => ensure!(
                progress.elapsed() < RECEIVE_TIMEOUT,
                "expected all {EVENTS} events while polls were being cancelled, but {} did not \
                 arrive within {RECEIVE_TIMEOUT:?} of the last one after {cancelled} cancelled \
                 polls (e.g. {})",
                missing.len(),
                sample(missing.iter())
            ),
            Some(None) => return Err("expected deliveries, but the stream ended".into()),
            Some(Some(Err(e))) if e.is_transient() => {}
            Some(Some(Err(e))) => {
                return Err(format!(
                    "expected deliveries, but the stream yielded {}",
                    describe(&e)
                ));
            }
            Some(Some(Ok(delivery))) => {
                let id = delivery.event().id().to_owned();
                ack(delivery).await?;
                if !missing.remove(id.as_str()) {
                    again.push(id);
                }
                progress = Instant::now();
            }
        }
    }
    publisher
        .await
        .map_err(|e| format!("the publisher task failed: {e}"))??;
    ensure!(
        again.is_empty(),
        "events arrived twice or unexpectedly although each was acked at once: {}",
        sample(again.iter())
    );
    expect_quiet(
        &mut stream,
        QUIET,
        "nothing more after every event was acked",
    )
    .await
}
