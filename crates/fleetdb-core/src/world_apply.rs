//! What World operations do, decided once for every backend (the World half of
//! [`crate::apply`]). Every record change goes through [`put`] or [`remove`], which write the
//! change-log row that watches read.

use std::collections::{BTreeSet, HashMap};

use crate::apply::{draft, live_session};
use crate::backend::{ChangeDraft, TxRows};
use crate::batch::{Applied, Op, OpResult};
use crate::error::{Error, Result};
use crate::gc::Resource;
use crate::model::{ChangeOp, Entity, Revision};
use crate::time::Timestamp;
use crate::work::SessionInfo;
use crate::world::{
    self, compute_schedule, deploy_key, map_key, parse_deploy_key, sha256_digest, DeployFile,
    DeployMeta, ExportOutcome, Lifetime, Registration, Schedule, Space, WorldQuery, WorldRecord,
    MEMBER_CHANGE_NAMESPACE,
};

/// Records read per page when a write walks many records (sync, prune, session end).
const PAGE: usize = 1000;

fn change_kind(r: &WorldRecord) -> &str {
    match r.space {
        Space::Export => &r.kind,
        Space::Map | Space::Registration | Space::Schedule => &r.scope,
        Space::Kv | Space::Deploy | Space::Blob => "",
    }
}

fn world_draft(
    r: &WorldRecord,
    op: ChangeOp,
    old: Option<&WorldRecord>,
    now: Timestamp,
) -> ChangeDraft {
    let new_value = (op == ChangeOp::Put).then(|| r.change_json());
    draft(
        r.space.change_namespace(),
        change_kind(r),
        &r.key,
        Entity::from(r.space),
        "",
        op,
        old.map(WorldRecord::change_json),
        new_value,
        now,
    )
}

/// Write `rec` (replacing `old`, which the caller read and judged live or not).
async fn put<T: TxRows + ?Sized>(
    rows: &mut T,
    mut rec: WorldRecord,
    old: Option<&WorldRecord>,
    now: Timestamp,
) -> Result<WorldRecord> {
    match old {
        Some(o) => {
            rec.create_revision = o.create_revision;
            rec.created_at = o.created_at;
        }
        None => {
            rec.create_revision = Revision(0);
            rec.created_at = now;
        }
    }
    rec.updated_at = now;
    let change = world_draft(&rec, ChangeOp::Put, old, now);
    let revision = rows.world_put(&rec, &change).await?;
    rec.revision = revision;
    if rec.create_revision == Revision(0) {
        rec.create_revision = revision;
    }
    Ok(rec)
}

async fn remove<T: TxRows + ?Sized>(
    rows: &mut T,
    rec: &WorldRecord,
    now: Timestamp,
) -> Result<Revision> {
    let change = world_draft(rec, ChangeOp::Delete, Some(rec), now);
    rows.world_remove(rec.space, &rec.key, &change).await
}

/// Whether a stored record is in force: unexpired, and its session (if bound) alive.
async fn is_live<T: TxRows + ?Sized>(
    rows: &mut T,
    rec: &WorldRecord,
    now: Timestamp,
) -> Result<bool> {
    if !rec.unexpired_at(now) {
        return Ok(false);
    }
    match &rec.session_id {
        None => Ok(true),
        Some(id) => Ok(rows
            .session_read(id)
            .await?
            .is_some_and(|s| s.alive_at(now))),
    }
}

/// The stored record at (space, key) if it is in force.
async fn read_live<T: TxRows + ?Sized>(
    rows: &mut T,
    space: Space,
    key: &str,
    now: Timestamp,
) -> Result<(Option<WorldRecord>, Option<WorldRecord>)> {
    let stored = rows.world_read(space, key).await?;
    let live = match &stored {
        Some(r) if is_live(rows, r, now).await? => Some(r.clone()),
        _ => None,
    };
    Ok((stored, live))
}

/// Session and expiry of a write by `host` with `lifetime`: the session must be alive and
/// belong to `host`.
async fn bind<T: TxRows + ?Sized>(
    rows: &mut T,
    host: Option<&str>,
    lifetime: &Lifetime,
    now: Timestamp,
) -> Result<(Option<String>, Option<Timestamp>)> {
    if let Some(id) = &lifetime.session_id {
        let s = live_session(rows, id, now).await?;
        if let Some(h) = host {
            if s.host != h {
                return Err(Error::invalid(
                    "session id",
                    id,
                    format!("belongs to host {:?}, not {h:?}", s.host),
                ));
            }
        }
    }
    Ok((lifetime.session_id.clone(), lifetime.expires_at(now)))
}

fn world_result(changed: bool, rec: WorldRecord) -> OpResult {
    OpResult {
        changed,
        applied: Applied::World(Box::new(rec)),
    }
}

/// Every record matching `q`, page by page.
async fn scan_all<T: TxRows + ?Sized>(rows: &mut T, mut q: WorldQuery) -> Result<Vec<WorldRecord>> {
    q.limit = PAGE;
    let mut out = Vec::new();
    loop {
        let page = rows.world_scan(&q).await?;
        if q.take_page(page, &mut out) {
            return Ok(out);
        }
    }
}

/// Every resource `r` holds exists (read in the writing transaction: an export cannot come to
/// hold what a concurrent collection is removing, see `docs/design.md` §12).
async fn check_holds<T: TxRows + ?Sized>(rows: &mut T, r: &world::ExportRecord) -> Result<()> {
    for h in &r.holds {
        let exists = match h {
            Resource::Object { key } => rows.object_read(key).await?.is_some(),
            Resource::Blob { digest } => rows.blob_meta_read(digest).await?.is_some(),
        };
        if !exists {
            return Err(Error::not_found(format!("{h}, held by export {}", r.id)));
        }
    }
    Ok(())
}

pub(crate) async fn apply_world_op<T: TxRows + ?Sized>(
    rows: &mut T,
    op: &Op,
    now: Timestamp,
) -> Result<OpResult> {
    match op {
        Op::Export {
            host,
            records,
            sync,
        } => {
            let mut outcome = ExportOutcome::default();
            let mut keep = BTreeSet::new();
            for r in records {
                let key = r.id.key(host);
                keep.insert(key.clone());
                let (stored, live) = read_live(rows, Space::Export, &key, now).await?;
                let (session_id, expires_at) = bind(rows, Some(host), &r.lifetime, now).await?;
                check_holds(rows, r).await?;
                let meta = r.meta();
                if let Some(cur) = &live {
                    // A TTL export is refreshed by every export; otherwise identical is a no-op.
                    if cur.data == r.data
                        && cur.meta == meta
                        && cur.session_id == session_id
                        && expires_at.is_none()
                        && cur.expires_at.is_none()
                    {
                        outcome.unchanged.push(r.id.clone());
                        continue;
                    }
                }
                let mut rec = WorldRecord::new(Space::Export, key, now);
                rec.owner = host.clone();
                rec.kind = r.id.kind.clone();
                rec.name = r.id.name.clone();
                rec.target = r.id.to.clone();
                rec.data = r.data.clone();
                rec.meta = meta;
                rec.session_id = session_id;
                rec.expires_at = expires_at;
                let old = if live.is_some() {
                    stored.as_ref()
                } else {
                    None
                };
                if live.is_none() {
                    if let Some(dead) = &stored {
                        remove(rows, dead, now).await?;
                    }
                }
                put(rows, rec, old, now).await?;
                outcome.changed.push(r.id.clone());
            }
            // Rows removed, live or not: an expired (or dead session's) export the sweeper has
            // not reached yet goes too, but only a live one is reported `removed` — the caller
            // removed nothing that every read had not hidden already (invariant 23).
            let mut dropped = false;
            if *sync {
                let mut q = WorldQuery::new(Space::Export);
                q.owner = Some(host.clone());
                for rec in scan_all(rows, q).await? {
                    if !keep.contains(&rec.key) {
                        let live = is_live(rows, &rec, now).await?;
                        remove(rows, &rec, now).await?;
                        dropped = true;
                        if live {
                            outcome
                                .removed
                                .push(world::ExportId::new(rec.kind, rec.name, rec.target));
                        }
                    }
                }
            }
            Ok(OpResult {
                changed: !outcome.changed.is_empty() || dropped,
                applied: Applied::Exports(outcome),
            })
        }
        Op::Unexport { host, ids } => {
            let mut outcome = ExportOutcome::default();
            let mut dropped = false;
            for id in ids {
                // As for `sync` above: a dead row goes, unreported.
                let (stored, live) = read_live(rows, Space::Export, &id.key(host), now).await?;
                if let Some(rec) = stored {
                    remove(rows, &rec, now).await?;
                    dropped = true;
                    if live.is_some() {
                        outcome.removed.push(id.clone());
                    }
                }
            }
            Ok(OpResult {
                changed: dropped,
                applied: Applied::Exports(outcome),
            })
        }
        Op::KvSet {
            key,
            value,
            expect,
            lifetime,
        } => {
            let (stored, live) = read_live(rows, Space::Kv, key, now).await?;
            check_expect(key, live.as_ref(), *expect)?;
            let (session_id, expires_at) = bind(rows, None, lifetime, now).await?;
            if let Some(cur) = &live {
                if cur.data == value.as_bytes()
                    && cur.session_id == session_id
                    && expires_at.is_none()
                    && cur.expires_at.is_none()
                {
                    return Ok(world_result(false, cur.clone()));
                }
            }
            let mut rec = WorldRecord::new(Space::Kv, key.clone(), now);
            rec.data = value.as_bytes().to_vec();
            rec.session_id = session_id;
            rec.expires_at = expires_at;
            if live.is_none() {
                if let Some(dead) = &stored {
                    remove(rows, dead, now).await?;
                }
            }
            let rec = put(rows, rec, live.as_ref(), now).await?;
            Ok(world_result(true, rec))
        }
        Op::KvDelete { key, expect } => {
            let (_, live) = read_live(rows, Space::Kv, key, now).await?;
            let Some(cur) = live else {
                return Err(Error::not_found(format!("key {key:?}")));
            };
            check_expect(key, Some(&cur), *expect)?;
            let revision = remove(rows, &cur, now).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            })
        }
        Op::MapSet {
            namespace,
            host,
            value,
        } => {
            let key = map_key(namespace, host);
            let cur = rows.world_read(Space::Map, &key).await?;
            if let Some(c) = &cur {
                if c.data == value.as_bytes() {
                    return Ok(world_result(false, c.clone()));
                }
            }
            let mut rec = WorldRecord::new(Space::Map, key, now);
            rec.scope = namespace.clone();
            rec.owner = host.clone();
            rec.data = value.as_bytes().to_vec();
            let rec = put(rows, rec, cur.as_ref(), now).await?;
            Ok(world_result(true, rec))
        }
        Op::MapDelete { namespace, host } => {
            let key = map_key(namespace, host);
            let Some(cur) = rows.world_read(Space::Map, &key).await? else {
                return Err(Error::not_found(format!(
                    "value of host {host:?} in map {namespace:?}"
                )));
            };
            let revision = remove(rows, &cur, now).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            })
        }
        Op::DeployAdd { deploy, stored } => add_deploy(rows, deploy, stored, now).await,
        Op::DeployPrune { before } => {
            let Some(max) = newest_deploy(rows).await? else {
                return Ok(OpResult {
                    changed: false,
                    applied: Applied::Done { count: 0 },
                });
            };
            let bound = (*before).min(max);
            let mut q = WorldQuery::new(Space::Deploy);
            q.before_key = Some(deploy_key(bound));
            let old = scan_all(rows, q).await?;
            for rec in &old {
                remove(rows, rec, now).await?;
            }
            prune_legacy_blobs(rows, &old, bound, now).await?;
            Ok(OpResult {
                changed: !old.is_empty(),
                applied: Applied::Done {
                    count: old.len() as u64,
                },
            })
        }
        Op::ScheduleRegister {
            namespace,
            host,
            session_id,
            options,
        } => {
            let lifetime = Lifetime::session(session_id.clone());
            bind(rows, Some(host), &lifetime, now).await?;
            let key = map_key(namespace, host);
            let (stored, live) = read_live(rows, Space::Registration, &key, now).await?;
            let meta = serde_json::to_string(options)
                .map_err(|e| Error::Backend(format!("encoding schedule options: {e}")))?;
            if let Some(cur) = &live {
                if cur.session_id.as_deref() == Some(session_id.as_str())
                    && cur.meta.as_deref() == Some(meta.as_str())
                {
                    return Ok(world_result(false, cur.clone()));
                }
            }
            let mut rec = WorldRecord::new(Space::Registration, key, now);
            rec.scope = namespace.clone();
            rec.owner = host.clone();
            rec.session_id = Some(session_id.clone());
            rec.meta = Some(meta);
            if live.is_none() {
                if let Some(dead) = &stored {
                    remove(rows, dead, now).await?;
                }
                let mut q = WorldQuery::new(Space::Registration);
                q.scope = Some(namespace.clone());
                q.live_at = Some(now);
                let registered = scan_all(rows, q).await?.len();
                if registered >= world::SCHEDULE_HOSTS_MAX {
                    return Err(Error::Refused {
                        what: format!("registration of host {host:?} in {namespace:?}"),
                        reason: format!(
                            "{registered} hosts are registered there, the most one scheduler \
                             namespace takes ({})",
                            world::SCHEDULE_HOSTS_MAX
                        ),
                    });
                }
            }
            let rec = put(rows, rec, live.as_ref(), now).await?;
            reschedule(rows, namespace, now).await?;
            Ok(world_result(true, rec))
        }
        Op::ScheduleUnregister { namespace, host } => {
            let key = map_key(namespace, host);
            // A lapsed registration (its session past its deadline) is not found, as with
            // `KvDelete`: no read shows it, and the sweep removes it.
            let (_, live) = read_live(rows, Space::Registration, &key, now).await?;
            let Some(cur) = live else {
                return Err(Error::not_found(format!(
                    "registration of host {host:?} in scheduler namespace {namespace:?}"
                )));
            };
            let revision = remove(rows, &cur, now).await?;
            reschedule(rows, namespace, now).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            })
        }
        other => Err(Error::Backend(format!("not a World operation: {other:?}"))),
    }
}

fn check_expect(key: &str, live: Option<&WorldRecord>, expect: Option<Revision>) -> Result<()> {
    let Some(expected) = expect else {
        return Ok(());
    };
    let current = live.map_or(Revision(0), |r| r.revision);
    if current == expected {
        return Ok(());
    }
    Err(Error::Conflict {
        what: match live {
            Some(_) => format!("key {key:?} (expected at revision {expected}, now at {current})"),
            None => format!("key {key:?} (expected at revision {expected}, now absent)"),
        },
    })
}

/// The id of the newest deploy, if any.
/// Remove the World blob records (`Space::Blob`: deploy trees stored before they moved to the
/// content store) that the `pruned` deploys held and no deploy from `kept_from` on holds. Only
/// a prune can free them (the collector works on the content store), so it does: otherwise they
/// stayed for ever (mgmt's "blobs are never deleted"). Costs one key read when there are none.
async fn prune_legacy_blobs<T: TxRows + ?Sized>(
    rows: &mut T,
    pruned: &[WorldRecord],
    kept_from: u64,
    now: Timestamp,
) -> Result<()> {
    let mut any = WorldQuery::new(Space::Blob);
    any.limit = 1;
    if pruned.is_empty() || rows.world_scan(&any).await?.is_empty() {
        return Ok(());
    }
    let digests = |recs: &[WorldRecord]| -> Result<std::collections::BTreeSet<String>> {
        let mut out = std::collections::BTreeSet::new();
        for r in recs {
            let meta: DeployMeta = world::parse_meta(r)?;
            out.extend(meta.files.into_iter().map(|f| f.digest));
        }
        Ok(out)
    };
    let mut freed = digests(pruned)?;
    let mut q = WorldQuery::new(Space::Deploy);
    q.after_key = Some(deploy_key(kept_from.saturating_sub(1)));
    for held in digests(&scan_all(rows, q).await?)? {
        freed.remove(&held);
    }
    for digest in freed {
        if let Some(blob) = rows.world_read(Space::Blob, &digest).await? {
            remove(rows, &blob, now).await?;
        }
    }
    Ok(())
}

async fn newest_deploy<T: TxRows + ?Sized>(rows: &mut T) -> Result<Option<u64>> {
    let mut newest = WorldQuery::new(Space::Deploy);
    newest.descending = true;
    newest.limit = 1;
    rows.world_scan(&newest)
        .await?
        .pop()
        .map(|max| parse_deploy_key(&max.key))
        .transpose()
}

async fn add_deploy<T: TxRows + ?Sized>(
    rows: &mut T,
    d: &world::DeployDraft,
    stored: &[DeployFile],
    now: Timestamp,
) -> Result<OpResult> {
    let key = deploy_key(d.id);
    let exists = rows.world_read(Space::Deploy, &key).await?.is_some();
    let newest = newest_deploy(rows).await?;
    let previous = if d.id > 1 && !exists {
        rows.world_read(Space::Deploy, &deploy_key(d.id - 1))
            .await?
            .map(world::Deploy::try_from)
            .transpose()?
    } else {
        None
    };
    world::check_deploy_chain(d, exists, newest, previous.as_ref())?;
    let mut files = Vec::with_capacity(d.files.len());
    for f in &d.files {
        let digest = sha256_digest(&f.content);
        if rows.world_read(Space::Blob, &digest).await?.is_none() {
            let mut blob = WorldRecord::new(Space::Blob, digest.clone(), now);
            blob.data = f.content.clone();
            put(rows, blob, None, now).await?;
        }
        files.push(DeployFile {
            path: f.path.clone(),
            mode: f.mode,
            digest,
            size: f.content.len() as u64,
        });
    }
    for f in stored {
        // Written to the content store before this transaction (under a lease that keeps it
        // until the deploy holds it): it must be there, with this size.
        match rows.blob_meta_read(&f.digest).await? {
            Some(b) if b.size == f.size => files.push(f.clone()),
            Some(b) => {
                return Err(Error::Backend(format!(
                    "blob {} of deploy file {:?} has {} bytes in the content store, not {}",
                    f.digest, f.path, b.size, f.size
                )))
            }
            None => {
                return Err(Error::not_found(format!(
                    "blob {} of deploy file {:?} in the content store",
                    f.digest, f.path
                )))
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(w) = files.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(Error::invalid(
            "deploy file path",
            &w[0].path,
            "appears twice in the tree",
        ));
    }
    let meta = DeployMeta {
        hash: d.hash.clone(),
        parent_hash: d.parent_hash.clone(),
        files,
    };
    let mut rec = WorldRecord::new(Space::Deploy, key, now);
    rec.data = d.payload.clone();
    rec.meta = Some(
        serde_json::to_string(&meta)
            .map_err(|e| Error::Backend(format!("encoding deploy metadata: {e}")))?,
    );
    let rec = put(rows, rec, None, now).await?;
    Ok(world_result(true, rec))
}

/// Recompute the schedule of `namespace` from its live registrations; writes only if it changed.
pub(crate) async fn reschedule<T: TxRows + ?Sized>(
    rows: &mut T,
    namespace: &str,
    now: Timestamp,
) -> Result<()> {
    let mut q = WorldQuery::new(Space::Registration);
    q.scope = Some(namespace.to_string());
    let mut alive: HashMap<String, bool> = HashMap::new();
    let mut regs = Vec::new();
    for rec in scan_all(rows, q).await? {
        let sid = rec.session_id.clone().unwrap_or_default();
        let live = match alive.get(&sid) {
            Some(l) => *l,
            None => {
                let l = rows
                    .session_read(&sid)
                    .await?
                    .is_some_and(|s| s.alive_at(now));
                alive.insert(sid, l);
                l
            }
        };
        if live {
            regs.push(Registration::try_from(rec)?);
        }
    }
    let stored = rows.world_read(Space::Schedule, namespace).await?;
    let previous = match &stored {
        Some(r) => Some(Schedule::try_from(r.clone())?),
        None => None,
    };
    let prev_hosts = previous
        .as_ref()
        .map(|s| s.hosts.clone())
        .unwrap_or_default();
    let (hosts, options) = compute_schedule(&regs, &prev_hosts);
    if let Some(p) = &previous {
        if p.hosts == hosts && p.options == options {
            return Ok(());
        }
    } else if hosts.is_empty() {
        return Ok(());
    }
    let schedule = Schedule {
        namespace: namespace.to_string(),
        hosts,
        options,
        revision: Revision(0),
        updated_at: now,
    };
    let mut rec = WorldRecord::new(Space::Schedule, namespace, now);
    rec.scope = namespace.to_string();
    rec.meta = Some(world::schedule_meta(
        &schedule.namespace,
        &schedule.hosts,
        &schedule.options,
    ));
    put(rows, rec, stored.as_ref(), now).await?;
    Ok(())
}

fn member_draft(s: &SessionInfo, op: ChangeOp, now: Timestamp) -> ChangeDraft {
    let json = serde_json::to_string(s).ok();
    let (old, new) = match op {
        ChangeOp::Put => (None, json),
        ChangeOp::Delete => (json, None),
    };
    draft(
        MEMBER_CHANGE_NAMESPACE,
        &s.component,
        &s.id,
        Entity::Member,
        "",
        op,
        old,
        new,
        now,
    )
}

/// A session started: membership changed.
pub(crate) async fn session_started<T: TxRows + ?Sized>(
    rows: &mut T,
    s: &SessionInfo,
    now: Timestamp,
) -> Result<()> {
    rows.change_append(&member_draft(s, ChangeOp::Put, now))
        .await?;
    Ok(())
}

/// A session ended (closed or expired): remove what was bound to it, reschedule the namespaces
/// it was registered in, record the membership change. Returns how many records went.
pub(crate) async fn session_ended<T: TxRows + ?Sized>(
    rows: &mut T,
    s: &SessionInfo,
    now: Timestamp,
) -> Result<u64> {
    let mut removed = 0;
    let mut namespaces = BTreeSet::new();
    for space in [Space::Export, Space::Kv, Space::Registration] {
        let mut q = WorldQuery::new(space);
        q.session_id = Some(s.id.clone());
        for rec in scan_all(rows, q).await? {
            remove(rows, &rec, now).await?;
            removed += 1;
            if space == Space::Registration {
                namespaces.insert(rec.scope.clone());
            }
        }
    }
    rows.change_append(&member_draft(s, ChangeOp::Delete, now))
        .await?;
    for ns in namespaces {
        reschedule(rows, &ns, now).await?;
    }
    Ok(removed)
}

/// Remove up to `limit` records of each space whose TTL has passed. Returns how many, and
/// whether a space had `limit` of them (more may be due).
pub(crate) async fn sweep_expired<T: TxRows + ?Sized>(
    rows: &mut T,
    now: Timestamp,
    limit: usize,
) -> Result<(u64, bool)> {
    let mut removed = 0u64;
    let mut full = false;
    for space in [Space::Export, Space::Kv] {
        let mut q = WorldQuery::new(space);
        q.expired_at = Some(now);
        q.limit = limit;
        let expired = rows.world_scan(&q).await?;
        full |= expired.len() >= limit;
        for rec in expired {
            remove(rows, &rec, now).await?;
            removed += 1;
        }
    }
    Ok((removed, full))
}
