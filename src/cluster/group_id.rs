//! Group ids: every node names a queue's Raft groups alike, from the metadata log index
//! that created the queue (the groups themselves are opened in `groups.rs`).

/// Bit at which a partition group's partition number starts in its id (see
/// [`partition_group`]).
const PARTITION_SHIFT: u32 = 48;
/// Set in the id of a queue group whose further partitions have groups of their own (a
/// queue made by [`crate::broker::replicate::Op::CreateSplitQueue`]); a queue made before
/// keeps every partition in its one group.
const SPLIT: u64 = 1 << 47;

/// The id of the group of a queue made by the metadata entry at `index`: twice the index
/// (plus one for the dead-letter queue made with it), marked [`SPLIT`] when its further
/// partitions have groups of their own.
pub fn queue_group_id(index: u64, split: bool) -> u64 {
    (index * 2) | if split { SPLIT } else { 0 }
}

/// The metadata index that made the queue of group `id` ([`queue_group_id`] reversed).
pub fn created_at(id: u64) -> u64 {
    (split_group(id).0 & !SPLIT) / 2
}

/// True when group `id` is a queue group whose further partitions have groups of their
/// own ([`SPLIT`]).
pub fn is_split(id: u64) -> bool {
    id & SPLIT != 0
}

/// The id of the group of partition `partition` of the queue whose group is `queue_group`.
/// Partition 0 lives in the queue group itself (with the consumer groups' state), so its
/// id is the queue group's; every further partition has a group
/// of its own, its id the queue group's with the partition number above bit 48 (a queue
/// group's id, twice a metadata index, stays far below).
pub fn partition_group(queue_group: u64, partition: u32) -> u64 {
    queue_group | (u64::from(partition) << PARTITION_SHIFT)
}

/// The queue group and the partition of group `id` ([`partition_group`] reversed; the
/// metadata group and a queue group are partition 0).
pub fn split_group(id: u64) -> (u64, u32) {
    let partition = u32::try_from(id >> PARTITION_SHIFT).unwrap_or(u32::MAX);
    (id & ((1 << PARTITION_SHIFT) - 1), partition)
}
