//! The content store on PostgreSQL: blob and ingest bytes are chunk rows, so every server sharing
//! the database shares the blobs.
//!
//! Chunks are keyed by the byte offset they start at and are aligned: every chunk starts at a
//! multiple of [`CHUNK_BYTES`] and all but the last are full (a write that ends inside a chunk
//! leaves it short; the next write extends it). So the chunk rows of one content are the same
//! whichever way it was uploaded, and copying an upload's chunks into `blob_chunks` with
//! `ON CONFLICT DO NOTHING` is harmless when the blob is there already.
//!
//! A commit verifies the whole upload (sha256 and size) in a read-only snapshot first; a mismatch
//! commits nothing. Then ONE serializable transaction takes the digest's advisory lock, checks
//! the upload did not move, copies its chunks to `blob_chunks`, applies `Op::BlobCommit` like any
//! batch (lease check, change-log row) and drops the upload. Byte removal
//! ([`blob_remove_bytes`]) takes the same lock and then deletes, in a statement that starts after
//! the lock is held, only chunks whose digest has no metadata: it can never remove the bytes of a
//! blob whose commit it raced.

use fleetdb_core::apply::apply_batch;
use fleetdb_core::batch::{Applied, Batch, Op, OpResult};
use fleetdb_core::content::{
    check_commit, check_expected, check_ingest_start, check_resume, check_write, digest_mismatch,
    range, validate_ingest_ref, IngestStatus, CHUNK_BYTES, INGEST_WRITE_BYTES_MAX,
};
use fleetdb_core::gc::BlobInfo;
use fleetdb_core::world::validate_digest;
use fleetdb_core::{Error, Labels, Result, Timestamp};
use futures::{pin_mut, TryStreamExt};
use sha2::Digest as _;
use tokio_postgres::Row;

use crate::error::{classify, db_err, Failure};
use crate::gc;
use crate::sql::Param;
use crate::tx::PgTx;
use crate::{retrying, PostgresBackend, TxGuard};

const CHUNK: i64 = CHUNK_BYTES as i64;
/// Digests whose bytes one transaction removes at most.
const REMOVE_BATCH: usize = 1_000;

#[cfg(test)]
const INGEST_COLUMNS: &str =
    "ref, expected_digest, expected_size, \"offset\", started_at, updated_at, expires_at";
const INGEST_GET: &str = "SELECT ref, expected_digest, expected_size, \"offset\", started_at, \
     updated_at, expires_at FROM ingests WHERE ref = $1";
const INGEST_LOCK: &str = "SELECT ref, expected_digest, expected_size, \"offset\", started_at, \
     updated_at, expires_at FROM ingests WHERE ref = $1 FOR UPDATE";
const INGEST_LIST: &str = "SELECT ref, expected_digest, expected_size, \"offset\", started_at, \
     updated_at, expires_at FROM ingests ORDER BY ref";
const INGEST_INSERT: &str = "INSERT INTO ingests \
     (ref, expected_digest, expected_size, \"offset\", started_at, updated_at, expires_at) \
     VALUES ($1, $2, $3, 0, $4, $4, $5) ON CONFLICT (ref) DO NOTHING";
/// Start an expired upload over.
const INGEST_RESET: &str = "UPDATE ingests SET expected_digest = $2, expected_size = $3, \
     \"offset\" = 0, started_at = $4, updated_at = $4, expires_at = $5 WHERE ref = $1";
const INGEST_TOUCH: &str = "UPDATE ingests SET expected_digest = $2, expected_size = $3, \
     updated_at = $4, expires_at = $5 WHERE ref = $1";
/// A write touches the upload: its expiry moves (never back).
const INGEST_ADVANCE: &str = "UPDATE ingests SET \"offset\" = $2, updated_at = $3, \
     expires_at = GREATEST(expires_at, $4) WHERE ref = $1";
const INGEST_CHUNKS_DROP: &str = "DELETE FROM ingest_chunks WHERE ref = $1";
const INGEST_DROP: &str = "DELETE FROM ingests WHERE ref = $1";
const INGEST_CHUNK_EXTEND: &str =
    "UPDATE ingest_chunks SET data = data || $3 WHERE ref = $1 AND seq = $2";
const INGEST_CHUNKS_ADD: &str = "INSERT INTO ingest_chunks (ref, seq, data) \
     SELECT $1, s, d FROM unnest($2::bigint[], $3::bytea[]) AS t(s, d)";
const INGEST_CHUNKS_READ: &str = "SELECT seq, data FROM ingest_chunks WHERE ref = $1 ORDER BY seq";
const INGEST_ABORT: &str = "WITH d AS (DELETE FROM ingests WHERE ref = $1 RETURNING ref), \
     c AS (DELETE FROM ingest_chunks WHERE ref = $1) SELECT count(*) FROM d";
const INGEST_SWEEP: &str = "WITH d AS (DELETE FROM ingests WHERE expires_at <= $1 RETURNING ref), \
     c AS (DELETE FROM ingest_chunks WHERE ref IN (SELECT ref FROM d)) SELECT count(*) FROM d";
const INGEST_CHUNK_ORPHANS: &str = "WITH d AS (DELETE FROM ingest_chunks AS c \
     WHERE NOT EXISTS (SELECT 1 FROM ingests AS i WHERE i.ref = c.ref) RETURNING ref) \
     SELECT count(DISTINCT ref) FROM d";

const LOCK_DIGEST: &str = "SELECT pg_advisory_xact_lock($1::bigint)";
/// The locks of several digests, in ascending key order (no deadlock between two removers).
const LOCK_DIGESTS: &str = "SELECT count(pg_advisory_xact_lock(k)) FROM \
     (SELECT DISTINCT k FROM unnest($1::bigint[]) AS k ORDER BY k) AS s";
const COPY_CHUNKS: &str = "INSERT INTO blob_chunks (digest, seq, data) \
     SELECT $2, seq, data FROM ingest_chunks WHERE ref = $1 ON CONFLICT DO NOTHING";
const BLOB_CHUNKS_RANGE: &str = "SELECT seq, data FROM blob_chunks \
     WHERE digest = $1 AND seq > $2 AND seq < $3 ORDER BY seq";
/// Chunks of these digests whose metadata is gone, in a statement that starts after the locks.
const BLOB_BYTES_REMOVE: &str = "WITH d AS (DELETE FROM blob_chunks AS b \
     WHERE b.digest = ANY($1::text[]) \
     AND NOT EXISTS (SELECT 1 FROM blobs AS m WHERE m.digest = b.digest) RETURNING digest) \
     SELECT count(DISTINCT digest) FROM d";
const BLOB_ORPHANS: &str = "SELECT DISTINCT digest FROM blob_chunks AS b \
     WHERE NOT EXISTS (SELECT 1 FROM blobs AS m WHERE m.digest = b.digest)";

/// The advisory lock key of a digest: its first 64 bits.
fn lock_key(digest: &str) -> i64 {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    match hex.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok()) {
        Some(v) => v as i64,
        // Not a digest (never stored): any stable key will do.
        None => digest.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }) as i64,
    }
}

fn i64_of(n: u64, field: &str) -> Result<i64> {
    i64::try_from(n).map_err(|_| Error::invalid(field, n.to_string(), "too large"))
}

fn ingest_from_row(r: &Row) -> Result<IngestStatus> {
    let size: Option<i64> = r.try_get(2).map_err(db_err)?;
    let offset: i64 = r.try_get(3).map_err(db_err)?;
    Ok(IngestStatus {
        reference: r.try_get(0).map_err(db_err)?,
        expected_digest: r.try_get(1).map_err(db_err)?,
        expected_size: size.map(|s| u64::try_from(s).unwrap_or(0)),
        offset: u64::try_from(offset).unwrap_or(0),
        started_at: Timestamp(r.try_get(4).map_err(db_err)?),
        updated_at: Timestamp(r.try_get(5).map_err(db_err)?),
        expires_at: Timestamp(r.try_get(6).map_err(db_err)?),
    })
}

fn hex_digest(h: sha2::Sha256) -> String {
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in h.finalize() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn pg(e: tokio_postgres::Error) -> Failure {
    classify(&e)
}

fn fail(e: Error) -> Failure {
    Failure::Fail(e)
}

/// One explicit transaction on one pooled connection.
struct Tx {
    guard: TxGuard,
}

impl Tx {
    async fn begin(backend: &PostgresBackend, begin: &str) -> std::result::Result<Tx, Failure> {
        let client = backend.client().await.map_err(fail)?;
        let guard = TxGuard {
            client: Some(client),
            open: true,
        };
        guard.client().batch_execute(begin).await.map_err(pg)?;
        Ok(Tx { guard })
    }

    fn conn(&self) -> &deadpool_postgres::ClientWrapper {
        self.guard.client()
    }

    async fn query(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> std::result::Result<Vec<Row>, Failure> {
        let c = self.conn();
        let stmt = c.prepare_cached(sql).await.map_err(pg)?;
        c.query(&stmt, params).await.map_err(pg)
    }

    async fn execute(&self, sql: &str, params: &[Param<'_>]) -> std::result::Result<u64, Failure> {
        let c = self.conn();
        let stmt = c.prepare_cached(sql).await.map_err(pg)?;
        c.execute(&stmt, params).await.map_err(pg)
    }

    /// COMMIT (or ROLLBACK); the connection goes back to the pool only if that worked.
    async fn end(mut self, commit: bool) -> std::result::Result<(), Failure> {
        self.conn()
            .batch_execute(if commit { "COMMIT" } else { "ROLLBACK" })
            .await
            .map_err(pg)?;
        self.guard.open = false;
        Ok(())
    }

    /// Roll back after `err` and return it.
    async fn abandon<T>(self, err: Failure) -> std::result::Result<T, Failure> {
        let _ = self.end(false).await;
        Err(err)
    }
}

const READ_COMMITTED: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";
const SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

impl PostgresBackend {
    pub(crate) async fn content_ingest_start(
        &self,
        reference: &str,
        expected: Option<(&str, u64)>,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<IngestStatus> {
        check_ingest_start(reference, expected, now, expires_at)?;
        retrying(&self.retries, || {
            self.ingest_start_once(reference, expected, now, expires_at)
        })
        .await
    }

    async fn ingest_start_once(
        &self,
        reference: &str,
        expected: Option<(&str, u64)>,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> std::result::Result<IngestStatus, Failure> {
        let tx = Tx::begin(self, READ_COMMITTED).await?;
        let out = async {
            let (digest, size) = match expected {
                Some((d, s)) => (Some(d), Some(i64_of(s, "expected size").map_err(fail)?)),
                None => (None, None),
            };
            let inserted = tx
                .execute(
                    INGEST_INSERT,
                    &[&reference, &digest, &size, &now.0, &expires_at.0],
                )
                .await?;
            if inserted == 1 {
                // Chunks an earlier upload of this reference may have left.
                tx.execute(INGEST_CHUNKS_DROP, &[&reference]).await?;
            } else {
                let rows = tx.query(INGEST_LOCK, &[&reference]).await?;
                let Some(row) = rows.first() else {
                    return Err(Failure::Retry(format!(
                        "upload {reference:?} vanished while it was resumed"
                    )));
                };
                let stored = ingest_from_row(row).map_err(fail)?;
                if stored.expires_at <= now {
                    tx.execute(INGEST_CHUNKS_DROP, &[&reference]).await?;
                    tx.execute(
                        INGEST_RESET,
                        &[&reference, &digest, &size, &now.0, &expires_at.0],
                    )
                    .await?;
                } else {
                    check_resume(reference, &stored, expected).map_err(fail)?;
                    let digest = digest.map(str::to_string).or(stored.expected_digest);
                    let size = size.or(stored.expected_size.map(|s| s as i64));
                    tx.execute(
                        INGEST_TOUCH,
                        &[&reference, &digest, &size, &now.0, &expires_at.0],
                    )
                    .await?;
                }
            }
            let rows = tx.query(INGEST_GET, &[&reference]).await?;
            let row = rows
                .first()
                .ok_or_else(|| fail(Error::Backend("the upload row vanished".into())))?;
            ingest_from_row(row).map_err(fail)
        }
        .await;
        match out {
            Ok(status) => {
                tx.end(true).await?;
                Ok(status)
            }
            Err(e) => tx.abandon(e).await,
        }
    }

    pub(crate) async fn content_ingest_write(
        &self,
        reference: &str,
        offset: u64,
        data: &[u8],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<IngestStatus> {
        validate_ingest_ref(reference)?;
        if data.len() > INGEST_WRITE_BYTES_MAX {
            return Err(Error::TooLarge {
                field: "ingest write".into(),
                size: data.len(),
                max: INGEST_WRITE_BYTES_MAX,
            });
        }
        retrying(&self.retries, || {
            self.ingest_write_once(reference, offset, data, now, expires_at)
        })
        .await
    }

    async fn ingest_write_once(
        &self,
        reference: &str,
        offset: u64,
        data: &[u8],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> std::result::Result<IngestStatus, Failure> {
        let tx = Tx::begin(self, READ_COMMITTED).await?;
        let out = async {
            let rows = tx.query(INGEST_LOCK, &[&reference]).await?;
            let mut status = match rows.first() {
                Some(r) => ingest_from_row(r).map_err(fail)?,
                None => return Err(fail(Error::not_found(format!("upload {reference:?}")))),
            };
            if status.expires_at <= now {
                return Err(fail(Error::not_found(format!(
                    "upload {reference:?} (it expired)"
                ))));
            }
            check_write(&status, offset, data.len()).map_err(fail)?;
            if data.is_empty() {
                return Ok(status);
            }
            let start = i64_of(offset, "offset").map_err(fail)?;
            let mut rest = data;
            let mut pos = start;
            // Fill the last, short chunk first.
            let into = pos % CHUNK;
            if into != 0 {
                let n = ((CHUNK - into) as usize).min(rest.len());
                let seq = pos - into;
                let piece = &rest[..n];
                let updated = tx
                    .execute(INGEST_CHUNK_EXTEND, &[&reference, &seq, &piece])
                    .await?;
                if updated != 1 {
                    return Err(fail(Error::Backend(format!(
                        "upload {reference:?} lost its chunk at {seq}; abort it and start again"
                    ))));
                }
                rest = &rest[n..];
                pos += n as i64;
            }
            let mut seqs: Vec<i64> = Vec::new();
            let mut chunks: Vec<&[u8]> = Vec::new();
            for piece in rest.chunks(CHUNK_BYTES) {
                seqs.push(pos);
                chunks.push(piece);
                pos += piece.len() as i64;
            }
            if !seqs.is_empty() {
                tx.execute(INGEST_CHUNKS_ADD, &[&reference, &seqs, &chunks])
                    .await?;
            }
            tx.execute(INGEST_ADVANCE, &[&reference, &pos, &now.0, &expires_at.0])
                .await?;
            status.offset = pos as u64;
            status.updated_at = now;
            status.expires_at = status.expires_at.max(expires_at);
            Ok(status)
        }
        .await;
        match out {
            Ok(status) => {
                tx.end(true).await?;
                Ok(status)
            }
            Err(e) => tx.abandon(e).await,
        }
    }

    /// The upload's row and the sha256 of its bytes, from one snapshot.
    async fn ingest_hash(
        &self,
        reference: &str,
    ) -> std::result::Result<(IngestStatus, String), Failure> {
        let tx = Tx::begin(self, SNAPSHOT).await?;
        let out = async {
            let rows = tx.query(INGEST_GET, &[&reference]).await?;
            let Some(row) = rows.first() else {
                return Err(fail(Error::not_found(format!("upload {reference:?}"))));
            };
            let status = ingest_from_row(row).map_err(fail)?;
            let conn = tx.conn();
            let stmt = conn.prepare_cached(INGEST_CHUNKS_READ).await.map_err(pg)?;
            let params: [Param<'_>; 1] = [&reference];
            let stream = conn
                .query_raw(&stmt, params.iter().copied())
                .await
                .map_err(pg)?;
            pin_mut!(stream);
            let mut hasher = sha2::Sha256::new();
            let mut pos: i64 = 0;
            while let Some(r) = stream.try_next().await.map_err(pg)? {
                let seq: i64 = r.try_get(0).map_err(pg)?;
                let data: &[u8] = r.try_get(1).map_err(pg)?;
                if seq != pos {
                    return Err(fail(Error::Backend(format!(
                        "upload {reference:?} has a hole at byte {pos}; abort it and start again"
                    ))));
                }
                hasher.update(data);
                pos += data.len() as i64;
            }
            if pos as u64 != status.offset {
                return Err(fail(Error::Backend(format!(
                    "upload {reference:?} holds {pos} bytes but says {}; abort it and start again",
                    status.offset
                ))));
            }
            Ok((status, hex_digest(hasher)))
        }
        .await;
        match out {
            Ok(v) => {
                tx.end(true).await?;
                Ok(v)
            }
            Err(e) => tx.abandon(e).await,
        }
    }

    pub(crate) async fn content_ingest_commit(
        &self,
        reference: &str,
        digest: &str,
        size: u64,
        labels: Labels,
        lease: Option<&str>,
        now: Timestamp,
    ) -> Result<BlobInfo> {
        validate_ingest_ref(reference)?;
        check_expected(Some((digest, size)))?;
        let (status, actual) = retrying(&self.retries, || self.ingest_hash(reference)).await?;
        if status.expires_at <= now {
            return Err(Error::not_found(format!(
                "upload {reference:?} (it expired)"
            )));
        }
        check_commit(&status, digest, size)?;
        if actual != digest {
            return Err(digest_mismatch(reference, digest, &actual));
        }
        let batch = Batch {
            preconditions: Vec::new(),
            ops: vec![Op::BlobCommit {
                digest: digest.to_string(),
                size,
                labels,
                lease: lease.map(str::to_string),
            }],
            now,
        };
        let commit = BlobCommit {
            reference,
            digest,
            offset: i64_of(status.offset, "offset")?,
            started_at: status.started_at.0,
            batch: &batch,
        };
        let mut results = match self.transact(crate::Write::BlobCommit(&commit)).await? {
            crate::Written::Batch(r) => r,
            _ => {
                return Err(Error::Backend(
                    "a blob commit returned something else".into(),
                ))
            }
        };
        match results.pop() {
            Some(OpResult {
                applied: Applied::Blob(info),
                ..
            }) => Ok(info),
            _ => Err(Error::Backend(
                "a blob commit returned the wrong kind of result".into(),
            )),
        }
    }

    pub(crate) async fn content_ingest_abort(&self, reference: &str) -> Result<()> {
        validate_ingest_ref(reference)?;
        let rows = self.query_retrying(INGEST_ABORT, &[&reference]).await?;
        let n: i64 = rows
            .first()
            .map_or(Ok(0), |r| r.try_get(0))
            .map_err(db_err)?;
        if n == 0 {
            return Err(Error::not_found(format!("upload {reference:?}")));
        }
        Ok(())
    }

    pub(crate) async fn content_ingest_list(&self) -> Result<Vec<IngestStatus>> {
        let rows = self.query(INGEST_LIST, &[]).await?;
        rows.iter().map(ingest_from_row).collect()
    }

    pub(crate) async fn content_ingest_sweep(&self, now: Timestamp) -> Result<u64> {
        let rows = self.query_retrying(INGEST_SWEEP, &[&now.0]).await?;
        let n: i64 = rows
            .first()
            .map_or(Ok(0), |r| r.try_get(0))
            .map_err(db_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(crate) async fn content_blob_info(&self, digest: &str) -> Result<Option<BlobInfo>> {
        validate_digest(digest)?;
        let rows = self.query(gc::BLOB_GET, &[&digest]).await?;
        rows.first().map(gc::blob_from_row).transpose()
    }

    pub(crate) async fn content_blob_list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<BlobInfo>> {
        let after = after.unwrap_or("");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.query(gc::BLOB_LIST, &[&after, &limit]).await?;
        rows.iter().map(gc::blob_from_row).collect()
    }

    pub(crate) async fn content_blob_read(
        &self,
        digest: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<Vec<u8>> {
        validate_digest(digest)?;
        retrying(&self.retries, || self.blob_read_once(digest, offset, len)).await
    }

    async fn blob_read_once(
        &self,
        digest: &str,
        offset: u64,
        len: Option<u64>,
    ) -> std::result::Result<Vec<u8>, Failure> {
        let tx = Tx::begin(self, SNAPSHOT).await?;
        let out = async {
            let rows = tx.query(gc::BLOB_GET, &[&digest]).await?;
            let Some(row) = rows.first() else {
                return Err(fail(Error::not_found(format!("blob {digest}"))));
            };
            let info = gc::blob_from_row(row).map_err(fail)?;
            let (start, end) = range(&info, offset, len).map_err(fail)?;
            let mut out = Vec::with_capacity(usize::try_from(end - start).unwrap_or(0));
            if start == end {
                return Ok(out);
            }
            let (lo, hi) = (start as i64 - CHUNK, end as i64);
            let rows = tx.query(BLOB_CHUNKS_RANGE, &[&digest, &lo, &hi]).await?;
            let mut pos = start;
            for r in &rows {
                let seq: i64 = r.try_get(0).map_err(pg)?;
                let data: &[u8] = r.try_get(1).map_err(pg)?;
                let (cs, ce) = (seq as u64, seq as u64 + data.len() as u64);
                if ce <= pos {
                    continue;
                }
                if cs > pos {
                    break;
                }
                let take_to = ce.min(end);
                out.extend_from_slice(&data[(pos - cs) as usize..(take_to - cs) as usize]);
                pos = take_to;
                if pos == end {
                    break;
                }
            }
            if pos != end {
                return Err(fail(Error::Backend(format!(
                    "the bytes of blob {digest} are missing from byte {pos}"
                ))));
            }
            Ok(out)
        }
        .await;
        match out {
            Ok(v) => {
                tx.end(true).await?;
                Ok(v)
            }
            Err(e) => tx.abandon(e).await,
        }
    }

    pub(crate) async fn content_blob_remove_bytes(&self, digests: &[String]) -> Result<u64> {
        let mut removed = 0;
        for batch in digests.chunks(REMOVE_BATCH) {
            removed += retrying(&self.retries, || self.remove_bytes_once(batch)).await?;
        }
        Ok(removed)
    }

    /// Lock the digests, then (in a statement that starts after the locks are held, so it sees
    /// every commit that held one) delete the chunks of those without metadata.
    async fn remove_bytes_once(&self, digests: &[String]) -> std::result::Result<u64, Failure> {
        let keys: Vec<i64> = digests.iter().map(|d| lock_key(d)).collect();
        let tx = Tx::begin(self, READ_COMMITTED).await?;
        let out = async {
            tx.query(LOCK_DIGESTS, &[&keys]).await?;
            let rows = tx.query(BLOB_BYTES_REMOVE, &[&digests]).await?;
            let n: i64 = rows.first().map_or(Ok(0), |r| r.try_get(0)).map_err(pg)?;
            Ok(u64::try_from(n).unwrap_or(0))
        }
        .await;
        match out {
            Ok(v) => {
                tx.end(true).await?;
                Ok(v)
            }
            Err(e) => tx.abandon(e).await,
        }
    }

    pub(crate) async fn content_blob_orphans_remove(&self) -> Result<u64> {
        let rows = self.query_retrying(BLOB_ORPHANS, &[]).await?;
        let digests: Vec<String> = rows
            .iter()
            .map(|r| r.try_get(0).map_err(db_err))
            .collect::<Result<_>>()?;
        let blobs = self.content_blob_remove_bytes(&digests).await?;
        let rows = self.query_retrying(INGEST_CHUNK_ORPHANS, &[]).await?;
        let ingests: i64 = rows
            .first()
            .map_or(Ok(0), |r| r.try_get(0))
            .map_err(db_err)?;
        Ok(blobs + u64::try_from(ingests).unwrap_or(0))
    }
}

/// What the serializable transaction of a blob commit does besides the batch.
pub(crate) struct BlobCommit<'a> {
    pub(crate) reference: &'a str,
    pub(crate) digest: &'a str,
    pub(crate) offset: i64,
    pub(crate) started_at: i64,
    pub(crate) batch: &'a Batch,
}

/// Inside the commit's transaction: the digest's lock, the upload unchanged since it was
/// verified, its chunks copied, the batch, the upload dropped.
pub(crate) async fn commit_in_tx(rows: &mut PgTx<'_>, c: &BlobCommit<'_>) -> Result<Vec<OpResult>> {
    let key = lock_key(c.digest);
    rows.read(LOCK_DIGEST, &[&key]).await?;
    let found = rows.read(INGEST_GET, &[&c.reference]).await?;
    let same = match found.first() {
        Some(r) => {
            let s = ingest_from_row(r)?;
            s.offset as i64 == c.offset && s.started_at.0 == c.started_at
        }
        None => false,
    };
    if !same {
        return Err(Error::Conflict {
            what: format!(
                "upload {:?} (it changed while it was committed)",
                c.reference
            ),
        });
    }
    rows.execute(COPY_CHUNKS, &[&c.reference, &c.digest])
        .await?;
    let results = apply_batch(rows, c.batch).await?;
    rows.execute(INGEST_CHUNKS_DROP, &[&c.reference]).await?;
    rows.execute(INGEST_DROP, &[&c.reference]).await?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable() {
        let d = "sha256:00000000000000ff0000000000000000000000000000000000000000000000aa";
        assert_eq!(lock_key(d), 0xff);
        assert_eq!(lock_key("x"), lock_key("x"));
        assert!(INGEST_GET.contains(INGEST_COLUMNS));
    }
}
