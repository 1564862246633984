//! `fleetdb worker … -- CMD ARGS`: turns any program into a worker. It claims objects with one
//! session and runs CMD once per claimed object (up to `--concurrency` at once), heartbeating
//! meanwhile; CMD's exit status decides the outcome (0 finishes, anything else fails with the tail
//! of its stderr as the cause).
//!
//! What the worker promises about CMD (Unix; docs/cli.md):
//! - CMD runs in its own process group, so a signal meant for the worker (a terminal's Ctrl-C)
//!   reaches the worker alone, and whatever the worker sends reaches CMD's whole process tree.
//! - On Linux CMD dies with the worker (`PR_SET_PDEATHSIG`): a worker killed with SIGKILL leaves no
//!   command running on an object whose claim will expire and go to another worker.
//! - SIGTERM or SIGINT to the worker stops it: it claims nothing more, sends SIGTERM to a running
//!   CMD, gives it `--grace` to end (SIGKILL after), records the run (exit 0: `Finished`;
//!   otherwise `Canceled`, without backoff: the object is not at fault), cancels what it claimed
//!   but did not run, closes its session (releasing every claim at once) and exits 0. A second
//!   signal skips the grace.
//! - `--timeout`: a run longer than that gets SIGTERM, then SIGKILL after `--grace`, and fails
//!   with the cause "timed out after …" (and the backoff) unless it still exited 0.
//! - If the session is lost, CMD's process group is killed at once and the worker exits with
//!   `SessionExpired`: the claim may already be someone else's. A worker that cannot act (stopped
//!   by SIGSTOP or Ctrl-Z) has its watchdog ([`crate::watchdog`], Linux) kill CMD's group just
//!   before the session's deadline instead.
//! - CMD's stderr is passed through as it comes (with `--concurrency` above 1, line by line, each
//!   after its object); only its last [`CAUSE_TAIL_BYTES`] are kept.
//! - Recording a run's outcome is tried again while it fails transiently ([`record`]); a run whose
//!   outcome cannot be recorded (its session lost, the claim taken away) ends the worker with that
//!   error; the other runs' commands are killed and their claims cancelled.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use fleetdb::core::work::{tail_bytes, CAUSE_BYTES_MAX, RUNTIME_INFO_BYTES_MAX};
use fleetdb::{Backoff, Error, Fence, ObjectKey, Session, SessionSpec, Store, Work};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::watchdog::Watchdog;

/// The worker's own messages (`eprintln!` that never blocks nor panics; see [`say`]).
macro_rules! say {
    ($($t:tt)*) => {
        say::line(format!($($t)*))
    };
}

/// The worker's messages go to stderr from a thread of their own, through a queue of
/// [`say::QUEUE`] lines. The worker runs on one thread, which also renews its session: written
/// there, a message to a stderr whose reader had stalled (a full pipe) stopped the renewals, the
/// session expired, another worker took the object while this one's command still ran — and
/// this worker, stuck, could not kill it. A line that finds the queue full is dropped, and how
/// many were is said with the next one that fits. A stderr that is gone (a closed pipe) is
/// ignored: a panic would leave the claims held until the TTL.
mod say {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// Lines waiting for stderr at most.
    pub const QUEUE: usize = 1024;

    /// How long [`flush`] waits for the lines queued to be written.
    const FLUSH_WAIT: Duration = Duration::from_secs(1);

    enum Msg {
        Line(String),
        Flushed(std::sync::mpsc::Sender<()>),
    }

    static QUEUED: OnceLock<Option<SyncSender<Msg>>> = OnceLock::new();
    static DROPPED: AtomicU64 = AtomicU64::new(0);

    fn queue() -> Option<&'static SyncSender<Msg>> {
        QUEUED
            .get_or_init(|| {
                let (tx, rx) = sync_channel::<Msg>(QUEUE);
                let writer = std::thread::Builder::new()
                    .name("fleetdb-worker-stderr".into())
                    .spawn(move || {
                        for msg in rx {
                            match msg {
                                Msg::Line(l) => {
                                    let _ = writeln!(std::io::stderr(), "{l}");
                                }
                                Msg::Flushed(done) => {
                                    let _ = done.send(());
                                }
                            }
                        }
                    });
                writer.ok().map(|_| tx)
            })
            .as_ref()
    }

    /// Queue `text` for stderr; never waits.
    pub fn line(text: String) {
        let Some(tx) = queue() else {
            let _ = writeln!(std::io::stderr(), "{text}");
            return;
        };
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        let text = match dropped {
            0 => text,
            n => format!("worker: ({n} messages dropped: stderr was not read)\n{text}"),
        };
        match tx.try_send(Msg::Line(text)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(dropped + 1, Ordering::Relaxed);
            }
        }
    }

    /// Wait (at most [`FLUSH_WAIT`]) until the lines queued so far are written: before the
    /// process exits, which would end the writer with them.
    pub fn flush() {
        let Some(tx) = queue() else { return };
        let give_up = Instant::now() + FLUSH_WAIT;
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut msg = Msg::Flushed(done_tx);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < give_up => {
                    msg = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = done.recv_timeout(give_up.saturating_duration_since(Instant::now()));
    }
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Component name (recorded in sessions and history).
    #[arg(long)]
    component: String,
    /// Host name (default: this machine's, made to fit the name rule).
    #[arg(long)]
    host: Option<String>,
    /// The process to claim work for (declared with `fleetdb process define`).
    #[arg(long)]
    process: String,
    /// Which objects to work on.
    #[arg(long)]
    selector: String,
    /// Objects claimed at a time (those beyond free --concurrency slots wait, claimed, for one).
    #[arg(long, default_value_t = 1, value_parser = claim_limit)]
    limit: usize,
    /// Commands run at once (1 to 1024), each on its own claimed object, under one session.
    #[arg(long, default_value_t = 1, value_parser = concurrency)]
    concurrency: usize,
    /// Session TTL (1s to 1h).
    #[arg(long, default_value = "10s", value_parser = crate::world_cmd::session_ttl)]
    ttl: Duration,
    /// Backoff after a failure: INITIAL,MAX,EXPONENT[,JITTER].
    #[arg(long, default_value = "1s,10m,2", value_parser = parse_backoff)]
    backoff: Backoff,
    /// Longest a run of the command may take: then it gets SIGTERM (SIGKILL after --grace) and
    /// the run fails with "timed out". Default: no limit.
    #[arg(long, value_parser = positive_duration)]
    timeout: Option<Duration>,
    /// Time a command has to end after SIGTERM (the worker stopping, or --timeout) before it
    /// gets SIGKILL.
    #[arg(long, default_value = "10s", value_parser = bounded_duration)]
    grace: Duration,
    /// Claim once (without waiting), work what was claimed, and exit.
    #[arg(long)]
    once: bool,
    /// Delete work history older than this (e.g. 30d; all but the newest row), every second
    /// while the worker runs. Default: keep it all.
    #[arg(long, value_parser = positive_duration)]
    history_retention: Option<Duration>,
    /// Compact change-log entries older than this (e.g. 7d), every second while the worker runs.
    /// Default: keep them all (see `compact`).
    #[arg(long, value_parser = positive_duration)]
    change_retention: Option<Duration>,
    /// The program to run for each claimed object, with its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

impl WorkerArgs {
    /// The store's history and change-log retention (`--history-retention`,
    /// `--change-retention`), which its background task applies while the worker runs.
    pub(crate) fn retention(&self) -> (Option<Duration>, Option<Duration>) {
        (self.history_retention, self.change_retention)
    }
}

/// `--limit`: objects claimed at a time, 1 to `CLAIM_BATCH_MAX`.
fn claim_limit(s: &str) -> Result<usize, String> {
    crate::output::bounded_count(s, fleetdb::core::work::CLAIM_BATCH_MAX)
}

/// `--backoff`, checked while parsing so that the message names the flag and the value as typed.
fn parse_backoff(s: &str) -> Result<Backoff, String> {
    Backoff::parse(s).map_err(|e| match e {
        Error::Invalid { rule, .. } => rule,
        e => e.to_string(),
    })
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = bounded_duration(s)?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// Longest `--timeout` or `--grace`: longer ones would overflow the clock's deadlines.
const RUN_DURATION_MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn bounded_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > RUN_DURATION_MAX {
        return Err(format!(
            "must be at most {}",
            humantime::format_duration(RUN_DURATION_MAX)
        ));
    }
    Ok(d)
}

/// Most commands one worker runs at once.
const CONCURRENCY_MAX: usize = 1024;

fn concurrency(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=CONCURRENCY_MAX).contains(&n) => Ok(n),
        _ => Err(format!(
            "must be a whole number from 1 to {CONCURRENCY_MAX}"
        )),
    }
}

/// Bytes of a failed command's stderr kept as the failure cause.
const CAUSE_TAIL_BYTES: usize = 4096;

/// How long the worker waits, after its command exited, for the command's stderr to close (a
/// process the command left behind may hold it open).
const STDERR_LINGER: Duration = Duration::from_secs(1);

/// How often a running command's session is checked (it is killed once the session is lost).
const SESSION_CHECK: Duration = Duration::from_millis(200);

/// Where the worker is in stopping (signals to the worker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Working.
    No,
    /// The first SIGTERM or SIGINT: no new work; the running command gets SIGTERM and `--grace`.
    Drain,
    /// A second one: the running command gets SIGKILL now.
    Now,
}

/// How a run of the command ended.
enum Ended {
    /// It exited (on its own, or after a signal from the worker: `signalled` says why).
    Exited {
        status: ExitStatus,
        signalled: Option<Signalled>,
    },
    /// Waiting for it failed.
    WaitFailed(std::io::Error),
    /// The session was lost; the command was killed.
    SessionLost,
}

/// Why the worker signalled a running command.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Signalled {
    Stopping,
    TimedOut,
}

/// `fleetdb worker … -- CMD ARGS`: claim objects and run CMD for each, heartbeating meanwhile.
pub async fn worker(store: &Store, db_url: &str, a: WorkerArgs) -> Result<(), Error> {
    let backoff = a.backoff;
    fleetdb::core::selector::Selector::parse(&a.selector)?;
    // Signals are watched from the start, so one that comes while a command runs is handled, not
    // fatal (its default action would kill the worker and leave the command and the claim).
    let stop = watch_signals(a.grace)?;
    // Started before the session: no command runs without it.
    let watchdog =
        Arc::new(Watchdog::start().map_err(|e| {
            Error::Backend(format!("cannot start the worker's watchdog process: {e}"))
        })?);
    let host = a.host.clone().unwrap_or_else(default_host);
    let spec = SessionSpec::new(&a.component, &host)
        .runtime_info(runtime_info(std::process::id(), &a.command))
        .ttl(a.ttl);
    let session = store.session_start(spec).await?;
    watchdog.deadline(session.deadline(), store.clock().now());
    let _deadlines = AbortOnDrop(tokio::spawn(tell_deadlines(
        session.clone(),
        watchdog.clone(),
    )));
    say!(
        "worker: session {} ({} on {host}) claiming {} work",
        session.id(),
        a.component,
        a.process
    );
    let db_url = command_db_url(db_url);
    let worker = Worker {
        session: &session,
        db_url: &db_url,
        a: &a,
        backoff: &backoff,
        watchdog: &watchdog,
    };
    let result = worker.run(stop).await;
    if !session.is_expired() {
        let _ = session.clone().close().await;
    }
    if result.is_ok() {
        say!("worker: stopped; session {} closed", session.id());
    }
    say::flush();
    result
}

/// The worker's stop state, driven by SIGTERM and SIGINT.
fn watch_signals(grace: Duration) -> Result<watch::Receiver<Stop>, Error> {
    let install = |kind: SignalKind| {
        signal(kind).map_err(|e| Error::Backend(format!("cannot watch for signals: {e}")))
    };
    let (mut term, mut int) = (
        install(SignalKind::terminate())?,
        install(SignalKind::interrupt())?,
    );
    let (tx, rx) = watch::channel(Stop::No);
    tokio::spawn(async move {
        for stop in [Stop::Drain, Stop::Now] {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            match stop {
                Stop::Drain => say!(
                    "worker: {name}: stopping; a running command gets SIGTERM and {} to end \
                     (signal again to stop at once)",
                    humantime::format_duration(grace)
                ),
                _ => say!("worker: {name} again: stopping at once"),
            }
            if tx.send(stop).is_err() {
                return;
            }
        }
        // Later signals change nothing; keep them from killing the worker while it closes.
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    });
    Ok(rx)
}

/// A claim in flight.
type Claiming<'a> = Pin<Box<dyn Future<Output = fleetdb::Result<Vec<Work>>> + 'a>>;

/// One worker: its session and what it was told.
struct Worker<'a> {
    session: &'a Session,
    db_url: &'a str,
    a: &'a WorkerArgs,
    backoff: &'a Backoff,
    watchdog: &'a Watchdog,
}

impl Worker<'_> {
    /// Claims and runs until stopped (or, with `--once`, until one claim's objects are done): claims
    /// when nothing claimed waits to run and a slot is free; starts a run whenever a slot is free.
    async fn run(&self, mut stop: watch::Receiver<Stop>) -> Result<(), Error> {
        let (session, a) = (self.session, self.a);
        let mut waiting: VecDeque<Work> = VecDeque::new();
        let mut runs = FuturesUnordered::new();
        // The claim in flight is kept across turns (a run ending must not drop it: work it got
        // meanwhile would be cancelled, for nothing).
        let mut claiming: Option<Claiming<'_>> = None;
        if a.once {
            waiting.extend(session.claim(&a.process, &a.selector, a.limit).await?);
        }
        loop {
            let stopping = *stop.borrow() != Stop::No;
            if stopping {
                claiming = None;
                for mut w in waiting.drain(..) {
                    w.cancel().await?; // claimed, never run
                }
            }
            while runs.len() < a.concurrency {
                let Some(w) = waiting.pop_front() else { break };
                runs.push(self.run_one(w, stop.clone()));
            }
            if claiming.is_none()
                && !stopping
                && !a.once
                && waiting.is_empty()
                && runs.len() < a.concurrency
            {
                claiming = Some(Box::pin(session.claim_wait(
                    &a.process,
                    &a.selector,
                    a.limit,
                    Duration::from_secs(30),
                )));
            }
            if runs.is_empty() && claiming.is_none() {
                return Ok(()); // stopped, or --once done
            }
            tokio::select! {
                claimed = async { claiming.as_mut().expect("guarded").await }, if claiming.is_some() => {
                    claiming = None;
                    waiting.extend(claimed?);
                }
                ran = runs.next(), if !runs.is_empty() => {
                    // A failed run (its session lost, or its outcome not recorded) ends the worker; the
                    // other runs' commands are killed as their futures are dropped.
                    ran.expect("guarded")?;
                }
                _ = stop.changed(), if !stopping => {}
            }
        }
    }

    /// One run of the command on `w`, to its recorded outcome.
    async fn run_one(&self, mut w: Work, mut stop: watch::Receiver<Stop>) -> Result<(), Error> {
        let (session, a) = (self.session, self.a);
        let key = w.key().clone();
        say!("worker: {} {} (token {})", a.process, key, w.token());
        let mut cmd = Command::new(&a.command[0]);
        cmd.args(&a.command[1..])
            .env("FLEETDB_DB", self.db_url)
            .env("FLEETDB_NAMESPACE", &key.namespace)
            .env("FLEETDB_KIND", &key.kind)
            .env("FLEETDB_ID", &key.id)
            .env("FLEETDB_PROCESS", &a.process)
            .env("FLEETDB_TOKEN", w.token().to_string())
            .env("FLEETDB_SESSION", session.id())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = spawn_in_own_group(cmd, self.watchdog).map_err(|e| {
            Error::invalid(
                "command",
                a.command.join(" "),
                format!("cannot start it: {e}"),
            )
        })?;
        // Lines of concurrent runs are told apart by their object.
        let prefix = (a.concurrency > 1).then(|| format!("[{key}] "));
        let tail = Arc::new(Mutex::new(Tail::default()));
        let tee = child
            .stderr
            .take()
            .map(|s| AbortOnDrop(tokio::spawn(tee_stderr(s, prefix, tail.clone()))));
        let ended = supervise(&mut child, session, a, &mut stop, self.watchdog).await;
        if let Some(mut tee) = tee {
            let _ = tokio::time::timeout(STDERR_LINGER, &mut tee.0).await;
        }
        let tail = tail.lock().unwrap_or_else(|p| p.into_inner()).text();
        match ended {
            Ended::SessionLost => {
                std::mem::forget(w); // the claim is lost with the session; nothing to cancel
                Err(Error::SessionExpired {
                    session_id: session.id().to_string(),
                })
            }
            Ended::Exited { status, .. } if status.success() => {
                self.record(&mut w, &mut stop, async |w: &mut Work| {
                    w.finish(|_| async { Ok(()) }).await
                })
                .await
            }
            Ended::Exited {
                signalled: Some(Signalled::Stopping),
                ..
            } => {
                self.record(&mut w, &mut stop, async |w: &mut Work| w.cancel().await)
                    .await
            }
            Ended::Exited { status, signalled } => {
                let mut cause = match signalled {
                    Some(Signalled::TimedOut) => format!(
                        "timed out after {} ({status})",
                        humantime::format_duration(a.timeout.unwrap_or_default())
                    ),
                    _ => status.to_string(),
                };
                if !tail.is_empty() {
                    // The status first, then as much of stderr's end as the cause can hold (the
                    // store keeps a cause's last bytes: a long stderr would push the status out).
                    let tail = tail.replace('\0', "\\0");
                    let room = CAUSE_BYTES_MAX.saturating_sub(cause.len() + 2);
                    cause = format!("{cause}: {}", tail_bytes(&tail, room));
                }
                self.fail(w, &cause, &mut stop).await
            }
            Ended::WaitFailed(e) => {
                self.fail(
                    w,
                    &format!("waiting for the command failed: {e}"),
                    &mut stop,
                )
                .await
            }
        }
    }

    /// Record `w`'s outcome with `write`, through transient failures ([`record`]).
    async fn record(
        &self,
        w: &mut Work,
        stop: &mut watch::Receiver<Stop>,
        mut write: impl AsyncFnMut(&mut Work) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let key = w.key().clone();
        record(
            &key,
            OUTCOME_RETRY,
            || self.session_lost(),
            stop,
            async || write(w).await,
        )
        .await
    }

    /// The error a run's outcome write gives up with once the session is lost.
    fn session_lost(&self) -> Option<Error> {
        self.session.is_expired().then(|| Error::SessionExpired {
            session_id: self.session.id().to_string(),
        })
    }

    /// Fail `w` with `cause`; say so when the failure parked its object (the process's
    /// `max-failures`): no worker of the process will run it again until someone clears it.
    async fn fail(
        &self,
        mut w: Work,
        cause: &str,
        stop: &mut watch::Receiver<Stop>,
    ) -> Result<(), Error> {
        let (key, process) = (w.key().clone(), w.process().to_string());
        self.record(&mut w, stop, async |w: &mut Work| {
            w.fail(self.backoff, cause).await
        })
        .await?;
        let store = self.session.store();
        if let Ok(e) = store.work_explain(&key, &process, None).await {
            if let Some(b) = e.backoff.filter(|b| b.parked()) {
                say!(
                    "worker: {key} is parked for {process} after {}; \
                     `fleetdb -n {} backoff clear {} {} {process}` lets it run again",
                    b.failures_text(),
                    key.namespace,
                    key.kind,
                    key.id
                );
            }
        }
        Ok(())
    }
}

/// When to try recording a run's outcome again after a transient failure: first after
/// `first`, then twice as long each time up to `max`.
#[derive(Clone, Copy, Debug)]
struct RetryDelays {
    first: Duration,
    max: Duration,
}

const OUTCOME_RETRY: RetryDelays = RetryDelays {
    first: Duration::from_millis(100),
    max: Duration::from_secs(2),
};

/// Record the outcome of `key`'s run with `write` (a finish, fail or cancel), trying again while
/// it fails transiently: the database busy (SQLite: another process holding its write lock past
/// the busy timeout) or unreachable (PostgreSQL restarting or failing over), or conflicts past
/// the store's own retries. A failed outcome write keeps the claim (the store's contract), so a
/// retry cannot record twice (the claim's token fences it); giving up would end the worker and
/// run the object again although the command ran. It gives up (the last error) when the
/// session is `lost` (its renewals failed past its deadline: the claim may be another's) or on a
/// second signal (`Stop::Now`). An attempt that failed `Unavailable` may have committed with
/// only its answer lost (PostgreSQL: the connection dropped after COMMIT was sent): the store
/// resolves that from the object's history (`Work::finish`), so a later attempt answers `Ok`
/// if the outcome was recorded. Any other error is returned at once.
async fn record(
    key: &ObjectKey,
    delays: RetryDelays,
    lost: impl Fn() -> Option<Error>,
    stop: &mut watch::Receiver<Stop>,
    mut write: impl AsyncFnMut() -> Result<(), Error>,
) -> Result<(), Error> {
    let mut delay = delays.first;
    loop {
        let failed = match write().await {
            Err(e) if e.is_transient() => e,
            done => return done,
        };
        if let Some(lost) = lost() {
            return Err(lost);
        }
        if *stop.borrow() == Stop::Now {
            return Err(failed);
        }
        say!(
            "worker: recording the outcome of {key} failed ({failed}); trying again in {}",
            humantime::format_duration(delay)
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopping_now(stop) => {}
        }
        delay = (delay * 2).min(delays.max);
    }
}

/// Resolves once a second signal asks to stop at once (never if the sender is gone).
async fn stopping_now(stop: &mut watch::Receiver<Stop>) {
    while *stop.borrow_and_update() != Stop::Now {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A spawned task aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts `cmd` as the leader of a new process group, announced to the worker's watchdog before
/// it runs (so it dies at the session's deadline even if the worker is stopped); on Linux it also
/// dies with the worker.
fn spawn_in_own_group(mut cmd: Command, watchdog: &Watchdog) -> std::io::Result<Child> {
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        let worker = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid); its error is built without allocating.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // The worker died before the setting took: do not run unwatched.
                if libc::getppid() != worker {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    // Last before exec (closures run in the order given), once nothing else can fail.
    if let Some(fd) = watchdog.fd() {
        // SAFETY: the closure runs in the forked child before exec and makes async-signal-safe
        // calls only (getpid, send); its error is built without allocating.
        unsafe {
            cmd.pre_exec(move || crate::watchdog::announce(fd));
        }
    }
    cmd.spawn()
}

/// Sends `sig` to the process group `child` leads (its whole tree, unless a part left it).
fn signal_group(pid: Option<u32>, sig: libc::c_int) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
        unsafe {
            libc::kill(-(pid as libc::pid_t), sig);
        }
    }
}

/// How often the watchdog is told the session's deadline (when a renewal moved it).
const DEADLINE_TELL: Duration = Duration::from_millis(25);

/// Tells the watchdog the session's deadline as renewals move it.
async fn tell_deadlines(session: Session, watchdog: Arc<Watchdog>) {
    let mut told = None;
    let mut tick = tokio::time::interval(DEADLINE_TELL);
    loop {
        tick.tick().await;
        let deadline = session.deadline();
        if told != Some(deadline) {
            watchdog.deadline(deadline, session.store().clock().now());
            told = Some(deadline);
        }
    }
}

/// Waits for a run of the command, signalling it when the worker stops, when `--timeout` passes
/// (SIGTERM, then SIGKILL after `--grace`) and when the session is lost (SIGKILL).
async fn supervise(
    child: &mut Child,
    session: &Session,
    a: &WorkerArgs,
    stop: &mut watch::Receiver<Stop>,
    watchdog: &Watchdog,
) -> Ended {
    // Dropped before the command was reaped (another run ended the worker): kill its group.
    let mut guard = GroupGuard {
        pid: child.id(),
        watchdog,
    };
    let mut run = Run {
        pid: child.id(),
        grace: a.grace,
        signalled: None,
        kill_at: None,
        killed: false,
    };
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let timeout_at = a.timeout.map(|t| Instant::now() + t);
    let mut watching = true; // stop changes can still come
    let mut check = tokio::time::interval(SESSION_CHECK);
    // A signal that came before the command started.
    run.stop(*stop.borrow_and_update());
    loop {
        let kill_at = run.kill_at.filter(|_| !run.killed);
        tokio::select! {
            status = child.wait() => {
                guard.reaped();
                return match status {
                    Ok(status) => {
                        // Killed by a stop signal that reached it with the worker's own (systemd
                        // stopping the service signals its whole control group; `kill 0`): the
                        // worker's may be handled only after the exit. It is the worker stopping,
                        // not the object failing.
                        if run.signalled.is_none()
                            && ended_by_a_stop_signal(&status)
                            && stop_comes(stop, STOP_SIGNAL_LINGER).await
                        {
                            run.signalled = Some(Signalled::Stopping);
                        }
                        Ended::Exited { status, signalled: run.signalled }
                    }
                    Err(e) => Ended::WaitFailed(e),
                };
            }
            _ = check.tick() => {
                if session.is_expired() {
                    run.kill();
                    let _ = child.wait().await;
                    guard.reaped();
                    return Ended::SessionLost;
                }
            }
            _ = tokio::time::sleep_until(timeout_at.unwrap_or(far)),
                if run.signalled.is_none() && timeout_at.is_some() => {
                say!("worker: the command ran past --timeout: SIGTERM");
                run.terminate(Signalled::TimedOut);
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                say!("worker: the command did not end within --grace: SIGKILL");
                run.kill();
            }
            changed = stop.changed(), if watching => match changed {
                Ok(()) => run.stop(*stop.borrow_and_update()),
                Err(_) => watching = false,
            },
        }
    }
}

/// How long a command that died of SIGTERM or SIGINT (not sent by the worker) waits for the
/// worker's own stop signal, sent with it, before its run counts as failed.
const STOP_SIGNAL_LINGER: Duration = Duration::from_millis(200);

/// Whether a command ended as SIGTERM or SIGINT ends one: killed by it, or a shell's exit status
/// for a child killed by it (128 + the signal).
fn ended_by_a_stop_signal(status: &ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let stops = [libc::SIGTERM, libc::SIGINT];
    status.signal().is_some_and(|s| stops.contains(&s))
        || status
            .code()
            .is_some_and(|c| stops.iter().any(|s| c == 128 + s))
}

/// Whether the worker is told to stop (now, or within `within`).
async fn stop_comes(stop: &mut watch::Receiver<Stop>, within: Duration) -> bool {
    let told = async {
        loop {
            if *stop.borrow_and_update() != Stop::No {
                return true;
            }
            if stop.changed().await.is_err() {
                return false;
            }
        }
    };
    tokio::time::timeout(within, told).await.unwrap_or(false)
}

/// Kills a command's process group when dropped, unless disarmed ([`GroupGuard::reaped`]) once
/// it was reaped; either way the group is then no longer the watchdog's to kill.
struct GroupGuard<'a> {
    pid: Option<u32>,
    watchdog: &'a Watchdog,
}

impl GroupGuard<'_> {
    /// The command was reaped: its pid (the group's id) may be reused.
    fn reaped(&mut self) {
        if let Some(pid) = self.pid.take() {
            self.watchdog.done(pid);
        }
    }
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        signal_group(self.pid, libc::SIGKILL);
        if let Some(pid) = self.pid.take() {
            self.watchdog.done(pid);
        }
    }
}

/// The signals a run of the command got from the worker.
struct Run {
    /// The command's pid (its process group's id).
    pid: Option<u32>,
    grace: Duration,
    /// Why it was asked to end, the first time.
    signalled: Option<Signalled>,
    /// When it gets SIGKILL if it has not ended.
    kill_at: Option<Instant>,
    killed: bool,
}

impl Run {
    /// SIGTERM now and SIGKILL after the grace, unless it was asked to end already.
    fn terminate(&mut self, why: Signalled) {
        if self.signalled.is_none() {
            self.signalled = Some(why);
            signal_group(self.pid, libc::SIGTERM);
            self.kill_at = Some(Instant::now() + self.grace);
        }
    }

    fn kill(&mut self) {
        if !self.killed {
            signal_group(self.pid, libc::SIGKILL);
            self.killed = true;
        }
    }

    /// What the worker's stop state asks of the run.
    fn stop(&mut self, stop: Stop) {
        match stop {
            Stop::No => {}
            Stop::Drain => self.terminate(Signalled::Stopping),
            Stop::Now => {
                self.signalled.get_or_insert(Signalled::Stopping);
                self.kill();
            }
        }
    }
}

/// The last [`CAUSE_TAIL_BYTES`] of a command's stderr.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > 2 * CAUSE_TAIL_BYTES {
            let cut = self.0.len() - CAUSE_TAIL_BYTES;
            self.0.drain(..cut);
        }
    }

    /// The kept tail as text (at most [`CAUSE_TAIL_BYTES`]), trimmed.
    fn text(&self) -> String {
        let start = self.0.len().saturating_sub(CAUSE_TAIL_BYTES);
        String::from_utf8_lossy(&self.0[start..]).trim().to_string()
    }
}

/// Copies the command's stderr to the worker's as it comes (whole lines after `prefix`, when
/// there is one), keeping its tail.
async fn tee_stderr(mut from: ChildStderr, prefix: Option<String>, tail: Arc<Mutex<Tail>>) {
    let mut out = tokio::io::stderr();
    let mut buf = vec![0u8; 8192];
    let mut line = Vec::new(); // a prefixed line not yet ended
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tail.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(&buf[..n]);
        let Some(prefix) = &prefix else {
            let _ = out.write_all(&buf[..n]).await;
            let _ = out.flush().await;
            continue;
        };
        line.extend_from_slice(&buf[..n]);
        let mut text = Vec::new();
        while let Some(end) = line.iter().position(|&b| b == b'\n') {
            text.extend_from_slice(prefix.as_bytes());
            text.extend(line.drain(..=end));
        }
        // A line that never ends is passed on in pieces, not kept whole.
        if line.len() >= CAUSE_TAIL_BYTES {
            text.extend_from_slice(prefix.as_bytes());
            text.append(&mut line);
            text.push(b'\n');
        }
        let _ = out.write_all(&text).await;
        let _ = out.flush().await;
    }
    if let (Some(prefix), false) = (&prefix, line.is_empty()) {
        line.push(b'\n');
        let _ = out.write_all(&[prefix.as_bytes(), &line].concat()).await;
        let _ = out.flush().await;
    }
}

/// The claim of the `fleetdb worker` running this process, from the environment it gives its
/// command (`--fenced` writes).
pub fn fence_from_env() -> Result<Fence, Error> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| {
            Error::invalid(
                "--fenced",
                name,
                "is not set: fenced writes are for commands run by `fleetdb worker`, which sets \
                 FLEETDB_NAMESPACE, FLEETDB_KIND, FLEETDB_ID, FLEETDB_PROCESS, FLEETDB_SESSION \
                 and FLEETDB_TOKEN",
            )
        })
    };
    let token = var("FLEETDB_TOKEN")?;
    let fence = Fence {
        key: ObjectKey::new(
            &var("FLEETDB_NAMESPACE")?,
            &var("FLEETDB_KIND")?,
            &var("FLEETDB_ID")?,
        )?,
        process: var("FLEETDB_PROCESS")?,
        session_id: var("FLEETDB_SESSION")?,
        token: token
            .parse()
            .map_err(|_| Error::invalid("FLEETDB_TOKEN", token, "must be a whole number"))?,
    };
    fence.validate()?;
    Ok(fence)
}

/// The database URL given to the command (`FLEETDB_DB`): the worker's, with a relative SQLite
/// path (the default's is one) made absolute, so that a command that changes directory still
/// reaches the worker's database rather than a new one created where it stands.
fn command_db_url(db_url: &str) -> String {
    let url = if db_url.is_empty() {
        fleetdb::DEFAULT_URL
    } else {
        db_url
    };
    if let Ok(fleetdb::SqliteLocation::File(path)) = fleetdb::sqlite_location(url) {
        if path.is_relative() {
            if let Some(abs) = std::env::current_dir()
                .ok()
                .and_then(|cwd| cwd.join(&path).to_str().map(str::to_string))
            {
                return format!("sqlite://{abs}");
            }
        }
    }
    url.to_string()
}

/// The session's runtime info: the worker's pid and command line, cut (with an ellipsis) to
/// what a session's runtime info may hold, so a long inline script cannot stop the worker.
fn runtime_info(pid: u32, command: &[String]) -> String {
    let full = format!("fleetdb worker pid {pid} running {}", command.join(" "));
    if full.len() <= RUNTIME_INFO_BYTES_MAX {
        return full;
    }
    let mut end = RUNTIME_INFO_BYTES_MAX - "…".len();
    while !full.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &full[..end])
}

/// This machine's host name, made to fit the name rule.
fn default_host() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into());
    host_name(&raw)
}

/// `raw` made to fit the name rule: other characters become `-`, a run of separators becomes
/// its first, and the result starts and ends with a letter or digit, in at most 76 bytes.
fn host_name(raw: &str) -> String {
    let is_sep = |c: char| matches!(c, '.' | '-' | '_');
    let mut out = String::new();
    for c in raw.trim().chars() {
        let c = if c.is_ascii_alphanumeric() || is_sep(c) {
            c
        } else {
            '-'
        };
        if is_sep(c) && out.chars().last().is_none_or(is_sep) {
            continue; // no leading separator, no two in a row
        }
        out.push(c);
    }
    out.truncate(76); // ASCII only by now
    let out = out.trim_end_matches(is_sep);
    if out.is_empty() {
        "localhost".into()
    } else {
        out.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`record`] of machine m0 with millisecond delays, no signal.
    async fn rec(
        lost: impl Fn() -> Option<Error>,
        write: impl AsyncFnMut() -> Result<(), Error>,
    ) -> Result<(), Error> {
        let key = ObjectKey::new("default", "machine", "m0").unwrap();
        let delays = RetryDelays {
            first: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        let (_tx, mut stop) = watch::channel(Stop::No);
        record(&key, delays, lost, &mut stop, write).await
    }

    /// An outcome write failing transiently is tried again until it goes through; one failing
    /// otherwise (the session lost, the claim taken) is returned at once; the retries stop when
    /// the session is lost. (A claim found gone after an attempt whose answer was lost is
    /// resolved by the store: `Work::finish`.)
    #[tokio::test]
    async fn outcomes_are_recorded_through_transient_failures() {
        let unavailable = || Error::Unavailable("connection closed".into());
        let mut calls = 0;
        let r = rec(
            || None,
            async || {
                calls += 1;
                match calls {
                    1 => Err(Error::Unavailable("the SQLite database is busy".into())),
                    2 => Err(Error::RetriesExhausted {
                        attempts: 10,
                        last: "serialization failure".into(),
                    }),
                    3 => Err(Error::Conflict { what: "x".into() }),
                    _ => Ok(()),
                }
            },
        )
        .await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(calls, 4);

        let mut calls = 0;
        let r = rec(
            || None,
            async || {
                calls += 1;
                match calls {
                    1 => Err(unavailable()),
                    _ => Err(Error::SessionExpired {
                        session_id: "s".into(),
                    }),
                }
            },
        )
        .await;
        assert!(matches!(r, Err(Error::SessionExpired { .. })), "{r:?}");
        assert_eq!(calls, 2);

        // The database stays down: the retries end with the session.
        let calls = std::cell::Cell::new(0);
        let r = rec(
            || {
                (calls.get() >= 3).then(|| Error::SessionExpired {
                    session_id: "s".into(),
                })
            },
            async || {
                calls.set(calls.get() + 1);
                Err(unavailable())
            },
        )
        .await;
        assert!(matches!(r, Err(Error::SessionExpired { .. })), "{r:?}");
        assert_eq!(calls.get(), 3);

        // A claim lost is lost: returned at once.
        let mut calls = 0;
        let r = rec(
            || None,
            async || {
                calls += 1;
                Err(Error::WorkLost {
                    what: "claim".into(),
                })
            },
        )
        .await;
        assert!(matches!(r, Err(Error::WorkLost { .. })), "{r:?}");
        assert_eq!(calls, 1);
    }

    #[test]
    fn host_names_are_made_to_fit_the_name_rule() {
        for (raw, want) in [
            ("web-1.example.org\n", "web-1.example.org"),
            ("xn--bcher-kva.example", "xn-bcher-kva.example"),
            ("a_-b", "a_b"),
            ("--.weird host!!", "weird-host"),
            ("...", "localhost"),
        ] {
            let got = host_name(raw);
            assert_eq!(got, want, "{raw:?}");
            fleetdb::core::validate::name("host", &got).unwrap();
        }
        // Cut at 76 bytes where the 76th is a separator: it is trimmed too.
        let long = format!("{}.{}", "a".repeat(75), "b".repeat(20));
        let got = host_name(&long);
        assert_eq!(got, "a".repeat(75));
        fleetdb::core::validate::name("host", &got).unwrap();
    }

    #[test]
    fn a_long_command_line_is_cut_to_fit_the_runtime_info() {
        let script = vec!["sh".to_string(), "-c".to_string(), "é".repeat(5000)];
        let info = runtime_info(7, &script);
        assert!(info.len() <= RUNTIME_INFO_BYTES_MAX, "{}", info.len());
        assert!(info.starts_with("fleetdb worker pid 7 running sh -c é") && info.ends_with('…'));
        let short = runtime_info(7, &["true".to_string()]);
        assert_eq!(short, "fleetdb worker pid 7 running true");
    }

    #[test]
    fn the_commands_database_url_is_absolute() {
        let cwd = std::env::current_dir().unwrap();
        let abs = |rel: &str| format!("sqlite://{}", cwd.join(rel).display());
        assert_eq!(command_db_url(""), abs("fleetdb-data/fleetdb.sqlite"));
        assert_eq!(command_db_url("sqlite://a/b.db"), abs("a/b.db"));
        assert_eq!(command_db_url("sqlite:b.db"), abs("b.db"));
        for same in [
            "sqlite:///abs/b.db",
            "sqlite::memory:",
            "postgres://postgres@127.0.0.1/postgres",
        ] {
            assert_eq!(command_db_url(same), same);
        }
    }

    #[test]
    fn run_durations_are_bounded() {
        assert!(positive_duration("10000000000000000000s").is_err());
        assert!(bounded_duration("300000000000y").is_err());
        assert!(positive_duration("0s").is_err());
        assert_eq!(bounded_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(positive_duration("90s").unwrap(), Duration::from_secs(90));
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_only() {
        let mut t = Tail::default();
        t.push(b"start ");
        for _ in 0..10_000 {
            t.push(b"0123456789");
        }
        t.push(b" the end\n");
        let text = t.text();
        assert_eq!(text.len(), CAUSE_TAIL_BYTES - 1, "trimmed of its newline");
        assert!(text.ends_with("the end"));
        assert!(!text.contains("start"));
        assert!(t.0.len() <= 2 * CAUSE_TAIL_BYTES, "memory stays bounded");
    }

    #[test]
    fn timeouts_must_be_positive() {
        assert!(positive_duration("0s").is_err());
        assert!(positive_duration("soon").is_err());
        assert_eq!(positive_duration("2m"), Ok(Duration::from_secs(120)));
    }
}
