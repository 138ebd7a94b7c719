//! An in-memory [`Storage`] for crash and fault tests.
//!
//! Every file keeps two versions of its bytes: what is written and what the last
//! `sync_data` made durable. Every directory entry likewise: the live name space and the one
//! the last `sync_dir` of its directory made durable (directories themselves are taken as
//! durable once created). A [`SimImage`] is what a machine would find after power loss:
//! the durable names, each file with its synced bytes plus an arbitrary prefix (chosen by a
//! seed) of the bytes written after them; a file truncated below its synced length and not
//! synced since keeps its synced bytes.
//!
//! - [`SimDisk::crash_at_sync`]: the Nth sync (`sync_data` or `sync_dir`, counted from the
//!   disk's creation) does not happen; the image is taken just before it and every call
//!   from then on fails with EIO, as if the process had died there.
//! - [`SimDisk::inject`]: fail chosen calls with EIO or ENOSPC, once, N times or always.
//! - [`SimDisk::set_space`]: a disk that holds this many bytes; a write past it writes
//!   what fits and fails with ENOSPC (as a real `write` loop does).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::{OpenMode, Storage, StorageFile};

/// EIO.
const EIO: i32 = 5;
/// ENOSPC.
const ENOSPC: i32 = 28;

/// A call that a [`Fault`] can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`Storage::open`].
    Open,
    /// [`StorageFile::append`].
    Write,
    /// [`StorageFile::set_len`].
    SetLen,
    /// [`StorageFile::sync_data`].
    Sync,
    /// [`Storage::sync_dir`].
    SyncDir,
    /// [`Storage::rename`].
    Rename,
    /// [`Storage::remove`].
    Remove,
    /// Reads: [`Storage::read`], [`Storage::map`], [`StorageFile::read_exact_at`].
    Read,
}

/// The error a [`Fault`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    /// An I/O error (the device failed).
    Eio,
    /// No space left on the device.
    Enospc,
}

impl Errno {
    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            Errno::Eio => EIO,
            Errno::Enospc => ENOSPC,
        })
    }
}

/// Fails calls of one kind on paths containing a string.
#[derive(Debug, Clone)]
pub struct Fault {
    op: Op,
    path_contains: String,
    errno: Errno,
    /// Calls left to fail; `None`: every one.
    remaining: Option<u32>,
}

impl Fault {
    /// Fails every `op` call on a path containing `path_contains` with `errno`.
    pub fn new(op: Op, path_contains: &str, errno: Errno) -> Self {
        Self {
            op,
            path_contains: path_contains.to_string(),
            errno,
            remaining: None,
        }
    }

    /// Only the next `n` matching calls fail.
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }
}

/// What survives a crash: the durable files and their bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimImage {
    /// Every durable file and the bytes found in it.
    pub files: BTreeMap<PathBuf, Vec<u8>>,
    /// Every directory.
    pub dirs: BTreeSet<PathBuf>,
}

#[derive(Debug, Default, Clone)]
struct Inode {
    data: Vec<u8>,
    synced: Vec<u8>,
}

#[derive(Default)]
struct State {
    inodes: Vec<Inode>,
    live: BTreeMap<PathBuf, usize>,
    durable: BTreeMap<PathBuf, usize>,
    dirs: BTreeSet<PathBuf>,
    syncs: u64,
    crash_at: Option<(u64, u64)>,
    crashed: Option<SimImage>,
    faults: Vec<Fault>,
    space: Option<u64>,
}

/// A small deterministic generator (xorshift64*), so a seed names one crash outcome.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

impl State {
    /// Fails with EIO after a crash, or with an injected fault.
    fn check(&mut self, op: Op, path: &Path) -> io::Result<()> {
        if self.crashed.is_some() {
            return Err(io::Error::other("simulated crash: the disk is gone"));
        }
        let text = path.to_string_lossy();
        let hit = self
            .faults
            .iter_mut()
            .position(|f| f.op == op && text.contains(&f.path_contains));
        let Some(i) = hit else { return Ok(()) };
        let Some(fault) = self.faults.get_mut(i) else {
            return Ok(());
        };
        let errno = fault.errno;
        match &mut fault.remaining {
            Some(0) => {
                self.faults.remove(i);
                return Ok(());
            }
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.faults.remove(i);
                }
            }
            None => {}
        }
        Err(errno.error())
    }

    /// Counts a sync; takes the crash image when this is the sync to crash at.
    fn sync_point(&mut self, op: Op, path: &Path) -> io::Result<()> {
        self.check(op, path)?;
        self.syncs += 1;
        if let Some((at, seed)) = self.crash_at
            && self.syncs >= at
        {
            self.crashed = Some(self.image(seed));
            return Err(io::Error::other("simulated crash"));
        }
        Ok(())
    }

    fn image(&self, seed: u64) -> SimImage {
        let mut rng = Rng::new(seed);
        let files = self
            .durable
            .iter()
            .filter_map(|(path, &id)| {
                let inode = self.inodes.get(id)?;
                let mut bytes = inode.synced.clone();
                if let Some(unsynced) = inode.data.strip_prefix(inode.synced.as_slice()) {
                    let keep = rng.below(unsynced.len() as u64 + 1) as usize;
                    bytes.extend_from_slice(unsynced.get(..keep).unwrap_or_default());
                }
                Some((path.clone(), bytes))
            })
            .collect();
        SimImage {
            files,
            dirs: self.dirs.clone(),
        }
    }

    fn used(&self) -> u64 {
        let live: BTreeSet<usize> = self.live.values().copied().collect();
        live.iter()
            .filter_map(|&id| self.inodes.get(id))
            .map(|i| i.data.len() as u64)
            .sum()
    }

    fn inode(&mut self, id: usize) -> io::Result<&mut Inode> {
        self.inodes
            .get_mut(id)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn lookup(&self, path: &Path) -> io::Result<usize> {
        self.live
            .get(path)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
    }

    fn parent_exists(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(dir) if !self.dirs.contains(dir) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no directory {}", dir.display()),
            )),
            _ => Ok(()),
        }
    }
}

/// The simulated disk. Clones share it.
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("SimDisk")
            .field("files", &state.live.len())
            .field("syncs", &state.syncs)
            .finish()
    }
}

impl SimDisk {
    /// An empty disk with a root directory `/`.
    pub fn new() -> Self {
        let disk = Self::default();
        disk.state.lock().dirs.insert(PathBuf::from("/"));
        disk
    }

    /// A disk holding `image`, every byte and entry durable (a machine after reboot).
    pub fn restore(image: &SimImage) -> Self {
        let disk = Self::new();
        {
            let mut state = disk.state.lock();
            state.dirs.extend(image.dirs.iter().cloned());
            for (path, bytes) in &image.files {
                let id = state.inodes.len();
                state.inodes.push(Inode {
                    data: bytes.clone(),
                    synced: bytes.clone(),
                });
                state.live.insert(path.clone(), id);
                state.durable.insert(path.clone(), id);
            }
        }
        disk
    }

    /// Syncs so far (`sync_data` and `sync_dir` calls that reached the disk).
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Crashes at the `n`th sync (counted from the disk's creation): that sync and every
    /// call after it fail; [`Self::crash_image`] then returns what was durable before it,
    /// the unsynced tails cut at points chosen by `seed`.
    pub fn crash_at_sync(&self, n: u64, seed: u64) {
        self.state.lock().crash_at = Some((n, seed));
    }

    /// True once a crash set with [`Self::crash_at_sync`] happened.
    pub fn crashed(&self) -> bool {
        self.state.lock().crashed.is_some()
    }

    /// What a crash leaves: the image taken at the crash point when one was reached, else
    /// one taken now (the tails cut at points chosen by `seed`).
    pub fn crash_image(&self, seed: u64) -> SimImage {
        let state = self.state.lock();
        match &state.crashed {
            Some(image) => image.clone(),
            None => state.image(seed),
        }
    }

    /// Adds a fault; the first matching fault fails a call.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().faults.push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.state.lock().faults.clear();
    }

    /// Limits the bytes the disk holds (`None`: unlimited).
    pub fn set_space(&self, bytes: Option<u64>) {
        self.state.lock().space = bytes;
    }

    /// Bytes held by the live files.
    pub fn used(&self) -> u64 {
        self.state.lock().used()
    }

    /// The live files' paths.
    pub fn files(&self) -> Vec<PathBuf> {
        self.state.lock().live.keys().cloned().collect()
    }
}

/// An open file of a [`SimDisk`].
pub struct SimFile {
    disk: SimDisk,
    inode: usize,
    path: PathBuf,
    writable: bool,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFile").field("path", &self.path).finish()
    }
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "opened read-only")
}

impl StorageFile for SimFile {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.disk.state.lock();
        state.check(Op::Write, &self.path)?;
        if !self.writable {
            return Err(read_only());
        }
        let room = match state.space {
            Some(space) => space.saturating_sub(state.used()),
            None => u64::MAX,
        };
        let fits = usize::try_from(room).unwrap_or(usize::MAX).min(bytes.len());
        let inode = state.inode(self.inode)?;
        inode
            .data
            .extend_from_slice(bytes.get(..fits).unwrap_or_default());
        if fits < bytes.len() {
            return Err(Errno::Enospc.error());
        }
        Ok(())
    }

    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        let mut state = self.disk.state.lock();
        state.check(Op::Read, &self.path)?;
        let inode = state.inode(self.inode)?;
        let start = usize::try_from(position).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| inode.data.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.disk.state.lock();
        state.check(Op::SetLen, &self.path)?;
        if !self.writable {
            return Err(read_only());
        }
        let len = usize::try_from(len).map_err(|_| Errno::Enospc.error())?;
        state.inode(self.inode)?.data.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.disk.state.lock();
        state.sync_point(Op::Sync, &self.path)?;
        let inode = state.inode(self.inode)?;
        inode.synced = inode.data.clone();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut state = self.disk.state.lock();
        Ok(state.inode(self.inode)?.data.len() as u64)
    }
}

impl Storage for SimDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.state.lock();
        state.check(Op::Open, path)?;
        let id = match (state.lookup(path), mode) {
            (
                Ok(id),
                OpenMode::Read | OpenMode::Append | OpenMode::AppendHint | OpenMode::Reopen,
            ) => id,
            (Ok(id), OpenMode::Create | OpenMode::CreatePrivate) => {
                state.inode(id)?.data.clear();
                id
            }
            (Err(e), OpenMode::Read | OpenMode::Reopen) => return Err(e),
            (Err(_), _) => {
                state.parent_exists(path)?;
                let id = state.inodes.len();
                state.inodes.push(Inode::default());
                state.live.insert(path.to_path_buf(), id);
                id
            }
        };
        Ok(Arc::new(SimFile {
            disk: self.clone(),
            inode: id,
            path: path.to_path_buf(),
            writable: mode != OpenMode::Read,
        }))
    }

    fn map(&self, path: &Path) -> io::Result<Bytes> {
        self.read(path).map(Bytes::from)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut state = self.state.lock();
        state.check(Op::Read, path)?;
        let id = state.lookup(path)?;
        Ok(state.inode(id)?.data.clone())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.check(Op::Rename, to)?;
        state.parent_exists(to)?;
        let id = state.lookup(from)?;
        state.live.remove(from);
        state.live.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.check(Op::Remove, path)?;
        state.lookup(path)?;
        state.live.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.sync_point(Op::SyncDir, dir)?;
        if !state.dirs.contains(dir) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                dir.display().to_string(),
            ));
        }
        let in_dir = |p: &Path| p.parent() == Some(dir);
        state.durable.retain(|p, _| !in_dir(p));
        let entries: Vec<(PathBuf, usize)> = state
            .live
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        state.durable.extend(entries);
        Ok(())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.check(Op::Open, dir)?;
        state.dirs.extend(
            dir.ancestors()
                .map(Path::to_path_buf)
                .filter(|p| !p.as_os_str().is_empty()),
        );
        Ok(())
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.check(Op::Remove, dir)?;
        if !state.dirs.contains(dir) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                dir.display().to_string(),
            ));
        }
        // Removing a tree is taken as durable at once (the broker syncs nothing after it).
        state.live.retain(|p, _| !p.starts_with(dir));
        state.durable.retain(|p, _| !p.starts_with(dir));
        state.dirs.retain(|p| !p.starts_with(dir));
        Ok(())
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut state = self.state.lock();
        state.check(Op::Read, dir)?;
        if !state.dirs.contains(dir) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                dir.display().to_string(),
            ));
        }
        let files = state.live.keys().filter(|p| p.parent() == Some(dir));
        let dirs = state.dirs.iter().filter(|p| p.parent() == Some(dir));
        Ok(files.chain(dirs).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_bytes_and_entries_may_be_lost_synced_ones_never() {
        let disk = SimDisk::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).unwrap();
        let file = disk.open(&dir.join("a"), OpenMode::Append).unwrap();
        file.append(b"synced").unwrap();
        file.sync_data().unwrap();
        // The entry is not durable before the directory is synced.
        assert!(disk.crash_image(1).files.is_empty());
        disk.sync_dir(dir).unwrap();
        file.append(b"-tail").unwrap();
        for seed in 0..20 {
            let image = disk.crash_image(seed);
            let bytes = image.files.get(&dir.join("a")).unwrap();
            assert!(bytes.starts_with(b"synced"));
            assert!(b"synced-tail".starts_with(bytes));
        }
    }

    #[test]
    fn crash_at_sync_freezes_the_image_and_fails_everything_after() {
        let disk = SimDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        let file = disk.open(Path::new("/d/a"), OpenMode::Append).unwrap();
        disk.sync_dir(Path::new("/d")).unwrap();
        disk.crash_at_sync(3, 0);
        file.append(b"one").unwrap();
        file.sync_data().unwrap();
        file.append(b"two").unwrap();
        assert!(file.sync_data().is_err());
        assert!(file.append(b"three").is_err());
        assert!(disk.crashed());
        let image = disk.crash_image(0);
        let bytes = image.files.get(Path::new("/d/a")).unwrap();
        assert!(bytes.starts_with(b"one") && b"onetwo".starts_with(bytes));
    }

    #[test]
    fn faults_fail_the_chosen_calls_and_space_runs_out_mid_write() {
        let disk = SimDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        let file = disk.open(Path::new("/d/a"), OpenMode::Append).unwrap();
        disk.inject(Fault::new(Op::Sync, "/d/a", Errno::Eio).times(1));
        assert_eq!(file.sync_data().unwrap_err().raw_os_error(), Some(EIO));
        file.sync_data().unwrap();
        disk.set_space(Some(4));
        let error = file.append(b"abcdef").unwrap_err();
        assert_eq!(error.raw_os_error(), Some(ENOSPC));
        assert_eq!(file.len().unwrap(), 4);
        disk.set_space(None);
        file.append(b"gh").unwrap();
        assert_eq!(disk.read(Path::new("/d/a")).unwrap(), b"abcdgh");
    }
}
