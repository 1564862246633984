//! A write batch: the unit a backend commits atomically. Every write — a single `tag_set` or a
//! user transaction — becomes one [`Batch`]: preconditions (what the transaction read, with the
//! revision it saw) plus operations. A batch is plain data, so a backend can replay it after a
//! serialization failure, and a remote client can send it over the wire unchanged.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gc::{BlobInfo, Lease, Resource};
use crate::model::{Labels, Namespace, Object, ObjectKey, Revision, Tag};
use crate::time::Timestamp;
use crate::validate;
use crate::work::{self, Outcome, Process, SessionInfo};
use crate::world::{self, DeployDraft, ExportId, ExportOutcome, ExportRecord, Lifetime};
use crate::world::{ScheduleOptions, WorldRecord};

/// How an object put treats an existing or missing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PutMode {
    /// Create it or update its labels.
    #[default]
    Upsert,
    /// Fail with `AlreadyExists` if it exists.
    Create,
    /// Fail with `NotFound` if it does not exist.
    Update,
}

/// One write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Op {
    NamespaceCreate {
        name: String,
        labels: Labels,
    },
    /// Patch labels: an empty value deletes the label.
    NamespaceLabels {
        name: String,
        labels: Labels,
    },
    NamespaceDelete {
        name: String,
    },
    /// Create or update an object; `labels` is a patch (an empty value deletes the label).
    ObjectPut {
        key: ObjectKey,
        labels: Labels,
        mode: PutMode,
    },
    /// Delete an object and all its tags.
    ObjectDelete {
        key: ObjectKey,
    },
    /// Set a tag; `value` is canonical JSON text (see [`validate::canonical_json`]).
    TagSet {
        key: ObjectKey,
        name: String,
        value: String,
    },
    TagDelete {
        key: ObjectKey,
        name: String,
    },
    /// Insert a session row (its deadline computed by the caller from `now` and the TTL).
    SessionStart {
        session: SessionInfo,
    },
    /// Delete a session and release its work (history: Canceled, cause "session closed").
    SessionClose {
        id: String,
    },
    /// Declare (or redeclare) a process and the processes it conflicts with.
    ProcessDefine {
        name: String,
        conflicts: Vec<String>,
    },
    /// Pause a declared process (no claim for it starts) or resume it.
    ProcessPause {
        name: String,
        paused: bool,
    },
    /// Set (or, with `None`, lift) a declared process's limit of claims held at once.
    ProcessLimit {
        name: String,
        max_active: Option<u64>,
    },
    /// Set (or, with `None`, lift) the failures in a row after which a declared process parks an
    /// object (see `Process::max_failures`).
    ProcessMaxFailures {
        name: String,
        max_failures: Option<u64>,
    },
    /// End a claim. Fails with `WorkLost` unless the claim is held by `session_id` with `token`.
    WorkRelease {
        key: ObjectKey,
        process: String,
        session_id: String,
        token: i64,
        outcome: Outcome,
    },
    /// Remove the backoff of (object, process), if any.
    BackoffClear {
        key: ObjectKey,
        process: String,
    },
    /// An operator ends a claim whoever holds it (history: Canceled, cause "canceled by operator").
    WorkForceCancel {
        key: ObjectKey,
        process: String,
    },
    /// Read, writing nothing, why (object, process) can or cannot be claimed now, and, with a
    /// selector, which of its terms the object fails (`Applied::WorkExplain`).
    WorkExplain {
        key: ObjectKey,
        process: String,
        selector: Option<String>,
    },

    // ---- the World (see `crate::world`) ----
    /// Export records from `host`. With `sync`, they become the host's complete export set: every
    /// other export of the host is removed in the same transaction.
    Export {
        host: String,
        records: Vec<ExportRecord>,
        sync: bool,
    },
    /// Remove exports of `host`; ids that do not exist are ignored.
    Unexport {
        host: String,
        ids: Vec<ExportId>,
    },
    /// Set a key. With `expect`, only if the key's revision is that (`Revision(0)`: the key must
    /// not exist); otherwise `Conflict`.
    KvSet {
        key: String,
        value: String,
        expect: Option<Revision>,
        #[serde(default)]
        lifetime: Lifetime,
    },
    /// Delete a key (`NotFound` if missing). With `expect`, only at that revision.
    KvDelete {
        key: String,
        expect: Option<Revision>,
    },
    /// Set `host`'s own value in map `namespace`.
    MapSet {
        namespace: String,
        host: String,
        value: String,
    },
    MapDelete {
        namespace: String,
        host: String,
    },
    /// Add a deploy (the chain rules are in `docs/design.md`). `stored`: files whose content
    /// is already in the content store (checked in the transaction); `deploy.files` are stored
    /// as World blob records (the older form, kept for compatibility).
    DeployAdd {
        deploy: DeployDraft,
        stored: Vec<crate::world::DeployFile>,
    },
    /// Remove deploys with id < `before` (never the newest deploy). Blobs stay until collected.
    DeployPrune {
        before: u64,
    },
    /// Register `host` for scheduling in `namespace`, bound to its session.
    ScheduleRegister {
        namespace: String,
        host: String,
        session_id: String,
        options: ScheduleOptions,
    },
    ScheduleUnregister {
        namespace: String,
        host: String,
    },

    // ---- leases, collectable kinds, content, collection (see `crate::gc`) ----
    /// Declare whether objects of `kind` may be collected when nothing needs them.
    GcKindDeclare {
        kind: String,
        collectable: bool,
    },
    /// Create a lease (`AlreadyExists` if the id is taken).
    LeaseCreate {
        id: String,
        labels: Labels,
        flat: bool,
        expires_at: Option<crate::time::Timestamp>,
    },
    /// Delete a lease and its resource list (what it held becomes collectable).
    LeaseDelete {
        id: String,
    },
    /// Add a resource to a live lease (the resource need not exist yet).
    LeaseAddResource {
        lease: String,
        resource: Resource,
    },
    LeaseRemoveResource {
        lease: String,
        resource: Resource,
    },
    /// Record a blob whose bytes the backend has verified and stored; optionally add it to a
    /// lease in the same transaction. Re-committing existing content changes nothing.
    BlobCommit {
        digest: String,
        size: u64,
        labels: Labels,
        lease: Option<String>,
    },
    /// Remove a blob's metadata (the backend removes its bytes after the commit).
    BlobDelete {
        digest: String,
    },
    /// The collector's sweep of candidates found garbage at `mark_revision`: each is removed
    /// unless it, or anything that now references it, changed after `mark_revision`.
    GcSweep {
        mark_revision: Revision,
        objects: Vec<ObjectKey>,
        blobs: Vec<String>,
        expired_leases: Vec<String>,
        /// The kinds the mark took as collectable. If any of them is no longer (declared not
        /// collectable since), its objects are roots the mark did not follow: the batch removes
        /// nothing (expired leases aside) and the next collection decides.
        #[serde(default)]
        collectable_kinds: Vec<String>,
    },
}

/// The bytes of labels' keys and values (what labels count in [`Op::payload_bytes`]).
pub fn labels_bytes(labels: &crate::Labels) -> usize {
    labels.iter().map(|(k, v)| k.len() + v.len()).sum()
}

impl Op {
    /// The op's variable-size content in bytes, counted against [`Limits::txn_bytes_max`]: tag
    /// values, labels, export data, key-value and map values, deploy payloads and inline files,
    /// a sweep's lists. Names and other bounded fields count nothing.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Op::NamespaceCreate { labels, .. }
            | Op::NamespaceLabels { labels, .. }
            | Op::ObjectPut { labels, .. }
            | Op::LeaseCreate { labels, .. }
            | Op::BlobCommit { labels, .. } => labels_bytes(labels),
            Op::TagSet { value, .. } | Op::KvSet { value, .. } | Op::MapSet { value, .. } => {
                value.len()
            }
            Op::Export { records, .. } => records.iter().map(|r| r.data.len()).sum(),
            Op::DeployAdd { deploy, .. } => {
                deploy.payload.len() + deploy.files.iter().map(|f| f.content.len()).sum::<usize>()
            }
            _ => 0,
        }
    }

    /// Validate every field against the rules and limits. Called at the edge (the library and,
    /// later, the server on what arrives over the wire) before a batch reaches a backend.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        match self {
            Op::NamespaceCreate { name, labels } | Op::NamespaceLabels { name, labels } => {
                validate::name("namespace", name)?;
                validate::user_labels(labels)
            }
            Op::NamespaceDelete { name } => validate::name("namespace", name),
            Op::ObjectPut { key, labels, .. } => {
                key.validate()?;
                validate::user_labels(labels)
            }
            Op::ObjectDelete { key } => key.validate(),
            Op::TagSet { key, name, value } => {
                key.validate()?;
                validate::name("tag", name)?;
                if value.len() > limits.tag_value_bytes_max {
                    return Err(Error::TooLarge {
                        field: format!("tag {name:?} value"),
                        size: value.len(),
                        max: limits.tag_value_bytes_max,
                    });
                }
                let parsed = validate::parse_json(&format!("tag {name:?} value"), value)?;
                if validate::has_nul(&parsed) {
                    // As `canonical_json` says: PostgreSQL's jsonb cannot hold it.
                    return Err(Error::invalid(
                        format!("tag {name:?} value"),
                        "<value>",
                        "must not contain NUL characters (\\u0000)",
                    ));
                }
                if serde_json::to_string(&parsed).ok().as_deref() != Some(value.as_str()) {
                    return Err(Error::invalid(
                        format!("tag {name:?} value"),
                        value.chars().take(64).collect::<String>(),
                        "must be canonical JSON (sorted keys, no whitespace)",
                    ));
                }
                Ok(())
            }
            Op::TagDelete { key, name } => {
                key.validate()?;
                validate::name("tag", name)
            }
            Op::SessionStart { session } => {
                validate::name("component", &session.component)?;
                validate::name("host", &session.host)?;
                validate::name("session id", &session.id)
            }
            Op::SessionClose { id } => validate::name("session id", id),
            Op::ProcessPause { name, .. } => validate::name("process", name),
            Op::ProcessLimit { name, max_active } => {
                validate::name("process", name)?;
                process_setting(
                    "process limit",
                    *max_active,
                    work::PROCESS_MAX_ACTIVE_MAX,
                    "claims at once (to stop claims, pause the process)",
                )
            }
            Op::ProcessMaxFailures { name, max_failures } => {
                validate::name("process", name)?;
                process_setting(
                    "process max failures",
                    *max_failures,
                    work::PROCESS_MAX_FAILURES_MAX,
                    "failures in a row (to retry for ever, lift it)",
                )
            }
            Op::ProcessDefine { name, conflicts } => {
                validate::name("process", name)?;
                if conflicts.len() > work::PROCESS_CONFLICTS_MAX {
                    return Err(Error::invalid(
                        "process conflicts",
                        format!("{} processes", conflicts.len()),
                        format!("at most {}", work::PROCESS_CONFLICTS_MAX),
                    ));
                }
                conflicts
                    .iter()
                    .try_for_each(|c| validate::name("conflicting process", c))
            }
            Op::WorkRelease {
                key,
                process,
                session_id,
                outcome,
                ..
            } => {
                key.validate()?;
                validate::name("process", process)?;
                validate::name("session id", session_id)?;
                if let Outcome::Failed { cause, .. } = outcome {
                    if cause.len() > work::CAUSE_BYTES_MAX {
                        return Err(Error::TooLarge {
                            field: "failure cause".into(),
                            size: cause.len(),
                            max: work::CAUSE_BYTES_MAX,
                        });
                    }
                }
                Ok(())
            }
            Op::BackoffClear { key, process } | Op::WorkForceCancel { key, process } => {
                key.validate()?;
                validate::name("process", process)
            }
            Op::WorkExplain {
                key,
                process,
                selector,
            } => {
                key.validate()?;
                validate::name("process", process)?;
                if let Some(s) = selector {
                    crate::selector::Selector::parse(s)?;
                }
                Ok(())
            }
            Op::Export {
                host,
                records,
                sync: _,
            } => {
                validate::name("host", host)?;
                if records.len() > world::EXPORTS_PER_CALL_MAX {
                    return Err(Error::invalid(
                        "exports",
                        format!("{} records", records.len()),
                        format!("at most {} per call", world::EXPORTS_PER_CALL_MAX),
                    ));
                }
                let mut ids: Vec<&ExportId> = Vec::with_capacity(records.len());
                for r in records {
                    r.validate()?;
                    ids.push(&r.id);
                }
                ids.sort_unstable();
                if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
                    return Err(Error::invalid(
                        "exports",
                        w[0].to_string(),
                        "the same (kind, name, target) appears twice",
                    ));
                }
                Ok(())
            }
            Op::Unexport { host, ids } => {
                validate::name("host", host)?;
                if ids.len() > world::EXPORTS_PER_CALL_MAX {
                    return Err(Error::invalid(
                        "exports",
                        format!("{} records", ids.len()),
                        format!("at most {} per call", world::EXPORTS_PER_CALL_MAX),
                    ));
                }
                ids.iter().try_for_each(ExportId::validate)
            }
            Op::KvSet {
                key,
                value,
                expect,
                lifetime,
            } => {
                world::validate_kv_key(key)?;
                world::validate_kv_value(value)?;
                validate_expect(*expect)?;
                lifetime.validate()
            }
            Op::KvDelete { key, expect } => {
                world::validate_kv_key(key)?;
                validate_expect(*expect)
            }
            Op::MapSet {
                namespace,
                host,
                value,
            } => {
                validate::name("map namespace", namespace)?;
                validate::name("host", host)?;
                world::validate_map_value(value)
            }
            Op::MapDelete { namespace, host } => {
                validate::name("map namespace", namespace)?;
                validate::name("host", host)
            }
            Op::DeployAdd { deploy, stored } => {
                deploy.validate()?;
                // Trees go to the content store first (`Store::deploy_add`); an op names them
                // (`stored`). Inline contents were the old way, stored as World blob records
                // that only a prune removes: not written any more.
                if let Some(f) = deploy.files.first() {
                    return Err(Error::invalid(
                        "deploy files",
                        f.path.clone(),
                        "a deploy op carries its files' digests (stored in the content store \
                         first, as Store::deploy_add does), not their contents",
                    ));
                }
                world::validate_tree(stored.iter().map(|f| (f.path.as_str(), f.mode, f.size)))?;
                stored
                    .iter()
                    .try_for_each(|f| world::validate_digest(&f.digest))
            }
            Op::DeployPrune { before } => {
                if *before > i64::MAX as u64 {
                    return Err(Error::invalid("deploy id", before.to_string(), "too large"));
                }
                Ok(())
            }
            Op::ScheduleRegister {
                namespace,
                host,
                session_id,
                options: _,
            } => {
                validate::name("scheduler namespace", namespace)?;
                validate::name("host", host)?;
                validate::name("session id", session_id)
            }
            Op::ScheduleUnregister { namespace, host } => {
                validate::name("scheduler namespace", namespace)?;
                validate::name("host", host)
            }
            Op::GcKindDeclare { kind, .. } => validate::name("kind", kind),
            Op::LeaseCreate { id, labels, .. } => {
                validate::name("lease id", id)?;
                validate::user_labels(labels)
            }
            Op::LeaseDelete { id } => validate::name("lease id", id),
            Op::LeaseAddResource { lease, resource }
            | Op::LeaseRemoveResource { lease, resource } => {
                validate::name("lease id", lease)?;
                resource.validate()
            }
            Op::BlobCommit {
                digest,
                labels,
                lease,
                ..
            } => {
                world::validate_digest(digest)?;
                validate::blob_labels(labels)?;
                if let Some(l) = lease {
                    validate::name("lease id", l)?;
                }
                Ok(())
            }
            Op::BlobDelete { digest } => world::validate_digest(digest),
            Op::GcSweep {
                objects,
                blobs,
                expired_leases,
                collectable_kinds,
                ..
            } => {
                collectable_kinds
                    .iter()
                    .try_for_each(|k| validate::name("kind", k))?;
                objects.iter().try_for_each(ObjectKey::validate)?;
                blobs.iter().try_for_each(|d| world::validate_digest(d))?;
                expired_leases
                    .iter()
                    .try_for_each(|l| validate::name("lease id", l))
            }
        }
    }
}

fn validate_expect(expect: Option<Revision>) -> Result<()> {
    match expect {
        Some(Revision(r)) if r < 0 => Err(Error::invalid(
            "expected revision",
            r.to_string(),
            "must be 0 (absent) or a revision",
        )),
        _ => Ok(()),
    }
}

/// What a transaction read, and the revision it saw (`None`: it saw nothing there). The commit
/// fails with `Conflict` unless every precondition still holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "on")]
pub enum Precondition {
    Namespace {
        name: String,
        revision: Option<Revision>,
    },
    Object {
        key: ObjectKey,
        revision: Option<Revision>,
    },
    Tag {
        key: ObjectKey,
        name: String,
        revision: Option<Revision>,
    },
    /// The session exists and its deadline is after the batch's `now`.
    SessionAlive { session_id: String },
    /// A fenced write: `process` on `key` is held by `session_id` with fencing token `token`, and
    /// that session is alive at the batch's `now`; otherwise the batch fails with `WorkLost`.
    WorkHeld {
        key: ObjectKey,
        process: String,
        session_id: String,
        token: i64,
    },
}

/// Preconditions and operations committed atomically at time `now`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub preconditions: Vec<Precondition>,
    pub ops: Vec<Op>,
    pub now: Timestamp,
}

impl Batch {
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        if self.ops.len() > limits.txn_ops_max {
            return Err(Error::invalid(
                "transaction",
                format!("{} writes", self.ops.len()),
                format!("at most {} writes per transaction", limits.txn_ops_max),
            ));
        }
        if self.preconditions.len() > limits.txn_reads_max {
            return Err(Error::invalid(
                "transaction",
                format!("{} reads", self.preconditions.len()),
                format!("at most {} reads per transaction", limits.txn_reads_max),
            ));
        }
        self.ops.iter().try_for_each(|op| op.validate(limits))?;
        txn_bytes_within(self.ops.iter().map(Op::payload_bytes).sum(), limits)
    }
}

/// Whether `bytes` of writes' content fit in one transaction ([`Limits::txn_bytes_max`]).
pub fn txn_bytes_within(bytes: usize, limits: &Limits) -> Result<()> {
    if bytes > limits.txn_bytes_max {
        return Err(Error::TooLarge {
            field: "transaction (the content of its writes together)".into(),
            size: bytes,
            max: limits.txn_bytes_max,
        });
    }
    Ok(())
}

/// An operator's count setting of a process (`None`: lifted): from 1 to `max` `unit`.
fn process_setting(field: &str, n: Option<u64>, max: u64, unit: &str) -> Result<()> {
    match n {
        Some(n) if !(1..=max).contains(&n) => Err(Error::invalid(
            field,
            n.to_string(),
            format!("from 1 to {max} {unit}"),
        )),
        _ => Ok(()),
    }
}

/// The effect of one operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Applied {
    Namespace(Namespace),
    Object(Object),
    Tag(Tag),
    /// The entity was removed at this revision.
    Deleted {
        revision: Revision,
    },
    Session(SessionInfo),
    Process(Process),
    /// What `Op::WorkExplain` found.
    WorkExplain(Box<work::WorkExplain>),
    /// An operation that reports a count: a claim ended, backoffs cleared, deploys pruned, a
    /// lease or kind written (see each op).
    Done {
        count: u64,
    },
    /// A session closed, releasing its claims: the process of each (once per claim).
    Released {
        processes: Vec<String>,
    },
    /// What an export or unexport did, record by record.
    Exports(ExportOutcome),
    /// A World record as written (or as found, when nothing changed).
    World(Box<WorldRecord>),
    Lease(Lease),
    Blob(BlobInfo),
    /// What a sweep removed (blobs by digest, so their bytes can go after the commit) and how
    /// many candidates it spared.
    Swept {
        objects: u64,
        blobs: Vec<String>,
        /// Sizes of the removed blobs together.
        bytes: u64,
        leases: u64,
        spared: u64,
    },
}

/// The result of one operation: its effect, and whether it changed anything (a put of identical
/// content is a no-op: no new revision, no change-log row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpResult {
    pub changed: bool,
    pub applied: Applied,
}

/// Default of [`Limits::txn_bytes_max`]: 64 MiB (a deploy's largest payload, 16 MiB, four times).
pub const TXN_BYTES_MAX_DEFAULT: usize = 64 << 20;

/// Limits enforced at the edge. Every bound has a name; see `docs/design.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest canonical JSON text of one tag value.
    pub tag_value_bytes_max: usize,
    /// Writes in one transaction.
    pub txn_ops_max: usize,
    /// The variable-size content of one transaction's writes together, in bytes
    /// ([`Op::payload_bytes`]: tag values, labels, export data, key-value and map values, deploy
    /// payloads). Each write has its own bound; this one keeps a transaction of many large writes
    /// (10,000 tags of 1 MiB) from being built, sent and held in memory whole.
    pub txn_bytes_max: usize,
    /// Point reads recorded by one transaction.
    pub txn_reads_max: usize,
    /// Times a transaction closure runs before giving up on conflicts.
    pub txn_attempts_max: u32,
    /// Bytes one content-store read may return, held in memory at once (`Store::blob_get`,
    /// `Store::blob_read_range`): a larger blob is read in ranges.
    pub blob_read_bytes_max: usize,
}

/// Default of [`Limits::blob_read_bytes_max`]: 256 MiB (a blob may have 8 GiB).
pub const BLOB_READ_BYTES_MAX_DEFAULT: usize = 256 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tag_value_bytes_max: 1 << 20,
            txn_ops_max: 10_000,
            txn_bytes_max: TXN_BYTES_MAX_DEFAULT,
            txn_reads_max: 10_000,
            txn_attempts_max: 20,
            blob_read_bytes_max: BLOB_READ_BYTES_MAX_DEFAULT,
        }
    }
}
