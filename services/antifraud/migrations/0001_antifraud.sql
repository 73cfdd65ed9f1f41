-- One row per fraud check: the velocity history the rules count over, and
-- the verdict that was emitted, for audit.
CREATE TABLE antifraud_checks (
    event_id      TEXT    PRIMARY KEY,
    enrollment_id TEXT    NOT NULL,
    fingerprint   TEXT    NOT NULL,
    email         TEXT    NOT NULL,
    at_ms         INTEGER NOT NULL,
    score         INTEGER NOT NULL,
    passed        INTEGER NOT NULL,
    reasons       TEXT    NOT NULL,
    checked_ms    INTEGER NOT NULL
);

CREATE INDEX antifraud_checks_card ON antifraud_checks (fingerprint, at_ms);
CREATE INDEX antifraud_checks_email ON antifraud_checks (email, at_ms);
