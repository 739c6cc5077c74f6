//! SQLite: a commit's WAL frames reach the file in two writes (one more per 120 KiB) instead of
//! two per page.
//!
//! SQLite appends a commit to the `-wal` file a frame at a time, and each frame as two writes:
//! its 24-byte header, then the page. At 5,000 messages a second that was about 40,000 `pwrite`
//! calls a second on the writer's thread. [`install`] puts a thin layer in front of the
//! platform's VFS, the default for every connection this process opens. It leaves every file
//! alone but a WAL, and for a WAL it only gathers: a write that continues the bytes gathered so
//! far is added to them in memory, and they are written with one call
//!
//! - as soon as a commit's frame is reached: from the header of the frame that marks the
//!   commit (it holds the database's size) on, every write goes straight to the file, so all
//!   of a commit is in the file before SQLite marks it visible in the WAL index, as before;
//! - before anything else reaches the file: a read, a sync, a truncate, its size, a file
//!   control, close, or a write somewhere else;
//! - before the bytes waiting would pass [`GATHER_MAX`].
//!
//! The file gets the same bytes in the same order at the same offsets, and a commit is in the
//! file when it returns: what another connection, the checkpointer's sync or a crash can see is
//! unchanged. A failed write fails the SQLite call that made it, so a commit whose frames could
//! not be written is rolled back and reported, as before. Where the file system does not
//! promise power-safe overwrites, SQLite pads commits to a sector with writes this cannot tell
//! from headers, so there it gathers nothing.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Once;

use libsqlite3_sys as ffi;

/// The VFS's name (a URI can name it with `?vfs=`; it is also the default once installed).
const NAME: &CStr = c"switchboard-wal";

/// The most bytes written at once. SQLite's unix VFS writes less than 128 KiB in one call (it
/// cuts a larger size to its low 17 bits, and the short write reads as a full disk).
const GATHER_MAX: usize = 120 * 1024;

/// A WAL frame's header; its bytes 4..8 hold the database's size in pages after a commit, and
/// are zero in every frame but a commit's last.
const FRAME_HEADER: usize = 24;

/// The platform's VFS, which does the work.
static PLATFORM: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(ptr::null_mut());

/// Makes this VFS the default for SQLite connections opened from now on. Idempotent; where
/// SQLite has no default VFS, nothing changes.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| unsafe {
        let platform = ffi::sqlite3_vfs_find(ptr::null());
        if platform.is_null() {
            return;
        }
        PLATFORM.store(platform, Ordering::Release);
        // Everything but opening a file is the platform's own, with its own data.
        let mut vfs = ptr::read(platform);
        vfs.pNext = ptr::null_mut();
        vfs.zName = NAME.as_ptr();
        vfs.szOsFile = c_int::try_from(inner_offset() + (*platform).szOsFile as usize)
            .expect("a file handle's size fits an int");
        vfs.xOpen = Some(open);
        let rc = ffi::sqlite3_vfs_register(Box::leak(Box::new(vfs)), 1);
        if rc != ffi::SQLITE_OK {
            log::warn!("SQLite refused the WAL-gathering VFS (code {rc}); the platform's is used");
        }
    });
}

/// A WAL file: SQLite's handle, then the platform's file at [`inner_offset`].
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    gathered: Vec<u8>,
    /// The file offset of `gathered[0]`.
    at: i64,
    /// Gather writes (the file promises power-safe overwrites, so SQLite writes whole frames).
    gather: bool,
    /// The last frame header written marks a commit: what follows is written at once.
    in_commit: bool,
}

/// Where the platform's file starts inside ours (aligned as SQLite aligns its allocations).
const fn inner_offset() -> usize {
    std::mem::size_of::<WalFile>().next_multiple_of(16)
}

fn platform() -> *mut ffi::sqlite3_vfs {
    PLATFORM.load(Ordering::Acquire)
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let platform = platform();
    let Some(platform_open) = (*platform).xOpen else {
        return ffi::SQLITE_ERROR;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Not a WAL: the platform's file sits where SQLite put ours, with its own methods.
        return platform_open(platform, name, file, flags, out_flags);
    }
    let inner = file
        .cast::<u8>()
        .add(inner_offset())
        .cast::<ffi::sqlite3_file>();
    let rc = platform_open(platform, name, inner, flags, out_flags);
    if rc != ffi::SQLITE_OK {
        if let Some(close) = (*inner).pMethods.as_ref().and_then(|m| m.xClose) {
            close(inner);
        }
        (*file).pMethods = ptr::null();
        return rc;
    }
    let characteristics = match (*(*inner).pMethods).xDeviceCharacteristics {
        Some(f) => f(inner),
        None => 0,
    };
    ptr::write(
        file.cast::<WalFile>(),
        WalFile {
            base: ffi::sqlite3_file {
                pMethods: &WAL_METHODS,
            },
            inner,
            gathered: Vec::new(),
            at: 0,
            gather: characteristics & ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE != 0,
            in_commit: false,
        },
    );
    ffi::SQLITE_OK
}

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

unsafe fn wal<'a>(file: *mut ffi::sqlite3_file) -> &'a mut WalFile {
    &mut *file.cast::<WalFile>()
}

unsafe fn methods(wal: &WalFile) -> &ffi::sqlite3_io_methods {
    &*(*wal.inner).pMethods
}

/// Writes what is gathered, if anything. The gathered bytes are gone either way: after a
/// failure SQLite abandons the transaction they belonged to.
unsafe fn flush(wal: &mut WalFile) -> c_int {
    if wal.gathered.is_empty() {
        return ffi::SQLITE_OK;
    }
    let Ok(amount) = c_int::try_from(wal.gathered.len()) else {
        wal.gathered.clear();
        return ffi::SQLITE_IOERR_WRITE;
    };
    let rc = match methods(wal).xWrite {
        Some(write) => write(wal.inner, wal.gathered.as_ptr().cast(), amount, wal.at),
        None => ffi::SQLITE_IOERR_WRITE,
    };
    wal.gathered.clear();
    rc
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    let wal = wal(file);
    if !wal.gather {
        return match methods(wal).xWrite {
            Some(write) => write(wal.inner, buf, amount, offset),
            None => ffi::SQLITE_IOERR_WRITE,
        };
    }
    let Ok(len) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    if !wal.gathered.is_empty()
        && (offset != wal.at + wal.gathered.len() as i64 || wal.gathered.len() + len > GATHER_MAX)
    {
        let rc = flush(wal);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    let bytes = std::slice::from_raw_parts(buf.cast::<u8>(), len);
    if wal.gathered.is_empty() {
        wal.at = offset;
    }
    wal.gathered.extend_from_slice(bytes);
    if len == FRAME_HEADER {
        wal.in_commit = bytes[4..8] != [0; 4];
    }
    if wal.in_commit || wal.gathered.len() >= GATHER_MAX {
        return flush(wal);
    }
    ffi::SQLITE_OK
}

/// Flushes, then hands the call to the platform's file.
macro_rules! after_flush {
    ($file:ident, $method:ident ( $($arg:expr),* )) => {{
        let wal = wal($file);
        let rc = flush(wal);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        match methods(wal).$method {
            Some(f) => f(wal.inner $(, $arg)*),
            None => ffi::SQLITE_IOERR,
        }
    }};
}

/// Hands the call to the platform's file; `$missing` where its methods (of at least version
/// `$version`) have none.
macro_rules! pass {
    ($file:ident, $method:ident ( $($arg:expr),* ), $missing:expr) => {
        pass!($file, 1, $method($($arg),*), $missing)
    };
    ($file:ident, $version:literal, $method:ident ( $($arg:expr),* ), $missing:expr) => {{
        let wal = wal($file);
        let methods = methods(wal);
        match methods.$method {
            Some(f) if methods.iVersion >= $version => f(wal.inner $(, $arg)*),
            _ => $missing,
        }
    }};
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let wal = wal(file);
    let flushed = flush(wal);
    let closed = match methods(wal).xClose {
        Some(close) => close(wal.inner),
        None => ffi::SQLITE_OK,
    };
    ptr::drop_in_place(&mut wal.gathered);
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    after_flush!(file, xRead(buf, amount, offset))
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    after_flush!(file, xTruncate(size))
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    after_flush!(file, xSync(flags))
}

unsafe extern "C" fn file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    after_flush!(file, xFileSize(size))
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    after_flush!(file, xFileControl(op, arg))
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    pass!(file, xLock(level), ffi::SQLITE_OK)
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    pass!(file, xUnlock(level), ffi::SQLITE_OK)
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    pass!(file, xCheckReservedLock(out), ffi::SQLITE_OK)
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    pass!(file, xSectorSize(), 4096)
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    pass!(file, xDeviceCharacteristics(), 0)
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    pass!(file, 2, xShmMap(page, size, extend, out), ffi::SQLITE_IOERR)
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    pass!(file, 2, xShmLock(offset, n, flags), ffi::SQLITE_IOERR)
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    pass!(file, 2, xShmBarrier(), ())
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    pass!(file, 2, xShmUnmap(delete), ffi::SQLITE_OK)
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let rc = flush(wal(file));
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    // Without a mapping SQLite reads instead.
    *out = ptr::null_mut();
    pass!(file, 3, xFetch(offset, amount, out), ffi::SQLITE_OK)
}

unsafe extern "C" fn unfetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    page: *mut c_void,
) -> c_int {
    pass!(file, 3, xUnfetch(offset, page), ffi::SQLITE_OK)
}

#[cfg(test)]
mod tests {
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::sql_types::BigInt;

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    fn open(path: &std::path::Path, cache_pages: u32) -> SqliteConnection {
        crate::db::prepare_sqlite();
        let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        conn.batch_execute(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = {cache_pages};"
        ))
        .unwrap();
        conn
    }

    fn rows(conn: &mut SqliteConnection) -> i64 {
        diesel::sql_query("SELECT count(*) AS n FROM t")
            .get_result::<Count>(conn)
            .unwrap()
            .n
    }

    /// The rows the files hold right now, as a crash would leave them: the database and its
    /// WAL, copied while the writer's connection is still open, then opened elsewhere and
    /// checked whole.
    fn rows_after_a_crash(dir: &tempfile::TempDir) -> i64 {
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("db"), copy.path().join("db")).unwrap();
        std::fs::copy(dir.path().join("db-wal"), copy.path().join("db-wal")).unwrap();
        let mut conn =
            SqliteConnection::establish(copy.path().join("db").to_str().unwrap()).unwrap();
        let check: Vec<Check> = diesel::sql_query("PRAGMA integrity_check")
            .load(&mut conn)
            .unwrap();
        assert_eq!(check.len(), 1);
        assert_eq!(check[0].integrity_check, "ok");
        rows(&mut conn)
    }

    #[derive(QueryableByName)]
    struct Check {
        #[diesel(sql_type = diesel::sql_types::Text)]
        integrity_check: String,
    }

    /// Every commit is in the files when it returns, small ones, ones larger than one write
    /// can carry, and ones that outgrow the page cache (SQLite writes their pages to the WAL
    /// before the commit and rewrites some in place).
    #[test]
    fn every_commit_is_in_the_files_when_it_returns() {
        for cache_pages in [2000, 20] {
            let dir = tempfile::tempdir().unwrap();
            let mut conn = open(&dir.path().join("db"), cache_pages);
            conn.batch_execute(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT NOT NULL UNIQUE, body TEXT NOT NULL)",
            )
            .unwrap();
            let mut stored = 0;
            for batch in [1, 3, 40, 400, 2000] {
                conn.batch_execute(&format!(
                    "BEGIN; \
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {batch}) \
                     INSERT INTO t (k, body) SELECT hex(randomblob(16)), hex(randomblob(200)) FROM n; \
                     UPDATE t SET body = hex(randomblob(100)) WHERE id % 7 = 0; \
                     COMMIT;"
                ))
                .unwrap();
                stored += batch;
                assert_eq!(
                    rows_after_a_crash(&dir),
                    stored,
                    "cache of {cache_pages} pages"
                );
            }
            // The writer's own connection reads what it wrote, and so does another.
            assert_eq!(rows(&mut conn), stored);
            assert_eq!(rows(&mut open(&dir.path().join("db"), 2000)), stored);
        }
    }

    /// A transaction rolled back after its pages reached the WAL leaves nothing behind, and
    /// the next commit, written over the same part of the file, is whole.
    #[test]
    fn a_rolled_back_transaction_leaves_the_next_commit_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("db"), 20);
        conn.batch_execute(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT NOT NULL UNIQUE, body TEXT NOT NULL)",
        )
        .unwrap();
        conn.batch_execute(
            "BEGIN; \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) \
             INSERT INTO t (k, body) SELECT hex(randomblob(16)), hex(randomblob(200)) FROM n; \
             ROLLBACK;",
        )
        .unwrap();
        conn.batch_execute("INSERT INTO t (k, body) VALUES ('a', 'b'), ('c', 'd')")
            .unwrap();
        assert_eq!(rows_after_a_crash(&dir), 2);
        assert_eq!(rows(&mut conn), 2);
    }
}
