//! Payment metrics: counts, amounts, approval and fraud rates, time to activation.
//!
//! The service follows the payment facts of the school — submitted, fraud
//! check passed or failed, captured, declined, refunded, enrollment
//! activated — and keeps their aggregates. [`Metrics::render`] gives them in
//! the Prometheus text exposition format, [`Metrics::snapshot`] as a typed
//! (and serializable) [`Snapshot`].
//!
//! # The decisions that shaped it
//!
//! * **Business facts are counted exactly, in a database.** The process
//!   metrics of `/metrics` live in memory and restart at zero, which is
//!   right for rates of a process. These are totals of the business (how
//!   many payments, how much money), so they live in the service's own
//!   SQLite file and survive restarts.
//! * **Once per event.** Each event's update is written in the same
//!   transaction as its inbox entry ([`Store::once`]): a redelivered
//!   event counts once.
//! * **Raw counts stored, everything else derived.** The approval ratio and
//!   the fraud rate are computed from the counters when read, so they
//!   cannot drift from them. Histogram buckets are stored non-cumulative and
//!   the sum in whole milliseconds, so no floating-point error piles up;
//!   rendering accumulates them as Prometheus requires.
//! * **Counters saturate, they never wrap or vanish.** Amounts and counts
//!   are stored as SQLite integers (64-bit, signed); an addition that would
//!   pass `i64::MAX` stays at `i64::MAX` instead of turning the column into
//!   a float (what SQLite does on overflow), and reading casts every value
//!   back to an integer, so a database an older version overflowed still
//!   renders. A series stuck at `i64::MAX` is visibly wrong; a missing one
//!   looks like no traffic.
//! * **Money is never summed across currencies.** Every amount series is
//!   labelled by its ISO 4217 code.
//! * **Time to activation comes from the event.** It is
//!   `activated_at_ms − submitted_at_ms` of [`EnrollmentActivated`], not the
//!   time this service happened to see it, so a lagging consumer does not
//!   skew it. A negative difference (clocks of two machines) counts as 0.
//!   The bucket bounds are fixed; changing them is a migration.
//!
//! No feature flags.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use eventos::{HandlerError, Message, Route, TypedEvent, typed_with};
use eventos_outbox::rusqlite::{self, Connection, params};
use eventos_outbox::{OutboxError, Store};
use school_events::{
    EnrollmentActivated, FraudCheckFailed, FraudCheckPassed, PaymentCaptured, PaymentDeclined,
    PaymentRefunded, PaymentSubmitted, topics,
};
use serde::{Deserialize, Serialize};
use sqlx::Row as _;

/// The migrations of the metrics database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The CloudEvents `source` of this service (it emits no events; the name
/// identifies it in logs and traces).
pub const SOURCE: &str = "/school/metrics";

/// The consumer group of this service.
pub const GROUP: &str = "metrics";

/// Upper bounds of the activation-time buckets, in milliseconds.
const ACTIVATION_BOUNDS_MS: [u64; 8] = [500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000];

const SUBMITTED: &str = "submitted";
const PAYMENT: &str = "payment";
const FRAUD_CHECK: &str = "fraud_check";
const ACTIVATION: &str = "activation";

/// One cumulative histogram bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Upper bound, inclusive, in seconds.
    pub le_seconds: f64,
    /// Observations at or below it.
    pub count: u64,
}

/// A histogram of durations.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Histogram {
    /// The finite buckets, cumulative, in increasing order; the `+Inf`
    /// bucket is [`count`](Self::count).
    pub buckets: Vec<Bucket>,
    /// How many observations.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum_seconds: f64,
}

/// All aggregates at one moment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Payments submitted.
    pub submitted: u64,
    /// Amount submitted, minor units, by currency.
    pub submitted_amount_cents: BTreeMap<String, u64>,
    /// Payments captured.
    pub captured: u64,
    /// Amount captured, minor units, by currency.
    pub captured_amount_cents: BTreeMap<String, u64>,
    /// Payments declined.
    pub declined: u64,
    /// Amount declined, minor units, by currency.
    pub declined_amount_cents: BTreeMap<String, u64>,
    /// Captures refunded.
    pub refunded: u64,
    /// Amount refunded, minor units, by currency.
    pub refunded_amount_cents: BTreeMap<String, u64>,
    /// Fraud checks passed.
    pub fraud_passed: u64,
    /// Fraud checks failed.
    pub fraud_failed: u64,
    /// captured / (captured + declined); 0 when there are none.
    pub approval_ratio: f64,
    /// failed / (passed + failed); 0 when there are none.
    pub fraud_rate: f64,
    /// Time from request to activation of enrollments.
    pub activations: Histogram,
}

/// What one event adds.
enum Observation {
    Count {
        metric: &'static str,
        label: &'static str,
        currency: String,
        amount: u64,
    },
    Activation {
        ms: u64,
    },
}

fn payment(outcome: &'static str, amount: u64, currency: &str) -> Observation {
    Observation::Count {
        metric: PAYMENT,
        label: outcome,
        currency: currency.trim().to_ascii_uppercase(),
        amount,
    }
}

fn fraud(verdict: &'static str) -> Observation {
    Observation::Count {
        metric: FRAUD_CHECK,
        label: verdict,
        currency: String::new(),
        amount: 0,
    }
}

fn to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_db(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn ratio(part: u64, other: u64) -> f64 {
    // In floating point, so two counters near the top cannot overflow.
    let whole = part as f64 + other as f64;
    if whole == 0.0 {
        0.0
    } else {
        part as f64 / whole
    }
}

fn ms_to_seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The payment-metrics service.
#[derive(Debug, Clone)]
pub struct Metrics {
    store: Store,
}

impl Metrics {
    /// The service on `store` (its migrations are run).
    ///
    /// # Errors
    ///
    /// If the migrations fail.
    pub async fn new(store: Store) -> Result<Self, OutboxError> {
        store.migrate(&MIGRATOR).await?;
        Ok(Self { store })
    }

    /// The service's database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The event routes: one per payment fact counted.
    pub fn routes(&self) -> Vec<Route> {
        vec![
            self.route(topics::PAYMENT_SUBMITTED, |e: &PaymentSubmitted| {
                Observation::Count {
                    metric: SUBMITTED,
                    label: "",
                    currency: e.payment.currency.trim().to_ascii_uppercase(),
                    amount: e.payment.amount_cents,
                }
            }),
            self.route(topics::FRAUD_PASSED, |_: &FraudCheckPassed| fraud("passed")),
            self.route(topics::FRAUD_FAILED, |_: &FraudCheckFailed| fraud("failed")),
            self.route(topics::PAYMENT_CAPTURED, |e: &PaymentCaptured| {
                payment("captured", e.amount_cents, &e.currency)
            }),
            self.route(topics::PAYMENT_DECLINED, |e: &PaymentDeclined| {
                payment("declined", e.amount_cents, &e.currency)
            }),
            self.route(topics::PAYMENT_REFUNDED, |e: &PaymentRefunded| {
                payment("refunded", e.amount_cents, &e.currency)
            }),
            self.route(topics::ENROLLMENT_ACTIVATED, |e: &EnrollmentActivated| {
                let ms = e.activated_at_ms.saturating_sub(e.submitted_at_ms);
                Observation::Activation {
                    ms: u64::try_from(ms).unwrap_or(0),
                }
            }),
        ]
    }

    fn route<E: TypedEvent>(&self, topic: &str, observe: fn(&E) -> Observation) -> Route {
        let this = self.clone();
        Route::new(
            topic,
            GROUP,
            typed_with(this, move |this, e: E, msg: Message| async move {
                this.record(&msg, observe(&e)).await
            }),
        )
        // One short write each: overlapping deliveries share the store's
        // rounds, and its syncs.
        .concurrency(256)
    }

    async fn record(&self, msg: &Message, observation: Observation) -> Result<(), HandlerError> {
        let event_id = msg.event().id().to_owned();
        self.store
            .once(GROUP, event_id, move |tx: &Connection| {
                match observation {
                    Observation::Count {
                        metric,
                        label,
                        currency,
                        amount,
                    } => bump(tx, metric, label, &currency, amount)?,
                    Observation::Activation { ms } => {
                        bump(tx, ACTIVATION, "", "", ms)?;
                        if let Some(&le_ms) = ACTIVATION_BOUNDS_MS.iter().find(|&&le| ms <= le) {
                            tx.prepare_cached(
                                "INSERT INTO metrics_buckets (metric, le_ms, count) VALUES (?, ?, 1)
                                 ON CONFLICT (metric, le_ms) DO UPDATE SET count = MIN(count, 9223372036854775806) + 1",
                            )?
                            .execute(params![ACTIVATION, to_db(le_ms)])?;
                        }
                    }
                }
                Ok::<_, OutboxError>(())
            })
            .await?;
        Ok(())
    }

    /// All aggregates, read consistently (one transaction).
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] if the database cannot be read.
    pub async fn snapshot(&self) -> Result<Snapshot, OutboxError> {
        let mut tx = self.store.pool().begin().await?;
        // CAST: a column an older version overflowed holds a float, which
        // would fail to decode as an integer and lose every series.
        let counters = sqlx::query(
            "SELECT metric, label, currency, CAST(count AS INTEGER) AS count, CAST(total AS INTEGER) AS total FROM metrics_counters",
        )
        .fetch_all(&mut *tx)
        .await?;
        let buckets = sqlx::query(
            "SELECT CAST(le_ms AS INTEGER) AS le_ms, CAST(count AS INTEGER) AS count FROM metrics_buckets WHERE metric = ?",
        )
        .bind(ACTIVATION)
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;

        let mut s = Snapshot::default();
        let mut activation_sum_ms = 0_u64;
        for row in &counters {
            let metric: String = row.try_get("metric")?;
            let label: String = row.try_get("label")?;
            let currency: String = row.try_get("currency")?;
            let count = from_db(row.try_get("count")?);
            let total = from_db(row.try_get("total")?);
            let (counter, amounts) = match (metric.as_str(), label.as_str()) {
                (SUBMITTED, _) => (&mut s.submitted, Some(&mut s.submitted_amount_cents)),
                (PAYMENT, "captured") => (&mut s.captured, Some(&mut s.captured_amount_cents)),
                (PAYMENT, "declined") => (&mut s.declined, Some(&mut s.declined_amount_cents)),
                (PAYMENT, "refunded") => (&mut s.refunded, Some(&mut s.refunded_amount_cents)),
                (FRAUD_CHECK, "passed") => (&mut s.fraud_passed, None),
                (FRAUD_CHECK, "failed") => (&mut s.fraud_failed, None),
                (ACTIVATION, _) => {
                    activation_sum_ms = u64::saturating_add(activation_sum_ms, total);
                    (&mut s.activations.count, None)
                }
                // A series a later version added and this one does not know.
                _ => continue,
            };
            *counter = counter.saturating_add(count);
            if let Some(amounts) = amounts {
                let sum = amounts.entry(currency).or_default();
                *sum = sum.saturating_add(total);
            }
        }

        let mut per_bound: BTreeMap<u64, u64> = BTreeMap::new();
        for row in &buckets {
            let le_ms = from_db(row.try_get("le_ms")?);
            let n = per_bound.entry(le_ms).or_default();
            *n = n.saturating_add(from_db(row.try_get("count")?));
        }
        let mut cumulative = 0_u64;
        s.activations.buckets = ACTIVATION_BOUNDS_MS
            .iter()
            .map(|&le_ms| {
                cumulative =
                    u64::saturating_add(cumulative, per_bound.get(&le_ms).copied().unwrap_or(0));
                Bucket {
                    le_seconds: ms_to_seconds(le_ms),
                    count: cumulative,
                }
            })
            .collect();
        s.activations.sum_seconds = ms_to_seconds(activation_sum_ms);
        s.approval_ratio = ratio(s.captured, s.declined);
        s.fraud_rate = ratio(s.fraud_failed, s.fraud_passed);
        Ok(s)
    }

    /// All aggregates in the Prometheus text exposition format (version
    /// 0.0.4), ready to be appended to a `/metrics` page.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] if the database cannot be read.
    pub async fn render(&self) -> Result<String, OutboxError> {
        Ok(exposition(&self.snapshot().await?))
    }
}

fn bump(
    tx: &Connection,
    metric: &str,
    label: &str,
    currency: &str,
    amount: u64,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "INSERT INTO metrics_counters (metric, label, currency, count, total) VALUES (?, ?, ?, 1, ?)
         ON CONFLICT (metric, label, currency)
         DO UPDATE SET
             count = MIN(count, 9223372036854775806) + 1,
             total = CASE WHEN total > 9223372036854775807 - excluded.total
                          THEN 9223372036854775807
                          ELSE total + excluded.total END",
    )?
    .execute(params![metric, label, currency, to_db(amount)])?;
    Ok(())
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn exposition(s: &Snapshot) -> String {
    let mut out = String::new();

    let name = "school_payments_submitted_total";
    header(
        &mut out,
        name,
        "counter",
        "Payments submitted for enrollment.",
    );
    let _ = writeln!(out, "{name} {}", s.submitted);

    let name = "school_payments_submitted_amount_cents_total";
    header(
        &mut out,
        name,
        "counter",
        "Amount submitted for enrollment, in minor units.",
    );
    for (currency, cents) in &s.submitted_amount_cents {
        let _ = writeln!(out, "{name}{{currency=\"{}\"}} {cents}", escape(currency));
    }

    let outcomes = [
        ("captured", s.captured, &s.captured_amount_cents),
        ("declined", s.declined, &s.declined_amount_cents),
        ("refunded", s.refunded, &s.refunded_amount_cents),
    ];
    let name = "school_payments_total";
    header(
        &mut out,
        name,
        "counter",
        "Payments settled by the gateway, by outcome.",
    );
    for (outcome, count, _) in &outcomes {
        let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {count}");
    }

    let name = "school_payment_amount_cents_total";
    header(
        &mut out,
        name,
        "counter",
        "Amount settled by the gateway, in minor units, by outcome.",
    );
    for (outcome, _, amounts) in &outcomes {
        for (currency, cents) in *amounts {
            let _ = writeln!(
                out,
                "{name}{{outcome=\"{outcome}\",currency=\"{}\"}} {cents}",
                escape(currency)
            );
        }
    }

    let name = "school_fraud_checks_total";
    header(&mut out, name, "counter", "Fraud checks, by verdict.");
    let _ = writeln!(out, "{name}{{verdict=\"passed\"}} {}", s.fraud_passed);
    let _ = writeln!(out, "{name}{{verdict=\"failed\"}} {}", s.fraud_failed);

    let name = "school_payment_approval_ratio";
    header(
        &mut out,
        name,
        "gauge",
        "Captured payments over captured and declined ones; 0 when there are none.",
    );
    let _ = writeln!(out, "{name} {}", s.approval_ratio);

    let name = "school_fraud_rate";
    header(
        &mut out,
        name,
        "gauge",
        "Failed fraud checks over all fraud checks; 0 when there are none.",
    );
    let _ = writeln!(out, "{name} {}", s.fraud_rate);

    let name = "school_enrollment_activation_seconds";
    let h = &s.activations;
    header(
        &mut out,
        name,
        "histogram",
        "Time from an enrollment request to its activation, in seconds.",
    );
    for b in &h.buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {}", b.le_seconds, b.count);
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count {}", h.count);

    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_zero_without_data() {
        assert!(ratio(0, 0).abs() < f64::EPSILON);
        assert!((ratio(3, 1) - 0.75).abs() < f64::EPSILON);
        assert!((ratio(0, 4)).abs() < f64::EPSILON);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("a\nb"), r"a\nb");
    }

    #[test]
    fn an_empty_snapshot_renders_every_family() {
        let text = exposition(&Snapshot::default());
        for family in [
            "school_payments_submitted_total",
            "school_payments_submitted_amount_cents_total",
            "school_payments_total",
            "school_payment_amount_cents_total",
            "school_fraud_checks_total",
            "school_payment_approval_ratio",
            "school_fraud_rate",
            "school_enrollment_activation_seconds",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        assert!(text.contains("school_payments_total{outcome=\"refunded\"} 0\n"));
        assert!(text.contains("school_enrollment_activation_seconds_bucket{le=\"+Inf\"} 0\n"));
        assert!(text.ends_with('\n'));
    }
}
