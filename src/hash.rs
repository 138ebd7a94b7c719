//! A stable 64-bit hash of byte strings: the same on every build and platform (unlike
//! `DefaultHasher`), so that what nodes or restarts derive from it agrees — a cluster's
//! placement of queues, a redrive's idempotency keys.

/// FNV-1a over `parts` (each ended by a `0xff` separator, so `["ab", "c"]` and
/// `["a", "bc"]` differ), with a final mix so that close inputs spread.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value is pinned: placement depends on it, so a change would move every queue.
    #[test]
    fn the_hash_is_stable_and_separates_parts() {
        assert_eq!(fnv1a(&[b"queue", &1u64.to_le_bytes()]), PINNED);
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    /// The value the function had in `cluster::placement`, where it was first written.
    const PINNED: u64 = 1_459_245_620_093_055_594;
}
