//! The replication seam: every state-changing broker call as a serializable [`Op`], the
//! [`Replicator`] that a cluster installs to run ops through consensus (or on another node),
//! and [`Broker::apply_op`], the one local apply path that the single node and every
//! replica's state machine share.
//!
//! Without a replicator (the single node) the broker calls its local paths directly, so a
//! lone node pays nothing for this module. With one, the public broker methods turn into
//! ops and hand them to it; the cluster either proposes them (replicated ops: publish, the
//! Kafka adapter's record appends, ack, seek, dead-letter completion, delivery counts,
//! metadata, users and grants) or forwards them to the node holding the leases (receive,
//! nack, extend, redrive, and reads of a group's committed offsets for a node without a
//! replica), which runs them with [`Broker::apply_op`].

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::access::AccessOp;
use super::{
    Binding, Broker, BrokerError, Delivery, ExchangeKind, GroupInfo, MessageId, NewMessage,
    QueueInfo, QueueSettings, ReadFrom, SeekTarget,
};

/// A message to publish, as it travels in an op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    /// Key.
    pub key: Option<String>,
    /// User headers.
    pub headers: BTreeMap<String, String>,
    /// Content type.
    pub content_type: Option<String>,
    /// Body.
    pub body: Bytes,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// The partition its proposer chose for it in turn when it has no key (a cluster
    /// leader's round robin, see [`super::queue::Queue::next_turn`]); `None` for keyed
    /// messages and before the proposer chose. Carried only inside an encoded publish
    /// entry, not by this op's serde form, whose earlier entries must decode as before.
    #[serde(skip)]
    pub partition: Option<u32>,
}

impl WireMessage {
    /// The bytes counted against a queue's `max_message_bytes` ([`message::message_size`]).
    pub fn size(&self) -> u64 {
        super::message::record_size(
            &self.body,
            self.key.as_deref(),
            &self.headers,
            self.content_type.as_deref(),
            self.idempotency_key.as_deref(),
        )
    }
}

impl From<NewMessage> for WireMessage {
    fn from(m: NewMessage) -> Self {
        Self {
            key: m.key,
            headers: m.headers,
            content_type: m.content_type,
            body: m.body,
            idempotency_key: m.idempotency_key,
            partition: None,
        }
    }
}

impl From<WireMessage> for NewMessage {
    fn from(m: WireMessage) -> Self {
        Self {
            key: m.key,
            headers: m.headers,
            content_type: m.content_type,
            body: m.body,
            idempotency_key: m.idempotency_key,
        }
    }
}

/// A log record as it travels in an op (the Kafka adapter's produce: the producer's
/// timestamp, key and header bytes kept as they are).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Key bytes.
    pub key: Option<Bytes>,
    /// Headers in order.
    pub headers: Vec<(String, Bytes)>,
    /// The payload.
    pub value: Bytes,
}

impl From<crate::log::Record> for WireRecord {
    fn from(r: crate::log::Record) -> Self {
        Self {
            timestamp_ms: r.timestamp_ms,
            key: r.key,
            headers: r.headers,
            value: r.value,
        }
    }
}

impl From<crate::log::StoredRecord> for WireRecord {
    fn from(r: crate::log::StoredRecord) -> Self {
        Self {
            timestamp_ms: r.timestamp_ms,
            key: r.key,
            headers: r.headers,
            value: r.value,
        }
    }
}

impl From<WireRecord> for crate::log::Record {
    fn from(r: WireRecord) -> Self {
        Self {
            timestamp_ms: r.timestamp_ms,
            key: r.key,
            headers: r.headers,
            value: r.value,
        }
    }
}

/// A delivery, as it travels back from the node that leased it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDelivery {
    /// Queue.
    pub queue: String,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Publish time in ms.
    pub timestamp_ms: i64,
    /// Key.
    pub key: Option<String>,
    /// User headers.
    pub headers: BTreeMap<String, String>,
    /// Content type.
    pub content_type: Option<String>,
    /// Body.
    pub body: Bytes,
    /// Delivery count.
    pub delivery_count: u32,
}

impl WireDelivery {
    /// The delivered message's id.
    pub fn id(&self) -> MessageId {
        MessageId {
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// Message ids as ops carry them, `(partition, offset)`.
pub fn wire_ids(ids: &[MessageId]) -> Vec<(u32, u64)> {
    ids.iter().map(|id| (id.partition, id.offset)).collect()
}

/// Message ids from the `(partition, offset)` pairs an op carries.
fn message_ids(ids: Vec<(u32, u64)>) -> Vec<MessageId> {
    ids.into_iter()
        .map(|(partition, offset)| MessageId { partition, offset })
        .collect()
}

impl From<Delivery> for WireDelivery {
    fn from(d: Delivery) -> Self {
        Self {
            queue: d.queue,
            partition: d.id.partition,
            offset: d.id.offset,
            timestamp_ms: d.timestamp_ms,
            key: d.key,
            headers: d.headers,
            content_type: d.content_type,
            body: d.body,
            delivery_count: d.delivery_count,
        }
    }
}

impl From<WireDelivery> for Delivery {
    fn from(d: WireDelivery) -> Self {
        Self {
            id: d.id(),
            queue: d.queue,
            timestamp_ms: d.timestamp_ms,
            key: d.key,
            headers: d.headers,
            content_type: d.content_type,
            body: d.body,
            delivery_count: d.delivery_count,
        }
    }
}

/// A seek target as it travels in an op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireSeek {
    /// Earliest retained.
    Earliest,
    /// The end.
    Latest,
    /// One partition's offset.
    Offset {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
    },
    /// First message at or after this time (ms).
    Time(i64),
}

impl From<SeekTarget> for WireSeek {
    fn from(t: SeekTarget) -> Self {
        match t {
            SeekTarget::Earliest => Self::Earliest,
            SeekTarget::Latest => Self::Latest,
            SeekTarget::Offset { partition, offset } => Self::Offset { partition, offset },
            SeekTarget::Time(ms) => Self::Time(ms),
        }
    }
}

impl From<WireSeek> for SeekTarget {
    fn from(t: WireSeek) -> Self {
        match t {
            WireSeek::Earliest => Self::Earliest,
            WireSeek::Latest => Self::Latest,
            WireSeek::Offset { partition, offset } => Self::Offset { partition, offset },
            WireSeek::Time(ms) => Self::Time(ms),
        }
    }
}

/// One state-changing broker call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Append messages, stamped with `now_ms` by the node that proposed them (so every
    /// replica stores the same timestamps and dedup decisions).
    Publish {
        /// Queue.
        queue: String,
        /// Messages.
        messages: Vec<WireMessage>,
        /// Publish time.
        now_ms: i64,
    },
    /// Acknowledge messages for a group.
    Ack {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
        /// `(partition, offset)` of each message.
        ids: Vec<(u32, u64)>,
    },
    /// Move a group's position.
    Seek {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
        /// Where to.
        target: WireSeek,
    },
    /// A dead letter reached its dead-letter queue: done for its group.
    DeadLetterDone {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
    },
    /// Create a queue.
    CreateQueue {
        /// Name.
        name: String,
        /// Settings.
        #[serde(with = "as_json")]
        settings: QueueSettings,
    },
    /// Delete a queue.
    DeleteQueue {
        /// Name.
        name: String,
    },
    /// Create an exchange.
    CreateExchange {
        /// Name.
        name: String,
        /// Type.
        kind: ExchangeKind,
    },
    /// Delete an exchange.
    DeleteExchange {
        /// Name.
        name: String,
    },
    /// Bind a queue.
    Bind {
        /// Exchange.
        exchange: String,
        /// Binding.
        #[serde(with = "as_json")]
        binding: Binding,
    },
    /// Remove a binding.
    Unbind {
        /// Exchange.
        exchange: String,
        /// Binding.
        #[serde(with = "as_json")]
        binding: Binding,
    },
    /// Lease messages (leader-local: runs where the leases are, never replicated).
    Receive {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
        /// Most messages.
        max: usize,
        /// Longest wait in ms.
        wait_ms: u64,
        /// Visibility timeout in ms.
        visibility_ms: Option<u64>,
    },
    /// End a lease without an ack (leader-local).
    Nack {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// Redelivery delay in ms.
        delay_ms: Option<u64>,
    },
    /// Extend a lease (leader-local).
    Extend {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// New visibility in ms.
        visibility_ms: u64,
    },
    /// A change of users, ownership or grants (metadata group).
    Access(AccessOp),
    /// Move dead letters back into `queue` (runs on the leader of the dead-letter queue,
    /// which holds its leases; each move is a replicated publish and ack).
    Redrive {
        /// The queue they go back to.
        queue: String,
        /// Its dead-letter queue.
        dead_letter: String,
        /// Most messages to move (all when absent).
        max: Option<u64>,
    },
    /// Delivery counts of messages leased, or whose lease ended without an ack (nack,
    /// expiry), from the leader to every replica, so that a new leader goes on counting.
    DeliveryCounts {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
        /// `(partition, offset, delivery count)`.
        counts: Vec<(u32, u64, u32)>,
    },
    // New variants go last: stored entries name their variant by its index.
    /// Append records as they are to one partition (the Kafka adapter's produce), once
    /// per `batch_key` within the queue's dedup window.
    AppendRecords {
        /// Queue.
        queue: String,
        /// Partition.
        partition: u32,
        /// The records.
        records: Vec<WireRecord>,
        /// The batch's idempotence key (an idempotent Kafka producer's id, epoch and
        /// sequence), kept as the first record's idempotency header.
        batch_key: Option<String>,
        /// Append time, for the dedup window.
        now_ms: i64,
    },
    /// Read a group's committed offsets on the leader of the queue's group (not
    /// replicated: for a node that holds no replica of the queue).
    GroupOffsets {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
    },
    /// Read a queue's info where its state is current: on the leader of the queue's group,
    /// which alone holds the leases (not replicated, see [`Op::is_read`]).
    QueueInfo {
        /// Queue.
        queue: String,
    },
    /// Read a group's state on the leader of the queue's group (not replicated).
    GroupInfo {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
    },
    /// Read messages of one partition without leasing them, on the leader of the queue's
    /// group (not replicated).
    ReadLog {
        /// Queue.
        queue: String,
        /// Partition.
        partition: u32,
        /// Where to start.
        from: ReadFrom,
        /// Most messages.
        max: u64,
    },
    /// Delete a consumer group (its leader checked that it exists and is idle).
    DeleteGroup {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
    },
    /// Give several leases back without delay: a consumer that went away (leader-local).
    Release {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
        /// `(partition, offset)` of each lease.
        ids: Vec<(u32, u64)>,
    },
    /// Create a queue whose partitions after the first each have a Raft group of their
    /// own (a cluster's queues since that layout; [`Op::CreateQueue`] entries written
    /// before make queues whose group holds every partition, as they always did).
    CreateSplitQueue {
        /// Name.
        name: String,
        /// Settings.
        #[serde(with = "as_json")]
        settings: QueueSettings,
    },
    /// Move a group's position to offsets its proposer resolved from a [`Op::Seek`]'s
    /// target by its own logs: every replica moves to the same ones, also where its copy
    /// of a partition is behind the proposer's (each partition after the first is
    /// replicated by a group of its own).
    SeekTo {
        /// Queue.
        queue: String,
        /// Group.
        group: String,
        /// `(partition, offset)`.
        offsets: Vec<(u32, u64)>,
    },
    /// [`Op::CreateSplitQueue`] by a user, who owns what it creates (the queue, and a
    /// dead-letter queue made with it), recorded by the same entry: a create that commits
    /// after its answer was lost (a 503) and is sent again finds the queue owned by its
    /// creator, as a separate ownership entry after an answer would not leave it.
    CreateOwnedQueue {
        /// Name.
        name: String,
        /// Settings.
        #[serde(with = "as_json")]
        settings: QueueSettings,
        /// The creator.
        owner: String,
    },
    /// [`Op::CreateExchange`] by a user, who owns the exchange if this creates it (in the
    /// same entry, as [`Op::CreateOwnedQueue`]).
    CreateOwnedExchange {
        /// Name.
        name: String,
        /// Type.
        kind: ExchangeKind,
        /// The creator.
        owner: String,
    },
}

/// Fields whose serde form skips absent values (queue settings, bindings) travel as JSON
/// text: the binary codec the cluster uses needs every field present.
mod as_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(value).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, T: serde::de::DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}

/// Where an op runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope<'a> {
    /// The metadata group.
    Meta,
    /// The group of this queue, as a replicated entry.
    Queue(&'a str),
    /// On the leader of this queue's group, not replicated (leases).
    Leases(&'a str),
}

impl Op {
    /// True for an op that only reads: never an entry, it runs on the leader of its
    /// queue's group without a quorum round first, or on a replica when no leader
    /// answers (read fallback).
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Op::GroupOffsets { .. }
                | Op::QueueInfo { .. }
                | Op::GroupInfo { .. }
                | Op::ReadLog { .. }
        )
    }

    /// Where this op runs.
    pub fn scope(&self) -> Scope<'_> {
        match self {
            Op::Publish { queue, .. }
            | Op::Ack { queue, .. }
            | Op::Seek { queue, .. }
            | Op::DeadLetterDone { queue, .. }
            | Op::DeliveryCounts { queue, .. }
            | Op::AppendRecords { queue, .. }
            | Op::DeleteGroup { queue, .. }
            | Op::SeekTo { queue, .. } => Scope::Queue(queue),
            Op::Receive { queue, .. }
            | Op::Nack { queue, .. }
            | Op::Release { queue, .. }
            | Op::Extend { queue, .. }
            | Op::GroupOffsets { queue, .. }
            | Op::QueueInfo { queue }
            | Op::GroupInfo { queue, .. }
            | Op::ReadLog { queue, .. } => Scope::Leases(queue),
            Op::Redrive { dead_letter, .. } => Scope::Leases(dead_letter),
            Op::CreateQueue { .. }
            | Op::CreateSplitQueue { .. }
            | Op::CreateOwnedQueue { .. }
            | Op::DeleteQueue { .. }
            | Op::CreateExchange { .. }
            | Op::CreateOwnedExchange { .. }
            | Op::DeleteExchange { .. }
            | Op::Bind { .. }
            | Op::Unbind { .. }
            | Op::Access(_) => Scope::Meta,
        }
    }
}

/// What an op did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// Nothing to report.
    Done,
    /// Where each published message went, `(partition, offset)`.
    Published(Vec<(u32, u64)>),
    /// One outcome per acked id.
    Acked(Vec<Result<(), WireError>>),
    /// A queue create: created now, and the dead-letter queue made with it.
    Created {
        /// True if this op created it.
        created: bool,
        /// The dead-letter queue created with it.
        dead_letter_created: Option<String>,
    },
    /// An exchange create: created now.
    ExchangeCreated(bool),
    /// Leased messages.
    Delivered(Vec<WireDelivery>),
    /// How many dead letters a redrive moved.
    Moved(u64),
    /// A group's committed offset per partition (`None`: no such group).
    Offsets(Option<Vec<(u32, u64)>>),
    /// A queue's info, as JSON (its settings skip absent fields, which the cluster's
    /// binary codec cannot carry).
    QueueInfo(String),
    /// A group's state, as JSON.
    GroupInfo(String),
    /// Messages read without leasing, and the offset after them.
    Log {
        /// The messages.
        messages: Vec<WireDelivery>,
        /// The next offset to read.
        next: u64,
    },
}

/// A broker error as it travels between nodes: a stable code and the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Stable code (the API's error code).
    pub code: String,
    /// Human message.
    pub message: String,
}

impl From<&BrokerError> for WireError {
    fn from(error: &BrokerError) -> Self {
        // A `NoLeader` travels as its reason alone: it is a `NoLeader` again on arrival,
        // whose message says "no leader" once however many nodes it went through.
        let message = match error {
            BrokerError::NoLeader(why) => why.clone(),
            other => other.to_string(),
        };
        Self {
            code: error.code().to_string(),
            message,
        }
    }
}

impl From<WireError> for BrokerError {
    fn from(error: WireError) -> Self {
        match error.code.as_str() {
            "no_leader" => BrokerError::NoLeader(error.message),
            _ => BrokerError::Remote {
                code: error.code,
                message: error.message,
            },
        }
    }
}

impl BrokerError {
    /// True for a failure that trying again later may overcome (storage, no leader, a
    /// shutdown, an unknown remote failure); false for a refusal (a limit, a bad name or
    /// setting, a missing queue, ..) that trying again would only repeat.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.code(),
            "storage_error" | "no_leader" | "shutting_down" | "internal"
        )
    }

    /// The API error code of this error (also how it travels between cluster nodes).
    pub fn code(&self) -> &'static str {
        use BrokerError as E;
        match self {
            E::InvalidName(crate::name::NameError::Io { .. }) => "storage_error",
            E::InvalidName(_) => "invalid_name",
            E::InvalidSetting(_) => "invalid_setting",
            E::InvalidArgument(_) => "bad_request",
            E::InvalidBinding(_) => "invalid_binding",
            E::QueueNotFound(_) => "queue_not_found",
            E::GroupNotFound { .. } => "group_not_found",
            E::GroupInUse { .. } => "group_in_use",
            E::ExchangeNotFound(_) => "exchange_not_found",
            E::MessageNotFound(_) => "message_not_found",
            E::NotLeased(_) => "not_leased",
            E::QueueExists(_) => "queue_exists",
            E::ExchangeExists(_) => "exchange_exists",
            E::MessageTooLarge { .. } => "message_too_large",
            E::LimitReached(_) => "limit_reached",
            E::ShuttingDown => "shutting_down",
            E::QueueDamaged { .. } => "queue_damaged",
            E::NoLeader(_) => "no_leader",
            E::Auth(auth) => auth_code(auth.class()),
            E::Remote { code, .. } => known_code(code),
            E::Log(_) | E::Journal(_) | E::Storage { .. } | E::Corrupt { .. } => "storage_error",
        }
    }
}

/// The API code of an auth error of this class (as `api::error` answers it).
fn auth_code(class: crate::auth::ErrorClass) -> &'static str {
    use crate::auth::ErrorClass as C;
    match class {
        C::BadRequest => "bad_request",
        C::Unauthenticated => "unauthenticated",
        C::Forbidden => "forbidden",
        C::NotFound => "user_not_found",
        C::Conflict => "user_exists",
        C::TooManyRequests => "rate_limited",
        C::Internal => "storage_error",
    }
}

/// The static code for a code that came over the wire (unknown ones are `internal`).
pub fn known_code(code: &str) -> &'static str {
    const CODES: &[&str] = &[
        "storage_error",
        "invalid_name",
        "invalid_setting",
        "bad_request",
        "invalid_binding",
        "queue_not_found",
        "group_not_found",
        "group_in_use",
        "exchange_not_found",
        "message_not_found",
        "not_leased",
        "queue_exists",
        "exchange_exists",
        "message_too_large",
        "limit_reached",
        "shutting_down",
        "queue_damaged",
        "no_leader",
        "unauthenticated",
        "forbidden",
        "user_not_found",
        "user_exists",
        "rate_limited",
        "node_not_found",
        "membership_conflict",
    ];
    CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .unwrap_or("internal")
}

/// Runs ops through consensus or on the node that holds the leases (installed by the
/// cluster; absent on a single node).
pub trait Replicator: Send + Sync {
    /// Runs `op` and answers once it is committed and applied on this node.
    fn submit(&self, op: Op) -> BoxFuture<'_, Result<OpResult, BrokerError>>;

    /// Runs a read-only `op` ([`Op::is_read`]) where the queue's state is current, the
    /// leader of its group; `None` when this node answers it from its own copy instead (it
    /// leads the group, or it holds a replica and no leader answers: read fallback).
    fn read(&self, op: Op) -> BoxFuture<'_, Option<Result<OpResult, BrokerError>>> {
        let _ = op;
        Box::pin(std::future::ready(None))
    }

    /// False when this node holds no replica of `queue` (its copy stays empty).
    fn holds_replica(&self, queue: &str) -> bool {
        let _ = queue;
        true
    }

    /// Runs several publishes to `queue` that arrived together, each answered on its own
    /// (in order), as if each were submitted alone; a replicator may commit them together.
    fn submit_publishes(
        &self,
        queue: String,
        publishes: Vec<Vec<WireMessage>>,
        now_ms: i64,
    ) -> BoxFuture<'_, Vec<Result<OpResult, BrokerError>>> {
        Box::pin(submit_each(self, queue, publishes, now_ms))
    }
}

/// Submits each of `publishes` to `queue` on its own, side by side; the answers in order.
pub async fn submit_each<R: Replicator + ?Sized>(
    replicator: &R,
    queue: String,
    publishes: Vec<Vec<WireMessage>>,
    now_ms: i64,
) -> Vec<Result<OpResult, BrokerError>> {
    let each = publishes.into_iter().map(|messages| {
        replicator.submit(Op::Publish {
            queue: queue.clone(),
            messages,
            now_ms,
        })
    });
    futures_util::future::join_all(each).await
}

/// Queues whose info a listing asks other nodes for at once.
pub const LIST_READS: usize = 32;

/// `value` as JSON text, for an answer that carries it so.
fn to_json_text<T: Serialize>(value: &T) -> Result<String, BrokerError> {
    serde_json::to_string(value).map_err(|e| BrokerError::InvalidArgument(e.to_string()))
}

/// The value an answer carries as JSON text.
fn from_json_text<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, BrokerError> {
    serde_json::from_str(json).map_err(|e| {
        BrokerError::InvalidArgument(format!("undecodable answer from the cluster: {e}"))
    })
}

/// The error for an answer of the wrong kind from the cluster (a bug, never user input).
pub fn unexpected(what: &OpResult) -> BrokerError {
    BrokerError::InvalidArgument(format!("unexpected answer from the cluster: {what:?}"))
}

impl OpResult {
    /// The published ids, or an error for another answer.
    pub fn published(self) -> Result<Vec<super::Published>, BrokerError> {
        match self {
            OpResult::Published(ids) => Ok(ids
                .into_iter()
                .map(|(partition, offset)| super::Published {
                    id: MessageId { partition, offset },
                    partition,
                    offset,
                })
                .collect()),
            other => Err(unexpected(&other)),
        }
    }

    /// One outcome per acked id.
    pub fn acked(self) -> Result<Vec<Result<(), BrokerError>>, BrokerError> {
        match self {
            OpResult::Acked(results) => Ok(results
                .into_iter()
                .map(|r| r.map_err(BrokerError::from))
                .collect()),
            other => Err(unexpected(&other)),
        }
    }

    /// Leased deliveries.
    pub fn delivered(self) -> Result<Vec<Delivery>, BrokerError> {
        match self {
            OpResult::Delivered(list) => Ok(list.into_iter().map(Delivery::from).collect()),
            other => Err(unexpected(&other)),
        }
    }

    /// How many messages a redrive moved.
    pub fn moved(self) -> Result<usize, BrokerError> {
        match self {
            OpResult::Moved(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            other => Err(unexpected(&other)),
        }
    }

    /// A group's committed offsets.
    pub fn offsets(self) -> Result<Option<Vec<(u32, u64)>>, BrokerError> {
        match self {
            OpResult::Offsets(offsets) => Ok(offsets),
            other => Err(unexpected(&other)),
        }
    }

    /// A queue's info.
    pub fn queue_info(self) -> Result<QueueInfo, BrokerError> {
        match self {
            OpResult::QueueInfo(json) => from_json_text(&json),
            other => Err(unexpected(&other)),
        }
    }

    /// A group's state.
    pub fn group_info(self) -> Result<GroupInfo, BrokerError> {
        match self {
            OpResult::GroupInfo(json) => from_json_text(&json),
            other => Err(unexpected(&other)),
        }
    }

    /// Messages read from a partition, and the offset after them.
    pub fn log(self) -> Result<(Vec<Delivery>, u64), BrokerError> {
        match self {
            OpResult::Log { messages, next } => {
                Ok((messages.into_iter().map(Delivery::from).collect(), next))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// `Ok(())` for `Done`.
    pub fn done(self) -> Result<(), BrokerError> {
        match self {
            OpResult::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

impl Broker {
    /// Runs a change of users, ownership or grants through the cluster.
    pub(super) async fn submit_access(&self, op: AccessOp) -> Result<(), BrokerError> {
        match self.replicator() {
            Some(replicator) => replicator.submit(Op::Access(op)).await?.done(),
            None => Err(BrokerError::InvalidArgument("not a cluster node".into())),
        }
    }

    /// A queue's info as it is now: on a cluster node as the leader of the queue's group
    /// has it (the only replica with the leases, so with the groups' `in_flight`), else
    /// from this node's own state (see [`Replicator::read`]).
    pub async fn current_queue_info(&self, name: &str) -> Result<QueueInfo, BrokerError> {
        match self.leader_queue_info(name).await {
            Some(answer) => answer,
            None => self.queue_info(name),
        }
    }

    /// A queue's info from the node [`Replicator::read`] picks; `None`: read it here.
    async fn leader_queue_info(&self, name: &str) -> Option<Result<QueueInfo, BrokerError>> {
        let op = Op::QueueInfo {
            queue: name.to_string(),
        };
        Some(
            self.read_at_leader(op)
                .await?
                .and_then(OpResult::queue_info),
        )
    }

    /// `infos` (from [`Self::list_queues`] or a page of it) each as
    /// [`Self::current_queue_info`] reads it, at most [`LIST_READS`] at once and in the same
    /// order; a queue no replica answers for keeps the info given.
    pub async fn current_queue_infos(&self, infos: Vec<QueueInfo>) -> Vec<QueueInfo> {
        use futures_util::StreamExt;
        if self.replicator().is_none() {
            return infos;
        }
        futures_util::stream::iter(infos)
            .map(|info| async move {
                match self.leader_queue_info(&info.name).await {
                    Some(Ok(current)) => current,
                    _ => info,
                }
            })
            .buffered(LIST_READS)
            .collect()
            .await
    }

    /// A group's state as it is now (as [`Self::current_queue_info`]).
    pub async fn current_group_info(
        &self,
        queue: &str,
        group: &str,
    ) -> Result<GroupInfo, BrokerError> {
        let op = Op::GroupInfo {
            queue: queue.to_string(),
            group: group.to_string(),
        };
        match self.read_at_leader(op).await {
            Some(answer) => answer?.group_info(),
            None => self.group_info(queue, group),
        }
    }

    /// [`Self::read_log`] on any node: a cluster node without a replica of the queue reads
    /// a replica's committed log, any other node its own.
    pub async fn read_current_log(
        &self,
        queue: &str,
        partition: u32,
        from: ReadFrom,
        max: usize,
    ) -> Result<(Vec<Delivery>, u64), BrokerError> {
        let op = Op::ReadLog {
            queue: queue.to_string(),
            partition,
            from,
            max: max as u64,
        };
        match self.read_at_leader(op).await {
            Some(answer) => answer?.log(),
            None => self.read_log(queue, partition, from, max),
        }
    }

    /// False on a cluster node that holds no replica of `queue` (its own copy of the queue
    /// stays empty: reads go to a replica, see [`Self::read_current_log`]).
    pub fn holds_queue_data(&self, queue: &str) -> bool {
        self.replicator().is_none_or(|r| r.holds_replica(queue))
    }

    async fn read_at_leader(&self, op: Op) -> Option<Result<OpResult, BrokerError>> {
        self.replicator()?.read(op).await
    }

    /// The replicator, when this broker is a cluster member.
    pub(super) fn replicator(&self) -> Option<&std::sync::Arc<dyn Replicator>> {
        self.replicator.get()
    }

    /// True on a cluster node (state changes go through the replicator).
    pub fn is_replicated(&self) -> bool {
        self.replicator.get().is_some()
    }

    /// Installs the cluster's replicator (once; later calls are ignored). From then on the
    /// public state-changing methods go through it.
    pub fn set_replicator(&self, replicator: std::sync::Arc<dyn Replicator>) {
        let _ = self.replicator.set(replicator);
    }

    /// Runs `op` on this node's own state: the single node's path, a replica's apply of a
    /// committed entry and a leader's run of a forwarded lease op. Deterministic for
    /// replicated ops, given the same prior state.
    pub async fn apply_op(&self, op: Op) -> Result<OpResult, BrokerError> {
        match op {
            Op::Publish {
                queue,
                messages,
                now_ms,
            } => {
                let turns: Vec<Option<u32>> = messages.iter().map(|m| m.partition).collect();
                let messages = messages.into_iter().map(NewMessage::from).collect();
                let published = self
                    .publish_local(&queue, messages, Some(now_ms), &turns)
                    .await?;
                Ok(OpResult::Published(
                    published.iter().map(|p| (p.partition, p.offset)).collect(),
                ))
            }
            Op::Ack { queue, group, ids } => {
                let ids = message_ids(ids);
                let results = self
                    .ack_many_local(&queue, &group, &ids, true, true)
                    .await?;
                Ok(OpResult::Acked(
                    results
                        .iter()
                        .map(|r| r.as_ref().map(|_| ()).map_err(WireError::from))
                        .collect(),
                ))
            }
            Op::Seek {
                queue,
                group,
                target,
            } => {
                self.seek_local(&queue, &group, target.into()).await?;
                Ok(OpResult::Done)
            }
            Op::DeleteGroup { queue, group } => {
                self.delete_group_local(&queue, &group, false)?;
                Ok(OpResult::Done)
            }
            Op::SeekTo {
                queue,
                group,
                offsets,
            } => {
                self.seek_to_local(&queue, &group, &offsets).await?;
                Ok(OpResult::Done)
            }
            Op::DeadLetterDone {
                queue,
                group,
                partition,
                offset,
            } => {
                self.dead_letter_done_local(&queue, &group, MessageId { partition, offset })
                    .await?;
                Ok(OpResult::Done)
            }
            Op::CreateQueue { name, settings } | Op::CreateSplitQueue { name, settings } => {
                let created = self.create_queue_local(&name, settings).await?;
                Ok(OpResult::Created {
                    created: created.created,
                    dead_letter_created: created.dead_letter_created,
                })
            }
            Op::DeleteQueue { name } => {
                self.delete_queue_local(&name).await?;
                Ok(OpResult::Done)
            }
            Op::CreateOwnedQueue {
                name,
                settings,
                owner,
            } => {
                let created = self.create_queue_local(&name, settings).await?;
                self.own_created_queue(&name, &created, &owner)?;
                Ok(OpResult::Created {
                    created: created.created,
                    dead_letter_created: created.dead_letter_created,
                })
            }
            Op::CreateExchange { name, kind } => Ok(OpResult::ExchangeCreated(
                self.create_exchange_local(&name, kind).await?,
            )),
            Op::CreateOwnedExchange { name, kind, owner } => {
                let created = self.create_exchange_local(&name, kind).await?;
                self.own_created_exchange(&name, created, &owner)?;
                Ok(OpResult::ExchangeCreated(created))
            }
            Op::DeleteExchange { name } => {
                self.delete_exchange_local(&name).await?;
                Ok(OpResult::Done)
            }
            Op::Bind { exchange, binding } => {
                self.bind_local(&exchange, binding).await?;
                Ok(OpResult::Done)
            }
            Op::Unbind { exchange, binding } => {
                self.unbind_local(&exchange, binding).await?;
                Ok(OpResult::Done)
            }
            Op::Receive {
                queue,
                group,
                max,
                wait_ms,
                visibility_ms,
            } => {
                let got = self
                    .receive_local(
                        &queue,
                        &group,
                        max,
                        Duration::from_millis(wait_ms),
                        visibility_ms.map(Duration::from_millis),
                    )
                    .await?;
                Ok(OpResult::Delivered(
                    got.into_iter().map(WireDelivery::from).collect(),
                ))
            }
            Op::Nack {
                queue,
                group,
                partition,
                offset,
                delay_ms,
            } => {
                self.nack_local(
                    &queue,
                    &group,
                    MessageId { partition, offset },
                    delay_ms.map(Duration::from_millis),
                )
                .await?;
                Ok(OpResult::Done)
            }
            Op::Release { queue, group, ids } => {
                self.release_local(&queue, &group, &message_ids(ids))
                    .await?;
                Ok(OpResult::Done)
            }
            Op::Extend {
                queue,
                group,
                partition,
                offset,
                visibility_ms,
            } => {
                self.extend_local(
                    &queue,
                    &group,
                    MessageId { partition, offset },
                    Duration::from_millis(visibility_ms),
                )
                .await?;
                Ok(OpResult::Done)
            }
            Op::Access(op) => {
                self.apply_access(op)?;
                Ok(OpResult::Done)
            }
            Op::Redrive {
                queue,
                dead_letter,
                max,
            } => {
                let max = max.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
                let moved = self.redrive_local(&queue, &dead_letter, max).await?;
                Ok(OpResult::Moved(moved as u64))
            }
            Op::DeliveryCounts {
                queue,
                group,
                counts,
            } => {
                self.note_delivery_counts_local(&queue, &group, &counts)
                    .await?;
                Ok(OpResult::Done)
            }
            Op::AppendRecords {
                queue,
                partition,
                records,
                batch_key,
                now_ms,
            } => {
                let records = records.into_iter().map(crate::log::Record::from).collect();
                let first = self
                    .append_records_local(&queue, partition, records, batch_key, now_ms)
                    .await?;
                Ok(OpResult::Published(vec![(partition, first)]))
            }
            Op::GroupOffsets { queue, group } => {
                Ok(OpResult::Offsets(self.committed_offsets(&queue, &group)?))
            }
            Op::QueueInfo { queue } => Ok(OpResult::QueueInfo(to_json_text(
                &self.queue_info(&queue)?,
            )?)),
            Op::GroupInfo { queue, group } => Ok(OpResult::GroupInfo(to_json_text(
                &self.group_info(&queue, &group)?,
            )?)),
            Op::ReadLog {
                queue,
                partition,
                from,
                max,
            } => {
                let max = usize::try_from(max).unwrap_or(usize::MAX);
                let (list, next) = self.read_log(&queue, partition, from, max)?;
                Ok(OpResult::Log {
                    messages: list.into_iter().map(WireDelivery::from).collect(),
                    next,
                })
            }
        }
    }
}

/// Users and grants as a cluster's metadata snapshot carries them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccessImage {
    /// Registered users.
    pub users: crate::auth::UsersFile,
    /// Owners and grants.
    pub grants: crate::auth::GrantsFile,
}

/// What a cluster's metadata snapshot takes from the broker, and how it puts it back.
impl Broker {
    /// The registry now: queues with their settings, exchanges with their bindings.
    pub fn registry_image(&self) -> super::registry::Registry {
        self.registry.read().clone()
    }

    /// Creates exactly queue `name` with `settings`, as a metadata snapshot records it (a
    /// dead-letter queue is a record of its own, never made with it). `Ok(false)` if it
    /// exists with these settings.
    pub async fn restore_queue(
        &self,
        name: &str,
        settings: QueueSettings,
    ) -> Result<bool, BrokerError> {
        super::check_name(name)?;
        let ticket = {
            let _meta = self.meta.lock().await;
            self.create_locked(name, settings).await?.1
        };
        let created = ticket.is_some();
        if let Some(ticket) = ticket {
            ticket.wait().await?;
        }
        Ok(created)
    }

    /// Users and grants now (`None` with auth off).
    pub fn access_image(&self) -> Option<AccessImage> {
        self.auth.get().map(|store| {
            let (users, grants) = store.export();
            AccessImage { users, grants }
        })
    }

    /// Replaces users and grants with `image` (nothing with auth off).
    pub fn restore_access(&self, image: &AccessImage) -> Result<(), BrokerError> {
        if let Some(store) = self.auth.get() {
            store.replace(image.users.clone(), image.grants.clone())?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::{Permission, Resource};
    use crate::broker::access::PasswordHash;
    use proptest::prelude::*;

    #[test]
    fn passing_failures_are_told_from_refusals() {
        for transient in [
            BrokerError::NoLeader("election".into()),
            BrokerError::ShuttingDown,
            BrokerError::Storage {
                path: "/d".into(),
                source: std::io::Error::other("full"),
            },
            BrokerError::from(WireError {
                code: "no_leader".into(),
                message: "m".into(),
            }),
            BrokerError::from(WireError {
                code: "something new".into(),
                message: "m".into(),
            }),
        ] {
            assert!(transient.is_transient(), "{transient:?}");
        }
        for refusal in [
            BrokerError::LimitReached("guard".into()),
            BrokerError::QueueNotFound("q".into()),
            BrokerError::InvalidArgument("x".into()),
            BrokerError::from(WireError {
                code: "message_too_large".into(),
                message: "m".into(),
            }),
        ] {
            assert!(!refusal.is_transient(), "{refusal:?}");
        }
    }

    /// A broker in a temporary directory (kept while the first is) with queue `q` of
    /// `partitions`.
    pub(crate) async fn broker_with_queue(
        partitions: u32,
    ) -> (tempfile::TempDir, std::sync::Arc<Broker>) {
        let (dir, broker) = empty_broker().await;
        let settings = QueueSettings {
            partitions,
            ..QueueSettings::default()
        };
        broker.create_queue("q", settings).await.unwrap();
        (dir, broker)
    }

    /// A broker with nothing in it, in a temporary directory (kept while the first is).
    async fn empty_broker() -> (tempfile::TempDir, std::sync::Arc<Broker>) {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(crate::broker::BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            ..crate::broker::BrokerConfig::default()
        })
        .await
        .unwrap();
        (dir, broker)
    }

    /// Any message: strings of any characters, bodies of any bytes (also used by the
    /// cluster's codec tests).
    pub(crate) fn arb_message() -> impl Strategy<Value = WireMessage> {
        (
            proptest::option::of(".{0,12}"),
            proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..3),
            proptest::option::of("[a-z/]{0,16}"),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::option::of(".{0,12}"),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(
                |(key, headers, content_type, body, idempotency_key, partition)| WireMessage {
                    key,
                    headers,
                    content_type,
                    body: Bytes::from(body),
                    idempotency_key,
                    partition,
                },
            )
    }

    proptest! {
        /// An op survives the codec the cluster ships it with, byte for byte, but for the
        /// proposer's turns, which only an encoded publish entry carries (so that entries
        /// stored before turns existed decode as before).
        #[test]
        fn publish_ops_round_trip(
            queue in "[a-z]{1,10}",
            messages in proptest::collection::vec(arb_message(), 0..5),
            now_ms in any::<i64>(),
        ) {
            let op = Op::Publish { queue: queue.clone(), messages: messages.clone(), now_ms };
            let bytes = bincode::serialize(&op).unwrap();
            let back: Op = bincode::deserialize(&bytes).unwrap();
            let unturned = messages
                .into_iter()
                .map(|m| WireMessage { partition: None, ..m })
                .collect();
            prop_assert_eq!(back, Op::Publish { queue, messages: unturned, now_ms });
        }

        /// Garbage never panics the decoder.
        #[test]
        fn decoding_garbage_does_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = bincode::deserialize::<Op>(&bytes);
        }
    }

    /// An error that goes from node to node (a forward of a forward) reads the same at the
    /// end: "no leader" once, the other codes with their message.
    #[test]
    fn errors_read_the_same_after_any_number_of_hops() {
        let errors = [
            BrokerError::NoLeader("leader lease not renewed".into()),
            BrokerError::QueueNotFound("q".into()),
        ];
        for error in errors {
            let mut hopped = BrokerError::from(WireError::from(&error));
            for _ in 0..3 {
                hopped = BrokerError::from(WireError::from(&hopped));
            }
            assert_eq!(hopped.to_string(), error.to_string());
            assert_eq!(hopped.code(), error.code());
        }
    }

    /// Regression: queue settings and bindings skip absent fields in their serde form,
    /// which a binary codec cannot read back; they travel as JSON inside the op.
    #[test]
    fn metadata_ops_round_trip_in_the_binary_codec() {
        let ops = [
            Op::CreateQueue {
                name: "q".into(),
                settings: QueueSettings::default(),
            },
            Op::Bind {
                exchange: "x".into(),
                binding: serde_json::from_str(r#"{"queue":"q","key":"a.b"}"#).unwrap(),
            },
        ];
        for op in ops {
            let bytes = bincode::serialize(&op).unwrap();
            let back: Op = bincode::deserialize(&bytes).unwrap();
            assert_eq!(back, op);
        }
    }

    /// A create by a user records its owner with the creation, in the same op: applied
    /// again (a create whose answer was lost, sent again, commits a second entry) it finds
    /// the queue, its dead-letter queue and the exchange owned by their creator, never
    /// ownerless, and a later create of the same names by someone else changes nothing;
    /// a delete forgets the owner.
    #[tokio::test]
    async fn an_owned_create_records_its_owner_with_the_creation() {
        let (dir, broker) = empty_broker().await;
        let config = crate::auth::AuthConfig {
            admin: Some("root".into()),
            password_cost: crate::auth::PasswordCost::cheap_for_tests(),
            ..crate::auth::AuthConfig::default()
        };
        let store = std::sync::Arc::new(
            crate::auth::AuthStore::open(&dir.path().join("access"), config).unwrap(),
        );
        broker.set_auth(std::sync::Arc::clone(&store));
        let settings: QueueSettings = serde_json::from_str(r#"{"max_deliveries":3}"#).unwrap();
        let queue = |owner: &str| Op::CreateOwnedQueue {
            name: "q".into(),
            settings: settings.clone(),
            owner: owner.into(),
        };
        let exchange = |owner: &str| Op::CreateOwnedExchange {
            name: "x".into(),
            kind: ExchangeKind::Topic,
            owner: owner.into(),
        };
        let owners = || {
            ["q", "q.dlq"]
                .map(|q| store.owner(&Resource::queue(q)))
                .into_iter()
                .chain([store.owner(&Resource::exchange("x"))])
                .collect::<Vec<_>>()
        };
        assert_eq!(
            broker.apply_op(queue("alice")).await.unwrap(),
            OpResult::Created {
                created: true,
                dead_letter_created: Some("q.dlq".into()),
            }
        );
        assert_eq!(
            broker.apply_op(exchange("alice")).await.unwrap(),
            OpResult::ExchangeCreated(true)
        );
        let alice = vec![Some("alice".to_string()); 3];
        assert_eq!(owners(), alice);
        for user in ["alice", "bob"] {
            assert_eq!(
                broker.apply_op(queue(user)).await.unwrap(),
                OpResult::Created {
                    created: false,
                    dead_letter_created: None,
                }
            );
            assert_eq!(
                broker.apply_op(exchange(user)).await.unwrap(),
                OpResult::ExchangeCreated(false)
            );
            assert_eq!(owners(), alice, "after {user}'s create of the same names");
        }
        // A delete forgets the owner in the same op (a lost answer skips a later forget).
        for op in [
            Op::DeleteQueue { name: "q".into() },
            Op::DeleteQueue {
                name: "q.dlq".into(),
            },
            Op::DeleteExchange { name: "x".into() },
        ] {
            broker.apply_op(op).await.unwrap();
        }
        assert_eq!(owners(), [None, None, None]);
        for op in [queue("alice"), exchange("alice")] {
            let bytes = bincode::serialize(&op).unwrap();
            assert_eq!(bincode::deserialize::<Op>(&bytes).unwrap(), op);
        }
    }

    /// The reads a cluster node forwards to a queue's leader answer what the leader's own
    /// state says, through the cluster's binary codec: a queue with settings that skip
    /// absent fields, a group with leases, a log page.
    #[tokio::test]
    async fn forwarded_reads_answer_what_the_leader_reads_itself() {
        let (_dir, broker) = empty_broker().await;
        let settings: QueueSettings =
            serde_json::from_str(r#"{"partitions":2,"backoff":[1,5],"retention":{"max_age":60}}"#)
                .unwrap();
        broker.create_queue("q", settings).await.unwrap();
        for body in ["a", "b", "c"] {
            let message = NewMessage {
                key: Some(body.into()),
                headers: BTreeMap::new(),
                content_type: None,
                body: Bytes::from(body),
                idempotency_key: None,
            };
            broker.publish("q", vec![message]).await.unwrap();
        }
        let leased = broker
            .receive("q", "g", 2, Duration::ZERO, None)
            .await
            .unwrap();
        assert_eq!(leased.len(), 2);
        let through_the_wire = |result: OpResult| -> OpResult {
            bincode::deserialize(&bincode::serialize(&result).unwrap()).unwrap()
        };
        let op = Op::QueueInfo { queue: "q".into() };
        let info = through_the_wire(broker.apply_op(op).await.unwrap());
        assert_eq!(info.queue_info().unwrap(), broker.queue_info("q").unwrap());
        let op = Op::GroupInfo {
            queue: "q".into(),
            group: "g".into(),
        };
        let group = through_the_wire(broker.apply_op(op).await.unwrap());
        let group = group.group_info().unwrap();
        assert_eq!(group, broker.group_info("q", "g").unwrap());
        assert_eq!(group.in_flight, 2);
        let partition = leased[0].id.partition;
        let op = Op::ReadLog {
            queue: "q".into(),
            partition,
            from: ReadFrom::Offset(0),
            max: 10,
        };
        let (page, next) = through_the_wire(broker.apply_op(op).await.unwrap())
            .log()
            .unwrap();
        let (local, local_next) = broker
            .read_log("q", partition, ReadFrom::Offset(0), 10)
            .unwrap();
        assert_eq!((page, next), (local, local_next));
    }

    /// Access ops survive the cluster's binary codec (resources travel as `queue/NAME`).
    #[test]
    fn access_ops_round_trip_in_the_binary_codec() {
        let ops = [
            Op::Access(AccessOp::CreateUser {
                username: "alice".into(),
                password_hash: PasswordHash("$argon2id$v=19$...".into()),
                created_at_ms: 7,
            }),
            Op::Access(AccessOp::Grant {
                by: "alice".into(),
                resource: Resource::queue("jobs"),
                user: "bob".into(),
                permissions: vec![Permission::Publish, Permission::Consume],
            }),
            Op::Access(AccessOp::Forget {
                resource: Resource::exchange("events"),
            }),
        ];
        for op in ops {
            let bytes = bincode::serialize(&op).unwrap();
            let back: Op = bincode::deserialize(&bytes).unwrap();
            assert_eq!(back, op);
        }
    }

    #[test]
    fn errors_keep_their_code_across_the_wire() {
        let error = BrokerError::QueueNotFound("q".into());
        let back = BrokerError::from(WireError::from(&error));
        assert_eq!(back.code(), "queue_not_found");
        assert_eq!(back.to_string(), error.to_string());
        let unknown = BrokerError::from(WireError {
            code: "weird".into(),
            message: "x".into(),
        });
        assert_eq!(unknown.code(), "internal");
    }
}
