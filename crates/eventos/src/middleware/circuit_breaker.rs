//! Circuit breaker: when a dependency every delivery needs is down, the
//! route stops taking deliveries and probes, instead of failing each queued
//! event in turn until its attempts run out.
//!
//! A handler says a failure is the dependency's, not the message's, with
//! [`HandlerError::unavailable`] (connection refused, no route, "service
//! unavailable"). After [`Breaker::failures_to_open`] of them in a row the
//! circuit **opens**: the service's `poll_ready` stays pending, and since
//! the router asks for readiness *before* it takes a delivery from the
//! transport, the route takes nothing. Queued events wait in the
//! transport with their attempts untouched, however long the outage lasts.
//! After a pause the circuit **probes** (half-open): with a check of its
//! own when one is given ([`Breaker::probe`], e.g. connecting to the mail
//! server), otherwise by letting one delivery through. If the probe gets
//! through — the check passes, or the delivery succeeds or fails for any
//! reason but unavailability — the circuit **closes** and the route
//! resumes at full concurrency; if the dependency is still down the circuit
//! opens again for twice the pause, up to [`Breaker::max_pause`].
//!
//! With a check, no delivery is tried while the circuit is open, so an
//! outage of any length spends no event's attempts. Without one, each
//! failed probe spends one attempt of the event it took: prefer a check
//! when the dependency has a cheap one.
//!
//! The state is shared by every clone of the service (one circuit per
//! route), and `eventos_circuit_open{topic,group}` is 1 while it is open.
//!
//! On a push transport the deliveries it prefetched stay with the paused
//! consumer, unsettled; those with a delivery timeout of their own (a
//! RabbitMQ `consumer_timeout`) come back when it fires.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::{HandlerError, Message};

/// A probe of the dependency: `true` when it answers.
type Probe = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// When a circuit opens and how it probes.
///
/// ```
/// use std::time::Duration;
/// use eventos::middleware::Breaker;
///
/// let breaker = Breaker::default()
///     .failures_to_open(3)
///     .pauses(Duration::from_millis(500), Duration::from_secs(60))
///     .probe(|| async { /* connect to the dependency */ true });
/// assert_eq!(breaker.max_pause(), Duration::from_secs(60));
/// ```
#[derive(Clone)]
pub struct Breaker {
    failures_to_open: u32,
    first_pause: Duration,
    max_pause: Duration,
    probe: Option<Probe>,
}

impl Default for Breaker {
    /// Opens after 5 unavailable failures in a row; probes after 1 s, then
    /// 2, 4, … up to every 30 s, by letting one delivery through.
    fn default() -> Self {
        Self {
            failures_to_open: 5,
            first_pause: Duration::from_secs(1),
            max_pause: Duration::from_secs(30),
            probe: None,
        }
    }
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("failures_to_open", &self.failures_to_open)
            .field("first_pause", &self.first_pause)
            .field("max_pause", &self.max_pause)
            .field("probe", &self.probe.as_ref().map(|_| "check"))
            .finish()
    }
}

impl Breaker {
    /// Opens the circuit after `n` unavailable failures in a row (at
    /// least 1).
    #[must_use]
    pub fn failures_to_open(mut self, n: u32) -> Self {
        self.failures_to_open = n.max(1);
        self
    }

    /// Probes `first` after the circuit opens, then after twice as long
    /// each time a probe fails, up to `max` (at least `first`).
    #[must_use]
    pub fn pauses(mut self, first: Duration, max: Duration) -> Self {
        self.first_pause = first;
        self.max_pause = max.max(first);
        self
    }

    /// Probes with `check` instead of a delivery: while the circuit is
    /// open no delivery is tried, and it closes when `check` answers
    /// `true`.
    #[must_use]
    pub fn probe<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = bool> + Send + 'static,
    {
        self.probe = Some(Arc::new(move || Box::pin(check())));
        self
    }

    /// Unavailable failures in a row that open the circuit.
    pub fn threshold(&self) -> u32 {
        self.failures_to_open
    }

    /// The pause before the first probe.
    pub fn first_pause(&self) -> Duration {
        self.first_pause
    }

    /// The longest pause between probes.
    pub fn max_pause(&self) -> Duration {
        self.max_pause
    }

    fn next_pause(&self, pause: Duration) -> Duration {
        (pause * 2).min(self.max_pause)
    }
}

/// Where the circuit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Deliveries flow; `failures` unavailable ones in a row so far.
    Closed { failures: u32 },
    /// Nothing flows until `until`; then one probe.
    Open { until: Instant, pause: Duration },
    /// One probe is running; nothing else flows.
    Probing { pause: Duration },
}

struct Shared {
    policy: Breaker,
    state: Mutex<State>,
    /// The route's topic and group, known from its first delivery.
    route: OnceLock<(Arc<str>, Arc<str>)>,
    /// Bumped on every change of state, to wake paused callers.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value, valid whatever a panicking holder did.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, state: &mut State, next: State) {
        let was_open = !matches!(*state, State::Closed { .. });
        *state = next;
        let is_open = !matches!(next, State::Closed { .. });
        if was_open != is_open {
            let (topic, group) = self.route.get().cloned().unwrap_or_default();
            metrics::gauge!(
                "eventos_circuit_open",
                "topic" => topic.to_string(),
                "group" => group.to_string()
            )
            .set(if is_open { 1.0 } else { 0.0 });
            if is_open {
                tracing::warn!(%topic, %group, "a dependency is unavailable; circuit opened, the route takes no deliveries until a probe gets through");
            } else {
                tracing::info!(%topic, %group, "the dependency answers again; circuit closed, the route resumes");
            }
        }
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Counts a finished call.
    fn record(&self, probe: bool, unavailable: bool) {
        let mut state = self.lock();
        let next = match (*state, unavailable) {
            (State::Closed { failures: 0 }, false) => return,
            (_, false) => State::Closed { failures: 0 },
            (State::Closed { failures }, true) => {
                let failures = failures + 1;
                if failures < self.policy.failures_to_open {
                    State::Closed { failures }
                } else {
                    let pause = self.policy.first_pause;
                    State::Open {
                        until: Instant::now() + pause,
                        pause,
                    }
                }
            }
            (State::Probing { pause }, true) if probe => {
                let pause = self.policy.next_pause(pause);
                tracing::debug!(next_probe_in = ?pause, "probe failed; the dependency is still unavailable");
                State::Open {
                    until: Instant::now() + pause,
                    pause,
                }
            }
            // A call that started before the circuit opened: the circuit
            // already knows.
            (State::Open { .. } | State::Probing { .. }, true) => return,
        };
        self.set(&mut state, next);
    }

    /// How a probe by check ended.
    fn checked(&self, answered: bool) {
        let mut state = self.lock();
        let State::Probing { pause } = *state else {
            return;
        };
        let next = if answered {
            State::Closed { failures: 0 }
        } else {
            let pause = self.policy.next_pause(pause);
            State::Open {
                until: Instant::now() + pause,
                pause,
            }
        };
        self.set(&mut state, next);
    }

    /// A probe that never finished (its future was dropped): let the next
    /// caller probe at once.
    fn abandon_probe(&self) {
        let mut state = self.lock();
        if let State::Probing { pause } = *state {
            let next = State::Open {
                until: Instant::now(),
                pause,
            };
            self.set(&mut state, next);
        }
    }
}

/// Pauses a route while a dependency is unavailable; see the
/// [module](self).
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    policy: Breaker,
}

impl CircuitBreakerLayer {
    /// A layer with `policy`. Each service it makes (one per route) has a
    /// circuit of its own, shared by that service's clones.
    pub fn new(policy: Breaker) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            shared: Arc::new(Shared {
                policy: self.policy.clone(),
                state: Mutex::new(State::Closed { failures: 0 }),
                route: OnceLock::new(),
                changed: watch::Sender::new(0),
            }),
            wait: None,
            probe: false,
            checking: false,
        }
    }
}

/// The service of [`CircuitBreakerLayer`].
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Arc<Shared>,
    /// Pending until the circuit may have changed.
    wait: Option<BoxFuture<'static, ()>>,
    /// Whether this handle's next call is the probe.
    probe: bool,
    /// Whether this handle's wait is the probe's check.
    checking: bool,
}

impl<S: Clone> Clone for CircuitBreaker<S> {
    /// A clone shares the circuit but not a readiness: it has no wait in
    /// progress and does not hold the probe.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            wait: None,
            probe: false,
            checking: false,
        }
    }
}

impl<S> Drop for CircuitBreaker<S> {
    fn drop(&mut self) {
        if self.probe || self.checking {
            self.shared.abandon_probe();
        }
    }
}

impl<S> std::fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &*self.shared.lock())
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Message> for CircuitBreaker<S>
where
    S: Service<Message, Response = (), Error = HandlerError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<(), HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        while !self.probe {
            if let Some(wait) = self.wait.as_mut() {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
                self.checking = false;
            }
            let mut state = self.shared.lock();
            // Subscribed under the lock: a change after this read wakes us.
            let mut changed = self.shared.changed.subscribe();
            match *state {
                State::Closed { .. } => break,
                State::Open { until, pause } if Instant::now() >= until => {
                    self.shared.set(&mut state, State::Probing { pause });
                    drop(state);
                    match self.shared.policy.probe.clone() {
                        None => self.probe = true,
                        Some(check) => {
                            let shared = self.shared.clone();
                            self.checking = true;
                            self.wait = Some(Box::pin(async move {
                                let answered = check().await;
                                shared.checked(answered);
                            }));
                        }
                    }
                }
                State::Open { until, .. } => {
                    self.wait = Some(Box::pin(async move {
                        tokio::select! {
                            () = tokio::time::sleep_until(until) => {}
                            _ = changed.changed() => {}
                        }
                    }));
                }
                State::Probing { .. } => {
                    self.wait = Some(Box::pin(async move {
                        let _ = changed.changed().await;
                    }));
                }
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let info = msg.info();
        self.shared
            .route
            .get_or_init(|| (info.topic.clone(), info.group.clone()));
        let guard = Finish {
            shared: self.shared.clone(),
            probe: std::mem::take(&mut self.probe),
            done: false,
        };
        let fut = self.inner.call(msg);
        Box::pin(async move {
            let mut guard = guard;
            let result = fut.await;
            guard.done = true;
            let unavailable = matches!(&result, Err(e) if e.is_unavailable());
            guard.shared.record(guard.probe, unavailable);
            result
        })
    }
}

/// Records how a call ended, or that it never did.
struct Finish {
    shared: Arc<Shared>,
    probe: bool,
    done: bool,
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.shared.abandon_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use eventos_core::{DeliveryInfo, Event};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use tower::ServiceExt as _;

    fn message() -> Message {
        let event = Event::builder("/test", "test.job.v1").build().unwrap();
        let info = DeliveryInfo {
            topic: "jobs".into(),
            group: "worker".into(),
            attempt: 1,
        };
        Message::new(Arc::new(event), info)
    }

    /// A handler whose dependency is down while `down` is set.
    fn dependency(
        down: Arc<AtomicBool>,
        calls: Arc<AtomicU32>,
    ) -> impl Service<
        Message,
        Response = (),
        Error = HandlerError,
        Future = BoxFuture<'static, Result<(), HandlerError>>,
    > + Clone {
        tower::service_fn(move |_msg: Message| {
            calls.fetch_add(1, Ordering::SeqCst);
            let down = down.load(Ordering::SeqCst);
            Box::pin(async move {
                if down {
                    Err(HandlerError::unavailable("connection refused"))
                } else {
                    Ok(())
                }
            }) as BoxFuture<'static, _>
        })
    }

    fn policy() -> Breaker {
        Breaker::default()
            .failures_to_open(3)
            .pauses(Duration::from_secs(1), Duration::from_secs(4))
    }

    /// Whether `svc` becomes ready within `within` of (paused) time.
    async fn ready_within<S>(svc: &mut S, within: Duration) -> bool
    where
        S: Service<Message, Response = (), Error = HandlerError>,
    {
        tokio::time::timeout(within, svc.ready()).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_closes_on_a_good_probe() {
        let down = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicU32::new(0));
        let mut svc =
            CircuitBreakerLayer::new(policy()).layer(dependency(down.clone(), calls.clone()));
        for _ in 0..3 {
            let err = svc
                .ready()
                .await
                .unwrap()
                .call(message())
                .await
                .unwrap_err();
            assert!(err.is_unavailable());
        }
        assert!(
            !ready_within(&mut svc, Duration::from_millis(999)).await,
            "open: not ready before the pause ends"
        );
        assert!(
            ready_within(&mut svc, Duration::from_millis(2)).await,
            "ready for one probe after the pause"
        );
        // While the probe holds the circuit, no other handle is ready.
        let mut other = svc.clone();
        assert!(!ready_within(&mut other, Duration::from_secs(60)).await);
        down.store(false, Ordering::SeqCst);
        svc.call(message()).await.unwrap();
        assert!(
            ready_within(&mut other, Duration::from_millis(1)).await,
            "closed: everyone is ready"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "three failures and one probe"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_double_the_pause_up_to_the_cap() {
        let down = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicU32::new(0));
        let mut svc = CircuitBreakerLayer::new(policy()).layer(dependency(down, calls.clone()));
        for _ in 0..3 {
            let _ = svc.ready().await.unwrap().call(message()).await;
        }
        let mut probes = Vec::new();
        let mut last = Instant::now();
        for _ in 0..5 {
            let _ = svc.ready().await.unwrap().call(message()).await;
            probes.push(Instant::now() - last);
            last = Instant::now();
        }
        let secs: Vec<u64> = probes.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 4, 4]);
        assert_eq!(calls.load(Ordering::SeqCst), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn other_failures_and_successes_reset_the_count() {
        let calls = Arc::new(AtomicU32::new(0));
        let flips = Arc::new(AtomicU32::new(0));
        let inner = tower::service_fn(move |_msg: Message| {
            calls.fetch_add(1, Ordering::SeqCst);
            // unavailable, unavailable, transient, unavailable, unavailable, ...
            let n = flips.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n % 3 == 2 {
                    Err(HandlerError::transient("this one message is refused"))
                } else {
                    Err(HandlerError::unavailable("connection refused"))
                }
            }) as BoxFuture<'static, Result<(), HandlerError>>
        });
        let mut svc = CircuitBreakerLayer::new(policy()).layer(inner);
        for _ in 0..30 {
            assert!(
                ready_within(&mut svc, Duration::ZERO).await,
                "never opens: never three in a row"
            );
            let _ = svc.call(message()).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_hands_the_probe_to_the_next_caller() {
        let down = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicU32::new(0));
        let mut svc = CircuitBreakerLayer::new(policy()).layer(dependency(down, calls));
        for _ in 0..3 {
            let _ = svc.ready().await.unwrap().call(message()).await;
        }
        let mut prober = svc.clone();
        assert!(ready_within(&mut prober, Duration::from_secs(2)).await);
        assert!(
            !ready_within(&mut svc, Duration::from_secs(10)).await,
            "the probe is taken"
        );
        drop(prober);
        assert!(
            ready_within(&mut svc, Duration::from_millis(1)).await,
            "the probe is free again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_probes_while_open_and_no_delivery_is_tried() {
        let down = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicU32::new(0));
        let checks = Arc::new(Mutex::new(Vec::new()));
        let (seen, up) = (checks.clone(), down.clone());
        let start = Instant::now();
        let breaker = policy().probe(move || {
            seen.lock()
                .unwrap()
                .push((Instant::now() - start).as_secs());
            let answered = !up.load(Ordering::SeqCst);
            async move { answered }
        });
        let mut svc =
            CircuitBreakerLayer::new(breaker).layer(dependency(down.clone(), calls.clone()));
        for _ in 0..3 {
            let _ = svc.ready().await.unwrap().call(message()).await;
        }
        // Open for 20 s of outage: checks at 1, 3, 7, 11, 15, 19 s; no call.
        assert!(!ready_within(&mut svc, Duration::from_secs(20)).await);
        assert_eq!(*checks.lock().unwrap(), [1, 3, 7, 11, 15, 19]);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "no delivery tried while open"
        );
        down.store(false, Ordering::SeqCst);
        assert!(
            ready_within(&mut svc, Duration::from_secs(5)).await,
            "the next check closes it"
        );
        svc.call(message()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
