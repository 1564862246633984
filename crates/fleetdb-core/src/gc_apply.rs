//! What lease, content and collection operations do, decided once for every backend.

use std::collections::{HashMap, HashSet};

use crate::apply::{apply_op_pub, draft, labels_json};
use crate::backend::{ChangeDraft, GcRemoved, TxRows};
use crate::batch::{Applied, Op, OpResult};
use crate::error::{Error, Result};
use crate::gc::{
    change_start, references, BlobInfo, ChangeStart, GcKind, Lease, Resource,
    CONTENT_CHANGE_NAMESPACE, LEASE_CHANGE_NAMESPACE, LEASE_RESOURCES_MAX,
};
use crate::model::{ChangeOp, Entity, Labels, ObjectKey, Revision};
use crate::time::Timestamp;
use crate::world::{ExportMeta, Space};

/// Distinct entities changed during a collection beyond which a sweep batch spares everything
/// (it cannot cheaply tell what they reference; the next collection decides).
const FRESH_MAX: usize = 100_000;

fn lease_json(l: &Lease) -> String {
    serde_json::json!({ "labels": l.labels, "flat": l.flat, "expires_at": l.expires_at })
        .to_string()
}

fn lease_draft(l: &Lease, op: ChangeOp, now: Timestamp) -> ChangeDraft {
    let (old, new) = match op {
        ChangeOp::Put => (None, Some(lease_json(l))),
        ChangeOp::Delete => (Some(lease_json(l)), None),
    };
    draft(
        LEASE_CHANGE_NAMESPACE,
        "",
        &l.id,
        Entity::Lease,
        "",
        op,
        old,
        new,
        now,
    )
}

fn blob_json(b: &BlobInfo) -> String {
    serde_json::json!({ "size": b.size, "labels": b.labels }).to_string()
}

fn blob_draft(b: &BlobInfo, op: ChangeOp, now: Timestamp) -> ChangeDraft {
    let (old, new) = match op {
        ChangeOp::Put => (None, Some(blob_json(b))),
        ChangeOp::Delete => (Some(blob_json(b)), None),
    };
    draft(
        CONTENT_CHANGE_NAMESPACE,
        "",
        &b.digest,
        Entity::Content,
        "",
        op,
        old,
        new,
        now,
    )
}

async fn live_lease<T: TxRows + ?Sized>(rows: &mut T, id: &str, now: Timestamp) -> Result<Lease> {
    match rows.lease_read(id).await? {
        Some(l) if l.alive_at(now) => Ok(l),
        Some(_) => Err(Error::Refused {
            what: format!("lease {id:?}"),
            reason: "it has expired".into(),
        }),
        None => Err(Error::not_found(format!("lease {id:?}"))),
    }
}

/// Add `resource` to `lease` (checked live by the caller) unless it holds it: whether it was
/// added. An add past [`LEASE_RESOURCES_MAX`] is refused, in the add's transaction (the batch
/// writes nothing); the count is kept on the lease's row, so this reads no other resource.
async fn lease_hold<T: TxRows + ?Sized>(
    rows: &mut T,
    lease: &str,
    resource: &Resource,
    now: Timestamp,
) -> Result<bool> {
    match rows.lease_resource_add(lease, resource, now).await? {
        None => Ok(false),
        Some(n) if n > LEASE_RESOURCES_MAX as u64 => Err(Error::Refused {
            what: format!("adding {resource} to lease {lease:?}"),
            reason: format!(
                "the lease holds {LEASE_RESOURCES_MAX} resources, the most one lease may hold; \
                 remove some or use another lease"
            ),
        }),
        Some(_) => Ok(true),
    }
}

fn done(changed: bool, count: u64) -> OpResult {
    OpResult {
        changed,
        applied: Applied::Done { count },
    }
}

pub(crate) async fn apply_gc_op<T: TxRows + ?Sized>(
    rows: &mut T,
    op: &Op,
    now: Timestamp,
) -> Result<OpResult> {
    match op {
        Op::GcKindDeclare { kind, collectable } => {
            if let Some(k) = rows.gc_kind_read(kind).await? {
                if k.collectable == *collectable {
                    return Ok(done(false, 0));
                }
            }
            rows.gc_kind_put(&GcKind {
                kind: kind.clone(),
                collectable: *collectable,
                declared_at: now,
            })
            .await?;
            Ok(done(true, 1))
        }
        Op::LeaseCreate {
            id,
            labels,
            flat,
            expires_at,
        } => {
            if rows.lease_read(id).await?.is_some() {
                return Err(Error::AlreadyExists {
                    what: format!("lease {id:?}"),
                });
            }
            if let Some(t) = expires_at {
                if *t <= now {
                    return Err(Error::invalid(
                        "lease expiry",
                        t.to_rfc3339(),
                        "must be in the future",
                    ));
                }
            }
            let mut lease = Lease {
                id: id.clone(),
                labels: crate::validate::merge_labels(&Labels::new(), labels)?,
                flat: *flat,
                expires_at: *expires_at,
                created_at: now,
                revision: Revision(0),
            };
            lease.revision = rows
                .lease_put(&lease, &lease_draft(&lease, ChangeOp::Put, now))
                .await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Lease(lease),
            })
        }
        Op::LeaseDelete { id } => {
            let Some(lease) = rows.lease_read(id).await? else {
                return Err(Error::not_found(format!("lease {id:?}")));
            };
            let revision = rows
                .lease_remove(id, &lease_draft(&lease, ChangeOp::Delete, now))
                .await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            })
        }
        Op::LeaseAddResource { lease, resource } => {
            let l = live_lease(rows, lease, now).await?;
            let added = lease_hold(rows, lease, resource, now).await?;
            if added {
                // A change row, so a collection running now protects what was just leased.
                rows.change_append(&lease_draft(&l, ChangeOp::Put, now))
                    .await?;
            }
            Ok(done(added, u64::from(added)))
        }
        Op::LeaseRemoveResource { lease, resource } => {
            let Some(l) = rows.lease_read(lease).await? else {
                return Err(Error::not_found(format!("lease {lease:?}")));
            };
            let removed = rows.lease_resource_remove(lease, resource).await?;
            if removed {
                // A change row with the lease before and after (`gc::releases_of_change`): what
                // it held may be garbage now, and another process's collector learns so from the
                // log, as of a lease deleted.
                let json = lease_json(&l);
                rows.change_append(&draft(
                    LEASE_CHANGE_NAMESPACE,
                    "",
                    &l.id,
                    Entity::Lease,
                    "",
                    ChangeOp::Put,
                    Some(json.clone()),
                    Some(json),
                    now,
                ))
                .await?;
            }
            Ok(done(removed, u64::from(removed)))
        }
        Op::BlobCommit {
            digest,
            size,
            labels,
            lease,
        } => {
            if let Some(l) = lease {
                live_lease(rows, l, now).await?;
            }
            let existing = rows.blob_meta_read(digest).await?;
            let info = match existing {
                Some(mut b) => {
                    if b.size != *size {
                        return Err(Error::Backend(format!(
                            "blob {digest} is stored with size {} but was committed with size {size}",
                            b.size
                        )));
                    }
                    // Written (a new revision and a change-log row) even when nothing changed:
                    // a blob committed again is wanted now, and a collection running since
                    // before must see that (its sweep spares what changed after its mark).
                    // Unwritten, a re-upload under a lease — a deploy's files, say — of a blob
                    // the collection had marked as garbage was swept once the lease ended.
                    b.labels = crate::validate::merge_labels(&b.labels, labels)?;
                    b.updated_at = now;
                    b.revision = rows
                        .blob_meta_put(&b, &blob_draft(&b, ChangeOp::Put, now))
                        .await?;
                    b
                }
                None => {
                    let mut b = BlobInfo {
                        digest: digest.clone(),
                        size: *size,
                        labels: crate::validate::merge_labels(&Labels::new(), labels)?,
                        created_at: now,
                        updated_at: now,
                        revision: Revision(0),
                    };
                    b.revision = rows
                        .blob_meta_put(&b, &blob_draft(&b, ChangeOp::Put, now))
                        .await?;
                    b
                }
            };
            if let Some(l) = lease {
                lease_hold(
                    rows,
                    l,
                    &Resource::Blob {
                        digest: digest.clone(),
                    },
                    now,
                )
                .await?;
            }
            Ok(OpResult {
                changed: true,
                applied: Applied::Blob(info),
            })
        }
        Op::BlobDelete { digest } => {
            let Some(b) = rows.blob_meta_read(digest).await? else {
                return Err(Error::not_found(format!("blob {digest}")));
            };
            let revision = rows
                .blob_meta_remove(digest, &blob_draft(&b, ChangeOp::Delete, now))
                .await?;
            Ok(OpResult {
                changed: true,
                applied: Applied::Deleted { revision },
            })
        }
        Op::GcSweep {
            mark_revision,
            objects,
            blobs,
            expired_leases,
            collectable_kinds,
        } => {
            let batch = SweepBatch {
                mark: *mark_revision,
                objects,
                blobs,
                expired_leases,
                collectable_kinds,
            };
            sweep(rows, batch, now).await
        }
        other => Err(Error::Backend(format!(
            "not a lease or collection operation: {other:?}"
        ))),
    }
}

/// Everything reachable from what changed after `mark`: objects and blobs written since, and
/// the resources of leases touched since. Read in the sweeping transaction, so it is exact.
/// `None` (spare every candidate) when too much changed to tell, or when the change log has
/// been compacted past `mark` (`fleetdb compact` during the collection): the rows that say what
/// changed may be gone, and an empty page would sweep what became referenced meanwhile.
async fn protected_since<T: TxRows + ?Sized>(
    rows: &mut T,
    mark: Revision,
) -> Result<Option<HashSet<Resource>>> {
    let mut start: Vec<Resource> = Vec::new();
    let page = match rows.changes_after(mark, FRESH_MAX).await {
        Ok(page) => page,
        Err(Error::Compacted { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    if page.len() >= FRESH_MAX {
        return Ok(None); // too much changed to tell: spare the whole batch
    }
    for (_, ns, kind, id) in page {
        match change_start(ns, kind, id) {
            ChangeStart::Node(r) => start.push(r),
            ChangeStart::Lease(id) => start.extend(rows.lease_resources_of(&id).await?),
            ChangeStart::Export(key) => {
                if let Some(rec) = rows.world_read(Space::Export, &key).await? {
                    start.extend(ExportMeta::holds_of(rec.meta.as_deref()));
                }
            }
            ChangeStart::None => {}
        }
    }
    let mut seen: HashSet<Resource> = HashSet::new();
    while let Some(r) = start.pop() {
        if !seen.insert(r.clone()) {
            continue;
        }
        let labels = match &r {
            Resource::Object { key } => rows
                .object_read(key)
                .await?
                .map(|o| (key.namespace.clone(), o.labels)),
            Resource::Blob { digest } => rows
                .blob_meta_read(digest)
                .await?
                .map(|b| (String::new(), b.labels)),
        };
        if let Some((ns, labels)) = labels {
            start.extend(
                references(&ns, &labels)
                    .into_iter()
                    .filter(|x| !seen.contains(x)),
            );
        }
    }
    Ok(Some(seen))
}

/// One `Op::GcSweep`'s fields.
struct SweepBatch<'a> {
    mark: Revision,
    objects: &'a [ObjectKey],
    blobs: &'a [String],
    expired_leases: &'a [String],
    collectable_kinds: &'a [String],
}

/// Whether a kind the mark took as collectable is no longer collectable. Read in the sweeping
/// transaction, the rows held (PostgreSQL: `FOR SHARE`): a declaration waits for this batch to
/// commit, or this batch retries after it and sees it.
async fn kinds_changed<T: TxRows + ?Sized>(rows: &mut T, kinds: &[String]) -> Result<bool> {
    for kind in kinds {
        if !rows
            .gc_kind_read_held(kind)
            .await?
            .is_some_and(|k| k.collectable)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn sweep<T: TxRows + ?Sized>(
    rows: &mut T,
    batch: SweepBatch<'_>,
    now: Timestamp,
) -> Result<OpResult> {
    let SweepBatch {
        mark,
        objects,
        blobs,
        expired_leases,
        collectable_kinds,
    } = batch;
    let protected = if kinds_changed(rows, collectable_kinds).await? {
        None
    } else {
        protected_since(rows, mark).await?
    };
    // Expired leases go whatever else this batch does: an expired lease protects nothing, and
    // its deadline has passed, so nothing would trigger another run for it.
    let (mut swept_objects, mut spared, mut leases) = (0u64, 0u64, 0u64);
    for id in expired_leases {
        if let Some(l) = rows.lease_read(id).await? {
            if !l.alive_at(now) {
                rows.lease_remove(id, &lease_draft(&l, ChangeOp::Delete, now))
                    .await?;
                leases += 1;
            }
        }
    }
    let Some(protected) = protected else {
        return Ok(OpResult {
            changed: leases > 0,
            applied: Applied::Swept {
                objects: 0,
                blobs: Vec::new(),
                bytes: 0,
                leases,
                spared: (objects.len() + blobs.len()) as u64,
            },
        });
    };
    let mut collectable: HashMap<String, bool> = HashMap::new();
    let mut swept_blobs = Vec::new();
    let mut bytes = 0u64;
    // Candidates that something changed during the collection reaches are spared here; the
    // backend's set-based primitive rechecks the revision and the kind inside the transaction.
    let (objects, spared_objects): (Vec<&ObjectKey>, Vec<&ObjectKey>) = objects
        .iter()
        .partition(|k| !protected.contains(&Resource::Object { key: (*k).clone() }));
    let (blobs, spared_blobs): (Vec<&String>, Vec<&String>) = blobs.iter().partition(|d| {
        !protected.contains(&Resource::Blob {
            digest: (*d).clone(),
        })
    });
    // Protected candidates that no longer exist are not counted (as before: nothing to spare).
    for key in spared_objects {
        if rows.object_read(key).await?.is_some() {
            spared += 1;
        }
    }
    for digest in spared_blobs {
        if rows.blob_meta_read(digest).await?.is_some() {
            spared += 1;
        }
    }
    let keys: Vec<ObjectKey> = objects.iter().map(|k| (*k).clone()).collect();
    match rows.gc_objects_remove(&keys, mark).await? {
        Some(GcRemoved { removed, kept }) => {
            spared += kept;
            // The change rows ObjectDelete writes: each tag, then the object.
            let mut drafts = Vec::with_capacity(removed.len());
            for o in &removed {
                let k = &o.key;
                for (name, text) in &o.tags {
                    drafts.push(draft(
                        &k.namespace,
                        &k.kind,
                        &k.id,
                        Entity::Tag,
                        name,
                        ChangeOp::Delete,
                        Some(text.clone()),
                        None,
                        now,
                    ));
                }
                drafts.push(draft(
                    &k.namespace,
                    &k.kind,
                    &k.id,
                    Entity::Object,
                    "",
                    ChangeOp::Delete,
                    Some(labels_json(&o.labels)),
                    None,
                    now,
                ));
            }
            rows.changes_append_many(&drafts).await?;
            swept_objects += removed.len() as u64;
        }
        None => {
            for key in keys {
                let Some(obj) = rows.object_read(&key).await? else {
                    continue;
                };
                let still_collectable = match collectable.get(&key.kind) {
                    Some(c) => *c,
                    None => {
                        let c = rows
                            .gc_kind_read(&key.kind)
                            .await?
                            .is_some_and(|k| k.collectable);
                        collectable.insert(key.kind.clone(), c);
                        c
                    }
                };
                if obj.revision > mark || !still_collectable {
                    spared += 1;
                    continue;
                }
                apply_op_pub(rows, &Op::ObjectDelete { key }, now).await?;
                swept_objects += 1;
            }
        }
    }
    let digests: Vec<String> = blobs.iter().map(|d| (*d).clone()).collect();
    match rows.gc_blobs_remove(&digests, mark).await? {
        Some(GcRemoved { removed, kept }) => {
            spared += kept;
            let drafts: Vec<ChangeDraft> = removed
                .iter()
                .map(|b| blob_draft(b, ChangeOp::Delete, now))
                .collect();
            rows.changes_append_many(&drafts).await?;
            for b in removed {
                bytes += b.size;
                swept_blobs.push(b.digest);
            }
        }
        None => {
            for digest in digests {
                let Some(b) = rows.blob_meta_read(&digest).await? else {
                    continue;
                };
                if b.revision > mark {
                    spared += 1;
                    continue;
                }
                rows.blob_meta_remove(&digest, &blob_draft(&b, ChangeOp::Delete, now))
                    .await?;
                bytes += b.size;
                swept_blobs.push(digest);
            }
        }
    }
    Ok(OpResult {
        changed: swept_objects > 0 || !swept_blobs.is_empty() || leases > 0,
        applied: Applied::Swept {
            objects: swept_objects,
            blobs: swept_blobs,
            bytes,
            leases,
            spared,
        },
    })
}
