//! What a batch does, decided once for every backend. A backend opens a transaction, wraps it in
//! a [`TxRows`] and calls [`apply_batch`]; if anything fails it rolls the whole transaction back.

use crate::backend::{ChangeDraft, TxRows};
use crate::batch::{Applied, Batch, Op, OpResult, Precondition, PutMode};
use crate::error::{Error, Result};
use crate::model::{
    ChangeOp, Entity, Labels, Namespace, Object, ObjectKey, Revision, Tag, DEFAULT_NAMESPACE,
};
use crate::time::Timestamp;
use crate::validate;

/// Check every precondition, then apply every op in order. On `Err` the caller must roll back.
pub async fn apply_batch<T: TxRows + ?Sized>(rows: &mut T, batch: &Batch) -> Result<Vec<OpResult>> {
    for p in &batch.preconditions {
        check_precondition(rows, p).await?;
    }
    let mut out = Vec::with_capacity(batch.ops.len());
    for op in &batch.ops {
        out.push(apply_op(rows, op, batch.now).await?);
    }
    Ok(out)
}

async fn check_precondition<T: TxRows + ?Sized>(rows: &mut T, p: &Precondition) -> Result<()> {
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
    };
    if seen != now {
        return Err(Error::Conflict { what });
    }
    Ok(())
}

fn labels_json(labels: &Labels) -> String {
    // A BTreeMap of strings always serializes.
    serde_json::to_string(&serde_json::json!({ "labels": labels })).unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn draft(
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
            if !read.object_exists {
                return Err(Error::not_found(format!("object {key}")));
            }
            let Some((_, text)) = read.tag else {
                return Err(Error::not_found(format!("tag {name:?} of object {key}")));
            };
            let change = draft(
                &key.namespace,
                &key.kind,
                &key.id,
                Entity::Tag,
                name,
                ChangeOp::Delete,
                Some(text),
                None,
                now,
            );
            let revision = rows.tag_remove(key, name, &change).await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            })
        }
    }
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
