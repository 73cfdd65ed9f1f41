//! Subscriptions: a member of a group pulls from the group's durable
//! consumer, never more at once than its prefetch has room for.
//!
//! A member asks JetStream for a batch of as many deliveries as its
//! prefetch has room for (once at least half of it is free, so that a busy
//! member asks for many at a time rather than one per settlement), takes
//! them as they come, and asks again once the batch is complete or its
//! request expired. So what a member holds, handed out or on its way, never
//! exceeds its prefetch, and a dropped member's only unfinished business is
//! the batch it asked for: that is read to its end and NAKed, so the
//! other members get it at once rather than after the ack wait. A NAK is
//! sent without an answer, so the task that sends it keeps the connection
//! until it is out, over a reconnection if the server is restarting:
//! dropped with the last handle on the connection, it would be lost.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{AckKind, Message};
use eventos_core::{
    Delivery, DeliveryInfo, DeliveryStream, Event, Outcome, StartFrom, Subscription,
    TransportError, TransportErrorKind, dead_letter_event, dead_letter_topic,
};
use eventos_kit::{OnceAcker, Prefetch, Settle};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use tokio::sync::Notify;

use crate::{Shared, codec, safe_name, unavailable};

/// How long a pull request waits on the server for messages before it
/// expires and the member asks again. Also how long a dropped member's
/// last request lingers (its deliveries NAKed as they come).
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How long a put-back (NAK) waits for the connection to carry it out.
const FLUSH_LIMIT: Duration = Duration::from_secs(30);
/// Waits before asking again after requests failed in a row.
const REPULL_BACKOFF: [Duration; 5] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// Creates the topic's stream and the group's durable consumer, then
/// starts pulling. Returns once events published afterwards will reach
/// the group.
pub(crate) async fn subscribe(
    shared: Arc<Shared>,
    subscription: Subscription,
) -> Result<DeliveryStream, TransportError> {
    let stream_name = shared.ensure_stream(&subscription.topic).await?;
    let durable = safe_name(&subscription.group);
    let what = format!(
        "joining group {:?} of topic {:?} (JetStream consumer {durable:?} on stream {stream_name:?})",
        subscription.group, subscription.topic
    );
    let stream = shared
        .js
        .get_stream_no_info(&stream_name)
        .await
        .map_err(|e| unavailable(&what, &e))?;
    let config = pull::Config {
        durable_name: Some(durable.clone()),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: match subscription.start {
            StartFrom::Earliest => DeliverPolicy::All,
            StartFrom::Latest => DeliverPolicy::New,
        },
        ack_wait: shared.options.ack_wait,
        // The router's retry policy decides when to give up.
        max_deliver: -1,
        ..Default::default()
    };
    let consumer: PullConsumer = stream
        .get_or_create_consumer(&durable, config)
        .await
        .map_err(|e| unavailable(&what, &e))?;
    let wake = Arc::new(Notify::new());
    let member = Member {
        shared,
        consumer,
        batch: None,
        prefetch: Prefetch::new(subscription.prefetch, wake.clone()),
        wake,
        topic: subscription.topic.as_str().into(),
        group: subscription.group.as_str().into(),
        stream: stream_name.as_str().into(),
        consumer_name: durable.as_str().into(),
        failures: 0,
    };
    Ok(Box::pin(futures::stream::unfold(
        member,
        |mut member| async move {
            let item = member.next().await?;
            Some((item, member))
        },
    )))
}

/// One member of a group.
struct Member {
    shared: Arc<Shared>,
    consumer: PullConsumer,
    /// The batch asked for and not complete yet.
    batch: Option<pull::Batch>,
    prefetch: Prefetch,
    /// Woken when a delivery is settled or put back (and by the prefetch).
    wake: Arc<Notify>,
    topic: Arc<str>,
    group: Arc<str>,
    /// The topic's stream and the group's consumer, by name.
    stream: Arc<str>,
    consumer_name: Arc<str>,
    /// Failed requests in a row.
    failures: usize,
}

impl Member {
    /// The next delivery, or `None` once the transport closed.
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>> {
        let mut closed = Box::pin(self.shared.lifecycle.closed());
        let wake = self.wake.clone();
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.lifecycle.is_closed() {
                return None;
            }
            if let Some(batch) = self.batch.as_mut() {
                let received = tokio::select! {
                    () = &mut closed => return None,
                    received = batch.next() => received,
                };
                match received {
                    Some(Ok(message)) => {
                        self.failures = 0;
                        if let Some(delivery) = self.prepare(message) {
                            return Some(Ok(delivery));
                        }
                    }
                    Some(Err(e)) => {
                        // The server refused or broke off the request: the
                        // next one waits a little (see below).
                        self.batch = None;
                        self.failures += 1;
                        return Some(Err(unavailable(
                            &format!("consuming {:?} as group {:?}", self.topic, self.group),
                            &e,
                        )));
                    }
                    // Complete, or expired: all went well; ask again.
                    None => {
                        self.batch = None;
                        self.failures = 0;
                    }
                }
                continue;
            }
            let room = self.prefetch.room();
            if room < self.prefetch.limit().div_ceil(2) {
                tokio::select! {
                    () = &mut closed => return None,
                    () = notified => {}
                }
                continue;
            }
            if self.failures > 0 {
                // After failures in a row, not a request a millisecond.
                let wait = REPULL_BACKOFF[(self.failures - 1).min(REPULL_BACKOFF.len() - 1)];
                tokio::select! {
                    () = &mut closed => return None,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            let request = self
                .consumer
                .batch()
                .max_messages(room)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            match request {
                Ok(batch) => self.batch = Some(batch),
                Err(e) => {
                    self.failures += 1;
                    tracing::warn!(topic = %self.topic, group = %self.group, error = %e, "a NATS pull request failed; asking again");
                    return Some(Err(unavailable(
                        &format!("pulling {:?} as group {:?}", self.topic, self.group),
                        &e,
                    )));
                }
            }
        }
    }

    /// A message as a delivery; one that is no CloudEvent is logged and
    /// terminated, since it would fail the same way every time.
    fn prepare(&self, message: Message) -> Option<Delivery> {
        let (attempt, sequence) = message.info().map_or((1, 0), |i| {
            (
                u32::try_from(i.delivered).unwrap_or(u32::MAX).max(1),
                i.stream_sequence,
            )
        });
        let (message, acker) = message.split();
        if attempt > 1 {
            // Delivered again: its retry, if it was one, waits no more.
            let (shared, stream, consumer) = (
                self.shared.clone(),
                self.stream.clone(),
                self.consumer_name.clone(),
            );
            tokio::spawn(async move {
                if let Err(e) = shared.unmark_retry(&stream, &consumer, sequence).await {
                    tracing::debug!(error = %e, "a retry marker not purged; it counts as ready once past due");
                }
            });
        }
        let event = match codec::decode(message.headers.as_ref(), &message.payload) {
            Ok(event) => Arc::new(event),
            Err(reason) => {
                tracing::error!(topic = %self.topic, group = %self.group, subject = %message.subject, %reason, "terminating a message that is not a CloudEvent");
                tokio::spawn(async move {
                    let _ = acker.ack_with(AckKind::Term).await;
                });
                return None;
            }
        };
        let info = DeliveryInfo {
            topic: self.topic.clone(),
            group: self.group.clone(),
            attempt,
        };
        let settle = NatsSettle {
            acker,
            shared: self.shared.clone(),
            wake: self.wake.clone(),
            stream: self.stream.clone(),
            consumer: self.consumer_name.clone(),
            sequence,
        };
        let acker = OnceAcker::with_permit(settle, self.prefetch.acquire());
        Some(Delivery::new(event, info, Box::new(acker)))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // The batch asked for goes on arriving until it is complete or
        // expires; what arrives goes back at once.
        let Some(mut batch) = self.batch.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        runtime.spawn(async move {
            while let Some(received) = batch.next().await {
                if let Ok(message) = received {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
            }
            shared.flush_out(FLUSH_LIMIT).await;
        });
    }
}

/// Settles one delivery through its JetStream acker.
struct NatsSettle {
    acker: async_nats::jetstream::message::Acker,
    shared: Arc<Shared>,
    /// The member's: room was made.
    wake: Arc<Notify>,
    /// Where the message is, for its retry marker.
    stream: Arc<str>,
    consumer: Arc<str>,
    sequence: u64,
}

fn settle_error(what: &str, e: &dyn std::fmt::Display) -> TransportError {
    TransportError::new(
        TransportErrorKind::Unavailable,
        format!("{what}: {e}; JetStream hands the event out again after the ack wait"),
    )
}

impl Settle for NatsSettle {
    fn settle(
        self,
        event: &Event,
        info: &DeliveryInfo,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        self.wake.notify_waiters();
        // Made here: the future outlives the borrowed event.
        let dead = if let Outcome::DeadLetter(dead_letter) = &outcome {
            Some((
                dead_letter_topic(&info.topic),
                dead_letter_event(event, info, dead_letter),
            ))
        } else {
            None
        };
        Box::pin(async move {
            match outcome {
                Outcome::Ack => self
                    .acker
                    .ack()
                    .await
                    .map_err(|e| settle_error("acking", &e)),
                Outcome::Retry { after } => {
                    let due = eventos_kit::clock::due_ms(after);
                    if let Err(e) = self
                        .shared
                        .mark_retry(&self.stream, &self.consumer, self.sequence, due)
                        .await
                    {
                        // The retry matters more than its count.
                        tracing::warn!(error = %e, "a retry not marked for inspection");
                    }
                    self.acker
                        .ack_with(AckKind::Nak(Some(after)))
                        .await
                        .map_err(|e| settle_error("asking for a retry", &e))
                }
                Outcome::DeadLetter(_) => {
                    let (topic, dead) = dead.expect("a dead letter was made for it");
                    self.shared.publish(&topic, &[dead]).await?;
                    self.acker
                        .double_ack()
                        .await
                        .map_err(|e| settle_error("acking a dead-lettered event", &e))
                }
            }
        })
    }

    fn unsettled(self) {
        self.wake.notify_waiters();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let _ = self.acker.ack_with(AckKind::Nak(None)).await;
            self.shared.flush_out(FLUSH_LIMIT).await;
        });
    }
}
