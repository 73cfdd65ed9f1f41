//! The ZeroMQ transport for eventos: brokerless, and at-least-once between
//! live peers, which ZeroMQ alone does not give.
//!
//! A node binds a ROUTER socket and publishes into a **spool** of its own;
//! consumers connect DEALER sockets to the publishers they consume from,
//! say which group they join and how many deliveries they may hold (their
//! credit), and ack each one. Nothing stands between the two processes.
//!
//! # The decisions that shaped it
//!
//! **The spool is an eventos transport.** What a publisher must keep for
//! at-least-once — every unacked event, per group, with delayed retries,
//! dead letters, redelivery when a consumer goes, per-key order — is
//! exactly what the in-memory transport and the embedded log already do,
//! conformance-tested. So the publisher's spool *is* one of them
//! ([`Spool::Memory`] by default, [`Spool::Log`] when configured), and a
//! remote consumer is simply a member of the spool's group, its settlements
//! carried over the socket. Retry-after and dead letters are therefore
//! handled on the publisher side, and the capability flags are the
//! spool's, less what no broker means: with the memory spool nothing
//! survives the publisher's restart; with the log spool an acknowledged
//! publish is on disk (fsynced) and survives a `kill -9` of the publisher.
//!
//! **Credit-based flow control.** A consumer's `$hello` carries its
//! prefetch; the publisher's spool subscription holds no more unsettled
//! deliveries than that, so each settlement is one credit back. A slow
//! consumer slows only itself.
//!
//! **Acks are not answered.** A consumer's ack is queued for its link and
//! returns; acks that queue up leave together in one message, and the
//! publisher answers one only if it failed (the event then comes again).
//! Retries and dead letters wait for the publisher's answer. Closing a
//! node first has each link's publisher confirm that what was settled
//! before is carried out.
//!
//! **Liveness by heartbeat, not by TCP.** ZeroMQ hides connections, so a
//! consumer pings every [`ZmqOptions::heartbeat`]; a publisher that hears
//! nothing from it for [`ZmqOptions::peer_timeout`] drops its session, and
//! the spool hands what it held to another member of its group (a
//! consumer SIGKILLed with events in hand loses none of them). The other
//! way round, a consumer that hears nothing from a publisher for the peer
//! timeout connects again with a fresh socket and says hello again, so a
//! restarted publisher is found again. A delivery held past
//! [`ZmqOptions::ack_timeout`] by a live but stuck consumer goes back too,
//! to another member: the stuck one's credit still counts it.
//!
//! **CloudEvents on the wire, readable by any ZeroMQ client.** A delivery
//! is a multipart message: the topic frame, the event in the CloudEvents
//! JSON format (structured mode), then the delivery tag and attempt in
//! decimal. Control messages begin with a `$` verb (the `wire` module's
//! table). A pyzmq DEALER speaks the protocol in a dozen lines.
//!
//! **Topology, either way round.** By default publishers bind, consumers
//! connect: a node binds [`ZmqOptions::bind`] and subscriptions connect to
//! every endpoint of [`ZmqOptions::peers`] (its own address by default),
//! one link per publisher, so several publishers of a topic fan in and
//! several consumers of a group compete. With
//! [`Topology::ConsumersBind`] a node binds a hub for its consumers and
//! its publisher connects to the hubs in `peers` and announces itself;
//! each hub then runs its subscriptions' links over that connection, the
//! same protocol with the subscription's id in front (the `hub` module),
//! so short-lived or firewalled publishers need only know where the
//! consumers are. Per-key order and inspection hold per publisher: each
//! spool orders and counts its own events.
//!
//! **The pure-Rust `zeromq` library, with what it lacks done here.** It
//! speaks ZMTP 3 to libzmq peers (the interop tests use pyzmq) and needs
//! nothing installed, but its ROUTER and DEALER report no disconnections
//! and a DEALER does not reconnect; the heartbeats above, and a fresh
//! socket per reconnection, make up for both.
//!
//! [`ZmqEngine`] is its registry entry (`zmq://`, the `[zmq]` settings).
//!
//! No feature flags of its own.

mod client;
mod engine;
mod hub;
mod server;
mod wire;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventos_core::{
    Capabilities, DeliveryStream, Event, GroupCounts, Publisher, Subscriber, Subscription,
    Transport, TransportError, TransportErrorKind,
};
use eventos_kit::{Lifecycle, lock};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

pub use engine::{ZmqEngine, ZmqSection};

/// How long `close` waits for its links to hand over what they settled.
const CLOSE_LINKS: Duration = Duration::from_secs(4);

/// Where a publisher keeps what its consumers have not acked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Spool {
    /// In memory: fast, and gone when the process goes.
    #[default]
    Memory,
    /// The embedded log in this directory: a publish returns once it is on
    /// disk, and a restarted publisher hands out what was not acked.
    Log(PathBuf),
}

/// Which side binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    /// Publishers bind; subscriptions connect to the `peers`, the
    /// publishers.
    #[default]
    PublishersBind,
    /// Consumers bind (a hub per node); the node's publisher connects to
    /// the `peers`, the consumers' hubs, and announces itself.
    ConsumersBind,
}

/// The node's addresses and timings. `..ZmqOptions::default()` fills in
/// the rest.
#[derive(Debug, Clone)]
pub struct ZmqOptions {
    /// Which side binds.
    pub topology: Topology,
    /// The ZeroMQ endpoint this node binds (`tcp://127.0.0.1:5560`; port 0
    /// picks a free one): the ROUTER it publishes from, or with
    /// [`Topology::ConsumersBind`] the hub its subscriptions consume
    /// through. `None`: a node that only consumes (only publishes).
    pub bind: Option<String>,
    /// The publishers subscriptions connect to, or with
    /// [`Topology::ConsumersBind`] the hubs its publisher connects to.
    /// Empty: this node's own bound endpoint.
    pub peers: Vec<String>,
    /// Where published events wait for their consumers.
    pub spool: Spool,
    /// How often a consumer pings its publishers.
    pub heartbeat: Duration,
    /// Silence after which a peer counts as gone.
    pub peer_timeout: Duration,
    /// How long a delivery may stay unsettled before it goes back to its
    /// group.
    pub ack_timeout: Duration,
    /// How long `subscribe` waits for each publisher's welcome before it
    /// returns anyway (the link keeps trying in the background).
    pub join_timeout: Duration,
}

impl Default for ZmqOptions {
    fn default() -> Self {
        Self {
            topology: Topology::PublishersBind,
            bind: Some("tcp://127.0.0.1:0".to_owned()),
            peers: Vec::new(),
            spool: Spool::Memory,
            heartbeat: Duration::from_millis(500),
            peer_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(300),
            join_timeout: Duration::from_secs(5),
        }
    }
}

/// The timings both sides of a link use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) heartbeat: Duration,
    pub(crate) peer_timeout: Duration,
    pub(crate) ack_timeout: Duration,
}

/// A ZeroMQ node: a publisher with its spool, a consumer of its peers.
/// Cloning shares it.
#[derive(Clone)]
pub struct ZmqTransport {
    shared: Arc<Shared>,
}

struct Shared {
    spool: Arc<dyn Transport>,
    server: Mutex<Option<server::Server>>,
    hub: Option<Arc<hub::Hub>>,
    endpoint: Option<String>,
    peers: Vec<String>,
    timing: Timing,
    join_timeout: Duration,
    /// Peers whose welcome did not come within the join timeout: later
    /// subscriptions do not wait for them again.
    unreachable: Mutex<HashSet<String>>,
    lifecycle: Lifecycle,
    links: CancellationToken,
    link_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    topology: Topology,
}

impl Shared {
    fn topology_reverse(&self) -> bool {
        self.topology == Topology::ConsumersBind
    }
}

impl std::fmt::Debug for ZmqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqTransport")
            .field("endpoint", &self.shared.endpoint)
            .field("peers", &self.shared.peers)
            .field("spool", &self.shared.spool.name())
            .finish_non_exhaustive()
    }
}

fn invalid(message: impl Into<String>) -> TransportError {
    TransportError::new(TransportErrorKind::Rejected, message)
}

fn check_endpoint(what: &str, endpoint: &str) -> Result<(), TransportError> {
    if endpoint.starts_with("tcp://") || endpoint.starts_with("ipc://") {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {endpoint:?} is not a ZeroMQ endpoint: write tcp://HOST:PORT or ipc:///path"
        )))
    }
}

/// The peers named, or else this node's own endpoint.
fn peers_or_own(
    named: &[String],
    own: Option<&String>,
    what: &str,
) -> Result<Vec<String>, TransportError> {
    let peers: Vec<String> = if named.is_empty() {
        own.into_iter().cloned().collect()
    } else {
        named.to_vec()
    };
    if peers.is_empty() {
        return Err(invalid(format!(
            "a ZeroMQ node that binds nothing must name the {what} (peers)"
        )));
    }
    Ok(peers)
}

impl ZmqTransport {
    /// Opens the spool, binds, and is ready to publish and subscribe.
    ///
    /// # Errors
    ///
    /// An endpoint that is not `tcp://` or `ipc://`, one that cannot be
    /// bound, a node that neither binds nor names peers, a log spool that
    /// cannot be opened.
    pub async fn open(options: ZmqOptions) -> Result<Self, TransportError> {
        let spool: Arc<dyn Transport> = match &options.spool {
            Spool::Memory => Arc::new(eventos_memory::MemoryTransport::new()),
            Spool::Log(dir) => Arc::new(eventos_log::LogTransport::open(dir).map_err(|e| {
                TransportError::new(
                    TransportErrorKind::Io,
                    format!(
                        "cannot open the ZeroMQ spool at {}: {}",
                        dir.display(),
                        eventos_core::ErrorChain(&e)
                    ),
                )
            })?),
        };
        Self::with_spool(options, spool).await
    }

    /// As [`ZmqTransport::open`], over a spool of the caller's.
    ///
    /// # Errors
    ///
    /// As [`ZmqTransport::open`].
    pub async fn with_spool(
        options: ZmqOptions,
        spool: Arc<dyn Transport>,
    ) -> Result<Self, TransportError> {
        for peer in &options.peers {
            check_endpoint("peer", peer)?;
        }
        let timing = Timing {
            heartbeat: options.heartbeat.max(Duration::from_millis(10)),
            peer_timeout: options.peer_timeout.max(options.heartbeat * 2),
            ack_timeout: options.ack_timeout.max(Duration::from_millis(100)),
        };
        for endpoint in options.bind.iter() {
            check_endpoint("bind address", endpoint)?;
        }
        let links = CancellationToken::new();
        let (server, hub, endpoint, peers) = match options.topology {
            Topology::PublishersBind => {
                let server = match &options.bind {
                    Some(bind) => Some(server::Server::bind(spool.clone(), bind, timing).await?),
                    None => None,
                };
                let endpoint = server.as_ref().map(|s| s.endpoint().to_owned());
                let peers = peers_or_own(
                    &options.peers,
                    endpoint.as_ref(),
                    "publishers it consumes from",
                )?;
                (server, None, endpoint, peers)
            }
            Topology::ConsumersBind => {
                let hub = match &options.bind {
                    Some(bind) => {
                        Some(Arc::new(hub::Hub::bind(bind, timing, links.clone()).await?))
                    }
                    None => None,
                };
                let endpoint = hub.as_ref().map(|h| h.endpoint().to_owned());
                let peers = peers_or_own(
                    &options.peers,
                    endpoint.as_ref(),
                    "consumers' hubs it publishes to",
                )?;
                let server = server::Server::connect(spool.clone(), &peers, timing);
                // Its own publisher announced at its own hub before the first
                // subscription, so that one reaches it.
                if let (Some(hub), Some(own)) = (&hub, &endpoint)
                    && peers.contains(own)
                {
                    let _ = tokio::time::timeout(options.join_timeout, hub.publishers_at_least(1))
                        .await;
                }
                (Some(server), hub, endpoint, peers)
            }
        };
        Ok(Self {
            shared: Arc::new(Shared {
                spool,
                server: Mutex::new(server),
                hub,
                endpoint,
                peers,
                timing,
                join_timeout: options.join_timeout,
                unreachable: Mutex::new(HashSet::new()),
                lifecycle: Lifecycle::new(),
                links,
                link_tasks: Mutex::new(Vec::new()),
                topology: options.topology,
            }),
        })
    }

    /// The endpoint this node publishes from, its port resolved.
    pub fn endpoint(&self) -> Option<&str> {
        self.shared.endpoint.as_deref()
    }

    /// The publishers its subscriptions connect to.
    pub fn peers(&self) -> &[String] {
        &self.shared.peers
    }
}

impl Publisher for ZmqTransport {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            self.shared.lifecycle.check_open()?;
            if lock(&self.shared.server).is_none() {
                return Err(TransportError::new(
                    TransportErrorKind::Unsupported,
                    "this ZeroMQ node binds no endpoint, so no consumer could fetch what it publishes: set [zmq] bind",
                ));
            }
            self.shared.spool.publish(topic, events).await
        })
    }
}

impl Subscriber for ZmqTransport {
    fn subscribe(
        &self,
        subscription: Subscription,
    ) -> BoxFuture<'_, Result<DeliveryStream, TransportError>> {
        Box::pin(async move {
            self.shared.lifecycle.check_subscribe(&subscription)?;
            let stop = self.shared.links.child_token();
            let (out, receiver) = tokio::sync::mpsc::unbounded_channel();
            let local = lock(&self.shared.server)
                .as_ref()
                .map(server::Server::local);
            if let Some(hub) = &self.shared.hub {
                let (id, joins) = hub.subscribe(subscription.clone(), out, stop.clone());
                // This node's own publisher knows the subscription by the
                // index of this hub among its peers and the id.
                let own: Vec<client::Identity> = self
                    .shared
                    .peers
                    .iter()
                    .position(|peer| self.shared.endpoint.as_ref() == Some(peer))
                    .and_then(|index| u8::try_from(index).ok())
                    .map(|index| {
                        let mut identity = vec![index];
                        identity.extend_from_slice(id.to_string().as_bytes());
                        Arc::new(Mutex::new(Some(bytes::Bytes::from(identity))))
                    })
                    .into_iter()
                    .collect();
                let hub = Arc::downgrade(hub);
                let stream = client::Deliveries {
                    receiver,
                    local: local.map(|sessions| (sessions, own)),
                    on_drop: Some(Box::new(move || {
                        if let Some(hub) = hub.upgrade() {
                            hub.unsubscribe(id);
                        }
                    })),
                    _stop: stop.drop_guard(),
                };
                self.wait_joins(joins, &subscription).await?;
                return Ok(Box::pin(stream) as DeliveryStream);
            }
            if self.shared.topology_reverse() {
                return Err(TransportError::new(
                    TransportErrorKind::Unsupported,
                    "with consumers binding, a ZeroMQ node consumes through the hub it binds: set [zmq] bind",
                ));
            }
            let mut own = Vec::new();
            let joins: Vec<_> = self
                .shared
                .peers
                .iter()
                .map(|peer| {
                    let (join, identity, task) = client::link(
                        peer.clone(),
                        &subscription,
                        self.shared.timing,
                        out.clone(),
                        stop.clone(),
                        self.shared.links.clone(),
                    );
                    let mut tasks = lock(&self.shared.link_tasks);
                    tasks.retain(|task| !task.is_finished());
                    tasks.push(task);
                    if self.shared.endpoint.as_ref() == Some(peer) {
                        own.push(identity);
                    }
                    (peer.clone(), join)
                })
                .collect();
            drop(out);
            let stream = client::Deliveries {
                receiver,
                local: local.map(|sessions| (sessions, own)),
                on_drop: None,
                _stop: stop.drop_guard(),
            };
            self.wait_joins(joins, &subscription).await?;
            Ok(Box::pin(stream) as DeliveryStream)
        })
    }
}

impl ZmqTransport {
    /// Waits for the welcome of every link, at once.
    async fn wait_joins(
        &self,
        joins: Vec<(String, tokio::sync::watch::Receiver<client::Joined>)>,
        subscription: &Subscription,
    ) -> Result<(), TransportError> {
        {
            // Every publisher is waited for at once, so one that is down
            // costs one join timeout, not one per publisher.
            let waits = joins.into_iter().map(|(peer, mut join)| {
                let known_down = lock(&self.shared.unreachable).contains(&peer);
                let wait = if known_down {
                    Duration::ZERO
                } else {
                    self.shared.join_timeout
                };
                async move {
                    let joined = tokio::time::timeout(
                        wait,
                        join.wait_for(|state| *state != client::Joined::Waiting),
                    )
                    .await
                    .map(|state| state.map(|state| state.clone()));
                    (peer, known_down, joined)
                }
            });
            for (peer, known_down, joined) in futures::future::join_all(waits).await {
                match joined {
                    Ok(Ok(client::Joined::Refused(why))) => {
                        return Err(TransportError::new(TransportErrorKind::Rejected, why));
                    }
                    Ok(Ok(_)) => {
                        lock(&self.shared.unreachable).remove(&peer);
                    }
                    // The link ended (closing): the stream ends too.
                    Ok(Err(_)) => {}
                    Err(_) => {
                        if !known_down {
                            tracing::warn!(
                                %peer,
                                topic = %subscription.topic,
                                group = %subscription.group,
                                "no welcome from this publisher within {:?}; consuming from it once it answers",
                                self.shared.join_timeout
                            );
                            lock(&self.shared.unreachable).insert(peer);
                        }
                    }
                }
            }
            Ok(())
        }
    }
}

impl Transport for ZmqTransport {
    fn name(&self) -> &'static str {
        "zmq"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            survives_broker_restart: false,
            ..self.shared.spool.capabilities()
        }
    }

    fn close(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            if !self.shared.lifecycle.close() {
                return Ok(());
            }
            // Links first: each has its publisher carry out what it settled
            // (a bounded wait), so an ack before close is never lost here.
            self.shared.links.cancel();
            let mut tasks = std::mem::take(&mut *lock(&self.shared.link_tasks));
            if let Some(hub) = &self.shared.hub {
                tasks.extend(hub.take_tasks());
            }
            let _ = tokio::time::timeout(CLOSE_LINKS, futures::future::join_all(tasks)).await;
            drop(lock(&self.shared.server).take());
            if let Some(hub) = &self.shared.hub {
                hub.shutdown();
            }
            self.shared.spool.close().await
        })
    }

    fn group_counts<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<GroupCounts>, TransportError>> {
        self.shared.spool.group_counts(topic, group)
    }

    fn dead_letters<'a>(
        &'a self,
        topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, TransportError>> {
        self.shared.spool.dead_letters(topic, limit)
    }

    fn dead_letter<'a>(
        &'a self,
        topic: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Event>, TransportError>> {
        self.shared.spool.dead_letter(topic, id)
    }
}
