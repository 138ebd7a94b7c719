//! Files opened on first use: [`deferred`] gives a [`StorageFile`] that opens its file only
//! when it is needed, so that a queue nobody has written to costs no directory, no file and
//! no descriptor, and a restarted idle partition no `open` of its active files.
//!
//! A file known to be **absent** reads as empty and syncs as a no-op until the first change
//! (an append, or a `set_len` to a non-zero length), which creates its directory and the
//! file (with the mode given, which must create). A file known to be **present** opens on
//! the first operation that needs its bytes; a `sync_data` before that has nothing of ours
//! to sync. The file's own directory entry stays with the caller (the log and the journal
//! fsync the file's directory with their first fsync, as they do for a file created
//! eagerly); the directories the first change created above it (a new queue's
//! `queues/{q}`, say) are made durable by the first `sync_data` after it, which syncs the
//! directory holding each of them.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::{OpenMode, SharedStorage, StorageFile, parent_dir};

/// What is known of a deferred file when it is handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// The file does not exist (nor, perhaps, its directory): created by the first change.
    Absent,
    /// The file exists: opened by the first operation that needs it.
    Present,
}

/// A file opened (and, when [`Known::Absent`], created) on first use.
pub fn deferred(
    storage: SharedStorage,
    path: &Path,
    mode: OpenMode,
    known: Known,
) -> Arc<dyn StorageFile> {
    Arc::new(LazyFile {
        storage,
        path: path.to_path_buf(),
        mode,
        known,
        file: OnceLock::new(),
        opening: Mutex::new(()),
        created_dirs: Mutex::new(Vec::new()),
    })
}

/// See [`deferred`].
struct LazyFile {
    storage: SharedStorage,
    path: PathBuf,
    mode: OpenMode,
    known: Known,
    /// The open file, once opened.
    file: OnceLock<Arc<dyn StorageFile>>,
    /// Serializes the first open.
    opening: Mutex<()>,
    /// Directories the first change created, whose entries the next `sync_data` makes
    /// durable (by syncing the directory that holds each).
    created_dirs: Mutex<Vec<PathBuf>>,
}

impl fmt::Debug for LazyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyFile")
            .field("path", &self.path)
            .field("known", &self.known)
            .field("opened", &self.file.get().is_some())
            .finish()
    }
}

impl LazyFile {
    /// The open file, opening (or creating, with its directory) it now if needed.
    fn file(&self) -> io::Result<&Arc<dyn StorageFile>> {
        if let Some(file) = self.file.get() {
            return Ok(file);
        }
        let _opening = self.opening.lock();
        if let Some(file) = self.file.get() {
            return Ok(file);
        }
        if self.known == Known::Absent {
            let dir = parent_dir(&self.path);
            let missing = self.missing_dirs(dir)?;
            self.storage.create_dir_all(dir)?;
            self.created_dirs.lock().extend(missing);
        }
        let file = self.storage.open(&self.path, self.mode)?;
        Ok(self.file.get_or_init(|| file))
    }

    /// `dir` and those of its ancestors that do not exist yet, deepest first.
    fn missing_dirs(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut missing = Vec::new();
        let mut at = dir;
        while !self.storage.dir_exists(at)? {
            missing.push(at.to_path_buf());
            match at.parent() {
                Some(up) if !up.as_os_str().is_empty() => at = up,
                _ => break,
            }
        }
        Ok(missing)
    }

    /// Makes the entries of the directories the first change created durable.
    fn sync_created_dirs(&self) -> io::Result<()> {
        let mut created = self.created_dirs.lock();
        while let Some(dir) = created.first() {
            self.storage.sync_dir(parent_dir(dir))?;
            created.remove(0);
        }
        Ok(())
    }

    /// True while the file is known absent and not created yet: it holds no byte.
    fn unborn(&self) -> bool {
        self.known == Known::Absent && self.file.get().is_none()
    }
}

impl StorageFile for LazyFile {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        self.file()?.append(bytes)
    }

    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        if self.unborn() {
            return if buf.is_empty() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} at {position}: the file holds no byte",
                        self.path.display()
                    ),
                ))
            };
        }
        self.file()?.read_exact_at(buf, position)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == 0 && self.unborn() {
            return Ok(());
        }
        self.file()?.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        // Nothing was written through a file never opened: nothing of ours to sync.
        match self.file.get() {
            Some(file) => {
                file.sync_data()?;
                self.sync_created_dirs()
            }
            None => Ok(()),
        }
    }

    fn len(&self) -> io::Result<u64> {
        if self.unborn() {
            return Ok(0);
        }
        self.file()?.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{SimDisk, Storage};

    #[test]
    fn an_absent_file_is_created_with_its_directory_by_the_first_append_only() {
        let sim = SimDisk::new();
        let storage: SharedStorage = Arc::new(sim.clone());
        let path = Path::new("/data/q/0/00000000000000000000.log");
        let file = deferred(Arc::clone(&storage), path, OpenMode::Append, Known::Absent);
        assert_eq!(file.len().unwrap(), 0);
        file.sync_data().unwrap();
        file.set_len(0).unwrap();
        let mut empty = [];
        file.read_exact_at(&mut empty, 0).unwrap();
        assert!(file.read_exact_at(&mut [0; 1], 0).is_err());
        assert!(storage.read_dir(Path::new("/data/q")).is_err());
        file.append(b"abc").unwrap();
        assert_eq!(file.len().unwrap(), 3);
        assert_eq!(storage.read(path).unwrap(), b"abc");
        let mut buf = [0; 2];
        file.read_exact_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"bc");
        file.sync_data().unwrap();
    }

    /// A storage that records the directories synced, over the simulated disk.
    #[derive(Debug)]
    struct SyncedDirs {
        sim: SimDisk,
        synced: Mutex<Vec<PathBuf>>,
    }

    impl Storage for SyncedDirs {
        fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
            self.sim.open(path, mode)
        }
        fn map(&self, path: &Path) -> io::Result<bytes::Bytes> {
            self.sim.map(path)
        }
        fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
            self.sim.read(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.sim.rename(from, to)
        }
        fn remove(&self, path: &Path) -> io::Result<()> {
            self.sim.remove(path)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.synced.lock().push(dir.to_path_buf());
            self.sim.sync_dir(dir)
        }
        fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
            self.sim.create_dir_all(dir)
        }
        fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
            self.sim.remove_dir_all(dir)
        }
        fn read_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
            self.sim.read_dir(dir)
        }
    }

    #[test]
    fn the_first_sync_makes_the_created_directories_durable() {
        let sim = SimDisk::new();
        sim.create_dir_all(Path::new("/data/queues")).unwrap();
        let recorder = Arc::new(SyncedDirs {
            sim,
            synced: Mutex::new(Vec::new()),
        });
        let storage: SharedStorage = recorder.clone();
        let path = Path::new("/data/queues/q/0/00000000000000000000.log");
        let file = deferred(storage, path, OpenMode::Append, Known::Absent);
        file.sync_data().unwrap();
        assert!(recorder.synced.lock().is_empty(), "nothing created yet");
        file.append(b"abc").unwrap();
        file.sync_data().unwrap();
        // `queues/q/0` was created in `queues/q`, `queues/q` in `queues`; the file's own
        // entry (in `queues/q/0`) is the log's to sync.
        assert_eq!(
            *recorder.synced.lock(),
            vec![
                PathBuf::from("/data/queues/q"),
                PathBuf::from("/data/queues")
            ]
        );
        file.sync_data().unwrap();
        assert_eq!(recorder.synced.lock().len(), 2, "synced once");
    }

    #[test]
    fn a_present_file_opens_on_first_use_and_keeps_its_bytes() {
        let sim = SimDisk::new();
        let storage: SharedStorage = Arc::new(sim.clone());
        let path = Path::new("/data/j.journal");
        storage.create_dir_all(Path::new("/data")).unwrap();
        let existing = storage.open(path, OpenMode::Append).unwrap();
        existing.append(b"old").unwrap();
        drop(existing);
        let file = deferred(Arc::clone(&storage), path, OpenMode::Append, Known::Present);
        file.sync_data().unwrap();
        assert_eq!(file.len().unwrap(), 3);
        file.append(b"new").unwrap();
        assert_eq!(storage.read(path).unwrap(), b"oldnew");
    }
}
