-- One row per mail that went out. Written in the same transaction as the
-- inbox record and the `email_sent` outbox row, so "sent" is never recorded
-- without its event, nor the event without the record.
CREATE TABLE mailer_sent (
    mail_id    TEXT    PRIMARY KEY NOT NULL,
    about      TEXT    NOT NULL,
    attempt    INTEGER NOT NULL,
    via        TEXT    NOT NULL, -- 'smtp' or 'file'
    sent_ms    INTEGER NOT NULL
);
