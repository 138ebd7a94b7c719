//! The writer of a partition: the state of the active segment, behind the partition's
//! writer lock, plus the sync thread that makes appends durable.
//!
//! An append takes the lock, encodes its records as one batch, and writes it with one
//! `write` on the caller's own thread: no hand-off to another thread, so an append costs an
//! encode and a syscall. fsyncs happen on the partition's sync thread, outside the lock:
//! under `fsync = always` every appender that wrote while a sync ran is covered by the next
//! one (group commit), and under `interval` the thread syncs a few milliseconds after the
//! first unsynced write.
//!
//! Records become visible to readers (the segment's length and the partition's next offset
//! are published) after their write, and under `always` only after their fsync, so a reader
//! never sees a record an appender was not told about, and under `always` never one that is
//! not durable.

use std::fs::{self, File};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::index::{OffsetEntry, TimeEntry};
use super::record::{self, Slot};
use super::recovery::{self, ActiveState};
use super::segment::{self, Extent, IndexBuilder, Segment, SegmentPaths};
use super::{FsyncPolicy, LogError, Record, Shared};

/// The sync thread: fsyncs the active segment when asked (`always`) or shortly after the
/// first unsynced write (`interval`), outside the writer lock, then publishes (`always`)
/// and tells waiting appenders.
pub fn run_sync_thread(shared: Arc<Shared>) {
    shared.commit.run(
        shared.config.fsync,
        shared.config.fsync_interval,
        || shared.writer.lock().last_sync,
        || sync_outside_lock(&shared),
    );
}

/// One group commit: capture what is written, fsync it without holding the lock, publish.
fn sync_outside_lock(shared: &Shared) {
    let captured = {
        let mut writer = shared.writer.lock();
        if !writer.dirty {
            return;
        }
        writer.dirty = false;
        (
            Arc::clone(&writer.file),
            Arc::clone(&writer.active),
            writer.extent,
        )
    };
    let (file, segment, extent) = captured;
    let started = Instant::now();
    let result = file.sync_data();
    report_fsync(shared, started);
    let mut writer = shared.writer.lock();
    writer.last_sync = Instant::now();
    match result {
        Ok(()) => {
            // A roll since the capture synced and published the old segment itself.
            if Arc::ptr_eq(&segment, &writer.active)
                && shared.config.fsync == FsyncPolicy::Always
                && extent.next_offset > segment.next_offset()
            {
                publish(shared, &segment, extent);
            }
            shared.commit.mark_synced(extent.next_offset);
        }
        Err(error) => {
            let message = format!("fsync of {} failed: {error}", segment.paths.log.display());
            tracing::error!(%message, "the partition log stops taking appends");
            writer.failed = Some(message.clone());
            shared.commit.fail(message);
        }
    }
}

/// Tells the configured observer how long an fsync that began at `started` took.
fn report_fsync(shared: &Shared, started: Instant) {
    if let Some(observer) = &shared.config.on_fsync {
        observer.observe(started.elapsed());
    }
}

/// Makes `extent` of `segment` visible to readers.
fn publish(shared: &Shared, segment: &Segment, extent: Extent) {
    segment.publish(extent);
    shared
        .next_offset
        .store(extent.next_offset, Ordering::Release);
    shared.watch.send_replace(extent.next_offset);
}

/// The active segment's writing state, guarded by the partition's writer lock.
pub struct Writer {
    active: Arc<Segment>,
    /// Shared with the sync thread, which fsyncs it outside the lock.
    file: Arc<File>,
    index_file: File,
    time_file: File,
    /// What is written of the active segment (readers may see less under `always`).
    extent: Extent,
    builder: IndexBuilder,
    /// Reused encode buffer.
    buf: Vec<u8>,
    /// Written since the last fsync.
    dirty: bool,
    last_sync: Instant,
    /// Why the log takes no more appends (a failed fsync leaves the disk state unknown).
    failed: Option<String>,
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn open_append(path: &std::path::Path) -> Result<File, LogError> {
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(io(path))
}

impl Writer {
    /// A writer continuing the active segment `active` in `state`.
    pub fn new(active: Arc<Segment>, state: ActiveState) -> Result<Self, LogError> {
        let index_file = open_append(&active.paths.index)?;
        let time_file = open_append(&active.paths.time_index)?;
        Ok(Self {
            extent: state.extent,
            file: Arc::new(state.file),
            builder: state.builder,
            active,
            index_file,
            time_file,
            buf: Vec::with_capacity(64 * 1024),
            dirty: false,
            last_sync: Instant::now(),
            failed: None,
        })
    }

    /// Writes `records` as one batch (rolling first when the segment is full); returns its
    /// first offset and one past its last. Publishes at once unless `fsync = always`.
    pub fn append(&mut self, shared: &Shared, records: &[Record]) -> Result<(u64, u64), LogError> {
        if let Some(reason) = &self.failed {
            return Err(LogError::Failed(reason.clone()));
        }
        let base = self.extent.next_offset;
        if records.is_empty() {
            return Ok((base, base));
        }
        if self.extent.len >= shared.config.segment_bytes {
            self.roll(shared)?;
        }
        let position = self.extent.len;
        self.buf.clear();
        record::encode_batch(&mut self.buf, base, 0, records, shared.config.compression);
        let header = record::peek_header(&self.buf).ok_or_else(|| LogError::Corrupt {
            path: self.active.paths.log.clone(),
            position,
            reason: "encoder produced no header".into(),
        })?;
        if let Err(error) = (&*self.file).write_all(&self.buf) {
            // Cut whatever part of the batch made it, so the file ends on a whole batch.
            let _ = self.file.set_len(self.extent.len);
            return Err(io(&self.active.paths.log)(error));
        }
        let (offset_entry, time_entry) =
            self.builder
                .observe(self.active.base_offset, &header, position);
        self.write_index_entries(offset_entry, time_entry);
        self.extent = Extent {
            len: position + self.buf.len() as u64,
            next_offset: header.next_offset(),
            max_timestamp_ms: self.builder.max_timestamp_ms(),
        };
        if !self.dirty {
            self.dirty = true;
            if shared.config.fsync == FsyncPolicy::Interval {
                shared.commit.request();
            }
        }
        if shared.config.fsync != FsyncPolicy::Always {
            publish(shared, &self.active, self.extent);
        }
        Ok((base, self.extent.next_offset))
    }

    /// Appends sparse index entries to the index files and the in-memory indexes.
    fn write_index_entries(&mut self, offset: Option<OffsetEntry>, time: Option<TimeEntry>) {
        if offset.is_none() && time.is_none() {
            return;
        }
        let offsets: Vec<OffsetEntry> = offset.into_iter().collect();
        let times: Vec<TimeEntry> = time.into_iter().collect();
        let mut bytes = Vec::new();
        // Index files are hints: a failed write here is repaired by recovery, not fatal.
        offsets.iter().for_each(|e| e.encode(&mut bytes));
        let _ = self.index_file.write_all(&bytes);
        bytes.clear();
        times.iter().for_each(|e| e.encode(&mut bytes));
        let _ = self.time_file.write_all(&bytes);
        self.active.push_index(&offsets, &times);
    }

    /// fsyncs and publishes everything written so far, on the caller's thread.
    pub fn sync(&mut self, shared: &Shared) -> Result<(), LogError> {
        if self.dirty {
            let started = Instant::now();
            self.file.sync_data().map_err(io(&self.active.paths.log))?;
            report_fsync(shared, started);
            self.dirty = false;
            self.last_sync = Instant::now();
        }
        publish(shared, &self.active, self.extent);
        shared.commit.mark_synced(self.extent.next_offset);
        Ok(())
    }

    /// Seals the active segment and starts a new one at the next offset.
    fn roll(&mut self, shared: &Shared) -> Result<(), LogError> {
        self.sync(shared)?;
        let _ = self.index_file.sync_data();
        let _ = self.time_file.sync_data();
        let old = Arc::clone(&self.active);
        let sealed = Arc::new(Segment::sealed(
            old.base_offset,
            old.paths.clone(),
            segment::map_file(&old.paths.log)?,
            segment::map_file(&old.paths.index)?,
            segment::map_file(&old.paths.time_index)?,
            self.extent,
        ));
        let base = self.extent.next_offset;
        let (file, paths) = recovery::create_segment_files(&shared.dir, base)?;
        let reader = File::open(&paths.log).map_err(io(&paths.log))?;
        let extent = Extent {
            len: 0,
            next_offset: base,
            max_timestamp_ms: None,
        };
        let active = Arc::new(Segment::active(base, paths, reader, &[], &[], extent));
        {
            let _guard = shared.list_lock.lock();
            let mut list: Vec<Arc<Segment>> = shared.segments.load().as_ref().clone();
            if let Some(last) = list.last_mut() {
                *last = sealed;
            }
            list.push(Arc::clone(&active));
            shared.segments.store(Arc::new(list));
        }
        self.index_file = open_append(&active.paths.index)?;
        self.time_file = open_append(&active.paths.time_index)?;
        self.file = Arc::new(file);
        self.active = active;
        self.extent = extent;
        self.builder = IndexBuilder::new(shared.config.index_interval_bytes, None, true);
        Ok(())
    }

    /// Removes every record at or past `offset`, rewriting the segment that holds it.
    pub fn truncate(&mut self, shared: &Shared, offset: u64) -> Result<(), LogError> {
        if offset >= self.extent.next_offset {
            return Ok(());
        }
        self.sync(shared)?;
        let _guard = shared.list_lock.lock();
        let segments = shared.segments.load_full();
        let dir = shared.dir.clone();
        let keep_until = segments
            .iter()
            .rposition(|s| s.base_offset < offset)
            .unwrap_or(0);
        for removed in segments.iter().skip(keep_until + 1) {
            remove_segment_files(&removed.paths);
        }
        match segments.get(keep_until) {
            Some(target) if target.base_offset < offset => {
                rewrite_prefix(&dir, target, offset)?;
            }
            Some(target) => {
                // Every record goes: start over with an empty segment at `offset`.
                remove_segment_files(&target.paths);
                recovery::create_segment_files(&dir, offset)?;
            }
            None => {
                recovery::create_segment_files(&dir, offset)?;
            }
        }
        recovery::sync_dir(&dir)?;
        let (list, state) = recovery::open_segments(&dir, &shared.config)?;
        let active = list.last().cloned().ok_or_else(|| LogError::Corrupt {
            path: dir.clone(),
            position: 0,
            reason: "no segment after truncation".into(),
        })?;
        shared.segments.store(Arc::new(list));
        self.index_file = open_append(&active.paths.index)?;
        self.time_file = open_append(&active.paths.time_index)?;
        self.file = Arc::new(state.file);
        self.extent = state.extent;
        self.builder = state.builder;
        self.active = active;
        self.dirty = false;
        publish(shared, &self.active, self.extent);
        shared.commit.reset_synced(self.extent.next_offset);
        Ok(())
    }
}

fn remove_segment_files(paths: &SegmentPaths) {
    for path in [&paths.log, &paths.index, &paths.time_index] {
        if let Err(error) = fs::remove_file(path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), %error, "could not remove segment file");
        }
    }
}

/// Rewrites `segment` keeping only offsets below `offset` (new file, fsync, rename), and
/// removes its indexes so that opening rebuilds them.
fn rewrite_prefix(dir: &std::path::Path, segment: &Segment, offset: u64) -> Result<(), LogError> {
    let mut out = Vec::new();
    let mut position = 0;
    while position < segment.len() {
        let (header, bytes) = segment.batch_at(position)?;
        if header.next_offset() <= offset {
            out.extend_from_slice(&bytes);
        } else if header.base_offset < offset {
            let records =
                record::decode_records(&header, &bytes).map_err(|e| LogError::Corrupt {
                    path: segment.paths.log.clone(),
                    position,
                    reason: e.to_string(),
                })?;
            let kept: Vec<(u32, Record)> = records
                .into_iter()
                .filter(|r| r.offset < offset)
                .map(|r| {
                    let delta = (r.offset - header.base_offset) as u32;
                    let record = Record {
                        timestamp_ms: r.timestamp_ms,
                        key: r.key,
                        headers: r.headers,
                        value: r.value,
                    };
                    (delta, record)
                })
                .collect();
            let slots: Vec<Slot<'_>> = kept
                .iter()
                .map(|(offset_delta, record)| Slot {
                    offset_delta: *offset_delta,
                    record,
                })
                .collect();
            let last_delta = (offset - 1 - header.base_offset) as u32;
            record::encode_slots(
                &mut out,
                header.base_offset,
                header.leader_epoch,
                last_delta,
                &slots,
                header.compression,
            );
        } else {
            break;
        }
        position += u64::from(header.batch_len);
    }
    let tmp = recovery::temp_path(&segment.paths.log);
    fs::write(&tmp, &out).map_err(io(&tmp))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, &segment.paths.log).map_err(io(&segment.paths.log))?;
    for path in [&segment.paths.index, &segment.paths.time_index] {
        let _ = fs::remove_file(path);
    }
    recovery::sync_dir(dir)
}
