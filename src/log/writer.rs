//! The writer of a partition: the state of the active segment, behind the partition's
//! writer lock, plus the syncs (on the shared pool) that make appends durable.
//!
//! An append takes the lock, encodes its records as one batch, and writes it with one
//! `write` on the caller's own thread: no hand-off to another thread, so an append costs an
//! encode and a syscall. fsyncs happen on a thread of the shared sync pool, outside the lock:
//! under `fsync = always` every appender that wrote while a sync ran is covered by the next
//! one (group commit), and under `interval` the thread syncs a few milliseconds after the
//! first unsynced write.
//!
//! Records become visible to readers (the segment's length and the partition's next offset
//! are published) after their write, and under `always` only after their fsync, so a reader
//! never sees a record an appender was not told about, and under `always` never one that is
//! not durable.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::index::{OffsetEntry, TimeEntry};
use super::record::{self, Slot};
use super::recovery::{self, ActiveState};
use super::segment::{Extent, IndexBuilder, Segment, SegmentPaths};
use super::{FsyncPolicy, LogError, Record, Shared};
use crate::storage::{Known, OpenMode, SharedStorage, Storage, StorageFile};

/// The shared sync pool fsyncs the active segment when asked (`always`) or one interval
/// after the first unsynced write (`interval`), outside the writer lock, then publishes
/// (`always`) and tells waiting appenders.
impl crate::commit::SyncTarget for Shared {
    fn commit(&self) -> &crate::commit::GroupCommit {
        &self.commit
    }

    fn sync_once(&self) {
        sync_outside_lock(self);
    }
}

/// Reports a failed fsync: an error that stops the log, unless the log was closed because
/// its queue is being deleted or replaced (its files are removed on purpose, so there is
/// nothing left to make durable and the failure is expected).
fn report_sync_failure(closed: bool, reason: &str) {
    if closed {
        tracing::debug!(%reason, "fsync of a removed queue's log failed");
    } else {
        tracing::error!(%reason, "the partition log stops taking appends");
    }
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
            std::mem::take(&mut writer.dir_unsynced),
        )
    };
    let (file, segment, extent, dir_unsynced) = captured;
    let started = Instant::now();
    let result = file.sync_data().and_then(|()| {
        if dir_unsynced {
            shared.config.storage.sync_dir(&shared.dir)?;
        }
        Ok(())
    });
    report_fsync(shared, started);
    let mut writer = shared.writer.lock();
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
            report_sync_failure(writer.closed, &message);
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
    shared.written.store(extent.next_offset, Ordering::Release);
    shared.refresh_visible();
}

/// The active segment's writing state, guarded by the partition's writer lock.
pub struct Writer {
    active: Arc<Segment>,
    /// Shared with the sync pool, which fsyncs it outside the lock.
    file: Arc<dyn StorageFile>,
    index_file: Arc<dyn StorageFile>,
    time_file: Arc<dyn StorageFile>,
    /// What is written of the active segment (readers may see less under `always`).
    extent: Extent,
    builder: IndexBuilder,
    /// Reused encode buffer.
    buf: Vec<u8>,
    /// Written since the last fsync.
    dirty: bool,
    /// The partition's directory awaits its first fsync (see [`ActiveState::dir_unsynced`]).
    dir_unsynced: bool,
    /// Why the log takes no more appends (a failed fsync leaves the disk state unknown).
    failed: Option<String>,
    /// Closed for good ([`super::PartitionLog::close`]): no more appends.
    pub closed: bool,
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An index file of the active segment, opened for appending on its first use (`known`
/// says whether it exists): a hint, which recovery rebuilds from the log when it is short
/// or damaged, so the file cache may close it unsynced.
fn open_index(
    storage: &SharedStorage,
    path: &std::path::Path,
    known: Known,
) -> Arc<dyn StorageFile> {
    crate::storage::deferred(Arc::clone(storage), path, OpenMode::AppendHint, known)
}

impl Writer {
    /// A writer continuing the active segment `active` in `state`.
    pub fn new(storage: &SharedStorage, active: Arc<Segment>, state: ActiveState) -> Self {
        let index_file = open_index(storage, &active.paths.index, state.indexes);
        let time_file = open_index(storage, &active.paths.time_index, state.indexes);
        Self {
            extent: state.extent,
            file: state.file,
            builder: state.builder,
            active,
            index_file,
            time_file,
            // Grown by the first append: an idle partition holds no buffer.
            buf: Vec::new(),
            dirty: false,
            dir_unsynced: state.dir_unsynced,
            failed: None,
            closed: false,
        }
    }

    /// Writes `records` as one batch (rolling first when the segment is full); returns its
    /// first offset and one past its last. Publishes at once unless `fsync = always`.
    pub fn append(&mut self, shared: &Shared, records: &[Record]) -> Result<(u64, u64), LogError> {
        let stamp = record::Stamp {
            leader_epoch: shared.leader_epoch.load(Ordering::Acquire),
            raft_index: shared.raft_index.load(Ordering::Acquire),
            entry_type: record::EntryType::Data,
        };
        self.append_stamped(shared, stamp, records)
    }

    /// [`Self::append`] with the batch stamped `stamp` rather than with the log's stamp.
    pub fn append_stamped(
        &mut self,
        shared: &Shared,
        stamp: record::Stamp,
        records: &[Record],
    ) -> Result<(u64, u64), LogError> {
        if self.closed {
            return Err(LogError::Closed);
        }
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
        record::encode_batch(
            &mut self.buf,
            base,
            stamp,
            records,
            shared.config.compression,
        );
        let header = record::peek_header(&self.buf).ok_or_else(|| LogError::Corrupt {
            path: self.active.paths.log.clone(),
            position,
            reason: "encoder produced no header".into(),
        })?;
        if let Err(error) = self.file.append(&self.buf) {
            // Cut whatever part of the batch made it, so the file ends on a whole batch and
            // the next append (say once space returns) follows the last whole one. When the
            // cut fails too, the file may end in a partial batch: take no more appends, so
            // none lands behind it (reopening cuts it as a torn tail).
            let path = &self.active.paths.log;
            if let Err(cut) = self.file.set_len(self.extent.len) {
                let reason = format!(
                    "write to {} failed ({error}) and cutting back the partial batch failed ({cut})",
                    path.display()
                );
                tracing::error!(%reason, "the partition log stops taking appends");
                self.failed = Some(reason);
            }
            return Err(io(path)(error));
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
        let _ = self.index_file.append(&bytes);
        bytes.clear();
        times.iter().for_each(|e| e.encode(&mut bytes));
        let _ = self.time_file.append(&bytes);
        self.active.push_index(&offsets, &times);
    }

    /// fsyncs and publishes everything written so far, on the caller's thread.
    ///
    /// A failed fsync fails the log for good (until reopened): the kernel may have dropped
    /// the dirty pages and cleared the error, so a second fsync could "succeed" without the
    /// data being on disk (PostgreSQL's fsyncgate). Never retry it.
    pub fn sync(&mut self, shared: &Shared) -> Result<(), LogError> {
        if let Some(reason) = &self.failed {
            return Err(LogError::Failed(reason.clone()));
        }
        if self.dirty {
            let started = Instant::now();
            let result = self.file.sync_data().and_then(|()| {
                if self.dir_unsynced {
                    shared.config.storage.sync_dir(&shared.dir)?;
                }
                Ok(())
            });
            report_fsync(shared, started);
            if let Err(error) = result {
                let reason = format!(
                    "fsync of {} failed: {error}",
                    self.active.paths.log.display()
                );
                report_sync_failure(self.closed, &reason);
                self.failed = Some(reason.clone());
                shared.commit.fail(reason);
                return Err(io(&self.active.paths.log)(error));
            }
            self.dirty = false;
            self.dir_unsynced = false;
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
        let storage = &*shared.config.storage;
        let old = Arc::clone(&self.active);
        // Mapped by its first reader (consumers mostly read the newest segment).
        let sealed = Arc::new(Segment::sealed(
            old.base_offset,
            old.paths.clone(),
            &shared.config.storage,
            self.extent,
        ));
        let base = self.extent.next_offset;
        let (file, paths) = recovery::create_segment_files(storage, &shared.dir, base)?;
        let reader = Arc::clone(&file);
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
        self.index_file = open_index(&shared.config.storage, &active.paths.index, Known::Present);
        self.time_file = open_index(
            &shared.config.storage,
            &active.paths.time_index,
            Known::Present,
        );
        self.file = file;
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
        let storage = &*shared.config.storage;
        let _guard = shared.list_lock.lock();
        let segments = shared.segments.load_full();
        let dir = shared.dir.clone();
        let keep_until = segments
            .iter()
            .rposition(|s| s.base_offset < offset)
            .unwrap_or(0);
        // Readers still holding the old list keep reading the old bytes of the segments
        // rewritten or removed below.
        for changed in segments.iter().skip(keep_until) {
            changed.pin()?;
        }
        for removed in segments.iter().skip(keep_until + 1) {
            remove_segment_files(storage, &removed.paths);
        }
        match segments.get(keep_until) {
            Some(target) if target.base_offset < offset => {
                rewrite_prefix(storage, &dir, target, offset)?;
            }
            Some(target) => {
                // Every record goes: start over with an empty segment at `offset`.
                remove_segment_files(storage, &target.paths);
                recovery::create_segment_files(storage, &dir, offset)?;
            }
            None => {
                recovery::create_segment_files(storage, &dir, offset)?;
            }
        }
        recovery::sync_dir(storage, &dir)?;
        self.reopen(shared, "truncation")
    }

    /// Replaces every segment with what `fill` writes into the partition's directory,
    /// emptied first, and takes appends again after the new last record (a failure of the
    /// old files is forgotten with them). Readers holding the old segments keep reading
    /// their bytes.
    pub fn replace(
        &mut self,
        shared: &Shared,
        fill: impl FnOnce(&std::path::Path) -> std::io::Result<()>,
    ) -> Result<(), LogError> {
        // A closed log's directory may be gone with its queue: never made again.
        if self.closed {
            return Err(LogError::Closed);
        }
        let storage = &*shared.config.storage;
        let dir = shared.dir.clone();
        let _guard = shared.list_lock.lock();
        for old in shared.segments.load_full().iter() {
            old.pin()?;
        }
        match storage.remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&dir)(e)),
            _ => {}
        }
        storage.create_dir_all(&dir).map_err(io(&dir))?;
        fill(&dir).map_err(io(&dir))?;
        recovery::sync_dir(storage, &dir)?;
        self.failed = None;
        self.reopen(shared, "replacement")
    }

    /// Opens the partition's directory again after the segment files changed under the
    /// list lock (`after` names the change, for the error of a directory left without a
    /// segment).
    fn reopen(&mut self, shared: &Shared, after: &str) -> Result<(), LogError> {
        let dir = &shared.dir;
        let (list, state) = recovery::open_segments(dir, &shared.config)?;
        let active = list.last().cloned().ok_or_else(|| LogError::Corrupt {
            path: dir.clone(),
            position: 0,
            reason: format!("no segment after {after}"),
        })?;
        shared.segments.store(Arc::new(list));
        self.index_file = open_index(&shared.config.storage, &active.paths.index, state.indexes);
        self.time_file = open_index(
            &shared.config.storage,
            &active.paths.time_index,
            state.indexes,
        );
        self.file = state.file;
        self.extent = state.extent;
        self.builder = state.builder;
        self.active = active;
        self.dirty = false;
        publish(shared, &self.active, self.extent);
        shared.commit.reset_synced(self.extent.next_offset);
        Ok(())
    }
}

fn remove_segment_files(storage: &dyn Storage, paths: &SegmentPaths) {
    for path in [&paths.index, &paths.time_index, &paths.log] {
        if let Err(error) = storage.remove(path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), %error, "could not remove segment file");
        }
    }
}

/// Rewrites `segment` keeping only offsets below `offset` (new file, fsync, rename), and
/// removes its indexes so that opening rebuilds them.
fn rewrite_prefix(
    storage: &dyn Storage,
    dir: &std::path::Path,
    segment: &Segment,
    offset: u64,
) -> Result<(), LogError> {
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
                header.stamp(),
                last_delta,
                &slots,
                header.compression,
            );
        } else {
            break;
        }
        position += u64::from(header.batch_len);
    }
    // Indexes go first: a crash from here on leaves the segment without indexes (rebuilt on
    // open), never with indexes of the longer version.
    for path in [&segment.paths.index, &segment.paths.time_index] {
        let _ = storage.remove(path);
    }
    crate::storage::atomic_replace(storage, &segment.paths.log, &out, false).map_err(|e| {
        LogError::Io {
            path: e.path,
            source: e.source,
        }
    })?;
    recovery::sync_dir(storage, dir)
}
