//! FleetDB's PostgreSQL backend.
//!
//! Every batch, claim and session sweep runs as one `SERIALIZABLE` transaction driving
//! [`fleetdb_core::apply::apply_batch`], [`apply_claim`] or [`apply_sweep`]; serialization
//! failures (40001), deadlocks (40P01), a revision taken twice and a claim inserted twice are
//! retried with exponential backoff and jitter (a retried claim runs its candidate query again, so
//! it moves on to other candidates). Revisions come from the `fleetdb_revision` sequence, so they are
//! unique and increasing per transaction but may commit out of order and have gaps (see
//! [`Capabilities::revisions_visible_in_order`]).
//!
//! Watches read the change log only up to [`Backend::settled_revision`], which fills holes left by
//! transactions that rolled back with gap markers and waits (bounded) for those still running (see
//! the `settle` module); compaction never passes it. [`Backend::announce_changes`] and
//! [`Backend::listen_changes`] wake watchers of other processes with `NOTIFY`/`LISTEN` on a
//! per-schema channel (see the `notify` module).
//!
//! Several processes may open the same database: migrations are serialized through the
//! `fleetdb_schema` primary key, writes through PostgreSQL's serializable isolation.

mod claims;
mod combine;
mod content;
mod error;
mod finish;
mod fused;
mod gc;
mod kv;
mod migrate;
mod notify;
mod settle;
mod sql;
pub mod testing;
mod tx;
mod work;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object as PooledClient, Pool, RecyclingMethod};
use fleetdb_core::apply::{apply_batch, apply_claim, apply_orphans, apply_sweep};
use fleetdb_core::backend::WorkStats;
use fleetdb_core::selector::{Dialect, Selector};
use fleetdb_core::work::{
    BackoffInfo, ClaimRequest, Claimed, HistoryEntry, HistoryFilter, Process, SessionInfo,
    WorkCursor, WorkInfo, WorkListing,
};
use fleetdb_core::world::{WorldQuery, WorldRecord};
use fleetdb_core::{
    Backend, Batch, Capabilities, Change, ChangeFilter, Clock, ClockSample, Error, Migration,
    Namespace, Object, ObjectKey, ObjectQuery, OpResult, Result, Revision, RevisionInfo,
    SchemaStatus, ServerClock, Tag, Timestamp,
};
use tokio_postgres::NoTls;

use crate::error::{classify, db_err, pool_err, Failure};
use crate::sql::Param;
use crate::tx::PgTx;

/// The PostgreSQL migrations, in order. Mirrors the SQLite backend's list number by number.
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "change_log",
        sql: include_str!("../migrations/0002_change_log.sql"),
    },
    Migration {
        version: 3,
        name: "sessions_work",
        sql: include_str!("../migrations/0003_sessions_work.sql"),
    },
    Migration {
        version: 4,
        name: "tags_by_name",
        sql: include_str!("../migrations/0004_tags_by_name.sql"),
    },
    Migration {
        version: 5,
        name: "world",
        sql: include_str!("../migrations/0005_world.sql"),
    },
    Migration {
        version: 6,
        name: "leases_content",
        sql: include_str!("../migrations/0006_leases_content.sql"),
    },
    Migration {
        version: 7,
        name: "world_kv_indexes",
        sql: include_str!("../migrations/0007_world_kv_indexes.sql"),
    },
    Migration {
        version: 8,
        name: "gc_runs",
        sql: include_str!("../migrations/0008_gc_runs.sql"),
    },
    Migration {
        version: 9,
        name: "world_prev_data",
        sql: include_str!("../migrations/0009_world_prev_data.sql"),
    },
    Migration {
        version: 10,
        name: "work_key_probes",
        sql: include_str!("../migrations/0010_work_key_probes.sql"),
    },
    Migration {
        version: 11,
        name: "history_prune_by_seq",
        sql: include_str!("../migrations/0011_history_prune_by_seq.sql"),
    },
    Migration {
        version: 12,
        name: "keys_led_by_id",
        sql: include_str!("../migrations/0012_keys_led_by_id.sql"),
    },
    Migration {
        version: 13,
        name: "process_controls",
        sql: include_str!("../migrations/0013_process_controls.sql"),
    },
    Migration {
        version: 14,
        name: "max_failures",
        sql: include_str!("../migrations/0014_max_failures.sql"),
    },
    Migration {
        version: 15,
        name: "lease_resource_count",
        sql: include_str!("../migrations/0015_lease_resource_count.sql"),
    },
];

/// Attempts of one transaction (batch, claim, sweep) or retried statement before
/// [`Error::RetriesExhausted`].
const COMMIT_ATTEMPTS_MAX: u32 = 30;

/// Most connections a store's pool may hold (PostgreSQL's own `max_connections` is usually far
/// below; the pool sizes its buffers from this up front: `usize::MAX` panicked).
pub const POOL_SIZE_MAX: usize = 10_000;

/// How long a transaction whose connection broke at `COMMIT` is looked up by its id before its
/// caller hears `Unavailable` ([`PostgresBackend::after_lost_commit`]): a restart of the server
/// usually ends within it.
const LOST_COMMIT_WAIT: Duration = Duration::from_secs(5);

/// Pause between two lookups of such a transaction.
const LOST_COMMIT_POLL: Duration = Duration::from_millis(50);
/// Passes a selector claim makes at most when candidates it locked were gone at its take
/// (claimed by others between its find's snapshot and its lock): each moves on to the next.
const CLAIM_PASSES_MAX: usize = 4;
/// First backoff between attempts; doubles per attempt up to [`BACKOFF_MAX`].
const BACKOFF_INITIAL: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_millis(100);
/// Connect timeout used when the URL does not set `connect_timeout`.
const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// TCP settings of every connection, unless the URL sets them: a server that vanished (a
/// failover, a host gone) is noticed in about a minute by an idle connection (keepalive probes
/// from 30 s, every 10 s, 3 unanswered) and in 30 s by one waiting for an answer (unacknowledged
/// data), instead of the operating system's defaults (2 h; ~15 min of retransmissions).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Apply [`KEEPALIVE_IDLE`] and its companions to `config` where the URL left the defaults.
fn dead_peer_detection(config: &mut tokio_postgres::Config) {
    if config.get_keepalives() && config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(KEEPALIVE_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVE_RETRIES);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
}
/// `idle_in_transaction_session_timeout` of every connection, unless the URL's `options` set it:
/// the server ends a session that sits this long inside a transaction without sending its next
/// statement, releasing its row locks. A FleetDB process stopped in the middle of one of its own
/// transactions (SIGSTOP, a debugger, a VM pause; its kernel still answers keepalives) otherwise
/// holds them for ever: claims skip the objects it locked after its session expired, sweeps
/// wait on them. FleetDB's transactions pipeline their statements; the longest pause between two
/// is a claim waiting its turn behind another claim's statements, milliseconds (a collector's
/// snapshot reader done before the other half idles until both end, but it has read everything
/// by then). 5 s is far above that and short against session TTLs (1 s to 1 h, default 10 s:
/// `fleetdb_core::work::SESSION_TTL_*`): with the default TTL a stopped holder's locks are gone
/// before its session expires. A session ended this way answers 25P03 (`Unavailable`, tried
/// again).
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Add [`IDLE_IN_TRANSACTION_TIMEOUT`] to the startup `options` of `config` unless they already
/// set `idle_in_transaction_session_timeout` (`-c name=value` or `--name=value`, either spelling).
fn idle_in_transaction_timeout(config: &mut tokio_postgres::Config) {
    let current = config.get_options().unwrap_or("");
    let normalized = current.replace('-', "_");
    if normalized.contains("idle_in_transaction_session_timeout") {
        return;
    }
    let ms = IDLE_IN_TRANSACTION_TIMEOUT.as_millis();
    let setting = format!("-c idle_in_transaction_session_timeout={ms}");
    let options = if current.trim().is_empty() {
        setting
    } else {
        format!("{current} {setting}")
    };
    config.options(&options);
}

/// Object listings with at most this many label requirements use a cached prepared statement
/// (the SQL shape depends on the requirements, so caching every shape could grow without bound).
const CACHED_LABEL_REQUIREMENTS_MAX: usize = 8;

/// What one retried SERIALIZABLE transaction applies.
enum Write<'a> {
    Batch(&'a Batch),
    Claim(&'a ClaimRequest),
    Sweep {
        now: Timestamp,
        limit: usize,
        /// Also release claims whose session is gone (`apply_orphans`).
        orphans: bool,
    },
    /// A verified upload's chunks copied to the blob and its metadata committed (see `content`).
    BlobCommit(&'a content::BlobCommit<'a>),
}

/// What a [`Write`] returns.
enum Written {
    Batch(Vec<OpResult>),
    /// The work, and the dead sessions' claims taken over.
    Claim(Vec<WorkInfo>, u64),
    Sweep(fleetdb_core::backend::Swept),
}

/// How [`PostgresBackend::open`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Apply pending migrations on open (otherwise leave the database as it is).
    pub migrate: bool,
    /// Most connections in the pool.
    pub pool_size_max: usize,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            migrate: true,
            pool_size_max: 16,
        }
    }
}

/// What the driver checks of a URL's hosts and ports before it connects, checked here so that a
/// URL it can never connect with is `Invalid` (its "invalid configuration" read as an outage:
/// `Unavailable`, the class a caller retries).
fn check_hosts(config: &tokio_postgres::Config, target: &str) -> Result<()> {
    let (hosts, addrs) = (config.get_hosts().len(), config.get_hostaddrs().len());
    if hosts == 0 && addrs == 0 {
        return Err(Error::invalid(
            "PostgreSQL URL",
            target,
            "names no host (postgres://user@HOST/db; this driver has no default host: for a \
             Unix socket give its folder, ?host=/var/run/postgresql)",
        ));
    }
    if hosts != 0 && addrs != 0 && hosts != addrs {
        return Err(Error::invalid(
            "PostgreSQL URL",
            target,
            format!("names {hosts} hosts but {addrs} hostaddrs: give one per host"),
        ));
    }
    let ports = config.get_ports().len();
    if ports > 1 && ports != hosts.max(addrs) {
        return Err(Error::invalid(
            "PostgreSQL URL",
            target,
            format!(
                "gives {ports} ports for {} hosts: one port for all, or one per host",
                hosts.max(addrs)
            ),
        ));
    }
    Ok(())
}

/// The PostgreSQL backend: a connection pool and a clock.
#[derive(Clone)]
pub struct PostgresBackend {
    pool: Pool,
    clock: Arc<dyn Clock>,
    /// The URL with any password redacted, for messages.
    target: String,
    /// Sweeps done, to refresh the planner statistics of the work tables every few of them.
    sweeps: Arc<std::sync::atomic::AtomicU64>,
    /// Attempts run again after a transient failure ([`Backend::retries`]).
    retries: Arc<std::sync::atomic::AtomicU64>,
    /// The pool's connection settings, for the dedicated `LISTEN` connection.
    config: Arc<tokio_postgres::Config>,
    /// The `NOTIFY` channel of this schema (see [`notify::channel_name`]).
    channel: Arc<str>,
    /// The last settled revision ([`settle`]): every revision up to it is in the change log, a gap
    /// marker, or compacted. Locked for a whole gap-filling pass.
    settled: Arc<tokio::sync::Mutex<i64>>,
    /// Dropped with the last clone of the backend, which ends the `LISTEN` tasks.
    alive: Arc<tokio::sync::watch::Sender<()>>,
    /// Where each selector claim scans from next ([`work::ClaimHands`]).
    hands: Arc<work::ClaimHands>,
    /// Lone key-value sets waiting for a connection, written in shared transactions ([`kv`]).
    kv: Arc<kv::KvCombiner>,
    /// Selector claims waiting for their (process, selector)'s claim in flight, sent in shared
    /// transactions ([`claims`]).
    claims: Arc<claims::ClaimCombiner>,
    /// Lone creates and tag sets waiting for a turn, written in shared transactions
    /// ([`combine`]).
    writes: Arc<combine::WriteCombiner>,
    /// What [`durability_warnings`] found at open ([`Backend::durability_warnings`]).
    durability: Arc<[String]>,
    /// The server's clock, when `clock` is it ([`PostgresBackend::open_on_server_clock`]):
    /// sampled at open and by [`Backend::clock_sync`].
    server_clock: Option<Arc<ServerClock>>,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PostgresBackend")
            .field("target", &self.target)
            .field("pool_size", &status.size)
            .field("pool_size_max", &status.max_size)
            .field("clock", &self.clock)
            .field("channel", &self.channel)
            .finish()
    }
}

/// The warnings of [`Backend::durability_warnings`] for the server settings `fsync`,
/// `full_page_writes` and `synchronous_commit` as this store's connections see them (a
/// connection option, a role's or a database's setting counts as much as the server's file).
/// `synchronous_commit = local` or a `remote_*` level is durable on this server; what a failover
/// to an asynchronous standby can lose is the replication set-up's (docs/operations.md).
fn durability_warnings([fsync, full_page_writes, synchronous_commit]: &[String; 3]) -> Vec<String> {
    let mut warnings = Vec::new();
    if fsync == "off" {
        warnings.push(
            "PostgreSQL runs with fsync = off: an operating-system crash or a power loss can lose \
             committed writes and corrupt the database"
                .to_string(),
        );
    }
    if full_page_writes == "off" {
        warnings.push(
            "PostgreSQL runs with full_page_writes = off: an operating-system crash can leave torn \
             pages and a corrupt database"
                .to_string(),
        );
    }
    if synchronous_commit == "off" {
        warnings.push(
            "PostgreSQL commits FleetDB's transactions with synchronous_commit = off: a server \
             crash can lose the last committed ones, so a claim a worker already acts on can \
             vanish and be granted again, and fencing tokens can repeat"
                .to_string(),
        );
    }
    warnings
}

/// Round trips to the server's clock at open ([`PostgresBackend::open_on_server_clock`]): the
/// shortest one gives the anchor (the first one may wait for a plan or a cold cache).
pub const CLOCK_SAMPLES_AT_OPEN: usize = 3;

/// One reading of the server's clock: one round trip of a prepared statement on `client` (the
/// statement is prepared before the round trip is timed). `clock_timestamp()`, not `now()`: the
/// time of the reading, not of the transaction's start.
async fn clock_sample(client: &deadpool_postgres::ClientWrapper) -> Result<ClockSample> {
    let statement = client
        .prepare_cached("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8")
        .await
        .map_err(db_err)?;
    let sent = ServerClock::monotonic_micros();
    let row = client.query_one(&statement, &[]).await.map_err(db_err)?;
    let received = ServerClock::monotonic_micros();
    Ok(ClockSample {
        sent,
        server: Timestamp(row.try_get(0).map_err(db_err)?),
        received,
    })
}

impl PostgresBackend {
    /// Connect to `url` (`postgres://…` or `postgresql://…`, in `tokio_postgres::Config` syntax,
    /// e.g. `?options=-c%20search_path%3Dmy_schema`), check the schema version before writing
    /// anything, and apply pending migrations if `options.migrate` is set.
    ///
    /// Fails with [`Error::SchemaTooNew`] (having written nothing) if the database has a migration
    /// this binary does not know, and with [`Error::Unavailable`] if the server cannot be reached.
    pub async fn open(url: &str, options: PostgresOptions, clock: Arc<dyn Clock>) -> Result<Self> {
        Self::open_inner(url, options, clock, None).await
    }

    /// [`PostgresBackend::open`] on the database server's clock: `clock` is sampled
    /// ([`CLOCK_SAMPLES_AT_OPEN`] round trips, the most precise kept) before anything is read or
    /// written, and again by every [`Backend::clock_sync`]. Every process of a fleet that opens
    /// its store this way compares deadlines on one clock, whatever its host's clock says.
    pub async fn open_on_server_clock(
        url: &str,
        options: PostgresOptions,
        clock: Arc<ServerClock>,
    ) -> Result<Self> {
        Self::open_inner(url, options, clock.clone(), Some(clock)).await
    }

    async fn open_inner(
        url: &str,
        options: PostgresOptions,
        clock: Arc<dyn Clock>,
        server_clock: Option<Arc<ServerClock>>,
    ) -> Result<Self> {
        let target = redact_url(url);
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Error::invalid(
                "PostgreSQL URL",
                &target,
                "must start with postgres:// or postgresql://",
            ));
        }
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
            // The driver's message is only "invalid connection string"; its source names the
            // option or value at fault.
            let rule = match std::error::Error::source(&e) {
                Some(cause) => format!(
                    "{e}: {cause} (FleetDB's own settings, such as the pool size, go in \
                     OpenOptions, not in the URL)"
                ),
                None => e.to_string(),
            };
            Error::invalid("PostgreSQL URL", &target, rule)
        })?;
        check_hosts(&config, &target)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT_DEFAULT);
        }
        dead_peer_detection(&mut config);
        idle_in_transaction_timeout(&mut config);
        if !(1..=POOL_SIZE_MAX).contains(&options.pool_size_max) {
            return Err(Error::invalid(
                "pool size",
                options.pool_size_max.to_string(),
                format!("must be between 1 and {POOL_SIZE_MAX} connections"),
            ));
        }
        let listen_config = Arc::new(config.clone());
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // Last in, first out: the connections used last are reused first, so under a steady load
        // the same few server processes stay busy with warm caches (their prepared statements'
        // plans, catalog caches, CPU caches) and the rest idle; first in, first out rotated every
        // transaction through all of them (one-at-a-time benchmark flat out, interleaved: 1,459 / 1,559
        // completed/s first in, first out; 1,592 / 1,661 last in, first out).
        let pool = Pool::builder(manager)
            .max_size(options.pool_size_max)
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Backend(format!("building the connection pool: {e}")))?;
        let backend = PostgresBackend {
            pool,
            clock,
            target,
            sweeps: Arc::default(),
            retries: Arc::default(),
            config: listen_config,
            channel: Arc::from(""),
            settled: Arc::default(),
            alive: Arc::new(tokio::sync::watch::channel(()).0),
            hands: Arc::default(),
            kv: Arc::default(),
            claims: Arc::default(),
            writes: Arc::default(),
            durability: Arc::new([]),
            server_clock,
        };
        let client = backend.client().await.map_err(|e| match e {
            Error::Unavailable(msg) => {
                Error::Unavailable(format!("PostgreSQL at {}: {msg}", backend.target))
            }
            other => other,
        })?;
        // Before anything is stamped (migrations write times): on the server's clock.
        if let Some(server_clock) = &backend.server_clock {
            for _ in 0..CLOCK_SAMPLES_AT_OPEN {
                server_clock.offer(clock_sample(&client).await?);
            }
        }
        let (status, schema_table) = migrate::read_status(&client, MIGRATIONS).await?;
        if !schema_table {
            migrate::check_owned(&client).await?;
        }
        migrate::check_not_too_new(&status)?;
        if options.migrate && !status.pending.is_empty() {
            migrate::run(&client, MIGRATIONS, backend.clock.as_ref()).await?;
        }
        let row = client
            .query_one(
                "SELECT current_schema(), current_setting('fsync'), \
                   current_setting('full_page_writes'), current_setting('synchronous_commit')",
                &[],
            )
            .await
            .map_err(db_err)?;
        let schema: Option<String> = row.try_get(0).map_err(db_err)?;
        let settings: [String; 3] = [
            row.try_get(1).map_err(db_err)?,
            row.try_get(2).map_err(db_err)?,
            row.try_get(3).map_err(db_err)?,
        ];
        drop(client);
        let durability: Arc<[String]> = durability_warnings(&settings).into();
        for w in durability.iter() {
            tracing::warn!(target = %backend.target, "{w}");
        }
        Ok(PostgresBackend {
            channel: Arc::from(notify::channel_name(schema.as_deref().unwrap_or("public"))),
            durability,
            ..backend
        })
    }

    async fn client(&self) -> Result<PooledClient> {
        self.pool.get().await.map_err(pool_err)
    }

    /// The server's clock this backend runs on, if it does
    /// ([`PostgresBackend::open_on_server_clock`]).
    pub fn server_clock(&self) -> Option<&Arc<ServerClock>> {
        self.server_clock.as_ref()
    }

    /// Count one attempt run again after a transient failure.
    pub(crate) fn note_retry(&self) {
        self.retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Apply `write` in one SERIALIZABLE transaction, retrying transient failures.
    async fn transact(&self, write: Write<'_>) -> Result<Written> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.transact_once(&write).await {
                Ok(results) => return Ok(results),
                Err(Failure::Fail(err)) => return Err(err),
                Err(Failure::Retry(msg)) => {
                    if attempt >= COMMIT_ATTEMPTS_MAX {
                        return Err(Error::RetriesExhausted {
                            attempts: attempt,
                            last: msg,
                        });
                    }
                    self.note_retry();
                    let pause = backoff(attempt);
                    tracing::debug!(attempt, ?pause, reason = %msg, "retrying PostgreSQL transaction");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// One attempt: a transaction on one connection.
    async fn transact_once(&self, write: &Write<'_>) -> std::result::Result<Written, Failure> {
        let client = self.client().await.map_err(Failure::Fail)?;
        let mut guard = TxGuard {
            client: Some(client),
            open: true,
        };
        let conn: &deadpool_postgres::ClientWrapper = guard.client();
        let mut rows = transaction_for(write, conn);
        let applied = match write {
            Write::Batch(batch) => apply_batch(&mut rows, batch).await.map(Written::Batch),
            Write::Claim(req) => apply_claim(&mut rows, req)
                .await
                .map(|(work, expired)| Written::Claim(work, expired)),
            Write::Sweep {
                now,
                limit,
                orphans,
            } => match apply_sweep(&mut rows, *now, *limit).await {
                Ok(mut swept) if *orphans => {
                    apply_orphans(&mut rows, *now, *limit).await.map(|o| {
                        if !o.is_empty() {
                            tracing::warn!(
                                released = o.len(),
                                "released claims whose session was gone"
                            );
                        }
                        swept.expired.extend(o);
                        Written::Sweep(swept)
                    })
                }
                other => other.map(Written::Sweep),
            },
            Write::BlobCommit(c) => content::commit_in_tx(&mut rows, c)
                .await
                .map(Written::Batch),
        };
        let outcome = match applied {
            Ok(results) if !rows.begun => Ok(results),
            Ok(results) => match rows.commit().await {
                Ok(()) => Ok(results),
                // A failed COMMIT has ended the transaction (or lost the connection, which the
                // pool's recycling check discards). A deferred write that failed before COMMIT
                // was sent leaves it open: roll it back.
                Err(failure) => {
                    if conn.batch_execute("ROLLBACK").await.is_err() {
                        // Leave `open` set: the connection is dropped rather than reused. The
                        // connection broke: COMMIT may have been carried out, and the
                        // transaction's id says whether it was.
                        return match (failure, rows.xid.take()) {
                            (Failure::Fail(Error::Unavailable(msg)), Some(xid)) => {
                                drop(rows);
                                drop(guard);
                                self.after_lost_commit(&xid, results, msg).await
                            }
                            (failure, _) => Err(failure),
                        };
                    }
                    Err(failure)
                }
            },
            Err(err) => {
                let (begun, transient) = (rows.begun, rows.transient.take());
                if begun && conn.batch_execute("ROLLBACK").await.is_err() {
                    // Leave `open` set: the connection is dropped rather than reused.
                    return Err(transient.map_or(Failure::Fail(err), Failure::Retry));
                }
                Err(transient.map_or(Failure::Fail(err), Failure::Retry))
            }
        };
        guard.open = false;
        outcome
    }

    /// A transaction whose connection broke at `COMMIT` (the answer lost; `COMMIT` sent, or a
    /// write before it): its id (`xid`) says what became of it. Committed: its results stand, and
    /// the caller hears so instead of `Unavailable` (a read-modify-write retried after a lost
    /// answer would apply twice). Rolled back: nothing of it was kept, so it runs again (a
    /// transient failure). Not known within [`LOST_COMMIT_WAIT`] (the server unreachable, or the
    /// transaction still open on a half-open connection): `Unavailable`, as without the id.
    async fn after_lost_commit(
        &self,
        xid: &str,
        written: Written,
        msg: String,
    ) -> std::result::Result<Written, Failure> {
        match self.lost_commit_status(xid).await {
            Some(true) => {
                tracing::info!(xid, error = %msg, "the connection broke at COMMIT; the transaction committed");
                Ok(written)
            }
            Some(false) => Err(Failure::Retry(format!(
                "the connection broke at COMMIT and the transaction was rolled back: {msg}"
            ))),
            None => Err(Failure::Fail(Error::Unavailable(msg))),
        }
    }

    /// `Some(committed)` once `pg_xact_status` of `xid` is final, asked on other connections
    /// every [`LOST_COMMIT_POLL`] (`in progress` until the server has finished the COMMIT, or
    /// noticed the broken connection and rolled back); `None` after [`LOST_COMMIT_WAIT`].
    async fn lost_commit_status(&self, xid: &str) -> Option<bool> {
        let give_up = std::time::Instant::now() + LOST_COMMIT_WAIT;
        loop {
            let left = give_up.saturating_duration_since(std::time::Instant::now());
            let params: [sql::Param<'_>; 1] = [&xid];
            let ask = self.query_retrying(sql::XACT_STATUS, &params);
            let status: Option<String> =
                match tokio::time::timeout(left.max(LOST_COMMIT_POLL), ask).await {
                    Ok(Ok(rows)) => rows.first().and_then(|r| r.try_get(0).ok()).flatten(),
                    _ => None,
                };
            match status.as_deref() {
                Some("committed") => return Some(true),
                Some("aborted") => return Some(false),
                // In progress, or the server not reachable yet (a stale pooled connection, a
                // restart): ask again.
                _ => {}
            }
            if std::time::Instant::now() >= give_up {
                return None;
            }
            tokio::time::sleep(LOST_COMMIT_POLL).await;
        }
    }

    /// One statement in its own transaction (`begin` opens it: SERIALIZABLE unless a caller has
    /// reason otherwise; then the `settings` statement, if any, prepared like the statement), in
    /// ONE round trip (`BEGIN`, the settings, the statement and `COMMIT` pipelined), retried on
    /// serialization failures.
    async fn one_statement(
        &self,
        begin: &str,
        settings: Option<&str>,
        sql_text: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Given up before its answers came (a caller's timeout while the statement waits for
            // a row lock), the connection must not go back to the pool: still busy with the
            // statement, it would hold up whoever is handed it next (the pool is last in, first
            // out: the very next call) until the lock is let go. The guard detaches it instead.
            let mut guard = TxGuard {
                client: Some(self.client().await?),
                open: true,
            };
            let client = guard.client();
            let prepared = async {
                let stmt = client.prepare_cached(sql_text).await?;
                let settings = match settings {
                    Some(text) => Some(client.prepare_cached(text).await?),
                    None => None,
                };
                Ok((stmt, settings))
            };
            let prepared = prepared.await;
            let (stmt, settings) = match prepared {
                Ok(prepared) => prepared,
                Err(e) => {
                    // A failed prepare ran nothing: the connection is as it was.
                    guard.open = false;
                    drop(guard);
                    match prepare_failed(&e) {
                        Failure::Fail(err) => return Err(err),
                        Failure::Retry(msg) => {
                            self.pause_before_retry(attempt, msg).await?;
                            continue;
                        }
                    }
                }
            };
            let set = async {
                match &settings {
                    Some(s) => client.query(s, &[]).await.map(|_| ()),
                    None => Ok(()),
                }
            };
            let (begin, set, rows, commit) = futures::future::join4(
                client.batch_execute(begin),
                set,
                client.query(&stmt, params),
                client.batch_execute("COMMIT"),
            )
            .await;
            // The first failure tells what happened (a failed statement turns COMMIT into a
            // rollback; the server ending the session before COMMIT's answer kept nothing).
            let outcome = match (begin.and(set), rows, commit) {
                (Err(e), _, _) | (Ok(()), Err(e), _) => {
                    Err(crate::error::ended_before_commit(&e).unwrap_or_else(|| classify(&e)))
                }
                (Ok(()), Ok(_), Err(e)) => Err(classify(&e)),
                (Ok(()), Ok(rows), Ok(())) => Ok(rows),
            };
            // Answered (COMMIT's answer came, or an error ended the transaction): reusable.
            guard.open = false;
            drop(guard);
            match outcome {
                Ok(rows) => return Ok(rows),
                Err(Failure::Fail(err)) => return Err(err),
                Err(Failure::Retry(msg)) => self.pause_before_retry(attempt, msg).await?,
            }
        }
    }

    /// Before attempt `attempt + 1` of a statement after a transient failure (`msg`): counted and
    /// paused ([`backoff`]); `RetriesExhausted` after [`COMMIT_ATTEMPTS_MAX`] attempts.
    async fn pause_before_retry(&self, attempt: u32, msg: String) -> Result<()> {
        if attempt >= COMMIT_ATTEMPTS_MAX {
            return Err(Error::RetriesExhausted {
                attempts: attempt,
                last: msg,
            });
        }
        self.note_retry();
        tokio::time::sleep(backoff(attempt)).await;
        Ok(())
    }

    /// The hot path of a lone tag set, in ONE round trip: `BEGIN`, one statement and `COMMIT`
    /// are pipelined. The statement makes the same decisions as `apply_batch` does for a
    /// `TagSet` (object must exist, identical value is a no-op, otherwise one revision, one
    /// change-log row, the upsert); the conformance suite holds both to the same behaviour.
    async fn tag_set_fused(
        &self,
        key: &fleetdb_core::ObjectKey,
        name: &str,
        value: &str,
        now: fleetdb_core::Timestamp,
    ) -> Result<Vec<OpResult>> {
        const SQL: &str = "WITH obj AS (SELECT 1 FROM objects WHERE namespace = $1 AND kind = $2 AND id = $3),
             old AS (SELECT value, updated_at, revision FROM tags
                     WHERE namespace = $1 AND kind = $2 AND id = $3 AND name = $4 FOR UPDATE),
             chg AS (INSERT INTO changes (revision, namespace, kind, id, entity, name, op, old_value, new_value, at)
                     SELECT nextval('fleetdb_revision'), $1, $2, $3, 'tag', $4, 'put', (SELECT value FROM old), $5, $6
                     WHERE EXISTS (SELECT 1 FROM obj) AND NOT EXISTS (SELECT 1 FROM old WHERE value = $5)
                     RETURNING revision),
             up AS (INSERT INTO tags (namespace, kind, id, name, value, updated_at, revision)
                    SELECT $1, $2, $3, $4, $5, $6, revision FROM chg
                    ON CONFLICT (namespace, kind, id, name) DO UPDATE
                      SET value = excluded.value, updated_at = excluded.updated_at, revision = excluded.revision
                    RETURNING revision)
             SELECT EXISTS (SELECT 1 FROM obj), (SELECT value FROM old), (SELECT updated_at FROM old),
                    (SELECT revision FROM old), (SELECT revision FROM up)";
        let params: [Param<'_>; 6] = [&key.namespace, &key.kind, &key.id, &name, &value, &now.0];
        let rows = self.one_statement(sql::BEGIN, None, SQL, &params).await?;
        {
            let row = rows
                .first()
                .ok_or_else(|| Error::Backend("the tag set statement returned no row".into()))?;
            let exists: bool = row.try_get(0).map_err(db_err)?;
            if !exists {
                return Err(Error::not_found(format!("object {key}")));
            }
            let new_rev: Option<i64> = row.try_get(4).map_err(db_err)?;
            let (tag, changed) = match new_rev {
                Some(rev) => (
                    fleetdb_core::Tag {
                        object: key.clone(),
                        name: name.to_string(),
                        value: sql::parse_value(value)?,
                        updated_at: now,
                        revision: fleetdb_core::Revision(rev),
                    },
                    true,
                ),
                None => {
                    let text: String = row.try_get(1).map_err(db_err)?;
                    (
                        fleetdb_core::Tag {
                            object: key.clone(),
                            name: name.to_string(),
                            value: sql::parse_value(&text)?,
                            updated_at: fleetdb_core::Timestamp(row.try_get(2).map_err(db_err)?),
                            revision: fleetdb_core::Revision(row.try_get(3).map_err(db_err)?),
                        },
                        false,
                    )
                }
            };
            Ok(vec![OpResult {
                changed,
                applied: fleetdb_core::Applied::Tag(tag),
            }])
        }
    }

    /// A batch, on its own: the one- or two-statement path of its shape, else the general path.
    pub(crate) async fn commit_unshared(&self, batch: &Batch) -> Result<Vec<OpResult>> {
        if let ([], [fleetdb_core::Op::TagSet { key, name, value }]) =
            (batch.preconditions.as_slice(), batch.ops.as_slice())
        {
            return self.tag_set_fused(key, name, value, batch.now).await;
        }
        if let Some(results) = self.object_create_fused(batch).await? {
            return Ok(results);
        }
        if let Some(results) = self.tag_sets_fused(batch).await? {
            return Ok(results);
        }
        if let Some(results) = self.objects_upsert_fused(batch).await? {
            return Ok(results);
        }
        if let Some(results) = self.objects_delete_fused(batch).await? {
            return Ok(results);
        }
        if let Some(results) = self.finish_fused(batch).await? {
            return Ok(results);
        }
        if let (
            [],
            [fleetdb_core::Op::KvSet {
                key,
                value,
                expect: None,
                lifetime,
            }],
        ) = (batch.preconditions.as_slice(), batch.ops.as_slice())
        {
            if lifetime.session_id.is_none() && lifetime.ttl_ms.is_none() {
                if let Some(r) = self.kv_set_fused(key, value, batch.now).await? {
                    return Ok(r);
                }
            }
        }
        match self.transact(Write::Batch(batch)).await? {
            Written::Batch(results) => Ok(results),
            _ => Err(Error::Backend(
                "a batch returned something else".to_string(),
            )),
        }
    }

    /// The hot path of "create these objects with these tags" ([`fused`]): `None` when the
    /// batch has another shape or an object exists (the general path then decides: merge the
    /// labels, or `AlreadyExists`), or when an input is one the general path must reject.
    async fn object_create_fused(&self, batch: &Batch) -> Result<Option<Vec<OpResult>>> {
        let Some(objects) = fused::new_objects(batch) else {
            return Ok(None);
        };
        if objects.len() > 1 {
            return self.objects_create_many(objects, batch.now).await;
        }
        let object = &objects[0];
        let key = object.key;
        let p = fused::one_params(object, batch.now);
        let params: [Param<'_>; 7] = [
            &key.namespace,
            &key.kind,
            &key.id,
            &p.labels,
            &p.now,
            &p.change,
            &p.tags,
        ];
        // One round trip: a new object writes nothing it would have to take back.
        let rows = self
            .one_statement(sql::BEGIN, None, fused::ONE, &params)
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| Error::Backend("the object statement returned no row".into()))?;
        let ns_exists: bool = row.try_get(0).map_err(db_err)?;
        if !ns_exists {
            return Err(Error::not_found(format!("namespace {:?}", key.namespace)));
        }
        let Some(revision) = row.try_get::<_, Option<i64>>(1).map_err(db_err)? else {
            return Ok(None); // it exists
        };
        let tag_revisions: std::collections::HashMap<String, i64> =
            match row.try_get::<_, Option<String>>(2).map_err(db_err)? {
                Some(text) => serde_json::from_str(&text)
                    .map_err(|e| Error::Backend(format!("tag revisions of a new object: {e}")))?,
                None => std::collections::HashMap::new(),
            };
        let names: Vec<String> = object.tags.iter().map(|t| t.0.to_string()).collect();
        fused::results(objects, batch.now, |n| match n {
            0 => Some(revision),
            n => tag_revisions.get(names.get(n - 1)?).copied(),
        })
        .map(Some)
    }

    /// [`fused::MANY`] in a SERIALIZABLE transaction of two round trips (`BEGIN` and the
    /// statement, then `COMMIT`; [`Self::read_decide_write`]), rolled back instead when an object
    /// existed or a namespace is missing (`None`: the general path decides and names it).
    async fn objects_create_many(
        &self,
        objects: Vec<fused::NewObject<'_>>,
        now: Timestamp,
    ) -> Result<Option<Vec<OpResult>>> {
        let (objects_json, tags_json) = fused::many_params(&objects);
        let params: [Param<'_>; 3] = [&objects_json, &tags_json, &now.0];
        let expected = objects.len();
        let Some(revisions) = self
            .read_decide_write(fused::MANY, &params, |rows| {
                let row = rows.first().ok_or_else(|| {
                    Error::Backend("the objects statement returned no row".into())
                })?;
                let namespaces: bool = row.try_get(0).map_err(db_err)?;
                let inserted: i64 = row.try_get(1).map_err(db_err)?;
                if !namespaces || usize::try_from(inserted).ok() != Some(expected) {
                    return Ok(Decided::Rollback);
                }
                fused::many_revisions(row.try_get(2).map_err(db_err)?).map(Decided::Commit)
            })
            .await?
        else {
            return Ok(None);
        };
        fused::results(objects, now, |n| revisions.get(&n).copied()).map(Some)
    }

    /// Many object puts (any mode, objects that may exist) with tag sets of them: read what they
    /// touch in ONE statement, decide every op in Rust as `apply_batch` would
    /// ([`fused::upsert_decide`]), write every change in ONE statement pipelined with `COMMIT`;
    /// SERIALIZABLE, so the decisions hold. `None` when the batch has another shape, fewer than
    /// two objects (the general path is as quick), or an op would fail (rolled back; the general
    /// path names the failure).
    async fn objects_upsert_fused(&self, batch: &Batch) -> Result<Option<Vec<OpResult>>> {
        let Some(objects) = fused::objects(batch).filter(|o| o.len() > 1) else {
            return Ok(None);
        };
        let read = fused::upsert_read_param(&objects);
        let now = batch.now;
        self.read_decide_write(fused::UPSERT_READ, &[&read], |rows| {
            let mut found = std::collections::HashMap::with_capacity(rows.len());
            for row in rows {
                let n: i64 = row.try_get(0).map_err(db_err)?;
                let f: fused::Found = (
                    row.try_get(1).map_err(db_err)?,
                    row.try_get(2).map_err(db_err)?,
                    row.try_get(3).map_err(db_err)?,
                    row.try_get(4).map_err(db_err)?,
                    row.try_get(5).map_err(db_err)?,
                );
                found.insert(usize::try_from(n).unwrap_or(usize::MAX), f);
            }
            let Some(up) = fused::upsert_decide(&objects, &found, now)? else {
                return Ok(Decided::Rollback);
            };
            if up.is_noop() {
                return up.results(&Default::default()).map(Decided::Commit);
            }
            let params: Vec<tx::Owned> = vec![
                Box::new(up.objects.clone()),
                Box::new(up.tags.clone()),
                Box::new(now.0),
            ];
            Ok(Decided::Write(
                fused::UPSERT_WRITE,
                params,
                Box::new(move |revisions| up.results(&revisions)),
            ))
        })
        .await
    }

    /// Many object deletes: read every object and its tags in ONE statement, write every change
    /// row and delete in ONE statement pipelined with `COMMIT` (each object's tags, then the
    /// object, in op order, as the general path does). `None` when the batch has another shape
    /// or an object is missing (rolled back; the general path names it).
    async fn objects_delete_fused(&self, batch: &Batch) -> Result<Option<Vec<OpResult>>> {
        let Some(deletes) = fused::deletes(batch) else {
            return Ok(None);
        };
        let read = fused::delete_read_param(&deletes);
        let now = batch.now;
        self.read_decide_write(fused::DELETE_READ, &[&read], |rows| {
            let rows = rows
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get(0).map_err(db_err)?,
                        r.try_get(1).map_err(db_err)?,
                        r.try_get(2).map_err(db_err)?,
                        r.try_get(3).map_err(db_err)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let Some(changes) = fused::delete_write_param(&deletes, &rows)? else {
                return Ok(Decided::Rollback);
            };
            let ns: Vec<usize> = deletes.iter().map(|(n, _)| *n).collect();
            Ok(Decided::Write(
                fused::DELETE_WRITE,
                vec![Box::new(changes), Box::new(now.0)],
                Box::new(move |revisions| {
                    ns.iter()
                        .map(|n| {
                            let rev = revisions.get(n).copied().ok_or_else(|| {
                                Error::Backend(format!("no revision for delete {n}"))
                            })?;
                            Ok(OpResult {
                                changed: true,
                                applied: fleetdb_core::Applied::Deleted {
                                    revision: Revision(rev),
                                },
                            })
                        })
                        .collect()
                }),
            ))
        })
        .await
    }

    /// A SERIALIZABLE transaction of at most two round trips, retried on serialization
    /// failures: `BEGIN` (sequential scans off: every row is reached by key) pipelined with
    /// `read`; `decide` looks at its rows and says to roll back (`None`: the general path then
    /// runs the batch and names what failed), to commit as is (what `read` wrote, if anything),
    /// or to run a write, pipelined with `COMMIT`, whose one column is the revisions by op index
    /// (`[[n, revision], …]`) handed to the answer.
    async fn read_decide_write<T>(
        &self,
        read: &'static str,
        read_params: &[Param<'_>],
        decide: impl Fn(&[tokio_postgres::Row]) -> Result<Decided<T>>,
    ) -> Result<Option<T>> {
        retrying(&self.retries, || async {
            let client = self.client().await.map_err(Failure::Fail)?;
            let mut guard = TxGuard {
                client: Some(client),
                open: true,
            };
            let conn: &deadpool_postgres::ClientWrapper = guard.client();
            let fail = |e: tokio_postgres::Error| classify(&e);
            let read_stmt = conn.prepare_cached(read).await.map_err(fail)?;
            let settings = conn
                .prepare_cached(sql::SWEEP_PLANNED)
                .await
                .map_err(fail)?;
            let (begin, set, rows) = futures::future::join3(
                conn.batch_execute(sql::BEGIN),
                conn.query(&settings, &[]),
                conn.query(&read_stmt, read_params),
            )
            .await;
            let decided = begin
                .and(set.map(|_| ()))
                .and(rows)
                .map_err(fail)
                .and_then(|rows| decide(&rows).map_err(Failure::Fail));
            let (write, params, answer) = match decided {
                Ok(Decided::Write(write, params, answer)) => (write, params, answer),
                Ok(Decided::Commit(out)) => {
                    // A COMMIT that fails has rolled back: the transaction is over either way.
                    let committed = conn.batch_execute("COMMIT").await;
                    guard.open = false;
                    return committed.map(|()| Some(out)).map_err(fail);
                }
                rolled_back => {
                    // An op would fail, or an error. A failed ROLLBACK leaves `open` set, so
                    // the connection is dropped rather than reused.
                    if conn.batch_execute("ROLLBACK").await.is_ok() {
                        guard.open = false;
                    }
                    return rolled_back.map(|_| None);
                }
            };
            let write_stmt = conn.prepare_cached(write).await.map_err(fail)?;
            let params: Vec<Param<'_>> = params.iter().map(|p| p.as_ref() as Param<'_>).collect();
            let (rows, commit) = futures::future::join(
                conn.query(&write_stmt, &params),
                conn.batch_execute("COMMIT"),
            )
            .await;
            // COMMIT after a failed statement rolls back; either way the transaction is over.
            guard.open = false;
            let rows = rows.map_err(fail)?;
            commit.map_err(fail)?;
            let text: Option<String> = rows
                .first()
                .ok_or_else(|| {
                    Failure::Fail(Error::Backend("a bulk write returned no row".into()))
                })?
                .try_get(0)
                .map_err(|e| Failure::Fail(db_err(e)))?;
            let revisions = fused::many_revisions(text).map_err(Failure::Fail)?;
            answer(revisions).map(Some).map_err(Failure::Fail)
        })
        .await
    }

    /// Tag sets of existing objects in bulk ([`fused::TAG_SETS`]): ONE statement, one round
    /// trip. `None` when the batch has another shape or an object is missing (nothing was
    /// written; the general path names it).
    async fn tag_sets_fused(&self, batch: &Batch) -> Result<Option<Vec<OpResult>>> {
        let Some(sets) = fused::tag_sets(batch) else {
            return Ok(None);
        };
        let param = fused::tag_sets_param(&sets);
        let params: [Param<'_>; 2] = [&param, &batch.now.0];
        let rows = self
            .one_statement(
                sql::BEGIN,
                Some(sql::SWEEP_PLANNED),
                fused::TAG_SETS,
                &params,
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| Error::Backend("the tag sets statement returned no row".into()))?;
        fused::tag_sets_results(
            sets,
            batch.now,
            row.try_get(0).map_err(db_err)?,
            row.try_get(1).map_err(db_err)?,
            row.try_get(2).map_err(db_err)?,
        )
    }

    /// The hot path of a worker's finish (or cancel): see [`finish::FusedFinish`]. ONE
    /// statement in a READ COMMITTED transaction, one round trip. `None` when the batch has
    /// another shape or a check fails: the general path then runs and names the failure exactly.
    async fn finish_fused(&self, batch: &Batch) -> Result<Option<Vec<OpResult>>> {
        let Some(finish) = finish::FusedFinish::new(batch) else {
            return Ok(None);
        };
        let params = finish::FinishParams::new(&[&finish]);
        let rows = self
            .one_statement(
                sql::BEGIN_READ_COMMITTED,
                Some(sql::CLAIM_PLANNED),
                finish::SQL,
                &params.params(),
            )
            .await?;
        finish.results(&finish::FinishRow::decode(&rows)?, 0)
    }

    /// [`Backend::history_prune`] in statements of at most `batch` rows, each its own
    /// transaction.
    pub(crate) async fn history_prune_in(&self, before: Timestamp, batch: usize) -> Result<u64> {
        fleetdb_core::work::delete_in_batches(
            fleetdb_core::work::HISTORY_PRUNE_FIRST,
            batch,
            |batch| async move {
                let limit = i64::try_from(batch).unwrap_or(i64::MAX);
                let rows = self
                    .query_retrying(work::HISTORY_PRUNE, &[&before.0, &limit])
                    .await?;
                count_of(&rows, "a history prune")
            },
        )
        .await
    }

    /// A selector claim alone, in ONE round trip ([`claims::ClaimTxn`]): `BEGIN` (READ
    /// COMMITTED), find-and-lock ([`work::claim_lock_sql`]), check-and-take
    /// ([`work::claim_take_sql`]), `COMMIT`. It makes the decisions of `apply_claim` (the
    /// conformance suite holds both to the same behaviour), retrying transient failures.
    ///
    /// With `finish` (a worker's "finish this, give me the next"), the finish statement runs first
    /// in the same transaction and round trip. Returns the finish's results, or `None` when one of
    /// its checks failed (then nothing was written: the take skips a claim whose finish failed,
    /// and the caller runs the general path, which names the failure). Once the finish has
    /// passed, a claim that cannot proceed (expired session, undeclared process, nothing to
    /// claim) commits the finish and yields no work.
    async fn claim_selector_alone(
        &self,
        req: &ClaimRequest,
        selector: Selector,
        finish: Option<&finish::FusedFinish>,
        combiner_turn: &mut Option<claims::Turn>,
    ) -> Result<claims::ClaimAnswer> {
        let mut q = fleetdb_core::backend::CandidateQuery {
            selector,
            process: req.process.clone(),
            exclude: Vec::new(),
            now: req.now,
            limit: req.limit,
        };
        // What earlier passes got: the finish's results and work.
        let mut finish = finish;
        let mut finished: Option<Vec<OpResult>> = None;
        let mut got: Vec<WorkInfo> = Vec::new();
        let mut expired = 0;
        let mut passes = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The first attempt writes new claim rows only; a failed one (a dead session's claim
            // row in the way fails the insert on `work_pkey`) retries at once, taking such rows
            // over, and later ones back off.
            let take = match attempt {
                1 => work::Take::Lean,
                _ => work::Take::Takeover,
            };
            match self
                .claim_selector_once(req, &q, finish, combiner_turn, take)
                .await
            {
                Ok(((fin, claimed), gone)) => {
                    finished = finished.or(fin);
                    let n = claimed.work.len();
                    got.extend(claimed.work);
                    expired += claimed.expired;
                    passes += 1;
                    // Candidates it locked were claimed by others, or stopped matching, between
                    // its find's snapshot and its lock (its take saw them gone): the claim moves
                    // on to the next candidates, without the finish, which has committed.
                    if gone == 0 || n >= q.limit || passes >= CLAIM_PASSES_MAX {
                        let claimed = Claimed::short_of(req.limit, got, claimed.revision)
                            .with_expired(expired);
                        return Ok((finished, claimed));
                    }
                    finish = None;
                    q.limit -= n;
                    attempt = 0;
                }
                Err(Failure::Retry(msg)) if attempt < COMMIT_ATTEMPTS_MAX => {
                    // A lean attempt stopped by a claim row in the way (`work_pkey`: a dead
                    // session's, taken over next) is how a takeover starts, not contention.
                    if take == work::Take::Takeover || !msg.contains("work_pkey") {
                        self.note_retry();
                    }
                    if take == work::Take::Takeover {
                        tokio::time::sleep(backoff(attempt - 1)).await;
                    }
                }
                // A later pass that fails answers what the earlier ones committed (the finish,
                // work now held): the claim is short, not failed.
                Err(_) if passes > 0 => {
                    let claimed = Claimed::short_of(req.limit, got, None).with_expired(expired);
                    return Ok((finished, claimed));
                }
                Err(Failure::Fail(err)) => return Err(err),
                Err(Failure::Retry(msg)) => {
                    return Err(Error::RetriesExhausted {
                        attempts: attempt,
                        last: msg,
                    });
                }
            }
        }
    }

    async fn claim_selector_once(
        &self,
        req: &ClaimRequest,
        q: &fleetdb_core::backend::CandidateQuery,
        finish: Option<&finish::FusedFinish>,
        combiner_turn: &mut Option<claims::Turn>,
        take: work::Take,
    ) -> std::result::Result<(claims::ClaimAnswer, usize), Failure> {
        let (lock_sql, mut lock_params) = work::claim_lock_sql(
            q,
            std::slice::from_ref(&req.session_id),
            &work::hand_start(),
        );
        let clock_hand = self.hands.hand(&req.process, &lock_sql);
        // Whether the last claim found the process limited: its row is locked first and the
        // take counts the room (see `Hand::limited`).
        let limited = clock_hand.limited();
        // A claim of many candidates holds its hand's turn until the hand has moved past its
        // candidates (see `Hand::TURN_MIN`). It takes the turn with its connection in hand and,
        // behind a finish, once the finish has answered (`Hooks::gate`): finishes of many
        // candidates must not queue for it, and the turn's holder must never wait for a
        // connection that a claim queued for the turn holds.
        let wants_turn = q.limit >= work::Hand::TURN_MIN;
        let turn = std::sync::Mutex::new(None);
        // A claim of many reads the hand once it holds the turn (`gate`); reading it here too
        // would note a sweep that its find then does not make.
        let hand = std::sync::Mutex::new(match wants_turn {
            true => work::hand_start(),
            false => clock_hand.get(q.now),
        });
        let hand_now = || hand.lock().unwrap_or_else(|p| p.into_inner()).clone();
        lock_params.set_hand(&hand_now());
        let slots = [work::Slot {
            r: 0,
            sid: req.session_id.clone(),
            f: finish.map(|_| 0),
            n: q.limit,
            at: req.now,
        }];
        let finish_params = finish.map(|f| finish::FinishParams::new(&[f]));
        // A claim of many candidates moves the hand past the ones it locked and lets the next
        // one find its own as soon as find-and-lock's answer is in; a small one moves it by
        // what it took. The combiner's turn passes on once the work is written.
        let hooks = claims::Hooks {
            locked: wants_turn.then(|| -> claims::LockedHook<'_> {
                let (clock_hand, turn, hand_now) = (&clock_hand, &turn, &hand_now);
                Box::new(move |locked| {
                    if let Some(locked) = locked {
                        clock_hand.advance(&hand_now(), locked, q.now);
                    }
                    drop(turn.lock().unwrap_or_else(|p| p.into_inner()).take());
                })
            }),
            taken: combiner_turn
                .take()
                .map(|t| -> Box<dyn FnOnce() + Send> { Box::new(move || drop(t)) }),
            gate: wants_turn.then(|| -> claims::Gate<'_> {
                let (clock_hand, turn, hand) = (&clock_hand, &turn, &hand);
                Box::pin(async move {
                    let guard = clock_hand.turn.lock().await;
                    *turn.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
                    let from = clock_hand.get(q.now);
                    *hand.lock().unwrap_or_else(|p| p.into_inner()) = from.clone();
                    from
                })
            }),
        };
        let txn = claims::ClaimTxn::run(
            self,
            (&lock_sql, &lock_params),
            finish_params.as_ref(),
            &work::claim_take_sql(q, work::slots_json(&slots), take, limited),
            limited.then_some(q.process.as_str()),
            hooks,
        )
        .await;
        // Whatever happened, the turn is free again.
        drop(turn.lock().unwrap_or_else(|p| p.into_inner()).take());
        let txn = txn.map_err(claims::RunFailure::failure)?;
        clock_hand.set_limited(txn.limited);
        if !wants_turn {
            clock_hand.advance_to(&hand_now(), &txn.taken_keys(), q.now);
        }
        let finish_results = match (finish, &txn.finished) {
            (Some(f), Some(done)) => match f.results(done, 0).map_err(Failure::Fail)? {
                Some(results) => Some(results),
                // A finish check failed: nothing was written (the take skipped its claim).
                None => return Ok(((None, Claimed::default()), 0)),
            },
            _ => None,
        };
        let refused = |err: Error| match &finish_results {
            // A finish that passed has committed; the claim yields nothing.
            Some(_) => Ok(((finish_results.clone(), Claimed::default()), 0)),
            None => Err(Failure::Fail(err)),
        };
        if !txn.alive.contains(&req.session_id) {
            return refused(Error::SessionExpired {
                session_id: req.session_id.clone(),
            });
        }
        if !txn.declared {
            return refused(claims::undeclared(&req.process));
        }
        let work = txn
            .took
            .iter()
            .map(|r| claimed_work(r, req, req.now))
            .collect::<Result<Vec<_>>>()
            .map_err(Failure::Fail)?;
        // Committed: a flag that cannot be read counts nothing.
        let expired = txn
            .took
            .iter()
            .filter(|r| r.try_get::<_, bool>(6).unwrap_or(false))
            .count() as u64
            + txn.parked as u64;
        // Cut by the process's limit, the claim has all it may take.
        let gone = match txn.capped {
            true => 0,
            false => txn.locked_n.saturating_sub(work.len()),
        };
        Ok((
            (
                finish_results,
                Claimed::short_of(q.limit, work, txn.revision).with_expired(expired),
            ),
            gone,
        ))
    }

    /// Run one statement in autocommit, retrying transient failures (serialization failures on
    /// servers that run every statement serializable, such as CockroachDB).
    async fn query_retrying(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut guard = Answered::new(self.client().await?);
            // A prepare runs nothing: a connection gone there is tried again on another one.
            let ran = match guard.client().prepare_cached(sql).await {
                Ok(stmt) => guard
                    .client()
                    .query(&stmt, params)
                    .await
                    .map_err(|e| classify(&e)),
                Err(e) => Err(prepare_failed(&e)),
            };
            guard.answered();
            drop(guard);
            match ran {
                Ok(rows) => return Ok(rows),
                Err(Failure::Fail(err)) => return Err(err),
                Err(Failure::Retry(msg)) => {
                    tracing::debug!(attempt, reason = %msg, "retrying PostgreSQL statement");
                    self.pause_before_retry(attempt, msg).await?;
                }
            }
        }
    }

    /// Run a compiled selector query (text varying per selector) in ONE round trip, uncached.
    async fn query_selector(
        &self,
        sql: &str,
        params: &work::TypedParams,
    ) -> Result<Vec<tokio_postgres::Row>> {
        let mut guard = self.read_client().await?;
        let rows = guard.client().query_typed(sql, &params.typed()).await;
        guard.open = false;
        rows.map_err(db_err)
    }

    async fn query(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<tokio_postgres::Row>> {
        let mut guard = self.read_client().await?;
        let conn = guard.client();
        let rows = async { conn.query(&conn.prepare_cached(sql).await?, params).await }.await;
        guard.open = false;
        rows.map_err(db_err)
    }

    /// A pooled connection for reads, held by a [`TxGuard`] until the caller sets `open` to
    /// false once every request it sent was answered. A read given up before (a caller's timeout
    /// while the query waits for a lock, or is merely long) is detached and closed instead of
    /// going back to the pool still busy with it, where the next call handed it (last in, first
    /// out: the very next) would wait behind the abandoned query.
    async fn read_client(&self) -> Result<TxGuard> {
        Ok(TxGuard {
            client: Some(self.client().await?),
            open: true,
        })
    }
}

/// The work of a row of [`work::claim_take_sql`] (`namespace, kind, id, token`), claimed for
/// `req` at `now`.
fn claimed_work(r: &tokio_postgres::Row, req: &ClaimRequest, now: Timestamp) -> Result<WorkInfo> {
    Ok(WorkInfo {
        key: fleetdb_core::apply::stored_key(
            r.try_get(0).map_err(db_err)?,
            r.try_get(1).map_err(db_err)?,
            r.try_get(2).map_err(db_err)?,
        ),
        process: req.process.clone(),
        session_id: req.session_id.clone(),
        token: r.try_get(3).map_err(db_err)?,
        started_at: now,
    })
}

/// Owns a pooled connection while a request on it waits for its answer. Dropped before the
/// answer came (the caller gave up: a renewal not answered within a tick, a caller's timeout),
/// the connection is detached from the pool and closed — it may be half-open (after a failover
/// the old server's connections can stay open and silent, while new ones reach the new
/// primary), and put back it would be handed out again and again, every later request on it
/// waiting for ever — and the pool's idle connections go too (made before, likely to the same
/// dead peer): the next requests open new ones. Normally answered requests cost nothing.
pub(crate) struct Answered(TxGuard);

impl Answered {
    pub(crate) fn new(client: PooledClient) -> Self {
        Answered(TxGuard {
            client: Some(client),
            open: true,
        })
    }

    pub(crate) fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.0.client()
    }

    /// The request was answered (successfully or not): the connection may go back to the pool.
    pub(crate) fn answered(&mut self) {
        self.0.open = false;
    }
}

/// Given up: the pool's idle connections are closed here, this one by the [`TxGuard`] after.
impl Drop for Answered {
    fn drop(&mut self) {
        if self.0.open {
            if let Some(pool) = self.0.client.as_ref().and_then(PooledClient::pool) {
                pool.retain(|_, _| false);
            }
            tracing::warn!("a PostgreSQL request was given up before its answer: its connection and the idle ones are closed");
        }
    }
}

/// Owns the pooled connection of a transaction. If the transaction is still open when it drops
/// (the commit future was cancelled, or ROLLBACK failed), the connection is detached from the pool
/// and closed, so the server rolls back and no one reuses a connection inside a transaction.
pub(crate) struct TxGuard {
    pub(crate) client: Option<PooledClient>,
    pub(crate) open: bool,
}

impl TxGuard {
    pub(crate) fn client(&self) -> &deadpool_postgres::ClientWrapper {
        // Set in the constructor, taken only in drop.
        self.client.as_deref().expect("TxGuard holds a client")
    }
}

impl Drop for TxGuard {
    fn drop(&mut self) {
        if self.open {
            if let Some(client) = self.client.take() {
                drop(PooledClient::take(client));
            }
        }
    }
}

/// What [`PostgresBackend::read_decide_write`] does after its read.
enum Decided<T> {
    /// An op would fail: roll back (the general path names the failure).
    Rollback,
    /// Nothing to write: commit, answering this.
    Commit(T),
    /// Run this write with these parameters; the answer from its revisions by op index.
    Write(
        &'static str,
        Vec<tx::Owned>,
        Box<dyn FnOnce(std::collections::HashMap<usize, i64>) -> Result<T> + Send>,
    ),
}

/// Run `attempt` until it succeeds or fails for good, pausing between transient failures
/// ([`backoff`]), at most [`COMMIT_ATTEMPTS_MAX`] times (the fused bulk paths, the content store).
pub(crate) async fn retrying<T, F, Fut>(
    retries: &std::sync::atomic::AtomicU64,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, Failure>>,
{
    let mut tried = 0;
    loop {
        tried += 1;
        match attempt().await {
            Ok(out) => return Ok(out),
            Err(Failure::Fail(err)) => return Err(err),
            Err(Failure::Retry(msg)) => {
                if tried >= COMMIT_ATTEMPTS_MAX {
                    return Err(Error::RetriesExhausted {
                        attempts: tried,
                        last: msg,
                    });
                }
                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(backoff(tried)).await;
            }
        }
    }
}

/// The pause before attempt `attempt + 1`: exponential from 1 ms, capped at 100 ms, with jitter
/// (uniform in the upper half of the window).
/// The transaction a write runs in: SERIALIZABLE by default; claims READ COMMITTED, locking the
/// objects they take and the claim rows they read (under SERIALIZABLE, claimers racing for the
/// head of a queue abort one another); sweeps without sequential scans (`sql::BEGIN_SWEEP`); finishes READ COMMITTED with
/// their reads locking ([`releases_only`]).
fn transaction_for<'a>(write: &Write<'_>, conn: &'a deadpool_postgres::ClientWrapper) -> PgTx<'a> {
    match write {
        // Claims read the claim rows on their object locked (after the object's own lock, the
        // order every path takes): a dead holder's row deleted meanwhile (by the sweeper, or by
        // its late finish) is then seen gone, not expired a second time.
        Write::Claim(_) => {
            let mut tx = PgTx::with_begin(conn, sql::BEGIN_READ_COMMITTED);
            tx.lock_reads = true;
            tx
        }
        Write::Batch(batch)
            if batch
                .ops
                .iter()
                .any(|op| matches!(op, fleetdb_core::Op::GcSweep { .. })) =>
        {
            PgTx::with_begin(conn, sql::BEGIN_SWEEP)
        }
        Write::Batch(batch) if releases_only(batch) => {
            let mut tx = PgTx::with_begin(conn, sql::BEGIN_READ_COMMITTED);
            tx.lock_reads = true;
            tx
        }
        _ => PgTx::new(conn),
    }
}

/// Whether a batch only finishes or cancels claims (and deletes tags): a worker's finish. Such a
/// batch runs READ COMMITTED with its work and tag rows read `FOR UPDATE`, not SERIALIZABLE:
/// every decision rests on rows it then holds locked (the claim's work row, the tags it
/// deletes), the rest are writes (history, backoff removal, change-log rows), and concurrent
/// finishes of neighbouring claims no longer abort each other on SSI's page and relation locks.
/// A claim taking over an expired claim, a sweeper expiring it, or a serializable writer of the
/// same tag waits for those locks or fails its own first-updater check and retries.
fn releases_only(batch: &Batch) -> bool {
    use fleetdb_core::{work::Outcome, Op, Precondition};
    batch
        .preconditions
        .iter()
        .all(|p| matches!(p, Precondition::SessionAlive { .. }))
        && batch
            .ops
            .iter()
            .any(|op| matches!(op, Op::WorkRelease { .. }))
        && batch.ops.iter().all(|op| {
            matches!(
                op,
                Op::TagDelete { .. }
                    | Op::WorkRelease {
                        outcome: Outcome::Finished | Outcome::Canceled,
                        ..
                    }
            )
        })
}

/// A selector-claim statement from the connection's cache, preparing it on first use; the cache
/// is emptied first when it holds [`sql::STATEMENTS_CACHED_MAX`] statements.
async fn prepare_claim(
    conn: &deadpool_postgres::ClientWrapper,
    text: &str,
) -> std::result::Result<tokio_postgres::Statement, Failure> {
    if conn.statement_cache.size() >= sql::STATEMENTS_CACHED_MAX {
        conn.statement_cache.clear();
    }
    conn.prepare_cached(text)
        .await
        .map_err(|e| prepare_failed(&e))
}

/// A failed prepare: nothing was run, so a connection gone is a transient failure (the work runs
/// again on another connection).
/// The count in the first column of a statement's one row (`what` names the statement in the
/// error when there is no row); a negative count reads as 0.
fn count_of(rows: &[tokio_postgres::Row], what: &str) -> Result<u64> {
    let n: i64 = rows
        .first()
        .ok_or_else(|| Error::Backend(format!("{what} returned no row")))?
        .try_get(0)
        .map_err(db_err)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(crate) fn prepare_failed(e: &tokio_postgres::Error) -> Failure {
    crate::error::gone_before_commit(e).unwrap_or_else(|| classify(e))
}

fn backoff(attempt: u32) -> Duration {
    use rand::Rng as _;
    let exp = BACKOFF_INITIAL.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let window = exp.min(BACKOFF_MAX);
    let micros = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
    let jittered = rand::rng().random_range(micros / 2..=micros);
    Duration::from_micros(jittered)
}

/// `url` with its password (if any) replaced by `***`.
fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = url.find("://") {
        let rest_start = scheme_end + 3;
        let rest = &url[rest_start..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                out = format!(
                    "{}{}:***{}",
                    &url[..rest_start],
                    &rest[..colon],
                    &rest[at..]
                );
            }
        }
    }
    // `password=` in the query string.
    if let Some(pos) = out.find("password=") {
        let value_start = pos + "password=".len();
        let value_end = out[value_start..]
            .find(['&', ' '])
            .map_or(out.len(), |i| value_start + i);
        out.replace_range(value_start..value_end, "***");
    }
    out
}

/// How long compaction waits for in-flight revisions below the requested point (it stops below
/// the first one still running after that).
const COMPACT_SETTLE_WAIT: Duration = Duration::from_millis(100);

/// Sweeps between two refreshes of the work tables' planner statistics.
const SWEEPS_PER_ANALYZE: u64 = 10;
/// Sweeps between two looks for claims whose session is gone (about a minute).
const SWEEPS_PER_ORPHAN_CHECK: u64 = 60;

#[async_trait]
impl Backend for PostgresBackend {
    fn retries(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn name(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            multi_process_writers: true,
            group_commit: true,
            revisions_visible_in_order: false,
            unavailable_may_have_committed: true,
        }
    }

    fn durability_warnings(&self) -> Vec<String> {
        self.durability.to_vec()
    }

    async fn clock_sync(&self) -> Result<Option<i64>> {
        let Some(server_clock) = &self.server_clock else {
            return Ok(None);
        };
        // Given up before its answer (the background task's timeout: a half-open connection
        // after a failover, a server that does not answer), the connection is closed, not put
        // back into the pool for the store's next call to wait on ([`Answered`]).
        let mut client = Answered::new(self.client().await?);
        let sample = clock_sample(client.client()).await;
        client.answered();
        server_clock.offer(sample?);
        Ok(server_clock.offset_micros())
    }

    fn clock_offset(&self) -> Option<i64> {
        self.server_clock.as_ref()?.offset_micros()
    }

    async fn schema_status(&self) -> Result<SchemaStatus> {
        let mut guard = self.read_client().await?;
        let status = migrate::read_status(guard.client(), MIGRATIONS).await;
        guard.open = false;
        Ok(status?.0)
    }

    async fn migrate(&self) -> Result<SchemaStatus> {
        // Given up inside a migration's transaction (a timeout while it waits for another
        // migrator), the connection must not go back to the pool: the next call on it would run
        // inside that transaction. The guard detaches it; the server rolls the migration back.
        let mut guard = TxGuard {
            client: Some(self.client().await?),
            open: true,
        };
        let status = migrate::run(guard.client(), MIGRATIONS, self.clock.as_ref()).await;
        guard.open = false;
        status
    }

    async fn namespace_get(&self, name: &str) -> Result<Option<Namespace>> {
        let rows = self.query(sql::NAMESPACE_GET, &[&name]).await?;
        rows.first().map(sql::namespace_from_row).transpose()
    }

    async fn namespace_list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Namespace>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            Some(after) => {
                self.query(sql::NAMESPACE_LIST_AFTER, &[&after, &limit])
                    .await?
            }
            None => self.query(sql::NAMESPACE_LIST_FIRST, &[&limit]).await?,
        };
        rows.iter().map(sql::namespace_from_row).collect()
    }

    async fn object_get(&self, key: &ObjectKey) -> Result<Option<Object>> {
        let rows = self
            .query(sql::OBJECT_GET, &[&key.namespace, &key.kind, &key.id])
            .await?;
        rows.first().map(sql::object_from_row).transpose()
    }

    async fn object_list(&self, query: &ObjectQuery) -> Result<Vec<Object>> {
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let (text, params) = sql::object_list_sql(query, &limit);
        let mut guard = self.read_client().await?;
        let client = guard.client();
        let rows = async {
            let stmt = if query.labels.len() <= CACHED_LABEL_REQUIREMENTS_MAX {
                client.prepare_cached(&text).await?
            } else {
                client.prepare(&text).await?
            };
            client.query(&stmt, &params).await
        }
        .await;
        guard.open = false;
        rows.map_err(db_err)?
            .iter()
            .map(sql::object_from_row)
            .collect()
    }

    async fn tag_get(&self, key: &ObjectKey, name: &str) -> Result<Option<Tag>> {
        let rows = self
            .query(sql::TAG_GET, &[&key.namespace, &key.kind, &key.id, &name])
            .await?;
        Ok(rows
            .first()
            .map(|r| sql::tag_from_row(key, r))
            .transpose()?
            .map(|(tag, _)| tag))
    }

    async fn tag_list(&self, key: &ObjectKey) -> Result<Vec<Tag>> {
        let rows = self
            .query(sql::TAG_LIST, &[&key.namespace, &key.kind, &key.id])
            .await?;
        rows.iter()
            .map(|r| sql::tag_from_row(key, r).map(|(tag, _)| tag))
            .collect()
    }

    async fn commit(&self, batch: Batch) -> Result<Vec<OpResult>> {
        if batch.ops.is_empty() && batch.preconditions.is_empty() {
            return Ok(Vec::new());
        }
        if let Some((shape, key)) = combine::shape(&batch) {
            let key = key.clone();
            return self.commit_lone(batch, shape, &key).await;
        }
        self.commit_unshared(&batch).await
    }

    async fn changes(
        &self,
        after: Revision,
        filter: &ChangeFilter,
        limit: usize,
    ) -> Result<Vec<Change>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let prefix = filter.id_prefix.as_deref().map(sql::like_prefix);
        let mut params: Vec<Param<'_>> = vec![&after.0];
        if let Some(ns) = &filter.namespace {
            params.push(ns);
        }
        if let Some(kind) = &filter.kind {
            params.push(kind);
        }
        if let Some(prefix) = &prefix {
            params.push(prefix);
        }
        params.push(&limit);
        let text = sql::changes_sql(
            filter.namespace.as_deref(),
            filter.kind.is_some(),
            prefix.is_some(),
        );
        let rows = self.query(&text, &params).await?;
        let Some(first) = rows.first() else {
            return Err(Error::Backend(
                "fleetdb_meta has no compacted_revision row".to_string(),
            ));
        };
        let compacted: i64 = first.try_get(0).map_err(db_err)?;
        if after.0 < compacted {
            return Err(Error::Compacted {
                requested: after,
                compacted_revision: Revision(compacted),
            });
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(change) = sql::change_from_row(row)? {
                out.push(change);
            }
        }
        Ok(out)
    }

    async fn change_times(
        &self,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<(Revision, Timestamp)>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.query(sql::CHANGE_TIMES, &[&after.0, &limit]).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    Revision(r.try_get(0).map_err(db_err)?),
                    Timestamp(r.try_get(1).map_err(db_err)?),
                ))
            })
            .collect()
    }

    async fn compact(&self, before: Revision) -> Result<u64> {
        // Never past a revision whose transaction may still commit: its change would land below
        // the compaction point, where no watcher resuming after that point would look.
        let settled = settle::settled_revision(self, COMPACT_SETTLE_WAIT).await?;
        let before = Revision(before.0.min(settled.0.saturating_add(1)));
        let floor = before.0.saturating_sub(1);
        let rows = self.query(sql::COMPACT, &[&before.0, &floor]).await?;
        count_of(&rows, "compaction")
    }

    async fn revision(&self) -> Result<RevisionInfo> {
        let rows = self.query(sql::REVISION, &[]).await?;
        let row = rows.first().ok_or_else(|| {
            Error::Backend("fleetdb_meta has no compacted_revision row".to_string())
        })?;
        Ok(RevisionInfo {
            current: Revision(row.try_get(0).map_err(db_err)?),
            compacted: Revision(row.try_get(1).map_err(db_err)?),
        })
    }

    // ---- sessions and work ----

    /// A finish of the fused shape and a selector claim run in one READ COMMITTED transaction,
    /// in one round trip (see `claim_selector`); anything else, or a finish whose checks fail,
    /// as `commit` then `claim`.
    async fn commit_then_claim(
        &self,
        batch: Batch,
        claim: ClaimRequest,
    ) -> Result<(Vec<OpResult>, Claimed)> {
        if let (Some(finish), fleetdb_core::work::ClaimTarget::Selector(text)) =
            (finish::FusedFinish::new(&batch), &claim.target)
        {
            if let Ok(selector) = Selector::parse(text) {
                if let (Some(results), work) =
                    self.claim_selector(&claim, selector, Some(&finish)).await?
                {
                    return Ok((results, work));
                }
            }
        }
        let results = self.commit(batch).await?;
        // The batch stands; a claim that failed took nothing — unless only its answer was
        // lost with the connection: then the caller is told (`unknown`) and takes up what it
        // may have taken (its own rows started at the claim's time).
        let claimed = match self.claim(claim).await {
            Ok(claimed) => claimed,
            Err(Error::Unavailable(_)) => Claimed {
                unknown: true,
                ..Claimed::default()
            },
            Err(_) => Claimed::default(),
        };
        Ok((results, claimed))
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Claimed> {
        if let fleetdb_core::work::ClaimTarget::Selector(text) = &req.target {
            let selector = Selector::parse(text)?;
            return Ok(self.claim_selector(&req, selector, None).await?.1);
        }
        match self.transact(Write::Claim(&req)).await? {
            Written::Claim(work, expired) => Ok(Claimed::work(work).with_expired(expired)),
            _ => Err(Error::Backend(
                "a claim returned something else".to_string(),
            )),
        }
    }

    async fn session_renew(
        &self,
        ids: &[String],
        now: Timestamp,
    ) -> Result<Vec<(String, Timestamp)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = work::json_list(ids);
        let rows = self
            .query_retrying(work::SESSION_RENEW, &[&now.0, &ids])
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(db_err)?,
                    Timestamp(r.try_get(1).map_err(db_err)?),
                ))
            })
            .collect()
    }

    async fn session_sweep(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<fleetdb_core::backend::Swept> {
        // The work tables go from empty to thousands of rows in seconds; with the statistics of
        // an empty table the planner picks merge anti-joins that compare every candidate with
        // every claim (a claim took 0.8 s at 3,000 claims instead of 5 ms). Autovacuum looks once
        // a minute; the sweeper (every second in every process) refreshes them every 10 sweeps.
        let n = self
            .sweeps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_multiple_of(SWEEPS_PER_ANALYZE) {
            if let Ok(mut guard) = self.read_client().await {
                let analyzed = guard
                    .client()
                    .batch_execute("ANALYZE work, work_backoff, sessions")
                    .await;
                guard.open = false;
                if let Err(e) = analyzed {
                    tracing::debug!(error = %e, "refreshing work table statistics failed");
                }
            }
        }
        // A claim racing a close or a sweep of its own session can leave a row for a session
        // that is gone (`apply_orphans`): looked for on the first sweep and every
        // `SWEEPS_PER_ORPHAN_CHECK` after (an anti-join over every claim).
        let orphans = n.is_multiple_of(SWEEPS_PER_ORPHAN_CHECK);
        match self
            .transact(Write::Sweep {
                now,
                limit,
                orphans,
            })
            .await?
        {
            Written::Sweep(n) => Ok(n),
            _ => Err(Error::Backend(
                "a sweep returned something else".to_string(),
            )),
        }
    }

    async fn session_get(&self, id: &str) -> Result<Option<SessionInfo>> {
        let rows = self.query(work::SESSION_GET, &[&id]).await?;
        rows.first().map(work::session_from_row).transpose()
    }

    async fn session_list(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionInfo>> {
        let after = after.unwrap_or("");
        let limit = work::limit_param(limit);
        let rows = self.query(work::SESSION_LIST, &[&after, &limit]).await?;
        rows.iter().map(work::session_from_row).collect()
    }

    async fn process_list(&self) -> Result<Vec<Process>> {
        let rows = self.query(work::PROCESS_ALL, &[]).await?;
        rows.iter().map(work::process_from_row).collect()
    }

    async fn work_list(&self, q: &WorkListing) -> Result<Vec<WorkInfo>> {
        let limit = work::limit_param(q.limit);
        let [p, n, k, i] = WorkCursor::params(q.after.as_ref());
        let rows = self
            .query(
                work::WORK_LIST,
                &[&q.process, &q.session, &p, &n, &k, &i, &limit],
            )
            .await?;
        rows.iter().map(work::work_from_row).collect()
    }

    async fn backoff_list(
        &self,
        process: Option<&str>,
        active_at: Option<Timestamp>,
        after: Option<&WorkCursor>,
        limit: usize,
    ) -> Result<Vec<BackoffInfo>> {
        let active_at = active_at.map(|t| t.0);
        let limit = work::limit_param(limit);
        let [p, n, k, i] = WorkCursor::params(after);
        let rows = self
            .query(
                work::BACKOFF_LIST,
                &[&process, &active_at, &p, &n, &k, &i, &limit],
            )
            .await?;
        rows.iter().map(work::backoff_from_row).collect()
    }

    async fn history_list(
        &self,
        filter: &HistoryFilter,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>> {
        let before = before.unwrap_or(i64::MAX);
        let limit = work::limit_param(limit);
        let rows = match filter {
            HistoryFilter::Object(k) => {
                self.query(
                    work::HISTORY_OF_OBJECT,
                    &[&k.namespace, &k.kind, &k.id, &before, &limit],
                )
                .await?
            }
            HistoryFilter::Process(p) => {
                self.query(work::HISTORY_OF_PROCESS, &[p, &before, &limit])
                    .await?
            }
        };
        rows.iter().map(work::history_from_row).collect()
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
        let selector = Selector::parse(selector)?;
        let (sql, params) = work::select_sql(&selector, now, after, limit);
        let rows = self.query_selector(&sql, &params).await?;
        work::objects_from_rows(&rows)
    }

    async fn world_list(&self, query: &WorldQuery) -> Result<Vec<WorldRecord>> {
        let (text, params) = query.to_sql(Dialect::Postgres, sql::WORLD_COLUMNS);
        let rows = self
            .query_selector(&text, &work::TypedParams::new(params))
            .await?;
        rows.iter().map(sql::world_from_row).collect()
    }

    async fn world_list_all(&self, queries: &[WorldQuery]) -> Result<Vec<Vec<WorldRecord>>> {
        // One REPEATABLE READ READ ONLY transaction: every page sees the snapshot of its first
        // statement (such a transaction never fails to serialize).
        let mut guard = TxGuard {
            client: Some(self.client().await?),
            open: true,
        };
        let read = async {
            let conn = guard.client();
            conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(db_err)?;
            let mut out = Vec::with_capacity(queries.len());
            for q in queries {
                let mut q = q.clone();
                // A page of none would never end.
                q.limit = q.limit.max(1);
                let mut records = Vec::new();
                loop {
                    let (text, params) = q.to_sql(Dialect::Postgres, sql::WORLD_COLUMNS);
                    let rows = conn
                        .query_typed(&text, &work::TypedParams::new(params).typed())
                        .await
                        .map_err(db_err)?;
                    let page = rows
                        .iter()
                        .map(sql::world_from_row)
                        .collect::<Result<Vec<_>>>()?;
                    if q.take_page(page, &mut records) {
                        break;
                    }
                }
                out.push(records);
            }
            Ok(out)
        }
        .await;
        // A read-only transaction: COMMIT and ROLLBACK end it alike. If that fails, the guard
        // closes the connection instead of handing it back inside a transaction.
        let end = if read.is_ok() { "COMMIT" } else { "ROLLBACK" };
        guard.client().batch_execute(end).await.map_err(db_err)?;
        guard.open = false;
        read
    }

    async fn settled_revision(&self, wait: Duration) -> Result<Revision> {
        settle::settled_revision(self, wait).await
    }

    async fn announce_changes(&self) -> Result<()> {
        let channel: &str = &self.channel;
        // A wake-up needs no durability (the change log is the truth): committing it without
        // waiting for the WAL flush keeps it from adding an fsync next to the writers' own.
        self.query(
            "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')",
            &[&channel],
        )
        .await?;
        Ok(())
    }

    async fn listen_changes(&self, wake: Arc<dyn Fn() + Send + Sync>) -> Result<bool> {
        // Listening before returning, so nothing announced after this call is missed; if the
        // server cannot be reached now, the task keeps trying (and wakes once it listens).
        let first = match notify::listen(&self.config, &self.channel).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(error = %e, target = %self.target, "LISTEN failed; retrying in the background");
                None
            }
        };
        notify::spawn_listener(
            (*self.config).clone(),
            self.channel.to_string(),
            wake,
            first,
            self.alive.subscribe(),
        );
        Ok(true)
    }

    // ---- leases, garbage collection, content store (see the gc and content modules) ----

    async fn lease_get(&self, id: &str) -> Result<Option<fleetdb_core::gc::Lease>> {
        let rows = self.query(gc::LEASE_GET, &[&id]).await?;
        rows.first().map(gc::lease_from_row).transpose()
    }

    async fn lease_list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<fleetdb_core::gc::Lease>> {
        let after = after.unwrap_or("");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.query(gc::LEASE_LIST, &[&after, &limit]).await?;
        rows.iter().map(gc::lease_from_row).collect()
    }

    async fn lease_resources(&self, id: &str) -> Result<Vec<fleetdb_core::gc::Resource>> {
        let rows = self.query(gc::LEASE_RESOURCES_OF, &[&id]).await?;
        let mut out = rows
            .iter()
            .map(|r| gc::resource_from_row(r, 0))
            .collect::<Result<Vec<_>>>()?;
        out.sort();
        Ok(out)
    }

    async fn gc_kinds(&self) -> Result<Vec<fleetdb_core::gc::GcKind>> {
        let rows = self.query(gc::GC_KIND_ALL, &[]).await?;
        rows.iter().map(gc::gc_kind_from_row).collect()
    }

    async fn gc_snapshot(&self) -> Result<fleetdb_core::gc::GcSnapshot> {
        gc::gc_snapshot(self).await
    }

    async fn gc_changed(
        &self,
        after: Revision,
        upto: Revision,
        limit: usize,
    ) -> Result<Vec<(Revision, String, String, String)>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(gc::GC_CHANGED, &[&after.0, &upto.0, &limit])
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let compacted: i64 = r.try_get(0).map_err(db_err)?;
            if after.0 < compacted {
                return Err(Error::Compacted {
                    requested: after,
                    compacted_revision: Revision(compacted),
                });
            }
            if let Some(rev) = r.try_get::<_, Option<i64>>(1).map_err(db_err)? {
                out.push((
                    Revision(rev),
                    r.try_get(2).map_err(db_err)?,
                    r.try_get(3).map_err(db_err)?,
                    r.try_get(4).map_err(db_err)?,
                ));
            }
        }
        Ok(out)
    }

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
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        self.query(sql::GC_RUN_RECORD, &[&started_at.0, &stats, &keep])
            .await
            .map(|_| ())
    }

    async fn gc_runs(&self, limit: usize) -> Result<Vec<String>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.query(sql::GC_RUNS, &[&limit]).await?;
        rows.iter().map(|r| r.try_get(0).map_err(db_err)).collect()
    }

    async fn work_stats(&self, now: Timestamp) -> Result<Vec<WorkStats>> {
        let rows = self
            .query(work::WORK_STATS, &[&now.0, &fleetdb_core::work::PARKED.0])
            .await?;
        rows.iter().map(work::work_stats_from_row).collect()
    }

    async fn count(&self, selector: &str, now: Timestamp) -> Result<u64> {
        let selector = Selector::parse(selector)?;
        let (sql, params) = work::count_sql(&selector, now);
        let rows = self.query_selector(&sql, &params).await?;
        count_of(&rows, "count")
    }
}

/// A backend on a fresh schema of the test server (migrated, system clock, a pool of
/// `pool_size_max`), with the server's base URL and the schema to drop.
#[cfg(test)]
pub(crate) async fn test_backend(pool_size_max: usize) -> (PostgresBackend, String, String) {
    let base = testing::test_url();
    let (url, schema) = testing::create_schema(&base)
        .await
        .unwrap_or_else(|msg| panic!("{msg}"));
    let backend = PostgresBackend::open(
        &url,
        PostgresOptions {
            migrate: true,
            pool_size_max,
        },
        Arc::new(fleetdb_core::SystemClock),
    )
    .await
    .unwrap();
    (backend, base, schema)
}

/// Job `default/job/<id>` claimed for process `P` (token `token`) by session `dead`, whose
/// deadline has passed: what a worker that crashed while holding it leaves behind.
#[cfg(test)]
pub(crate) async fn seed_dead_claim(client: &deadpool_postgres::Client, id: &str, token: i64) {
    client
        .execute(
            "INSERT INTO sessions (id, component, host, runtime_info, ttl_ms, created_at, deadline) \
             VALUES ('dead', 'crashy', 'h', '', 1000, 0, 0)",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO work (namespace, kind, id, process, session_id, token, started_at) \
             VALUES ('default', 'job', $1, 'P', 'dead', $2, 0)",
            &[&id, &token],
        )
        .await
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..40 {
            let d = backoff(attempt);
            let window = BACKOFF_INITIAL
                .saturating_mul(1u32 << (attempt - 1).min(16))
                .min(BACKOFF_MAX);
            assert!(d <= window && d >= window / 2, "{attempt}: {d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(1));
        assert!(backoff(30) >= Duration::from_millis(50));
    }

    /// Every connection of a store carries `idle_in_transaction_session_timeout`
    /// ([`IDLE_IN_TRANSACTION_TIMEOUT`], or what the URL's `options` set): a process stopped
    /// inside one of its transactions (simulated here by a connection that locks a work row and
    /// sends nothing more) loses the transaction and its row locks when it runs out, the
    /// connection's next statement answers `Unavailable` (25P03); before, the lock stayed for as
    /// long as the process was stopped.
    #[tokio::test]
    async fn a_transaction_left_idle_is_ended_by_the_server_and_its_locks_released() {
        // The default, on the pool's connections and on the listener's configuration.
        let (backend, base, schema) = test_backend(2).await;
        let client = backend.client().await.unwrap();
        let shown: String = client
            .query_one("SHOW idle_in_transaction_session_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(shown, "5s");
        assert!(backend
            .config
            .get_options()
            .unwrap()
            .contains("idle_in_transaction_session_timeout=5000"));
        drop(client);
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();

        // A value set in the URL's options is kept (here short, to see it act).
        let (url, schema) = testing::create_schema(&base).await.unwrap();
        let url = format!("{url}%20-c%20idle_in_transaction_session_timeout%3D300ms");
        let backend = PostgresBackend::open(
            &url,
            PostgresOptions::default(),
            Arc::new(fleetdb_core::SystemClock),
        )
        .await
        .unwrap();
        let holder = backend.client().await.unwrap();
        let shown: String = holder
            .query_one("SHOW idle_in_transaction_session_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(shown, "300ms");
        seed_dead_claim(&holder, "j1", 1).await;
        holder
            .batch_execute("BEGIN; SELECT 1 FROM work WHERE id = 'j1' FOR UPDATE")
            .await
            .unwrap();
        let other = backend.client().await.unwrap();
        let locked = other
            .batch_execute("BEGIN; SELECT 1 FROM work WHERE id = 'j1' FOR UPDATE NOWAIT")
            .await;
        assert!(locked.is_err(), "the holder's lock is held meanwhile");
        other.batch_execute("ROLLBACK").await.unwrap();
        // The server's timer, not a clock FleetDB reads: real time must pass.
        tokio::time::sleep(Duration::from_millis(900)).await;
        let freed = other
            .query("SELECT 1 FROM work WHERE id = 'j1' FOR UPDATE NOWAIT", &[])
            .await
            .unwrap();
        assert_eq!(freed.len(), 1, "the lock went with the idle transaction");
        let ended = holder.query("SELECT 1", &[]).await.unwrap_err();
        assert!(
            matches!(db_err(ended), Error::Unavailable(_)),
            "a session ended for idling in a transaction is Unavailable"
        );
        drop(holder);
        drop(other);
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// The first read of a transaction is pipelined with BEGIN and must run inside it.
    #[tokio::test]
    async fn first_read_runs_inside_the_serializable_transaction() {
        let (backend, base, schema) = test_backend(PostgresOptions::default().pool_size_max).await;
        let client = backend.client().await.unwrap();
        for _ in 0..3 {
            let mut rows = PgTx::new(&client);
            let got = rows
                .read("SELECT current_setting('transaction_isolation')", &[])
                .await
                .unwrap();
            assert!(rows.begun);
            // Had the query overtaken BEGIN, it would have run in its own READ COMMITTED
            // transaction.
            assert_eq!(got[0].get::<_, String>(0), "serializable");
            client.batch_execute("ROLLBACK").await.unwrap();
        }
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    use crate::test_backend;

    /// A deferred write that fails before reaching the server (here: a parameter of the wrong
    /// type) must keep COMMIT from being sent after the writes queued before it.
    #[tokio::test]
    async fn commit_is_not_sent_after_a_write_that_failed_to_send() {
        let (backend, base, schema) = test_backend(1).await;
        let client = backend.client().await.unwrap();
        let insert = "INSERT INTO processes (name, conflicts, created_at) VALUES ($1, $2, $3)";
        let mut rows = PgTx::new(&client);
        rows.read("SELECT 1", &[]).await.unwrap();
        let good: Vec<tx::Owned> = vec![Box::new("A".to_string()), Box::new("[]"), Box::new(1i64)];
        rows.defer(insert, good).await.unwrap();
        // created_at is BIGINT: an i32 does not encode.
        let bad: Vec<tx::Owned> = vec![Box::new("B".to_string()), Box::new("[]"), Box::new(1i32)];
        rows.defer(insert, bad).await.unwrap();
        assert!(rows.commit().await.is_err());
        client.batch_execute("ROLLBACK").await.unwrap();
        let n: i64 = client
            .query_one("SELECT count(*) FROM processes", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "the first write must not have been committed");
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// History is pruned in `seq` order, in statements of at most the batch: the rows before the
    /// first one at or after the cut-off go, the older ones written after it stay.
    #[tokio::test]
    async fn history_prune_runs_in_batches_in_write_order() {
        let (backend, base, schema) = test_backend(2).await;
        let client = backend.client().await.unwrap();
        let remaining = || async {
            let rows = client
                .query("SELECT at FROM work_history ORDER BY seq", &[])
                .await
                .unwrap();
            rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>()
        };
        // Nine rows at 1..9, but the sixth at 100.
        client
            .batch_execute(
                "INSERT INTO work_history (namespace, kind, id, process, event, session_id, \
                   component, host, token, at) \
                 SELECT 'default', 'machine', 'm', 'P', 'Started', 's', 'c', 'h', g, \
                   CASE WHEN g = 6 THEN 100 ELSE g END FROM generate_series(1, 9) g",
            )
            .await
            .unwrap();
        // Batches of 2: [1, 2], [3, 4], then 5 before the stop at 100.
        assert_eq!(backend.history_prune_in(Timestamp(50), 2).await.unwrap(), 5);
        assert_eq!(remaining().await, vec![100, 7, 8, 9]);
        assert_eq!(backend.history_prune_in(Timestamp(50), 2).await.unwrap(), 0);
        // Past every row: all but the newest (the sequence must only grow).
        assert_eq!(
            backend.history_prune_in(Timestamp(101), 3).await.unwrap(),
            3
        );
        assert_eq!(remaining().await, vec![9]);
        drop(client);
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// review-w (suspected: history pages lose a row whose transaction took its `seq` before,
    /// and committed after, a page that read past it). `seq` is numbered at insert, so commit
    /// order is not `seq` order; but history pages go newest first (`seq < cursor`), so a walk
    /// lists every row committed before its first page: a row committing during the walk is
    /// listed if the walk has not yet passed its `seq`, and otherwise is as new to the walk as a
    /// row written after it began (SQLite, numbering in commit order, never lists either). No
    /// row that was there when the walk began is lost; a fresh walk lists the late one.
    #[tokio::test]
    async fn history_walks_list_every_row_committed_before_they_began() {
        let (backend, base, schema) = test_backend(3).await;
        let client = backend.client().await.unwrap();
        let mut late = backend.client().await.unwrap();
        let insert = |id: &'static str| {
            format!(
                "INSERT INTO work_history (namespace, kind, id, process, event, session_id, \
                   component, host, token, at) VALUES ('default', 'machine', '{id}', 'P', \
                   'Started', 's', 'c', 'h', 1, 1)"
            )
        };
        let walk = |limit: usize| {
            let backend = &backend;
            async move {
                let (mut ids, mut before) = (Vec::new(), None);
                loop {
                    let page = backend
                        .history_list(&HistoryFilter::Process("P".into()), before, limit)
                        .await
                        .unwrap();
                    ids.extend(page.iter().map(|h| h.key.id.clone()));
                    match page.last() {
                        Some(h) if page.len() == limit => before = Some(h.seq),
                        _ => return ids,
                    }
                }
            }
        };
        client.batch_execute(&insert("a")).await.unwrap();
        // `b` takes its `seq` now and commits only after pages were read.
        let tx = late.transaction().await.unwrap();
        tx.batch_execute(&insert("b")).await.unwrap();
        for id in ["c", "d", "e"] {
            client.batch_execute(&insert(id)).await.unwrap();
        }
        let seq_of = |id: &'static str| {
            let client = &client;
            async move {
                client
                    .query_one("SELECT seq FROM work_history WHERE id = $1", &[&id])
                    .await
                    .map(|r| r.get::<_, i64>(0))
            }
        };
        // A page of e and d: b (not committed) is below its cursor; committed now, the next
        // page lists it.
        let first = backend
            .history_list(&HistoryFilter::Process("P".into()), None, 2)
            .await
            .unwrap();
        assert_eq!(
            first.iter().map(|h| h.key.id.as_str()).collect::<Vec<_>>(),
            ["e", "d"]
        );
        tx.commit().await.unwrap();
        assert!(seq_of("b").await.unwrap() < seq_of("c").await.unwrap());
        let rest = backend
            .history_list(&HistoryFilter::Process("P".into()), Some(first[1].seq), 10)
            .await
            .unwrap();
        assert_eq!(
            rest.iter().map(|h| h.key.id.as_str()).collect::<Vec<_>>(),
            ["c", "b", "a"]
        );
        // A walk whose page passed `f`'s `seq` before `f` committed: `f` is new to it, as `g`,
        // written after the walk began; neither is a row the walk lost. A fresh walk lists both.
        let tx = late.transaction().await.unwrap();
        tx.batch_execute(&insert("f")).await.unwrap();
        client.batch_execute(&insert("x")).await.unwrap();
        let first = backend
            .history_list(&HistoryFilter::Process("P".into()), None, 2)
            .await
            .unwrap();
        assert_eq!(
            first.iter().map(|h| h.key.id.as_str()).collect::<Vec<_>>(),
            ["x", "e"],
            "f is not committed"
        );
        tx.commit().await.unwrap();
        client.batch_execute(&insert("g")).await.unwrap();
        let rest = backend
            .history_list(&HistoryFilter::Process("P".into()), Some(first[1].seq), 10)
            .await
            .unwrap();
        assert_eq!(
            rest.iter().map(|h| h.key.id.as_str()).collect::<Vec<_>>(),
            ["d", "c", "b", "a"],
            "every row committed when the walk began"
        );
        assert_eq!(walk(3).await, ["g", "x", "f", "e", "d", "c", "b", "a"]);
        drop((client, late));
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Lone creates and tag sets of many callers at once share transactions ([`combine`]), and
    /// each caller gets what it would have got alone: its own results with revisions in its op
    /// order, `AlreadyExists` for the loser of two creates of one object, `NotFound` for a
    /// missing namespace or object, a no-op for an identical value; one change-log row per
    /// change, nothing else written.
    #[tokio::test]
    async fn lone_writes_share_transactions_and_answer_as_alone() {
        use fleetdb_core::{Applied, Op, PutMode};
        let (backend, base, schema) = test_backend(8).await;
        let key = |ns: &str, id: &str| ObjectKey::new(ns, "job", id).unwrap();
        let create = |ns: &str, id: &str| Batch {
            preconditions: Vec::new(),
            now: Timestamp(5),
            ops: vec![
                Op::ObjectPut {
                    key: key(ns, id),
                    labels: [("l".to_string(), id.to_string())].into(),
                    mode: PutMode::Create,
                },
                Op::TagSet {
                    key: key(ns, id),
                    name: "a".to_string(),
                    value: "1".to_string(),
                },
                Op::TagSet {
                    key: key(ns, id),
                    name: "b".to_string(),
                    value: format!("\"{id}\""),
                },
            ],
        };
        let set = |id: &str, value: &str| Batch {
            preconditions: Vec::new(),
            now: Timestamp(6),
            ops: vec![Op::TagSet {
                key: key("default", id),
                name: "a".to_string(),
                value: value.to_string(),
            }],
        };
        // Objects the tag sets find.
        for i in 0..40 {
            backend
                .commit(create("default", &format!("old{i}")))
                .await
                .unwrap();
        }
        let client = backend.client().await.unwrap();
        let count = |sql: &'static str| {
            let client = &client;
            async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        let changes_before = count("SELECT count(*) FROM changes").await;

        #[derive(Debug, PartialEq)]
        enum Want {
            Changed(usize),
            Unchanged,
            Exists,
            Missing,
        }
        let mut writes: Vec<(Batch, Want)> = Vec::new();
        for i in 0..120 {
            writes.push((create("default", &format!("new{i}")), Want::Changed(3)));
        }
        for i in 0..10 {
            // Created twice: one of the two wins.
            writes.push((create("default", &format!("twice{i}")), Want::Exists));
            writes.push((create("default", &format!("twice{i}")), Want::Exists));
            writes.push((create("nowhere", &format!("x{i}")), Want::Missing));
            writes.push((set(&format!("gone{i}"), "2"), Want::Missing));
        }
        for i in 0..40 {
            let want = if i % 2 == 0 {
                Want::Unchanged
            } else {
                Want::Changed(1)
            };
            let value = if i % 2 == 0 { "1" } else { "2" };
            writes.push((set(&format!("old{i}"), value), want));
        }
        let tasks: Vec<_> = writes
            .into_iter()
            .map(|(batch, want)| {
                let backend = backend.clone();
                tokio::spawn(async move { (backend.commit(batch).await, want) })
            })
            .collect();
        let mut won_twice = 0;
        let mut changed_ops = 0;
        for task in tasks {
            let (got, want) = task.await.unwrap();
            match (got, &want) {
                (Ok(results), Want::Changed(n)) => {
                    assert_eq!(results.len(), *n);
                    assert!(results.iter().all(|r| r.changed));
                    let revs: Vec<i64> = results
                        .iter()
                        .map(|r| match &r.applied {
                            Applied::Object(o) => o.revision.0,
                            Applied::Tag(t) => t.revision.0,
                            other => panic!("{other:?}"),
                        })
                        .collect();
                    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
                    changed_ops += n;
                }
                (Ok(results), Want::Unchanged) => {
                    assert_eq!(results.len(), 1);
                    assert!(!results[0].changed);
                }
                (Ok(results), Want::Exists) => {
                    assert_eq!(results.len(), 3);
                    won_twice += 1;
                    changed_ops += 3;
                }
                (Err(Error::AlreadyExists { .. }), Want::Exists) => {}
                (Err(Error::NotFound { .. }), Want::Missing) => {}
                (other, want) => panic!("{want:?}: {other:?}"),
            }
        }
        assert_eq!(won_twice, 10, "one of each pair of creates wins");
        let changes = count("SELECT count(*) FROM changes").await - changes_before;
        assert_eq!(changes, changed_ops as i64);
        assert_eq!(count("SELECT count(*) FROM objects").await, 40 + 120 + 10);
        assert_eq!(
            count("SELECT count(*) FROM objects WHERE namespace = 'nowhere' OR id LIKE 'gone%'")
                .await,
            0
        );
        assert!(
            backend
                .writes
                .shared_txns
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0,
            "230 writes at once share transactions"
        );
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Lone writes whose callers give up while they wait for a turn or a shared transaction:
    /// each write is written whole or not at all, never half; the turn is not lost (writes after
    /// them still run, alone at once when nothing waits).
    #[tokio::test]
    async fn abandoned_lone_writes_leave_nothing_half_written_and_free_the_turn() {
        use fleetdb_core::{Op, PutMode};
        let (backend, base, schema) = test_backend(4).await;
        let create = |id: String| Batch {
            preconditions: Vec::new(),
            now: Timestamp(5),
            ops: vec![
                Op::ObjectPut {
                    key: ObjectKey::new("default", "job", &id).unwrap(),
                    labels: fleetdb_core::Labels::new(),
                    mode: PutMode::Create,
                },
                Op::TagSet {
                    key: ObjectKey::new("default", "job", &id).unwrap(),
                    name: "a".to_string(),
                    value: "1".to_string(),
                },
            ],
        };
        for round in 0..5 {
            let tasks: Vec<_> = (0..40)
                .map(|i| {
                    let backend = backend.clone();
                    let batch = create(format!("r{round}-{i}"));
                    tokio::spawn(async move {
                        // Every other caller gives up almost at once.
                        let wait = Duration::from_micros(if i % 2 == 0 { 50 } else { 60_000_000 });
                        tokio::time::timeout(wait, backend.commit(batch)).await
                    })
                })
                .collect();
            for t in tasks {
                if let Ok(r) = t.await.unwrap() {
                    r.unwrap();
                }
            }
        }
        // Whatever the abandoned writes did, they did whole (their shared transactions go on).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let client = backend.client().await.unwrap();
        // One snapshot for the three counts.
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM objects), (SELECT count(*) FROM tags), \
                   (SELECT count(*) FROM changes)",
                &[],
            )
            .await
            .unwrap();
        let (objects, tags, changes): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert!(
            objects >= 100,
            "the callers that waited were answered: {objects}"
        );
        assert_eq!(tags, objects, "no object without its tag");
        assert_eq!(changes, 2 * objects);
        assert!(
            backend
                .writes
                .shared_txns
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        drop(client);
        // The turn is free again: a lone write runs at once and answers.
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            backend.commit(create("after".to_string())),
        )
        .await
        .expect("the turn was passed on");
        assert_eq!(r.unwrap().len(), 2);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Bulk creates and tag sets (one statement each), upserts and deletes (a read and a write):
    /// the fused paths answer, not the general one; when an object exists (creates) or is missing
    /// (tag sets, deletes), or a namespace is missing, they keep nothing and leave the batch to
    /// the general path.
    #[tokio::test]
    async fn bulk_paths_answer_and_keep_nothing_on_a_clash() {
        use fleetdb_core::{Op, PutMode};
        let (backend, base, schema) = test_backend(2).await;
        let client = backend.client().await.unwrap();
        let count = |sql: &'static str| {
            let client = &client;
            async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        let batch = |ids: &[(&str, &str)]| Batch {
            preconditions: Vec::new(),
            now: Timestamp(7),
            ops: ids
                .iter()
                .flat_map(|(ns, id)| {
                    let key = ObjectKey::new(*ns, "job", *id).unwrap();
                    [
                        Op::ObjectPut {
                            key: key.clone(),
                            labels: [("l".to_string(), "v".to_string())].into(),
                            mode: PutMode::Create,
                        },
                        Op::TagSet {
                            key,
                            name: "t".to_string(),
                            value: format!("{{\"id\": \"{id}\"}}"),
                        },
                    ]
                })
                .collect(),
        };
        let rows = |n| {
            count(if n == 0 {
                "SELECT count(*) FROM objects"
            } else {
                "SELECT count(*) FROM changes"
            })
        };
        let fresh = batch(&[("default", "a"), ("default", "b"), ("default", "c")]);
        let results = backend
            .object_create_fused(&fresh)
            .await
            .unwrap()
            .expect("new objects take the fused path");
        assert_eq!(results.len(), 6);
        let revs: Vec<i64> = results
            .iter()
            .map(|r| match &r.applied {
                fleetdb_core::Applied::Object(o) => o.revision.0,
                fleetdb_core::Applied::Tag(t) => t.revision.0,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
        assert_eq!((rows(0).await, rows(1).await), (3, 6));
        // "b" exists: nothing of the batch stays, and the general path is asked to decide.
        let clash = batch(&[("default", "d"), ("default", "b"), ("default", "e")]);
        assert!(backend.object_create_fused(&clash).await.unwrap().is_none());
        let missing = batch(&[("default", "f"), ("nowhere", "g")]);
        assert!(backend
            .object_create_fused(&missing)
            .await
            .unwrap()
            .is_none());
        assert_eq!((rows(0).await, rows(1).await), (3, 6));
        let tags: Vec<String> = client
            .query("SELECT value FROM tags ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            tags,
            ["{\"id\": \"a\"}", "{\"id\": \"b\"}", "{\"id\": \"c\"}"]
        );
        // Tag sets of existing objects in bulk: one statement too; a missing object writes
        // nothing and leaves the batch to the general path.
        let sets = |ids: &[(&str, &str)]| Batch {
            preconditions: Vec::new(),
            now: Timestamp(8),
            ops: ids
                .iter()
                .map(|(id, value)| Op::TagSet {
                    key: ObjectKey::new("default", "job", *id).unwrap(),
                    name: "t".to_string(),
                    value: value.to_string(),
                })
                .collect(),
        };
        let results = backend
            .tag_sets_fused(&sets(&[("a", "1"), ("b", "{\"id\": \"b\"}"), ("c", "3")]))
            .await
            .unwrap()
            .expect("tag sets of existing objects take the fused path");
        let changed: Vec<bool> = results.iter().map(|r| r.changed).collect();
        assert_eq!(changed, [true, false, true], "b's value is identical");
        assert_eq!(rows(1).await, 8);
        assert!(backend
            .tag_sets_fused(&sets(&[("a", "5"), ("zz", "5")]))
            .await
            .unwrap()
            .is_none());
        assert_eq!(rows(1).await, 8);
        // Puts of existing objects in bulk: read, decided, written; a create of an existing
        // object writes nothing and leaves the batch to the general path.
        let mut upsert = batch(&[("default", "a"), ("default", "new")]);
        for op in upsert.ops.iter_mut() {
            if let Op::ObjectPut { mode, .. } = op {
                *mode = PutMode::Upsert;
            }
        }
        let results = backend
            .objects_upsert_fused(&upsert)
            .await
            .unwrap()
            .expect("puts of existing objects take the fused path");
        let changed: Vec<bool> = results.iter().map(|r| r.changed).collect();
        assert_eq!(
            changed,
            [false, true, true, true],
            "a's labels are identical"
        );
        assert_eq!((rows(0).await, rows(1).await), (4, 11));
        assert!(backend
            .objects_upsert_fused(&clash)
            .await
            .unwrap()
            .is_none());
        assert_eq!((rows(0).await, rows(1).await), (4, 11));
        // Deletes in bulk: each object's tags, then the object; a missing one keeps them all.
        let delete = |ids: &[&str]| Batch {
            preconditions: Vec::new(),
            now: Timestamp(9),
            ops: ids
                .iter()
                .map(|id| Op::ObjectDelete {
                    key: ObjectKey::new("default", "job", *id).unwrap(),
                })
                .collect(),
        };
        assert!(backend
            .objects_delete_fused(&delete(&["a", "nope"]))
            .await
            .unwrap()
            .is_none());
        assert_eq!((rows(0).await, rows(1).await), (4, 11));
        let results = backend
            .objects_delete_fused(&delete(&["a", "new"]))
            .await
            .unwrap()
            .expect("deletes of existing objects take the fused path");
        assert_eq!(results.len(), 2);
        assert_eq!(
            (rows(0).await, rows(1).await),
            (2, 15),
            "2 tags and 2 objects went"
        );
        drop(client);
        drop(backend);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Selector SQL varies per selector; it is never prepared as a named statement, so the
    /// server-side statement cache of a connection does not grow with the selectors used.
    #[tokio::test]
    async fn selector_queries_are_not_cached() {
        let (backend, base, schema) = test_backend(1).await;
        let now = Timestamp(0);
        backend.count("kind = warmup", now).await.unwrap();
        let prepared = |client: PooledClient| async move {
            let n: i64 = client
                .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
                .await
                .unwrap()
                .get(0);
            n
        };
        let before = prepared(backend.client().await.unwrap()).await;
        for i in 0..20 {
            let sel = format!("kind = machine and tag(t{i}).x > {i}");
            backend.select(&sel, now, None, 10).await.unwrap();
            backend.count(&sel, now).await.unwrap();
        }
        let after = prepared(backend.client().await.unwrap()).await;
        // The count query itself is prepared (unnamed statements are not listed).
        assert!(after <= before + 1, "{before} -> {after}");
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Claim statements are prepared per connection, but their cache stays bounded whatever
    /// selectors callers send.
    #[tokio::test]
    async fn claim_statement_cache_is_bounded() {
        let (backend, base, schema) = test_backend(1).await;
        let n = sql::STATEMENTS_CACHED_MAX + 50;
        for i in 0..n {
            let req = ClaimRequest {
                session_id: "no-such-session".into(),
                process: "P".into(),
                target: fleetdb_core::work::ClaimTarget::Selector(format!("has(t{i})")),
                limit: 1,
                now: Timestamp(0),
            };
            // Prepared, then refused: the session does not exist.
            let r = backend.claim(req).await;
            assert!(matches!(r, Err(Error::SessionExpired { .. })), "{r:?}");
        }
        let client = backend.client().await.unwrap();
        let prepared: i64 = client
            .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            (prepared as usize) <= sql::STATEMENTS_CACHED_MAX + 1,
            "{prepared} statements prepared after {n} distinct selectors"
        );
        assert!(client.statement_cache.size() <= sql::STATEMENTS_CACHED_MAX);
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Rows every node of an `EXPLAIN ANALYZE` text plan produced (`rows` × `loops` of each
    /// node's actual figures), summed over the tree.
    /// A claim of up to `limit` of [`seed_eligible`]'s jobs for process `P` at time 0.
    fn eligible_jobs(limit: usize) -> fleetdb_core::backend::CandidateQuery {
        fleetdb_core::backend::CandidateQuery {
            selector: Selector::parse("kind = job and has(eligible)").unwrap(),
            process: "P".into(),
            exclude: Vec::new(),
            now: Timestamp(0),
            limit,
        }
    }

    /// The lines of `EXPLAIN ANALYZE` of `sql` run with `params`.
    async fn explain_analyze(
        client: &deadpool_postgres::Client,
        sql: &str,
        params: &work::TypedParams,
    ) -> Plan {
        let stmt = client
            .prepare(&format!("EXPLAIN ANALYZE {sql}"))
            .await
            .unwrap();
        let rows = client.query(&stmt, &params.values()).await.unwrap();
        Plan::of(&rows)
    }

    /// An `EXPLAIN ANALYZE` output: its text, and the rows its nodes read in all.
    struct Plan {
        text: String,
        rows: u64,
    }

    impl Plan {
        fn of(rows: &[tokio_postgres::Row]) -> Plan {
            let lines: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            Plan {
                rows: plan_rows(&lines),
                text: lines.join("\n"),
            }
        }
    }

    /// `n` objects `default/job/j<number, zero-padded to width>` with an `eligible` tag, a live
    /// session `s` and a declared process `P`.
    async fn seed_eligible(client: &deadpool_postgres::Client, n: u32, width: u32) {
        client
            .batch_execute(&format!(
                "INSERT INTO objects (namespace, kind, id, labels, created_at, updated_at, revision) \
                 SELECT 'default', 'job', 'j' || lpad(g::text, {width}, '0'), '{{}}', 0, 0, g \
                 FROM generate_series(1, {n}) g; \
                 INSERT INTO tags (namespace, kind, id, name, value, updated_at, revision) \
                 SELECT 'default', 'job', 'j' || lpad(g::text, {width}, '0'), 'eligible', 'true', 0, g \
                 FROM generate_series(1, {n}) g; \
                 INSERT INTO sessions (id, component, host, runtime_info, ttl_ms, created_at, deadline) \
                 VALUES ('s', 'test', 'h', '', 1000, 0, 1000000); \
                 INSERT INTO processes (name, conflicts, created_at) VALUES ('P', '[]', 0);"
            ))
            .await
            .unwrap();
    }

    fn plan_rows(lines: &[String]) -> u64 {
        let field = |line: &str, name: &str| -> Option<u64> {
            let at = line.find(name)? + name.len();
            let digits: String = line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        };
        lines
            .iter()
            .filter_map(|l| {
                let actual = &l[l.find("(actual")?..];
                Some(field(actual, "rows=")? * field(actual, "loops=")?)
            })
            .sum()
    }

    /// The claim's re-check after locking is driven by the locked keys: with thousands of
    /// eligible objects and no statistics (this machine's PostgreSQL never analyzes), checking
    /// one locked key touches a handful of rows, not the selector's whole tag index.
    #[tokio::test]
    async fn claim_recheck_reads_only_the_locked_keys() {
        let (backend, base, schema) = test_backend(1).await;
        let client = backend.client().await.unwrap();
        seed_eligible(&client, 3000, 5).await;
        let q = eligible_jobs(1);
        hand_over(&client, r#"[{"ns":"default","kind":"job","id":"j02999"}]"#).await;
        let (take, params) = work::claim_take_sql(&q, one_slot(), work::Take::Takeover, false);
        let plan = explain_analyze(&client, &take, &params).await;
        assert!(plan.text.contains("Insert on work "), "{}", plan.text);
        let total = plan.rows;
        assert!(total < 50, "the re-check read {total} rows:\n{}", plan.text);
        let taken: i64 = client
            .query_one("SELECT count(*) FROM work WHERE id = 'j02999'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(taken, 1, "the take took the locked key");
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A lean take ([`work::Take::Lean`]) never writes over a claim row a dead session still
    /// holds: its insert fails on `work_pkey`, a failure the claim retries, and nothing of it
    /// is kept; the takeover take then replaces the row, after its `Expired` history.
    #[tokio::test]
    async fn a_lean_take_leaves_a_dead_sessions_claim_to_the_takeover() {
        let (backend, base, schema) = test_backend(1).await;
        let client = backend.client().await.unwrap();
        seed_eligible(&client, 3, 1).await;
        seed_dead_claim(&client, "j2", 7).await;
        let q = eligible_jobs(1);
        let history = || async {
            let rows = client
                .query(
                    "SELECT event, session_id FROM work_history WHERE id = 'j2' ORDER BY seq",
                    &[],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|r| format!("{}:{}", r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
        };
        let holder = || async {
            let row = client
                .query_one("SELECT session_id FROM work WHERE id = 'j2'", &[])
                .await
                .unwrap();
            row.get::<_, String>(0)
        };
        client.batch_execute("BEGIN").await.unwrap();
        hand_over(&client, r#"[{"ns":"default","kind":"job","id":"j2"}]"#).await;
        let (lean, params) = work::claim_take_sql(&q, one_slot(), work::Take::Lean, false);
        let err = client.query(&lean, &params.values()).await.unwrap_err();
        assert!(
            matches!(classify(&err), Failure::Retry(ref m) if m.contains("work_pkey")),
            "{err}"
        );
        client.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(holder().await, "dead");
        assert!(history().await.is_empty(), "the failed take wrote history");

        hand_over(&client, r#"[{"ns":"default","kind":"job","id":"j2"}]"#).await;
        let (takeover, params) = work::claim_take_sql(&q, one_slot(), work::Take::Takeover, false);
        let rows = client.query(&takeover, &params.values()).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(holder().await, "s");
        assert_eq!(history().await, ["Expired:dead", "Started:s"]);
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A takeover whose dead row is deleted while it runs (the sweeper, or the dead holder's late
    /// finish) inserts a row of its own: it never answers a claim without its work row (which
    /// let the next claim take the object again: two workers on one job).
    #[tokio::test]
    async fn a_takeover_whose_dead_row_goes_meanwhile_still_holds_its_claim() {
        // The sweep deletes the dead claim; it has not committed when the take starts.
        let (_backend, base, schema, client, sweeper) = dead_claim_being_deleted(2).await;
        hand_over(&client, r#"[{"ns":"default","kind":"job","id":"j2"}]"#).await;
        let q = eligible_jobs(1);
        let (takeover, params) = work::claim_take_sql(&q, one_slot(), work::Take::Takeover, false);
        let take = async { client.query(&takeover, &params.values()).await.unwrap() };
        let (rows, ()) = tokio::join!(take, commit_once_someone_waits(&sweeper));
        assert_eq!(rows.len(), 1, "the take answered its claim");
        let held: Vec<(String, i64)> = client
            .query("SELECT session_id, token FROM work WHERE id = 'j2'", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let token: i64 = rows[0].get(3);
        assert_eq!(
            held,
            [("s".to_string(), token)],
            "the claim it answered is held"
        );
        let events = history_events(&client, "j2").await;
        assert_eq!(
            events,
            ["Started"],
            "the deleter, not the take, records the expiry"
        );
        drop((client, sweeper));
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Jobs j1..j3, a dead session's claim of j2, and a second connection (returned last) in a
    /// transaction that has deleted that claim and not committed (a sweep, or the dead
    /// holder's late finish, in flight).
    async fn dead_claim_being_deleted(
        pool: usize,
    ) -> (
        PostgresBackend,
        String,
        String,
        deadpool_postgres::Client,
        deadpool_postgres::Client,
    ) {
        let (backend, base, schema) = test_backend(pool).await;
        let client = backend.client().await.unwrap();
        let deleter = backend.client().await.unwrap();
        seed_eligible(&client, 3, 1).await;
        seed_dead_claim(&client, "j2", 7).await;
        deleter
            .batch_execute("BEGIN; DELETE FROM work WHERE id = 'j2'")
            .await
            .unwrap();
        (backend, base, schema, client, deleter)
    }

    /// The history events of job `id`, oldest first.
    async fn history_events(client: &deadpool_postgres::Client, id: &str) -> Vec<String> {
        client
            .query(
                "SELECT event FROM work_history WHERE id = $1 ORDER BY seq",
                &[&id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// `COMMIT` on `conn` (in a transaction) once another backend waits for one of its locks,
    /// or after 2 s without (a build whose statement does not wait: the test then fails on its
    /// outcome, not by hanging). (`pg_locks` is read live; `pg_stat_activity` would be the
    /// transaction's first snapshot.)
    async fn commit_once_someone_waits(conn: &deadpool_postgres::Client) {
        for _ in 0..400 {
            let waiting: i64 = conn
                .query_one(
                    "SELECT count(*) FROM pg_locks \
                     WHERE NOT granted AND pg_backend_pid() = ANY (pg_blocking_pids(pid))",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        conn.batch_execute("COMMIT").await.unwrap();
    }

    /// A claim row whose session is gone (a claim racing a close of its own session) is
    /// released by a sweep, with `Expired` history, and the object is claimed as usual.
    #[tokio::test]
    async fn a_sweep_releases_claims_whose_session_is_gone() {
        // Two connections: the test holds one, the sweep takes the other.
        let (backend, base, schema) = test_backend(2).await;
        let client = backend.client().await.unwrap();
        seed_eligible(&client, 2, 1).await;
        client
            .execute(
                "INSERT INTO work (namespace, kind, id, process, session_id, token, started_at) \
                 VALUES ('default', 'job', 'j1', 'P', 'closed', 5, 0)",
                &[],
            )
            .await
            .unwrap();
        let swept = backend.session_sweep(Timestamp(500), 100).await.unwrap();
        assert_eq!((swept.sessions, swept.expired), (0, vec!["P".to_string()]));
        let left: i64 = client
            .query_one("SELECT count(*) FROM work", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "the orphan was released");
        let h = client
            .query_one(
                "SELECT event, session_id, token, cause FROM work_history WHERE id = 'j1'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            (
                h.get::<_, String>(0),
                h.get::<_, String>(1),
                h.get::<_, i64>(2),
                h.get::<_, Option<String>>(3)
            ),
            (
                "Expired".into(),
                "closed".into(),
                5,
                Some("session gone".into())
            )
        );
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A tag set of the value a tag has, while a finish deletes that tag READ COMMITTED (which
    /// SERIALIZABLE's conflict checks do not see), is not judged a no-op on the deleted row: its
    /// locked read fails ("concurrent delete"), it retries, and the tag holds the value set.
    #[tokio::test]
    async fn a_tag_set_racing_a_finishs_delete_of_the_tag_is_not_lost() {
        let (backend, base, schema) = test_backend(3).await;
        let client = backend.client().await.unwrap();
        let finisher = backend.client().await.unwrap();
        seed_eligible(&client, 1, 1).await;
        finisher
            .batch_execute(
                "BEGIN ISOLATION LEVEL READ COMMITTED; \
                 DELETE FROM tags WHERE id = 'j1' AND name = 'eligible'",
            )
            .await
            .unwrap();
        let set = backend.commit(Batch {
            preconditions: Vec::new(),
            ops: vec![fleetdb_core::Op::TagSet {
                key: ObjectKey::new("default", "job", "j1").unwrap(),
                name: "eligible".into(),
                value: "true".into(),
            }],
            now: Timestamp(10),
        });
        let (set, ()) = tokio::join!(set, commit_once_someone_waits(&finisher));
        set.unwrap();
        let held: Vec<String> = client
            .query("SELECT value FROM tags WHERE id = 'j1'", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(held, ["true"], "the set after the delete holds");
        drop((client, finisher));
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A claim of one object whose dead holder's row is deleted while it runs (the sweeper, or
    /// the holder's late finish) does not expire it again: the row is read locked, so the claim
    /// sees it gone and writes no second `Expired` (nor an `Expired` after a `Finished`).
    #[tokio::test]
    async fn a_claim_of_one_object_does_not_expire_a_row_deleted_meanwhile() {
        let (backend, base, schema, client, sweeper) = dead_claim_being_deleted(3).await;
        let key = ObjectKey::new("default", "job", "j2").unwrap();
        let claim = async {
            backend
                .claim(ClaimRequest {
                    session_id: "s".into(),
                    process: "P".into(),
                    target: fleetdb_core::work::ClaimTarget::Object(key.clone()),
                    limit: 1,
                    now: Timestamp(500),
                })
                .await
                .unwrap()
        };
        let (got, ()) = tokio::join!(claim, commit_once_someone_waits(&sweeper));
        assert_eq!(got.work.len(), 1);
        let events = history_events(&client, "j2").await;
        assert_eq!(
            events,
            ["Started"],
            "the deleter, not the claim, records the expiry"
        );
        let holder: String = client
            .query_one("SELECT session_id FROM work WHERE id = 'j2'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(holder, "s");
        drop((client, sweeper));
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// The ids session `s` claims for process `P` with `kind = job and has(eligible)` at `now`
    /// (µs), in the order the claim returned them.
    async fn claimed_ids(backend: &PostgresBackend, limit: usize, now: i64) -> Vec<String> {
        let got = backend
            .claim(ClaimRequest {
                session_id: "s".into(),
                process: "P".into(),
                target: fleetdb_core::work::ClaimTarget::Selector(
                    "kind = job and has(eligible)".into(),
                ),
                limit,
                now: Timestamp(now),
            })
            .await
            .unwrap();
        got.work.into_iter().map(|w| w.key.id).collect()
    }

    /// Selector claims turn like a clock hand: each starts after the last candidate the previous
    /// one took, and wraps around to the start, so released candidates behind the hand wait for
    /// the next turn instead of being taken again first.
    #[tokio::test]
    async fn claims_turn_like_a_clock_hand() {
        // Two connections: the test holds one, claims take the other.
        let (backend, base, schema) = test_backend(2).await;
        let client = backend.client().await.unwrap();
        seed_eligible(&client, 10, 2).await;
        let claim = |limit: usize| claimed_ids(&backend, limit, 0);
        let release = |ids: &'static str| {
            let client = &client;
            async move {
                client
                    .batch_execute(&format!("DELETE FROM work WHERE id IN ({ids})"))
                    .await
                    .unwrap();
            }
        };
        assert_eq!(claim(3).await, ["j01", "j02", "j03"]);
        release("'j01', 'j02', 'j03'").await;
        assert_eq!(
            claim(3).await,
            ["j04", "j05", "j06"],
            "after the hand first"
        );
        release("'j04', 'j05', 'j06'").await;
        assert_eq!(claim(3).await, ["j07", "j08", "j09"]);
        // The end of the key space, then around to the start.
        assert_eq!(claim(3).await, ["j01", "j02", "j10"]);
        assert_eq!(claim(10).await, ["j03", "j04", "j05", "j06"]);
        assert!(claim(10).await.is_empty(), "everything is held");
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A candidate released behind the hand while claims keep finding candidates after it is
    /// taken by the first claim `SWEEP_MAX` after the last one that covered the key space.
    #[tokio::test]
    async fn a_candidate_behind_the_hand_waits_at_most_a_sweep() {
        let (backend, base, schema) = test_backend(2).await;
        let client = backend.client().await.unwrap();
        seed_eligible(&client, 10, 2).await;
        client
            .batch_execute("UPDATE sessions SET deadline = 1000000000000")
            .await
            .unwrap();
        let sweep = work::SWEEP_MAX.as_micros() as i64;
        let claim = |limit: usize, now: i64| claimed_ids(&backend, limit, now);
        assert_eq!(claim(2, 0).await, ["j01", "j02"]);
        client
            .batch_execute("DELETE FROM work WHERE id = 'j01'")
            .await
            .unwrap();
        assert_eq!(claim(2, sweep / 2).await, ["j03", "j04"]);
        assert_eq!(claim(2, sweep - 1).await, ["j05", "j06"], "after the hand");
        assert_eq!(claim(2, sweep).await, ["j01", "j07"], "from the start");
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// What find-and-lock leaves for check-and-take in its transaction, as the session's
    /// settings: `locked` (a JSON array of keys) found for the live session `s`.
    async fn hand_over(client: &deadpool_postgres::Client, locked: &str) {
        client
            .query(
                &format!(
                    "SELECT set_config('{}', $1, false), set_config('{}', '[\"s\"]', false)",
                    work::LOCKED_GUC,
                    work::ALIVE_GUC
                ),
                &[&locked],
            )
            .await
            .unwrap();
    }

    /// Step 2's slots for one claim of one object by session `s`.
    fn one_slot() -> String {
        work::slots_json(&[work::Slot {
            r: 0,
            sid: "s".into(),
            f: None,
            n: 1,
            at: Timestamp(0),
        }])
    }

    /// The tables a claim reads, analyzed by name: a bare `ANALYZE` would visit every schema of
    /// the test database, and deadlocked with a concurrent test dropping its schema.
    const ANALYZE_CLAIM_TABLES: &str =
        "ANALYZE objects, tags, work, work_backoff, sessions, processes;";

    /// A claim's two steps for `q` (find from the start of the hand, take of one key),
    /// prepared as `find` and `take` after `first` (say, [`ANALYZE_CLAIM_TABLES`]) with a claim's planner
    /// settings made the session's: their parameters, by name.
    async fn prepare_claim_steps(
        client: &deadpool_postgres::Client,
        q: &fleetdb_core::backend::CandidateQuery,
        first: &str,
    ) -> [(&'static str, work::TypedParams); 2] {
        client
            .batch_execute(&sql::session_level(sql::CLAIM_PLANNED))
            .await
            .unwrap();
        let (find, find_params) = work::claim_lock_sql(q, &["s".to_string()], &work::hand_start());
        hand_over(client, r#"[{"ns":"default","kind":"job","id":"j02001"}]"#).await;
        // The take with the limit's machinery, the larger plan (the guards read past `room`).
        let (take, take_params) = work::claim_take_sql(q, one_slot(), work::Take::Takeover, true);
        client
            .batch_execute(&format!(
                "{first} PREPARE find AS {find}; PREPARE take AS {take}"
            ))
            .await
            .unwrap();
        [("find", find_params), ("take", take_params)]
    }

    /// `EXPLAIN ANALYZE` of the prepared statement `name` run with `params`, as one text.
    async fn explain_prepared(
        client: &deadpool_postgres::Client,
        name: &str,
        params: &work::TypedParams,
    ) -> String {
        explain_prepared_text(client, &format!("EXECUTE {name}({})", params.literals())).await
    }

    /// The hand bounds the leading tag's index scan itself: a claim from near the end of 3,000
    /// eligible objects reads the rows after the hand, not every row before it.
    #[tokio::test]
    async fn claim_find_starts_at_the_hand() {
        let (backend, base, schema) = test_backend(1).await;
        let client = backend.client().await.unwrap();
        seed_eligible(&client, 3000, 5).await;
        let q = eligible_jobs(10);
        let hand = ObjectKey::new("default", "job", "j02990").unwrap();
        let (find, params) = work::claim_lock_sql(&q, &["s".to_string()], &hand);
        let plan = explain_analyze(&client, &find, &params).await;
        let total = plan.rows;
        assert!(
            total < 200,
            "the find step read {total} rows:\n{}",
            plan.text
        );
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A candidate's backoff is one primary-key probe, however many objects are in backoff for
    /// the process, even with the generic plan a connection made while `work_backoff` was empty:
    /// with 2,000 of 3,000 eligible objects backed off, a claim must not scan the process's
    /// backoffs once per candidate (`work_backoff_process` is the wrong index for the probe:
    /// 380 ms for a claim of 10 here, 21 ms with the primary key).
    #[tokio::test]
    async fn claim_reads_one_backoff_row_per_candidate() {
        let (backend, base, schema) = test_backend(1).await;
        let client = backend.client().await.unwrap();
        // Prepared (and planned) while the tables are empty and analyzed so, as a new connection
        // may after a queue drained.
        let steps = prepare_claim_steps(&client, &eligible_jobs(10), ANALYZE_CLAIM_TABLES).await;
        let [(_, find_params), (_, take_params)] = &steps;
        client
            .batch_execute(&format!(
                "EXECUTE find({}); EXECUTE take({})",
                find_params.literals(),
                take_params.literals()
            ))
            .await
            .unwrap();
        client.batch_execute("DELETE FROM work").await.unwrap();
        seed_eligible(&client, 3000, 5).await;
        client
            .batch_execute(
                "INSERT INTO work_backoff (namespace, kind, id, process, until, cause, last_interval_s) \
                 SELECT 'default', 'job', 'j' || lpad(g::text, 5, '0'), 'P', 999999999, 'x', 1 \
                 FROM generate_series(1, 2000) g;",
            )
            .await
            .unwrap();
        // The find step passes the 2,000 backed-off candidates one by one (that is inherent);
        // each must cost one primary-key probe, not a scan of the process's backoffs.
        for (name, params) in &steps {
            let plan = explain_prepared(&client, name, params).await;
            assert!(plan.contains("on work_backoff "), "{name}:\n{plan}");
            let unkeyed =
                unkeyed_scans(&without_room(&plan), &["work", "work_backoff", "sessions"]);
            assert_eq!(unkeyed, Vec::<String>::new(), "{name}:\n{plan}");
        }
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// Whether a candidate is held is a probe of `work` by the candidate's key, whatever the
    /// statistics: with a few live sessions and work rows, a generic plan drove the probe from
    /// the live sessions (`sessions_deadline`) into `work_session`, reading every work row each
    /// live session ever held, dead ones included (this machine's PostgreSQL never vacuums), once
    /// per candidate: ~3,000 buffers for a claim of one in the one-at-a-time benchmark.
    #[tokio::test]
    async fn claim_probes_work_by_the_candidate_key() {
        let (backend, base, schema) = test_backend(1).await;
        let client = backend.client().await.unwrap();
        seed_eligible(&client, 3000, 5).await;
        // Eight live sessions; `s` held (and finished) 2,000 jobs, and holds the first eight.
        client
            .batch_execute(&format!(
                "INSERT INTO sessions (id, component, host, runtime_info, ttl_ms, created_at, deadline) \
                 SELECT 's' || g, 'test', 'h', '', 1000, 0, 1000000 FROM generate_series(1, 7) g; \
                 INSERT INTO work (namespace, kind, id, process, session_id, token, started_at) \
                 SELECT 'default', 'job', 'j' || lpad(g::text, 5, '0'), 'P', 's', g, 0 \
                 FROM generate_series(1, 2000) g; \
                 DELETE FROM work WHERE id > 'j00008'; {ANALYZE_CLAIM_TABLES}"
            ))
            .await
            .unwrap();
        let steps = prepare_claim_steps(&client, &eligible_jobs(1), "").await;
        for (name, params) in &steps {
            let plan = explain_prepared(&client, name, params).await;
            assert!(plan.contains("on work "), "{name}:\n{plan}");
            let unkeyed =
                unkeyed_scans(&without_room(&plan), &["work", "work_backoff", "sessions"]);
            assert_eq!(unkeyed, Vec::<String>::new(), "{name}:\n{plan}");
        }
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// `plan` (EXPLAIN ANALYZE text) without the take's `room` CTE: the count of a limited
    /// process's live claims, which reads every claim of the process by design and runs only for
    /// a limited process. The claims these plans are made for are of unlimited processes: the
    /// count must not have run.
    fn without_room(plan: &str) -> String {
        let (mut out, mut inside) = (Vec::new(), None);
        for line in plan.lines() {
            let indent = line.len() - line.trim_start().len();
            match inside {
                Some(depth) if indent > depth => {
                    assert!(
                        !line.contains("Aggregate") || line.contains("never executed"),
                        "an unlimited process's claim counted its live claims:\n{plan}"
                    );
                    continue;
                }
                _ => inside = None,
            }
            if line.trim_start().starts_with("CTE room") {
                inside = Some(indent);
                continue;
            }
            out.push(line);
        }
        out.join("\n")
    }

    /// The scans of `tables` in `plan` (EXPLAIN text) that do not reach their rows by key: a
    /// sequential scan, an index scan whose condition does not fix both the index's leading
    /// column and the `id` by equality (it reads the whole index, or every entry of a process),
    /// or a scan through an index that is not led by a key (`work_session`, `sessions_deadline`). Each is a read of every row of a range (a
    /// process's claims, the live sessions) where one probe was meant.
    fn unkeyed_scans(plan: &str, tables: &[&str]) -> Vec<String> {
        // The leading column of each index of the claim tables that is led by a key.
        const LEADS: &[(&str, &str)] = &[
            ("work_pkey", "id"),
            ("work_process", "process"),
            ("work_backoff_pkey", "id"),
            ("work_backoff_process", "process"),
            ("sessions_pkey", "id"),
        ];
        let lines: Vec<&str> = plan.lines().collect();
        let mut unkeyed = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let on = |w: &str| words.iter().position(|x| *x == w);
            // (index, table) of an index scan; a sequential scan has no index.
            let (index, table) = if let Some(u) = on("using") {
                (Some(words[u + 1]), words.get(u + 3).copied())
            } else if line.contains("Bitmap Index Scan on ") {
                // The table is the longest one whose name and `_` start the index's.
                let index = words[on("on").unwrap() + 1];
                let table = tables
                    .iter()
                    .copied()
                    .filter(|t| index.starts_with(&format!("{t}_")))
                    .max_by_key(|t| t.len());
                (Some(index), table)
            } else if line.contains("Seq Scan on ") {
                (None, words.get(on("on").unwrap() + 1).copied())
            } else {
                continue;
            };
            let Some(table) = table.filter(|t| tables.contains(t)) else {
                continue;
            };
            let lead = index.and_then(|x| LEADS.iter().find(|(n, _)| *n == x).map(|(_, c)| *c));
            let keyed = lead.is_some_and(|lead| {
                lines[i + 1..]
                    .iter()
                    .take_while(|l| !l.contains("->"))
                    .filter(|l| l.contains("Index Cond:"))
                    .any(|l| l.contains(&format!("({lead} = ")) && l.contains("(id = "))
            });
            if !keyed {
                unkeyed.push(format!("{} [{table}]", line.trim()));
            }
        }
        unkeyed
    }

    #[test]
    fn durability_warnings_name_each_setting_that_lets_a_crash_undo_commits() {
        let warn = |f: &str, p: &str, c: &str| durability_warnings(&[f.into(), p.into(), c.into()]);
        for level in ["on", "local", "remote_write", "remote_apply"] {
            assert!(warn("on", "on", level).is_empty(), "{level}");
        }
        let each = [
            (warn("off", "on", "on"), "fsync = off"),
            (warn("on", "off", "on"), "full_page_writes = off"),
            (warn("on", "on", "off"), "synchronous_commit = off"),
        ];
        for (warned, setting) in each {
            assert_eq!(warned.len(), 1, "{warned:?}");
            assert!(warned[0].contains(setting), "{warned:?}");
        }
        assert_eq!(warn("off", "off", "off").len(), 3);
    }

    #[test]
    fn unkeyed_scans_names_the_scans_without_a_key_condition() {
        let plan = "Nested Loop\n\
            ->  Bitmap Heap Scan on work w_1  (cost=1 rows=1)\n\
                  Recheck Cond: (process = k.p)\n\
                  ->  Bitmap Index Scan on work_process\n\
                        Index Cond: (process = k.p)\n\
            ->  Index Scan using work_pkey on work w_2\n\
                  Index Cond: ((namespace = k.ns) AND (kind = k.kind) AND (id = k.id))\n\
            ->  Index Scan using work_backoff_process on work_backoff b\n\
                  Index Cond: ((namespace = k.ns) AND (kind = k.kind) AND (id = k.id))\n\
            ->  Index Scan using work_backoff_process on work_backoff b\n\
                  Index Cond: ((process = $5) AND (namespace = k.ns) AND (kind = k.kind) AND (id = k.id))\n\
            ->  Index Scan using sessions_pkey on sessions s\n\
            ->  Index Scan using sessions_deadline on sessions s\n\
                  Index Cond: (deadline > $2)\n\
            ->  Seq Scan on sessions s\n\
            ->  Tid Scan on work_backoff b\n\
                  TID Cond: (ctid = ANY ($1))\n\
            ->  CTE Scan on wr";
        let unkeyed = unkeyed_scans(plan, &["work", "work_backoff", "sessions"]);
        let expected = [
            "Bitmap Index Scan on work_process [work]",
            "work_backoff_process on work_backoff b [work_backoff]",
            "sessions_pkey on sessions s [sessions]",
            "sessions_deadline on sessions s [sessions]",
            "Seq Scan on sessions s [sessions]",
        ];
        assert_eq!(unkeyed.len(), expected.len(), "{unkeyed:#?}");
        for (u, e) in unkeyed.iter().zip(expected) {
            assert!(u.contains(e), "{u} vs {e}");
        }
    }

    /// A finish and a claim's take reach each claim, backoff and session they read by its key,
    /// whatever plan a connection made while the tables were empty: with the per-process indexes
    /// led by the process alone, each finish and take read every claim the process ever had
    /// (536 index entries and 30 heap pages per probe after 3,000 jobs of the one-at-a-time
    /// benchmark), and the live sessions were read in full (`sessions_deadline`, or a whole
    /// `sessions_pkey` scan under a join) for each finish and take.
    #[tokio::test]
    async fn finish_and_take_probe_rows_by_key() {
        let (backend, base, schema) = test_backend(1).await;
        let client = backend.client().await.unwrap();
        let steps = prepare_claim_steps(&client, &eligible_jobs(1), ANALYZE_CLAIM_TABLES).await;
        let [_, (_, take_params)] = &steps;
        let groups = r#"'[{"g":0,"sid":"s","event":"Finished"}]'"#;
        let tags =
            r#"'[{"n":0,"g":0,"ns":"default","kind":"job","id":"j00001","name":"eligible"}]'"#;
        let works = r#"'[{"n":1,"g":0,"ns":"default","kind":"job","id":"j00001","p":"P","token":1,"fin":true}]'"#;
        // Planned now, while every table is empty (and analyzed so).
        client
            .batch_execute(&format!(
                "PREPARE fin(text, bigint, text, text) AS {}; \
                 EXECUTE fin('[]', 0, '[]', '[]'); EXECUTE take({})",
                finish::SQL,
                take_params.literals()
            ))
            .await
            .unwrap();
        seed_eligible(&client, 3000, 5).await;
        // Eight live sessions; `s` held (and finished) 2,000 jobs of P and holds j00001; 2,000
        // objects are backed off for P, and so is j00001.
        client
            .batch_execute(
                "INSERT INTO sessions (id, component, host, runtime_info, ttl_ms, created_at, deadline) \
                 SELECT 's' || g, 'test', 'h', '', 1000, 0, 1000000 FROM generate_series(1, 7) g; \
                 INSERT INTO work (namespace, kind, id, process, session_id, token, started_at) \
                 SELECT 'default', 'job', 'j' || lpad(g::text, 5, '0'), 'P', 's', g, 0 \
                 FROM generate_series(1, 2000) g; \
                 DELETE FROM work WHERE id > 'j00001'; \
                 INSERT INTO work_backoff (namespace, kind, id, process, until, cause, last_interval_s) \
                 SELECT 'default', 'job', 'j' || lpad(g::text, 5, '0'), 'P', 999999999, 'x', 1 \
                 FROM generate_series(1001, 3000) g UNION ALL \
                 SELECT 'default', 'job', 'j00001', 'P', 1, 'x', 1;",
            )
            .await
            .unwrap();
        let finish = explain_prepared_text(
            &client,
            &format!("EXECUTE fin({groups}, 0, {tags}, {works})"),
        )
        .await;
        assert!(finish.contains("Delete on work "), "{finish}");
        let tables = ["work", "work_backoff", "sessions"];
        assert_eq!(
            unkeyed_scans(&finish, &tables),
            Vec::<String>::new(),
            "{finish}"
        );
        let finished: i64 = client
            .query_one("SELECT count(*) FROM work", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(finished, 0, "the finish released the claim:\n{finish}");
        let take = explain_prepared(&client, "take", take_params).await;
        assert!(take.contains("Insert on work "), "{take}");
        assert_eq!(
            unkeyed_scans(&without_room(&take), &tables),
            Vec::<String>::new(),
            "{take}"
        );
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A claim of many reads what it must once per claim, not once per candidate: the find
    /// aggregates its candidates once (its answer, the count and the setting for the take named
    /// the aggregate three times, and each was an initplan run anew), and the take probes the
    /// claiming session once (it probed it per candidate, and again per candidate for the
    /// history's component and host: 100 session probes for a claim of 50).
    #[tokio::test]
    async fn a_claim_of_many_reads_its_session_and_candidates_once() {
        let (backend, base, schema) = test_backend(1).await;
        let client = backend.client().await.unwrap();
        seed_eligible(&client, 200, 5).await;
        client
            .batch_execute(&sql::session_level(sql::CLAIM_PLANNED))
            .await
            .unwrap();
        let q = eligible_jobs(50);
        let (find, find_params) = work::claim_lock_sql(&q, &["s".to_string()], &work::hand_start());
        let plan = explain_analyze(&client, &find, &find_params).await.text;
        let scans_of_c = plan
            .lines()
            .filter(|l| l.contains("CTE Scan on c ") || l.trim_end().ends_with("CTE Scan on c"))
            .count();
        assert!(plan.contains("rows=50 loops=1"), "{plan}");
        assert_eq!(scans_of_c, 1, "the candidates are aggregated once:\n{plan}");
        let keys: Vec<serde_json::Value> = (1..=50)
            .map(|i| serde_json::json!({"ns": "default", "kind": "job", "id": format!("j{i:05}")}))
            .collect();
        hand_over(&client, &serde_json::Value::Array(keys).to_string()).await;
        let slots = work::slots_json(&[work::Slot {
            r: 0,
            sid: "s".into(),
            f: None,
            n: 50,
            at: Timestamp(0),
        }]);
        let (take, take_params) = work::claim_take_sql(&q, slots, work::Take::Takeover, false);
        let plan = explain_analyze(&client, &take, &take_params).await.text;
        assert!(plan.contains("Insert on work "), "{plan}");
        // Probes that ran (a holder's session is probed only for a candidate someone holds).
        let session_probes: Vec<&str> = plan
            .lines()
            .filter(|l| l.contains(" on sessions") && !l.contains("never executed"))
            .collect();
        assert!(!session_probes.is_empty(), "{plan}");
        for probe in &session_probes {
            assert!(
                probe.contains("loops=1)"),
                "a session probed per candidate: {probe}\n{plan}"
            );
        }
        let taken: i64 = client
            .query_one("SELECT count(*) FROM work", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(taken, 50, "{plan}");
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// `EXPLAIN ANALYZE <execute>`, as one text.
    async fn explain_prepared_text(client: &deadpool_postgres::Client, execute: &str) -> String {
        let rows = client
            .query(&format!("EXPLAIN ANALYZE {execute}"), &[])
            .await
            .unwrap();
        Plan::of(&rows).text
    }

    #[test]
    fn the_hand_moves_to_the_last_key_in_scan_order() {
        let hands = work::ClaimHands::default();
        let hand = hands.hand("P", "q");
        let key = |id: &str| ObjectKey {
            namespace: "default".into(),
            kind: "job".into(),
            id: id.into(),
        };
        let locked = |ids: &[&str]| {
            serde_json::to_string(
                &ids.iter()
                    .map(|id| serde_json::json!({"ns": "default", "kind": "job", "id": id}))
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        };
        let t = Timestamp(0);
        assert_eq!(hand.get(t), work::hand_start());
        hand.advance(&work::hand_start(), &locked(&["a", "b"]), t);
        assert_eq!(hand.get(t), key("b"));
        // Wrapped: took "c" after the hand, then "a" from the start: the hand is at "a".
        hand.advance(&key("b"), &locked(&["a", "c"]), t);
        assert_eq!(hand.get(t), key("a"));
        // Nothing locked: the hand stays; other selectors and processes have their own.
        hand.advance(&key("a"), "[]", t);
        assert_eq!(hands.hand("P", "q").get(t), key("a"));
        assert_eq!(hands.hand("Q", "q").get(t), work::hand_start());
        assert_eq!(hands.hand("P", "other").get(t), work::hand_start());
    }

    /// Claims that never wrap (new candidates keep coming after the hand) still start at the
    /// start once `SWEEP_MAX` has passed since one covered the whole key space, and only one
    /// claim does; a claim that wraps, starts at the start or finds nothing counts as covering it.
    #[test]
    fn a_hand_that_has_not_swept_for_a_while_starts_at_the_start() {
        let hand = work::Hand::default();
        let key = |id: &str| ObjectKey {
            namespace: "default".into(),
            kind: "job".into(),
            id: id.into(),
        };
        let at = |ms: i64| Timestamp(ms * 1000);
        let sweep = work::SWEEP_MAX.as_millis() as i64;
        assert_eq!(hand.get(at(0)), work::hand_start());
        hand.advance_to(&work::hand_start(), &[key("a")], at(0));
        // Claims that take keys after the hand only: no sweep.
        hand.advance_to(&key("a"), &[key("b")], at(sweep / 2));
        hand.advance_to(&key("b"), &[key("c")], at(sweep - 1));
        assert_eq!(hand.get(at(sweep - 1)), key("c"));
        // SWEEP_MAX after the claim that started at the start: this claim starts there, the one
        // beside it at the hand.
        assert_eq!(hand.get(at(sweep)), work::hand_start());
        assert_eq!(hand.get(at(sweep)), key("c"));
        // A claim that wrapped (took "a" up to its start "c") is a sweep too.
        hand.advance_to(&key("c"), &[key("d"), key("a")], at(sweep + 500));
        assert_eq!(hand.get(at(2 * sweep + 499)), key("a"));
        assert_eq!(hand.get(at(2 * sweep + 500)), work::hand_start());
        // So is a claim that found nothing.
        hand.advance_to(&key("a"), &[], at(3 * sweep));
        assert_eq!(hand.get(at(4 * sweep - 1)), key("a"));
        // A clock that goes back (less than SWEEP_MAX: concurrent claims' times) never starts a
        // sweep early.
        assert_eq!(hand.get(at(3 * sweep - sweep / 2)), key("a"));
    }

    /// The store's clock stepped back (on PostgreSQL the server's clock, which `ServerClock`
    /// follows when it is stepped): the last sweep's time then lay in the future, and every
    /// claim that wrapped kept it there (the later of the two times), so no claim started at the
    /// start until the clock had caught up with it. A candidate behind the hand, while new ones
    /// kept coming after it, waited as long as the step (an hour) instead of `SWEEP_MAX`.
    #[test]
    fn a_hand_still_sweeps_after_the_clock_stepped_back() {
        let hand = work::Hand::default();
        let key = |id: &str| ObjectKey {
            namespace: "default".into(),
            kind: "job".into(),
            id: id.into(),
        };
        let at = |ms: i64| Timestamp(ms * 1000);
        let sweep = work::SWEEP_MAX.as_millis() as i64;
        let hour = 3_600_000;
        assert_eq!(hand.get(at(hour)), work::hand_start());
        hand.advance_to(&work::hand_start(), &[key("a")], at(hour));
        // Stepped back an hour; claims keep taking keys after the hand.
        hand.advance_to(&key("a"), &[key("b")], at(0));
        hand.advance_to(&key("b"), &[key("c")], at(sweep / 2));
        // SWEEP_MAX or more from the last sweep, backwards: this claim starts at the start.
        assert_eq!(hand.get(at(sweep)), work::hand_start());
        assert_eq!(hand.get(at(sweep)), key("c"));
        // It wrapped: a sweep at the new time, and the next one SWEEP_MAX after it.
        hand.advance_to(&work::hand_start(), &[key("a")], at(sweep));
        assert_eq!(hand.get(at(2 * sweep - 1)), key("a"));
        assert_eq!(hand.get(at(2 * sweep)), work::hand_start());
    }

    /// The fused finish runs with a generic plan made once per connection, maybe while the tables
    /// were empty: that plan must reach every row by key, never by a sequential scan that would
    /// read the grown table on every run.
    #[tokio::test]
    async fn finish_plan_made_on_empty_tables_scans_nothing() {
        let (backend, base, schema) = test_backend(1).await;
        let client = backend.client().await.unwrap();
        // The transaction settings of a finish, for the whole session.
        let settings = sql::session_level(sql::CLAIM_PLANNED);
        client.batch_execute(&settings).await.unwrap();
        client
            .batch_execute(&format!("PREPARE f AS {}", finish::SQL))
            .await
            .unwrap();
        let run = "EXECUTE f('[{\"g\":0,\"sid\":\"s\",\"event\":\"Finished\"}]', 0, \
             '[{\"n\":0,\"g\":0,\"ns\":\"default\",\"kind\":\"job\",\"id\":\"j00001\",\"name\":\"eligible\"}]', \
             '[{\"n\":0,\"g\":0,\"ns\":\"default\",\"kind\":\"job\",\"id\":\"j00001\",\"p\":\"P\",\"token\":1,\"fin\":true}]')";
        client.batch_execute(run).await.unwrap();
        client
            .batch_execute(
                "INSERT INTO tags (namespace, kind, id, name, value, updated_at, revision) \
                 SELECT 'default', 'job', 'j' || lpad(g::text, 5, '0'), 'eligible', 'true', 0, g \
                 FROM generate_series(1, 3000) g; \
                 INSERT INTO work (namespace, kind, id, process, session_id, token, started_at) \
                 SELECT 'default', 'job', 'j' || lpad(g::text, 5, '0'), 'P', 's', g, 0 \
                 FROM generate_series(1, 3000) g;",
            )
            .await
            .unwrap();
        let rows = client
            .simple_query(&format!("EXPLAIN {run}"))
            .await
            .unwrap();
        let plan: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("Insert on work_history"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
        drop(client);
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// The World primitives: one revision per write, create revision kept across updates, every
    /// column round-trips, scans use the query's SQL.
    #[tokio::test]
    async fn world_rows_round_trip() {
        use fleetdb_core::backend::{ChangeDraft, TxRows};
        use fleetdb_core::world::{Space, WorldQuery, WorldRecord};
        use fleetdb_core::{ChangeFilter, ChangeOp, Entity};

        let (backend, base, schema) = test_backend(2).await;
        let draft = |id: &str, op: ChangeOp| ChangeDraft {
            namespace: ".kv".into(),
            kind: String::new(),
            id: id.into(),
            entity: Entity::Kv,
            name: String::new(),
            op,
            old_value: None,
            new_value: Some("{}".into()),
            at: Timestamp(5),
        };
        let mut rec = WorldRecord::new(Space::Kv, "k1", Timestamp(5));
        rec.data = vec![0, 1, 2, 255];
        rec.meta = Some("{\"a\":1}".into());
        rec.expires_at = Some(Timestamp(1_000));
        rec.scope = "s".into();

        let client = backend.client().await.unwrap();
        let mut rows = PgTx::new(&client);
        assert!(rows.world_read(Space::Kv, "k1").await.unwrap().is_none());
        let r1 = rows
            .world_put(&rec, &draft("k1", ChangeOp::Put))
            .await
            .unwrap();
        let mut other = WorldRecord::new(Space::Kv, "k2", Timestamp(6));
        other.session_id = Some("s1".into());
        let r2 = rows
            .world_put(&other, &draft("k2", ChangeOp::Put))
            .await
            .unwrap();
        let got = rows.world_read(Space::Kv, "k1").await.unwrap().unwrap();
        assert_eq!(
            got,
            WorldRecord {
                revision: r1,
                create_revision: r1,
                ..rec.clone()
            }
        );
        // An update keeps the create revision it is given.
        let mut updated = got.clone();
        updated.data = b"new".to_vec();
        updated.expires_at = None;
        updated.updated_at = Timestamp(9);
        let r3 = rows
            .world_put(&updated, &draft("k1", ChangeOp::Put))
            .await
            .unwrap();
        let got = rows.world_read(Space::Kv, "k1").await.unwrap().unwrap();
        assert_eq!((got.create_revision, got.revision), (r1, r3));
        assert_eq!((got.data.as_slice(), got.expires_at), (&b"new"[..], None));
        let mut q = WorldQuery::new(Space::Kv);
        q.key_prefix = Some("k".into());
        let keys: Vec<String> = rows
            .world_scan(&q)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(keys, ["k1", "k2"]);
        q.descending = true;
        q.limit = 1;
        assert_eq!(rows.world_scan(&q).await.unwrap()[0].revision, r2);
        let r4 = rows
            .world_remove(Space::Kv, "k2", &draft("k2", ChangeOp::Delete))
            .await
            .unwrap();
        let mut member = draft("s1", ChangeOp::Put);
        member.namespace = ".member".into();
        member.entity = Entity::Member;
        let r5 = rows.change_append(&member).await.unwrap();
        rows.commit().await.unwrap();
        drop(client);

        assert!(r1 < r2 && r2 < r3 && r3 < r4 && r4 < r5);
        let listed = backend
            .world_list(&WorldQuery::new(Space::Kv))
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].revision, r3);
        assert!(backend
            .world_list(&WorldQuery::new(Space::Map))
            .await
            .unwrap()
            .is_empty());
        let changes = backend
            .changes(Revision(0), &ChangeFilter::default(), 10)
            .await
            .unwrap();
        let revs: Vec<(Revision, Entity)> =
            changes.iter().map(|c| (c.revision, c.entity)).collect();
        assert_eq!(
            revs,
            [
                (r1, Entity::Kv),
                (r2, Entity::Kv),
                (r3, Entity::Kv),
                (r4, Entity::Kv),
                (r5, Entity::Member)
            ]
        );
        testing::drop_schema(&base, &schema).await.unwrap();
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?password=secret&a=b"),
            "postgres://u@h/db?password=***&a=b"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }
}
