//! The single writer of a partition: a dedicated thread that owns the active segment.
//!
//! Appenders send commands over a channel. The writer drains every pending command, encodes
//! each append as one batch into one buffer, writes it with one `write`, and under
//! `fsync = always` syncs once for all of them (group commit) before answering. Records
//! become visible to readers (the segment's length and the partition's next offset are
//! published) only after that, so a reader never sees a record an appender was not told
//! about, and under `always` never one that is not durable.

use std::fs::{self, File};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use tokio::sync::oneshot;

use super::index::{OffsetEntry, TimeEntry};
use super::record::{self, Slot};
use super::recovery::{self, ActiveState};
use super::segment::{self, Extent, IndexBuilder, Segment, SegmentPaths};
use super::{FsyncPolicy, LogError, Record, Shared};

/// Most commands handled in one group commit.
const MAX_DRAIN: usize = 4096;

/// A request to the writer.
pub enum Command {
    /// Append one batch; answers its first offset.
    Append {
        /// The records.
        records: Vec<Record>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<u64, LogError>>,
    },
    /// Write and fsync everything so far.
    Flush {
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    /// Drop every record at or past `offset`.
    Truncate {
        /// First offset to remove.
        offset: u64,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}

/// State of the writer thread.
pub struct Writer {
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    active: Arc<Segment>,
    file: File,
    index_file: File,
    time_file: File,
    /// What readers can see of the active segment.
    extent: Extent,
    builder: IndexBuilder,
    /// Encoded batches not yet written.
    buf: Vec<u8>,
    staged_next_offset: u64,
    staged_offsets: Vec<OffsetEntry>,
    staged_times: Vec<TimeEntry>,
    /// Appends written since the last fsync.
    dirty: bool,
    last_sync: Instant,
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
    pub fn new(
        shared: Arc<Shared>,
        rx: Receiver<Command>,
        active: Arc<Segment>,
        state: ActiveState,
    ) -> Result<Self, LogError> {
        let index_file = open_append(&active.paths.index)?;
        let time_file = open_append(&active.paths.time_index)?;
        Ok(Self {
            shared,
            rx,
            staged_next_offset: state.extent.next_offset,
            extent: state.extent,
            file: state.file,
            builder: state.builder,
            active,
            index_file,
            time_file,
            buf: Vec::with_capacity(1 << 20),
            staged_offsets: Vec::new(),
            staged_times: Vec::new(),
            dirty: false,
            last_sync: Instant::now(),
        })
    }

    /// Runs until every sender is gone, then syncs.
    pub fn run(mut self) {
        while let Some(first) = self.next_command() {
            let mut commands = vec![first];
            while commands.len() < MAX_DRAIN {
                match self.rx.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }
            self.process(commands);
        }
        if let Err(error) = self.sync() {
            tracing::error!(%error, "final fsync of the partition log failed");
        }
    }

    /// Waits for a command, syncing on time under `fsync = interval`.
    fn next_command(&mut self) -> Option<Command> {
        loop {
            if !(self.dirty && self.shared.config.fsync == FsyncPolicy::Interval) {
                return self.rx.recv().ok();
            }
            let due = self.last_sync + self.shared.config.fsync_interval;
            let wait = due.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(command) => return Some(command),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(error) = self.sync() {
                        tracing::error!(%error, "background fsync failed");
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn process(&mut self, commands: Vec<Command>) {
        let mut waiting = Vec::new();
        for command in commands {
            match command {
                Command::Append { records, reply } => match self.stage(&records) {
                    Ok(first) => waiting.push((reply, first)),
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                },
                Command::Flush { reply } => {
                    self.commit(&mut waiting);
                    let _ = reply.send(self.sync());
                }
                Command::Truncate { offset, reply } => {
                    self.commit(&mut waiting);
                    let _ = reply.send(self.truncate(offset));
                }
            }
        }
        self.commit(&mut waiting);
    }

    /// Encodes one append into the buffer; rolls first when the segment is full.
    fn stage(&mut self, records: &[Record]) -> Result<u64, LogError> {
        if records.is_empty() {
            return Ok(self.staged_next_offset);
        }
        let size = self.extent.len + self.buf.len() as u64;
        if size >= self.shared.config.segment_bytes {
            self.write_staged()?;
            self.roll()?;
        }
        let position = self.extent.len + self.buf.len() as u64;
        let start = self.buf.len();
        let base = self.staged_next_offset;
        record::encode_batch(
            &mut self.buf,
            base,
            0,
            records,
            self.shared.config.compression,
        );
        let header = self
            .buf
            .get(start..)
            .and_then(record::peek_header)
            .ok_or_else(|| LogError::Corrupt {
                path: self.active.paths.log.clone(),
                position,
                reason: "encoder produced no header".into(),
            })?;
        let (offset_entry, time_entry) =
            self.builder
                .observe(self.active.base_offset, &header, position);
        self.staged_offsets.extend(offset_entry);
        self.staged_times.extend(time_entry);
        self.staged_next_offset = header.next_offset();
        Ok(base)
    }

    /// Writes staged batches and index entries to the files (no fsync, no publish).
    fn write_staged(&mut self) -> Result<(), LogError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Err(error) = self.file.write_all(&self.buf) {
            // Cut whatever part of the buffer made it, so the file ends on a whole batch.
            let _ = self.file.set_len(self.extent.len);
            self.discard_staged();
            return Err(io(&self.active.paths.log)(error));
        }
        let mut index_bytes = Vec::new();
        self.staged_offsets
            .iter()
            .for_each(|e| e.encode(&mut index_bytes));
        let mut time_bytes = Vec::new();
        self.staged_times
            .iter()
            .for_each(|e| e.encode(&mut time_bytes));
        // Index files are hints: a failure here is repaired by recovery, not fatal.
        let _ = self.index_file.write_all(&index_bytes);
        let _ = self.time_file.write_all(&time_bytes);
        self.active
            .push_index(&self.staged_offsets, &self.staged_times);
        self.extent = Extent {
            len: self.extent.len + self.buf.len() as u64,
            next_offset: self.staged_next_offset,
            max_timestamp_ms: self.builder.max_timestamp_ms(),
        };
        self.buf.clear();
        self.staged_offsets.clear();
        self.staged_times.clear();
        self.dirty = true;
        Ok(())
    }

    fn discard_staged(&mut self) {
        self.buf.clear();
        self.staged_offsets.clear();
        self.staged_times.clear();
        self.staged_next_offset = self.extent.next_offset;
    }

    /// Writes, syncs when the policy says so, publishes, then answers the appenders.
    fn commit(&mut self, waiting: &mut Vec<(oneshot::Sender<Result<u64, LogError>>, u64)>) {
        let mut result = self.write_staged();
        if result.is_ok() && self.shared.config.fsync == FsyncPolicy::Always {
            result = self.sync();
        }
        if result.is_ok() {
            self.publish();
        }
        for (reply, first) in waiting.drain(..) {
            let answer = match &result {
                Ok(()) => Ok(first),
                Err(error) => Err(clone_error(error)),
            };
            let _ = reply.send(answer);
        }
    }

    /// Makes everything written so far visible to readers.
    fn publish(&self) {
        self.active.publish(self.extent);
        self.shared
            .next_offset
            .store(self.extent.next_offset, Ordering::Release);
        self.shared.watch.send_replace(self.extent.next_offset);
    }

    /// fsyncs the active segment if anything was written since the last sync.
    fn sync(&mut self) -> Result<(), LogError> {
        if !self.dirty {
            return Ok(());
        }
        let started = Instant::now();
        self.file.sync_data().map_err(io(&self.active.paths.log))?;
        metrics::histogram!(crate::metrics::FSYNC_LATENCY).record(started.elapsed().as_secs_f64());
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Seals the active segment and starts a new one at the next offset.
    fn roll(&mut self) -> Result<(), LogError> {
        self.sync()?;
        self.publish();
        let _ = self.index_file.sync_data();
        let _ = self.time_file.sync_data();
        let dir = self.shared.dir.clone();
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
        let (file, paths) = recovery::create_segment_files(&dir, base)?;
        let reader = File::open(&paths.log).map_err(io(&paths.log))?;
        let extent = Extent {
            len: 0,
            next_offset: base,
            max_timestamp_ms: None,
        };
        let active = Arc::new(Segment::active(base, paths, reader, &[], &[], extent));
        {
            let _guard = self.shared.list_lock.lock();
            let mut list: Vec<Arc<Segment>> = self.shared.segments.load().as_ref().clone();
            if let Some(last) = list.last_mut() {
                *last = sealed;
            }
            list.push(Arc::clone(&active));
            self.shared.segments.store(Arc::new(list));
        }
        self.index_file = open_append(&active.paths.index)?;
        self.time_file = open_append(&active.paths.time_index)?;
        self.file = file;
        self.active = active;
        self.extent = extent;
        self.builder = IndexBuilder::new(self.shared.config.index_interval_bytes, None, true);
        Ok(())
    }

    /// Removes every record at or past `offset`, rewriting the segment that holds it.
    fn truncate(&mut self, offset: u64) -> Result<(), LogError> {
        if offset >= self.extent.next_offset {
            return Ok(());
        }
        self.sync()?;
        let _guard = self.shared.list_lock.lock();
        let segments = self.shared.segments.load_full();
        let dir = self.shared.dir.clone();
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
        let (list, state) = recovery::open_segments(&dir, &self.shared.config)?;
        let active = list.last().cloned().ok_or_else(|| LogError::Corrupt {
            path: dir.clone(),
            position: 0,
            reason: "no segment after truncation".into(),
        })?;
        self.shared.segments.store(Arc::new(list));
        self.index_file = open_append(&active.paths.index)?;
        self.time_file = open_append(&active.paths.time_index)?;
        self.file = state.file;
        self.extent = state.extent;
        self.builder = state.builder;
        self.staged_next_offset = state.extent.next_offset;
        self.active = active;
        self.dirty = false;
        self.publish();
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

/// `LogError` holds an `io::Error`, which is not `Clone`; rebuild an equivalent.
fn clone_error(error: &LogError) -> LogError {
    match error {
        LogError::Io { path, source } => LogError::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        LogError::Corrupt {
            path,
            position,
            reason,
        } => LogError::Corrupt {
            path: path.clone(),
            position: *position,
            reason: reason.clone(),
        },
        LogError::Closed => LogError::Closed,
    }
}
