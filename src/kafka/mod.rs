//! The Kafka wire protocol over qit's queues: a thin adapter, like [`crate::api`].
//!
//! A topic is a queue, a Kafka partition is a qit partition and offsets are the same
//! numbers. Records produced here are appended with their key, headers and timestamp as
//! the producer sent them, so HTTP and gRPC consumers see them, and fetches encode whatever
//! the log holds (HTTP and gRPC publishes too) as record batches.
//!
//! - [`conn`]: the accept loop and one task per connection: frames in, responses out, in
//!   order, with SASL/PLAIN first when auth is on.
//! - [`session`]: what a connection knows of its client; SASL/PLAIN.
//! - [`dispatch`]: which APIs and versions are served, header decoding, routing a request
//!   to its handler, error frames for what is not served.
//! - [`records`]: record batches to and from log records (CRC, decompression, bounds).
//! - [`topics`]: Metadata, CreateTopics, DeleteTopics, DescribeConfigs, ListOffsets.
//! - [`data`]: Produce (with idempotent producers) and Fetch (long-poll).
//! - [`coordinator`]: the group membership protocol (JoinGroup, SyncGroup, Heartbeat,
//!   LeaveGroup) as a state machine over members and generations.
//! - [`offsets`]: OffsetCommit and OffsetFetch on qit's own groups: a committed offset is
//!   the group's ack floor, the same one `GET /queues/{q}/groups/{g}` shows.
//! - [`brokers`]: the brokers clients are told about: on a cluster node every node with a
//!   Kafka listener, partition leaders and group coordinators.
//!
//! On a cluster node every state change goes through the broker's replicator (produce is a
//! replicated append of the partition's group, forwarded to its leader from any node;
//! commits are replicated seeks), fetches read this node's committed copy (a node without
//! a replica answers `NOT_LEADER_OR_FOLLOWER`, and clients go to the leader Metadata
//! names), and group membership lives on the group's coordinator only.

pub mod brokers;
pub mod conn;
pub mod coordinator;
pub mod data;
pub mod dispatch;
pub mod group_listing;
pub mod offsets;
pub mod records;
pub mod session;
pub mod topics;

use std::sync::Arc;

use kafka_protocol::ResponseError;

use crate::auth::{Action, AuthStore, Resource};
use crate::broker::{Broker, BrokerError};
use crate::cluster::Cluster;

/// Where a topic's partition lives on a cluster: its group's leader as known here with
/// that leader's Raft term, and its replicas (preferred leader first).
pub type TopicReplicas = (Option<(u64, u64)>, Vec<u64>);

/// Errors of the Kafka adapter. [`KafkaError::code`] maps each to a Kafka error code.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// Reading or writing the socket failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A frame's size prefix is negative, too small or above the limit.
    #[error("frame of {size} bytes (must be 8..={max})")]
    FrameSize {
        /// The announced size.
        size: i64,
        /// The largest frame accepted.
        max: usize,
    },
    /// A request or a record batch could not be decoded.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A record batch failed its CRC.
    #[error("corrupt record batch: {0}")]
    Corrupt(String),
    /// A response could not be encoded (a bug, or a value the chosen version cannot hold).
    #[error("cannot encode the response: {0}")]
    Encode(String),
    /// The broker refused or failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The caller may not do this.
    #[error("not authorized: {0}")]
    Forbidden(String),
    /// A fetch or commit names an offset outside the partition.
    #[error("offset out of range")]
    OffsetOutOfRange,
    /// This cluster node holds no replica of the partition: the client asks the leader.
    #[error("no replica of `{0}` on this node")]
    NotReplica(String),
}

impl KafkaError {
    /// The Kafka error code that tells a client what went wrong.
    pub fn code(&self) -> i16 {
        let error = match self {
            KafkaError::Io(_) | KafkaError::Encode(_) => ResponseError::UnknownServerError,
            KafkaError::FrameSize { .. } | KafkaError::Malformed(_) => ResponseError::InvalidRecord,
            KafkaError::Corrupt(_) => ResponseError::CorruptMessage,
            KafkaError::Forbidden(_) => ResponseError::TopicAuthorizationFailed,
            KafkaError::OffsetOutOfRange => ResponseError::OffsetOutOfRange,
            KafkaError::NotReplica(_) => ResponseError::NotLeaderOrFollower,
            KafkaError::Broker(error) => broker_error(error),
        };
        error.code()
    }
}

/// The Kafka error for a broker error, by its API code: an error another cluster node
/// answered (which arrives as [`BrokerError::Remote`] with that code) maps as the same
/// error raised on this node.
fn broker_error(error: &BrokerError) -> ResponseError {
    match error.code() {
        "queue_not_found" => ResponseError::UnknownTopicOrPartition,
        "invalid_name" => ResponseError::InvalidTopicException,
        "invalid_setting" => ResponseError::InvalidConfig,
        "bad_request" | "invalid_binding" => ResponseError::InvalidRequest,
        "group_not_found" => ResponseError::GroupIdNotFound,
        "group_in_use" => ResponseError::NonEmptyGroup,
        "queue_exists" | "exchange_exists" => ResponseError::TopicAlreadyExists,
        "message_too_large" => ResponseError::MessageTooLarge,
        "limit_reached" => ResponseError::PolicyViolation,
        // Clients refresh their metadata and retry on this one.
        "shutting_down" | "no_leader" => ResponseError::NotLeaderOrFollower,
        "queue_damaged" | "storage_error" => ResponseError::KafkaStorageError,
        _ => ResponseError::UnknownServerError,
    }
}

/// Settings of the Kafka listener.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Largest request frame in bytes (a larger size prefix closes the connection).
    pub max_frame_bytes: usize,
    /// Most open Kafka connections; past it new ones wait.
    pub max_connections: usize,
    /// Seconds a connection may stay silent before it is closed.
    pub idle_timeout_secs: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024 * 1024,
            max_connections: 1000,
            idle_timeout_secs: 600,
        }
    }
}

/// Everything the Kafka connections share.
pub struct Kafka {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Users and grants, when auth is on.
    pub auth: Option<Arc<AuthStore>>,
    /// Listener settings.
    pub config: KafkaConfig,
    /// Group membership and generations.
    pub groups: coordinator::Coordinator,
    /// Idempotent producers: ids and the sequences they sent.
    pub producers: data::Producers,
    /// The cluster, on a cluster node.
    pub cluster: Option<Arc<Cluster>>,
}

impl Kafka {
    /// The shared state for a listener over `broker`.
    pub fn new(broker: Arc<Broker>, auth: Option<Arc<AuthStore>>, config: KafkaConfig) -> Self {
        Self {
            broker,
            auth,
            config,
            groups: coordinator::Coordinator::default(),
            producers: data::Producers::default(),
            cluster: None,
        }
    }

    /// The shared state of a cluster node's listener: producer ids carry the node id (so
    /// that two nodes never hand out the same one), and requests see the cluster.
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Self {
        self.producers = data::Producers::for_node(cluster.node_id());
        self.cluster = Some(cluster);
        self
    }

    /// The brokers as clients are to see them, for a client that reached this node at
    /// `local`.
    pub fn layout(&self, local: std::net::SocketAddr) -> brokers::Layout {
        match &self.cluster {
            Some(cluster) => brokers::Layout::of(cluster, local),
            None => brokers::Layout::single(local),
        }
    }

    /// `(leader of its Raft group as known here with its term, replicas)` of partition
    /// `partition` of a topic on a cluster node (`None` on a single node, or for a topic
    /// the cluster does not know). A node without a replica knows the leader from the
    /// leaders' beats.
    pub fn topic_replicas(&self, topic: &str, partition: u32) -> Option<TopicReplicas> {
        let cluster = self.cluster.as_ref()?;
        let queue = cluster.groups().queue_group(topic)?;
        let leader = cluster.known_leader(queue.group_of(partition));
        Some((leader, queue.replicas_of(partition)))
    }

    /// `Ok` when this node holds the topic's data: always on a single node; on a cluster
    /// node, when it is a replica of the topic's group (its copy holds exactly the
    /// committed entries).
    pub fn check_replica(&self, topic: &str) -> Result<(), KafkaError> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        match cluster.groups().queue_group(topic) {
            Some(group) if cluster.groups().raft(group.id).is_none() => {
                Err(KafkaError::NotReplica(topic.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// `Ok` if `user` may do `action` on topic `topic` (always, with auth off).
    pub fn allow(&self, user: Option<&str>, action: Action, topic: &str) -> Result<(), KafkaError> {
        let Some(store) = &self.auth else {
            return Ok(());
        };
        let user = user.ok_or_else(|| KafkaError::Forbidden("not authenticated".into()))?;
        store
            .authorize(user, action, &Resource::queue(topic))
            .map_err(|e| KafkaError::Forbidden(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::replicate::WireError;

    /// What a topic call answers is the same on the node that raised the error and on a
    /// cluster node it was forwarded from (where it arrives as `Remote` with its code):
    /// a DeleteTopics of an unknown topic is UNKNOWN_TOPIC_OR_PARTITION there too, not
    /// UNKNOWN_SERVER_ERROR.
    #[test]
    fn a_forwarded_error_maps_as_the_error_itself() {
        let errors = [
            BrokerError::QueueNotFound("t".into()),
            BrokerError::InvalidName(crate::name::check("bad name!").unwrap_err()),
            BrokerError::InvalidSetting(crate::broker::settings::InvalidSetting {
                field: "partitions",
                reason: "must be 1..=256".into(),
            }),
            BrokerError::InvalidArgument("max".into()),
            BrokerError::QueueExists("t".into()),
            BrokerError::LimitReached("queues".into()),
            BrokerError::ShuttingDown,
            BrokerError::NoLeader("election".into()),
        ];
        for error in errors {
            let local = KafkaError::Broker(error);
            let KafkaError::Broker(inner) = &local else {
                unreachable!()
            };
            let forwarded = KafkaError::Broker(BrokerError::from(WireError::from(inner)));
            assert_ne!(
                local.code(),
                ResponseError::UnknownServerError.code(),
                "{local}"
            );
            assert_eq!(forwarded.code(), local.code(), "{local}");
        }
        assert_eq!(
            KafkaError::Broker(BrokerError::QueueNotFound("t".into())).code(),
            ResponseError::UnknownTopicOrPartition.code()
        );
    }
}
