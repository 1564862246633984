//! The hot path of lone, unconditional, persistent key-value sets (`PostgresBackend::commit`
//! sends every batch of exactly that shape here).
//!
//! **One set** is ONE statement ([`UPSERT_ONE`]): an `UPDATE` whose SET list captures the
//! replaced value (`prev_data = data`, migration 0009) and takes the revision (`nextval`), or,
//! for a key absent from the statement's snapshot, an `INSERT … ON CONFLICT DO NOTHING`. Under
//! READ COMMITTED an UPDATE that meets a concurrent writer of the row waits for its commit and
//! then re-evaluates its conditions and SET list on the row version it finally replaces, so the
//! change-log row's previous value and the revision order of one key follow the commits without
//! locking the row first.
//!
//! **Sets waiting at once** share a transaction: whoever gets a connection takes every queued
//! set (up to [`COMBINE_MAX`]) and sends `BEGIN`, one [`UPSERT_ONE`] per set (in key order) and
//! `COMMIT` pipelined in one round trip, on a spawned task (a caller that gives up cannot strand
//! the others), which answers each set's caller. Under load a commit (and its WAL flush) and a
//! round trip carry several sets, each still its own prepared single-key statement (a statement
//! over arrays of keys was tried: its generic plan, made while `world` was nearly empty,
//! scanned every key-value row). Two rules keep it the same as sets run alone:
//! - at most one set per key in a transaction, and no key in two transactions of this process
//!   at once (`in_flight`): sets of one key run in their callers' order of arrival at the
//!   queue, and two such transactions never wait on each other's rows;
//! - a set the transaction cannot decide (another writer created the key meanwhile, or changed
//!   it between the statement's snapshot and its update), or any set of a transaction the
//!   server refused (nothing of it was written), is handed back to its caller, which runs it
//!   alone (with retries). A set the transaction wrote is never handed back, nor one whose
//!   transaction's outcome is unknown (the connection failed after the COMMIT may have reached
//!   the server): its caller gets `Unavailable` (run again, it could be applied twice, after a
//!   later writer's set).
//!
//! A set that finds nothing waiting or being written runs alone at once, and so does a queue of
//! one: one client pays nothing for the sharing.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use fleetdb_core::world::{Space, WorldRecord};
use fleetdb_core::{Applied, Error, OpResult, Result, Revision, Timestamp};
use tokio::sync::{oneshot, Notify};
use tokio_postgres::Row;

use crate::error::{db_err, pool_err};
use crate::sql::{self, Param};
use crate::PostgresBackend;

/// Sets one shared transaction writes at most.
pub(crate) const COMBINE_MAX: usize = 16;

/// The parts [`UPSERT_ONE`] and [`UPDATE_ONE`] share, so they decide alike: the update of an
/// existing, unbound key whose value differs (capturing the value it replaces), its change-log
/// row, and the row telling why an existing key was not updated (from the snapshot).
macro_rules! kv_update_cte {
    () => {
        "WITH up AS (UPDATE world w SET prev_data = w.data, data = $2, meta = NULL, \
            revision = nextval('fleetdb_revision'), updated_at = $4 \
            WHERE w.space = 'kv' AND w.key = $1 AND w.data <> $2 \
              AND w.session_id IS NULL AND w.expires_at IS NULL \
            RETURNING w.revision, w.create_revision, w.created_at, w.updated_at, w.prev_data), "
    };
}
macro_rules! kv_update_change {
    () => {
        "SELECT revision, '.kv', '', $1, 'kv', '', 'put', \
           jsonb_build_object('value', convert_from(prev_data, 'UTF8'))::text, $3, $4 FROM up"
    };
}
macro_rules! kv_not_updated {
    () => {
        "SELECT false, revision, create_revision, created_at, updated_at, data = $2, \
           session_id IS NOT NULL OR expires_at IS NOT NULL \
         FROM world WHERE space = 'kv' AND key = $1 AND NOT EXISTS (SELECT 1 FROM up)"
    };
}
/// One set. Rows: (true, revision, create_revision, created_at, updated_at, false, false) when
/// it updated or inserted the key; (false, revision, create_revision, created_at, updated_at,
/// identical, bound) from the statement's snapshot when it did not update an existing key; none
/// when it could not decide (another writer created the key meanwhile).
const UPSERT_ONE: &str = concat!(
    kv_update_cte!(),
    "new AS MATERIALIZED (SELECT nextval('fleetdb_revision') AS rev \
        WHERE NOT EXISTS (SELECT 1 FROM world WHERE space = 'kv' AND key = $1)), \
     ins AS (INSERT INTO world (space, key, scope, owner, kind, name, target, data, meta, \
          session_id, expires_at, create_revision, revision, created_at, updated_at) \
        SELECT 'kv', $1, '', '', '', '', '', $2, NULL, NULL, NULL, rev, rev, $4, $4 FROM new \
        ON CONFLICT (space, key) DO NOTHING RETURNING revision), \
     chg AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) ",
    kv_update_change!(),
    " UNION ALL SELECT revision, '.kv', '', $1, 'kv', '', 'put', NULL, $3, $4 FROM ins) \
     SELECT true, revision, create_revision, created_at, updated_at, false, false FROM up \
     UNION ALL \
     SELECT true, revision, revision, $4, $4, false, false FROM ins \
     UNION ALL ",
    kv_not_updated!()
);

/// One set of a key expected to exist: [`UPSERT_ONE`] without the insert (rows alike; none
/// when the key does not exist). Cheaper by an index probe and three plan nodes, it is what a
/// set alone tries first.
const UPDATE_ONE: &str = concat!(
    kv_update_cte!(),
    "chg AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) ",
    kv_update_change!(),
    ") SELECT true, revision, create_revision, created_at, updated_at, false, false FROM up \
     UNION ALL ",
    kv_not_updated!()
);

/// Rounds of a set alone before giving up; each further round needs a concurrent write of the
/// key in between (created while the set found it absent, deleted or set to this very value
/// while it waited to update it).
const ROUNDS_MAX: usize = 8;

/// What a shared transaction decided for one set.
enum Outcome {
    /// Decided: `commit`'s answer (`None`: the key is bound to a session or a TTL, the general
    /// path takes it).
    Done(Option<Vec<OpResult>>),
    /// Not decided, or its transaction failed (see the module documentation): the caller runs
    /// it alone.
    Alone,
    /// Its transaction's outcome is unknown (the connection was lost after the COMMIT may have
    /// reached the server): running it again could apply it twice, after a later writer's set.
    Unknown(fleetdb_core::Error),
}

/// A set waiting in the queue.
struct Pending {
    id: u64,
    key: String,
    value: String,
    now: Timestamp,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Pending>,
    /// Keys of sets being written now (in a shared transaction, or alone).
    in_flight: HashSet<String>,
}

/// The queue of sets waiting for a connection (one per backend, shared by its clones).
#[derive(Default)]
pub(crate) struct KvCombiner {
    queue: Mutex<Queue>,
    /// Woken when a shared transaction or a set alone ends (its keys are free again).
    done: Notify,
    next_id: AtomicU64,
    /// Shared transactions committed, the sets they wrote, and the ones that failed (for tests
    /// and debugging).
    shared_txns: AtomicU64,
    shared_sets: AtomicU64,
    shared_failed: AtomicU64,
}

impl KvCombiner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the waiting sets whose keys are free (the first of each key, up to [`COMBINE_MAX`])
    /// and mark their keys in flight; the others keep their places.
    fn take(&self) -> Vec<Pending> {
        let mut q = self.lock();
        let mut taken = Vec::new();
        let mut kept = VecDeque::new();
        while let Some(p) = q.waiting.pop_front() {
            if taken.len() < COMBINE_MAX && !q.in_flight.contains(&p.key) {
                q.in_flight.insert(p.key.clone());
                taken.push(p);
            } else {
                kept.push_back(p);
            }
        }
        q.waiting = kept;
        taken
    }

    /// Whether set `id` is still waiting (no shared transaction has taken it).
    fn is_waiting(&self, id: u64) -> bool {
        self.lock().waiting.iter().any(|p| p.id == id)
    }

    /// Remove set `id` if it is still waiting (its caller is leaving); false if a shared
    /// transaction has it.
    fn withdraw(&self, id: u64) -> bool {
        let mut q = self.lock();
        let before = q.waiting.len();
        q.waiting.retain(|p| p.id != id);
        q.waiting.len() != before
    }
}

/// Takes a queued set back out of the queue when its caller goes away (a timeout, a `select!`):
/// left there, it would be written by whichever caller next takes the queue, at any later time
/// (after, say, the caller's own delete of the key). A no-op once a transaction has taken it.
struct Queued<'a> {
    combiner: &'a KvCombiner,
    id: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.combiner.withdraw(self.id);
    }
}

/// Frees a transaction's keys and wakes the waiting callers when dropped (however the transaction
/// ended).
struct InFlight<'a> {
    combiner: &'a KvCombiner,
    keys: Vec<String>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        {
            let mut q = self.combiner.lock();
            for k in &self.keys {
                q.in_flight.remove(k);
            }
        }
        self.combiner.done.notify_waiters();
    }
}

/// The record a decided set returns (`rec` holds the key, value and time).
fn decided(mut rec: WorldRecord, row: &Row, updated: bool) -> Result<Option<Vec<OpResult>>> {
    rec.revision = Revision(row.try_get(1).map_err(db_err)?);
    rec.create_revision = Revision(row.try_get(2).map_err(db_err)?);
    rec.created_at = Timestamp(row.try_get(3).map_err(db_err)?);
    rec.updated_at = Timestamp(row.try_get(4).map_err(db_err)?);
    Ok(Some(vec![OpResult {
        changed: updated,
        applied: Applied::World(Box::new(rec)),
    }]))
}

/// What a row of [`UPSERT_ONE`] says of its set.
fn outcome(rec: WorldRecord, row: &Row) -> Result<Outcome> {
    let updated: bool = row.try_get(0).map_err(db_err)?;
    let identical: bool = row.try_get(5).map_err(db_err)?;
    let bound: bool = row.try_get(6).map_err(db_err)?;
    Ok(if bound {
        Outcome::Done(None)
    } else if updated || identical {
        Outcome::Done(decided(rec, row, updated)?)
    } else {
        // Changed by a concurrent set between the snapshot and the update.
        Outcome::Alone
    })
}

/// The rows each set of a shared transaction may be answered with: all of them if the
/// transaction committed (or, had `BEGIN` failed, each statement that succeeded on its own),
/// none if the server refused a statement inside it (nothing of it was written: each runs
/// alone). `Err` when the connection failed instead (no server error): the pipelined COMMIT may
/// have reached the server and committed, so none may run again (each caller gets the error).
fn shared_answers(
    begin: std::result::Result<(), tokio_postgres::Error>,
    rows: Vec<std::result::Result<Vec<Row>, tokio_postgres::Error>>,
    commit: std::result::Result<(), tokio_postgres::Error>,
) -> std::result::Result<Vec<Option<Vec<Row>>>, fleetdb_core::Error> {
    // The server ended the session before COMMIT's answer: the transaction kept nothing (the
    // requests after that answer failed `closed`, which alone would say nothing): each set runs
    // alone.
    let ended = begin
        .as_ref()
        .err()
        .into_iter()
        .chain(rows.iter().filter_map(|r| r.as_ref().err()))
        .any(crate::error::session_ended);
    if ended {
        return Ok(rows.iter().map(|_| None).collect());
    }
    // A COMMIT refused with a connection or shutdown error (class 08, 57P0x: a server shutting
    // down while it waits for a synchronous standby) may have committed locally.
    let commit_unknown = commit.as_ref().err().filter(|e| {
        e.code()
            .is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57P0"))
    });
    let lost = begin
        .as_ref()
        .err()
        .into_iter()
        .chain(rows.iter().filter_map(|r| r.as_ref().err()))
        .chain(commit.as_ref().err())
        .find(|e| e.as_db_error().is_none())
        .or(commit_unknown);
    if let Some(e) = lost {
        return Err(fleetdb_core::Error::Unavailable(format!(
            "the connection failed during a key-value transaction, which may have committed: {e}"
        )));
    }
    let all_ok = rows.iter().all(|r| r.is_ok());
    if begin.is_ok() && !(all_ok && commit.is_ok()) {
        return Ok(rows.iter().map(|_| None).collect());
    }
    Ok(rows.into_iter().map(|r| r.ok()).collect())
}

fn record(key: &str, value: &str, now: Timestamp) -> WorldRecord {
    let mut rec = WorldRecord::new(Space::Kv, key, now);
    rec.data = value.as_bytes().to_vec();
    rec
}

impl PostgresBackend {
    /// A lone, unconditional, persistent set (see the module documentation). `None` when the
    /// stored key is bound to a session or a TTL (its liveness needs the general path).
    pub(crate) async fn kv_set_fused(
        &self,
        key: &str,
        value: &str,
        now: Timestamp,
    ) -> Result<Option<Vec<OpResult>>> {
        let combiner = &self.kv;
        let id = combiner.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, mut answer) = oneshot::channel();
        let alone = {
            let mut q = combiner.lock();
            if q.waiting.is_empty() && q.in_flight.is_empty() {
                q.in_flight.insert(key.to_string());
                true
            } else {
                q.waiting.push_back(Pending {
                    id,
                    key: key.to_string(),
                    value: value.to_string(),
                    now,
                    reply,
                });
                false
            }
        };
        if alone {
            // Nothing waiting or being written: alone at once (no queue round).
            let _free = InFlight {
                combiner,
                keys: vec![key.to_string()],
            };
            return self.kv_set_alone(key, value, now).await;
        }
        let _queued = Queued { combiner, id };
        loop {
            if !combiner.is_waiting(id) {
                // A shared transaction has it: only its answer is left to wait for.
                return self.answered(answer.await, key, value, now).await;
            }
            let freed = combiner.done.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            tokio::select! {
                biased;
                got = &mut answer => return self.answered(got, key, value, now).await,
                client = self.pool.get() => {
                    let client = match client {
                        Ok(c) => c,
                        Err(e) => {
                            if combiner.withdraw(id) {
                                return Err(pool_err(e));
                            }
                            continue; // a shared transaction has it: its answer comes
                        }
                    };
                    let taken = combiner.take();
                    if taken.is_empty() {
                        drop(client);
                        if combiner.is_waiting(id) {
                            // This key is in a shared transaction now: wait for one to end.
                            tokio::select! {
                                biased;
                                got = &mut answer => return self.answered(got, key, value, now).await,
                                _ = &mut freed => {}
                            }
                        }
                        continue;
                    }
                    if taken.len() == 1 && taken[0].id == id {
                        // Only this set: alone, on this connection's turn.
                        drop(client);
                        let _free = InFlight {
                            combiner,
                            keys: vec![key.to_string()],
                        };
                        return self.kv_set_alone(key, value, now).await;
                    }
                    let backend = self.clone();
                    tokio::spawn(async move { backend.kv_set_many(client, taken).await });
                }
            }
        }
    }

    /// The answer of a set's shared transaction, or the set run alone if it was handed back (or
    /// the transaction's task is gone).
    async fn answered(
        &self,
        got: std::result::Result<Outcome, oneshot::error::RecvError>,
        key: &str,
        value: &str,
        now: Timestamp,
    ) -> Result<Option<Vec<OpResult>>> {
        match got {
            Ok(Outcome::Done(r)) => Ok(r),
            Ok(Outcome::Unknown(e)) => Err(e),
            Ok(Outcome::Alone) | Err(_) => self.kv_set_alone(key, value, now).await,
        }
    }

    /// Write `taken` (distinct keys, marked in flight) in one transaction, pipelined in one
    /// round trip, and answer each set.
    async fn kv_set_many(&self, client: deadpool_postgres::Object, mut taken: Vec<Pending>) {
        let _free = InFlight {
            combiner: &self.kv,
            keys: taken.iter().map(|p| p.key.clone()).collect(),
        };
        // Key order: two such transactions (of any process) lock their common rows in one order.
        taken.sort_by(|a, b| a.key.cmp(&b.key));
        let recs: Vec<WorldRecord> = taken
            .iter()
            .map(|p| record(&p.key, &p.value, p.now))
            .collect();
        let json: Vec<String> = recs.iter().map(WorldRecord::change_json).collect();
        let answers = match client.prepare_cached(UPSERT_ONE).await {
            Ok(stmt) => {
                let data: Vec<&[u8]> = taken.iter().map(|p| p.value.as_bytes()).collect();
                let params: Vec<[Param<'_>; 4]> = taken
                    .iter()
                    .zip(&data)
                    .zip(&json)
                    .map(|((p, d), j)| -> [Param<'_>; 4] { [&p.key, d, j, &p.now.0] })
                    .collect();
                // Sent in this order: tokio-postgres sends a request on its first poll.
                let (begin, rows, commit) = futures::future::join3(
                    client.batch_execute(sql::BEGIN_READ_COMMITTED),
                    futures::future::join_all(params.iter().map(|ps| client.query(&stmt, ps))),
                    client.batch_execute("COMMIT"),
                )
                .await;
                shared_answers(begin, rows, commit)
            }
            Err(_) => Ok(vec![None; taken.len()]),
        };
        let answers = match answers {
            Ok(answers) => answers,
            Err(e) => {
                drop(client);
                self.kv.shared_failed.fetch_add(1, Ordering::Relaxed);
                for p in taken {
                    let _ = p.reply.send(Outcome::Unknown(e.clone()));
                }
                return;
            }
        };
        drop(client);
        let written = answers.iter().filter(|a| a.is_some()).count() as u64;
        if written > 0 {
            self.kv.shared_txns.fetch_add(1, Ordering::Relaxed);
            self.kv.shared_sets.fetch_add(written, Ordering::Relaxed);
        } else {
            self.kv.shared_failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                sets = taken.len(),
                "a shared key-value transaction failed; each set runs alone"
            );
        }
        for ((p, rec), rows) in taken.into_iter().zip(recs).zip(answers) {
            let o = match rows.as_deref().map(<[Row]>::first) {
                Some(Some(row)) => outcome(rec, row).unwrap_or(Outcome::Alone),
                _ => Outcome::Alone,
            };
            // A caller that gave up has dropped its receiver: nothing to tell.
            let _ = p.reply.send(o);
        }
    }

    /// One set in its own statement ([`UPDATE_ONE`], then [`UPSERT_ONE`] if the key did not
    /// exist), again while another writer keeps it from deciding.
    async fn kv_set_alone(
        &self,
        key: &str,
        value: &str,
        now: Timestamp,
    ) -> Result<Option<Vec<OpResult>>> {
        let rec = record(key, value, now);
        let new_json = rec.change_json();
        let data: &[u8] = value.as_bytes();
        let params: [Param<'_>; 4] = [&key, &data, &new_json, &now.0];
        let mut statement = UPDATE_ONE;
        for _ in 0..ROUNDS_MAX {
            let rows = self.query_retrying(statement, &params).await?;
            // No row from the update: the key is new (or was created meanwhile).
            statement = if rows.is_empty() {
                UPSERT_ONE
            } else {
                UPDATE_ONE
            };
            if let Some(row) = rows.first() {
                if let Outcome::Done(r) = outcome(rec.clone(), row)? {
                    return Ok(r);
                }
            }
        }
        Err(Error::Unavailable(format!(
            "key {key:?} was changed concurrently in each of {ROUNDS_MAX} rounds in a row"
        )))
    }
}

#[cfg(test)]
mod tests {
    use fleetdb_core::backend::Backend;
    use fleetdb_core::world::Lifetime;
    use fleetdb_core::{Batch, Op};

    use super::*;
    use crate::testing;

    fn set(key: &str, value: &str) -> Batch {
        Batch {
            preconditions: Vec::new(),
            ops: vec![Op::KvSet {
                key: key.to_string(),
                value: value.to_string(),
                expect: None,
                lifetime: Lifetime::persistent(),
            }],
            now: Timestamp(1),
        }
    }

    /// Concurrent sets through a pool of two connections: most share transactions, each is
    /// written once with its own revision, and each key's change log chains its values.
    #[tokio::test]
    async fn concurrent_sets_share_transactions_and_each_is_written_once() {
        let (backend, base, schema) = crate::test_backend(2).await;
        let mut tasks = Vec::new();
        for t in 0..32 {
            let b = backend.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..10 {
                    let key = format!("k{}", (t + i) % 8);
                    let value = format!("{t}-{i}");
                    let r = b.commit(set(&key, &value)).await.unwrap();
                    let fleetdb_core::Applied::World(rec) = &r[0].applied else {
                        panic!("a set returns its record");
                    };
                    assert!(r[0].changed);
                    out.push((key, value, rec.revision));
                }
                out
            }));
        }
        let mut written = Vec::new();
        for t in tasks {
            written.extend(t.await.unwrap());
        }
        assert!(
            backend.kv.shared_sets.load(Ordering::Relaxed) > 0,
            "no set shared a transaction"
        );
        let log = backend
            .changes(Revision(0), &Default::default(), 10_000)
            .await
            .unwrap();
        assert_eq!(log.len(), 320, "one change per set");
        for (key, value, revision) in &written {
            let c = log.iter().find(|c| c.revision == *revision).unwrap();
            assert_eq!(&c.id, key);
            assert_eq!(c.new_value.as_ref().unwrap()["value"], value.as_str());
        }
        for k in 0..8 {
            let key = format!("k{k}");
            let chain: Vec<_> = log.iter().filter(|c| c.id == key).collect();
            assert!(chain[0].old_value.is_none(), "{key} was created once");
            for pair in chain.windows(2) {
                assert_eq!(
                    pair[1].old_value.as_ref().unwrap()["value"],
                    pair[0].new_value.as_ref().unwrap()["value"]
                );
            }
        }
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A set whose statement fails inside a shared transaction fails alone: its neighbours,
    /// handed back, are written, and the failing one reports its error.
    #[tokio::test]
    async fn a_failing_set_does_not_take_its_neighbours_down() {
        let (backend, base, schema) = crate::test_backend(1).await;
        // A value no API can write: its previous value cannot be read as text.
        {
            let client = backend.client().await.unwrap();
            client
                .batch_execute(
                    "INSERT INTO world (space, key, scope, owner, kind, name, target, data, meta, \
                       session_id, expires_at, create_revision, revision, created_at, updated_at) \
                     VALUES ('kv', 'bad', '', '', '', '', '', '\\xff'::bytea, NULL, NULL, NULL, 1, 1, 0, 0)",
                )
                .await
                .unwrap();
        }
        // Hold the only connection, and a key "in flight" (none runs alone at once), so the
        // sets queue up and share one transaction.
        let held = backend.client().await.unwrap();
        backend.kv.lock().in_flight.insert("elsewhere".into());
        let mut tasks = Vec::new();
        for key in ["a", "bad", "c", "d"] {
            let b = backend.clone();
            tasks.push(tokio::spawn(async move {
                (key, b.commit(set(key, "new")).await)
            }));
        }
        while backend.kv.lock().waiting.len() < 4 {
            tokio::task::yield_now().await;
        }
        drop(InFlight {
            combiner: &backend.kv,
            keys: vec!["elsewhere".into()],
        });
        drop(held);
        for t in tasks {
            let (key, r) = t.await.unwrap();
            if key == "bad" {
                assert!(r.is_err(), "the failing set reports its error");
            } else {
                assert!(r.unwrap()[0].changed, "{key} is written");
            }
        }
        assert_eq!(backend.kv.shared_failed.load(Ordering::Relaxed), 1);
        assert_eq!(backend.kv.shared_sets.load(Ordering::Relaxed), 0);
        let log = backend
            .changes(Revision(0), &Default::default(), 100)
            .await
            .unwrap();
        let mut ids: Vec<&str> = log.iter().map(|c| c.id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["a", "c", "d"]);
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A set whose caller goes away while it waits in the queue leaves the queue: it is not
    /// written later by whoever next takes the queue (after, say, the caller's delete).
    #[tokio::test]
    async fn a_queued_set_whose_caller_goes_away_is_not_written() {
        let (backend, base, schema) = crate::test_backend(1).await;
        // A key "in flight", so the set queues instead of running alone.
        backend.kv.lock().in_flight.insert("elsewhere".into());
        let held = backend.client().await.unwrap();
        let gone = {
            let b = backend.clone();
            tokio::spawn(async move { b.commit(set("k", "stale")).await })
        };
        while backend.kv.lock().waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        assert!(backend.kv.lock().waiting.is_empty(), "withdrawn");
        drop(InFlight {
            combiner: &backend.kv,
            keys: vec!["elsewhere".into()],
        });
        drop(held);
        backend.commit(set("other", "v")).await.unwrap();
        let log = backend
            .changes(Revision(0), &Default::default(), 100)
            .await
            .unwrap();
        let ids: Vec<&str> = log.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["other"], "the abandoned set was never written");
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }
}
