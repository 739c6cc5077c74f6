-- Index what is not indexed yet, then keep the index in step by triggers again.
INSERT INTO chat_messages_fts (rowid, content)
    SELECT id, content FROM chat_messages
    WHERE id > (SELECT indexed_to FROM chat_messages_fts_progress) ORDER BY id;
DROP TRIGGER chat_messages_fts_update;
DROP TRIGGER chat_messages_fts_delete;
DROP TABLE chat_messages_fts_progress;
CREATE TRIGGER chat_messages_fts_insert AFTER INSERT ON chat_messages BEGIN
    INSERT INTO chat_messages_fts (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER chat_messages_fts_delete AFTER DELETE ON chat_messages BEGIN
    INSERT INTO chat_messages_fts (chat_messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER chat_messages_fts_update AFTER UPDATE OF content ON chat_messages BEGIN
    INSERT INTO chat_messages_fts (chat_messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO chat_messages_fts (rowid, content) VALUES (new.id, new.content);
END;
