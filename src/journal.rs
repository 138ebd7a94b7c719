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
//! A single writer thread appends frames: every append enqueued while it was busy goes out
//! in one `write` and, under `fsync = always`, one fsync (group commit). A checkpoint writes
//! a new file holding only the snapshot, fsyncs it and renames it over the journal, so a
//! crash leaves either the old journal or the new one. On open, a torn or corrupt tail is
//! cut off after the last whole frame.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

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
}

impl JournalError {
    fn duplicate(&self) -> Self {
        match self {
            JournalError::Io { path, source } => JournalError::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            JournalError::Corrupt {
                path,
                position,
                reason,
            } => JournalError::Corrupt {
                path: path.clone(),
                position: *position,
                reason: reason.clone(),
            },
            JournalError::Closed => JournalError::Closed,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Completion of an enqueued append or checkpoint.
pub struct Ticket {
    answer: Result<oneshot::Receiver<Result<(), JournalError>>, JournalError>,
}

impl Ticket {
    /// Resolves once the operation is written, and under [`FsyncPolicy::Always`] durable.
    pub async fn wait(self) -> Result<(), JournalError> {
        self.answer?.await.map_err(|_| JournalError::Closed)?
    }
}

enum Command {
    Append(Vec<Bytes>, oneshot::Sender<Result<(), JournalError>>),
    Checkpoint(Bytes, oneshot::Sender<Result<(), JournalError>>),
    Flush(oneshot::Sender<Result<(), JournalError>>),
}

struct Inner {
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    since_checkpoint: Arc<AtomicU64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.commands.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A journal file. Cheap to clone (a handle); the writer stops when the last one drops.
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
        let since_checkpoint = Arc::new(AtomicU64::new(valid.saturating_sub(HEADER_LEN) as u64));
        let (commands, rx) = mpsc::channel();
        let writer = JournalWriter {
            path: path.to_path_buf(),
            file,
            rx,
            fsync,
            dirty: false,
            last_sync: Instant::now(),
            since_checkpoint: Arc::clone(&since_checkpoint),
        };
        let thread = std::thread::Builder::new()
            .name("qit-journal".into())
            .spawn(move || writer.run())
            .map_err(io(path))?;
        let journal = Journal {
            inner: Arc::new(Inner {
                commands: Some(commands),
                thread: Some(thread),
                since_checkpoint,
            }),
        };
        Ok((journal, replay))
    }

    fn enqueue(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), JournalError>>) -> Command,
    ) -> Ticket {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .inner
            .commands
            .as_ref()
            .map(|tx| tx.send(make(reply)).is_ok())
            .unwrap_or(false);
        Ticket {
            answer: if sent {
                Ok(answer)
            } else {
                Err(JournalError::Closed)
            },
        }
    }

    /// Enqueues entries now (order = call order across all callers); await the ticket for
    /// durability. Concurrent appends are group-committed.
    pub fn append(&self, entries: Vec<Bytes>) -> Ticket {
        self.enqueue(|reply| Command::Append(entries, reply))
    }

    /// Enqueues a checkpoint now: `snapshot` replaces everything appended before this call;
    /// entries appended after it are kept after it. Atomic against crashes.
    pub fn checkpoint(&self, snapshot: Bytes) -> Ticket {
        self.enqueue(|reply| Command::Checkpoint(snapshot, reply))
    }

    /// Bytes in the journal file since the last checkpoint (to decide when to checkpoint).
    pub fn bytes_since_checkpoint(&self) -> u64 {
        self.inner.since_checkpoint.load(Ordering::Relaxed)
    }

    /// Writes and fsyncs everything enqueued so far.
    pub async fn flush(&self) -> Result<(), JournalError> {
        self.enqueue(Command::Flush).wait().await
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

/// The writer thread's state.
struct JournalWriter {
    path: PathBuf,
    file: File,
    rx: Receiver<Command>,
    fsync: FsyncPolicy,
    dirty: bool,
    last_sync: Instant,
    since_checkpoint: Arc<AtomicU64>,
}

impl JournalWriter {
    fn run(mut self) {
        while let Some(first) = self.next_command() {
            let mut commands = vec![first];
            while let Ok(command) = self.rx.try_recv() {
                commands.push(command);
            }
            self.process(commands);
        }
        if let Err(error) = self.sync() {
            tracing::error!(%error, "final journal fsync failed");
        }
    }

    fn next_command(&mut self) -> Option<Command> {
        loop {
            if !(self.dirty && self.fsync == FsyncPolicy::Interval) {
                return self.rx.recv().ok();
            }
            let wait = (self.last_sync + SYNC_INTERVAL).saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(command) => return Some(command),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(error) = self.sync() {
                        tracing::error!(%error, "journal fsync failed");
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn process(&mut self, commands: Vec<Command>) {
        let mut buf = Vec::new();
        let mut waiting = Vec::new();
        for command in commands {
            match command {
                Command::Append(entries, reply) => {
                    entries
                        .iter()
                        .for_each(|e| put_frame(&mut buf, KIND_ENTRY, e));
                    waiting.push(reply);
                }
                Command::Checkpoint(snapshot, reply) => {
                    self.commit(&mut buf, &mut waiting);
                    let _ = reply.send(self.checkpoint(&snapshot));
                }
                Command::Flush(reply) => {
                    self.commit(&mut buf, &mut waiting);
                    let _ = reply.send(self.sync());
                }
            }
        }
        self.commit(&mut buf, &mut waiting);
    }

    fn commit(
        &mut self,
        buf: &mut Vec<u8>,
        waiting: &mut Vec<oneshot::Sender<Result<(), JournalError>>>,
    ) {
        if waiting.is_empty() && buf.is_empty() {
            return;
        }
        let mut result = self.write(buf);
        if result.is_ok() && self.fsync == FsyncPolicy::Always {
            result = self.sync();
        }
        for reply in waiting.drain(..) {
            let _ = reply.send(result.as_ref().map(|_| ()).map_err(JournalError::duplicate));
        }
    }

    fn write(&mut self, buf: &mut Vec<u8>) -> Result<(), JournalError> {
        if buf.is_empty() {
            return Ok(());
        }
        let before = self.file.metadata().map(|m| m.len());
        let result = self.file.write_all(buf).map_err(io(&self.path));
        if result.is_err() {
            // Keep the file ending on a whole frame.
            if let Ok(len) = before {
                let _ = self.file.set_len(len);
            }
        } else {
            self.since_checkpoint
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.dirty = true;
        }
        buf.clear();
        result
    }

    fn sync(&mut self) -> Result<(), JournalError> {
        if !self.dirty {
            return Ok(());
        }
        self.file.sync_data().map_err(io(&self.path))?;
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Replaces the journal with a file holding only `snapshot`.
    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<(), JournalError> {
        let tmp = temp_path(&self.path);
        let mut bytes = file_header().to_vec();
        put_frame(&mut bytes, KIND_CHECKPOINT, snapshot);
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        sync_parent(&self.path)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io(&self.path))?;
        self.dirty = false;
        self.since_checkpoint.store(0, Ordering::Relaxed);
        Ok(())
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
