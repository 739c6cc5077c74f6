//! Statements written as SQL that Diesel prepares once per connection and keeps.
//!
//! Diesel keeps a prepared statement only where it can tell the SQL from the query's type. It
//! never keeps `sql_query` text, an `IN` list on SQLite, or any UPDATE: those are parsed and
//! planned again on every call. On SQLite that is the writer's own thread: a group commit ran
//! two such statements in every transaction and one more per conversation, and at 10,000
//! deliveries a second the server prepared 3,900 to 5,600 statements a second, nearly all for
//! one use (with these kept: 40 to 75). On PostgreSQL the group commit's one call per batch
//! (`switchboard_append`) is kept the same way, so the server does not parse and plan it each
//! time.
//!
//! A [`Statement`] has fixed SQL and a type of its own, by which Diesel keeps it: run it as
//! `Kept(statement)` with `execute` or `load` (into a `QueryableByName` row).

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};
use diesel::{QueryResult, RunQueryDsl};

/// A statement with fixed SQL.
pub trait Statement {
    /// The SQL, with `?` where each value goes, in the order [`BindTo::bind`] gives them.
    const SQL: &'static str;
    /// What Diesel keeps the prepared statement by: the statement's own type, with `'static`
    /// for its lifetimes. No two statements may share it.
    type Key: 'static;
}

/// The values of a [`Statement`], for one backend.
pub trait BindTo<DB: Backend>: Statement {
    fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, DB>) -> QueryResult<()>;
}

/// Writes a statement's SQL up to each `?` and binds the value that goes there.
pub struct Values<'p, 'a, 'b, DB: Backend> {
    out: &'p mut AstPass<'a, 'b, DB>,
    rest: &'static str,
}

impl<'b, DB: Backend> Values<'_, '_, 'b, DB> {
    /// Binds the value of the next `?`.
    pub fn push<T, U>(&mut self, value: &'b U) -> QueryResult<()>
    where
        DB: HasSqlType<T>,
        U: ToSql<T, DB> + ?Sized,
    {
        let Some((before, after)) = self.rest.split_once('?') else {
            return Err(diesel::result::Error::QueryBuilderError(
                "a statement binds more values than its SQL has `?` for".into(),
            ));
        };
        self.out.push_sql(before);
        self.out.push_bind_param::<T, U>(value)?;
        self.rest = after;
        Ok(())
    }
}

/// A [`Statement`] to run: `Kept(statement).execute(conn)`.
pub struct Kept<S>(pub S);

impl<S: Statement> QueryId for Kept<S> {
    type QueryId = S::Key;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<S: BindTo<DB>, DB: Backend> QueryFragment<DB> for Kept<S> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        let mut values = Values {
            out: &mut out,
            rest: S::SQL,
        };
        self.0.bind(&mut values)?;
        let rest = values.rest;
        if rest.contains('?') {
            return Err(diesel::result::Error::QueryBuilderError(
                "a statement binds fewer values than its SQL has `?` for".into(),
            ));
        }
        out.push_sql(rest);
        Ok(())
    }
}

impl<S: Statement> Query for Kept<S> {
    type SqlType = Untyped;
}

impl<S: Statement, Conn> RunQueryDsl<Conn> for Kept<S> {}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Text};
    use diesel::sqlite::Sqlite;

    use super::*;

    struct Rename<'a> {
        id: i64,
        name: &'a str,
    }

    impl Statement for Rename<'_> {
        const SQL: &'static str = "UPDATE t SET name = ? WHERE id = ?";
        type Key = Rename<'static>;
    }

    impl BindTo<Sqlite> for Rename<'_> {
        fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, Sqlite>) -> QueryResult<()> {
            values.push::<Text, _>(self.name)?;
            values.push::<BigInt, _>(&self.id)
        }
    }

    /// The same SQL as [`Rename`], binding one value too few.
    struct RenameShort;

    impl Statement for RenameShort {
        const SQL: &'static str = Rename::SQL;
        type Key = RenameShort;
    }

    impl BindTo<Sqlite> for RenameShort {
        fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, Sqlite>) -> QueryResult<()> {
            values.push::<Text, _>("x")
        }
    }

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        name: String,
    }

    struct Named;

    impl Statement for Named {
        const SQL: &'static str = "SELECT id, name FROM t ORDER BY id";
        type Key = Named;
    }

    impl BindTo<Sqlite> for Named {
        fn bind<'b>(&'b self, _: &mut Values<'_, '_, 'b, Sqlite>) -> QueryResult<()> {
            Ok(())
        }
    }

    /// A connection to a fresh in-memory table `t`, and the SQL of each statement it prepares
    /// to keep.
    fn table() -> (SqliteConnection, Arc<Mutex<Vec<String>>>) {
        crate::db::prepare_sqlite();
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        conn.batch_execute(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL); \
             INSERT INTO t VALUES (1, 'a'), (2, 'b');",
        )
        .unwrap();
        let kept = Arc::new(Mutex::new(Vec::new()));
        let seen = kept.clone();
        let watch = move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::CacheQuery { sql, .. } = event {
                seen.lock().unwrap().push(sql.to_string());
            }
        };
        conn.set_instrumentation(Box::new(watch) as Box<dyn Instrumentation>);
        (conn, kept)
    }

    #[test]
    fn a_statement_is_prepared_once_and_runs_with_the_values_of_each_call() {
        let (mut conn, kept) = table();
        for (id, name) in [(1, "one"), (2, "two"), (1, "uno")] {
            assert_eq!(Kept(Rename { id, name }).execute(&mut conn).unwrap(), 1);
        }
        let rows: Vec<Row> = Kept(Named).load(&mut conn).unwrap();
        assert_eq!(
            rows,
            [
                Row {
                    id: 1,
                    name: "uno".into()
                },
                Row {
                    id: 2,
                    name: "two".into()
                }
            ]
        );
        assert_eq!(
            *kept.lock().unwrap(),
            [Rename::SQL, Named::SQL],
            "each statement is prepared once, then kept"
        );
        // What Diesel's own UPDATE does, for contrast: prepared anew every time, never kept.
        diesel::sql_query("UPDATE t SET name = 'z'")
            .execute(&mut conn)
            .unwrap();
        assert_eq!(kept.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_statement_whose_values_do_not_match_its_sql_is_refused_before_it_runs() {
        let (mut conn, _) = table();
        let refused = Kept(RenameShort).execute(&mut conn).unwrap_err();
        assert!(
            refused.to_string().contains("fewer values"),
            "got: {refused}"
        );
        let rows: Vec<Row> = Kept(Named).load(&mut conn).unwrap();
        assert_eq!(rows[0].name, "a", "nothing was changed");
    }
}
