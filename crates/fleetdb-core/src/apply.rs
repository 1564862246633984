//! What a batch does, decided once for every backend. A backend opens a transaction, wraps it in
//! a [`TxRows`] and calls [`apply_batch`]; if anything fails it rolls the whole transaction back.

use crate::backend::{CandidateQuery, ChangeDraft, TxRows};
use crate::batch::{Applied, Batch, Op, OpResult, Precondition, PutMode};
use crate::error::{Error, Result};
use crate::model::{
    ChangeOp, Entity, Labels, Namespace, Object, ObjectKey, Revision, Tag, DEFAULT_NAMESPACE,
};
use crate::time::Timestamp;
use crate::validate;
use crate::work::HistoryEntry;
use crate::work::{
    BackoffInfo, ClaimRequest, ClaimTarget, Outcome, Process, SessionInfo, WorkEvent, WorkInfo,
    PARKED,
};

/// Check every precondition, then apply every op in order. On `Err` the caller must roll back.
pub async fn apply_batch<T: TxRows + ?Sized>(rows: &mut T, batch: &Batch) -> Result<Vec<OpResult>> {
    for p in &batch.preconditions {
        check_precondition(rows, p, batch.now).await?;
    }
    let mut out = Vec::with_capacity(batch.ops.len());
    let mut rest = &batch.ops[..];
    while let Some(op) = rest.first() {
        let run = run_len(rest);
        if run >= 2 {
            out.extend(apply_run(rows, &rest[..run], batch.now).await?);
            rest = &rest[run..];
        } else {
            out.push(apply_op(rows, op, batch.now).await?);
            rest = &rest[1..];
        }
    }
    Ok(out)
}

/// Ops at most in one set-based run.
const RUN_MAX: usize = 1000;

/// How many ops at the start of `ops` can be applied as one run by [`apply_run`]: consecutive tag
/// deletes of distinct tags, or consecutive finishes (or cancels) of distinct claims of one
/// session and process. Within such a run no op reads what another writes, so reading every
/// row first and writing them all after decides exactly what applying them one by one does.
fn run_len(ops: &[Op]) -> usize {
    let mut seen = std::collections::HashSet::new();
    let n = match ops.first() {
        Some(Op::TagDelete { .. }) => ops
            .iter()
            .take_while(|op| match op {
                Op::TagDelete { key, name } => seen.insert((key, name.as_str())),
                _ => false,
            })
            .count(),
        Some(Op::WorkRelease {
            session_id: sid,
            process: p,
            outcome: first @ (Outcome::Finished | Outcome::Canceled),
            ..
        }) => ops
            .iter()
            .take_while(|op| match op {
                Op::WorkRelease {
                    key,
                    process,
                    session_id,
                    outcome,
                    ..
                } => {
                    session_id == sid
                        && process == p
                        && outcome == first
                        && seen.insert((key, process.as_str()))
                }
                _ => false,
            })
            .count(),
        _ => 1,
    };
    n.clamp(1, RUN_MAX)
}

/// Apply a run found by [`run_len`]: one read of every row the run needs, the same decisions
/// (and the same first error) as [`apply_op`] one by one, then the writes as one set.
async fn apply_run<T: TxRows + ?Sized>(
    rows: &mut T,
    ops: &[Op],
    now: Timestamp,
) -> Result<Vec<OpResult>> {
    match ops.first() {
        Some(Op::TagDelete { .. }) => {
            let items: Vec<(ObjectKey, String)> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::TagDelete { key, name } => Some((key.clone(), name.clone())),
                    _ => None,
                })
                .collect();
            let reads = rows.tag_read_many(&items).await?;
            let mut changes = Vec::with_capacity(items.len());
            for ((key, name), read) in items.iter().zip(reads) {
                changes.push(tag_delete_change(key, name, read, now)?);
            }
            let revisions = rows.tag_remove_many(&items, &changes).await?;
            Ok(revisions
                .into_iter()
                .map(|revision| OpResult {
                    changed: true,
                    applied: Applied::Deleted { revision },
                })
                .collect())
        }
        Some(Op::WorkRelease {
            process,
            session_id,
            outcome,
            ..
        }) => {
            let keys: Vec<ObjectKey> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::WorkRelease { key, .. } => Some(key.clone()),
                    _ => None,
                })
                .collect();
            let held: std::collections::HashMap<ObjectKey, WorkInfo> = rows
                .work_read_many(&keys, process)
                .await?
                .into_iter()
                .map(|w| (w.key.clone(), w))
                .collect();
            let session = rows
                .session_read(session_id)
                .await?
                .filter(|s| s.alive_at(now));
            let event = match outcome {
                Outcome::Finished => WorkEvent::Finished,
                _ => WorkEvent::Canceled,
            };
            let mut works = Vec::with_capacity(ops.len());
            let mut entries = Vec::with_capacity(ops.len());
            for op in ops {
                let Op::WorkRelease { key, token, .. } = op else {
                    continue;
                };
                let w = holder(held.get(key), session_id, *token)
                    .map_err(|why| work_lost(process, key, *token, why))?;
                let Some(session) = &session else {
                    return Err(work_lost(process, key, *token, EXPIRED_HOLDER));
                };
                entries.push(history(
                    w,
                    &session.component,
                    &session.host,
                    event,
                    None,
                    now,
                ));
                works.push(w.clone());
            }
            rows.work_release_many(&works, &entries, *outcome == Outcome::Finished)
                .await?;
            Ok(works
                .iter()
                .map(|_| OpResult {
                    changed: true,
                    applied: Applied::Done { count: 1 },
                })
                .collect())
        }
        _ => Err(Error::Backend("apply_run: not a run".to_string())),
    }
}

/// The change-log row of deleting tag `name` of `key`, as read: `NotFound` when the object or
/// the tag is not there.
fn tag_delete_change(
    key: &ObjectKey,
    name: &str,
    read: crate::backend::TagRead,
    now: Timestamp,
) -> Result<ChangeDraft> {
    if !read.object_exists {
        return Err(Error::not_found(format!("object {key}")));
    }
    let Some((_, text)) = read.tag else {
        return Err(Error::not_found(format!("tag {name:?} of object {key}")));
    };
    Ok(draft(
        &key.namespace,
        &key.kind,
        &key.id,
        Entity::Tag,
        name,
        ChangeOp::Delete,
        Some(text),
        None,
        now,
    ))
}

async fn check_precondition<T: TxRows + ?Sized>(
    rows: &mut T,
    p: &Precondition,
    now: Timestamp,
) -> Result<()> {
    let (what, seen, now) = match p {
        Precondition::Namespace { name, revision } => (
            format!("namespace {name:?}"),
            *revision,
            rows.namespace_read(name).await?.map(|n| n.revision),
        ),
        Precondition::Object { key, revision } => (
            format!("object {key}"),
            *revision,
            rows.object_read(key).await?.map(|o| o.revision),
        ),
        Precondition::Tag {
            key,
            name,
            revision,
        } => (
            format!("tag {name:?} of object {key}"),
            *revision,
            rows.tag_read(key, name).await?.tag.map(|(t, _)| t.revision),
        ),
        Precondition::SessionAlive { session_id } => {
            live_session(rows, session_id, now).await?;
            return Ok(());
        }
        Precondition::WorkHeld {
            key,
            process,
            session_id,
            token,
        } => {
            let lost = |why| work_lost(process, key, *token, why);
            let w = rows.work_read_held(key, process).await?;
            holder(w.as_ref(), session_id, *token).map_err(lost)?;
            return match live_session(rows, session_id, now).await {
                Err(Error::SessionExpired { .. }) => Err(lost(EXPIRED_HOLDER)),
                other => other.map(|_| ()),
            };
        }
    };
    if seen != now {
        return Err(Error::Conflict { what });
    }
    Ok(())
}

/// The change-log value of an object: `{"labels": …}`.
pub fn labels_json(labels: &Labels) -> String {
    // A BTreeMap of strings always serializes.
    serde_json::to_string(&serde_json::json!({ "labels": labels })).unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn draft(
    ns: &str,
    kind: &str,
    id: &str,
    entity: Entity,
    name: &str,
    op: ChangeOp,
    old_value: Option<String>,
    new_value: Option<String>,
    at: Timestamp,
) -> ChangeDraft {
    ChangeDraft {
        namespace: ns.to_string(),
        kind: kind.to_string(),
        id: id.to_string(),
        entity,
        name: name.to_string(),
        op,
        old_value,
        new_value,
        at,
    }
}

async fn require_namespace<T: TxRows + ?Sized>(rows: &mut T, name: &str) -> Result<()> {
    match rows.namespace_read(name).await? {
        Some(_) => Ok(()),
        None => Err(Error::not_found(format!("namespace {name:?}"))),
    }
}

/// [`apply_op`] for the other appliers (the sweep deletes objects exactly as `ObjectDelete` does).
pub(crate) async fn apply_op_pub<T: TxRows + ?Sized>(
    rows: &mut T,
    op: &Op,
    now: Timestamp,
) -> Result<OpResult> {
    Box::pin(apply_op(rows, op, now)).await
}

async fn apply_op<T: TxRows + ?Sized>(rows: &mut T, op: &Op, now: Timestamp) -> Result<OpResult> {
    match op {
        Op::NamespaceCreate { name, labels } => {
            if rows.namespace_read(name).await?.is_some() {
                return Err(Error::AlreadyExists {
                    what: format!("namespace {name:?}"),
                });
            }
            let labels = validate::merge_labels(&Labels::new(), labels)?;
            let mut ns = Namespace {
                name: name.clone(),
                labels,
                created_at: now,
                updated_at: now,
                revision: Revision(0),
            };
            let change = draft(
                name,
                "",
                "",
                Entity::Namespace,
                "",
                ChangeOp::Put,
                None,
                Some(labels_json(&ns.labels)),
                now,
            );
            ns.revision = rows.namespace_put(&ns, &change).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Namespace(ns),
            })
        }
        Op::NamespaceLabels { name, labels } => {
            let Some(mut ns) = rows.namespace_read(name).await? else {
                return Err(Error::not_found(format!("namespace {name:?}")));
            };
            let merged = validate::merge_labels(&ns.labels, labels)?;
            if merged == ns.labels {
                return Ok(OpResult {
                    changed: false,
                    applied: Applied::Namespace(ns),
                });
            }
            let old = labels_json(&ns.labels);
            ns.labels = merged;
            ns.updated_at = now;
            let change = draft(
                name,
                "",
                "",
                Entity::Namespace,
                "",
                ChangeOp::Put,
                Some(old),
                Some(labels_json(&ns.labels)),
                now,
            );
            ns.revision = rows.namespace_put(&ns, &change).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Namespace(ns),
            })
        }
        Op::NamespaceDelete { name } => {
            if name == DEFAULT_NAMESPACE {
                return Err(Error::invalid(
                    "namespace",
                    name,
                    "the default namespace always exists and cannot be deleted",
                ));
            }
            let Some(ns) = rows.namespace_read(name).await? else {
                return Err(Error::not_found(format!("namespace {name:?}")));
            };
            let usage = rows.namespace_usage(name).await?;
            if !usage.is_empty() {
                let total: u64 = usage.iter().map(|(_, n)| n).sum();
                let kinds: Vec<String> = usage.iter().map(|(k, n)| format!("{n} {k}")).collect();
                return Err(Error::NamespaceNotEmpty {
                    namespace: name.clone(),
                    remaining: format!("{total} object(s): {}", kinds.join(", ")),
                });
            }
            let change = draft(
                name,
                "",
                "",
                Entity::Namespace,
                "",
                ChangeOp::Delete,
                Some(labels_json(&ns.labels)),
                None,
                now,
            );
            let revision = rows.namespace_remove(name, &change).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            })
        }
        Op::ObjectPut { key, labels, mode } => {
            let current = rows.object_read(key).await?;
            match (&current, mode) {
                (Some(_), PutMode::Create) => {
                    return Err(Error::AlreadyExists {
                        what: format!("object {key}"),
                    })
                }
                (None, PutMode::Update) => return Err(Error::not_found(format!("object {key}"))),
                (None, _) => require_namespace(rows, &key.namespace).await?,
                _ => {}
            }
            match current {
                Some(mut obj) => {
                    let merged = validate::merge_labels(&obj.labels, labels)?;
                    if merged == obj.labels {
                        return Ok(OpResult {
                            changed: false,
                            applied: Applied::Object(obj),
                        });
                    }
                    let old = labels_json(&obj.labels);
                    obj.labels = merged;
                    obj.updated_at = now;
                    let change = draft(
                        &key.namespace,
                        &key.kind,
                        &key.id,
                        Entity::Object,
                        "",
                        ChangeOp::Put,
                        Some(old),
                        Some(labels_json(&obj.labels)),
                        now,
                    );
                    obj.revision = rows.object_put(&obj, &change).await?;
                    Ok(OpResult {
                        changed: true,
                        applied: Applied::Object(obj),
                    })
                }
                None => {
                    let mut obj = Object {
                        key: key.clone(),
                        labels: validate::merge_labels(&Labels::new(), labels)?,
                        created_at: now,
                        updated_at: now,
                        revision: Revision(0),
                    };
                    let change = draft(
                        &key.namespace,
                        &key.kind,
                        &key.id,
                        Entity::Object,
                        "",
                        ChangeOp::Put,
                        None,
                        Some(labels_json(&obj.labels)),
                        now,
                    );
                    obj.revision = rows.object_put(&obj, &change).await?;
                    Ok(OpResult {
                        changed: true,
                        applied: Applied::Object(obj),
                    })
                }
            }
        }
        Op::ObjectDelete { key } => {
            let Some(obj) = rows.object_read(key).await? else {
                return Err(Error::not_found(format!("object {key}")));
            };
            // Tags first, each with its own change, so a tag watcher sees them go.
            for (tag, text) in rows.tag_read_all(key).await? {
                let change = draft(
                    &key.namespace,
                    &key.kind,
                    &key.id,
                    Entity::Tag,
                    &tag.name,
                    ChangeOp::Delete,
                    Some(text),
                    None,
                    now,
                );
                rows.tag_remove(key, &tag.name, &change).await?;
            }
            let change = draft(
                &key.namespace,
                &key.kind,
                &key.id,
                Entity::Object,
                "",
                ChangeOp::Delete,
                Some(labels_json(&obj.labels)),
                None,
                now,
            );
            let revision = rows.object_remove(key, &change).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            })
        }
        Op::TagSet { key, name, value } => {
            let read = rows.tag_read(key, name).await?;
            if !read.object_exists {
                return Err(Error::not_found(format!("object {key}")));
            }
            if let Some((tag, text)) = &read.tag {
                if text == value {
                    return Ok(OpResult {
                        changed: false,
                        applied: Applied::Tag(tag.clone()),
                    });
                }
            }
            let parsed: serde_json::Value = serde_json::from_str(value).map_err(|e| {
                Error::invalid(
                    format!("tag {name:?} value"),
                    value.chars().take(64).collect::<String>(),
                    e.to_string(),
                )
            })?;
            let mut tag = Tag {
                object: key.clone(),
                name: name.clone(),
                value: parsed,
                updated_at: now,
                revision: Revision(0),
            };
            let old = read.tag.map(|(_, text)| text);
            let change = draft(
                &key.namespace,
                &key.kind,
                &key.id,
                Entity::Tag,
                name,
                ChangeOp::Put,
                old,
                Some(value.clone()),
                now,
            );
            tag.revision = rows.tag_put(&tag, value, &change).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Tag(tag),
            })
        }
        Op::TagDelete { key, name } => {
            let read = rows.tag_read(key, name).await?;
            let change = tag_delete_change(key, name, read, now)?;
            let revision = rows.tag_remove(key, name, &change).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            })
        }
        Op::SessionStart { session } => {
            rows.session_insert(session).await?;
            crate::world_apply::session_started(rows, session, now).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Session(session.clone()),
            })
        }
        Op::SessionClose { id } => {
            let Some(session) = rows.session_read(id).await? else {
                return Err(Error::not_found(format!("session {id}")));
            };
            let held = rows.work_of_session(id).await?;
            for w in &held {
                release(
                    rows,
                    w,
                    &session,
                    WorkEvent::Canceled,
                    Some("session closed".into()),
                    now,
                )
                .await?;
            }
            rows.session_remove(id).await?;
            crate::world_apply::session_ended(rows, &session, now).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Released {
                    processes: held.into_iter().map(|w| w.process).collect(),
                },
            })
        }
        Op::ProcessDefine { name, conflicts } => {
            let mut list: Vec<String> = conflicts.iter().filter(|c| *c != name).cloned().collect();
            list.sort();
            list.dedup();
            for c in &list {
                if rows.process_read(c).await?.is_none() {
                    return Err(Error::invalid(
                        "conflicting process",
                        c,
                        "is not declared; declare it first (`fleetdb process define`)",
                    ));
                }
            }
            let old = rows.process_read(name).await?;
            let p = Process {
                name: name.clone(),
                conflicts: list,
                created_at: old.as_ref().map_or(now, |p| p.created_at),
                paused: old.as_ref().is_some_and(|p| p.paused),
                max_active: old.as_ref().and_then(|p| p.max_active),
                max_failures: old.and_then(|p| p.max_failures),
            };
            rows.process_put(&p).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Process(p),
            })
        }
        Op::ProcessPause { name, paused } => {
            process_control(rows, name, |p| {
                std::mem::replace(&mut p.paused, *paused) != *paused
            })
            .await
        }
        Op::ProcessLimit { name, max_active } => {
            process_control(rows, name, |p| {
                std::mem::replace(&mut p.max_active, *max_active) != *max_active
            })
            .await
        }
        Op::ProcessMaxFailures { name, max_failures } => {
            process_control(rows, name, |p| {
                std::mem::replace(&mut p.max_failures, *max_failures) != *max_failures
            })
            .await
        }
        Op::WorkRelease {
            key,
            process,
            session_id,
            token,
            outcome,
        } => {
            let lost = |why| work_lost(process, key, *token, why);
            let w = rows.work_read(key, process).await?;
            let w = holder(w.as_ref(), session_id, *token)
                .map_err(lost)?
                .clone();
            let Some(session) = rows
                .session_read(session_id)
                .await?
                .filter(|s| s.alive_at(now))
            else {
                return Err(lost(EXPIRED_HOLDER));
            };
            match outcome {
                Outcome::Finished => {
                    rows.backoff_remove(key, process).await?;
                    release(rows, &w, &session, WorkEvent::Finished, None, now).await?;
                }
                Outcome::Canceled => {
                    release(rows, &w, &session, WorkEvent::Canceled, None, now).await?
                }
                Outcome::Failed {
                    cause,
                    backoff,
                    uniform,
                } => {
                    let last = rows.backoff_read(key, process).await?;
                    // An interval of 0: the row counts expiries only, no interval was chosen.
                    let interval_s = backoff.next_interval_s(
                        last.as_ref().map(|b| b.last_interval_s).filter(|&s| s > 0),
                    );
                    let failures = last.map_or(1, |b| b.failures.saturating_add(1));
                    let max_failures = rows
                        .process_read(process)
                        .await?
                        .and_then(|p| p.max_failures);
                    let until = if max_failures.is_some_and(|m| failures >= m) {
                        PARKED
                    } else {
                        Timestamp(
                            now.0
                                .saturating_add(interval_s.saturating_mul(1_000_000))
                                .saturating_add(
                                    backoff.jitter_ms(interval_s, *uniform).saturating_mul(1000),
                                )
                                // Below `PARKED`: only a parking reaches it
                                // (`Store::backoff_parked` lists those above this).
                                .min(PARKED.0 - 1),
                        )
                    };
                    // An object deleted while it was worked on gets no backoff: its backoffs went
                    // with it, and a new object under the key starts afresh.
                    if rows.object_read(key).await?.is_some() {
                        rows.backoff_put(&BackoffInfo {
                            key: key.clone(),
                            process: process.clone(),
                            until,
                            cause: cause.clone(),
                            last_interval_s: interval_s,
                            failures,
                        })
                        .await?;
                    }
                    release(
                        rows,
                        &w,
                        &session,
                        WorkEvent::Failed,
                        Some(cause.clone()),
                        now,
                    )
                    .await?;
                }
            }
            Ok(OpResult {
                changed: true,
                applied: Applied::Done { count: 1 },
            })
        }
        Op::WorkExplain {
            key,
            process,
            selector,
        } => Ok(OpResult {
            changed: false,
            applied: Applied::WorkExplain(Box::new(
                explain(rows, key, process, selector.as_deref(), now).await?,
            )),
        }),
        Op::WorkForceCancel { key, process } => {
            let Some(w) = rows.work_read(key, process).await? else {
                declared(rows, process).await?;
                return Ok(OpResult {
                    changed: false,
                    applied: Applied::Done { count: 0 },
                });
            };
            let (component, host) = match rows.session_read(&w.session_id).await? {
                Some(s) => (s.component, s.host),
                None => (String::new(), String::new()),
            };
            rows.work_remove(key, process).await?;
            let cause = Some("canceled by operator".to_string());
            rows.history_append(&history(
                &w,
                &component,
                &host,
                WorkEvent::Canceled,
                cause,
                now,
            ))
            .await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Done { count: 1 },
            })
        }
        Op::BackoffClear { key, process } => {
            let removed = rows.backoff_remove(key, process).await?;
            if !removed {
                declared(rows, process).await?;
            }
            Ok(OpResult {
                changed: removed,
                applied: Applied::Done {
                    count: u64::from(removed),
                },
            })
        }
        Op::Export { .. }
        | Op::Unexport { .. }
        | Op::KvSet { .. }
        | Op::KvDelete { .. }
        | Op::MapSet { .. }
        | Op::MapDelete { .. }
        | Op::DeployAdd { .. }
        | Op::DeployPrune { .. }
        | Op::ScheduleRegister { .. }
        | Op::ScheduleUnregister { .. } => crate::world_apply::apply_world_op(rows, op, now).await,
        Op::GcKindDeclare { .. }
        | Op::LeaseCreate { .. }
        | Op::LeaseDelete { .. }
        | Op::LeaseAddResource { .. }
        | Op::LeaseRemoveResource { .. }
        | Op::BlobCommit { .. }
        | Op::BlobDelete { .. }
        | Op::GcSweep { .. } => Box::pin(crate::gc_apply::apply_gc_op(rows, op, now)).await,
    }
}

/// The claim as read, if it is `session_id`'s with `token`; else why not (for [`work_lost`]).
fn holder<'w>(
    read: Option<&'w WorkInfo>,
    session_id: &str,
    token: i64,
) -> std::result::Result<&'w WorkInfo, &'static str> {
    match read {
        None => Err("is not held by anyone"),
        Some(w) if w.session_id != session_id || w.token != token => {
            Err("is held by another claim")
        }
        Some(w) => Ok(w),
    }
}

/// Why a claim whose row is right is still not held ([`work_lost`]).
const EXPIRED_HOLDER: &str = "belongs to an expired session";

/// `WorkLost` for `process` on `key` with `token`, saying why.
fn work_lost(process: &str, key: &ObjectKey, token: i64, why: &str) -> Error {
    Error::WorkLost {
        what: format!("{process} on {key} (token {token}) {why}; nothing was changed"),
    }
}

pub(crate) async fn live_session<T: TxRows + ?Sized>(
    rows: &mut T,
    id: &str,
    now: Timestamp,
) -> Result<SessionInfo> {
    match rows.session_read(id).await? {
        Some(s) if s.alive_at(now) => Ok(s),
        _ => Err(Error::SessionExpired {
            session_id: id.to_string(),
        }),
    }
}

fn history(
    w: &WorkInfo,
    session_component: &str,
    session_host: &str,
    event: WorkEvent,
    cause: Option<String>,
    at: Timestamp,
) -> HistoryEntry {
    HistoryEntry {
        seq: 0,
        key: w.key.clone(),
        process: w.process.clone(),
        event,
        session_id: w.session_id.clone(),
        component: session_component.to_string(),
        host: session_host.to_string(),
        token: w.token,
        at,
        cause,
    }
}

/// Remove a claim and record why.
async fn release<T: TxRows + ?Sized>(
    rows: &mut T,
    w: &WorkInfo,
    session: &SessionInfo,
    event: WorkEvent,
    cause: Option<String>,
    now: Timestamp,
) -> Result<()> {
    rows.work_remove(&w.key, &w.process).await?;
    rows.history_append(&history(
        w,
        &session.component,
        &session.host,
        event,
        cause,
        now,
    ))
    .await
}

/// When a claim of a session that expired at `deadline` lapsed, as its `Expired` history says:
/// the deadline, however late a sweep or a takeover notices it (a sweeper an hour late must not
/// make the claim look held for that hour), but never before the claim started (another
/// process's clock, behind) nor after `now`.
pub fn lapsed_at(w: &WorkInfo, deadline: Timestamp, now: Timestamp) -> Timestamp {
    deadline.max(w.started_at).min(now)
}

/// Release a claim whose session is dead (history `Expired`, at the session's deadline:
/// [`lapsed_at`]), counted as a failure of (object, process) ([`count_expiry`]). The session
/// row may be gone already (then its deadline is unknown: `now`). Returns whether the count
/// parked the object.
async fn expire<T: TxRows + ?Sized>(
    rows: &mut T,
    w: &WorkInfo,
    max_failures: Option<u64>,
    now: Timestamp,
) -> Result<bool> {
    let (component, host, at) = match rows.session_read(&w.session_id).await? {
        Some(s) => (s.component, s.host, lapsed_at(w, s.deadline, now)),
        None => (String::new(), String::new(), now),
    };
    rows.work_remove(&w.key, &w.process).await?;
    rows.history_append(&history(
        w,
        &component,
        &host,
        WorkEvent::Expired,
        Some(EXPIRED_CAUSE.to_string()),
        at,
    ))
    .await?;
    count_expiry(rows, w, max_failures, at).await
}

/// The cause of an expired claim, in its history and in the backoff its expiry counts in.
pub const EXPIRED_CAUSE: &str = "session expired";

/// An expiry of claim `w` (its session lapsed at `at` while holding it: a worker killed, out
/// of memory, crashed on a poison object) counts as a failure of (object, process) in a row,
/// as `fail` does: the backoff row's `failures` grows by one (a new row: 1), its cause is
/// [`EXPIRED_CAUSE`], and when the count reaches the process's `max_failures` the object is
/// parked ([`PARKED`]). Processes declare no backoff interval, so an expiry that does not park
/// makes no wait (`until` stays at most `at`, already past; the interval of the last `fail`
/// is kept for the next one, 0 on a new row: none chosen yet). A finish deletes the row, so
/// the count starts again. An object deleted meanwhile gets no row (as in `fail`). Returns
/// whether it parked the object.
async fn count_expiry<T: TxRows + ?Sized>(
    rows: &mut T,
    w: &WorkInfo,
    max_failures: Option<u64>,
    at: Timestamp,
) -> Result<bool> {
    if rows.object_read(&w.key).await?.is_none() {
        return Ok(false);
    }
    let last = rows.backoff_read(&w.key, &w.process).await?;
    let failures = last.as_ref().map_or(1, |b| b.failures.saturating_add(1));
    let parks = max_failures.is_some_and(|m| failures >= m);
    let until = match (&last, parks) {
        (_, true) => PARKED,
        (Some(b), false) => b.until.max(at),
        (None, false) => at,
    };
    rows.backoff_put(&BackoffInfo {
        key: w.key.clone(),
        process: w.process.clone(),
        until,
        cause: EXPIRED_CAUSE.to_string(),
        last_interval_s: last.map_or(0, |b| b.last_interval_s),
        failures,
    })
    .await?;
    Ok(parks)
}

/// The error of a claim of one object that took a dead holder's claim over and, counting that
/// expiry, parked the object instead ([`count_expiry`]; the expiry and the parking commit).
pub fn parked_by_expiry(key: &ObjectKey, process: &str) -> Error {
    Error::Conflict {
        what: expiry_parks(key, process),
    }
}

/// Why a claim of `key` for `process` parks it instead of taking it (see [`parked_by_expiry`]).
fn expiry_parks(key: &ObjectKey, process: &str) -> String {
    format!(
        "{key} is parked for {process}: the claim its dead session held expired, and that \
         reached the process's failure budget (clear its backoff to retry it): {EXPIRED_CAUSE}"
    )
}

/// An operator's change of a declared process: `change` sets it and says whether it changed.
async fn process_control<T: TxRows + ?Sized>(
    rows: &mut T,
    name: &str,
    change: impl FnOnce(&mut Process) -> bool,
) -> Result<OpResult> {
    let Some(mut p) = rows.process_read(name).await? else {
        return Err(undeclared(name));
    };
    let changed = change(&mut p);
    if changed {
        rows.process_put(&p).await?;
    }
    Ok(OpResult {
        changed,
        applied: Applied::Process(p),
    })
}

/// The error of a claim (or a pause) of a process never declared.
pub fn undeclared(process: &str) -> Error {
    Error::invalid(
        "process",
        process,
        "is not declared; declare it with `fleetdb process define` (or Store::process_define)",
    )
}

/// `Ok` if `process` is declared, else the error of an undeclared process: an operator's op
/// that found nothing to change for a process never declared (a typo) says so instead of
/// answering "nothing there".
async fn declared<T: TxRows + ?Sized>(rows: &mut T, process: &str) -> Result<()> {
    match rows.process_read(process).await? {
        Some(_) => Ok(()),
        None => Err(undeclared(process)),
    }
}

/// The process itself and every process it conflicts with, in either direction; and the process.
async fn exclusions<T: TxRows + ?Sized>(
    rows: &mut T,
    process: &str,
) -> Result<(Vec<String>, Process)> {
    let all = rows.process_all().await?;
    let Some(p) = all.iter().find(|p| p.name == process) else {
        return Err(undeclared(process));
    };
    let me = p.clone();
    let mut out = vec![p.name.clone()];
    out.extend(p.conflicts.iter().cloned());
    out.extend(
        all.iter()
            .filter(|q| q.conflicts.iter().any(|c| c == process))
            .map(|q| q.name.clone()),
    );
    out.sort();
    out.dedup();
    Ok((out, me))
}

/// Why no claim of a paused process starts.
const PAUSED: &str = "the process is paused (resume it with `fleetdb process resume`)";

/// Why no claim of a process at its limit starts.
fn full(live: u64, max: u64) -> String {
    format!("the process has {live} claims held, its limit is {max} (`fleetdb process limit`)")
}

/// What keeps an object from being claimed for a process, object-side: in the order claims
/// check them.
enum ObjectBlock {
    Missing,
    /// A claim of the process or a conflicting one, by a live session.
    Held(WorkInfo),
    /// A backoff not yet over (or parked).
    Backoff(BackoffInfo),
}

impl ObjectBlock {
    /// As a claim of `key` for `process` reports it.
    fn reason(&self, key: &ObjectKey, process: &str) -> String {
        match self {
            ObjectBlock::Missing => format!("object {key} not found"),
            ObjectBlock::Held(w) => format!(
                "{key} is held for process {} by session {}",
                w.process, w.session_id
            ),
            ObjectBlock::Backoff(b) if b.parked() => format!(
                "{key} is parked for {process} after {} (clear its backoff to retry it): {}",
                b.failures_text(),
                b.cause
            ),
            ObjectBlock::Backoff(b) => format!(
                "{key} is in backoff for {process} until {}: {}",
                b.until, b.cause
            ),
        }
    }

    fn error(self, key: &ObjectKey, process: &str) -> Error {
        match self {
            ObjectBlock::Missing => Error::not_found(format!("object {key}")),
            _ => Error::Conflict {
                what: self.reason(key, process),
            },
        }
    }
}

/// The claims on `key` of the processes `exclude`, each with whether its session is alive at
/// `now` and who that session is.
async fn holders<T: TxRows + ?Sized>(
    rows: &mut T,
    key: &ObjectKey,
    exclude: &[String],
    now: Timestamp,
) -> Result<Vec<crate::work::Holder>> {
    let mut out = Vec::new();
    for p in exclude {
        if let Some(w) = rows.work_read(key, p).await? {
            let s = rows.session_read(&w.session_id).await?;
            out.push(crate::work::Holder {
                alive: s.as_ref().is_some_and(|s| s.alive_at(now)),
                component: s.as_ref().map(|s| s.component.clone()).unwrap_or_default(),
                host: s.map(|s| s.host).unwrap_or_default(),
                work: w,
            });
        }
    }
    Ok(out)
}

/// [`Op::WorkExplain`]: what a claim of `key` for `process` at `now` would check, read without
/// locks and taking nothing, with every reason it would not take the object (a claim stops at
/// the first). The checks and their words are the claim's own (`PAUSED`, [`full`],
/// [`ObjectBlock`]), so an explanation cannot drift from what claims do.
async fn explain<T: TxRows + ?Sized>(
    rows: &mut T,
    key: &ObjectKey,
    process: &str,
    selector: Option<&str>,
    now: Timestamp,
) -> Result<crate::work::WorkExplain> {
    let mut blockers = Vec::new();
    let declared = rows.process_read(process).await?;
    let mut held = None;
    let exclude = match &declared {
        None => {
            blockers.push(format!("process {process:?} is not declared"));
            vec![process.to_string()]
        }
        Some(p) => {
            if p.paused {
                blockers.push(PAUSED.to_string());
            }
            if let Some(max) = p.max_active {
                let live = rows.work_count_live(process, now).await?;
                held = Some(live);
                if live >= max {
                    blockers.push(full(live, max));
                }
            }
            exclusions(rows, process).await?.0
        }
    };
    let object = rows.object_read(key).await?;
    if object.is_none() {
        blockers.push(ObjectBlock::Missing.reason(key, process));
    }
    let holders = holders(rows, key, &exclude, now).await?;
    for h in holders.iter().filter(|h| h.alive) {
        blockers.push(ObjectBlock::Held(h.work.clone()).reason(key, process));
    }
    let backoff = rows.backoff_read(key, process).await?;
    if let Some(b) = backoff.as_ref().filter(|b| b.until > now) {
        blockers.push(ObjectBlock::Backoff(b.clone()).reason(key, process));
    }
    // A dead session's claim of the process, which the claim would expire: counted as a
    // failure, it parks the object when it reaches the budget (`count_expiry`).
    let dead_own = holders
        .iter()
        .any(|h| !h.alive && h.work.process == process);
    let budget = declared.as_ref().and_then(|p| p.max_failures);
    if dead_own
        && object.is_some()
        && budget.is_some_and(|m| backoff.as_ref().map_or(1, |b| b.failures + 1) >= m)
    {
        blockers.push(expiry_parks(key, process));
    }
    let selector = match selector {
        None => None,
        Some(text) => {
            let sel = crate::selector::Selector::parse(text)?;
            let unmet = match &object {
                None => vec![sel.to_string()],
                Some(o) => {
                    let tags: std::collections::BTreeMap<String, (serde_json::Value, Timestamp)> =
                        rows.tag_read_all(key)
                            .await?
                            .into_iter()
                            .map(|(t, _)| (t.name, (t.value, t.updated_at)))
                            .collect();
                    let view = crate::selector::ObjectView {
                        namespace: &key.namespace,
                        kind: &key.kind,
                        id: &key.id,
                        labels: &o.labels,
                        tags: &tags,
                    };
                    sel.unmet(&view, now)
                }
            };
            if object.is_some() && !unmet.is_empty() {
                blockers.push(format!(
                    "{key} does not match the selector: it fails {}",
                    unmet
                        .iter()
                        .map(|t| format!("`{t}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            Some(crate::work::SelectorCheck {
                selector: sel.to_string(),
                matches: unmet.is_empty(),
                unmet,
            })
        }
    };
    Ok(crate::work::WorkExplain {
        key: key.clone(),
        process: process.to_string(),
        blockers,
        object_exists: object.is_some(),
        declared,
        held,
        holders,
        backoff,
        selector,
    })
}

/// The checks of [`apply_claim`] that come before it writes anything (the claiming session is
/// alive, the process is declared, a selector parses), read only. A backend that claims behind
/// a batch runs these first: a claim that fails them takes nothing and the batch stands
/// (`Backend::commit_then_claim`), with no savepoint to roll back to (SQLite's cost a quarter
/// of its one-at-a-time throughput: a savepoint's pages go through a sub-journal). A claim that
/// passes them can still fail only on a storage error, which fails the whole transaction.
pub async fn claim_precheck<T: TxRows + ?Sized>(rows: &mut T, req: &ClaimRequest) -> Result<()> {
    live_session(rows, &req.session_id, req.now).await?;
    exclusions(rows, &req.process).await?;
    if let ClaimTarget::Selector(text) = &req.target {
        crate::selector::Selector::parse(text)?;
    }
    Ok(())
}

/// Claim work: check the session, find candidates (not held by a live session for this process or
/// a conflicting one, not in backoff), release stale claims of dead sessions on them (history
/// `Expired`), insert the claims with fresh fencing tokens and write `Started` history. Returns
/// the work and how many dead sessions' claims it took over.
pub async fn apply_claim<T: TxRows + ?Sized>(
    rows: &mut T,
    req: &ClaimRequest,
) -> Result<(Vec<WorkInfo>, u64)> {
    let now = req.now;
    let session = live_session(rows, &req.session_id, now).await?;
    let (exclude, process) = exclusions(rows, &req.process).await?;
    // No claim starts while the process is paused, or past its limit: a selector claim finds
    // nothing, a claim of one object is refused.
    let refuse = |reason: String| match &req.target {
        ClaimTarget::Object(key) => Err(Error::Refused {
            what: format!("claim of {key} for process {:?}", req.process),
            reason,
        }),
        ClaimTarget::Selector(_) => Ok((Vec::new(), 0)),
    };
    if process.paused {
        return refuse(PAUSED.into());
    }
    let mut limit = req.limit;
    if let Some(max) = process.max_active {
        // Claims of a limited process take turns: the count, read after the lock, holds until
        // this one commits.
        rows.lock_process(&req.process).await?;
        let live = rows.work_count_live(&req.process, now).await?;
        let room = usize::try_from(max.saturating_sub(live)).unwrap_or(usize::MAX);
        if room == 0 {
            return refuse(full(live, max));
        }
        limit = limit.min(room);
    }
    let mut keys = match &req.target {
        ClaimTarget::Object(key) => {
            // Lock first: what follows must see every claim committed before it.
            rows.lock_object(key).await?;
            if rows.object_read(key).await?.is_none() {
                return Err(ObjectBlock::Missing.error(key, &req.process));
            }
            for h in holders(rows, key, &exclude, now).await? {
                if h.alive {
                    return Err(ObjectBlock::Held(h.work).error(key, &req.process));
                }
            }
            if let Some(b) = rows.backoff_read(key, &req.process).await? {
                if b.until > now {
                    return Err(ObjectBlock::Backoff(b).error(key, &req.process));
                }
            }
            vec![key.clone()]
        }
        ClaimTarget::Selector(text) => {
            let selector = crate::selector::Selector::parse(text)?;
            rows.claim_candidates(&CandidateQuery {
                selector,
                process: req.process.clone(),
                exclude: exclude.clone(),
                now,
                limit,
            })
            .await?
        }
    };
    // Claims of dead sessions still on these (object, process): released with `Expired`
    // history, each counted as a failure. One whose count parks the object is not taken: a
    // claim of it is refused (with the expiry and the parking committed), a selector claim
    // looks again (the parked backoff now excludes it) until no takeover parks.
    let mut expired = 0;
    loop {
        let mut parked = false;
        for stale in rows.work_read_many(&keys, &req.process).await? {
            expired += 1;
            if expire(rows, &stale, process.max_failures, now).await? {
                parked = true;
                keys.retain(|k| *k != stale.key);
            }
        }
        match (&req.target, parked) {
            (ClaimTarget::Selector(text), true) => {
                keys = rows
                    .claim_candidates(&CandidateQuery {
                        selector: crate::selector::Selector::parse(text)?,
                        process: req.process.clone(),
                        exclude: exclude.clone(),
                        now,
                        limit,
                    })
                    .await?;
            }
            _ => break,
        }
    }
    let mut out = Vec::with_capacity(keys.len());
    let tokens = rows.next_tokens(keys.len()).await?;
    if tokens.len() != keys.len() {
        return Err(Error::Backend(
            "the store handed out too few fencing tokens".into(),
        ));
    }
    for (key, token) in keys.into_iter().zip(tokens) {
        let w = WorkInfo {
            key,
            process: req.process.clone(),
            session_id: session.id.clone(),
            token,
            started_at: now,
        };
        rows.work_insert(&w).await?;
        let h = history(
            &w,
            &session.component,
            &session.host,
            WorkEvent::Started,
            None,
            now,
        );
        rows.history_append(&h).await?;
        out.push(w);
    }
    Ok((out, expired))
}

/// Remove up to `limit` expired sessions, expiring every claim they held (history `Expired` at
/// the session's deadline, not at the sweep's `now`: [`lapsed_at`]; each counted as a failure:
/// [`count_expiry`]).
pub async fn apply_sweep<T: TxRows + ?Sized>(
    rows: &mut T,
    now: Timestamp,
    limit: usize,
) -> Result<crate::backend::Swept> {
    let expired = rows.sessions_expired(now, limit).await?;
    let mut released = Vec::new();
    // Each process's failure budget, read once per sweep.
    let mut budgets: std::collections::HashMap<String, Option<u64>> = Default::default();
    for s in &expired {
        for w in rows.work_of_session(&s.id).await? {
            released.push(w.process.clone());
            rows.work_remove(&w.key, &w.process).await?;
            let at = lapsed_at(&w, s.deadline, now);
            rows.history_append(&history(
                &w,
                &s.component,
                &s.host,
                WorkEvent::Expired,
                Some(EXPIRED_CAUSE.to_string()),
                at,
            ))
            .await?;
            let max_failures = match budgets.get(&w.process) {
                Some(m) => *m,
                None => {
                    let m = rows
                        .process_read(&w.process)
                        .await?
                        .and_then(|p| p.max_failures);
                    budgets.insert(w.process.clone(), m);
                    m
                }
            };
            count_expiry(rows, &w, max_failures, at).await?;
        }
        rows.session_remove(&s.id).await?;
        crate::world_apply::session_ended(rows, s, now).await?;
    }
    let (records, full) = crate::world_apply::sweep_expired(rows, now, limit).await?;
    Ok(crate::backend::Swept {
        sessions: expired.len() as u64,
        expired: released,
        records,
        more: full || expired.len() >= limit,
    })
}

/// Release up to `limit` claims whose session row is gone, with `Expired` history. Closing or
/// sweeping a session releases its claims in the same transaction, so such rows are rare: on
/// PostgreSQL a claim (READ COMMITTED, its session alive in its snapshot) can commit a row for
/// a session that a close or a sweep (SERIALIZABLE, whose read of the session's claims came
/// before it) deletes at the same time. The row binds nobody (a claim takes over a row whose
/// session is gone) but would keep its `Started` without an end; backends run this now and
/// then. Returns the process of each claim it released.
pub async fn apply_orphans<T: TxRows + ?Sized>(
    rows: &mut T,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<String>> {
    let orphans = rows.work_orphaned(limit).await?;
    for w in &orphans {
        rows.work_remove(&w.key, &w.process).await?;
        let cause = Some("session gone".to_string());
        rows.history_append(&history(w, "", "", WorkEvent::Expired, cause, now))
            .await?;
    }
    Ok(orphans.into_iter().map(|w| w.process).collect())
}

/// Parse a change-log row's JSON text (used by backends when reading the log).
pub fn parse_stored_json(text: Option<String>) -> Result<Option<serde_json::Value>> {
    text.map(|t| {
        serde_json::from_str(&t)
            .map_err(|e| Error::Backend(format!("corrupt JSON in the store: {e}")))
    })
    .transpose()
}

/// Helper for backends: the key of an object from stored columns.
pub fn stored_key(namespace: String, kind: String, id: String) -> ObjectKey {
    ObjectKey {
        namespace,
        kind,
        id,
    }
}
