//! A set of `u64` offsets stored as disjoint half-open ranges, so that long runs of done
//! offsets (the common case: acks arrive roughly in order) cost one entry.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent half-open ranges `[start, end)`, keyed by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
    len: u64,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of offsets in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of ranges (the memory cost).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// True if `offset` is in the set.
    pub fn contains(&self, offset: u64) -> bool {
        self.ranges
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, end)| offset < *end)
    }

    /// Adds `offset`; returns false if it was present.
    pub fn insert(&mut self, offset: u64) -> bool {
        if self.contains(offset) {
            return false;
        }
        let mut start = offset;
        let mut end = offset + 1;
        if let Some((&s, &e)) = self.ranges.range(..offset).next_back()
            && e == offset
        {
            start = s;
            self.ranges.remove(&s);
        }
        if let Some(&e) = self.ranges.get(&end) {
            self.ranges.remove(&end);
            end = e;
        }
        self.ranges.insert(start, end);
        self.len += 1;
        true
    }

    /// Adds every offset of `[start, end)`.
    pub fn insert_range(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            self.ranges.remove(&s);
            self.len -= e - s;
            start = s;
            end = end.max(e);
        }
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            self.ranges.remove(&s);
            self.len -= e - s;
            end = end.max(e);
        }
        self.ranges.insert(start, end);
        self.len += end - start;
    }

    /// The range starting exactly at `offset`, removed from the set.
    pub fn take_range_at(&mut self, offset: u64) -> Option<u64> {
        let end = self.ranges.remove(&offset)?;
        self.len -= end - offset;
        Some(end)
    }

    /// Removes every offset below `offset`.
    pub fn remove_below(&mut self, offset: u64) {
        while let Some((&start, &end)) = self.ranges.first_key_value() {
            if start >= offset {
                break;
            }
            self.ranges.remove(&start);
            self.len -= end - start;
            if end > offset {
                self.ranges.insert(offset, end);
                self.len += end - offset;
                break;
            }
        }
    }

    /// Removes every offset at or above `offset`.
    pub fn remove_from(&mut self, offset: u64) {
        while let Some((&start, &end)) = self.ranges.last_key_value() {
            if end <= offset {
                break;
            }
            self.ranges.remove(&start);
            self.len -= end - start;
            if start < offset {
                self.ranges.insert(start, offset);
                self.len += offset - start;
                break;
            }
        }
    }

    /// Iterates the ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(s, e)| (*s, *e))
    }

    /// Builds a set from ranges (as stored in a snapshot); overlapping input is merged.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut set = Self::new();
        for (start, end) in ranges {
            set.insert_range(start, end);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn behaves_like_a_btreeset(
            ops in proptest::collection::vec((0u64..64, 0u8..4, 0u64..6), 0..200),
        ) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for (offset, op, width) in ops {
                if op == 0 {
                    set.remove_below(offset);
                    model.retain(|o| *o >= offset);
                } else if op == 3 {
                    set.remove_from(offset);
                    model.retain(|o| *o < offset);
                } else if op == 1 {
                    set.insert_range(offset, offset + width);
                    model.extend(offset..offset + width);
                } else {
                    prop_assert_eq!(set.insert(offset), model.insert(offset));
                }
                prop_assert_eq!(set.len(), model.len() as u64);
                for o in 0..66 {
                    prop_assert_eq!(set.contains(o), model.contains(&o));
                }
                // Ranges stay disjoint and non-adjacent.
                let ranges: Vec<_> = set.iter().collect();
                for pair in ranges.windows(2) {
                    prop_assert!(pair[0].1 < pair[1].0);
                }
            }
        }
    }

    #[test]
    fn a_million_in_order_is_one_range() {
        let mut set = RangeSet::new();
        for o in 1..1_000_000 {
            set.insert(o);
        }
        assert_eq!(set.range_count(), 1);
        assert_eq!(set.len(), 999_999);
    }
}
