//! One segment: a `.log` file of batches plus its `.index` and `.timeindex`.
//!
//! A sealed segment is read through a read-only memory map of each file, shared as `Bytes`,
//! so readers slice batches out of it without copying and without any lock. The maps are
//! made on first use and bounded by the storage's map cache ([`MappedFile`]): an idle
//! sealed segment holds no map, and one dropped by the cache is mapped again by its next
//! reader. The active
//! segment is read with positioned reads (`pread`) bounded by the length the writer has
//! published; its indexes live in memory (behind a short `RwLock` taken only to copy an
//! entry) and are appended to their files by the writer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::RwLock;

use super::LogError;
use super::index::{self, OffsetEntry, TimeEntry};
use super::record::{self, BatchHeader, Decoded, HEADER_LEN};
use crate::storage::{MappedFile, SharedStorage, Storage, StorageFile};

/// `i64::MIN` stands for "no record yet" in [`Segment::max_timestamp_ms`].
const NO_TIMESTAMP: i64 = i64::MIN;

/// The file name stem of a segment: its base offset in 20 digits.
pub fn file_stem(base_offset: u64) -> String {
    format!("{base_offset:020}")
}

/// Paths of a segment's three files.
#[derive(Debug, Clone)]
pub struct SegmentPaths {
    /// `{base}.log`
    pub log: PathBuf,
    /// `{base}.index`
    pub index: PathBuf,
    /// `{base}.timeindex`
    pub time_index: PathBuf,
}

impl SegmentPaths {
    /// The paths for a segment with `base_offset` in `dir`.
    pub fn new(dir: &Path, base_offset: u64) -> Self {
        let stem = file_stem(base_offset);
        Self {
            log: dir.join(format!("{stem}.log")),
            index: dir.join(format!("{stem}.index")),
            time_index: dir.join(format!("{stem}.timeindex")),
        }
    }
}

/// Maps a sealed file read-only into `Bytes` (empty files give empty `Bytes`). qit never
/// truncates or rewrites a sealed file in place (compaction and truncation write a new file
/// and rename it), so the mapped bytes never change under the map.
pub fn map_file(storage: &dyn Storage, path: &Path) -> Result<Bytes, LogError> {
    storage.map(path).map_err(|source| LogError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Where a segment's bytes come from.
enum Data {
    /// A sealed segment: the whole file, mapped on use.
    Mapped(MappedFile),
    /// The active segment: positioned reads up to the published length.
    File(Arc<dyn StorageFile>),
}

/// An index's bytes: mapped on use (sealed) or in memory and growing (active).
enum IndexBytes {
    Mapped(MappedFile),
    Growing(RwLock<Vec<u8>>),
}

impl IndexBytes {
    fn with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, LogError> {
        match self {
            IndexBytes::Mapped(file) => {
                file.with(|bytes| f(bytes)).map_err(|source| LogError::Io {
                    path: file.path().to_path_buf(),
                    source,
                })
            }
            IndexBytes::Growing(lock) => Ok(f(&lock.read())),
        }
    }

    fn mapped(&self) -> Option<&MappedFile> {
        match self {
            IndexBytes::Mapped(file) => Some(file),
            IndexBytes::Growing(_) => None,
        }
    }
}

/// One segment, shared by the writer and every reader.
pub struct Segment {
    /// Offset of the first slot this segment may hold.
    pub base_offset: u64,
    /// Its files.
    pub paths: SegmentPaths,
    data: Data,
    index: IndexBytes,
    time_index: IndexBytes,
    /// Bytes readers may read.
    len: AtomicU64,
    /// One past the last offset readers may read.
    next_offset: AtomicU64,
    max_timestamp_ms: AtomicI64,
}

/// The shape of a segment found by scanning it.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Offset index entries a fresh build would have.
    pub index: Vec<OffsetEntry>,
    /// Time index entries a fresh build would have.
    pub time_index: Vec<TimeEntry>,
    /// Byte position after the last whole, valid batch.
    pub end: u64,
    /// One past the last offset covered by a valid batch.
    pub next_offset: u64,
    /// Largest record timestamp seen.
    pub max_timestamp_ms: Option<i64>,
    /// Batches seen.
    pub batches: u64,
    /// Records seen.
    pub records: u64,
    /// Where and why the scan stopped early (torn or corrupt bytes), if it did.
    pub stopped: Option<(u64, Decoded)>,
}

/// Tracks when the next sparse index entries are due while batches go by.
#[derive(Debug, Clone, Default)]
pub struct IndexBuilder {
    interval: u64,
    since_offset_entry: Option<u64>,
    since_time_entry: Option<u64>,
    max_timestamp_ms: Option<i64>,
}

impl IndexBuilder {
    /// A builder writing an entry at most every `interval` bytes (and for the first batch).
    pub fn new(interval: u32, max_timestamp_ms: Option<i64>, fresh: bool) -> Self {
        let start = if fresh { None } else { Some(0) };
        Self {
            interval: u64::from(interval.max(1)),
            since_offset_entry: start,
            since_time_entry: start,
            max_timestamp_ms,
        }
    }

    /// Registers a batch at `position`; returns the entries to append for it.
    pub fn observe(
        &mut self,
        base_offset: u64,
        header: &BatchHeader,
        position: u64,
    ) -> (Option<OffsetEntry>, Option<TimeEntry>) {
        let relative_offset = (header.base_offset - base_offset) as u32;
        let len = u64::from(header.batch_len);
        if header.record_count > 0 {
            self.max_timestamp_ms = Some(
                self.max_timestamp_ms
                    .map_or(header.max_timestamp_ms, |t| t.max(header.max_timestamp_ms)),
            );
        }
        let offset_entry = match self.since_offset_entry {
            Some(since) if since < self.interval => {
                self.since_offset_entry = Some(since + len);
                None
            }
            _ => {
                self.since_offset_entry = Some(len);
                Some(OffsetEntry {
                    relative_offset,
                    position: position as u32,
                })
            }
        };
        let time_entry = match (self.since_time_entry, self.max_timestamp_ms) {
            (Some(since), _) if since < self.interval => {
                self.since_time_entry = Some(since + len);
                None
            }
            (_, Some(timestamp_ms)) => {
                self.since_time_entry = Some(len);
                Some(TimeEntry {
                    timestamp_ms,
                    relative_offset,
                })
            }
            (_, None) => None,
        };
        (offset_entry, time_entry)
    }

    /// Largest timestamp seen so far.
    pub fn max_timestamp_ms(&self) -> Option<i64> {
        self.max_timestamp_ms
    }
}

/// Scans `bytes` (a segment's `.log` content) from `start`, CRC-checking every batch.
pub fn scan(
    bytes: &[u8],
    base_offset: u64,
    start: u64,
    expected_offset: u64,
    builder: &mut IndexBuilder,
) -> Scan {
    let mut out = Scan {
        end: start,
        next_offset: expected_offset,
        ..Scan::default()
    };
    let mut position = start;
    while let Some(rest) = usize::try_from(position).ok().and_then(|p| bytes.get(p..)) {
        if rest.is_empty() {
            break;
        }
        match record::classify(rest) {
            Decoded::Batch(header) if header.base_offset < out.next_offset => {
                let reason = format!(
                    "batch base offset {} overlaps the previous batch (expected >= {})",
                    header.base_offset, out.next_offset
                );
                out.stopped = Some((position, Decoded::Corrupt { reason }));
                break;
            }
            Decoded::Batch(header) => {
                let (offset_entry, time_entry) = builder.observe(base_offset, &header, position);
                out.index.extend(offset_entry);
                out.time_index.extend(time_entry);
                out.batches += 1;
                out.records += u64::from(header.record_count);
                out.next_offset = header.next_offset();
                position += u64::from(header.batch_len);
                out.end = position;
            }
            other => {
                out.stopped = Some((position, other));
                break;
            }
        }
    }
    out.max_timestamp_ms = builder.max_timestamp_ms();
    out
}

fn encode_offset_entries(entries: &[OffsetEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * index::OFFSET_ENTRY_LEN);
    entries.iter().for_each(|e| e.encode(&mut out));
    out
}

fn encode_time_entries(entries: &[TimeEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * index::TIME_ENTRY_LEN);
    entries.iter().for_each(|e| e.encode(&mut out));
    out
}

/// Summary numbers of a segment, as recovered or as the writer left them.
#[derive(Debug, Clone, Copy)]
pub struct Extent {
    /// Readable bytes.
    pub len: u64,
    /// One past the last offset.
    pub next_offset: u64,
    /// Largest timestamp, if any record.
    pub max_timestamp_ms: Option<i64>,
}

impl Segment {
    /// A sealed segment, its files mapped on use through `storage`'s map cache. `extent`
    /// is what an earlier look at the files found (they never change while sealed).
    pub fn sealed(
        base_offset: u64,
        paths: SegmentPaths,
        storage: &SharedStorage,
        extent: Extent,
    ) -> Self {
        Self {
            base_offset,
            data: Data::Mapped(MappedFile::new(storage, &paths.log)),
            index: IndexBytes::Mapped(MappedFile::new(storage, &paths.index)),
            time_index: IndexBytes::Mapped(MappedFile::new(storage, &paths.time_index)),
            paths,
            len: AtomicU64::new(extent.len),
            next_offset: AtomicU64::new(extent.next_offset),
            max_timestamp_ms: AtomicI64::new(extent.max_timestamp_ms.unwrap_or(NO_TIMESTAMP)),
        }
    }

    /// The active segment, read through `file`, with in-memory indexes.
    pub fn active(
        base_offset: u64,
        paths: SegmentPaths,
        file: Arc<dyn StorageFile>,
        index: &[OffsetEntry],
        time_index: &[TimeEntry],
        extent: Extent,
    ) -> Self {
        Self {
            base_offset,
            paths,
            data: Data::File(file),
            index: IndexBytes::Growing(RwLock::new(encode_offset_entries(index))),
            time_index: IndexBytes::Growing(RwLock::new(encode_time_entries(time_index))),
            len: AtomicU64::new(extent.len),
            next_offset: AtomicU64::new(extent.next_offset),
            max_timestamp_ms: AtomicI64::new(extent.max_timestamp_ms.unwrap_or(NO_TIMESTAMP)),
        }
    }

    /// True when this segment is read through a map (sealed).
    pub fn is_sealed(&self) -> bool {
        matches!(self.data, Data::Mapped(_))
    }

    /// Keeps a sealed segment's files mapped (mapping them now if needed) for as long as
    /// this segment lives, whatever the map cache's limit: called before its files are
    /// replaced or removed, so that readers still holding it read the bytes it had, never
    /// a new file's and never a missing one. Nothing to do for the active segment.
    pub fn pin(&self) -> Result<(), LogError> {
        let mapped = [
            match &self.data {
                Data::Mapped(file) => Some(file),
                Data::File(_) => None,
            },
            self.index.mapped(),
            self.time_index.mapped(),
        ];
        for file in mapped.into_iter().flatten() {
            file.pin().map_err(|source| LogError::Io {
                path: file.path().to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }

    /// Bytes readers may read.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// True when the segment holds no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One past the last readable offset.
    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Largest record timestamp, if any.
    pub fn max_timestamp_ms(&self) -> Option<i64> {
        Some(self.max_timestamp_ms.load(Ordering::Acquire)).filter(|t| *t != NO_TIMESTAMP)
    }

    /// Publishes what the writer has written (active segment only).
    pub fn publish(&self, extent: Extent) {
        if let Some(ts) = extent.max_timestamp_ms {
            self.max_timestamp_ms.store(ts, Ordering::Release);
        }
        self.len.store(extent.len, Ordering::Release);
        self.next_offset
            .store(extent.next_offset, Ordering::Release);
    }

    /// Appends index entries to the in-memory indexes of the active segment.
    pub fn push_index(&self, offsets: &[OffsetEntry], times: &[TimeEntry]) {
        if let IndexBytes::Growing(lock) = &self.index {
            let mut bytes = lock.write();
            offsets.iter().for_each(|e| e.encode(&mut bytes));
        }
        if let IndexBytes::Growing(lock) = &self.time_index {
            let mut bytes = lock.write();
            times.iter().for_each(|e| e.encode(&mut bytes));
        }
    }

    /// Where to start scanning for `offset`: the byte position of the index entry at or
    /// below it and the base offset the batch there must have (position 0 and `None` without
    /// an entry). Readers check the batch against it, so a stale index is caught, not followed.
    pub fn position_for(&self, offset: u64) -> Result<(u64, Option<u64>), LogError> {
        let relative = offset
            .saturating_sub(self.base_offset)
            .min(u64::from(u32::MAX)) as u32;
        let entry = self
            .index
            .with(|bytes| index::lookup_offset(bytes, relative))?;
        Ok(entry.map_or((0, None), |e| {
            (
                u64::from(e.position),
                Some(self.base_offset + u64::from(e.relative_offset)),
            )
        }))
    }

    /// The offset to start scanning from for the first record with timestamp >= `ts`.
    pub fn offset_for_time_hint(&self, timestamp_ms: i64) -> Result<u64, LogError> {
        let entry = self
            .time_index
            .with(|bytes| index::lookup_time(bytes, timestamp_ms))?;
        Ok(entry.map_or(self.base_offset, |e| {
            self.base_offset + u64::from(e.relative_offset)
        }))
    }

    fn corrupt(&self, position: u64, reason: String) -> LogError {
        LogError::Corrupt {
            path: self.paths.log.clone(),
            position,
            reason,
        }
    }

    /// The segment's bytes for a run of reads: a sealed segment's map is taken once (one
    /// look in the map cache, mapping it again if the cache dropped it), not per batch.
    pub fn reader(&self) -> Result<SegmentReader<'_>, LogError> {
        let source = match &self.data {
            Data::Mapped(file) => Source::Mapped(file.bytes().map_err(|source| LogError::Io {
                path: self.paths.log.clone(),
                source,
            })?),
            Data::File(file) => Source::File(file),
        };
        Ok(SegmentReader {
            segment: self,
            source,
        })
    }

    /// Reads just the header of the batch at `position` (no CRC check).
    pub fn header_at(&self, position: u64) -> Result<BatchHeader, LogError> {
        self.reader()?.header_at(position)
    }

    /// Reads the whole batch at `position` and checks its CRC.
    pub fn batch_at(&self, position: u64) -> Result<(BatchHeader, Bytes), LogError> {
        self.reader()?.batch_at(position)
    }
}

/// Where a [`SegmentReader`] reads.
enum Source<'a> {
    /// The sealed segment's map (holding it keeps it mapped).
    Mapped(Bytes),
    /// The active segment's file.
    File(&'a Arc<dyn StorageFile>),
}

/// A segment's bytes held for a run of reads ([`Segment::reader`]).
pub struct SegmentReader<'a> {
    segment: &'a Segment,
    source: Source<'a>,
}

impl SegmentReader<'_> {
    /// Reads just the header of the batch at `position` (no CRC check).
    pub fn header_at(&self, position: u64) -> Result<BatchHeader, LogError> {
        // The longest header there is, or what the segment holds past `position` (a whole
        // batch of a shorter version may end sooner).
        let len = (HEADER_LEN as u64).min(self.segment.len().saturating_sub(position));
        let bytes = self.read_range(position, len)?;
        if bytes.get(..4) != Some(&record::BATCH_MAGIC.to_le_bytes()[..]) {
            return Err(self.segment.corrupt(position, "bad batch header".into()));
        }
        record::peek_header(&bytes)
            .ok_or_else(|| self.segment.corrupt(position, "bad batch header".into()))
    }

    /// Reads the whole batch at `position` and checks its CRC.
    pub fn batch_at(&self, position: u64) -> Result<(BatchHeader, Bytes), LogError> {
        let header = self.header_at(position)?;
        let bytes = self.read_range(position, u64::from(header.batch_len))?;
        match record::classify(&bytes) {
            Decoded::Batch(header) => Ok((header, bytes)),
            Decoded::Torn { available, needed } => Err(self.segment.corrupt(
                position,
                format!("torn batch: {available} of {needed} bytes"),
            )),
            Decoded::Corrupt { reason } => Err(self.segment.corrupt(position, reason)),
        }
    }

    /// `len` bytes at `position`, within the readable length.
    fn read_range(&self, position: u64, len: u64) -> Result<Bytes, LogError> {
        let segment = self.segment;
        let end = position
            .checked_add(len)
            .filter(|end| *end <= segment.len())
            .ok_or_else(|| {
                segment.corrupt(position, format!("batch of {len} bytes runs past the data"))
            })?;
        match &self.source {
            Source::Mapped(bytes) if end as usize <= bytes.len() => {
                Ok(bytes.slice(position as usize..end as usize))
            }
            Source::Mapped(_) => Err(segment.corrupt(
                position,
                "the mapped file is shorter than the segment".into(),
            )),
            Source::File(file) => {
                let mut buf = vec![0; len as usize];
                file.read_exact_at(&mut buf, position)
                    .map_err(|source| LogError::Io {
                        path: segment.paths.log.clone(),
                        source,
                    })?;
                Ok(Bytes::from(buf))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Compression, Record};

    fn batch(base: u64, n: usize, ts: i64) -> Vec<u8> {
        let records: Vec<Record> = (0..n)
            .map(|i| Record {
                timestamp_ms: ts + i as i64,
                value: Bytes::from(vec![b'v'; 100]),
                ..Record::default()
            })
            .collect();
        let mut out = Vec::new();
        record::encode_batch(
            &mut out,
            base,
            record::Stamp::default(),
            &records,
            Compression::None,
        );
        out
    }

    #[test]
    fn scan_builds_sparse_indexes_and_stops_at_torn_tail() {
        let mut bytes = Vec::new();
        let mut offset = 100;
        for i in 0..50 {
            bytes.extend(batch(offset, 10, 1000 + i));
            offset += 10;
        }
        let whole = bytes.len() as u64;
        bytes.extend(&batch(offset, 3, 5000)[..40]);
        let mut builder = IndexBuilder::new(4096, None, true);
        let scan = scan(&bytes, 100, 0, 100, &mut builder);
        assert_eq!(scan.end, whole);
        assert_eq!(scan.next_offset, 600);
        assert_eq!(scan.batches, 50);
        assert!(matches!(scan.stopped, Some((_, Decoded::Torn { .. }))));
        assert_eq!(scan.index[0].position, 0);
        assert!(scan.index.len() > 2 && scan.index.len() < 50);
        assert_eq!(scan.max_timestamp_ms, Some(1049 + 9));
    }
}
