//! The partition log: a directory of segment files holding checksummed record batches,
//! with sparse offset and time indexes, read through mmap. The byte format is specified in
//! `storage-format.md`.
//!
//! - [`record`]: the batch/record codec (the only code that lays out batch bytes).
//! - [`index`]: sparse offset and time index entries.
//! - [`segment`]: one segment's files, read through mmap (sealed) or `pread` (active).
//! - [`recovery`]: opening a directory, checking indexes, cutting a torn tail.
//! - [`writer`]: appends on the caller's thread under the writer lock; group commit on the
//!   shared sync pool ([`crate::commit`]).
//! - [`combine`]: merged appends: appends that arrive together go out as one batch and one
//!   `write` (leader/follower combining, no timer).
//! - [`inspect`]: offline verification and dumps for `qit-inspect`.
//! - [`compaction`]: rewriting a sealed segment without some records, atomically.
//!
//! Readers never take a lock shared with the writer for the bytes they read: the segment
//! list is an `ArcSwap` snapshot, sealed segments are immutable maps, and the active segment
//! is read with positioned reads bounded by the length the writer has published.

mod combine;
pub mod compaction;
pub mod index;
pub mod inspect;
pub mod record;
pub mod recovery;
pub mod segment;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::commit::{GroupCommit, SyncPool, SyncTarget};
use crate::storage::SharedStorage;
use segment::Segment;
use writer::Writer;

/// When appended records are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fsync before an append is answered (group commit batches concurrent appenders).
    Always,
    /// fsync in the background every few milliseconds.
    #[default]
    Interval,
    /// Never fsync explicitly; the OS writes back when it likes.
    Never,
}

/// Compression applied to the records section of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Records stored as is.
    #[default]
    None,
    /// Records section compressed with LZ4 (block format, `lz4_flex`).
    Lz4,
}

/// Settings of one partition log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Where the files live: the real disk, or a simulated one in tests.
    pub storage: SharedStorage,
    /// A segment rolls once it holds more than this many bytes (default 64 MiB).
    pub segment_bytes: u64,
    /// Durability policy for appends.
    pub fsync: FsyncPolicy,
    /// How often the background flusher syncs under [`FsyncPolicy::Interval`].
    pub fsync_interval: Duration,
    /// An offset index entry is written every this many bytes of log (default 4096).
    pub index_interval_bytes: u32,
    /// Compression for new batches.
    pub compression: Compression,
    /// Told how long each fsync of a segment took (the broker feeds its latency metric).
    pub on_fsync: Option<FsyncObserver>,
}

/// Told the duration of every fsync of a segment. The log reports upward through this
/// instead of importing the metrics of a layer above it.
#[derive(Clone)]
pub struct FsyncObserver(Arc<dyn Fn(Duration) + Send + Sync>);

impl FsyncObserver {
    /// An observer calling `f` with each fsync's duration (on the syncing thread: keep it
    /// cheap).
    pub fn new(f: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Reports one fsync that took `took`.
    pub fn observe(&self, took: Duration) {
        (self.0)(took);
    }
}

impl std::fmt::Debug for FsyncObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FsyncObserver")
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            storage: crate::storage::disk(),
            segment_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::Interval,
            fsync_interval: Duration::from_millis(5),
            index_interval_bytes: 4096,
            compression: Compression::None,
            on_fsync: None,
        }
    }
}

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Optional key (partitioning, compaction, per-key ordering).
    pub key: Option<Bytes>,
    /// Headers in order; names are UTF-8.
    pub headers: Vec<(String, Bytes)>,
    /// The payload.
    pub value: Bytes,
}

/// A record read back from the log, with its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// The record's offset in its partition.
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Optional key.
    pub key: Option<Bytes>,
    /// Headers in order.
    pub headers: Vec<(String, Bytes)>,
    /// The payload.
    pub value: Bytes,
}

/// A summary of one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Offset of the first record the segment may hold (its file name).
    pub base_offset: u64,
    /// One past the last offset it holds.
    pub next_offset: u64,
    /// Size of the `.log` file in bytes.
    pub bytes: u64,
    /// Largest record timestamp in the segment (ms), if it holds any record.
    pub max_timestamp_ms: Option<i64>,
    /// False for the active (last) segment.
    pub sealed: bool,
}

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O error on a file.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Damaged data where damage may not be repaired silently.
    #[error("corrupt log data in {path} at byte {position}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte position of the damaged structure.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// The log was closed.
    #[error("the log is closed")]
    Closed,
    /// An fsync failed earlier: what is on disk is unknown, so the log takes no appends
    /// until it is reopened (which recovers from what the disk holds).
    #[error("the partition log failed and takes no appends: {0}")]
    Failed(String),
}

/// State shared by the handles, the readers and the sync pool.
struct Shared {
    dir: PathBuf,
    config: LogConfig,
    /// Segments, oldest first; the last one is active. Replaced whole, never mutated.
    segments: ArcSwap<Vec<Arc<Segment>>>,
    /// One past the last offset readers of records see: [`Self::written`], held back at
    /// [`Self::gate`]. Changed only through [`Shared::refresh_visible`].
    next_offset: AtomicU64,
    /// One past the last offset whose batch is readable (published by the writer), for
    /// the log's own Raft reader ([`PartitionLog::batches_from`]).
    written: AtomicU64,
    /// The commit gate: readers of records see nothing at or past it ([`PartitionLog::
    /// set_commit_gate`]); `u64::MAX` when the log has none.
    gate: AtomicU64,
    /// The Raft floor: segments holding an offset at or past it are neither deleted by
    /// retention nor rewritten by compaction ([`PartitionLog::keep_from`]); `u64::MAX`
    /// when the log has none.
    floor: AtomicU64,
    /// The highest offset retention asked to delete below and the Raft floor held back
    /// (0: none): see [`PartitionLog::held_back`].
    held_back: AtomicU64,
    /// The leader epoch and Raft index written into the header of every batch appended
    /// from now on ([`PartitionLog::set_stamp`]). Set by the task that then appends (a
    /// cluster group's apply, the partition's only writer there), so an append never reads
    /// the halves of two stamps.
    leader_epoch: AtomicU64,
    raft_index: AtomicU64,
    watch: watch::Sender<u64>,
    /// Serializes changes of the segment list (roll, drop, truncate).
    list_lock: Mutex<()>,
    /// The active segment's writing state: appends take this lock for one encode and one
    /// `write`; fsyncs happen outside it.
    writer: Mutex<Writer>,
    /// Group commit with the sync pool (appenders under `fsync = always` wait on it).
    commit: GroupCommit,
    /// Appends waiting to be merged into the next batch.
    combiner: combine::Combiner,
}

impl Shared {
    /// Sets what readers see, `min(written, gate)`, and tells the watchers when it
    /// changed. Computed under the watch's lock from the latest values, so that a publish
    /// and a commit racing each other never leave an older value behind.
    fn refresh_visible(&self) {
        self.watch.send_if_modified(|seen| {
            let visible = self
                .written
                .load(Ordering::Acquire)
                .min(self.gate.load(Ordering::Acquire));
            self.next_offset.store(visible, Ordering::Release);
            let changed = *seen != visible;
            *seen = visible;
            changed
        });
    }
}

/// The handles' common part; dropping the last handle stops pool syncs and syncs a last
/// time.
struct Inner {
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.commit.close();
        let mut writer = self.shared.writer.lock();
        // A closed log belongs to a removed queue: its failure was reported as expected.
        let closed = writer.closed;
        if let Err(error) = writer.sync(&self.shared)
            && !closed
        {
            tracing::error!(%error, "final fsync of the partition log failed");
        }
    }
}

/// One partition: a directory of segments. Cheap to clone (a handle).
#[derive(Clone)]
pub struct PartitionLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PartitionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionLog")
            .field("dir", &self.inner.shared.dir)
            .field("next_offset", &self.next_offset())
            .finish()
    }
}

impl PartitionLog {
    /// Opens (creating if needed) the partition in `dir`, recovering the active segment.
    pub fn open(dir: &Path, config: LogConfig) -> Result<Self, LogError> {
        let (segments, state) = recovery::open_segments(dir, &config)?;
        let active = segments.last().cloned().ok_or_else(|| LogError::Corrupt {
            path: dir.to_path_buf(),
            position: 0,
            reason: "no active segment".into(),
        })?;
        let next = state.extent.next_offset;
        let writer = Writer::new(&config.storage, active, state);
        let commit = GroupCommit::new(
            next,
            config.fsync,
            config.fsync_interval,
            SyncPool::shared(),
        );
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            config,
            segments: ArcSwap::from_pointee(segments),
            next_offset: AtomicU64::new(next),
            written: AtomicU64::new(next),
            gate: AtomicU64::new(u64::MAX),
            floor: AtomicU64::new(u64::MAX),
            held_back: AtomicU64::new(0),
            leader_epoch: AtomicU64::new(0),
            raft_index: AtomicU64::new(0),
            watch: watch::Sender::new(next),
            list_lock: Mutex::new(()),
            writer: Mutex::new(writer),
            commit,
            combiner: combine::Combiner::default(),
        });
        let target: std::sync::Weak<dyn SyncTarget> = Arc::downgrade(&shared) as _;
        shared.commit.attach(target);
        Ok(Self {
            inner: Arc::new(Inner { shared }),
        })
    }

    /// Appends records with consecutive offsets; returns the first offset.
    ///
    /// Appends that arrive together (queued before a leader takes them, see [`combine`])
    /// are written as one batch with one `write`, each as one run of consecutive offsets in
    /// its own order. The future resolves once the records are written, or under
    /// [`FsyncPolicy::Always`] once they are durable (one fsync serves every append written
    /// while the previous one ran). Dropped before a leader took the records, it writes
    /// nothing; dropped later, it does not undo the write.
    pub fn append(
        &self,
        records: Vec<Record>,
    ) -> impl std::future::Future<Output = Result<u64, LogError>> + Send + 'static {
        let shared = Arc::clone(&self.inner.shared);
        async move {
            let (first, end) = combine::append(Arc::clone(&shared), records).await?;
            durable(&shared, end).await?;
            Ok(first)
        }
    }

    /// Appends `records` as one batch of its own stamped `stamp` (never merged with other
    /// appends; see [`Self::append`]), for a log that is a Raft group's log: one entry, one
    /// batch. Returns the batch's first offset and one past its last; the batch is written,
    /// and readable once durable ([`Self::durable`]) under [`FsyncPolicy::Always`], at once
    /// otherwise. An empty `records` writes nothing.
    pub fn append_entry(
        &self,
        stamp: record::Stamp,
        records: &[Record],
    ) -> Result<(u64, u64), LogError> {
        let shared = &self.inner.shared;
        shared.writer.lock().append_stamped(shared, stamp, records)
    }

    /// Resolves once everything up to offset `end` is durable: under
    /// [`FsyncPolicy::Always`] after the sync that covers it (and readable then); at once
    /// under the other policies, whose writes count as durable when written.
    pub fn durable(
        &self,
        end: u64,
    ) -> impl std::future::Future<Output = Result<(), LogError>> + Send + 'static {
        let shared = Arc::clone(&self.inner.shared);
        async move { durable(&shared, end).await }
    }

    /// Puts a commit gate on the log at offset `end` (`None` takes it away): readers of
    /// records ([`Self::read`], [`Self::next_offset`] and its watchers, [`Self::locate`],
    /// [`Self::offset_for_timestamp`]) see nothing at or past it, whatever is written; the
    /// log's own Raft reader ([`Self::batches_from`]) sees everything written. For a log
    /// that is a Raft group's log, whose entries are written before they are committed and
    /// may still be truncated: consumers never read such an entry. [`Self::commit_to`]
    /// moves the gate on.
    pub fn set_commit_gate(&self, end: Option<u64>) {
        let shared = &self.inner.shared;
        shared
            .gate
            .store(end.unwrap_or(u64::MAX), Ordering::Release);
        shared.refresh_visible();
    }

    /// Keeps every segment holding offset `offset` or a later one from retention and
    /// compaction ([`Self::drop_segments_before`], [`Self::rewrite_sealed`]): for a log
    /// that is a Raft group's log, whose entries past the purge point a follower may still
    /// be sent as they were written.
    pub fn keep_from(&self, offset: u64) {
        self.inner.shared.floor.store(offset, Ordering::Release);
    }

    /// The Raft floor ([`Self::keep_from`]; `u64::MAX` when none).
    pub fn floor(&self) -> u64 {
        self.inner.shared.floor.load(Ordering::Acquire)
    }

    /// True when retention asked to delete segments that the Raft floor keeps
    /// ([`Self::drop_segments_before`] below an offset past it): the group whose log this
    /// is should snapshot and purge, which moves the floor on.
    pub fn held_back(&self) -> bool {
        let shared = &self.inner.shared;
        shared.held_back.load(Ordering::Acquire) > shared.floor.load(Ordering::Acquire)
    }

    /// Moves the commit gate on to `end` (never back; nothing without a gate): readers see
    /// the records below it once written.
    pub fn commit_to(&self, end: u64) {
        let shared = &self.inner.shared;
        let before = shared.gate.fetch_max(end, Ordering::AcqRel);
        if before < end {
            shared.refresh_visible();
        }
    }

    /// One past the last offset whose batch is readable by [`Self::batches_from`] (written,
    /// and under `fsync = always` synced), the commit gate notwithstanding.
    pub fn written_end(&self) -> u64 {
        self.inner.shared.written.load(Ordering::Acquire)
    }

    /// Whole batches, CRC-checked, from the readable one that starts at offset `from` on,
    /// at most `max` of them, of every entry type, past the commit gate too (for a log that
    /// is a Raft group's log). Empty when `from` is at or past the readable end; an error
    /// when no batch starts at `from`.
    pub fn batches_from(
        &self,
        from: u64,
        max: usize,
    ) -> Result<Vec<(record::BatchHeader, bytes::Bytes)>, LogError> {
        let next = self.written_end();
        let mut out = Vec::new();
        if from >= next || max == 0 {
            return Ok(out);
        }
        let segments = self.inner.shared.segments.load_full();
        for segment in segments_from(&segments, from) {
            let (mut position, _) = segment.position_for(from)?;
            let reader = segment.reader()?;
            let len = segment.len();
            while position < len && out.len() < max {
                let at = position;
                let (header, batch) = reader.batch_at(at)?;
                position += u64::from(header.batch_len);
                if header.base_offset >= next {
                    return Ok(out);
                }
                if header.next_offset() <= from {
                    continue;
                }
                if out.is_empty() && header.base_offset != from {
                    return Err(LogError::Corrupt {
                        path: segment.paths.log.clone(),
                        position: at,
                        reason: format!(
                            "no batch starts at offset {from} (the batch there starts at {})",
                            header.base_offset
                        ),
                    });
                }
                out.push((header, batch));
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Batches written since the log was opened (each one `write`); merged appends share one.
    pub fn batches_written(&self) -> u64 {
        self.inner.shared.combiner.writes()
    }

    /// Reads whole records from `from` (clamped up to the first offset) up to the budgets;
    /// at least one record when any exists at or past `from`.
    pub fn read(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let next = self.next_offset();
        let segments = self.inner.shared.segments.load_full();
        let first = segments.first().map_or(0, |s| s.base_offset);
        let from = from.max(first);
        let mut out = Vec::new();
        if from >= next || max_records == 0 {
            return Ok(out);
        }
        let mut bytes = 0usize;
        for segment in segments_from(&segments, from) {
            let done = read_segment(
                segment,
                from,
                next,
                &mut out,
                &mut bytes,
                (max_records, max_bytes),
            )?;
            if done {
                break;
            }
        }
        Ok(out)
    }

    /// Where a read of `offset` starts: the base offset of the segment holding it and the
    /// byte position of the batch its sparse index names (at or before the record). `None`
    /// when the offset is not retained or not yet written; an error when the segment's
    /// index cannot be mapped.
    pub fn locate(&self, offset: u64) -> Result<Option<(u64, u64)>, LogError> {
        if offset >= self.next_offset() {
            return Ok(None);
        }
        let segments = self.inner.shared.segments.load();
        let Some(segment) = segments
            .partition_point(|s| s.base_offset <= offset)
            .checked_sub(1)
            .and_then(|index| segments.get(index))
        else {
            return Ok(None);
        };
        Ok(Some((segment.base_offset, segment.position_for(offset)?.0)))
    }

    /// The first offset whose record has a timestamp >= `timestamp_ms`, if any.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>, LogError> {
        let next = self.next_offset();
        let segments = self.inner.shared.segments.load_full();
        let Some(segment) = segments
            .iter()
            .find(|s| s.max_timestamp_ms().is_some_and(|t| t >= timestamp_ms))
        else {
            return Ok(None);
        };
        let mut from = segment.offset_for_time_hint(timestamp_ms)?;
        loop {
            let records = self.read(from, 1024, usize::MAX)?;
            let Some(last) = records.last() else {
                return Ok(None);
            };
            if let Some(hit) = records.iter().find(|r| r.timestamp_ms >= timestamp_ms) {
                return Ok(Some(hit.offset));
            }
            from = last.offset + 1;
            if from >= next {
                return Ok(None);
            }
        }
    }

    /// The first retained offset.
    pub fn first_offset(&self) -> u64 {
        self.inner
            .shared
            .segments
            .load()
            .first()
            .map_or(0, |s| s.base_offset)
    }

    /// Sets the stamp that batches appended from now on carry in their header: on a
    /// cluster node, the Raft term and index of the entry being applied, so that every
    /// replica writes the same bytes and a batch tells which entry of which leader's term
    /// wrote it (zeros until set, as on a single node). These batches are data: the
    /// stamp's entry type is not used (see [`Self::append_entry`] for the other kinds).
    pub fn set_stamp(&self, stamp: record::Stamp) {
        let shared = &self.inner.shared;
        shared
            .leader_epoch
            .store(stamp.leader_epoch, Ordering::Release);
        shared.raft_index.store(stamp.raft_index, Ordering::Release);
    }

    /// One past the last readable offset.
    pub fn next_offset(&self) -> u64 {
        self.inner.shared.next_offset.load(Ordering::Acquire)
    }

    /// Watches [`Self::next_offset`]; changes on every append.
    pub fn watch_next_offset(&self) -> watch::Receiver<u64> {
        self.inner.shared.watch.subscribe()
    }

    /// The segments holding the offsets below `end` (a batch boundary), oldest first, the
    /// last one's `bytes` cut where the batch at `end` starts: the partition as it was
    /// when `end` was its end (for a snapshot of a Raft group's log at an entry, the later
    /// entries left out). An error when no batch starts or ends at `end`.
    pub fn segments_until(&self, end: u64) -> Result<Vec<SegmentInfo>, LogError> {
        let mut out = Vec::new();
        for segment in self.inner.shared.segments.load_full().iter() {
            let info = SegmentInfo {
                base_offset: segment.base_offset,
                next_offset: segment.next_offset(),
                bytes: segment.len(),
                max_timestamp_ms: segment.max_timestamp_ms(),
                sealed: segment.is_sealed(),
            };
            if info.next_offset <= end {
                out.push(info);
                continue;
            }
            if segment.base_offset >= end {
                break;
            }
            let position = batch_position(segment, end)?;
            out.push(SegmentInfo {
                next_offset: end,
                bytes: position,
                sealed: false,
                ..info
            });
            break;
        }
        Ok(out)
    }

    /// Segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.inner
            .shared
            .segments
            .load()
            .iter()
            .map(|s| SegmentInfo {
                base_offset: s.base_offset,
                next_offset: s.next_offset(),
                bytes: s.len(),
                max_timestamp_ms: s.max_timestamp_ms(),
                sealed: s.is_sealed(),
            })
            .collect()
    }

    /// The partition's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.shared.dir
    }

    /// Deletes whole sealed segments whose every offset is below `offset` (and below the
    /// Raft floor, [`Self::keep_from`]); returns how many. Safe while readers hold them:
    /// their files are pinned mapped first, and an unlinked file stays mapped until the
    /// last reader drops it.
    pub fn drop_segments_before(&self, offset: u64) -> Result<usize, LogError> {
        let shared = &self.inner.shared;
        let floor = shared.floor.load(Ordering::Acquire);
        if offset > floor {
            shared.held_back.fetch_max(offset, Ordering::AcqRel);
        }
        let offset = offset.min(floor);
        let removed: Vec<Arc<Segment>> = {
            let _guard = shared.list_lock.lock();
            let list = shared.segments.load_full();
            let count = list
                .iter()
                .take(list.len().saturating_sub(1))
                .take_while(|s| s.is_sealed() && s.next_offset() <= offset)
                .count();
            if count == 0 {
                return Ok(0);
            }
            // Readers still holding the old list keep reading the removed segments' bytes.
            for segment in list.iter().take(count) {
                segment.pin()?;
            }
            shared
                .segments
                .store(Arc::new(list.get(count..).unwrap_or_default().to_vec()));
            list.get(..count).unwrap_or_default().to_vec()
        };
        let storage = &*shared.config.storage;
        for segment in &removed {
            // Indexes first: a crash in between leaves a log whose indexes are rebuilt,
            // never index files without their log.
            for path in [
                &segment.paths.index,
                &segment.paths.time_index,
                &segment.paths.log,
            ] {
                storage.remove(path).map_err(|source| LogError::Io {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        recovery::sync_dir(storage, &shared.dir)?;
        Ok(removed.len())
    }

    /// Removes every record at or past `offset` (for replication); the written end becomes
    /// `offset` (and what readers see, unless a commit gate lies below it).
    pub async fn truncate_suffix(&self, offset: u64) -> Result<(), LogError> {
        self.truncate_suffix_now(offset)
    }

    /// [`Self::truncate_suffix`] on the caller's thread (it writes and syncs the files).
    pub fn truncate_suffix_now(&self, offset: u64) -> Result<(), LogError> {
        let shared = &self.inner.shared;
        shared.writer.lock().truncate(shared, offset)
    }

    /// Replaces the partition's records with what `fill` writes into its directory (a
    /// cluster replica installing a snapshot of the partition): the directory is emptied,
    /// filled and opened again, under the writer's lock, so appends wait for it and then
    /// continue after the new last record. Readers holding the old segments keep reading
    /// their bytes; the next offset's watchers see the new end. A closed log
    /// ([`Self::close`]) is left alone ([`LogError::Closed`]).
    pub fn replace(&self, fill: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<(), LogError> {
        let shared = &self.inner.shared;
        shared.writer.lock().replace(shared, fill)
    }

    /// Takes no more appends ([`LogError::Closed`]), for good: once this returns, no append
    /// writes the files (or creates them, or the directory) any more, so the caller may
    /// remove them (a deleted queue, whose publishes still in flight must not create its
    /// directory again).
    pub fn close(&self) {
        self.inner.shared.writer.lock().closed = true;
    }

    /// fsyncs everything appended so far (on the caller's thread).
    pub async fn flush(&self) -> Result<(), LogError> {
        let shared = &self.inner.shared;
        shared.writer.lock().sync(shared)
    }
}

/// The byte position in `segment` of the batch that starts at offset `at`.
fn batch_position(segment: &Segment, at: u64) -> Result<u64, LogError> {
    let (mut position, _) = segment.position_for(at)?;
    let reader = segment.reader()?;
    let len = segment.len();
    while position < len {
        let header = reader.header_at(position)?;
        if header.base_offset == at {
            return Ok(position);
        }
        if header.base_offset > at {
            break;
        }
        position += u64::from(header.batch_len);
    }
    Err(LogError::Corrupt {
        path: segment.paths.log.clone(),
        position,
        reason: format!("no batch starts at offset {at}"),
    })
}

/// Waits until everything up to offset `end` is durable under the log's fsync policy (see
/// [`PartitionLog::durable`]).
async fn durable(shared: &Shared, end: u64) -> Result<(), LogError> {
    if shared.config.fsync == FsyncPolicy::Always {
        shared
            .commit
            .wait_synced(end)
            .await
            .map_err(LogError::Failed)?;
    }
    Ok(())
}

/// The segments of `segments` (oldest first) from the one that holds offset `from` on.
fn segments_from(segments: &[Arc<Segment>], from: u64) -> impl Iterator<Item = &Arc<Segment>> {
    let start = segments
        .partition_point(|s| s.base_offset <= from)
        .saturating_sub(1);
    segments.iter().skip(start)
}

fn read_segment(
    segment: &Segment,
    from: u64,
    next: u64,
    out: &mut Vec<StoredRecord>,
    bytes: &mut usize,
    (max_records, max_bytes): (usize, usize),
) -> Result<bool, LogError> {
    let full = |n: usize, b: usize| n >= max_records || b >= max_bytes;
    let len = segment.len();
    let (mut position, mut expected_base) = segment.position_for(from)?;
    let reader = segment.reader()?;
    while position < len {
        // Every batch passed over is CRC-checked too (at most one index interval of them),
        // so a damaged header can never make a read skip or stop silently.
        let (header, batch) = reader.batch_at(position)?;
        if let Some(expected_base) = expected_base.take()
            && header.base_offset != expected_base
        {
            return Err(LogError::Corrupt {
                path: segment.paths.index.clone(),
                position,
                reason: format!(
                    "index entry says offset {expected_base}, the batch there starts at {}",
                    header.base_offset
                ),
            });
        }
        if header.next_offset() <= from {
            position += u64::from(header.batch_len);
            continue;
        }
        if header.base_offset >= next {
            return Ok(true);
        }
        if !header.entry_type.is_data() {
            // A Raft group's own entry: it takes its offset, and holds no message.
            position += u64::from(header.batch_len);
            continue;
        }
        let limit = max_records.saturating_sub(out.len());
        let records = record::decode_records_from(&header, &batch, from, limit).map_err(|e| {
            LogError::Corrupt {
                path: segment.paths.log.clone(),
                position,
                reason: e.to_string(),
            }
        })?;
        for record in records {
            if record.offset < from || record.offset >= next {
                continue;
            }
            *bytes += record.value.len() + record.key.as_ref().map_or(0, Bytes::len);
            out.push(record);
            if full(out.len(), *bytes) {
                return Ok(true);
            }
        }
        position += u64::from(header.batch_len);
    }
    Ok(false)
}
