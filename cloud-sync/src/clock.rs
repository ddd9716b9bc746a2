//! Time on a gateway without a real-time clock.
//!
//! Many gateways boot at 1970 and learn the time from NTP minutes later, or
//! never. sluice therefore keeps two timelines:
//! - the **wall clock**, stamped on readings that carry no `ts`, together with
//!   whether it was *trusted* (synchronised) at that moment;
//! - a **monotonic boot timeline** (`boot` id + milliseconds since boot, from
//!   `/proc/uptime`, which counts suspend), which never jumps. The outbox uses
//!   it for age limits and to re-stamp untrusted readings once the wall clock
//!   becomes trusted (same boot only).
//!
//! Trust (`gateway.clock`): `"auto"` trusts the wall clock when
//! systemd-timesyncd says it is synchronised (`/run/systemd/timesync/synchronized`
//! exists); where timesyncd is not in use (no `/run/systemd/timesync`), it
//! trusts a wall clock later than this binary's build date, since an
//! un-set clock reads 1970 or the image's build time. `"trusted"` and
//! `"untrusted"` override the detection.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// 2026-11-01T00:00:00Z: a wall clock before this is certainly not set.
const EARLIEST_PLAUSIBLE_MS: i64 = 1_793_491_200_000;

/// How the wall clock's trust is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockMode {
    /// Detect (see the module docs).
    Auto,
    /// Always trusted.
    Trusted,
    /// Never trusted.
    Untrusted,
}

/// One reading of both timelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Wall clock, unix ms.
    pub wall_ms: i64,
    /// Whether the wall clock was trusted.
    pub trusted: bool,
    /// This boot's id (hash of the kernel's boot_id).
    pub boot: i64,
    /// Milliseconds since boot (monotonic, counts suspend).
    pub mono_ms: i64,
}

/// The gateway's clock.
#[derive(Debug)]
pub struct Clock {
    mode: ClockMode,
    trusted: AtomicBool,
    /// Added to the system's wall clock; only tests set it (to simulate a
    /// gateway that booted at 1970, or a clock jump).
    wall_skew_ms: AtomicI64,
    boot: i64,
    mono_at_start_ms: i64,
    started: Instant,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn boot_hash() -> i64 {
    // FNV-1a of the kernel's boot id: stable for the boot, different after.
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.trim().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Keep it positive and within SQLite's integer range.
    i64::try_from(h >> 1).unwrap_or(0)
}

fn uptime_ms() -> i64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(0, |secs| (secs * 1000.0) as i64)
}

impl Clock {
    /// Reads the boot id and uptime once and decides the initial trust.
    pub fn new(mode: ClockMode) -> Self {
        let c = Self {
            mode,
            trusted: AtomicBool::new(false),
            wall_skew_ms: AtomicI64::new(0),
            boot: boot_hash(),
            mono_at_start_ms: uptime_ms(),
            started: Instant::now(),
        };
        c.trusted.store(c.detect(), Ordering::Relaxed);
        c
    }

    /// A clock with fixed trust and a given boot, for tests.
    pub fn fixed(trusted: bool, boot: i64) -> Self {
        Self {
            mode: if trusted {
                ClockMode::Trusted
            } else {
                ClockMode::Untrusted
            },
            trusted: AtomicBool::new(trusted),
            wall_skew_ms: AtomicI64::new(0),
            boot,
            mono_at_start_ms: 0,
            started: Instant::now(),
        }
    }

    fn detect(&self) -> bool {
        match self.mode {
            ClockMode::Trusted => true,
            ClockMode::Untrusted => false,
            ClockMode::Auto => {
                if Path::new("/run/systemd/timesync").exists() {
                    Path::new("/run/systemd/timesync/synchronized").exists()
                } else {
                    self.wall_ms() >= EARLIEST_PLAUSIBLE_MS
                }
            }
        }
    }

    /// Re-detects trust; returns true when the clock just became trusted.
    pub fn refresh(&self) -> bool {
        let now = self.detect();
        let before = self.trusted.swap(now, Ordering::Relaxed);
        now && !before
    }

    /// Marks the clock trusted or not (tests, and `gateway.clock` overrides).
    pub fn set_trusted(&self, trusted: bool) {
        self.trusted.store(trusted, Ordering::Relaxed);
    }

    /// Shifts this clock's wall time by `ms` (tests: a clock jump, or a
    /// gateway that booted at 1970).
    pub fn skew_wall_for_tests(&self, ms: i64) {
        self.wall_skew_ms.store(ms, Ordering::Relaxed);
    }

    /// The wall clock, unix ms.
    pub fn wall_ms(&self) -> i64 {
        wall_ms() + self.wall_skew_ms.load(Ordering::Relaxed)
    }

    /// Whether the wall clock is trusted now.
    pub fn trusted(&self) -> bool {
        self.trusted.load(Ordering::Relaxed)
    }

    /// This boot's id.
    pub fn boot(&self) -> i64 {
        self.boot
    }

    /// Milliseconds since boot.
    pub fn mono_ms(&self) -> i64 {
        self.mono_at_start_ms + i64::try_from(self.started.elapsed().as_millis()).unwrap_or(0)
    }

    /// Both timelines now.
    pub fn now(&self) -> Stamp {
        Stamp {
            wall_ms: self.wall_ms(),
            trusted: self.trusted(),
            boot: self.boot,
            mono_ms: self.mono_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_timeline_moves_forward_and_the_boot_id_is_stable() {
        let c = Clock::new(ClockMode::Auto);
        let a = c.now();
        let b = c.now();
        assert!(b.mono_ms >= a.mono_ms);
        assert_eq!(a.boot, Clock::new(ClockMode::Auto).boot());
    }

    #[test]
    fn overrides_win_over_detection() {
        assert!(Clock::new(ClockMode::Trusted).trusted());
        assert!(!Clock::new(ClockMode::Untrusted).trusted());
        let c = Clock::fixed(false, 1);
        c.set_trusted(true);
        assert!(c.trusted());
    }
}
