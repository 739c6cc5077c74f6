-- The agent desk: when a customer asked for a human (NULL when not waiting for one).
ALTER TABLE chat_sessions ADD COLUMN human_requested_at TIMESTAMP;
-- The human queue, oldest request first.
CREATE INDEX idx_chat_sessions_human_requested ON chat_sessions (human_requested_at)
    WHERE human_requested_at IS NOT NULL;

-- Full-text search over messages: an expression index that search queries repeat exactly.
-- `<` and `>` are read as spaces: the default parser would otherwise take `<b>word</b>` for
-- markup and leave its words out, and messages are text, never HTML.
CREATE INDEX idx_chat_messages_fts ON chat_messages
    USING GIN (to_tsvector('english', translate(content, '<>', '  ')));
