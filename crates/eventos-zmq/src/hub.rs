//! The reverse topology: consumers bind, publishers connect.
//!
//! A consuming node binds a ROUTER, its hub. A publishing node connects a
//! DEALER to every hub it is told of and announces itself (`$publisher`,
//! every heartbeat; the hub answers `$hub`). For each subscription of its
//! node, the hub then runs a link to that publisher over the publisher's
//! connection, every message prefixed with the subscription's id: the
//! protocol is the one of the `wire` module, multiplexed. The publisher
//! serves those links as its ROUTER serves consumers that connect, each
//! (hub, subscription) a session of its own, so spool, credit, acks,
//! heartbeats and redelivery are the same code either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use eventos_core::{Subscription, TransportError, TransportErrorKind};
use eventos_kit::lock;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::Timing;
use crate::client::{self, Joined, Rx, Tx};

const PUBLISHER: &[u8] = b"$publisher";
const HUB: &[u8] = b"$hub";

fn message(frames: Vec<Bytes>) -> ZmqMessage {
    ZmqMessage::try_from(frames).unwrap_or_else(|_| ZmqMessage::from(Bytes::new()))
}

/// Publisher side: keeps a DEALER connected to the hub at `endpoint`,
/// announcing itself, and carries the server's messages for that hub's
/// links (`[subscription, …]`) both ways; `index` marks the ones it hands
/// in, so the server can tell the hubs apart.
pub(crate) async fn announce(
    index: u8,
    endpoint: String,
    incoming: mpsc::UnboundedSender<ZmqMessage>,
    mut from_server: mpsc::UnboundedReceiver<ZmqMessage>,
    timing: Timing,
    stop: CancellationToken,
) {
    loop {
        let mut socket = DealerSocket::new();
        tokio::select! {
            () = stop.cancelled() => return,
            connected = client::connect(&mut socket, &endpoint, timing) => match connected {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(hub = %endpoint, error = %e, "cannot connect to a consumers' hub");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(timing.peer_timeout) => continue,
                    }
                }
            },
        }
        let (mut tx, mut rx) = socket.split();
        let mut last_heard = Instant::now();
        let mut tick = tokio::time::interval(timing.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                received = rx.recv() => {
                    let Ok(received) = received else { break };
                    last_heard = Instant::now();
                    let mut frames = received.into_vec();
                    if frames.first().is_none_or(|f| f.as_ref() == HUB) {
                        continue;
                    }
                    let mut identity = vec![index];
                    identity.extend_from_slice(&frames[0]);
                    frames[0] = Bytes::from(identity);
                    if incoming.send(message(frames)).is_err() {
                        return;
                    }
                }
                outgoing = from_server.recv() => {
                    let Some(outgoing) = outgoing else { return };
                    if tx.send(outgoing).await.is_err() {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > timing.peer_timeout {
                        tracing::warn!(hub = %endpoint, "the consumers' hub was silent for {:?}; connecting again", timing.peer_timeout);
                        break;
                    }
                    if tx.send(message(vec![Bytes::from_static(PUBLISHER)])).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

/// One subscription of the hub's node.
struct Sub {
    subscription: Subscription,
    out: mpsc::UnboundedSender<Result<eventos_core::Delivery, TransportError>>,
    stop: CancellationToken,
}

/// A publisher connected to the hub, and its links by subscription id.
struct Publisher {
    last_heard: Instant,
    links: HashMap<u64, mpsc::UnboundedSender<ZmqMessage>>,
}

struct State {
    subs: HashMap<u64, Sub>,
    publishers: HashMap<Bytes, Publisher>,
    next_sub: u64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Consumer side: the bound ROUTER and the links it runs.
pub(crate) struct Hub {
    state: Arc<Mutex<State>>,
    to_router: mpsc::UnboundedSender<ZmqMessage>,
    timing: Timing,
    closing: CancellationToken,
    stop: CancellationToken,
    endpoint: String,
    publishers: watch::Sender<usize>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Hub {
    /// Binds `endpoint`; links stop when `closing` is cancelled.
    pub(crate) async fn bind(
        endpoint: &str,
        timing: Timing,
        closing: CancellationToken,
    ) -> Result<Self, TransportError> {
        let mut socket = RouterSocket::new();
        let bound = socket.bind(endpoint).await.map_err(|e| {
            TransportError::new(
                TransportErrorKind::Io,
                format!("cannot bind the consumers' hub at {endpoint}: {e}"),
            )
        })?;
        let (mut send, mut recv) = socket.split();
        let (to_router, mut from_links) = mpsc::unbounded_channel::<ZmqMessage>();
        let stop = CancellationToken::new();
        let writer = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = writer.cancelled() => return,
                    next = from_links.recv() => match next {
                        Some(next) => {
                            let _ = send.send(next).await;
                        }
                        None => return,
                    },
                }
            }
        });
        let hub = Self {
            state: Arc::new(Mutex::new(State {
                subs: HashMap::new(),
                publishers: HashMap::new(),
                next_sub: 1,
                tasks: Vec::new(),
            })),
            to_router,
            timing,
            closing,
            stop: stop.clone(),
            endpoint: bound.to_string(),
            publishers: watch::Sender::new(0),
        };
        let reader = hub.reader();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(timing.heartbeat);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    received = recv.recv() => if let Ok(received) = received {
                        reader.handle(received.into_vec());
                    },
                    _ = sweep.tick() => reader.sweep(),
                }
            }
        });
        Ok(hub)
    }

    fn reader(&self) -> Reader {
        Reader {
            state: self.state.clone(),
            to_router: self.to_router.clone(),
            timing: self.timing,
            closing: self.closing.clone(),
            publishers: self.publishers.clone(),
        }
    }

    /// The endpoint as bound.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Resolves once `n` publishers have announced themselves.
    pub(crate) async fn publishers_at_least(&self, n: usize) {
        let mut seen = self.publishers.subscribe();
        let _ = seen.wait_for(|count| *count >= n).await;
    }

    /// Registers a subscription and links it to every publisher known;
    /// later publishers get a link when they announce themselves. Returns
    /// its id and the joins of the links started now.
    pub(crate) fn subscribe(
        &self,
        subscription: Subscription,
        out: mpsc::UnboundedSender<Result<eventos_core::Delivery, TransportError>>,
        stop: CancellationToken,
    ) -> (u64, Vec<(String, watch::Receiver<Joined>)>) {
        let mut state = lock(&self.state);
        let id = state.next_sub;
        state.next_sub += 1;
        let sub = Sub {
            subscription,
            out,
            stop,
        };
        let publishers: Vec<Bytes> = state.publishers.keys().cloned().collect();
        let mut joins = Vec::new();
        for publisher in publishers {
            let join = self.reader().start_link(&mut state, &publisher, id, &sub);
            joins.push((describe(&publisher), join));
        }
        state.subs.insert(id, sub);
        (id, joins)
    }

    /// Forgets a subscription whose stream was dropped.
    pub(crate) fn unsubscribe(&self, id: u64) {
        let mut state = lock(&self.state);
        state.subs.remove(&id);
        for publisher in state.publishers.values_mut() {
            publisher.links.remove(&id);
        }
    }

    /// Stops the hub; the streams of its subscriptions end.
    pub(crate) fn shutdown(&self) {
        self.stop.cancel();
        let mut state = lock(&self.state);
        state.subs.clear();
        state.publishers.clear();
    }

    /// The link tasks started so far, for close to wait on.
    pub(crate) fn take_tasks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(&mut lock(&self.state).tasks)
    }
}

fn describe(publisher: &Bytes) -> String {
    let hex: String = publisher
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("publisher {hex}… (connected to the hub)")
}

/// What the hub's receiving task needs.
struct Reader {
    state: Arc<Mutex<State>>,
    to_router: mpsc::UnboundedSender<ZmqMessage>,
    timing: Timing,
    closing: CancellationToken,
    publishers: watch::Sender<usize>,
}

impl Reader {
    fn handle(&self, mut frames: Vec<Bytes>) {
        if frames.len() < 2 {
            return;
        }
        let publisher = frames.remove(0);
        let mut state = lock(&self.state);
        if frames[0].as_ref() == PUBLISHER {
            let _ = self
                .to_router
                .send(message(vec![publisher.clone(), Bytes::from_static(HUB)]));
            if let Some(known) = state.publishers.get_mut(&publisher) {
                known.last_heard = Instant::now();
                return;
            }
            tracing::debug!(publisher = %describe(&publisher), subscriptions = state.subs.len(), "a publisher announced itself");
            state.publishers.insert(
                publisher.clone(),
                Publisher {
                    last_heard: Instant::now(),
                    links: HashMap::new(),
                },
            );
            let subs: Vec<u64> = state.subs.keys().copied().collect();
            for id in subs {
                let sub = state.subs.remove(&id).expect("listed above");
                if !sub.stop.is_cancelled() {
                    drop(self.start_link(&mut state, &publisher, id, &sub));
                }
                state.subs.insert(id, sub);
            }
            self.publishers.send_replace(state.publishers.len());
            return;
        }
        let id = std::str::from_utf8(&frames[0])
            .ok()
            .and_then(|id| id.parse::<u64>().ok());
        let Some(known) = state.publishers.get_mut(&publisher) else {
            return;
        };
        known.last_heard = Instant::now();
        if let Some(link) = id.and_then(|id| known.links.get(&id)) {
            frames.remove(0);
            let _ = link.send(message(frames));
        }
    }

    fn start_link(
        &self,
        state: &mut State,
        publisher: &Bytes,
        id: u64,
        sub: &Sub,
    ) -> watch::Receiver<Joined> {
        let (to_link, from_hub) = mpsc::unbounded_channel();
        let tx = Tx::Hub {
            to: self.to_router.clone(),
            prefix: vec![publisher.clone(), Bytes::from(id.to_string())],
        };
        let (join, task) = client::hub_link(
            describe(publisher),
            &sub.subscription,
            self.timing,
            sub.out.clone(),
            sub.stop.clone(),
            self.closing.clone(),
            tx,
            Rx::Hub(from_hub),
        );
        if let Some(known) = state.publishers.get_mut(publisher) {
            known.links.insert(id, to_link);
        }
        state.tasks.retain(|task| !task.is_finished());
        state.tasks.push(task);
        join
    }

    /// Forgets publishers silent past the peer timeout: their links end.
    fn sweep(&self) {
        let timeout = self.timing.peer_timeout;
        let mut state = lock(&self.state);
        let before = state.publishers.len();
        state
            .publishers
            .retain(|_, publisher| publisher.last_heard.elapsed() < timeout);
        if state.publishers.len() != before {
            tracing::info!(
                gone = before - state.publishers.len(),
                "publishers silent for {timeout:?} are forgotten; what their links held goes back to their groups"
            );
            self.publishers.send_replace(state.publishers.len());
        }
    }
}
