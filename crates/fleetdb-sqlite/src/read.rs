//! Listings and the change log.

use fleetdb_core::apply::parse_stored_json;
use fleetdb_core::{
    Change, ChangeFilter, ChangeOp, Entity, Error, LabelRequirement, Namespace, Object,
    ObjectQuery, Result, Revision, Timestamp,
};
use rusqlite::types::Value;
use rusqlite::{params, Connection};

use crate::rows::{
    namespace_from, namespace_row, object_from, object_row, NAMESPACE_COLS, OBJECT_COLS,
};
use crate::{current_revision, map_err};

pub(crate) fn namespace_list(
    c: &Connection,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Namespace>> {
    let mut stmt = c
        .prepare_cached(&format!(
            "SELECT {NAMESPACE_COLS} FROM namespaces WHERE name > ?1 ORDER BY name LIMIT +?2"
        ))
        .map_err(map_err)?;
    let raws = stmt
        .query_map(params![after.unwrap_or(""), limit as i64], namespace_row)
        .map_err(map_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(map_err)?;
    raws.into_iter().map(namespace_from).collect()
}

/// JSON path of a label key. Keys are validated to `[A-Za-z0-9._/-]`, so quoting is safe.
fn label_path(key: &str) -> String {
    format!("$.\"{key}\"")
}

pub(crate) fn object_list(c: &Connection, q: &ObjectQuery) -> Result<Vec<Object>> {
    let mut sql = format!("SELECT {OBJECT_COLS} FROM objects WHERE namespace = ?");
    let mut args: Vec<Value> = vec![Value::Text(q.namespace.clone())];
    if let Some(kind) = &q.kind {
        sql.push_str(" AND kind = ?");
        args.push(Value::Text(kind.clone()));
    }
    if let Some(after) = &q.after {
        sql.push_str(" AND (kind, id) > (?, ?)");
        args.push(Value::Text(after.kind.clone()));
        args.push(Value::Text(after.id.clone()));
    }
    for req in &q.labels {
        match req {
            LabelRequirement::Eq { key, value } => {
                sql.push_str(" AND json_extract(labels, ?) = ?");
                args.push(Value::Text(label_path(key)));
                args.push(Value::Text(value.clone()));
            }
            LabelRequirement::NotEq { key, value } => {
                sql.push_str(" AND json_extract(labels, ?) IS NOT ?");
                args.push(Value::Text(label_path(key)));
                args.push(Value::Text(value.clone()));
            }
            LabelRequirement::Exists { key } => {
                sql.push_str(" AND json_type(labels, ?) IS NOT NULL");
                args.push(Value::Text(label_path(key)));
            }
            LabelRequirement::NotExists { key } => {
                sql.push_str(" AND json_type(labels, ?) IS NULL");
                args.push(Value::Text(label_path(key)));
            }
        }
    }
    sql.push_str(" ORDER BY kind, id LIMIT +?");
    args.push(Value::Integer(q.limit as i64));
    let mut stmt = c.prepare_cached(&sql).map_err(map_err)?;
    let raws = stmt
        .query_map(rusqlite::params_from_iter(args), object_row)
        .map_err(map_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(map_err)?;
    raws.into_iter().map(object_from).collect()
}

/// The exclusive upper bound of ids starting with `prefix` (ids are ASCII below 0x7f).
pub(crate) fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{7f}")
}

type ChangeRaw = (
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
);

pub(crate) fn changes(
    c: &Connection,
    after: Revision,
    f: &ChangeFilter,
    limit: usize,
) -> Result<Vec<Change>> {
    // One read transaction for the compaction check and the rows: as two statements in
    // autocommit, a compaction committing between them made the rows skip revisions with no
    // `Compacted` error (a watch's silent gap).
    let tx = c.unchecked_transaction().map_err(map_err)?;
    let c = &*tx;
    let info = current_revision(c)?;
    if after < info.compacted {
        return Err(Error::Compacted {
            requested: after,
            compacted_revision: info.compacted,
        });
    }
    let mut sql = String::from(
        "SELECT revision, namespace, kind, id, entity, name, op, old_value, new_value, at FROM changes WHERE revision > ?",
    );
    let mut args: Vec<Value> = vec![Value::Integer(after.0)];
    if let Some(ns) = &f.namespace {
        sql.push_str(" AND namespace = ?");
        args.push(Value::Text(ns.clone()));
        if let Some(kind) = &f.kind {
            sql.push_str(" AND kind = ?");
            args.push(Value::Text(kind.clone()));
            if let Some(p) = &f.id_prefix {
                sql.push_str(" AND id >= ? AND id < ?");
                args.push(Value::Text(p.clone()));
                args.push(Value::Text(prefix_end(p)));
            }
        }
    }
    sql.push_str(" ORDER BY revision LIMIT +?");
    args.push(Value::Integer(limit as i64));
    let mut stmt = c.prepare_cached(&sql).map_err(map_err)?;
    let raws: Vec<ChangeRaw> = stmt
        .query_map(rusqlite::params_from_iter(args), |r| {
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
            ))
        })
        .map_err(map_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(map_err)?;
    raws.into_iter()
        .map(|r| {
            Ok(Change {
                revision: Revision(r.0),
                namespace: r.1,
                kind: r.2,
                id: r.3,
                entity: Entity::parse(&r.4)?,
                name: r.5,
                op: ChangeOp::parse(&r.6)?,
                old_value: parse_stored_json(r.7)?,
                new_value: parse_stored_json(r.8)?,
                at: Timestamp(r.9),
            })
        })
        .collect()
}

/// Change-log rows [`compact_rows`] deletes per transaction: the database's one write lock is
/// held for one such batch at a time, so other writers (every process's renewals and finishes)
/// wait for a batch, not for the whole log.
pub(crate) const COMPACT_BATCH: i64 = 10_000;

/// The revision and time of at most `limit` change-log entries after `after`, in revision order
/// (`Backend::change_times`: the primary key, no values read).
pub(crate) fn change_times(
    c: &Connection,
    after: Revision,
    limit: usize,
) -> Result<Vec<(Revision, Timestamp)>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = c
        .prepare_cached(
            "SELECT revision, at FROM changes WHERE revision > ?1 ORDER BY revision LIMIT ?2",
        )
        .map_err(map_err)?;
    let rows = stmt
        .query_map([after.0, limit], |r| {
            Ok((Revision(r.get(0)?), Timestamp(r.get(1)?)))
        })
        .map_err(map_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(map_err)?;
    Ok(rows)
}

/// Move the compaction point to just before `before` (never back, never past the current
/// revision), in one short transaction: from then on reads before it fail `Compacted`, whether
/// or not the rows are gone yet. Returns the new compaction point; [`compact_rows`] deletes.
pub(crate) fn compact_mark(c: &mut Connection, before: Revision) -> Result<i64> {
    let tx = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(map_err)?;
    let info = current_revision(&tx)?;
    let new_compacted = before
        .0
        .saturating_sub(1)
        .min(info.current.0)
        .max(info.compacted.0);
    tx.execute(
        "UPDATE fleetdb_meta SET value = ?1 WHERE key = 'compacted_revision'",
        [new_compacted],
    )
    .map_err(map_err)?;
    tx.commit().map_err(map_err)?;
    Ok(new_compacted)
}

/// Delete at most [`COMPACT_BATCH`] change-log rows at or before `upto` (the compaction point),
/// oldest first, in one transaction. Rows a crash left behind go with the next compaction.
pub(crate) fn compact_rows(c: &mut Connection, upto: i64) -> Result<u64> {
    let tx = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(map_err)?;
    let dropped = tx
        .execute(
            "DELETE FROM changes WHERE revision IN \
               (SELECT revision FROM changes WHERE revision <= ?1 ORDER BY revision LIMIT ?2)",
            [upto, COMPACT_BATCH],
        )
        .map_err(map_err)?;
    tx.commit().map_err(map_err)?;
    Ok(dropped as u64)
}
