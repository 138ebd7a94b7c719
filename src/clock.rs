//! The wall clock the broker reads (lease deadlines, redelivery times, publish timestamps,
//! the dedup window, retention ages), behind a handle that tests can stop and move.
//!
//! The group state machines never read a clock: they take `now` as an argument. The broker
//! reads it here, so a test can open a broker on [`Clock::manual`] and [`Clock::advance`]
//! it past a visibility timeout instead of sleeping through one.
//!
//! [`Ticks`] is the beat of the background tasks that run every so often until the server
//! stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

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

/// The beat of a background task: a tick every period until `stop` is cancelled. A tick
/// missed while the task was busy is not made up: the next one comes a period later.
pub struct Ticks {
    interval: tokio::time::Interval,
    stop: CancellationToken,
}

impl Ticks {
    /// Ticks every `period`, the first at once.
    pub fn new(period: Duration, stop: CancellationToken) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { interval, stop }
    }

    /// Ticks every `period`, the first a period from now.
    pub fn after(period: Duration, stop: CancellationToken) -> Self {
        let mut ticks = Self::new(period, stop);
        ticks.interval.reset();
        ticks
    }

    /// Waits for the next tick: `false` once `stop` is cancelled (the task then ends).
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.interval.tick() => !self.stop.is_cancelled(),
            _ = self.stop.cancelled() => false,
        }
    }

    /// True once `stop` is cancelled (for a task to give up a long round).
    pub fn stopped(&self) -> bool {
        self.stop.is_cancelled()
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

    /// The first tick comes at once (`new`) or a period later (`after`); a cancelled stop
    /// ends the wait at once, however long the period. (The short waits below only tell
    /// a tick due now from one due in an hour.)
    #[tokio::test]
    async fn ticks_end_when_stopped() {
        use tokio::time::timeout;
        let (hour, guard, short) = (
            Duration::from_secs(3600),
            Duration::from_secs(30),
            Duration::from_millis(50),
        );
        let stop = CancellationToken::new();
        let mut ticks = Ticks::new(hour, stop.clone());
        assert_eq!(
            timeout(guard, ticks.next()).await,
            Ok(true),
            "the first at once"
        );
        assert!(
            timeout(short, ticks.next()).await.is_err(),
            "the next in an hour"
        );
        let mut later = Ticks::after(hour, stop.clone());
        assert!(
            timeout(short, later.next()).await.is_err(),
            "the first in an hour"
        );
        assert!(!ticks.stopped());
        stop.cancel();
        assert!(ticks.stopped());
        assert_eq!(timeout(guard, ticks.next()).await, Ok(false));
        assert_eq!(timeout(guard, later.next()).await, Ok(false));
    }

    #[test]
    fn the_system_clock_is_near_now_and_cannot_be_moved() {
        let clock = Clock::system();
        assert!(clock.now_ms() > 1_600_000_000_000, "after 2020");
        assert!(!clock.advance(Duration::from_secs(1)));
        assert!(!clock.set_ms(0));
    }
}
