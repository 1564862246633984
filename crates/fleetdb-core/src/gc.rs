//! Leases, references between objects and blobs, and the mark phase of garbage collection
//! (containerd's model, with its known problems fixed; see `docs/design.md` §12).
//!
//! References are labels on objects (and blobs):
//! - `fleetdb.io/gc.ref.<kind>` (or `….<kind>.<suffix>`, `….<kind>/<suffix>`): the value is the id
//!   of an object of `<kind>` in the same namespace; `<kind>` is everything up to the first `.`
//!   or `/` after the prefix. The kind `content` refers to a blob: the value is its digest.
//! - `fleetdb.io/gc.root`: the object is a root.
//! - `fleetdb.io/gc.expire` (RFC 3339): the object is a root until then.
//!
//! Only objects of kinds declared collectable are ever removed; everything else (and every
//! object of an undeclared kind) is a root.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Labels, ObjectKey, Revision};
use crate::time::Timestamp;
use crate::validate;

pub const GC_LABEL_PREFIX: &str = "fleetdb.io/gc.";
pub const REF_PREFIX: &str = "fleetdb.io/gc.ref.";
pub const ROOT_LABEL: &str = "fleetdb.io/gc.root";
pub const EXPIRE_LABEL: &str = "fleetdb.io/gc.expire";
/// The reference kind that points at a blob.
pub const CONTENT_KIND: &str = "content";
/// Resources one lease may hold.
pub const LEASE_RESOURCES_MAX: usize = 1_000_000;

/// What a gc label means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcLabel {
    Root,
    Expire(Timestamp),
    /// A reference to an object of `kind` (or, for [`CONTENT_KIND`], to a blob) with this id.
    Ref {
        kind: String,
        target: String,
    },
}

/// What a gc label means, borrowing the label's text (the mark phase parses every reference
/// label of every node: no allocation per label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GcLabelRef<'a> {
    Root,
    Expire(Timestamp),
    Ref { kind: &'a str, target: &'a str },
}

/// Parse a label under [`GC_LABEL_PREFIX`]. `Ok(None)` for labels outside it; `Invalid` for a
/// malformed gc label (rejected when written).
pub fn parse_gc_label(key: &str, value: &str) -> Result<Option<GcLabel>> {
    Ok(parse_gc_label_ref(key, value)?.map(|l| match l {
        GcLabelRef::Root => GcLabel::Root,
        GcLabelRef::Expire(t) => GcLabel::Expire(t),
        GcLabelRef::Ref { kind, target } => GcLabel::Ref {
            kind: kind.to_string(),
            target: target.to_string(),
        },
    }))
}

fn parse_gc_label_ref<'a>(key: &'a str, value: &'a str) -> Result<Option<GcLabelRef<'a>>> {
    if !key.starts_with(GC_LABEL_PREFIX) {
        return Ok(None);
    }
    let bad = |rule: &str| Err(Error::invalid(format!("label {key:?}"), value, rule));
    if key == ROOT_LABEL {
        return Ok(Some(GcLabelRef::Root));
    }
    if key == EXPIRE_LABEL {
        return match parse_rfc3339(value) {
            Some(t) => Ok(Some(GcLabelRef::Expire(t))),
            None => bad("must be an RFC 3339 time, e.g. 2026-12-01T00:00:00Z"),
        };
    }
    let Some(rest) = key.strip_prefix(REF_PREFIX) else {
        return Err(Error::invalid(
            "label key",
            key,
            "the only gc labels are fleetdb.io/gc.root, fleetdb.io/gc.expire and fleetdb.io/gc.ref.<kind>[.<suffix>|/<suffix>]",
        ));
    };
    let (kind, suffix) = match rest.find(['.', '/']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if validate::name("kind", kind).is_err() {
        return Err(Error::invalid(
            "label key",
            key,
            "fleetdb.io/gc.ref.<kind>: <kind> must be a kind name",
        ));
    }
    if let Some(s) = suffix {
        if s.is_empty()
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        {
            return Err(Error::invalid(
                "label key",
                key,
                "the suffix after the kind must be letters, digits, '.', '_', '-' or '/'",
            ));
        }
    }
    if kind == CONTENT_KIND {
        crate::world::validate_digest(value)?;
    } else if validate::name("id", value).is_err() {
        return bad("a reference's value must be the id of the referenced object");
    }
    Ok(Some(GcLabelRef::Ref {
        kind,
        target: value,
    }))
}

/// The (kind, target) of every well-formed reference label, borrowed (labels under
/// [`REF_PREFIX`] only: a range of the sorted map).
fn reference_labels(labels: &Labels) -> impl Iterator<Item = (&str, &str)> {
    use std::ops::Bound;
    labels
        .range::<str, _>((Bound::Included(REF_PREFIX), Bound::Unbounded))
        .take_while(|(k, _)| k.starts_with(REF_PREFIX))
        .filter_map(|(k, v)| match parse_gc_label_ref(k, v) {
            Ok(Some(GcLabelRef::Ref { kind, target })) => Some((kind, target)),
            _ => None,
        })
}

fn parse_rfc3339(s: &str) -> Option<Timestamp> {
    humantime::parse_rfc3339_weak(s)
        .ok()
        .map(Timestamp::from_system)
}

/// Something a lease holds, or a node of the reference graph.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Resource {
    Object { key: ObjectKey },
    Blob { digest: String },
}

impl Resource {
    pub fn validate(&self) -> Result<()> {
        match self {
            Resource::Object { key } => key.validate(),
            Resource::Blob { digest } => crate::world::validate_digest(digest),
        }
    }

    /// Columns of `lease_resources`: (rtype, namespace, kind, id).
    pub fn columns(&self) -> (&'static str, &str, &str, &str) {
        match self {
            Resource::Object { key } => ("object", &key.namespace, &key.kind, &key.id),
            Resource::Blob { digest } => ("blob", "", "", digest),
        }
    }

    pub fn from_columns(rtype: &str, namespace: String, kind: String, id: String) -> Result<Self> {
        match rtype {
            "object" => Ok(Resource::Object {
                key: ObjectKey {
                    namespace,
                    kind,
                    id,
                },
            }),
            "blob" => Ok(Resource::Blob { digest: id }),
            other => Err(Error::Backend(format!(
                "unknown lease resource type {other:?} in the store"
            ))),
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Object { key } => write!(f, "object {key}"),
            Resource::Blob { digest } => write!(f, "blob {digest}"),
        }
    }
}

/// A lease: holds objects and blobs alive until deleted or expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    pub labels: Labels,
    /// Holds only the resources themselves, not what they reference.
    pub flat: bool,
    pub expires_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub revision: Revision,
}

impl Lease {
    pub fn alive_at(&self, now: Timestamp) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

/// A kind's collectability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcKind {
    pub kind: String,
    pub collectable: bool,
    pub declared_at: Timestamp,
}

/// A stored blob's metadata (the bytes live in the backend's content store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    pub labels: Labels,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub revision: Revision,
}

/// The change-log namespace of lease changes.
pub const LEASE_CHANGE_NAMESPACE: &str = ".lease";
/// The change-log namespace of blob (content store) changes.
pub const CONTENT_CHANGE_NAMESPACE: &str = ".content";

/// What the mark phase reads: one consistent view of everything that decides liveness.
#[derive(Debug, Clone, Default)]
pub struct GcSnapshot {
    /// The revision the view is at: the sweep protects anything changed after it.
    pub revision: Revision,
    pub kinds: Vec<GcKind>,
    pub leases: Vec<Lease>,
    /// (lease id, resource).
    pub lease_resources: Vec<(String, Resource)>,
    /// Every object: key, revision, and its labels when it has any gc label.
    pub objects: Vec<(ObjectKey, Revision, Option<Labels>)>,
    /// Every blob: digest, revision, labels when it has any gc label.
    pub blobs: Vec<(String, Revision, Option<Labels>)>,
    /// Blobs held by retained deploys (and other World records).
    pub world_blobs: Vec<String>,
    /// What exports hold, with when each export stops holding it.
    pub export_holds: Vec<ExportHold>,
}

/// A resource an export holds (`ExportRecord::holds`): a root while the export lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportHold {
    pub resource: Resource,
    /// The export's TTL deadline (a collection is due then).
    pub expires_at: Option<Timestamp>,
    /// The deadline of the session the export is bound to, as the snapshot read it (renewals
    /// move it, so it is not a collection deadline). A session-bound export whose session is
    /// gone holds nothing and is not in the snapshot.
    pub session_deadline: Option<Timestamp>,
}

impl ExportHold {
    /// Whether the export still holds its resource at `now`.
    pub fn alive_at(&self, now: Timestamp) -> bool {
        self.expires_at.is_none_or(|t| now < t) && self.session_deadline.is_none_or(|t| now < t)
    }
}

/// The snapshot's read of exports that hold something, in both backends' SQL: (meta, TTL
/// deadline, the bound session's deadline); a session-bound export whose session is gone holds
/// nothing.
pub const SNAPSHOT_EXPORT_HOLDS_SQL: &str = "SELECT w.meta, w.expires_at, s.deadline \
     FROM world AS w LEFT JOIN sessions AS s ON s.id = w.session_id \
     WHERE w.space = 'export' AND w.meta IS NOT NULL AND (w.session_id IS NULL OR s.id IS NOT NULL)";

/// The holds of one row of [`SNAPSHOT_EXPORT_HOLDS_SQL`].
pub fn export_holds_of_row(
    meta: &str,
    expires_at: Option<i64>,
    session_deadline: Option<i64>,
) -> impl Iterator<Item = ExportHold> {
    crate::world::ExportMeta::holds_of(Some(meta))
        .into_iter()
        .map(move |resource| ExportHold {
            resource,
            expires_at: expires_at.map(Timestamp),
            session_deadline: session_deadline.map(Timestamp),
        })
}

/// Where a change-log row of a put leads the collector's protection (what changed during a
/// collection, and everything reachable from it, is spared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeStart {
    /// An object or blob itself.
    Node(Resource),
    /// The resources of this lease.
    Lease(String),
    /// What the export at this World key holds.
    Export(String),
    /// Nothing the collector removes.
    None,
}

/// What a change-log row `(namespace, kind, id)` of a put protects.
pub fn change_start(namespace: String, kind: String, id: String) -> ChangeStart {
    if namespace == LEASE_CHANGE_NAMESPACE {
        ChangeStart::Lease(id)
    } else if namespace == CONTENT_CHANGE_NAMESPACE {
        ChangeStart::Node(Resource::Blob { digest: id })
    } else if namespace == crate::world::Space::Export.change_namespace() {
        ChangeStart::Export(id)
    } else if !namespace.starts_with('.') && !kind.is_empty() {
        ChangeStart::Node(Resource::Object {
            key: ObjectKey {
                namespace,
                kind,
                id,
            },
        })
    } else {
        ChangeStart::None
    }
}

/// The outcome of marking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marked {
    /// Nodes reachable from a root.
    pub live: usize,
    /// Collectable objects nobody needs.
    pub garbage_objects: Vec<ObjectKey>,
    pub garbage_blobs: Vec<String>,
    /// Leases that have expired (the sweep deletes them).
    pub expired_leases: Vec<String>,
    /// The earliest future time at which a lease or a `gc.expire` runs out (a collection should
    /// run then, with no other trigger).
    pub next_deadline: Option<Timestamp>,
}

/// References of a node with these labels in `namespace`.
pub fn references(namespace: &str, labels: &Labels) -> Vec<Resource> {
    reference_labels(labels)
        .map(|(kind, target)| {
            if kind == CONTENT_KIND {
                Resource::Blob {
                    digest: target.to_string(),
                }
            } else {
                Resource::Object {
                    key: ObjectKey {
                        namespace: namespace.to_string(),
                        kind: kind.to_string(),
                        id: target.to_string(),
                    },
                }
            }
        })
        .collect()
}

/// Whether labels make a node a root at `now`; and the `gc.expire` deadline if in the future.
pub fn root_by_labels(labels: &Labels, now: Timestamp) -> (bool, Option<Timestamp>) {
    if labels.contains_key(ROOT_LABEL) {
        return (true, None);
    }
    match labels
        .get(EXPIRE_LABEL)
        .and_then(|v| parse_gc_label(EXPIRE_LABEL, v).ok().flatten())
    {
        Some(GcLabel::Expire(t)) if now < t => (true, Some(t)),
        _ => (false, None),
    }
}

/// The deadline a change-log entry makes a collection due at: a lease put with an expiry, an
/// export put holding resources with a TTL, a blob committed with a `gc.expire` label (past or
/// not: a past one is due now). What another process commits reaches this one's collector this
/// way (its own commits say so at once): an expiring lease written by a short-lived process (a
/// CLI command) must trigger a run in the long-lived ones too. `None` for anything else (an
/// object's `gc.expire` included: objects' entries are not followed, see the store's
/// collector), and for an entry whose value cannot be read (the next mark sees it anyway).
pub fn deadline_of_change(change: &crate::model::Change) -> Option<Timestamp> {
    use crate::model::{ChangeOp, Entity};
    if change.op != ChangeOp::Put {
        return None;
    }
    let value = change.new_value.as_ref()?;
    match change.entity {
        Entity::Lease => value.get("expires_at")?.as_i64().map(Timestamp),
        Entity::Content => {
            let text = value.get("labels")?.get(EXPIRE_LABEL)?.as_str()?;
            match parse_gc_label(EXPIRE_LABEL, text) {
                Ok(Some(GcLabel::Expire(t))) => Some(t),
                _ => None,
            }
        }
        Entity::Export => {
            let holds = value.get("meta")?.get("holds")?.as_array()?;
            if holds.is_empty() {
                return None;
            }
            value.get("expires_at")?.as_i64().map(Timestamp)
        }
        _ => None,
    }
}

/// Whether a change-log entry released what was held while it was alive, so that a collection
/// is due now (no deadline says so): a lease deleted, or a resource removed from it, an export
/// deleted, or replaced by one not holding all it held, while it was alive. A lease or export deleted after
/// its expiry (the collector's and the sweeper's removals) releases nothing its deadline's run
/// did not already free. `false` for anything else, and for an entry whose value cannot be read.
pub fn releases_of_change(change: &crate::model::Change) -> bool {
    use crate::model::{ChangeOp, Entity};
    let Some(old) = change.old_value.as_ref() else {
        return false;
    };
    // Alive when the entry was written: no expiry, or one still ahead (`null`: none).
    let alive = match old.get("expires_at") {
        None | Some(serde_json::Value::Null) => true,
        Some(t) => t.as_i64().is_some_and(|t| change.at.0 < t),
    };
    if !alive {
        return false;
    }
    let holds = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v.get("meta")
            .and_then(|m| m.get("holds"))
            .and_then(|h| h.as_array())
            .cloned()
            .unwrap_or_default()
    };
    match change.entity {
        // Deleted, or a resource removed (a put with the lease before it: `LeaseRemoveResource`;
        // a create or a resource added has none).
        Entity::Lease => true,
        Entity::Export => {
            let held = holds(old);
            if held.is_empty() {
                return false;
            }
            match (change.op, change.new_value.as_ref()) {
                (ChangeOp::Put, Some(new)) => {
                    let still = holds(new);
                    held.iter().any(|h| !still.contains(h))
                }
                _ => true,
            }
        }
        _ => false,
    }
}

/// Nodes of the reference graph, interned to dense integer ids (borrowing the snapshot's text).
/// Objects and blobs of the snapshot come first; then "phantom" nodes: targets of references,
/// lease resources and World blobs that do not exist (they count as marked, like any node).
///
/// The maps hash with foldhash, not std's SipHash: interning a million keys is most of the mark,
/// and the keys are the store's own (no untrusted input chooses them to collide).
#[derive(Default)]
struct Nodes<'a> {
    objects: FastMap<(&'a str, &'a str, &'a str), u32>,
    blobs: FastMap<&'a str, u32>,
    count: u32,
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

impl<'a> Nodes<'a> {
    fn object(&mut self, namespace: &'a str, kind: &'a str, id: &'a str) -> u32 {
        let next = &mut self.count;
        *self
            .objects
            .entry((namespace, kind, id))
            .or_insert_with(|| {
                *next += 1;
                *next - 1
            })
    }

    fn blob(&mut self, digest: &'a str) -> u32 {
        let next = &mut self.count;
        *self.blobs.entry(digest).or_insert_with(|| {
            *next += 1;
            *next - 1
        })
    }

    fn resource(&mut self, r: &'a Resource) -> u32 {
        match r {
            Resource::Object { key } => self.object(&key.namespace, &key.kind, &key.id),
            Resource::Blob { digest } => self.blob(digest),
        }
    }

    /// The node a reference label of a node in `namespace` points at.
    fn target(&mut self, namespace: &'a str, kind: &'a str, target: &'a str) -> u32 {
        if kind == CONTENT_KIND {
            self.blob(target)
        } else {
            self.object(namespace, kind, target)
        }
    }
}

/// Mark from the roots and return what is garbage. Pure: the same snapshot and time always give
/// the same answer.
///
/// Lean for millions of nodes: nodes are interned to integer ids borrowing the snapshot's
/// strings (nothing is cloned but the garbage returned), references are parsed without
/// allocating, the graph is a compressed adjacency array and the marks a bit per node.
pub fn mark(snap: &GcSnapshot, now: Timestamp) -> Marked {
    let collectable: HashSet<&str> = snap
        .kinds
        .iter()
        .filter(|k| k.collectable)
        .map(|k| k.kind.as_str())
        .collect();
    let mut next_deadline: Option<Timestamp> = None;
    let mut deadline = |t: Timestamp| {
        next_deadline = Some(next_deadline.map_or(t, |d: Timestamp| d.min(t)));
    };
    let mut nodes = Nodes {
        objects: FastMap::with_capacity_and_hasher(snap.objects.len(), Default::default()),
        blobs: FastMap::with_capacity_and_hasher(snap.blobs.len(), Default::default()),
        count: 0,
    };
    let object_ids: Vec<u32> = snap
        .objects
        .iter()
        .map(|(k, _, _)| nodes.object(&k.namespace, &k.kind, &k.id))
        .collect();
    let blob_ids: Vec<u32> = snap.blobs.iter().map(|(d, _, _)| nodes.blob(d)).collect();
    // Edges (source, target) and roots.
    let mut edges: Vec<(u32, u32)> = Vec::new();
    let mut stack: Vec<u32> = Vec::new();
    for ((key, _, labels), &node) in snap.objects.iter().zip(&object_ids) {
        let mut root = !collectable.contains(key.kind.as_str());
        if let Some(l) = labels {
            let (r, d) = root_by_labels(l, now);
            root |= r;
            if let Some(d) = d {
                deadline(d);
            }
            for (kind, target) in reference_labels(l) {
                edges.push((node, nodes.target(&key.namespace, kind, target)));
            }
        }
        if root {
            stack.push(node);
        }
    }
    for ((_, _, labels), &node) in snap.blobs.iter().zip(&blob_ids) {
        if let Some(l) = labels {
            let (r, d) = root_by_labels(l, now);
            if let Some(d) = d {
                deadline(d);
            }
            for (kind, target) in reference_labels(l) {
                edges.push((node, nodes.target("", kind, target)));
            }
            if r {
                stack.push(node);
            }
        }
    }
    for d in &snap.world_blobs {
        stack.push(nodes.blob(d));
    }
    for h in &snap.export_holds {
        if h.alive_at(now) {
            if let Some(t) = h.expires_at {
                deadline(t);
            }
            stack.push(nodes.resource(&h.resource));
        }
    }
    let mut expired_leases = Vec::new();
    let mut live_leases: HashMap<&str, bool> = HashMap::new();
    for l in &snap.leases {
        if l.alive_at(now) {
            if let Some(t) = l.expires_at {
                deadline(t);
            }
            live_leases.insert(&l.id, l.flat);
        } else {
            expired_leases.push(l.id.clone());
        }
    }
    // A flat lease keeps the resource itself: marked, but not a root (what it references is
    // followed only if the resource is reachable some other way).
    let mut held: Vec<u32> = Vec::new();
    for (lease, res) in &snap.lease_resources {
        match live_leases.get(lease.as_str()) {
            Some(true) => held.push(nodes.resource(res)),
            Some(false) => stack.push(nodes.resource(res)),
            None => {}
        }
    }
    let n = nodes.count as usize;
    drop(nodes);
    // Compressed adjacency: the targets of node i are targets[start[i]..start[i + 1]].
    let mut start = vec![0u32; n + 1];
    for &(s, _) in &edges {
        start[s as usize + 1] += 1;
    }
    for i in 0..n {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut targets = vec![0u32; edges.len()];
    for &(s, t) in &edges {
        targets[fill[s as usize] as usize] = t;
        fill[s as usize] += 1;
    }
    drop((edges, fill));
    let mut reached = vec![false; n];
    while let Some(v) = stack.pop() {
        let v = v as usize;
        if reached[v] {
            continue;
        }
        reached[v] = true;
        let refs = &targets[start[v] as usize..start[v + 1] as usize];
        stack.extend(refs.iter().filter(|&&t| !reached[t as usize]));
    }
    let mut live = reached;
    for h in held {
        live[h as usize] = true;
    }
    let garbage_objects = snap
        .objects
        .iter()
        .zip(&object_ids)
        .filter(|((k, _, _), &id)| collectable.contains(k.kind.as_str()) && !live[id as usize])
        .map(|((k, _, _), _)| k.clone())
        .collect();
    let garbage_blobs = snap
        .blobs
        .iter()
        .zip(&blob_ids)
        .filter(|(_, &id)| !live[id as usize])
        .map(|((d, _, _), _)| d.clone())
        .collect();
    Marked {
        live: live.iter().filter(|&&m| m).count(),
        garbage_objects,
        garbage_blobs,
        expired_leases,
        next_deadline,
    }
}

/// Statistics of one collection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcStats {
    pub started_at: Timestamp,
    /// Nodes found reachable.
    pub marked: u64,
    pub swept_objects: u64,
    pub swept_blobs: u64,
    pub expired_leases: u64,
    pub bytes_freed: u64,
    /// Candidates spared because they changed (or became referenced) during the collection.
    pub spared: u64,
    /// The whole mark phase, of which `snapshot_ms` reading the snapshot.
    pub mark_ms: f64,
    #[serde(default)]
    pub snapshot_ms: f64,
    pub sweep_ms: f64,
    /// Total time writers waited on the collector's transactions, and the longest single wait.
    pub writers_blocked_ms: f64,
    pub writers_blocked_max_ms: f64,
    /// Orphaned bytes (no metadata) removed.
    pub orphans_removed: u64,
    /// Application collectors that failed this round (skipped).
    pub collector_errors: Vec<String>,
    pub trigger: String,
    /// The revision the mark read the store at, and the earliest deadline it found (a lease's
    /// expiry, a `gc.expire`, an export's TTL): a process starting later learns the deadlines
    /// known then from here, and those written since from the change log after this revision.
    /// (Absent in records of older versions.)
    #[serde(default)]
    pub mark_revision: Option<Revision>,
    #[serde(default)]
    pub next_deadline: Option<Timestamp>,
}

/// Labels with any gc label (the mark phase needs only those).
pub fn has_gc_labels(labels: &BTreeMap<String, String>) -> bool {
    labels.keys().any(|k| k.starts_with(GC_LABEL_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: &str, id: &str) -> ObjectKey {
        ObjectKey::new("ns", kind, id).unwrap()
    }

    /// A change-log entry of `entity` at 1 s with these values (JSON text).
    fn change_of(
        entity: crate::model::Entity,
        op: crate::model::ChangeOp,
        old: Option<String>,
        new: Option<String>,
    ) -> crate::model::Change {
        crate::model::Change {
            revision: Revision(1),
            namespace: String::new(),
            kind: String::new(),
            id: String::new(),
            entity,
            name: String::new(),
            op,
            old_value: old.map(|v| serde_json::from_str(&v).unwrap()),
            new_value: new.map(|v| serde_json::from_str(&v).unwrap()),
            at: Timestamp(1_000_000),
        }
    }

    /// The JSON of a lease as the apply code writes it.
    fn lease_json(expires_at: Option<Timestamp>) -> String {
        serde_json::json!({ "labels": {}, "flat": false, "expires_at": expires_at }).to_string()
    }

    /// What each kind of change-log entry says about when a collection is due, read from the
    /// values the apply code writes (a lease's JSON, an export record).
    #[test]
    fn deadlines_of_changes() {
        use crate::model::{ChangeOp, Entity};
        use crate::world::{Space, WorldRecord};
        let now = Timestamp(1_000_000);
        let at = Timestamp(5_000_000);
        let change = |entity: Entity, op: ChangeOp, value: Option<String>| {
            change_of(entity, op, None, value)
        };
        let lease = lease_json;
        let export = |holds: bool, expires_at: Option<Timestamp>| {
            let mut r = WorldRecord::new(Space::Export, "k", now);
            let holds = match holds {
                true => vec![Resource::Object {
                    key: key("image", "i1"),
                }],
                false => Vec::new(),
            };
            r.meta = Some(serde_json::to_string(&crate::world::ExportMeta { holds }).unwrap());
            r.expires_at = expires_at;
            r.change_json()
        };
        let past = Timestamp(1);
        let labels = crate::apply::labels_json(
            &[(EXPIRE_LABEL.to_string(), at.to_rfc3339())]
                .into_iter()
                .collect(),
        );
        for (c, want) in [
            (
                change(Entity::Lease, ChangeOp::Put, Some(lease(Some(at)))),
                Some(at),
            ),
            // Read late, past its expiry: due now.
            (
                change(Entity::Lease, ChangeOp::Put, Some(lease(Some(past)))),
                Some(past),
            ),
            (
                change(Entity::Lease, ChangeOp::Put, Some(lease(None))),
                None,
            ),
            (change(Entity::Lease, ChangeOp::Delete, None), None),
            (
                change(Entity::Export, ChangeOp::Put, Some(export(true, Some(at)))),
                Some(at),
            ),
            // Holding nothing, its TTL frees nothing.
            (
                change(Entity::Export, ChangeOp::Put, Some(export(false, Some(at)))),
                None,
            ),
            (
                change(Entity::Export, ChangeOp::Put, Some(export(true, None))),
                None,
            ),
            // A blob's gc.expire (the blob's change value: size and labels).
            (
                change(Entity::Content, ChangeOp::Put, Some(labels.clone())),
                Some(at),
            ),
            (
                change(
                    Entity::Content,
                    ChangeOp::Put,
                    Some(r#"{"size": 3, "labels": {"a": "b"}}"#.into()),
                ),
                None,
            ),
            // Unreadable: no deadline (the next mark decides), no panic.
            (
                change(
                    Entity::Content,
                    ChangeOp::Put,
                    Some(format!(r#"{{"labels": {{"{EXPIRE_LABEL}": "soon"}}}}"#)),
                ),
                None,
            ),
            (
                change(
                    Entity::Content,
                    ChangeOp::Put,
                    Some(format!(r#"{{"labels": {{"{EXPIRE_LABEL}": 7}}}}"#)),
                ),
                None,
            ),
            (change(Entity::Content, ChangeOp::Delete, None), None),
            // Objects' entries are not followed (their gc.expire is seen at a mark).
            (change(Entity::Object, ChangeOp::Put, Some(labels)), None),
            (change(Entity::Tag, ChangeOp::Put, Some("1".into())), None),
            (
                change(Entity::Kv, ChangeOp::Put, Some(export(true, Some(at)))),
                None,
            ),
        ] {
            assert_eq!(deadline_of_change(&c), want, "{c:?}");
        }
    }

    /// Which change-log entries release what they held (a collection is due now).
    #[test]
    fn releases_of_changes() {
        use crate::model::{ChangeOp, Entity};
        use crate::world::{Space, WorldRecord};
        let now = Timestamp(1_000_000);
        let later = Timestamp(5_000_000);
        let past = Timestamp(1);
        let change = change_of;
        let lease = lease_json;
        let export = |holds: &[&str], expires_at: Option<Timestamp>| {
            let mut r = WorldRecord::new(Space::Export, "k", now);
            let holds = holds
                .iter()
                .map(|id| Resource::Object {
                    key: key("image", id),
                })
                .collect();
            r.meta = Some(serde_json::to_string(&crate::world::ExportMeta { holds }).unwrap());
            r.expires_at = expires_at;
            r.change_json()
        };
        use ChangeOp::{Delete, Put};
        for (c, want) in [
            // A lease deleted while alive (no expiry, or one ahead): yes; expired: its run did it.
            (change(Entity::Lease, Delete, Some(lease(None)), None), true),
            (
                change(Entity::Lease, Delete, Some(lease(Some(later))), None),
                true,
            ),
            (
                change(Entity::Lease, Delete, Some(lease(Some(past))), None),
                false,
            ),
            (change(Entity::Lease, Put, None, Some(lease(None))), false),
            // A resource removed from a live lease (the lease before and after): yes.
            (
                change(Entity::Lease, Put, Some(lease(None)), Some(lease(None))),
                true,
            ),
            (
                change(
                    Entity::Lease,
                    Put,
                    Some(lease(Some(past))),
                    Some(lease(Some(past))),
                ),
                false,
            ),
            // An export deleted holding something; replaced by one holding less; not so.
            (
                change(Entity::Export, Delete, Some(export(&["i1"], None)), None),
                true,
            ),
            (
                change(
                    Entity::Export,
                    Delete,
                    Some(export(&["i1"], Some(past))),
                    None,
                ),
                false,
            ),
            (
                change(Entity::Export, Delete, Some(export(&[], None)), None),
                false,
            ),
            (
                change(
                    Entity::Export,
                    Put,
                    Some(export(&["i1", "i2"], None)),
                    Some(export(&["i2"], None)),
                ),
                true,
            ),
            (
                change(
                    Entity::Export,
                    Put,
                    Some(export(&["i1"], None)),
                    Some(export(&["i1", "i2"], None)),
                ),
                false,
            ),
            (
                change(Entity::Export, Put, None, Some(export(&["i1"], None))),
                false,
            ),
            // Unreadable or other entries: no.
            (
                change(
                    Entity::Lease,
                    Delete,
                    Some(r#"{"expires_at": "x"}"#.into()),
                    None,
                ),
                false,
            ),
            (
                change(Entity::Export, Delete, Some(r#"{"meta": 3}"#.into()), None),
                false,
            ),
            (
                change(
                    Entity::Object,
                    Delete,
                    Some(r#"{"labels": {}}"#.into()),
                    None,
                ),
                false,
            ),
        ] {
            assert_eq!(releases_of_change(&c), want, "{c:?}");
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn gc_labels_parse_and_reject_malformed() {
        assert_eq!(
            parse_gc_label("fleetdb.io/gc.ref.image", "i1").unwrap(),
            Some(GcLabel::Ref {
                kind: "image".into(),
                target: "i1".into()
            })
        );
        assert!(matches!(
            parse_gc_label("fleetdb.io/gc.ref.snapshot.overlay", "s1").unwrap(),
            Some(GcLabel::Ref { kind, .. }) if kind == "snapshot"
        ));
        assert!(parse_gc_label("fleetdb.io/gc.ref.layer/0", "l0").is_ok());
        assert!(parse_gc_label("fleetdb.io/gc.ref.content", "sha256:00").is_err());
        assert!(parse_gc_label("fleetdb.io/gc.ref.image", "bad id!").is_err());
        assert!(parse_gc_label("fleetdb.io/gc.expire", "tomorrow").is_err());
        assert!(parse_gc_label("fleetdb.io/gc.bogus", "x").is_err());
        assert!(parse_gc_label("fleetdb.io/gc.ref.", "x").is_err());
        assert_eq!(parse_gc_label("team", "x").unwrap(), None);
        assert!(matches!(
            parse_gc_label(EXPIRE_LABEL, "2026-01-01T00:00:00Z").unwrap(),
            Some(GcLabel::Expire(_))
        ));
    }

    #[test]
    fn mark_follows_chains_and_cycles_and_respects_flat_leases() {
        let kinds = ["a", "b"]
            .iter()
            .map(|k| GcKind {
                kind: k.to_string(),
                collectable: true,
                declared_at: Timestamp::EPOCH,
            })
            .collect();
        let obj = |kind: &str, id: &str, l: &[(&str, &str)]| {
            (
                key(kind, id),
                Revision(1),
                Some(labels(l)).filter(|l| !l.is_empty()),
            )
        };
        let snap = GcSnapshot {
            revision: Revision(10),
            kinds,
            leases: vec![
                Lease {
                    id: "deep".into(),
                    labels: Labels::new(),
                    flat: false,
                    expires_at: None,
                    created_at: Timestamp::EPOCH,
                    revision: Revision(1),
                },
                Lease {
                    id: "flat".into(),
                    labels: Labels::new(),
                    flat: true,
                    expires_at: None,
                    created_at: Timestamp::EPOCH,
                    revision: Revision(1),
                },
            ],
            lease_resources: vec![
                ("deep".into(), Resource::Object { key: key("a", "1") }),
                ("flat".into(), Resource::Object { key: key("a", "x") }),
            ],
            objects: vec![
                obj("a", "1", &[("fleetdb.io/gc.ref.b", "2")]),
                obj("b", "2", &[("fleetdb.io/gc.ref.a", "3")]),
                obj("a", "3", &[("fleetdb.io/gc.ref.b", "2")]), // cycle back
                obj("a", "x", &[("fleetdb.io/gc.ref.b", "y")]),
                obj("b", "y", &[]), // only via a flat lease: garbage
                obj("a", "c1", &[("fleetdb.io/gc.ref.a", "c2")]), // unreachable cycle
                obj("a", "c2", &[("fleetdb.io/gc.ref.a", "c1")]),
                obj("machine", "m", &[("fleetdb.io/gc.ref.b", "z")]), // not collectable: a root
                obj("b", "z", &[]),
                obj("b", "r", &[("fleetdb.io/gc.root", "true")]),
            ],
            blobs: vec![],
            world_blobs: vec![],
            export_holds: vec![],
        };
        let m = mark(&snap, Timestamp::EPOCH);
        let mut g: Vec<String> = m.garbage_objects.iter().map(|k| k.id.clone()).collect();
        g.sort();
        assert_eq!(g, ["c1", "c2", "y"]);
    }

    /// The simple reference the lean [`mark`] is checked against: Resources in hash maps,
    /// labels parsed with [`parse_gc_label`].
    fn mark_reference(snap: &GcSnapshot, now: Timestamp) -> Marked {
        let collectable: HashSet<&str> = snap
            .kinds
            .iter()
            .filter(|k| k.collectable)
            .map(|k| k.kind.as_str())
            .collect();
        let mut next_deadline: Option<Timestamp> = None;
        let mut deadline = |t: Timestamp| {
            next_deadline = Some(next_deadline.map_or(t, |d: Timestamp| d.min(t)));
        };
        let refs_of = |ns: &str, l: &Labels| -> Vec<Resource> {
            l.iter()
                .filter_map(|(k, v)| match parse_gc_label(k, v) {
                    Ok(Some(GcLabel::Ref { kind, target })) => Some(if kind == CONTENT_KIND {
                        Resource::Blob { digest: target }
                    } else {
                        Resource::Object {
                            key: ObjectKey {
                                namespace: ns.to_string(),
                                kind,
                                id: target,
                            },
                        }
                    }),
                    _ => None,
                })
                .collect()
        };
        let mut edges: HashMap<Resource, Vec<Resource>> = HashMap::new();
        let mut stack: Vec<Resource> = Vec::new();
        for (key, _, labels) in &snap.objects {
            let node = Resource::Object { key: key.clone() };
            let mut root = !collectable.contains(key.kind.as_str());
            if let Some(l) = labels {
                let (r, d) = root_by_labels(l, now);
                root |= r;
                if let Some(d) = d {
                    deadline(d);
                }
                edges
                    .entry(node.clone())
                    .or_default()
                    .extend(refs_of(&key.namespace, l));
            }
            if root {
                stack.push(node);
            }
        }
        for (digest, _, labels) in &snap.blobs {
            if let Some(l) = labels {
                let node = Resource::Blob {
                    digest: digest.clone(),
                };
                let (r, d) = root_by_labels(l, now);
                if let Some(d) = d {
                    deadline(d);
                }
                edges
                    .entry(node.clone())
                    .or_default()
                    .extend(refs_of("", l));
                if r {
                    stack.push(node);
                }
            }
        }
        for d in &snap.world_blobs {
            stack.push(Resource::Blob { digest: d.clone() });
        }
        for h in &snap.export_holds {
            if h.alive_at(now) {
                if let Some(t) = h.expires_at {
                    deadline(t);
                }
                stack.push(h.resource.clone());
            }
        }
        let mut expired_leases = Vec::new();
        let mut live_leases: HashMap<&str, bool> = HashMap::new();
        for l in &snap.leases {
            if l.alive_at(now) {
                if let Some(t) = l.expires_at {
                    deadline(t);
                }
                live_leases.insert(&l.id, l.flat);
            } else {
                expired_leases.push(l.id.clone());
            }
        }
        let mut held: HashSet<Resource> = HashSet::new();
        for (lease, res) in &snap.lease_resources {
            match live_leases.get(lease.as_str()) {
                Some(true) => {
                    held.insert(res.clone());
                }
                Some(false) => stack.push(res.clone()),
                None => {}
            }
        }
        let mut marked: HashSet<Resource> = HashSet::new();
        while let Some(n) = stack.pop() {
            if !marked.insert(n.clone()) {
                continue;
            }
            if let Some(refs) = edges.get(&n) {
                stack.extend(refs.iter().filter(|r| !marked.contains(*r)).cloned());
            }
        }
        marked.extend(held);
        Marked {
            live: marked.len(),
            garbage_objects: snap
                .objects
                .iter()
                .filter(|(k, _, _)| collectable.contains(k.kind.as_str()))
                .filter(|(k, _, _)| !marked.contains(&Resource::Object { key: k.clone() }))
                .map(|(k, _, _)| k.clone())
                .collect(),
            garbage_blobs: snap
                .blobs
                .iter()
                .filter(|(d, _, _)| !marked.contains(&Resource::Blob { digest: d.clone() }))
                .map(|(d, _, _)| d.clone())
                .collect(),
            expired_leases,
            next_deadline,
        }
    }

    fn dg(i: u8) -> String {
        format!("sha256:{:064x}", i)
    }

    /// A gc label for a random snapshot: references (to objects, blobs, nothing that exists,
    /// malformed), roots and expiries (past and future).
    fn arb_label() -> impl proptest::strategy::Strategy<Value = (String, String)> {
        use proptest::prelude::*;
        prop_oneof![
            (0..4u8, 0..6u8, 0..3u8).prop_map(|(k, i, s)| {
                let kind = ["a", "b", "m", "x"][k as usize];
                let key = match s {
                    0 => format!("{REF_PREFIX}{kind}"),
                    1 => format!("{REF_PREFIX}{kind}.s{i}"),
                    _ => format!("{REF_PREFIX}{kind}/p/{i}"),
                };
                (key, format!("o{i}"))
            }),
            (0..5u8, 0..2u8).prop_map(|(i, s)| (
                if s == 0 {
                    format!("{REF_PREFIX}content")
                } else {
                    format!("{REF_PREFIX}content.c{i}")
                },
                dg(i)
            )),
            Just((format!("{REF_PREFIX}a"), "bad id!".to_string())),
            Just((ROOT_LABEL.to_string(), "true".to_string())),
            (0..3i64).prop_map(|d| (
                EXPIRE_LABEL.to_string(),
                format!("2026-01-0{}T00:00:00Z", d + 1)
            )),
            Just(("team".to_string(), "infra".to_string())),
        ]
    }

    fn arb_snapshot() -> impl proptest::strategy::Strategy<Value = GcSnapshot> {
        use proptest::collection::{btree_set, vec};
        use proptest::prelude::*;
        let labels = || vec(arb_label(), 0..4).prop_map(|v| v.into_iter().collect::<Labels>());
        let objects = btree_set((0..2u8, 0..4u8, 0..6u8), 0..30).prop_flat_map(move |keys| {
            let n = keys.len();
            (Just(keys), vec(labels(), n))
        });
        let blobs = btree_set(0..5u8, 0..5).prop_flat_map(move |d| {
            let n = d.len();
            (Just(d), vec(labels(), n))
        });
        let resource = (0..3u8, 0..2u8, 0..4u8, 0..6u8).prop_map(|(t, ns, k, i)| {
            if t == 0 {
                Resource::Blob { digest: dg(i % 5) }
            } else {
                Resource::Object {
                    key: ObjectKey::new(
                        format!("n{ns}"),
                        ["a", "b", "m", "x"][k as usize],
                        format!("o{i}"),
                    )
                    .unwrap(),
                }
            }
        });
        (
            vec(any::<bool>(), 4),
            objects,
            blobs,
            vec((any::<bool>(), 0..3u8), 0..4),
            vec((0..5u8, resource.clone()), 0..8),
            vec(0..6u8, 0..2),
            vec((resource, 0..4u8, 0..4u8), 0..4),
        )
            .prop_map(
                |(coll, (keys, ls), (digests, bls), leases, res, world, exports)| {
                    // Export and session deadlines: none, or on day 1, 2 or 3.
                    let day = |d: u8| {
                        (d > 0).then(|| parse_rfc3339(&format!("2026-01-0{d}T06:00:00Z")).unwrap())
                    };
                    GcSnapshot {
                        revision: Revision(1),
                        kinds: ["a", "b", "m", "x"]
                            .iter()
                            .zip(coll)
                            .map(|(k, c)| GcKind {
                                kind: k.to_string(),
                                collectable: c,
                                declared_at: Timestamp::EPOCH,
                            })
                            .collect(),
                        leases: leases
                            .iter()
                            .enumerate()
                            .map(|(i, &(flat, e))| Lease {
                                id: format!("l{i}"),
                                labels: Labels::new(),
                                flat,
                                expires_at: match e {
                                    0 => None,
                                    1 => Some(Timestamp(0)),
                                    _ => Some(parse_rfc3339("2026-01-03T00:00:00Z").unwrap()),
                                },
                                created_at: Timestamp::EPOCH,
                                revision: Revision(1),
                            })
                            .collect(),
                        lease_resources: res
                            .into_iter()
                            .map(|(l, r)| (format!("l{l}"), r))
                            .collect(),
                        objects: keys
                            .into_iter()
                            .zip(ls)
                            .map(|((ns, k, i), l)| {
                                (
                                    ObjectKey::new(
                                        format!("n{ns}"),
                                        ["a", "b", "m", "x"][k as usize],
                                        format!("o{i}"),
                                    )
                                    .unwrap(),
                                    Revision(1),
                                    has_gc_labels(&l).then_some(l),
                                )
                            })
                            .collect(),
                        blobs: digests
                            .into_iter()
                            .zip(bls)
                            .map(|(d, l)| (dg(d), Revision(1), has_gc_labels(&l).then_some(l)))
                            .collect(),
                        world_blobs: world.into_iter().map(dg).collect(),
                        export_holds: exports
                            .into_iter()
                            .map(|(resource, e, d)| ExportHold {
                                resource,
                                expires_at: day(e),
                                session_deadline: day(d),
                            })
                            .collect(),
                    }
                },
            )
    }

    proptest::proptest! {
        #[test]
        fn lean_mark_agrees_with_the_reference(snap in arb_snapshot(), day in 0..4i64) {
            let now = parse_rfc3339("2026-01-01T12:00:00Z").unwrap();
            let now = Timestamp(now.0 + (day - 1) * 86_400_000_000);
            proptest::prop_assert_eq!(mark(&snap, now), mark_reference(&snap, now));
        }
    }

    #[test]
    fn a_flat_lease_does_not_stop_a_root_s_references_being_followed() {
        let snap = GcSnapshot {
            kinds: vec![GcKind {
                kind: "b".into(),
                collectable: true,
                declared_at: Timestamp::EPOCH,
            }],
            leases: vec![Lease {
                id: "flat".into(),
                labels: Labels::new(),
                flat: true,
                expires_at: None,
                created_at: Timestamp::EPOCH,
                revision: Revision(1),
            }],
            lease_resources: vec![(
                "flat".into(),
                Resource::Object {
                    key: key("machine", "m"),
                },
            )],
            objects: vec![
                (
                    key("machine", "m"),
                    Revision(1),
                    Some(labels(&[("fleetdb.io/gc.ref.b", "z")])),
                ),
                (key("b", "z"), Revision(1), None),
            ],
            ..Default::default()
        };
        let m = mark(&snap, Timestamp::EPOCH);
        assert!(m.garbage_objects.is_empty(), "{m:?}");
        assert_eq!(m.live, 2);
    }

    #[test]
    fn expiry_is_a_root_until_then_and_sets_the_deadline() {
        let snap = GcSnapshot {
            kinds: vec![GcKind {
                kind: "a".into(),
                collectable: true,
                declared_at: Timestamp::EPOCH,
            }],
            objects: vec![(
                key("a", "1"),
                Revision(1),
                Some(labels(&[(EXPIRE_LABEL, "2026-01-01T00:00:00Z")])),
            )],
            ..Default::default()
        };
        let t = parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let before = mark(&snap, Timestamp(t.0 - 1));
        assert!(before.garbage_objects.is_empty());
        assert_eq!(before.next_deadline, Some(t));
        assert_eq!(mark(&snap, t).garbage_objects.len(), 1);
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// The mark over the benchmark's shape (run with `--release --ignored --nocapture`).
    #[test]
    #[ignore]
    fn mark_a_million_nodes() {
        let chains = 200_000;
        let mut snap = GcSnapshot {
            kinds: ["image", "layer"]
                .iter()
                .map(|k| GcKind {
                    kind: k.to_string(),
                    collectable: true,
                    declared_at: Timestamp::EPOCH,
                })
                .collect(),
            ..Default::default()
        };
        let r = |k: &str, v: String| -> Option<Labels> {
            Some([(format!("{REF_PREFIX}{k}"), v)].into_iter().collect())
        };
        for c in 0..chains {
            let d = format!("sha256:{c:064x}");
            for (kind, id, l) in [
                ("image", format!("i{c}"), r("layer", format!("a{c}"))),
                ("layer", format!("a{c}"), r("layer", format!("b{c}"))),
                ("layer", format!("b{c}"), r("layer", format!("d{c}"))),
                ("layer", format!("d{c}"), r("content", d.clone())),
            ] {
                snap.objects.push((
                    ObjectKey::new("default", kind, &id).unwrap(),
                    Revision(0),
                    l,
                ));
            }
            snap.blobs.push((d, Revision(0), None));
            if c < chains * 9 / 10 {
                snap.lease_resources.push((
                    format!("l{}", c % 10_000),
                    Resource::Object {
                        key: ObjectKey::new("default", "image", format!("i{c}")).unwrap(),
                    },
                ));
            }
        }
        for i in 0..10_000 {
            snap.leases.push(Lease {
                id: format!("l{i}"),
                labels: Labels::new(),
                flat: false,
                expires_at: None,
                created_at: Timestamp::EPOCH,
                revision: Revision(0),
            });
        }
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let m = mark(&snap, Timestamp::EPOCH);
            eprintln!("mark: {:?} ({} live)", t.elapsed(), m.live);
            assert_eq!(m.garbage_objects.len(), 80_000);
        }
    }
}
