-- SQLite only (its FTS5 index); PostgreSQL's GIN index merges its pending list every second
-- (src/db/models/search.rs). This migration exists so that both folders hold the same
-- migrations.
SELECT 1;
