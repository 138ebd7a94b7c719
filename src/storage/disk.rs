//! The real storage: `std::fs` for files and directories, `memmap2` for read-only maps
//! (files of at most [`SMALL_FILE_BYTES`] are read instead).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use memmap2::Mmap;

use super::{OpenMode, Storage, StorageFile};

/// Files up to this size are read into memory rather than mapped by [`Storage::map`].
pub const SMALL_FILE_BYTES: u64 = 8 * 1024;

/// The local file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Disk;

/// A file on the local file system.
#[derive(Debug)]
pub struct DiskFile(File);

impl StorageFile for DiskFile {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        (&self.0).write_all(bytes)
    }

    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, position)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Storage for Disk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let mut options = OpenOptions::new();
        match mode {
            OpenMode::Read => {
                options.read(true);
            }
            OpenMode::Append | OpenMode::AppendHint | OpenMode::Create => {
                options.read(true).append(true).create(true);
            }
            OpenMode::CreatePrivate => {
                options.read(true).append(true).create(true).mode(0o600);
            }
            OpenMode::Reopen => {
                options.read(true).append(true);
            }
        }
        let file = options.open(path)?;
        if matches!(mode, OpenMode::Create | OpenMode::CreatePrivate) {
            // `O_APPEND` and `O_TRUNC` do not combine in std: empty it explicitly.
            file.set_len(0)?;
        }
        Ok(Arc::new(DiskFile(file)))
    }

    fn map(&self, path: &Path) -> io::Result<Bytes> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(Bytes::new());
        }
        if len <= SMALL_FILE_BYTES {
            // Cheaper read than mapped: no map to set up, fault in and tear down (`munmap`
            // interrupts every core running the process), and no entry in the map table.
            let mut bytes = vec![0; len as usize];
            file.read_exact_at(&mut bytes, 0)?;
            return Ok(Bytes::from(bytes));
        }
        // SAFETY: callers map only files that qit never truncates or rewrites in place
        // (compaction and truncation write a new file and rename it), so the mapped bytes
        // never change under the map; an unlinked file stays mapped until the last reader
        // drops it.
        let map = unsafe { Mmap::map(&file) }?;
        Ok(Bytes::from_owner(map))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn dir_exists(&self, dir: &Path) -> io::Result<bool> {
        match fs::metadata(dir) {
            Ok(meta) => Ok(meta.is_dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        // Never follow a symlink: it may point anywhere, inside or outside the data dir, so
        // only the link goes. (`fs::remove_dir_all` does not follow links inside the tree.)
        let meta = fs::symlink_metadata(dir)?;
        if meta.file_type().is_symlink() || !meta.is_dir() {
            fs::remove_file(dir)
        } else {
            fs::remove_dir_all(dir)
        }
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.path()))
            .collect()
    }
}
