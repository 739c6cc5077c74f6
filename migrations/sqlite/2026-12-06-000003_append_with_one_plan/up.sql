-- PostgreSQL only (its plan cache); SQLite has no stored function. This migration exists so
-- that both folders hold the same migrations.
SELECT 1;
