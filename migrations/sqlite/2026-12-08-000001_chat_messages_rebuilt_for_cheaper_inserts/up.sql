-- Two things every stored message paid for and did not need, taken out by building the table
-- again (SQLite changes neither in place; https://sqlite.org/lang_altertable.html, "Making Other
-- Kinds Of Table Schema Changes"). The columns, rows, ids and constraints stay as they were, and
-- the full-text index keeps its rows, whose ids do not change.
-- - `CHECK (role IN ('user', 'assistant', 'agent', 'system'))`: SQLite compiles an IN list of
--   more than two constants into a temporary B-tree, which it built and searched for every
--   insert. The same rule written as comparisons costs a few instructions.
-- - AUTOINCREMENT: it keeps the highest id ever given in `sqlite_sequence`, read and written in
--   every transaction that stores a message, one more page in each commit. Without it a new id
--   is one more than the highest in the table, so ids still only grow unless the newest message
--   is deleted (switchboard deletes none); where it is, the full-text index's `indexed_to` is
--   lowered with it, so a message that gets its id again is indexed.
-- Counted with callgrind (docs/benchmarks.md, change 43): the SQLite writer's instructions per
-- stored message 161,000 -> 142,000.
CREATE TABLE chat_messages_new (
    id          INTEGER PRIMARY KEY,
    session_id  TEXT NOT NULL REFERENCES chat_sessions (id),
    seq         BIGINT NOT NULL,
    role        TEXT NOT NULL
                CHECK (role = 'user' OR role = 'assistant' OR role = 'agent' OR role = 'system'),
    author_id   TEXT REFERENCES users (id),
    content     TEXT NOT NULL,
    client_id   TEXT,
    interrupted BOOLEAN NOT NULL DEFAULT 0,
    model       TEXT,
    tokens      INTEGER,
    created_at  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "timestamp" TIMESTAMP GENERATED ALWAYS AS (created_at) VIRTUAL,
    CONSTRAINT chat_messages_session_seq UNIQUE (session_id, seq),
    CONSTRAINT chat_messages_session_client UNIQUE (session_id, client_id)
);
INSERT INTO chat_messages_new
    (id, session_id, seq, role, author_id, content, client_id, interrupted, model, tokens, created_at)
    SELECT id, session_id, seq, role, author_id, content, client_id, interrupted, model, tokens,
        created_at
    FROM chat_messages ORDER BY id;
DROP TABLE chat_messages;
ALTER TABLE chat_messages_new RENAME TO chat_messages;
-- Dropped with the old table (migration `search_index_in_batches`); a deleted message that was
-- the newest indexed one lowers `indexed_to` (above).
CREATE TRIGGER chat_messages_fts_delete AFTER DELETE ON chat_messages
WHEN old.id <= (SELECT indexed_to FROM chat_messages_fts_progress) BEGIN
    INSERT INTO chat_messages_fts (chat_messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    UPDATE chat_messages_fts_progress
    SET indexed_to = min(indexed_to, (SELECT coalesce(max(id), 0) FROM chat_messages));
END;
CREATE TRIGGER chat_messages_fts_update AFTER UPDATE OF content ON chat_messages
WHEN old.id <= (SELECT indexed_to FROM chat_messages_fts_progress) BEGIN
    INSERT INTO chat_messages_fts (chat_messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO chat_messages_fts (rowid, content) VALUES (new.id, new.content);
END;
