//! The write path and its group commit.
//!
//! SQLite allows one writer at a time, and a durable commit costs one fsync. A caller queues its
//! write, then tries to take the write connection without waiting. If it gets it, it commits a
//! group (its write and whatever else is waiting) on its own thread: a lone writer pays no hand-off
//! between threads, which on a VM costs more than the statements. If the connection is taken, it
//! wakes the writer thread, which commits groups until the queue is empty. A group takes every
//! write that is waiting (up to [`GROUP_JOBS_MAX`]), runs each inside its own SAVEPOINT of ONE
//! transaction and commits once: many logical transactions share one fsync. Every queued write
//! either commits on its caller's thread or has woken the writer, so none is left behind.
//! A caller never waits on its thread for another process's write lock: it runs on an async
//! runtime (the CLI's has one thread, which also renews the session and watches the worker's
//! command). The write connection has no busy timeout; if another process holds the lock, the
//! writer thread takes the group and waits for the lock there (the busy timeout set for that
//! BEGIN only, [`GROUP_ATTEMPTS_MAX`] times).
//! A request that fails rolls back to its savepoint and gets its error; its neighbours commit.
//! Every caller is answered only after the group's COMMIT returned, i.e. after its data is durable.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use fleetdb_core::apply::{apply_batch, apply_claim, apply_sweep, claim_precheck};
use fleetdb_core::work::{ClaimRequest, Claimed};
use fleetdb_core::{Batch, Error, OpResult, Result, Timestamp};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::rows::SqliteRows;
use crate::{current_revision, map_err};

/// Most write requests committed together in one group.
pub const GROUP_JOBS_MAX: usize = 256;
/// Most writes (ops) in one group, and most bytes of their content ([`Batch`] ops'
/// `payload_bytes`): the defaults of one transaction's limits (`Limits::txn_ops_max`,
/// `txn_bytes_max`). A request is added to a group only while the group stays within both (a
/// first request always goes, alone if it is larger), so the database's write lock is held for
/// about one large transaction at most. Unbounded, a backlog of large transactions (`object
/// import --jobs 16`: 16 of 10,000 writes) went into ONE transaction that held the lock 16 times
/// as long, and other processes' sessions expired waiting to renew.
pub const GROUP_WRITES_MAX: usize = 10_000;
pub const GROUP_BYTES_MAX: usize = fleetdb_core::batch::TXN_BYTES_MAX_DEFAULT;
/// Attempts at a group that finds the database busy (another process writing) past busy_timeout.
const GROUP_ATTEMPTS_MAX: u32 = 5;
/// How often the writer thread tries again to take a write lock another process holds.
const BUSY_POLL: std::time::Duration = std::time::Duration::from_millis(1);
/// A group that held the write lock this long is followed by [`YIELD_AFTER_LONG`] without it,
/// in which other processes polling for the lock (every [`BUSY_POLL`]) take it. Back to back,
/// a backlog's groups left them microseconds between a COMMIT and the next BEGIN, which their
/// polls (SQLite's busy handler sleeps up to 100 ms between tries) never hit: a process writing
/// without pause starved every other one past its sessions' TTL.
/// Only a bulk group yields (at least [`BULK_WRITES`] writes): a group of a few small writes
/// held long by a slow `fsync` is not a backlog, and pausing after it only delayed the writes
/// queued behind it (one-at-a-time shape, 3 alternating pairs: −1 to −7.5 % with every long
/// group yielding).
const LONG_HOLD: std::time::Duration = std::time::Duration::from_millis(20);
const YIELD_AFTER_LONG: std::time::Duration = std::time::Duration::from_millis(3);
const BULK_WRITES: usize = 1_000;

/// A write that joins a group: each runs in its own savepoint.
pub(crate) enum Write {
    Batch(Batch),
    Claim(ClaimRequest),
    /// A batch, then (if it applied) a claim, in the same savepoint.
    BatchThenClaim(Batch, ClaimRequest),
    Renew {
        ids: Vec<String>,
        now: Timestamp,
    },
    Sweep {
        now: Timestamp,
        limit: usize,
    },
}

impl Write {
    /// Its writes and the bytes of their content, counted against a group's bounds.
    fn size(&self) -> (usize, usize) {
        let batch = |b: &Batch| {
            let bytes = b.ops.iter().map(|op| op.payload_bytes()).sum();
            (b.ops.len().max(1), bytes)
        };
        match self {
            Write::Batch(b) => batch(b),
            Write::BatchThenClaim(b, _) => {
                let (w, bytes) = batch(b);
                (w + 1, bytes)
            }
            Write::Claim(_) | Write::Renew { .. } | Write::Sweep { .. } => (1, 0),
        }
    }
}

/// What a [`Write`] returns.
pub(crate) enum Written {
    Batch(Vec<OpResult>),
    Claim(Claimed),
    BatchThenClaim(Vec<OpResult>, Claimed),
    Renew(Vec<(String, Timestamp)>),
    Sweep(fleetdb_core::backend::Swept),
}

pub(crate) type Reply = oneshot::Sender<Result<Written>>;

/// Writes waiting for a leader, and the writer thread that leads when callers contend.
pub(crate) struct Queue {
    waiting: Mutex<VecDeque<(Write, Reply)>>,
    wake: std::sync::mpsc::SyncSender<()>,
    /// How long the writer thread's BEGIN waits for another process's write lock (the write
    /// connection itself has no busy timeout: see [`begin`]).
    busy_timeout: std::time::Duration,
    /// The checkpointer found the WAL past its limit: the next group's leader checkpoints on the
    /// write connection after its commit (see `Checkpointer`).
    wal_restart: AtomicBool,
    /// Writes run again after their group failed transiently (another process held the write
    /// lock past the busy timeout): `Backend::retries`, which the store adds to
    /// `fleetdb_transactions_retried_total`.
    pub(crate) retries: AtomicU64,
}

impl Queue {
    /// The queue and the receiving end the writer thread waits on.
    pub(crate) fn new(busy_timeout: std::time::Duration) -> (Queue, std::sync::mpsc::Receiver<()>) {
        let (wake, rx) = std::sync::mpsc::sync_channel(1);
        (
            Queue {
                waiting: Mutex::default(),
                wake,
                busy_timeout,
                wal_restart: AtomicBool::new(false),
                retries: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// The next group: waiting requests in order, within [`GROUP_JOBS_MAX`],
    /// [`GROUP_WRITES_MAX`] and [`GROUP_BYTES_MAX`] (the first one whatever its size).
    fn take_group(&self) -> Vec<(Write, Reply)> {
        let mut q = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let (mut n, mut writes, mut bytes) = (0, 0, 0);
        for (w, _) in q.iter().take(GROUP_JOBS_MAX) {
            let (ww, wb) = w.size();
            if n > 0 && (writes + ww > GROUP_WRITES_MAX || bytes + wb > GROUP_BYTES_MAX) {
                break;
            }
            (n, writes, bytes) = (n + 1, writes + ww, bytes + wb);
        }
        q.drain(..n).collect()
    }

    /// Put a group its leader could not run back at the front of the queue, in its order.
    fn hand_back(&self, group: Vec<(Write, Reply)>) {
        let mut q = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        for w in group.into_iter().rev() {
            q.push_front(w);
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Ask the next group's leader to finish a checkpoint (see `Checkpointer`).
    pub(crate) fn want_wal_restart(&self) {
        self.wal_restart.store(true, Ordering::Release);
    }

    /// After a group, on the write connection: if the checkpointer asked, copy what its own pass
    /// left (the frames appended meanwhile). No frame of this process is appended while the
    /// leader holds the connection, and a RESTART checkpoint also takes the database's write lock
    /// (without waiting: the connection has no busy timeout) so that no other process appends
    /// either. So this copies every frame (unless another process holds the lock or a reader
    /// still reads an older snapshot: then it copies what it can and a later pass asks again)
    /// and the next write starts the WAL over.
    fn finish_wal_restart(&self, c: &Connection) {
        if self.wal_restart.swap(false, Ordering::AcqRel) {
            if let Err(e) = c.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())) {
                tracing::debug!(error = %e, "WAL restart checkpoint failed; retrying later");
            }
        }
    }

    fn wake_writer(&self) {
        // A full channel means a wake-up is pending already.
        let _ = self.wake.try_send(());
    }

    /// Queue a write. If the connection is free, commit a group at once on the caller's thread
    /// (a lone writer pays no hand-off between threads); otherwise the writer thread will.
    pub(crate) fn submit(&self, conn: &Mutex<Connection>, write: Write, reply: Reply) {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((write, reply));
        let mut c = match conn.try_lock() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.wake_writer();
                return;
            }
        };
        let mut group = self.take_group();
        if let Err(Busy) = flush(&mut c, &mut group, Lead::Caller, &self.retries) {
            // Another process holds the write lock: the writer thread waits for it, not this
            // caller's thread.
            self.hand_back(group);
        } else {
            self.finish_wal_restart(&c);
        }
        drop(c);
        // Writes queued meanwhile (their callers found the connection taken and woke the writer,
        // or will), or handed back: make sure the writer looks.
        if !self.is_empty() {
            self.wake_writer();
        }
    }

    /// The writer thread's loop: on each wake-up, commit groups until the queue is empty. Ends
    /// when the queue is dropped.
    pub(crate) fn writer_loop(
        this: std::sync::Weak<Queue>,
        conn: std::sync::Arc<Mutex<Connection>>,
        wake: std::sync::mpsc::Receiver<()>,
    ) {
        while wake.recv().is_ok() {
            let Some(q) = this.upgrade() else { return };
            loop {
                let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
                let mut group = q.take_group();
                if group.is_empty() {
                    break;
                }
                // The writer thread waits for the lock: never handed back.
                let _ = flush(&mut c, &mut group, Lead::Writer(q.busy_timeout), &q.retries);
                q.finish_wal_restart(&c);
            }
        }
    }
}

/// Who runs a group, and so how its BEGIN waits for another process's write lock.
#[derive(Clone, Copy)]
enum Lead {
    /// A caller on its own (async runtime's) thread: the BEGIN does not wait.
    Caller,
    /// The writer thread: the BEGIN waits up to this long.
    Writer(std::time::Duration),
}

/// A caller's group found another process holding the write lock: nothing ran, every request
/// is still unanswered in the group.
struct Busy;

/// BEGIN IMMEDIATE: take the database's write lock for a group, waiting for it only if `lead`
/// may. `Ok(false)` when another process holds it and `lead` may not wait.
///
/// The write connection has no busy timeout (`SqliteBackend::open`), so the first try never
/// waits; only the writer thread, finding the lock taken, tries again with its timeout. (Setting
/// the timeout is one C call, but the uncontended path, thousands of groups a second, makes none.)
fn begin(c: &Connection, lead: Lead) -> Result<bool> {
    if !c.is_autocommit() {
        // Left open by something that did not end it: nothing of it was answered as committed.
        let _ = c.execute_batch("ROLLBACK");
    }
    let first = c
        .prepare_cached("BEGIN IMMEDIATE")
        .and_then(|mut s| s.raw_execute());
    match (first, lead) {
        (Ok(_), _) => Ok(true),
        (Err(e), Lead::Caller) if is_busy(&e) => Ok(false),
        (Err(e), Lead::Writer(busy_timeout)) if is_busy(&e) => {
            // Polled every BUSY_POLL rather than with SQLite's busy handler, whose sleeps grow
            // to 100 ms and miss the short gaps another process's writer leaves.
            let deadline = std::time::Instant::now() + busy_timeout;
            loop {
                std::thread::sleep(BUSY_POLL);
                match c
                    .prepare_cached("BEGIN IMMEDIATE")
                    .and_then(|mut s| s.raw_execute())
                {
                    Ok(_) => return Ok(true),
                    Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {}
                    Err(e) => return Err(map_err(e)),
                }
            }
        }
        (Err(e), _) => Err(map_err(e)),
    }
}

/// Whether `e` says another connection holds a lock this one needs.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(e, _) if matches!(
            e.code,
            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
        )
    )
}

/// Run `group` in one transaction and answer each of its callers, retrying a group that failed
/// as a whole with a retryable error (each of its writes run again counted in `retries`).
/// `Err(Busy)` only for [`Lead::Caller`]: another process holds the write lock; the group is
/// untouched and unanswered.
fn flush(
    c: &mut Connection,
    group: &mut Vec<(Write, Reply)>,
    lead: Lead,
    retries: &AtomicU64,
) -> Result<(), Busy> {
    if group.is_empty() {
        return Ok(());
    }
    let mut attempt = 0;
    let mut held = std::time::Duration::ZERO;
    let bulk = group.iter().map(|(w, _)| w.size().0).sum::<usize>() >= BULK_WRITES;
    let results = loop {
        attempt += 1;
        // A panic in a write (none is known) must not leave the connection inside a
        // transaction, nor its callers waiting: it rolls back and fails the group.
        let ran =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match begin(c, lead)? {
                true => {
                    let start = std::time::Instant::now();
                    let ran = run_group(c, group).map(Some);
                    held = start.elapsed();
                    ran
                }
                false => Ok(None),
            }))
            .unwrap_or_else(|panic| {
                if !c.is_autocommit() {
                    let _ = c.execute_batch("ROLLBACK");
                }
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                Err(Error::Backend(format!(
                    "a write failed inside SQLite's writer: {what}"
                )))
            });
        match ran {
            Ok(Some(results)) => break results,
            Ok(None) => return Err(Busy),
            // On a caller's thread a retry would wait for the lock: the writer thread retries.
            Err(e) if e.is_retryable() && matches!(lead, Lead::Caller) => return Err(Busy),
            Err(e) if e.is_retryable() && attempt < GROUP_ATTEMPTS_MAX => {
                tracing::debug!(attempt, error = %e, "sqlite group commit retry");
                retries.fetch_add(group.len() as u64, Ordering::Relaxed);
                continue;
            }
            Err(e) => break group.iter().map(|_| Err(e.clone())).collect(),
        }
    };
    for ((_, reply), result) in group.drain(..).zip(results) {
        let _ = reply.send(result); // the caller may have gone away; its write still committed
    }
    if bulk && held >= LONG_HOLD {
        std::thread::sleep(YIELD_AFTER_LONG);
    }
    Ok(())
}

/// Run a fixed statement (BEGIN, SAVEPOINT, COMMIT …) from the statement cache: no parsing per
/// group, which matters at thousands of groups per second.
fn exec(c: &Connection, sql: &str) -> Result<()> {
    c.prepare_cached(sql)
        .and_then(|mut s| s.raw_execute())
        .map(|_| ())
        .map_err(map_err)
}

fn apply_one(c: &mut Connection, write: &Write, revision: &mut i64) -> Result<Written> {
    match write {
        Write::Batch(batch) => {
            let mut rows = SqliteRows { conn: c, revision };
            futures::executor::block_on(apply_batch(&mut rows, batch)).map(Written::Batch)
        }
        Write::Claim(req) => {
            let work = {
                let mut rows = SqliteRows { conn: c, revision };
                futures::executor::block_on(apply_claim(&mut rows, req))?
            };
            claimed(c, req, work).map(Written::Claim)
        }
        Write::BatchThenClaim(batch, req) => {
            let results = {
                let mut rows = SqliteRows { conn: c, revision };
                futures::executor::block_on(apply_batch(&mut rows, batch))?
            };
            // Once the batch applied, a claim that cannot proceed (an undeclared process, say)
            // takes nothing and the batch stands, as on PostgreSQL (`Backend::commit_then_claim`):
            // its checks run first, read only (no savepoint: its sub-journal cost a quarter of
            // the one-at-a-time throughput).
            let work = {
                let mut rows = SqliteRows { conn: c, revision };
                futures::executor::block_on(async {
                    match claim_precheck(&mut rows, req).await {
                        Ok(()) => apply_claim(&mut rows, req).await,
                        // A check the claim fails: it takes nothing, the batch stands. A storage
                        // error is not a check: it fails the request, batch included.
                        Err(
                            e @ (fleetdb_core::Error::SessionExpired { .. }
                            | fleetdb_core::Error::Invalid { .. }
                            | fleetdb_core::Error::NotFound { .. }
                            | fleetdb_core::Error::Refused { .. }),
                        ) => {
                            tracing::debug!(error = %e, "the claim behind a batch took nothing");
                            Ok((Vec::new(), 0))
                        }
                        Err(e) => Err(e),
                    }
                })?
            };
            Ok(Written::BatchThenClaim(results, claimed(c, req, work)?))
        }
        Write::Renew { ids, now } => crate::work::session_renew(c, ids, *now).map(Written::Renew),
        Write::Sweep { now, limit } => {
            let mut rows = SqliteRows { conn: c, revision };
            futures::executor::block_on(apply_sweep(&mut rows, *now, *limit)).map(Written::Sweep)
        }
    }
}

/// A claim's answer: a claim that got less than its limit also says the revision it looked at
/// (read in the same transaction: the single writer sees every commit before it).
fn claimed(
    c: &Connection,
    req: &ClaimRequest,
    (work, expired): (Vec<fleetdb_core::work::WorkInfo>, u64),
) -> Result<Claimed> {
    let revision = match work.len() < req.limit {
        true => Some(current_revision(c)?.current),
        false => None,
    };
    Ok(Claimed {
        work,
        revision,
        expired,
        unknown: false,
    })
}

/// One transaction for the whole group, begun by the caller ([`begin`]). With several requests
/// each runs in its own savepoint, so a failing one rolls back alone; a lone request needs no
/// savepoint (its failure rolls back the transaction).
fn run_group(c: &mut Connection, group: &[(Write, Reply)]) -> Result<Vec<Result<Written>>> {
    let single = group.len() == 1;
    let outcome = (|| {
        let mut revision = current_revision(c)?.current.0;
        let mut results = Vec::with_capacity(group.len());
        for (write, _) in group {
            if !single {
                exec(c, "SAVEPOINT fleetdb_txn")?;
            }
            let before = revision;
            match apply_one(c, write, &mut revision) {
                Ok(r) => {
                    if !single {
                        exec(c, "RELEASE fleetdb_txn")?;
                    }
                    results.push(Ok(r));
                }
                Err(e) if c.is_autocommit() => {
                    // The failure ended the whole transaction (a full disk, an I/O error):
                    // nothing of the group is kept, and every request gets this error.
                    return Err(e);
                }
                Err(e) => {
                    if !single {
                        exec(c, "ROLLBACK TO fleetdb_txn")?;
                        exec(c, "RELEASE fleetdb_txn")?;
                    }
                    revision = before;
                    results.push(Err(e));
                }
            }
        }
        Ok(results)
    })();
    match outcome {
        // A lone request that failed: nothing to keep.
        Ok(results) if single && results[0].is_err() => {
            exec(c, "ROLLBACK")?;
            Ok(results)
        }
        Ok(results) => match exec(c, "COMMIT") {
            Ok(()) => Ok(results),
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK");
                Err(e)
            }
        },
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}
