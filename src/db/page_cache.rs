//! SQLite: a commit does not scan the whole page cache after a B-tree split.
//!
//! When a split leaves two new B-tree pages out of order, SQLite swaps their page numbers, and
//! for the swap it parks one page for a moment under the number of the page that holds the lock
//! byte (262,145 with 4 KiB pages), which no database under 1 GiB has. SQLite's page cache
//! remembers the highest number it has seen, and at the end of every transaction the pager
//! drops the pages past the database's end. With that number far past the end, the cache can
//! no longer look up the few page numbers involved and reads every slot of its hash table
//! instead: with a 32 MiB cache, a walk over some 8,000 pages, at about one commit in nine
//! under the small-rooms load (`pcache1TruncateUnsafe`, 6–11 % of the writer's time).
//!
//! [`install`] puts a thin layer in front of SQLite's own page cache, which still does all the
//! work. The layer keeps its own bound on the highest page number the cache holds. It follows
//! the parked page: once the swap moves it back to a real page number, the bound falls back
//! to what it was before. A truncation that can drop nothing under that bound is not passed
//! on; any other goes to SQLite's cache as before. The bound never falls below a page the cache
//! holds (a page number enters it only when SQLite fetches or renumbers a page, and both raise
//! it), so no page that a truncation must drop is left behind.
//!
//! SQLite takes a page cache only before it starts: [`install`] must run before the process's
//! first SQLite call, and where SQLite has started already it changes nothing.

use std::ffi::{c_int, c_uint};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Once, OnceLock};

use libsqlite3_sys as ffi;

/// SQLite's own page cache, as it was before [`install`].
struct Inner(ffi::sqlite3_pcache_methods2);

// SAFETY: the methods are plain functions, and `pArg` (null for SQLite's own cache) is only
// handed back to them.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

static INNER: OnceLock<Inner> = OnceLock::new();

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Truncations not passed on because no page can be at or above their limit, where SQLite's
/// cache, having seen a page number that high, would have looked. Read by the tests.
static SKIPPED: AtomicU64 = AtomicU64::new(0);

/// Puts the layer in front of SQLite's page cache, if SQLite has not started yet. Idempotent.
/// Returns whether the layer is in place.
pub fn install() -> bool {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| unsafe {
        let mut inner = std::mem::zeroed::<ffi::sqlite3_pcache_methods2>();
        let rc = ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_GETPCACHE2,
            &mut inner as *mut ffi::sqlite3_pcache_methods2,
        );
        if rc != ffi::SQLITE_OK || inner.xCreate.is_none() {
            log::debug!("SQLite started before its page cache could be wrapped (code {rc})");
            return;
        }
        let inner = INNER.get_or_init(|| Inner(inner));
        let methods = ffi::sqlite3_pcache_methods2 {
            iVersion: 1,
            pArg: inner.0.pArg,
            xInit: inner.0.xInit,
            xShutdown: inner.0.xShutdown,
            xCreate: Some(create),
            xCachesize: Some(cache_size),
            xPagecount: Some(page_count),
            xFetch: Some(fetch),
            xUnpin: Some(unpin),
            xRekey: Some(rekey),
            xTruncate: Some(truncate),
            xDestroy: Some(destroy),
            xShrink: Some(shrink),
        };
        // SQLite copies the methods.
        let rc = ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_PCACHE2,
            &methods as *const ffi::sqlite3_pcache_methods2,
        );
        if rc == ffi::SQLITE_OK {
            INSTALLED.store(true, Ordering::Release);
        } else {
            log::debug!("SQLite refused the page cache layer (code {rc})");
        }
    });
    INSTALLED.load(Ordering::Acquire)
}

/// The highest page number a cache can hold, as far as this layer can tell.
#[derive(Debug, Default, PartialEq)]
struct Bound {
    max: c_uint,
    parked: Option<Parked>,
    /// The highest page number SQLite's cache has seen since its last truncation: what it
    /// goes by.
    seen: c_uint,
}

/// What a truncation comes to.
#[derive(Debug, PartialEq)]
enum Truncation {
    /// No page can be at or above the limit, and SQLite's cache knows it.
    Nothing,
    /// No page can be at or above the limit, but SQLite's cache would look.
    Skipped,
    /// A page may be at or above the limit: SQLite's cache drops it.
    Passed,
}

/// A page renumbered past every other, most likely for a moment (a swap's parking place).
#[derive(Debug, PartialEq)]
struct Parked {
    key: c_uint,
    page: usize,
    /// The bound on every other page.
    others: c_uint,
}

impl Bound {
    /// The cache holds a page under `key`.
    fn holds(&mut self, key: c_uint) {
        match &mut self.parked {
            Some(p) if key < p.key => p.others = p.others.max(key),
            Some(p) if key == p.key => {}
            _ => self.parked = None,
        }
        self.max = self.max.max(key);
        self.seen = self.seen.max(key);
    }

    /// `page` moved from `old` to `new`.
    fn renumbered(&mut self, page: usize, old: c_uint, new: c_uint) {
        self.seen = self.seen.max(new);
        if let Some(p) = &self.parked {
            if p.page == page && p.key == old {
                self.max = p.others.max(new);
                self.parked = None;
                return;
            }
        }
        if new > self.max && self.parked.is_none() {
            self.parked = Some(Parked {
                key: new,
                page,
                others: self.max,
            });
            self.max = new;
            return;
        }
        self.holds(new);
    }

    /// `page` left the cache.
    fn discarded(&mut self, page: usize) {
        if let Some(p) = &self.parked {
            if p.page == page {
                self.max = p.others;
                self.parked = None;
            }
        }
    }

    /// A truncation to `limit`, which drops every page numbered `limit` or more.
    fn truncate(&mut self, limit: c_uint) -> Truncation {
        if limit > self.seen {
            return Truncation::Nothing;
        }
        if limit > self.max {
            return Truncation::Skipped;
        }
        self.max = limit.saturating_sub(1);
        self.seen = self.max;
        self.parked = None;
        Truncation::Passed
    }
}

/// One cache: SQLite's, and the bound on it.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    bound: Bound,
}

fn inner() -> &'static ffi::sqlite3_pcache_methods2 {
    // Only reachable through the methods installed after INNER was set.
    &INNER.get().expect("the page cache layer is installed").0
}

unsafe fn cache<'a>(p: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    &mut *p.cast::<Cache>()
}

unsafe extern "C" fn create(
    page_size: c_int,
    extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let Some(create) = inner().xCreate else {
        return std::ptr::null_mut();
    };
    let inner = create(page_size, extra, purgeable);
    if inner.is_null() {
        return inner;
    }
    Box::into_raw(Box::new(Cache {
        inner,
        bound: Bound::default(),
    }))
    .cast()
}

unsafe extern "C" fn cache_size(p: *mut ffi::sqlite3_pcache, pages: c_int) {
    if let Some(f) = inner().xCachesize {
        f(cache(p).inner, pages);
    }
}

unsafe extern "C" fn page_count(p: *mut ffi::sqlite3_pcache) -> c_int {
    match inner().xPagecount {
        Some(f) => f(cache(p).inner),
        None => 0,
    }
}

unsafe extern "C" fn fetch(
    p: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    let cache = cache(p);
    let Some(fetch) = inner().xFetch else {
        return std::ptr::null_mut();
    };
    let page = fetch(cache.inner, key, create);
    if !page.is_null() {
        cache.bound.holds(key);
    }
    page
}

unsafe extern "C" fn unpin(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    let cache = cache(p);
    if discard != 0 {
        cache.bound.discarded(page as usize);
    }
    if let Some(f) = inner().xUnpin {
        f(cache.inner, page, discard);
    }
}

unsafe extern "C" fn rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    let cache = cache(p);
    cache.bound.renumbered(page as usize, old, new);
    if let Some(f) = inner().xRekey {
        f(cache.inner, page, old, new);
    }
}

unsafe extern "C" fn truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    let cache = cache(p);
    match cache.bound.truncate(limit) {
        Truncation::Nothing => {}
        Truncation::Skipped => {
            SKIPPED.fetch_add(1, Ordering::Relaxed);
        }
        Truncation::Passed => {
            if let Some(f) = inner().xTruncate {
                f(cache.inner, limit);
            }
        }
    }
}

unsafe extern "C" fn destroy(p: *mut ffi::sqlite3_pcache) {
    let cache = Box::from_raw(p.cast::<Cache>());
    if let Some(f) = inner().xDestroy {
        f(cache.inner);
    }
}

unsafe extern "C" fn shrink(p: *mut ffi::sqlite3_pcache) {
    if let Some(f) = inner().xShrink {
        f(cache(p).inner);
    }
}

#[cfg(test)]
mod tests {
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Text};

    use super::*;

    const PAGE: usize = 0x1000;

    /// SQLite's swap of two pages' numbers in `balance_nonroot`: B parked past the end, A to
    /// B's number, B to A's.
    fn swap(bound: &mut Bound, a: (usize, c_uint), b: (usize, c_uint)) {
        bound.renumbered(b.0, b.1, 262_145);
        bound.renumbered(a.0, a.1, b.1);
        bound.renumbered(b.0, 262_145, a.1);
    }

    #[test]
    fn a_swap_through_the_parking_place_leaves_the_bound_where_it_was() {
        let mut bound = Bound::default();
        for key in 1..=40 {
            bound.holds(key);
        }
        swap(&mut bound, (PAGE, 38), (2 * PAGE, 40));
        assert_eq!(bound.max, 40);
        assert_eq!(bound.parked, None);
        // The commit's truncation to the database's size: SQLite's cache saw 262,145.
        assert_eq!(bound.truncate(41), Truncation::Skipped);
        assert_eq!(bound.truncate(41), Truncation::Skipped);
        // A page past the end (a transaction that grew the file, rolled back) is dropped.
        bound.holds(45);
        assert_eq!(bound.truncate(41), Truncation::Passed);
        assert_eq!((bound.max, bound.seen), (40, 40));
        assert_eq!(bound.truncate(41), Truncation::Nothing);
    }

    /// A cache holding pages up to 10, with page 9 (the pointer `PAGE`) parked at 262,145.
    fn one_parked() -> Bound {
        let mut bound = Bound::default();
        bound.holds(10);
        bound.renumbered(PAGE, 9, 262_145);
        bound
    }

    #[test]
    fn the_bound_stays_above_every_page_whatever_happens_while_one_is_parked() {
        // A page fetched meanwhile counts once the parked one comes back.
        let mut bound = one_parked();
        bound.holds(12);
        bound.renumbered(PAGE, 262_145, 3);
        assert_eq!(bound.max, 12);
        assert_eq!(bound.truncate(12), Truncation::Passed);

        // The parked page discarded: the others' bound again.
        let mut bound = one_parked();
        bound.discarded(2 * PAGE);
        assert_eq!(bound.max, 262_145);
        bound.discarded(PAGE);
        assert_eq!(bound.max, 10);

        // Two pages past the end at once, or one higher still: no guess, the highest stays.
        let mut bound = one_parked();
        bound.renumbered(2 * PAGE, 8, 262_146);
        bound.renumbered(PAGE, 262_145, 9);
        assert_eq!(bound.max, 262_146);
        let mut bound = one_parked();
        bound.holds(300_000);
        bound.renumbered(PAGE, 262_145, 9);
        assert_eq!(bound.max, 300_000);

        // A page that comes back somewhere else than from the parking place keeps it.
        let mut bound = one_parked();
        bound.renumbered(2 * PAGE, 262_145, 4);
        assert_eq!(bound.max, 262_145);
    }

    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        k: String,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    fn everything(conn: &mut SqliteConnection) -> std::collections::BTreeMap<String, i64> {
        diesel::sql_query("SELECT k, n FROM t")
            .load::<Row>(conn)
            .unwrap()
            .into_iter()
            .map(|r| (r.k, r.n))
            .collect()
    }

    #[derive(QueryableByName)]
    struct Check {
        #[diesel(sql_type = Text)]
        integrity_check: String,
    }

    /// Random keys split pages out of order, so SQLite parks pages past the end and the layer
    /// skips truncations. A second connection must drop what it cached each time the first
    /// commits, and a transaction that grows the file and rolls back must drop its pages: both
    /// are truncations that have to reach SQLite's cache. Each reader sees every commit, and the
    /// database holds exactly what was committed.
    #[test]
    fn a_database_written_through_the_layer_holds_what_was_committed() {
        crate::db::prepare_sqlite();
        assert!(
            install(),
            "SQLite started before the page cache layer was installed"
        );
        let skipped_before = SKIPPED.load(Ordering::Relaxed);
        let dir = tempfile::tempdir().unwrap();
        let mut conn =
            SqliteConnection::establish(dir.path().join("db").to_str().unwrap()).unwrap();
        conn.batch_execute(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = 2000; \
             CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER NOT NULL, pad TEXT NOT NULL);",
        )
        .unwrap();
        let mut reader =
            SqliteConnection::establish(dir.path().join("db").to_str().unwrap()).unwrap();
        let mut expected = std::collections::BTreeMap::new();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for commit in 0..600 {
            let rows: Vec<(String, i64)> = (0..5)
                .map(|i| (format!("{:016x}", next()), commit * 10 + i))
                .collect();
            let values: Vec<String> = rows
                .iter()
                .map(|(k, n)| format!("('{k}', {n}, printf('%.300c', 'x'))"))
                .collect();
            let sql = format!("INSERT INTO t (k, n, pad) VALUES {}", values.join(", "));
            if commit % 50 == 49 {
                // Grows the file by hundreds of pages, then rolls back.
                conn.batch_execute(&format!(
                    "BEGIN; {sql}; INSERT INTO t (k, n, pad) \
                     SELECT hex(randomblob(8)), -1, printf('%.2000c', 'y') \
                     FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c \
                     WHERE x < 300) SELECT x FROM c); ROLLBACK;"
                ))
                .unwrap();
                continue;
            }
            conn.batch_execute(&sql).unwrap();
            expected.extend(rows);
            if commit % 7 == 0 {
                assert_eq!(everything(&mut reader), expected, "after commit {commit}");
            }
        }
        let check: Vec<Check> = diesel::sql_query("PRAGMA integrity_check")
            .load(&mut conn)
            .unwrap();
        assert_eq!(check.len(), 1);
        assert_eq!(check[0].integrity_check, "ok");
        assert_eq!(everything(&mut conn), expected);
        assert!(
            SKIPPED.load(Ordering::Relaxed) > skipped_before,
            "no truncation was skipped: the layer never saw a page parked and brought back"
        );
    }
}
