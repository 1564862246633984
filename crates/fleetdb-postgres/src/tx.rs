//! One SERIALIZABLE transaction wrapped as [`TxRows`]: the row-level primitives
//! [`fleetdb_core::apply::apply_batch`] drives.
//!
//! Round trips: the transaction is opened lazily and `BEGIN` is pipelined with the first read (it
//! is sent on the same connection just before it, and both answers are awaited together). Every
//! `*_put` / `*_remove` is ONE statement: a data-modifying CTE that takes `nextval` for the
//! revision, appends the change-log row and writes the row.

use async_trait::async_trait;
use deadpool_postgres::ClientWrapper;
use fleetdb_core::backend::{ChangeDraft, TagRead, TxRows};
use fleetdb_core::{Error, Namespace, Object, ObjectKey, Result, Revision, Tag};
use tokio_postgres::{Row, Statement};

use crate::error::{classify, Failure};
use crate::sql::{self, Param};

pub(crate) struct PgTx<'a> {
    client: &'a ClientWrapper,
    /// `BEGIN` has been sent and succeeded: the transaction must be ended.
    pub(crate) begun: bool,
    /// A transient failure (serialization failure, deadlock) happened: retry the whole batch.
    pub(crate) transient: Option<String>,
}

impl<'a> PgTx<'a> {
    pub(crate) fn new(client: &'a ClientWrapper) -> Self {
        PgTx {
            client,
            begun: false,
            transient: None,
        }
    }

    /// Translate a driver error, remembering a transient one so the caller retries.
    fn fail(&mut self, e: tokio_postgres::Error) -> Error {
        match classify(&e) {
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
        let client = self.client;
        let result = if self.begun {
            client.query(&stmt, params).await
        } else {
            let (begin, rows) = futures::future::join(
                client.batch_execute(sql::BEGIN),
                client.query(&stmt, params),
            )
            .await;
            if let Err(e) = begin {
                return Err(self.fail(e));
            }
            self.begun = true;
            rows
        };
        result.map_err(|e| self.fail(e))
    }

    async fn read_one(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Row> {
        self.read(sql, params)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Backend("a single-row query returned no row".to_string()))
    }

    /// Run a write (one statement returning the new revision) inside the transaction.
    async fn write(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Revision> {
        let stmt = self.statement(sql).await?;
        if !self.begun {
            // apply_batch always reads before it writes; this is only a safety net. A write is
            // never pipelined with BEGIN: if BEGIN failed it would run outside the transaction.
            if let Err(e) = self.client.batch_execute(sql::BEGIN).await {
                return Err(self.fail(e));
            }
            self.begun = true;
        }
        match self.client.query_one(&stmt, params).await {
            Ok(row) => row
                .try_get::<_, i64>(0)
                .map(Revision)
                .map_err(|e| self.fail(e)),
            Err(e) => Err(self.fail(e)),
        }
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
        let row = self
            .read_one(sql::TAG_READ, &[&key.namespace, &key.kind, &key.id, &name])
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
}
