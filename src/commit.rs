//! Group commit: one fsync, on a sync thread, for every writer that wrote while the previous
//! one ran. Shared by the partition log and the group journal.
//!
//! Writers write on their own thread (under their file's lock) and, when they need
//! durability, ask for a sync and wait until the synced position passes what they wrote.
//! The sync thread waits for a request (or, under `fsync = interval`, sleeps until the sync
//! interval has passed since the last one), then runs one sync for everything written so
//! far. Writers that are not waiting never meet the sync thread.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::log::FsyncPolicy;

/// How far a file is durable.
#[derive(Debug, Clone, Default)]
pub struct Synced {
    /// Everything before this position (an offset or a byte count) is on disk.
    pub position: u64,
    /// Set when an fsync failed: what is on disk is unknown from then on.
    pub failed: Option<String>,
}

#[derive(Default)]
struct SignalState {
    /// A sync was asked for.
    wanted: bool,
    /// The owner is closing: the thread stops.
    closing: bool,
}

/// The meeting point of writers and their sync thread.
pub struct GroupCommit {
    state: Mutex<SignalState>,
    wake: Condvar,
    synced: watch::Sender<Synced>,
}

impl GroupCommit {
    /// A group commit whose durable position starts at `position`.
    pub fn new(position: u64) -> Self {
        Self {
            state: Mutex::new(SignalState::default()),
            wake: Condvar::new(),
            synced: watch::Sender::new(Synced {
                position,
                failed: None,
            }),
        }
    }

    /// Asks the sync thread for a sync (cheap when one is already asked for).
    pub fn request(&self) {
        let mut state = self.state.lock();
        if !state.wanted {
            state.wanted = true;
            self.wake.notify_one();
        }
    }

    /// Stops the sync thread after its current sync.
    pub fn close(&self) {
        self.state.lock().closing = true;
        self.wake.notify_one();
    }

    /// The sync thread's loop: for each request, waits out the interval under
    /// `fsync = interval` (measured from `last_sync()`), then calls `sync_once`.
    pub fn run(
        &self,
        policy: FsyncPolicy,
        interval: Duration,
        last_sync: impl Fn() -> Instant,
        mut sync_once: impl FnMut(),
    ) {
        while self.wait_for_request() {
            if policy == FsyncPolicy::Interval && !self.sleep_until(last_sync() + interval) {
                break;
            }
            sync_once();
        }
    }

    fn wait_for_request(&self) -> bool {
        let mut state = self.state.lock();
        while !state.wanted && !state.closing {
            self.wake.wait(&mut state);
        }
        state.wanted = false;
        !state.closing
    }

    fn sleep_until(&self, until: Instant) -> bool {
        let mut state = self.state.lock();
        while !state.closing && Instant::now() < until {
            self.wake.wait_until(&mut state, until);
        }
        !state.closing
    }

    /// Raises the durable position to `position` (never lowers it).
    pub fn mark_synced(&self, position: u64) {
        self.synced.send_if_modified(|s| {
            let raise = position > s.position;
            s.position = s.position.max(position);
            raise
        });
    }

    /// Sets the durable position, also downwards (after a truncation).
    pub fn reset_synced(&self, position: u64) {
        self.synced.send_modify(|s| s.position = position);
    }

    /// Records a failed fsync: waiters for anything not yet durable get `reason`.
    pub fn fail(&self, reason: String) {
        self.synced.send_modify(|s| s.failed = Some(reason));
    }

    /// Asks for a sync and waits until everything before `end` is durable; `Err` with the
    /// reason when an fsync failed first.
    pub async fn wait_synced(&self, end: u64) -> Result<(), String> {
        let mut synced = self.synced.subscribe();
        self.request();
        let state = synced
            .wait_for(|s| s.position >= end || s.failed.is_some())
            .await
            .map_err(|_| "closed".to_string())?;
        match &state.failed {
            Some(reason) if state.position < end => Err(reason.clone()),
            _ => Ok(()),
        }
    }
}

/// Starts a sync thread named `name` running `run` when `policy` needs one (`always` and
/// `interval`; `never` has none).
pub fn spawn_sync_thread(
    policy: FsyncPolicy,
    name: &str,
    run: impl FnOnce() + Send + 'static,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    match policy {
        FsyncPolicy::Never => Ok(None),
        FsyncPolicy::Always | FsyncPolicy::Interval => std::thread::Builder::new()
            .name(name.to_string())
            .spawn(run)
            .map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_are_released_by_one_sync_each_round() {
        let commit = Arc::new(GroupCommit::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let syncs = Arc::new(AtomicU64::new(0));
        let thread = {
            let (commit, written, syncs) = (
                Arc::clone(&commit),
                Arc::clone(&written),
                Arc::clone(&syncs),
            );
            std::thread::spawn(move || {
                commit.run(FsyncPolicy::Always, Duration::ZERO, Instant::now, || {
                    syncs.fetch_add(1, Ordering::Relaxed);
                    let end = written.load(Ordering::Acquire);
                    // A slow fsync: writers pile up behind it.
                    std::thread::sleep(Duration::from_millis(1));
                    commit.mark_synced(end);
                })
            })
        };
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (commit, written) = (Arc::clone(&commit), Arc::clone(&written));
                tokio::spawn(async move {
                    for _ in 0..100 {
                        let end = written.fetch_add(1, Ordering::AcqRel) + 1;
                        commit.wait_synced(end).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        commit.close();
        thread.join().unwrap();
        let syncs = syncs.load(Ordering::Relaxed);
        // Group commit: far fewer syncs than writes (about one per round of 8 writers).
        assert!((1..=400).contains(&syncs), "{syncs} syncs for 800 writes");
    }

    #[tokio::test]
    async fn a_failed_sync_fails_the_waiters_behind_it() {
        let commit = GroupCommit::new(10);
        commit.wait_synced(10).await.unwrap();
        commit.fail("disk on fire".into());
        assert_eq!(commit.wait_synced(11).await.unwrap_err(), "disk on fire");
        // What was durable before stays durable.
        commit.wait_synced(5).await.unwrap();
    }
}
