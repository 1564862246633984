//! Leases, collectable kinds, blob metadata and the collector's snapshot.

use std::collections::HashMap;

use fleetdb_core::backend::{GcRemoved, RemovedObject};
use fleetdb_core::gc::{BlobInfo, GcKind, GcSnapshot, Lease, Resource, GC_LABEL_PREFIX};
use fleetdb_core::world::Space;
use fleetdb_core::{Error, Labels, ObjectKey, Result, Revision, Timestamp};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::map_err;
use crate::rows::{labels_from_text, labels_text};
use crate::work::collect;

const LEASE_COLS: &str = "id, labels, flat, expires_at, created_at, revision";
const BLOB_COLS: &str = "digest, size, labels, created_at, updated_at, revision";

type LeaseRaw = (String, String, bool, Option<i64>, i64, i64);

fn lease_row(r: &Row<'_>) -> rusqlite::Result<LeaseRaw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn lease_from(raw: LeaseRaw) -> Result<Lease> {
    Ok(Lease {
        id: raw.0,
        labels: labels_from_text(&raw.1)?,
        flat: raw.2,
        expires_at: raw.3.map(Timestamp),
        created_at: Timestamp(raw.4),
        revision: Revision(raw.5),
    })
}

type BlobRaw = (String, i64, String, i64, i64, i64);

fn blob_row(r: &Row<'_>) -> rusqlite::Result<BlobRaw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn blob_from(raw: BlobRaw) -> Result<BlobInfo> {
    Ok(BlobInfo {
        digest: raw.0,
        size: raw.1 as u64,
        labels: labels_from_text(&raw.2)?,
        created_at: Timestamp(raw.3),
        updated_at: Timestamp(raw.4),
        revision: Revision(raw.5),
    })
}

fn exec(c: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<usize> {
    c.prepare_cached(sql)
        .and_then(|mut s| s.execute(p))
        .map_err(map_err)
}

pub(crate) fn gc_kind_read(c: &Connection, kind: &str) -> Result<Option<GcKind>> {
    c.prepare_cached("SELECT kind, collectable, declared_at FROM gc_kinds WHERE kind = ?1")
        .and_then(|mut s| {
            s.query_row([kind], |r| {
                Ok(GcKind {
                    kind: r.get(0)?,
                    collectable: r.get(1)?,
                    declared_at: Timestamp(r.get(2)?),
                })
            })
            .optional()
        })
        .map_err(map_err)
}

pub(crate) fn gc_kinds(c: &Connection) -> Result<Vec<GcKind>> {
    collect(
        c,
        "SELECT kind, collectable, declared_at FROM gc_kinds ORDER BY kind",
        [],
        |r| {
            Ok(GcKind {
                kind: r.get(0)?,
                collectable: r.get(1)?,
                declared_at: Timestamp(r.get(2)?),
            })
        },
    )
}

pub(crate) fn gc_kind_put(c: &Connection, k: &GcKind) -> Result<()> {
    exec(
        c,
        "INSERT INTO gc_kinds (kind, collectable, declared_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (kind) DO UPDATE SET collectable = excluded.collectable, declared_at = excluded.declared_at",
        params![k.kind, k.collectable, k.declared_at.0],
    )?;
    Ok(())
}

pub(crate) fn lease_read(c: &Connection, id: &str) -> Result<Option<Lease>> {
    let raw = c
        .prepare_cached(&format!("SELECT {LEASE_COLS} FROM leases WHERE id = ?1"))
        .and_then(|mut s| s.query_row([id], lease_row).optional())
        .map_err(map_err)?;
    raw.map(lease_from).transpose()
}

pub(crate) fn lease_list(c: &Connection, after: Option<&str>, limit: usize) -> Result<Vec<Lease>> {
    collect(
        c,
        &format!("SELECT {LEASE_COLS} FROM leases WHERE id > ?1 ORDER BY id LIMIT +?2"),
        params![after.unwrap_or(""), limit as i64],
        lease_row,
    )?
    .into_iter()
    .map(lease_from)
    .collect()
}

pub(crate) fn lease_put(c: &Connection, l: &Lease, revision: Revision) -> Result<()> {
    exec(
        c,
        "INSERT INTO leases (id, labels, flat, expires_at, created_at, revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET labels = excluded.labels, flat = excluded.flat,
           expires_at = excluded.expires_at, revision = excluded.revision",
        params![l.id, labels_text(&l.labels), l.flat, l.expires_at.map(|t| t.0), l.created_at.0, revision.0],
    )?;
    Ok(())
}

pub(crate) fn lease_remove(c: &Connection, id: &str) -> Result<()> {
    exec(c, "DELETE FROM lease_resources WHERE lease_id = ?1", [id])?;
    exec(c, "DELETE FROM leases WHERE id = ?1", [id])?;
    Ok(())
}

/// Add a resource unless the lease holds it, counting it on the lease's row: the count after the
/// add, `None` if it was held already.
pub(crate) fn lease_resource_add(
    c: &Connection,
    lease: &str,
    r: &Resource,
    now: Timestamp,
) -> Result<Option<u64>> {
    let (t, ns, kind, id) = r.columns();
    let added = exec(
        c,
        "INSERT INTO lease_resources (lease_id, rtype, namespace, kind, id, added_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        params![lease, t, ns, kind, id, now.0],
    )? > 0;
    if !added {
        return Ok(None);
    }
    let count: Option<i64> = c
        .prepare_cached(
            "UPDATE leases SET resources = resources + 1 WHERE id = ?1 RETURNING resources",
        )
        .and_then(|mut s| s.query_row([lease], |r| r.get(0)).optional())
        .map_err(map_err)?;
    Ok(Some(count.map_or(0, |n| n.max(0) as u64)))
}

pub(crate) fn lease_resource_remove(c: &Connection, lease: &str, r: &Resource) -> Result<bool> {
    let (t, ns, kind, id) = r.columns();
    let removed = exec(
        c,
        "DELETE FROM lease_resources WHERE lease_id = ?1 AND rtype = ?2 AND namespace = ?3 AND kind = ?4 AND id = ?5",
        params![lease, t, ns, kind, id],
    )? > 0;
    if removed {
        exec(
            c,
            "UPDATE leases SET resources = max(resources - 1, 0) WHERE id = ?1",
            [lease],
        )?;
    }
    Ok(removed)
}

pub(crate) fn lease_resources_of(c: &Connection, lease: &str) -> Result<Vec<Resource>> {
    collect(
        c,
        "SELECT rtype, namespace, kind, id FROM lease_resources WHERE lease_id = ?1
         ORDER BY rtype, namespace, kind, id",
        [lease],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        },
    )?
    .into_iter()
    .map(|(t, ns, k, id)| Resource::from_columns(&t, ns, k, id))
    .collect()
}

pub(crate) fn blob_meta_read(c: &Connection, digest: &str) -> Result<Option<BlobInfo>> {
    let raw = c
        .prepare_cached(&format!("SELECT {BLOB_COLS} FROM blobs WHERE digest = ?1"))
        .and_then(|mut s| s.query_row([digest], blob_row).optional())
        .map_err(map_err)?;
    raw.map(blob_from).transpose()
}

pub(crate) fn blob_list(
    c: &Connection,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<BlobInfo>> {
    collect(
        c,
        &format!("SELECT {BLOB_COLS} FROM blobs WHERE digest > ?1 ORDER BY digest LIMIT +?2"),
        params![after.unwrap_or(""), limit as i64],
        blob_row,
    )?
    .into_iter()
    .map(blob_from)
    .collect()
}

pub(crate) fn blob_meta_put(c: &Connection, b: &BlobInfo, revision: Revision) -> Result<()> {
    exec(
        c,
        "INSERT INTO blobs (digest, size, labels, created_at, updated_at, revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (digest) DO UPDATE SET labels = excluded.labels, updated_at = excluded.updated_at,
           revision = excluded.revision",
        params![b.digest, b.size as i64, labels_text(&b.labels), b.created_at.0, b.updated_at.0, revision.0],
    )?;
    Ok(())
}

pub(crate) fn blob_meta_remove(c: &Connection, digest: &str) -> Result<()> {
    exec(c, "DELETE FROM blobs WHERE digest = ?1", [digest])?;
    Ok(())
}

pub(crate) fn changes_after(
    c: &Connection,
    after: Revision,
    limit: usize,
) -> Result<Vec<(Revision, String, String, String)>> {
    // The compaction point, read in the caller's (write) transaction: a compaction moves it in a
    // transaction of its own before deleting any row, so rows after `after` are all there
    // unless it is past `after`.
    let compacted: i64 = c
        .prepare_cached("SELECT value FROM fleetdb_meta WHERE key = 'compacted_revision'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(map_err)?;
    if after.0 < compacted {
        return Err(Error::Compacted {
            requested: after,
            compacted_revision: Revision(compacted),
        });
    }
    collect(
        c,
        "SELECT max(revision), namespace, kind, id FROM changes WHERE revision > ?1 AND op = 'put'
         GROUP BY namespace, kind, id LIMIT +?2",
        params![after.0, limit as i64],
        |r| Ok((Revision(r.get(0)?), r.get(1)?, r.get(2)?, r.get(3)?)),
    )
}

fn gc_labels(text: &str) -> Result<Option<Labels>> {
    if !text.contains(GC_LABEL_PREFIX) {
        return Ok(None);
    }
    let labels = labels_from_text(text)?;
    Ok(fleetdb_core::gc::has_gc_labels(&labels).then_some(labels))
}

/// Everything the mark phase needs, in ONE read transaction (a consistent snapshot).
pub(crate) fn gc_snapshot(c: &Connection) -> Result<GcSnapshot> {
    c.execute_batch("BEGIN").map_err(map_err)?;
    let out = gc_snapshot_in(c);
    let _ = c.execute_batch("COMMIT");
    out
}

fn gc_snapshot_in(c: &Connection) -> Result<GcSnapshot> {
    let revision: i64 = c
        .query_row(
            "SELECT max(coalesce((SELECT max(revision) FROM changes), 0),
                        coalesce((SELECT value FROM fleetdb_meta WHERE key = 'compacted_revision'), 0))",
            [],
            |r| r.get(0),
        )
        .map_err(map_err)?;
    let mut snap = GcSnapshot {
        revision: Revision(revision),
        kinds: gc_kinds(c)?,
        ..GcSnapshot::default()
    };
    snap.leases = lease_list(c, None, i64::MAX as usize)?;
    {
        let mut s = c
            .prepare("SELECT lease_id, rtype, namespace, kind, id FROM lease_resources")
            .map_err(map_err)?;
        let mut rows = s.query([]).map_err(map_err)?;
        while let Some(r) = rows.next().map_err(map_err)? {
            let lease: String = r.get(0).map_err(map_err)?;
            let t: String = r.get(1).map_err(map_err)?;
            let res = Resource::from_columns(
                &t,
                r.get(2).map_err(map_err)?,
                r.get(3).map_err(map_err)?,
                r.get(4).map_err(map_err)?,
            )?;
            snap.lease_resources.push((lease, res));
        }
    }
    {
        let mut s = c
            .prepare("SELECT namespace, kind, id, revision, labels FROM objects")
            .map_err(map_err)?;
        let mut rows = s.query([]).map_err(map_err)?;
        while let Some(r) = rows.next().map_err(map_err)? {
            let labels: String = r.get(4).map_err(map_err)?;
            snap.objects.push((
                ObjectKey {
                    namespace: r.get(0).map_err(map_err)?,
                    kind: r.get(1).map_err(map_err)?,
                    id: r.get(2).map_err(map_err)?,
                },
                Revision(r.get(3).map_err(map_err)?),
                gc_labels(&labels)?,
            ));
        }
    }
    {
        let mut s = c
            .prepare("SELECT digest, revision, labels FROM blobs")
            .map_err(map_err)?;
        let mut rows = s.query([]).map_err(map_err)?;
        while let Some(r) = rows.next().map_err(map_err)? {
            let labels: String = r.get(2).map_err(map_err)?;
            snap.blobs.push((
                r.get(0).map_err(map_err)?,
                Revision(r.get(1).map_err(map_err)?),
                gc_labels(&labels)?,
            ));
        }
    }
    {
        // Content-store blobs named by retained deploys' trees.
        let mut s = c
            .prepare("SELECT meta FROM world WHERE space = ?1 AND meta IS NOT NULL")
            .map_err(map_err)?;
        let mut rows = s.query([Space::Deploy.as_str()]).map_err(map_err)?;
        while let Some(r) = rows.next().map_err(map_err)? {
            let meta: String = r.get(0).map_err(map_err)?;
            if let Ok(m) = serde_json::from_str::<fleetdb_core::world::DeployMeta>(&meta) {
                snap.world_blobs
                    .extend(m.files.into_iter().map(|f| f.digest));
            }
        }
    }
    {
        // What exports hold alive.
        let mut s = c
            .prepare(fleetdb_core::gc::SNAPSHOT_EXPORT_HOLDS_SQL)
            .map_err(map_err)?;
        let mut rows = s.query([]).map_err(map_err)?;
        while let Some(r) = rows.next().map_err(map_err)? {
            let meta: String = r.get(0).map_err(map_err)?;
            snap.export_holds
                .extend(fleetdb_core::gc::export_holds_of_row(
                    &meta,
                    r.get(1).map_err(map_err)?,
                    r.get(2).map_err(map_err)?,
                ));
        }
    }
    Ok(snap)
}

/// The sweep's set-based object removal ([`fleetdb_core::backend::TxRows::gc_objects_remove`]):
/// prepared statements run back to back inside the write transaction (no round trips to save on
/// SQLite, but no label parsing or per-object reads either).
pub(crate) fn objects_remove(
    c: &Connection,
    keys: &[ObjectKey],
    mark: Revision,
) -> Result<GcRemoved<RemovedObject>> {
    let collectable: HashMap<String, bool> = gc_kinds(c)?
        .into_iter()
        .map(|k| (k.kind, k.collectable))
        .collect();
    let mut del = c
        .prepare_cached(
            "DELETE FROM objects WHERE namespace = ?1 AND kind = ?2 AND id = ?3 AND revision <= ?4
             RETURNING labels",
        )
        .map_err(map_err)?;
    let mut exists = c
        .prepare_cached("SELECT 1 FROM objects WHERE namespace = ?1 AND kind = ?2 AND id = ?3")
        .map_err(map_err)?;
    let mut tags = c
        .prepare_cached(
            "DELETE FROM tags WHERE namespace = ?1 AND kind = ?2 AND id = ?3 RETURNING name, value",
        )
        .map_err(map_err)?;
    // A removed object's backoffs go with it (as `object_remove`'s).
    let mut backoffs = c
        .prepare_cached("DELETE FROM work_backoff WHERE id = ?3 AND namespace = ?1 AND kind = ?2")
        .map_err(map_err)?;
    let mut out = GcRemoved {
        removed: Vec::with_capacity(keys.len()),
        kept: 0,
    };
    for k in keys {
        let labels: Option<String> = if collectable.get(&k.kind).copied().unwrap_or(false) {
            del.query_row(params![k.namespace, k.kind, k.id, mark.0], |r| r.get(0))
                .optional()
                .map_err(map_err)?
        } else {
            None
        };
        let Some(labels) = labels else {
            if exists
                .exists(params![k.namespace, k.kind, k.id])
                .map_err(map_err)?
            {
                out.kept += 1;
            }
            continue;
        };
        let mut t: Vec<(String, String)> = tags
            .query_map(params![k.namespace, k.kind, k.id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(map_err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(map_err)?;
        t.sort_unstable();
        backoffs
            .execute(params![k.namespace, k.kind, k.id])
            .map_err(map_err)?;
        out.removed.push(RemovedObject {
            key: k.clone(),
            labels: labels_from_text(&labels)?,
            tags: t,
        });
    }
    Ok(out)
}

/// The sweep's blob metadata removal ([`fleetdb_core::backend::TxRows::gc_blobs_remove`]).
pub(crate) fn blobs_remove(
    c: &Connection,
    digests: &[String],
    mark: Revision,
) -> Result<GcRemoved<BlobInfo>> {
    let mut del = c
        .prepare_cached(&format!(
            "DELETE FROM blobs WHERE digest = ?1 AND revision <= ?2 RETURNING {BLOB_COLS}"
        ))
        .map_err(map_err)?;
    let mut exists = c
        .prepare_cached("SELECT 1 FROM blobs WHERE digest = ?1")
        .map_err(map_err)?;
    let mut out = GcRemoved {
        removed: Vec::with_capacity(digests.len()),
        kept: 0,
    };
    for d in digests {
        match del
            .query_row(params![d, mark.0], blob_row)
            .optional()
            .map_err(map_err)?
        {
            Some(raw) => out.removed.push(blob_from(raw)?),
            None => {
                if exists.exists([d]).map_err(map_err)? {
                    out.kept += 1;
                }
            }
        }
    }
    Ok(out)
}

/// Record one collection's statistics; keep the newest `keep`.
pub(crate) fn run_record(
    c: &mut Connection,
    stats: &str,
    started_at: Timestamp,
    keep: usize,
) -> Result<()> {
    let tx = c.transaction().map_err(map_err)?;
    tx.execute(
        "INSERT INTO gc_runs (started_at, stats) VALUES (?1, ?2)",
        rusqlite::params![started_at.0, stats],
    )
    .map_err(map_err)?;
    tx.execute(
        "DELETE FROM gc_runs WHERE seq <= (SELECT max(seq) FROM gc_runs) - ?1",
        [i64::try_from(keep).unwrap_or(i64::MAX)],
    )
    .map_err(map_err)?;
    tx.commit().map_err(map_err)
}

/// The newest recorded collections' statistics, newest first.
pub(crate) fn runs(c: &Connection, limit: usize) -> Result<Vec<String>> {
    let mut s = c
        .prepare_cached("SELECT stats FROM gc_runs ORDER BY seq DESC LIMIT +?1")
        .map_err(map_err)?;
    let rows = s
        .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| r.get(0))
        .map_err(map_err)?;
    rows.collect::<std::result::Result<_, _>>().map_err(map_err)
}
