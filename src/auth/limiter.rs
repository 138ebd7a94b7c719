//! A failed-login rate limiter: after `max_failures` failures for one username within
//! `window`, further attempts are refused until the oldest failure leaves the window.
//!
//! Pure: every method takes `now`, so tests need no clock.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Usernames tracked before expired entries are swept (bounds memory under a spray of
/// made-up usernames).
const SWEEP_ABOVE: usize = 10_000;

/// Failed-login counts per username over a sliding window.
#[derive(Debug, Clone)]
pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    failures: HashMap<String, VecDeque<Instant>>,
}

impl LoginLimiter {
    /// A limiter allowing `max_failures` failures per `window` per username.
    pub fn new(max_failures: u32, window: Duration) -> LoginLimiter {
        LoginLimiter {
            max_failures: max_failures.max(1),
            window,
            failures: HashMap::new(),
        }
    }

    /// `Err(retry_after)` if `username` is locked out at `now`.
    pub fn check(&mut self, username: &str, now: Instant) -> Result<(), Duration> {
        let window = self.window;
        let Some(times) = self.failures.get_mut(username) else {
            return Ok(());
        };
        forget_before(times, now, window);
        if times.len() < self.max_failures as usize {
            return Ok(());
        }
        let oldest = times.front().copied().unwrap_or(now);
        Err((oldest + window).saturating_duration_since(now))
    }

    /// Records a failed attempt at `now`.
    pub fn record_failure(&mut self, username: &str, now: Instant) {
        if self.failures.len() >= SWEEP_ABOVE {
            self.sweep(now);
        }
        let times = self.failures.entry(username.to_owned()).or_default();
        forget_before(times, now, self.window);
        times.push_back(now);
        // Only the newest `max_failures` matter for the decision.
        while times.len() > self.max_failures as usize {
            times.pop_front();
        }
    }

    /// Records a successful login: the username's failures are forgotten.
    pub fn record_success(&mut self, username: &str) {
        self.failures.remove(username);
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

    #[test]
    fn locks_after_max_failures_until_window_passes() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = LoginLimiter::new(5, s(60));
        for i in 0..5 {
            assert_eq!(l.check("alice", t0 + s(i)), Ok(()));
            l.record_failure("alice", t0 + s(i));
        }
        assert_eq!(l.check("alice", t0 + s(5)), Err(s(55)));
        assert_eq!(l.check("bob", t0 + s(5)), Ok(()), "per username");
        assert_eq!(l.check("alice", t0 + s(59)), Err(s(1)));
        // The first failure leaves the window: one more attempt is allowed.
        assert_eq!(l.check("alice", t0 + s(60)), Ok(()));
        l.record_failure("alice", t0 + s(60));
        assert_eq!(l.check("alice", t0 + s(60)), Err(s(1)));
    }

    #[test]
    fn success_resets() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(2, Duration::from_secs(60));
        l.record_failure("a", t0);
        l.record_success("a");
        l.record_failure("a", t0);
        assert_eq!(l.check("a", t0), Ok(()));
        l.record_failure("a", t0);
        assert!(l.check("a", t0).is_err());
    }

    #[test]
    fn sweep_bounds_memory() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(5, Duration::from_secs(1));
        for i in 0..SWEEP_ABOVE {
            l.record_failure(&format!("u{i}"), t0);
        }
        l.record_failure("late", t0 + Duration::from_secs(2));
        assert_eq!(l.failures.len(), 1);
    }
}
