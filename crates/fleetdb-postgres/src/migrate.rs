//! The migration runner. The `fleetdb_schema` table records applied migrations; it is created by
//! the runner (not by a migration), and only when a migration is about to be applied, so that
//! reading the schema status never writes.

use fleetdb_core::backend::{AppliedMigration, MigrationInfo};
use fleetdb_core::{Clock, Error, Migration, Result, SchemaStatus, Timestamp};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::error::{db_err, is_unique_violation};

const SCHEMA_TABLE_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = current_schema() AND c.relname = 'fleetdb_schema')";

const CREATE_SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS fleetdb_schema (\
     version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)";

/// Up to six relations of the current schema that are not FleetDB's to fill: tables, views,
/// sequences and the like, other than those an extension created (`pg_stat_statements`' view in
/// `public`, say); none once `fleetdb_schema` exists (a concurrent migrator created it since
/// this one looked: the schema is FleetDB's). `NULL` schema: none.
const FOREIGN_RELATIONS: &str = "SELECT current_schema()::text, c.relname::text \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') \
     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
       WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class s \
       WHERE s.relnamespace = n.oid AND s.relname = 'fleetdb_schema') \
     ORDER BY c.relname LIMIT 6";

/// Refuse a schema of another application — one holding tables (views, sequences…) but no
/// `fleetdb_schema` — before anything is written: FleetDB's tables are not created beside an
/// application's, nor is a failed first migration left behind in it. Call it when
/// `fleetdb_schema` does not exist. SELECTs only.
pub(crate) async fn check_owned(client: &Client) -> Result<()> {
    let row = client
        .query_one(
            "SELECT current_schema()::text, current_setting('search_path')",
            &[],
        )
        .await
        .map_err(db_err)?;
    if row
        .try_get::<_, Option<String>>(0)
        .map_err(db_err)?
        .is_none()
    {
        // Nowhere to create tables in: the first CREATE failed with "no schema has been
        // selected to create in" (a database error, exit 1).
        let search_path: String = row.try_get(1).map_err(db_err)?;
        return Err(Error::invalid(
            "PostgreSQL search_path",
            search_path,
            "names no schema that exists (or that this role may use): create the schema first \
             (CREATE SCHEMA …) or fix the URL's search_path",
        ));
    }
    let rows = client.query(FOREIGN_RELATIONS, &[]).await.map_err(db_err)?;
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let schema: String = first.try_get(0).map_err(db_err)?;
    let mut names = rows
        .iter()
        .take(5)
        .map(|r| r.try_get::<_, String>(1).map_err(db_err))
        .collect::<Result<Vec<_>>>()?
        .join(", ");
    if rows.len() > 5 {
        names.push_str(", …");
    }
    Err(Error::invalid(
        "PostgreSQL schema",
        schema,
        format!(
            "is not a FleetDB schema: it holds {names} and no fleetdb_schema table (another \
             application's); FleetDB leaves it as it is: point search_path at an empty schema \
             (?options=-c%20search_path%3Dfleetdb) or a FleetDB one"
        ),
    ))
}

/// The highest version in a list of migrations.
pub(crate) fn binary_version(migrations: &[Migration]) -> u32 {
    migrations.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The schema status and whether `fleetdb_schema` exists. SELECTs only.
pub(crate) async fn read_status(
    client: &Client,
    migrations: &[Migration],
) -> Result<(SchemaStatus, bool)> {
    let exists: bool = client
        .query_one(SCHEMA_TABLE_EXISTS, &[])
        .await
        .map_err(db_err)?
        .get(0);
    let mut applied = Vec::new();
    if exists {
        let rows = client
            .query(
                "SELECT version, name, applied_at FROM fleetdb_schema ORDER BY version",
                &[],
            )
            .await
            .map_err(db_err)?;
        for row in rows {
            let version: i32 = row.try_get(0).map_err(db_err)?;
            applied.push(AppliedMigration {
                version: u32::try_from(version).map_err(|_| {
                    Error::Backend(format!("fleetdb_schema holds a negative version {version}"))
                })?,
                name: row.try_get(1).map_err(db_err)?,
                applied_at: Timestamp(row.try_get(2).map_err(db_err)?),
            });
        }
    }
    let database = applied.iter().map(|a| a.version).max().unwrap_or(0);
    let pending = migrations
        .iter()
        .filter(|m| m.version > database)
        .map(|m| MigrationInfo {
            version: m.version,
            name: m.name.to_string(),
        })
        .collect();
    Ok((
        SchemaStatus {
            database,
            binary: binary_version(migrations),
            pending,
            applied,
        },
        exists,
    ))
}

/// Fail with `SchemaTooNew` if the database is ahead of `migrations`.
pub(crate) fn check_not_too_new(status: &SchemaStatus) -> Result<()> {
    if status.database > status.binary {
        return Err(Error::SchemaTooNew {
            database: status.database,
            binary: status.binary,
        });
    }
    Ok(())
}

/// Apply every pending migration of `migrations`, each in its own transaction. Writes nothing when
/// nothing is pending. Safe against concurrent migrators: the loser of a race on a version fails on
/// `fleetdb_schema`'s primary key, re-reads the status and continues.
pub(crate) async fn run(
    client: &Client,
    migrations: &[Migration],
    clock: &dyn Clock,
) -> Result<SchemaStatus> {
    // Each round applies one migration or observes that someone else did; a bound guards against
    // a livelock with a misbehaving peer.
    let rounds_max = 4 * migrations.len() + 4;
    for _ in 0..rounds_max {
        let (status, table_exists) = read_status(client, migrations).await?;
        check_not_too_new(&status)?;
        let Some(next) = status.pending.first() else {
            return Ok(status);
        };
        let Some(migration) = migrations.iter().find(|m| m.version == next.version) else {
            return Ok(status);
        };
        if !table_exists {
            check_owned(client).await?;
            if let Err(e) = client.batch_execute(CREATE_SCHEMA_TABLE).await {
                // Two migrators creating the table at once: one of them gets a duplicate.
                let raced = e.code().is_some_and(|c| {
                    *c == SqlState::UNIQUE_VIOLATION
                        || *c == SqlState::DUPLICATE_TABLE
                        || *c == SqlState::DUPLICATE_OBJECT
                });
                if !raced {
                    return Err(db_err(e));
                }
            }
        }
        match apply_one(client, migration, clock.now()).await {
            Ok(()) => {
                tracing::info!(
                    version = migration.version,
                    name = migration.name,
                    "applied PostgreSQL migration"
                );
            }
            Err(e) if is_unique_violation(&e, "fleetdb_schema_pkey") => {
                tracing::info!(
                    version = migration.version,
                    "migration applied concurrently by another process"
                );
            }
            Err(e) => {
                let err = db_err(e);
                return Err(match err {
                    Error::Backend(msg) => Error::Backend(format!(
                        "migration {:04}_{} failed: {msg}",
                        migration.version, migration.name
                    )),
                    other => other,
                });
            }
        }
    }
    Err(Error::Backend(format!(
        "migrations did not converge after {rounds_max} rounds"
    )))
}

/// One migration in one transaction: record it first (so a concurrent migrator of the same
/// version blocks, then fails on the primary key), then run its SQL. READ COMMITTED whatever the
/// server's default: under SERIALIZABLE the concurrent migrator could fail with a serialization
/// error instead of the unique violation it is prepared for.
async fn apply_one(
    client: &Client,
    m: &Migration,
    now: Timestamp,
) -> std::result::Result<(), tokio_postgres::Error> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        .await?;
    let result = async {
        let version = i32::try_from(m.version).unwrap_or(i32::MAX);
        client
            .execute(
                "INSERT INTO fleetdb_schema (version, name, applied_at) VALUES ($1, $2, $3)",
                &[&version, &m.name, &now.0],
            )
            .await?;
        client.batch_execute(m.sql).await?;
        client.batch_execute("COMMIT").await
    }
    .await;
    if result.is_err() {
        // A failed COMMIT has already ended the transaction; ROLLBACK then only warns.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}
