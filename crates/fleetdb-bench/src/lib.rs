//! FleetDB benchmarks: FleetDB next to the raw engine doing the equivalent work with the same
//! driver, measured in the same run.
//!
//! `tagset`: single-tag-set transactions per second at 1 and N concurrent writers.
//!
//! `work`: the work-queue benchmarks in the peers' shapes (one-at-a-time, burn-down, 10,000
//! live sessions); see [`work`].
//!
//! - raw SQLite: rusqlite, WAL, `synchronous=FULL`, one OS thread and one connection per writer,
//!   each op `BEGIN IMMEDIATE; INSERT .. ON CONFLICT DO UPDATE ..; COMMIT` on a random key of a
//!   table shaped like FleetDB's `tags` table.
//! - raw PostgreSQL: tokio-postgres, one connection per writer, each op the same upsert as one
//!   prepared statement in autocommit (its own implicit transaction).
//! - FleetDB: `Store::tag_set(key, "hb", {"seq": n})` (never a no-op) from N tokio tasks sharing one
//!   `Store`, on a multi-thread runtime with 2 workers; SQLite with `Durability::Full`.
//!
//! Every op is an UPDATE of an existing row on both sides: the raw table is pre-filled with one
//! row per object, and FleetDB's objects are pre-created with their `hb` tag.

pub mod gc;
pub mod work;
pub mod world;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use fleetdb::{Labels, ObjectKey, OpenOptions, Store};
use serde_json::json;

/// The PostgreSQL server used when neither `--postgres-url` nor the environment names one.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The schema of the raw PostgreSQL table (dropped at the end of the run).
pub const RAW_PG_SCHEMA: &str = "fleetdb_bench_raw";
/// The tag every op sets.
const TAG: &str = "hb";
/// Objects created per transaction while pre-filling FleetDB.
const PREFILL_CHUNK: usize = 1000;
/// Pre-fill transactions in flight at once (on SQLite they share group commits; on PostgreSQL
/// 4 at a time is ~2.3x faster than 1 at a time).
const PREFILL_CONCURRENCY: usize = 4;
/// Attempts at one pre-fill transaction (each `Store::txn` retries conflicts on its own already).
const PREFILL_CHUNK_ATTEMPTS: usize = 3;
/// Distinct error messages kept per measurement.
const ERROR_SAMPLES_MAX: usize = 5;

#[derive(Debug, Parser)]
#[command(
    name = "fleetdb-bench",
    about = "FleetDB benchmarks: FleetDB next to the raw engine, same driver, same run"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Single-tag-set transactions per second: raw engine vs FleetDB, 1 and N writers.
    Tagset(TagsetArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum BackendKind {
    Sqlite,
    Postgres,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Sqlite => "sqlite",
            BackendKind::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SqliteSync {
    Full,
    Normal,
}

impl SqliteSync {
    fn pragma(self) -> &'static str {
        match self {
            SqliteSync::Full => "FULL",
            SqliteSync::Normal => "NORMAL",
        }
    }
    fn durability(self) -> fleetdb::Durability {
        match self {
            SqliteSync::Full => fleetdb::Durability::Full,
            SqliteSync::Normal => fleetdb::Durability::Normal,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct TagsetArgs {
    /// Measured seconds per measurement (after the warm-up). `--secs 2` is a smoke run.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Warm-up seconds before each measurement (ops run but are not counted).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Pre-created rows / objects (`machine/m{i}`); each op picks one at random.
    #[arg(long, default_value_t = 100_000)]
    pub objects: usize,
    /// Concurrent writer counts, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub writers: Vec<usize>,
    /// Backends, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    pub backends: Vec<BackendKind>,
    /// PostgreSQL server (a fresh schema is created for each engine and dropped at the end).
    #[arg(long, env = "FLEETDB_BENCH_POSTGRES_URL", default_value = DEFAULT_POSTGRES_URL)]
    pub postgres_url: String,
    /// Folder for the SQLite files (removed at the end).
    #[arg(long, default_value = "/tmp/fleetdb-bench")]
    pub dir: PathBuf,
    /// FleetDB pre-fill transactions (of 1000 objects) in flight at once.
    #[arg(long, default_value_t = PREFILL_CONCURRENCY)]
    pub prefill_concurrency: usize,
    /// SQLite `synchronous` for BOTH the raw engine and FleetDB (`normal` = no fsync per commit;
    /// a diagnostic to separate fsync cost from CPU cost). The durable benchmark is `full`.
    #[arg(long, value_enum, default_value_t = SqliteSync::Full)]
    pub sqlite_synchronous: SqliteSync,
    /// Append JSON lines (machine facts, one line per measurement, the ratios) to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl Default for TagsetArgs {
    fn default() -> Self {
        match Cli::parse_from(["fleetdb-bench", "tagset"]).command {
            Command::Tagset(a) => a,
        }
    }
}

/// One measurement: one engine on one backend at one writer count.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub backend: BackendKind,
    /// `raw` or `fleetdb`.
    pub engine: &'static str,
    pub writers: usize,
    /// Ops completed inside the measured window.
    pub ops: u64,
    pub secs: f64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Failed ops (warm-up included).
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Anything else wrong (e.g. the row count check after the run).
    pub problems: Vec<String>,
    /// Facts worth knowing that are not problems (e.g. revision gaps on PostgreSQL).
    pub notes: Vec<String>,
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct Report {
    pub run_id: String,
    pub started_unix: u64,
    pub args: TagsetArgs,
    pub machine: BTreeMap<String, String>,
    pub measurements: Vec<Measurement>,
    /// Setup / teardown failures (a backend that could not run at all, a schema not dropped).
    pub failures: Vec<String>,
    /// Things that went wrong but did not stop the run (e.g. a pre-fill transaction tried again).
    pub notes: Vec<String>,
}

type BResult<T> = std::result::Result<T, String>;

/// Each op writes `{"seq": n}` with a fresh n, so that no write is ever a no-op.
static SEQ: AtomicU64 = AtomicU64::new(1);

fn next_value() -> String {
    format!("{{\"seq\":{}}}", SEQ.fetch_add(1, Ordering::Relaxed))
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// splitmix64: a small, fast, deterministic generator (one per writer).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % n as u64) as usize
    }
}

fn object_id(i: usize) -> String {
    format!("m{i}")
}

/// The warm-up end and the measurement end, shared by all writers of one measurement.
#[derive(Debug, Clone, Copy)]
struct Window {
    warm_end: Instant,
    end: Instant,
}

impl Window {
    fn start(args: &TagsetArgs) -> Window {
        let warm_end = Instant::now() + Duration::from_secs_f64(args.warmup_secs.max(0.0));
        Window {
            warm_end,
            end: warm_end + Duration::from_secs_f64(args.secs),
        }
    }
}

/// What one writer saw.
#[derive(Debug, Default)]
struct Recorder {
    /// Latencies (µs) of ops completed inside the window.
    lat_us: Vec<u32>,
    /// Successful ops over the whole run (warm-up and overrun included), for the row count check.
    ok_total: u64,
    errors: u64,
    /// Distinct error messages, each with how long its first occurrence took.
    samples: Vec<(String, Duration)>,
}

impl Recorder {
    fn record<E: std::fmt::Display>(&mut self, w: &Window, start: Instant, r: Result<(), E>) {
        let done = Instant::now();
        match r {
            Ok(()) => {
                self.ok_total += 1;
                if done >= w.warm_end && done < w.end {
                    let us = done.duration_since(start).as_micros();
                    self.lat_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            Err(e) => {
                self.errors += 1;
                let msg = e.to_string();
                if self.samples.len() < ERROR_SAMPLES_MAX
                    && !self.samples.iter().any(|(m, _)| *m == msg)
                {
                    self.samples.push((msg, done.duration_since(start)));
                }
            }
        }
    }
}

fn measurement(
    backend: BackendKind,
    engine: &'static str,
    writers: usize,
    secs: f64,
    recs: Vec<Recorder>,
) -> (Measurement, u64) {
    let mut lat: Vec<u32> = Vec::new();
    let mut errors = 0;
    let mut samples: Vec<String> = Vec::new();
    let mut ok_total = 0;
    for r in recs {
        lat.extend_from_slice(&r.lat_us);
        errors += r.errors;
        ok_total += r.ok_total;
        for (msg, took) in r.samples {
            let text = format!("{msg} (first one after {:.1} ms)", took.as_secs_f64() * 1e3);
            if samples.len() < ERROR_SAMPLES_MAX && !samples.iter().any(|s| s.starts_with(&msg)) {
                samples.push(text);
            }
        }
    }
    lat.sort_unstable();
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((q * lat.len() as f64) as usize).min(lat.len() - 1);
        f64::from(lat[i])
    };
    let ops = lat.len() as u64;
    (
        Measurement {
            backend,
            engine,
            writers,
            ops,
            secs,
            ops_per_sec: ops as f64 / secs,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            errors,
            error_samples: samples,
            problems: Vec::new(),
            notes: Vec::new(),
        },
        ok_total,
    )
}

// ---------------------------------------------------------------------------------------------
// Entry points

/// Run the `tagset` benchmark, print the markdown report to stdout, append JSON lines if asked.
/// Returns the process exit code: 0 all good, 2 a FleetDB op failed or a check did not hold, 1 a
/// backend could not be measured at all. Errors of the raw engine (e.g. SQLite's `database is
/// locked` when one of 8 raw connections starves past busy_timeout) are reported, not fatal: they
/// are a property of the engine that FleetDB is compared with.
pub fn run_tagset_main(args: TagsetArgs) -> i32 {
    let report = run_tagset(args);
    print!("{}", render_markdown(&report));
    if let Some(path) = &report.args.json {
        if let Err(e) = append_json(&report, path) {
            eprintln!("cannot write {}: {e}", path.display());
            return 1;
        }
    }
    if !report.failures.is_empty() {
        1
    } else if report
        .measurements
        .iter()
        .any(|m| !m.problems.is_empty() || (m.engine == "fleetdb" && m.errors > 0))
    {
        2
    } else {
        0
    }
}

/// Run the `tagset` benchmark and return what was measured.
pub fn run_tagset(args: TagsetArgs) -> Report {
    let mut report = Report {
        run_id: uuid::Uuid::new_v4().to_string(),
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        machine: machine_facts(&args),
        args,
        measurements: Vec::new(),
        failures: Vec::new(),
        notes: Vec::new(),
    };
    let args = report.args.clone();
    let mut writers = args.writers.clone();
    writers.retain(|w| *w > 0);
    writers.dedup();
    if writers.is_empty() || args.secs <= 0.0 || args.objects == 0 {
        report
            .failures
            .push("--writers, --secs and --objects must be positive".into());
        return report;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            report.failures.push(e);
            return report;
        }
    };
    let mut backends = args.backends.clone();
    backends.dedup();
    for backend in backends {
        eprintln!("== {} ==", backend.name());
        let r = match backend {
            BackendKind::Sqlite => sqlite::run(&rt, &args, &writers, &mut report),
            BackendKind::Postgres => postgres_run(&rt, &args, &writers, &mut report),
        };
        if let Err(e) = r {
            eprintln!("{} failed: {e}", backend.name());
            report.failures.push(format!("{}: {e}", backend.name()));
        }
    }
    report.machine.insert("loadavg_end".into(), loadavg());
    report
}

#[cfg(feature = "postgres")]
fn postgres_run(
    rt: &tokio::runtime::Runtime,
    args: &TagsetArgs,
    writers: &[usize],
    report: &mut Report,
) -> BResult<()> {
    rt.block_on(postgres::run(args, writers, report))
}

#[cfg(not(feature = "postgres"))]
fn postgres_run(
    _rt: &tokio::runtime::Runtime,
    _args: &TagsetArgs,
    _writers: &[usize],
    _report: &mut Report,
) -> BResult<()> {
    Err("this build of fleetdb-bench was made without the `postgres` feature".into())
}

fn log_measurement(m: &Measurement) {
    eprintln!(
        "  {:<8} {:<7} writers={:<3} ops={:<8} ops/s={:<10.0} p50={:.0}us p99={:.0}us errors={}",
        m.backend.name(),
        m.engine,
        m.writers,
        m.ops,
        m.ops_per_sec,
        m.p50_us,
        m.p99_us,
        m.errors
    );
    for s in &m.error_samples {
        eprintln!("    error: {s}");
    }
    for p in &m.problems {
        eprintln!("    problem: {p}");
    }
    for n in &m.notes {
        eprintln!("    note: {n}");
    }
}

// ---------------------------------------------------------------------------------------------
// FleetDB (either backend)

fn object_keys(objects: usize) -> BResult<Arc<Vec<ObjectKey>>> {
    (0..objects)
        .map(|i| ObjectKey::new(fleetdb::DEFAULT_NAMESPACE, "machine", object_id(i)))
        .collect::<fleetdb::Result<Vec<_>>>()
        .map(Arc::new)
        .map_err(|e| format!("building object keys: {e}"))
}

/// What [`fleetdb_prefill`] writes per object.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// The object and its `hb` tag.
    Create,
    /// A new value of its `hb` tag (bulk tag sets of existing objects).
    Retag,
    /// Delete the object (and its tag): bulk deletes, after the measurements.
    Delete,
}

/// Create every object with its `hb` tag (or set the tag again), in transactions of [`PREFILL_CHUNK`] objects,
/// `concurrency` at a time.
///
/// A chunk whose transaction fails is tried again (up to [`PREFILL_CHUNK_ATTEMPTS`] times; it is
/// atomic, so a failed attempt wrote nothing); every such failure is returned as a note, since it
/// is a FleetDB-side error worth knowing about.
async fn fleetdb_prefill(
    store: &Store,
    keys: &Arc<Vec<ObjectKey>>,
    concurrency: usize,
    fill: Fill,
) -> BResult<Vec<String>> {
    let started = Instant::now();
    let chunks: Vec<Arc<[ObjectKey]>> = keys.chunks(PREFILL_CHUNK).map(Arc::from).collect();
    let mut pending = chunks.into_iter();
    let mut in_flight = tokio::task::JoinSet::new();
    let mut notes = Vec::new();
    loop {
        while in_flight.len() < concurrency.max(1) {
            let Some(chunk) = pending.next() else { break };
            let store = store.clone();
            in_flight.spawn(async move {
                let mut failures = Vec::new();
                for _ in 0..PREFILL_CHUNK_ATTEMPTS {
                    let t = Instant::now();
                    let r = store
                        .txn(|tx| {
                            let chunk = chunk.clone();
                            async move {
                                for k in chunk.iter() {
                                    match fill {
                                        Fill::Create => {
                                            tx.object_put(k, Labels::new())?;
                                            tx.tag_set(k, TAG, &json!({"seq": 0}))?;
                                        }
                                        Fill::Retag => tx.tag_set(k, TAG, &json!({"seq": -1}))?,
                                        Fill::Delete => tx.object_delete(k)?,
                                    }
                                }
                                Ok(())
                            }
                        })
                        .await;
                    match r {
                        Ok(()) => return Ok(failures),
                        Err(e) => failures.push(format!(
                            "a {}-object pre-fill transaction failed after {:.1}s: {e}",
                            chunk.len(),
                            t.elapsed().as_secs_f64()
                        )),
                    }
                }
                Err(failures)
            });
        }
        match in_flight.join_next().await {
            None => break,
            Some(Ok(Ok(failures))) => {
                for f in failures {
                    eprintln!("  fleetdb: {f} (tried again)");
                    notes.push(format!("{f} (tried again, then succeeded)"));
                }
            }
            Some(Ok(Err(failures))) => {
                return Err(format!(
                    "pre-filling FleetDB failed {PREFILL_CHUNK_ATTEMPTS} times: {}",
                    failures.join("; ")
                ))
            }
            Some(Err(e)) => return Err(format!("pre-filling FleetDB: task failed: {e}")),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let what = match fill {
        Fill::Create => "pre-created {} objects with their tag",
        Fill::Retag => "set the tag of all {} objects again",
        Fill::Delete => "deleted all {} objects (and their tags)",
    }
    .replace("{}", &keys.len().to_string());
    eprintln!(
        "  fleetdb: {what} in {secs:.1}s = {:.0}/s ({PREFILL_CHUNK} per txn, {concurrency} txns at a time)",
        keys.len() as f64 / secs.max(1e-9)
    );
    Ok(notes)
}

async fn fleetdb_measure(
    backend: BackendKind,
    store: &Store,
    keys: &Arc<Vec<ObjectKey>>,
    writers: usize,
    args: &TagsetArgs,
) -> BResult<Measurement> {
    let rev_before = store
        .revision()
        .await
        .map_err(|e| format!("reading the revision: {e}"))?
        .current
        .0;
    let window = Window::start(args);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let store = store.clone();
        let keys = keys.clone();
        tasks.spawn(async move {
            let mut rng = Rng::new(0xF1EE7 + w as u64);
            let mut rec = Recorder::default();
            let mut no_ops = 0u64;
            while Instant::now() < window.end {
                let key = &keys[rng.below(keys.len())];
                let value = json!({ "seq": SEQ.fetch_add(1, Ordering::Relaxed) });
                let start = Instant::now();
                let r = store.tag_set(key, TAG, &value).await;
                let r = match r {
                    Ok(written) => {
                        if !written.changed {
                            no_ops += 1;
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                rec.record(&window, start, r);
            }
            (rec, no_ops)
        });
    }
    let mut recs = Vec::new();
    let mut no_ops = 0;
    while let Some(r) = tasks.join_next().await {
        let (rec, n) = r.map_err(|e| format!("a FleetDB writer task failed: {e}"))?;
        recs.push(rec);
        no_ops += n;
    }
    let (mut m, ok_total) = measurement(backend, "fleetdb", writers, args.secs, recs);
    if no_ops > 0 {
        m.problems
            .push(format!("{no_ops} tag_set calls reported changed=false"));
    }
    // Every successful tag_set must have left exactly one change-log entry (a tag put).
    let rev_after = store
        .revision()
        .await
        .map_err(|e| format!("reading the revision: {e}"))?
        .current
        .0;
    let mut after = fleetdb::Revision(rev_before);
    let mut tag_puts = 0u64;
    let mut other = 0u64;
    loop {
        let page = store
            .changes(
                after,
                &fleetdb::ChangeFilter::default(),
                fleetdb::CHANGES_PAGE_MAX,
            )
            .await
            .map_err(|e| format!("reading the change log: {e}"))?;
        let Some(last) = page.last() else { break };
        after = last.revision;
        for c in &page {
            if c.entity == fleetdb::Entity::Tag && c.op == fleetdb::ChangeOp::Put && c.name == TAG {
                tag_puts += 1;
            } else {
                other += 1;
            }
        }
    }
    if tag_puts != ok_total || other != 0 {
        m.problems.push(format!(
            "the change log holds {tag_puts} tag puts (and {other} other entries) for {ok_total} \
             successful tag_set calls"
        ));
    }
    let gaps = (rev_after - rev_before) as u64 - tag_puts.min((rev_after - rev_before) as u64);
    if gaps > 0 {
        // PostgreSQL revisions come from a sequence: a retried transaction leaves a gap.
        m.notes.push(format!(
            "revision advanced by {} for {tag_puts} changes ({gaps} gaps: retried or failed commits)",
            rev_after - rev_before
        ));
    }
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// SQLite

mod sqlite {
    use super::*;
    use rusqlite::{params, Connection};

    const CREATE: &str = "CREATE TABLE t (
        ns TEXT NOT NULL, kind TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL,
        value TEXT NOT NULL, updated_at INTEGER NOT NULL, revision INTEGER NOT NULL,
        PRIMARY KEY (ns, kind, id, name)) WITHOUT ROWID";

    const UPSERT: &str = "INSERT INTO t (ns, kind, id, name, value, updated_at, revision)
        VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)
        ON CONFLICT (ns, kind, id, name) DO UPDATE
        SET value = excluded.value, updated_at = excluded.updated_at, revision = t.revision + 1";

    fn remove_db(path: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }

    fn open(path: &Path, sync: SqliteSync) -> rusqlite::Result<Connection> {
        let c = Connection::open(path)?;
        // journal_mode is stored in the file; synchronous and busy_timeout are per connection.
        let mode: String = c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                Some(format!("SQLite refused WAL (got {mode})")),
            ));
        }
        c.execute_batch(&format!("PRAGMA synchronous={}", sync.pragma()))?;
        c.busy_timeout(Duration::from_millis(5000))?;
        Ok(c)
    }

    fn raw_prefill(path: &Path, objects: usize) -> rusqlite::Result<()> {
        remove_db(path);
        let mut c = open(path, SqliteSync::Full)?;
        c.execute_batch(CREATE)?;
        let tx = c.transaction()?;
        {
            let mut s = tx.prepare(UPSERT)?;
            let now = now_micros();
            for i in 0..objects {
                s.execute(params![
                    fleetdb::DEFAULT_NAMESPACE,
                    "machine",
                    object_id(i),
                    TAG,
                    "{\"seq\":0}",
                    now
                ])?;
            }
        }
        tx.commit()?;
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Sum of revisions minus rows = upserts that updated a row since the pre-fill.
    fn raw_updates(path: &Path) -> rusqlite::Result<i64> {
        let c = open(path, SqliteSync::Full)?;
        c.query_row("SELECT sum(revision) - count(*) FROM t", [], |r| r.get(0))
    }

    fn raw_op(c: &Connection, id: &str) -> Result<(), String> {
        c.prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut s| s.execute([]))
            .map_err(|e| format!("BEGIN IMMEDIATE: {e}"))?;
        let r = c.prepare_cached(UPSERT).and_then(|mut s| {
            s.execute(params![
                fleetdb::DEFAULT_NAMESPACE,
                "machine",
                id,
                TAG,
                next_value(),
                now_micros()
            ])
        });
        let r = r.map_err(|e| format!("upsert: {e}")).and_then(|_| {
            c.prepare_cached("COMMIT")
                .and_then(|mut s| s.execute([]))
                .map_err(|e| format!("COMMIT: {e}"))
        });
        if r.is_err() && !c.is_autocommit() {
            let _ = c.execute_batch("ROLLBACK");
        }
        r.map(|_| ())
    }

    fn raw_measure(
        path: &Path,
        objects: usize,
        writers: usize,
        args: &TagsetArgs,
    ) -> BResult<Measurement> {
        let before = raw_updates(path).map_err(|e| format!("raw SQLite: {e}"))?;
        let conns = (0..writers)
            .map(|_| open(path, args.sqlite_synchronous))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| format!("raw SQLite: opening connections: {e}"))?;
        let window = Window::start(args);
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(w, c)| {
                std::thread::spawn(move || {
                    let mut rng = Rng::new(0x5EED + w as u64);
                    let mut rec = Recorder::default();
                    while Instant::now() < window.end {
                        let id = object_id(rng.below(objects));
                        let start = Instant::now();
                        let r = raw_op(&c, &id);
                        rec.record(&window, start, r);
                    }
                    rec
                })
            })
            .collect();
        let recs = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a raw SQLite writer panicked".to_string())
            })
            .collect::<BResult<Vec<_>>>()?;
        let (mut m, ok_total) = measurement(BackendKind::Sqlite, "raw", writers, args.secs, recs);
        let after = raw_updates(path).map_err(|e| format!("raw SQLite: {e}"))?;
        if (after - before) as u64 != ok_total {
            m.problems.push(format!(
                "the table shows {} updates for {ok_total} successful upserts",
                after - before
            ));
        }
        Ok(m)
    }

    pub(crate) fn run(
        rt: &tokio::runtime::Runtime,
        args: &TagsetArgs,
        writers: &[usize],
        report: &mut Report,
    ) -> BResult<()> {
        std::fs::create_dir_all(&args.dir)
            .map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
        let dir = std::fs::canonicalize(&args.dir)
            .map_err(|e| format!("cannot resolve {}: {e}", args.dir.display()))?;
        let tag = std::process::id();
        let raw_path = dir.join(format!("raw-{tag}.sqlite"));
        let fleet_path = dir.join(format!("fleetdb-{tag}.sqlite"));
        let result = run_inner(rt, args, writers, report, &raw_path, &fleet_path);
        remove_db(&raw_path);
        remove_db(&fleet_path);
        result
    }

    fn run_inner(
        rt: &tokio::runtime::Runtime,
        args: &TagsetArgs,
        writers: &[usize],
        report: &mut Report,
        raw_path: &Path,
        fleet_path: &Path,
    ) -> BResult<()> {
        let started = Instant::now();
        raw_prefill(raw_path, args.objects).map_err(|e| format!("raw SQLite pre-fill: {e}"))?;
        eprintln!(
            "  raw: pre-filled {} rows in {:.1}s ({})",
            args.objects,
            started.elapsed().as_secs_f64(),
            raw_path.display()
        );
        remove_db(fleet_path);
        let url = format!("sqlite://{}", fleet_path.display());
        let keys = object_keys(args.objects)?;
        let options = OpenOptions {
            durability: args.sqlite_synchronous.durability(),
            ..OpenOptions::default()
        };
        let (store, notes) = rt.block_on(async {
            let store = Store::open_with(&url, options)
                .await
                .map_err(|e| format!("opening FleetDB at {url}: {e}"))?;
            let mut notes =
                fleetdb_prefill(&store, &keys, args.prefill_concurrency, Fill::Create).await?;
            notes.extend(
                fleetdb_prefill(&store, &keys, args.prefill_concurrency, Fill::Retag).await?,
            );
            Ok::<_, String>((store, notes))
        })?;
        report
            .notes
            .extend(notes.into_iter().map(|n| format!("sqlite: {n}")));
        for &w in writers {
            let m = raw_measure(raw_path, args.objects, w, args)?;
            log_measurement(&m);
            report.measurements.push(m);
            let m = rt.block_on(fleetdb_measure(BackendKind::Sqlite, &store, &keys, w, args))?;
            log_measurement(&m);
            report.measurements.push(m);
        }
        let notes = rt.block_on(fleetdb_prefill(
            &store,
            &keys,
            args.prefill_concurrency,
            Fill::Delete,
        ))?;
        report
            .notes
            .extend(notes.into_iter().map(|n| format!("sqlite: {n}")));
        drop(store);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use tokio_postgres::{Client, NoTls};

    async fn connect(url: &str) -> BResult<Client> {
        let (client, conn) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|e| format!("connecting to PostgreSQL: {}", chain(&e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    fn chain(e: &tokio_postgres::Error) -> String {
        match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        }
    }

    fn upsert() -> String {
        format!(
            "INSERT INTO {RAW_PG_SCHEMA}.t (ns, kind, id, name, value, updated_at, revision)
             VALUES ($1, $2, $3, $4, $5, $6, 1)
             ON CONFLICT (ns, kind, id, name) DO UPDATE
             SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at,
                 revision = t.revision + 1"
        )
    }

    async fn raw_prefill(c: &Client, objects: usize) -> BResult<()> {
        let s = RAW_PG_SCHEMA;
        // Same shape as FleetDB's `tags` table.
        c.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {s} CASCADE;
             CREATE SCHEMA {s};
             CREATE TABLE {s}.t (
                ns   TEXT COLLATE \"C\" NOT NULL, kind TEXT COLLATE \"C\" NOT NULL,
                id   TEXT COLLATE \"C\" NOT NULL, name TEXT COLLATE \"C\" NOT NULL,
                value TEXT NOT NULL, updated_at BIGINT NOT NULL, revision BIGINT NOT NULL,
                PRIMARY KEY (ns, kind, id, name));
             INSERT INTO {s}.t SELECT '{ns}', 'machine', 'm' || i, '{TAG}', '{{\"seq\":0}}', {now}, 1
               FROM generate_series(0, {last}) AS i;",
            ns = fleetdb::DEFAULT_NAMESPACE,
            now = now_micros(),
            last = objects as i64 - 1,
        ))
        .await
        .map_err(|e| format!("raw PostgreSQL pre-fill: {}", chain(&e)))?;
        // VACUUM cannot run inside the implicit transaction of a multi-statement query.
        c.batch_execute(&format!("VACUUM ANALYZE {s}.t"))
            .await
            .map_err(|e| format!("raw PostgreSQL vacuum: {}", chain(&e)))
    }

    async fn raw_updates(c: &Client) -> BResult<i64> {
        c.query_one(
            &format!("SELECT (sum(revision) - count(*))::bigint FROM {RAW_PG_SCHEMA}.t"),
            &[],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| format!("raw PostgreSQL: {}", chain(&e)))
    }

    /// Like pgbench: start every measurement right after a checkpoint, so that both engines pay
    /// the same full-page writes. Needs a superuser; skipped (and noted) otherwise.
    async fn checkpoint(c: &Client) {
        if let Err(e) = c.batch_execute("CHECKPOINT").await {
            eprintln!("  (CHECKPOINT failed, continuing: {})", chain(&e));
        }
    }

    async fn raw_measure(
        admin: &Client,
        url: &str,
        objects: usize,
        writers: usize,
        args: &TagsetArgs,
    ) -> BResult<Measurement> {
        let before = raw_updates(admin).await?;
        let mut clients = Vec::new();
        for _ in 0..writers {
            let c = connect(url).await?;
            let stmt = c
                .prepare(&upsert())
                .await
                .map_err(|e| format!("raw PostgreSQL prepare: {}", chain(&e)))?;
            clients.push((c, stmt));
        }
        checkpoint(admin).await;
        let window = Window::start(args);
        let mut tasks = tokio::task::JoinSet::new();
        for (w, (c, stmt)) in clients.into_iter().enumerate() {
            tasks.spawn(async move {
                let mut rng = Rng::new(0x5EED + w as u64);
                let mut rec = Recorder::default();
                while Instant::now() < window.end {
                    let id = object_id(rng.below(objects));
                    let value = next_value();
                    let now = now_micros();
                    let start = Instant::now();
                    let r = c
                        .execute(
                            &stmt,
                            &[
                                &fleetdb::DEFAULT_NAMESPACE,
                                &"machine",
                                &id,
                                &TAG,
                                &value,
                                &now,
                            ],
                        )
                        .await
                        .map_err(|e| chain(&e))
                        .and_then(|n| {
                            if n == 1 {
                                Ok(())
                            } else {
                                Err(format!("upsert touched {n} rows"))
                            }
                        });
                    rec.record(&window, start, r);
                }
                rec
            });
        }
        let mut recs = Vec::new();
        while let Some(r) = tasks.join_next().await {
            recs.push(r.map_err(|e| format!("a raw PostgreSQL writer task failed: {e}"))?);
        }
        let (mut m, ok_total) = measurement(BackendKind::Postgres, "raw", writers, args.secs, recs);
        let after = raw_updates(admin).await?;
        if (after - before) as u64 != ok_total {
            m.problems.push(format!(
                "the table shows {} updates for {ok_total} successful upserts",
                after - before
            ));
        }
        Ok(m)
    }

    pub(crate) async fn run(
        args: &TagsetArgs,
        writers: &[usize],
        report: &mut Report,
    ) -> BResult<()> {
        let base = args.postgres_url.as_str();
        let admin = connect(base).await?;
        for (k, q) in [
            ("postgres_server_version", "SHOW server_version"),
            ("postgres_synchronous_commit", "SHOW synchronous_commit"),
            ("postgres_fsync", "SHOW fsync"),
            ("postgres_wal_sync_method", "SHOW wal_sync_method"),
            ("postgres_full_page_writes", "SHOW full_page_writes"),
            ("postgres_commit_delay", "SHOW commit_delay"),
            ("postgres_shared_buffers", "SHOW shared_buffers"),
        ] {
            let v = match admin.query_one(q, &[]).await {
                Ok(r) => r.get::<_, String>(0),
                Err(e) => format!("? ({})", chain(&e)),
            };
            report.machine.insert(k.into(), v);
        }

        // FleetDB gets a fresh schema; the raw table lives in RAW_PG_SCHEMA.
        let (fleet_url, fleet_schema) = fleetdb_postgres::testing::create_schema(base)
            .await
            .map_err(|e| format!("creating the FleetDB schema: {e}"))?;
        eprintln!("  fleetdb: schema {fleet_schema}");
        let result = run_inner(args, writers, report, &admin, base, &fleet_url).await;
        let mut cleanup = Vec::new();
        if let Err(e) = admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {RAW_PG_SCHEMA} CASCADE"))
            .await
        {
            cleanup.push(format!("dropping schema {RAW_PG_SCHEMA}: {}", chain(&e)));
        }
        if let Err(e) = fleetdb_postgres::testing::drop_schema(base, &fleet_schema).await {
            cleanup.push(e);
        }
        match (result, cleanup.is_empty()) {
            (Err(e), _) => Err(if cleanup.is_empty() {
                e
            } else {
                format!("{e}; and then {}", cleanup.join("; "))
            }),
            (Ok(()), true) => Ok(()),
            (Ok(()), false) => Err(cleanup.join("; ")),
        }
    }

    async fn run_inner(
        args: &TagsetArgs,
        writers: &[usize],
        report: &mut Report,
        admin: &Client,
        base: &str,
        fleet_url: &str,
    ) -> BResult<()> {
        let started = Instant::now();
        raw_prefill(admin, args.objects).await?;
        eprintln!(
            "  raw: pre-filled {} rows in {:.1}s (schema {RAW_PG_SCHEMA})",
            args.objects,
            started.elapsed().as_secs_f64()
        );
        let keys = object_keys(args.objects)?;
        let max_writers = writers.iter().copied().max().unwrap_or(1);
        let options = OpenOptions {
            postgres_pool_size_max: OpenOptions::default()
                .postgres_pool_size_max
                .max(max_writers),
            ..OpenOptions::default()
        };
        let store = Store::open_with(fleet_url, options)
            .await
            .map_err(|e| format!("opening FleetDB on PostgreSQL: {e}"))?;
        let mut notes =
            fleetdb_prefill(&store, &keys, args.prefill_concurrency, Fill::Create).await?;
        notes.extend(fleetdb_prefill(&store, &keys, args.prefill_concurrency, Fill::Retag).await?);
        report
            .notes
            .extend(notes.into_iter().map(|n| format!("postgres: {n}")));
        // Vacuum the freshly filled FleetDB tables too (only those: a bare VACUUM would walk the
        // whole database), so that both sides start from the same state.
        let c = connect(fleet_url).await?;
        for table in ["objects", "tags", "changes"] {
            c.batch_execute(&format!("VACUUM ANALYZE {table}"))
                .await
                .map_err(|e| format!("vacuuming FleetDB's {table}: {}", chain(&e)))?;
        }
        drop(c);
        for &w in writers {
            let m = raw_measure(admin, base, args.objects, w, args).await?;
            log_measurement(&m);
            report.measurements.push(m);
            checkpoint(admin).await;
            let m = fleetdb_measure(BackendKind::Postgres, &store, &keys, w, args).await?;
            log_measurement(&m);
            report.measurements.push(m);
        }
        let notes = fleetdb_prefill(&store, &keys, args.prefill_concurrency, Fill::Delete).await?;
        report
            .notes
            .extend(notes.into_iter().map(|n| format!("postgres: {n}")));
        drop(store);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Machine facts

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn loadavg() -> String {
    read_trim("/proc/loadavg").unwrap_or_else(|| "?".into())
}

fn machine_facts(args: &TagsetArgs) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "nproc".into(),
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into()),
    );
    if let Some(cpu) = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    }) {
        m.insert("cpu".into(), cpu);
    }
    if let Some(k) = read_trim("/proc/sys/kernel/osrelease") {
        m.insert("kernel".into(), k);
    }
    if let Some(mem) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal"))
            .map(|l| l.trim_start_matches("MemTotal:").trim().to_string())
    }) {
        m.insert("mem_total".into(), mem);
    }
    m.insert("loadavg_start".into(), loadavg());
    m.insert("sqlite_version".into(), rusqlite::version().to_string());
    m.insert(
        "sqlite_settings".into(),
        match args.sqlite_synchronous {
            SqliteSync::Full => "WAL, synchronous=FULL (raw and FleetDB Durability::Full)".into(),
            SqliteSync::Normal => {
                "WAL, synchronous=NORMAL (raw and FleetDB Durability::Normal): NOT durable, diagnostic only"
                    .into()
            }
        },
    );
    m.insert("sqlite_dir".into(), args.dir.display().to_string());
    m.insert(
        "runtime".into(),
        "tokio multi-thread, 2 workers (FleetDB and raw PostgreSQL); raw SQLite: 1 OS thread per writer".into(),
    );
    m.insert(
        "build".into(),
        if cfg!(debug_assertions) {
            "debug".into()
        } else {
            "release".into()
        },
    );
    m
}

// ---------------------------------------------------------------------------------------------
// Output

fn find<'a>(
    ms: &'a [Measurement],
    backend: BackendKind,
    engine: &str,
    writers: usize,
) -> Option<&'a Measurement> {
    ms.iter()
        .find(|m| m.backend == backend && m.engine == engine && m.writers == writers)
}

/// (backend, writers, raw ops/s, fleetdb ops/s, cost ratio = raw ops/s ÷ fleetdb ops/s)
pub fn cost_ratios(r: &Report) -> Vec<(BackendKind, usize, f64, f64, f64)> {
    let mut out = Vec::new();
    for m in r.measurements.iter().filter(|m| m.engine == "fleetdb") {
        if let Some(raw) = find(&r.measurements, m.backend, "raw", m.writers) {
            out.push((
                m.backend,
                m.writers,
                raw.ops_per_sec,
                m.ops_per_sec,
                raw.ops_per_sec / m.ops_per_sec,
            ));
        }
    }
    out
}

/// (backend, engine, min writers, max writers, ops/s at min, ops/s at max, factor)
pub fn scaling(r: &Report) -> Vec<(BackendKind, &'static str, usize, usize, f64, f64, f64)> {
    let mut out = Vec::new();
    let mut keys: Vec<(BackendKind, &'static str)> = r
        .measurements
        .iter()
        .map(|m| (m.backend, m.engine))
        .collect();
    keys.sort();
    keys.dedup();
    for (b, e) in keys {
        let ms: Vec<&Measurement> = r
            .measurements
            .iter()
            .filter(|m| m.backend == b && m.engine == e)
            .collect();
        let lo = ms.iter().min_by_key(|m| m.writers);
        let hi = ms.iter().max_by_key(|m| m.writers);
        if let (Some(lo), Some(hi)) = (lo, hi) {
            if lo.writers != hi.writers {
                out.push((
                    b,
                    e,
                    lo.writers,
                    hi.writers,
                    lo.ops_per_sec,
                    hi.ops_per_sec,
                    hi.ops_per_sec / lo.ops_per_sec,
                ));
            }
        }
    }
    out
}

fn fmt_int(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let s = format!("{:.0}", x);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{sign}{out}")
}

pub fn render_markdown(r: &Report) -> String {
    use std::fmt::Write as _;
    let a = &r.args;
    let mut s = String::new();
    let _ = writeln!(s, "## fleetdb-bench tagset (run {})\n", r.run_id);
    let _ = writeln!(
        s,
        "{} s measured per row after {} s warm-up; {} pre-created rows/objects, random key per op; \
         each op sets one tag (`{TAG}` = {{\"seq\": n}}, always a new value) in its own transaction \
         (SQLite synchronous={}; PostgreSQL as configured below).\n",
        a.secs,
        a.warmup_secs,
        a.objects,
        a.sqlite_synchronous.pragma()
    );
    let _ = writeln!(s, "Machine:\n");
    for (k, v) in &r.machine {
        let _ = writeln!(s, "- {k}: {v}");
    }
    let _ = writeln!(
        s,
        "\n| backend | engine | writers | ops | ops/s | p50 µs | p99 µs | errors |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
    for m in &r.measurements {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            m.backend.name(),
            m.engine,
            m.writers,
            fmt_int(m.ops as f64),
            fmt_int(m.ops_per_sec),
            fmt_int(m.p50_us),
            fmt_int(m.p99_us),
            m.errors
        );
    }
    let ratios = cost_ratios(r);
    if !ratios.is_empty() {
        let _ = writeln!(
            s,
            "\nCost per op, FleetDB ÷ raw (= raw ops/s ÷ FleetDB ops/s; goal ≤ 1.5):\n"
        );
        let _ = writeln!(
            s,
            "| backend | writers | raw ops/s | fleetdb ops/s | cost ratio | within 1.5x |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---|");
        for (b, w, raw, fl, ratio) in &ratios {
            let _ = writeln!(
                s,
                "| {} | {w} | {} | {} | {ratio:.2} | {} |",
                b.name(),
                fmt_int(*raw),
                fmt_int(*fl),
                if *ratio <= 1.5 { "yes" } else { "NO" }
            );
        }
    }
    let sc = scaling(r);
    if !sc.is_empty() {
        let _ = writeln!(
            s,
            "\nScaling (ops/s at most writers ÷ ops/s at fewest; for FleetDB on SQLite this is the \
             group-commit factor, goal ≥ 4 at 8 vs 1 writers):\n"
        );
        let _ = writeln!(s, "| backend | engine | writers | ops/s | factor | goal |");
        let _ = writeln!(s, "|---|---|---|---|---:|---|");
        for (b, e, lo, hi, lo_ops, hi_ops, f) in &sc {
            let goal = if *b == BackendKind::Sqlite && *e == "fleetdb" {
                if *f >= 4.0 {
                    "≥ 4: yes"
                } else {
                    "≥ 4: NO"
                }
            } else {
                "–"
            };
            let _ = writeln!(
                s,
                "| {} | {e} | {lo} → {hi} | {} → {} | {f:.2} | {goal} |",
                b.name(),
                fmt_int(*lo_ops),
                fmt_int(*hi_ops)
            );
        }
    }
    let troubled: Vec<&Measurement> = r
        .measurements
        .iter()
        .filter(|m| m.errors > 0 || !m.problems.is_empty())
        .collect();
    if !troubled.is_empty() {
        let _ = writeln!(s, "\nErrors and problems:\n");
        for m in troubled {
            let _ = writeln!(
                s,
                "- {} {} {} writers: {} errors",
                m.backend.name(),
                m.engine,
                m.writers,
                m.errors
            );
            for e in &m.error_samples {
                let _ = writeln!(s, "  - error: `{e}`");
            }
            for p in &m.problems {
                let _ = writeln!(s, "  - problem: {p}");
            }
        }
    }
    let noted: Vec<&Measurement> = r
        .measurements
        .iter()
        .filter(|m| !m.notes.is_empty())
        .collect();
    if !noted.is_empty() || !r.notes.is_empty() {
        let _ = writeln!(s, "\nNotes:\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
        for m in noted {
            for n in &m.notes {
                let _ = writeln!(
                    s,
                    "- {} {} {} writers: {n}",
                    m.backend.name(),
                    m.engine,
                    m.writers
                );
            }
        }
    }
    if !r.failures.is_empty() {
        let _ = writeln!(s, "\nFailures:\n");
        for f in &r.failures {
            let _ = writeln!(s, "- {f}");
        }
    }
    s
}

fn num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        serde_json::Value::Null
    }
}

pub fn json_lines(r: &Report) -> Vec<serde_json::Value> {
    let a = &r.args;
    let mut out = vec![json!({
        "type": "machine",
        "run_id": r.run_id,
        "started_unix": r.started_unix,
        "bench": "tagset",
        "secs": a.secs,
        "warmup_secs": a.warmup_secs,
        "objects": a.objects,
        "machine": r.machine,
        "failures": r.failures,
        "notes": r.notes,
        "sqlite_synchronous": a.sqlite_synchronous.pragma(),
    })];
    for m in &r.measurements {
        out.push(json!({
            "type": "result",
            "run_id": r.run_id,
            "bench": "tagset",
            "backend": m.backend.name(),
            "engine": m.engine,
            "writers": m.writers,
            "ops": m.ops,
            "secs": m.secs,
            "ops_per_sec": num(m.ops_per_sec),
            "p50_us": num(m.p50_us),
            "p99_us": num(m.p99_us),
            "errors": m.errors,
            "error_samples": m.error_samples,
            "problems": m.problems,
            "notes": m.notes,
        }));
    }
    for (b, w, raw, fl, ratio) in cost_ratios(r) {
        out.push(json!({
            "type": "cost_ratio",
            "run_id": r.run_id,
            "bench": "tagset",
            "backend": b.name(),
            "writers": w,
            "raw_ops_per_sec": num(raw),
            "fleetdb_ops_per_sec": num(fl),
            "ratio": num(ratio),
            "goal_max": 1.5,
        }));
    }
    for (b, e, lo, hi, lo_ops, hi_ops, f) in scaling(r) {
        out.push(json!({
            "type": "scaling",
            "run_id": r.run_id,
            "bench": "tagset",
            "backend": b.name(),
            "engine": e,
            "writers_low": lo,
            "writers_high": hi,
            "ops_per_sec_low": num(lo_ops),
            "ops_per_sec_high": num(hi_ops),
            "factor": num(f),
            "goal_min": if b == BackendKind::Sqlite && e == "fleetdb" { json!(4.0) } else { serde_json::Value::Null },
        }));
    }
    out
}

fn append_json(r: &Report, path: &Path) -> std::io::Result<()> {
    append_lines(path, json_lines(r))
}

/// The runtime every benchmark runs on: 2 workers, like the peers' Rust client.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))
}

/// Append JSON values to a file, one per line (shared by every benchmark).
pub(crate) fn append_lines(path: &Path, lines: Vec<serde_json::Value>) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    for line in lines {
        writeln!(f, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_args_match_the_issue() {
        let a = TagsetArgs::default();
        assert_eq!(a.secs, 10.0);
        assert_eq!(a.objects, 100_000);
        assert_eq!(a.writers, vec![1, 8]);
        assert_eq!(a.backends, vec![BackendKind::Sqlite, BackendKind::Postgres]);
        assert_eq!(a.sqlite_synchronous, SqliteSync::Full);
    }

    #[test]
    fn lists_parse() {
        let cli = Cli::parse_from([
            "fleetdb-bench",
            "tagset",
            "--secs",
            "2",
            "--writers",
            "1,4,8",
            "--backends",
            "sqlite",
        ]);
        let Command::Tagset(a) = cli.command;
        assert_eq!(a.secs, 2.0);
        assert_eq!(a.writers, vec![1, 4, 8]);
        assert_eq!(a.backends, vec![BackendKind::Sqlite]);
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(7);
        assert!((0..10_000).all(|_| r.below(13) < 13));
    }

    #[test]
    fn thousands() {
        assert_eq!(fmt_int(0.0), "0");
        assert_eq!(fmt_int(999.4), "999");
        assert_eq!(fmt_int(1234567.0), "1,234,567");
        assert_eq!(fmt_int(f64::NAN), "–");
    }

    #[test]
    fn ratios_and_scaling() {
        let m = |engine, writers, ops_per_sec| Measurement {
            backend: BackendKind::Sqlite,
            engine,
            writers,
            ops: 0,
            secs: 1.0,
            ops_per_sec,
            p50_us: 0.0,
            p99_us: 0.0,
            errors: 0,
            error_samples: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
        };
        let r = Report {
            run_id: String::new(),
            started_unix: 0,
            args: TagsetArgs::default(),
            machine: BTreeMap::new(),
            measurements: vec![
                m("raw", 1, 4000.0),
                m("fleetdb", 1, 2000.0),
                m("raw", 8, 4000.0),
                m("fleetdb", 8, 10000.0),
            ],
            failures: Vec::new(),
            notes: Vec::new(),
        };
        let c = cost_ratios(&r);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].4, 2.0);
        assert_eq!(c[1].4, 0.4);
        let s = scaling(&r);
        let f = s.iter().find(|x| x.1 == "fleetdb").unwrap();
        assert_eq!((f.2, f.3, f.6), (1, 8, 5.0));
        assert!(render_markdown(&r).contains("| sqlite | 1 | 4,000 | 2,000 | 2.00 | NO |"));
    }
}
