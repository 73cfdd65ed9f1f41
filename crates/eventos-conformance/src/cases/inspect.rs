//! Inspection: what a group holds, and dead letters kept for an operator.

use std::time::{Duration, SystemTime};

use eventos_core::{DeadLetter, GroupCounts, Outcome, Transport, ext};

use crate::support::{CaseResult, Ctx, OP_TIMEOUT, RECEIVE_TIMEOUT, ack, next_delivery, settle};

/// How long counts may take to show what was done: a broker's statistics
/// (RabbitMQ's management API refreshes them every 5 s) lag behind, more so
/// on a loaded machine.
const COUNTS_LAG: Duration = Duration::from_secs(20);

/// Asks until `check` accepts the counts, or fails with the last ones:
/// brokers may count a settlement a moment after confirming it.
async fn counts_become(
    transport: &dyn Transport,
    topic: &str,
    group: &str,
    what: &str,
    check: impl Fn(&GroupCounts) -> bool,
) -> Result<GroupCounts, String> {
    let deadline = tokio::time::Instant::now() + COUNTS_LAG;
    loop {
        let counts = tokio::time::timeout(OP_TIMEOUT, transport.group_counts(topic, group))
            .await
            .map_err(|_| format!("group_counts took over {OP_TIMEOUT:?}"))?
            .map_err(|e| format!("group_counts failed: {e}"))?
            .ok_or_else(|| format!("group_counts knows no group {group:?} on {topic:?}"))?;
        if check(&counts) {
            return Ok(counts);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "expected {what} within {COUNTS_LAG:?}; the counts stayed {counts:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Counts match what was published, acked, retried, dead-lettered and
/// held; an unknown group is `None`.
///
/// A broker that pushes ahead of what the subscriber takes (RabbitMQ's
/// prefetch) counts what it sent ahead as in flight, so the case checks
/// what is ready and in flight together, and that what is held is in
/// flight.
pub(crate) async fn counts_match_what_was_done(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let mut stream = ctx.join(&topic, &group).await?;
    let events: Vec<_> = (1..=5).map(|n| ctx.numbered(n)).collect();
    ctx.publish(&topic, events).await?;
    let t = &*ctx.transport;
    counts_become(t, &topic, &group, "5 ready or in flight", |c| {
        c.ready + c.in_flight == 5
    })
    .await?;

    let mut taken = Vec::new();
    for i in 1..=4 {
        taken.push(next_delivery(&mut stream, RECEIVE_TIMEOUT, &format!("event {i} of 4")).await?);
    }
    let mut taken = taken.into_iter();
    let (first, second, third, held) = (
        taken.next().expect("four taken"),
        taken.next().expect("four taken"),
        taken.next().expect("four taken"),
        taken.next().expect("four taken"),
    );
    ack(first).await?;
    let asked = SystemTime::now();
    settle(
        second,
        Outcome::Retry {
            after: Duration::from_secs(60),
        },
    )
    .await?;
    settle(
        third,
        Outcome::DeadLetter(DeadLetter {
            reason: "counted".into(),
            error: None,
        }),
    )
    .await?;
    let counts = counts_become(
        t,
        &topic,
        &group,
        "2 ready or in flight (one of them held), 1 retrying, 1 dead-lettered",
        |c| {
            c.ready + c.in_flight == 2
                && c.in_flight >= 1
                && c.retrying == 1
                && c.dead_lettered == 1
        },
    )
    .await?;
    let due = counts
        .next_retry
        .ok_or_else(|| format!("a retry is waiting, but next_retry is None: {counts:?}"))?;
    let early = asked + Duration::from_secs(50);
    let late = SystemTime::now() + Duration::from_secs(70);
    ensure!(
        due >= early && due <= late,
        "the retry asked for 60 s from now is said to be due at {due:?}"
    );
    ack(held).await?;
    ack(next_delivery(&mut stream, RECEIVE_TIMEOUT, "event 5").await?).await?;
    counts_become(t, &topic, &group, "nothing ready or in flight", |c| {
        c.ready == 0 && c.in_flight == 0 && c.retrying == 1
    })
    .await?;
    let unknown = t
        .group_counts(&topic, &ctx.name("nobody"))
        .await
        .map_err(|e| format!("group_counts of an unknown group failed: {e}"))?;
    ensure!(
        unknown.is_none(),
        "an unknown group has counts: {unknown:?}"
    );
    Ok(())
}

/// A dead letter is kept, listed and fetched by id although nobody
/// subscribes to `<topic>.dlq` — also after a reopen where the transport
/// is persistent.
pub(crate) async fn dead_letters_are_kept_without_a_subscriber(ctx: Ctx) -> CaseResult {
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let mut stream = ctx.join(&topic, &group).await?;
    let sent = ctx.numbered(9);
    ctx.publish(&topic, vec![sent.clone()]).await?;
    let delivery = next_delivery(&mut stream, RECEIVE_TIMEOUT, "the event").await?;
    settle(
        delivery,
        Outcome::DeadLetter(DeadLetter {
            reason: "kept for an operator".into(),
            error: Some("bad input".into()),
        }),
    )
    .await?;
    drop(stream);
    let check = |transport: std::sync::Arc<dyn Transport>, when: &'static str| {
        let (topic, id) = (topic.clone(), sent.id().to_owned());
        async move {
            let listed = transport
                .dead_letters(&topic, 100)
                .await
                .map_err(|e| format!("dead_letters failed {when}: {e}"))?;
            ensure!(
                listed.iter().any(|e| e.id() == id),
                "{when}: the dead letter is not listed: {} listed",
                listed.len()
            );
            let fetched = transport
                .dead_letter(&topic, &id)
                .await
                .map_err(|e| format!("dead_letter failed {when}: {e}"))?
                .ok_or_else(|| format!("{when}: the dead letter cannot be fetched by id"))?;
            let reason = fetched.extension_str(ext::DEAD_LETTER_REASON);
            ensure!(
                reason == Some("kept for an operator"),
                "{when}: the fetched dead letter's reason is {reason:?}"
            );
            let missing = transport
                .dead_letter(&topic, "no-such-id")
                .await
                .map_err(|e| format!("dead_letter failed {when}: {e}"))?;
            ensure!(missing.is_none(), "{when}: an unknown id was found");
            Ok::<(), String>(())
        }
    };
    check(ctx.transport.clone(), "before any reopen").await?;
    if !ctx.caps.persistent {
        return Ok(());
    }
    tokio::time::timeout(OP_TIMEOUT, ctx.transport.close())
        .await
        .map_err(|_| format!("close() did not return within {OP_TIMEOUT:?}"))?
        .map_err(|e| format!("close() failed: {e}"))?;
    let reopened = tokio::time::timeout(OP_TIMEOUT, ctx.harness.reopen(&ctx.transport))
        .await
        .map_err(|_| format!("reopening with harness.reopen() took over {OP_TIMEOUT:?}"))?;
    let result = check(reopened.clone(), "after a reopen").await;
    let _ = tokio::time::timeout(OP_TIMEOUT, reopened.close()).await;
    result
}
