//! The router and its middleware, end to end over the memory transport.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventos::middleware::{Breaker, DeadLettered};
use eventos::{
    Backoff, Bus, Event, HandlerError, Message, Publisher, Route, Router, RouterError, StartFrom,
    Subscriber, Subscription, Transport, TypedEvent, dead_letter_topic, ext, handler_fn, typed,
};
use eventos_core::{Delivery, DeliveryStream};
use eventos_memory::MemoryTransport;
use futures::StreamExt as _;

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
struct Job {
    n: u32,
}
impl TypedEvent for Job {
    const TYPE: &'static str = "test.job.v1";
}

fn setup() -> (Arc<MemoryTransport>, Bus) {
    let transport = Arc::new(MemoryTransport::new());
    let bus = Bus::new(transport.clone(), "/test");
    (transport, bus)
}

/// Quick retries so paused-clock tests stay short in virtual time too.
fn fast_backoff(max_attempts: u32) -> Backoff {
    Backoff::new(
        Duration::from_millis(10),
        Duration::from_millis(100),
        max_attempts,
    )
}

async fn dlq(transport: &MemoryTransport, topic: &str) -> DeliveryStream {
    transport
        .subscribe(
            Subscription::new(dead_letter_topic(topic), "inspector").start(StartFrom::Earliest),
        )
        .await
        .unwrap()
}

async fn next(stream: &mut DeliveryStream) -> Delivery {
    tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("a delivery within a minute")
        .expect("stream open")
        .expect("no transport error")
}

#[tokio::test(start_paused = true)]
async fn failing_twice_then_succeeding_is_acked_on_attempt_three() {
    let (transport, bus) = setup();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let router = Router::new(transport.clone()).route(
        Route::new(
            "jobs",
            "worker",
            handler_fn(move |msg: Message| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(msg.attempt());
                    if msg.attempt() < 3 {
                        Err(HandlerError::transient("flaky dependency"))
                    } else {
                        Ok(())
                    }
                }
            }),
        )
        .retry(fast_backoff(5)),
    );
    let running = router.start().await.unwrap();
    bus.emit("jobs", &Job { n: 1 }).await.unwrap();
    while running.stats().snapshot().acked == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = running.stats().snapshot();
    running.shutdown().await.unwrap();
    assert_eq!(*attempts.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!((stats.acked, stats.retried, stats.dead_lettered), (1, 2, 0));
    let left = transport.stats("jobs", "worker").unwrap();
    assert_eq!(left, Default::default(), "nothing left queued or in flight");
}

#[tokio::test(start_paused = true)]
async fn always_failing_lands_in_dlq_after_max_attempts_with_its_error() {
    let (transport, bus) = setup();
    let mut dead = dlq(&transport, "jobs").await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let running = Router::new(transport.clone())
        .route(
            Route::new(
                "jobs",
                "worker",
                handler_fn(move |_msg: Message| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async { Err(HandlerError::transient("smtp 451: try again later")) }
                }),
            )
            .retry(fast_backoff(4)),
        )
        .start()
        .await
        .unwrap();
    bus.emit("jobs", &Job { n: 9 }).await.unwrap();
    let dl = next(&mut dead).await;
    running.shutdown().await.unwrap();
    let ev = dl.event();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(ev.decode::<Job>().unwrap(), Job { n: 9 });
    assert_eq!(
        ev.extension_str(ext::DEAD_LETTER_REASON),
        Some("retries exhausted after 4 attempts")
    );
    assert_eq!(
        ev.extension(ext::DEAD_LETTER_ATTEMPTS)
            .and_then(|v| v.as_i64()),
        Some(4)
    );
    assert_eq!(
        ev.extension_str(ext::DEAD_LETTER_ERROR),
        Some("smtp 451: try again later")
    );
    assert_eq!(ev.extension_str(ext::DEAD_LETTER_TOPIC), Some("jobs"));
    assert_eq!(ev.extension_str(ext::DEAD_LETTER_GROUP), Some("worker"));
}

#[tokio::test(start_paused = true)]
async fn permanent_error_dead_letters_on_attempt_one() {
    let (transport, bus) = setup();
    let mut dead = dlq(&transport, "jobs").await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let running = Router::new(transport.clone())
        .route(Route::new(
            "jobs",
            "worker",
            handler_fn(move |_msg: Message| {
                counter.fetch_add(1, Ordering::SeqCst);
                async {
                    Err(HandlerError::permanent(
                        "card number rejected by validation",
                    ))
                }
            }),
        ))
        .start()
        .await
        .unwrap();
    bus.emit("jobs", &Job { n: 1 }).await.unwrap();
    let dl = next(&mut dead).await;
    running.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        dl.event().extension_str(ext::DEAD_LETTER_REASON),
        Some("permanent error on attempt 1")
    );
}

#[tokio::test(start_paused = true)]
async fn undecodable_payload_is_dead_lettered_at_once() {
    let (transport, _bus) = setup();
    let mut dead = dlq(&transport, "jobs").await;
    let running = Router::new(transport.clone())
        .route(Route::new(
            "jobs",
            "worker",
            typed(|_job: Job, _msg: Message| async { Ok::<(), HandlerError>(()) }),
        ))
        .start()
        .await
        .unwrap();
    let wrong = Event::builder("/test", Job::TYPE)
        .json(&serde_json::json!({"n": "not a number"}))
        .unwrap()
        .build()
        .unwrap();
    transport.publish("jobs", vec![wrong]).await.unwrap();
    let dl = next(&mut dead).await;
    running.shutdown().await.unwrap();
    assert_eq!(dl.attempt(), 1);
    assert!(
        dl.event()
            .extension_str(ext::DEAD_LETTER_ERROR)
            .unwrap()
            .contains("invalid type"),
        "{:?}",
        dl.event().extension_str(ext::DEAD_LETTER_ERROR)
    );
}

#[tokio::test(start_paused = true)]
async fn panicking_handler_does_not_kill_the_worker() {
    let (transport, bus) = setup();
    let handled = Arc::new(AtomicU32::new(0));
    let counter = handled.clone();
    let running = Router::new(transport.clone())
        .route(
            Route::new(
                "jobs",
                "worker",
                typed(move |job: Job, _msg: Message| {
                    let counter = counter.clone();
                    async move {
                        assert!(job.n.is_multiple_of(2), "odd jobs make this handler panic");
                        counter.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                }),
            )
            .retry(fast_backoff(2))
            .concurrency(1),
        )
        .start()
        .await
        .unwrap();
    let mut dead = dlq(&transport, "jobs").await;
    for n in 0..6 {
        bus.emit("jobs", &Job { n }).await.unwrap();
    }
    let mut panicked = Vec::new();
    for _ in 0..3 {
        let dl = next(&mut dead).await;
        assert!(
            dl.event()
                .extension_str(ext::DEAD_LETTER_ERROR)
                .unwrap()
                .starts_with("handler panicked: odd jobs"),
        );
        panicked.push(dl.event().decode::<Job>().unwrap().n);
        dl.ack().await.unwrap();
    }
    while running.stats().snapshot().acked < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.shutdown().await.unwrap();
    panicked.sort_unstable();
    assert_eq!(panicked, vec![1, 3, 5]);
    assert_eq!(
        handled.load(Ordering::SeqCst),
        3,
        "even jobs all handled after the panics"
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_fails_the_attempt_and_the_retry_succeeds() {
    let (transport, bus) = setup();
    let running = Router::new(transport.clone())
        .route(
            Route::new(
                "jobs",
                "worker",
                handler_fn(|msg: Message| async move {
                    if msg.attempt() == 1 {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    Ok::<(), HandlerError>(())
                }),
            )
            .timeout(Duration::from_secs(1))
            .retry(fast_backoff(3)),
        )
        .start()
        .await
        .unwrap();
    bus.emit("jobs", &Job { n: 1 }).await.unwrap();
    while running.stats().snapshot().acked == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = running.stats().snapshot();
    running.shutdown().await.unwrap();
    assert_eq!((stats.retried, stats.acked), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn concurrency_limit_is_respected() {
    let (transport, bus) = setup();
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    let running = Router::new(transport.clone())
        .route(
            Route::new(
                "jobs",
                "worker",
                handler_fn(move |_msg: Message| {
                    let (n, p) = (n.clone(), p.clone());
                    async move {
                        let current = n.fetch_add(1, Ordering::SeqCst) + 1;
                        p.fetch_max(current, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        n.fetch_sub(1, Ordering::SeqCst);
                        Ok::<(), HandlerError>(())
                    }
                }),
            )
            .concurrency(3),
        )
        .start()
        .await
        .unwrap();
    let events = (0..30)
        .map(|n| bus.event(&Job { n }).unwrap())
        .collect::<Vec<_>>();
    bus.publish("jobs", events).await.unwrap();
    while running.stats().snapshot().acked < 30 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.shutdown().await.unwrap();
    assert_eq!(peak.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_in_flight_deliveries() {
    let (transport, bus) = setup();
    let finished = Arc::new(Mutex::new(Vec::new()));
    let started = Arc::new(AtomicU32::new(0));
    let (f, s) = (finished.clone(), started.clone());
    let running = Router::new(transport.clone())
        .route(
            Route::new(
                "jobs",
                "worker",
                typed(move |job: Job, _msg: Message| {
                    let (f, s) = (f.clone(), s.clone());
                    async move {
                        s.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        f.lock().unwrap().push(job.n);
                        Ok(())
                    }
                }),
            )
            .concurrency(4),
        )
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .unwrap();
    let events = (0..20).map(|n| bus.event(&Job { n }).unwrap()).collect();
    bus.publish("jobs", events).await.unwrap();
    while started.load(Ordering::SeqCst) < 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stats = running.stats().clone();
    running.shutdown().await.unwrap();
    let snapshot = stats.snapshot();
    let done = finished.lock().unwrap().clone();
    let queue = transport.stats("jobs", "worker").unwrap();
    // Every started delivery finished and was acked exactly once; the rest
    // wait in the queue, untouched.
    assert_eq!(done.len(), started.load(Ordering::SeqCst) as usize);
    assert_eq!(snapshot.acked as usize, done.len());
    assert_eq!(
        (snapshot.retried, snapshot.dead_lettered, snapshot.aborted),
        (0, 0, 0)
    );
    assert_eq!(queue.in_flight, 0);
    assert_eq!(
        queue.ready + done.len(),
        20,
        "none lost: {queue:?}, done {done:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_deadline_leaves_stuck_deliveries_for_redelivery() {
    let (transport, bus) = setup();
    let running = Router::new(transport.clone())
        .route(Route::new(
            "jobs",
            "worker",
            handler_fn(|_msg: Message| async {
                std::future::pending::<()>().await;
                Ok::<(), HandlerError>(())
            }),
        ))
        .shutdown_timeout(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    bus.emit("jobs", &Job { n: 1 }).await.unwrap();
    while transport.stats("jobs", "worker").unwrap().in_flight == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stats = running.stats().clone();
    running.shutdown().await.unwrap();
    assert_eq!(stats.snapshot().aborted, 1);
    assert_eq!(stats.snapshot().acked, 0);
    // The unsettled delivery is back in the queue for the next consumer.
    let mut again = transport
        .subscribe(Subscription::new("jobs", "worker"))
        .await
        .unwrap();
    let d = next(&mut again).await;
    assert_eq!(d.attempt(), 2);
    d.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn events_published_while_handling_carry_causation() {
    let (transport, bus) = setup();
    let mut out = transport
        .subscribe(Subscription::new("results", "inspector"))
        .await
        .unwrap();
    let handler_bus = bus.clone();
    let running = Router::new(transport.clone())
        .route(Route::new(
            "jobs",
            "worker",
            typed(move |job: Job, _msg: Message| {
                let bus = handler_bus.clone();
                async move {
                    bus.emit("results", &Job { n: job.n + 1 }).await?;
                    Ok(())
                }
            }),
        ))
        .start()
        .await
        .unwrap();
    let first = bus.event(&Job { n: 1 }).unwrap();
    bus.publish("jobs", vec![first.clone()]).await.unwrap();
    let result = next(&mut out).await;
    running.shutdown().await.unwrap();
    let ev = result.event();
    assert_eq!(ev.extension_str(ext::CAUSATION_ID), Some(first.id()));
    assert_eq!(
        ev.extension_str(ext::CORRELATION_ID),
        first.extension_str(ext::CORRELATION_ID)
    );
    let trace = |e: &Event| e.extension_str(ext::TRACEPARENT).unwrap()[3..35].to_owned();
    assert_eq!(trace(ev), trace(&first), "same W3C trace id");
    assert_ne!(
        ev.extension_str(ext::TRACEPARENT),
        first.extension_str(ext::TRACEPARENT),
        "a new parent span"
    );
}

#[tokio::test(start_paused = true)]
async fn dead_letter_hook_reacts_once_and_publishes_a_failure_event() {
    let (transport, bus) = setup();
    let mut failures = transport
        .subscribe(Subscription::new("jobs.failed", "inspector"))
        .await
        .unwrap();
    let hook_bus = bus.clone();
    let hook_calls = Arc::new(AtomicU32::new(0));
    let calls = hook_calls.clone();
    let running = Router::new(transport.clone())
        .route(
            Route::new(
                "jobs",
                "worker",
                handler_fn(|_msg: Message| async { Err(HandlerError::transient("down")) }),
            )
            .retry(fast_backoff(3))
            .on_dead_letter(move |failed: DeadLettered| {
                let bus = hook_bus.clone();
                let calls = calls.clone();
                async move {
                    // The first call fails: the reaction must not be lost.
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(HandlerError::transient("failure topic unavailable"));
                    }
                    let job: Job = failed.event.decode()?;
                    bus.emit("jobs.failed", &Job { n: job.n }).await?;
                    Ok(())
                }
            }),
        )
        .start()
        .await
        .unwrap();
    let first = bus.event(&Job { n: 5 }).unwrap();
    bus.publish("jobs", vec![first.clone()]).await.unwrap();
    let failure = next(&mut failures).await;
    running.shutdown().await.unwrap();
    assert_eq!(failure.event().decode::<Job>().unwrap(), Job { n: 5 });
    assert_eq!(
        failure.event().extension_str(ext::CAUSATION_ID),
        Some(first.id())
    );
    assert_eq!(hook_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn duplicate_routes_are_refused() {
    let (transport, _) = setup();
    let h = || handler_fn(|_m: Message| async { Ok::<(), HandlerError>(()) });
    let err = Router::new(transport)
        .route(Route::new("jobs", "worker", h()))
        .route(Route::new("jobs", "worker", h()))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, RouterError::DuplicateRoute { .. }), "{err}");
}

#[tokio::test]
async fn bad_names_fail_at_start_with_the_route_named() {
    let (transport, _) = setup();
    let err = Router::new(transport)
        .route(Route::new(
            "jobs",
            "bad group",
            handler_fn(|_m: Message| async { Ok::<(), HandlerError>(()) }),
        ))
        .start()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("bad group") && text.contains("invalid group name"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn closing_the_transport_under_the_router_is_an_error() {
    let (transport, _) = setup();
    let running = Router::new(transport.clone())
        .route(Route::new(
            "jobs",
            "worker",
            handler_fn(|_m: Message| async { Ok::<(), HandlerError>(()) }),
        ))
        .start()
        .await
        .unwrap();
    transport.close().await.unwrap();
    let err = running.shutdown().await;
    // Shutdown may win the race with the stream ending; both are clean.
    if let Err(e) = err {
        assert!(matches!(e, RouterError::StreamEnded { .. }), "{e}");
    }
}

#[test]
fn metrics_count_outcomes() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let (transport, bus) = setup();
            let running = Router::new(transport.clone())
                .route(
                    Route::new(
                        "jobs",
                        "worker",
                        typed(|job: Job, msg: Message| async move {
                            if job.n == 0 && msg.attempt() == 1 {
                                return Err(HandlerError::transient("once"));
                            }
                            if job.n == 1 {
                                return Err(HandlerError::permanent("never"));
                            }
                            Ok(())
                        }),
                    )
                    .retry(fast_backoff(3)),
                )
                .start()
                .await
                .unwrap();
            for n in 0..3 {
                bus.emit("jobs", &Job { n }).await.unwrap();
            }
            while running.stats().snapshot().acked < 2
                || running.stats().snapshot().dead_lettered < 1
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            running.shutdown().await.unwrap();
        });
    });
    let mut by_outcome = std::collections::BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        if key.name() == "eventos_deliveries_total" {
            let outcome = key
                .labels()
                .find(|l| l.key() == "outcome")
                .unwrap()
                .value()
                .to_owned();
            if let DebugValue::Counter(c) = value {
                by_outcome.insert(outcome, c);
            }
        }
    }
    assert_eq!(
        by_outcome,
        [
            ("ack".to_owned(), 2),
            ("dead_letter".to_owned(), 1),
            ("retry".to_owned(), 1)
        ]
        .into_iter()
        .collect()
    );
}

/// A handler whose dependency is down while `down` is set; it records the
/// attempt on which each job got through.
fn flaky_dependency(
    down: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
    through: Arc<Mutex<Vec<(u32, u32)>>>,
) -> eventos::BoxHandler {
    eventos::BoxHandler::new(typed(move |job: Job, msg: Message| {
        let (down, calls, through) = (down.clone(), calls.clone(), through.clone());
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if down.load(Ordering::SeqCst) {
                return Err(HandlerError::unavailable("connection refused"));
            }
            through.lock().unwrap().push((job.n, msg.attempt()));
            Ok(())
        }
    }))
}

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_retry_budget_pauses_the_route_and_loses_nothing() {
    let (transport, bus) = setup();
    let down = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let through = Arc::new(Mutex::new(Vec::new()));
    let checks = Arc::new(AtomicU32::new(0));
    let (up, checked) = (down.clone(), checks.clone());
    let breaker = Breaker::default()
        .failures_to_open(3)
        .pauses(Duration::from_millis(100), Duration::from_secs(1))
        .probe(move || {
            checked.fetch_add(1, Ordering::SeqCst);
            let answered = !up.load(Ordering::SeqCst);
            async move { answered }
        });
    // Three attempts within 200 ms: without the breaker every job would
    // be dead-lettered long before the outage ends.
    let running = Router::new(transport.clone())
        .route(
            Route::new(
                "jobs",
                "worker",
                flaky_dependency(down.clone(), calls.clone(), through.clone()),
            )
            .retry(fast_backoff(3))
            .concurrency(4)
            .circuit_breaker(breaker),
        )
        .start()
        .await
        .unwrap();
    let events = (0..200)
        .map(|n| bus.event(&Job { n }).unwrap())
        .collect::<Vec<_>>();
    bus.publish("jobs", events).await.unwrap();

    // Ten minutes down.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let during = calls.load(Ordering::SeqCst);
    assert!(
        during <= 3 + 4,
        "the route stopped trying after the circuit opened: {during} calls"
    );
    assert!(
        checks.load(Ordering::SeqCst) >= 590,
        "probed about every second while down"
    );
    assert_eq!(running.stats().snapshot().dead_lettered, 0);

    down.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while running.stats().snapshot().acked < 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all jobs went through after the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(running.stats().snapshot().dead_lettered, 0);
    running.shutdown().await.unwrap();
    let through = through.lock().unwrap();
    let mut jobs: Vec<u32> = through.iter().map(|(n, _)| *n).collect();
    jobs.sort_unstable();
    assert_eq!(jobs, (0..200).collect::<Vec<_>>(), "every job once");
    assert!(
        through.iter().all(|(_, attempt)| *attempt <= 2),
        "no job spent more than the one attempt that opened the circuit"
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_check_one_delivery_probes_and_the_route_resumes() {
    let (transport, bus) = setup();
    let down = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let through = Arc::new(Mutex::new(Vec::new()));
    let running = Router::new(transport.clone())
        .route(
            Route::new(
                "jobs",
                "worker",
                flaky_dependency(down.clone(), calls.clone(), through.clone()),
            )
            .retry(Backoff::new(
                Duration::from_secs(1),
                Duration::from_secs(1),
                50,
            ))
            .concurrency(1)
            .circuit_breaker(
                Breaker::default()
                    .failures_to_open(2)
                    .pauses(Duration::from_secs(1), Duration::from_secs(8)),
            ),
        )
        .start()
        .await
        .unwrap();
    let events = (0..20)
        .map(|n| bus.event(&Job { n }).unwrap())
        .collect::<Vec<_>>();
    bus.publish("jobs", events).await.unwrap();
    // 60 s down: 2 failures open it, then probes at 1, 2, 4, 8, 8, ... s.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let during = calls.load(Ordering::SeqCst);
    assert!(
        (2 + 5..=2 + 10).contains(&during),
        "two failures then a probe every few seconds: {during}"
    );
    down.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while running.stats().snapshot().acked < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the route did not resume"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(running.stats().snapshot().dead_lettered, 0);
    running.shutdown().await.unwrap();
    assert_eq!(through.lock().unwrap().len(), 20, "every job once");
}

/// A decision counts once its settlement succeeded: a dead letter the
/// transport cannot take (the dead-letter topic's name is over the limit)
/// is a failed settlement, not a dead letter.
#[tokio::test]
async fn a_decision_counts_only_once_it_is_settled() {
    let (transport, bus) = setup();
    // 197 characters: valid; with ".dlq" it is not.
    let topic = "t".repeat(197);
    let running = Router::new(transport.clone())
        .route(Route::new(
            topic.clone(),
            "worker",
            handler_fn(|_: Message| async { Err(HandlerError::permanent("bad input")) }),
        ))
        .start()
        .await
        .unwrap();
    bus.emit(&topic, &Job { n: 1 }).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while running.stats().snapshot().settle_failed == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the settlement never failed"
        );
        tokio::task::yield_now().await;
    }
    let stats = running.stats().snapshot();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    running.shutdown().await.unwrap();
}

/// A transport whose stream panics when polled: the consumer task dies.
struct PanickingStream(MemoryTransport, Arc<AtomicBool>);

impl Publisher for PanickingStream {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> futures::future::BoxFuture<'a, Result<(), eventos::TransportError>> {
        self.0.publish(topic, events)
    }
}

impl Subscriber for PanickingStream {
    fn subscribe(
        &self,
        _: Subscription,
    ) -> futures::future::BoxFuture<'_, Result<DeliveryStream, eventos::TransportError>> {
        let polled = self.1.clone();
        Box::pin(async move {
            let stream: DeliveryStream = Box::pin(futures::stream::poll_fn(
                move |_| -> std::task::Poll<Option<Result<Delivery, eventos::TransportError>>> {
                    polled.store(true, Ordering::Release);
                    panic!("the stream broke")
                },
            ));
            Ok(stream)
        })
    }
}

impl Transport for PanickingStream {
    fn name(&self) -> &'static str {
        "panicking"
    }
    fn capabilities(&self) -> eventos::Capabilities {
        self.0.capabilities()
    }
    fn close(&self) -> futures::future::BoxFuture<'_, Result<(), eventos::TransportError>> {
        self.0.close()
    }
}

#[tokio::test]
async fn a_panicking_consumer_task_is_an_error_not_a_clean_stop() {
    let polled = Arc::new(AtomicBool::new(false));
    let transport = Arc::new(PanickingStream(MemoryTransport::new(), polled.clone()));
    let running = Router::new(transport)
        .route(Route::new(
            "jobs",
            "worker",
            handler_fn(|_: Message| async { Ok::<(), HandlerError>(()) }),
        ))
        .start()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !polled.load(Ordering::Acquire) {
        assert!(tokio::time::Instant::now() < deadline, "never polled");
        tokio::task::yield_now().await;
    }
    let ended = running.shutdown().await;
    assert!(
        matches!(&ended, Err(RouterError::TaskFailed(what)) if what.contains("consumer")),
        "{ended:?}"
    );
}
