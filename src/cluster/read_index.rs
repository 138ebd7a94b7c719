//! Reads of a split queue's info that see every partition as committed.
//!
//! A queue's info (and a group's) is read at the leader of the queue's group, which holds
//! the leases. Its partition 0 is that group's own log, confirmed by the read itself; each
//! other partition is its own group, led perhaps by another node, and this node may not
//! have applied its last committed entries yet (it learns of a commit with the leader's
//! next message). A publish answered a moment ago would then be missing from the info.
//!
//! So before such a read the node settles each other partition: it confirms it leads the
//! partition's group (and has applied what was committed, openraft's read index), or asks
//! that group's leader for its read index ([`Command::ReadIndex`]) and applies as far.
//! Each partition is settled at once and within [`SETTLE_WAIT`] (asked again, of its next
//! leader, while it is between leaders); a partition whose leader does not answer in time
//! is read as this node has it (the read fallback).

use std::time::Duration;

use tokio::time::Instant;

use openraft::async_runtime::watch::WatchReceiver;

use super::types::Command;
use super::{Cluster, LEADER_WAIT, MAX_HOPS, confirm_read, groups, no_leader, running};
use crate::broker::BrokerError;
use crate::broker::replicate::{Op, OpResult};

/// How long a read waits for one partition to settle before it reads what is here.
pub const SETTLE_WAIT: Duration = Duration::from_secs(1);
/// Pause before a partition between leaders is asked again.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Answered reads of a queue's info that read a partition unsettled (its leader did not
/// answer within [`SETTLE_WAIT`]) (counter).
pub const UNSETTLED_READS: &str = "qit_cluster_unsettled_partition_reads_total";

impl Cluster {
    /// Before `op` is read here, on the leader of `queue`'s group: settles each of the
    /// queue's other partitions when the op reads them (see the module's text).
    pub(super) async fn settle_partitions(&self, op: &Op, queue: &groups::QueueGroup) {
        if queue.partitions <= 1 || !reads_every_partition(op) {
            return;
        }
        let settles = (1..queue.partitions).map(|p| self.settle_group(queue.group_of(p)));
        let settled = futures_util::future::join_all(settles).await;
        if settled.iter().any(|done| !done) {
            metrics::counter!(UNSETTLED_READS).increment(1);
        }
    }

    /// Applies `group` as far as its leader has committed it; false when that could not be
    /// confirmed within [`SETTLE_WAIT`]. A group between leaders (a hand-off, an election)
    /// is asked again, of the leader it has next, until the time is up.
    async fn settle_group(&self, group: u64) -> bool {
        let Some(raft) = self.groups.raft(group).filter(running) else {
            // No replica here (a partition moving): nothing of it is read here.
            return true;
        };
        let deadline = Instant::now() + SETTLE_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let leader = tokio::time::timeout(left, self.leader_of(&raft)).await;
            let settled = match leader {
                Ok(Some(me)) if me == self.node_id() => confirm_read(&raft, left).await.is_ok(),
                Ok(Some(leader)) => self.settle_from(group, leader, deadline).await,
                Ok(None) | Err(_) => false,
            };
            if settled {
                return true;
            }
            tokio::time::sleep(RETRY_PAUSE.min(left)).await;
        }
    }

    /// Asks `leader` for `group`'s read index and applies up to it, by `deadline`.
    async fn settle_from(&self, group: u64, leader: u64, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        let asked = self.forward(leader, Command::ReadIndex(group), 0, None);
        match tokio::time::timeout(left, asked).await {
            Ok(Ok((_, Some((answered, index))))) if answered == group => {
                let left = deadline.saturating_duration_since(Instant::now());
                self.applied_within(group, index, left).await
            }
            _ => false,
        }
    }

    /// Waits up to `limit` until this node applied `group` up to `index`.
    async fn applied_within(&self, group: u64, index: u64, limit: Duration) -> bool {
        match self.groups.applied(group) {
            Some(applied) => applied.wait(index, limit).await,
            None => false,
        }
    }

    /// Answers [`Command::ReadIndex`] of `group`: as its leader, the index it applied once
    /// it confirmed that it leads (every entry committed before is in); elsewhere the
    /// leader's answer, forwarded.
    pub(super) async fn group_read_index(
        &self,
        group: u64,
        hops: u32,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        let Some(raft) = self.groups.raft(group) else {
            return Err(no_leader(format!("group {group} is closed here")));
        };
        let asked = ReadIndexOf {
            group,
            named: &format!("group {group}"),
            ask: Command::ReadIndex(group),
        };
        self.answer_read_index(&raft, asked, hops).await
    }

    /// Answers a request for the read index of `raft`'s group (`asked`): as the group's
    /// leader, the index it applied once it confirmed that it leads (openraft's read index:
    /// every entry committed before is in); elsewhere the leader's answer, forwarded with
    /// the same request. [`Command::MetaReadIndex`] and [`Command::ReadIndex`] both.
    pub(super) async fn answer_read_index(
        &self,
        raft: &super::state_machine::Raft,
        asked: ReadIndexOf<'_>,
        hops: u32,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        let ReadIndexOf { group, named, ask } = asked;
        if !running(raft) {
            return Err(no_leader(format!("{named}: this node's replica stopped")));
        }
        let leader = raft.metrics().borrow_watched().current_leader;
        match leader {
            Some(me) if me == self.node_id() => {
                confirm_read(raft, LEADER_WAIT)
                    .await
                    .map_err(|lost| no_leader(format!("{named}: {}", lost.reason)))?;
                let index = self.groups.applied(group).and_then(|a| a.current());
                Ok((OpResult::Done, Some((group, index.unwrap_or(0)))))
            }
            // `forward` counts the hop.
            Some(leader) if hops < MAX_HOPS => self.forward(leader, ask, hops, None).await,
            _ => Err(no_leader(named)),
        }
    }
}

/// A request for a group's read index, as [`Cluster::answer_read_index`] answers it.
pub(super) struct ReadIndexOf<'a> {
    /// The group.
    pub group: u64,
    /// The group as errors name it.
    pub named: &'a str,
    /// The command that asks its leader.
    pub ask: Command,
}

/// True for a read whose answer shows every partition of its queue (its offsets, or a
/// group's backlog on each).
fn reads_every_partition(op: &Op) -> bool {
    matches!(
        op,
        Op::QueueInfo { .. } | Op::GroupInfo { .. } | Op::GroupOffsets { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_of_the_whole_queue_settle_its_partitions() {
        let info = Op::QueueInfo { queue: "q".into() };
        assert!(reads_every_partition(&info));
        let log = Op::ReadLog {
            queue: "q".into(),
            partition: 1,
            from: crate::broker::ReadFrom::Offset(0),
            max: 1,
        };
        assert!(
            !reads_every_partition(&log),
            "read at its own group's leader"
        );
    }
}
