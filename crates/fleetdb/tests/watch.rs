//! Watch timing on the embedded backend: local commits are pushed (no polling), idle watches
//! get progress events. (The shared behaviour is in the conformance suite.)

use std::time::Duration;

use fleetdb::{OpenOptions, Store, WatchEvent, WatchRequest, WatchScope};

async fn store(poll: Duration, progress: Duration) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("w.sqlite").display());
    let store = Store::open_with(
        &url,
        OpenOptions {
            watch_poll_interval: poll,
            watch_progress_interval: progress,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commits_are_pushed_without_polling() {
    // Polling once an hour: only the push can deliver within the test's patience.
    let (_d, s) = store(Duration::from_secs(3600), Duration::from_secs(3600)).await;
    let mut w = s
        .watch(WatchRequest::new(WatchScope::Kv { prefix: "".into() }))
        .await
        .unwrap();
    assert!(matches!(
        w.next().await,
        Some(Ok(WatchEvent::Snapshot { .. }))
    ));
    for i in 0..20 {
        let written = s.kv_set("k", &i.to_string()).await.unwrap();
        match w.next_timeout(Duration::from_secs(1)).await {
            Some(Ok(WatchEvent::Change(c))) => assert_eq!(c.revision, written.item.revision),
            other => panic!("change {i} not pushed within a second: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watches_get_progress_with_the_current_revision() {
    let (_d, s) = store(Duration::from_millis(20), Duration::from_millis(100)).await;
    let mut w = s
        .watch(WatchRequest::new(WatchScope::Kv {
            prefix: "mine/".into(),
        }))
        .await
        .unwrap();
    assert!(matches!(
        w.next().await,
        Some(Ok(WatchEvent::Snapshot { .. }))
    ));
    // Changes outside the watched prefix move the revision without events for this watch.
    let other = s.kv_set("other", "x").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match w.next_timeout(Duration::from_secs(5)).await {
            Some(Ok(WatchEvent::Progress { revision })) if revision >= other.item.revision => break,
            Some(Ok(WatchEvent::Progress { .. })) => {}
            other => panic!("expected progress, got {other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress event");
    }
}

#[test]
fn a_buffered_event_is_small() {
    // Each watcher's buffer holds events by value: keep them a few words wide (memory per idle
    // watcher is a goal of its own).
    assert!(
        std::mem::size_of::<WatchEvent>() <= 24,
        "{}",
        std::mem::size_of::<WatchEvent>()
    );
}
