//! What a node tells about the cluster: `GET /cluster` ([`ClusterView`]), whether it is part
//! of a working quorum (`/healthz`), and per-group series in `/metrics` (term, leader
//! changes, replication lag).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::Cluster;
use super::groups::META_GROUP;
use super::types::Raft;

/// Current term of a group.
pub const TERM: &str = "qit_cluster_term";
/// Leader changes a group went through, as this node saw them.
pub const LEADER_CHANGES: &str = "qit_cluster_leader_changes_total";
/// On a group's leader: entries the slowest follower lacks.
pub const REPLICATION_LAG: &str = "qit_cluster_replication_lag_entries";
/// 1 while this node leads the group.
pub const IS_LEADER: &str = "qit_cluster_is_leader";

/// One node in [`ClusterView`].
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
}

/// One partition in [`ClusterView`].
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PartitionView {
    /// Queue.
    pub queue: String,
    /// Partition.
    pub partition: u32,
    /// The leader of the queue's group, if known here.
    pub leader: Option<u64>,
    /// Replicas, preferred leader first.
    pub replicas: Vec<u64>,
    /// The end of the partition's committed entries on this node.
    pub committed_offset: u64,
    /// The queue's Raft group.
    pub group: u64,
    /// Its current term, as this node knows it.
    pub term: u64,
}

/// `GET /cluster`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// The answering node.
    pub node_id: u64,
    /// The metadata group's leader.
    pub leader: Option<u64>,
    /// The metadata group's term.
    pub term: u64,
    /// Every voter.
    pub nodes: Vec<NodeView>,
    /// Every partition of every queue.
    pub partitions: Vec<PartitionView>,
}

fn leader_and_term(raft: &Raft) -> (Option<u64>, u64) {
    let m = raft.metrics();
    let m = m.borrow();
    (m.current_leader, m.current_term)
}

impl Cluster {
    /// The cluster as this node sees it.
    pub fn view(&self) -> ClusterView {
        let (leader, term) = leader_and_term(self.meta());
        let nodes = self
            .groups()
            .voters
            .iter()
            .map(|(id, cluster)| {
                let addrs = self.groups().node(*id);
                NodeView {
                    id: *id,
                    cluster: cluster.clone(),
                    http: addrs.as_ref().map(|a| a.http.clone()),
                    grpc: addrs.as_ref().map(|a| a.grpc.clone()),
                    up: self.peers().is_up(*id),
                }
            })
            .collect();
        let mut partitions = Vec::new();
        for (queue, group) in self.groups().queue_groups() {
            let (leader, term) = self
                .groups()
                .raft(group.id)
                .map_or((None, 0), |r| leader_and_term(&r));
            let Ok(info) = self.broker.queue_info(&queue) else {
                continue;
            };
            for p in info.partitions {
                partitions.push(PartitionView {
                    queue: queue.clone(),
                    partition: p.partition,
                    leader,
                    replicas: group.replicas.clone(),
                    committed_offset: p.next_offset,
                    group: group.id,
                    term,
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

    /// True while this node is part of a working quorum: the metadata group has a leader
    /// and a majority of the voters was heard from lately (this node), or this node heard
    /// from the leader lately. (openraft's `millis_since_quorum_ack` is only as fresh as
    /// its last metrics report, which an idle group without heartbeats no longer sends;
    /// the nodes' beats are.)
    pub fn healthy(&self) -> bool {
        let leader = self.meta().metrics().borrow().current_leader;
        match leader {
            Some(leader) if leader == self.node_id() => {
                let voters = &self.groups().voters;
                let up = voters.keys().filter(|v| self.peers().is_up(**v)).count();
                up > voters.len() / 2
            }
            Some(leader) => self.peers().is_up(leader),
            None => false,
        }
    }

    /// Updates the per-group series every second until `stop`.
    pub async fn run_metrics(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut leaders: HashMap<u64, Option<u64>> = HashMap::new();
        let mut failed: Vec<u64> = Vec::new();
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            let names: HashMap<u64, String> = self
                .groups()
                .queue_groups()
                .into_iter()
                .map(|(q, g)| (g.id, q))
                .collect();
            for (id, raft) in self.groups().rafts() {
                let name = if id == META_GROUP {
                    "_meta".to_string()
                } else {
                    names.get(&id).cloned().unwrap_or_default()
                };
                let m = raft.metrics().borrow().clone();
                if let Err(fatal) = &m.running_state
                    && !failed.contains(&id)
                {
                    tracing::error!(group = id, queue = %name, %fatal, "a raft group stopped");
                    failed.push(id);
                }
                let labels = [("group", id.to_string()), ("queue", name)];
                metrics::gauge!(TERM, &labels).set(m.current_term as f64);
                let leads = m.current_leader == Some(self.node_id());
                metrics::gauge!(IS_LEADER, &labels).set(if leads { 1.0 } else { 0.0 });
                let previous = leaders.insert(id, m.current_leader);
                if previous.is_some_and(|p| p != m.current_leader) && m.current_leader.is_some() {
                    metrics::counter!(LEADER_CHANGES, &labels).increment(1);
                }
                let lag = m.replication.as_ref().map_or(0, |followers| {
                    let last = m.last_log_index.unwrap_or(0);
                    followers
                        .values()
                        .map(|matched| last.saturating_sub(matched.map_or(0, |l| l.index)))
                        .max()
                        .unwrap_or(0)
                });
                metrics::gauge!(REPLICATION_LAG, &labels).set(lag as f64);
            }
        }
    }
}
