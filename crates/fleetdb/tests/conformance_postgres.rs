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
            clock: Arc::new(clock.clone()),
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
