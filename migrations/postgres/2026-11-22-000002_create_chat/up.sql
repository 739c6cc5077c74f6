-- Conversations. `last_seq` is the seq of the newest stored message: the next
-- message takes last_seq + 1 in the same transaction, so seq has no gaps.
CREATE TABLE chat_sessions (
    id                TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL REFERENCES users (id),
    title             TEXT NOT NULL DEFAULT '',
    status            TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'closed', 'deleted')),
    mode              TEXT NOT NULL DEFAULT 'ai' CHECK (mode IN ('ai', 'human')),
    assigned_agent_id TEXT REFERENCES users (id),
    last_seq          BIGINT NOT NULL DEFAULT 0,
    created_at        TIMESTAMP NOT NULL DEFAULT (NOW() AT TIME ZONE 'utc'),
    updated_at        TIMESTAMP NOT NULL DEFAULT (NOW() AT TIME ZONE 'utc'),
    deleted_at        TIMESTAMP
);
-- A customer's own list, newest first.
CREATE INDEX idx_chat_sessions_user_id ON chat_sessions (user_id, created_at DESC, id DESC);
-- The admin list, filtered by status, newest first.
CREATE INDEX idx_chat_sessions_status ON chat_sessions (status, created_at DESC, id DESC);
CREATE INDEX idx_chat_sessions_created_at ON chat_sessions (created_at DESC, id DESC);

CREATE TABLE chat_messages (
    id          BIGSERIAL PRIMARY KEY,
    session_id  TEXT NOT NULL REFERENCES chat_sessions (id),
    seq         BIGINT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'agent', 'system')),
    author_id   TEXT REFERENCES users (id),
    content     TEXT NOT NULL,
    client_id   TEXT,
    interrupted BOOLEAN NOT NULL DEFAULT FALSE,
    model       TEXT,
    tokens      INTEGER,
    created_at  TIMESTAMP NOT NULL DEFAULT (NOW() AT TIME ZONE 'utc'),
    -- History pages and resume read by (session_id, seq).
    CONSTRAINT chat_messages_session_seq UNIQUE (session_id, seq),
    -- A client id is stored once per conversation: resending it returns the first seq.
    CONSTRAINT chat_messages_session_client UNIQUE (session_id, client_id)
);
CREATE INDEX idx_chat_messages_created_at ON chat_messages (created_at);
