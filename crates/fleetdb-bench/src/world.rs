//! `fleetdb-bench world`: the World issue's figures in the peers' shapes (etcd 3.4 in
//! ../shared/bench/peers/RESULTS.md):
//!
//! - watch fan-out: W watchers on one key prefix, one writer at R puts/s for S seconds; every
//!   event must reach every watcher; put→receive latency p50/p99. On PostgreSQL the writer uses a
//!   SECOND store (its own pool and watch hub), so watchers are woken by NOTIFY exactly as in
//!   another process.
//! - memory per idle watcher (RSS growth over 10,000 idle watches).
//! - KV set throughput with 1 client (sequential) and 64 concurrent clients, durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use fleetdb::{OpenOptions, Store, WatchEvent, WatchRequest, WatchScope};

#[derive(Debug, Clone, Args)]
pub struct WorldArgs {
    /// sqlite, postgres or both.
    #[arg(long, default_value = "both")]
    pub backend: String,
    /// PostgreSQL server (a fresh schema is created and dropped).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub pg_url: String,
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Writer puts per second during the fan-out.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Idle watchers for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    pub idle_watchers: usize,
    /// Seconds of each KV throughput run.
    #[arg(long, default_value_t = 10)]
    pub kv_secs: u64,
    #[arg(long, default_value_t = 64)]
    pub kv_clients: usize,
    /// PostgreSQL connections per store (default: the store's own default, 16). The kv run's 64
    /// clients share them, as an application's tasks share one store.
    #[arg(long)]
    pub pg_pool: Option<usize>,
    /// Measurements to run, comma separated: fanout, idle, kv.
    #[arg(long, default_value = "fanout,idle,kv", value_delimiter = ',')]
    pub only: Vec<String>,
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

async fn open(url: &str, pool: Option<usize>) -> Store {
    let defaults = OpenOptions::default();
    Store::open_with(
        url,
        OpenOptions {
            postgres_pool_size_max: pool.unwrap_or(defaults.postgres_pool_size_max),
            ..defaults
        },
    )
    .await
    .expect("open store")
}

async fn fanout(watch_store: &Store, write_store: &Store, a: &WorldArgs) -> String {
    let delivered = Arc::new(AtomicU64::new(0));
    let expected = a.rate * a.secs;
    let mut tasks = Vec::new();
    for _ in 0..a.watchers {
        let mut w = watch_store
            .watch(
                WatchRequest::new(WatchScope::Kv {
                    prefix: "fan/".into(),
                })
                .buffer(4096),
            )
            .await
            .expect("watch");
        let delivered = delivered.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(expected as usize);
            let mut n = 0;
            while n < expected {
                match w.next_timeout(Duration::from_secs(30)).await {
                    Some(Ok(WatchEvent::Change(c))) => {
                        let sent: u64 = c
                            .new_value
                            .as_ref()
                            .and_then(|v| v["value"].as_str())
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        lat.push(micros_now().saturating_sub(sent));
                        delivered.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        eprintln!("watcher ended: {e}");
                        break;
                    }
                    None => break,
                }
            }
            lat
        }));
    }
    let start = Instant::now();
    let interval = Duration::from_micros(1_000_000 / a.rate.max(1));
    let mut next = tokio::time::Instant::now();
    for i in 0..expected {
        next += interval;
        tokio::time::sleep_until(next).await;
        write_store
            .kv_set(&format!("fan/{}", i % 100), &micros_now().to_string())
            .await
            .expect("put");
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap_or_default());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let got = delivered.load(Ordering::Relaxed);
    format!(
        "| watch fan-out | {} watchers, {}/s × {} s | {} of {} events ({:.0} events/s) | p50 {:.1} ms, p99 {:.1} ms |",
        a.watchers,
        a.rate,
        a.secs,
        got,
        expected * a.watchers as u64,
        got as f64 / secs,
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    )
}

async fn idle_memory(store: &Store, n: usize) -> String {
    let before = rss_bytes();
    let mut watches = Vec::with_capacity(n);
    for _ in 0..n {
        watches.push(
            store
                .watch(
                    WatchRequest::new(WatchScope::Kv {
                        prefix: "idle/".into(),
                    })
                    .buffer(16),
                )
                .await
                .expect("watch"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_bytes();
    let per = after.saturating_sub(before) as f64 / n as f64;
    drop(watches);
    format!(
        "| idle watchers | {n} | RSS +{:.1} MiB | {per:.0} B per watcher |",
        (after - before.min(after)) as f64 / (1 << 20) as f64
    )
}

async fn kv_throughput(store: &Store, clients: usize, secs: u64) -> String {
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let value = "v".repeat(256);
            let mut i = 0u64;
            while Instant::now() < stop {
                let t = Instant::now();
                // Distinct values: every set is a real write.
                if s.kv_set(&format!("kv/{c}/{}", i % 1000), &format!("{value}{i}"))
                    .await
                    .is_ok()
                {
                    lat.push(t.elapsed().as_micros() as u64);
                }
                i += 1;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap_or_default());
    }
    lat.sort_unstable();
    format!(
        "| kv set 256 B | {clients} client(s) | {:.0} sets/s | p50 {:.2} ms, p99 {:.2} ms |",
        lat.len() as f64 / secs as f64,
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    )
}

async fn run_backend(name: &str, url: &str, a: &WorldArgs) -> Vec<String> {
    let mut rows = vec![format!("| **{name}** | | | |")];
    let store = open(url, a.pg_pool).await;
    let writer = if name == "postgres" {
        open(url, a.pg_pool).await // a second store: wake-ups cross it by NOTIFY, as between processes
    } else {
        store.clone()
    };
    let runs = |m: &str| a.only.iter().any(|o| o == m);
    if runs("fanout") {
        rows.push(fanout(&store, &writer, a).await);
    }
    if runs("idle") {
        rows.push(idle_memory(&store, a.idle_watchers).await);
    }
    if runs("kv") {
        rows.push(kv_throughput(&store, 1, a.kv_secs).await);
        rows.push(kv_throughput(&store, a.kv_clients, a.kv_secs).await);
    }
    rows
}

pub fn run_world_main(a: WorldArgs) -> i32 {
    let rt = match crate::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    rt.block_on(async {
        println!(
            "PostgreSQL connections per store: {}\n",
            a.pg_pool
                .map_or_else(|| "16 (the store's default)".to_string(), |n| n.to_string())
        );
        println!("| measurement | shape | result | latency |\n|---|---|---|---|");
        if a.backend == "sqlite" || a.backend == "both" {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("world.sqlite").display());
            for r in run_backend("sqlite", &url, &a).await {
                println!("{r}");
            }
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
            for r in run_backend("postgres", &url, &a).await {
                println!("{r}");
            }
            let _ = fleetdb_postgres::testing::drop_schema(&a.pg_url, &schema).await;
        }
        0
    })
}
