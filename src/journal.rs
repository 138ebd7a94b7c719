//! An append-only, checksummed journal of opaque entries with checkpoints: the durable
//! store behind consumer-group state.
//!
//! File layout (little-endian; see `storage-format.md`, "Group journal"):
//!
//! ```text
//! header: magic "QITJ" (4) | version u8 = 1 | 3 reserved zero bytes
//! frame:  payload length u32 | CRC-32 u32 over kind and payload | kind u8 | payload
//!         kind 1 = entry, kind 2 = checkpoint (a snapshot replacing all before it)
//! ```
//!
//! An append writes its frames with one `write` on the caller's thread, under the journal's
//! lock, so that an answered append survives a crash of the process; fsyncs run on the
//! shared sync pool ([`crate::commit`]): under `fsync = always` one fsync serves every
//! append written while the previous one ran (group commit), under `interval` the pool
//! syncs a few milliseconds after the first unsynced write. A checkpoint writes a new file
//! holding only the snapshot, fsyncs it and renames it over the journal, so a crash leaves
//! either the old journal or the new one.
//!
//! On open, a torn tail (an incomplete last frame, or damaged bytes after which no valid
//! frame follows) is cut off after the last whole frame. Damage followed by a valid frame
//! is damage in the middle: opening fails with [`JournalError::Corrupt`] naming the file
//! and byte position, rather than silently dropping every later entry.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::commit::{GroupCommit, SyncPool, SyncTarget};
use crate::log::FsyncPolicy;
use crate::storage::{self, Known, OpenMode, SharedStorage, StorageFile};

/// `"QITJ"`.
const MAGIC: &[u8; 4] = b"QITJ";
/// Format version.
const VERSION: u8 = 1;
/// Bytes of the file header.
const HEADER_LEN: usize = 8;
/// Bytes of a frame header (length, CRC, kind).
const FRAME_HEADER_LEN: usize = 9;
const KIND_ENTRY: u8 = 1;
const KIND_CHECKPOINT: u8 = 2;
/// Largest frame payload accepted when reading.
const MAX_FRAME: usize = 1 << 30;
/// How often `fsync = interval` syncs.
const SYNC_INTERVAL: Duration = Duration::from_millis(5);

/// What a journal held when it was opened.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The latest checkpoint's snapshot, if one was written.
    pub checkpoint: Option<Bytes>,
    /// Entries appended after that checkpoint, in order.
    pub entries: Vec<Bytes>,
    /// Bytes of torn or corrupt tail that recovery cut off (0 when clean).
    pub truncated_bytes: u64,
}

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O error.
    #[error("journal I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Damage that recovery may not repair (e.g. a bad file header).
    #[error("corrupt journal {path} at byte {position}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte position.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// The journal was closed.
    #[error("the journal is closed")]
    Closed,
    /// An fsync failed earlier: the journal takes no more appends until reopened.
    #[error("the journal failed and takes no appends: {0}")]
    Failed(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Completion of an append or checkpoint: already written when returned; [`Ticket::wait`]
/// resolves once it is durable under [`FsyncPolicy::Always`] (at once otherwise).
pub struct Ticket {
    state: Result<Option<(Arc<Shared>, u64)>, JournalError>,
}

impl Ticket {
    /// Resolves once the operation is written, and under [`FsyncPolicy::Always`] durable.
    pub async fn wait(self) -> Result<(), JournalError> {
        match self.state? {
            Some((shared, end)) => shared
                .commit
                .wait_synced(end)
                .await
                .map_err(JournalError::Failed),
            None => Ok(()),
        }
    }
}

/// The journal file and where writing stands, behind the journal's lock.
struct JournalFile {
    /// Shared with the sync pool, which fsyncs it outside the lock.
    file: Arc<dyn StorageFile>,
    /// Length of the file.
    len: u64,
    /// Bytes written since open (across checkpoints): the position durability is tracked in.
    written: u64,
    /// Written since the last fsync.
    dirty: bool,
    /// Created by open and its directory entry not yet fsynced: the first sync does it.
    created_unsynced: bool,
    /// Reused frame buffer.
    buf: Vec<u8>,
    /// Why the journal takes no more appends.
    failed: Option<String>,
    /// Closed for good ([`Journal::close`]): no more appends or checkpoints.
    closed: bool,
}

/// State shared by the handles and the sync pool.
struct Shared {
    storage: SharedStorage,
    path: PathBuf,
    fsync: FsyncPolicy,
    file: Mutex<JournalFile>,
    commit: GroupCommit,
    since_checkpoint: AtomicU64,
}

/// The handles' common part; the last handle's drop stops pool syncs and syncs a last
/// time.
struct Inner {
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.commit.close();
        let closed = self.shared.file.lock().closed;
        if let Err(error) = self.shared.sync_now()
            && !closed
        {
            tracing::error!(%error, "final journal fsync failed");
        }
    }
}

/// A journal file. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

/// The journal's bytes: the only code that lays out or reads file headers and frames. It
/// never panics on any input (the lints below are enforced by the compiler).
mod frame {
    #![deny(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )]

    use std::path::Path;

    use bytes::Bytes;

    use super::{
        FRAME_HEADER_LEN, HEADER_LEN, JournalError, KIND_CHECKPOINT, KIND_ENTRY, MAGIC, MAX_FRAME,
        Replay, VERSION,
    };

    fn crc(kind: u8, payload: &[u8]) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[kind]);
        hasher.update(payload);
        hasher.finalize()
    }

    /// Encodes one frame. Payloads are far below 4 GiB (requests are capped), and a longer
    /// one would be refused on read, never misread: its length saturates.
    pub fn put_frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&crc(kind, payload).to_le_bytes());
        out.push(kind);
        out.extend_from_slice(payload);
    }

    /// The 8-byte file header.
    pub fn file_header() -> [u8; HEADER_LEN] {
        let mut header = [0; HEADER_LEN];
        for (slot, byte) in header.iter_mut().zip(MAGIC.iter().chain([&VERSION])) {
            *slot = *byte;
        }
        header
    }

    /// What is at a position of a journal.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Frame {
        /// A whole, valid frame: its kind, payload and the position after it.
        Valid(u8, Bytes, usize),
        /// The frame runs past the end of the file (an interrupted write).
        Incomplete,
        /// Bytes that are not a valid frame.
        Damaged(String),
    }

    fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
        let end = at.checked_add(4)?;
        Some(u32::from_le_bytes(bytes.get(at..end)?.try_into().ok()?))
    }

    /// Classifies the bytes at `at`.
    pub fn frame_at(bytes: &Bytes, at: usize) -> Frame {
        let Some(rest) = bytes.get(at..) else {
            return Frame::Incomplete;
        };
        let (Some(len), Some(sum), Some(&kind)) = (u32_at(rest, 0), u32_at(rest, 4), rest.get(8))
        else {
            return Frame::Incomplete;
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_FRAME {
            return Frame::Damaged(format!("frame length {len} exceeds {MAX_FRAME}"));
        }
        if !matches!(kind, KIND_ENTRY | KIND_CHECKPOINT) {
            return Frame::Damaged(format!("unknown frame kind {kind}"));
        }
        let Some(payload) = FRAME_HEADER_LEN
            .checked_add(len)
            .and_then(|end| rest.get(FRAME_HEADER_LEN..end))
        else {
            return Frame::Incomplete;
        };
        if crc(kind, payload) != sum {
            return Frame::Damaged("frame CRC mismatch".into());
        }
        let start = at.saturating_add(FRAME_HEADER_LEN);
        let end = start.saturating_add(len);
        Frame::Valid(kind, bytes.slice(start..end), end)
    }

    /// True when a valid frame starts somewhere after `at`: damage at `at` is then in the
    /// middle of the journal, not a torn tail.
    fn valid_frame_after(bytes: &Bytes, at: usize) -> bool {
        (at.saturating_add(1)..bytes.len()).any(|p| matches!(frame_at(bytes, p), Frame::Valid(..)))
    }

    /// Parses a journal file's bytes; returns the replay and the length of the valid prefix.
    /// A torn tail is left out (and counted); damage followed by a valid frame is an error.
    pub fn parse(path: &Path, bytes: &Bytes) -> Result<(Replay, usize), JournalError> {
        let mut replay = Replay::default();
        if bytes.len() < HEADER_LEN {
            // A file cut before its header was complete holds nothing yet.
            replay.truncated_bytes = bytes.len() as u64;
            return Ok((replay, 0));
        }
        if bytes.get(..HEADER_LEN) != Some(&file_header()[..]) {
            return Err(JournalError::Corrupt {
                path: path.to_path_buf(),
                position: 0,
                reason: "not a qit journal (bad magic or version)".into(),
            });
        }
        let mut at = HEADER_LEN;
        while at < bytes.len() {
            match frame_at(bytes, at) {
                Frame::Valid(kind, payload, next) => {
                    if kind == KIND_CHECKPOINT {
                        replay.checkpoint = Some(payload);
                        replay.entries.clear();
                    } else {
                        replay.entries.push(payload);
                    }
                    at = next;
                }
                // The bytes after an interrupted write are a prefix of that one frame, so
                // a valid frame after them means the damage is elsewhere (say, a length).
                Frame::Incomplete if !valid_frame_after(bytes, at) => break,
                Frame::Incomplete => {
                    return Err(JournalError::Corrupt {
                        path: path.to_path_buf(),
                        position: at as u64,
                        reason: "frame runs past the end of the file, with valid frames after it"
                            .into(),
                    });
                }
                Frame::Damaged(reason) if valid_frame_after(bytes, at) => {
                    return Err(JournalError::Corrupt {
                        path: path.to_path_buf(),
                        position: at as u64,
                        reason: format!("{reason}, with valid frames after it"),
                    });
                }
                Frame::Damaged(_) => break,
            }
        }
        replay.truncated_bytes = bytes.len().saturating_sub(at) as u64;
        Ok((replay, at))
    }
}

use frame::{file_header, parse, put_frame};

impl Journal {
    /// Opens or creates the journal at `path` on `storage` and replays it.
    pub fn open(
        storage: SharedStorage,
        path: &Path,
        fsync: FsyncPolicy,
    ) -> Result<(Journal, Replay), JournalError> {
        let read = storage::read_if_exists(&*storage, path).map_err(io(path))?;
        // Opened on first use; a journal that does not exist yet is created (with its
        // directory) by its first append: a new queue's group costs no file.
        let known = if read.is_some() {
            // A leftover of an interrupted checkpoint (ignored when the journal is absent:
            // the next checkpoint starts its temp file afresh).
            let _ = storage.remove(&storage::temp_path(path));
            Known::Present
        } else {
            Known::Absent
        };
        let bytes = read.map(Bytes::from).unwrap_or_default();
        let (replay, valid) = parse(path, &bytes)?;
        let file = storage::deferred(Arc::clone(&storage), path, OpenMode::Append, known);
        let fresh = valid < HEADER_LEN;
        if fresh {
            // Nothing written nor synced here: an empty journal holds nothing to lose, and
            // the header goes out with the first entry, whose fsync also syncs the
            // directory. A new queue's journal costs no write and no fsync.
            if !bytes.is_empty() {
                file.set_len(0).map_err(io(path))?;
            }
        } else if valid < bytes.len() {
            tracing::warn!(journal = %path.display(), cut = bytes.len() - valid, "truncating torn journal tail");
            file.set_len(valid as u64).map_err(io(path))?;
            file.sync_data().map_err(io(path))?;
        }
        let shared = Arc::new(Shared {
            storage,
            path: path.to_path_buf(),
            fsync,
            file: Mutex::new(JournalFile {
                file,
                len: if fresh { 0 } else { valid as u64 },
                written: 0,
                dirty: false,
                created_unsynced: fresh,
                buf: Vec::new(),
                failed: None,
                closed: false,
            }),
            commit: GroupCommit::new(0, fsync, SYNC_INTERVAL, SyncPool::shared()),
            since_checkpoint: AtomicU64::new(valid.saturating_sub(HEADER_LEN) as u64),
        });
        let target: std::sync::Weak<dyn SyncTarget> = Arc::downgrade(&shared) as _;
        shared.commit.attach(target);
        let journal = Journal {
            inner: Arc::new(Inner { shared }),
        };
        Ok((journal, replay))
    }

    fn ticket(&self, written: Result<u64, JournalError>) -> Ticket {
        let shared = &self.inner.shared;
        Ticket {
            state: written.map(|end| {
                (shared.fsync == FsyncPolicy::Always).then(|| (Arc::clone(shared), end))
            }),
        }
    }

    /// Writes entries now (order = call order across all callers); await the ticket for
    /// durability. Concurrent appends are group-committed.
    pub fn append(&self, entries: Vec<Bytes>) -> Ticket {
        self.ticket(self.inner.shared.append(&entries))
    }

    /// Checkpoints now: `snapshot` replaces everything appended before this call; entries
    /// appended after it are kept after it. Atomic against crashes; durable when it returns.
    pub fn checkpoint(&self, snapshot: Bytes) -> Ticket {
        self.ticket(self.inner.shared.checkpoint(&snapshot))
    }

    /// Checkpoints now, as [`Self::checkpoint`], for a caller that cannot wait: a
    /// checkpoint replaces the file atomically and is durable once this returns `Ok`.
    pub fn checkpoint_now(&self, snapshot: &[u8]) -> Result<(), JournalError> {
        self.inner.shared.checkpoint(snapshot).map(|_| ())
    }

    /// The bytes of a journal file holding only `snapshot` as its checkpoint: what a
    /// journal that just checkpointed holds (a copy of a group's state taken elsewhere).
    pub fn checkpoint_file(snapshot: &[u8]) -> Vec<u8> {
        let mut bytes = file_header().to_vec();
        put_frame(&mut bytes, KIND_CHECKPOINT, snapshot);
        bytes
    }

    /// Bytes in the journal file since the last checkpoint (to decide when to checkpoint).
    pub fn bytes_since_checkpoint(&self) -> u64 {
        self.inner.shared.since_checkpoint.load(Ordering::Relaxed)
    }

    /// fsyncs everything appended so far (on the caller's thread).
    pub async fn flush(&self) -> Result<(), JournalError> {
        self.inner.shared.sync_now().map(|_| ())
    }

    /// Takes no more appends or checkpoints ([`JournalError::Closed`]), for good: once this
    /// returns, nothing writes the file (or creates it, or its directory) any more, so the
    /// caller may remove them (a deleted queue's journal, whose appends still in flight
    /// must not create its directory again).
    pub fn close(&self) {
        self.inner.shared.file.lock().closed = true;
    }
}

impl Shared {
    /// Writes `entries` as frames with one `write`; returns the position after them.
    fn append(&self, entries: &[Bytes]) -> Result<u64, JournalError> {
        let mut guard = self.file.lock();
        let f = &mut *guard;
        if f.closed {
            return Err(JournalError::Closed);
        }
        if let Some(reason) = &f.failed {
            return Err(JournalError::Failed(reason.clone()));
        }
        f.buf.clear();
        if f.len == 0 {
            // A fresh journal: its header goes with the first entries.
            f.buf.extend_from_slice(&file_header());
        }
        entries
            .iter()
            .for_each(|e| put_frame(&mut f.buf, KIND_ENTRY, e));
        if let Err(error) = f.file.append(&f.buf) {
            // Keep the file ending on a whole frame; when that fails too, take no more
            // appends, so none lands behind a partial frame.
            if let Err(cut) = f.file.set_len(f.len) {
                let reason = format!(
                    "write to {} failed ({error}) and cutting back the partial frame failed ({cut})",
                    self.path.display()
                );
                tracing::error!(%reason, "the journal stops taking appends");
                f.failed = Some(reason);
            }
            return Err(io(&self.path)(error));
        }
        f.len += f.buf.len() as u64;
        f.written += f.buf.len() as u64;
        self.since_checkpoint
            .fetch_add(f.buf.len() as u64, Ordering::Relaxed);
        if !f.dirty {
            f.dirty = true;
            if self.fsync == FsyncPolicy::Interval {
                self.commit.request();
            }
        }
        Ok(f.written)
    }

    /// fsyncs what is written, on the caller's thread. A failed fsync fails the journal
    /// for good: a retried fsync may "succeed" after the kernel dropped the dirty pages.
    fn sync_now(&self) -> Result<u64, JournalError> {
        let mut f = self.file.lock();
        if let Some(reason) = &f.failed {
            return Err(JournalError::Failed(reason.clone()));
        }
        if f.dirty {
            let result = f.file.sync_data().and_then(|()| {
                if f.created_unsynced {
                    self.storage.sync_dir(storage::parent_dir(&self.path))?;
                }
                Ok(())
            });
            if let Err(error) = result {
                let reason = format!("fsync of {} failed: {error}", self.path.display());
                if f.closed {
                    // Closed: its queue is being removed with its files, as intended.
                    tracing::debug!(%reason, "fsync of a removed queue's journal failed");
                } else {
                    tracing::error!(%reason, "the journal stops taking appends");
                }
                f.failed = Some(reason.clone());
                self.commit.fail(reason);
                return Err(io(&self.path)(error));
            }
            f.dirty = false;
            f.created_unsynced = false;
        }
        self.commit.mark_synced(f.written);
        Ok(f.written)
    }

    fn sync_outside_lock(&self) {
        let captured = {
            let mut f = self.file.lock();
            if !f.dirty {
                return;
            }
            f.dirty = false;
            (
                Arc::clone(&f.file),
                f.written,
                std::mem::take(&mut f.created_unsynced),
            )
        };
        let (file, end, created_unsynced) = captured;
        let result = file.sync_data().and_then(|()| {
            if created_unsynced {
                self.storage.sync_dir(storage::parent_dir(&self.path))?;
            }
            Ok(())
        });
        let mut f = self.file.lock();
        match result {
            Ok(()) => self.commit.mark_synced(end),
            Err(error) => {
                let reason = format!("fsync of {} failed: {error}", self.path.display());
                if f.closed {
                    // Closed: its queue is being removed with its files, as intended.
                    tracing::debug!(%reason, "fsync of a removed queue's journal failed");
                } else {
                    tracing::error!(%reason, "the journal stops taking appends");
                }
                f.failed = Some(reason.clone());
                self.commit.fail(reason);
            }
        }
    }

    /// Replaces the journal with a file holding only `snapshot`.
    fn checkpoint(&self, snapshot: &[u8]) -> Result<u64, JournalError> {
        let mut f = self.file.lock();
        if f.closed {
            return Err(JournalError::Closed);
        }
        if let Some(reason) = &f.failed {
            return Err(JournalError::Failed(reason.clone()));
        }
        let mut bytes = file_header().to_vec();
        put_frame(&mut bytes, KIND_CHECKPOINT, snapshot);
        if f.len == 0 {
            // Never written: its directory may not exist yet (see `Journal::open`).
            let dir = storage::parent_dir(&self.path);
            self.storage.create_dir_all(dir).map_err(io(dir))?;
        }
        storage::atomic_replace(&*self.storage, &self.path, &bytes, false).map_err(|e| {
            JournalError::Io {
                path: e.path,
                source: e.source,
            }
        })?;
        f.file = storage::deferred(
            Arc::clone(&self.storage),
            &self.path,
            OpenMode::Append,
            Known::Present,
        );
        f.len = bytes.len() as u64;
        f.dirty = false;
        // The replace synced the file and its directory.
        f.created_unsynced = false;
        self.since_checkpoint.store(0, Ordering::Relaxed);
        // Everything appended before is in the snapshot, which is durable now.
        self.commit.mark_synced(f.written);
        Ok(f.written)
    }
}

/// The pool syncs the journal file: one fsync per request, outside the lock.
impl SyncTarget for Shared {
    fn commit(&self) -> &GroupCommit {
        &self.commit
    }

    fn sync_once(&self) {
        self.sync_outside_lock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{disk, temp_path};
    use proptest::prelude::*;
    use std::fs;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test]
    async fn entries_and_checkpoints_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.journal");
        {
            let (journal, replay) = Journal::open(disk(), &path, FsyncPolicy::Always).unwrap();
            assert_eq!(replay, Replay::default());
            journal.append(vec![b("a"), b("b")]).wait().await.unwrap();
            journal.checkpoint(b("snap")).wait().await.unwrap();
            journal.append(vec![b("c")]).wait().await.unwrap();
        }
        let (journal, replay) = Journal::open(disk(), &path, FsyncPolicy::Always).unwrap();
        assert_eq!(replay.checkpoint, Some(b("snap")));
        assert_eq!(replay.entries, vec![b("c")]);
        assert_eq!(replay.truncated_bytes, 0);
        journal.append(vec![b("d")]).wait().await.unwrap();
    }

    /// Cutting the file at every byte of its last frame loses exactly that frame.
    #[tokio::test]
    async fn torn_tail_is_cut_at_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.journal");
        {
            let (journal, _) = Journal::open(disk(), &path, FsyncPolicy::Never).unwrap();
            journal
                .append(vec![b("one"), b("two")])
                .wait()
                .await
                .unwrap();
            journal.flush().await.unwrap();
        }
        let two_frames = fs::read(&path).unwrap();
        {
            let (journal, _) = Journal::open(disk(), &path, FsyncPolicy::Never).unwrap();
            journal.append(vec![b("three")]).wait().await.unwrap();
        }
        let whole = fs::read(&path).unwrap();
        for cut in two_frames.len()..whole.len() {
            fs::write(&path, &whole[..cut]).unwrap();
            let (_, replay) = Journal::open(disk(), &path, FsyncPolicy::Never).unwrap();
            assert_eq!(replay.entries, vec![b("one"), b("two")], "cut {cut}");
            assert_eq!(replay.truncated_bytes, (cut - two_frames.len()) as u64);
        }
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        fs::write(&path, &flipped).unwrap();
        let (_, replay) = Journal::open(disk(), &path, FsyncPolicy::Never).unwrap();
        assert_eq!(replay.entries.len(), 2);
    }

    #[tokio::test]
    async fn stray_checkpoint_temp_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.journal");
        {
            let (journal, _) = Journal::open(disk(), &path, FsyncPolicy::Never).unwrap();
            journal.append(vec![b("kept")]).wait().await.unwrap();
        }
        fs::write(temp_path(&path), b"half a checkpoint").unwrap();
        let (_, replay) = Journal::open(disk(), &path, FsyncPolicy::Never).unwrap();
        assert_eq!(replay.entries, vec![b("kept")]);
        assert!(!temp_path(&path).exists());
    }

    /// Damage followed by valid frames is reported with file and position, not cut off
    /// with every later entry (issue 11: the journal silently dropped every later ack).
    #[tokio::test]
    async fn damage_in_the_middle_is_a_named_error_not_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.journal");
        {
            let (journal, _) = Journal::open(disk(), &path, FsyncPolicy::Never).unwrap();
            journal
                .append(vec![b("one"), b("two"), b("three")])
                .wait()
                .await
                .unwrap();
        }
        let whole = fs::read(&path).unwrap();
        // The payload byte of the first frame ("one" starts after header + frame header).
        let first_payload = HEADER_LEN + FRAME_HEADER_LEN;
        for at in [first_payload, HEADER_LEN, HEADER_LEN + 8] {
            let mut damaged = whole.clone();
            damaged[at] ^= 0x40;
            fs::write(&path, &damaged).unwrap();
            match Journal::open(disk(), &path, FsyncPolicy::Never) {
                Err(JournalError::Corrupt {
                    position, path: p, ..
                }) => {
                    assert_eq!(position, HEADER_LEN as u64, "flip at {at}");
                    assert_eq!(p, path);
                }
                Err(other) => panic!("flip at {at}: {other}"),
                Ok((_, replay)) => panic!("flip at {at}: opened with {:?}", replay.entries),
            }
            // Nothing was cut: the damaged file is left for the operator.
            assert_eq!(fs::read(&path).unwrap(), damaged);
        }
    }

    fn journal_bytes(entries: &[Vec<u8>], checkpoint_at: Option<usize>) -> Vec<u8> {
        let mut out = file_header().to_vec();
        for (i, e) in entries.iter().enumerate() {
            let kind = if Some(i) == checkpoint_at {
                KIND_CHECKPOINT
            } else {
                KIND_ENTRY
            };
            put_frame(&mut out, kind, e);
        }
        out
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut with_header = file_header().to_vec();
            with_header.extend_from_slice(&bytes);
            let _ = parse(Path::new("j"), &Bytes::from(bytes));
            let _ = parse(Path::new("j"), &Bytes::from(with_header));
        }

        /// Any one mutation of a valid journal: an error or a replay of a prefix of its
        /// entries, never a panic and never an entry that was not written.
        #[test]
        fn parse_of_mutated_journals_is_an_error_or_a_prefix(
            entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..8),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let whole = journal_bytes(&entries, None);
            let mut mutated = whole.clone();
            let i = at.index(mutated.len());
            mutated[i] ^= xor;
            let cut = cut.index(mutated.len() + 1);
            for bytes in [mutated, whole[..cut].to_vec()] {
                if let Ok((replay, valid)) = parse(Path::new("j"), &Bytes::from(bytes.clone())) {
                    prop_assert!(valid <= bytes.len());
                    prop_assert!(replay.entries.len() <= entries.len());
                    for (got, want) in replay.entries.iter().zip(&entries) {
                        prop_assert_eq!(&got[..], &want[..]);
                    }
                }
            }
        }

        /// A journal cut anywhere (a torn tail) replays exactly the whole frames before
        /// the cut.
        #[test]
        fn a_cut_anywhere_is_a_torn_tail(
            entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let whole = journal_bytes(&entries, None);
            let cut = cut.index(whole.len() + 1);
            let (replay, valid) = parse(Path::new("j"), &Bytes::copy_from_slice(&whole[..cut])).unwrap();
            let mut end = HEADER_LEN;
            let mut whole_frames = 0;
            for e in &entries {
                if end + FRAME_HEADER_LEN + e.len() > cut {
                    break;
                }
                end += FRAME_HEADER_LEN + e.len();
                whole_frames += 1;
            }
            prop_assert_eq!(replay.entries.len(), whole_frames);
            prop_assert_eq!(valid, if cut < HEADER_LEN { 0 } else { end });
        }
    }

    #[test]
    fn garbage_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.journal");
        for seed in 0u32..200 {
            let mut bytes = file_header().to_vec();
            bytes.extend((0..seed).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
            let _ = parse(&path, &Bytes::from(bytes));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appenders_keep_their_own_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.journal");
        let (journal, _) = Journal::open(disk(), &path, FsyncPolicy::Always).unwrap();
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        journal
                            .append(vec![b(&format!("{t}:{i}"))])
                            .wait()
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        drop(journal);
        let (_, replay) = Journal::open(disk(), &path, FsyncPolicy::Always).unwrap();
        assert_eq!(replay.entries.len(), 200);
        for t in 0..4 {
            let mine: Vec<usize> = replay
                .entries
                .iter()
                .filter_map(|e| {
                    let s = std::str::from_utf8(e).unwrap();
                    let (who, i) = s.split_once(':').unwrap();
                    (who == t.to_string()).then(|| i.parse().unwrap())
                })
                .collect();
            assert_eq!(mine, (0..50).collect::<Vec<_>>());
        }
    }
}
