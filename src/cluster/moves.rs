//! Moving queue groups to the replicas placement names over the voters.
//!
//! Placement ([`super::placement`]) ranks the voters for every queue; when a node joins or
//! starts leaving ([`super::membership`]), some queues' best nodes (as many as each queue's `replicas`) change. The
//! leader of each such group moves it, one step after the other, each step safe to repeat
//! (a new leader picks the move up where the old one stopped):
//!
//! 1. The metadata group records the union of the old and the new replicas ([`Placed`]):
//!    every new replica opens the group, empty and uninitialized, waiting for the leader.
//! 2. The leader adds each new replica as a learner and waits until it holds the log (it is
//!    sent the entries, or the group's snapshot when the log below it was purged).
//! 3. openraft changes the group's voters to the new replicas (joint consensus): every
//!    entry committed before stays committed, nothing is written twice, and a leader that
//!    is not among them steps down once the change is committed.
//! 4. The metadata group records the new replicas: the old ones close the group and clear
//!    the queue's data, and placement's preferred leader gets the leadership back
//!    ([`super::balance`]).
//!
//! A queue whose further partitions have groups of their own moves them along: once step 1
//! is recorded, the leader of each partition's group takes it through steps 2 and 3, and
//! the queue group's leader records step 4 only when every one of them has the new voters.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::{BasicNode, ChangeMembers};
use tokio_util::sync::CancellationToken;

use crate::clock::Ticks;

use super::Cluster;
use super::groups::QueueGroup;
use super::state_machine::Raft;
use super::types::{Command, Placed};

/// How often a node looks for groups it leads that should move.
const EVERY: Duration = Duration::from_secs(1);
/// How long a new replica may take to catch up before the move is tried again later.
const CATCH_UP_WAIT: Duration = Duration::from_secs(120);

/// The group's voters as its leader knows them (all configs of a joint one).
fn group_voters(raft: &Raft) -> BTreeSet<u64> {
    raft.metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

/// True while the group's membership is a joint one (a change under way).
fn in_joint(raft: &Raft) -> bool {
    raft.metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .get_joint_config()
        .len()
        > 1
}

impl Cluster {
    /// Moves the groups this node leads to their placement, every [`EVERY`], until `stop`.
    pub async fn run_moves(self: Arc<Self>, stop: CancellationToken) {
        let mut ticks = Ticks::new(EVERY, stop);
        while ticks.next().await {
            for (queue, group) in self.groups().queue_groups() {
                if ticks.stopped() {
                    return;
                }
                self.move_partitions(&queue, &group).await;
                let Some(raft) = self.groups().raft(group.id) else {
                    continue;
                };
                if !self.leads(&raft) {
                    continue;
                }
                let wanted = self.groups().placed(&queue);
                let voters = group_voters(&raft);
                let settled = wanted.iter().copied().collect::<BTreeSet<u64>>() == voters
                    && !in_joint(&raft)
                    && group.replicas == wanted;
                // A node that is down (fenced) could not catch up: the move waits for it.
                let waiting = wanted.iter().any(|n| self.groups().fenced.contains(*n));
                if settled || wanted.is_empty() || waiting {
                    continue;
                }
                match self.move_group(&queue, &group, &raft, &wanted).await {
                    Ok(()) => {
                        tracing::info!(queue, group = group.id, replicas = ?wanted, "queue group moved")
                    }
                    Err(error) => {
                        tracing::warn!(queue, group = group.id, %error, "moving a queue group: will try again")
                    }
                }
            }
        }
    }

    /// Takes the groups of `queue`'s further partitions that this node leads to the voters
    /// placement wants, once the queue group's move recorded them among its replicas
    /// (steps 2 and 3 of the module docs).
    async fn move_partitions(&self, queue: &str, group: &QueueGroup) {
        for (partition, id) in group.members().skip(1) {
            let Some(raft) = self.groups().raft(id) else {
                continue;
            };
            if !self.leads(&raft) {
                continue;
            }
            let wanted = self.groups().placed(queue);
            let settled = wanted.iter().copied().collect::<BTreeSet<u64>>() == group_voters(&raft)
                && !in_joint(&raft);
            let recorded = wanted.iter().all(|n| group.replicas.contains(n));
            let waiting = wanted.iter().any(|n| self.groups().fenced.contains(*n));
            if settled || !recorded || wanted.is_empty() || waiting {
                continue;
            }
            match self.change_voters(&raft, &wanted).await {
                Ok(()) => {
                    tracing::info!(queue, partition, group = id, replicas = ?wanted, "partition group moved")
                }
                Err(error) => {
                    tracing::warn!(queue, partition, group = id, %error, "moving a partition group: will try again")
                }
            }
        }
    }

    /// True when every further partition's group of `group` has exactly `wanted` as its
    /// voters, as this node (one of the queue's replicas) applied it.
    fn partitions_moved(&self, group: &QueueGroup, wanted: &[u64]) -> bool {
        let target: BTreeSet<u64> = wanted.iter().copied().collect();
        group.members().skip(1).all(|(_, id)| {
            self.groups()
                .raft(id)
                .is_some_and(|raft| group_voters(&raft) == target && !in_joint(&raft))
        })
    }

    /// Records `replicas` as `queue`'s in the metadata group.
    async fn record_placement(
        &self,
        queue: &str,
        group: u64,
        replicas: Vec<u64>,
    ) -> Result<(), String> {
        let placed = Placed {
            queue: queue.to_string(),
            group,
            replicas,
        };
        self.execute(Command::Placed(placed), 0)
            .await
            .result
            .map(|_| ())
            .map_err(|e| format!("recording the placement: {}", e.message))
    }

    /// Moves one group, led here, onto `wanted` (see the module docs).
    async fn move_group(
        &self,
        queue: &str,
        group: &QueueGroup,
        raft: &Raft,
        wanted: &[u64],
    ) -> Result<(), String> {
        let voters = group_voters(raft);
        // 1. Every replica, old and new, holds the group.
        let mut union: Vec<u64> = wanted.to_vec();
        union.extend(voters.iter().copied().filter(|v| !wanted.contains(v)));
        let before: Vec<u64> = group
            .replicas
            .iter()
            .copied()
            .filter(|r| !union.contains(r))
            .collect();
        union.extend(before);
        if group.replicas != union {
            self.record_placement(queue, group.id, union).await?;
        }
        self.change_voters(raft, wanted).await?;
        // 4. The old replicas let the group go, once every partition's group moved too.
        if !self.partitions_moved(group, wanted) {
            return Err("the queue's partition groups are still moving".into());
        }
        self.record_placement(queue, group.id, wanted.to_vec())
            .await
    }

    /// Steps 2 and 3 of the module docs for a group led here: the new replicas catch up as
    /// learners, then the voters become `wanted`.
    async fn change_voters(&self, raft: &Raft, wanted: &[u64]) -> Result<(), String> {
        let voters = group_voters(raft);
        let new: Vec<u64> = wanted
            .iter()
            .copied()
            .filter(|n| !voters.contains(n))
            .collect();
        // 2. The new replicas catch up as learners.
        let addresses = self.groups().voters();
        for node in &new {
            let addr = addresses
                .get(node)
                .ok_or_else(|| format!("node {node} is no voter"))?;
            super::ensure_lease(raft).await?;
            let added = raft
                .add_learner(*node, BasicNode::new(addr), false)
                .await
                .map_err(|e| format!("adding node {node} as a learner: {e}"))?;
            let at = added.log_id.index;
            raft.wait(Some(CATCH_UP_WAIT))
                .metrics(
                    |m| {
                        m.replication.as_ref().is_some_and(|r| {
                            r.get(node)
                                .is_some_and(|matched| matched.is_some_and(|l| l.index >= at))
                        })
                    },
                    "the new replica to catch up",
                )
                .await
                .map_err(|e| format!("node {node} did not catch up: {e}"))?;
        }
        // 3. The group's voters become the wanted replicas.
        let target: BTreeSet<u64> = wanted.iter().copied().collect();
        if voters != target || in_joint(raft) {
            super::ensure_lease(raft).await?;
            raft.change_membership(ChangeMembers::ReplaceAllVoters(target), false)
                .await
                .map_err(|e| format!("changing the group's voters: {e}"))?;
        }
        Ok(())
    }
}
