//! Prometheus metrics of one store: counters updated as things happen, and gauges (active work
//! and active backoffs per process, objects per tracked selector) computed from the store when
//! `Store::metrics_refresh` runs. The
//! server exposes [`Metrics::encode`] at `/metrics`.

use std::time::Instant;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The metrics of one store. Cheap to clone (the metrics are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub sessions_started: IntCounter,
    pub sessions_expired: IntCounter,
    pub sessions_closed: IntCounter,
    pub transactions_executed: IntCounter,
    pub transactions_retried: IntCounter,
    pub transactions_failed: IntCounter,
    /// How long the store's transactions took, from the call to the backend to its answer
    /// (durable), by kind (see [`TxnKind`]). Conflicted attempts are observed one by one.
    pub transaction_seconds: HistogramVec,
    /// The backend's own retries already added to `transactions_retried` ([`Metrics::backend_retries`]).
    backend_retries_seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Its children by [`TxnKind`], resolved once (no label lookup per transaction).
    transaction_kinds: [prometheus::Histogram; 3],
    pub work_started: IntCounterVec,
    pub work_finished: IntCounterVec,
    pub work_active: IntGaugeVec,
    pub backoffs_active: IntGaugeVec,
    /// Objects parked per process (`Process::max_failures` reached).
    pub work_parked: IntGaugeVec,
    /// Objects each tracked selector matches ([`crate::Store::metrics_track_selector`]).
    pub selector_objects: IntGaugeVec,
    /// The tracked selectors: name → selector text.
    pub(crate) tracked:
        std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
    pub gc_runs: IntCounter,
    pub gc_swept: IntCounterVec,
    pub gc_bytes_freed: IntCounter,
    pub gc_last_mark_seconds: prometheus::Gauge,
    pub gc_last_sweep_seconds: prometheus::Gauge,
    pub gc_writers_blocked_seconds: prometheus::Counter,
    pub gc_writers_blocked_max_seconds: prometheus::Gauge,
    /// The store's clock minus this host's wall clock, as last sampled: on PostgreSQL the store
    /// runs on the database server's clock (`ServerClock`); 0 on a store that runs on this host's.
    pub clock_offset_seconds: prometheus::Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

/// Upper bounds of [`Metrics::transaction_seconds`]'s buckets: a commit's WAL flush on a local
/// disk takes a fraction of a millisecond, a loaded queue's claim several milliseconds, a stall
/// or a database far away seconds.
const TRANSACTION_BUCKETS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric name");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

/// The kinds of [`Metrics::transaction_seconds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnKind {
    /// A batch of writes (objects, tags, World records, a finish, a fail…).
    Write,
    /// A batch of writes and, in the same backend call, the next claim (`Work::finish_and_claim`).
    WriteAndClaim,
    /// A claim (by selector or of one object).
    Claim,
}

impl TxnKind {
    /// Every kind, in [`TxnKind::index`] order.
    const ALL: [TxnKind; 3] = [TxnKind::Write, TxnKind::WriteAndClaim, TxnKind::Claim];

    fn index(self) -> usize {
        match self {
            TxnKind::Write => 0,
            TxnKind::WriteAndClaim => 1,
            TxnKind::Claim => 2,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            TxnKind::Write => "write",
            TxnKind::WriteAndClaim => "write_and_claim",
            TxnKind::Claim => "claim",
        }
    }
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Gauge {
    let g = prometheus::Gauge::new(name, help).expect("valid metric name");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn fcounter(registry: &Registry, name: &str, help: &str) -> prometheus::Counter {
    let c = prometheus::Counter::new(name, help).expect("valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

impl Metrics {
    /// Record one collection.
    pub fn gc(&self, s: &fleetdb_core::gc::GcStats) {
        self.gc_runs.inc();
        self.gc_swept
            .with_label_values(&["object"])
            .inc_by(s.swept_objects);
        self.gc_swept
            .with_label_values(&["blob"])
            .inc_by(s.swept_blobs);
        self.gc_swept
            .with_label_values(&["lease"])
            .inc_by(s.expired_leases);
        self.gc_bytes_freed.inc_by(s.bytes_freed);
        self.gc_last_mark_seconds.set(s.mark_ms / 1000.0);
        self.gc_last_sweep_seconds.set(s.sweep_ms / 1000.0);
        self.gc_writers_blocked_seconds
            .inc_by(s.writers_blocked_ms / 1000.0);
        self.gc_writers_blocked_max_seconds
            .set(s.writers_blocked_max_ms / 1000.0);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        let transaction_seconds = histogram_vec(
            &r,
            "fleetdb_transaction_duration_seconds",
            "Duration of the store's transactions (to the durable answer), by kind: write, write_and_claim, claim.",
            &["kind"],
            &TRANSACTION_BUCKETS,
        );
        let transaction_kinds =
            TxnKind::ALL.map(|k| transaction_seconds.with_label_values(&[k.label()]));
        Metrics {
            sessions_started: counter(
                &r,
                "fleetdb_sessions_started_total",
                "Sessions started by this process.",
            ),
            sessions_expired: counter(
                &r,
                "fleetdb_sessions_expired_total",
                "Expired sessions this process's sweeper removed (each counted once, by the process that swept it).",
            ),
            sessions_closed: counter(
                &r,
                "fleetdb_sessions_closed_total",
                "Sessions closed explicitly.",
            ),
            transactions_executed: counter(
                &r,
                "fleetdb_transactions_executed_total",
                "Write and claim transactions committed.",
            ),
            transactions_retried: counter(
                &r,
                "fleetdb_transactions_retried_total",
                "Transaction attempts that conflicted or failed transiently (PostgreSQL serialization failures and deadlocks, SQLite's write lock held by another process) and were run again (in the store or the backend).",
            ),
            transactions_failed: counter(
                &r,
                "fleetdb_transactions_failed_total",
                "Write and claim transactions that failed.",
            ),
            transaction_seconds,
            backend_retries_seen: Default::default(),
            transaction_kinds,
            work_started: counter_vec(
                &r,
                "fleetdb_work_started_total",
                "Claims taken.",
                &["process"],
            ),
            work_finished: counter_vec(
                &r,
                "fleetdb_work_finished_total",
                "Claims ended, by result (finished, canceled, failed, expired).",
                &["process", "result"],
            ),
            work_active: gauge_vec(
                &r,
                "fleetdb_work_active",
                "Claims held by live sessions.",
                &["process"],
            ),
            backoffs_active: gauge_vec(
                &r,
                "fleetdb_backoffs_active",
                "Backoffs not yet over.",
                &["process"],
            ),
            work_parked: gauge_vec(
                &r,
                "fleetdb_work_parked",
                "Objects parked after failing max_failures times in a row: no claim takes them until an operator clears their backoff.",
                &["process"],
            ),
            selector_objects: gauge_vec(
                &r,
                "fleetdb_selector_objects",
                "Objects a tracked selector matches (a workflow state), by the name it was tracked under.",
                &["selector"],
            ),
            tracked: Default::default(),
            gc_runs: counter(&r, "fleetdb_gc_runs_total", "Garbage collections run."),
            gc_swept: counter_vec(
                &r,
                "fleetdb_gc_swept_total",
                "Objects, blobs and expired leases removed by garbage collection.",
                &["type"],
            ),
            gc_bytes_freed: counter(
                &r,
                "fleetdb_gc_bytes_freed_total",
                "Blob bytes freed by garbage collection.",
            ),
            gc_last_mark_seconds: gauge(
                &r,
                "fleetdb_gc_last_mark_seconds",
                "Duration of the last collection's mark phase.",
            ),
            gc_last_sweep_seconds: gauge(
                &r,
                "fleetdb_gc_last_sweep_seconds",
                "Duration of the last collection's sweep phase.",
            ),
            gc_writers_blocked_seconds: fcounter(
                &r,
                "fleetdb_gc_writers_blocked_seconds_total",
                "Time writers waited on the collector's transactions.",
            ),
            gc_writers_blocked_max_seconds: gauge(
                &r,
                "fleetdb_gc_writers_blocked_max_seconds",
                "Longest single wait of writers on the last collection.",
            ),
            clock_offset_seconds: gauge(
                &r,
                "fleetdb_clock_offset_seconds",
                "The store's clock (the database server's, on PostgreSQL) minus this host's wall \
                 clock, as last sampled.",
            ),
            registry: r,
        }
    }
}

impl Metrics {
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Observe one transaction of `kind` that started at `since`.
    pub(crate) fn txn_time(&self, kind: TxnKind, since: Instant) {
        self.transaction_kinds[kind.index()].observe(since.elapsed().as_secs_f64());
    }

    /// Add the retries a backend made inside its own calls (`Backend::retries`, a running total)
    /// to `transactions_retried`, each once.
    pub(crate) fn backend_retries(&self, total: u64) {
        let prev = self
            .backend_retries_seen
            .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
        if total > prev {
            self.transactions_retried.inc_by(total - prev);
        }
    }

    /// The backend's retries before this store existed (a store made on a backend in use):
    /// not counted.
    pub(crate) fn backend_retries_before(&self, total: u64) {
        self.backend_retries_seen
            .store(total, std::sync::atomic::Ordering::Relaxed);
    }

    /// Record the result of a write transaction.
    pub(crate) fn txn<T>(&self, r: &crate::Result<T>) {
        match r {
            Ok(_) => self.transactions_executed.inc(),
            Err(_) => self.transactions_failed.inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_transaction_kind_observes_into_its_own_label() {
        let m = Metrics::default();
        for (n, kind) in TxnKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), n);
            for _ in 0..=n {
                m.txn_time(kind, Instant::now());
            }
        }
        for (n, kind) in TxnKind::ALL.into_iter().enumerate() {
            let h = m.transaction_seconds.with_label_values(&[kind.label()]);
            assert_eq!(h.get_sample_count(), n as u64 + 1, "{}", kind.label());
        }
    }

    /// docs/metrics.md's table names every metric the registry exports, with its type and its
    /// labels, and nothing else; counters end in `_total`, durations are in seconds, and each
    /// has a help text. Read from the text exposition, as a scrape sees it.
    #[test]
    fn the_documented_metrics_are_the_exported_ones() {
        use std::collections::BTreeMap;
        let m = Metrics::default();
        // A series of every labelled metric, so that each family shows in the exposition.
        m.work_started.with_label_values(&["P"]).inc();
        m.work_finished.with_label_values(&["P", "finished"]).inc();
        m.work_active.with_label_values(&["P"]).set(1);
        m.backoffs_active.with_label_values(&["P"]).set(1);
        m.work_parked.with_label_values(&["P"]).set(1);
        m.selector_objects.with_label_values(&["s"]).set(1);
        m.gc_swept.with_label_values(&["object"]).inc();
        let text = m.encode();
        // name -> (type, label names, help)
        let mut exported: BTreeMap<String, (String, Vec<String>, String)> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                exported.entry(name.into()).or_default().2 = help.into();
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                exported.entry(name.into()).or_default().0 = kind.into();
            } else if let Some((series, _)) = line.split_once(' ') {
                let (name, labels) = match series.split_once('{') {
                    Some((n, l)) => (n, l.trim_end_matches('}')),
                    None => (series, ""),
                };
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|f| exported.get(*f).is_some_and(|e| e.0 == "histogram"))
                    })
                    .unwrap_or(name);
                let names: Vec<String> = labels
                    .split(',')
                    .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
                    .filter(|k| k != "le")
                    .collect();
                let e = exported
                    .get_mut(family)
                    .expect("a series of a declared family");
                if e.1.is_empty() {
                    e.1 = names;
                }
            }
        }
        // The table: | `name`[, `name`] | type | labels | meaning |
        let docs = include_str!("../../../docs/metrics.md");
        let mut documented: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
        for row in docs.lines().filter(|l| l.starts_with("| `fleetdb_")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let ticked = |cell: &str| -> Vec<String> {
                cell.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect()
            };
            // Label cells name each label in backticks, its values in parentheses after it or,
            // for a lone label, after a colon.
            let mut depth = 0;
            let bare: String = cells[3]
                .split(':')
                .next()
                .unwrap_or_default()
                .chars()
                .filter(|c| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => return depth == 0,
                    }
                    false
                })
                .collect();
            let labels = ticked(&bare);
            for name in ticked(cells[1]) {
                documented.insert(name, (cells[2].to_string(), labels.clone()));
            }
        }
        let exported_names: Vec<&String> = exported.keys().collect();
        let documented_names: Vec<&String> = documented.keys().collect();
        assert_eq!(exported_names, documented_names, "{text}");
        for (name, (kind, labels, help)) in &exported {
            let (doc_kind, doc_labels) = &documented[name];
            assert_eq!(kind, doc_kind, "{name}'s type");
            assert_eq!(labels, doc_labels, "{name}'s labels");
            assert!(!help.is_empty(), "{name} has no help text");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name}: `_total` for counters only"
            );
            if name.contains("duration") || name.contains("_ms") {
                assert!(name.contains("_seconds"), "{name}: durations in seconds");
            }
        }
    }
}
