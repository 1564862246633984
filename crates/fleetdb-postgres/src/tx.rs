//! One SERIALIZABLE transaction wrapped as [`TxRows`]: the row-level primitives
//! [`fleetdb_core::apply`] drives (batches, claims, sweeps).
//!
//! Round trips: the transaction is opened lazily and `BEGIN` is pipelined with the first read (it
//! is sent on the same connection just before it, and both answers are awaited together). Every
//! `*_put` / `*_remove` is ONE statement: a data-modifying CTE that takes `nextval` for the
//! revision, appends the change-log row and writes the row.
//!
//! Writes that return nothing (the session and work rows: inserts, removals, history) are
//! deferred: they are queued and sent pipelined just before the next statement that needs an
//! answer (a read, a revision-returning write, `COMMIT`), so they cost no round trip of their own.
//! A deferred write that fails makes that next statement fail with the write's error (the
//! transaction is then rolled back), and `COMMIT` is never sent after a write that failed before
//! it was sent.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use async_trait::async_trait;
use deadpool_postgres::ClientWrapper;
use fleetdb_core::backend::{
    CandidateQuery, ChangeDraft, GcRemoved, RemovedObject, TagRead, TxRows,
};
use fleetdb_core::gc::{BlobInfo, GcKind, Lease, Resource};
use fleetdb_core::selector::Dialect;
use fleetdb_core::work::{BackoffInfo, Process, SessionInfo, WorkInfo};
use fleetdb_core::world::{Space, WorldQuery, WorldRecord};
use fleetdb_core::{Error, Namespace, Object, ObjectKey, Result, Revision, Tag, Timestamp};
use futures::future::{maybe_done, MaybeDone};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Statement};

use crate::error::{classify, gone_before_commit, Failure};
use crate::gc;
use crate::sql::{self, Param};
use crate::work;

/// An owned statement parameter (deferred writes outlive the call that queued them).
pub(crate) type Owned = Box<dyn ToSql + Sync + Send>;

/// A write queued until the next statement that needs an answer.
struct Deferred {
    stmt: Statement,
    params: Vec<Owned>,
}

pub(crate) struct PgTx<'a> {
    client: &'a ClientWrapper,
    /// The statement that opens the transaction (its isolation level).
    begin: &'static str,
    /// `BEGIN` has been sent and succeeded: the transaction must be ended.
    pub(crate) begun: bool,
    /// A transient failure (serialization failure, deadlock) happened: retry the whole batch.
    pub(crate) transient: Option<String>,
    /// Deferred writes, in order. Only ever non-empty once `begun`.
    pending: Vec<Deferred>,
    /// Reads of work rows lock what they read (`FOR UPDATE`): the transaction runs READ
    /// COMMITTED and its decisions rest on those rows (see `PostgresBackend::commit`). Reads
    /// of tags always lock (`sql::TAG_READ_LOCKED`).
    pub(crate) lock_reads: bool,
    /// The transaction's id (`pg_current_xact_id`), asked with `BEGIN` in the same round trip:
    /// if the answer to its `COMMIT` is lost, `pg_xact_status` tells whether it committed
    /// (`PostgresBackend::lost_commit_status`). `None` until the transaction is open, or if the
    /// answer did not come.
    pub(crate) xid: Option<String>,
    /// `COMMIT` is being sent: its own answer says nothing of the outcome when the connection
    /// ends there ([`crate::error::session_ended`]), every answer before it does.
    committing: bool,
}

/// Poll `writes`, then `last`, in that order (tokio-postgres sends a request on its first poll,
/// so this is also the order they reach the server), until all are done. `last` is never polled,
/// so never sent, if a write has already failed when its turn comes: a write that fails before
/// reaching the server (say, a parameter that does not encode) must not be followed by `COMMIT`.
/// Returns the first write error, if any, and `last`'s result if it was sent.
async fn pipeline<W, L, T>(
    writes: Vec<W>,
    last: L,
) -> (
    Option<tokio_postgres::Error>,
    Option<std::result::Result<T, tokio_postgres::Error>>,
)
where
    W: Future<Output = std::result::Result<u64, tokio_postgres::Error>>,
    L: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
{
    let mut writes: Vec<Pin<Box<MaybeDone<W>>>> = writes
        .into_iter()
        .map(|w| Box::pin(maybe_done(w)))
        .collect();
    let mut last = Box::pin(maybe_done(last));
    // None: not decided yet; Some(true): sent; Some(false): abandoned.
    let mut send_last: Option<bool> = None;
    futures::future::poll_fn(|cx| {
        let mut done = true;
        let mut failed = false;
        for w in writes.iter_mut() {
            if w.as_mut().poll(cx).is_pending() {
                done = false;
            } else if matches!(w.as_mut().output_mut(), Some(Err(_))) {
                failed = true;
            }
        }
        let send = *send_last.get_or_insert(!failed);
        if send && last.as_mut().poll(cx).is_pending() {
            done = false;
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    let first_error = writes
        .iter_mut()
        .filter_map(|w| w.as_mut().take_output())
        .find_map(|r| r.err());
    let last = if send_last == Some(true) {
        last.as_mut().take_output()
    } else {
        None
    };
    (first_error, last)
}

impl<'a> PgTx<'a> {
    pub(crate) fn new(client: &'a ClientWrapper) -> Self {
        PgTx {
            client,
            begin: sql::BEGIN,
            begun: false,
            transient: None,
            pending: Vec::new(),
            lock_reads: false,
            xid: None,
            committing: false,
        }
    }

    /// A transaction opened with another `BEGIN` (claims run READ COMMITTED with row locks).
    pub(crate) fn with_begin(client: &'a ClientWrapper, begin: &'static str) -> Self {
        PgTx {
            begin,
            ..PgTx::new(client)
        }
    }

    /// Send the deferred writes and then `last`'s request, pipelined, and return `last`'s answer
    /// (or the first failed write's error).
    async fn after_pending<T, F, Fut>(&mut self, last: F) -> Result<T>
    where
        F: FnOnce(&'a ClientWrapper) -> Fut,
        Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        let client = self.client;
        if self.pending.is_empty() {
            return match last(client).await {
                Ok(v) => Ok(v),
                Err(e) if self.committing => Err(self.fail_commit(e)),
                Err(e) => Err(self.fail(e)),
            };
        }
        let pending = std::mem::take(&mut self.pending);
        let refs: Vec<Vec<Param<'_>>> = pending
            .iter()
            .map(|d| d.params.iter().map(|p| &**p as Param<'_>).collect())
            .collect();
        let writes: Vec<_> = pending
            .iter()
            .zip(&refs)
            .map(|(d, params)| client.execute(&d.stmt, params))
            .collect();
        let (write_err, answer) = pipeline(writes, last(client)).await;
        if let Some(e) = write_err {
            // `COMMIT` sent behind the failed write: what became of it is not known here.
            return Err(match answer.is_some() && self.committing {
                true => self.fail_commit(e),
                false => self.fail(e),
            });
        }
        match answer {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) if self.committing => Err(self.fail_commit(e)),
            Some(Err(e)) => Err(self.fail(e)),
            None => Err(Error::Backend(
                "a deferred write failed without an error".to_string(),
            )),
        }
    }

    /// Queue a write that returns nothing; it is sent with the next statement that needs an
    /// answer.
    pub(crate) async fn defer(&mut self, sql: &str, params: Vec<Owned>) -> Result<()> {
        let stmt = self.statement(sql).await?;
        self.begin_alone().await?;
        self.pending.push(Deferred { stmt, params });
        Ok(())
    }

    /// Open the transaction on its own round trip if it is not open yet. Writes are never
    /// pipelined with `BEGIN`: if `BEGIN` failed they would run outside the transaction.
    async fn begin_alone(&mut self) -> Result<()> {
        if !self.begun {
            // The apply functions always read before they write; this is only a safety net.
            let xid = self.statement(sql::XACT_ID).await?;
            let (begin, id) = futures::future::join(
                self.client.batch_execute(self.begin),
                self.client.query_one(&xid, &[]),
            )
            .await;
            if let Err(e) = begin {
                return Err(self.fail(e));
            }
            self.begun = true;
            self.xid = id.ok().and_then(|row| row.try_get(0).ok());
        }
        Ok(())
    }

    /// Run a write now (after the deferred ones) and return how many rows it touched.
    pub(crate) async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        let stmt = self.statement(sql).await?;
        self.begin_alone().await?;
        self.after_pending(|c| c.execute(&stmt, params)).await
    }

    /// Run a query whose text varies (a compiled selector) inside the transaction: one round
    /// trip with an unnamed statement and declared parameter types, nothing cached.
    pub(crate) async fn query_typed(
        &mut self,
        sql: &str,
        params: &[(Param<'_>, Type)],
    ) -> Result<Vec<Row>> {
        self.begin_alone().await?;
        self.after_pending(|c| c.query_typed(sql, params)).await
    }

    /// End the transaction: the deferred writes and `COMMIT`, pipelined. On `Err` the caller must
    /// not assume the transaction ended (a write that failed before reaching the server kept
    /// `COMMIT` from being sent): send `ROLLBACK`, which only warns if there is no transaction.
    pub(crate) async fn commit(&mut self) -> std::result::Result<(), Failure> {
        self.transient = None;
        self.committing = true;
        let committed = self.after_pending(|c| c.batch_execute("COMMIT")).await;
        self.committing = false;
        match committed {
            Ok(()) => Ok(()),
            Err(err) => Err(self
                .transient
                .take()
                .map_or(Failure::Fail(err), Failure::Retry)),
        }
    }

    /// Translate a driver error, remembering a transient one so the caller retries. This is
    /// never `COMMIT`'s answer, and `COMMIT` is only sent by [`PgTx::commit`]: a connection gone
    /// here kept nothing of the transaction, which runs again on another connection.
    fn fail(&mut self, e: tokio_postgres::Error) -> Error {
        let failure = gone_before_commit(&e).unwrap_or_else(|| classify(&e));
        self.note(failure)
    }

    /// Translate the error answering `COMMIT` (the caller looks a lost answer up).
    fn fail_commit(&mut self, e: tokio_postgres::Error) -> Error {
        self.note(classify(&e))
    }

    fn note(&mut self, failure: Failure) -> Error {
        match failure {
            Failure::Retry(msg) => {
                let err = Error::Unavailable(format!("transient: {msg}"));
                self.transient = Some(msg);
                err
            }
            Failure::Fail(err) => err,
        }
    }

    async fn statement(&mut self, sql: &str) -> Result<Statement> {
        match self.client.prepare_cached(sql).await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Run a read inside the transaction. The first one also opens it: `BEGIN` and the query are
    /// pipelined (both futures are polled in order by `join`, so `BEGIN` is written to the
    /// connection first and the query runs inside the transaction).
    pub(crate) async fn read(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        let stmt = self.statement(sql).await?;
        if self.begun {
            return self.after_pending(|c| c.query(&stmt, params)).await;
        }
        // Nothing is deferred before the transaction is open. The transaction's id goes with
        // `BEGIN` (one statement more, no round trip more).
        let xid = self.statement(sql::XACT_ID).await?;
        let client = self.client;
        let (begin, id, rows) = futures::future::join3(
            client.batch_execute(self.begin),
            client.query_one(&xid, &[]),
            client.query(&stmt, params),
        )
        .await;
        if let Err(e) = begin {
            return Err(self.fail(e));
        }
        self.begun = true;
        self.xid = id.ok().and_then(|row| row.try_get(0).ok());
        rows.map_err(|e| self.fail(e))
    }

    async fn read_one(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Row> {
        self.read(sql, params)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Backend("a single-row query returned no row".to_string()))
    }

    /// Run a write that answers one row inside the transaction (never pipelined with `BEGIN`).
    async fn write_row(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Row> {
        let stmt = self.statement(sql).await?;
        self.begin_alone().await?;
        self.after_pending(|c| c.query_one(&stmt, params)).await
    }

    /// Run a write (one statement returning the new revision) inside the transaction.
    async fn write(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Revision> {
        let stmt = self.statement(sql).await?;
        self.begin_alone().await?;
        let row = self.after_pending(|c| c.query_one(&stmt, params)).await?;
        row.try_get::<_, i64>(0)
            .map(Revision)
            .map_err(|e| self.fail(e))
    }
}

#[async_trait]
impl TxRows for PgTx<'_> {
    async fn namespace_read(&mut self, name: &str) -> Result<Option<Namespace>> {
        let rows = self.read(sql::NAMESPACE_GET, &[&name]).await?;
        rows.first().map(sql::namespace_from_row).transpose()
    }

    async fn namespace_usage(&mut self, name: &str) -> Result<Vec<(String, u64)>> {
        let rows = self.read(sql::NAMESPACE_USAGE, &[&name]).await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get(0).map_err(|e| self.fail(e))?;
                let count: i64 = r.try_get(1).map_err(|e| self.fail(e))?;
                Ok((kind, u64::try_from(count).unwrap_or(0)))
            })
            .collect()
    }

    async fn namespace_put(&mut self, ns: &Namespace, change: &ChangeDraft) -> Result<Revision> {
        let labels = sql::labels_text(&ns.labels);
        let params = sql::with_change(
            change,
            &[&ns.name, &labels, &ns.created_at.0, &ns.updated_at.0],
        );
        self.write(sql::NAMESPACE_PUT, &params).await
    }

    async fn namespace_remove(&mut self, name: &str, change: &ChangeDraft) -> Result<Revision> {
        let params = sql::with_change(change, &[&name]);
        self.write(sql::NAMESPACE_REMOVE, &params).await
    }

    async fn object_read(&mut self, key: &ObjectKey) -> Result<Option<Object>> {
        let rows = self
            .read(sql::OBJECT_GET, &[&key.namespace, &key.kind, &key.id])
            .await?;
        rows.first().map(sql::object_from_row).transpose()
    }

    async fn object_put(&mut self, obj: &Object, change: &ChangeDraft) -> Result<Revision> {
        let labels = sql::labels_text(&obj.labels);
        let params = sql::with_change(
            change,
            &[
                &obj.key.namespace,
                &obj.key.kind,
                &obj.key.id,
                &labels,
                &obj.created_at.0,
                &obj.updated_at.0,
            ],
        );
        self.write(sql::OBJECT_PUT, &params).await
    }

    async fn object_remove(&mut self, key: &ObjectKey, change: &ChangeDraft) -> Result<Revision> {
        let params = sql::with_change(change, &[&key.namespace, &key.kind, &key.id]);
        self.write(sql::OBJECT_REMOVE, &params).await
    }

    async fn tag_read(&mut self, key: &ObjectKey, name: &str) -> Result<TagRead> {
        // Always locked (see `sql::TAG_READ_LOCKED`).
        let row = self
            .read_one(
                sql::TAG_READ_LOCKED,
                &[&key.namespace, &key.kind, &key.id, &name],
            )
            .await?;
        let object_exists: bool = row.try_get(0).map_err(|e| self.fail(e))?;
        Ok(TagRead {
            object_exists,
            tag: sql::tag_from_read_row(key, name, &row)?,
        })
    }

    async fn tag_read_all(&mut self, key: &ObjectKey) -> Result<Vec<(Tag, String)>> {
        let rows = self
            .read(sql::TAG_LIST, &[&key.namespace, &key.kind, &key.id])
            .await?;
        rows.iter().map(|r| sql::tag_from_row(key, r)).collect()
    }

    async fn tag_put(&mut self, tag: &Tag, text: &str, change: &ChangeDraft) -> Result<Revision> {
        let params = sql::with_change(
            change,
            &[
                &tag.object.namespace,
                &tag.object.kind,
                &tag.object.id,
                &tag.name,
                &text,
                &tag.updated_at.0,
            ],
        );
        self.write(sql::TAG_PUT, &params).await
    }

    async fn tag_remove(
        &mut self,
        key: &ObjectKey,
        name: &str,
        change: &ChangeDraft,
    ) -> Result<Revision> {
        let params = sql::with_change(change, &[&key.namespace, &key.kind, &key.id, &name]);
        self.write(sql::TAG_REMOVE, &params).await
    }

    async fn tag_read_many(&mut self, items: &[(ObjectKey, String)]) -> Result<Vec<TagRead>> {
        let keys: Vec<serde_json::Value> = items
            .iter()
            .enumerate()
            .map(|(n, (k, name))| {
                serde_json::json!({"n": n, "ns": k.namespace, "kind": k.kind, "id": k.id, "name": name})
            })
            .collect();
        let text = serde_json::Value::Array(keys).to_string();
        let rows = self.read(sql::TAG_READ_MANY_LOCKED, &[&text]).await?;
        if rows.len() != items.len() {
            return Err(Error::Backend(format!(
                "reading {} tags returned {} rows",
                items.len(),
                rows.len()
            )));
        }
        items
            .iter()
            .zip(&rows)
            .map(|((key, name), row)| {
                Ok(TagRead {
                    object_exists: row.try_get(0).map_err(crate::error::db_err)?,
                    tag: sql::tag_from_read_row(key, name, row)?,
                })
            })
            .collect()
    }

    async fn tag_remove_many(
        &mut self,
        items: &[(ObjectKey, String)],
        changes: &[ChangeDraft],
    ) -> Result<Vec<Revision>> {
        let keys: Vec<serde_json::Value> = items
            .iter()
            .zip(changes)
            .enumerate()
            .map(|(n, ((k, name), c))| {
                serde_json::json!({"n": n, "ns": k.namespace, "kind": k.kind, "id": k.id,
                    "name": name, "old": c.old_value, "at": c.at.0})
            })
            .collect();
        let text = serde_json::Value::Array(keys).to_string();
        let stmt = self.statement(sql::TAG_REMOVE_MANY).await?;
        self.begin_alone().await?;
        let params: [Param<'_>; 1] = [&text];
        let rows = self.after_pending(|c| c.query(&stmt, &params)).await?;
        let mut by_key = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let rev: i64 = row.try_get(0).map_err(crate::error::db_err)?;
            let key = fleetdb_core::apply::stored_key(
                row.try_get(1).map_err(crate::error::db_err)?,
                row.try_get(2).map_err(crate::error::db_err)?,
                row.try_get(3).map_err(crate::error::db_err)?,
            );
            let name: String = row.try_get(4).map_err(crate::error::db_err)?;
            by_key.insert((key, name), Revision(rev));
        }
        items
            .iter()
            .map(|item| {
                by_key.get(item).copied().ok_or_else(|| {
                    Error::Backend(format!(
                        "no change-log row for tag {:?} of {}",
                        item.1, item.0
                    ))
                })
            })
            .collect()
    }

    // ---- the World ----

    async fn world_read(&mut self, space: Space, key: &str) -> Result<Option<WorldRecord>> {
        let rows = self.read(sql::WORLD_GET, &[&space.as_str(), &key]).await?;
        rows.first().map(sql::world_from_row).transpose()
    }

    async fn world_scan(&mut self, query: &WorldQuery) -> Result<Vec<WorldRecord>> {
        let (text, params) = query.to_sql(Dialect::Postgres, sql::WORLD_COLUMNS);
        let params = work::TypedParams::new(params);
        let rows = self.query_typed(&text, &params.typed()).await?;
        rows.iter().map(sql::world_from_row).collect()
    }

    async fn world_put(&mut self, record: &WorldRecord, change: &ChangeDraft) -> Result<Revision> {
        let space = record.space.as_str();
        let expires_at = record.expires_at.map(|t| t.0);
        let params = sql::with_change(
            change,
            &[
                &space,
                &record.key,
                &record.scope,
                &record.owner,
                &record.kind,
                &record.name,
                &record.target,
                &record.data,
                &record.meta,
                &record.session_id,
                &expires_at,
                &record.create_revision.0,
                &record.created_at.0,
                &record.updated_at.0,
            ],
        );
        self.write(sql::WORLD_PUT, &params).await
    }

    async fn world_remove(
        &mut self,
        space: Space,
        key: &str,
        change: &ChangeDraft,
    ) -> Result<Revision> {
        let space = space.as_str();
        let params = sql::with_change(change, &[&space, &key]);
        self.write(sql::WORLD_REMOVE, &params).await
    }

    async fn change_append(&mut self, change: &ChangeDraft) -> Result<Revision> {
        let params = sql::with_change(change, &[]);
        self.write(sql::CHANGE_APPEND, &params).await
    }

    // ---- sessions and work (see crate::work) ----

    async fn session_read(&mut self, id: &str) -> Result<Option<SessionInfo>> {
        work::session_read(self, id).await
    }

    async fn session_insert(&mut self, s: &SessionInfo) -> Result<()> {
        work::session_insert(self, s).await
    }

    async fn session_remove(&mut self, id: &str) -> Result<()> {
        work::session_remove(self, id).await
    }

    async fn sessions_expired(&mut self, now: Timestamp, limit: usize) -> Result<Vec<SessionInfo>> {
        work::sessions_expired(self, now, limit).await
    }

    async fn process_read(&mut self, name: &str) -> Result<Option<Process>> {
        work::process_read(self, name).await
    }

    async fn process_put(&mut self, p: &Process) -> Result<()> {
        work::process_put(self, p).await
    }

    async fn process_all(&mut self) -> Result<Vec<Process>> {
        work::process_all(self).await
    }

    async fn work_read(&mut self, key: &ObjectKey, process: &str) -> Result<Option<WorkInfo>> {
        work::work_read(self, key, process).await
    }

    async fn lock_process(&mut self, name: &str) -> Result<()> {
        work::lock_process(self, name).await
    }

    async fn work_count_live(&mut self, process: &str, now: Timestamp) -> Result<u64> {
        work::work_count_live(self, process, now.0).await
    }

    async fn work_read_held(&mut self, key: &ObjectKey, process: &str) -> Result<Option<WorkInfo>> {
        work::work_read_held(self, key, process).await
    }

    async fn work_of_session(&mut self, session_id: &str) -> Result<Vec<WorkInfo>> {
        work::work_of_session(self, session_id).await
    }

    async fn work_orphaned(&mut self, limit: usize) -> Result<Vec<WorkInfo>> {
        work::work_orphaned(self, limit).await
    }

    async fn work_insert(&mut self, w: &WorkInfo) -> Result<()> {
        work::work_insert(self, w).await
    }

    async fn work_remove(&mut self, key: &ObjectKey, process: &str) -> Result<()> {
        work::work_remove(self, key, process).await
    }

    async fn backoff_read(
        &mut self,
        key: &ObjectKey,
        process: &str,
    ) -> Result<Option<BackoffInfo>> {
        work::backoff_read(self, key, process).await
    }

    async fn backoff_put(&mut self, b: &BackoffInfo) -> Result<()> {
        work::backoff_put(self, b).await
    }

    async fn backoff_remove(&mut self, key: &ObjectKey, process: &str) -> Result<bool> {
        work::backoff_remove(self, key, process).await
    }

    async fn history_append(&mut self, h: &fleetdb_core::work::HistoryEntry) -> Result<()> {
        work::history_append(self, h).await
    }

    async fn next_token(&mut self) -> Result<i64> {
        work::next_token(self).await
    }

    async fn next_tokens(&mut self, n: usize) -> Result<Vec<i64>> {
        work::next_tokens(self, n).await
    }

    async fn work_release_many(
        &mut self,
        _works: &[WorkInfo],
        history: &[fleetdb_core::work::HistoryEntry],
        clear_backoff: bool,
    ) -> Result<()> {
        // Each history entry names its claim's key and process.
        work::work_release_many(self, history, clear_backoff).await
    }

    async fn work_read_many(&mut self, keys: &[ObjectKey], process: &str) -> Result<Vec<WorkInfo>> {
        work::work_read_many(self, keys, process).await
    }

    async fn claim_candidates(&mut self, q: &CandidateQuery) -> Result<Vec<ObjectKey>> {
        work::claim_candidates(self, q).await
    }

    // ---- leases, collectable kinds, blob metadata (see crate::gc) ----

    async fn gc_kind_read(&mut self, kind: &str) -> Result<Option<GcKind>> {
        let rows = self.read(gc::GC_KIND_GET, &[&kind]).await?;
        rows.first().map(gc::gc_kind_from_row).transpose()
    }

    async fn gc_kind_read_held(&mut self, kind: &str) -> Result<Option<GcKind>> {
        let rows = self.read(gc::GC_KIND_GET_SHARE, &[&kind]).await?;
        rows.first().map(gc::gc_kind_from_row).transpose()
    }

    async fn gc_kind_put(&mut self, k: &GcKind) -> Result<()> {
        let collectable = i64::from(k.collectable);
        self.execute(gc::GC_KIND_PUT, &[&k.kind, &collectable, &k.declared_at.0])
            .await?;
        Ok(())
    }

    async fn lease_read(&mut self, id: &str) -> Result<Option<Lease>> {
        let rows = self.read(gc::LEASE_GET, &[&id]).await?;
        rows.first().map(gc::lease_from_row).transpose()
    }

    async fn lease_put(&mut self, lease: &Lease, change: &ChangeDraft) -> Result<Revision> {
        let labels = gc::labels_text(&lease.labels);
        let flat = i64::from(lease.flat);
        let expires = lease.expires_at.map(|t| t.0);
        let params = sql::with_change(
            change,
            &[&lease.id, &labels, &flat, &expires, &lease.created_at.0],
        );
        self.write(gc::LEASE_PUT, &params).await
    }

    async fn lease_remove(&mut self, id: &str, change: &ChangeDraft) -> Result<Revision> {
        let params = sql::with_change(change, &[&id]);
        self.write(gc::LEASE_REMOVE, &params).await
    }

    async fn lease_resource_add(
        &mut self,
        lease: &str,
        resource: &Resource,
        now: Timestamp,
    ) -> Result<Option<u64>> {
        let (rtype, ns, kind, id) = resource.columns();
        let row = self
            .write_row(
                gc::LEASE_RESOURCE_ADD,
                &[&lease, &rtype, &ns, &kind, &id, &now.0],
            )
            .await?;
        let added: bool = row.try_get(0).map_err(|e| self.fail(e))?;
        let count: Option<i64> = row.try_get(1).map_err(|e| self.fail(e))?;
        Ok(added.then(|| count.map_or(0, |n| n.max(0) as u64)))
    }

    async fn lease_resource_remove(&mut self, lease: &str, resource: &Resource) -> Result<bool> {
        let (rtype, ns, kind, id) = resource.columns();
        let row = self
            .write_row(
                gc::LEASE_RESOURCE_REMOVE,
                &[&lease, &rtype, &ns, &kind, &id],
            )
            .await?;
        row.try_get(0).map_err(|e| self.fail(e))
    }

    async fn lease_resources_of(&mut self, lease: &str) -> Result<Vec<Resource>> {
        let rows = self.read(gc::LEASE_RESOURCES_OF, &[&lease]).await?;
        let mut out = rows
            .iter()
            .map(|r| gc::resource_from_row(r, 0))
            .collect::<Result<Vec<_>>>()?;
        out.sort();
        Ok(out)
    }

    async fn blob_meta_read(&mut self, digest: &str) -> Result<Option<BlobInfo>> {
        let rows = self.read(gc::BLOB_GET, &[&digest]).await?;
        rows.first().map(gc::blob_from_row).transpose()
    }

    async fn blob_meta_put(&mut self, b: &BlobInfo, change: &ChangeDraft) -> Result<Revision> {
        let labels = gc::labels_text(&b.labels);
        let size = i64::try_from(b.size)
            .map_err(|_| Error::invalid("blob size", b.size.to_string(), "too large"))?;
        let params = sql::with_change(
            change,
            &[&b.digest, &size, &labels, &b.created_at.0, &b.updated_at.0],
        );
        self.write(gc::BLOB_PUT, &params).await
    }

    async fn blob_meta_remove(&mut self, digest: &str, change: &ChangeDraft) -> Result<Revision> {
        let params = sql::with_change(change, &[&digest]);
        self.write(gc::BLOB_REMOVE, &params).await
    }

    async fn gc_objects_remove(
        &mut self,
        keys: &[ObjectKey],
        mark: Revision,
    ) -> Result<Option<GcRemoved<RemovedObject>>> {
        let mut out = GcRemoved {
            removed: Vec::with_capacity(keys.len()),
            kept: 0,
        };
        if keys.is_empty() {
            return Ok(Some(out));
        }
        let ns: Vec<&str> = keys.iter().map(|k| k.namespace.as_str()).collect();
        let kinds: Vec<&str> = keys.iter().map(|k| k.kind.as_str()).collect();
        let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        let rows = self
            .read(gc::SWEEP_OBJECTS, &[&ns, &kinds, &ids, &mark.0])
            .await?;
        let mut tags: std::collections::HashMap<ObjectKey, Vec<(String, String)>> =
            std::collections::HashMap::new();
        for r in &rows {
            let what: i32 = r.try_get(0).map_err(|e| self.fail(e))?;
            let text: String = r.try_get(4).map_err(|e| self.fail(e))?;
            let key = fleetdb_core::apply::stored_key(
                r.try_get(1).map_err(|e| self.fail(e))?,
                r.try_get(2).map_err(|e| self.fail(e))?,
                r.try_get(3).map_err(|e| self.fail(e))?,
            );
            if what == 0 {
                out.removed.push(RemovedObject {
                    key,
                    labels: sql::parse_labels_pub(&text)?,
                    tags: Vec::new(),
                });
            } else {
                let name: String = r.try_get(5).map_err(|e| self.fail(e))?;
                tags.entry(key).or_default().push((name, text));
            }
        }
        for o in &mut out.removed {
            if let Some(mut t) = tags.remove(&o.key) {
                t.sort_unstable();
                o.tags = t;
            }
        }
        if out.removed.len() < keys.len() {
            let row = self
                .read_one(gc::SWEEP_OBJECTS_EXISTING, &[&ns, &kinds, &ids])
                .await?;
            let existed: i64 = row.try_get(0).map_err(|e| self.fail(e))?;
            out.kept = u64::try_from(existed)
                .unwrap_or(0)
                .saturating_sub(out.removed.len() as u64);
        }
        Ok(Some(out))
    }

    async fn gc_blobs_remove(
        &mut self,
        digests: &[String],
        mark: Revision,
    ) -> Result<Option<GcRemoved<BlobInfo>>> {
        let mut out = GcRemoved {
            removed: Vec::with_capacity(digests.len()),
            kept: 0,
        };
        if digests.is_empty() {
            return Ok(Some(out));
        }
        let rows = self.read(gc::SWEEP_BLOBS, &[&digests, &mark.0]).await?;
        for r in &rows {
            let labels: String = r.try_get(2).map_err(|e| self.fail(e))?;
            out.removed.push(BlobInfo {
                digest: r.try_get(0).map_err(|e| self.fail(e))?,
                size: u64::try_from(r.try_get::<_, i64>(1).map_err(|e| self.fail(e))?).unwrap_or(0),
                labels: sql::parse_labels_pub(&labels)?,
                created_at: Timestamp(r.try_get(3).map_err(|e| self.fail(e))?),
                updated_at: Timestamp(r.try_get(4).map_err(|e| self.fail(e))?),
                revision: Revision(r.try_get(5).map_err(|e| self.fail(e))?),
            });
        }
        if out.removed.len() < digests.len() {
            let row = self.read_one(gc::SWEEP_BLOBS_EXISTING, &[&digests]).await?;
            let existed: i64 = row.try_get(0).map_err(|e| self.fail(e))?;
            out.kept = u64::try_from(existed)
                .unwrap_or(0)
                .saturating_sub(out.removed.len() as u64);
        }
        Ok(Some(out))
    }

    /// ONE statement, deferred: it is sent with the next statement or `COMMIT`.
    async fn changes_append_many(&mut self, changes: &[ChangeDraft]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let col = |f: &dyn Fn(&ChangeDraft) -> String| -> Owned {
            Box::new(changes.iter().map(f).collect::<Vec<String>>())
        };
        let params: Vec<Owned> = vec![
            col(&|c| c.namespace.clone()),
            col(&|c| c.kind.clone()),
            col(&|c| c.id.clone()),
            col(&|c| c.entity.as_str().to_string()),
            col(&|c| c.name.clone()),
            col(&|c| c.op.as_str().to_string()),
            Box::new(
                changes
                    .iter()
                    .map(|c| c.old_value.clone())
                    .collect::<Vec<Option<String>>>(),
            ),
            Box::new(
                changes
                    .iter()
                    .map(|c| c.new_value.clone())
                    .collect::<Vec<Option<String>>>(),
            ),
            Box::new(changes.iter().map(|c| c.at.0).collect::<Vec<i64>>()),
        ];
        self.defer(gc::CHANGES_APPEND_MANY, params).await
    }

    async fn changes_after(
        &mut self,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<(Revision, String, String, String)>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.read(gc::CHANGES_AFTER, &[&after.0, &limit]).await?;
        if rows.is_empty() {
            return Err(Error::Backend(
                "fleetdb_meta has no compacted_revision row".to_string(),
            ));
        }
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let compacted: i64 = r.try_get(0).map_err(|e| self.fail(e))?;
            if after.0 < compacted {
                return Err(Error::Compacted {
                    requested: after,
                    compacted_revision: Revision(compacted),
                });
            }
            if let Some(rev) = r.try_get::<_, Option<i64>>(1).map_err(|e| self.fail(e))? {
                out.push((
                    Revision(rev),
                    r.try_get(2).map_err(|e| self.fail(e))?,
                    r.try_get(3).map_err(|e| self.fail(e))?,
                    r.try_get(4).map_err(|e| self.fail(e))?,
                ));
            }
        }
        Ok(out)
    }

    async fn lock_object(&mut self, key: &ObjectKey) -> Result<()> {
        let params: [Param<'_>; 3] = [&key.namespace, &key.kind, &key.id];
        self.read(
            "SELECT 1 FROM objects WHERE namespace = $1 AND kind = $2 AND id = $3 FOR UPDATE",
            &params,
        )
        .await?;
        Ok(())
    }
}
