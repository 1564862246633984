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

    /// Move time forward by `d`, at most to the end of time (`Timestamp(i64::MAX)`: it never
    /// wraps around to before the epoch).
    pub fn advance(&self, d: Duration) {
        let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let _ = self
            .micros
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(us))
            });
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

/// The database server's clock, as this process reads it: the time the server gave in its best
/// sample, plus the time this process's monotonic clock counted since. On PostgreSQL every
/// component of a fleet runs on it by default, so their deadlines compare on one clock whatever
/// the hosts' own clocks say (a host whose clock ran a minute ahead would otherwise see every
/// other host's session as expired and take its claims, and its own sessions would outlive it by
/// a minute). SQLite's processes share one host's clock and use it directly.
///
/// A sample is one round trip: sent at `sent`, the server's time, answered at `received`. It is
/// placed halfway through the round trip, within half of it ([`ClockSample::error_micros`]); an
/// anchor's error then grows by [`ServerClock::DRIFT_PPM`] of the time since. A sample replaces
/// the anchor when its error is smaller than the anchor's now, or when the two disagree by more
/// than both errors together: the server's clock was stepped, or this host slept (its monotonic
/// clock stopped), and the new sample is the truth. Between samples the time follows this host's
/// boot clock ([`ServerClock::monotonic_micros`]: monotonic, and on Linux counting a suspend, so
/// a host resumed from sleep is not behind until its next sample), so steps of this host's own
/// wall clock (an NTP step, an operator's `date -s`) change nothing. Time may step back by up to the anchor's error when a better sample
/// replaces it (fractions of a millisecond on a local network), as a wall clock does.
///
/// Before its first sample it reads the `wall` clock, which it also uses to report this host's
/// offset from the server ([`ServerClock::offset_micros`]).
#[derive(Debug)]
pub struct ServerClock {
    wall: Arc<dyn Clock>,
    /// The anchor's server time minus its time on [`ServerClock::monotonic_micros`] (µs):
    /// [`Clock::now`] is one load and one monotonic reading. [`NO_ANCHOR`] before the first
    /// sample.
    base: AtomicI64,
    anchor: std::sync::Mutex<Option<Anchor>>,
}

/// [`ServerClock::base`] before the first sample.
const NO_ANCHOR: i64 = i64::MIN;

#[derive(Debug, Clone, Copy)]
struct Anchor {
    /// The server's time at `at` (the sample's midpoint).
    server: Timestamp,
    /// [`ServerClock::monotonic_micros`] at the sample's midpoint.
    at: i64,
    /// Half the sample's round trip (µs).
    error: i64,
}

/// One reading of the server's clock ([`ServerClock::offer`]): sent and received are times of
/// [`ServerClock::monotonic_micros`].
#[derive(Debug, Clone, Copy)]
pub struct ClockSample {
    pub sent: i64,
    pub server: Timestamp,
    pub received: i64,
}

impl ClockSample {
    /// Half the round trip (µs): how far the server's reading can be from the midpoint.
    pub fn error_micros(&self) -> i64 {
        self.received.saturating_sub(self.sent).max(0) / 2
    }

    fn midpoint(&self) -> i64 {
        self.sent.saturating_add(self.error_micros())
    }
}

/// What [`ServerClock::offer`] did with a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleUse {
    /// The first sample: the clock now follows the server.
    First,
    /// More precise than the anchor: it replaces it.
    Better,
    /// Disagrees with the anchor beyond both errors (a step of the server's clock, a suspend of
    /// this host): it replaces it.
    Stepped,
    /// No better than the anchor: ignored.
    Kept,
}

impl ServerClock {
    /// How fast a monotonic clock may run against the server's, at most, in parts per million
    /// (crystal oscillators drift tens of ppm; this bound is generous).
    pub const DRIFT_PPM: i64 = 100;

    pub fn new(wall: Arc<dyn Clock>) -> Self {
        ServerClock {
            wall,
            base: AtomicI64::new(NO_ANCHOR),
            anchor: std::sync::Mutex::new(None),
        }
    }

    /// Take a sample into account (see the type's documentation).
    pub fn offer(&self, sample: ClockSample) -> SampleUse {
        let at = sample.midpoint();
        let error = sample.error_micros();
        let mut anchor = self.anchor.lock().unwrap_or_else(|p| p.into_inner());
        let used = match *anchor {
            None => SampleUse::First,
            Some(a) => {
                let since = at.saturating_sub(a.at);
                let predicted = a.server.0.saturating_add(since);
                let anchor_error = a.error.saturating_add(drift_micros(since));
                if sample.server.0.abs_diff(predicted) > anchor_error.saturating_add(error) as u64 {
                    SampleUse::Stepped
                } else if error < anchor_error {
                    SampleUse::Better
                } else {
                    SampleUse::Kept
                }
            }
        };
        if used != SampleUse::Kept {
            *anchor = Some(Anchor {
                server: sample.server,
                at,
                error,
            });
            let base = sample.server.0.saturating_sub(at).max(NO_ANCHOR + 1);
            self.base.store(base, Ordering::Release);
        }
        used
    }

    /// The server's clock minus this host's wall clock now (µs): read live, so a step of the
    /// wall clock shows at once; `None` before the first sample.
    pub fn offset_micros(&self) -> Option<i64> {
        self.anchor()?;
        Some(self.now().0.saturating_sub(self.wall.now().0))
    }

    /// How far [`Clock::now`] may be from the server's clock now (µs); `None` before the first
    /// sample.
    pub fn error_micros(&self) -> Option<i64> {
        self.anchor().map(|a| {
            a.error
                .saturating_add(drift_micros(Self::monotonic_micros().saturating_sub(a.at)))
        })
    }

    /// This host's boot clock in µs, the time base of samples and of [`Clock::now`] between
    /// them: monotonic and, on Linux (`CLOCK_BOOTTIME`), counting the time the host was
    /// suspended (`Instant`, `CLOCK_MONOTONIC`, stops then: a resumed host's store would run
    /// behind by the suspend until its next sample, its expired sessions alive to it). Elsewhere
    /// `Instant` since the first reading.
    pub fn monotonic_micros() -> i64 {
        #[cfg(target_os = "linux")]
        {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes `ts`; CLOCK_BOOTTIME exists since Linux 2.6.39.
            unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
            // `time_t` and `c_long` are 32 bits wide on some targets.
            #[allow(clippy::unnecessary_cast)]
            let micros = (ts.tv_sec as i64)
                .saturating_mul(1_000_000)
                .saturating_add(ts.tv_nsec as i64 / 1_000);
            micros
        }
        #[cfg(not(target_os = "linux"))]
        {
            static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            let d = ORIGIN.get_or_init(std::time::Instant::now).elapsed();
            i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
        }
    }

    fn anchor(&self) -> Option<Anchor> {
        *self.anchor.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How far a monotonic clock may have drifted from the server's over `since` µs.
fn drift_micros(since: i64) -> i64 {
    let d = i128::from(since.unsigned_abs()) * i128::from(ServerClock::DRIFT_PPM) / 1_000_000;
    i64::try_from(d).unwrap_or(i64::MAX)
}

impl Clock for ServerClock {
    fn now(&self) -> Timestamp {
        match self.base.load(Ordering::Acquire) {
            NO_ANCHOR => self.wall.now(),
            base => Timestamp(base.saturating_add(Self::monotonic_micros())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manual clock advanced past the end of time stays at its end: before, `advance` added
    /// with a wrapping atomic add, and `advance(Duration::MAX)` (a test's "long after
    /// everything expired") moved time to 292,000 years before the epoch, where every session,
    /// claim and lease looked alive again.
    #[test]
    fn manual_clock_advance_saturates_at_the_end_of_time() {
        let c = ManualClock::new(Timestamp(1_767_225_600_000_000));
        c.advance(Duration::MAX);
        assert_eq!(c.now(), Timestamp(i64::MAX));
        c.advance(Duration::from_secs(1));
        assert_eq!(c.now(), Timestamp(i64::MAX));
        let c = ManualClock::new(Timestamp(i64::MAX - 5));
        c.advance(Duration::from_micros(10));
        assert_eq!(c.now(), Timestamp(i64::MAX));
    }

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

    /// A sample of `server` taken over a round trip of `rtt_ms` that ended `ago_ms` before now.
    fn sample(server: Timestamp, rtt_ms: i64, ago_ms: i64) -> ClockSample {
        let received = ServerClock::monotonic_micros() - ago_ms * 1_000;
        ClockSample {
            sent: received - rtt_ms * 1_000,
            server,
            received,
        }
    }

    /// `now` of `clock` minus `t`, in ms.
    fn ahead_ms(clock: &ServerClock, t: Timestamp) -> i64 {
        (clock.now().0 - t.0) / 1000
    }

    #[test]
    fn a_server_clock_follows_the_server_not_the_wall() {
        let wall = ManualClock::new(Timestamp(1_000_000_000_000));
        let clock = ServerClock::new(Arc::new(wall.clone()));
        // Before any sample: the wall clock.
        assert_eq!(clock.now(), wall.now());
        assert_eq!(clock.offset_micros(), None);
        // The server is an hour ahead of this host's wall clock.
        let server = Timestamp(wall.now().0 + 3_600_000_000);
        assert_eq!(clock.offer(sample(server, 2, 50)), SampleUse::First);
        // Its time: the server's, plus what passed since the sample's midpoint (51 ms ago).
        let ahead = ahead_ms(&clock, server);
        assert!((50..1_000).contains(&ahead), "{ahead} ms");
        let offset = clock.offset_micros().unwrap();
        assert!((offset - 3_600_000_000).abs() < 1_000_000, "{offset}");
        assert_eq!(clock.error_micros().map(|e| e / 1000), Some(1));
        // A step of the wall clock changes nothing but the offset, which shows it at once.
        wall.advance(Duration::from_secs(7_200));
        let offset = clock.offset_micros().unwrap();
        assert!((offset + 3_600_000_000).abs() < 1_000_000, "{offset}");
        wall.set(Timestamp(5));
        let ahead = ahead_ms(&clock, server);
        assert!((50..1_000).contains(&ahead), "{ahead} ms");
    }

    /// The time base counts like the monotonic clock (and never goes back).
    #[test]
    fn the_boot_clock_counts_real_time() {
        let (t0, i0) = (ServerClock::monotonic_micros(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (t1, i1) = (ServerClock::monotonic_micros(), std::time::Instant::now());
        let instant = i64::try_from((i1 - i0).as_micros()).unwrap();
        assert!(t1 >= t0 + 20_000, "{t0} → {t1}");
        assert!(
            (t1 - t0 - instant).abs() < 2_000,
            "{} vs {instant} µs",
            t1 - t0
        );
    }

    #[test]
    fn a_server_clock_keeps_its_most_precise_sample_and_follows_steps() {
        let clock = ServerClock::new(Arc::new(SystemClock));
        let t = Timestamp(1_800_000_000_000_000);
        assert_eq!(clock.offer(sample(t, 20, 100)), SampleUse::First);
        // 90 ms later, within the first one's ±10 ms: a sample of ±1 ms is better.
        let better = Timestamp(t.0 + 90_000 + 4_000);
        assert_eq!(clock.offer(sample(better, 2, 10)), SampleUse::Better);
        assert_eq!(clock.error_micros().map(|e| e / 1000), Some(1));
        // A less precise one that agrees is ignored.
        let worse = Timestamp(better.0 + 5_000);
        assert_eq!(clock.offer(sample(worse, 30, 0)), SampleUse::Kept);
        let ahead = ahead_ms(&clock, better);
        assert!((9..1_000).contains(&ahead), "{ahead} ms");
        // One that disagrees beyond both errors: the server's clock was stepped back a minute.
        let stepped = Timestamp(better.0 - 60_000_000);
        assert_eq!(clock.offer(sample(stepped, 30, 0)), SampleUse::Stepped);
        let ahead = ahead_ms(&clock, stepped);
        assert!((14..1_000).contains(&ahead), "{ahead} ms");
        // The anchor's error grows with the time since it: a sample as precise as it, an hour
        // later, replaces it (its drift bound makes the old one worse).
        let at = clock.now();
        let hour = 3_600_000_000;
        let later = ClockSample {
            sent: ServerClock::monotonic_micros() + hour,
            server: Timestamp(at.0 + hour),
            received: ServerClock::monotonic_micros() + hour + 30_000,
        };
        assert_eq!(clock.offer(later), SampleUse::Better);
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
