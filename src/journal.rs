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
//! journal's sync thread ([`crate::commit`]): under `fsync = always` one fsync serves every
//! append written while the previous one ran (group commit), under `interval` the thread
//! syncs a few milliseconds after the first unsynced write. A checkpoint writes a new file
//! holding only the snapshot, fsyncs it and renames it over the journal, so a crash leaves
//! either the old journal or the new one. On open, a torn or corrupt tail is cut off after
//! the last whole frame.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::commit::GroupCommit;
use crate::log::FsyncPolicy;

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
    /// Shared with the sync thread, which fsyncs it outside the lock.
    file: Arc<File>,
    /// Length of the file.
    len: u64,
    /// Bytes written since open (across checkpoints): the position durability is tracked in.
    written: u64,
    /// Written since the last fsync.
    dirty: bool,
    last_sync: Instant,
    /// Reused frame buffer.
    buf: Vec<u8>,
    /// Why the journal takes no more appends.
    failed: Option<String>,
}

/// State shared by the handles and the sync thread.
struct Shared {
    path: PathBuf,
    fsync: FsyncPolicy,
    file: Mutex<JournalFile>,
    commit: GroupCommit,
    since_checkpoint: AtomicU64,
}

/// Owns the sync thread; the last handle's drop stops it and syncs a last time.
struct Inner {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.commit.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Err(error) = self.shared.sync_now() {
            tracing::error!(%error, "final journal fsync failed");
        }
    }
}

/// A journal file. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

/// Encodes one frame.
fn put_frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

fn file_header() -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4] = VERSION;
    header
}

/// Parses a journal file's bytes; returns the replay and the length of the valid prefix.
fn parse(path: &Path, bytes: &Bytes) -> Result<(Replay, usize), JournalError> {
    let mut replay = Replay::default();
    if bytes.len() < HEADER_LEN {
        // A file cut before its header was complete holds nothing yet.
        replay.truncated_bytes = bytes.len() as u64;
        return Ok((replay, 0));
    }
    if bytes.get(..4) != Some(&MAGIC[..]) || bytes.get(4) != Some(&VERSION) {
        return Err(JournalError::Corrupt {
            path: path.to_path_buf(),
            position: 0,
            reason: "not a qit journal (bad magic or version)".into(),
        });
    }
    let mut at = HEADER_LEN;
    while let Some((kind, payload, next)) = frame_at(bytes, at) {
        match kind {
            KIND_CHECKPOINT => {
                replay.checkpoint = Some(payload);
                replay.entries.clear();
            }
            _ => replay.entries.push(payload),
        }
        at = next;
    }
    replay.truncated_bytes = (bytes.len() - at) as u64;
    Ok((replay, at))
}

/// The whole, valid frame at `at`, if there is one.
fn frame_at(bytes: &Bytes, at: usize) -> Option<(u8, Bytes, usize)> {
    let header = bytes.get(at..at.checked_add(FRAME_HEADER_LEN)?)?;
    let len = u32::from_le_bytes(header.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header.get(4..8)?.try_into().ok()?);
    let kind = *header.get(8)?;
    if len > MAX_FRAME || !matches!(kind, KIND_ENTRY | KIND_CHECKPOINT) {
        return None;
    }
    let start = at + FRAME_HEADER_LEN;
    let end = start.checked_add(len)?;
    let payload = bytes.get(start..end)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(payload);
    (hasher.finalize() == crc).then(|| (kind, bytes.slice(start..end), end))
}

impl Journal {
    /// Opens or creates the journal at `path` and replays it.
    pub fn open(path: &Path, fsync: FsyncPolicy) -> Result<(Journal, Replay), JournalError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let _ = fs::remove_file(temp_path(path));
        let bytes = match fs::read(path) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Bytes::new(),
            Err(e) => return Err(io(path)(e)),
        };
        let (replay, valid) = parse(path, &bytes)?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        if valid < HEADER_LEN {
            file.set_len(0).map_err(io(path))?;
            file.write_all(&file_header()).map_err(io(path))?;
            file.sync_all().map_err(io(path))?;
            sync_parent(path)?;
        } else if valid < bytes.len() {
            tracing::warn!(journal = %path.display(), cut = bytes.len() - valid, "truncating torn journal tail");
            file.set_len(valid as u64).map_err(io(path))?;
            file.sync_all().map_err(io(path))?;
        }
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            fsync,
            file: Mutex::new(JournalFile {
                file: Arc::new(file),
                len: valid.max(HEADER_LEN) as u64,
                written: 0,
                dirty: false,
                last_sync: Instant::now(),
                buf: Vec::new(),
                failed: None,
            }),
            commit: GroupCommit::new(0),
            since_checkpoint: AtomicU64::new(valid.saturating_sub(HEADER_LEN) as u64),
        });
        let for_thread = Arc::clone(&shared);
        let thread = crate::commit::spawn_sync_thread(fsync, "qit-journal-sync", move || {
            for_thread.run_sync_thread()
        })
        .map_err(io(path))?;
        let journal = Journal {
            inner: Arc::new(Inner { shared, thread }),
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

    /// Bytes in the journal file since the last checkpoint (to decide when to checkpoint).
    pub fn bytes_since_checkpoint(&self) -> u64 {
        self.inner.shared.since_checkpoint.load(Ordering::Relaxed)
    }

    /// fsyncs everything appended so far (on the caller's thread).
    pub async fn flush(&self) -> Result<(), JournalError> {
        self.inner.shared.sync_now().map(|_| ())
    }
}

impl Shared {
    /// Writes `entries` as frames with one `write`; returns the position after them.
    fn append(&self, entries: &[Bytes]) -> Result<u64, JournalError> {
        let mut guard = self.file.lock();
        let f = &mut *guard;
        if let Some(reason) = &f.failed {
            return Err(JournalError::Failed(reason.clone()));
        }
        f.buf.clear();
        entries
            .iter()
            .for_each(|e| put_frame(&mut f.buf, KIND_ENTRY, e));
        if let Err(error) = (&*f.file).write_all(&f.buf) {
            // Keep the file ending on a whole frame.
            let _ = f.file.set_len(f.len);
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

    /// fsyncs what is written, on the caller's thread.
    fn sync_now(&self) -> Result<u64, JournalError> {
        let mut f = self.file.lock();
        if f.dirty {
            f.file.sync_data().map_err(io(&self.path))?;
            f.dirty = false;
            f.last_sync = Instant::now();
        }
        self.commit.mark_synced(f.written);
        Ok(f.written)
    }

    /// The sync thread: one fsync per request, outside the lock.
    fn run_sync_thread(&self) {
        self.commit.run(
            self.fsync,
            SYNC_INTERVAL,
            || self.file.lock().last_sync,
            || self.sync_outside_lock(),
        );
    }

    fn sync_outside_lock(&self) {
        let (file, end) = {
            let mut f = self.file.lock();
            if !f.dirty {
                return;
            }
            f.dirty = false;
            (Arc::clone(&f.file), f.written)
        };
        let result = file.sync_data();
        let mut f = self.file.lock();
        f.last_sync = Instant::now();
        match result {
            Ok(()) => self.commit.mark_synced(end),
            Err(error) => {
                let reason = format!("fsync of {} failed: {error}", self.path.display());
                tracing::error!(%reason, "the journal stops taking appends");
                f.failed = Some(reason.clone());
                self.commit.fail(reason);
            }
        }
    }

    /// Replaces the journal with a file holding only `snapshot`.
    fn checkpoint(&self, snapshot: &[u8]) -> Result<u64, JournalError> {
        let mut f = self.file.lock();
        let tmp = temp_path(&self.path);
        let mut bytes = file_header().to_vec();
        put_frame(&mut bytes, KIND_CHECKPOINT, snapshot);
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        sync_parent(&self.path)?;
        f.file = Arc::new(
            OpenOptions::new()
                .append(true)
                .open(&self.path)
                .map_err(io(&self.path))?,
        );
        f.len = bytes.len() as u64;
        f.dirty = false;
        self.since_checkpoint.store(0, Ordering::Relaxed);
        // Everything appended before is in the snapshot, which is durable now.
        self.commit.mark_synced(f.written);
        Ok(f.written)
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn sync_parent(path: &Path) -> Result<(), JournalError> {
    match path.parent() {
        Some(dir) => File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test]
    async fn entries_and_checkpoints_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.journal");
        {
            let (journal, replay) = Journal::open(&path, FsyncPolicy::Always).unwrap();
            assert_eq!(replay, Replay::default());
            journal.append(vec![b("a"), b("b")]).wait().await.unwrap();
            journal.checkpoint(b("snap")).wait().await.unwrap();
            journal.append(vec![b("c")]).wait().await.unwrap();
        }
        let (journal, replay) = Journal::open(&path, FsyncPolicy::Always).unwrap();
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
            let (journal, _) = Journal::open(&path, FsyncPolicy::Never).unwrap();
            journal
                .append(vec![b("one"), b("two")])
                .wait()
                .await
                .unwrap();
            journal.flush().await.unwrap();
        }
        let two_frames = fs::read(&path).unwrap();
        {
            let (journal, _) = Journal::open(&path, FsyncPolicy::Never).unwrap();
            journal.append(vec![b("three")]).wait().await.unwrap();
        }
        let whole = fs::read(&path).unwrap();
        for cut in two_frames.len()..whole.len() {
            fs::write(&path, &whole[..cut]).unwrap();
            let (_, replay) = Journal::open(&path, FsyncPolicy::Never).unwrap();
            assert_eq!(replay.entries, vec![b("one"), b("two")], "cut {cut}");
            assert_eq!(replay.truncated_bytes, (cut - two_frames.len()) as u64);
        }
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        fs::write(&path, &flipped).unwrap();
        let (_, replay) = Journal::open(&path, FsyncPolicy::Never).unwrap();
        assert_eq!(replay.entries.len(), 2);
    }

    #[tokio::test]
    async fn stray_checkpoint_temp_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.journal");
        {
            let (journal, _) = Journal::open(&path, FsyncPolicy::Never).unwrap();
            journal.append(vec![b("kept")]).wait().await.unwrap();
        }
        fs::write(temp_path(&path), b"half a checkpoint").unwrap();
        let (_, replay) = Journal::open(&path, FsyncPolicy::Never).unwrap();
        assert_eq!(replay.entries, vec![b("kept")]);
        assert!(!temp_path(&path).exists());
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
        let (journal, _) = Journal::open(&path, FsyncPolicy::Always).unwrap();
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
        let (_, replay) = Journal::open(&path, FsyncPolicy::Always).unwrap();
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
