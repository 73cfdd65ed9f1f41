//! Consumer groups: fan-out between groups, competition within one,
//! per-key ordering, members leaving.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventos_core::Subscription;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::support::{
    CaseResult, Consumers, Ctx, QUIET, RECEIVE_TIMEOUT, ack, describe, describe_duplicates,
    expect_quiet, ids, next_delivery, number, receive_all, sample, seed,
};

/// Every group gets its own copy of every event.
pub(crate) async fn every_group_sees_every_event(ctx: Ctx) -> CaseResult {
    const GROUPS: usize = 3;
    const EVENTS: u64 = 50;
    let topic = ctx.name("t");
    let mut streams = Vec::new();
    for g in 0..GROUPS {
        streams.push(ctx.join(&topic, &ctx.name(&format!("g{g}"))).await?);
    }
    let events: Vec<_> = (0..EVENTS).map(|n| ctx.numbered(n)).collect();
    let expected = ids(&events);
    ctx.publish(&topic, events).await?;
    for (g, stream) in streams.iter_mut().enumerate() {
        let tally = receive_all(
            stream,
            &topic,
            &expected,
            &format!("events for group g{g} of {GROUPS}"),
        )
        .await?;
        ensure!(
            tally.unexpected.is_empty() && tally.duplicates.is_empty(),
            "group g{g} received unexpected events {:?} and duplicates {:?}; every event was acked \
             at once, so none should come twice",
            tally.unexpected,
            tally.duplicates
        );
    }
    let quiet = futures::future::join_all(
        streams
            .iter_mut()
            .map(|s| expect_quiet(s, QUIET, "no redelivery of acked events")),
    )
    .await;
    quiet.into_iter().collect()
}

/// Members of one group share the work: every event is handled, by
/// someone, and more than one member gets some of it.
///
/// A broker may redeliver a little while members join (a Kafka rebalance
/// replays offsets not yet committed), so a few duplicates are tolerated;
/// lost events are not.
pub(crate) async fn group_members_compete(ctx: Ctx) -> CaseResult {
    const MEMBERS: usize = 3;
    const EVENTS: u64 = 300;
    const MAX_DUPLICATES: usize = 3;
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let seed = seed();
    let mut consumers = Consumers::new();
    for member in 0..MEMBERS {
        // A small prefetch and a pause per event keep one member from
        // draining the topic before the others get a turn.
        let sub = Subscription::new(&topic, &group).prefetch(4);
        let stream = ctx.subscribe(sub).await?;
        consumers.spawn(
            member,
            stream,
            Duration::from_millis(2),
            seed.wrapping_add(member as u64),
        );
    }
    let events: Vec<_> = (0..EVENTS).map(|n| ctx.numbered(n)).collect();
    let expected = ids(&events);
    ctx.publish(&topic, events).await?;
    let collected = consumers
        .collect(&expected, QUIET, "events shared by the group")
        .await?;
    ensure!(
        collected.unexpected.is_empty(),
        "the group received events it was not sent: {:?}",
        collected.unexpected
    );
    ensure!(
        collected.duplicates.len() <= MAX_DUPLICATES,
        "expected each of {EVENTS} events acked once by the group (at most {MAX_DUPLICATES} \
         duplicates tolerated), but got {} (seed {seed})",
        describe_duplicates(&collected.duplicates)
    );
    let busy = collected.per_member.values().filter(|&&n| n > 0).count();
    ensure!(
        busy >= 2,
        "expected the {MEMBERS} members to compete, but only {busy} received work: {:?} \
         (seed {seed})",
        collected.per_member
    );
    if !collected.duplicates.is_empty() {
        eprintln!(
            "note: {}: {} (tolerated: {MAX_DUPLICATES})",
            ctx.case,
            describe_duplicates(&collected.duplicates)
        );
    }
    Ok(())
}

/// Within a group, events of one subject are handled one at a time and in
/// publish order, even with several members that take their time.
pub(crate) async fn per_key_ordering(ctx: Ctx) -> CaseResult {
    const MEMBERS: usize = 3;
    const SUBJECTS: u64 = 5;
    const PER_SUBJECT: u64 = 40;
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let seed = seed();

    /// What the members saw, shared between them.
    #[derive(Default)]
    struct Log {
        in_flight: HashSet<String>,
        acked: HashMap<String, Vec<u64>>,
        overlaps: Vec<String>,
        total: usize,
    }
    let log = Arc::new(Mutex::new(Log::default()));
    let done = Arc::new(tokio::sync::Notify::new());
    let expected_total = (SUBJECTS * PER_SUBJECT) as usize;

    let mut members = JoinSet::new();
    for member in 0..MEMBERS {
        let mut stream = ctx.join(&topic, &group).await?;
        let (log, done) = (log.clone(), done.clone());
        let member_seed = seed.wrapping_add(member as u64);
        members.spawn(async move {
            let mut rng = StdRng::seed_from_u64(member_seed);
            loop {
                tokio::task::coop::consume_budget().await;
                let delivery = match stream.next().await {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) if e.is_transient() => continue,
                    Some(Err(e)) => {
                        return Err(format!("member {member}'s stream failed: {}", describe(&e)));
                    }
                    None => return Err(format!("member {member}'s stream ended")),
                };
                let n = number(delivery.event())?;
                let Some(subject) = delivery.event().subject().map(str::to_owned) else {
                    return Err(format!(
                        "event #{n} arrived without the subject it was published with"
                    ));
                };
                {
                    let mut log = log.lock().unwrap();
                    if !log.in_flight.insert(subject.clone()) {
                        log.overlaps.push(format!(
                            "{subject} #{n} was handed to member {member} while another event \
                             of {subject} was unsettled"
                        ));
                    }
                }
                let pause = Duration::from_millis(rng.random_range(0..=5));
                tokio::time::sleep(pause).await;
                {
                    // Recorded before acking: the transport must not hand
                    // out the next event of this subject until the ack.
                    let mut log = log.lock().unwrap();
                    log.in_flight.remove(&subject);
                    log.acked.entry(subject).or_default().push(n);
                    log.total += 1;
                    if log.total >= expected_total {
                        done.notify_one();
                    }
                }
                ack(delivery)
                    .await
                    .map_err(|e| format!("member {member}: {e}"))?;
            }
        });
    }

    // Interleaved: s0 #0, s1 #0, …, s4 #0, s0 #1, …
    let events: Vec<_> = (0..PER_SUBJECT)
        .flat_map(|i| (0..SUBJECTS).map(move |s| (s, i)))
        .map(|(s, i)| ctx.keyed(i, &format!("subject-{s}")))
        .collect();
    ctx.publish(&topic, events).await?;

    let finished = async {
        tokio::select! {
            () = done.notified() => Ok(()),
            Some(joined) = members.join_next() => match joined {
                Ok(Err(message)) => Err(message),
                Ok(Ok(())) => Err("a member stopped".to_owned()),
                Err(e) => Err(format!("a member task failed: {e}")),
            },
        }
    };
    let wait = Duration::from_secs(30);
    match tokio::time::timeout(wait, finished).await {
        Ok(result) => result?,
        Err(_) => {
            let log = log.lock().unwrap();
            return Err(format!(
                "expected all {expected_total} events acked within {wait:?}, got {} (seed {seed})",
                log.total
            ));
        }
    }
    // Late duplicates would show up as a repeated number.
    tokio::time::sleep(QUIET).await;
    members.abort_all();

    let log = log.lock().unwrap();
    ensure!(
        log.overlaps.is_empty(),
        "events of one subject were handed out concurrently, {} time(s) (seed {seed}); the \
         first:\n  {}",
        log.overlaps.len(),
        log.overlaps[..log.overlaps.len().min(5)].join("\n  ")
    );
    for s in 0..SUBJECTS {
        let subject = format!("subject-{s}");
        let acked = log.acked.get(&subject).cloned().unwrap_or_default();
        if let Some(i) = acked.windows(2).position(|w| w[0] >= w[1]) {
            return Err(format!(
                "expected {subject} acked in publish order, but #{} was acked after #{} \
                 (positions {i} and {}; {} acked in all; seed {seed})",
                acked[i + 1],
                acked[i],
                i + 1,
                acked.len()
            ));
        }
        ensure!(
            acked.len() == PER_SUBJECT as usize,
            "expected {PER_SUBJECT} events of {subject} acked, got {} (seed {seed})",
            acked.len()
        );
    }
    Ok(())
}

/// A member that drops its stream leaves the group: later events go to the
/// remaining member, first time round.
pub(crate) async fn dropping_stream_cancels_subscription(ctx: Ctx) -> CaseResult {
    const EVENTS: u64 = 20;
    let topic = ctx.name("t");
    let group = ctx.name("g");
    let leaving = ctx.join(&topic, &group).await?;
    let mut staying = ctx.join(&topic, &group).await?;
    drop(leaving);

    let events: Vec<_> = (0..EVENTS).map(|n| ctx.numbered(n)).collect();
    let expected = ids(&events);
    ctx.publish(&topic, events).await?;
    let tally = receive_all(
        &mut staying,
        &topic,
        &expected,
        "events for the member that stayed",
    )
    .await?;
    let redelivered: Vec<_> = tally
        .events
        .iter()
        .zip(&tally.attempts)
        .filter(|(_, attempt)| **attempt > 1)
        .map(|(event, attempt)| format!("{} (attempt {attempt})", event.id()))
        .collect();
    ensure!(
        redelivered.is_empty(),
        "events published after a member dropped its stream were first handed to that member \
         and only then redelivered: {}",
        sample(redelivered.iter())
    );
    ensure!(
        tally.duplicates.is_empty() && tally.unexpected.is_empty(),
        "the remaining member got duplicates {:?} and unexpected events {:?}",
        tally.duplicates,
        tally.unexpected
    );
    Ok(())
}

/// A group with no subscriber keeps its events: what the leaving member
/// held unsettled, what it never took, and what was published meanwhile
/// all wait for the next member; what it acked does not come back.
pub(crate) async fn nothing_lost_after_subscriber_closes(ctx: Ctx) -> CaseResult {
    const ACK_BEFORE_LEAVING: usize = 5;
    let topic = ctx.name("t");
    let group = ctx.name("g");
    // Distinct subjects, so per-key ordering does not hold events back.
    let mut first = ctx.join(&topic, &group).await?;
    let batch1: Vec<_> = (0..10).map(|n| ctx.keyed(n, &format!("key-{n}"))).collect();
    let all1 = ids(&batch1);
    ctx.publish(&topic, batch1).await?;
    let mut acked = Vec::new();
    for i in 0..ACK_BEFORE_LEAVING {
        let delivery = next_delivery(
            &mut first,
            RECEIVE_TIMEOUT,
            &format!(
                "event {} of the {ACK_BEFORE_LEAVING} to ack before leaving",
                i + 1
            ),
        )
        .await?;
        acked.push(delivery.event().id().to_owned());
        ack(delivery).await?;
    }
    let held = next_delivery(
        &mut first,
        RECEIVE_TIMEOUT,
        "an event to hold unsettled while leaving",
    )
    .await?;
    // The member leaves with work in hand, as a crashing process would.
    drop(first);
    drop(held);

    let batch2: Vec<_> = (10..20)
        .map(|n| ctx.keyed(n, &format!("key-{n}")))
        .collect();
    let all2 = ids(&batch2);
    ctx.publish(&topic, batch2).await?;

    let mut second = ctx.join(&topic, &group).await?;
    let expected: Vec<String> = all1
        .iter()
        .filter(|id| !acked.contains(id))
        .chain(&all2)
        .cloned()
        .collect();
    let tally = receive_all(
        &mut second,
        &topic,
        &expected,
        "events held, left or published while the group had no subscriber",
    )
    .await?;
    ensure!(
        tally.unexpected.is_empty(),
        "acked events came back to the group: {:?}",
        tally.unexpected
    );
    ensure!(
        tally.duplicates.is_empty(),
        "events arrived twice at the new member: {:?}",
        tally.duplicates
    );
    expect_quiet(&mut second, QUIET, "no redelivery of acked events").await
}

#[cfg(test)]
mod tests {
    #[test]
    fn interleaving_covers_every_subject_in_turn() {
        let order: Vec<(u64, u64)> = (0..2u64)
            .flat_map(|i| (0..3u64).map(move |s| (s, i)))
            .collect();
        assert_eq!(order, [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]);
    }
}
