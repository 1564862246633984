//! The content store of the embedded backend: blob bytes are files in the database's folder,
//! `blobs/sha256/<hex>`; uploads in progress ("ingests") are files `ingest/<sha256 of the
//! reference>` with a row in `ingests`; blob metadata is committed through the normal write path
//! (`Op::BlobCommit`), so it joins leases, the change log and garbage collection.
//!
//! - A write appends at the upload's offset, fsyncs, then advances the row. A file lock
//!   (`flock`) on the upload file serializes writers of one upload, in this and other processes
//!   (a second one gets `Unavailable`).
//! - A commit verifies the sha256 and size of the whole upload first (a mismatch commits
//!   nothing and keeps the upload), then marks the upload with the digest it commits
//!   (`expected_digest`), links the file into `blobs/` (keeping an existing blob file), fsyncs the
//!   folder, commits `Op::BlobCommit` and only then drops the upload.
//! - Bytes are removed ([`SqliteBackend::blob_remove_bytes`], orphans) under the database write
//!   lock, and only for a digest with neither metadata nor an upload marked with it. Since a
//!   commit marks its upload (under the same lock) before it looks for an existing blob file,
//!   a removal can never take the bytes of a blob whose commit it raced: no age guard is needed.
//!
//! - The folder's blob files belong to ONE database file, named in `blobs/database` by the
//!   first database that writes or removes blob files there. Every database file of a folder
//!   would otherwise share `blobs/` and `ingest/`, and each one's collection remove the others'
//!   files as orphans; another database in the folder gets `Unsupported` (naming the owner) for
//!   writes and removals, so its collections leave the files alone.
//!
//! `sqlite::memory:` has no folder: its content store is `Unsupported`.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetdb_core::batch::{Applied, Batch, Op, OpResult};
use fleetdb_core::content::{
    check_commit, check_expected, check_ingest_start, check_resume, check_write, digest_mismatch,
    range, validate_ingest_ref, IngestStatus, CHUNK_BYTES,
};
use fleetdb_core::gc::BlobInfo;
use fleetdb_core::world::validate_digest;
use fleetdb_core::{Backend, Error, Labels, Result, Timestamp};

use rusqlite::{params, Connection, OptionalExtension, Row};
use sha2::Digest as _;

use crate::{map_err, Location, SqliteBackend};

/// Digests whose bytes one hold of the write lock removes at most (writers wait meanwhile).
const REMOVE_BATCH: usize = 256;
/// The pause between two such batches, in which writers waiting for the write lock get it.
const REMOVE_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

const INGEST_COLS: &str =
    "ref, expected_digest, expected_size, \"offset\", started_at, updated_at, expires_at";

/// The file in the folder's `blobs/` that names the database file owning its blob files.
const OWNER_FILE: &str = "database";

/// Where the bytes live.
#[derive(Clone)]
pub(crate) struct Dirs {
    blobs: PathBuf,
    ingest: PathBuf,
    /// `blobs/database`: the owner's file name ([`OWNER_FILE`]).
    owner: PathBuf,
    /// The file name of this database.
    database: String,
}

impl Dirs {
    fn blob(&self, digest: &str) -> PathBuf {
        self.blobs
            .join(digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    fn ingest(&self, reference: &str) -> PathBuf {
        self.ingest
            .join(hex(&sha2::Sha256::digest(reference.as_bytes())))
    }

    /// These folders, to write or remove blob or upload files: only if they are this
    /// database's (`blobs/database` names its file). A folder nobody owns yet becomes this
    /// database's if `claim`; otherwise the answer is `None` (nothing of it is this
    /// database's). A folder another database owns is `Unsupported`.
    fn owned(self, claim: bool) -> Result<Option<Dirs>> {
        let read = |dirs: &Dirs| -> Result<Option<String>> {
            match fs::read_to_string(&dirs.owner) {
                Ok(owner) => Ok(Some(owner.trim_end_matches('\n').to_string())),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err(format!("reading {}", dirs.owner.display()), e)),
            }
        };
        let mut owner = read(&self)?;
        if owner.is_none() && claim {
            // Written whole beside it, then linked into place: a reader never sees a partial
            // name, and of two databases claiming at once exactly one link succeeds.
            let folder = self.owner.parent().unwrap_or(Path::new("."));
            fs::create_dir_all(folder)
                .map_err(|e| io_err(format!("creating {}", folder.display()), e))?;
            let tmp = folder.join(format!(
                ".{OWNER_FILE}.{}.{}",
                std::process::id(),
                hex(&sha2::Sha256::digest(
                    format!("{:?}", std::time::SystemTime::now()).as_bytes()
                ))
            ));
            let written = File::create(&tmp)
                .and_then(|mut f| {
                    f.write_all(format!("{}\n", self.database).as_bytes())?;
                    f.sync_all()
                })
                .and_then(|()| match fs::hard_link(&tmp, &self.owner) {
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
                    r => r,
                });
            let _ = fs::remove_file(&tmp);
            written.map_err(|e| io_err(format!("writing {}", self.owner.display()), e))?;
            sync_dir(folder)?;
            owner = read(&self)?;
        }
        match owner {
            None => Ok(None),
            Some(owner) if owner == self.database => Ok(Some(self)),
            Some(owner) => Err(Error::Unsupported {
                backend: "sqlite".into(),
                what: format!(
                    "a content store for {:?}: the blob files of its folder belong to the \
                     database file {owner:?} ({}), and every database file of a folder shares \
                     them (each one's collection would remove the others' as orphans); keep one \
                     database per folder, or, if the database was renamed, write its file name \
                     into that file",
                    self.database,
                    self.owner.display()
                ),
            }),
        }
    }

    /// [`Dirs::owned`], claiming the folders if nobody owns them yet.
    fn own(self) -> Result<Dirs> {
        self.owned(true)?
            .ok_or_else(|| Error::Backend("the blob folder's owner vanished".into()))
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn is_hex64(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::StorageFull => Error::Unavailable(format!("disk full: {what}: {e}")),
        ErrorKind::PermissionDenied => Error::Unavailable(format!("{what}: {e}")),
        _ => Error::Backend(format!("{what}: {e}")),
    }
}

/// fsync a folder, so that a rename, link or unlink in it is durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(format!("syncing {}", dir.display()), e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(format!("removing {}", path.display()), e)),
    }
}

fn ingest_row(r: &Row<'_>) -> rusqlite::Result<IngestStatus> {
    let size: Option<i64> = r.get(2)?;
    let offset: i64 = r.get(3)?;
    Ok(IngestStatus {
        reference: r.get(0)?,
        expected_digest: r.get(1)?,
        expected_size: size.map(|s| s as u64),
        offset: offset as u64,
        started_at: Timestamp(r.get(4)?),
        updated_at: Timestamp(r.get(5)?),
        expires_at: Timestamp(r.get(6)?),
    })
}

fn ingest_get(c: &Connection, reference: &str) -> Result<Option<IngestStatus>> {
    c.prepare_cached(&format!("SELECT {INGEST_COLS} FROM ingests WHERE ref = ?1"))
        .and_then(|mut s| s.query_row([reference], ingest_row).optional())
        .map_err(map_err)
}

/// Whether the bytes of `digest` are needed: it has metadata, or an upload is committing it.
fn bytes_needed(c: &Connection, digest: &str) -> Result<bool> {
    c.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM blobs WHERE digest = ?1) \
         OR EXISTS (SELECT 1 FROM ingests WHERE expected_digest = ?1)",
    )
    .and_then(|mut s| s.query_row([digest], |r| r.get(0)))
    .map_err(map_err)
}

// ---- the rules every backend applies (mirrored in fleetdb-postgres/src/content.rs) ----

/// Open (creating it if asked) and lock an upload's file for this call.
fn open_locked(path: &Path, reference: &str, create: bool) -> Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::not_found(format!("the bytes of upload {reference:?}"))
            } else {
                io_err(format!("opening {}", path.display()), e)
            }
        })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(Error::Unavailable(format!(
            "upload {reference:?} is being written or committed by another call; try again"
        ))),
        Err(fs::TryLockError::Error(e)) => Err(io_err(format!("locking {}", path.display()), e)),
    }
}

/// Cut the file to `offset` bytes (dropping what a write that never advanced the row left).
fn trim(f: &File, offset: u64, reference: &str) -> Result<()> {
    let len = f
        .metadata()
        .map_err(|e| io_err("reading an upload's size", e))?
        .len();
    if len < offset {
        return Err(Error::Backend(format!(
            "upload {reference:?} should hold {offset} bytes but its file has {len}; abort it and start again"
        )));
    }
    if len > offset {
        f.set_len(offset)
            .map_err(|e| io_err("trimming an upload", e))?;
    }
    Ok(())
}

impl SqliteBackend {
    fn content_dirs(&self) -> Result<Dirs> {
        match &self.location {
            Location::File(path) => {
                let root = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                Ok(Dirs {
                    blobs: root.join("blobs").join("sha256"),
                    ingest: root.join("ingest"),
                    owner: root.join("blobs").join(OWNER_FILE),
                    database: path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                })
            }
            Location::Memory => Err(self.unsupported(
                "the content store (an in-memory database has no folder for blob files)",
            )),
        }
    }

    /// The content folders, to write or remove blob or upload files ([`Dirs::owned`]).
    fn owned_dirs(&self, claim: bool) -> Result<Option<Dirs>> {
        self.content_dirs()?.owned(claim)
    }

    /// [`SqliteBackend::owned_dirs`], claiming the folder if nobody owns it yet.
    fn own_dirs(&self) -> Result<Dirs> {
        self.content_dirs()?.own()
    }

    /// Run `f` in a transaction holding the database's write lock (this process's writer and
    /// every other process wait): for short bookkeeping only. On the blocking pool, as
    /// [`SqliteBackend::exclusive`]: taking the lock may wait for another process.
    async fn locked<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.exclusive_write(f, ()).await
    }

    /// [`Self::locked`], holding `held` (an upload's locked file) until the transaction has
    /// committed or rolled back.
    async fn exclusive_write<T: Send + 'static, H: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
        held: H,
    ) -> Result<T> {
        self.exclusive(move |c| {
            let _held = held; // dropped last, after the transaction below
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(map_err)?;
            let v = f(&tx)?; // dropped on error: rolled back
            tx.commit().map_err(map_err)?;
            Ok(v)
        })
        .await
    }

    pub(crate) async fn content_ingest_start(
        &self,
        reference: &str,
        expected: Option<(&str, u64)>,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<IngestStatus> {
        check_ingest_start(reference, expected, now, expires_at)?;
        let dirs = self.own_dirs()?;
        let path = dirs.ingest(reference);
        let (digest, size) = match expected {
            Some((d, s)) => (Some(d.to_string()), Some(s as i64)),
            None => (None, None),
        };
        let reference = reference.to_string();
        let expected = expected.map(|(d, s)| (d.to_string(), s));
        self.locked(move |c| {
            let reference = reference.as_str();
            match ingest_get(c, reference)? {
                Some(stored) if stored.expires_at > now => {
                    let expected = expected.as_ref().map(|(d, s)| (d.as_str(), *s));
                    check_resume(reference, &stored, expected)?;
                    c.execute(
                        "UPDATE ingests SET expected_digest = coalesce(?2, expected_digest), \
                         expected_size = coalesce(?3, expected_size), updated_at = ?4, \
                         expires_at = ?5 WHERE ref = ?1",
                        params![reference, digest, size, now.0, expires_at.0],
                    )
                    .map_err(map_err)?;
                }
                stale => {
                    if stale.is_some() {
                        c.execute("DELETE FROM ingests WHERE ref = ?1", [reference])
                            .map_err(map_err)?;
                    }
                    // Bytes an earlier upload of this reference may have left.
                    remove_if_present(&path)?;
                    c.execute(
                        "INSERT INTO ingests (ref, expected_digest, expected_size, \"offset\", \
                         started_at, updated_at, expires_at) VALUES (?1, ?2, ?3, 0, ?4, ?4, ?5)",
                        params![reference, digest, size, now.0, expires_at.0],
                    )
                    .map_err(map_err)?;
                }
            }
            ingest_get(c, reference)?
                .ok_or_else(|| Error::Backend("the upload row vanished".into()))
        })
        .await
    }

    fn live_ingest(&self, reference: &str, now: Timestamp) -> Result<IngestStatus> {
        match self.read(|c| ingest_get(c, reference))? {
            Some(s) if s.expires_at > now => Ok(s),
            Some(_) => Err(Error::not_found(format!(
                "upload {reference:?} (it expired)"
            ))),
            None => Err(Error::not_found(format!("upload {reference:?}"))),
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
        let dirs = self.own_dirs()?;
        let status = self.live_ingest(reference, now)?;
        check_write(&status, offset, data.len())?;
        if data.is_empty() {
            return Ok(status);
        }
        let path = dirs.ingest(reference);
        let r = reference.to_string();
        let file = crate::off_runtime(move || open_locked(&path, &r, true)).await?;
        // Read again under the file lock: another writer may have advanced it meanwhile.
        let status = self.live_ingest(reference, now)?;
        check_write(&status, offset, data.len())?;
        let bytes = data.to_vec();
        let (r, ingest_dir) = (reference.to_string(), dirs.ingest.clone());
        let file = crate::off_runtime(move || {
            let mut f = file;
            trim(&f, offset, &r)?;
            f.seek(SeekFrom::Start(offset))
                .and_then(|_| f.write_all(&bytes))
                .and_then(|()| f.sync_data())
                .map_err(|e| io_err(format!("writing upload {r:?}"), e))?;
            if offset == 0 {
                sync_dir(&ingest_dir)?;
            }
            Ok(f)
        })
        .await?;
        let end = offset + data.len() as u64;
        let r = reference.to_string();
        // The file (and its lock) goes with the statement: if this call is given up while the
        // statement waits for the database, the lock is held until the statement's transaction
        // has committed (handed back out of it, dropped after `locked`). Dropped with the
        // statement instead, before COMMIT, another write of the upload (this writer's next,
        // after a given-up one) read the old offset in that window, overwrote the bytes just
        // written and failed its update: the upload's row and file disagreed for good.
        let updated = self
            .exclusive_write(
                move |c| {
                    // The write touches the upload: its expiry moves (never back).
                    c.execute(
                        "UPDATE ingests SET \"offset\" = ?2, updated_at = ?3, \
                     expires_at = max(expires_at, ?5) WHERE ref = ?1 AND \"offset\" = ?4",
                        params![r, end as i64, now.0, offset as i64, expires_at.0],
                    )
                    .map_err(map_err)
                },
                file,
            )
            .await?;
        if updated != 1 {
            return Err(Error::Conflict {
                what: format!("upload {reference:?}"),
            });
        }
        Ok(IngestStatus {
            offset: end,
            updated_at: now,
            expires_at: status.expires_at.max(expires_at),
            ..status
        })
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
        let dirs = self.own_dirs()?;
        let status = self.live_ingest(reference, now)?;
        check_commit(&status, digest, size)?;
        let path = dirs.ingest(reference);
        let (p, r) = (path.clone(), reference.to_string());
        // An empty upload may have no file yet.
        let file = crate::off_runtime(move || open_locked(&p, &r, size == 0)).await?;
        let status = self.live_ingest(reference, now)?;
        check_commit(&status, digest, size)?;
        let r = reference.to_string();
        let (file, actual) = crate::off_runtime(move || {
            let f = file;
            trim(&f, size, &r)?;
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut reader = &f;
            reader
                .seek(SeekFrom::Start(0))
                .map_err(|e| io_err("reading an upload", e))?;
            loop {
                let n = reader
                    .read(&mut buf)
                    .map_err(|e| io_err(format!("reading upload {r:?}"), e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            f.sync_all()
                .map_err(|e| io_err(format!("syncing upload {r:?}"), e))?;
            Ok((f, format!("sha256:{}", hex(&hasher.finalize()))))
        })
        .await?;
        if actual != digest {
            return Err(digest_mismatch(reference, digest, &actual));
        }
        // Mark the upload with what it commits: from here on its bytes are needed. (The file's
        // lock goes with each statement, as in `content_ingest_write`.)
        let file = Arc::new(file);
        let (r, d, started_at) = (reference.to_string(), digest.to_string(), status.started_at);
        let held = file.clone();
        let marked = self
            .locked(move |c| {
                let _held = held;
                c.execute(
                    "UPDATE ingests SET expected_digest = ?2, expected_size = ?3 \
                     WHERE ref = ?1 AND \"offset\" = ?3 AND started_at = ?4",
                    params![r, d, size as i64, started_at.0],
                )
                .map_err(map_err)
            })
            .await?;
        if marked != 1 {
            return Err(Error::Conflict {
                what: format!("upload {reference:?} (it changed while it was committed)"),
            });
        }
        let (blob_path, blobs_dir, p) = (dirs.blob(digest), dirs.blobs.clone(), path.clone());
        crate::off_runtime(move || {
            fs::create_dir_all(&blobs_dir)
                .map_err(|e| io_err(format!("creating {}", blobs_dir.display()), e))?;
            match fs::hard_link(&p, &blob_path) {
                Ok(()) => {}
                // The blob is stored already: keep it.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
                Err(_) => {
                    // No hard links here: copy, sync, rename.
                    let tmp = blob_path.with_extension("tmp");
                    fs::copy(&p, &tmp)
                        .and_then(|_| File::open(&tmp)?.sync_all())
                        .and_then(|()| fs::rename(&tmp, &blob_path))
                        .map_err(|e| io_err(format!("storing {}", blob_path.display()), e))?;
                }
            }
            sync_dir(&blobs_dir)
        })
        .await?;
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
        // A failure here (say, the lease expired) keeps the upload: abort or commit again.
        let mut results = Backend::commit(self, batch).await?;
        let info = match results.pop() {
            Some(OpResult {
                applied: Applied::Blob(info),
                ..
            }) => info,
            _ => {
                return Err(Error::Backend(
                    "a blob commit returned the wrong kind of result".into(),
                ))
            }
        };
        let r = reference.to_string();
        self.locked(move |c| {
            let _held = file;
            c.execute("DELETE FROM ingests WHERE ref = ?1", [r])
                .map_err(map_err)?;
            remove_if_present(&path)
        })
        .await?;
        Ok(info)
    }

    pub(crate) async fn content_ingest_abort(&self, reference: &str) -> Result<()> {
        validate_ingest_ref(reference)?;
        let dirs = self.own_dirs()?;
        let path = dirs.ingest(reference);
        let r = reference.to_string();
        let removed = self
            .locked(move |c| {
                let n = c
                    .execute("DELETE FROM ingests WHERE ref = ?1", [r])
                    .map_err(map_err)?;
                remove_if_present(&path)?;
                Ok(n)
            })
            .await?;
        if removed == 0 {
            return Err(Error::not_found(format!("upload {reference:?}")));
        }
        Ok(())
    }

    pub(crate) async fn content_ingest_list(&self) -> Result<Vec<IngestStatus>> {
        self.content_dirs()?;
        self.read(|c| {
            let mut s = c
                .prepare_cached(&format!("SELECT {INGEST_COLS} FROM ingests ORDER BY ref"))
                .map_err(map_err)?;
            let rows = s.query_map([], ingest_row).map_err(map_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
        })
    }

    pub(crate) async fn content_ingest_sweep(&self, now: Timestamp) -> Result<u64> {
        let dirs = self.content_dirs()?;
        self.locked(move |c| {
            let refs: Vec<String> = {
                let mut s = c
                    .prepare_cached("SELECT ref FROM ingests WHERE expires_at <= ?1")
                    .map_err(map_err)?;
                let rows = s.query_map([now.0], |r| r.get(0)).map_err(map_err)?;
                rows.collect::<rusqlite::Result<_>>().map_err(map_err)?
            };
            if refs.is_empty() {
                return Ok(0);
            }
            // Files of this database's uploads: only in a folder that is its own.
            let dirs = dirs.own()?;
            for r in &refs {
                c.execute("DELETE FROM ingests WHERE ref = ?1", [r])
                    .map_err(map_err)?;
                remove_if_present(&dirs.ingest(r))?;
            }
            Ok(refs.len() as u64)
        })
        .await
    }

    pub(crate) async fn content_blob_info(&self, digest: &str) -> Result<Option<BlobInfo>> {
        validate_digest(digest)?;
        self.read(|c| crate::gc::blob_meta_read(c, digest))
    }

    pub(crate) async fn content_blob_list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<BlobInfo>> {
        self.read(|c| crate::gc::blob_list(c, after, limit))
    }

    pub(crate) async fn content_blob_read(
        &self,
        digest: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<Vec<u8>> {
        validate_digest(digest)?;
        let dirs = self.content_dirs()?;
        let info = self
            .read(|c| crate::gc::blob_meta_read(c, digest))?
            .ok_or_else(|| Error::not_found(format!("blob {digest}")))?;
        let (start, end) = range(&info, offset, len)?;
        let path = dirs.blob(digest);
        let d = digest.to_string();
        let read = crate::off_runtime(move || {
            let mut f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(format!("opening {}", path.display()), e)),
            };
            let mut out = vec![0u8; (end - start) as usize];
            f.seek(SeekFrom::Start(start))
                .and_then(|_| f.read_exact(&mut out))
                .map_err(|e| io_err(format!("reading blob {d}"), e))?;
            Ok(Some(out))
        })
        .await?;
        match read {
            Some(bytes) => Ok(bytes),
            // Removed meanwhile (deleted or collected), or lost.
            None => match self.read(|c| crate::gc::blob_meta_read(c, digest))? {
                None => Err(Error::not_found(format!("blob {digest}"))),
                Some(_) => Err(Error::Backend(format!(
                    "the bytes of blob {digest} are missing from {}",
                    dirs.blob(digest).display()
                ))),
            },
        }
    }

    pub(crate) async fn content_blob_remove_bytes(&self, digests: &[String]) -> Result<u64> {
        if digests.is_empty() {
            self.content_dirs()?;
            return Ok(0);
        }
        let dirs = self.own_dirs()?;
        let mut removed = 0;
        for (i, batch) in digests.chunks(REMOVE_BATCH).enumerate() {
            if i > 0 {
                // Let the writer in between batches: the write connection's mutex is not fair,
                // and re-taken at once it starved a concurrent writer for the whole loop (96 ms
                // for 20,000 digests in the GC benchmark).
                tokio::time::sleep(REMOVE_PAUSE).await;
            }
            let (batch, dirs) = (batch.to_vec(), dirs.clone());
            removed += self
                .locked(move |c| {
                    let mut n = 0;
                    for d in &batch {
                        if validate_digest(d).is_err() || bytes_needed(c, d)? {
                            continue;
                        }
                        if remove_if_present(&dirs.blob(d))? {
                            n += 1;
                        }
                    }
                    Ok(n)
                })
                .await?;
        }
        if removed > 0 {
            sync_dir(&dirs.blobs)?;
        }
        Ok(removed)
    }

    pub(crate) async fn content_blob_orphans_remove(&self) -> Result<u64> {
        // A database with no blob and no upload claims no folder: the files there, if any, are
        // another database's (of a folder nobody claimed yet: written before owners were).
        self.content_dirs()?;
        let holds_content = self.read(|c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM blobs) OR EXISTS (SELECT 1 FROM ingests)",
                [],
                |r| r.get::<_, bool>(0),
            )
            .map_err(map_err)
        })?;
        let Some(dirs) = self.owned_dirs(holds_content)? else {
            return Ok(0);
        };
        let names = |dir: &Path| -> Result<Vec<String>> {
            match fs::read_dir(dir) {
                Ok(entries) => Ok(entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| is_hex64(n))
                    .collect()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(io_err(format!("listing {}", dir.display()), e)),
            }
        };
        let digests: Vec<String> = names(&dirs.blobs)?
            .into_iter()
            .map(|h| format!("sha256:{h}"))
            .collect();
        let mut removed = self.content_blob_remove_bytes(&digests).await?;
        // Upload files without an upload row (the lock keeps new uploads out meanwhile).
        let files = names(&dirs.ingest)?;
        if !files.is_empty() {
            let d = dirs.clone();
            removed += self
                .locked(move |c| {
                    let dirs = d;
                    let live: std::collections::HashSet<PathBuf> = {
                        let mut s = c
                            .prepare_cached("SELECT ref FROM ingests")
                            .map_err(map_err)?;
                        let rows = s
                            .query_map([], |r| r.get::<_, String>(0))
                            .map_err(map_err)?;
                        rows.map(|r| r.map(|r| dirs.ingest(&r)))
                            .collect::<rusqlite::Result<_>>()
                            .map_err(map_err)?
                    };
                    let mut n = 0;
                    for f in files {
                        let p = dirs.ingest.join(f);
                        if !live.contains(&p) && remove_if_present(&p)? {
                            n += 1;
                        }
                    }
                    Ok(n)
                })
                .await?;
        }
        Ok(removed)
    }
}
