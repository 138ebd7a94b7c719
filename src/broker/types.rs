//! Types the broker exchanges with its adapters: ids, messages, infos, errors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::settings::{InvalidSetting, QueueSettings};
use crate::clock::Clock;
use crate::log::{FsyncPolicy, LogError};

/// A message id: `"{partition}-{offset}"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// Partition number.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.partition, self.offset)
    }
}

impl FromStr for MessageId {
    type Err = BrokerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BrokerError::InvalidArgument(format!("malformed message id `{s}`"));
        let (p, o) = s.split_once('-').ok_or_else(bad)?;
        Ok(MessageId {
            partition: p.parse().map_err(|_| bad())?,
            offset: o.parse().map_err(|_| bad())?,
        })
    }
}

/// A message to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewMessage {
    /// Partitioning / compaction / ordering key.
    pub key: Option<String>,
    /// User headers.
    pub headers: BTreeMap<String, String>,
    /// MIME type of the body, kept with it (e.g. `application/json`).
    pub content_type: Option<String>,
    /// The payload, byte for byte.
    pub body: Bytes,
    /// Idempotency key: a repeat within the queue's dedup window stores nothing.
    pub idempotency_key: Option<String>,
}

/// Where a published message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Published {
    /// `"{partition}-{offset}"`.
    #[serde(serialize_with = "serialize_display")]
    #[schema(value_type = String, example = "0-42")]
    pub id: MessageId,
    /// Partition number.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
}

fn serialize_display<S: serde::Serializer, T: fmt::Display>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A delivered (leased) or replayed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The queue it belongs to.
    pub queue: String,
    /// Its id (partition and offset).
    pub id: MessageId,
    /// Publish time, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// Key, if any.
    pub key: Option<String>,
    /// User headers (internal ones hidden).
    pub headers: BTreeMap<String, String>,
    /// MIME type given at publish.
    pub content_type: Option<String>,
    /// The payload.
    pub body: Bytes,
    /// 1 on first delivery; 0 for a replay without lease.
    pub delivery_count: u32,
}

/// Summary of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PartitionInfo {
    /// Partition number.
    pub partition: u32,
    /// First retained offset.
    pub first_offset: u64,
    /// Next offset to be written.
    pub next_offset: u64,
    /// Number of segments.
    pub segments: u32,
    /// Bytes of `.log` files.
    pub bytes: u64,
}

/// Summary of one group on a queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupSummary {
    /// Group name.
    pub name: String,
    /// Messages not yet done for this group (not acked nor dead-lettered).
    pub backlog: u64,
    /// Leases held now.
    pub in_flight: u64,
    /// Messages this group sent to the dead-letter queue.
    pub dead_lettered: u64,
}

/// An exchange as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ExchangeInfo {
    /// Name.
    pub name: String,
    /// Routing type.
    #[serde(rename = "type")]
    pub kind: crate::route::ExchangeKind,
    /// Bindings in the order they were made.
    pub bindings: Vec<crate::route::Binding>,
}

/// Queue info.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueInfo {
    /// Queue name.
    pub name: String,
    /// Effective settings.
    pub settings: QueueSettings,
    /// Partitions.
    pub partitions: Vec<PartitionInfo>,
    /// Groups.
    pub groups: Vec<GroupSummary>,
}

impl QueueInfo {
    /// The part of this snapshot the state gauges show (the metrics layer's own types).
    pub fn gauges(&self) -> crate::metrics::QueueGauges {
        crate::metrics::QueueGauges {
            name: self.name.clone(),
            partitions: self
                .partitions
                .iter()
                .map(|p| crate::metrics::PartitionGauges {
                    partition: p.partition,
                    bytes: p.bytes,
                    segments: p.segments,
                })
                .collect(),
            groups: self
                .groups
                .iter()
                .map(|g| crate::metrics::GroupGauges {
                    name: g.name.clone(),
                    backlog: g.backlog,
                    in_flight: g.in_flight,
                })
                .collect(),
        }
    }
}

/// Per-partition state of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupPartitionInfo {
    /// Partition number.
    pub partition: u32,
    /// Ack floor: every offset below is done.
    pub committed_offset: u64,
    /// Messages not yet done.
    pub backlog: u64,
    /// Leases held now.
    pub in_flight: u64,
}

/// Detailed group state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupInfo {
    /// Queue name.
    pub queue: String,
    /// Group name.
    pub name: String,
    /// Per partition.
    pub partitions: Vec<GroupPartitionInfo>,
    /// Total backlog.
    pub backlog: u64,
    /// Total leases held.
    pub in_flight: u64,
    /// Deliveries beyond the first, since the broker started.
    pub redelivered: u64,
    /// Messages sent to the dead-letter queue.
    pub dead_lettered: u64,
}

/// Where a seek moves a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeekTarget {
    /// The earliest retained offset of every partition.
    Earliest,
    /// The end of every partition (skip the backlog).
    Latest,
    /// An offset in one partition.
    Offset {
        /// Partition number.
        partition: u32,
        /// Target offset.
        offset: u64,
    },
    /// The first message at or after a time, in every partition.
    Time(i64),
}

/// Where a replay read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadFrom {
    /// At an offset.
    Offset(u64),
    /// At the first message with timestamp >= this (ms).
    Time(i64),
}

/// One queue a message was routed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Routed {
    /// Queue name.
    pub queue: String,
    /// Id in that queue.
    #[serde(serialize_with = "serialize_display")]
    #[schema(value_type = String, example = "0-42")]
    pub id: MessageId,
}

/// Broker-wide settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Root of all state.
    pub data_dir: PathBuf,
    /// Durability policy for appends and group journals.
    pub fsync: FsyncPolicy,
    /// Most queues the broker holds (dead-letter queues count).
    pub max_queues: usize,
    /// Where "now" comes from (the system clock; a manual one in tests).
    pub clock: Clock,
    /// Most consumer groups one queue holds (each has a journal and state).
    pub max_groups_per_queue: usize,
    /// Where the data lives: the real disk, or a simulated one in tests.
    pub storage: crate::storage::SharedStorage,
}

/// What [`super::Broker::create_queue_reporting`] did.
#[derive(Debug, Clone)]
pub struct CreatedQueue {
    /// The queue as it is now.
    pub info: QueueInfo,
    /// True if this call created the queue (false: it existed with equal settings).
    pub created: bool,
    /// The dead-letter queue this call created with it, if any (an existing one is used as
    /// it is).
    pub dead_letter_created: Option<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("qit-data"),
            fsync: FsyncPolicy::Interval,
            max_queues: 10_000,
            clock: Clock::system(),
            max_groups_per_queue: 1_000,
            storage: crate::storage::disk(),
        }
    }
}

/// Errors of broker operations; `api::error` maps them to HTTP and gRPC statuses.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A queue/group/exchange name is malformed (or a path built from it would leave its
    /// directory).
    #[error(transparent)]
    InvalidName(#[from] crate::name::NameError),
    /// A setting is out of range.
    #[error(transparent)]
    InvalidSetting(#[from] InvalidSetting),
    /// Any other malformed input.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such queue.
    #[error("queue `{0}` not found")]
    QueueNotFound(String),
    /// No such group.
    #[error("group `{group}` not found on queue `{queue}`")]
    GroupNotFound {
        /// Queue name.
        queue: String,
        /// Group name.
        group: String,
    },
    /// A group still has leases in flight (deleting it is refused).
    #[error(
        "group `{group}` of queue `{queue}` has {in_flight} messages in flight: ack or nack them, or let their leases expire, before deleting it"
    )]
    GroupInUse {
        /// Queue name.
        queue: String,
        /// Group name.
        group: String,
        /// Leases in flight.
        in_flight: u64,
    },
    /// No such exchange.
    #[error("exchange `{0}` not found")]
    ExchangeNotFound(String),
    /// No message with this id.
    #[error("message `{0}` not found")]
    MessageNotFound(MessageId),
    /// The message is not leased to this group now (nack/extend of an acked or expired lease).
    #[error("message `{0}` is not leased")]
    NotLeased(MessageId),
    /// The queue exists with other settings.
    #[error("queue `{0}` already exists with different settings")]
    QueueExists(String),
    /// The exchange exists with another type.
    #[error("exchange `{0}` already exists with a different type")]
    ExchangeExists(String),
    /// Message (body, key, headers, content type, idempotency key) over `max_message_bytes`.
    #[error("message of {size} bytes (body, key and headers) exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// Payload size.
        size: u64,
        /// The queue's limit.
        limit: u64,
    },
    /// A resource cap was reached (queues, waiters, ...).
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The queue's stored data could not be opened at start (named in `reason`, with file
    /// and byte position); the rest of the broker serves. Deleting the queue clears it.
    #[error("queue `{queue}` is unavailable, its stored data is damaged: {reason}")]
    QueueDamaged {
        /// Queue name.
        queue: String,
        /// What opening it reported.
        reason: String,
    },
    /// A binding is malformed.
    #[error(transparent)]
    InvalidBinding(#[from] crate::route::RouteError),
    /// The partition log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A group journal failed.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// Broker metadata or journal I/O failed.
    #[error("storage error on {path}: {source}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The queue's (or the metadata's) replication group has no leader now (cluster
    /// mode): try again shortly.
    #[error("no leader: {0}")]
    NoLeader(String),
    /// A user, grant or ownership change was refused (or its file failed).
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// An error another cluster node answered with, by its API code.
    #[error("{message}")]
    Remote {
        /// The API error code.
        code: String,
        /// The human message.
        message: String,
    },
    /// Stored metadata is damaged.
    #[error("corrupt state in {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}
