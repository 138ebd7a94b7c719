//! A bounded set of maps: [`MappedFile`] is a read-only map of an immutable file (a sealed
//! segment's `.log`, `.index` or `.timeindex`), mapped on first use. Through a storage with
//! a [`MapCache`] ([`super::CachedStorage`]), at most a configured number of files are
//! mapped at once: past it the least recently used maps are dropped,
//! [`MapCache::unmap_idle`] drops those unused for a while, and a dropped map is mapped
//! again on its next use. Without a cache (the plain disk, the simulated disk) a file is
//! mapped on first use and stays mapped while its handle lives.
//!
//! Dropping a map is dropping the cache's reference to its `Bytes`: a reader still holding
//! bytes sliced from it keeps the map alive until it lets go, so a drop never pulls bytes
//! from under a reader. Each map is one entry in the process's map table
//! (`vm.max_map_count`, 65,530 by default): the limit keeps ten thousand written
//! partitions well under it, and their untouched pages out of the resident set.
//!
//! Reads stay lock-free: the map is behind an [`ArcSwapOption`] (one atomic load), and a use
//! is recorded by storing the cache's clock, a counter that moves when a file is mapped or
//! the idle sweep runs, not the time (no clock read per use). A lock is taken only to map
//! or drop a map.
//!
//! A file about to be replaced or removed under a live handle (compaction renames a new
//! file over a sealed segment, retention unlinks it) is first [`MappedFile::pin`]ned: mapped
//! if it is not, and never dropped by the cache, so readers of the old segment keep reading
//! the old bytes, never the new file's, and never fail on a removed one.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use parking_lot::Mutex;

use super::SharedStorage;

/// Files kept mapped unless configured otherwise (three per sealed segment).
pub const DEFAULT_MAX_MAPPED_FILES: usize = 4096;
/// The smallest limit taken.
pub const MIN_MAPPED_FILES: usize = 16;

/// The shared bookkeeping of a bounded set of maps.
pub struct MapCache {
    limit: usize,
    idle_after: Duration,
    /// Moves on every new map and every idle sweep; a use stores it in its slot.
    clock: AtomicU64,
    next_id: AtomicU64,
    /// Files mapped now (pinned ones included).
    mapped: AtomicUsize,
    /// The slots holding a map (entries of dropped slots are pruned on the next look).
    slots: Mutex<HashMap<u64, Weak<MapSlot>>>,
    /// When the last idle sweep that moved the clock ran, and the clock it set.
    last_sweep: Mutex<(Instant, u64)>,
}

impl fmt::Debug for MapCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapCache")
            .field("limit", &self.limit)
            .field("mapped", &self.mapped())
            .finish()
    }
}

impl MapCache {
    /// A cache keeping at most `limit` files mapped (at least [`MIN_MAPPED_FILES`]; pinned
    /// maps may exceed it), dropping maps unused for `idle_after` when
    /// [`Self::unmap_idle`] runs.
    pub fn new(limit: usize, idle_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(MIN_MAPPED_FILES),
            idle_after,
            clock: AtomicU64::new(1),
            next_id: AtomicU64::new(0),
            mapped: AtomicUsize::new(0),
            slots: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new((Instant::now(), 1)),
        })
    }

    /// Files mapped now.
    pub fn mapped(&self) -> usize {
        self.mapped.load(Ordering::Acquire)
    }

    /// The most files kept mapped (pinned ones aside).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Drops the maps unused since the last sweep at least the idle time ago; returns how
    /// many it dropped. Cheap enough to run every few seconds (no I/O).
    pub fn unmap_idle(&self) -> usize {
        let cutoff = {
            let mut last = self.last_sweep.lock();
            if last.0.elapsed() < self.idle_after {
                return 0;
            }
            let cutoff = last.1;
            let now = self.clock.fetch_add(1, Ordering::AcqRel) + 1;
            *last = (Instant::now(), now);
            cutoff
        };
        self.live_slots()
            .iter()
            .filter(|slot| slot.last_used.load(Ordering::Relaxed) < cutoff && slot.unmap(self))
            .count()
    }

    /// The slots holding a map, pruning the entries of dropped ones.
    fn live_slots(&self) -> Vec<Arc<MapSlot>> {
        let mut slots = self.slots.lock();
        slots.retain(|_, slot| slot.strong_count() > 0);
        slots.values().filter_map(Weak::upgrade).collect()
    }

    /// Counts a slot that was just mapped (called under the slot's lock); returns the clock
    /// for its use time.
    fn registered(&self, slot: &Arc<MapSlot>) -> u64 {
        self.mapped.fetch_add(1, Ordering::AcqRel);
        self.slots.lock().insert(slot.id, Arc::downgrade(slot));
        self.clock.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Over the limit: drops the least recently used maps (never `keep`, which the caller
    /// is about to use, nor pinned ones) down to nine tenths of the limit, so that trimming
    /// is rare.
    fn trim(&self, keep: u64) {
        if self.mapped() <= self.limit {
            return;
        }
        let target = self.limit - self.limit / 10;
        // The use times are read once: they change while we sort.
        let mut slots: Vec<(u64, Arc<MapSlot>)> = self
            .live_slots()
            .into_iter()
            .filter(|slot| slot.id != keep)
            .map(|slot| (slot.last_used.load(Ordering::Relaxed), slot))
            .collect();
        slots.sort_unstable_by_key(|(used, _)| *used);
        for (_, slot) in slots {
            if self.mapped() <= target {
                break;
            }
            slot.unmap(self);
        }
    }
}

/// One file's map and what the cache knows of it.
struct MapSlot {
    id: u64,
    path: PathBuf,
    storage: SharedStorage,
    cache: Option<Arc<MapCache>>,
    /// The map, `None` until mapped and after the cache dropped it.
    map: ArcSwapOption<Bytes>,
    /// The cache's clock at the last use.
    last_used: AtomicU64,
    /// Serializes mapping and dropping; true once pinned.
    pinned: Mutex<bool>,
}

impl Drop for MapSlot {
    fn drop(&mut self) {
        if let Some(cache) = &self.cache
            && self.map.swap(None).is_some()
        {
            cache.mapped.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl MapSlot {
    /// Records a use (a store only when the clock moved since the last one).
    fn touch(&self) {
        if let Some(cache) = &self.cache {
            let now = cache.clock.load(Ordering::Relaxed);
            if self.last_used.load(Ordering::Relaxed) != now {
                self.last_used.store(now, Ordering::Relaxed);
            }
        }
    }

    /// The map, mapping the file now when it is not (the slow path); with `pin`, kept
    /// mapped for good.
    fn map_now(self: &Arc<Self>, pin: bool) -> io::Result<Arc<Bytes>> {
        let bytes = {
            let mut pinned = self.pinned.lock();
            *pinned |= pin;
            match self.map.load_full() {
                Some(bytes) => return Ok(bytes),
                None => self.map_locked()?,
            }
        };
        if let Some(cache) = &self.cache {
            cache.trim(self.id);
        }
        Ok(bytes)
    }

    /// Maps the file (called with the slot's lock held, while it is not mapped).
    fn map_locked(self: &Arc<Self>) -> io::Result<Arc<Bytes>> {
        let bytes = Arc::new(self.storage.map(&self.path)?);
        self.map.store(Some(Arc::clone(&bytes)));
        if let Some(cache) = &self.cache {
            self.last_used
                .store(cache.registered(self), Ordering::Relaxed);
        }
        Ok(bytes)
    }

    /// Drops the map unless pinned; true when it did.
    fn unmap(&self, cache: &MapCache) -> bool {
        let pinned = self.pinned.lock();
        if *pinned || self.map.swap(None).is_none() {
            return false;
        }
        cache.mapped.fetch_sub(1, Ordering::AcqRel);
        // Under the slot's lock, so that a new map registers after this removal.
        cache.slots.lock().remove(&self.id);
        true
    }
}

/// A read-only map of an immutable file, mapped on first use; through a [`MapCache`],
/// dropped when the cache needs room or it is idle, and mapped again on the next use.
pub struct MappedFile {
    slot: Arc<MapSlot>,
}

impl fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.slot.path)
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

impl MappedFile {
    /// `path` of `storage`, mapped on first use (through the storage's map cache, if it has
    /// one). Only for files nobody writes or truncates in place while the handle lives.
    pub fn new(storage: &SharedStorage, path: &Path) -> Self {
        let cache = storage.map_cache();
        let id = cache
            .as_ref()
            .map_or(0, |c| c.next_id.fetch_add(1, Ordering::Relaxed));
        Self {
            slot: Arc::new(MapSlot {
                id,
                path: path.to_path_buf(),
                storage: Arc::clone(storage),
                cache,
                map: ArcSwapOption::empty(),
                last_used: AtomicU64::new(0),
                pinned: Mutex::new(false),
            }),
        }
    }

    /// Runs `f` on the file's bytes, mapping it first when it is not mapped now.
    pub fn with<R>(&self, f: impl FnOnce(&Bytes) -> R) -> io::Result<R> {
        {
            let guard = self.slot.map.load();
            if let Some(bytes) = guard.as_ref() {
                self.slot.touch();
                return Ok(f(bytes));
            }
        }
        let bytes = self.slot.map_now(false)?;
        Ok(f(&bytes))
    }

    /// The file's bytes (a reference to the map: it lives while they do).
    pub fn bytes(&self) -> io::Result<Bytes> {
        self.with(Bytes::clone)
    }

    /// Maps the file if it is not mapped and keeps it mapped while this handle lives,
    /// whatever the cache's limit: call it before the file is replaced or removed, so that
    /// readers holding this handle keep reading the bytes they knew.
    pub fn pin(&self) -> io::Result<()> {
        self.slot.map_now(true).map(drop)
    }

    /// True while the file is mapped.
    pub fn is_mapped(&self) -> bool {
        self.slot.map.load().is_some()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.slot.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{CachedStorage, OpenMode, SimDisk, Storage};

    fn files(n: usize) -> (SimDisk, SharedStorage) {
        let sim = SimDisk::new();
        sim.create_dir_all(Path::new("/d")).unwrap();
        for i in 0..n {
            let file = sim.open(&path(i), OpenMode::Create).unwrap();
            file.append(format!("file {i}").as_bytes()).unwrap();
        }
        let cached = CachedStorage::new(Arc::new(sim.clone()), 16, Duration::ZERO)
            .with_max_mapped_files(MIN_MAPPED_FILES);
        (sim, Arc::new(cached))
    }

    fn path(i: usize) -> PathBuf {
        PathBuf::from(format!("/d/{i}.log"))
    }

    fn cache(storage: &SharedStorage) -> Arc<MapCache> {
        storage.map_cache().unwrap()
    }

    #[test]
    fn the_least_recently_used_maps_are_dropped_past_the_limit() {
        let (_, storage) = files(4 * MIN_MAPPED_FILES);
        let maps: Vec<MappedFile> = (0..4 * MIN_MAPPED_FILES)
            .map(|i| MappedFile::new(&storage, &path(i)))
            .collect();
        assert_eq!(cache(&storage).mapped(), 0, "mapped before use");
        for round in 0..3 {
            for (i, map) in maps.iter().enumerate() {
                let bytes = map.bytes().unwrap();
                assert_eq!(bytes, format!("file {i}").as_bytes(), "round {round}");
                assert!(cache(&storage).mapped() <= MIN_MAPPED_FILES);
            }
        }
        // The most recently used are the ones still mapped.
        assert!(maps.last().unwrap().is_mapped());
        assert!(!maps[0].is_mapped());
        drop(maps);
        assert_eq!(cache(&storage).mapped(), 0);
    }

    #[test]
    fn bytes_held_by_a_reader_outlive_the_dropped_map() {
        let (_, storage) = files(2 * MIN_MAPPED_FILES);
        let first = MappedFile::new(&storage, &path(0));
        let held = first.bytes().unwrap();
        let others: Vec<MappedFile> = (1..2 * MIN_MAPPED_FILES)
            .map(|i| MappedFile::new(&storage, &path(i)))
            .collect();
        others.iter().for_each(|m| drop(m.bytes().unwrap()));
        assert!(!first.is_mapped());
        assert_eq!(held, b"file 0".as_slice());
    }

    #[test]
    fn idle_maps_are_dropped_and_mapped_again_on_use() {
        let (_, storage) = files(3);
        let maps: Vec<MappedFile> = (0..3)
            .map(|i| MappedFile::new(&storage, &path(i)))
            .collect();
        maps.iter().for_each(|m| drop(m.bytes().unwrap()));
        // The first sweep marks the time; maps unused since it are dropped by the next.
        cache(&storage).unmap_idle();
        maps[1].bytes().unwrap();
        assert_eq!(cache(&storage).unmap_idle(), 2);
        assert!(maps[1].is_mapped() && !maps[0].is_mapped() && !maps[2].is_mapped());
        assert_eq!(maps[0].bytes().unwrap(), b"file 0".as_slice());
        assert_eq!(cache(&storage).mapped(), 2);
    }

    #[test]
    fn a_pinned_map_keeps_the_old_bytes_after_the_file_is_replaced() {
        let (sim, storage) = files(2 * MIN_MAPPED_FILES);
        let old = MappedFile::new(&storage, &path(0));
        old.pin().unwrap();
        let replacement = sim.open(Path::new("/d/new"), OpenMode::Create).unwrap();
        replacement.append(b"replaced").unwrap();
        sim.rename(Path::new("/d/new"), &path(0)).unwrap();
        let others: Vec<MappedFile> = (1..2 * MIN_MAPPED_FILES)
            .map(|i| MappedFile::new(&storage, &path(i)))
            .collect();
        others.iter().for_each(|m| drop(m.bytes().unwrap()));
        assert_eq!(cache(&storage).unmap_idle(), 0);
        cache(&storage).unmap_idle();
        assert_eq!(old.bytes().unwrap(), b"file 0".as_slice());
        // A new handle sees the new file.
        let new = MappedFile::new(&storage, &path(0));
        assert_eq!(new.bytes().unwrap(), b"replaced".as_slice());
    }

    #[test]
    fn without_a_cache_a_file_is_mapped_once_and_kept() {
        let sim = SimDisk::new();
        sim.create_dir_all(Path::new("/d")).unwrap();
        sim.open(&path(0), OpenMode::Create)
            .unwrap()
            .append(b"x")
            .unwrap();
        let storage: SharedStorage = Arc::new(sim.clone());
        let map = MappedFile::new(&storage, &path(0));
        assert!(!map.is_mapped());
        assert_eq!(map.bytes().unwrap(), b"x".as_slice());
        sim.remove(&path(0)).unwrap();
        assert_eq!(map.bytes().unwrap(), b"x".as_slice());
    }

    #[test]
    fn a_missing_file_is_an_error_not_a_panic() {
        let (_, storage) = files(0);
        let map = MappedFile::new(&storage, &path(7));
        assert_eq!(map.bytes().unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(cache(&storage).mapped(), 0);
    }

    /// Threads reading more files than the limit at once: every read sees its file's bytes
    /// and the count stays bounded (trimming runs while use times move).
    #[test]
    fn concurrent_reads_past_the_limit_stay_correct_and_bounded() {
        let n = 4 * MIN_MAPPED_FILES;
        let (_, storage) = files(n);
        let maps: Vec<MappedFile> = (0..n)
            .map(|i| MappedFile::new(&storage, &path(i)))
            .collect();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let maps = &maps;
                scope.spawn(move || {
                    for round in 0..50 {
                        for (i, map) in maps.iter().enumerate().skip((t + round) % 3) {
                            let ok = map
                                .with(|b| b.as_ref() == format!("file {i}").as_bytes())
                                .unwrap();
                            assert!(ok);
                        }
                    }
                });
            }
        });
        // Each thread may map one file past the limit before its trim runs.
        assert!(cache(&storage).mapped() <= MIN_MAPPED_FILES + 4);
        let counted = cache(&storage).live_slots().len();
        assert_eq!(counted, cache(&storage).mapped());
    }
}
