//! The router: subscribes each route, runs its handler stack on every
//! delivery, and settles every delivery with the stack's decision.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventos_core::{
    Delivery, DeliveryStream, ErrorChain, Outcome, StartFrom, Subscription, Transport,
    TransportError, TransportErrorKind,
};
use futures::StreamExt as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt as _};

use crate::middleware::{
    Breaker, CatchPanicLayer, CircuitBreakerLayer, DeadLetterHook, DeadLetterLayer, DecideLayer,
    Decided, MetricsLayer, RetryLayer, RetryPolicy, TimeoutLayer, TraceLayer,
};
use crate::{Backoff, HandlerError, Message};

/// A type-erased handler stack.
pub type BoxHandler = BoxCloneService<Message, (), HandlerError>;

/// A route's whole stack, type-erased: it answers each delivery with the
/// decision the router settles it with.
type BoxStack = BoxCloneService<Message, Decided, HandlerError>;

/// One (topic, group) and the handler that consumes it, with its
/// middleware settings. See the [`middleware`](crate::middleware) module
/// for the order of the layers.
pub struct Route {
    topic: String,
    group: String,
    handler: BoxHandler,
    retry: Option<RetryLayer>,
    timeout: Option<Duration>,
    concurrency: usize,
    dead_letter: Option<DeadLetterLayer>,
    breaker: Option<CircuitBreakerLayer>,
    start: StartFrom,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .field("circuit_breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// A route with the defaults: [`Backoff::default`] retries, no timeout,
    /// 16 deliveries at once, no dead-letter hook, no circuit breaker.
    pub fn new<S>(topic: impl Into<String>, group: impl Into<String>, handler: S) -> Self
    where
        S: Service<Message, Response = (), Error = HandlerError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        Self {
            topic: topic.into(),
            group: group.into(),
            handler: BoxCloneService::new(handler),
            retry: Some(RetryLayer::new(Backoff::default())),
            timeout: None,
            concurrency: 16,
            dead_letter: None,
            breaker: None,
            start: StartFrom::Earliest,
        }
    }

    /// The topic consumed.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The group consuming it.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Retries transient failures per `policy` (e.g. a [`Backoff`]).
    #[must_use]
    pub fn retry(mut self, policy: impl RetryPolicy) -> Self {
        self.retry = Some(RetryLayer::new(policy));
        self
    }

    /// Never retries: every failure is dead-lettered at once.
    #[must_use]
    pub fn no_retry(mut self) -> Self {
        self.retry = None;
        self
    }

    /// Fails an attempt (transiently) that runs longer than `limit`.
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// How many deliveries of this route are handled at once (at least 1).
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Calls `hook` for every delivery that is dead-lettered.
    #[must_use]
    pub fn on_dead_letter(mut self, hook: impl DeadLetterHook) -> Self {
        self.dead_letter = Some(DeadLetterLayer::new(hook));
        self
    }

    /// Pauses the route while its handler's dependency is unavailable
    /// ([`HandlerError::unavailable`]): after `policy.failures_to_open`
    /// such failures in a row the route takes no deliveries, probes with
    /// one now and then, and resumes when a probe gets through. Queued
    /// events keep their attempts meanwhile. See
    /// [`CircuitBreakerLayer`].
    #[must_use]
    pub fn circuit_breaker(mut self, policy: Breaker) -> Self {
        self.breaker = Some(CircuitBreakerLayer::new(policy));
        self
    }

    /// Where the group starts if it does not exist yet.
    #[must_use]
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Wraps the handler in `layer`, inside the standard stack (closest to
    /// the handler; the last added is outermost).
    #[must_use]
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<BoxHandler>,
        L::Service: Service<Message, Response = (), Error = HandlerError> + Clone + Send + 'static,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        self.handler = BoxCloneService::new(layer.layer(self.handler));
        self
    }

    /// The complete middleware stack around the handler.
    fn into_service(self) -> BoxStack {
        let stack = ServiceBuilder::new()
            .layer(MetricsLayer)
            .layer(TraceLayer)
            .option_layer(self.dead_letter)
            .layer(DecideLayer)
            .option_layer(self.retry)
            .option_layer(self.breaker)
            .option_layer(self.timeout.map(TimeoutLayer::new))
            .layer(CatchPanicLayer)
            .service(self.handler);
        BoxCloneService::new(stack)
    }
}

/// Why the router stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Subscribing a route failed; nothing was started.
    #[error(
        "cannot subscribe group `{group}` to topic `{topic}`: {}",
        ErrorChain(source)
    )]
    Subscribe {
        /// The route's topic.
        topic: String,
        /// The route's group.
        group: String,
        /// The transport's error, said in the message with its causes.
        source: TransportError,
    },
    /// Two routes share a (topic, group); they would compete for the same
    /// events and each see only some.
    #[error(
        "two routes consume topic `{topic}` as group `{group}`: give each handler its own group"
    )]
    DuplicateRoute {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// A route's stream ended although no shutdown was asked for: the
    /// transport was closed under the router.
    #[error("the transport ended the stream of group `{group}` on topic `{topic}`")]
    StreamEnded {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// A consumer or the supervisor panicked or was cancelled: a bug, and
    /// the routes it ran stopped with it.
    #[error("a router task failed: {0}")]
    TaskFailed(String),
}

/// Counters of what the router has settled, for tests and dashboards.
#[derive(Debug, Default)]
pub struct RouterStats {
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    settle_failed: AtomicU64,
    aborted: AtomicU64,
}

/// A snapshot of [`RouterStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Deliveries acked.
    pub acked: u64,
    /// Deliveries scheduled for retry.
    pub retried: u64,
    /// Deliveries dead-lettered.
    pub dead_lettered: u64,
    /// Settlements the transport refused (the event is redelivered).
    pub settle_failed: u64,
    /// Deliveries still running at the shutdown deadline, left unsettled
    /// for the transport to redeliver.
    pub aborted: u64,
}

impl RouterStats {
    /// The current counts.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            acked: self.acked.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            settle_failed: self.settle_failed.load(Ordering::Relaxed),
            aborted: self.aborted.load(Ordering::Relaxed),
        }
    }

    fn counter(&self, outcome: &Outcome) -> &AtomicU64 {
        match outcome {
            Outcome::Ack => &self.acked,
            Outcome::Retry { .. } => &self.retried,
            Outcome::DeadLetter(_) => &self.dead_lettered,
        }
    }
}

/// Routes deliveries from a transport to handlers.
///
/// ```no_run
/// # async fn example() -> Result<(), eventos::RouterError> {
/// use std::sync::Arc;
/// use eventos::{handler_fn, HandlerError, Message, Route, Router};
///
/// let transport = Arc::new(eventos_memory::MemoryTransport::new());
/// Router::new(transport)
///     .route(Route::new("payments", "metrics", handler_fn(|msg: Message| async move {
///         println!("{}", msg.event().id());
///         Ok::<(), HandlerError>(())
///     })))
///     .run(eventos::shutdown_signal())
///     .await
/// # }
/// ```
pub struct Router {
    transport: Arc<dyn Transport>,
    routes: Vec<Route>,
    shutdown_timeout: Duration,
    stats: Arc<RouterStats>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("transport", &self.transport.name())
            .field("routes", &self.routes)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router over `transport` with no routes and a 30 s shutdown
    /// deadline.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self {
            transport,
            routes: Vec::new(),
            shutdown_timeout: Duration::from_secs(30),
            stats: Arc::default(),
        }
    }

    /// Adds a route.
    #[must_use]
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// How long in-flight deliveries may run after shutdown is asked for.
    /// Those still running then are abandoned unsettled, and the transport
    /// redelivers them.
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// The router's counters (shared; read them while it runs).
    pub fn stats(&self) -> Arc<RouterStats> {
        self.stats.clone()
    }

    /// Subscribes every route, then handles deliveries until `shutdown`
    /// completes: it then stops taking deliveries, lets in-flight ones
    /// finish and settle within the shutdown timeout, and returns.
    ///
    /// # Errors
    ///
    /// As [`Router::start`]; and [`RouterError::StreamEnded`] if the
    /// transport ends a stream (the other routes are drained first).
    pub async fn run<F>(self, shutdown: F) -> Result<(), RouterError>
    where
        F: Future<Output = ()> + Send,
    {
        let running = self.start().await?;
        tokio::select! {
            () = shutdown => tracing::info!("shutdown requested; draining in-flight deliveries"),
            () = running.stop.cancelled() => {}
        }
        running.shutdown().await
    }

    /// Subscribes every route and starts handling in the background. When
    /// this returns, every route's group exists on the transport, so events
    /// published from then on reach it.
    ///
    /// # Errors
    ///
    /// [`RouterError::DuplicateRoute`] or [`RouterError::Subscribe`];
    /// nothing is left running then.
    pub async fn start(self) -> Result<RunningRouter, RouterError> {
        let mut seen = HashSet::new();
        for route in &self.routes {
            if !seen.insert((route.topic.clone(), route.group.clone())) {
                return Err(RouterError::DuplicateRoute {
                    topic: route.topic.clone(),
                    group: route.group.clone(),
                });
            }
        }
        let mut subscribed = Vec::with_capacity(self.routes.len());
        for route in self.routes {
            let subscription = Subscription::new(&route.topic, &route.group)
                .start(route.start)
                .prefetch(route.concurrency);
            let stream = self
                .transport
                .subscribe(subscription)
                .await
                .map_err(|source| RouterError::Subscribe {
                    topic: route.topic.clone(),
                    group: route.group.clone(),
                    source,
                })?;
            tracing::info!(topic = %route.topic, group = %route.group, transport = self.transport.name(), "route subscribed");
            subscribed.push((route, stream));
        }

        let stop = CancellationToken::new();
        let mut consumers = JoinSet::new();
        for (route, stream) in subscribed {
            let consumer = Consumer {
                topic: route.topic.clone(),
                group: route.group.clone(),
                concurrency: route.concurrency,
                stats: self.stats.clone(),
                stop: stop.clone(),
                shutdown_timeout: self.shutdown_timeout,
            };
            consumers.spawn(consumer.run(route.into_service(), stream));
        }
        let supervisor = tokio::spawn(supervise(consumers, stop.clone()));
        Ok(RunningRouter {
            stop,
            supervisor,
            stats: self.stats,
        })
    }
}

/// A router running in the background (see [`Router::start`]).
#[derive(Debug)]
pub struct RunningRouter {
    stop: CancellationToken,
    supervisor: tokio::task::JoinHandle<Result<(), RouterError>>,
    stats: Arc<RouterStats>,
}

impl RunningRouter {
    /// The router's counters.
    pub fn stats(&self) -> &Arc<RouterStats> {
        &self.stats
    }

    /// Stops taking deliveries, drains in-flight ones within the shutdown
    /// timeout, and returns how the routes ended.
    ///
    /// # Errors
    ///
    /// [`RouterError::StreamEnded`] if a route's stream had ended by itself.
    pub async fn shutdown(self) -> Result<(), RouterError> {
        self.stop.cancel();
        match self.supervisor.await {
            Ok(result) => result,
            Err(e) => Err(RouterError::TaskFailed(format!("the supervisor: {e}"))),
        }
    }
}

/// Waits for the consumers; the first to end on its own (an error) stops
/// the others.
async fn supervise(
    mut consumers: JoinSet<Result<(), RouterError>>,
    stop: CancellationToken,
) -> Result<(), RouterError> {
    let mut result = Ok(());
    while let Some(ended) = consumers.join_next().await {
        let ended = flatten(ended);
        if !stop.is_cancelled() {
            stop.cancel();
        }
        if result.is_ok() {
            result = ended;
        }
    }
    result
}

fn flatten(
    joined: Result<Result<(), RouterError>, tokio::task::JoinError>,
) -> Result<(), RouterError> {
    match joined {
        Ok(result) => result,
        // The consumer loop is not meant to panic (handlers run under
        // catch-panic in their own tasks); if it did, the others still
        // drain, and the router reports it.
        Err(e) => Err(RouterError::TaskFailed(format!("a route consumer: {e}"))),
    }
}

struct Consumer {
    topic: String,
    group: String,
    concurrency: usize,
    stats: Arc<RouterStats>,
    stop: CancellationToken,
    shutdown_timeout: Duration,
}

impl Consumer {
    async fn run(self, service: BoxStack, mut stream: DeliveryStream) -> Result<(), RouterError> {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = JoinSet::new();
        let mut ended = None;
        let mut error_pause = Duration::from_millis(50);
        loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                permit = permits.clone().acquire_owned() => permit,
            };
            let Ok(permit) = permit else { break };
            // Readiness before a delivery is taken: a stack that is not
            // ready (an open circuit) pauses the route while the events
            // wait in the transport, attempts untouched.
            let mut ready = service.clone();
            let readiness = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                readiness = ready.ready() => readiness.map(drop),
            };
            if let Err(e) = readiness {
                tracing::warn!(topic = %self.topic, group = %self.group, error = %e, "handler not ready; trying again");
                tokio::select! {
                    () = self.stop.cancelled() => break,
                    () = tokio::time::sleep(error_pause) => {}
                }
                error_pause = (error_pause * 2).min(Duration::from_secs(5));
                continue;
            }
            let next = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    error_pause = Duration::from_millis(50);
                    let stats = self.stats.clone();
                    tasks.spawn(async move {
                        handle(ready, delivery, stats).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) if e.kind() == TransportErrorKind::Closed => {
                    ended = Some(self.stream_ended());
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(topic = %self.topic, group = %self.group, error = %ErrorChain(&e), "transport error while consuming; the stream continues");
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        () = tokio::time::sleep(error_pause) => {}
                    }
                    error_pause = (error_pause * 2).min(Duration::from_secs(5));
                }
                None => {
                    if !self.stop.is_cancelled() {
                        ended = Some(self.stream_ended());
                    }
                    break;
                }
            }
        }
        // Stop taking deliveries before draining, so the transport can hand
        // what this consumer would have taken to other members.
        drop(stream);
        self.drain(&mut tasks).await;
        ended.map_or(Ok(()), Err)
    }

    fn stream_ended(&self) -> RouterError {
        RouterError::StreamEnded {
            topic: self.topic.clone(),
            group: self.group.clone(),
        }
    }

    async fn drain(&self, tasks: &mut JoinSet<()>) {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        loop {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(_) => {
                    let left = tasks.len();
                    tracing::warn!(
                        topic = %self.topic,
                        group = %self.group,
                        in_flight = left,
                        "shutdown deadline reached; abandoning in-flight deliveries unsettled so the transport redelivers them"
                    );
                    self.stats
                        .aborted
                        .fetch_add(u64::try_from(left).unwrap_or(u64::MAX), Ordering::Relaxed);
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    return;
                }
            }
        }
    }
}

/// Runs `service`, already ready, on one delivery and settles it with the
/// stack's decision; the decision counts once the settlement succeeded.
async fn handle(mut service: BoxStack, delivery: Delivery, stats: Arc<RouterStats>) {
    let (event, info, settlement) = delivery.into_parts();
    let message = Message::new(event, info);
    // The stack only fails to become ready, which the router checked.
    let decided = match service.call(message).await {
        Ok(decided) => decided,
        Err(e) => Decided::from_result(Err(e)),
    };
    let outcome = decided.into_outcome();
    let counter = stats.counter(&outcome);
    let label = outcome.label();
    let info = settlement.info().clone();
    match settlement.settle(outcome).await {
        Ok(()) => {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            stats.settle_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                topic = %info.topic,
                group = %info.group,
                outcome = label,
                error = %ErrorChain(&e),
                "could not settle a delivery; the transport will redeliver it"
            );
        }
    }
}
