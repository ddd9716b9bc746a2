//! Failed-authentication throttling per source IP address.
//!
//! Every refused credential counts against the address it came from; once
//! an address has `limit` failures inside one `window`, further connection
//! attempts from it are refused without looking at their credentials until
//! the window that started with its first failure is over (so a guessing
//! client gets `limit` guesses per window, a correct client behind the same
//! NAT is locked out for at most one window). Successful logins do not reset
//! the count. The table is bounded: when it is full, expired entries go
//! first, then the oldest window.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses tracked at once.
const MAX_TRACKED: usize = 4096;

/// The throttle (shared by the listeners that authenticate devices).
pub struct AuthThrottle {
    limit: u32,
    window: Duration,
    table: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl AuthThrottle {
    /// Allows `limit` failures per address per `window`; `limit` 0 = off.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` may try to authenticate now.
    pub fn allowed(&self, ip: IpAddr, now: Instant) -> bool {
        if self.limit == 0 {
            return true;
        }
        let Ok(g) = self.table.lock() else {
            return true;
        };
        match g.get(&ip) {
            Some((start, n)) => *n < self.limit || now.duration_since(*start) >= self.window,
            None => true,
        }
    }

    /// Counts one failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if self.limit == 0 {
            return;
        }
        let Ok(mut g) = self.table.lock() else {
            return;
        };
        if !g.contains_key(&ip) && g.len() >= MAX_TRACKED {
            let window = self.window;
            g.retain(|_, (start, _)| now.duration_since(*start) < window);
            if g.len() >= MAX_TRACKED
                && let Some(oldest) = g.iter().min_by_key(|(_, (s, _))| *s).map(|(k, _)| *k)
            {
                g.remove(&oldest);
            }
        }
        let e = g.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_locked_out_after_the_limit_until_its_window_ends() {
        let t = AuthThrottle::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(t.allowed(a, t0), "attempt {i}");
            t.failed(a, t0 + Duration::from_secs(i));
        }
        assert!(!t.allowed(a, t0 + Duration::from_secs(10)));
        assert!(
            t.allowed(b, t0 + Duration::from_secs(10)),
            "others unaffected"
        );
        assert!(t.allowed(a, t0 + Duration::from_secs(60)), "window over");
        t.failed(a, t0 + Duration::from_secs(61));
        assert!(t.allowed(a, t0 + Duration::from_secs(62)), "a fresh window");
    }

    #[test]
    fn off_means_off_and_the_table_stays_bounded() {
        let off = AuthThrottle::new(0, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..100 {
            off.failed(a, t0);
        }
        assert!(off.allowed(a, t0));
        let t = AuthThrottle::new(1, Duration::from_secs(60));
        for i in 0..(MAX_TRACKED as u32 + 10) {
            t.failed(
                IpAddr::from(i.to_be_bytes()),
                t0 + Duration::from_millis(u64::from(i)),
            );
        }
        assert!(t.table.lock().unwrap().len() <= MAX_TRACKED);
        // The newest offender is still tracked.
        let last = IpAddr::from((MAX_TRACKED as u32 + 9).to_be_bytes());
        assert!(!t.allowed(last, t0 + Duration::from_secs(1)));
    }
}
