//! Rewriting a sealed segment without some of its records (key compaction).
//!
//! Offsets never change: each batch keeps its base offset and `last_offset_delta`, so a batch
//! whose records all go stays as an empty batch covering its offsets (runs of empty batches
//! are merged into one). The new segment and its indexes are written next to the old ones as
//! `.tmp` files and fsynced; then the old indexes are removed, the new log is renamed over
//! the old one, and the new indexes are renamed into place. A crash before the log rename
//! leaves the old segment (`.tmp` files are removed on open, missing indexes rebuilt); a
//! crash after it leaves the new one, its indexes rebuilt on open if not renamed yet. Readers holding a
//! map of the old file keep reading it until they drop it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::record::{self, BatchHeader, Slot};
use super::recovery::{self, temp_path};
use super::segment::{self, Extent, IndexBuilder, Segment, SegmentPaths};
use super::{LogError, PartitionLog, Record, StoredRecord};
use crate::storage::{OpenMode, Storage};

/// What a rewrite did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriteStats {
    /// Records removed.
    pub records_removed: u64,
    /// Bytes the segment shrank by.
    pub bytes_reclaimed: u64,
}

/// Steps of a rewrite, for crash tests: stop after the given one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The new segment is written and fsynced as `.tmp`.
    WroteTemp,
    /// The new segment replaced the old one.
    Renamed,
    /// The new indexes are in place.
    Indexed,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A batch's records minus those `keep` rejects, re-encoded with the same offsets.
fn rewrite_batch(
    header: &BatchHeader,
    records: &[StoredRecord],
    keep: &mut dyn FnMut(&StoredRecord) -> bool,
    out: &mut Vec<u8>,
) -> u64 {
    let kept: Vec<(u32, Record)> = records
        .iter()
        .filter(|r| keep(r))
        .map(|r| {
            let record = Record {
                timestamp_ms: r.timestamp_ms,
                key: r.key.clone(),
                headers: r.headers.clone(),
                value: r.value.clone(),
            };
            ((r.offset - header.base_offset) as u32, record)
        })
        .collect();
    let slots: Vec<Slot<'_>> = kept
        .iter()
        .map(|(offset_delta, record)| Slot {
            offset_delta: *offset_delta,
            record,
        })
        .collect();
    record::encode_slots(
        out,
        header.base_offset,
        header.stamp(),
        header.last_offset_delta,
        &slots,
        header.compression,
    );
    (records.len() - kept.len()) as u64
}

/// The new bytes of `segment` without the records `keep` rejects; `None` when all stay.
fn rewritten_bytes(
    segment: &Segment,
    keep: &mut dyn FnMut(&StoredRecord) -> bool,
) -> Result<Option<(Vec<u8>, u64)>, LogError> {
    let mut out = Vec::with_capacity(segment.len() as usize);
    let mut removed = 0;
    let mut position = 0;
    // A run of batches left empty, as (base offset, next offset, the first one's stamp):
    // written as one.
    let mut empty_run: Option<(u64, u64, record::Stamp)> = None;
    while position < segment.len() {
        let (header, bytes) = segment.batch_at(position)?;
        if !header.entry_type.is_data() {
            // A Raft group's own entry holds no message to compact: kept as it is.
            flush_empty_run(&mut empty_run, &mut out);
            out.extend_from_slice(&bytes);
            position += u64::from(header.batch_len);
            continue;
        }
        let records = record::decode_records(&header, &bytes).map_err(|e| LogError::Corrupt {
            path: segment.paths.log.clone(),
            position,
            reason: e.to_string(),
        })?;
        let mut batch = Vec::new();
        let dropped = rewrite_batch(&header, &records, keep, &mut batch);
        removed += dropped;
        let now_empty = dropped as usize == records.len();
        if now_empty {
            let run =
                empty_run.get_or_insert((header.base_offset, header.next_offset(), header.stamp()));
            run.1 = header.next_offset();
        } else {
            flush_empty_run(&mut empty_run, &mut out);
            out.extend_from_slice(&batch);
        }
        position += u64::from(header.batch_len);
    }
    flush_empty_run(&mut empty_run, &mut out);
    Ok((removed > 0).then_some((out, removed)))
}

fn flush_empty_run(run: &mut Option<(u64, u64, record::Stamp)>, out: &mut Vec<u8>) {
    if let Some((base, next, stamp)) = run.take() {
        let last_delta = (next - 1 - base) as u32;
        record::encode_slots(out, base, stamp, last_delta, &[], super::Compression::None);
    }
}

fn write_synced(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let file = storage.open(path, OpenMode::Create).map_err(io(path))?;
    file.append(bytes).map_err(io(path))?;
    file.sync_data().map_err(io(path))
}

impl PartitionLog {
    /// Rewrites the sealed segment starting at `base_offset` without the records `keep`
    /// rejects. Does nothing (and returns zero stats) when every record stays or when the
    /// segment is not sealed.
    pub fn rewrite_sealed(
        &self,
        base_offset: u64,
        keep: &mut dyn FnMut(&StoredRecord) -> bool,
    ) -> Result<RewriteStats, LogError> {
        self.rewrite_sealed_until(base_offset, keep, Step::Indexed)
    }

    /// [`Self::rewrite_sealed`], stopping after `stop` (crash tests).
    #[doc(hidden)]
    pub fn rewrite_sealed_until(
        &self,
        base_offset: u64,
        keep: &mut dyn FnMut(&StoredRecord) -> bool,
        stop: Step,
    ) -> Result<RewriteStats, LogError> {
        let shared = &self.inner.shared;
        let Some(old) = shared
            .segments
            .load()
            .iter()
            .find(|s| s.base_offset == base_offset && s.is_sealed())
            .filter(|s| s.next_offset() <= shared.floor.load(Ordering::Acquire))
            .cloned()
        else {
            return Ok(RewriteStats::default());
        };
        let Some((bytes, removed)) = rewritten_bytes(&old, keep)? else {
            return Ok(RewriteStats::default());
        };
        let storage = &*shared.config.storage;
        let paths = old.paths.clone();
        let mut builder = IndexBuilder::new(shared.config.index_interval_bytes, None, true);
        let scan = segment::scan(&bytes, base_offset, 0, base_offset, &mut builder);
        write_synced(storage, &temp_path(&paths.log), &bytes)?;
        write_temp_indexes(storage, &paths, &scan.index, &scan.time_index)?;
        if stop == Step::WroteTemp {
            return Ok(RewriteStats::default());
        }
        // Readers holding the old segment keep reading its bytes, not the new file's.
        old.pin()?;
        // Old indexes go first: a crash from here on leaves the segment without indexes,
        // which opening rebuilds, never with indexes of the other version.
        for path in [&paths.index, &paths.time_index] {
            storage.remove(path).map_err(io(path))?;
        }
        storage
            .rename(&temp_path(&paths.log), &paths.log)
            .map_err(io(&paths.log))?;
        recovery::sync_dir(storage, &shared.dir)?;
        if stop == Step::Renamed {
            return Ok(RewriteStats::default());
        }
        for path in [&paths.index, &paths.time_index] {
            storage.rename(&temp_path(path), path).map_err(io(path))?;
        }
        recovery::sync_dir(storage, &shared.dir)?;
        let fresh = Arc::new(Segment::sealed(
            base_offset,
            paths.clone(),
            &shared.config.storage,
            Extent {
                len: scan.end,
                next_offset: old.next_offset(),
                max_timestamp_ms: old.max_timestamp_ms(),
            },
        ));
        let _guard = shared.list_lock.lock();
        let mut list: Vec<Arc<Segment>> = shared.segments.load().as_ref().clone();
        if let Some(slot) = list.iter_mut().find(|s| s.base_offset == base_offset) {
            *slot = fresh;
        }
        shared.segments.store(Arc::new(list));
        Ok(RewriteStats {
            records_removed: removed,
            bytes_reclaimed: old.len().saturating_sub(scan.end),
        })
    }
}

fn write_temp_indexes(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    offsets: &[super::index::OffsetEntry],
    times: &[super::index::TimeEntry],
) -> Result<(), LogError> {
    let mut index = Vec::new();
    offsets.iter().for_each(|e| e.encode(&mut index));
    let mut time = Vec::new();
    times.iter().for_each(|e| e.encode(&mut time));
    write_synced(storage, &temp_path(&paths.index), &index)?;
    write_synced(storage, &temp_path(&paths.time_index), &time)
}
