-- `timestamp` is another name for `created_at`, for the SQL operators already type
-- (`SELECT * FROM chat_messages ORDER BY timestamp DESC`). Computed on read, never stored;
-- the application reads and writes `created_at` only (src/db/schema.rs leaves this out).
ALTER TABLE chat_messages ADD COLUMN "timestamp" TIMESTAMP GENERATED ALWAYS AS (created_at) VIRTUAL;
