//! A failed-login rate limiter: after `max_failures` failures for one (client address,
//! username) within `window`, further attempts from that client for that user are refused
//! until the oldest failure leaves the window. Keyed by client too, so that nobody can lock
//! a user out for everyone by guessing wrong on purpose.
//!
//! Its state is bounded: usernames are validated (at most 64 bytes) before they get here,
//! and at most [`MAX_TRACKED`] keys are kept; when that many keys all have failures inside
//! the window, attempts from keys not yet tracked are refused until some expire (fail
//! closed, rather than forget a lockout).
//!
//! Pure: every method takes `now`, so tests need no clock.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Keys tracked before expired entries are swept.
const SWEEP_ABOVE: usize = 10_000;
/// Most keys tracked at once.
pub const MAX_TRACKED: usize = 100_000;

/// Who is trying: the client's address (when known) and the username.
pub type LoginKey<'a> = (Option<IpAddr>, &'a str);

/// Failed-login counts per (client, username) over a sliding window.
#[derive(Debug, Clone)]
pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    max_tracked: usize,
    failures: HashMap<(Option<IpAddr>, String), VecDeque<Instant>>,
}

fn owned(key: LoginKey<'_>) -> (Option<IpAddr>, String) {
    (key.0, key.1.to_owned())
}

impl LoginLimiter {
    /// A limiter allowing `max_failures` failures per `window` per (client, username).
    pub fn new(max_failures: u32, window: Duration) -> LoginLimiter {
        LoginLimiter {
            max_failures: max_failures.max(1),
            window,
            max_tracked: MAX_TRACKED,
            failures: HashMap::new(),
        }
    }

    /// `Err(retry_after)` if `key` is locked out at `now` (or the table is full of live
    /// lockouts and `key` is not among them).
    pub fn check(&mut self, key: LoginKey<'_>, now: Instant) -> Result<(), Duration> {
        let window = self.window;
        let Some(times) = self.failures.get_mut(&owned(key)) else {
            if self.failures.len() >= self.max_tracked {
                self.sweep(now);
                if self.failures.len() >= self.max_tracked {
                    return Err(self.window);
                }
            }
            return Ok(());
        };
        forget_before(times, now, window);
        if times.len() < self.max_failures as usize {
            return Ok(());
        }
        let oldest = times.front().copied().unwrap_or(now);
        Err((oldest + window).saturating_duration_since(now))
    }

    /// Records a failed attempt at `now` (not kept when the table is full of live keys:
    /// [`Self::check`] refuses new keys then).
    pub fn record_failure(&mut self, key: LoginKey<'_>, now: Instant) {
        let key = owned(key);
        if !self.failures.contains_key(&key) {
            if self.failures.len() >= SWEEP_ABOVE {
                self.sweep(now);
            }
            if self.failures.len() >= self.max_tracked {
                return;
            }
        }
        let times = self.failures.entry(key).or_default();
        forget_before(times, now, self.window);
        times.push_back(now);
        // Only the newest `max_failures` matter for the decision.
        while times.len() > self.max_failures as usize {
            times.pop_front();
        }
    }

    /// Records a successful login: this client's failures for the user are forgotten.
    pub fn record_success(&mut self, key: LoginKey<'_>) {
        self.failures.remove(&owned(key));
    }

    /// Drops usernames with no failure inside the window.
    fn sweep(&mut self, now: Instant) {
        let window = self.window;
        self.failures.retain(|_, times| {
            forget_before(times, now, window);
            !times.is_empty()
        });
    }
}

fn forget_before(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: LoginKey<'static> = (None, "alice");
    const OTHER: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));

    #[test]
    fn locks_after_max_failures_until_window_passes() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = LoginLimiter::new(5, s(60));
        for i in 0..5 {
            assert_eq!(l.check(ALICE, t0 + s(i)), Ok(()));
            l.record_failure(ALICE, t0 + s(i));
        }
        assert_eq!(l.check(ALICE, t0 + s(5)), Err(s(55)));
        assert_eq!(l.check((None, "bob"), t0 + s(5)), Ok(()), "per username");
        assert_eq!(l.check((OTHER, "alice"), t0 + s(5)), Ok(()), "per client");
        assert_eq!(l.check(ALICE, t0 + s(59)), Err(s(1)));
        // The first failure leaves the window: one more attempt is allowed.
        assert_eq!(l.check(ALICE, t0 + s(60)), Ok(()));
        l.record_failure(ALICE, t0 + s(60));
        assert_eq!(l.check(ALICE, t0 + s(60)), Err(s(1)));
    }

    #[test]
    fn success_resets() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(2, Duration::from_secs(60));
        l.record_failure((None, "a"), t0);
        l.record_success((None, "a"));
        l.record_failure((None, "a"), t0);
        assert_eq!(l.check((None, "a"), t0), Ok(()));
        l.record_failure((None, "a"), t0);
        assert!(l.check((None, "a"), t0).is_err());
    }

    #[test]
    fn sweep_bounds_memory() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(5, Duration::from_secs(1));
        for i in 0..SWEEP_ABOVE {
            l.record_failure((None, &format!("u{i}")), t0);
        }
        l.record_failure((None, "late"), t0 + Duration::from_secs(2));
        assert_eq!(l.failures.len(), 1);
    }

    /// Regression (issue 19, item 8): a flood of usernames keeps the table bounded, and a
    /// full table of live lockouts refuses new keys rather than forgetting a lockout.
    #[test]
    fn table_is_bounded_and_fails_closed() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(5, Duration::from_secs(60));
        l.max_tracked = 100;
        for i in 0..1000 {
            l.record_failure((None, &format!("u{i}")), t0);
        }
        assert_eq!(l.failures.len(), 100);
        assert!(l.check((None, "newcomer"), t0).is_err());
        assert_eq!(
            l.check((None, "u1"), t0),
            Ok(()),
            "tracked keys decide as before"
        );
        // Once the window passes, the table empties and new keys are let in again.
        assert_eq!(
            l.check((None, "newcomer"), t0 + Duration::from_secs(61)),
            Ok(())
        );
    }
}
