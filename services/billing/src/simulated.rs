//! A payment gateway that moves no real money but keeps a real ledger.

use std::path::Path;
use std::time::Duration;

use eventos_outbox::rusqlite::{self, Connection, OptionalExtension as _, params};
use eventos_outbox::{OutboxError, Store};
use futures::future::BoxFuture;
use rand::Rng as _;
use school_events::CardToken;
use school_http::now_ms;
use sqlx::Row as _;

use crate::gateway::{Charge, ChargeRequest, GatewayError, PaymentGateway, Refund, RefundRequest};
use crate::test_cards;

const SCHEMA: &[&str] = &[
    // One row per idempotency key that captured money.
    "CREATE TABLE IF NOT EXISTS gateway_charges (
        idempotency_key TEXT    PRIMARY KEY,
        charge_id       TEXT    NOT NULL UNIQUE,
        amount_cents    INTEGER NOT NULL,
        currency        TEXT    NOT NULL,
        bin             TEXT    NOT NULL,
        last4           TEXT    NOT NULL,
        refunded_cents  INTEGER NOT NULL DEFAULT 0,
        created_ms      INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS gateway_refunds (
        idempotency_key TEXT    PRIMARY KEY,
        refund_id       TEXT    NOT NULL UNIQUE,
        charge_id       TEXT    NOT NULL REFERENCES gateway_charges (charge_id),
        amount_cents    INTEGER NOT NULL,
        created_ms      INTEGER NOT NULL
    )",
    // Every call, answered or not, per operation and key.
    "CREATE TABLE IF NOT EXISTS gateway_calls (
        operation       TEXT    NOT NULL,
        idempotency_key TEXT    NOT NULL,
        calls           INTEGER NOT NULL,
        PRIMARY KEY (operation, idempotency_key)
    )",
    // Append-only: one row each time money is captured. It is not keyed,
    // so a broken idempotency check would show here as a second row for a
    // key rather than be hidden by a primary key.
    "CREATE TABLE IF NOT EXISTS gateway_captures (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        idempotency_key TEXT    NOT NULL,
        charge_id       TEXT    NOT NULL,
        amount_cents    INTEGER NOT NULL,
        at_ms           INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS gateway_captures_key ON gateway_captures (idempotency_key)",
];

/// A charge as the simulated gateway's ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerCharge {
    /// The key it was captured under (billing: the enrollment id).
    pub idempotency_key: String,
    /// The gateway's id of the charge.
    pub charge_id: String,
    /// Amount captured, minor units.
    pub amount_cents: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// The card's last four digits.
    pub last4: String,
    /// Whether any of it was refunded.
    pub refunded: bool,
    /// How much was refunded, minor units.
    pub refunded_cents: u64,
}

/// A refund as the simulated gateway's ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRefund {
    /// The key it was made under (billing: `refund-<enrollment id>`).
    pub idempotency_key: String,
    /// The gateway's id of the refund.
    pub refund_id: String,
    /// The charge refunded.
    pub charge_id: String,
    /// Amount refunded, minor units.
    pub amount_cents: u64,
}

/// The default [`PaymentGateway`]: answers by [test card](crate::test_cards)
/// after a random latency, and keeps its ledger in its own SQLite file.
///
/// The ledger is what makes it honour idempotency keys as a real gateway
/// does: a charge whose key already captured returns that charge and adds
/// no money, also after a restart and across processes sharing the file
/// (WAL mode, a busy timeout, and each decision taken in one write
/// transaction). Cloning shares it.
#[derive(Debug, Clone)]
pub struct SimulatedGateway {
    store: Store,
    latency_ms: [u64; 2],
}

enum Script {
    Approve,
    Decline(&'static str, &'static str),
    TimeoutFirst(i64),
}

fn script(card: &CardToken) -> Script {
    let is = |number: &str| {
        card.bin == test_cards::bin(number) && card.last4 == test_cards::last4(number)
    };
    if is(test_cards::DECLINED) {
        Script::Decline(
            "card_declined",
            "Your card was declined. Please use another card or contact your bank.",
        )
    } else if is(test_cards::INSUFFICIENT_FUNDS) {
        Script::Decline(
            "insufficient_funds",
            "Your card has insufficient funds. Please use another card.",
        )
    } else if is(test_cards::TIMEOUT_TWICE) {
        Script::TimeoutFirst(2)
    } else {
        Script::Approve
    }
}

fn unavailable(e: &OutboxError) -> GatewayError {
    GatewayError::Unavailable(format!("the simulated gateway's ledger failed: {e}"))
}

fn declined(code: &str, reason: &str) -> GatewayError {
    GatewayError::Declined {
        code: code.into(),
        reason: reason.into(),
    }
}

/// A ledger row, in [`CHARGE_COLUMNS`]' order.
fn ledger_charge(row: &rusqlite::Row<'_>) -> rusqlite::Result<LedgerCharge> {
    let cents = |i: usize| row.get::<_, i64>(i).map(|c| u64::try_from(c).unwrap_or(0));
    let refunded_cents = cents(5)?;
    Ok(LedgerCharge {
        idempotency_key: row.get(0)?,
        charge_id: row.get(1)?,
        amount_cents: cents(2)?,
        currency: row.get(3)?,
        last4: row.get(4)?,
        refunded: refunded_cents > 0,
        refunded_cents,
    })
}

const CHARGE_COLUMNS: &str =
    "idempotency_key, charge_id, amount_cents, currency, last4, refunded_cents";

impl SimulatedGateway {
    /// Opens (creating if needed) the ledger at `path` — for example
    /// `<data-dir>/gateway.db`; its directory must exist. Each call waits a
    /// uniformly random `latency_ms[0]..=latency_ms[1]` milliseconds first,
    /// as a network round trip would (`[0, 0]` in tests).
    ///
    /// # Errors
    ///
    /// If the file cannot be opened or its tables created.
    pub async fn open(path: &Path, latency_ms: [u64; 2]) -> Result<Self, OutboxError> {
        // A store of its own, so concurrent charges share commits as the
        // services' writes do: a ledger that paid one sync per charge
        // held every enrollment to the disk's sync rate.
        let store = Store::open(path).await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(store.pool()).await?;
        }
        let [low, high] = latency_ms;
        Ok(Self {
            store,
            latency_ms: [low.min(high), low.max(high)],
        })
    }

    async fn latency(&self) {
        let [low, high] = self.latency_ms;
        let ms = if low == high {
            low
        } else {
            rand::rng().random_range(low..=high)
        };
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    fn count_call(tx: &Connection, operation: &str, key: &str) -> rusqlite::Result<i64> {
        tx.prepare_cached(
            "INSERT INTO gateway_calls (operation, idempotency_key, calls) VALUES (?, ?, 1)
             ON CONFLICT (operation, idempotency_key) DO UPDATE SET calls = calls + 1
             RETURNING calls",
        )?
        .query_row(params![operation, key], |r| r.get(0))
    }

    async fn charge_now(&self, request: ChargeRequest) -> Result<Charge, GatewayError> {
        self.latency().await;
        // The call is counted whatever its answer: the write commits its
        // count and, for an approval, the charge; a refusal is its value.
        self.store
            .write(move |tx: &Connection| Ok::<_, OutboxError>(Self::charge_in(tx, request)?))
            .await
            .map_err(|e| unavailable(&e))?
    }

    /// The charge's ledger work, in the caller's transaction, which holds
    /// the write lock from its start: two processes charging one key take
    /// turns and the second finds the first's charge.
    fn charge_in(
        tx: &Connection,
        request: ChargeRequest,
    ) -> rusqlite::Result<Result<Charge, GatewayError>> {
        let key = request.idempotency_key.as_str();
        let calls = Self::count_call(tx, "charge", key)?;
        let existing = tx
            .prepare_cached(&format!(
                "SELECT {CHARGE_COLUMNS} FROM gateway_charges WHERE idempotency_key = ?"
            ))?
            .query_row([key], ledger_charge)
            .optional()?;
        if let Some(charge) = existing {
            return Ok(Ok(Charge {
                charge_id: charge.charge_id,
                amount_cents: charge.amount_cents,
                currency: charge.currency,
            }));
        }
        let outcome = match script(&request.card) {
            Script::Decline(code, reason) => Err(declined(code, reason)),
            Script::TimeoutFirst(n) if calls <= n => Err(GatewayError::Timeout),
            Script::TimeoutFirst(_) | Script::Approve => Ok(()),
        };
        let amount = outcome.and_then(|()| {
            i64::try_from(request.amount_cents)
                .ok()
                .filter(|&a| a > 0)
                .ok_or_else(|| {
                    declined(
                        "invalid_amount",
                        "The amount to charge is not valid. Please contact the school.",
                    )
                })
        });
        let amount = match amount {
            Ok(amount) => amount,
            // The call is counted even though nothing is captured.
            Err(e) => return Ok(Err(e)),
        };
        let charge_id = format!("ch_{}", uuid::Uuid::now_v7().simple());
        let now = now_ms();
        tx.prepare_cached(
            "INSERT INTO gateway_charges (idempotency_key, charge_id, amount_cents, currency, bin, last4, created_ms)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )?
        .execute(params![
            key,
            charge_id,
            amount,
            request.currency,
            request.card.bin,
            request.card.last4,
            now
        ])?;
        tx.prepare_cached(
            "INSERT INTO gateway_captures (idempotency_key, charge_id, amount_cents, at_ms) VALUES (?, ?, ?, ?)",
        )?
        .execute(params![key, charge_id, amount, now])?;
        Ok(Ok(Charge {
            charge_id,
            amount_cents: request.amount_cents,
            currency: request.currency,
        }))
    }

    async fn refund_now(&self, request: RefundRequest) -> Result<Refund, GatewayError> {
        self.latency().await;
        self.store
            .write(move |tx: &Connection| Ok::<_, OutboxError>(Self::refund_in(tx, &request)?))
            .await
            .map_err(|e| unavailable(&e))?
    }

    fn refund_in(
        tx: &Connection,
        request: &RefundRequest,
    ) -> rusqlite::Result<Result<Refund, GatewayError>> {
        let key = request.idempotency_key.as_str();
        Self::count_call(tx, "refund", key)?;
        let existing: Option<String> = tx
            .prepare_cached("SELECT refund_id FROM gateway_refunds WHERE idempotency_key = ?")?
            .query_row([key], |r| r.get(0))
            .optional()?;
        if let Some(refund_id) = existing {
            return Ok(Ok(Refund { refund_id }));
        }
        let charge = tx
            .prepare_cached(&format!(
                "SELECT {CHARGE_COLUMNS} FROM gateway_charges WHERE charge_id = ?"
            ))?
            .query_row([&request.charge_id], ledger_charge)
            .optional()?;
        let refusal = match &charge {
            None => Some(declined(
                "no_such_charge",
                "There is no such charge to refund.",
            )),
            Some(c)
                if request.amount_cents == 0
                    || request.amount_cents > c.amount_cents.saturating_sub(c.refunded_cents) =>
            {
                Some(declined(
                    "invalid_refund_amount",
                    "The refund is more than what is left of the charge.",
                ))
            }
            Some(_) => None,
        };
        if let Some(refusal) = refusal {
            return Ok(Err(refusal));
        }
        // Checked above: at most the charge's amount, which fits in i64.
        let amount = i64::try_from(request.amount_cents).unwrap_or(i64::MAX);
        let refund_id = format!("re_{}", uuid::Uuid::now_v7().simple());
        tx.prepare_cached(
            "INSERT INTO gateway_refunds (idempotency_key, refund_id, charge_id, amount_cents, created_ms)
             VALUES (?, ?, ?, ?, ?)",
        )?
        .execute(params![key, refund_id, request.charge_id, amount, now_ms()])?;
        tx.prepare_cached(
            "UPDATE gateway_charges SET refunded_cents = refunded_cents + ? WHERE charge_id = ?",
        )?
        .execute(params![amount, request.charge_id])?;
        Ok(Ok(Refund { refund_id }))
    }

    /// Every charge captured, oldest first.
    ///
    /// # Errors
    ///
    /// If the ledger cannot be read.
    pub async fn ledger(&self) -> Result<Vec<LedgerCharge>, OutboxError> {
        self.store
            .read(|c: &Connection| {
                let rows = c
                    .prepare_cached(&format!(
                        "SELECT {CHARGE_COLUMNS} FROM gateway_charges ORDER BY created_ms, rowid"
                    ))?
                    .query_map([], ledger_charge)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
    }

    /// The charge captured under `idempotency_key`, if any.
    ///
    /// # Errors
    ///
    /// If the ledger cannot be read.
    pub async fn charge_for(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<LedgerCharge>, OutboxError> {
        let key = idempotency_key.to_owned();
        self.store
            .read(move |c: &Connection| {
                Ok(c.prepare_cached(&format!(
                    "SELECT {CHARGE_COLUMNS} FROM gateway_charges WHERE idempotency_key = ?"
                ))?
                .query_row([key], ledger_charge)
                .optional()?)
            })
            .await
    }

    /// Every refund made, oldest first.
    ///
    /// # Errors
    ///
    /// If the ledger cannot be read.
    pub async fn refunds(&self) -> Result<Vec<LedgerRefund>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT idempotency_key, refund_id, charge_id, amount_cents FROM gateway_refunds ORDER BY created_ms, rowid",
        )
        .fetch_all(self.store.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|row| LedgerRefund {
                idempotency_key: row.get("idempotency_key"),
                refund_id: row.get("refund_id"),
                charge_id: row.get("charge_id"),
                amount_cents: u64::try_from(row.get::<i64, _>("amount_cents")).unwrap_or(0),
            })
            .collect())
    }

    /// How many times money was captured under `idempotency_key`, counted
    /// from the append-only capture journal. More than 1 would be a double
    /// charge.
    ///
    /// # Errors
    ///
    /// If the ledger cannot be read.
    pub async fn captures(&self, idempotency_key: &str) -> Result<u64, sqlx::Error> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM gateway_captures WHERE idempotency_key = ?")
                .bind(idempotency_key)
                .fetch_one(self.store.pool())
                .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The most captures under any one key (0 for an empty ledger): the
    /// "no double charge" check is that this is at most 1.
    ///
    /// # Errors
    ///
    /// If the ledger cannot be read.
    pub async fn max_captures_per_key(&self) -> Result<u64, sqlx::Error> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM gateway_captures GROUP BY idempotency_key)",
        )
        .fetch_one(self.store.pool())
        .await?;
        Ok(n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
    }

    /// How many charge calls were made with `idempotency_key`, whatever
    /// their answer.
    ///
    /// # Errors
    ///
    /// If the ledger cannot be read.
    pub async fn charge_calls(&self, idempotency_key: &str) -> Result<u64, sqlx::Error> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT calls FROM gateway_calls WHERE operation = 'charge' AND idempotency_key = ?",
        )
        .bind(idempotency_key)
        .fetch_optional(self.store.pool())
        .await?;
        Ok(n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
    }
}

impl PaymentGateway for SimulatedGateway {
    fn charge(&self, request: ChargeRequest) -> BoxFuture<'_, Result<Charge, GatewayError>> {
        Box::pin(self.charge_now(request))
    }

    fn refund(&self, request: RefundRequest) -> BoxFuture<'_, Result<Refund, GatewayError>> {
        Box::pin(self.refund_now(request))
    }
}
