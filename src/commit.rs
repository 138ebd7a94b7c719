//! Group commit on a shared sync pool: one fsync, on one of a few pool threads, for every
//! writer that wrote to a file while the previous sync of that file ran. Shared by the
//! partition log, the group journals and the queue registry.
//!
//! Writers write on their own thread (under their file's lock) and, when they need
//! durability, ask for a sync and wait until the synced position passes what they wrote.
//! A request puts the file's [`GroupCommit`] on the pool's timetable: due at once under
//! `fsync = always`, one sync interval later under `interval`. A pool thread takes the
//! earliest due file and runs one sync for everything written to it so far; requests that
//! arrive while that sync runs are served by the next one (group commit). A file is never
//! synced by two pool threads at once, and is never on the timetable twice.
//!
//! No file owns a thread: ten thousand idle queues cost no thread, and the process has
//! [`SyncPool::shared`]'s few threads whatever the number of files.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::log::FsyncPolicy;

/// Threads of the process-wide pool unless [`SyncPool::configure_shared`] said otherwise.
pub const DEFAULT_SYNC_THREADS: usize = 4;

/// How far a file is durable.
#[derive(Debug, Clone, Default)]
pub struct Synced {
    /// Everything before this position (an offset or a byte count) is on disk.
    pub position: u64,
    /// Set when an fsync failed: what is on disk is unknown from then on.
    pub failed: Option<String>,
}

/// A file the pool syncs: its group commit, and one sync of everything written so far.
pub trait SyncTarget: Send + Sync {
    /// The group commit the target's writers wait on.
    fn commit(&self) -> &GroupCommit;
    /// Syncs everything written so far and reports it through [`GroupCommit::mark_synced`]
    /// (or [`GroupCommit::fail`]). Runs on a pool thread, never twice at once per target.
    fn sync_once(&self);
}

/// Where a file stands with the pool.
#[derive(Default)]
struct Schedule {
    /// A sync was asked for that has not started: the file is on the timetable, or will
    /// be put back on it when the running sync ends.
    wanted: bool,
    /// A pool thread is syncing the file now.
    running: bool,
    /// The owner is closing: no more syncs.
    closing: bool,
}

/// The meeting point of a file's writers and the sync pool.
pub struct GroupCommit {
    schedule: Mutex<Schedule>,
    synced: watch::Sender<Synced>,
    policy: FsyncPolicy,
    interval: Duration,
    pool: SyncPool,
    /// The owner of this group commit, set once by [`GroupCommit::attach`].
    target: OnceLock<Weak<dyn SyncTarget>>,
}

impl GroupCommit {
    /// A group commit whose durable position starts at `position`, synced by `pool` under
    /// `policy` (every `interval` for [`FsyncPolicy::Interval`]). Call [`Self::attach`]
    /// once its owner exists.
    pub fn new(position: u64, policy: FsyncPolicy, interval: Duration, pool: SyncPool) -> Self {
        Self {
            schedule: Mutex::new(Schedule::default()),
            synced: watch::Sender::new(Synced {
                position,
                failed: None,
            }),
            policy,
            interval,
            pool,
            target: OnceLock::new(),
        }
    }

    /// Names the owner the pool syncs (held weakly: a dropped owner is skipped).
    pub fn attach(&self, target: Weak<dyn SyncTarget>) {
        let _ = self.target.set(target);
    }

    /// Asks the pool for a sync (cheap when one is already asked for).
    pub fn request(&self) {
        if self.policy == FsyncPolicy::Never {
            return;
        }
        let mut schedule = self.schedule.lock();
        if schedule.wanted || schedule.closing {
            return;
        }
        schedule.wanted = true;
        if !schedule.running {
            self.put_on_timetable();
        }
    }

    fn put_on_timetable(&self) {
        let Some(target) = self.target.get() else {
            return;
        };
        let delay = match self.policy {
            FsyncPolicy::Interval => self.interval,
            FsyncPolicy::Always | FsyncPolicy::Never => Duration::ZERO,
        };
        self.pool
            .schedule(Instant::now() + delay, Weak::clone(target));
    }

    /// Stops syncing (the owner syncs a last time itself).
    pub fn close(&self) {
        self.schedule.lock().closing = true;
    }

    /// One pool turn for `target` (whose commit this is): sync, then go back on the
    /// timetable if asked again meanwhile.
    fn run_once(&self, target: &dyn SyncTarget) {
        {
            let mut schedule = self.schedule.lock();
            if schedule.closing || schedule.running || !schedule.wanted {
                return;
            }
            schedule.wanted = false;
            schedule.running = true;
        }
        target.sync_once();
        let mut schedule = self.schedule.lock();
        schedule.running = false;
        if schedule.wanted && !schedule.closing {
            self.put_on_timetable();
        }
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
        if synced.borrow().position < end {
            self.request();
        }
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

/// A file due for a sync at `at`; ordered by time, then by arrival.
struct Due {
    at: Instant,
    seq: u64,
    target: Weak<dyn SyncTarget>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Timetable {
    due: BinaryHeap<Reverse<Due>>,
    seq: u64,
    stopped: bool,
}

struct PoolInner {
    timetable: Mutex<Timetable>,
    wake: Condvar,
}

/// A few threads that run the syncs of every file of the process. Cheap to clone.
#[derive(Clone)]
pub struct SyncPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for SyncPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncPool")
            .field("queued", &self.inner.timetable.lock().due.len())
            .finish()
    }
}

static SHARED_THREADS: OnceLock<usize> = OnceLock::new();
static SHARED: OnceLock<SyncPool> = OnceLock::new();

impl SyncPool {
    /// A pool of `threads` sync threads (at least one), named `qit-sync-{n}`.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let pool = Self {
            inner: Arc::new(PoolInner {
                timetable: Mutex::new(Timetable::default()),
                wake: Condvar::new(),
            }),
        };
        for n in 0..threads.max(1) {
            let inner = Arc::clone(&pool.inner);
            std::thread::Builder::new()
                .name(format!("qit-sync-{n}"))
                .spawn(move || inner.work())?;
        }
        Ok(pool)
    }

    /// Sets the size of the process-wide pool; effective only before its first use.
    /// Returns false when the pool was already sized.
    pub fn configure_shared(threads: usize) -> bool {
        SHARED_THREADS.set(threads.max(1)).is_ok()
    }

    /// The process-wide pool every log and journal uses by default, started on first use.
    ///
    /// # Panics
    /// When the operating system refuses to start any thread at all, at first use.
    pub fn shared() -> SyncPool {
        SHARED
            .get_or_init(|| {
                let threads = *SHARED_THREADS.get_or_init(|| DEFAULT_SYNC_THREADS);
                #[allow(clippy::expect_used)] // no thread at all: nothing can be durable
                SyncPool::new(threads).expect("cannot start the sync pool's threads")
            })
            .clone()
    }

    fn schedule(&self, at: Instant, target: Weak<dyn SyncTarget>) {
        let mut timetable = self.inner.timetable.lock();
        timetable.seq += 1;
        let seq = timetable.seq;
        timetable.due.push(Reverse(Due { at, seq, target }));
        self.inner.wake.notify_one();
    }

    /// Stops the pool's threads once the syncs due now are done (tests; the process-wide
    /// pool runs until exit).
    pub fn stop(&self) {
        self.inner.timetable.lock().stopped = true;
        self.inner.wake.notify_all();
    }

    /// Files waiting for a sync.
    pub fn queued(&self) -> usize {
        self.inner.timetable.lock().due.len()
    }
}

impl PoolInner {
    /// A pool thread: take the earliest due file, sync it, repeat.
    fn work(&self) {
        while let Some(target) = self.next_due() {
            if let Some(target) = target.upgrade() {
                target.commit().run_once(&*target);
            }
        }
    }

    fn next_due(&self) -> Option<Weak<dyn SyncTarget>> {
        let mut timetable = self.timetable.lock();
        loop {
            let now = Instant::now();
            let next_at = timetable.due.peek().map(|Reverse(due)| due.at);
            match next_at {
                Some(at) if at <= now => {
                    return timetable.due.pop().map(|Reverse(due)| due.target);
                }
                _ if timetable.stopped => return None,
                Some(at) => {
                    self.wake.wait_until(&mut timetable, at);
                }
                None => self.wake.wait(&mut timetable),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// A file stand-in: a write counter, a slow "fsync", and a count of concurrent syncs.
    struct FakeFile {
        commit: GroupCommit,
        written: AtomicU64,
        syncs: AtomicU64,
        running: AtomicUsize,
        overlapped: AtomicU64,
    }

    impl FakeFile {
        fn open(pool: &SyncPool, policy: FsyncPolicy, interval: Duration) -> Arc<Self> {
            let file = Arc::new(Self {
                commit: GroupCommit::new(0, policy, interval, pool.clone()),
                written: AtomicU64::new(0),
                syncs: AtomicU64::new(0),
                running: AtomicUsize::new(0),
                overlapped: AtomicU64::new(0),
            });
            let weak: Weak<dyn SyncTarget> = Arc::downgrade(&file) as Weak<dyn SyncTarget>;
            file.commit.attach(weak);
            file
        }
    }

    impl SyncTarget for FakeFile {
        fn commit(&self) -> &GroupCommit {
            &self.commit
        }
        fn sync_once(&self) {
            if self.running.fetch_add(1, Ordering::AcqRel) > 0 {
                self.overlapped.fetch_add(1, Ordering::Relaxed);
            }
            self.syncs.fetch_add(1, Ordering::Relaxed);
            let end = self.written.load(Ordering::Acquire);
            // A slow fsync: writers pile up behind it.
            std::thread::sleep(Duration::from_millis(1));
            self.running.fetch_sub(1, Ordering::AcqRel);
            self.commit.mark_synced(end);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_are_released_by_one_sync_each_round() {
        let pool = SyncPool::new(3).unwrap();
        let file = FakeFile::open(&pool, FsyncPolicy::Always, Duration::ZERO);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let file = Arc::clone(&file);
                tokio::spawn(async move {
                    for _ in 0..100 {
                        let end = file.written.fetch_add(1, Ordering::AcqRel) + 1;
                        file.commit.wait_synced(end).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        pool.stop();
        let syncs = file.syncs.load(Ordering::Relaxed);
        // Group commit: far fewer syncs than writes (about one per round of 8 writers).
        assert!((1..=400).contains(&syncs), "{syncs} syncs for 800 writes");
        // Three pool threads, yet never two syncs of one file at once.
        assert_eq!(file.overlapped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_few_threads_sync_many_files() {
        let pool = SyncPool::new(2).unwrap();
        let files: Vec<_> = (0..200)
            .map(|_| FakeFile::open(&pool, FsyncPolicy::Always, Duration::ZERO))
            .collect();
        let waits = files.iter().map(|file| {
            let end = file.written.fetch_add(1, Ordering::AcqRel) + 1;
            file.commit.wait_synced(end)
        });
        for result in futures_join_all(waits).await {
            result.unwrap();
        }
        pool.stop();
        assert!(files.iter().all(|f| f.syncs.load(Ordering::Relaxed) >= 1));
    }

    /// Awaits every future (no `futures` dependency for one test).
    async fn futures_join_all<F: std::future::Future>(
        futures: impl Iterator<Item = F>,
    ) -> Vec<F::Output> {
        let mut out = Vec::new();
        for future in futures {
            out.push(future.await);
        }
        out
    }

    #[tokio::test]
    async fn interval_requests_are_synced_without_a_waiter() {
        let pool = SyncPool::new(1).unwrap();
        let file = FakeFile::open(&pool, FsyncPolicy::Interval, Duration::from_millis(1));
        file.written.store(7, Ordering::Release);
        file.commit.request();
        let mut synced = file.commit.synced.subscribe();
        synced.wait_for(|s| s.position >= 7).await.unwrap();
        pool.stop();
    }

    #[tokio::test]
    async fn a_closed_commit_is_not_synced() {
        let pool = SyncPool::new(1).unwrap();
        let file = FakeFile::open(&pool, FsyncPolicy::Always, Duration::ZERO);
        file.commit.close();
        file.commit.request();
        assert_eq!(pool.queued(), 0);
        pool.stop();
        assert_eq!(file.syncs.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_failed_sync_fails_the_waiters_behind_it() {
        let pool = SyncPool::new(1).unwrap();
        let commit = GroupCommit::new(10, FsyncPolicy::Always, Duration::ZERO, pool.clone());
        commit.wait_synced(10).await.unwrap();
        commit.fail("disk on fire".into());
        assert_eq!(commit.wait_synced(11).await.unwrap_err(), "disk on fire");
        // What was durable before stays durable.
        commit.wait_synced(5).await.unwrap();
        pool.stop();
    }
}
