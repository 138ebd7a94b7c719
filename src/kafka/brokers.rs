//! The brokers Kafka clients are told about: who they are, which one leads a partition and
//! which one coordinates a consumer group.
//!
//! A single node is broker 0, at the address the client reached it on, and leads and
//! coordinates everything. A cluster node describes the cluster: every node that announced
//! a Kafka listener is a broker whose id is its qit node id. A partition's leader is the
//! node leading its Raft group when this node knows it (it holds a replica), else the first
//! live replica in placement order (the preferred leader), else this node; any of them
//! serves a produce, forwarding it to the leader. A group's coordinator is chosen by
//! rendezvous hashing of the group id over the nodes with a Kafka listener that are not
//! fenced (the metadata leader fences the nodes it finds down and records it in the
//! metadata, see [`crate::cluster::fencing`]), so every node names the same one, even
//! while their own views of who is up differ; a node asked to coordinate a group it does
//! not own answers `NOT_COORDINATOR`: the members look it up again and all meet on one
//! node, where the group's membership lives ([`super::coordinator`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::cluster::Cluster;
use crate::cluster::placement;

/// The broker id of the single node.
pub const SINGLE_NODE_ID: u64 = 0;

/// One node as the Kafka adapter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// Its advertised Kafka listener, `HOST:PORT` (`None`: not announced).
    pub kafka: Option<String>,
    /// Heard from lately (always true for this node).
    pub up: bool,
    /// Fenced by the metadata leader (found down; see `cluster::fencing`): it coordinates
    /// no group. Unlike `up`, every node has the same list.
    pub fenced: bool,
}

/// A broker entry of a Metadata or FindCoordinator answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    /// The broker id (the qit node id).
    pub id: i32,
    /// Host.
    pub host: String,
    /// Port.
    pub port: i32,
}

/// Where one partition is served, in broker ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The broker clients send its produce and fetch requests to.
    pub leader: i32,
    /// Its replicas, preferred leader first.
    pub replicas: Vec<i32>,
    /// The replicas heard from lately.
    pub isr: Vec<i32>,
    /// Kafka's leader epoch of `leader`: the term of its Raft group, which grows with
    /// every election as a leader epoch does with every leader change (as Redpanda maps
    /// them), so that a client can tell a stale answer from a newer one; -1 (unknown)
    /// where `leader` is not a leader this node knows but a live replica named in its
    /// stead; 0 on a single node, which leads its partitions for good.
    pub leader_epoch: i32,
}

/// The nodes as this node sees them at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// This node's id.
    pub me: u64,
    /// The address the client reached this node on.
    pub local: SocketAddr,
    /// Every node (this one included).
    pub nodes: BTreeMap<u64, NodeState>,
    /// The metadata group's leader, when known.
    pub controller: Option<u64>,
}

/// A node id as a Kafka broker id (ids past `i32::MAX` are not usable as brokers).
pub fn broker_id(id: u64) -> i32 {
    i32::try_from(id).unwrap_or(i32::MAX)
}

/// `HOST:PORT` split for a broker entry (`None` when it does not parse).
fn split(addr: &str) -> Option<(String, i32)> {
    let addr: SocketAddr = addr.parse().ok()?;
    Some((addr.ip().to_string(), i32::from(addr.port())))
}

impl Layout {
    /// The single node: broker 0 at the address the client reached.
    pub fn single(local: SocketAddr) -> Self {
        let me = NodeState {
            kafka: None,
            up: true,
            fenced: false,
        };
        Self {
            me: SINGLE_NODE_ID,
            local,
            nodes: BTreeMap::from([(SINGLE_NODE_ID, me)]),
            controller: Some(SINGLE_NODE_ID),
        }
    }

    /// The cluster as `cluster` knows it now.
    pub fn of(cluster: &Cluster, local: SocketAddr) -> Self {
        let me = cluster.node_id();
        let kafka = cluster.groups().kafka.all();
        // The voters (a removed node's announcement stays in the metadata, not its broker).
        let mut ids = cluster.groups().voter_ids();
        ids.push(me);
        ids.sort_unstable();
        ids.dedup();
        let nodes = ids
            .into_iter()
            .map(|id| {
                let state = NodeState {
                    kafka: kafka.get(&id).cloned(),
                    up: id == me || cluster.peers().is_up(id),
                    fenced: cluster.groups().fenced.contains(id),
                };
                (id, state)
            })
            .collect();
        Self {
            me,
            local,
            nodes,
            controller: cluster.meta_leader(),
        }
    }

    /// True for a node that clients can reach: this one, and those that announced a
    /// listener that parses.
    fn advertised(&self, id: u64) -> bool {
        id == self.me
            || self
                .nodes
                .get(&id)
                .and_then(|n| n.kafka.as_deref())
                .and_then(split)
                .is_some()
    }

    /// True for this node and those heard from lately.
    fn up(&self, id: u64) -> bool {
        id == self.me || self.nodes.get(&id).is_some_and(|n| n.up)
    }

    /// The brokers of a Metadata answer: this node (at its announced listener, else where
    /// the client reached it) and every other live node that announced one (as Kafka
    /// lists its live brokers; a replica list may name a node that is down).
    pub fn brokers(&self) -> Vec<Advertised> {
        self.nodes
            .iter()
            .filter(|(id, _)| self.up(**id))
            .filter_map(|(id, node)| self.entry(*id, node))
            .collect()
    }

    /// The broker entry of node `id`, if clients can reach it.
    pub fn broker(&self, id: u64) -> Option<Advertised> {
        self.nodes.get(&id).and_then(|node| self.entry(id, node))
    }

    fn entry(&self, id: u64, node: &NodeState) -> Option<Advertised> {
        let announced = node.kafka.as_deref().and_then(split);
        let (host, port) = match announced {
            Some(found) => found,
            None if id == self.me => (self.local.ip().to_string(), i32::from(self.local.port())),
            None => return None,
        };
        Some(Advertised {
            id: broker_id(id),
            host,
            port,
        })
    }

    /// The controller of a Metadata answer: the metadata leader when clients can reach
    /// it, else this node.
    pub fn controller(&self) -> i32 {
        broker_id(
            self.controller
                .filter(|c| self.advertised(*c))
                .unwrap_or(self.me),
        )
    }

    /// Where a partition is served: `raft_leader` (its group's leader and that leader's
    /// term, when known here) if reachable and up, else the first live reachable replica,
    /// else this node. `replicas` is empty on a single node.
    pub fn placement(&self, raft_leader: Option<(u64, u64)>, replicas: &[u64]) -> Placement {
        let usable = |id: &u64| self.advertised(*id) && self.up(*id);
        let known = raft_leader.filter(|(id, _)| usable(id));
        let leader = known
            .map(|(id, _)| id)
            .or_else(|| replicas.iter().copied().find(usable))
            .unwrap_or(self.me);
        let leader_epoch = match known {
            Some((_, term)) => i32::try_from(term).unwrap_or(i32::MAX),
            None if replicas.is_empty() => 0,
            None => -1,
        };
        let replicas: Vec<u64> = if replicas.is_empty() {
            vec![self.me]
        } else {
            replicas.to_vec()
        };
        Placement {
            leader: broker_id(leader),
            isr: replicas
                .iter()
                .filter(|id| self.up(**id))
                .map(|id| broker_id(*id))
                .collect(),
            replicas: replicas.into_iter().map(broker_id).collect(),
            leader_epoch,
        }
    }

    /// The node that coordinates `group`: the best by rendezvous hashing of the group id
    /// over the unfenced nodes clients can reach (this node when there is none). Not by
    /// this node's own view of who is up: every node must name the same one.
    pub fn coordinator(&self, group: &str) -> u64 {
        let candidates: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(id, node)| self.advertised(**id) && !node.fenced)
            .map(|(id, _)| *id)
            .collect();
        placement::replicas(&format!("kafka-group/{group}"), &candidates, 1)
            .first()
            .copied()
            .unwrap_or(self.me)
    }

    /// True when this node coordinates `group`.
    pub fn coordinates(&self, group: &str) -> bool {
        self.coordinator(group) == self.me
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> SocketAddr {
        "127.0.0.1:19092".parse().unwrap()
    }

    /// Nodes 1..=n announced at 127.0.0.1:1900N, all up; this node is `me`.
    fn cluster(me: u64, n: u64) -> Layout {
        Layout {
            me,
            local: local(),
            nodes: (1..=n)
                .map(|id| {
                    let state = NodeState {
                        kafka: Some(format!("127.0.0.1:1900{id}")),
                        up: true,
                        fenced: false,
                    };
                    (id, state)
                })
                .collect(),
            controller: Some(1),
        }
    }

    #[test]
    fn a_single_node_is_broker_zero_where_the_client_reached_it() {
        let layout = Layout::single(local());
        let brokers = layout.brokers();
        assert_eq!(
            brokers,
            vec![Advertised {
                id: 0,
                host: "127.0.0.1".into(),
                port: 19092
            }]
        );
        assert_eq!(layout.controller(), 0);
        assert_eq!(layout.placement(None, &[]).leader, 0);
        assert_eq!(layout.placement(None, &[]).replicas, vec![0]);
        assert!(layout.coordinates("any-group"));
    }

    #[test]
    fn every_node_with_a_listener_is_a_broker_under_its_node_id() {
        let mut layout = cluster(2, 3);
        let brokers = layout.brokers();
        assert_eq!(brokers.iter().map(|b| b.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(brokers[2].port, 19003);
        // A node that announced nothing yet is left out, except this node.
        layout.nodes.get_mut(&3).unwrap().kafka = None;
        layout.nodes.get_mut(&2).unwrap().kafka = None;
        let brokers = layout.brokers();
        assert_eq!(brokers.iter().map(|b| b.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(
            brokers[1].port, 19092,
            "this node where the client reached it"
        );
        // A node that is down is not listed (its id may still be a replica).
        layout.nodes.get_mut(&1).unwrap().up = false;
        assert_eq!(
            layout.brokers().iter().map(|b| b.id).collect::<Vec<_>>(),
            [2]
        );
        assert_eq!(layout.placement(None, &[1, 2]).replicas, vec![1, 2]);
    }

    #[test]
    fn the_leader_is_the_raft_leader_else_a_live_replica_else_this_node() {
        let mut layout = cluster(1, 4);
        let placed = layout.placement(Some((3, 7)), &[2, 3, 4]);
        assert_eq!(placed.leader, 3);
        assert_eq!(placed.replicas, vec![2, 3, 4]);
        assert_eq!(placed.isr, vec![2, 3, 4]);
        // Leader unknown here (no replica on node 1): the preferred leader.
        assert_eq!(layout.placement(None, &[2, 3, 4]).leader, 2);
        // The Raft leader and the preferred one are down: the next live replica.
        layout.nodes.get_mut(&3).unwrap().up = false;
        layout.nodes.get_mut(&2).unwrap().up = false;
        let placed = layout.placement(Some((3, 7)), &[2, 3, 4]);
        assert_eq!(placed.leader, 4);
        assert_eq!(placed.isr, vec![4]);
        // A leader without a listener is not named: clients could not reach it.
        layout.nodes.get_mut(&4).unwrap().kafka = None;
        assert_eq!(layout.placement(Some((4, 7)), &[2, 3, 4]).leader, 1);
    }

    #[test]
    fn the_leader_epoch_is_the_known_leaders_term_else_unknown() {
        let mut layout = cluster(1, 4);
        assert_eq!(layout.placement(Some((3, 7)), &[2, 3, 4]).leader_epoch, 7);
        // A term past Kafka's 32 bits is the largest epoch, not a wrapped one.
        let huge = u64::from(u32::MAX) + 5;
        assert_eq!(
            layout.placement(Some((3, huge)), &[2, 3, 4]).leader_epoch,
            i32::MAX
        );
        // A replica named because no leader is known here, or the known one is down:
        // its epoch is unknown (a client keeps a newer one it has).
        assert_eq!(layout.placement(None, &[2, 3, 4]).leader_epoch, -1);
        layout.nodes.get_mut(&3).unwrap().up = false;
        let placed = layout.placement(Some((3, 7)), &[2, 3, 4]);
        assert_eq!((placed.leader, placed.leader_epoch), (2, -1));
        // A single node leads its partitions for good: epoch 0.
        let single = Layout::single(local());
        assert_eq!(single.placement(None, &[]).leader_epoch, 0);
    }

    #[test]
    fn every_node_names_the_same_coordinator_for_a_group() {
        for group in ["orders", "billing", "g-1", "g-2", "g-3"] {
            let chosen: Vec<u64> = (1..=3)
                .map(|me| cluster(me, 3).coordinator(group))
                .collect();
            assert!(
                chosen.iter().all(|c| *c == chosen[0]),
                "{group}: {chosen:?}"
            );
            let owners = (1..=3)
                .filter(|me| cluster(*me, 3).coordinates(group))
                .count();
            assert_eq!(owners, 1, "{group}: exactly one node coordinates it");
        }
    }

    #[test]
    fn groups_spread_over_the_nodes() {
        let layout = cluster(1, 3);
        let mut per_node = BTreeMap::new();
        for i in 0..300 {
            *per_node
                .entry(layout.coordinator(&format!("group-{i}")))
                .or_insert(0) += 1;
        }
        assert_eq!(per_node.len(), 3, "{per_node:?}");
        assert!(per_node.values().all(|n| *n > 50), "{per_node:?}");
    }

    #[test]
    fn a_fenced_coordinator_hands_its_groups_to_another_node() {
        let group = (0..100)
            .map(|i| format!("group-{i}"))
            .find(|g| cluster(1, 3).coordinator(g) == 2)
            .expect("a group coordinated by node 2");
        let mut layout = cluster(1, 3);
        layout.nodes.get_mut(&2).unwrap().fenced = true;
        let next = layout.coordinator(&group);
        assert_ne!(next, 2);
        let mut on_three = cluster(3, 3);
        on_three.nodes.get_mut(&2).unwrap().fenced = true;
        assert_eq!(on_three.coordinator(&group), next, "the survivors agree");
        // Groups of the live nodes stay where they were.
        let stays = (0..100)
            .map(|i| format!("group-{i}"))
            .filter(|g| cluster(1, 3).coordinator(g) != 2)
            .all(|g| layout.coordinator(&g) == cluster(1, 3).coordinator(&g));
        assert!(stays);
    }

    /// Nodes whose own views of who is up differ (node 1 missed node 2's beats, node 3
    /// did not) name the same coordinator: only fencing, which the metadata records for
    /// every node alike, moves a group (two coordinators listed the same group).
    #[test]
    fn nodes_that_disagree_on_who_is_up_name_the_same_coordinator() {
        let mut on_one = cluster(1, 3);
        on_one.nodes.get_mut(&2).unwrap().up = false;
        let on_three = cluster(3, 3);
        for i in 0..100 {
            let group = format!("group-{i}");
            assert_eq!(
                on_one.coordinator(&group),
                on_three.coordinator(&group),
                "{group}"
            );
        }
    }

    #[test]
    fn the_controller_is_the_metadata_leader_when_reachable() {
        let mut layout = cluster(2, 3);
        assert_eq!(layout.controller(), 1);
        layout.nodes.get_mut(&1).unwrap().kafka = None;
        assert_eq!(layout.controller(), 2);
        layout.controller = None;
        assert_eq!(layout.controller(), 2);
    }
}
