-- FTS5 merges the index's segments itself as it writes them ('automerge'), in bursts: once every
-- 64 leaf pages written, about 64 pages for each level of the index at once. Under load that
-- was about one indexing turn of the writer in a hundred taking 6–19 ms instead of 1–2, with
-- every message arriving meanwhile waiting behind it. The writer now merges a few pages after each
-- batch it indexes ('merge', src/db/models/search.rs) and FTS5 no longer merges on its own.
-- FTS5 still merges a level at once where 16 segments pile up on it ('crisismerge').
INSERT INTO chat_messages_fts (chat_messages_fts, rank) VALUES ('automerge', 0);
