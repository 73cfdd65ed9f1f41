//! The publisher side: a ROUTER socket that hands the spool's events to
//! the consumers connected to it and carries out their settlements.
//!
//! Each `$hello` opens a session: a subscription to the spool as a member
//! of the consumer's group, with the consumer's prefetch, so the spool
//! decides what goes to whom (fan-out across groups, competition inside
//! one, retries, dead letters, per-key order) exactly as it does for a
//! local subscriber. The session keeps the settlement half of every
//! delivery it sent until the consumer settles it; when the consumer goes
//! (`$bye`, silence past the peer timeout, an ack timeout) what it held is
//! dropped, and the spool hands it to another member of the group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use eventos_core::{
    DeliveryStream, Settlement, Subscription, Transport, TransportError, TransportErrorKind,
};
use eventos_kit::lock;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::Timing;
use crate::wire::{ToConsumer, ToPublisher, VERSION};

/// How long one send to one consumer may take before the consumer counts
/// as stuck: a consumer that reads nothing for that long is not alive.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

type Out = mpsc::UnboundedSender<(Bytes, ZmqMessage)>;

/// A session's spool subscription, shared with [`LocalSessions`].
type SharedStream = Arc<Mutex<Option<DeliveryStream>>>;

/// The spool subscriptions of this node's sessions, by consumer socket
/// identity, so a consumer in this same process leaves its group the
/// moment it drops its stream — before the next publish, as the contract
/// asks — rather than one message later. A consumer elsewhere leaves with
/// its `$stop`.
#[derive(Default)]
pub(crate) struct LocalSessions(Mutex<HashMap<Bytes, SharedStream>>);

impl LocalSessions {
    /// Ends the spool subscription of the session `identity` opened.
    pub(crate) fn leave(&self, identity: &Bytes) {
        let stream = lock(&self.0).remove(identity);
        if let Some(stream) = stream {
            drop(lock(&stream).take());
        }
    }
}

/// A bound ROUTER socket and its tasks; dropping it stops them.
pub(crate) struct Server {
    endpoint: String,
    stop: CancellationToken,
    local: Arc<LocalSessions>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Server {
    /// Binds `endpoint` (a port of 0 picks one) and serves `spool`.
    pub(crate) async fn bind(
        spool: Arc<dyn Transport>,
        endpoint: &str,
        timing: Timing,
    ) -> Result<Self, TransportError> {
        let mut socket = RouterSocket::new();
        let bound = socket.bind(endpoint).await.map_err(|e| {
            TransportError::new(
                TransportErrorKind::Io,
                format!("cannot bind ZeroMQ endpoint {endpoint}: {e}"),
            )
        })?;
        let endpoint = bound.to_string();
        let (send, mut recv) = socket.split();
        let stop = CancellationToken::new();
        let (out, outgoing) = mpsc::unbounded_channel();
        let (incoming, messages) = mpsc::unbounded_channel();
        tokio::spawn(write(send, outgoing, stop.clone()));
        let pump = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = pump.cancelled() => return,
                    message = recv.recv() => match message {
                        Ok(message) => {
                            if incoming.send(message).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "ZeroMQ receive failed");
                            tokio::time::sleep(timing.heartbeat).await;
                        }
                    },
                }
            }
        });
        Ok(Self::serve(spool, endpoint, timing, out, messages, stop))
    }

    /// Connects to the hubs of consumers that bind, one DEALER each, and
    /// serves `spool` to the consumers behind them, exactly as a bound
    /// ROUTER serves its own: a message from hub `i` for subscription `s`
    /// is a session's message from identity `[i] ++ s`.
    pub(crate) fn connect(spool: Arc<dyn Transport>, hubs: &[String], timing: Timing) -> Self {
        let stop = CancellationToken::new();
        let (out, mut outgoing) = mpsc::unbounded_channel::<(Bytes, ZmqMessage)>();
        let (incoming, messages) = mpsc::unbounded_channel();
        let mut to_hubs = Vec::new();
        for (index, hub) in hubs.iter().enumerate() {
            let (to_hub, from_server) = mpsc::unbounded_channel();
            to_hubs.push(to_hub);
            let index = u8::try_from(index).unwrap_or(u8::MAX);
            tokio::spawn(crate::hub::announce(
                index,
                hub.clone(),
                incoming.clone(),
                from_server,
                timing,
                stop.clone(),
            ));
        }
        drop(incoming);
        let writer = stop.clone();
        tokio::spawn(async move {
            loop {
                let (identity, mut message) = tokio::select! {
                    () = writer.cancelled() => return,
                    next = outgoing.recv() => match next {
                        Some(next) => next,
                        None => return,
                    },
                };
                let Some((&index, subscription)) = identity.split_first() else {
                    continue;
                };
                message.push_front(Bytes::copy_from_slice(subscription));
                if let Some(to_hub) = to_hubs.get(usize::from(index)) {
                    let _ = to_hub.send(message);
                }
            }
        });
        Self::serve(spool, hubs.join(", "), timing, out, messages, stop)
    }

    fn serve(
        spool: Arc<dyn Transport>,
        endpoint: String,
        timing: Timing,
        out: Out,
        messages: mpsc::UnboundedReceiver<ZmqMessage>,
        stop: CancellationToken,
    ) -> Self {
        let local = Arc::new(LocalSessions::default());
        tokio::spawn(
            Reader {
                spool,
                out,
                timing,
                sessions: HashMap::new(),
                local: local.clone(),
            }
            .run(messages, stop.clone()),
        );
        Self {
            endpoint,
            stop,
            local,
        }
    }

    /// The sessions of consumers, for the ones in this process to leave.
    pub(crate) fn local(&self) -> Arc<LocalSessions> {
        self.local.clone()
    }

    /// The endpoint as bound, its port resolved: `tcp://127.0.0.1:40123`
    /// (or the hubs it connects to).
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

async fn write(
    mut send: zeromq::RouterSendHalf,
    mut outgoing: mpsc::UnboundedReceiver<(Bytes, ZmqMessage)>,
    stop: CancellationToken,
) {
    loop {
        let (identity, mut message) = tokio::select! {
            () = stop.cancelled() => return,
            next = outgoing.recv() => match next {
                Some(next) => next,
                None => return,
            },
        };
        message.push_front(identity);
        // A consumer gone or stuck loses this message; its session ends on
        // the peer timeout and what it held goes back to the spool.
        match tokio::time::timeout(SEND_TIMEOUT, send.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "a consumer left before a message reached it");
            }
            Err(_) => {
                tracing::warn!("a consumer read nothing for {SEND_TIMEOUT:?}; message dropped");
            }
        }
    }
}

struct SessionHandle {
    commands: mpsc::UnboundedSender<Command>,
    last_heard: Instant,
    topic: String,
    group: String,
}

enum Command {
    Settle {
        tag: u64,
        outcome: eventos_core::Outcome,
    },
    Release {
        tag: u64,
    },
    Stop,
    Sync,
}

struct Reader {
    spool: Arc<dyn Transport>,
    out: Out,
    timing: Timing,
    sessions: HashMap<Bytes, SessionHandle>,
    local: Arc<LocalSessions>,
}

impl Reader {
    /// Reads `[identity, verb, …]` messages, as a ROUTER receives them.
    async fn run(
        mut self,
        mut messages: mpsc::UnboundedReceiver<ZmqMessage>,
        stop: CancellationToken,
    ) {
        let mut sweep = tokio::time::interval(self.timing.heartbeat);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                message = messages.recv() => match message {
                    Some(message) => self.handle(message),
                    None => break,
                },
                _ = sweep.tick() => self.sweep(),
            }
        }
        // Dropping the handles ends every session; what they held goes back.
        self.sessions.clear();
    }

    fn reply(&self, identity: &Bytes, message: &ToConsumer) {
        let _ = self.out.send((identity.clone(), message.encode()));
    }

    fn handle(&mut self, message: ZmqMessage) {
        let mut frames = message.into_vec();
        if frames.len() < 2 {
            return;
        }
        let identity = frames.remove(0);
        let message = match ToPublisher::decode(&frames) {
            Ok(message) => message,
            Err(why) => {
                tracing::debug!(%why, "unreadable message from a consumer");
                self.reply(
                    &identity,
                    &ToConsumer::Refused(format!("unreadable message: {why}")),
                );
                return;
            }
        };
        match message {
            ToPublisher::Hello {
                version,
                topic,
                group,
                start,
                prefetch,
            } => {
                if version != VERSION {
                    let why = format!(
                        "protocol version {version:?} is not spoken here; this publisher speaks {VERSION:?}"
                    );
                    self.reply(&identity, &ToConsumer::Refused(why));
                    return;
                }
                let subscription = Subscription::new(topic.clone(), group.clone())
                    .start(start)
                    .prefetch(prefetch);
                let (commands, queue) = mpsc::unbounded_channel();
                tokio::spawn(session(
                    self.spool.clone(),
                    subscription,
                    identity.clone(),
                    self.out.clone(),
                    queue,
                    self.timing.ack_timeout,
                    self.local.clone(),
                ));
                // A second hello from the same socket replaces its session.
                self.sessions.insert(
                    identity,
                    SessionHandle {
                        commands,
                        last_heard: Instant::now(),
                        topic,
                        group,
                    },
                );
            }
            ToPublisher::Bye => {
                self.sessions.remove(&identity);
            }
            ToPublisher::Acks { tags } => {
                let Some(session) = self.sessions.get_mut(&identity) else {
                    for tag in tags {
                        self.reply(&identity, &no_session(tag));
                    }
                    return;
                };
                session.last_heard = Instant::now();
                for tag in tags {
                    let outcome = eventos_core::Outcome::Ack;
                    if session
                        .commands
                        .send(Command::Settle { tag, outcome })
                        .is_err()
                    {
                        self.sessions.remove(&identity);
                        return;
                    }
                }
            }
            other => {
                let Some(session) = self.sessions.get_mut(&identity) else {
                    let reply = match other {
                        ToPublisher::Settle { tag, .. } => no_session(tag),
                        _ => ToConsumer::Gone,
                    };
                    self.reply(&identity, &reply);
                    return;
                };
                session.last_heard = Instant::now();
                let command = match other {
                    ToPublisher::Ping => {
                        self.reply(&identity, &ToConsumer::Pong);
                        return;
                    }
                    ToPublisher::Settle { tag, outcome } => Command::Settle { tag, outcome },
                    ToPublisher::Release { tag } => Command::Release { tag },
                    ToPublisher::Stop => Command::Stop,
                    ToPublisher::Sync => Command::Sync,
                    ToPublisher::Hello { .. } | ToPublisher::Bye | ToPublisher::Acks { .. } => {
                        return;
                    }
                };
                if session.commands.send(command).is_err() {
                    // The session ended by itself (its spool subscription failed).
                    self.sessions.remove(&identity);
                }
            }
        }
    }

    fn sweep(&mut self) {
        let timeout = self.timing.peer_timeout;
        self.sessions.retain(|_, session| {
            let alive = session.last_heard.elapsed() < timeout && !session.commands.is_closed();
            if !alive && !session.commands.is_closed() {
                tracing::info!(
                    topic = %session.topic,
                    group = %session.group,
                    "a consumer was silent for {timeout:?}; what it held goes back to its group"
                );
            }
            alive
        });
    }
}

fn no_session(tag: u64) -> ToConsumer {
    ToConsumer::Settled {
        tag,
        error: Some("this publisher holds no session for the consumer (it restarted, or the consumer was silent too long); the event will be delivered again".into()),
    }
}

/// One consumer's membership of one group: spool deliveries out, its
/// settlements in.
async fn session(
    spool: Arc<dyn Transport>,
    subscription: Subscription,
    identity: Bytes,
    out: Out,
    mut commands: mpsc::UnboundedReceiver<Command>,
    ack_timeout: Duration,
    local: Arc<LocalSessions>,
) {
    let send = |message: ToConsumer| {
        let _ = out.send((identity.clone(), message.encode()));
    };
    let topic = Bytes::from(subscription.topic.clone());
    let credit = subscription.prefetch;
    let group = subscription.group.clone();
    let stream: SharedStream = match spool.subscribe(subscription).await {
        Ok(stream) => Arc::new(Mutex::new(Some(stream))),
        Err(e) => {
            send(ToConsumer::Refused(e.to_string()));
            return;
        }
    };
    lock(&local.0).insert(identity.clone(), stream.clone());
    tracing::debug!(topic = %String::from_utf8_lossy(&topic), %group, credit, "a consumer joined");
    send(ToConsumer::Welcome);
    let mut taking = true;
    let mut settling = tokio::task::JoinSet::new();
    let mut held: HashMap<u64, (Settlement, Instant)> = HashMap::new();
    // Taken back from the consumer at its ack timeout; it may still settle
    // them (and is told they were not its to settle any more).
    let mut expired: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut next_tag: u64 = 1;
    let mut expiry = tokio::time::interval(ack_timeout.min(Duration::from_secs(1)));
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => break,
                Some(Command::Stop) => {
                    taking = false;
                    drop(lock(&stream).take());
                }
                // What the consumer sent before is carried out once the
                // settlements under way are.
                Some(Command::Sync) => {
                    while settling.join_next().await.is_some() {}
                    send(ToConsumer::Synced);
                }
                Some(Command::Release { tag }) => {
                    drop(held.remove(&tag));
                    expired.remove(&tag);
                }
                Some(Command::Settle { tag, outcome }) => match held.remove(&tag) {
                    Some((settlement, _)) => {
                        let out = out.clone();
                        let identity = identity.clone();
                        // An ack is answered only when it failed: the
                        // consumer does not wait for it (as with AMQP's
                        // basic.ack), so a stream of acks costs no round trips.
                        let answer = !matches!(outcome, eventos_core::Outcome::Ack);
                        let settled = async move {
                            let error = settlement.settle(outcome).await.err().map(|e| e.to_string());
                            if answer || error.is_some() {
                                let _ = out.send((identity, ToConsumer::Settled { tag, error }.encode()));
                            }
                        };
                        // A spool that settles at once (memory) is not
                        // worth a task; one that writes (the log) is.
                        let mut settled = Box::pin(settled);
                        if futures::FutureExt::now_or_never(&mut settled).is_none() {
                            settling.spawn(settled);
                        }
                    }
                    None => {
                        expired.remove(&tag);
                        send(ToConsumer::Settled {
                            tag,
                            error: Some(format!("delivery {tag} is not held here (its ack timeout of {ack_timeout:?} passed); the event will be delivered again")),
                        });
                    }
                },
            },
            // Polled under its lock, which `LocalSessions::leave` takes to
            // drop it; gone, it is never ready again.
            delivery = std::future::poll_fn(|cx| match lock(&stream).as_mut() {
                Some(stream) => stream.poll_next_unpin(cx),
                None => Poll::Pending,
            // The consumer's credit counts what it still holds after its
            // ack timeout: the spool hands those events to other members,
            // not back to a consumer that is stuck.
            }), if taking && held.len() + expired.len() < credit => match delivery {
                Some(Ok(delivery)) => {
                    let (event, info, settlement) = delivery.into_parts();
                    let tag = next_tag;
                    next_tag += 1;
                    held.insert(tag, (settlement, Instant::now()));
                    send(ToConsumer::Delivery {
                        topic: topic.clone(),
                        event: Bytes::from(event.to_json()),
                        tag,
                        attempt: info.attempt,
                    });
                }
                Some(Err(e)) => tracing::warn!(error = %e, "the spool's subscription reported an error"),
                // The spool closed: the node is shutting down.
                None => break,
            },
            Some(_) = settling.join_next(), if !settling.is_empty() => {}
            _ = expiry.tick() => {
                let before = expired.len();
                held.retain(|tag, (_, since)| {
                    let late = since.elapsed() >= ack_timeout;
                    if late {
                        expired.insert(*tag);
                    }
                    !late
                });
                if expired.len() > before {
                    tracing::warn!(
                        expired = expired.len() - before,
                        "deliveries unsettled past the ack timeout of {ack_timeout:?} go back to their group"
                    );
                }
            }
        }
    }
    while settling.join_next().await.is_some() {}
    let mut sessions = lock(&local.0);
    if sessions
        .get(&identity)
        .is_some_and(|s| Arc::ptr_eq(s, &stream))
    {
        sessions.remove(&identity);
    }
}
