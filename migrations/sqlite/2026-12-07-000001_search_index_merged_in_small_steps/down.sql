-- FTS5's default: merge as segments are written.
INSERT INTO chat_messages_fts (chat_messages_fts, rank) VALUES ('automerge', 4);
