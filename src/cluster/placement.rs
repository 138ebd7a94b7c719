//! Placement by rendezvous (highest random weight) hashing: each node scores a queue by a
//! hash of (queue, node id); the queue's replicas are the best `replicas` nodes and the
//! best of them is its preferred leader. Every node computes the same answer from the same
//! voter list, and a node's loss moves only the queues it held.

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
