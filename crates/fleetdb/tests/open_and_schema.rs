//! Opening, schema versions and metrics: defects found by a review (each test states what a user
//! saw before its fix).

use fleetdb::{Clock, Error, Labels, ObjectKey, OpenOptions, Store};

fn sqlite_path() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    (dir, path)
}

fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}", path.display())
}

/// A store at `url` on a clock the test moves.
async fn open_on_a_manual_clock(url: &str) -> (Store, fleetdb::ManualClock) {
    let clock = fleetdb::ManualClock::new(fleetdb::Timestamp(1_767_225_600_000_000));
    let store = Store::open_with(
        url,
        OpenOptions {
            clock: Some(std::sync::Arc::new(clock.clone())),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    (store, clock)
}

fn m(id: &str) -> ObjectKey {
    ObjectKey::new("default", "machine", id).unwrap()
}

async fn pg_schema() -> (String, String) {
    fleetdb_postgres::testing::create_schema(&fleetdb_postgres::testing::test_url())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn pg_drop(name: &str) {
    fleetdb_postgres::testing::drop_schema(&fleetdb_postgres::testing::test_url(), name)
        .await
        .unwrap();
}

async fn pg_exec(url: &str, sql: &str) {
    fleetdb_postgres::testing::exec(url, sql).await.unwrap();
}

// ------------------------------------------------------------------------------------------
// A running store reads the schema version again once `SCHEMA_RECHECK` has passed: once a newer
// binary (another process, a rolling upgrade) has migrated the database past it, it stops
// writing (`SchemaTooNew`). Before, a store that opened on an up-to-date database never looked
// again and went on writing with its old idea of the schema.

#[tokio::test]
async fn sqlite_a_running_store_refuses_writes_once_a_newer_binary_migrated() {
    let (_d, path) = sqlite_path();
    let (store, clock) = open_on_a_manual_clock(&sqlite_url(&path)).await;
    store.object_put(&m("m1"), Labels::new()).await.unwrap();
    // Another process, a newer binary, migrates the database past this one.
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute(
            "INSERT INTO fleetdb_schema VALUES (999, 'from_the_future', 0)",
            [],
        )
        .unwrap();
    }
    assert_refused_after_the_recheck(&store, &clock).await;
}

#[tokio::test]
async fn postgres_a_running_store_refuses_writes_once_a_newer_binary_migrated() {
    let (url, schema) = pg_schema().await;
    let (store, clock) = open_on_a_manual_clock(&url).await;
    store.object_put(&m("m1"), Labels::new()).await.unwrap();
    pg_exec(
        &url,
        "INSERT INTO fleetdb_schema VALUES (999, 'from_the_future', 0)",
    )
    .await;
    assert_refused_after_the_recheck(&store, &clock).await;
    drop(store);
    pg_drop(&schema).await;
}

/// The store's clock stepped back (on PostgreSQL it is the server's clock, which `ServerClock`
/// follows when it is stepped; a host's wall clock on SQLite): the time of the last re-read was
/// then in the future, and none was due again until the clock had caught up with it - an hour
/// stepped back, an hour of writes by an old binary to a database a newer one had migrated.
#[tokio::test]
async fn sqlite_the_schema_is_read_again_after_the_clock_stepped_back() {
    let (_d, path) = sqlite_path();
    let (store, clock) = open_on_a_manual_clock(&sqlite_url(&path)).await;
    store.object_put(&m("m1"), Labels::new()).await.unwrap();
    clock.set(fleetdb::Timestamp(clock.now().0 - 3_600_000_000));
    store.object_put(&m("m2"), Labels::new()).await.unwrap();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute(
            "INSERT INTO fleetdb_schema VALUES (999, 'from_the_future', 0)",
            [],
        )
        .unwrap();
    }
    assert_refused_after_the_recheck(&store, &clock).await;
}

#[tokio::test]
async fn postgres_the_schema_is_read_again_after_the_clock_stepped_back() {
    let (url, schema) = pg_schema().await;
    let (store, clock) = open_on_a_manual_clock(&url).await;
    store.object_put(&m("m1"), Labels::new()).await.unwrap();
    clock.set(fleetdb::Timestamp(clock.now().0 - 3_600_000_000));
    store.object_put(&m("m2"), Labels::new()).await.unwrap();
    pg_exec(
        &url,
        "INSERT INTO fleetdb_schema VALUES (999, 'from_the_future', 0)",
    )
    .await;
    assert_refused_after_the_recheck(&store, &clock).await;
    drop(store);
    pg_drop(&schema).await;
}

/// Once `SCHEMA_RECHECK` has passed, the next write reads the version again and is refused.
async fn assert_refused_after_the_recheck(store: &Store, clock: &fleetdb::ManualClock) {
    clock.advance(fleetdb::SCHEMA_RECHECK);
    let r = store.object_put(&m("m3"), Labels::new()).await;
    assert!(
        matches!(r, Err(Error::SchemaTooNew { database: 999, .. })),
        "an old binary still writes to a database migrated past it: {r:?}"
    );
}

// ------------------------------------------------------------------------------------------
// `OpenOptions::postgres_pool_size_max` is bounded (`POOL_SIZE_MAX`): a huge value (a config
// file's "unlimited" mapped to usize::MAX, say) panicked inside the pool's construction.

#[tokio::test]
async fn postgres_a_pool_size_too_large_is_refused_not_a_panic() {
    let (url, schema) = pg_schema().await;
    let u = url.clone();
    let r = tokio::spawn(async move {
        Store::open_with(
            &u,
            OpenOptions {
                postgres_pool_size_max: usize::MAX,
                ..OpenOptions::default()
            },
        )
        .await
        .map(|_| ())
    })
    .await;
    pg_drop(&schema).await;
    match r {
        Err(join) => panic!("open panicked on a pool size of usize::MAX: {join}"),
        Ok(r) => assert!(
            matches!(r, Err(Error::Invalid { .. })),
            "a pool size of usize::MAX is refused as invalid: {r:?}"
        ),
    }
}

// A PostgreSQL URL the driver cannot connect with whatever the server's state (no host: libpq
// would use its default socket, this driver has no default; more ports than hosts) was answered
// `Unavailable` ("database unavailable: … invalid configuration", CLI exit 6, the class a caller
// retries) instead of `Invalid` naming what is missing.

#[tokio::test]
async fn a_postgres_url_the_driver_cannot_use_is_invalid_not_unavailable() {
    for url in [
        "postgres://postgres@/postgres",
        "postgres://postgres@127.0.0.1,127.0.0.2/postgres?port=5432,5433,5434",
    ] {
        match Store::open(url).await {
            Err(Error::Invalid { .. }) => {}
            Err(e) => panic!("{url}: {e:?}, expected Invalid"),
            Ok(_) => panic!("{url}: opened, expected Invalid"),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Open options are checked before the database is touched. Before, an open that failed for a bad
// `gc.pause_share` had already created the file (and its folder) and applied every migration — a
// failed open of an older binary's database upgraded it all the same.

#[tokio::test]
async fn sqlite_an_open_refused_for_its_options_writes_nothing() {
    let (_d, path) = sqlite_path();
    fleetdb_sqlite::testing::migrate_file_to(&path, 1).unwrap();
    let r = Store::open_with(
        &sqlite_url(&path),
        OpenOptions {
            gc: fleetdb::GcOptions {
                pause_share: 0.0,
                ..fleetdb::GcOptions::default()
            },
            ..OpenOptions::default()
        },
    )
    .await;
    assert!(matches!(r, Err(Error::Invalid { .. })), "{r:?}");
    drop(r);
    let c = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = c
        .query_row("SELECT max(version) FROM fleetdb_schema", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        version, 1,
        "an open refused for its options migrated the database anyway"
    );
}

// ------------------------------------------------------------------------------------------
// `Work::finish_and_claim` given up by its caller (a timeout, a `select!`) while its backend call
// runs: the call runs to its end on a task of its own (`Store::detached_claim`), the finish
// commits (history `Finished`), and the unwanted next claim is cancelled and counted started and
// canceled. The finish is counted too, by the undelivered answer (`Delivery`: the releases of
// the batch): before, `fleetdb_work_finished_total{result="finished"}` missed it.
// docs/metrics.md: claims ended are "counted once, by the process that ended them".

#[tokio::test]
async fn a_finish_and_claim_given_up_by_its_caller_still_counts_the_finish() {
    let (_d, path) = sqlite_path();
    let store = Store::open_with(
        &sqlite_url(&path),
        OpenOptions {
            background: false,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    store.process_define("P", &[]).await.unwrap();
    for id in ["m1", "m2"] {
        store.object_put(&m(id), Labels::new()).await.unwrap();
    }
    let s = store
        .session_start(fleetdb::SessionSpec::new("c", "h"))
        .await
        .unwrap();
    let mut w = s.claim_object(&m("m1"), "P").await.unwrap();
    // Polled once, then dropped: the caller gave up before the answer.
    let given_up = futures::FutureExt::now_or_never(w.finish_and_claim(
        |_| async { Ok(()) },
        "P",
        "kind = machine",
        1,
    ));
    assert!(given_up.is_none(), "the caller gave up before the answer");
    drop(w);
    // Let the detached call, the cancel of its unwanted claim and the handle's drop run.
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if store.work_list(Some("P"), 10).await.unwrap().is_empty() {
            break;
        }
    }
    let history = store
        .history(&fleetdb::HistoryFilter::Object(m("m1")), None, 10)
        .await
        .unwrap();
    assert!(
        history
            .items
            .iter()
            .any(|h| h.event == fleetdb::WorkEvent::Finished),
        "the finish committed: {:?}",
        history.items
    );
    let mm = store.metrics();
    assert_eq!(
        mm.work_finished.with_label_values(&["P", "finished"]).get(),
        1,
        "the committed finish is counted (started {}, canceled {})",
        mm.work_started.with_label_values(&["P"]).get(),
        mm.work_finished.with_label_values(&["P", "canceled"]).get(),
    );
}

/// Two SQLite databases in one folder shared its `blobs/`: each one's collection removed the
/// other's blob files as orphans, and `blob get` then failed with "the bytes of blob … are
/// missing". The folder's blob files now belong to the first database that stores one there
/// (`blobs/database` names its file); another database in the folder is refused a content store
/// (`Unsupported`, naming the owner) and its collections leave the files alone.
#[tokio::test]
async fn sqlite_two_databases_in_one_folder_do_not_remove_each_others_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(&sqlite_url(&dir.path().join("a.sqlite")))
        .await
        .unwrap();
    let b = Store::open(&sqlite_url(&dir.path().join("b.sqlite")))
        .await
        .unwrap();
    let root: Labels = [("fleetdb.io/gc.root".to_string(), "true".to_string())].into();
    let held = a.blob_put(b"held by a", root.clone(), None).await.unwrap();

    // b holds no blob: every file of the folder looked like its orphan.
    let stats = b.gc_run().await.unwrap();
    assert_eq!(stats.orphans_removed, 0, "{stats:?}");
    assert_eq!(a.blob_get(&held.digest).await.unwrap(), b"held by a");

    let err = b.blob_put(b"b's own", root, None).await.unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(
        err.to_string().contains("a.sqlite"),
        "names the owner: {err}"
    );
    let stats = b.gc_run().await.unwrap();
    assert_eq!(stats.orphans_removed, 0, "{stats:?}");
    let stats = a.gc_run().await.unwrap();
    assert_eq!(stats.orphans_removed, 0, "{stats:?}");
    assert_eq!(a.blob_get(&held.digest).await.unwrap(), b"held by a");

    // A folder written before owners were (no `blobs/database`): a database holding no blob
    // claims nothing and removes nothing; one holding blobs claims it at its next collection.
    let owner = dir.path().join("blobs").join("database");
    assert_eq!(std::fs::read_to_string(&owner).unwrap(), "a.sqlite\n");
    std::fs::remove_file(&owner).unwrap();
    let stats = b.gc_run().await.unwrap();
    assert_eq!(stats.orphans_removed, 0, "{stats:?}");
    assert!(!owner.exists());
    assert_eq!(a.blob_get(&held.digest).await.unwrap(), b"held by a");
    a.gc_run().await.unwrap();
    assert_eq!(std::fs::read_to_string(&owner).unwrap(), "a.sqlite\n");
    assert_eq!(a.blob_get(&held.digest).await.unwrap(), b"held by a");
}

// ------------------------------------------------------------------------------------------
// Opening a SQLite file that another application owns (tables, no `fleetdb_schema`, rollback
// journal) switched it to WAL and then migrated FleetDB's tables into it: FleetDB modified a file
// it does not own. It is refused now (`Invalid`, naming the file) before anything is written: the
// file stays byte-identical, no `-wal`/`-shm`/`-journal` is left, no `blobs/` or `ingest/` folder.

/// A file of "another application": one table, rollback journal, two rows.
fn foreign_sqlite_file(path: &std::path::Path) -> Vec<u8> {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=DELETE;
         CREATE TABLE contacts (id INTEGER PRIMARY KEY, name TEXT);
         INSERT INTO contacts (name) VALUES ('ada'), ('grace');",
    )
    .unwrap();
    drop(c);
    std::fs::read(path).unwrap()
}

fn assert_untouched(dir: &std::path::Path, path: &std::path::Path, before: &[u8]) {
    assert_eq!(
        std::fs::read(path).unwrap(),
        before,
        "the other application's file was modified"
    );
    let mut left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["db.sqlite"], "files left beside it");
}

#[tokio::test]
async fn sqlite_a_file_of_another_application_is_refused_and_left_untouched() {
    let (d, path) = sqlite_path();
    let before = foreign_sqlite_file(&path);
    for migrate in [true, false] {
        open_is_refused(
            &sqlite_url(&path),
            migrate,
            &["not a FleetDB database", "contacts"],
        )
        .await;
        assert_untouched(d.path(), &path, &before);
    }
    // A file that is not SQLite at all: the same refusal, the file kept.
    std::fs::write(&path, b"name,email\nada,ada@example.com\n").unwrap();
    let r = Store::open(&sqlite_url(&path)).await;
    assert!(
        matches!(&r, Err(Error::Invalid { rule, .. }) if rule.contains("not a SQLite database")),
        "{r:?}"
    );
    drop(r);
    assert_untouched(d.path(), &path, b"name,email\nada,ada@example.com\n");
}

// ------------------------------------------------------------------------------------------
// A database opened through a symbolic link kept its blobs beside the LINK (SQLite keeps its
// `-wal`/`-shm` beside the file the link points to): a blob put through the link was missing
// ("the bytes of blob … are missing") for every store that opened the file by its real path or
// another link, and theirs for it. The path is resolved at open now: the content store is
// beside the database file, whichever name it was opened by. A link to a missing file is
// refused (it would create the file at the link's target while naming the link).

#[tokio::test]
async fn sqlite_a_database_opened_through_a_symlink_keeps_its_blobs_beside_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("data").join("db.sqlite");
    let link = dir.path().join("links").join("db.sqlite");
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    let by_real = Store::open(&sqlite_url(&real)).await.unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let by_link = Store::open(&sqlite_url(&link)).await.unwrap();
    let put_by_link = by_link
        .blob_put(b"through the link", Labels::new(), None)
        .await
        .unwrap();
    let put_by_real = by_real
        .blob_put(b"by the real name", Labels::new(), None)
        .await
        .unwrap();
    assert_eq!(
        by_real.blob_get(&put_by_link.digest).await.unwrap(),
        b"through the link"
    );
    assert_eq!(
        by_link.blob_get(&put_by_real.digest).await.unwrap(),
        b"by the real name"
    );
    assert!(
        !link.parent().unwrap().join("blobs").exists(),
        "a content store beside the link"
    );
    drop((by_real, by_link));

    let dangling = dir.path().join("links").join("gone.sqlite");
    std::os::unix::fs::symlink(dir.path().join("data").join("missing.sqlite"), &dangling).unwrap();
    let r = Store::open(&sqlite_url(&dangling)).await;
    assert!(
        matches!(&r, Err(Error::Invalid { rule, .. }) if rule.contains("symbolic link")),
        "{r:?}"
    );
    assert!(!dir.path().join("data").join("missing.sqlite").exists());
}

// ------------------------------------------------------------------------------------------
// A SQLite path that cannot be a database file was reported as the database being unavailable
// (`Unavailable`: a transient error, exit 6, "retry later") or as a "disk I/O error" (a device):
// a folder, a path under a regular file, a character device. They are `Invalid` now, saying
// what the path is, and nothing is created.

#[tokio::test]
async fn sqlite_a_path_that_cannot_be_a_database_file_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"notes").unwrap();
    for (path, says) in [
        (dir.path().to_path_buf(), "is a folder"),
        (file.join("db.sqlite"), "not a folder"),
        (std::path::PathBuf::from("/dev/null"), "not a regular file"),
        (dir.path().join("new").join("x/"), "names a folder"),
    ] {
        let r = Store::open(&sqlite_url(&path)).await;
        match &r {
            Err(Error::Invalid { rule, .. }) => assert!(rule.contains(says), "{path:?}: {rule}"),
            other => panic!("{path:?}: expected Invalid, got {other:?}"),
        }
    }
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["notes.txt"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"notes");
}

// ------------------------------------------------------------------------------------------
// A SQLite URL whose path holds a NUL byte (no file can be named so) was reported as
// `Unavailable` ("cannot resolve the database path …"): a transient error, which
// `Error::is_retryable` says to retry, so a caller's retry loop waited on a URL that can never
// open. It is `Invalid` now, and nothing is created.

#[tokio::test]
async fn sqlite_a_path_with_a_nul_byte_is_invalid_not_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        format!("sqlite://{}/a\0b.sqlite", dir.path().display()),
        format!("sqlite://{}/x\0/db.sqlite", dir.path().display()),
        "sqlite://\0".to_string(),
    ] {
        let r = Store::open(&url).await;
        match &r {
            Err(e @ Error::Invalid { rule, .. }) => {
                assert!(rule.contains("NUL"), "{url:?}: {rule}");
                assert!(!e.is_retryable());
            }
            other => panic!("{url:?}: expected Invalid, got {other:?}"),
        }
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// ------------------------------------------------------------------------------------------
// A PostgreSQL URL the driver refused was reported as `invalid PostgreSQL URL "…": invalid
// connection string`, whatever was wrong: the option or value at fault (the driver's error's
// source) was dropped. It is named now.

#[tokio::test]
async fn a_postgres_url_the_driver_refuses_names_the_option_at_fault() {
    for (url, names) in [
        (
            "postgres://postgres@127.0.0.1/postgres?pool_size=8",
            "pool_size",
        ),
        (
            "postgres://postgres@127.0.0.1/postgres?connect_timeout=soon",
            "connect_timeout",
        ),
    ] {
        match Store::open(url).await {
            Err(Error::Invalid { rule, .. }) => assert!(rule.contains(names), "{url}: {rule}"),
            Err(e) => panic!("{url}: {e:?}, expected Invalid"),
            Ok(_) => panic!("{url}: opened, expected Invalid"),
        }
    }
}

// ------------------------------------------------------------------------------------------
// PostgreSQL, as SQLite above: a schema of another application (tables, no `fleetdb_schema`)
// was migrated into — FleetDB's tables created beside the application's, or, when a name
// collided ("objects"), an empty `fleetdb_schema` left behind by the failed first migration
// ("migration 0001_init failed: relation \"objects\" already exists"). It is refused now
// (`Invalid`, naming the schema and its tables) and left as it was.

#[tokio::test]
async fn postgres_a_schema_of_another_application_is_refused_and_left_untouched() {
    let (url, schema) = pg_schema().await;
    pg_exec(
        &url,
        "CREATE TABLE objects (id INT PRIMARY KEY, x TEXT); INSERT INTO objects VALUES (1, 'a');",
    )
    .await;
    for migrate in [true, false] {
        open_is_refused(&url, migrate, &["not a FleetDB schema", "objects"]).await;
    }
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let tables: Vec<String> = c
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema() ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(c);
    let _ = conn.await;
    pg_drop(&schema).await;
    assert_eq!(
        tables,
        ["objects"],
        "the other application's schema was modified"
    );
}

// A URL whose search_path names a schema that does not exist failed with "database error: no
// schema has been selected to create in (SQLSTATE 3F000)" (exit 1). It is `Invalid`, naming the
// search_path and what to do, and nothing is created.

#[tokio::test]
async fn postgres_a_search_path_naming_no_schema_is_invalid() {
    let base = fleetdb_postgres::testing::test_url();
    let schema = format!("fleetdb_t_missing_{:08x}", std::process::id());
    let url = fleetdb_postgres::testing::schema_url(&base, &schema);
    match Store::open(&url).await {
        Err(Error::Invalid { field, value, rule }) => {
            assert_eq!(field, "PostgreSQL search_path");
            assert!(value.contains(&schema), "{value}");
            assert!(rule.contains("CREATE SCHEMA"), "{rule}");
        }
        Err(e) => panic!("{e:?}, expected Invalid"),
        Ok(_) => panic!("opened, expected Invalid"),
    }
}

/// Opening `url` (migrating or not) is refused as `Invalid`, the rule saying each of `says`.
async fn open_is_refused(url: &str, migrate: bool, says: &[&str]) {
    let r = Store::open_with(
        url,
        OpenOptions {
            migrate,
            ..OpenOptions::default()
        },
    )
    .await;
    match &r {
        Err(Error::Invalid { rule, .. }) => {
            assert!(says.iter().all(|s| rule.contains(s)), "{rule}")
        }
        other => panic!("migrate={migrate}: expected Invalid, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// SQLite: a write that found another process holding the database's write lock past the busy
// timeout is run again by the backend's writer (`GROUP_ATTEMPTS_MAX` attempts). Those attempts
// are "attempts the backend itself ran again after a transient failure" (docs/metrics.md), yet
// `fleetdb_transactions_retried_total` stayed 0 on SQLite whatever the contention: an operator
// reading it against the duration histogram (docs/operations.md, "What to watch") blamed the
// machine for waits that were another process's writes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_write_run_again_after_another_process_held_the_lock_counts_as_retried() {
    let (_d, path) = sqlite_path();
    let clock: std::sync::Arc<dyn fleetdb::Clock> = std::sync::Arc::new(fleetdb::ManualClock::new(
        fleetdb::Timestamp(1_767_225_600_000_000),
    ));
    let options = fleetdb_sqlite::SqliteOptions {
        busy_timeout_ms: 100,
        ..fleetdb_sqlite::SqliteOptions::default()
    };
    let backend = fleetdb_sqlite::SqliteBackend::open(
        fleetdb_sqlite::Location::File(path.clone()),
        options,
        clock.clone(),
    )
    .await
    .unwrap();
    let store = Store::from_backend(std::sync::Arc::new(backend), clock, Default::default())
        .await
        .unwrap();
    let mm = store.metrics();
    store.object_put(&m("m0"), Labels::new()).await.unwrap();
    assert_eq!(mm.transactions_retried.get(), 0);
    // "Another process": a connection holding the write lock for 2.5 busy timeouts, so the
    // store's write fails its first two attempts (each waits 100 ms) and commits at its third
    // (the writer makes five).
    let (held, is_held) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        held.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(250));
        c.execute_batch("COMMIT").unwrap();
    });
    is_held.recv().unwrap();
    store.object_put(&m("m1"), Labels::new()).await.unwrap();
    other.join().unwrap();
    let retried = mm.transactions_retried.get();
    assert!(
        retried >= 1,
        "the write waited out another process's lock and ran again, yet retried = {retried}"
    );
    assert_eq!(mm.transactions_executed.get(), 2);
    assert_eq!(mm.transactions_failed.get(), 0);
    let text = mm.encode();
    assert!(
        !text.contains("fleetdb_transactions_retried_total 0"),
        "{text}"
    );
}

// ------------------------------------------------------------------------------------------
// A claim given up by its caller (a timeout, a `select!`) still runs to its end
// (`Store::detached_claim`), and its undelivered answer counts what the caller would have. A
// crashed worker's claim it took over ended there, `expired` — but the answer counted that only
// when the claim also took work (it read the process from the work): a takeover whose expiry
// parked the object (`process max-failures`) takes nothing, and the crashed worker's claim,
// ended for good (history `Expired`, no row left for a sweep), was never counted anywhere.

#[tokio::test]
async fn a_claim_given_up_by_its_caller_counts_the_expiry_of_the_claim_it_took_over() {
    let (_d, path) = sqlite_path();
    let (store, clock) = open_on_a_manual_clock(&sqlite_url(&path)).await;
    store.process_define("P", &[]).await.unwrap();
    store.process_max_failures("P", Some(1)).await.unwrap();
    store.object_put(&m("m1"), Labels::new()).await.unwrap();
    let spec = || fleetdb::SessionSpec::new("c", "h").ttl(std::time::Duration::from_secs(10));
    // A worker claims m1 and crashes: its session lapses.
    let crashed = store.session_start(spec()).await.unwrap();
    std::mem::forget(crashed.claim_object(&m("m1"), "P").await.unwrap());
    crashed.pause_renewal();
    clock.advance(std::time::Duration::from_secs(11));
    let rescuer = store.session_start(spec()).await.unwrap();
    // Polled once, then dropped: the caller gave up before the answer.
    let given_up = futures::FutureExt::now_or_never(rescuer.claim_object(&m("m1"), "P"));
    assert!(given_up.is_none(), "the caller gave up before the answer");
    // The detached claim expires the crashed worker's claim, which parks m1 (one failure).
    let mut parked = Vec::new();
    for _ in 0..250 {
        parked = store.backoff_parked(Some("P"), 10).await.unwrap();
        if !parked.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(parked.len(), 1, "the takeover's expiry parked m1");
    // Nothing is left for a sweep to count.
    store.sweep_sessions().await.unwrap();
    assert!(store.work_list(Some("P"), 10).await.unwrap().is_empty());
    let mm = store.metrics();
    assert_eq!(
        mm.work_finished.with_label_values(&["P", "expired"]).get(),
        1,
        "the crashed worker's claim ended by the given-up claim is counted once"
    );
}
