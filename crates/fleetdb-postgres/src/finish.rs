//! A worker's finish (or cancel) as ONE statement: the hot path of `commit` for a batch of tag
//! deletes followed by releases of one session's claims, and the first half of
//! `commit_then_claim`'s single transaction.
//!
//! The statement makes the decisions of `apply_batch` for such a batch: the session must be alive,
//! every tag must exist, every claim must be held by the session with its token. The tag, work
//! and backoff rows are read `FOR UPDATE` (as the general READ COMMITTED finish reads them), so
//! every decision rests on the newest committed row and holds until commit. Only if every check
//! passes does it write: the change-log rows (revisions in op order), the tag, work and backoff
//! deletes, and the history rows in op order. When a check fails it writes nothing and says so;
//! the caller then runs the general path, which names the failure exactly.

use fleetdb_core::work::{Outcome, WorkEvent};
use fleetdb_core::{
    Applied, Batch, Error, ObjectKey, Op, OpResult, Precondition, Result, Revision,
};
use tokio_postgres::Row;

use crate::error::db_err;
use crate::sql::Param;

/// Every row is reached by key through its primary key (lateral probes) and written by
/// the `ctid` its locking read returned: plans that hold whatever the planner believes of
/// the tables (a `DELETE … USING <list>` became a hash join over a whole table).
pub(crate) const SQL: &str = "WITH s AS MATERIALIZED (SELECT component, host FROM sessions \
       WHERE id = $1 AND deadline > $2), \
     td AS MATERIALIZED (SELECT k.n, k.ns, k.kind, k.id, k.name, t.value, t.ctid AS tid \
       FROM jsonb_to_recordset(($3::text)::jsonb) AS k(n bigint, ns text, kind text, id text, name text) \
       LEFT JOIN LATERAL (SELECT value, ctid FROM tags WHERE namespace = k.ns AND kind = k.kind \
         AND id = k.id AND name = k.name FOR UPDATE) AS t ON true), \
     wr AS MATERIALIZED (SELECT k.n, k.ns, k.kind, k.id, k.token, w.session_id AS holder, \
         w.token AS held, w.ctid AS tid, b.ctid AS backoff \
       FROM jsonb_to_recordset(($4::text)::jsonb) AS k(n bigint, ns text, kind text, id text, token bigint) \
       LEFT JOIN LATERAL (SELECT session_id, token, ctid FROM work WHERE namespace = k.ns \
         AND kind = k.kind AND id = k.id AND process = $5 FOR UPDATE) AS w ON true \
       LEFT JOIN LATERAL (SELECT ctid FROM work_backoff WHERE $6::boolean AND namespace = k.ns \
         AND kind = k.kind AND id = k.id AND process = $5 FOR UPDATE) AS b ON true), \
     ok AS MATERIALIZED (SELECT EXISTS (SELECT 1 FROM s) \
       AND NOT EXISTS (SELECT 1 FROM td WHERE td.value IS NULL) \
       AND NOT EXISTS (SELECT 1 FROM wr WHERE wr.holder IS DISTINCT FROM $1 \
         OR wr.held IS DISTINCT FROM wr.token) AS ok), \
     c AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
       SELECT nextval('fleetdb_revision'), x.ns, x.kind, x.id, 'tag', x.name, 'delete', x.value, NULL, $2 \
       FROM (SELECT * FROM td ORDER BY n) AS x WHERE (SELECT ok FROM ok) \
       RETURNING revision, namespace, kind, id, name), \
     d AS (DELETE FROM tags WHERE (SELECT ok FROM ok) \
       AND ctid = ANY (ARRAY(SELECT tid FROM td))), \
     b AS (DELETE FROM work_backoff WHERE (SELECT ok FROM ok) \
       AND ctid = ANY (ARRAY(SELECT backoff FROM wr WHERE backoff IS NOT NULL))), \
     w AS (DELETE FROM work WHERE (SELECT ok FROM ok) \
       AND ctid = ANY (ARRAY(SELECT tid FROM wr))), \
     h AS (INSERT INTO work_history \
       (namespace, kind, id, process, event, session_id, component, host, token, at, cause) \
       SELECT x.ns, x.kind, x.id, $5, $7, $1, s.component, s.host, x.token, $2, NULL \
       FROM (SELECT * FROM wr ORDER BY n) AS x, s WHERE (SELECT ok FROM ok)) \
     SELECT (SELECT ok FROM ok), \
       (SELECT jsonb_agg(jsonb_build_array(namespace, kind, id, name, revision))::text FROM c)";

/// A finish batch, ready to run as [`SQL`].
pub(crate) struct FusedFinish {
    session_id: String,
    now: i64,
    tags_json: String,
    work_json: String,
    process: String,
    finished: bool,
    event: &'static str,
    /// The deleted tags, in op order.
    deletes: Vec<(ObjectKey, String)>,
    releases: usize,
}

impl FusedFinish {
    /// The batch as a fused finish: its preconditions are only `SessionAlive` of the releasing
    /// session, and its ops are deletes of distinct tags followed by at least one release (finish
    /// or cancel) of distinct claims of that session and one process. `None` for any other batch.
    pub(crate) fn new(batch: &Batch) -> Option<FusedFinish> {
        let Some(Op::WorkRelease {
            session_id,
            process,
            outcome: outcome @ (Outcome::Finished | Outcome::Canceled),
            ..
        }) = batch.ops.last()
        else {
            return None;
        };
        if !batch
            .preconditions
            .iter()
            .all(|p| matches!(p, Precondition::SessionAlive { session_id: s } if s == session_id))
        {
            return None;
        }
        let mut deletes: Vec<(ObjectKey, String)> = Vec::new();
        let mut tags = Vec::new();
        let mut releases = Vec::new();
        let mut seen_tags = std::collections::HashSet::new();
        let mut seen_keys = std::collections::HashSet::new();
        for op in &batch.ops {
            match op {
                Op::TagDelete { key, name } if releases.is_empty() => {
                    if !seen_tags.insert((key, name)) {
                        return None;
                    }
                    tags.push(serde_json::json!({"n": tags.len(), "ns": key.namespace,
                        "kind": key.kind, "id": key.id, "name": name}));
                    deletes.push((key.clone(), name.clone()));
                }
                Op::WorkRelease {
                    key,
                    process: p,
                    session_id: s,
                    token,
                    outcome: o,
                } if p == process && s == session_id && o == outcome => {
                    if !seen_keys.insert(key) {
                        return None;
                    }
                    releases.push(serde_json::json!({"n": releases.len(), "ns": key.namespace,
                        "kind": key.kind, "id": key.id, "token": token}));
                }
                _ => return None,
            }
        }
        let finished = *outcome == Outcome::Finished;
        Some(FusedFinish {
            session_id: session_id.clone(),
            now: batch.now.0,
            tags_json: serde_json::Value::Array(tags).to_string(),
            work_json: serde_json::Value::Array(releases.clone()).to_string(),
            process: process.clone(),
            finished,
            event: if finished {
                WorkEvent::Finished
            } else {
                WorkEvent::Canceled
            }
            .as_str(),
            deletes,
            releases: releases.len(),
        })
    }

    /// [`SQL`]'s parameters.
    pub(crate) fn params(&self) -> [Param<'_>; 7] {
        [
            &self.session_id,
            &self.now,
            &self.tags_json,
            &self.work_json,
            &self.process,
            &self.finished,
            &self.event,
        ]
    }

    /// The batch's results from [`SQL`]'s row, as `apply_batch` gives them; `None` when a check
    /// failed (nothing was written).
    pub(crate) fn results(&self, row: &Row) -> Result<Option<Vec<OpResult>>> {
        let ok: bool = row.try_get(0).map_err(db_err)?;
        if !ok {
            return Ok(None);
        }
        let mut revisions = std::collections::HashMap::with_capacity(self.deletes.len());
        if let Some(text) = row.try_get::<_, Option<String>>(1).map_err(db_err)? {
            let list: Vec<(String, String, String, String, i64)> = serde_json::from_str(&text)
                .map_err(|e| Error::Backend(format!("revisions of a finish: {e}")))?;
            for (ns, kind, id, name, rev) in list {
                revisions.insert(
                    (fleetdb_core::apply::stored_key(ns, kind, id), name),
                    Revision(rev),
                );
            }
        }
        let mut out = Vec::with_capacity(self.deletes.len() + self.releases);
        for item in &self.deletes {
            let revision = revisions.remove(item).ok_or_else(|| {
                Error::Backend(format!(
                    "no change-log row for tag {:?} of {}",
                    item.1, item.0
                ))
            })?;
            out.push(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            });
        }
        out.extend((0..self.releases).map(|_| OpResult {
            changed: true,
            applied: Applied::Done { count: 1 },
        }));
        Ok(Some(out))
    }
}
