//! Storage plumbing shared by every service: opening its database (a SQLite file by default,
//! PostgreSQL for a `postgres://` URL) as one sqlx `AnyPool`, and applying its embedded
//! migrations. Services write portable SQL (`$1` placeholders, TEXT / BIGINT columns), so one
//! set of queries and migrations serves both backends.
//!
//! SQLite is opened in WAL mode with a busy timeout so that replicas of a service can share one
//! file, as pods share one PostgreSQL.

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{
    AnyPool, Executor,
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::Migrator,
};

use crate::config::DatabaseConfig;

/// Set on every SQLite connection: WAL so readers never block the writer, a busy timeout (5 s)
/// so a replica waits for another's write instead of failing with SQLITE_BUSY.
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000; \
     PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;";
/// Two replicas starting at once may race to apply migrations; the loser retries this often.
const MIGRATION_ATTEMPTS: u32 = 5;
const MIGRATION_RETRY_DELAY: Duration = Duration::from_millis(300);

/// The database kinds a service can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a URL selects, or why the URL is not acceptable.
    pub fn of_url(url: &str) -> Result<Self, String> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(format!(
                "`{}` is neither sqlite://path nor postgres://...",
                redact(url)
            ))
        }
    }
}

/// Why the database could not be opened or migrated.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database url: {0}")]
    Url(String),
    #[error("cannot create the SQLite directory {path}: {source}")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{context}: {source}")]
    Query {
        context: &'static str,
        source: sqlx::Error,
    },
}

/// Opens the database `config` names, creating a SQLite file (and its directory) when absent,
/// and applies `migrator`.
pub async fn open(config: &DatabaseConfig, migrator: &Migrator) -> Result<AnyPool, StoreError> {
    sqlx::any::install_default_drivers();
    let backend = Backend::of_url(&config.url).map_err(StoreError::Url)?;
    let url = match backend {
        Backend::Sqlite => prepare_sqlite_url(&config.url)?,
        Backend::Postgres => config.url.clone(),
    };
    let options = AnyConnectOptions::from_str(&url).map_err(|source| StoreError::Connect {
        url: redact(&url),
        source,
    })?;
    let pool = AnyPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    conn.execute(SQLITE_PRAGMAS).await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|source| StoreError::Connect {
            url: redact(&url),
            source,
        })?;
    migrate(&pool, migrator).await?;
    Ok(pool)
}

async fn migrate(pool: &AnyPool, migrator: &Migrator) -> Result<(), StoreError> {
    let mut attempt = 1;
    loop {
        match migrator.run(pool).await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < MIGRATION_ATTEMPTS => {
                tracing::warn!(%error, attempt, "migration failed, retrying (another replica may be applying it)");
                attempt += 1;
                tokio::time::sleep(MIGRATION_RETRY_DELAY).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Whether the database answers a trivial query: what health reports as SERVING.
pub async fn ping(pool: &AnyPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

/// Makes sure a SQLite file can be created: its directory exists and the URL asks for `rwc`.
fn prepare_sqlite_url(url: &str) -> Result<String, StoreError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" {
        return Err(StoreError::Url(
            "sqlite needs a file path (replicas share it)".into(),
        ));
    }
    if let Some(parent) = Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|source| StoreError::Directory {
            path: parent.display().to_string(),
            source,
        })?;
    }
    let query = if query.contains("mode=") {
        query.to_owned()
    } else if query.is_empty() {
        "mode=rwc".to_owned()
    } else {
        format!("{query}&mode=rwc")
    };
    Ok(format!("sqlite://{path}?{query}"))
}

/// A URL with its password removed, for logs and errors.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Creates a fresh PostgreSQL database on the server `admin_url` points at and returns its URL:
/// each test gets its own database.
pub async fn create_postgres_database(admin_url: &str, name: &str) -> Result<String, StoreError> {
    sqlx::any::install_default_drivers();
    let mut url = url::Url::parse(admin_url).map_err(|e| StoreError::Url(e.to_string()))?;
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await
        .map_err(|source| StoreError::Connect {
            url: redact(admin_url),
            source,
        })?;
    // The name comes from the test itself; quoting keeps any character harmless.
    let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', ""));
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .execute(&pool)
        .await
        .map_err(|source| StoreError::Query {
            context: "creating a test database",
            source,
        })?;
    pool.close().await;
    url.set_path(name);
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_select_their_backend() {
        assert_eq!(Backend::of_url("sqlite://x.db"), Ok(Backend::Sqlite));
        assert_eq!(Backend::of_url("postgres://h/db"), Ok(Backend::Postgres));
        assert!(Backend::of_url("mysql://h/db").is_err());
    }

    #[test]
    fn sqlite_urls_get_create_mode() {
        let dir = tempfile::tempdir().ok();
        let base = dir.as_ref().map(|d| d.path().join("a/b.db"));
        let path = base
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let url = prepare_sqlite_url(&format!("sqlite://{path}")).ok();
        assert_eq!(url, Some(format!("sqlite://{path}?mode=rwc")));
        assert!(base.is_some_and(|p| p.parent().is_some_and(Path::exists)));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db".to_owned()
        );
    }
}

/// Databases for tests: every test gets its own.
pub mod testing {
    use std::{
        path::Path,
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::{StoreError, create_postgres_database};
    use crate::config::DatabaseConfig;

    /// The environment variable that points storage tests at a PostgreSQL server (CI sets it).
    pub const POSTGRES_URL_VAR: &str = "TEST_POSTGRES_URL";

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    /// A database name no other test (in this run or an earlier one) uses.
    pub fn unique_name(service: &str) -> String {
        let nanos = crate::timestamp::now_millis();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("meshwork_{service}_{}_{nanos}_{n}", std::process::id())
    }

    /// A SQLite database in `dir`.
    pub fn sqlite(dir: &Path, service: &str) -> DatabaseConfig {
        DatabaseConfig {
            url: format!("sqlite://{}", dir.join(format!("{service}.db")).display()),
            ..DatabaseConfig::default()
        }
    }

    /// A fresh PostgreSQL database when `TEST_POSTGRES_URL` is set, else `None`.
    pub async fn postgres(service: &str) -> Result<Option<DatabaseConfig>, StoreError> {
        let Ok(admin) = std::env::var(POSTGRES_URL_VAR) else {
            return Ok(None);
        };
        let url = create_postgres_database(&admin, &unique_name(service)).await?;
        Ok(Some(DatabaseConfig {
            url,
            ..DatabaseConfig::default()
        }))
    }

    /// The databases a storage test runs against: SQLite always, PostgreSQL when configured.
    pub async fn all(dir: &Path, service: &str) -> Result<Vec<DatabaseConfig>, StoreError> {
        let mut databases = vec![sqlite(dir, service)];
        databases.extend(postgres(service).await?);
        Ok(databases)
    }
}
