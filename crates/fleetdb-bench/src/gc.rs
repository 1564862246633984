//! `fleetdb-bench gc`: a full garbage collection over N objects and blobs' metadata (chains of
//! depth 5: image → layer → layer → layer → blob), 10 % garbage, 10,000 leases holding the chain
//! heads; the collection's wall time and the longest time a concurrent writer waited.
//!
//! The data is bulk-loaded with SQL straight into the schema (setup, not measured): objects and
//! blobs at revision 0, so the mark's revision covers them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use fleetdb::{Labels, ObjectKey, OpenOptions, Store};

#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// sqlite, postgres or both.
    #[arg(long, default_value = "both")]
    pub backend: String,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub pg_url: String,
    /// Objects and blobs together (a multiple of 5).
    #[arg(long, default_value_t = 1_000_000)]
    pub nodes: usize,
    #[arg(long, default_value_t = 10_000)]
    pub leases: usize,
    /// Share of chains nothing holds.
    #[arg(long, default_value_t = 0.1)]
    pub garbage: f64,
    /// The collector's target duration of one sweep transaction (`GcOptions::sweep_batch_target`).
    #[arg(long, default_value_t = 20)]
    pub sweep_target_ms: u64,
}

fn digest(c: usize) -> String {
    format!("sha256:{c:064x}")
}

/// The rows, as SQL text values, shared by both loaders.
struct Plan {
    chains: usize,
    held: usize,
    leases: usize,
}

impl Plan {
    fn new(a: &GcArgs) -> Plan {
        let chains = a.nodes / 5;
        Plan {
            chains,
            held: chains - (chains as f64 * a.garbage).round() as usize,
            leases: a.leases.max(1),
        }
    }

    /// (kind, id, labels JSON) of chain `c`'s four objects.
    fn objects(c: usize) -> [(&'static str, String, String); 4] {
        let r = |kind: &str, id: String| format!("{{\"fleetdb.io/gc.ref.{kind}\":\"{id}\"}}");
        [
            ("image", format!("i{c}"), r("layer", format!("a{c}"))),
            ("layer", format!("a{c}"), r("layer", format!("b{c}"))),
            ("layer", format!("b{c}"), r("layer", format!("d{c}"))),
            ("layer", format!("d{c}"), r("content", digest(c))),
        ]
    }
}

fn load_sqlite(path: &std::path::Path, p: &Plan) -> Result<(), String> {
    let mut c = rusqlite::Connection::open(path).map_err(|e| e.to_string())?;
    let tx = c.transaction().map_err(|e| e.to_string())?;
    {
        let mut o = tx
            .prepare("INSERT INTO objects (namespace, kind, id, labels, created_at, updated_at, revision) VALUES ('default', ?1, ?2, ?3, 0, 0, 0)")
            .map_err(|e| e.to_string())?;
        let mut b = tx
            .prepare("INSERT INTO blobs (digest, size, labels, created_at, updated_at, revision) VALUES (?1, 1024, '{}', 0, 0, 0)")
            .map_err(|e| e.to_string())?;
        let mut r = tx
            .prepare("INSERT INTO lease_resources (lease_id, rtype, namespace, kind, id, added_at) VALUES (?1, 'object', 'default', 'image', ?2, 0)")
            .map_err(|e| e.to_string())?;
        for ch in 0..p.chains {
            for (kind, id, labels) in Plan::objects(ch) {
                o.execute(rusqlite::params![kind, id, labels])
                    .map_err(|e| e.to_string())?;
            }
            b.execute([digest(ch)]).map_err(|e| e.to_string())?;
            if ch < p.held {
                r.execute(rusqlite::params![
                    format!("l{}", ch % p.leases),
                    format!("i{ch}")
                ])
                .map_err(|e| e.to_string())?;
            }
        }
        let mut l = tx
            .prepare("INSERT INTO leases (id, labels, flat, expires_at, created_at, revision) VALUES (?1, '{}', 0, NULL, 0, 0)")
            .map_err(|e| e.to_string())?;
        for i in 0..p.leases {
            l.execute([format!("l{i}")]).map_err(|e| e.to_string())?;
        }
        tx.execute_batch("INSERT INTO gc_kinds VALUES ('image', 1, 0), ('layer', 1, 0);")
            .map_err(|e| e.to_string())?;
    }
    tx.commit().map_err(|e| e.to_string())
}

#[cfg(feature = "postgres")]
async fn load_postgres(url: &str, p: &Plan) -> Result<(), String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let n = p.chains as i64 - 1;
    let sql = format!(
        "INSERT INTO objects (namespace, kind, id, labels, created_at, updated_at, revision)
           SELECT 'default', 'image', 'i'||g, '{{\"fleetdb.io/gc.ref.layer\":\"a'||g||'\"}}', 0, 0, 0 FROM generate_series(0, {n}) g
           UNION ALL SELECT 'default', 'layer', 'a'||g, '{{\"fleetdb.io/gc.ref.layer\":\"b'||g||'\"}}', 0, 0, 0 FROM generate_series(0, {n}) g
           UNION ALL SELECT 'default', 'layer', 'b'||g, '{{\"fleetdb.io/gc.ref.layer\":\"d'||g||'\"}}', 0, 0, 0 FROM generate_series(0, {n}) g
           UNION ALL SELECT 'default', 'layer', 'd'||g, '{{\"fleetdb.io/gc.ref.content\":\"sha256:'||lpad(to_hex(g), 64, '0')||'\"}}', 0, 0, 0 FROM generate_series(0, {n}) g;
         INSERT INTO blobs (digest, size, labels, created_at, updated_at, revision)
           SELECT 'sha256:'||lpad(to_hex(g), 64, '0'), 1024, '{{}}', 0, 0, 0 FROM generate_series(0, {n}) g;
         INSERT INTO leases (id, labels, flat, expires_at, created_at, revision)
           SELECT 'l'||g, '{{}}', 0, NULL, 0, 0 FROM generate_series(0, {l}) g;
         INSERT INTO lease_resources (lease_id, rtype, namespace, kind, id, added_at)
           SELECT 'l'||(g % {leases}), 'object', 'default', 'image', 'i'||g, 0 FROM generate_series(0, {h}) g;
         INSERT INTO gc_kinds VALUES ('image', 1, 0), ('layer', 1, 0);
         ANALYZE;",
        l = p.leases - 1,
        leases = p.leases,
        h = p.held as i64 - 1,
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| e.to_string())?;
    // Like the peers' scripts (and `work`'s settle) before their clocks start: VACUUM sets the
    // freshly loaded rows' hint bits now (otherwise the collection's first read of every page
    // dirties it, and writing those pages out slowed the concurrent writer's WAL flushes to
    // 70 ms), and CHECKPOINT writes the dirty pages out now, not during the collection.
    for step in ["VACUUM", "CHECKPOINT"] {
        if let Err(e) = client.batch_execute(step).await {
            eprintln!("  ({step} failed, continuing: {e})");
        }
    }
    Ok(())
}

/// A writer that keeps writing during the collection; returns its slowest write and p99.
async fn writer(store: Store, stop: Arc<AtomicBool>) -> (Duration, Duration, usize, Duration) {
    let m = ObjectKey::new("default", "machine", "busy").expect("valid key");
    let _ = store.object_put(&m, Labels::new()).await;
    let mut lat = Vec::new();
    let mut i = 0u64;
    let begun = Instant::now();
    // When the slowest write started, after the writer did.
    let mut max_at = (Duration::ZERO, Duration::ZERO);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let _ = store.tag_set(&m, "n", &serde_json::json!(i)).await;
        let took = t.elapsed();
        if took > max_at.0 {
            max_at = (took, t.duration_since(begun));
        }
        lat.push(took);
        i += 1;
    }
    lat.sort_unstable();
    let max = lat.last().copied().unwrap_or_default();
    let p99 = lat
        .get((lat.len() as f64 * 0.99) as usize)
        .copied()
        .unwrap_or_default();
    (max, p99, lat.len(), max_at.1)
}

async fn measure(name: &str, url: &str, p: &Plan, sweep_target: Duration) -> String {
    let store = Store::open_with(
        url,
        OpenOptions {
            background: false,
            gc: fleetdb::GcOptions {
                sweep_batch_target: sweep_target,
                ..fleetdb::GcOptions::default()
            },
            ..OpenOptions::default()
        },
    )
    .await
    .expect("open");
    // Baseline writer latency without a collection.
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(store.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (base_max, base_p99, _, _) = w.await.unwrap_or_default();

    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(store.clone(), stop.clone()));
    let t = Instant::now();
    let stats = store.gc_run().await;
    let wall = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (max, p99, writes, max_at) = w.await.unwrap_or_default();
    match stats {
        Ok(s) => format!(
            "| {name} | {} nodes | {:.2} s (mark {:.0} ms of which snapshot {:.0} ms, sweep {:.0} ms) | swept {} objects + {} blobs, marked {} | writer during GC: max {:.1} ms (at {:.0} ms), p99 {:.1} ms ({writes} writes; without GC: max {:.1} ms, p99 {:.1} ms); collector's longest txn {:.1} ms |",
            p.chains * 5,
            wall.as_secs_f64(),
            s.mark_ms,
            s.snapshot_ms,
            s.sweep_ms,
            s.swept_objects,
            s.swept_blobs,
            s.marked,
            max.as_secs_f64() * 1000.0,
            max_at.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
            base_max.as_secs_f64() * 1000.0,
            base_p99.as_secs_f64() * 1000.0,
            s.writers_blocked_max_ms,
        ),
        Err(e) => format!("| {name} | failed: {e} |"),
    }
}

pub fn run_gc_main(a: GcArgs) -> i32 {
    let rt = match crate::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let plan = Plan::new(&a);
    rt.block_on(async {
        println!("| backend | data | full collection | result | writers |\n|---|---|---|---|---|");
        if a.backend == "sqlite" || a.backend == "both" {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("gc.sqlite");
            let url = format!("sqlite://{}", path.display());
            drop(Store::open(&url).await.expect("create")); // migrate
            let t = Instant::now();
            if let Err(e) = load_sqlite(&path, &plan) {
                eprintln!("loading SQLite failed: {e}");
                return 1;
            }
            eprintln!("sqlite: loaded in {:.1} s", t.elapsed().as_secs_f64());
            println!(
                "{}",
                measure(
                    "sqlite",
                    &url,
                    &plan,
                    Duration::from_millis(a.sweep_target_ms)
                )
                .await
            );
        }
        #[cfg(feature = "postgres")]
        if a.backend == "postgres" || a.backend == "both" {
            let (url, schema) = match fleetdb_postgres::testing::create_schema(&a.pg_url).await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("cannot create a PostgreSQL schema: {e}");
                    return 1;
                }
            };
            drop(Store::open(&url).await.expect("create")); // migrate
            let t = Instant::now();
            if let Err(e) = load_postgres(&url, &plan).await {
                eprintln!("loading PostgreSQL failed: {e}");
                return 1;
            }
            eprintln!("postgres: loaded in {:.1} s", t.elapsed().as_secs_f64());
            println!(
                "{}",
                measure(
                    "postgres",
                    &url,
                    &plan,
                    Duration::from_millis(a.sweep_target_ms)
                )
                .await
            );
            let _ = fleetdb_postgres::testing::drop_schema(&a.pg_url, &schema).await;
        }
        0
    })
}
