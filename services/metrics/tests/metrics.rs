//! The metrics service over events: the memory transport and a router,
//! SQLite in a temp dir.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventos::{Bus, Router, RunningRouter};
use eventos_memory::MemoryTransport;
use eventos_outbox::Store;
use school_events::{
    AcceptanceMode, CardToken, EnrollmentActivated, FraudCheckFailed, FraudCheckPassed,
    PaymentCaptured, PaymentDeclined, PaymentDetails, PaymentRefunded, PaymentSubmitted, Student,
    topics,
};
use school_metrics::{Metrics, Snapshot};

struct Harness {
    metrics: Metrics,
    bus: Bus,
    router: RunningRouter,
}

impl Harness {
    async fn start(path: &Path) -> Self {
        let store = Store::open(path).await.unwrap();
        let metrics = Metrics::new(store).await.unwrap();
        let transport = Arc::new(MemoryTransport::new());
        let router = metrics
            .routes()
            .into_iter()
            .fold(Router::new(transport.clone()), Router::route)
            .start()
            .await
            .unwrap();
        Self {
            metrics,
            bus: Bus::new(transport, "/school/test"),
            router,
        }
    }

    /// Waits until `n` deliveries in all were acked, and none failed.
    async fn settled(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.router.stats().snapshot();
            assert_eq!((stats.retried, stats.dead_lettered), (0, 0), "{stats:?}");
            if stats.acked >= n {
                assert_eq!(stats.acked, n, "{stats:?}");
                return;
            }
            assert!(Instant::now() < deadline, "{stats:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn submitted(n: u32, amount_cents: u64, currency: &str) -> PaymentSubmitted {
    PaymentSubmitted {
        enrollment_id: format!("enr-{n}"),
        student: Student {
            name: "Ana Souza".into(),
            email: "ana@example.com".into(),
        },
        course_id: "rust-101".into(),
        payment: PaymentDetails {
            amount_cents,
            currency: currency.into(),
            holder: "Ana Souza".into(),
            card: CardToken {
                bin: "424242".into(),
                last4: "4242".into(),
                fingerprint: "fp".into(),
                brand: "visa".into(),
                expiry_month: 12,
                expiry_year: 2030,
            },
        },
        mode: AcceptanceMode::AwaitPayment,
        submitted_at_ms: 1_700_000_000_000,
    }
}

fn passed(n: u32) -> FraudCheckPassed {
    FraudCheckPassed {
        enrollment_id: format!("enr-{n}"),
        score: 0,
        reasons: vec![],
        payment: submitted(n, 1, "EUR").payment,
        mode: AcceptanceMode::AwaitPayment,
    }
}

fn failed(n: u32) -> FraudCheckFailed {
    FraudCheckFailed {
        enrollment_id: format!("enr-{n}"),
        score: 100,
        reasons: vec!["card BIN 410000 is on the deny list".into()],
        mode: AcceptanceMode::AwaitPayment,
    }
}

fn captured(n: u32, amount_cents: u64) -> PaymentCaptured {
    PaymentCaptured {
        enrollment_id: format!("enr-{n}"),
        charge_id: format!("ch-{n}"),
        amount_cents,
        currency: "EUR".into(),
        attempt: 1,
    }
}

fn declined(n: u32, amount_cents: u64) -> PaymentDeclined {
    PaymentDeclined {
        enrollment_id: format!("enr-{n}"),
        code: "card_declined".into(),
        reason: "the bank refused the charge".into(),
        amount_cents,
        currency: "EUR".into(),
        attempt: 1,
    }
}

fn refunded(n: u32, amount_cents: u64) -> PaymentRefunded {
    PaymentRefunded {
        enrollment_id: format!("enr-{n}"),
        charge_id: format!("ch-{n}"),
        amount_cents,
        currency: "EUR".into(),
        reason: "late fraud signal".into(),
    }
}

fn activated(n: u32, after_ms: i64) -> EnrollmentActivated {
    let submitted_at_ms = 1_700_000_000_000;
    EnrollmentActivated {
        enrollment_id: format!("enr-{n}"),
        course_id: "rust-101".into(),
        mode: AcceptanceMode::AwaitPayment,
        submitted_at_ms,
        activated_at_ms: submitted_at_ms + after_ms,
    }
}

/// Activation times in ms: on a bucket bound, between bounds, above every
/// bound, and negative (clock skew, counted as 0).
const ACTIVATIONS_MS: [i64; 6] = [300, 500, 1_500, 45_000, 400_000, -100];

/// Publishes one of everything; returns how many events.
async fn feed(bus: &Bus) -> u64 {
    let mut n = 0;
    for (i, (amount, currency)) in [
        (49_900, "EUR"),
        (49_900, "EUR"),
        (49_900, "EUR"),
        (100_000, "USD"),
    ]
    .into_iter()
    .enumerate()
    {
        let i = u32::try_from(i).unwrap();
        bus.emit(topics::PAYMENT_SUBMITTED, &submitted(i, amount, currency))
            .await
            .unwrap();
        n += 1;
    }
    for i in 0..3 {
        bus.emit(topics::FRAUD_PASSED, &passed(i)).await.unwrap();
        n += 1;
    }
    bus.emit(topics::FRAUD_FAILED, &failed(3)).await.unwrap();
    bus.emit(topics::PAYMENT_CAPTURED, &captured(0, 49_900))
        .await
        .unwrap();
    bus.emit(topics::PAYMENT_CAPTURED, &captured(1, 49_900))
        .await
        .unwrap();
    bus.emit(topics::PAYMENT_DECLINED, &declined(2, 49_900))
        .await
        .unwrap();
    bus.emit(topics::PAYMENT_REFUNDED, &refunded(1, 49_900))
        .await
        .unwrap();
    n += 5;
    for (i, ms) in ACTIVATIONS_MS.into_iter().enumerate() {
        let i = u32::try_from(i).unwrap();
        bus.emit(topics::ENROLLMENT_ACTIVATED, &activated(i, ms))
            .await
            .unwrap();
        n += 1;
    }
    n
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn check_fed(s: &Snapshot) {
    assert_eq!(s.submitted, 4);
    assert_eq!(
        s.submitted_amount_cents,
        BTreeMap::from([("EUR".to_owned(), 149_700), ("USD".to_owned(), 100_000)])
    );
    assert_eq!((s.captured, s.declined, s.refunded), (2, 1, 1));
    assert_eq!(
        s.captured_amount_cents,
        BTreeMap::from([("EUR".to_owned(), 99_800)])
    );
    assert_eq!(
        s.declined_amount_cents,
        BTreeMap::from([("EUR".to_owned(), 49_900)])
    );
    assert_eq!(
        s.refunded_amount_cents,
        BTreeMap::from([("EUR".to_owned(), 49_900)])
    );
    assert_eq!((s.fraud_passed, s.fraud_failed), (3, 1));
    assert!(close(s.approval_ratio, 2.0 / 3.0), "{}", s.approval_ratio);
    assert!(close(s.fraud_rate, 0.25), "{}", s.fraud_rate);
    let h = &s.activations;
    assert_eq!(h.count, 6);
    assert!(close(h.sum_seconds, 447.3), "{}", h.sum_seconds);
    let buckets: Vec<(f64, u64)> = h.buckets.iter().map(|b| (b.le_seconds, b.count)).collect();
    assert_eq!(
        buckets,
        vec![
            (0.5, 3),
            (1.0, 3),
            (2.0, 4),
            (5.0, 4),
            (10.0, 4),
            (30.0, 4),
            (60.0, 5),
            (300.0, 5)
        ]
    );
}

/// The exposition as (series with labels → value), checking on the way
/// that every sample belongs to a family declared with HELP and TYPE.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.is_empty(), "{line}");
            helps.push(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(helps.last().is_some_and(|h| h == name), "{line}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "declared twice: {line}"
            );
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "no TYPE before {line}");
            let value: f64 = value.parse().unwrap();
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "duplicate sample: {line}"
            );
        }
    }
    samples
}

#[tokio::test]
async fn payment_facts_are_counted_and_rendered() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&dir.path().join("metrics.db")).await;
    let n = feed(&h.bus).await;
    h.settled(n).await;
    let s = h.metrics.snapshot().await.unwrap();
    check_fed(&s);

    let text = h.metrics.render().await.unwrap();
    let samples = parse(&text);
    let expect = [
        ("school_payments_submitted_total", 4.0),
        (
            "school_payments_submitted_amount_cents_total{currency=\"EUR\"}",
            149_700.0,
        ),
        (
            "school_payments_submitted_amount_cents_total{currency=\"USD\"}",
            100_000.0,
        ),
        ("school_payments_total{outcome=\"captured\"}", 2.0),
        ("school_payments_total{outcome=\"declined\"}", 1.0),
        ("school_payments_total{outcome=\"refunded\"}", 1.0),
        (
            "school_payment_amount_cents_total{outcome=\"captured\",currency=\"EUR\"}",
            99_800.0,
        ),
        (
            "school_payment_amount_cents_total{outcome=\"declined\",currency=\"EUR\"}",
            49_900.0,
        ),
        (
            "school_payment_amount_cents_total{outcome=\"refunded\",currency=\"EUR\"}",
            49_900.0,
        ),
        ("school_fraud_checks_total{verdict=\"passed\"}", 3.0),
        ("school_fraud_checks_total{verdict=\"failed\"}", 1.0),
        ("school_payment_approval_ratio", 2.0 / 3.0),
        ("school_fraud_rate", 0.25),
        ("school_enrollment_activation_seconds_sum", 447.3),
        ("school_enrollment_activation_seconds_count", 6.0),
    ];
    for (series, value) in expect {
        let got = samples.get(series).copied();
        assert!(
            got.is_some_and(|g| close(g, value)),
            "{series}: {got:?}\n{text}"
        );
    }

    // The histogram is cumulative, ends in +Inf, and +Inf is the count.
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("school_enrollment_activation_seconds_bucket{le=\""))
        .map(|l| {
            let (le, rest) = l.split_once("\"} ").unwrap();
            (le.to_owned(), rest.parse().unwrap())
        })
        .collect();
    let les: Vec<&str> = buckets.iter().map(|(le, _)| le.as_str()).collect();
    assert_eq!(
        les,
        vec!["0.5", "1", "2", "5", "10", "30", "60", "300", "+Inf"]
    );
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "not cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
        vec![3.0, 3.0, 4.0, 4.0, 4.0, 4.0, 5.0, 5.0, 6.0]
    );

    // The snapshot is the JSON view too.
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["captured"], 2);
    assert_eq!(json["activations"]["buckets"][0]["le_seconds"], 0.5);
    h.router.shutdown().await.unwrap();
}

#[tokio::test]
async fn nothing_seen_renders_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("metrics.db")).await.unwrap();
    let metrics = Metrics::new(store).await.unwrap();
    let s = metrics.snapshot().await.unwrap();
    assert_eq!((s.submitted, s.captured, s.fraud_failed), (0, 0, 0));
    assert_eq!(s.activations.buckets.len(), 8);
    let samples = parse(&metrics.render().await.unwrap());
    assert_eq!(samples["school_payment_approval_ratio"], 0.0);
    assert_eq!(samples["school_fraud_rate"], 0.0);
    assert_eq!(
        samples["school_enrollment_activation_seconds_bucket{le=\"+Inf\"}"],
        0.0
    );
}

#[tokio::test]
async fn a_redelivered_event_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&dir.path().join("metrics.db")).await;
    let sub = h.bus.event(&submitted(1, 49_900, "EUR")).unwrap();
    let cap = h.bus.event(&captured(1, 49_900)).unwrap();
    let act = h.bus.event(&activated(1, 1_500)).unwrap();
    h.bus
        .publish(topics::PAYMENT_SUBMITTED, vec![sub.clone(), sub])
        .await
        .unwrap();
    h.bus
        .publish(topics::PAYMENT_CAPTURED, vec![cap.clone(), cap])
        .await
        .unwrap();
    h.bus
        .publish(topics::ENROLLMENT_ACTIVATED, vec![act.clone(), act])
        .await
        .unwrap();
    h.settled(6).await;
    let s = h.metrics.snapshot().await.unwrap();
    assert_eq!(s.submitted, 1);
    assert_eq!(s.submitted_amount_cents["EUR"], 49_900);
    assert_eq!(s.captured, 1);
    assert_eq!(s.captured_amount_cents["EUR"], 49_900);
    assert_eq!(s.activations.count, 1);
    assert!(close(s.activations.sum_seconds, 1.5));
    h.router.shutdown().await.unwrap();
}

#[tokio::test]
async fn aggregates_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.db");
    let (before, seen) = {
        let h = Harness::start(&path).await;
        let n = feed(&h.bus).await;
        let seen = h.bus.event(&declined(9, 10_000)).unwrap();
        h.bus
            .publish(topics::PAYMENT_DECLINED, vec![seen.clone()])
            .await
            .unwrap();
        h.settled(n + 1).await;
        let s = h.metrics.snapshot().await.unwrap();
        h.router.shutdown().await.unwrap();
        h.metrics.store().close().await;
        (s, seen)
    };
    assert_eq!(before.declined, 2);

    let h = Harness::start(&path).await;
    assert_eq!(h.metrics.snapshot().await.unwrap(), before);
    // The inbox survived too: an event counted before the restart,
    // delivered again, changes nothing; a new one counts.
    h.bus
        .publish(topics::PAYMENT_DECLINED, vec![seen])
        .await
        .unwrap();
    h.settled(1).await;
    assert_eq!(h.metrics.snapshot().await.unwrap(), before);
    h.bus
        .emit(topics::PAYMENT_CAPTURED, &captured(9, 49_900))
        .await
        .unwrap();
    h.settled(2).await;
    let after = h.metrics.snapshot().await.unwrap();
    assert_eq!(after.captured, before.captured + 1);
    assert_eq!(after.declined, before.declined);
    assert_eq!(after.captured_amount_cents["EUR"], 149_700);
    h.router.shutdown().await.unwrap();
}

/// Every family an exposition must hold, however large its values.
const FAMILIES: [&str; 8] = [
    "school_payments_submitted_total",
    "school_payments_submitted_amount_cents_total",
    "school_payments_total",
    "school_payment_amount_cents_total",
    "school_fraud_checks_total",
    "school_payment_approval_ratio",
    "school_fraud_rate",
    "school_enrollment_activation_seconds",
];

fn assert_every_family(text: &str) {
    for family in FAMILIES {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
    }
}

/// Regression: an amount of 2^63 or more (stored clamped to `i64::MAX`)
/// overflowed the SQLite sum into a float, the snapshot failed to decode
/// it, and every `school_*` series left `/metrics` for good.
#[tokio::test]
async fn amounts_past_i64_saturate_and_every_series_stays_rendered() {
    const MAX: f64 = 9_223_372_036_854_775_807.0;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.db");
    let expect = |text: &str| {
        assert_every_family(text);
        let samples = parse(text);
        for (series, value) in [
            ("school_payments_submitted_total", 3.0),
            (
                "school_payments_submitted_amount_cents_total{currency=\"EUR\"}",
                MAX,
            ),
            ("school_payments_total{outcome=\"captured\"}", 2.0),
            (
                "school_payment_amount_cents_total{outcome=\"captured\",currency=\"EUR\"}",
                MAX,
            ),
        ] {
            assert_eq!(
                samples.get(series).copied(),
                Some(value),
                "{series}\n{text}"
            );
        }
    };
    {
        let h = Harness::start(&path).await;
        for (i, amount) in [1_u64 << 63, u64::MAX, 49_900].into_iter().enumerate() {
            let i = u32::try_from(i).unwrap();
            h.bus
                .emit(topics::PAYMENT_SUBMITTED, &submitted(i, amount, "EUR"))
                .await
                .unwrap();
        }
        for i in 0..2 {
            h.bus
                .emit(topics::PAYMENT_CAPTURED, &captured(i, 1 << 63))
                .await
                .unwrap();
        }
        h.settled(5).await;
        let s = h.metrics.snapshot().await.unwrap();
        assert_eq!(s.submitted_amount_cents["EUR"], i64::MAX as u64);
        expect(&h.metrics.render().await.unwrap());
        h.router.shutdown().await.unwrap();
        h.metrics.store().close().await;
    }
    let h = Harness::start(&path).await;
    expect(&h.metrics.render().await.unwrap());

    // A database an older version overflowed holds floats; it still
    // renders, and the next event puts an integer back.
    sqlx::query(
        "INSERT INTO metrics_counters (metric, label, currency, count, total) VALUES ('payment', 'declined', 'EUR', 1, 1.8e19)",
    )
    .execute(h.metrics.store().pool())
    .await
    .unwrap();
    let text = h.metrics.render().await.unwrap();
    assert_every_family(&text);
    let samples = parse(&text);
    assert_eq!(
        samples["school_payment_amount_cents_total{outcome=\"declined\",currency=\"EUR\"}"],
        MAX
    );
    h.bus
        .emit(topics::PAYMENT_DECLINED, &declined(7, 49_900))
        .await
        .unwrap();
    h.settled(1).await;
    let kind: String = sqlx::query_scalar(
        "SELECT typeof(total) FROM metrics_counters WHERE metric = 'payment' AND label = 'declined'",
    )
    .fetch_one(h.metrics.store().pool())
    .await
    .unwrap();
    assert_eq!(kind, "integer");
    let s = h.metrics.snapshot().await.unwrap();
    assert_eq!(
        (s.declined, s.declined_amount_cents["EUR"]),
        (2, i64::MAX as u64)
    );
    h.router.shutdown().await.unwrap();
}
