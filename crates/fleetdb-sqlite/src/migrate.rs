//! Embedded, numbered migrations, mirrored with fleetdb-postgres number by number.

use fleetdb_core::backend::{AppliedMigration, MigrationInfo};
use fleetdb_core::{Error, Migration, Result, SchemaStatus, Timestamp};
use rusqlite::{params, Connection, OptionalExtension};

use crate::map_err;

/// Every migration this binary knows, in order. Adding one requires a test in
/// `tests/migrations.rs`; a test fails if one is missing.
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "change_log",
        sql: include_str!("../migrations/0002_change_log.sql"),
    },
    Migration {
        version: 3,
        name: "sessions_work",
        sql: include_str!("../migrations/0003_sessions_work.sql"),
    },
    Migration {
        version: 4,
        name: "tags_by_name",
        sql: include_str!("../migrations/0004_tags_by_name.sql"),
    },
    Migration {
        version: 5,
        name: "world",
        sql: include_str!("../migrations/0005_world.sql"),
    },
    Migration {
        version: 6,
        name: "leases_content",
        sql: include_str!("../migrations/0006_leases_content.sql"),
    },
    Migration {
        version: 7,
        name: "world_kv_indexes",
        sql: include_str!("../migrations/0007_world_kv_indexes.sql"),
    },
    Migration {
        version: 8,
        name: "gc_runs",
        sql: include_str!("../migrations/0008_gc_runs.sql"),
    },
    Migration {
        version: 9,
        name: "world_prev_data",
        sql: include_str!("../migrations/0009_world_prev_data.sql"),
    },
    Migration {
        version: 10,
        name: "work_key_probes",
        sql: include_str!("../migrations/0010_work_key_probes.sql"),
    },
    Migration {
        version: 11,
        name: "history_prune_by_seq",
        sql: include_str!("../migrations/0011_history_prune_by_seq.sql"),
    },
    Migration {
        version: 12,
        name: "keys_led_by_id",
        sql: include_str!("../migrations/0012_keys_led_by_id.sql"),
    },
    Migration {
        version: 13,
        name: "process_controls",
        sql: include_str!("../migrations/0013_process_controls.sql"),
    },
    Migration {
        version: 14,
        name: "max_failures",
        sql: include_str!("../migrations/0014_max_failures.sql"),
    },
    Migration {
        version: 15,
        name: "lease_resource_count",
        sql: include_str!("../migrations/0015_lease_resource_count.sql"),
    },
];

fn binary_version() -> u32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

fn has_schema_table(c: &Connection) -> Result<bool> {
    c.query_row(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'fleetdb_schema'",
        [],
        |_| Ok(()),
    )
    .optional()
    .map(|r| r.is_some())
    .map_err(map_err)
}

fn database_version(c: &Connection) -> Result<u32> {
    if !has_schema_table(c)? {
        return Ok(0);
    }
    c.query_row(
        "SELECT coalesce(max(version), 0) FROM fleetdb_schema",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v as u32)
    .map_err(map_err)
}

/// Refuse a file FleetDB does not own, before anything is written (no journal mode switch, no
/// table): a file that is not a SQLite database, or a SQLite database of another application —
/// one with tables, views, indexes or triggers but no `fleetdb_schema`. An empty database (a new
/// file) is FleetDB's to fill; one with `fleetdb_schema` is FleetDB's, whatever its journal mode.
pub(crate) fn check_owned(c: &Connection, path: &std::path::Path) -> Result<()> {
    let foreign = c
        .prepare(
            "SELECT name FROM sqlite_master \
             WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name LIMIT 6",
        )
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        });
    let names = match foreign {
        Ok(names) => names,
        Err(rusqlite::Error::SqliteFailure(f, _))
            if f.code == rusqlite::ErrorCode::NotADatabase =>
        {
            return Err(Error::invalid(
                "database file",
                path.display().to_string(),
                "is not a SQLite database (not a FleetDB database); FleetDB leaves it as it is: \
                 name a new file or a FleetDB database",
            ));
        }
        Err(e) => return Err(map_err(e)),
    };
    if names.is_empty() || has_schema_table(c)? {
        return Ok(());
    }
    let mut list = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        list.push_str(", …");
    }
    Err(Error::invalid(
        "database file",
        path.display().to_string(),
        format!(
            "is not a FleetDB database: it is a SQLite database of another application (it holds \
             {list} and no fleetdb_schema table); FleetDB leaves it as it is: name a new file or a \
             FleetDB database"
        ),
    ))
}

/// Refuse a database whose schema is newer than this binary, before anything is written.
pub(crate) fn check_not_too_new(c: &Connection) -> Result<()> {
    let database = database_version(c)?;
    if database > binary_version() {
        return Err(Error::SchemaTooNew {
            database,
            binary: binary_version(),
        });
    }
    Ok(())
}

pub(crate) fn status(c: &Connection) -> Result<SchemaStatus> {
    let database = database_version(c)?;
    let mut applied = Vec::new();
    if has_schema_table(c)? {
        let mut stmt = c
            .prepare("SELECT version, name, applied_at FROM fleetdb_schema ORDER BY version")
            .map_err(map_err)?;
        applied = stmt
            .query_map([], |r| {
                Ok(AppliedMigration {
                    version: r.get::<_, i64>(0)? as u32,
                    name: r.get(1)?,
                    applied_at: Timestamp(r.get(2)?),
                })
            })
            .map_err(map_err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(map_err)?;
    }
    Ok(SchemaStatus {
        database,
        binary: binary_version(),
        pending: MIGRATIONS
            .iter()
            .filter(|m| m.version > database)
            .map(|m| MigrationInfo {
                version: m.version,
                name: m.name.to_string(),
            })
            .collect(),
        applied,
    })
}

/// Apply every pending migration up to `target`, each in its own transaction together with its
/// row in `fleetdb_schema`. Writes nothing when nothing is pending.
pub fn migrate_to(c: &mut Connection, target: u32, now: Timestamp) -> Result<()> {
    check_not_too_new(c)?;
    for m in MIGRATIONS.iter().filter(|m| m.version <= target) {
        // Re-read under the write lock: another process may have migrated meanwhile.
        if database_version(c)? >= m.version {
            continue;
        }
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(map_err)?;
        if database_version(&tx)? >= m.version {
            continue;
        }
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS fleetdb_schema (
                 version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        )
        .map_err(map_err)?;
        tx.execute(
            "INSERT INTO fleetdb_schema (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![m.version, m.name, now.0],
        )
        .map_err(map_err)?;
        tx.execute_batch(m.sql).map_err(|e| {
            Error::Backend(format!("migration {:04}_{} failed: {e}", m.version, m.name))
        })?;
        tx.commit().map_err(map_err)?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
    }
    Ok(())
}

pub(crate) fn migrate(c: &mut Connection, now: Timestamp) -> Result<()> {
    migrate_to(c, binary_version(), now)
}

/// Test support: apply migrations up to `version` on a database file.
pub mod testing {
    use super::*;

    /// Open `path` and migrate it to exactly `version` (for migration tests).
    pub fn migrate_file_to(path: &std::path::Path, version: u32) -> Result<()> {
        let mut c = Connection::open(path).map_err(map_err)?;
        migrate_to(&mut c, version, Timestamp(0))
    }
}
