-- `timestamp` is another name for `created_at`, for the SQL operators already type
-- (`SELECT * FROM chat_messages ORDER BY timestamp DESC`). PostgreSQL before 18 has only
-- stored generated columns, so it costs 8 bytes a row; the application reads and writes
-- `created_at` only (src/db/schema.rs leaves this out).
ALTER TABLE chat_messages ADD COLUMN "timestamp" TIMESTAMP GENERATED ALWAYS AS (created_at) STORED;
