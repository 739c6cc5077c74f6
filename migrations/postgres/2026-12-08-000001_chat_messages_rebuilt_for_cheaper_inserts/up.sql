-- SQLite only (how it compiles a CHECK with an IN list, and its AUTOINCREMENT); PostgreSQL tests
-- `role IN (…)` against the list directly, and its ids come from a sequence. This migration
-- exists so that both folders hold the same migrations.
SELECT 1;
