//! Callers that give up: a future of the library dropped at one of its await points (a
//! `tokio::time::timeout`, a `select!`, an aborted task). The contract (docs/design.md,
//! "Cancellation"): the operation either happened or did not, the store stays fully usable, and
//! nothing is held for longer than its session. These tests drop calls while PostgreSQL keeps
//! them waiting on a lock another connection holds, then use the same store again.

use std::sync::Arc;
use std::time::Duration;

use fleetdb::{Labels, ManualClock, ObjectKey, OpenOptions, Store};
use fleetdb_postgres::testing;
use serde_json::json;

/// How long a test lets a call run before giving up on it (it is stuck on a lock meanwhile).
const GIVE_UP: Duration = Duration::from_millis(300);
/// How long a call that should not wait at all is given before the test says it waited.
const PROMPT: Duration = Duration::from_secs(3);

fn options() -> OpenOptions {
    OpenOptions {
        clock: Some(Arc::new(ManualClock::new(fleetdb::Timestamp(
            1_700_000_000_000_000,
        )))),
        background: false,
        ..OpenOptions::default()
    }
}

/// A connection of the test's own to `url` (the store's schema on its search path).
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A lone tag set given up while it waits for a row lock must not leave its pooled connection
/// busy with it: the next call of the same store (handed the same connection first, the pool
/// being last in, first out) answered only once the other transaction let the lock go —
/// a read, a renewal, anything, held up by a write its caller had abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_write_given_up_on_a_lock_does_not_hold_up_the_next_call() {
    let base = testing::test_url();
    let (url, schema) = testing::create_schema(&base).await.unwrap();
    let store = Store::open_with(&url, options()).await.unwrap();
    let k = ObjectKey::new("default", "machine", "m1").unwrap();
    store.object_put(&k, Labels::new()).await.unwrap();
    store.tag_set(&k, "state", &json!(1)).await.unwrap();

    let holder = raw(&url).await;
    holder
        .batch_execute("BEGIN; SELECT 1 FROM tags WHERE id = 'm1' FOR UPDATE")
        .await
        .unwrap();
    let gave_up = tokio::time::timeout(GIVE_UP, store.tag_set(&k, "state", &json!(2))).await;
    assert!(gave_up.is_err(), "the set waits for the lock");

    // The lock is still held: calls that do not need it answer at once.
    let read = tokio::time::timeout(PROMPT, store.object_get(&k)).await;
    assert!(
        matches!(read, Ok(Ok(Some(_)))),
        "a read after a given-up write answers without waiting for the write's lock: {read:?}"
    );
    let other = ObjectKey::new("default", "machine", "m2").unwrap();
    let write = tokio::time::timeout(PROMPT, store.object_put(&other, Labels::new())).await;
    assert!(
        matches!(write, Ok(Ok(_))),
        "a write of another object answers at once: {write:?}"
    );

    holder.batch_execute("ROLLBACK").await.unwrap();
    // The given-up set either happened or did not, consistently with the change log; the store
    // writes the tag again as usual.
    let tag = store.tag_get(&k, "state").await.unwrap().unwrap();
    assert!(tag.value == json!(1) || tag.value == json!(2), "{tag:?}");
    store.tag_set(&k, "state", &json!(3)).await.unwrap();
    let tag = store.tag_get(&k, "state").await.unwrap().unwrap();
    assert_eq!(tag.value, json!(3));
    drop(store);
    drop(holder);
    testing::drop_schema(&base, &schema).await.unwrap();
}

/// A migration given up while it waits (here for another migrator of the same version, whose
/// row holds the primary key) must not hand its connection back to the pool inside its
/// transaction: the next call on that connection ran inside it — the next `migrate` saw the
/// abandoned transaction's own schema row and answered "up to date" without committing
/// anything, so the database stayed a version behind what the store had been told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_given_up_on_a_lock_leaves_no_transaction_in_the_pool() {
    let base = testing::test_url();
    let (url, schema) = testing::create_schema(&base).await.unwrap();
    let last = fleetdb_postgres::MIGRATIONS.last().unwrap().version;
    testing::migrate_to(&url, last - 1).await.unwrap();
    let store = Store::open_with(
        &url,
        OpenOptions {
            migrate: false,
            ..options()
        },
    )
    .await
    .unwrap();
    let holder = raw(&url).await;
    holder
        .batch_execute(&format!(
            "BEGIN; INSERT INTO fleetdb_schema (version, name, applied_at) \
             VALUES ({last}, 'another migrator', 0)"
        ))
        .await
        .unwrap();
    let gave_up = tokio::time::timeout(GIVE_UP, store.migrate()).await;
    assert!(gave_up.is_err(), "the migration waits for the other one");
    // The other migrator fails and rolls back: the version is still to be applied.
    holder.batch_execute("ROLLBACK").await.unwrap();

    let status = tokio::time::timeout(PROMPT, store.migrate())
        .await
        .expect("a migration after a given-up one answers")
        .unwrap();
    assert!(status.pending.is_empty(), "{status:?}");
    // What the store was told is what the database holds, seen from another connection.
    let fresh = raw(&url).await;
    let applied: i32 = fresh
        .query_one("SELECT max(version) FROM fleetdb_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        applied,
        i32::try_from(last).unwrap(),
        "the migration committed"
    );
    let k = ObjectKey::new("default", "machine", "m1").unwrap();
    store.object_put(&k, Labels::new()).await.unwrap();
    drop(store);
    drop((holder, fresh));
    testing::drop_schema(&base, &schema).await.unwrap();
}

/// A read given up before its answer (here stuck behind another transaction's lock on the
/// objects table, as a migration's DDL takes it) must not put its connection back into the pool
/// still busy with the query: the next call handed it (a read of another table, a renewal)
/// waited for the abandoned read to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_given_up_on_a_lock_does_not_hold_up_the_next_call() {
    let base = testing::test_url();
    let (url, schema) = testing::create_schema(&base).await.unwrap();
    let store = Store::open_with(&url, options()).await.unwrap();
    let k = ObjectKey::new("default", "machine", "m1").unwrap();
    store.object_put(&k, Labels::new()).await.unwrap();
    store.tag_set(&k, "state", &json!(1)).await.unwrap();

    let holder = raw(&url).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE objects IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    for _ in 0..2 {
        let gave_up = tokio::time::timeout(GIVE_UP, store.object_get(&k)).await;
        assert!(gave_up.is_err(), "the read waits for the lock");
        let listed = tokio::time::timeout(
            GIVE_UP,
            store.object_list(&fleetdb::ObjectQuery::new("default")),
        )
        .await;
        assert!(listed.is_err(), "the listing waits for the lock");
    }

    // The objects table is still locked: a read of the tags answers at once.
    let tag = tokio::time::timeout(PROMPT, store.tag_get(&k, "state")).await;
    assert!(
        matches!(tag, Ok(Ok(Some(_)))),
        "a read after given-up reads answers without waiting for their lock: {tag:?}"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(store.object_get(&k).await.unwrap().is_some());
    drop(store);
    drop(holder);
    testing::drop_schema(&base, &schema).await.unwrap();
}

/// A collection given up midway (a `timeout` around `gc_run`, the scheduler's task dropped with
/// its runtime) did not run: what made one due must still make one due. The run had already
/// taken the deletion and mutation counts (and the request) for its own and, given up, put
/// nothing back: the garbage of the deletions before it waited for some later trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_given_up_midway_is_still_due() {
    let base = testing::test_url();
    let (url, schema) = testing::create_schema(&base).await.unwrap();
    let store = Store::open_with(&url, options()).await.unwrap();
    let k = ObjectKey::new("default", "machine", "m1").unwrap();
    store.object_put(&k, Labels::new()).await.unwrap();
    store.object_delete(&k).await.unwrap();
    assert_eq!(store.gc_status().deletions_since, 1);

    let holder = raw(&url).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE objects IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let gave_up = tokio::time::timeout(GIVE_UP, store.gc_run()).await;
    assert!(
        gave_up.is_err(),
        "the collection's snapshot waits for the lock"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();

    assert_eq!(
        store.gc_status().deletions_since,
        1,
        "the deletion still counts towards a run"
    );
    let ran = store.gc_maybe_run().await.unwrap();
    assert!(ran.is_some(), "the run the deletion made due runs");
    assert_eq!(store.gc_status().deletions_since, 0);
    drop(store);
    drop(holder);
    testing::drop_schema(&base, &schema).await.unwrap();
}

/// A lone write given up while it waited for its turn (PostgreSQL shares transactions among lone
/// tag sets and creates, one in flight at a time) did not happen, and must not happen later:
/// left in the queue, it was written by the next shared transaction — after its caller's next
/// writes, which do not queue (a tag delete here), so a tag the caller had deleted came back
/// with the value it had given up on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_write_given_up_in_the_queue_is_not_written_later() {
    let base = testing::test_url();
    let (url, schema) = testing::create_schema(&base).await.unwrap();
    let store = Store::open_with(&url, options()).await.unwrap();
    let busy = ObjectKey::new("default", "machine", "busy").unwrap();
    let k = ObjectKey::new("default", "machine", "m1").unwrap();
    for key in [&busy, &k] {
        store.object_put(key, Labels::new()).await.unwrap();
        store.tag_set(key, "state", &json!(0)).await.unwrap();
    }

    // The turn's holder waits for a lock another connection holds.
    let holder = raw(&url).await;
    holder
        .batch_execute("BEGIN; SELECT 1 FROM tags WHERE id = 'busy' FOR UPDATE")
        .await
        .unwrap();
    let in_flight = {
        let store = store.clone();
        let busy = busy.clone();
        tokio::spawn(async move { store.tag_set(&busy, "state", &json!(1)).await })
    };
    // Give the spawned set time to take the turn (it then waits for the lock).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gave_up =
        tokio::time::timeout(GIVE_UP, store.tag_set(&k, "state", &json!("abandoned"))).await;
    assert!(gave_up.is_err(), "the set waits in the queue");
    store.tag_delete(&k, "state").await.unwrap();

    holder.batch_execute("ROLLBACK").await.unwrap();
    in_flight.await.unwrap().unwrap();
    // Whatever runs next takes the queue's turn; a write of the same shape makes sure one ran.
    store.tag_set(&busy, "state", &json!(2)).await.unwrap();
    assert_eq!(
        store.tag_get(&k, "state").await.unwrap(),
        None,
        "the given-up set is not written after the caller's delete"
    );
    drop(store);
    drop(holder);
    testing::drop_schema(&base, &schema).await.unwrap();
}

/// A `BlobWriter::write` given up midway (its piece still on its way: on SQLite the file and the
/// upload's row are written off the runtime, and go on without the caller) may land after all.
/// The writer must stay usable: its next write continues after the piece that landed, and the
/// digest it computes covers it. Before, the writer kept its old offset, and every later write
/// failed `Invalid` (the upload stood further on), leaving only a resume without the digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_write_given_up_that_landed_leaves_the_writer_usable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = Store::open_with(&format!("sqlite://{}", path.display()), options())
        .await
        .unwrap();
    let mut w = store.blob_writer("upload-1", None, None).await.unwrap();

    // Another process holds the database's write lock: the piece's bookkeeping waits for it.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let gave_up = tokio::time::timeout(GIVE_UP, w.write(b"first ")).await;
    assert!(gave_up.is_err(), "the write waits for the lock");
    other.execute_batch("COMMIT").unwrap();

    // The given-up piece lands once the lock is free; the writer goes on after it. (While it is
    // still on its way, the upload is busy: `Unavailable`, try again.)
    let mut wrote = w.write(b"second").await;
    for _ in 0..100 {
        if !matches!(wrote, Err(fleetdb::Error::Unavailable(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        wrote = w.write(b"second").await;
    }
    wrote.unwrap();
    let info = w.commit(Labels::new()).await.unwrap();
    let whole = b"first second";
    assert_eq!(info.size, whole.len() as u64);
    assert_eq!(store.blob_get(&info.digest).await.unwrap(), whole);
}
