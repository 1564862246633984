//! Selector claims of one (process, selector) from many workers of this process share
//! transactions (flat combining).
//!
//! One claim transaction per (process, selector text) is in flight from this process at a time,
//! and a second one once [`SECOND_MIN`] claims wait or one has waited [`SECOND_AFTER`]
//! ([`IN_FLIGHT_MAX`]); a transaction passes its turn on as soon as its work is written, before
//! its commit's WAL flush ([`Hooks`]). A claim that finds nothing in flight runs alone at once,
//! exactly as it would without sharing ([`PostgresBackend::claim_selector_alone`]); claims
//! arriving meanwhile wait in a queue, and when a turn passes on (or a waiting claim starts the
//! second transaction), the waiting ones (up to [`SHARED_MAX`], in arrival order) go together in
//! ONE transaction of one round trip ([`ClaimTxn`]), on a spawned task that answers each caller:
//! `BEGIN` and the planner settings (for a process its hand saw limited, also a lock of the
//! process's row, [`work::PROCESS_LOCK_LIMITED`]); ONE statement with every claim's finish (a
//! worker's "finish this, give me the next"; [`finish::SQL`] checks and writes each finish on its
//! own); ONE
//! find-and-lock for all of them ([`work::claim_lock_sql`] with every claiming session and the
//! sum of their limits); ONE check-and-take ([`work::claim_take_sql`]: the locked candidates go
//! to the claims in arrival order, each up to its limit, skipping a claim whose session is not
//! alive or whose finish failed); `COMMIT`.
//!
//! Under load a worker's claim costs a share of a transaction and of four statements instead of
//! all of them: ~230 µs of statement time per job instead of ~400 in the one-at-a-time benchmark.
//! The rules that keep it the claims' own semantics:
//! - a claim is either answered from the shared transaction or handed back to its caller, which
//!   runs it alone (with its retries): every claim of a transaction that failed (nothing of it
//!   was written: nothing was sent, or the server refused a statement; but when the outcome is
//!   not known — the connection lost after it was sent — or it committed and its answer could
//!   not be read, every caller gets the error, as alone: a finish that committed must not run
//!   again), one whose finish failed a check (that finish wrote nothing, the take skipped
//!   the claim; alone, the general path names the failure), and the claim part of one whose
//!   candidates were all gone at the take (its session died meanwhile, or they stopped
//!   matching) — its finish committed;
//! - a claim's session is checked alive in the same statements as alone: the find says which
//!   claiming sessions are alive, and the take checks each candidate's session again;
//! - finishes of one transaction touch distinct tags and claims (a finish that does not waits
//!   for the next transaction), so each decides on rows no other finish of it wrote;
//! - a claim whose caller gave up while it waited still runs; the work it got is cancelled, as a
//!   dropped `Work` is, so nothing stays held for nobody.
//!
//! Claims of at least [`work::Hand::TURN_MIN`] candidates are not combined: they are batches
//! already, and take turns at the hand instead.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::future::maybe_done;

use fleetdb_core::backend::{Backend, CandidateQuery};
use fleetdb_core::selector::Selector;
use fleetdb_core::work::{ClaimRequest, ClaimTarget, Claimed, Outcome, WorkInfo};
use fleetdb_core::{Batch, Error, Op, OpResult, Result};
use tokio::sync::oneshot;

use crate::error::db_err;
use crate::finish::{self, FinishParams, FinishRow, FusedFinish};
use crate::sql;
use crate::{classify, prepare_claim, work, Failure, PostgresBackend, TxGuard};

/// Claims one shared transaction carries at most.
pub(crate) const SHARED_MAX: usize = 16;

/// A claim's answer: the finish's results (when it finished something first) and the work.
pub(crate) type ClaimAnswer = (Option<Vec<OpResult>>, Claimed);

/// What a shared transaction decided for one claim.
enum Answer {
    Done(Result<ClaimAnswer>),
    /// Nothing of it was written: the caller runs it alone, finish and all.
    Alone,
    /// Its finish (if any) committed with these results; the caller runs the claim alone.
    ClaimAlone(Option<Vec<OpResult>>),
}

/// A claim waiting for its turn.
struct Waiting {
    req: ClaimRequest,
    finish: Option<FusedFinish>,
    reply: oneshot::Sender<Answer>,
    /// When it began to wait.
    since: Instant,
}

/// (process, selector text).
type GroupKey = (String, String);

/// The claims of this process waiting for their (process, selector)'s transaction in flight to
/// end. A key is present while a claim transaction of it is in flight.
/// The claims of one (process, selector) in flight and waiting.
#[derive(Default)]
struct Group {
    in_flight: usize,
    waiting: VecDeque<Waiting>,
}

/// Claim transactions of one (process, selector) in flight at once from this process (a
/// transaction passes its turn on once its work is written, before its commit's WAL flush): the
/// second only when [`SECOND_MIN`] claims wait, or one has waited [`SECOND_AFTER`]. Measured with
/// the one-at-a-time benchmark (before the turn passed on early, paced at 1,500/s, four runs
/// each, interleaved): with one, PostgreSQL used 112–122 % CPU and p99 was 13–29 ms in two runs,
/// 421–2,190 ms in two; with two, 135–148 % and 8.9–218 ms in three runs, 712 ms in one. Flat
/// out, more in flight completed more (1,421 / 1,572 / 1,862 jobs/s with one / two / three) at
/// more CPU per job.
pub(crate) const IN_FLIGHT_MAX: usize = 2;

/// Claims waiting behind the transaction in flight that start the second one at once. A claim
/// transaction's fixed cost (`BEGIN`, settings, initializing three large plans, `COMMIT`) is
/// about that of four claims' own work; with the second turn always open (a claim that found it
/// free ran alone), a loaded pool of eight workers ran transactions of ~1.4 claims and
/// PostgreSQL's CPU was the limit. A smaller batch waits for the turn instead, unless its first
/// claim has waited [`SECOND_AFTER`].
///
/// Measured with the one-at-a-time benchmark flat out (8 producers × 8 workers, thirteenth
/// session, 8 rounds of the four builds interleaved, medians): second turn always open 1,422
/// completed/s, p99 30.3 ms, 0.97 ms of PostgreSQL CPU per job; four waiting or 3 ms (this
/// rule) 1,601/s, 28.9 ms, 0.82 ms; four waiting only 1,586/s but p99 38.8 ms (a claim could
/// wait behind a slow transaction for its whole length); four or 2 ms 1,514/s, 32.8 ms. One
/// transaction only (20 % less PostgreSQL CPU) completed 1,592–2,096/s while the producers added
/// 1,854–2,443/s: the backlog grew and p99 was 1.5–2.2 s (docs/benchmarks.md, thirteenth session).
pub(crate) const SECOND_MIN: usize = 4;

/// How long a claim waits for the turn in flight before it starts the second transaction itself,
/// however few wait (see [`SECOND_MIN`]): each queued claim waits for its answer this long, then
/// starts it if it is still queued, the first claim waiting has waited as long, and a turn is free
/// ([`ClaimCombiner::launch_late`]).
pub(crate) const SECOND_AFTER: Duration = Duration::from_millis(3);

pub(crate) struct ClaimCombiner {
    groups: Mutex<HashMap<GroupKey, Group>>,
    /// [`SECOND_AFTER`] in microseconds (tests set it to rule time out).
    pub(crate) second_after_us: AtomicU64,
    /// Shared transactions committed, the claims they answered, and the ones that failed (for
    /// tests and debugging).
    pub(crate) shared_txns: AtomicU64,
    pub(crate) shared_claims: AtomicU64,
    pub(crate) shared_failed: AtomicU64,
    /// Claim transactions begun, alone or shared (for tests and debugging).
    pub(crate) txns: AtomicU64,
}

impl Default for ClaimCombiner {
    fn default() -> Self {
        ClaimCombiner {
            groups: Mutex::default(),
            second_after_us: AtomicU64::new(SECOND_AFTER.as_micros() as u64),
            shared_txns: AtomicU64::default(),
            shared_claims: AtomicU64::default(),
            shared_failed: AtomicU64::default(),
            txns: AtomicU64::default(),
        }
    }
}

enum Entered {
    /// No transaction of the key is in flight: this claim runs alone, holding a turn.
    First,
    /// Queued: the answer comes on this channel.
    Queued(oneshot::Receiver<Answer>),
    /// Queued, and enough claims wait to start the second transaction now: the caller passes a
    /// turn on (the waiting claims go in a shared transaction), then waits for its answer.
    Launch(oneshot::Receiver<Answer>),
}

impl ClaimCombiner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Group>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(&self, key: &GroupKey, req: &ClaimRequest, finish: Option<&FusedFinish>) -> Entered {
        let mut groups = self.lock();
        let group = groups.entry(key.clone()).or_default();
        if group.in_flight == 0 {
            group.in_flight = 1;
            return Entered::First;
        }
        let (reply, answer) = oneshot::channel();
        group.waiting.push_back(Waiting {
            req: req.clone(),
            finish: finish.cloned(),
            reply,
            since: Instant::now(),
        });
        if group.in_flight < IN_FLIGHT_MAX && group.waiting.len() >= SECOND_MIN {
            group.in_flight += 1;
            return Entered::Launch(answer);
        }
        Entered::Queued(answer)
    }

    fn second_after(&self) -> Duration {
        Duration::from_micros(self.second_after_us.load(Ordering::Relaxed))
    }

    /// Whether a claim that has waited [`SECOND_AFTER`] should start the second transaction
    /// now: the first claim waiting has waited that long and a turn is free. If so, the turn is
    /// taken: the caller passes it on.
    fn launch_late(&self, key: &GroupKey) -> bool {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(key) else {
            return false;
        };
        let long = group
            .waiting
            .front()
            .is_some_and(|w| w.since.elapsed() >= self.second_after());
        if long && group.in_flight < IN_FLIGHT_MAX {
            group.in_flight += 1;
            return true;
        }
        false
    }

    /// A turn of `key` passes on: the claims to send next, in arrival order (none: the turn is
    /// free again).
    fn next(&self, key: &GroupKey) -> Vec<Waiting> {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(key) else {
            return Vec::new();
        };
        if group.waiting.is_empty() {
            group.in_flight = group.in_flight.saturating_sub(1);
            if group.in_flight == 0 {
                groups.remove(key);
            }
            return Vec::new();
        }
        // In arrival order, up to SHARED_MAX, skipping a finish that touches a tag or claim of
        // one already taken (it keeps its place for the next transaction).
        let mut batch: Vec<Waiting> = Vec::new();
        let mut kept = VecDeque::new();
        while let Some(w) = group.waiting.pop_front() {
            let fits = batch.len() < SHARED_MAX
                && w.finish.as_ref().is_none_or(|f| {
                    let taken: Vec<&FusedFinish> =
                        batch.iter().filter_map(|b| b.finish.as_ref()).collect();
                    f.disjoint(&taken)
                });
            match fits {
                true => batch.push(w),
                false => kept.push_back(w),
            }
            if batch.len() == SHARED_MAX {
                break;
            }
        }
        kept.extend(group.waiting.drain(..));
        group.waiting = kept;
        batch
    }
}

/// The turn of a (process, selector): when it drops (however the claim holding it ended), the
/// claims that waited meanwhile go in one shared transaction on a spawned task, which holds the
/// turn in its turn.
pub(crate) struct Turn {
    backend: PostgresBackend,
    key: GroupKey,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let next = self.backend.claims.next(&self.key);
        if next.is_empty() {
            return;
        }
        let Some((rt, _spawning)) = crate::combine::passing_on() else {
            // Nothing to run them on (see `passing_on`): every waiting claim runs alone (a
            // dropped reply says so), and the key is freed.
            drop(next);
            while !self.backend.claims.next(&self.key).is_empty() {}
            return;
        };
        let turn = Turn {
            backend: self.backend.clone(),
            key: self.key.clone(),
        };
        let backend = self.backend.clone();
        rt.spawn(async move {
            // The turn passes on as soon as the transaction's work is written (see `Hooks`).
            let answers = backend.claim_shared(&next, turn).await;
            for (w, answer) in next.into_iter().zip(answers) {
                if let Err(Answer::Done(Ok((_, claimed)))) = w.reply.send(answer) {
                    backend.cancel_undelivered(claimed.work);
                }
            }
        });
    }
}

/// The error of a claim for a process never declared.
pub(crate) use fleetdb_core::apply::undeclared;

/// What a claim's caller does as its transaction's answers come in, before its commit is
/// durable (the commit's WAL flush is most of a loaded transaction's time).
#[derive(Default)]
pub(crate) struct Hooks<'a> {
    /// With find-and-lock's candidates (JSON; `None` when there are none or it failed), once
    /// its answer is in: from then on the candidates are this transaction's (locked).
    pub(crate) locked: Option<LockedHook<'a>>,
    /// Once check-and-take's answer is in: only the commit is left.
    pub(crate) taken: Option<Box<dyn FnOnce() + Send + 'a>>,
    /// Awaited with the connection in hand, before find-and-lock is sent (behind a finish, once
    /// the finish has answered: one more round trip); yields the claim hand to scan from (the
    /// find's last three parameters, [`work::TypedParams::set_hand`]). A claim of many takes its
    /// hand's turn here, so the turn covers the find alone. Whoever waits for the turn may hold
    /// a connection and, behind a finish, row locks; the holder needs neither: it has its
    /// connection, and find-and-lock waits for no row lock (`SKIP LOCKED`). Taken before the
    /// connection, a holder waiting for a pooled connection that turn waiters held would wait
    /// for ever.
    pub(crate) gate: Option<Gate<'a>>,
}

/// [`Hooks::gate`].
pub(crate) type Gate<'a> =
    std::pin::Pin<Box<dyn Future<Output = fleetdb_core::ObjectKey> + Send + 'a>>;

/// [`Hooks::locked`].
pub(crate) type LockedHook<'a> = Box<dyn FnOnce(Option<&str>) + Send + 'a>;

/// What one claim transaction's round trip said: `BEGIN` and the planner settings, the finishes
/// (if any, [`finish::SQL`]), find-and-lock ([`work::claim_lock_sql`]), check-and-take
/// ([`work::claim_take_sql`]) and `COMMIT`, pipelined. Each statement hands its results to the
/// next through transaction settings (see [`work::ALIVE_GUC`]), so nothing waits for the client
/// between them; a statement that fails aborts the transaction (`COMMIT` then rolls back).
pub(crate) struct ClaimTxn {
    pub(crate) finished: Option<FinishRow>,
    pub(crate) alive: HashSet<String>,
    pub(crate) declared: bool,
    /// How many candidates find-and-lock locked.
    pub(crate) locked_n: usize,
    /// The change log's revision in find-and-lock's snapshot, when it locked fewer candidates
    /// than the limit.
    pub(crate) revision: Option<fleetdb_core::Revision>,
    pub(crate) took: Vec<tokio_postgres::Row>,
    /// The process's limit left room for fewer candidates than were locked
    /// ([`work::CAPPED_ROW`]): the claims cut short must not look further.
    pub(crate) capped: bool,
    /// Dead sessions' claims the take expired without taking them over: counting the expiry
    /// parked the object ([`work::PARKED_ROW`]; counted `expired`, not in `took`).
    pub(crate) parked: usize,
    /// The process has a limit (find-and-lock locked its row): the next claims of this hand
    /// lock it first ([`work::Hand::limited`]).
    pub(crate) limited: bool,
}

/// Poll each pinned request once, in order, and go on: tokio-postgres sends a request on its
/// first poll, so this puts them on the wire in this order without waiting for an answer.
macro_rules! send_in_order {
    ($($request:ident),+) => {
        futures::future::poll_fn(|cx| {
            $(let _ = $request.as_mut().poll(cx);)+
            Poll::Ready(())
        })
        .await
    };
}

impl ClaimTxn {
    /// The keys the take took (rows it could not read left out).
    pub(crate) fn taken_keys(&self) -> Vec<fleetdb_core::ObjectKey> {
        self.took
            .iter()
            .filter_map(|r| {
                Some(fleetdb_core::apply::stored_key(
                    r.try_get(0).ok()?,
                    r.try_get(1).ok()?,
                    r.try_get(2).ok()?,
                ))
            })
            .collect()
    }

    pub(crate) async fn run(
        backend: &PostgresBackend,
        (lock_sql, lock_params): (&str, &work::TypedParams),
        finish: Option<&FinishParams>,
        (take_sql, take_params): &(String, work::TypedParams),
        prelock: Option<&str>,
        hooks: Hooks<'_>,
    ) -> std::result::Result<ClaimTxn, RunFailure> {
        backend.claims.txns.fetch_add(1, Ordering::Relaxed);
        let client = backend
            .client()
            .await
            .map_err(|e| RunFailure::NotSent(Failure::Fail(e)))?;
        let mut guard = TxGuard {
            client: Some(client),
            open: true,
        };
        let conn: &deadpool_postgres::ClientWrapper = guard.client();
        // A worker claims with one selector over and over: the statements are prepared once per
        // connection (planning them costs more than running them).
        let prepared = async {
            let lock = prepare_claim(conn, lock_sql).await?;
            let take = prepare_claim(conn, take_sql).await?;
            let finish = match finish {
                Some(_) => Some(
                    conn.prepare_cached(finish::SQL)
                        .await
                        .map_err(|e| crate::prepare_failed(&e))?,
                ),
                None => None,
            };
            // The planner settings too: sent as text they were parsed and planned at every run
            // (~20 µs of planning, more than running them).
            let settings = conn
                .prepare_cached(sql::CLAIM_PLANNED)
                .await
                .map_err(|e| crate::prepare_failed(&e))?;
            let prelock = match prelock {
                Some(_) => Some(
                    conn.prepare_cached(work::PROCESS_LOCK_LIMITED)
                        .await
                        .map_err(|e| crate::prepare_failed(&e))?,
                ),
                None => None,
            };
            Ok::<_, Failure>((lock, take, finish, (settings, prelock)))
        };
        let (lock_stmt, take_stmt, finish_stmt, (settings_stmt, prelock_stmt)) =
            match prepared.await {
                Ok(stmts) => stmts,
                Err(failure) => {
                    guard.open = false; // no transaction was opened
                    return Err(RunFailure::NotSent(failure));
                }
            };
        let finished = async {
            match (&finish_stmt, finish) {
                (Some(stmt), Some(params)) => conn.query(stmt, &params.params()).await.map(Some),
                _ => Ok(None),
            }
        };
        let take_values = take_params.values();
        let gated_params: work::TypedParams;
        let (begin, finished, locked, took, commit) = {
            let mut begin = pin!(maybe_done(conn.batch_execute(sql::BEGIN_READ_COMMITTED)));
            // A limited process's row first, in a statement of its own: find-and-lock's
            // snapshot is then taken after the lock is granted, and sees the claims of the
            // transaction it waited for (locked inside find-and-lock, the wait came after its
            // snapshot: the candidates that transaction took looked free, were locked, and were
            // found gone at the take).
            let mut settings = pin!(maybe_done(async {
                let settings = conn.query(&settings_stmt, &[]);
                let prelock = async {
                    match (&prelock_stmt, prelock) {
                        (Some(stmt), Some(process)) => {
                            conn.query(stmt, &[&process]).await.map(drop)
                        }
                        _ => Ok(()),
                    }
                };
                let (settings, prelock) = futures::future::join(settings, prelock).await;
                settings.and(prelock)
            }));
            let mut finished = pin!(maybe_done(finished));
            let lock_values = match hooks.gate {
                None => lock_params.values(),
                Some(gate) => {
                    if finish.is_some() {
                        // Send the first three and wait for their answers before the gate.
                        send_in_order!(begin, settings, finished);
                        begin.as_mut().await;
                        settings.as_mut().await;
                        finished.as_mut().await;
                    }
                    let mut params = lock_params.clone();
                    params.set_hand(&gate.await);
                    gated_params = params;
                    gated_params.values()
                }
            };
            let mut locked = pin!(maybe_done(conn.query(&lock_stmt, &lock_values)));
            let mut took = pin!(maybe_done(conn.query(&take_stmt, &take_values)));
            let mut commit = pin!(maybe_done(conn.batch_execute("COMMIT")));
            // Send every request, in this order (one already sent is not sent again).
            send_in_order!(begin, settings, finished, locked, took, commit);
            // The answers come in the same order.
            begin.as_mut().await;
            settings.as_mut().await;
            finished.as_mut().await;
            locked.as_mut().await;
            let locked = locked.as_mut().take_output();
            if let Some(hook) = hooks.locked {
                let json = match &locked {
                    Some(Ok(rows)) => rows
                        .first()
                        .and_then(|r| r.try_get::<_, Option<String>>(2).ok())
                        .flatten(),
                    _ => None,
                };
                hook(json.as_deref());
            }
            took.as_mut().await;
            if let Some(hook) = hooks.taken {
                hook();
            }
            commit.as_mut().await;
            // BEGIN and the settings answer as one step: the first failure of the two.
            let begin = match (
                begin.as_mut().take_output(),
                settings.as_mut().take_output(),
            ) {
                (Some(Ok(())), Some(Ok(_))) => Some(Ok(())),
                (Some(Err(e)), _) | (_, Some(Err(e))) => Some(Err(e)),
                _ => None,
            };
            (
                begin,
                finished.as_mut().take_output(),
                locked,
                took.as_mut().take_output(),
                commit.as_mut().take_output(),
            )
        };
        // COMMIT ran (or the connection is gone): the transaction is over either way. A failed
        // statement turned it into a rollback; had BEGIN failed, the statements ran on their own
        // and failed or did nothing (the take needs the find's settings; a finish that ran
        // alone is retried by the general path, which then finds it done).
        guard.open = false;
        let (finished, locked, took) = match (begin, finished, locked, took, commit) {
            (Some(Ok(())), Some(Ok(finished)), Some(Ok(locked)), Some(Ok(took)), Some(Ok(()))) => {
                (finished, locked, took)
            }
            (begin, finished, locked, took, commit) => {
                let first = [
                    begin.and_then(|r| r.err()),
                    finished.and_then(|r| r.err()),
                    locked.and_then(|r| r.err()),
                    took.and_then(|r| r.err()),
                ]
                .into_iter()
                .flatten()
                .next()
                .map(|e| (e, false))
                .or_else(|| commit.and_then(|r| r.err()).map(|e| (e, true)));
                // The server answered a statement with an error: the transaction rolled back
                // (COMMIT of an aborted transaction is a rollback; an error answering COMMIT is
                // a failed commit), and one that ended the session before COMMIT kept nothing
                // (a transient failure: it runs again on another connection). Anything else —
                // the connection lost, a request the client could not send while COMMIT went
                // after it, the session ended answering COMMIT itself — may have committed.
                return Err(match first {
                    Some((e, true)) if crate::error::session_ended(&e) => {
                        RunFailure::Unknown(crate::error::db_err(e))
                    }
                    Some((e, _)) if e.as_db_error().is_some() => RunFailure::Sent(
                        crate::error::ended_before_commit(&e).unwrap_or_else(|| classify(&e)),
                    ),
                    Some((e, _)) => RunFailure::Unknown(crate::error::db_err(e)),
                    None => RunFailure::Unknown(Error::Backend("a claim failed".into())),
                });
            }
        };
        drop(guard);
        let decoded = (|| -> Result<ClaimTxn> {
            let finished = finished.as_deref().map(FinishRow::decode).transpose()?;
            let row = locked
                .first()
                .ok_or_else(|| Error::Backend("the claim returned no row".into()))?;
            let alive: Option<String> = row.try_get(0).map_err(db_err)?;
            let declared: bool = row.try_get(1).map_err(db_err)?;
            let locked: Option<String> = row.try_get(2).map_err(db_err)?;
            let revision: Option<i64> = row.try_get(3).map_err(db_err)?;
            let limited: bool = row.try_get(6).map_err(db_err)?;
            let alive: HashSet<String> = match alive {
                Some(json) => serde_json::from_str(&json)
                    .map_err(|e| Error::Backend(format!("the alive sessions of a claim: {e}")))?,
                None => HashSet::new(),
            };
            let locked_n = match &locked {
                // Counted, not read (the hand reads the keys).
                Some(json) => serde_json::from_str::<Vec<serde::de::IgnoredAny>>(json)
                    .map_err(|e| Error::Backend(format!("the candidates of a claim: {e}")))?
                    .len(),
                None => 0,
            };
            let mut took = took;
            let r_of = |r: &tokio_postgres::Row| r.try_get::<_, Option<i64>>(5).ok().flatten();
            let parked = took
                .iter()
                .filter(|r| r_of(r) == Some(work::PARKED_ROW))
                .count();
            took.retain(|r| r_of(r) != Some(work::PARKED_ROW));
            let before = took.len();
            took.retain(|r| r_of(r) != Some(work::CAPPED_ROW));
            Ok(ClaimTxn {
                finished,
                alive,
                declared,
                locked_n,
                revision: revision.map(fleetdb_core::Revision),
                capped: took.len() < before,
                took,
                parked,
                limited,
            })
        })();
        decoded.map_err(RunFailure::Committed)
    }
}

/// How a [`ClaimTxn::run`] failed, which decides whether its claims may run again alone.
pub(crate) enum RunFailure {
    /// Before anything was sent (no connection, statements not prepared): nothing happened.
    NotSent(Failure),
    /// The server answered a statement with an error: the transaction rolled back.
    Sent(Failure),
    /// The outcome is not known (the connection lost, a request not sent after others were):
    /// it may have committed.
    Unknown(Error),
    /// It committed, but its answer could not be read.
    Committed(Error),
}

impl RunFailure {
    /// As a failure of a claim alone.
    pub(crate) fn failure(self) -> Failure {
        match self {
            RunFailure::NotSent(f) | RunFailure::Sent(f) => f,
            RunFailure::Unknown(e) | RunFailure::Committed(e) => Failure::Fail(e),
        }
    }
}

impl PostgresBackend {
    /// A selector claim (with a finish first, for `commit_then_claim`): alone if no claim of its
    /// (process, selector) is in flight from this process, else in the next shared transaction
    /// (see the module documentation). Returns the finish's results, or `None` when one of its
    /// checks failed (nothing happened: the caller runs the general path).
    pub(crate) async fn claim_selector(
        &self,
        req: &ClaimRequest,
        selector: Selector,
        finish: Option<&FusedFinish>,
    ) -> Result<ClaimAnswer> {
        let ClaimTarget::Selector(text) = &req.target else {
            return self
                .claim_selector_alone(req, selector, finish, &mut None)
                .await;
        };
        if req.limit >= work::Hand::TURN_MIN {
            return self
                .claim_selector_alone(req, selector, finish, &mut None)
                .await;
        }
        let key = (req.process.clone(), text.clone());
        match self.claims.enter(&key, req, finish) {
            Entered::First => {
                let mut turn = Some(Turn {
                    backend: self.clone(),
                    key,
                });
                self.claim_selector_alone(req, selector, finish, &mut turn)
                    .await
            }
            Entered::Launch(answer) => {
                self.start_shared(&key);
                self.claim_queued(req, selector, finish, &key, answer).await
            }
            Entered::Queued(answer) => self.claim_queued(req, selector, finish, &key, answer).await,
        }
    }

    /// Pass on at once the turn of `key` just taken for a second transaction: the waiting
    /// claims go together in a shared transaction that holds it ([`Turn`]'s drop).
    fn start_shared(&self, key: &GroupKey) {
        drop(Turn {
            backend: self.clone(),
            key: key.clone(),
        });
    }

    /// A queued claim's answer. If it has waited [`SECOND_AFTER`] and still waits, it starts
    /// the second transaction when it may ([`ClaimCombiner::launch_late`]).
    async fn claim_queued(
        &self,
        req: &ClaimRequest,
        selector: Selector,
        finish: Option<&FusedFinish>,
        key: &GroupKey,
        mut answer: oneshot::Receiver<Answer>,
    ) -> Result<ClaimAnswer> {
        let answer = match tokio::time::timeout(self.claims.second_after(), &mut answer).await {
            Ok(answer) => answer,
            Err(_) => {
                if self.claims.launch_late(key) {
                    self.start_shared(key);
                }
                answer.await
            }
        };
        match answer {
            Ok(Answer::Done(r)) => r,
            Ok(Answer::ClaimAlone(Some(finished))) => {
                // As alone: once the finish has committed, a claim that cannot proceed
                // yields no work.
                let work = self
                    .claim_selector_alone(req, selector, None, &mut None)
                    .await
                    .map(|(_, claimed)| claimed)
                    .unwrap_or_default();
                Ok((Some(finished), work))
            }
            Ok(Answer::ClaimAlone(None)) => {
                self.claim_selector_alone(req, selector, None, &mut None)
                    .await
            }
            Ok(Answer::Alone) | Err(_) => {
                self.claim_selector_alone(req, selector, finish, &mut None)
                    .await
            }
        }
    }

    /// Cancel work a shared transaction claimed for a caller that has gone (a dropped claim is
    /// cancelled, as a dropped `Work`); if that fails, the work expires with its session.
    fn cancel_undelivered(&self, work: Vec<WorkInfo>) {
        if work.is_empty() {
            return;
        }
        let backend = self.clone();
        tokio::spawn(async move {
            let batch = Batch {
                preconditions: Vec::new(),
                ops: work
                    .into_iter()
                    .map(|w| Op::WorkRelease {
                        key: w.key,
                        process: w.process,
                        session_id: w.session_id,
                        token: w.token,
                        outcome: Outcome::Canceled,
                    })
                    .collect(),
                now: backend.clock.now(),
            };
            if let Err(e) = backend.commit(batch).await {
                tracing::debug!(error = %e, "cancelling an undelivered claim failed (it expires with its session)");
            }
        });
    }

    /// Run `taken` (claims of one process and selector, in arrival order) in one transaction and
    /// decide each (see the module documentation). A transaction that surely did not commit
    /// hands every claim back; one that did or may have answers every caller with its error.
    async fn claim_shared(&self, taken: &[Waiting], turn: Turn) -> Vec<Answer> {
        let answers = self.claim_shared_txn(taken, turn).await;
        match &answers {
            Some(_) => {
                self.claims.shared_txns.fetch_add(1, Ordering::Relaxed);
                self.claims
                    .shared_claims
                    .fetch_add(taken.len() as u64, Ordering::Relaxed);
            }
            None => {
                self.claims.shared_failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    claims = taken.len(),
                    "a shared claim transaction failed; each claim runs alone"
                );
            }
        }
        answers.unwrap_or_else(|| taken.iter().map(|_| Answer::Alone).collect())
    }

    /// The shared transaction; `None` when it wrote nothing (each claim runs alone).
    async fn claim_shared_txn(&self, taken: &[Waiting], turn: Turn) -> Option<Vec<Answer>> {
        let first = taken.first()?;
        let ClaimTarget::Selector(text) = &first.req.target else {
            return None;
        };
        let selector = Selector::parse(text).ok()?;
        let process = first.req.process.clone();
        // The latest time of the claims: each is as if it had come a moment later (its rows
        // keep its own time: `Slot::at`).
        let now = taken.iter().map(|w| w.req.now).max()?;
        let mut sessions: Vec<String> = Vec::new();
        for w in taken {
            if !sessions.contains(&w.req.session_id) {
                sessions.push(w.req.session_id.clone());
            }
        }
        let q = CandidateQuery {
            selector,
            process: process.clone(),
            exclude: Vec::new(),
            now,
            limit: taken.iter().map(|w| w.req.limit).sum(),
        };
        let (lock_sql, mut lock_params) = work::claim_lock_sql(&q, &sessions, &work::hand_start());
        let clock_hand = self.hands.hand(&process, &lock_sql);
        let limited = clock_hand.limited();
        let hand = clock_hand.get(now);
        lock_params.set_hand(&hand);
        // The finishes, in one statement: finish `f` is the `f`-th claim with one.
        let finishes: Vec<&FusedFinish> = taken.iter().filter_map(|w| w.finish.as_ref()).collect();
        let finish_params = (!finishes.is_empty()).then(|| FinishParams::new(&finishes));
        let mut f = 0;
        let slots: Vec<work::Slot> = taken
            .iter()
            .enumerate()
            .map(|(r, w)| work::Slot {
                r,
                sid: w.req.session_id.clone(),
                f: w.finish.as_ref().map(|_| {
                    f += 1;
                    f - 1
                }),
                n: w.req.limit,
                at: w.req.now,
            })
            .collect();
        let txn = ClaimTxn::run(
            self,
            (&lock_sql, &lock_params),
            finish_params.as_ref(),
            &work::claim_take_sql(&q, work::slots_json(&slots), work::Take::Lean, limited),
            limited.then_some(process.as_str()),
            Hooks {
                locked: None,
                taken: Some(Box::new(move || drop(turn))),
                gate: None,
            },
        )
        .await;
        let txn = match txn {
            Ok(txn) => txn,
            // It committed, or may have (the connection lost after it was sent). Nothing is
            // handed back to run again — a finish that committed would fail `WorkLost` alone,
            // and the work taken for it would be held for nobody: every caller gets the error,
            // as each would have alone.
            Err(RunFailure::Unknown(e)) | Err(RunFailure::Committed(e)) => {
                return Some(taken.iter().map(|_| Answer::Done(Err(e.clone()))).collect());
            }
            // Nothing of it was written: nothing was sent, or the server refused a statement
            // (the transaction rolled back). Each claim runs alone.
            Err(RunFailure::NotSent(_)) | Err(RunFailure::Sent(_)) => return None,
        };
        clock_hand.set_limited(txn.limited);
        clock_hand.advance_to(&hand, &txn.taken_keys(), now);
        let passed = |f: usize| txn.finished.as_ref().is_some_and(|done| done.passed(f));
        let assigned = work::assigned(&slots, txn.locked_n, |sid| txn.alive.contains(sid), passed);
        let mut took: HashMap<usize, Vec<WorkInfo>> = HashMap::new();
        for row in &txn.took {
            // Committed: a row that cannot be read is work nobody gets (it expires with its
            // session), as for a claim alone whose answer could not be read.
            let Some(r) = row
                .try_get::<_, i64>(5)
                .ok()
                .and_then(|r| usize::try_from(r).ok())
                .filter(|r| *r < taken.len())
            else {
                continue;
            };
            if let Ok(w) = crate::claimed_work(row, &taken[r].req, taken[r].req.now) {
                took.entry(r).or_default().push(w);
            }
        }
        let answers = taken
            .iter()
            .zip(&slots)
            .zip(assigned)
            .map(|((w, slot), assigned)| {
                let finished = match (&w.finish, slot.f, &txn.finished) {
                    (Some(fin), Some(f), Some(done)) => match fin.results(done, f) {
                        Ok(Some(results)) => Some(results),
                        // Its finish failed a check: nothing of it was written.
                        Ok(None) | Err(_) => return Answer::Alone,
                    },
                    _ => None,
                };
                let refused = |err: Error| {
                    Answer::Done(match &finished {
                        // As alone: a finish that passed commits, the claim yields nothing.
                        Some(results) => Ok((Some(results.clone()), Claimed::default())),
                        None => Err(err),
                    })
                };
                // In the order a claim alone checks: its session, then the process.
                if !txn.alive.contains(&w.req.session_id) {
                    return refused(Error::SessionExpired {
                        session_id: w.req.session_id.clone(),
                    });
                }
                if !txn.declared {
                    return refused(undeclared(&process));
                }
                match took.remove(&slot.r) {
                    Some(work) => Answer::Done(Ok((
                        finished,
                        Claimed::short_of(slot.n, work, txn.revision),
                    ))),
                    // Its candidates were all gone at the take (its session died meanwhile, or
                    // they stopped matching): ask again alone. Cut by its process's limit, it
                    // has its answer.
                    None if assigned > 0 && !txn.capped => Answer::ClaimAlone(finished),
                    None => Answer::Done(Ok((
                        finished,
                        Claimed::short_of(slot.n, Vec::new(), txn.revision),
                    ))),
                }
            })
            .collect();
        Some(answers)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fleetdb_core::work::{HistoryFilter, SessionInfo, WorkEvent};
    use fleetdb_core::{ObjectKey, PutMode, Timestamp};

    use super::*;
    use crate::testing;

    const SELECTOR: &str = "kind = job and has(ready)";

    fn key(i: usize) -> ObjectKey {
        ObjectKey::new("default", "job", format!("j{i:03}")).unwrap()
    }

    fn batch(ops: Vec<Op>, now: Timestamp) -> Batch {
        Batch {
            preconditions: Vec::new(),
            ops,
            now,
        }
    }

    /// Process `P`, `objects` jobs with the `ready` tag and sessions `s0..` alive for an hour.
    async fn seed(backend: &PostgresBackend, objects: usize, sessions: usize) {
        let now = backend.clock.now();
        let mut ops = vec![Op::ProcessDefine {
            name: "P".into(),
            conflicts: Vec::new(),
        }];
        for i in 0..objects {
            ops.push(Op::ObjectPut {
                key: key(i),
                labels: Default::default(),
                mode: PutMode::Upsert,
            });
            ops.push(Op::TagSet {
                key: key(i),
                name: "ready".into(),
                value: "true".into(),
            });
        }
        for s in 0..sessions {
            ops.push(Op::SessionStart {
                session: SessionInfo {
                    id: format!("s{s}"),
                    component: "test".into(),
                    host: "h".into(),
                    runtime_info: String::new(),
                    ttl_ms: 3_600_000,
                    created_at: now,
                    deadline: Timestamp(now.0 + 3_600_000_000),
                },
            });
        }
        backend.commit(batch(ops, now)).await.unwrap();
    }

    fn claim(backend: &PostgresBackend, session: &str) -> ClaimRequest {
        ClaimRequest {
            session_id: session.into(),
            process: "P".into(),
            target: ClaimTarget::Selector(SELECTOR.into()),
            limit: 1,
            now: backend.clock.now(),
        }
    }

    /// A worker's finish of `w`: delete its `ready` tag, release it (with `token`).
    fn finish(backend: &PostgresBackend, w: &WorkInfo, token: i64) -> Batch {
        Batch {
            preconditions: vec![fleetdb_core::Precondition::SessionAlive {
                session_id: w.session_id.clone(),
            }],
            ops: vec![
                Op::TagDelete {
                    key: w.key.clone(),
                    name: "ready".into(),
                },
                Op::WorkRelease {
                    key: w.key.clone(),
                    process: w.process.clone(),
                    session_id: w.session_id.clone(),
                    token,
                    outcome: Outcome::Finished,
                },
            ],
            now: backend.clock.now(),
        }
    }

    /// A worker's batch finish of `works` (all of one session): delete each one's `ready` tag,
    /// then release each.
    fn finish_many(backend: &PostgresBackend, works: &[WorkInfo]) -> Batch {
        let mut ops: Vec<Op> = works
            .iter()
            .map(|w| Op::TagDelete {
                key: w.key.clone(),
                name: "ready".into(),
            })
            .collect();
        ops.extend(works.iter().map(|w| Op::WorkRelease {
            key: w.key.clone(),
            process: w.process.clone(),
            session_id: w.session_id.clone(),
            token: w.token,
            outcome: Outcome::Finished,
        }));
        Batch {
            preconditions: vec![fleetdb_core::Precondition::SessionAlive {
                session_id: works[0].session_id.clone(),
            }],
            ops,
            now: backend.clock.now(),
        }
    }

    /// The key of `P`'s selector.
    fn group_key() -> GroupKey {
        ("P".to_string(), SELECTOR.to_string())
    }

    /// The first turn of `P`'s selector, as a claim alone in flight holds it.
    fn hold_first_turn(backend: &PostgresBackend) -> Turn {
        let key = group_key();
        assert!(matches!(
            backend.claims.enter(&key, &claim(backend, "s0"), None),
            Entered::First
        ));
        Turn {
            backend: backend.clone(),
            key,
        }
    }

    /// Both turns of `P`'s selector, as claims in flight hold them: claims made meanwhile wait.
    fn hold_turns(backend: &PostgresBackend) -> Vec<Turn> {
        let mut turns = vec![hold_first_turn(backend)];
        // The second turn, as a shared transaction started by claims waiting holds it.
        backend
            .claims
            .lock()
            .get_mut(&group_key())
            .unwrap()
            .in_flight = IN_FLIGHT_MAX;
        turns.extend((1..IN_FLIGHT_MAX).map(|_| Turn {
            backend: backend.clone(),
            key: group_key(),
        }));
        turns
    }

    /// Once the turns held are dropped, nothing of `P`'s selector is in flight or waiting.
    fn assert_turns_free(backend: &PostgresBackend) {
        assert!(
            backend.claims.lock().get(&group_key()).is_none(),
            "the turns are free"
        );
    }

    async fn until_waiting(backend: &PostgresBackend, n: usize) {
        let key = group_key();
        for _ in 0..500 {
            let waiting = backend
                .claims
                .lock()
                .get(&key)
                .map_or(0, |g| g.waiting.len());
            if waiting == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} claims never waited");
    }

    async fn history(backend: &PostgresBackend) -> Vec<fleetdb_core::work::HistoryEntry> {
        backend
            .history_list(&HistoryFilter::Process("P".into()), None, 10_000)
            .await
            .unwrap()
    }

    /// A claim of a limited process that waited for the process's row (held by another claim of
    /// it until that one commits) sees, after the wait, what the other took, and takes another
    /// candidate in ONE transaction. Locked inside find-and-lock, the wait came after the find's
    /// snapshot: it found the other's candidate free, locked it once the other committed, found
    /// it gone at the take and ran again — most claims of a busy limited process did (~340
    /// claims/s in the one-at-a-time benchmark, ~1,200 since).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_that_waited_for_its_limited_process_sees_what_the_holder_took() {
        let (backend, base, schema) = crate::test_backend(4).await;
        seed(&backend, 2, 2).await;
        let now = backend.clock.now();
        let limit = Op::ProcessLimit {
            name: "P".into(),
            max_active: Some(10),
        };
        backend.commit(batch(vec![limit], now)).await.unwrap();
        // A first claim (of j000) tells the hand the process is limited; it ends.
        let first = backend.claim(claim(&backend, "s0")).await.unwrap().work;
        assert_eq!(first.len(), 1);
        let cancel = Op::WorkRelease {
            key: first[0].key.clone(),
            process: "P".into(),
            session_id: "s0".into(),
            token: first[0].token,
            outcome: Outcome::Canceled,
        };
        backend.commit(batch(vec![cancel], now)).await.unwrap();
        // Another claim of P holds the process's row and takes j001, where the hand points next.
        let url = testing::schema_url(&base, &schema);
        let (other, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        other
            .batch_execute(
                "BEGIN; SELECT 1 FROM processes WHERE name = 'P' FOR UPDATE; \
                 INSERT INTO work (namespace, kind, id, process, session_id, token, started_at) \
                 VALUES ('default', 'job', 'j001', 'P', 's1', nextval('fleetdb_fencing'), 0)",
            )
            .await
            .unwrap();
        let before = backend.claims.txns.load(Ordering::Relaxed);
        let waiting = tokio::spawn({
            let b = backend.clone();
            async move { b.claim(claim(&b, "s0")).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "a claim of a limited process waits for its row"
        );
        other.batch_execute("COMMIT").await.unwrap();
        let got = waiting.await.unwrap().unwrap().work;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].key, key(0), "j001 is the other claim's");
        assert_eq!(
            backend.claims.txns.load(Ordering::Relaxed) - before,
            1,
            "one transaction: its find saw what the other took"
        );
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A process limited after its claimers last saw it unlimited: their next claim's take,
    /// planned without the limit's machinery, takes nothing (its gate), and the claim looks again
    /// with it, taking only the room left: the limit holds from the first claim after it was set.
    #[tokio::test]
    async fn a_limit_set_between_claims_holds_from_the_next_one() {
        let (backend, base, schema) = crate::test_backend(4).await;
        seed(&backend, 4, 2).await;
        let now = backend.clock.now();
        let release = |w: &WorkInfo| Op::WorkRelease {
            key: w.key.clone(),
            process: "P".into(),
            session_id: w.session_id.clone(),
            token: w.token,
            outcome: Outcome::Canceled,
        };
        // A claim of the unlimited process: its hand says so.
        let first = backend.claim(claim(&backend, "s0")).await.unwrap().work;
        backend
            .commit(batch(vec![release(&first[0])], now))
            .await
            .unwrap();
        // s1 holds one; then the process is limited to two.
        let held = backend.claim(claim(&backend, "s1")).await.unwrap().work;
        assert_eq!(held.len(), 1);
        let limit = Op::ProcessLimit {
            name: "P".into(),
            max_active: Some(2),
        };
        backend.commit(batch(vec![limit], now)).await.unwrap();
        let mut many = claim(&backend, "s0");
        many.limit = 3;
        let got = backend.claim(many).await.unwrap().work;
        assert_eq!(got.len(), 1, "the room left by the new limit");
        let live = backend
            .work_list(&fleetdb_core::work::WorkListing::new(Some("P"), 10))
            .await
            .unwrap();
        assert_eq!(live.len(), 2, "{live:?}");
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Twelve workers finish-and-claim 60 jobs through a pool of four: claims share
    /// transactions, every job is claimed and finished exactly once, with one `Started` and one
    /// `Finished` row each and distinct fencing tokens.
    #[tokio::test]
    async fn concurrent_workers_share_claims_and_take_each_job_once() {
        let (backend, base, schema) = crate::test_backend(4).await;
        seed(&backend, 60, 12).await;
        let mut tasks = Vec::new();
        for s in 0..12 {
            let b = backend.clone();
            tasks.push(tokio::spawn(async move {
                let session = format!("s{s}");
                let mut done = Vec::new();
                let mut next = b.claim(claim(&b, &session)).await.unwrap().work;
                while let Some(w) = next.pop() {
                    assert!(next.is_empty(), "a claim of one got more");
                    let (results, claimed) = b
                        .commit_then_claim(finish(&b, &w, w.token), claim(&b, &session))
                        .await
                        .unwrap();
                    assert_eq!(results.len(), 2, "the finish's results");
                    done.push((w.key.id.clone(), w.token));
                    next = claimed.work;
                    if next.is_empty() {
                        // Another worker may still be finishing: ask once more.
                        next = b.claim(claim(&b, &session)).await.unwrap().work;
                    }
                }
                done
            }));
        }
        let mut done = Vec::new();
        for t in tasks {
            done.extend(t.await.unwrap());
        }
        let mut ids: Vec<&str> = done.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 60, "each job once");
        assert_eq!(done.len(), 60, "no job twice");
        let mut tokens: Vec<i64> = done.iter().map(|(_, t)| *t).collect();
        tokens.sort_unstable();
        tokens.dedup();
        assert_eq!(tokens.len(), 60, "distinct fencing tokens");
        assert!(
            backend.claims.shared_txns.load(Ordering::Relaxed) > 0,
            "no claim shared a transaction"
        );
        let h = history(&backend).await;
        for event in [WorkEvent::Started, WorkEvent::Finished] {
            assert_eq!(
                h.iter().filter(|e| e.event == event).count(),
                60,
                "{event:?}"
            );
        }
        assert!(backend
            .work_list(&fleetdb_core::work::WorkListing::new(None, 100))
            .await
            .unwrap()
            .is_empty());
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// While one claim transaction is in flight, claims wait for its turn; once
    /// [`SECOND_MIN`] wait, the last to arrive starts a second transaction for all of them
    /// at once, without waiting for the first.
    #[tokio::test]
    async fn a_second_transaction_starts_once_enough_claims_wait() {
        let (backend, base, schema) = crate::test_backend(4).await;
        seed(&backend, 10, SECOND_MIN).await;
        // Only the count: a slow machine must not start it early by the clock.
        backend
            .claims
            .second_after_us
            .store(3_600_000_000, Ordering::Relaxed);
        let first = hold_first_turn(&backend);
        let spawn = |s: usize| {
            let b = backend.clone();
            tokio::spawn(async move { b.claim(claim(&b, &format!("s{s}"))).await })
        };
        let mut tasks: Vec<_> = (0..SECOND_MIN - 1).map(spawn).collect();
        until_waiting(&backend, SECOND_MIN - 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(backend.claims.shared_txns.load(Ordering::Relaxed), 0);
        assert!(
            tasks.iter().all(|t| !t.is_finished()),
            "a claim did not wait"
        );
        tasks.push(spawn(SECOND_MIN - 1));
        let got = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks))
            .await
            .expect("the waiting claims waited for the first turn");
        for claimed in got {
            assert_eq!(claimed.unwrap().unwrap().work.len(), 1);
        }
        assert_eq!(backend.claims.shared_txns.load(Ordering::Relaxed), 1);
        assert_eq!(
            backend.claims.shared_claims.load(Ordering::Relaxed),
            SECOND_MIN as u64
        );
        drop(first);
        assert_turns_free(&backend);
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A shared transaction's check-and-take is lean (`work::Take::Lean`): when its first
    /// candidate is still held by a dead session, the insert fails, the transaction hands its
    /// claims back, and alone they take that row over (with its `Expired` history) and the rest.
    /// Alone, one may lock the row just after another took it over, with a snapshot from before:
    /// its take finds it gone, and it moves on to the next candidate instead of coming back
    /// empty (before that rule, about two runs in five of this test had an empty claim).
    #[tokio::test]
    async fn shared_claims_behind_a_dead_sessions_claim_still_get_work() {
        let (backend, base, schema) = crate::test_backend(4).await;
        seed(&backend, 10, SECOND_MIN).await;
        crate::seed_dead_claim(&backend.client().await.unwrap(), "j000", 1).await;
        backend
            .claims
            .second_after_us
            .store(3_600_000_000, Ordering::Relaxed);
        let first = hold_first_turn(&backend);
        let tasks: Vec<_> = (0..SECOND_MIN)
            .map(|s| {
                let b = backend.clone();
                tokio::spawn(async move { b.claim(claim(&b, &format!("s{s}"))).await })
            })
            .collect();
        let got = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks))
            .await
            .expect("the claims got answers");
        let mut ids: Vec<String> = Vec::new();
        for claimed in got {
            let work = claimed.unwrap().unwrap().work;
            assert_eq!(work.len(), 1);
            ids.push(work[0].key.id.clone());
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), SECOND_MIN, "each claim its own job");
        assert!(ids.contains(&"j000".to_string()), "{ids:?}");
        assert!(backend.claims.shared_failed.load(Ordering::Relaxed) >= 1);
        let taken_over: Vec<(WorkEvent, String)> = history(&backend)
            .await
            .into_iter()
            .filter(|e| e.key.id == "j000")
            .map(|e| (e.event, e.session_id))
            .collect();
        assert!(
            taken_over
                .iter()
                .any(|(e, sid)| *e == WorkEvent::Expired && sid == "dead"),
            "{taken_over:?}"
        );
        drop(first);
        assert_turns_free(&backend);
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A claim that has waited [`SECOND_AFTER`] behind the transaction in flight starts the
    /// second transaction itself, though fewer than [`SECOND_MIN`] wait and no claim arrives.
    #[tokio::test]
    async fn a_second_transaction_starts_once_a_claim_waited_long() {
        let (backend, base, schema) = crate::test_backend(4).await;
        seed(&backend, 10, 1).await;
        let first = hold_first_turn(&backend);
        let claimed = tokio::time::timeout(
            Duration::from_secs(30),
            backend.claim(claim(&backend, "s0")),
        )
        .await
        .expect("the claim waited for the first turn")
        .unwrap();
        assert_eq!(claimed.work.len(), 1);
        assert_eq!(backend.claims.shared_txns.load(Ordering::Relaxed), 1);
        drop(first);
        assert_turns_free(&backend);
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Batch claims and batch finish-and-claims of one selector through a pool of two
    /// connections all get done: a claim queued for its hand's turn may hold a connection (and,
    /// behind a finish, row locks), so the turn's holder must never wait for one (it took the
    /// turn before its connection once, and these six workers stopped for good).
    #[tokio::test]
    async fn batch_claims_never_wait_for_each_other_through_a_small_pool() {
        let (backend, base, schema) = crate::test_backend(2).await;
        seed(&backend, 600, 6).await;
        let mut tasks = Vec::new();
        for s in 0..6 {
            let b = backend.clone();
            tasks.push(tokio::spawn(async move {
                let session = format!("s{s}");
                let req = || ClaimRequest {
                    limit: 20,
                    ..claim(&b, &session)
                };
                let mut done = 0;
                let mut next = b.claim(req()).await.unwrap().work;
                while !next.is_empty() {
                    let batch = finish_many(&b, &next);
                    done += next.len();
                    next = match s % 2 {
                        // Half finish and claim in one transaction, half one after the other.
                        0 => b.commit_then_claim(batch, req()).await.unwrap().1.work,
                        _ => {
                            b.commit(batch).await.unwrap();
                            b.claim(req()).await.unwrap().work
                        }
                    };
                }
                done
            }));
        }
        let done = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(tasks))
            .await
            .expect("the workers waited for each other for ever");
        let done: usize = done.into_iter().map(|d| d.unwrap()).sum();
        assert_eq!(done, 600);
        assert!(backend
            .work_list(&fleetdb_core::work::WorkListing::new(None, 10))
            .await
            .unwrap()
            .is_empty());
        let h = history(&backend).await;
        assert_eq!(
            h.iter().filter(|e| e.event == WorkEvent::Finished).count(),
            600
        );
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Claims sharing a transaction run at the latest of their times, but each claim's rows
    /// (`started_at`, the `Started` history) keep its own time: how a session tells the rows
    /// of its claim whose answer was lost from its others' (before, every row got the group's
    /// time, and only the latest caller's lost claim was taken up).
    #[tokio::test]
    async fn claims_sharing_a_transaction_keep_their_own_times() {
        let (backend, base, schema) = crate::test_backend(4).await;
        seed(&backend, 5, 2).await;
        let turns = hold_turns(&backend);
        let base_now = backend.clock.now();
        let mut tasks = Vec::new();
        for (i, s) in ["s0", "s1", "s0"].into_iter().enumerate() {
            let b = backend.clone();
            let req = ClaimRequest {
                now: Timestamp(base_now.0 + 1_000 * i as i64),
                ..claim(&backend, s)
            };
            tasks.push(tokio::spawn(async move { b.claim(req).await }));
            until_waiting(&backend, i + 1).await;
        }
        drop(turns);
        let mut times = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let got = t.await.unwrap().unwrap().work;
            assert_eq!(got.len(), 1);
            let at = Timestamp(base_now.0 + 1_000 * i as i64);
            assert_eq!(got[0].started_at, at, "claim {i}'s answer");
            times.push((got[0].key.clone(), at));
        }
        assert_eq!(backend.claims.shared_txns.load(Ordering::Relaxed), 1);
        let rows = backend
            .work_list(&fleetdb_core::work::WorkListing::new(None, 100))
            .await
            .unwrap();
        let h = history(&backend).await;
        for (key, at) in times {
            let row = rows.iter().find(|w| w.key == key).unwrap();
            assert_eq!(row.started_at, at, "{key}'s row");
            let started = h.iter().find(|e| e.key == key).unwrap();
            assert_eq!(started.at, at, "{key}'s Started");
        }
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// In one shared transaction: a finish with a stale token is handed back (alone, the
    /// general path names it: `WorkLost`, nothing written); a claim of a session that is gone
    /// gets `SessionExpired`; the good finish-and-claim next to them commits and gets work.
    #[tokio::test]
    async fn a_failing_claim_does_not_take_its_neighbours_down() {
        let (backend, base, schema) = crate::test_backend(4).await;
        seed(&backend, 5, 2).await;
        let mut held = Vec::new();
        for s in ["s0", "s1"] {
            held.extend(backend.claim(claim(&backend, s)).await.unwrap().work);
        }
        assert_eq!(held.len(), 2);
        let turns = hold_turns(&backend);
        let (good, stale) = (held[0].clone(), held[1].clone());
        let b = backend.clone();
        let good_task = tokio::spawn(async move {
            b.commit_then_claim(finish(&b, &good, good.token), claim(&b, &good.session_id))
                .await
        });
        until_waiting(&backend, 1).await;
        let b = backend.clone();
        let stale_task = tokio::spawn(async move {
            b.commit_then_claim(finish(&b, &stale, stale.token - 1000), claim(&b, "s1"))
                .await
        });
        until_waiting(&backend, 2).await;
        let b = backend.clone();
        let gone_task = tokio::spawn(async move { b.claim(claim(&b, "no-such-session")).await });
        until_waiting(&backend, 3).await;
        drop(turns);

        let (results, next) = good_task.await.unwrap().unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(next.work.len(), 1, "the good one's next claim");
        let err = stale_task.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::WorkLost { .. }), "{err}");
        let err = gone_task.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::SessionExpired { .. }), "{err}");
        assert_eq!(backend.claims.shared_txns.load(Ordering::Relaxed), 1);
        // The stale finish wrote nothing and its claim took nothing: s1 holds its one job, its
        // tag is there; s0 holds its next one.
        let held_now = backend
            .work_list(&fleetdb_core::work::WorkListing::new(None, 100))
            .await
            .unwrap();
        let of = |s: &str| held_now.iter().filter(|w| w.session_id == s).count();
        assert_eq!((of("s0"), of("s1")), (1, 1), "{held_now:?}");
        assert!(held_now
            .iter()
            .any(|w| w.key == held[1].key && w.session_id == "s1"));
        assert!(backend
            .tag_get(&held[1].key, "ready")
            .await
            .unwrap()
            .is_some());
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Shared claims check what a claim alone checks, in its order: claims of sessions that are
    /// gone, for a process never declared, get `SessionExpired` (as alone), not the process's
    /// error.
    #[tokio::test]
    async fn a_shared_claim_checks_its_session_before_its_process() {
        let (backend, base, schema) = crate::test_backend(4).await;
        let turns = hold_turns(&backend);
        let mut tasks = Vec::new();
        for (i, s) in ["gone-1", "gone-2"].into_iter().enumerate() {
            let b = backend.clone();
            tasks.push(tokio::spawn(async move { b.claim(claim(&b, s)).await }));
            until_waiting(&backend, i + 1).await;
        }
        drop(turns);
        for t in tasks {
            let err = t.await.unwrap().unwrap_err();
            assert!(matches!(err, Error::SessionExpired { .. }), "{err}");
        }
        assert_eq!(backend.claims.shared_txns.load(Ordering::Relaxed), 1);
        // Alone, the same.
        let err = backend.claim(claim(&backend, "gone-3")).await.unwrap_err();
        assert!(matches!(err, Error::SessionExpired { .. }), "{err}");
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A claim whose caller gave up while it waited still runs in the shared transaction, and
    /// the work it got is cancelled: nothing stays held for nobody.
    #[tokio::test]
    async fn work_claimed_for_a_caller_that_gave_up_is_cancelled() {
        let (backend, base, schema) = crate::test_backend(4).await;
        seed(&backend, 1, 1).await;
        let turns = hold_turns(&backend);
        let b = backend.clone();
        let gave_up = tokio::spawn(async move { b.claim(claim(&b, "s0")).await });
        until_waiting(&backend, 1).await;
        gave_up.abort();
        assert!(gave_up.await.unwrap_err().is_cancelled());
        drop(turns);
        for _ in 0..500 {
            let h = history(&backend).await;
            if h.iter().any(|e| e.event == WorkEvent::Canceled) {
                assert!(h.iter().any(|e| e.event == WorkEvent::Started));
                assert!(backend
                    .work_list(&fleetdb_core::work::WorkListing::new(None, 10))
                    .await
                    .unwrap()
                    .is_empty());
                let again = backend.claim(claim(&backend, "s0")).await.unwrap();
                assert_eq!(again.work.len(), 1, "the job is free again");
                drop(backend);
                testing::drop_schema(&base, &schema).await.unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the undelivered claim was never cancelled");
    }
}
