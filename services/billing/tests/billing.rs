//! Billing over events (the memory transport, SQLite in a temp dir) and the
//! simulated gateway on its own.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use eventos::core::DeliveryStream;
use eventos::{
    Bus, Event, Router, RunningRouter, StartFrom, Subscriber as _, Subscription, TypedEvent,
};
use eventos_memory::MemoryTransport;
use eventos_outbox::{Relay, Store};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use school_billing::{
    Billing, BillingConfig, Charge, ChargeRequest, GATEWAY_UNAVAILABLE, GatewayError,
    PaymentGateway, PaymentStatus, Refund, RefundRequest, SimulatedGateway, test_cards,
};
use school_events::{
    AcceptanceMode, CardToken, FraudCheckFailed, FraudCheckPassed, PaymentCaptured,
    PaymentDeclined, PaymentDetails, PaymentRefunded, PaymentSubmitted, Student, topics,
};

const AMOUNT: u64 = 12_500;

fn card(number: &str) -> CardToken {
    CardToken {
        bin: test_cards::bin(number).into(),
        last4: test_cards::last4(number).into(),
        fingerprint: format!("fp-{}", test_cards::last4(number)),
        brand: "visa".into(),
        expiry_month: 12,
        expiry_year: 2031,
    }
}

fn payment(number: &str) -> PaymentDetails {
    PaymentDetails {
        amount_cents: AMOUNT,
        currency: "EUR".into(),
        holder: "Ana Lima".into(),
        card: card(number),
    }
}

fn submitted(enrollment_id: &str, number: &str, mode: AcceptanceMode) -> PaymentSubmitted {
    PaymentSubmitted {
        enrollment_id: enrollment_id.into(),
        student: Student {
            name: "Ana Lima".into(),
            email: "ana@example.com".into(),
        },
        course_id: "rust-101".into(),
        payment: payment(number),
        mode,
        submitted_at_ms: 1_700_000_000_000,
    }
}

fn passed(enrollment_id: &str, number: &str) -> FraudCheckPassed {
    FraudCheckPassed {
        enrollment_id: enrollment_id.into(),
        score: 5,
        reasons: vec![],
        payment: payment(number),
        mode: AcceptanceMode::AwaitPayment,
    }
}

fn failed(enrollment_id: &str, mode: AcceptanceMode) -> FraudCheckFailed {
    FraudCheckFailed {
        enrollment_id: enrollment_id.into(),
        score: 100,
        reasons: vec!["card is on the deny list".into()],
        mode,
    }
}

fn fast() -> BillingConfig {
    BillingConfig {
        retry_base_ms: 1,
        retry_cap_ms: 5,
        max_attempts: 4,
        attempt_timeout_ms: 5_000,
        gateway_latency_ms: [0, 0],
        gateway_ledger: None,
    }
}

/// Billing with its router and relay running on a memory transport.
struct System {
    _dir: tempfile::TempDir,
    transport: Arc<MemoryTransport>,
    bus: Bus,
    billing: Billing,
    ledger: Arc<SimulatedGateway>,
    running: RunningRouter,
}

impl System {
    async fn start() -> Self {
        Self::with(fast(), |ledger| ledger).await
    }

    /// `gateway` wraps the simulated gateway (its ledger stays readable).
    async fn with(
        config: BillingConfig,
        gateway: impl FnOnce(Arc<SimulatedGateway>) -> Arc<dyn PaymentGateway>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(
            SimulatedGateway::open(&dir.path().join("gateway.db"), [0, 0])
                .await
                .unwrap(),
        );
        let store = Store::open(&dir.path().join("billing.db")).await.unwrap();
        let billing = Billing::new(store, gateway(ledger.clone()), config)
            .await
            .unwrap();
        let transport = Arc::new(MemoryTransport::new());
        let running = start_router(&billing, &transport, true).await;
        Self {
            _dir: dir,
            bus: Bus::new(transport.clone(), "/school/enrollment"),
            transport,
            billing,
            ledger,
            running,
        }
    }

    /// A probe on `topic`; subscribe before the event is published (the
    /// memory transport does not replay to new groups).
    async fn probe(&self, topic: &str) -> DeliveryStream {
        self.transport
            .subscribe(Subscription::new(topic, "probe").start(StartFrom::Earliest))
            .await
            .unwrap()
    }

    async fn acked(&self, n: u64) {
        let stats = self.running.stats().clone();
        eventually(&format!("{n} deliveries acked"), || {
            let stats = stats.clone();
            async move { stats.snapshot().acked >= n }
        })
        .await;
    }

    async fn status(&self, enrollment_id: &str, status: PaymentStatus) {
        eventually(&format!("{enrollment_id} {}", status.as_str()), || async {
            self.billing
                .payment(enrollment_id)
                .await
                .unwrap()
                .is_some_and(|p| p.status == status)
        })
        .await;
    }
}

/// Starts `billing`'s routes on `transport`, and its relay if `relay`.
async fn start_router(
    billing: &Billing,
    transport: &Arc<MemoryTransport>,
    relay: bool,
) -> RunningRouter {
    let running = billing
        .routes()
        .into_iter()
        .fold(Router::new(transport.clone()), Router::route)
        .start()
        .await
        .unwrap();
    if relay {
        let relay = Relay::new(billing.store().clone(), transport.clone());
        tokio::spawn(relay.run(std::future::pending()));
    }
    running
}

async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    school_testkit::eventually(what, Duration::from_secs(10), check).await;
}

async fn next<T: TypedEvent>(stream: &mut DeliveryStream) -> T {
    let delivery = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event in time")
        .unwrap()
        .unwrap();
    let payload = delivery.event().decode().unwrap();
    delivery.ack().await.unwrap();
    payload
}

/// The events of type `T` billing has recorded for `topic`, in order.
async fn outbox<T: TypedEvent>(billing: &Billing, topic: &str) -> Vec<T> {
    let rows: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT event FROM eventos_outbox WHERE topic = ? ORDER BY seq")
            .bind(topic)
            .fetch_all(billing.store().pool())
            .await
            .unwrap();
    rows.iter()
        .map(|bytes| Event::from_json(bytes).unwrap().decode().unwrap())
        .collect()
}

#[tokio::test]
async fn await_payment_charges_once_the_fraud_check_passed() {
    let system = System::start().await;
    let mut captured = system.probe(topics::PAYMENT_CAPTURED).await;

    system
        .bus
        .emit(
            topics::PAYMENT_SUBMITTED,
            &submitted("enr-1", test_cards::APPROVED, AcceptanceMode::AwaitPayment),
        )
        .await
        .unwrap();
    system.acked(1).await;
    assert_eq!(system.billing.payment("enr-1").await.unwrap(), None);
    assert!(
        system.ledger.ledger().await.unwrap().is_empty(),
        "no charge before the check"
    );

    system
        .bus
        .emit(topics::FRAUD_PASSED, &passed("enr-1", test_cards::APPROVED))
        .await
        .unwrap();
    let event: PaymentCaptured = next(&mut captured).await;
    assert_eq!(event.enrollment_id, "enr-1");
    assert_eq!(
        (event.amount_cents, event.currency.as_str()),
        (AMOUNT, "EUR")
    );
    assert_eq!(event.attempt, 1);

    let ledger = system.ledger.ledger().await.unwrap();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(
        ledger[0].idempotency_key, "enr-1",
        "the key is the enrollment id"
    );
    assert_eq!(ledger[0].charge_id, event.charge_id);
    assert!(!ledger[0].refunded);
    let stored = system.billing.payment("enr-1").await.unwrap().unwrap();
    assert_eq!(stored.status, PaymentStatus::Captured);
    assert_eq!(stored.charge_id.as_deref(), Some(event.charge_id.as_str()));
    assert_eq!(stored.last4.as_deref(), Some("4242"));
    system.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn declined_cards_are_declined_with_their_code() {
    let system = System::start().await;
    let mut declined = system.probe(topics::PAYMENT_DECLINED).await;
    for (id, number, code) in [
        ("enr-d", test_cards::DECLINED, "card_declined"),
        (
            "enr-f",
            test_cards::INSUFFICIENT_FUNDS,
            "insufficient_funds",
        ),
    ] {
        system
            .bus
            .emit(topics::FRAUD_PASSED, &passed(id, number))
            .await
            .unwrap();
        let event: PaymentDeclined = next(&mut declined).await;
        assert_eq!(
            (event.enrollment_id.as_str(), event.code.as_str()),
            (id, code)
        );
        assert_eq!(event.attempt, 1, "a decline is not retried");
        assert_eq!(event.amount_cents, AMOUNT);
        assert!(!event.reason.is_empty());
        let stored = system.billing.payment(id).await.unwrap().unwrap();
        assert_eq!(stored.status, PaymentStatus::Declined);
        assert_eq!(stored.code.as_deref(), Some(code));
        assert_eq!(system.ledger.charge_calls(id).await.unwrap(), 1);
    }
    assert!(system.ledger.ledger().await.unwrap().is_empty());
    assert!(
        outbox::<PaymentCaptured>(&system.billing, topics::PAYMENT_CAPTURED)
            .await
            .is_empty()
    );
    system.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_gateway_timeout_is_retried_and_captured_on_attempt_3() {
    let system = System::start().await;
    let mut captured = system.probe(topics::PAYMENT_CAPTURED).await;
    system
        .bus
        .emit(
            topics::FRAUD_PASSED,
            &passed("enr-t", test_cards::TIMEOUT_TWICE),
        )
        .await
        .unwrap();
    let event: PaymentCaptured = next(&mut captured).await;
    assert_eq!(event.attempt, 3);
    assert_eq!(system.ledger.charge_calls("enr-t").await.unwrap(), 3);
    assert_eq!(system.ledger.captures("enr-t").await.unwrap(), 1);
    system.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_optimistic_charge_is_refunded_when_the_fraud_check_fails() {
    let system = System::start().await;
    let mut captured = system.probe(topics::PAYMENT_CAPTURED).await;
    let mut refunded = system.probe(topics::PAYMENT_REFUNDED).await;

    system
        .bus
        .emit(
            topics::PAYMENT_SUBMITTED,
            &submitted(
                "enr-o",
                test_cards::FRAUD_DENY_LISTED,
                AcceptanceMode::Optimistic,
            ),
        )
        .await
        .unwrap();
    let capture: PaymentCaptured = next(&mut captured).await;
    assert_eq!(capture.enrollment_id, "enr-o");

    system
        .bus
        .emit(
            topics::FRAUD_FAILED,
            &failed("enr-o", AcceptanceMode::Optimistic),
        )
        .await
        .unwrap();
    let refund: PaymentRefunded = next(&mut refunded).await;
    assert_eq!(refund.charge_id, capture.charge_id);
    assert_eq!(
        (refund.amount_cents, refund.currency.as_str()),
        (AMOUNT, "EUR")
    );
    assert!(refund.reason.contains("deny list"), "{}", refund.reason);

    let ledger = system.ledger.ledger().await.unwrap();
    assert_eq!(ledger.len(), 1);
    assert!(ledger[0].refunded);
    assert_eq!(ledger[0].refunded_cents, AMOUNT);
    let refunds = system.ledger.refunds().await.unwrap();
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0].idempotency_key, "refund-enr-o");
    let stored = system.billing.payment("enr-o").await.unwrap().unwrap();
    assert_eq!(stored.status, PaymentStatus::Refunded);
    assert_eq!(
        stored.refund_id.as_deref(),
        Some(refunds[0].refund_id.as_str())
    );

    // The verdict again (a redelivery with a new id) gives nothing back twice.
    system
        .bus
        .emit(
            topics::FRAUD_FAILED,
            &failed("enr-o", AcceptanceMode::Optimistic),
        )
        .await
        .unwrap();
    system.acked(3).await;
    assert_eq!(system.ledger.refunds().await.unwrap().len(), 1);
    assert_eq!(
        outbox::<PaymentRefunded>(&system.billing, topics::PAYMENT_REFUNDED)
            .await
            .len(),
        1
    );
    system.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_fraud_verdict_before_the_optimistic_charge_blocks_it() {
    let system = System::start().await;
    system
        .bus
        .emit(
            topics::FRAUD_FAILED,
            &failed("enr-b", AcceptanceMode::Optimistic),
        )
        .await
        .unwrap();
    system.status("enr-b", PaymentStatus::Blocked).await;

    system
        .bus
        .emit(
            topics::PAYMENT_SUBMITTED,
            &submitted(
                "enr-b",
                test_cards::FRAUD_DENY_LISTED,
                AcceptanceMode::Optimistic,
            ),
        )
        .await
        .unwrap();
    system.acked(2).await;
    assert_eq!(
        system.ledger.charge_calls("enr-b").await.unwrap(),
        0,
        "the gateway is not even asked"
    );
    assert!(system.ledger.ledger().await.unwrap().is_empty());
    assert!(
        outbox::<PaymentCaptured>(&system.billing, topics::PAYMENT_CAPTURED)
            .await
            .is_empty()
    );
    assert!(
        outbox::<PaymentRefunded>(&system.billing, topics::PAYMENT_REFUNDED)
            .await
            .is_empty()
    );
    let stored = system.billing.payment("enr-b").await.unwrap().unwrap();
    assert_eq!(stored.status, PaymentStatus::Blocked);
    assert!(stored.reason.unwrap().contains("deny list"));
    system.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_same_event_delivered_twice_charges_once_and_is_told_once() {
    let system = System::start().await;
    let event = system
        .bus
        .event(&passed("enr-2", test_cards::APPROVED))
        .unwrap();
    system
        .bus
        .publish(topics::FRAUD_PASSED, vec![event.clone(), event])
        .await
        .unwrap();
    system.acked(2).await;
    // And once more as a new event about the same enrollment.
    system
        .bus
        .emit(topics::FRAUD_PASSED, &passed("enr-2", test_cards::APPROVED))
        .await
        .unwrap();
    system.acked(3).await;

    assert_eq!(system.ledger.ledger().await.unwrap().len(), 1);
    assert_eq!(system.ledger.captures("enr-2").await.unwrap(), 1);
    assert_eq!(
        system.ledger.charge_calls("enr-2").await.unwrap(),
        1,
        "the outcome was known: no second call"
    );
    let told = outbox::<PaymentCaptured>(&system.billing, topics::PAYMENT_CAPTURED).await;
    assert_eq!(told.len(), 1, "{told:?}");
    system.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_charge_given_up_is_declined_as_gateway_unavailable() {
    struct Down;
    impl PaymentGateway for Down {
        fn charge(&self, _: ChargeRequest) -> BoxFuture<'_, Result<Charge, GatewayError>> {
            Box::pin(async { Err(GatewayError::Unavailable("connection refused".into())) })
        }
        fn refund(&self, _: RefundRequest) -> BoxFuture<'_, Result<Refund, GatewayError>> {
            Box::pin(async { Err(GatewayError::Timeout) })
        }
    }
    let system = System::with(fast(), |_| Arc::new(Down)).await;
    let mut declined = system.probe(topics::PAYMENT_DECLINED).await;
    let mut dlq = system
        .probe(&eventos::dead_letter_topic(topics::FRAUD_PASSED))
        .await;
    system
        .bus
        .emit(topics::FRAUD_PASSED, &passed("enr-u", test_cards::APPROVED))
        .await
        .unwrap();
    let event: PaymentDeclined = next(&mut declined).await;
    assert_eq!(event.code, GATEWAY_UNAVAILABLE);
    assert_eq!(event.attempt, 4, "every configured attempt was made");
    let stored = system.billing.payment("enr-u").await.unwrap().unwrap();
    assert_eq!(stored.status, PaymentStatus::Declined);
    assert_eq!(stored.code.as_deref(), Some(GATEWAY_UNAVAILABLE));
    let dead = tokio::time::timeout(Duration::from_secs(10), dlq.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    dead.ack().await.unwrap();

    // The same event again finds the outcome and tells nothing new.
    system
        .bus
        .emit(topics::FRAUD_PASSED, &passed("enr-u", test_cards::APPROVED))
        .await
        .unwrap();
    system.acked(1).await;
    assert_eq!(
        outbox::<PaymentDeclined>(&system.billing, topics::PAYMENT_DECLINED)
            .await
            .len(),
        1
    );
    system.running.shutdown().await.unwrap();
}

/// Charges through the simulated gateway but loses the answer of the first
/// `lose` calls, as a crash or a dropped connection after the capture would.
struct LosesAnswers {
    inner: Arc<SimulatedGateway>,
    lose: AtomicU32,
}

impl PaymentGateway for LosesAnswers {
    fn charge(&self, request: ChargeRequest) -> BoxFuture<'_, Result<Charge, GatewayError>> {
        Box::pin(async move {
            let charge = self.inner.charge(request).await?;
            let lost = self
                .lose
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if lost {
                Err(GatewayError::Timeout)
            } else {
                Ok(charge)
            }
        })
    }
    fn refund(&self, request: RefundRequest) -> BoxFuture<'_, Result<Refund, GatewayError>> {
        self.inner.refund(request)
    }
}

#[tokio::test]
async fn a_capture_whose_answer_was_lost_is_not_charged_again() {
    let system = System::with(fast(), |ledger| {
        Arc::new(LosesAnswers {
            inner: ledger,
            lose: AtomicU32::new(2),
        })
    })
    .await;
    let mut captured = system.probe(topics::PAYMENT_CAPTURED).await;
    system
        .bus
        .emit(topics::FRAUD_PASSED, &passed("enr-l", test_cards::APPROVED))
        .await
        .unwrap();
    let event: PaymentCaptured = next(&mut captured).await;
    assert_eq!(event.attempt, 3);
    assert_eq!(system.ledger.charge_calls("enr-l").await.unwrap(), 3);
    assert_eq!(
        system.ledger.captures("enr-l").await.unwrap(),
        1,
        "asked three times, charged once"
    );
    assert_eq!(
        system.ledger.ledger().await.unwrap()[0].charge_id,
        event.charge_id
    );
    system.running.shutdown().await.unwrap();
}

/// Refunds through the simulated gateway after the first `down` refund
/// calls fail.
struct RefundsDown {
    inner: Arc<SimulatedGateway>,
    down: u32,
    calls: AtomicU32,
}

impl PaymentGateway for RefundsDown {
    fn charge(&self, request: ChargeRequest) -> BoxFuture<'_, Result<Charge, GatewayError>> {
        self.inner.charge(request)
    }
    fn refund(&self, request: RefundRequest) -> BoxFuture<'_, Result<Refund, GatewayError>> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.down {
                return Err(GatewayError::Unavailable("maintenance".into()));
            }
            self.inner.refund(request).await
        })
    }
}

#[tokio::test]
async fn a_refund_that_outlasts_its_retries_is_still_made() {
    let gateway = Arc::new(std::sync::OnceLock::new());
    let system = System::with(fast(), |ledger| {
        let down = Arc::new(RefundsDown {
            inner: ledger,
            down: fast().max_attempts,
            calls: AtomicU32::new(0),
        });
        gateway.set(down.clone()).ok();
        down
    })
    .await;
    let mut refunded = system.probe(topics::PAYMENT_REFUNDED).await;
    let mut dlq = system
        .probe(&eventos::dead_letter_topic(topics::FRAUD_FAILED))
        .await;
    system
        .bus
        .emit(
            topics::PAYMENT_SUBMITTED,
            &submitted(
                "enr-h",
                test_cards::FRAUD_DENY_LISTED,
                AcceptanceMode::Optimistic,
            ),
        )
        .await
        .unwrap();
    system.status("enr-h", PaymentStatus::Captured).await;
    system
        .bus
        .emit(
            topics::FRAUD_FAILED,
            &failed("enr-h", AcceptanceMode::Optimistic),
        )
        .await
        .unwrap();
    let refund: PaymentRefunded = next(&mut refunded).await;
    assert_eq!(refund.enrollment_id, "enr-h");
    assert_eq!(
        gateway.get().unwrap().calls.load(Ordering::SeqCst),
        fast().max_attempts + 1,
        "every attempt failed; the dead-letter hook made the refund"
    );
    // The verdict is still dead-lettered, for the record.
    tokio::time::timeout(Duration::from_secs(10), dlq.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .ack()
        .await
        .unwrap();
    assert!(
        system
            .ledger
            .charge_for("enr-h")
            .await
            .unwrap()
            .unwrap()
            .refunded
    );
    system.running.shutdown().await.unwrap();
}

/// Holds every charge's answer until released, after the capture.
struct Held {
    inner: Arc<SimulatedGateway>,
    release: tokio::sync::Semaphore,
}

impl PaymentGateway for Held {
    fn charge(&self, request: ChargeRequest) -> BoxFuture<'_, Result<Charge, GatewayError>> {
        Box::pin(async move {
            let charge = self.inner.charge(request).await;
            self.release.acquire().await.unwrap().forget();
            charge
        })
    }
    fn refund(&self, request: RefundRequest) -> BoxFuture<'_, Result<Refund, GatewayError>> {
        self.inner.refund(request)
    }
}

#[tokio::test]
async fn a_fraud_verdict_waits_for_a_charge_in_flight_in_another_process() {
    // Two billing workers share one database and one gateway ledger, each
    // with its own locks and its own transport (as two processes would).
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(
        SimulatedGateway::open(&dir.path().join("gateway.db"), [0, 0])
            .await
            .unwrap(),
    );
    let store = Store::open(&dir.path().join("billing.db")).await.unwrap();
    let held = Arc::new(Held {
        inner: ledger.clone(),
        release: tokio::sync::Semaphore::new(0),
    });
    let charging = Billing::new(store.clone(), held.clone(), fast())
        .await
        .unwrap();
    let patient = BillingConfig {
        max_attempts: 1_000,
        ..fast()
    };
    let verdicts = Billing::new(store, ledger.clone(), patient).await.unwrap();
    let (a, b) = (
        Arc::new(MemoryTransport::new()),
        Arc::new(MemoryTransport::new()),
    );
    // One relay for the shared outbox, so every event leaves through `b`.
    let running_a = start_router(&charging, &a, false).await;
    let running_b = start_router(&verdicts, &b, true).await;

    Bus::new(a.clone(), "/school/enrollment")
        .emit(
            topics::PAYMENT_SUBMITTED,
            &submitted(
                "enr-x",
                test_cards::FRAUD_DENY_LISTED,
                AcceptanceMode::Optimistic,
            ),
        )
        .await
        .unwrap();
    // Captured at the gateway, not yet recorded by billing.
    eventually("the capture", || async {
        ledger.captures("enr-x").await.unwrap() == 1
    })
    .await;
    assert_eq!(
        charging.payment("enr-x").await.unwrap().unwrap().status,
        PaymentStatus::Charging
    );

    let mut refunded = b
        .subscribe(Subscription::new(topics::PAYMENT_REFUNDED, "probe"))
        .await
        .unwrap();
    Bus::new(b.clone(), "/school/antifraud")
        .emit(
            topics::FRAUD_FAILED,
            &failed("enr-x", AcceptanceMode::Optimistic),
        )
        .await
        .unwrap();
    let stats = running_b.stats().clone();
    eventually("the verdict to wait", || {
        let stats = stats.clone();
        async move { stats.snapshot().retried >= 2 }
    })
    .await;
    assert!(
        ledger.refunds().await.unwrap().is_empty(),
        "nothing refunded while the outcome is unknown"
    );

    held.release.add_permits(1);
    let refund: PaymentRefunded = next(&mut refunded).await;
    assert_eq!(refund.enrollment_id, "enr-x");
    let charges = ledger.ledger().await.unwrap();
    assert_eq!(charges.len(), 1);
    assert!(charges[0].refunded);
    assert_eq!(ledger.max_captures_per_key().await.unwrap(), 1);
    assert_eq!(
        verdicts.payment("enr-x").await.unwrap().unwrap().status,
        PaymentStatus::Refunded
    );
    running_a.shutdown().await.unwrap();
    running_b.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_gateway_captures_once_per_idempotency_key() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = SimulatedGateway::open(&dir.path().join("gateway.db"), [0, 0])
        .await
        .unwrap();
    let request = |key: &str| ChargeRequest {
        idempotency_key: key.into(),
        amount_cents: AMOUNT,
        currency: "EUR".into(),
        card: card(test_cards::APPROVED),
        holder: "Ana Lima".into(),
    };
    let first = gateway.charge(request("k-1")).await.unwrap();
    let again = gateway.charge(request("k-1")).await.unwrap();
    assert_eq!(first, again, "the same key gives the same charge");
    assert_eq!(gateway.captures("k-1").await.unwrap(), 1);
    assert_eq!(gateway.charge_calls("k-1").await.unwrap(), 2);
    let other = gateway.charge(request("k-2")).await.unwrap();
    assert_ne!(other.charge_id, first.charge_id);
    assert_eq!(gateway.ledger().await.unwrap().len(), 2);
    assert_eq!(gateway.max_captures_per_key().await.unwrap(), 1);

    // Refunds are idempotent too, and never exceed the charge.
    let refund = |key: &str, charge_id: &str, amount_cents| RefundRequest {
        idempotency_key: key.into(),
        charge_id: charge_id.into(),
        amount_cents,
    };
    let r1 = gateway
        .refund(refund("r-1", &first.charge_id, AMOUNT))
        .await
        .unwrap();
    let r2 = gateway
        .refund(refund("r-1", &first.charge_id, AMOUNT))
        .await
        .unwrap();
    assert_eq!(r1, r2);
    let charge = gateway.charge_for("k-1").await.unwrap().unwrap();
    assert_eq!(charge.refunded_cents, AMOUNT, "refunded once");
    let code = |e: GatewayError| match e {
        GatewayError::Declined { code, .. } => code,
        other => panic!("expected a decline, got {other:?}"),
    };
    assert_eq!(
        code(
            gateway
                .refund(refund("r-2", &first.charge_id, 1))
                .await
                .unwrap_err()
        ),
        "invalid_refund_amount"
    );
    assert_eq!(
        code(
            gateway
                .refund(refund("r-3", "ch_nope", 1))
                .await
                .unwrap_err()
        ),
        "no_such_charge"
    );
    let mut zero = request("k-0");
    zero.amount_cents = 0;
    assert_eq!(
        code(gateway.charge(zero).await.unwrap_err()),
        "invalid_amount"
    );
    assert_eq!(gateway.captures("k-0").await.unwrap(), 0);
}

#[tokio::test]
async fn the_ledger_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let request = ChargeRequest {
        idempotency_key: "enr-r".into(),
        amount_cents: AMOUNT,
        currency: "EUR".into(),
        card: card(test_cards::TIMEOUT_TWICE),
        holder: "Ana Lima".into(),
    };
    let charge = {
        let gateway = SimulatedGateway::open(&path, [0, 0]).await.unwrap();
        assert_eq!(
            gateway.charge(request.clone()).await,
            Err(GatewayError::Timeout)
        );
        assert_eq!(
            gateway.charge(request.clone()).await,
            Err(GatewayError::Timeout)
        );
        gateway.charge(request.clone()).await.unwrap()
    };
    let gateway = reopen(&path).await;
    let ledger = gateway.ledger().await.unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].charge_id, charge.charge_id);
    assert_eq!(ledger[0].last4, "0119");
    assert_eq!(
        gateway.charge_calls("enr-r").await.unwrap(),
        3,
        "the call count persists too"
    );
    assert_eq!(
        gateway.charge(request).await.unwrap(),
        charge,
        "and so does the idempotency"
    );
    assert_eq!(gateway.captures("enr-r").await.unwrap(), 1);
}

async fn reopen(path: &Path) -> SimulatedGateway {
    SimulatedGateway::open(path, [0, 0]).await.unwrap()
}
