DROP INDEX idx_chat_messages_fts;
DROP INDEX idx_chat_sessions_human_requested;
ALTER TABLE chat_sessions DROP COLUMN human_requested_at;
