//! # FleetDB
//!
//! The state and coordination store for infrastructure control planes: objects with labels and
//! typed tags in namespaces, a change log with a global revision, and atomic transactions, on
//! embedded SQLite (zero setup) or PostgreSQL.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> fleetdb::Result<()> {
//! use fleetdb::{ObjectKey, Store};
//! use serde_json::json;
//!
//! let store = Store::open("sqlite::memory:").await?;
//! let m1 = ObjectKey::new("default", "machine", "m1")?;
//! store.object_put(&m1, [("provider".to_string(), "equinix".to_string())].into()).await?;
//! store.tag_set(&m1, "provided", &json!({"provider_id": "x1"})).await?;
//! let tag = store.tag_get(&m1, "provided").await?.expect("just set");
//! assert_eq!(tag.value["provider_id"], "x1");
//! # Ok(()) }
//! ```
//!
//! [`Store`] is the one user-facing type. It validates every input at the edge and talks to a
//! [`Backend`]: SQLite, PostgreSQL, or (later) a remote server: the same API either way.

// The documentation's links all lead somewhere a reader of `fleetdb`'s docs can follow:
// `cargo doc -p fleetdb` fails on a broken link or one to an item the crate does not export.
#![deny(rustdoc::broken_intra_doc_links, rustdoc::private_intra_doc_links)]

mod clock;
mod content;
pub mod gc;
pub mod metrics;
mod session;
mod txn;
pub mod watch;
mod world;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use clock::{CLOCK_OFFSET_WARN, CLOCK_SYNC_INTERVAL};
pub use content::{BlobWriter, BLOB_LIST_PAGE_MAX};
pub use fleetdb_core::backend::{AppliedMigration, MigrationInfo, WorkStats};
pub use fleetdb_core::content::IngestStatus;
// Every type a public method takes or returns is named here, at the crate root: an embedding
// program never reaches into `fleetdb::core`'s modules for them (`tests/public_api.rs`).
pub use fleetdb_core::gc::{BlobInfo, GcKind, GcStats, Lease, Resource};
use fleetdb_core::validate;
pub use fleetdb_core::work::{
    Backoff, BackoffInfo, BackoffWhich, HistoryEntry, HistoryFilter, Holder, Outcome, Process,
    SelectorCheck, SessionInfo, SessionSpec, WorkCursor, WorkEvent, WorkExplain, WorkInfo,
    WorkListing,
};
pub use fleetdb_core::world::{
    Deploy, DeployDraft, DeployFile, DeployFileDraft, Export, ExportFilter, ExportId,
    ExportOutcome, ExportRecord, KvEntry, Lifetime, Registration, Schedule, ScheduleOptions,
    Strategy,
};
pub use fleetdb_core::{
    self as core, parse_label_selector, Applied, Backend, Batch, Capabilities, Change,
    ChangeFilter, ChangeOp, Clock, Entity, Error, LabelRequirement, Labels, Limits, ManualClock,
    Namespace, Object, ObjectCursor, ObjectKey, ObjectQuery, Op, OpResult, Page, Precondition,
    PutMode, Result, Revision, RevisionInfo, SchemaStatus, ServerClock, SystemClock, Tag,
    Timestamp, DEFAULT_NAMESPACE,
};
#[cfg(feature = "postgres")]
pub use fleetdb_postgres::{PostgresBackend, PostgresOptions};
pub use fleetdb_sqlite::{
    file_schema_status as sqlite_file_schema_status, parse_url as sqlite_location, Durability,
    Location as SqliteLocation, SqliteBackend, SqliteOptions,
};
pub use gc::{ExternalCollector, GcOptions, GcStatus, LeaseSpec, GC_RUNS_KEPT};
pub use session::{
    Fence, Session, Work, CLAIM_WAIT_POLL, CLAIM_WAIT_RETRY, SWEEP_SESSIONS_MAX, UNPARK_BATCH,
};

/// Most selectors one store's metrics track ([`Store::metrics_track_selector`]).
pub const TRACKED_SELECTORS_MAX: usize = 100;
pub use txn::Txn;
pub use watch::{Watch, WatchEvent, WatchRequest, WatchScope};
pub use world::World;

/// The database used when none is given: an embedded SQLite file under the current folder.
pub const DEFAULT_URL: &str = "sqlite://fleetdb-data/fleetdb.sqlite";

/// The result of a write: the item as it now is, and whether the write changed anything (writing
/// identical content is a no-op: no new revision, no change-log row).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Written<T> {
    pub item: T,
    pub changed: bool,
}

/// Options for [`Store::open_with`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Apply pending schema migrations at open (default: yes). When no, a database behind this
    /// binary opens, but every data call returns `SchemaBehind` until [`Store::migrate`].
    pub migrate: bool,
    /// Durability of the embedded backend (default: full; each commit is on disk when it returns).
    pub durability: Durability,
    pub limits: Limits,
    /// The store's clock, used as given (tests pass a [`ManualClock`]). `None` (the default):
    /// this host's wall clock on SQLite (every process of a SQLite database runs on its host),
    /// and the database server's clock on PostgreSQL ([`ServerClock`], sampled at open and every
    /// [`CLOCK_SYNC_INTERVAL`]): the processes of a fleet compare session deadlines, claims and
    /// backoffs on one clock whatever their hosts' clocks say.
    pub clock: Option<Arc<dyn Clock>>,
    /// PostgreSQL connections kept in the pool.
    pub postgres_pool_size_max: usize,
    /// Run the background task: session renewal (every TTL/3), the sweeper of expired sessions
    /// (every second) and history pruning. Tests that drive time by hand turn it off.
    pub background: bool,
    /// Delete work history older than this (checked with every sweep), all but the newest row.
    /// `None` keeps it all.
    pub history_retention: Option<Duration>,
    /// Compact the change log by age: drop the entries written before `now − retention`
    /// ([`Store::compact_older_than`], after every sweep). `None` keeps every entry until
    /// [`Store::compact`]. A watch or reader behind the retention gets `Compacted` and relists.
    pub change_retention: Option<Duration>,
    /// Watches look at the change log at least this often, even without a wake-up (changes of
    /// this process, and of others on PostgreSQL via NOTIFY, wake them at once).
    pub watch_poll_interval: Duration,
    /// An idle watch gets a progress event (the current revision) this often.
    pub watch_progress_interval: Duration,
    /// When the garbage collector runs by itself (with `background`).
    pub gc: GcOptions,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            migrate: true,
            durability: Durability::Full,
            limits: Limits::default(),
            clock: None,
            postgres_pool_size_max: 16,
            background: true,
            history_retention: None,
            change_retention: None,
            watch_poll_interval: Duration::from_secs(1),
            watch_progress_interval: Duration::from_secs(5),
            gc: GcOptions::default(),
        }
    }
}

/// A handle on a FleetDB database. Cheap to clone; clones share the connection(s).
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    ready: Arc<Ready>,
    keeper: Arc<session::Keeper>,
    metrics: metrics::Metrics,
    background: Arc<Background>,
    hub: Arc<watch::Hub>,
    hub_timing: watch::HubTiming,
    gc: Arc<gc::GcState>,
}

/// Whether the database's schema is this binary's, and when that was last read.
#[derive(Debug, Default)]
pub(crate) struct Ready {
    ok: AtomicBool,
    /// The store clock's time of the last read (µs).
    checked: std::sync::atomic::AtomicI64,
}

/// How often a running store reads the schema version again, on the first call after it is
/// due: a newer binary of another process (a rolling upgrade) may have migrated the database,
/// and this one must stop writing with its older idea of the schema (`SchemaTooNew`).
pub const SCHEMA_RECHECK: Duration = Duration::from_secs(1);

/// Whether a background task of the store (session renewal and sweeps, a sweep, the watch hub,
/// the announcer, the collector's scheduler) runs. The task's future holds the [`Running`] that
/// [`TaskFlag::start`] hands out: it drops when the task ends, and also when the runtime the
/// task was spawned on shuts down (a runtime drops its tasks' futures), so the next call that
/// wants the task starts it again on the caller's runtime ([`Store::keep_background_running`]).
/// A flag set for good instead left a store that outlived the runtime it was opened on (a
/// setup runtime, a test's runtime, a runtime per call) without renewals, watches or
/// collections, believing them running.
#[derive(Debug, Default)]
pub(crate) struct TaskFlag {
    running: Arc<AtomicBool>,
    /// Started once: restarted by [`Store::keep_background_running`] when it stopped.
    wanted: AtomicBool,
}

impl TaskFlag {
    /// The task's [`Running`] if it was not running (the caller spawns it), else `None`.
    pub(crate) fn start(&self) -> Option<Running> {
        if self.running.load(Ordering::Acquire) {
            return None;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return None;
        }
        self.wanted.store(true, Ordering::Relaxed);
        Some(Running(self.running.clone()))
    }

    /// Started before and not running now.
    pub(crate) fn stopped(&self) -> bool {
        self.wanted.load(Ordering::Relaxed) && !self.running.load(Ordering::Acquire)
    }
}

/// Held by a running background task (see [`TaskFlag`]); clears its flag when dropped.
#[derive(Debug)]
pub(crate) struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Settings of the background task.
#[derive(Debug, Default)]
pub(crate) struct Background {
    pub(crate) enabled: AtomicBool,
    pub(crate) history_retention: std::sync::Mutex<Option<Duration>>,
    pub(crate) change_retention: std::sync::Mutex<Option<Duration>>,
}

/// A store reference that does not keep the store open (for background tasks).
struct WeakStore {
    backend: std::sync::Weak<dyn Backend>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    ready: Arc<Ready>,
    keeper: std::sync::Weak<session::Keeper>,
    metrics: metrics::Metrics,
    background: Arc<Background>,
    hub: std::sync::Weak<watch::Hub>,
    hub_timing: watch::HubTiming,
    gc: std::sync::Weak<gc::GcState>,
}

impl WeakStore {
    fn upgrade(&self) -> Option<Store> {
        Some(Store {
            backend: self.backend.upgrade()?,
            clock: self.clock.clone(),
            limits: self.limits.clone(),
            ready: self.ready.clone(),
            keeper: self.keeper.upgrade()?,
            metrics: self.metrics.clone(),
            background: self.background.clone(),
            hub: self.hub.upgrade()?,
            hub_timing: self.hub_timing,
            gc: self.gc.upgrade()?,
        })
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish()
    }
}

fn expect_applied<T>(
    mut results: Vec<OpResult>,
    pick: impl FnOnce(Applied) -> Option<T>,
) -> Result<Written<T>> {
    let r = results
        .pop()
        .ok_or_else(|| Error::Backend("the backend returned no result for a write".into()))?;
    let changed = r.changed;
    pick(r.applied)
        .map(|item| Written { item, changed })
        .ok_or_else(|| {
            Error::Backend("the backend returned the wrong kind of result for a write".into())
        })
}

impl Store {
    /// Open the database at `url` with default options. `""` means [`DEFAULT_URL`].
    ///
    /// URLs: `sqlite:///abs/path/db.sqlite`, `sqlite://relative/path.sqlite`, `sqlite::memory:`,
    /// `postgres://user@host:port/db`.
    pub async fn open(url: &str) -> Result<Store> {
        Store::open_with(url, OpenOptions::default()).await
    }

    pub async fn open_with(url: &str, options: OpenOptions) -> Result<Store> {
        let url = if url.is_empty() { DEFAULT_URL } else { url };
        // Every option is checked before the database is touched: a refused open creates,
        // migrates and writes nothing.
        options.gc.validate()?;
        let (backend, clock): (Arc<dyn Backend>, Arc<dyn Clock>) = if url.starts_with("sqlite:") {
            let location = fleetdb_sqlite::parse_url(url)?;
            let opts = SqliteOptions {
                migrate: options.migrate,
                durability: options.durability,
                ..SqliteOptions::default()
            };
            let clock = options
                .clock
                .clone()
                .unwrap_or_else(|| Arc::new(SystemClock));
            let backend = SqliteBackend::open(location, opts, clock.clone()).await?;
            (Arc::new(backend), clock)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            open_postgres(url, &options).await?
        } else {
            return Err(Error::invalid(
                "database URL",
                url,
                "must start with sqlite: (sqlite:///path, sqlite::memory:) or postgres://",
            ));
        };
        let mut store = Store::from_backend(backend, clock, options.limits).await?;
        store.clock_offset_seen();
        store.hub_timing = watch::HubTiming {
            poll: options.watch_poll_interval.max(Duration::from_millis(1)),
            progress: options
                .watch_progress_interval
                .max(Duration::from_millis(1)),
        };
        store
            .background
            .enabled
            .store(options.background, Ordering::SeqCst);
        *store
            .background
            .history_retention
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = options.history_retention;
        *store
            .background
            .change_retention
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = options.change_retention;
        // A sweeper in every connected process: dead sessions are cleaned up even where no
        // session of this process runs.
        store.start_background();
        store.gc_set_options(options.gc.clone())?;
        if options.background {
            store.start_gc();
        }
        Ok(store)
    }

    /// Wrap an already opened backend. `clock` must be the one the backend was opened with (for
    /// a PostgreSQL backend on the server's clock, the `ServerClock` given to
    /// `PostgresBackend::open_on_server_clock`): the store and its backend compare times.
    pub async fn from_backend(
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        limits: Limits,
    ) -> Result<Store> {
        let status = backend.schema_status().await?;
        let ready = status.database == status.binary;
        let checked = clock.now().0;
        // The backend's retries before this store existed are not this store's.
        let metrics = metrics::Metrics::default();
        metrics.backend_retries_before(backend.retries());
        Ok(Store {
            backend,
            clock,
            limits,
            ready: Arc::new(Ready {
                ok: AtomicBool::new(ready),
                checked: std::sync::atomic::AtomicI64::new(checked),
            }),
            keeper: Arc::default(),
            metrics,
            background: Arc::new(Background {
                enabled: AtomicBool::new(true),
                history_retention: std::sync::Mutex::new(None),
                change_retention: std::sync::Mutex::new(None),
            }),
            hub: Arc::default(),
            gc: Arc::default(),
            hub_timing: watch::HubTiming {
                poll: Duration::from_secs(1),
                progress: Duration::from_secs(5),
            },
        })
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn downgrade(&self) -> WeakStore {
        WeakStore {
            backend: Arc::downgrade(&self.backend),
            clock: self.clock.clone(),
            limits: self.limits.clone(),
            ready: self.ready.clone(),
            keeper: Arc::downgrade(&self.keeper),
            metrics: self.metrics.clone(),
            background: self.background.clone(),
            hub: Arc::downgrade(&self.hub),
            hub_timing: self.hub_timing,
            gc: Arc::downgrade(&self.gc),
        }
    }

    /// A write committed: wake this process's watches and tell other processes. The write
    /// touched what `touched` says ([`session::touched`]; [`session::Touched::Nothing`] for
    /// writes that cannot make a claim candidate) and returned `results`, maybe followed in its
    /// transaction by a claim: `claimed` = (process, selector, limit, how many it got). Waiting
    /// claims are woken as [`session::ClaimWakes`] says; the revisions the batch wrote are noted
    /// as this store's own, which the waiting claims' revision poll then does not take for
    /// another process's change.
    pub(crate) fn committed_batch(
        &self,
        touched: session::Touched,
        results: &[OpResult],
        claimed: Option<(&str, &str, usize, usize)>,
    ) {
        self.hub.committed();
        self.keeper
            .own_revisions
            .note(results.iter().filter_map(|r| match &r.applied {
                Applied::Object(o) => Some(o.revision),
                Applied::Tag(t) => Some(t.revision),
                Applied::Deleted { revision } => Some(*revision),
                _ => None,
            }));
        let except = claimed.and_then(|(process, selector, limit, got)| {
            (got < limit).then_some((process, selector))
        });
        self.keeper.claim_wakes.committed(except, &touched);
        self.start_announcer();
    }

    /// Start again the background tasks that stopped while the store lives: the runtime they
    /// ran on shut down (see [`TaskFlag`]). Every call of the store comes by here (`ready`).
    pub(crate) fn keep_background_running(&self) {
        self.start_background();
        self.start_gc();
        if self.hub.started.stopped() {
            self.start_hub();
        }
    }

    pub(crate) async fn ready(&self) -> Result<()> {
        self.keep_background_running();
        let now = self.clock.now().0;
        let rechecking = self.ready.ok.load(Ordering::Acquire);
        if rechecking {
            // Ready: read the version again once `SCHEMA_RECHECK` has passed, by one caller
            // (the one that moves the time on); the others go on meanwhile.
            // Also due when the clock stepped back that far (on PostgreSQL the server's clock,
            // which a `ServerClock` follows when it is stepped): the last read's time is then
            // in the future, and waiting for the clock to catch up with it waits for as long as
            // the step (an old binary writing for an hour to a database migrated past it).
            let last = self.ready.checked.load(Ordering::Relaxed);
            let due = now.abs_diff(last) >= SCHEMA_RECHECK.as_micros() as u64;
            if !due
                || self
                    .ready
                    .checked
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                return Ok(());
            }
        }
        let s = match self.backend.schema_status().await {
            Ok(s) => s,
            // A re-read that fails (the database unreachable) leaves the call to fail or not
            // on its own; it is tried again at the next one due.
            Err(_) if rechecking => return Ok(()),
            Err(e) => return Err(e),
        };
        self.ready.checked.store(now, Ordering::Relaxed);
        if s.database == s.binary {
            self.ready.ok.store(true, Ordering::Release);
            return Ok(());
        }
        self.ready.ok.store(false, Ordering::Release);
        if s.database > s.binary {
            // Migrated by a newer binary since this store opened: upgrading this one helps,
            // migrating cannot.
            return Err(Error::SchemaTooNew {
                database: s.database,
                binary: s.binary,
            });
        }
        Err(Error::SchemaBehind {
            database: s.database,
            binary: s.binary,
        })
    }

    pub(crate) async fn write(&self, ops: Vec<Op>) -> Result<Vec<OpResult>> {
        self.write_with(Vec::new(), ops).await
    }

    /// [`Store::write`] under preconditions.
    async fn write_with(
        &self,
        preconditions: Vec<Precondition>,
        ops: Vec<Op>,
    ) -> Result<Vec<OpResult>> {
        self.write_releasing(preconditions, ops, &[]).await
    }

    /// [`Store::write_with`] of a batch holding claims' `releases`: an answer that may hide a
    /// commit is resolved from the history ([`Store::release_committed`]) before it is counted
    /// (resolved: no results to hand back, so none to note).
    pub(crate) async fn write_releasing(
        &self,
        preconditions: Vec<Precondition>,
        ops: Vec<Op>,
        releases: &[session::Release],
    ) -> Result<Vec<OpResult>> {
        self.ready().await?;
        let batch = Batch {
            preconditions,
            ops,
            now: self.clock.now(),
        };
        batch.validate(&self.limits)?;
        let touched = session::touched(&batch.ops);
        let deadline = gc::deadline_of(&batch.ops, batch.now);
        let started = std::time::Instant::now();
        let r = match self.backend.commit(batch).await {
            Err(e) if !releases.is_empty() => self
                .release_committed(releases, e)
                .await
                .map(|()| Vec::new()),
            r => r,
        };
        self.attempted(metrics::TxnKind::Write, started);
        self.metrics.txn(&r);
        if let Ok(results) = &r {
            self.gc.note(results);
            self.gc.note_deadline(deadline);
            if results.iter().any(|x| x.changed) {
                self.committed_batch(touched, results, None);
            }
        }
        r
    }

    /// This store's metrics (Prometheus).
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Count the objects `selector` matches in the gauge `fleetdb_selector_objects{selector=name}`
    /// at every [`Store::metrics_refresh`]: a workflow state ("provided, agent not started") from
    /// the very selector its workers claim with, so the dashboards and the claims never disagree
    /// (BMDB wrote its stats queries twice, and they drifted). Tracking a name again replaces its
    /// selector. At most [`TRACKED_SELECTORS_MAX`] names.
    pub fn metrics_track_selector(&self, name: &str, selector: &str) -> Result<()> {
        validate::name("selector name", name)?;
        fleetdb_core::selector::Selector::parse(selector)?;
        let mut tracked = self
            .metrics
            .tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if tracked.len() >= TRACKED_SELECTORS_MAX && !tracked.contains_key(name) {
            return Err(Error::invalid(
                "selector name",
                name,
                format!("at most {TRACKED_SELECTORS_MAX} selectors are tracked"),
            ));
        }
        tracked.insert(name.to_string(), selector.to_string());
        Ok(())
    }

    /// Stop tracking a selector (its gauge goes at the next refresh); whether it was tracked.
    pub fn metrics_untrack_selector(&self, name: &str) -> bool {
        self.metrics
            .tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .is_some()
    }

    /// Count a backend call that ran since `started`: its time, and the backend's own retries
    /// (PostgreSQL's) since the last count.
    pub(crate) fn attempted(&self, kind: metrics::TxnKind, started: std::time::Instant) {
        self.metrics.txn_time(kind, started);
        self.metrics.backend_retries(self.backend.retries());
    }

    /// Recompute the gauges (active work and active backoffs per process, objects per tracked
    /// selector) from the store.
    pub async fn metrics_refresh(&self) -> Result<()> {
        self.ready().await?;
        self.metrics.backend_retries(self.backend.retries());
        let now = self.clock.now();
        let tracked: Vec<(String, String)> = self
            .metrics
            .tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        // The work gauges first, and each tracked selector on its own: one that fails (a
        // timeout, say) keeps its last value and is reported, and stops nothing else.
        let stats = self.backend.work_stats(now).await?;
        self.metrics.work_active.reset();
        self.metrics.backoffs_active.reset();
        self.metrics.work_parked.reset();
        for s in stats {
            self.metrics
                .work_active
                .with_label_values(&[s.process.as_str()])
                .set(s.active_work as i64);
            self.metrics
                .backoffs_active
                .with_label_values(&[s.process.as_str()])
                .set(s.active_backoffs as i64);
            self.metrics
                .work_parked
                .with_label_values(&[s.process.as_str()])
                .set(s.parked as i64);
        }
        let mut first_error = None;
        let mut counts = Vec::with_capacity(tracked.len());
        for (name, selector) in tracked {
            match self.backend.count(&selector, now).await {
                Ok(n) => counts.push((name, Some(n))),
                Err(e) => {
                    tracing::warn!(selector = %name, error = %e, "counting a tracked selector failed");
                    first_error.get_or_insert(e);
                    counts.push((name, None));
                }
            }
        }
        let kept: Vec<(String, i64)> = counts
            .iter()
            .filter(|(_, n)| n.is_none())
            .map(|(name, _)| {
                let g = self
                    .metrics
                    .selector_objects
                    .with_label_values(&[name.as_str()]);
                (name.clone(), g.get())
            })
            .collect();
        self.metrics.selector_objects.reset();
        for (name, n) in counts
            .iter()
            .filter_map(|(name, n)| n.map(|n| (name, n as i64)))
        {
            self.metrics
                .selector_objects
                .with_label_values(&[name.as_str()])
                .set(n);
        }
        for (name, n) in kept {
            self.metrics
                .selector_objects
                .with_label_values(&[name.as_str()])
                .set(n);
        }
        first_error.map_or(Ok(()), Err)
    }

    // ---- schema ----

    pub async fn schema_status(&self) -> Result<SchemaStatus> {
        self.backend.schema_status().await
    }

    /// Apply pending migrations; writes nothing if there are none.
    pub async fn migrate(&self) -> Result<SchemaStatus> {
        let s = self.backend.migrate().await?;
        self.ready
            .ok
            .store(s.database == s.binary, Ordering::Release);
        Ok(s)
    }

    // ---- namespaces ----

    pub async fn namespace_create(&self, name: &str, labels: Labels) -> Result<Namespace> {
        let r = self
            .write(vec![Op::NamespaceCreate {
                name: name.into(),
                labels,
            }])
            .await?;
        Ok(expect_applied(r, |a| match a {
            Applied::Namespace(n) => Some(n),
            _ => None,
        })?
        .item)
    }

    pub async fn namespace_get(&self, name: &str) -> Result<Option<Namespace>> {
        self.ready().await?;
        validate::name("namespace", name)?;
        self.backend.namespace_get(name).await
    }

    /// Namespaces ordered by name; `cursor` is the `next` of the previous page.
    pub async fn namespace_list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Namespace>> {
        self.ready().await?;
        check_limit(limit)?;
        if let Some(c) = cursor {
            validate::name("cursor", c)?;
        }
        let mut items = self.backend.namespace_list(cursor, limit + 1).await?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|n| n.name.clone())
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// Patch a namespace's labels (an empty value deletes a label).
    pub async fn namespace_set_labels(
        &self,
        name: &str,
        labels: Labels,
    ) -> Result<Written<Namespace>> {
        let r = self
            .write(vec![Op::NamespaceLabels {
                name: name.into(),
                labels,
            }])
            .await?;
        expect_applied(r, |a| match a {
            Applied::Namespace(n) => Some(n),
            _ => None,
        })
    }

    /// Delete an empty namespace. Fails with `NamespaceNotEmpty`, naming what is left, otherwise.
    pub async fn namespace_delete(&self, name: &str) -> Result<Revision> {
        let r = self
            .write(vec![Op::NamespaceDelete { name: name.into() }])
            .await?;
        deleted_revision(r)
    }

    // ---- objects ----

    /// Create or update an object; `labels` is a patch (an empty value deletes a label).
    pub async fn object_put(&self, key: &ObjectKey, labels: Labels) -> Result<Written<Object>> {
        self.object_put_mode(key, labels, PutMode::Upsert).await
    }

    pub async fn object_put_mode(
        &self,
        key: &ObjectKey,
        labels: Labels,
        mode: PutMode,
    ) -> Result<Written<Object>> {
        let r = self
            .write(vec![Op::ObjectPut {
                key: key.clone(),
                labels,
                mode,
            }])
            .await?;
        expect_applied(r, |a| match a {
            Applied::Object(o) => Some(o),
            _ => None,
        })
    }

    /// Create an object with a generated UUID id.
    pub async fn object_create(
        &self,
        namespace: &str,
        kind: &str,
        labels: Labels,
    ) -> Result<Object> {
        let key = ObjectKey::new(namespace, kind, uuid::Uuid::new_v4().to_string())?;
        Ok(self
            .object_put_mode(&key, labels, PutMode::Create)
            .await?
            .item)
    }

    pub async fn object_get(&self, key: &ObjectKey) -> Result<Option<Object>> {
        self.ready().await?;
        key.validate()?;
        self.backend.object_get(key).await
    }

    /// One page of objects, ordered by (kind, id). Pass the page's `next` as `query.after`
    /// (decoded with [`ObjectCursor::decode`]) for the following page.
    pub async fn object_list(&self, query: &ObjectQuery) -> Result<Page<Object>> {
        self.ready().await?;
        query.validate()?;
        let mut q = query.clone();
        q.limit = query.limit + 1;
        let mut items = self.backend.object_list(&q).await?;
        let next = if items.len() > query.limit {
            items.truncate(query.limit);
            items.last().map(|o| {
                ObjectCursor {
                    kind: o.key.kind.clone(),
                    id: o.key.id.clone(),
                }
                .encode()
            })
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// Delete an object and all its tags.
    pub async fn object_delete(&self, key: &ObjectKey) -> Result<Revision> {
        let r = self
            .write(vec![Op::ObjectDelete { key: key.clone() }])
            .await?;
        deleted_revision(r)
    }

    // ---- tags ----

    /// Set a tag. Setting the identical value is a no-op (`changed == false`, same revision).
    pub async fn tag_set(
        &self,
        key: &ObjectKey,
        name: &str,
        value: &serde_json::Value,
    ) -> Result<Written<Tag>> {
        self.tag_set_under(Vec::new(), key, name, value).await
    }

    /// [`Store::tag_set`] fenced by a claim: it commits only while `fence`'s claim is held
    /// ([`Store::txn_fenced`]); otherwise `WorkLost` and nothing is written.
    pub async fn tag_set_fenced(
        &self,
        fence: &Fence,
        key: &ObjectKey,
        name: &str,
        value: &serde_json::Value,
    ) -> Result<Written<Tag>> {
        fence.validate()?;
        self.tag_set_under(vec![fence.precondition()], key, name, value)
            .await
    }

    async fn tag_set_under(
        &self,
        pre: Vec<Precondition>,
        key: &ObjectKey,
        name: &str,
        value: &serde_json::Value,
    ) -> Result<Written<Tag>> {
        let text = validate::canonical_json(
            &format!("tag {name:?} value"),
            value,
            self.limits.tag_value_bytes_max,
        )?;
        let r = self
            .write_with(
                pre,
                vec![Op::TagSet {
                    key: key.clone(),
                    name: name.into(),
                    value: text,
                }],
            )
            .await?;
        expect_applied(r, |a| match a {
            Applied::Tag(t) => Some(t),
            _ => None,
        })
    }

    pub async fn tag_get(&self, key: &ObjectKey, name: &str) -> Result<Option<Tag>> {
        self.ready().await?;
        key.validate()?;
        validate::name("tag", name)?;
        self.backend.tag_get(key, name).await
    }

    /// All tags of an object, ordered by name. `NotFound` if the object does not exist.
    pub async fn tag_list(&self, key: &ObjectKey) -> Result<Vec<Tag>> {
        self.ready().await?;
        key.validate()?;
        let tags = self.backend.tag_list(key).await?;
        if tags.is_empty() && self.backend.object_get(key).await?.is_none() {
            return Err(Error::not_found(format!("object {key}")));
        }
        Ok(tags)
    }

    pub async fn tag_delete(&self, key: &ObjectKey, name: &str) -> Result<Revision> {
        self.tag_delete_under(Vec::new(), key, name).await
    }

    /// [`Store::tag_delete`] fenced by a claim, as [`Store::tag_set_fenced`].
    pub async fn tag_delete_fenced(
        &self,
        fence: &Fence,
        key: &ObjectKey,
        name: &str,
    ) -> Result<Revision> {
        fence.validate()?;
        self.tag_delete_under(vec![fence.precondition()], key, name)
            .await
    }

    async fn tag_delete_under(
        &self,
        pre: Vec<Precondition>,
        key: &ObjectKey,
        name: &str,
    ) -> Result<Revision> {
        let op = Op::TagDelete {
            key: key.clone(),
            name: name.into(),
        };
        deleted_revision(self.write_with(pre, vec![op]).await?)
    }

    // ---- transactions ----

    /// Run `f` as one atomic transaction: its reads see one consistent state, its writes commit
    /// all together or not at all.
    ///
    /// **`f` may run more than once.** If something it read changes before the commit (or the
    /// database reports a serialization failure or is busy), the transaction is retried from the
    /// start, up to `Limits::txn_attempts_max` times. So `f` must be free of side effects: do not
    /// send messages, bump counters or call other services from inside it; return what you need
    /// and act on it after `txn` returns.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> fleetdb::Result<()> {
    /// # let store = fleetdb::Store::open("sqlite::memory:").await?;
    /// # let m1 = fleetdb::ObjectKey::new("default", "machine", "m1")?;
    /// # store.object_put(&m1, Default::default()).await?;
    /// use serde_json::json;
    /// let generation = store
    ///     .txn(|tx| {
    ///         let m1 = m1.clone();
    ///         async move {
    ///             let next = match tx.tag_get(&m1, "os_install_request").await? {
    ///                 Some(t) => t.value["generation"].as_i64().unwrap_or(0) + 1,
    ///                 None => 1,
    ///             };
    ///             tx.tag_set(&m1, "os_install_request", &json!({ "generation": next }))?;
    ///             Ok(next)
    ///         }
    ///     })
    ///     .await?;
    /// # assert_eq!(generation, 1);
    /// # Ok(()) }
    /// ```
    pub async fn txn<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnMut(Txn) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.txn_with(f, Vec::new(), Vec::new()).await
    }

    /// [`Store::txn`] fenced by a claim: the transaction commits only while `fence`'s claim is
    /// held (its session alive, its token current); otherwise it fails with `WorkLost` and writes
    /// nothing. The check holds until commit: a release, expiry or takeover of the claim that
    /// races with it either waits for it or makes it retry (and fail). For writes made on behalf
    /// of a claim by someone without its [`Work`], e.g. a command run by `fleetdb worker`.
    pub async fn txn_fenced<T, F, Fut>(&self, fence: &Fence, f: F) -> Result<T>
    where
        F: FnMut(Txn) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        fence.validate()?;
        self.txn_with(f, vec![fence.precondition()], Vec::new())
            .await
    }

    /// [`Store::txn`] with extra preconditions (checked first) and extra ops (applied after the
    /// closure's writes) in the same batch: how sessions make their writes conditional on being
    /// alive, and how work is finished together with the caller's writes.
    pub(crate) async fn txn_with<T, F, Fut>(
        &self,
        f: F,
        pre: Vec<Precondition>,
        post: Vec<Op>,
    ) -> Result<T>
    where
        F: FnMut(Txn) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        Ok(self.txn_then_claim(f, pre, post, None, &[]).await?.out)
    }

    /// [`Store::txn_with`], then (when `claim` is given) a claim of `claim`'s session in the same
    /// backend call once the batch committed: a worker's "finish this, give me the next" in one
    /// writer round trip. When the batch holds claims' `releases` and the commit's answer may
    /// have been lost after it committed, the history tells ([`Store::release_committed`]).
    pub(crate) async fn txn_then_claim<T, F, Fut>(
        &self,
        mut f: F,
        pre: Vec<Precondition>,
        post: Vec<Op>,
        claim: Option<(fleetdb_core::work::ClaimRequest, &session::Session)>,
        releases: &[session::Release],
    ) -> Result<session::Committed<T>>
    where
        F: FnMut(Txn) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.ready().await?;
        let attempts = self.limits.txn_attempts_max.max(1);
        let mut last = String::new();
        for attempt in 0..attempts {
            // A claim's time is its session's next (each claim's differs: `Session::claim_time`);
            // the batch runs at the same time.
            let now = match &claim {
                Some((_, session)) => session.claim_time(),
                None => self.clock.now(),
            };
            let tx = Txn::new(self.backend.clone(), self.limits.clone(), now);
            // The attempt ends once the closure returned, whatever it answered (or when the
            // caller gives up meanwhile): a clone of its handle kept past it refuses to be used
            // (its writes would be committed by nobody).
            let _ended = tx.end_on_drop();
            let out = f(tx.clone()).await;
            let mut batch = tx.into_batch();
            let out = match out {
                Ok(out) => out,
                Err(e @ Error::Conflict { .. }) => {
                    last = e.to_string();
                    self.before_retry(attempt, attempts).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if batch.ops.is_empty() && post.is_empty() && claim.is_none() {
                // Read-only. One read (and no precondition of the caller's) is consistent by
                // itself; several were each read at their own moment, so they are checked
                // together — their preconditions committed with no writes — or a change between
                // two of them would hand back a state that never existed.
                if pre.is_empty() && batch.preconditions.len() <= 1 {
                    return Ok(session::Committed {
                        out,
                        claimed: Default::default(),
                    });
                }
            }
            batch.preconditions.splice(0..0, pre.iter().cloned());
            batch.ops.extend(post.iter().cloned());
            batch.validate(&self.limits)?;
            let touched = session::touched(&batch.ops);
            let deadline = gc::deadline_of(&batch.ops, batch.now);
            let started = std::time::Instant::now();
            let claim_at = batch.now;
            let committed = match &claim {
                None => self
                    .backend
                    .commit(batch)
                    .await
                    .map(|r| (r, Default::default())),
                Some((req, _)) => {
                    let mut req = req.clone();
                    req.now = batch.now;
                    let backend = self.backend.clone();
                    let ended = session::released(&post); // only the store appends releases
                    let process = req.process.clone();
                    self.detached_claim(
                        async move { backend.commit_then_claim(batch, req).await },
                        |(_, claimed)| claimed,
                        &process,
                        ended,
                    )
                    .await
                }
            };
            let kind = match claim {
                None => metrics::TxnKind::Write,
                Some(_) => metrics::TxnKind::WriteAndClaim,
            };
            self.attempted(kind, started);
            match committed {
                Ok((results, claimed)) => {
                    self.metrics.transactions_executed.inc();
                    self.gc.note(&results);
                    self.gc.note_deadline(deadline);
                    if results.iter().any(|r| r.changed) {
                        let group = claim.as_ref().and_then(|(req, _)| match &req.target {
                            fleetdb_core::work::ClaimTarget::Selector(s) => Some((
                                req.process.as_str(),
                                s.as_str(),
                                req.limit,
                                claimed.work.len(),
                            )),
                            fleetdb_core::work::ClaimTarget::Object(_) => None,
                        });
                        self.committed_batch(touched, &results, group);
                    }
                    if claimed.unknown {
                        // The claim behind the batch lost its answer (its own transaction).
                        if let Some((req, session)) = &claim {
                            session.claim_uncertain(&req.process, claim_at);
                        }
                    }
                    return Ok(session::Committed { out, claimed });
                }
                Err(e @ Error::Conflict { .. }) => {
                    last = e.to_string();
                    self.before_retry(attempt, attempts).await;
                }
                Err(e) => {
                    // Its claim may have committed with the batch: the session's next claim
                    // takes up what it took, whatever the releases turn out to be (a later
                    // attempt that finds them committed claims nothing itself).
                    if let (Some((req, session)), Error::Unavailable(_)) = (&claim, &e) {
                        if self.backend.capabilities().unavailable_may_have_committed {
                            session.claim_uncertain(&req.process, claim_at);
                        }
                    }
                    if !releases.is_empty() {
                        // The answer may hide a commit: the history tells.
                        match self.release_committed(releases, e).await {
                            Ok(()) => {
                                self.metrics.transactions_executed.inc();
                                return Ok(session::Committed {
                                    out,
                                    claimed: Default::default(),
                                });
                            }
                            Err(e) => {
                                self.metrics.transactions_failed.inc();
                                return Err(e);
                            }
                        }
                    }
                    self.metrics.transactions_failed.inc();
                    return Err(e);
                }
            }
        }
        self.metrics.transactions_failed.inc();
        Err(Error::RetriesExhausted { attempts, last })
    }

    /// After attempt `attempt` (of `attempts`, counted from 0) of a transaction conflicted: if
    /// another attempt follows, count it as run again (`fleetdb_transactions_retried_total`) and
    /// pause before it; after the last one, nothing (the transaction fails at once).
    async fn before_retry(&self, attempt: u32, attempts: u32) {
        if attempt + 1 < attempts {
            self.metrics.transactions_retried.inc();
            retry_pause(attempt).await;
        }
    }

    // ---- change log ----

    /// Change-log entries after `after`, in revision order, at most `limit` (1..=10,000), up to
    /// the settled revision only: on PostgreSQL a transaction holding revision `g` may commit
    /// after `g + 1` is visible, so entries past a revision whose transaction may still commit
    /// are held back (at most [`CHANGES_SETTLE_WAIT`] is spent waiting for such a transaction)
    /// and paging by the last revision read never skips one. `after` past the newest revision
    /// (a position from another database, or from before a restore) is refused.
    ///
    /// The operator's view: unfiltered, it holds the World's entries too, every export's data
    /// whoever it is for (a host reads its exports through [`World`](crate::World)).
    pub async fn changes(
        &self,
        after: Revision,
        filter: &ChangeFilter,
        limit: usize,
    ) -> Result<Vec<Change>> {
        self.ready().await?;
        filter.validate()?;
        position_not_negative("after", after)?;
        if limit == 0 || limit > CHANGES_PAGE_MAX {
            return Err(Error::invalid(
                "limit",
                limit.to_string(),
                format!("must be between 1 and {CHANGES_PAGE_MAX}"),
            ));
        }
        let settled = self.backend.settled_revision(CHANGES_SETTLE_WAIT).await?;
        if after >= settled {
            let current = self.backend.revision().await?.current;
            if after > current {
                return Err(ahead_of_the_store("after", after, current));
            }
            return Ok(Vec::new());
        }
        let mut page = self.backend.changes(after, filter, limit).await?;
        page.retain(|c| c.revision <= settled);
        Ok(page)
    }

    /// Drop change-log entries with revision < `before`. Returns how many were dropped. A
    /// negative `before` is `Invalid` (no revision is below 0).
    pub async fn compact(&self, before: Revision) -> Result<u64> {
        position_not_negative("before", before)?;
        self.ready().await?;
        self.backend.compact(before).await
    }

    /// Compact the change log by age: drop the entries written before `now − age`, in revision
    /// order up to the first one written at or after it (an entry stamped earlier by a clock
    /// that was behind waits for the entries before it, as history pruning does). Looks at most
    /// [`COMPACT_BY_AGE_SCAN_MAX`] entries per call (revision and time only, no values: the
    /// first look reads [`COMPACT_BY_AGE_FIRST`], each next one ten times more while all are
    /// old); a longer backlog goes with the next calls. Returns how many entries were dropped.
    /// The background task runs it after every sweep with [`OpenOptions::change_retention`].
    pub async fn compact_older_than(&self, age: Duration) -> Result<u64> {
        self.ready().await?;
        let cutoff = self.clock.now() - age;
        let mut after = self.backend.revision().await?.compacted;
        let mut before = None;
        let mut page = COMPACT_BY_AGE_FIRST;
        let mut seen = 0;
        'scan: loop {
            let times = match self.backend.change_times(after, page).await {
                // Another process compacted meanwhile: go on from its point (it only moves on).
                Err(Error::Compacted {
                    compacted_revision, ..
                }) if compacted_revision > after => {
                    after = compacted_revision;
                    continue;
                }
                r => r?,
            };
            seen += times.len();
            for &(revision, at) in &times {
                if at >= cutoff {
                    break 'scan;
                }
                before = Some(Revision(revision.0.saturating_add(1)));
                after = revision;
            }
            if times.len() < page || seen >= COMPACT_BY_AGE_SCAN_MAX {
                break;
            }
            page = (page * 10).min(CHANGES_PAGE_MAX);
        }
        match before {
            Some(before) => self.backend.compact(before).await,
            None => Ok(0),
        }
    }

    pub async fn revision(&self) -> Result<RevisionInfo> {
        self.ready().await?;
        self.backend.revision().await
    }
}

/// A PostgreSQL backend and the clock its store runs on: the one given, else the server's.
#[cfg(feature = "postgres")]
async fn open_postgres(
    url: &str,
    options: &OpenOptions,
) -> Result<(Arc<dyn Backend>, Arc<dyn Clock>)> {
    let opts = PostgresOptions {
        migrate: options.migrate,
        pool_size_max: options.postgres_pool_size_max,
    };
    Ok(match &options.clock {
        Some(clock) => (
            Arc::new(PostgresBackend::open(url, opts, clock.clone()).await?),
            clock.clone(),
        ),
        None => {
            let clock = Arc::new(ServerClock::new(Arc::new(SystemClock)));
            let backend = PostgresBackend::open_on_server_clock(url, opts, clock.clone()).await?;
            (Arc::new(backend), clock)
        }
    })
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(
    _url: &str,
    _options: &OpenOptions,
) -> Result<(Arc<dyn Backend>, Arc<dyn Clock>)> {
    Err(Error::Unsupported {
        backend: "postgres".into(),
        what: "this build of fleetdb was made without the `postgres` feature".into(),
    })
}

/// Most change-log entries one call returns.
pub const CHANGES_PAGE_MAX: usize = 10_000;
/// Change-log entries one [`Store::compact_older_than`] looks at first (most calls, every second
/// in the background, find little or nothing old enough).
pub const COMPACT_BY_AGE_FIRST: usize = 100;
/// Change-log entries one [`Store::compact_older_than`] looks at most (and so drops at most): a
/// first compaction of a long log goes in steps, one per call.
pub const COMPACT_BY_AGE_SCAN_MAX: usize = 100_000;

/// How long [`Store::changes`] waits for a transaction that holds a revision below committed ones
/// before it answers without the entries past it.
pub const CHANGES_SETTLE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// A resume position (`field`) past the store's newest revision: it was taken from another
/// database, or before a restore; resuming from it would skip every change up to it.
pub(crate) fn ahead_of_the_store(field: &str, asked: Revision, current: Revision) -> Error {
    Error::invalid(
        field,
        asked.0.to_string(),
        format!(
            "is past the store's newest revision {}: a position from another database or from \
             before a restore (start again without it)",
            current.0
        ),
    )
}

/// A resume position (`field`) below 0: no revision is, so it is bad input, not a compacted
/// position (which would send the consumer to start over from a snapshot).
pub(crate) fn position_not_negative(field: &str, asked: Revision) -> Result<()> {
    if asked.0 < 0 {
        return Err(Error::invalid(
            field,
            asked.0.to_string(),
            "must be 0 or more",
        ));
    }
    Ok(())
}

/// Trim a page fetched with `limit + 1` rows and return the cursor of the next page.
pub(crate) fn next_page<T>(
    items: &mut Vec<T>,
    limit: usize,
    cursor: impl Fn(&T) -> String,
) -> Option<String> {
    if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor)
    } else {
        None
    }
}

pub(crate) fn check_limit(limit: usize) -> Result<()> {
    if limit == 0 || limit > fleetdb_core::query::LIST_PAGE_MAX {
        return Err(Error::invalid(
            "limit",
            limit.to_string(),
            format!(
                "must be between 1 and {}",
                fleetdb_core::query::LIST_PAGE_MAX
            ),
        ));
    }
    Ok(())
}

fn deleted_revision(r: Vec<OpResult>) -> Result<Revision> {
    Ok(expect_applied(r, |a| match a {
        Applied::Deleted { revision } => Some(revision),
        _ => None,
    })?
    .item)
}

/// Pause before retrying a conflicting transaction: exponential from 1 ms, capped at 64 ms, with
/// jitter so that conflicting writers spread out. (Real time on purpose: this is back-pressure, not
/// a rule that depends on the clock.)
async fn retry_pause(attempt: u32) {
    let base_us = 1_000u64 << attempt.min(6);
    let jitter = u64::from(std::process::id()).wrapping_mul(2_654_435_761)
        ^ u64::from(attempt).wrapping_mul(40_503);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    let us = base_us / 2 + (jitter ^ nanos) % (base_us / 2 + 1);
    tokio::time::sleep(Duration::from_micros(us)).await;
}
