//! Membership: nodes join and leave the running cluster.
//!
//! The cluster's voters are the metadata group's Raft membership. openraft stores it as
//! entries of the metadata log, so it survives the restart of any node (`--peers` is only
//! the first set), and every node applies it in log order: [`super::groups`] places a
//! queue over the voters as of the entry that created it, the same on every node and at
//! every replay.
//!
//! - Adding node N (`POST /cluster/nodes`, `qit cluster add-node`, or N itself when it is
//!   started with `--join`): the metadata leader adds N as a learner, waits until N holds
//!   the metadata log, then makes it a voter (openraft's joint consensus). A node that does
//!   not catch up within [`CATCH_UP_WAIT`] is removed again: no learner is left behind.
//! - Removing node N (`DELETE /cluster/nodes/{id}`, `qit cluster remove-node`): refused
//!   when fewer than [`MIN_VOTERS`] voters would be left. Else N is marked as leaving (an
//!   entry of the metadata log): placement leaves it out, and every queue group on it moves
//!   to the next node by rendezvous ([`super::moves`]); once N holds no replica, the leader
//!   removes it from the metadata group in one change (a leader that removes itself steps
//!   down once the change is committed). When the moves take longer than [`MOVE_WAIT`],
//!   the request answers 503 and the moves go on; asking again finishes the removal.
//! - After a node joined, the same moves give it its share: the queues whose best
//!   replicas now include it move a replica onto it.
//! - Replacing node O by a new node N (`--replaces O` on N, with a new id): N joins as
//!   above and, once it votes, asks for O's removal (so the voters never drop below
//!   [`MIN_VOTERS`], and O may be dead): O's groups move off it, onto N where placement
//!   says so, and O leaves the membership. This replaces a node for good (a new host); a
//!   node that lost its data may also come back under its old id, catching up before it
//!   votes (see [`super::rejoin`] and [`super::catch_up`]).
//! - Replacing node O by node N from an operator's shell (`POST /cluster/nodes/{O}/replace`,
//!   `qit cluster replace-node O N=HOST:PORT`, N running with `--join`): the same two
//!   steps, run by the metadata leader in one request: N is added (learner, caught up,
//!   voter; a no-op when N joined by itself already), then O is removed as above.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::{BasicNode, ChangeMembers};
use tokio_util::sync::CancellationToken;

use super::Cluster;
use super::groups::REPLICAS;
use super::types::{Change, Command, Membership};
use crate::broker::BrokerError;
use crate::broker::replicate::OpResult;

/// How long a joining node may take to catch up with the metadata log.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(60);
/// Fewest voters a removal may leave (a queue has up to this many replicas).
pub const MIN_VOTERS: usize = REPLICAS;
/// How long removing a node waits for its queue groups to move off it.
pub const MOVE_WAIT: Duration = Duration::from_secs(90);
/// The longest a membership change may take (a forwarded one waits this long too): a
/// replacement adds a node and then removes one.
pub const LONGEST_CHANGE: Duration =
    Duration::from_secs(CATCH_UP_WAIT.as_secs() + MOVE_WAIT.as_secs() + 30);
/// How often a node started with `--join` asks again to be added.
const JOIN_RETRY: Duration = Duration::from_secs(1);

/// Why a membership change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The node is not a member.
    #[error("node {0} is not a member of the cluster")]
    NotMember(u64),
    /// The id is a member already, at another address.
    #[error(
        "node {id} is a member already, at {addr}: remove it first, or add the new node under a new id"
    )]
    Taken {
        /// The node id.
        id: u64,
        /// Its address in the membership.
        addr: String,
    },
    /// Another member has the address (a call to either would reach the one process, which
    /// would then count twice in a quorum).
    #[error(
        "{addr} is the address of member {other}: node {id} needs another cluster address (port) while node {other} is a member"
    )]
    AddressTaken {
        /// The node being added.
        id: u64,
        /// The address.
        addr: String,
        /// The member that has it.
        other: u64,
    },
    /// Too few voters would be left.
    #[error(
        "removing node {id} would leave {left} voters; the cluster keeps at least {MIN_VOTERS}"
    )]
    TooFew {
        /// The node id.
        id: u64,
        /// Voters that would be left.
        left: usize,
    },
    /// The node's queue groups did not all move off it in time (they go on moving).
    #[error(
        "node {id} still holds replicas of {queues:?} after {MOVE_WAIT:?}: they go on moving off it; run remove-node again"
    )]
    StillMoving {
        /// The node id.
        id: u64,
        /// The queues it holds.
        queues: Vec<String>,
    },
    /// The new node did not catch up in time; it was removed again.
    #[error(
        "node {id} did not catch up with the metadata log within {CATCH_UP_WAIT:?} (is it running, with the same --cluster-secret?): not added"
    )]
    CatchUp {
        /// The node id.
        id: u64,
    },
    /// openraft could not change the membership now (no leader, another change under way).
    #[error("membership change failed: {0}")]
    Raft(String),
}

impl From<MembershipError> for BrokerError {
    fn from(error: MembershipError) -> Self {
        let code = match &error {
            MembershipError::Invalid(_) => "bad_request",
            MembershipError::NotMember(_) => "node_not_found",
            MembershipError::Taken { .. }
            | MembershipError::AddressTaken { .. }
            | MembershipError::TooFew { .. } => "membership_conflict",
            MembershipError::CatchUp { .. }
            | MembershipError::StillMoving { .. }
            | MembershipError::Raft(_) => {
                return BrokerError::NoLeader(error.to_string());
            }
        };
        BrokerError::Remote {
            code: code.to_string(),
            message: error.to_string(),
        }
    }
}

fn raft_error(error: impl std::fmt::Display) -> MembershipError {
    MembershipError::Raft(error.to_string())
}

/// Checks a `HOST:PORT`.
fn check_address(cluster: &str) -> Result<(), MembershipError> {
    match cluster.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(MembershipError::Invalid(format!(
            "`{cluster}` is not HOST:PORT"
        ))),
    }
}

impl Cluster {
    /// Runs `change` here, the metadata group's leader.
    pub(super) async fn change_members(
        &self,
        change: Change,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        let _one_at_a_time = self.membership_changes.lock().await;
        let done = match change {
            Change::Add { id, cluster } => self.add_node(id, &cluster).await,
            Change::Remove { id } => self.remove_node(id).await,
            Change::Replace { old, id, cluster } => self.replace_node(old, id, &cluster).await,
        };
        done.map(|()| (OpResult::Done, None))
            .map_err(BrokerError::from)
    }

    /// The metadata group's membership as this node knows it.
    pub(super) fn meta_membership(&self) -> Membership {
        self.meta()
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .clone()
    }

    /// True once this node votes in the metadata group.
    pub fn is_voter(&self) -> bool {
        self.meta_membership()
            .voter_ids()
            .any(|v| v == self.node_id())
    }

    async fn add_node(&self, id: u64, cluster: &str) -> Result<(), MembershipError> {
        if id == 0 {
            return Err(MembershipError::Invalid("node ids start at 1".into()));
        }
        check_address(cluster)?;
        let membership = self.meta_membership();
        if let Some(node) = membership.get_node(&id)
            && node.addr != cluster
        {
            return Err(MembershipError::Taken {
                id,
                addr: node.addr.clone(),
            });
        }
        if let Some((other, _)) = membership
            .nodes()
            .find(|(other, node)| **other != id && node.addr == cluster)
        {
            return Err(MembershipError::AddressTaken {
                id,
                addr: cluster.to_string(),
                other: *other,
            });
        }
        let voter = membership.voter_ids().any(|v| v == id);
        if voter && membership.get_joint_config().len() == 1 {
            return Ok(());
        }
        let meta = self.meta();
        super::ensure_lease(meta).await.map_err(raft_error)?;
        if !voter {
            let added = meta
                .add_learner(id, BasicNode::new(cluster), false)
                .await
                .map_err(raft_error)?;
            let at = added.log_id.index;
            let caught_up = meta
                .wait(Some(CATCH_UP_WAIT))
                .metrics(
                    |m| {
                        m.replication.as_ref().is_some_and(|r| {
                            r.get(&id)
                                .is_some_and(|matched| matched.is_some_and(|l| l.index >= at))
                        })
                    },
                    "the new node to catch up",
                )
                .await;
            if caught_up.is_err() {
                let undo = meta
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                    .await;
                if let Err(error) = undo {
                    tracing::warn!(node = id, %error, "removing a learner that did not catch up failed");
                }
                return Err(MembershipError::CatchUp { id });
            }
        }
        super::ensure_lease(meta).await.map_err(raft_error)?;
        meta.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(raft_error)?;
        tracing::info!(node = id, cluster, "node added to the cluster");
        Ok(())
    }

    async fn remove_node(&self, id: u64) -> Result<(), MembershipError> {
        let membership = self.meta_membership();
        if membership.get_node(&id).is_none() {
            return Err(MembershipError::NotMember(id));
        }
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let voter = voters.contains(&id);
        if voter && voters.len() - 1 < MIN_VOTERS {
            return Err(MembershipError::TooFew {
                id,
                left: voters.len() - 1,
            });
        }
        if voter {
            self.drain(id).await?;
        }
        let change = if voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        super::ensure_lease(self.meta()).await.map_err(raft_error)?;
        self.meta()
            .change_membership(change, false)
            .await
            .map_err(raft_error)?;
        tracing::info!(node = id, "node removed from the cluster");
        Ok(())
    }

    /// Replaces node `old` by node `id` at `cluster`: adds the new node as a voter
    /// ([`Self::add_node`]: harmless when it joined by itself), then removes `old`
    /// ([`Self::remove_node`]: its groups move off it, by rendezvous onto the new node where
    /// it ranks). Asking again after `old` left with `id` a voter at `cluster` is harmless.
    async fn replace_node(&self, old: u64, id: u64, cluster: &str) -> Result<(), MembershipError> {
        if old == id {
            return Err(MembershipError::Invalid(format!(
                "node {old} cannot replace itself: the new node needs a new id"
            )));
        }
        check_address(cluster)?;
        let membership = self.meta_membership();
        if membership.get_node(&old).is_none() {
            let done = membership.voter_ids().any(|v| v == id)
                && membership.get_node(&id).is_some_and(|n| n.addr == cluster);
            return if done {
                Ok(())
            } else {
                Err(MembershipError::NotMember(old))
            };
        }
        self.add_node(id, cluster).await?;
        tracing::info!(
            old,
            node = id,
            "replacing node {old} by node {id}: node {id} votes"
        );
        self.remove_node(old).await?;
        tracing::info!(old, node = id, "node {old} replaced by node {id}");
        Ok(())
    }

    /// The queues with a replica on `node`.
    fn queues_on(&self, node: u64) -> Vec<String> {
        self.groups()
            .queue_groups()
            .into_iter()
            .filter(|(_, g)| g.replicas.contains(&node))
            .map(|(name, _)| name)
            .collect()
    }

    /// Marks `node` as leaving (placement leaves it out, so its groups' leaders move them,
    /// see [`super::moves`]) and waits until it holds no queue replica. The mark is an
    /// entry of the metadata log also when the node holds nothing: every queue created
    /// after it, until the node is removed, is placed on the others (a queue made in the
    /// moment between finding the node empty and removing it would land on it).
    async fn drain(&self, node: u64) -> Result<(), MembershipError> {
        if !self.groups().draining().contains(&node) {
            super::propose_entry(self.meta(), super::META_GROUP, Command::Draining(node))
                .await
                .map_err(raft_error)?;
        }
        let deadline = tokio::time::Instant::now() + MOVE_WAIT;
        loop {
            let queues = self.queues_on(node);
            if queues.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(MembershipError::StillMoving { id: node, queues });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A node started with `--join`: asks the other nodes, in turn, to add it, until it
    /// votes in the metadata group (at once when it did so before a restart) or `stop`.
    pub async fn join(self: Arc<Self>, stop: CancellationToken) {
        let me = self.node_id();
        let Some(cluster) = self.config.peers.get(&me).cloned() else {
            return;
        };
        let change = Command::Members(Change::Add { id: me, cluster });
        loop {
            if self.is_voter() {
                return;
            }
            for peer in self.peers().ids() {
                match self.forward_call(peer, &change, 0, None).await {
                    Ok(_) => {
                        tracing::info!(through = peer, "joined the cluster");
                        return;
                    }
                    Err(super::Forwarding::Moved(why)) => {
                        tracing::debug!(peer, %why, "asking to join")
                    }
                    Err(super::Forwarding::Failed(error)) => {
                        tracing::warn!(peer, %error, "asking to join")
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(JOIN_RETRY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

impl Cluster {
    /// A node started with `--replaces old`, once it votes: asks the metadata leader to
    /// remove `old` (its queue groups move off it, by rendezvous mostly onto this node)
    /// until `old` is no member any more, or `stop`. A removal that runs past
    /// [`MOVE_WAIT`], or meets no leader, is asked again: every step is safe to repeat.
    pub async fn replace(&self, old: u64, stop: CancellationToken) {
        let change = Command::Members(Change::Remove { id: old });
        loop {
            if self.meta_membership().get_node(&old).is_none() && self.is_voter() {
                tracing::info!(node = old, "the replaced node is no member");
                return;
            }
            let reply = self.execute(change.clone(), 0).await;
            match reply.result {
                Ok(_) => {
                    tracing::info!(node = old, "replaced node removed from the cluster");
                    return;
                }
                Err(error) if error.code == "node_not_found" => {
                    tracing::info!(node = old, "the replaced node is no member");
                    return;
                }
                Err(error) => {
                    tracing::warn!(node = old, code = %error.code, "removing the replaced node: {}; asking again", error.message)
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(JOIN_RETRY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        assert!(check_address("127.0.0.1:7104").is_ok());
        assert!(check_address("node-4.example:7104").is_ok());
        assert!(check_address("127.0.0.1").is_err());
        assert!(check_address(":7104").is_err());
        assert!(check_address("host:port").is_err());
    }

    /// Refusals travel as 409/404 codes, a change that cannot be made now as 503.
    #[test]
    fn errors_map_to_api_codes() {
        let code = |e: MembershipError| BrokerError::from(e).code().to_string();
        assert_eq!(
            code(MembershipError::TooFew { id: 1, left: 2 }),
            "membership_conflict"
        );
        assert_eq!(code(MembershipError::NotMember(9)), "node_not_found");
        let taken = MembershipError::AddressTaken {
            id: 5,
            addr: "127.0.0.1:7101".into(),
            other: 1,
        };
        assert_eq!(code(taken), "membership_conflict");
        assert_eq!(code(MembershipError::Raft("x".into())), "no_leader");
    }
}
