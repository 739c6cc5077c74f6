-- PostgreSQL only (its group commit calls one function per batch); SQLite runs in-process,
-- where a statement is not a round trip. This migration exists so that both folders hold the
-- same migrations.
SELECT 1;
