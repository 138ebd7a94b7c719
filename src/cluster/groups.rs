//! The Raft groups this node takes part in: the metadata group (id 0, every voter) and one
//! group per queue on its replicas, opened when the metadata group applies the queue's
//! creation and closed when it applies its deletion. A queue's group id is derived from the
//! metadata log index that created it (`2 × index`, `2 × index + 1` for the dead-letter
//! queue made with it), so every node names it alike and a re-created queue never meets
//! the old group's messages.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::async_runtime::watch::WatchReceiver;
use openraft::{BasicNode, Config, SnapshotPolicy};
use parking_lot::RwLock;
use tokio::sync::watch;

use super::ClusterError;
use super::catch_up::{self, Found};
use super::fencing::Fenced;
use super::group_log::{self, GroupLog};
use super::kafka_addrs::KafkaAddrs;
use super::log_budget::{self, Budget};
use super::log_store::LogStore;
use super::metadata::{MetaHooks, QueueOpening};
use super::network::{Network, Peers};
use super::partition_log_store::PartitionLogStore;
use super::placement;
use super::snapshot_transfer::Receiver;
use super::state_machine::{AppliedIndex, Raft, Role, StateMachine};
use super::types::{Fencing, KafkaAddr, LogId, Membership, NodeAddrs, Placed};
use crate::broker::Broker;
use crate::broker::queue::DataPart;

/// The metadata group's id.
pub const META_GROUP: u64 = 0;
/// Replicas of a queue whose `replicas` setting is unset (at most the number of voters).
pub const REPLICAS: usize = 3;
/// Deadline of openraft's own RPCs (append entries, and the quorum round of a linearizable
/// read); openraft takes it from `heartbeat_interval`, which sends nothing by itself here.
const RPC_TIMEOUT_MS: u64 = 200;

/// What requests of one group wait on.
struct GroupWatch {
    applied: Arc<AppliedIndex>,
    leader: watch::Receiver<Option<u64>>,
    /// Leader changes seen here (see [`leader_watch`]).
    leader_changes: Arc<AtomicU64>,
}

/// A receiver of `raft`'s leader that wakes only when the leader changes (openraft's
/// metrics change at every append, commit and apply: a request waiting on them wakes for
/// each). Fed by a task that ends with the group and watches openraft's server metrics
/// (vote, state, leader, membership), which change only with those: watching all of its
/// metrics woke the task, often on another thread, several times per replicated request.
///
/// The task also counts the group's leader changes (a leader other than the last one
/// known here; the first leader is none), for `/metrics`.
fn leader_watch(raft: &Raft) -> (watch::Receiver<Option<u64>>, Arc<AtomicU64>) {
    let mut metrics = raft.server_metrics();
    let first = metrics.borrow_watched().current_leader;
    let (tx, rx) = watch::channel(first);
    let changes = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&changes);
    tokio::spawn(async move {
        let mut last_known = first;
        loop {
            let leader = metrics.borrow_and_update().current_leader;
            tx.send_if_modified(|known| {
                let changed = *known != leader;
                *known = leader;
                changed
            });
            if leader.is_some() {
                if last_known.is_some() && last_known != leader {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                last_known = leader;
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    (rx, changes)
}

/// Takes group `id` out of `lost` once it has caught up ([`catch_up::caught_up`]), then
/// removes its catching-up marker, and with the metadata group's the node's
/// [`catch_up::REJOINING`] marker (every queue group it replicated is open and marked by
/// then).
fn watch_catch_up(id: u64, raft: &Raft, lost: Lost, raft_dir: PathBuf) {
    let mut metrics = raft.metrics();
    tokio::spawn(async move {
        loop {
            let caught_up = catch_up::caught_up(&metrics.borrow_watched());
            if caught_up {
                // Out of `lost` first: once the markers are gone, the group votes (a
                // crash in between only has it catch up again at the next start).
                lost.write().remove(&id);
                let mut done = vec![catch_up::marker(&raft_dir, id)];
                if id == META_GROUP {
                    done.push(raft_dir.join(catch_up::REJOINING));
                }
                for marker in done {
                    if let Err(error) = catch_up::unmark(&marker) {
                        // Left in place: the group catches up again at the next start.
                        tracing::warn!(group = id, path = %marker.display(), %error, "cannot remove a catching-up marker");
                    }
                }
                tracing::info!(
                    group = id,
                    "the group's lost log is caught up: it votes again"
                );
                return;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The groups that lost their log here, each with its term floor once learned.
type Lost = Arc<RwLock<BTreeMap<u64, Option<u64>>>>;

/// Learns group `id`'s term floor from its other replicas (`seed` while none answered)
/// and records it in `lost`, unless the group stopped waiting meanwhile; then asks them for
/// heartbeats until the group has caught up ([`catch_up::nudge`]).
fn learn_floor(id: u64, me: u64, seed: Vec<u64>, peers: Arc<Peers>, lost: Lost) {
    tokio::spawn(async move {
        let waiting = || lost.read().get(&id).is_some_and(Option::is_none);
        let Some((floor, others)) = catch_up::learn_floor(&peers, me, id, &seed, waiting).await
        else {
            return;
        };
        if let Some(entry) = lost.write().get_mut(&id) {
            *entry = Some(floor);
            tracing::info!(
                group = id,
                floor,
                "every other replica told the group's term: this node takes the log from a leader of that term or later"
            );
        }
        // Until caught up, the group's leader is asked for a heartbeat now and then: it
        // is what makes a leader with nothing to send find the blank log.
        while lost.read().contains_key(&id) {
            catch_up::nudge(&peers, id, &others).await;
            tokio::time::sleep(catch_up::NUDGE_EVERY).await;
        }
    });
}

pub use super::group_id::{created_at, is_split, partition_group, queue_group_id, split_group};

/// A queue's groups as this node knows them: the queue group, which holds partition 0 and
/// the state of every consumer group (acks, delivery counts, seeks: the leases run on its
/// leader, as a Kafka group coordinator's do), and one group per further partition, which
/// holds only that partition's messages. They share the replicas; each partition's
/// preferred leader is the next replica in turn, so the leaders of a queue's partitions
/// spread over the nodes and so do their publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueGroup {
    /// Group id.
    pub id: u64,
    /// Replicas, preferred leader first.
    pub replicas: Vec<u64>,
    /// The queue's partitions (one group each, partition 0's being the queue group).
    pub partitions: u32,
}

/// The queue groups a node knows, by queue name, with an index by group id (requests
/// name a group by id; a scan over every queue per request grew with the queues).
#[derive(Debug, Default)]
struct QueueGroups {
    by_name: BTreeMap<String, QueueGroup>,
    /// Each queue group's id to its queue's name.
    names: HashMap<u64, String>,
}

impl QueueGroups {
    /// Records `group` as `name`'s (replacing the group of a queue made again).
    fn insert(&mut self, name: &str, group: QueueGroup) {
        let id = group.id;
        if let Some(old) = self.by_name.insert(name.to_string(), group) {
            self.names.remove(&old.id);
        }
        self.names.insert(id, name.to_string());
    }

    /// Forgets `name`'s group, and returns it.
    fn remove(&mut self, name: &str) -> Option<QueueGroup> {
        let group = self.by_name.remove(name)?;
        self.names.remove(&group.id);
        Some(group)
    }

    /// Sets the replicas of `queue`'s group when that group is `id`; returns it changed.
    fn set_replicas(&mut self, queue: &str, id: u64, replicas: &[u64]) -> Option<QueueGroup> {
        let group = self.by_name.get_mut(queue).filter(|g| g.id == id)?;
        group.replicas = replicas.to_vec();
        Some(group.clone())
    }

    /// The queue group whose id is `id`.
    fn by_id(&self, id: u64) -> Option<&QueueGroup> {
        self.names.get(&id).and_then(|name| self.by_name.get(name))
    }
}

/// Reads go to the map by name; changes go through the methods above, which keep the
/// index by id.
impl std::ops::Deref for QueueGroups {
    type Target = BTreeMap<String, QueueGroup>;

    fn deref(&self) -> &Self::Target {
        &self.by_name
    }
}

/// The kind of queue group `id` holds, as preferred leaders are spread: 0 for a queue, 1
/// for a dead-letter queue made with its queue (odd ids). Each kind spreads on its own, so
/// that the queues themselves do.
pub fn group_kind(id: u64) -> usize {
    usize::from(id % 2 == 1)
}

impl QueueGroup {
    /// The kind of queue the group holds ([`group_kind`]).
    pub fn kind(&self) -> usize {
        group_kind(self.id)
    }

    /// The group holding `partition` ([`partition_group`]).
    pub fn group_of(&self, partition: u32) -> u64 {
        partition_group(self.id, partition)
    }

    /// The replicas of `partition`'s group, preferred leader first: the queue's replicas
    /// turned by the partition number.
    pub fn replicas_of(&self, partition: u32) -> Vec<u64> {
        let mut replicas = self.replicas.clone();
        if !replicas.is_empty() {
            let turn = partition as usize % replicas.len();
            replicas.rotate_left(turn);
        }
        replicas
    }

    /// Every group of the queue: `(partition, group id)`, the queue group first.
    pub fn members(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        (0..self.partitions.max(1)).map(|p| (p, self.group_of(p)))
    }

    /// The partition group `id` holds, if it is one of this queue's groups.
    pub fn partition_of(&self, id: u64) -> Option<u32> {
        let (queue_group, partition) = split_group(id);
        (queue_group == self.id && partition < self.partitions.max(1)).then_some(partition)
    }
}

/// How many of `groups` of `kind` ([`QueueGroup::kind`]) prefer each node as leader
/// (their first replica): node id -> groups.
pub fn preferences<'a>(
    groups: impl IntoIterator<Item = &'a QueueGroup>,
    kind: usize,
) -> BTreeMap<u64, usize> {
    let mut led = BTreeMap::new();
    for group in groups.into_iter().filter(|g| g.kind() == kind) {
        if let Some(first) = group.replicas.first() {
            *led.entry(*first).or_default() += 1;
        }
    }
    led
}

/// The groups of this node.
pub struct Groups {
    /// This node.
    pub node_id: u64,
    /// Every voter's id and cluster address: `--peers` at first, then the metadata group's
    /// membership as of the entry applied last (so that every node places a queue alike).
    voters: RwLock<BTreeMap<u64, String>>,
    raft_dir: PathBuf,
    sync: bool,
    /// A queue group snapshots after this many entries (see [`storage_policy`]).
    snapshot_entries: u64,
    /// A queue group snapshots and purges once its log's files pass this budget.
    log_budget: Option<Budget>,
    /// The other nodes.
    pub peers: Arc<Peers>,
    broker: Arc<Broker>,
    rafts: RwLock<HashMap<u64, Raft>>,
    /// Each open group's log (its tip is read by [`super::liveness`]).
    logs: RwLock<HashMap<u64, GroupLog>>,
    /// Each open group's applied index and its leader, for requests that wait on them.
    watches: RwLock<HashMap<u64, GroupWatch>>,
    queues: RwLock<QueueGroups>,
    nodes: RwLock<BTreeMap<u64, NodeAddrs>>,
    /// Every node's Kafka listener.
    pub kafka: KafkaAddrs,
    /// The nodes the metadata leader fenced.
    pub fenced: Fenced,
    /// Voters leaving the cluster (placement leaves them out).
    draining: RwLock<BTreeSet<u64>>,
    /// Snapshots being received from the groups' leaders.
    snapshot_receiver: Receiver,
    /// Groups whose log this node lost while it was a replica (see [`Self::open_group`]),
    /// with their term floor once learned ([`catch_up`]): they take no entry before it is
    /// known, then only from leaders of that term or later, and neither vote nor stand for
    /// election until they have caught up.
    lost: Lost,
    /// Bumped after every change of the open groups, their logs or their replicas.
    generation: AtomicU64,
    /// [`Self::open_groups`] as of a generation.
    open: RwLock<Option<(u64, Arc<Vec<OpenGroup>>)>>,
}

/// An open group as the liveness loop reads it at every beat ([`Groups::open_groups`]).
#[derive(Clone)]
pub struct OpenGroup {
    /// Group id.
    pub id: u64,
    /// Its handle.
    pub raft: Raft,
    /// Its log.
    pub log: Option<GroupLog>,
    /// A queue's group's replicas, preferred leader first (`None` for the metadata group).
    pub replicas: Option<Vec<u64>>,
}

/// The role of the group of `partition` of queue `name`, whose queue group is `id`
/// ([`QueueGroup`]).
fn queue_role(name: &str, id: u64, partition: u32) -> Role {
    match partition {
        0 if is_split(id) => Role::Queue(name.to_string(), DataPart::Head),
        0 => Role::Queue(name.to_string(), DataPart::All),
        p => Role::Partition(name.to_string(), p),
    }
}

/// Group `id`'s state machine for `role`: a queue's restores the queue from the group's
/// latest snapshot, the metadata group's installs its own.
async fn open_machine(
    id: u64,
    role: Role,
    broker: &Arc<Broker>,
    dir: &Path,
    log: &GroupLog,
) -> Result<StateMachine, ClusterError> {
    let partition_log = match log {
        GroupLog::Partition(store) => Some(store.clone()),
        GroupLog::Chunks(_) => None,
    };
    match role {
        role @ (Role::Queue(..) | Role::Partition(..)) => StateMachine::for_queue(
            role,
            Arc::clone(broker),
            &dir.join("snapshot"),
            partition_log,
        )
        .await
        .map_err(|e| ClusterError::Raft(format!("group {id}: {e}"))),
        Role::Meta(hooks) => StateMachine::for_meta(hooks, Arc::clone(broker), dir)
            .await
            .map_err(|e| ClusterError::Raft(format!("metadata snapshot: {e}"))),
        role => Ok(StateMachine::new(role, Some(Arc::clone(broker)))),
    }
}

/// openraft settings of a group. Its heartbeats, election timer and tick are off: one loop
/// per node does their work for every group at once ([`super::liveness`]), and openraft
/// still sends every new entry and commit at once. What is left of its timers:
/// `heartbeat_interval` is the deadline of its RPCs (of each request on an append stream,
/// see [`super::network`]); `election_timeout_max` is the leader lease, during which a
/// follower refuses to vote after hearing from its leader (kept below the liveness waits,
/// so a follower that saw a leader die can be elected at once) and after which a leader
/// that heard no quorum takes no write until it renews it (see `ensure_lease`).
/// Snapshots and purging: [`storage_policy`].
fn raft_config(group: u64) -> Result<Config, ClusterError> {
    Config {
        cluster_name: format!("qit-{group}"),
        heartbeat_interval: RPC_TIMEOUT_MS,
        election_timeout_min: RPC_TIMEOUT_MS + 20,
        election_timeout_max: LEADER_LEASE.as_millis() as u64,
        enable_tick: false,
        enable_heartbeat: false,
        enable_elect: false,
        snapshot_policy: SnapshotPolicy::Never,
        max_payload_entries: MAX_APPEND_ENTRIES,
        // A node whose data was lost rejoins: the leader sends it the log again instead
        // of stopping replication to it (openraft 0.9's `loosen-follower-log-revert`).
        allow_log_reversion: Some(true),
        ..Config::default()
    }
    .validate()
    .map_err(|e| ClusterError::Config(e.to_string()))
}

/// How long a leader's writes are taken after a quorum last answered it (openraft's
/// leader lease, its `election_timeout_max`).
pub(super) const LEADER_LEASE: std::time::Duration =
    std::time::Duration::from_millis(RPC_TIMEOUT_MS + 50);

/// Most entries in one AppendEntries (openraft's default is 300). Every request must be
/// answered within [`RPC_TIMEOUT_MS`] of going out (pipelined on a stream or not): a replica catching up (a new one, or one back from a long
/// absence) is sent the log in calls of this many entries, and 300 entries of large
/// messages (300 x 512 KiB) never arrived in time, so a new node never caught up. A
/// follower that keeps up gets a few entries per call (a queue has at most four publish
/// entries on the way), so this bounds only catch-up.
const MAX_APPEND_ENTRIES: u64 = 16;
/// How long a leader waits for a follower to take one chunk of a snapshot (ms).
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 30_000;
/// Raft log entries kept below a queue group's snapshot, at most (a follower that lags by
/// less catches up from the log; one further behind is sent the snapshot).
const KEEP_BELOW_SNAPSHOT: u64 = log_budget::KEEP_ENTRIES;

/// How a node's groups store their logs.
#[derive(Debug, Clone, Copy)]
pub struct Storage {
    /// Sync appends before they count (`--fsync always`).
    pub sync: bool,
    /// A queue group snapshots after this many entries (0: never; `raft_snapshot_entries`).
    pub snapshot_entries: u64,
    /// A queue group snapshots and purges once its log's files hold more than this many
    /// bytes (0: no such bound; `raft_log_bytes`, see [`log_budget`]).
    pub log_bytes: u64,
}

/// How a group's log stays bounded: a snapshot every `entries` applied entries (a queue
/// group's carries the queue's data, the metadata group's the metadata, see
/// [`super::metadata`]), then the log below it is purged, keeping up to
/// [`KEEP_BELOW_SNAPSHOT`] (or `entries`, when smaller) for followers a little behind.
/// `entries == 0` keeps every log whole. Returns the config and the chunk size of the
/// group's log.
fn storage_policy(mut config: Config, entries: u64) -> (Config, usize) {
    if entries == 0 {
        return (config, super::log_store::DEFAULT_CHUNK_ENTRIES);
    }
    config.snapshot_policy = SnapshotPolicy::LogsSinceLast(entries);
    config.max_in_snapshot_log_to_keep = KEEP_BELOW_SNAPSHOT.min(entries);
    // A chunk of a snapshot (3 MiB) and, for the last one, the follower's unpacking and
    // swap-in must fit (openraft's default is 200 ms).
    config.install_snapshot_timeout = INSTALL_SNAPSHOT_TIMEOUT_MS;
    // A purge frees whole chunks: a quarter of the snapshot interval each.
    let chunk = usize::try_from(entries / 4)
        .unwrap_or(usize::MAX)
        .clamp(16, super::log_store::DEFAULT_CHUNK_ENTRIES);
    (config, chunk)
}

/// Entries replayed by queue groups at start, over all of them (counter): with snapshots,
/// at most about `raft_snapshot_entries` per group, never the whole history.
pub const START_REPLAYED: &str = "qit_cluster_start_replayed_entries_total";

impl Groups {
    /// Groups of `node_id`, logs under `raft_dir`.
    pub fn new(
        node_id: u64,
        voters: BTreeMap<u64, String>,
        raft_dir: PathBuf,
        storage: Storage,
        peers: Arc<Peers>,
        broker: Arc<Broker>,
    ) -> Self {
        Self {
            node_id,
            voters: RwLock::new(voters),
            snapshot_receiver: Receiver::new(raft_dir.clone()),
            raft_dir,
            sync: storage.sync,
            snapshot_entries: storage.snapshot_entries,
            log_budget: (storage.log_bytes > 0).then_some(Budget {
                bytes: storage.log_bytes,
            }),
            peers,
            broker,
            rafts: RwLock::new(HashMap::new()),
            logs: RwLock::new(HashMap::new()),
            watches: RwLock::new(HashMap::new()),
            queues: RwLock::default(),
            lost: Arc::default(),
            generation: AtomicU64::new(0),
            open: RwLock::new(None),
            nodes: RwLock::new(BTreeMap::new()),
            kafka: KafkaAddrs::default(),
            fenced: Fenced::default(),
            draining: RwLock::new(BTreeSet::new()),
        }
    }

    /// The receiving side of snapshot transfers into this node's groups.
    pub fn snapshot_receiver(&self) -> &Receiver {
        &self.snapshot_receiver
    }

    /// Every voter's id and cluster address.
    pub fn voters(&self) -> BTreeMap<u64, String> {
        self.voters.read().clone()
    }

    /// Every voter's id.
    pub fn voter_ids(&self) -> Vec<u64> {
        self.voters.read().keys().copied().collect()
    }

    /// Opens group `id` and registers it for incoming RPCs. A new group's replicas pass its
    /// initial `members` (preferred leader first): each writes them as the first entry of
    /// its empty log ([`LogStore::seed`]), and the preferred leader stands for election at
    /// once. `members` is empty where this node joins a group that exists elsewhere (its
    /// leader adds it and sends it the log or a snapshot).
    ///
    /// A group whose log this node lost (its directory, or the node's whole data: see
    /// [`catch_up`]) opens as a follower that does not vote or stand for election
    /// ([`Self::has_lost`]) until it has caught up, so that it cannot help elect a replica
    /// that lacks committed entries. Until then the group needs its other replicas for a
    /// quorum.
    pub async fn open_group(
        &self,
        id: u64,
        members: &[u64],
        role: Role,
    ) -> Result<Raft, ClusterError> {
        let preferred = members.first() == Some(&self.node_id);
        let (config, chunk_entries) = storage_policy(raft_config(id)?, self.snapshot_entries);
        let dir = self.raft_dir.join(id.to_string());
        let (log, found) = self.open_log(id, &dir, chunk_entries, &role).await?;
        // A queue's replicas as placement names them (the metadata group's: the voters).
        let replicas = match &role {
            Role::Queue(name, _) => self.queue_group(name).map(|g| g.replicas),
            Role::Partition(name, p) => self.queue_group(name).map(|g| g.replicas_of(*p)),
            _ => None,
        };
        let (lost, members) = self.seed_members(id, &dir, found, replicas.as_deref(), members);
        // A lost queue group learns its term floor from its replicas, the metadata group
        // from every voter (`None`).
        let queue_data = role.data().map(|(name, part)| (name.to_string(), part));
        let floor_from = queue_data.is_some().then(|| replicas.unwrap_or_default());
        self.mark_lost(id, lost, floor_from)?;
        let machine = open_machine(id, role, &self.broker, &dir, &log).await?;
        let seeded = self.seed(id, &log, &members).await?;
        let replayed = machine.applied_counter();
        let applied = machine.applied_index();
        self.logs.write().insert(id, log.clone());
        self.changed();
        let log_handle = log.clone();
        let network = Network {
            group: id,
            peers: Arc::clone(&self.peers),
        };
        let config = Arc::new(config);
        let raft = match log {
            GroupLog::Chunks(log) => Raft::new(self.node_id, config, network, log, machine).await,
            GroupLog::Partition(log) => {
                Raft::new(self.node_id, config, network, log, machine).await
            }
        }
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        if id != META_GROUP {
            let replayed = replayed.load(std::sync::atomic::Ordering::Relaxed);
            metrics::counter!(START_REPLAYED).increment(replayed);
            tracing::debug!(group = id, replayed, "queue group started");
        }
        if lost {
            watch_catch_up(id, &raft, Arc::clone(&self.lost), self.raft_dir.clone());
        }
        if let Some((name, part)) = queue_data {
            log_budget::watch(log_budget::Watched {
                group: id,
                raft: raft.clone(),
                log: log_handle,
                queue: (Arc::clone(&self.broker), name, part),
                budget: self.log_budget,
            });
        }
        self.rafts.write().insert(id, raft.clone());
        self.changed();
        let (leader, leader_changes) = leader_watch(&raft);
        let watch = GroupWatch {
            applied,
            leader,
            leader_changes,
        };
        self.watches.write().insert(id, watch);
        if seeded && preferred {
            // The preferred leader stands first, which spreads leaders as placement says;
            // the others stand later if it does not win (see `super::liveness`).
            if let Err(error) = raft.trigger().elect(false).await {
                tracing::debug!(group = id, %error, "cannot start the first election");
            }
        }
        Ok(raft)
    }

    /// Opens group `id`'s Raft log in `dir` and tells what it found there. A group that was
    /// catching up when the node stopped starts over, blank: what it holds may lack
    /// committed entries, and what it saw of its leaders is gone. A queue group's log is
    /// marked as held here (the metadata group's is always held).
    async fn open_log(
        &self,
        id: u64,
        dir: &Path,
        chunk_entries: usize,
        role: &Role,
    ) -> Result<(GroupLog, Found), ClusterError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ClusterError::Io { path, source }
        };
        let catching_up = catch_up::marker(&self.raft_dir, id).exists();
        if catching_up {
            catch_up::clear(dir).map_err(io(dir))?;
        }
        let log = match role {
            Role::Partition(name, partition)
                if !group_log::holds_chunks(dir).map_err(io(dir))? =>
            {
                GroupLog::Partition(self.open_partition_log(id, dir, name, *partition).await?)
            }
            _ => GroupLog::Chunks(
                LogStore::open_chunked(dir, self.sync, chunk_entries).map_err(io(dir))?,
            ),
        };
        let held = self.held_marker(id);
        let found = Found {
            blank: log.is_blank(),
            held: id != META_GROUP && held.exists(),
            catching_up,
            rejoining: self.raft_dir.join(catch_up::REJOINING).exists(),
        };
        if id != META_GROUP {
            log.mark_held(held.clone()).map_err(io(&held))?;
        }
        Ok((log, found))
    }

    /// Opens partition group `id`'s Raft log in the partition's own segment log: the
    /// broker's partition directory becomes a link to `segments/` in the group's directory
    /// `dir` (opened behind a closed commit gate: nothing of it is read before the log
    /// says what is committed), and the log's side files are kept in `dir`.
    async fn open_partition_log(
        &self,
        id: u64,
        dir: &Path,
        name: &str,
        partition: u32,
    ) -> Result<PartitionLogStore, ClusterError> {
        let segments = dir.join(group_log::SEGMENTS);
        std::fs::create_dir_all(&segments).map_err(|source| ClusterError::Io {
            path: segments.clone(),
            source,
        })?;
        let broker_error = |e: crate::broker::BrokerError| {
            ClusterError::Raft(format!("group {id}: opening partition {partition}: {e}"))
        };
        let log = self
            .broker
            .partition_log(name, partition)
            .map_err(broker_error)?;
        log.set_commit_gate(Some(0));
        group_log::relink_partition(&self.broker, name, partition, segments, |_| Ok(()))
            .await
            .map_err(broker_error)?;
        PartitionLogStore::open(log, dir, name, partition).map_err(|source| ClusterError::Io {
            path: dir.to_path_buf(),
            source,
        })
    }

    /// Whether group `id` lost its log here ([`catch_up::has_lost`]), and the members a
    /// blank log is seeded with: `members` as given when it did not; none when it did (it
    /// joins as a follower and catches up from the others); this node alone when it did
    /// but no other replica holds the group (waiting would keep the queue down for good).
    fn seed_members(
        &self,
        id: u64,
        dir: &Path,
        found: Found,
        replicas: Option<&[u64]>,
        members: &[u64],
    ) -> (bool, Vec<u64>) {
        if !catch_up::has_lost(found) {
            return (false, members.to_vec());
        }
        if replicas == Some(&[self.node_id][..]) {
            tracing::error!(
                group = id,
                path = %dir.display(),
                "this node lost the only copy of the group's log: the queue starts empty"
            );
            return (false, vec![self.node_id]);
        }
        tracing::warn!(
            group = id,
            path = %dir.display(),
            "this node lost its copy of the group's log: it rejoins as a follower \
             and does not vote until it has caught up"
        );
        (true, Vec::new())
    }

    /// Writes or removes group `id`'s catching-up marker; a group that `lost` its log
    /// enters the lost set and starts learning its term floor from the other replicas of
    /// `floor_from` (`None`: every voter), see [`catch_up`].
    fn mark_lost(
        &self,
        id: u64,
        lost: bool,
        floor_from: Option<Vec<u64>>,
    ) -> Result<(), ClusterError> {
        let marker = catch_up::marker(&self.raft_dir, id);
        let marked = if lost {
            catch_up::mark(&marker)
        } else {
            catch_up::unmark(&marker)
        };
        marked.map_err(|source| ClusterError::Io {
            path: marker,
            source,
        })?;
        if lost {
            let seed = floor_from.unwrap_or_else(|| self.voter_ids());
            self.lost.write().insert(id, None);
            learn_floor(
                id,
                self.node_id,
                seed,
                Arc::clone(&self.peers),
                Arc::clone(&self.lost),
            );
        }
        Ok(())
    }

    /// Writes the initial membership of a new group on `members` (see [`LogStore::seed`])
    /// into `log`, if it is empty; returns whether it did.
    async fn seed(&self, id: u64, log: &GroupLog, members: &[u64]) -> Result<bool, ClusterError> {
        let Some(&preferred) = members.first() else {
            return Ok(false);
        };
        let nodes: BTreeMap<u64, BasicNode> = {
            let voters = self.voters.read();
            members
                .iter()
                .filter_map(|m| voters.get(m).map(|addr| (*m, BasicNode::new(addr))))
                .collect()
        };
        if !nodes.contains_key(&self.node_id) {
            return Ok(false);
        }
        log.seed(preferred, Membership::from(nodes))
            .await
            .map_err(|source| ClusterError::Io {
                path: self.raft_dir.join(id.to_string()),
                source,
            })
    }

    /// The voters that placement may choose: every voter but those leaving.
    pub fn eligible(&self) -> Vec<u64> {
        let draining = self.draining.read();
        self.voter_ids()
            .into_iter()
            .filter(|v| !draining.contains(v))
            .collect()
    }

    /// Nodes leaving the cluster (groups move off them).
    pub fn draining(&self) -> BTreeSet<u64> {
        self.draining.read().clone()
    }

    /// True while group `id` rejoins after this node lost its log (see
    /// [`Self::open_group`]): it must not vote or stand for election.
    pub fn has_lost(&self, id: u64) -> bool {
        self.lost.read().contains_key(&id)
    }

    /// True when group `id` here may take entries or a snapshot from a leader of `term`:
    /// always, unless it lost its log, then only from its term floor on, once learned
    /// ([`catch_up`]).
    pub fn admits_leader(&self, id: u64, term: u64) -> bool {
        match self.lost.read().get(&id) {
            None => true,
            Some(floor) => floor.is_some_and(|floor| term >= floor),
        }
    }

    /// Group `id`'s term and voters here, for a replica that lost its log (none where the
    /// group is not open, or lost its log here too: its terms are not to be trusted).
    pub fn group_term(&self, id: u64) -> Option<catch_up::GroupTerm> {
        if self.has_lost(id) {
            return None;
        }
        let raft = self.raft(id)?;
        let metrics = raft.metrics();
        let metrics = metrics.borrow_watched();
        Some(catch_up::GroupTerm {
            term: metrics.vote.leader_id.term,
            voters: metrics.membership_config.membership().voter_ids().collect(),
        })
    }

    /// The marker that this node held group `id`'s log ([`LogStore::mark_held`]); it lies
    /// beside the group's directory, so that losing the directory leaves it.
    fn held_marker(&self, id: u64) -> PathBuf {
        self.raft_dir.join(format!("{id}.held"))
    }

    /// The marker of a group that moved off this node: the group is not opened again when
    /// the metadata log replays its queue's creation.
    fn moved_marker(&self, id: u64) -> PathBuf {
        self.raft_dir.join(format!("{id}.moved"))
    }

    /// Where placement puts `queue` (of group `id`) over the eligible voters: its
    /// `replicas` setting's count of them ([`REPLICAS`] when unset), preferred leader
    /// first. While those are the replicas it has, it keeps their order (its preferred
    /// leader); otherwise the one preferred for the fewest other groups of its kind
    /// ([`group_kind`]) leads ([`placement::lead_balanced`]).
    ///
    /// A group not opened yet (its queue's creation) avoids the nodes the metadata records
    /// as fenced ([`placement::replicas_avoiding`]); an open one is placed over all the
    /// eligible voters, and moves there once those nodes are back (see `moves.rs`).
    ///
    /// Called while applying the metadata entry that creates or moves the group, it reads
    /// only what the metadata log decided (the fenced nodes too), and every node places
    /// alike.
    fn place(&self, queue: &str, id: u64) -> Vec<u64> {
        let count = self
            .broker
            .queue_settings(queue)
            .ok()
            .and_then(|s| s.replicas)
            .map_or(REPLICAS, |r| usize::try_from(r).unwrap_or(REPLICAS));
        let queues = self.queues.read();
        // A new group goes to live nodes first; the fenced ones only make up the count,
        // after the others (never its preferred leader while another replica is up).
        let (hashed, filled) = match queues.get(queue).filter(|g| g.id == id) {
            Some(current) => {
                let hashed = placement::replicas(queue, &self.eligible(), count);
                let mut have = current.replicas.clone();
                let mut want = hashed.clone();
                have.sort_unstable();
                want.sort_unstable();
                if have == want {
                    return current.replicas.clone();
                }
                (hashed, Vec::new())
            }
            None => {
                placement::replicas_avoiding(queue, &self.eligible(), &self.fenced.all(), count)
            }
        };
        let others = queues.iter().filter(|(name, _)| *name != queue);
        let led = preferences(others.map(|(_, group)| group), group_kind(id));
        let mut placed = placement::lead_balanced(hashed, &led);
        placed.extend(filled);
        placed
    }

    /// Where placement puts `queue` now (see [`Self::place`]); empty for a queue without
    /// a group.
    pub fn placed(&self, queue: &str) -> Vec<u64> {
        let id = self.queues.read().get(queue).map(|g| g.id);
        id.map(|id| self.place(queue, id)).unwrap_or_default()
    }

    /// Opens the groups of a queue (when this node is one of its replicas): its queue group
    /// and one group per further partition (see [`QueueGroup`]).
    async fn open_queue_inner(&self, name: &str, id: u64, opening: QueueOpening) {
        let replicas = self.place(name, id);
        let partitions = match is_split(id) {
            true => self
                .broker
                .queue_settings(name)
                .map_or(1, |settings| settings.partitions),
            false => 1,
        };
        let queue = QueueGroup {
            id,
            replicas: replicas.clone(),
            partitions,
        };
        self.queues.write().insert(name, queue.clone());
        self.changed();
        if !replicas.contains(&self.node_id) || self.moved_marker(id).exists() {
            return;
        }
        for (partition, group) in queue.members() {
            let members = match opening {
                QueueOpening::Created => queue.replicas_of(partition),
                QueueOpening::Restored => Vec::new(),
            };
            if let Err(error) = self
                .open_group(group, &members, queue_role(name, id, partition))
                .await
            {
                tracing::error!(queue = name, partition, group, %error, "cannot open the queue's raft group");
            }
        }
    }

    /// Stops and removes the groups of a queue being deleted.
    async fn close_queue_inner(&self, name: &str) {
        let Some(queue) = self.queues.write().remove(name) else {
            return;
        };
        self.changed();
        for (_, group) in queue.members() {
            self.close_group(group).await;
        }
        let _ = std::fs::remove_file(self.moved_marker(queue.id));
    }

    /// Stops group `id` here and removes its log.
    async fn close_group(&self, id: u64) {
        let raft = self.rafts.write().remove(&id);
        self.logs.write().remove(&id);
        self.changed();
        self.drop_watch(id);
        if let Some(raft) = raft
            && let Err(error) = raft.shutdown().await
        {
            tracing::warn!(group = id, %error, "stopping a queue's raft group failed");
        }
        self.remove_group_dir(id);
    }

    /// Forgets what requests of group `id` wait on, the group having stopped here: a
    /// request waiting for it to apply an entry goes on at once.
    fn drop_watch(&self, id: u64) {
        if let Some(watch) = self.watches.write().remove(&id) {
            watch.applied.close();
        }
    }

    fn remove_group_dir(&self, id: u64) {
        self.lost.write().remove(&id);
        if let Err(error) = catch_up::unmark(&catch_up::marker(&self.raft_dir, id)) {
            tracing::warn!(group = id, %error, "removing a group's catching-up marker failed");
        }
        if let Err(error) = std::fs::remove_file(self.held_marker(id))
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(group = id, %error, "removing a group's held marker failed");
        }
        let dir = self.raft_dir.join(id.to_string());
        if let Err(error) = std::fs::remove_dir_all(&dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %dir.display(), %error, "removing a queue's raft log failed");
        }
    }

    /// A queue's group has new replicas: this node opens it (joining: the group's leader
    /// adds it and sends it the log or a snapshot) or closes it and clears the queue's data
    /// here (it moved off this node).
    async fn set_replicas_inner(&self, placed: &Placed) {
        let changed =
            self.queues
                .write()
                .set_replicas(&placed.queue, placed.group, &placed.replicas);
        let Some(queue) = changed else {
            return;
        };
        self.changed();
        let id = placed.group;
        let open = self.raft(id).is_some();
        let member = placed.replicas.contains(&self.node_id);
        if member && !open {
            let _ = std::fs::remove_file(self.moved_marker(id));
            for (partition, group) in queue.members() {
                let role = queue_role(&placed.queue, id, partition);
                if let Err(error) = self.open_group(group, &[], role).await {
                    tracing::error!(queue = %placed.queue, group, %error, "cannot open the queue's raft group");
                } else {
                    tracing::info!(queue = %placed.queue, group, "joining the queue's group");
                }
            }
        } else if !member && open {
            if let Err(error) = std::fs::write(self.moved_marker(id), b"") {
                tracing::warn!(group = id, %error, "cannot mark a moved group");
            }
            for (_, group) in queue.members() {
                self.close_group(group).await;
            }
            if let Err(error) = self
                .broker
                .replace_queue_data(&placed.queue, DataPart::All, |_| Ok(()))
                .await
            {
                tracing::warn!(queue = %placed.queue, %error, "clearing a moved queue's data failed");
            }
            tracing::info!(queue = %placed.queue, group = id, "the queue's group moved off this node");
        }
    }

    /// The open groups, their logs and replicas changed: [`Self::open_groups`] builds its
    /// list again.
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Every open group with its log and replicas, in id order: built once per change
    /// ([`Self::changed`]) rather than looked up group by group at every beat.
    pub fn open_groups(&self) -> Arc<Vec<OpenGroup>> {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((built, groups)) = self.open.read().as_ref()
            && *built == generation
        {
            return Arc::clone(groups);
        }
        let logs = self.logs.read().clone();
        let groups: Vec<OpenGroup> = self
            .rafts()
            .into_iter()
            .map(|(id, raft)| OpenGroup {
                id,
                raft,
                log: logs.get(&id).cloned(),
                replicas: self.group_replicas(id),
            })
            .collect();
        let groups = Arc::new(groups);
        // Kept only if nothing changed meanwhile (else the next call builds it again).
        *self.open.write() = Some((generation, Arc::clone(&groups)));
        groups
    }

    /// A group by id.
    pub fn raft(&self, id: u64) -> Option<Raft> {
        self.rafts.read().get(&id).cloned()
    }

    /// Group `id`'s applied index here, to wait on.
    pub fn applied(&self, id: u64) -> Option<Arc<AppliedIndex>> {
        self.watches.read().get(&id).map(|w| Arc::clone(&w.applied))
    }

    /// Group `id`'s leader as this node knows it, changing only when the leader does.
    pub fn leader_watch(&self, id: u64) -> Option<watch::Receiver<Option<u64>>> {
        self.watches.read().get(&id).map(|w| w.leader.clone())
    }

    /// How often group `id`'s leader changed since the group opened here (`None`: not open).
    pub fn leader_changes(&self, id: u64) -> Option<u64> {
        let watches = self.watches.read();
        watches
            .get(&id)
            .map(|w| w.leader_changes.load(Ordering::Relaxed))
    }

    /// The id of the last entry in group `id`'s log here (`None`: empty, or not open).
    pub fn last_log_id(&self, id: u64) -> Option<LogId> {
        self.logs.read().get(&id).and_then(GroupLog::tip)
    }

    /// Every open group.
    pub fn rafts(&self) -> Vec<(u64, Raft)> {
        let mut all: Vec<(u64, Raft)> = self
            .rafts
            .read()
            .iter()
            .map(|(id, r)| (*id, r.clone()))
            .collect();
        all.sort_by_key(|(id, _)| *id);
        all
    }

    /// A queue's group.
    pub fn queue_group(&self, name: &str) -> Option<QueueGroup> {
        self.queues.read().get(name).cloned()
    }

    /// The replicas of group `id`, a queue group or a partition's, preferred leader first
    /// (`None`: no such group known here).
    pub fn group_replicas(&self, id: u64) -> Option<Vec<u64>> {
        let (queue_group, _) = split_group(id);
        let queues = self.queues.read();
        let queue = queues.by_id(queue_group)?;
        queue.partition_of(id).map(|p| queue.replicas_of(p))
    }

    /// Every queue's group.
    pub fn queue_groups(&self) -> Vec<(String, QueueGroup)> {
        self.queues
            .read()
            .iter()
            .map(|(n, g)| (n.clone(), g.clone()))
            .collect()
    }

    /// A node's addresses, if it announced them.
    pub fn node(&self, id: u64) -> Option<NodeAddrs> {
        self.nodes.read().get(&id).cloned()
    }

    /// Stops every group.
    pub async fn shutdown(&self) {
        let all: Vec<Raft> = self.rafts.write().drain().map(|(_, r)| r).collect();
        self.logs.write().clear();
        self.changed();
        for (_, watch) in self.watches.write().drain() {
            watch.applied.close();
        }
        for raft in all {
            let _ = raft.shutdown().await;
        }
    }
}

impl MetaHooks for Groups {
    fn set_node(&self, addrs: NodeAddrs) {
        self.nodes.write().insert(addrs.id, addrs);
    }

    fn set_members(&self, membership: &Membership) {
        let voters: BTreeMap<u64, String> = membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|n| (id, n.addr.clone())))
            .collect();
        for (id, node) in membership.nodes() {
            self.peers.ensure(*id, &node.addr);
        }
        if voters.is_empty() {
            return;
        }
        self.draining.write().retain(|d| voters.contains_key(d));
        let mut current = self.voters.write();
        if *current != voters {
            tracing::info!(voters = ?voters.keys().collect::<Vec<_>>(), "cluster voters");
            *current = voters;
        }
    }

    /// Boxed: the metadata group's state machine calls it while applying, and opening a
    /// group names the state machine type again (an unboxed future would be a type cycle).
    fn open_queue<'a>(
        &'a self,
        name: &'a str,
        id: u64,
        opening: QueueOpening,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(self.open_queue_inner(name, id, opening))
    }

    fn close_queue<'a>(&'a self, name: &'a str) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(self.close_queue_inner(name))
    }

    fn set_replicas<'a>(&'a self, placed: &'a Placed) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(self.set_replicas_inner(placed))
    }

    fn set_draining(&self, node: u64) {
        if self.voters.read().contains_key(&node) {
            self.draining.write().insert(node);
        }
    }

    fn queue_groups(&self) -> Vec<(String, u64)> {
        self.queues
            .read()
            .iter()
            .map(|(name, group)| (name.clone(), group.id))
            .collect()
    }

    fn nodes(&self) -> Vec<NodeAddrs> {
        self.nodes.read().values().cloned().collect()
    }

    fn queue_replicas(&self) -> Vec<Placed> {
        self.queues
            .read()
            .iter()
            .map(|(name, group)| Placed {
                queue: name.clone(),
                group: group.id,
                replicas: group.replicas.clone(),
            })
            .collect()
    }

    fn draining(&self) -> Vec<u64> {
        self.draining.read().iter().copied().collect()
    }

    fn set_kafka(&self, addr: KafkaAddr) {
        self.kafka.set(addr);
    }

    fn kafka_addrs(&self) -> BTreeMap<u64, String> {
        self.kafka.all()
    }

    fn set_fenced(&self, change: Fencing) {
        self.fenced.set(change);
    }

    fn replace_fenced(&self, nodes: &[u64]) {
        self.fenced.replace(nodes);
    }

    fn fenced(&self) -> Vec<u64> {
        self.fenced.all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The index by id follows every insert, re-make and removal: each known queue's
        /// group is found by its id, and no id of a forgotten group finds anything.
        #[test]
        fn queue_groups_find_by_id_what_they_hold_by_name(
            ops in proptest::collection::vec((0u8..4, 0u64..6, any::<bool>()), 0..40),
        ) {
            let mut groups = QueueGroups::default();
            let mut next_id = 1;
            for (name, id_seed, remove) in ops {
                let name = format!("q{name}");
                match remove {
                    true => {
                        groups.remove(&name);
                    }
                    false => {
                        next_id += 1 + id_seed;
                        let group = QueueGroup { id: next_id, replicas: vec![1, 2, 3], partitions: 1 };
                        groups.insert(&name, group);
                    }
                }
                prop_assert_eq!(groups.names.len(), groups.len());
                for (name, group) in groups.iter() {
                    prop_assert_eq!(groups.by_id(group.id).map(|g| g.id), Some(group.id));
                    prop_assert_eq!(groups.names.get(&group.id), Some(name));
                }
            }
            let placed = groups.iter().next().map(|(n, g)| (n.clone(), g.id));
            if let Some((name, id)) = placed {
                prop_assert!(groups.set_replicas(&name, id + 1, &[9]).is_none());
                let changed = groups.set_replicas(&name, id, &[3, 1]);
                prop_assert_eq!(changed.map(|g| g.replicas), Some(vec![3, 1]));
                prop_assert_eq!(groups.by_id(id).map(|g| g.replicas.clone()), Some(vec![3, 1]));
            }
        }

        /// A group id tells its queue group, its partition, the metadata index that made
        /// the queue and whether its partitions have groups of their own; a queue's groups
        /// are distinct and its own.
        #[test]
        fn group_ids_round_trip(index in 1u64..(1 << 40), dlq in any::<bool>(), split in any::<bool>(), partitions in 1u32..=256) {
            let id = queue_group_id(index, split) + u64::from(dlq);
            prop_assert_eq!(created_at(id), index);
            prop_assert_eq!(is_split(id), split);
            prop_assert_eq!(group_kind(id), usize::from(dlq));
            let queue = QueueGroup { id, replicas: vec![1, 2, 3], partitions };
            let members: Vec<(u32, u64)> = queue.members().collect();
            prop_assert_eq!(members.len(), partitions as usize);
            prop_assert_eq!(members[0], (0, id));
            for (p, group) in &members {
                prop_assert_eq!(split_group(*group), (id, *p));
                prop_assert_eq!(queue.partition_of(*group), Some(*p));
                prop_assert_eq!(created_at(*group), index);
                prop_assert_eq!(group_kind(*group), usize::from(dlq));
            }
            let distinct: BTreeSet<u64> = members.iter().map(|(_, g)| *g).collect();
            prop_assert_eq!(distinct.len(), members.len());
            prop_assert_eq!(queue.partition_of(partition_group(id, partitions)), None);
        }
    }

    /// Each partition's preferred leader is the next replica in turn; all of them have the
    /// queue's replicas.
    #[test]
    fn partition_leaders_take_turns_over_the_replicas() {
        let queue = QueueGroup {
            id: queue_group_id(7, true),
            replicas: vec![2, 3, 1],
            partitions: 4,
        };
        let firsts: Vec<u64> = (0..4).map(|p| queue.replicas_of(p)[0]).collect();
        assert_eq!(firsts, [2, 3, 1, 2]);
        assert_eq!(queue.replicas_of(1), [3, 1, 2]);
        let empty = QueueGroup {
            replicas: Vec::new(),
            ..queue
        };
        assert!(empty.replicas_of(3).is_empty());
    }
}
