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

/// Parse a label under [`GC_LABEL_PREFIX`]. `Ok(None)` for labels outside it; `Invalid` for a
/// malformed gc label (rejected when written).
pub fn parse_gc_label(key: &str, value: &str) -> Result<Option<GcLabel>> {
    if !key.starts_with(GC_LABEL_PREFIX) {
        return Ok(None);
    }
    let bad = |rule: &str| Err(Error::invalid(format!("label {key:?}"), value, rule));
    if key == ROOT_LABEL {
        return Ok(Some(GcLabel::Root));
    }
    if key == EXPIRE_LABEL {
        return match parse_rfc3339(value) {
            Some(t) => Ok(Some(GcLabel::Expire(t))),
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
    Ok(Some(GcLabel::Ref {
        kind: kind.to_string(),
        target: value.to_string(),
    }))
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
    labels
        .iter()
        .filter_map(|(k, v)| match parse_gc_label(k, v) {
            Ok(Some(GcLabel::Ref { kind, target })) => Some(if kind == CONTENT_KIND {
                Resource::Blob { digest: target }
            } else {
                Resource::Object {
                    key: ObjectKey {
                        namespace: namespace.to_string(),
                        kind,
                        id: target,
                    },
                }
            }),
            _ => None,
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

/// Mark from the roots and return what is garbage. Pure: the same snapshot and time always give
/// the same answer.
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
    // Adjacency: node -> references.
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
            let refs = references(&key.namespace, l);
            if !refs.is_empty() {
                edges.insert(node.clone(), refs);
            }
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
            let refs = references("", l);
            if !refs.is_empty() {
                edges.insert(node.clone(), refs);
            }
            if r {
                stack.push(node);
            }
        }
    }
    for d in &snap.world_blobs {
        stack.push(Resource::Blob { digest: d.clone() });
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
    let mut marked: HashSet<Resource> = HashSet::new();
    for (lease, res) in &snap.lease_resources {
        match live_leases.get(lease.as_str()) {
            Some(true) => {
                marked.insert(res.clone()); // flat: the resource only
            }
            Some(false) => stack.push(res.clone()),
            None => {}
        }
    }
    while let Some(n) = stack.pop() {
        if !marked.insert(n.clone()) {
            continue;
        }
        if let Some(refs) = edges.get(&n) {
            stack.extend(refs.iter().filter(|r| !marked.contains(*r)).cloned());
        }
    }
    let garbage_objects = snap
        .objects
        .iter()
        .filter(|(k, _, _)| collectable.contains(k.kind.as_str()))
        .filter(|(k, _, _)| !marked.contains(&Resource::Object { key: k.clone() }))
        .map(|(k, _, _)| k.clone())
        .collect();
    let garbage_blobs = snap
        .blobs
        .iter()
        .filter(|(d, _, _)| !marked.contains(&Resource::Blob { digest: d.clone() }))
        .map(|(d, _, _)| d.clone())
        .collect();
    Marked {
        live: marked.len(),
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
    pub mark_ms: f64,
    pub sweep_ms: f64,
    /// Total time writers waited on the collector's transactions, and the longest single wait.
    pub writers_blocked_ms: f64,
    pub writers_blocked_max_ms: f64,
    /// Orphaned bytes (no metadata) removed.
    pub orphans_removed: u64,
    /// Application collectors that failed this round (skipped).
    pub collector_errors: Vec<String>,
    pub trigger: String,
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
        };
        let m = mark(&snap, Timestamp::EPOCH);
        let mut g: Vec<String> = m.garbage_objects.iter().map(|k| k.id.clone()).collect();
        g.sort();
        assert_eq!(g, ["c1", "c2", "y"]);
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
