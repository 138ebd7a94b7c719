//! Record-level access for adapters that carry their own message model (the Kafka
//! listener): append log records to a chosen partition with the producer's timestamp, key
//! and header bytes kept as they are, and read stored records back without the lossy text
//! conversion of [`super::Delivery`].

use std::sync::Arc;

use crate::log::{Record, StoredRecord};

use super::queue::Queue;
use super::replicate::{Op, WireRecord};
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
        self.append_records_once(queue, partition, records, None)
            .await
    }

    /// [`Self::append_records`], once per `batch_key` within the queue's dedup window
    /// when one is given: an append with a key seen there answers the first offset the
    /// first one got and stores nothing (a retried batch, also one retried through
    /// another cluster node). On a cluster node the append is a replicated op of the
    /// partition's group, answered once committed.
    pub async fn append_records_once(
        &self,
        queue: &str,
        partition: u32,
        records: Vec<Record>,
        batch_key: Option<String>,
    ) -> Result<u64, BrokerError> {
        self.check_running()?;
        if records.is_empty() {
            return Err(BrokerError::InvalidArgument("no records to append".into()));
        }
        let started = std::time::Instant::now();
        let now_ms = self.clock().now_ms();
        // Looked up once: for the checks and the latency, as a publish does.
        let found = self.queue(queue).ok();
        let first = match self.replicator() {
            Some(replicator) => {
                // Checked before it is proposed, as a publish is (the apply checks again).
                if let Some(q) = &found {
                    super::message::check_record_sizes(&records, q.settings.max_message_bytes)?;
                }
                let op = Op::AppendRecords {
                    queue: queue.to_string(),
                    partition,
                    records: records.into_iter().map(WireRecord::from).collect(),
                    batch_key,
                    now_ms,
                };
                let published = replicator.submit(op).await?.published()?;
                published
                    .first()
                    .map(|p| p.offset)
                    .ok_or_else(|| BrokerError::InvalidArgument("nothing appended".into()))?
            }
            None => {
                self.append_records_local(queue, partition, records, batch_key, now_ms)
                    .await?
            }
        };
        super::record_publish_latency(found.as_ref(), started, 1);
        Ok(first)
    }

    /// Appends on this node's own state (the single node, and every replica's apply).
    pub(super) async fn append_records_local(
        &self,
        queue: &str,
        partition: u32,
        records: Vec<Record>,
        batch_key: Option<String>,
        now_ms: i64,
    ) -> Result<u64, BrokerError> {
        let q = self.live_queue(queue)?;
        super::message::check_record_sizes(&records, q.settings.max_message_bytes)?;
        match batch_key {
            Some(key) => {
                if records.is_empty() {
                    return Err(BrokerError::InvalidArgument("no records to append".into()));
                }
                let count = records.len() as u64;
                let first = q.append_once(partition, records, &key, now_ms).await?;
                q.notify.notify_waiters();
                q.series.published.increment(count);
                Ok(first)
            }
            None => self.store_records(&q, partition, records).await,
        }
    }

    /// Appends records a partition's leader sequenced (a replica applying them, see
    /// [`super::sequencer`]) as they are: the leader checked what they came from as a
    /// single node checks it (a publish's bodies, an append's records), so they are not
    /// checked again here (a record carries headers, an idempotency key among them, that
    /// a publish's check does not count).
    pub async fn append_sequenced_local(
        &self,
        queue: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<u64, BrokerError> {
        let q = self.live_queue(queue)?;
        self.store_records(&q, partition, records).await
    }

    /// Takes note of records a partition's Raft log wrote into the partition itself, from
    /// offset `first` (a replica applying a partition group's entry whose log is the
    /// partition's segment log, `cluster::partition_log_store`): what
    /// [`Self::append_sequenced_local`] does but the append, which happened as the entry
    /// was written. Their idempotency keys join the window, waiters are woken.
    pub async fn note_stored(
        &self,
        queue: &str,
        partition: u32,
        first: u64,
        records: &[Record],
    ) -> Result<u64, BrokerError> {
        let q = self.live_queue(queue)?;
        self.partition(&q, partition)?;
        q.note_keys(partition, first, super::sequencer::keys_of(records))
            .await?;
        q.notify.notify_waiters();
        q.series.published.increment(records.len() as u64);
        Ok(first)
    }

    /// The log of `partition` of `queue` (a cluster group whose Raft log it is).
    pub fn partition_log(
        &self,
        queue: &str,
        partition: u32,
    ) -> Result<crate::log::PartitionLog, BrokerError> {
        let q = self.queue(queue)?;
        self.partition(&q, partition).cloned()
    }

    /// The queue named `queue`, unless it is being deleted.
    fn live_queue(&self, queue: &str) -> Result<Arc<Queue>, BrokerError> {
        let q = self.queue(queue)?;
        if q.is_deleted() {
            return Err(BrokerError::QueueNotFound(queue.to_string()));
        }
        Ok(q)
    }

    /// Appends `records` to `partition` of `q` as one run and remembers their idempotency
    /// keys (records a partition's leader sequenced carry them: known here now, for when
    /// this replica leads, see [`super::sequencer`]); returns the first one's offset.
    async fn store_records(
        &self,
        q: &Queue,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<u64, BrokerError> {
        if records.is_empty() {
            return Err(BrokerError::InvalidArgument("no records to append".into()));
        }
        let count = records.len() as u64;
        let keys = super::sequencer::keys_of(&records);
        let first = self.partition(q, partition)?.append(records).await?;
        q.note_keys(partition, first, keys).await?;
        q.notify.notify_waiters();
        q.series.published.increment(count);
        Ok(first)
    }

    /// The committed offset of each partition of `group` on `queue` (`None`: no such
    /// group). On a cluster node it is read on the leader of the queue's group (a node
    /// without a replica holds none of its data).
    pub async fn committed_offsets_at_leader(
        &self,
        queue: &str,
        group: &str,
    ) -> Result<Option<Vec<(u32, u64)>>, BrokerError> {
        self.check_running()?;
        match self.replicator() {
            Some(replicator) => {
                let op = Op::GroupOffsets {
                    queue: queue.to_string(),
                    group: group.to_string(),
                };
                replicator.submit(op).await?.offsets()
            }
            None => self.committed_offsets(queue, group),
        }
    }

    /// The committed offset of each partition of `group` on `queue` in this node's own
    /// state (`None`: no such group).
    pub fn committed_offsets(
        &self,
        queue: &str,
        group: &str,
    ) -> Result<Option<Vec<(u32, u64)>>, BrokerError> {
        match self.group_info(queue, group) {
            Ok(info) => Ok(Some(
                info.partitions
                    .iter()
                    .map(|p| (p.partition, p.committed_offset))
                    .collect(),
            )),
            Err(BrokerError::GroupNotFound { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Moves `group`'s committed offset on one partition of `queue` to `offset` (clamped
    /// to the partition's bounds), creating the group if needed: a seek that does not read
    /// the group back (a cluster node without a replica of the queue has no copy of it).
    pub async fn commit_offset(
        &self,
        queue: &str,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), BrokerError> {
        self.check_running()?;
        let target = super::SeekTarget::Offset { partition, offset };
        match self.replicator() {
            Some(replicator) => {
                let op = Op::Seek {
                    queue: queue.to_string(),
                    group: group.to_string(),
                    target: target.into(),
                };
                replicator.submit(op).await?.done()
            }
            None => self.seek(queue, group, target).await.map(|_| ()),
        }
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
