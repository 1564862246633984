//! A store on the database server's clock (PostgreSQL, [`crate::ServerClock`]): it is sampled
//! again every [`CLOCK_SYNC_INTERVAL`] by the background task, its offset from this host's wall
//! clock is published (`fleetdb_clock_offset_seconds`), and an offset of [`CLOCK_OFFSET_WARN`] or
//! more is logged: the store is right (it runs on the server's clock), but whatever else on the
//! host uses its wall clock (logs, other programs) is not.

use std::time::Duration;

use crate::Store;

/// How often the background task samples the server's clock again.
pub const CLOCK_SYNC_INTERVAL: Duration = Duration::from_secs(10);

/// An offset between this host's wall clock and the server's this large is logged (once per
/// change of that size).
pub const CLOCK_OFFSET_WARN: Duration = Duration::from_secs(1);

impl Store {
    /// The store's clock minus this host's wall clock (µs): `Some` when the store runs on the
    /// database server's clock (PostgreSQL, no clock given at open), read now.
    pub fn clock_offset_micros(&self) -> Option<i64> {
        self.backend.clock_offset()
    }

    /// Sample the server's clock once more (the background task, every [`CLOCK_SYNC_INTERVAL`]).
    /// A failed sample keeps the anchor the clock has (its error grows by the drift bound).
    pub(crate) async fn clock_sync(&self) {
        match tokio::time::timeout(CLOCK_SYNC_INTERVAL / 2, self.backend.clock_sync()).await {
            Ok(Ok(Some(_))) => self.clock_offset_seen(),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "sampling the database server's clock failed")
            }
            Err(_) => tracing::debug!("sampling the database server's clock timed out"),
        }
    }

    /// Publish the offset of the server's clock: the gauge, and a warning when it is at least
    /// [`CLOCK_OFFSET_WARN`] and moved by that much since the last value published.
    pub(crate) fn clock_offset_seen(&self) {
        let Some(offset) = self.clock_offset_micros() else {
            return;
        };
        let seconds = offset as f64 / 1e6;
        let before = self.metrics.clock_offset_seconds.get();
        self.metrics.clock_offset_seconds.set(seconds);
        if (seconds - before).abs() >= CLOCK_OFFSET_WARN.as_secs_f64() {
            if let Some(warning) = self.clock_warning() {
                tracing::warn!(offset_seconds = seconds, "{warning}");
            }
        }
    }

    /// What an operator should hear about this host's clock: `Some` when the store runs on the
    /// database server's clock and this host's differs from it by [`CLOCK_OFFSET_WARN`] or more
    /// (the CLI prints it with every command, as it prints the durability warnings).
    pub fn clock_warning(&self) -> Option<String> {
        let seconds = self.clock_offset_micros()? as f64 / 1e6;
        if seconds.abs() < CLOCK_OFFSET_WARN.as_secs_f64() {
            return None;
        }
        let (by, how) = if seconds > 0.0 {
            (seconds, "behind")
        } else {
            (-seconds, "ahead of")
        };
        Some(format!(
            "this host's clock is {by:.3} s {how} the database server's: FleetDB's sessions, \
             claims and backoffs run on the server's clock, but this host's logs and programs do \
             not (synchronise it with NTP)"
        ))
    }
}
