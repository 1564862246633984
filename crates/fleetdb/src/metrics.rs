//! Prometheus metrics of one store: counters updated as things happen, and gauges (active work
//! and active backoffs per process) computed from the store when [`Metrics::refresh`] runs. The
//! server exposes [`Metrics::encode`] at `/metrics`.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

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
    pub work_started: IntCounterVec,
    pub work_finished: IntCounterVec,
    pub work_active: IntGaugeVec,
    pub backoffs_active: IntGaugeVec,
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

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        Metrics {
            sessions_started: counter(
                &r,
                "fleetdb_sessions_started_total",
                "Sessions started by this process.",
            ),
            sessions_expired: counter(
                &r,
                "fleetdb_sessions_expired_total",
                "Sessions of this process that expired, plus expired sessions this process swept.",
            ),
            sessions_closed: counter(
                &r,
                "fleetdb_sessions_closed_total",
                "Sessions closed explicitly.",
            ),
            transactions_executed: counter(
                &r,
                "fleetdb_transactions_executed_total",
                "Write transactions committed.",
            ),
            transactions_retried: counter(
                &r,
                "fleetdb_transactions_retried_total",
                "Transaction attempts that conflicted and were run again.",
            ),
            transactions_failed: counter(
                &r,
                "fleetdb_transactions_failed_total",
                "Write transactions that failed.",
            ),
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

    /// Record the result of a write transaction.
    pub(crate) fn txn<T>(&self, r: &crate::Result<T>) {
        match r {
            Ok(_) => self.transactions_executed.inc(),
            Err(_) => self.transactions_failed.inc(),
        }
    }
}
