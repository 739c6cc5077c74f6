ALTER TABLE chat_messages DROP COLUMN "timestamp";
