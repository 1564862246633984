//! Workers' finishes (or cancels) as ONE statement: the hot path of `commit` for a batch of tag
//! deletes followed by releases of one session's claims, and the first part of
//! `commit_then_claim`'s transaction — for one finish, or for the finishes of several workers
//! whose claims share a transaction ([`crate::claims`]).
//!
//! The statement makes the decisions of `apply_batch` for each finish (a group `g`): its session
//! must be alive, every tag it deletes must exist, every claim it releases must be held by its
//! session with its token. The tag, work and backoff rows are read `FOR UPDATE` (as the general
//! READ COMMITTED finish reads them), so every decision rests on the newest committed row and
//! holds until commit. Only the finishes whose checks all pass write: the change-log rows
//! (revisions in op order), the tag, work and backoff deletes, and the history rows in op order.
//! A finish whose check fails writes nothing and is reported so; the caller then runs the
//! general path, which names the failure exactly. The finishes of one statement touch distinct
//! tags and claims ([`FusedFinish::disjoint`]), so no decision rests on another's writes.

use std::collections::{HashMap, HashSet};

use fleetdb_core::work::{Outcome, WorkEvent};
use fleetdb_core::{
    Applied, Batch, Error, ObjectKey, Op, OpResult, Precondition, Result, Revision,
};
use tokio_postgres::Row;

use crate::error::db_err;
use crate::sql::Param;
use crate::work;

/// Every row is reached by key (lateral probes) and written by the `ctid` its locking read
/// returned: plans that hold whatever the planner believes of the tables (a `DELETE … USING
/// <list>` became a hash join over a whole table). A session is probed by its id alone, in a
/// subquery kept out of the join tree (`OFFSET 0`): with the deadline beside it, a plan made
/// while `sessions` looked small read every live session through `sessions_deadline` for each
/// finish. A claim or backoff is probed by its full key, an exact lookup in each index that can
/// serve it (migration 0010: before it, `work (process)` made each probe read every claim the
/// process ever had, dead rows included; plan-guard test `finish_and_take_probe_rows_by_key`).
/// The rows of the finishes that passed are picked once (`tdo`, `wro`), not by a semi-join in
/// each of the five writes: every execution initializes the whole plan, used or not.
///
/// `$1`: the finishes (`g`, session, history event, whether backoffs are cleared); `$2`: now;
/// `$3`: the tag deletes and `$4` the releases, each numbered `n` in op order across finishes.
/// Returns the finishes that passed (a JSON array of `g`, NULL if none; also left in the
/// transaction setting `work::PASSED_GUC` for a claim behind it) and the change-log rows written.
pub(crate) const SQL: &str = "WITH gs AS MATERIALIZED (SELECT k.g, k.sid, k.event, \
         COALESCE(s.alive, false) AS alive, s.component, s.host \
       FROM jsonb_to_recordset(($1::text)::jsonb) AS k(g bigint, sid text, event text) \
       LEFT JOIN LATERAL (SELECT true AS alive, s.component, s.host FROM (SELECT component, \
         host, deadline FROM sessions WHERE id = k.sid OFFSET 0) AS s WHERE s.deadline > $2) \
         AS s ON true), \
     td AS MATERIALIZED (SELECT k.n, k.g, k.ns, k.kind, k.id, k.name, t.value, t.ctid AS tid \
       FROM jsonb_to_recordset(($3::text)::jsonb) \
         AS k(n bigint, g bigint, ns text, kind text, id text, name text) \
       LEFT JOIN LATERAL (SELECT value, ctid FROM tags WHERE namespace = k.ns AND kind = k.kind \
         AND id = k.id AND name = k.name FOR UPDATE) AS t ON true), \
     wr AS MATERIALIZED (SELECT k.n, k.g, k.ns, k.kind, k.id, k.p, k.token, \
         w.session_id AS holder, w.token AS held, w.ctid AS tid, b.ctid AS backoff \
       FROM jsonb_to_recordset(($4::text)::jsonb) \
         AS k(n bigint, g bigint, ns text, kind text, id text, p text, token bigint, fin boolean) \
       LEFT JOIN LATERAL (SELECT session_id, token, ctid FROM work WHERE namespace = k.ns \
         AND kind = k.kind AND id = k.id AND process = k.p FOR UPDATE) AS w ON true \
       LEFT JOIN LATERAL (SELECT ctid FROM work_backoff WHERE k.fin AND namespace = k.ns \
         AND kind = k.kind AND id = k.id AND process = k.p FOR UPDATE) AS b ON true), \
     ok AS MATERIALIZED (SELECT gs.g FROM gs WHERE gs.alive \
       AND NOT EXISTS (SELECT 1 FROM td WHERE td.g = gs.g AND td.value IS NULL) \
       AND NOT EXISTS (SELECT 1 FROM wr WHERE wr.g = gs.g \
         AND (wr.holder IS DISTINCT FROM gs.sid OR wr.held IS DISTINCT FROM wr.token))), \
     tdo AS MATERIALIZED (SELECT * FROM td WHERE td.g IN (SELECT g FROM ok)), \
     wro AS MATERIALIZED (SELECT * FROM wr WHERE wr.g IN (SELECT g FROM ok)), \
     c AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
       SELECT nextval('fleetdb_revision'), x.ns, x.kind, x.id, 'tag', x.name, 'delete', x.value, NULL, $2 \
       FROM (SELECT * FROM tdo ORDER BY n) AS x \
       RETURNING revision, namespace, kind, id, name), \
     d AS (DELETE FROM tags WHERE ctid = ANY (ARRAY(SELECT tid FROM tdo))), \
     b AS (DELETE FROM work_backoff \
       WHERE ctid = ANY (ARRAY(SELECT backoff FROM wro WHERE backoff IS NOT NULL))), \
     w AS (DELETE FROM work WHERE ctid = ANY (ARRAY(SELECT tid FROM wro))), \
     h AS (INSERT INTO work_history \
       (namespace, kind, id, process, event, session_id, component, host, token, at, cause) \
       SELECT x.ns, x.kind, x.id, x.p, gs.event, gs.sid, gs.component, gs.host, x.token, $2, NULL \
       FROM wro AS x JOIN gs ON gs.g = x.g \
       ORDER BY x.n) \
     SELECT (SELECT jsonb_agg(g)::text FROM ok), \
       (SELECT jsonb_agg(jsonb_build_array(namespace, kind, id, name, revision))::text FROM c), \
       set_config('fleetdb.finish_passed', COALESCE((SELECT jsonb_agg(g) FROM ok), '[]'::jsonb)::text, true)";

/// A finish batch, ready to run as [`SQL`] (alone, or with others: [`FinishParams`]).
#[derive(Clone)]
pub(crate) struct FusedFinish {
    session_id: String,
    now: i64,
    process: String,
    finished: bool,
    /// The deleted tags, in op order.
    deletes: Vec<(ObjectKey, String)>,
    /// The released claims (key, token), in op order.
    releases: Vec<(ObjectKey, i64)>,
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
        let mut releases: Vec<(ObjectKey, i64)> = Vec::new();
        let mut seen_tags = HashSet::new();
        let mut seen_keys = HashSet::new();
        for op in &batch.ops {
            match op {
                Op::TagDelete { key, name } if releases.is_empty() => {
                    if !seen_tags.insert((key, name)) {
                        return None;
                    }
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
                    releases.push((key.clone(), *token));
                }
                _ => return None,
            }
        }
        Some(FusedFinish {
            session_id: session_id.clone(),
            now: batch.now.0,
            process: process.clone(),
            finished: *outcome == Outcome::Finished,
            deletes,
            releases,
        })
    }

    /// Whether this finish touches none of the tags and claims of `others` (finishes of one
    /// statement must not: each decides on the rows as they were before the statement).
    pub(crate) fn disjoint(&self, others: &[&FusedFinish]) -> bool {
        others.iter().all(|o| {
            self.deletes.iter().all(|d| !o.deletes.contains(d))
                && self.releases.iter().all(|(k, _)| {
                    !(o.process == self.process && o.releases.iter().any(|(ok, _)| ok == k))
                })
        })
    }

    /// The batch's results (as `apply_batch` gives them) when finish `g` of the statement
    /// passed; `None` when one of its checks failed (it wrote nothing).
    pub(crate) fn results(&self, done: &FinishRow, g: usize) -> Result<Option<Vec<OpResult>>> {
        if !done.passed.contains(&g) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(self.deletes.len() + self.releases.len());
        for (key, name) in &self.deletes {
            let revision = done
                .revisions
                .get(&(key.clone(), name.clone()))
                .copied()
                .ok_or_else(|| {
                    Error::Backend(format!("no change-log row for tag {name:?} of {key}"))
                })?;
            out.push(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            });
        }
        out.extend(self.releases.iter().map(|_| OpResult {
            changed: true,
            applied: Applied::Done { count: 1 },
        }));
        Ok(Some(out))
    }
}

/// [`SQL`]'s parameters for some finishes (finish `g` is the `g`-th), at the latest of their
/// times (each as if it had come that moment later).
pub(crate) struct FinishParams {
    groups: String,
    tags: String,
    work: String,
    now: i64,
}

impl FinishParams {
    pub(crate) fn new(finishes: &[&FusedFinish]) -> FinishParams {
        // Written as typed rows, not `serde_json::Value`s: a map per row made this a fifth of
        // the client's CPU in the burn-down.
        #[derive(serde::Serialize)]
        struct Group<'a> {
            g: usize,
            sid: &'a str,
            event: &'static str,
        }
        #[derive(serde::Serialize)]
        struct TagRow<'a> {
            n: usize,
            g: usize,
            ns: &'a str,
            kind: &'a str,
            id: &'a str,
            name: &'a str,
        }
        #[derive(serde::Serialize)]
        struct WorkRow<'a> {
            n: usize,
            g: usize,
            ns: &'a str,
            kind: &'a str,
            id: &'a str,
            p: &'a str,
            token: i64,
            fin: bool,
        }
        let mut groups = Vec::with_capacity(finishes.len());
        let (mut tags, mut releases) = (Vec::new(), Vec::new());
        for (g, f) in finishes.iter().enumerate() {
            let event = match f.finished {
                true => WorkEvent::Finished,
                false => WorkEvent::Canceled,
            };
            groups.push(Group {
                g,
                sid: &f.session_id,
                event: event.as_str(),
            });
            for (key, name) in &f.deletes {
                tags.push(TagRow {
                    n: tags.len(),
                    g,
                    ns: &key.namespace,
                    kind: &key.kind,
                    id: &key.id,
                    name,
                });
            }
            for (key, token) in &f.releases {
                releases.push(WorkRow {
                    n: releases.len(),
                    g,
                    ns: &key.namespace,
                    kind: &key.kind,
                    id: &key.id,
                    p: &f.process,
                    token: *token,
                    fin: f.finished,
                });
            }
        }
        FinishParams {
            groups: work::json_rows(&groups),
            tags: work::json_rows(&tags),
            work: work::json_rows(&releases),
            now: finishes.iter().map(|f| f.now).max().unwrap_or_default(),
        }
    }

    /// [`SQL`]'s parameters.
    pub(crate) fn params(&self) -> [Param<'_>; 4] {
        [&self.groups, &self.now, &self.tags, &self.work]
    }
}

/// What [`SQL`]'s row says: the finishes that passed and the revision of each tag deleted.
pub(crate) struct FinishRow {
    passed: HashSet<usize>,
    revisions: HashMap<(ObjectKey, String), Revision>,
}

impl FinishRow {
    /// Whether finish `g` of the statement passed its checks (and wrote).
    pub(crate) fn passed(&self, g: usize) -> bool {
        self.passed.contains(&g)
    }

    pub(crate) fn decode(rows: &[Row]) -> Result<FinishRow> {
        let row = rows
            .first()
            .ok_or_else(|| Error::Backend("the finish statement returned no row".into()))?;
        let passed = match row.try_get::<_, Option<String>>(0).map_err(db_err)? {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| Error::Backend(format!("the finishes that passed: {e}")))?,
            None => HashSet::new(),
        };
        let mut revisions = HashMap::new();
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
        Ok(FinishRow { passed, revisions })
    }
}

#[cfg(test)]
mod tests {
    use fleetdb_core::{Precondition, Timestamp};

    use super::*;

    fn finish(session: &str, process: &str, tags: &[&str], claims: &[&str]) -> FusedFinish {
        let key = |id: &str| ObjectKey::new("default", "job", id).unwrap();
        let mut ops: Vec<Op> = tags
            .iter()
            .map(|id| Op::TagDelete {
                key: key(id),
                name: "t".into(),
            })
            .collect();
        ops.extend(claims.iter().map(|id| Op::WorkRelease {
            key: key(id),
            process: process.into(),
            session_id: session.into(),
            token: 1,
            outcome: Outcome::Finished,
        }));
        FusedFinish::new(&Batch {
            preconditions: vec![Precondition::SessionAlive {
                session_id: session.into(),
            }],
            ops,
            now: Timestamp(1),
        })
        .unwrap()
    }

    /// The statement leaves the finishes that passed where a claim behind it reads them.
    #[test]
    fn the_statement_hands_the_passed_finishes_to_the_take() {
        assert!(SQL.contains(&format!("set_config('{}'", crate::work::PASSED_GUC)));
    }

    /// Finishes that share a transaction's statement must touch distinct tags and claims: a
    /// claim counts per process.
    #[test]
    fn finishes_that_touch_a_common_tag_or_claim_are_not_disjoint() {
        let a = finish("s1", "P", &["j1"], &["j1"]);
        assert!(finish("s2", "P", &["j2"], &["j2"]).disjoint(&[&a]));
        assert!(
            !finish("s2", "P", &["j1"], &["j2"]).disjoint(&[&a]),
            "a tag"
        );
        assert!(
            !finish("s2", "P", &["j2"], &["j1"]).disjoint(&[&a]),
            "a claim"
        );
        assert!(
            finish("s2", "Q", &["j2"], &["j1"]).disjoint(&[&a]),
            "another process's claim of the object"
        );
        assert!(finish("s2", "P", &["j1"], &["j2"]).disjoint(&[]));
    }

    /// Each finish of a grouped statement is numbered and carries its session, process and
    /// event; tag deletes and releases are numbered in op order across the finishes.
    #[test]
    fn grouped_parameters_number_finishes_and_ops() {
        let (a, b) = (
            finish("s1", "P", &["j1"], &["j1"]),
            finish("s2", "Q", &["j2", "j3"], &["j2"]),
        );
        let p = FinishParams::new(&[&a, &b]);
        let groups: serde_json::Value = serde_json::from_str(&p.groups).unwrap();
        assert_eq!(groups[1]["g"], 1);
        assert_eq!(groups[1]["sid"], "s2");
        assert_eq!(groups[1]["event"], "Finished");
        let tags: serde_json::Value = serde_json::from_str(&p.tags).unwrap();
        assert_eq!(tags[2]["n"], 2);
        assert_eq!(tags[2]["g"], 1);
        assert_eq!(tags[2]["id"], "j3");
        let work: serde_json::Value = serde_json::from_str(&p.work).unwrap();
        assert_eq!(work[1]["p"], "Q");
        assert_eq!(work[1]["fin"], true);
        assert_eq!(p.now, 1);
    }
}
