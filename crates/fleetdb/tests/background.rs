//! The background task with the real clock: it keeps sessions alive past their TTL, and it prunes
//! history older than the retention setting. (Everything else moves time by hand; this is the one
//! place where the task itself is exercised, so it waits about 3.5 s of real time.)

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
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    store.process_define("P", &[]).await.unwrap();
    let k = ObjectKey::new("default", "machine", "m1").unwrap();
    store.object_put(&k, Labels::new()).await.unwrap();
    let s = store
        .session_start(SessionSpec::new("c", "h").ttl(Duration::from_secs(2)))
        .await
        .unwrap();
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
    // The Started row is older than the 1 s retention: the background sweep pruned it.
    let hist = store
        .history(&HistoryFilter::Object(k.clone()), None, 10)
        .await
        .unwrap();
    assert!(hist.items.is_empty(), "{:?}", hist.items);
    w.finish(|_| async { Ok(()) }).await.unwrap();
    s.close().await.unwrap();
}
