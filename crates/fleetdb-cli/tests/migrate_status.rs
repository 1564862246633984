//! `fleetdb migrate status` reads and writes nothing (docs/cli.md); cases found by a review.

use std::process::{Command, Stdio};

// docs/cli.md: "`migrate status` never writes." On SQLite it creates the database file (and
// its folders) when the URL names one that does not exist — a typo in `--db` leaves an empty,
// WAL-mode database behind — and switches an existing database to WAL mode (a write).

#[test]
fn migrate_status_on_a_missing_sqlite_file_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetdb"))
        .current_dir(dir.path())
        .env_remove("FLEETDB_NAMESPACE")
        .env("FLEETDB_DB", "sqlite://typo/db.sqlite")
        .args(["-o", "json", "migrate", "status"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = out;
    assert!(
        !dir.path().join("typo").exists(),
        "`migrate status` created the folder {} and a database in it",
        dir.path().join("typo").display()
    );
}

#[test]
fn migrate_status_leaves_a_rollback_journal_database_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    {
        // A database as a backup tool may leave it: FleetDB's schema, rollback journal mode.
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE fleetdb_schema (version INTEGER PRIMARY KEY, name TEXT NOT NULL, \
             applied_at INTEGER NOT NULL)",
        )
        .unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
    }
    let before = std::fs::read(&path).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetdb"))
        .current_dir(dir.path())
        .env_remove("FLEETDB_NAMESPACE")
        .env("FLEETDB_DB", format!("sqlite://{}", path.display()))
        .args(["-o", "json", "migrate", "status"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = std::fs::read(&path).unwrap();
    let mode: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert!(
        after == before && mode == "delete",
        "`migrate status` changed the database file: journal mode now {mode}"
    );
}

// `fleetdb migrate up` (and `status`) on a SQLite file of another application (tables, no
// `fleetdb_schema`): `up` switched it to WAL and created FleetDB's tables in it. Both refuse it
// now (exit 2, the file named) and leave it byte-identical, with nothing beside it.

#[test]
fn migrate_on_a_sqlite_file_of_another_application_refuses_it_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=DELETE; CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL);
             INSERT INTO invoices (total) VALUES (12.5);",
        )
        .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    for cmd in ["up", "status"] {
        let out = Command::new(env!("CARGO_BIN_EXE_fleetdb"))
            .current_dir(dir.path())
            .env_remove("FLEETDB_NAMESPACE")
            .env("FLEETDB_DB", format!("sqlite://{}", path.display()))
            .args(["migrate", cmd])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "migrate {cmd}: {stderr}");
        assert!(
            stderr.contains("not a FleetDB database") && stderr.contains("app.db"),
            "migrate {cmd}: {stderr}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "`migrate {cmd}` modified the other application's file"
        );
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["app.db"], "`migrate {cmd}` left files beside it");
    }
}
