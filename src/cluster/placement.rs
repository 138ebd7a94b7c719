//! Placement by rendezvous (highest random weight) hashing: each node scores a queue by a
//! hash of (queue, node id); the queue's replicas are the best `replicas` nodes. Every node
//! computes the same answer from the same voter list, and a node's loss moves only the
//! queues it held.
//!
//! The preferred leader among those replicas is the one that is preferred for the fewest
//! groups already placed ([`lead_balanced`]), the best-scored on a tie: hashing alone
//! spreads leaders only on average (twelve queues came out 7/4/1 over three nodes), while
//! counting gives every node its share from the first queues on. The count is taken from
//! the metadata as of the entry that places the group, so every node picks alike.
//!
//! A new group avoids the nodes the metadata records as fenced (down) where enough others
//! are up ([`replicas_avoiding`]); the group moves to its hashed placement once they are
//! back (see `moves.rs`).

use std::collections::BTreeMap;

/// The replicas of `queue` among `nodes`, preferred leader first: `min(replicas, nodes)`
/// of them.
pub fn replicas(queue: &str, nodes: &[u64], replicas: usize) -> Vec<u64> {
    let mut scored: Vec<(u64, u64)> = nodes
        .iter()
        .map(|id| {
            (
                crate::hash::fnv1a(&[queue.as_bytes(), &id.to_le_bytes()]),
                *id,
            )
        })
        .collect();
    scored.sort_by(|a, b| b.cmp(a));
    scored.dedup_by_key(|(_, id)| *id);
    scored
        .into_iter()
        .take(replicas)
        .map(|(_, id)| id)
        .collect()
}

/// The replicas of a new group of `queue` among `nodes` while those in `down` are down
/// (fenced): as [`replicas`] picks them among the others, then, only to make up the count,
/// among those that are down. The first list is the live ones, the second those that are
/// not; together `min(replicas, nodes)` of them. Kafka places a new topic on live brokers
/// alike: a group placed on a down node would have no leader (a single replica) or less
/// than its count of live replicas until that node returned.
pub fn replicas_avoiding(
    queue: &str,
    nodes: &[u64],
    down: &[u64],
    count: usize,
) -> (Vec<u64>, Vec<u64>) {
    let (live, dead): (Vec<u64>, Vec<u64>) = nodes.iter().partition(|n| !down.contains(n));
    let chosen = replicas(queue, &live, count);
    let missing = count.saturating_sub(chosen.len());
    let filled = replicas(queue, &dead, missing);
    (chosen, filled)
}

/// `replicas` (in [`replicas`]' order) with the one that is already the preferred leader of
/// the fewest groups (`led`: node id -> groups) moved first; on a tie the earliest. The
/// others keep their order.
pub fn lead_balanced(mut replicas: Vec<u64>, led: &BTreeMap<u64, usize>) -> Vec<u64> {
    let fewest = replicas
        .iter()
        .enumerate()
        .min_by_key(|(rank, id)| (led.get(id).copied().unwrap_or(0), *rank))
        .map(|(rank, _)| rank);
    if let Some(rank) = fewest {
        let leader = replicas.remove(rank);
        replicas.insert(0, leader);
    }
    replicas
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Replicas are distinct members, as many as asked (or all), and the same list
        /// in any order gives the same answer.
        #[test]
        fn replicas_are_distinct_members(queue in "[a-z]{1,12}", n in 1u64..7, r in 1usize..4) {
            let nodes: Vec<u64> = (1..=n).collect();
            let chosen = replicas(&queue, &nodes, r);
            prop_assert_eq!(chosen.len(), r.min(nodes.len()));
            let mut sorted = chosen.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), chosen.len());
            let mut reversed = nodes.clone();
            reversed.reverse();
            prop_assert_eq!(replicas(&queue, &reversed, r), chosen);
        }
    }

    proptest! {
        /// A new group's replicas: as many as without nodes down, distinct, none that is
        /// down while enough are up, the same set as [`replicas`] when none is down, and
        /// one that is down only to make up the count.
        #[test]
        fn new_groups_avoid_nodes_that_are_down(
            queue in "[a-z]{1,12}",
            n in 1u64..7,
            r in 1usize..4,
            down in proptest::collection::btree_set(1u64..7, 0..4),
        ) {
            let nodes: Vec<u64> = (1..=n).collect();
            let down: Vec<u64> = down.into_iter().collect();
            let (live, filled) = replicas_avoiding(&queue, &nodes, &down, r);
            let all: Vec<u64> = live.iter().chain(&filled).copied().collect();
            prop_assert_eq!(all.len(), r.min(nodes.len()));
            let mut distinct = all.clone();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), all.len());
            prop_assert!(live.iter().all(|n| !down.contains(n)));
            prop_assert!(filled.iter().all(|n| down.contains(n)));
            let up = nodes.iter().filter(|n| !down.contains(n)).count();
            prop_assert_eq!(live.len(), r.min(up));
            if down.is_empty() {
                prop_assert_eq!(live, replicas(&queue, &nodes, r));
            }
        }
    }

    /// The replica preferred for the fewest groups leads; a tie goes to placement's order,
    /// and the other replicas keep theirs.
    #[test]
    fn the_least_loaded_replica_leads() {
        let led = BTreeMap::from([(1, 2), (2, 1), (3, 1)]);
        assert_eq!(lead_balanced(vec![1, 3, 2], &led), [3, 1, 2]);
        assert_eq!(lead_balanced(vec![1, 2, 3], &led), [2, 1, 3]);
        assert_eq!(lead_balanced(vec![2, 3], &BTreeMap::new()), [2, 3]);
        assert_eq!(
            lead_balanced(vec![1, 2, 3], &BTreeMap::from([(3, 0), (1, 5)])),
            [2, 1, 3]
        );
        assert!(lead_balanced(Vec::new(), &led).is_empty());
    }

    proptest! {
        /// Groups placed on up to three nodes one after the other, each counted as it is
        /// placed, have their preferred leaders spread evenly: no node leads more than one
        /// group more than another.
        #[test]
        fn counted_placement_spreads_leaders_evenly(
            names in proptest::collection::btree_set("[a-z]{1,8}", 1..40),
            n in 1u64..4,
        ) {
            let nodes: Vec<u64> = (1..=n).collect();
            let mut led: BTreeMap<u64, usize> = nodes.iter().map(|id| (*id, 0)).collect();
            for name in &names {
                let placed = lead_balanced(replicas(name, &nodes, 3), &led);
                *led.entry(placed[0]).or_default() += 1;
            }
            let most = led.values().max().copied().unwrap_or(0);
            let least = led.values().min().copied().unwrap_or(0);
            prop_assert!(most - least <= 1, "leaders {:?}", led);
        }
    }

    #[test]
    fn preferred_leaders_spread_over_three_nodes() {
        let nodes = [1, 2, 3];
        let mut firsts = [0usize; 4];
        for i in 0..300 {
            let first = replicas(&format!("queue-{i}"), &nodes, 3)[0];
            firsts[first as usize] += 1;
        }
        for (node, led) in firsts.iter().enumerate().skip(1) {
            assert!(*led > 60, "node {node} leads {led} of 300");
        }
    }
}
