#![cfg(feature = "postgres")]
//! The conformance suite on PostgreSQL: a fresh schema per test on the server named by
//! FLEETDB_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/postgres). If the server
//! is unreachable, every test FAILS with a message saying how to start it; never a silent skip.

use std::sync::Arc;

use fleetdb::{OpenOptions, Store};
use fleetdb_conformance::{Harness, START};

fn base_url() -> String {
    std::env::var("FLEETDB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn make() -> Harness {
    let (url, schema) = fleetdb_postgres::testing::create_schema(&base_url())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let clock = fleetdb::ManualClock::new(START);
    let store = Store::open_with(
        &url,
        OpenOptions {
            clock: Some(Arc::new(clock.clone())),
            // Tests move time by hand and renew and sweep explicitly.
            background: false,
            postgres_pool_size_max: 4,
            ..OpenOptions::default()
        },
    )
    .await
    .expect("open postgres");
    Harness {
        store,
        clock,
        url,
        cleanup: schema,
    }
}

async fn drop(h: Harness) {
    let schema = h.cleanup.clone();
    std::mem::drop(h);
    // A schema left behind fails nothing, but say so.
    if let Err(e) = fleetdb_postgres::testing::drop_schema(&base_url(), &schema).await {
        eprintln!("{e}");
    }
}

fleetdb_conformance::suite!(make, drop);

/// A fenced write racing a release on PostgreSQL. Claims and finishes run READ COMMITTED, outside
/// SSI's conflict tracking, so the fenced write's check must hold the claim's row, not merely
/// read it: here a releaser on its own connection holds the row locked (as a finish does); the
/// fenced write waits for it, and once the release has deleted the row and committed, the write
/// fails with `WorkLost` and writes nothing. (With a plain snapshot read it would have committed
/// after the claim ended.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_write_racing_a_release_waits_and_fails() {
    use std::time::Duration;
    let h = make().await;
    let st = h.store.clone();
    st.process_define("Install", &[]).await.unwrap();
    let k = fleetdb::ObjectKey::new("default", "machine", "m1").unwrap();
    st.object_put(&k, fleetdb::Labels::new()).await.unwrap();
    let s = st
        .session_start(fleetdb::SessionSpec::new("c", "h").ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    let w = s.claim_object(&k, "Install").await.unwrap();
    let fence = w.fence();
    let (releaser, conn) = tokio_postgres::connect(&h.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    releaser
        .batch_execute(
            "BEGIN; SELECT 1 FROM work WHERE id = 'm1' AND process = 'Install' FOR UPDATE",
        )
        .await
        .unwrap();
    let write = tokio::spawn({
        let (st, k) = (st.clone(), k.clone());
        async move {
            st.txn_fenced(&fence, |tx| {
                let k = k.clone();
                async move { tx.tag_set(&k, "progress", &serde_json::json!("late")) }
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !write.is_finished(),
        "the fenced write waits for the claim's row"
    );
    releaser
        .batch_execute("DELETE FROM work WHERE id = 'm1' AND process = 'Install'; COMMIT")
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), write)
        .await
        .expect("the fenced write ends once the release committed")
        .unwrap();
    assert!(matches!(r, Err(fleetdb::Error::WorkLost { .. })), "{r:?}");
    assert!(st.tag_get(&k, "progress").await.unwrap().is_none());
    std::mem::forget(w); // its row is gone; dropping would try to cancel
    drop(h).await;
}

/// Claims of a limited process take turns on its row: while another transaction holds the row
/// locked (as a claim of the process does until it commits), a claim of the process waits — and
/// then counts the claims committed meanwhile; a claim of an unlimited process never waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_a_limited_process_take_turns_on_its_row() {
    use std::time::Duration;
    let h = make().await;
    let st = h.store.clone();
    for p in ["Install", "Audit"] {
        st.process_define(p, &[]).await.unwrap();
    }
    st.process_limit("Install", Some(1)).await.unwrap();
    for id in ["m1", "m2"] {
        let k = fleetdb::ObjectKey::new("default", "machine", id).unwrap();
        st.object_put(&k, fleetdb::Labels::new()).await.unwrap();
    }
    let s = st
        .session_start(fleetdb::SessionSpec::new("c", "h").ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    let (other, conn) = tokio_postgres::connect(&h.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    for p in ["Install", "Audit"] {
        other
            .batch_execute(&format!(
                "BEGIN; SELECT 1 FROM processes WHERE name = '{p}' FOR UPDATE"
            ))
            .await
            .unwrap();
        let claim = tokio::spawn({
            let s = s.clone();
            async move { s.claim(p, "kind = machine", 2).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let waited = !claim.is_finished();
        other.batch_execute("COMMIT").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), claim)
            .await
            .expect("the claim ends once the row is free")
            .unwrap()
            .unwrap();
        match p {
            "Install" => {
                assert!(waited, "a claim of a limited process waits for its row");
                assert_eq!(got.len(), 1, "the limit is 1");
            }
            _ => {
                assert!(!waited, "a claim of an unlimited process takes no lock");
                assert_eq!(got.len(), 2);
            }
        }
        for mut w in got {
            w.cancel().await.unwrap();
        }
    }
    drop(h).await;
}

/// See [`fleetdb_conformance::gc::an_external_reference_committed_behind_an_open_transaction_is_kept`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_reference_committed_behind_an_open_transaction_is_kept() {
    let h = make().await;
    fleetdb_conformance::gc::an_external_reference_committed_behind_an_open_transaction_is_kept(&h)
        .await;
    drop(h).await;
}

/// `Store::changes` read page by page, each page after the last revision of the one before (what
/// `changes --after R` and the method's documentation invite), on PostgreSQL: a transaction
/// holding revision g (taken from the sequence, its row inserted, not yet committed) commits
/// after g + 1 was written. `changes()` answers only up to the settled revision, so g + 1 waits
/// until g is final (found by review: it lost g). SQLite's revisions become visible in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_paged_by_the_last_revision_read_lose_nothing() {
    let h = make().await;
    let s = h.store.clone();
    let start = s.revision().await.unwrap().current;
    let all = fleetdb::ChangeFilter::default();
    // A writer in flight: it has taken revision g and inserted its change row, uncommitted.
    let (late, conn) = tokio_postgres::connect(&h.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    late.batch_execute(
        "BEGIN; INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, \
         new_value, at) VALUES (nextval('fleetdb_revision'), '.kv', '', 'late', 'kv', '', 'put', \
         NULL, '{\"value\":\"1\"}', 0)",
    )
    .await
    .unwrap();
    let early = s.kv_set("early", "1").await.unwrap().item.revision;
    // A consumer reads what is new and remembers the last revision it saw.
    let page = s.changes(start, &all, 100).await.unwrap();
    let mut seen: Vec<(String, fleetdb::Revision)> =
        page.iter().map(|c| (c.id.clone(), c.revision)).collect();
    // The in-flight writer commits; the consumer reads on from where it stood.
    late.batch_execute("COMMIT").await.unwrap();
    let last = seen.last().map_or(start, |(_, r)| *r);
    for c in s.changes(last, &all, 100).await.unwrap() {
        seen.push((c.id.clone(), c.revision));
    }
    let log: Vec<(String, fleetdb::Revision)> = s
        .changes(start, &all, 100)
        .await
        .unwrap()
        .iter()
        .map(|c| (c.id.clone(), c.revision))
        .collect();
    assert!(log.iter().any(|(id, r)| id == "early" && *r == early));
    assert_eq!(
        seen, log,
        "paging changes() by the last revision read skipped an entry of the log"
    );
    drop(h).await;
}
