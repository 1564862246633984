//! The World: data that hosts of a control plane share with each other (mgmt's World, with its
//! gaps closed). Exported resources, a key-value space, per-host string maps, chained deploys
//! with content-addressed file trees, and a scheduler that places hosts into namespaces.
//!
//! Every kind of World data is a [`WorldRecord`] in ONE table, told apart by its [`Space`]; each
//! space fills the generic columns (scope, owner, kind, name, target) its own way, documented on
//! [`Space`]. Every World write appends a change-log row whose `namespace` is the space's
//! reserved marker (`.kv`, `.export`, … — user namespaces cannot start with `.`), so watches,
//! resume and compaction work for World data exactly as for objects.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gc::Resource;
use crate::model::{Change, Revision};
use crate::selector::{Dialect, SqlParam};
use crate::time::Timestamp;
use crate::validate;

/// Largest export data, in bytes.
pub const EXPORT_DATA_BYTES_MAX: usize = 1 << 20;
/// Records in one export call.
pub const EXPORTS_PER_CALL_MAX: usize = 10_000;
/// Objects and blobs one export may hold alive (garbage-collection roots while it lives).
pub const EXPORT_HOLDS_MAX: usize = 64;
/// Largest key-value key, in bytes.
pub const KV_KEY_BYTES_MAX: usize = 512;
/// Largest key-value value, in bytes.
pub const KV_VALUE_BYTES_MAX: usize = 1 << 20;
/// Largest per-host map value, in bytes.
pub const MAP_VALUE_BYTES_MAX: usize = 64 << 10;
/// Largest deploy payload, in bytes.
pub const DEPLOY_PAYLOAD_BYTES_MAX: usize = 16 << 20;
/// Largest deploy hash text, in bytes.
pub const DEPLOY_HASH_BYTES_MAX: usize = 256;
/// Files in one deploy tree.
pub const DEPLOY_FILES_MAX: usize = 10_000;
/// All file contents of one deploy tree together, in bytes.
pub const DEPLOY_TREE_BYTES_MAX: usize = 64 << 20;
/// Longest file path in a deploy tree, in bytes.
pub const DEPLOY_PATH_BYTES_MAX: usize = 4096;
/// Hosts that may register for one scheduler namespace.
pub const SCHEDULE_HOSTS_MAX: usize = 10_000;
/// Longest TTL of an export or key (a week).
pub const TTL_MAX_MS: u64 = 7 * 24 * 3600 * 1000;

/// The target of an export meant for every host.
pub const EVERY_HOST: &str = "*";

/// Which kind of World data a record is. How each space fills the generic columns:
///
/// | space | key | scope | owner | kind | name | target | data | meta |
/// |---|---|---|---|---|---|---|---|---|
/// | export | `owner/kind/name/target` | | exporting host | export kind | export name | host or `*` | bytes | |
/// | kv | the key | | | | | | UTF-8 value | |
/// | map | `namespace/host` | map namespace | host | | | | UTF-8 value | |
/// | deploy | id, 20 digits | | | | | | payload | [`DeployMeta`] |
/// | blob | `sha256:<hex>` | | | | | | content | |
/// | registration | `namespace/host` | scheduler namespace | host | | | | | [`ScheduleOptions`] |
/// | schedule | namespace | namespace | | | | | | [`Schedule`] |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    Export,
    Kv,
    Map,
    Deploy,
    Blob,
    Registration,
    Schedule,
}

impl Space {
    pub const ALL: [Space; 7] = [
        Space::Export,
        Space::Kv,
        Space::Map,
        Space::Deploy,
        Space::Blob,
        Space::Registration,
        Space::Schedule,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Space::Export => "export",
            Space::Kv => "kv",
            Space::Map => "map",
            Space::Deploy => "deploy",
            Space::Blob => "blob",
            Space::Registration => "registration",
            Space::Schedule => "schedule",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Space::ALL
            .into_iter()
            .find(|sp| sp.as_str() == s)
            .ok_or_else(|| Error::Backend(format!("unknown World space {s:?} in the store")))
    }

    /// The change-log `namespace` of this space's changes (never a valid user namespace).
    pub fn change_namespace(self) -> &'static str {
        match self {
            Space::Export => ".export",
            Space::Kv => ".kv",
            Space::Map => ".map",
            Space::Deploy => ".deploy",
            Space::Blob => ".blob",
            Space::Registration => ".registration",
            Space::Schedule => ".schedule",
        }
    }
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The change-log namespace of session (membership) changes.
pub const MEMBER_CHANGE_NAMESPACE: &str = ".member";

/// One stored World record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldRecord {
    pub space: Space,
    pub key: String,
    pub scope: String,
    pub owner: String,
    pub kind: String,
    pub name: String,
    pub target: String,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// Canonical JSON text, for spaces with structured metadata.
    pub meta: Option<String>,
    /// The record goes when this session ends (closes or expires).
    pub session_id: Option<String>,
    /// The record goes at this time.
    pub expires_at: Option<Timestamp>,
    /// Revision that created the record (kept across updates).
    pub create_revision: Revision,
    /// Revision of the last change.
    pub revision: Revision,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl WorldRecord {
    /// A new record of `space` at `key` with every other column empty.
    pub fn new(space: Space, key: impl Into<String>, now: Timestamp) -> Self {
        WorldRecord {
            space,
            key: key.into(),
            scope: String::new(),
            owner: String::new(),
            kind: String::new(),
            name: String::new(),
            target: String::new(),
            data: Vec::new(),
            meta: None,
            session_id: None,
            expires_at: None,
            create_revision: Revision(0),
            revision: Revision(0),
            created_at: now,
            updated_at: now,
        }
    }

    /// Whether the record is in force at `now` by its own expiry (session liveness is checked by
    /// the store, which knows the sessions).
    pub fn unexpired_at(&self, now: Timestamp) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }

    /// The value as text (kv and map records hold UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// The JSON the change log holds for this record (data as UTF-8 text for kv and map, base64
    /// otherwise).
    pub fn change_json(&self) -> String {
        let mut v = serde_json::Map::new();
        match self.space {
            Space::Kv | Space::Map => {
                v.insert("value".into(), self.text().into());
            }
            Space::Blob => {
                v.insert("size".into(), (self.data.len() as u64).into());
            }
            Space::Export | Space::Deploy => {
                v.insert(
                    "data".into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(&self.data)
                        .into(),
                );
            }
            Space::Registration | Space::Schedule => {}
        }
        if let Some(meta) = &self.meta {
            if let Ok(m) = serde_json::from_str::<serde_json::Value>(meta) {
                v.insert("meta".into(), m);
            }
        }
        for (k, val) in [
            ("scope", &self.scope),
            ("owner", &self.owner),
            ("kind", &self.kind),
            ("name", &self.name),
            ("target", &self.target),
        ] {
            if !val.is_empty() {
                v.insert(k.into(), val.clone().into());
            }
        }
        if let Some(s) = &self.session_id {
            v.insert("session_id".into(), s.clone().into());
        }
        if let Some(t) = self.expires_at {
            v.insert("expires_at".into(), t.as_micros().into());
        }
        serde_json::Value::Object(v).to_string()
    }
}

/// Serde helper: bytes as base64 text.
pub mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// How long a record lives: until deleted (the default), until a session ends, until a time, or
/// whichever comes first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifetime {
    /// Bound to this session: removed when it closes or expires. The session must belong to the
    /// writing host.
    pub session_id: Option<String>,
    /// Removed this long after the write.
    pub ttl_ms: Option<u64>,
}

impl Lifetime {
    pub fn persistent() -> Self {
        Lifetime::default()
    }

    pub fn session(id: impl Into<String>) -> Self {
        Lifetime {
            session_id: Some(id.into()),
            ttl_ms: None,
        }
    }

    /// Removed `ttl` after the write, in whole milliseconds rounded UP: a positive TTL under a
    /// millisecond is 1ms (truncated, it was "0ms" and refused), and no TTL is cut short.
    pub fn ttl(ttl: std::time::Duration) -> Self {
        Lifetime {
            session_id: None,
            ttl_ms: Some(ttl.as_nanos().div_ceil(1_000_000).min(u64::MAX as u128) as u64),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(s) = &self.session_id {
            validate::name("session id", s)?;
        }
        if let Some(ms) = self.ttl_ms {
            if ms == 0 || ms > TTL_MAX_MS {
                return Err(Error::invalid(
                    "ttl",
                    format!("{ms}ms"),
                    format!("must be between 1ms and {TTL_MAX_MS}ms (a week)"),
                ));
            }
        }
        Ok(())
    }

    pub fn expires_at(&self, now: Timestamp) -> Option<Timestamp> {
        self.ttl_ms
            .map(|ms| now + std::time::Duration::from_millis(ms))
    }
}

// ---- exports ----

/// Identifies one export of a host: (kind, name, target host or `*`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExportId {
    pub kind: String,
    pub name: String,
    /// The host it is for, or `*` for every host.
    pub to: String,
}

impl ExportId {
    pub fn new(kind: impl Into<String>, name: impl Into<String>, to: impl Into<String>) -> Self {
        ExportId {
            kind: kind.into(),
            name: name.into(),
            to: to.into(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate::name("export kind", &self.kind)?;
        validate::name("export name", &self.name)?;
        if self.to != EVERY_HOST {
            validate::name("target host", &self.to)
                .map_err(|_| Error::invalid("target host", &self.to, "must be a host name or *"))?;
        }
        Ok(())
    }

    /// The record key of this export by `from`.
    pub fn key(&self, from: &str) -> String {
        format!("{from}/{}/{}/{}", self.kind, self.name, self.to)
    }
}

impl fmt::Display for ExportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} to {}", self.kind, self.name, self.to)
    }
}

/// One record to export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    #[serde(flatten)]
    pub id: ExportId,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    #[serde(default)]
    pub lifetime: Lifetime,
    /// Objects and blobs the export holds alive: the collector keeps them (and what they
    /// reference) while the export lives: until it is removed, its TTL passes or its session ends.
    /// Each must exist when the export is written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<Resource>,
}

impl ExportRecord {
    pub fn validate(&self) -> Result<()> {
        self.id.validate()?;
        if self.data.len() > EXPORT_DATA_BYTES_MAX {
            return Err(Error::TooLarge {
                field: format!("export {} data", self.id),
                size: self.data.len(),
                max: EXPORT_DATA_BYTES_MAX,
            });
        }
        if self.holds.len() > EXPORT_HOLDS_MAX {
            return Err(Error::TooLarge {
                field: format!("export {} holds", self.id),
                size: self.holds.len(),
                max: EXPORT_HOLDS_MAX,
            });
        }
        for r in &self.holds {
            r.validate()?;
        }
        self.lifetime.validate()
    }

    /// The stored `meta` of this record: `None` when it holds nothing.
    pub fn meta(&self) -> Option<String> {
        let mut holds = self.holds.clone();
        holds.sort();
        holds.dedup();
        (!holds.is_empty())
            .then(|| serde_json::to_string(&ExportMeta { holds }).expect("export meta serializes"))
    }
}

/// What an export record stores besides its data (the World row's `meta`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportMeta {
    /// Sorted, without duplicates.
    #[serde(default)]
    pub holds: Vec<Resource>,
}

impl ExportMeta {
    /// The holds of a stored export's `meta` (none if absent or unreadable).
    pub fn holds_of(meta: Option<&str>) -> Vec<Resource> {
        meta.and_then(|m| serde_json::from_str::<ExportMeta>(m).ok())
            .map(|m| m.holds)
            .unwrap_or_default()
    }
}

/// An export as a host sees it when collecting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// The exporting host.
    pub from: String,
    #[serde(flatten)]
    pub id: ExportId,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    pub session_id: Option<String>,
    pub expires_at: Option<Timestamp>,
    /// What the export holds alive (see [`ExportRecord::holds`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<Resource>,
    pub revision: Revision,
    pub updated_at: Timestamp,
}

impl From<WorldRecord> for Export {
    fn from(r: WorldRecord) -> Self {
        Export {
            holds: ExportMeta::holds_of(r.meta.as_deref()),
            from: r.owner,
            id: ExportId {
                kind: r.kind,
                name: r.name,
                to: r.target,
            },
            data: r.data,
            session_id: r.session_id,
            expires_at: r.expires_at,
            revision: r.revision,
            updated_at: r.updated_at,
        }
    }
}

/// What an export call changed, record by record (no flags of doubtful polarity).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportOutcome {
    /// Records written (new, or with different data or lifetime).
    pub changed: Vec<ExportId>,
    /// Records identical to what was stored: nothing written.
    pub unchanged: Vec<ExportId>,
    /// Records removed (by `sync_exports`, or by `unexport`).
    pub removed: Vec<ExportId>,
}

/// A collect filter: empty fields match anything; several filters are ORed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportFilter {
    pub kind: Option<String>,
    pub name: Option<String>,
    /// The exporting host.
    pub from: Option<String>,
}

impl ExportFilter {
    pub fn validate(&self) -> Result<()> {
        if let Some(k) = &self.kind {
            validate::name("export kind", k)?;
        }
        if let Some(n) = &self.name {
            validate::name("export name", n)?;
        }
        if let Some(h) = &self.from {
            validate::name("host", h)?;
        }
        Ok(())
    }

    pub fn matches(&self, e: &Export) -> bool {
        self.kind.as_ref().is_none_or(|k| *k == e.id.kind)
            && self.name.as_ref().is_none_or(|n| *n == e.id.name)
            && self.from.as_ref().is_none_or(|h| *h == e.from)
    }
}

/// Whether `viewer` may see an export from `owner` to `target`: its own exports, exports to it
/// and exports to every host.
pub fn export_visible(viewer: &str, owner: &str, target: &str) -> bool {
    owner == viewer || target == viewer || target == EVERY_HOST
}

/// Whether `viewer` may see this change. Export changes are private to the exporter and the
/// target; everything else in the World is readable by every host.
pub fn change_visible(viewer: &str, c: &Change) -> bool {
    if c.namespace != Space::Export.change_namespace() {
        return true;
    }
    let mut parts = c.id.splitn(4, '/');
    let owner = parts.next().unwrap_or_default();
    let target = parts.nth(2).unwrap_or_default();
    export_visible(viewer, owner, target)
}

// ---- key-values and maps ----

/// Check a key-value key: 1 to [`KV_KEY_BYTES_MAX`] bytes of printable ASCII without spaces.
pub fn validate_kv_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > KV_KEY_BYTES_MAX {
        return Err(Error::invalid(
            "key",
            key.chars().take(64).collect::<String>(),
            format!("must be 1 to {KV_KEY_BYTES_MAX} bytes"),
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(
            "key",
            key.chars().take(64).collect::<String>(),
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// Check a key prefix (may be empty: every key).
pub fn validate_kv_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_kv_key(prefix)
}

fn validate_text_value(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Error::TooLarge {
            field: field.into(),
            size: value.len(),
            max,
        });
    }
    if value.contains('\0') {
        return Err(Error::invalid(
            field,
            value.chars().take(64).collect::<String>(),
            "must not contain NUL",
        ));
    }
    Ok(())
}

pub fn validate_kv_value(value: &str) -> Result<()> {
    validate_text_value("value", value, KV_VALUE_BYTES_MAX)
}

pub fn validate_map_value(value: &str) -> Result<()> {
    validate_text_value("map value", value, MAP_VALUE_BYTES_MAX)
}

/// One key-value entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    pub value: String,
    /// Revision of the last change (compare-and-set compares this).
    pub revision: Revision,
    pub create_revision: Revision,
    pub session_id: Option<String>,
    pub expires_at: Option<Timestamp>,
    pub updated_at: Timestamp,
}

impl From<WorldRecord> for KvEntry {
    fn from(r: WorldRecord) -> Self {
        KvEntry {
            value: r.text(),
            key: r.key,
            revision: r.revision,
            create_revision: r.create_revision,
            session_id: r.session_id,
            expires_at: r.expires_at,
            updated_at: r.updated_at,
        }
    }
}

/// The record key of host `host`'s value in map `namespace`.
pub fn map_key(namespace: &str, host: &str) -> String {
    format!("{namespace}/{host}")
}

// ---- deploys ----

/// Width of a deploy id in its record key (ids sort as text).
const DEPLOY_KEY_DIGITS: usize = 20;

pub fn deploy_key(id: u64) -> String {
    format!("{id:0width$}", width = DEPLOY_KEY_DIGITS)
}

pub fn parse_deploy_key(key: &str) -> Result<u64> {
    key.parse()
        .map_err(|_| Error::Backend(format!("corrupt deploy key {key:?} in the store")))
}

/// A file of a deploy tree, to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployFileDraft {
    pub path: String,
    /// Unix permission bits (e.g. 0o644).
    pub mode: u32,
    #[serde(with = "b64")]
    pub content: Vec<u8>,
}

/// A deploy to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployDraft {
    pub id: u64,
    pub hash: Option<String>,
    pub parent_hash: Option<String>,
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    #[serde(default)]
    pub files: Vec<DeployFileDraft>,
}

impl DeployDraft {
    pub fn validate(&self) -> Result<()> {
        if self.id == 0 || self.id > i64::MAX as u64 {
            return Err(Error::invalid(
                "deploy id",
                self.id.to_string(),
                "deploy ids start at 1",
            ));
        }
        for (field, h) in [("hash", &self.hash), ("parent hash", &self.parent_hash)] {
            if let Some(h) = h {
                if h.is_empty()
                    || h.len() > DEPLOY_HASH_BYTES_MAX
                    || !h.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(Error::invalid(
                        field,
                        h.chars().take(64).collect::<String>(),
                        format!("must be 1 to {DEPLOY_HASH_BYTES_MAX} printable ASCII bytes"),
                    ));
                }
            }
        }
        if let (1, Some(parent)) = (self.id, &self.parent_hash) {
            return Err(Error::invalid(
                "parent hash",
                parent.chars().take(64).collect::<String>(),
                "deploy 1 is the first: it has no parent (leave the parent hash out)",
            ));
        }
        if self.payload.len() > DEPLOY_PAYLOAD_BYTES_MAX {
            return Err(Error::TooLarge {
                field: "deploy payload".into(),
                size: self.payload.len(),
                max: DEPLOY_PAYLOAD_BYTES_MAX,
            });
        }
        validate_tree(
            self.files
                .iter()
                .map(|f| (f.path.as_str(), f.mode, f.content.len() as u64)),
        )
    }
}

/// The rules of every deploy tree, whatever carries it (a draft's contents, or an op's stored
/// digests — the op is what a remote client sends): at most [`DEPLOY_FILES_MAX`] files of
/// [`DEPLOY_TREE_BYTES_MAX`] bytes together, each path valid ([`validate_tree_path`]) and its
/// mode permission bits ([`validate_file_mode`]), no path twice, and none a file and also a
/// directory of another (`a` and `a/b`: such a tree could not be written out).
/// `files`: (path, mode, size).
pub fn validate_tree<'a>(files: impl ExactSizeIterator<Item = (&'a str, u32, u64)>) -> Result<()> {
    if files.len() > DEPLOY_FILES_MAX {
        return Err(Error::invalid(
            "deploy tree",
            format!("{} files", files.len()),
            format!("at most {DEPLOY_FILES_MAX} files"),
        ));
    }
    let mut paths: Vec<&str> = Vec::with_capacity(files.len());
    let mut total: u64 = 0;
    for (path, mode, size) in files {
        total = total.saturating_add(size);
        validate_tree_path(path)?;
        validate_file_mode(path, mode)?;
        paths.push(path);
    }
    if total > DEPLOY_TREE_BYTES_MAX as u64 {
        return Err(Error::TooLarge {
            field: "deploy tree".into(),
            size: usize::try_from(total).unwrap_or(usize::MAX),
            max: DEPLOY_TREE_BYTES_MAX,
        });
    }
    paths.sort_unstable();
    if let Some(w) = paths.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::invalid("deploy tree path", w[0], "appears twice"));
    }
    let set: std::collections::HashSet<&str> = paths.iter().copied().collect();
    for p in &paths {
        for (i, _) in p.match_indices('/') {
            if set.contains(&p[..i]) {
                return Err(Error::invalid(
                    "deploy tree path",
                    &p[..i],
                    format!("is a file and also a directory of {p:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// The largest mode of a deploy file: read, write and execute bits for owner, group and others.
pub const DEPLOY_FILE_MODE_MAX: u32 = 0o777;

/// Check a deploy file's mode: permission bits only. The setuid, setgid and sticky bits are
/// refused: a deploy is written out on every host that applies it, often as root, and must not
/// install a setuid file there.
pub fn validate_file_mode(path: &str, mode: u32) -> Result<()> {
    if mode > DEPLOY_FILE_MODE_MAX {
        return Err(Error::invalid(
            "deploy file mode",
            format!("{mode:04o} of {path}"),
            "must be permission bits only (at most 0777): setuid, setgid and sticky bits are \
             refused (clear them, e.g. chmod u-s,g-s,-t)",
        ));
    }
    Ok(())
}

/// A relative path of a deploy tree: `/`-separated, no empty, `.` or `..` components.
pub fn validate_tree_path(path: &str) -> Result<()> {
    let bad = |rule: &str| Err(Error::invalid("deploy tree path", path, rule));
    if path.is_empty() || path.len() > DEPLOY_PATH_BYTES_MAX {
        return bad("must be 1 to 4096 bytes");
    }
    if path.contains('\0') || path.chars().any(char::is_control) {
        return bad("must not contain control characters");
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("must be relative, with no empty, '.' or '..' components");
    }
    Ok(())
}

/// A file of a stored deploy tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployFile {
    pub path: String,
    pub mode: u32,
    /// `sha256:<hex>` of the content.
    pub digest: String,
    pub size: u64,
}

/// What a deploy record's `meta` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployMeta {
    pub hash: Option<String>,
    pub parent_hash: Option<String>,
    #[serde(default)]
    pub files: Vec<DeployFile>,
}

/// A stored deploy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deploy {
    pub id: u64,
    pub hash: Option<String>,
    pub parent_hash: Option<String>,
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    pub files: Vec<DeployFile>,
    pub revision: Revision,
    pub created_at: Timestamp,
}

impl TryFrom<WorldRecord> for Deploy {
    type Error = Error;
    fn try_from(r: WorldRecord) -> Result<Self> {
        let meta: DeployMeta = parse_meta(&r)?;
        Ok(Deploy {
            id: parse_deploy_key(&r.key)?,
            hash: meta.hash,
            parent_hash: meta.parent_hash,
            payload: r.data,
            files: meta.files,
            revision: r.revision,
            created_at: r.created_at,
        })
    }
}

/// The deploy chain's rules (`docs/design.md` invariant 27), decided from what the store holds:
/// `exists`, whether deploy `d.id` is stored; `newest`, the highest stored id; `previous`,
/// deploy `d.id - 1` if it is stored. The deploy's transaction decides with this; a caller
/// may check with it first, on a read, to refuse before uploading anything.
pub fn check_deploy_chain(
    d: &DeployDraft,
    exists: bool,
    newest: Option<u64>,
    previous: Option<&Deploy>,
) -> Result<()> {
    if exists {
        return Err(Error::AlreadyExists {
            what: format!("deploy {}", d.id),
        });
    }
    // Pruning never removes the newest deploy, so it is the chain's high-water mark: an id at
    // or below it was used (a pruned one, added again, would fork the chain).
    if let Some(max) = newest {
        if d.id <= max {
            return Err(Error::AlreadyExists {
                what: format!(
                    "deploy {} (ids up to {max} are taken, pruned ones too)",
                    d.id
                ),
            });
        }
    }
    if d.id > 1 {
        let Some(prev) = previous else {
            return Err(Error::Refused {
                what: format!("deploy {}", d.id),
                reason: format!("the previous deploy {} does not exist", d.id - 1),
            });
        };
        if let (Some(_), Some(parent)) = (&d.hash, &d.parent_hash) {
            if prev.hash.as_deref() != Some(parent.as_str()) {
                return Err(Error::Refused {
                    what: format!("deploy {}", d.id),
                    reason: format!(
                        "parent hash {parent:?} does not match the hash of deploy {} ({})",
                        d.id - 1,
                        prev.hash
                            .as_ref()
                            .map_or("none".to_string(), |h| format!("{h:?}"))
                    ),
                });
            }
        }
    }
    Ok(())
}

/// `sha256:<hex>` of `content`.
pub fn sha256_digest(content: &[u8]) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(content);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Check a digest's syntax: `sha256:` and 64 lowercase hex digits.
pub fn validate_digest(digest: &str) -> Result<()> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "digest",
            digest.chars().take(80).collect::<String>(),
            "must be sha256: followed by 64 lowercase hex digits",
        ))
    }
}

// ---- scheduler ----

/// How a scheduler picks hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Keep the previous order (hosts that stay keep their place), append newcomers by name.
    #[default]
    Rr,
    /// Hosts in name order.
    Alpha,
}

impl Strategy {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "rr" => Ok(Strategy::Rr),
            "alpha" => Ok(Strategy::Alpha),
            other => Err(Error::invalid("strategy", other, "must be rr or alpha")),
        }
    }
}

/// A host's scheduling options for one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScheduleOptions {
    pub strategy: Strategy,
    /// At most this many hosts are scheduled (0: no limit).
    pub max_count: u32,
}

/// One host's registration, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub namespace: String,
    pub host: String,
    pub session_id: String,
    pub options: ScheduleOptions,
    pub registered_at: Timestamp,
    pub revision: Revision,
}

impl TryFrom<WorldRecord> for Registration {
    type Error = Error;
    fn try_from(r: WorldRecord) -> Result<Self> {
        Ok(Registration {
            options: parse_meta(&r)?,
            namespace: r.scope,
            host: r.owner,
            session_id: r.session_id.unwrap_or_default(),
            registered_at: r.created_at,
            revision: r.create_revision,
        })
    }
}

/// The scheduled set of a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub namespace: String,
    /// Scheduled hosts, in schedule order.
    pub hosts: Vec<String>,
    /// The options in force (see [`compute_schedule`]).
    pub options: ScheduleOptions,
    #[serde(default)]
    pub revision: Revision,
    #[serde(default = "epoch")]
    pub updated_at: Timestamp,
}

impl TryFrom<WorldRecord> for Schedule {
    type Error = Error;
    fn try_from(r: WorldRecord) -> Result<Self> {
        let mut s: Schedule = parse_meta(&r)?;
        s.revision = r.revision;
        s.updated_at = r.updated_at;
        Ok(s)
    }
}

/// The scheduled hosts of a namespace, from its live registrations and the previous schedule.
/// Deterministic: the options in force are those of the OLDEST registration (ties broken by host
/// name), so they do not change when hosts join; `rr` keeps the previous order of hosts that
/// stay and appends newcomers in name order; `alpha` sorts by name; both cut at `max_count`.
pub fn compute_schedule(
    registrations: &[Registration],
    previous: &[String],
) -> (Vec<String>, ScheduleOptions) {
    let Some(first) = registrations
        .iter()
        .min_by(|a, b| (a.registered_at, &a.host).cmp(&(b.registered_at, &b.host)))
    else {
        return (Vec::new(), ScheduleOptions::default());
    };
    let options = first.options.clone();
    let mut hosts: Vec<String> = registrations.iter().map(|r| r.host.clone()).collect();
    hosts.sort();
    hosts.dedup();
    let mut out = match options.strategy {
        Strategy::Alpha => hosts,
        Strategy::Rr => {
            let mut out: Vec<String> = previous
                .iter()
                .filter(|h| hosts.binary_search(h).is_ok())
                .cloned()
                .collect();
            for h in hosts {
                if !out.contains(&h) {
                    out.push(h);
                }
            }
            out
        }
    };
    if options.max_count > 0 {
        out.truncate(options.max_count as usize);
    }
    (out, options)
}

/// The stored `meta` of a schedule record.
pub fn schedule_meta(namespace: &str, hosts: &[String], options: &ScheduleOptions) -> String {
    serde_json::json!({
        "namespace": namespace,
        "hosts": hosts,
        "options": options,
    })
    .to_string()
}

/// A stored schedule record as the namespace's LIVE registrations `live` have it now: hosts
/// and options recomputed with the stored hosts as the previous order, which is what the sweep
/// of a dead registration writes; revision and times stay the stored record's. Reads answer
/// with this, so no read lists a host whose registration is no longer live (swept or not).
pub fn schedule_record_live(mut r: WorldRecord, live: &[Registration]) -> Result<WorldRecord> {
    let stored = Schedule::try_from(r.clone())?;
    let (hosts, options) = compute_schedule(live, &stored.hosts);
    if hosts != stored.hosts || options != stored.options {
        r.meta = Some(schedule_meta(&stored.namespace, &hosts, &options));
    }
    Ok(r)
}

fn epoch() -> Timestamp {
    Timestamp::EPOCH
}

pub(crate) fn parse_meta<T: serde::de::DeserializeOwned>(r: &WorldRecord) -> Result<T> {
    let text = r.meta.as_deref().unwrap_or("null");
    serde_json::from_str(text).map_err(|e| {
        Error::Backend(format!(
            "corrupt metadata of {} record {:?}: {e}",
            r.space, r.key
        ))
    })
}

// ---- membership ----

/// A live session, as membership lists it.
pub type Member = crate::work::SessionInfo;

// ---- reading ----

/// Which records to read. Every field narrows; the backend turns this into ONE query with the
/// SQL from [`WorldQuery::to_sql`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldQuery {
    pub space: Space,
    pub key: Option<String>,
    pub key_prefix: Option<String>,
    /// Keys strictly after this (pagination).
    pub after_key: Option<String>,
    /// Keys strictly before this.
    pub before_key: Option<String>,
    pub scope: Option<String>,
    pub owner: Option<String>,
    /// Only what this host may see ([`export_visible`]).
    pub viewer: Option<String>,
    /// ORed; empty means no narrowing.
    pub filters: Vec<ExportFilter>,
    /// Only records in force at this time: unexpired and, if bound, with a live session.
    pub live_at: Option<Timestamp>,
    /// Only records whose expiry has passed at this time (the sweeper's query).
    pub expired_at: Option<Timestamp>,
    pub session_id: Option<String>,
    /// Newest key first.
    pub descending: bool,
    pub limit: usize,
}

impl WorldQuery {
    pub fn new(space: Space) -> Self {
        WorldQuery {
            space,
            key: None,
            key_prefix: None,
            after_key: None,
            before_key: None,
            scope: None,
            owner: None,
            viewer: None,
            filters: Vec::new(),
            live_at: None,
            expired_at: None,
            session_id: None,
            descending: false,
            limit: 1000,
        }
    }

    /// Walking every page of this query (the backends' `world_list_all`): move the query past
    /// `page` (one answer of it) and add `page` to `into`. `true` when it was the last page
    /// (fewer rows than the limit).
    pub fn take_page(&mut self, page: Vec<WorldRecord>, into: &mut Vec<WorldRecord>) -> bool {
        let done = page.len() < self.limit;
        self.after_key = page.last().map(|r| r.key.clone());
        into.extend(page);
        done
    }

    /// The SQL (`SELECT <columns> FROM world WHERE …`) and its parameters.
    pub fn to_sql(&self, dialect: Dialect, columns: &str) -> (String, Vec<SqlParam>) {
        let mut params: Vec<SqlParam> = Vec::new();
        let p = |v: SqlParam, params: &mut Vec<SqlParam>| {
            params.push(v.clone());
            let ph = dialect.placeholder(params.len());
            match (dialect, v) {
                (Dialect::Postgres, SqlParam::Int(_)) => format!("{ph}::bigint"),
                (Dialect::Postgres, _) => format!("{ph}::text"),
                _ => ph,
            }
        };
        let text = |s: &str| SqlParam::Text(s.to_string());
        // The space is one of a fixed set of names, written as a literal so that PostgreSQL can
        // use the World's partial indexes (`WHERE space <> 'kv'`) in a prepared statement.
        let mut sql = format!(
            "SELECT {columns} FROM world WHERE space = '{}'",
            self.space.as_str()
        );
        if let Some(k) = &self.key {
            sql += &format!(" AND key = {}", p(text(k), &mut params));
        }
        if let Some(prefix) = self.key_prefix.as_deref().filter(|s| !s.is_empty()) {
            sql += &format!(" AND key >= {}", p(text(prefix), &mut params));
            if let Some(end) = prefix_end(prefix) {
                sql += &format!(" AND key < {}", p(text(&end), &mut params));
            }
        }
        if let Some(k) = &self.after_key {
            sql += &format!(" AND key > {}", p(text(k), &mut params));
        }
        if let Some(k) = &self.before_key {
            sql += &format!(" AND key < {}", p(text(k), &mut params));
        }
        if let Some(s) = &self.scope {
            sql += &format!(" AND scope = {}", p(text(s), &mut params));
        }
        if let Some(o) = &self.owner {
            sql += &format!(" AND owner = {}", p(text(o), &mut params));
        }
        if let Some(s) = &self.session_id {
            sql += &format!(" AND session_id = {}", p(text(s), &mut params));
        }
        if let Some(v) = &self.viewer {
            let a = p(text(v), &mut params);
            let star = p(text(EVERY_HOST), &mut params);
            sql += &format!(" AND (owner = {a} OR target = {a} OR target = {star})");
        }
        let groups: Vec<String> = self
            .filters
            .iter()
            .map(|f| {
                let mut conds = Vec::new();
                if let Some(k) = &f.kind {
                    conds.push(format!("kind = {}", p(text(k), &mut params)));
                }
                if let Some(n) = &f.name {
                    conds.push(format!("name = {}", p(text(n), &mut params)));
                }
                if let Some(h) = &f.from {
                    conds.push(format!("owner = {}", p(text(h), &mut params)));
                }
                if conds.is_empty() {
                    "TRUE".to_string()
                } else {
                    format!("({})", conds.join(" AND "))
                }
            })
            .collect();
        if !groups.is_empty() {
            sql += &format!(" AND ({})", groups.join(" OR "));
        }
        if let Some(now) = self.live_at {
            let t = p(SqlParam::Int(now.as_micros()), &mut params);
            sql += &format!(
                " AND (expires_at IS NULL OR expires_at > {t}) AND (session_id IS NULL OR \
                 EXISTS (SELECT 1 FROM sessions s WHERE s.id = world.session_id AND s.deadline > {t}))"
            );
        }
        if let Some(now) = self.expired_at {
            sql += &format!(
                " AND expires_at <= {}",
                p(SqlParam::Int(now.as_micros()), &mut params)
            );
        }
        sql += if self.descending {
            " ORDER BY key DESC"
        } else {
            " ORDER BY key"
        };
        sql += &format!(" LIMIT {}", self.limit);
        (sql, params)
    }
}

/// The smallest string greater than every string starting with `prefix` (None: no bound).
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(host: &str, at: i64, strategy: Strategy, max: u32) -> Registration {
        Registration {
            namespace: "ns".into(),
            host: host.into(),
            session_id: format!("s-{host}"),
            options: ScheduleOptions {
                strategy,
                max_count: max,
            },
            registered_at: Timestamp::from_micros(at),
            revision: Revision(0),
        }
    }

    #[test]
    fn schedule_rr_keeps_previous_order_and_appends_by_name() {
        let regs = vec![
            reg("c", 1, Strategy::Rr, 0),
            reg("a", 2, Strategy::Alpha, 1),
            reg("b", 3, Strategy::Rr, 0),
        ];
        let (hosts, opts) = compute_schedule(&regs, &["b".into(), "gone".into()]);
        assert_eq!(opts.strategy, Strategy::Rr, "oldest registration wins");
        assert_eq!(hosts, vec!["b", "a", "c"]);
    }

    #[test]
    fn schedule_alpha_sorts_and_cuts() {
        let regs = vec![
            reg("c", 1, Strategy::Alpha, 2),
            reg("a", 2, Strategy::Rr, 0),
            reg("b", 3, Strategy::Rr, 0),
        ];
        let (hosts, _) = compute_schedule(&regs, &["c".into()]);
        assert_eq!(hosts, vec!["a", "b"]);
        let (none, _) = compute_schedule(&[], &["a".into()]);
        assert!(none.is_empty());
    }

    #[test]
    fn schedule_ties_broken_by_host_name() {
        let regs = vec![
            reg("b", 1, Strategy::Alpha, 1),
            reg("a", 1, Strategy::Rr, 0),
        ];
        let (_, opts) = compute_schedule(&regs, &[]);
        assert_eq!(opts.strategy, Strategy::Rr);
    }

    #[test]
    fn visibility() {
        assert!(export_visible("h1", "h1", "h2"));
        assert!(export_visible("h2", "h1", "h2"));
        assert!(export_visible("h3", "h1", "*"));
        assert!(!export_visible("h3", "h1", "h2"));
    }

    #[test]
    fn validation() {
        assert!(validate_kv_key("a/b:c").is_ok());
        assert!(validate_kv_key("a b").is_err());
        assert!(validate_kv_key("").is_err());
        assert!(validate_tree_path("etc/x.conf").is_ok());
        for bad in ["/etc", "a//b", "../x", "a/./b", ""] {
            assert!(validate_tree_path(bad).is_err(), "{bad}");
        }
        assert!(validate_digest(&sha256_digest(b"x")).is_ok());
        assert!(validate_digest("sha256:ABC").is_err());
        assert!(ExportId::new("file", "f1", "*").validate().is_ok());
        assert!(ExportId::new("file", "f1", "a/b").validate().is_err());
        assert_eq!(prefix_end("ab"), Some("ac".into()));
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// A deploy op's stored digests keep the tree rules a draft keeps (the op is what a remote
    /// client sends; before, only each path and digest was checked).
    #[test]
    fn a_deploy_ops_stored_tree_keeps_the_tree_rules() {
        use crate::batch::Op;
        let file = |path: &str, size: u64| DeployFile {
            path: path.into(),
            mode: 0o644,
            digest: sha256_digest(path.as_bytes()),
            size,
        };
        let op = |stored: Vec<DeployFile>| Op::DeployAdd {
            deploy: DeployDraft {
                id: 1,
                hash: None,
                parent_hash: None,
                payload: vec![],
                files: vec![],
            },
            stored,
        };
        let limits = crate::Limits::default();
        assert!(op(vec![file("a", 1), file("b/c", 2)])
            .validate(&limits)
            .is_ok());
        let refused = |stored: Vec<DeployFile>, needle: &str| {
            let err = op(stored).validate(&limits).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        };
        refused(
            vec![file("a", 1), file("a/b", 1)],
            "is a file and also a directory",
        );
        refused(vec![file("a", 1), file("a", 1)], "appears twice");
        refused(
            (0..=DEPLOY_FILES_MAX)
                .map(|i| file(&format!("f{i}"), 0))
                .collect(),
            "at most 10000 files",
        );
        refused(
            vec![file("a", DEPLOY_TREE_BYTES_MAX as u64), file("b", 1)],
            "deploy tree is 67108865 bytes",
        );
        refused(
            vec![file("a", u64::MAX), file("b", u64::MAX)],
            "deploy tree is",
        );
        let mut setuid = file("a", 1);
        setuid.mode = 0o4755;
        refused(vec![setuid], "deploy file mode");
    }

    #[test]
    fn deploy_draft_rules() {
        let mut d = DeployDraft {
            id: 1,
            hash: Some("h1".into()),
            parent_hash: None,
            payload: b"x".to_vec(),
            files: vec![],
        };
        assert!(d.validate().is_ok());
        d.id = 0;
        assert!(d.validate().is_err());
        d.id = 1;
        d.files = vec![
            DeployFileDraft {
                path: "a".into(),
                mode: 0o644,
                content: vec![],
            },
            DeployFileDraft {
                path: "a".into(),
                mode: 0o644,
                content: vec![],
            },
        ];
        assert!(d.validate().is_err(), "duplicate path");
    }
}
