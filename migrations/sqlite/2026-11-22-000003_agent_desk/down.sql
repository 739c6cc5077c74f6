DROP TRIGGER chat_messages_fts_update;
DROP TRIGGER chat_messages_fts_delete;
DROP TRIGGER chat_messages_fts_insert;
DROP TABLE chat_messages_fts;
DROP INDEX idx_chat_sessions_human_requested;
ALTER TABLE chat_sessions DROP COLUMN human_requested_at;
