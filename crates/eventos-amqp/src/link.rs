//! The connection to RabbitMQ, re-established with backoff when it drops,
//! and everything that only needs a connection: declaring and publishing
//! with confirms.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use eventos_core::{TransportError, TransportErrorKind, redact_url};
use eventos_kit::Lifecycle;
use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use tokio::sync::Notify;

use crate::codec::Encoded;
use crate::names::Names;
use crate::{AmqpOptions, QueueType};

/// How long one confirm may take before the connection is presumed dead.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// RabbitMQ's reply code for a mandatory message no queue is bound for.
const NO_ROUTE: u16 = 312;
/// How long a publish waits for subscriptions being cancelled.
const CANCEL_WAIT: Duration = Duration::from_secs(2);
/// How long past its bucket an unused delay queue lives.
pub(crate) const DELAY_QUEUE_SLACK: Duration = Duration::from_secs(600);

pub(crate) use eventos_kit::lock;

pub(crate) use eventos_kit::clock::now_ms;

/// A failed step, and whether trying again on a new connection may help.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) retry: bool,
    pub(crate) error: TransportError,
}

impl Failure {
    pub(crate) fn fatal(error: TransportError) -> Self {
        Self {
            retry: false,
            error,
        }
    }
}

impl From<Failure> for TransportError {
    fn from(f: Failure) -> Self {
        f.error
    }
}

/// Whether a lapin error means the connection or channel is gone (try again
/// on a new one) rather than the broker refusing the operation.
pub(crate) fn is_connection_loss(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Hard(
                AMQPHardError::CONNECTIONFORCED
                    | AMQPHardError::CHANNELERROR
                    | AMQPHardError::UNEXPECTEDFRAME
                    | AMQPHardError::RESOURCEERROR
                    | AMQPHardError::INTERNALERROR
            )
        ),
        _ => true,
    }
}

/// Maps a lapin error of `what` to a failure, naming the broker condition.
pub(crate) fn failure(what: &str, e: lapin::Error) -> Failure {
    if is_connection_loss(&e) {
        return Failure {
            retry: true,
            error: TransportError::new(
                TransportErrorKind::Unavailable,
                format!("{what}: the connection to RabbitMQ was lost"),
            )
            .with_source(e),
        };
    }
    let hint = match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                "; it exists with other arguments (another queue type or x-expires): delete it or use another namespace"
            }
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                "; the user lacks permissions on this vhost (rabbitmqctl set_permissions)"
            }
            _ => "",
        },
        _ => "",
    };
    Failure::fatal(
        TransportError::new(TransportErrorKind::Other, format!("{what} failed{hint}"))
            .with_source(e),
    )
}

/// One connection and its confirm-mode publishing channel.
pub(crate) struct Link {
    pub(crate) connection: Connection,
    publish: Channel,
    /// Delay and dead-letter queues declared over this connection, and
    /// when.
    declared: Mutex<HashMap<String, Instant>>,
}

impl Link {
    fn alive(&self) -> bool {
        self.connection.status().connected() && self.publish.status().connected()
    }
}

/// What to do when RabbitMQ returns a mandatory message no queue is bound
/// for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unroutable {
    /// Accept it: no group has joined the topic, so it has no one to reach.
    Accept,
    /// Fail: the transport declared the target queue, so a return means the
    /// event would be lost.
    Fail,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) message: Encoded,
    /// The event id, for messages.
    pub(crate) id: String,
    pub(crate) unroutable: Unroutable,
}

/// Everything the transport's parts share.
pub(crate) struct Shared {
    url: String,
    /// The URL without credentials, for messages.
    pub(crate) shown: String,
    pub(crate) options: AmqpOptions,
    pub(crate) names: Names,
    /// The management API for inspection, or why there is none.
    pub(crate) management: Result<crate::inspect::Management, String>,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    pub(crate) lifecycle: Lifecycle,
    /// Streams dropped whose consumer RabbitMQ has not confirmed cancelled.
    cancelling: AtomicUsize,
    cancelled: Notify,
    /// Subscription pumps still running, and a wake-up when one ends.
    pumps: AtomicUsize,
    pump_ended: Notify,
}

impl Shared {
    /// Connects once; `connect` fails fast rather than retrying, so a
    /// misconfiguration is reported at start.
    pub(crate) async fn connect(
        url: &str,
        options: AmqpOptions,
    ) -> Result<Arc<Self>, TransportError> {
        let shown = redact_url(url);
        let names = Names::new(&options.namespace);
        let management = crate::inspect::Management::new(url, options.management_url.as_deref());
        let shared = Arc::new(Self {
            url: url.to_owned(),
            shown,
            options,
            names,
            management,
            link: tokio::sync::Mutex::new(None),
            lifecycle: Lifecycle::new(),
            cancelling: AtomicUsize::new(0),
            cancelled: Notify::new(),
            pumps: AtomicUsize::new(0),
            pump_ended: Notify::new(),
        });
        shared.link().await.map_err(|f| f.error)?;
        Ok(shared)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lifecycle.is_closed()
    }

    pub(crate) fn check_open(&self) -> Result<(), TransportError> {
        self.lifecycle.check_open()
    }

    /// Closes the connection; streams end, later calls fail as closed.
    pub(crate) async fn close(&self) {
        self.lifecycle.close();
        self.cancelled.notify_waiters();
        // Each subscription closes its channel first: RabbitMQ answers a
        // channel close only after handling everything sent on it, so acks
        // sent just before `close` are not lost with the connection.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let ended = self.pump_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.pumps.load(Ordering::Acquire) == 0
                || tokio::time::timeout_at(deadline, ended).await.is_err()
            {
                break;
            }
        }
        let link = self.link.lock().await.take();
        if let Some(link) = link {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                link.connection.close(200, "closed by eventos".into()),
            )
            .await;
        }
    }

    /// The backoff between attempts while RabbitMQ is unreachable.
    pub(crate) fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .with_total_delay(Some(self.options.retry_for))
            .without_max_times()
            .build()
    }

    /// The current connection, reconnecting if it dropped.
    pub(crate) async fn link(&self) -> Result<Arc<Link>, Failure> {
        self.check_open().map_err(Failure::fatal)?;
        let mut current = self.link.lock().await;
        if let Some(link) = current.as_ref() {
            if link.alive() {
                return Ok(link.clone());
            }
            tracing::warn!(broker = %self.shown, "connection to RabbitMQ lost; reconnecting");
            if link.connection.status().connected() {
                // Only the publishing channel died: close the connection
                // too, so its subscriptions move to the new one rather
                // than keep an orphaned connection alive.
                let old = link.clone();
                tokio::spawn(async move {
                    let _ = old.connection.close(320, "eventos reconnects".into()).await;
                });
            }
        }
        *current = None;
        let link = Arc::new(self.open_link().await?);
        self.check_open().map_err(Failure::fatal)?;
        *current = Some(link.clone());
        Ok(link)
    }

    /// Drops `link` if it is still the current one, so the next call
    /// reconnects.
    pub(crate) async fn discard(&self, link: &Arc<Link>) {
        let mut current = self.link.lock().await;
        if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *current = None;
            drop(current);
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                link.connection.close(320, "eventos reconnects".into()),
            )
            .await;
        }
    }

    async fn open_link(&self) -> Result<Link, Failure> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("eventos ({})", self.options.namespace).into());
        let connecting = Connection::connect(&self.url, props);
        let connection = match tokio::time::timeout(self.options.connect_timeout, connecting).await
        {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => return Err(self.connect_failure(&e)),
            Err(_) => {
                return Err(Failure {
                    retry: true,
                    error: TransportError::new(
                        TransportErrorKind::Unavailable,
                        format!(
                            "cannot connect to RabbitMQ at {}: no answer within {:?}; is the host reachable and the port the AMQP listener's?",
                            self.shown, self.options.connect_timeout
                        ),
                    ),
                });
            }
        };
        let setup = async {
            let publish = connection.create_channel().await?;
            publish
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            publish
                .exchange_declare(
                    self.names.exchange().into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>(publish)
        };
        match setup.await {
            Ok(publish) => Ok(Link {
                connection,
                publish,
                declared: Mutex::new(HashMap::new()),
            }),
            Err(e) => Err(failure(
                &format!(
                    "declaring exchange {:?} on {}",
                    self.names.exchange(),
                    self.shown
                ),
                e,
            )),
        }
    }

    fn connect_failure(&self, e: &lapin::Error) -> Failure {
        let shown = &self.shown;
        let (retry, reason) = match e.kind() {
            ErrorKind::IOError(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => (
                true,
                "connection refused; is the broker running? (rabbitmq-server -detached)".to_owned(),
            ),
            ErrorKind::IOError(io) => (true, format!("{io}; is the broker running and reachable?")),
            ErrorKind::ProtocolError(amqp) => match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => (
                    false,
                    "login refused; check the user name and password in the URL".to_owned(),
                ),
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => (
                    false,
                    "the vhost does not exist or the user may not use it; check the URL's vhost (%2f is \"/\") or run rabbitmqctl add_vhost / set_permissions".to_owned(),
                ),
                _ => (true, format!("{amqp}")),
            },
            _ => (true, format!("{e}")),
        };
        let kind = if retry {
            TransportErrorKind::Unavailable
        } else {
            TransportErrorKind::Other
        };
        Failure {
            retry,
            error: TransportError::new(
                kind,
                format!("cannot connect to RabbitMQ at {shown}: {reason}"),
            ),
        }
    }

    /// Runs `op` on a connection, reconnecting with backoff while it fails
    /// for connection reasons, for at most [`AmqpOptions::retry_for`].
    pub(crate) async fn retrying<T, F, Fut>(&self, mut op: F) -> Result<T, TransportError>
    where
        F: FnMut(Arc<Link>) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut backoff = self.backoff();
        loop {
            let attempt = match self.link().await {
                Ok(link) => {
                    let result = op(link.clone()).await;
                    if let Err(f) = &result
                        && f.retry
                    {
                        self.discard_if_dead(&link).await;
                    }
                    result
                }
                Err(f) => Err(f),
            };
            match attempt {
                Ok(value) => return Ok(value),
                Err(f) if !f.retry || self.is_closed() => {
                    self.check_open()?;
                    return Err(f.error);
                }
                Err(f) => match backoff.next() {
                    Some(pause) => {
                        tracing::debug!(error = %f.error, ?pause, "retrying after a connection failure");
                        tokio::time::sleep(pause).await;
                    }
                    None => return Err(f.error),
                },
            }
        }
    }

    async fn discard_if_dead(&self, link: &Arc<Link>) {
        if !link.alive() {
            self.discard(link).await;
        }
    }

    /// Declares something on a channel of its own, so a refusal does not
    /// close the publishing channel; once per connection and per `fresh`
    /// when that is set, every time when not.
    pub(crate) async fn declare_once<F, Fut>(
        &self,
        link: &Link,
        key: &str,
        fresh: Option<Duration>,
        declare: F,
    ) -> Result<(), Failure>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<(), lapin::Error>>,
    {
        if let Some(fresh) = fresh
            && lock(&link.declared)
                .get(key)
                .is_some_and(|at| at.elapsed() < fresh)
        {
            return Ok(());
        }
        let what = format!("declaring {key:?}");
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|e| failure(&what, e))?;
        declare(channel.clone())
            .await
            .map_err(|e| failure(&what, e))?;
        let _ = channel.close(200, "declared".into()).await;
        if fresh.is_some() {
            lock(&link.declared).insert(key.to_owned(), Instant::now());
        }
        Ok(())
    }

    /// The arguments of a work queue (a group's or a parked dead-letter
    /// queue).
    pub(crate) fn queue_args(&self) -> FieldTable {
        let mut args = self.type_args();
        if let Some(expires) = self.options.queue_expires {
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX)),
            );
        }
        args
    }

    fn type_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let ty = match self.options.queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(ty)),
        );
        args
    }

    /// Declares the delay queue of the work queue `queue` for `bucket`:
    /// its messages expire after `bucket` into the default exchange, routed
    /// back to `queue`. Returns its name.
    ///
    /// A delay queue is deleted by RabbitMQ once unused for
    /// [`DELAY_QUEUE_SLACK`] past its bucket, so a group's delay queues do
    /// not outlive it; publishing does not count as use, so it is declared
    /// again once its last declaration is half that slack old, and a
    /// message sent into it always expires before the queue does.
    pub(crate) async fn declare_delay(
        &self,
        link: &Link,
        queue: &str,
        bucket: Duration,
    ) -> Result<String, Failure> {
        let name = Names::delay(queue, bucket);
        let millis =
            |d: Duration| AMQPValue::LongLongInt(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut args = self.type_args();
        args.insert("x-message-ttl".into(), millis(bucket));
        args.insert("x-expires".into(), millis(bucket + DELAY_QUEUE_SLACK));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(queue)),
        );
        if self.options.queue_type == QueueType::Quorum {
            // At-least-once: an expired retry stays in the bucket until its
            // work queue has confirmed it (RabbitMQ 3.10+; needs
            // reject-publish overflow).
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString(LongString::from("at-least-once")),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
        }
        let declared = name.clone();
        self.declare_once(link, &name, Some(DELAY_QUEUE_SLACK / 2), |ch| async move {
            ch.queue_declare(
                declared.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map(drop)
        })
        .await?;
        Ok(name)
    }

    /// Declares the queue that parks the dead letters of `topic` (its
    /// [`crate::PARKED_GROUP`] queue on `dlq_topic`).
    pub(crate) async fn declare_parked(&self, link: &Link, dlq_topic: &str) -> Result<(), Failure> {
        let queue = self.names.queue(dlq_topic, crate::PARKED_GROUP);
        let exchange = self.names.exchange().to_owned();
        let args = self.queue_args();
        let routing = dlq_topic.to_owned();
        // Declared every time: dead letters are rare, and a queue with an
        // `x-expires` may have gone since the last one.
        self.declare_once(link, &queue.clone(), None, |ch| async move {
            ch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                routing.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        })
        .await
    }

    /// Waits (briefly) until RabbitMQ confirmed the cancellation of every
    /// dropped stream, so a publish made after dropping a stream never
    /// reaches it.
    async fn await_cancellations(&self) {
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        loop {
            let notified = self.cancelled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.cancelling.load(Ordering::Acquire) == 0 || self.is_closed() {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn pump_started(&self) {
        self.pumps.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn pump_ended(&self) {
        self.pumps.fetch_sub(1, Ordering::AcqRel);
        self.pump_ended.notify_waiters();
    }

    pub(crate) fn cancellation_started(&self) {
        self.cancelling.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn cancellation_done(&self) {
        self.cancelling.fetch_sub(1, Ordering::AcqRel);
        self.cancelled.notify_waiters();
    }

    /// Publishes `messages` in order and returns once RabbitMQ confirmed
    /// each. After a connection loss the unconfirmed rest is published
    /// again on a new connection: an event may then be stored twice, never
    /// lost.
    pub(crate) async fn publish(&self, messages: Vec<Outgoing>) -> Result<(), TransportError> {
        self.await_cancellations().await;
        let confirmed = AtomicUsize::new(0);
        let (messages, confirmed) = (&messages, &confirmed);
        self.retrying(|link| async move {
            let from = confirmed.load(Ordering::Acquire);
            self.publish_on(&link, &messages[from..], confirmed).await
        })
        .await
    }

    async fn publish_on(
        &self,
        link: &Link,
        messages: &[Outgoing],
        confirmed: &AtomicUsize,
    ) -> Result<(), Failure> {
        let mut pending = Vec::with_capacity(messages.len());
        let mut sent = Ok(());
        for m in messages {
            let publishing = link.publish.basic_publish(
                m.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &m.message.body,
                m.message.properties.clone(),
            );
            match publishing.await {
                Ok(confirm) => pending.push((m, confirm)),
                Err(e) => {
                    sent = Err(failure(&format!("publishing event {}", m.id), e));
                    break;
                }
            }
        }
        // Confirms come in order; everything confirmed before a failure
        // stays confirmed, so a retry starts after it.
        for (m, confirm) in pending {
            let confirmation = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Ok(Ok(confirmation)) => confirmation,
                Ok(Err(e)) => {
                    return Err(failure(
                        &format!("awaiting the confirm of event {}", m.id),
                        e,
                    ));
                }
                Err(_) => {
                    return Err(Failure {
                        retry: true,
                        error: TransportError::new(
                            TransportErrorKind::Unavailable,
                            format!(
                                "RabbitMQ did not confirm event {} within {CONFIRM_TIMEOUT:?}",
                                m.id
                            ),
                        ),
                    });
                }
            };
            match confirmation {
                Confirmation::Ack(returned) | Confirmation::Nack(returned)
                    if returned.is_some() =>
                {
                    let returned = returned.expect("checked above");
                    if returned.reply_code == NO_ROUTE && m.unroutable == Unroutable::Accept {
                        tracing::debug!(topic = %m.routing_key, event = %m.id, "no group has joined the topic; the event reaches no one");
                    } else {
                        return Err(Failure::fatal(TransportError::new(
                            TransportErrorKind::Unavailable,
                            format!(
                                "RabbitMQ returned event {} ({} {}): no queue took it",
                                m.id, returned.reply_code, returned.reply_text
                            ),
                        )));
                    }
                }
                Confirmation::Ack(_) | Confirmation::NotRequested => {}
                Confirmation::Nack(_) => {
                    return Err(Failure::fatal(TransportError::new(
                        TransportErrorKind::Unavailable,
                        format!(
                            "RabbitMQ refused to store event {} (nack); a queue may be full or unavailable, try again later",
                            m.id
                        ),
                    )));
                }
            }
            confirmed.fetch_add(1, Ordering::AcqRel);
        }
        sent
    }
}
