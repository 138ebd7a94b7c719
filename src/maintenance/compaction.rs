//! Key compaction policy (Kafka log-cleaner semantics) over a partition's sealed segments:
//! keep the newest record per key, keep keyless records, and keep a tombstone (a keyed record
//! with an empty value) for `delete_retention`, then drop it too. Offsets are preserved.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use crate::log::compaction::RewriteStats;
use crate::log::{LogError, PartitionLog, StoredRecord};

/// Records read per step while indexing keys.
const READ_CHUNK: usize = 4096;

/// The newest offset of every key in the partition (active segment included).
pub fn newest_offsets(log: &PartitionLog) -> Result<HashMap<Bytes, u64>, LogError> {
    let mut newest = HashMap::new();
    let end = log.next_offset();
    let mut from = log.first_offset();
    while from < end {
        let records = log.read(from, READ_CHUNK, 64 * 1024 * 1024)?;
        let Some(last) = records.last() else { break };
        from = last.offset + 1;
        for r in records {
            if let Some(key) = r.key {
                // Copy: the map must not pin whole segment maps.
                newest.insert(Bytes::copy_from_slice(&key), r.offset);
            }
        }
    }
    Ok(newest)
}

/// Whether compaction keeps `record`.
pub fn keeps(
    record: &StoredRecord,
    newest: &HashMap<Bytes, u64>,
    now_ms: i64,
    delete_retention: Duration,
) -> bool {
    let Some(key) = &record.key else {
        return true;
    };
    if newest
        .get(key.as_ref())
        .is_some_and(|o| *o != record.offset)
    {
        return false;
    }
    let expired_tombstone = record.value.is_empty()
        && record.timestamp_ms < now_ms - delete_retention.as_millis() as i64;
    !expired_tombstone
}

/// Compacts every sealed segment of `log`; `pace` is called with the bytes rewritten after
/// each segment (to bound I/O).
pub fn compact(
    log: &PartitionLog,
    now_ms: i64,
    delete_retention: Duration,
    pace: &mut dyn FnMut(u64),
) -> Result<RewriteStats, LogError> {
    let newest = newest_offsets(log)?;
    let mut total = RewriteStats::default();
    for segment in log.segments().into_iter().filter(|s| s.sealed) {
        let mut keep = |r: &StoredRecord| keeps(r, &newest, now_ms, delete_retention);
        let stats = log.rewrite_sealed(segment.base_offset, &mut keep)?;
        total.records_removed += stats.records_removed;
        total.bytes_reclaimed += stats.bytes_reclaimed;
        if stats.records_removed > 0 {
            pace(segment.bytes);
        }
    }
    Ok(total)
}
