//! On PostgreSQL a store runs on the database server's clock unless it is given one: the
//! components of a fleet run on many hosts, and a host whose clock is wrong must neither take the
//! live claims of others (its "now" past their deadlines) nor keep its own sessions alive after
//! it died (its deadlines ahead of everybody's "now"). Before, each store ran on its host's wall
//! clock: a host an hour ahead took every claim in the fleet.

use std::sync::Arc;
use std::time::Duration;

use fleetdb::{
    Clock, Error, Labels, ObjectKey, OpenOptions, PostgresBackend, PostgresOptions, ServerClock,
    SessionSpec, Store, SystemClock, Timestamp,
};

/// This host's wall clock, off by `skew` µs (a host without NTP, a VM restored from a snapshot).
#[derive(Debug)]
struct Skewed(i64);

impl Clock for Skewed {
    fn now(&self) -> Timestamp {
        Timestamp(SystemClock.now().0 + self.0)
    }
}

const HOUR: i64 = 3_600_000_000;

fn m(id: &str) -> ObjectKey {
    ObjectKey::new("default", "machine", id).unwrap()
}

/// The server's `clock_timestamp()` (µs), read on a connection of its own.
async fn server_now(url: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A store on the server's clock, on a host whose wall clock is off by `skew` µs.
async fn open_on_a_skewed_host(url: &str, skew: i64) -> Store {
    let clock = Arc::new(ServerClock::new(Arc::new(Skewed(skew))));
    let backend =
        PostgresBackend::open_on_server_clock(url, PostgresOptions::default(), clock.clone())
            .await
            .unwrap();
    Store::from_backend(Arc::new(backend), clock, fleetdb::Limits::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_postgres_store_runs_on_the_servers_clock() {
    let base = fleetdb_postgres::testing::test_url();
    let (url, schema) = fleetdb_postgres::testing::create_schema(&base)
        .await
        .unwrap();
    let store = Store::open_with(
        &url,
        OpenOptions {
            background: false,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    // This machine runs the server: the offset is the sampling's error, well under a second.
    let offset = store.clock_offset_micros().expect("on the server's clock");
    assert!(offset.abs() < 1_000_000, "offset {offset} µs");
    let before = server_now(&url).await;
    let now = store.clock().now().0;
    let after = server_now(&url).await;
    // Within the anchor's error (half a round trip) of the server's readings around it.
    assert!(
        before - 5_000 <= now && now <= after + 5_000,
        "{before} ≤ {now} ≤ {after}"
    );
    // Sampled again (the background task does it every CLOCK_SYNC_INTERVAL).
    let again = store.backend().clock_sync().await.unwrap().unwrap();
    assert!(again.abs() < 1_000_000, "offset {again} µs");
    // The gauge says so too.
    assert!(store
        .metrics()
        .encode()
        .contains("fleetdb_clock_offset_seconds"));

    // A clock given at open is used as it is (tests move time by hand).
    let manual = fleetdb::ManualClock::new(Timestamp(1_767_225_600_000_000));
    let given = Store::open_with(
        &url,
        OpenOptions {
            clock: Some(Arc::new(manual.clone())),
            background: false,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(given.clock().now(), manual.now());
    assert_eq!(given.clock_offset_micros(), None);
    // SQLite's processes share their host's clock.
    let sqlite = Store::open("sqlite::memory:").await.unwrap();
    assert_eq!(sqlite.clock_offset_micros(), None);
    drop((store, given));
    fleetdb_postgres::testing::drop_schema(&base, &schema)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_host_whose_clock_is_wrong_neither_takes_live_claims_nor_outlives_its_sessions() {
    let base = fleetdb_postgres::testing::test_url();
    let (url, schema) = fleetdb_postgres::testing::create_schema(&base)
        .await
        .unwrap();
    let right = open_on_a_skewed_host(&url, 0).await;
    let ahead = open_on_a_skewed_host(&url, HOUR).await;
    let behind = open_on_a_skewed_host(&url, -HOUR).await;
    right.process_define("P", &[]).await.unwrap();
    for id in ["m1", "m2"] {
        right.object_put(&m(id), Labels::new()).await.unwrap();
    }
    // The skewed hosts know their offset (the gauge, the warning), and run on the server's time.
    let off = ahead.clock_offset_micros().unwrap();
    assert!((off + HOUR).abs() < 1_000_000, "{off}");
    let off = behind.clock_offset_micros().unwrap();
    assert!((off - HOUR).abs() < 1_000_000, "{off}");
    let warning = ahead.clock_warning().unwrap();
    assert!(
        warning.starts_with("this host's clock is 3600.")
            && warning.contains("s ahead of the database server's"),
        "{warning}"
    );
    assert!(behind
        .clock_warning()
        .unwrap()
        .contains("s behind the database server's"));
    assert_eq!(right.clock_warning(), None);
    for s in [&ahead, &behind] {
        let d = s.clock().now().0 - right.clock().now().0;
        assert!(d.abs() < 50_000, "{d} µs apart");
    }

    // A live claim of the right host is not free to the host an hour ahead.
    let spec = |c: &str| SessionSpec::new(c, c).ttl(Duration::from_secs(10));
    let s1 = right.session_start(spec("right")).await.unwrap();
    let _held = s1.claim_object(&m("m1"), "P").await.unwrap();
    let s2 = ahead.session_start(spec("ahead")).await.unwrap();
    match s2.claim_object(&m("m1"), "P").await {
        Err(Error::Conflict { .. }) => {}
        other => panic!("the host an hour ahead took a live claim: {other:?}"),
    }
    // The host an hour behind does not hold a claim for an hour past its session's deadline: the
    // others see its session on the server's clock (10 s, not 1 h + 10 s).
    let s3 = behind.session_start(spec("behind")).await.unwrap();
    let _held_behind = s3.claim_object(&m("m2"), "P").await.unwrap();
    let deadline = s3.deadline().0 - right.clock().now().0;
    assert!(
        (9_000_000..=10_100_000).contains(&deadline),
        "the session ends {deadline} µs from now on the server's clock"
    );
    drop((s1, s2, s3, _held, _held_behind));
    drop((right, ahead, behind));
    fleetdb_postgres::testing::drop_schema(&base, &schema)
        .await
        .unwrap();
}

/// The hazard the server's clock removes: a store given its host's wrong clock (as every store
/// was before) takes a live claim of another host. This pins why the default matters.
#[tokio::test]
async fn a_store_given_a_wrong_clock_would_take_live_claims() {
    let base = fleetdb_postgres::testing::test_url();
    let (url, schema) = fleetdb_postgres::testing::create_schema(&base)
        .await
        .unwrap();
    let right = open_on_a_skewed_host(&url, 0).await;
    right.process_define("P", &[]).await.unwrap();
    right.object_put(&m("m1"), Labels::new()).await.unwrap();
    let wrong = Store::open_with(
        &url,
        OpenOptions {
            clock: Some(Arc::new(Skewed(HOUR))),
            background: false,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let s1 = right
        .session_start(SessionSpec::new("right", "right"))
        .await
        .unwrap();
    let _held = s1.claim_object(&m("m1"), "P").await.unwrap();
    let s2 = wrong
        .session_start(SessionSpec::new("wrong", "wrong"))
        .await
        .unwrap();
    assert!(
        s2.claim_object(&m("m1"), "P").await.is_ok(),
        "a clock an hour ahead sees the live session as expired"
    );
    drop((s1, s2, _held));
    drop((right, wrong));
    fleetdb_postgres::testing::drop_schema(&base, &schema)
        .await
        .unwrap();
}
