-- SQLite only (its full-text index is now filled in batches); PostgreSQL's GIN index already
-- defers its work to a pending list. This migration exists so that both folders hold the same
-- migrations.
SELECT 1;
