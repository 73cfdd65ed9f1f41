-- One row per enrollment: what billing knows about its payment.
--
-- status: `charging` (a charge was sent to the gateway and its outcome is
-- not recorded yet: repeat it with the same idempotency key), `captured`,
-- `declined`, `refunded`, or `blocked` (the fraud check failed before any
-- charge, so none will be made).
CREATE TABLE billing_payments (
    enrollment_id TEXT    PRIMARY KEY,
    status        TEXT    NOT NULL,
    amount_cents  INTEGER,
    currency      TEXT,
    last4         TEXT,
    charge_id     TEXT,
    refund_id     TEXT,
    code          TEXT,
    reason        TEXT,
    attempt       INTEGER,
    created_ms    INTEGER NOT NULL,
    updated_ms    INTEGER NOT NULL
);
