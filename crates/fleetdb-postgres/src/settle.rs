//! Gap filling: the revision below which the change log has no holes (the kine approach).
//!
//! Revisions come from the `fleetdb_revision` sequence, taken in the statement that inserts the
//! change-log row, so a transaction holding revision `g` may commit after one holding `g + 1`, and
//! a transaction that rolls back leaves `g` unused for ever. A watcher that delivered up to `g + 1`
//! and resumes after it would miss `g`. [`settled_revision`] therefore resolves every hole below
//! the highest committed revision `H`: for each missing `g` it inserts a gap marker row
//! (`op = 'gap'`) with `ON CONFLICT (revision) DO NOTHING`:
//!
//! - if the transaction holding `g` has already inserted its (uncommitted) row, the insert waits
//!   for it: it commits (the marker is not inserted, the real row is there) or rolls back (the
//!   marker lands);
//! - if it has taken `g` but not inserted its row yet, or never will (rolled back, or the value was
//!   burnt), the marker lands; a late insert of `g` then fails on `changes_pkey`, which
//!   [`crate::error::classify`] retries with a new revision (every write path inserts its change
//!   row through the sequence and classifies its errors the same way).
//!
//! Either way, once the marker statement has committed, revision `g` is final. The wait is bounded
//! by `lock_timeout`; a hole whose transaction is still running afterwards stops the settled
//! revision just below it, and the next call tries again.
//!
//! Gap markers are never returned by `changes()` and go with compaction like any other row.

use std::time::Duration;

use fleetdb_core::{Error, Result, Revision};
use tokio_postgres::error::SqlState;

use crate::error::db_err;
use crate::{PostgresBackend, TxGuard};

/// Holes resolved per call at most (a fresh process starts from the compaction point).
const HOLES_PER_CALL_MAX: i64 = 10_000;
/// Statement timeout of a single-hole marker insert in the hole-by-hole pass.
const SINGLE_HOLE_STATEMENT_MS: u64 = 10_000;

/// Where to start (the last settled revision or the compaction point, whichever is later), the
/// highest committed revision, and the holes in between in ascending order (at most `$2`). One
/// statement: one snapshot.
const HOLES: &str = "WITH b AS (\
       SELECT greatest($1::bigint, m.value) AS lo, \
         coalesce((SELECT max(revision) FROM changes), 0) AS h \
       FROM fleetdb_meta AS m WHERE m.key = 'compacted_revision') \
     SELECT b.lo, b.h, coalesce((\
       SELECT array_agg(g ORDER BY g) FROM (\
         SELECT g FROM (\
           SELECT revision, lag(revision, 1, b.lo) OVER (ORDER BY revision) AS prev \
           FROM changes WHERE revision > b.lo AND revision <= b.h) AS x \
         CROSS JOIN LATERAL generate_series(x.prev + 1, \
           least(x.revision - 1, x.prev + $2::bigint)) AS g \
         ORDER BY g LIMIT $2::bigint) AS y), '{}'::bigint[]) \
     FROM b";

/// Gap markers for the revisions `$1`, in ascending order.
const MARK: &str = "INSERT INTO changes \
     (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
     SELECT g, '', '', '', 'gap', '', 'gap', NULL, NULL, 0 \
     FROM unnest($1::bigint[]) AS g ORDER BY g \
     ON CONFLICT (revision) DO NOTHING";

/// See the module documentation. Calls in one process are serialized (the second finds the work
/// done); calls in several processes cooperate through the markers' primary key.
pub(crate) async fn settled_revision(
    backend: &PostgresBackend,
    wait: Duration,
) -> Result<Revision> {
    let mut settled = backend.settled.lock().await;
    let rows = backend
        .query(HOLES, &[&*settled, &HOLES_PER_CALL_MAX])
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| Error::Backend("fleetdb_meta has no compacted_revision row".to_string()))?;
    let lo: i64 = row.try_get(0).map_err(db_err)?;
    let high: i64 = row.try_get(1).map_err(db_err)?;
    let holes: Vec<i64> = row.try_get(2).map_err(db_err)?;
    let top = match holes.last() {
        // Truncated: holes above the last one were not looked for.
        Some(&last) if holes.len() as i64 >= HOLES_PER_CALL_MAX => last,
        _ => high.max(lo),
    };
    let resolved = if holes.is_empty() {
        top
    } else {
        let wait_ms = u64::try_from(wait.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, i32::MAX as u64 / 4);
        // All at once, waiting up to `wait` for each holder (and about twice that in all).
        if mark(backend, &holes, wait_ms, 2 * wait_ms + 1000).await? {
            top
        } else {
            // A holder is still running after `wait`: the first hole that does not resolve at once
            // is where the settled revision stops. The markers below it are committed one by one.
            let mut upto = top;
            for &g in &holes {
                if !mark(backend, &[g], 1, SINGLE_HOLE_STATEMENT_MS).await? {
                    upto = g - 1;
                    break;
                }
            }
            upto
        }
    };
    *settled = (*settled).max(resolved).max(lo);
    Ok(Revision(*settled))
}

/// Insert gap markers for `holes` in one READ COMMITTED transaction (one round trip), waiting at
/// most `lock_ms` for each transaction holding one and `statement_ms` in all. Ok(false) when a wait
/// ran out (nothing was inserted then).
async fn mark(
    backend: &PostgresBackend,
    holes: &[i64],
    lock_ms: u64,
    statement_ms: u64,
) -> Result<bool> {
    let client = backend.client().await?;
    let mut guard = TxGuard {
        client: Some(client),
        open: true,
    };
    let conn = guard.client();
    let stmt = conn.prepare_cached(MARK).await.map_err(db_err)?;
    // One simple query: if BEGIN fails, the settings are not made (nor, the connection being broken
    // then, the insert).
    let begin = format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED; \
         SELECT set_config('lock_timeout', '{lock_ms}', true), \
           set_config('statement_timeout', '{statement_ms}', true)"
    );
    let holes = holes.to_vec();
    let (begun, inserted, committed) = futures::future::join3(
        conn.batch_execute(&begin),
        conn.execute(&stmt, &[&holes]),
        conn.batch_execute("COMMIT"),
    )
    .await;
    // A failed COMMIT leaves the transaction's fate unknown: the guard drops the connection.
    begun.map_err(db_err)?;
    committed.map_err(db_err)?;
    guard.open = false;
    match inserted {
        Ok(_) => Ok(true),
        Err(e) => {
            let timed_out = e.as_db_error().is_some_and(|db| {
                let code = db.code();
                *code == SqlState::LOCK_NOT_AVAILABLE
                    || *code == SqlState::QUERY_CANCELED
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
            });
            if timed_out {
                tracing::debug!(holes = holes.len(), error = %e, "a revision is still held");
                Ok(false)
            } else {
                Err(db_err(e))
            }
        }
    }
}
