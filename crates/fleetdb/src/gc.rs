//! Leases, collectable kinds and the garbage collector (see `docs/design.md` §12).
//!
//! A collection marks from the roots over ONE consistent read (no lock that writers need), then
//! sweeps the garbage in small write transactions whose size adapts so that each keeps writers
//! waiting at most [`GcOptions::sweep_batch_target`]. Each sweep transaction spares anything
//! that changed, or became referenced, after the mark's revision, so an object created or
//! referenced while a collection runs is never removed by it. Blob bytes are removed after the
//! metadata commits; bytes left behind by a crash are found and removed by the next run.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fleetdb_core::gc::{self, GcKind, GcStats, Lease, Resource};
use fleetdb_core::world::{ExportMeta, Space, WorldQuery};
use fleetdb_core::{
    parse_label_selector, Applied, Batch, ChangeFilter, Error, LabelRequirement, Labels, ObjectKey,
    Op, OpResult, Page, Result, Revision, Timestamp,
};
use serde::Serialize;

use crate::{check_limit, Store, Written};

/// The smallest [`GcOptions::pause_share`]: a collection then pauses at most a thousand times
/// its own duration.
pub const PAUSE_SHARE_MIN: f64 = 0.001;

/// When the collector runs by itself (the background task checks every second).
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Run after this many deletions since the last run (0: after any deletion).
    pub deletion_threshold: u64,
    /// Run after this many mutations since the last run.
    pub mutation_threshold: u64,
    /// At most this share of wall time may be spent with writers waiting on the collector:
    /// after a run that blocked writers for `b`, the next starts no earlier than `b / share`.
    pub pause_share: f64,
    /// Target duration of one sweep transaction (the batch size adapts to it).
    pub sweep_batch_target: Duration,
}

impl GcOptions {
    /// Check the options (also at open, before the database is touched).
    pub fn validate(&self) -> Result<()> {
        // At least 0.001: the pause after a run is its time divided by the share (a share near
        // zero made a pause no `Duration` or `Instant` can hold, and the collector panicked).
        if !(self.pause_share >= PAUSE_SHARE_MIN && self.pause_share <= 1.0) {
            return Err(Error::invalid(
                "gc pause share",
                self.pause_share.to_string(),
                format!("must be between {PAUSE_SHARE_MIN} and 1"),
            ));
        }
        Ok(())
    }
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            deletion_threshold: 0,
            mutation_threshold: 100,
            pause_share: 0.02,
            sweep_batch_target: Duration::from_millis(20),
        }
    }
}

/// A collector of resources that live outside FleetDB (volumes, cloud disks, …). Its resources
/// are named by (its kind, an id): objects reference them with `fleetdb.io/gc.ref.<kind>`
/// labels and leases hold them as `Resource::Object` keys of that kind in any namespace. A
/// failing collector makes the collection skip it for that round; the collection goes on.
#[async_trait]
pub trait ExternalCollector: Send + Sync {
    /// The reference kind this collector owns (a kind name no object uses).
    fn kind(&self) -> &str;
    /// Every resource that exists.
    async fn all(&self) -> Result<Vec<String>>;
    /// Resources in use by the collector's own account (roots).
    async fn active(&self) -> Result<Vec<String>>;
    /// Resources the collector's own bookkeeping holds for FleetDB leases, as `(lease id,
    /// resource id)`: kept while that lease is alive, like a lease's own resources (containerd's
    /// "list held by a lease", asked once per round for every lease rather than lease by lease).
    /// The default holds nothing.
    async fn leased(&self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }
    /// Remove one unused resource.
    async fn remove(&self, id: &str) -> Result<()>;
    /// The round ended (removals done).
    async fn finish(&self) -> Result<()> {
        Ok(())
    }
    /// The round was abandoned.
    async fn cancel(&self) {}
}

/// The collector's state in one store.
#[derive(Default)]
pub(crate) struct GcState {
    pub(crate) options: Mutex<GcOptions>,
    deletions: AtomicU64,
    mutations: AtomicU64,
    requested: AtomicBool,
    running: tokio::sync::Mutex<()>,
    last: Mutex<Option<GcStats>>,
    runs: AtomicU64,
    next_deadline: Mutex<Option<Timestamp>>,
    /// The change-log positions (one per stream of [`FOLLOWED`]) up to which this process has
    /// taken the deadlines of every process's commits ([`Store::gc_follow_changes`]); `None`
    /// until the first tick.
    followed: Mutex<Option<[Revision; FOLLOWED.len()]>>,
    /// Counts the marks that moved `followed` back (a follow that read the positions before
    /// one does not store its own after it).
    mark_epoch: AtomicU64,
    /// The revision the last mark of this process read the store at: a deadline already past
    /// from an entry at or before it was the mark's to see (no run is started for it again).
    last_mark: Mutex<Option<Revision>>,
    /// While a collection runs (`Some`), the earliest deadline noted meanwhile: the mark replaces
    /// `next_deadline` with what it saw at its snapshot, and those committed after the snapshot
    /// must not be lost with it.
    noted_in_run: Mutex<Option<Option<Timestamp>>>,
    /// Real time before which no automatic run starts (the pause budget).
    not_before: Mutex<Option<Instant>>,
    /// Real time before which no threshold-triggered run starts: the whole run's duration
    /// divided by the same share (so collection itself uses at most that share of the time).
    cpu_not_before: Mutex<Option<Instant>>,
    collectors: Mutex<Vec<Arc<dyn ExternalCollector>>>,
    /// The scheduler's task ([`Store::start_gc`]).
    scheduler: crate::TaskFlag,
}

/// Change-log entries read per page when following other processes' deadlines, and pages per
/// stream and tick at most (the rest at the next tick).
const FOLLOW_PAGE: usize = 1_000;
const FOLLOW_PAGES_MAX: usize = 10;
/// The change-log streams followed for deadlines: leases, exports and blobs (each a namespace of
/// the log, so a read is an index range: the objects' and tags' entries, nearly all of a busy
/// log, are not read; a blob's entry comes with an upload, far costlier than reading it). An
/// object's `gc.expire` written by another process is seen at the next mark.
const FOLLOWED: [&str; 3] = [
    gc::LEASE_CHANGE_NAMESPACE,
    ".export",
    gc::CONTENT_CHANGE_NAMESPACE,
];

/// The earliest time the writes of a batch committed at `now` make a collection due: a lease's
/// expiry, a `gc.expire` label, an export's TTL (what they protect becomes garbage then).
pub(crate) fn deadline_of(ops: &[Op], now: Timestamp) -> Option<Timestamp> {
    ops.iter()
        .filter_map(|op| match op {
            Op::LeaseCreate { expires_at, .. } => *expires_at,
            Op::ObjectPut { labels, .. } => gc::root_by_labels(labels, now).1,
            Op::Export { records, .. } => records
                .iter()
                .filter(|r| !r.holds.is_empty())
                .filter_map(|r| r.lifetime.ttl_ms)
                .map(|ms| now + Duration::from_millis(ms))
                .min(),
            _ => None,
        })
        .min()
}

impl GcState {
    /// A commit's [`deadline_of`]: a run is due then, whether or not a mark has seen it (an
    /// expiring lease on an idle store must trigger one by itself: containerd's bug).
    pub(crate) fn note_deadline(&self, at: Option<Timestamp>) {
        if let Some(t) = at {
            let mut next = self.next_deadline.lock().unwrap_or_else(|p| p.into_inner());
            *next = Some(next.map_or(t, |d| d.min(t)));
            let mut run = self.noted_in_run.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(noted) = run.as_mut() {
                *noted = Some(noted.map_or(t, |d| d.min(t)));
            }
        }
    }

    /// Count what a commit did (the scheduler's thresholds).
    pub(crate) fn note(&self, results: &[OpResult]) {
        for r in results.iter().filter(|r| r.changed) {
            self.mutations.fetch_add(1, Ordering::Relaxed);
            if matches!(r.applied, Applied::Deleted { .. }) {
                self.deletions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Where the collector stands.
#[derive(Debug, Clone, Serialize)]
pub struct GcStatus {
    pub runs: u64,
    pub last: Option<GcStats>,
    pub deletions_since: u64,
    pub mutations_since: u64,
    /// The next time a lease or `gc.expire` runs out (a run is due then).
    pub next_deadline: Option<Timestamp>,
}

/// The longest expiry a lease may be given (ten years): a longer one is a lease without expiry
/// in all but name, and past the year 9999 not even a time.
pub const LEASE_EXPIRE_IN_MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A lease to create.
#[derive(Debug, Clone, Default)]
pub struct LeaseSpec {
    /// `None`: generated.
    pub id: Option<String>,
    pub labels: Labels,
    /// Hold only the resources themselves, not what they reference.
    pub flat: bool,
    /// `None`: until deleted.
    pub expire_in: Option<Duration>,
}

fn single(results: Vec<OpResult>) -> Result<OpResult> {
    results
        .into_iter()
        .next()
        .ok_or_else(|| Error::Backend("the backend returned no result".into()))
}

impl Store {
    // ---- kinds ----

    /// Declare whether objects of `kind` are collected when nothing needs them (undeclared
    /// kinds never are).
    pub async fn gc_kind_declare(&self, kind: &str, collectable: bool) -> Result<bool> {
        let r = single(
            self.write(vec![Op::GcKindDeclare {
                kind: kind.to_string(),
                collectable,
            }])
            .await?,
        )?;
        Ok(r.changed)
    }

    pub async fn gc_kinds(&self) -> Result<Vec<GcKind>> {
        self.ready().await?;
        self.backend.gc_kinds().await
    }

    // ---- leases ----

    pub async fn lease_create(&self, spec: LeaseSpec) -> Result<Lease> {
        let id = spec
            .id
            .unwrap_or_else(|| format!("lease-{}", uuid::Uuid::new_v4().simple()));
        let expires_at = match spec.expire_in {
            Some(d) if d.is_zero() => {
                return Err(Error::invalid("lease expiry", "0s", "must be positive"))
            }
            Some(d) if d > LEASE_EXPIRE_IN_MAX => {
                return Err(Error::invalid(
                    "lease expiry",
                    format!("{d:?}"),
                    format!(
                        "must be at most {LEASE_EXPIRE_IN_MAX:?} (a lease without expiry: none)"
                    ),
                ))
            }
            Some(d) => Some(self.clock.now() + d),
            None => None,
        };
        let r = single(
            self.write(vec![Op::LeaseCreate {
                id,
                labels: spec.labels,
                flat: spec.flat,
                expires_at,
            }])
            .await?,
        )?;
        match r.applied {
            Applied::Lease(l) => Ok(l),
            _ => Err(Error::Backend("unexpected result of a lease create".into())),
        }
    }

    pub async fn lease_get(&self, id: &str) -> Result<Option<Lease>> {
        self.ready().await?;
        fleetdb_core::validate::name("lease id", id)?;
        self.backend.lease_get(id).await
    }

    /// Leases whose labels match `selector` (the label selector syntax of object listings;
    /// "" for all), ordered by id, after `after`, at most `limit`.
    pub async fn lease_list(
        &self,
        selector: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Lease>> {
        self.ready().await?;
        check_limit(limit)?;
        if let Some(a) = after {
            fleetdb_core::validate::name("after", a)?;
        }
        let reqs: Vec<LabelRequirement> = if selector.trim().is_empty() {
            Vec::new()
        } else {
            parse_label_selector(selector)?
        };
        let mut items = Vec::new();
        let mut cursor = after.map(str::to_string);
        let next = loop {
            let page = self
                .backend
                .lease_list(cursor.as_deref(), fleetdb_core::query::LIST_PAGE_MAX)
                .await?;
            let done = page.len() < fleetdb_core::query::LIST_PAGE_MAX;
            cursor = page.last().map(|l| l.id.clone());
            for l in page {
                if reqs.iter().all(|r| r.matches(&l.labels)) {
                    items.push(l);
                    if items.len() > limit {
                        break;
                    }
                }
            }
            if items.len() > limit {
                items.truncate(limit);
                break items.last().map(|l| l.id.clone());
            }
            if done {
                break None;
            }
        };
        Ok(Page { items, next })
    }

    /// Delete a lease. With `sync`, return only after a collection that could free what it held
    /// has finished (its stats are returned).
    pub async fn lease_delete(&self, id: &str, sync: bool) -> Result<Option<GcStats>> {
        self.write(vec![Op::LeaseDelete { id: id.to_string() }])
            .await?;
        if sync {
            return Ok(Some(self.gc_run().await?));
        }
        self.gc.requested.store(true, Ordering::Relaxed);
        Ok(None)
    }

    /// Add a resource to a live lease.
    pub async fn lease_add(&self, lease: &str, resource: Resource) -> Result<bool> {
        Ok(single(
            self.write(vec![Op::LeaseAddResource {
                lease: lease.to_string(),
                resource,
            }])
            .await?,
        )?
        .changed)
    }

    /// Remove a resource from a lease (`false`: it did not hold it). What it held may be garbage
    /// now: a collection is requested (as for a deleted lease), and the change-log row tells other
    /// processes' collectors so too.
    pub async fn lease_remove_resource(&self, lease: &str, resource: Resource) -> Result<bool> {
        let removed = single(
            self.write(vec![Op::LeaseRemoveResource {
                lease: lease.to_string(),
                resource,
            }])
            .await?,
        )?
        .changed;
        if removed {
            self.gc.requested.store(true, Ordering::Relaxed);
        }
        Ok(removed)
    }

    pub async fn lease_resources(&self, lease: &str) -> Result<Vec<Resource>> {
        self.ready().await?;
        fleetdb_core::validate::name("lease id", lease)?;
        if self.backend.lease_get(lease).await?.is_none() {
            return Err(Error::not_found(format!("lease {lease:?}")));
        }
        self.backend.lease_resources(lease).await
    }

    /// Create or update an object and add it to `lease`, in one transaction.
    pub async fn object_put_leased(
        &self,
        key: &ObjectKey,
        labels: Labels,
        lease: &str,
    ) -> Result<Written<fleetdb_core::Object>> {
        let mut results = self
            .write(vec![
                Op::ObjectPut {
                    key: key.clone(),
                    labels,
                    mode: fleetdb_core::PutMode::Upsert,
                },
                Op::LeaseAddResource {
                    lease: lease.to_string(),
                    resource: Resource::Object { key: key.clone() },
                },
            ])
            .await?;
        results.truncate(1);
        crate::expect_applied(results, |a| match a {
            Applied::Object(o) => Some(o),
            _ => None,
        })
    }

    // ---- the collector ----

    /// The background scheduler: every second, run a collection if one is due.
    pub(crate) fn start_gc(&self) {
        if !self.background.enabled.load(Ordering::SeqCst) {
            return;
        }
        let Some(running) = self.gc.scheduler.start() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // not running after all: `running` drops
        };
        let weak = self.downgrade();
        rt.spawn(async move {
            let _running = running;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(store) = weak.upgrade() else { return };
                if let Err(e) = store.gc_maybe_run().await {
                    tracing::warn!(error = %e, "garbage collection failed");
                }
            }
        });
    }

    /// Register a collector of external resources (see [`ExternalCollector`]).
    pub fn gc_register_collector(&self, c: Arc<dyn ExternalCollector>) -> Result<()> {
        fleetdb_core::validate::name("collector kind", c.kind())?;
        let mut list = self.gc.collectors.lock().unwrap_or_else(|p| p.into_inner());
        if list.iter().any(|x| x.kind() == c.kind()) {
            return Err(Error::AlreadyExists {
                what: format!("collector of kind {:?}", c.kind()),
            });
        }
        list.push(c);
        Ok(())
    }

    pub fn gc_set_options(&self, options: GcOptions) -> Result<()> {
        options.validate()?;
        *self.gc.options.lock().unwrap_or_else(|p| p.into_inner()) = options;
        Ok(())
    }

    pub fn gc_status(&self) -> GcStatus {
        GcStatus {
            runs: self.gc.runs.load(Ordering::Relaxed),
            last: self
                .gc
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            deletions_since: self.gc.deletions.load(Ordering::Relaxed),
            mutations_since: self.gc.mutations.load(Ordering::Relaxed),
            next_deadline: *self
                .gc
                .next_deadline
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Ask for a collection soon (the background task runs it within a second).
    pub fn gc_request(&self) {
        self.gc.requested.store(true, Ordering::Relaxed);
    }

    /// Run a collection if one is due: requested, past the deletion or mutation threshold, or a
    /// lease or `gc.expire` deadline has passed — and the pause budget allows. The background
    /// task calls this every second; it is public so that tests and embedders can drive it.
    pub async fn gc_maybe_run(&self) -> Result<Option<GcStats>> {
        if let Err(e) = self.gc_follow_changes().await {
            // A deadline of another process is then seen at a later tick, or at the next mark.
            tracing::debug!(error = %e, "could not follow the change log for collection deadlines");
        }
        let opts = self
            .gc
            .options
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(t) = *self.gc.not_before.lock().unwrap_or_else(|p| p.into_inner()) {
            if Instant::now() < t {
                return Ok(None);
            }
        }
        let now = self.clock.now();
        let deadline_passed = self
            .gc
            .next_deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|d| d <= now);
        let deletions = self.gc.deletions.load(Ordering::Relaxed);
        let mutations = self.gc.mutations.load(Ordering::Relaxed);
        let trigger = if self.gc.requested.load(Ordering::Relaxed) {
            "requested"
        } else if deadline_passed {
            "deadline"
        } else if deletions > opts.deletion_threshold
            || (opts.deletion_threshold == 0 && deletions > 0)
        {
            "deletions"
        } else if mutations >= opts.mutation_threshold && opts.mutation_threshold > 0 {
            "mutations"
        } else {
            return Ok(None);
        };
        if matches!(trigger, "deletions" | "mutations") {
            // Threshold runs also respect a CPU budget: a busy store with millions of objects
            // would otherwise mark continuously. Requests and deadlines are not deferred by it.
            if let Some(t) = *self
                .gc
                .cpu_not_before
                .lock()
                .unwrap_or_else(|p| p.into_inner())
            {
                if Instant::now() < t {
                    return Ok(None);
                }
            }
        }
        self.run_collection(trigger).await.map(Some)
    }

    /// Take the deadlines of every process's leases, exports and blobs committed since the last
    /// tick from the change log ([`gc::deadline_of_change`]): this process's own commits note theirs at
    /// once, but a lease with an expiry written by another process — a CLI command that then
    /// exits — would otherwise wait for this process's next mark, which on an idle store never
    /// comes (containerd's bug, across processes). Each stream of [`FOLLOWED`] moves its position
    /// only up to the settled revision (PostgreSQL's revisions become visible out of order: an
    /// entry below one already read may still commit), and every entry read is noted (a past
    /// deadline of an entry this process's last mark read the store after is skipped: that mark
    /// saw it; otherwise catching up on a backlog would run a collection per page). The first
    /// tick starts where the newest recorded
    /// collection (of any process) marked, taking that mark's deadline; with none recorded, at
    /// the start of the log. Past a compaction it goes on from the settled revision (what was
    /// compacted away is seen at the next mark). It requests a collection only for an entry that
    /// released what was held ([`gc::releases_of_change`]: a lease deleted, an export no longer
    /// holding, by another process) after this process's last mark; deadlines are only noted.
    async fn gc_follow_changes(&self) -> Result<()> {
        self.ready().await?;
        let epoch = self.gc.mark_epoch.load(Ordering::Acquire);
        let followed = *self.gc.followed.lock().unwrap_or_else(|p| p.into_inner());
        let mut pos = match followed {
            Some(p) => p,
            None => [self.gc_follow_start().await?; FOLLOWED.len()],
        };
        let upto = self.backend.settled_revision(SETTLE_WAIT).await?;
        let mut result = Ok(());
        'streams: for (i, namespace) in FOLLOWED.iter().enumerate() {
            // Lease and blob entries have an empty kind: naming it makes the read an index
            // range from the position on ((namespace, kind, revision); by namespace alone
            // every blob entry ever written was visited each tick: 117 ms with 300,000).
            let filter = ChangeFilter {
                namespace: Some(namespace.to_string()),
                kind: (*namespace != ".export").then(String::new),
                ..ChangeFilter::default()
            };
            for _ in 0..FOLLOW_PAGES_MAX {
                if pos[i] >= upto {
                    break;
                }
                let page = match self.backend.changes(pos[i], &filter, FOLLOW_PAGE).await {
                    Ok(page) => page,
                    Err(Error::Compacted { .. }) => {
                        pos[i] = upto;
                        break;
                    }
                    Err(e) => {
                        result = Err(e);
                        break 'streams;
                    }
                };
                // Every entry read is noted (noting one twice is harmless: the earliest counts);
                // the position only moves up to the settled revision.
                let now = self.clock.now();
                let marked = *self.gc.last_mark.lock().unwrap_or_else(|p| p.into_inner());
                for c in &page {
                    let seen_by_mark = marked.is_some_and(|m| c.revision <= m);
                    match gc::deadline_of_change(c) {
                        // A past deadline: due now only once (not from an entry the last mark
                        // read the store after, nor, every tick until it settles, from one past
                        // the settled revision: a mark would not reach it yet, and would run
                        // again at every tick while a long transaction holds the revision back).
                        Some(d) if d <= now && (seen_by_mark || c.revision > upto) => {}
                        d => self.gc.note_deadline(d),
                    }
                    // A lease deleted while alive, an export no longer holding what it held
                    // (`fleetdb lease rm` without --sync, by a process that then exits): what
                    // they held may be garbage now, and no deadline says so. Due now, once: not
                    // for an entry the last mark saw, nor before it settles (as above).
                    if gc::releases_of_change(c) && !seen_by_mark && c.revision <= upto {
                        self.gc.requested.store(true, Ordering::Relaxed);
                    }
                }
                let last = page.last().map(|c| c.revision);
                if page.len() == FOLLOW_PAGE && last.is_some_and(|l| l <= upto) {
                    // More may follow, up to `upto`.
                    pos[i] = last.unwrap_or(upto);
                } else {
                    pos[i] = upto.max(pos[i]);
                    break;
                }
            }
        }
        let mut followed = self.gc.followed.lock().unwrap_or_else(|p| p.into_inner());
        // A mark since this follow read the positions moved them back (to re-note what it
        // replaced): that stands.
        if self.gc.mark_epoch.load(Ordering::Acquire) == epoch {
            *followed = Some(pos);
        }
        result
    }

    /// Where the first tick starts following (see [`Store::gc_follow_changes`]).
    async fn gc_follow_start(&self) -> Result<Revision> {
        let newest = ignore_unsupported(self.backend.gc_runs(1).await)?;
        let recorded: Option<GcStats> = newest.first().and_then(|t| serde_json::from_str(t).ok());
        let compacted = self.backend.revision().await?.compacted;
        Ok(match recorded.as_ref().and_then(|r| r.mark_revision) {
            Some(r) => {
                self.gc
                    .note_deadline(recorded.as_ref().and_then(|r| r.next_deadline));
                r.max(compacted)
            }
            None => compacted,
        })
    }

    /// Run one full collection now.
    pub async fn gc_run(&self) -> Result<GcStats> {
        self.run_collection("explicit").await
    }

    /// The newest collections' statistics recorded in the store by any process, newest first (at
    /// most [`GC_RUNS_KEPT`] are kept).
    pub async fn gc_history(&self, limit: usize) -> Result<Vec<GcStats>> {
        self.ready().await?;
        let limit = limit.min(GC_RUNS_KEPT);
        ignore_unsupported(self.backend.gc_runs(limit).await)?
            .iter()
            .map(|text| {
                serde_json::from_str(text).map_err(|e| {
                    Error::Backend(format!(
                        "a collection's recorded statistics are corrupt: {e}"
                    ))
                })
            })
            .collect()
    }

    async fn run_collection(&self, trigger: &str) -> Result<GcStats> {
        self.ready().await?;
        let _one_at_a_time = self.gc.running.lock().await;
        /// What a run took for its own; a run that does not complete — it failed, or its future
        /// was dropped midway (a caller's timeout, the scheduler's runtime shutting down) —
        /// gives it back, so nothing is lost: the counters say a run is still due, and so does
        /// a request (a deadline run's deadline may be gone from `next_deadline`, overwritten
        /// by the run's own mark).
        struct Taken<'a> {
            gc: &'a GcState,
            deletions: u64,
            mutations: u64,
            completed: bool,
        }
        impl Drop for Taken<'_> {
            fn drop(&mut self) {
                if !self.completed {
                    self.gc
                        .deletions
                        .fetch_add(self.deletions, Ordering::Relaxed);
                    self.gc
                        .mutations
                        .fetch_add(self.mutations, Ordering::Relaxed);
                    self.gc.requested.store(true, Ordering::Relaxed);
                }
            }
        }
        self.gc.requested.store(false, Ordering::Relaxed);
        let mut taken = Taken {
            gc: &self.gc,
            deletions: self.gc.deletions.swap(0, Ordering::Relaxed),
            mutations: self.gc.mutations.swap(0, Ordering::Relaxed),
            completed: false,
        };
        let result = self.collect().await;
        taken.completed = result.is_ok();
        drop(taken);
        let mut stats = result?;
        stats.trigger = trigger.to_string();
        self.gc.runs.fetch_add(1, Ordering::Relaxed);
        let opts = self
            .gc
            .options
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let pause = Duration::from_secs_f64(stats.writers_blocked_ms / 1000.0 / opts.pause_share);
        *self.gc.not_before.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + pause);
        let busy =
            Duration::from_secs_f64((stats.mark_ms + stats.sweep_ms) / 1000.0 / opts.pause_share);
        *self
            .gc
            .cpu_not_before
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + busy);
        *self.gc.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats.clone());
        self.metrics.gc(&stats);
        // The run history is a report: failing to write it does not fail the collection.
        let text = serde_json::to_string(&stats).expect("gc stats serialize");
        match self
            .backend
            .gc_run_record(&text, stats.started_at, GC_RUNS_KEPT)
            .await
        {
            Ok(()) | Err(Error::Unsupported { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "could not record the collection's statistics"),
        }
        Ok(stats)
    }

    async fn collect(&self) -> Result<GcStats> {
        let started = Instant::now();
        let now = self.clock.now();
        let mut stats = GcStats {
            started_at: now,
            trigger: "explicit".into(),
            ..GcStats::default()
        };
        *self
            .gc
            .noted_in_run
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(None);
        // The snapshot (SQLite reads it synchronously; PostgreSQL decodes a million rows) and the
        // mark are long CPU work: on a blocking thread, so the runtime's workers keep serving
        // writers meanwhile.
        let backend = self.backend.clone();
        let handle = tokio::runtime::Handle::current();
        let (snap, marked, read) = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let snap = handle.block_on(backend.gc_snapshot())?;
            let read = t.elapsed();
            let marked = gc::mark(&snap, now);
            Ok::<_, Error>((snap, marked, read))
        })
        .await
        .map_err(|e| Error::Backend(format!("the mark phase panicked: {e}")))??;
        stats.snapshot_ms = read.as_secs_f64() * 1000.0;
        let noted = self
            .gc
            .noted_in_run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .flatten();
        *self
            .gc
            .next_deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = match (marked.next_deadline, noted) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        *self.gc.last_mark.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap.revision);
        stats.mark_revision = Some(snap.revision);
        stats.next_deadline = marked.next_deadline;
        // The mark replaced the deadlines noted so far with those it saw at its revision: the
        // ones committed after it are taken from the change log again.
        {
            let mut followed = self.gc.followed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = followed.as_mut() {
                for p in f.iter_mut() {
                    *p = (*p).min(snap.revision);
                }
            }
            self.gc.mark_epoch.fetch_add(1, Ordering::AcqRel);
        }
        stats.marked = marked.live as u64;
        stats.mark_ms = started.elapsed().as_secs_f64() * 1000.0;

        let sweep_start = Instant::now();
        let target = self
            .gc
            .options
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sweep_batch_target;
        let mut batch = 512usize;
        // Taken from the end (reversed once), so each batch is a cheap split.
        let mut objects = marked.garbage_objects;
        let mut blobs = marked.garbage_blobs;
        objects.reverse();
        blobs.reverse();
        let mut leases = marked.expired_leases.clone();
        let mut freed_digests = Vec::new();
        let mut fresh = Fresh::new(snap.revision);
        // The kinds the mark took as collectable: every sweep transaction checks they still are
        // (a kind declared not collectable makes its objects roots whose references the mark
        // may not have followed: its garbage, and what a flat lease keeps without following),
        // and the run spares the rest when one is no longer. (Sorted: the sweeps lock their
        // rows in one order.)
        let collectable_kinds: Vec<String> = snap
            .kinds
            .iter()
            .filter(|k| k.collectable)
            .map(|k| k.kind.clone())
            .collect::<std::collections::BTreeSet<String>>()
            .into_iter()
            .collect();
        // Nothing below reads the mark's snapshot (external collectors read the store afresh).
        drop(snap);
        // Whether the last batch removed none of its candidates: only then may a kind have
        // changed (each sweep transaction checks), and the kinds are read to stop the run.
        let mut all_spared = false;
        while !objects.is_empty() || !blobs.is_empty() || !leases.is_empty() {
            if all_spared && !fresh.gave_up && self.kinds_changed(&collectable_kinds).await? {
                fresh.gave_up = true;
            }
            // What changed since the last batch is protected here, so each sweep transaction
            // only reads the change log written since (see `Fresh`).
            let spared = self.advance(&mut fresh, &mut objects, &mut blobs).await?;
            stats.spared += spared;
            if fresh.gave_up {
                stats.spared += (objects.len() + blobs.len()) as u64;
                objects.clear();
                blobs.clear();
                if leases.is_empty() {
                    break;
                }
            }
            let n_obj = objects.len().min(batch);
            let n_blob = blobs.len().min(batch - n_obj);
            let op = Op::GcSweep {
                mark_revision: fresh.mark,
                objects: objects.split_off(objects.len() - n_obj),
                blobs: blobs.split_off(blobs.len() - n_blob),
                expired_leases: std::mem::take(&mut leases),
                collectable_kinds: collectable_kinds.clone(),
            };
            let t = Instant::now();
            let batch_now = self.clock.now();
            let results = self
                .backend
                .commit(Batch {
                    preconditions: Vec::new(),
                    ops: vec![op],
                    now: batch_now,
                })
                .await?;
            let took = t.elapsed();
            let ms = took.as_secs_f64() * 1000.0;
            stats.writers_blocked_ms += ms;
            stats.writers_blocked_max_ms = stats.writers_blocked_max_ms.max(ms);
            // Aim the next batch at the target: proportional, at most halving or doubling.
            if n_obj + n_blob == batch {
                let ratio = target.as_secs_f64() / took.as_secs_f64().max(1e-4);
                batch = ((batch as f64 * ratio.clamp(0.5, 2.0) * 0.9) as usize).clamp(16, 16_384);
            }
            all_spared = false;
            for r in &results {
                if let Applied::Swept {
                    objects,
                    blobs,
                    bytes,
                    leases,
                    spared,
                } = &r.applied
                {
                    all_spared = *spared > 0 && *objects == 0 && blobs.is_empty();
                    stats.swept_objects += objects;
                    stats.bytes_freed += bytes;
                    stats.expired_leases += leases;
                    stats.spared += spared;
                    freed_digests.extend(blobs.iter().cloned());
                }
            }
            if results.iter().any(|r| r.changed) {
                // Removals make no claim candidate: wake the watches, not waiting claims.
                self.committed_batch(crate::session::Touched::Nothing, &results, None);
            }
        }
        stats.swept_blobs = freed_digests.len() as u64;
        // Bytes after the metadata: outside any transaction writers wait for.
        if !freed_digests.is_empty() {
            ignore_unsupported(self.backend.blob_remove_bytes(&freed_digests).await)?;
        }
        stats.orphans_removed = ignore_unsupported(self.backend.blob_orphans_remove().await)?;
        ignore_unsupported(self.backend.ingest_sweep(now).await)?;
        self.run_external(&mut stats).await;
        stats.sweep_ms = sweep_start.elapsed().as_secs_f64() * 1000.0;
        Ok(stats)
    }

    /// Whether a kind of `kinds` (collectable at the mark) is no longer collectable.
    async fn kinds_changed(&self, kinds: &[String]) -> Result<bool> {
        if kinds.is_empty() {
            return Ok(false);
        }
        let now: HashSet<String> = self
            .backend
            .gc_kinds()
            .await?
            .into_iter()
            .filter(|k| k.collectable)
            .map(|k| k.kind)
            .collect();
        Ok(kinds.iter().any(|k| !now.contains(k)))
    }

    /// The entities put after `mark` up to the settled revision — with `to_newest`, up to the
    /// newest committed one: what committed behind a transaction still open (PostgreSQL) is
    /// seen too, while the position returned moves only to the settled revision, so it is read
    /// again later — and that position, or `None` when there are none or what changed can no
    /// longer be told — past a compaction or [`FRESH_MAX`] entities, which sets `gave_up` (the
    /// caller spares the rest) — or it had already.
    async fn changed_since(
        &self,
        mark: Revision,
        gave_up: &mut bool,
        to_newest: bool,
    ) -> Result<Option<(Vec<(Revision, String, String, String)>, Revision)>> {
        if *gave_up {
            return Ok(None);
        }
        let settled = self.backend.settled_revision(SETTLE_WAIT).await?;
        let upto = match to_newest {
            true => settled.max(self.backend.revision().await?.current),
            false => settled,
        };
        if upto <= mark {
            return Ok(None);
        }
        match self.backend.gc_changed(mark, upto, FRESH_MAX).await {
            Ok(c) if c.len() < FRESH_MAX => Ok(Some((c, settled.max(mark)))),
            Ok(_) | Err(Error::Compacted { .. }) => {
                *gave_up = true;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Protect, outside any transaction, everything reachable from what was put after
    /// `fresh.mark` up to the settled revision, drop it from the candidates (`objects`, `blobs`)
    /// and move `fresh.mark` there. Returns how many candidates it spared.
    async fn advance(
        &self,
        fresh: &mut Fresh,
        objects: &mut Vec<fleetdb_core::ObjectKey>,
        blobs: &mut Vec<String>,
    ) -> Result<u64> {
        // The sweep's own transaction reads what committed past the settled revision.
        let Some((changed, settled)) = self
            .changed_since(fresh.mark, &mut fresh.gave_up, false)
            .await?
        else {
            return Ok(0);
        };
        // The nodes put in (mark, settled]: re-read even if protected before (their references
        // may have changed); other nodes protected before were closed over then and have not
        // changed since (a change would be in this range or after it).
        let mut start: HashSet<Resource> = HashSet::new();
        for (_, ns, kind, id) in changed {
            match gc::change_start(ns, kind, id) {
                gc::ChangeStart::Node(r) => {
                    start.insert(r);
                }
                gc::ChangeStart::Lease(id) => {
                    start.extend(ignore_unsupported(self.backend.lease_resources(&id).await)?);
                }
                gc::ChangeStart::Export(key) => {
                    let mut q = WorldQuery::new(Space::Export);
                    q.key = Some(key);
                    q.limit = 1;
                    for rec in self.backend.world_list(&q).await? {
                        start.extend(ExportMeta::holds_of(rec.meta.as_deref()));
                    }
                }
                gc::ChangeStart::None => {}
            }
        }
        let mut stack: Vec<Resource> = start.iter().cloned().collect();
        let mut seen: HashSet<Resource> = HashSet::new();
        let mut newly = 0usize;
        while let Some(r) = stack.pop() {
            if !seen.insert(r.clone()) {
                continue;
            }
            if !start.contains(&r) && fresh.contains(&r) {
                continue;
            }
            if fresh.insert(&r) {
                newly += 1;
            }
            let labels = match &r {
                Resource::Object { key } => self
                    .backend
                    .object_get(key)
                    .await?
                    .map(|o| (key.namespace.clone(), o.labels)),
                Resource::Blob { digest } => {
                    ignore_unsupported(self.backend.blob_info(digest).await)?
                        .map(|b| (String::new(), b.labels))
                }
            };
            if let Some((ns, labels)) = labels {
                stack.extend(
                    gc::references(&ns, &labels)
                        .into_iter()
                        .filter(|x| !seen.contains(x)),
                );
            }
        }
        fresh.mark = settled;
        if newly == 0 {
            return Ok(0);
        }
        let before = objects.len() + blobs.len();
        objects.retain(|k| !fresh.objects.contains(k));
        blobs.retain(|d| !fresh.blobs.contains(d));
        Ok((before - objects.len() - blobs.len()) as u64)
    }

    /// External collectors: remove what exists, is not active, not held for a live lease by the
    /// collector, not a live lease's resource and not referenced by any object. A failing
    /// collector skips the round.
    ///
    /// What is held is read from the store AFTER the collectors were asked what exists (and what
    /// they keep): judged from the mark's snapshot, a resource leased or referenced while the
    /// collection ran was listed by `all` and removed though in use. Every collector's `all`,
    /// `active` and `leased` are asked first, then ONE fresh snapshot is read (revision `R`),
    /// and before each removal what was put after `R` is read from the change log
    /// ([`ExternalFresh`]), so a reference or lease written meanwhile spares its resource.
    async fn run_external(&self, stats: &mut GcStats) {
        let collectors: Vec<Arc<dyn ExternalCollector>> = self
            .gc
            .collectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if collectors.is_empty() {
            return;
        }
        let mut rounds = Vec::with_capacity(collectors.len());
        for c in collectors {
            let asked = async {
                let all = c.all().await?;
                let active: HashSet<String> = c.active().await?.into_iter().collect();
                let mut leased: HashMap<String, Vec<String>> = HashMap::new();
                for (lease, id) in c.leased().await? {
                    leased.entry(id).or_default().push(lease);
                }
                Ok::<_, Error>(ExternalRound {
                    all,
                    active,
                    leased,
                })
            };
            match asked.await {
                Ok(round) => rounds.push((c, round)),
                Err(e) => fail_round(&*c, e, stats).await,
            }
        }
        let any_candidate = rounds
            .iter()
            .any(|(_, r)| r.all.iter().any(|id| !r.active.contains(id)));
        let mut fresh = if any_candidate {
            match ExternalFresh::read(self).await {
                Ok(f) => Some(f),
                Err(e) => {
                    for (c, _) in rounds {
                        fail_round(
                            &*c,
                            Error::Backend(format!("reading what is held: {e}")),
                            stats,
                        )
                        .await;
                    }
                    return;
                }
            }
        } else {
            None
        };
        for (c, round) in rounds {
            let kind = c.kind().to_string();
            let result = async {
                if let Some(fresh) = fresh.as_mut() {
                    for id in &round.all {
                        if round.active.contains(id) {
                            continue;
                        }
                        if fresh.keeps(&kind, id, &round.leased) {
                            continue;
                        }
                        // Written since the fresh read: a new reference or lease spares it.
                        self.external_advance(fresh).await?;
                        if fresh.gave_up {
                            break;
                        }
                        if fresh.keeps(&kind, id, &round.leased) {
                            continue;
                        }
                        c.remove(id).await?;
                    }
                }
                c.finish().await
            };
            if let Err(e) = result.await {
                fail_round(&*c, e, stats).await;
            }
        }
    }

    /// Take into `fresh` what was put since its revision (up to the settled revision): the
    /// references of objects written since, the resources of leases created or extended since
    /// (and those leases, as alive). Past a compaction, or past [`FRESH_MAX`] changed entities,
    /// it gives up: what is held can no longer be told, and nothing more is removed this round.
    async fn external_advance(&self, fresh: &mut ExternalFresh) -> Result<()> {
        // Nothing checks again before the collector removes: read what committed behind an
        // open transaction too (before, a reference committed past the settled revision was
        // missed and its resource removed).
        let Some((changed, settled)) = self
            .changed_since(fresh.mark, &mut fresh.gave_up, true)
            .await?
        else {
            return Ok(());
        };
        for (_, ns, kind, id) in changed {
            match gc::change_start(ns, kind, id) {
                gc::ChangeStart::Node(Resource::Object { key }) => {
                    if let Some(o) = self.backend.object_get(&key).await? {
                        fresh.hold_references(&key.namespace, &o.labels);
                    }
                }
                gc::ChangeStart::Lease(id) => {
                    // Put since the fresh read: alive then (a lease is created alive, and only
                    // a live lease is extended); kept alive for this round, which only keeps more.
                    for r in ignore_unsupported(self.backend.lease_resources(&id).await)? {
                        fresh.hold(&r);
                    }
                    fresh.live.insert(id);
                }
                // Blobs reference blobs only; exports hold what exists in the store.
                gc::ChangeStart::Node(Resource::Blob { .. })
                | gc::ChangeStart::Export(_)
                | gc::ChangeStart::None => {}
            }
        }
        fresh.mark = settled;
        Ok(())
    }
}

/// What a collector said in one round: what exists, what it keeps itself, what it holds for
/// leases.
struct ExternalRound {
    all: Vec<String>,
    active: HashSet<String>,
    /// Resource id → the leases the collector holds it for.
    leased: HashMap<String, Vec<String>>,
}

/// Cancel a collector's round and report why.
async fn fail_round(c: &dyn ExternalCollector, e: Error, stats: &mut GcStats) {
    c.cancel().await;
    stats.collector_errors.push(format!("{}: {e}", c.kind()));
}

/// What external collectors must keep, read after they listed what exists: `(kind, id)` of every
/// reference to a non-blob kind by an object, and of every live lease's `Resource::Object`; the
/// leases alive. Over-approximates (any object's reference counts, a lease is taken as alive for
/// the rest of the round), which only ever keeps more. `mark` is the revision it is complete up
/// to ([`Store::external_advance`] moves it).
struct ExternalFresh {
    mark: Revision,
    held: HashSet<(String, String)>,
    live: HashSet<String>,
    gave_up: bool,
}

impl ExternalFresh {
    async fn read(store: &Store) -> Result<Self> {
        // Long CPU work on a large store (as the mark's snapshot): on a blocking thread.
        let backend = store.backend.clone();
        let clock = store.clock.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let snap = handle.block_on(backend.gc_snapshot())?;
            Ok(Self::of(&snap, clock.now()))
        })
        .await
        .map_err(|e| Error::Backend(format!("reading what is held panicked: {e}")))?
    }

    /// What `snap` holds, with the leases alive at `now`.
    fn of(snap: &gc::GcSnapshot, now: Timestamp) -> Self {
        let mut fresh = ExternalFresh {
            mark: snap.revision,
            held: HashSet::new(),
            live: snap
                .leases
                .iter()
                .filter(|l| l.alive_at(now))
                .map(|l| l.id.clone())
                .collect(),
            gave_up: false,
        };
        for (key, _, labels) in &snap.objects {
            if let Some(l) = labels {
                fresh.hold_references(&key.namespace, l);
            }
        }
        for (lease, r) in &snap.lease_resources {
            if fresh.live.contains(lease.as_str()) {
                fresh.hold(r);
            }
        }
        fresh
    }

    fn hold(&mut self, r: &Resource) {
        if let Resource::Object { key } = r {
            self.held.insert((key.kind.clone(), key.id.clone()));
        }
    }

    fn hold_references(&mut self, namespace: &str, labels: &fleetdb_core::Labels) {
        for r in gc::references(namespace, labels) {
            self.hold(&r);
        }
    }

    /// Whether resource `id` of `kind` is held: referenced, a live lease's, or listed by its
    /// collector as held for a live lease (`leased`).
    fn keeps(&self, kind: &str, id: &str, leased: &HashMap<String, Vec<String>>) -> bool {
        self.held.contains(&(kind.to_string(), id.to_string()))
            || leased
                .get(id)
                .is_some_and(|leases| leases.iter().any(|l| self.live.contains(l.as_str())))
    }
}

/// Collections whose statistics the store keeps (`Store::gc_history`).
pub const GC_RUNS_KEPT: usize = 100;

/// Distinct entities changed during a collection beyond which the rest of it spares everything
/// (as a sweep transaction does).
const FRESH_MAX: usize = 100_000;
/// How long the collector waits for revisions in flight before protecting what changed.
const SETTLE_WAIT: Duration = Duration::from_millis(50);

/// What the collector protects between sweep transactions. Each sweep transaction carries
/// `mark` as its mark revision: it spares candidates changed after `mark` and everything
/// reachable from what was put after `mark` (invariant 36, inside the transaction); what was put
/// between the snapshot's revision and `mark` was closed over here, from the settled change log,
/// and its candidates dropped. Together that is exactly what a transaction marking at the
/// snapshot's revision would spare: a path from something put after the snapshot to a candidate
/// either passes a node put after `mark` (the transaction follows it) or consists of nodes that
/// have not changed since `mark`, whose references read here are still those in force.
/// The point: the sweep transaction no longer scans its own earlier batches' change rows.
struct Fresh {
    mark: fleetdb_core::Revision,
    objects: HashSet<fleetdb_core::ObjectKey>,
    blobs: HashSet<String>,
    gave_up: bool,
}

impl Fresh {
    fn new(mark: fleetdb_core::Revision) -> Self {
        Fresh {
            mark,
            objects: HashSet::new(),
            blobs: HashSet::new(),
            gave_up: false,
        }
    }

    fn contains(&self, r: &Resource) -> bool {
        match r {
            Resource::Object { key } => self.objects.contains(key),
            Resource::Blob { digest } => self.blobs.contains(digest),
        }
    }

    /// Whether it was new.
    fn insert(&mut self, r: &Resource) -> bool {
        match r {
            Resource::Object { key } => self.objects.insert(key.clone()),
            Resource::Blob { digest } => self.blobs.insert(digest.clone()),
        }
    }
}

fn ignore_unsupported<T: Default>(r: Result<T>) -> Result<T> {
    match r {
        Err(Error::Unsupported { .. }) => Ok(T::default()),
        other => other,
    }
}
