//! The storage contract. [`Backend`] is what the user-facing `fleetdb::Store` talks to: the
//! embedded SQLite backend, the PostgreSQL backend and (later) the remote client implement it.
//! [`TxRows`] is the narrower interface a backend implements INSIDE one database transaction so
//! that [`crate::apply`] can decide what a batch does once, for every backend.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, OpResult};
use crate::error::Result;
use crate::gc::{BlobInfo, GcKind, GcSnapshot, Lease, Resource};
use crate::model::{
    Change, ChangeFilter, ChangeOp, Entity, Namespace, Object, ObjectKey, Revision, Tag,
};
use crate::query::ObjectQuery;
use crate::time::Timestamp;
use crate::work::{
    BackoffInfo, ClaimRequest, Claimed, HistoryEntry, HistoryFilter, Process, SessionInfo,
    WorkCursor, WorkInfo, WorkListing,
};
use crate::world::{Space, WorldQuery, WorldRecord};

/// An embedded, numbered schema migration. Each backend has its own list, mirrored number by
/// number (a commented no-op where one backend has nothing to do).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Where a database's schema stands relative to this binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaStatus {
    /// Highest migration applied to the database (0: empty database).
    pub database: u32,
    /// Highest migration this binary knows.
    pub binary: u32,
    /// Migrations this binary would apply, in order.
    pub pending: Vec<MigrationInfo>,
    /// Migrations applied, in order, with when.
    pub applied: Vec<AppliedMigration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationInfo {
    pub version: u32,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedMigration {
    pub version: u32,
    pub name: String,
    pub applied_at: Timestamp,
}

/// The store's position in its change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionInfo {
    /// The highest revision committed.
    pub current: Revision,
    /// Entries at or before this revision have been compacted away.
    pub compacted: Revision,
}

/// Declared differences between backends (never hidden behind silent fallbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Several OS processes may write the same database at once.
    pub multi_process_writers: bool,
    /// Concurrent write transactions are committed in groups sharing one durable sync.
    pub group_commit: bool,
    /// Revisions become visible in the order they were assigned (no in-flight gaps).
    pub revisions_visible_in_order: bool,
    /// An `Unavailable` error may follow a transaction that committed (a server whose answer
    /// to COMMIT was lost with the connection); without it, `Unavailable` means nothing was
    /// written (SQLite: busy, a full disk).
    pub unavailable_may_have_committed: bool,
}

/// The storage contract. Every method is one atomic unit; [`Backend::commit`] is the only write.
/// What a sweep did: the expired sessions it removed, and the process of every claim it
/// released with `Expired` history (theirs, and claims whose session was gone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    pub sessions: u64,
    pub expired: Vec<String>,
    /// World records whose TTL had passed that it removed.
    pub records: u64,
    /// It stopped at its limit (of sessions, or of records of a space): more may be due now.
    pub more: bool,
}

#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// A short name for messages ("sqlite", "postgres").
    fn name(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    /// Settings of the database, read when it was opened, under which a commit that returned
    /// may still be lost or the database corrupted by a crash — and with it what FleetDB
    /// promises (a claim that was granted stays granted; fencing tokens never repeat). One
    /// sentence each, naming the setting; empty when there is none. The embedded backend's
    /// weaker durability (SQLite `synchronous=NORMAL`) is the caller's own explicit choice at
    /// open and is not reported.
    fn durability_warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Read the database server's clock once more, when this backend's store runs on it
    /// ([`crate::ServerClock`]), and answer [`Backend::clock_offset`]. A backend on a clock of
    /// its caller's answers `None` and reads nothing.
    async fn clock_sync(&self) -> Result<Option<i64>> {
        Ok(None)
    }

    /// The database server's clock minus this host's wall clock (µs), now, when this
    /// backend's store runs on the server's clock.
    fn clock_offset(&self) -> Option<i64> {
        None
    }

    async fn schema_status(&self) -> Result<SchemaStatus>;
    /// Apply pending migrations. Writes nothing when there is nothing to apply.
    async fn migrate(&self) -> Result<SchemaStatus>;

    async fn namespace_get(&self, name: &str) -> Result<Option<Namespace>>;
    /// Namespaces ordered by name, after `after`, at most `limit`.
    async fn namespace_list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Namespace>>;
    async fn object_get(&self, key: &ObjectKey) -> Result<Option<Object>>;
    /// Objects matching the query, ordered by (kind, id), at most `query.limit`.
    async fn object_list(&self, query: &ObjectQuery) -> Result<Vec<Object>>;
    async fn tag_get(&self, key: &ObjectKey, name: &str) -> Result<Option<Tag>>;
    /// All tags of one object, ordered by name.
    async fn tag_list(&self, key: &ObjectKey) -> Result<Vec<Tag>>;

    /// Check the preconditions and apply the operations of `batch` atomically: all of it or
    /// nothing. Transient database failures (serialization failures, a busy database) are retried
    /// inside; `Conflict` means a precondition failed.
    async fn commit(&self, batch: Batch) -> Result<Vec<OpResult>>;

    /// Change-log entries with revision > `after` that pass `filter`, in revision order, at most
    /// `limit`. `Compacted` if `after` is older than the compaction point.
    async fn changes(
        &self,
        after: Revision,
        filter: &ChangeFilter,
        limit: usize,
    ) -> Result<Vec<Change>>;
    /// Drop change-log entries with revision < `before`. Returns how many were dropped.
    async fn compact(&self, before: Revision) -> Result<u64>;
    /// The revision and time (`at`) of at most `limit` change-log entries with revision >
    /// `after`, in revision order: what a compaction by age walks, without the entries' values.
    /// Backends may include entries no reader is shown (PostgreSQL's gap markers). The default
    /// reads the entries.
    async fn change_times(
        &self,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<(Revision, Timestamp)>> {
        Ok(self
            .changes(after, &ChangeFilter::default(), limit)
            .await?
            .into_iter()
            .map(|c| (c.revision, c.at))
            .collect())
    }
    async fn revision(&self) -> Result<RevisionInfo>;

    // ---- sessions and work ----

    /// Commit `batch`, then (only if it committed) run `claim`: a worker's "finish this, give me
    /// the next". A backend with a single writer does both in one round trip to it; the default
    /// runs them one after the other. A claim failure after the commit yields no work, not an
    /// error (like a selector claim that found nothing).
    async fn commit_then_claim(
        &self,
        batch: Batch,
        claim: ClaimRequest,
    ) -> Result<(Vec<OpResult>, Claimed)> {
        let results = self.commit(batch).await?;
        let claimed = self.claim(claim).await.unwrap_or_default();
        Ok((results, claimed))
    }

    /// Claim work atomically (see [`crate::apply::apply_claim`]). `Conflict` only for a claim of one
    /// named object that is taken; a selector claim returns what it could get (maybe nothing),
    /// and when that is less than its limit, the revision it looked at if the backend knows it
    /// ([`Claimed`]).
    async fn claim(&self, req: ClaimRequest) -> Result<Claimed>;
    /// Push the deadline of each of these sessions to `now + its ttl`, in ONE statement, for the
    /// sessions still alive at `now`. Returns the sessions renewed, with their new deadlines.
    async fn session_renew(
        &self,
        ids: &[String],
        now: Timestamp,
    ) -> Result<Vec<(String, Timestamp)>>;
    /// Delete up to `limit` sessions expired at `now`, writing an `Expired` history row for each
    /// claim they held and releasing it. Returns how many sessions were removed.
    async fn session_sweep(&self, now: Timestamp, limit: usize) -> Result<Swept>;
    async fn session_get(&self, id: &str) -> Result<Option<SessionInfo>>;
    /// Sessions ordered by id, after `after`, at most `limit`.
    async fn session_list(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionInfo>>;
    async fn process_list(&self) -> Result<Vec<Process>>;
    /// Work rows ordered by (process, namespace, kind, id): [`WorkListing`]'s page.
    async fn work_list(&self, q: &WorkListing) -> Result<Vec<WorkInfo>>;
    /// Backoff rows ordered by (process, namespace, kind, id) with `until > active_at` if given,
    /// after `after` if given.
    async fn backoff_list(
        &self,
        process: Option<&str>,
        active_at: Option<Timestamp>,
        after: Option<&WorkCursor>,
        limit: usize,
    ) -> Result<Vec<BackoffInfo>>;
    /// History newest first, with `seq < before` if given, at most `limit`.
    async fn history_list(
        &self,
        filter: &HistoryFilter,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>>;
    /// Delete history rows written before `before`, in write (`seq`) order: the oldest rows up
    /// to the first one at or after `before` (a row after it stays, even if older, until the rows
    /// before it go), in statements of at most [`crate::work::HISTORY_PRUNE_BATCH`] rows each (the first of
    /// [`crate::work::HISTORY_PRUNE_FIRST`]: [`crate::work::delete_in_batches`]), one
    /// transaction per statement. The newest row is never deleted (`seq` must only grow; SQLite
    /// would number a row of an emptied table 1 again). Returns how many rows were deleted.
    async fn history_prune(&self, before: Timestamp) -> Result<u64>;
    /// Objects matching a selector (text, parsed by the backend), ordered by (namespace, kind, id),
    /// after `after`, at most `limit`.
    async fn select(
        &self,
        selector: &str,
        now: Timestamp,
        after: Option<&ObjectKey>,
        limit: usize,
    ) -> Result<Vec<Object>>;
    /// Per process: claims held by live sessions, and backoffs with `until > now` (for gauges).
    async fn work_stats(&self, now: Timestamp) -> Result<Vec<WorkStats>> {
        let _ = now;
        Err(crate::Error::Unsupported {
            backend: self.name().to_string(),
            what: "work statistics".into(),
        })
    }
    /// How many objects match a selector.
    async fn count(&self, selector: &str, now: Timestamp) -> Result<u64>;

    // ---- the World ----

    /// World records matching the query (one query: [`WorldQuery::to_sql`]).
    async fn world_list(&self, query: &WorldQuery) -> Result<Vec<WorldRecord>>;

    /// Every record each of `queries` selects, read page by page (`query.limit` records a
    /// page, the next page after the last key read), ALL pages of all queries from ONE read
    /// snapshot: a write committing meanwhile is wholly in the answer or wholly out of it
    /// (a reader of many pages never sees half of another host's `sync_exports`).
    async fn world_list_all(&self, queries: &[WorldQuery]) -> Result<Vec<Vec<WorldRecord>>>;

    /// Attempts this backend ran again inside one call after a transient failure
    /// (PostgreSQL: serialization failure, deadlock; SQLite: the write lock held by another
    /// process past the busy timeout), since it was opened: the store adds them to
    /// `fleetdb_transactions_retried_total`. Backends that never retry internally say 0.
    fn retries(&self) -> u64 {
        0
    }

    /// Make sure every revision up to the current one is either visible in the change log or will
    /// never be: where revisions may become visible out of order
    /// ([`Capabilities::revisions_visible_in_order`] false), fill each hole below the highest
    /// visible revision with a gap marker, waiting for the transaction that holds it (at most
    /// `wait`). Returns the highest revision below which the log has no holes: a watcher may
    /// deliver everything up to it and resume after it without missing anything. Gap markers are
    /// never returned by [`Backend::changes`].
    async fn settled_revision(&self, wait: std::time::Duration) -> Result<Revision> {
        let _ = wait;
        Ok(self.revision().await?.current)
    }

    /// Tell OTHER processes sharing the database that changes were committed (PostgreSQL:
    /// `NOTIFY`). Callers coalesce; a backend without such a channel does nothing.
    async fn announce_changes(&self) -> Result<()> {
        Ok(())
    }

    // ---- leases, garbage collection, content store ----

    async fn lease_get(&self, id: &str) -> Result<Option<Lease>> {
        let _ = id;
        Err(self.unsupported("leases"))
    }
    /// Leases ordered by id, after `after`, at most `limit`.
    async fn lease_list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Lease>> {
        let _ = (after, limit);
        Err(self.unsupported("leases"))
    }
    /// Resources of a lease, ordered.
    async fn lease_resources(&self, id: &str) -> Result<Vec<Resource>> {
        let _ = id;
        Err(self.unsupported("leases"))
    }
    async fn gc_kinds(&self) -> Result<Vec<GcKind>> {
        Err(self.unsupported("garbage collection"))
    }
    /// One consistent view of everything the mark phase needs (one read transaction).
    async fn gc_snapshot(&self) -> Result<GcSnapshot> {
        Err(self.unsupported("garbage collection"))
    }

    /// Every distinct (namespace, kind, id) written by a `put` change with a revision in
    /// `(after, upto]`, with its latest revision, at most `limit` (the collector protects, between
    /// its sweep transactions, what changed since its mark). `Compacted` if `after` is older than
    /// the compaction point. The default reads [`Backend::changes`].
    async fn gc_changed(
        &self,
        after: Revision,
        upto: Revision,
        limit: usize,
    ) -> Result<Vec<(Revision, String, String, String)>> {
        let mut latest: std::collections::HashMap<(String, String, String), Revision> =
            std::collections::HashMap::new();
        let mut cursor = after;
        const PAGE: usize = 10_000;
        'pages: while cursor < upto {
            let page = self.changes(cursor, &ChangeFilter::default(), PAGE).await?;
            let full = page.len() >= PAGE;
            for c in page {
                if c.revision > upto {
                    break 'pages;
                }
                cursor = c.revision;
                if c.op == ChangeOp::Put {
                    latest.insert((c.namespace, c.kind, c.id), c.revision);
                    if latest.len() >= limit {
                        break 'pages;
                    }
                }
            }
            if !full {
                break;
            }
        }
        Ok(latest
            .into_iter()
            .map(|((ns, kind, id), rev)| (rev, ns, kind, id))
            .collect())
    }

    /// Start (or resume) an upload under `reference`: returns where it stands (its offset).
    async fn ingest_start(
        &self,
        reference: &str,
        expected: Option<(&str, u64)>,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<crate::content::IngestStatus> {
        let _ = (reference, expected, now, expires_at);
        Err(self.unsupported("the content store"))
    }
    /// Append `data` at `offset` (which must be the ingest's current offset). A write touches
    /// the upload: it then expires at `expires_at` (or later, if it already did), so an upload
    /// being written expires only once it is left untouched.
    async fn ingest_write(
        &self,
        reference: &str,
        offset: u64,
        data: &[u8],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<crate::content::IngestStatus> {
        let _ = (reference, offset, data, now, expires_at);
        Err(self.unsupported("the content store"))
    }
    /// Verify the upload against `digest` and `size` (a mismatch commits nothing and keeps the
    /// ingest), store the bytes, then commit the metadata (and the lease entry) as one
    /// [`crate::batch::Op::BlobCommit`].
    async fn ingest_commit(
        &self,
        reference: &str,
        digest: &str,
        size: u64,
        labels: crate::model::Labels,
        lease: Option<&str>,
        now: Timestamp,
    ) -> Result<BlobInfo> {
        let _ = (reference, digest, size, labels, lease, now);
        Err(self.unsupported("the content store"))
    }
    async fn ingest_abort(&self, reference: &str) -> Result<()> {
        let _ = reference;
        Err(self.unsupported("the content store"))
    }
    async fn ingest_list(&self) -> Result<Vec<crate::content::IngestStatus>> {
        Err(self.unsupported("the content store"))
    }
    /// Remove ingests that expired at `now`. Returns how many.
    async fn ingest_sweep(&self, now: Timestamp) -> Result<u64> {
        let _ = now;
        Err(self.unsupported("the content store"))
    }
    async fn blob_info(&self, digest: &str) -> Result<Option<BlobInfo>> {
        let _ = digest;
        Err(self.unsupported("the content store"))
    }
    /// `len` bytes (or to the end) from `offset`.
    async fn blob_read(&self, digest: &str, offset: u64, len: Option<u64>) -> Result<Vec<u8>> {
        let _ = (digest, offset, len);
        Err(self.unsupported("the content store"))
    }
    /// Blobs ordered by digest after `after`, at most `limit`.
    async fn blob_list(&self, after: Option<&str>, limit: usize) -> Result<Vec<BlobInfo>> {
        let _ = (after, limit);
        Err(self.unsupported("the content store"))
    }
    /// Remove the BYTES of blobs whose metadata is gone (after a sweep or delete committed).
    /// Idempotent; bytes of a blob that has metadata again are kept.
    async fn blob_remove_bytes(&self, digests: &[String]) -> Result<u64> {
        let _ = digests;
        Err(self.unsupported("the content store"))
    }
    /// Remove bytes that have no metadata (left by a crash between a sweep and its byte removal,
    /// or by a failed commit). Returns (files or chunks of) how many blobs.
    async fn blob_orphans_remove(&self) -> Result<u64> {
        Err(self.unsupported("the content store"))
    }

    /// Record a finished collection's statistics (JSON of [`crate::gc::GcStats`]), keeping the
    /// newest `keep` records, so every process and the CLI see the last runs.
    async fn gc_run_record(&self, stats: &str, started_at: Timestamp, keep: usize) -> Result<()> {
        let _ = (stats, started_at, keep);
        Err(self.unsupported("the collector's run history"))
    }
    /// The newest recorded collections' statistics (JSON), newest first, at most `limit`.
    async fn gc_runs(&self, limit: usize) -> Result<Vec<String>> {
        let _ = limit;
        Err(self.unsupported("the collector's run history"))
    }

    /// The error for a feature this backend lacks.
    fn unsupported(&self, what: &str) -> crate::Error {
        crate::Error::Unsupported {
            backend: self.name().to_string(),
            what: what.to_string(),
        }
    }

    /// Call `wake` whenever another process announces changes, until the backend is dropped.
    /// Returns false when the backend has no such channel (watchers then rely on polling).
    async fn listen_changes(&self, wake: std::sync::Arc<dyn Fn() + Send + Sync>) -> Result<bool> {
        let _ = wake;
        Ok(false)
    }
}

/// A change-log entry before the backend assigns its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeDraft {
    pub namespace: String,
    pub kind: String,
    pub id: String,
    pub entity: Entity,
    pub name: String,
    pub op: ChangeOp,
    /// Canonical JSON text.
    pub old_value: Option<String>,
    pub new_value: Option<String>,
    pub at: Timestamp,
}

/// What a tag read inside a transaction returns: whether the object exists and the tag (with its
/// canonical JSON text) if present. One read, so backends can answer it with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRead {
    pub object_exists: bool,
    pub tag: Option<(Tag, String)>,
}

/// Row-level primitives a backend implements inside ONE database transaction. Each `*_put` and
/// `*_remove` assigns the next revision, writes the row with it and appends the change-log row,
/// all as part of the same transaction, and returns the revision. The backend translates; it
/// decides nothing ([`crate::apply`] does).
#[async_trait]
pub trait TxRows: Send {
    async fn namespace_read(&mut self, name: &str) -> Result<Option<Namespace>>;
    /// Object counts per kind in a namespace (for the "not empty" error), at most a few kinds.
    async fn namespace_usage(&mut self, name: &str) -> Result<Vec<(String, u64)>>;
    /// Insert or replace the namespace row (its `revision` field is ignored and assigned).
    async fn namespace_put(&mut self, ns: &Namespace, change: &ChangeDraft) -> Result<Revision>;
    async fn namespace_remove(&mut self, name: &str, change: &ChangeDraft) -> Result<Revision>;

    async fn object_read(&mut self, key: &ObjectKey) -> Result<Option<Object>>;
    async fn object_put(&mut self, obj: &Object, change: &ChangeDraft) -> Result<Revision>;
    async fn object_remove(&mut self, key: &ObjectKey, change: &ChangeDraft) -> Result<Revision>;

    async fn tag_read(&mut self, key: &ObjectKey, name: &str) -> Result<TagRead>;
    /// All tags of an object with their canonical text, ordered by name.
    async fn tag_read_all(&mut self, key: &ObjectKey) -> Result<Vec<(Tag, String)>>;
    async fn tag_put(&mut self, tag: &Tag, text: &str, change: &ChangeDraft) -> Result<Revision>;
    async fn tag_remove(
        &mut self,
        key: &ObjectKey,
        name: &str,
        change: &ChangeDraft,
    ) -> Result<Revision>;

    // ---- sessions and work (no change-log rows: these are not objects) ----

    async fn session_read(&mut self, id: &str) -> Result<Option<SessionInfo>>;
    async fn session_insert(&mut self, s: &SessionInfo) -> Result<()>;
    async fn session_remove(&mut self, id: &str) -> Result<()>;
    /// Up to `limit` sessions with `deadline <= now`.
    async fn sessions_expired(&mut self, now: Timestamp, limit: usize) -> Result<Vec<SessionInfo>>;
    async fn process_read(&mut self, name: &str) -> Result<Option<Process>>;
    async fn process_put(&mut self, p: &Process) -> Result<()>;
    /// Every declared process.
    async fn process_all(&mut self) -> Result<Vec<Process>>;
    async fn work_read(&mut self, key: &ObjectKey, process: &str) -> Result<Option<WorkInfo>>;
    /// The claim as a fenced write's precondition reads it: the row must stay as read until the
    /// transaction commits (a concurrent release, expiry or takeover waits, or makes this
    /// transaction fail and retry), so the write never commits after the claim ended.
    async fn work_read_held(&mut self, key: &ObjectKey, process: &str) -> Result<Option<WorkInfo>>;
    /// Work held by one session.
    async fn work_of_session(&mut self, session_id: &str) -> Result<Vec<WorkInfo>>;
    /// Up to `limit` claim rows whose session row is gone (see `apply::apply_orphans`).
    async fn work_orphaned(&mut self, limit: usize) -> Result<Vec<WorkInfo>>;
    async fn work_insert(&mut self, w: &WorkInfo) -> Result<()>;
    async fn work_remove(&mut self, key: &ObjectKey, process: &str) -> Result<()>;
    async fn backoff_read(&mut self, key: &ObjectKey, process: &str)
        -> Result<Option<BackoffInfo>>;
    async fn backoff_put(&mut self, b: &BackoffInfo) -> Result<()>;
    /// Returns whether a row was removed.
    async fn backoff_remove(&mut self, key: &ObjectKey, process: &str) -> Result<bool>;
    /// Append a history row; its `seq` is ignored (the backend numbers rows).
    async fn history_append(&mut self, h: &HistoryEntry) -> Result<()>;
    /// The next fencing token (strictly increasing, never reused).
    async fn next_token(&mut self) -> Result<i64>;
    /// Objects matching the query that no live session holds for any of `q.exclude` processes
    /// and that are not in an active backoff for `q.process`, ordered by (namespace, kind, id),
    /// at most `q.limit`. One query; the backend compiles `q.selector`.
    async fn claim_candidates(&mut self, q: &CandidateQuery) -> Result<Vec<ObjectKey>>;
    /// The work rows of (key, process) for many keys at once (claims of many objects read
    /// them in one go). The default reads them one by one.
    async fn work_read_many(&mut self, keys: &[ObjectKey], process: &str) -> Result<Vec<WorkInfo>> {
        let mut out = Vec::new();
        for k in keys {
            if let Some(w) = self.work_read(k, process).await? {
                out.push(w);
            }
        }
        Ok(out)
    }
    /// Release many claims at once (a batch finish): for each, remove the backoff first when
    /// `clear_backoff`, then the work row, and append `history[i]` (in order). The default
    /// releases them one by one; backends override it with set-based statements.
    async fn work_release_many(
        &mut self,
        works: &[WorkInfo],
        history: &[HistoryEntry],
        clear_backoff: bool,
    ) -> Result<()> {
        for (w, h) in works.iter().zip(history) {
            if clear_backoff {
                self.backoff_remove(&w.key, &w.process).await?;
            }
            self.work_remove(&w.key, &w.process).await?;
            self.history_append(h).await?;
        }
        Ok(())
    }
    /// [`TxRows::tag_read`] of many distinct (object, tag) pairs, answered in order. The default
    /// reads them one by one.
    async fn tag_read_many(&mut self, items: &[(ObjectKey, String)]) -> Result<Vec<TagRead>> {
        let mut out = Vec::with_capacity(items.len());
        for (key, name) in items {
            out.push(self.tag_read(key, name).await?);
        }
        Ok(out)
    }
    /// [`TxRows::tag_remove`] of many distinct (object, tag) pairs, each with its change-log row
    /// (`changes[i]`); the revisions are returned in order and increase. The default removes
    /// them one by one.
    async fn tag_remove_many(
        &mut self,
        items: &[(ObjectKey, String)],
        changes: &[ChangeDraft],
    ) -> Result<Vec<Revision>> {
        let mut out = Vec::with_capacity(items.len());
        for ((key, name), change) in items.iter().zip(changes) {
            out.push(self.tag_remove(key, name, change).await?);
        }
        Ok(out)
    }
    /// `n` fresh fencing tokens, increasing. The default takes them one by one.
    async fn next_tokens(&mut self, n: usize) -> Result<Vec<i64>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_token().await?);
        }
        Ok(out)
    }
    // ---- the World ----

    /// The record at (space, key), whatever its expiry or session (callers judge liveness).
    async fn world_read(&mut self, space: Space, key: &str) -> Result<Option<WorldRecord>>;
    /// Records matching the query, inside the transaction.
    async fn world_scan(&mut self, query: &WorldQuery) -> Result<Vec<WorldRecord>>;
    /// Insert or replace a record: assigns the next revision to `revision` (and to
    /// `create_revision` when the record's `create_revision` is 0), appends `change`.
    async fn world_put(&mut self, record: &WorldRecord, change: &ChangeDraft) -> Result<Revision>;
    async fn world_remove(
        &mut self,
        space: Space,
        key: &str,
        change: &ChangeDraft,
    ) -> Result<Revision>;
    /// Append a change-log row that describes no stored row of its own (membership changes).
    async fn change_append(&mut self, change: &ChangeDraft) -> Result<Revision>;

    // ---- leases, garbage collection, content metadata ----

    async fn gc_kind_read(&mut self, kind: &str) -> Result<Option<GcKind>> {
        let _ = kind;
        Err(tx_unsupported("garbage collection"))
    }
    /// [`TxRows::gc_kind_read`], holding the row until the transaction ends where writers run
    /// concurrently (PostgreSQL: `FOR SHARE`), so that a declaration of the kind waits for this
    /// transaction, or this one retries after it: a sweep that decided on a kind being
    /// collectable commits before any declaration that it is not.
    async fn gc_kind_read_held(&mut self, kind: &str) -> Result<Option<GcKind>> {
        self.gc_kind_read(kind).await
    }
    async fn gc_kind_put(&mut self, k: &GcKind) -> Result<()> {
        let _ = k;
        Err(tx_unsupported("garbage collection"))
    }
    async fn lease_read(&mut self, id: &str) -> Result<Option<Lease>> {
        let _ = id;
        Err(tx_unsupported("leases"))
    }
    /// Insert or replace a lease; assigns the revision, appends `change`.
    async fn lease_put(&mut self, lease: &Lease, change: &ChangeDraft) -> Result<Revision> {
        let _ = (lease, change);
        Err(tx_unsupported("leases"))
    }
    /// Delete a lease and its resource rows.
    async fn lease_remove(&mut self, id: &str, change: &ChangeDraft) -> Result<Revision> {
        let _ = (id, change);
        Err(tx_unsupported("leases"))
    }
    /// Add a resource to a lease unless it holds it already, keeping the lease's count of
    /// resources (`leases.resources`) in the same transaction. Returns the count after the add,
    /// or `None` if the lease held the resource already (nothing written).
    async fn lease_resource_add(
        &mut self,
        lease: &str,
        resource: &Resource,
        now: Timestamp,
    ) -> Result<Option<u64>> {
        let _ = (lease, resource, now);
        Err(tx_unsupported("leases"))
    }
    /// Returns whether a row was removed (the lease's count goes down with it).
    async fn lease_resource_remove(&mut self, lease: &str, resource: &Resource) -> Result<bool> {
        let _ = (lease, resource);
        Err(tx_unsupported("leases"))
    }
    async fn lease_resources_of(&mut self, lease: &str) -> Result<Vec<Resource>> {
        let _ = lease;
        Err(tx_unsupported("leases"))
    }
    async fn blob_meta_read(&mut self, digest: &str) -> Result<Option<BlobInfo>> {
        let _ = digest;
        Err(tx_unsupported("the content store"))
    }
    async fn blob_meta_put(&mut self, b: &BlobInfo, change: &ChangeDraft) -> Result<Revision> {
        let _ = (b, change);
        Err(tx_unsupported("the content store"))
    }
    async fn blob_meta_remove(&mut self, digest: &str, change: &ChangeDraft) -> Result<Revision> {
        let _ = (digest, change);
        Err(tx_unsupported("the content store"))
    }
    /// Every distinct (namespace, kind, id) written by a `put` change after `after`, with its
    /// latest revision, at most `limit` (the sweep protects what changed during a collection;
    /// deletions cannot add references, so they are left out). Fails `Compacted` when `after` is
    /// below the compaction point, read in the same transaction: rows after `after` may be gone,
    /// so what changed can no longer be told (the sweep then spares every candidate).
    async fn changes_after(
        &mut self,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<(Revision, String, String, String)>> {
        let _ = (after, limit);
        Err(tx_unsupported("garbage collection"))
    }

    /// The collector's set-based sweep of objects: delete, in one go, those of `keys` that exist
    /// with a revision ≤ `mark` and whose kind is declared collectable NOW, with all their tags.
    /// Writes NO change-log rows (the caller appends them, [`TxRows::changes_append_many`]).
    /// Returns `None` when the backend does not implement it (the caller then deletes object by
    /// object, exactly like `ObjectDelete`).
    async fn gc_objects_remove(
        &mut self,
        keys: &[ObjectKey],
        mark: Revision,
    ) -> Result<Option<GcRemoved<RemovedObject>>> {
        let _ = (keys, mark);
        Ok(None)
    }
    /// The same for blobs' metadata: delete those of `digests` whose revision is ≤ `mark`;
    /// returns the metadata removed. `None`: not implemented.
    async fn gc_blobs_remove(
        &mut self,
        digests: &[String],
        mark: Revision,
    ) -> Result<Option<GcRemoved<BlobInfo>>> {
        let _ = (digests, mark);
        Ok(None)
    }
    /// Append change-log rows describing rows already written or removed, in order, each with the
    /// next revision. The default appends them one by one.
    async fn changes_append_many(&mut self, changes: &[ChangeDraft]) -> Result<()> {
        for c in changes {
            self.change_append(c).await?;
        }
        Ok(())
    }

    /// Lock a process against concurrent claims of it until the transaction ends, so that a
    /// claim's count of its live claims ([`TxRows::work_count_live`], read after the lock) stays
    /// true until it commits (a backend whose writes are serialized anyway need not do anything).
    async fn lock_process(&mut self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }
    /// Claims of `process` held by sessions alive at `now`.
    async fn work_count_live(&mut self, process: &str, now: Timestamp) -> Result<u64>;
    /// Lock an object against concurrent claims until the transaction ends (a backend whose
    /// writes are serialized anyway need not do anything).
    async fn lock_object(&mut self, key: &ObjectKey) -> Result<()> {
        let _ = key;
        Ok(())
    }
}

fn tx_unsupported(what: &str) -> crate::Error {
    crate::Error::Unsupported {
        backend: "this backend".into(),
        what: what.to_string(),
    }
}

/// What a set-based sweep primitive removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcRemoved<T> {
    pub removed: Vec<T>,
    /// Candidates that exist but were kept (revision after the mark, or kind not collectable).
    pub kept: u64,
}

/// An object removed by [`TxRows::gc_objects_remove`]: its labels and its tags (name and
/// canonical JSON text, ordered by name), for the change-log rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedObject {
    pub key: ObjectKey,
    pub labels: crate::model::Labels,
    pub tags: Vec<(String, String)>,
}

/// Work statistics of one process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkStats {
    pub process: String,
    pub active_work: u64,
    pub active_backoffs: u64,
    /// Of the active backoffs, the parked ones (`max_failures` reached).
    pub parked: u64,
}

/// What [`TxRows::claim_candidates`] looks for.
#[derive(Debug, Clone)]
pub struct CandidateQuery {
    pub selector: crate::selector::Selector,
    pub process: String,
    /// The process itself and every process it conflicts with (both directions).
    pub exclude: Vec<String>,
    pub now: Timestamp,
    pub limit: usize,
}
