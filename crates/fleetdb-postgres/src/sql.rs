//! SQL text and row decoding shared by the transaction ([`crate::tx`]) and the plain reads.

use fleetdb_core::apply::{parse_stored_json, stored_key};
use fleetdb_core::backend::ChangeDraft;
use fleetdb_core::world::{Space, WorldRecord};
use fleetdb_core::{
    Change, ChangeOp, Entity, Error, LabelRequirement, Labels, Namespace, Object, ObjectKey,
    ObjectQuery, Result, Revision, Tag, Timestamp,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::error::db_err;

pub(crate) type Param<'a> = &'a (dyn ToSql + Sync);

pub(crate) const BEGIN: &str = "BEGIN ISOLATION LEVEL SERIALIZABLE";

/// The open transaction's id (assigning one: every general-path transaction writes anyway).
pub(crate) const XACT_ID: &str = "SELECT pg_current_xact_id()::text";

/// What became of a transaction by its id: `committed`, `aborted` or `in progress` (NULL when it
/// is too old to tell, past the commit log's horizon).
pub(crate) const XACT_STATUS: &str = "SELECT pg_xact_status(($1::text)::xid8)";
/// The settings of a transaction that must not scan whole tables ([`BEGIN_SWEEP`]), written once.
macro_rules! sweep_settings {
    () => {
        "SELECT set_config('jit', 'off', true), set_config('enable_seqscan', 'off', true)"
    };
}
/// A collector's sweep transaction: SERIALIZABLE, with sequential scans off. Each sweep
/// transaction reads the change log after its mark revision (a short range at the end of the
/// primary key) and deletes candidates by key; with no statistics yet (a freshly loaded table,
/// autovacuum behind or off) the planner otherwise reads the whole change log in every sweep
/// transaction: minutes instead of seconds for a million objects. JIT is off: a plan that must
/// take a disabled node costs over 10^10 and would be compiled (see [`CLAIM_PLANNED`]).
pub(crate) const BEGIN_SWEEP: &str =
    concat!("BEGIN ISOLATION LEVEL SERIALIZABLE; ", sweep_settings!());
/// [`BEGIN_SWEEP`]'s settings alone, to be prepared and sent after [`BEGIN`] by the hot bulk
/// paths (the shared adds of many producers): sent as text they were parsed and planned at every
/// transaction (one plan per call in `pg_stat_statements`, ~20 µs each).
pub(crate) const SWEEP_PLANNED: &str = sweep_settings!();

/// Claims and finishes: every statement sees what is committed when it starts; their decisions
/// rest on row locks, not on SSI (a claim locks the object first; a finish reads its work and tag
/// rows `FOR UPDATE`, see `transaction_for`).
pub(crate) const BEGIN_READ_COMMITTED: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";
/// A selector claim's planner settings, after [`BEGIN_READ_COMMITTED`] (and before a fused finish
/// when the claim follows one in the same transaction). A claim wants the first few candidates in
/// key order, so nested loops over indexes (driven by the most selective tag index, probing the
/// work and backoff keys per candidate) are right whatever the statistics say; with stale
/// statistics (a queue that just filled) the planner otherwise picks merge joins that walk every
/// finished object, or a merge on the namespace alone that compares every pair. Sorts are off
/// too: the claim's key order always comes from an index (objects' primary key or
/// `tags_by_name`), so a sort can only mean reading every candidate to return the first few.
/// The second step (the locked keys, each probed by its primary key) and the finish are nested
/// loops over keys as well.
///
/// Sequential scans are off: every row a claim or a finish reads is reached by a key. These
/// statements are prepared once per connection and run with their generic plan
/// (`plan_cache_mode`): left to choose, PostgreSQL kept planning one run in seven again (a
/// custom plan costs about a millisecond, four times a run), and a generic plan made while a
/// queue was still empty held sequential scans that read the whole, grown table on every run.
/// JIT compilation is off: a plan that had to take a disabled node costs over 10^10, far above
/// `jit_above_cost`, and compiling it took longer (1.4 s) than any claim runs.
///
/// The settings are ONE statement (`set_config(…, true)` is `SET LOCAL`) rather than six: every
/// statement of a message is parsed, run and answered on its own (pgbench, one message of
/// `BEGIN`, six statements, `COMMIT`: 0.43 ms whether they are `SET LOCAL`s or `SELECT 1`s, against
/// 0.19 ms with the one `SELECT set_config(…)`; the one-at-a-time benchmark, where every job
/// sends these once, did not move beyond its noise). They are sent as a prepared statement after
/// [`BEGIN_READ_COMMITTED`], in claim transactions and fused finishes (see `finish.rs`): as text
/// (`BEGIN …; SELECT set_config(…)`) they were parsed and planned at every run (~20 µs of
/// planning, more than running them).
pub(crate) const CLAIM_PLANNED: &str =
    "SELECT set_config('plan_cache_mode', 'force_generic_plan', true), \
       set_config('jit', 'off', true), set_config('enable_seqscan', 'off', true), \
       set_config('enable_mergejoin', 'off', true), set_config('enable_hashjoin', 'off', true), \
       set_config('enable_sort', 'off', true)";
/// Prepared selector-claim statements kept per connection: past this many cached statements the
/// connection's cache is emptied (selector text is the caller's, so the cache must stay bounded).
pub(crate) const STATEMENTS_CACHED_MAX: usize = 256;

pub(crate) const NAMESPACE_GET: &str =
    "SELECT name, labels, created_at, updated_at, revision FROM namespaces WHERE name = $1";
pub(crate) const NAMESPACE_LIST_FIRST: &str =
    "SELECT name, labels, created_at, updated_at, revision FROM namespaces ORDER BY name LIMIT $1";
pub(crate) const NAMESPACE_LIST_AFTER: &str =
    "SELECT name, labels, created_at, updated_at, revision FROM namespaces WHERE name > $1 \
     ORDER BY name LIMIT $2";
pub(crate) const NAMESPACE_USAGE: &str = "SELECT kind, count(*) FROM objects WHERE namespace = $1 \
     GROUP BY kind ORDER BY kind LIMIT 10";

const OBJECT_COLUMNS: &str = "namespace, kind, id, labels, created_at, updated_at, revision";
pub(crate) const OBJECT_GET: &str =
    "SELECT namespace, kind, id, labels, created_at, updated_at, revision FROM objects \
     WHERE namespace = $1 AND kind = $2 AND id = $3";

pub(crate) const TAG_GET: &str = "SELECT name, value, updated_at, revision FROM tags \
     WHERE namespace = $1 AND kind = $2 AND id = $3 AND name = $4";
pub(crate) const TAG_LIST: &str = "SELECT name, value, updated_at, revision FROM tags \
     WHERE namespace = $1 AND kind = $2 AND id = $3 ORDER BY name";
/// Whether the object exists and the tag, in one row; `$lock` is `""` or `" FOR UPDATE"` (the
/// tag row is read in a lateral subquery, since it may be missing, so that it can be locked: under
/// READ COMMITTED a locking read waits for a concurrent writer and reads its committed row).
macro_rules! tag_read {
    ($lock:literal) => {
        concat!(
            "SELECT EXISTS (SELECT 1 FROM objects WHERE namespace = $1 AND kind = $2 AND id = $3), \
             t.value, t.updated_at, t.revision \
             FROM (SELECT 1) AS x LEFT JOIN LATERAL (SELECT value, updated_at, revision FROM tags \
               WHERE namespace = $1 AND kind = $2 AND id = $3 AND name = $4",
            $lock,
            ") AS t ON true"
        )
    };
}
/// Every write reads its tags locked, whatever its isolation: a worker's finish deletes tags
/// READ COMMITTED, which SERIALIZABLE's conflict checks do not see, so an unlocked read could
/// rest a decision on a tag deleted meanwhile (a set judged a no-op while the tag was gone, a
/// precondition passed, a change-log row with an old value that no longer was). Locked, a
/// serializable writer fails on such a row ("concurrent delete") and retries; one in READ
/// COMMITTED reads the newest row.
pub(crate) const TAG_READ_LOCKED: &str = tag_read!(" FOR UPDATE");

/// Many tag reads in one statement: `$1` is a JSON array of `{"n","ns","kind","id","name"}`;
/// one row per element, in `n` order, with [`TAG_READ_LOCKED`]'s columns (`$lock` as there).
macro_rules! tag_read_many {
    ($lock:literal) => {
        concat!(
            "SELECT EXISTS (SELECT 1 FROM objects o \
               WHERE o.namespace = k.ns AND o.kind = k.kind AND o.id = k.id), \
             t.value, t.updated_at, t.revision \
             FROM jsonb_to_recordset(($1::text)::jsonb) \
               AS k(n bigint, ns text, kind text, id text, name text) \
             LEFT JOIN LATERAL (SELECT value, updated_at, revision FROM tags \
               WHERE namespace = k.ns AND kind = k.kind AND id = k.id AND name = k.name",
            $lock,
            ") AS t ON true ORDER BY k.n"
        )
    };
}
/// Many [`TAG_READ_LOCKED`]s.
pub(crate) const TAG_READ_MANY_LOCKED: &str = tag_read_many!(" FOR UPDATE");

/// Many [`TAG_REMOVE`]s in one statement: `$1` is a JSON array of
/// `{"n","ns","kind","id","name","old","at"}`; the change-log rows take revisions in `n` order.
/// Returns `(revision, namespace, kind, id, name)` per removed tag.
pub(crate) const TAG_REMOVE_MANY: &str = "WITH k AS (SELECT * FROM jsonb_to_recordset(($1::text)::jsonb) \
       AS k(n bigint, ns text, kind text, id text, name text, old text, at bigint)), \
     c AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
       SELECT nextval('fleetdb_revision'), s.ns, s.kind, s.id, 'tag', s.name, 'delete', s.old, NULL, s.at \
       FROM (SELECT * FROM k ORDER BY n) AS s \
       RETURNING revision, namespace, kind, id, name), \
     d AS (DELETE FROM tags t USING k WHERE t.namespace = k.ns AND t.kind = k.kind \
       AND t.id = k.id AND t.name = k.name) \
     SELECT revision, namespace, kind, id, name FROM c";

/// The change-log row of a write, `$1`..`$9`, taking the next revision. The write's own parameters
/// start at `$10`.
macro_rules! change_cte {
    () => {
        "WITH c AS (INSERT INTO changes \
         (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
         VALUES (nextval('fleetdb_revision'), $1, $2, $3, $4, $5, $6, $7, $8, $9) \
         RETURNING revision) "
    };
}

pub(crate) const NAMESPACE_PUT: &str = concat!(
    change_cte!(),
    "INSERT INTO namespaces (name, labels, created_at, updated_at, revision) \
     SELECT $10::text, $11::text, $12::bigint, $13::bigint, c.revision FROM c \
     ON CONFLICT (name) DO UPDATE SET labels = excluded.labels, \
     updated_at = excluded.updated_at, revision = excluded.revision \
     RETURNING revision"
);
pub(crate) const NAMESPACE_REMOVE: &str = concat!(
    change_cte!(),
    ", d AS (DELETE FROM namespaces WHERE name = $10::text) SELECT revision FROM c"
);
pub(crate) const OBJECT_PUT: &str = concat!(
    change_cte!(),
    "INSERT INTO objects (namespace, kind, id, labels, created_at, updated_at, revision) \
     SELECT $10::text, $11::text, $12::text, $13::text, $14::bigint, $15::bigint, c.revision \
     FROM c \
     ON CONFLICT (namespace, kind, id) DO UPDATE SET labels = excluded.labels, \
     updated_at = excluded.updated_at, revision = excluded.revision \
     RETURNING revision"
);
pub(crate) const OBJECT_REMOVE: &str = concat!(
    change_cte!(),
    ", d AS (DELETE FROM objects WHERE namespace = $10::text AND kind = $11::text \
     AND id = $12::text), \
     db AS (DELETE FROM work_backoff WHERE id = $12::text AND namespace = $10::text \
     AND kind = $11::text) SELECT revision FROM c"
);
pub(crate) const TAG_PUT: &str = concat!(
    change_cte!(),
    "INSERT INTO tags (namespace, kind, id, name, value, updated_at, revision) \
     SELECT $10::text, $11::text, $12::text, $13::text, $14::text, $15::bigint, c.revision \
     FROM c \
     ON CONFLICT (namespace, kind, id, name) DO UPDATE SET value = excluded.value, \
     updated_at = excluded.updated_at, revision = excluded.revision \
     RETURNING revision"
);
pub(crate) const TAG_REMOVE: &str = concat!(
    change_cte!(),
    ", d AS (DELETE FROM tags WHERE namespace = $10::text AND kind = $11::text \
     AND id = $12::text AND name = $13::text) SELECT revision FROM c"
);

/// The columns of a World record, in the order [`world_from_row`] reads them.
pub(crate) const WORLD_COLUMNS: &str = "space, key, scope, owner, kind, name, target, data, meta, \
     session_id, expires_at, create_revision, revision, created_at, updated_at";
pub(crate) const WORLD_GET: &str =
    "SELECT space, key, scope, owner, kind, name, target, data, meta, session_id, expires_at, \
     create_revision, revision, created_at, updated_at FROM world WHERE space = $1 AND key = $2";
/// Insert or replace a World record with the change's revision (and, when `$21` is 0, that
/// revision as its create revision too).
pub(crate) const WORLD_PUT: &str = concat!(
    change_cte!(),
    "INSERT INTO world (space, key, scope, owner, kind, name, target, data, meta, session_id, \
     expires_at, create_revision, revision, created_at, updated_at) \
     SELECT $10::text, $11::text, $12::text, $13::text, $14::text, $15::text, $16::text, \
     $17::bytea, $18::text, $19::text, $20::bigint, \
     CASE WHEN $21::bigint = 0 THEN c.revision ELSE $21::bigint END, c.revision, \
     $22::bigint, $23::bigint FROM c \
     ON CONFLICT (space, key) DO UPDATE SET scope = excluded.scope, owner = excluded.owner, \
     kind = excluded.kind, name = excluded.name, target = excluded.target, data = excluded.data, \
     meta = excluded.meta, session_id = excluded.session_id, expires_at = excluded.expires_at, \
     create_revision = excluded.create_revision, revision = excluded.revision, \
     created_at = excluded.created_at, updated_at = excluded.updated_at \
     RETURNING revision"
);
pub(crate) const WORLD_REMOVE: &str = concat!(
    change_cte!(),
    ", d AS (DELETE FROM world WHERE space = $10::text AND key = $11::text) SELECT revision FROM c"
);
/// A change-log row alone (membership changes).
pub(crate) const CHANGE_APPEND: &str = concat!(change_cte!(), "SELECT revision FROM c");

/// The change log's current revision (the newest change, or the compaction point of an emptied
/// log), then `$extra` columns.
macro_rules! revision_select {
    ($extra:literal) => {
        concat!(
            "SELECT greatest(coalesce((SELECT max(revision) FROM changes), 0), value)",
            $extra,
            " FROM fleetdb_meta WHERE key = 'compacted_revision'"
        )
    };
}
/// The current revision and the compaction point.
pub(crate) const REVISION: &str = revision_select!(", value");
/// The current revision alone (a claim's subquery, see `work::claim_lock_sql`).
pub(crate) const REVISION_NOW: &str = revision_select!("");

/// Delete old changes and move the compaction point, in one statement (so one transaction and one
/// snapshot: `cur` sees the log before the delete). `$1` = before, `$2` = before - 1.
pub(crate) const COMPACT: &str = "WITH cur AS (\
       SELECT greatest(coalesce((SELECT max(revision) FROM changes), 0), \
         (SELECT value FROM fleetdb_meta WHERE key = 'compacted_revision')) AS r), \
     d AS (DELETE FROM changes WHERE revision < $1::bigint RETURNING 1), \
     u AS (UPDATE fleetdb_meta SET value = greatest(value, least($2::bigint, (SELECT r FROM cur))) \
       WHERE key = 'compacted_revision') \
     SELECT count(*) FROM d";

/// A change-log row's parameters `$1`..`$9` followed by `rest`.
pub(crate) fn with_change<'a>(c: &'a ChangeDraft, rest: &[Param<'a>]) -> Vec<Param<'a>> {
    let entity: Param<'a> = entity_param(c.entity);
    let op: Param<'a> = op_param(c.op);
    let mut v: Vec<Param<'a>> = Vec::with_capacity(9 + rest.len());
    v.extend_from_slice(&[
        &c.namespace,
        &c.kind,
        &c.id,
        entity,
        &c.name,
        op,
        &c.old_value,
        &c.new_value,
        &c.at.0,
    ]);
    v.extend_from_slice(rest);
    v
}

fn entity_param(e: Entity) -> Param<'static> {
    match e {
        Entity::Namespace => &"namespace",
        Entity::Object => &"object",
        Entity::Tag => &"tag",
        Entity::Export => &"export",
        Entity::Kv => &"kv",
        Entity::Map => &"map",
        Entity::Deploy => &"deploy",
        Entity::Blob => &"blob",
        Entity::Registration => &"registration",
        Entity::Schedule => &"schedule",
        Entity::Member => &"member",
        Entity::Lease => &"lease",
        Entity::Content => &"content",
    }
}

fn op_param(op: ChangeOp) -> Param<'static> {
    match op {
        ChangeOp::Put => &"put",
        ChangeOp::Delete => &"delete",
    }
}

/// Object labels as stored: the JSON object of the map.
pub(crate) fn labels_text(labels: &Labels) -> String {
    // A map of strings always serializes.
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_string())
}

pub(crate) fn parse_labels_pub(text: &str) -> Result<Labels> {
    parse_labels(text)
}

fn parse_labels(text: &str) -> Result<Labels> {
    serde_json::from_str(text)
        .map_err(|e| Error::Backend(format!("corrupt labels in the store: {e}")))
}

pub(crate) fn parse_value(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text)
        .map_err(|e| Error::Backend(format!("corrupt tag value in the store: {e}")))
}

pub(crate) fn namespace_from_row(row: &Row) -> Result<Namespace> {
    let labels: String = row.try_get(1).map_err(db_err)?;
    Ok(Namespace {
        name: row.try_get(0).map_err(db_err)?,
        labels: parse_labels(&labels)?,
        created_at: Timestamp(row.try_get(2).map_err(db_err)?),
        updated_at: Timestamp(row.try_get(3).map_err(db_err)?),
        revision: Revision(row.try_get(4).map_err(db_err)?),
    })
}

pub(crate) fn object_from_row(row: &Row) -> Result<Object> {
    let labels: String = row.try_get(3).map_err(db_err)?;
    Ok(Object {
        key: stored_key(
            row.try_get(0).map_err(db_err)?,
            row.try_get(1).map_err(db_err)?,
            row.try_get(2).map_err(db_err)?,
        ),
        labels: parse_labels(&labels)?,
        created_at: Timestamp(row.try_get(4).map_err(db_err)?),
        updated_at: Timestamp(row.try_get(5).map_err(db_err)?),
        revision: Revision(row.try_get(6).map_err(db_err)?),
    })
}

/// A tag from a `name, value, updated_at, revision` row, with its stored canonical text.
pub(crate) fn tag_from_row(key: &ObjectKey, row: &Row) -> Result<(Tag, String)> {
    let text: String = row.try_get(1).map_err(db_err)?;
    let tag = Tag {
        object: key.clone(),
        name: row.try_get(0).map_err(db_err)?,
        value: parse_value(&text)?,
        updated_at: Timestamp(row.try_get(2).map_err(db_err)?),
        revision: Revision(row.try_get(3).map_err(db_err)?),
    };
    Ok((tag, text))
}

/// A tag from a [`TAG_READ_LOCKED`] row (`exists, value, updated_at, revision`), if present.
pub(crate) fn tag_from_read_row(
    key: &ObjectKey,
    name: &str,
    row: &Row,
) -> Result<Option<(Tag, String)>> {
    let text: Option<String> = row.try_get(1).map_err(db_err)?;
    let Some(text) = text else {
        return Ok(None);
    };
    let tag = Tag {
        object: key.clone(),
        name: name.to_string(),
        value: parse_value(&text)?,
        updated_at: Timestamp(row.try_get(2).map_err(db_err)?),
        revision: Revision(row.try_get(3).map_err(db_err)?),
    };
    Ok(Some((tag, text)))
}

/// A World record from a [`WORLD_COLUMNS`] row.
pub(crate) fn world_from_row(row: &Row) -> Result<WorldRecord> {
    let space: String = row.try_get(0).map_err(db_err)?;
    let expires_at: Option<i64> = row.try_get(10).map_err(db_err)?;
    Ok(WorldRecord {
        space: Space::parse(&space)?,
        key: row.try_get(1).map_err(db_err)?,
        scope: row.try_get(2).map_err(db_err)?,
        owner: row.try_get(3).map_err(db_err)?,
        kind: row.try_get(4).map_err(db_err)?,
        name: row.try_get(5).map_err(db_err)?,
        target: row.try_get(6).map_err(db_err)?,
        data: row.try_get(7).map_err(db_err)?,
        meta: row.try_get(8).map_err(db_err)?,
        session_id: row.try_get(9).map_err(db_err)?,
        expires_at: expires_at.map(Timestamp),
        create_revision: Revision(row.try_get(11).map_err(db_err)?),
        revision: Revision(row.try_get(12).map_err(db_err)?),
        created_at: Timestamp(row.try_get(13).map_err(db_err)?),
        updated_at: Timestamp(row.try_get(14).map_err(db_err)?),
    })
}

/// Label requirements in a canonical order (by operator, then key and value), so that the SQL
/// text depends only on how many requirements of each operator there are and prepared statements
/// are reused. A conjunction does not depend on the order.
fn canonical_requirements(reqs: &[LabelRequirement]) -> Vec<&LabelRequirement> {
    fn rank(r: &LabelRequirement) -> u8 {
        match r {
            LabelRequirement::Eq { .. } => 0,
            LabelRequirement::NotEq { .. } => 1,
            LabelRequirement::Exists { .. } => 2,
            LabelRequirement::NotExists { .. } => 3,
        }
    }
    let mut v: Vec<&LabelRequirement> = reqs.iter().collect();
    v.sort_by_key(|r| rank(r));
    v
}

/// The SQL and parameters of an object listing. Values are only ever passed as numbered
/// parameters.
pub(crate) fn object_list_sql<'a>(q: &'a ObjectQuery, limit: &'a i64) -> (String, Vec<Param<'a>>) {
    let mut sql = format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE namespace = $1");
    let mut params: Vec<Param<'a>> = vec![&q.namespace];
    fn next<'a>(params: &mut Vec<Param<'a>>, p: Param<'a>) -> usize {
        params.push(p);
        params.len()
    }
    if let Some(kind) = &q.kind {
        let n = next(&mut params, kind);
        sql.push_str(&format!(" AND kind = ${n}"));
    }
    if let Some(after) = &q.after {
        let k = next(&mut params, &after.kind);
        let i = next(&mut params, &after.id);
        sql.push_str(&format!(" AND (kind, id) > (${k}::text, ${i}::text)"));
    }
    for r in canonical_requirements(&q.labels) {
        match r {
            LabelRequirement::Eq { key, value } => {
                let k = next(&mut params, key);
                let v = next(&mut params, value);
                sql.push_str(&format!(" AND (labels::jsonb ->> ${k}::text) = ${v}::text"));
            }
            LabelRequirement::NotEq { key, value } => {
                let k = next(&mut params, key);
                let v = next(&mut params, value);
                sql.push_str(&format!(
                    " AND (labels::jsonb ->> ${k}::text) IS DISTINCT FROM ${v}::text"
                ));
            }
            LabelRequirement::Exists { key } => {
                let k = next(&mut params, key);
                sql.push_str(&format!(" AND (labels::jsonb ? ${k}::text)"));
            }
            LabelRequirement::NotExists { key } => {
                let k = next(&mut params, key);
                sql.push_str(&format!(" AND NOT (labels::jsonb ? ${k}::text)"));
            }
        }
    }
    let n = next(&mut params, limit);
    sql.push_str(&format!(" ORDER BY kind, id LIMIT ${n}"));
    (sql, params)
}

/// Escape `%`, `_` and `\` for a LIKE pattern with the default escape character `\`.
pub(crate) fn like_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for ch in prefix.chars() {
        if matches!(ch, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('%');
    out
}

/// The change-log namespace of key-value changes (left out of `changes_scope`).
const KV_CHANGE_NAMESPACE: &str = ".kv";

/// The revision and time of change-log entries after `$1`, at most `$2`, in revision order (gap
/// markers too: `Backend::change_times`, for a compaction by age; the primary key, no values).
pub(crate) const CHANGE_TIMES: &str =
    "SELECT revision, at FROM changes WHERE revision > $1 ORDER BY revision LIMIT $2";

/// The change-log read: the compaction point and, unless `after` is older than it, the entries
/// (never the gap markers [`crate::settle`] writes). One statement, so both come from the same
/// snapshot. `$1` = after; the filter's parameters
/// follow; the limit is last.
///
/// `changes_scope` leaves key-value changes out (migration 0007: one index write less per
/// `kv set`), so a namespace filter other than the key-values' says so in the text
/// (`namespace <> '.kv'`), which lets the planner use that partial index in a generic plan; a
/// filter on the key-values' namespace reads the primary key from `$1` on.
pub(crate) fn changes_sql(namespace: Option<&str>, kind: bool, id_prefix: bool) -> String {
    let mut inner = String::from(
        "SELECT revision, namespace, kind, id, entity, name, op, old_value, new_value, at \
         FROM changes WHERE revision > $1 AND $1 >= m.value AND op <> 'gap'",
    );
    let mut n = 1;
    if let Some(ns) = namespace {
        n += 1;
        inner.push_str(&format!(" AND namespace = ${n}"));
        if ns != KV_CHANGE_NAMESPACE {
            inner.push_str(" AND namespace <> '.kv'");
        }
    }
    if kind {
        n += 1;
        inner.push_str(&format!(" AND kind = ${n}"));
    }
    if id_prefix {
        n += 1;
        inner.push_str(&format!(" AND id LIKE ${n} ESCAPE '\\'"));
    }
    n += 1;
    inner.push_str(&format!(" ORDER BY revision LIMIT ${n}"));
    format!(
        "SELECT m.value, c.revision, c.namespace, c.kind, c.id, c.entity, c.name, c.op, \
         c.old_value, c.new_value, c.at \
         FROM fleetdb_meta AS m LEFT JOIN LATERAL ({inner}) AS c ON true \
         WHERE m.key = 'compacted_revision' ORDER BY c.revision"
    )
}

/// A change from a [`changes_sql`] row, `None` for the row that only carries the compaction point.
pub(crate) fn change_from_row(row: &Row) -> Result<Option<Change>> {
    let revision: Option<i64> = row.try_get(1).map_err(db_err)?;
    let Some(revision) = revision else {
        return Ok(None);
    };
    let entity: String = row.try_get(5).map_err(db_err)?;
    let op: String = row.try_get(7).map_err(db_err)?;
    Ok(Some(Change {
        revision: Revision(revision),
        namespace: row.try_get(2).map_err(db_err)?,
        kind: row.try_get(3).map_err(db_err)?,
        id: row.try_get(4).map_err(db_err)?,
        entity: Entity::parse(&entity)?,
        name: row.try_get(6).map_err(db_err)?,
        op: ChangeOp::parse(&op)?,
        old_value: parse_stored_json(row.try_get(8).map_err(db_err)?)?,
        new_value: parse_stored_json(row.try_get(9).map_err(db_err)?)?,
        at: Timestamp(row.try_get(10).map_err(db_err)?),
    }))
}

/// Record a collection's statistics and keep the newest `$3` (`Backend::gc_run_record`).
pub(crate) const GC_RUN_RECORD: &str = "WITH ins AS (\
     INSERT INTO gc_runs (started_at, stats) VALUES ($1, $2) RETURNING seq) \
     DELETE FROM gc_runs WHERE seq <= (SELECT seq FROM ins) - $3";
/// The newest recorded collections' statistics (`Backend::gc_runs`).
pub(crate) const GC_RUNS: &str = "SELECT stats FROM gc_runs ORDER BY seq DESC LIMIT $1";

/// Transaction settings made session settings (`set_config(…, true)` → `false`), for tests that
/// plan statements outside the transactions that use them.
#[cfg(test)]
pub(crate) fn session_level(settings: &str) -> String {
    settings.replace(", true)", ", false)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_prefix_escapes() {
        assert_eq!(like_prefix("a_b%c\\"), "a\\_b\\%c\\\\%");
        assert_eq!(like_prefix(""), "%");
    }

    #[test]
    fn object_list_sql_is_numbered_and_canonical() {
        let mut q = ObjectQuery::new("ns").kind("machine");
        q.labels = vec![
            LabelRequirement::NotExists { key: "z".into() },
            LabelRequirement::Eq {
                key: "a".into(),
                value: "1".into(),
            },
        ];
        let limit = 10i64;
        let (sql, params) = object_list_sql(&q, &limit);
        assert_eq!(params.len(), 6);
        assert!(sql.contains("kind = $2"), "{sql}");
        assert!(
            sql.contains("(labels::jsonb ->> $3::text) = $4::text"),
            "{sql}"
        );
        assert!(sql.contains("NOT (labels::jsonb ? $5::text)"), "{sql}");
        assert!(sql.ends_with("LIMIT $6"), "{sql}");
        assert!(!sql.contains("'"), "values must never be inlined: {sql}");
    }

    #[test]
    fn changes_sql_numbers_filters() {
        assert_eq!(
            fleetdb_core::world::Space::Kv.change_namespace(),
            KV_CHANGE_NAMESPACE
        );
        let kv = changes_sql(Some(KV_CHANGE_NAMESPACE), true, true);
        assert!(!kv.contains("<> '.kv'"), "{kv}");
        let sql = changes_sql(Some("default"), true, true);
        assert!(sql.contains("namespace <> '.kv'"), "{sql}");
        assert!(sql.contains("namespace = $2"));
        assert!(sql.contains("kind = $3"));
        assert!(sql.contains("id LIKE $4 ESCAPE '\\'"));
        assert!(sql.contains("LIMIT $5"));
        assert!(
            sql.contains("op <> 'gap'"),
            "gap markers are never returned: {sql}"
        );
    }

    #[test]
    fn world_statements_read_the_world_columns() {
        assert!(WORLD_GET.contains(WORLD_COLUMNS), "{WORLD_GET}");
        assert!(WORLD_PUT.contains(&format!("INSERT INTO world ({WORLD_COLUMNS})")));
    }
}
