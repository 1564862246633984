//! Test support: a throwaway schema per test on a shared server, so tests run in parallel without
//! seeing each other. Used by this crate's tests and by the conformance suite.

use std::str::FromStr;
use std::time::Duration;

use fleetdb_core::SystemClock;
use tokio_postgres::{Client, NoTls};

use crate::migrate;

/// The environment variable naming the test server.
pub const TEST_URL_ENV: &str = "FLEETDB_TEST_POSTGRES_URL";
/// The test server when [`TEST_URL_ENV`] is not set.
pub const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The test server's URL: `$FLEETDB_TEST_POSTGRES_URL` or [`DEFAULT_TEST_URL`].
pub fn test_url() -> String {
    std::env::var(TEST_URL_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_TEST_URL.to_string())
}

fn unreachable(url: &str, e: &dyn std::fmt::Display) -> String {
    format!(
        "PostgreSQL at {} is unreachable ({e}). Start it with: pg_ctlcluster --skip-systemctl-redirect \
         $(ls /etc/postgresql) main start, or set {TEST_URL_ENV}",
        crate::redact_url(url)
    )
}

async fn connect(url: &str) -> Result<Client, String> {
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|e| format!("invalid PostgreSQL URL {}: {e}", crate::redact_url(url)))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| unreachable(url, &error_chain(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("test connection ended: {e}");
        }
    });
    Ok(client)
}

fn error_chain(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

/// `base_url` with connections using `schema` (through the `options` parameter's `search_path`).
pub fn schema_url(base_url: &str, schema: &str) -> String {
    let sep = if base_url.contains('?') { '&' } else { '?' };
    format!("{base_url}{sep}options=-c%20search_path%3D{schema}")
}

fn check_schema_name(schema: &str) -> Result<(), String> {
    let ok = schema.starts_with("fleetdb_t_")
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!("{schema:?} is not a test schema (fleetdb_t_<hex>)"))
    }
}

/// Create `fleetdb_t_<random hex>` on the server at `base_url` and return a URL for the same server
/// whose connections use that schema, plus the schema's name.
pub async fn create_schema(base_url: &str) -> Result<(String, String), String> {
    let client = connect(base_url).await?;
    let schema = format!("fleetdb_t_{:016x}", rand::random::<u64>());
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .map_err(|e| format!("creating schema {schema}: {}", error_chain(&e)))?;
    Ok((schema_url(base_url, &schema), schema))
}

/// Attempts at dropping a schema: concurrent `DROP SCHEMA … CASCADE`s of parallel tests can
/// deadlock on the catalog rows they share (PostgreSQL then aborts one): a fresh-clone CI run
/// left 13 schemas behind.
const DROP_ATTEMPTS: u32 = 5;

/// Drop a schema made by [`create_schema`] and everything in it (retried after a deadlock).
pub async fn drop_schema(base_url: &str, schema: &str) -> Result<(), String> {
    check_schema_name(schema)?;
    let client = connect(base_url).await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
        {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt < DROP_ATTEMPTS
                    && e.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) =>
            {
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            }
            Err(e) => return Err(format!("dropping schema {schema}: {}", error_chain(&e))),
        }
    }
}

/// Run `sql` (one or more statements) on a connection of its own to `url` (tests that change a
/// schema behind a store's back).
pub async fn exec(url: &str, sql: &str) -> Result<(), String> {
    let client = connect(url).await?;
    client
        .batch_execute(sql)
        .await
        .map_err(|e| format!("{sql}: {}", error_chain(&e)))
}

/// Apply the migrations up to and including `version` only (for migration tests).
pub async fn migrate_to(url: &str, version: u32) -> Result<(), String> {
    let client = connect(url).await?;
    let upto: Vec<_> = crate::MIGRATIONS
        .iter()
        .copied()
        .filter(|m| m.version <= version)
        .collect();
    migrate::run(&client, &upto, &SystemClock)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
