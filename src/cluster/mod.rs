//! The cluster: several `qit` nodes serving one broker, replicated with openraft.
//!
//! - [`types`]: the openraft type configuration, the entry payload, the codec.
//! - [`log_store`]: a group's Raft log on disk (`RaftLogStorage`).
//! - [`state_machine`]: applying committed entries through the broker's one apply path.
//! - [`metadata`]: the metadata group's snapshot (registry, users, grants, group ids).
//! - [`group_id`]: how every node names a queue's groups alike.
//! - [`groups`]: the metadata group, and per queue a queue group and one group per further
//!   partition, opened and closed as queues come and go; [`partitions`]: publishes to a
//!   queue of several partitions split by partition.
//! - [`placement`]: rendezvous hashing of queues over node ids.
//! - [`liveness`]: one beat per peer for all groups, and elections when a leader falls
//!   silent (openraft's per-group heartbeats and election timers are off).
//! - [`proposals`]: publishes that arrive together go as one entry (group commit).
//! - [`network`] and [`service`]: the internal tonic service on `--cluster`, signed with
//!   the cluster secret ([`auth`]); [`snapshot_transfer`]: snapshots sent in chunks that
//!   resume after a cut.
//! - [`view`]: `GET /cluster`, health and metrics.
//! - [`kafka_addrs`]: the nodes' Kafka listeners, for the Kafka adapter's metadata.
//! - [`handoff`] and [`balance`]: leadership handed off on a clean stop, and given back to
//!   a group's preferred leader when it returns.
//! - [`membership`] and [`moves`]: nodes added and removed while the cluster runs (the
//!   voters are the metadata group's membership), and queue groups moved to the replicas
//!   placement names over the voters; [`rejoin`]: a node that lost its data rejoins
//!   under its old id, and [`catch_up`]: a group whose log a node lost takes entries only
//!   from a current leader and votes only once caught up.
//!
//! How a request runs: the broker hands every state change to [`Cluster`] as an
//! [`Op`](crate::broker::replicate::Op) (it is the broker's
//! [`Replicator`](crate::broker::replicate::Replicator)). Replicated ops (publish, ack,
//! seek, dead-letter completion, metadata) are proposed to the group's leader and answered
//! once a majority has them and this node has applied them (a publish to a queue of
//! several partitions is split by partition first, each part proposed to its partition's
//! group); lease ops (receive, nack, extend) run on the leader of the queue's group, where
//! the leases live. A node that
//! does not lead forwards over the internal service, so every node serves every route, over
//! HTTP and gRPC alike. Reads (`GET /queues/{q}`, `/log`, `Subscribe`) are local: every
//! replica holds exactly the committed entries.
//!
//! Storage: each group has its own Raft log next to the broker's data
//! (`raft/{group}/`, [`log_store`]), and the broker's data of a cluster node (`queues/`,
//! `registry.journal`, `auth/` beside `raft/`, where a single server keeps them) is derived
//! from the groups: it is cleared at start ([`clear_rebuilt_state`]), the metadata group
//! installs its snapshot ([`metadata`]) and replays the entries after it, and so re-creates
//! every queue, and each queue group restores its queue from its latest snapshot and
//! replays only the entries after it ([`state_machine`], [`snapshot`]). A queue group snapshots every
//! `raft_snapshot_entries` entries: the snapshot hard-links the queue's sealed segments
//! (so they are not stored twice) and copies its group state; the Raft log below it is
//! purged, chunk by chunk. A follower too far behind for the log, or a new replica, is
//! sent the snapshot as one stream ([`snapshot_transfer`], resumed after a cut) and swaps
//! it in. Messages are still written twice while they are in the Raft log (bounded by the
//! snapshot interval); the segment log as the Raft log (format v2) would end that.

pub mod auth;
pub mod balance;
pub mod catch_up;
pub mod fencing;
pub mod group_id;
pub mod group_log;
pub mod groups;
pub mod handoff;
pub mod identity;
pub mod kafka_addrs;
pub mod liveness;
pub mod log_budget;
pub mod log_store;
pub mod membership;
pub mod metadata;
pub mod metadata_catch_up;
pub mod moves;
pub mod network;
pub mod partition_log_store;
pub mod partitions;
pub mod placement;
pub mod proposals;
pub mod publish_batch;
pub mod read_index;
pub mod recent_entries;
pub mod rejoin;
pub mod service;
pub mod snapshot;
pub mod snapshot_transfer;
pub mod state_machine;
pub mod types;
pub mod view;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use openraft::Instant as _;
use openraft::ReadPolicy;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use serde::{Deserialize, Serialize};

use crate::broker::replicate::{
    Op, OpResult, Replicator, Scope, WireDelivery, WireError, WireMessage, submit_each,
};
use crate::broker::unanswered::Unanswered;
use crate::broker::{Broker, BrokerError, MessageId};
use groups::{Groups, META_GROUP};
use network::Peers;
use publish_batch::EncodedAppend;
use state_machine::Raft;
use state_machine::Role;
use types::{Command, ForwardedRef, NodeAddrs, decode, encode};

/// How many times an op may be forwarded before it is answered "no leader".
const MAX_HOPS: u32 = 2;
/// How long a request waits for a group without a leader to elect one.
const LEADER_WAIT: Duration = Duration::from_secs(2);
/// A write renews the leader lease first when less than this is left of it.
const LEASE_MARGIN: Duration = Duration::from_millis(100);
/// How long a leader whose lease may have lapsed waits to hear from a quorum before a
/// request (a deposed one hears who leads now within a round trip).
const CONFIRM_WAIT: Duration = Duration::from_millis(500);
/// How long a leader waits for a majority to commit an entry before answering "no leader".
const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// How long a node waits to apply an op committed through another node.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// How long an ack waits for this node to apply a message it names that its copy does not
/// hold yet (see `Cluster::propose_ack`).
const ACK_APPLY_WAIT: Duration = Duration::from_secs(1);
/// How many times one request follows its group's leader to another node, when the one it
/// was forwarded to is gone or deposed.
const FORWARD_ATTEMPTS: u32 = 3;

/// Errors of starting the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A setting is unusable.
    #[error("cluster settings: {0}")]
    Config(String),
    /// A Raft log or directory could not be used.
    #[error("cluster storage {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// openraft refused to start a group.
    #[error("raft: {0}")]
    Raft(String),
}

/// What a cluster node needs.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id.
    pub node_id: u64,
    /// Every voter's id and cluster address (this node's included).
    pub peers: BTreeMap<u64, String>,
    /// The shared secret.
    pub secret: auth::Secret,
    /// This node's data directory (Raft logs go to `raft/`).
    pub data_dir: PathBuf,
    /// Sync Raft log appends before acknowledging them (`--fsync always`).
    pub sync: bool,
    /// A queue group snapshots its data after this many applied entries, and its Raft log
    /// is purged below the snapshot (`raft_snapshot_entries`).
    pub snapshot_entries: u64,
    /// A queue group also snapshots, and purges its Raft log, once the log's files hold
    /// more than this many bytes (`raft_log_bytes`; 0: no such bound).
    pub log_bytes: u64,
    /// This node joins a running cluster (`--join`): its metadata group is not initialized
    /// from `peers` (which name some members to ask, and this node), a member adds it.
    pub join: bool,
    /// This node replaces that node (`--replaces`): once it votes, it has the old node
    /// removed ([`membership`]).
    pub replaces: Option<u64>,
    /// This node's bound cluster, HTTP and gRPC addresses (announced to the others).
    pub cluster_addr: SocketAddr,
    /// HTTP address.
    pub http_addr: SocketAddr,
    /// gRPC address.
    pub grpc_addr: SocketAddr,
    /// Kafka address, when the listener is on (announced as [`Command::Kafka`]).
    pub kafka_addr: Option<SocketAddr>,
}

/// The broker's files at the top of a data directory (a single server's layout, which a
/// cluster node shares beside its `raft/`), and `state/`, where a cluster node kept them
/// before. A cluster node's are derived: see [`clear_rebuilt_state`].
pub const REBUILT_STATE: [&str; 6] = [
    "queues",
    "registry.journal",
    "registry.json",
    "auth",
    ".healthcheck",
    "state",
];

/// Clears the broker data of a cluster node (its queues, registry and users, in the same
/// places as a single server's, so that operators and `qit-inspect` find a partition at
/// `{data-dir}/queues/{q}/{p}` on either): the groups' snapshots and committed Raft logs
/// rebuild it at start (see the module docs). Only the names of [`REBUILT_STATE`] go,
/// never anything else the directory holds; the broker's directory is `data_dir` itself.
pub fn clear_rebuilt_state(data_dir: &Path) -> Result<(), ClusterError> {
    for name in REBUILT_STATE {
        let path = data_dir.join(name);
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        removed.map_err(|source| ClusterError::Io { path, source })?;
    }
    Ok(())
}

/// The address this node's connections to its peers go out from: the IP of its cluster
/// listener, unless that is a wildcard (then the system picks, as for any client).
fn local_ip(cluster: SocketAddr) -> Option<std::net::IpAddr> {
    (!cluster.ip().is_unspecified()).then_some(cluster.ip())
}

/// The Kafka address this node announces for its listener at `kafka`: that address,
/// unless it is a wildcard (`0.0.0.0`, `::`), which no client can connect to. Then the
/// listener's port at the IP of this node's `--cluster` address, or else at the host the
/// cluster's `--peers` list gives for this node (how the other nodes reach it).
fn advertised_kafka(kafka: SocketAddr, cluster: SocketAddr, listed: Option<&str>) -> String {
    if !kafka.ip().is_unspecified() {
        return kafka.to_string();
    }
    if !cluster.ip().is_unspecified() {
        return SocketAddr::new(cluster.ip(), kafka.port()).to_string();
    }
    let host = listed
        .and_then(|addr| addr.rsplit_once(':'))
        .map(|(host, _)| host)
        .filter(|host| {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            bare.parse::<std::net::IpAddr>()
                .map_or(!bare.is_empty(), |ip| !ip.is_unspecified())
        });
    match host {
        Some(host) => format!("{host}:{}", kafka.port()),
        None => {
            tracing::warn!(%kafka, "the Kafka listener is on a wildcard address and neither --cluster nor --peers names this node's host: clients are told {kafka}");
            kafka.to_string()
        }
    }
}

/// What a node answers to a forwarded op: the outcome and, for a replicated op, the
/// group and log index it was committed at (so the caller can wait to apply it too).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardReply {
    /// The outcome.
    pub result: Result<OpResult, WireError>,
    /// `(group, index)` of the committed entry.
    pub applied: Option<(u64, u64)>,
}

/// A running cluster node.
pub struct Cluster {
    groups: Arc<Groups>,
    liveness: liveness::Liveness,
    proposals: Arc<proposals::Proposals>,
    /// Publishes this node forwards to their queue's leader, batched the same way.
    forwards: Arc<proposals::Proposals>,
    /// This node's own handle, for the forwarding batches' background writers.
    me: std::sync::Weak<Cluster>,
    meta: Raft,
    broker: Arc<Broker>,
    config: ClusterConfig,
    /// Groups being handed to another node (their requests wait).
    transfers: handoff::Transfers,
    /// Held by the membership change under way here, the metadata leader: one at a time
    /// (openraft refuses a second while the first is joint; a node asking to join while
    /// an operator adds it then gets one answer, not a refusal).
    membership_changes: tokio::sync::Mutex<()>,
    /// This node's confirmations of its metadata view (see [`metadata_catch_up`]).
    caught_up: metadata_catch_up::CaughtUp,
}

fn no_leader(what: impl std::fmt::Display) -> BrokerError {
    BrokerError::NoLeader(what.to_string())
}

/// Proposes `command` as one entry of `raft`'s group (this node leads it) and waits until
/// it is committed and applied here.
async fn propose_entry(
    raft: &Raft,
    group: u64,
    command: Command,
) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
    // openraft 0.10 takes a write only while its leader lease holds (a quorum answered
    // within `election_timeout_max`), and a group sends nothing while it is idle (its
    // heartbeats are off, see `liveness`): the first write after a pause renews the lease
    // with one quorum round first.
    if let Err(error) = ensure_lease(raft).await {
        return Err(no_leader(format!("group {group}: {error}")));
    }
    match tokio::time::timeout(COMMIT_WAIT, write_entry(raft, group, command)).await {
        Ok(written) => written,
        // A leader cut off from its majority cannot commit; the entry may still commit
        // later (a retry can then store it twice: at least once, like a lost answer).
        Err(_) => Err(not_committed(group)),
    }
}

/// The answer to a proposal whose entry was not committed within [`COMMIT_WAIT`].
fn not_committed(group: u64) -> BrokerError {
    no_leader(format!(
        "group {group}: not committed within {COMMIT_WAIT:?} (no quorum?)"
    ))
}

/// Writes `command` as an entry of `raft`'s group, which this node leads, and waits until
/// it is applied here or known not to be (however long that takes: see
/// [`propose_entry`] for the bounded wait).
async fn write_entry(
    raft: &Raft,
    group: u64,
    command: Command,
) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
    match raft.client_write(command).await {
        Ok(response) => {
            let result = response.data.0.map_err(BrokerError::from)?;
            Ok((result, Some((group, response.log_id.index))))
        }
        // Not forwarded again: a leader deposed after appending the entry answers so too,
        // and the entry may still commit under the next leader; proposing it again would
        // store it twice. The client retries on 503, as after any lost answer.
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(to))) => Err(no_leader(format!(
            "group {group} changed leader (now {:?})",
            to.leader_id
        ))),
        Err(error) => Err(no_leader(format!("group {group}: {error}"))),
    }
}

/// True while `raft`'s group runs (openraft stops a group for good on a storage error).
fn running(raft: &Raft) -> bool {
    raft.metrics().borrow_watched().running_state.is_ok()
}

/// True when this node leads `raft`'s group and its leader lease has less than
/// [`LEASE_MARGIN`] left (or its followers never answered).
fn lease_may_lapse(raft: &Raft) -> bool {
    let m = raft.metrics();
    let m = m.borrow_watched();
    m.state == openraft::ServerState::Leader
        && m.last_quorum_acked
            .as_ref()
            .is_none_or(|at| at.elapsed() + LEASE_MARGIN >= groups::LEADER_LEASE)
}

/// Before a write or a membership change: renews the leader lease of `raft`'s group with
/// one quorum round when it may lapse (openraft 0.10 refuses both without a lease, and an
/// idle group's lease lapses: its heartbeats are off).
async fn ensure_lease(raft: &Raft) -> Result<(), String> {
    renew_lease(raft, LEADER_WAIT)
        .await
        .map_err(|lost| lost.reason)
}

/// Why a leader lease was not renewed, and who leads instead when a quorum said so.
struct LeaseLost {
    reason: String,
    /// A quorum answered with a newer term: this node no longer leads.
    deposed: bool,
    /// The group's leader as the quorum knows it, if it does.
    leader: Option<u64>,
}

/// [`ensure_lease`] waiting up to `wait`, telling a deposed leader who leads now.
async fn renew_lease(raft: &Raft, wait: Duration) -> Result<(), LeaseLost> {
    if !lease_may_lapse(raft) {
        return Ok(());
    }
    read_index(raft, ReadPolicy::ReadIndex, wait).await
}

/// Before a read from this node's own state as the leader of `raft`'s group: confirms
/// that it leads (with its leader lease while that holds, else with a quorum round, up to
/// `wait`) and waits until its state machine applied every entry committed before
/// (openraft's read index). A leader lease alone does not do: a node elected a moment ago
/// holds a fresh lease before it has applied what the previous leader committed (a read
/// on a leader the group was handed back to answered a queue without the last publish).
async fn confirm_read(raft: &Raft, wait: Duration) -> Result<(), LeaseLost> {
    if lease_may_lapse(raft) {
        return read_index(raft, ReadPolicy::ReadIndex, wait).await;
    }
    match read_index(raft, ReadPolicy::LeaseRead, wait).await {
        // The lease lapsed since it was looked at: a quorum round then.
        Err(lost) if !lost.deposed => read_index(raft, ReadPolicy::ReadIndex, wait).await,
        done => done,
    }
}

/// openraft's read index by `policy` within `wait`: `Ok` once this node is confirmed as
/// the leader and has applied every entry committed before; else why not, and who leads
/// now when that is known.
async fn read_index(raft: &Raft, policy: ReadPolicy, wait: Duration) -> Result<(), LeaseLost> {
    match tokio::time::timeout(wait, raft.ensure_linearizable(policy)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => {
            let forward = error.forward_to_leader();
            let leader = forward.and_then(|to| to.leader_id);
            let reason = match (forward, leader) {
                (_, Some(leader)) => format!("this node no longer leads (node {leader} does)"),
                (Some(_), None) => {
                    "this node no longer leads (its successor is not known yet)".into()
                }
                (None, None) => format!("leader lease not renewed: {}", lease_error(&error)),
            };
            Err(LeaseLost {
                reason,
                deposed: forward.is_some(),
                leader,
            })
        }
        Err(_) => Err(LeaseLost {
            reason: "leader lease not renewed in time (no quorum?)".into(),
            deposed: false,
            leader: None,
        }),
    }
}

/// Why a leader could not confirm its lease, for people: openraft's own text of a lost
/// quorum prints the membership as a debug structure.
fn lease_error(
    error: &RaftError<types::TypeConfig, LinearizableReadError<types::TypeConfig>>,
) -> String {
    match error {
        RaftError::APIError(LinearizableReadError::QuorumNotEnough(quorum)) => {
            let answered: Vec<String> = quorum.got.iter().map(u64::to_string).collect();
            let nodes = if answered.len() == 1 { "node" } else { "nodes" };
            format!(
                "too few voters answered for a quorum (only {nodes} {})",
                answered.join(", ")
            )
        }
        other => other.to_string(),
    }
}

/// Reads a replica answered from its own committed copy because no leader of the group
/// answered for it (read fallback: the data may be behind the leader's) (counter).
pub const READ_FALLBACKS: &str = "qit_cluster_read_fallbacks_total";

/// A read of `group` is answered from this node's own copy (the read fallback), because
/// of `why`.
fn read_fallback(group: u64, why: &str) {
    tracing::debug!(group, %why, "read fallback: answering from this node's copy");
    metrics::counter!(READ_FALLBACKS).increment(1);
}

/// Resolves once `leaders` names a leader other than `leader` after this call: what it
/// held before does not count. The watch follows the metrics a moment behind, so a node
/// that just learned it was deposed may still see itself there while it forwards to its
/// successor; taking that for a change of leader dropped a forwarded publish the successor
/// had already stored and sent it again (stored twice). Never resolves once the group
/// stopped (the call decides).
async fn deposed_after(leaders: &mut tokio::sync::watch::Receiver<Option<u64>>, leader: u64) {
    leaders.borrow_and_update();
    loop {
        if leaders.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if leaders.borrow_and_update().is_some_and(|l| l != leader) {
            return;
        }
    }
}

/// A receiver of `raft`'s current leader (a group this node has no watch of yet).
fn watch_metrics_leader(raft: &Raft) -> tokio::sync::watch::Receiver<Option<u64>> {
    let (_, rx) = tokio::sync::watch::channel(raft.metrics().borrow_watched().current_leader);
    rx
}

/// The partition an append command names (a publish's by its first message, which a
/// split publish names for all, see [`partitions`]); `None` for anything else.
fn appended_partition(command: &Command) -> Option<u32> {
    match command {
        Command::Broker(Op::Publish { messages, .. }) => messages.first()?.partition,
        Command::Broker(Op::AppendRecords { partition, .. }) => Some(*partition),
        Command::AppendRecords(append) => Some(append.partition),
        Command::Records(records) => Some(records.partition),
        Command::RecordBatch(records) => Some(records.partition),
        _ => None,
    }
}

/// A publish forwarded with its group named (`expected`) as the op's serde form carries
/// it, without its messages' partitions: they are the group's partition again (an encoded
/// publish carries them, and an append names its own). Any other command as it is.
fn name_partition(command: Command, expected: Option<u64>) -> Command {
    match (command, expected) {
        (
            Command::Broker(Op::Publish {
                queue,
                mut messages,
                now_ms,
            }),
            Some(group),
        ) => {
            let (_, partition) = groups::split_group(group);
            for m in messages.iter_mut().filter(|m| m.partition.is_none()) {
                m.partition = Some(partition);
            }
            Command::Broker(Op::Publish {
                queue,
                messages,
                now_ms,
            })
        }
        (command, _) => command,
    }
}

fn is_publish(command: &Command) -> bool {
    matches!(
        command,
        Command::Broker(Op::Publish { .. }) | Command::Publish(_)
    )
}

/// The partition whose publishes and appends group `group`'s leader sequences (see
/// `broker::sequencer`): every group of a split queue, partition 0 in the queue group
/// itself. `None` for the metadata group and the group of a queue made before partitions
/// had groups of their own, whose replicas decide publishes when they apply them.
fn sequenced_partition(group: u64) -> Option<u32> {
    let (queue_group, partition) = group_id::split_group(group);
    (group != META_GROUP && group_id::is_split(queue_group)).then_some(partition)
}

/// A publish's queue, messages and time.
type PublishParts = (String, Vec<WireMessage>, i64);

/// The parts of a publish command ([`is_publish`]), its messages decoded.
fn publish_parts(command: Command) -> Result<PublishParts, BrokerError> {
    let op = match command {
        Command::Broker(op) => op,
        Command::Publish(p) => p.into_op()?,
        _ => return Err(BrokerError::InvalidArgument("not a publish".into())),
    };
    match op {
        Op::Publish {
            queue,
            messages,
            now_ms,
        } => Ok((queue, messages, now_ms)),
        _ => Err(BrokerError::InvalidArgument("not a publish".into())),
    }
}

/// The parts of several publishes that go to one partition: which publish each came from,
/// with the positions of its messages there, and the messages.
type PartitionParts = (Vec<(usize, Vec<usize>)>, Vec<Vec<WireMessage>>);

/// The group a read goes to, and its replicas.
struct ReadGroup {
    id: u64,
    replicas: Vec<u64>,
}

/// How forwarding an op failed.
enum Forwarding {
    /// The target is gone or no longer leads: the op may go to the group's next leader.
    Moved(String),
    /// The answer (or the reason there is none) is final.
    Failed(BrokerError),
}

/// Takes `elapsed` off the wait of a receive (a long-poll followed to another leader
/// waits only for what is left of it); other commands are left as they are.
fn shorten_wait(command: &mut Command, elapsed: Duration) {
    if let Command::Broker(Op::Receive { wait_ms, .. }) = command {
        let elapsed = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        *wait_ms = wait_ms.saturating_sub(elapsed);
    }
}

/// How long a forwarded op may take: its own waits (a long-poll's, a leader's for a
/// quorum, the answering node's to apply), and some slack.
fn forward_deadline(command: &Command) -> Duration {
    let waits = LEADER_WAIT * 2 + COMMIT_WAIT + APPLY_WAIT + Duration::from_secs(3);
    match command {
        Command::Broker(Op::Receive { wait_ms, .. }) => waits + Duration::from_millis(*wait_ms),
        Command::Members(_) => waits + membership::LONGEST_CHANGE,
        _ => waits,
    }
}

impl Cluster {
    /// This node before it starts, as its cluster listener answers for it
    /// ([`rejoin::Local`]): serve it (with [`service::Service::server`]) before
    /// [`Cluster::start`], so that peers starting at the same time hear from it.
    pub fn prepare(config: &ClusterConfig) -> Result<Arc<rejoin::Local>, ClusterError> {
        if !config.peers.contains_key(&config.node_id) {
            return Err(ClusterError::Config(format!(
                "node {} is not in --peers",
                config.node_id
            )));
        }
        let peers = Arc::new(Peers::new(
            config.node_id,
            &config.peers,
            config.secret.clone(),
            local_ip(config.cluster_addr),
        )?);
        Ok(Arc::new(rejoin::Local::new(peers)))
    }

    /// Opens this node's groups (the metadata group now; queue groups as its log replays)
    /// over `broker`, whose data directory must be the one [`clear_rebuilt_state`] cleared,
    /// once its data or its peers let it ([`rejoin`]). `local` is from [`Cluster::prepare`];
    /// the caller moves it to [`rejoin::Phase::Running`] once the node is wired up.
    pub async fn start(
        config: ClusterConfig,
        broker: Arc<Broker>,
        local: &rejoin::Local,
    ) -> Result<Arc<Self>, ClusterError> {
        rejoin::check(local, config.node_id, &config.data_dir.join("raft")).await?;
        let groups = Arc::new(Groups::new(
            config.node_id,
            config.peers.clone(),
            config.data_dir.join("raft"),
            groups::Storage {
                sync: config.sync,
                snapshot_entries: config.snapshot_entries,
                log_bytes: config.log_bytes,
            },
            Arc::clone(local.peers()),
            Arc::clone(&broker),
        ));
        let voters: Vec<u64> = config.peers.keys().copied().collect();
        let members = if config.join {
            Vec::new()
        } else {
            placement::replicas("", &voters, voters.len())
        };
        let meta = groups
            .open_group(META_GROUP, &members, Role::Meta(Arc::clone(&groups) as _))
            .await?;
        // The voters stay as the applied metadata left them (its snapshot and the entries
        // replayed by `open_group`): placement must read them at the same log position on
        // every node. The log's latest membership (maybe not applied yet) only names the
        // addresses this node may have to reach.
        let latest = meta.metrics().borrow_watched().membership_config.clone();
        for (id, node) in latest.membership().nodes() {
            groups.peers.ensure(*id, &node.addr);
        }
        Ok(Arc::new_cyclic(|me| Self {
            groups,
            liveness: liveness::Liveness::new(config.node_id, config.peers.keys().copied()),
            proposals: Arc::default(),
            forwards: Arc::default(),
            me: me.clone(),
            meta,
            broker,
            config,
            transfers: handoff::Transfers::default(),
            membership_changes: tokio::sync::Mutex::new(()),
            caught_up: metadata_catch_up::CaughtUp::default(),
        }))
    }

    /// The peers.
    pub fn peers(&self) -> &Peers {
        &self.groups.peers
    }

    /// The groups.
    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    /// The configuration.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The metadata group.
    pub fn meta(&self) -> &Raft {
        &self.meta
    }

    /// The metadata group's leader as this node knows it (`None` while it has none).
    pub fn meta_leader(&self) -> Option<u64> {
        self.meta.metrics().borrow_watched().current_leader
    }

    /// The node to ask about metadata this node may not have (a queue made a moment ago):
    /// the metadata leader as this node knows it, or, where this node's replica of the
    /// metadata stopped (a storage error; it learns nothing more), another voter, which
    /// knows or forwards. `None`: this node is the one to answer, or knows of none.
    fn metadata_source(&self) -> Option<u64> {
        let leader = if running(&self.meta) {
            self.meta_leader()
        } else {
            self.other_replica(&self.groups.voter_ids())
        };
        leader.filter(|&leader| leader != self.node_id())
    }

    /// Joins the cluster (`--join`), announces this node's addresses through the metadata
    /// group until they stick, and then has the node it replaces removed (`--replaces`);
    /// run in the background.
    pub async fn announce(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let addrs = NodeAddrs {
            id: self.config.node_id,
            cluster: self.config.cluster_addr.to_string(),
            http: self.config.http_addr.to_string(),
            grpc: self.config.grpc_addr.to_string(),
        };
        if self.config.join {
            Arc::clone(&self).join(stop.clone()).await;
        }
        loop {
            if self.groups.node(addrs.id).as_ref() == Some(&addrs) {
                break;
            }
            let reply = self.execute(Command::Node(addrs.clone()), 0).await;
            if reply.result.is_ok() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.cancelled() => return,
            }
        }
        if let Some(kafka) = self.config.kafka_addr {
            let listed = self.config.peers.get(&self.config.node_id);
            let kafka = types::KafkaAddr {
                id: self.config.node_id,
                kafka: advertised_kafka(
                    kafka,
                    self.config.cluster_addr,
                    listed.map(String::as_str),
                ),
            };
            self.announce_kafka(kafka, &stop).await;
        }
        if let Some(old) = self.config.replaces {
            self.replace(old, stop).await;
        }
    }

    /// Announces this node's Kafka listener through the metadata group until it sticks.
    async fn announce_kafka(
        &self,
        kafka: types::KafkaAddr,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        loop {
            if self.groups.kafka.get(kafka.id).as_ref() == Some(&kafka.kafka) {
                return;
            }
            let reply = self.execute(Command::Kafka(kafka.clone()), 0).await;
            if reply.result.is_ok() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The group a command runs in (`None`: a queue this node does not know): an append
    /// to a partition after the first runs in that partition's group, anything else of a
    /// queue in its queue group (see [`groups::QueueGroup`]).
    fn group_of(&self, command: &Command) -> Option<(u64, bool)> {
        match command.scope() {
            Scope::Meta => Some((META_GROUP, false)),
            Scope::Queue(q) => self.groups.queue_group(q).map(|g| {
                let partition = appended_partition(command).unwrap_or(0);
                (g.group_of(partition), false)
            }),
            Scope::Leases(q) => self.groups.queue_group(q).map(|g| (g.id, true)),
        }
    }

    /// The group a forwarded publish names (`expected`), when it is one of its queue's
    /// groups: a publish forwarded in its encoded form goes to the group its sender
    /// routed it by (its messages name their partitions, but only decoding would tell).
    fn named_append_group(&self, command: &Command, expected: u64) -> Option<(u64, bool)> {
        if !is_publish(command) {
            return None;
        }
        let Scope::Queue(queue) = command.scope() else {
            return None;
        };
        let group = self.groups.queue_group(queue)?;
        group.partition_of(expected).map(|_| (expected, false))
    }

    /// True for a publish to a queue of several partitions whose messages do not all name
    /// one partition yet: it is split by partition first ([`partitions`]).
    fn must_split(&self, command: &Command) -> bool {
        let Command::Broker(Op::Publish {
            queue, messages, ..
        }) = command
        else {
            return false;
        };
        let several = self
            .groups
            .queue_group(queue)
            .is_some_and(|g| g.partitions > 1);
        several && !partitions::is_part(messages)
    }

    /// Runs a publish to a queue of several partitions as one publish per partition, side
    /// by side, each to its partition's group (see [`partitions`]), and waits until this
    /// node applied each: the ids in the order of the messages.
    async fn publish_split(
        &self,
        command: Command,
        hops: u32,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        let (queue, messages, now_ms) = publish_parts(command)?;
        let count = self.groups.queue_group(&queue).map_or(1, |g| g.partitions);
        let len = messages.len();
        let parts = partitions::split(&self.broker, &queue, count, messages);
        let runs = parts.into_iter().map(|part| {
            let command = Command::Broker(Op::Publish {
                queue: queue.clone(),
                messages: part.messages,
                now_ms,
            });
            async move {
                let answer = Box::pin(self.execute_inner(command, hops, None)).await;
                if let Ok((_, Some((group, index)))) = &answer {
                    self.wait_applied(*group, *index).await;
                }
                (part.positions, answer.map(|(result, _)| result))
            }
        });
        let answers = futures_util::future::join_all(runs).await;
        partitions::merge(len, answers).map(|result| (result, None))
    }

    /// The group of `command` once this node has applied the metadata entry that made it,
    /// for a forward whose sender named the group (`expected`): a group's id is twice the
    /// index of the metadata entry that created its queue (plus one for the queue's
    /// dead-letter queue), so a node a little behind on the metadata waits for that entry
    /// (at most [`LEADER_WAIT`]) instead of answering that a queue just made does not
    /// exist.
    async fn group_once_applied(
        &self,
        command: &Command,
        expected: Option<u64>,
    ) -> Option<(u64, bool)> {
        let applied = self.groups.applied(META_GROUP)?;
        if running(&self.meta) {
            applied
                .wait(groups::created_at(expected?), LEADER_WAIT)
                .await;
        }
        self.group_of(command)
    }

    /// Runs a command here (leading its group) or forwards it to the node that leads it.
    pub async fn execute(&self, command: Command, hops: u32) -> ForwardReply {
        self.execute_routed(command, hops, None).await
    }

    /// [`Self::execute`] for a command another node forwarded, routed by `expected` (see
    /// [`Forwarded`]).
    pub async fn execute_routed(
        &self,
        command: Command,
        hops: u32,
        expected: Option<u64>,
    ) -> ForwardReply {
        match self.execute_inner(command, hops, expected).await {
            Ok((result, applied)) => ForwardReply {
                result: Ok(result),
                applied,
            },
            Err(error) => ForwardReply {
                result: Err(WireError::from(&error)),
                applied: None,
            },
        }
    }

    async fn execute_inner(
        &self,
        command: Command,
        hops: u32,
        expected: Option<u64>,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        let command = match command {
            Command::AwaitMeta(index) => {
                self.wait_applied(META_GROUP, index).await;
                return Ok((OpResult::Done, None));
            }
            Command::MetaReadIndex => return self.meta_read_index(hops).await,
            Command::ReadIndex(group) => return self.group_read_index(group, hops).await,
            Command::Broker(op) if op.is_read() => {
                // A read sent with its group named comes from a node without a copy.
                let answer = match self.read_elsewhere(&op, hops, expected.is_some()).await {
                    Some(answer) => answer,
                    None => self.broker.apply_op(op).await,
                };
                return answer.map(|result| (result, None));
            }
            command if expected.is_none() && self.must_split(&command) => {
                return self.publish_split(command, hops).await;
            }
            command => name_partition(command, expected),
        };
        let named = expected.and_then(|e| self.named_append_group(&command, e));
        let found = match named.or_else(|| self.group_of(&command)) {
            Some(found) => Some(found),
            None => self.group_once_applied(&command, expected).await,
        };
        let Some((group, leases)) = found else {
            // A queue created a moment ago may not have reached this node's metadata yet:
            // the metadata leader knows every committed queue.
            return match (self.metadata_source(), &command) {
                (Some(leader), _) if hops < MAX_HOPS => {
                    self.forward(leader, command, hops, expected).await
                }
                (_, command) => match command.scope() {
                    Scope::Queue(q) | Scope::Leases(q) => {
                        Err(BrokerError::QueueNotFound(q.to_string()))
                    }
                    Scope::Meta => Err(no_leader("metadata")),
                },
            };
        };
        if expected
            .is_some_and(|expected| groups::split_group(expected).0 != groups::split_group(group).0)
        {
            return Err(no_leader(format!(
                "the queue was made again (group {group}, not {expected:?}): ask again"
            )));
        }
        let Some(raft) = self.groups.raft(group).filter(running) else {
            // Not a replica of this queue, or its replica here stopped (a storage error
            // ended its group; the other replicas elect a leader without it): another
            // replica leads or forwards. The metadata group has a replica on every voter.
            let replica = match command.scope() {
                Scope::Queue(_) | Scope::Leases(_) => self
                    .groups
                    .group_replicas(group)
                    .and_then(|replicas| self.other_replica(&replicas)),
                Scope::Meta => self.metadata_source(),
            };
            return match replica {
                Some(node) if hops < MAX_HOPS => {
                    self.forward(node, command, hops, Some(group)).await
                }
                _ => Err(no_leader(format!(
                    "group {group} is not reachable from here"
                ))),
            };
        };
        let mut attempts = 0;
        let (mut command, mut since) = (command, tokio::time::Instant::now());
        loop {
            let leader = self.leader_after_handoff(&raft, group).await;
            return match leader {
                Some(leader) if leader == self.node_id() && leases => {
                    match self.run_leases(&raft, command.clone()).await {
                        // Deposed meanwhile (it handed the group over, say): the op follows
                        // the group to its next leader, as a forwarded one does.
                        Err(BrokerError::NoLeader(why))
                            if attempts + 1 < FORWARD_ATTEMPTS
                                && self.other_leader(&raft).await.is_some() =>
                        {
                            tracing::debug!(group, %why, "following the group's leader");
                            attempts += 1;
                            shorten_wait(&mut command, since.elapsed());
                            since = tokio::time::Instant::now();
                            continue;
                        }
                        answer => answer,
                    }
                }
                Some(leader) if leader == self.node_id() => match command {
                    Command::Members(change) => self.change_members(change).await,
                    command => self.propose(&raft, group, command).await,
                },
                Some(_) if hops < MAX_HOPS && is_publish(&command) => {
                    self.forward_publish(group, command, hops).await
                }
                Some(leader) if hops < MAX_HOPS => {
                    let forwarded = self
                        .forward_or_follow(
                            &raft,
                            group,
                            leader,
                            (&command, leases),
                            hops,
                            &mut attempts,
                        )
                        .await;
                    match forwarded {
                        Some(answer) => answer,
                        None => {
                            // A long-poll goes on at the next leader for what is left of
                            // its wait.
                            shorten_wait(&mut command, since.elapsed());
                            since = tokio::time::Instant::now();
                            continue;
                        }
                    }
                }
                Some(leader) => Err(no_leader(format!(
                    "group {group}: leader {leader} is more than {MAX_HOPS} hops away"
                ))),
                None => Err(no_leader(format!("group {group} has no leader"))),
            };
        }
    }

    /// Where a read-only op ([`Op::is_read`]) runs: `None` to answer it from this node's own
    /// copy, which it does when it leads the queue's group, or holds a replica while the
    /// group has no leader (none known after [`LEADER_WAIT`]) or its leader does not answer
    /// (read fallback: committed data, maybe behind the leader's). Else the answer of the
    /// leader, or for a node without a replica of the first of the replicas that answers
    /// (each one answers as this one would); `no_leader` when none does. A log read goes
    /// to the leader too: a follower learns that an entry is committed only with the
    /// leader's next message, so its own log could miss a publish that another node has
    /// already answered.
    ///
    /// `for_copyless`: the read was forwarded here by a node without a copy of the queue
    /// (it names the group it routed by), which has no copy of its own to fall back to:
    /// where no leader is known, this node's copy answers at once instead of after
    /// waiting for an election as long as the sender waits for the answer. A read from a
    /// replica waits (the replica answers from its own copy if this one does not answer;
    /// this node, restarted say, may know less).
    async fn read_elsewhere(
        &self,
        op: &Op,
        hops: u32,
        for_copyless: bool,
    ) -> Option<Result<OpResult, BrokerError>> {
        let Scope::Leases(queue) = op.scope() else {
            return None;
        };
        let Some(queue_group) = self.groups.queue_group(queue) else {
            return self.read_at_meta_leader(op, hops).await;
        };
        // A partition's log is read at its own group's leader; the rest of a queue (its
        // info, its groups) at the queue group's, which holds the leases.
        let partition = match op {
            Op::ReadLog { partition, .. } if *partition < queue_group.partitions => *partition,
            _ => 0,
        };
        let group = ReadGroup {
            id: queue_group.group_of(partition),
            replicas: queue_group.replicas_of(partition),
        };
        let replica = self.groups.raft(group.id).filter(running);
        let targets = match &replica {
            Some(raft) => {
                // No leader known here: a replica that has not heard from the leader yet
                // (a group made a moment ago) learns of it within the wait, and a group
                // without one may elect one meanwhile.
                match self.read_leader(raft, for_copyless).await {
                    Some(leader) if leader != self.node_id() => vec![leader],
                    Some(_) => match self.confirm_reading(raft, group.id).await {
                        Some(successor) => vec![successor],
                        None => {
                            self.settle_partitions(op, &queue_group).await;
                            return None;
                        }
                    },
                    None => {
                        read_fallback(group.id, "the group has no leader");
                        return None;
                    }
                }
            }
            // Not itself: a replica that has not opened the group yet would only ask
            // itself again.
            None => {
                let me = self.node_id();
                group
                    .replicas
                    .iter()
                    .copied()
                    .filter(|n| *n != me)
                    .collect()
            }
        };
        let command = Command::Broker(op.clone());
        let mut why = format!("group {}: more than {MAX_HOPS} hops", group.id);
        // Without a copy here, the group is named: the replica answers from its own.
        let named = replica.is_none().then_some(group.id);
        let wait = if hops > 0 {
            LEADER_WAIT / 2
        } else {
            LEADER_WAIT
        };
        for target in targets.into_iter().take_while(|_| hops < MAX_HOPS) {
            match self.forward_read(target, &command, hops, named, wait).await {
                Ok(answer) => return Some(answer),
                Err(reason) => why = reason,
            }
        }
        match replica {
            Some(_) => {
                read_fallback(group.id, &why);
                None
            }
            None => Some(Err(no_leader(why))),
        }
    }

    /// This node's metrics say it leads `raft`'s group, and a read would be answered from
    /// its own state: it first confirms the leadership and applies what was committed
    /// before ([`confirm_read`]; a quorum round when its lease may have lapsed, as after a
    /// pause), and a node that learns so that it was deposed reads at the new leader (the
    /// leader it names, `Some`) rather than answer from a state the new leader has moved
    /// past. `None`: read here (still the leader, or no quorum to ask: the read fallback).
    async fn confirm_reading(&self, raft: &Raft, group: u64) -> Option<u64> {
        match confirm_read(raft, CONFIRM_WAIT).await {
            Ok(()) => None,
            Err(lost) if lost.deposed => {
                let successor = self.successor(raft, group, &lost).await;
                if successor.is_none() {
                    read_fallback(group, "deposed, its successor not known yet");
                }
                successor
            }
            Err(lost) => {
                read_fallback(group, &lost.reason);
                None
            }
        }
    }

    /// A read of a queue this node does not know (yet): a queue created a moment ago may not
    /// have reached this node's metadata, while the metadata leader knows every committed
    /// queue, so it is asked; `None` (answered here, a 404) when this node leads the
    /// metadata group, no leader is known, or it does not answer.
    async fn read_at_meta_leader(
        &self,
        op: &Op,
        hops: u32,
    ) -> Option<Result<OpResult, BrokerError>> {
        let leader = self.metadata_source()?;
        if hops >= MAX_HOPS {
            return None;
        }
        let command = Command::Broker(op.clone());
        // The node asked may wait for an election before it reads.
        self.forward_read(leader, &command, hops, None, LEADER_WAIT * 2)
            .await
            .ok()
    }

    /// The replica (of `replicas`, in placement order) to forward to from a node that has
    /// none running: the first other one heard from lately, or else the first other one.
    fn other_replica(&self, replicas: &[u64]) -> Option<u64> {
        let others = || replicas.iter().copied().filter(|&n| n != self.node_id());
        others()
            .find(|&n| self.peers().is_up(n))
            .or_else(|| others().next())
    }

    /// The leader a read of `raft`'s group goes to: the one known, else one elected within
    /// [`LEADER_WAIT`]; for a node without a copy (`for_copyless`, see
    /// [`Self::read_elsewhere`]) only the one known, without waiting.
    async fn read_leader(&self, raft: &Raft, for_copyless: bool) -> Option<u64> {
        if for_copyless {
            return raft.metrics().borrow_watched().current_leader;
        }
        self.leader_of(raft).await
    }

    /// One forwarded read (routed by `group` where this node has no copy of the queue),
    /// given `wait` to answer (a read forwarded here gets half of [`LEADER_WAIT`]: its
    /// sender waits that long for this node): its answer (a result or a final error such
    /// as `queue_not_found`), or why there is none (the target is gone, has no leader
    /// either, or is too slow), for the caller to ask elsewhere or read here.
    async fn forward_read(
        &self,
        target: u64,
        command: &Command,
        hops: u32,
        group: Option<u64>,
        wait: Duration,
    ) -> Result<Result<OpResult, BrokerError>, String> {
        let call = self.forward_call(target, command, hops, group);
        match tokio::time::timeout(wait, call).await {
            Ok(Ok((result, _))) => Ok(Ok(result)),
            Ok(Err(Forwarding::Failed(BrokerError::NoLeader(reason)))) => Err(reason),
            Ok(Err(Forwarding::Failed(error))) => Ok(Err(error)),
            Ok(Err(Forwarding::Moved(reason))) => Err(reason),
            Err(_) => Err(format!("node {target} did not answer in time")),
        }
    }

    /// One forward of `command` to `leader` ([`Self::forward_to_leader`]): the answer, or
    /// `None` when the leader moved and another of [`FORWARD_ATTEMPTS`] is left (counted in
    /// `attempts`); the caller then asks again who leads, once another leader is known or
    /// [`LEADER_WAIT`] has passed.
    ///
    /// A lease op (`leases`: receive, nack, extend) also follows when the node answers that
    /// it no longer leads (it handed the group over meanwhile): nothing of a lease op is
    /// replicated, so running it at the next leader is safe. A replicated op answered so
    /// may have been committed all the same (a leader that steps down answers its pending
    /// proposals so), and is not sent again.
    async fn forward_or_follow(
        &self,
        raft: &Raft,
        group: u64,
        leader: u64,
        (command, leases): (&Command, bool),
        hops: u32,
        attempts: &mut u32,
    ) -> Option<Result<(OpResult, Option<(u64, u64)>), BrokerError>> {
        let answer = match self
            .forward_to_leader(raft, group, leader, command, hops)
            .await
        {
            Err(Forwarding::Failed(BrokerError::NoLeader(why))) if leases => {
                Err(Forwarding::Moved(why))
            }
            answer => answer,
        };
        match answer {
            Err(Forwarding::Moved(why)) if *attempts + 1 < FORWARD_ATTEMPTS => {
                tracing::debug!(group, leader, %why, "following the group's leader");
                *attempts += 1;
                self.leader_other_than(raft, leader).await;
                None
            }
            Err(Forwarding::Moved(why)) => Some(Err(no_leader(format!("group {group}: {why}")))),
            Err(Forwarding::Failed(error)) => Some(Err(error)),
            Ok(done) => Some(Ok(done)),
        }
    }

    /// Forwards `command` to `leader`, the leader of `raft`'s group as this node knows it,
    /// until it answers, or until it is gone (its address refuses calls, or the deadline
    /// passed) or deposed (this node learns of another leader meanwhile): then the caller
    /// follows the group to its next leader, within the same request. A publish so sent
    /// twice may be stored twice (at least once, as when a client retries a lost answer);
    /// the other replicated ops are idempotent, lease ops are not replicated.
    async fn forward_to_leader(
        &self,
        raft: &Raft,
        group: u64,
        leader: u64,
        command: &Command,
        hops: u32,
    ) -> Result<(OpResult, Option<(u64, u64)>), Forwarding> {
        // Another leader known before anything is sent: follow it, nothing can be stored
        // twice. (This node named there is a leadership it was deposed from, not yet
        // seen in its metrics: the caller learned `leader` from the others.)
        let known = raft.metrics().borrow_watched().current_leader;
        if let Some(other) = known.filter(|&l| l != leader && l != self.node_id()) {
            return Err(Forwarding::Moved(format!("node {other} leads now")));
        }
        // The group's leader only (its metrics change at every entry: hundreds of
        // requests in flight would all wake at each).
        let mut leaders = self
            .groups
            .leader_watch(group)
            .unwrap_or_else(|| watch_metrics_leader(raft));
        let deposed = deposed_after(&mut leaders, leader);
        tokio::select! {
            answer = self.forward_call(leader, command, hops, Some(group)) => answer,
            () = deposed => Err(Forwarding::Moved(format!("node {leader} no longer leads"))),
        }
    }

    /// Waits (up to [`LEADER_WAIT`]) until `raft`'s group has a leader other than `old`.
    async fn leader_other_than(&self, raft: &Raft, old: u64) {
        let _ = raft
            .wait(Some(LEADER_WAIT))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != old),
                "another leader",
            )
            .await;
    }

    /// Where this replica sends publishes to `group`, as [`Self::execute`] would: when this
    /// node leads it (and is not handing it off), the group's handle to propose them;
    /// `None` for the handle when another replica leads (forwarded). `None` on a node
    /// without a replica or while the group has no leader.
    async fn publish_route(&self, group: u64) -> Option<Option<Raft>> {
        let raft = self.groups.raft(group)?;
        match self.leader_after_handoff(&raft, group).await? {
            leader if leader == self.node_id() => Some(Some(raft)),
            _ => Some(None),
        }
    }

    /// The leader of `group` ([`Self::leader_of`]); when that is this node and the group
    /// was being handed off meanwhile (the hand-off holds new work until it ends), asked
    /// again once the hand-off is over.
    async fn leader_after_handoff(&self, raft: &Raft, group: u64) -> Option<u64> {
        let mut leader = self.leader_of(raft).await;
        if leader == Some(self.node_id()) && self.transfers.pause(group).await {
            leader = self.leader_of(raft).await;
        }
        if leader == Some(self.node_id()) {
            return self.confirm_leading(raft, group).await;
        }
        leader
    }

    /// This node's metrics say it leads `raft`'s group. When its leader lease may have
    /// lapsed (it was paused or cut off, say) it renews it first, before anything is
    /// proposed: a node that learns so that another node leads now answers that one (the
    /// caller forwards there, within the request, instead of answering `no_leader`); a
    /// node that cannot renew it within [`CONFIRM_WAIT`] answers itself, and proposing
    /// (which tries again, up to [`LEADER_WAIT`]) reports why.
    async fn confirm_leading(&self, raft: &Raft, group: u64) -> Option<u64> {
        match renew_lease(raft, CONFIRM_WAIT).await {
            Err(lost) if lost.deposed => self.successor(raft, group, &lost).await,
            _ => Some(self.node_id()),
        }
    }

    /// Another node that leads `raft`'s group now, waiting up to [`LEADER_WAIT`] for one
    /// if none is known: `Some` when this node was deposed.
    async fn other_leader(&self, raft: &Raft) -> Option<u64> {
        let me = self.node_id();
        self.leader_other_than(raft, me).await;
        let known = raft.metrics().borrow_watched().current_leader;
        known.filter(|l| *l != me)
    }

    /// Who leads `raft`'s group after this node learned it was deposed (waiting up to
    /// [`LEADER_WAIT`] for the others' election), if that is known yet.
    async fn successor(&self, raft: &Raft, group: u64, lost: &LeaseLost) -> Option<u64> {
        tracing::debug!(group, reason = %lost.reason, "deposed: following the group's leader");
        let me = self.node_id();
        self.other_leader(raft)
            .await
            .or(lost.leader.filter(|l| *l != me))
    }

    /// The group's leader, waiting up to [`LEADER_WAIT`] for an election.
    async fn leader_of(&self, raft: &Raft) -> Option<u64> {
        if let Some(leader) = raft.metrics().borrow_watched().current_leader {
            return Some(leader);
        }
        raft.wait(Some(LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .ok()
            .and_then(|m| m.current_leader)
    }

    /// Confirms with a quorum that this node leads `raft` and waits until it applied every
    /// entry committed before (openraft's read index); the term it leads in.
    ///
    /// The metrics alone do not do: a restarted node reports the leadership its saved vote
    /// names until it hears of a newer term, and would serve leases from a state that lacks
    /// the acks committed since (the leader-kill test delivered acked messages that way).
    async fn confirm_leader(&self, raft: &Raft) -> Result<u64, BrokerError> {
        match tokio::time::timeout(LEADER_WAIT, raft.ensure_linearizable(ReadPolicy::ReadIndex))
            .await
        {
            Ok(Ok(_)) => Ok(raft.metrics().borrow_watched().current_term),
            Ok(Err(error)) => Err(no_leader(format!("not the leader: {error}"))),
            Err(_) => Err(no_leader("leadership not confirmed in time")),
        }
    }

    /// Runs a lease op here, the leader, once a quorum confirmed the leadership and every
    /// entry committed before is applied (else a new leader could deliver a message acked
    /// under the old one). A receive is confirmed again after it leased: if the term moved
    /// on meanwhile, another leader may have taken acks this node never saw, so the
    /// deliveries are withheld (their leases here lapse) and the client asks again. A
    /// receive dropped during that confirmation (its caller went away) gives its leases
    /// back at once ([`Unanswered`]) instead of leaving them to lapse.
    async fn run_leases(
        &self,
        raft: &Raft,
        command: Command,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        let Command::Broker(op) = command else {
            return Err(no_leader("not a lease op"));
        };
        let term = self.confirm_leader(raft).await?;
        let result = lease_then_confirm(&self.broker, op, || async {
            let now = self.confirm_leader(raft).await?;
            if now == term {
                Ok(())
            } else {
                Err(no_leader(format!(
                    "leadership changed while leasing (term {term} -> {now})"
                )))
            }
        })
        .await?;
        Ok((result, None))
    }

    /// Proposes `command` to `raft`'s group, which this node leads: publishes through the
    /// group commit of [`proposals`], anything else as an entry of its own.
    async fn propose(
        &self,
        raft: &Raft,
        group: u64,
        command: Command,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        if is_publish(&command) {
            let (queue, mut messages, now_ms) = publish_parts(command)?;
            self.broker.check_sizes(&queue, &messages)?;
            // Keyless messages take their partitions here, once, for every replica.
            self.broker.take_turns(&queue, &mut messages);
            let sink = || self.leader_sink(raft, group);
            return self
                .proposals
                .publish(sink, group, queue, messages, now_ms)
                .await;
        }
        match command {
            Command::Broker(Op::Ack {
                queue,
                group: consumer,
                ids,
            }) => {
                self.broker.check_group(&queue, &consumer)?;
                self.propose_ack(raft, group, queue, consumer, ids).await
            }
            Command::Broker(Op::Seek {
                queue,
                group: consumer,
                target,
            }) => {
                // Resolved here, by this node's logs: see `Op::SeekTo`.
                let offsets = self.broker.resolve_seek(&queue, &target.into())?;
                let command = Command::Broker(Op::SeekTo {
                    queue,
                    group: consumer,
                    offsets,
                });
                propose_entry(raft, group, command).await
            }
            Command::Broker(Op::DeleteGroup {
                ref queue,
                group: ref consumer,
            }) => {
                let (queue, consumer) = (queue.clone(), consumer.clone());
                let entry = propose_entry(raft, group, command);
                self.broker
                    .propose_group_delete(&queue, &consumer, entry)
                    .await
            }
            Command::Broker(Op::AppendRecords {
                queue,
                partition,
                records,
                batch_key,
                now_ms,
            }) => {
                if let Some(own) = sequenced_partition(group) {
                    // Its leader decides its appends, as its publishes.
                    let append = proposals::AppendParts {
                        queue,
                        partition,
                        records,
                        batch_key,
                        now_ms,
                    };
                    let broker = Arc::clone(&self.broker);
                    return proposals::sequence_append(raft, group, broker, own, append).await;
                }
                // The records go encoded once, as one buffer (see `publish_batch`).
                let append = EncodedAppend::new(queue, partition, &records, batch_key, now_ms)?;
                propose_entry(raft, group, Command::AppendRecords(append)).await
            }
            command => propose_entry(raft, group, command).await,
        }
    }

    /// Proposes an ack of `ids` for `consumer` of `queue`: those this node's log holds
    /// (the replicas take them as checked, see `Broker::check_ids`), the others answered
    /// `message_not_found` in their place.
    async fn propose_ack(
        &self,
        raft: &Raft,
        group: u64,
        queue: String,
        consumer: String,
        ids: Vec<(u32, u64)>,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        let message_ids: Vec<MessageId> = ids
            .iter()
            .map(|&(partition, offset)| MessageId { partition, offset })
            .collect();
        // A message of a partition with a group of its own is committed there before any
        // consumer sees it, but this node (a queue group leader elected a moment ago, say)
        // may apply it a little later: waited for, up to `ACK_APPLY_WAIT`.
        let held = self
            .broker
            .check_ids(&queue, &message_ids, ACK_APPLY_WAIT)
            .await?;
        let known: Vec<(u32, u64)> = ids
            .iter()
            .zip(&held)
            .filter(|(_, held)| **held)
            .map(|(id, _)| *id)
            .collect();
        let (acked, applied) = match known.is_empty() {
            true => (Vec::new(), None),
            false => {
                let command = Command::Broker(Op::Ack {
                    queue,
                    group: consumer,
                    ids: known,
                });
                let (result, applied) = propose_entry(raft, group, command).await?;
                let OpResult::Acked(acked) = result else {
                    return Err(crate::broker::replicate::unexpected(&result));
                };
                (acked, applied)
            }
        };
        let mut acked = acked.into_iter();
        let results = message_ids
            .iter()
            .zip(held)
            .map(|(id, held)| match held {
                true => acked
                    .next()
                    .unwrap_or_else(|| Err(WireError::from(&no_leader("an ack went unanswered")))),
                false => Err(WireError::from(&BrokerError::MessageNotFound(*id))),
            })
            .collect();
        Ok((OpResult::Acked(results), applied))
    }

    /// Forwards a publish to its queue's leader together with the others that arrive
    /// meanwhile (one forwarded publish for many, see [`proposals`]).
    async fn forward_publish(
        &self,
        group: u64,
        command: Command,
        hops: u32,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        let (queue, messages, now_ms) = publish_parts(command)?;
        let sink = self.forward_sink(group, hops);
        self.forwards
            .publish(sink, group, queue, messages, now_ms)
            .await
    }

    /// A queue may ask for at most as many copies as there are nodes to place them on
    /// (the voters not leaving); more is refused, as Kafka refuses a replication factor
    /// above its brokers.
    fn check_replicas(&self, replicas: Option<u32>) -> Result<(), BrokerError> {
        let nodes = self.groups.eligible().len();
        match replicas {
            Some(wanted) if usize::try_from(wanted).map_or(true, |w| w > nodes) => {
                Err(BrokerError::InvalidSetting(crate::broker::InvalidSetting {
                    field: "replicas",
                    reason: format!(
                        "{wanted} copies, but the cluster has {nodes} nodes to place them on"
                    ),
                }))
            }
            _ => Ok(()),
        }
    }

    /// The sink of the publishes to `group` that this node, its leader, proposes. The leader
    /// of a split queue's group decides its publishes before they are replicated (see
    /// `broker::sequencer`); the replicas of a queue made before partitions had groups of
    /// their own decide when they apply. Every path of a publish into the group (one
    /// publish, a stream's publishes, forwarded ones) takes this sink, so that the leader
    /// holds every key on the way pending: a key in an entry the replicas decide would be
    /// unknown to the leader's window until applied.
    fn leader_sink(&self, raft: &Raft, group: u64) -> proposals::Sink {
        match sequenced_partition(group) {
            Some(partition) => {
                proposals::sequence_to(raft, group, Arc::clone(&self.broker), partition)
            }
            None => proposals::propose_to(raft, group),
        }
    }

    /// The sink of forwarded publishes to `group`'s leader ([`Self::forward_batch`]).
    fn forward_sink(&self, group: u64, hops: u32) -> impl FnOnce() -> proposals::Sink + use<> {
        let me = self.me.clone();
        move || -> proposals::Sink {
            Arc::new(move |command| {
                let me = me.clone();
                Box::pin(async move {
                    match me.upgrade() {
                        Some(cluster) => cluster.forward_batch(group, command, hops).await,
                        None => Err(no_leader("the node is stopping")),
                    }
                })
            })
        }
    }

    /// Sends a batch of forwarded publishes to the group's leader, following it when it
    /// moves (or proposes it here, should this node have become the leader meanwhile).
    async fn forward_batch(
        &self,
        group: u64,
        command: Command,
        hops: u32,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        let Some(raft) = self.groups.raft(group) else {
            return Err(no_leader(format!("group {group} is closed here")));
        };
        let mut attempts = 0;
        loop {
            let leader = match self.leader_of(&raft).await {
                Some(me) if me == self.node_id() => self.confirm_leading(&raft, group).await,
                leader => leader,
            };
            return match leader {
                // Led here meanwhile: proposed as this node proposes its own publishes.
                Some(leader) if leader == self.node_id() => {
                    self.leader_sink(&raft, group)(command).await
                }
                Some(leader) => {
                    let forwarded = self
                        .forward_or_follow(
                            &raft,
                            group,
                            leader,
                            (&command, false),
                            hops,
                            &mut attempts,
                        )
                        .await;
                    match forwarded {
                        Some(answer) => answer,
                        None => continue,
                    }
                }
                None => Err(no_leader(format!("group {group} has no leader"))),
            };
        }
    }

    async fn forward(
        &self,
        target: u64,
        command: Command,
        hops: u32,
        group: Option<u64>,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        self.forward_call(target, &command, hops, group)
            .await
            .map_err(|e| match e {
                Forwarding::Moved(why) => no_leader(why),
                Forwarding::Failed(error) => error,
            })
    }

    /// One forwarding call to `target`, with a deadline that leaves the op its own waits.
    async fn forward_call(
        &self,
        target: u64,
        command: &Command,
        hops: u32,
        group: Option<u64>,
    ) -> Result<(OpResult, Option<(u64, u64)>), Forwarding> {
        let body = encode(&ForwardedRef { group, command }).map_err(|e| {
            Forwarding::Failed(BrokerError::InvalidArgument(format!(
                "cannot encode op: {e}"
            )))
        })?;
        let reply = self
            .peers()
            .forward(target, hops + 1, body, forward_deadline(command))
            .await
            .map_err(|status| match status.code() {
                // The target went away or could not be reached (a killed node's calls end
                // in a transport error or a reset stream): ask who leads now. Errors of
                // the op itself come in the reply.
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Internal => {
                    Forwarding::Moved(format!("node {target}: {}", status.message()))
                }
                _ => Forwarding::Failed(no_leader(format!("node {target}: {}", status.message()))),
            })?;
        let reply: ForwardReply = decode(&reply).map_err(|e| {
            Forwarding::Failed(no_leader(format!("node {target} answered garbage: {e}")))
        })?;
        match reply.result {
            Ok(result) => Ok((result, reply.applied)),
            Err(error) => Err(Forwarding::Failed(error.into())),
        }
    }

    /// Waits until this node applied `index` of `group` (bounded; the op is committed
    /// either way, this only gives read-your-writes on the node that answered).
    /// A stopped replica applies nothing more: no wait there.
    async fn wait_applied(&self, group: u64, index: u64) {
        if !self.groups.raft(group).is_some_and(|raft| running(&raft)) {
            return;
        }
        if let Some(applied) = self.groups.applied(group) {
            applied.wait(index, APPLY_WAIT).await;
        }
    }

    /// Waits until every other voter that is up has applied the metadata up to `index`
    /// (each asked at once with [`Command::AwaitMeta`], each given [`LEADER_WAIT`]; a node
    /// down or slower is not waited for). A metadata change (a binding, say) is answered
    /// only then: a publish through an exchange on any live node routes by it, and a queue,
    /// user or grant made through one node is known to the others, as a client that goes on
    /// through another node expects.
    async fn spread_metadata(&self, index: u64) {
        let me = self.node_id();
        let others = self.groups.voter_ids().into_iter();
        let asks = others
            .filter(|&n| n != me && self.peers().is_up(n))
            .map(|node| async move {
                let command = Command::AwaitMeta(index);
                let call = self.forward_call(node, &command, 0, None);
                if !matches!(tokio::time::timeout(LEADER_WAIT, call).await, Ok(Ok(_))) {
                    tracing::debug!(node, index, "a peer did not confirm the metadata in time");
                }
            });
        futures_util::future::join_all(asks).await;
    }

    /// Stops every group.
    pub async fn shutdown(&self) {
        self.groups.shutdown().await;
    }
}

impl Replicator for Cluster {
    fn read(&self, op: Op) -> BoxFuture<'_, Option<Result<OpResult, BrokerError>>> {
        Box::pin(async move { self.read_elsewhere(&op, 0, false).await })
    }

    fn holds_replica(&self, queue: &str) -> bool {
        self.groups
            .queue_group(queue)
            .is_none_or(|g| self.groups.raft(g.id).is_some())
    }

    fn submit(&self, op: Op) -> BoxFuture<'_, Result<OpResult, BrokerError>> {
        Box::pin(async move {
            if let Op::CreateQueue { settings, .. }
            | Op::CreateSplitQueue { settings, .. }
            | Op::CreateOwnedQueue { settings, .. } = &op
            {
                self.check_replicas(settings.replicas)?;
            }
            let reply = self.execute(Command::Broker(op), 0).await;
            let result = reply.result.map_err(BrokerError::from)?;
            if let Some((group, index)) = reply.applied {
                self.wait_applied(group, index).await;
                if group == META_GROUP {
                    self.spread_metadata(index).await;
                }
            }
            Ok(result)
        })
    }

    /// One lookup of the queue's group and its leader for all of the publishes: on the
    /// leader they queue for the next entry together, on another replica for the next
    /// forward to the leader together (and are then waited for here, as [`Self::submit`]
    /// waits); on a node without a replica, or while the group has no leader, each goes
    /// as [`Self::submit`] sends it. On a queue of several partitions each publish is
    /// split by partition first ([`partitions`]), and each partition's parts go so to
    /// its group.
    fn submit_publishes(
        &self,
        queue: String,
        publishes: Vec<Vec<WireMessage>>,
        now_ms: i64,
    ) -> BoxFuture<'_, Vec<Result<OpResult, BrokerError>>> {
        Box::pin(async move {
            match self.groups.queue_group(&queue) {
                Some(group) if group.partitions > 1 => {
                    self.publish_parts_by_partition(&group, queue, publishes, now_ms)
                        .await
                }
                Some(group) => {
                    self.publish_in_group(group.id, queue, publishes, now_ms)
                        .await
                }
                None => submit_each(self, queue, publishes, now_ms).await,
            }
        })
    }
}

impl Cluster {
    /// [`Replicator::submit_publishes`] to a queue of several partitions: every publish
    /// split by partition, each partition's parts to its group together, and each
    /// publish's answer merged from its parts'.
    async fn publish_parts_by_partition(
        &self,
        group: &groups::QueueGroup,
        queue: String,
        publishes: Vec<Vec<WireMessage>>,
        now_ms: i64,
    ) -> Vec<Result<OpResult, BrokerError>> {
        let lens: Vec<usize> = publishes.iter().map(Vec::len).collect();
        // Per partition: (publish, positions of its messages) and the messages.
        let mut by_partition: BTreeMap<u32, PartitionParts> = BTreeMap::new();
        for (index, messages) in publishes.into_iter().enumerate() {
            for part in partitions::split(&self.broker, &queue, group.partitions, messages) {
                let entry = by_partition.entry(part.partition).or_default();
                entry.0.push((index, part.positions));
                entry.1.push(part.messages);
            }
        }
        let runs = by_partition
            .into_iter()
            .map(|(partition, (owners, parts))| {
                let queue = queue.clone();
                async move {
                    let answers = self
                        .publish_in_group(group.group_of(partition), queue, parts, now_ms)
                        .await;
                    owners.into_iter().zip(answers).collect::<Vec<_>>()
                }
            });
        let mut answers: Vec<Vec<partitions::PartAnswer>> =
            lens.iter().map(|_| Vec::new()).collect();
        for ((index, positions), answer) in futures_util::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
        {
            if let Some(slot) = answers.get_mut(index) {
                slot.push((positions, answer));
            }
        }
        lens.into_iter()
            .zip(answers)
            .map(|(len, parts)| partitions::merge(len, parts))
            .collect()
    }

    /// Publishes to `queue` that all go to `group` (the queue's, or one partition's with
    /// every message naming it), as [`Replicator::submit_publishes`] sends them.
    async fn publish_in_group(
        &self,
        group: u64,
        queue: String,
        publishes: Vec<Vec<WireMessage>>,
        now_ms: i64,
    ) -> Vec<Result<OpResult, BrokerError>> {
        let proposed = match self.publish_route(group).await {
            Some(Some(raft)) => {
                let mut publishes = publishes;
                for messages in &mut publishes {
                    self.broker.take_turns(&queue, messages);
                }
                let sink = || self.leader_sink(&raft, group);
                self.proposals
                    .publish_many(sink, group, queue, publishes, now_ms)
                    .await
            }
            Some(None) => {
                let sink = self.forward_sink(group, 0);
                self.forwards
                    .publish_many(sink, group, queue, publishes, now_ms)
                    .await
            }
            None => return submit_each(self, queue, publishes, now_ms).await,
        };
        let last = proposed
            .iter()
            .filter_map(|p| p.as_ref().ok().and_then(|(_, applied)| *applied))
            .map(|(_, index)| index)
            .max();
        if let Some(index) = last {
            self.wait_applied(group, index).await;
        }
        proposed
            .into_iter()
            .map(|p| p.map(|(result, _)| result))
            .collect()
    }
}

/// Runs lease op `op` on `broker` and, when it is a receive that leased something, awaits
/// `confirm` (the leader's second confirmation, see [`Cluster::run_leases`]) before the
/// answer. Dropped while it waits (its caller went away), the receive gives its leases
/// back at once ([`Unanswered`]); a failed confirmation leaves them to lapse, since this
/// node may no longer lead the group.
async fn lease_then_confirm<F, Fut>(
    broker: &Arc<Broker>,
    op: Op,
    confirm: F,
) -> Result<OpResult, BrokerError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), BrokerError>>,
{
    let receiver = match &op {
        Op::Receive { queue, group, .. } => Some((queue.clone(), group.clone())),
        _ => None,
    };
    let result = broker.apply_op(op).await?;
    let Some((queue, group)) = receiver else {
        return Ok(result);
    };
    let ids: Vec<MessageId> = match &result {
        OpResult::Delivered(list) => list.iter().map(WireDelivery::id).collect(),
        _ => Vec::new(),
    };
    if ids.is_empty() {
        return Ok(result);
    }
    let unanswered = Unanswered::new(broker, &queue, &group, ids);
    let confirmed = confirm().await;
    unanswered.answered();
    confirmed.map(|()| result)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use futures_util::FutureExt;

    use super::{
        Broker, Command, Duration, Op, OpResult, advertised_kafka, deposed_after, lease_error,
        lease_then_confirm, no_leader, shorten_wait,
    };

    /// A forward's target counts as deposed only by a leader other than it that the watch
    /// names after the forward started: not by what it named before (a node deposed a
    /// moment ago may still see itself there, which dropped a forward its successor had
    /// stored, and the publish was stored twice), not by the target itself or by no
    /// leader; never once the group stopped.
    #[test]
    fn a_forward_is_deposed_only_by_a_later_other_leader() {
        let (leaders, mut watch) = tokio::sync::watch::channel(Some(1));
        let mut deposed = Box::pin(deposed_after(&mut watch, 2));
        assert!(
            (&mut deposed).now_or_never().is_none(),
            "node 1 named before"
        );
        for seen in [Some(2), None, Some(2)] {
            leaders.send(seen).unwrap();
            assert!((&mut deposed).now_or_never().is_none(), "{seen:?}");
        }
        leaders.send(Some(3)).unwrap();
        assert!((&mut deposed).now_or_never().is_some(), "node 3 leads now");

        let (leaders, mut watch) = tokio::sync::watch::channel(Some(2));
        let mut deposed = Box::pin(deposed_after(&mut watch, 2));
        assert!((&mut deposed).now_or_never().is_none());
        drop(leaders);
        assert!((&mut deposed).now_or_never().is_none(), "the group stopped");
    }

    /// Clearing a node's rebuilt broker data removes the broker's own names (and the
    /// `state/` of an older release) and nothing else of the directory: not `raft/`, not
    /// a file of the operator's that happens to lie there.
    #[test]
    fn clearing_the_rebuilt_state_leaves_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["queues/q/0", "auth", "state/queues", "raft/0"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        for file in [
            "registry.journal",
            "registry.json",
            "queues/q/0/x.log",
            "raft/0/vote",
        ] {
            std::fs::write(root.join(file), b"x").unwrap();
        }
        std::fs::write(root.join("notes.txt"), b"mine").unwrap();
        super::clear_rebuilt_state(root).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["notes.txt", "raft"]);
        assert!(root.join("raft/0/vote").exists());
        // Nothing to clear is no error.
        super::clear_rebuilt_state(root).unwrap();
    }

    /// A lost quorum is told in words, never as openraft's debug print of the membership.
    #[test]
    fn a_lost_quorum_names_the_nodes_that_answered() {
        use openraft::error::{LinearizableReadError, QuorumNotEnough, RaftError};
        let lost = |got: &[u64]| {
            lease_error(&RaftError::APIError(
                LinearizableReadError::QuorumNotEnough(QuorumNotEnough {
                    cluster: "{voters:[{1:BasicNode { addr: \"a\" }}]}".into(),
                    got: got.iter().copied().collect(),
                }),
            ))
        };
        assert_eq!(
            lost(&[3]),
            "too few voters answered for a quorum (only node 3)"
        );
        assert_eq!(
            lost(&[1, 3]),
            "too few voters answered for a quorum (only nodes 1, 3)"
        );
    }

    #[test]
    fn a_wildcard_kafka_listener_is_announced_at_a_reachable_host() {
        let addr = |s: &str| s.parse().unwrap();
        // A specific listener is announced as it is.
        assert_eq!(
            advertised_kafka(addr("10.0.0.2:9092"), addr("0.0.0.0:7101"), None),
            "10.0.0.2:9092"
        );
        // A wildcard takes the cluster listener's IP...
        assert_eq!(
            advertised_kafka(addr("0.0.0.0:9092"), addr("10.0.0.2:7101"), Some("x:1")),
            "10.0.0.2:9092"
        );
        // ...or, that being a wildcard too, the host --peers lists for this node.
        assert_eq!(
            advertised_kafka(
                addr("0.0.0.0:9092"),
                addr("0.0.0.0:7101"),
                Some("node2.lan:7101")
            ),
            "node2.lan:9092"
        );
        assert_eq!(
            advertised_kafka(addr("[::]:9092"), addr("[::]:7101"), Some("[fd00::2]:7101")),
            "[fd00::2]:9092"
        );
        // Nothing better known: the listener's own address.
        assert_eq!(
            advertised_kafka(
                addr("0.0.0.0:9092"),
                addr("0.0.0.0:7101"),
                Some("0.0.0.0:7101")
            ),
            "0.0.0.0:9092"
        );
        assert_eq!(
            advertised_kafka(addr("0.0.0.0:9092"), addr("0.0.0.0:7101"), None),
            "0.0.0.0:9092"
        );
    }

    /// A broker with queue `q` holding `n` messages, and a receive op of group `g`.
    async fn leasing(dir: &Path, n: usize) -> (Arc<Broker>, Op) {
        let broker = crate::broker::testing::broker_with_queue(dir, "q", n).await;
        let receive = Op::Receive {
            queue: "q".into(),
            group: "g".into(),
            max: 10,
            wait_ms: 0,
            visibility_ms: Some(600_000),
        };
        (broker, receive)
    }

    async fn receivable(broker: &Broker) -> usize {
        broker
            .receive("q", "g", 10, Duration::ZERO, None)
            .await
            .unwrap()
            .len()
    }

    /// A receive dropped while the leader confirms its leadership after leasing (its
    /// consumer's stream ended, or the follower that forwarded it gave up) gives its
    /// leases back at once; they used to wait out their lease (here 10 minutes).
    #[tokio::test]
    async fn a_receive_dropped_before_its_answer_gives_its_leases_back() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, receive) = leasing(dir.path(), 3).await;
        let never_confirmed = lease_then_confirm(&broker, receive, std::future::pending);
        assert!(never_confirmed.now_or_never().is_none(), "still confirming");
        assert_eq!(receivable(&broker).await, 3, "the leases came back");
    }

    /// A confirmed receive keeps its leases, and so does one whose confirmation failed
    /// (this node may no longer lead: its leases lapse).
    #[tokio::test]
    async fn an_answered_or_unconfirmed_receive_keeps_its_leases() {
        for confirmed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (broker, receive) = leasing(dir.path(), 3).await;
            let result = lease_then_confirm(&broker, receive, || async move {
                if confirmed {
                    Ok(())
                } else {
                    Err(no_leader("deposed"))
                }
            })
            .await;
            match result {
                Ok(OpResult::Delivered(list)) => assert!(confirmed && list.len() == 3),
                Err(error) => assert!(!confirmed, "{error}"),
                other => panic!("{other:?}"),
            }
            assert_eq!(receivable(&broker).await, 0, "confirmed: {confirmed}");
        }
    }

    #[test]
    fn a_followed_long_poll_waits_only_what_is_left() {
        let receive = |wait_ms| {
            Command::Broker(Op::Receive {
                queue: "q".into(),
                group: "g".into(),
                max: 1,
                wait_ms,
                visibility_ms: None,
            })
        };
        let mut command = receive(10_000);
        shorten_wait(&mut command, Duration::from_millis(2_500));
        shorten_wait(&mut command, Duration::from_millis(1_500));
        assert_eq!(command, receive(6_000));
        shorten_wait(&mut command, Duration::from_secs(60));
        assert_eq!(command, receive(0), "never below nothing");
        let mut other = Command::Broker(Op::DeleteQueue { name: "q".into() });
        shorten_wait(&mut other, Duration::from_secs(1));
        assert_eq!(other, Command::Broker(Op::DeleteQueue { name: "q".into() }));
    }
}
