//! The background task with the real clock: it keeps sessions alive past their TTL, and it prunes
//! history and compacts the change log older than the retention settings. (Everything else moves
//! time by hand; this is the one place where the task itself is exercised, so each test waits
//! about 3 s of real time.)

use std::time::Duration;

use fleetdb::{HistoryFilter, Labels, ObjectKey, OpenOptions, SessionSpec, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_renews_sessions_and_prunes_history() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/db.sqlite", dir.path().display());
    let store = Store::open_with(
        &url,
        OpenOptions {
            history_retention: Some(Duration::from_secs(1)),
            change_retention: Some(Duration::from_secs(1)),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    store.process_define("P", &[]).await.unwrap();
    let k = ObjectKey::new("default", "machine", "m1").unwrap();
    let put = store.object_put(&k, Labels::new()).await.unwrap();
    let s = store
        .session_start(SessionSpec::new("c", "h").ttl(Duration::from_secs(2)))
        .await
        .unwrap();
    let mut w = s.claim_object(&k, "P").await.unwrap();
    w.cancel().await.unwrap();
    let mut w = s.claim_object(&k, "P").await.unwrap();
    let first_deadline = s.deadline();
    // Past the first deadline by 1.5 s: only renewals (every 667 ms) keep it alive. (A TTL of 1 s
    // left a loaded machine 333 ms of slack between renewals, and expired once.)
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        !s.is_expired(),
        "renewed in the background past its 2 s TTL"
    );
    assert!(s.deadline() > first_deadline);
    let row = store.session_get(s.id()).await.unwrap().unwrap();
    assert!(row.deadline > first_deadline);
    // Every row is older than the 1 s retention: the background sweep pruned all but the
    // newest (the second claim's Started, which carries the sequence on).
    let hist = store
        .history(&HistoryFilter::Object(k.clone()), None, 10)
        .await
        .unwrap();
    assert_eq!(hist.items.len(), 1, "{:?}", hist.items);
    assert_eq!(hist.items[0].token, w.token());
    // The change log too: the object's entry (and the session's joining) is older than the 1 s
    // change retention, compacted away by the background task.
    let info = store.revision().await.unwrap();
    assert!(
        info.compacted >= put.item.revision,
        "{info:?} {:?}",
        put.item
    );
    w.finish(|_| async { Ok(()) }).await.unwrap();
    s.close().await.unwrap();
}

/// Sessions started more often than the renewal tick must not push the renewal of the others
/// back (each start wakes the task to recompute its tick).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_starting_all_the_time_do_not_starve_renewals() {
    let store = Store::open("sqlite::memory:").await.unwrap();
    let spec = || SessionSpec::new("c", "h").ttl(Duration::from_secs(2));
    let s = store.session_start(spec()).await.unwrap();
    let first_deadline = s.deadline();
    // A new session every 200 ms (the tick is 667 ms) for 3.5 s: past the first deadline.
    let mut others = Vec::new();
    for _ in 0..17 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        others.push(store.session_start(spec()).await.unwrap());
    }
    assert!(!s.is_expired(), "renewed while sessions kept starting");
    let row = store.session_get(s.id()).await.unwrap().unwrap();
    assert!(row.deadline > first_deadline);
}

/// A renewal that fails is tried again soon, not a tick later: failures for about half the TTL
/// cost no session (with retries a tick apart, the fourth attempt would fall on the deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_renewals_are_retried_before_the_deadline() {
    let store = Store::open("sqlite::memory:").await.unwrap();
    let s = store
        .session_start(SessionSpec::new("c", "h").ttl(Duration::from_secs(2)))
        .await
        .unwrap();
    let first_deadline = s.deadline();
    store.inject_renewal_failures(4);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(!s.is_expired(), "a retry succeeded before the deadline");
    let row = store.session_get(s.id()).await.unwrap().unwrap();
    assert!(row.deadline > first_deadline);
}

/// Records whose TTL passed faster than one sweep takes (1,000 of a space) per interval do not
/// pile up: while a sweep stops at its limit, the background task sweeps again at once. 2,500
/// expired keys go within one interval of the first sweep that finds them, not in three (a
/// steady 1,500 TTL keys a second grew the table by 500 a second, for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_expired_keys_is_swept_at_once_not_a_limit_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/db.sqlite", dir.path().display());
    let clock =
        fleetdb::ManualClock::new(fleetdb::Timestamp::from_system(std::time::SystemTime::now()));
    let store = Store::open_with(
        &url,
        OpenOptions {
            clock: Some(std::sync::Arc::new(clock.clone())),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let n = 2_500;
    let sets = (0..n).map(|i| {
        let store = store.clone();
        async move {
            let ttl = fleetdb::core::world::Lifetime::ttl(Duration::from_secs(1));
            store
                .kv_set_with(&format!("lock/{i}"), "x", None, ttl)
                .await
                .unwrap();
        }
    });
    futures::future::join_all(sets).await;
    // Every key's TTL has passed by the store's clock; the background sweeps find them.
    clock.advance(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let mut first = None;
    loop {
        let deleted = store
            .changes(
                fleetdb::Revision(0),
                &fleetdb::ChangeFilter::default(),
                10_000,
            )
            .await
            .unwrap()
            .iter()
            .filter(|c| c.op == fleetdb::ChangeOp::Delete && c.namespace == ".kv")
            .count();
        if deleted > 0 && first.is_none() {
            first = Some(std::time::Instant::now());
        }
        if deleted == n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{deleted} of {n} expired keys swept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = first.unwrap().elapsed();
    assert!(
        took < Duration::from_millis(900),
        "the backlog took {took:?} from the first sweep: one sweep's limit per interval"
    );
}

/// A store that outlives the runtime it was opened on (a program's setup runtime, a test's
/// runtime with the store kept in a static, a sync facade building a runtime per call) goes on
/// with its background work on the runtime it is used from next: a runtime that shuts down drops
/// the tasks spawned on it. Before, the store still thought its tasks were running: no session
/// started afterwards was ever renewed (it expired in the database while its holder went on
/// working), no watch got a change, and no requested collection ran.
#[test]
fn background_work_goes_on_after_the_runtime_it_ran_on_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/db.sqlite", dir.path().display());
    let first = tokio::runtime::Runtime::new().unwrap();
    let store = first.block_on(Store::open(&url)).unwrap();
    let k = ObjectKey::new("default", "machine", "m1").unwrap();
    first.block_on(async {
        store.object_put(&k, Labels::new()).await.unwrap();
        // The watch hub and the announcer start on this runtime too.
        let mut w = store
            .watch(fleetdb::WatchRequest::new(fleetdb::WatchScope::All))
            .await
            .unwrap();
        store.tag_set(&k, "t", &serde_json::json!(0)).await.unwrap();
        w.next().await.unwrap().unwrap();
    });
    drop(first);

    let second = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let s = store
            .session_start(SessionSpec::new("c", "h").ttl(Duration::from_secs(2)))
            .await
            .unwrap();
        let first_deadline = s.deadline();
        let mut w = store
            .watch(
                fleetdb::WatchRequest::new(fleetdb::WatchScope::All)
                    .from_revision(store.revision().await.unwrap().current),
            )
            .await
            .unwrap();
        store.tag_set(&k, "t", &serde_json::json!(1)).await.unwrap();
        let got = w.next_timeout(Duration::from_secs(3)).await;
        assert!(
            matches!(got, Some(Ok(fleetdb::WatchEvent::Change(_)))),
            "the watch gets the change: {got:?}"
        );
        let runs = store.gc_status().runs;
        store.gc_request();
        // Past the first deadline by 1 s: only renewals (every 667 ms) keep it alive.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let row = store.session_get(s.id()).await.unwrap();
        assert!(
            row.is_some_and(|r| r.deadline > first_deadline),
            "the session is renewed"
        );
        assert!(
            store.gc_status().runs > runs,
            "the requested collection ran"
        );
    });
}
