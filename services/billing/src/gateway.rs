//! The payment-gateway port: what billing asks of whoever moves the money.

use futures::future::BoxFuture;
use school_events::CardToken;

/// A request to capture money from a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// The gateway captures at most once per key, however often it is
    /// asked; billing uses the enrollment id.
    pub idempotency_key: String,
    /// The amount in the currency's minor unit.
    pub amount_cents: u64,
    /// ISO 4217 code, upper case.
    pub currency: String,
    /// The tokenized card (never the number).
    pub card: CardToken,
    /// The card holder's name.
    pub holder: String,
}

/// A captured charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The gateway's id of the charge.
    pub charge_id: String,
    /// The amount captured, minor units.
    pub amount_cents: u64,
    /// ISO 4217 code.
    pub currency: String,
}

/// A request to give (part of) a captured charge back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    /// The gateway refunds at most once per key; billing uses
    /// `refund-<enrollment id>`.
    pub idempotency_key: String,
    /// The charge to refund.
    pub charge_id: String,
    /// How much to give back, minor units.
    pub amount_cents: u64,
}

/// A refund the gateway accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    /// The gateway's id of the refund.
    pub refund_id: String,
}

/// Why the gateway did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The gateway (or the issuer behind it) refused. Permanent: asking
    /// again gives the same answer.
    #[error("declined by the gateway ({code}): {reason}")]
    Declined {
        /// A stable code: `card_declined`, `insufficient_funds`, ….
        code: String,
        /// What to tell the student.
        reason: String,
    },
    /// No answer in time. Transient, and ambiguous: the gateway may have
    /// acted, which is why every request carries an idempotency key — the
    /// retry with the same key finds what the lost answer would have said.
    #[error("the payment gateway did not answer in time; retry with the same idempotency key")]
    Timeout,
    /// The gateway could not be reached or failed. Transient.
    #[error("the payment gateway is unavailable: {0}; retry with the same idempotency key")]
    Unavailable(String),
}

impl GatewayError {
    /// Whether asking again (with the same idempotency key) may succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Declined { .. })
    }
}

/// The port through which billing moves money.
///
/// [`SimulatedGateway`](crate::SimulatedGateway) is the default
/// implementation; a real payment provider's HTTP API plugs in behind this
/// trait without billing changing. An implementation must honour the
/// idempotency keys: a second request with a key it has already acted on
/// returns the first result and moves no money. That promise is what makes
/// retries (and redeliveries after a crash) safe.
///
/// The trait is object-safe (billing holds an `Arc<dyn PaymentGateway>`),
/// hence boxed futures rather than `async fn`.
pub trait PaymentGateway: Send + Sync + 'static {
    /// Captures `request.amount_cents` from the card, once per
    /// idempotency key.
    ///
    /// # Errors
    ///
    /// [`GatewayError::Declined`] if refused (permanent);
    /// [`GatewayError::Timeout`] or [`GatewayError::Unavailable`] if the
    /// outcome is unknown (transient: retry with the same key).
    fn charge(&self, request: ChargeRequest) -> BoxFuture<'_, Result<Charge, GatewayError>>;

    /// Refunds part or all of a captured charge, once per idempotency key.
    ///
    /// # Errors
    ///
    /// As [`PaymentGateway::charge`]; `Declined` for an unknown charge or
    /// an amount beyond what is left to refund.
    fn refund(&self, request: RefundRequest) -> BoxFuture<'_, Result<Refund, GatewayError>>;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_port_is_object_safe_and_its_futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        struct Nothing;
        impl PaymentGateway for Nothing {
            fn charge(&self, _: ChargeRequest) -> BoxFuture<'_, Result<Charge, GatewayError>> {
                Box::pin(async { Err(GatewayError::Timeout) })
            }
            fn refund(&self, _: RefundRequest) -> BoxFuture<'_, Result<Refund, GatewayError>> {
                Box::pin(async { Err(GatewayError::Unavailable("closed".into())) })
            }
        }
        let gateway: Arc<dyn PaymentGateway> = Arc::new(Nothing);
        let fut = gateway.refund(RefundRequest {
            idempotency_key: "k".into(),
            charge_id: "c".into(),
            amount_cents: 1,
        });
        assert_send(&fut);
    }

    #[test]
    fn only_a_decline_is_permanent() {
        let declined = GatewayError::Declined {
            code: "card_declined".into(),
            reason: "no".into(),
        };
        assert!(!declined.is_transient());
        assert!(GatewayError::Timeout.is_transient());
        assert!(GatewayError::Unavailable("down".into()).is_transient());
    }
}
