//! Persistence actor: the only code that runs Diesel.
//!
//! Runs on a `SyncArbiter` with one thread per pooled connection (`DB_MAX_OPEN_CONNS`), because
//! Diesel blocks. It owns the pool; everything else holds a [`Db`] handle and sends it work.
//! Group commit has writers of its own: one thread per committer lane, each keeping one pooled
//! connection between batches (where the pool has as many again for reads), so that the
//! connection that wrote last writes next (SQLite drops a connection's page cache whenever
//! another connection has written since its last transaction) and PostgreSQL keeps its
//! prepared statements.
//! A panic inside a unit of work is caught here: the caller gets `DbError::Panicked`, the thread
//! lives on, and the connection (left inside a broken transaction) is discarded by the pool.

pub mod committer;
pub mod messages;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use actix::{Actor, Addr, Handler, SyncArbiter, SyncContext};

pub use messages::RunQuery;

use crate::db::{Backend, Checkpointer, DbConnection, DbPool, PooledConn, WAL_LONG_PAGES};
use crate::error::ApiError;

pub struct Persistence {
    pool: DbPool,
    /// Keep the connection between units of work (a committer's writer).
    keep: bool,
    /// The connection kept since the last unit of work that succeeded, and since when.
    held: Option<(PooledConn, Instant)>,
    /// A writer on SQLite: the checkpointer it finishes a long WAL for.
    checkpointer: Option<Arc<Checkpointer>>,
}

impl Actor for Persistence {
    type Context = SyncContext<Self>;
}

impl<T: 'static> Handler<RunQuery<T>> for Persistence {
    type Result = Result<T, DbError>;

    fn handle(&mut self, msg: RunQuery<T>, _: &mut SyncContext<Self>) -> Self::Result {
        let (mut conn, since) = match self.held.take() {
            Some(held) => held,
            None => (
                self.pool.get().map_err(|e| DbError::Pool(e.to_string()))?,
                Instant::now(),
            ),
        };
        match catch_unwind(AssertUnwindSafe(|| (msg.0)(&mut conn))) {
            // A unit of work that failed gives its connection back: the pool checks it before
            // handing it out again, so a connection the server dropped is not kept. So does one
            // past the pool's lifetime (`DB_CONN_MAX_LIFETIME`), for the pool to retire.
            Ok(result) => {
                if let (Some(checkpointer), Ok(_)) = (&self.checkpointer, &result) {
                    checkpointer.after_write(&mut conn);
                }
                let young = self
                    .pool
                    .max_lifetime()
                    .is_none_or(|lifetime| since.elapsed() < lifetime);
                if self.keep && result.is_ok() && young {
                    self.held = Some((conn, since));
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
    /// One single-thread writer per committer lane.
    writers: Vec<Addr<Persistence>>,
    backend: Backend,
    pool: DbPool,
}

impl Db {
    /// Starts the actor's threads and the writers' (`write_lanes` of them on PostgreSQL; 0
    /// picks a number, see [`write_lanes`]), and on SQLite the [`Checkpointer`]. Must run
    /// inside an actix `System`.
    pub fn start(pool: DbPool, backend: Backend, write_lanes: usize) -> std::io::Result<Db> {
        let threads = pool.max_size() as usize;
        let checkpointer = match backend {
            Backend::Sqlite => Some(Arc::new(Checkpointer::start(pool.clone(), WAL_LONG_PAGES)?)),
            Backend::Postgres => None,
        };
        let start = |threads: usize, keep: bool, checkpointer: Option<Arc<Checkpointer>>| {
            let pool = pool.clone();
            SyncArbiter::start(threads, move || Persistence {
                pool: pool.clone(),
                keep,
                held: None,
                checkpointer: checkpointer.clone(),
            })
        };
        let addr = start(threads, false, None);
        let lanes = match backend {
            Backend::Sqlite => 1,
            Backend::Postgres => self::write_lanes(write_lanes, pool.max_size() as usize),
        };
        // A writer keeps its connection only where the pool has as many again for everything
        // else: with one connection in all, a writer holding it would starve every read.
        let keep = pool.max_size() as usize >= 2 * lanes;
        let writers = (0..lanes)
            .map(|_| start(1, keep, checkpointer.clone()))
            .collect();
        Ok(Db {
            addr,
            writers,
            backend,
            pool,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Connections open now and the pool's largest size, for health and `check-db`.
    pub fn pool_state(&self) -> (u32, u32) {
        let state = self.pool.state();
        (state.connections, self.pool.max_size())
    }

    /// How many writers there are for [`Db::write`]: the committer's lanes.
    pub fn writer_lanes(&self) -> usize {
        self.writers.len()
    }

    /// Runs `work` on a pooled connection in the persistence actor and waits for its result.
    pub async fn run<T, F>(&self, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, DbError> + Send + 'static,
    {
        Self::send(&self.addr, work).await
    }

    /// Runs `work` on writer `lane` (modulo the number of writers), which keeps its connection.
    pub async fn write<T, F>(&self, lane: usize, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, DbError> + Send + 'static,
    {
        Self::send(&self.writers[lane % self.writers.len()], work).await
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

/// How many group-commit transactions run at once on PostgreSQL: `asked`, or where that is 0
/// one per CPU core, at most half the pool and at most 8. Each keeps a PostgreSQL backend
/// busy; more of them than cores only take turns (on two cores, two lanes held 10,000
/// deliveries/s at p99 15 ms where four took 48 ms; docs/benchmarks.md).
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
    use crate::config::{DatabaseSettings, Secret};
    use crate::db::{build_pool, run_migrations};

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
            url: Secret::new(format!("sqlite://{}/t.db", dir.path().display())),
            max_open_conns: 1,
            max_idle_conns: 1,
            ..DatabaseSettings::default()
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
}
