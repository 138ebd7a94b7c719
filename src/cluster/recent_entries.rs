//! The last entries written to a group's Raft log, kept in memory as they were appended,
//! so that reading them back (openraft reads every entry it applies, and a leader reads
//! every entry once per follower to send it) is a clone instead of a read and a decode.
//!
//! The entries kept are a contiguous run ending at the log's last entry, exactly as they
//! are on disk: a truncation drops them from the cut on, a purge drops them up to its
//! point, an append that does not follow the run starts a new one. Each log keeps at most
//! [`MAX_ENTRIES`] and [`MAX_BYTES`] (encoded size), and all logs of the process together
//! at most [`TOTAL_BYTES`]: a log that would pass that gives up its own oldest entries
//! first and keeps an entry out when that is not enough. Entries not kept are read from
//! disk, as before; the cache never decides what a read returns, only how fast.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::types::Entry;

/// Most entries one log keeps.
pub const MAX_ENTRIES: usize = 256;
/// Most encoded bytes one log keeps.
pub const MAX_BYTES: usize = 1024 * 1024;
/// Most encoded bytes all logs of the process keep together.
pub const TOTAL_BYTES: usize = 64 * 1024 * 1024;

/// Encoded bytes kept by every log of the process.
static TOTAL: AtomicUsize = AtomicUsize::new(0);

/// One log's recent entries (see the module doc).
#[derive(Default)]
pub struct RecentEntries {
    /// The run, oldest first, each with its encoded size.
    entries: VecDeque<(Entry, usize)>,
    /// Encoded bytes of `entries`.
    bytes: usize,
}

impl RecentEntries {
    /// Keeps `entry` (`size` encoded bytes), just written after the log's last entry.
    pub fn push(&mut self, entry: Entry, size: usize) {
        let follows = self
            .last_index()
            .is_none_or(|last| last + 1 == entry.log_id.index);
        if !follows {
            self.clear();
        }
        if size > MAX_BYTES {
            // Not kept; the run must still end at the log's last entry.
            self.clear();
            return;
        }
        while self.entries.len() >= MAX_ENTRIES || self.bytes + size > MAX_BYTES {
            self.pop_front();
        }
        while !reserve(size) {
            if self.entries.is_empty() {
                return;
            }
            self.pop_front();
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
    }

    /// A copy of the entry at `index`, if kept.
    pub fn get(&self, index: u64) -> Option<Entry> {
        let first = self.entries.front()?.0.log_id.index;
        let at = usize::try_from(index.checked_sub(first)?).ok()?;
        self.entries.get(at).map(|(entry, _)| entry.clone())
    }

    /// Drops the entries at `from` and after (a truncation).
    pub fn truncate_from(&mut self, from: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(entry, _)| entry.log_id.index >= from)
        {
            if let Some((_, size)) = self.entries.pop_back() {
                self.release(size);
            }
        }
    }

    /// Drops the entries up to `upto`, inclusive (a purge).
    pub fn purge_upto(&mut self, upto: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(entry, _)| entry.log_id.index <= upto)
        {
            self.pop_front();
        }
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        while !self.entries.is_empty() {
            self.pop_front();
        }
    }

    /// Entries kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when none is kept.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(entry, _)| entry.log_id.index)
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.release(size);
        }
    }

    fn release(&mut self, size: usize) {
        self.bytes -= size;
        TOTAL.fetch_sub(size, Ordering::Relaxed);
    }
}

impl Drop for RecentEntries {
    fn drop(&mut self) {
        TOTAL.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Counts `size` more bytes against [`TOTAL_BYTES`]; false (nothing counted) when they
/// would pass it.
fn reserve(size: usize) -> bool {
    TOTAL
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
            (total + size <= TOTAL_BYTES).then_some(total + size)
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::super::types::{EntryPayload, log_id};
    use super::*;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(recent: &RecentEntries) -> Vec<u64> {
        (0..1000).filter(|i| recent.get(*i).is_some()).collect()
    }

    #[test]
    fn keeps_a_run_that_ends_at_the_last_append() {
        let mut recent = RecentEntries::default();
        for i in 5..10 {
            recent.push(entry(i), 10);
        }
        assert_eq!(indexes(&recent), vec![5, 6, 7, 8, 9]);
        assert_eq!(recent.get(7).map(|e| e.log_id.index), Some(7));
        recent.truncate_from(8);
        assert_eq!(indexes(&recent), vec![5, 6, 7]);
        recent.push(entry(8), 10);
        recent.purge_upto(6);
        assert_eq!(indexes(&recent), vec![7, 8]);
        // An append that does not follow the run (after a snapshot, say) starts a new one.
        recent.push(entry(20), 10);
        assert_eq!(indexes(&recent), vec![20]);
    }

    #[test]
    fn keeps_at_most_its_bounds() {
        let mut recent = RecentEntries::default();
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            recent.push(entry(i), 1);
        }
        assert_eq!(recent.len(), MAX_ENTRIES);
        assert!(recent.get(9).is_none() && recent.get(10).is_some());
        let mut big = RecentEntries::default();
        big.push(entry(0), MAX_BYTES / 2);
        big.push(entry(1), MAX_BYTES / 2);
        big.push(entry(2), MAX_BYTES / 2);
        assert_eq!(indexes(&big), vec![1, 2]);
        // Too large to keep: nothing older stays either, so the run still ends at 3.
        big.push(entry(3), MAX_BYTES + 1);
        assert!(big.is_empty());
        big.push(entry(4), 1);
        assert_eq!(indexes(&big), vec![4]);
    }
}
