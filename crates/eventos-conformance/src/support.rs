//! What every case leans on: names, events, bounded waits and tallies.
//!
//! Every wait here has its own deadline, well inside the case's, so a case
//! that fails says which step it was waiting for rather than "timed out".

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use eventos_core::{
    Capabilities, Delivery, DeliveryStream, Event, Outcome, Subscription, Transport, TransportError,
};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::Harness;

/// What a case returns: `Err` carries the failure message.
pub(crate) type CaseResult = Result<(), String>;

/// How long to wait for one expected delivery. Generous, because a real
/// broker may be rebalancing; a passing case never waits this long.
pub(crate) const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched.
pub(crate) const QUIET: Duration = Duration::from_millis(400);
/// How long one publish, subscribe or settle call may take.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// Fails the case with a formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// Everything a case gets: its transport, its harness and unique names.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) case: &'static str,
    pub(crate) harness: Arc<dyn Harness>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) caps: Capabilities,
    uid: String,
}

impl Ctx {
    pub(crate) fn new(
        case: &'static str,
        harness: Arc<dyn Harness>,
        transport: Arc<dyn Transport>,
        caps: Capabilities,
    ) -> Self {
        Self {
            case,
            harness,
            transport,
            caps,
            uid: uuid::Uuid::now_v7().simple().to_string(),
        }
    }

    /// A topic or group name no other case or run uses.
    pub(crate) fn name(&self, label: &str) -> String {
        format!("conf.{}.{}.{label}", self.case, self.uid)
    }

    /// The `source` of events this case publishes.
    pub(crate) fn source(&self) -> String {
        format!("urn:eventos:conformance:{}", self.case)
    }

    /// An event carrying `n` in its JSON payload.
    pub(crate) fn numbered(&self, n: u64) -> Event {
        Event::builder(self.source(), "eventos.conformance.numbered.v1")
            .data(
                "application/json",
                serde_json::json!({ "n": n }).to_string(),
            )
            .build()
            .expect("source and type are not empty")
    }

    /// An event carrying `n`, with `subject` as its ordering key.
    pub(crate) fn keyed(&self, n: u64, subject: &str) -> Event {
        let mut event = self.numbered(n);
        event.set_subject(Some(subject.to_owned()));
        event
    }

    /// Joins `group` on `topic` with the default subscription settings.
    pub(crate) async fn join(&self, topic: &str, group: &str) -> Result<DeliveryStream, String> {
        self.subscribe(Subscription::new(topic, group)).await
    }

    /// Subscribes on this case's transport.
    pub(crate) async fn subscribe(&self, sub: Subscription) -> Result<DeliveryStream, String> {
        subscribe_on(&self.transport, sub).await
    }

    /// Publishes on this case's transport.
    pub(crate) async fn publish(&self, topic: &str, events: Vec<Event>) -> CaseResult {
        publish_on(&self.transport, topic, events).await
    }
}

/// Subscribes on `transport`, bounded by [`OP_TIMEOUT`].
pub(crate) async fn subscribe_on(
    transport: &Arc<dyn Transport>,
    sub: Subscription,
) -> Result<DeliveryStream, String> {
    let what = format!(
        "subscribe(topic {:?}, group {:?}, start {:?}, prefetch {})",
        sub.topic, sub.group, sub.start, sub.prefetch
    );
    bounded(&what, transport.subscribe(sub)).await
}

/// Publishes on `transport`, bounded by [`OP_TIMEOUT`].
pub(crate) async fn publish_on(
    transport: &Arc<dyn Transport>,
    topic: &str,
    events: Vec<Event>,
) -> CaseResult {
    let what = format!("publish of {} event(s) to {topic:?}", events.len());
    bounded(&what, transport.publish(topic, events)).await
}

/// Awaits a transport call, failing with `what` on error or timeout.
pub(crate) async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<T, TransportError>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what} failed: {}", describe(&e))),
        Err(_) => Err(format!("{what} did not return within {OP_TIMEOUT:?}")),
    }
}

/// An error with its kind, since the kind is what the contract is about.
pub(crate) fn describe(e: &TransportError) -> String {
    format!("{e} (kind {:?})", e.kind())
}

/// Settles `delivery`, bounded by [`OP_TIMEOUT`].
pub(crate) async fn settle(delivery: Delivery, outcome: Outcome) -> CaseResult {
    let what = format!(
        "settling event {} (attempt {}) with {}",
        delivery.event().id(),
        delivery.attempt(),
        outcome.label()
    );
    bounded(&what, delivery.settle(outcome)).await
}

/// Acks `delivery`, bounded by [`OP_TIMEOUT`].
pub(crate) async fn ack(delivery: Delivery) -> CaseResult {
    settle(delivery, Outcome::Ack).await
}

/// The number a [`Ctx::numbered`] event carries.
pub(crate) fn number(event: &Event) -> Result<u64, String> {
    let parsed: Option<u64> = event
        .data()
        .and_then(|data| serde_json::from_slice::<serde_json::Value>(data).ok())
        .and_then(|value| value.get("n").and_then(serde_json::Value::as_u64));
    parsed.ok_or_else(|| {
        format!(
            "event {} does not carry the numbered payload this case published (data: {:?})",
            event.id(),
            event
                .data()
                .map(|d| String::from_utf8_lossy(d).into_owned())
        )
    })
}

/// The ids of `events`, in order.
pub(crate) fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id().to_owned()).collect()
}

/// Waits up to `within` for the next delivery on `stream`.
///
/// Transient stream errors are skipped, as the contract says the stream goes
/// on after them; they are mentioned if the wait then fails.
pub(crate) async fn next_delivery(
    stream: &mut DeliveryStream,
    within: Duration,
    what: &str,
) -> Result<Delivery, String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut transient = 0usize;
    let mut last_error = String::new();
    loop {
        // A stream that is always ready would otherwise keep this task from
        // ever yielding, and its deadline from ever being checked.
        tokio::task::coop::consume_budget().await;
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(delivery))) => return Ok(delivery),
            Ok(Some(Err(e))) if e.is_transient() => {
                transient += 1;
                last_error = describe(&e);
            }
            Ok(Some(Err(e))) => {
                return Err(format!(
                    "expected {what}, but the stream yielded a non-transient error: {}",
                    describe(&e)
                ));
            }
            Ok(None) => return Err(format!("expected {what}, but the stream ended")),
            Err(_) => {
                let errors = if transient == 0 {
                    String::new()
                } else {
                    format!(" ({transient} transient stream error(s), the last: {last_error})")
                };
                return Err(format!(
                    "expected {what} within {within:?}, but nothing arrived{errors}"
                ));
            }
        }
    }
}

/// Checks that no delivery arrives on `stream` for `period`.
pub(crate) async fn expect_quiet(
    stream: &mut DeliveryStream,
    period: Duration,
    what: &str,
) -> CaseResult {
    let deadline = tokio::time::Instant::now() + period;
    loop {
        tokio::task::coop::consume_budget().await;
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Ok(()),
            Ok(Some(Ok(delivery))) => {
                return Err(format!(
                    "expected {what} for {period:?}, but event {} arrived (attempt {}, group {:?})",
                    delivery.event().id(),
                    delivery.attempt(),
                    delivery.info().group
                ));
            }
            Ok(Some(Err(e))) if e.is_transient() => {}
            Ok(Some(Err(e))) => {
                return Err(format!(
                    "expected {what} for {period:?}, but the stream yielded a non-transient \
                     error: {}",
                    describe(&e)
                ));
            }
            Ok(None) => {
                return Err(format!(
                    "expected {what} for {period:?} with the subscription still open, but the \
                     stream ended"
                ));
            }
        }
    }
}

/// What one stream received while every expected event was collected.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Events in arrival order, duplicates included.
    pub(crate) events: Vec<Arc<Event>>,
    /// Attempt of each arrival, parallel to `events`.
    pub(crate) attempts: Vec<u32>,
    /// Ids that arrived more than once.
    pub(crate) duplicates: Vec<String>,
    /// Ids that arrived but were not expected.
    pub(crate) unexpected: Vec<String>,
}

/// Receives and acks until every id in `expected` has arrived on `stream`,
/// checking each delivery names `topic`. Fails if some id does not arrive
/// within [`RECEIVE_TIMEOUT`] of the previous arrival.
pub(crate) async fn receive_all(
    stream: &mut DeliveryStream,
    topic: &str,
    expected: &[String],
    what: &str,
) -> Result<Tally, String> {
    let mut missing: HashSet<&str> = expected.iter().map(String::as_str).collect();
    let mut seen = HashSet::new();
    let mut tally = Tally::default();
    while !missing.is_empty() {
        let waiting = format!(
            "{} more of {} {what} (e.g. {})",
            missing.len(),
            expected.len(),
            sample(missing.iter())
        );
        let delivery = next_delivery(stream, RECEIVE_TIMEOUT, &waiting).await?;
        ensure!(
            &*delivery.info().topic == topic,
            "expected deliveries from topic {topic:?}, but event {} came with topic {:?}",
            delivery.event().id(),
            delivery.info().topic
        );
        let event = delivery.event().clone();
        let attempt = delivery.attempt();
        ack(delivery).await?;
        let id = event.id().to_owned();
        if !missing.remove(id.as_str()) {
            if seen.contains(&id) {
                tally.duplicates.push(id.clone());
            } else if !expected.contains(&id) {
                tally.unexpected.push(id.clone());
            }
        }
        seen.insert(id);
        tally.events.push(event);
        tally.attempts.push(attempt);
    }
    Ok(tally)
}

/// Up to five items, for messages about large sets.
pub(crate) fn sample<T: fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let mut items = items.peekable();
    let mut shown: Vec<String> = items.by_ref().take(5).map(|i| i.to_string()).collect();
    if items.peek().is_some() {
        shown.push("…".to_owned());
    }
    shown.join(", ")
}

/// "`n` duplicate deliveries of `m` event(s): a, b, …", for messages.
pub(crate) fn describe_duplicates(duplicates: &[String]) -> String {
    let distinct: HashSet<&String> = duplicates.iter().collect();
    format!(
        "{} duplicate deliveries of {} event(s): {}",
        duplicates.len(),
        distinct.len(),
        sample(distinct.iter())
    )
}

/// What a background consumer reports to its case.
#[derive(Debug)]
pub(crate) enum Report {
    /// `member` acked `event`, received at `attempt`.
    Acked {
        member: usize,
        event: Arc<Event>,
        attempt: u32,
    },
    /// The consumer stopped; the case must fail with this message.
    Failed(String),
}

/// Group members acking in the background; aborted when dropped, which
/// drops their streams.
pub(crate) struct Consumers {
    tasks: JoinSet<()>,
    tx: mpsc::UnboundedSender<Report>,
    rx: mpsc::UnboundedReceiver<Report>,
}

impl Consumers {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tasks: JoinSet::new(),
            tx,
            rx,
        }
    }

    /// Starts `member` acking every delivery of `stream`, first pausing a
    /// random 0..=`max_pause` (seeded by `seed`, so a failure can be
    /// replayed) to make members interleave like real handlers.
    pub(crate) fn spawn(
        &mut self,
        member: usize,
        mut stream: DeliveryStream,
        max_pause: Duration,
        seed: u64,
    ) {
        let tx = self.tx.clone();
        self.tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            loop {
                // Without this, a redelivery storm (an ack that does not
                // stick) keeps the workers busy and starves every timer.
                tokio::task::coop::consume_budget().await;
                let delivery = match stream.next().await {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) if e.is_transient() => continue,
                    Some(Err(e)) => {
                        let _ = tx.send(Report::Failed(format!(
                            "member {member}'s stream yielded a non-transient error: {}",
                            describe(&e)
                        )));
                        return;
                    }
                    None => {
                        let _ = tx.send(Report::Failed(format!(
                            "member {member}'s stream ended while the subscription was open"
                        )));
                        return;
                    }
                };
                if !max_pause.is_zero() {
                    let pause = rng.random_range(Duration::ZERO..=max_pause);
                    tokio::time::sleep(pause).await;
                }
                let event = delivery.event().clone();
                let attempt = delivery.attempt();
                if let Err(message) = ack(delivery).await {
                    let _ = tx.send(Report::Failed(format!("member {member}: {message}")));
                    return;
                }
                let _ = tx.send(Report::Acked {
                    member,
                    event,
                    attempt,
                });
            }
        });
    }

    /// Collects reports until every id in `expected` was acked, then keeps
    /// listening for `linger` to catch late duplicates.
    pub(crate) async fn collect(
        &mut self,
        expected: &[String],
        linger: Duration,
        what: &str,
    ) -> Result<Collected, String> {
        self.collect_while(expected, linger, what, std::future::ready(Ok(())))
            .await
    }

    /// [`Consumers::collect`] while `publishing` runs: an event counts as
    /// missing only once nothing has arrived for [`RECEIVE_TIMEOUT`]
    /// since the later of the last arrival and the end of publishing. A
    /// publish slow to be acknowledged (each is bounded by
    /// [`OP_TIMEOUT`]) is not an event lost.
    pub(crate) async fn collect_while(
        &mut self,
        expected: &[String],
        linger: Duration,
        what: &str,
        publishing: impl Future<Output = CaseResult>,
    ) -> Result<Collected, String> {
        let mut publishing = std::pin::pin!(publishing);
        let mut published = false;
        let mut missing: HashSet<&str> = expected.iter().map(String::as_str).collect();
        let mut collected = Collected::default();
        let mut seen = HashSet::new();
        let mut lingering_until = None;
        let mut quiet_until = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
        loop {
            let until = lingering_until.unwrap_or(quiet_until);
            let report = tokio::select! {
                done = &mut publishing, if !published => {
                    done?;
                    published = true;
                    quiet_until = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
                    continue;
                }
                received = tokio::time::timeout_at(until, self.rx.recv()) => received,
            };
            let report = match report {
                Ok(Some(report)) => report,
                Ok(None) => return Err("every consumer task stopped without a report".into()),
                Err(_) if !published => {
                    // Nothing can be missing while it may not be sent yet.
                    quiet_until = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
                    continue;
                }
                Err(_) if lingering_until.is_some() => return Ok(collected),
                Err(_) => {
                    return Err(format!(
                        "expected all {} {what} to be acked, but {} did not arrive within \
                         {RECEIVE_TIMEOUT:?} of the last one (e.g. {})",
                        expected.len(),
                        missing.len(),
                        sample(missing.iter())
                    ));
                }
            };
            quiet_until = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
            match report {
                Report::Failed(message) => return Err(message),
                Report::Acked {
                    member,
                    event,
                    attempt,
                } => {
                    let id = event.id().to_owned();
                    *collected.per_member.entry(member).or_default() += 1;
                    if !missing.remove(id.as_str()) {
                        if seen.contains(&id) {
                            collected.duplicates.push(id.clone());
                        } else if !expected.contains(&id) {
                            collected.unexpected.push(id.clone());
                        }
                    }
                    if attempt > 1 {
                        collected.redeliveries += 1;
                    }
                    seen.insert(id);
                    collected.events.push(event);
                }
            }
            if missing.is_empty() && lingering_until.is_none() {
                lingering_until = Some(tokio::time::Instant::now() + linger);
            }
        }
    }
}

/// What [`Consumers::collect`] saw.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    /// Acked events, in the order the acks were reported.
    pub(crate) events: Vec<Arc<Event>>,
    /// How many deliveries each member acked.
    pub(crate) per_member: HashMap<usize, usize>,
    /// Ids acked more than once.
    pub(crate) duplicates: Vec<String>,
    /// Ids that were not expected at all.
    pub(crate) unexpected: Vec<String>,
    /// Deliveries with an attempt above 1.
    pub(crate) redeliveries: usize,
}

/// A fresh random seed, to be printed in any failure message.
pub(crate) fn seed() -> u64 {
    rand::rng().random()
}
