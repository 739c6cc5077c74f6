//! Storage: one Diesel connection type over PostgreSQL and SQLite, the pool, and migrations.
//!
//! The backend is chosen from the `DATABASE_URL` scheme, never by trial. Everything
//! backend-specific (connection set-up, migrations, full-text search) is matched on
//! [`DbConnection`] in this module and in `models/`, so a reader finds it in one place.
//! Queries run only inside the persistence actor (`crate::actors::persistence`).

mod checkpoint;
mod kept;
pub mod models;
mod page_cache;
pub mod schema;
mod wal_writes;

pub use checkpoint::{Checkpointer, COPY_EVERY, WAL_LONG_PAGES};

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use diesel::connection::{SimpleConnection, TransactionManager};
use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::config::DatabaseSettings;

pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// A connection to whichever backend `DATABASE_URL` names.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

pub type DbPool = r2d2::Pool<ConnectionManager>;
pub type PooledConn = r2d2::PooledConnection<ConnectionManager>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }
}

/// A parsed `DATABASE_URL`.
#[derive(Clone)]
pub struct DbUrl {
    pub backend: Backend,
    /// What the driver is given: the URL for PostgreSQL, the file path for SQLite.
    target: String,
}

impl DbUrl {
    pub fn parse(url: &str) -> anyhow::Result<DbUrl> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DbUrl {
                backend: Backend::Postgres,
                target: url.to_string(),
            });
        }
        if let Some(rest) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if rest.is_empty() {
                bail!("DATABASE_URL `{url}` names no SQLite file; write sqlite://data/chat_history.db");
            }
            return Ok(DbUrl {
                backend: Backend::Sqlite,
                target: rest.to_string(),
            });
        }
        bail!(
            "DATABASE_URL must start with postgres://, postgresql:// or sqlite:// (got `{}`)",
            url.split("://").next().unwrap_or(url)
        )
    }

    /// The URL without its password, for logs and `check-db`.
    pub fn redacted(&self) -> String {
        match self.backend {
            Backend::Sqlite => format!("sqlite://{}", self.target),
            Backend::Postgres => match (self.target.find("://"), self.target.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    match self.target[scheme + 3..at].split_once(':') {
                        Some((user, _password)) => format!(
                            "{}{}:***{}",
                            &self.target[..scheme + 3],
                            user,
                            &self.target[at..]
                        ),
                        None => self.target.clone(),
                    }
                }
                _ => self.target.clone(),
            },
        }
    }
}

/// Opens connections for the pool and prepares each one (SQLite: WAL, busy timeout, foreign keys).
#[derive(Clone)]
pub struct ConnectionManager {
    url: DbUrl,
    busy_timeout: Duration,
    /// SQLite: sync every commit (`synchronous = FULL`) rather than leave the WAL to the
    /// checkpoint thread's syncs (`NORMAL`).
    sync_every_commit: bool,
}

impl ConnectionManager {
    pub fn new(url: DbUrl, busy_timeout: Duration) -> Self {
        ConnectionManager {
            url,
            busy_timeout,
            sync_every_commit: false,
        }
    }

    /// SQLite: whether each commit is synced to disk before it returns (`sqlite_synchronous`).
    pub fn sync_every_commit(self, sync_every_commit: bool) -> Self {
        ConnectionManager {
            sync_every_commit,
            ..self
        }
    }

    pub fn establish(&self) -> Result<DbConnection, diesel::ConnectionError> {
        match self.url.backend {
            Backend::Postgres => Ok(DbConnection::Pg(PgConnection::establish(&self.url.target)?)),
            Backend::Sqlite => {
                prepare_sqlite();
                let mut conn = SqliteConnection::establish(&self.url.target)?;
                // busy_timeout first: switching to WAL takes a lock that connections opened
                // at the same moment must wait for rather than fail on.
                // A page cache of up to 32 MiB (SQLite's default is 2 MiB): the message
                // indexes are keyed by conversation, so each write lands on its own pages.
                // No checkpoint inside a commit: [`Checkpointer`] does them on its own thread.
                conn.batch_execute(&format!(
                    "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; \
                     PRAGMA synchronous = {}; PRAGMA foreign_keys = ON; \
                     PRAGMA cache_size = -32768; PRAGMA wal_autocheckpoint = 0; \
                     PRAGMA journal_size_limit = {};",
                    self.busy_timeout.as_millis(),
                    if self.sync_every_commit {
                        "FULL"
                    } else {
                        "NORMAL"
                    },
                    checkpoint::WAL_FILE_LIMIT_BYTES
                ))
                .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
                Ok(DbConnection::Sqlite(conn))
            }
        }
    }
}

/// Puts this process's layers in front of SQLite's page cache and its files. Before the
/// process's first SQLite connection: SQLite takes a page cache only before it starts.
pub(crate) fn prepare_sqlite() {
    page_cache::install();
    wal_writes::install();
}

impl r2d2::ManageConnection for ConnectionManager {
    type Connection = DbConnection;
    type Error = diesel::ConnectionError;

    fn connect(&self) -> Result<DbConnection, Self::Error> {
        self.establish()
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), Self::Error> {
        conn.batch_execute("SELECT 1")
            .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))
    }

    fn has_broken(&self, conn: &mut DbConnection) -> bool {
        // A transaction left open by a panic or a lost connection poisons the connection:
        // drop it rather than hand it to the next query.
        <DbConnection as Connection>::TransactionManager::is_broken_transaction_manager(conn)
    }
}

/// Builds the pool. For SQLite the file's folder is created first.
pub fn build_pool(settings: &DatabaseSettings) -> anyhow::Result<(DbPool, Backend)> {
    let url = DbUrl::parse(settings.url.expose())?;
    if url.backend == Backend::Sqlite {
        if let Some(dir) = Path::new(&url.target).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!(
                        "creating the folder {} for the SQLite database",
                        dir.display()
                    )
                })?;
            }
        }
    }
    let backend = url.backend;
    let redacted = url.redacted();
    let manager = ConnectionManager::new(url, settings.busy_timeout.get())
        .sync_every_commit(settings.sqlite_synchronous == "full");
    // One connection first, alone. SQLite: WAL is a property of the file, set here before the
    // pool opens several connections at the same moment and they race for the lock it needs.
    // PostgreSQL: a server that is down or a wrong URL fails at once with the driver's reason,
    // instead of after DB_ACQUIRE_TIMEOUT of retries by the pool.
    manager.establish().with_context(|| match backend {
        Backend::Sqlite => format!("opening {redacted}"),
        Backend::Postgres => {
            format!("connecting to {redacted}; is the database running and DATABASE_URL right?")
        }
    })?;
    let pool = r2d2::Pool::builder()
        .max_size(settings.max_open_conns)
        .min_idle(Some(settings.max_idle_conns))
        .max_lifetime(Some(settings.conn_max_lifetime.get()))
        .connection_timeout(settings.acquire_timeout.get())
        .build(manager)
        .with_context(|| {
            format!("connecting to {redacted}; is the database running and DATABASE_URL right?")
        })?;
    Ok((pool, backend))
}

/// Settings for a new SQLite file in `dir`, the defaults otherwise: for unit tests.
#[cfg(test)]
pub fn sqlite_settings_in(dir: &Path) -> DatabaseSettings {
    DatabaseSettings {
        url: crate::config::Secret::new(format!("sqlite://{}/t.db", dir.display())),
        ..DatabaseSettings::default()
    }
}

/// Applies every pending migration; returns the names of those applied now.
pub fn run_migrations(conn: &mut DbConnection) -> anyhow::Result<Vec<String>> {
    let applied = match conn {
        DbConnection::Pg(c) => c.run_pending_migrations(POSTGRES_MIGRATIONS),
        DbConnection::Sqlite(c) => c.run_pending_migrations(SQLITE_MIGRATIONS),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("applying migrations")?;
    Ok(applied.iter().map(|v| v.to_string()).collect())
}

/// Migrations applied and pending, for `check-db`.
pub fn migration_state(conn: &mut DbConnection) -> anyhow::Result<(usize, Vec<String>)> {
    fn state<C: MigrationHarness<B>, B: diesel::backend::Backend>(
        c: &mut C,
        source: EmbeddedMigrations,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        let applied = c.applied_migrations().map_err(|e| anyhow::anyhow!("{e}"))?;
        let pending = c
            .pending_migrations(source)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((
            applied.len(),
            pending.iter().map(|m| m.name().to_string()).collect(),
        ))
    }
    match conn {
        DbConnection::Pg(c) => state(c, POSTGRES_MIGRATIONS),
        DbConnection::Sqlite(c) => state(c, SQLITE_MIGRATIONS),
    }
}

impl DbConnection {
    pub fn backend(&self) -> Backend {
        match self {
            DbConnection::Pg(_) => Backend::Postgres,
            DbConnection::Sqlite(_) => Backend::Sqlite,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_comes_from_the_scheme() {
        assert_eq!(
            DbUrl::parse("sqlite://data/x.db").unwrap().backend,
            Backend::Sqlite
        );
        assert_eq!(
            DbUrl::parse("postgres://u@h/db").unwrap().backend,
            Backend::Postgres
        );
        assert_eq!(
            DbUrl::parse("postgresql://u@h/db").unwrap().backend,
            Backend::Postgres
        );
        assert!(DbUrl::parse("mysql://u@h/db").is_err());
        assert!(DbUrl::parse("data/x.db").is_err());
        assert!(DbUrl::parse("sqlite://").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        let url = DbUrl::parse("postgres://chat_user:hunter2@db:5432/chat").unwrap();
        assert_eq!(url.redacted(), "postgres://chat_user:***@db:5432/chat");
        let url = DbUrl::parse("postgres://postgres@127.0.0.1:5432/chat").unwrap();
        assert_eq!(url.redacted(), "postgres://postgres@127.0.0.1:5432/chat");
        let url = DbUrl::parse("postgres://chat_user:@db/chat?sslmode=disable").unwrap();
        assert_eq!(
            url.redacted(),
            "postgres://chat_user:***@db/chat?sslmode=disable"
        );
    }

    /// Each SQLite connection syncs as `sqlite_synchronous` says: every commit with `full`,
    /// else only through the checkpoint thread (`NORMAL`).
    #[test]
    fn sqlite_connections_sync_as_the_settings_say() {
        #[derive(QueryableByName)]
        struct Level {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            synchronous: i32,
        }
        let dir = tempfile::tempdir().unwrap();
        // SQLite's numbers for NORMAL and FULL.
        for (setting, level) in [("normal", 1), ("full", 2)] {
            let settings = DatabaseSettings {
                sqlite_synchronous: setting.into(),
                ..sqlite_settings_in(dir.path())
            };
            let (pool, _) = build_pool(&settings).unwrap();
            for _ in 0..2 {
                let mut conn = pool.get().unwrap();
                let found: Level = diesel::sql_query("PRAGMA synchronous")
                    .get_result(&mut *conn)
                    .unwrap();
                assert_eq!(found.synchronous, level, "sqlite_synchronous = {setting}");
            }
        }
    }

    /// The two migration trees must hold the same migrations under the same names.
    #[test]
    fn migration_folders_match() {
        let list = |backend: &str| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(backend);
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let pg = list("postgres");
        assert!(!pg.is_empty());
        assert_eq!(
            pg,
            list("sqlite"),
            "migrations/postgres and migrations/sqlite have drifted"
        );
        for name in &pg {
            for backend in ["postgres", "sqlite"] {
                for file in ["up.sql", "down.sql"] {
                    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("migrations")
                        .join(backend)
                        .join(name)
                        .join(file);
                    assert!(path.exists(), "{} is missing", path.display());
                }
            }
        }
    }
}
