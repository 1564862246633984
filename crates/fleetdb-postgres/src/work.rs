//! Sessions, processes, work, backoff and history on PostgreSQL: SQL text, row decoding, the work
//! half of [`TxRows`](fleetdb_core::backend::TxRows) (called from [`crate::tx`]) and the plain
//! reads. Mirrors `fleetdb-sqlite/src/work.rs` statement by statement.
//!
//! Selector SQL (claim candidates, `select`, `count`) varies with the selector, so it is sent with
//! `query_typed`: an unnamed statement with declared parameter types, parsed, bound and executed
//! in ONE round trip and never cached (neither in the client nor on the server), however many
//! different selectors callers use.

use std::collections::HashMap;
use std::sync::Arc;

use fleetdb_core::apply::stored_key;
use fleetdb_core::backend::{CandidateQuery, WorkStats};
use fleetdb_core::selector::{Dialect, Selector, SqlParam, CLAIM_LEAD_FILTER};
use fleetdb_core::work::{BackoffInfo, HistoryEntry, Process, SessionInfo, WorkEvent, WorkInfo};
use fleetdb_core::{Error, Object, ObjectKey, Result, Timestamp};
use tokio_postgres::types::Type;
use tokio_postgres::Row;

use crate::error::db_err;
use crate::sql::{object_from_row, Param};
use crate::tx::{Owned, PgTx};

/// `vec![Box::new(a) as Owned, …]`: parameters of a deferred write.
macro_rules! owned {
    ($($p:expr),* $(,)?) => {
        vec![$(Box::new($p) as Owned),*]
    };
}

pub(crate) const SESSION_GET: &str =
    "SELECT id, component, host, runtime_info, ttl_ms, created_at, deadline FROM sessions \
     WHERE id = $1";
pub(crate) const SESSION_LIST: &str =
    "SELECT id, component, host, runtime_info, ttl_ms, created_at, deadline FROM sessions \
     WHERE id > $1 ORDER BY id LIMIT $2";
const SESSION_INSERT: &str = "INSERT INTO sessions \
     (id, component, host, runtime_info, ttl_ms, created_at, deadline) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";
const SESSION_REMOVE: &str = "DELETE FROM sessions WHERE id = $1";
const SESSIONS_EXPIRED: &str =
    "SELECT id, component, host, runtime_info, ttl_ms, created_at, deadline FROM sessions \
     WHERE deadline <= $1 ORDER BY deadline, id LIMIT $2";
/// ONE statement renews every listed session still alive at `$1`. The ids come as one JSON array
/// text (rather than a `text[]`), as the SQLite backend passes them to `json_each`. The join
/// drives from the id list into the primary key, a plan that holds whatever the table's
/// statistics say and also as a cached generic plan (the `IN (subquery)` form became a nested
/// loop over the whole table once statistics said it was empty, and `= ANY(ARRAY(…))` a
/// sequential scan once the statement's plan was cached: 10,000 sessions took seconds).
pub(crate) const SESSION_RENEW: &str =
    "UPDATE sessions s SET deadline = $1::bigint + s.ttl_ms * 1000 \
     FROM jsonb_array_elements_text(($2::text)::jsonb) AS ids(id) \
     WHERE s.id = ids.id AND s.deadline > $1::bigint RETURNING s.id, s.deadline";

pub(crate) const PROCESS_ALL: &str =
    "SELECT name, conflicts, created_at, paused, max_active, max_failures FROM processes \
     ORDER BY name";
const PROCESS_GET: &str =
    "SELECT name, conflicts, created_at, paused, max_active, max_failures FROM processes \
     WHERE name = $1";
const PROCESS_PUT: &str =
    "INSERT INTO processes (name, conflicts, created_at, paused, max_active, max_failures) \
     VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (name) DO UPDATE SET conflicts = excluded.conflicts, paused = excluded.paused, \
       max_active = excluded.max_active, max_failures = excluded.max_failures";
/// Claims of a limited process take turns from here to their commit (`TxRows::lock_process`).
const PROCESS_LOCK: &str = "SELECT 1 FROM processes WHERE name = $1 FOR UPDATE";
/// The same, sent before find-and-lock by a selector claim whose hand saw the process limited
/// ([`Hand::limited`]); nothing for a process without a limit.
pub(crate) const PROCESS_LOCK_LIMITED: &str =
    "SELECT 1 FROM processes WHERE name = $1 AND max_active IS NOT NULL FOR UPDATE";
/// Claims of a process held by live sessions.
const WORK_COUNT_LIVE: &str = "SELECT count(*) FROM work w JOIN sessions s ON s.id = w.session_id \
     WHERE w.process = $1 AND s.deadline > $2";

macro_rules! work_get {
    ($lock:literal) => {
        concat!(
            "SELECT namespace, kind, id, process, session_id, token, started_at FROM work \
             WHERE namespace = $1 AND kind = $2 AND id = $3 AND process = $4",
            $lock
        )
    };
}
const WORK_GET: &str = work_get!("");
/// [`WORK_GET`] for a READ COMMITTED finish: the claim's row stays as read until it commits.
const WORK_GET_LOCKED: &str = work_get!(" FOR UPDATE");
/// [`WORK_GET`] for a fenced write's precondition: a release, expiry or takeover of the claim
/// (each deletes or replaces the row) waits for this transaction, and one that committed after
/// its snapshot makes it fail with a serialization error (and retry, to `WorkLost`). A plain
/// read would not do: claims and finishes run READ COMMITTED, outside SSI's conflict tracking.
const WORK_GET_SHARED: &str = work_get!(" FOR SHARE");
const WORK_OF_SESSION: &str =
    "SELECT namespace, kind, id, process, session_id, token, started_at FROM work \
     WHERE session_id = $1 ORDER BY namespace, kind, id, process";
/// Claim rows whose session row is gone (`apply_orphans`): an anti-join over every claim, run
/// now and then, not on every sweep.
const WORK_ORPHANED: &str =
    "SELECT namespace, kind, id, process, session_id, token, started_at FROM work w \
     WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = w.session_id) LIMIT $1";
const WORK_INSERT: &str =
    "INSERT INTO work (namespace, kind, id, process, session_id, token, started_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";
const WORK_REMOVE: &str =
    "DELETE FROM work WHERE namespace = $1 AND kind = $2 AND id = $3 AND process = $4";
/// `$1` process, `$2` session (each or NULL), `$3`..`$6` the cursor (process, namespace,
/// kind, id; NULL for the first page), `$7` the limit.
pub(crate) const WORK_LIST: &str =
    "SELECT namespace, kind, id, process, session_id, token, started_at FROM work \
     WHERE ($1::text IS NULL OR process = $1::text) AND ($2::text IS NULL OR session_id = $2::text) \
       AND ($3::text IS NULL OR (process, namespace, kind, id) > ($3::text, $4::text, $5::text, $6::text)) \
     ORDER BY process, namespace, kind, id LIMIT $7";

const BACKOFF_GET: &str =
    "SELECT namespace, kind, id, process, until, cause, last_interval_s, failures \
     FROM work_backoff WHERE namespace = $1 AND kind = $2 AND id = $3 AND process = $4";
const BACKOFF_PUT: &str = "INSERT INTO work_backoff \
     (namespace, kind, id, process, until, cause, last_interval_s, failures) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (namespace, kind, id, process) DO UPDATE SET until = excluded.until, \
     cause = excluded.cause, last_interval_s = excluded.last_interval_s, \
     failures = excluded.failures";
const BACKOFF_REMOVE: &str =
    "DELETE FROM work_backoff WHERE namespace = $1 AND kind = $2 AND id = $3 AND process = $4";
/// `$1` process, `$2` active at (each or NULL), `$3`..`$6` the cursor (as [`WORK_LIST`]'s),
/// `$7` the limit.
pub(crate) const BACKOFF_LIST: &str =
    "SELECT namespace, kind, id, process, until, cause, last_interval_s, failures \
     FROM work_backoff \
     WHERE ($1::text IS NULL OR process = $1::text) AND ($2::bigint IS NULL OR until > $2::bigint) \
       AND ($3::text IS NULL OR (process, namespace, kind, id) > ($3::text, $4::text, $5::text, $6::text)) \
     ORDER BY process, namespace, kind, id LIMIT $7";

/// `seq` is an identity column: the server numbers the row.
const HISTORY_APPEND: &str = "INSERT INTO work_history \
     (namespace, kind, id, process, event, session_id, component, host, token, at, cause) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
pub(crate) const HISTORY_OF_OBJECT: &str =
    "SELECT seq, namespace, kind, id, process, event, session_id, component, host, token, at, \
     cause FROM work_history WHERE namespace = $1 AND kind = $2 AND id = $3 AND seq < $4 \
     ORDER BY seq DESC LIMIT $5";
pub(crate) const HISTORY_OF_PROCESS: &str =
    "SELECT seq, namespace, kind, id, process, event, session_id, component, host, token, at, \
     cause FROM work_history WHERE process = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3";
/// One batch of [`fleetdb_core::Backend::history_prune`]: of the `$2` oldest rows (by `seq`),
/// delete those before the first one written at or after `$1` (an exact `seq` range of the
/// primary key; nothing reads `at` through an index since migration 0011).
pub(crate) const HISTORY_PRUNE: &str = "WITH head AS MATERIALIZED (\
       SELECT seq, at FROM work_history ORDER BY seq LIMIT $2), \
     stop AS (SELECT coalesce(min(seq), 9223372036854775807) AS seq FROM head WHERE at >= $1), \
     d AS (DELETE FROM work_history WHERE seq IN \
       (SELECT h.seq FROM head h WHERE h.seq < (SELECT seq FROM stop)) \
       AND seq < (SELECT max(seq) FROM work_history) RETURNING 1) \
     SELECT count(*) FROM d";

/// Per declared process: claims held by live sessions, backoffs still running at `$1` and, of
/// those, the parked ones (`until` = [`fleetdb_core::work::PARKED`], `$2`).
pub(crate) const WORK_STATS: &str = "SELECT p.name, \
     (SELECT count(*) FROM work w JOIN sessions s ON s.id = w.session_id \
       WHERE w.process = p.name AND s.deadline > $1::bigint), \
     (SELECT count(*) FROM work_backoff b WHERE b.process = p.name AND b.until > $1::bigint), \
     (SELECT count(*) FROM work_backoff b WHERE b.process = p.name AND b.until = $2::bigint) \
     FROM processes p ORDER BY p.name";

const NEXT_TOKEN: &str = "SELECT nextval('fleetdb_fencing')";

// ---- rows ----

pub(crate) fn session_from_row(r: &Row) -> Result<SessionInfo> {
    Ok(SessionInfo {
        id: r.try_get(0).map_err(db_err)?,
        component: r.try_get(1).map_err(db_err)?,
        host: r.try_get(2).map_err(db_err)?,
        runtime_info: r.try_get(3).map_err(db_err)?,
        ttl_ms: r.try_get(4).map_err(db_err)?,
        created_at: Timestamp(r.try_get(5).map_err(db_err)?),
        deadline: Timestamp(r.try_get(6).map_err(db_err)?),
    })
}

pub(crate) fn work_from_row(r: &Row) -> Result<WorkInfo> {
    Ok(WorkInfo {
        key: key_from_row(r)?,
        process: r.try_get(3).map_err(db_err)?,
        session_id: r.try_get(4).map_err(db_err)?,
        token: r.try_get(5).map_err(db_err)?,
        started_at: Timestamp(r.try_get(6).map_err(db_err)?),
    })
}

pub(crate) fn backoff_from_row(r: &Row) -> Result<BackoffInfo> {
    Ok(BackoffInfo {
        key: key_from_row(r)?,
        process: r.try_get(3).map_err(db_err)?,
        until: Timestamp(r.try_get(4).map_err(db_err)?),
        cause: r.try_get(5).map_err(db_err)?,
        last_interval_s: r.try_get(6).map_err(db_err)?,
        failures: u64::try_from(r.try_get::<_, i64>(7).map_err(db_err)?).unwrap_or(1),
    })
}

pub(crate) fn history_from_row(r: &Row) -> Result<HistoryEntry> {
    let event: String = r.try_get(5).map_err(db_err)?;
    Ok(HistoryEntry {
        seq: r.try_get(0).map_err(db_err)?,
        key: stored_key(
            r.try_get(1).map_err(db_err)?,
            r.try_get(2).map_err(db_err)?,
            r.try_get(3).map_err(db_err)?,
        ),
        process: r.try_get(4).map_err(db_err)?,
        event: WorkEvent::parse(&event)?,
        session_id: r.try_get(6).map_err(db_err)?,
        component: r.try_get(7).map_err(db_err)?,
        host: r.try_get(8).map_err(db_err)?,
        token: r.try_get(9).map_err(db_err)?,
        at: Timestamp(r.try_get(10).map_err(db_err)?),
        cause: r.try_get(11).map_err(db_err)?,
    })
}

pub(crate) fn process_from_row(r: &Row) -> Result<Process> {
    let conflicts: String = r.try_get(1).map_err(db_err)?;
    Ok(Process {
        name: r.try_get(0).map_err(db_err)?,
        conflicts: serde_json::from_str(&conflicts)
            .map_err(|e| Error::Backend(format!("corrupt process conflicts in the store: {e}")))?,
        created_at: Timestamp(r.try_get(2).map_err(db_err)?),
        paused: r.try_get(3).map_err(db_err)?,
        max_active: r
            .try_get::<_, Option<i64>>(4)
            .map_err(db_err)?
            .map(|n| n.max(0) as u64),
        max_failures: r
            .try_get::<_, Option<i64>>(5)
            .map_err(db_err)?
            .map(|n| n.max(0) as u64),
    })
}

pub(crate) fn work_stats_from_row(r: &Row) -> Result<WorkStats> {
    let count = |i: usize| -> Result<u64> {
        let n: i64 = r.try_get(i).map_err(db_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    Ok(WorkStats {
        process: r.try_get(0).map_err(db_err)?,
        active_work: count(1)?,
        active_backoffs: count(2)?,
        parked: count(3)?,
    })
}

/// An object key from the first three columns.
fn key_from_row(r: &Row) -> Result<ObjectKey> {
    Ok(stored_key(
        r.try_get(0).map_err(db_err)?,
        r.try_get(1).map_err(db_err)?,
        r.try_get(2).map_err(db_err)?,
    ))
}

/// A JSON array of strings, as text.
pub(crate) fn json_list(items: &[String]) -> String {
    json_rows(items)
}

/// `rows` as a JSON array, as text (strings, or rows of plain fields: serializing them cannot
/// fail).
pub(crate) fn json_rows<T: serde::Serialize>(rows: &[T]) -> String {
    serde_json::to_string(rows).unwrap_or_else(|_| "[]".to_string())
}

pub(crate) fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

// ---- selector SQL ----

/// Parameters of a compiled selector query, with the types `query_typed` declares.
#[derive(Clone)]
pub(crate) struct TypedParams(Vec<SqlParam>);

impl TypedParams {
    /// Parameters compiled elsewhere (a World query), in placeholder order.
    pub(crate) fn new(params: Vec<SqlParam>) -> Self {
        TypedParams(params)
    }

    /// The parameters as SQL literals (tests `EXECUTE` prepared statements with them).
    #[cfg(test)]
    pub(crate) fn literals(&self) -> String {
        self.0
            .iter()
            .map(|p| match p {
                SqlParam::Text(t) => format!("'{}'", t.replace('\'', "''")),
                SqlParam::Int(i) => i.to_string(),
                SqlParam::Float(f) => f.to_string(),
                SqlParam::Bool(b) => b.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Replace the claim hand, the last three parameters of [`claim_lock_sql`].
    pub(crate) fn set_hand(&mut self, hand: &ObjectKey) {
        let n = self.0.len();
        if n >= 3 {
            self.0[n - 3] = SqlParam::Text(hand.namespace.clone());
            self.0[n - 2] = SqlParam::Text(hand.kind.clone());
            self.0[n - 1] = SqlParam::Text(hand.id.clone());
        }
    }

    /// Append a parameter; returns its placeholder, with a cast matching its declared type.
    fn push(&mut self, p: SqlParam) -> String {
        let cast = match &p {
            SqlParam::Text(_) => "::text",
            SqlParam::Int(_) => "::bigint",
            SqlParam::Float(_) => "::float8",
            SqlParam::Bool(_) => "::boolean",
        };
        self.0.push(p);
        format!("{}{cast}", Dialect::Postgres.placeholder(self.0.len()))
    }

    /// The values in placeholder order (every placeholder carries its cast, so a statement
    /// prepared from the text knows the types).
    pub(crate) fn values(&self) -> Vec<Param<'_>> {
        self.0
            .iter()
            .map(|p| match p {
                SqlParam::Text(s) => s as Param<'_>,
                SqlParam::Int(i) => i as Param<'_>,
                SqlParam::Float(f) => f as Param<'_>,
                SqlParam::Bool(b) => b as Param<'_>,
            })
            .collect()
    }

    /// The `(value, type)` pairs `query_typed` takes.
    pub(crate) fn typed(&self) -> Vec<(Param<'_>, Type)> {
        self.0
            .iter()
            .map(|p| match p {
                SqlParam::Text(s) => (s as Param<'_>, Type::TEXT),
                SqlParam::Int(i) => (i as Param<'_>, Type::INT8),
                SqlParam::Float(f) => (f as Param<'_>, Type::FLOAT8),
                SqlParam::Bool(b) => (b as Param<'_>, Type::BOOL),
            })
            .collect()
    }
}

/// `FROM objects o <joins> WHERE (<selector>)` and its parameters, numbered from `$1`: the joins
/// first (their placeholders come first in the text), then the condition.
fn selector_from_where(selector: &Selector, now: Timestamp) -> (String, TypedParams) {
    let mut params = Vec::new();
    let joins = selector.tag_joins(Dialect::Postgres, &mut params);
    let cond = selector.to_sql(Dialect::Postgres, now, &mut params);
    (
        format!("FROM objects o{joins} WHERE ({cond})"),
        TypedParams(params),
    )
}

/// Where [`selector_on_keys`] finds its keys: a JSON text parameter, or rows of
/// `(ns, kind, id, sid, r)` (an SQL FROM item, such as a CTE's name).
enum Keys {
    Json(String),
    Rows(&'static str),
}

/// [`selector_from_where`] restricted to the objects listed in `keys` (a JSON array of
/// `{"ns","kind","id"}`, or rows that also carry the claiming session `sid` and request `r`):
/// `FROM <keys> k CROSS JOIN LATERAL (<selector on k>) o WHERE TRUE`. The
/// claim re-checks after locking use it. The listed keys drive: each is one primary-key probe of
/// `objects` (and of each tag the selector joins), whatever the planner believes of the tables.
/// The `(key) IN (<keys>)` form let a planner without statistics walk the selector's whole tag
/// index and test every entry against the list: a one-object claim cost O(backlog).
fn selector_on_keys(selector: &Selector, now: Timestamp, keys: Keys) -> (String, TypedParams) {
    let mut params = Vec::new();
    let joins = selector.tag_joins(Dialect::Postgres, &mut params);
    let cond = selector.to_sql(Dialect::Postgres, now, &mut params);
    let mut params = TypedParams(params);
    let keys = match keys {
        Keys::Json(json) => format!(
            "jsonb_to_recordset(({})::jsonb) AS k(ns text, kind text, id text, sid text, r bigint)",
            params.push(SqlParam::Text(json))
        ),
        Keys::Rows(rows) => format!("{rows} AS k"),
    };
    (
        format!(
            "FROM {keys} \
             CROSS JOIN LATERAL (SELECT o.namespace, o.kind, o.id FROM objects o{joins} \
               WHERE o.namespace = k.ns AND o.kind = k.kind AND o.id = k.id AND ({cond}) \
               OFFSET 0) o WHERE TRUE"
        ),
        params,
    )
}

/// [`selector_from_where`] for the first step of a claim: the FROM clause starts from the
/// first required tag (see `Selector::claim_from_sql`).
fn claim_from_where(selector: &Selector, now: Timestamp) -> (String, TypedParams) {
    let mut params = Vec::new();
    let from = selector.claim_from_sql(&mut params);
    let cond = selector.to_sql(Dialect::Postgres, now, &mut params);
    (format!("FROM {from} WHERE ({cond})"), TypedParams(params))
}

/// The candidates of a selector claim: matching objects that no live session holds for any of the
/// excluded processes and that are not in an active backoff for the process.
pub(crate) fn claim_candidates_sql(q: &CandidateQuery) -> (String, TypedParams) {
    claim_candidates_sql_in(q, None)
}

/// The candidate query; with `only` (a JSON array of `{"ns","kind","id"}`), restricted to those
/// objects (the re-check after locking).
fn claim_candidates_sql_in(q: &CandidateQuery, only: Option<String>) -> (String, TypedParams) {
    let (base, mut params) = match only {
        Some(only) => selector_on_keys(&q.selector, q.now, Keys::Json(only)),
        None => selector_from_where(&q.selector, q.now),
    };
    let exclude = params.push(SqlParam::Text(json_list(&q.exclude)));
    let now = params.push(SqlParam::Int(q.now.0));
    let process = params.push(SqlParam::Text(q.process.clone()));
    let limit = params.push(SqlParam::Int(limit_param(q.limit)));
    let ex = format!("SELECT jsonb_array_elements_text(({exclude})::jsonb)");
    let free = candidate_free_sql(&ex, &process, &now, "o");
    let sql = format!(
        "SELECT o.namespace, o.kind, o.id {base} {free} \
         ORDER BY o.namespace, o.kind, o.id LIMIT {limit}"
    );
    (sql, params)
}

/// The processes a claim for `{process}` excludes (itself and every process it conflicts with, in
/// either direction), as SQL over the `processes` table, given the placeholder of the process
/// name. Computed inside the claim's statement, so a claim reads no process rows of its own.
fn exclusions_sql(process: &str) -> String {
    format!(
        "SELECT p.name FROM processes p, processes me WHERE me.name = {process} \
         AND (p.name = me.name OR (p.conflicts)::jsonb ? me.name OR (me.conflicts)::jsonb ? p.name)"
    )
}

/// The claim steps' test that candidate `o` is free: no live session holds it for an excluded
/// process (`ex`: their names, as SQL) and it is not in backoff for `process`. Each test is a
/// correlated subquery kept out of the join tree (`OFFSET 0`), so it runs per candidate as one
/// primary-key probe: a claim visits the first candidates in key order and stops, and the planner,
/// left to itself, may instead join every held or backed-off row against every candidate.
///
/// `k` is the alias whose key columns the tests name: the leading tag's in the first step (see
/// `Selector::claim_key_alias`), so a candidate held by another worker is skipped before its
/// object is even looked up (in a burn-down, every claim passes over the claims the other
/// workers hold).
///
/// Both probes name only keys inside subqueries kept out of the join tree (`OFFSET 0`), as
/// [`not_in_backoff_sql`] does, so they can only be exact probes whatever the statistics: the
/// candidate's work rows of the excluded processes (by the full key, exact in both indexes that
/// can serve it, see migration 0010), then each one's session (by its id). Written as plain
/// conditions, a generic plan made with a few live sessions drove the test from the live
/// sessions (`sessions_deadline`) into `work_session`, reading every work row each session ever
/// held, dead ones included, once per candidate: ~3,000 buffers for a claim of one in the
/// one-at-a-time benchmark (plan-guard test `claim_probes_work_by_the_candidate_key`).
fn candidate_free_sql(ex: &str, process: &str, now: &str, k: &str) -> String {
    format!(
        "AND NOT EXISTS (SELECT 1 FROM (SELECT w.session_id FROM work w \
           WHERE w.namespace = {k}.namespace AND w.kind = {k}.kind AND w.id = {k}.id \
           AND w.process = ANY (ARRAY({ex})) OFFSET 0) w \
           WHERE EXISTS (SELECT 1 FROM (SELECT ws.deadline FROM sessions ws \
             WHERE ws.id = w.session_id OFFSET 0) ws WHERE ws.deadline > {now})) {backoff}",
        backoff = not_in_backoff_sql(process, now, k)
    )
}

/// `AND` candidate `k` is not in backoff for `process` at `now`. The probe names the full key
/// (object and process) inside a subquery kept out of the join tree, and `until` outside it, so
/// it is an exact lookup in either index that can serve it (the primary key, or since migration
/// 0010 `work_backoff_process`, which ends with the key). Written as one condition with `until`,
/// a generic plan made while `work_backoff` was empty used the old `work_backoff_process`
/// (process, until), scanning every backoff of the process once per candidate: 380 ms for a
/// claim of 10 past 2,000 backed-off objects; naming the object's key alone, after 0010 a plan
/// read the whole new index for the key's columns behind the process (plan-guard test
/// `claim_reads_one_backoff_row_per_candidate`).
fn not_in_backoff_sql(process: &str, now: &str, k: &str) -> String {
    format!(
        "AND NOT EXISTS (SELECT 1 FROM (SELECT b.until FROM work_backoff b \
           WHERE b.namespace = {k}.namespace AND b.kind = {k}.kind AND b.id = {k}.id \
           AND b.process = {process} OFFSET 0) b WHERE b.until > {now})"
    )
}

/// Step 1 of a selector claim (one statement, pipelined with `BEGIN`, READ COMMITTED): which of
/// the claiming `sessions` are alive (a JSON array of their ids, NULL when none is), whether the
/// process is declared, the candidates, found and locked (`FOR UPDATE OF o SKIP LOCKED`, so
/// concurrent claimers take different objects) as a JSON array of `{"ns","kind","id"}` in key
/// order (NULL when there are none), and, when they are fewer than the limit, the change log's
/// revision in the same snapshot (NULL otherwise; an initplan run only then): a claim that comes
/// back short hands it to `claim_wait`, which waits for a later one instead of reading it in a
/// statement of its own (one or two per job at moderate load); the alive sessions and the candidates are also left in the
/// transaction's settings ([`ALIVE_GUC`], [`LOCKED_GUC`]) for step 2, pipelined behind it in the
/// same round trip. Several sessions: the claims of one process's workers
/// sharing a transaction ([`crate::claims`]); candidates are found while any of them is alive.
/// The sessions are probed by id only (a subquery kept out of the join tree), never through
/// `sessions_deadline`: that would read every live session (plan-guard test
/// `claim_probes_work_by_the_candidate_key`).
///
/// The scan starts after `hand` (the claim cursor, see [`ClaimHands`]) and wraps around: the
/// candidates after it in key order, then, only if those were fewer than the limit, the ones up
/// to it. The two passes are two rows of bounds (`VALUES`) driving ONE lateral scan under one
/// `LIMIT` (the second pass never runs when the first fills it): the plan holds the candidate
/// scan and its tests once. Written as a `UNION ALL` of two copies, half of a plan of ~58 nodes
/// was never run yet initialized by every execution, and initializing plans was ~30 % of
/// PostgreSQL's CPU in the one-at-a-time benchmark. A claim then starts where this process's
/// previous claim stopped instead of passing, in every claim, the candidates other workers hold
/// and the index entries of finished ones.
/// The hand's three parameters are the last ones ([`TypedParams::set_hand`]): the text does
/// not depend on it.
///
/// A process with a limit has its row locked here (`lk`, before the candidates: the select
/// list is evaluated in order; its last column, `limited`, is what makes it run), and held to
/// commit: claims of a limited process take turns from here, and step 2 counts the room in a
/// snapshot taken after the lock ([`claim_take_sql`]). A paused process finds no candidates.
pub(crate) fn claim_lock_sql(
    q: &CandidateQuery,
    sessions: &[String],
    hand: &ObjectKey,
) -> (String, TypedParams) {
    let (base, mut params) = claim_from_where(&q.selector, q.now);
    let sids = params.push(SqlParam::Text(json_list(sessions)));
    let now = params.push(SqlParam::Int(q.now.0));
    let process = params.push(SqlParam::Text(q.process.clone()));
    let limit = params.push(SqlParam::Int(limit_param(q.limit)));
    let h_ns = params.push(SqlParam::Text(hand.namespace.clone()));
    let h_kind = params.push(SqlParam::Text(hand.kind.clone()));
    let h_id = params.push(SqlParam::Text(hand.id.clone()));
    let ex = exclusions_sql(&process);
    let k = q.selector.claim_key_alias();
    let free = candidate_free_sql(&ex, &process, &now, &k);
    // The scan's bounds on `cols` come from the pass (`r`): after the hand, then up to it.
    let bounds = |cols: &str| {
        format!("AND {cols} > (r.lns, r.lkind, r.lid) AND {cols} <= (r.uns, r.ukind, r.uid)")
    };
    // The bounds go inside the leading tag's subquery, where they bound the index scan (see
    // `CLAIM_LEAD_FILTER`); without a leading tag, on `o` (a primary-key range).
    let (from, outer) = if base.contains(CLAIM_LEAD_FILTER) {
        let inner = bounds("(namespace, kind, id)");
        (base.replace(CLAIM_LEAD_FILTER, &inner), String::new())
    } else {
        (
            base.clone(),
            bounds(&format!("({k}.namespace, {k}.kind, {k}.id)")),
        )
    };
    let c = |h: &str| format!("{h} COLLATE \"C\"");
    let (hn, hk, hi) = (c(&h_ns), c(&h_kind), c(&h_id));
    let top = c("'~'"); // above every valid name (letters, digits, '.', '_', '-')
    let low = c("''"); // below every valid name (never empty)
    let passes = format!(
        "(VALUES ({hn}, {hk}, {hi}, {top}, {top}, {top}), ({low}, {low}, {low}, {hn}, {hk}, {hi})) \
         AS r(lns, lkind, lid, uns, ukind, uid)"
    );
    let sql = format!(
        "WITH s AS (SELECT id FROM (SELECT ss.id, ss.deadline FROM sessions ss \
           WHERE ss.id = ANY (ARRAY(SELECT jsonb_array_elements_text(({sids})::jsonb))) \
           OFFSET 0) ss WHERE ss.deadline > {now}), \
         me AS (SELECT paused FROM processes WHERE name = {process}), \
         lk AS MATERIALIZED (SELECT 1 FROM processes WHERE name = {process} \
           AND max_active IS NOT NULL FOR UPDATE), \
         c AS MATERIALIZED (SELECT b.namespace, b.kind, b.id FROM {passes} \
           CROSS JOIN LATERAL (SELECT o.namespace, o.kind, o.id {from} \
             AND EXISTS (SELECT 1 FROM s) AND EXISTS (SELECT 1 FROM me WHERE NOT me.paused) \
             {free} {outer} \
             ORDER BY o.namespace, o.kind, o.id LIMIT {limit} FOR UPDATE OF o SKIP LOCKED) AS b \
           LIMIT {limit}) \
         SELECT a.alive::text, a.declared, a.locked::text, \
           CASE WHEN COALESCE(jsonb_array_length(a.locked), 0) < {limit} THEN ({revision}) END, \
           set_config('{ALIVE_GUC}', COALESCE(a.alive, '[]'::jsonb)::text, true), \
           set_config('{LOCKED_GUC}', COALESCE(a.locked, '[]'::jsonb)::text, true), \
           a.limited \
         FROM (SELECT (SELECT jsonb_agg(id) FROM s) AS alive, EXISTS (SELECT 1 FROM me) AS declared, \
           EXISTS (SELECT 1 FROM lk) AS limited, \
           (SELECT jsonb_agg(jsonb_build_object('ns', c.namespace, 'kind', c.kind, 'id', c.id) \
              ORDER BY c.namespace, c.kind, c.id) FROM c) AS locked OFFSET 0) AS a",
        revision = crate::sql::REVISION_NOW
    );
    (sql, params)
}

/// Where each (process, selector) claim of this process scans from next: a clock hand over the
/// key space. After a claim it points at the last candidate taken in scan order (the largest one
/// up to the old hand if the scan wrapped, else the largest one taken), so consecutive claims
/// take consecutive stretches and every candidate is reached within one turn. A turn ends when a
/// claim wraps around; where new candidates keep coming after the hand (time-ordered ids of a
/// queue that is behind), that may not happen, and a candidate committed behind the hand (ids of
/// one millisecond commit in any order) would wait until the queue ran dry: so a claim starts at
/// the start of the key space once [`SWEEP_MAX`] has passed without one that covered it all.
/// Claims make no ordering promise (design.md invariant 19), so this only changes which
/// candidates come first. Bounded: forgotten wholesale past [`HANDS_MAX`] selectors.
#[derive(Default)]
pub(crate) struct ClaimHands(std::sync::Mutex<HashMap<(String, String), Arc<Hand>>>);

/// One (process, selector) hand.
#[derive(Default)]
pub(crate) struct Hand {
    at: std::sync::Mutex<HandAt>,
    /// Claims of many candidates take turns finding theirs ([`Hand::TURN_MIN`]).
    pub(crate) turn: tokio::sync::Mutex<()>,
    /// The last claim's find-and-lock found the process limited: the next ones lock its row
    /// in a statement of their own before it ([`PROCESS_LOCK_LIMITED`]). A hint only: a claim
    /// that guesses wrong is still correct (find-and-lock locks the row itself), only slower.
    limited: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct HandAt {
    /// Where the next claim starts (`None`: at the start).
    key: Option<ObjectKey>,
    /// When a claim last covered the whole key space: it started at the start, wrapped around,
    /// or found nothing (both passes ran). `None` before the first claim.
    swept: Option<Timestamp>,
}

/// (process, selector statement) pairs whose hands are kept.
const HANDS_MAX: usize = 1024;

/// The longest a hand goes without a claim that covers the whole key space: past it, the next
/// claim starts at the start, so no candidate waits behind the hand for longer while candidates
/// keep coming after it. Such a claim passes the candidates other claims hold and the index
/// entries of finished ones (what the hand saves), once a second per process and selector.
pub(crate) const SWEEP_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// The key before every key: a claim from it scans everything in its first branch.
pub(crate) fn hand_start() -> ObjectKey {
    ObjectKey {
        namespace: String::new(),
        kind: String::new(),
        id: String::new(),
    }
}

fn key_tuple(k: &ObjectKey) -> (&str, &str, &str) {
    (&k.namespace, &k.kind, &k.id)
}

impl ClaimHands {
    pub(crate) fn hand(&self, process: &str, statement: &str) -> Arc<Hand> {
        let mut hands = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (process.to_string(), statement.to_string());
        if let Some(h) = hands.get(&key) {
            return h.clone();
        }
        if hands.len() >= HANDS_MAX {
            hands.clear();
        }
        hands.entry(key).or_default().clone()
    }
}

impl Hand {
    /// Whether the last claim found the process limited.
    pub(crate) fn limited(&self) -> bool {
        self.limited.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_limited(&self, limited: bool) {
        self.limited
            .store(limited, std::sync::atomic::Ordering::Relaxed);
    }

    /// Claims of at least this many candidates find them one at a time per process (a tokio
    /// mutex held for the find-and-lock round trip only, taken before the transaction begins, so
    /// no database lock is held while waiting for it). Claims started together would otherwise
    /// all scan from the same hand, each passing every candidate the others are locking — at
    /// 100 per claim that was most of the find step's reads. Small claims pass few and do not
    /// wait.
    pub(crate) const TURN_MIN: usize = 16;

    /// Where a claim at `now` starts: at the hand, or at the start when [`SWEEP_MAX`] has passed
    /// since a claim last covered the whole key space, or the clock stepped back by as much (this
    /// one will: the time is noted now, so the claims beside it still start at the hand).
    pub(crate) fn get(&self, now: Timestamp) -> ObjectKey {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        let swept = *at.swept.get_or_insert(now);
        // Also when the clock stepped back that far (on PostgreSQL the server's clock, which a
        // `ServerClock` follows when it is stepped): waiting for it to catch up with the last
        // sweep's time would leave candidates behind the hand for as long as the step.
        if now.0.abs_diff(swept.0) >= SWEEP_MAX.as_micros() as u64 {
            at.swept = Some(now);
            return hand_start();
        }
        at.key.clone().unwrap_or_else(hand_start)
    }

    /// Move the hand after a claim at `now` that scanned from `from` and locked `locked` (a JSON
    /// array of `{"ns","kind","id"}`).
    pub(crate) fn advance(&self, from: &ObjectKey, locked: &str, now: Timestamp) {
        #[derive(serde::Deserialize)]
        struct Locked {
            ns: String,
            kind: String,
            id: String,
        }
        // Typed: read as `serde_json::Value`s (a map per key) this was 7 % of the client's CPU
        // in the burn-down. Keys that cannot be read leave the hand where it is.
        let Ok(keys) = serde_json::from_str::<Vec<Locked>>(locked) else {
            return;
        };
        let keys: Vec<ObjectKey> = keys
            .into_iter()
            .map(|k| ObjectKey {
                namespace: k.ns,
                kind: k.kind,
                id: k.id,
            })
            .collect();
        self.advance_to(from, &keys, now);
    }

    /// Move the hand after a claim at `now` that scanned from `from` and took `keys` (none: it
    /// stays).
    pub(crate) fn advance_to(&self, from: &ObjectKey, keys: &[ObjectKey], now: Timestamp) {
        let wrapped = keys
            .iter()
            .filter(|k| key_tuple(k) <= key_tuple(from))
            .max_by(|a, b| key_tuple(a).cmp(&key_tuple(b)));
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        if keys.is_empty() || wrapped.is_some() || *from == hand_start() {
            at.swept = Some(at.swept.map_or(now, |s| s.max(now)));
        }
        if let Some(next) =
            wrapped.or_else(|| keys.iter().max_by(|a, b| key_tuple(a).cmp(&key_tuple(b))))
        {
            at.key = Some(next.clone());
        }
    }
}

/// Transaction settings (`set_config(…, true)`) by which a claim's statements hand their
/// results to the next one in the same round trip: the alive claiming sessions and the locked
/// candidates (step 1, JSON arrays), and the finishes that passed (`finish::SQL`, a JSON array
/// of their numbers). Read with `NULLIF(…, '')`: once set in a connection, a setting outside the
/// transaction that set it reads as the empty string.
pub(crate) const ALIVE_GUC: &str = "fleetdb.claim_alive";
pub(crate) const LOCKED_GUC: &str = "fleetdb.claim_locked";
pub(crate) const PASSED_GUC: &str = "fleetdb.finish_passed";

/// One claim's place in step 2: claim `r` of the transaction (in arrival order) for session
/// `sid`, up to `n` candidates, after finish `f` of the transaction (if it finishes first:
/// only if that finish passed).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Slot {
    pub(crate) r: usize,
    pub(crate) sid: String,
    pub(crate) f: Option<usize>,
    pub(crate) n: usize,
    /// The claim's own time, written as its rows' `started_at` (and their `Started` history's
    /// time): a session tells its claims' rows apart by it (its next claim takes up what a
    /// claim whose answer was lost took), also in a transaction shared with other claims,
    /// which runs at the latest of their times.
    pub(crate) at: Timestamp,
}

/// The JSON of `slots` (with their order) that [`claim_take_sql`] takes.
pub(crate) fn slots_json(slots: &[Slot]) -> String {
    #[derive(serde::Serialize)]
    struct Row<'a> {
        o: usize,
        r: usize,
        sid: &'a str,
        f: Option<usize>,
        n: usize,
        at: i64,
    }
    let rows: Vec<Row> = slots
        .iter()
        .enumerate()
        .map(|(o, s)| Row {
            o,
            r: s.r,
            sid: &s.sid,
            f: s.f,
            n: s.n,
            at: s.at.0,
        })
        .collect();
    json_rows(&rows)
}

/// How many of `locked` candidates step 2 gives each slot: in slot order, each up to its `n`,
/// skipping slots whose session is not alive or whose finish did not pass (as
/// [`claim_take_sql`] assigns them).
pub(crate) fn assigned(
    slots: &[Slot],
    locked: usize,
    alive: impl Fn(&str) -> bool,
    passed: impl Fn(usize) -> bool,
) -> Vec<usize> {
    let mut left = locked;
    slots
        .iter()
        .map(|s| {
            if !alive(&s.sid) || s.f.is_some_and(|f| !passed(f)) {
                return 0;
            }
            let n = s.n.min(left);
            left -= n;
            n
        })
        .collect()
}

/// Step 2 of a selector claim (one statement, pipelined behind step 1 and followed by `COMMIT`
/// in the same round trip): step 1's candidates ([`LOCKED_GUC`]) go to the `slots`
/// ([`slots_json`]; see [`assigned`]) and are checked again in this statement's fresh snapshot
/// (a claim committed between step 1's snapshot and its lock is seen now, and so is a change
/// that made an object stop matching), and so is each slot's session, once per slot (`ss`:
/// probed per candidate, it cost a session probe per job, and another one for the history's
/// component and host); each survivor gets a fencing token, its work row (replacing a row of a
/// dead session, which gets `Expired` history first) and `Started` history. New work rows are
/// plain inserts and a dead session's row is updated in place (by the `ctid` its probe read):
/// `INSERT … ON CONFLICT` probed the key once more per candidate and wrote one more WAL record
/// (the speculative insertion's confirmation). No other transaction can insert the key
/// meanwhile: every claim path locks the object first, and this one holds its lock (a unique
/// violation would retry the claim). Each session is
/// probed by its id alone, in a subquery kept out of the join tree: joined plainly, a plan made
/// while `sessions` looked small read every session per take. Returns
/// `(namespace, kind, id, token, session, slot r, took_over)` in key order (`took_over`: the
/// row was a dead session's claim, taken over). Several slots: the claims of one process's workers sharing a transaction
/// ([`crate::claims`]).
///
/// The candidates go to the slots by position: each passing slot owns the positions (lo, hi] of
/// the running sum of the passing slots' limits, a join of candidates × slots (slots are few).
/// It was a join on one position per candidate, one row per position a slot could take
/// (`generate_series`): with hash and merge joins off, a nested loop of candidates × positions,
/// 10,000 comparisons and ~4 ms of a claim of 100's ~19 ms.
///
/// [`Take::Lean`] writes new work rows only, with their `Started` history: the plan leaves out
/// the probe for an existing row, its update and its `Expired` history (a third of the plan's
/// nodes, which every execution initializes). A candidate whose claim row a dead session still
/// holds then fails the insert on `work_pkey` (a transient failure: nothing is written), and the
/// claim's next attempt takes it over with [`Take::Takeover`]. Measured in the one-at-a-time
/// benchmark (`pg_stat_statements`, six runs of each, ~58,000 executions): 0.296 → 0.265 ms per
/// execution.
///
/// A process with a limit (`processes.max_active`) takes at most the room left: its
/// find-and-lock holds the process row locked (`FOR UPDATE`) until commit, so claims of a limited
/// process take turns from there, and this statement — a fresh snapshot, after the lock — counts
/// the live claims and cuts the candidates to the room (`room`; no limit: `LIMIT NULL`, and the
/// count is never evaluated). When it cut any, a row with `r` = [`CAPPED_ROW`] says so. That
/// machinery is in the take only when `limited` (the claimer's hand saw the process limited);
/// without it the take is gated on the process having no limit now, and takes nothing otherwise
/// (the claim then looks again, limited).
pub(crate) fn claim_take_sql(
    q: &CandidateQuery,
    slots: String,
    take: Take,
    limited: bool,
) -> (String, TypedParams) {
    let (base, mut params) = selector_on_keys(&q.selector, q.now, Keys::Rows("k0"));
    let slots = params.push(SqlParam::Text(slots));
    let now = params.push(SqlParam::Int(q.now.0));
    let process = params.push(SqlParam::Text(q.process.clone()));
    let ex = exclusions_sql(&process);
    let free = candidate_free_sql(&ex, &process, &now, "o");
    let setting =
        |name: &str| format!("COALESCE(NULLIF(current_setting('{name}', true), ''), '[]')::jsonb");
    let (alive, locked, passed) = (setting(ALIVE_GUC), setting(LOCKED_GUC), setting(PASSED_GUC));
    let writes = take_writes_sql(take, &process, &now);
    // Each answer row says whether it took a dead session's claim over (counted `expired`).
    let took_over = match take {
        Take::Lean => "false",
        Take::Takeover => "EXISTS (SELECT 1 FROM old WHERE old.n = t.n)",
    };
    // A takeover whose expiry, counted as a failure, parked the object takes nothing of it: no
    // answer row of `t`, one [`PARKED_ROW`] instead (its expiry is counted, the claim moves on).
    let (took, parked) = match take {
        Take::Lean => ("t".to_string(), String::new()),
        Take::Takeover => (
            "(SELECT * FROM t WHERE NOT EXISTS \
               (SELECT 1 FROM ex WHERE ex.n = t.n AND ex.parks)) AS t"
                .to_string(),
            format!(
                " UNION ALL SELECT ex.namespace, ex.kind, ex.id, NULL::bigint, NULL::text, \
                   {PARKED_ROW}::bigint, ex.n, true FROM ex WHERE ex.parks"
            ),
        ),
    };
    // The limit's machinery only for a process its claimer saw limited: every node of a plan is
    // initialized on every run, and `room` with the capped row is a quarter of this one's. A
    // process limited since takes nothing here (the gate) and is claimed again with it.
    let (room, bound, answer) = if limited {
        (
            format!(
                "room AS MATERIALIZED (SELECT CASE WHEN p.max_active IS NULL THEN NULL \
                   ELSE GREATEST(0, p.max_active - (SELECT count(*) FROM work w \
                     JOIN sessions s ON s.id = w.session_id \
                     WHERE w.process = {process} AND s.deadline > {now})) END AS n \
                 FROM processes p WHERE p.name = {process}), "
            ),
            "LIMIT (SELECT n FROM room)".to_string(),
            format!(
                "SELECT namespace, kind, id, token, sid, r, took_over FROM (SELECT namespace, \
                   kind, id, token, sid, r, n, {took_over} AS took_over FROM {took} UNION ALL \
                   SELECT NULL, NULL, NULL, room.n, NULL, {CAPPED_ROW}, 0, false FROM room \
                   WHERE room.n < (SELECT count(*) FROM c){parked}) AS x \
                 ORDER BY n"
            ),
        )
    } else {
        (
            String::new(),
            format!(
                "WHERE NOT EXISTS (SELECT 1 FROM processes p WHERE p.name = {process} \
                   AND p.max_active IS NOT NULL)"
            ),
            match take {
                Take::Lean => format!(
                    "SELECT namespace, kind, id, token, sid, r, {took_over} AS took_over FROM t \
                     ORDER BY n"
                ),
                Take::Takeover => format!(
                    "SELECT namespace, kind, id, token, sid, r, took_over FROM (SELECT namespace, \
                       kind, id, token, sid, r, n, {took_over} AS took_over FROM {took}{parked}) \
                       AS x ORDER BY n"
                ),
            },
        )
    };
    let sql = format!(
        "WITH sl AS MATERIALIZED (SELECT x.r, x.sid, x.at, \
             sum(x.n) OVER (ORDER BY x.o) - x.n AS lo, sum(x.n) OVER (ORDER BY x.o) AS hi \
           FROM jsonb_to_recordset(({slots})::jsonb) \
             AS x(o bigint, r bigint, sid text, f bigint, n bigint, at bigint) \
           WHERE (x.f IS NULL OR {passed} @> to_jsonb(x.f)) AND {alive} ? x.sid), \
         ss AS MATERIALIZED (SELECT sl.r, sl.sid, sl.at, sl.lo, sl.hi, s.component, s.host \
           FROM sl CROSS JOIN LATERAL (SELECT s.component, s.host FROM (SELECT component, host, \
             deadline FROM sessions WHERE id = sl.sid OFFSET 0) s WHERE s.deadline > {now}) s), \
         k0 AS MATERIALIZED (SELECT l.v ->> 'ns' AS ns, l.v ->> 'kind' AS kind, \
             l.v ->> 'id' AS id, ss.sid, ss.r, ss.at \
           FROM jsonb_array_elements({locked}) WITH ORDINALITY AS l(v, pos) \
           JOIN ss ON l.pos > ss.lo AND l.pos <= ss.hi), \
         c AS MATERIALIZED (SELECT o.namespace, o.kind, o.id, k.sid, k.r, k.at {base} {free} \
           ORDER BY o.namespace, o.kind, o.id), \
         {room}\
         t AS MATERIALIZED (SELECT c.namespace, c.kind, c.id, c.sid, c.r, c.at, \
           nextval('fleetdb_fencing') AS token, row_number() OVER () AS n FROM c {bound}), \
         {writes} \
         {answer}"
    );
    (sql, params)
}

/// The `r` of the row [`claim_take_sql`] adds when its process's limit left room for fewer
/// candidates than it had (its `token` column is the room): the claims it cut short were capped,
/// not outrun, and must not look for more.
pub(crate) const CAPPED_ROW: i64 = -1;

/// The `r` of a row [`claim_take_sql`] adds for each dead session's claim it expired and did
/// not take over because that expiry, counted as a failure, parked the object
/// (`apply::count_expiry`): counted `expired`, not taken (the claim looks on, as for a
/// candidate found gone).
pub(crate) const PARKED_ROW: i64 = -2;

/// How [`claim_take_sql`] writes the work rows of the candidates it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// New rows only (the common case: the first attempt of every claim).
    Lean,
    /// A row a dead session still holds is taken over in place, after its `Expired` history
    /// (at the session's deadline, as `apply::lapsed_at`). The row is locked as it is read: a sweep or the holder's late finish deleting it
    /// meanwhile drops it from the takeover (a new row is inserted instead, with no second
    /// `Expired`); read unlocked, the update found it gone and the claim answered with no row.
    Takeover,
}

/// The writes of [`claim_take_sql`] after its candidates `t` (with `ss`, the slots' sessions).
fn take_writes_sql(take: Take, process: &str, now: &str) -> String {
    const HISTORY: &str = "h AS (INSERT INTO work_history \
           (namespace, kind, id, process, event, session_id, component, host, token, at, cause)";
    let started =
        "SELECT t.n, t.namespace, t.kind, t.id, 'Started', t.sid, ss.component, ss.host, \
           t.token, t.at, NULL FROM t JOIN ss ON ss.r = t.r";
    match take {
        Take::Lean => format!(
            "up AS (INSERT INTO work (namespace, kind, id, process, session_id, token, started_at) \
               SELECT t.namespace, t.kind, t.id, {process}, t.sid, t.token, t.at FROM t), \
             {HISTORY} SELECT namespace, kind, id, {process}, event, session_id, component, host, \
               token, at, cause FROM ({started}) AS e(n, namespace, kind, id, event, session_id, \
               component, host, token, at, cause) ORDER BY n)"
        ),
        Take::Takeover => format!(
            "old AS MATERIALIZED (SELECT w.namespace, w.kind, w.id, w.session_id, w.token, \
               w.started_at, w.tid, t.n \
               FROM t CROSS JOIN LATERAL (SELECT w.*, w.ctid AS tid FROM work w \
                 WHERE w.namespace = t.namespace AND w.kind = t.kind AND w.id = t.id \
                 AND w.process = {process} OFFSET 0 FOR UPDATE) AS w), \
             ex AS MATERIALIZED (SELECT old.*, COALESCE(os.component, '') AS component, \
                 COALESCE(os.host, '') AS host, \
                 CASE WHEN os.deadline IS NULL THEN {now} \
                   ELSE LEAST(GREATEST(os.deadline, old.started_at), {now}) END AS at, \
                 COALESCE(b.failures, 0) + 1 AS failures, COALESCE(b.last_interval_s, 0) AS last_s, \
                 b.until AS b_until, \
                 COALESCE(COALESCE(b.failures, 0) + 1 >= (SELECT p.max_failures FROM processes p \
                   WHERE p.name = {process}), false) AS parks \
               FROM old LEFT JOIN LATERAL (SELECT component, host, deadline FROM sessions \
                 WHERE id = old.session_id OFFSET 0) AS os ON true \
               LEFT JOIN LATERAL (SELECT b.failures, b.last_interval_s, b.until FROM work_backoff b \
                 WHERE b.id = old.id AND b.namespace = old.namespace AND b.kind = old.kind \
                 AND b.process = {process} OFFSET 0) AS b ON true), \
             up AS (INSERT INTO work (namespace, kind, id, process, session_id, token, started_at) \
               SELECT t.namespace, t.kind, t.id, {process}, t.sid, t.token, t.at FROM t \
               WHERE NOT EXISTS (SELECT 1 FROM old WHERE old.n = t.n)), \
             re AS (UPDATE work w SET session_id = t.sid, token = t.token, started_at = t.at \
               FROM ex JOIN t ON t.n = ex.n WHERE w.ctid = ex.tid AND NOT ex.parks), \
             rm AS (DELETE FROM work w USING ex WHERE w.ctid = ex.tid AND ex.parks), \
             bo AS (INSERT INTO work_backoff \
                 (namespace, kind, id, process, until, cause, last_interval_s, failures) \
               SELECT ex.namespace, ex.kind, ex.id, {process}, \
                 CASE WHEN ex.parks THEN {PARKED} ELSE GREATEST(COALESCE(ex.b_until, ex.at), ex.at) END, \
                 '{EXPIRED_CAUSE}', ex.last_s, ex.failures FROM ex ORDER BY ex.n \
               ON CONFLICT (namespace, kind, id, process) DO UPDATE SET until = excluded.until, \
                 cause = excluded.cause, last_interval_s = excluded.last_interval_s, \
                 failures = excluded.failures), \
             {HISTORY} SELECT namespace, kind, id, {process}, event, session_id, component, host, \
               token, at, cause \
               FROM (SELECT 0 AS phase, ex.n, ex.namespace, ex.kind, ex.id, 'Expired' AS event, \
                       ex.session_id, ex.component, ex.host, ex.token, ex.at, \
                       '{EXPIRED_CAUSE}' AS cause FROM ex \
                     UNION ALL SELECT 1, e.* FROM ({started} \
                       WHERE NOT EXISTS (SELECT 1 FROM ex WHERE ex.n = t.n AND ex.parks)) AS e) AS e \
               ORDER BY phase, n)",
            PARKED = fleetdb_core::work::PARKED.0,
            EXPIRED_CAUSE = fleetdb_core::apply::EXPIRED_CAUSE,
        ),
    }
}

pub(crate) fn select_sql(
    selector: &Selector,
    now: Timestamp,
    after: Option<&ObjectKey>,
    limit: usize,
) -> (String, TypedParams) {
    let (base, mut params) = selector_from_where(selector, now);
    let mut sql = format!(
        "SELECT o.namespace, o.kind, o.id, o.labels, o.created_at, o.updated_at, o.revision {base}"
    );
    if let Some(k) = after {
        let n = params.push(SqlParam::Text(k.namespace.clone()));
        let kd = params.push(SqlParam::Text(k.kind.clone()));
        let i = params.push(SqlParam::Text(k.id.clone()));
        sql.push_str(&format!(
            " AND (o.namespace, o.kind, o.id) > ({n}, {kd}, {i})"
        ));
    }
    let l = params.push(SqlParam::Int(limit_param(limit)));
    sql.push_str(&format!(" ORDER BY o.namespace, o.kind, o.id LIMIT {l}"));
    (sql, params)
}

pub(crate) fn count_sql(selector: &Selector, now: Timestamp) -> (String, TypedParams) {
    let (base, params) = selector_from_where(selector, now);
    (format!("SELECT count(*) {base}"), params)
}

pub(crate) fn objects_from_rows(rows: &[Row]) -> Result<Vec<Object>> {
    rows.iter().map(object_from_row).collect()
}

// ---- TxRows (called from tx.rs) ----

pub(crate) async fn session_read(tx: &mut PgTx<'_>, id: &str) -> Result<Option<SessionInfo>> {
    let rows = tx.read(SESSION_GET, &[&id]).await?;
    rows.first().map(session_from_row).transpose()
}

pub(crate) async fn session_insert(tx: &mut PgTx<'_>, s: &SessionInfo) -> Result<()> {
    let params = owned![
        s.id.clone(),
        s.component.clone(),
        s.host.clone(),
        s.runtime_info.clone(),
        s.ttl_ms,
        s.created_at.0,
        s.deadline.0,
    ];
    tx.defer(SESSION_INSERT, params).await
}

pub(crate) async fn session_remove(tx: &mut PgTx<'_>, id: &str) -> Result<()> {
    tx.defer(SESSION_REMOVE, owned![id.to_string()]).await
}

pub(crate) async fn sessions_expired(
    tx: &mut PgTx<'_>,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<SessionInfo>> {
    let limit = limit_param(limit);
    let rows = tx.read(SESSIONS_EXPIRED, &[&now.0, &limit]).await?;
    rows.iter().map(session_from_row).collect()
}

pub(crate) async fn process_read(tx: &mut PgTx<'_>, name: &str) -> Result<Option<Process>> {
    let rows = tx.read(PROCESS_GET, &[&name]).await?;
    rows.first().map(process_from_row).transpose()
}

pub(crate) async fn process_put(tx: &mut PgTx<'_>, p: &Process) -> Result<()> {
    let params = owned![
        p.name.clone(),
        json_list(&p.conflicts),
        p.created_at.0,
        p.paused,
        p.max_active.map(|n| n as i64),
        p.max_failures.map(|n| n as i64)
    ];
    tx.defer(PROCESS_PUT, params).await
}

pub(crate) async fn process_all(tx: &mut PgTx<'_>) -> Result<Vec<Process>> {
    let rows = tx.read(PROCESS_ALL, &[]).await?;
    rows.iter().map(process_from_row).collect()
}

pub(crate) async fn lock_process(tx: &mut PgTx<'_>, name: &str) -> Result<()> {
    tx.read(PROCESS_LOCK, &[&name]).await?;
    Ok(())
}

pub(crate) async fn work_count_live(tx: &mut PgTx<'_>, process: &str, now: i64) -> Result<u64> {
    let rows = tx.read(WORK_COUNT_LIVE, &[&process, &now]).await?;
    let n: i64 = match rows.first() {
        Some(r) => r.try_get(0).map_err(db_err)?,
        None => 0,
    };
    Ok(n.max(0) as u64)
}

pub(crate) async fn work_read_held(
    tx: &mut PgTx<'_>,
    key: &ObjectKey,
    process: &str,
) -> Result<Option<WorkInfo>> {
    let rows = tx
        .read(
            WORK_GET_SHARED,
            &[&key.namespace, &key.kind, &key.id, &process],
        )
        .await?;
    rows.first().map(work_from_row).transpose()
}

pub(crate) async fn work_read(
    tx: &mut PgTx<'_>,
    key: &ObjectKey,
    process: &str,
) -> Result<Option<WorkInfo>> {
    let text = if tx.lock_reads {
        WORK_GET_LOCKED
    } else {
        WORK_GET
    };
    let rows = tx
        .read(text, &[&key.namespace, &key.kind, &key.id, &process])
        .await?;
    rows.first().map(work_from_row).transpose()
}

pub(crate) async fn work_orphaned(tx: &mut PgTx<'_>, limit: usize) -> Result<Vec<WorkInfo>> {
    let rows = tx.read(WORK_ORPHANED, &[&limit_param(limit)]).await?;
    rows.iter().map(work_from_row).collect()
}

pub(crate) async fn work_of_session(tx: &mut PgTx<'_>, session_id: &str) -> Result<Vec<WorkInfo>> {
    let rows = tx.read(WORK_OF_SESSION, &[&session_id]).await?;
    rows.iter().map(work_from_row).collect()
}

pub(crate) async fn work_insert(tx: &mut PgTx<'_>, w: &WorkInfo) -> Result<()> {
    let k = &w.key;
    let params = owned![
        k.namespace.clone(),
        k.kind.clone(),
        k.id.clone(),
        w.process.clone(),
        w.session_id.clone(),
        w.token,
        w.started_at.0,
    ];
    tx.defer(WORK_INSERT, params).await
}

pub(crate) async fn work_remove(tx: &mut PgTx<'_>, key: &ObjectKey, process: &str) -> Result<()> {
    let params = owned![
        key.namespace.clone(),
        key.kind.clone(),
        key.id.clone(),
        process.to_string(),
    ];
    tx.defer(WORK_REMOVE, params).await
}

pub(crate) async fn backoff_read(
    tx: &mut PgTx<'_>,
    key: &ObjectKey,
    process: &str,
) -> Result<Option<BackoffInfo>> {
    let rows = tx
        .read(BACKOFF_GET, &[&key.namespace, &key.kind, &key.id, &process])
        .await?;
    rows.first().map(backoff_from_row).transpose()
}

pub(crate) async fn backoff_put(tx: &mut PgTx<'_>, b: &BackoffInfo) -> Result<()> {
    let k = &b.key;
    let params = owned![
        k.namespace.clone(),
        k.kind.clone(),
        k.id.clone(),
        b.process.clone(),
        b.until.0,
        b.cause.clone(),
        b.last_interval_s,
        i64::try_from(b.failures).unwrap_or(i64::MAX),
    ];
    tx.defer(BACKOFF_PUT, params).await
}

pub(crate) async fn backoff_remove(
    tx: &mut PgTx<'_>,
    key: &ObjectKey,
    process: &str,
) -> Result<bool> {
    let n = tx
        .execute(
            BACKOFF_REMOVE,
            &[&key.namespace, &key.kind, &key.id, &process],
        )
        .await?;
    Ok(n > 0)
}

pub(crate) async fn history_append(tx: &mut PgTx<'_>, h: &HistoryEntry) -> Result<()> {
    let k = &h.key;
    let params = owned![
        k.namespace.clone(),
        k.kind.clone(),
        k.id.clone(),
        h.process.clone(),
        h.event.as_str(),
        h.session_id.clone(),
        h.component.clone(),
        h.host.clone(),
        h.token,
        h.at.0,
        h.cause.clone(),
    ];
    tx.defer(HISTORY_APPEND, params).await
}

/// Release many claims in ONE deferred statement (see `TxRows::work_release_many`): backoffs
/// (when `$2`), work rows, and the history rows in order.
const WORK_RELEASE_MANY: &str = "WITH k AS (SELECT * FROM jsonb_to_recordset(($1::text)::jsonb) \
       AS k(n bigint, ns text, kind text, id text, process text, event text, session_id text, \
            component text, host text, token bigint, at bigint, cause text)), \
     b AS (DELETE FROM work_backoff x USING k WHERE $2::boolean AND x.namespace = k.ns \
       AND x.kind = k.kind AND x.id = k.id AND x.process = k.process), \
     w AS (DELETE FROM work x USING k WHERE x.namespace = k.ns AND x.kind = k.kind \
       AND x.id = k.id AND x.process = k.process) \
     INSERT INTO work_history \
       (namespace, kind, id, process, event, session_id, component, host, token, at, cause) \
     SELECT ns, kind, id, process, event, session_id, component, host, token, at, cause \
     FROM k ORDER BY n";

pub(crate) async fn work_release_many(
    tx: &mut PgTx<'_>,
    history: &[HistoryEntry],
    clear_backoff: bool,
) -> Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    let rows: Vec<serde_json::Value> = history
        .iter()
        .enumerate()
        .map(|(n, h)| {
            serde_json::json!({
                "n": n, "ns": h.key.namespace, "kind": h.key.kind, "id": h.key.id,
                "process": h.process, "event": h.event.as_str(), "session_id": h.session_id,
                "component": h.component, "host": h.host, "token": h.token, "at": h.at.0,
                "cause": h.cause,
            })
        })
        .collect();
    let text = serde_json::Value::Array(rows).to_string();
    tx.defer(WORK_RELEASE_MANY, owned![text, clear_backoff])
        .await
}

/// The work rows of many keys for one process, in one statement.
pub(crate) async fn work_read_many(
    tx: &mut PgTx<'_>,
    keys: &[ObjectKey],
    process: &str,
) -> Result<Vec<WorkInfo>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let only = serde_json::to_string(
        &keys
            .iter()
            .map(|k| serde_json::json!({"ns": k.namespace, "kind": k.kind, "id": k.id}))
            .collect::<Vec<_>>(),
    )
    .unwrap_or_else(|_| "[]".into());
    macro_rules! read {
        ($lock:literal) => {
            concat!(
                "SELECT w.namespace, w.kind, w.id, w.process, w.session_id, w.token, w.started_at \
                 FROM work w JOIN jsonb_to_recordset(($1::text)::jsonb) AS k(ns text, kind text, id text) \
                   ON w.namespace = k.ns AND w.kind = k.kind AND w.id = k.id \
                 WHERE w.process = $2 ORDER BY w.namespace, w.kind, w.id",
                $lock
            )
        };
    }
    const READ: &str = read!("");
    const READ_LOCKED: &str = read!(" FOR UPDATE OF w");
    let text = if tx.lock_reads { READ_LOCKED } else { READ };
    let rows = tx.read(text, &[&only, &process]).await?;
    rows.iter().map(work_from_row).collect()
}

/// `n` fencing tokens in one statement.
pub(crate) async fn next_tokens(tx: &mut PgTx<'_>, n: usize) -> Result<Vec<i64>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let n = n as i64;
    let rows = tx
        .read(
            "SELECT nextval('fleetdb_fencing') FROM generate_series(1, $1::bigint) ORDER BY 1",
            &[&n],
        )
        .await?;
    rows.iter().map(|r| r.try_get(0).map_err(db_err)).collect()
}

pub(crate) async fn next_token(tx: &mut PgTx<'_>) -> Result<i64> {
    let rows = tx.read(NEXT_TOKEN, &[]).await?;
    let row = rows
        .first()
        .ok_or_else(|| Error::Backend("nextval returned no row".to_string()))?;
    row.try_get(0).map_err(db_err)
}

/// Candidates, in a READ COMMITTED claim transaction: (1) find and lock them, skipping objects
/// another claim has locked (`FOR UPDATE OF o SKIP LOCKED`); (2) check them again in a fresh
/// snapshot, now that they are locked: a claim committed between (1)'s snapshot and the lock is
/// seen, and so is a change that made an object no longer match. Every claim path locks the
/// object before it looks at its work rows, so two claims can never both pass (2) for one object.
pub(crate) async fn claim_candidates(
    tx: &mut PgTx<'_>,
    q: &CandidateQuery,
) -> Result<Vec<ObjectKey>> {
    let (sql, params) = claim_candidates_sql(q);
    let sql = format!("{sql} FOR UPDATE OF o SKIP LOCKED");
    let rows = tx.query_typed(&sql, &params.typed()).await?;
    let locked: Vec<ObjectKey> = rows.iter().map(key_from_row).collect::<Result<_>>()?;
    if locked.is_empty() {
        return Ok(locked);
    }
    let only = serde_json::to_string(
        &locked
            .iter()
            .map(|k| serde_json::json!({"ns": k.namespace, "kind": k.kind, "id": k.id}))
            .collect::<Vec<_>>(),
    )
    .unwrap_or_else(|_| "[]".into());
    let (sql, params) = claim_candidates_sql_in(q, Some(only));
    let rows = tx.query_typed(&sql, &params.typed()).await?;
    rows.iter().map(key_from_row).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(selector: &str) -> CandidateQuery {
        CandidateQuery {
            selector: Selector::parse(selector).unwrap(),
            process: "P".into(),
            exclude: vec!["P".into(), "Q".into()],
            now: Timestamp(1_000),
            limit: 5,
        }
    }

    /// Placeholders are numbered in the order their parameters were pushed, and every parameter
    /// appears in the text.
    #[test]
    fn candidate_sql_numbers_joins_then_condition_then_own_parameters() {
        let (sql, params) = claim_candidates_sql(&query("has(a) and tag(b).x = 1"));
        let n = params.0.len();
        assert_eq!(n, 2 + 2 + 4, "{sql}");
        for i in 1..=n {
            assert!(sql.contains(&format!("${i}::")), "${i} missing: {sql}");
        }
        assert!(!sql.contains(&format!("${}", n + 1)), "{sql}");
        assert!(sql.contains("t0.name = $1::text"), "{sql}");
        assert!(sql.contains("t1.name = $2::text"), "{sql}");
        assert!(
            sql.contains(&format!(
                "jsonb_array_elements_text((${}::text)::jsonb)",
                n - 3
            )),
            "{sql}"
        );
        assert!(sql.ends_with(&format!("LIMIT ${n}::bigint")), "{sql}");
        assert_eq!(params.0[n - 4], SqlParam::Text("[\"P\",\"Q\"]".into()));
        assert_eq!(params.typed().len(), n);
    }

    #[test]
    fn select_sql_pages_after_a_key() {
        let after = ObjectKey::new("default", "machine", "m1").unwrap();
        let (sql, params) = select_sql(
            &Selector::parse("kind = machine").unwrap(),
            Timestamp(0),
            Some(&after),
            10,
        );
        assert!(
            sql.contains("(o.namespace, o.kind, o.id) > ($2::text, $3::text, $4::text)"),
            "{sql}"
        );
        assert!(sql.ends_with("ORDER BY o.namespace, o.kind, o.id LIMIT $5::bigint"));
        assert_eq!(params.0.len(), 5);
        let (sql, params) = count_sql(&Selector::parse("kind = machine").unwrap(), Timestamp(0));
        assert_eq!(
            sql,
            "SELECT count(*) FROM objects o WHERE ((o.kind = $1::text))"
        );
        assert_eq!(params.0.len(), 1);
    }

    /// Step 2 gives the locked candidates to the slots in order, each up to its limit, skipping
    /// a dead session's slot and one whose finish failed (as `claim_take_sql` does in SQL).
    #[test]
    fn candidates_go_to_live_slots_in_order() {
        let slot = |r: usize, sid: &str, f: Option<usize>, n: usize| Slot {
            r,
            sid: sid.into(),
            f,
            n,
            at: Timestamp(0),
        };
        let slots = [
            slot(0, "a", Some(0), 1),
            slot(1, "dead", None, 3),
            slot(2, "b", Some(1), 2),
            slot(3, "c", None, 2),
            slot(4, "a", None, 1),
        ];
        let alive = |s: &str| s != "dead";
        let passed = |f: usize| f != 1;
        // Finish 1 failed (slot 2 skipped), "dead" is not alive (slot 1 skipped).
        assert_eq!(assigned(&slots, 10, alive, passed), [1, 0, 0, 2, 1]);
        assert_eq!(assigned(&slots, 2, alive, passed), [1, 0, 0, 1, 0]);
        assert_eq!(assigned(&slots, 0, alive, passed), [0, 0, 0, 0, 0]);
        let json: serde_json::Value = serde_json::from_str(&slots_json(&slots)).unwrap();
        assert_eq!(
            json[2],
            serde_json::json!({"o": 2, "r": 2, "sid": "b", "f": 1, "n": 2, "at": 0})
        );
        assert_eq!(json[1]["f"], serde_json::Value::Null);
    }
}
