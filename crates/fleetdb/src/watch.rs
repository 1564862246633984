//! Watches: resumable, filtered change feeds with bounded buffers.
//!
//! One hub per store reads the change log ONCE for all watchers of the process and fans each
//! change out to the watchers whose filter it passes. The log is the truth; wake-ups only say
//! "look again": a local commit (pushed, no polling), a `NOTIFY` from another process
//! (PostgreSQL), or the poll interval as the fallback. The hub only delivers up to the backend's
//! settled revision ([`Backend::settled_revision`]), below which no revision can still appear, so
//! "resume after the last revision you saw" never skips anything.
//!
//! A watcher that starts from an old revision first catches up on its own task (reading the log
//! with its filter, at its consumer's pace), then joins the hub's live fan-out at exactly the
//! hub's position. A live watcher whose buffer is full is ended with
//! [`Error::WatchLagged`]`{ last_delivered }`: it never blocks writers or other watchers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fleetdb_core::world::{self, Space, WorldQuery, MEMBER_CHANGE_NAMESPACE};
use fleetdb_core::{
    Backend, Change, ChangeFilter, ChangeOp, Entity, Error, ObjectQuery, Result, Revision,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use crate::Store;

/// Events buffered per watcher by default before a slow consumer is cut off.
pub const WATCH_BUFFER_DEFAULT: usize = 1024;
/// Largest buffer a watcher may ask for.
pub const WATCH_BUFFER_MAX: usize = 1 << 20;
/// Change-log rows the hub reads per query.
const HUB_PAGE: usize = 10_000;
/// Commits within this window after an announcement share the next one.
const ANNOUNCE_COALESCE: Duration = Duration::from_millis(5);
/// How long the hub lets `settled_revision` wait for an in-flight transaction.
const SETTLE_WAIT: Duration = Duration::from_millis(500);

/// Reads of a watch's snapshot at most, while items newer than its settled revision come back
/// (see `Store::watch`).
const SNAPSHOT_READS_MAX: usize = 3;
/// Pauses between a catching-up watch's failed reads: from 100 ms, doubling to 5 s.
const CATCH_UP_RETRY_FIRST: Duration = Duration::from_millis(100);
const CATCH_UP_RETRY_MAX: Duration = Duration::from_secs(5);

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "scope")]
pub enum WatchScope {
    /// Every change (operators; no snapshot: only its revision).
    All,
    /// Objects (and their tags) of a namespace, optionally of one kind and id prefix.
    Objects {
        namespace: String,
        kind: Option<String>,
        id_prefix: Option<String>,
    },
    /// Keys with this prefix ("" for all).
    Kv {
        prefix: String,
    },
    /// Exports the watching host may see, optionally of one kind.
    Exports {
        kind: Option<String>,
    },
    /// One per-host map.
    Map {
        namespace: String,
    },
    Deploys,
    /// One scheduler namespace, or all.
    Schedule {
        namespace: Option<String>,
    },
    /// Sessions joining and leaving.
    Members,
}

impl WatchScope {
    fn validate(&self) -> Result<()> {
        match self {
            WatchScope::Objects {
                namespace,
                kind,
                id_prefix,
            } => ChangeFilter {
                namespace: Some(namespace.clone()),
                kind: kind.clone(),
                id_prefix: id_prefix.clone(),
            }
            .validate(),
            WatchScope::Kv { prefix } => world::validate_kv_prefix(prefix),
            WatchScope::Exports { kind: Some(k) } => fleetdb_core::validate::name("export kind", k),
            WatchScope::Map { namespace }
            | WatchScope::Schedule {
                namespace: Some(namespace),
            } => fleetdb_core::validate::name("namespace", namespace),
            _ => Ok(()),
        }
    }

    /// The change-log filter that selects this scope (an index range in every backend).
    fn filter(&self) -> ChangeFilter {
        let f = |ns: &str, kind: Option<&str>, prefix: Option<&str>| ChangeFilter {
            namespace: Some(ns.to_string()),
            kind: kind.map(str::to_string),
            id_prefix: prefix.filter(|p| !p.is_empty()).map(str::to_string),
        };
        match self {
            WatchScope::All => ChangeFilter::default(),
            WatchScope::Objects {
                namespace,
                kind,
                id_prefix,
            } => f(namespace, kind.as_deref(), id_prefix.as_deref()),
            WatchScope::Kv { prefix } => f(Space::Kv.change_namespace(), Some(""), Some(prefix)),
            WatchScope::Exports { kind } => {
                f(Space::Export.change_namespace(), kind.as_deref(), None)
            }
            WatchScope::Map { namespace } => {
                f(Space::Map.change_namespace(), Some(namespace), None)
            }
            WatchScope::Deploys => f(Space::Deploy.change_namespace(), Some(""), None),
            WatchScope::Schedule { namespace } => f(
                Space::Schedule.change_namespace(),
                namespace.as_deref(),
                None,
            ),
            WatchScope::Members => f(MEMBER_CHANGE_NAMESPACE, None, None),
        }
    }
}

/// A watch to open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    pub scope: WatchScope,
    /// Replay changes after this revision. `None`: start with a snapshot of the scope.
    pub from_revision: Option<Revision>,
    /// Only what this host may see (World exports directed elsewhere are hidden). `None`: the
    /// operator's view, every export of every host included.
    pub viewer: Option<String>,
    /// Events buffered before a slow consumer is cut off (default [`WATCH_BUFFER_DEFAULT`]).
    pub buffer: Option<usize>,
}

impl WatchRequest {
    pub fn new(scope: WatchScope) -> Self {
        WatchRequest {
            scope,
            from_revision: None,
            viewer: None,
            buffer: None,
        }
    }

    pub fn from_revision(mut self, r: Revision) -> Self {
        self.from_revision = Some(r);
        self
    }

    pub fn viewer(mut self, host: impl Into<String>) -> Self {
        self.viewer = Some(host.into());
        self
    }

    pub fn buffer(mut self, n: usize) -> Self {
        self.buffer = Some(n);
        self
    }
}

/// One thing a watch delivers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum WatchEvent {
    /// The scope's state when the watch started (only without `from_revision`), as put changes
    /// carrying each item's own revision. Every change after `revision` follows; a change the
    /// snapshot already reflects is not repeated.
    Snapshot {
        revision: Revision,
        /// Shared, so that an event stays one pointer wide in every watcher's buffer.
        items: Arc<Vec<Change>>,
    },
    Change(Arc<Change>),
    /// Nothing new up to `revision`: a consumer may resume from here.
    Progress {
        revision: Revision,
    },
}

impl WatchEvent {
    /// The revision a consumer may resume after once it has handled this event.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Snapshot { revision, .. } | WatchEvent::Progress { revision } => *revision,
            WatchEvent::Change(c) => c.revision,
        }
    }
}

/// The receiving end of a watch. Dropping it ends the watch.
pub struct Watch {
    rx: mpsc::Receiver<WatchEvent>,
    end: Arc<Mutex<Option<Error>>>,
    done: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("done", &self.done).finish()
    }
}

impl Watch {
    /// The next event; `Some(Err(_))` once if the watch was ended (e.g. `WatchLagged`), then
    /// `None`.
    pub async fn next(&mut self) -> Option<Result<WatchEvent>> {
        if self.done {
            return None;
        }
        match self.rx.recv().await {
            Some(ev) => Some(Ok(ev)),
            None => {
                self.done = true;
                let err = self.end.lock().unwrap_or_else(|p| p.into_inner()).take();
                Some(Err(err.unwrap_or_else(|| {
                    Error::Unavailable("the store was closed; resume the watch".into())
                })))
            }
        }
    }

    /// Like [`Watch::next`], giving up after `timeout` (`None`: nothing arrived).
    pub async fn next_timeout(&mut self, timeout: Duration) -> Option<Result<WatchEvent>> {
        tokio::time::timeout(timeout, self.next())
            .await
            .ok()
            .flatten()
    }
}

struct Watcher {
    filter: ChangeFilter,
    viewer: Option<String>,
    tx: mpsc::Sender<WatchEvent>,
    end: Arc<Mutex<Option<Error>>>,
    /// Last revision fully handed to the consumer (or filtered out).
    pos: Revision,
    /// Per-key revisions of the snapshot (changes at or below are already reflected).
    snapshot: Option<HashMap<(String, String, String, String), Revision>>,
    /// A revision known settled when the watch opened (its snapshot's, or read for a resume).
    settled: Revision,
    last_sent: Instant,
}

impl Watcher {
    fn wants(&self, c: &Change) -> bool {
        if !self.filter.matches(c) {
            return false;
        }
        if let Some(v) = &self.viewer {
            if !world::change_visible(v, c) {
                return false;
            }
        }
        if let Some(snap) = &self.snapshot {
            let k = (
                c.namespace.clone(),
                c.kind.clone(),
                c.id.clone(),
                c.name.clone(),
            );
            // A member in the snapshot has no revision of its own (sessions carry none): its
            // join, a put, is the one the snapshot holds (session ids are never reused).
            let joined = c.entity == Entity::Member && c.op == ChangeOp::Put;
            if snap.get(&k).is_some_and(|r| c.revision <= *r || joined) {
                return false;
            }
        }
        true
    }

    /// Offer a change. Returns false when the watcher is finished (consumer gone or too slow).
    fn offer(&mut self, c: &Arc<Change>) -> bool {
        if self.wants(c) {
            match self.tx.try_send(WatchEvent::Change(c.clone())) {
                Ok(()) => self.last_sent = Instant::now(),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    *self.end.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Error::WatchLagged {
                            last_delivered: self.pos,
                        });
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        self.pos = c.revision;
        true
    }
}

/// The per-store fan-out. See the module documentation.
#[derive(Default)]
pub(crate) struct Hub {
    state: Mutex<HubState>,
    /// A commit of this process, or a NOTIFY from another.
    wake: Notify,
    /// The hub moved (watchers catching up wait on it).
    moved: Notify,
    pub(crate) started: crate::TaskFlag,
    /// Set by a local commit; the announcer tells other processes.
    announce: Notify,
    announcer_started: crate::TaskFlag,
    /// Tests only: run once in `hub_step` between reading a page and fanning it out.
    #[cfg(test)]
    after_read: TestHook,
    /// Tests only: run once in `Store::watch` between the snapshot's revision and its state.
    #[cfg(test)]
    before_snapshot: TestHook,
}

/// Tests only: a step (a commit, a watch opening) put between two reads, deterministically.
#[cfg(test)]
type TestHook = Mutex<Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>;

#[cfg(test)]
async fn run_hook(hook: &TestHook) {
    let step = hook.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(step) = step {
        step.await;
    }
}

#[derive(Default)]
struct HubState {
    pos: Revision,
    watchers: Vec<Watcher>,
    /// Watchers still catching up on their own task.
    joining: usize,
}

impl Hub {
    /// A commit of this process happened: look again, and tell other processes.
    pub(crate) fn committed(&self) {
        self.wake.notify_one();
        self.announce.notify_one();
    }
}

/// Options of the hub (from `OpenOptions`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HubTiming {
    pub poll: Duration,
    pub progress: Duration,
}

impl Store {
    /// Open a watch. Without `from_revision` it starts with a snapshot of the scope; with it,
    /// it replays the change log after that revision (`Compacted` if it is gone: relist).
    pub async fn watch(&self, req: WatchRequest) -> Result<Watch> {
        self.ready().await?;
        req.scope.validate()?;
        if let Some(v) = &req.viewer {
            fleetdb_core::validate::name("host", v)?;
        }
        if let Some(from) = req.from_revision {
            crate::position_not_negative("from revision", from)?;
        }
        let buffer = req.buffer.unwrap_or(WATCH_BUFFER_DEFAULT);
        if buffer == 0 || buffer > WATCH_BUFFER_MAX {
            return Err(Error::invalid(
                "watch buffer",
                buffer.to_string(),
                format!("must be between 1 and {WATCH_BUFFER_MAX}"),
            ));
        }
        self.start_hub();
        let filter = req.scope.filter();
        let (tx, rx) = mpsc::channel(buffer);
        let end = Arc::new(Mutex::new(None));
        let (pos, snapshot, settled) = match req.from_revision {
            Some(from) => {
                let info = self.backend.revision().await?;
                if from < info.compacted {
                    return Err(Error::Compacted {
                        requested: from,
                        compacted_revision: info.compacted,
                    });
                }
                if from > info.current {
                    return Err(crate::ahead_of_the_store(
                        "from revision",
                        from,
                        info.current,
                    ));
                }
                let settled = self.backend.settled_revision(SETTLE_WAIT).await?;
                (from, None, settled)
            }
            None => {
                // The snapshot's revision is one no item of it is newer than: a write landing
                // between the settle and the read would be in the items above the revision
                // reported, and a consumer resuming from that revision would get it again. Then
                // settle past it and read again (a few times at most: under a stream of writes
                // to the scope the last read stands, and only the live watch drops repeats).
                let mut settled = self.backend.settled_revision(SETTLE_WAIT).await?;
                let mut items;
                let mut reads = 0;
                loop {
                    #[cfg(test)]
                    run_hook(&self.hub.before_snapshot).await;
                    items = self.snapshot(&req.scope, req.viewer.as_deref()).await?;
                    reads += 1;
                    let newest = items.iter().map(|c| c.revision).max();
                    if newest.is_none_or(|r| r <= settled) || reads == SNAPSHOT_READS_MAX {
                        break;
                    }
                    settled = self.backend.settled_revision(SETTLE_WAIT).await?;
                }
                let keys = items
                    .iter()
                    .map(|c| {
                        (
                            (
                                c.namespace.clone(),
                                c.kind.clone(),
                                c.id.clone(),
                                c.name.clone(),
                            ),
                            c.revision,
                        )
                    })
                    .collect();
                tx.try_send(WatchEvent::Snapshot {
                    revision: settled,
                    items: Arc::new(items),
                })
                .map_err(|_| Error::Backend("a new watch buffer was full".into()))?;
                (settled, Some(keys), settled)
            }
        };
        let watcher = Watcher {
            filter,
            viewer: req.viewer.clone(),
            tx,
            end: end.clone(),
            pos,
            snapshot,
            settled,
            last_sent: Instant::now(),
        };
        self.hub
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .joining += 1;
        // Usually the watcher is at the hub's position already and joins at once; otherwise it
        // catches up on its own task.
        if let Some(watcher) = self.try_register(watcher) {
            let store = self.clone();
            tokio::spawn(async move {
                store.join(watcher).await;
            });
        }
        Ok(Watch {
            rx,
            end,
            done: false,
        })
    }

    /// Catch a watcher up from its position to the hub's, then hand it to the hub. A read that
    /// fails transiently (the database unreachable for a moment) is tried again, as the hub's
    /// are, while the consumer is there: the watch ends only on an error that stays
    /// (`Compacted`, say).
    async fn join(self, mut w: Watcher) {
        let mut pause = CATCH_UP_RETRY_FIRST;
        loop {
            w = match self.try_register(w) {
                None => return,
                Some(w) => w,
            };
            match self.catch_up_step(&mut w).await {
                Ok(true) => pause = CATCH_UP_RETRY_FIRST,
                Err(e) if e.is_retryable() && !w.tx.is_closed() => {
                    tracing::debug!(error = %e, ?pause, "a catching-up watch's read failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(CATCH_UP_RETRY_MAX);
                }
                Ok(false) => {
                    // The consumer is gone.
                    self.hub
                        .state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .joining -= 1;
                    return;
                }
                Err(e) => {
                    self.hub
                        .state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .joining -= 1;
                    *w.end.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    return;
                }
            }
        }
    }

    /// Hand the watcher to the hub if it is at the hub's position (under the lock the hub fans
    /// out with, so no change falls between the two); otherwise give it back.
    fn try_register(&self, w: Watcher) -> Option<Watcher> {
        let mut st = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        // Nobody else depends on an idle hub's position, which must only ever be a settled
        // revision: a snapshot watch puts it at its snapshot's (settled); a resume moves it
        // forward to the revision settled when the watch opened (not to its own, which may be
        // neither settled nor recent: the watch catches up to the hub on its own, at its
        // consumer's pace, then joins). Without this, the first resume on a store waited for
        // the hub to read the change log from 0.
        // (Registered at an old position instead, the watch would get the backlog through the
        // hub's fan-out, which never waits: more than its buffer holds, and it lagged.)
        if st.watchers.is_empty() && st.joining == 1 {
            if w.snapshot.is_some() {
                st.pos = w.pos;
            } else if w.settled > st.pos {
                st.pos = w.settled;
            }
        }
        if w.pos == st.pos {
            st.joining -= 1;
            st.watchers.push(w);
            return None;
        }
        Some(w)
    }

    /// One step of catching up: read the log with the watcher's filter up to the hub's
    /// position. Returns false if the consumer is gone.
    async fn catch_up_step(&self, w: &mut Watcher) -> Result<bool> {
        let target = self.hub.state.lock().unwrap_or_else(|p| p.into_inner()).pos;
        if w.pos > target {
            // The hub is behind this watcher's snapshot: wait for it to move.
            let moved = self.hub.moved.notified();
            self.hub.wake.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(100), moved).await;
            return Ok(!w.tx.is_closed());
        }
        let limit = HUB_PAGE.min(w.tx.max_capacity());
        let page = self.backend.changes(w.pos, &w.filter, limit).await?;
        // A page short of the limit holds every change of ours after `w.pos`; one that went
        // past the target holds every one up to it: either way the watch is at the target
        // (everything up to it is settled), not at its last change, which it would chase the
        // hub from for as long as writes it does not want kept coming.
        let mut whole = page.len() < limit;
        let mut advanced = false;
        for c in page {
            if c.revision > target {
                whole = true;
                break;
            }
            let c = Arc::new(c);
            let rev = c.revision;
            if w.wants(&c) {
                // Catching up goes at the consumer's own pace.
                if w.tx.send(WatchEvent::Change(c)).await.is_err() {
                    return Ok(false);
                }
                w.last_sent = Instant::now();
            }
            w.pos = rev;
            advanced = true;
        }
        if !advanced || whole {
            w.pos = target; // nothing more of ours up to the hub's position
        }
        Ok(true)
    }

    /// The current state of a scope, as put changes with each item's revision.
    async fn snapshot(&self, scope: &WatchScope, viewer: Option<&str>) -> Result<Vec<Change>> {
        let now = self.clock.now();
        let mut out = Vec::new();
        let put =
            |namespace: &str, kind: &str, id: &str, entity, name: &str, value, revision, at| {
                Change {
                    revision,
                    namespace: namespace.to_string(),
                    kind: kind.to_string(),
                    id: id.to_string(),
                    entity,
                    name: name.to_string(),
                    op: ChangeOp::Put,
                    old_value: None,
                    new_value: Some(value),
                    at,
                }
            };
        let world_scan = |space: Space| {
            let mut q = WorldQuery::new(space);
            q.live_at = Some(now);
            q.limit = fleetdb_core::query::LIST_PAGE_MAX;
            q
        };
        let mut queries = Vec::new();
        match scope {
            WatchScope::All => {}
            WatchScope::Objects {
                namespace,
                kind,
                id_prefix,
            } => {
                let mut q = ObjectQuery::new(namespace.clone());
                q.kind = kind.clone();
                q.limit = fleetdb_core::query::LIST_PAGE_MAX;
                loop {
                    let objects = self.backend.object_list(&q).await?;
                    let done = objects.len() < q.limit;
                    for o in &objects {
                        if id_prefix
                            .as_ref()
                            .is_some_and(|p| !o.key.id.starts_with(p.as_str()))
                        {
                            continue;
                        }
                        out.push(put(
                            &o.key.namespace,
                            &o.key.kind,
                            &o.key.id,
                            Entity::Object,
                            "",
                            serde_json::json!({ "labels": o.labels }),
                            o.revision,
                            o.updated_at,
                        ));
                        for t in self.backend.tag_list(&o.key).await? {
                            out.push(put(
                                &o.key.namespace,
                                &o.key.kind,
                                &o.key.id,
                                Entity::Tag,
                                &t.name,
                                t.value.clone(),
                                t.revision,
                                t.updated_at,
                            ));
                        }
                    }
                    match objects.last() {
                        Some(last) if !done => {
                            q.after = Some(fleetdb_core::ObjectCursor {
                                kind: last.key.kind.clone(),
                                id: last.key.id.clone(),
                            });
                        }
                        _ => break,
                    }
                }
            }
            WatchScope::Kv { prefix } => {
                let mut q = world_scan(Space::Kv);
                q.key_prefix = Some(prefix.clone());
                queries.push(q);
            }
            WatchScope::Exports { kind } => {
                let mut q = world_scan(Space::Export);
                q.viewer = viewer.map(str::to_string);
                if let Some(k) = kind {
                    q.filters = vec![world::ExportFilter {
                        kind: Some(k.clone()),
                        ..Default::default()
                    }];
                }
                queries.push(q);
            }
            WatchScope::Map { namespace } => {
                let mut q = world_scan(Space::Map);
                q.scope = Some(namespace.clone());
                queries.push(q);
            }
            WatchScope::Deploys => queries.push(world_scan(Space::Deploy)),
            WatchScope::Schedule { namespace } => {
                let mut q = world_scan(Space::Schedule);
                q.scope = namespace.clone();
                queries.push(q);
                // The live registrations, read in the same snapshot: a schedule is shown as
                // they have it (see `world::schedule_record_live`).
                let mut regs = world_scan(Space::Registration);
                regs.scope = namespace.clone();
                queries.push(regs);
            }
            WatchScope::Members => {
                let mut after: Option<String> = None;
                loop {
                    let page = self
                        .backend
                        .session_list(after.as_deref(), fleetdb_core::query::LIST_PAGE_MAX)
                        .await?;
                    let done = page.len() < fleetdb_core::query::LIST_PAGE_MAX;
                    after = page.last().map(|s| s.id.clone());
                    for s in page.into_iter().filter(|s| s.alive_at(now)) {
                        out.push(put(
                            MEMBER_CHANGE_NAMESPACE,
                            &s.component,
                            &s.id,
                            Entity::Member,
                            "",
                            serde_json::to_value(&s).unwrap_or_default(),
                            Revision(0),
                            s.created_at,
                        ));
                    }
                    if done {
                        break;
                    }
                }
            }
        }
        // Every page from one snapshot: a write landing between two pages is wholly in or out.
        let mut answers = self.backend.world_list_all(&queries).await?;
        if let WatchScope::Schedule { .. } = scope {
            let registrations = answers.pop().unwrap_or_default();
            let mut live: HashMap<String, Vec<world::Registration>> = HashMap::new();
            for r in registrations {
                live.entry(r.scope.clone())
                    .or_default()
                    .push(world::Registration::try_from(r)?);
            }
            for schedules in &mut answers {
                for r in schedules.iter_mut() {
                    let regs = live.get(&r.scope).map_or(&[][..], Vec::as_slice);
                    *r = world::schedule_record_live(r.clone(), regs)?;
                }
            }
        }
        for records in answers {
            for r in records {
                let kind = match r.space {
                    Space::Export => r.kind.clone(),
                    Space::Map | Space::Registration | Space::Schedule => r.scope.clone(),
                    _ => String::new(),
                };
                let value = serde_json::from_str(&r.change_json()).unwrap_or_default();
                out.push(put(
                    r.space.change_namespace(),
                    &kind,
                    &r.key,
                    Entity::from(r.space),
                    "",
                    value,
                    r.revision,
                    r.updated_at,
                ));
            }
        }
        Ok(out)
    }

    pub(crate) fn start_hub(&self) {
        let Some(running) = self.hub.started.start() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // not running after all: `running` drops
        };
        let hub: Weak<Hub> = Arc::downgrade(&self.hub);
        let backend: Weak<dyn Backend> = Arc::downgrade(&self.backend);
        let timing = self.hub_timing;
        {
            let hub = hub.clone();
            let backend2 = self.backend.clone();
            rt.spawn(async move {
                let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                    if let Some(h) = hub.upgrade() {
                        h.wake.notify_one();
                    }
                });
                if let Err(e) = backend2.listen_changes(wake).await {
                    tracing::warn!(error = %e, "listening for other processes' changes failed; polling");
                }
            });
        }
        rt.spawn(async move {
            // The listener above goes with this task's runtime too: both start again together.
            let _running = running;
            let mut last_progress = Instant::now();
            loop {
                let Some(h) = hub.upgrade() else { return };
                let _ = tokio::time::timeout(timing.poll, h.wake.notified()).await;
                let Some(b) = backend.upgrade() else { return };
                let active = {
                    let mut st = h.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.watchers.retain(|w| !w.tx.is_closed()); // dropped watches
                    !st.watchers.is_empty() || st.joining > 0
                };
                if !active {
                    continue;
                }
                if let Err(e) = hub_step(&h, b.as_ref()).await {
                    tracing::warn!(error = %e, "watch hub could not read the change log");
                }
                if last_progress.elapsed() >= timing.progress {
                    last_progress = Instant::now();
                    let mut st = h.state.lock().unwrap_or_else(|p| p.into_inner());
                    let pos = st.pos;
                    st.watchers.retain_mut(|w| {
                        if w.last_sent.elapsed() >= timing.progress {
                            match w.tx.try_send(WatchEvent::Progress { revision: pos }) {
                                Ok(()) => w.last_sent = Instant::now(),
                                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                                Err(mpsc::error::TrySendError::Full(_)) => {}
                            }
                        }
                        true
                    });
                }
            }
        });
    }

    /// Tell other processes about local commits, coalesced (at most one announcement in flight).
    pub(crate) fn start_announcer(&self) {
        let Some(running) = self.hub.announcer_started.start() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // not running after all: `running` drops
        };
        let hub: Weak<Hub> = Arc::downgrade(&self.hub);
        let backend: Weak<dyn Backend> = Arc::downgrade(&self.backend);
        rt.spawn(async move {
            let _running = running;
            loop {
                {
                    let Some(h) = hub.upgrade() else { return };
                    if tokio::time::timeout(Duration::from_secs(1), h.announce.notified())
                        .await
                        .is_err()
                    {
                        continue;
                    }
                }
                let Some(b) = backend.upgrade() else { return };
                if let Err(e) = b.announce_changes().await {
                    tracing::debug!(error = %e, "announcing changes failed");
                }
                drop(b);
                // Coalesce: commits in the next few milliseconds share the next announcement
                // (a NOTIFY per commit would double the database's transactions).
                tokio::time::sleep(ANNOUNCE_COALESCE).await;
            }
        });
    }
}

/// Read what is new up to the settled revision, once, and fan it out.
async fn hub_step(h: &Hub, backend: &dyn Backend) -> Result<()> {
    let settled = backend.settled_revision(SETTLE_WAIT).await?;
    loop {
        let pos = h.state.lock().unwrap_or_else(|p| p.into_inner()).pos;
        if pos >= settled {
            return Ok(());
        }
        let page = match backend
            .changes(pos, &ChangeFilter::default(), HUB_PAGE)
            .await
        {
            Ok(p) => p,
            Err(Error::Compacted { .. }) => {
                // Compacted under a slow hub: every live watcher must relist.
                let info = backend.revision().await?;
                let mut st = h.state.lock().unwrap_or_else(|p| p.into_inner());
                for w in st.watchers.drain(..) {
                    *w.end.lock().unwrap_or_else(|p| p.into_inner()) = Some(Error::Compacted {
                        requested: w.pos,
                        compacted_revision: info.compacted,
                    });
                }
                st.pos = info.compacted.max(settled);
                h.moved.notify_waiters();
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let changes: Vec<Arc<Change>> = page
            .into_iter()
            .filter(|c| c.revision <= settled)
            .map(Arc::new)
            .collect();
        let new_pos = changes.last().map_or(settled, |c| c.revision).max(pos);
        let reached = changes.len() < HUB_PAGE;
        #[cfg(test)]
        run_hook(&h.after_read).await;
        {
            let mut st = h.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.pos != pos {
                // A watcher joined an idle hub and moved its position (`try_register`) while
                // this page was read: the page may be below what that watcher's snapshot
                // holds. Read again from the new position.
                continue;
            }
            st.watchers.retain_mut(|w| {
                if w.tx.is_closed() {
                    return false; // the consumer dropped its Watch
                }
                for c in &changes {
                    if !w.offer(c) {
                        return false;
                    }
                }
                w.pos = if reached {
                    settled.max(new_pos)
                } else {
                    new_pos
                };
                true
            });
            st.pos = if reached {
                settled.max(new_pos)
            } else {
                new_pos
            };
        }
        h.moved.notify_waiters();
        if reached {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OpenOptions;
    use fleetdb_core::work::SessionSpec;
    use fleetdb_core::{ManualClock, Timestamp};
    use tokio::sync::{mpsc::error::TryRecvError, oneshot};

    /// A store on an in-memory SQLite database whose hub moves only when a test steps it
    /// (`hub_step`): its task is never started, so nothing runs between a test's steps.
    async fn store() -> Store {
        let s = Store::open_with(
            "sqlite::memory:",
            OpenOptions {
                clock: Some(Arc::new(ManualClock::new(Timestamp(1_767_225_600_000_000)))),
                background: false,
                ..OpenOptions::default()
            },
        )
        .await
        .unwrap();
        // Marked running for good, by no task.
        std::mem::forget(s.hub.started.start());
        s
    }

    fn hub_pos(s: &Store) -> Revision {
        s.hub.state.lock().unwrap().pos
    }

    /// A watcher resuming after `pos` (as `Store::watch` makes one), not yet handed to the hub.
    fn resume_watcher(
        scope: &WatchScope,
        pos: Revision,
        settled: Revision,
        buffer: usize,
    ) -> (Watcher, mpsc::Receiver<WatchEvent>) {
        let (tx, rx) = mpsc::channel(buffer);
        let w = Watcher {
            filter: scope.filter(),
            viewer: None,
            tx,
            end: Arc::default(),
            pos,
            snapshot: None,
            settled,
            last_sent: Instant::now(),
        };
        (w, rx)
    }

    /// The revisions of the changes buffered for `rx`, and that nothing else is.
    fn buffered_changes(rx: &mut mpsc::Receiver<WatchEvent>) -> Vec<Revision> {
        let mut out = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(WatchEvent::Change(c)) => out.push(c.revision),
                Ok(other) => panic!("expected only changes, got {other:?}"),
                Err(TryRecvError::Empty) => return out,
                Err(TryRecvError::Disconnected) => panic!("the watch was ended"),
            }
        }
    }

    /// c92775a: a snapshot watch joins the idle hub (moving its position from P to its
    /// snapshot's revision S) while a hub step is between reading a page from P and fanning it
    /// out. The page is read again from S: the watch gets nothing at or below its snapshot.
    /// Before, the page from P was fanned out to it: a key put and deleted before the snapshot
    /// (so not in it) came as two changes below the snapshot's revision.
    #[tokio::test]
    async fn a_page_read_before_a_snapshot_watch_moved_the_idle_hub_is_not_fanned_out() {
        let s = store().await;
        s.kv_set("gone", "1").await.unwrap();
        s.kv_delete("gone", None).await.unwrap();
        let kept = s.kv_set("kept", "1").await.unwrap().item.revision;
        let start = hub_pos(&s);
        assert!(start < kept, "the hub is behind the log: {start:?}");

        // Between the step's read and its fan-out: a snapshot watch opens on the idle hub.
        let (opened, watch) = oneshot::channel();
        let s2 = s.clone();
        *s.hub.after_read.lock().unwrap() = Some(Box::pin(async move {
            let w = s2
                .watch(WatchRequest::new(WatchScope::Kv { prefix: "".into() }))
                .await
                .unwrap();
            let _ = opened.send(w);
        }));
        hub_step(&s.hub, s.backend.as_ref()).await.unwrap();
        let mut w = watch.await.expect("the hook ran");

        match w.rx.try_recv() {
            Ok(WatchEvent::Snapshot { revision, items }) => {
                assert_eq!(revision, kept);
                let keys: Vec<&str> = items.iter().map(|c| c.id.as_str()).collect();
                assert_eq!(keys, ["kept"]);
            }
            other => panic!("expected the snapshot, got {other:?}"),
        }
        assert_eq!(
            buffered_changes(&mut w.rx),
            [],
            "changes at or below the snapshot's revision {kept:?}"
        );
        assert_eq!(hub_pos(&s), kept);

        // The watch is live at its snapshot: the next commit comes, once.
        let next = s.kv_set("next", "1").await.unwrap().item.revision;
        hub_step(&s.hub, s.backend.as_ref()).await.unwrap();
        assert_eq!(buffered_changes(&mut w.rx), [next]);
    }

    /// c92775a: a session that joins between a member snapshot's revision and its session
    /// listing is in the snapshot (members carry no revision: 0) and its join is a change after
    /// the snapshot's revision. The join is not delivered again; its leave still comes. Before,
    /// the join came as a change after the snapshot that already held the session.
    #[tokio::test]
    async fn a_member_joining_while_the_snapshot_is_read_is_not_delivered_twice() {
        let s = store().await;
        let (started, session) = oneshot::channel();
        let s2 = s.clone();
        *s.hub.before_snapshot.lock().unwrap() = Some(Box::pin(async move {
            let sess = s2
                .session_start(SessionSpec::new("agent", "h1"))
                .await
                .unwrap();
            let _ = started.send(sess);
        }));
        let mut w = s
            .watch(WatchRequest::new(WatchScope::Members))
            .await
            .unwrap();
        let sess = session.await.expect("the hook ran");
        let snapshot = match w.rx.try_recv() {
            Ok(WatchEvent::Snapshot { revision, items }) => {
                let ids: Vec<&str> = items.iter().map(|c| c.id.as_str()).collect();
                assert_eq!(ids, [sess.id()], "the session is in the snapshot");
                revision
            }
            other => panic!("expected the snapshot, got {other:?}"),
        };
        let joined = s
            .backend
            .changes(snapshot, &WatchScope::Members.filter(), 10)
            .await
            .unwrap();
        assert!(
            matches!(&joined[..], [c] if c.op == ChangeOp::Put && c.id == sess.id()),
            "the join is a change after the snapshot's revision: {joined:?}"
        );

        hub_step(&s.hub, s.backend.as_ref()).await.unwrap();
        assert_eq!(
            buffered_changes(&mut w.rx),
            [],
            "the join the snapshot holds came again"
        );
        assert_eq!(hub_pos(&s), joined[0].revision);

        let id = sess.id().to_string();
        sess.close().await.unwrap();
        hub_step(&s.hub, s.backend.as_ref()).await.unwrap();
        match w.rx.try_recv() {
            Ok(WatchEvent::Change(c)) => {
                assert_eq!((c.op, c.id.as_str()), (ChangeOp::Delete, &*id))
            }
            other => panic!("expected the leave, got {other:?}"),
        }
    }

    /// efe7183: a catching-up watch whose page is short of its limit has every change of its
    /// own up to the hub's position: one step takes it to that position (and it joins), even
    /// when changes it does not want follow its last one. Before, it stopped at its last change
    /// and needed another read of the log (under a stream of such writes, read after read).
    #[tokio::test]
    async fn a_catching_up_watch_moves_to_the_hubs_position_after_a_short_page() {
        let s = store().await;
        let start = s.revision().await.unwrap().current;
        let mine = s.kv_set("mine/a", "1").await.unwrap().item.revision;
        for i in 0..3 {
            s.kv_set(&format!("other/{i}"), "1").await.unwrap();
        }
        let target = s.revision().await.unwrap().current;
        {
            let mut st = s.hub.state.lock().unwrap();
            st.pos = target;
            st.joining = 1;
        }
        let scope = WatchScope::Kv {
            prefix: "mine/".into(),
        };
        let (mut w, mut rx) = resume_watcher(&scope, start, target, 16);

        assert!(s.catch_up_step(&mut w).await.unwrap());
        assert_eq!(buffered_changes(&mut rx), [mine]);
        assert_eq!(w.pos, target, "stopped at its last change {mine:?}");
        assert!(s.try_register(w).is_none(), "it joins the hub");
        assert_eq!(s.hub.state.lock().unwrap().joining, 0);
    }

    /// efe7183: a full page (as many changes as the watch's buffer) that went past the hub's
    /// position holds every change of the watch's up to it: the watch is at that position.
    /// A full page that did not may be followed by more of its changes: the watch stays at
    /// its last one. Before, it stopped at its last change up to the hub's position in both
    /// cases (and read the log again from there).
    #[tokio::test]
    async fn a_catching_up_watch_moves_to_the_hubs_position_after_a_page_past_it() {
        let s = store().await;
        let start = s.revision().await.unwrap().current;
        let a = s.kv_set("mine/a", "1").await.unwrap().item.revision;
        let b = s.kv_set("mine/b", "1").await.unwrap().item.revision;
        let c = s.kv_set("mine/c", "1").await.unwrap().item.revision;
        let target = s.kv_set("other/x", "1").await.unwrap().item.revision;
        let d = s.kv_set("mine/d", "1").await.unwrap().item.revision;
        assert!(c < target && target < d);
        s.hub.state.lock().unwrap().pos = target;
        let scope = WatchScope::Kv {
            prefix: "mine/".into(),
        };
        // A buffer of 2: pages of 2 changes.
        let (mut w, mut rx) = resume_watcher(&scope, start, target, 2);

        // [a, b], both up to the target: more of its changes may follow.
        assert!(s.catch_up_step(&mut w).await.unwrap());
        assert_eq!(buffered_changes(&mut rx), [a, b]);
        assert_eq!(w.pos, b);
        // [c, d], d past the target: nothing more of its up to the target.
        assert!(s.catch_up_step(&mut w).await.unwrap());
        assert_eq!(buffered_changes(&mut rx), [c]);
        assert_eq!(w.pos, target, "stopped at its last change {c:?}");
    }

    /// efe7183 (as 62eb94d left it): a resume opening on an idle hub moves the hub forward, to
    /// the revision settled when the watch opened (not to the resume's own), and the watch
    /// catches up to it on its own, then joins. Before, the hub stayed at 0 on a new store and
    /// the resume waited for it to read the whole log.
    #[tokio::test]
    async fn a_resume_moves_an_idle_hub_forward_to_the_settled_revision() {
        let s = store().await;
        let first = s.kv_set("k/1", "1").await.unwrap().item.revision;
        let second = s.kv_set("k/2", "1").await.unwrap().item.revision;
        let third = s.kv_set("k/3", "1").await.unwrap().item.revision;
        assert_eq!(hub_pos(&s), Revision(0));

        let mut w = s
            .watch(WatchRequest::new(WatchScope::Kv { prefix: "".into() }).from_revision(first))
            .await
            .unwrap();
        assert_eq!(
            hub_pos(&s),
            third,
            "the idle hub is at the revision settled when the watch opened"
        );
        // The watch catches up on its own task (the hub does not move meanwhile), then joins.
        for want in [second, third] {
            match w.next().await {
                Some(Ok(WatchEvent::Change(c))) => assert_eq!(c.revision, want),
                other => panic!("expected change {want:?}, got {other:?}"),
            }
        }
        // (It joins in the same poll that sent the last change; yield until it has.)
        while s.hub.state.lock().unwrap().joining > 0 {
            tokio::task::yield_now().await;
        }
        let next = s.kv_set("k/4", "1").await.unwrap().item.revision;
        hub_step(&s.hub, s.backend.as_ref()).await.unwrap();
        match w.rx.try_recv() {
            Ok(WatchEvent::Change(c)) => assert_eq!(c.revision, next),
            other => panic!("expected change {next:?}, got {other:?}"),
        }
    }
    /// A write committed between a snapshot watch's settled revision and its state read (found
    /// by review): the snapshot is read again past it, so its revision is not below any of its
    /// items. Before, a consumer that handled the snapshot and resumed from its revision
    /// (invariant 31: "misses nothing and sees nothing twice") got that write again.
    #[tokio::test]
    async fn resuming_from_a_snapshots_revision_repeats_nothing_it_held() {
        let s = store().await;
        s.kv_set("a", "1").await.unwrap();
        let (done, written) = oneshot::channel();
        let s2 = s.clone();
        *s.hub.before_snapshot.lock().unwrap() = Some(Box::pin(async move {
            let r = s2.kv_set("a", "2").await.unwrap().item.revision;
            let _ = done.send(r);
        }));
        let mut w = s
            .watch(WatchRequest::new(WatchScope::Kv { prefix: "".into() }))
            .await
            .unwrap();
        let second = written.await.expect("the hook ran");
        let resume = match w.rx.try_recv() {
            Ok(WatchEvent::Snapshot { revision, items }) => {
                let held: Vec<(&str, Revision)> =
                    items.iter().map(|c| (c.id.as_str(), c.revision)).collect();
                assert_eq!(held, [("a", second)], "the snapshot holds the second write");
                revision
            }
            other => panic!("expected the snapshot, got {other:?}"),
        };
        drop(w);
        // The consumer handled the snapshot; it resumes after the snapshot's revision.
        let mut again = s
            .watch(WatchRequest::new(WatchScope::Kv { prefix: "".into() }).from_revision(resume))
            .await
            .unwrap();
        hub_step(&s.hub, s.backend.as_ref()).await.unwrap();
        let mut repeated = Vec::new();
        while let Ok(Some(Ok(WatchEvent::Change(c)))) =
            tokio::time::timeout(Duration::from_millis(300), again.next()).await
        {
            repeated.push((c.id.clone(), c.revision));
        }
        assert_eq!(
            repeated,
            Vec::<(String, Revision)>::new(),
            "resumed from the snapshot's revision {resume:?}: changes the snapshot already held came again"
        );
    }
}
