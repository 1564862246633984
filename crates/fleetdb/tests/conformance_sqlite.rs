//! The conformance suite on the embedded backend: a fresh SQLite file per test, durable
//! (WAL, synchronous=FULL), as users run it.

use std::sync::Arc;

use fleetdb::{OpenOptions, Store};
use fleetdb_conformance::{Harness, START};

async fn make() -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.keep().join("nested/folder/fleetdb.sqlite");
    let url = format!("sqlite://{}", path.display());
    let clock = fleetdb::ManualClock::new(START);
    let store = Store::open_with(
        &url,
        OpenOptions {
            clock: Some(Arc::new(clock.clone())),
            // Tests move time by hand and renew and sweep explicitly.
            background: false,
            ..OpenOptions::default()
        },
    )
    .await
    .expect("open sqlite");
    assert!(
        path.exists(),
        "the file and its folders are created on first use"
    );
    Harness {
        store,
        clock,
        url,
        cleanup: path
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .display()
            .to_string(),
    }
}

async fn drop(h: Harness) {
    let dir = h.cleanup.clone();
    std::mem::drop(h);
    let _ = std::fs::remove_dir_all(dir);
}

fleetdb_conformance::suite!(make, drop);
