//! Full-text search of messages: the per-backend SQL, side by side.
//!
//! - SQLite: the FTS5 table `chat_messages_fts` (external content over `chat_messages`), ranked
//!   by `bm25`, snippets by `snippet()`. New messages are indexed in batches after their commit
//!   ([`index_pending`]), by the writer every few tens of milliseconds and by each search first.
//! - PostgreSQL: the GIN expression index on `to_tsvector('english', content)`, ranked by
//!   `ts_rank`, snippets by `ts_headline`. New entries wait in the index's pending list, which
//!   is merged into the index every second on a pooled connection ([`merge_pending`]).
//!
//! What the user typed is always text: for FTS5 each word is quoted as a string (so `AND`,
//! `NEAR`, `*`, `^`, `:` and parentheses are words, not operators); PostgreSQL gets it through
//! `plainto_tsquery`, which has no operators. Pages follow a `(rank, id)` cursor, never OFFSET.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Nullable, Text, Timestamp};

use crate::db::DbConnection;

/// Marks the start and end of a match inside a snippet before it is HTML-escaped; private-use
/// characters, so that no ordinary text is mistaken for them.
const MARK_START: char = '\u{E000}';
const MARK_END: char = '\u{E001}';
/// PostgreSQL: `<` and `>` stand in for these in the text given to `ts_headline`, so that its
/// parser does not take message text for HTML tags (and drop it).
const LT: char = '\u{E002}';
const GT: char = '\u{E003}';
/// Most words of a query that are searched; the rest are ignored.
const MAX_TERMS: usize = 32;

/// Where the next page starts: strictly after this (rank, id) in best-first order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cursor {
    pub rank: f64,
    pub id: i64,
}

#[derive(Debug, Clone)]
pub struct Hit {
    pub id: i64,
    pub session_id: String,
    pub seq: i64,
    pub role: String,
    /// HTML-escaped text in which only `<mark>` and `</mark>` are markup.
    pub snippet: String,
    /// Higher is better.
    pub rank: f64,
    pub created_at: NaiveDateTime,
    pub session_title: String,
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    session_id: String,
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    role: String,
    #[diesel(sql_type = Text)]
    snippet: String,
    #[diesel(sql_type = Double)]
    rank: f64,
    #[diesel(sql_type = Timestamp)]
    created_at: NaiveDateTime,
    #[diesel(sql_type = Text)]
    title: String,
}

const SQLITE_SEARCH: &str = "
SELECT * FROM (
    SELECT m.id AS id, m.session_id AS session_id, m.seq AS seq, m.role AS role,
           snippet(chat_messages_fts, 0, char(57344), char(57345), '…', 24) AS snippet,
           -bm25(chat_messages_fts) AS rank, m.created_at AS created_at, s.title AS title
    FROM chat_messages_fts
    JOIN chat_messages m ON m.id = chat_messages_fts.rowid
    JOIN chat_sessions s ON s.id = m.session_id
    WHERE chat_messages_fts MATCH ?1
      AND (?2 IS NULL OR (s.user_id = ?2 AND s.status <> 'deleted'))
) AS hits
WHERE ?3 IS NULL OR hits.rank < ?3 OR (hits.rank = ?3 AND hits.id < ?4)
ORDER BY hits.rank DESC, hits.id DESC
LIMIT ?5";

const POSTGRES_SEARCH: &str = "
SELECT r.id, r.session_id, r.seq, r.role,
       ts_headline('english', translate(m.content, '<>', $7), plainto_tsquery('english', $1), $6)
           AS snippet,
       r.rank, r.created_at, r.title
FROM (
    SELECT * FROM (
        SELECT m.id, m.session_id, m.seq, m.role, m.created_at, s.title,
               ts_rank(to_tsvector('english', translate(m.content, '<>', '  ')),
                       plainto_tsquery('english', $1))::float8 AS rank
        FROM chat_messages m
        JOIN chat_sessions s ON s.id = m.session_id
        WHERE to_tsvector('english', translate(m.content, '<>', '  '))
              @@ plainto_tsquery('english', $1)
          AND ($2::text IS NULL OR (s.user_id = $2 AND s.status <> 'deleted'))
    ) AS hits
    WHERE $3::float8 IS NULL OR hits.rank < $3 OR (hits.rank = $3 AND hits.id < $4)
    ORDER BY hits.rank DESC, hits.id DESC
    LIMIT $5
) AS r
JOIN chat_messages m ON m.id = r.id
ORDER BY r.rank DESC, r.id DESC";

/// SQLite: adds to the full-text index up to `max` of the oldest messages not in it yet, in one
/// transaction; returns how many. PostgreSQL indexes every message as it is stored: 0.
///
/// Indexing in the commit that stores a message wrote a new FTS5 segment and its bookkeeping
/// pages in every transaction, about a fifth of what each group commit wrote under load (8 of
/// 41 pages); in batches of tens of milliseconds they are written a few times a second.
pub fn index_pending(conn: &mut DbConnection, max: i64) -> QueryResult<usize> {
    #[derive(QueryableByName)]
    struct Upto {
        #[diesel(sql_type = Nullable<BigInt>)]
        id: Option<i64>,
    }
    let DbConnection::Sqlite(c) = conn else {
        return Ok(0);
    };
    c.immediate_transaction(|c| {
        let upto: Upto = diesel::sql_query(
            "SELECT max(id) AS id FROM (SELECT id FROM chat_messages \
             WHERE id > (SELECT indexed_to FROM chat_messages_fts_progress) ORDER BY id LIMIT ?1)",
        )
        .bind::<BigInt, _>(max)
        .get_result(c)?;
        let Some(upto) = upto.id else {
            return Ok(0);
        };
        let indexed = diesel::sql_query(
            "INSERT INTO chat_messages_fts (rowid, content) SELECT id, content FROM chat_messages \
             WHERE id > (SELECT indexed_to FROM chat_messages_fts_progress) AND id <= ?1 \
             ORDER BY id",
        )
        .bind::<BigInt, _>(upto)
        .execute(c)?;
        diesel::sql_query("UPDATE chat_messages_fts_progress SET indexed_to = ?1")
            .bind::<BigInt, _>(upto)
            .execute(c)?;
        // A little of the merging each batch makes due, rather than all of it now and then
        // (the migration `search_index_merged_in_small_steps`). FTS5 merges only where a level
        // holds 4 segments or a merge is under way, so a batch with nothing to merge costs
        // nothing more.
        diesel::sql_query(
            "INSERT INTO chat_messages_fts (chat_messages_fts, rank) VALUES ('merge', ?1)",
        )
        .bind::<BigInt, _>(merge_pages(indexed))
        .execute(c)?;
        Ok(indexed)
    })
}

/// The most pages of the full-text index merged after indexing `indexed` messages:
/// [`MERGE_PAGES_MIN`], and a page more for every 16 messages. FTS5's own rule merges about a
/// page per level of the index (five to eight) for each leaf page written, and a leaf holds
/// the postings of about a hundred short messages: a batch of 250 (the writer's every 50 ms at
/// 5,000 messages a second) writes a few leaves and gets 31 pages, about twice what it makes
/// due. Where longer messages make more due than that, segments pile up until FTS5 merges a
/// level at once (`crisismerge`), as it did before.
fn merge_pages(indexed: usize) -> i64 {
    MERGE_PAGES_MIN + indexed as i64 / 16
}

/// See [`merge_pages`].
const MERGE_PAGES_MIN: i64 = 16;

/// PostgreSQL: merges the full-text index's pending list into the index; returns how many of
/// its pages were merged. SQLite: nothing to do, 0.
///
/// PostgreSQL adds new entries of a GIN index to a pending list, and the insert that takes
/// the list past `gin_pending_list_limit` (4 MB) merges it within its own transaction: a group
/// commit that took 100 ms and more, every few seconds under load (p99.9 at 10,000 deliveries/s
/// 87–149 ms; merged every second by this instead, 19–36 ms). Searches read the list as well,
/// so it is kept short.
pub fn merge_pending(conn: &mut DbConnection) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Merged {
        #[diesel(sql_type = BigInt)]
        pages: i64,
    }
    let DbConnection::Pg(c) = conn else {
        return Ok(0);
    };
    let merged: Merged = diesel::sql_query(
        "SELECT gin_clean_pending_list('idx_chat_messages_fts'::regclass) AS pages",
    )
    .get_result(c)?;
    Ok(merged.pages)
}

/// Searches messages for `text`, best first. `owner` limits the search to that user's
/// conversations, leaving deleted ones out. `text` must not be blank (the caller checks).
pub fn search(
    conn: &mut DbConnection,
    text: &str,
    owner: Option<&str>,
    after: Option<Cursor>,
    limit: i64,
) -> QueryResult<Vec<Hit>> {
    // Control characters (NUL above all, which PostgreSQL refuses in text) are not words.
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let owner = owner.map(str::to_string);
    let (rank, id) = match after {
        Some(c) => (Some(c.rank), c.id),
        None => (None, 0),
    };
    let rows: Vec<Row> = match conn {
        DbConnection::Sqlite(c) => {
            let Some(query) = fts5_query(&text) else {
                return Ok(Vec::new());
            };
            diesel::sql_query(SQLITE_SEARCH)
                .bind::<Text, _>(query)
                .bind::<Nullable<Text>, _>(owner)
                .bind::<Nullable<Double>, _>(rank)
                .bind::<BigInt, _>(id)
                .bind::<BigInt, _>(limit)
                .load(c)?
        }
        DbConnection::Pg(c) => {
            let options =
                format!("StartSel={MARK_START}, StopSel={MARK_END}, MaxWords=35, MinWords=15");
            diesel::sql_query(POSTGRES_SEARCH)
                .bind::<Text, _>(text)
                .bind::<Nullable<Text>, _>(owner)
                .bind::<Nullable<Double>, _>(rank)
                .bind::<BigInt, _>(id)
                .bind::<BigInt, _>(limit)
                .bind::<Text, _>(options)
                .bind::<Text, _>(format!("{LT}{GT}"))
                .load(c)?
        }
    };
    Ok(rows
        .into_iter()
        .map(|r| Hit {
            id: r.id,
            session_id: r.session_id,
            seq: r.seq,
            role: r.role,
            snippet: marked_html(&r.snippet),
            rank: r.rank,
            created_at: r.created_at,
            session_title: r.title,
        })
        .collect())
}

/// An FTS5 query that matches every word of `text` as a plain string: each word quoted, quotes
/// inside doubled. `None` when no word holds a letter or digit (nothing to search for).
fn fts5_query(text: &str) -> Option<String> {
    let terms: Vec<String> = text
        .split_whitespace()
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .take(MAX_TERMS)
        .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
        .collect();
    (!terms.is_empty()).then(|| terms.join(" "))
}

/// Escapes a snippet for HTML and turns the match markers into `<mark>` tags.
fn marked_html(snippet: &str) -> String {
    let mut out = String::with_capacity(snippet.len() + 16);
    for c in snippet.chars() {
        match c {
            MARK_START => out.push_str("<mark>"),
            MARK_END => out.push_str("</mark>"),
            '&' => out.push_str("&amp;"),
            '<' | LT => out.push_str("&lt;"),
            '>' | GT => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_is_a_quoted_string() {
        assert_eq!(
            fts5_query(r#"refund AND "x" NEAR(a b) col:* ^start"#).unwrap(),
            r#""refund" "AND" """x""" "NEAR(a" "b)" "col:*" "^start""#
        );
        assert_eq!(fts5_query("  * ( ) \" "), None);
        assert_eq!(fts5_query(""), None);
    }

    #[test]
    fn snippets_escape_everything_but_the_marks() {
        assert_eq!(
            marked_html("<img src=x onerror='a'> \u{E000}pay&\u{E001}"),
            "&lt;img src=x onerror=&#39;a&#39;&gt; <mark>pay&amp;</mark>"
        );
    }

    /// A new SQLite store (in the returned folder) with user `u` and their conversation `s`.
    fn one_conversation() -> (tempfile::TempDir, crate::db::PooledConn) {
        let (dir, mut conn) = new_store();
        crate::db::run_migrations(&mut conn).unwrap();
        add_one_conversation(&mut conn);
        (dir, conn)
    }

    /// A new SQLite store in the returned folder, no migration run.
    fn new_store() -> (tempfile::TempDir, crate::db::PooledConn) {
        use crate::db::{build_pool, sqlite_settings_in};

        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = build_pool(&sqlite_settings_in(dir.path())).unwrap();
        let conn = pool.get().unwrap();
        (dir, conn)
    }

    /// User `u` and their conversation `s`.
    fn add_one_conversation(conn: &mut DbConnection) {
        use diesel::connection::SimpleConnection;

        conn.batch_execute(
            "INSERT INTO users (id, email, role) VALUES ('u', 'u@x', 'customer');
             INSERT INTO chat_sessions (id, user_id) VALUES ('s', 'u');",
        )
        .unwrap();
    }

    /// The SQLite connection inside, for Diesel's migration harness.
    fn sqlite(conn: &mut DbConnection) -> &mut diesel::SqliteConnection {
        let DbConnection::Sqlite(c) = conn else {
            unreachable!("a SQLite store")
        };
        c
    }

    /// Indexed a few at a time, as the writer does under load, the index's segments are merged
    /// as they pile up (FTS5 does not merge them itself, see the migration), and the index
    /// finds the first messages and the last.
    #[test]
    fn an_index_written_in_small_batches_stays_merged() {
        use diesel::connection::SimpleConnection;

        let (_dir, mut conn) = one_conversation();
        let segments = |conn: &mut DbConnection| -> i64 {
            #[derive(QueryableByName)]
            struct Count {
                #[diesel(sql_type = BigInt)]
                n: i64,
            }
            diesel::sql_query("SELECT count(DISTINCT segid) AS n FROM chat_messages_fts_idx")
                .get_result::<Count>(conn)
                .unwrap()
                .n
        };
        let mut most = 0;
        for batch in 0..400 {
            let values: Vec<String> = (0..10)
                .map(|i| {
                    let seq = batch * 10 + i + 1;
                    format!("('s', {seq}, 'user', 'order {seq} word{batch} shipped late again')")
                })
                .collect();
            conn.batch_execute(&format!(
                "INSERT INTO chat_messages (session_id, seq, role, content) VALUES {}",
                values.join(", ")
            ))
            .unwrap();
            assert_eq!(index_pending(&mut conn, 100).unwrap(), 10);
            most = most.max(segments(&mut conn));
        }
        assert!(
            most <= 12,
            "at most {most} segments at once after 400 batches"
        );
        conn.batch_execute(
            "INSERT INTO chat_messages_fts (chat_messages_fts) VALUES ('integrity-check')",
        )
        .expect("the index matches the table");
        for word in ["word0", "word399"] {
            let hits = search(&mut conn, word, None, None, 20).unwrap();
            assert_eq!(hits.len(), 10, "{word}");
        }
    }

    /// Messages deleted or edited before they were indexed, and after: the index stays
    /// consistent with the table (FTS5's own check), and finds each message as it is now.
    #[test]
    fn edits_and_deletes_keep_the_index_consistent_whether_indexed_or_not() {
        use diesel::connection::SimpleConnection;

        let (_dir, mut conn) = one_conversation();
        let add = |conn: &mut DbConnection, seq: i64, content: &str| {
            conn.batch_execute(&format!(
                "INSERT INTO chat_messages (id, session_id, seq, role, content)
                 VALUES ({seq}, 's', {seq}, 'user', '{content}')"
            ))
            .unwrap();
        };
        add(&mut conn, 1, "indexed then deleted");
        add(&mut conn, 2, "indexed then edited");
        add(&mut conn, 3, "indexed and kept");
        assert_eq!(index_pending(&mut conn, 2).unwrap(), 2, "at most the batch");
        assert_eq!(index_pending(&mut conn, 100).unwrap(), 1);
        assert_eq!(index_pending(&mut conn, 100).unwrap(), 0, "nothing left");
        add(&mut conn, 4, "pending then deleted");
        add(&mut conn, 5, "pending then edited");
        conn.batch_execute(
            "DELETE FROM chat_messages WHERE id IN (1, 4);
             UPDATE chat_messages SET content = 'walrus now' WHERE id IN (2, 5);",
        )
        .unwrap();
        assert_eq!(index_pending(&mut conn, 100).unwrap(), 1, "message 5");
        conn.batch_execute(
            "INSERT INTO chat_messages_fts (chat_messages_fts) VALUES ('integrity-check')",
        )
        .expect("the index matches the table");

        let ids = |conn: &mut DbConnection, text: &str| -> Vec<i64> {
            let mut ids: Vec<i64> = search(conn, text, None, None, 10)
                .unwrap()
                .iter()
                .map(|h| h.id)
                .collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(ids(&mut conn, "walrus"), vec![2, 5]);
        assert_eq!(ids(&mut conn, "edited"), Vec::<i64>::new());
        assert_eq!(ids(&mut conn, "deleted"), Vec::<i64>::new());
        assert_eq!(ids(&mut conn, "kept"), vec![3]);
    }

    /// Ids are one more than the highest in the table: deleting the newest message gives its id
    /// to the next one, which the index must take in all the same.
    #[test]
    fn a_message_given_the_id_of_a_deleted_newest_one_is_indexed() {
        use diesel::connection::SimpleConnection;

        let (_dir, mut conn) = one_conversation();
        conn.batch_execute(
            "INSERT INTO chat_messages (session_id, seq, role, content)
             VALUES ('s', 1, 'user', 'kept'), ('s', 2, 'user', 'newest then deleted')",
        )
        .unwrap();
        assert_eq!(index_pending(&mut conn, 100).unwrap(), 2);
        conn.batch_execute(
            "DELETE FROM chat_messages WHERE seq = 2;
             INSERT INTO chat_messages (session_id, seq, role, content)
             VALUES ('s', 3, 'user', 'walrus arrives');",
        )
        .unwrap();
        assert_eq!(index_pending(&mut conn, 100).unwrap(), 1, "the new message");
        conn.batch_execute(
            "INSERT INTO chat_messages_fts (chat_messages_fts) VALUES ('integrity-check')",
        )
        .expect("the index matches the table");
        let hits = search(&mut conn, "walrus", None, None, 10).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].id, 2, "the deleted message's id, given again");
        assert!(search(&mut conn, "deleted", None, None, 10)
            .unwrap()
            .is_empty());
    }

    /// The table's rules hold for a write that does not come through the application: a role
    /// outside the four is refused, and so is a conversation that does not exist.
    #[test]
    fn the_messages_table_refuses_an_unknown_role_and_conversation() {
        use diesel::connection::SimpleConnection;

        let (_dir, mut conn) = one_conversation();
        for role in ["user", "assistant", "agent", "system"] {
            conn.batch_execute(&format!(
                "INSERT INTO chat_messages (session_id, seq, role, content)
                 VALUES ('s', (SELECT coalesce(max(seq), 0) + 1 FROM chat_messages), '{role}', 'x')"
            ))
            .unwrap_or_else(|e| panic!("{role}: {e}"));
        }
        for (values, refused) in [
            ("('s', 10, 'admin', 'x')", "CHECK constraint failed"),
            ("('s', 11, '', 'x')", "CHECK constraint failed"),
            ("('s', 12, 'USER', 'x')", "CHECK constraint failed"),
            ("('nope', 1, 'user', 'x')", "FOREIGN KEY constraint failed"),
        ] {
            let err = conn
                .batch_execute(&format!(
                    "INSERT INTO chat_messages (session_id, seq, role, content) VALUES {values}"
                ))
                .unwrap_err();
            assert!(err.to_string().contains(refused), "{values}: {err}");
        }
        assert_eq!(
            crate::db::models::message::count(&mut conn, "s").unwrap(),
            4,
            "only the four roles were stored"
        );
    }

    /// A store with messages from before the messages table was built again (the migration
    /// `chat_messages_rebuilt_for_cheaper_inserts`) keeps them with their ids, its index, and
    /// its rules; a new message inserts without a temporary table; and the migration reverts.
    #[test]
    fn the_messages_table_built_again_keeps_what_was_stored() {
        use diesel::connection::SimpleConnection;
        use diesel_migrations::MigrationHarness;

        use crate::db::SQLITE_MIGRATIONS;

        #[derive(QueryableByName, Debug, PartialEq)]
        struct Row {
            #[diesel(sql_type = BigInt)]
            id: i64,
            #[diesel(sql_type = Text)]
            content: String,
            #[diesel(sql_type = Text)]
            stamp: String,
        }
        let rows = |conn: &mut DbConnection| -> Vec<Row> {
            diesel::sql_query(
                "SELECT id, content, CAST(\"timestamp\" AS TEXT) AS stamp FROM chat_messages ORDER BY id",
            )
            .load(conn)
            .unwrap()
        };
        #[derive(QueryableByName)]
        struct Op {
            #[diesel(sql_type = Text)]
            opcode: String,
        }
        let temporary_tables = |conn: &mut DbConnection| -> usize {
            diesel::sql_query(
                "EXPLAIN INSERT INTO chat_messages (session_id, seq, role, content) \
                 VALUES ('s', 100, 'user', 'x')",
            )
            .load::<Op>(conn)
            .unwrap()
            .iter()
            .filter(|op| op.opcode == "OpenEphemeral")
            .count()
        };
        const REBUILD: &str = "2026-12-08-000001";

        let (_dir, mut conn) = new_store();
        let c = sqlite(&mut conn);
        while let Some(next) = c.pending_migrations(SQLITE_MIGRATIONS).unwrap().first() {
            // Diesel gives the version without its dashes.
            if next.name().version().to_string() == REBUILD.replace('-', "") {
                break;
            }
            c.run_next_migration(SQLITE_MIGRATIONS).unwrap();
        }
        add_one_conversation(&mut conn);
        conn.batch_execute(
            "INSERT INTO chat_messages (session_id, seq, role, content, created_at) VALUES
                 ('s', 1, 'user', 'otter one', '2026-12-01 10:00:00'),
                 ('s', 2, 'assistant', 'otter two', '2026-12-01 10:00:01'),
                 ('s', 3, 'agent', 'otter three', '2026-12-01 10:00:02');",
        )
        .unwrap();
        assert_eq!(
            index_pending(&mut conn, 2).unwrap(),
            2,
            "one message left to index"
        );
        assert_eq!(temporary_tables(&mut conn), 1, "the role's IN list, before");
        let before = rows(&mut conn);

        let c = sqlite(&mut conn);
        c.run_next_migration(SQLITE_MIGRATIONS).unwrap();
        assert!(c.pending_migrations(SQLITE_MIGRATIONS).unwrap().is_empty());
        assert_eq!(rows(&mut conn), before, "the same rows, ids and timestamps");
        assert_eq!(
            temporary_tables(&mut conn),
            0,
            "the role is checked by comparisons"
        );
        assert_eq!(index_pending(&mut conn, 100).unwrap(), 1, "the one left");
        conn.batch_execute(
            "INSERT INTO chat_messages (session_id, seq, role, content) VALUES ('s', 4, 'user', 'otter four');
             INSERT INTO chat_messages_fts (chat_messages_fts) VALUES ('integrity-check');",
        )
        .expect("a new message, and the index matching the table");
        assert_eq!(rows(&mut conn).last().unwrap().id, 4);
        assert_eq!(index_pending(&mut conn, 100).unwrap(), 1);
        assert_eq!(search(&mut conn, "otter", None, None, 10).unwrap().len(), 4);
        assert!(conn
            .batch_execute(
                "INSERT INTO chat_messages (session_id, seq, role, content) VALUES ('s', 5, 'bot', 'x')"
            )
            .is_err());

        sqlite(&mut conn)
            .revert_last_migration(SQLITE_MIGRATIONS)
            .unwrap();
        assert_eq!(temporary_tables(&mut conn), 1, "the table as it was");
        assert_eq!(rows(&mut conn).len(), 4);
        conn.batch_execute(
            "INSERT INTO chat_messages_fts (chat_messages_fts) VALUES ('integrity-check')",
        )
        .expect("the index matching the table");
    }
}
