//! Sessions, processes, work claims, backoff and history: the types and the rules.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ObjectKey, Revision};
use crate::time::Timestamp;
use crate::validate;

/// Shortest session TTL.
pub const SESSION_TTL_MIN: Duration = Duration::from_secs(1);
/// Longest session TTL.
pub const SESSION_TTL_MAX: Duration = Duration::from_secs(3600);
/// The TTL when none is given.
pub const SESSION_TTL_DEFAULT: Duration = Duration::from_secs(10);
/// Longest runtime info text.
pub const RUNTIME_INFO_BYTES_MAX: usize = 4096;
/// Longest failure cause kept in history and backoff.
pub const CAUSE_BYTES_MAX: usize = 4096;
/// Most objects one claim takes.
pub const CLAIM_BATCH_MAX: usize = 1000;
/// History rows one pruning statement deletes at most (a prune runs batches until one is short).
pub const HISTORY_PRUNE_BATCH: usize = 10_000;
/// History rows a prune's first statement reads at most: the pruner runs every second and
/// usually finds little or nothing old enough, so it starts with a small head and grows it
/// (×10, up to [`HISTORY_PRUNE_BATCH`]) only while whole batches go.
pub const HISTORY_PRUNE_FIRST: usize = 100;
/// Most processes one process may conflict with.
pub const PROCESS_CONFLICTS_MAX: usize = 64;
/// Most history rows one page returns.
pub const HISTORY_PAGE_ROWS_MAX: usize = 1000;

/// A session row: a component's proof of liveness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: String,
    pub component: String,
    pub host: String,
    pub runtime_info: String,
    pub ttl_ms: i64,
    pub created_at: Timestamp,
    /// Alive while `now < deadline`.
    pub deadline: Timestamp,
}

impl SessionInfo {
    pub fn alive_at(&self, now: Timestamp) -> bool {
        now < self.deadline
    }
}

/// What a component says about itself when it starts a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    pub component: String,
    pub host: String,
    pub runtime_info: String,
    pub ttl: Duration,
}

impl SessionSpec {
    pub fn new(component: impl Into<String>, host: impl Into<String>) -> Self {
        SessionSpec {
            component: component.into(),
            host: host.into(),
            runtime_info: String::new(),
            ttl: SESSION_TTL_DEFAULT,
        }
    }

    pub fn runtime_info(mut self, info: impl Into<String>) -> Self {
        self.runtime_info = info.into();
        self
    }

    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn validate(&self) -> Result<()> {
        validate::name("component", &self.component)?;
        validate::name("host", &self.host)?;
        if self.runtime_info.len() > RUNTIME_INFO_BYTES_MAX {
            return Err(Error::TooLarge {
                field: "runtime info".into(),
                size: self.runtime_info.len(),
                max: RUNTIME_INFO_BYTES_MAX,
            });
        }
        if self.runtime_info.contains('\0') {
            return Err(Error::invalid(
                "runtime info",
                self.runtime_info.replace('\0', "\\0"),
                "must not contain NUL",
            ));
        }
        if self.ttl < SESSION_TTL_MIN || self.ttl > SESSION_TTL_MAX {
            return Err(Error::invalid(
                "session ttl",
                format!("{:?}", self.ttl),
                format!("must be between {SESSION_TTL_MIN:?} and {SESSION_TTL_MAX:?}"),
            ));
        }
        Ok(())
    }
}

/// A declared process and the processes it conflicts with (as declared; conflicts are symmetric
/// when claims are checked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub name: String,
    pub conflicts: Vec<String>,
    pub created_at: Timestamp,
    /// Paused by an operator: no claim for it starts (claims held go on and end as usual).
    #[serde(default)]
    pub paused: bool,
    /// At most this many claims of it held by live sessions at once, fleet-wide (`None`: no
    /// limit). Claims beyond it wait for one to end.
    #[serde(default)]
    pub max_active: Option<u64>,
    /// An object is parked for this process after this many failures in a row (`None`: it is
    /// retried for ever, each time after its backoff): the failure that reaches it leaves a
    /// backoff without end ([`PARKED`]), so no claim of this process takes the object again
    /// (`claim_object` is refused, as in any backoff) until an operator clears that backoff.
    /// Counted per (object, process); a finish or a cleared backoff starts the count again.
    #[serde(default)]
    pub max_failures: Option<u64>,
}

/// The largest `Process::max_active` an operator may set.
pub const PROCESS_MAX_ACTIVE_MAX: u64 = 1_000_000;

/// The largest `Process::max_failures` an operator may set.
pub const PROCESS_MAX_FAILURES_MAX: u64 = 1_000_000;

/// The `until` of a parked backoff: never over (see [`Process::max_failures`]).
pub const PARKED: Timestamp = Timestamp(i64::MAX);

/// Active work: an exclusive claim by a session on (object, process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkInfo {
    pub key: ObjectKey,
    pub process: String,
    pub session_id: String,
    /// Fencing token: strictly increasing across all claims.
    pub token: i64,
    pub started_at: Timestamp,
}

/// A backoff row: (object, process) may not be claimed before `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackoffInfo {
    pub key: ObjectKey,
    pub process: String,
    pub until: Timestamp,
    pub cause: String,
    /// The interval the last failure chose, in whole seconds (the base of the next one).
    pub last_interval_s: i64,
    /// Failures of (object, process) in a row: since it last finished or an operator cleared its
    /// backoff (rows from before migration 0014 count as one).
    #[serde(default = "one")]
    pub failures: u64,
}

fn one() -> u64 {
    1
}

/// Why an object can or cannot be claimed for a process now: what a claim of it checks, read
/// in one transaction and taking nothing (`Store::work_explain`, `fleetdb work explain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkExplain {
    pub key: ObjectKey,
    pub process: String,
    /// What keeps a claim from taking the object now, in the order a claim checks, each as the
    /// claim's own error says it. Empty: a claim of this process would take it.
    pub blockers: Vec<String>,
    pub object_exists: bool,
    /// The process as declared (`None`: not declared).
    pub declared: Option<Process>,
    /// Claims of the process held by live sessions (counted only when it has a limit).
    pub held: Option<u64>,
    /// Claims on the object of the process or of a process it conflicts with, live or not (a
    /// dead session's claim is taken over by the next claim).
    pub holders: Vec<Holder>,
    pub backoff: Option<BackoffInfo>,
    /// With a selector: the parts of it the object does not meet (its top-level `and` terms, or
    /// the whole selector); empty when it matches.
    pub selector: Option<SelectorCheck>,
}

/// A claim on an object, with whether its session is alive and who that session is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub work: WorkInfo,
    pub alive: bool,
    pub component: String,
    pub host: String,
}

/// An object against a selector, in `WorkExplain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorCheck {
    pub selector: String,
    pub matches: bool,
    /// The terms it fails (canonical text).
    pub unmet: Vec<String>,
}

impl WorkExplain {
    /// A claim of the process would take the object now.
    pub fn claimable(&self) -> bool {
        self.blockers.is_empty()
    }
}

impl BackoffInfo {
    /// Parked: its process's `max_failures` was reached; over only when an operator clears it.
    pub fn parked(&self) -> bool {
        self.until == PARKED
    }

    /// "1 failure", "3 failures in a row".
    pub fn failures_text(&self) -> String {
        match self.failures {
            1 => "1 failure".to_string(),
            n => format!("{n} failures in a row"),
        }
    }
}

/// A history event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkEvent {
    Started,
    Finished,
    Failed,
    Canceled,
    Expired,
}

impl WorkEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkEvent::Started => "Started",
            WorkEvent::Finished => "Finished",
            WorkEvent::Failed => "Failed",
            WorkEvent::Canceled => "Canceled",
            WorkEvent::Expired => "Expired",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "Started" => WorkEvent::Started,
            "Finished" => WorkEvent::Finished,
            "Failed" => WorkEvent::Failed,
            "Canceled" => WorkEvent::Canceled,
            "Expired" => WorkEvent::Expired,
            other => {
                return Err(Error::Backend(format!(
                    "unknown history event {other:?} in the store"
                )))
            }
        })
    }
}

/// One row of work history. Kept after the object is deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Position in the history (increasing).
    pub seq: i64,
    pub key: ObjectKey,
    pub process: String,
    pub event: WorkEvent,
    pub session_id: String,
    pub component: String,
    pub host: String,
    pub token: i64,
    pub at: Timestamp,
    pub cause: Option<String>,
}

/// Which history to list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HistoryFilter {
    Object(ObjectKey),
    Process(String),
}

/// Exponential backoff after failures, with BMDB's semantics: the first failure waits `initial`;
/// each next one waits the previous interval × `exponent`, clamped to `maximum` and rounded up to
/// whole seconds. A finish resets the sequence. Optional jitter adds up to `jitter` × interval.
///
/// Deserializing validates as [`Backoff::new`] and [`Backoff::with_jitter`] do (a backoff read
/// from a configuration file is no exception).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "BackoffFields")]
pub struct Backoff {
    initial_s: i64,
    maximum_s: i64,
    exponent: f64,
    jitter: f64,
}

/// A [`Backoff`] as serialized, before validation.
#[derive(Deserialize)]
struct BackoffFields {
    initial_s: i64,
    maximum_s: i64,
    exponent: f64,
    jitter: f64,
}

impl TryFrom<BackoffFields> for Backoff {
    type Error = Error;

    fn try_from(f: BackoffFields) -> Result<Backoff> {
        let secs = |s: i64| Duration::from_secs(u64::try_from(s).unwrap_or(0));
        let b = Backoff::new(secs(f.initial_s), secs(f.maximum_s), f.exponent)?
            .with_jitter(f.jitter)?;
        // Whole seconds in, the same whole seconds out.
        debug_assert_eq!((b.initial_s, b.maximum_s), (f.initial_s, f.maximum_s));
        Ok(b)
    }
}

impl Backoff {
    /// Validates: 1 s ≤ initial ≤ maximum ≤ 30 days, 1 ≤ exponent ≤ 100 (finite).
    pub fn new(initial: Duration, maximum: Duration, exponent: f64) -> Result<Backoff> {
        let secs = |d: Duration| d.as_secs() as i64 + i64::from(d.subsec_nanos() > 0);
        let (initial_s, maximum_s) = (secs(initial), secs(maximum));
        if initial < Duration::from_secs(1) {
            return Err(Error::invalid(
                "backoff initial",
                format!("{initial:?}"),
                "must be at least 1s",
            ));
        }
        if maximum < initial || maximum > Duration::from_secs(30 * 24 * 3600) {
            return Err(Error::invalid(
                "backoff maximum",
                format!("{maximum:?}"),
                "must be at least the initial interval and at most 30 days",
            ));
        }
        if !exponent.is_finite() || !(1.0..=100.0).contains(&exponent) {
            return Err(Error::invalid(
                "backoff exponent",
                exponent.to_string(),
                "must be between 1 and 100",
            ));
        }
        Ok(Backoff {
            initial_s,
            maximum_s,
            exponent,
            jitter: 0.0,
        })
    }

    /// Add up to `fraction` × interval of random delay (0 ≤ fraction ≤ 1).
    pub fn with_jitter(mut self, fraction: f64) -> Result<Backoff> {
        if !fraction.is_finite() || !(0.0..=1.0).contains(&fraction) {
            return Err(Error::invalid(
                "backoff jitter",
                fraction.to_string(),
                "must be between 0 and 1",
            ));
        }
        self.jitter = fraction;
        Ok(self)
    }

    /// Parse `INITIAL,MAX,EXPONENT[,JITTER]`, e.g. `1s,10m,2` (CLI).
    pub fn parse(text: &str) -> Result<Backoff> {
        let bad = |why: &str| {
            Error::invalid(
                "backoff",
                text,
                format!("{why}; expected INITIAL,MAX,EXPONENT[,JITTER] like 1s,10m,2"),
            )
        };
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        if parts.len() < 3 || parts.len() > 4 {
            return Err(bad("wrong number of parts"));
        }
        let d = |s: &str| humantime::parse_duration(s).map_err(|e| bad(&format!("{s:?}: {e}")));
        let f = |s: &str| {
            s.parse::<f64>()
                .map_err(|_| bad(&format!("{s:?} is not a number")))
        };
        // The bounds' errors name the part as typed (not as a `Duration` prints: "0ns").
        let part = |e: Error| match e {
            Error::Invalid { field, rule, .. } => {
                let (what, typed) = match field.as_str() {
                    "backoff initial" => ("the initial interval", parts[0]),
                    "backoff maximum" => ("the maximum interval", parts[1]),
                    "backoff exponent" => ("the exponent", parts[2]),
                    _ => ("the jitter", parts.get(3).copied().unwrap_or_default()),
                };
                Error::invalid("backoff", text, format!("{what} {typed:?} {rule}"))
            }
            e => e,
        };
        let b = Backoff::new(d(parts[0])?, d(parts[1])?, f(parts[2])?).map_err(part)?;
        match parts.get(3) {
            Some(j) => b.with_jitter(f(j)?).map_err(part),
            None => Ok(b),
        }
    }

    pub fn initial_s(&self) -> i64 {
        self.initial_s
    }
    pub fn maximum_s(&self) -> i64 {
        self.maximum_s
    }
    pub fn exponent(&self) -> f64 {
        self.exponent
    }
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// The next interval in whole seconds, given the last one (None: first failure).
    pub fn next_interval_s(&self, last_s: Option<i64>) -> i64 {
        match last_s {
            None => self.initial_s,
            Some(last) => {
                // Multiply in whole nanoseconds (truncating, as a duration would) before rounding
                // up to seconds, so 90 s × 1.1 is 99 s, not 100 s from 99.00000000000001, while
                // 1 s × 1.0004 is still 2 s (in whole milliseconds it stayed 1 s for ever).
                let next_ns = (last.max(1) as f64 * 1e9 * self.exponent).floor();
                let next_s = (next_ns / 1e9).ceil().min(self.maximum_s as f64);
                (next_s as i64).clamp(self.initial_s, self.maximum_s)
            }
        }
    }

    /// Jitter to add to an interval, given a uniform random number in [0, 1).
    pub fn jitter_ms(&self, interval_s: i64, uniform: f64) -> i64 {
        (interval_s as f64 * 1000.0 * self.jitter * uniform.clamp(0.0, 1.0)) as i64
    }
}

/// How a claim ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Finished,
    Canceled,
    /// `uniform` is a random number in [0, 1) drawn by the caller (so a replayed batch is identical).
    Failed {
        cause: String,
        backoff: Backoff,
        uniform: f64,
    },
}

/// A claim request: by selector, or one known object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimRequest {
    pub session_id: String,
    pub process: String,
    pub target: ClaimTarget,
    pub limit: usize,
    pub now: Timestamp,
}

/// Run `step` — a statement deleting at most the given number of rows, returning how many it
/// deleted — until one deletes fewer than it was given; returns the total. The first step gets
/// `first` rows (at most `batch`), each next one ten times the last, up to `batch` (all at least
/// 1): a run that finds nothing or little to delete reads a small head, a backlog goes in
/// batches of `batch`. Each step is its own transaction, so a prune of millions of rows holds no
/// lock or transaction for long.
pub async fn delete_in_batches<F, Fut>(first: usize, batch: usize, mut step: F) -> Result<u64>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    let batch = batch.max(1);
    let mut size = first.clamp(1, batch);
    let mut total = 0;
    loop {
        let n = step(size).await?;
        total += n;
        if n < size as u64 {
            return Ok(total);
        }
        size = size.saturating_mul(10).min(batch);
    }
}

/// What a claim got: the work (possibly none), and, when it got less than its limit, the
/// change-log revision as of the snapshot its candidates were looked for in, when the backend
/// can tell. A waiting claim ([`crate::backend::Backend::claim`] callers such as `claim_wait`)
/// waits for a revision past it without reading the revision again: every change it did not
/// see has a later revision (a change it saw may have made no candidate).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claimed {
    pub work: Vec<WorkInfo>,
    /// `None`: the claim filled its limit, or the backend could not tell.
    pub revision: Option<Revision>,
    /// Claims of dead sessions this claim took over (each ended with `Expired` history, in the
    /// claim's process): the crashed workers' claims no sweep will see.
    pub expired: u64,
    /// A claim run after a batch in a transaction of its own (`Backend::commit_then_claim`)
    /// lost its answer with the connection and may have committed: what it took is the
    /// session's rows of the process started at the claim's time (the caller takes them up).
    pub unknown: bool,
}

impl Claimed {
    /// Work alone (no revision known).
    pub fn work(work: Vec<WorkInfo>) -> Self {
        Self {
            work,
            revision: None,
            expired: 0,
            unknown: false,
        }
    }

    /// The answer of a claim of up to `limit` that looked at `revision`: kept only if the work
    /// is short of the limit.
    pub fn short_of(limit: usize, work: Vec<WorkInfo>, revision: Option<Revision>) -> Self {
        let revision = revision.filter(|_| work.len() < limit);
        Self {
            work,
            revision,
            expired: 0,
            unknown: false,
        }
    }

    /// With `n` dead sessions' claims taken over.
    pub fn with_expired(mut self, n: u64) -> Self {
        self.expired = n;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClaimTarget {
    /// Selector text (parsed again by the backend: it is data on the wire).
    Selector(String),
    Object(ObjectKey),
}

/// A position in a listing of claims or backoffs (ordered by process, namespace, kind, id),
/// exchanged as an opaque string (`Page::next`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkCursor {
    pub process: String,
    pub key: ObjectKey,
}

impl WorkCursor {
    /// The cursor after `process`'s row of `key`.
    pub fn after(process: &str, key: &ObjectKey) -> WorkCursor {
        WorkCursor {
            process: process.to_string(),
            key: key.clone(),
        }
    }

    /// A cursor as the four text parameters of a listing's SQL (process, namespace, kind, id),
    /// NULL without one.
    pub fn params(after: Option<&WorkCursor>) -> [Option<&str>; 4] {
        match after {
            Some(c) => [
                Some(c.process.as_str()),
                Some(c.key.namespace.as_str()),
                Some(c.key.kind.as_str()),
                Some(c.key.id.as_str()),
            ],
            None => [None; 4],
        }
    }

    /// Check that this cursor is a position of a listing of `process` (any, for `None`): a
    /// cursor of another process's listing is refused, not taken as a position in this one.
    pub fn check_process(&self, process: Option<&str>) -> Result<()> {
        match process {
            Some(p) if p != self.process => Err(Error::invalid(
                "cursor",
                self.encode(),
                format!(
                    "is a position among claims or backoffs of process {:?}, not of {p:?}",
                    self.process
                ),
            )),
            _ => Ok(()),
        }
    }

    pub fn encode(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{}\n{}\n{}\n{}",
            self.process, self.key.namespace, self.key.kind, self.key.id
        ))
    }

    pub fn decode(text: &str) -> Result<WorkCursor> {
        use base64::Engine as _;
        let bad = || Error::invalid("cursor", text, "is not a cursor returned by this listing");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| bad())?;
        let s = String::from_utf8(bytes).map_err(|_| bad())?;
        let parts: Vec<&str> = s.split('\n').collect();
        let [process, namespace, kind, id] = parts[..] else {
            return Err(bad());
        };
        validate::name("process", process).map_err(|_| bad())?;
        let key = ObjectKey::new(namespace, kind, id).map_err(|_| bad())?;
        Ok(WorkCursor {
            process: process.to_string(),
            key,
        })
    }
}

/// A page of claims: optionally of one process and of one session, after a cursor, at most
/// `limit` rows, ordered by (process, namespace, kind, id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkListing {
    pub process: Option<String>,
    pub session: Option<String>,
    pub after: Option<WorkCursor>,
    pub limit: usize,
}

impl WorkListing {
    /// The first `limit` claims, optionally of one process.
    pub fn new(process: Option<&str>, limit: usize) -> WorkListing {
        WorkListing {
            process: process.map(str::to_string),
            limit,
            ..WorkListing::default()
        }
    }
}

/// Which backoffs a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackoffWhich {
    /// Those not over yet (parked ones included).
    Active,
    /// Every backoff row, over or not.
    All,
    /// Only parked ones (they end only when cleared).
    Parked,
}

/// A failure cause as stored: NUL bytes spelled `\0`, then the last [`CAUSE_BYTES_MAX`] bytes
/// (the end of an error output is usually the useful part).
pub fn cause(text: &str) -> Result<String> {
    Ok(tail_bytes(&text.replace('\0', "\\0"), CAUSE_BYTES_MAX).to_string())
}

/// The longest end of `text` of at most `max` bytes that starts on a character boundary.
pub fn tail_bytes(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_keep_their_tail_within_the_limit_after_escaping_nuls() {
        // 3,000 NULs become 6,000 bytes: still a cause of at most the limit, not an error.
        let c = cause(&"\0".repeat(3000)).unwrap();
        assert_eq!(c.len(), CAUSE_BYTES_MAX);
        assert!(c.ends_with("\\0"));
        // Multi-byte characters are never split.
        let c = cause(&format!("x{}", "é".repeat(CAUSE_BYTES_MAX))).unwrap();
        assert!(c.len() <= CAUSE_BYTES_MAX && c.chars().all(|ch| ch == 'é'));
        assert_eq!(tail_bytes("héllo", 4), "llo");
        assert_eq!(tail_bytes("abc", 10), "abc");
    }

    /// review-w: the pruner runs every second; with nothing old enough its first statement
    /// read a head of `HISTORY_PRUNE_BATCH` (10,000) rows all the same (~7 ms a second on a
    /// table of a million rows). It now starts with a small head and grows it only while whole
    /// batches go.
    #[test]
    fn a_prune_starts_small_and_grows_only_while_batches_are_full() {
        let run = |deletable: u64| {
            let mut asked = Vec::new();
            let mut left = deletable;
            let total = run_ready(delete_in_batches(
                HISTORY_PRUNE_FIRST,
                HISTORY_PRUNE_BATCH,
                |n| {
                    asked.push(n);
                    let d = left.min(n as u64);
                    left -= d;
                    std::future::ready(Ok(d))
                },
            ))
            .unwrap();
            (total, asked)
        };
        // Nothing to prune: one small statement.
        assert_eq!(run(0), (0, vec![100]));
        // A backlog: the head grows to the batch and stays there until a batch is short.
        let (total, asked) = run(25_000);
        assert_eq!(total, 25_000);
        assert_eq!(asked.first(), Some(&HISTORY_PRUNE_FIRST));
        assert!(asked.iter().all(|&n| n <= HISTORY_PRUNE_BATCH), "{asked:?}");
        assert!(asked.windows(2).all(|w| w[0] <= w[1]), "{asked:?}");
        assert!(asked.len() <= 6, "{asked:?}");
        // A batch of at most the first size is that batch.
        let mut asked = Vec::new();
        run_ready(delete_in_batches(HISTORY_PRUNE_FIRST, 2, |n| {
            asked.push(n);
            std::future::ready(Ok(n as u64 * u64::from(asked.len() < 3)))
        }))
        .unwrap();
        assert_eq!(asked, [2, 2, 2]);
    }

    /// Poll a future that never waits (the steps above are ready at once) to its end.
    fn run_ready<F: std::future::Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    #[test]
    fn work_cursors_round_trip_and_refuse_garbage() {
        let c = WorkCursor::after("P", &ObjectKey::new("lab", "machine", "m-1").unwrap());
        assert_eq!(WorkCursor::decode(&c.encode()).unwrap(), c);
        for bad in ["", "!!", "UA", "UApsYWIKbWFjaGluZQ"] {
            assert!(WorkCursor::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_small_exponent_still_grows_the_interval() {
        let b = Backoff::parse("1s,10s,1.0004").unwrap();
        assert_eq!(seq(&b, 4), [1, 2, 3, 4]);
        let b = Backoff::parse("90s,1h,1.1").unwrap();
        assert_eq!(b.next_interval_s(Some(90)), 99);
    }

    fn seq(b: &Backoff, n: usize) -> Vec<i64> {
        let mut out = Vec::new();
        let mut last = None;
        for _ in 0..n {
            let next = b.next_interval_s(last);
            out.push(next);
            last = Some(next);
        }
        out
    }

    #[test]
    fn bmdb_backoff_vectors() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5), 2.0).unwrap();
        assert_eq!(seq(&b, 5), vec![1, 2, 4, 5, 5]);
        let b = Backoff::new(Duration::from_secs(60), Duration::from_secs(120), 1.1).unwrap();
        assert_eq!(seq(&b, 9), vec![60, 66, 73, 81, 90, 99, 109, 120, 120]);
        let fixed = Backoff::new(Duration::from_secs(7), Duration::from_secs(7), 1.0).unwrap();
        assert_eq!(seq(&fixed, 3), vec![7, 7, 7]);
    }

    #[test]
    fn deserialized_backoffs_are_validated_as_constructed_ones() {
        // What serializes comes back as it was.
        let b = Backoff::parse("2s,10m,1.5,0.25").unwrap();
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Backoff>(&text).unwrap(), b);
        // A backoff read from a config file is validated like one built with `new`: an initial
        // interval over the maximum made the second failure's `clamp` panic inside the store's
        // write, and a zero or negative one (or a NaN exponent, a negative jitter) was no
        // backoff at all.
        for bad in [
            r#"{"initial_s":10,"maximum_s":5,"exponent":2.0,"jitter":0.0}"#,
            r#"{"initial_s":0,"maximum_s":5,"exponent":2.0,"jitter":0.0}"#,
            r#"{"initial_s":-5,"maximum_s":5,"exponent":2.0,"jitter":0.0}"#,
            r#"{"initial_s":1,"maximum_s":99999999999,"exponent":2.0,"jitter":0.0}"#,
            r#"{"initial_s":1,"maximum_s":5,"exponent":0.5,"jitter":0.0}"#,
            r#"{"initial_s":1,"maximum_s":5,"exponent":2.0,"jitter":-1.0}"#,
            r#"{"initial_s":1,"maximum_s":5,"exponent":2.0,"jitter":1.5}"#,
        ] {
            assert!(serde_json::from_str::<Backoff>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_validation() {
        assert!(Backoff::new(Duration::from_millis(500), Duration::from_secs(5), 2.0).is_err());
        assert!(Backoff::new(Duration::from_secs(5), Duration::from_secs(1), 2.0).is_err());
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(5), 0.5).is_err());
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(5), f64::NAN).is_err());
        assert!(
            Backoff::new(Duration::from_secs(1), Duration::from_secs(5), 2.0)
                .unwrap()
                .with_jitter(1.5)
                .is_err()
        );
        let b = Backoff::parse("1s,10m,2,0.1").unwrap();
        assert_eq!(
            (b.initial_s(), b.maximum_s(), b.exponent(), b.jitter()),
            (1, 600, 2.0, 0.1)
        );
        let err = Backoff::parse("1s,10m").unwrap_err();
        assert!(err.to_string().contains("INITIAL,MAX,EXPONENT"), "{err}");
        assert_eq!(b.jitter_ms(10, 0.5), 500);
    }

    #[test]
    fn session_spec_validation() {
        SessionSpec::new("shepherd", "host-1").validate().unwrap();
        assert!(SessionSpec::new("shepherd", "host 1").validate().is_err());
        assert!(SessionSpec::new("s", "h")
            .ttl(Duration::from_millis(10))
            .validate()
            .is_err());
        assert!(SessionSpec::new("s", "h")
            .ttl(Duration::from_secs(7200))
            .validate()
            .is_err());
    }

    #[test]
    fn long_causes_keep_their_tail() {
        let long = format!("{}END", "x".repeat(5000));
        let c = cause(&long).unwrap();
        assert_eq!(c.len(), CAUSE_BYTES_MAX);
        assert!(c.ends_with("END"));
    }
}
