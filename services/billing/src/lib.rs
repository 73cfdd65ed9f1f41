//! Billing: charges through a payment-gateway port, idempotently, and
//! refunds on a late fraud signal.
//!
//! Billing takes the money for an enrollment and says how it went:
//! [`PaymentCaptured`](school_events::PaymentCaptured),
//! [`PaymentDeclined`](school_events::PaymentDeclined) or, when a capture
//! has to be given back, [`PaymentRefunded`](school_events::PaymentRefunded).
//! When it charges depends on how the enrollment was accepted:
//!
//! | event | [`AwaitPayment`](school_events::AcceptanceMode::AwaitPayment) | [`Optimistic`](school_events::AcceptanceMode::Optimistic) |
//! |---|---|---|
//! | `PaymentSubmitted` | nothing (the fraud check comes first) | charge |
//! | `FraudCheckPassed` | charge | nothing (already charged) |
//! | `FraudCheckFailed` | block: no charge will be made | refund the capture, or block the charge not made yet |
//!
//! The crate names no transport: it takes a [`Store`](eventos_outbox::Store)
//! for its database and a [`PaymentGateway`], and gives back
//! [routes](Billing::routes); the binary wires them.
//!
//! ```no_run
//! # async fn wiring(transport: std::sync::Arc<dyn eventos::Transport>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use std::sync::Arc;
//! use school_billing::{Billing, BillingConfig, SimulatedGateway};
//!
//! let config = BillingConfig::default();
//! let data = Path::new("/var/lib/school");
//! let gateway = SimulatedGateway::open(&data.join("gateway.db"), config.gateway_latency_ms).await?;
//! let store = eventos_outbox::Store::open(&data.join("billing.db")).await?;
//! let billing = Billing::new(store, Arc::new(gateway), config).await?;
//! let relay = eventos_outbox::Relay::new(billing.store().clone(), transport.clone());
//! tokio::spawn(relay.run(eventos::shutdown_signal()));
//! billing
//!     .routes()
//!     .into_iter()
//!     .fold(eventos::Router::new(transport), eventos::Router::route)
//!     .run(eventos::shutdown_signal())
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # The decisions that shaped it
//!
//! * **A port for the gateway.** Billing moves money only through the
//!   [`PaymentGateway`] trait: `charge` and `refund`, each with an
//!   idempotency key, answering a typed [`GatewayError`] — `Declined` is
//!   permanent (recorded and told at once), `Timeout` and `Unavailable` are
//!   transient (retried with backoff). A real provider's HTTP API would be
//!   one more implementation of the trait; none is built here. The default
//!   is the [`SimulatedGateway`], which answers by [`test_cards`] and keeps
//!   a real ledger in its own SQLite file, so idempotency is exercised, not
//!   assumed.
//! * **The idempotency key is the enrollment id.** Not a fresh id per
//!   attempt: every attempt to charge one enrollment asks the gateway for
//!   the same charge. That is what rules out a double charge in the one
//!   window no local transaction can close — the gateway captured, and
//!   billing crashed (or timed out, or lost its database) before it
//!   committed the capture. The redelivered event charges again with the
//!   same key and the gateway answers with the charge it already made.
//!   Refunds use `refund-<enrollment id>` the same way.
//! * **One transaction per outcome.** The payment row, the inbox row of
//!   the event (keyed by event id) and the outgoing event are committed
//!   together through the outbox, so an outcome is never recorded without
//!   being told, nor told twice.
//! * **A charge in flight is visible.** Before the gateway is called the
//!   payment is marked `charging` (committed), and deliveries about one
//!   enrollment take turns in the process. A fraud verdict that finds
//!   `charging` — after a crash, or from another process — waits (a
//!   transient error) for the charge's outcome instead of guessing.
//! * **Compensation by refund.** Optimistic acceptance charges before the
//!   fraud check ends. A failed check then refunds the capture and emits
//!   `PaymentRefunded` with the check's reasons; if it arrives before the
//!   charge, the payment is marked `blocked` and the charge, when its event
//!   comes, does nothing. A refund is never dropped while it might still
//!   succeed (see [`Billing::routes`]).
//! * **Giving up is an outcome.** When a charge's retries are exhausted
//!   the dead-letter hook records it declined with code
//!   [`GATEWAY_UNAVAILABLE`] and emits `PaymentDeclined`, once; if its
//!   database write fails, the router retries the delivery. With a real
//!   gateway, a final *timeout* leaves it unknown whether the money was
//!   taken; reconciling against the provider's settlement report is the
//!   remedy, and is outside this crate.
//! * **No card numbers.** Billing sees only the [`CardToken`] (BIN, last
//!   four, keyed fingerprint). Logs name the enrollment id, the last four
//!   and a decline code — never the holder's name.
//!
//! # Test cards
//!
//! The [`SimulatedGateway`] decides by BIN and last four (see
//! [`test_cards`] for the constants):
//!
//! | number | answer |
//! |---|---|
//! | `4242 4242 4242 4242` | approved |
//! | `4000 0000 0000 0002` | declined, `card_declined` |
//! | `4000 0000 0000 9995` | declined, `insufficient_funds` |
//! | `4000 0000 0000 0119` | `Timeout` on the first two calls for an idempotency key, then approved |
//! | `4100 0000 0000 0019` | approved (the anti-fraud deny-listed card: charged optimistically, then refunded) |
//! | any other | approved |
//!
//! No feature flags.
//!
//! [`CardToken`]: school_events::CardToken

mod billing;
mod config;
mod gateway;
mod simulated;
pub mod test_cards;

pub use billing::{Billing, GATEWAY_UNAVAILABLE, MIGRATOR, Payment, PaymentStatus};
pub use config::BillingConfig;
pub use gateway::{Charge, ChargeRequest, GatewayError, PaymentGateway, Refund, RefundRequest};
pub use simulated::{LedgerCharge, LedgerRefund, SimulatedGateway};

/// The CloudEvents `source` of events this service emits.
pub const SOURCE: &str = "/school/billing";

/// The consumer group of this service, on every topic it consumes; also its
/// inbox consumer name.
pub const GROUP: &str = "billing";
