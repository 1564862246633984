//! `work`: the work-queue benchmarks, in the shapes of the peer measurements
//! (`bench/peers`: graphile-worker and pg-boss on the same PostgreSQL, etcd leases), so that the
//! figures compare.
//!
//! - **One-at-a-time** (the peers' "8 concurrent adders"): `--producers` tasks each add one job
//!   per awaited call, `--workers` tasks (each with its OWN session) claim one job with
//!   `Session::claim_wait` and finish it with `Work::finish`. An "add" is ONE transaction that
//!   creates the object `job/<id>` and sets its `eligible` tag to `{"t": <wall-clock µs taken
//!   just before the call>}` (as the peers' `payload.t`). The finish deletes the `eligible` tag in
//!   the finishing transaction, so the claim selector `kind = job and has(eligible)` no longer
//!   matches. Latency = wall clock when the claim returned − `t`; `t` is looked up in a map the
//!   producers fill before each add (no extra `tag_get`). Ids are time-ordered UUIDs (v7 layout)
//!   unless `--random-ids`: claims take candidates in id order, so v7 ids make the queue
//!   first-in-first-out like the peers' job tables.
//! - **Burn-down**: `--burndown` objects with the `eligible` tag are created in transactions of
//!   1000 (the insert rate is reported), then `--workers` tasks (own sessions) loop: `claim(...,
//!   --batch)`, then ONE transaction (`Session::finish_many_with`) deleting the `eligible` tag of
//!   every claimed object and finishing every claim; with `--finish-and-claim` that transaction
//!   also claims the next batch (`Session::finish_many_and_claim`).
//!   jobs/s = N ÷ (time from worker start until every object is done and no claim is left).
//! - **Sessions**: `--sessions` sessions with a 10 s TTL in one store; the store's background task
//!   renews all of them in one statement per tick (TTL/3). Over a window of `--sessions-secs`
//!   (default 3 × `--secs`) we measure this process's CPU and the PostgreSQL server's CPU (sum of
//!   all `postgres` processes, as the peers' harness), count renewal calls, time manual
//!   `Store::renew_sessions` calls, and check that every session is still alive at the end.
//!
//! Every backend call goes through a counting wrapper ([`Counted`]) so that the report can say how
//! many backend calls (and how much time in them) each job took.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use fleetdb::{Labels, ObjectKey, OpenOptions, SessionSpec, Store};
use serde_json::json;

use crate::{fmt_int, loadavg, now_micros, num, BResult, BackendKind, SqliteSync};

/// The process every claim is for.
pub const PROCESS: &str = "Job";
/// The kind of the job objects.
pub const KIND: &str = "job";
/// The tag that makes an object claimable; finishing deletes it.
pub const ELIGIBLE: &str = "eligible";
/// What the workers claim.
pub const SELECTOR: &str = "kind = job and has(eligible)";
/// Objects created per transaction before a burn-down.
const PREFILL_CHUNK: usize = 1000;
/// Pre-fill transactions in flight at once.
const PREFILL_CONCURRENCY: usize = 4;
/// How long one `claim_wait` waits before the worker looks at its stop flag.
const CLAIM_WAIT_TIMEOUT: Duration = Duration::from_millis(500);
/// Distinct error messages kept per (operation, error kind).
const ERROR_SAMPLES_MAX: usize = 3;
/// Kernel clock ticks per second (USER_HZ; 100 on every Linux this runs on).
const CLK_TCK: f64 = 100.0;

// ---- peer figures (bench/peers/RESULTS.md, medians, same machine) ----

/// (system, completed/s, p50 ms, p99 ms) in the one-at-a-time "8 concurrent adders" shape.
pub const PEER_ONE: &[(&str, f64, f64, f64)] = &[
    ("graphile-worker 0.18.0, defaults", 738.0, 13.0, 23.0),
    ("graphile-worker 0.17.3, defaults", 747.0, 15.0, 30.0),
    ("pg-boss 12.38.0", 400.0, 71.0, 1580.0),
];
/// (system, jobs/s) burning down 50,000 no-op jobs with 8 workers.
pub const PEER_BURN: &[(&str, f64)] = &[
    ("graphile-worker 0.18.0, batched", 22_293.0),
    ("graphile-worker 0.18.0, defaults", 2_013.0),
    ("pg-boss 12.38.0 (batchSize 100)", 8_580.0),
    ("pg-boss 10.4.2 (batchSize 100)", 1_583.0),
];
/// etcd 3.4.23 keeping 10,000 leases (TTL 10 s) alive for 30 s: % of one core.
pub const PEER_ETCD_LEASE_CPU: f64 = 25.5;

// ---- goals (the issue) ----

pub const GOAL_ONE_PG_PER_SEC: f64 = 1_500.0;
pub const GOAL_ONE_PG_P99_MS: f64 = 23.0;
pub const GOAL_ONE_SQLITE_PER_SEC: f64 = 3_000.0;
pub const GOAL_BURN_PG_PER_SEC: f64 = 22_000.0;
pub const GOAL_SESSIONS_CPU_PCT: f64 = 10.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Shape {
    Oneatatime,
    Burndown,
    Sessions,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Oneatatime => "oneatatime",
            Shape::Burndown => "burndown",
            Shape::Sessions => "sessions",
        }
    }
}

/// Work-queue benchmarks in the peers' shapes: one-at-a-time, burn-down, 10,000 live sessions.
#[derive(Debug, Clone, Parser)]
#[command(name = "work")]
pub struct WorkArgs {
    /// Backends, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    pub backends: Vec<BackendKind>,
    /// Shapes to run, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "oneatatime,burndown,sessions"
    )]
    pub only: Vec<Shape>,
    /// One-at-a-time: measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// One-at-a-time: warm-up seconds (jobs flow but are not counted).
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    /// One-at-a-time: producer tasks, each adding one job per awaited call.
    #[arg(long, default_value_t = 8)]
    pub producers: usize,
    /// One-at-a-time: adds per second of all producers together, on a fixed schedule (each
    /// producer takes every `producers`-th slot; one behind schedule adds at once, as the
    /// peers' paced producer). 0: flat out, each add as soon as the last returned.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Worker tasks (one-at-a-time and burn-down), each with its own session.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// PostgreSQL: most connections in the store's pool (default: enough for every producer and
    /// worker at once, at least the library's default).
    #[arg(long)]
    pub postgres_pool: Option<usize>,
    /// One-at-a-time: cap on draining the backlog after the window.
    #[arg(long, default_value_t = 30.0)]
    pub drain_max_secs: f64,
    /// One-at-a-time: random (v4) ids instead of time-ordered ones (claims take candidates in id
    /// order, so random ids make the queue unordered).
    #[arg(long)]
    pub random_ids: bool,
    /// Workers finish and claim the next in one call instead of a finish and then a claim:
    /// one-at-a-time with `Work::finish_and_claim`, burn-down with
    /// `Session::finish_many_and_claim` (one transaction per batch instead of two).
    #[arg(long)]
    pub finish_and_claim: bool,
    /// Limit the workers' process to this many claims held at once (`Store::process_limit`):
    /// what claims of a limited process cost (they take turns on a lock of the process). With the
    /// limit at or above the workers' claims it never binds, so only the cost shows.
    #[arg(long)]
    pub process_limit: Option<u64>,
    /// One-at-a-time: write every measured latency to this file, one line per claim in the
    /// window: seconds since the window opened, the eligible→claimed latency in ms, the wall
    /// clock in seconds since the epoch, the add call's own time in ms (0 when the claim came
    /// first) and the claiming call's time in ms (to see whether a tail is spread out or bunched
    /// in stalls, which part of the latency grew, and to line stalls up with the database's
    /// own logs).
    #[arg(long)]
    pub latency_trace: Option<PathBuf>,
    /// Burn-down: objects made eligible before the workers start.
    #[arg(long, default_value_t = 50_000)]
    pub burndown: usize,
    /// Burn-down: objects per claim (and per finish).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Burn-down: cap in seconds (as the peers' JOBQ_BURN_MAX_S); a capped run is INCOMPLETE.
    #[arg(long, default_value_t = 90.0)]
    pub burndown_max_secs: f64,
    /// Sessions: live sessions in one store.
    #[arg(long, default_value_t = 10_000)]
    pub sessions: usize,
    /// Sessions: TTL in seconds (renewal every TTL/3).
    #[arg(long, default_value_t = 10.0)]
    pub session_ttl_secs: f64,
    /// Sessions: measured seconds of background renewal (default: 3 × --secs).
    #[arg(long)]
    pub sessions_secs: Option<f64>,
    /// Sessions: session starts in flight at once.
    #[arg(long, default_value_t = 64)]
    pub session_start_concurrency: usize,
    /// SQLite `synchronous` (`normal` is NOT durable; a diagnostic only).
    #[arg(long, value_enum, default_value_t = SqliteSync::Full)]
    pub sqlite_synchronous: SqliteSync,
    /// PostgreSQL server (a fresh schema per shape, dropped at the end).
    #[arg(long, env = "FLEETDB_BENCH_POSTGRES_URL", default_value = crate::DEFAULT_POSTGRES_URL)]
    pub postgres_url: String,
    /// Folder for the SQLite files (removed at the end).
    #[arg(long, default_value = "/tmp/fleetdb-bench")]
    pub dir: PathBuf,
    /// Append JSON lines (machine facts, one line per result) to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl Default for WorkArgs {
    fn default() -> Self {
        WorkArgs::parse_from(["work"])
    }
}

impl WorkArgs {
    pub fn sessions_window_secs(&self) -> f64 {
        self.sessions_secs.unwrap_or(self.secs * 3.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Counting backend: every call counted and timed

macro_rules! calls {
    ($($name:ident),* $(,)?) => {
        /// The backend calls, for [`CallStats`].
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Call { $($name),* }
        pub const CALL_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

calls!(
    schema_status,
    migrate,
    namespace_get,
    namespace_list,
    object_get,
    object_list,
    tag_get,
    tag_list,
    commit,
    changes,
    compact,
    revision,
    claim,
    session_renew,
    session_sweep,
    session_get,
    session_list,
    process_list,
    work_list,
    backoff_list,
    history_list,
    history_prune,
    select,
    work_stats,
    count,
);

const NCALLS: usize = CALL_NAMES.len();

/// Calls, errors and time spent, per backend call.
pub struct CallStats {
    calls: [AtomicU64; NCALLS],
    errors: [AtomicU64; NCALLS],
    nanos: [AtomicU64; NCALLS],
}

impl Default for CallStats {
    fn default() -> Self {
        CallStats {
            calls: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            nanos: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl std::fmt::Debug for CallStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallStats")
    }
}

impl CallStats {
    fn record(&self, c: Call, took: Duration, failed: bool) {
        let i = c as usize;
        self.calls[i].fetch_add(1, Ordering::Relaxed);
        self.nanos[i].fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        if failed {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> CallSnap {
        let load = |a: &[AtomicU64; NCALLS]| a.iter().map(|x| x.load(Ordering::Relaxed)).collect();
        CallSnap {
            calls: load(&self.calls),
            errors: load(&self.errors),
            nanos: load(&self.nanos),
        }
    }
}

/// A snapshot (or a difference of two) of [`CallStats`].
#[derive(Debug, Clone, Default)]
pub struct CallSnap {
    calls: Vec<u64>,
    errors: Vec<u64>,
    nanos: Vec<u64>,
}

impl CallSnap {
    pub fn since(&self, earlier: &CallSnap) -> CallSnap {
        let d = |a: &[u64], b: &[u64]| {
            a.iter()
                .zip(b.iter().chain(std::iter::repeat(&0)))
                .map(|(x, y)| x.saturating_sub(*y))
                .collect()
        };
        CallSnap {
            calls: d(&self.calls, &earlier.calls),
            errors: d(&self.errors, &earlier.errors),
            nanos: d(&self.nanos, &earlier.nanos),
        }
    }
    pub fn calls(&self, c: Call) -> u64 {
        self.calls.get(c as usize).copied().unwrap_or(0)
    }
    pub fn errors(&self, c: Call) -> u64 {
        self.errors.get(c as usize).copied().unwrap_or(0)
    }
    /// Mean duration of one call, in ms (NaN without calls).
    pub fn avg_ms(&self, c: Call) -> f64 {
        let n = self.calls(c);
        if n == 0 {
            return f64::NAN;
        }
        self.nanos.get(c as usize).copied().unwrap_or(0) as f64 / n as f64 / 1e6
    }
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (i, name) in CALL_NAMES.iter().enumerate() {
            let n = self.calls.get(i).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            m.insert(
                (*name).to_string(),
                json!({
                    "calls": n,
                    "errors": self.errors.get(i).copied().unwrap_or(0),
                    "total_ms": self.nanos.get(i).copied().unwrap_or(0) as f64 / 1e6,
                }),
            );
        }
        serde_json::Value::Object(m)
    }
}

/// A [`fleetdb::Backend`] that forwards every call to `inner`, counting and timing it.
#[derive(Debug)]
pub struct Counted {
    inner: Arc<dyn fleetdb::Backend>,
    stats: Arc<CallStats>,
}

mod counted_impl {
    use super::{Call, Counted};
    use async_trait::async_trait;
    use fleetdb::core::backend::{SchemaStatus, WorkStats};
    use fleetdb::core::work::{
        BackoffInfo, ClaimRequest, Claimed, HistoryEntry, HistoryFilter, Process, SessionInfo,
        WorkCursor, WorkInfo, WorkListing,
    };
    use fleetdb::core::{
        Backend, Batch, Capabilities, Change, ChangeFilter, Namespace, Object, ObjectKey,
        ObjectQuery, OpResult, Result, Revision, RevisionInfo, Tag, Timestamp,
    };
    use std::time::Instant;

    macro_rules! timed {
        ($self:ident, $call:ident, $fut:expr) => {{
            let t = Instant::now();
            let r = $fut.await;
            $self.stats.record(Call::$call, t.elapsed(), r.is_err());
            r
        }};
    }

    #[async_trait]
    impl Backend for Counted {
        fn name(&self) -> &'static str {
            self.inner.name()
        }
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        fn durability_warnings(&self) -> Vec<String> {
            self.inner.durability_warnings()
        }
        fn retries(&self) -> u64 {
            self.inner.retries()
        }
        async fn schema_status(&self) -> Result<SchemaStatus> {
            timed!(self, schema_status, self.inner.schema_status())
        }
        async fn migrate(&self) -> Result<SchemaStatus> {
            timed!(self, migrate, self.inner.migrate())
        }
        async fn namespace_get(&self, name: &str) -> Result<Option<Namespace>> {
            timed!(self, namespace_get, self.inner.namespace_get(name))
        }
        async fn namespace_list(
            &self,
            after: Option<&str>,
            limit: usize,
        ) -> Result<Vec<Namespace>> {
            timed!(
                self,
                namespace_list,
                self.inner.namespace_list(after, limit)
            )
        }
        async fn object_get(&self, key: &ObjectKey) -> Result<Option<Object>> {
            timed!(self, object_get, self.inner.object_get(key))
        }
        async fn object_list(&self, query: &ObjectQuery) -> Result<Vec<Object>> {
            timed!(self, object_list, self.inner.object_list(query))
        }
        async fn tag_get(&self, key: &ObjectKey, name: &str) -> Result<Option<Tag>> {
            timed!(self, tag_get, self.inner.tag_get(key, name))
        }
        async fn tag_list(&self, key: &ObjectKey) -> Result<Vec<Tag>> {
            timed!(self, tag_list, self.inner.tag_list(key))
        }
        async fn commit(&self, batch: Batch) -> Result<Vec<OpResult>> {
            timed!(self, commit, self.inner.commit(batch))
        }
        async fn changes(
            &self,
            after: Revision,
            filter: &ChangeFilter,
            limit: usize,
        ) -> Result<Vec<Change>> {
            timed!(self, changes, self.inner.changes(after, filter, limit))
        }
        async fn compact(&self, before: Revision) -> Result<u64> {
            timed!(self, compact, self.inner.compact(before))
        }
        async fn revision(&self) -> Result<RevisionInfo> {
            timed!(self, revision, self.inner.revision())
        }
        async fn claim(&self, req: ClaimRequest) -> Result<Claimed> {
            timed!(self, claim, self.inner.claim(req))
        }
        async fn commit_then_claim(
            &self,
            batch: Batch,
            claim: ClaimRequest,
        ) -> Result<(Vec<OpResult>, Claimed)> {
            timed!(self, claim, self.inner.commit_then_claim(batch, claim))
        }
        async fn session_renew(
            &self,
            ids: &[String],
            now: Timestamp,
        ) -> Result<Vec<(String, Timestamp)>> {
            timed!(self, session_renew, self.inner.session_renew(ids, now))
        }
        async fn session_sweep(
            &self,
            now: Timestamp,
            limit: usize,
        ) -> Result<fleetdb::core::backend::Swept> {
            timed!(self, session_sweep, self.inner.session_sweep(now, limit))
        }
        async fn session_get(&self, id: &str) -> Result<Option<SessionInfo>> {
            timed!(self, session_get, self.inner.session_get(id))
        }
        async fn session_list(
            &self,
            after: Option<&str>,
            limit: usize,
        ) -> Result<Vec<SessionInfo>> {
            timed!(self, session_list, self.inner.session_list(after, limit))
        }
        async fn process_list(&self) -> Result<Vec<Process>> {
            timed!(self, process_list, self.inner.process_list())
        }
        async fn work_list(&self, q: &WorkListing) -> Result<Vec<WorkInfo>> {
            timed!(self, work_list, self.inner.work_list(q))
        }
        async fn backoff_list(
            &self,
            process: Option<&str>,
            active_at: Option<Timestamp>,
            after: Option<&WorkCursor>,
            limit: usize,
        ) -> Result<Vec<BackoffInfo>> {
            timed!(
                self,
                backoff_list,
                self.inner.backoff_list(process, active_at, after, limit)
            )
        }
        async fn history_list(
            &self,
            filter: &HistoryFilter,
            before: Option<i64>,
            limit: usize,
        ) -> Result<Vec<HistoryEntry>> {
            timed!(
                self,
                history_list,
                self.inner.history_list(filter, before, limit)
            )
        }
        async fn history_prune(&self, before: Timestamp) -> Result<u64> {
            timed!(self, history_prune, self.inner.history_prune(before))
        }
        async fn select(
            &self,
            selector: &str,
            now: Timestamp,
            after: Option<&ObjectKey>,
            limit: usize,
        ) -> Result<Vec<Object>> {
            timed!(self, select, self.inner.select(selector, now, after, limit))
        }
        async fn work_stats(&self, now: Timestamp) -> Result<Vec<WorkStats>> {
            timed!(self, work_stats, self.inner.work_stats(now))
        }
        async fn count(&self, selector: &str, now: Timestamp) -> Result<u64> {
            timed!(self, count, self.inner.count(selector, now))
        }
        async fn world_list(
            &self,
            query: &fleetdb::core::world::WorldQuery,
        ) -> Result<Vec<fleetdb::core::world::WorldRecord>> {
            self.inner.world_list(query).await
        }
        async fn world_list_all(
            &self,
            queries: &[fleetdb::core::world::WorldQuery],
        ) -> Result<Vec<Vec<fleetdb::core::world::WorldRecord>>> {
            self.inner.world_list_all(queries).await
        }
        async fn settled_revision(&self, wait: std::time::Duration) -> Result<Revision> {
            self.inner.settled_revision(wait).await
        }
        async fn announce_changes(&self) -> Result<()> {
            self.inner.announce_changes().await
        }
        async fn listen_changes(
            &self,
            wake: std::sync::Arc<dyn Fn() + Send + Sync>,
        ) -> Result<bool> {
            self.inner.listen_changes(wake).await
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Results

/// FleetDB errors seen during a shape, by (operation, error kind), with exact messages.
#[derive(Debug, Default)]
pub struct ErrorLog {
    inner: Mutex<BTreeMap<String, (u64, Vec<String>)>>,
}

/// The variant name of an error (`RetriesExhausted`, `SessionExpired`, …).
fn error_kind(e: &fleetdb::Error) -> String {
    let dbg = format!("{e:?}");
    dbg.split(['{', '(', ' ']).next().unwrap_or("").to_string()
}

impl ErrorLog {
    fn add(&self, op: &str, e: &fleetdb::Error) {
        let key = format!("{op}: {}", error_kind(e));
        let msg = e.to_string();
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let entry = m.entry(key).or_default();
        entry.0 += 1;
        if entry.1.len() < ERROR_SAMPLES_MAX && !entry.1.contains(&msg) {
            entry.1.push(msg);
        }
    }
    fn take(&self) -> BTreeMap<String, (u64, Vec<String>)> {
        std::mem::take(&mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn errors_total(e: &BTreeMap<String, (u64, Vec<String>)>) -> u64 {
    e.values().map(|(n, _)| n).sum()
}

fn errors_json(e: &BTreeMap<String, (u64, Vec<String>)>) -> serde_json::Value {
    serde_json::Value::Object(
        e.iter()
            .map(|(k, (n, s))| (k.clone(), json!({"count": n, "samples": s})))
            .collect(),
    )
}

/// CPU use over a window, in % of one core.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// This process (FleetDB library + benchmark tasks).
    pub process_pct: f64,
    /// All `postgres` processes (NaN when none are visible, e.g. on SQLite runs).
    pub postgres_pct: f64,
    /// Everything else on the machine (host busy − the two above): other load that competed.
    pub others_pct: f64,
}

/// PostgreSQL activity over a window (cumulative statistics: they lag by up to about a second).
#[derive(Debug, Clone, Copy, Default)]
pub struct PgActivity {
    pub xact_commit: i64,
    pub xact_rollback: i64,
}

#[derive(Debug, Clone)]
pub struct OneResult {
    pub backend: BackendKind,
    pub producers: usize,
    /// Adds per second on a schedule (0: flat out).
    pub rate: f64,
    pub workers: usize,
    pub secs: f64,
    pub adds_in_window: u64,
    pub adds_per_sec: f64,
    pub claims_in_window: u64,
    pub completed_in_window: u64,
    pub completed_per_sec: f64,
    pub lat_n: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub add_p50_ms: f64,
    pub add_p99_ms: f64,
    /// Mean time of one `claim_wait` that returned a job / of one `finish`, in the window.
    pub claim_wait_avg_ms: f64,
    pub finish_avg_ms: f64,
    pub backlog_at_end: u64,
    pub left_after_drain: u64,
    pub drain_secs: f64,
    pub adds_total: u64,
    pub finished_total: u64,
    /// Claims whose send time was not in the map (should be 0).
    pub missing_t: u64,
    /// Fencing tokens consumed minus claims taken: claim attempts rolled back after they took a
    /// token (PostgreSQL serialization failures; the sequence does not roll back).
    pub token_gap: i64,
    pub calls: CallSnap,
    pub cpu: Cpu,
    pub pg: Option<PgActivity>,
    pub errors: BTreeMap<String, (u64, Vec<String>)>,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct BurnResult {
    pub backend: BackendKind,
    pub n: usize,
    pub workers: usize,
    pub batch: usize,
    pub complete: bool,
    pub done: u64,
    pub secs: f64,
    pub jobs_per_sec: f64,
    pub insert_secs: f64,
    pub insert_per_sec: f64,
    pub claim_calls: u64,
    pub empty_claims: u64,
    /// Summed over workers: (calls, total seconds) of the three steps of a batch.
    pub claim_phase: (u64, f64),
    pub delete_phase: (u64, f64),
    pub finish_phase: (u64, f64),
    pub worker_secs: f64,
    pub token_gap: i64,
    pub calls: CallSnap,
    pub cpu: Cpu,
    pub pg: Option<PgActivity>,
    pub errors: BTreeMap<String, (u64, Vec<String>)>,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SessResult {
    pub backend: BackendKind,
    pub sessions: usize,
    pub ttl_secs: f64,
    pub start_secs: f64,
    pub starts_per_sec: f64,
    /// Durations (ms) of manual `Store::renew_sessions` calls with every session live.
    pub manual_renew_ms: Vec<f64>,
    pub window_secs: f64,
    pub renew_calls: u64,
    pub renew_avg_ms: f64,
    pub sweep_calls: u64,
    /// Backend calls of any kind in the window (renewals + sweeps + nothing else expected).
    pub other_calls: u64,
    pub ticks_expected: f64,
    /// Rows updated in the `sessions` table ÷ sessions (PostgreSQL statistics; lag ~1 s).
    pub pg_renewed_rounds: Option<f64>,
    pub cpu: Cpu,
    pub pg: Option<PgActivity>,
    pub alive_local: usize,
    pub alive_listed: usize,
    pub listed: usize,
    pub sampled: usize,
    pub sampled_alive: usize,
    pub errors: BTreeMap<String, (u64, Vec<String>)>,
    pub problems: Vec<String>,
}

/// A whole `work` run.
#[derive(Debug, Clone)]
pub struct WorkReport {
    pub run_id: String,
    pub started_unix: u64,
    pub args: WorkArgs,
    pub machine: BTreeMap<String, String>,
    pub one: Vec<OneResult>,
    pub burn: Vec<BurnResult>,
    pub sessions: Vec<SessResult>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// One claim of the one-at-a-time window, for `--latency-trace` (µs; `wall` since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct TracePoint {
    at: u64,
    lat: u64,
    wall: i64,
    add: u64,
    wait: u64,
}

/// A time-ordered id (UUID v7 layout: 48-bit ms timestamp, then random) or a random v4 UUID.
fn job_id(random: bool) -> String {
    let u = uuid::Uuid::new_v4();
    if random {
        return u.to_string();
    }
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut rnd = [0u8; 10];
    rnd.copy_from_slice(&u.as_bytes()[..10]);
    uuid::Builder::from_unix_timestamp_millis(ms, &rnd)
        .into_uuid()
        .to_string()
}

fn job_key(id: &str) -> BResult<ObjectKey> {
    ObjectKey::new(fleetdb::DEFAULT_NAMESPACE, KIND, id).map_err(|e| format!("job key: {e}"))
}

/// Percentile of sorted µs samples, in ms.
fn pct_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64) as usize).min(sorted.len() - 1);
    sorted[i] as f64 / 1e3
}

/// utime + stime (+ cutime + cstime) of one /proc/<pid>/stat, in seconds.
fn stat_cpu_secs(text: &str, children: bool) -> Option<f64> {
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    let mut t = get(11)? + get(12)?;
    if children {
        t += get(13)? + get(14)?;
    }
    Some(t / CLK_TCK)
}

fn self_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu_secs(&s, false))
        .unwrap_or(f64::NAN)
}

/// CPU seconds of every `postgres` process (with reaped children, as the peers' harness), and
/// how many there are.
fn postgres_cpu_secs() -> (f64, usize) {
    let mut total = 0.0;
    let mut n = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (f64::NAN, 0);
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(s) = std::fs::read_to_string(format!("/proc/{name}/stat")) else {
            continue;
        };
        let (Some(a), Some(b)) = (s.find('('), s.rfind(')')) else {
            continue;
        };
        if !s[a + 1..b].starts_with("postgres") {
            continue;
        }
        if let Some(t) = stat_cpu_secs(&s, true) {
            total += t;
            n += 1;
        }
    }
    (total, n)
}

/// Busy CPU seconds of the whole machine (all cores), from /proc/stat.
fn host_busy_secs() -> f64 {
    let Some(line) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
    else {
        return f64::NAN;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return f64::NAN;
    }
    // user nice system idle iowait irq softirq steal (guest is already in user)
    let total: f64 = v.iter().take(8).sum();
    (total - v[3] - v[4]) / CLK_TCK
}

/// A CPU probe started at one instant.
struct CpuProbe {
    wall: Instant,
    me: f64,
    /// None: not a PostgreSQL run (the server's CPU is not ours to report).
    pg: Option<(f64, usize)>,
    host: f64,
}

impl CpuProbe {
    fn start(postgres: bool) -> Self {
        CpuProbe {
            wall: Instant::now(),
            me: self_cpu_secs(),
            pg: postgres.then(postgres_cpu_secs),
            host: host_busy_secs(),
        }
    }
    fn finish(&self) -> Cpu {
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        let postgres_pct = match self.pg {
            Some(before) if before.1 > 0 => {
                let after = postgres_cpu_secs();
                100.0 * (after.0 - before.0) / wall
            }
            _ => f64::NAN,
        };
        let process_pct = 100.0 * (self_cpu_secs() - self.me) / wall;
        let host_pct = 100.0 * (host_busy_secs() - self.host) / wall;
        let pg = if postgres_pct.is_finite() {
            postgres_pct
        } else {
            0.0
        };
        Cpu {
            process_pct,
            postgres_pct,
            others_pct: (host_pct - process_pct - pg).max(0.0),
        }
    }
}

fn remove_sqlite(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

// ---------------------------------------------------------------------------------------------
// A fresh database per shape

enum Place {
    Sqlite(PathBuf),
    #[cfg(feature = "postgres")]
    Postgres {
        base: String,
        schema: String,
    },
}

/// An admin connection to the PostgreSQL server (statistics, CHECKPOINT, VACUUM).
struct PgAdmin {
    client: tokio_postgres::Client,
    schema: String,
}

fn pg_chain(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

impl PgAdmin {
    async fn connect(url: &str, schema: &str) -> BResult<PgAdmin> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connecting to PostgreSQL: {}", pg_chain(&e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(PgAdmin {
            client,
            schema: schema.to_string(),
        })
    }

    async fn activity(&self) -> Option<PgActivity> {
        let row = self
            .client
            .query_one(
                "SELECT xact_commit, xact_rollback FROM pg_stat_database \
                 WHERE datname = current_database()",
                &[],
            )
            .await
            .ok()?;
        Some(PgActivity {
            xact_commit: row.get(0),
            xact_rollback: row.get(1),
        })
    }

    /// Rows updated in this schema's `sessions` table so far.
    async fn sessions_updates(&self) -> Option<i64> {
        let row = self
            .client
            .query_one(
                "SELECT n_tup_upd FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'sessions'",
                &[&self.schema],
            )
            .await
            .ok()?;
        Some(row.get(0))
    }

    /// Like the peers: VACUUM ANALYZE the filled tables, then CHECKPOINT, before the clock starts.
    async fn settle(&self, tables: &[&str]) {
        for t in tables {
            if let Err(e) = self
                .client
                .batch_execute(&format!("VACUUM ANALYZE {}.{t}", self.schema))
                .await
            {
                eprintln!("  (VACUUM {t} failed, continuing: {})", pg_chain(&e));
            }
        }
        if let Err(e) = self.client.batch_execute("CHECKPOINT").await {
            eprintln!("  (CHECKPOINT failed, continuing: {})", pg_chain(&e));
        }
    }
}

fn activity_delta(a: Option<PgActivity>, b: Option<PgActivity>) -> Option<PgActivity> {
    match (a, b) {
        (Some(a), Some(b)) => Some(PgActivity {
            xact_commit: b.xact_commit - a.xact_commit,
            xact_rollback: b.xact_rollback - a.xact_rollback,
        }),
        _ => None,
    }
}

struct Db {
    kind: BackendKind,
    store: Store,
    stats: Arc<CallStats>,
    place: Place,
    admin: Option<PgAdmin>,
}

impl Db {
    async fn open(kind: BackendKind, args: &WorkArgs) -> BResult<Db> {
        let defaults = OpenOptions::default();
        let options = OpenOptions {
            durability: args.sqlite_synchronous.durability(),
            postgres_pool_size_max: args.postgres_pool.unwrap_or(
                defaults
                    .postgres_pool_size_max
                    .max(args.producers + args.workers + 4),
            ),
            ..defaults
        };
        let (place, url) = match kind {
            BackendKind::Sqlite => {
                std::fs::create_dir_all(&args.dir)
                    .map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
                let dir = std::fs::canonicalize(&args.dir)
                    .map_err(|e| format!("cannot resolve {}: {e}", args.dir.display()))?;
                let path = dir.join(format!("work-{}.sqlite", std::process::id()));
                remove_sqlite(&path);
                let url = format!("sqlite://{}", path.display());
                (Place::Sqlite(path), url)
            }
            BackendKind::Postgres => pg_place(&args.postgres_url).await?,
        };
        match Db::open_at(kind, &place, &url, options).await {
            Ok((store, stats, admin)) => Ok(Db {
                kind,
                store,
                stats,
                place,
                admin,
            }),
            Err(e) => {
                let cleanup = cleanup(place).await;
                Err(match cleanup {
                    None => e,
                    Some(c) => format!("{e}; and then {c}"),
                })
            }
        }
    }

    async fn open_at(
        kind: BackendKind,
        place: &Place,
        url: &str,
        options: OpenOptions,
    ) -> BResult<(Store, Arc<CallStats>, Option<PgAdmin>)> {
        let store = Store::open_with(url, options)
            .await
            .map_err(|e| format!("opening FleetDB ({}): {e}", kind.name()))?;
        let stats = Arc::new(CallStats::default());
        let counted = Arc::new(Counted {
            inner: store.backend().clone(),
            stats: stats.clone(),
        });
        let wrapped = Store::from_backend(counted, store.clock().clone(), store.limits().clone())
            .await
            .map_err(|e| format!("wrapping the backend: {e}"))?;
        drop(store);
        let admin = match place {
            Place::Sqlite(_) => None,
            #[cfg(feature = "postgres")]
            Place::Postgres { base, schema } => Some(PgAdmin::connect(base, schema).await?),
        };
        Ok((wrapped, stats, admin))
    }

    async fn close(self) -> Option<String> {
        let Db {
            store,
            place,
            admin,
            ..
        } = self;
        drop(store);
        drop(admin);
        // Let background cancels of dropped claims and closing connections finish.
        tokio::time::sleep(Duration::from_millis(200)).await;
        cleanup(place).await
    }
}

async fn cleanup(place: Place) -> Option<String> {
    match place {
        Place::Sqlite(p) => {
            remove_sqlite(&p);
            None
        }
        #[cfg(feature = "postgres")]
        Place::Postgres { base, schema } => fleetdb_postgres::testing::drop_schema(&base, &schema)
            .await
            .err()
            .map(|e| format!("dropping schema {schema}: {e}")),
    }
}

#[cfg(feature = "postgres")]
async fn pg_place(base: &str) -> BResult<(Place, String)> {
    let (url, schema) = fleetdb_postgres::testing::create_schema(base)
        .await
        .map_err(|e| format!("creating the FleetDB schema: {e}"))?;
    eprintln!("  schema {schema}");
    Ok((
        Place::Postgres {
            base: base.to_string(),
            schema,
        },
        url,
    ))
}

#[cfg(not(feature = "postgres"))]
async fn pg_place(_base: &str) -> BResult<(Place, String)> {
    Err("this build of fleetdb-bench was made without the `postgres` feature".into())
}

async fn new_session(
    store: &Store,
    role: &str,
    i: usize,
    ttl: Duration,
) -> BResult<fleetdb::Session> {
    store
        .session_start(
            SessionSpec::new("fleetdb-bench", "bench")
                .runtime_info(format!("{role} {i}"))
                .ttl(ttl),
        )
        .await
        .map_err(|e| format!("starting a session: {e}"))
}

// ---------------------------------------------------------------------------------------------
// One-at-a-time

#[derive(Debug, Default)]
struct ProducerRec {
    adds_total: u64,
    adds_in_window: u64,
    add_us: Vec<u64>,
}

#[derive(Debug, Default)]
struct WorkerRec {
    claims_in_window: u64,
    completed_in_window: u64,
    lat_us: Vec<u64>,
    /// Kept only for `--latency-trace`.
    trace: Vec<TracePoint>,
    claim_wait_us: Vec<u64>,
    finish_us: Vec<u64>,
    claims_total: u64,
    finished_total: u64,
    missing_t: u64,
    max_token: i64,
}

/// The workers' process, limited when `--process-limit` says so.
async fn define_process(store: &Store, args: &WorkArgs) -> BResult<()> {
    store
        .process_define(PROCESS, &[])
        .await
        .map_err(|e| format!("process_define: {e}"))?;
    if let Some(n) = args.process_limit {
        store
            .process_limit(PROCESS, Some(n))
            .await
            .map_err(|e| format!("process_limit: {e}"))?;
    }
    Ok(())
}

async fn one_at_a_time(db: &Db, args: &WorkArgs) -> BResult<OneResult> {
    let store = &db.store;
    define_process(store, args).await?;
    let errors = Arc::new(ErrorLog::default());
    // Each job in flight: when its add was called and when that call returned (0 until then), µs
    // since the epoch.
    let sent: Arc<Mutex<HashMap<String, (i64, i64)>>> = Arc::default();
    let mut sessions = Vec::new();
    for w in 0..args.workers {
        sessions
            .push(new_session(store, "worker", w, fleetdb::core::work::SESSION_TTL_DEFAULT).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let warm_end = Instant::now() + Duration::from_secs_f64(args.warmup_secs.max(0.0));
    let end = warm_end + Duration::from_secs_f64(args.secs);
    let in_window = move |t: Instant| t >= warm_end && t < end;

    let mut workers = tokio::task::JoinSet::new();
    for session in &sessions {
        let session = session.clone();
        let (stop, sent, errors) = (stop.clone(), sent.clone(), errors.clone());
        let finish_and_claim = args.finish_and_claim;
        let trace = args.latency_trace.is_some();
        workers.spawn(async move {
            let mut rec = WorkerRec::default();
            let mut next: Vec<fleetdb::Work> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let asked = Instant::now();
                let got = if next.is_empty() {
                    session
                        .claim_wait(PROCESS, SELECTOR, 1, CLAIM_WAIT_TIMEOUT)
                        .await
                } else {
                    Ok(std::mem::take(&mut next))
                };
                let got_wall = now_micros();
                let got_at = Instant::now();
                let mut works = match got {
                    Ok(w) => w,
                    Err(e) => {
                        errors.add("claim_wait", &e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Some(mut work) = works.pop() else {
                    continue;
                };
                rec.claims_total += 1;
                rec.max_token = rec.max_token.max(work.token());
                let key = work.key().clone();
                let t_add = sent
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key.id);
                if in_window(got_at) {
                    rec.claims_in_window += 1;
                    rec.claim_wait_us
                        .push(got_at.duration_since(asked).as_micros() as u64);
                    match t_add {
                        Some((t, added)) => {
                            let lat = (got_wall - t).max(0) as u64;
                            rec.lat_us.push(lat);
                            if trace {
                                let at = got_at.duration_since(warm_end).as_micros() as u64;
                                // The add call's own time (0: claimed before the call returned).
                                let add = if added > 0 {
                                    (added - t).max(0) as u64
                                } else {
                                    0
                                };
                                let wait = got_at.duration_since(asked).as_micros() as u64;
                                rec.trace.push(TracePoint {
                                    at,
                                    lat,
                                    wall: got_wall,
                                    add,
                                    wait,
                                });
                            }
                        }
                        None => rec.missing_t += 1,
                    }
                }
                let f0 = Instant::now();
                let r = if finish_and_claim {
                    work.finish_and_claim(
                        |tx| {
                            let key = key.clone();
                            async move { tx.tag_delete(&key, ELIGIBLE) }
                        },
                        PROCESS,
                        SELECTOR,
                        1,
                    )
                    .await
                    .map(|((), claimed)| next = claimed)
                } else {
                    work.finish(|tx| {
                        let key = key.clone();
                        async move { tx.tag_delete(&key, ELIGIBLE) }
                    })
                    .await
                };
                let done = Instant::now();
                match r {
                    Ok(()) => {
                        rec.finished_total += 1;
                        if in_window(done) {
                            rec.completed_in_window += 1;
                            rec.finish_us
                                .push(done.duration_since(f0).as_micros() as u64);
                        }
                    }
                    Err(e) => errors.add("finish", &e),
                }
            }
            rec
        });
    }

    let mut producers = tokio::task::JoinSet::new();
    let paced_from = Instant::now();
    for p in 0..args.producers {
        let (store, sent, errors) = (store.clone(), sent.clone(), errors.clone());
        let random = args.random_ids;
        let trace = args.latency_trace.is_some();
        // Slot k of the whole schedule is at k / rate; producer p takes slots p, p + n, p + 2n …
        let pace = (args.rate > 0.0).then(|| {
            (
                Duration::from_secs_f64(p as f64 / args.rate),
                Duration::from_secs_f64(args.producers as f64 / args.rate),
            )
        });
        producers.spawn(async move {
            let mut rec = ProducerRec::default();
            let mut slot = 0u32;
            loop {
                if let Some((first, gap)) = pace {
                    tokio::time::sleep_until((paced_from + first + gap * slot).into()).await;
                    slot += 1;
                }
                let id = job_id(random);
                let key = match job_key(&id) {
                    Ok(k) => k,
                    Err(_) => break,
                };
                let t = now_micros();
                let started = Instant::now();
                if started >= end {
                    break;
                }
                sent.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), (t, 0));
                let r = store
                    .txn(|tx| {
                        let key = key.clone();
                        async move {
                            tx.object_put(&key, Labels::new())?;
                            tx.tag_set(&key, ELIGIBLE, &json!({ "t": t }))
                        }
                    })
                    .await;
                let done = Instant::now();
                match r {
                    Ok(()) => {
                        // Only a trace reads when the add returned: no second lock per add else.
                        if trace {
                            if let Some(e) =
                                sent.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id)
                            {
                                e.1 = now_micros();
                            }
                        }
                        rec.adds_total += 1;
                        if started >= warm_end {
                            rec.adds_in_window += 1;
                            rec.add_us
                                .push(done.duration_since(started).as_micros() as u64);
                        }
                    }
                    Err(e) => {
                        errors.add("add", &e);
                        sent.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    }
                }
            }
            rec
        });
    }

    // The window: CPU, backend calls and PostgreSQL activity from warm_end to end.
    tokio::time::sleep_until(warm_end.into()).await;
    let probe = CpuProbe::start(db.kind == BackendKind::Postgres);
    let calls0 = db.stats.snapshot();
    let pg0 = match &db.admin {
        Some(a) => a.activity().await,
        None => None,
    };
    tokio::time::sleep_until(end.into()).await;
    let cpu = probe.finish();
    let calls = db.stats.snapshot().since(&calls0);
    let pg1 = match &db.admin {
        Some(a) => a.activity().await,
        None => None,
    };

    let mut prod = ProducerRec::default();
    while let Some(r) = producers.join_next().await {
        let r = r.map_err(|e| format!("a producer task failed: {e}"))?;
        prod.adds_total += r.adds_total;
        prod.adds_in_window += r.adds_in_window;
        prod.add_us.extend(r.add_us);
    }
    let backlog_at_end = store
        .count(SELECTOR)
        .await
        .map_err(|e| format!("counting the backlog: {e}"))?;
    let drain_start = Instant::now();
    let drain_end = drain_start + Duration::from_secs_f64(args.drain_max_secs.max(0.0));
    let mut left = backlog_at_end;
    while left > 0 && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = match store.count(SELECTOR).await {
            Ok(n) => n,
            Err(e) => {
                errors.add("count", &e);
                left
            }
        };
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut wr = WorkerRec::default();
    while let Some(r) = workers.join_next().await {
        let r = r.map_err(|e| format!("a worker task failed: {e}"))?;
        wr.claims_in_window += r.claims_in_window;
        wr.completed_in_window += r.completed_in_window;
        wr.lat_us.extend(r.lat_us);
        wr.trace.extend(r.trace);
        wr.claim_wait_us.extend(r.claim_wait_us);
        wr.finish_us.extend(r.finish_us);
        wr.claims_total += r.claims_total;
        wr.finished_total += r.finished_total;
        wr.missing_t += r.missing_t;
        wr.max_token = wr.max_token.max(r.max_token);
    }
    // Recount once every worker has stopped (a worker may finish its last job after the drain
    // looked), for the accounting check.
    let left_final = match store.count(SELECTOR).await {
        Ok(n) => n,
        Err(e) => {
            errors.add("count", &e);
            left
        }
    };
    for s in sessions {
        if let Err(e) = s.close().await {
            errors.add("session close", &e);
        }
    }

    if let Some(path) = &args.latency_trace {
        wr.trace.sort_unstable();
        let mut text = String::with_capacity(wr.trace.len() * 20);
        for p in &wr.trace {
            text.push_str(&format!(
                "{:.6} {:.3} {:.6} {:.3} {:.3}\n",
                p.at as f64 / 1e6,
                p.lat as f64 / 1e3,
                p.wall as f64 / 1e6,
                p.add as f64 / 1e3,
                p.wait as f64 / 1e3
            ));
        }
        std::fs::write(path, text)
            .map_err(|e| format!("writing the latency trace {}: {e}", path.display()))?;
    }
    let mut problems = Vec::new();
    if left > 0 {
        problems.push(format!(
            "{left} jobs still eligible after draining for {drain_secs:.1} s"
        ));
    }
    if wr.finished_total + left_final != prod.adds_total {
        problems.push(format!(
            "{} adds, {} finished, {left_final} still eligible: {} unaccounted for",
            prod.adds_total,
            wr.finished_total,
            prod.adds_total as i64 - wr.finished_total as i64 - left_final as i64
        ));
    }
    if wr.missing_t > 0 {
        problems.push(format!(
            "{} claimed jobs had no send time in the map",
            wr.missing_t
        ));
    }
    let mut lat = wr.lat_us;
    lat.sort_unstable();
    prod.add_us.sort_unstable();
    let mean_ms = |v: &[u64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<u64>() as f64 / v.len() as f64 / 1e3
        }
    };
    Ok(OneResult {
        backend: db.kind,
        producers: args.producers,
        rate: args.rate,
        workers: args.workers,
        secs: args.secs,
        adds_in_window: prod.adds_in_window,
        adds_per_sec: prod.adds_in_window as f64 / args.secs,
        claims_in_window: wr.claims_in_window,
        completed_in_window: wr.completed_in_window,
        completed_per_sec: wr.completed_in_window as f64 / args.secs,
        lat_n: lat.len(),
        p50_ms: pct_ms(&lat, 0.50),
        p90_ms: pct_ms(&lat, 0.90),
        p99_ms: pct_ms(&lat, 0.99),
        max_ms: lat.last().map_or(f64::NAN, |v| *v as f64 / 1e3),
        add_p50_ms: pct_ms(&prod.add_us, 0.50),
        add_p99_ms: pct_ms(&prod.add_us, 0.99),
        claim_wait_avg_ms: mean_ms(&wr.claim_wait_us),
        finish_avg_ms: mean_ms(&wr.finish_us),
        backlog_at_end,
        left_after_drain: left,
        drain_secs,
        adds_total: prod.adds_total,
        finished_total: wr.finished_total,
        missing_t: wr.missing_t,
        token_gap: wr.max_token - wr.claims_total as i64,
        calls,
        cpu,
        pg: activity_delta(pg0, pg1),
        errors: errors.take(),
        problems,
    })
}

// ---------------------------------------------------------------------------------------------
// Burn-down

/// Create `keys` with their `eligible` tag, [`PREFILL_CHUNK`] per transaction,
/// [`PREFILL_CONCURRENCY`] transactions in flight.
async fn prefill(store: &Store, keys: &[ObjectKey], errors: &ErrorLog) -> BResult<()> {
    let mut pending = keys
        .chunks(PREFILL_CHUNK)
        .map(Arc::<[ObjectKey]>::from)
        .enumerate();
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        while in_flight.len() < PREFILL_CONCURRENCY {
            let Some((c, chunk)) = pending.next() else {
                break;
            };
            let store = store.clone();
            in_flight.spawn(async move {
                let mut failures = Vec::new();
                for _ in 0..3 {
                    let r = store
                        .txn(|tx| {
                            let chunk = chunk.clone();
                            async move {
                                for (i, k) in chunk.iter().enumerate() {
                                    tx.object_put(k, Labels::new())?;
                                    tx.tag_set(
                                        k,
                                        ELIGIBLE,
                                        &json!({ "n": c * PREFILL_CHUNK + i }),
                                    )?;
                                }
                                Ok(())
                            }
                        })
                        .await;
                    match r {
                        Ok(()) => return (failures, true),
                        Err(e) => failures.push(e),
                    }
                }
                (failures, false)
            });
        }
        match in_flight.join_next().await {
            None => return Ok(()),
            Some(Ok((failures, ok))) => {
                for e in &failures {
                    errors.add("prefill", e);
                }
                if !ok {
                    return Err(format!(
                        "a pre-fill transaction failed 3 times: {}",
                        failures.last().map(|e| e.to_string()).unwrap_or_default()
                    ));
                }
            }
            Some(Err(e)) => return Err(format!("a pre-fill task failed: {e}")),
        }
    }
}

#[derive(Debug, Default)]
struct BurnRec {
    claim_calls: u64,
    empty: u64,
    claim: (u64, f64),
    delete: (u64, f64),
    finish: (u64, f64),
    claims_total: u64,
    max_token: i64,
    secs: f64,
}

async fn burndown(db: &Db, args: &WorkArgs) -> BResult<BurnResult> {
    let store = &db.store;
    let n = args.burndown;
    define_process(store, args).await?;
    let errors = Arc::new(ErrorLog::default());
    let keys = (0..n)
        .map(|_| job_key(&job_id(false)))
        .collect::<BResult<Vec<_>>>()?;
    let t = Instant::now();
    prefill(store, &keys, &errors).await?;
    let insert_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "  created {n} eligible objects in {insert_secs:.1} s ({:.0}/s)",
        n as f64 / insert_secs
    );
    drop(keys);
    if let Some(a) = &db.admin {
        a.settle(&["objects", "tags", "changes"]).await;
    }
    let mut sessions = Vec::new();
    for w in 0..args.workers {
        sessions
            .push(new_session(store, "worker", w, fleetdb::core::work::SESSION_TTL_DEFAULT).await?);
    }
    let done = Arc::new(AtomicU64::new(0));
    let probe = CpuProbe::start(db.kind == BackendKind::Postgres);
    let calls0 = db.stats.snapshot();
    let pg0 = match &db.admin {
        Some(a) => a.activity().await,
        None => None,
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(args.burndown_max_secs);
    let mut workers = tokio::task::JoinSet::new();
    for session in &sessions {
        let session = session.clone();
        let (done, errors) = (done.clone(), errors.clone());
        let batch = args.batch;
        let finish_and_claim = args.finish_and_claim;
        workers.spawn(async move {
            let mut rec = BurnRec::default();
            let started = Instant::now();
            // The claims the last finish-and-claim brought (`--finish-and-claim`).
            let mut next: Option<Vec<fleetdb::Work>> = None;
            while done.load(Ordering::Relaxed) < n as u64 && Instant::now() < deadline {
                let got = match next.take() {
                    Some(works) if !works.is_empty() => Ok(works),
                    _ => {
                        let c0 = Instant::now();
                        rec.claim_calls += 1;
                        let got = session.claim(PROCESS, SELECTOR, batch).await;
                        rec.claim.0 += 1;
                        rec.claim.1 += c0.elapsed().as_secs_f64();
                        got
                    }
                };
                let mut works = match got {
                    Ok(w) => w,
                    Err(e) => {
                        errors.add("claim", &e);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                };
                if works.is_empty() {
                    // The rest is held by other workers (or the store is empty).
                    rec.empty += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                rec.claims_total += works.len() as u64;
                for w in &works {
                    rec.max_token = rec.max_token.max(w.token());
                }
                let claimed: Arc<Vec<ObjectKey>> =
                    Arc::new(works.iter().map(|w| w.key().clone()).collect());
                let f0 = Instant::now();
                let delete_tags = |tx: fleetdb::Txn| {
                    let claimed = claimed.clone();
                    async move {
                        for k in claimed.iter() {
                            tx.tag_delete(k, ELIGIBLE)?;
                        }
                        Ok(())
                    }
                };
                let r = if finish_and_claim {
                    rec.claim_calls += 1;
                    session
                        .finish_many_and_claim(&mut works, delete_tags, PROCESS, SELECTOR, batch)
                        .await
                        .map(|((), claimed)| next = Some(claimed))
                } else {
                    session.finish_many_with(&mut works, delete_tags).await
                };
                rec.finish.0 += 1;
                rec.finish.1 += f0.elapsed().as_secs_f64();
                if let Err(e) = r {
                    // The claims are cancelled when `works` drops; the objects stay eligible.
                    errors.add("finish_many_with", &e);
                    continue;
                }
                // Out of the queue either way: the eligible tags are gone.
                done.fetch_add(claimed.len() as u64, Ordering::Relaxed);
            }
            rec.secs = started.elapsed().as_secs_f64();
            rec
        });
    }
    let mut agg = BurnRec::default();
    while let Some(r) = workers.join_next().await {
        let r = r.map_err(|e| format!("a burn-down worker failed: {e}"))?;
        agg.claim_calls += r.claim_calls;
        agg.empty += r.empty;
        agg.claim.0 += r.claim.0;
        agg.claim.1 += r.claim.1;
        agg.delete.0 += r.delete.0;
        agg.delete.1 += r.delete.1;
        agg.finish.0 += r.finish.0;
        agg.finish.1 += r.finish.1;
        agg.claims_total += r.claims_total;
        agg.max_token = agg.max_token.max(r.max_token);
        agg.secs += r.secs;
    }
    // Like the peers: done when every handler ran AND the database shows nothing unfinished.
    let mut held = store
        .work_list(Some(PROCESS), 1)
        .await
        .map_err(|e| format!("listing work: {e}"))?
        .len();
    while held > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        held = store
            .work_list(Some(PROCESS), 1)
            .await
            .map_err(|e| format!("listing work: {e}"))?
            .len();
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = probe.finish();
    let calls = db.stats.snapshot().since(&calls0);
    let pg1 = match &db.admin {
        Some(a) => a.activity().await,
        None => None,
    };
    let left = store
        .count(SELECTOR)
        .await
        .map_err(|e| format!("counting what is left: {e}"))?;
    drop(sessions);
    let done = done.load(Ordering::Relaxed);
    let complete = left == 0 && held == 0 && done >= n as u64;
    let mut problems = Vec::new();
    if !complete {
        problems.push(format!(
            "INCOMPLETE after {secs:.1} s (cap {} s): {left} objects still eligible, claims still held: {}",
            args.burndown_max_secs,
            if held > 0 { "yes" } else { "no" }
        ));
    }
    if done != n as u64 && complete {
        problems.push(format!("{done} objects done for {n} created"));
    }
    let finished = if complete { n as u64 } else { n as u64 - left };
    Ok(BurnResult {
        backend: db.kind,
        n,
        workers: args.workers,
        batch: args.batch,
        complete,
        done,
        secs,
        jobs_per_sec: finished as f64 / secs,
        insert_secs,
        insert_per_sec: n as f64 / insert_secs,
        claim_calls: agg.claim_calls,
        empty_claims: agg.empty,
        claim_phase: agg.claim,
        delete_phase: agg.delete,
        finish_phase: agg.finish,
        worker_secs: agg.secs,
        token_gap: agg.max_token - agg.claims_total as i64,
        calls,
        cpu,
        pg: activity_delta(pg0, pg1),
        errors: errors.take(),
        problems,
    })
}

// ---------------------------------------------------------------------------------------------
// Sessions

async fn sessions_shape(db: &Db, args: &WorkArgs) -> BResult<SessResult> {
    let store = &db.store;
    let n = args.sessions;
    let ttl = Duration::from_secs_f64(args.session_ttl_secs);
    let errors = Arc::new(ErrorLog::default());
    let t = Instant::now();
    let mut sessions: Vec<fleetdb::Session> = Vec::with_capacity(n);
    let mut in_flight = tokio::task::JoinSet::new();
    let mut next = 0usize;
    loop {
        while next < n && in_flight.len() < args.session_start_concurrency.max(1) {
            let store = store.clone();
            let i = next;
            next += 1;
            in_flight.spawn(async move {
                store
                    .session_start(
                        SessionSpec::new("fleetdb-bench", "bench")
                            .runtime_info(format!("session {i}"))
                            .ttl(ttl),
                    )
                    .await
            });
        }
        match in_flight.join_next().await {
            None => break,
            Some(Ok(Ok(s))) => sessions.push(s),
            Some(Ok(Err(e))) => errors.add("session_start", &e),
            Some(Err(e)) => return Err(format!("a session start task failed: {e}")),
        }
    }
    let start_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "  started {} sessions in {start_secs:.1} s ({:.0}/s)",
        sessions.len(),
        sessions.len() as f64 / start_secs
    );

    // Manual renewals, timed (before the window, so the window sees only the background task).
    let mut manual_renew_ms = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        match store.renew_sessions().await {
            Ok(()) => manual_renew_ms.push(t.elapsed().as_secs_f64() * 1e3),
            Err(e) => errors.add("renew_sessions (manual)", &e),
        }
    }

    let window = Duration::from_secs_f64(args.sessions_window_secs());
    let probe = CpuProbe::start(db.kind == BackendKind::Postgres);
    let calls0 = db.stats.snapshot();
    let (pg0, upd0) = match &db.admin {
        Some(a) => (a.activity().await, a.sessions_updates().await),
        None => (None, None),
    };
    tokio::time::sleep(window).await;
    let cpu = probe.finish();
    let calls = db.stats.snapshot().since(&calls0);
    let (pg1, upd1) = match &db.admin {
        Some(a) => (a.activity().await, a.sessions_updates().await),
        None => (None, None),
    };

    // Survival: local state, the store's listing, and a sample of point reads.
    let alive_local = sessions.iter().filter(|s| !s.is_expired()).count();
    let now = store.clock().now();
    let mut listed = 0usize;
    let mut alive_listed = 0usize;
    let mut after: Option<String> = None;
    loop {
        let page = match store
            .session_list(after.as_deref(), fleetdb::core::query::LIST_PAGE_MAX)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                errors.add("session_list", &e);
                break;
            }
        };
        listed += page.items.len();
        alive_listed += page.items.iter().filter(|s| s.deadline > now).count();
        match page.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    let step = (sessions.len() / 100).max(1);
    let mut sampled = 0;
    let mut sampled_alive = 0;
    for s in sessions.iter().step_by(step) {
        sampled += 1;
        match store.session_get(s.id()).await {
            Ok(Some(info)) if info.deadline > store.clock().now() => sampled_alive += 1,
            Ok(_) => {}
            Err(e) => errors.add("session_get", &e),
        }
    }
    let mut problems = Vec::new();
    if sessions.len() != n {
        problems.push(format!("only {} of {n} sessions started", sessions.len()));
    }
    if alive_local != sessions.len() || alive_listed != sessions.len() || sampled_alive != sampled {
        problems.push(format!(
            "sessions lost: alive locally {alive_local}, listed alive {alive_listed} of {listed}, \
             sampled alive {sampled_alive} of {sampled} (of {} started)",
            sessions.len()
        ));
    }
    let renew_calls = calls.calls(Call::session_renew);
    let sweep_calls = calls.calls(Call::session_sweep);
    let all: u64 = CALL_NAMES
        .iter()
        .enumerate()
        .map(|(i, _)| calls.calls.get(i).copied().unwrap_or(0))
        .sum();
    let started = sessions.len().max(1) as f64;
    drop(sessions);
    Ok(SessResult {
        backend: db.kind,
        sessions: n,
        ttl_secs: args.session_ttl_secs,
        start_secs,
        starts_per_sec: n as f64 / start_secs,
        manual_renew_ms,
        window_secs: window.as_secs_f64(),
        renew_calls,
        renew_avg_ms: calls.avg_ms(Call::session_renew),
        sweep_calls,
        other_calls: all - renew_calls - sweep_calls,
        ticks_expected: window.as_secs_f64() / (args.session_ttl_secs / 3.0),
        pg_renewed_rounds: match (upd0, upd1) {
            (Some(a), Some(b)) => Some((b - a) as f64 / started),
            _ => None,
        },
        cpu,
        pg: activity_delta(pg0, pg1),
        alive_local,
        alive_listed,
        listed,
        sampled,
        sampled_alive,
        errors: errors.take(),
        problems,
    })
}

// ---------------------------------------------------------------------------------------------
// Entry points

/// Run the `work` benchmarks and return what was measured.
pub fn run_work(args: WorkArgs) -> WorkReport {
    let mut machine = crate::machine_facts(&crate::TagsetArgs {
        dir: args.dir.clone(),
        sqlite_synchronous: args.sqlite_synchronous,
        ..crate::TagsetArgs::default()
    });
    machine.insert(
        "sqlite_settings".into(),
        match args.sqlite_synchronous {
            SqliteSync::Full => "WAL, synchronous=FULL (Durability::Full)".into(),
            SqliteSync::Normal => {
                "WAL, synchronous=NORMAL (Durability::Normal): NOT durable, diagnostic only".into()
            }
        },
    );
    machine.insert(
        "runtime".into(),
        "tokio multi-thread, 2 workers; producers, workers and the store share it".into(),
    );
    let mut report = WorkReport {
        run_id: uuid::Uuid::new_v4().to_string(),
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        machine,
        args,
        one: Vec::new(),
        burn: Vec::new(),
        sessions: Vec::new(),
        failures: Vec::new(),
        notes: Vec::new(),
    };
    let args = report.args.clone();
    if args.secs <= 0.0
        || args.workers == 0
        || args.producers == 0
        || args.batch == 0
        || args.burndown == 0
        || args.sessions == 0
    {
        report.failures.push(
            "--secs, --workers, --producers, --batch, --burndown and --sessions must be positive"
                .into(),
        );
        return report;
    }
    let rt = match crate::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            report.failures.push(e);
            return report;
        }
    };
    let mut backends = args.backends.clone();
    backends.dedup();
    let mut shapes = args.only.clone();
    shapes.dedup();
    for backend in backends {
        for &shape in &shapes {
            eprintln!("== {} {} ==", backend.name(), shape.name());
            let r = rt.block_on(run_shape(backend, shape, &args, &mut report));
            if let Err(e) = r {
                eprintln!("  failed: {e}");
                report
                    .failures
                    .push(format!("{} {}: {e}", backend.name(), shape.name()));
            }
        }
    }
    drop(rt);
    report.machine.insert("loadavg_end".into(), loadavg());
    report
}

async fn run_shape(
    backend: BackendKind,
    shape: Shape,
    args: &WorkArgs,
    report: &mut WorkReport,
) -> BResult<()> {
    let db = Db::open(backend, args).await?;
    if let Some(a) = &db.admin {
        for (k, q) in [
            ("postgres_server_version", "SHOW server_version"),
            ("postgres_synchronous_commit", "SHOW synchronous_commit"),
            ("postgres_shared_buffers", "SHOW shared_buffers"),
        ] {
            if let Ok(r) = a.client.query_one(q, &[]).await {
                report.machine.insert(k.into(), r.get::<_, String>(0));
            }
        }
    }
    let r = match shape {
        Shape::Oneatatime => one_at_a_time(&db, args).await.map(|m| {
            log_one(&m);
            report.one.push(m)
        }),
        Shape::Burndown => burndown(&db, args).await.map(|m| {
            log_burn(&m);
            report.burn.push(m)
        }),
        Shape::Sessions => sessions_shape(&db, args).await.map(|m| {
            log_sess(&m);
            report.sessions.push(m)
        }),
    };
    let cleanup = db.close().await;
    match (r, cleanup) {
        (Err(e), None) => Err(e),
        (Err(e), Some(c)) => Err(format!("{e}; and then {c}")),
        (Ok(()), Some(c)) => Err(c),
        (Ok(()), None) => Ok(()),
    }
}

fn log_errors(e: &BTreeMap<String, (u64, Vec<String>)>, problems: &[String]) {
    for (k, (n, samples)) in e {
        eprintln!("    errors {k}: {n}");
        for s in samples {
            eprintln!("      {s}");
        }
    }
    for p in problems {
        eprintln!("    problem: {p}");
    }
}

fn log_one(m: &OneResult) {
    eprintln!(
        "  completed/s={:.0} adds/s={:.0} p50={:.1}ms p99={:.1}ms backlog={} left={} calls/job: claim={:.2} commit={:.2} revision={:.2} cpu={:.0}% pg={:.0}%",
        m.completed_per_sec,
        m.adds_per_sec,
        m.p50_ms,
        m.p99_ms,
        m.backlog_at_end,
        m.left_after_drain,
        per(m.calls.calls(Call::claim), m.claims_in_window),
        per(m.calls.calls(Call::commit), m.completed_in_window),
        per(m.calls.calls(Call::revision), m.claims_in_window),
        m.cpu.process_pct,
        m.cpu.postgres_pct
    );
    log_errors(&m.errors, &m.problems);
}

fn log_burn(m: &BurnResult) {
    eprintln!(
        "  jobs/s={:.0} in {:.2}s (insert {:.0}/s) claims={} empty={} cpu={:.0}% pg={:.0}%",
        m.jobs_per_sec,
        m.secs,
        m.insert_per_sec,
        m.claim_calls,
        m.empty_claims,
        m.cpu.process_pct,
        m.cpu.postgres_pct
    );
    log_errors(&m.errors, &m.problems);
}

fn log_sess(m: &SessResult) {
    eprintln!(
        "  {} sessions, {:.0}/s started; window {:.0}s: renew calls={} (avg {:.1} ms) sweeps={} other calls={} cpu={:.1}% pg={:.1}%; alive {}/{} listed, manual renew {:?} ms",
        m.sessions,
        m.starts_per_sec,
        m.window_secs,
        m.renew_calls,
        m.renew_avg_ms,
        m.sweep_calls,
        m.other_calls,
        m.cpu.process_pct,
        m.cpu.postgres_pct,
        m.alive_listed,
        m.listed,
        m.manual_renew_ms
    );
    log_errors(&m.errors, &m.problems);
}

/// Jobs finished per second while draining the backlog after the producers stopped.
pub fn drain_rate(m: &OneResult) -> f64 {
    if m.drain_secs <= 0.0 || m.backlog_at_end == 0 {
        return f64::NAN;
    }
    (m.backlog_at_end - m.left_after_drain) as f64 / m.drain_secs
}

fn per(a: u64, b: u64) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        a as f64 / b as f64
    }
}

/// Run the `work` benchmarks, print the markdown report, append JSON lines if asked. Exit code:
/// 0 all good, 2 a FleetDB call failed or a check did not hold, 1 a shape could not run at all.
pub fn run_work_main(args: WorkArgs) -> i32 {
    let report = run_work(args);
    print!("{}", render_markdown(&report));
    if let Some(path) = &report.args.json {
        if let Err(e) = append_json(&report, path) {
            eprintln!("cannot write {}: {e}", path.display());
            return 1;
        }
    }
    let troubled = report
        .one
        .iter()
        .any(|m| !m.problems.is_empty() || !m.errors.is_empty())
        || report
            .burn
            .iter()
            .any(|m| !m.problems.is_empty() || !m.errors.is_empty())
        || report
            .sessions
            .iter()
            .any(|m| !m.problems.is_empty() || !m.errors.is_empty());
    if !report.failures.is_empty() {
        1
    } else if troubled {
        2
    } else {
        0
    }
}

// ---------------------------------------------------------------------------------------------
// Output

fn f1(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "–".into()
    }
}

fn f2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "–".into()
    }
}

fn yes_no(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "NO"
    }
}

/// (goal text, met) of a one-at-a-time result.
pub fn one_goal(m: &OneResult) -> (String, bool) {
    match m.backend {
        BackendKind::Postgres => (
            format!(
                "≥ {} /s, p99 ≤ {} ms",
                fmt_int(GOAL_ONE_PG_PER_SEC),
                GOAL_ONE_PG_P99_MS
            ),
            m.completed_per_sec >= GOAL_ONE_PG_PER_SEC && m.p99_ms <= GOAL_ONE_PG_P99_MS,
        ),
        BackendKind::Sqlite => (
            format!("≥ {} /s", fmt_int(GOAL_ONE_SQLITE_PER_SEC)),
            m.completed_per_sec >= GOAL_ONE_SQLITE_PER_SEC,
        ),
    }
}

/// (goal text, met) of a burn-down result (the issue sets one for PostgreSQL only).
pub fn burn_goal(m: &BurnResult) -> Option<(String, bool)> {
    match m.backend {
        BackendKind::Postgres => Some((
            format!("≥ {} /s", fmt_int(GOAL_BURN_PG_PER_SEC)),
            m.complete && m.jobs_per_sec >= GOAL_BURN_PG_PER_SEC,
        )),
        BackendKind::Sqlite => None,
    }
}

/// CPU of keeping the sessions alive: this process plus the PostgreSQL server (if any).
pub fn sessions_total_cpu(m: &SessResult) -> f64 {
    m.cpu.process_pct
        + if m.cpu.postgres_pct.is_finite() {
            m.cpu.postgres_pct
        } else {
            0.0
        }
}

/// (goal text, met): at most one renewal statement per tick, under 10 % of one core (client +
/// server), and every session alive.
pub fn sessions_goal(m: &SessResult) -> (String, bool) {
    let per_tick_ok = (m.renew_calls as f64) <= m.ticks_expected.ceil() + 1.0;
    (
        format!("≤ 1 statement/tick, < {GOAL_SESSIONS_CPU_PCT} % CPU, all alive"),
        per_tick_ok && sessions_total_cpu(m) < GOAL_SESSIONS_CPU_PCT && m.problems.is_empty(),
    )
}

pub fn render_markdown(r: &WorkReport) -> String {
    use std::fmt::Write as _;
    let a = &r.args;
    let mut s = String::new();
    let _ = writeln!(s, "## fleetdb-bench work (run {})\n", r.run_id);
    let _ = writeln!(s, "Machine:\n");
    for (k, v) in &r.machine {
        let _ = writeln!(s, "- {k}: {v}");
    }

    if !r.one.is_empty() {
        let _ = writeln!(
            s,
            "\n### One-at-a-time: {} producers (one add per awaited call), {} workers (claim_wait 1 + finish), {} s window after {} s warm-up\n",
            a.producers, a.workers, a.secs, a.warmup_secs
        );
        let _ = writeln!(
            s,
            "An add is one transaction (object `job/<{}>` + tag `{ELIGIBLE}` = {{\"t\": µs}}); the \
             finish deletes `{ELIGIBLE}` in the finishing transaction. Latency = claim returned − t \
             (t taken just before the add call, so it includes the add's round trip; looked up in \
             a map the producers fill). completed/s = finishes inside the window.\n",
            if a.random_ids { "uuid v4" } else { "uuid v7, time-ordered" }
        );
        let _ = writeln!(
            s,
            "| system | backend | completed/s | adds/s | add→claim p50 ms | p90 ms | p99 ms | max ms | backlog at window end | drained/s (producers stopped) | left after drain | errors | goal | met |"
        );
        let _ = writeln!(
            s,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
        );
        for m in &r.one {
            let (goal, met) = one_goal(m);
            let _ = writeln!(
                s,
                "| **FleetDB**{} | {} | **{}** | {} | {} | {} | **{}** | {} | {} | {} | {} | {} | {goal} | {} |",
                if m.rate > 0.0 {
                    format!(", adds paced at {}/s", fmt_int(m.rate))
                } else {
                    String::new()
                },
                m.backend.name(),
                fmt_int(m.completed_per_sec),
                fmt_int(m.adds_per_sec),
                f1(m.p50_ms),
                f1(m.p90_ms),
                f1(m.p99_ms),
                f1(m.max_ms),
                fmt_int(m.backlog_at_end as f64),
                fmt_int(drain_rate(m)),
                fmt_int(m.left_after_drain as f64),
                errors_total(&m.errors),
                yes_no(met)
            );
        }
        for (sys, per_s, p50, p99) in PEER_ONE {
            let _ = writeln!(
                s,
                "| {sys} (peer) | postgres | {} | – | {} | – | {} | – | – | – | – | – | – | – |",
                fmt_int(*per_s),
                f1(*p50),
                f1(*p99)
            );
        }
        let _ = writeln!(
            s,
            "\nWhere the time goes (window; backend calls counted by a wrapper around the backend; \
             CPU in % of one core of {}; other = the rest of the machine: kernel I/O threads, other \
             processes):\n",
            r.machine.get("nproc").map_or("?", String::as_str)
        );
        let _ = writeln!(
            s,
            "| backend | claim calls/s (mean ms) | jobs claimed/s | revision polls/s | commit calls/s (mean ms) | commits per add or finish | claim_wait mean ms | finish mean ms | add call p50 / p99 ms | process CPU % | postgres CPU % | other CPU % | PG commits / rollbacks per s | claim attempts rolled back (token gap, whole run) |"
        );
        let _ = writeln!(
            s,
            "|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---|---:|"
        );
        for m in &r.one {
            let pg = m.pg.map_or("–".into(), |p| {
                format!(
                    "{} / {}",
                    fmt_int(p.xact_commit as f64 / m.secs),
                    fmt_int(p.xact_rollback as f64 / m.secs)
                )
            });
            let rate = |c: Call| fmt_int(m.calls.calls(c) as f64 / m.secs);
            let _ = writeln!(
                s,
                "| {} | {} ({}) | {} | {} | {} ({}) | {} | {} | {} | {} / {} | {} | {} | {} | {pg} | {} |",
                m.backend.name(),
                rate(Call::claim),
                f2(m.calls.avg_ms(Call::claim)),
                fmt_int(m.claims_in_window as f64 / m.secs),
                rate(Call::revision),
                rate(Call::commit),
                f2(m.calls.avg_ms(Call::commit)),
                f2(per(
                    m.calls.calls(Call::commit),
                    m.adds_in_window + m.completed_in_window
                )),
                f2(m.claim_wait_avg_ms),
                f2(m.finish_avg_ms),
                f2(m.add_p50_ms),
                f2(m.add_p99_ms),
                f1(m.cpu.process_pct),
                f1(m.cpu.postgres_pct),
                f1(m.cpu.others_pct),
                m.token_gap
            );
        }
    }

    if !r.burn.is_empty() {
        let _ = writeln!(
            s,
            "\n### Burn-down: {} eligible objects, {} workers, claims of {}, one transaction per batch (delete the tags and finish: {})\n",
            fmt_int(a.burndown as f64),
            a.workers,
            a.batch,
            match a.finish_and_claim {
                true => "finish_many_and_claim, which also claims the next batch",
                false => "finish_many_with",
            }
        );
        let _ = writeln!(
            s,
            "| system | backend | jobs/s | seconds | complete | bulk insert objects/s | claim calls | empty claims | errors | goal | met |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---|---:|---:|---:|---:|---|---|");
        for m in &r.burn {
            let (goal, met) = burn_goal(m).map_or(("–".into(), "–"), |(g, ok)| (g, yes_no(ok)));
            let _ = writeln!(
                s,
                "| **FleetDB** | {} | **{}** | {:.2} | {} | {} | {} | {} | {} | {goal} | {met} |",
                m.backend.name(),
                fmt_int(m.jobs_per_sec),
                m.secs,
                if m.complete { "yes" } else { "INCOMPLETE" },
                fmt_int(m.insert_per_sec),
                fmt_int(m.claim_calls as f64),
                fmt_int(m.empty_claims as f64),
                errors_total(&m.errors)
            );
        }
        for (sys, per_s) in PEER_BURN {
            let _ = writeln!(
                s,
                "| {sys} (peer, c=8) | postgres | {} | – | – | – | – | – | – | – | – |",
                fmt_int(*per_s)
            );
        }
        let _ = writeln!(
            s,
            "\nWhere the time goes (summed over workers; % of the workers' wall time):\n"
        );
        let _ = writeln!(
            s,
            "| backend | claim: calls, mean ms, % | delete txn: calls, mean ms, % | finish (and claim): calls, mean ms, % | backend commits | process CPU % | postgres CPU % | other CPU % | PG commits / rollbacks | claim attempts rolled back (token gap) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---:|---:|---:|---:|---|---:|");
        for m in &r.burn {
            let phase = |(n, t): (u64, f64)| {
                format!(
                    "{}, {}, {:.0} %",
                    fmt_int(n as f64),
                    f2(if n == 0 { f64::NAN } else { t * 1e3 / n as f64 }),
                    100.0 * t / m.worker_secs.max(1e-9)
                )
            };
            let pg = m.pg.map_or("–".into(), |p| {
                format!(
                    "{} / {}",
                    fmt_int(p.xact_commit as f64),
                    fmt_int(p.xact_rollback as f64)
                )
            });
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {pg} | {} |",
                m.backend.name(),
                phase(m.claim_phase),
                phase(m.delete_phase),
                phase(m.finish_phase),
                fmt_int(m.calls.calls(Call::commit) as f64),
                f1(m.cpu.process_pct),
                f1(m.cpu.postgres_pct),
                f1(m.cpu.others_pct),
                m.token_gap
            );
        }
    }

    if !r.sessions.is_empty() {
        let _ = writeln!(
            s,
            "\n### Sessions: {} live sessions in one process, TTL {} s (renewal every TTL/3), {} s window\n",
            fmt_int(a.sessions as f64),
            a.session_ttl_secs,
            a.sessions_window_secs()
        );
        let _ = writeln!(
            s,
            "| system | backend | sessions | started/s | renewal calls in window (ticks expected) | statements per renewal | mean renewal ms | manual renew_sessions ms | process CPU % | postgres CPU % | total CPU % | other CPU % | alive at end | goal | met |"
        );
        let _ = writeln!(
            s,
            "|---|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---|---|---|"
        );
        for m in &r.sessions {
            let (goal, met) = sessions_goal(m);
            let manual = m
                .manual_renew_ms
                .iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" / ");
            let stmts = match m.pg_renewed_rounds {
                Some(rounds) => {
                    format!("1 (one UPDATE; sessions rows updated ÷ sessions = {rounds:.1} rounds)")
                }
                None => "1 (one UPDATE)".into(),
            };
            let _ = writeln!(
                s,
                "| **FleetDB** | {} | {} | {} | {} ({:.1}) | {stmts} | {} | {manual} | {} | {} | **{}** | {} | {} listed alive of {}, {}/{} sampled, {} alive locally | {goal} | {} |",
                m.backend.name(),
                fmt_int(m.sessions as f64),
                fmt_int(m.starts_per_sec),
                m.renew_calls,
                m.ticks_expected,
                f1(m.renew_avg_ms),
                f1(m.cpu.process_pct),
                f1(m.cpu.postgres_pct),
                f1(sessions_total_cpu(m)),
                f1(m.cpu.others_pct),
                fmt_int(m.alive_listed as f64),
                fmt_int(m.listed as f64),
                m.sampled_alive,
                m.sampled,
                fmt_int(m.alive_local as f64),
                yes_no(met)
            );
        }
        let _ = writeln!(
            s,
            "| etcd 3.4.23 (peer) | – | 10,000 leases | 2,338 grants/s | ~3,100 keepalives/s, one stream | – | – | – | client ~15 | etcd {PEER_ETCD_LEASE_CPU} | {PEER_ETCD_LEASE_CPU} (server) | – | all survived | – | – |"
        );
        let _ = writeln!(
            s,
            "\nOther backend calls in the window (besides renewals): sweeps {}.",
            r.sessions
                .iter()
                .map(|m| format!(
                    "{}: {} sweeps, {} other",
                    m.backend.name(),
                    m.sweep_calls,
                    m.other_calls
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }

    let mut trouble = String::new();
    let mut section = |label: String, e: &BTreeMap<String, (u64, Vec<String>)>, p: &[String]| {
        if e.is_empty() && p.is_empty() {
            return;
        }
        let _ = writeln!(trouble, "- {label}:");
        for (k, (n, samples)) in e {
            let _ = writeln!(trouble, "  - {k}: {n}");
            for x in samples {
                let _ = writeln!(trouble, "    - `{x}`");
            }
        }
        for x in p {
            let _ = writeln!(trouble, "  - problem: {x}");
        }
    };
    for m in &r.one {
        section(
            format!("{} one-at-a-time", m.backend.name()),
            &m.errors,
            &m.problems,
        );
    }
    for m in &r.burn {
        section(
            format!("{} burn-down", m.backend.name()),
            &m.errors,
            &m.problems,
        );
    }
    for m in &r.sessions {
        section(
            format!("{} sessions", m.backend.name()),
            &m.errors,
            &m.problems,
        );
    }
    if !trouble.is_empty() {
        let _ = writeln!(
            s,
            "\nErrors (FleetDB calls that failed, exact text) and problems:\n"
        );
        s.push_str(&trouble);
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\nNotes:\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
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

fn cpu_json(c: &Cpu) -> serde_json::Value {
    json!({
        "process_pct_of_1_core": num(c.process_pct),
        "postgres_pct_of_1_core": num(c.postgres_pct),
        "other_processes_pct_of_1_core": num(c.others_pct),
    })
}

fn pg_json(p: &Option<PgActivity>) -> serde_json::Value {
    match p {
        Some(p) => json!({"xact_commit": p.xact_commit, "xact_rollback": p.xact_rollback}),
        None => serde_json::Value::Null,
    }
}

pub fn json_lines(r: &WorkReport) -> Vec<serde_json::Value> {
    let a = &r.args;
    let mut out = vec![json!({
        "type": "machine",
        "run_id": r.run_id,
        "started_unix": r.started_unix,
        "bench": "work",
        "secs": a.secs,
        "warmup_secs": a.warmup_secs,
        "producers": a.producers, "rate": a.rate,
        "workers": a.workers,
        "burndown": a.burndown,
        "batch": a.batch,
        "sessions": a.sessions,
        "session_ttl_secs": a.session_ttl_secs,
        "sessions_secs": a.sessions_window_secs(),
        "random_ids": a.random_ids,
        "sqlite_synchronous": a.sqlite_synchronous.pragma(),
        "machine": r.machine,
        "failures": r.failures,
        "notes": r.notes,
    })];
    for m in &r.one {
        let (goal, met) = one_goal(m);
        out.push(json!({
            "type": "result", "run_id": r.run_id, "bench": "work", "shape": "oneatatime",
            "backend": m.backend.name(), "producers": m.producers, "workers": m.workers,
            "secs": m.secs,
            "completed_per_sec": num(m.completed_per_sec), "adds_per_sec": num(m.adds_per_sec),
            "claims_in_window": m.claims_in_window, "completed_in_window": m.completed_in_window,
            "latency_n": m.lat_n, "p50_ms": num(m.p50_ms), "p90_ms": num(m.p90_ms),
            "p99_ms": num(m.p99_ms), "max_ms": num(m.max_ms),
            "add_call_p50_ms": num(m.add_p50_ms), "add_call_p99_ms": num(m.add_p99_ms),
            "claim_wait_avg_ms": num(m.claim_wait_avg_ms), "finish_avg_ms": num(m.finish_avg_ms),
            "backlog_at_window_end": m.backlog_at_end, "left_after_drain": m.left_after_drain,
            "drain_secs": m.drain_secs, "drained_per_sec": num(drain_rate(m)),
            "adds_total": m.adds_total,
            "finished_total": m.finished_total, "token_gap": m.token_gap,
            "backend_calls": m.calls.to_json(), "cpu": cpu_json(&m.cpu), "pg": pg_json(&m.pg),
            "errors": errors_json(&m.errors), "problems": m.problems,
            "goal": goal, "goal_met": met,
            "peers": PEER_ONE.iter().map(|(sys, v, p50, p99)| json!({"system": sys, "completed_per_sec": v, "p50_ms": p50, "p99_ms": p99})).collect::<Vec<_>>(),
        }));
        if let Some(row) = out.last_mut().and_then(serde_json::Value::as_object_mut) {
            row.insert("rate".into(), num(m.rate));
        }
    }
    for m in &r.burn {
        let goal = burn_goal(m);
        out.push(json!({
            "type": "result", "run_id": r.run_id, "bench": "work", "shape": "burndown",
            "backend": m.backend.name(), "n": m.n, "workers": m.workers, "batch": m.batch,
            "complete": m.complete, "done": m.done, "secs": m.secs,
            "jobs_per_sec": num(m.jobs_per_sec), "bulk_insert_secs": m.insert_secs,
            "bulk_insert_per_sec": num(m.insert_per_sec), "claim_calls": m.claim_calls,
            "empty_claims": m.empty_claims,
            "phases": {
                "claim": {"calls": m.claim_phase.0, "secs": m.claim_phase.1},
                "delete_txn": {"calls": m.delete_phase.0, "secs": m.delete_phase.1},
                "finish_many": {"calls": m.finish_phase.0, "secs": m.finish_phase.1},
                "worker_secs": m.worker_secs,
            },
            "token_gap": m.token_gap,
            "backend_calls": m.calls.to_json(), "cpu": cpu_json(&m.cpu), "pg": pg_json(&m.pg),
            "errors": errors_json(&m.errors), "problems": m.problems,
            "goal": goal.as_ref().map(|g| g.0.clone()), "goal_met": goal.map(|g| g.1),
            "peers": PEER_BURN.iter().map(|(sys, v)| json!({"system": sys, "jobs_per_sec": v})).collect::<Vec<_>>(),
        }));
    }
    for m in &r.sessions {
        let (goal, met) = sessions_goal(m);
        out.push(json!({
            "type": "result", "run_id": r.run_id, "bench": "work", "shape": "sessions",
            "backend": m.backend.name(), "sessions": m.sessions, "ttl_secs": m.ttl_secs,
            "start_secs": m.start_secs, "starts_per_sec": num(m.starts_per_sec),
            "manual_renew_ms": m.manual_renew_ms, "window_secs": m.window_secs,
            "renew_calls": m.renew_calls, "renew_avg_ms": num(m.renew_avg_ms),
            "sweep_calls": m.sweep_calls, "other_calls": m.other_calls,
            "ticks_expected": m.ticks_expected,
            "pg_renewed_rounds": m.pg_renewed_rounds.map(num),
            "cpu": cpu_json(&m.cpu), "total_cpu_pct": num(sessions_total_cpu(m)),
            "pg": pg_json(&m.pg),
            "alive_local": m.alive_local, "alive_listed": m.alive_listed, "listed": m.listed,
            "sampled": m.sampled, "sampled_alive": m.sampled_alive,
            "errors": errors_json(&m.errors), "problems": m.problems,
            "goal": goal, "goal_met": met,
            "peer": {"system": "etcd 3.4.23", "leases": 10000, "ttl_secs": 10, "cpu_pct_of_1_core": PEER_ETCD_LEASE_CPU},
        }));
    }
    out
}

fn append_json(r: &WorkReport, path: &Path) -> std::io::Result<()> {
    crate::append_lines(path, json_lines(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_args_match_the_issue() {
        let a = WorkArgs::default();
        assert_eq!(a.secs, 10.0);
        assert_eq!(a.warmup_secs, 2.0);
        assert_eq!((a.producers, a.workers), (8, 8));
        assert_eq!(a.burndown, 50_000);
        assert_eq!(a.batch, 100);
        assert_eq!(a.sessions, 10_000);
        assert_eq!(a.sessions_window_secs(), 30.0);
        assert_eq!(a.backends, vec![BackendKind::Sqlite, BackendKind::Postgres]);
        assert_eq!(
            a.only,
            vec![Shape::Oneatatime, Shape::Burndown, Shape::Sessions]
        );
        assert_eq!(a.sqlite_synchronous, SqliteSync::Full);
    }

    #[test]
    fn lists_parse() {
        let a = WorkArgs::parse_from([
            "work",
            "--only",
            "burndown,sessions",
            "--backends",
            "postgres",
            "--secs",
            "2",
        ]);
        assert_eq!(a.only, vec![Shape::Burndown, Shape::Sessions]);
        assert_eq!(a.backends, vec![BackendKind::Postgres]);
        assert_eq!(a.sessions_window_secs(), 6.0);
    }

    #[test]
    fn v7_ids_are_time_ordered_and_valid_keys() {
        let a = job_id(false);
        std::thread::sleep(Duration::from_millis(2));
        let b = job_id(false);
        assert!(a < b, "{a} {b}");
        assert!(job_key(&a).is_ok());
        assert!(job_key(&job_id(true)).is_ok());
    }

    #[test]
    fn proc_stat_parses() {
        let line = "123 (postgres: x (y)) S 1 2 3 4 5 6 7 8 9 10 250 150 30 20 0 0";
        assert_eq!(stat_cpu_secs(line, false), Some(4.0));
        assert_eq!(stat_cpu_secs(line, true), Some(4.5));
        assert!(self_cpu_secs().is_finite());
    }

    #[test]
    fn call_snapshots_subtract() {
        let s = CallStats::default();
        s.record(Call::claim, Duration::from_millis(2), false);
        let a = s.snapshot();
        s.record(Call::claim, Duration::from_millis(4), true);
        s.record(Call::commit, Duration::from_millis(1), false);
        let d = s.snapshot().since(&a);
        assert_eq!(d.calls(Call::claim), 1);
        assert_eq!(d.errors(Call::claim), 1);
        assert_eq!(d.calls(Call::commit), 1);
        assert!((d.avg_ms(Call::claim) - 4.0).abs() < 1e-9);
        assert!(d.avg_ms(Call::revision).is_nan());
    }

    #[test]
    fn error_kinds() {
        let e = fleetdb::Error::SessionExpired {
            session_id: "s".into(),
        };
        assert_eq!(error_kind(&e), "SessionExpired");
        let log = ErrorLog::default();
        log.add("claim", &e);
        log.add("claim", &e);
        let m = log.take();
        assert_eq!(m["claim: SessionExpired"].0, 2);
        assert_eq!(m["claim: SessionExpired"].1.len(), 1);
    }
}
