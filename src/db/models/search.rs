//! Full-text search of messages: the per-backend SQL, side by side.
//!
//! - SQLite: the FTS5 table `chat_messages_fts` (external content over `chat_messages`, kept
//!   in step by triggers), ranked by `bm25`, snippets by `snippet()`.
//! - PostgreSQL: the GIN expression index on `to_tsvector('english', content)`, ranked by
//!   `ts_rank`, snippets by `ts_headline`.
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
}
