-- The table as it was (the CHECK with an IN list, AUTOINCREMENT), built again the same way
-- (see up.sql).
CREATE TABLE chat_messages_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id  TEXT NOT NULL REFERENCES chat_sessions (id),
    seq         BIGINT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'agent', 'system')),
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
CREATE TRIGGER chat_messages_fts_delete AFTER DELETE ON chat_messages
WHEN old.id <= (SELECT indexed_to FROM chat_messages_fts_progress) BEGIN
    INSERT INTO chat_messages_fts (chat_messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER chat_messages_fts_update AFTER UPDATE OF content ON chat_messages
WHEN old.id <= (SELECT indexed_to FROM chat_messages_fts_progress) BEGIN
    INSERT INTO chat_messages_fts (chat_messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO chat_messages_fts (rowid, content) VALUES (new.id, new.content);
END;
