//! The billing service: each enrollment's payment charged at most once,
//! declined, or refunded, and each outcome told once.

use std::sync::Arc;

use eventos::middleware::DeadLettered;
use eventos::{Context, HandlerError, Message, ResultExt as _, Route, TypedEvent as _, typed_with};
use eventos_outbox::rusqlite::{Connection, OptionalExtension as _, params};
use eventos_outbox::{KeyLocks, OutboxError, Store, enqueue};
use school_events::{
    AcceptanceMode, FraudCheckFailed, FraudCheckPassed, PaymentCaptured, PaymentDeclined,
    PaymentDetails, PaymentRefunded, PaymentSubmitted, topics,
};
use school_http::now_ms;
use sqlx::Row as _;

use crate::config::BillingConfig;
use crate::gateway::{Charge, ChargeRequest, GatewayError, PaymentGateway, RefundRequest};
use crate::{GROUP, SOURCE};

/// The migrations of the billing database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How many deliveries each route handles at once. Gateway calls spend most
/// of their time waiting on the network, so many can be in flight: at the
/// simulated 100–300 ms a call, 128 held charges to about 640 a second,
/// under the rate enrollments are accepted at.
const ROUTE_CONCURRENCY: usize = 2048;

/// The code of a charge given up because the gateway could not be reached.
pub const GATEWAY_UNAVAILABLE: &str = "gateway_unavailable";

const GATEWAY_UNAVAILABLE_REASON: &str =
    "We could not reach the payment service to process your payment. Please try again later.";

/// Where an enrollment's payment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaymentStatus {
    /// A charge was sent to the gateway and its outcome is not recorded
    /// yet; the next attempt repeats it with the same idempotency key.
    Charging,
    /// The money was taken.
    Captured,
    /// The gateway refused, or could not be reached before billing gave up.
    Declined,
    /// The money was taken and given back.
    Refunded,
    /// The fraud check failed before any charge; none will be made.
    Blocked,
}

impl PaymentStatus {
    /// The name stored and shown: `charging`, `captured`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charging => "charging",
            Self::Captured => "captured",
            Self::Declined => "declined",
            Self::Refunded => "refunded",
            Self::Blocked => "blocked",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Self::Charging,
            Self::Captured,
            Self::Declined,
            Self::Refunded,
            Self::Blocked,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
    }
}

/// What billing knows about one enrollment's payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    /// The enrollment.
    pub enrollment_id: String,
    /// Where it stands.
    pub status: PaymentStatus,
    /// The amount asked, minor units (none when blocked before a charge).
    pub amount_cents: Option<u64>,
    /// ISO 4217 code.
    pub currency: Option<String>,
    /// The card's last four digits.
    pub last4: Option<String>,
    /// The gateway's charge, once captured.
    pub charge_id: Option<String>,
    /// The gateway's refund, once refunded.
    pub refund_id: Option<String>,
    /// The decline code, when declined.
    pub code: Option<String>,
    /// Why it was declined, refunded or blocked.
    pub reason: Option<String>,
    /// The delivery attempt that decided it.
    pub attempt: Option<u32>,
}

/// The billing service. Cloning shares it.
///
/// Build it with [`Billing::new`], consume its [`routes`](Billing::routes)
/// with a [`Router`](eventos::Router), and run a
/// [`Relay`](eventos_outbox::Relay) over its [`store`](Billing::store) so
/// the events it records are published.
#[derive(Clone)]
pub struct Billing {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    gateway: Arc<dyn PaymentGateway>,
    config: BillingConfig,
    locks: KeyLocks,
}

impl std::fmt::Debug for Billing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Billing")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn cents_to_sql(cents: u64) -> i64 {
    // Amounts beyond i64 are refused by any gateway; storing them
    // saturated keeps the row writable so the refusal can be recorded.
    i64::try_from(cents).unwrap_or(i64::MAX)
}

/// The charge a dead-lettered event asked for, if billing was to make it.
fn charge_of(event: &eventos::Event) -> Result<Option<(String, PaymentDetails)>, HandlerError> {
    let ty = event.ty();
    Ok(if ty == PaymentSubmitted::TYPE {
        let e: PaymentSubmitted = event.decode()?;
        (e.mode == AcceptanceMode::Optimistic).then_some((e.enrollment_id, e.payment))
    } else if ty == FraudCheckPassed::TYPE {
        let e: FraudCheckPassed = event.decode()?;
        (e.mode == AcceptanceMode::AwaitPayment).then_some((e.enrollment_id, e.payment))
    } else {
        None
    })
}

impl Billing {
    /// The service on `store` (its migrations are run), charging through
    /// `gateway`.
    ///
    /// # Errors
    ///
    /// If the migrations fail.
    pub async fn new(
        store: Store,
        gateway: Arc<dyn PaymentGateway>,
        config: BillingConfig,
    ) -> Result<Self, OutboxError> {
        store.migrate(&MIGRATOR).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                gateway,
                config,
                locks: KeyLocks::default(),
            }),
        })
    }

    /// The service's database (payments, outbox, inbox).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &BillingConfig {
        &self.inner.config
    }

    /// The event routes, all as group [`GROUP`], each retried per
    /// [`BillingConfig::backoff`] with every attempt limited to
    /// [`BillingConfig::attempt_timeout`]:
    ///
    /// * [`topics::PAYMENT_SUBMITTED`]: charge now if the enrollment was
    ///   accepted optimistically;
    /// * [`topics::FRAUD_PASSED`]: charge now if it awaits payment;
    /// * [`topics::FRAUD_FAILED`]: refund a captured charge, or block the
    ///   charge that has not happened yet.
    ///
    /// A charge given up after its last attempt is recorded as declined
    /// with code [`GATEWAY_UNAVAILABLE`]. A refund is never given up while
    /// it can still succeed: its dead-letter hook retries it, and if that
    /// fails too the router redelivers it later.
    pub fn routes(&self) -> Vec<Route> {
        let submitted = typed_with(self.clone(), |this, e: PaymentSubmitted, msg: Message| {
            async move {
                if e.mode != AcceptanceMode::Optimistic {
                    // Awaiting payment: charged once the fraud check passes.
                    return Ok(());
                }
                this.charge(&e.enrollment_id, &e.payment, &msg).await
            }
        });
        let passed = typed_with(self.clone(), |this, e: FraudCheckPassed, msg: Message| {
            async move {
                if e.mode != AcceptanceMode::AwaitPayment {
                    // Optimistic: charged when it was submitted.
                    return Ok(());
                }
                this.charge(&e.enrollment_id, &e.payment, &msg).await
            }
        });
        let failed = typed_with(
            self.clone(),
            |this, e: FraudCheckFailed, msg: Message| async move {
                this.fraud_failed(&e, msg.event().id()).await
            },
        );
        let charge_given_up = |route: Route| {
            let this = self.clone();
            route.on_dead_letter(move |failed: DeadLettered| {
                let this = this.clone();
                async move { this.charge_given_up(&failed).await }
            })
        };
        let refund_given_up = {
            let this = self.clone();
            move |failed: DeadLettered| {
                let this = this.clone();
                async move { this.refund_given_up(&failed).await }
            }
        };
        [
            charge_given_up(Route::new(topics::PAYMENT_SUBMITTED, GROUP, submitted)),
            charge_given_up(Route::new(topics::FRAUD_PASSED, GROUP, passed)),
            Route::new(topics::FRAUD_FAILED, GROUP, failed).on_dead_letter(refund_given_up),
        ]
        .into_iter()
        .map(|route| {
            route
                .retry(self.inner.config.backoff())
                .timeout(self.inner.config.attempt_timeout())
                .concurrency(ROUTE_CONCURRENCY)
        })
        .collect()
    }

    /// What billing knows about `enrollment_id`'s payment.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`].
    pub async fn payment(&self, enrollment_id: &str) -> Result<Option<Payment>, OutboxError> {
        let row = sqlx::query(
            "SELECT status, amount_cents, currency, last4, charge_id, refund_id, code, reason, attempt
             FROM billing_payments WHERE enrollment_id = ?",
        )
        .bind(enrollment_id)
        .fetch_optional(self.inner.store.pool())
        .await?;
        Ok(row.and_then(|r| {
            Some(Payment {
                enrollment_id: enrollment_id.to_owned(),
                status: PaymentStatus::parse(r.get("status"))?,
                amount_cents: r
                    .get::<Option<i64>, _>("amount_cents")
                    .and_then(|a| u64::try_from(a).ok()),
                currency: r.get("currency"),
                last4: r.get("last4"),
                charge_id: r.get("charge_id"),
                refund_id: r.get("refund_id"),
                code: r.get("code"),
                reason: r.get("reason"),
                attempt: r
                    .get::<Option<i64>, _>("attempt")
                    .and_then(|a| u32::try_from(a).ok()),
            })
        }))
    }

    /// Charges `payment` for `enrollment_id` unless its payment already
    /// has an outcome, and records the outcome with `msg` in the inbox.
    async fn charge(
        &self,
        enrollment_id: &str,
        payment: &PaymentDetails,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        let inner = &*self.inner;
        let _turn = inner.locks.lock(enrollment_id).await;
        let last4 = payment.card.last4.as_str();
        let attempt = msg.attempt();
        if !self.claim(enrollment_id, payment).await.transient()? {
            tracing::debug!(enrollment_id, "payment already decided; nothing to charge");
            return Ok(());
        }
        let request = ChargeRequest {
            // The enrollment id, not anything per attempt: a retry after a
            // lost answer, a timeout or a crash asks for the same charge,
            // and the gateway returns the one it already made.
            idempotency_key: enrollment_id.to_owned(),
            amount_cents: payment.amount_cents,
            currency: payment.currency.clone(),
            card: payment.card.clone(),
            holder: payment.holder.clone(),
        };
        match inner.gateway.charge(request).await {
            Ok(charge) => self.captured(enrollment_id, last4, &charge, msg).await,
            Err(GatewayError::Declined { code, reason }) => {
                self.declined(enrollment_id, payment, &code, &reason, msg)
                    .await
            }
            Err(e) => {
                tracing::warn!(enrollment_id, last4, attempt, error = %e, "charge outcome unknown; it will be retried with the same idempotency key");
                Err(HandlerError::transient(e))
            }
        }
    }

    /// Marks the payment `charging` unless it already has an outcome;
    /// returns whether to charge. The mark is committed before the gateway
    /// is called so that a fraud verdict arriving meanwhile (or after a
    /// crash) knows a charge may exist and waits for it.
    async fn claim(
        &self,
        enrollment_id: &str,
        payment: &PaymentDetails,
    ) -> Result<bool, OutboxError> {
        let now = now_ms();
        let enrollment_id = enrollment_id.to_owned();
        let amount = cents_to_sql(payment.amount_cents);
        let currency = payment.currency.clone();
        let last4 = payment.card.last4.clone();
        let status: String = self
            .inner
            .store
            .write(move |tx: &Connection| {
                tx.prepare_cached(
                    "INSERT INTO billing_payments (enrollment_id, status, amount_cents, currency, last4, created_ms, updated_ms)
                     VALUES (?, 'charging', ?, ?, ?, ?, ?)
                     ON CONFLICT (enrollment_id) DO NOTHING",
                )?
                .execute(params![enrollment_id, amount, currency, last4, now, now])?;
                let status = tx
                    .prepare_cached("SELECT status FROM billing_payments WHERE enrollment_id = ?")?
                    .query_row(params![enrollment_id], |r| r.get::<_, String>(0))?;
                Ok::<_, OutboxError>(status)
            })
            .await?;
        Ok(status == PaymentStatus::Charging.as_str())
    }

    async fn captured(
        &self,
        enrollment_id: &str,
        last4: &str,
        charge: &Charge,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        let attempt = msg.attempt();
        let event = Context::new_event(
            SOURCE,
            &PaymentCaptured {
                enrollment_id: enrollment_id.to_owned(),
                charge_id: charge.charge_id.clone(),
                amount_cents: charge.amount_cents,
                currency: charge.currency.clone(),
                attempt,
            },
        )?;
        let event_id = msg.event().id().to_owned();
        let id = enrollment_id.to_owned();
        let charge = charge.clone();
        let recorded = self
            .inner
            .store
            .once(GROUP, event_id, move |tx: &Connection| {
                let updated = tx
                    .prepare_cached(
                        "UPDATE billing_payments
                     SET status = 'captured', charge_id = ?, amount_cents = ?, currency = ?, attempt = ?, updated_ms = ?
                     WHERE enrollment_id = ? AND status = 'charging'",
                    )?
                    .execute(params![
                        charge.charge_id,
                        cents_to_sql(charge.amount_cents),
                        charge.currency,
                        attempt,
                        now_ms(),
                        id
                    ])?;
                if updated == 0 {
                    // Another billing process sharing this database
                    // recorded the outcome first; the gateway gave it the
                    // same charge.
                    return Ok(false);
                }
                enqueue(tx, topics::PAYMENT_CAPTURED, &event)?;
                Ok::<_, OutboxError>(true)
            })
            .await?
            .unwrap_or(false);
        if recorded {
            tracing::info!(enrollment_id, last4, attempt, "payment captured");
        } else {
            tracing::debug!(enrollment_id, "capture already recorded");
        }
        Ok(())
    }

    async fn declined(
        &self,
        enrollment_id: &str,
        payment: &PaymentDetails,
        code: &str,
        reason: &str,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        let attempt = msg.attempt();
        let event = Context::new_event(
            SOURCE,
            &PaymentDeclined {
                enrollment_id: enrollment_id.to_owned(),
                code: code.to_owned(),
                reason: reason.to_owned(),
                amount_cents: payment.amount_cents,
                currency: payment.currency.clone(),
                attempt,
            },
        )?;
        let event_id = msg.event().id().to_owned();
        let (id, code_, reason) = (enrollment_id.to_owned(), code.to_owned(), reason.to_owned());
        let recorded = self
            .inner
            .store
            .once(GROUP, event_id, move |tx: &Connection| {
                let updated = tx
                    .prepare_cached(
                        "UPDATE billing_payments
                     SET status = 'declined', code = ?, reason = ?, attempt = ?, updated_ms = ?
                     WHERE enrollment_id = ? AND status = 'charging'",
                    )?
                    .execute(params![code_, reason, attempt, now_ms(), id])?;
                if updated == 0 {
                    return Ok(false);
                }
                enqueue(tx, topics::PAYMENT_DECLINED, &event)?;
                Ok::<_, OutboxError>(true)
            })
            .await?
            .unwrap_or(false);
        if !recorded {
            return Ok(());
        }
        tracing::info!(
            enrollment_id,
            last4 = %payment.card.last4,
            code,
            attempt,
            "payment declined"
        );
        Ok(())
    }

    /// The dead-letter hook of the charge routes: the charge is recorded
    /// as declined ([`GATEWAY_UNAVAILABLE`]) and `PaymentDeclined` is
    /// enqueued, once, unless the payment already has an outcome.
    async fn charge_given_up(&self, failed: &DeadLettered) -> Result<(), HandlerError> {
        let (enrollment_id, payment) = match charge_of(&failed.event) {
            Ok(Some(charge)) => charge,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(event = %failed.event.id(), error = %e, "dead-lettered billing event does not decode; no payment to decline");
                return Ok(());
            }
        };
        let _turn = self.inner.locks.lock(&enrollment_id).await;
        let attempt = failed.info.attempt;
        let event = Context::new_event(
            SOURCE,
            &PaymentDeclined {
                enrollment_id: enrollment_id.clone(),
                code: GATEWAY_UNAVAILABLE.to_owned(),
                reason: GATEWAY_UNAVAILABLE_REASON.to_owned(),
                amount_cents: payment.amount_cents,
                currency: payment.currency.clone(),
                attempt,
            },
        )?;
        let id = enrollment_id.clone();
        let last4 = payment.card.last4.clone();
        let declined = self
            .inner
            .store
            .write(move |tx: &Connection| {
                let status: Option<String> = tx
                    .prepare_cached("SELECT status FROM billing_payments WHERE enrollment_id = ?")?
                    .query_row(params![id], |r| r.get(0))
                    .optional()?;
                if status.is_some_and(|s| s != PaymentStatus::Charging.as_str()) {
                    return Ok(false);
                }
                let now = now_ms();
                tx.prepare_cached(
                    "INSERT INTO billing_payments (enrollment_id, status, amount_cents, currency, last4, code, reason, attempt, created_ms, updated_ms)
                     VALUES (?, 'declined', ?, ?, ?, ?, ?, ?, ?, ?)
                     ON CONFLICT (enrollment_id) DO UPDATE SET
                        status = 'declined', code = excluded.code, reason = excluded.reason,
                        attempt = excluded.attempt, updated_ms = excluded.updated_ms",
                )?
                .execute(params![
                    id,
                    cents_to_sql(payment.amount_cents),
                    payment.currency,
                    payment.card.last4,
                    GATEWAY_UNAVAILABLE,
                    GATEWAY_UNAVAILABLE_REASON,
                    attempt,
                    now,
                    now
                ])?;
                enqueue(tx, topics::PAYMENT_DECLINED, &event)?;
                Ok::<_, OutboxError>(true)
            })
            .await?;
        if !declined {
            return Ok(());
        }
        tracing::warn!(
            enrollment_id = %enrollment_id,
            last4 = %last4,
            code = GATEWAY_UNAVAILABLE,
            attempts = attempt,
            reason = %failed.reason,
            "charge given up; payment declined"
        );
        Ok(())
    }

    /// The fraud check failed: refund what was captured, or make sure
    /// nothing will be.
    async fn fraud_failed(&self, e: &FraudCheckFailed, event_id: &str) -> Result<(), HandlerError> {
        let enrollment_id = e.enrollment_id.as_str();
        let _turn = self.inner.locks.lock(enrollment_id).await;
        let reason = if e.reasons.is_empty() {
            format!("the fraud check failed (score {})", e.score)
        } else {
            e.reasons.join("; ")
        };
        let payment = self.payment(enrollment_id).await.transient()?;
        match payment {
            None => self.block(enrollment_id, &reason, event_id).await,
            Some(p) => match p.status {
                PaymentStatus::Charging => Err(HandlerError::transient(
                    "a charge for this enrollment is in flight; the fraud verdict waits for its outcome",
                )),
                PaymentStatus::Captured => self.refund(&p, &reason, event_id).await,
                PaymentStatus::Declined | PaymentStatus::Refunded | PaymentStatus::Blocked => {
                    tracing::debug!(
                        enrollment_id,
                        status = p.status.as_str(),
                        "nothing to refund"
                    );
                    Ok(())
                }
            },
        }
    }

    async fn block(
        &self,
        enrollment_id: &str,
        reason: &str,
        event_id: &str,
    ) -> Result<(), HandlerError> {
        let (event_id, id, reason) = (
            event_id.to_owned(),
            enrollment_id.to_owned(),
            reason.to_owned(),
        );
        let blocked = self
            .inner
            .store
            .once(GROUP, event_id, move |tx: &Connection| {
                let now = now_ms();
                let inserted = tx
                    .prepare_cached(
                        "INSERT INTO billing_payments (enrollment_id, status, reason, created_ms, updated_ms)
                     VALUES (?, 'blocked', ?, ?, ?)
                     ON CONFLICT (enrollment_id) DO NOTHING",
                    )
                    .transient()?
                    .execute(params![id, reason, now, now])
                    .transient()?;
                if inserted == 0 {
                    // Another process started a charge since we looked;
                    // decide again on the next attempt, against what it
                    // recorded (the inbox entry rolls back with this).
                    return Err(HandlerError::transient(
                        "the payment changed while the fraud verdict was applied; it is applied again",
                    ));
                }
                Ok(true)
            })
            .await?
            .unwrap_or(false);
        if !blocked {
            return Ok(());
        }
        tracing::info!(
            enrollment_id,
            "fraud check failed before any charge; none will be made"
        );
        Ok(())
    }

    async fn refund(
        &self,
        payment: &Payment,
        reason: &str,
        event_id: &str,
    ) -> Result<(), HandlerError> {
        let enrollment_id = payment.enrollment_id.as_str();
        let last4 = payment.last4.as_deref().unwrap_or("");
        let (Some(charge_id), Some(amount_cents), Some(currency)) = (
            payment.charge_id.as_deref(),
            payment.amount_cents,
            payment.currency.as_deref(),
        ) else {
            return Err(HandlerError::permanent(
                "a captured payment without its charge id, amount or currency; check the billing database",
            ));
        };
        let request = RefundRequest {
            idempotency_key: format!("refund-{enrollment_id}"),
            charge_id: charge_id.to_owned(),
            amount_cents,
        };
        let refund = match self.inner.gateway.refund(request).await {
            Ok(refund) => refund,
            Err(e) if e.is_transient() => {
                tracing::warn!(enrollment_id, last4, error = %e, "refund outcome unknown; it will be retried with the same idempotency key");
                return Err(HandlerError::transient(e));
            }
            Err(e) => {
                tracing::error!(enrollment_id, last4, error = %e, "the gateway refused the refund; refund it by hand");
                return Err(HandlerError::permanent(e));
            }
        };
        let event = Context::new_event(
            SOURCE,
            &PaymentRefunded {
                enrollment_id: enrollment_id.to_owned(),
                charge_id: charge_id.to_owned(),
                amount_cents,
                currency: currency.to_owned(),
                reason: reason.to_owned(),
            },
        )?;
        let (event_id, id, reason) = (
            event_id.to_owned(),
            enrollment_id.to_owned(),
            reason.to_owned(),
        );
        let refunded = self
            .inner
            .store
            .once(GROUP, event_id, move |tx: &Connection| {
                let updated = tx
                    .prepare_cached(
                        "UPDATE billing_payments SET status = 'refunded', refund_id = ?, reason = ?, updated_ms = ?
                     WHERE enrollment_id = ? AND status = 'captured'",
                    )?
                    .execute(params![refund.refund_id, reason, now_ms(), id])?;
                if updated == 0 {
                    return Ok(false);
                }
                enqueue(tx, topics::PAYMENT_REFUNDED, &event)?;
                Ok::<_, OutboxError>(true)
            })
            .await?
            .unwrap_or(false);
        if !refunded {
            return Ok(());
        }
        tracing::info!(
            enrollment_id,
            last4,
            "payment refunded after a failed fraud check"
        );
        Ok(())
    }

    /// The dead-letter hook of the fraud route. Money taken from a card
    /// the fraud check refused must go back, so the verdict is applied
    /// once more; if that fails transiently too, the hook fails and the
    /// router redelivers the event later (at most 30 s apart) instead of
    /// dropping the refund. Only a refusal by the gateway ends it, logged
    /// for a person to act on.
    async fn refund_given_up(&self, failed: &DeadLettered) -> Result<(), HandlerError> {
        let Ok(e) = failed.event.decode::<FraudCheckFailed>() else {
            tracing::warn!(event = %failed.event.id(), "dead-lettered fraud verdict does not decode; nothing to refund");
            return Ok(());
        };
        match self.fraud_failed(&e, failed.event.id()).await {
            Err(err) if err.is_transient() => Err(err),
            Err(err) => {
                tracing::error!(enrollment_id = %e.enrollment_id, error = %err, "fraud verdict could not be applied; check the payment by hand");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }
}
