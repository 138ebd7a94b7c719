//! Record-level access for adapters that carry their own message model (the Kafka
//! listener): append log records to a chosen partition with the producer's timestamp, key
//! and header bytes kept as they are, and read stored records back without the lossy text
//! conversion of [`super::Delivery`].

use crate::log::{Record, StoredRecord};

use super::{Broker, BrokerError};

/// First retained offset and next offset of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionBounds {
    /// First retained offset (the log start).
    pub first: u64,
    /// One past the last written offset (the high watermark).
    pub next: u64,
}

impl Broker {
    /// Number of partitions of `queue`.
    pub fn partition_count(&self, queue: &str) -> Result<u32, BrokerError> {
        Ok(self.queue(queue)?.partitions.len() as u32)
    }

    /// The retained offset range of one partition.
    pub fn partition_bounds(
        &self,
        queue: &str,
        partition: u32,
    ) -> Result<PartitionBounds, BrokerError> {
        let q = self.queue(queue)?;
        let log = self.partition(&q, partition)?;
        Ok(PartitionBounds {
            first: log.first_offset(),
            next: log.next_offset(),
        })
    }

    /// Appends `records` as they are (timestamps, keys and headers kept) to one partition,
    /// as one contiguous run; returns the offset of the first. Each record is checked
    /// against the queue's `max_message_bytes` (key, header names and values, value).
    pub async fn append_records(
        &self,
        queue: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<u64, BrokerError> {
        self.check_running()?;
        if records.is_empty() {
            return Err(BrokerError::InvalidArgument("no records to append".into()));
        }
        let q = self.queue(queue)?;
        if q.is_deleted() {
            return Err(BrokerError::QueueNotFound(queue.to_string()));
        }
        let limit = q.settings.max_message_bytes;
        for record in &records {
            let size = record_size(record);
            if size > limit {
                return Err(BrokerError::MessageTooLarge { size, limit });
            }
        }
        let count = records.len() as u64;
        let started = std::time::Instant::now();
        let first = self.partition(&q, partition)?.append(records).await?;
        q.notify.notify_waiters();
        q.publish_metrics().published.increment(count);
        q.publish_metrics()
            .latency
            .record(started.elapsed().as_secs_f64());
        Ok(first)
    }

    /// Reads stored records of one partition from `from` (clamped up to the first retained
    /// offset) within the budgets; at least one record when any exists at or past `from`.
    pub fn read_records(
        &self,
        queue: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, BrokerError> {
        let q = self.queue(queue)?;
        Ok(self
            .partition(&q, partition)?
            .read(from, max_records, max_bytes)?)
    }

    /// The first offset of one partition whose record has a timestamp at or after
    /// `timestamp_ms`, with that timestamp; `None` when no record is that late.
    pub fn offset_for_time(
        &self,
        queue: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<Option<(u64, i64)>, BrokerError> {
        let q = self.queue(queue)?;
        let log = self.partition(&q, partition)?;
        let Some(offset) = log.offset_for_timestamp(timestamp_ms)? else {
            return Ok(None);
        };
        let found = log
            .read(offset, 1, usize::MAX)?
            .first()
            .map_or(timestamp_ms, |r| r.timestamp_ms);
        Ok(Some((offset, found)))
    }
}

/// The bytes of a record counted against `max_message_bytes`.
fn record_size(record: &Record) -> u64 {
    let headers: usize = record
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    (record.value.len() + record.key.as_ref().map_or(0, |k| k.len()) + headers) as u64
}
