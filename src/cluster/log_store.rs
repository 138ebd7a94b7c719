//! The Raft log of one group on disk ([`RaftLogStorage`]): a sequence of chunk files of
//! checksummed records, and small files for the vote, the committed id and the purge point.
//!
//! ```text
//! log.{seq:010}:  record*     record = len u32 LE | crc32(payload) u32 LE | payload (an encoded Entry)
//! vote, committed, purged:     crc32(payload) u32 LE | payload (encoded), replaced by rename
//! ```
//! Entries are appended to the last chunk; a new chunk starts once the last one holds
//! [`CHUNK_BYTES`] or the configured number of entries. A purge records the purge point,
//! then deletes every chunk whose entries all lie at or below it, so disk use follows the
//! log openraft keeps (the snapshot policy decides how long that is, see `groups.rs`).
//!
//! Opening scans the chunks in order; a torn or corrupt record (a crash mid-append) ends the
//! log there: its chunk is cut and any later chunk is removed, which Raft allows for entries
//! this node never acknowledged. Truncation cuts the chunk holding the first removed entry
//! and removes the chunks after it. A log of the first layout (one file `log`) is taken over
//! as the first chunk.
//!
//! Appends are written at once and, with `--fsync always`, synced before openraft is told
//! they are durable: `append` returns once the entries are written (readable), and a
//! [`Flusher`] task syncs them in order, several appends with one sync when they queue up,
//! and then calls openraft back. openraft replicates entries it submitted, so a leader
//! sends an entry to its followers while its own sync of it is under way. With
//! `interval`/`never` appends are acknowledged from the page cache, as a single node's
//! publishes are.
//!
//! A synced log keeps zeros ahead of its appends: when an append would reach past the
//! zeroed part of its chunk, [`ZERO_STEP`] bytes of zeros are written beyond it first. An
//! append then overwrites allocated blocks inside the file instead of growing it, and its
//! `sync_data` flushes only the data, not the file's size and block map as well: on this
//! project's test machine (ext4 on a virtual disk) that halves a sync's time and CPU. A
//! zero header (length 0) is where the records end, so opening keeps a zero tail and cuts
//! only a tail that is not all zeros.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use super::recent_entries::RecentEntries;
use super::types::{Entry, EntryPayload, LogId, Membership, TypeConfig, Vote, decode, encode};

/// Bytes of a record header: length and CRC.
const HEADER: usize = 8;
/// A chunk takes no more appends once it holds this many bytes.
pub const CHUNK_BYTES: u64 = 8 * 1024 * 1024;
/// Entries per chunk unless configured otherwise.
pub const DEFAULT_CHUNK_ENTRIES: usize = 4096;
/// Prefix of chunk file names (`log.{seq:010}`).
const CHUNK_PREFIX: &str = "log.";
/// Zeros written ahead of a synced log's appends at a time (see the module doc).
pub const ZERO_STEP: u64 = 1024 * 1024;

/// Where an entry lies.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// The chunk's sequence number.
    chunk: u64,
    /// Offset of the record header in the chunk.
    pos: u64,
    /// Payload length.
    len: u32,
}

/// One chunk file.
struct Chunk {
    /// Shared with an append's fsync, which runs without the log's lock.
    file: Arc<File>,
    path: PathBuf,
    /// Length of its valid records.
    end: u64,
    /// Length of the file: the bytes from `end` to here are zeros.
    zeroed: u64,
    /// Entries it holds (purged ones included).
    entries: usize,
    /// Index of its last entry.
    last_index: Option<u64>,
}

struct Inner {
    dir: PathBuf,
    chunks: BTreeMap<u64, Chunk>,
    slots: BTreeMap<u64, Slot>,
    last_log_id: Option<LogId>,
    purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    /// The `committed` file, rewritten in place at every commit.
    committed_file: InPlaceFile,
    sync: bool,
    chunk_entries: usize,
    /// A chunk takes no more appends once it holds this many bytes.
    chunk_bytes: u64,
    /// Sequence number of the next chunk created.
    next_seq: u64,
    /// The marker that this node held the group's log, still to write before the first
    /// vote or entry (see [`LogStore::mark_held`]).
    held_marker: Option<PathBuf>,
    /// The last entries written, read back without the disk.
    recent: RecentEntries,
    /// Rung after an append that leaves the chunk files above this many bytes (see
    /// [`LogStore::size_alarm`]).
    alarm: Option<(u64, Arc<Notify>)>,
}

/// One group's Raft log (cheap to clone: clones share the files).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    /// The last log id, also readable while an append holds `inner` (see [`Self::tip`]).
    tip: Arc<Mutex<Option<LogId>>>,
    /// Syncs appends in order (started by the first append that needs it).
    flusher: Arc<Mutex<Option<Flusher>>>,
}

/// An append waiting for its sync: the chunk it was written to and openraft's callback.
struct Flush {
    file: Arc<File>,
    done: IOFlushed<TypeConfig>,
}

/// The task that syncs appends in the order they were written and only then tells
/// openraft they are durable. Appends that queue while a sync runs share the next one
/// (one `sync_data` per chunk they touched), so a busy group pays one sync per batch.
#[derive(Clone)]
struct Flusher {
    tx: mpsc::UnboundedSender<Flush>,
}

impl Flusher {
    /// Starts the task; it ends when every clone of the log (and so the sender) is gone.
    fn start() -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Flush>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let mut files: Vec<Arc<File>> = Vec::new();
                for flush in &batch {
                    if !files.iter().any(|f| Arc::ptr_eq(f, &flush.file)) {
                        files.push(Arc::clone(&flush.file));
                    }
                }
                // openraft hears of the sync from the thread that made it, without a
                // hop back to this task first; the next batch waits for it to end.
                let _ = tokio::task::spawn_blocking(move || {
                    let synced = files.iter().try_for_each(|file| file.sync_data());
                    for flush in batch {
                        let result = match &synced {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                        };
                        flush.done.io_completed(result);
                    }
                })
                .await;
            }
        });
        Self { tx }
    }
}

/// `error` with what was being done when it happened.
pub(super) fn io_err(context: impl std::fmt::Display, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("raft log: {context}: {e}"))
}

/// Writes the empty marker file `marker` unless it exists (synced, with its directory,
/// when `durable`).
pub(super) fn write_marker(marker: &Path, durable: bool) -> std::io::Result<()> {
    if !marker.exists() {
        let file = File::create(marker)?;
        if durable {
            file.sync_all()?;
            if let Some(parent) = marker.parent() {
                sync_dir(parent)?;
            }
        }
    }
    Ok(())
}

pub(super) fn write_small<T: Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
    sync: bool,
) -> std::io::Result<()> {
    let payload = encode(value).map_err(std::io::Error::other)?;
    let mut bytes = crc32fast::hash(&payload).to_le_bytes().to_vec();
    bytes.extend_from_slice(&payload);
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        if sync {
            file.sync_data()?;
        }
    }
    std::fs::rename(&tmp, dir.join(name))?;
    if sync {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A small file saved often and cheaply (a log's committed id, at every commit): written
/// in place, one `pwrite` of `crc32 | payload` (no new file, no rename: a partition
/// group that created and renamed a file per commit spent much of its CPU in the file
/// system allocating inodes, and a queue of three partitions published at about half
/// the rate) and not synced. A torn write fails its CRC and reads as nothing (a lost
/// committed id is learnt again from the leader).
pub(super) struct InPlaceFile {
    path: PathBuf,
    /// The open file and its length.
    open: Option<(File, u64)>,
}

impl InPlaceFile {
    /// The file at `path` (opened at the first write).
    pub(super) fn new(path: PathBuf) -> Self {
        Self { path, open: None }
    }

    /// Writes `value` over what the file held.
    pub(super) fn write<T: Serialize>(&mut self, value: &T) -> std::io::Result<()> {
        let payload = encode(value).map_err(std::io::Error::other)?;
        let mut bytes = crc32fast::hash(&payload).to_le_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        let (file, len) = match &mut self.open {
            Some(open) => open,
            None => self.open.insert((open_rw(&self.path)?, u64::MAX)),
        };
        file.write_all_at(&bytes, 0)?;
        let written = bytes.len() as u64;
        if *len != written {
            file.set_len(written)?;
            *len = written;
        }
        Ok(())
    }

    /// What the file holds, if anything: a torn or corrupt one (a crash mid-write) counts
    /// as nothing, and is logged.
    pub(super) fn read<T: for<'de> Deserialize<'de>>(&self) -> Option<T> {
        match read_small_at(&self.path) {
            Ok(value) => value,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "raft log: ignoring a saved value");
                None
            }
        }
    }

    /// Removes the file.
    pub(super) fn remove(&mut self) -> std::io::Result<()> {
        self.open = None;
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

pub(super) fn read_small<T: for<'de> Deserialize<'de>>(
    dir: &Path,
    name: &str,
) -> std::io::Result<Option<T>> {
    read_small_at(&dir.join(name))
}

/// [`read_small`] of the file at `path`.
fn read_small_at<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => file.read_to_end(&mut bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let corrupt =
        || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{name}: corrupt"));
    let (crc, payload) = bytes.split_at_checked(4).ok_or_else(corrupt)?;
    let crc = u32::from_le_bytes(crc.try_into().map_err(|_| corrupt())?);
    if crc32fast::hash(payload) != crc {
        return Err(corrupt());
    }
    decode(payload).map(Some).map_err(|_| corrupt())
}

/// Scans a chunk: the valid records (log id, position, payload length) and where they end.
fn scan(bytes: &[u8]) -> (Vec<(LogId, u64, u32)>, u64) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while let Some(header) = bytes.get(pos..pos + HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 {
            // Zeros ahead of the appends (no entry encodes to nothing): the end.
            break;
        }
        let Some(payload) = bytes.get(pos + HEADER..pos + HEADER + len as usize) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(entry) = decode::<Entry>(payload) else {
            break;
        };
        out.push((entry.log_id, pos as u64, len));
        pos += HEADER + len as usize;
    }
    (out, pos as u64)
}

/// The chunk files in `dir`, by sequence number.
fn chunk_files(dir: &Path) -> std::io::Result<BTreeMap<u64, PathBuf>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(CHUNK_PREFIX))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(seq) = seq {
            found.insert(seq, path);
        }
    }
    Ok(found)
}

fn chunk_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{CHUNK_PREFIX}{seq:010}"))
}

fn open_rw(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
}

/// Syncs directory `dir` (its entries: a file made, renamed or removed in it).
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What opening found in one chunk.
struct Scanned {
    chunk: Chunk,
    /// The log ended inside this chunk (later chunks are not part of it).
    ended: bool,
}

impl Inner {
    /// True when the log holds nothing a voter must remember: no vote, no entry, no purge
    /// point.
    fn is_blank(&self) -> bool {
        self.vote.is_none() && self.last_log_id.is_none() && self.purged.is_none()
    }

    fn disk_bytes(&self) -> u64 {
        self.chunks.values().map(|c| c.end).sum()
    }

    /// Writes the held marker, if one is still to write, before the log first holds state.
    /// `durable`: synced (and its directory) before the state it guards is written; a log
    /// that holds state already needs no sync (its files are there: a crash before the
    /// marker reaches the disk leaves it to write again at the next start), which keeps the
    /// first start after an upgrade from syncing once per group.
    fn write_held_marker(&mut self, durable: bool) -> std::io::Result<()> {
        let Some(marker) = self.held_marker.take() else {
            return Ok(());
        };
        if let Err(error) = write_marker(&marker, durable) {
            self.held_marker = Some(marker);
            return Err(io_err("writing the held marker", error));
        }
        Ok(())
    }

    /// Saves the committed id at every commit, cheaply: written in place (one `pwrite` of a
    /// fixed-size record, no new file, no rename) and not synced. A torn write fails its
    /// CRC and reads as no committed id (see [`InPlaceFile::read`]).
    fn write_committed(&mut self, committed: Option<LogId>) -> std::io::Result<()> {
        match committed {
            Some(id) => self.committed_file.write(&id),
            None => self.committed_file.remove(),
        }
    }

    /// Scans one chunk into `slots`, keeping entries above the purge point; cuts a torn or
    /// out-of-order tail.
    fn scan_chunk(&mut self, seq: u64, path: PathBuf) -> std::io::Result<Scanned> {
        let file = open_rw(&path)?;
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes)?;
        let (records, mut end) = scan(&bytes);
        let (mut entries, mut last_index, mut ended) = (0, None, false);
        for (log_id, pos, len) in records {
            let kept = self.purged.is_none_or(|p| log_id.index > p.index);
            let follows = self
                .slots
                .keys()
                .next_back()
                .is_none_or(|last| log_id.index == last + 1);
            if kept && !follows {
                end = pos;
                break;
            }
            entries += 1;
            last_index = Some(log_id.index);
            if kept {
                self.slots.insert(
                    log_id.index,
                    Slot {
                        chunk: seq,
                        pos,
                        len,
                    },
                );
                self.last_log_id = Some(log_id);
            }
        }
        let mut zeroed = bytes.len() as u64;
        let tail = bytes.get(end as usize..).unwrap_or_default();
        if tail.iter().any(|b| *b != 0) {
            tracing::warn!(path = %path.display(), valid = end, len = bytes.len(), "raft log: cutting a torn tail");
            file.set_len(end)?;
            file.sync_all()?;
            ended = true;
            zeroed = end;
        }
        Ok(Scanned {
            chunk: Chunk {
                file: Arc::new(file),
                path,
                end,
                zeroed,
                entries,
                last_index,
            },
            ended,
        })
    }

    /// Deletes the chunks whose entries all lie at or below the purge point (and empty
    /// chunks other than the last).
    fn drop_purged_chunks(&mut self) -> std::io::Result<()> {
        let last_seq = self.chunks.keys().next_back().copied();
        let purged = self.purged.map(|p| p.index);
        let gone: Vec<u64> = self
            .chunks
            .iter()
            .filter(|(seq, c)| match c.last_index {
                Some(last) => purged.is_some_and(|p| last <= p),
                None => Some(**seq) != last_seq,
            })
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &gone {
            if let Some(chunk) = self.chunks.remove(seq) {
                std::fs::remove_file(&chunk.path)?;
            }
        }
        if !gone.is_empty() && self.sync {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The chunk appends go to: the last one, or a new one once it is full.
    fn writable_chunk(&mut self) -> std::io::Result<u64> {
        if let Some((seq, chunk)) = self.chunks.iter().next_back()
            && chunk.end < self.chunk_bytes
            && chunk.entries < self.chunk_entries
        {
            return Ok(*seq);
        }
        let seq = self
            .chunks
            .keys()
            .next_back()
            .map_or(self.next_seq, |s| (s + 1).max(self.next_seq));
        self.next_seq = seq + 1;
        let path = chunk_path(&self.dir, seq);
        let file = open_rw(&path)?;
        file.set_len(0)?;
        if self.sync {
            sync_dir(&self.dir)?;
        }
        self.chunks.insert(
            seq,
            Chunk {
                file: Arc::new(file),
                path,
                end: 0,
                zeroed: 0,
                entries: 0,
                last_index: None,
            },
        );
        Ok(seq)
    }
}

impl LogStore {
    /// Opens (or creates) the log in `dir` with [`DEFAULT_CHUNK_ENTRIES`]; `sync` makes
    /// every append durable before it is acknowledged.
    pub fn open(dir: &Path, sync: bool) -> std::io::Result<Self> {
        Self::open_chunked(dir, sync, DEFAULT_CHUNK_ENTRIES)
    }

    /// [`Self::open`], starting a new chunk every `chunk_entries` entries (or
    /// [`CHUNK_BYTES`]): a purge frees whole chunks, so this bounds what a purge leaves.
    pub fn open_chunked(dir: &Path, sync: bool, chunk_entries: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let legacy = dir.join("log");
        if legacy.is_file() {
            std::fs::rename(&legacy, chunk_path(dir, 0))?;
            sync_dir(dir)?;
        }
        let purged: Option<LogId> = read_small(dir, "purged")?;
        let committed_file = InPlaceFile::new(dir.join("committed"));
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            chunks: BTreeMap::new(),
            slots: BTreeMap::new(),
            last_log_id: purged,
            purged,
            vote: read_small(dir, "vote")?,
            committed: committed_file.read(),
            committed_file,
            sync,
            chunk_entries: chunk_entries.max(1),
            chunk_bytes: CHUNK_BYTES,
            next_seq: 0,
            held_marker: None,
            recent: RecentEntries::default(),
            alarm: None,
        };
        let mut ended = false;
        for (seq, path) in chunk_files(dir)? {
            inner.next_seq = seq + 1;
            if ended {
                tracing::warn!(path = %path.display(), "raft log: removing a chunk after the end of the log");
                std::fs::remove_file(&path)?;
                continue;
            }
            let scanned = inner.scan_chunk(seq, path)?;
            ended = scanned.ended;
            inner.chunks.insert(seq, scanned.chunk);
        }
        inner.drop_purged_chunks()?;
        Ok(Self {
            tip: Arc::new(Mutex::new(inner.last_log_id)),
            inner: Arc::new(Mutex::new(inner)),
            flusher: Arc::default(),
        })
    }

    /// True when the log holds nothing a voter must remember (no vote, no entry, no purge
    /// point): a new replica's, or one whose files were lost.
    pub fn is_blank(&self) -> bool {
        self.inner.lock().is_blank()
    }

    /// Makes `marker` (a file outside the log's directory) the lasting sign that this node
    /// held the log: written now when the log holds state, else before its first vote or
    /// entry is written. A blank log next to its marker is a log that was lost (see
    /// `Groups::open_group`).
    pub fn mark_held(&self, marker: PathBuf) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        inner.held_marker = Some(marker);
        if inner.is_blank() {
            return Ok(());
        }
        inner.write_held_marker(false)
    }

    /// The id of the last entry written (or the purge point of an empty log), without
    /// waiting for an append under way: what this replica's vote requests carry.
    pub fn tip(&self) -> Option<LogId> {
        *self.tip.lock()
    }

    fn set_tip(&self, inner: &Inner) {
        *self.tip.lock() = inner.last_log_id;
    }

    /// Writes `membership` as the first entry of an empty log, as if `leader` had written
    /// it with openraft's `initialize` (log id 0 of term 0 and `leader`) and sent it here,
    /// and syncs it when this log syncs; returns whether it wrote it (not when the log
    /// holds entries or a purge point).
    ///
    /// Every replica of a new group does this with the same membership and `leader` before
    /// the group starts, so each one can stand for election. With `initialize` on one
    /// replica only, a replica that voted for it before receiving the entry could neither
    /// be elected nor initialize (openraft refuses once a vote is cast): if that candidate
    /// then died, the group stayed without a leader for good. The entry is the one each
    /// replica would have received from `leader`, so the replicas' logs agree as they
    /// would have then.
    pub fn seed(&self, leader: u64, membership: Membership) -> std::io::Result<bool> {
        let mut inner = self.inner.lock();
        if inner.last_log_id.is_some() {
            return Ok(false);
        }
        let entry = Entry {
            log_id: super::types::log_id(0, leader, 0),
            payload: EntryPayload::Membership(membership),
        };
        let written = Self::append_locked(&mut inner, [entry]);
        self.set_tip(&inner);
        if let Some(file) = written? {
            file.sync_data()
                .map_err(|e| io_err("syncing the initial membership", e))?;
        }
        Ok(true)
    }

    /// Bytes of the log's records in its chunk files, zeros ahead not counted (purged
    /// records still in a chunk that holds later ones are counted: they are on disk).
    pub fn disk_bytes(&self) -> u64 {
        self.inner.lock().disk_bytes()
    }

    /// Chunks started from now on take no more appends once they hold `bytes` (at least
    /// one entry each; [`CHUNK_BYTES`] unless set): a purge frees whole chunks.
    pub fn set_chunk_bytes(&self, bytes: u64) {
        self.inner.lock().chunk_bytes = bytes.max(1);
    }

    /// A signal given (as one stored permit, however many appends ring it) after every
    /// append that leaves the log's chunk files holding more than `bytes`; replaces an
    /// earlier alarm.
    pub fn size_alarm(&self, bytes: u64) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.inner.lock().alarm = Some((bytes, Arc::clone(&notify)));
        notify
    }

    /// Bytes of the records of the entries above `index` (of all of them for `None`).
    pub fn bytes_above(&self, index: Option<u64>) -> u64 {
        let inner = self.inner.lock();
        let from = index.map_or(0, |i| i.saturating_add(1));
        inner
            .slots
            .range(from..)
            .map(|(_, slot)| HEADER as u64 + u64::from(slot.len))
            .sum()
    }

    /// The index to purge up to (inclusive) so that, of the entries at or below `top`, the
    /// log keeps the last ones, at most `keep_entries` of them and at most `keep_bytes` of
    /// their records; `None` when that purges nothing.
    pub fn purge_point(&self, top: u64, keep_entries: u64, keep_bytes: u64) -> Option<u64> {
        let inner = self.inner.lock();
        let mut entries = 0;
        let mut bytes = 0;
        for (index, slot) in inner.slots.range(..=top).rev() {
            entries += 1;
            bytes += HEADER as u64 + u64::from(slot.len);
            if entries > keep_entries || bytes > keep_bytes {
                return Some(*index);
            }
        }
        None
    }

    fn read_entry(inner: &Inner, index: u64, slot: Slot) -> std::io::Result<Entry> {
        if let Some(entry) = inner.recent.get(index) {
            return Ok(entry);
        }
        let subject = format!("reading entry {index}");
        let Some(chunk) = inner.chunks.get(&slot.chunk) else {
            return Err(io_err(subject, format!("chunk {} is gone", slot.chunk)));
        };
        let mut buf = vec![0u8; slot.len as usize];
        chunk
            .file
            .read_exact_at(&mut buf, slot.pos + HEADER as u64)
            .map_err(|e| io_err(&subject, e))?;
        decode(&buf).map_err(|e| io_err(&subject, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> std::io::Result<Vec<Entry>> {
        let inner = self.inner.lock();
        let mut entries = Vec::new();
        for (index, slot) in inner.slots.range(range) {
            entries.push(Self::read_entry(&inner, *index, *slot)?);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> std::io::Result<Option<Vote>> {
        Ok(self.inner.lock().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> std::io::Result<LogState<TypeConfig>> {
        let inner = self.inner.lock();
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: inner.last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        inner.write_held_marker(true)?;
        write_small(&inner.dir, "vote", vote, true).map_err(|e| io_err("saving the vote", e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        inner
            .write_committed(committed)
            .map_err(|e| io_err("saving the committed id", e))?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> std::io::Result<Option<LogId>> {
        Ok(self.inner.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> std::io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let written = {
            let mut inner = self.inner.lock();
            let written = Self::append_locked(&mut inner, entries);
            self.set_tip(&inner);
            written
        };
        match written {
            Ok(Some(file)) => {
                // Synced by the flusher, in order, without holding up openraft's core.
                let flusher = self
                    .flusher
                    .lock()
                    .get_or_insert_with(Flusher::start)
                    .clone();
                if let Err(mpsc::error::SendError(flush)) = flusher.tx.send(Flush {
                    file,
                    done: callback,
                }) {
                    flush
                        .done
                        .io_completed(Err(std::io::Error::other("raft log: the flusher stopped")));
                }
                Ok(())
            }
            Ok(None) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(std::io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        let from = last.map_or(0, |l| l.index + 1);
        let removed = inner.slots.split_off(&from);
        inner.recent.truncate_from(from);
        let Some(first) = removed.values().next().copied() else {
            return Ok(());
        };
        let err = |e| io_err(format!("truncating after {last:?}"), e);
        let later: Vec<u64> = inner
            .chunks
            .range(first.chunk + 1..)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in later {
            if let Some(chunk) = inner.chunks.remove(&seq) {
                std::fs::remove_file(&chunk.path).map_err(err)?;
            }
        }
        let cut = removed.values().filter(|s| s.chunk == first.chunk).count();
        if let Some(chunk) = inner.chunks.get_mut(&first.chunk) {
            chunk
                .file
                .set_len(first.pos)
                .and_then(|()| chunk.file.sync_data())
                .map_err(err)?;
            chunk.end = first.pos;
            chunk.zeroed = first.pos;
            chunk.entries = chunk.entries.saturating_sub(cut);
            chunk.last_index = (chunk.entries > 0).then(|| from.checked_sub(1)).flatten();
        }
        let last = match inner.slots.iter().next_back() {
            Some((index, slot)) => Some(Self::read_entry(&inner, *index, *slot)?.log_id),
            None => inner.purged,
        };
        inner.last_log_id = last;
        self.set_tip(&inner);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        let err = |e| io_err(format!("purging up to {log_id}"), e);
        write_small(&inner.dir, "purged", &log_id, true).map_err(err)?;
        inner.purged = Some(log_id);
        let kept = inner.slots.split_off(&(log_id.index + 1));
        inner.slots = kept;
        inner.recent.purge_upto(log_id.index);
        if inner
            .last_log_id
            .is_none_or(|last| last.index < log_id.index)
        {
            inner.last_log_id = Some(log_id);
        }
        self.set_tip(&inner);
        inner.drop_purged_chunks().map_err(err)
    }
}

impl LogStore {
    /// Writes `entries` at the end of the log; the chunk to sync before they count as
    /// durable (`None` when this log does not sync).
    fn append_locked<I>(inner: &mut Inner, entries: I) -> std::io::Result<Option<Arc<File>>>
    where
        I: IntoIterator<Item = Entry>,
    {
        inner.write_held_marker(true)?;
        let seq = inner
            .writable_chunk()
            .map_err(|e| io_err("starting a chunk", e))?;
        let start = inner.chunks.get(&seq).map_or(0, |c| c.end);
        let mut bytes = Vec::new();
        let mut added = Vec::new();
        let mut written = Vec::new();
        let mut pos = start;
        for entry in entries {
            let subject = || format!("writing entry {}", entry.log_id);
            let payload = encode(&entry).map_err(|e| io_err(subject(), e))?;
            let len = u32::try_from(payload.len()).map_err(|e| io_err(subject(), e))?;
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            bytes.extend_from_slice(&payload);
            added.push((
                entry.log_id,
                Slot {
                    chunk: seq,
                    pos,
                    len,
                },
            ));
            pos += (HEADER + payload.len()) as u64;
            written.push((entry, payload.len()));
        }
        let (sync, chunk_bytes) = (inner.sync, inner.chunk_bytes);
        let Some(chunk) = inner.chunks.get_mut(&seq) else {
            return Err(io_err("appending", "the chunk being written vanished"));
        };
        if sync && pos > chunk.zeroed {
            // Zeros ahead first (see the module doc), from the end of this append on (no
            // further than a chunk's bytes at a time: small chunks stay small on disk).
            let step = ZERO_STEP.min(chunk_bytes);
            let to = (pos / step + 1) * step;
            let zeros = vec![0u8; usize::try_from(to - pos).unwrap_or(0)];
            chunk
                .file
                .write_all_at(&zeros, pos)
                .map_err(|e| io_err("zeroing ahead", e))?;
            chunk.zeroed = to;
        }
        chunk
            .file
            .write_all_at(&bytes, start)
            .map_err(|e| io_err("appending", e))?;
        let to_sync = sync.then(|| Arc::clone(&chunk.file));
        chunk.end = pos;
        chunk.entries += added.len();
        if let Some((last, _)) = added.last() {
            chunk.last_index = Some(last.index);
        }
        for (log_id, slot) in added {
            inner.slots.insert(log_id.index, slot);
            inner.last_log_id = Some(log_id);
        }
        for (entry, size) in written {
            inner.recent.push(entry, size);
        }
        if let Some((limit, alarm)) = &inner.alarm
            && inner.disk_bytes() > *limit
        {
            alarm.notify_one();
        }
        Ok(to_sync)
    }
}

#[cfg(test)]
mod tests {
    use super::super::types::{EntryPayload, log_id};
    use super::*;
    use proptest::prelude::*;

    /// A file written in place reads back as its last value, longer or shorter than the
    /// one before, under the same inode (no new file per write); removed, it reads as
    /// nothing; a torn value is an error, which the committed id's readers take for none.
    #[test]
    fn an_in_place_file_holds_its_last_value() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mut file = InPlaceFile::new(dir.path().join("small"));
        let values: [Option<LogId>; 4] = [
            Some(log_id(1, 2, 3)),
            None,
            Some(log_id(7, 1, u64::MAX)),
            Some(log_id(8, 1, 9)),
        ];
        let mut inode = None;
        for value in values {
            file.write(&value).unwrap();
            let read: Option<Option<LogId>> = read_small(dir.path(), "small").unwrap();
            assert_eq!(read, Some(value));
            let now = std::fs::metadata(dir.path().join("small")).unwrap().ino();
            assert_eq!(*inode.get_or_insert(now), now, "written in place");
        }
        file.remove().unwrap();
        let gone: Option<Option<LogId>> = read_small(dir.path(), "small").unwrap();
        assert_eq!(gone, None);
        file.write(&log_id(2, 2, 2)).unwrap();
        assert_eq!(file.read::<LogId>(), Some(log_id(2, 2, 2)));
        std::fs::write(dir.path().join("small"), [1, 2, 3, 4, 5, 6]).unwrap();
        assert!(read_small::<LogId>(dir.path(), "small").is_err(), "torn");
        assert_eq!(file.read::<LogId>(), None, "torn: none");
    }

    fn entry(index: u64, bytes: usize) -> Entry {
        let op = crate::broker::replicate::Op::DeleteQueue {
            name: "x".repeat(bytes.max(1)),
        };
        Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Normal(super::super::types::Command::Broker(op)),
        }
    }

    fn append(store: &LogStore, from: u64, to: u64) {
        let mut inner = store.inner.lock();
        for i in from..to {
            LogStore::append_locked(&mut inner, [entry(i, 100)]).unwrap();
        }
    }

    fn chunks(dir: &Path) -> usize {
        chunk_files(dir).unwrap().len()
    }

    async fn indexes(store: &mut LogStore) -> Vec<u64> {
        store
            .try_get_log_entries(0..u64::MAX)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    /// Bytes of one record of [`entry`]`(_, 100)`.
    fn record_bytes() -> u64 {
        HEADER as u64 + encode(&entry(1, 100)).unwrap().len() as u64
    }

    /// The alarm rings after an append that leaves the files above its bytes, and only
    /// then; however many appends ring it, one wait takes it.
    #[tokio::test]
    async fn the_size_alarm_rings_past_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), false).unwrap();
        let alarm = store.size_alarm(10 * record_bytes());
        append(&store, 1, 11);
        assert_eq!(store.disk_bytes(), 10 * record_bytes());
        let rang = || {
            let notified = alarm.notified();
            tokio::pin!(notified);
            notified.as_mut().enable()
        };
        assert!(!rang(), "ten records are not above ten records' bytes");
        append(&store, 11, 14);
        assert!(rang(), "the eleventh record rings it");
        assert!(!rang(), "one permit for three appends");
    }

    /// The purge point keeps at most so many entries and so many bytes at or below the
    /// top, and purges nothing when they all fit.
    #[test]
    fn the_purge_point_keeps_entries_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), false).unwrap();
        append(&store, 1, 101);
        let record = record_bytes();
        assert_eq!(store.purge_point(80, 1000, u64::MAX), None);
        assert_eq!(store.purge_point(80, 10, u64::MAX), Some(70));
        assert_eq!(store.purge_point(80, 1000, 5 * record), Some(75));
        assert_eq!(
            store.purge_point(80, 1000, 5 * record + record / 2),
            Some(75)
        );
        assert_eq!(store.purge_point(80, 3, 5 * record), Some(77));
        assert_eq!(store.purge_point(80, 0, 0), Some(80));
        assert_eq!(store.bytes_above(Some(80)), 20 * record);
        assert_eq!(store.bytes_above(None), 100 * record);
    }

    /// Chunks started after `set_chunk_bytes` end at that many bytes.
    #[test]
    fn chunk_bytes_bound_new_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), false).unwrap();
        store.set_chunk_bytes(4 * record_bytes());
        append(&store, 1, 21);
        assert_eq!(chunks(dir.path()), 5);
    }

    /// A purge deletes the chunks below the purge point (the disk shrinks) and a reopened
    /// log holds exactly the entries after it.
    #[tokio::test]
    async fn purging_deletes_whole_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open_chunked(dir.path(), false, 10).unwrap();
        append(&store, 1, 101);
        assert_eq!(chunks(dir.path()), 10);
        let before = store.disk_bytes();
        store.purge(entry(55, 0).log_id).await.unwrap();
        assert_eq!(chunks(dir.path()), 5, "chunks 1-50 go, 51-60 stays");
        assert!(store.disk_bytes() < before / 2 + before / 10);
        assert_eq!(indexes(&mut store).await, (56..101).collect::<Vec<_>>());
        drop(store);
        let mut store = LogStore::open_chunked(dir.path(), false, 10).unwrap();
        assert_eq!(indexes(&mut store).await, (56..101).collect::<Vec<_>>());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(55));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(100));
        // Purging past the end (an installed snapshot) empties the log; appends go on after.
        store.purge(entry(200, 0).log_id).await.unwrap();
        assert_eq!(chunks(dir.path()), 0);
        append(&store, 201, 205);
        drop(store);
        let mut store = LogStore::open_chunked(dir.path(), false, 10).unwrap();
        assert_eq!(indexes(&mut store).await, (201..205).collect::<Vec<_>>());
    }

    /// Truncation cuts the chunk holding the first removed entry and removes later ones.
    #[tokio::test]
    async fn truncation_spans_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open_chunked(dir.path(), false, 10).unwrap();
        append(&store, 1, 36);
        store
            .truncate_after(Some(entry(14, 0).log_id))
            .await
            .unwrap();
        assert_eq!(chunks(dir.path()), 2);
        assert_eq!(indexes(&mut store).await, (1..15).collect::<Vec<_>>());
        append(&store, 15, 18);
        drop(store);
        let mut store = LogStore::open_chunked(dir.path(), false, 10).unwrap();
        assert_eq!(indexes(&mut store).await, (1..18).collect::<Vec<_>>());
    }

    /// A torn record in a chunk ends the log there: later chunks are removed on open.
    #[tokio::test]
    async fn a_torn_chunk_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open_chunked(dir.path(), false, 10).unwrap();
        append(&store, 1, 31);
        drop(store);
        let second = chunk_path(dir.path(), 1);
        let len = std::fs::metadata(&second).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&second)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let mut store = LogStore::open_chunked(dir.path(), false, 10).unwrap();
        assert_eq!(indexes(&mut store).await, (1..20).collect::<Vec<_>>());
        assert_eq!(chunks(dir.path()), 2);
    }

    /// A synced log writes zeros ahead of its appends: the chunk file is longer than its
    /// records, opening keeps that zero tail (no entry lost, nothing cut), appends after
    /// reopening go on inside it, and a torn record followed by zeros is still cut.
    #[tokio::test]
    async fn zeros_ahead_are_kept_and_a_torn_record_in_them_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open_chunked(dir.path(), true, 1000).unwrap();
        append(&store, 1, 11);
        let records = store.disk_bytes();
        drop(store);
        let first = chunk_path(dir.path(), 0);
        let len = std::fs::metadata(&first).unwrap().len();
        assert_eq!(len, ZERO_STEP, "one step of zeros ahead");
        assert!(records < len);
        let mut store = LogStore::open_chunked(dir.path(), true, 1000).unwrap();
        assert_eq!(indexes(&mut store).await, (1..11).collect::<Vec<_>>());
        assert_eq!(store.disk_bytes(), records);
        assert_eq!(
            std::fs::metadata(&first).unwrap().len(),
            len,
            "the zero tail is kept"
        );
        append(&store, 11, 21);
        drop(store);
        let mut store = LogStore::open_chunked(dir.path(), true, 1000).unwrap();
        assert_eq!(indexes(&mut store).await, (1..21).collect::<Vec<_>>());
        let records = store.disk_bytes();
        drop(store);
        // A crash mid-append: the next record's header and part of its payload reached
        // the disk, the rest of the chunk is zeros.
        let file = OpenOptions::new().write(true).open(&first).unwrap();
        let partial = [
            &60u32.to_le_bytes()[..],
            &7u32.to_le_bytes()[..],
            &[1u8; 20][..],
        ]
        .concat();
        file.write_all_at(&partial, records).unwrap();
        drop(file);
        let mut store = LogStore::open_chunked(dir.path(), true, 1000).unwrap();
        assert_eq!(indexes(&mut store).await, (1..21).collect::<Vec<_>>());
        assert_eq!(
            std::fs::metadata(&first).unwrap().len(),
            records,
            "cut at the torn record"
        );
        append(&store, 21, 31);
        drop(store);
        let mut store = LogStore::open_chunked(dir.path(), true, 1000).unwrap();
        assert_eq!(indexes(&mut store).await, (1..31).collect::<Vec<_>>());
    }

    /// The held marker is written before the first vote or entry, or at once for a log
    /// with state; a blank log is told from one that holds state.
    #[tokio::test]
    async fn the_held_marker_comes_before_the_first_state() {
        let root = tempfile::tempdir().unwrap();
        let (dir, marker) = (root.path().join("7"), root.path().join("7.held"));
        let mut store = LogStore::open(&dir, true).unwrap();
        assert!(store.is_blank());
        store.mark_held(marker.clone()).unwrap();
        assert!(!marker.exists(), "nothing held yet");
        store.save_vote(&Vote::new(1, 2)).await.unwrap();
        assert!(marker.exists(), "written with the first vote");
        assert!(!store.is_blank());
        std::fs::remove_file(&marker).unwrap();
        drop(store);
        // Reopened with state: written at once.
        let store = LogStore::open(&dir, true).unwrap();
        store.mark_held(marker.clone()).unwrap();
        assert!(marker.exists());
        // A new blank log: its first entry writes it.
        std::fs::remove_file(&marker).unwrap();
        let (dir2, marker2) = (root.path().join("9"), root.path().join("9.held"));
        let store = LogStore::open(&dir2, false).unwrap();
        store.mark_held(marker2.clone()).unwrap();
        append(&store, 1, 2);
        assert!(marker2.exists(), "written with the first entry");
    }

    /// A log of the first layout (one file `log`) opens as the first chunk.
    #[tokio::test]
    async fn the_single_file_layout_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open_chunked(dir.path(), false, 1000).unwrap();
        append(&store, 1, 6);
        drop(store);
        std::fs::rename(chunk_path(dir.path(), 0), dir.path().join("log")).unwrap();
        let mut store = LogStore::open(dir.path(), false).unwrap();
        assert_eq!(indexes(&mut store).await, (1..6).collect::<Vec<_>>());
    }

    /// A seed is the first entry of an empty log only (synced logs too), kept on reopening;
    /// a log with entries or a purge point is left alone.
    #[tokio::test]
    async fn a_seed_goes_into_an_empty_log_only() {
        let members = || {
            Membership::from(
                [
                    (1u64, openraft::BasicNode::new("a")),
                    (2, openraft::BasicNode::new("b")),
                ]
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), true).unwrap();
        assert!(store.seed(2, members()).unwrap());
        assert!(!store.seed(2, members()).unwrap(), "only once");
        drop(store);
        let mut store = LogStore::open(dir.path(), true).unwrap();
        let read = store.try_get_log_entries(0..10).await.unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].log_id, log_id(0, 2, 0));
        assert_eq!(read[0].payload, EntryPayload::Membership(members()));
        assert!(
            store.read_vote().await.unwrap().is_none(),
            "no vote is cast"
        );

        let used = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(used.path(), false).unwrap();
        append(&store, 1, 3);
        assert!(!store.seed(1, members()).unwrap());
        store.purge(entry(5, 0).log_id).await.unwrap();
        assert!(
            !store.seed(1, members()).unwrap(),
            "a purge point is not an empty log"
        );
        assert_eq!(indexes(&mut store).await, Vec::<u64>::new());
    }

    /// `n` records of blank entries back to back, and where each ends.
    fn records(n: usize) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for i in 0..n {
            let entry: Entry = Entry {
                log_id: log_id(1, 1, i as u64),
                payload: EntryPayload::Blank,
            };
            let payload = encode(&entry).unwrap();
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            bytes.extend_from_slice(&payload);
            ends.push(bytes.len() as u64);
        }
        (bytes, ends)
    }

    proptest! {
        /// A chunk cut at any byte opens with exactly the whole records before the cut.
        #[test]
        fn a_torn_tail_keeps_the_whole_records(n in 1usize..6, cut_back in 0usize..64) {
            let (bytes, ends) = records(n);
            let cut = bytes.len().saturating_sub(cut_back);
            let (records, end) = scan(&bytes[..cut]);
            let whole = ends.iter().filter(|e| **e <= cut as u64).count();
            prop_assert_eq!(records.len(), whole);
            prop_assert_eq!(end, if whole == 0 { 0 } else { ends[whole - 1] });
        }

        /// Zeros after the records (a synced log's zeros ahead) end the scan right after
        /// the last record.
        #[test]
        fn zeros_after_the_records_end_the_scan(n in 0usize..6, zeros in 0usize..64) {
            let (mut bytes, _) = records(n);
            let end = bytes.len() as u64;
            bytes.extend(std::iter::repeat_n(0u8, zeros));
            let (records, scanned_end) = scan(&bytes);
            prop_assert_eq!(records.len(), n);
            prop_assert_eq!(scanned_end, end);
        }

        /// Garbage never panics the scan.
        #[test]
        fn scanning_garbage_does_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = scan(&bytes);
        }

        /// Whatever appends, truncations and purges came before, the entries read back
        /// (from the recent entries kept in memory where they can be) are the ones a
        /// reopened log reads from disk, and the ones written.
        #[test]
        fn reads_agree_with_the_disk(ops in proptest::collection::vec((0u8..3, 1u64..6), 1..40)) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let mut store = LogStore::open_chunked(dir.path(), false, 7).unwrap();
                let mut model: Vec<(u64, u64)> = Vec::new(); // (index, term)
                let mut purged = 0u64;
                let mut term = 1u64;
                for (kind, n) in ops {
                    let last = model.last().map_or(purged, |(i, _)| *i);
                    match kind {
                        0 => {
                            let mut inner = store.inner.lock();
                            for i in last + 1..=last + n {
                                let mut e = entry(i, (i * 7 + term) as usize % 50);
                                e.log_id = log_id(term, 1, i);
                                LogStore::append_locked(&mut inner, [e]).unwrap();
                                model.push((i, term));
                            }
                        }
                        1 if last > purged => {
                            let keep = last.saturating_sub(n).max(purged);
                            let at = model.iter().find(|(i, _)| *i == keep).map(|(i, t)| log_id(*t, 1, *i));
                            store.truncate_after(at.or(Some(log_id(0, 1, purged)).filter(|_| purged > 0))).await.unwrap();
                            model.retain(|(i, _)| *i <= keep);
                            term += 1;
                        }
                        _ if last > purged => {
                            let upto = (purged + n).min(last);
                            let (i, t) = *model.iter().find(|(i, _)| *i == upto).unwrap();
                            store.purge(log_id(t, 1, i)).await.unwrap();
                            model.retain(|(i, _)| *i > upto);
                            purged = upto;
                        }
                        _ => {}
                    }
                }
                let read = |entries: Vec<Entry>| -> Vec<Vec<u8>> {
                    entries.iter().map(|e| encode(e).unwrap()).collect()
                };
                let cached = read(store.try_get_log_entries(0..u64::MAX).await.unwrap());
                drop(store);
                let mut reopened = LogStore::open_chunked(dir.path(), false, 7).unwrap();
                let on_disk = read(reopened.try_get_log_entries(0..u64::MAX).await.unwrap());
                assert_eq!(cached, on_disk);
                let ids: Vec<(u64, u64)> = reopened
                    .try_get_log_entries(0..u64::MAX)
                    .await
                    .unwrap()
                    .iter()
                    .map(|e| (e.log_id.index, e.log_id.leader_id.term))
                    .collect();
                assert_eq!(ids, model);
            });
        }
    }
}
