//! PostgreSQL-specific behaviour of the backend: migrations, writes-nothing opens, retries under
//! concurrency, compaction, label filters, round trips. The shared conformance suite covers the
//! rest. Every test works in its own throwaway schema on `$FLEETDB_TEST_POSTGRES_URL`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetdb_core::{
    Applied, Backend, Batch, ChangeFilter, ChangeOp, Clock, Entity, Error, LabelRequirement,
    ManualClock, ObjectCursor, ObjectKey, ObjectQuery, Op, Precondition, PutMode, Revision,
    Timestamp,
};
use fleetdb_postgres::{testing, PostgresBackend, PostgresOptions, MIGRATIONS};
use tokio_postgres::NoTls;

struct TestDb {
    base: String,
    url: String,
    schema: String,
}

impl TestDb {
    async fn new() -> TestDb {
        let base = testing::test_url();
        match testing::create_schema(&base).await {
            Ok((url, schema)) => TestDb { base, url, schema },
            Err(msg) => panic!("{msg}"),
        }
    }

    /// A URL for the schema whose connections commit with `synchronous_commit = level`.
    fn synchronous_commit_url(&self, level: &str) -> String {
        format!("{}%20-c%20synchronous_commit%3D{level}", self.url)
    }

    /// A URL for the schema whose sessions are read-only: any write fails.
    fn read_only_url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}options=-c%20search_path%3D{}%20-c%20default_transaction_read_only%3Don",
            self.base, self.schema
        )
    }

    async fn raw(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    async fn open(&self) -> PostgresBackend {
        open_url(&self.url, PostgresOptions::default())
            .await
            .unwrap()
    }

    async fn drop(self) {
        testing::drop_schema(&self.base, &self.schema)
            .await
            .unwrap();
    }
}

/// The newest migration this binary knows.
fn latest() -> u32 {
    MIGRATIONS.iter().map(|m| m.version).max().unwrap()
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(ManualClock::new(Timestamp(1_700_000_000_000_000)))
}

async fn open_url(url: &str, options: PostgresOptions) -> fleetdb_core::Result<PostgresBackend> {
    PostgresBackend::open(url, options, clock()).await
}

fn key(kind: &str, id: &str) -> ObjectKey {
    ObjectKey::new("default", kind, id).unwrap()
}

fn batch(ops: Vec<Op>) -> Batch {
    Batch {
        preconditions: Vec::new(),
        ops,
        now: Timestamp(1_700_000_000_000_000),
    }
}

fn put(k: &ObjectKey, labels: &[(&str, &str)]) -> Op {
    Op::ObjectPut {
        key: k.clone(),
        labels: labels
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        mode: PutMode::Upsert,
    }
}

fn tag_set(k: &ObjectKey, name: &str, value: &str) -> Op {
    Op::TagSet {
        key: k.clone(),
        name: name.to_string(),
        value: value.to_string(),
    }
}

async fn schema_rows(client: &tokio_postgres::Client) -> Vec<(i32, String, i64)> {
    client
        .query(
            "SELECT version, name, applied_at FROM fleetdb_schema ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn open_migrates_and_a_second_open_writes_nothing() {
    let db = TestDb::new().await;

    // A read-only session cannot migrate: proves the read-only check below detects writes. (A
    // server refusing writes is a standby, or a primary demoted by a failover: unavailable for
    // now, to be tried again.)
    let err = open_url(&db.read_only_url(), PostgresOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable(m) if m.contains("read-only")),
        "{err:?}"
    );

    let backend = db.open().await;
    let status = backend.schema_status().await.unwrap();
    assert_eq!(status.database, latest());
    assert_eq!(status.binary, latest());
    assert!(status.pending.is_empty());
    let applied: Vec<_> = status
        .applied
        .iter()
        .map(|a| (a.version, a.name.as_str()))
        .collect();
    assert_eq!(
        applied,
        vec![
            (1, "init"),
            (2, "change_log"),
            (3, "sessions_work"),
            (4, "tags_by_name"),
            (5, "world"),
            (6, "leases_content"),
            (7, "world_kv_indexes"),
            (8, "gc_runs"),
            (9, "world_prev_data"),
            (10, "work_key_probes"),
            (11, "history_prune_by_seq"),
            (12, "keys_led_by_id"),
            (13, "process_controls"),
            (14, "max_failures"),
            (15, "lease_resource_count"),
        ]
    );
    assert_eq!(
        status.applied[0].applied_at,
        Timestamp(1_700_000_000_000_000),
        "applied_at comes from the clock"
    );
    let default = backend.namespace_get("default").await.unwrap().unwrap();
    assert_eq!(default.revision, Revision(0));
    assert!(default.created_at.0 > 1_600_000_000_000_000);
    let rev = backend.revision().await.unwrap();
    assert_eq!((rev.current, rev.compacted), (Revision(0), Revision(0)));

    let raw = db.raw().await;
    let before = schema_rows(&raw).await;

    // Nothing to migrate: the open only reads (it succeeds in a read-only session).
    let again = open_url(&db.read_only_url(), PostgresOptions::default())
        .await
        .unwrap();
    assert_eq!(again.schema_status().await.unwrap(), status);
    assert_eq!(again.migrate().await.unwrap(), status);
    assert_eq!(schema_rows(&raw).await, before);
    assert_eq!(again.revision().await.unwrap(), rev);
    db.drop().await;
}

#[tokio::test]
async fn schema_too_new_fails_and_writes_nothing() {
    let db = TestDb::new().await;
    db.open().await;
    let raw = db.raw().await;
    raw.execute(
        "INSERT INTO fleetdb_schema (version, name, applied_at) VALUES (999, 'future', 1)",
        &[],
    )
    .await
    .unwrap();
    let before = schema_rows(&raw).await;
    for migrate in [true, false] {
        let options = PostgresOptions {
            migrate,
            ..PostgresOptions::default()
        };
        // Read-only: had it tried to write anything, it would fail with a different error.
        let err = open_url(&db.read_only_url(), options).await.unwrap_err();
        assert_eq!(
            err,
            Error::SchemaTooNew {
                database: 999,
                binary: MIGRATIONS.len() as u32
            }
        );
    }
    assert_eq!(schema_rows(&raw).await, before);
    db.drop().await;
}

#[tokio::test]
async fn open_without_migrate_leaves_the_database_alone() {
    let db = TestDb::new().await;
    let backend = open_url(
        &db.read_only_url(),
        PostgresOptions {
            migrate: false,
            pool_size_max: 2,
        },
    )
    .await
    .unwrap();
    let status = backend.schema_status().await.unwrap();
    assert_eq!((status.database, status.binary), (0, latest()));
    assert_eq!(status.pending.len(), latest() as usize);
    assert!(status.applied.is_empty());

    // Migrations one at a time, then the rest on open.
    testing::migrate_to(&db.url, 1).await.unwrap();
    let backend = open_url(
        &db.url,
        PostgresOptions {
            migrate: false,
            pool_size_max: 2,
        },
    )
    .await
    .unwrap();
    let status = backend.schema_status().await.unwrap();
    assert_eq!(status.database, 1);
    assert_eq!(status.pending.len(), latest() as usize - 1);
    let status = backend.migrate().await.unwrap();
    assert_eq!(status.database, latest());
    assert!(status.pending.is_empty());
    db.drop().await;
}

#[tokio::test]
async fn concurrent_migrators_agree() {
    let db = TestDb::new().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            open_url(&url, PostgresOptions::default()).await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let raw = db.raw().await;
    assert_eq!(schema_rows(&raw).await.len(), MIGRATIONS.len());
    db.drop().await;
}

#[tokio::test]
async fn unreachable_server_is_unavailable() {
    let err = open_url(
        "postgres://postgres@127.0.0.1:1/postgres",
        PostgresOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    let msg = testing::create_schema("postgres://postgres@127.0.0.1:1/postgres")
        .await
        .unwrap_err();
    assert!(
        msg.contains("PostgreSQL at postgres://postgres@127.0.0.1:1/postgres is unreachable (")
            && msg.contains("pg_ctlcluster --skip-systemctl-redirect")
            && msg.contains("FLEETDB_TEST_POSTGRES_URL"),
        "{msg}"
    );
    let err = open_url("mysql://x", PostgresOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
}

#[tokio::test]
async fn tag_set_commits_with_its_change() {
    let db = TestDb::new().await;
    let backend = db.open().await;
    let m = key("machine", "m1");
    let results = backend
        .commit(batch(vec![
            put(&m, &[("rack", "r1")]),
            tag_set(&m, "ip", "\"10.0.0.1\""),
        ]))
        .await
        .unwrap();
    assert_eq!(results.len(), 2);
    let Applied::Tag(tag) = &results[1].applied else {
        panic!("{results:?}")
    };
    assert!(results[1].changed);
    assert_eq!(tag.value, serde_json::json!("10.0.0.1"));
    let got = backend.tag_get(&m, "ip").await.unwrap().unwrap();
    assert_eq!(&got, tag);
    assert_eq!(backend.tag_list(&m).await.unwrap(), vec![got.clone()]);
    let obj = backend.object_get(&m).await.unwrap().unwrap();
    assert_eq!(obj.labels.get("rack").map(String::as_str), Some("r1"));

    let changes = backend
        .changes(Revision(0), &ChangeFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0].entity, Entity::Object);
    assert_eq!(
        changes[0].new_value,
        Some(serde_json::json!({"labels": {"rack": "r1"}}))
    );
    assert_eq!(changes[1].entity, Entity::Tag);
    assert_eq!(changes[1].op, ChangeOp::Put);
    assert_eq!(changes[1].name, "ip");
    assert_eq!(changes[1].revision, tag.revision);
    assert_eq!(changes[1].new_value, Some(serde_json::json!("10.0.0.1")));
    assert!(changes[0].revision < changes[1].revision);
    assert_eq!(backend.revision().await.unwrap().current, tag.revision);

    // Stored as specified: labels as a JSON object, the value as its canonical text.
    let raw = db.raw().await;
    let row = raw
        .query_one("SELECT labels FROM objects WHERE id = 'm1'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), r#"{"rack":"r1"}"#);
    let row = raw
        .query_one("SELECT value FROM tags WHERE name = 'ip'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "\"10.0.0.1\"");

    // Same value: no change, no revision.
    let again = backend
        .commit(batch(vec![tag_set(&m, "ip", "\"10.0.0.1\"")]))
        .await
        .unwrap();
    assert!(!again[0].changed);
    assert_eq!(backend.revision().await.unwrap().current, tag.revision);

    // A domain error rolls the whole batch back and is not retried.
    let err = backend
        .commit(batch(vec![
            tag_set(&m, "ip", "\"10.0.0.2\""),
            tag_set(&key("machine", "nope"), "ip", "1"),
        ]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(
        backend.tag_get(&m, "ip").await.unwrap().unwrap().value,
        serde_json::json!("10.0.0.1")
    );

    // Delete the object: its tags go first, each with a change.
    let results = backend
        .commit(batch(vec![Op::ObjectDelete { key: m.clone() }]))
        .await
        .unwrap();
    assert!(matches!(results[0].applied, Applied::Deleted { .. }));
    let changes = backend
        .changes(tag.revision, &ChangeFilter::default(), 100)
        .await
        .unwrap();
    let kinds: Vec<_> = changes.iter().map(|c| (c.entity, c.op)).collect();
    assert_eq!(
        kinds,
        vec![
            (Entity::Tag, ChangeOp::Delete),
            (Entity::Object, ChangeOp::Delete)
        ]
    );
    assert!(backend.tag_list(&m).await.unwrap().is_empty());
    db.drop().await;
}

#[tokio::test]
async fn concurrent_commits_all_succeed() {
    let db = TestDb::new().await;
    let backend = Arc::new(db.open().await);
    let m = key("machine", "shared");
    backend.commit(batch(vec![put(&m, &[])])).await.unwrap();

    const TASKS: usize = 8;
    const ROUNDS: usize = 10;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let backend = backend.clone();
        let m = m.clone();
        handles.push(tokio::spawn(async move {
            for r in 0..ROUNDS {
                // Blind writes to the same rows: serialization failures are retried inside.
                let writer = format!("w{t}-{r}");
                backend
                    .commit(batch(vec![
                        tag_set(&m, "last", &format!("\"{t}-{r}\"")),
                        tag_set(&m, &format!("t{t}"), &r.to_string()),
                        put(&m, &[("writer", writer.as_str())]),
                    ]))
                    .await
                    .unwrap();
                // A read-modify-write counter with a precondition: serializable, never loses an
                // increment. `Conflict` is the caller's to retry (re-read).
                loop {
                    let current = backend.tag_get(&m, "counter").await.unwrap();
                    let (n, revision) = match &current {
                        Some(tag) => (tag.value.as_i64().unwrap(), Some(tag.revision)),
                        None => (0, None),
                    };
                    let mut b = batch(vec![tag_set(&m, "counter", &(n + 1).to_string())]);
                    b.preconditions.push(Precondition::Tag {
                        key: m.clone(),
                        name: "counter".into(),
                        revision,
                    });
                    match backend.commit(b).await {
                        Ok(_) => break,
                        Err(Error::Conflict { .. }) => continue,
                        Err(e) => panic!("{e:?}"),
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let counter = backend.tag_get(&m, "counter").await.unwrap().unwrap();
    assert_eq!(counter.value, serde_json::json!(TASKS * ROUNDS));
    let changes = backend
        .changes(Revision(0), &ChangeFilter::default(), 10_000)
        .await
        .unwrap();
    // 1 object create + per round: 2 tag sets + 1 label update + 1 counter increment.
    assert_eq!(changes.len(), 1 + TASKS * ROUNDS * 4);
    for w in changes.windows(2) {
        assert!(w[0].revision < w[1].revision);
    }
    // Attempts that failed with a serialization failure and were retried took revisions that
    // were rolled back: gaps. (8 tasks writing the same rows conflict; if they never did, this
    // test would not exercise the retries.)
    let raw = db.raw().await;
    let last: i64 = raw
        .query_one("SELECT last_value FROM fleetdb_revision", &[])
        .await
        .unwrap()
        .get(0);
    let gaps = last - changes.len() as i64;
    eprintln!("{gaps} revisions taken by attempts that were retried");
    assert!(gaps > 0, "no attempt was retried");
    db.drop().await;
}

#[tokio::test]
async fn compaction() {
    let db = TestDb::new().await;
    let backend = db.open().await;
    let m = key("machine", "m1");
    backend.commit(batch(vec![put(&m, &[])])).await.unwrap();
    for i in 0..4 {
        backend
            .commit(batch(vec![tag_set(&m, "n", &i.to_string())]))
            .await
            .unwrap();
    }
    let all = backend
        .changes(Revision(0), &ChangeFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 5);
    let r: Vec<Revision> = all.iter().map(|c| c.revision).collect();

    // Drop the first two entries.
    assert_eq!(backend.compact(r[2]).await.unwrap(), 2);
    let info = backend.revision().await.unwrap();
    assert_eq!(info.compacted, Revision(r[2].0 - 1));
    assert_eq!(info.current, r[4]);
    let err = backend
        .changes(Revision(0), &ChangeFilter::default(), 100)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::Compacted {
            requested: Revision(0),
            compacted_revision: info.compacted
        }
    );
    let rest = backend
        .changes(info.compacted, &ChangeFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(rest, all[2..].to_vec());
    // Compacting to an older point never moves the compaction point back.
    assert_eq!(backend.compact(r[1]).await.unwrap(), 0);
    assert_eq!(backend.revision().await.unwrap().compacted, info.compacted);

    // Far in the future: everything goes, the point stops at the current revision.
    assert_eq!(backend.compact(Revision(1_000_000)).await.unwrap(), 3);
    let info = backend.revision().await.unwrap();
    assert_eq!((info.current, info.compacted), (r[4], r[4]));
    assert!(backend
        .changes(r[4], &ChangeFilter::default(), 100)
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        backend
            .changes(Revision(r[4].0 - 1), &ChangeFilter::default(), 100)
            .await,
        Err(Error::Compacted { .. })
    ));

    // New writes continue after the compacted revision.
    let res = backend
        .commit(batch(vec![tag_set(&m, "n", "99")]))
        .await
        .unwrap();
    let Applied::Tag(tag) = &res[0].applied else {
        panic!()
    };
    assert!(tag.revision > r[4]);
    assert_eq!(backend.revision().await.unwrap().current, tag.revision);
    db.drop().await;
}

#[tokio::test]
async fn change_filters_escape_like_patterns() {
    let db = TestDb::new().await;
    let backend = db.open().await;
    let ids = ["a_1", "ab1", "a-1", "b_1"];
    for id in ids {
        backend
            .commit(batch(vec![put(&key("machine", id), &[])]))
            .await
            .unwrap();
    }
    backend
        .commit(batch(vec![put(&key("switch", "a_1"), &[])]))
        .await
        .unwrap();
    let filter = |kind: Option<&str>, prefix: Option<&str>| ChangeFilter {
        namespace: Some("default".into()),
        kind: kind.map(String::from),
        id_prefix: prefix.map(String::from),
    };
    let ids_of = |changes: Vec<fleetdb_core::Change>| -> Vec<String> {
        changes.into_iter().map(|c| c.id).collect()
    };
    let got = backend
        .changes(Revision(0), &filter(Some("machine"), Some("a_")), 100)
        .await
        .unwrap();
    assert_eq!(ids_of(got), vec!["a_1"]);
    let got = backend
        .changes(Revision(0), &filter(Some("machine"), Some("a")), 100)
        .await
        .unwrap();
    assert_eq!(ids_of(got), vec!["a_1", "ab1", "a-1"]);
    let got = backend
        .changes(Revision(0), &filter(None, None), 100)
        .await
        .unwrap();
    assert_eq!(got.len(), 5);
    let got = backend
        .changes(Revision(0), &filter(Some("switch"), None), 100)
        .await
        .unwrap();
    assert_eq!(ids_of(got), vec!["a_1"]);
    let other_ns = ChangeFilter {
        namespace: Some("other".into()),
        ..ChangeFilter::default()
    };
    assert!(backend
        .changes(Revision(0), &other_ns, 100)
        .await
        .unwrap()
        .is_empty());
    // Limit.
    let got = backend
        .changes(Revision(0), &ChangeFilter::default(), 2)
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    db.drop().await;
}

#[tokio::test]
async fn object_list_label_filters_and_bytewise_order() {
    let db = TestDb::new().await;
    let backend = db.open().await;
    // Bytewise order regardless of the database's collation: "B" < "a" < "a-b" < "a.b" < "a_b" < "ab".
    type Spec<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
    let objects: Vec<Spec> = vec![
        ("machine", "ab", vec![("env", "prod"), ("rack", "r1")]),
        ("machine", "a_b", vec![("env", "dev")]),
        ("machine", "B", vec![("env", "prod"), ("gpu", "yes")]),
        ("machine", "a.b", vec![]),
        ("machine", "a-b", vec![("rack", "r2")]),
        ("machine", "a", vec![("env", "prod"), ("rack", "r2")]),
        ("switch", "s1", vec![("env", "prod")]),
    ];
    let mut ops = Vec::new();
    for (kind, id, labels) in &objects {
        ops.push(put(&key(kind, id), labels));
    }
    backend.commit(batch(ops)).await.unwrap();

    let all = backend
        .object_list(&ObjectQuery::new("default"))
        .await
        .unwrap();
    let order: Vec<_> = all
        .iter()
        .map(|o| format!("{}/{}", o.key.kind, o.key.id))
        .collect();
    assert_eq!(
        order,
        vec![
            "machine/B",
            "machine/a",
            "machine/a-b",
            "machine/a.b",
            "machine/a_b",
            "machine/ab",
            "switch/s1"
        ]
    );

    let eq = |k: &str, v: &str| LabelRequirement::Eq {
        key: k.into(),
        value: v.into(),
    };
    let neq = |k: &str, v: &str| LabelRequirement::NotEq {
        key: k.into(),
        value: v.into(),
    };
    let exists = |k: &str| LabelRequirement::Exists { key: k.into() };
    let absent = |k: &str| LabelRequirement::NotExists { key: k.into() };
    let selectors: Vec<(Option<&str>, Vec<LabelRequirement>)> = vec![
        (None, vec![eq("env", "prod")]),
        (None, vec![neq("env", "prod")]),
        (None, vec![exists("rack")]),
        (None, vec![absent("rack")]),
        (Some("machine"), vec![eq("env", "prod"), exists("rack")]),
        (
            Some("machine"),
            vec![absent("gpu"), neq("rack", "r1"), eq("env", "prod")],
        ),
        (None, vec![eq("env", "nope")]),
        (Some("switch"), vec![eq("env", "prod"), absent("rack")]),
        (
            None,
            (0..12).map(|i| absent(&format!("k{i}"))).collect(), // uncached statement shape
        ),
    ];
    for (kind, reqs) in selectors {
        let mut q = ObjectQuery::new("default");
        q.kind = kind.map(String::from);
        q.labels = reqs.clone();
        let got: Vec<ObjectKey> = backend
            .object_list(&q)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        let want: Vec<ObjectKey> = all
            .iter()
            .filter(|o| kind.is_none_or(|k| o.key.kind == k))
            .filter(|o| reqs.iter().all(|r| r.matches(&o.labels)))
            .map(|o| o.key.clone())
            .collect();
        assert_eq!(got, want, "kind {kind:?}, {reqs:?}");
    }

    // Cursor pagination, two at a time, across kinds.
    let mut seen = Vec::new();
    let mut q = ObjectQuery::new("default").limit(2);
    loop {
        let page = backend.object_list(&q).await.unwrap();
        if page.is_empty() {
            break;
        }
        let last = page.last().unwrap();
        q.after = Some(ObjectCursor {
            kind: last.key.kind.clone(),
            id: last.key.id.clone(),
        });
        seen.extend(page.into_iter().map(|o| o.key));
    }
    assert_eq!(seen, all.iter().map(|o| o.key.clone()).collect::<Vec<_>>());

    // Namespaces are listed bytewise too.
    let mut ops = Vec::new();
    for name in ["Zeta", "alpha", "beta"] {
        ops.push(Op::NamespaceCreate {
            name: name.into(),
            labels: BTreeMap::new(),
        });
    }
    backend.commit(batch(ops)).await.unwrap();
    let names: Vec<String> = backend
        .namespace_list(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, vec!["Zeta", "alpha", "beta", "default"]);
    let names: Vec<String> = backend
        .namespace_list(Some("alpha"), 2)
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, vec!["beta", "default"]);
    db.drop().await;
}

#[tokio::test]
async fn namespace_lifecycle_and_usage() {
    let db = TestDb::new().await;
    let backend = db.open().await;
    let create = Op::NamespaceCreate {
        name: "team".into(),
        labels: [("owner".to_string(), "me".to_string())].into(),
    };
    let res = backend.commit(batch(vec![create.clone()])).await.unwrap();
    let Applied::Namespace(ns) = &res[0].applied else {
        panic!()
    };
    assert_eq!(
        backend.namespace_get("team").await.unwrap().as_ref(),
        Some(ns)
    );
    let err = backend.commit(batch(vec![create])).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");

    let k = ObjectKey::new("team", "machine", "m1").unwrap();
    backend.commit(batch(vec![put(&k, &[])])).await.unwrap();
    let err = backend
        .commit(batch(vec![Op::NamespaceDelete {
            name: "team".into(),
        }]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NamespaceNotEmpty { remaining, .. } if remaining.contains("1 machine")),
        "{err:?}"
    );
    backend
        .commit(batch(vec![
            Op::ObjectDelete { key: k.clone() },
            Op::NamespaceDelete {
                name: "team".into(),
            },
        ]))
        .await
        .unwrap();
    assert_eq!(backend.namespace_get("team").await.unwrap(), None);
    db.drop().await;
}

/// A TCP proxy adding `delay` to everything the server sends (without accumulating delays across
/// chunks), so each round trip costs at least `delay`.
async fn delaying_proxy(target: String, delay: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let target = target.clone();
            tokio::spawn(async move {
                let server = tokio::net::TcpStream::connect(target).await.unwrap();
                server.set_nodelay(true).unwrap();
                client.set_nodelay(true).unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                tokio::spawn(async move {
                    while let Some((at, chunk)) = rx.recv().await {
                        tokio::time::sleep_until((at + delay).into()).await;
                        if cw.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_tag_set_costs_one_round_trip() {
    let db = TestDb::new().await;
    let config = tokio_postgres::Config::from_str(&db.url).unwrap();
    let (host, port) = match (config.get_hosts().first(), config.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(h)), Some(p)) => (h.clone(), *p),
        _ => {
            eprintln!("skipping: the test server is not reached over TCP");
            return db.drop().await;
        }
    };
    let host_port = format!("{host}:{port}");
    if !db.url.contains(&host_port) {
        eprintln!("skipping: cannot rewrite {host_port} in the test URL");
        return db.drop().await;
    }
    db.open().await; // migrate directly
    const DELAY: Duration = Duration::from_millis(40);
    let proxy = delaying_proxy(host_port.clone(), DELAY).await;
    let url = db.url.replace(&host_port, &proxy.to_string());
    let backend = open_url(
        &url,
        PostgresOptions {
            migrate: true,
            pool_size_max: 1,
        },
    )
    .await
    .unwrap();
    let m = key("machine", "m1");
    backend.commit(batch(vec![put(&m, &[])])).await.unwrap();
    // Warm the statement cache of the single connection.
    backend
        .commit(batch(vec![tag_set(&m, "t", "0")]))
        .await
        .unwrap();
    let mut best = Duration::MAX;
    for i in 1..=4 {
        let start = Instant::now();
        backend
            .commit(batch(vec![tag_set(&m, "t", &i.to_string())]))
            .await
            .unwrap();
        best = best.min(start.elapsed());
    }
    eprintln!("one tag set through a {DELAY:?} proxy: {best:?}");
    // A lone tag set pipelines BEGIN, one statement and COMMIT: 1 round trip (2 would be >= 80 ms).
    assert!(best >= DELAY, "{best:?}");
    assert!(best < DELAY * 2, "{best:?}: more than 1 round trip");
    // Tag sets in bulk are one round trip too (one statement for all of them), once prepared.
    let mut best = Duration::MAX;
    for i in 10..13 {
        let start = Instant::now();
        backend
            .commit(batch(vec![
                tag_set(&m, "t", &i.to_string()),
                tag_set(&m, "u", &i.to_string()),
            ]))
            .await
            .unwrap();
        best = best.min(start.elapsed());
    }
    assert!(best < DELAY * 2, "{best:?}");
    // A batch of another shape still takes the general path (BEGIN + read pipelined, ...).
    let start = Instant::now();
    backend
        .commit(batch(vec![tag_set(&m, "t", "11"), put(&m, &[("a", "b")])]))
        .await
        .unwrap();
    assert!(start.elapsed() >= DELAY * 3, "{:?}", start.elapsed());
    db.drop().await;
}

// ---- sessions and work ----

const NOW: Timestamp = Timestamp(1_700_000_000_000_000);

fn session(id: &str, ttl_ms: i64) -> fleetdb_core::work::SessionInfo {
    fleetdb_core::work::SessionInfo {
        id: id.to_string(),
        component: "worker".into(),
        host: "host-1".into(),
        runtime_info: String::new(),
        ttl_ms,
        created_at: NOW,
        deadline: Timestamp(NOW.0 + ttl_ms * 1000),
    }
}

/// A declared process `P`, a session per id (TTL 10 s) and `n` machines `m000`…
async fn work_setup(backend: &PostgresBackend, sessions: &[&str], n: usize) -> Vec<ObjectKey> {
    let mut ops = vec![Op::ProcessDefine {
        name: "P".into(),
        conflicts: Vec::new(),
    }];
    for id in sessions {
        ops.push(Op::SessionStart {
            session: session(id, 10_000),
        });
    }
    let keys: Vec<ObjectKey> = (0..n)
        .map(|i| key("machine", &format!("m{i:03}")))
        .collect();
    ops.extend(keys.iter().map(|k| put(k, &[])));
    backend.commit(batch(ops)).await.unwrap();
    keys
}

fn claim_request(
    session_id: &str,
    target: fleetdb_core::work::ClaimTarget,
    limit: usize,
) -> fleetdb_core::work::ClaimRequest {
    fleetdb_core::work::ClaimRequest {
        session_id: session_id.into(),
        process: "P".into(),
        target,
        limit,
        now: NOW,
    }
}

fn by_selector(session_id: &str, selector: &str, limit: usize) -> fleetdb_core::work::ClaimRequest {
    claim_request(
        session_id,
        fleetdb_core::work::ClaimTarget::Selector(selector.into()),
        limit,
    )
}

/// A claim that comes back short says the change log's revision it looked at (`claim_wait`
/// waits for a later one without reading it); a full one does not.
#[tokio::test]
async fn a_short_claim_says_the_revision_it_looked_at() {
    let db = TestDb::new().await;
    let backend = db.open().await;
    work_setup(&backend, &["s1"], 3).await;
    let full = backend
        .claim(by_selector("s1", "kind = machine", 2))
        .await
        .unwrap();
    assert_eq!((full.work.len(), full.revision), (2, None));
    let current = backend.revision().await.unwrap().current;
    let short = backend
        .claim(by_selector("s1", "kind = machine", 2))
        .await
        .unwrap();
    assert_eq!((short.work.len(), short.revision), (1, Some(current)));
    let empty = backend
        .claim(by_selector("s1", "kind = machine", 2))
        .await
        .unwrap();
    assert_eq!((empty.work.len(), empty.revision), (0, Some(current)));
    db.drop().await;
}

#[tokio::test]
async fn racing_claims_of_one_object_give_one_winner_and_conflicts() {
    let db = TestDb::new().await;
    let backend = Arc::new(db.open().await);
    let ids: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let keys = work_setup(&backend, &refs, 1).await;
    let mut tasks = Vec::new();
    for id in ids.clone() {
        let backend = backend.clone();
        let k = keys[0].clone();
        tasks.push(tokio::spawn(async move {
            let target = fleetdb_core::work::ClaimTarget::Object(k);
            backend.claim(claim_request(&id, target, 1)).await
        }));
    }
    let mut winners = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(w) => {
                assert_eq!(w.work.len(), 1);
                winners += 1;
            }
            // The losers see the winner's claim (after a retry if they raced it): never a
            // unique violation, never retries exhausted.
            Err(Error::Conflict { .. }) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(
        backend
            .work_list(&fleetdb_core::work::WorkListing::new(None, 10))
            .await
            .unwrap()
            .len(),
        1
    );
    db.drop().await;
}

#[tokio::test]
async fn racing_selector_claims_split_the_objects() {
    let db = TestDb::new().await;
    let backend = Arc::new(db.open().await);
    let ids: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    work_setup(&backend, &refs, 30).await;
    let mut tasks = Vec::new();
    for id in ids.clone() {
        let backend = backend.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let w = backend
                    .claim(by_selector(&id, "kind = machine", 2))
                    .await
                    .unwrap();
                if w.work.is_empty() {
                    return got;
                }
                got.extend(w.work.into_iter().map(|w| (w.key, w.token)));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let keys: std::collections::BTreeSet<_> = all.iter().map(|(k, _)| k.clone()).collect();
    let tokens: std::collections::BTreeSet<_> = all.iter().map(|(_, t)| *t).collect();
    assert_eq!((all.len(), keys.len(), tokens.len()), (30, 30, 30));
    db.drop().await;
}

#[tokio::test]
async fn session_renew_is_one_statement_for_live_sessions_only() {
    let db = TestDb::new().await;
    let backend = db.open().await;
    let mut ops = vec![
        Op::SessionStart {
            session: session("alive", 10_000),
        },
        Op::SessionStart {
            session: session("short", 1_000),
        },
    ];
    ops.push(Op::SessionStart {
        session: session("other", 30_000),
    });
    backend.commit(batch(ops)).await.unwrap();
    let later = Timestamp(NOW.0 + 5_000_000); // "short" died at NOW + 1 s
    let ids: Vec<String> = ["alive", "short", "unknown"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut renewed = backend.session_renew(&ids, later).await.unwrap();
    renewed.sort();
    assert_eq!(
        renewed,
        vec![("alive".to_string(), Timestamp(later.0 + 10_000_000))]
    );
    assert_eq!(
        backend
            .session_get("alive")
            .await
            .unwrap()
            .unwrap()
            .deadline,
        Timestamp(later.0 + 10_000_000)
    );
    // Not listed: untouched. Expired: not revived.
    assert_eq!(
        backend
            .session_get("other")
            .await
            .unwrap()
            .unwrap()
            .deadline,
        Timestamp(NOW.0 + 30_000_000)
    );
    assert_eq!(
        backend
            .session_get("short")
            .await
            .unwrap()
            .unwrap()
            .deadline,
        Timestamp(NOW.0 + 1_000_000)
    );
    assert!(backend.session_renew(&[], later).await.unwrap().is_empty());
    // The sweep removes only the expired one.
    assert_eq!(backend.session_sweep(later, 100).await.unwrap().sessions, 1);
    let left: Vec<String> = backend
        .session_list(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(left, vec!["alive", "other"]);
    db.drop().await;
}

/// Session and work writes are deferred and pipelined; one that fails must fail the whole
/// transaction, commit nothing, and be retried when it is transient.
#[tokio::test]
async fn a_failing_deferred_write_commits_nothing_and_transient_ones_are_retried() {
    let db = TestDb::new().await;
    let backend = db.open().await;
    let keys = work_setup(&backend, &["s1"], 3).await;
    let target = fleetdb_core::work::ClaimTarget::Object(keys[0].clone());
    backend.claim(claim_request("s1", target, 1)).await.unwrap();
    let raw = db.raw().await;
    raw.batch_execute(
        "CREATE SEQUENCE refusals;
         CREATE TABLE refuse (mode TEXT NOT NULL);
         CREATE FUNCTION refuse_history() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF EXISTS (SELECT 1 FROM refuse WHERE mode = 'always') THEN
             RAISE EXCEPTION 'history refused';
           END IF;
           IF EXISTS (SELECT 1 FROM refuse WHERE mode = 'twice') AND nextval('refusals') <= 2 THEN
             RAISE EXCEPTION 'injected conflict' USING ERRCODE = 'serialization_failure';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_history BEFORE INSERT ON work_history
           FOR EACH ROW EXECUTE FUNCTION refuse_history();
         INSERT INTO refuse VALUES ('always');",
    )
    .await
    .unwrap();
    let err = backend
        .claim(by_selector("s1", "kind = machine", 2))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Backend(m) if m.contains("history refused")),
        "{err:?}"
    );
    assert_eq!(
        backend
            .work_list(&fleetdb_core::work::WorkListing::new(None, 10))
            .await
            .unwrap()
            .len(),
        1
    );
    // Closing the session writes a Canceled row for its claim: refused, nothing changes.
    let close = batch(vec![Op::SessionClose { id: "s1".into() }]);
    let err = backend.commit(close).await.unwrap_err();
    assert!(
        matches!(&err, Error::Backend(m) if m.contains("history refused")),
        "{err:?}"
    );
    assert!(backend.session_get("s1").await.unwrap().is_some());
    assert_eq!(
        backend
            .work_list(&fleetdb_core::work::WorkListing::new(None, 10))
            .await
            .unwrap()
            .len(),
        1
    );

    // Transient: two serialization failures, then it goes through, exactly once.
    raw.batch_execute("UPDATE refuse SET mode = 'twice'")
        .await
        .unwrap();
    let retries = backend.retries();
    let got = backend
        .claim(by_selector("s1", "kind = machine", 2))
        .await
        .unwrap();
    assert_eq!(got.work.len(), 2);
    // Each attempt run again is counted (the store adds them to transactions_retried).
    assert_eq!(backend.retries() - retries, 2);
    let refusals: i64 = raw
        .query_one("SELECT last_value FROM refusals", &[])
        .await
        .unwrap()
        .get(0);
    assert!(refusals >= 3, "{refusals}");
    let history: i64 = raw
        .query_one("SELECT count(*) FROM work_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, 3);
    assert_eq!(
        backend
            .work_list(&fleetdb_core::work::WorkListing::new(None, 10))
            .await
            .unwrap()
            .len(),
        3
    );
    db.drop().await;
}

#[tokio::test]
async fn a_selector_claim_costs_one_round_trip_whatever_it_takes() {
    let db = TestDb::new().await;
    let config = tokio_postgres::Config::from_str(&db.url).unwrap();
    let (host, port) = match (config.get_hosts().first(), config.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(h)), Some(p)) => (h.clone(), *p),
        _ => {
            eprintln!("skipping: the test server is not reached over TCP");
            return db.drop().await;
        }
    };
    let host_port = format!("{host}:{port}");
    if !db.url.contains(&host_port) {
        eprintln!("skipping: cannot rewrite {host_port} in the test URL");
        return db.drop().await;
    }
    work_setup(&db.open().await, &["s1"], 40).await;
    // Longer than the tag set test's: ten round trips leave more room for CPU time.
    const DELAY: Duration = Duration::from_millis(80);
    let proxy = delaying_proxy(host_port.clone(), DELAY).await;
    let url = db.url.replace(&host_port, &proxy.to_string());
    let backend = open_url(
        &url,
        PostgresOptions {
            migrate: true,
            pool_size_max: 1,
        },
    )
    .await
    .unwrap();
    // Warm the statement cache of the single connection.
    let selector = "kind = machine and not has(done)";
    backend.claim(by_selector("s1", selector, 2)).await.unwrap();
    for (objects, round_trips) in [(1u32, 1u32), (3, 1)] {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let start = Instant::now();
            let got = backend
                .claim(by_selector("s1", selector, objects as usize))
                .await
                .unwrap();
            best = best.min(start.elapsed());
            assert_eq!(got.work.len(), objects as usize);
        }
        eprintln!("a claim of {objects} through a {DELAY:?} proxy: {best:?}");
        // BEGIN, find-and-lock (session check, exclusions and candidates in one statement),
        // check-and-take (re-check under the lock, stale claims, tokens, work and history rows
        // in one statement, reading the candidates find-and-lock left in a transaction setting)
        // and COMMIT, pipelined. Formerly seven round trips (the session, the processes,
        // find-and-lock, the re-check, the stale claims, the tokens, COMMIT), then two.
        assert!(best >= DELAY * round_trips, "{best:?}");
        assert!(
            best < DELAY * (round_trips + 1),
            "{best:?}: more than {round_trips} round trips"
        );
    }
    db.drop().await;
}

// ---- watches: gap filling and cross-process wake-ups ----

/// Commit an object put and return its revision.
async fn put_rev(backend: &PostgresBackend, id: &str) -> Revision {
    let res = backend
        .commit(batch(vec![put(&key("machine", id), &[])]))
        .await
        .unwrap();
    let Applied::Object(obj) = &res[0].applied else {
        panic!("{res:?}")
    };
    obj.revision
}

/// A hand-made writer: takes the next revision and inserts its change row in a transaction it
/// leaves open.
async fn in_flight_change(client: &tokio_postgres::Client, id: &str) -> Revision {
    client.batch_execute("BEGIN").await.unwrap();
    let row = client
        .query_one(
            "INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, \
             new_value, at) VALUES (nextval('fleetdb_revision'), 'default', 'machine', $1, \
             'object', '', 'put', NULL, '{}', 1) RETURNING revision",
            &[&id],
        )
        .await
        .unwrap();
    Revision(row.get(0))
}

async fn change_revisions(backend: &PostgresBackend, after: Revision) -> Vec<Revision> {
    backend
        .changes(after, &ChangeFilter::default(), 1000)
        .await
        .unwrap()
        .iter()
        .map(|c| c.revision)
        .collect()
}

async fn gap_markers(client: &tokio_postgres::Client) -> Vec<i64> {
    client
        .query(
            "SELECT revision FROM changes WHERE op = 'gap' ORDER BY revision",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The settled revision never passes a revision whose transaction is still running; it moves on
/// once that transaction commits (its row is then read) or rolls back (a gap marker fills the
/// hole, and is never returned).
#[tokio::test]
async fn settled_revision_waits_for_in_flight_revisions() {
    let db = TestDb::new().await;
    let backend = db.open().await;
    let hand = db.raw().await;
    let wait = Duration::from_millis(300);

    let r1 = put_rev(&backend, "a").await;
    assert_eq!(backend.settled_revision(wait).await.unwrap(), r1);

    // Commit case.
    let g = in_flight_change(&hand, "inflight").await;
    let r2 = put_rev(&backend, "b").await;
    assert!(g < r2 && r1 < g);
    let start = Instant::now();
    let settled = backend.settled_revision(wait).await.unwrap();
    assert_eq!(
        settled,
        Revision(g.0 - 1),
        "must stop below the in-flight revision"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "waited for it"
    );
    // Visible now, but not deliverable yet: a watcher reads only up to the settled revision.
    assert_eq!(change_revisions(&backend, r1).await, vec![r2]);
    hand.batch_execute("COMMIT").await.unwrap();
    assert_eq!(backend.settled_revision(wait).await.unwrap(), r2);
    assert_eq!(change_revisions(&backend, r1).await, vec![g, r2]);
    let changes = backend
        .changes(r1, &ChangeFilter::default(), 10)
        .await
        .unwrap();
    assert_eq!(changes[0].id, "inflight");

    // Abort case.
    let g2 = in_flight_change(&hand, "aborted").await;
    let r3 = put_rev(&backend, "c").await;
    assert_eq!(
        backend.settled_revision(wait).await.unwrap(),
        Revision(g2.0 - 1)
    );
    hand.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(backend.settled_revision(wait).await.unwrap(), r3);
    assert_eq!(change_revisions(&backend, r2).await, vec![r3]);
    assert_eq!(gap_markers(&hand).await, vec![g2.0]);
    assert_eq!(backend.revision().await.unwrap().current, r3);

    // A transaction that commits while the settler waits: it waits for it, then passes it.
    let g3 = in_flight_change(&hand, "late").await;
    let r4 = put_rev(&backend, "d").await;
    let committer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        hand.batch_execute("COMMIT").await.unwrap();
        hand
    });
    let start = Instant::now();
    assert_eq!(
        backend
            .settled_revision(Duration::from_secs(10))
            .await
            .unwrap(),
        r4
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    let hand = committer.await.unwrap();
    assert_eq!(change_revisions(&backend, r3).await, vec![g3, r4]);
    assert_eq!(
        gap_markers(&hand).await,
        vec![g2.0],
        "no marker for a committed row"
    );

    // Compaction removes markers like other rows.
    backend.compact(Revision(r4.0 + 1)).await.unwrap();
    assert!(gap_markers(&hand).await.is_empty());
    assert_eq!(backend.settled_revision(wait).await.unwrap(), r4);

    // ... and never passes a revision still in flight.
    let g4 = in_flight_change(&hand, "compacted").await;
    let r5 = put_rev(&backend, "e").await;
    backend.compact(Revision(r5.0 + 1)).await.unwrap();
    assert_eq!(
        backend.revision().await.unwrap().compacted,
        Revision(g4.0 - 1)
    );
    hand.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        change_revisions(&backend, Revision(g4.0 - 1)).await,
        vec![g4, r5]
    );
    db.drop().await;
}

/// A writer that took a revision but inserts its change row only after a gap marker filled that
/// revision fails on the change log's key, which the backend retries (with a new revision); a
/// second backend (another process) agrees on the settled revision.
#[tokio::test]
async fn a_late_change_row_loses_to_the_gap_marker() {
    let db = TestDb::new().await;
    let backend = db.open().await;
    let other = db.open().await;
    let hand = db.raw().await;
    put_rev(&backend, "a").await;
    let g: i64 = hand
        .query_one("SELECT nextval('fleetdb_revision')", &[])
        .await
        .unwrap()
        .get(0);
    let r = put_rev(&backend, "b").await;
    assert_eq!(
        other
            .settled_revision(Duration::from_millis(100))
            .await
            .unwrap(),
        r
    );
    assert_eq!(gap_markers(&hand).await, vec![g]);
    let err = hand
        .execute(
            "INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, \
             new_value, at) VALUES ($1, 'default', 'machine', 'late', 'object', '', 'put', \
             NULL, '{}', 1)",
            &[&g],
        )
        .await
        .unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.constraint(), Some("changes_pkey"));
    assert_eq!(
        backend
            .settled_revision(Duration::from_millis(100))
            .await
            .unwrap(),
        r
    );
    // Writes keep working after markers (a fused tag set and a batch).
    let m = key("machine", "a");
    backend
        .commit(batch(vec![tag_set(&m, "t", "1")]))
        .await
        .unwrap();
    let r2 = put_rev(&backend, "c").await;
    assert_eq!(
        other
            .settled_revision(Duration::from_millis(100))
            .await
            .unwrap(),
        r2
    );
    db.drop().await;
}

/// Connections whose last statement was a LISTEN on `db`'s channel.
async fn listening_connections(db: &TestDb) -> i64 {
    db.raw()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN fleetdb\\_changes\\_%' \
             AND query LIKE '%' || $1::text",
            &[&db.schema],
        )
        .await
        .unwrap()
        .get(0)
}

/// `announce_changes` wakes listeners on the same schema (in other processes: other backends), and
/// only those.
#[tokio::test]
async fn announcements_wake_listeners_of_the_same_schema_only() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let db = TestDb::new().await;
    let elsewhere = TestDb::new().await;
    let listener = db.open().await;
    let announcer = db.open().await;
    let stranger = elsewhere.open().await;

    let wakes = Arc::new(AtomicUsize::new(0));
    let notified = Arc::new(tokio::sync::Notify::new());
    let (w, n) = (wakes.clone(), notified.clone());
    let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        w.fetch_add(1, Ordering::SeqCst);
        n.notify_one();
    });
    assert!(listener.listen_changes(wake).await.unwrap());

    stranger.announce_changes().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        wakes.load(Ordering::SeqCst),
        0,
        "another schema's announcement"
    );

    announcer.announce_changes().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), notified.notified())
        .await
        .expect("woken");
    assert!(wakes.load(Ordering::SeqCst) >= 1);

    // The listening task ends with the backend: its connection goes away.
    assert_eq!(listening_connections(&db).await, 1);

    // A dropped connection is replaced, with a wake-up (announcements may have been missed).
    let before = wakes.load(Ordering::SeqCst);
    db.raw()
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query LIKE 'LISTEN fleetdb\\_changes\\_%' AND query LIKE '%' || $1::text",
            &[&db.schema],
        )
        .await
        .unwrap();
    let start = Instant::now();
    while wakes.load(Ordering::SeqCst) == before {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no wake-up after reconnecting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = wakes.load(Ordering::SeqCst);
    announcer.announce_changes().await.unwrap();
    let start = Instant::now();
    while wakes.load(Ordering::SeqCst) == before {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not listening after reconnecting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(listening_connections(&db).await, 1);

    drop(listener);
    let start = Instant::now();
    while listening_connections(&db).await != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "listener still connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((announcer, stranger));
    elsewhere.drop().await;
    db.drop().await;
}

/// Commits a server crash may undo are named at open: `synchronous_commit = off` for this
/// store's connections (set here by a connection option, as a role's or a database's setting
/// would), and not a durable level.
#[tokio::test]
async fn settings_under_which_a_crash_undoes_commits_are_named() {
    let db = TestDb::new().await;
    let open = |url: String| async move {
        PostgresBackend::open(
            &url,
            PostgresOptions::default(),
            Arc::new(fleetdb_core::SystemClock),
        )
        .await
        .unwrap()
    };
    let off = open(db.synchronous_commit_url("off")).await;
    let warned = off.durability_warnings();
    assert!(
        warned
            .iter()
            .any(|w| w.contains("synchronous_commit = off")),
        "{warned:?}"
    );
    for level in ["on", "local", "remote_write"] {
        let backend = open(db.synchronous_commit_url(level)).await;
        let warned = backend.durability_warnings();
        assert!(
            !warned.iter().any(|w| w.contains("synchronous_commit")),
            "{level}: {warned:?}"
        );
    }
    db.drop().await;
}
