//! Opening a partition directory: find segments, check or rebuild their indexes, and cut a
//! torn tail off the active segment.
//!
//! Policy (see `storage-format.md`, "Recovery"):
//! - Only the active (last) segment may end in a torn or corrupt batch; it is truncated to
//!   the last whole batch and synced.
//! - A sealed segment must end on a whole, valid batch; otherwise opening fails naming the
//!   file and byte position. Sealed segments are checked cheaply (index entries ascend, the
//!   last one points at its batch, the batches after it are CRC-checked), touching a page
//!   or two of the log, not all of it; full CRC checks happen on every read, readers check
//!   each index entry they use against its batch, and `qit-inspect verify` checks it all.
//! - A missing or damaged index is rebuilt from the log.
//! - Consecutive segments must cover consecutive offsets; a gap or overlap is an error.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::index::{self, OffsetEntry, TimeEntry};
use super::segment::{self, Extent, IndexBuilder, Scan, Segment, SegmentPaths};
use super::{LogConfig, LogError};
use crate::storage::{self, Known, OpenMode, Storage, StorageFile};

pub use crate::storage::{TEMP_SUFFIX, temp_path};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The base offsets of the segments in `dir`, ascending. Removes leftover temp files.
pub fn list_segments(storage: &dyn Storage, dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut bases = Vec::new();
    for path in storage.read_dir(dir).map_err(io(dir))? {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(TEMP_SUFFIX) {
            storage.remove(&path).map_err(io(&path))?;
            continue;
        }
        if let Some(stem) = name.strip_suffix(".log")
            && stem.len() == 20
            && let Ok(base) = stem.parse::<u64>()
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// What the writer needs to continue the active segment.
pub struct ActiveState {
    /// The open file; appends go to its end, `extent.len`.
    pub file: Arc<dyn StorageFile>,
    /// The segment's recovered extent.
    pub extent: Extent,
    /// Index builder state to continue with.
    pub builder: IndexBuilder,
    /// The partition's first segment was just created and its directory entries not yet
    /// fsynced: the first fsync of a record syncs the directory too (a new, idle partition
    /// costs no fsync).
    pub dir_unsynced: bool,
    /// Whether the segment's index files exist (the writer opens them on first use).
    pub indexes: Known,
}

/// Opens every segment of `dir`. A partition without a directory or without segments is
/// new: its first segment's files (and the directory) are created by its first append, so
/// an unused partition costs no directory, file or descriptor.
pub fn open_segments(
    dir: &Path,
    config: &LogConfig,
) -> Result<(Vec<std::sync::Arc<Segment>>, ActiveState), LogError> {
    let storage = &*config.storage;
    let bases = match list_segments(storage, dir) {
        Err(LogError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Vec::new()
        }
        listed => listed?,
    };
    if bases.is_empty() {
        return Ok(new_partition(dir, config));
    }
    let mut segments = Vec::with_capacity(bases.len());
    let last = bases.len() - 1;
    for (i, &base) in bases.iter().enumerate().take(last) {
        let segment = open_sealed(&config.storage, dir, base, config.index_interval_bytes)?;
        check_continuity(&segment, bases.get(i + 1).copied())?;
        segments.push(std::sync::Arc::new(segment));
    }
    let last_base = bases.get(last).copied().unwrap_or_default();
    let (active, state) =
        open_active(&config.storage, dir, last_base, config.index_interval_bytes)?;
    if let Some(previous) = segments.last() {
        check_continuity(previous, Some(active.base_offset))?;
    }
    segments.push(std::sync::Arc::new(active));
    Ok((segments, state))
}

/// A new partition: its empty first segment, with nothing to read back or check, whose
/// files are created (with the directory) by the first append. Nothing is synced here:
/// nothing is in it yet, and the first fsync of a record syncs the directory too.
fn new_partition(dir: &Path, config: &LogConfig) -> (Vec<Arc<Segment>>, ActiveState) {
    let paths = SegmentPaths::new(dir, 0);
    let file = storage::deferred(
        Arc::clone(&config.storage),
        &paths.log,
        OpenMode::Append,
        Known::Absent,
    );
    let extent = Extent {
        len: 0,
        next_offset: 0,
        max_timestamp_ms: None,
    };
    let segment = Segment::active(0, paths, Arc::clone(&file), &[], &[], extent);
    let state = ActiveState {
        file,
        extent,
        builder: IndexBuilder::new(config.index_interval_bytes, None, true),
        dir_unsynced: true,
        indexes: Known::Absent,
    };
    (vec![Arc::new(segment)], state)
}

fn check_continuity(segment: &Segment, next_base: Option<u64>) -> Result<(), LogError> {
    match next_base {
        Some(next) if segment.next_offset() != next => Err(LogError::Corrupt {
            path: segment.paths.log.clone(),
            position: segment.len(),
            reason: format!(
                "segment ends at offset {} but the next segment starts at {next}",
                segment.next_offset()
            ),
        }),
        _ => Ok(()),
    }
}

/// Creates empty files for a new segment and syncs the directory.
pub fn create_segment_files(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
) -> Result<(Arc<dyn StorageFile>, SegmentPaths), LogError> {
    let created = create_segment_files_unsynced(storage, dir, base)?;
    sync_dir(storage, dir)?;
    Ok(created)
}

/// Creates empty files for a new segment (the caller syncs the directory).
fn create_segment_files_unsynced(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
) -> Result<(Arc<dyn StorageFile>, SegmentPaths), LogError> {
    let paths = SegmentPaths::new(dir, base);
    let file = storage
        .open(&paths.log, OpenMode::Append)
        .map_err(io(&paths.log))?;
    for path in [&paths.index, &paths.time_index] {
        storage.open(path, OpenMode::Append).map_err(io(path))?;
    }
    Ok((file, paths))
}

/// fsyncs a directory so that created, renamed or removed entries are durable.
pub fn sync_dir(storage: &dyn Storage, dir: &Path) -> Result<(), LogError> {
    storage.sync_dir(dir).map_err(io(dir))
}

/// An index file's entries when they are usable: strictly ascending in offset and position,
/// within the log, and the last one pointing at a batch with the offset it names. Only the
/// last entry is checked against the log, so opening a sealed segment touches one page of
/// it, not one per entry; readers check every entry they use (see `read_segment`).
fn checked_offset_index(log: &[u8], base: u64, bytes: &[u8]) -> Option<Vec<OffsetEntry>> {
    let mut entries = Vec::with_capacity(index::offset_entries(bytes));
    let mut previous: Option<OffsetEntry> = None;
    for i in 0..index::offset_entries(bytes) {
        let entry = OffsetEntry::at(bytes, i)?;
        if previous.is_some_and(|p| {
            p.relative_offset >= entry.relative_offset || p.position >= entry.position
        }) || entry.position as usize >= log.len().max(1)
        {
            return None;
        }
        entries.push(entry);
        previous = Some(entry);
    }
    if let Some(last) = entries.last() {
        let at = log.get(last.position as usize..)?;
        let header = super::record::peek_header(at)?;
        if at.get(..4) != Some(&super::record::BATCH_MAGIC.to_le_bytes()[..])
            || header.base_offset != base + u64::from(last.relative_offset)
        {
            return None;
        }
    }
    Some(entries)
}

fn checked_time_index(bytes: &[u8], next_relative: u64) -> Option<Vec<TimeEntry>> {
    let mut entries = Vec::with_capacity(index::time_entries(bytes));
    for i in 0..index::time_entries(bytes) {
        let entry = TimeEntry::at(bytes, i)?;
        let ordered = entries.last().is_none_or(|p: &TimeEntry| {
            p.timestamp_ms <= entry.timestamp_ms && p.relative_offset < entry.relative_offset
        });
        if !ordered || u64::from(entry.relative_offset) >= next_relative {
            return None;
        }
        entries.push(entry);
    }
    Some(entries)
}

/// Result of checking one segment's files.
struct Checked {
    log: Bytes,
    index: Vec<OffsetEntry>,
    time_index: Vec<TimeEntry>,
    scan: Scan,
    rebuilt: bool,
}

/// Scans a segment from its last valid index entry (or from the start when the index is
/// unusable) and returns the indexes to keep.
fn check_segment(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    base: u64,
    interval: u32,
) -> Result<Checked, LogError> {
    let log = segment::map_file(storage, &paths.log)?;
    let index_bytes = read_or_empty(storage, &paths.index)?;
    let (index, start, expected) = match checked_offset_index(&log, base, &index_bytes) {
        Some(entries) if !entries.is_empty() || log.is_empty() => {
            let last = entries.last().copied();
            let start = last.map_or(0, |e| u64::from(e.position));
            let expected = last.map_or(base, |e| base + u64::from(e.relative_offset));
            (Some(entries), start, expected)
        }
        _ => (None, 0, base),
    };
    let time_bytes = read_or_empty(storage, &paths.time_index)?;
    let last_time = index.as_ref().and_then(|_| {
        checked_time_index(&time_bytes, u64::MAX).and_then(|t| t.last().map(|e| e.timestamp_ms))
    });
    let mut builder = IndexBuilder::new(interval, last_time, index.is_none());
    let scan = segment::scan(&log, base, start, expected, &mut builder);
    match index {
        Some(mut entries) => {
            // The entry at `start` is re-found by the scan; keep the old ones before it.
            let rescanned: Vec<OffsetEntry> = scan
                .index
                .iter()
                .copied()
                .filter(|e| u64::from(e.position) > start)
                .collect();
            entries.extend(rescanned);
            let next_relative = scan.next_offset.saturating_sub(base);
            match checked_time_index(&time_bytes, next_relative) {
                Some(time_index) => Ok(Checked {
                    log,
                    index: entries,
                    time_index,
                    scan,
                    rebuilt: false,
                }),
                None => Ok(rebuild(log, base, interval)),
            }
        }
        None => Ok(Checked {
            index: scan.index.clone(),
            time_index: scan.time_index.clone(),
            log,
            scan,
            rebuilt: true,
        }),
    }
}

/// Scans a whole segment and builds both indexes from scratch.
fn rebuild(log: Bytes, base: u64, interval: u32) -> Checked {
    let mut builder = IndexBuilder::new(interval, None, true);
    let scan = segment::scan(&log, base, 0, base, &mut builder);
    Checked {
        index: scan.index.clone(),
        time_index: scan.time_index.clone(),
        log,
        scan,
        rebuilt: true,
    }
}

fn read_or_empty(storage: &dyn Storage, path: &Path) -> Result<Vec<u8>, LogError> {
    storage::read_if_exists(storage, path)
        .map(Option::unwrap_or_default)
        .map_err(io(path))
}

/// Writes index files from scratch (atomically: temp file, fsync, rename, fsync dir).
fn write_indexes(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    index: &[OffsetEntry],
    time_index: &[TimeEntry],
) -> Result<(), LogError> {
    let mut offsets = Vec::new();
    index.iter().for_each(|e| e.encode(&mut offsets));
    let mut times = Vec::new();
    time_index.iter().for_each(|e| e.encode(&mut times));
    for (path, bytes) in [(&paths.index, offsets), (&paths.time_index, times)] {
        storage::atomic_replace(storage, path, &bytes, false).map_err(|e| LogError::Io {
            path: e.path,
            source: e.source,
        })?;
    }
    Ok(())
}

fn open_sealed(
    shared: &storage::SharedStorage,
    dir: &Path,
    base: u64,
    interval: u32,
) -> Result<Segment, LogError> {
    let storage = &**shared;
    let paths = SegmentPaths::new(dir, base);
    let checked = check_segment(storage, &paths, base, interval)?;
    if let Some((position, decoded)) = &checked.scan.stopped {
        return Err(LogError::Corrupt {
            path: paths.log.clone(),
            position: *position,
            reason: format!("sealed segment is damaged: {decoded:?}"),
        });
    }
    if checked.rebuilt {
        tracing::warn!(segment = %paths.log.display(), "rebuilt damaged or missing index");
        write_indexes(storage, &paths, &checked.index, &checked.time_index)?;
    }
    let extent = Extent {
        len: checked.scan.end,
        next_offset: checked.scan.next_offset,
        max_timestamp_ms: checked.scan.max_timestamp_ms,
    };
    // Mapped again by its first reader, through the map cache.
    drop(checked.log);
    Ok(Segment::sealed(base, paths, shared, extent))
}

fn open_active(
    shared: &storage::SharedStorage,
    dir: &Path,
    base: u64,
    interval: u32,
) -> Result<(Segment, ActiveState), LogError> {
    let storage = &**shared;
    let paths = SegmentPaths::new(dir, base);
    let checked = check_segment(storage, &paths, base, interval)?;
    let scan = &checked.scan;
    let cut = scan.stopped.is_some();
    if let Some((position, decoded)) = &scan.stopped {
        tracing::warn!(
            segment = %paths.log.display(),
            position,
            ?decoded,
            dropped_bytes = checked.log.len() as u64 - position,
            "truncating torn or corrupt tail of the active segment"
        );
    }
    let log_len = checked.log.len() as u64;
    drop(checked.log);
    // Opened on first use: an idle restarted partition holds no descriptor and costs no
    // `open`. A torn tail is cut now, before the partition serves.
    let file = storage::deferred(
        Arc::clone(shared),
        &paths.log,
        OpenMode::Append,
        Known::Present,
    );
    if cut || log_len != scan.end {
        file.set_len(scan.end).map_err(io(&paths.log))?;
        file.sync_data().map_err(io(&paths.log))?;
    }
    let index: Vec<OffsetEntry> = checked
        .index
        .iter()
        .copied()
        .filter(|e| u64::from(e.position) < scan.end)
        .collect();
    let next_relative = scan.next_offset.saturating_sub(base);
    let time_index: Vec<TimeEntry> = checked
        .time_index
        .iter()
        .copied()
        .filter(|e| u64::from(e.relative_offset) < next_relative)
        .collect();
    if cut || checked.rebuilt {
        write_indexes(storage, &paths, &index, &time_index)?;
    }
    let extent = Extent {
        len: scan.end,
        next_offset: scan.next_offset,
        max_timestamp_ms: scan.max_timestamp_ms,
    };
    let segment = Segment::active(base, paths, Arc::clone(&file), &index, &time_index, extent);
    let builder = IndexBuilder::new(interval, scan.max_timestamp_ms, index.is_empty());
    Ok((
        segment,
        ActiveState {
            file,
            extent,
            builder,
            dir_unsynced: false,
            indexes: Known::Present,
        },
    ))
}
