//! Time is an input: every rule that depends on "now" takes it from a [`Clock`], so tests move
//! time with [`ManualClock::advance`] instead of sleeping.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: microseconds since the Unix epoch (UTC). Stored as a 64-bit integer in every
/// backend, so both have the same precision and no time-zone handling.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const EPOCH: Timestamp = Timestamp(0);

    pub fn from_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    pub fn as_micros(self) -> i64 {
        self.0
    }

    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Timestamp(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    /// RFC 3339 with microseconds, e.g. `2026-11-25T10:00:00.000000Z`.
    /// Times RFC 3339 cannot write (before 1970 or after 9999) are written as microseconds from
    /// the epoch, e.g. `5us-before-epoch` (a parked backoff's `until` is `i64::MAX`).
    pub fn to_rfc3339(self) -> String {
        if self.0 < 0 {
            return format!("{}us-before-epoch", self.0.unsigned_abs());
        }
        if self.0 >= Self::YEAR_10000.0 {
            return format!("{}us-after-epoch", self.0);
        }
        let t = UNIX_EPOCH + Duration::from_micros(self.0 as u64);
        humantime::format_rfc3339_micros(t).to_string()
    }

    /// 10000-01-01T00:00:00Z, the first time RFC 3339 cannot write.
    const YEAR_10000: Timestamp = Timestamp(253_402_300_800 * 1_000_000);
}

/// `t + d`, saturating.
impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        )
    }
}

/// `t - d`, saturating.
impl std::ops::Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        )
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// The source of "now".
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system(SystemTime::now())
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    micros: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            micros: Arc::new(AtomicI64::new(start.0)),
        }
    }

    /// Move time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        self.micros.fetch_add(us, Ordering::SeqCst);
    }

    /// Set the time (may move backwards, to test clock steps).
    pub fn set(&self, t: Timestamp) {
        self.micros.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.micros.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp(1_000_000));
        assert_eq!(c.now(), Timestamp(1_000_000));
        c.advance(Duration::from_secs(2));
        assert_eq!(c.now(), Timestamp(3_000_000));
        let c2 = c.clone();
        c2.advance(Duration::from_micros(5));
        assert_eq!(c.now(), Timestamp(3_000_005));
    }

    #[test]
    fn rfc3339() {
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            Timestamp(1_500_000).to_rfc3339(),
            "1970-01-01T00:00:01.500000Z"
        );
        // The edges RFC 3339 cannot write are written, not a panic (`to_string` of humantime's
        // formatter fails past the year 9999).
        assert_eq!(
            Timestamp(253_402_300_800 * 1_000_000 - 1).to_rfc3339(),
            "9999-12-31T23:59:59.999999Z"
        );
        assert_eq!(
            Timestamp(253_402_300_800 * 1_000_000).to_rfc3339(),
            "253402300800000000us-after-epoch"
        );
        assert_eq!(
            Timestamp(i64::MAX).to_string(),
            "9223372036854775807us-after-epoch"
        );
        assert_eq!(
            Timestamp(i64::MIN).to_rfc3339(),
            "9223372036854775808us-before-epoch"
        );
        assert_eq!(Timestamp(-5).to_rfc3339(), "5us-before-epoch");
    }
}
