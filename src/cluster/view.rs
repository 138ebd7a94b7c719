//! What a node tells about the cluster: `GET /cluster` ([`ClusterView`]), whether it is part
//! of a working quorum (`/healthz`), and per-group series in `/metrics` (term, leader
//! changes, replication lag, last log, commit, apply and snapshot indexes, snapshot
//! installs and resumed snapshot bytes).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use serde::{Deserialize, Serialize};

use super::Cluster;
use super::groups::META_GROUP;
use super::state_machine::Raft;
use super::types::{LogId, RaftMetrics};
use crate::clock::Ticks;
use crate::metrics::ScrapeSeries;

/// Current term of a group.
pub const TERM: &str = "qit_cluster_term";
/// Leader changes a group went through, as this node saw them.
pub const LEADER_CHANGES: &str = "qit_cluster_leader_changes_total";
/// On a group's leader: entries the slowest follower lacks.
pub const REPLICATION_LAG: &str = "qit_cluster_replication_lag_entries";
/// On a group's leader: entries one follower lacks (label `follower`; 0 on other nodes).
pub const FOLLOWER_LAG: &str = "qit_cluster_follower_lag_entries";
/// 1 while this node leads the group.
pub const IS_LEADER: &str = "qit_cluster_is_leader";
/// The last index of the group's log on this node.
pub const LAST_LOG_INDEX: &str = "qit_cluster_last_log_index";
/// The index up to which this node knows the group's log committed.
pub const COMMIT_INDEX: &str = "qit_cluster_commit_index";
/// The index up to which this node applied the group's log.
pub const APPLIED_INDEX: &str = "qit_cluster_applied_index";
/// The last index in the group's current snapshot on this node.
pub const SNAPSHOT_INDEX: &str = "qit_cluster_snapshot_index";
/// 1 while the group lost its log on this node and catches up (see `catch_up.rs`): it
/// neither votes nor stands for election here, so it counts on its other replicas for a
/// quorum (wait for 0 before stopping another node).
pub const CATCHING_UP: &str = "qit_cluster_catching_up";
/// The last index purged from the group's log on this node (the log holds the entries
/// after it; a follower that lacks them is sent the snapshot). openraft postpones a purge
/// while entries are on their way to a follower.
pub const PURGED_INDEX: &str = "qit_cluster_purged_index";
/// Bytes of partly received snapshots this node, following, threw away (counted by the
/// transfer).
pub use super::snapshot_transfer::DISCARDED_BYTES;
/// Snapshot bytes this node, leading, did not send again because the follower kept them
/// from a cut transfer (counted by the transfer).
pub use super::snapshot_transfer::RESUMED_BYTES;
/// Snapshots this node installed from a leader (counted by the state machine).
pub use super::state_machine::SNAPSHOTS_INSTALLED;

/// One node in [`ClusterView`].
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    /// Node id.
    pub id: u64,
    /// Cluster listener.
    pub cluster: String,
    /// HTTP listener (once the node announced it).
    pub http: Option<String>,
    /// gRPC listener (once the node announced it).
    pub grpc: Option<String>,
    /// Heard from lately (always true for the answering node).
    pub up: bool,
    /// Kafka listener (once the node announced it; absent on nodes without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<String>,
    /// Fenced: the metadata leader found it down and recorded so, for every node alike
    /// (it coordinates no Kafka consumer group until it is unfenced, up again a while).
    #[serde(default)]
    pub fenced: bool,
}

/// One partition in [`ClusterView`].
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PartitionView {
    /// Queue.
    pub queue: String,
    /// Partition.
    pub partition: u32,
    /// The leader of the queue's group as this node knows it; `None` while none can serve
    /// (see `serving_leader_and_term`).
    pub leader: Option<u64>,
    /// Replicas, preferred leader first.
    pub replicas: Vec<u64>,
    /// The end of the partition's committed entries on this node.
    pub committed_offset: u64,
    /// The queue's Raft group.
    pub group: u64,
    /// Its current term, as this node knows it.
    pub term: u64,
    /// When this node leads the group: entries its slowest follower lacks (else absent:
    /// only the leader knows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// When this node leads the group: what each follower lacks (else empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub followers: Vec<FollowerLag>,
}

/// How far one follower of a group is behind its leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FollowerLag {
    /// The follower's node id.
    pub node: u64,
    /// Entries of the leader's log it lacks.
    pub lag: u64,
}

/// `GET /cluster`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// The answering node.
    pub node_id: u64,
    /// The metadata group's leader as this node knows it (`None` as for a partition's).
    pub leader: Option<u64>,
    /// The metadata group's term.
    pub term: u64,
    /// Every voter.
    pub nodes: Vec<NodeView>,
    /// Every partition of every queue.
    pub partitions: Vec<PartitionView>,
}

/// On a group's leader, the entries its slowest follower lacks (`None` elsewhere).
fn follower_lag(m: &RaftMetrics) -> Option<u64> {
    m.replication
        .is_some()
        .then(|| followers_lag(m).iter().map(|f| f.lag).max().unwrap_or(0))
}

/// On a group's leader, what each follower lacks, by node id (empty elsewhere).
fn followers_lag(m: &RaftMetrics) -> Vec<FollowerLag> {
    let matched = m
        .replication
        .iter()
        .flatten()
        .map(|(node, matched)| (*node, matched.map(|l| l.index)));
    lags(m.id, m.last_log_index, matched)
}

/// What each follower lacks of a leader's log that ends at `last`, from how far each
/// voter's log matches it. openraft's replication metrics list every voter, the leader
/// `me` among them: it is no follower of itself, so it is left out.
fn lags(
    me: u64,
    last: Option<u64>,
    matched: impl IntoIterator<Item = (u64, Option<u64>)>,
) -> Vec<FollowerLag> {
    let last = last.unwrap_or(0);
    matched
        .into_iter()
        .filter(|(node, _)| *node != me)
        .map(|(node, matched)| FollowerLag {
            node,
            lag: last.saturating_sub(matched.unwrap_or(0)),
        })
        .collect()
}

/// The follower-lag series of a group on node `me`: what each follower lacks on the
/// group's leader, 0 for each other voter elsewhere (only the leader knows).
fn follower_lag_series(m: &RaftMetrics, me: u64) -> Vec<FollowerLag> {
    if m.replication.is_some() {
        return followers_lag(m);
    }
    m.membership_config
        .membership()
        .voter_ids()
        .filter(|node| *node != me)
        .map(|node| FollowerLag { node, lag: 0 })
        .collect()
}

/// How long `GET /cluster` waits for the replicas of the queues this node holds no replica
/// of to tell their offsets, for all of them together (a replica answers from its own copy
/// after 2 s without a leader).
const OFFSETS_WAIT: Duration = Duration::from_secs(3);

/// The next offset of every partition of `queues` as `read` tells it, all of them read at
/// once; what has not answered when `wait` is over (for all of them together) is left
/// out. Reading a few at a time would leave the later ones to a wait that the first ones
/// used up (a replica without a leader answers from its copy after 2 s).
async fn offsets_within<F, Fut>(
    wait: Duration,
    queues: BTreeSet<String>,
    read: F,
) -> HashMap<(String, u32), u64>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Option<crate::broker::QueueInfo>>,
{
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + wait;
    queues
        .into_iter()
        .map(|queue| {
            let read = read(queue);
            async move { tokio::time::timeout_at(deadline, read).await.ok().flatten() }
        })
        .collect::<futures_util::stream::FuturesUnordered<_>>()
        .filter_map(std::future::ready)
        .flat_map(|info| {
            let name = info.name;
            futures_util::stream::iter(
                info.partitions
                    .into_iter()
                    .map(move |p| ((name.clone(), p.partition), p.next_offset)),
            )
        })
        .collect()
        .await
}

impl Cluster {
    /// The cluster as this node sees it.
    pub fn view(&self) -> ClusterView {
        let (leader, term) = self.serving_leader_and_term(self.meta());
        let nodes = self
            .groups()
            .voters()
            .iter()
            .map(|(id, cluster)| {
                let addrs = self.groups().node(*id);
                NodeView {
                    id: *id,
                    cluster: cluster.clone(),
                    http: addrs.as_ref().map(|a| a.http.clone()),
                    grpc: addrs.as_ref().map(|a| a.grpc.clone()),
                    up: self.peers().is_up(*id),
                    kafka: self.groups().kafka.get(*id),
                    fenced: self.groups().fenced.contains(*id),
                }
            })
            .collect();
        let mut partitions = Vec::new();
        for (queue, queue_group) in self.groups().queue_groups() {
            let Ok(info) = self.broker.queue_info(&queue) else {
                continue;
            };
            for p in info.partitions {
                let group = queue_group.group_of(p.partition);
                let raft = self.groups().raft(group);
                // A node without a replica knows the leader from the leaders' beats.
                let (leader, term) = match &raft {
                    Some(raft) => self.serving_leader_and_term(raft),
                    // Only while a majority of its replicas is up, as a replica tells it:
                    // a leader cut off from the others (the only one left of two) still
                    // claims the group in its beats.
                    None => self
                        .claimed_leader(group)
                        .filter(|_| self.majority_up(queue_group.replicas_of(p.partition)))
                        .map_or((None, 0), |(leader, term)| (Some(leader), term)),
                };
                let (lag, followers) = raft.as_ref().map_or((None, Vec::new()), |r| {
                    let m = r.metrics();
                    let m = m.borrow_watched();
                    (follower_lag(&m), followers_lag(&m))
                });
                partitions.push(PartitionView {
                    queue: queue.clone(),
                    partition: p.partition,
                    leader,
                    replicas: queue_group.replicas_of(p.partition),
                    committed_offset: p.next_offset,
                    group,
                    term,
                    lag,
                    followers,
                });
            }
        }
        ClusterView {
            node_id: self.node_id(),
            leader,
            term,
            nodes,
            partitions,
        }
    }

    /// [`Self::view`], with the committed offsets of the queues this node holds no replica
    /// of asked of their replicas, as `GET /queues` asks them: its own copy of those
    /// queues is empty. A queue whose replicas have not answered when `OFFSETS_WAIT` (3 s)
    /// is over keeps its offsets of 0, so that the view still answers, within those 3 s
    /// however many queues wait, while they are down.
    pub async fn current_view(&self) -> ClusterView {
        let mut view = self.view();
        let elsewhere: BTreeSet<String> = view
            .partitions
            .iter()
            .filter(|p| self.groups().raft(p.group).is_none())
            .map(|p| p.queue.clone())
            .collect();
        let read = |queue: String| async move { self.broker.current_queue_info(&queue).await.ok() };
        let offsets = offsets_within(OFFSETS_WAIT, elsewhere, read).await;
        for p in &mut view.partitions {
            if let Some(offset) = offsets.get(&(p.queue.clone(), p.partition)) {
                p.committed_offset = *offset;
            }
        }
        view
    }

    /// Group `group`'s leader as this node knows it, with that leader's term: from its
    /// own replica's Raft state, else from the leaders' beats (`None`: none known).
    pub fn known_leader(&self, group: u64) -> Option<(u64, u64)> {
        match self.groups().raft(group) {
            Some(raft) => {
                let m = raft.metrics();
                let m = m.borrow_watched();
                m.current_leader.map(|leader| (leader, m.current_term))
            }
            None => self.claimed_leader(group),
        }
    }

    /// A group's leader as `GET /cluster` shows it, and its term: the leader this node
    /// knows, or none while it cannot serve. That is a leader here whose group has no
    /// majority of its voters up (it takes no write; it gives way once the others elect
    /// one), or a leader elsewhere this node has not heard from lately (it may be dead,
    /// and a new one is being elected), as this node's liveness tells.
    fn serving_leader_and_term(&self, raft: &Raft) -> (Option<u64>, u64) {
        let m = raft.metrics();
        let m = m.borrow_watched();
        let leader = m.current_leader.filter(|leader| {
            if *leader != self.node_id() {
                return self.peers().is_up(*leader);
            }
            self.majority_up(m.membership_config.membership().voter_ids())
        });
        (leader, m.current_term)
    }

    /// Whether more than half of `voters` are up as this node's liveness tells (this node
    /// always is).
    fn majority_up(&self, voters: impl IntoIterator<Item = u64>) -> bool {
        let (mut all, mut up) = (0, 0);
        for voter in voters {
            all += 1;
            up += usize::from(self.peers().is_up(voter));
        }
        up > all / 2
    }

    /// True while this node is part of a working quorum: the metadata group has a leader
    /// and a majority of the voters was heard from lately (this node), or this node heard
    /// from the leader lately. (openraft's `millis_since_quorum_ack` is only as fresh as
    /// its last metrics report, which an idle group without heartbeats no longer sends;
    /// the nodes' beats are.) A node whose metadata replica stopped (a storage error) is
    /// not: its last metrics still name the leader they knew.
    pub fn healthy(&self) -> bool {
        let (running, leader) = {
            let metrics = self.meta().metrics();
            let metrics = metrics.borrow_watched();
            (metrics.running_state.is_ok(), metrics.current_leader)
        };
        if !running {
            return false;
        }
        match leader {
            Some(leader) if leader == self.node_id() => self.majority_up(self.groups().voter_ids()),
            Some(leader) => self.peers().is_up(leader),
            None => false,
        }
    }

    /// Watches every group for a stop (logged once), every second until `stop`.
    pub async fn run_metrics(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut failed: Vec<u64> = Vec::new();
        let mut ticks = Ticks::new(Duration::from_secs(1), stop);
        while ticks.next().await {
            let names = self.group_names();
            let rafts = self.groups().rafts();
            for (id, raft) in &rafts {
                if let Err(fatal) = &raft.metrics().borrow_watched().running_state
                    && !failed.contains(id)
                {
                    let name = names.get(id).map_or("", String::as_str);
                    tracing::error!(group = id, queue = %name, %fatal, "a raft group stopped");
                    failed.push(*id);
                }
            }
            failed.retain(|id| rafts.iter().any(|(g, _)| g == id));
        }
    }

    /// The labels of group `id`'s series (of queue `name`): `group`, `queue`, and for a
    /// queue's groups `partition`: the one a partition group holds, 0 for a queue group,
    /// every partition for the group of a queue made before partition groups (one set
    /// each); none for the metadata group.
    fn series_labels(&self, id: u64, name: &str) -> Vec<Vec<(&'static str, String)>> {
        let base = vec![("group", id.to_string()), ("queue", name.to_string())];
        if id == META_GROUP {
            return vec![base];
        }
        let partitions = match super::groups::split_group(id) {
            // A queue made before partition groups: its group holds every partition.
            (_, 0) if !super::groups::is_split(id) => {
                0..self.broker.partition_count(name).unwrap_or(1)
            }
            (_, partition) => partition..partition + 1,
        };
        partitions
            .map(|partition| {
                let mut labels = base.clone();
                labels.push(("partition", partition.to_string()));
                labels
            })
            .collect()
    }

    /// The queue (or `_meta`) of each group this node runs, by group id.
    fn group_names(&self) -> HashMap<u64, String> {
        let mut names: HashMap<u64, String> = self
            .groups()
            .queue_groups()
            .into_iter()
            .flat_map(|(q, g)| {
                g.members()
                    .map(|(_, id)| (id, q.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        names.insert(META_GROUP, "_meta".to_string());
        names
    }

    /// Adds the state of every group this node runs now (term, leadership, lag, indexes)
    /// to a scrape: a group that left this node (its queue deleted or moved) shows nothing.
    /// A queue's groups label their series with the partitions they hold
    /// ([`Self::series_labels`]); the metadata group's have none.
    pub fn group_gauges(&self, state: &mut ScrapeSeries) {
        let names = self.group_names();
        for (id, raft) in self.groups().rafts() {
            let name = names.get(&id).cloned().unwrap_or_default();
            let m = raft.metrics().borrow_watched().clone();
            let changes = self.groups().leader_changes(id).unwrap_or(0);
            let catching_up = if self.groups().has_lost(id) { 1.0 } else { 0.0 };
            for labels in self.series_labels(id, &name) {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                self.group_series(state, &m, &labels);
                state.counter(LEADER_CHANGES, &labels, changes);
                state.set(CATCHING_UP, &labels, catching_up);
            }
        }
    }

    /// One set of a group's series under `labels`.
    fn group_series(&self, state: &mut ScrapeSeries, m: &RaftMetrics, labels: &[(&str, &str)]) {
        state.set(TERM, labels, m.current_term as f64);
        let leads = m.current_leader == Some(self.node_id());
        state.set(IS_LEADER, labels, if leads { 1.0 } else { 0.0 });
        state.set(REPLICATION_LAG, labels, follower_lag(m).unwrap_or(0) as f64);
        for f in follower_lag_series(m, self.node_id()) {
            let node = f.node.to_string();
            let mut labels = labels.to_vec();
            labels.push(("follower", node.as_str()));
            state.set(FOLLOWER_LAG, &labels, f.lag as f64);
        }
        let index = |l: &Option<LogId>| l.as_ref().map_or(0.0, |l| l.index as f64);
        state.set(LAST_LOG_INDEX, labels, m.last_log_index.unwrap_or(0) as f64);
        state.set(COMMIT_INDEX, labels, index(&m.local_committed));
        state.set(APPLIED_INDEX, labels, index(&m.last_applied));
        state.set(SNAPSHOT_INDEX, labels, index(&m.snapshot));
        state.set(PURGED_INDEX, labels, index(&m.purged));
    }
}

/// A node's STATE in `qit cluster status`: up or down as the answering node sees it, and
/// fenced when the metadata records so (it coordinates no Kafka group meanwhile).
fn node_state(node: &NodeView) -> &'static str {
    match (node.up, node.fenced) {
        (true, false) => "up",
        (false, false) => "down",
        (true, true) => "up,fenced",
        (false, true) => "down,fenced",
    }
}

/// `qit cluster status` as tables: the nodes (up or down, fenced, how many groups each
/// leads) and the partitions (leader, replicas, committed offset, and the lag its leader
/// reports). `view` is the answering node's; `others` are the views of the other nodes
/// that answered, where the lag of the groups they lead comes from.
pub fn status_table(view: &ClusterView, others: &[ClusterView]) -> String {
    let name = |id: Option<u64>| id.map_or("-".to_string(), |i| i.to_string());
    let mut out = vec![format!(
        "answered by node {}  metadata leader {}  term {}",
        view.node_id,
        name(view.leader),
        view.term
    )];
    let mut leads: std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>> =
        std::collections::BTreeMap::new();
    for p in &view.partitions {
        if let Some(leader) = p.leader {
            leads.entry(leader).or_default().insert(p.group);
        }
    }
    out.push(String::new());
    out.push(format!(
        "{:<6} {:<11} {:<7} {:<22} {:<22} {}",
        "NODE", "STATE", "LEADS", "HTTP", "GRPC", "CLUSTER"
    ));
    for n in &view.nodes {
        let groups = leads.get(&n.id).map_or(0, |g| g.len());
        let meta = if view.leader == Some(n.id) {
            "+meta"
        } else {
            ""
        };
        let led = format!("{groups}{meta}");
        out.push(format!(
            "{:<6} {:<11} {:<7} {:<22} {:<22} {}",
            n.id,
            node_state(n),
            led,
            n.http.as_deref().unwrap_or("?"),
            n.grpc.as_deref().unwrap_or("?"),
            n.cluster
        ));
    }
    out.push(String::new());
    out.push(format!(
        "{:<32} {:<6} {:<9} {:>10} {:<16} {:>6}",
        "QUEUE/PARTITION", "LEADER", "REPLICAS", "COMMITTED", "FOLLOWER:LAG", "LAG"
    ));
    for p in &view.partitions {
        let leaders_view = |p: &PartitionView| {
            others
                .iter()
                .filter(|o| Some(o.node_id) == p.leader)
                .flat_map(|o| &o.partitions)
                .find(|o| o.group == p.group && o.partition == p.partition)
                .cloned()
        };
        let lag = p.lag.or_else(|| leaders_view(p).and_then(|o| o.lag));
        let followers = if p.followers.is_empty() {
            leaders_view(p).map(|o| o.followers).unwrap_or_default()
        } else {
            p.followers.clone()
        };
        let followers: Vec<String> = followers
            .iter()
            .map(|f| format!("{}:{}", f.node, f.lag))
            .collect();
        let replicas: Vec<String> = p.replicas.iter().map(u64::to_string).collect();
        let partition = format!("{}/{}", p.queue, p.partition);
        out.push(format!(
            "{:<32} {:<6} {:<9} {:>10} {:<16} {:>6}",
            partition,
            name(p.leader),
            replicas.join(","),
            p.committed_offset,
            followers.join(","),
            name(lag)
        ));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(queue: &str, leader: Option<u64>, lag: Option<u64>) -> PartitionView {
        PartitionView {
            queue: queue.into(),
            partition: 0,
            leader,
            replicas: vec![2, 1, 3],
            committed_offset: 42,
            group: 8,
            term: 3,
            lag,
            followers: Vec::new(),
        }
    }

    /// A queue whose replicas tell partition 0's next offset as `offset`.
    fn info(queue: &str, offset: u64) -> crate::broker::QueueInfo {
        crate::broker::QueueInfo {
            name: queue.into(),
            settings: crate::broker::QueueSettings::default(),
            partitions: vec![crate::broker::PartitionInfo {
                partition: 0,
                first_offset: 0,
                next_offset: offset,
                segments: 1,
                bytes: 0,
            }],
            groups: Vec::new(),
        }
    }

    /// Offsets are waited for together: a hundred queues whose replicas never answer
    /// hold the view up for one wait, not one each or per round, and those that answer
    /// in time keep their offsets, the last queue too.
    #[tokio::test(start_paused = true)]
    async fn queues_that_do_not_answer_share_one_wait() {
        let queues: BTreeSet<String> = (0..100).map(|i| format!("q{i:03}")).collect();
        let started = tokio::time::Instant::now();
        let offsets = offsets_within(Duration::from_secs(3), queues, |queue| async move {
            match queue.as_str() {
                "q000" => Some(info("q000", 7)),
                "q099" => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Some(info("q099", 9))
                }
                _ => std::future::pending().await,
            }
        })
        .await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(
            offsets,
            HashMap::from([(("q000".into(), 0), 7), (("q099".into(), 0), 9)])
        );
    }

    fn node(id: u64, up: bool) -> NodeView {
        NodeView {
            id,
            cluster: format!("127.0.0.1:710{id}"),
            http: Some(format!("127.0.0.1:808{id}")),
            grpc: None,
            up,
            kafka: None,
            fenced: false,
        }
    }

    /// A leader's own entry in openraft's replication metrics is no follower: the lags
    /// list the other voters only, each by what it lacks of the leader's log.
    #[test]
    fn a_leader_is_not_its_own_follower() {
        let matched = [(1, Some(10)), (2, Some(7)), (3, None)];
        assert_eq!(
            lags(1, Some(10), matched),
            [
                FollowerLag { node: 2, lag: 3 },
                FollowerLag { node: 3, lag: 10 }
            ]
        );
        assert_eq!(lags(2, None, [(2, None)]), []);
    }

    /// The table shows who is down or fenced, how many groups each node leads, and the lag
    /// the partition's leader reports, in all and per follower (from the leader's own view
    /// when another node answered).
    #[test]
    fn status_table_shows_nodes_leaders_and_lag() {
        let mut answering = ClusterView {
            node_id: 1,
            leader: Some(1),
            term: 5,
            nodes: vec![node(1, true), node(2, true), node(3, false)],
            partitions: vec![partition("orders", Some(2), None)],
        };
        answering.nodes[2].fenced = true;
        let mut led = partition("orders", Some(2), Some(7));
        led.followers = vec![
            FollowerLag { node: 1, lag: 0 },
            FollowerLag { node: 3, lag: 7 },
        ];
        let leader = ClusterView {
            node_id: 2,
            partitions: vec![led],
            ..answering.clone()
        };
        let table = status_table(&answering, &[leader]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("metadata leader 1"), "{table}");
        let row = |prefix: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(prefix))
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(row("1 ")[..3], ["1", "up", "0+meta"], "{table}");
        assert_eq!(row("2 ")[..3], ["2", "up", "1"], "{table}");
        assert_eq!(row("3 ")[..3], ["3", "down,fenced", "0"], "{table}");
        assert_eq!(
            row("orders/0"),
            ["orders/0", "2", "2,1,3", "42", "1:0,3:7", "7"],
            "{table}"
        );
        let alone = status_table(&answering, &[]);
        assert!(
            alone
                .lines()
                .any(|l| l.starts_with("orders/0") && l.ends_with(" -")),
            "{alone}"
        );
    }
}
