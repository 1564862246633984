//! The data model: namespaces, objects, tags, revisions and change-log entries.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::time::Timestamp;
use crate::validate;

/// A global, strictly increasing number given to every mutation. `Revision(0)` is "before
/// anything": a store that has never been written to is at revision 0.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Revision(pub i64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The namespace that always exists.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Labels: key → value, ordered by key.
pub type Labels = BTreeMap<String, String>;

/// Identifies an object: (namespace, kind, id). Constructed only through [`ObjectKey::new`], which
/// validates all three parts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub kind: String,
    pub id: String,
}

impl ObjectKey {
    pub fn new(
        namespace: impl Into<String>,
        kind: impl Into<String>,
        id: impl Into<String>,
    ) -> Result<Self> {
        let key = ObjectKey {
            namespace: namespace.into(),
            kind: kind.into(),
            id: id.into(),
        };
        key.validate()?;
        Ok(key)
    }

    /// Re-check a key that may have been built field by field (e.g. deserialized from a request).
    pub fn validate(&self) -> Result<()> {
        validate::name("namespace", &self.namespace)?;
        validate::name("kind", &self.kind)?;
        validate::name("id", &self.id)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.kind, self.id)
    }
}

/// A namespace and its labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Revision of the last change to the namespace itself.
    pub revision: Revision,
}

/// An object: a machine, a switch, anything with an identity, labels and tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub key: ObjectKey,
    pub labels: Labels,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Revision of the last change to the object itself (its labels). Tags carry their own.
    pub revision: Revision,
}

/// A tag: a named, typed fact about an object, as a JSON value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub object: ObjectKey,
    pub name: String,
    pub value: serde_json::Value,
    pub updated_at: Timestamp,
    pub revision: Revision,
}

/// What a change-log entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    Namespace,
    Object,
    Tag,
    /// World data: one entity per [`crate::world::Space`].
    Export,
    Kv,
    Map,
    Deploy,
    Blob,
    Registration,
    Schedule,
    /// A session joining or leaving (membership).
    Member,
    /// A lease (garbage collection).
    Lease,
    /// A content-store blob's metadata.
    Content,
}

impl From<crate::world::Space> for Entity {
    fn from(s: crate::world::Space) -> Self {
        use crate::world::Space;
        match s {
            Space::Export => Entity::Export,
            Space::Kv => Entity::Kv,
            Space::Map => Entity::Map,
            Space::Deploy => Entity::Deploy,
            Space::Blob => Entity::Blob,
            Space::Registration => Entity::Registration,
            Space::Schedule => Entity::Schedule,
        }
    }
}

impl Entity {
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Namespace => "namespace",
            Entity::Object => "object",
            Entity::Tag => "tag",
            Entity::Export => "export",
            Entity::Kv => "kv",
            Entity::Map => "map",
            Entity::Deploy => "deploy",
            Entity::Blob => "blob",
            Entity::Registration => "registration",
            Entity::Schedule => "schedule",
            Entity::Member => "member",
            Entity::Lease => "lease",
            Entity::Content => "content",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "namespace" => Ok(Entity::Namespace),
            "object" => Ok(Entity::Object),
            "tag" => Ok(Entity::Tag),
            "export" => Ok(Entity::Export),
            "kv" => Ok(Entity::Kv),
            "map" => Ok(Entity::Map),
            "deploy" => Ok(Entity::Deploy),
            "blob" => Ok(Entity::Blob),
            "registration" => Ok(Entity::Registration),
            "schedule" => Ok(Entity::Schedule),
            "member" => Ok(Entity::Member),
            "lease" => Ok(Entity::Lease),
            "content" => Ok(Entity::Content),
            other => Err(Error::Backend(format!(
                "unknown change entity {other:?} in the change log"
            ))),
        }
    }
}

/// Whether a change created/updated or removed its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    Put,
    Delete,
}

impl ChangeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Put => "put",
            ChangeOp::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "put" => Ok(ChangeOp::Put),
            "delete" => Ok(ChangeOp::Delete),
            other => Err(Error::Backend(format!(
                "unknown change op {other:?} in the change log"
            ))),
        }
    }
}

/// One row of the change log. For a namespace, `kind` and `id` are empty; `name` is the tag name
/// for tag changes and empty otherwise. Values are JSON: an object's `{"labels":{…}}`, a
/// namespace's `{"labels":{…}}`, a tag's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub revision: Revision,
    pub namespace: String,
    pub kind: String,
    pub id: String,
    pub entity: Entity,
    pub name: String,
    pub op: ChangeOp,
    pub old_value: Option<serde_json::Value>,
    pub new_value: Option<serde_json::Value>,
    pub at: Timestamp,
}

/// Which changes to read: after a revision, optionally narrowed to a namespace, a kind and an id
/// prefix. Each narrowing maps to an index range in every backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeFilter {
    pub namespace: Option<String>,
    pub kind: Option<String>,
    pub id_prefix: Option<String>,
}

impl ChangeFilter {
    pub fn validate(&self) -> Result<()> {
        if let Some(ns) = &self.namespace {
            validate::name("namespace", ns)?;
        }
        if let Some(k) = &self.kind {
            if self.namespace.is_none() {
                return Err(Error::invalid(
                    "kind",
                    k,
                    "a kind filter needs a namespace filter",
                ));
            }
            validate::name("kind", k)?;
        }
        if let Some(p) = &self.id_prefix {
            if self.kind.is_none() {
                return Err(Error::invalid(
                    "id prefix",
                    p,
                    "an id prefix filter needs a kind filter",
                ));
            }
            if p.len() > validate::NAME_BYTES_MAX {
                return Err(Error::invalid("id prefix", p, "longer than any id"));
            }
            if p.contains('\0') {
                return Err(Error::invalid(
                    "id prefix",
                    p,
                    "must not contain NUL characters",
                ));
            }
        }
        Ok(())
    }

    /// Whether a change passes this filter (used by in-memory consumers and tests).
    pub fn matches(&self, c: &Change) -> bool {
        self.namespace.as_ref().is_none_or(|n| *n == c.namespace)
            && self.kind.as_ref().is_none_or(|k| *k == c.kind)
            && self
                .id_prefix
                .as_ref()
                .is_none_or(|p| c.id.starts_with(p.as_str()))
    }
}

/// One page of results and the cursor for the next page (`None` at the end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}
