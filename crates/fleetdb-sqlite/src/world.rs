//! World records (see `fleetdb_core::world`): row mapping and queries.

use fleetdb_core::selector::Dialect;
use fleetdb_core::world::{Space, WorldQuery, WorldRecord};
use fleetdb_core::{Result, Revision, Timestamp};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::map_err;
use crate::work::to_value;

pub(crate) const WORLD_COLS: &str = "space, key, scope, owner, kind, name, target, data, meta, \
     session_id, expires_at, create_revision, revision, created_at, updated_at";

type WorldRaw = (String, WorldRecord);

fn world_row(r: &Row<'_>) -> rusqlite::Result<WorldRaw> {
    let space: String = r.get(0)?;
    Ok((
        space,
        WorldRecord {
            space: Space::Kv, // replaced by the parsed space
            key: r.get(1)?,
            scope: r.get(2)?,
            owner: r.get(3)?,
            kind: r.get(4)?,
            name: r.get(5)?,
            target: r.get(6)?,
            data: r.get(7)?,
            meta: r.get(8)?,
            session_id: r.get(9)?,
            expires_at: r.get::<_, Option<i64>>(10)?.map(Timestamp),
            create_revision: Revision(r.get(11)?),
            revision: Revision(r.get(12)?),
            created_at: Timestamp(r.get(13)?),
            updated_at: Timestamp(r.get(14)?),
        },
    ))
}

fn world_from(raw: WorldRaw) -> Result<WorldRecord> {
    let (space, mut rec) = raw;
    rec.space = Space::parse(&space)?;
    Ok(rec)
}

pub(crate) fn world_read(c: &Connection, space: Space, key: &str) -> Result<Option<WorldRecord>> {
    let raw = c
        .prepare_cached(&format!(
            "SELECT {WORLD_COLS} FROM world WHERE space = ?1 AND key = ?2"
        ))
        .and_then(|mut s| {
            s.query_row(params![space.as_str(), key], world_row)
                .optional()
        })
        .map_err(map_err)?;
    raw.map(world_from).transpose()
}

pub(crate) fn world_scan(c: &Connection, q: &WorldQuery) -> Result<Vec<WorldRecord>> {
    let (sql, params) = q.to_sql(Dialect::Sqlite, WORLD_COLS);
    let mut stmt = c.prepare_cached(&sql).map_err(map_err)?;
    let raws = stmt
        .query_map(
            rusqlite::params_from_iter(params.into_iter().map(to_value)),
            world_row,
        )
        .map_err(map_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(map_err)?;
    raws.into_iter().map(world_from).collect()
}

/// Every record of each query, page by page, in ONE read transaction (one snapshot: in WAL
/// mode a read transaction sees the database as of its first read until it ends).
pub(crate) fn world_scan_all(
    c: &Connection,
    queries: &[WorldQuery],
) -> Result<Vec<Vec<WorldRecord>>> {
    let tx = c.unchecked_transaction().map_err(map_err)?;
    let mut out = Vec::with_capacity(queries.len());
    for q in queries {
        let mut q = q.clone();
        // A page of none would never end.
        q.limit = q.limit.max(1);
        let mut records = Vec::new();
        loop {
            if q.take_page(world_scan(&tx, &q)?, &mut records) {
                break;
            }
        }
        out.push(records);
    }
    tx.commit().map_err(map_err)?;
    Ok(out)
}

/// Insert or update a record. scope, owner, kind, name and target are functions of the key (see
/// `Space`), so an update leaves them, and the indexes on them, untouched.
pub(crate) fn world_write(c: &Connection, r: &WorldRecord, revision: Revision) -> Result<()> {
    let create = if r.create_revision == Revision(0) {
        revision
    } else {
        r.create_revision
    };
    c.prepare_cached(&format!(
        "INSERT INTO world ({WORLD_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
         ON CONFLICT (space, key) DO UPDATE SET data = excluded.data,
           meta = excluded.meta, session_id = excluded.session_id, expires_at = excluded.expires_at,
           create_revision = excluded.create_revision, revision = excluded.revision,
           created_at = excluded.created_at, updated_at = excluded.updated_at"
    ))
    .and_then(|mut s| {
        s.execute(params![
            r.space.as_str(),
            r.key,
            r.scope,
            r.owner,
            r.kind,
            r.name,
            r.target,
            r.data,
            r.meta,
            r.session_id,
            r.expires_at.map(|t| t.0),
            create.0,
            revision.0,
            r.created_at.0,
            r.updated_at.0
        ])
    })
    .map_err(map_err)?;
    Ok(())
}

pub(crate) fn world_delete(c: &Connection, space: Space, key: &str) -> Result<()> {
    c.prepare_cached("DELETE FROM world WHERE space = ?1 AND key = ?2")
        .and_then(|mut s| s.execute(params![space.as_str(), key]))
        .map_err(map_err)?;
    Ok(())
}
