//! Batches of many writes as one or two statements, where the general path ([`apply_batch`]) would
//! read and write every op in round trips of its own: creating objects with their tags (the hot
//! path of adding work items one at a time, and of importing a fleet in bulk), setting tags of
//! existing objects in bulk, putting objects that may exist with their tags, and deleting
//! objects in bulk. Each makes the decisions `apply_batch` makes (the conformance
//! suite holds both paths to the same results), with revisions and change-log rows in op order;
//! when the batch would fail, nothing of it is kept and the general path runs it again and names
//! the error exactly.
//!
//! **Creates.** A batch qualifies when it has no preconditions and its ops are groups of an
//! object put (`Create`, or `Upsert` followed by at least one tag set: a lone upsert usually
//! updates an existing object) followed by tag sets of that object with distinct names, the
//! objects all distinct. Every object is new in the common case, so the statements insert them
//! `ON CONFLICT DO NOTHING` instead of reading each key first: creators of neighbouring keys (new
//! ids are time-ordered) then take no predicate locks on each other's index pages, and a batch of
//! a thousand objects is one statement instead of five round trips per object. When an object
//! exists after all, nothing of the batch is kept and the general path decides (merge the labels,
//! or `AlreadyExists`); an object that a concurrent transaction created and this one cannot see
//! is a serialization failure under SERIALIZABLE (`ON CONFLICT DO NOTHING` checks visibility),
//! so the batch is retried and then sees it.
//!
//! **Tag sets.** A batch of tag sets only (no preconditions, distinct tags): every object must
//! exist (else nothing is written); a tag whose value is identical is a no-op (no revision); the
//! others are upserted, each with its change-log row carrying the replaced value.
//!
//! **Upserts.** Several object puts of any mode (objects that may exist: a re-import, an
//! inventory sync), each followed by tag sets of its object: one statement reads by key what the
//! batch touches, the ops are decided in Rust as `apply_batch` decides them
//! ([`upsert_decide`]), and one statement writes what changed. Two round trips in all.
//!
//! **Deletes.** Several object deletes: one statement reads every object and its tags, one
//! writes the change rows (each object's tags in name order, then the object) and the deletes.
//!
//! [`apply_batch`]: fleetdb_core::apply::apply_batch

use std::collections::{HashMap, HashSet};

use fleetdb_core::{
    Applied, Batch, Error, Labels, Object, ObjectKey, Op, OpResult, PutMode, Result, Revision, Tag,
    Timestamp,
};

use crate::sql;

/// One object of a create (or upsert) batch, with its tags.
pub(crate) struct NewObject<'a> {
    /// Index of the object put in the batch; its tags follow it (`n + 1 …`).
    n: usize,
    pub(crate) key: &'a ObjectKey,
    /// The labels of a new object (the patch applied to none).
    labels: Labels,
    /// The patch as given (an empty value deletes a label).
    patch: &'a Labels,
    mode: PutMode,
    /// The tag sets: name, value as written, value parsed.
    pub(crate) tags: Vec<(&'a str, &'a str, serde_json::Value)>,
}

impl NewObject<'_> {
    /// An upsert qualifies for the create path only with at least one tag set (a lone upsert
    /// usually updates an existing object).
    fn creates(&self) -> bool {
        self.mode == PutMode::Create || (self.mode == PutMode::Upsert && !self.tags.is_empty())
    }
}

/// The batch as objects to create, or `None` when it has another shape (or an input the general
/// path must reject and name: a bad value, too many labels).
pub(crate) fn new_objects(batch: &Batch) -> Option<Vec<NewObject<'_>>> {
    objects(batch).filter(|objects| objects.iter().all(NewObject::creates))
}

/// The batch as groups of an object put (any mode) and tag sets of that object (distinct
/// names), the objects distinct, no preconditions; `None` for any other batch.
pub(crate) fn objects(batch: &Batch) -> Option<Vec<NewObject<'_>>> {
    if !batch.preconditions.is_empty() {
        return None;
    }
    let mut out: Vec<NewObject<'_>> = Vec::new();
    let mut keys = HashSet::new();
    let mut names = HashSet::new();
    for (n, op) in batch.ops.iter().enumerate() {
        match op {
            Op::ObjectPut { key, labels, mode } => {
                if !keys.insert(key) {
                    return None;
                }
                names.clear();
                out.push(NewObject {
                    n,
                    key,
                    labels: fleetdb_core::validate::merge_labels(&Labels::new(), labels).ok()?,
                    patch: labels,
                    mode: *mode,
                    tags: Vec::new(),
                });
            }
            Op::TagSet { key, name, value } => {
                let last = out.last_mut()?;
                if key != last.key || !names.insert(name.as_str()) {
                    return None;
                }
                let parsed = serde_json::from_str::<serde_json::Value>(value).ok()?;
                last.tags.push((name.as_str(), value.as_str(), parsed));
            }
            _ => return None,
        }
    }
    if out.is_empty() {
        return None;
    }
    Some(out)
}

/// One object: ONE statement that inserts the object `ON CONFLICT DO NOTHING` and, only if it
/// was new, its tags, each with its change-log row, revisions in op order. `$1`–`$3` the key,
/// `$4` the labels, `$5` now, `$6` the labels as the change log shows them, `$7` the tags
/// (`[{n, name, value}]`). Returns whether the namespace exists, the object's revision (NULL if
/// it existed) and the tags' revisions by name.
pub(crate) const ONE: &str = "WITH ns AS (SELECT 1 FROM namespaces WHERE name = $1), \
     o AS (INSERT INTO objects (namespace, kind, id, labels, created_at, updated_at, revision) \
        SELECT $1, $2, $3, $4, $5, $5, nextval('fleetdb_revision') FROM ns \
        ON CONFLICT (namespace, kind, id) DO NOTHING RETURNING revision), \
     oc AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
        SELECT revision, $1, $2, $3, 'object', '', 'put', NULL, $6, $5 FROM o), \
     k AS (SELECT * FROM jsonb_to_recordset(($7::text)::jsonb) AS k(n bigint, name text, value text)), \
     t AS (INSERT INTO tags (namespace, kind, id, name, value, updated_at, revision) \
        SELECT $1, $2, $3, s.name, s.value, $5, nextval('fleetdb_revision') \
        FROM o, (SELECT * FROM k ORDER BY n) AS s RETURNING name, value, revision), \
     tc AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
        SELECT revision, $1, $2, $3, 'tag', name, 'put', NULL, value, $5 FROM t) \
     SELECT EXISTS (SELECT 1 FROM ns), (SELECT revision FROM o), \
       (SELECT jsonb_object_agg(name, revision)::text FROM t)";

/// Many objects: ONE statement, run in a transaction the caller commits only when every object
/// was new (the statement inserts what it can; a short count means some existed, and the caller
/// rolls back). `$1` the objects (`[{n, ns, kind, id, labels, change}]`), `$2` the tags
/// (`[{n, o, name, value}]`, `o` the object's `n`), `$3` now. Nothing is written unless every
/// namespace exists. Returns whether they all do, how many objects were inserted, and the
/// revision of every op (`[[n, revision], …]`).
pub(crate) const MANY: &str = "WITH oi AS MATERIALIZED (SELECT * FROM jsonb_to_recordset(($1::text)::jsonb) \
        AS k(n bigint, ns text, kind text, id text, labels text, change text)), \
     ti AS MATERIALIZED (SELECT * FROM jsonb_to_recordset(($2::text)::jsonb) \
        AS k(n bigint, o bigint, name text, value text)), \
     nsok AS MATERIALIZED (SELECT NOT EXISTS (SELECT 1 FROM (SELECT DISTINCT ns FROM oi) AS d \
        WHERE NOT EXISTS (SELECT 1 FROM namespaces WHERE name = d.ns)) AS ok), \
     r AS MATERIALIZED (SELECT x.n, nextval('fleetdb_revision') AS rev \
        FROM (SELECT n FROM oi UNION ALL SELECT n FROM ti ORDER BY n) AS x \
        WHERE (SELECT ok FROM nsok)), \
     o AS (INSERT INTO objects (namespace, kind, id, labels, created_at, updated_at, revision) \
        SELECT oi.ns, oi.kind, oi.id, oi.labels, $3, $3, r.rev FROM oi JOIN r ON r.n = oi.n \
        ON CONFLICT (namespace, kind, id) DO NOTHING RETURNING revision), \
     oc AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
        SELECT r.rev, oi.ns, oi.kind, oi.id, 'object', '', 'put', NULL, oi.change, $3 \
        FROM oi JOIN r ON r.n = oi.n), \
     t AS (INSERT INTO tags (namespace, kind, id, name, value, updated_at, revision) \
        SELECT oi.ns, oi.kind, oi.id, ti.name, ti.value, $3, r.rev \
        FROM ti JOIN r ON r.n = ti.n JOIN oi ON oi.n = ti.o \
        ON CONFLICT (namespace, kind, id, name) DO NOTHING), \
     tc AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
        SELECT r.rev, oi.ns, oi.kind, oi.id, 'tag', ti.name, 'put', NULL, ti.value, $3 \
        FROM ti JOIN r ON r.n = ti.n JOIN oi ON oi.n = ti.o) \
     SELECT (SELECT ok FROM nsok), (SELECT count(*) FROM o), \
       (SELECT jsonb_agg(jsonb_build_array(n, rev))::text FROM r)";

/// The parameters of [`ONE`] for `object` (the only one).
pub(crate) fn one_params(object: &NewObject<'_>, now: Timestamp) -> OneParams {
    let tags = serde_json::Value::Array(
        object
            .tags
            .iter()
            .enumerate()
            .map(|(n, (name, value, _))| serde_json::json!({"n": n, "name": name, "value": value}))
            .collect(),
    )
    .to_string();
    OneParams {
        labels: sql::labels_text(&object.labels),
        change: fleetdb_core::apply::labels_json(&object.labels),
        now: now.0,
        tags,
    }
}

/// Owned parameters of [`ONE`] (besides the key).
pub(crate) struct OneParams {
    pub(crate) labels: String,
    pub(crate) change: String,
    pub(crate) now: i64,
    pub(crate) tags: String,
}

/// The objects and tags parameters of [`MANY`].
pub(crate) fn many_params(objects: &[NewObject<'_>]) -> (String, String) {
    let mut o = Vec::with_capacity(objects.len());
    let mut t = Vec::new();
    for object in objects {
        o.push(serde_json::json!({
            "n": object.n,
            "ns": object.key.namespace,
            "kind": object.key.kind,
            "id": object.key.id,
            "labels": sql::labels_text(&object.labels),
            "change": fleetdb_core::apply::labels_json(&object.labels),
        }));
        for (i, (name, value, _)) in object.tags.iter().enumerate() {
            t.push(serde_json::json!({"n": object.n + 1 + i, "o": object.n, "name": name, "value": value}));
        }
    }
    (
        serde_json::Value::Array(o).to_string(),
        serde_json::Value::Array(t).to_string(),
    )
}

/// The results of creating `objects` (in op order), given the revision of each op by index.
pub(crate) fn results(
    objects: Vec<NewObject<'_>>,
    now: Timestamp,
    revision: impl Fn(usize) -> Option<i64>,
) -> Result<Vec<OpResult>> {
    let missing = |what: String| Error::Backend(format!("no revision for {what} of a new object"));
    let mut out = Vec::with_capacity(objects.iter().map(|o| 1 + o.tags.len()).sum());
    for object in objects {
        let rev = revision(object.n).ok_or_else(|| missing(format!("object {}", object.key)))?;
        out.push(OpResult {
            changed: true,
            applied: Applied::Object(Object {
                key: object.key.clone(),
                labels: object.labels,
                created_at: now,
                updated_at: now,
                revision: Revision(rev),
            }),
        });
        for (i, (name, _, value)) in object.tags.into_iter().enumerate() {
            let rev = revision(object.n + 1 + i).ok_or_else(|| missing(format!("tag {name:?}")))?;
            out.push(OpResult {
                changed: true,
                applied: Applied::Tag(Tag {
                    object: object.key.clone(),
                    name: name.to_string(),
                    value,
                    updated_at: now,
                    revision: Revision(rev),
                }),
            });
        }
    }
    Ok(out)
}

/// The revisions of [`MANY`]'s last column, by op index.
pub(crate) fn many_revisions(text: Option<String>) -> Result<HashMap<usize, i64>> {
    let pairs: Vec<(usize, i64)> = match text {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| Error::Backend(format!("revisions of new objects: {e}")))?,
        None => Vec::new(),
    };
    Ok(pairs.into_iter().collect())
}

/// One op of a bulk tag set.
pub(crate) struct TagSetOp<'a> {
    /// Its index in the batch.
    n: usize,
    key: &'a ObjectKey,
    name: &'a str,
    /// The value as written.
    value: &'a str,
    parsed: serde_json::Value,
}

/// A batch of at least two tag sets of distinct tags and nothing else; `None` for any other
/// batch (or a value the general path must reject and name).
pub(crate) fn tag_sets(batch: &Batch) -> Option<Vec<TagSetOp<'_>>> {
    if !batch.preconditions.is_empty() || batch.ops.len() < 2 {
        return None;
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(batch.ops.len());
    for (n, op) in batch.ops.iter().enumerate() {
        let Op::TagSet { key, name, value } = op else {
            return None;
        };
        if !seen.insert((key, name)) {
            return None;
        }
        let parsed = serde_json::from_str::<serde_json::Value>(value).ok()?;
        out.push(TagSetOp {
            n,
            key,
            name,
            value,
            parsed,
        });
    }
    Some(out)
}

/// Tag sets of existing objects: ONE statement (run with sequential scans off, so every object
/// and tag is reached by a primary-key probe). `$1` the sets (`[{n, ns, kind, id, name, value}]`),
/// `$2` now. Writes nothing if an object is missing. Returns whether one is, the revision of every
/// set that changed a value (`[[n, revision], …]`) and the tags found (`[[n, value, updated_at,
/// revision], …]`).
pub(crate) const TAG_SETS: &str = "WITH k AS MATERIALIZED (SELECT * FROM jsonb_to_recordset(($1::text)::jsonb) \
        AS k(n bigint, ns text, kind text, id text, name text, value text)), \
     miss AS MATERIALIZED (SELECT EXISTS (SELECT 1 FROM k WHERE NOT EXISTS (SELECT 1 FROM objects o \
        WHERE o.namespace = k.ns AND o.kind = k.kind AND o.id = k.id)) AS gone), \
     cur AS MATERIALIZED (SELECT k.*, t.value AS old, t.updated_at AS old_at, t.revision AS old_rev \
        FROM k LEFT JOIN LATERAL (SELECT value, updated_at, revision FROM tags WHERE namespace = k.ns \
          AND kind = k.kind AND id = k.id AND name = k.name FOR UPDATE) AS t ON true), \
     r AS MATERIALIZED (SELECT x.n, nextval('fleetdb_revision') AS rev \
        FROM (SELECT n FROM cur WHERE old IS DISTINCT FROM value ORDER BY n) AS x \
        WHERE NOT (SELECT gone FROM miss)), \
     chg AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
        SELECT r.rev, c.ns, c.kind, c.id, 'tag', c.name, 'put', c.old, c.value, $2 \
        FROM r JOIN cur AS c ON c.n = r.n), \
     up AS (INSERT INTO tags (namespace, kind, id, name, value, updated_at, revision) \
        SELECT c.ns, c.kind, c.id, c.name, c.value, $2, r.rev FROM r JOIN cur AS c ON c.n = r.n \
        ON CONFLICT (namespace, kind, id, name) DO UPDATE \
          SET value = excluded.value, updated_at = excluded.updated_at, revision = excluded.revision) \
     SELECT (SELECT gone FROM miss), (SELECT jsonb_agg(jsonb_build_array(n, rev))::text FROM r), \
       (SELECT jsonb_agg(jsonb_build_array(n, old, old_at, old_rev))::text FROM cur WHERE old IS NOT NULL)";

/// The parameter `$1` of [`TAG_SETS`].
pub(crate) fn tag_sets_param(sets: &[TagSetOp<'_>]) -> String {
    serde_json::Value::Array(
        sets.iter()
            .map(|s| {
                serde_json::json!({"n": s.n, "ns": s.key.namespace, "kind": s.key.kind,
                    "id": s.key.id, "name": s.name, "value": s.value})
            })
            .collect(),
    )
    .to_string()
}

/// The results of [`TAG_SETS`]: `None` when an object was missing (nothing was written).
pub(crate) fn tag_sets_results(
    sets: Vec<TagSetOp<'_>>,
    now: Timestamp,
    missing: bool,
    changed: Option<String>,
    found: Option<String>,
) -> Result<Option<Vec<OpResult>>> {
    if missing {
        return Ok(None);
    }
    let changed = many_revisions(changed)?;
    let found: Vec<(usize, String, i64, i64)> = match found {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| Error::Backend(format!("tags found by a tag set: {e}")))?,
        None => Vec::new(),
    };
    let found: HashMap<usize, (String, i64, i64)> = found
        .into_iter()
        .map(|(n, v, at, rev)| (n, (v, at, rev)))
        .collect();
    sets.into_iter()
        .map(|s| {
            let (key, name) = (s.key, s.name);
            let (value, updated_at, revision, changed) = match changed.get(&s.n) {
                Some(rev) => (s.parsed, now, *rev, true),
                None => {
                    let (text, at, rev) = found.get(&s.n).ok_or_else(|| {
                        Error::Backend(format!("tag {name:?} of {key}: neither set nor found"))
                    })?;
                    (sql::parse_value(text)?, Timestamp(*at), *rev, false)
                }
            };
            Ok(OpResult {
                changed,
                applied: Applied::Tag(Tag {
                    object: key.clone(),
                    name: name.to_string(),
                    value,
                    updated_at,
                    revision: Revision(revision),
                }),
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Upserts, step 1: what the batch's objects and tags are now (and whether the namespace of each
/// object exists), read by key in the transaction that then writes (SERIALIZABLE: the decisions
/// rest on these reads). `$1`: `[{n, ns, kind, id, name}]`, `name` null for an object. Returns
/// per `n`: the object's labels, created_at, updated_at and revision, or the tag's value,
/// updated_at and revision (NULLs if absent), and whether the namespace exists.
pub(crate) const UPSERT_READ: &str =
    "WITH k AS MATERIALIZED (SELECT * FROM jsonb_to_recordset(($1::text)::jsonb) \
        AS k(n bigint, ns text, kind text, id text, name text)) \
     SELECT k.n, COALESCE(o.labels, t.value), COALESCE(o.created_at, t.updated_at), o.updated_at, \
       COALESCE(o.revision, t.revision), \
       k.name IS NOT NULL OR EXISTS (SELECT 1 FROM namespaces WHERE name = k.ns) \
     FROM k \
     LEFT JOIN LATERAL (SELECT labels, created_at, updated_at, revision FROM objects \
       WHERE k.name IS NULL AND namespace = k.ns AND kind = k.kind AND id = k.id) AS o ON true \
     LEFT JOIN LATERAL (SELECT value, updated_at, revision FROM tags WHERE k.name IS NOT NULL \
       AND namespace = k.ns AND kind = k.kind AND id = k.id AND name = k.name FOR UPDATE) AS t ON true";

/// Upserts, step 2: the writes decided from step 1, revisions in op order. `$1` the objects
/// (`[{n, ns, kind, id, labels, created_at, old, new}]`), `$2` the tags (`[{n, ns, kind, id,
/// name, value, old}]`), `$3` now. Returns the revision of every write (`[[n, revision], …]`).
pub(crate) const UPSERT_WRITE: &str = "WITH oi AS MATERIALIZED (SELECT * FROM jsonb_to_recordset(($1::text)::jsonb) \
        AS k(n bigint, ns text, kind text, id text, labels text, created_at bigint, old text, new text)), \
     ti AS MATERIALIZED (SELECT * FROM jsonb_to_recordset(($2::text)::jsonb) \
        AS k(n bigint, ns text, kind text, id text, name text, value text, old text)), \
     r AS MATERIALIZED (SELECT x.n, nextval('fleetdb_revision') AS rev \
        FROM (SELECT n FROM oi UNION ALL SELECT n FROM ti ORDER BY n) AS x), \
     o AS (INSERT INTO objects (namespace, kind, id, labels, created_at, updated_at, revision) \
        SELECT oi.ns, oi.kind, oi.id, oi.labels, oi.created_at, $3, r.rev FROM oi JOIN r ON r.n = oi.n \
        ON CONFLICT (namespace, kind, id) DO UPDATE \
          SET labels = excluded.labels, updated_at = excluded.updated_at, revision = excluded.revision), \
     oc AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
        SELECT r.rev, oi.ns, oi.kind, oi.id, 'object', '', 'put', oi.old, oi.new, $3 \
        FROM oi JOIN r ON r.n = oi.n), \
     t AS (INSERT INTO tags (namespace, kind, id, name, value, updated_at, revision) \
        SELECT ti.ns, ti.kind, ti.id, ti.name, ti.value, $3, r.rev FROM ti JOIN r ON r.n = ti.n \
        ON CONFLICT (namespace, kind, id, name) DO UPDATE \
          SET value = excluded.value, updated_at = excluded.updated_at, revision = excluded.revision), \
     tc AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
        SELECT r.rev, ti.ns, ti.kind, ti.id, 'tag', ti.name, 'put', ti.old, ti.value, $3 \
        FROM ti JOIN r ON r.n = ti.n) \
     SELECT (SELECT jsonb_agg(jsonb_build_array(n, rev))::text FROM r)";

/// The parameter of [`UPSERT_READ`].
pub(crate) fn upsert_read_param(objects: &[NewObject<'_>]) -> String {
    let mut out = Vec::new();
    for o in objects {
        let (ns, kind, id) = (&o.key.namespace, &o.key.kind, &o.key.id);
        out.push(serde_json::json!({"n": o.n, "ns": ns, "kind": kind, "id": id, "name": null}));
        for (i, (name, _, _)) in o.tags.iter().enumerate() {
            out.push(serde_json::json!({"n": o.n + 1 + i, "ns": ns, "kind": kind, "id": id, "name": name}));
        }
    }
    serde_json::Value::Array(out).to_string()
}

/// What [`UPSERT_READ`] found for one op: labels or value, created_at (objects) or updated_at
/// (tags), updated_at (objects), revision, whether the object's namespace exists.
pub(crate) type Found = (Option<String>, Option<i64>, Option<i64>, Option<i64>, bool);

/// The decided upsert: the results of the ops that change nothing, and the writes of the others
/// (the parameters of [`UPSERT_WRITE`]) with what their results will be once their revisions
/// are known.
pub(crate) struct Upsert {
    results: Vec<OpResult>,
    /// Indexes into `results` waiting for their revision, by op index.
    pending: Vec<(usize, usize)>,
    pub(crate) objects: String,
    pub(crate) tags: String,
}

impl Upsert {
    /// Nothing to write: every op was a no-op.
    pub(crate) fn is_noop(&self) -> bool {
        self.pending.is_empty()
    }

    /// The results, given the revisions [`UPSERT_WRITE`] returned.
    pub(crate) fn results(mut self, revisions: &HashMap<usize, i64>) -> Result<Vec<OpResult>> {
        for (n, i) in self.pending {
            let rev =
                Revision(*revisions.get(&n).ok_or_else(|| {
                    Error::Backend(format!("no revision for op {n} of an upsert"))
                })?);
            match &mut self.results[i].applied {
                Applied::Object(o) => o.revision = rev,
                Applied::Tag(t) => t.revision = rev,
                _ => {}
            }
        }
        Ok(self.results)
    }
}

/// Decide every op as [`fleetdb_core::apply::apply_batch`] would, from what [`UPSERT_READ`]
/// found (`found`, by op index). `None` when one would fail (an object exists for `Create`, is
/// missing for `Update`, a namespace is missing, too many labels): the general path then names it.
pub(crate) fn upsert_decide(
    objects: &[NewObject<'_>],
    found: &HashMap<usize, Found>,
    now: Timestamp,
) -> Result<Option<Upsert>> {
    let mut up = Upsert {
        results: Vec::new(),
        pending: Vec::new(),
        objects: String::new(),
        tags: String::new(),
    };
    let (mut ow, mut tw) = (Vec::new(), Vec::new());
    for o in objects {
        let Some((labels, created_at, updated_at, revision, ns_exists)) = found.get(&o.n) else {
            return Err(Error::Backend(format!("the upsert read lost op {}", o.n)));
        };
        let key = o.key;
        let current = match (labels, created_at, updated_at, revision) {
            (Some(l), Some(c), Some(u), Some(r)) => Some(Object {
                key: key.clone(),
                labels: sql::parse_labels_pub(l)?,
                created_at: Timestamp(*c),
                updated_at: Timestamp(*u),
                revision: Revision(*r),
            }),
            _ => None,
        };
        let obj = match (current, o.mode) {
            (Some(_), PutMode::Create) | (None, PutMode::Update) => return Ok(None),
            (None, _) if !ns_exists => return Ok(None),
            (Some(cur), _) => {
                let Ok(merged) = fleetdb_core::validate::merge_labels(&cur.labels, o.patch) else {
                    return Ok(None);
                };
                if merged == cur.labels {
                    up.results.push(OpResult {
                        changed: false,
                        applied: Applied::Object(cur),
                    });
                    None
                } else {
                    let old = fleetdb_core::apply::labels_json(&cur.labels);
                    Some((
                        Object {
                            labels: merged,
                            updated_at: now,
                            ..cur
                        },
                        Some(old),
                    ))
                }
            }
            (None, _) => Some((
                Object {
                    key: key.clone(),
                    labels: o.labels.clone(),
                    created_at: now,
                    updated_at: now,
                    revision: Revision(0),
                },
                None,
            )),
        };
        if let Some((obj, old)) = obj {
            ow.push(serde_json::json!({
                "n": o.n, "ns": key.namespace, "kind": key.kind, "id": key.id,
                "labels": sql::labels_text(&obj.labels), "created_at": obj.created_at.0,
                "old": old, "new": fleetdb_core::apply::labels_json(&obj.labels),
            }));
            up.pending.push((o.n, up.results.len()));
            up.results.push(OpResult {
                changed: true,
                applied: Applied::Object(obj),
            });
        }
        for (i, (name, value, parsed)) in o.tags.iter().enumerate() {
            let n = o.n + 1 + i;
            let Some((old, at, _, rev, _)) = found.get(&n) else {
                return Err(Error::Backend(format!("the upsert read lost op {n}")));
            };
            if let (Some(old), Some(at), Some(rev)) = (old, at, rev) {
                if old == *value {
                    up.results.push(OpResult {
                        changed: false,
                        applied: Applied::Tag(Tag {
                            object: key.clone(),
                            name: name.to_string(),
                            value: sql::parse_value(old)?,
                            updated_at: Timestamp(*at),
                            revision: Revision(*rev),
                        }),
                    });
                    continue;
                }
            }
            tw.push(serde_json::json!({
                "n": n, "ns": key.namespace, "kind": key.kind, "id": key.id,
                "name": name, "value": value, "old": old,
            }));
            up.pending.push((n, up.results.len()));
            up.results.push(OpResult {
                changed: true,
                applied: Applied::Tag(Tag {
                    object: key.clone(),
                    name: name.to_string(),
                    value: parsed.clone(),
                    updated_at: now,
                    revision: Revision(0),
                }),
            });
        }
    }
    up.objects = serde_json::Value::Array(ow).to_string();
    up.tags = serde_json::Value::Array(tw).to_string();
    Ok(Some(up))
}

/// A batch of at least two deletes of distinct objects and nothing else: (op index, key).
pub(crate) fn deletes(batch: &Batch) -> Option<Vec<(usize, &ObjectKey)>> {
    if !batch.preconditions.is_empty() || batch.ops.len() < 2 {
        return None;
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(batch.ops.len());
    for (n, op) in batch.ops.iter().enumerate() {
        let Op::ObjectDelete { key } = op else {
            return None;
        };
        if !seen.insert(key) {
            return None;
        }
        out.push((n, key));
    }
    Some(out)
}

/// Deletes, step 1: every object's labels and its tags (in name order, as the general path
/// lists them), by key, in the transaction that then deletes them. `$1`: `[{n, ns, kind, id}]`.
/// Rows: (n, labels, tag name, tag value); labels NULL for a missing object, name NULL for an
/// object without tags.
pub(crate) const DELETE_READ: &str =
    "WITH k AS MATERIALIZED (SELECT * FROM jsonb_to_recordset(($1::text)::jsonb) \
        AS k(n bigint, ns text, kind text, id text)) \
     SELECT k.n, o.labels, t.name, t.value FROM k \
     LEFT JOIN LATERAL (SELECT labels FROM objects \
       WHERE namespace = k.ns AND kind = k.kind AND id = k.id) AS o ON true \
     LEFT JOIN LATERAL (SELECT name, value FROM tags WHERE o.labels IS NOT NULL \
       AND namespace = k.ns AND kind = k.kind AND id = k.id) AS t ON true \
     ORDER BY k.n, t.name";

/// Deletes, step 2: the change rows (each object's tags, then the object, objects in op order;
/// revisions in that order) and the deletes. `$1`: `[{i, n, ns, kind, id, entity, name, old}]`
/// (`i` the change's place), `$2` now. Returns each object's revision (`[[n, revision], …]`).
pub(crate) const DELETE_WRITE: &str = "WITH ch AS MATERIALIZED (SELECT * FROM jsonb_to_recordset(($1::text)::jsonb) \
        AS k(i bigint, n bigint, ns text, kind text, id text, entity text, name text, old text)), \
     r AS MATERIALIZED (SELECT x.i, nextval('fleetdb_revision') AS rev \
        FROM (SELECT i FROM ch ORDER BY i) AS x), \
     c AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
        SELECT r.rev, ch.ns, ch.kind, ch.id, ch.entity, ch.name, 'delete', ch.old, NULL, $2 \
        FROM ch JOIN r ON r.i = ch.i), \
     dt AS (DELETE FROM tags t USING ch WHERE ch.entity = 'tag' AND t.namespace = ch.ns \
        AND t.kind = ch.kind AND t.id = ch.id AND t.name = ch.name), \
     dobj AS (DELETE FROM objects o USING ch WHERE ch.entity = 'object' AND o.namespace = ch.ns \
        AND o.kind = ch.kind AND o.id = ch.id), \
     dbo AS (DELETE FROM work_backoff b USING ch WHERE ch.entity = 'object' AND b.id = ch.id \
        AND b.namespace = ch.ns AND b.kind = ch.kind) \
     SELECT (SELECT jsonb_agg(jsonb_build_array(ch.n, r.rev))::text \
       FROM ch JOIN r ON r.i = ch.i WHERE ch.entity = 'object')";

/// The parameter of [`DELETE_READ`].
pub(crate) fn delete_read_param(deletes: &[(usize, &ObjectKey)]) -> String {
    serde_json::Value::Array(
        deletes
            .iter()
            .map(
                |(n, k)| serde_json::json!({"n": n, "ns": k.namespace, "kind": k.kind, "id": k.id}),
            )
            .collect(),
    )
    .to_string()
}

/// The parameter of [`DELETE_WRITE`] from what [`DELETE_READ`] returned (rows of (n, labels,
/// tag name, tag value) in its order); `None` when an object is missing (the general path names
/// it).
/// A row of [`DELETE_READ`]: op index, the object's labels, a tag's name and value.
pub(crate) type DeleteRow = (i64, Option<String>, Option<String>, Option<String>);

pub(crate) fn delete_write_param(
    deletes: &[(usize, &ObjectKey)],
    rows: &[DeleteRow],
) -> Result<Option<String>> {
    let mut changes = Vec::new();
    for (n, key) in deletes {
        let mine = rows
            .iter()
            .filter(|r| usize::try_from(r.0).ok() == Some(*n));
        let mut labels = None;
        for (_, l, name, value) in mine {
            let Some(l) = l else {
                return Ok(None);
            };
            labels = Some(l);
            if let (Some(name), Some(value)) = (name, value) {
                changes.push(
                    serde_json::json!({"i": changes.len(), "n": n, "ns": key.namespace,
                    "kind": key.kind, "id": key.id, "entity": "tag", "name": name, "old": value}),
                );
            }
        }
        let Some(labels) = labels else {
            return Ok(None);
        };
        let old = fleetdb_core::apply::labels_json(&sql::parse_labels_pub(labels)?);
        changes.push(
            serde_json::json!({"i": changes.len(), "n": n, "ns": key.namespace,
            "kind": key.kind, "id": key.id, "entity": "object", "name": "", "old": old}),
        );
    }
    Ok(Some(serde_json::Value::Array(changes).to_string()))
}
