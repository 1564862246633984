//! FleetDB's embedded backend on SQLite.
//!
//! - One write connection; callers commit in groups, the first caller in leading the group on its
//!   own thread ([`writer`]). A checkpointer thread keeps WAL checkpoints off the write path.
//! - Reads run on a small pool of read-only connections; in WAL mode they never wait for the
//!   writer. A read runs inline on the calling task: reads are bounded (pages of at most
//!   `LIST_PAGE_MAX` rows) and take microseconds from the page cache.
//! - `sqlite::memory:` uses one connection for reads and writes (an in-memory database is private
//!   to its connection).
//! - Statements are prepared once per connection (`prepare_cached`) and must STAY prepared: a
//!   bound `LIMIT ?` is written `LIMIT +?`. SQLite (3.45+) plans with the value bound to a bare
//!   `LIMIT ?` and so marks the statement to be prepared again whenever that parameter is bound,
//!   i.e. on every run: parsing and planning the selector claim every time was ~5 % of the
//!   one-at-a-time benchmark's CPU (every claim re-prepared, `StatementStatus::RePrepare` equal to
//!   `Run`). The unary `+` keeps the value out of planning (test
//!   `claims_are_not_prepared_again`).

mod content;
mod gc;
mod migrate;
mod read;
mod rows;
mod work;
mod world;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fleetdb_core::work::{
    BackoffInfo, ClaimRequest, Claimed, HistoryEntry, HistoryFilter, Process, SessionInfo,
    WorkCursor, WorkInfo, WorkListing,
};
use fleetdb_core::Timestamp;
use fleetdb_core::{
    Backend, Batch, Capabilities, Change, ChangeFilter, Clock, Error, Namespace, Object, ObjectKey,
    ObjectQuery, OpResult, Result, Revision, RevisionInfo, SchemaStatus, Tag,
};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

pub use migrate::{testing, MIGRATIONS};
pub use writer::GROUP_JOBS_MAX;

/// How durable a commit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: a commit is on disk when the call returns (the default).
    #[default]
    Full,
    /// `synchronous=NORMAL`: a power loss may lose the last commits (never corrupts).
    Normal,
}

/// Options for [`SqliteBackend::open`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Apply pending migrations at open.
    pub migrate: bool,
    pub durability: Durability,
    /// How long to wait for another process's write lock before reporting the database busy.
    pub busy_timeout_ms: u64,
    /// Read connections kept open.
    pub readers_max: usize,
    /// The WAL's size past which the checkpointer has the write path finish a checkpoint, so
    /// that the WAL starts over even under writes that never pause (docs/design.md, "SQLite
    /// checkpoints"); also the size a longer WAL file is cut back to when it starts over.
    pub wal_restart_bytes: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            migrate: true,
            durability: Durability::Full,
            busy_timeout_ms: 5_000,
            readers_max: 8,
            wal_restart_bytes: WAL_RESTART_BYTES,
        }
    }
}

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    Memory,
}

/// The SQLite backend. Cheap to share behind an `Arc`.
pub struct SqliteBackend {
    location: Location,
    options: SqliteOptions,
    clock: Arc<dyn Clock>,
    queue: Arc<writer::Queue>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    checkpointer: Option<Checkpointer>,
    /// In memory: the one connection. On disk: the write connection (held by whoever commits a group).
    write_conn: Arc<Mutex<Connection>>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("location", &self.location)
            .finish()
    }
}

/// Closing: every write was driven to its answer by its caller (a dropped store has no caller
/// left waiting), the checkpointer stops, then every connection closes (SQLite then checkpoints
/// the WAL and removes it) before the drop returns.
impl Drop for SqliteBackend {
    fn drop(&mut self) {
        if let Some(c) = self.checkpointer.take() {
            c.stop();
        }
        // Readers first: the last connection to close checkpoints, and a read-only one cannot.
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // The writer thread ends when the queue is gone (its wake channel closes).
        let (placeholder, _) = writer::Queue::new(std::time::Duration::ZERO);
        drop(std::mem::replace(&mut self.queue, Arc::new(placeholder)));
        if let Some(t) = self.writer_thread.take() {
            let _ = t.join();
        }
    }
}

/// How often the checkpointer copies the WAL into the database file.
pub const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
/// The default of [`SqliteOptions::wal_restart_bytes`].
pub const WAL_RESTART_BYTES: u64 = 64 << 20;

/// A thread that runs passive WAL checkpoints off the write path.
///
/// A checkpoint copies the WAL's frames into the database file; the WAL starts over from its
/// beginning only when a writer begins after a checkpoint copied *every* frame (and no reader
/// still reads from the WAL). Beside a writer that never pauses, a passive checkpoint never
/// copies every frame: frames are appended while it copies. The WAL then grew without bound —
/// 485 MB in 12 s of the one-at-a-time benchmark — every commit writing to new blocks of the file,
/// and every read searching a longer WAL index. So once a pass finds the WAL past
/// `wal_restart_bytes`, it asks the write path to finish: the next group's leader, after its
/// commit and still holding the write connection, checkpoints what this pass left (the frames
/// appended during it: little), so every frame is copied; the next write starts the WAL over, and
/// `journal_size_limit` cuts a longer file back. (Taking the write connection from this thread
/// instead starved: the writer thread takes it again at once, and the pass waited up to 155 ms.)
struct Checkpointer {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn spawn(
        conn: Connection,
        queue: std::sync::Weak<writer::Queue>,
        restart_bytes: u64,
    ) -> Result<Checkpointer> {
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fleetdb-sqlite-checkpoint".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                while !*stopped {
                    let (guard, _) = cv
                        .wait_timeout(stopped, CHECKPOINT_INTERVAL)
                        .unwrap_or_else(|p| p.into_inner());
                    stopped = guard;
                    if *stopped {
                        break;
                    }
                    match checkpoint(&conn) {
                        Ok(wal_bytes) if wal_bytes > restart_bytes => {
                            if let Some(q) = queue.upgrade() {
                                q.want_wal_restart();
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "passive checkpoint failed; retrying later")
                        }
                    }
                }
                drop(conn);
            })
            .map_err(|e| {
                Error::Backend(format!("cannot start the SQLite checkpoint thread: {e}"))
            })?;
        Ok(Checkpointer { stop, thread })
    }

    fn stop(self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        let _ = self.thread.join();
    }
}

/// One passive checkpoint on `conn`; returns the size of the WAL's frames it found (not the file's
/// size: a WAL that started over reuses its file).
pub(crate) fn checkpoint(conn: &Connection) -> rusqlite::Result<u64> {
    let frames: i64 = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?;
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    // Frame header: 24 bytes.
    Ok(u64::try_from(frames).unwrap_or(0) * (u64::try_from(page).unwrap_or(0) + 24))
}

/// Run `f`, which may wait (for a lock, a disk), on tokio's blocking pool when there is a
/// runtime, so that the runtime's threads go on; without one, on this thread.
pub(crate) async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt
            .spawn_blocking(f)
            .await
            .map_err(|e| Error::Backend(format!("a SQLite task failed: {e}")))?,
        Err(_) => f(),
    }
}

/// Map a rusqlite error to a FleetDB error. The only place that interprets driver errors.
pub(crate) fn map_err(e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode;
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => Error::Unavailable(format!(
                "the SQLite database is busy (another writer holds it): {e}"
            )),
            ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly => {
                Error::Unavailable(format!("cannot open or write the SQLite database: {e}"))
            }
            ErrorCode::DiskFull => Error::Unavailable(format!("disk full: {e}")),
            _ => Error::Backend(e.to_string()),
        },
        _ => Error::Backend(e.to_string()),
    }
}

pub(crate) fn current_revision(c: &Connection) -> Result<RevisionInfo> {
    c.prepare_cached(
        "SELECT (SELECT coalesce(max(revision), 0) FROM changes),
                (SELECT value FROM fleetdb_meta WHERE key = 'compacted_revision')",
    )
    .and_then(|mut s| s.query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))))
    .map(|(max, compacted)| RevisionInfo {
        current: Revision(max.max(compacted)),
        compacted: Revision(compacted),
    })
    .map_err(map_err)
}

/// The schema versions of the database file at `path`, read on a read-only connection that
/// creates nothing and changes nothing (no journal mode switch): what `fleetdb migrate status`
/// shows. A file that is not there is an empty database (version 0, every migration pending)
/// and is not created. Fails if the file cannot be opened read-only (a WAL database whose
/// `-shm` file is missing and cannot be made, say); the caller may then open it the usual way.
pub fn file_schema_status(path: &Path) -> Result<SchemaStatus> {
    if !path.exists() {
        return migrate::status(&Connection::open_in_memory().map_err(map_err)?);
    }
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(map_err)?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(map_err)?;
    migrate::check_owned(&c, path)?;
    migrate::status(&c)
}

/// Parse `sqlite:///abs/path`, `sqlite://rel/path`, `sqlite:path` or `sqlite::memory:`.
pub fn parse_url(url: &str) -> Result<Location> {
    let rest = url
        .strip_prefix("sqlite:")
        .ok_or_else(|| Error::invalid("database URL", url, "a SQLite URL starts with sqlite:"))?;
    if rest == ":memory:" || rest == "//:memory:" {
        return Ok(Location::Memory);
    }
    let path = rest.strip_prefix("//").unwrap_or(rest);
    if path.contains(['?', '#']) {
        // Dropping a query (`?mode=ro`) would open read-write what was meant read-only, and
        // a file whose name has a `?` would be another file.
        return Err(Error::invalid(
            "database URL",
            url,
            "takes no query or fragment (`?`, `#`): options go in OpenOptions",
        ));
    }
    if path.is_empty() {
        return Err(Error::invalid(
            "database URL",
            url,
            "needs a file path: sqlite:///abs/path/fleetdb.sqlite, sqlite://rel/path or sqlite::memory:",
        ));
    }
    Ok(Location::File(PathBuf::from(path)))
}

/// The database file's path with every symbolic link resolved (its folder exists). SQLite keeps
/// the `-wal` and `-shm` beside the file a link points to, and the content store must be beside
/// it too: opened by a link and by the real name, one database had two content stores, each
/// missing the other's blobs. A link to a missing file is refused: SQLite would create the
/// target, which is not what the path names.
fn resolve_links(path: &Path) -> Result<PathBuf> {
    let invalid = |rule: String| Error::invalid("database path", path.display().to_string(), rule);
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Ok(target) = std::fs::read_link(path) {
                return Err(invalid(format!(
                    "is a symbolic link to {}, which does not exist: create the database by its \
                     own name",
                    target.display()
                )));
            }
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(invalid("must name a file".into()));
            };
            let dir = std::fs::canonicalize(dir).map_err(|e| {
                Error::Unavailable(format!("cannot resolve the folder {}: {e}", dir.display()))
            })?;
            Ok(dir.join(name))
        }
        Err(e) => Err(Error::Unavailable(format!(
            "cannot resolve the database path {}: {e}",
            path.display()
        ))),
    }
}

fn configure(c: &Connection, options: &SqliteOptions) -> Result<()> {
    c.busy_timeout(std::time::Duration::from_millis(options.busy_timeout_ms))
        .map_err(map_err)?;
    c.set_prepared_statement_cache_capacity(256);
    Ok(())
}

fn open_file(path: &Path, options: &SqliteOptions, read_only: bool) -> Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let c = Connection::open_with_flags(path, flags).map_err(|e| {
        Error::Unavailable(format!(
            "cannot open SQLite database {}: {e}",
            path.display()
        ))
    })?;
    configure(&c, options)?;
    Ok(c)
}

impl SqliteBackend {
    /// Open (creating the file and its folder on first use) and, if `options.migrate`, migrate.
    /// The schema version is checked before anything is written: a database newer than this
    /// binary is refused with `SchemaTooNew` and left untouched.
    pub async fn open(
        location: Location,
        options: SqliteOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        if options.busy_timeout_ms > i32::MAX as u64 {
            return Err(Error::invalid(
                "busy_timeout_ms",
                options.busy_timeout_ms.to_string(),
                format!("must be at most {} (about 24 days)", i32::MAX),
            ));
        }
        if options.wal_restart_bytes == 0 || i64::try_from(options.wal_restart_bytes).is_err() {
            return Err(Error::invalid(
                "wal_restart_bytes",
                options.wal_restart_bytes.to_string(),
                "must be between 1 and 2^63 - 1",
            ));
        }
        let mut location = location;
        let conn = match &mut location {
            Location::Memory => {
                let c = Connection::open_in_memory().map_err(map_err)?;
                configure(&c, &options)?;
                c
            }
            Location::File(path) => {
                // No file can be named with a NUL byte: the path is wrong, not the database
                // unavailable (a transient error, which callers retry).
                if path.as_os_str().as_encoded_bytes().contains(&0) {
                    return Err(Error::invalid(
                        "database path",
                        path.display().to_string().replace('\0', "\\0"),
                        "must not contain a NUL byte",
                    ));
                }
                // Absolute once and for all: connections opened later, and the blob folders
                // beside the file, must not follow the process into another working folder.
                if path.as_os_str().as_encoded_bytes().ends_with(b"/") {
                    return Err(Error::invalid(
                        "database path",
                        path.display().to_string(),
                        "names a folder (it ends with '/'): name a file in it (…/fleetdb.sqlite)",
                    ));
                }
                *path = std::path::absolute(&*path).map_err(|e| {
                    Error::invalid("database path", path.display().to_string(), e.to_string())
                })?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        use std::io::ErrorKind;
                        if matches!(
                            e.kind(),
                            ErrorKind::AlreadyExists | ErrorKind::NotADirectory
                        ) {
                            // A part of the path is a file: no retry can help.
                            Error::invalid(
                                "database path",
                                path.display().to_string(),
                                format!("{} is not a folder ({e})", dir.display()),
                            )
                        } else {
                            Error::Unavailable(format!(
                                "cannot create the folder {}: {e}",
                                dir.display()
                            ))
                        }
                    })?;
                }
                *path = resolve_links(path)?;
                match std::fs::metadata(&*path) {
                    Ok(m) if m.is_dir() => {
                        return Err(Error::invalid(
                            "database path",
                            path.display().to_string(),
                            "is a folder: name a file in it (…/fleetdb.sqlite)",
                        ))
                    }
                    Ok(m) if !m.is_file() => {
                        return Err(Error::invalid(
                            "database path",
                            path.display().to_string(),
                            "is not a regular file (a device, a pipe or a socket)",
                        ))
                    }
                    _ => {}
                }
                open_file(path, &options, false)?
            }
        };
        if let Location::File(path) = &location {
            migrate::check_owned(&conn, path)?;
        }
        migrate::check_not_too_new(&conn)?;
        if let Location::File(_) = location {
            // WAL lets readers run beside the writer. Setting it again on a WAL database writes nothing.
            let mode: String = conn
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .map_err(map_err)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(Error::Backend(format!(
                    "SQLite refused WAL mode (got {mode})"
                )));
            }
        }
        let sync = match options.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.execute_batch(&format!("PRAGMA synchronous={sync}"))
            .map_err(map_err)?;
        let mut conn = conn;
        if options.migrate {
            migrate::migrate(&mut conn, clock.now())?;
        }
        let checkpoint_conn = match &location {
            Location::File(path) => {
                // Checkpoints copy the WAL into the database file and fsync it: work the writer
                // should not wait for. Move it to a thread of its own.
                conn.execute_batch(&format!(
                    "PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit={}",
                    options.wal_restart_bytes
                ))
                .map_err(map_err)?;
                Some(open_file(path, &options, false)?)
            }
            Location::Memory => None,
        };
        // No busy timeout on the write connection: a caller's BEGIN must not wait for another
        // process (the writer thread waits instead, see the writer module); what holds the
        // connection itself sets it for its own statements (`exclusive`).
        conn.busy_timeout(std::time::Duration::ZERO)
            .map_err(map_err)?;
        let write_conn = Arc::new(Mutex::new(conn));
        let (queue, wake) =
            writer::Queue::new(std::time::Duration::from_millis(options.busy_timeout_ms));
        let queue = Arc::new(queue);
        let checkpointer = checkpoint_conn
            .map(|c| Checkpointer::spawn(c, Arc::downgrade(&queue), options.wal_restart_bytes))
            .transpose()?;
        let writer_thread = {
            let (q, c) = (Arc::downgrade(&queue), write_conn.clone());
            std::thread::Builder::new()
                .name("fleetdb-sqlite-writer".into())
                .spawn(move || writer::Queue::writer_loop(q, c, wake))
                .map_err(|e| {
                    Error::Backend(format!("cannot start the SQLite writer thread: {e}"))
                })?
        };
        Ok(SqliteBackend {
            location,
            options,
            clock,
            queue,
            writer_thread: Some(writer_thread),
            checkpointer,
            write_conn,
            readers: Mutex::new(Vec::new()),
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Run `f` on a read connection.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let path = match &self.location {
            Location::Memory => {
                let c = self.write_conn.lock().unwrap_or_else(|p| p.into_inner());
                return f(&c);
            }
            Location::File(p) => p,
        };
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => open_file(path, &self.options, true)?,
        };
        let out = f(&conn);
        let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.options.readers_max {
            pool.push(conn);
        }
        out
    }

    /// Queue a write, lead the group commit if nobody does, and wait until the group that
    /// carried it committed.
    async fn write(&self, write: writer::Write) -> Result<writer::Written> {
        let (reply, rx) = oneshot::channel();
        self.queue.submit(&self.write_conn, write, reply);
        rx.await
            .map_err(|_| Error::Unavailable("the SQLite write was abandoned".into()))?
    }

    /// [`Backend::history_prune`] in statements of at most `batch` rows, the write connection
    /// taken for each.
    pub(crate) async fn history_prune_in(&self, before: Timestamp, batch: usize) -> Result<u64> {
        fleetdb_core::work::delete_in_batches(
            fleetdb_core::work::HISTORY_PRUNE_FIRST,
            batch,
            |batch| self.exclusive(move |c| work::history_prune(c, before, batch)),
        )
        .await
    }

    /// Run `f` with the write connection, between groups (migrations, compaction), on the
    /// blocking pool: the connection may be held by the writer thread, waiting for another
    /// process's write lock, and `f`'s own statements may wait for it too; the caller's (async)
    /// thread must not (see the writer module).
    pub(crate) async fn exclusive<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.write_conn.clone();
        let busy_timeout = std::time::Duration::from_millis(self.options.busy_timeout_ms);
        off_runtime(move || {
            /// Takes the busy timeout off the write connection again however `f` ends (a
            /// panic included): callers' BEGINs must not wait (see the writer module).
            struct NoWait<'a>(std::sync::MutexGuard<'a, Connection>);
            impl Drop for NoWait<'_> {
                fn drop(&mut self) {
                    let _ = self.0.busy_timeout(std::time::Duration::ZERO);
                }
            }
            let mut c = NoWait(conn.lock().unwrap_or_else(|p| p.into_inner()));
            c.0.busy_timeout(busy_timeout).map_err(map_err)?;
            f(&mut c.0)
        })
        .await
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    /// Writes the writer ran again because another process held the database's write lock past
    /// the busy timeout (each write of a retried group counted).
    fn retries(&self) -> u64 {
        self.queue
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            multi_process_writers: true,
            group_commit: true,
            revisions_visible_in_order: true,
            unavailable_may_have_committed: false,
        }
    }

    async fn schema_status(&self) -> Result<SchemaStatus> {
        self.read(migrate::status)
    }

    async fn migrate(&self) -> Result<SchemaStatus> {
        let now = self.clock.now();
        self.exclusive(move |c| {
            migrate::migrate(c, now)?;
            migrate::status(c)
        })
        .await
    }

    async fn namespace_get(&self, name: &str) -> Result<Option<Namespace>> {
        self.read(|c| rows::get_namespace(c, name))
    }

    async fn namespace_list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Namespace>> {
        self.read(|c| read::namespace_list(c, after, limit))
    }

    async fn object_get(&self, key: &ObjectKey) -> Result<Option<Object>> {
        self.read(|c| rows::get_object(c, key))
    }

    async fn object_list(&self, query: &ObjectQuery) -> Result<Vec<Object>> {
        self.read(|c| read::object_list(c, query))
    }

    async fn tag_get(&self, key: &ObjectKey, name: &str) -> Result<Option<Tag>> {
        self.read(|c| Ok(rows::get_tag(c, key, name)?.map(|(t, _)| t)))
    }

    async fn tag_list(&self, key: &ObjectKey) -> Result<Vec<Tag>> {
        self.read(|c| {
            Ok(rows::list_tags(c, key)?
                .into_iter()
                .map(|(t, _)| t)
                .collect())
        })
    }

    async fn commit(&self, batch: Batch) -> Result<Vec<OpResult>> {
        match self.write(writer::Write::Batch(batch)).await? {
            writer::Written::Batch(r) => Ok(r),
            _ => Err(Error::Backend(
                "the writer answered a batch with something else".into(),
            )),
        }
    }

    async fn changes(
        &self,
        after: Revision,
        filter: &ChangeFilter,
        limit: usize,
    ) -> Result<Vec<Change>> {
        self.read(|c| read::changes(c, after, filter, limit))
    }

    async fn change_times(
        &self,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<(Revision, Timestamp)>> {
        self.read(|c| read::change_times(c, after, limit))
    }

    async fn compact(&self, before: Revision) -> Result<u64> {
        let upto = self
            .exclusive(move |c| read::compact_mark(c, before))
            .await?;
        // Batch by batch, each taking the write lock again: writers of this process and of
        // others go in between.
        let mut dropped = 0;
        loop {
            let n = self.exclusive(move |c| read::compact_rows(c, upto)).await?;
            dropped += n;
            if n < read::COMPACT_BATCH as u64 {
                return Ok(dropped);
            }
        }
    }

    async fn revision(&self) -> Result<RevisionInfo> {
        self.read(current_revision)
    }

    async fn commit_then_claim(
        &self,
        batch: Batch,
        claim: ClaimRequest,
    ) -> Result<(Vec<OpResult>, Claimed)> {
        match self
            .write(writer::Write::BatchThenClaim(batch, claim))
            .await?
        {
            writer::Written::BatchThenClaim(r, w) => Ok((r, w)),
            _ => Err(Error::Backend(
                "the writer answered a batch-then-claim with something else".into(),
            )),
        }
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Claimed> {
        match self.write(writer::Write::Claim(req)).await? {
            writer::Written::Claim(r) => Ok(r),
            _ => Err(Error::Backend(
                "the writer answered a claim with something else".into(),
            )),
        }
    }

    async fn session_renew(
        &self,
        ids: &[String],
        now: Timestamp,
    ) -> Result<Vec<(String, Timestamp)>> {
        let write = writer::Write::Renew {
            ids: ids.to_vec(),
            now,
        };
        match self.write(write).await? {
            writer::Written::Renew(r) => Ok(r),
            _ => Err(Error::Backend(
                "the writer answered a renewal with something else".into(),
            )),
        }
    }

    async fn session_sweep(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<fleetdb_core::backend::Swept> {
        match self.write(writer::Write::Sweep { now, limit }).await? {
            writer::Written::Sweep(n) => Ok(n),
            _ => Err(Error::Backend(
                "the writer answered a sweep with something else".into(),
            )),
        }
    }

    async fn session_get(&self, id: &str) -> Result<Option<SessionInfo>> {
        self.read(|c| work::session_read(c, id))
    }

    async fn session_list(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionInfo>> {
        self.read(|c| work::session_list(c, after, limit))
    }

    async fn process_list(&self) -> Result<Vec<Process>> {
        self.read(work::process_all)
    }

    async fn work_list(&self, q: &WorkListing) -> Result<Vec<WorkInfo>> {
        self.read(|c| work::work_list(c, q))
    }

    async fn backoff_list(
        &self,
        process: Option<&str>,
        active_at: Option<Timestamp>,
        after: Option<&WorkCursor>,
        limit: usize,
    ) -> Result<Vec<BackoffInfo>> {
        self.read(|c| work::backoff_list(c, process, active_at, after, limit))
    }

    async fn history_list(
        &self,
        filter: &HistoryFilter,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>> {
        self.read(|c| work::history_list(c, filter, before, limit))
    }

    async fn history_prune(&self, before: Timestamp) -> Result<u64> {
        self.history_prune_in(before, fleetdb_core::work::HISTORY_PRUNE_BATCH)
            .await
    }

    async fn select(
        &self,
        selector: &str,
        now: Timestamp,
        after: Option<&ObjectKey>,
        limit: usize,
    ) -> Result<Vec<Object>> {
        self.read(|c| work::select(c, selector, now, after, limit))
    }

    async fn work_stats(&self, now: Timestamp) -> Result<Vec<fleetdb_core::backend::WorkStats>> {
        self.read(|c| work::work_stats(c, now))
    }

    async fn count(&self, selector: &str, now: Timestamp) -> Result<u64> {
        self.read(|c| work::count(c, selector, now))
    }

    async fn world_list(
        &self,
        query: &fleetdb_core::world::WorldQuery,
    ) -> Result<Vec<fleetdb_core::world::WorldRecord>> {
        self.read(|c| world::world_scan(c, query))
    }

    async fn world_list_all(
        &self,
        queries: &[fleetdb_core::world::WorldQuery],
    ) -> Result<Vec<Vec<fleetdb_core::world::WorldRecord>>> {
        self.read(|c| world::world_scan_all(c, queries))
    }

    async fn lease_get(&self, id: &str) -> Result<Option<fleetdb_core::gc::Lease>> {
        self.read(|c| gc::lease_read(c, id))
    }

    async fn lease_list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<fleetdb_core::gc::Lease>> {
        self.read(|c| gc::lease_list(c, after, limit))
    }

    async fn lease_resources(&self, id: &str) -> Result<Vec<fleetdb_core::gc::Resource>> {
        self.read(|c| gc::lease_resources_of(c, id))
    }

    async fn gc_kinds(&self) -> Result<Vec<fleetdb_core::gc::GcKind>> {
        self.read(gc::gc_kinds)
    }

    async fn gc_snapshot(&self) -> Result<fleetdb_core::gc::GcSnapshot> {
        self.read(gc::gc_snapshot)
    }

    // ---- the content store (see the content module) ----

    async fn ingest_start(
        &self,
        reference: &str,
        expected: Option<(&str, u64)>,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<fleetdb_core::content::IngestStatus> {
        self.content_ingest_start(reference, expected, now, expires_at)
            .await
    }

    async fn ingest_write(
        &self,
        reference: &str,
        offset: u64,
        data: &[u8],
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<fleetdb_core::content::IngestStatus> {
        self.content_ingest_write(reference, offset, data, now, expires_at)
            .await
    }

    async fn ingest_commit(
        &self,
        reference: &str,
        digest: &str,
        size: u64,
        labels: fleetdb_core::Labels,
        lease: Option<&str>,
        now: Timestamp,
    ) -> Result<fleetdb_core::gc::BlobInfo> {
        self.content_ingest_commit(reference, digest, size, labels, lease, now)
            .await
    }

    async fn ingest_abort(&self, reference: &str) -> Result<()> {
        self.content_ingest_abort(reference).await
    }

    async fn ingest_list(&self) -> Result<Vec<fleetdb_core::content::IngestStatus>> {
        self.content_ingest_list().await
    }

    async fn ingest_sweep(&self, now: Timestamp) -> Result<u64> {
        self.content_ingest_sweep(now).await
    }

    async fn blob_info(&self, digest: &str) -> Result<Option<fleetdb_core::gc::BlobInfo>> {
        self.content_blob_info(digest).await
    }

    async fn blob_read(&self, digest: &str, offset: u64, len: Option<u64>) -> Result<Vec<u8>> {
        self.content_blob_read(digest, offset, len).await
    }

    async fn blob_list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<fleetdb_core::gc::BlobInfo>> {
        self.content_blob_list(after, limit).await
    }

    async fn blob_remove_bytes(&self, digests: &[String]) -> Result<u64> {
        self.content_blob_remove_bytes(digests).await
    }

    async fn blob_orphans_remove(&self) -> Result<u64> {
        self.content_blob_orphans_remove().await
    }

    async fn gc_run_record(&self, stats: &str, started_at: Timestamp, keep: usize) -> Result<()> {
        let stats = stats.to_string();
        self.exclusive(move |c| gc::run_record(c, &stats, started_at, keep))
            .await
    }

    async fn gc_runs(&self, limit: usize) -> Result<Vec<String>> {
        self.read(|c| gc::runs(c, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp(1_700_000_000_000_000);

    /// Commit `ops` at [`NOW`].
    async fn commit_at_now(backend: &SqliteBackend, ops: Vec<fleetdb_core::Op>) {
        backend
            .commit(Batch {
                preconditions: Vec::new(),
                ops,
                now: NOW,
            })
            .await
            .unwrap();
    }

    /// An in-memory backend with process `P`, session `s1` and machines m0, m1, m2.
    async fn claim_setup() -> SqliteBackend {
        use fleetdb_core::work::SessionInfo;
        use fleetdb_core::{Op, PutMode};
        let clock: Arc<dyn Clock> = Arc::new(fleetdb_core::ManualClock::new(NOW));
        let backend = SqliteBackend::open(Location::Memory, SqliteOptions::default(), clock)
            .await
            .unwrap();
        let mut ops = vec![
            Op::ProcessDefine {
                name: "P".into(),
                conflicts: Vec::new(),
            },
            Op::SessionStart {
                session: SessionInfo {
                    id: "s1".into(),
                    component: "worker".into(),
                    host: "h".into(),
                    runtime_info: String::new(),
                    ttl_ms: 10_000,
                    created_at: NOW,
                    deadline: Timestamp(NOW.0 + 10_000_000),
                },
            },
        ];
        for i in 0..3 {
            ops.push(Op::ObjectPut {
                key: ObjectKey::new("default", "machine", format!("m{i}")).unwrap(),
                labels: Default::default(),
                mode: PutMode::Upsert,
            });
        }
        commit_at_now(&backend, ops).await;
        backend
    }

    /// Another process holding the database's write lock does not stop this process's async
    /// runtime (the CLI's has one thread, which also renews the session and watches a worker's
    /// command): a write, a compaction and a content-store bookkeeping step wait for the lock off
    /// the runtime's thread, and go through once the other process lets go. Before, the write
    /// waited on the caller's thread: nothing else ran until it failed `Unavailable`, five busy
    /// timeouts later.
    #[tokio::test(flavor = "current_thread")]
    async fn waiting_for_another_process_does_not_stop_the_runtime() {
        use fleetdb_core::{Op, PutMode};
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sqlite");
        let clock: Arc<dyn Clock> = Arc::new(fleetdb_core::ManualClock::new(NOW));
        // Long enough that a wait on the runtime's thread lasts until the watchdog below.
        let options = SqliteOptions {
            busy_timeout_ms: 3_600_000,
            ..SqliteOptions::default()
        };
        let backend = Arc::new(
            SqliteBackend::open(Location::File(path.clone()), options, clock)
                .await
                .unwrap(),
        );
        // "Another process": a connection on a thread of its own, holding the write lock until
        // this test's task tells it to let go, or until a watchdog's 10 s if the task cannot run.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held, is_held) = std::sync::mpsc::channel::<()>();
        let watchdog = Arc::new(AtomicBool::new(false));
        let fired = watchdog.clone();
        let other = std::thread::spawn(move || {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
            held.send(()).unwrap();
            if released
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_err()
            {
                fired.store(true, Ordering::SeqCst);
            }
            c.execute_batch("COMMIT").unwrap();
        });
        is_held.recv().unwrap();
        let b = backend.clone();
        let write = tokio::spawn(async move {
            b.commit(Batch {
                preconditions: Vec::new(),
                ops: vec![Op::ObjectPut {
                    key: ObjectKey::new("default", "machine", "m0").unwrap(),
                    labels: Default::default(),
                    mode: PutMode::Upsert,
                }],
                now: NOW,
            })
            .await
        });
        let b = backend.clone();
        let compact = tokio::spawn(async move { b.compact(Revision(1)).await });
        let b = backend.clone();
        let sweep = tokio::spawn(async move { b.ingest_sweep(NOW).await });
        // This task runs while they wait: the runtime's one thread is free.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(!write.is_finished() && !compact.is_finished() && !sweep.is_finished());
        let _ = release.send(());
        other.join().unwrap();
        assert!(
            !watchdog.load(Ordering::SeqCst),
            "the runtime's thread waited for the other process's lock"
        );
        let written = write.await.unwrap();
        assert!(written.is_ok(), "{written:?}");
        let compacted = compact.await.unwrap();
        assert!(compacted.is_ok(), "{compacted:?}");
        assert_eq!(sweep.await.unwrap().unwrap(), 0);
        let key = ObjectKey::new("default", "machine", "m0").unwrap();
        assert!(backend.object_get(&key).await.unwrap().is_some());
    }

    /// An upload write whose caller gives up while its bookkeeping statement waits for another
    /// process's write lock keeps the upload's file locked until that statement has run: a
    /// second write meanwhile is refused (`Unavailable`), not let in to overwrite the bytes the
    /// first one's row then claims (before: the row said 8 bytes, the file held the second's 2).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_write_given_up_keeps_its_file_locked_until_it_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let clock: Arc<dyn Clock> = Arc::new(fleetdb_core::ManualClock::new(NOW));
        let backend = SqliteBackend::open(
            Location::File(path.clone()),
            SqliteOptions::default(),
            clock,
        )
        .await
        .unwrap();
        let later = Timestamp(NOW.0 + 3_600_000_000);
        backend.ingest_start("up", None, NOW, later).await.unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let first = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            backend.ingest_write("up", 0, b"AAAAAAAA", NOW, later),
        )
        .await;
        assert!(
            first.is_err(),
            "the first write waits for the other process"
        );
        let second = backend.ingest_write("up", 0, b"BB", NOW, later).await;
        assert!(matches!(second, Err(Error::Unavailable(_))), "{second:?}");
        other.execute_batch("COMMIT").unwrap();
        let recorded = async {
            loop {
                let list = backend.ingest_list().await.unwrap();
                if list.first().is_some_and(|u| u.offset == 8) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), recorded)
            .await
            .expect("the given-up write's statement ran once the lock was free");
        let next = backend
            .ingest_write("up", 8, b"CC", NOW, later)
            .await
            .unwrap();
        assert_eq!(next.offset, 10);
    }

    /// A busy timeout SQLite cannot take (more than i32::MAX ms) is refused at open, not a
    /// panic inside the driver.
    #[tokio::test]
    async fn an_oversized_busy_timeout_is_refused() {
        let clock: Arc<dyn Clock> = Arc::new(fleetdb_core::ManualClock::new(NOW));
        let options = SqliteOptions {
            busy_timeout_ms: 1 << 31,
            ..SqliteOptions::default()
        };
        let Err(err) = SqliteBackend::open(Location::Memory, options, clock).await else {
            panic!("an oversized busy timeout was accepted");
        };
        assert!(matches!(err, Error::Invalid { .. }), "{err}");
    }

    /// A compaction of more change rows than one batch deletes them all, batch by batch, and
    /// reads before the new compaction point fail `Compacted`.
    #[tokio::test]
    async fn compaction_deletes_in_batches() {
        use fleetdb_core::{Op, PutMode};
        let clock: Arc<dyn Clock> = Arc::new(fleetdb_core::ManualClock::new(NOW));
        let backend = SqliteBackend::open(Location::Memory, SqliteOptions::default(), clock)
            .await
            .unwrap();
        let n = read::COMPACT_BATCH * 2 + 5;
        for chunk in 0..3 {
            let ops = (0..n)
                .filter(|i| i % 3 == chunk)
                .map(|i| Op::ObjectPut {
                    key: ObjectKey::new("default", "machine", format!("m{i}")).unwrap(),
                    labels: Default::default(),
                    mode: PutMode::Upsert,
                })
                .collect();
            commit_at_now(&backend, ops).await;
        }
        let info = backend.revision().await.unwrap();
        assert!(info.current.0 >= n, "{info:?}");
        let dropped = backend.compact(Revision(info.current.0 + 1)).await.unwrap();
        assert!(dropped >= n as u64, "{dropped}");
        let left: i64 = backend
            .read(|c| {
                c.query_row("SELECT count(*) FROM changes", [], |r| r.get(0))
                    .map_err(map_err)
            })
            .unwrap();
        assert_eq!(left, 0);
        assert_eq!(backend.revision().await.unwrap().compacted, info.current);
        assert!(matches!(
            backend.changes(Revision(1), &Default::default(), 10).await,
            Err(Error::Compacted { .. })
        ));
    }

    #[test]
    fn urls_name_a_file_or_memory_and_take_no_query() {
        assert!(matches!(parse_url("sqlite::memory:"), Ok(Location::Memory)));
        assert!(matches!(
            parse_url("sqlite:///abs/db.sqlite"),
            Ok(Location::File(p)) if p == std::path::Path::new("/abs/db.sqlite")
        ));
        assert!(matches!(
            parse_url("sqlite://rel/db.sqlite"),
            Ok(Location::File(p)) if p == std::path::Path::new("rel/db.sqlite")
        ));
        for bad in [
            "sqlite:///db.sqlite?mode=ro",
            "sqlite://a#b",
            "sqlite://",
            "postgres://x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    /// A relative path is made absolute at open: later connections (and the blob folders) do
    /// not follow the process into another working folder.
    #[tokio::test]
    async fn a_relative_path_is_resolved_once_at_open() {
        let dir = tempfile::tempdir_in(".").unwrap();
        let rel = std::path::Path::new(dir.path().file_name().unwrap()).join("db.sqlite");
        assert!(rel.is_relative(), "{}", rel.display());
        let clock: Arc<dyn Clock> = Arc::new(fleetdb_core::ManualClock::new(NOW));
        let backend = SqliteBackend::open(Location::File(rel), SqliteOptions::default(), clock)
            .await
            .unwrap();
        match &backend.location {
            Location::File(p) => assert!(p.is_absolute(), "{}", p.display()),
            Location::Memory => panic!("a file"),
        }
    }

    /// A write connection left inside a transaction (by a panic in a write, say) does not
    /// break every later write: the next group rolls the stray transaction back first.
    #[tokio::test]
    async fn a_transaction_left_open_does_not_break_later_writes() {
        let backend = claim_setup().await;
        backend
            .write_conn
            .lock()
            .unwrap()
            .execute_batch("BEGIN IMMEDIATE; DELETE FROM sessions")
            .unwrap();
        let r = backend
            .commit(Batch {
                preconditions: Vec::new(),
                ops: vec![fleetdb_core::Op::ProcessDefine {
                    name: "Q".into(),
                    conflicts: Vec::new(),
                }],
                now: NOW,
            })
            .await;
        assert!(r.is_ok(), "{r:?}");
        assert!(
            backend.session_get("s1").await.unwrap().is_some(),
            "the stray transaction's delete was rolled back"
        );
    }

    fn claim_request(limit: usize) -> ClaimRequest {
        ClaimRequest {
            session_id: "s1".into(),
            process: "P".into(),
            target: fleetdb_core::work::ClaimTarget::Selector("kind = machine".into()),
            limit,
            now: NOW,
        }
    }

    /// A claim that comes back short says the change log's revision it looked at (`claim_wait`
    /// waits for a later one without reading it); a full one does not.
    #[tokio::test]
    async fn a_short_claim_says_the_revision_it_looked_at() {
        let backend = claim_setup().await;
        let full = backend.claim(claim_request(2)).await.unwrap();
        assert_eq!((full.work.len(), full.revision), (2, None));
        let current = backend.revision().await.unwrap().current;
        let short = backend.claim(claim_request(2)).await.unwrap();
        assert_eq!((short.work.len(), short.revision), (1, Some(current)));
        let empty = backend.claim(claim_request(2)).await.unwrap();
        assert_eq!((empty.work.len(), empty.revision), (0, Some(current)));
    }

    /// A claim's statement is prepared once and run many times: a bare bound `LIMIT ?` made
    /// SQLite prepare it again at every run (see the module documentation).
    #[tokio::test]
    async fn claims_are_not_prepared_again() {
        let backend = claim_setup().await;
        for _ in 0..3 {
            backend.claim(claim_request(1)).await.unwrap();
        }
        let q = fleetdb_core::backend::CandidateQuery {
            selector: fleetdb_core::selector::Selector::parse("kind = machine").unwrap(),
            process: "P".into(),
            exclude: vec!["P".into()],
            now: NOW,
            limit: 1,
        };
        let (sql, _) = work::claim_candidates_sql(&q);
        let c = backend.write_conn.lock().unwrap();
        let stmt = c.prepare_cached(&sql).unwrap();
        let runs = stmt.get_status(rusqlite::StatementStatus::Run);
        assert!(runs >= 3, "the claims ran this statement: {runs}");
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }

    /// History is pruned in `seq` order, in statements of at most the batch: the rows before the
    /// first one at or after the cut-off go, the older ones written after it stay.
    #[tokio::test]
    async fn history_prune_runs_in_batches_in_write_order() {
        let clock: Arc<dyn Clock> = Arc::new(fleetdb_core::time::SystemClock);
        let backend = SqliteBackend::open(Location::Memory, SqliteOptions::default(), clock)
            .await
            .unwrap();
        let remaining = |b: &SqliteBackend| {
            let c = b.write_conn.lock().unwrap();
            let mut s = c
                .prepare("SELECT at FROM work_history ORDER BY seq")
                .unwrap();
            let rows = s.query_map([], |r| r.get::<_, i64>(0)).unwrap();
            rows.collect::<std::result::Result<Vec<_>, _>>().unwrap()
        };
        {
            let c = backend.write_conn.lock().unwrap();
            for g in 1..=9i64 {
                let at = if g == 6 { 100 } else { g };
                c.execute(
                    "INSERT INTO work_history (namespace, kind, id, process, event, session_id, \
                       component, host, token, at) \
                     VALUES ('default', 'machine', 'm', 'P', 'Started', 's', 'c', 'h', ?1, ?2)",
                    rusqlite::params![g, at],
                )
                .unwrap();
            }
        }
        // Batches of 2: [1, 2], [3, 4], then 5 before the stop at 100.
        assert_eq!(backend.history_prune_in(Timestamp(50), 2).await.unwrap(), 5);
        assert_eq!(remaining(&backend), vec![100, 7, 8, 9]);
        assert_eq!(backend.history_prune_in(Timestamp(50), 2).await.unwrap(), 0);
        // Past every row: all but the newest (seq is the rowid: an emptied table would number
        // the next row 1 again).
        assert_eq!(
            backend.history_prune_in(Timestamp(101), 3).await.unwrap(),
            3
        );
        assert_eq!(remaining(&backend), vec![9]);
    }

    /// The WAL's checkpoint sequence number (WAL header, bytes 12..16): it changes each time the
    /// WAL starts over.
    fn wal_sequence(wal: &Path) -> Option<u32> {
        use std::io::Read as _;
        let mut header = [0u8; 16];
        std::fs::File::open(wal)
            .ok()?
            .read_exact(&mut header)
            .ok()?;
        Some(u32::from_be_bytes([
            header[12], header[13], header[14], header[15],
        ]))
    }

    /// Four writers committing back to back for eight checkpoint intervals into `stores`
    /// backends open on one file (each as another process would: its own connections,
    /// checkpointer and writer thread), the WAL to start over past 64 KiB. Returns the WAL's
    /// sequence numbers seen (one per start over), the commits made and the WAL file's largest
    /// size seen.
    async fn wal_under_writes_that_never_pause(
        stores: usize,
    ) -> (std::collections::BTreeSet<u32>, u32, u64) {
        use fleetdb_core::{Op, PutMode};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.sqlite");
        let options = SqliteOptions {
            durability: Durability::Normal,
            wal_restart_bytes: 64 << 10,
            ..SqliteOptions::default()
        };
        let clock: Arc<dyn Clock> = Arc::new(fleetdb_core::time::SystemClock);
        let mut backends = Vec::new();
        for _ in 0..stores {
            let b =
                SqliteBackend::open(Location::File(path.clone()), options.clone(), clock.clone());
            backends.push(Arc::new(b.await.unwrap()));
        }
        let wal = dir.path().join("wal.sqlite-wal");
        let until = std::time::Instant::now() + CHECKPOINT_INTERVAL * 8;
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let backend = backends[w % stores].clone();
                tokio::spawn(async move {
                    let mut commits = 0u32;
                    while std::time::Instant::now() < until {
                        let key = ObjectKey::new("default", "machine", format!("m{w}-{commits}"))
                            .unwrap();
                        let ops = vec![
                            Op::ObjectPut {
                                key: key.clone(),
                                labels: Default::default(),
                                mode: PutMode::Create,
                            },
                            Op::TagSet {
                                key,
                                name: "blob".into(),
                                value: format!("\"{}\"", "x".repeat(2_000)),
                            },
                        ];
                        backend
                            .commit(Batch {
                                preconditions: Vec::new(),
                                ops,
                                now: Timestamp(NOW.0 + i64::from(commits)),
                            })
                            .await
                            .unwrap();
                        commits += 1;
                    }
                    commits
                })
            })
            .collect();
        let (mut sequences, mut largest) = (std::collections::BTreeSet::new(), 0);
        while std::time::Instant::now() < until {
            sequences.extend(wal_sequence(&wal));
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let mut commits = 0;
        for w in writers {
            commits += w.await.unwrap();
        }
        (sequences, commits, largest)
    }

    /// Beside writers that never pause, a passive checkpoint never copies every frame, and the
    /// WAL grew without bound (485 MB in 12 s of the one-at-a-time benchmark). The checkpointer
    /// makes it start over once it is past `wal_restart_bytes`: here, several times while four
    /// writers commit back to back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_writes_that_never_pause() {
        let (sequences, commits, largest) = wal_under_writes_that_never_pause(1).await;
        assert!(
            sequences.len() >= 3,
            "the WAL started over {} times in {commits} commits (sequence numbers seen: {sequences:?}); largest {largest} B",
            sequences.len().saturating_sub(1)
        );
    }

    /// The same with the writers in two stores on one file, as in two processes: each one's
    /// checkpointer asks its own writer to finish a restart, while the other's commits go on.
    /// (Measured in 10 runs: 3–6 starts over in 1.6 s and ~6,800 commits, against 7 with one
    /// store; the largest WAL file seen ~100 MB, once 162 MB, against ~50 MB: between two
    /// checkpointer passes the WAL grows by what is written in one interval, and a pass that
    /// finds the other process holding the write lock asks again at the next. With a passive
    /// checkpoint only, one run in about ten started over once and grew past 190 MB.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_with_writers_in_two_processes() {
        let (sequences, commits, largest) = wal_under_writes_that_never_pause(2).await;
        eprintln!(
            "restarts {} commits {commits} largest {largest}",
            sequences.len()
        );
        assert!(
            sequences.len() >= 3,
            "the WAL started over {} times in {commits} commits (sequence numbers seen: {sequences:?}); largest {largest} B",
            sequences.len().saturating_sub(1)
        );
    }
}
