//! The consumer side: one DEALER link per publisher a subscription
//! consumes from, all feeding one delivery stream.
//!
//! A link connects, says `$hello`, and then hands every delivery to the
//! stream with an acker that sends its settlement back over the same link
//! and waits for the publisher's `$settled`. It pings every heartbeat; a
//! publisher silent for the peer timeout (killed, restarted, cut off) is
//! given up on: the link's settlements in flight fail (the publisher hands
//! those events out again), and it connects anew with a fresh socket —
//! the ZeroMQ library reconnects nothing by itself.
//!
//! Deliveries and acks carry the link's epoch: an ack of a delivery from
//! an earlier connection is refused at once rather than sent to a
//! publisher that never issued its tag.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eventos_core::{
    Delivery, DeliveryInfo, Event, Outcome, Subscription, TransportError, TransportErrorKind,
};
use eventos_kit::lock;
use eventos_kit::{OnceAcker, Settle};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use zeromq::util::PeerIdentity;
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend};

use crate::Timing;
use crate::server::LocalSessions;
use crate::wire::{ToConsumer, ToPublisher, VERSION};

/// How long a consumer's settlement waits for the publisher's answer.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping link waits for the deliveries it handed out to be
/// settled before it says `$bye` (and the rest go back).
const LINGER: Duration = Duration::from_secs(10);
/// How long a closing transport's link waits for `$synced`.
const SYNC_TIMEOUT: Duration = Duration::from_secs(3);
/// The most acks one `$acks` message carries.
const MAX_ACKS_PER_MESSAGE: usize = 512;

type Out = mpsc::UnboundedSender<Result<Delivery, TransportError>>;

/// Where a link's join stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Joined {
    Waiting,
    Yes,
    Refused(String),
}

/// Starts a link to `endpoint` for `subscription`.
pub(crate) fn link(
    endpoint: String,
    subscription: &Subscription,
    timing: Timing,
    out: Out,
    stop: CancellationToken,
    closing: CancellationToken,
) -> (
    watch::Receiver<Joined>,
    Identity,
    tokio::task::JoinHandle<()>,
) {
    let (link, join, queue) = Link::new(endpoint, subscription, timing, out);
    let identity = link.identity.clone();
    let task = tokio::spawn(link.run(queue, stop, closing));
    (join, identity, task)
}

/// Starts a link to the publisher that connected to this node's hub as
/// `publisher` (consumers bind): one connection, over the hub's ROUTER;
/// when the hub loses the publisher, the link ends, and the hub starts a
/// new one when the publisher announces itself again.
#[allow(clippy::too_many_arguments)]
pub(crate) fn hub_link(
    publisher: String,
    subscription: &Subscription,
    timing: Timing,
    out: Out,
    stop: CancellationToken,
    closing: CancellationToken,
    tx: Tx,
    rx: Rx,
) -> (watch::Receiver<Joined>, tokio::task::JoinHandle<()>) {
    let (mut link, join, mut queue) = Link::new(publisher, subscription, timing, out);
    link.epoch = 1;
    let task = tokio::spawn(async move {
        if let End::Lost(why) = link.connection(tx, rx, &mut queue, &stop, &closing).await {
            tracing::info!(publisher = %link.endpoint, topic = %link.topic, group = %link.group, "{why}");
        }
    });
    (join, task)
}

/// The sending half a link talks over.
pub(crate) enum Tx {
    /// Its own DEALER, connected to the publisher.
    Dealer(zeromq::DealerSendHalf),
    /// The hub's ROUTER: every message goes out with these frames first
    /// (the publisher's identity, the subscription's id).
    Hub {
        to: mpsc::UnboundedSender<zeromq::ZmqMessage>,
        prefix: Vec<Bytes>,
    },
}

impl Tx {
    async fn send(&mut self, message: zeromq::ZmqMessage) -> Result<(), String> {
        match self {
            Tx::Dealer(tx) => tx.send(message).await.map_err(|e| e.to_string()),
            Tx::Hub { to, prefix } => {
                let mut message = message;
                for frame in prefix.iter().rev() {
                    message.push_front(frame.clone());
                }
                to.send(message).map_err(|_| "the hub is closed".to_owned())
            }
        }
    }
}

/// The receiving half a link talks over.
pub(crate) enum Rx {
    Dealer(zeromq::DealerRecvHalf),
    /// What the hub routed to this link; ends when the hub loses the
    /// publisher.
    Hub(mpsc::UnboundedReceiver<zeromq::ZmqMessage>),
}

impl Rx {
    async fn recv(&mut self) -> Result<zeromq::ZmqMessage, String> {
        match self {
            Rx::Dealer(rx) => rx.recv().await.map_err(|e| e.to_string()),
            Rx::Hub(rx) => rx
                .recv()
                .await
                .ok_or_else(|| "the hub lost the publisher".to_owned()),
        }
    }
}

/// Connects `socket` to `endpoint`, or says `false` when it is not up
/// within one try. The library retries a refused connection by itself,
/// but with pauses that grow to five seconds; trying again with a fresh
/// socket every try instead finds a peer that starts (or restarts) within
/// a try of it.
pub(crate) async fn connect(
    socket: &mut impl Socket,
    endpoint: &str,
    timing: Timing,
) -> Result<bool, zeromq::ZmqError> {
    let attempt = (timing.heartbeat * 2).clamp(Duration::from_millis(250), Duration::from_secs(2));
    match tokio::time::timeout(attempt, socket.connect(endpoint)).await {
        Ok(connected) => connected.map(|()| true),
        Err(_) => Ok(false),
    }
}

/// The socket identity of a link's current connection, which the
/// publisher's ROUTER knows it by.
pub(crate) type Identity = Arc<Mutex<Option<Bytes>>>;

enum Command {
    /// Acks go out without an answer to wait for, several per message
    /// when they queue up.
    Ack {
        epoch: u64,
        tag: u64,
    },
    Settle {
        epoch: u64,
        tag: u64,
        outcome: Outcome,
        reply: oneshot::Sender<Result<(), TransportError>>,
    },
    Release {
        epoch: u64,
        tag: u64,
    },
}

struct Link {
    endpoint: String,
    hello: ToPublisher,
    topic: Arc<str>,
    group: Arc<str>,
    timing: Timing,
    out: Out,
    joined: watch::Sender<Joined>,
    commands: mpsc::UnboundedSender<Command>,
    epoch: u64,
    identity: Identity,
}

/// Why a connection ended.
enum End {
    /// Stop asked and done, or nobody left to deliver to.
    Done,
    /// Lost the publisher: connect again.
    Lost(String),
}

fn unavailable(message: String) -> TransportError {
    TransportError::new(TransportErrorKind::Unavailable, message)
}

impl Link {
    /// A link for `subscription` to the publisher `endpoint` names, the
    /// watch of its join and the queue of its acks' commands.
    fn new(
        endpoint: String,
        subscription: &Subscription,
        timing: Timing,
        out: Out,
    ) -> (
        Self,
        watch::Receiver<Joined>,
        mpsc::UnboundedReceiver<Command>,
    ) {
        let (joined, join) = watch::channel(Joined::Waiting);
        let (commands, queue) = mpsc::unbounded_channel();
        let link = Link {
            endpoint,
            hello: ToPublisher::Hello {
                version: VERSION.to_owned(),
                topic: subscription.topic.clone(),
                group: subscription.group.clone(),
                start: subscription.start,
                prefetch: subscription.prefetch,
            },
            topic: subscription.topic.as_str().into(),
            group: subscription.group.as_str().into(),
            timing,
            out,
            joined,
            commands,
            epoch: 0,
            identity: Identity::default(),
        };
        (link, join, queue)
    }

    async fn run(
        mut self,
        mut queue: mpsc::UnboundedReceiver<Command>,
        stop: CancellationToken,
        closing: CancellationToken,
    ) {
        let mut backoff = self.timing.heartbeat;
        let mut reported = false;
        loop {
            self.epoch += 1;
            // An identity of its own per connection, so the publisher never
            // mistakes a new connection for an old one.
            let identity = PeerIdentity::new();
            *lock(&self.identity) = Some(Bytes::from(Vec::from(identity.clone())));
            let mut options = SocketOptions::default();
            options.peer_identity(identity);
            let mut socket = DealerSocket::with_options(options);
            let connected = tokio::select! {
                () = stop.cancelled() => return,
                connected = connect(&mut socket, &self.endpoint, self.timing) => connected,
            };
            let connected = match connected {
                Ok(true) => Ok(()),
                // Not up yet: a fresh try at once.
                Ok(false) => continue,
                Err(e) => Err(e),
            };
            if let Err(e) = connected {
                if !reported {
                    let message = format!(
                        "cannot connect to the ZeroMQ publisher at {}: {e}",
                        self.endpoint
                    );
                    let _ = self.out.send(Err(unavailable(message)));
                    reported = true;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(self.timing.peer_timeout);
                continue;
            }
            let (tx, rx) = socket.split();
            let (tx, rx) = (Tx::Dealer(tx), Rx::Dealer(rx));
            match self.connection(tx, rx, &mut queue, &stop, &closing).await {
                End::Done => return,
                // A stopped link does not join its group again.
                End::Lost(_) if stop.is_cancelled() => return,
                End::Lost(why) => {
                    tracing::warn!(endpoint = %self.endpoint, topic = %self.topic, group = %self.group, "{why}; connecting again");
                    backoff = self.timing.heartbeat;
                    reported = false;
                }
            }
        }
    }

    async fn connection(
        &mut self,
        mut tx: Tx,
        mut rx: Rx,
        queue: &mut mpsc::UnboundedReceiver<Command>,
        stop: &CancellationToken,
        closing: &CancellationToken,
    ) -> End {
        let epoch = self.epoch;
        if let Err(e) = tx.send(self.hello.encode()).await {
            return End::Lost(format!("saying hello failed: {e}"));
        }
        let mut last_heard = Instant::now();
        let mut pending: HashMap<u64, oneshot::Sender<Result<(), TransportError>>> = HashMap::new();
        let mut outstanding: HashSet<u64> = HashSet::new();
        let mut stopping: Option<Instant> = None;
        let mut syncing: Option<Instant> = None;
        let mut ping = tokio::time::interval(self.timing.heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = |pending: &mut HashMap<u64, oneshot::Sender<Result<(), TransportError>>>,
                    why: String| {
            for (_, reply) in pending.drain() {
                let _ = reply.send(Err(unavailable(format!(
                    "{why}; the settlement may not have been recorded, so the event may come again"
                ))));
            }
            End::Lost(why)
        };
        loop {
            if stopping.is_some() && syncing.is_none() && closing.is_cancelled() {
                syncing = Some(Instant::now());
                let _ = tx.send(ToPublisher::Sync.encode()).await;
            }
            if let Some(since) = stopping
                && syncing.is_none()
                && ((outstanding.is_empty() && pending.is_empty()) || since.elapsed() > LINGER)
            {
                let _ = tx.send(ToPublisher::Bye.encode()).await;
                return End::Done;
            }
            if let Some(since) = syncing
                && since.elapsed() > SYNC_TIMEOUT
            {
                let _ = tx.send(ToPublisher::Bye.encode()).await;
                return End::Done;
            }
            // Biased: settlements queued before a stop go out before it.
            tokio::select! {
                biased;
                command = queue.recv() => {
                    // The link holds a sender itself, so the queue never ends.
                    let Some(command) = command else { return End::Done };
                    let mut acks = Vec::new();
                    let mut next = Some(command);
                    // What queued up meanwhile goes too: acks in one message.
                    while let Some(command) = next.take() {
                        match command {
                            Command::Ack { epoch: of, tag } => {
                                if of == epoch && outstanding.remove(&tag) {
                                    acks.push(tag);
                                }
                            }
                            Command::Settle { epoch: of, reply, .. } if of != epoch => {
                                let _ = reply.send(Err(unavailable(
                                    "the connection this delivery came over is gone; the publisher delivers the event again".into(),
                                )));
                            }
                            Command::Settle { tag, outcome, reply, .. } => {
                                outstanding.remove(&tag);
                                pending.insert(tag, reply);
                                if let Err(e) = tx.send(ToPublisher::Settle { tag, outcome }.encode()).await {
                                    return lost(&mut pending, format!("sending a settlement failed: {e}"));
                                }
                            }
                            Command::Release { epoch: of, tag } => {
                                if of == epoch && outstanding.remove(&tag) {
                                    let _ = tx.send(ToPublisher::Release { tag }.encode()).await;
                                }
                            }
                        }
                        if acks.len() < MAX_ACKS_PER_MESSAGE {
                            next = queue.try_recv().ok();
                        }
                    }
                    if !acks.is_empty()
                        && let Err(e) = tx.send(ToPublisher::Acks { tags: acks }.encode()).await
                    {
                        return lost(&mut pending, format!("sending acks failed: {e}"));
                    }
                }
                message = rx.recv() => {
                    let message = match message {
                        Ok(message) => message,
                        Err(e) => return lost(&mut pending, format!("receiving failed: {e}")),
                    };
                    last_heard = Instant::now();
                    match ToConsumer::decode(&message.into_vec()) {
                        Err(why) => tracing::warn!(endpoint = %self.endpoint, %why, "unreadable message from a publisher"),
                        Ok(ToConsumer::Welcome) => {
                            tracing::debug!(publisher = %self.endpoint, topic = %self.topic, group = %self.group, "joined");
                            self.joined.send_replace(Joined::Yes);
                        }
                        Ok(ToConsumer::Refused(why)) => {
                            let why = format!("the ZeroMQ publisher at {} refused: {why}", self.endpoint);
                            self.joined.send_replace(Joined::Refused(why.clone()));
                            let _ = self.out.send(Err(TransportError::new(TransportErrorKind::Rejected, why)));
                            return End::Done;
                        }
                        Ok(ToConsumer::Pong) => {}
                        Ok(ToConsumer::Synced) => {
                            let _ = tx.send(ToPublisher::Bye.encode()).await;
                            return End::Done;
                        }
                        Ok(ToConsumer::Gone) => return lost(&mut pending, "the publisher no longer knows this consumer".into()),
                        Ok(ToConsumer::Settled { tag, error }) => match pending.remove(&tag) {
                            Some(reply) => {
                                let _ = reply.send(match error {
                                    None => Ok(()),
                                    Some(e) => Err(TransportError::new(TransportErrorKind::Other, e)),
                                });
                            }
                            // An ack nobody waits for, refused.
                            None => if let Some(error) = error {
                                tracing::warn!(endpoint = %self.endpoint, topic = %self.topic, group = %self.group, %error, "an ack was not carried out; the event will come again");
                            },
                        },
                        Ok(ToConsumer::Delivery { event, tag, attempt, .. }) => {
                            self.deliver(epoch, tag, attempt, &event, &mut outstanding, &mut tx).await;
                        }
                    }
                }
                () = stop.cancelled(), if stopping.is_none() && syncing.is_none() && closing.is_cancelled() => {
                    // The transport closes: what was settled is carried
                    // out before the publisher's spool closes, the rest
                    // goes back.
                    syncing = Some(Instant::now());
                    let _ = tx.send(ToPublisher::Sync.encode()).await;
                }
                () = stop.cancelled(), if stopping.is_none() && syncing.is_none() => {
                    stopping = Some(Instant::now());
                    let _ = tx.send(ToPublisher::Stop.encode()).await;
                }
                _ = ping.tick() => {
                    let silent = last_heard.elapsed();
                    if silent > self.timing.peer_timeout {
                        return lost(&mut pending, format!("the publisher at {} was silent for {silent:?}", self.endpoint));
                    }
                    if let Err(e) = tx.send(ToPublisher::Ping.encode()).await {
                        return lost(&mut pending, format!("pinging failed: {e}"));
                    }
                }
            }
        }
    }

    async fn deliver(
        &self,
        epoch: u64,
        tag: u64,
        attempt: u32,
        json: &[u8],
        outstanding: &mut HashSet<u64>,
        tx: &mut Tx,
    ) {
        let event = match Event::from_json(json) {
            Ok(event) => event,
            Err(e) => {
                // Nothing can handle it; keep it where people can see it.
                let outcome = Outcome::DeadLetter(eventos_core::DeadLetter {
                    reason: "undecodable CloudEvent".into(),
                    error: Some(e.to_string()),
                });
                let _ = tx.send(ToPublisher::Settle { tag, outcome }.encode()).await;
                return;
            }
        };
        let info = DeliveryInfo {
            topic: self.topic.clone(),
            group: self.group.clone(),
            attempt,
        };
        let acker = OnceAcker::new(Ack {
            commands: self.commands.clone(),
            epoch,
            tag,
        });
        outstanding.insert(tag);
        // A stream already dropped drops the delivery, whose acker releases it.
        let _ = self
            .out
            .send(Ok(Delivery::new(Arc::new(event), info, Box::new(acker))));
    }
}

fn closed() -> TransportError {
    TransportError::new(
        TransportErrorKind::Closed,
        "the subscription this delivery came from is closed; the publisher delivers the event again",
    )
}

struct Ack {
    commands: mpsc::UnboundedSender<Command>,
    epoch: u64,
    tag: u64,
}

impl Settle for Ack {
    fn settle(
        self,
        _event: &Event,
        _info: &DeliveryInfo,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        if matches!(outcome, Outcome::Ack) {
            // Queued for the link, as a broker client's ack is queued for
            // its socket: one that cannot be carried out (the publisher
            // gone) means the event comes again, as at-least-once allows.
            let queued = self.commands.send(Command::Ack {
                epoch: self.epoch,
                tag: self.tag,
            });
            return Box::pin(std::future::ready(queued.map_err(|_| closed())));
        }
        let (reply, answer) = oneshot::channel();
        let sent = self.commands.send(Command::Settle {
            epoch: self.epoch,
            tag: self.tag,
            outcome,
            reply,
        });
        Box::pin(async move {
            if sent.is_err() {
                return Err(closed());
            }
            match tokio::time::timeout(SETTLE_TIMEOUT, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(unavailable(
                    "the link to the publisher ended before it answered; the event may come again"
                        .into(),
                )),
                Err(_) => Err(unavailable(format!(
                    "the publisher did not answer the settlement within {SETTLE_TIMEOUT:?}; the event may come again"
                ))),
            }
        })
    }

    fn unsettled(self) {
        let _ = self.commands.send(Command::Release {
            epoch: self.epoch,
            tag: self.tag,
        });
    }
}

/// The deliveries of every link of one subscription; dropping it stops
/// the links.
pub(crate) struct Deliveries {
    pub(crate) receiver: mpsc::UnboundedReceiver<Result<Delivery, TransportError>>,
    /// This node's own sessions and the identities of the links to it:
    /// dropped, they leave at once.
    pub(crate) local: Option<(Arc<LocalSessions>, Vec<Identity>)>,
    /// Run when dropped (the hub forgets the subscription).
    pub(crate) on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
    pub(crate) _stop: DropGuard,
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        if let Some(on_drop) = self.on_drop.take() {
            on_drop();
        }
        if let Some((sessions, identities)) = &self.local {
            for identity in identities {
                let current = lock(identity).clone();
                if let Some(identity) = current {
                    sessions.leave(&identity);
                }
            }
        }
    }
}

impl futures::Stream for Deliveries {
    type Item = Result<Delivery, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}
