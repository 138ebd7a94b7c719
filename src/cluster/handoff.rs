//! Moving a group's leadership to a chosen node without waiting for an election timeout:
//! on a clean stop (SIGTERM) a node hands every group it leads to an up-to-date follower,
//! and [`super::balance`] gives a returning node back the groups it is the preferred
//! leader of.
//!
//! The leader does it over the internal service rather than with openraft's
//! `Trigger::transfer_leader` (new in 0.10, not used here: this hand-off predates it and
//! its tests pin its behaviour): it holds
//! new work of the group back (requests wait, [`Transfers::pause`]), waits until the
//! target's log matches its own, then asks the target over the internal service
//! ([`KIND_ELECT`]) to campaign at once. The target's vote request carries a log as long
//! as the leader's, so the leader grants it and steps down on the higher term; the
//! held-back requests then find the new leader and are forwarded to it. If anything goes
//! wrong the group is released as it was; at worst the target's campaign costs one
//! election, as a leader's death would.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::Cluster;
use super::groups::META_GROUP;
use super::placement;
use super::state_machine::Raft;
use super::types::decode;

pub use super::network::KIND_ELECT;
/// Counter, on the node asked: campaigns started at another node's request.
pub const ELECTIONS_REQUESTED: &str = "qit_cluster_elections_requested_total";
/// Counter, on the leader: groups it handed to another node.
pub const HANDOFFS: &str = "qit_cluster_leader_handoffs_total";

/// Longest a hand-off of one group holds its requests back.
const HOLD_MAX: Duration = Duration::from_secs(3);
/// Longest the target may take to match the leader's log.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);
/// Longest the leader waits to see another leader after asking the target.
const ELECTED_WAIT: Duration = Duration::from_secs(2);
/// Longest a stopping node spends handing its groups off.
pub const STOP_HANDOFF_WAIT: Duration = Duration::from_secs(5);

/// The groups being handed off now; requests for them wait until the move ends.
#[derive(Default)]
pub struct Transfers {
    moving: Mutex<HashSet<u64>>,
    ended: Notify,
    /// Set once this node hands everything off to stop: it takes no group any more.
    stopping: AtomicBool,
}

impl Transfers {
    /// True once this node is handing everything off to stop.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn begin(&self, group: u64) -> bool {
        self.moving.lock().insert(group)
    }

    fn end(&self, group: u64) {
        self.moving.lock().remove(&group);
        self.ended.notify_waiters();
    }

    /// Waits while `group` is being handed off (at most [`HOLD_MAX`]); true if it waited,
    /// so that the caller asks again who leads.
    pub async fn pause(&self, group: u64) -> bool {
        if !self.moving.lock().contains(&group) {
            return false;
        }
        let mut waited = false;
        let deadline = tokio::time::Instant::now() + HOLD_MAX;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.moving.lock().contains(&group) {
                return waited;
            }
            waited = true;
            tokio::select! {
                _ = ended => {}
                _ = tokio::time::sleep_until(deadline) => return true,
            }
        }
    }
}

/// Releases a group held back by a hand-off however the hand-off ends.
struct Held<'a> {
    transfers: &'a Transfers,
    group: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.transfers.end(self.group);
    }
}

/// What a group's leader knows of a follower: its id and the last log index it holds.
fn followers(raft: &Raft) -> Vec<(u64, u64)> {
    let m = raft.metrics();
    let m = m.borrow_watched();
    m.replication
        .as_ref()
        .map(|r| {
            r.iter()
                .map(|(id, matched)| (*id, matched.map_or(0, |l| l.index)))
                .collect()
        })
        .unwrap_or_default()
}

impl Cluster {
    /// The preferred leader of a group (placement's first replica).
    pub fn preferred_leader(&self, group: u64) -> Option<u64> {
        if group == META_GROUP {
            let voters: Vec<u64> = self.groups().voter_ids();
            return placement::replicas("", &voters, voters.len())
                .first()
                .copied();
        }
        self.groups()
            .group_replicas(group)
            .and_then(|replicas| replicas.first().copied())
    }

    /// True while this node leads `raft`.
    pub(super) fn leads(&self, raft: &Raft) -> bool {
        raft.metrics().borrow_watched().current_leader == Some(self.node_id())
    }

    /// The follower to hand `group` to: its preferred leader when that is up and not
    /// behind the others, else the most up-to-date follower that is up.
    fn handoff_target(&self, group: u64, raft: &Raft) -> Option<u64> {
        let up: Vec<(u64, u64)> = followers(raft)
            .into_iter()
            .filter(|(id, _)| *id != self.node_id() && self.peers().is_up(*id))
            .collect();
        let best = up.iter().map(|(_, matched)| *matched).max()?;
        let preferred = self.preferred_leader(group);
        up.iter()
            .find(|(id, matched)| Some(*id) == preferred && *matched == best)
            .or_else(|| up.iter().find(|(_, matched)| *matched == best))
            .map(|(id, _)| *id)
    }

    /// Hands the leadership of `group` to `target`: holds new work of the group back,
    /// waits until `target` holds the whole log, asks it to campaign and waits to see a
    /// new leader. `Ok(leader)` once another node leads.
    pub async fn hand_off(&self, group: u64, target: u64) -> Result<u64, String> {
        let raft = self
            .groups()
            .raft(group)
            .ok_or_else(|| format!("no group {group} here"))?;
        if !self.leads(&raft) {
            return Err(format!("not the leader of group {group}"));
        }
        if !self.transfers.begin(group) {
            return Err(format!("group {group} is being handed off already"));
        }
        let _held = Held {
            transfers: &self.transfers,
            group,
        };
        let me = self.node_id();
        raft.wait(Some(CATCH_UP_WAIT))
            .metrics(
                |m| {
                    let last = m.last_log_index.unwrap_or(0);
                    m.replication.as_ref().is_some_and(|r| {
                        r.get(&target)
                            .is_some_and(|matched| matched.map_or(0, |l| l.index) >= last)
                    })
                },
                "the target holds the whole log",
            )
            .await
            .map_err(|e| format!("node {target} did not catch up: {e}"))?;
        let answer = self
            .peers()
            .raft(target, group, KIND_ELECT, Vec::new(), ELECTED_WAIT)
            .await
            .map_err(|status| format!("node {target}: {}", status.message()))?;
        let campaign: Result<(), String> =
            decode(&answer).map_err(|e| format!("node {target} answered garbage: {e}"))?;
        campaign.map_err(|e| format!("node {target} refused: {e}"))?;
        let m = raft
            .wait(Some(ELECTED_WAIT))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != me),
                "another leader",
            )
            .await
            .map_err(|e| format!("no new leader after asking node {target}: {e}"))?;
        metrics::counter!(HANDOFFS).increment(1);
        Ok(m.current_leader.unwrap_or(target))
    }

    /// Hands every group this node leads to another node (a clean stop), all at once,
    /// within [`STOP_HANDOFF_WAIT`]; a group that does not move in time is left to the
    /// election that follows this node's stop.
    pub async fn hand_off_all(&self) {
        self.transfers.stopping.store(true, Ordering::Release);
        let led: Vec<(u64, u64)> = self
            .groups()
            .rafts()
            .into_iter()
            .filter(|(_, raft)| self.leads(raft))
            .filter_map(|(id, raft)| self.handoff_target(id, &raft).map(|t| (id, t)))
            .collect();
        if led.is_empty() {
            return;
        }
        tracing::info!(groups = led.len(), "handing leadership off before stopping");
        let moves = led.iter().map(|(group, target)| async move {
            let result = self.hand_off(*group, *target).await;
            (*group, *target, result)
        });
        let Ok(results) =
            tokio::time::timeout(STOP_HANDOFF_WAIT, futures_util::future::join_all(moves)).await
        else {
            tracing::warn!("handing leadership off did not finish in time");
            return;
        };
        for (group, target, result) in results {
            match result {
                Ok(leader) => tracing::info!(group, leader, "handed leadership off"),
                Err(error) => tracing::warn!(group, target, %error, "hand-off failed"),
            }
        }
    }
}

impl Cluster {
    /// Serves another node's request to campaign in `group` at once (see the module
    /// docs); refused while this node is stopping.
    pub async fn campaign(&self, raft: &Raft) -> Result<(), String> {
        if self.transfers.is_stopping() {
            return Err(format!("node {} is stopping", self.node_id()));
        }
        metrics::counter!(ELECTIONS_REQUESTED).increment(1);
        raft.trigger().elect(false).await.map_err(|e| e.to_string())
    }
}
