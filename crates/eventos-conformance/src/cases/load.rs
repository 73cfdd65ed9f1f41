//! Volume and concurrency: nothing lost, nothing invented, nothing doubled.

use std::time::Duration;

use eventos_core::Subscription;
use tokio::task::JoinSet;

use crate::support::{
    CaseResult, Consumers, Ctx, QUIET, describe_duplicates, ids, publish_on, sample,
};

/// Eight publishers at once, one event per call: every event arrives once.
pub(crate) async fn concurrent_publishers(ctx: Ctx) -> CaseResult {
    const PUBLISHERS: u64 = 8;
    const EACH: u64 = 250;
    let topic = ctx.name("t");
    let mut consumers = Consumers::new();
    consumers.spawn(
        0,
        ctx.join(&topic, &ctx.name("g")).await?,
        Duration::ZERO,
        0,
    );

    let mut expected = Vec::new();
    let mut publishers = JoinSet::new();
    for p in 0..PUBLISHERS {
        let events: Vec<_> = (0..EACH).map(|i| ctx.numbered(p * EACH + i)).collect();
        expected.extend(ids(&events));
        let (transport, topic) = (ctx.transport.clone(), topic.clone());
        publishers.spawn(async move {
            for event in events {
                publish_on(&transport, &topic, vec![event])
                    .await
                    .map_err(|e| format!("publisher {p}: {e}"))?;
            }
            Ok::<(), String>(())
        });
    }
    // Consumed while published, as in production.
    let publishing = async {
        while let Some(joined) = publishers.join_next().await {
            joined.map_err(|e| format!("a publisher task failed: {e}"))??;
        }
        Ok(())
    };
    let collected = consumers
        .collect_while(
            &expected,
            QUIET,
            "concurrently published events",
            publishing,
        )
        .await?;
    ensure!(
        collected.unexpected.is_empty(),
        "{} event(s) arrived that no publisher sent: {}",
        collected.unexpected.len(),
        sample(collected.unexpected.iter())
    );
    ensure!(
        collected.duplicates.is_empty(),
        "expected each of {} events once, as each was acked at once, but got {}",
        expected.len(),
        describe_duplicates(&collected.duplicates)
    );
    Ok(())
}

/// Ten thousand events in batches of 500 while the group consumes: every
/// one arrives, and, with everything acked at once, none twice.
///
/// Two members compete where the transport has consumer groups; one
/// consumes alone otherwise.
pub(crate) async fn burst_10k_no_loss(ctx: Ctx) -> CaseResult {
    const EVENTS: u64 = 10_000;
    const BATCH: u64 = 500;
    const KEYS: u64 = 100;
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let members = if ctx.caps.consumer_groups { 2 } else { 1 };
    let mut consumers = Consumers::new();
    for member in 0..members {
        let stream = ctx
            .subscribe(Subscription::new(&topic, &group).prefetch(256))
            .await?;
        consumers.spawn(member, stream, Duration::ZERO, 0);
    }
    // Keyed like real traffic, so per-key transports work as they would.
    let batches: Vec<Vec<_>> = (0..EVENTS / BATCH)
        .map(|b| {
            (b * BATCH..(b + 1) * BATCH)
                .map(|n| ctx.keyed(n, &format!("key-{}", n % KEYS)))
                .collect()
        })
        .collect();
    let expected: Vec<String> = batches.iter().flat_map(|b| ids(b)).collect();

    let publishing = async {
        for batch in batches {
            ctx.publish(&topic, batch).await?;
        }
        Ok(())
    };
    let collected = consumers
        .collect_while(&expected, QUIET, "events of the burst", publishing)
        .await?;
    ensure!(
        collected.unexpected.is_empty(),
        "{} event(s) arrived that were never published: {}",
        collected.unexpected.len(),
        sample(collected.unexpected.iter())
    );
    ensure!(
        collected.duplicates.is_empty(),
        "expected each of {EVENTS} events once, as nothing was left unsettled, but got {} \
         ({} deliveries had attempt > 1)",
        describe_duplicates(&collected.duplicates),
        collected.redeliveries
    );
    Ok(())
}
