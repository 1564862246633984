//! Migration tests, both backends. Every migration has a test here that writes rows with the
//! schema BEFORE it and reads them through the API AFTER it; `every_migration_has_a_test` fails
//! when a migration is added without one. Also: an up-to-date open writes nothing, and a
//! database newer than the binary is refused untouched.

use std::sync::Arc;

use fleetdb::{Error, Labels, ObjectKey, OpenOptions, Store};
use serde_json::json;

/// The migrations that have a test below. Add the number when you add the test.
const TESTED: &[u32] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
/// The newest migration this binary knows.
const LATEST: u32 = 15;

#[test]
fn every_migration_has_a_test() {
    let sqlite: Vec<u32> = fleetdb_sqlite::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(
        sqlite, TESTED,
        "a SQLite migration has no test in tests/migrations.rs"
    );
    let expected: Vec<u32> = (1..=sqlite.len() as u32).collect();
    assert_eq!(
        sqlite, expected,
        "migrations are numbered 1, 2, 3… without gaps"
    );
}

#[test]
fn migrations_are_mirrored_across_backends() {
    let names = |ms: &[fleetdb::core::Migration]| {
        ms.iter().map(|m| (m.version, m.name)).collect::<Vec<_>>()
    };
    assert_eq!(
        names(fleetdb_sqlite::MIGRATIONS),
        names(fleetdb_postgres::MIGRATIONS)
    );
}

// ---------------------------------------------------------------- SQLite

fn sqlite_path() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    (dir, path)
}

async fn open_sqlite(path: &std::path::Path) -> fleetdb::Result<Store> {
    Store::open(&format!("sqlite://{}", path.display())).await
}

#[tokio::test]
async fn sqlite_0001_init_creates_the_default_namespace() {
    let (_d, path) = sqlite_path();
    fleetdb_sqlite::testing::migrate_file_to(&path, 1).unwrap();
    let c = rusqlite::Connection::open(&path).unwrap();
    let n: i64 = c
        .query_row(
            "SELECT count(*) FROM namespaces WHERE name = 'default'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(c);
    let store = open_sqlite(&path).await.unwrap();
    assert!(store.namespace_get("default").await.unwrap().is_some());
}

#[tokio::test]
async fn sqlite_0002_change_log_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_path();
    fleetdb_sqlite::testing::migrate_file_to(&path, 1).unwrap();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            r#"INSERT INTO objects VALUES ('default', 'machine', 'm1', '{"provider":"equinix"}', 10, 20, 0);
               INSERT INTO tags VALUES ('default', 'machine', 'm1', 'provided', '{"provider_id":"x1"}', 30, 0);"#,
        )
        .unwrap();
    }
    let store = open_sqlite(&path).await.unwrap();
    assert_eq!(store.schema_status().await.unwrap().database, LATEST);
    check_rows_from_before(&store).await;
}

/// Rows written by version 1 (revision 0, no change log yet) read correctly, and writing on
/// top of them starts the change log at revision 1.
async fn check_rows_from_before(store: &Store) {
    let m1 = ObjectKey::new("default", "machine", "m1").unwrap();
    let o = store.object_get(&m1).await.unwrap().unwrap();
    assert_eq!(o.labels["provider"], "equinix");
    assert_eq!((o.created_at.0, o.updated_at.0, o.revision.0), (10, 20, 0));
    let t = store.tag_get(&m1, "provided").await.unwrap().unwrap();
    assert_eq!(t.value, json!({"provider_id": "x1"}));
    let w = store
        .tag_set(&m1, "provided", &json!({"provider_id": "x2"}))
        .await
        .unwrap();
    assert_eq!(w.item.revision.0, 1);
    let changes = store
        .changes(fleetdb::Revision(0), &Default::default(), 10)
        .await
        .unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].old_value, Some(json!({"provider_id": "x1"})));
}

#[tokio::test]
async fn sqlite_0003_sessions_work_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(2);
    check_v2_rows_then_work(&open_sqlite(&path).await.unwrap()).await;
}

/// A SQLite file migrated to `version`, holding [`V2_ROWS`].
fn sqlite_with_v2_rows(version: u32) -> (tempfile::TempDir, std::path::PathBuf) {
    let (d, path) = sqlite_path();
    fleetdb_sqlite::testing::migrate_file_to(&path, version).unwrap();
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(V2_ROWS).unwrap();
    (d, path)
}

/// A PostgreSQL schema migrated to `version`, holding [`V2_ROWS`].
async fn pg_with_v2_rows(version: u32) -> PgSchema {
    let s = pg_schema().await;
    fleetdb_postgres::testing::migrate_to(&s.url, version)
        .await
        .unwrap();
    pg_exec(
        &s.url,
        &format!("{V2_ROWS} SELECT setval('fleetdb_revision', 2);"),
    )
    .await;
    s
}

/// Rows as version 2 wrote them: an object, a tag and their change-log entries.
const V2_ROWS: &str = r#"
    INSERT INTO objects VALUES ('default', 'machine', 'm1', '{"provider":"equinix"}', 10, 10, 1);
    INSERT INTO tags VALUES ('default', 'machine', 'm1', 'provided', '{"provider_id":"x1"}', 20, 2);
    INSERT INTO changes VALUES (1, 'default', 'machine', 'm1', 'object', '', 'put', NULL, '{"labels":{"provider":"equinix"}}', 10);
    INSERT INTO changes VALUES (2, 'default', 'machine', 'm1', 'tag', 'provided', 'put', NULL, '{"provider_id":"x1"}', 20);
"#;

/// After 0003: the version-2 rows read back, revisions continue, and work on them can be claimed.
async fn check_v2_rows_then_work(store: &Store) {
    let m1 = ObjectKey::new("default", "machine", "m1").unwrap();
    assert_eq!(store.object_get(&m1).await.unwrap().unwrap().revision.0, 1);
    assert_eq!(
        store
            .tag_get(&m1, "provided")
            .await
            .unwrap()
            .unwrap()
            .revision
            .0,
        2
    );
    assert_eq!(
        store
            .changes(fleetdb::Revision(0), &Default::default(), 10)
            .await
            .unwrap()
            .len(),
        2
    );
    let w = store
        .tag_set(&m1, "agent_started", &json!(true))
        .await
        .unwrap();
    assert!(w.item.revision.0 > 2);
    store.process_define("AgentStart", &[]).await.unwrap();
    let s = store
        .session_start(fleetdb::SessionSpec::new("test", "host"))
        .await
        .unwrap();
    let mut work = s.claim("AgentStart", "has(provided)", 5).await.unwrap();
    assert_eq!(work.len(), 1);
    work[0].finish(|_| async { Ok(()) }).await.unwrap();
    s.close().await.unwrap();
}

#[tokio::test]
async fn sqlite_0004_tags_by_name_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(3);
    check_v2_rows_then_work(&open_sqlite(&path).await.unwrap()).await;
}

/// After 0005: the older rows read back and World writes take the next revisions.
async fn check_v2_rows_then_world(store: &Store) {
    check_v2_rows_then_work(store).await;
    let before = store.revision().await.unwrap().current;
    let w = store.kv_set("after/0005", "v").await.unwrap();
    assert!(w.item.revision > before);
    let h1 = store.world("h1").unwrap();
    h1.map_set("ns", "x").await.unwrap();
    assert_eq!(store.map_get("ns").await.unwrap().len(), 1);
    let changes = store
        .changes(before, &fleetdb::ChangeFilter::default(), 100)
        .await
        .unwrap();
    assert!(changes.iter().any(|c| c.id == "after/0005"));
}

#[tokio::test]
async fn sqlite_0005_world_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(4);
    check_v2_rows_then_world(&open_sqlite(&path).await.unwrap()).await;
}

/// After 0006: older rows read back; leases and collection work on top of them.
async fn check_v2_rows_then_gc(store: &Store) {
    check_v2_rows_then_world(store).await;
    store.gc_kind_declare("layer", true).await.unwrap();
    let lease = store
        .lease_create(fleetdb::LeaseSpec::default())
        .await
        .unwrap();
    let kept = ObjectKey::new("default", "layer", "kept").unwrap();
    store
        .object_put_leased(&kept, Labels::new(), &lease.id)
        .await
        .unwrap();
    let gone = ObjectKey::new("default", "layer", "gone").unwrap();
    store.object_put(&gone, Labels::new()).await.unwrap();
    let stats = store.gc_run().await.unwrap();
    assert_eq!(stats.swept_objects, 1);
    assert!(store.object_get(&kept).await.unwrap().is_some());
    let m1 = ObjectKey::new("default", "machine", "m1").unwrap();
    assert!(
        store.object_get(&m1).await.unwrap().is_some(),
        "undeclared kinds stay"
    );
}

#[tokio::test]
async fn sqlite_0006_leases_content_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(5);
    check_v2_rows_then_gc(&open_sqlite(&path).await.unwrap()).await;
}

/// After 0007: older rows read back; exports, maps and key-values are found as before.
async fn check_v2_rows_then_kv_indexes(store: &Store) {
    check_v2_rows_then_gc(store).await;
    let h1 = store.world("h1").unwrap();
    h1.export(vec![fleetdb::core::world::ExportRecord {
        id: fleetdb::core::world::ExportId::new("file", "f1", "*"),
        data: b"d".to_vec(),
        lifetime: fleetdb::core::world::Lifetime::persistent(),
        holds: vec![],
    }])
    .await
    .unwrap();
    let h2 = store.world("h2").unwrap();
    let seen = h2.collect(&[]).await.unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(store.map_get("ns").await.unwrap().len(), 1);
    store.kv_set("after/0007", "v1").await.unwrap();
    let w = store.kv_set("after/0007", "v2").await.unwrap();
    assert!(w.changed);
    assert_eq!(
        store.kv_get("after/0007").await.unwrap().map(|e| e.value),
        Some("v2".to_string())
    );
}

#[tokio::test]
async fn sqlite_0007_world_kv_indexes_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(6);
    check_v2_rows_then_kv_indexes(&open_sqlite(&path).await.unwrap()).await;
}

/// After 0008: older rows read back; a collection over them is recorded in the run history.
async fn check_v2_rows_then_gc_runs(store: &Store) {
    check_v2_rows_then_kv_indexes(store).await;
    let before = store.gc_history(10).await.unwrap().len();
    let stats = store.gc_run().await.unwrap();
    let history = store.gc_history(10).await.unwrap();
    assert_eq!(history.len(), before + 1);
    let newest = &history[0];
    assert_eq!(
        (newest.started_at, newest.marked, &newest.trigger),
        (stats.started_at, stats.marked, &stats.trigger),
        "newest first"
    );
}

#[tokio::test]
async fn sqlite_0008_gc_runs_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(7);
    check_v2_rows_then_gc_runs(&open_sqlite(&path).await.unwrap()).await;
}

/// A key-value row and its change as version 8 wrote them (revision 3), for the 0009 checks;
/// `data` is the backend's spelling of the bytes "old".
fn v8_kv_row(data: &str) -> String {
    format!(
        "INSERT INTO world (space, key, scope, owner, kind, name, target, data, meta, session_id, \
           expires_at, create_revision, revision, created_at, updated_at) \
         VALUES ('kv', 'pre', '', '', '', '', '', {data}, NULL, NULL, NULL, 3, 3, 30, 30); \
         INSERT INTO changes VALUES (3, '.kv', '', 'pre', 'kv', '', 'put', NULL, '{{\"value\":\"old\"}}', 30);"
    )
}

/// After 0009: the version-2 rows read back, and a key written before it is overwritten with
/// its previous value in the change log.
async fn check_v2_rows_then_prev_data(store: &Store) {
    let m1 = ObjectKey::new("default", "machine", "m1").unwrap();
    assert_eq!(store.object_get(&m1).await.unwrap().unwrap().revision.0, 1);
    let tag = store.tag_get(&m1, "provided").await.unwrap().unwrap();
    assert_eq!(tag.revision.0, 2);
    let before = store.kv_get("pre").await.unwrap().unwrap();
    assert_eq!((before.value.as_str(), before.revision.0), ("old", 3));
    let set = store.kv_set("pre", "new").await.unwrap();
    assert!(set.changed);
    assert_eq!(set.item.create_revision.0, 3);
    let log = store
        .changes(fleetdb::Revision(3), &fleetdb::ChangeFilter::default(), 10)
        .await
        .unwrap();
    let c = log.iter().find(|c| c.id == "pre").unwrap();
    assert_eq!(c.old_value.as_ref().unwrap()["value"], "old");
    assert_eq!(c.new_value.as_ref().unwrap()["value"], "new");
    assert_eq!(c.revision, set.item.revision);
}

#[tokio::test]
async fn sqlite_0009_world_prev_data_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(8);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(&v8_kv_row("CAST('old' AS BLOB)")).unwrap();
    drop(c);
    check_v2_rows_then_prev_data(&open_sqlite(&path).await.unwrap()).await;
}

/// A claim (object m1) and a running backoff (object m2) of process P by session s9, as version
/// 9 wrote them, for the 0010 checks.
const V9_WORK_ROWS: &str = "
    INSERT INTO processes VALUES ('P', '[]', 0);
    INSERT INTO sessions VALUES ('s9', 'test', 'h', '', 10000, 0, 4102444800000000);
    INSERT INTO work VALUES ('default', 'machine', 'm1', 'P', 's9', 7, 0);
    INSERT INTO work_backoff VALUES ('default', 'machine', 'm2', 'P', 4102444800000000, 'x', 1);
";

/// After 0010 (the per-process indexes rebuilt, led by the process and followed by the key): the
/// claim and the backoff written before it are listed per process and ended by key.
async fn check_v2_rows_then_work_key_probes(store: &Store) {
    let m1 = ObjectKey::new("default", "machine", "m1").unwrap();
    let m2 = ObjectKey::new("default", "machine", "m2").unwrap();
    assert_eq!(store.object_get(&m1).await.unwrap().unwrap().revision.0, 1);
    let work = store.work_list(Some("P"), 10).await.unwrap();
    assert_eq!(work.len(), 1);
    assert_eq!(
        (&work[0].key, work[0].token, work[0].session_id.as_str()),
        (&m1, 7, "s9")
    );
    let backoffs = store.backoff_list(Some("P"), true, 10).await.unwrap();
    assert_eq!(backoffs.len(), 1);
    assert_eq!((&backoffs[0].key, backoffs[0].cause.as_str()), (&m2, "x"));
    assert!(store.work_cancel(&m1, "P").await.unwrap());
    assert!(store.work_list(Some("P"), 10).await.unwrap().is_empty());
    assert!(store.backoff_clear(&m2, "P").await.unwrap());
    assert!(store
        .backoff_list(Some("P"), false, 10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn sqlite_0010_work_key_probes_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(9);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(V9_WORK_ROWS).unwrap();
    drop(c);
    check_v2_rows_then_work_key_probes(&open_sqlite(&path).await.unwrap()).await;
}

/// History of process P as version 10 wrote it: two old rows, then one from the far future.
const V10_HISTORY_ROWS: &str = "
    INSERT INTO work_history (namespace, kind, id, process, event, session_id, component, host,
        token, at, cause)
    VALUES ('default', 'machine', 'm1', 'P', 'Started', 's9', 'test', 'h', 7, 1000000, NULL),
           ('default', 'machine', 'm1', 'P', 'Finished', 's9', 'test', 'h', 7, 2000000, NULL),
           ('default', 'machine', 'm1', 'P', 'Started', 's9', 'test', 'h', 8, 4102444800000000, NULL);
";

/// After 0011 (`work_history (at)` dropped, history pruned in `seq` order): the rows written
/// before it are listed, and the old ones pruned.
async fn check_v2_rows_then_history_prune_by_seq(store: &Store) {
    let listed = |store: &Store| {
        let store = store.clone();
        async move {
            store
                .history(&fleetdb::HistoryFilter::Process("P".into()), None, 10)
                .await
                .unwrap()
                .items
                .iter()
                .map(|e| e.token)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(store).await, vec![8, 7, 7]);
    assert_eq!(
        store
            .history_prune(std::time::Duration::from_secs(3600))
            .await
            .unwrap(),
        2
    );
    assert_eq!(listed(store).await, vec![8]);
}

#[tokio::test]
async fn sqlite_0011_history_prune_by_seq_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(10);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(V10_HISTORY_ROWS).unwrap();
    drop(c);
    check_v2_rows_then_history_prune_by_seq(&open_sqlite(&path).await.unwrap()).await;
}

/// After 0012 (on PostgreSQL the key indexes of tags, claims, backoffs and an object's history
/// lead with `id`): the tag, claim, backoff and history written before it are read and ended by
/// key, and an object's history is listed newest first.
async fn check_rows_then_keys_led_by_id(store: &Store) {
    let m1 = ObjectKey::new("default", "machine", "m1").unwrap();
    let tag = store.tag_get(&m1, "provided").await.unwrap().unwrap();
    assert_eq!(tag.revision.0, 2);
    assert_eq!(store.tag_list(&m1).await.unwrap().len(), 1);
    let history = store
        .history(&fleetdb::HistoryFilter::Object(m1.clone()), None, 10)
        .await
        .unwrap()
        .items
        .iter()
        .map(|e| (e.token, e.event.as_str()))
        .collect::<Vec<_>>();
    assert_eq!(
        history,
        vec![(8, "Started"), (7, "Finished"), (7, "Started")]
    );
    check_v2_rows_then_work_key_probes(store).await;
    // A tag written after it lands in the rebuilt index and is found by key.
    store.tag_set(&m1, "after", &json!(12)).await.unwrap();
    assert_eq!(store.tag_list(&m1).await.unwrap().len(), 2);
    assert!(store.tag_get(&m1, "after").await.unwrap().is_some());
}

#[tokio::test]
async fn sqlite_0012_keys_led_by_id_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(11);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(V9_WORK_ROWS).unwrap();
    c.execute_batch(V10_HISTORY_ROWS).unwrap();
    drop(c);
    check_rows_then_keys_led_by_id(&open_sqlite(&path).await.unwrap()).await;
}

/// After 0013 (processes can be paused and limited): the process written before it is neither,
/// keeps its conflicts, and its claims start; a pause and a limit are then kept.
async fn check_rows_then_process_controls(store: &Store) {
    let p = store.process_list().await.unwrap();
    assert_eq!(p.len(), 1);
    assert!(
        !p[0].paused && p[0].max_active.is_none() && p[0].conflicts.is_empty(),
        "{p:?}"
    );
    let s = store
        .session_start(fleetdb::SessionSpec::new("c", "h"))
        .await
        .unwrap();
    let m3 = ObjectKey::new("default", "machine", "m3").unwrap();
    store.object_put(&m3, Labels::new()).await.unwrap();
    let mut w = s.claim_object(&m3, "P").await.unwrap();
    w.finish(|_| async { Ok(()) }).await.unwrap();
    assert!(store.process_pause("P").await.unwrap().paused);
    store.process_limit("P", Some(5)).await.unwrap();
    let p = store.process_list().await.unwrap();
    assert!(p[0].paused && p[0].max_active == Some(5), "{p:?}");
    s.close().await.unwrap();
}

#[tokio::test]
async fn sqlite_0013_process_controls_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(12);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(V9_WORK_ROWS).unwrap();
    drop(c);
    check_rows_then_process_controls(&open_sqlite(&path).await.unwrap()).await;
}

/// After 0014 (objects that keep failing are parked): the backoff written before it counts one
/// failure and is not parked, the process parks nothing; a limit set then parks at the second
/// failure in a row.
async fn check_rows_then_max_failures(url: &str) {
    let clock = Arc::new(fleetdb::ManualClock::new(fleetdb::Timestamp::from_system(
        std::time::SystemTime::now(),
    )));
    let store = Store::open_with(
        url,
        OpenOptions {
            clock: Some(clock.clone()),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let m2 = ObjectKey::new("default", "machine", "m2").unwrap();
    let b = store.backoff_list(Some("P"), true, 10).await.unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!((&b[0].key, b[0].failures, b[0].parked()), (&m2, 1, false));
    let p = store.process_list().await.unwrap();
    assert_eq!(p[0].max_failures, None, "{p:?}");
    let p = store.process_max_failures("P", Some(2)).await.unwrap();
    assert_eq!(p.max_failures, Some(2));
    let s = store
        .session_start(fleetdb::SessionSpec::new("c", "h"))
        .await
        .unwrap();
    let m3 = ObjectKey::new("default", "machine", "m3").unwrap();
    store.object_put(&m3, Labels::new()).await.unwrap();
    let second = std::time::Duration::from_secs(1);
    let backoff = fleetdb::Backoff::new(second, second, 1.0).unwrap();
    let mut w = s.claim_object(&m3, "P").await.unwrap();
    w.fail(&backoff, "first").await.unwrap();
    clock.advance(second);
    let mut w = s.claim_object(&m3, "P").await.unwrap();
    w.fail(&backoff, "second").await.unwrap();
    let b = store.backoff_list(Some("P"), true, 10).await.unwrap();
    let m3b = b.iter().find(|b| b.key == m3).unwrap();
    assert_eq!((m3b.failures, m3b.parked()), (2, true));
    s.close().await.unwrap();
}

#[tokio::test]
async fn sqlite_0014_max_failures_keeps_rows_written_before_it() {
    // The rows as written before 0013 (SQLite wants every column of a row), then 0013.
    let (_d, path) = sqlite_with_v2_rows(12);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(V9_WORK_ROWS).unwrap();
    drop(c);
    fleetdb_sqlite::testing::migrate_file_to(&path, 13).unwrap();
    check_rows_then_max_failures(&format!("sqlite://{}", path.display())).await;
}

/// Rows as version 14 wrote them: a lease holding exactly `gc::LEASE_RESOURCES_MAX` resources
/// (the review's million rows, written straight into the table) and one holding two.
fn v14_lease_rows(fill: &str) -> String {
    format!(
        "INSERT INTO leases (id, labels, flat, expires_at, created_at, revision) \
           VALUES ('big', '{{}}', 0, NULL, 10, 3), ('small', '{{}}', 0, NULL, 10, 4);
         INSERT INTO lease_resources (lease_id, rtype, namespace, kind, id, added_at) \
           VALUES ('small', 'object', 'default', 'layer', 's1', 10), \
                  ('small', 'blob', '', '', 'sha256:{}', 10);
         {fill}",
        "a".repeat(64)
    )
}
const V14_FILL_SQLITE: &str =
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000) \
     INSERT INTO lease_resources (lease_id, rtype, namespace, kind, id, added_at) \
     SELECT 'big', 'object', 'default', 'layer', 'l' || i, 0 FROM n;";
const V14_FILL_PG: &str = "INSERT INTO lease_resources (lease_id, rtype, namespace, kind, id, added_at) \
     SELECT 'big', 'object', 'default', 'layer', 'l' || i, 0 FROM generate_series(1, 1000000) AS i;";

/// After 0015 (a lease's resources are counted on its row): the leases written before it are
/// counted, so the one holding the maximum takes no more (until one is removed) and the small one
/// takes more.
async fn check_rows_then_lease_resource_count(store: &Store) {
    use fleetdb::core::gc::{Resource, LEASE_RESOURCES_MAX};
    assert_eq!(LEASE_RESOURCES_MAX, 1_000_000, "the fill matches the limit");
    let layer = |id: &str| Resource::Object {
        key: ObjectKey::new("default", "layer", id).unwrap(),
    };
    let err = store.lease_add("big", layer("one-more")).await.unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err}");
    assert!(!store.lease_add("big", layer("l7")).await.unwrap(), "held");
    assert!(store
        .lease_remove_resource("big", layer("l7"))
        .await
        .unwrap());
    assert!(store.lease_add("big", layer("one-more")).await.unwrap());
    let err = store.lease_add("big", layer("l7")).await.unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err}");
    assert_eq!(store.lease_resources("small").await.unwrap().len(), 2);
    assert!(store.lease_add("small", layer("s2")).await.unwrap());
}

#[tokio::test]
async fn sqlite_0015_lease_resource_count_keeps_rows_written_before_it() {
    let (_d, path) = sqlite_with_v2_rows(14);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(&v14_lease_rows(V14_FILL_SQLITE)).unwrap();
    drop(c);
    check_rows_then_lease_resource_count(&open_sqlite(&path).await.unwrap()).await;
}

#[tokio::test]
async fn sqlite_open_with_nothing_to_migrate_writes_nothing() {
    let (_d, path) = sqlite_path();
    let store = open_sqlite(&path).await.unwrap();
    store
        .object_put(
            &ObjectKey::new("default", "machine", "m1").unwrap(),
            Labels::new(),
        )
        .await
        .unwrap();
    drop(store); // closes every connection: SQLite checkpoints and removes the WAL
    let before = std::fs::read(&path).unwrap();
    let wal = path.with_extension("sqlite-wal");
    assert!(
        !wal.exists(),
        "the WAL is checkpointed when the store is dropped"
    );
    let store = open_sqlite(&path).await.unwrap();
    let status = store.schema_status().await.unwrap();
    assert!(status.pending.is_empty());
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        wal_len, 0,
        "the second open appended to the WAL: it wrote something"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[tokio::test]
async fn sqlite_newer_schema_is_refused_untouched() {
    let (_d, path) = sqlite_path();
    drop(open_sqlite(&path).await.unwrap());
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute(
            "INSERT INTO fleetdb_schema VALUES (999, 'from_the_future', 0)",
            [],
        )
        .unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = open_sqlite(&path).await.unwrap_err();
    assert_eq!(
        err,
        Error::SchemaTooNew {
            database: 999,
            binary: LATEST
        }
    );
    assert!(err.to_string().contains("upgrade fleetdb"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[tokio::test]
async fn sqlite_without_migrate_a_behind_database_says_so() {
    let (_d, path) = sqlite_path();
    fleetdb_sqlite::testing::migrate_file_to(&path, 1).unwrap();
    let store = Store::open_with(
        &format!("sqlite://{}", path.display()),
        OpenOptions {
            migrate: false,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let err = store.namespace_get("default").await.unwrap_err();
    assert_eq!(
        err,
        Error::SchemaBehind {
            database: 1,
            binary: LATEST
        }
    );
    store.migrate().await.unwrap();
    assert!(store.namespace_get("default").await.unwrap().is_some());
}

// ---------------------------------------------------------------- PostgreSQL

fn pg_base() -> String {
    fleetdb_postgres::testing::test_url()
}

struct PgSchema {
    url: String,
    name: String,
}

async fn pg_schema() -> PgSchema {
    let (url, name) = fleetdb_postgres::testing::create_schema(&pg_base())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    PgSchema { url, name }
}

async fn pg_exec(url: &str, sql: &str) {
    fleetdb_postgres::testing::exec(url, sql).await.unwrap();
}

async fn pg_drop(s: PgSchema) {
    fleetdb_postgres::testing::drop_schema(&pg_base(), &s.name)
        .await
        .unwrap();
}

/// A URL for the same schema through a role that may only read: an open through it fails if it
/// tries to write anything.
async fn pg_read_only_url(s: &PgSchema) -> String {
    let role = format!("{}_ro", s.name);
    pg_exec(
        &s.url,
        &format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role} LOGIN; END IF; END $$;
             GRANT USAGE ON SCHEMA {schema} TO {role};
             GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role};
             GRANT SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role};",
            schema = s.name
        ),
    )
    .await;
    s.url
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1)
}

async fn pg_drop_role(s: &PgSchema) {
    let role = format!("{}_ro", s.name);
    pg_exec(
        &pg_base(),
        &format!("DROP OWNED BY {role}; DROP ROLE IF EXISTS {role};"),
    )
    .await;
}

#[tokio::test]
async fn postgres_0001_init_creates_the_default_namespace() {
    let s = pg_schema().await;
    fleetdb_postgres::testing::migrate_to(&s.url, 1)
        .await
        .unwrap();
    let store = Store::open(&s.url).await.unwrap();
    assert!(store.namespace_get("default").await.unwrap().is_some());
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0002_change_log_keeps_rows_written_before_it() {
    let s = pg_schema().await;
    fleetdb_postgres::testing::migrate_to(&s.url, 1)
        .await
        .unwrap();
    pg_exec(
        &s.url,
        r#"INSERT INTO objects VALUES ('default', 'machine', 'm1', '{"provider":"equinix"}', 10, 20, 0);
           INSERT INTO tags VALUES ('default', 'machine', 'm1', 'provided', '{"provider_id":"x1"}', 30, 0);"#,
    )
    .await;
    let store = Store::open(&s.url).await.unwrap();
    assert_eq!(store.schema_status().await.unwrap().database, LATEST);
    check_rows_from_before(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0003_sessions_work_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(2).await;
    let store = Store::open(&s.url).await.unwrap();
    check_v2_rows_then_work(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0004_tags_by_name_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(3).await;
    let store = Store::open(&s.url).await.unwrap();
    check_v2_rows_then_work(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0005_world_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(4).await;
    let store = Store::open(&s.url).await.unwrap();
    check_v2_rows_then_world(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0006_leases_content_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(5).await;
    let store = Store::open(&s.url).await.unwrap();
    check_v2_rows_then_gc(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0007_world_kv_indexes_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(6).await;
    let store = Store::open(&s.url).await.unwrap();
    check_v2_rows_then_kv_indexes(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0008_gc_runs_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(7).await;
    let store = Store::open(&s.url).await.unwrap();
    check_v2_rows_then_gc_runs(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0009_world_prev_data_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(8).await;
    pg_exec(
        &s.url,
        &format!(
            "{} SELECT setval('fleetdb_revision', 3);",
            v8_kv_row("convert_to('old', 'UTF8')")
        ),
    )
    .await;
    let store = Store::open(&s.url).await.unwrap();
    check_v2_rows_then_prev_data(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0010_work_key_probes_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(9).await;
    pg_exec(&s.url, V9_WORK_ROWS).await;
    let store = Store::open(&s.url).await.unwrap();
    check_v2_rows_then_work_key_probes(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0011_history_prune_by_seq_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(10).await;
    pg_exec(&s.url, V10_HISTORY_ROWS).await;
    let store = Store::open(&s.url).await.unwrap();
    check_v2_rows_then_history_prune_by_seq(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0012_keys_led_by_id_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(11).await;
    pg_exec(&s.url, V9_WORK_ROWS).await;
    pg_exec(&s.url, V10_HISTORY_ROWS).await;
    let store = Store::open(&s.url).await.unwrap();
    check_rows_then_keys_led_by_id(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0013_process_controls_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(12).await;
    pg_exec(&s.url, V9_WORK_ROWS).await;
    let store = Store::open(&s.url).await.unwrap();
    check_rows_then_process_controls(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0014_max_failures_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(13).await;
    pg_exec(&s.url, V9_WORK_ROWS).await;
    check_rows_then_max_failures(&s.url).await;
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_0015_lease_resource_count_keeps_rows_written_before_it() {
    let s = pg_with_v2_rows(14).await;
    pg_exec(&s.url, &v14_lease_rows(V14_FILL_PG)).await;
    let store = Store::open(&s.url).await.unwrap();
    check_rows_then_lease_resource_count(&store).await;
    drop(store);
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_open_with_nothing_to_migrate_writes_nothing() {
    let s = pg_schema().await;
    drop(Store::open(&s.url).await.unwrap());
    let ro = pg_read_only_url(&s).await;
    let store = Store::open(&ro)
        .await
        .expect("an up-to-date open through a read-only role succeeds");
    assert!(store.namespace_get("default").await.unwrap().is_some());
    // The role really cannot write.
    let err = store
        .namespace_create("x", Labels::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    drop(store);
    pg_drop_role(&s).await;
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_newer_schema_is_refused_untouched() {
    let s = pg_schema().await;
    drop(Store::open(&s.url).await.unwrap());
    pg_exec(
        &s.url,
        "INSERT INTO fleetdb_schema VALUES (999, 'from_the_future', 0)",
    )
    .await;
    let ro = pg_read_only_url(&s).await;
    let err = Store::open(&ro).await.unwrap_err();
    assert_eq!(
        err,
        Error::SchemaTooNew {
            database: 999,
            binary: LATEST
        }
    );
    let err = Store::open(&s.url).await.unwrap_err();
    assert_eq!(
        err,
        Error::SchemaTooNew {
            database: 999,
            binary: LATEST
        }
    );
    pg_drop_role(&s).await;
    pg_drop(s).await;
}

#[tokio::test]
async fn postgres_concurrent_first_opens_migrate_once() {
    let s = pg_schema().await;
    let opens = (0..4).map(|_| {
        let url = s.url.clone();
        tokio::spawn(async move {
            Store::open_with(
                &url,
                OpenOptions {
                    clock: Some(Arc::new(fleetdb::SystemClock)),
                    ..OpenOptions::default()
                },
            )
            .await
        })
    });
    for r in futures::future::join_all(opens).await {
        r.unwrap().expect("every concurrent open succeeds");
    }
    let store = Store::open(&s.url).await.unwrap();
    let st = store.schema_status().await.unwrap();
    assert_eq!(st.applied.len(), LATEST as usize);
    drop(store);
    pg_drop(s).await;
}
