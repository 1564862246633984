//! Sessions and work, for callers: liveness with background renewal, claims, and their outcomes.
//!
//! A [`Session`] proves a component is alive. The store renews every session of the process in
//! ONE statement per tick (every TTL/3 of the shortest TTL). A renewal that fails is retried on
//! the next ticks; only when the session's deadline has passed without a successful renewal does
//! the session turn expired, and then every call on it fails with `SessionExpired`.
//!
//! Work is an exclusive claim by a session on (object, process), with a fencing token. Ending it
//! (finish, cancel, fail) succeeds only while the claim is still held with that token.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fleetdb_core::work::{
    Backoff, BackoffWhich, ClaimRequest, ClaimTarget, Claimed, HistoryFilter, Outcome, SessionInfo,
    SessionSpec, WorkEvent, WorkInfo, CLAIM_BATCH_MAX,
};
use fleetdb_core::{Error, ObjectKey, Op, Precondition, Result, Revision, Timestamp};

use crate::{Store, Txn};

/// Sessions removed per sweep call.
pub const SWEEP_SESSIONS_MAX: usize = 1000;
/// How often the background task sweeps expired sessions.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long the background task goes on sweeping while each sweep stops at its limit (then the
/// next interval's sweep goes on).
pub const SWEEP_BACKLOG_TIME: Duration = Duration::from_secs(5);
/// The pause between two sweeps of a backlog (see [`SWEEP_BACKLOG_TIME`]).
const SWEEP_BACKLOG_PAUSE: Duration = Duration::from_millis(5);
/// After a failed (or unanswered) renewal, the background task tries again this soon (or a tick
/// later, if that is sooner), until a renewal succeeds or the deadline passes.
pub const RENEW_RETRY: Duration = Duration::from_millis(200);
/// How often `claim_wait` looks at the change log for something new.
pub const CLAIM_WAIT_POLL: Duration = Duration::from_millis(100);
/// How often `claim_wait` tries again even without a change (time-based selectors, backoffs ending).
pub const CLAIM_WAIT_RETRY: Duration = Duration::from_secs(1);
/// A wait longer than the clock can express (`claim_wait` with `Duration::MAX`) waits this long.
const FOR_EVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[derive(Debug)]
struct SessionState {
    deadline: Timestamp,
    expired: bool,
    paused: bool,
    /// This session's last selector claim, if it came back empty: `claim_wait` then waits
    /// before claiming (see there).
    empty_claim: Option<EmptyClaim>,
    /// Claims that failed `Unavailable` — perhaps only their answer was lost with the
    /// connection, after they committed (process, the claim's time): the next claim of the
    /// process takes what they took (see [`Session::adopt_uncertain`]).
    uncertain: Vec<(String, Timestamp)>,
    /// The time of this session's last claim: each claim's differs (by 1 µs when the clock did
    /// not move), so a claim's rows (`started_at`) tell which claim took them (see
    /// `adopt_uncertain`).
    last_claim_at: Timestamp,
    /// The tokens of this session's claims handed out as a [`Work`] not yet dropped: never
    /// handed out again by `adopt_uncertain` (a clock stepped back can give two claims one
    /// time).
    handed_out: std::collections::HashSet<i64>,
}

/// A selector claim that came back empty.
#[derive(Debug, Clone)]
struct EmptyClaim {
    process: String,
    selector: String,
    /// The change-log revision it looked at, when the backend said ([`Claimed`]).
    revision: Option<Revision>,
    /// When it came back.
    at: tokio::time::Instant,
    /// The same by the store's clock (which decides what is claimable: backoffs ending,
    /// `now - d` terms): a clock moved past the retry since claims again at once.
    clock_at: Timestamp,
}

/// How far (µs) a claim's time may be moved past the clock to differ from the session's last
/// claim's: claims within one microsecond, or a manual clock that did not move.
const CLAIM_TIME_NUDGE_MAX: i64 = 1_000;

/// Puts failed claims' times back in the session's list unless they were looked up (see
/// `Session::adopt_uncertain`).
struct PutBack<'a> {
    shared: &'a SessionShared,
    process: &'a str,
    times: Option<&'a [Timestamp]>,
}

impl Drop for PutBack<'_> {
    fn drop(&mut self) {
        if let Some(times) = self.times {
            self.shared
                .state()
                .uncertain
                .extend(times.iter().map(|t| (self.process.to_string(), *t)));
        }
    }
}

/// When `claim_wait` claims again after an empty claim (see [`Session::empty_claim`]).
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: tokio::time::Instant,
    clock_at: Timestamp,
}

impl Retry {
    /// [`CLAIM_WAIT_RETRY`] after an empty claim that came back at `at` (real time), `clock_at`
    /// (the store's clock).
    fn after(at: tokio::time::Instant, clock_at: Timestamp) -> Self {
        Retry {
            at: at + CLAIM_WAIT_RETRY,
            clock_at: clock_at + CLAIM_WAIT_RETRY,
        }
    }

    fn due(&self, clock_now: Timestamp) -> bool {
        tokio::time::Instant::now() >= self.at || clock_now >= self.clock_at
    }
}

#[derive(Debug)]
pub(crate) struct SessionShared {
    info: SessionInfo,
    state: Mutex<SessionState>,
}

impl SessionShared {
    fn state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The per-store registry of live sessions, renewed together.
#[derive(Debug, Default)]
pub(crate) struct Keeper {
    sessions: Mutex<HashMap<String, Weak<SessionShared>>>,
    started: crate::TaskFlag,
    /// Fault injection for tests: fail this many renewal rounds.
    fail_renewals: AtomicU32,
    /// Wakes the background task when a session starts (its tick may have to shorten).
    changed: tokio::sync::Notify,
    /// A sweep (and history pruning) is running on its own task.
    sweeping: crate::TaskFlag,
    /// Wakes waiting `claim_wait`s of this store when a write of this store commits (writes of
    /// other processes are seen by polling the revision).
    pub(crate) claim_wakes: ClaimWakes,
    /// The change-log revisions this store's writes are known to have written, for the poll of
    /// a waiting claim to tell them from other processes'.
    pub(crate) own_revisions: OwnRevisions,
}

/// Revisions kept by [`OwnRevisions`].
const OWN_REVISIONS_MAX: usize = 4096;

/// The most recent change-log revisions written by this store (those its writes returned). A
/// waiting claim's poll sees the revision move from `seen` to `current`; if every revision in
/// between is this store's own, no other process wrote, and this store's commits have woken the
/// waiters they concern already. Revisions never returned (several change rows of one op, gap
/// markers, rolled-back sequence values, or older than the newest [`OWN_REVISIONS_MAX`]) count
/// as another process's: a claim for nothing, never a change missed.
#[derive(Debug, Default)]
pub(crate) struct OwnRevisions(Mutex<std::collections::VecDeque<i64>>);

impl OwnRevisions {
    pub(crate) fn note(&self, revisions: impl Iterator<Item = fleetdb_core::Revision>) {
        let mut own = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for r in revisions {
            if own.len() == OWN_REVISIONS_MAX {
                own.pop_front();
            }
            own.push_back(r.0);
        }
    }

    /// Whether every revision in (`seen`, `current`] is this store's own.
    fn all_own(&self, seen: fleetdb_core::Revision, current: fleetdb_core::Revision) -> bool {
        if current.0 <= seen.0 {
            return true;
        }
        let own = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut ours: Vec<i64> = own
            .iter()
            .copied()
            .filter(|r| *r > seen.0 && *r <= current.0)
            .collect();
        ours.sort_unstable();
        ours.dedup();
        ours.len() as i64 == current.0 - seen.0
    }
}

/// (process, selector text): the claims one group of waiters makes.
type WaitGroup = (String, String);

/// Groups kept without a waiter at most; past it those are forgotten (a group a waiter holds is
/// kept, so no waiter misses a wake-up).
const WAIT_GROUPS_MAX: usize = 1024;
/// Waiters of one group one commit wakes at most.
const WAKES_PER_COMMIT_MAX: usize = 64;

/// Wake-ups of this store's waiting claims ([`Session::claim_wait`]), per (process, selector).
///
/// A commit of this store wakes, in every group, as many waiters as objects it touched that may
/// now match the group's selector (a selector selects objects: a commit that touched none cannot
/// have made a candidate, and one object can make one; an object the commit deleted, or deleted
/// a tag of that the selector requires, cannot: so a worker's finish that deletes the tag its
/// selector requires wakes none of its own group), all of them for a commit that may free claims
/// everywhere (a session closed, a process redefined); and not one in the group of a claim made
/// in the commit's own transaction (`finish_and_claim`) that came back short: that claim looked
/// for candidates after the transaction's writes and found no more. A wake-up that finds no
/// waiter is kept (one per group) for the next to wait, so a worker whose last claim came back
/// empty waits at once ([`Session::claim_wait`]): a commit since that claim either woke a waiter,
/// who looks, or left the wake-up for it. In the one-at-a-time benchmark at 250 jobs/s,
/// finishes, passed-on wake-ups and the claim a worker made again after an empty
/// `finish_and_claim` made 2.0–3.0 claim calls per job come back empty (a transaction of three
/// statements each); 1.2–1.4 then.
#[derive(Debug, Default)]
pub(crate) struct ClaimWakes {
    groups: Mutex<HashMap<WaitGroup, Arc<WaitGroupState>>>,
}

#[derive(Debug, Default)]
struct WaitGroupState {
    notify: tokio::sync::Notify,
    /// The tags the group's selector requires ([`fleetdb_core::selector::Selector::required_tags`];
    /// none if it does not parse): a commit that deleted one of them from an object made no
    /// candidate of that object.
    required: std::collections::BTreeSet<String>,
}

impl WaitGroupState {
    /// Wake `n` waiters (or keep one wake-up for the next to wait).
    fn wake(&self, n: usize) {
        for _ in 0..n {
            self.notify.notify_one();
        }
    }
}

impl ClaimWakes {
    /// The wake-ups of (process, selector).
    fn group(&self, process: &str, selector: &str) -> Arc<WaitGroupState> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = groups.get(&(process.to_string(), selector.to_string())) {
            return g.clone();
        }
        if groups.len() >= WAIT_GROUPS_MAX {
            groups.retain(|_, g| Arc::strong_count(g) > 1);
        }
        let required = fleetdb_core::selector::Selector::parse(selector)
            .map(|s| s.required_tags())
            .unwrap_or_default();
        let g = Arc::new(WaitGroupState {
            notify: tokio::sync::Notify::new(),
            required,
        });
        groups.insert((process.to_string(), selector.to_string()), g.clone());
        g
    }

    /// A write of this store committed, touching what `touched` says: wake, in every group but
    /// `except`, as many waiters as objects it touched that may now match the group's selector.
    pub(crate) fn committed(&self, except: Option<(&str, &str)>, touched: &Touched) {
        if *touched == Touched::Nothing {
            return;
        }
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        for ((process, selector), g) in groups.iter() {
            if except.is_some_and(|(p, s)| p == process && s == selector) {
                continue;
            }
            g.wake(touched.wakes(&g.required).min(WAKES_PER_COMMIT_MAX));
        }
    }
}

/// What a committed write touched, for [`ClaimWakes::committed`]: how many waiters of each
/// group it may have made a candidate for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Touched {
    /// No object: a key-value, an export, a lease, a blob, a session start. It cannot have made
    /// a claim candidate.
    Nothing,
    /// Claims may have been freed anywhere (a session closed or expired, a process's conflicts
    /// redefined, an op not known to touch no object), or more objects were touched than one
    /// commit wakes waiters for ([`WAKES_PER_COMMIT_MAX`]): every group may look.
    Anywhere,
    /// Distinct objects (at most [`WAKES_PER_COMMIT_MAX`]), each with what the write left of it.
    Objects(Vec<TouchedObject>),
}

/// One object a write touched, and what the write's ops left of it, in op order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TouchedObject {
    key: ObjectKey,
    /// Deleted and not put again.
    gone: bool,
    /// Deleted (with its tags) at some point: only the tags set after that are known to exist.
    wiped: bool,
    /// Tags whose last op deleted them.
    deleted: Vec<String>,
    /// Tags set after the last delete of the object.
    set_after_wipe: Vec<String>,
}

impl TouchedObject {
    /// Whether the object may match a selector requiring `required` after the write: not if it
    /// is gone, or the write deleted a required tag (a finish that deletes the tag its selector
    /// requires leaves nothing for that selector's waiters to claim).
    fn may_match(&self, required: &std::collections::BTreeSet<String>) -> bool {
        let unset_since_wipe =
            self.wiped && required.iter().any(|t| !self.set_after_wipe.contains(t));
        !self.gone && !self.deleted.iter().any(|t| required.contains(t)) && !unset_since_wipe
    }
}

impl Touched {
    /// Waiters of a group whose selector requires the tags `required` this write may have made
    /// a candidate for.
    fn wakes(&self, required: &std::collections::BTreeSet<String>) -> usize {
        match self {
            Touched::Nothing => 0,
            Touched::Anywhere => WAKES_PER_COMMIT_MAX,
            Touched::Objects(objects) => objects.iter().filter(|o| o.may_match(required)).count(),
        }
    }
}

/// Parked backoffs one transaction of [`Store::backoff_unpark`] clears.
pub const UNPARK_BATCH: usize = 500;

/// The claims `ops` release, as `fleetdb_work_finished_total` labels them: (process, result).
pub(crate) fn released(ops: &[Op]) -> Vec<(String, &'static str)> {
    ops.iter()
        .filter_map(|op| match op {
            Op::WorkRelease {
                process, outcome, ..
            } => Some((
                process.clone(),
                match outcome {
                    Outcome::Finished => "finished",
                    Outcome::Canceled => "canceled",
                    Outcome::Failed { .. } => "failed",
                },
            )),
            _ => None,
        })
        .collect()
}

/// What `ops` touched ([`Touched`]): the distinct objects of the object, tag and claim ops, each
/// with the tags the ops left deleted; [`Touched::Anywhere`] for ops that may free claims of
/// many objects (a session closed, a process's conflicts redefined), for any op not listed as
/// touching no object, and past [`WAKES_PER_COMMIT_MAX`] objects.
pub(crate) fn touched(ops: &[Op]) -> Touched {
    let mut objects: Vec<TouchedObject> = Vec::new();
    for op in ops {
        let key = match op {
            Op::ObjectPut { key, .. }
            | Op::ObjectDelete { key, .. }
            | Op::TagSet { key, .. }
            | Op::TagDelete { key, .. }
            | Op::WorkRelease { key, .. }
            | Op::BackoffClear { key, .. }
            | Op::WorkForceCancel { key, .. } => key,
            Op::NamespaceCreate { .. }
            | Op::NamespaceLabels { .. }
            | Op::NamespaceDelete { .. }
            | Op::SessionStart { .. }
            | Op::Export { .. }
            | Op::Unexport { .. }
            | Op::KvSet { .. }
            | Op::KvDelete { .. }
            | Op::MapSet { .. }
            | Op::MapDelete { .. }
            | Op::DeployAdd { .. }
            | Op::DeployPrune { .. }
            | Op::ScheduleRegister { .. }
            | Op::ScheduleUnregister { .. }
            | Op::GcKindDeclare { .. }
            | Op::LeaseCreate { .. }
            | Op::LeaseDelete { .. }
            | Op::LeaseAddResource { .. }
            | Op::LeaseRemoveResource { .. }
            | Op::BlobCommit { .. }
            | Op::BlobDelete { .. }
            | Op::GcSweep { .. }
            | Op::WorkExplain { .. } => continue,
            _ => return Touched::Anywhere,
        };
        let at = match objects.iter().position(|o| &o.key == key) {
            Some(at) => at,
            None if objects.len() == WAKES_PER_COMMIT_MAX => return Touched::Anywhere,
            None => {
                objects.push(TouchedObject {
                    key: key.clone(),
                    gone: false,
                    wiped: false,
                    deleted: Vec::new(),
                    set_after_wipe: Vec::new(),
                });
                objects.len() - 1
            }
        };
        let o = &mut objects[at];
        match op {
            Op::ObjectPut { .. } => o.gone = false,
            Op::ObjectDelete { .. } => {
                o.gone = true;
                o.wiped = true;
                o.deleted.clear();
                o.set_after_wipe.clear();
            }
            Op::TagSet { name, .. } => {
                o.deleted.retain(|t| t != name);
                if o.wiped && !o.set_after_wipe.contains(name) {
                    o.set_after_wipe.push(name.clone());
                }
            }
            Op::TagDelete { name, .. } => {
                if !o.deleted.contains(name) {
                    o.deleted.push(name.clone());
                }
                o.set_after_wipe.retain(|t| t != name);
            }
            _ => {}
        }
    }
    if objects.is_empty() {
        Touched::Nothing
    } else {
        Touched::Objects(objects)
    }
}

impl Keeper {
    fn live(&self) -> Vec<Arc<SessionShared>> {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        map.values().filter_map(Weak::upgrade).collect()
    }

    fn forget(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// A live session. Cheap to clone; clones are the same session. Dropping the last clone stops
/// its renewal (it then expires after its TTL); [`Session::close`] ends it at once.
#[derive(Debug, Clone)]
pub struct Session {
    store: Store,
    shared: Arc<SessionShared>,
}

impl Store {
    /// Start a session. Its renewal runs in the background as long as a clone of it exists.
    pub async fn session_start(&self, spec: SessionSpec) -> Result<Session> {
        spec.validate()?;
        let now = self.clock.now();
        let ttl_ms = spec.ttl.as_millis() as i64;
        let info = SessionInfo {
            id: uuid::Uuid::new_v4().to_string(),
            component: spec.component,
            host: spec.host,
            runtime_info: spec.runtime_info,
            ttl_ms,
            created_at: now,
            deadline: now + spec.ttl,
        };
        self.write(vec![Op::SessionStart {
            session: info.clone(),
        }])
        .await?;
        let shared = Arc::new(SessionShared {
            state: Mutex::new(SessionState {
                deadline: info.deadline,
                expired: false,
                paused: false,
                empty_claim: None,
                uncertain: Vec::new(),
                handed_out: Default::default(),
                last_claim_at: Timestamp(i64::MIN),
            }),
            info,
        });
        self.keeper
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(shared.info.id.clone(), Arc::downgrade(&shared));
        self.start_background();
        self.keeper.changed.notify_one();
        self.metrics.sessions_started.inc();
        Ok(Session {
            store: self.clone(),
            shared,
        })
    }

    /// Renew every session of this store now, in one statement. The background task calls this
    /// every TTL/3; tests call it after moving the clock.
    pub async fn renew_sessions(&self) -> Result<()> {
        let sessions: Vec<Arc<SessionShared>> = self
            .keeper
            .live()
            .into_iter()
            .filter(|s| {
                let st = s.state();
                !st.expired && !st.paused
            })
            .collect();
        if sessions.is_empty() {
            return Ok(());
        }
        let now = self.clock.now();
        let ids: Vec<String> = sessions.iter().map(|s| s.info.id.clone()).collect();
        let injected = self
            .keeper
            .fail_renewals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let result = if injected {
            Err(Error::Unavailable("injected renewal failure".into()))
        } else {
            self.backend.session_renew(&ids, now).await
        };
        match result {
            Ok(renewed) => {
                let renewed: HashMap<String, Timestamp> = renewed.into_iter().collect();
                for s in &sessions {
                    let mut st = s.state();
                    match renewed.get(&s.info.id) {
                        Some(deadline) => st.deadline = *deadline,
                        // The store says it is gone or past its deadline (counted as expired by
                        // the sweep that removes it, if it expired; a close is counted closed).
                        None => st.expired = true,
                    }
                }
                Ok(())
            }
            Err(e) => {
                // Transient: keep trying until the deadline passes.
                for s in &sessions {
                    let mut st = s.state();
                    if now >= st.deadline {
                        st.expired = true;
                    }
                }
                tracing::warn!(error = %e, "session renewal failed; retrying until the deadline");
                Err(e)
            }
        }
    }

    /// Delete expired sessions (at most [`SWEEP_SESSIONS_MAX`] per call) and release their work
    /// with `Expired` history. Claims never wait for this: a dead session's work is claimable at
    /// once; the sweep only tidies up and records.
    pub async fn sweep_sessions(&self) -> Result<u64> {
        Ok(self.sweep_once().await?.sessions)
    }

    /// One sweep ([`Store::sweep_sessions`]); says whether it stopped at its limit.
    async fn sweep_once(&self) -> Result<fleetdb_core::backend::Swept> {
        self.ready().await?;
        let swept = self
            .backend
            .session_sweep(self.clock.now(), SWEEP_SESSIONS_MAX)
            .await?;
        let n = swept.sessions;
        self.metrics.sessions_expired.inc_by(n);
        // The claims of crashed workers end here (nobody else sees them end): `expired`.
        for process in &swept.expired {
            self.metrics
                .work_finished
                .with_label_values(&[process.as_str(), "expired"])
                .inc();
        }
        // Expired sessions and TTLs change membership and the World: wake the watches. Waiting
        // claims only if sessions went: their claims were free since their deadlines, which
        // woke nobody.
        let touched = if n > 0 {
            Touched::Anywhere
        } else {
            Touched::Nothing
        };
        self.committed_batch(touched, &[], None);
        Ok(swept)
    }

    /// The background task's sweep: again soon while a sweep stops at its limit (at most
    /// [`SWEEP_BACKLOG_TIME`]), so that sessions and TTL records expiring faster than one
    /// sweep's limit per [`SWEEP_INTERVAL`] do not pile up. [`SWEEP_BACKLOG_PAUSE`] apart:
    /// other processes on a SQLite file take the write lock in between.
    async fn sweep_backlog(&self) {
        let started = std::time::Instant::now();
        loop {
            match self.sweep_once().await {
                Ok(swept) if swept.more && started.elapsed() < SWEEP_BACKLOG_TIME => {
                    tokio::time::sleep(SWEEP_BACKLOG_PAUSE).await;
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "session sweep failed");
                    return;
                }
            }
        }
    }

    /// Test hook: make the next `n` renewal rounds fail as if the database were unreachable.
    #[doc(hidden)]
    pub fn inject_renewal_failures(&self, n: u32) {
        self.keeper.fail_renewals.store(n, Ordering::SeqCst);
    }

    /// Start the background task (renewal every TTL/3 of the shortest live TTL; sweep every
    /// [`SWEEP_INTERVAL`]). It holds only weak references and ends when the store is dropped.
    pub(crate) fn start_background(&self) {
        if !self.background.enabled.load(Ordering::SeqCst) {
            return;
        }
        // Checked first: every call of the store comes by here (a runtime's handle is not free).
        let Some(running) = self.keeper.started.start() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // not running after all: `running` drops
        };
        let weak = self.downgrade();
        rt.spawn(async move {
            use tokio::time::Instant;
            let _running = running;
            // Two deadlines of their own: a renewal every TTL/3 and a sweep every
            // SWEEP_INTERVAL. A new session only ever brings the renewal forward (a shorter TTL
            // shortens the tick): sessions started more often than a tick must not keep
            // pushing the renewal of the others back.
            let mut next_renew: Option<Instant> = None;
            let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
            let mut next_clock_sync = Instant::now() + crate::CLOCK_SYNC_INTERVAL;
            loop {
                let tick = {
                    let Some(store) = weak.upgrade() else { return };
                    let min_ttl = store
                        .keeper
                        .live()
                        .iter()
                        .map(|s| s.info.ttl_ms)
                        .min()
                        .unwrap_or(3_000);
                    Duration::from_millis((min_ttl / 3).max(100) as u64)
                };
                let renew_at = match next_renew {
                    Some(at) => at.min(Instant::now() + tick),
                    None => Instant::now() + tick,
                };
                next_renew = Some(renew_at);
                let woken = {
                    let Some(keeper) = weak.keeper.upgrade() else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::time::sleep_until(renew_at.min(next_sweep)) => false,
                        _ = keeper.changed.notified() => true,
                    }
                };
                let Some(store) = weak.upgrade() else { return };
                if woken {
                    continue; // a new session: recompute the tick
                }
                let now = Instant::now();
                if now >= renew_at {
                    // A renewal that does not answer within a tick counts as failed (its
                    // deadline may still have moved in the store: the local one is the earlier,
                    // the safe side); a failed one is tried again RENEW_RETRY later, not a
                    // whole tick later, so an outage shorter than the TTL costs no session.
                    let renewed = tokio::time::timeout(tick, store.renew_sessions()).await;
                    next_renew = Some(match renewed {
                        Ok(Ok(())) => now + tick,
                        Ok(Err(_)) => Instant::now() + RENEW_RETRY.min(tick),
                        Err(_) => {
                            tracing::warn!(after = ?tick, "session renewal timed out; retrying");
                            Instant::now() + RENEW_RETRY.min(tick)
                        }
                    });
                }
                // The sweep and the history pruning run on a task of their own, one at a time:
                // however long they take (a first prune may delete millions of rows), the
                // renewals keep their cadence, and no session expires waiting for them.
                // The server's clock (PostgreSQL), sampled on a task of its own: a server that
                // does not answer delays no renewal.
                if now >= next_clock_sync {
                    next_clock_sync = now + crate::CLOCK_SYNC_INTERVAL;
                    let store = store.clone();
                    tokio::spawn(async move { store.clock_sync().await });
                }
                if now >= next_sweep {
                    next_sweep = now + SWEEP_INTERVAL;
                    let Some(sweeping) = store.keeper.sweeping.start() else {
                        continue;
                    };
                    let store = store.clone();
                    tokio::spawn(async move {
                        let _sweeping = sweeping;
                        store.sweep_backlog().await;
                        let retention = *store
                            .background
                            .history_retention
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        if let Some(keep) = retention {
                            if let Err(e) = store.history_prune(keep).await {
                                tracing::warn!(error = %e, "history pruning failed");
                            }
                        }
                        let retention = *store
                            .background
                            .change_retention
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        if let Some(keep) = retention {
                            if let Err(e) = store.compact_older_than(keep).await {
                                tracing::warn!(error = %e, "change-log compaction failed");
                            }
                        }
                    });
                }
            }
        });
    }
}

impl Session {
    pub fn id(&self) -> &str {
        &self.shared.info.id
    }

    pub fn info(&self) -> &SessionInfo {
        &self.shared.info
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether this session is known to be expired (no renewal succeeded before its deadline).
    pub fn is_expired(&self) -> bool {
        let now = self.store.clock.now();
        let mut st = self.shared.state();
        if !st.expired && now >= st.deadline {
            st.expired = true;
        }
        st.expired
    }

    /// The deadline as last renewed.
    pub fn deadline(&self) -> Timestamp {
        self.shared.state().deadline
    }

    fn check(&self) -> Result<()> {
        if self.is_expired() {
            return Err(Error::SessionExpired {
                session_id: self.id().to_string(),
            });
        }
        Ok(())
    }

    /// Map a `SessionExpired` from the store into the local state, so later calls fail fast.
    fn note<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(Error::SessionExpired { .. }) = &r {
            self.shared.state().expired = true;
        }
        r
    }

    /// Test hook: stop renewing this session (as if its process hung).
    #[doc(hidden)]
    pub fn pause_renewal(&self) {
        self.shared.state().paused = true;
    }

    /// Run a transaction on behalf of this session: it commits only if the session is alive at
    /// commit time (checked inside the same database transaction).
    pub async fn txn<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnMut(Txn) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.check()?;
        let pre = vec![Precondition::SessionAlive {
            session_id: self.id().to_string(),
        }];
        let r = self.store.txn_with(f, pre, Vec::new()).await;
        self.note(r)
    }

    /// Validate a claim and build its request.
    fn claim_request(
        &self,
        process: &str,
        target: ClaimTarget,
        limit: usize,
    ) -> Result<ClaimRequest> {
        self.check()?;
        fleetdb_core::validate::name("process", process)?;
        if limit == 0 || limit > CLAIM_BATCH_MAX {
            return Err(Error::invalid(
                "limit",
                limit.to_string(),
                format!("must be between 1 and {CLAIM_BATCH_MAX}"),
            ));
        }
        if let ClaimTarget::Selector(text) = &target {
            fleetdb_core::selector::Selector::parse(text)?;
        }
        Ok(ClaimRequest {
            session_id: self.id().to_string(),
            process: process.to_string(),
            target,
            limit,
            now: self.claim_time(),
        })
    }

    /// The time of this session's next claim: the clock's, or 1 µs past the last claim's when
    /// the clock has not moved on (claims in the same microsecond, a manual clock); a clock
    /// stepped back further is followed. Each claim's time differs, so its rows (`started_at`)
    /// tell which claim took them (`adopt_uncertain`).
    pub(crate) fn claim_time(&self) -> Timestamp {
        let mut st = self.shared.state();
        let clock = self.store.clock.now();
        let last = st.last_claim_at;
        let now = match last.0.checked_sub(clock.0) {
            Some(behind) if (0..CLAIM_TIME_NUDGE_MAX).contains(&behind) => Timestamp(last.0 + 1),
            _ => clock,
        };
        st.last_claim_at = now;
        now
    }

    /// Remember a claim that may have committed though its answer was lost (`adopt_uncertain`).
    pub(crate) fn claim_uncertain(&self, process: &str, at: Timestamp) {
        self.shared
            .state()
            .uncertain
            .push((process.to_string(), at));
    }

    /// Wrap claimed rows as [`Work`] and count them.
    fn claimed(&self, process: &str, claimed: Claimed) -> Vec<Work> {
        if !claimed.work.is_empty() {
            self.store
                .metrics
                .work_started
                .with_label_values(&[process])
                .inc_by(claimed.work.len() as u64);
        }
        // Dead sessions' claims this claim took over ended here, before any sweep saw them.
        if claimed.expired > 0 {
            self.store
                .metrics
                .work_finished
                .with_label_values(&[process, "expired"])
                .inc_by(claimed.expired);
        }
        if !claimed.work.is_empty() {
            let mut st = self.shared.state();
            st.handed_out.extend(claimed.work.iter().map(|w| w.token));
        }
        claimed
            .work
            .into_iter()
            .map(|info| Work {
                session: self.clone(),
                info,
                done: false,
                uncertain: Vec::new(),
            })
            .collect()
    }

    async fn claim_target(
        &self,
        process: &str,
        target: ClaimTarget,
        limit: usize,
    ) -> Result<(Vec<Work>, Option<Revision>)> {
        let req = self.claim_request(process, target, limit)?;
        self.store.ready().await?;
        let by_selector = matches!(req.target, ClaimTarget::Selector(_));
        let mut adopted = self.adopt_uncertain(process).await?;
        if !adopted.is_empty() {
            // What the caller did not ask for is dropped: cancelled, claimable again.
            match &req.target {
                ClaimTarget::Selector(_) => {
                    adopted.truncate(limit);
                    return Ok((adopted, None));
                }
                ClaimTarget::Object(key) => {
                    if let Some(w) = adopted.into_iter().find(|w| &w.info.key == key) {
                        return Ok((vec![w], None));
                    }
                }
            }
        }
        let at = req.now;
        let started = std::time::Instant::now();
        let backend = self.store.backend.clone();
        let claimed = self
            .store
            .detached_claim(
                async move { backend.claim(req).await },
                |c| c,
                process,
                Vec::new(),
            )
            .await;
        self.store
            .attempted(crate::metrics::TxnKind::Claim, started);
        // A claim is a transaction like a write: executed or failed.
        self.store.metrics.txn(&claimed);
        let claimed = match claimed {
            // Under heavy contention (PostgreSQL serialization failures on every attempt) a
            // selector claim gets nothing this time, like a claim whose candidates were all taken:
            // the caller (or `claim_wait`) tries again. A claim of one named object reports it.
            Err(Error::RetriesExhausted { attempts, last }) if by_selector => {
                tracing::warn!(attempts, last = %last, "claim gave up under contention; nothing claimed");
                Claimed::default()
            }
            // (SQLite's `Unavailable`, busy or a full disk, never follows a commit.)
            Err(e @ Error::Unavailable(_))
                if self
                    .store
                    .backend
                    .capabilities()
                    .unavailable_may_have_committed =>
            {
                self.claim_uncertain(process, at);
                return Err(e);
            }
            r => self.note(r)?,
        };
        let revision = claimed.revision;
        Ok((self.claimed(process, claimed), revision))
    }

    /// When `claim_wait` claims again if it claimed now and got nothing.
    fn retry_from_now(&self) -> Retry {
        Retry::after(tokio::time::Instant::now(), self.store.clock.now())
    }

    /// What this session's claims of `process` that failed `Unavailable` took, as [`Work`]
    /// (design.md 15b). A claim whose connection was lost after its COMMIT reached the server
    /// committed, and its caller got an error: the objects it took stayed held by this (live)
    /// session for nobody until the session ended. They are this session's claim rows of the
    /// process started at the failed claim's time (a shared claim transaction of PostgreSQL
    /// writes each claim's own time on its rows). Empty when there were
    /// none (a claim that failed before committing took nothing); the failed claims are
    /// forgotten once looked up. An error (the database still unreachable) keeps them for the
    /// next claim.
    async fn adopt_uncertain(&self, process: &str) -> Result<Vec<Work>> {
        // Taken out under the lock (two claims of the session at once must not both take the
        // rows up); put back unless looked up (an error, or this call given up meanwhile). Each
        // claim of the session has its own time (`claim_time`), so the rows started at a
        // failed claim's time are that claim's.
        let times: Vec<Timestamp> = {
            let mut st = self.shared.state();
            if st.uncertain.is_empty() {
                return Ok(Vec::new()); // every claim asks: the common case costs a lock
            }
            let (mine, rest) = std::mem::take(&mut st.uncertain)
                .into_iter()
                .partition(|(p, _)| p == process);
            st.uncertain = rest;
            let mut times: Vec<Timestamp> = mine.into_iter().map(|(_, t)| t).collect();
            times.sort_unstable();
            times.dedup();
            times
        };
        if times.is_empty() {
            return Ok(Vec::new());
        }
        let mut pending = PutBack {
            shared: &self.shared,
            process,
            times: Some(&times),
        };
        let mut found = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .store
                .work_page(Some(process), Some(self.id()), cursor.as_deref(), 1_000)
                .await?;
            {
                let st = self.shared.state();
                found.extend(page.items.into_iter().filter(|w| {
                    times.binary_search(&w.started_at).is_ok() && !st.handed_out.contains(&w.token)
                }));
            }
            match page.next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        pending.times = None;
        if !found.is_empty() {
            tracing::info!(
                process,
                claims = found.len(),
                "claims whose answer was lost with the connection are taken up"
            );
        }
        Ok(self.claimed(
            process,
            Claimed {
                work: found,
                ..Claimed::default()
            },
        ))
    }

    /// What a selector claim behind a finish took, as [`Work`] (counted), its emptiness noted
    /// for `claim_wait`.
    fn claimed_by_selector(&self, process: &str, selector: &str, claimed: Claimed) -> Vec<Work> {
        self.note_empty(process, selector, claimed.work.is_empty(), claimed.revision);
        self.claimed(process, claimed)
    }

    /// Record whether the claim of (process, selector) came back empty, and the revision it
    /// looked at.
    fn note_empty(&self, process: &str, selector: &str, empty: bool, revision: Option<Revision>) {
        let mut st = self.shared.state();
        st.empty_claim = empty.then(|| EmptyClaim {
            process: process.to_string(),
            selector: selector.to_string(),
            revision,
            at: tokio::time::Instant::now(),
            clock_at: self.store.clock.now(),
        });
    }

    /// This session's last claim of (process, selector), if it came back empty: the revision it
    /// looked at (if the backend said) and when to claim again — [`CLAIM_WAIT_RETRY`] after it,
    /// in real time and by the store's clock, whichever comes first.
    fn empty_claim(&self, process: &str, selector: &str) -> Option<(Option<Revision>, Retry)> {
        let st = self.shared.state();
        st.empty_claim
            .as_ref()
            .filter(|e| e.process == process && e.selector == selector)
            .map(|e| (e.revision, Retry::after(e.at, e.clock_at)))
    }

    /// Claim up to `limit` objects matching `selector` for `process`: objects no live session
    /// holds for this or a conflicting process, and not in backoff for this process. Returns what
    /// it got (possibly nothing); objects taken concurrently are skipped, not an error (a claim
    /// that keeps colliding with concurrent claims until its retries run out returns nothing).
    pub async fn claim(&self, process: &str, selector: &str, limit: usize) -> Result<Vec<Work>> {
        let (got, revision) = self
            .claim_target(process, ClaimTarget::Selector(selector.to_string()), limit)
            .await?;
        self.note_empty(process, selector, got.is_empty(), revision);
        Ok(got)
    }

    /// Claim one known object, or fail with `Conflict` (held, or in backoff) or `NotFound`.
    pub async fn claim_object(&self, key: &ObjectKey, process: &str) -> Result<Work> {
        key.validate()?;
        let (mut got, _) = self
            .claim_target(process, ClaimTarget::Object(key.clone()), 1)
            .await?;
        // Nothing, and no error: the claim took a dead holder's claim over, and that expiry,
        // counted as a failure, parked the object (committed with its `Expired` history).
        got.pop()
            .ok_or_else(|| fleetdb_core::apply::parked_by_expiry(key, process))
    }

    /// Like [`Session::claim`], but when nothing is claimable, wait (up to `timeout`) for a
    /// change in the store and try again. A write committed through this `Store` wakes one
    /// waiting claim at once; other writers' changes are seen within [`CLAIM_WAIT_POLL`]; and it
    /// retries at least every [`CLAIM_WAIT_RETRY`] for conditions that depend on time.
    pub async fn claim_wait(
        &self,
        process: &str,
        selector: &str,
        limit: usize,
        timeout: Duration,
    ) -> Result<Vec<Work>> {
        // `Duration::MAX` (wait for ever) must not overflow the clock.
        let deadline = tokio::time::Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| tokio::time::Instant::now() + FOR_EVER);
        let group = self.store.keeper.claim_wakes.group(process, selector);
        // A busy queue: the first claim finds work. A claim that came back empty — this one, or
        // this session's last one of this selector (say, the claim of a `finish_and_claim` just
        // before) — is not made again at once: empty claims of idle workers cost the database as
        // much as full ones. The wait then waits for a change after the revision that claim
        // looked at (the backend says it with a short claim, from the claim's own snapshot, so
        // no statement reads it): a commit of this store since woke a waiter of the group, who
        // looks, or left its wake-up for the next to wait; a commit of another process moves the
        // revision past it, which the poll sees. Only when the backend could not say is the
        // revision read after the claim, and another process's commit between the two is seen
        // by the retry within `CLAIM_WAIT_RETRY`. The retry counts from the empty claim, not
        // from this call: a worker calling with short timeouts still claims again every
        // `CLAIM_WAIT_RETRY` (a backoff ending, a `now - 10m` term coming true write nothing).
        let mut looked = self
            .empty_claim(process, selector)
            .filter(|(_, retry)| !retry.due(self.store.clock.now()));
        loop {
            let (revision, retry) = match looked {
                Some(last) => last,
                None => match self.claim(process, selector, limit).await {
                    Ok(got) if !got.is_empty() => return Ok(got),
                    Ok(_) => self
                        .empty_claim(process, selector)
                        .unwrap_or_else(|| (None, self.retry_from_now())),
                    // The database unreachable for a moment (a restart, a failover): nothing
                    // claimed, and the wait goes on — an outage shorter than the session's TTL
                    // costs only latency (its renewals retry until its deadline too). The next
                    // claim is made at the retry; a lost session ends the wait.
                    Err(e) if e.is_transient() => {
                        self.check()?;
                        tracing::debug!(error = %e, process, "claim_wait: claim failed; retrying");
                        (None, self.retry_from_now())
                    }
                    Err(e) => return Err(e),
                },
            };
            // The revision the empty claim looked at; if unknown (and unreadable now), the first
            // poll that reads one starts from it (a change before it is seen at the retry).
            let mut seen = match revision {
                Some(r) => Some(r),
                None => match self.store.backend.revision().await {
                    Ok(info) => Some(info.current),
                    Err(e) if e.is_transient() => None,
                    Err(e) => return Err(e),
                },
            };
            loop {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Ok(Vec::new());
                }
                if retry.due(self.store.clock.now()) {
                    break;
                }
                let woken = tokio::select! {
                    _ = tokio::time::sleep(CLAIM_WAIT_POLL.min(deadline - now)) => false,
                    _ = group.notify.notified() => true,
                };
                if woken {
                    break;
                }
                let current = match self.store.backend.revision().await {
                    Ok(info) => info.current,
                    Err(e) if e.is_transient() => {
                        self.check()?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let Some(was) = seen else {
                    seen = Some(current);
                    self.check()?;
                    continue;
                };
                if current != was {
                    if self.store.keeper.own_revisions.all_own(was, current) {
                        // This store's own commits: they woke the groups they concern.
                        seen = Some(current);
                        self.check()?;
                        continue;
                    }
                    // Another process's commit: it may have made several candidates, and each
                    // waiter sees it only at its own next poll; pass it on to one more waiter
                    // at once.
                    group.wake(1);
                    break;
                }
                self.check()?;
            }
            looked = None;
        }
    }

    /// Finish many claims of this session in ONE transaction (no caller writes): the batch
    /// finish used by high-throughput workers. All or nothing: on error every claim is still held.
    pub async fn finish_many(&self, works: &mut [Work]) -> Result<()> {
        self.finish_many_with(works, |_| async { Ok(()) }).await
    }

    /// Run the caller's writes and finish many claims of this session, all in ONE transaction
    /// (like [`Work::finish`] for a batch). All or nothing: if any claim is lost (stale token,
    /// released by an operator, expired session), or `f` or the commit fails, nothing is written
    /// and every claim is still held. `f` may run several times (see [`Store::txn`]).
    pub async fn finish_many_with<T, F, Fut>(&self, works: &mut [Work], f: F) -> Result<T>
    where
        F: FnMut(Txn) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let (pre, post) = self.finish_many_ops(works)?;
        let releases = Work::releases(works);
        let r = self
            .store
            .txn_then_claim(f, pre, post, None, &releases)
            .await;
        let out = self.finish_many_lost_if_expired(works, r)?.out;
        self.finish_many_done(works);
        Ok(out)
    }

    /// [`Session::finish_many_with`], then claim up to `limit` more objects matching `selector`
    /// for `process`, in ONE transaction (the batch form of [`Work::finish_and_claim`]): a worker
    /// burning down a queue commits once per batch instead of twice. If the finish fails,
    /// nothing happened: every claim is still held and nothing was claimed. A claim that fails
    /// after the finish committed returns no work (the finish stands).
    pub async fn finish_many_and_claim<T, F, Fut>(
        &self,
        works: &mut [Work],
        f: F,
        process: &str,
        selector: &str,
        limit: usize,
    ) -> Result<(T, Vec<Work>)>
    where
        F: FnMut(Txn) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let (pre, post) = self.finish_many_ops(works)?;
        let req =
            self.claim_request(process, ClaimTarget::Selector(selector.to_string()), limit)?;
        let releases = Work::releases(works);
        let r = self
            .store
            .txn_then_claim(f, pre, post, Some((req, self)), &releases)
            .await;
        let done = self.finish_many_lost_if_expired(works, r)?;
        self.finish_many_done(works);
        Ok((
            done.out,
            self.claimed_by_selector(process, selector, done.claimed),
        ))
    }

    /// The precondition and the release ops of a batch finish of `works`, after checking that
    /// each is open and this session's.
    fn finish_many_ops(&self, works: &[Work]) -> Result<(Vec<Precondition>, Vec<Op>)> {
        self.check()?;
        for w in works {
            w.check_open()?;
            if w.info.session_id != self.id() {
                return Err(Error::invalid(
                    "work",
                    w.info.key.to_string(),
                    "belongs to another session; a batch finish takes this session's claims only",
                ));
            }
        }
        let pre = vec![Precondition::SessionAlive {
            session_id: self.id().to_string(),
        }];
        let post = works
            .iter()
            .map(|w| w.release_op(Outcome::Finished))
            .collect();
        Ok((pre, post))
    }

    /// A `SessionExpired` while finishing `works` means they are lost; an answer that may hide a
    /// commit is remembered in each (see [`Work::finish`]).
    fn finish_many_lost_if_expired<T>(&self, works: &mut [Work], r: Result<T>) -> Result<T> {
        let n = works.len();
        for w in works.iter_mut() {
            w.note_unknown(&r, WorkEvent::Finished);
        }
        match self.note(r) {
            Err(Error::SessionExpired { session_id }) => Err(Error::WorkLost {
                what: format!(
                    "{n} claim(s) of session {session_id}: the session has expired; nothing was changed"
                ),
            }),
            other => other,
        }
    }

    /// Mark `works` finished (their batch committed) and count them.
    fn finish_many_done(&self, works: &mut [Work]) {
        for w in works.iter_mut() {
            w.done = true;
            self.store
                .metrics
                .work_finished
                .with_label_values(&[w.info.process.as_str(), "finished"])
                .inc();
        }
    }

    /// Close the session: release everything it holds (history `Canceled`, cause "session
    /// closed") and delete it. Returns how many claims were released. If the close fails, the
    /// session lives on (renewed while a clone of it exists), and closing a clone tries again.
    pub async fn close(self) -> Result<u64> {
        let released = self.store.session_close(self.id()).await?;
        self.store.keeper.forget(self.id());
        self.shared.state().expired = true;
        Ok(released)
    }
}

/// A claim as seen by a writer that does not hold its [`Work`] (another process, a worker's
/// command): writes through [`Store::txn_fenced`] commit only while it is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: ObjectKey,
    pub process: String,
    pub session_id: String,
    pub token: i64,
}

impl Fence {
    /// Its key and process name follow the name rules; the session id is not empty.
    pub fn validate(&self) -> Result<()> {
        self.key.validate()?;
        fleetdb_core::validate::name("process", &self.process)?;
        if self.session_id.is_empty() {
            return Err(Error::invalid("session id", "", "must not be empty"));
        }
        Ok(())
    }

    /// The precondition of a write fenced by this claim.
    pub fn precondition(&self) -> Precondition {
        Precondition::WorkHeld {
            key: self.key.clone(),
            process: self.process.clone(),
            session_id: self.session_id.clone(),
            token: self.token,
        }
    }
}

/// An exclusive claim on (object, process), held by a session, with a fencing token. End it with
/// [`Work::finish`], [`Work::cancel`] or [`Work::fail`]; a claim dropped without an outcome is
/// cancelled in the background.
#[derive(Debug)]
pub struct Work {
    session: Session,
    info: WorkInfo,
    done: bool,
    /// The events of the attempts to end it that failed `Unavailable` on a backend where that
    /// may follow a commit (their answers lost with the connection): a later `WorkLost` may
    /// mean one of them committed, which the history tells ([`Store::release_committed`]), and
    /// the claim then ended here, counted once whichever way the handle ends
    /// ([`Store::count_uncertain_end`]).
    uncertain: Vec<WorkEvent>,
}

/// What [`Store::txn_then_claim`] committed.
pub(crate) struct Committed<T> {
    /// What the caller's closure returned.
    pub(crate) out: T,
    /// What the claim behind the batch took (nothing when the commit was known from the
    /// history only: what the claim took then is the session's next claim's,
    /// `Session::adopt_uncertain`).
    pub(crate) claimed: Claimed,
}

/// A claim's release in a batch, by which the history tells whether the batch committed when
/// its answer did not say ([`Store::release_committed`]).
#[derive(Debug, Clone)]
pub(crate) struct Release {
    key: ObjectKey,
    process: String,
    session_id: String,
    token: i64,
    /// The history event the release writes.
    event: WorkEvent,
    /// An earlier attempt of it failed in a way that may have hidden its commit.
    earlier_unknown: bool,
}

impl Work {
    pub fn key(&self) -> &ObjectKey {
        &self.info.key
    }
    pub fn process(&self) -> &str {
        &self.info.process
    }
    /// The fencing token: strictly increasing across claims; pass it to external systems so they
    /// can refuse a stale holder.
    pub fn token(&self) -> i64 {
        self.info.token
    }
    pub fn info(&self) -> &WorkInfo {
        &self.info
    }
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// This claim as a fence for writes made elsewhere ([`Store::txn_fenced`]; a worker's
    /// command gets it in its environment from `fleetdb worker`).
    pub fn fence(&self) -> Fence {
        Fence {
            key: self.info.key.clone(),
            process: self.info.process.clone(),
            session_id: self.info.session_id.clone(),
            token: self.info.token,
        }
    }

    /// Run the caller's writes in ONE transaction that commits only while this claim is still
    /// held (by this session, with this token, the session alive): a fenced write. Otherwise it
    /// fails with `WorkLost` and writes nothing. The claim stays held either way; record progress
    /// with it, and end the claim with [`Work::finish`], [`Work::cancel`] or [`Work::fail`].
    /// `f` may run several times (see [`Store::txn`]).
    pub async fn update<T, F, Fut>(&mut self, f: F) -> Result<T>
    where
        F: FnMut(Txn) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.check_open()?;
        let out = self.session.store.txn_fenced(&self.fence(), f).await;
        self.lost_if_expired(out)
    }

    /// The releases of a batch finish of `works`, for [`Store::release_committed`].
    fn releases(works: &[Work]) -> Vec<Release> {
        works
            .iter()
            .map(|w| w.release(WorkEvent::Finished))
            .collect()
    }

    /// This claim's release writing `event`, for [`Store::release_committed`].
    fn release(&self, event: WorkEvent) -> Release {
        Release {
            key: self.info.key.clone(),
            process: self.info.process.clone(),
            session_id: self.info.session_id.clone(),
            token: self.info.token,
            event,
            earlier_unknown: !self.uncertain.is_empty(),
        }
    }

    /// Remember an answer that may hide a commit of this claim's release writing `event`:
    /// `Unavailable` from a backend whose connection can be lost after the COMMIT reached the
    /// server.
    fn note_unknown<T>(&mut self, r: &Result<T>, event: WorkEvent) {
        if matches!(r, Err(Error::Unavailable(_)))
            && self
                .session
                .store
                .backend
                .capabilities()
                .unavailable_may_have_committed
            && !self.uncertain.contains(&event)
        {
            self.uncertain.push(event);
        }
    }

    /// The releases of the attempts whose answers were lost ([`Work::note_unknown`]).
    fn uncertain_releases(&self) -> Vec<Release> {
        self.uncertain.iter().map(|e| self.release(*e)).collect()
    }

    fn release_op(&self, outcome: Outcome) -> Op {
        Op::WorkRelease {
            key: self.info.key.clone(),
            process: self.info.process.clone(),
            session_id: self.info.session_id.clone(),
            token: self.info.token,
            outcome,
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.done {
            return Err(Error::WorkLost {
                what: format!(
                    "{} on {} (token {}) has ended already",
                    self.info.process, self.info.key, self.info.token
                ),
            });
        }
        // Expired for its holder, the session's claims are lost to it, whatever a renewal whose
        // answer was lost told the database; unless an earlier attempt may have committed
        // (`uncertain`): trying again finds out what it did.
        if self.uncertain.is_empty() {
            self.lost_if_expired(self.session.check())?;
        }
        Ok(())
    }

    /// Run the caller's writes, release the claim, clear the backoff and write history, in ONE
    /// transaction. If it fails, nothing happened: the claim is still held and can be finished,
    /// cancelled or failed again. `f` may run several times (see [`Store::txn`]).
    ///
    /// A connection lost after the COMMIT reached PostgreSQL leaves the outcome unknown; the
    /// object's history tells (a `Finished` row of this claim), and this call looks there
    /// before answering: `Ok` if the finish committed. If the history cannot be read either
    /// (the database still unreachable), it returns `Unavailable`, and a later call of this
    /// claim that finds it gone (`WorkLost`) looks again: `Ok` if it was this finish.
    pub async fn finish<T, F, Fut>(&mut self, f: F) -> Result<T>
    where
        F: FnMut(Txn) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.check_open()?;
        let pre = vec![Precondition::SessionAlive {
            session_id: self.info.session_id.clone(),
        }];
        let post = vec![self.release_op(Outcome::Finished)];
        let release = self.release(WorkEvent::Finished);
        let out = self
            .session
            .store
            .txn_then_claim(f, pre, post, None, std::slice::from_ref(&release))
            .await;
        self.note_unknown(&out, WorkEvent::Finished);
        let out = self.lost_if_expired(out);
        let out = self.count_end("finished", out).await?;
        self.done = true;
        Ok(out.out)
    }

    /// [`Work::finish`], then claim up to `limit` more objects matching `selector` for
    /// `process` — in ONE round trip to the embedded store's writer (one transaction: the
    /// finish, then the claim). A worker's loop "finish this, give me the next" so costs one
    /// write instead of two. If the finish fails, nothing happened (the claim is still held) and
    /// nothing was claimed; a claim that fails after the finish committed returns no work. An
    /// answer lost with the connection is resolved as for [`Work::finish`]; what the claim took
    /// then is unknown here, and the session's next claim of `process` takes it up.
    pub async fn finish_and_claim<T, F, Fut>(
        &mut self,
        f: F,
        process: &str,
        selector: &str,
        limit: usize,
    ) -> Result<(T, Vec<Work>)>
    where
        F: FnMut(Txn) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.check_open()?;
        let req = self.session.claim_request(
            process,
            ClaimTarget::Selector(selector.to_string()),
            limit,
        )?;
        let pre = vec![Precondition::SessionAlive {
            session_id: self.info.session_id.clone(),
        }];
        let post = vec![self.release_op(Outcome::Finished)];
        let release = self.release(WorkEvent::Finished);
        let out = self
            .session
            .store
            .txn_then_claim(
                f,
                pre,
                post,
                Some((req, &self.session)),
                std::slice::from_ref(&release),
            )
            .await;
        self.note_unknown(&out, WorkEvent::Finished);
        let out = self.lost_if_expired(out);
        let done = self.count_end("finished", out).await?;
        self.done = true;
        Ok((
            done.out,
            self.session
                .claimed_by_selector(process, selector, done.claimed),
        ))
    }

    /// A `SessionExpired` while ending a claim means the claim is lost.
    fn lost_if_expired<T>(&self, r: Result<T>) -> Result<T> {
        match self.session.note(r) {
            Err(Error::SessionExpired { session_id }) => Err(Error::WorkLost {
                what: format!(
                    "{} on {} (token {}): session {session_id} has expired; nothing was changed",
                    self.info.process, self.info.key, self.info.token
                ),
            }),
            other => other,
        }
    }

    async fn end(&mut self, outcome: Outcome) -> Result<()> {
        self.check_open()?;
        let (result, event) = match &outcome {
            Outcome::Finished => ("finished", WorkEvent::Finished),
            Outcome::Canceled => ("canceled", WorkEvent::Canceled),
            Outcome::Failed { .. } => ("failed", WorkEvent::Failed),
        };
        let release = self.release(event);
        let r = self
            .session
            .store
            .write_releasing(
                Vec::new(),
                vec![self.release_op(outcome)],
                std::slice::from_ref(&release),
            )
            .await
            .map(|_| ());
        self.note_unknown(&r, event);
        let r = self.lost_if_expired(r);
        self.count_end(result, r).await?;
        self.done = true;
        Ok(())
    }

    /// Count how the claim ended, if this call ended it (`result`). A claim found lost ended
    /// elsewhere — an operator's cancel, a session close, an expiry swept or taken over —
    /// and is counted there (or not at all), unless an earlier attempt of this handle whose
    /// answer was lost ended it ([`Store::count_uncertain_end`]); it is over for this handle
    /// too: later calls fail at once and dropping it sends no release that cannot succeed.
    async fn count_end<T>(&mut self, result: &str, r: Result<T>) -> Result<T> {
        match &r {
            Ok(_) => self
                .session
                .store
                .metrics
                .work_finished
                .with_label_values(&[self.info.process.as_str(), result])
                .inc(),
            Err(Error::WorkLost { .. }) => {
                self.done = true;
                let uncertain = self.uncertain_releases();
                self.session.store.count_uncertain_end(&uncertain).await;
            }
            Err(_) => {}
        }
        r
    }

    /// Release the claim without an outcome (history `Canceled`); the backoff is left as it is.
    /// An answer lost with the connection is resolved as for [`Work::finish`] (so are
    /// [`Work::fail`]'s).
    pub async fn cancel(&mut self) -> Result<()> {
        self.end(Outcome::Canceled).await
    }

    /// Release the claim as failed: history `Failed` with `cause`, and a backoff for this
    /// (object, process) following `backoff` (the interval grows with each consecutive failure).
    pub async fn fail(&mut self, backoff: &Backoff, cause: &str) -> Result<()> {
        let cause = fleetdb_core::work::cause(cause)?;
        let uniform = if backoff.jitter() > 0.0 {
            rand_unit()
        } else {
            0.0
        };
        self.end(Outcome::Failed {
            cause,
            backoff: *backoff,
            uniform,
        })
        .await
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        self.session
            .shared
            .state()
            .handed_out
            .remove(&self.info.token);
        if self.done {
            return;
        }
        let (store, op) = (
            self.session.store.clone(),
            self.release_op(Outcome::Canceled),
        );
        let process = self.info.process.clone();
        let uncertain = self.uncertain_releases();
        // An answer lost with the connection is resolved from the history, as for `cancel`.
        let release = self.release(WorkEvent::Canceled);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let cancelled = store
                    .write_releasing(Vec::new(), vec![op], std::slice::from_ref(&release))
                    .await;
                match cancelled {
                    Ok(_) => store
                        .metrics
                        .work_finished
                        .with_label_values(&[process.as_str(), "canceled"])
                        .inc(),
                    Err(e) => {
                        tracing::debug!(error = %e, "cancelling a dropped claim failed (it expires with its session)");
                        // An earlier attempt whose answer was lost may have ended it.
                        store.count_uncertain_end(&uncertain).await;
                    }
                }
            });
        }
    }
}

/// The `result` label of `fleetdb_work_finished_total` for a claim its holder ended with a
/// release writing `event` (none for the events no release writes).
fn ended_as(event: WorkEvent) -> Option<&'static str> {
    match event {
        WorkEvent::Finished => Some("finished"),
        WorkEvent::Canceled => Some("canceled"),
        WorkEvent::Failed => Some("failed"),
        WorkEvent::Started | WorkEvent::Expired => None,
    }
}

/// A uniform random number in [0, 1) for backoff jitter (no need for a crypto RNG).
fn rand_unit() -> f64 {
    // The last 8 bytes of a v4 UUID, little-endian: the variant's two fixed bits are the lowest
    // byte's top ones, shifted out with the rest of bits 0..10 (the first 8 bytes hold the
    // version nibble, which would fix four of the 53 bits kept).
    let bytes = uuid::Uuid::new_v4();
    let n = u64::from_le_bytes(bytes.as_bytes()[8..].try_into().unwrap_or([0; 8]));
    (n >> 11) as f64 / (1u64 << 53) as f64
}

impl Store {
    /// Run a backend call that claims on a task of its own, and answer what it returns. A caller
    /// that gives up meanwhile (a timeout, a `select!`) cannot leave a claim held for nobody: the
    /// call runs to its end, and the work it took, if nobody takes the answer (the caller gone
    /// before it was sent, or after, with the answer still in the channel), is cancelled
    /// (history `Canceled`) — issue 3: "a claim dropped without an outcome is cancelled".
    ///
    /// `process`: the process the call claims for, under which the dead sessions' claims it
    /// took over are counted `expired` when nobody takes the answer. `ended`: the claims the
    /// call's transaction releases (process, result label), counted in
    /// `fleetdb_work_finished_total` here when nobody takes the answer (the caller, gone, would
    /// have counted them).
    pub(crate) async fn detached_claim<T, C>(
        &self,
        call: C,
        claimed: fn(&T) -> &Claimed,
        process: &str,
        ended: Vec<(String, &'static str)>,
    ) -> Result<T>
    where
        T: Send + 'static,
        C: Future<Output = Result<T>> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let store = self.clone();
        let process = process.to_string();
        tokio::spawn(async move {
            let delivery = Delivery {
                answer: Some(call.await),
                store,
                claimed,
                process,
                ended,
            };
            // Not taken (sent to nobody, or dropped in the channel): `Delivery::drop` cancels.
            let _ = answer.send(delivery);
        });
        let mut delivery = answered
            .await
            .map_err(|_| Error::Backend("a claim's task ended without an answer".into()))?;
        delivery
            .answer
            .take()
            .unwrap_or_else(|| Err(Error::Backend("a claim's answer was taken twice".into())))
    }

    /// Declare (or redeclare) a process and the processes it conflicts with. Conflicts must be
    /// declared already; they are symmetric when claims are checked.
    pub async fn process_define(
        &self,
        name: &str,
        conflicts: &[&str],
    ) -> Result<fleetdb_core::work::Process> {
        let r = self
            .write(vec![Op::ProcessDefine {
                name: name.to_string(),
                conflicts: conflicts.iter().map(|c| c.to_string()).collect(),
            }])
            .await?;
        match r.into_iter().next().map(|r| r.applied) {
            Some(fleetdb_core::Applied::Process(p)) => Ok(p),
            _ => Err(Error::Backend("process_define returned no process".into())),
        }
    }

    /// Pause a declared process (operators): no claim for it starts until it is resumed, on any
    /// backend connection; selector claims find nothing and `claim_object` is refused. Claims
    /// already held go on and end as usual. Pausing a paused process changes nothing.
    pub async fn process_pause(&self, name: &str) -> Result<fleetdb_core::work::Process> {
        self.process_set_paused(name, true).await
    }

    /// Resume a paused process: claims start again (waiting `claim_wait`s within
    /// [`CLAIM_WAIT_RETRY`]).
    pub async fn process_resume(&self, name: &str) -> Result<fleetdb_core::work::Process> {
        self.process_set_paused(name, false).await
    }

    /// Limit a declared process to `max_active` claims held by live sessions at once, fleet-wide
    /// (`None` lifts the limit): claims beyond it find nothing (`claim_object` is refused) until
    /// one ends. Claims of a limited process take turns (each counts the live claims under a lock
    /// of the process), so the limit holds across processes and hosts; a claim of many still
    /// takes only what fits. Lowering the limit below the claims held ends none of them.
    pub async fn process_limit(
        &self,
        name: &str,
        max_active: Option<u64>,
    ) -> Result<fleetdb_core::work::Process> {
        self.process_control(Op::ProcessLimit {
            name: name.to_string(),
            max_active,
        })
        .await
    }

    /// Park an object for a declared process after `max_failures` failures in a row (`None`:
    /// retry for ever, each time after its backoff). The failure that reaches it leaves a backoff
    /// that never ends (`BackoffInfo::parked`): no claim of the process takes the object again
    /// until an operator clears that backoff (`backoff_clear`), which also starts the count
    /// again, as a finish does. Applies from the next failure: backoffs already parked stay parked
    /// when the setting is raised or lifted, and lowering it parks none before it fails again.
    pub async fn process_max_failures(
        &self,
        name: &str,
        max_failures: Option<u64>,
    ) -> Result<fleetdb_core::work::Process> {
        self.process_control(Op::ProcessMaxFailures {
            name: name.to_string(),
            max_failures,
        })
        .await
    }

    async fn process_set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<fleetdb_core::work::Process> {
        self.process_control(Op::ProcessPause {
            name: name.to_string(),
            paused,
        })
        .await
    }

    async fn process_control(&self, op: Op) -> Result<fleetdb_core::work::Process> {
        let r = self.write(vec![op]).await?;
        match r.into_iter().next().map(|r| r.applied) {
            Some(fleetdb_core::Applied::Process(p)) => Ok(p),
            _ => Err(Error::Backend(
                "changing a process returned no process".into(),
            )),
        }
    }

    /// Per declared process: claims held by live sessions, backoffs not yet over and, of those,
    /// the parked ones (what the `fleetdb_work_active`, `fleetdb_backoffs_active` and
    /// `fleetdb_work_parked` gauges show).
    pub async fn work_stats(&self) -> Result<Vec<fleetdb_core::backend::WorkStats>> {
        self.ready().await?;
        self.backend.work_stats(self.clock.now()).await
    }

    pub async fn process_list(&self) -> Result<Vec<fleetdb_core::work::Process>> {
        self.ready().await?;
        self.backend.process_list().await
    }

    pub async fn session_get(&self, id: &str) -> Result<Option<SessionInfo>> {
        self.ready().await?;
        fleetdb_core::validate::name("session id", id)?;
        self.backend.session_get(id).await
    }

    /// Sessions ordered by id (expired ones too, until swept).
    pub async fn session_list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<crate::Page<SessionInfo>> {
        self.ready().await?;
        crate::check_limit(limit)?;
        if let Some(a) = after {
            fleetdb_core::validate::name("after", a)?;
        }
        let mut items = self.backend.session_list(after, limit + 1).await?;
        let next = crate::next_page(&mut items, limit, |s| s.id.clone());
        Ok(crate::Page { items, next })
    }

    /// Close any session by id (operators): releases its work like [`Session::close`].
    pub async fn session_close(&self, id: &str) -> Result<u64> {
        let r = self
            .write(vec![Op::SessionClose { id: id.to_string() }])
            .await?;
        // Counted once it happened (an operator's close of another process's session too), and
        // so are the claims it released, as `canceled` (their history says "session closed").
        self.metrics.sessions_closed.inc();
        let released = match r.into_iter().next().map(|r| r.applied) {
            Some(fleetdb_core::Applied::Released { processes }) => processes,
            _ => Vec::new(),
        };
        for process in &released {
            self.metrics
                .work_finished
                .with_label_values(&[process.as_str(), "canceled"])
                .inc();
        }
        Ok(released.len() as u64)
    }

    /// Active claims (of live and of not yet swept dead sessions), optionally of one process:
    /// the first `limit` (at most `LIST_PAGE_MAX`); [`Store::work_page`] goes on from there.
    pub async fn work_list(&self, process: Option<&str>, limit: usize) -> Result<Vec<WorkInfo>> {
        Ok(self.work_page(process, None, None, limit).await?.items)
    }

    /// A page of active claims (ordered by process, namespace, kind, id), optionally of one
    /// process and of one session, after `cursor` (the `next` of the previous page).
    pub async fn work_page(
        &self,
        process: Option<&str>,
        session: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<crate::Page<WorkInfo>> {
        self.ready().await?;
        crate::check_limit(limit)?;
        if let Some(p) = process {
            fleetdb_core::validate::name("process", p)?;
        }
        if let Some(s) = session {
            fleetdb_core::validate::name("session", s)?;
        }
        let q = fleetdb_core::work::WorkListing {
            process: process.map(str::to_string),
            session: session.map(str::to_string),
            after: cursor
                .map(fleetdb_core::work::WorkCursor::decode)
                .transpose()?,
            limit: limit + 1,
        };
        if let Some(c) = &q.after {
            c.check_process(process)?;
        }
        let items = self.backend.work_list(&q).await?;
        if items.is_empty() {
            self.refuse_undeclared(process).await?;
        }
        Ok(page(items, limit, |w| {
            fleetdb_core::work::WorkCursor::after(&w.process, &w.key)
        }))
    }

    /// Operators: end a claim whoever holds it (history `Canceled`, cause "canceled by
    /// operator"). The holder's next finish/cancel/fail gets `WorkLost`. Returns whether there was one.
    pub async fn work_cancel(&self, key: &ObjectKey, process: &str) -> Result<bool> {
        let r = self
            .write(vec![Op::WorkForceCancel {
                key: key.clone(),
                process: process.to_string(),
            }])
            .await?;
        let canceled = r.first().is_some_and(|r| r.changed);
        if canceled {
            self.metrics
                .work_finished
                .with_label_values(&[process, "canceled"])
                .inc();
        }
        Ok(canceled)
    }

    /// Why `key` can or cannot be claimed for `process` now — "why is this machine not being
    /// worked on?": every reason a claim would not take it (the process undeclared, paused or at
    /// its limit; the object missing; a live claim of the process or a conflicting one; a backoff
    /// or parking), in the words and order of the claim's own checks, with the claims on the
    /// object, its backoff and, given the workers' `selector`, the terms of it the object fails.
    /// Read in one transaction that takes nothing and writes nothing.
    pub async fn work_explain(
        &self,
        key: &ObjectKey,
        process: &str,
        selector: Option<&str>,
    ) -> Result<fleetdb_core::work::WorkExplain> {
        let r = self
            .write(vec![Op::WorkExplain {
                key: key.clone(),
                process: process.to_string(),
                selector: selector.map(str::to_string),
            }])
            .await?;
        match r.into_iter().next().map(|r| r.applied) {
            Some(fleetdb_core::Applied::WorkExplain(e)) => Ok(*e),
            _ => Err(Error::Backend("an explanation returned nothing".into())),
        }
    }

    /// Backoffs, optionally of one process; `active_only` hides those already over. The first
    /// `limit` (at most `LIST_PAGE_MAX`); [`Store::backoff_page`] goes on from there.
    pub async fn backoff_list(
        &self,
        process: Option<&str>,
        active_only: bool,
        limit: usize,
    ) -> Result<Vec<fleetdb_core::work::BackoffInfo>> {
        let which = match active_only {
            true => BackoffWhich::Active,
            false => BackoffWhich::All,
        };
        Ok(self.backoff_page(process, which, None, limit).await?.items)
    }

    /// The parked objects (backoffs that end only when cleared), optionally of one process:
    /// the first `limit`.
    pub async fn backoff_parked(
        &self,
        process: Option<&str>,
        limit: usize,
    ) -> Result<Vec<fleetdb_core::work::BackoffInfo>> {
        Ok(self
            .backoff_page(process, BackoffWhich::Parked, None, limit)
            .await?
            .items)
    }

    /// A page of backoffs (ordered by process, namespace, kind, id), optionally of one process,
    /// after `cursor` (the `next` of the previous page).
    pub async fn backoff_page(
        &self,
        process: Option<&str>,
        which: BackoffWhich,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<crate::Page<fleetdb_core::work::BackoffInfo>> {
        self.ready().await?;
        crate::check_limit(limit)?;
        if let Some(p) = process {
            fleetdb_core::validate::name("process", p)?;
        }
        let after = cursor
            .map(fleetdb_core::work::WorkCursor::decode)
            .transpose()?;
        if let Some(c) = &after {
            c.check_process(process)?;
        }
        let at = match which {
            BackoffWhich::Active => Some(self.clock.now()),
            BackoffWhich::All => None,
            // Every other backoff ends before `PARKED` (a failure's `until` is clamped below it).
            BackoffWhich::Parked => Some(Timestamp(fleetdb_core::work::PARKED.0 - 1)),
        };
        let items = self
            .backend
            .backoff_list(process, at, after.as_ref(), limit + 1)
            .await?;
        if items.is_empty() {
            self.refuse_undeclared(process).await?;
        }
        Ok(page(items, limit, |b| {
            fleetdb_core::work::WorkCursor::after(&b.process, &b.key)
        }))
    }

    /// Remove the backoff of (object, process). Returns whether there was one.
    pub async fn backoff_clear(&self, key: &ObjectKey, process: &str) -> Result<bool> {
        let r = self
            .write(vec![Op::BackoffClear {
                key: key.clone(),
                process: process.to_string(),
            }])
            .await?;
        Ok(r.first().is_some_and(|r| r.changed))
    }

    /// Clear every parked backoff, optionally of one process: the objects can be claimed again,
    /// their failures counted from zero (after fixing what made a whole batch fail). In
    /// transactions of up to [`UNPARK_BATCH`]; returns how many were cleared.
    pub async fn backoff_unpark(&self, process: Option<&str>) -> Result<u64> {
        let mut cleared = 0;
        loop {
            let parked = self.backoff_parked(process, UNPARK_BATCH).await?;
            if parked.is_empty() {
                return Ok(cleared);
            }
            let ops = parked
                .into_iter()
                .map(|b| Op::BackoffClear {
                    key: b.key,
                    process: b.process,
                })
                .collect();
            let done = self.write(ops).await?.iter().filter(|r| r.changed).count() as u64;
            if done == 0 {
                // Listed, yet gone when cleared: someone else is clearing them.
                return Ok(cleared);
            }
            cleared += done;
        }
    }

    /// After `e` from a batch holding `releases`: `Ok` if the batch (or an earlier attempt of
    /// its releases) committed though the answer said otherwise, else the error to answer. Only
    /// an answer that may hide a commit is looked into — `Unavailable` from a backend whose
    /// connection can be lost after the COMMIT reached the server, or `WorkLost` after such an
    /// attempt of one of them — and the objects' histories tell: each claim's release event
    /// (token, session) is there. Every release is checked, not one: a batch retried with other
    /// claims than the attempt whose answer was lost must not count those as done. A `WorkLost`
    /// whose history cannot be read now answers the read's (transient) error: the caller tries
    /// again and looks again.
    pub(crate) async fn release_committed(&self, releases: &[Release], e: Error) -> Result<()> {
        let may_hide = match &e {
            Error::Unavailable(_) => self.backend.capabilities().unavailable_may_have_committed,
            Error::WorkLost { .. } => releases.iter().any(|r| r.earlier_unknown),
            _ => false,
        };
        if !may_hide || releases.is_empty() {
            return Err(e);
        }
        for release in releases {
            match self.release_recorded(release).await {
                Ok(true) => {}
                Ok(false) => return Err(e),
                Err(read) if matches!(e, Error::WorkLost { .. }) && read.is_transient() => {
                    return Err(read)
                }
                Err(_) => return Err(e),
            }
        }
        tracing::info!(
            claims = releases.len(),
            object = %releases[0].key,
            process = %releases[0].process,
            "claims' releases whose answer was lost with the connection had committed"
        );
        Ok(())
    }

    /// Count the end of a claim found gone that one of `uncertain` — releases of it by this
    /// process whose answers were lost with the connection — may have committed: the first
    /// found in the history ended the claim here, and is counted as its caller would have
    /// (`fleetdb_work_finished_total`, once: the claim is over for its handle). Nothing if none
    /// is found, or if the history cannot be read (best effort: the claim is over either way).
    pub(crate) async fn count_uncertain_end(&self, uncertain: &[Release]) {
        for release in uncertain {
            match self.release_recorded(release).await {
                Ok(true) => {
                    if let Some(result) = ended_as(release.event) {
                        self.metrics
                            .work_finished
                            .with_label_values(&[release.process.as_str(), result])
                            .inc();
                    }
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "reading how a claim ended failed; not counted");
                    return;
                }
            }
        }
    }

    /// Whether the history of `release`'s object holds its event, written by this claim.
    async fn release_recorded(&self, release: &Release) -> Result<bool> {
        let filter = HistoryFilter::Object(release.key.clone());
        let mut cursor: Option<String> = None;
        loop {
            let page = self.history(&filter, cursor.as_deref(), 100).await?;
            if page.items.iter().any(|e| {
                e.process == release.process
                    && e.token == release.token
                    && e.session_id == release.session_id
                    && e.event == release.event
            }) {
                return Ok(true);
            }
            // Claims of one (object, process) follow one another, newest first: a row of an
            // earlier claim (a lower token) means none further down is this claim's.
            if page
                .items
                .iter()
                .any(|e| e.process == release.process && e.token < release.token)
            {
                return Ok(false);
            }
            match page.next {
                Some(c) => cursor = Some(c),
                None => return Ok(false),
            }
        }
    }

    /// `Err` if a listing by `process` names a process never declared (a typo would otherwise
    /// list nothing, as if there were nothing to see). Asked only of empty pages.
    async fn refuse_undeclared(&self, process: Option<&str>) -> Result<()> {
        match process {
            Some(p)
                if !self
                    .backend
                    .process_list()
                    .await?
                    .iter()
                    .any(|d| d.name == p) =>
            {
                Err(fleetdb_core::apply::undeclared(p))
            }
            _ => Ok(()),
        }
    }

    /// Work history, newest first. `cursor` is the `next` of the previous page.
    pub async fn history(
        &self,
        filter: &fleetdb_core::work::HistoryFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<crate::Page<fleetdb_core::work::HistoryEntry>> {
        self.ready().await?;
        match filter {
            fleetdb_core::work::HistoryFilter::Object(k) => k.validate()?,
            fleetdb_core::work::HistoryFilter::Process(p) => {
                fleetdb_core::validate::name("process", p)?
            }
        }
        if limit == 0 || limit > fleetdb_core::work::HISTORY_PAGE_ROWS_MAX {
            return Err(Error::invalid(
                "limit",
                limit.to_string(),
                format!(
                    "must be between 1 and {}",
                    fleetdb_core::work::HISTORY_PAGE_ROWS_MAX
                ),
            ));
        }
        let before = cursor
            .map(|c| {
                c.parse::<i64>().map_err(|_| {
                    Error::invalid("cursor", c, "is not a cursor returned by a history listing")
                })
            })
            .transpose()?;
        let mut items = self.backend.history_list(filter, before, limit + 1).await?;
        if let (true, fleetdb_core::work::HistoryFilter::Process(p)) = (items.is_empty(), filter) {
            self.refuse_undeclared(Some(p)).await?;
        }
        let next = crate::next_page(&mut items, limit, |h| h.seq.to_string());
        Ok(crate::Page { items, next })
    }

    /// Delete history older than `retention`. Returns how many rows went.
    pub async fn history_prune(&self, retention: Duration) -> Result<u64> {
        self.ready().await?;
        self.backend
            .history_prune(self.clock.now() - retention)
            .await
    }

    /// Objects matching a selector (see docs/selectors.md), ordered by (namespace, kind, id).
    pub async fn select(
        &self,
        selector: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<crate::Page<crate::Object>> {
        self.ready().await?;
        fleetdb_core::selector::Selector::parse(selector)?;
        crate::check_limit(limit)?;
        let after = cursor.map(decode_key_cursor).transpose()?;
        let mut items = self
            .backend
            .select(selector, self.clock.now(), after.as_ref(), limit + 1)
            .await?;
        let next = crate::next_page(&mut items, limit, |o| encode_key_cursor(&o.key));
        Ok(crate::Page { items, next })
    }

    /// How many objects match a selector.
    pub async fn count(&self, selector: &str) -> Result<u64> {
        self.ready().await?;
        fleetdb_core::selector::Selector::parse(selector)?;
        self.backend.count(selector, self.clock.now()).await
    }
}

fn encode_key_cursor(k: &ObjectKey) -> String {
    format!("{}/{}/{}", k.namespace, k.kind, k.id)
}

fn decode_key_cursor(c: &str) -> Result<ObjectKey> {
    let mut parts = c.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(n), Some(k), Some(i)) => ObjectKey::new(n, k, i).map_err(|_| {
            Error::invalid(
                "cursor",
                c,
                "is not a cursor returned by a selector listing",
            )
        }),
        _ => Err(Error::invalid(
            "cursor",
            c,
            "is not a cursor returned by a selector listing",
        )),
    }
}

/// A claim's answer on its way to the caller ([`Store::detached_claim`]): dropped untaken, it
/// cancels the work it holds.
struct Delivery<T> {
    answer: Option<Result<T>>,
    store: Store,
    claimed: fn(&T) -> &Claimed,
    /// The process the call claimed for.
    process: String,
    /// The claims the committed transaction released: (process, result).
    ended: Vec<(String, &'static str)>,
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        let Some(Ok(unwanted)) = self.answer.take() else {
            return;
        };
        // What the transaction released before its claim (a finish_and_claim's finish)
        // committed: counted here, as its caller would have.
        for (process, result) in &self.ended {
            self.store
                .metrics
                .work_finished
                .with_label_values(&[process.as_str(), result])
                .inc();
        }
        let claimed = (self.claimed)(&unwanted);
        // The dead sessions' claims it took over ended all the same: `expired`, in its process
        // (also when it took nothing: a takeover whose expiry parked the object).
        if claimed.expired > 0 {
            self.store
                .metrics
                .work_finished
                .with_label_values(&[self.process.as_str(), "expired"])
                .inc_by(claimed.expired);
        }
        if claimed.work.is_empty() {
            return;
        }
        // Started: it was claimed, whatever becomes of the cancel (a cancel that fails leaves
        // it to end with its session, counted there).
        for w in &claimed.work {
            self.store
                .metrics
                .work_started
                .with_label_values(&[w.process.as_str()])
                .inc();
        }
        let processes: Vec<String> = claimed.work.iter().map(|w| w.process.clone()).collect();
        let ops: Vec<Op> = claimed
            .work
            .iter()
            .map(|w| Op::WorkRelease {
                key: w.key.clone(),
                process: w.process.clone(),
                session_id: w.session_id.clone(),
                token: w.token,
                outcome: Outcome::Canceled,
            })
            .collect();
        // An answer lost with the connection is resolved from the history, as for `cancel`.
        let releases: Vec<Release> = claimed
            .work
            .iter()
            .map(|w| Release {
                key: w.key.clone(),
                process: w.process.clone(),
                session_id: w.session_id.clone(),
                token: w.token,
                event: WorkEvent::Canceled,
                earlier_unknown: false,
            })
            .collect();
        let store = self.store.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                match store.write_releasing(Vec::new(), ops, &releases).await {
                    Ok(_) => {
                        for p in &processes {
                            store
                                .metrics
                                .work_finished
                                .with_label_values(&[p.as_str(), "canceled"])
                                .inc();
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cancelling an unwanted claim failed (it expires with its session)"),
                }
            });
        }
    }
}

/// The first `limit` of `items` (fetched one more than that) as a page whose `next` is the
/// cursor after its last item when more remain.
fn page<T>(
    mut items: Vec<T>,
    limit: usize,
    cursor: impl Fn(&T) -> fleetdb_core::work::WorkCursor,
) -> crate::Page<T> {
    let more = items.len() > limit;
    items.truncate(limit);
    let next = match more {
        true => items.last().map(|last| cursor(last).encode()),
        false => None,
    };
    crate::Page { items, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff jitter draws from all of [0, 1): every bit of the 53 is random. (Taken from the
    /// first 8 bytes of a v4 UUID, the version nibble fixed four of them: the draws fell in
    /// 1/16 of every 1/256 of the range.)
    #[test]
    fn jitter_draws_cover_the_unit_interval() {
        let draws: Vec<f64> = (0..2000).map(|_| rand_unit()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        for bit in 1..=53 {
            let ones = draws
                .iter()
                .filter(|u| ((*u * 2f64.powi(bit)) as u64) & 1 == 1)
                .count();
            assert!(
                (600..=1400).contains(&ones),
                "bit 2^-{bit} set in {ones} of 2000 draws"
            );
        }
    }

    /// Whether `n` holds a wake-up (a permit), taking it.
    async fn woken(n: &tokio::sync::Notify) -> bool {
        tokio::time::timeout(Duration::ZERO, n.notified())
            .await
            .is_ok()
    }

    /// What a write setting tag `z` on `n` objects touched.
    fn tag_sets(n: usize) -> Touched {
        let ops: Vec<Op> = (0..n)
            .map(|i| Op::TagSet {
                key: ObjectKey::new("default", "job", format!("j{i}")).unwrap(),
                name: "z".into(),
                value: "true".into(),
            })
            .collect();
        touched(&ops)
    }

    #[tokio::test]
    async fn a_commit_wakes_every_group_but_a_short_claims_own() {
        let wakes = ClaimWakes::default();
        let (a, b) = (wakes.group("P", "has(x)"), wakes.group("P", "has(y)"));
        assert!(
            Arc::ptr_eq(&a, &wakes.group("P", "has(x)")),
            "one state per group"
        );
        wakes.committed(None, &tag_sets(1));
        assert!(woken(&a.notify).await && woken(&b.notify).await);
        wakes.committed(Some(("P", "has(x)")), &tag_sets(1));
        assert!(
            !woken(&a.notify).await,
            "the short claim's own group is not woken"
        );
        assert!(woken(&b.notify).await, "other groups are");
        wakes.committed(None, &Touched::Nothing);
        assert!(!woken(&b.notify).await, "no object, no wake-up");
        let finish_x = touched(&[Op::TagDelete {
            key: ObjectKey::new("default", "job", "j0").unwrap(),
            name: "x".into(),
        }]);
        wakes.committed(None, &finish_x);
        assert!(
            !woken(&a.notify).await,
            "a write that deleted the tag a group requires wakes none of it"
        );
        assert!(woken(&b.notify).await, "other groups are woken");
    }

    #[tokio::test]
    async fn a_commit_wakes_a_waiter_per_object_it_touched() {
        let wakes = ClaimWakes::default();
        let group = wakes.group("P", "has(x)");
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let g = group.clone();
                tokio::spawn(async move { g.notify.notified().await })
            })
            .collect();
        // One thread: yielding lets every spawned task run up to its wait, then the woken ones
        // to their end.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        wakes.committed(None, &tag_sets(2));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let done = waiters.iter().filter(|w| w.is_finished()).count();
        assert_eq!(done, 2, "two objects wake two of the three waiters");
        for w in waiters {
            w.abort();
        }
    }

    #[test]
    fn groups_a_waiter_holds_are_kept_past_the_bound() {
        let wakes = ClaimWakes::default();
        let held = wakes.group("P", "held");
        for i in 0..WAIT_GROUPS_MAX {
            drop(wakes.group("P", &format!("s{i}")));
        }
        assert!(wakes.groups.lock().unwrap().len() <= WAIT_GROUPS_MAX);
        assert!(
            Arc::ptr_eq(&held, &wakes.group("P", "held")),
            "the held group is kept"
        );
    }

    #[test]
    fn touched_counts_distinct_objects_and_no_object_as_none() {
        let key = |id: &str| ObjectKey::new("default", "job", id).unwrap();
        let set = |id: &str| Op::TagSet {
            key: key(id),
            name: "eligible".into(),
            value: "true".into(),
        };
        let delete = |id: &str, tag: &str| Op::TagDelete {
            key: key(id),
            name: tag.into(),
        };
        let none = std::collections::BTreeSet::new();
        let eligible: std::collections::BTreeSet<String> = ["eligible".to_string()].into();
        let t = touched(&[set("a"), delete("a", "other"), set("b")]);
        assert_eq!(t.wakes(&none), 2);
        assert_eq!(t.wakes(&eligible), 2);
        let kv = Op::KvSet {
            key: "k".into(),
            value: "v".into(),
            expect: None,
            lifetime: Default::default(),
        };
        assert_eq!(
            touched(&[kv]),
            Touched::Nothing,
            "a key-value names no object"
        );
        let close = Op::SessionClose { id: "s".into() };
        assert_eq!(touched(&[set("a"), close]), Touched::Anywhere);
        // Resuming a process, or raising its limit, may free claims of any object.
        for op in [
            Op::ProcessPause {
                name: "P".into(),
                paused: false,
            },
            Op::ProcessLimit {
                name: "P".into(),
                max_active: None,
            },
        ] {
            assert_eq!(touched(&[op]), Touched::Anywhere);
        }
        assert_eq!(Touched::Anywhere.wakes(&eligible), WAKES_PER_COMMIT_MAX);
        let many: Vec<Op> = (0..100).map(|i| set(&format!("j{i}"))).collect();
        assert_eq!(touched(&many), Touched::Anywhere);
        let many: Vec<Op> = (0..100)
            .map(|i| delete(&format!("j{i}"), "eligible"))
            .collect();
        assert_eq!(
            touched(&many).wakes(&eligible),
            WAKES_PER_COMMIT_MAX,
            "past the cap, every group is woken as for that many"
        );
        let capped: Vec<Op> = (0..WAKES_PER_COMMIT_MAX)
            .map(|i| set(&format!("j{i}")))
            .collect();
        assert_eq!(touched(&capped).wakes(&none), WAKES_PER_COMMIT_MAX);
    }

    #[test]
    fn a_write_that_deletes_a_required_tag_makes_no_candidate_of_its_object() {
        let key = |id: &str| ObjectKey::new("default", "job", id).unwrap();
        let set = |id: &str, tag: &str| Op::TagSet {
            key: key(id),
            name: tag.into(),
            value: "true".into(),
        };
        let delete = |id: &str, tag: &str| Op::TagDelete {
            key: key(id),
            name: tag.into(),
        };
        let release = |id: &str| Op::WorkRelease {
            key: key(id),
            process: "P".into(),
            session_id: "s".into(),
            token: 1,
            outcome: fleetdb_core::work::Outcome::Finished,
        };
        let req = |tags: &[&str]| -> std::collections::BTreeSet<String> {
            tags.iter().map(|t| t.to_string()).collect()
        };
        // A worker's finish: its claim released and the tag its selector requires deleted.
        let finish = touched(&[delete("a", "eligible"), release("a")]);
        assert_eq!(finish.wakes(&req(&["eligible"])), 0);
        assert_eq!(
            finish.wakes(&req(&["other"])),
            1,
            "other selectors may match it now"
        );
        assert_eq!(finish.wakes(&req(&[])), 1);
        // A finish that keeps the tag frees the object for the next claim.
        assert_eq!(touched(&[release("a")]).wakes(&req(&["eligible"])), 1);
        // The last op on a tag decides.
        let again = touched(&[delete("a", "eligible"), set("a", "eligible")]);
        assert_eq!(again.wakes(&req(&["eligible"])), 1);
        let gone = touched(&[set("a", "eligible"), delete("a", "eligible")]);
        assert_eq!(gone.wakes(&req(&["eligible"])), 0);
        // A deleted object matches nothing; put again, it has only the tags set since.
        let deleted = touched(&[Op::ObjectDelete { key: key("a") }]);
        assert_eq!(deleted.wakes(&req(&[])), 0);
        let put = Op::ObjectPut {
            key: key("a"),
            labels: Default::default(),
            mode: Default::default(),
        };
        let recreated = touched(&[Op::ObjectDelete { key: key("a") }, put.clone()]);
        assert_eq!(recreated.wakes(&req(&[])), 1);
        assert_eq!(recreated.wakes(&req(&["eligible"])), 0);
        let retagged = touched(&[
            Op::ObjectDelete { key: key("a") },
            put,
            set("a", "eligible"),
        ]);
        assert_eq!(retagged.wakes(&req(&["eligible"])), 1);
        // Objects count one by one.
        let two = touched(&[delete("a", "eligible"), release("a"), set("b", "eligible")]);
        assert_eq!(two.wakes(&req(&["eligible"])), 1);
    }

    #[test]
    fn a_group_knows_the_tags_its_selector_requires() {
        let wakes = ClaimWakes::default();
        let g = wakes.group("P", "kind = job and has(eligible) and not has(done)");
        assert_eq!(g.required, ["eligible".to_string()].into());
        let bad = wakes.group("P", "has(");
        assert!(
            bad.required.is_empty(),
            "an unparsable selector requires nothing"
        );
    }

    #[test]
    fn own_revisions_tell_this_stores_commits_from_others() {
        let own = OwnRevisions::default();
        let r = fleetdb_core::Revision;
        own.note([r(5), r(6), r(8)].into_iter());
        assert!(own.all_own(r(4), r(6)), "5 and 6 are ours");
        assert!(!own.all_own(r(4), r(8)), "7 is someone else's");
        assert!(own.all_own(r(7), r(8)));
        assert!(own.all_own(r(8), r(8)), "nothing moved");
        assert!(!own.all_own(r(8), r(9)));
    }
}
