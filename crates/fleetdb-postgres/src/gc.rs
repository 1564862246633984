//! Leases, collectable kinds, blob metadata and the collector's snapshot on PostgreSQL.
//!
//! The row primitives follow [`crate::tx`]: every write that the change log records (a lease, a
//! blob's metadata) is ONE statement whose CTE takes `nextval` for the revision and appends the
//! change-log row. [`gc_snapshot`] reads everything the mark phase needs in ONE
//! `REPEATABLE READ READ ONLY` transaction, streaming the large tables.

use std::collections::BTreeMap;

use fleetdb_core::apply::stored_key;
use fleetdb_core::gc::{self, has_gc_labels, BlobInfo, GcKind, GcSnapshot, Lease, Resource};
use fleetdb_core::{Error, Labels, ObjectKey, Result, Revision, Timestamp};
use futures::{pin_mut, TryStreamExt};
use tokio_postgres::Row;

use crate::error::db_err;
use crate::sql::Param;
use crate::{PostgresBackend, TxGuard};

pub(crate) const GC_KIND_GET: &str =
    "SELECT kind, collectable, declared_at FROM gc_kinds WHERE kind = $1";
/// [`GC_KIND_GET`] holding the row: a sweep's check that a kind is still collectable.
pub(crate) const GC_KIND_GET_SHARE: &str =
    "SELECT kind, collectable, declared_at FROM gc_kinds WHERE kind = $1 FOR SHARE";
pub(crate) const GC_KIND_ALL: &str =
    "SELECT kind, collectable, declared_at FROM gc_kinds ORDER BY kind";
pub(crate) const GC_KIND_PUT: &str =
    "INSERT INTO gc_kinds (kind, collectable, declared_at) VALUES ($1, $2, $3) \
     ON CONFLICT (kind) DO UPDATE SET collectable = excluded.collectable, \
     declared_at = excluded.declared_at";

#[cfg(test)]
const LEASE_COLUMNS: &str = "id, labels, flat, expires_at, created_at, revision";
pub(crate) const LEASE_GET: &str =
    "SELECT id, labels, flat, expires_at, created_at, revision FROM leases WHERE id = $1";
pub(crate) const LEASE_LIST: &str =
    "SELECT id, labels, flat, expires_at, created_at, revision FROM leases WHERE id > $1 \
     ORDER BY id LIMIT $2";
pub(crate) const LEASE_ALL: &str =
    "SELECT id, labels, flat, expires_at, created_at, revision FROM leases";
pub(crate) const LEASE_PUT: &str = concat!(
    "WITH c AS (INSERT INTO changes \
     (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
     VALUES (nextval('fleetdb_revision'), $1, $2, $3, $4, $5, $6, $7, $8, $9) \
     RETURNING revision) ",
    "INSERT INTO leases (id, labels, flat, expires_at, created_at, revision) \
     SELECT $10::text, $11::text, $12::bigint, $13::bigint, $14::bigint, c.revision FROM c \
     ON CONFLICT (id) DO UPDATE SET labels = excluded.labels, flat = excluded.flat, \
     expires_at = excluded.expires_at, created_at = excluded.created_at, \
     revision = excluded.revision \
     RETURNING revision"
);
/// The lease and its resource rows go with its change-log row.
pub(crate) const LEASE_REMOVE: &str = concat!(
    "WITH c AS (INSERT INTO changes \
     (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
     VALUES (nextval('fleetdb_revision'), $1, $2, $3, $4, $5, $6, $7, $8, $9) \
     RETURNING revision), ",
    "d AS (DELETE FROM leases WHERE id = $10::text), \
     r AS (DELETE FROM lease_resources WHERE lease_id = $10::text) \
     SELECT revision FROM c"
);
/// Adds the row unless it exists, and counts it on the lease's row, in one statement: (whether it
/// was added, the lease's count after it).
pub(crate) const LEASE_RESOURCE_ADD: &str =
    "WITH i AS (INSERT INTO lease_resources (lease_id, rtype, namespace, kind, id, added_at) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1), \
     u AS (UPDATE leases SET resources = resources + 1 \
     WHERE id = $1 AND EXISTS (SELECT 1 FROM i) RETURNING resources) \
     SELECT EXISTS (SELECT 1 FROM i), (SELECT resources FROM u)";
/// Removes the row and uncounts it, in one statement: whether it was removed.
pub(crate) const LEASE_RESOURCE_REMOVE: &str =
    "WITH d AS (DELETE FROM lease_resources WHERE lease_id = $1 AND rtype = $2 \
     AND namespace = $3 AND kind = $4 AND id = $5 RETURNING 1), \
     u AS (UPDATE leases SET resources = GREATEST(resources - 1, 0) \
     WHERE id = $1 AND EXISTS (SELECT 1 FROM d)) \
     SELECT EXISTS (SELECT 1 FROM d)";
pub(crate) const LEASE_RESOURCES_OF: &str =
    "SELECT rtype, namespace, kind, id FROM lease_resources WHERE lease_id = $1";
const LEASE_RESOURCES_ALL: &str =
    "SELECT lease_id, rtype, namespace, kind, id FROM lease_resources";

#[cfg(test)]
pub(crate) const BLOB_COLUMNS: &str = "digest, size, labels, created_at, updated_at, revision";
pub(crate) const BLOB_GET: &str =
    "SELECT digest, size, labels, created_at, updated_at, revision FROM blobs WHERE digest = $1";
pub(crate) const BLOB_LIST: &str =
    "SELECT digest, size, labels, created_at, updated_at, revision FROM blobs WHERE digest > $1 \
     ORDER BY digest LIMIT $2";
pub(crate) const BLOB_PUT: &str = concat!(
    "WITH c AS (INSERT INTO changes \
     (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
     VALUES (nextval('fleetdb_revision'), $1, $2, $3, $4, $5, $6, $7, $8, $9) \
     RETURNING revision) ",
    "INSERT INTO blobs (digest, size, labels, created_at, updated_at, revision) \
     SELECT $10::text, $11::bigint, $12::text, $13::bigint, $14::bigint, c.revision FROM c \
     ON CONFLICT (digest) DO UPDATE SET size = excluded.size, labels = excluded.labels, \
     updated_at = excluded.updated_at, revision = excluded.revision \
     RETURNING revision"
);
pub(crate) const BLOB_REMOVE: &str = concat!(
    "WITH c AS (INSERT INTO changes \
     (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
     VALUES (nextval('fleetdb_revision'), $1, $2, $3, $4, $5, $6, $7, $8, $9) \
     RETURNING revision), ",
    "d AS (DELETE FROM blobs WHERE digest = $10::text) SELECT revision FROM c"
);
/// Change-log rows after `$1` (never gap markers), at most `$2`.
/// The compaction point, then each distinct entity put after `$1` with its latest revision (at
/// most `$2`; NULLs when there is none): one statement, so the rows and the point are of one
/// snapshot (a compaction deleting rows after `$1` has moved the point past it).
pub(crate) const CHANGES_AFTER: &str = "SELECT m.value, x.rev, x.namespace, x.kind, x.id \
     FROM (SELECT value FROM fleetdb_meta WHERE key = 'compacted_revision') AS m \
     LEFT JOIN (SELECT max(revision) AS rev, namespace, kind, id FROM changes \
       WHERE revision > $1 AND op = 'put' \
       GROUP BY namespace, kind, id LIMIT $2) AS x ON true";

// ---- the sweep (set-based, see `TxRows::gc_objects_remove`) ----

/// Delete the candidates `($1, $2, $3)` (parallel arrays) whose revision is ≤ `$4` and whose kind
/// is collectable now, with their tags, in ONE statement. Rows: `(0, key, labels, NULL)` per
/// object removed, `(1, key, tag value, tag name)` per tag removed, and
/// nothing else (see [`SWEEP_OBJECTS_EXISTING`]).
pub(crate) const SWEEP_OBJECTS: &str = "WITH cand AS (\
       SELECT c.namespace COLLATE \"C\" AS namespace, c.kind COLLATE \"C\" AS kind, \
              c.id COLLATE \"C\" AS id \
       FROM unnest($1::text[], $2::text[], $3::text[]) AS c(namespace, kind, id)), \
     o AS (DELETE FROM objects o USING cand c \
       WHERE o.namespace = c.namespace AND o.kind = c.kind AND o.id = c.id \
         AND o.revision <= $4 \
         AND EXISTS (SELECT 1 FROM gc_kinds k WHERE k.kind = o.kind AND k.collectable <> 0) \
       RETURNING o.namespace, o.kind, o.id, o.labels), \
     t AS (DELETE FROM tags t USING o \
       WHERE t.namespace = o.namespace AND t.kind = o.kind AND t.id = o.id \
       RETURNING t.namespace, t.kind, t.id, t.name, t.value), \
     b AS (DELETE FROM work_backoff b USING o \
       WHERE b.id = o.id AND b.namespace = o.namespace AND b.kind = o.kind) \
     SELECT 0, namespace, kind, id, labels, NULL::text FROM o \
     UNION ALL SELECT 1, namespace, kind, id, value, name FROM t";
/// How many of the candidates `($1, $2, $3)` exist (only asked when some were not removed).
pub(crate) const SWEEP_OBJECTS_EXISTING: &str = "SELECT count(*) FROM objects o \
     JOIN unnest($1::text[], $2::text[], $3::text[]) AS c(namespace, kind, id) \
     ON o.namespace = c.namespace COLLATE \"C\" AND o.kind = c.kind COLLATE \"C\" \
       AND o.id = c.id COLLATE \"C\"";
/// Delete the blobs' metadata `$1` whose revision is ≤ `$2`, returning their columns.
pub(crate) const SWEEP_BLOBS: &str = "WITH cand AS (\
       SELECT d COLLATE \"C\" AS digest FROM unnest($1::text[]) AS d), \
     b AS (DELETE FROM blobs b USING cand c WHERE b.digest = c.digest AND b.revision <= $2 \
       RETURNING b.digest, b.size, b.labels, b.created_at, b.updated_at, b.revision) \
     SELECT digest, size, labels, created_at, updated_at, revision FROM b";
/// How many of the blobs `$1` exist (only asked when some were not removed).
pub(crate) const SWEEP_BLOBS_EXISTING: &str =
    "SELECT count(*) FROM blobs WHERE digest = ANY($1::text[] COLLATE \"C\")";
/// Append change-log rows from parallel arrays, in array order, each with the next revision.
pub(crate) const CHANGES_APPEND_MANY: &str = "INSERT INTO changes \
     (revision, namespace, kind, id, entity, name, op, old_value, new_value, at) \
     SELECT nextval('fleetdb_revision'), namespace, kind, id, entity, name, op, old_value, \
       new_value, at \
     FROM (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
       $6::text[], $7::text[], $8::text[], $9::bigint[]) \
       WITH ORDINALITY AS c(namespace, kind, id, entity, name, op, old_value, new_value, at, n) \
       ORDER BY n) AS c";

/// The compaction point, then each distinct entity put in `($1, $2]` with its latest revision
/// (at most `$3`; NULLs when there is none).
pub(crate) const GC_CHANGED: &str = "SELECT m.value, x.rev, x.namespace, x.kind, x.id \
     FROM (SELECT value FROM fleetdb_meta WHERE key = 'compacted_revision') AS m \
     LEFT JOIN (SELECT max(revision) AS rev, namespace, kind, id FROM changes \
       WHERE revision > $1 AND revision <= $2 AND op = 'put' \
       GROUP BY namespace, kind, id LIMIT $3) AS x ON true";

// ---- the snapshot ----

/// Every object: its key, revision and, only when its labels mention a gc label, the labels.
/// The LIKE is a cheap prefilter (a value may contain the text too; Rust checks the keys).
const SNAPSHOT_OBJECTS: &str = "SELECT namespace, kind, id, revision, \
     CASE WHEN labels LIKE '%fleetdb.io/gc.%' THEN labels END FROM objects";
const SNAPSHOT_BLOBS: &str = "SELECT digest, revision, \
     CASE WHEN labels LIKE '%fleetdb.io/gc.%' THEN labels END FROM blobs";
/// Digests the World's deploy records refer to (their `meta` lists files with digests).
const SNAPSHOT_WORLD_BLOBS: &str = "SELECT DISTINCT f ->> 'digest' FROM world AS w \
     CROSS JOIN LATERAL jsonb_array_elements(\
       CASE WHEN jsonb_typeof(w.meta::jsonb -> 'files') = 'array' \
       THEN w.meta::jsonb -> 'files' ELSE '[]'::jsonb END) AS f \
     WHERE w.space = 'deploy' AND w.meta IS NOT NULL AND f ->> 'digest' IS NOT NULL";

fn labels_from(text: &str) -> Result<Labels> {
    serde_json::from_str(text)
        .map_err(|e| Error::Backend(format!("corrupt labels in the store: {e}")))
}

/// Labels text of a snapshot row: parsed only when it really has a gc label key.
fn gc_labels(text: Option<&str>) -> Result<Option<Labels>> {
    match text {
        None => Ok(None),
        Some(t) => {
            let l = labels_from(t)?;
            Ok(has_gc_labels(&l).then_some(l))
        }
    }
}

pub(crate) fn gc_kind_from_row(r: &Row) -> Result<GcKind> {
    Ok(GcKind {
        kind: r.try_get(0).map_err(db_err)?,
        collectable: r.try_get::<_, i64>(1).map_err(db_err)? != 0,
        declared_at: Timestamp(r.try_get(2).map_err(db_err)?),
    })
}

pub(crate) fn lease_from_row(r: &Row) -> Result<Lease> {
    let labels: String = r.try_get(1).map_err(db_err)?;
    let expires: Option<i64> = r.try_get(3).map_err(db_err)?;
    Ok(Lease {
        id: r.try_get(0).map_err(db_err)?,
        labels: labels_from(&labels)?,
        flat: r.try_get::<_, i64>(2).map_err(db_err)? != 0,
        expires_at: expires.map(Timestamp),
        created_at: Timestamp(r.try_get(4).map_err(db_err)?),
        revision: Revision(r.try_get(5).map_err(db_err)?),
    })
}

/// A resource from `rtype, namespace, kind, id` starting at column `at`.
pub(crate) fn resource_from_row(r: &Row, at: usize) -> Result<Resource> {
    Resource::from_columns(
        &r.try_get::<_, String>(at).map_err(db_err)?,
        r.try_get(at + 1).map_err(db_err)?,
        r.try_get(at + 2).map_err(db_err)?,
        r.try_get(at + 3).map_err(db_err)?,
    )
}

pub(crate) fn blob_from_row(r: &Row) -> Result<BlobInfo> {
    let labels: String = r.try_get(2).map_err(db_err)?;
    let size: i64 = r.try_get(1).map_err(db_err)?;
    Ok(BlobInfo {
        digest: r.try_get(0).map_err(db_err)?,
        size: u64::try_from(size).unwrap_or(0),
        labels: labels_from(&labels)?,
        created_at: Timestamp(r.try_get(3).map_err(db_err)?),
        updated_at: Timestamp(r.try_get(4).map_err(db_err)?),
        revision: Revision(r.try_get(5).map_err(db_err)?),
    })
}

pub(crate) fn labels_text(labels: &BTreeMap<String, String>) -> String {
    crate::sql::labels_text(labels)
}

/// How long the snapshot waits for revisions still in flight before settling below them. Short:
/// a gap marker waiting for one writer holds the markers below it, and a writer whose revision is
/// among them waits too; settling lower only means the sweep spares more (everything after the
/// mark's revision is spared).
const SNAPSHOT_SETTLE_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// One consistent view for the mark phase (see the module documentation).
///
/// The revision is the settled revision taken BEFORE the read transaction starts: every revision
/// up to it is committed (or never will be), so its rows are in the snapshot; anything the
/// snapshot holds with a higher revision is newer than the mark and the sweep spares it (and
/// everything the change log after it reaches).
pub(crate) async fn gc_snapshot(backend: &PostgresBackend) -> Result<GcSnapshot> {
    let revision = crate::settle::settled_revision(backend, SNAPSHOT_SETTLE_WAIT).await?;
    // Two connections reading halves of the large tables in one exported snapshot: the server's
    // and this process's work of a million rows spread over two cores. A pool of one connection
    // (or a server without exported snapshots) reads it all on one.
    if backend.pool.status().max_size >= 2 {
        if let Some(snap) = parallel_snapshot(backend, revision).await? {
            return Ok(snap);
        }
    }
    let client = backend.client().await?;
    let mut guard = TxGuard {
        client: Some(client),
        open: true,
    };
    let conn = guard.client();
    conn.batch_execute(BEGIN_SNAPSHOT).await.map_err(db_err)?;
    let out = async {
        let mut snap = read_small(conn, revision).await?;
        read_large(conn, Part::All, &mut snap).await?;
        Ok(snap)
    }
    .await;
    // A read-only transaction: ending it either way releases the snapshot.
    conn.batch_execute(if out.is_ok() { "COMMIT" } else { "ROLLBACK" })
        .await
        .map_err(db_err)?;
    guard.open = false;
    out
}

/// The snapshot transaction. Sequential scans are off so that a half of a table is read by a TID
/// range scan (the planner would otherwise scan the whole table for a half of it); JIT is off
/// with them (see `sql::CLAIM_PLANNED`).
const BEGIN_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
     SELECT set_config('jit', 'off', true), set_config('enable_seqscan', 'off', true)";

/// Which rows of the large tables a reader takes: all of them, or the blocks before or from a
/// block number (objects, blobs).
#[derive(Clone, Copy)]
enum Part {
    All,
    Before(i64, i64),
    From(i64, i64),
}

/// The snapshot read by two connections in one exported snapshot: the first exports it and reads
/// the small tables and the first half of `objects` and `blobs` (by block), the second the rest.
/// `None` when the server cannot export or import a snapshot: the caller reads on one connection.
async fn parallel_snapshot(
    backend: &PostgresBackend,
    revision: Revision,
) -> Result<Option<GcSnapshot>> {
    let (first, second) = futures::try_join!(backend.client(), backend.client())?;
    let mut first = TxGuard {
        client: Some(first),
        open: true,
    };
    let mut second = TxGuard {
        client: Some(second),
        open: true,
    };
    let setup = async {
        let row = {
            let conn = first.client();
            conn.batch_execute(BEGIN_SNAPSHOT).await?;
            conn.query_one(
                "SELECT pg_export_snapshot(), \
                 pg_relation_size('objects') / current_setting('block_size')::bigint, \
                 pg_relation_size('blobs') / current_setting('block_size')::bigint",
                &[],
            )
            .await?
        };
        let id: String = row.try_get(0)?;
        let (objects, blobs): (i64, i64) = (row.try_get(1)?, row.try_get(2)?);
        let conn = second.client();
        conn.batch_execute(&format!(
            "{BEGIN_SNAPSHOT}; SET TRANSACTION SNAPSHOT '{}'",
            id.replace('\'', "''")
        ))
        .await?;
        Ok::<_, tokio_postgres::Error>((objects / 2, blobs / 2))
    }
    .await;
    let end = |guard: &mut TxGuard, ok: bool| {
        let conn = guard.client.take();
        async move {
            if let Some(conn) = conn {
                // A read-only transaction: ending it either way releases the snapshot.
                if conn
                    .batch_execute(if ok { "COMMIT" } else { "ROLLBACK" })
                    .await
                    .is_err()
                {
                    drop(deadpool_postgres::Object::take(conn));
                }
            }
        }
    };
    let (objects_mid, blobs_mid) = match setup {
        Ok(mids) => mids,
        Err(e) => {
            tracing::debug!(error = %e, "no exported snapshot; the collector reads on one connection");
            futures::join!(end(&mut first, false), end(&mut second, false));
            return Ok(None);
        }
    };
    let halves = (
        Part::Before(objects_mid, blobs_mid),
        Part::From(objects_mid, blobs_mid),
    );
    let read_first = read_on_blocking_thread(first, revision, halves.0, true);
    let read_second = read_on_blocking_thread(second, revision, halves.1, false);
    let (joined_first, joined_second) = futures::join!(read_first, read_second);
    let failed = |e: tokio::task::JoinError| {
        Error::Backend(format!("a snapshot reader of the collector failed: {e}"))
    };
    let (mut first, a) = joined_first.map_err(failed)?;
    let (mut second, b) = joined_second.map_err(failed)?;
    let ok = a.is_ok() && b.is_ok();
    first.open = false;
    second.open = false;
    futures::join!(end(&mut first, ok), end(&mut second, ok));
    let (mut snap, rest) = (a?, b?);
    snap.objects.extend(rest.objects);
    snap.blobs.extend(rest.blobs);
    Ok(Some(snap))
}

/// Read `part` of the large tables (and, with `small`, the small ones first) in `reader`'s
/// snapshot transaction on a blocking thread of its own, so on another core when there is one,
/// and never on a runtime worker that writers need: decoding half a million rows is seconds of
/// CPU with nothing to wait for, and a result already received is collected without yielding
/// (read on a runtime worker, the small tables' tens of thousands of rows held a concurrent
/// writer for up to 82 ms at the start of a collection). Returns the reader with what it read.
fn read_on_blocking_thread(
    reader: TxGuard,
    revision: Revision,
    part: Part,
    small: bool,
) -> tokio::task::JoinHandle<(TxGuard, Result<GcSnapshot>)> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        handle.block_on(async move {
            let out = async {
                let conn = reader.client();
                let mut snap = if small {
                    read_small(conn, revision).await?
                } else {
                    GcSnapshot::default()
                };
                read_large(conn, part, &mut snap).await?;
                Ok(snap)
            }
            .await;
            (reader, out)
        })
    })
}

/// The small tables (kinds, leases, their resources, the World's blob references), pipelined.
async fn read_small(
    conn: &deadpool_postgres::ClientWrapper,
    revision: Revision,
) -> Result<GcSnapshot> {
    let none: [Param<'_>; 0] = [];
    let (s_kinds, s_leases, s_res, s_world, s_exports) = futures::try_join!(
        conn.prepare_cached(GC_KIND_ALL),
        conn.prepare_cached(LEASE_ALL),
        conn.prepare_cached(LEASE_RESOURCES_ALL),
        conn.prepare_cached(SNAPSHOT_WORLD_BLOBS),
        conn.prepare_cached(gc::SNAPSHOT_EXPORT_HOLDS_SQL),
    )
    .map_err(db_err)?;
    let (kinds, leases, res, world, exports) = futures::try_join!(
        conn.query(&s_kinds, &none),
        conn.query(&s_leases, &none),
        conn.query(&s_res, &none),
        conn.query(&s_world, &none),
        conn.query(&s_exports, &none),
    )
    .map_err(db_err)?;
    let mut export_holds = Vec::new();
    for r in &exports {
        let meta: String = r.try_get(0).map_err(db_err)?;
        export_holds.extend(gc::export_holds_of_row(
            &meta,
            r.try_get(1).map_err(db_err)?,
            r.try_get(2).map_err(db_err)?,
        ));
    }
    Ok(GcSnapshot {
        revision,
        kinds: kinds.iter().map(gc_kind_from_row).collect::<Result<_>>()?,
        leases: leases.iter().map(lease_from_row).collect::<Result<_>>()?,
        lease_resources: res
            .iter()
            .map(|r| Ok((r.try_get(0).map_err(db_err)?, resource_from_row(r, 1)?)))
            .collect::<Result<_>>()?,
        world_blobs: world
            .iter()
            .map(|r| r.try_get(0).map_err(db_err))
            .collect::<Result<_>>()?,
        export_holds,
        ..GcSnapshot::default()
    })
}

/// `objects` and `blobs` (the `part` of them), streamed row by row into `snap`.
async fn read_large(
    conn: &deadpool_postgres::ClientWrapper,
    part: Part,
    snap: &mut GcSnapshot,
) -> Result<()> {
    let (filter, objects_block, blobs_block) = match part {
        Part::All => ("", 0, 0),
        Part::Before(o, b) => (" WHERE ctid < format('(%s,0)', $1::bigint)::tid", o, b),
        Part::From(o, b) => (" WHERE ctid >= format('(%s,0)', $1::bigint)::tid", o, b),
    };
    let (objects_sql, blobs_sql) = (
        format!("{SNAPSHOT_OBJECTS}{filter}"),
        format!("{SNAPSHOT_BLOBS}{filter}"),
    );
    let (s_objects, s_blobs) = futures::try_join!(
        conn.prepare_cached(&objects_sql),
        conn.prepare_cached(&blobs_sql),
    )
    .map_err(db_err)?;
    fn params<'a>(filtered: bool, block: &'a i64) -> Vec<Param<'a>> {
        if filtered {
            vec![block as Param<'a>]
        } else {
            Vec::new()
        }
    }
    let filtered = !filter.is_empty();
    let objects = conn
        .query_raw(&s_objects, params(filtered, &objects_block))
        .await
        .map_err(db_err)?;
    pin_mut!(objects);
    while let Some(r) = objects.try_next().await.map_err(db_err)? {
        let key: ObjectKey = stored_key(
            r.try_get(0).map_err(db_err)?,
            r.try_get(1).map_err(db_err)?,
            r.try_get(2).map_err(db_err)?,
        );
        let rev = Revision(r.try_get(3).map_err(db_err)?);
        let labels = gc_labels(r.try_get::<_, Option<&str>>(4).map_err(db_err)?)?;
        snap.objects.push((key, rev, labels));
    }
    let blobs = conn
        .query_raw(&s_blobs, params(filtered, &blobs_block))
        .await
        .map_err(db_err)?;
    pin_mut!(blobs);
    while let Some(r) = blobs.try_next().await.map_err(db_err)? {
        let digest: String = r.try_get(0).map_err(db_err)?;
        let rev = Revision(r.try_get(1).map_err(db_err)?);
        let labels = gc_labels(r.try_get::<_, Option<&str>>(2).map_err(db_err)?)?;
        snap.blobs.push((digest, rev, labels));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshot of a large store, timed (run with `--ignored --nocapture`, in release).
    #[tokio::test]
    #[ignore]
    async fn snapshot_of_a_million_objects() {
        use fleetdb_core::Backend as _;
        let base = crate::testing::test_url();
        let (url, schema) = crate::testing::create_schema(&base).await.unwrap();
        let backend = PostgresBackend::open(
            &url,
            crate::PostgresOptions::default(),
            std::sync::Arc::new(fleetdb_core::SystemClock),
        )
        .await
        .unwrap();
        let client = backend.client().await.unwrap();
        client
            .batch_execute(
                "INSERT INTO objects (namespace, kind, id, labels, created_at, updated_at, revision) \
                 SELECT 'default', CASE WHEN g % 10 = 0 THEN 'image' ELSE 'layer' END, 'o' || g, \
                 CASE WHEN g % 5 = 0 THEN '{\"fleetdb.io/gc.ref.layer\":\"o' || (g + 1) || '\"}' \
                 ELSE '{\"team\":\"infra\"}' END, 0, 0, g \
                 FROM generate_series(1, 1000000) AS g; ANALYZE objects",
            )
            .await
            .unwrap();
        drop(client);
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let snap = backend.gc_snapshot().await.unwrap();
            let with_labels = snap.objects.iter().filter(|o| o.2.is_some()).count();
            eprintln!(
                "snapshot: {} objects ({with_labels} with gc labels) in {:?}",
                snap.objects.len(),
                t.elapsed()
            );
            assert_eq!(snap.objects.len(), 1_000_000);
            assert_eq!(with_labels, 200_000);
        }
        crate::testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// The snapshot read in halves (two connections, one exported snapshot) holds every row
    /// once, and nothing written after it; a pool of one connection reads the same on one.
    #[tokio::test]
    async fn snapshot_halves_hold_every_row_once() {
        use fleetdb_core::Backend as _;
        let base = crate::testing::test_url();
        let (url, schema) = crate::testing::create_schema(&base).await.unwrap();
        let open = |pool_size_max| {
            PostgresBackend::open(
                &url,
                crate::PostgresOptions {
                    migrate: true,
                    pool_size_max,
                },
                std::sync::Arc::new(fleetdb_core::SystemClock),
            )
        };
        let backend = open(4).await.unwrap();
        let client = backend.client().await.unwrap();
        client
            .batch_execute(
                "INSERT INTO objects (namespace, kind, id, labels, created_at, updated_at, revision) \
                 SELECT 'default', 'layer', 'o' || g, '{}', 0, 0, g FROM generate_series(1, 5000) g; \
                 INSERT INTO blobs (digest, size, labels, created_at, updated_at, revision) \
                 SELECT 'sha256:' || lpad(to_hex(g), 64, '0'), 1, '{}', 0, 0, g \
                 FROM generate_series(1, 3000) g;",
            )
            .await
            .unwrap();
        let blocks: i64 = client
            .query_one("SELECT pg_relation_size('objects') / 8192", &[])
            .await
            .unwrap()
            .get(0);
        assert!(blocks >= 4, "objects spans {blocks} blocks");
        drop(client);
        let distinct = |snap: &GcSnapshot| {
            let objects: std::collections::HashSet<_> =
                snap.objects.iter().map(|o| o.0.id.clone()).collect();
            let blobs: std::collections::HashSet<_> =
                snap.blobs.iter().map(|b| b.0.clone()).collect();
            (
                snap.objects.len(),
                objects.len(),
                snap.blobs.len(),
                blobs.len(),
            )
        };
        let snap = backend.gc_snapshot().await.unwrap();
        assert_eq!(distinct(&snap), (5000, 5000, 3000, 3000));
        let single = open(1).await.unwrap();
        let snap = single.gc_snapshot().await.unwrap();
        assert_eq!(distinct(&snap), (5000, 5000, 3000, 3000));
        drop((backend, single));
        crate::testing::drop_schema(&base, &schema).await.unwrap();
    }

    #[test]
    fn columns_match_decoders() {
        assert!(LEASE_GET.contains(LEASE_COLUMNS));
        assert!(BLOB_GET.contains(BLOB_COLUMNS));
    }
}
