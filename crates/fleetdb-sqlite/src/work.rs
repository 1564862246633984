//! Sessions, processes, work, backoff and history on SQLite: row mapping, the work half of
//! [`TxRows`](fleetdb_core::backend::TxRows), and the read queries.

use fleetdb_core::apply::stored_key;
use fleetdb_core::backend::CandidateQuery;
use fleetdb_core::selector::{Dialect, Selector, SqlParam};
use fleetdb_core::work::{
    BackoffInfo, HistoryEntry, HistoryFilter, Process, SessionInfo, WorkCursor, WorkEvent,
    WorkInfo, WorkListing,
};
use fleetdb_core::{Error, Object, ObjectKey, Result, Timestamp};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::map_err;
use crate::rows::{object_from, object_row};

const SESSION_COLS: &str = "id, component, host, runtime_info, ttl_ms, created_at, deadline";
const WORK_COLS: &str = "namespace, kind, id, process, session_id, token, started_at";
const BACKOFF_COLS: &str = "namespace, kind, id, process, until, cause, last_interval_s, failures";
const HISTORY_COLS: &str =
    "seq, namespace, kind, id, process, event, session_id, component, host, token, at, cause";

fn session_row(r: &Row<'_>) -> rusqlite::Result<SessionInfo> {
    Ok(SessionInfo {
        id: r.get(0)?,
        component: r.get(1)?,
        host: r.get(2)?,
        runtime_info: r.get(3)?,
        ttl_ms: r.get(4)?,
        created_at: Timestamp(r.get(5)?),
        deadline: Timestamp(r.get(6)?),
    })
}

fn work_row(r: &Row<'_>) -> rusqlite::Result<WorkInfo> {
    Ok(WorkInfo {
        key: stored_key(r.get(0)?, r.get(1)?, r.get(2)?),
        process: r.get(3)?,
        session_id: r.get(4)?,
        token: r.get(5)?,
        started_at: Timestamp(r.get(6)?),
    })
}

fn backoff_row(r: &Row<'_>) -> rusqlite::Result<BackoffInfo> {
    Ok(BackoffInfo {
        key: stored_key(r.get(0)?, r.get(1)?, r.get(2)?),
        process: r.get(3)?,
        until: Timestamp(r.get(4)?),
        cause: r.get(5)?,
        last_interval_s: r.get(6)?,
        failures: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(1),
    })
}

type HistoryRaw = (
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<String>,
);

fn history_row(r: &Row<'_>) -> rusqlite::Result<HistoryRaw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
    ))
}

fn history_from(h: HistoryRaw) -> Result<HistoryEntry> {
    Ok(HistoryEntry {
        seq: h.0,
        key: stored_key(h.1, h.2, h.3),
        process: h.4,
        event: WorkEvent::parse(&h.5)?,
        session_id: h.6,
        component: h.7,
        host: h.8,
        token: h.9,
        at: Timestamp(h.10),
        cause: h.11,
    })
}

/// A process row: name, conflicts, created_at, paused, max_active, max_failures.
type ProcessRaw = (String, String, i64, bool, Option<i64>, Option<i64>);

/// The columns [`process_raw`] reads.
const PROCESS_COLS: &str = "name, conflicts, created_at, paused, max_active, max_failures";

fn process_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProcessRaw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn process_from(
    (name, conflicts, created_at, paused, max_active, max_failures): ProcessRaw,
) -> Result<Process> {
    Ok(Process {
        name,
        conflicts: serde_json::from_str(&conflicts)
            .map_err(|e| Error::Backend(format!("corrupt process conflicts in the store: {e}")))?,
        created_at: Timestamp(created_at),
        paused,
        max_active: max_active.map(|n| n.max(0) as u64),
        max_failures: max_failures.map(|n| n.max(0) as u64),
    })
}

/// Every row of `sql`, mapped by `f`.
pub(crate) fn collect<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = c.prepare_cached(sql).map_err(map_err)?;
    let rows = stmt
        .query_map(params, f)
        .map_err(map_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(map_err);
    rows
}

fn exec(c: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
    c.prepare_cached(sql)
        .and_then(|mut s| s.execute(params))
        .map_err(map_err)
}

pub(crate) fn to_value(p: SqlParam) -> Value {
    match p {
        SqlParam::Text(s) => Value::Text(s),
        SqlParam::Int(i) => Value::Integer(i),
        SqlParam::Float(f) => Value::Real(f),
        SqlParam::Bool(b) => Value::Integer(i64::from(b)),
    }
}

// ---- TxRows (called from rows.rs) ----

pub(crate) fn session_read(c: &Connection, id: &str) -> Result<Option<SessionInfo>> {
    c.prepare_cached(&format!(
        "SELECT {SESSION_COLS} FROM sessions WHERE id = ?1"
    ))
    .and_then(|mut s| s.query_row([id], session_row).optional())
    .map_err(map_err)
}

pub(crate) fn session_insert(c: &Connection, s: &SessionInfo) -> Result<()> {
    exec(
        c,
        "INSERT INTO sessions (id, component, host, runtime_info, ttl_ms, created_at, deadline) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![s.id, s.component, s.host, s.runtime_info, s.ttl_ms, s.created_at.0, s.deadline.0],
    )?;
    Ok(())
}

pub(crate) fn session_remove(c: &Connection, id: &str) -> Result<()> {
    exec(c, "DELETE FROM sessions WHERE id = ?1", [id])?;
    Ok(())
}

pub(crate) fn sessions_expired(
    c: &Connection,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<SessionInfo>> {
    collect(
        c,
        &format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE deadline <= ?1 ORDER BY deadline LIMIT +?2"
        ),
        params![now.0, limit as i64],
        session_row,
    )
}

pub(crate) fn process_read(c: &Connection, name: &str) -> Result<Option<Process>> {
    let raw = c
        .prepare_cached(&format!(
            "SELECT {PROCESS_COLS} FROM processes WHERE name = ?1"
        ))
        .and_then(|mut s| s.query_row([name], process_raw).optional())
        .map_err(map_err)?;
    raw.map(process_from).transpose()
}

pub(crate) fn process_put(c: &Connection, p: &Process) -> Result<()> {
    let conflicts = serde_json::to_string(&p.conflicts).unwrap_or_else(|_| "[]".into());
    exec(
        c,
        "INSERT INTO processes (name, conflicts, created_at, paused, max_active, max_failures)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (name) DO UPDATE SET conflicts = excluded.conflicts,
           paused = excluded.paused, max_active = excluded.max_active,
           max_failures = excluded.max_failures",
        params![
            p.name,
            conflicts,
            p.created_at.0,
            p.paused,
            p.max_active.map(|n| n as i64),
            p.max_failures.map(|n| n as i64)
        ],
    )?;
    Ok(())
}

pub(crate) fn process_all(c: &Connection) -> Result<Vec<Process>> {
    let raws: Vec<ProcessRaw> = collect(
        c,
        &format!("SELECT {PROCESS_COLS} FROM processes ORDER BY name"),
        [],
        process_raw,
    )?;
    raws.into_iter().map(process_from).collect()
}

pub(crate) fn work_count_live(c: &Connection, process: &str, now: Timestamp) -> Result<u64> {
    let n: i64 = c
        .prepare_cached(
            "SELECT count(*) FROM work w JOIN sessions s ON s.id = w.session_id \
             WHERE w.process = ?1 AND s.deadline > ?2",
        )
        .and_then(|mut s| s.query_row(params![process, now.0], |r| r.get(0)))
        .map_err(map_err)?;
    Ok(n.max(0) as u64)
}

pub(crate) fn work_read(
    c: &Connection,
    key: &ObjectKey,
    process: &str,
) -> Result<Option<WorkInfo>> {
    c.prepare_cached(&format!(
        "SELECT {WORK_COLS} FROM work WHERE namespace = ?1 AND kind = ?2 AND id = ?3 AND process = ?4"
    ))
    .and_then(|mut s| s.query_row(params![key.namespace, key.kind, key.id, process], work_row).optional())
    .map_err(map_err)
}

pub(crate) fn work_of_session(c: &Connection, session_id: &str) -> Result<Vec<WorkInfo>> {
    collect(
        c,
        &format!("SELECT {WORK_COLS} FROM work WHERE session_id = ?1 ORDER BY namespace, kind, id, process"),
        [session_id],
        work_row,
    )
}

pub(crate) fn work_orphaned(c: &Connection, limit: usize) -> Result<Vec<WorkInfo>> {
    collect(
        c,
        &format!(
            "SELECT {WORK_COLS} FROM work w \
             WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = w.session_id) LIMIT ?1"
        ),
        [limit as i64],
        work_row,
    )
}

pub(crate) fn work_insert(c: &Connection, w: &WorkInfo) -> Result<()> {
    let k = &w.key;
    exec(
        c,
        "INSERT INTO work (namespace, kind, id, process, session_id, token, started_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![k.namespace, k.kind, k.id, w.process, w.session_id, w.token, w.started_at.0],
    )?;
    Ok(())
}

pub(crate) fn work_remove(c: &Connection, key: &ObjectKey, process: &str) -> Result<()> {
    exec(
        c,
        "DELETE FROM work WHERE namespace = ?1 AND kind = ?2 AND id = ?3 AND process = ?4",
        params![key.namespace, key.kind, key.id, process],
    )?;
    Ok(())
}

pub(crate) fn backoff_read(
    c: &Connection,
    key: &ObjectKey,
    process: &str,
) -> Result<Option<BackoffInfo>> {
    c.prepare_cached(&format!(
        "SELECT {BACKOFF_COLS} FROM work_backoff WHERE namespace = ?1 AND kind = ?2 AND id = ?3 AND process = ?4"
    ))
    .and_then(|mut s| s.query_row(params![key.namespace, key.kind, key.id, process], backoff_row).optional())
    .map_err(map_err)
}

pub(crate) fn backoff_put(c: &Connection, b: &BackoffInfo) -> Result<()> {
    let k = &b.key;
    exec(
        c,
        "INSERT INTO work_backoff (namespace, kind, id, process, until, cause, last_interval_s, failures)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (namespace, kind, id, process) DO UPDATE SET until = excluded.until, cause = excluded.cause,
             last_interval_s = excluded.last_interval_s, failures = excluded.failures",
        params![
            k.namespace,
            k.kind,
            k.id,
            b.process,
            b.until.0,
            b.cause,
            b.last_interval_s,
            i64::try_from(b.failures).unwrap_or(i64::MAX)
        ],
    )?;
    Ok(())
}

pub(crate) fn backoff_remove(c: &Connection, key: &ObjectKey, process: &str) -> Result<bool> {
    Ok(exec(
        c,
        "DELETE FROM work_backoff WHERE namespace = ?1 AND kind = ?2 AND id = ?3 AND process = ?4",
        params![key.namespace, key.kind, key.id, process],
    )? > 0)
}

pub(crate) fn history_append(c: &Connection, h: &HistoryEntry) -> Result<()> {
    let k = &h.key;
    exec(
        c,
        "INSERT INTO work_history (namespace, kind, id, process, event, session_id, component, host, token, at, cause)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            k.namespace,
            k.kind,
            k.id,
            h.process,
            h.event.as_str(),
            h.session_id,
            h.component,
            h.host,
            h.token,
            h.at.0,
            h.cause
        ],
    )?;
    Ok(())
}

pub(crate) fn next_token(c: &Connection) -> Result<i64> {
    c.prepare_cached(
        "UPDATE fleetdb_meta SET value = value + 1 WHERE key = 'fencing_token' RETURNING value",
    )
    .and_then(|mut s| s.query_row([], |r| r.get(0)))
    .map_err(map_err)
}

/// `FROM objects o <joins> WHERE <selector>` with its parameters, numbered from 1.
fn selector_from_where(selector: &Selector, now: Timestamp, params: &mut Vec<SqlParam>) -> String {
    let from = selector.from_sql(Dialect::Sqlite, params);
    let cond = selector.to_sql(Dialect::Sqlite, now, params);
    format!("FROM {from} WHERE ({cond})")
}

fn ph(params: &mut Vec<SqlParam>, p: SqlParam) -> String {
    params.push(p);
    Dialect::Sqlite.placeholder(params.len())
}

pub(crate) fn claim_candidates(c: &Connection, q: &CandidateQuery) -> Result<Vec<ObjectKey>> {
    let (sql, params) = claim_candidates_sql(q);
    collect(
        c,
        &sql,
        rusqlite::params_from_iter(params.into_iter().map(to_value)),
        |r| Ok(stored_key(r.get(0)?, r.get(1)?, r.get(2)?)),
    )
}

/// [`claim_candidates`]' statement and parameters.
pub(crate) fn claim_candidates_sql(q: &CandidateQuery) -> (String, Vec<SqlParam>) {
    let mut params = Vec::new();
    let base = selector_from_where(&q.selector, q.now, &mut params);
    let exclude = ph(
        &mut params,
        SqlParam::Text(serde_json::to_string(&q.exclude).unwrap_or_else(|_| "[]".into())),
    );
    let now = ph(&mut params, SqlParam::Int(q.now.0));
    let process = ph(&mut params, SqlParam::Text(q.process.clone()));
    let limit = ph(&mut params, SqlParam::Int(q.limit as i64));
    // No ORDER BY: SQLite cannot tell that the driving index (the required tag's `tags_by_name`,
    // or the objects key) is already in key order once other columns are constrained, and would
    // sort every candidate to return one. The scan itself yields candidates in key order.
    let sql = format!(
        "SELECT o.namespace, o.kind, o.id {base}
           AND NOT EXISTS (SELECT 1 FROM work w JOIN sessions s ON s.id = w.session_id
                           WHERE w.namespace = o.namespace AND w.kind = o.kind AND w.id = o.id
                             AND w.process IN (SELECT value FROM json_each({exclude})) AND s.deadline > {now})
           AND NOT EXISTS (SELECT 1 FROM work_backoff b
                           WHERE b.namespace = o.namespace AND b.kind = o.kind AND b.id = o.id
                             AND b.process = {process} AND b.until > {now})
         LIMIT +{limit}"
    );
    (sql, params)
}

// ---- Backend reads and writes ----

pub(crate) fn session_renew(
    c: &Connection,
    ids: &[String],
    now: Timestamp,
) -> Result<Vec<(String, Timestamp)>> {
    let ids = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
    collect(
        c,
        "UPDATE sessions SET deadline = ?1 + ttl_ms * 1000
         WHERE id IN (SELECT value FROM json_each(?2)) AND deadline > ?1
         RETURNING id, deadline",
        params![now.0, ids],
        |r| Ok((r.get(0)?, Timestamp(r.get(1)?))),
    )
}

pub(crate) fn session_list(
    c: &Connection,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<SessionInfo>> {
    collect(
        c,
        &format!("SELECT {SESSION_COLS} FROM sessions WHERE id > ?1 ORDER BY id LIMIT +?2"),
        params![after.unwrap_or(""), limit as i64],
        session_row,
    )
}

pub(crate) fn work_list(c: &Connection, q: &WorkListing) -> Result<Vec<WorkInfo>> {
    let [p, n, k, i] = WorkCursor::params(q.after.as_ref());
    collect(
        c,
        &format!(
            "SELECT {WORK_COLS} FROM work WHERE (?1 IS NULL OR process = ?1)
               AND (?2 IS NULL OR session_id = ?2)
               AND (?3 IS NULL OR (process, namespace, kind, id) > (?3, ?4, ?5, ?6))
             ORDER BY process, namespace, kind, id LIMIT +?7"
        ),
        params![q.process, q.session, p, n, k, i, q.limit as i64],
        work_row,
    )
}

pub(crate) fn backoff_list(
    c: &Connection,
    process: Option<&str>,
    active_at: Option<Timestamp>,
    after: Option<&WorkCursor>,
    limit: usize,
) -> Result<Vec<BackoffInfo>> {
    let [p, n, k, i] = WorkCursor::params(after);
    collect(
        c,
        &format!(
            "SELECT {BACKOFF_COLS} FROM work_backoff WHERE (?1 IS NULL OR process = ?1) AND (?2 IS NULL OR until > ?2)
               AND (?3 IS NULL OR (process, namespace, kind, id) > (?3, ?4, ?5, ?6))
             ORDER BY process, namespace, kind, id LIMIT +?7"
        ),
        params![process, active_at.map(|t| t.0), p, n, k, i, limit as i64],
        backoff_row,
    )
}

pub(crate) fn history_list(
    c: &Connection,
    filter: &HistoryFilter,
    before: Option<i64>,
    limit: usize,
) -> Result<Vec<HistoryEntry>> {
    let before = before.unwrap_or(i64::MAX);
    let raws = match filter {
        HistoryFilter::Object(k) => collect(
            c,
            &format!(
                "SELECT {HISTORY_COLS} FROM work_history WHERE namespace = ?1 AND kind = ?2 AND id = ?3 AND seq < ?4
                 ORDER BY seq DESC LIMIT +?5"
            ),
            params![k.namespace, k.kind, k.id, before, limit as i64],
            history_row,
        )?,
        HistoryFilter::Process(p) => collect(
            c,
            &format!(
                "SELECT {HISTORY_COLS} FROM work_history WHERE process = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT +?3"
            ),
            params![p, before, limit as i64],
            history_row,
        )?,
    };
    raws.into_iter().map(history_from).collect()
}

/// One batch of [`fleetdb_core::Backend::history_prune`]: of the `batch` oldest rows (by `seq`),
/// delete those before the first one written at or after `before`.
pub(crate) fn history_prune(c: &Connection, before: Timestamp, batch: usize) -> Result<u64> {
    // The newest row stays whatever its age: `seq` is the rowid, and SQLite numbers a row of an
    // empty table 1 again (the sequence must only grow, as PostgreSQL's identity does).
    let sql = "WITH head AS (SELECT seq, at FROM work_history ORDER BY seq LIMIT +?2) \
        DELETE FROM work_history WHERE seq IN (SELECT seq FROM head WHERE seq < \
          (SELECT coalesce(min(seq), 9223372036854775807) FROM head WHERE at >= ?1)) \
          AND seq < (SELECT max(seq) FROM work_history)";
    Ok(exec(c, sql, params![before.0, batch as i64])? as u64)
}

pub(crate) fn select(
    c: &Connection,
    selector: &str,
    now: Timestamp,
    after: Option<&ObjectKey>,
    limit: usize,
) -> Result<Vec<Object>> {
    let selector = Selector::parse(selector)?;
    let key = selector.key_alias(Dialect::Sqlite);
    let mut params = Vec::new();
    let base = selector_from_where(&selector, now, &mut params);
    let mut sql = format!(
        "SELECT o.namespace, o.kind, o.id, o.labels, o.created_at, o.updated_at, o.revision {base}"
    );
    if let Some(k) = after {
        let (n, kd, i) = (
            ph(&mut params, SqlParam::Text(k.namespace.clone())),
            ph(&mut params, SqlParam::Text(k.kind.clone())),
            ph(&mut params, SqlParam::Text(k.id.clone())),
        );
        sql.push_str(&format!(
            " AND ({key}.namespace, {key}.kind, {key}.id) > ({n}, {kd}, {i})"
        ));
    }
    let l = ph(&mut params, SqlParam::Int(limit as i64));
    sql.push_str(&format!(
        " ORDER BY {key}.namespace, {key}.kind, {key}.id LIMIT +{l}"
    ));
    let raws = collect(
        c,
        &sql,
        rusqlite::params_from_iter(params.into_iter().map(to_value)),
        object_row,
    )?;
    raws.into_iter().map(object_from).collect()
}

pub(crate) fn work_stats(
    c: &Connection,
    now: Timestamp,
) -> Result<Vec<fleetdb_core::backend::WorkStats>> {
    collect(
        c,
        "SELECT p.name,
                (SELECT count(*) FROM work w JOIN sessions s ON s.id = w.session_id
                  WHERE w.process = p.name AND s.deadline > ?1),
                (SELECT count(*) FROM work_backoff b WHERE b.process = p.name AND b.until > ?1),
                (SELECT count(*) FROM work_backoff b WHERE b.process = p.name AND b.until = ?2)
         FROM processes p ORDER BY p.name",
        [now.0, fleetdb_core::work::PARKED.0],
        |r| {
            Ok(fleetdb_core::backend::WorkStats {
                process: r.get(0)?,
                active_work: r.get::<_, i64>(1)? as u64,
                active_backoffs: r.get::<_, i64>(2)? as u64,
                parked: r.get::<_, i64>(3)? as u64,
            })
        },
    )
}

pub(crate) fn count(c: &Connection, selector: &str, now: Timestamp) -> Result<u64> {
    let selector = Selector::parse(selector)?;
    let mut params = Vec::new();
    let base = selector_from_where(&selector, now, &mut params);
    let sql = format!("SELECT count(*) {base}");
    c.prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_row(
                rusqlite::params_from_iter(params.into_iter().map(to_value)),
                |r| r.get::<_, i64>(0),
            )
        })
        .map(|n| n as u64)
        .map_err(map_err)
}
