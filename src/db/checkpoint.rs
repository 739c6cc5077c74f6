//! SQLite's checkpoints, on a thread of their own.
//!
//! In WAL mode every commit appends pages to the `-wal` file; a checkpoint copies them into the
//! database file and syncs both. Left to itself, SQLite checkpoints inside the commit that takes
//! the WAL past 1,000 pages, so under load the group-commit writer stopped every few hundred
//! messages for a copy and two `fsync`s (5–50 ms measured). Connections are opened with
//! `wal_autocheckpoint = 0` instead, and [`Checkpointer`] copies the WAL every [`COPY_EVERY`]
//! with `PASSIVE` checkpoints, which neither wait for nor hold up a writer.
//!
//! With `synchronous = NORMAL` a commit is not synced: a power cut or an OS crash loses what
//! was committed since the WAL was last synced. Between copies this thread syncs the WAL every
//! [`SYNC_EVERY`], which bounds that loss. (Copying every 50 ms, which synced it as often, cost
//! three times the CPU: a page written again within the second is copied once.) With
//! `sqlite_synchronous = full` every commit is synced already and these syncs find nothing to
//! write.
//!
//! A WAL starts over from its beginning only when a write transaction begins while it is
//! copied to its end, which a writer that never pauses does not allow. So once the WAL is
//! [`WAL_LONG_PAGES`] long, the writer copies what is left of it itself between two units of
//! work ([`Checkpointer::finish_long_wal`]), and its next transaction starts the WAL over. That
//! holds the writer for the copy and two `fsync`s, once per [`WAL_LONG_PAGES`] written: every
//! few seconds at 5,000 messages/s. (At 64 MiB it was about every second, and at 1,000
//! messages/s it set p99: 37–44 ms against 6–7 ms at 256 MiB.) A `RESTART` checkpoint from
//! this thread would hold the writer as long, and the writer then waits out the lock in steps
//! of 1, 2, 5, 10… ms.
//!
//! What the writer's copy costs is kept small in three ways (it took 10–50 ms, growing with the
//! database, before):
//! - Once the WAL is long, this thread copies again at once, until a copy finds little left
//!   ([`CAUGHT_UP_PAGES`]); only then is the writer asked, so it has about as little to copy.
//!   Writes that outpace the copies are not waited out: the writer is asked all the same once
//!   the WAL has grown a quarter longer, or after [`CATCH_UP_PASSES_MAX`] copies.
//! - SQLite syncs the database file only in a checkpoint that copies the WAL to its end, which
//!   under constant writes is only the writer's: that one `fsync` then wrote out every page
//!   copied since the last start-over. After each of its copies this thread starts writing the
//!   copied pages out ([`start_writeback`]), without waiting, so little is left for that `fsync`.
//! - Right before the writer is asked, where the copies caught up, this thread syncs the WAL
//!   and the database file itself and copies once more, so the writer's two `fsync`s find only
//!   what was written since. A disk's `fsync` takes a few milliseconds however little it
//!   writes; the writer's took 7–30 ms while it also wrote out the last 50 ms of WAL. Where
//!   writes outpace the copies the writer has much to copy and sync whatever this thread
//!   does, and the syncs here would only let the WAL grow longer before it starts over.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;

use super::{DbConnection, DbPool};

/// How often the WAL is synced to disk: at most this much acknowledged work is lost to a power
/// cut (README).
const SYNC_EVERY: Duration = Duration::from_millis(50);

/// How often the WAL is copied into the database file.
pub const COPY_EVERY: Duration = Duration::from_secs(1);

/// A WAL this long (in pages, 256 MiB) is started over at the writer's next commit.
pub const WAL_LONG_PAGES: i64 = 65_536;

/// `journal_size_limit`: where the WAL is started over, its file is cut back to this. Twice
/// [`WAL_LONG_PAGES`], so that a WAL of the usual length (a little past that many frames of
/// 4,120 bytes) is overwritten in place: cut back to 256 MiB at each start-over, it was cut
/// and grown again each time, 3 ms inside the first commit after it.
pub const WAL_FILE_LIMIT_BYTES: i64 = 2 * WAL_LONG_PAGES * 4096;

/// A copy that found at most this many pages of the WAL left to copy took little time, so
/// little was added meanwhile: the writer, asked now, has about as little to copy.
const CAUGHT_UP_PAGES: i64 = 512;

/// Copies in a row at most while catching up with a long WAL; then the writer is asked all the
/// same (writes that outpace the copies are not caught up with).
const CATCH_UP_PASSES_MAX: u32 = 20;

/// Nor does catching up let the WAL grow past this share of its long length (in quarters):
/// the writer is asked then, whatever is left.
const CATCH_UP_WAL_QUARTERS: i64 = 5;

/// Checkpoints SQLite's WAL on a thread of its own, for as long as it is kept (see the module).
pub struct Checkpointer {
    wal_long: Arc<AtomicBool>,
    _stop: Sender<()>,
}

impl Checkpointer {
    /// Starts the thread; it ends when the returned value is dropped. `long_pages` and
    /// `copy_every` are [`WAL_LONG_PAGES`] and [`COPY_EVERY`] but in tests.
    pub fn start(
        pool: DbPool,
        long_pages: i64,
        copy_every: Duration,
    ) -> std::io::Result<Checkpointer> {
        let (stop, stopped) = channel::<()>();
        let wal_long = Arc::new(AtomicBool::new(false));
        let long = wal_long.clone();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let mut passes = Passes::default();
                let mut wait = SYNC_EVERY;
                let mut copied_at = Instant::now();
                let mut sync_failing = false;
                loop {
                    match stopped.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    // Catching up with a long WAL (`wait` zero) copies at once.
                    if !wait.is_zero() && copied_at.elapsed() < copy_every {
                        match passes.sync_wal(&pool) {
                            Ok(()) => sync_failing = false,
                            // Once per outage: it is tried again every SYNC_EVERY.
                            Err(e) if !sync_failing => {
                                sync_failing = true;
                                log::warn!(
                                    "syncing the SQLite WAL to disk failed (tried again \
                                     shortly; until then a power cut can lose more): {e}"
                                );
                            }
                            Err(_) => {}
                        }
                        continue;
                    }
                    copied_at = Instant::now();
                    let outcome = pool
                        .get()
                        .map_err(|e| e.to_string())
                        .and_then(|mut conn| passes.run(&mut conn).map_err(|e| e.to_string()));
                    wait = SYNC_EVERY;
                    match outcome {
                        Ok(Some(pass)) => match passes.next(pass, long_pages) {
                            Next::Wait => {}
                            Next::Again => wait = Duration::ZERO,
                            Next::AskTheWriter { caught_up } => {
                                if caught_up {
                                    passes.before_the_writer(&pool);
                                }
                                long.store(true, Ordering::Relaxed);
                            }
                        },
                        Ok(None) => return,
                        Err(e) => {
                            log::warn!(
                                "checkpointing the SQLite WAL failed (tried again shortly): {e}"
                            )
                        }
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
            match checkpoint(conn) {
                // This thread's own copy was running: the writer tries again after its next
                // unit of work, rather than letting the WAL grow until the next time it is asked.
                Ok(Some(wal)) if wal.busy != 0 => self.wal_long.store(true, Ordering::Relaxed),
                Ok(_) => {}
                Err(e) => log::warn!("checkpointing the SQLite WAL failed: {e}"),
            }
        }
    }
}

/// One checkpoint, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pass {
    /// The WAL's length.
    wal: i64,
    /// Copied by this checkpoint.
    copied: i64,
}

/// What the thread does after a checkpoint.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// The next one after [`COPY_EVERY`], with syncs in between.
    Wait,
    /// The WAL is long: copy again at once, to leave the writer little.
    Again,
    /// The WAL is long: the writer is to copy the rest and start it over. `caught_up` where
    /// the last copy found little left (else writes outpaced the copies).
    AskTheWriter { caught_up: bool },
}

/// The checkpoint thread's state from one checkpoint to the next.
#[derive(Default)]
struct Passes {
    /// The database file, opened by path to write out what the checkpoints copy into it.
    db_file: Option<std::fs::File>,
    /// Where the database file is, once asked: `Some(None)` for a database without one.
    db_path: Option<Option<PathBuf>>,
    /// How much of the WAL had been copied at the last checkpoint.
    copied_to: i64,
    /// Checkpoints in a row so far while catching up with a long WAL.
    catching_up: u32,
}

impl Passes {
    /// A `PASSIVE` checkpoint, then the pages it copied on their way to disk. `None` on
    /// PostgreSQL.
    fn run(&mut self, conn: &mut DbConnection) -> QueryResult<Option<Pass>> {
        let Some(wal) = checkpoint(conn)? else {
            return Ok(None);
        };
        // A WAL started over since the last checkpoint counts from its start again.
        let copied = if wal.checkpointed >= self.copied_to {
            wal.checkpointed - self.copied_to
        } else {
            wal.checkpointed
        };
        self.copied_to = wal.checkpointed;
        if copied > 0 {
            if self.db_file.is_none() {
                let file = self
                    .db_path(conn)
                    .and_then(|path| std::fs::File::open(path).ok());
                self.db_file = file;
            }
            if let Some(file) = &self.db_file {
                start_writeback(file);
            }
        }
        Ok(Some(Pass {
            wal: wal.log,
            copied,
        }))
    }

    /// Syncs the WAL file to disk, where there is one (opened each time: SQLite deletes it when
    /// its last connection closes).
    fn sync_wal(&mut self, pool: &DbPool) -> Result<(), String> {
        if self.db_path.is_none() {
            let mut conn = pool.get().map_err(|e| e.to_string())?;
            self.db_path(&mut conn);
        }
        let Some(path) = self.wal_path() else {
            return Ok(());
        };
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(wal) => wal
                .sync_data()
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Leaves the writer's copy as little to wait for as it can: syncs the WAL and the
    /// database file here (the writer's copy syncs both, and waited 7–30 ms for them on its
    /// own), then copies what was written meanwhile. Failures are left for the writer's copy to
    /// meet and report.
    fn before_the_writer(&mut self, pool: &DbPool) {
        let _ = self.sync_wal(pool);
        if let Some(file) = &self.db_file {
            let _ = file.sync_data();
        }
        if let Ok(mut conn) = pool.get() {
            let _ = self.run(&mut conn);
        }
    }

    /// The database's file, asked of `conn` until it answers.
    fn db_path(&mut self, conn: &mut DbConnection) -> Option<&Path> {
        if self.db_path.is_none() {
            self.db_path = database_path(conn)
                .ok()
                .map(|found| found.map(PathBuf::from));
        }
        self.db_path.as_ref()?.as_deref()
    }

    /// The WAL's file beside the database's, once that is known.
    fn wal_path(&self) -> Option<PathBuf> {
        let mut wal = self.db_path.as_ref()?.as_ref()?.clone().into_os_string();
        wal.push("-wal");
        Some(wal.into())
    }

    /// What follows checkpoint `pass`, for a WAL counted long at `long_pages`.
    fn next(&mut self, pass: Pass, long_pages: i64) -> Next {
        if pass.wal < long_pages {
            self.catching_up = 0;
            return Next::Wait;
        }
        let caught_up = pass.copied <= CAUGHT_UP_PAGES;
        if caught_up
            || self.catching_up >= CATCH_UP_PASSES_MAX
            || pass.wal >= long_pages / 4 * CATCH_UP_WAL_QUARTERS
        {
            self.catching_up = 0;
            return Next::AskTheWriter { caught_up };
        }
        self.catching_up += 1;
        Next::Again
    }
}

/// Starts writing the file's dirty pages to disk without waiting for them (Linux; elsewhere the
/// writer's `fsync` writes them).
fn start_writeback(file: &std::fs::File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor, the whole file; the call only schedules writes.
        let done =
            unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        if done != 0 {
            log::debug!(
                "writing out the SQLite database file: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// The main database's file, where it has one.
fn database_path(conn: &mut DbConnection) -> QueryResult<Option<String>> {
    #[derive(QueryableByName)]
    struct Database {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        file: String,
    }
    let DbConnection::Sqlite(conn) = conn else {
        return Ok(None);
    };
    let list: Vec<Database> = diesel::sql_query("PRAGMA database_list").load(conn)?;
    Ok(list
        .into_iter()
        .find(|d| d.name == "main" && !d.file.is_empty())
        .map(|d| d.file))
}

/// What `PRAGMA wal_checkpoint` answers, in pages.
#[derive(QueryableByName)]
struct WalPages {
    /// 1 where another checkpoint was running, so this one copied nothing.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    busy: i32,
    /// The WAL's length.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    log: i64,
    /// Of which copied into the database file, by this checkpoint or earlier ones.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    checkpointed: i64,
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
    use diesel::connection::SimpleConnection;

    use super::*;
    use crate::db::{build_pool, sqlite_settings_in, PooledConn};

    /// Copies as often as the WAL is synced, so that a test sees a long WAL soon.
    const COPY_EVERY_IN_TESTS: Duration = SYNC_EVERY;

    /// A pool on a new SQLite file `t.db` in `dir` holding table `t`, and a connection of it.
    fn table_in(dir: &tempfile::TempDir) -> (DbPool, PooledConn) {
        let (pool, _) = build_pool(&sqlite_settings_in(dir.path())).unwrap();
        let mut conn = pool.get().unwrap();
        // The pool opens another connection in the background to replace the one taken, and
        // opening one reads the database. A checkpoint copies nothing past what a reader
        // started with, so one that ran meanwhile could find it had copied nothing: wait.
        let started = Instant::now();
        while pool.state().idle_connections < pool.min_idle().unwrap_or(0) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the pool did not open its idle connections"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        conn.batch_execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            .unwrap();
        (pool, conn)
    }

    /// Commits one row of 1,000 bytes to `t`: one page of the WAL at least.
    fn add_row(conn: &mut DbConnection) {
        conn.batch_execute(&format!(
            "INSERT INTO t (body) VALUES ('{}')",
            "x".repeat(1_000)
        ))
        .unwrap();
    }

    /// A writer that never pauses, as under load: the WAL is copied and started over all the
    /// same, so it stays near the length it is allowed, however much is written.
    #[test]
    fn the_wal_starts_over_under_writes_that_never_pause() {
        const LONG: i64 = 64;
        let dir = tempfile::tempdir().unwrap();
        let (pool, mut conn) = table_in(&dir);
        let checkpointer = Checkpointer::start(pool.clone(), LONG, COPY_EVERY_IN_TESTS).unwrap();

        // A WAL that starts over gets a new salt in its header (bytes 16..20).
        let wal_file = dir.path().join("t.db-wal");
        let salt = || {
            use std::io::Read;
            let mut header = [0u8; 20];
            let mut file = std::fs::File::open(&wal_file).ok()?;
            file.read_exact(&mut header).ok()?;
            Some(header[16..20].to_vec())
        };
        let mut salts = std::collections::HashSet::new();
        let started = Instant::now();
        let mut commits = 0u64;
        while started.elapsed() < Duration::from_millis(1_500) {
            add_row(&mut conn);
            commits += 1;
            checkpointer.finish_long_wal(&mut conn);
            if commits.is_multiple_of(256) {
                salts.extend(salt());
            }
        }

        // Every commit appends at least one page. The WAL is started over after the check that
        // finds it long, up to COPY_EVERY_IN_TESTS later (longer where the machine is busy and
        // this thread waits for a core): it holds what that much time writes, never all of it.
        let wal_pages = std::fs::metadata(&wal_file).unwrap().len() / (4_096 + 24);
        assert!(
            commits > 20 * LONG as u64,
            "only {commits} commits in 1.5 s"
        );
        assert!(
            salts.len() >= 4,
            "the WAL started over {} times in 1.5 s",
            salts.len().saturating_sub(1)
        );
        assert!(
            wal_pages * 4 < commits * 3,
            "the WAL grew to {wal_pages} pages over {commits} commits"
        );
        let rows: Count = diesel::sql_query("SELECT count(*) AS n FROM t")
            .get_result(&mut *conn)
            .unwrap();
        assert_eq!(rows.n, commits as i64, "every commit is there");
    }

    /// Once the WAL is long, copies follow each other until one finds little left; only then is
    /// the writer asked, and all the same after [`CATCH_UP_PASSES_MAX`] copies or once the WAL
    /// has grown a quarter longer.
    #[test]
    fn a_long_wal_is_copied_again_until_little_is_left_for_the_writer() {
        const LONG: i64 = 1_000;
        // One checkpoint after the other: (the WAL's length, pages copied, what follows).
        let mut steps = vec![
            (999, 900, Next::Wait),
            (1_000, 900, Next::Again),
            (1_100, 600, Next::Again),
            (
                1_150,
                CAUGHT_UP_PAGES,
                Next::AskTheWriter { caught_up: true },
            ),
        ];
        // Writes that outpace the copies: so many copies in a row at most, counted afresh after,
        steps.extend((0..CATCH_UP_PASSES_MAX).map(|_| (1_100, 700, Next::Again)));
        steps.push((1_100, 700, Next::AskTheWriter { caught_up: false }));
        steps.push((1_100, 700, Next::Again));
        // and a WAL a quarter longer at most.
        steps.push((1_249, 700, Next::Again));
        steps.push((1_250, 700, Next::AskTheWriter { caught_up: false }));

        let mut passes = Passes::default();
        for (i, (wal, copied, next)) in steps.into_iter().enumerate() {
            assert_eq!(
                passes.next(Pass { wal, copied }, LONG),
                next,
                "checkpoint {i}: a WAL of {wal} pages, {copied} copied"
            );
        }
    }

    /// Each checkpoint counts the pages it copied itself, also after the WAL started over, and
    /// finds the database file to write them out.
    #[test]
    fn each_checkpoint_counts_the_pages_it_copied() {
        let dir = tempfile::tempdir().unwrap();
        let (_pool, mut conn) = table_in(&dir);
        for _ in 0..20 {
            add_row(&mut conn);
        }
        let mut passes = Passes::default();

        let first = passes.run(&mut conn).unwrap().unwrap();
        assert!(
            first.copied >= 20,
            "one page per commit at least: {first:?}"
        );
        assert_eq!(first.copied, first.wal, "nothing holds the WAL back");
        assert!(passes.db_file.is_some(), "the database file was found");
        assert_eq!(passes.run(&mut conn).unwrap().unwrap().copied, 0);

        // The WAL was copied to its end: the next commit starts it over.
        for _ in 0..3 {
            add_row(&mut conn);
        }
        let after = passes.run(&mut conn).unwrap().unwrap();
        assert!(
            after.wal < first.wal,
            "started over: {after:?} after {first:?}"
        );
        assert_eq!(after.copied, after.wal);
    }

    /// Before the writer is asked to finish a long WAL, what was written since the last copy is
    /// copied too, so the writer finds nothing left to copy.
    #[test]
    fn the_writer_is_asked_once_the_wal_is_copied_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, mut conn) = table_in(&dir);
        let mut passes = Passes::default();
        for _ in 0..20 {
            add_row(&mut conn);
        }
        passes.run(&mut conn).unwrap();
        for _ in 0..5 {
            add_row(&mut conn);
        }
        drop(conn);

        passes.before_the_writer(&pool);

        let mut conn = pool.get().unwrap();
        let left = checkpoint(&mut conn).unwrap().unwrap();
        assert_eq!(
            (left.checkpointed, left.log),
            (passes.copied_to, passes.copied_to),
            "the WAL is copied to its end"
        );
    }

    /// Between copies the WAL is only synced: the database file takes the commits once
    /// [`COPY_EVERY`] has passed, not before.
    #[test]
    fn the_wal_is_synced_often_and_copied_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, mut conn) = table_in(&dir);
        let db_file = dir.path().join("t.db");
        let size = || std::fs::metadata(&db_file).unwrap().len();
        let mut passes = Passes::default();
        passes.run(&mut conn).unwrap();
        let before = size();
        let started = Instant::now();
        let _checkpointer = Checkpointer::start(pool.clone(), WAL_LONG_PAGES, COPY_EVERY).unwrap();
        for _ in 0..20 {
            add_row(&mut conn);
        }

        std::thread::sleep(4 * SYNC_EVERY);
        assert!(
            started.elapsed() < COPY_EVERY,
            "the machine is too slow for this test"
        );
        assert_eq!(size(), before, "nothing copied before a second has passed");
        passes.sync_wal(&pool).unwrap();
        assert_eq!(
            passes.wal_path(),
            Some(dir.path().join("t.db-wal")),
            "the WAL synced is the database's"
        );

        while size() == before {
            assert!(
                started.elapsed() < 10 * COPY_EVERY,
                "the WAL was not copied in {:?}",
                started.elapsed()
            );
            std::thread::sleep(SYNC_EVERY);
        }
        assert!(
            started.elapsed() >= COPY_EVERY,
            "copied after {:?}",
            started.elapsed()
        );
        assert!(
            size() >= before + 20 * 1_000,
            "the rows are in the database file"
        );
    }

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
}
