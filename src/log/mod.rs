//! The partition log: a directory of segment files holding checksummed record batches,
//! with sparse offset and time indexes, read through mmap. The byte format is specified in
//! `storage-format.md`.
//!
//! CONTRACT STUB: the public API below is fixed; bodies are filled in by the log work.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

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
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::Interval,
            fsync_interval: Duration::from_millis(5),
            index_interval_bytes: 4096,
            compression: Compression::None,
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
}

/// One partition: a directory of segments. Cheap to clone (a handle).
#[derive(Clone)]
pub struct PartitionLog {}

impl PartitionLog {
    /// Opens (creating if needed) the partition in `dir`, recovering the active segment.
    pub fn open(_dir: &Path, _config: LogConfig) -> Result<Self, LogError> {
        todo!()
    }
    /// Appends records with consecutive offsets; returns the first one. Resolves once the
    /// records are readable, and under [`FsyncPolicy::Always`] once they are durable.
    pub async fn append(&self, _records: Vec<Record>) -> Result<u64, LogError> {
        todo!()
    }
    /// Reads whole records from `from` (clamped up to the first offset) up to the budgets;
    /// at least one record when any exists at or past `from`.
    pub fn read(
        &self,
        _from: u64,
        _max_records: usize,
        _max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        todo!()
    }
    /// The first offset whose record has a timestamp >= `timestamp_ms`, if any.
    pub fn offset_for_timestamp(&self, _timestamp_ms: i64) -> Result<Option<u64>, LogError> {
        todo!()
    }
    /// The first retained offset.
    pub fn first_offset(&self) -> u64 {
        todo!()
    }
    /// One past the last readable offset.
    pub fn next_offset(&self) -> u64 {
        todo!()
    }
    /// Watches [`Self::next_offset`]; changes on every append.
    pub fn watch_next_offset(&self) -> tokio::sync::watch::Receiver<u64> {
        todo!()
    }
    /// Segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        todo!()
    }
    /// Deletes whole sealed segments whose every offset is below `offset`; returns how many.
    /// Safe while readers hold maps of them.
    pub fn drop_segments_before(&self, _offset: u64) -> Result<usize, LogError> {
        todo!()
    }
    /// Removes every record at or past `offset` (for replication); next_offset becomes `offset`.
    pub async fn truncate_suffix(&self, _offset: u64) -> Result<(), LogError> {
        todo!()
    }
    /// Writes and fsyncs everything appended so far.
    pub async fn flush(&self) -> Result<(), LogError> {
        todo!()
    }
}
