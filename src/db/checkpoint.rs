//! SQLite's checkpoints, on a thread of their own.
//!
//! In WAL mode every commit appends pages to the `-wal` file; a checkpoint copies them into the
//! database file and syncs both. Left to itself, SQLite checkpoints inside the commit that takes
//! the WAL past 1,000 pages, so under load the group-commit writer stopped every few hundred
//! messages for a copy and two `fsync`s (5–50 ms measured). Connections are opened with
//! `wal_autocheckpoint = 0` instead, and [`Checkpointer`] copies the WAL every
//! [`CHECKPOINT_EVERY`] with `PASSIVE` checkpoints, which neither wait for nor hold up a writer.
//!
//! A WAL starts over from its beginning only when a write transaction begins while it is
//! copied to its end, which a writer that never pauses does not allow. So once the WAL is
//! [`WAL_LONG_PAGES`] long, the writer copies what is left of it itself between two units of
//! work ([`Checkpointer::finish_long_wal`]), and its next transaction starts the WAL over. That holds
//! the writer for the copy and two `fsync`s, 15–45 ms measured under load, once per
//! [`WAL_LONG_PAGES`] written: every few seconds at 5,000 messages/s. (At 64 MiB it was about
//! every second, and at 1,000 messages/s it set p99: 37–44 ms against 6–7 ms at 256 MiB.) A
//! `RESTART` checkpoint from this thread would hold the writer as long, and the writer then
//! waits out the lock in steps of 1, 2, 5, 10… ms.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;

use super::{DbConnection, DbPool};

/// How often the WAL is copied into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// A WAL this long (in pages, 256 MiB) is started over at the writer's next commit; the file
/// is cut back to this size when it is.
pub const WAL_LONG_PAGES: i64 = 65_536;

/// Checkpoints SQLite's WAL on a thread of its own, for as long as it is kept (see the module).
pub struct Checkpointer {
    wal_long: Arc<AtomicBool>,
    _stop: Sender<()>,
}

impl Checkpointer {
    /// Starts the thread; it ends when the returned value is dropped. `long_pages` is
    /// [`WAL_LONG_PAGES`] but in tests.
    pub fn start(pool: DbPool, long_pages: i64) -> std::io::Result<Checkpointer> {
        let (stop, stopped) = channel::<()>();
        let wal_long = Arc::new(AtomicBool::new(false));
        let long = wal_long.clone();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || loop {
                match stopped.recv_timeout(CHECKPOINT_EVERY) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let outcome = pool
                    .get()
                    .map_err(|e| e.to_string())
                    .and_then(|mut conn| checkpoint(&mut conn).map_err(|e| e.to_string()));
                match outcome {
                    Ok(Some(wal)) => {
                        if wal.log >= long_pages {
                            long.store(true, Ordering::Relaxed);
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        log::warn!("checkpointing the SQLite WAL failed (tried again shortly): {e}")
                    }
                }
            })?;
        Ok(Checkpointer {
            wal_long,
            _stop: stop,
        })
    }

    /// Whether the writer is to finish the WAL ([`Checkpointer::finish_long_wal`]).
    pub fn wal_is_long(&self) -> bool {
        self.wal_long.load(Ordering::Relaxed)
    }

    /// Run by the writer between units of work, on its connection: where the WAL is long, copies
    /// the rest of it, so that the next transaction starts it over.
    pub fn finish_long_wal(&self, conn: &mut DbConnection) {
        if self.wal_long.swap(false, Ordering::Relaxed) {
            if let Err(e) = checkpoint(conn) {
                log::warn!("checkpointing the SQLite WAL failed: {e}");
            }
        }
    }
}

/// What `PRAGMA wal_checkpoint` answers, in pages.
#[derive(QueryableByName)]
struct WalPages {
    /// The WAL's length.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    log: i64,
}

/// A `PASSIVE` checkpoint: copies what no open read transaction still needs from the WAL.
/// `None` on PostgreSQL.
fn checkpoint(conn: &mut DbConnection) -> QueryResult<Option<WalPages>> {
    match conn {
        DbConnection::Sqlite(conn) => diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)")
            .get_result(conn)
            .map(Some),
        DbConnection::Pg(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use diesel::connection::SimpleConnection;

    use super::*;
    use crate::db::{build_pool, sqlite_settings_in};

    /// A writer that never pauses, as under load: the WAL is copied and started over all the
    /// same, so it stays near the length it is allowed, however much is written.
    #[test]
    fn the_wal_starts_over_under_writes_that_never_pause() {
        const LONG: i64 = 64;
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = build_pool(&sqlite_settings_in(dir.path())).unwrap();
        let mut conn = pool.get().unwrap();
        conn.batch_execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            .unwrap();
        let checkpointer = Checkpointer::start(pool.clone(), LONG).unwrap();

        let started = Instant::now();
        let mut commits = 0u64;
        while started.elapsed() < Duration::from_millis(1_500) {
            conn.batch_execute(&format!(
                "INSERT INTO t (body) VALUES ('{}')",
                "x".repeat(1_000)
            ))
            .unwrap();
            commits += 1;
            checkpointer.finish_long_wal(&mut conn);
        }

        // Every commit appends at least one page. The WAL is started over after the check that
        // finds it long, up to CHECKPOINT_EVERY later: it holds what that much time writes.
        let wal_pages = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len()
            / (4_096 + 24);
        assert!(
            commits > 20 * LONG as u64,
            "only {commits} commits in 1.5 s"
        );
        assert!(
            wal_pages * 4 < commits,
            "the WAL grew to {wal_pages} pages over {commits} commits: it was not started over"
        );
        let rows: Count = diesel::sql_query("SELECT count(*) AS n FROM t")
            .get_result(&mut *conn)
            .unwrap();
        assert_eq!(rows.n, commits as i64, "every commit is there");
    }

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
}
