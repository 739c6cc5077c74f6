-- Nothing reads messages by `created_at` across conversations (history, resume, the desk and
-- search all start from a conversation or from the full-text index), but every stored message
-- paid for this index: one more B-tree insert, and one more page in each commit.
DROP INDEX idx_chat_messages_created_at;
