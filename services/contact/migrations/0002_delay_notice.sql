-- When the sender was told their message is late (NULL: not yet); the
-- sweep looks for queued messages older than the first window without one.
ALTER TABLE contact_messages ADD COLUMN delayed_ms INTEGER;
CREATE INDEX contact_messages_waiting ON contact_messages (created_ms) WHERE delayed_ms IS NULL AND status NOT IN ('sent', 'failed');
