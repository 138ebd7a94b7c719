//! The storage I/O seam: everything the log, the group journal, the queue registry and the
//! auth files do to files goes through [`Storage`] and [`StorageFile`].
//!
//! - [`disk`]: the real implementation (`std::fs` and `memmap2`).
//! - [`dir_lock`]: the lock that keeps a second server off a data directory in use.
//! - [`cache`]: a decorator that keeps a bounded set of the long-lived files open and
//!   reopens the others on use.
//! - [`lazy`]: files opened (or created, with their directory) on first use.
//! - [`maps`]: read-only maps of immutable files, mapped on first use; through a cache
//!   ([`CachedStorage`]) at most a configured number at once.
//! - [`sim`]: an in-memory implementation for tests that tracks which bytes and which
//!   directory entries are durable, can "crash" at the Nth sync (keeping only synced bytes
//!   plus an arbitrary prefix of the unsynced ones) and can fail chosen calls with EIO or
//!   ENOSPC.
//!
//! The seam is per file, not per record: a batch append is one [`StorageFile::append`], a
//! group commit one [`StorageFile::sync_data`], so the dynamic dispatch costs nothing on the
//! hot path. Errors are plain `std::io::Error`s; each caller wraps them in its own error
//! with the path it was working on.
//!
//! [`atomic_replace`] is the one copy of "temp file, write, fsync, rename, fsync dir".

pub mod cache;
pub mod dir_lock;
pub mod disk;
pub mod lazy;
pub mod maps;
pub mod sim;

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use bytes::Bytes;

pub use cache::CachedStorage;
pub use dir_lock::{DirLock, DirLockError};
pub use disk::Disk;
pub use lazy::{Known, deferred};
pub use maps::{MapCache, MappedFile};
pub use sim::SimDisk;

/// Suffix of the temp file [`atomic_replace`] writes before renaming it into place.
pub const TEMP_SUFFIX: &str = ".tmp";

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading only.
    Read,
    /// Created when missing, contents kept; reads anywhere, writes at the end.
    Append,
    /// Created, or emptied when it exists; writes at the end.
    Create,
    /// As [`OpenMode::Create`], readable and writable by its owner only (mode 0600).
    CreatePrivate,
    /// As [`OpenMode::Append`], for a file whose lost writes recovery repairs (a segment's
    /// indexes, rebuilt from the log when short or damaged): the file cache may close it
    /// with bytes not yet fsynced.
    AppendHint,
    /// An existing file, reads anywhere, writes at the end; never created (the file cache
    /// reopens a file it closed this way, so a removed file stays removed).
    Reopen,
}

/// An open file. Writes always go to the end of the file (`O_APPEND`), so a cut-back with
/// [`StorageFile::set_len`] followed by an append leaves no hole.
pub trait StorageFile: Send + Sync + Debug {
    /// Writes all of `bytes` at the end of the file; on error some prefix may be written.
    fn append(&self, bytes: &[u8]) -> io::Result<()>;
    /// Fills `buf` from `position` (positioned read; no shared cursor).
    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> io::Result<()>;
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's bytes durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// The file's current length.
    fn len(&self) -> io::Result<u64>;
    /// True when the file holds no byte.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// What storage does to files and directories. Implementations are cheap to share.
pub trait Storage: Send + Sync + Debug {
    /// Opens `path` in `mode`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>>;
    /// The whole of an immutable file, mapped read-only when the implementation can (small
    /// files may be read instead: a map costs more than a copy of a few pages). Only
    /// for files nobody writes or truncates in place while the map lives (sealed segments,
    /// their indexes).
    fn map(&self, path: &Path) -> io::Result<Bytes>;
    /// The whole content of `path` (a copy).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Renames `from` to `to`, replacing `to` (durable after [`Storage::sync_dir`]).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file (durable after [`Storage::sync_dir`]).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` (created, renamed, removed files) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates `dir` and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Removes `dir` and everything below it.
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The paths of the entries of `dir` (files and directories), in no particular order.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Whether directory `dir` exists. The default lists it; implementations answer
    /// without reading its entries.
    fn dir_exists(&self, dir: &Path) -> io::Result<bool> {
        match self.read_dir(dir) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
    /// The cache bounding the maps of this storage's [`MappedFile`]s, if it has one
    /// (without, a file stays mapped from its first use while its handle lives).
    fn map_cache(&self) -> Option<Arc<MapCache>> {
        None
    }
}

/// A shared storage handle.
pub type SharedStorage = Arc<dyn Storage>;

static DISK: LazyLock<SharedStorage> = LazyLock::new(|| Arc::new(Disk));

/// The real disk, shared.
pub fn disk() -> SharedStorage {
    Arc::clone(&DISK)
}

/// `path` with [`TEMP_SUFFIX`] appended.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TEMP_SUFFIX);
    PathBuf::from(name)
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Which file [`atomic_replace`] failed on, and how.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct ReplaceError {
    /// The temp file, the target or its directory.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Replaces `path` with `bytes` atomically and durably: writes `path.tmp` (mode 0600 when
/// `private`), fsyncs it, renames it over `path` and fsyncs the directory. A crash at any
/// point leaves either the old content or the new one under `path`, never a mix; a stray
/// temp file may remain, which readers ignore.
pub fn atomic_replace(
    storage: &dyn Storage,
    path: &Path,
    bytes: &[u8],
    private: bool,
) -> Result<(), ReplaceError> {
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReplaceError { path, source }
    };
    let tmp = temp_path(path);
    // A leftover temp file of an interrupted replace may have looser permissions than a new
    // one gets: start afresh.
    let _ = storage.remove(&tmp);
    let mode = if private {
        OpenMode::CreatePrivate
    } else {
        OpenMode::Create
    };
    let file = storage.open(&tmp, mode).map_err(at(&tmp))?;
    file.append(bytes).map_err(at(&tmp))?;
    file.sync_data().map_err(at(&tmp))?;
    drop(file);
    storage.rename(&tmp, path).map_err(at(path))?;
    let dir = parent_dir(path);
    storage.sync_dir(dir).map_err(at(dir))
}

/// Reads `path`; `None` when it does not exist.
pub fn read_if_exists(storage: &dyn Storage, path: &Path) -> io::Result<Option<Vec<u8>>> {
    match storage.read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replace_roundtrip(storage: &dyn Storage, dir: &Path) {
        let path = dir.join("state.json");
        atomic_replace(storage, &path, b"one", false).unwrap();
        atomic_replace(storage, &path, b"two", true).unwrap();
        assert_eq!(storage.read(&path).unwrap(), b"two");
        assert!(
            read_if_exists(storage, &temp_path(&path))
                .unwrap()
                .is_none()
        );
        assert!(
            read_if_exists(storage, &dir.join("missing"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn atomic_replace_on_disk_and_in_the_simulation() {
        let dir = tempfile::tempdir().unwrap();
        replace_roundtrip(&Disk, dir.path());
        let sim = SimDisk::new();
        sim.create_dir_all(Path::new("/d")).unwrap();
        replace_roundtrip(&sim, Path::new("/d"));
    }

    /// A crash at every sync point of a replace leaves the old or the new content whole.
    #[test]
    fn atomic_replace_survives_a_crash_at_every_sync() {
        let path = Path::new("/d/state.json");
        for crash_at in 1..=3 {
            for seed in 0..8 {
                let sim = SimDisk::new();
                sim.create_dir_all(Path::new("/d")).unwrap();
                atomic_replace(&sim, path, b"old content", false).unwrap();
                sim.crash_at_sync(sim.syncs() + crash_at, seed);
                let done = atomic_replace(&sim, path, b"new content!", false).is_ok();
                let image = sim.crash_image(seed);
                let after = SimDisk::restore(&image);
                let content = after.read(path).unwrap();
                if done {
                    assert_eq!(content, b"new content!");
                } else {
                    assert!(
                        content == b"old content" || content == b"new content!",
                        "crash {crash_at} seed {seed}: {content:?}"
                    );
                }
            }
        }
    }
}
