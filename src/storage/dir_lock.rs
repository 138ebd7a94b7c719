//! One server per data directory: a server holds an exclusive lock on `.lock` in its data
//! directory for as long as it runs, and a second one started on the same directory stops
//! before it reads or changes anything there.
//!
//! Two servers on one directory would each recover the other's open segments as torn tails
//! and cut them, and a cluster node clears its rebuilt state at start: either one loses
//! data that was acknowledged. The lock is `flock(2)`'s, taken through
//! [`std::fs::File::try_lock`]: the kernel releases it when the process ends, also on
//! `kill -9`, so a crash never leaves a stale lock behind. The file holds the holder's pid,
//! for the error message only.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = ".lock";

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    /// Another process holds the lock.
    #[error(
        "data directory {} is in use by another qit process{}: stop it first, or give this one another --data-dir",
        dir.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    InUse {
        /// The data directory.
        dir: PathBuf,
        /// The pid the lock file names, if it names one.
        holder: Option<u32>,
    },
    /// The lock file could not be made or locked.
    #[error("cannot lock data directory {}: {source}", dir.display())]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The held lock of a data directory; dropping it releases the lock.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir` (created if missing) for this process, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, DirLockError> {
        let io = |source| DirLockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(DirLockError::InUse {
                    dir: dir.to_path_buf(),
                    holder: read_pid(&mut file),
                });
            }
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// The pid written in a lock file, if it holds one.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = DirLock::acquire(&data).unwrap();
        match DirLock::acquire(&data) {
            Err(DirLockError::InUse { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()));
            }
            other => panic!("a second lock was not refused: {other:?}"),
        }
        drop(first);
        DirLock::acquire(&data).unwrap();
    }

    #[test]
    fn other_directories_lock_independently() {
        let dir = tempfile::tempdir().unwrap();
        let _a = DirLock::acquire(&dir.path().join("a")).unwrap();
        let _b = DirLock::acquire(&dir.path().join("b")).unwrap();
    }
}
