CREATE TABLE notifications (
    id         TEXT    PRIMARY KEY,
    email      TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    about      TEXT    NOT NULL,
    text       TEXT    NOT NULL,
    emailed    INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE INDEX notifications_email ON notifications (email, created_ms);
