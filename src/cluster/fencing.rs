//! Fenced nodes: the nodes the metadata group's leader found down, recorded in the
//! metadata ([`Command::Fenced`] entries, the `fenced` list of its snapshot) so that every
//! node works from the same list, as Kafka's controller fences the brokers that stop
//! heartbeating. The Kafka adapter chooses a consumer group's coordinator among the nodes
//! that are not fenced (see `kafka::brokers`): chosen from each node's own view of who is
//! up, two nodes would name different coordinators for a moment whenever their views
//! differ (a busy machine misses a beat), and both would list the group.
//!
//! Only the metadata leader fences and unfences, after a node has been down (or back up)
//! for a while, never itself: a node found down for [`FENCE_AFTER`] is fenced, a fenced one
//! up again for [`UNFENCE_AFTER`] is unfenced.
//!
//! [`Command::Fenced`]: super::types::Command::Fenced

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use crate::clock::Ticks;

use super::Cluster;
use super::types::{Command, Fencing};

/// How long a node is down before the metadata leader fences it.
pub const FENCE_AFTER: Duration = Duration::from_secs(1);
/// How long a fenced node is up again before the metadata leader unfences it.
pub const UNFENCE_AFTER: Duration = Duration::from_secs(1);
/// How often the metadata leader looks.
const EVERY: Duration = Duration::from_millis(250);

/// The fenced nodes, as the metadata recorded them.
#[derive(Debug, Default)]
pub struct Fenced(RwLock<BTreeSet<u64>>);

impl Fenced {
    /// Applies one committed change.
    pub fn set(&self, change: Fencing) {
        let mut fenced = self.0.write();
        if change.fenced {
            fenced.insert(change.node);
        } else {
            fenced.remove(&change.node);
        }
    }

    /// True when `node` is fenced.
    pub fn contains(&self, node: u64) -> bool {
        self.0.read().contains(&node)
    }

    /// Every fenced node.
    pub fn all(&self) -> Vec<u64> {
        self.0.read().iter().copied().collect()
    }

    /// Replaces the whole list (installing a metadata snapshot).
    pub fn replace(&self, nodes: &[u64]) {
        *self.0.write() = nodes.iter().copied().collect();
    }
}

/// Since when each node has been seen up or down without a break (the metadata leader's
/// record, restarted whenever this node takes the lead).
#[derive(Debug, Default)]
pub struct Watch {
    since: HashMap<u64, (bool, Instant)>,
}

impl Watch {
    /// The changes to propose at `now`, given each voter's liveness as seen here (`up`,
    /// this node included and always up) and the recorded fenced nodes. A node down for
    /// [`FENCE_AFTER`] is fenced, a fenced node up for [`UNFENCE_AFTER`] is unfenced, and
    /// a fenced node that is no voter any more is unfenced (it left).
    pub fn changes(&mut self, now: Instant, up: &[(u64, bool)], fenced: &[u64]) -> Vec<Fencing> {
        self.since.retain(|id, _| up.iter().any(|(v, _)| v == id));
        let mut changes = Vec::new();
        for &(node, is_up) in up {
            let entry = self.since.entry(node).or_insert((is_up, now));
            if entry.0 != is_up {
                *entry = (is_up, now);
            }
            let lasted = now.duration_since(entry.1);
            let is_fenced = fenced.contains(&node);
            if !is_up && !is_fenced && lasted >= FENCE_AFTER {
                changes.push(Fencing { node, fenced: true });
            } else if is_up && is_fenced && lasted >= UNFENCE_AFTER {
                changes.push(Fencing {
                    node,
                    fenced: false,
                });
            }
        }
        changes.extend(
            fenced
                .iter()
                .filter(|node| !up.iter().any(|(v, _)| v == *node))
                .map(|&node| Fencing {
                    node,
                    fenced: false,
                }),
        );
        changes
    }
}

impl Cluster {
    /// On the metadata group's leader, fences the voters that are down and unfences those
    /// back up (see the module doc), every [`EVERY`], until `stop`.
    pub async fn run_fencing(self: Arc<Self>, stop: CancellationToken) {
        let mut watch: Option<Watch> = None;
        let mut ticks = Ticks::new(EVERY, stop);
        while ticks.next().await {
            if !self.leads(self.meta()) {
                watch = None;
                continue;
            }
            let me = self.node_id();
            let up: Vec<(u64, bool)> = self
                .groups()
                .voter_ids()
                .into_iter()
                .map(|id| (id, id == me || self.peers().is_up(id)))
                .collect();
            let fenced = self.groups().fenced.all();
            let changes =
                watch
                    .get_or_insert_with(Watch::default)
                    .changes(Instant::now(), &up, &fenced);
            for change in changes {
                let reply = self.execute(Command::Fenced(change.clone()), 0).await;
                match reply.result {
                    Ok(_) => tracing::info!(
                        node = change.node,
                        fenced = change.fenced,
                        "fencing changed"
                    ),
                    Err(error) => {
                        tracing::debug!(node = change.node, ?error, "fencing not changed")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(node: u64) -> Fencing {
        Fencing { node, fenced: true }
    }

    fn unfence(node: u64) -> Fencing {
        Fencing {
            node,
            fenced: false,
        }
    }

    #[test]
    fn a_node_is_fenced_once_down_long_enough_and_unfenced_once_back_as_long() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut watch = Watch::default();
        let none: [u64; 0] = [];
        let all_up = [(1, true), (2, true), (3, true)];
        let two_down = [(1, true), (2, false), (3, true)];
        assert!(watch.changes(at(0), &all_up, &none).is_empty());
        // A short miss (a busy machine) fences nobody.
        assert!(watch.changes(at(100), &two_down, &none).is_empty());
        assert!(watch.changes(at(600), &all_up, &none).is_empty());
        assert!(watch.changes(at(700), &two_down, &none).is_empty());
        assert!(watch.changes(at(1_600), &two_down, &none).is_empty());
        assert_eq!(watch.changes(at(1_700), &two_down, &none), [fence(2)]);
        let fenced = [2];
        assert!(watch.changes(at(1_800), &two_down, &fenced).is_empty());
        // Back up: unfenced after as long again, not before.
        assert!(watch.changes(at(2_000), &all_up, &fenced).is_empty());
        assert!(watch.changes(at(2_900), &all_up, &fenced).is_empty());
        assert_eq!(watch.changes(at(3_000), &all_up, &fenced), [unfence(2)]);
    }

    #[test]
    fn a_fenced_node_that_left_is_unfenced() {
        let now = Instant::now();
        let mut watch = Watch::default();
        let fenced = [4];
        assert_eq!(
            watch.changes(now, &[(1, true), (2, true)], &fenced),
            [unfence(4)]
        );
    }

    #[test]
    fn the_recorded_list_follows_the_changes_and_a_snapshot() {
        let fenced = Fenced::default();
        fenced.set(fence(2));
        fenced.set(fence(3));
        fenced.set(unfence(2));
        assert_eq!(fenced.all(), [3]);
        assert!(fenced.contains(3) && !fenced.contains(2));
        fenced.replace(&[1, 2]);
        assert_eq!(fenced.all(), [1, 2]);
    }
}
