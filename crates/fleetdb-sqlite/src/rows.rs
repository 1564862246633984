//! Row mapping and the [`TxRows`] primitives, run by the holder of the write connection inside one SQLite
//! transaction. The futures are always ready at once (rusqlite is synchronous).

use async_trait::async_trait;
use fleetdb_core::apply::stored_key;
use fleetdb_core::backend::{
    CandidateQuery, ChangeDraft, GcRemoved, RemovedObject, TagRead, TxRows,
};
use fleetdb_core::work::{BackoffInfo, Process, SessionInfo, WorkInfo};
use fleetdb_core::{Error, Labels, Namespace, Object, ObjectKey, Result, Revision, Tag, Timestamp};
use rusqlite::{params, Connection, OptionalExtension, Row};

use fleetdb_core::gc::{BlobInfo, GcKind, Lease, Resource};
use fleetdb_core::world::{Space, WorldQuery, WorldRecord};

use crate::{gc, map_err, work, world};

pub(crate) fn labels_from_text(text: &str) -> Result<Labels> {
    serde_json::from_str(text)
        .map_err(|e| Error::Backend(format!("corrupt labels in the store: {e}")))
}

pub(crate) fn labels_text(labels: &Labels) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_string())
}

pub(crate) const NAMESPACE_COLS: &str = "name, labels, created_at, updated_at, revision";
pub(crate) const OBJECT_COLS: &str =
    "namespace, kind, id, labels, created_at, updated_at, revision";
pub(crate) const TAG_COLS: &str = "namespace, kind, id, name, value, updated_at, revision";

pub(crate) fn namespace_row(r: &Row<'_>) -> rusqlite::Result<(String, String, i64, i64, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

pub(crate) fn namespace_from(raw: (String, String, i64, i64, i64)) -> Result<Namespace> {
    Ok(Namespace {
        name: raw.0,
        labels: labels_from_text(&raw.1)?,
        created_at: Timestamp(raw.2),
        updated_at: Timestamp(raw.3),
        revision: Revision(raw.4),
    })
}

type ObjectRaw = (String, String, String, String, i64, i64, i64);

pub(crate) fn object_row(r: &Row<'_>) -> rusqlite::Result<ObjectRaw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    ))
}

pub(crate) fn object_from(raw: ObjectRaw) -> Result<Object> {
    Ok(Object {
        key: stored_key(raw.0, raw.1, raw.2),
        labels: labels_from_text(&raw.3)?,
        created_at: Timestamp(raw.4),
        updated_at: Timestamp(raw.5),
        revision: Revision(raw.6),
    })
}

type TagRaw = (String, String, String, String, String, i64, i64);

pub(crate) fn tag_row(r: &Row<'_>) -> rusqlite::Result<TagRaw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    ))
}

/// A tag and its canonical JSON text.
pub(crate) fn tag_from(raw: TagRaw) -> Result<(Tag, String)> {
    let value = serde_json::from_str(&raw.4)
        .map_err(|e| Error::Backend(format!("corrupt tag value in the store: {e}")))?;
    Ok((
        Tag {
            object: stored_key(raw.0, raw.1, raw.2),
            name: raw.3,
            value,
            updated_at: Timestamp(raw.5),
            revision: Revision(raw.6),
        },
        raw.4,
    ))
}

pub(crate) fn get_namespace(conn: &Connection, name: &str) -> Result<Option<Namespace>> {
    let raw = conn
        .prepare_cached(&format!(
            "SELECT {NAMESPACE_COLS} FROM namespaces WHERE name = ?1"
        ))
        .and_then(|mut s| s.query_row([name], namespace_row).optional())
        .map_err(map_err)?;
    raw.map(namespace_from).transpose()
}

pub(crate) fn get_object(conn: &Connection, key: &ObjectKey) -> Result<Option<Object>> {
    let raw = conn
        .prepare_cached(&format!(
            "SELECT {OBJECT_COLS} FROM objects WHERE namespace = ?1 AND kind = ?2 AND id = ?3"
        ))
        .and_then(|mut s| {
            s.query_row(params![key.namespace, key.kind, key.id], object_row)
                .optional()
        })
        .map_err(map_err)?;
    raw.map(object_from).transpose()
}

pub(crate) fn get_tag(
    conn: &Connection,
    key: &ObjectKey,
    name: &str,
) -> Result<Option<(Tag, String)>> {
    let raw = conn
        .prepare_cached(&format!(
            "SELECT {TAG_COLS} FROM tags WHERE namespace = ?1 AND kind = ?2 AND id = ?3 AND name = ?4"
        ))
        .and_then(|mut s| s.query_row(params![key.namespace, key.kind, key.id, name], tag_row).optional())
        .map_err(map_err)?;
    raw.map(tag_from).transpose()
}

pub(crate) fn list_tags(conn: &Connection, key: &ObjectKey) -> Result<Vec<(Tag, String)>> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {TAG_COLS} FROM tags WHERE namespace = ?1 AND kind = ?2 AND id = ?3 ORDER BY name"
        ))
        .map_err(map_err)?;
    let rows = stmt
        .query_map(params![key.namespace, key.kind, key.id], tag_row)
        .map_err(map_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(map_err)?;
    rows.into_iter().map(tag_from).collect()
}

/// The revisions this group has handed out; the writer loads it under the write lock.
pub(crate) struct SqliteRows<'c> {
    pub conn: &'c mut Connection,
    pub revision: &'c mut i64,
}

impl SqliteRows<'_> {
    fn append(&mut self, c: &ChangeDraft) -> Result<Revision> {
        *self.revision += 1;
        let rev = *self.revision;
        self.conn
            .prepare_cached(
                "INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    rev,
                    c.namespace,
                    c.kind,
                    c.id,
                    c.entity.as_str(),
                    c.name,
                    c.op.as_str(),
                    c.old_value,
                    c.new_value,
                    c.at.0
                ])
            })
            .map_err(map_err)?;
        Ok(Revision(rev))
    }

    fn exec(&mut self, sql: &str, params: impl rusqlite::Params) -> Result<()> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .map_err(map_err)?;
        Ok(())
    }
}

#[async_trait]
impl TxRows for SqliteRows<'_> {
    async fn namespace_read(&mut self, name: &str) -> Result<Option<Namespace>> {
        get_namespace(self.conn, name)
    }

    async fn namespace_usage(&mut self, name: &str) -> Result<Vec<(String, u64)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT kind, count(*) FROM objects WHERE namespace = ?1 GROUP BY kind ORDER BY kind LIMIT 10")
            .map_err(map_err)?;
        let rows = stmt
            .query_map([name], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(map_err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(map_err)?;
        Ok(rows)
    }

    async fn namespace_put(&mut self, ns: &Namespace, change: &ChangeDraft) -> Result<Revision> {
        let rev = self.append(change)?;
        self.exec(
            "INSERT INTO namespaces (name, labels, created_at, updated_at, revision) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO UPDATE SET labels = excluded.labels, updated_at = excluded.updated_at, revision = excluded.revision",
            params![ns.name, labels_text(&ns.labels), ns.created_at.0, ns.updated_at.0, rev.0],
        )?;
        Ok(rev)
    }

    async fn namespace_remove(&mut self, name: &str, change: &ChangeDraft) -> Result<Revision> {
        let rev = self.append(change)?;
        self.exec("DELETE FROM namespaces WHERE name = ?1", [name])?;
        Ok(rev)
    }

    async fn object_read(&mut self, key: &ObjectKey) -> Result<Option<Object>> {
        get_object(self.conn, key)
    }

    async fn object_put(&mut self, obj: &Object, change: &ChangeDraft) -> Result<Revision> {
        let rev = self.append(change)?;
        let k = &obj.key;
        self.exec(
            "INSERT INTO objects (namespace, kind, id, labels, created_at, updated_at, revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (namespace, kind, id) DO UPDATE SET labels = excluded.labels, updated_at = excluded.updated_at, revision = excluded.revision",
            params![k.namespace, k.kind, k.id, labels_text(&obj.labels), obj.created_at.0, obj.updated_at.0, rev.0],
        )?;
        Ok(rev)
    }

    async fn object_remove(&mut self, key: &ObjectKey, change: &ChangeDraft) -> Result<Revision> {
        let rev = self.append(change)?;
        self.exec(
            "DELETE FROM objects WHERE namespace = ?1 AND kind = ?2 AND id = ?3",
            params![key.namespace, key.kind, key.id],
        )?;
        // Its backoffs (and parkings) go with it: a new object under the key starts afresh.
        self.exec(
            "DELETE FROM work_backoff WHERE id = ?3 AND namespace = ?1 AND kind = ?2",
            params![key.namespace, key.kind, key.id],
        )?;
        Ok(rev)
    }

    async fn tag_read(&mut self, key: &ObjectKey, name: &str) -> Result<TagRead> {
        // One statement: whether the object exists, and the tag row if any.
        let raw = self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM objects WHERE namespace = ?1 AND kind = ?2 AND id = ?3),
                        t.value, t.updated_at, t.revision
                 FROM (SELECT 1) LEFT JOIN tags t
                   ON t.namespace = ?1 AND t.kind = ?2 AND t.id = ?3 AND t.name = ?4",
            )
            .and_then(|mut s| {
                s.query_row(params![key.namespace, key.kind, key.id, name], |r| {
                    Ok((
                        r.get::<_, bool>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                })
            })
            .map_err(map_err)?;
        let tag = match raw {
            (_, Some(value), Some(updated_at), Some(revision)) => Some(tag_from((
                key.namespace.clone(),
                key.kind.clone(),
                key.id.clone(),
                name.to_string(),
                value,
                updated_at,
                revision,
            ))?),
            _ => None,
        };
        Ok(TagRead {
            object_exists: raw.0,
            tag,
        })
    }

    async fn tag_read_all(&mut self, key: &ObjectKey) -> Result<Vec<(Tag, String)>> {
        list_tags(self.conn, key)
    }

    async fn tag_put(&mut self, tag: &Tag, text: &str, change: &ChangeDraft) -> Result<Revision> {
        let rev = self.append(change)?;
        let k = &tag.object;
        self.exec(
            "INSERT INTO tags (namespace, kind, id, name, value, updated_at, revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (namespace, kind, id, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at, revision = excluded.revision",
            params![k.namespace, k.kind, k.id, tag.name, text, tag.updated_at.0, rev.0],
        )?;
        Ok(rev)
    }

    async fn tag_remove(
        &mut self,
        key: &ObjectKey,
        name: &str,
        change: &ChangeDraft,
    ) -> Result<Revision> {
        let rev = self.append(change)?;
        self.exec(
            "DELETE FROM tags WHERE namespace = ?1 AND kind = ?2 AND id = ?3 AND name = ?4",
            params![key.namespace, key.kind, key.id, name],
        )?;
        Ok(rev)
    }

    async fn session_read(&mut self, id: &str) -> Result<Option<SessionInfo>> {
        work::session_read(self.conn, id)
    }
    async fn session_insert(&mut self, s: &SessionInfo) -> Result<()> {
        work::session_insert(self.conn, s)
    }
    async fn session_remove(&mut self, id: &str) -> Result<()> {
        work::session_remove(self.conn, id)
    }
    async fn sessions_expired(&mut self, now: Timestamp, limit: usize) -> Result<Vec<SessionInfo>> {
        work::sessions_expired(self.conn, now, limit)
    }
    async fn process_read(&mut self, name: &str) -> Result<Option<Process>> {
        work::process_read(self.conn, name)
    }
    async fn process_put(&mut self, p: &Process) -> Result<()> {
        work::process_put(self.conn, p)
    }
    async fn process_all(&mut self) -> Result<Vec<Process>> {
        work::process_all(self.conn)
    }
    async fn work_read(&mut self, key: &ObjectKey, process: &str) -> Result<Option<WorkInfo>> {
        work::work_read(self.conn, key, process)
    }
    async fn work_count_live(&mut self, process: &str, now: Timestamp) -> Result<u64> {
        work::work_count_live(self.conn, process, now)
    }
    /// One writer at a time: nothing changes the row before this transaction ends.
    async fn work_read_held(&mut self, key: &ObjectKey, process: &str) -> Result<Option<WorkInfo>> {
        work::work_read(self.conn, key, process)
    }
    async fn work_of_session(&mut self, session_id: &str) -> Result<Vec<WorkInfo>> {
        work::work_of_session(self.conn, session_id)
    }
    async fn work_orphaned(&mut self, limit: usize) -> Result<Vec<WorkInfo>> {
        work::work_orphaned(self.conn, limit)
    }
    async fn work_insert(&mut self, w: &WorkInfo) -> Result<()> {
        work::work_insert(self.conn, w)
    }
    async fn work_remove(&mut self, key: &ObjectKey, process: &str) -> Result<()> {
        work::work_remove(self.conn, key, process)
    }
    async fn backoff_read(
        &mut self,
        key: &ObjectKey,
        process: &str,
    ) -> Result<Option<BackoffInfo>> {
        work::backoff_read(self.conn, key, process)
    }
    async fn backoff_put(&mut self, b: &BackoffInfo) -> Result<()> {
        work::backoff_put(self.conn, b)
    }
    async fn backoff_remove(&mut self, key: &ObjectKey, process: &str) -> Result<bool> {
        work::backoff_remove(self.conn, key, process)
    }
    async fn history_append(&mut self, h: &fleetdb_core::work::HistoryEntry) -> Result<()> {
        work::history_append(self.conn, h)
    }
    async fn next_token(&mut self) -> Result<i64> {
        work::next_token(self.conn)
    }
    async fn claim_candidates(&mut self, q: &CandidateQuery) -> Result<Vec<ObjectKey>> {
        work::claim_candidates(self.conn, q)
    }
    async fn world_read(&mut self, space: Space, key: &str) -> Result<Option<WorldRecord>> {
        world::world_read(self.conn, space, key)
    }
    async fn world_scan(&mut self, q: &WorldQuery) -> Result<Vec<WorldRecord>> {
        world::world_scan(self.conn, q)
    }
    async fn world_put(&mut self, r: &WorldRecord, change: &ChangeDraft) -> Result<Revision> {
        let rev = self.append(change)?;
        world::world_write(self.conn, r, rev)?;
        Ok(rev)
    }
    async fn world_remove(
        &mut self,
        space: Space,
        key: &str,
        change: &ChangeDraft,
    ) -> Result<Revision> {
        let rev = self.append(change)?;
        world::world_delete(self.conn, space, key)?;
        Ok(rev)
    }
    async fn change_append(&mut self, change: &ChangeDraft) -> Result<Revision> {
        self.append(change)
    }
    async fn gc_kind_read(&mut self, kind: &str) -> Result<Option<GcKind>> {
        gc::gc_kind_read(self.conn, kind)
    }
    async fn gc_kind_put(&mut self, k: &GcKind) -> Result<()> {
        gc::gc_kind_put(self.conn, k)
    }
    async fn lease_read(&mut self, id: &str) -> Result<Option<Lease>> {
        gc::lease_read(self.conn, id)
    }
    async fn lease_put(&mut self, lease: &Lease, change: &ChangeDraft) -> Result<Revision> {
        let rev = self.append(change)?;
        gc::lease_put(self.conn, lease, rev)?;
        Ok(rev)
    }
    async fn lease_remove(&mut self, id: &str, change: &ChangeDraft) -> Result<Revision> {
        let rev = self.append(change)?;
        gc::lease_remove(self.conn, id)?;
        Ok(rev)
    }
    async fn lease_resource_add(
        &mut self,
        lease: &str,
        resource: &Resource,
        now: Timestamp,
    ) -> Result<Option<u64>> {
        gc::lease_resource_add(self.conn, lease, resource, now)
    }
    async fn lease_resource_remove(&mut self, lease: &str, resource: &Resource) -> Result<bool> {
        gc::lease_resource_remove(self.conn, lease, resource)
    }
    async fn lease_resources_of(&mut self, lease: &str) -> Result<Vec<Resource>> {
        gc::lease_resources_of(self.conn, lease)
    }
    async fn blob_meta_read(&mut self, digest: &str) -> Result<Option<BlobInfo>> {
        gc::blob_meta_read(self.conn, digest)
    }
    async fn blob_meta_put(&mut self, b: &BlobInfo, change: &ChangeDraft) -> Result<Revision> {
        let rev = self.append(change)?;
        gc::blob_meta_put(self.conn, b, rev)?;
        Ok(rev)
    }
    async fn blob_meta_remove(&mut self, digest: &str, change: &ChangeDraft) -> Result<Revision> {
        let rev = self.append(change)?;
        gc::blob_meta_remove(self.conn, digest)?;
        Ok(rev)
    }
    async fn gc_objects_remove(
        &mut self,
        keys: &[ObjectKey],
        mark: Revision,
    ) -> Result<Option<GcRemoved<RemovedObject>>> {
        gc::objects_remove(self.conn, keys, mark).map(Some)
    }

    async fn gc_blobs_remove(
        &mut self,
        digests: &[String],
        mark: Revision,
    ) -> Result<Option<GcRemoved<BlobInfo>>> {
        gc::blobs_remove(self.conn, digests, mark).map(Some)
    }

    async fn changes_append_many(&mut self, changes: &[ChangeDraft]) -> Result<()> {
        for c in changes {
            self.append(c)?;
        }
        Ok(())
    }

    async fn changes_after(
        &mut self,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<(Revision, String, String, String)>> {
        gc::changes_after(self.conn, after, limit)
    }
}
