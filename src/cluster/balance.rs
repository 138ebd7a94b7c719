//! Leader balance: placement names a preferred leader for every group (its first replica),
//! and leaders spread over the nodes that way. A node that was down lost its groups to
//! the others; once it is back, has been up for a moment and holds (nearly) the whole log
//! of a group, the group's current leader hands the group back to it
//! ([`Cluster::hand_off`]), a few groups per round so that a returning node is not asked
//! to take everything at once.
//!
//! Preferences themselves are evened out too: placement gives each new queue the replica
//! preferred for the fewest queues ([`super::placement::lead_balanced`]), but deleting
//! queues can leave one node preferred for two or more queues more than another replica
//! of one of them. The metadata group's leader then moves that queue's preference to the
//! less loaded replica ([`Placed`] with the same replicas in another order), one queue per
//! round, so that decisions never overlap; the hand-back above follows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::watch::WatchReceiver;
use tokio_util::sync::CancellationToken;

use crate::clock::Ticks;

use super::Cluster;
use super::groups::{QueueGroup, preferences};
use super::state_machine::Raft;
use super::types::{Command, Placed};

/// How often a node looks for groups to give back.
const EVERY: Duration = Duration::from_secs(1);
/// Most groups one node gives back per round.
const MOVES_PER_ROUND: usize = 4;
/// How long a preferred leader must have been up before it gets groups back.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the metadata leader waits for a moved preference to be recorded.
const RECORD_WAIT: Duration = Duration::from_secs(5);
/// How far behind the preferred leader may be for a hand-off to start (the hand-off then
/// holds new work back until it has everything).
const NEAR_LAG: u64 = 64;

/// True when `node` follows `raft` (led here) at most [`NEAR_LAG`] entries behind.
fn nearly_caught_up(raft: &Raft, node: u64) -> bool {
    let m = raft.metrics();
    let m = m.borrow_watched();
    let last = m.last_log_index.unwrap_or(0);
    m.replication.as_ref().is_some_and(|r| {
        r.get(&node)
            .is_some_and(|matched| last.saturating_sub(matched.map_or(0, |l| l.index)) <= NEAR_LAG)
    })
}

impl Cluster {
    /// Gives groups back to their preferred leaders, every [`EVERY`], until `stop`.
    pub async fn run_balance(self: Arc<Self>, stop: CancellationToken) {
        let mut up_since: HashMap<u64, Instant> = HashMap::new();
        let mut ticks = Ticks::new(EVERY, stop);
        while ticks.next().await {
            let now = Instant::now();
            for id in &self.groups().voter_ids() {
                if self.peers().is_up(*id) {
                    up_since.entry(*id).or_insert(now);
                } else {
                    up_since.remove(id);
                }
            }
            let settled = |node: u64| {
                up_since
                    .get(&node)
                    .is_some_and(|since| now.duration_since(*since) >= SETTLE)
            };
            if self.meta_leader() == Some(self.node_id()) {
                self.even_out_one_preference().await;
            }
            let mut moved = 0;
            for (group, raft) in self.groups().rafts() {
                if moved >= MOVES_PER_ROUND || ticks.stopped() {
                    break;
                }
                let Some(preferred) = self.preferred_leader(group) else {
                    continue;
                };
                if preferred == self.node_id()
                    || !self.leads(&raft)
                    || !settled(preferred)
                    || !nearly_caught_up(&raft, preferred)
                {
                    continue;
                }
                moved += 1;
                match self.hand_off(group, preferred).await {
                    Ok(leader) => tracing::info!(group, leader, "gave leadership back"),
                    Err(error) => {
                        tracing::debug!(group, preferred, %error, "giving leadership back failed")
                    }
                }
            }
        }
    }

    /// On the metadata leader: moves the preference of one queue whose preferred leader
    /// is preferred for two or more queues of its kind more than another of its replicas
    /// ([`uneven_preference`]; queues being moved to other replicas are left out), and
    /// waits until the metadata group applied it.
    async fn even_out_one_preference(&self) {
        // Queues on the move (their replicas are not yet placement's) are left to the move.
        let queues: Vec<(String, QueueGroup)> = self
            .groups()
            .queue_groups()
            .into_iter()
            .filter(|(queue, group)| self.groups().placed(queue) == group.replicas)
            .collect();
        let eligible = self.groups().eligible();
        let Some(placed) = uneven_preference(&queues, &eligible) else {
            return;
        };
        let (queue, replicas) = (placed.queue.clone(), placed.replicas.clone());
        // Bounded, so that a metadata group without a quorum does not hold up the
        // hand-backs of this round; the next round looks again.
        let recorded = tokio::time::timeout(RECORD_WAIT, self.execute(Command::Placed(placed), 0));
        match recorded.await.map(|reply| reply.result) {
            Ok(Ok(_)) => tracing::info!(
                queue,
                ?replicas,
                "moved a queue's preferred leader to even out the nodes"
            ),
            Ok(Err(error)) => {
                tracing::debug!(queue, error = %error.message, "moving a queue's preferred leader failed")
            }
            Err(_) => tracing::debug!(
                queue,
                "moving a queue's preferred leader: no answer in time"
            ),
        }
    }
}

/// The first queue (by name) whose preferred leader is preferred for at least two more
/// queues of its kind ([`group_kind`](super::groups::group_kind), as in placement) than another of its
/// replicas, with that replica (the least preferred one, the earliest on a tie) moved
/// first; `None` when the preferences are as even as the replicas allow. Only `eligible`
/// nodes count and take preferences.
pub fn uneven_preference(queues: &[(String, QueueGroup)], eligible: &[u64]) -> Option<Placed> {
    let led = [0, 1].map(|kind| preferences(queues.iter().map(|(_, g)| g), kind));
    let count = |kind: usize, node: u64| led[kind].get(&node).copied().unwrap_or(0);
    let mut sorted: Vec<&(String, QueueGroup)> = queues.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.into_iter().find_map(|(queue, group)| {
        let kind = group.kind();
        let preferred = *group.replicas.first()?;
        let (rank, lighter) = group
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, node)| eligible.contains(node))
            .min_by_key(|(rank, node)| (count(kind, **node), *rank))?;
        if count(kind, *lighter) + 2 > count(kind, preferred) {
            return None;
        }
        let mut replicas = group.replicas.clone();
        let node = replicas.remove(rank);
        replicas.insert(0, node);
        Some(Placed {
            queue: queue.clone(),
            group: group.id,
            replicas,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(name: &str, id: u64, replicas: &[u64]) -> (String, QueueGroup) {
        (
            name.to_string(),
            QueueGroup {
                partitions: 1,
                id,
                replicas: replicas.to_vec(),
            },
        )
    }

    /// Preferences 2/2/0 (the two queues of node 3 deleted) move one queue to node 3, the
    /// first by name that node 3 replicates; 2/1/1 is left alone, and so are dead-letter
    /// queues counted against queues, or a node that is leaving.
    #[test]
    fn a_node_preferred_two_more_times_gives_one_queue_away() {
        let nodes = [1, 2, 3];
        let queues = vec![
            queue("a", 2, &[1, 2, 3]),
            queue("b", 4, &[1, 3, 2]),
            queue("c", 6, &[2, 1, 3]),
            queue("d", 8, &[2, 3, 1]),
        ];
        let placed = uneven_preference(&queues, &nodes).expect("uneven");
        assert_eq!(placed.queue, "a");
        assert_eq!(placed.group, 2);
        assert_eq!(placed.replicas, [3, 1, 2]);
        // After it: 1/2/1, even enough.
        let mut after = queues.clone();
        after[0] = queue("a", 2, &[3, 1, 2]);
        assert_eq!(uneven_preference(&after, &nodes), None);
        // Dead-letter queues are a kind of their own: two queues on nodes 1 and 2 and two
        // dead-letter queues on nodes 1 and 2 are as even as each kind gets (counted
        // together, nodes 1 and 2 would have two each and node 3 none).
        let kinds = vec![
            queue("a", 2, &[1, 2, 3]),
            queue("a.dlq", 3, &[1, 3, 2]),
            queue("b", 4, &[2, 1, 3]),
            queue("b.dlq", 5, &[2, 3, 1]),
        ];
        assert_eq!(uneven_preference(&kinds, &nodes), None);
        // Node 3 is leaving: it takes no preference.
        assert_eq!(uneven_preference(&queues, &[1, 2]), None);
        // A queue whose replicas are all loaded alike stays: 2 on node 1, 0 on node 3,
        // but no queue of node 1 is replicated on node 3.
        let narrow = vec![
            queue("a", 2, &[1, 2]),
            queue("b", 4, &[1, 2]),
            queue("c", 6, &[2, 1]),
            queue("d", 8, &[2, 1]),
        ];
        assert_eq!(uneven_preference(&narrow, &nodes), None);
    }

    proptest::proptest! {
        /// Moving one preference at a time, as the metadata leader does, ends (each move
        /// lowers the sum of squared counts) with no node of the replicas preferred two
        /// more times than another replica of one of its queues.
        #[test]
        fn moving_one_preference_at_a_time_ends_even(
            firsts in proptest::collection::vec(1u64..4, 1..30),
        ) {
            let nodes = [1, 2, 3];
            let mut queues: Vec<(String, QueueGroup)> = firsts
                .iter()
                .enumerate()
                .map(|(i, first)| {
                    let mut replicas = vec![*first];
                    replicas.extend(nodes.iter().filter(|n| *n != first));
                    queue(&format!("q{i:02}"), 2 * (i as u64 + 1), &replicas)
                })
                .collect();
            let mut moves = 0;
            while let Some(placed) = uneven_preference(&queues, &nodes) {
                let slot = queues.iter_mut().find(|(q, _)| *q == placed.queue).unwrap();
                slot.1.replicas = placed.replicas;
                moves += 1;
                proptest::prop_assert!(moves <= firsts.len() * firsts.len());
            }
            let mut led = [0usize; 4];
            for (_, group) in &queues {
                led[group.replicas[0] as usize] += 1;
            }
            let (most, least) = (led[1..].iter().max().unwrap(), led[1..].iter().min().unwrap());
            proptest::prop_assert!(most - least <= 1, "{:?}", led);
        }
    }
}
