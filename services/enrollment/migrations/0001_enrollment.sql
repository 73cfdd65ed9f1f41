CREATE TABLE enrollments (
    id             TEXT    PRIMARY KEY,
    student_name   TEXT    NOT NULL,
    student_email  TEXT    NOT NULL,
    course_id      TEXT    NOT NULL,
    amount_cents   INTEGER NOT NULL,
    currency       TEXT    NOT NULL,
    card_brand     TEXT    NOT NULL,
    card_last4     TEXT    NOT NULL,
    mode           TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    payment_status TEXT    NOT NULL,
    reason         TEXT,
    created_ms     INTEGER NOT NULL,
    updated_ms     INTEGER NOT NULL
);

CREATE TABLE enrollment_timeline (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    enrollment_id TEXT    NOT NULL REFERENCES enrollments (id),
    at_ms         INTEGER NOT NULL,
    event_type    TEXT    NOT NULL,
    service       TEXT    NOT NULL,
    attempt       INTEGER NOT NULL,
    detail        TEXT
);

CREATE INDEX enrollment_timeline_by_enrollment ON enrollment_timeline (enrollment_id, seq);

-- The request digest is keyed (HMAC), so the card number inside the
-- request cannot be recovered from it by guessing.
CREATE TABLE enrollment_idempotency (
    idempotency_key TEXT    PRIMARY KEY,
    request_digest  TEXT    NOT NULL,
    enrollment_id   TEXT    NOT NULL REFERENCES enrollments (id),
    created_ms      INTEGER NOT NULL
);
