//! The wall clock the broker reads (lease deadlines, redelivery times, publish timestamps,
//! the dedup window, retention ages), behind a handle that tests can stop and move.
//!
//! The group state machines never read a clock: they take `now` as an argument. The broker
//! reads it here, so a test can open a broker on [`Clock::manual`] and [`Clock::advance`]
//! it past a visibility timeout instead of sleeping through one.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// A source of "now" in milliseconds since the Unix epoch. Cloning shares the clock.
#[derive(Clone, Default)]
pub struct Clock {
    /// `None`: the system clock. `Some`: a manual clock at this many ms.
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock standing at `start_ms` until [`Clock::advance`]d or [`Clock::set_ms`].
    pub fn manual(start_ms: i64) -> Self {
        Self {
            manual: Some(Arc::new(AtomicI64::new(start_ms))),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(ms) => ms.load(Ordering::SeqCst),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        }
    }

    /// Moves a manual clock forward by `by`; returns false (and does nothing) on the system
    /// clock, which nobody moves.
    pub fn advance(&self, by: Duration) -> bool {
        let Some(ms) = &self.manual else {
            return false;
        };
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        let _ = ms.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
            Some(now.saturating_add(by))
        });
        true
    }

    /// Sets a manual clock to `ms`; returns false (and does nothing) on the system clock.
    pub fn set_ms(&self, ms: i64) -> bool {
        match &self.manual {
            Some(now) => {
                now.store(ms, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            Some(ms) => write!(f, "Clock::manual({})", ms.load(Ordering::SeqCst)),
            None => f.write_str("Clock::system()"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_share_it() {
        let clock = Clock::manual(1_000);
        let shared = clock.clone();
        assert_eq!(clock.now_ms(), 1_000);
        assert!(shared.advance(Duration::from_millis(250)));
        assert_eq!(clock.now_ms(), 1_250);
        assert!(clock.set_ms(5));
        assert_eq!(shared.now_ms(), 5);
    }

    #[test]
    fn the_system_clock_is_near_now_and_cannot_be_moved() {
        let clock = Clock::system();
        assert!(clock.now_ms() > 1_600_000_000_000, "after 2020");
        assert!(!clock.advance(Duration::from_secs(1)));
        assert!(!clock.set_ms(0));
    }
}
