//! Leader balance: placement names a preferred leader for every group (its first replica),
//! and leaders spread over the nodes that way. A node that was down lost its groups to
//! the others; once it is back, has been up for a moment and holds (nearly) the whole log
//! of a group, the group's current leader hands the group back to it
//! ([`Cluster::hand_off`]), a few groups per round so that a returning node is not asked
//! to take everything at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::watch::WatchReceiver;
use tokio_util::sync::CancellationToken;

use crate::clock::Ticks;

use super::Cluster;
use super::state_machine::Raft;

/// How often a node looks for groups to give back.
const EVERY: Duration = Duration::from_secs(1);
/// Most groups one node gives back per round.
const MOVES_PER_ROUND: usize = 4;
/// How long a preferred leader must have been up before it gets groups back.
const SETTLE: Duration = Duration::from_secs(2);
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
}
