//! A node that starts catches up with the metadata before it serves. Its metadata replica
//! replays what its own log holds at once, but the bindings, queues, users and grants the
//! cluster committed while the node was down reach it only over the next moments, from the
//! metadata leader. Served from that view, a publish through an exchange is routed by the
//! bindings of before (201 with nothing routed for a binding made meanwhile: the message
//! is lost), and a queue made meanwhile is not found.
//!
//! So a starting node asks the metadata leader for its read index
//! ([`Command::MetaReadIndex`]: the leader confirms that it leads and answers the index it
//! applied) and waits until its own replica has applied that much. Until then `/healthz`
//! answers 503 `catching_up`, and a request waits for it, at most [`LEADER_WAIT`] (then it
//! is served from what the node has: without a metadata quorum, the read fallback serves
//! a replica's own copy). A running node learns every metadata change before it is
//! answered (see `Cluster::spread_metadata`); this covers the one it missed while down.
//!
//! A leader of an older release does not know the question (it answers that the call is
//! undecodable): the node then catches up to the commit index the leader's heartbeats
//! carry instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::watch::WatchReceiver;
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerError;
use crate::broker::replicate::OpResult;

use super::types::Command;
use super::{Cluster, LEADER_WAIT, MAX_HOPS, META_GROUP, confirm_read, no_leader, running};

/// How long a starting node waits before it asks the metadata leader again.
const RETRY: Duration = Duration::from_millis(100);

/// Whether a node has caught up: a flag its requests can wait for.
pub struct CaughtUp(tokio::sync::watch::Sender<bool>);

impl Default for CaughtUp {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(false))
    }
}

impl CaughtUp {
    /// True once caught up.
    pub fn get(&self) -> bool {
        *self.0.borrow()
    }

    /// Marks the node caught up (for good).
    pub fn set(&self) {
        self.0.send_replace(true);
    }

    /// Waits until caught up, at most `limit`; true if it is.
    pub async fn wait(&self, limit: Duration) -> bool {
        let mut caught_up = self.0.subscribe();
        matches!(
            tokio::time::timeout(limit, caught_up.wait_for(|done| *done)).await,
            Ok(Ok(_))
        )
    }
}

impl Cluster {
    /// True once this node has applied the metadata the cluster had committed when it
    /// started (see the module docs).
    pub fn metadata_caught_up(&self) -> bool {
        self.caught_up.get()
    }

    /// Waits until this node has caught up with the metadata, at most [`LEADER_WAIT`]:
    /// a request runs after this, on a fresh view unless the metadata has no quorum.
    pub async fn metadata_ready(&self) {
        if !self.caught_up.get() {
            self.caught_up.wait(LEADER_WAIT).await;
        }
    }

    /// Catches this node up with the metadata (see the module docs); runs in the
    /// background from the start until it has, or until `stop`.
    pub async fn catch_up_metadata(self: Arc<Self>, stop: CancellationToken) {
        let started = Instant::now();
        let Some(applied) = self.groups.applied(META_GROUP) else {
            self.caught_up.set();
            return;
        };
        loop {
            if let Some(index) = self.leader_read_index().await
                && let Some(caught_up) = tokio::select! {
                    caught_up = applied.wait(index, LEADER_WAIT) => Some(caught_up),
                    _ = stop.cancelled() => None,
                }
            {
                if caught_up {
                    tracing::info!(index, elapsed = ?started.elapsed(), "caught up with the cluster's metadata");
                    self.caught_up.set();
                    return;
                }
                // Not applied in time (a snapshot on its way, say): ask again, the leader
                // may have changed meanwhile.
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The metadata leader's read index, asked through [`Command::MetaReadIndex`] (`None`:
    /// no answer now, ask again).
    async fn leader_read_index(&self) -> Option<u64> {
        let reply = self.execute(Command::MetaReadIndex, 0).await;
        match (reply.result, reply.applied) {
            (Ok(_), Some((META_GROUP, index))) => Some(index),
            (Err(error), _) if error.message.contains(super::service::UNDECODABLE) => {
                let metrics = self.meta.metrics();
                let committed = metrics
                    .borrow_watched()
                    .cluster_committed
                    .map(|id| id.index);
                tracing::debug!(
                    ?committed,
                    "an older metadata leader: catching up to the commit index it sent"
                );
                committed
            }
            (result, _) => {
                tracing::debug!(?result, "no metadata read index yet");
                None
            }
        }
    }

    /// Answers [`Command::MetaReadIndex`]: as the metadata leader, the index it applied
    /// once it confirmed that it leads (openraft's read index: every metadata change
    /// answered before is in); elsewhere the leader's answer, forwarded.
    pub(super) async fn meta_read_index(
        &self,
        hops: u32,
    ) -> Result<(OpResult, Option<(u64, u64)>), BrokerError> {
        if !running(&self.meta) {
            return Err(no_leader("this node's metadata replica stopped"));
        }
        match self.meta_leader() {
            Some(leader) if leader == self.node_id() => {
                confirm_read(&self.meta, LEADER_WAIT)
                    .await
                    .map_err(|lost| no_leader(format!("metadata: {}", lost.reason)))?;
                let index = self.groups.applied(META_GROUP).and_then(|a| a.current());
                Ok((OpResult::Done, Some((META_GROUP, index.unwrap_or(0)))))
            }
            Some(leader) if hops < MAX_HOPS => {
                self.forward(leader, Command::MetaReadIndex, hops, None)
                    .await
            }
            _ => Err(no_leader("metadata")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_ends_when_caught_up_or_at_its_limit() {
        let caught_up = Arc::new(CaughtUp::default());
        assert!(!caught_up.get());
        assert!(!caught_up.wait(Duration::from_millis(10)).await);
        let waiter = {
            let caught_up = Arc::clone(&caught_up);
            tokio::spawn(async move { caught_up.wait(Duration::from_secs(60)).await })
        };
        caught_up.set();
        assert!(waiter.await.unwrap());
        assert!(caught_up.get());
        assert!(caught_up.wait(Duration::ZERO).await);
    }
}
