//! The single writer thread and its group commit.
//!
//! SQLite allows one writer at a time, and a durable commit costs one fsync. The writer thread
//! takes every write request that is waiting (up to [`GROUP_JOBS_MAX`]), runs each inside its own
//! SAVEPOINT of ONE transaction, and commits once: many logical transactions share one fsync.
//! A request that fails rolls back to its savepoint and gets its error; its neighbours commit.
//! Every caller is answered only after the group's COMMIT returned, i.e. after its data is durable.

use fleetdb_core::apply::{apply_batch, apply_claim, apply_sweep};
use fleetdb_core::work::{ClaimRequest, WorkInfo};
use fleetdb_core::{Batch, Error, OpResult, Result, Timestamp};
use rusqlite::Connection;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

use crate::rows::SqliteRows;
use crate::{current_revision, map_err};

/// Most write requests committed together in one group.
pub const GROUP_JOBS_MAX: usize = 256;
/// Most write requests waiting for the writer before callers wait to enqueue.
pub const QUEUE_JOBS_MAX: usize = 4096;
/// Attempts at a group that finds the database busy (another process writing) past busy_timeout.
const GROUP_ATTEMPTS_MAX: u32 = 5;

pub(crate) type Exclusive = Box<dyn FnOnce(&mut Connection) + Send>;

/// A write that joins a group: each runs in its own savepoint.
pub(crate) enum Write {
    Batch(Batch),
    Claim(ClaimRequest),
    Renew { ids: Vec<String>, now: Timestamp },
    Sweep { now: Timestamp, limit: usize },
}

/// What a [`Write`] returns.
pub(crate) enum Written {
    Batch(Vec<OpResult>),
    Claim(Vec<WorkInfo>),
    Renew(Vec<(String, Timestamp)>),
    Sweep(u64),
}

type Reply = oneshot::Sender<Result<Written>>;

pub(crate) enum Job {
    Commit {
        write: Write,
        reply: Reply,
    },
    /// Run with the write connection, outside any group (migrations, compaction).
    Exclusive(Exclusive),
}

pub(crate) fn spawn(
    conn: Arc<Mutex<Connection>>,
) -> Result<(mpsc::Sender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Job>(QUEUE_JOBS_MAX);
    let handle = std::thread::Builder::new()
        .name("fleetdb-sqlite-writer".into())
        .spawn(move || {
            let mut group: Vec<(Write, Reply)> = Vec::new();
            while let Some(first) = rx.blocking_recv() {
                let mut next = Some(first);
                while let Some(job) = next.take() {
                    match job {
                        Job::Commit { write, reply } => group.push((write, reply)),
                        Job::Exclusive(f) => {
                            flush(&conn, &mut group);
                            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
                            f(&mut c);
                        }
                    }
                    if group.len() < GROUP_JOBS_MAX {
                        next = rx.try_recv().ok();
                    }
                }
                flush(&conn, &mut group);
            }
        })
        .map_err(|e| Error::Backend(format!("cannot start the SQLite writer thread: {e}")))?;
    Ok((tx, handle))
}

fn flush(conn: &Mutex<Connection>, group: &mut Vec<(Write, Reply)>) {
    if group.is_empty() {
        return;
    }
    let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
    let mut attempt = 0;
    let results = loop {
        attempt += 1;
        match run_group(&mut c, group) {
            Ok(results) => break results,
            Err(e) if e.is_retryable() && attempt < GROUP_ATTEMPTS_MAX => {
                tracing::debug!(attempt, error = %e, "sqlite group commit retry");
                continue;
            }
            Err(e) => break group.iter().map(|_| Err(e.clone())).collect(),
        }
    };
    for ((_, reply), result) in group.drain(..).zip(results) {
        let _ = reply.send(result); // the caller may have gone away; its write still committed
    }
}

fn run_group(c: &mut Connection, group: &[(Write, Reply)]) -> Result<Vec<Result<Written>>> {
    c.execute_batch("BEGIN IMMEDIATE").map_err(map_err)?;
    let outcome = (|| {
        let mut revision = current_revision(c)?.current.0;
        let mut results = Vec::with_capacity(group.len());
        for (write, _) in group {
            c.execute_batch("SAVEPOINT fleetdb_txn").map_err(map_err)?;
            let before = revision;
            let r = match write {
                Write::Batch(batch) => {
                    let mut rows = SqliteRows {
                        conn: c,
                        revision: &mut revision,
                    };
                    futures::executor::block_on(apply_batch(&mut rows, batch)).map(Written::Batch)
                }
                Write::Claim(req) => {
                    let mut rows = SqliteRows {
                        conn: c,
                        revision: &mut revision,
                    };
                    futures::executor::block_on(apply_claim(&mut rows, req)).map(Written::Claim)
                }
                Write::Renew { ids, now } => {
                    crate::work::session_renew(c, ids, *now).map(Written::Renew)
                }
                Write::Sweep { now, limit } => {
                    let mut rows = SqliteRows {
                        conn: c,
                        revision: &mut revision,
                    };
                    futures::executor::block_on(apply_sweep(&mut rows, *now, *limit))
                        .map(Written::Sweep)
                }
            };
            match r {
                Ok(r) => {
                    c.execute_batch("RELEASE fleetdb_txn").map_err(map_err)?;
                    results.push(Ok(r));
                }
                Err(e) => {
                    c.execute_batch("ROLLBACK TO fleetdb_txn; RELEASE fleetdb_txn")
                        .map_err(map_err)?;
                    revision = before;
                    results.push(Err(e));
                }
            }
        }
        Ok(results)
    })();
    match outcome {
        Ok(results) => match c.execute_batch("COMMIT") {
            Ok(()) => Ok(results),
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK");
                Err(map_err(e))
            }
        },
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}
