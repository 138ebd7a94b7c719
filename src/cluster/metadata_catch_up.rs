//! A node serves from a view of the metadata it has confirmed lately. Its metadata replica
//! learns every change, but one made while the node was down, paused (SIGSTOP) or cut off
//! reaches it only over the next moments, from the metadata leader: a metadata change is
//! answered once every node that is *up* applied it (see `Cluster::spread_metadata`), and
//! a node silent for [`UP_WITHIN_MS`] is not up. Served from the view of before, a publish
//! through an exchange is routed by the bindings of before (201 with nothing routed for a
//! binding made meanwhile: the message is lost), and a queue made meanwhile is not found.
//!
//! So a node confirms its view: it asks the metadata leader for its read index
//! ([`Command::MetaReadIndex`]: the leader confirms that it leads and answers the index it
//! applied) and waits until its own replica has applied that much. A confirmation holds
//! for [`FRESH_FOR`], shorter than [`UP_WITHIN_MS`]: a node that missed a change answered
//! without it was silent for longer than that, so its confirmation has lapsed. A
//! background task renews it every [`RENEW_EVERY`]; a request that finds it lapsed (the
//! first ones after a start or a pause) waits for one confirmation, at most
//! [`LEADER_WAIT`], and one at a time asks the leader (which has as long to answer).
//! Where no confirmation can be had (no metadata leader, or a paused one), requests wait
//! for none for [`FRESH_FOR`] after a failed one and are served from what the node has, as
//! the read fallback is. `/healthz` answers 503 `catching_up` until the node's first
//! confirmation after its start.
//!
//! A leader of an older release does not know the question (it answers that the call is
//! undecodable): the node then takes the commit index the leader's heartbeats carry
//! instead.
//!
//! [`UP_WITHIN_MS`]: super::network::UP_WITHIN_MS

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use openraft::async_runtime::watch::WatchReceiver;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerError;
use crate::broker::replicate::OpResult;

use super::types::Command;
use super::{Cluster, LEADER_WAIT, MAX_HOPS, META_GROUP, confirm_read, no_leader, running};

/// How long a confirmed view of the metadata holds (and how long requests go unconfirmed
/// after a failed confirmation). Below `UP_WITHIN_MS` (3 s), see the module docs.
pub const FRESH_FOR: Duration = Duration::from_millis(1_000);
/// How often the background task confirms the view.
const RENEW_EVERY: Duration = Duration::from_millis(400);
/// How soon it tries again before its first confirmation.
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// A node's confirmations of its metadata view.
#[derive(Default)]
pub struct CaughtUp {
    /// Set at the first confirmation after the start.
    first: AtomicBool,
    /// When the last confirmation was asked for, and when the last failed one failed.
    times: Mutex<Times>,
    /// One confirmation at a time: requests that find the view lapsed wait on it.
    asking: tokio::sync::Mutex<()>,
}

#[derive(Default, Clone, Copy)]
struct Times {
    confirmed: Option<Instant>,
    failed: Option<Instant>,
}

impl CaughtUp {
    /// True once confirmed after the start.
    pub fn get(&self) -> bool {
        self.first.load(Ordering::Relaxed)
    }

    /// True while a request needs no confirmation: one asked for within [`FRESH_FOR`]
    /// holds, or one failed within it (none to be had).
    fn settled(&self, now: Instant) -> bool {
        let times = *self.times.lock();
        let within = |at: Option<Instant>| at.is_some_and(|at| now.duration_since(at) < FRESH_FOR);
        within(times.confirmed) || within(times.failed)
    }

    /// Whether the last confirmation asked for at `since` or later succeeded (`None`: none
    /// was asked for since).
    fn answered_since(&self, since: Instant) -> Option<bool> {
        let times = *self.times.lock();
        let after = |at: Option<Instant>| at.filter(|&at| at >= since);
        match (after(times.confirmed), after(times.failed)) {
            (Some(confirmed), Some(failed)) => Some(confirmed >= failed),
            (confirmed, failed) => confirmed.map(|_| true).or(failed.map(|_| false)),
        }
    }

    /// Notes a confirmation asked for at `asked`.
    fn confirmed(&self, asked: Instant) {
        self.times.lock().confirmed = Some(asked);
        self.first.store(true, Ordering::Relaxed);
    }

    /// Notes a confirmation that failed at `at` (when the failure was known: requests go
    /// unconfirmed for [`FRESH_FOR`] from then).
    fn failed(&self, at: Instant) {
        self.times.lock().failed = Some(at);
    }
}

impl Cluster {
    /// True once this node has confirmed its metadata view after its start (see the module
    /// docs).
    pub fn metadata_caught_up(&self) -> bool {
        self.caught_up.get()
    }

    /// Waits until this node's metadata view is confirmed (see the module docs), at most
    /// [`LEADER_WAIT`]: a request runs after this, on a fresh view unless the metadata
    /// has no leader to confirm it.
    pub async fn metadata_ready(&self) {
        if self.caught_up.settled(Instant::now()) {
            return;
        }
        // Boxed: the forwarding under it is deep, and every request's future holds this
        // one (a release build overflowed the compiler's query depth in the gRPC layer).
        let confirm: BoxFuture<'_, bool> = Box::pin(self.confirm_metadata());
        let _ = tokio::time::timeout(LEADER_WAIT, confirm).await;
    }

    /// Confirms this node's metadata view now and then (see the module docs), until
    /// `stop`.
    pub async fn catch_up_metadata(self: Arc<Self>, stop: CancellationToken) {
        let started = Instant::now();
        loop {
            let first = !self.caught_up.get();
            let confirmed = tokio::select! {
                confirmed = self.confirm_metadata() => confirmed,
                _ = stop.cancelled() => return,
            };
            if first && confirmed {
                tracing::info!(elapsed = ?started.elapsed(), "caught up with the cluster's metadata");
            }
            // Until the first confirmation, soon again: `/healthz` waits for it.
            let next = if self.caught_up.get() {
                RENEW_EVERY
            } else {
                RETRY_FIRST
            };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// One confirmation of the metadata view, or the one under way when it was asked for
    /// (not a second one after it); true if confirmed.
    async fn confirm_metadata(&self) -> bool {
        let wanted = Instant::now();
        let _asking = self.caught_up.asking.lock().await;
        if let Some(confirmed) = self.caught_up.answered_since(wanted) {
            return confirmed;
        }
        let asked = Instant::now();
        let Some(applied) = self.groups.applied(META_GROUP) else {
            self.caught_up.failed(Instant::now());
            return false;
        };
        let asked_leader = tokio::time::timeout(LEADER_WAIT, self.leader_read_index()).await;
        match asked_leader.ok().flatten() {
            Some(index) if applied.wait(index, LEADER_WAIT).await => {
                self.caught_up.confirmed(asked);
                true
            }
            _ => {
                self.caught_up.failed(Instant::now());
                false
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

    #[test]
    fn a_confirmation_or_a_failed_one_holds_for_a_while() {
        let caught_up = CaughtUp::default();
        let start = Instant::now();
        assert!(!caught_up.settled(start), "never confirmed");
        assert!(!caught_up.get());
        caught_up.confirmed(start);
        assert!(caught_up.get());
        assert!(caught_up.settled(start + FRESH_FOR / 2));
        assert!(
            !caught_up.settled(start + FRESH_FOR),
            "lapsed (a pause, say)"
        );
        caught_up.failed(start + FRESH_FOR * 2);
        assert!(caught_up.settled(start + FRESH_FOR * 2));
        assert!(!caught_up.settled(start + FRESH_FOR * 3));
        assert!(caught_up.get(), "the first confirmation stays");
        assert_eq!(
            caught_up.answered_since(start),
            Some(false),
            "the last one failed"
        );
        assert_eq!(caught_up.answered_since(start + FRESH_FOR * 3), None);
        caught_up.confirmed(start + FRESH_FOR * 3);
        assert_eq!(caught_up.answered_since(start), Some(true));
    }
}
