//! Subscriptions: one channel and consumer per subscription, re-declared
//! and resumed after a reconnection; and the acker that settles deliveries.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use eventos_core::{
    Delivery, DeliveryInfo, ErrorChain, Event, Outcome, Subscription, TransportError,
    TransportErrorKind, dead_letter_event, dead_letter_topic,
};
use eventos_kit::{OnceAcker, Settle};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::mpsc;

use crate::codec::{self, Stamp};
use crate::link::{Failure, Outgoing, Shared, Unroutable, failure, lock, now_ms};
use crate::names::delay_bucket;

/// Resolves once the transport is closed.
type Closed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a subscription's pump stands, as its stream sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpState {
    Running,
    /// The stream was dropped; the pump owes a cancellation.
    Dropped,
    Done,
}

/// A subscription's fixed facts.
struct Target {
    topic: Arc<str>,
    group: Arc<str>,
    queue: String,
    prefetch: u16,
}

/// Declares the group's queue, binds it, and starts consuming from it on a
/// channel of its own.
async fn attach(shared: &Shared, target: &Target) -> Result<(Channel, Consumer), TransportError> {
    shared
        .retrying(|link| async move {
            let what = format!(
                "subscribing group {:?} to topic {:?} (queue {:?})",
                target.group, target.topic, target.queue
            );
            let fail = |e| failure(&what, e);
            let channel = link.connection.create_channel().await.map_err(fail)?;
            channel
                .queue_declare(
                    target.queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    shared.queue_args(),
                )
                .await
                .map_err(fail)?;
            channel
                .queue_bind(
                    target.queue.as_str().into(),
                    shared.names.exchange().into(),
                    target.topic.as_ref().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(fail)?;
            channel
                .basic_qos(target.prefetch, BasicQosOptions { global: false })
                .await
                .map_err(fail)?;
            let consumer = channel
                .basic_consume(
                    target.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(fail)?;
            Ok::<_, Failure>((channel, consumer))
        })
        .await
}

/// Subscribes: returns once the queue exists and is bound, so every event
/// published afterwards reaches the group.
pub(crate) async fn subscribe(
    shared: Arc<Shared>,
    subscription: Subscription,
) -> Result<AmqpStream, TransportError> {
    let target = Target {
        queue: shared.names.queue(&subscription.topic, &subscription.group),
        topic: subscription.topic.as_str().into(),
        group: subscription.group.as_str().into(),
        prefetch: u16::try_from(subscription.prefetch.max(1)).unwrap_or(u16::MAX),
    };
    let (channel, consumer) = attach(&shared, &target).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Arc::new(std::sync::Mutex::new(PumpState::Running));
    let pump = Pump {
        shared: shared.clone(),
        target,
        tx,
        state: state.clone(),
    };
    shared.pump_started();
    tokio::spawn(pump.run(channel, consumer));
    Ok(AmqpStream { shared, rx, state })
}

/// The stream handed to the subscriber.
pub(crate) struct AmqpStream {
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Result<Delivery, TransportError>>,
    state: Arc<std::sync::Mutex<PumpState>>,
}

impl Stream for AmqpStream {
    type Item = Result<Delivery, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.shared.is_closed() {
            return Poll::Ready(None);
        }
        self.rx.poll_recv(cx)
    }
}

impl Drop for AmqpStream {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if *state == PumpState::Running {
            *state = PumpState::Dropped;
            // Counted now, synchronously, so a publish made right after the
            // drop waits until RabbitMQ stopped delivering to this consumer.
            self.shared.cancellation_started();
        }
    }
}

/// Moves deliveries from one consumer to its stream, reconnecting as
/// needed.
struct Pump {
    shared: Arc<Shared>,
    target: Target,
    tx: mpsc::UnboundedSender<Result<Delivery, TransportError>>,
    state: Arc<std::sync::Mutex<PumpState>>,
}

impl Pump {
    async fn run(self, mut channel: Channel, mut consumer: Consumer) {
        let mut closed: Closed = Box::pin(self.shared.lifecycle.closed());
        let mut attached_at = tokio::time::Instant::now();
        let mut backoff = self.shared.backoff();
        loop {
            tokio::select! {
                () = &mut closed => break,
                () = self.tx.closed() => break,
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => self.handle(delivery).await,
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::warn!(queue = %self.target.queue, error = %e, "consumer lost; resubscribing");
                        }
                        let _ = self.tx.send(Err(TransportError::new(
                            TransportErrorKind::Unavailable,
                            format!(
                                "the consumer of group {:?} on topic {:?} lost its connection; resubscribing",
                                self.target.group, self.target.topic
                            ),
                        )));
                        // A consumer that ends as soon as it started (its queue
                        // deleted under it, say) must not make this a busy loop.
                        if attached_at.elapsed() < Duration::from_secs(5) {
                            let pause = backoff.next().unwrap_or(Duration::from_secs(2));
                            tokio::select! {
                                () = &mut closed => break,
                                () = self.tx.closed() => break,
                                () = tokio::time::sleep(pause) => {}
                            }
                        } else {
                            backoff = self.shared.backoff();
                        }
                        match self.reattach(&mut closed).await {
                            Some((ch, c)) => (channel, consumer) = (ch, c),
                            None => break,
                        }
                        attached_at = tokio::time::Instant::now();
                    }
                },
            }
        }
        self.finish(&channel, &consumer).await;
    }

    /// Attaches again after a connection loss, until it works or the
    /// subscription ends.
    async fn reattach(&self, closed: &mut Closed) -> Option<(Channel, Consumer)> {
        loop {
            tokio::select! {
                () = &mut *closed => return None,
                () = self.tx.closed() => return None,
                attached = attach(&self.shared, &self.target) => match attached {
                    Ok(pair) => return Some(pair),
                    Err(e) => {
                        tracing::warn!(queue = %self.target.queue, error = %ErrorChain(&e), "cannot resubscribe yet");
                        let _ = self.tx.send(Err(e));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
            }
        }
    }

    /// Cancels the consumer and closes the channel, which makes RabbitMQ
    /// requeue everything still unacked on it.
    async fn finish(&self, channel: &Channel, consumer: &Consumer) {
        let owed = {
            let mut state = lock(&self.state);
            let owed = *state == PumpState::Dropped;
            *state = PumpState::Done;
            owed
        };
        if owed {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
            )
            .await;
            self.shared.cancellation_done();
        }
        if channel.status().connected() {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                channel.close(200, "subscription ended".into()),
            )
            .await;
        }
        self.shared.pump_ended();
    }

    async fn handle(&self, delivery: lapin::message::Delivery) {
        let lapin::message::Delivery {
            properties,
            data,
            acker,
            redelivered,
            ..
        } = delivery;
        let received = codec::received(&properties, redelivered);
        if let Some(due) = received.due_ms {
            let early = due - now_ms();
            if early > 0 {
                // A retry longer than the last bucket, or one that came back
                // a little early: it waits again for the rest.
                self.delay_again(&properties, data, acker, received.stamped, due, early)
                    .await;
                return;
            }
        }
        let event = match codec::decode(&properties, data) {
            Ok(event) => event,
            Err(reason) => {
                tracing::error!(queue = %self.target.queue, %reason, "dropping a message that is not a CloudEvent");
                let _ = acker.reject(BasicRejectOptions { requeue: false }).await;
                return;
            }
        };
        let info = DeliveryInfo {
            topic: self.target.topic.clone(),
            group: self.target.group.clone(),
            attempt: received.attempt,
        };
        let acker = OnceAcker::new(AmqpSettle {
            shared: self.shared.clone(),
            queue: self.target.queue.clone(),
            acker,
        });
        let _ = self
            .tx
            .send(Ok(Delivery::new(Arc::new(event), info, Box::new(acker))));
    }

    async fn delay_again(
        &self,
        properties: &lapin::BasicProperties,
        data: Vec<u8>,
        acker: lapin::Acker,
        stamped: u32,
        due: i64,
        early_ms: i64,
    ) {
        let rest = Duration::from_millis(u64::try_from(early_ms).unwrap_or(0));
        let message = codec::Encoded {
            body: data,
            properties: codec::without_broker_headers(properties),
        };
        let result = send_delayed(
            &self.shared,
            &self.target.queue,
            message,
            rest,
            "delayed event",
        )
        .await;
        match result {
            Ok(()) => {
                let _ = acker.ack(BasicAckOptions::default()).await;
            }
            Err(e) => {
                tracing::warn!(queue = %self.target.queue, error = %ErrorChain(&e), stamped, due, "cannot delay a retry again; it will be redelivered");
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
            }
        }
    }
}

/// Publishes `message` so it reaches `queue` no sooner than `after`: into
/// the queue's delay queue for the bucket `after` rounds up to, or straight
/// to the queue when there is nothing to wait.
async fn send_delayed(
    shared: &Shared,
    queue: &str,
    message: codec::Encoded,
    after: Duration,
    id: &str,
) -> Result<(), TransportError> {
    let routing_key = if after.is_zero() {
        queue.to_owned()
    } else {
        let bucket = delay_bucket(after);
        shared
            .retrying(|link| async move { shared.declare_delay(&link, queue, bucket).await })
            .await?
    };
    shared
        .publish(vec![Outgoing {
            exchange: String::new(),
            routing_key,
            message,
            id: id.to_owned(),
            unroutable: Unroutable::Fail,
        }])
        .await
}

/// Settles one delivery on the channel it came from. RabbitMQ counts the
/// prefetch itself, so the acker holds no permit.
struct AmqpSettle {
    shared: Arc<Shared>,
    queue: String,
    acker: lapin::Acker,
}

impl AmqpSettle {
    fn lost(shared: &Shared, what: &str, e: Option<lapin::Error>) -> TransportError {
        if shared.is_closed() {
            return TransportError::closed();
        }
        let error = TransportError::new(
            TransportErrorKind::Unavailable,
            format!(
                "{what}: the delivery's channel closed before RabbitMQ got the settlement; the event will be redelivered"
            ),
        );
        match e {
            Some(e) => error.with_source(e),
            None => error,
        }
    }

    async fn ack(shared: &Shared, acker: &lapin::Acker, what: &str) -> Result<(), TransportError> {
        match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) if acker.poisoned() => Err(Self::lost(shared, what, None)),
            Ok(false) => Err(TransportError::new(
                TransportErrorKind::Settled,
                "delivery already settled",
            )),
            Err(e) => Err(Self::lost(shared, what, Some(e))),
        }
    }
}

impl Settle for AmqpSettle {
    fn settle(
        self,
        event: &Event,
        info: &DeliveryInfo,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        let AmqpSettle {
            shared,
            queue,
            acker,
        } = self;
        // What the outcome publishes, encoded now since the future owns no
        // borrow of the event.
        let prepared = match &outcome {
            Outcome::Ack => Ok(None),
            Outcome::Retry { after } => {
                let due_ms = eventos_kit::clock::due_ms(*after);
                let stamp = Stamp {
                    attempt: info.attempt.saturating_add(1),
                    due_ms: Some(due_ms),
                };
                codec::encode(event, shared.options.mode, stamp).map(|m| Some((m, *after)))
            }
            Outcome::DeadLetter(dead_letter) => {
                let dl = dead_letter_event(event, info, dead_letter);
                codec::encode(&dl, shared.options.mode, Stamp::default())
                    .map(|m| Some((m, Duration::ZERO)))
            }
        };
        let dlq_topic = dead_letter_topic(&info.topic);
        let id = event.id().to_owned();
        Box::pin(async move {
            let what = format!("settling event {id} with {}", outcome.label());
            let prepared = match prepared {
                Ok(p) => p,
                Err(e) => {
                    let _ = acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await;
                    return Err(e);
                }
            };
            let published = match (&outcome, prepared) {
                (Outcome::Ack, _) | (_, None) => Ok(()),
                (Outcome::Retry { .. }, Some((message, after))) => {
                    send_delayed(&shared, &queue, message, after, &id).await
                }
                (Outcome::DeadLetter(_), Some((message, _))) => {
                    let parked = shared
                        .retrying(|link| {
                            let dlq_topic = dlq_topic.clone();
                            let shared = &shared;
                            async move { shared.declare_parked(&link, &dlq_topic).await }
                        })
                        .await;
                    match parked {
                        Ok(()) => {
                            shared
                                .publish(vec![Outgoing {
                                    exchange: shared.names.exchange().to_owned(),
                                    routing_key: dlq_topic.clone(),
                                    message,
                                    id: id.clone(),
                                    unroutable: Unroutable::Fail,
                                }])
                                .await
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = published {
                // Not recorded: hand it back for redelivery rather than
                // leave it to the channel's end.
                let _ = acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
                return Err(e);
            }
            Self::ack(&shared, &acker, &what).await
        })
    }

    fn unsettled(self) {
        // Requeued now, so the event comes back without waiting for the
        // channel to close. Without a runtime the channel's end requeues
        // it all the same.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let acker = self.acker;
            runtime.spawn(async move {
                let _ = acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
            });
        }
    }
}
