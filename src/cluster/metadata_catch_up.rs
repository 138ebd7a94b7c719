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
//! the read fallback is. But where the leader answered an index that this node has not
//! applied by the end of the wait (a busy machine, much to catch up on after a long
//! absence, or peers that cannot reach it), the node knows its view is behind and serves
//! nothing from it until it applied that much, leader or not: the request is answered
//! [`MetadataBehind`] (HTTP and gRPC: 503 `catching_up`, to be retried).
//! `/healthz` answers 503 `catching_up` until the node's first confirmation after its
//! start.
//!
//! A node that was itself stalled (paused, or its process not run for a while) learns of
//! it from a ticker ([`Cluster::watch_stalls`]): for [`AFTER_STALL`] after one, a
//! confirmation that fails does not count as "no leader to be had" (right after a pause
//! this node may know no leader, or only its deadlines passed, while the others went on
//! without it), and a request that gets no confirmation within its wait is answered
//! [`MetadataBehind`] instead of being served from the view of before the pause.
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
use crate::clock::Ticks;

use super::read_index::ReadIndexOf;
use super::types::Command;
use super::{Cluster, LEADER_WAIT, META_GROUP, running};

/// How long a confirmed view of the metadata holds (and how long requests go unconfirmed
/// after a failed confirmation). Below `UP_WITHIN_MS` (3 s), see the module docs.
pub const FRESH_FOR: Duration = Duration::from_millis(1_000);
/// How often the background task confirms the view.
const RENEW_EVERY: Duration = Duration::from_millis(400);
/// How soon it tries again before its first confirmation.
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// How often the stall ticker runs.
const TICK_EVERY: Duration = Duration::from_millis(100);
/// A gap between ticks longer than this is a stall of this node.
const STALL: Duration = Duration::from_millis(1_000);
/// How long after a stall failed confirmations do not count: `UP_WITHIN_MS` (3 s), the
/// silence after which the others go on without this node, and a second more.
const AFTER_STALL: Duration = Duration::from_millis(4_000);
/// How long a request waits between confirmations while this node recovers from a stall.
const RETRY_AFTER_STALL: Duration = Duration::from_millis(50);

/// A request found this node's metadata view behind the index the metadata leader
/// answered, and not caught up within the wait: it is not served from that view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataBehind;

impl std::fmt::Display for MetadataBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this node is catching up with the cluster's metadata; try again in a moment")
    }
}

/// A node's confirmations of its metadata view.
#[derive(Default)]
pub struct CaughtUp {
    /// Set at the first confirmation after the start.
    first: AtomicBool,
    /// When the last confirmation was asked for, and when the last failed one failed.
    times: Mutex<Times>,
    /// One confirmation at a time: requests that find the view lapsed wait on it.
    asking: tokio::sync::Mutex<()>,
    /// The stall ticker's last tick, and when it last found a stall.
    stalls: Mutex<Stalls>,
}

#[derive(Default, Clone, Copy)]
struct Stalls {
    last: Option<Instant>,
    stalled: Option<Instant>,
}

#[derive(Default, Clone, Copy)]
struct Times {
    confirmed: Option<Instant>,
    failed: Option<Instant>,
    /// The index the metadata leader answered to the latest confirmation that got an
    /// answer, until one is confirmed: below it, the view is known to be behind.
    behind: Option<u64>,
}

impl CaughtUp {
    /// True once confirmed after the start.
    pub fn get(&self) -> bool {
        self.first.load(Ordering::Relaxed)
    }

    /// `Some` while a request needs no new confirmation, with what it is to do: one asked
    /// for within [`FRESH_FOR`] holds (`Ok`); after one that failed within it (none to be
    /// had) the request is served from what the node has, unless that is known to be
    /// behind (`check`). `applied`: the index this node's metadata replica applied (asked
    /// only then).
    fn settled(
        &self,
        now: Instant,
        applied: impl FnOnce() -> Option<u64>,
    ) -> Option<Result<(), MetadataBehind>> {
        let times = *self.times.lock();
        let within = |at: Option<Instant>| at.is_some_and(|at| now.duration_since(at) < FRESH_FOR);
        if within(times.confirmed) {
            Some(Ok(()))
        } else if within(times.failed) {
            Some(self.check(applied()))
        } else {
            None
        }
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
        let mut times = self.times.lock();
        times.confirmed = Some(asked);
        times.behind = None;
        self.first.store(true, Ordering::Relaxed);
    }

    /// Notes a confirmation that failed at `at` for want of a leader's answer (when the
    /// failure was known: requests go unconfirmed for [`FRESH_FOR`] from then). A view
    /// known to be behind stays so: no answer now does not make it current.
    fn failed(&self, at: Instant) {
        self.times.lock().failed = Some(at);
    }

    /// Notes that this node's metadata replica is gone or stopped at `at`: it cannot
    /// catch up, so its view is not held back as behind (requests go unconfirmed, as after
    /// [`failed`](Self::failed)).
    fn cannot_catch_up(&self, at: Instant) {
        let mut times = self.times.lock();
        times.failed = Some(at);
        times.behind = None;
    }

    /// The stall ticker ran at `now`: a gap since its last run longer than [`STALL`] was a
    /// stall of this node.
    fn tick(&self, now: Instant) {
        let mut stalls = self.stalls.lock();
        if stalls
            .last
            .is_some_and(|last| now.duration_since(last) > STALL)
        {
            stalls.stalled = Some(now);
        }
        stalls.last = Some(now);
    }

    /// True while this node recovers from a stall: one found within [`AFTER_STALL`], or
    /// one going on (the ticker has not run for [`STALL`]: the node runs again, and this
    /// runs before the ticker).
    fn stalled_lately(&self, now: Instant) -> bool {
        let stalls = *self.stalls.lock();
        let gap = |at: Option<Instant>, over: Duration| {
            at.is_some_and(|at| now.saturating_duration_since(at) > over)
        };
        gap(stalls.last, STALL)
            || stalls
                .stalled
                .is_some_and(|at| now.saturating_duration_since(at) < AFTER_STALL)
    }

    /// Notes that the metadata leader answered `index`: until this node applied that
    /// much, its view is known to be behind.
    fn must_reach(&self, index: u64) {
        self.times.lock().behind = Some(index);
    }

    /// `Err` while the view is known to be behind: the leader's latest answer is above
    /// `applied`, the index this node's metadata replica applied.
    fn check(&self, applied: Option<u64>) -> Result<(), MetadataBehind> {
        match self.times.lock().behind {
            Some(index) if applied.is_none_or(|applied| applied < index) => Err(MetadataBehind),
            _ => Ok(()),
        }
    }
}

impl Cluster {
    /// True once this node has confirmed its metadata view after its start (see the module
    /// docs).
    pub fn metadata_caught_up(&self) -> bool {
        self.caught_up.get()
    }

    /// Waits until this node's metadata view is confirmed (see the module docs), at most
    /// [`LEADER_WAIT`]: a request runs after `Ok`, on a fresh view unless the metadata
    /// has no leader to confirm it; `Err` when the view is known to be behind still.
    pub async fn metadata_ready(&self) -> Result<(), MetadataBehind> {
        let applied = || self.groups.applied(META_GROUP).and_then(|a| a.current());
        if let Some(settled) = self.caught_up.settled(Instant::now(), applied) {
            return settled;
        }
        // Boxed: the forwarding under it is deep, and every request's future holds this
        // one (a release build overflowed the compiler's query depth in the gRPC layer).
        let confirm: BoxFuture<'_, bool> = Box::pin(self.confirm_after_stall());
        if let Ok(true) = tokio::time::timeout(LEADER_WAIT, confirm).await {
            return Ok(());
        }
        if self.caught_up.stalled_lately(Instant::now()) {
            // The others may have gone on without this node: not served from its view.
            return Err(MetadataBehind);
        }
        self.caught_up.check(applied())
    }

    /// Confirms the metadata view, again and again while this node recovers from a stall
    /// (it learns the leader again within moments; the caller bounds the wait); true if
    /// confirmed.
    async fn confirm_after_stall(&self) -> bool {
        loop {
            if self.confirm_metadata().await {
                return true;
            }
            if !self.caught_up.stalled_lately(Instant::now()) {
                return false;
            }
            tokio::time::sleep(RETRY_AFTER_STALL).await;
        }
    }

    /// Notes every [`TICK_EVERY`] that this node runs, so that a stall of it (a pause, say)
    /// is known (see the module docs), until `stop`.
    pub async fn watch_stalls(self: Arc<Self>, stop: CancellationToken) {
        let mut ticks = Ticks::new(TICK_EVERY, stop);
        while ticks.next().await {
            self.caught_up.tick(Instant::now());
        }
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
        let replica = self.groups.applied(META_GROUP);
        let Some(applied) = replica.filter(|_| running(&self.meta)) else {
            // No replica to catch up with (a stopped one stays so until the node
            // restarts): the node forwards what it can and serves what it has.
            self.caught_up.cannot_catch_up(Instant::now());
            return false;
        };
        let asked_leader = tokio::time::timeout(LEADER_WAIT, self.leader_read_index()).await;
        let Some(index) = asked_leader.ok().flatten() else {
            let now = Instant::now();
            if self.caught_up.stalled_lately(now) {
                // Says nothing of the leader: this node was not running (its deadline
                // passed meanwhile) or does not know the leader again yet.
                tracing::debug!("no metadata confirmation right after a stall of this node");
            } else {
                self.caught_up.failed(now);
            }
            return false;
        };
        // Known behind from now until applied: a request that gives up waiting meanwhile
        // is not served from this view.
        self.caught_up.must_reach(index);
        if applied.wait(index, LEADER_WAIT).await {
            self.caught_up.confirmed(asked);
            true
        } else {
            tracing::debug!(
                index,
                "the metadata is not applied up to the leader's read index yet"
            );
            false
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
        let asked = ReadIndexOf {
            group: META_GROUP,
            named: "metadata",
            ask: Command::MetaReadIndex,
        };
        self.answer_read_index(&self.meta, asked, hops).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_or_a_failed_one_holds_for_a_while() {
        let caught_up = CaughtUp::default();
        let start = Instant::now();
        let settled = |at| caught_up.settled(at, || Some(7)).is_some();
        assert!(!settled(start), "never confirmed");
        assert!(!caught_up.get());
        caught_up.confirmed(start);
        assert!(caught_up.get());
        assert!(settled(start + FRESH_FOR / 2));
        assert!(!settled(start + FRESH_FOR), "lapsed (a pause, say)");
        caught_up.failed(start + FRESH_FOR * 2);
        assert_eq!(
            caught_up.settled(start + FRESH_FOR * 2, || Some(7)),
            Some(Ok(())),
            "no leader to ask: served from what the node has"
        );
        assert!(!settled(start + FRESH_FOR * 3));
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

    #[test]
    fn a_gap_between_ticks_is_a_stall_for_a_while() {
        let caught_up = CaughtUp::default();
        let start = Instant::now();
        assert!(
            !caught_up.stalled_lately(start),
            "never ticked: no stall known"
        );
        caught_up.tick(start);
        caught_up.tick(start + TICK_EVERY);
        assert!(!caught_up.stalled_lately(start + TICK_EVERY * 2));
        // Paused for 3 s: before the ticker runs again, the gap itself tells.
        let resumed = start + TICK_EVERY + Duration::from_secs(3);
        assert!(caught_up.stalled_lately(resumed));
        caught_up.tick(resumed);
        assert!(caught_up.stalled_lately(resumed + TICK_EVERY));
        caught_up.tick(resumed + TICK_EVERY);
        assert!(caught_up.stalled_lately(resumed + AFTER_STALL / 2));
        let mut at = resumed;
        while at < resumed + AFTER_STALL {
            at += TICK_EVERY;
            caught_up.tick(at);
        }
        assert!(!caught_up.stalled_lately(at), "recovered");
        // Late ticks of a busy machine below the threshold are no stall.
        caught_up.tick(at + STALL);
        assert!(!caught_up.stalled_lately(at + STALL));
        let up_within = Duration::from_millis(super::super::network::UP_WITHIN_MS as u64);
        assert!(AFTER_STALL > up_within);
    }

    #[test]
    fn a_view_below_the_leaders_answer_is_known_behind_until_applied() {
        let caught_up = CaughtUp::default();
        let now = Instant::now();
        assert_eq!(caught_up.check(None), Ok(()), "nothing known yet");
        caught_up.must_reach(40);
        assert_eq!(caught_up.check(None), Err(MetadataBehind));
        assert_eq!(caught_up.check(Some(39)), Err(MetadataBehind));
        assert_eq!(caught_up.check(Some(40)), Ok(()));
        assert_eq!(
            caught_up.settled(now, || Some(39)),
            None,
            "a request waits, not served from the view it found behind"
        );
        caught_up.failed(now);
        assert_eq!(
            caught_up.settled(now, || Some(39)),
            Some(Err(MetadataBehind)),
            "no leader answers now: still behind, and known to be"
        );
        assert_eq!(
            caught_up.settled(now, || Some(40)),
            Some(Ok(())),
            "applied since"
        );
        caught_up.cannot_catch_up(now);
        assert_eq!(
            caught_up.settled(now, || Some(39)),
            Some(Ok(())),
            "a stopped replica never catches up: the node serves what it has"
        );
        caught_up.confirmed(now);
        assert_eq!(caught_up.check(Some(39)), Ok(()), "confirmed since");
        caught_up.must_reach(50);
        assert_eq!(
            caught_up.settled(now, || Some(45)),
            Some(Ok(())),
            "a renewal under way does not hold up requests while the last one holds"
        );
    }
}
