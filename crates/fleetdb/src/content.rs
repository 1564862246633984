//! The content store: content-addressed blobs (sha256) written through resumable, expiring
//! uploads ("ingests"), with the expected digest and size verified before anything is committed.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> fleetdb::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! // On a database file: blobs are files beside it (an in-memory database has no content store).
//! let url = format!("sqlite://{}/fleetdb.sqlite", dir.path().display());
//! let store = fleetdb::Store::open(&url).await?;
//! let info = store.blob_put(b"hello", Default::default(), None).await?;
//! assert_eq!(store.blob_get(&info.digest).await?, b"hello");
//!
//! // Streaming, resumable: the same reference continues where the upload stands.
//! let mut w = store.blob_writer("upload-1", None, None).await?;
//! w.write(b"large ").await?;
//! w.write(b"content").await?;
//! let info = w.commit(Default::default()).await?;
//! # Ok(()) }
//! ```

use fleetdb_core::content::{
    IngestStatus, INGEST_TTL_DEFAULT, INGEST_TTL_MAX, INGEST_TTL_UNNAMED, INGEST_WRITE_BYTES_MAX,
};
use fleetdb_core::gc::{self, BlobInfo};
use fleetdb_core::world::{sha256_digest, validate_digest};
use fleetdb_core::{validate, Applied, Error, Labels, Op, OpResult, Page, Result};
use sha2::Digest as _;

use crate::Store;

/// Blobs a listing returns at most per page.
pub const BLOB_LIST_PAGE_MAX: usize = 1_000;

/// An upload in progress: write its bytes in order, then commit (verified) or abort. Dropping
/// it leaves the upload to be resumed (or to expire).
pub struct BlobWriter {
    store: Store,
    status: IngestStatus,
    lease: Option<String>,
    /// The hash of everything written, when this writer saw it all (started at offset 0).
    hasher: Option<sha2::Sha256>,
    /// How long the upload lives after it was last touched.
    ttl: std::time::Duration,
    /// The piece being written: set before the backend call, cleared once it answered. Still
    /// set at the next call, the write was given up midway (its future dropped) and its piece
    /// may land after all; it goes to `given_up`.
    in_flight: Option<Landing>,
    /// Pieces of writes given up midway, not yet known to have landed or not: the next write
    /// that the upload refuses at this writer's offset looks where the upload stands, and takes
    /// in the piece that landed (offset and digest) before it writes on.
    given_up: Vec<Landing>,
}

/// Where an upload stands if a piece of a given-up write landed, and the hash of everything up
/// to there.
#[derive(Clone)]
struct Landing {
    end: u64,
    hasher: Option<sha2::Sha256>,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("status", &self.status)
            .field("lease", &self.lease)
            .finish()
    }
}

fn check_lease(lease: Option<&str>) -> Result<()> {
    if let Some(l) = lease {
        validate::name("lease id", l)?;
    }
    Ok(())
}

impl BlobWriter {
    /// Where the upload stands (`offset`: the bytes received so far).
    pub fn status(&self) -> &IngestStatus {
        &self.status
    }

    pub fn offset(&self) -> u64 {
        self.status.offset
    }

    /// Append `data` (sent in pieces of at most [`INGEST_WRITE_BYTES_MAX`]); each piece is
    /// durable when its call returns, and moves the upload's expiry to its TTL
    /// ([`INGEST_TTL_DEFAULT`] unless started with [`Store::blob_writer_with_ttl`]) from now.
    ///
    /// A write given up midway (its future dropped) may still land; the writer stays usable:
    /// its next write continues after what landed.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        for piece in data.chunks(INGEST_WRITE_BYTES_MAX) {
            let mut written = self.write_piece(piece).await;
            if matches!(written, Err(Error::Invalid { .. })) && !self.given_up.is_empty() {
                // Refused at this writer's offset: a given-up piece may have landed.
                if self.take_in_landed().await? {
                    written = self.write_piece(piece).await;
                }
            }
            written?;
        }
        Ok(())
    }

    /// One piece at this writer's offset. Answered `Ok`, no given-up piece landed (the upload
    /// takes its writes one at a time, at its offset).
    async fn write_piece(&mut self, piece: &[u8]) -> Result<()> {
        self.given_up.extend(self.in_flight.take());
        let at = self.status.offset;
        let hasher = self.hasher.clone().map(|mut h| {
            h.update(piece);
            h
        });
        self.in_flight = Some(Landing {
            end: at + piece.len() as u64,
            hasher: hasher.clone(),
        });
        let now = self.store.clock.now();
        let written = self
            .store
            .backend
            .ingest_write(&self.status.reference, at, piece, now, now + self.ttl)
            .await;
        self.in_flight = None;
        self.status = written?;
        self.hasher = hasher;
        self.given_up.clear();
        Ok(())
    }

    /// Where the upload stands, if a given-up piece of this writer landed: taken in (its offset
    /// and hash) and `true`; otherwise nothing changes.
    async fn take_in_landed(&mut self) -> Result<bool> {
        self.given_up.extend(self.in_flight.take());
        let now = self.store.clock.now();
        let expected = self
            .status
            .expected_digest
            .as_deref()
            .zip(self.status.expected_size);
        let status = self
            .store
            .backend
            .ingest_start(&self.status.reference, expected, now, now + self.ttl)
            .await?;
        if status.started_at != self.status.started_at {
            return Ok(false);
        }
        let Some(landed) = self
            .given_up
            .iter()
            .find(|l| l.end == status.offset)
            .cloned()
        else {
            return Ok(false);
        };
        self.status = status;
        self.hasher = landed.hasher;
        self.given_up.clear();
        Ok(true)
    }

    /// Verify and commit the upload as a blob with these labels (added to the writer's lease,
    /// if any). The digest and size are the expected ones given at the start, or computed from
    /// what this writer wrote. A mismatch commits nothing and keeps the upload.
    pub async fn commit(mut self, labels: Labels) -> Result<BlobInfo> {
        if self.in_flight.is_some() || !self.given_up.is_empty() {
            // A given-up write's piece may have landed: commit what the upload holds.
            self.take_in_landed().await?;
        }
        let (digest, size) = match (&self.status.expected_digest, self.status.expected_size) {
            (Some(d), Some(s)) => (d.clone(), s),
            _ => match &self.hasher {
                Some(h) => (
                    format!("sha256:{}", hex(&h.clone().finalize())),
                    self.status.offset,
                ),
                None => {
                    return Err(Error::invalid(
                        "blob digest",
                        "",
                        "a resumed upload started without an expected digest must be committed with commit_as(digest, size, labels)",
                    ))
                }
            },
        };
        self.commit_as(&digest, size, labels).await
    }

    /// Verify the upload against `digest` and `size` and commit it.
    pub async fn commit_as(self, digest: &str, size: u64, labels: Labels) -> Result<BlobInfo> {
        validate_digest(digest)?;
        validate::blob_labels(&labels)?;
        self.store.ready().await?;
        let now = self.store.clock.now();
        let info = self
            .store
            .backend
            .ingest_commit(
                &self.status.reference,
                digest,
                size,
                labels,
                self.lease.as_deref(),
                now,
            )
            .await?;
        // The collector's scheduler, as for every write (`Store::write`): a commit is a mutation
        // (an unreferenced blob is garbage at once), and a blob's `gc.expire` is a deadline.
        let results = [OpResult {
            changed: true,
            applied: Applied::Blob(info.clone()),
        }];
        self.store.gc.note(&results);
        self.store
            .gc
            .note_deadline(gc::root_by_labels(&info.labels, now).1);
        // A blob is no object: no claim can have a new candidate.
        self.store
            .committed_batch(crate::session::Touched::Nothing, &[], None);
        Ok(info)
    }

    /// Move the upload's expiry to its TTL from now without writing (a writer waiting for its
    /// input). `NotFound` if it expired meanwhile (it may have been swept or started over by
    /// another writer: write from the start again).
    pub async fn keep_alive(&mut self) -> Result<()> {
        let now = self.store.clock.now();
        let expected = self
            .status
            .expected_digest
            .as_deref()
            .zip(self.status.expected_size);
        let status = if self.status.expires_at > now {
            self.store
                .backend
                .ingest_start(&self.status.reference, expected, now, now + self.ttl)
                .await?
        } else {
            self.status.clone()
        };
        if status.expires_at <= now
            || status.started_at != self.status.started_at
            || status.offset != self.status.offset
        {
            return Err(Error::not_found(format!(
                "upload {:?} (it expired; start it again)",
                self.status.reference
            )));
        }
        self.status = status;
        Ok(())
    }

    /// Drop the upload and its bytes.
    pub async fn abort(self) -> Result<()> {
        self.store
            .backend
            .ingest_abort(&self.status.reference)
            .await
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Store {
    /// Start an upload under `reference`, or resume the one in progress (its `offset` says where
    /// to continue). `expected` (digest, size) is checked at commit; a resumed upload must agree
    /// with what it was started with. The upload expires [`INGEST_TTL_DEFAULT`] after it was
    /// last touched — started, resumed or written (an expired upload is swept, or started over
    /// when resumed).
    pub async fn blob_writer(
        &self,
        reference: &str,
        expected: Option<(&str, u64)>,
        lease: Option<&str>,
    ) -> Result<BlobWriter> {
        self.blob_writer_with_ttl(reference, expected, lease, INGEST_TTL_DEFAULT)
            .await
    }

    /// [`Store::blob_writer`] with the upload living `ttl` (1 s to [`INGEST_TTL_MAX`]) after it
    /// was last touched: short for an upload nobody will resume by its reference
    /// ([`INGEST_TTL_UNNAMED`]), so that the bytes of one given up midway are reclaimed soon.
    pub async fn blob_writer_with_ttl(
        &self,
        reference: &str,
        expected: Option<(&str, u64)>,
        lease: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<BlobWriter> {
        fleetdb_core::content::validate_ingest_ref(reference)?;
        if ttl < std::time::Duration::from_secs(1) || ttl > INGEST_TTL_MAX {
            return Err(Error::invalid(
                "upload ttl",
                format!("{ttl:?}"),
                format!("must be between 1s and {}s", INGEST_TTL_MAX.as_secs()),
            ));
        }
        if let Some((d, _)) = expected {
            validate_digest(d)?;
        }
        check_lease(lease)?;
        self.ready().await?;
        let now = self.clock.now();
        let status = self
            .backend
            .ingest_start(reference, expected, now, now + ttl)
            .await?;
        let hasher = (status.offset == 0).then(sha2::Sha256::new);
        Ok(BlobWriter {
            store: self.clone(),
            status,
            lease: lease.map(str::to_string),
            hasher,
            ttl,
            in_flight: None,
            given_up: Vec::new(),
        })
    }

    /// Store `bytes` as a blob (its digest computed here), optionally under a lease.
    ///
    /// The upload has a random reference nobody can resume, so it lives
    /// [`INGEST_TTL_UNNAMED`] after its last write: one whose caller gave up (a timeout, a
    /// dropped future) or whose process died midway holds its bytes until the first collection
    /// after that, and a call given up in a process that collects requests that collection.
    pub async fn blob_put(
        &self,
        bytes: &[u8],
        labels: Labels,
        lease: Option<&str>,
    ) -> Result<BlobInfo> {
        validate::blob_labels(&labels)?;
        let digest = sha256_digest(bytes);
        let reference = format!("put-{}", uuid::Uuid::new_v4());
        // Given up before its end (the future dropped): the upload's expiry is a deadline of
        // this process's collector, so its bytes go at that time even on an idle store.
        struct GivenUp<'a>(Option<&'a Store>);
        impl Drop for GivenUp<'_> {
            fn drop(&mut self) {
                if let Some(s) = self.0 {
                    s.gc.note_deadline(Some(s.clock.now() + INGEST_TTL_UNNAMED));
                }
            }
        }
        let mut w = self
            .blob_writer_with_ttl(
                &reference,
                Some((&digest, bytes.len() as u64)),
                lease,
                INGEST_TTL_UNNAMED,
            )
            .await?;
        let mut given_up = GivenUp(Some(self));
        let written = w.write(bytes).await;
        let committed = match written {
            Ok(()) => w.commit(labels).await,
            Err(e) => Err(e),
        };
        if committed.is_err() {
            // Best effort: the upload would expire anyway.
            let _ = self.backend.ingest_abort(&reference).await;
        }
        given_up.0 = None;
        committed
    }

    /// The whole blob, in memory. `NotFound` if it is not stored; `TooLarge` (before anything
    /// is read) if it is larger than [`Limits::blob_read_bytes_max`](crate::Limits) (256 MiB by
    /// default; a blob may have 8 GiB): read such a blob in ranges with
    /// [`Store::blob_read_range`], as `fleetdb blob get` does (4 MiB at a time).
    pub async fn blob_get(&self, digest: &str) -> Result<Vec<u8>> {
        self.blob_read_range(digest, 0, None).await
    }

    /// `len` bytes (or up to the end) from `offset`, clipped at the blob's end. A read of more
    /// than [`Limits::blob_read_bytes_max`](crate::Limits) bytes (counted after clipping) is
    /// `TooLarge`, before anything is read. `NotFound` if the blob is not stored; an `offset`
    /// past its end is `Invalid`.
    pub async fn blob_read_range(
        &self,
        digest: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<Vec<u8>> {
        validate_digest(digest)?;
        self.ready().await?;
        let max = self.limits.blob_read_bytes_max as u64;
        if len.is_none_or(|l| l > max) {
            // Only then is the size needed (one metadata read): a range within the bound
            // cannot return more than the bound.
            let Some(info) = self.backend.blob_info(digest).await? else {
                return Err(Error::not_found(format!("blob {digest}")));
            };
            let wanted = info.size.saturating_sub(offset);
            let wanted = len.map_or(wanted, |l| l.min(wanted));
            if wanted > max {
                return Err(Error::TooLarge {
                    field: format!(
                        "a read of blob {digest} from byte {offset} (read it in ranges: \
                         blob_read_range)"
                    ),
                    size: usize::try_from(wanted).unwrap_or(usize::MAX),
                    max: self.limits.blob_read_bytes_max,
                });
            }
        }
        self.backend.blob_read(digest, offset, len).await
    }

    pub async fn blob_info(&self, digest: &str) -> Result<Option<BlobInfo>> {
        validate_digest(digest)?;
        self.ready().await?;
        self.backend.blob_info(digest).await
    }

    /// Blobs ordered by digest, after `after`, at most `limit` (up to [`BLOB_LIST_PAGE_MAX`]);
    /// `next` is the cursor of the next page, `None` when this page ends the listing.
    pub async fn blob_list(&self, after: Option<&str>, limit: usize) -> Result<Page<BlobInfo>> {
        if let Some(a) = after {
            validate_digest(a)?;
        }
        if limit == 0 || limit > BLOB_LIST_PAGE_MAX {
            return Err(Error::invalid(
                "limit",
                limit.to_string(),
                format!("must be 1 to {BLOB_LIST_PAGE_MAX}"),
            ));
        }
        self.ready().await?;
        // One more than asked for tells whether another page follows.
        let mut items = self.backend.blob_list(after, limit + 1).await?;
        let next = crate::next_page(&mut items, limit, |b| b.digest.clone());
        Ok(Page { items, next })
    }

    /// Delete a blob: its metadata (one committed write), then its bytes. `NotFound` if it is
    /// not stored.
    pub async fn blob_delete(&self, digest: &str) -> Result<()> {
        validate_digest(digest)?;
        self.write(vec![Op::BlobDelete {
            digest: digest.to_string(),
        }])
        .await?;
        // If this fails, the bytes are orphans: the collector's orphan pass removes them.
        if let Err(e) = self.backend.blob_remove_bytes(&[digest.to_string()]).await {
            tracing::warn!(%digest, error = %e, "removing a deleted blob's bytes failed; the next collection will");
        }
        Ok(())
    }

    /// Uploads in progress.
    pub async fn ingest_list(&self) -> Result<Vec<IngestStatus>> {
        self.ready().await?;
        self.backend.ingest_list().await
    }

    /// Drop an upload in progress and its bytes.
    pub async fn ingest_abort(&self, reference: &str) -> Result<()> {
        fleetdb_core::content::validate_ingest_ref(reference)?;
        self.ready().await?;
        self.backend.ingest_abort(reference).await
    }
}
