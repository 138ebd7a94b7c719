//! Snapshots of a queue group that carry the queue's data, kept in `raft/{group}/snapshot/`
//! next to the group's Raft log, and the one stream they travel in.
//!
//! A snapshot is a directory `snap-{index:020}-{nanos}/` holding a `manifest.json` (the last
//! applied log id, the membership, every file with its length and CRC-32) and `files/`, the
//! queue's data at the applied point: sealed segments and their indexes **hard-linked**
//! from the broker's data (they are never modified in place, so they are not stored twice),
//! the active segment hard-linked too but valid only up to the length the manifest names
//! (it is append-only; what follows belongs to later entries), and each group's state as a
//! journal file holding one checkpoint. The file `current` names the snapshot in use; it is
//! replaced by rename, so a crash leaves the old snapshot or the new one. A transfer in
//! progress, `receiving-{hex of the snapshot id}.pack` ([`receiving_pack`]), is kept on open
//! so that it resumes where it stopped ([`super::snapshot_transfer`]); anything else in the
//! directory is a leftover of an interrupted build or transfer and is removed on open.
//!
//! The stream ([`SnapshotData`]) is the snapshot packed into one byte sequence, read
//! straight from the files (never all in memory):
//!
//! ```text
//! "QSNP" | version u8 (1) | 3 reserved bytes | manifest_len u32 LE | manifest JSON | file bytes, in manifest order
//! ```
//!
//! A follower writes the chunks it receives to `receiving-{hex id}.pack` (see
//! [`super::snapshot_transfer`]; `incoming-{nanos}.pack` when an older leader sends
//! openraft's own chunks), checks it ([`verify_pack`]), then unpacks it, checking every
//! file's length and CRC again, into a new snapshot directory before it is made current and
//! swapped into the broker.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::types::{LogId, StoredMembership, TypeConfig};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::broker::queue::QueueImage;

/// Magic of the packed stream.
const MAGIC: &[u8; 4] = b"QSNP";
/// Version of the packed stream and of the manifest.
const VERSION: u8 = 1;
/// Bytes before the manifest in the packed stream.
const PACK_HEADER: usize = 12;
/// Largest manifest accepted (a queue of many thousands of segments stays far below).
const MAX_MANIFEST: u32 = 64 * 1024 * 1024;
/// The file naming the snapshot in use.
const CURRENT: &str = "current";
/// The manifest's name inside a snapshot directory.
const MANIFEST: &str = "manifest.json";
/// Bytes copied at a time.
const COPY_BUF: usize = 1024 * 1024;
/// The name of a snapshot being received starts so (see [`receiving_pack`]).
const RECEIVING: &str = "receiving-";
/// ... and ends so.
const PACK: &str = ".pack";
/// Longest snapshot id a transfer accepts (its file name holds it in hex).
pub const MAX_SNAPSHOT_ID: usize = 100;

/// Errors of snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot (stored or received) is malformed or damaged.
    #[error("snapshot {path}: {reason}")]
    Invalid {
        /// Where it was read from.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl SnapshotError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

impl From<SnapshotError> for std::io::Error {
    fn from(error: SnapshotError) -> Self {
        match error {
            SnapshotError::Io { source, .. } => source,
            invalid => std::io::Error::new(std::io::ErrorKind::InvalidData, invalid.to_string()),
        }
    }
}

/// How a file is put back into the broker's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// Never modified in place (sealed segments, their indexes): hard-linked.
    Immutable,
    /// Changes after the snapshot (the active segment, group journals): copied, up to its
    /// length.
    Copied,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the queue's directory (`{partition}/{file}` or `groups/{file}`).
    pub path: String,
    /// Bytes that belong to the snapshot.
    pub len: u64,
    /// CRC-32 of those bytes.
    pub crc: u32,
    /// How it goes back.
    pub kind: FileKind,
    /// The inode of the stored file (lets the next snapshot reuse the CRC); 0 in a stream.
    #[serde(default)]
    pub inode: u64,
}

/// What a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub version: u8,
    /// openraft's snapshot id.
    pub snapshot_id: String,
    /// The last log id applied into the data.
    pub last_log_id: Option<LogId>,
    /// The membership at that point.
    pub membership: StoredMembership,
    /// The queue's files (none for a group without data).
    pub files: Vec<FileEntry>,
    /// The metadata group's snapshot: its [`super::metadata::MetaImage`] (as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
}

impl Manifest {
    /// A manifest without files.
    pub fn bare(
        snapshot_id: String,
        last_log_id: Option<LogId>,
        membership: StoredMembership,
    ) -> Self {
        Self {
            version: VERSION,
            snapshot_id,
            last_log_id,
            membership,
            files: Vec::new(),
            meta: None,
        }
    }
}

/// A relative path from a manifest, checked: plain names only (no root, `..` or `.`), at
/// most three levels.
fn checked_relative(path: &str, origin: &Path) -> Result<PathBuf, SnapshotError> {
    let relative = Path::new(path);
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    let depth = relative.components().count();
    if !plain || depth == 0 || depth > 3 {
        return Err(SnapshotError::invalid(
            origin,
            format!("file path `{path}` is not a plain relative path"),
        ));
    }
    Ok(relative.to_path_buf())
}

/// The packed stream's header and manifest.
fn pack_head(manifest: &Manifest) -> Result<Vec<u8>, SnapshotError> {
    let mut stripped = manifest.clone();
    for file in &mut stripped.files {
        file.inode = 0;
    }
    let json = serde_json::to_vec(&stripped)
        .map_err(|e| SnapshotError::invalid(Path::new("manifest"), e.to_string()))?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|l| *l <= MAX_MANIFEST)
        .ok_or_else(|| SnapshotError::invalid(Path::new("manifest"), "too large"))?;
    let mut head = Vec::with_capacity(PACK_HEADER + json.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&[VERSION, 0, 0, 0]);
    head.extend_from_slice(&len.to_le_bytes());
    head.extend_from_slice(&json);
    Ok(head)
}

/// Reads the header and manifest of a packed stream.
fn read_head(reader: &mut impl Read, origin: &Path) -> Result<Manifest, SnapshotError> {
    let mut header = [0u8; PACK_HEADER];
    reader
        .read_exact(&mut header)
        .map_err(SnapshotError::io(origin))?;
    if &header[..4] != MAGIC || header[4] != VERSION {
        return Err(SnapshotError::invalid(
            origin,
            "not a qit snapshot (magic or version)",
        ));
    }
    let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if len > MAX_MANIFEST {
        return Err(SnapshotError::invalid(
            origin,
            format!("manifest of {len} bytes"),
        ));
    }
    let mut json = vec![0u8; len as usize];
    reader
        .read_exact(&mut json)
        .map_err(SnapshotError::io(origin))?;
    let manifest: Manifest = serde_json::from_slice(&json)
        .map_err(|e| SnapshotError::invalid(origin, format!("manifest: {e}")))?;
    if manifest.version != VERSION {
        return Err(SnapshotError::invalid(origin, "manifest version"));
    }
    for file in &manifest.files {
        checked_relative(&file.path, origin)?;
    }
    Ok(manifest)
}

/// Packs a manifest without files into bytes (groups without data).
pub fn pack_bare(manifest: &Manifest) -> Result<Vec<u8>, SnapshotError> {
    pack_head(manifest)
}

/// Reads a packed stream that must hold no files (groups without data).
pub fn unpack_bare(reader: &mut impl Read) -> Result<Manifest, SnapshotError> {
    let origin = Path::new("stream");
    let manifest = read_head(reader, origin)?;
    if !manifest.files.is_empty() {
        return Err(SnapshotError::invalid(
            origin,
            "a group without data got files",
        ));
    }
    Ok(manifest)
}

/// The file in snapshot directory `dir` that receives the snapshot `snapshot_id`: its
/// bytes in hex (the id is a peer's input: so no name can leave the directory or collide
/// with another id's); `None` for an empty id or one longer than [`MAX_SNAPSHOT_ID`].
pub fn receiving_pack(dir: &Path, snapshot_id: &str) -> Option<PathBuf> {
    if snapshot_id.is_empty() || snapshot_id.len() > MAX_SNAPSHOT_ID {
        return None;
    }
    let hex: String = snapshot_id.bytes().map(|b| format!("{b:02x}")).collect();
    Some(dir.join(format!("{RECEIVING}{hex}{PACK}")))
}

/// True for the name of a snapshot being received (any id).
pub fn is_receiving_pack(name: &str) -> bool {
    name.strip_prefix(RECEIVING)
        .and_then(|rest| rest.strip_suffix(PACK))
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Checks a received packed stream without writing anything: its manifest names
/// `snapshot_id` and covers `expected`, every path is plain, every file's bytes match their
/// length and CRC, and nothing follows the last file. The manifest when it holds.
pub fn verify_pack(
    reader: &mut impl Read,
    snapshot_id: &str,
    expected: Option<LogId>,
) -> Result<Manifest, SnapshotError> {
    let origin = Path::new("received snapshot");
    let manifest = read_head(reader, origin)?;
    if manifest.snapshot_id != snapshot_id || manifest.last_log_id != expected {
        return Err(SnapshotError::invalid(
            origin,
            format!(
                "holds {} covering {:?}, announced as {snapshot_id} covering {:?}",
                manifest.snapshot_id, manifest.last_log_id, expected
            ),
        ));
    }
    let mut buf = vec![0u8; COPY_BUF];
    for entry in &manifest.files {
        let mut hasher = crc32fast::Hasher::new();
        let mut left = entry.len;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(COPY_BUF).min(COPY_BUF);
            let n = reader
                .read(&mut buf[..want])
                .map_err(SnapshotError::io(origin))?;
            if n == 0 {
                return Err(SnapshotError::invalid(
                    origin,
                    format!("ends within {}", entry.path),
                ));
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        let crc = hasher.finalize();
        if crc != entry.crc {
            return Err(SnapshotError::invalid(
                origin,
                format!(
                    "{}: CRC {crc:08x}, the manifest says {:08x}",
                    entry.path, entry.crc
                ),
            ));
        }
    }
    if reader
        .read(&mut buf[..1])
        .map_err(SnapshotError::io(origin))?
        != 0
    {
        return Err(SnapshotError::invalid(origin, "bytes after the last file"));
    }
    Ok(manifest)
}

/// CRC-32 of `path`'s bytes `[from, to)`, continuing `init` (the CRC of `[0, from)`).
fn crc_range(path: &Path, init: u32, from: u64, to: u64) -> Result<u32, SnapshotError> {
    let file = File::open(path).map_err(SnapshotError::io(path))?;
    let mut hasher = crc32fast::Hasher::new_with_initial(init);
    let mut buf = vec![0u8; COPY_BUF];
    let mut pos = from;
    while pos < to {
        let want = usize::try_from(to - pos).unwrap_or(COPY_BUF).min(COPY_BUF);
        let n = file
            .read_at(&mut buf[..want], pos)
            .map_err(SnapshotError::io(path))?;
        if n == 0 {
            return Err(SnapshotError::invalid(
                path,
                format!("shorter than the {to} bytes the snapshot names"),
            ));
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hasher.finalize())
}

/// Copies `len` bytes from `from` to a new file `to` (synced if `sync`), returning their
/// CRC.
fn copy_prefix(
    from: &mut impl Read,
    to: &Path,
    len: u64,
    sync: bool,
) -> Result<u32, SnapshotError> {
    let mut out = File::create(to).map_err(SnapshotError::io(to))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; COPY_BUF];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(COPY_BUF).min(COPY_BUF);
        let n = from.read(&mut buf[..want]).map_err(SnapshotError::io(to))?;
        if n == 0 {
            return Err(SnapshotError::invalid(to, "the source ended early"));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(SnapshotError::io(to))?;
        left -= n as u64;
    }
    if sync {
        out.sync_data().map_err(SnapshotError::io(to))?;
    }
    Ok(hasher.finalize())
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SnapshotError::io(dir))
}

/// A new snapshot's id: `{index}-{built}-{nanos}`, the last applied index, the builds of
/// this process so far and the clock (so that two nodes', or two runs', snapshots at one
/// index never share an id: a transfer resumes by id).
pub fn snapshot_id(index: u64, built: u64) -> String {
    format!("{index}-{built}-{}", unique())
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A snapshot in use: its directory and manifest.
#[derive(Debug, Clone)]
pub struct Stored {
    /// `snap-*` directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Stored {
    fn file(&self, entry: &FileEntry) -> PathBuf {
        self.dir.join("files").join(&entry.path)
    }

    /// The packed stream of this snapshot.
    pub fn reader(&self) -> Result<PackReader, SnapshotError> {
        let head = pack_head(&self.manifest)?;
        let mut parts = vec![Part::Bytes(head)];
        for entry in &self.manifest.files {
            parts.push(Part::File {
                path: self.file(entry),
                len: entry.len,
            });
        }
        Ok(PackReader::new(parts))
    }

    /// Writes this snapshot's files into an empty queue directory `dir`: immutable ones
    /// hard-linked, the others copied up to their length and checked against their CRC.
    pub fn restore_into(&self, dir: &Path) -> Result<(), SnapshotError> {
        self.restore_files(dir, false)
    }

    /// [`Self::restore_into`], every copied file synced (records that are a Raft group's
    /// log, which no start rebuilds: see `cluster::group_log`); linked files are a
    /// snapshot's, synced when it was made. The caller syncs the directories.
    pub fn restore_durably(&self, dir: &Path) -> Result<(), SnapshotError> {
        self.restore_files(dir, true)
    }

    fn restore_files(&self, dir: &Path, durable: bool) -> Result<(), SnapshotError> {
        for entry in &self.manifest.files {
            let relative = checked_relative(&entry.path, &self.dir)?;
            let (from, to) = (self.file(entry), dir.join(&relative));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(SnapshotError::io(parent))?;
            }
            let linked =
                entry.kind == FileKind::Immutable && std::fs::hard_link(&from, &to).is_ok();
            if linked {
                continue;
            }
            let mut source = File::open(&from).map_err(SnapshotError::io(&from))?;
            // Not synced unless asked: the broker's data of a cluster node is rebuilt at
            // every start.
            let crc = copy_prefix(&mut source, &to, entry.len, durable)?;
            if crc != entry.crc {
                return Err(SnapshotError::invalid(&from, "CRC mismatch"));
            }
        }
        Ok(())
    }
}

/// A snapshot being built: the files are linked, the CRCs and the manifest are still to do.
#[derive(Debug)]
pub struct Captured {
    dir: PathBuf,
    manifest: Manifest,
}

/// The snapshot directory of one group (cheap to clone).
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
    current: Arc<Mutex<Option<Stored>>>,
}

impl SnapshotDir {
    /// Opens `dir` (created if needed): loads the current snapshot and removes leftovers.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(SnapshotError::io(dir))?;
        let current = match std::fs::read_to_string(dir.join(CURRENT)) {
            Ok(name) => Some(Self::load(&dir.join(name.trim()))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(SnapshotError::io(&dir.join(CURRENT))(e)),
        };
        let me = Self {
            dir: dir.to_path_buf(),
            current: Arc::new(Mutex::new(current)),
        };
        me.remove_others()?;
        Ok(me)
    }

    fn load(dir: &Path) -> Result<Stored, SnapshotError> {
        let path = dir.join(MANIFEST);
        let bytes = std::fs::read(&path).map_err(SnapshotError::io(&path))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| SnapshotError::invalid(&path, e.to_string()))?;
        for file in &manifest.files {
            checked_relative(&file.path, &path)?;
        }
        Ok(Stored {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// Removes everything but `current`, the snapshot it names and a snapshot being
    /// received (its transfer resumes).
    fn remove_others(&self) -> Result<(), SnapshotError> {
        let keep = self.current.lock().as_ref().map(|s| s.dir.clone());
        let entries = std::fs::read_dir(&self.dir).map_err(SnapshotError::io(&self.dir))?;
        for entry in entries {
            let path = entry.map_err(SnapshotError::io(&self.dir))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if Some(&path) == keep.as_ref()
                || name == CURRENT
                || (is_receiving_pack(&name) && path.is_file())
            {
                continue;
            }
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(error) = removed {
                tracing::warn!(path = %path.display(), %error, "cannot remove an old snapshot");
            }
        }
        Ok(())
    }

    /// The snapshot in use.
    pub fn current(&self) -> Option<Stored> {
        self.current.lock().clone()
    }

    fn new_dir(&self, prefix: &str, index: u64) -> PathBuf {
        self.dir.join(format!("{prefix}-{index:020}-{}", unique()))
    }

    /// Links `image`'s files into a new build directory (call between two applies: the
    /// links pin the data of this instant; see the module docs).
    pub fn capture(
        &self,
        image: &QueueImage,
        manifest: Manifest,
    ) -> Result<Captured, SnapshotError> {
        let index = manifest.last_log_id.map_or(0, |l| l.index);
        let dir = self.new_dir("build", index);
        let files = dir.join("files");
        let mut manifest = manifest;
        for file in &image.files {
            let to = files.join(&file.relative);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(SnapshotError::io(parent))?;
            }
            match std::fs::hard_link(&file.path, &to) {
                Ok(()) => {}
                // Retention removed an old sealed segment meanwhile: the data starts later.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.immutable => continue,
                Err(e) => return Err(SnapshotError::io(&file.path)(e)),
            }
            let path = file.relative.to_string_lossy().into_owned();
            manifest.files.push(FileEntry {
                path,
                len: file.len,
                crc: 0,
                kind: if file.immutable {
                    FileKind::Immutable
                } else {
                    FileKind::Copied
                },
                inode: 0,
            });
        }
        for (relative, bytes) in &image.journals {
            let to = files.join(relative);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(SnapshotError::io(parent))?;
            }
            std::fs::write(&to, bytes).map_err(SnapshotError::io(&to))?;
            manifest.files.push(FileEntry {
                path: relative.to_string_lossy().into_owned(),
                len: bytes.len() as u64,
                crc: crc32fast::hash(bytes),
                kind: FileKind::Copied,
                inode: 0,
            });
        }
        Ok(Captured { dir, manifest })
    }

    /// Completes a captured snapshot: CRCs (reused from the current snapshot for files it
    /// shares), the manifest, fsyncs; then makes it current, unless a newer one is (an
    /// install finished meanwhile): that one is returned instead.
    pub fn finish(&self, captured: Captured) -> Result<Stored, SnapshotError> {
        let Captured { dir, mut manifest } = captured;
        let known: HashMap<u64, (u64, u32)> = self
            .current()
            .map(|s| {
                s.manifest
                    .files
                    .iter()
                    .filter(|f| f.inode != 0)
                    .map(|f| (f.inode, (f.len, f.crc)))
                    .collect()
            })
            .unwrap_or_default();
        let mut dirs = std::collections::BTreeSet::new();
        for entry in &mut manifest.files {
            let path = dir.join("files").join(&entry.path);
            let meta = std::fs::metadata(&path).map_err(SnapshotError::io(&path))?;
            entry.inode = meta.ino();
            // Group journals were written with their CRC; segments get theirs here.
            let journal = entry.path.starts_with("groups/");
            if !journal {
                entry.crc = match known.get(&entry.inode) {
                    Some((len, crc)) if *len == entry.len => *crc,
                    Some((len, crc)) if *len < entry.len && entry.kind == FileKind::Copied => {
                        crc_range(&path, *crc, *len, entry.len)?
                    }
                    _ => crc_range(&path, 0, 0, entry.len)?,
                };
            }
            if entry.kind == FileKind::Copied {
                // The linked active segment (its bytes up to `len`) and the journals.
                File::open(&path)
                    .and_then(|f| f.sync_data())
                    .map_err(SnapshotError::io(&path))?;
            }
            if let Some(parent) = path.parent() {
                dirs.insert(parent.to_path_buf());
            }
        }
        for synced in &dirs {
            sync_dir(synced)?;
        }
        self.commit(dir, manifest)
    }

    /// Writes the manifest into `dir`, syncs it and makes it the current snapshot (unless
    /// the current one is newer: a build that finished after an install is dropped).
    fn commit(&self, dir: PathBuf, manifest: Manifest) -> Result<Stored, SnapshotError> {
        let path = dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| SnapshotError::invalid(&path, e.to_string()))?;
        let mut file = File::create(&path).map_err(SnapshotError::io(&path))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(SnapshotError::io(&path))?;
        sync_dir(&dir)?;
        let index = manifest.last_log_id.map_or(0, |l| l.index);
        let final_dir = self.new_dir("snap", index);
        std::fs::rename(&dir, &final_dir).map_err(SnapshotError::io(&dir))?;
        let stored = Stored {
            dir: final_dir,
            manifest,
        };
        let mut current = self.current.lock();
        if let Some(newer) = current
            .as_ref()
            .filter(|c| c.manifest.last_log_id > stored.manifest.last_log_id)
            .cloned()
        {
            drop(current);
            let _ = std::fs::remove_dir_all(&stored.dir);
            return Ok(newer);
        }
        let name = stored
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = self.dir.join(format!("{CURRENT}.tmp"));
        std::fs::write(&tmp, name.as_bytes())
            .and_then(|()| File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(CURRENT)))
            .map_err(SnapshotError::io(&tmp))?;
        sync_dir(&self.dir)?;
        let old = current.replace(stored.clone());
        drop(current);
        if let Some(old) = old
            && let Err(error) = std::fs::remove_dir_all(&old.dir)
        {
            tracing::warn!(path = %old.dir.display(), %error, "cannot remove an old snapshot");
        }
        Ok(stored)
    }

    /// A new file for a snapshot being received.
    pub fn incoming(&self) -> PathBuf {
        self.dir.join(format!("incoming-{}.pack", unique()))
    }

    /// Unpacks a received stream into a new snapshot, checking every file's length and
    /// CRC, and makes it current. `expected` is the log id openraft says it covers.
    pub fn unpack(
        &self,
        reader: &mut impl Read,
        expected: Option<LogId>,
    ) -> Result<Stored, SnapshotError> {
        let origin = self.dir.join("incoming");
        let mut manifest = read_head(reader, &origin)?;
        if manifest.last_log_id != expected {
            return Err(SnapshotError::invalid(
                &origin,
                format!(
                    "covers {:?}, announced as {:?}",
                    manifest.last_log_id, expected
                ),
            ));
        }
        let dir = self.new_dir("build", expected.map_or(0, |l| l.index));
        let unpacked = self.unpack_files(reader, &dir, &mut manifest);
        if let Err(error) = unpacked {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(error);
        }
        let mut rest = [0u8; 1];
        if reader.read(&mut rest).map_err(SnapshotError::io(&origin))? != 0 {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(SnapshotError::invalid(&origin, "bytes after the last file"));
        }
        self.commit(dir, manifest)
    }

    fn unpack_files(
        &self,
        reader: &mut impl Read,
        dir: &Path,
        manifest: &mut Manifest,
    ) -> Result<(), SnapshotError> {
        let files = dir.join("files");
        std::fs::create_dir_all(&files).map_err(SnapshotError::io(&files))?;
        for entry in &mut manifest.files {
            let to = files.join(checked_relative(&entry.path, dir)?);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(SnapshotError::io(parent))?;
            }
            let crc = copy_prefix(reader, &to, entry.len, true)?;
            if crc != entry.crc {
                return Err(SnapshotError::invalid(
                    &to,
                    format!("CRC {crc:08x}, the manifest says {:08x}", entry.crc),
                ));
            }
            entry.inode = std::fs::metadata(&to)
                .map_err(SnapshotError::io(&to))?
                .ino();
        }
        sync_dir(&files)
    }
}

/// One part of a packed stream.
#[derive(Debug)]
enum Part {
    /// Bytes in memory (the header and manifest).
    Bytes(Vec<u8>),
    /// The first `len` bytes of a file.
    File { path: PathBuf, len: u64 },
}

impl Part {
    fn len(&self) -> u64 {
        match self {
            Part::Bytes(b) => b.len() as u64,
            Part::File { len, .. } => *len,
        }
    }
}

/// Reads a packed stream from its parts (blocking reads of at most the caller's buffer;
/// files are opened as the position reaches them).
#[derive(Debug)]
pub struct PackReader {
    parts: Vec<Part>,
    /// Start of each part in the stream.
    starts: Vec<u64>,
    total: u64,
    pos: u64,
    open: Option<(usize, File)>,
}

impl PackReader {
    fn new(parts: Vec<Part>) -> Self {
        let mut starts = Vec::with_capacity(parts.len());
        let mut total = 0;
        for part in &parts {
            starts.push(total);
            total += part.len();
        }
        Self {
            parts,
            starts,
            total,
            pos: 0,
            open: None,
        }
    }

    /// Bytes of the whole stream.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// True for an empty stream.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

impl Read for PackReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.total || buf.is_empty() {
            return Ok(0);
        }
        let at = self
            .starts
            .partition_point(|s| *s <= self.pos)
            .saturating_sub(1);
        let (Some(part), Some(start)) = (self.parts.get(at), self.starts.get(at)) else {
            return Ok(0);
        };
        let within = self.pos - start;
        let left = part.len() - within;
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = match part {
            Part::Bytes(bytes) => {
                let from = usize::try_from(within).unwrap_or(usize::MAX);
                let src = bytes.get(from..from + want).unwrap_or_default();
                buf[..src.len()].copy_from_slice(src);
                src.len()
            }
            Part::File { path, .. } => {
                if self.open.as_ref().is_none_or(|(i, _)| *i != at) {
                    self.open = Some((at, File::open(path)?));
                }
                let Some((_, file)) = &self.open else {
                    return Ok(0);
                };
                let n = file.read_at(&mut buf[..want], within)?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} is shorter than the snapshot says", path.display()),
                    ));
                }
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PackReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.total.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        self.pos = target;
        Ok(target)
    }
}

/// A snapshot: its meta and its data.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// The snapshot data openraft moves: a packed stream read from the files, a received
/// stream being written to a file, or bytes in memory (groups without data); and the id of
/// the snapshot (its manifest's), which names a transfer of exactly these bytes (openraft
/// 0.10's snapshot meta carries no id).
#[derive(Debug)]
pub struct SnapshotData {
    id: String,
    data: Data,
}

#[derive(Debug)]
enum Data {
    Memory(Cursor<Vec<u8>>),
    Pack(PackReader),
    Receiving {
        file: tokio::fs::File,
        path: PathBuf,
    },
}

impl SnapshotData {
    /// Snapshot `id`'s bytes in memory.
    pub fn memory(id: &str, bytes: Vec<u8>) -> Self {
        Self::new(id, Data::Memory(Cursor::new(bytes)))
    }

    /// A stored snapshot's packed stream.
    pub fn pack(id: &str, reader: PackReader) -> Self {
        Self::new(id, Data::Pack(reader))
    }

    fn new(id: &str, data: Data) -> Self {
        Self {
            id: id.to_string(),
            data,
        }
    }

    /// The snapshot's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Snapshot `id`'s received stream: the file at `path`, as it is (not truncated).
    pub async fn received(id: &str, path: PathBuf) -> std::io::Result<Self> {
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .await?;
        Ok(Self::new(id, Data::Receiving { file, path }))
    }

    /// A blocking reader of the whole stream from its start, and the received file to
    /// remove once it is read (if any).
    pub fn into_reader(self) -> std::io::Result<(Box<dyn Read + Send>, Option<PathBuf>)> {
        match self.data {
            Data::Memory(mut cursor) => {
                cursor.set_position(0);
                Ok((Box::new(cursor), None))
            }
            Data::Pack(mut pack) => {
                pack.seek(SeekFrom::Start(0))?;
                Ok((Box::new(pack), None))
            }
            Data::Receiving { path, file } => {
                drop(file);
                let reader = std::io::BufReader::with_capacity(COPY_BUF, File::open(&path)?);
                Ok((Box::new(reader), Some(path)))
            }
        }
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().data {
            Data::Memory(cursor) => Pin::new(cursor).poll_read(cx, buf),
            // Blocking, bounded by the caller's buffer (one chunk of a snapshot transfer).
            Data::Pack(pack) => {
                let n = pack.read(buf.initialize_unfilled())?;
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Data::Receiving { file, .. } => Pin::new(file).poll_read(cx, buf),
        }
    }
}

fn read_only() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "a stored snapshot is read-only",
    )
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().data {
            Data::Memory(cursor) => Pin::new(cursor).poll_write(cx, buf),
            Data::Pack(_) => Poll::Ready(Err(read_only())),
            Data::Receiving { file, .. } => Pin::new(file).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().data {
            Data::Memory(cursor) => Pin::new(cursor).poll_flush(cx),
            Data::Pack(_) => Poll::Ready(Ok(())),
            Data::Receiving { file, .. } => Pin::new(file).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().data {
            Data::Memory(cursor) => Pin::new(cursor).poll_shutdown(cx),
            Data::Pack(_) => Poll::Ready(Ok(())),
            Data::Receiving { file, .. } => Pin::new(file).poll_shutdown(cx),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        match &mut self.get_mut().data {
            Data::Memory(cursor) => Pin::new(cursor).start_seek(position),
            Data::Pack(pack) => pack.seek(position).map(|_| ()),
            Data::Receiving { file, .. } => Pin::new(file).start_seek(position),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        match &mut self.get_mut().data {
            Data::Memory(cursor) => Pin::new(cursor).poll_complete(cx),
            Data::Pack(pack) => Poll::Ready(Ok(pack.pos)),
            Data::Receiving { file, .. } => Pin::new(file).poll_complete(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::queue::ImageFile;
    use proptest::prelude::*;

    fn log_id(index: u64) -> Option<LogId> {
        Some(crate::cluster::types::log_id(2, 1, index))
    }

    /// A queue directory: a sealed segment with an index, an active one with `active`
    /// bytes (the image names only the first 50).
    fn queue_dir(root: &Path, active: usize) -> QueueImage {
        let dir = root.join("queue");
        std::fs::create_dir_all(dir.join("0")).unwrap();
        let sealed: Vec<u8> = (0..100u8).collect();
        std::fs::write(dir.join("0/00.log"), &sealed).unwrap();
        std::fs::write(dir.join("0/00.index"), [1u8; 8]).unwrap();
        std::fs::write(dir.join("0/01.log"), vec![7u8; active]).unwrap();
        let file = |name: &str, len: u64, immutable: bool| ImageFile {
            relative: PathBuf::from("0").join(name),
            path: dir.join("0").join(name),
            len,
            immutable,
        };
        QueueImage {
            files: vec![
                file("00.log", 100, true),
                file("00.index", 8, true),
                file("01.log", 50, false),
            ],
            journals: vec![(PathBuf::from("groups/default.journal"), b"journal".to_vec())],
        }
    }

    fn build(store: &SnapshotDir, image: &QueueImage, index: u64) -> Stored {
        let manifest = Manifest::bare(
            format!("s{index}"),
            log_id(index),
            StoredMembership::default(),
        );
        let captured = store.capture(image, manifest).unwrap();
        store.finish(captured).unwrap()
    }

    fn packed(stored: &Stored) -> Vec<u8> {
        let mut bytes = Vec::new();
        stored.reader().unwrap().read_to_end(&mut bytes).unwrap();
        bytes
    }

    /// Built, packed, unpacked on another node and restored: the queue's files come back
    /// exactly, the active segment cut at the length the snapshot names; sealed files are
    /// links, not copies.
    #[test]
    fn a_snapshot_travels_and_restores() {
        let temp = tempfile::tempdir().unwrap();
        let image = queue_dir(temp.path(), 80);
        let leader = SnapshotDir::open(&temp.path().join("leader")).unwrap();
        let stored = build(&leader, &image, 7);
        let sealed = temp.path().join("queue/0/00.log");
        let linked = stored.dir.join("files/0/00.log");
        assert_eq!(
            std::fs::metadata(&sealed).unwrap().ino(),
            std::fs::metadata(&linked).unwrap().ino()
        );
        let bytes = packed(&stored);
        assert_eq!(bytes.len() as u64, stored.reader().unwrap().len());

        let follower = SnapshotDir::open(&temp.path().join("follower")).unwrap();
        let got = follower.unpack(&mut bytes.as_slice(), log_id(7)).unwrap();
        assert_eq!(got.manifest.last_log_id, log_id(7));
        let restored = temp.path().join("restored");
        got.restore_into(&restored).unwrap();
        assert_eq!(
            std::fs::read(restored.join("0/00.log")).unwrap(),
            (0..100u8).collect::<Vec<_>>()
        );
        assert_eq!(
            std::fs::read(restored.join("0/01.log")).unwrap(),
            vec![7u8; 50]
        );
        assert_eq!(
            std::fs::read(restored.join("groups/default.journal")).unwrap(),
            b"journal"
        );
        // Reopened, the follower's directory names the same snapshot.
        let reopened = SnapshotDir::open(&temp.path().join("follower")).unwrap();
        assert_eq!(reopened.current().map(|s| s.manifest), Some(got.manifest));
    }

    /// The next snapshot reuses the CRCs of shared files and extends the active segment's;
    /// they equal CRCs computed from scratch. The previous snapshot is removed.
    #[test]
    fn crcs_carry_over_between_snapshots() {
        let temp = tempfile::tempdir().unwrap();
        let mut image = queue_dir(temp.path(), 80);
        let store = SnapshotDir::open(&temp.path().join("snap")).unwrap();
        let first = build(&store, &image, 7);
        image.files[2].len = 80;
        let second = build(&store, &image, 9);
        assert!(!first.dir.exists());
        for entry in &second.manifest.files {
            let whole = crc_range(&second.file(entry), 0, 0, entry.len).unwrap();
            assert_eq!(entry.crc, whole, "{}", entry.path);
        }
        // An older build finishing late does not replace a newer snapshot.
        let late = build(&store, &image, 8);
        assert_eq!(late.manifest.last_log_id, log_id(9));
        assert_eq!(store.current().unwrap().manifest.last_log_id, log_id(9));
    }

    /// A damaged byte, a wrong log id, a path leaving the directory or trailing bytes are
    /// refused, and leave no snapshot behind.
    #[test]
    fn bad_streams_are_refused() {
        let temp = tempfile::tempdir().unwrap();
        let image = queue_dir(temp.path(), 80);
        let leader = SnapshotDir::open(&temp.path().join("leader")).unwrap();
        let bytes = packed(&build(&leader, &image, 7));
        let follower = SnapshotDir::open(&temp.path().join("follower")).unwrap();

        let mut damaged = bytes.clone();
        let last = damaged.len() - 10;
        damaged[last] ^= 0x40;
        let error = follower
            .unpack(&mut damaged.as_slice(), log_id(7))
            .unwrap_err();
        assert!(error.to_string().contains("CRC"), "{error}");
        assert!(follower.unpack(&mut bytes.as_slice(), log_id(8)).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(
            follower
                .unpack(&mut trailing.as_slice(), log_id(7))
                .is_err()
        );

        let mut manifest = leader.current().unwrap().manifest;
        manifest.files[0].path = "../../etc/passwd".into();
        let head = pack_head(&manifest).unwrap();
        let error = follower
            .unpack(&mut head.as_slice(), log_id(7))
            .unwrap_err();
        assert!(error.to_string().contains("plain relative path"), "{error}");

        assert!(follower.current().is_none());
        assert_eq!(
            std::fs::read_dir(temp.path().join("follower"))
                .unwrap()
                .count(),
            0
        );
    }

    /// A received stream is checked without writing anything: the sound one passes, a
    /// damaged byte, another id or log id, a cut or trailing bytes do not.
    #[test]
    fn received_streams_are_verified() {
        let temp = tempfile::tempdir().unwrap();
        let image = queue_dir(temp.path(), 80);
        let leader = SnapshotDir::open(&temp.path().join("leader")).unwrap();
        let stored = build(&leader, &image, 7);
        let id = stored.manifest.snapshot_id.clone();
        let bytes = packed(&stored);
        let manifest = verify_pack(&mut bytes.as_slice(), &id, log_id(7)).unwrap();
        assert_eq!(manifest.files.len(), stored.manifest.files.len());
        let mut damaged = bytes.clone();
        let last = damaged.len() - 3;
        damaged[last] ^= 1;
        let error = verify_pack(&mut damaged.as_slice(), &id, log_id(7)).unwrap_err();
        assert!(error.to_string().contains("CRC"), "{error}");
        assert!(verify_pack(&mut bytes.as_slice(), "other", log_id(7)).is_err());
        assert!(verify_pack(&mut bytes.as_slice(), &id, log_id(8)).is_err());
        assert!(verify_pack(&mut &bytes[..bytes.len() - 1], &id, log_id(7)).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(verify_pack(&mut trailing.as_slice(), &id, log_id(7)).is_err());
    }

    /// A packed stream read through seeks (as openraft sends chunks) is the same stream.
    #[test]
    fn seeking_reads_the_same_bytes() {
        let temp = tempfile::tempdir().unwrap();
        let image = queue_dir(temp.path(), 80);
        let store = SnapshotDir::open(&temp.path().join("snap")).unwrap();
        let stored = build(&store, &image, 3);
        let whole = packed(&stored);
        let mut reader = stored.reader().unwrap();
        let mut chunks = Vec::new();
        let mut offset = 0u64;
        while offset < reader.len() {
            reader.seek(SeekFrom::Start(offset)).unwrap();
            let mut buf = vec![0u8; 37];
            let n = reader.read(&mut buf).unwrap();
            assert!(n > 0);
            chunks.extend_from_slice(&buf[..n]);
            offset += n as u64;
        }
        assert_eq!(chunks, whole);
        assert_eq!(reader.seek(SeekFrom::End(0)).unwrap(), whole.len() as u64);
    }

    proptest! {
        /// Garbage never panics the unpacking, and is never accepted.
        #[test]
        fn unpacking_garbage_fails_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let temp = tempfile::tempdir().unwrap();
            let store = SnapshotDir::open(temp.path()).unwrap();
            prop_assert!(store.unpack(&mut bytes.as_slice(), log_id(1)).is_err());
            prop_assert!(unpack_bare(&mut bytes.as_slice()).is_err());
        }
    }
}
