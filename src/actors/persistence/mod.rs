//! Persistence actor: the only code that runs Diesel.
//!
//! Runs on a `SyncArbiter` with one thread per pooled connection (`DB_MAX_OPEN_CONNS`), because
//! Diesel blocks. It owns the pool; everything else holds a [`Db`] handle and sends it work.
//! Group commit has writers of its own: one thread each, which drain the committer's queue
//! themselves ([`committer`]) and keep one pooled connection between batches (where the
//! pool has as many again for reads), so that the connection that wrote last writes next
//! (SQLite drops a connection's page cache whenever another connection has written since its
//! last transaction) and PostgreSQL keeps its prepared statements.
//! A SQLite writer also keeps the store in shape between units of work ([`Upkeep`]): it indexes
//! new messages for search in batches and starts a long WAL over.
//! A panic inside a unit of work is caught here: the caller gets `DbError::Panicked`, the thread
//! lives on, and the connection (left inside a broken transaction) is discarded by the pool.

pub mod committer;
pub mod messages;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};

pub use messages::RunQuery;

use crate::db::models::search;
use crate::db::{
    Backend, Checkpointer, DbConnection, DbPool, PooledConn, COPY_EVERY, WAL_LONG_PAGES,
};
use crate::error::ApiError;

pub struct Persistence {
    pool: DbPool,
    /// Keep the connection between units of work (a committer's writer).
    keep: bool,
    /// The connection kept since the last unit of work that succeeded, and since when.
    held: Option<(PooledConn, Instant)>,
    /// A writer on SQLite: what it does between units of work.
    upkeep: Option<Upkeep>,
}

/// How often a SQLite writer adds new messages to the full-text index: each time, one
/// transaction of up to [`INDEX_BATCH_MAX`] messages, so at 5,000 messages a second about 250.
const INDEX_EVERY: Duration = Duration::from_millis(50);
/// The most messages indexed in one transaction; a backlog (after a restart, or while messages
/// come faster than this) is indexed a batch at a time between group commits.
pub const INDEX_BATCH_MAX: i64 = 500;

/// PostgreSQL: how often the full-text index's pending list is merged ([`search::merge_pending`]).
const MERGE_SEARCH_INDEX_EVERY: Duration = Duration::from_secs(1);

/// What a SQLite writer does between units of work, after one that succeeded, when due: adds the
/// messages stored since the last time to the full-text index ([`INDEX_EVERY`]), and where the
/// checkpointer found the WAL long, copies the rest of it so that the next transaction starts it
/// over. It runs as a message the writer sends itself, so that the unit of work that made it due
/// is answered first (a batch's acks do not wait for it), and the next group commit waits for it
/// at most once.
struct Upkeep {
    checkpointer: Arc<Checkpointer>,
    /// When the full-text index was last brought up to date.
    indexed_at: Instant,
    /// A [`DoUpkeep`] is in the writer's mailbox.
    queued: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
struct DoUpkeep;

impl Persistence {
    /// The connection kept from the last unit of work, else one from the pool.
    fn connection(&mut self) -> Result<(PooledConn, Instant), DbError> {
        match self.held.take() {
            Some(held) => Ok(held),
            None => Ok((
                self.pool.get().map_err(|e| DbError::Pool(e.to_string()))?,
                Instant::now(),
            )),
        }
    }

    /// Keeps the connection for the next unit of work where this actor keeps one, the work
    /// succeeded and the connection is younger than the pool's lifetime (`DB_CONN_MAX_LIFETIME`);
    /// else it goes back to the pool, which checks a connection before handing it out again, so
    /// that one the server dropped is not kept, and retires one past its lifetime.
    fn give_back(&mut self, conn: PooledConn, since: Instant, succeeded: bool) {
        let young = self
            .pool
            .max_lifetime()
            .is_none_or(|lifetime| since.elapsed() < lifetime);
        if self.keep && succeeded && young {
            self.held = Some((conn, since));
        }
    }

    /// Runs one unit of work on this thread's connection: a panic costs only this unit, and a
    /// writer's upkeep is scheduled after one that succeeded.
    fn unit<T>(
        &mut self,
        ctx: &SyncContext<Self>,
        work: impl FnOnce(&mut DbConnection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let (mut conn, since) = self.connection()?;
        match catch_unwind(AssertUnwindSafe(|| work(&mut conn))) {
            // A unit of work that failed gives its connection back (see `give_back`).
            Ok(result) => {
                self.give_back(conn, since, result.is_ok());
                if result.is_ok() {
                    self.schedule_upkeep(ctx);
                }
                result
            }
            Err(panic) => {
                log::error!("a database task panicked: {}", panic_message(&panic));
                // Whatever the task left open must not reach the next user of this connection.
                // A transaction Diesel opened also marks the connection broken (the pool drops
                // it); one opened by raw SQL is only ended by this rollback.
                use diesel::connection::SimpleConnection;
                if conn.batch_execute("ROLLBACK").is_ok() {
                    log::warn!("rolled back the transaction the panicked task left open");
                }
                Err(DbError::Panicked)
            }
        }
    }

    /// A [`DoUpkeep`] waits in the mailbox.
    fn upkeep_queued(&self) -> bool {
        self.upkeep.as_ref().is_some_and(|u| u.queued)
    }

    fn schedule_upkeep(&mut self, ctx: &SyncContext<Self>) {
        let Some(upkeep) = &mut self.upkeep else {
            return;
        };
        if !upkeep.queued
            && (upkeep.indexed_at.elapsed() >= INDEX_EVERY || upkeep.checkpointer.wal_is_long())
        {
            upkeep.queued = true;
            ctx.address().do_send(DoUpkeep);
        }
    }
}

impl Handler<DoUpkeep> for Persistence {
    type Result = ();

    fn handle(&mut self, _: DoUpkeep, ctx: &mut SyncContext<Self>) {
        match &mut self.upkeep {
            Some(upkeep) => upkeep.queued = false,
            None => return,
        }
        // Without a connection it waits for the next unit of work to make it due again.
        let (mut conn, since) = match self.connection() {
            Ok(conn) => conn,
            Err(e) => {
                log::warn!("indexing new messages for search waits: {e}");
                return;
            }
        };
        let Some(upkeep) = &mut self.upkeep else {
            return;
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            upkeep.checkpointer.finish_long_wal(&mut conn);
            if upkeep.indexed_at.elapsed() < INDEX_EVERY {
                return Ok(None);
            }
            search::index_pending(&mut conn, INDEX_BATCH_MAX)
                .map(|indexed| Some(indexed as i64 == INDEX_BATCH_MAX))
        }));
        let succeeded = match outcome {
            Ok(Ok(None)) => true,
            // A full batch: there may be more, indexed next, after the group commit waiting now.
            Ok(Ok(Some(true))) => {
                upkeep.queued = true;
                ctx.address().do_send(DoUpkeep);
                true
            }
            Ok(Ok(Some(false))) => {
                upkeep.indexed_at = Instant::now();
                true
            }
            // Tried again after INDEX_EVERY; a search indexes what is left before it runs.
            Ok(Err(e)) => {
                log::warn!("indexing new messages for search failed (tried again shortly): {e}");
                upkeep.indexed_at = Instant::now();
                false
            }
            Err(panic) => {
                log::error!(
                    "indexing new messages for search panicked: {}",
                    panic_message(&panic)
                );
                upkeep.indexed_at = Instant::now();
                return;
            }
        };
        self.give_back(conn, since, succeeded);
    }
}

impl Actor for Persistence {
    type Context = SyncContext<Self>;
}

impl<T: 'static> Handler<RunQuery<T>> for Persistence {
    type Result = Result<T, DbError>;

    fn handle(&mut self, msg: RunQuery<T>, ctx: &mut SyncContext<Self>) -> Self::Result {
        self.unit(ctx, msg.0)
    }
}

/// Why a unit of work did not complete.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("no database connection: {0}")]
    Pool(String),
    #[error("the database task panicked")]
    Panicked,
    #[error("the persistence actor is not running")]
    Gone,
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        use diesel::result::{DatabaseErrorKind, Error};
        match e {
            DbError::Query(Error::NotFound) => ApiError::NotFound("record"),
            DbError::Query(Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
                ApiError::Conflict("it already exists".into())
            }
            DbError::Pool(cause) => {
                log::error!("database unavailable: {cause}");
                ApiError::Unavailable("the database")
            }
            other => ApiError::internal(other),
        }
    }
}

/// A cheap, cloneable handle on the persistence actor.
#[derive(Clone)]
pub struct Db {
    addr: Addr<Persistence>,
    /// The committer's single-thread writers (shared: every socket holds a `Db`).
    writers: Arc<[Addr<Persistence>]>,
    backend: Backend,
    pool: DbPool,
}

impl Db {
    /// Starts the actor's threads and the writers' (`write_lanes` of them on PostgreSQL; 0
    /// picks a number, see [`write_lanes`]), and on SQLite the [`Checkpointer`]. Must run inside
    /// an actix `System`.
    pub fn start(pool: DbPool, backend: Backend, write_lanes: usize) -> std::io::Result<Db> {
        let threads = pool.max_size() as usize;
        let checkpointer = match backend {
            Backend::Sqlite => Some(Arc::new(Checkpointer::start(
                pool.clone(),
                WAL_LONG_PAGES,
                COPY_EVERY,
            )?)),
            Backend::Postgres => None,
        };
        let start = |threads: usize, keep: bool, checkpointer: Option<Arc<Checkpointer>>| {
            let pool = pool.clone();
            SyncArbiter::start(threads, move || Persistence {
                pool: pool.clone(),
                keep,
                held: None,
                upkeep: checkpointer.clone().map(|checkpointer| Upkeep {
                    checkpointer,
                    indexed_at: Instant::now(),
                    queued: false,
                }),
            })
        };
        let addr = start(threads, false, None);
        let writers = match backend {
            Backend::Sqlite => 1,
            Backend::Postgres => self::write_lanes(write_lanes, pool.max_size() as usize),
        };
        // A writer keeps its connection only where the pool has as many again for everything
        // else: with one connection in all, a writer holding it would starve every read.
        let keep = pool.max_size() as usize >= 2 * writers;
        let writers = (0..writers)
            .map(|_| start(1, keep, checkpointer.clone()))
            .collect::<Vec<_>>()
            .into();
        Ok(Db {
            addr,
            writers,
            backend,
            pool,
        })
    }

    /// PostgreSQL: merges the full-text index's pending list every [`MERGE_SEARCH_INDEX_EVERY`]
    /// on a pooled connection, so that no group commit does it (see [`search::merge_pending`]).
    /// For the server, started once the migrations have made the index: started with the
    /// threads, its first merge ran before them on a new database and logged a failure.
    pub fn keep_search_index_merged(&self) {
        if self.backend != Backend::Postgres {
            return;
        }
        let db = self.clone();
        actix::spawn(async move {
            let mut tick = tokio::time::interval(MERGE_SEARCH_INDEX_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tick.tick().await;
                match db.run(|c| Ok(search::merge_pending(c)?)).await {
                    Ok(_) => failing = false,
                    // Once per outage; a group commit merges the list if it grows past its limit.
                    Err(e) if !failing => {
                        failing = true;
                        log::warn!("merging the search index's pending list failed: {e}");
                    }
                    Err(_) => {}
                }
            }
        });
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Connections open now and the pool's largest size, for health and `check-db`.
    pub fn pool_state(&self) -> (u32, u32) {
        let state = self.pool.state();
        (state.connections, self.pool.max_size())
    }

    /// How many writers there are for [`Db::write`] and the committer.
    pub fn writers(&self) -> usize {
        self.writers.len()
    }

    /// Brings the full-text index up to date with every message stored so far, so that a search
    /// that follows finds them (SQLite indexes in batches, see [`search::index_pending`]; on
    /// PostgreSQL there is nothing to do).
    pub async fn index_for_search(&self) -> Result<(), DbError> {
        if self.backend != Backend::Sqlite {
            return Ok(());
        }
        self.write(0, |c| {
            while search::index_pending(c, INDEX_BATCH_MAX)? as i64 == INDEX_BATCH_MAX {}
            Ok(())
        })
        .await
    }

    /// Asks writer `writer` to drain the committer's queue; gives `drain` back where the
    /// writer has stopped.
    fn drain(
        &self,
        writer: usize,
        drain: committer::DrainQueue,
    ) -> Result<(), committer::DrainQueue> {
        let addr = &self.writers[writer % self.writers.len()];
        if !addr.connected() {
            return Err(drain);
        }
        addr.do_send(drain);
        Ok(())
    }

    /// Runs `work` on a pooled connection in the persistence actor and waits for its result.
    pub async fn run<T, F>(&self, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, DbError> + Send + 'static,
    {
        Self::send(&self.addr, work).await
    }

    /// Runs `work` on writer `writer` (modulo the number of writers), which keeps its connection.
    pub async fn write<T, F>(&self, writer: usize, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, DbError> + Send + 'static,
    {
        Self::send(&self.writers[writer % self.writers.len()], work).await
    }

    async fn send<T, F>(to: &Addr<Persistence>, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, DbError> + Send + 'static,
    {
        to.send(RunQuery(Box::new(work)))
            .await
            .map_err(|_| DbError::Gone)?
    }
}

/// How many group-commit transactions can run at once on PostgreSQL (the writers; more than
/// one only once the first falls behind, see [`committer`]): `asked`, or where that is 0 one
/// per CPU core, at most half the pool and at most 8. Each keeps a PostgreSQL backend busy;
/// more of them than cores only take turns (on two cores, two held 10,000 deliveries/s at
/// p99 15 ms where four took 48 ms; docs/benchmarks.md).
pub fn write_lanes(asked: usize, pool_size: usize) -> usize {
    if asked > 0 {
        return asked;
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    cores.min(pool_size / 2).clamp(1, 8)
}

/// The text of a panic payload, for the log.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DatabaseSettings;
    use crate::db::{build_pool, run_migrations, sqlite_settings_in};

    #[test]
    fn write_lanes_follow_the_setting_else_the_cores_and_the_pool() {
        assert_eq!(
            write_lanes(3, 8),
            3,
            "an explicit setting is taken as it is"
        );
        assert_eq!(write_lanes(0, 2), 1, "half a pool of two");
        assert_eq!(write_lanes(0, 1), 1, "never none");
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(write_lanes(0, 64), cores.clamp(1, 8));
    }

    /// One thread, one connection: if a panic killed the thread or leaked the connection,
    /// the query after it could not run.
    #[actix_rt::test]
    async fn a_panic_in_a_write_costs_only_that_write() {
        let dir = tempfile::tempdir().unwrap();
        let settings = DatabaseSettings {
            max_open_conns: 1,
            max_idle_conns: 1,
            ..sqlite_settings_in(dir.path())
        };
        let (pool, backend) = build_pool(&settings).unwrap();
        let db = Db::start(pool, backend, 0).unwrap();
        db.run(|c| Ok(run_migrations(c))).await.unwrap().unwrap();

        let result: Result<(), DbError> = db
            .run(|c| {
                use diesel::connection::SimpleConnection;
                c.batch_execute(
                    "BEGIN; INSERT INTO users (id, email, role) VALUES ('u', 'u@x', 'customer');",
                )?;
                panic!("a write panicked half-way");
            })
            .await;
        assert!(matches!(result, Err(DbError::Panicked)), "{result:?}");

        let users: i64 = db
            .run(|c| {
                use crate::db::schema::users;
                use diesel::prelude::*;
                Ok(users::table.count().get_result(c)?)
            })
            .await
            .expect("the thread and a connection are still there");
        assert_eq!(users, 0, "the half-done transaction was not committed");
    }

    /// A Db on a new SQLite file with the migrations applied and one conversation in it, to
    /// which `store` adds messages by raw SQL (ids grow as they do for stored messages).
    pub(super) async fn sqlite_db(dir: &tempfile::TempDir) -> Db {
        let (pool, backend) = build_pool(&sqlite_settings_in(dir.path())).unwrap();
        let db = Db::start(pool, backend, 0).unwrap();
        db.run(|c| Ok(run_migrations(c))).await.unwrap().unwrap();
        db.write(0, |c| {
            use diesel::connection::SimpleConnection;
            Ok(c.batch_execute(
                "INSERT INTO users (id, email, role) VALUES ('u', 'u@x', 'customer');
                 INSERT INTO chat_sessions (id, user_id) VALUES ('s', 'u');",
            )?)
        })
        .await
        .unwrap();
        db
    }

    /// Stores `n` messages in one unit of work on the writer, as a group commit would; returns
    /// how many messages a full-text search for `content` finds right after, in the same unit.
    async fn store(db: &Db, n: usize, content: &'static str) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct Found {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        db.write(0, move |c| {
            use diesel::connection::SimpleConnection;
            use diesel::RunQueryDsl;
            c.batch_execute(&format!(
                "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {n})
                 INSERT INTO chat_messages (session_id, seq, role, content)
                 SELECT 's', (SELECT coalesce(max(seq), 0) FROM chat_messages) + i, 'user', '{content}'
                 FROM k;"
            ))?;
            let found: Found = diesel::sql_query(format!(
                "SELECT count(*) AS n FROM chat_messages_fts WHERE chat_messages_fts MATCH '\"{content}\"'"
            ))
            .get_result(c)?;
            Ok(found.n)
        })
        .await
        .unwrap()
    }

    /// (messages found by a full-text search for `word`, the newest id indexed, the newest id).
    async fn index_state(db: &Db, word: &'static str) -> (i64, i64, i64) {
        #[derive(diesel::QueryableByName)]
        struct State {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            found: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            indexed_to: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            newest: i64,
        }
        db.run(move |c| {
            use diesel::RunQueryDsl;
            let s: State = diesel::sql_query(format!(
                "SELECT (SELECT count(*) FROM chat_messages_fts WHERE chat_messages_fts MATCH '{word}') AS found,
                        (SELECT indexed_to FROM chat_messages_fts_progress) AS indexed_to,
                        (SELECT coalesce(max(id), 0) FROM chat_messages) AS newest"
            ))
            .get_result(c)?;
            Ok((s.found, s.indexed_to, s.newest))
        })
        .await
        .unwrap()
    }

    /// Nobody searches: the writer indexes what was stored on its own, between its writes.
    #[actix_rt::test]
    async fn the_writer_indexes_new_messages_between_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite_db(&dir).await;
        assert_eq!(
            store(&db, 3, "zebra crossing").await,
            0,
            "indexing is not part of the write"
        );
        let started = Instant::now();
        loop {
            // A write after INDEX_EVERY makes the indexing due.
            std::thread::sleep(INDEX_EVERY);
            store(&db, 1, "walrus").await;
            let (zebras, indexed_to, newest) = index_state(&db, "zebra").await;
            if zebras == 3 && indexed_to == newest {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "after 5 s the index holds {zebras} of 3 and is at {indexed_to} of {newest}"
            );
        }
    }

    /// A search indexes everything stored before it first, however much that is.
    #[actix_rt::test]
    async fn indexing_for_a_search_takes_every_message_stored_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite_db(&dir).await;
        let backlog = 3 * INDEX_BATCH_MAX as usize + 7;
        store(&db, backlog, "zebra").await;
        db.index_for_search().await.unwrap();
        let (zebras, indexed_to, newest) = index_state(&db, "zebra").await;
        assert_eq!(zebras, backlog as i64);
        assert_eq!(indexed_to, newest);
    }
}
