-- Messages are indexed for search in batches, after their commit, instead of by a trigger inside
-- it: an FTS5 insert writes a new index segment and its bookkeeping pages in every transaction,
-- which under load was about a fifth of what each commit wrote. `indexed_to` is the id of the
-- newest message in the index; ids only grow (AUTOINCREMENT), so the messages not yet indexed
-- are those above it. The writer indexes them every few tens of milliseconds, and a search
-- indexes what is left before it runs (src/db/models/search.rs).
CREATE TABLE chat_messages_fts_progress (
    id         INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    indexed_to INTEGER NOT NULL
);
INSERT INTO chat_messages_fts_progress (id, indexed_to)
    VALUES (1, (SELECT coalesce(max(id), 0) FROM chat_messages));

DROP TRIGGER chat_messages_fts_insert;
DROP TRIGGER chat_messages_fts_delete;
DROP TRIGGER chat_messages_fts_update;
-- A message not indexed yet has nothing in the index to take out; it is indexed as it is then.
CREATE TRIGGER chat_messages_fts_delete AFTER DELETE ON chat_messages
WHEN old.id <= (SELECT indexed_to FROM chat_messages_fts_progress) BEGIN
    INSERT INTO chat_messages_fts (chat_messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER chat_messages_fts_update AFTER UPDATE OF content ON chat_messages
WHEN old.id <= (SELECT indexed_to FROM chat_messages_fts_progress) BEGIN
    INSERT INTO chat_messages_fts (chat_messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO chat_messages_fts (rowid, content) VALUES (new.id, new.content);
END;
