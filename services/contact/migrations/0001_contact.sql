CREATE TABLE contact_messages (
    id         TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL,
    email      TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    message    TEXT    NOT NULL,
    status     TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);

CREATE TABLE contact_timeline (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT    NOT NULL REFERENCES contact_messages (id),
    at_ms      INTEGER NOT NULL,
    event_type TEXT    NOT NULL,
    service    TEXT    NOT NULL,
    attempt    INTEGER NOT NULL,
    detail     TEXT
);

CREATE INDEX contact_timeline_message ON contact_timeline (message_id, seq);
