//! The openraft type configuration of every qit Raft group, the entry payload
//! ([`Command`]), what applying one answers ([`Applied`]), and the one codec (bincode with
//! a size limit) that puts these on disk and on the wire.

use serde::{Deserialize, Serialize};

use super::publish_batch::{BatchError, EncodedAppend, EncodedPublish, RecordBatch};
use crate::broker::replicate::{Op, OpResult, Scope, WireError};

/// A node's addresses, as the metadata group records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddrs {
    /// The node id.
    pub id: u64,
    /// Its cluster (replication) listener.
    pub cluster: String,
    /// Its HTTP listener.
    pub http: String,
    /// Its gRPC listener.
    pub grpc: String,
}

/// The payload of a Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A broker op (metadata ops in the metadata group, queue ops in the queue's group).
    Broker(Op),
    /// A node announces its addresses (metadata group).
    Node(NodeAddrs),
    /// A change of the cluster's voters: run by the metadata group's leader, never stored
    /// as an entry (openraft writes the membership entries).
    Members(Change),
    /// A queue's replicas changed (metadata group; written by the group's leader while it
    /// moves the group, see [`super::moves`]).
    Placed(Placed),
    /// Node `0` is leaving: every group moves off it (metadata group).
    Draining(u64),
    /// A node announces its Kafka listener (metadata group). A variant of its own, last,
    /// rather than a field of [`NodeAddrs`]: entries and snapshots already stored decode
    /// as before (bincode has no optional fields).
    Kafka(KafkaAddr),
    /// The metadata leader fences a node it found down, or unfences one back up
    /// (metadata group; see [`super::fencing`]). Last, as `Kafka`.
    Fenced(Fencing),
    /// A publish as its queue group's leader proposes it: the messages encoded once, as
    /// one buffer (see [`super::publish_batch`]). Last, as `Kafka`; a node also forwards
    /// a batch of publishes to the leader in this form.
    Publish(EncodedPublish),
    /// A Kafka producer's append as the queue group's leader proposes it: the records
    /// encoded once, as one buffer. Last, as `Publish`.
    AppendRecords(EncodedAppend),
    /// A node that answers a metadata change asks a peer to apply the metadata group's
    /// entries up to this index first (see `Cluster::spread_metadata`); never an entry.
    /// Last, as `Publish`.
    AwaitMeta(u64),
    /// A node asks the metadata leader how far the metadata is committed, to apply that
    /// much before it serves (at start, and to renew its confirmed view: see
    /// `super::metadata_catch_up`); answered with the leader's applied index, never an
    /// entry. Last, as `AwaitMeta`.
    MetaReadIndex,
    /// Records to append to a partition as they are (deduplicated and with their headers
    /// set by the partition's leader): a group whose Raft log is its partition's segment
    /// log writes them as the entry's data batch ([`super::partition_log_store`]). Applied
    /// as they are, unchecked (`Broker::append_sequenced_local`): the leader checked what
    /// they came from. Last, as `MetaReadIndex`.
    Records(PartitionRecords),
    /// [`Command::Records`] with the records encoded once, as one buffer
    /// ([`EncodedRecords`]): what a partition's leader proposes (a bincode list of records
    /// decodes with an allocation per field on every replica). Last, as `Records`.
    RecordBatch(EncodedRecords),
    /// A node that answers a queue's info asks the leader of one of the queue's partition
    /// groups (this id) how far that group is committed, to apply that much before it
    /// answers (see `Cluster::settle_partitions`); answered with the leader's applied
    /// index once it confirmed that it leads, never an entry. Last, as `RecordBatch`.
    ReadIndex(u64),
}

/// Records for one partition of a queue as one buffer ([`Command::RecordBatch`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedRecords {
    /// The queue.
    pub queue: String,
    /// The partition.
    pub partition: u32,
    /// The records, in order.
    pub records: RecordBatch,
}

impl EncodedRecords {
    /// The records decoded (their bytes slices of the buffer).
    pub fn decode(&self) -> Result<PartitionRecords, BatchError> {
        Ok(PartitionRecords {
            queue: self.queue.clone(),
            partition: self.partition,
            records: self.records.decode()?,
        })
    }
}

/// Records for one partition of a queue, as stored ([`Command::Records`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecords {
    /// The queue.
    pub queue: String,
    /// The partition.
    pub partition: u32,
    /// The records, in order.
    pub records: Vec<crate::broker::replicate::WireRecord>,
}

/// A change of one node's fencing, as the metadata group records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fencing {
    /// The node id.
    pub node: u64,
    /// Fenced (found down) or unfenced (back up).
    pub fenced: bool,
}

/// A node's Kafka listener, as the metadata group records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaAddr {
    /// The node id.
    pub id: u64,
    /// Its Kafka listener, `HOST:PORT`.
    pub kafka: String,
}

impl Command {
    /// Where the command runs: a broker op's scope, the queue of an encoded publish or
    /// append, the metadata group for everything else.
    pub fn scope(&self) -> Scope<'_> {
        match self {
            Command::Broker(op) => op.scope(),
            Command::Publish(p) => Scope::Queue(&p.queue),
            Command::AppendRecords(a) => Scope::Queue(&a.queue),
            Command::Records(r) => Scope::Queue(&r.queue),
            Command::RecordBatch(r) => Scope::Queue(&r.queue),
            Command::Node(_)
            | Command::Members(_)
            | Command::Placed(_)
            | Command::Draining(_)
            | Command::Kafka(_)
            | Command::Fenced(_)
            | Command::AwaitMeta(_)
            | Command::MetaReadIndex
            | Command::ReadIndex(_) => Scope::Meta,
        }
    }
}

/// A short form for openraft's logs: the variant, without a publish's messages.
impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Broker(Op::Publish {
                queue, messages, ..
            }) => write!(f, "publish of {} messages to {queue}", messages.len()),
            Command::Publish(p) => {
                write!(f, "publish of {} messages to {}", p.messages.len(), p.queue)
            }
            Command::AppendRecords(a) => write!(
                f,
                "append of {} records to {} partition {}",
                a.records.len(),
                a.queue,
                a.partition
            ),
            Command::Records(r) => write!(
                f,
                "{} records to {} partition {}",
                r.records.len(),
                r.queue,
                r.partition
            ),
            Command::RecordBatch(r) => write!(
                f,
                "{} records to {} partition {}",
                r.records.len(),
                r.queue,
                r.partition
            ),
            Command::Broker(op) => write!(f, "{op:?}"),
            Command::Node(addrs) => write!(f, "node {} at {}", addrs.id, addrs.cluster),
            Command::Members(change) => write!(f, "members {change:?}"),
            Command::Placed(placed) => {
                write!(f, "placed {} on {:?}", placed.queue, placed.replicas)
            }
            Command::Draining(node) => write!(f, "draining node {node}"),
            Command::Kafka(addr) => write!(f, "node {} Kafka at {}", addr.id, addr.kafka),
            Command::Fenced(change) => match change.fenced {
                true => write!(f, "node {} fenced", change.node),
                false => write!(f, "node {} unfenced", change.node),
            },
            Command::AwaitMeta(index) => write!(f, "await metadata index {index}"),
            Command::MetaReadIndex => write!(f, "metadata read index"),
            Command::ReadIndex(group) => write!(f, "read index of group {group}"),
        }
    }
}

/// A change of the cluster's voters ([`super::membership`]). It runs on the metadata group's leader (any node
/// forwards it there) and is never an entry itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Add node `id`, whose cluster listener is `cluster`, as a voter.
    Add {
        /// The node id.
        id: u64,
        /// Its cluster listener, `HOST:PORT`.
        cluster: String,
    },
    /// Remove node `id`.
    Remove {
        /// The node id.
        id: u64,
    },
    /// Replace node `old` by node `id` at `cluster`: add the new node, then remove the old
    /// one (its groups move off it).
    Replace {
        /// The node replaced.
        old: u64,
        /// The new node's id.
        id: u64,
        /// Its cluster listener, `HOST:PORT`.
        cluster: String,
    },
}

/// The replicas of a queue's group, preferred leader first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    /// The queue.
    pub queue: String,
    /// Its group.
    pub group: u64,
    /// The replicas.
    pub replicas: Vec<u64>,
}

/// A command forwarded to another node, with the group the sender routed it by (`None`
/// when the sender did not know the command's queue): a node that finds the queue in
/// another group refuses it, since the queue was made again meanwhile and the sender's
/// checks (grants, say) were made against the one that is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarded {
    /// The group the sender routed the command by.
    pub group: Option<u64>,
    /// The command.
    pub command: Command,
}

/// [`Forwarded`] as it is encoded from a borrowed command (the same bytes).
#[derive(Debug, Serialize)]
pub struct ForwardedRef<'a> {
    /// The group the sender routed the command by.
    pub group: Option<u64>,
    /// The command.
    pub command: &'a Command,
}

/// What applying an entry answered (the same on every replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied(pub Result<OpResult, WireError>);

openraft::declare_raft_types!(
    /// The type configuration of every qit Raft group.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// A log id: the term and node of the leader that wrote the entry, and its index.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// The leader a log id names (term and node).
pub type LeaderId = openraft::type_config::alias::CommittedLeaderIdOf<TypeConfig>;
/// A replica's vote.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// A Raft entry.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// The payload of a Raft entry (blank, a [`Command`], or a membership).
pub type EntryPayload = openraft::type_config::alias::EntryPayloadOf<TypeConfig>;
/// A group's membership.
pub type Membership = openraft::Membership<u64, openraft::BasicNode>;
/// A membership and the log id it was written at.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// What a snapshot covers.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A group's metrics.
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;

/// The log id of entry `index` written by node `node`'s leadership in `term`.
pub fn log_id(term: u64, node: u64, index: u64) -> LogId {
    LogId::new(
        LeaderId {
            term,
            node_id: node,
        },
        index,
    )
}

/// Largest entry, RPC or file record the codec accepts (a publish batch is at most the
/// HTTP body limit; this leaves room).
pub const MAX_ENCODED: u64 = 256 * 1024 * 1024;

fn options() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_ENCODED)
}

/// Encodes a value (entries, votes, RPCs).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::Error> {
    use bincode::Options;
    options().serialize(value)
}

/// Decodes a value; malformed or oversized input is an error, never a panic.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, bincode::Error> {
    use bincode::Options;
    options().deserialize(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forward encoded from a borrowed command decodes as the owned form, group and all.
    #[test]
    fn a_forward_encodes_as_it_decodes() {
        let command = Command::Broker(Op::DeleteQueue { name: "q".into() });
        for group in [None, Some(0), Some(17)] {
            let bytes = encode(&ForwardedRef {
                group,
                command: &command,
            })
            .unwrap();
            let back: Forwarded = decode(&bytes).unwrap();
            assert_eq!(
                back,
                Forwarded {
                    group,
                    command: command.clone()
                }
            );
        }
    }

    /// Entries written before `Command::Kafka` and `Command::Fenced` existed decode as they
    /// did: variants keep their index (a new one only ever goes last), and the new ones
    /// round-trip.
    #[test]
    fn a_new_variant_leaves_stored_entries_readable() {
        let node = Command::Node(NodeAddrs {
            id: 2,
            cluster: "127.0.0.1:7102".into(),
            http: "127.0.0.1:8082".into(),
            grpc: "127.0.0.1:9092".into(),
        });
        let bytes = encode(&node).unwrap();
        assert_eq!(&bytes[..4], &1u32.to_le_bytes(), "Node is variant 1");
        assert_eq!(decode::<Command>(&bytes).unwrap(), node);
        let draining = encode(&Command::Draining(3)).unwrap();
        assert_eq!(&draining[..4], &4u32.to_le_bytes(), "Draining is variant 4");
        let kafka = Command::Kafka(KafkaAddr {
            id: 2,
            kafka: "127.0.0.1:19092".into(),
        });
        let bytes = encode(&kafka).unwrap();
        assert_eq!(&bytes[..4], &5u32.to_le_bytes(), "Kafka is variant 5");
        assert_eq!(decode::<Command>(&bytes).unwrap(), kafka);
        let fenced = Command::Fenced(Fencing {
            node: 3,
            fenced: true,
        });
        let bytes = encode(&fenced).unwrap();
        assert_eq!(&bytes[..4], &6u32.to_le_bytes(), "Fenced is variant 6");
        assert_eq!(decode::<Command>(&bytes).unwrap(), fenced);
        // A publish entry of the first form (messages as a list) still decodes.
        let listed = Command::Broker(Op::Publish {
            queue: "q".into(),
            messages: Vec::new(),
            now_ms: 7,
        });
        assert_eq!(
            decode::<Command>(&encode(&listed).unwrap()).unwrap(),
            listed
        );
        // A Kafka append, encoded once, is the last variant and comes back as it went in.
        let records = vec![crate::broker::replicate::WireRecord {
            timestamp_ms: 5,
            key: Some(bytes::Bytes::from_static(b"k")),
            headers: vec![("h".into(), bytes::Bytes::from_static(b"v"))],
            value: bytes::Bytes::from_static(b"value"),
        }];
        let append =
            EncodedAppend::new("q".into(), 1, &records, Some("kafka:1:0:0".into()), 9).unwrap();
        let bytes = encode(&Command::AppendRecords(append.clone())).unwrap();
        assert_eq!(&bytes[..4], &8u32.to_le_bytes(), "AppendRecords comes last");
        assert_eq!(
            decode::<Command>(&bytes).unwrap(),
            Command::AppendRecords(append.clone())
        );
        assert_eq!(
            append.into_op().unwrap(),
            Op::AppendRecords {
                queue: "q".into(),
                partition: 1,
                records: records.clone(),
                batch_key: Some("kafka:1:0:0".into()),
                now_ms: 9,
            }
        );
        // A partition leader's records: variant 11 as a list, 12 as one buffer, the same
        // records either way.
        let listed = PartitionRecords {
            queue: "q".into(),
            partition: 2,
            records,
        };
        let bytes = encode(&Command::Records(listed.clone())).unwrap();
        assert_eq!(&bytes[..4], &11u32.to_le_bytes(), "Records is variant 11");
        let batch = EncodedRecords {
            queue: "q".into(),
            partition: 2,
            records: RecordBatch::encode(&listed.records).unwrap(),
        };
        let bytes = encode(&Command::RecordBatch(batch.clone())).unwrap();
        assert_eq!(
            &bytes[..4],
            &12u32.to_le_bytes(),
            "RecordBatch is variant 12"
        );
        assert_eq!(
            decode::<Command>(&bytes).unwrap(),
            Command::RecordBatch(batch.clone())
        );
        assert_eq!(batch.decode().unwrap(), listed);
    }

    proptest::proptest! {
        /// An encoded publish comes back through the Raft codec as it went in, the bytes of
        /// its batch once, as bytes (a length and the buffer), in the last variant.
        #[test]
        fn an_encoded_publish_round_trips(
            messages in proptest::collection::vec(crate::broker::replicate::tests::arb_message(), 0..8),
        ) {
            use super::super::publish_batch::MessageBatch;
            let batch = MessageBatch::encode(&messages).unwrap();
            let command = Command::Publish(EncodedPublish {
                queue: "q".into(),
                messages: batch,
                now_ms: 7,
            });
            let bytes = encode(&command).unwrap();
            proptest::prop_assert_eq!(&bytes[..4], &7u32.to_le_bytes(), "Publish is variant 7");
            let back: Command = decode(&bytes).unwrap();
            proptest::prop_assert_eq!(&back, &command);
            let Command::Publish(back) = back else {
                return Err(proptest::test_runner::TestCaseError::fail("not a publish"));
            };
            proptest::prop_assert_eq!(back.into_op().unwrap(), Op::Publish {
                queue: "q".into(),
                messages,
                now_ms: 7,
            });
        }
    }
}
