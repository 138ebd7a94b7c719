//! Merged appends: appends that arrive together are written as one batch, with one `write`.
//!
//! Leader/follower combining, with no timer: an append queues its records, yields once to
//! the runtime (so that appends made by other tasks ready at the same moment, such as the
//! pipelined requests of one `Publish` stream or concurrent unary and HTTP publishes, get
//! queued too), then either finds its records already written by another appender or
//! becomes the leader: it takes everything queued and writes it as one batch under the
//! writer lock, and keeps doing so while more arrives. Every queued append is one run of
//! consecutive offsets inside the batch, in the order it was queued, so each append's
//! records stay contiguous and in order. When the load is light the queue holds only the
//! leader's own records and the append costs what it did before plus one yield.
//!
//! An append whose future is dropped before a leader took its records is taken out of the
//! queue again and nothing of it is written; once taken, it is written.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{LogError, Record, Shared};

/// The result of one queued append: its first offset and one past its last.
type Written = Result<(u64, u64), LogError>;

/// One queued append.
struct Entry {
    id: u64,
    records: Vec<Record>,
    done: oneshot::Sender<Written>,
}

#[derive(Default)]
struct State {
    /// An appender is writing and will look at the queue again before it stops.
    leading: bool,
    queue: Vec<Entry>,
    next_id: u64,
}

/// The queue of appends waiting for a leader, in front of the partition's writer.
#[derive(Default)]
pub struct Combiner {
    state: Mutex<State>,
    /// Batches written (one `write` each), for tests and metrics.
    writes: AtomicU64,
}

/// Takes a queued entry back out when its append is dropped before a leader took it.
struct Queued<'a> {
    combiner: &'a Combiner,
    id: u64,
    armed: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.combiner.state.lock().queue.retain(|e| e.id != self.id);
        }
    }
}

impl Combiner {
    /// Batches written so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Appends `records` as one run of consecutive offsets, merged with whatever else is
    /// queued; returns the run's first offset and one past its last (written, not synced).
    pub async fn append(&self, shared: &Shared, records: Vec<Record>) -> Written {
        let (done, result) = oneshot::channel();
        let id = {
            let mut state = self.state.lock();
            let id = state.next_id;
            state.next_id += 1;
            state.queue.push(Entry { id, records, done });
            id
        };
        let mut queued = Queued {
            combiner: self,
            id,
            armed: true,
        };
        tokio::task::yield_now().await;
        self.lead_if_idle(shared);
        let written = result.await.unwrap_or(Err(LogError::Closed));
        queued.armed = false;
        written
    }

    /// Becomes the leader unless one is writing, and writes rounds until the queue is empty.
    fn lead_if_idle(&self, shared: &Shared) {
        let mut round = {
            let mut state = self.state.lock();
            if state.leading || state.queue.is_empty() {
                return;
            }
            state.leading = true;
            std::mem::take(&mut state.queue)
        };
        loop {
            self.write_round(shared, round);
            let mut state = self.state.lock();
            if state.queue.is_empty() {
                state.leading = false;
                return;
            }
            round = std::mem::take(&mut state.queue);
        }
    }

    /// Writes every entry of `round` as one batch and tells each its run.
    fn write_round(&self, shared: &Shared, round: Vec<Entry>) {
        let total = round.iter().map(|e| e.records.len()).sum();
        let mut records = Vec::with_capacity(total);
        let mut runs = Vec::with_capacity(round.len());
        for entry in round {
            runs.push((entry.records.len() as u64, entry.done));
            records.extend(entry.records);
        }
        let written = shared.writer.lock().append(shared, &records);
        self.writes.fetch_add(1, Ordering::Relaxed);
        match written {
            Ok((first, _)) => {
                let mut next = first;
                for (len, done) in runs {
                    let _ = done.send(Ok((next, next + len)));
                    next += len;
                }
            }
            Err(error) => {
                let message = error.to_string();
                let mut error = Some(error);
                for (_, done) in runs {
                    let e = error
                        .take()
                        .unwrap_or_else(|| LogError::Failed(message.clone()));
                    let _ = done.send(Err(e));
                }
            }
        }
    }
}

/// Shared ownership for the append future (which must be `'static`).
pub async fn append(shared: Arc<Shared>, records: Vec<Record>) -> Written {
    shared.combiner.append(&shared, records).await
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures_util::FutureExt;

    use crate::log::{FsyncPolicy, LogConfig, PartitionLog, Record};

    fn log(dir: &std::path::Path, fsync: FsyncPolicy) -> PartitionLog {
        let config = LogConfig {
            fsync,
            ..LogConfig::default()
        };
        PartitionLog::open(dir, config).unwrap()
    }

    fn tagged(task: usize, request: usize, count: usize) -> Vec<Record> {
        (0..count)
            .map(|i| Record {
                timestamp_ms: 1,
                key: None,
                headers: Vec::new(),
                value: Bytes::from(format!("{task}/{request}/{i}")),
            })
            .collect()
    }

    /// Pipelined appends of one task (as on one `Publish` stream) go out in one `write`.
    #[tokio::test(flavor = "current_thread")]
    async fn appends_that_arrive_together_share_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path(), FsyncPolicy::Never);
        let appends = (0..50).map(|r| log.append(tagged(0, r, 2)));
        let firsts = futures_util::future::join_all(appends).await;
        assert_eq!(log.batches_written(), 1);
        let firsts: Vec<u64> = firsts.into_iter().map(Result::unwrap).collect();
        assert_eq!(firsts, (0..50).map(|r| r * 2).collect::<Vec<_>>());
        assert_eq!(log.next_offset(), 100);
        assert_eq!(log.segments().len(), 1);
    }

    /// A lone append is written at once, on its own.
    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_append_is_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path(), FsyncPolicy::Always);
        assert_eq!(log.append(tagged(0, 0, 3)).await.unwrap(), 0);
        assert_eq!(log.append(tagged(0, 1, 1)).await.unwrap(), 3);
        assert_eq!(log.batches_written(), 2);
        assert_eq!(log.next_offset(), 4);
    }

    /// Concurrent appenders on many threads: each append's records are one contiguous run
    /// in its own order, nothing is lost or doubled, and runs were merged into fewer writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appenders_get_contiguous_runs() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path(), FsyncPolicy::Always);
        let tasks: Vec<_> = (0..8)
            .map(|task| {
                let log = log.clone();
                tokio::spawn(async move {
                    let appends = (0..40).map(|r| {
                        let log = log.clone();
                        async move { (r, log.append(tagged(task, r, 1 + r % 4)).await.unwrap()) }
                    });
                    futures_util::future::join_all(appends).await
                })
            })
            .collect();
        let mut runs = Vec::new();
        for (task, handle) in tasks.into_iter().enumerate() {
            for (r, first) in handle.await.unwrap() {
                runs.push((task, r, first));
            }
        }
        let stored = log.read(0, usize::MAX, usize::MAX).unwrap();
        let total: usize = runs.iter().map(|(_, r, _)| 1 + r % 4).sum();
        assert_eq!(stored.len(), total);
        for (task, r, first) in runs {
            for i in 0..1 + r % 4 {
                let record = &stored[first as usize + i];
                assert_eq!(record.value, Bytes::from(format!("{task}/{r}/{i}")));
            }
        }
        assert!(
            log.batches_written() < 320,
            "{} writes",
            log.batches_written()
        );
    }

    /// An append dropped before a leader took it writes nothing and leaves no trace.
    #[tokio::test(flavor = "current_thread")]
    async fn an_append_dropped_while_queued_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path(), FsyncPolicy::Never);
        assert!(log.append(tagged(0, 0, 5)).now_or_never().is_none());
        assert_eq!(log.append(tagged(0, 1, 1)).await.unwrap(), 0);
        let stored = log.read(0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].value, Bytes::from("0/1/0"));
    }
}
