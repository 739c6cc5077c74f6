-- The agent desk: when a customer asked for a human (NULL when not waiting for one).
ALTER TABLE chat_sessions ADD COLUMN human_requested_at TIMESTAMP;
-- The human queue, oldest request first.
CREATE INDEX idx_chat_sessions_human_requested ON chat_sessions (human_requested_at)
    WHERE human_requested_at IS NOT NULL;

-- Full-text search over messages: an FTS5 index whose rows are chat_messages (external
-- content, keyed by chat_messages.id), kept in step by the triggers below.
CREATE VIRTUAL TABLE chat_messages_fts USING fts5(
    content,
    content = 'chat_messages',
    content_rowid = 'id',
    tokenize = 'porter unicode61'
);
CREATE TRIGGER chat_messages_fts_insert AFTER INSERT ON chat_messages BEGIN
    INSERT INTO chat_messages_fts (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER chat_messages_fts_delete AFTER DELETE ON chat_messages BEGIN
    INSERT INTO chat_messages_fts (chat_messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER chat_messages_fts_update AFTER UPDATE OF content ON chat_messages BEGIN
    INSERT INTO chat_messages_fts (chat_messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO chat_messages_fts (rowid, content) VALUES (new.id, new.content);
END;
-- Index what was stored before this migration.
INSERT INTO chat_messages_fts (chat_messages_fts) VALUES ('rebuild');
