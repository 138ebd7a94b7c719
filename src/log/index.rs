//! Sparse offset and time index entries: their bytes and their lookups.
//!
//! An offset index (`.index`) is an array of 8-byte entries `(relative offset u32, byte
//! position u32)`, one at most every `index_interval_bytes` of log, pointing at a batch
//! start. A time index (`.timeindex`) is an array of 12-byte entries `(max timestamp so far
//! i64, relative offset u32)`: the timestamp is the largest of every record up to and
//! including the batch at that offset, so entries are non-decreasing in both fields.
//! Lookups are binary searches over the raw bytes, so a mapped file needs no parsing.
#![deny(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

/// Bytes per offset index entry.
pub const OFFSET_ENTRY_LEN: usize = 8;
/// Bytes per time index entry.
pub const TIME_ENTRY_LEN: usize = 12;

/// One offset index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetEntry {
    /// Offset minus the segment's base offset (a batch's base offset).
    pub relative_offset: u32,
    /// Byte position of that batch in the `.log` file.
    pub position: u32,
}

/// One time index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeEntry {
    /// Largest record timestamp (ms) up to and including the batch at `relative_offset`.
    pub timestamp_ms: i64,
    /// Offset minus the segment's base offset (a batch's base offset).
    pub relative_offset: u32,
}

impl OffsetEntry {
    /// Appends the entry's bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.relative_offset.to_le_bytes());
        out.extend_from_slice(&self.position.to_le_bytes());
    }

    /// Entry `i` of an index, if present.
    pub fn at(bytes: &[u8], i: usize) -> Option<Self> {
        let at = i.checked_mul(OFFSET_ENTRY_LEN)?;
        let entry = bytes.get(at..at.checked_add(OFFSET_ENTRY_LEN)?)?;
        Some(Self {
            relative_offset: u32::from_le_bytes(entry.get(0..4)?.try_into().ok()?),
            position: u32::from_le_bytes(entry.get(4..8)?.try_into().ok()?),
        })
    }
}

impl TimeEntry {
    /// Appends the entry's bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&self.relative_offset.to_le_bytes());
    }

    /// Entry `i` of a time index, if present.
    pub fn at(bytes: &[u8], i: usize) -> Option<Self> {
        let at = i.checked_mul(TIME_ENTRY_LEN)?;
        let entry = bytes.get(at..at.checked_add(TIME_ENTRY_LEN)?)?;
        Some(Self {
            timestamp_ms: i64::from_le_bytes(entry.get(0..8)?.try_into().ok()?),
            relative_offset: u32::from_le_bytes(entry.get(8..12)?.try_into().ok()?),
        })
    }
}

/// Number of whole offset entries in `bytes`.
pub fn offset_entries(bytes: &[u8]) -> usize {
    bytes.len() / OFFSET_ENTRY_LEN
}

/// Number of whole time entries in `bytes`.
pub fn time_entries(bytes: &[u8]) -> usize {
    bytes.len() / TIME_ENTRY_LEN
}

/// The last offset entry with `relative_offset <= target`.
pub fn lookup_offset(bytes: &[u8], target: u32) -> Option<OffsetEntry> {
    // partition_point: the number of entries with relative_offset <= target.
    let n = offset_entries(bytes);
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo.midpoint(hi);
        match OffsetEntry::at(bytes, mid) {
            Some(e) if e.relative_offset <= target => lo = mid.saturating_add(1),
            _ => hi = mid,
        }
    }
    lo.checked_sub(1).and_then(|i| OffsetEntry::at(bytes, i))
}

/// The last time entry whose timestamp is below `target`: every record up to and including
/// its batch is older than `target`, so a scan for `target` may start after it.
pub fn lookup_time(bytes: &[u8], target: i64) -> Option<TimeEntry> {
    let n = time_entries(bytes);
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo.midpoint(hi);
        match TimeEntry::at(bytes, mid) {
            Some(e) if e.timestamp_ms < target => lo = mid.saturating_add(1),
            _ => hi = mid,
        }
    }
    lo.checked_sub(1).and_then(|i| TimeEntry::at(bytes, i))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Index bytes from disk (any length, any content): lookups give an entry or none,
        /// never a panic, and a found offset entry is never past the target.
        #[test]
        fn lookups_never_panic_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            target in any::<u32>(),
            ts in any::<i64>(),
            i in any::<usize>(),
        ) {
            if let Some(e) = lookup_offset(&bytes, target) {
                prop_assert!(e.relative_offset <= target);
            }
            let _ = lookup_time(&bytes, ts);
            let _ = OffsetEntry::at(&bytes, i);
            let _ = TimeEntry::at(&bytes, i);
        }
    }

    fn index(entries: &[(u32, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(relative_offset, position) in entries {
            OffsetEntry {
                relative_offset,
                position,
            }
            .encode(&mut out);
        }
        out
    }

    #[test]
    fn offset_lookup_finds_floor_entry() {
        let bytes = index(&[(0, 0), (10, 4096), (25, 8200)]);
        assert_eq!(lookup_offset(&bytes, 0).unwrap().position, 0);
        assert_eq!(lookup_offset(&bytes, 9).unwrap().position, 0);
        assert_eq!(lookup_offset(&bytes, 10).unwrap().position, 4096);
        assert_eq!(lookup_offset(&bytes, 1000).unwrap().position, 8200);
        assert_eq!(lookup_offset(&index(&[(5, 100)]), 4), None);
        assert_eq!(lookup_offset(&[], 4), None);
    }

    #[test]
    fn time_lookup_finds_last_older_entry() {
        let mut bytes = Vec::new();
        for (timestamp_ms, relative_offset) in [(100, 0), (200, 10), (200, 20), (300, 30)] {
            TimeEntry {
                timestamp_ms,
                relative_offset,
            }
            .encode(&mut bytes);
        }
        assert_eq!(lookup_time(&bytes, 100), None);
        assert_eq!(lookup_time(&bytes, 150).unwrap().relative_offset, 0);
        assert_eq!(lookup_time(&bytes, 250).unwrap().relative_offset, 20);
        assert_eq!(lookup_time(&bytes, 999).unwrap().relative_offset, 30);
    }

    #[test]
    fn partial_entries_are_ignored() {
        let mut bytes = index(&[(0, 0), (10, 4096)]);
        bytes.extend_from_slice(&[1, 2, 3]);
        assert_eq!(offset_entries(&bytes), 2);
        assert_eq!(lookup_offset(&bytes, 99).unwrap().relative_offset, 10);
    }
}
