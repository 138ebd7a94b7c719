//! Liveness of the groups' leaders, for every group of a node at once.
//!
//! openraft's own heartbeats and election timers run per group: with a hundred queues that
//! is a hundred heartbeat streams per node, most of the idle cost of a cluster. Here they
//! are off (see `raft_config` in [`super::groups`]) and one loop per node does their work,
//! as multi-raft systems do (CockroachDB's and TiKV's coalesced heartbeats):
//!
//! - Every [`BEAT_EVERY`] a node sends each peer one signed [`Beat`]: the groups it leads,
//!   with their term and applied index, and the groups it asks the peer to send it a
//!   heartbeat for.
//! - A follower whose group leader stopped claiming the group (no beat from that node for
//!   [`SLOW_WAIT`] plus a share per rank and a random share), or whose leader's node
//!   refuses connections ([`REFUSALS`] sends in a row, nothing heard since: the process is
//!   gone), calls openraft's `elect()` for that group. Replicas take turns by their place
//!   in the group's placement (the preferred leader first), so one usually runs alone.
//! - A group with no leader at all (a failed election, a fresh start) elects after
//!   [`LEADERLESS_WAIT`] and its shares, again in placement order.
//! - openraft still sends the committed index after every commit; a beat carries the
//!   leader's applied index too, so a follower that stays behind it (a commit message lost
//!   to a restart) asks for a heartbeat, and a node that hears a peer claim a group in an
//!   older term than its own leadership sends that peer a heartbeat, so a deposed leader
//!   (paused, then resumed) steps down at once.
//!
//! Only *when* an election starts changes: votes, terms, log matching and commit are
//! openraft's, untouched. A node that was itself paused (its loop ran late by more than
//! [`STALL`]) starts every wait again instead of electing on stale silence.
//!
//! [`Detector`] is the decision logic, pure (time is passed in); the loop and the beat
//! handler around it are at the end of this file.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::ServerState;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Cluster;
use super::groups::META_GROUP;
use super::placement;
use super::types::{decode, encode};

/// How often a node sends its beat to each peer.
pub const BEAT_EVERY: Duration = Duration::from_millis(100);
/// Deadline of one beat call.
pub const BEAT_DEADLINE: Duration = Duration::from_millis(500);
/// A loop turn later than this after the previous one means this node was paused or
/// starved: every wait starts again.
pub const STALL: Duration = Duration::from_millis(400);
/// Silence of a live-looking leader before the first replica in turn elects.
pub const SLOW_WAIT: Duration = Duration::from_millis(1_000);
/// Added per rank to [`SLOW_WAIT`].
pub const SLOW_STAGGER: Duration = Duration::from_millis(500);
/// Largest random share added to [`SLOW_WAIT`].
pub const SLOW_JITTER: Duration = Duration::from_millis(300);
/// Refused beats in a row (and nothing heard since) that make a node count as gone.
pub const REFUSALS: u32 = 2;
/// Added per rank after a leader's node counts as gone.
pub const GONE_STAGGER: Duration = Duration::from_millis(250);
/// Largest random share added after a leader's node counts as gone.
pub const GONE_JITTER: Duration = Duration::from_millis(50);
/// How long a group without any leader waits before the first replica in turn elects
/// (also the retry of a failed election).
pub const LEADERLESS_WAIT: Duration = Duration::from_millis(300);
/// Added per rank to [`LEADERLESS_WAIT`].
pub const LEADERLESS_STAGGER: Duration = Duration::from_millis(150);
/// Largest random share added to [`LEADERLESS_WAIT`]. Wide on purpose: a replica whose
/// log is shorter cannot win, yet its candidacy takes the others' votes in its term; if it
/// always went first (by rank) it would block the group for ever, so after a failed
/// election chance, more than rank, decides who tries next.
pub const LEADERLESS_JITTER: Duration = Duration::from_millis(900);
/// How long a follower stays behind its leader's applied index, without progress, before
/// it asks for a heartbeat (also the least time between two asks for one group).
pub const ASK_AFTER: Duration = Duration::from_millis(500);

/// A group the sender of a beat leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Led {
    /// The group.
    pub group: u64,
    /// The term the sender leads it in.
    pub term: u64,
    /// The sender's last applied index in it.
    pub applied: Option<u64>,
}

/// What a node tells each peer every [`BEAT_EVERY`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// The groups the sender leads.
    pub leads: Vec<Led>,
    /// Groups whose leader (the receiver) should send the sender a heartbeat.
    pub asks: Vec<u64>,
}

/// One local group as the loop sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// The group.
    pub group: u64,
    /// Its replicas, preferred leader first.
    pub replicas: Vec<u64>,
    /// This node votes in it (an uninitialized group has no voters yet).
    pub voter: bool,
    /// This node leads it.
    pub leading: bool,
    /// The leader this node knows of.
    pub leader: Option<u64>,
    /// This node's term in it.
    pub term: u64,
    /// This node's last applied index in it.
    pub applied: Option<u64>,
}

/// What the loop should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start an election of this group here.
    Elect(u64),
    /// Ask `node`, the group's leader, for a heartbeat.
    Ask {
        /// The leader.
        node: u64,
        /// The group.
        group: u64,
    },
}

/// How a beat to a peer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The peer answered.
    Delivered,
    /// The peer's address refused the call (no process listens there).
    Refused,
    /// Anything else (deadline, a broken answer): says nothing about the peer.
    Failed,
}

/// The newest claim of a group's leadership another node sent.
#[derive(Debug, Clone, Copy)]
struct Claim {
    node: u64,
    term: u64,
    applied: Option<u64>,
    at: Instant,
}

/// What this node knows about one group's leadership.
#[derive(Debug, Clone)]
struct Watch {
    /// `(leader, term)` as the local metrics last showed them.
    seen: Option<(Option<u64>, u64)>,
    /// When `seen` last changed (or the wait last started again).
    since: Instant,
    /// This wait's random share, in `[0, 1)`.
    share: f64,
    claim: Option<Claim>,
    /// This node's applied index while behind the leader's, and since when it stands.
    behind: Option<(Option<u64>, Instant)>,
    /// When this node last asked the leader for a heartbeat.
    asked: Option<Instant>,
}

/// What this node knows about one peer.
#[derive(Debug, Clone, Copy, Default)]
struct PeerWatch {
    refusals: u32,
    /// When the peer reached [`REFUSALS`] refusals (it counts as gone since).
    gone_since: Option<Instant>,
}

/// The election and heartbeat decisions of one node (no I/O, no clock of its own).
pub struct Detector {
    node: u64,
    groups: HashMap<u64, Watch>,
    peers: HashMap<u64, PeerWatch>,
    last_turn: Option<Instant>,
    draw: fn() -> f64,
}

fn scaled(d: Duration, share: f64) -> Duration {
    d.mul_f64(share.clamp(0.0, 1.0))
}

fn times(d: Duration, n: usize) -> Duration {
    d * u32::try_from(n).unwrap_or(u32::MAX)
}

impl Detector {
    /// The detector of `node`; `draw` gives the random shares, in `[0, 1)`.
    pub fn new(node: u64, draw: fn() -> f64) -> Self {
        Self {
            node,
            groups: HashMap::new(),
            peers: HashMap::new(),
            last_turn: None,
            draw,
        }
    }

    fn watch(&mut self, group: u64, now: Instant) -> &mut Watch {
        let draw = self.draw;
        self.groups.entry(group).or_insert_with(|| Watch {
            seen: None,
            since: now,
            share: draw(),
            claim: None,
            behind: None,
            asked: None,
        })
    }

    /// When `node` started to count as gone, if it does.
    fn gone(&self, node: u64) -> Option<Instant> {
        self.peers.get(&node).and_then(|p| p.gone_since)
    }

    /// A beat arrived from `from`.
    pub fn received(&mut self, from: u64, beat: &Beat, now: Instant) {
        self.peers.insert(from, PeerWatch::default());
        for led in &beat.leads {
            let watch = self.watch(led.group, now);
            if watch.claim.is_none_or(|c| led.term >= c.term) {
                watch.claim = Some(Claim {
                    node: from,
                    term: led.term,
                    applied: led.applied,
                    at: now,
                });
            }
        }
    }

    /// A beat to `to` went as `sent`.
    pub fn sent(&mut self, to: u64, sent: Sent, now: Instant) {
        let peer = self.peers.entry(to).or_default();
        match sent {
            Sent::Delivered => *peer = PeerWatch::default(),
            Sent::Refused => {
                peer.refusals = peer.refusals.saturating_add(1);
                if peer.refusals >= REFUSALS && peer.gone_since.is_none() {
                    peer.gone_since = Some(now);
                }
            }
            Sent::Failed => {}
        }
    }

    /// This node's place among `replicas` that may elect: placement order, without
    /// `except` (the leader in question) and without nodes that count as gone.
    fn rank(&self, replicas: &[u64], except: Option<u64>) -> usize {
        replicas
            .iter()
            .filter(|r| Some(**r) != except && (**r == self.node || self.gone(**r).is_none()))
            .position(|r| *r == self.node)
            .unwrap_or(replicas.len())
    }

    /// One turn of the loop at `now` over this node's groups: what to do.
    pub fn turn(&mut self, now: Instant, locals: &[Local]) -> Vec<Action> {
        let stalled = self
            .last_turn
            .is_some_and(|t| now.saturating_duration_since(t) > STALL);
        self.last_turn = Some(now);
        if stalled {
            // Silence measured across our own pause says nothing about the others.
            self.peers.clear();
        }
        let open: HashSet<u64> = locals.iter().map(|l| l.group).collect();
        self.groups.retain(|g, _| open.contains(g));
        let mut actions = Vec::new();
        for local in locals {
            if !local.voter || local.leading {
                self.groups.remove(&local.group);
                continue;
            }
            let draw = self.draw;
            let watch = self.watch(local.group, now);
            let seen = Some((local.leader, local.term));
            if stalled || watch.seen != seen {
                watch.seen = seen;
                watch.since = now;
                watch.share = draw();
                watch.behind = None;
            }
            let action = match local.leader {
                Some(leader) if leader != self.node => self.follow(local, leader, now),
                _ => self.leaderless(local, now),
            };
            if let Some(action) = action {
                if let Action::Elect(_) = action
                    && let Some(watch) = self.groups.get_mut(&local.group)
                {
                    watch.since = now;
                    watch.share = draw();
                }
                actions.push(action);
            }
        }
        actions
    }

    /// A group whose leader is `leader`, another node.
    fn follow(&mut self, local: &Local, leader: u64, now: Instant) -> Option<Action> {
        let rank = self.rank(&local.replicas, Some(leader));
        let gone = self.gone(leader);
        let watch = self.groups.get_mut(&local.group)?;
        let claim = watch
            .claim
            .filter(|c| c.node == leader && c.term >= local.term);
        if let Some(gone) = gone {
            let at = gone.max(watch.since)
                + times(GONE_STAGGER, rank)
                + scaled(GONE_JITTER, watch.share);
            return (now >= at).then_some(Action::Elect(local.group));
        }
        let last = claim.map_or(watch.since, |c| c.at.max(watch.since));
        let wait = SLOW_WAIT + times(SLOW_STAGGER, rank) + scaled(SLOW_JITTER, watch.share);
        if now.saturating_duration_since(last) >= wait {
            return Some(Action::Elect(local.group));
        }
        // Behind the leader's applied index with no progress: the commit may have been
        // lost on the way (openraft sends it once); ask for a heartbeat.
        let claim = claim?;
        if claim.applied <= local.applied {
            watch.behind = None;
            return None;
        }
        match watch.behind {
            Some((applied, since)) if applied == local.applied => {
                if now.saturating_duration_since(since) >= ASK_AFTER {
                    watch.behind = Some((local.applied, now));
                    return Some(Action::Ask {
                        node: leader,
                        group: local.group,
                    });
                }
                None
            }
            _ => {
                watch.behind = Some((local.applied, now));
                None
            }
        }
    }

    /// A group without a leader this node knows of.
    fn leaderless(&mut self, local: &Local, now: Instant) -> Option<Action> {
        let rank = self.rank(&local.replicas, None);
        let peers = &self.peers;
        let node = self.node;
        let watch = self.groups.get_mut(&local.group)?;
        // A live node claims the group in this term or a later one: it leads and has only
        // not told this node yet (an idle group sends nothing); ask it to.
        if let Some(claim) = watch.claim
            && claim.node != node
            && claim.term >= local.term
            && now.saturating_duration_since(claim.at) < SLOW_WAIT
            && peers
                .get(&claim.node)
                .is_none_or(|p| p.gone_since.is_none())
        {
            if watch
                .asked
                .is_none_or(|t| now.saturating_duration_since(t) >= ASK_AFTER)
            {
                watch.asked = Some(now);
                return Some(Action::Ask {
                    node: claim.node,
                    group: local.group,
                });
            }
            return None;
        }
        let wait = LEADERLESS_WAIT
            + times(LEADERLESS_STAGGER, rank)
            + scaled(LEADERLESS_JITTER, watch.share);
        (now.saturating_duration_since(watch.since) >= wait).then_some(Action::Elect(local.group))
    }
}

/// The loop's state: the detector and which peers have a beat under way.
pub struct Liveness {
    node: u64,
    detector: Mutex<Detector>,
    /// Per voter: a beat to it is under way (voters come and go with membership changes).
    sending: Mutex<HashMap<u64, Arc<AtomicBool>>>,
}

impl Liveness {
    /// The liveness of `node` among `peers`.
    pub fn new(node: u64, peers: impl IntoIterator<Item = u64>) -> Self {
        Self {
            node,
            detector: Mutex::new(Detector::new(node, rand::random::<f64>)),
            sending: Mutex::new(
                peers
                    .into_iter()
                    .filter(|p| *p != node)
                    .map(|p| (p, Arc::default()))
                    .collect(),
            ),
        }
    }

    /// The voters other than this node, with their under-way flags (kept to `voters`).
    fn targets(&self, voters: &[u64]) -> Vec<(u64, Arc<AtomicBool>)> {
        let mut sending = self.sending.lock();
        sending.retain(|p, _| voters.contains(p));
        voters
            .iter()
            .filter(|p| **p != self.node)
            .map(|p| (*p, Arc::clone(sending.entry(*p).or_default())))
            .collect()
    }
}

impl Cluster {
    /// Every open group as the loop sees it.
    fn locals(&self) -> Vec<Local> {
        let me = self.node_id();
        let voters: Vec<u64> = self.groups().voter_ids();
        let mut replicas: HashMap<u64, Vec<u64>> = self
            .groups()
            .queue_groups()
            .into_iter()
            .map(|(_, g)| (g.id, g.replicas))
            .collect();
        replicas.insert(META_GROUP, placement::replicas("", &voters, voters.len()));
        self.groups()
            .rafts()
            .into_iter()
            .map(|(group, raft)| {
                let m = raft.metrics();
                let m = m.borrow();
                Local {
                    group,
                    replicas: replicas.remove(&group).unwrap_or_else(|| voters.clone()),
                    voter: m
                        .membership_config
                        .membership()
                        .voter_ids()
                        .any(|v| v == me),
                    leading: m.state == ServerState::Leader,
                    leader: m.current_leader,
                    term: m.current_term,
                    applied: m.last_applied.map(|l| l.index),
                }
            })
            .collect()
    }

    /// Sends beats and starts elections until `stop` (run in the background).
    pub async fn run_liveness(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(BEAT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            let locals = self.locals();
            let leads: Vec<Led> = locals
                .iter()
                .filter(|l| l.leading)
                .map(|l| Led {
                    group: l.group,
                    term: l.term,
                    applied: l.applied,
                })
                .collect();
            let actions = self.liveness.detector.lock().turn(Instant::now(), &locals);
            let mut asks: HashMap<u64, Vec<u64>> = HashMap::new();
            for action in actions {
                match action {
                    Action::Elect(group) => self.elect(group).await,
                    Action::Ask { node, group } => asks.entry(node).or_default().push(group),
                }
            }
            for (peer, busy) in self.liveness.targets(&self.groups().voter_ids()) {
                let beat = Beat {
                    leads: leads.clone(),
                    asks: asks.remove(&peer).unwrap_or_default(),
                };
                self.send_beat(peer, busy, &beat);
            }
        }
    }

    async fn elect(&self, group: u64) {
        let Some(raft) = self.groups().raft(group) else {
            return;
        };
        tracing::info!(
            group,
            "no word from the group's leader: starting an election"
        );
        if let Err(error) = raft.trigger().elect().await {
            tracing::warn!(group, %error, "cannot start an election");
        }
    }

    /// Sends `beat` to `peer` in the background, unless the previous one is under way.
    fn send_beat(self: &Arc<Self>, peer: u64, busy: Arc<AtomicBool>, beat: &Beat) {
        if busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let body = match encode(beat) {
            Ok(body) => body,
            Err(error) => {
                busy.store(false, Ordering::Release);
                tracing::error!(%error, "cannot encode a beat");
                return;
            }
        };
        let cluster = Arc::clone(self);
        tokio::spawn(async move {
            let sent = match cluster.peers().beat(peer, body, BEAT_DEADLINE).await {
                Ok(()) => Sent::Delivered,
                Err(status) if status.code() == tonic::Code::Unavailable => Sent::Refused,
                Err(_) => Sent::Failed,
            };
            cluster
                .liveness
                .detector
                .lock()
                .sent(peer, sent, Instant::now());
            busy.store(false, Ordering::Release);
        });
    }

    /// A beat from `from` (its proof already checked): noted, and heartbeats sent where it
    /// asks for them or where it claims a group this node leads in a newer term.
    pub async fn beat_received(&self, from: u64, body: &[u8]) -> Result<(), String> {
        let beat: Beat = decode(body).map_err(|e| e.to_string())?;
        self.liveness
            .detector
            .lock()
            .received(from, &beat, Instant::now());
        let stale = beat.leads.iter().map(|l| (l.group, Some(l.term)));
        let asked = beat.asks.iter().map(|g| (*g, None));
        for (group, their_term) in stale.chain(asked) {
            let Some(raft) = self.groups().raft(group) else {
                continue;
            };
            let (leading, term) = {
                let m = raft.metrics();
                let m = m.borrow();
                (m.state == ServerState::Leader, m.current_term)
            };
            if leading
                && their_term.is_none_or(|t| t < term)
                && let Err(error) = raft.trigger().heartbeat().await
            {
                tracing::debug!(group, %error, "cannot send a heartbeat");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ME: u64 = 2;

    fn half() -> f64 {
        0.5
    }

    fn local(group: u64, leader: Option<u64>, term: u64) -> Local {
        Local {
            group,
            replicas: vec![1, 2, 3],
            voter: true,
            leading: leader == Some(ME),
            leader,
            term,
            applied: Some(5),
        }
    }

    fn beat(group: u64, term: u64, applied: u64) -> Beat {
        Beat {
            leads: vec![Led {
                group,
                term,
                applied: Some(applied),
            }],
            asks: vec![],
        }
    }

    /// Runs turns every `BEAT_EVERY` from `start` for `span`, with node 1 beating (or not)
    /// each turn; the first turn that elects, as time since `start`.
    fn first_election(
        d: &mut Detector,
        start: Instant,
        span: Duration,
        locals: &[Local],
        mut each: impl FnMut(&mut Detector, Instant),
    ) -> Option<Duration> {
        let mut now = start;
        while now <= start + span {
            each(d, now);
            if d.turn(now, locals)
                .iter()
                .any(|a| matches!(a, Action::Elect(_)))
            {
                return Some(now - start);
            }
            now += BEAT_EVERY;
        }
        None
    }

    #[test]
    fn a_leader_that_beats_is_never_replaced() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        let locals = [local(7, Some(1), 3)];
        let elected = first_election(&mut d, start, Duration::from_secs(30), &locals, |d, now| {
            d.received(1, &beat(7, 3, 5), now);
            d.sent(1, Sent::Delivered, now);
        });
        assert_eq!(elected, None);
    }

    #[test]
    fn a_silent_leader_is_replaced_after_the_slow_wait() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        d.received(1, &beat(7, 3, 5), start);
        let locals = [local(7, Some(1), 3)];
        let elected = first_election(&mut d, start, Duration::from_secs(30), &locals, |_, _| {})
            .expect("elects");
        // Node 2 is first after the leader (1) in placement order: rank 0.
        assert!(elected >= SLOW_WAIT, "{elected:?}");
        assert!(
            elected <= SLOW_WAIT + SLOW_JITTER + BEAT_EVERY,
            "{elected:?}"
        );
    }

    #[test]
    fn a_gone_leader_is_replaced_at_once_by_the_first_in_turn() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        d.received(1, &beat(7, 3, 5), start);
        let locals = [local(7, Some(1), 3)];
        let elected = first_election(&mut d, start, Duration::from_secs(30), &locals, |d, now| {
            d.sent(1, Sent::Refused, now);
        })
        .expect("elects");
        assert!(elected < SLOW_WAIT / 2, "{elected:?}");
    }

    #[test]
    fn the_second_in_turn_waits_longer() {
        let start = Instant::now();
        let mut locals = [local(7, Some(1), 3)];
        // Placement [3, 1, 2]: with 1 leading, node 3 is first in turn and node 2 second.
        locals[0].replicas = vec![3, 1, 2];
        let mut second = Detector::new(ME, half);
        second.received(1, &beat(7, 3, 5), start);
        let slow = first_election(
            &mut second,
            start,
            Duration::from_secs(30),
            &locals,
            |_, _| {},
        )
        .expect("elects");
        assert!(slow >= SLOW_WAIT + SLOW_STAGGER, "{slow:?}");
    }

    #[test]
    fn refusals_do_not_count_while_the_peer_still_beats() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        let locals = [local(7, Some(1), 3)];
        let elected = first_election(&mut d, start, Duration::from_secs(10), &locals, |d, now| {
            d.sent(1, Sent::Refused, now);
            d.received(1, &beat(7, 3, 5), now);
        });
        assert_eq!(elected, None);
    }

    #[test]
    fn a_pause_of_this_node_starts_the_waits_again() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        d.received(1, &beat(7, 3, 5), start);
        let locals = [local(7, Some(1), 3)];
        assert!(d.turn(start, &locals).is_empty());
        // This node slept for 10 s: nothing heard meanwhile, but no election either.
        let woke = start + Duration::from_secs(10);
        assert!(d.turn(woke, &locals).is_empty());
        d.received(1, &beat(7, 3, 5), woke + BEAT_EVERY);
        assert!(d.turn(woke + BEAT_EVERY, &locals).is_empty());
    }

    #[test]
    fn a_stale_claim_does_not_keep_a_leader_alive() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        d.received(3, &beat(7, 4, 5), start);
        // Node 1 still claims term 3 (it was paused and is deposed); node 3 leads term 4
        // and then falls silent: node 2 must elect.
        let locals = [local(7, Some(3), 4)];
        let elected = first_election(&mut d, start, Duration::from_secs(30), &locals, |d, now| {
            d.received(1, &beat(7, 3, 5), now);
        });
        assert!(elected.is_some());
    }

    #[test]
    fn a_follower_behind_its_leader_asks_for_a_heartbeat() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        let locals = [local(7, Some(1), 3)];
        let mut asked = None;
        let mut now = start;
        while now < start + Duration::from_secs(5) && asked.is_none() {
            d.received(1, &beat(7, 3, 9), now);
            asked = d
                .turn(now, &locals)
                .into_iter()
                .find(|a| matches!(a, Action::Ask { .. }));
            now += BEAT_EVERY;
        }
        assert_eq!(asked, Some(Action::Ask { node: 1, group: 7 }));
    }

    #[test]
    fn a_leaderless_group_asks_the_node_that_claims_it() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        let locals = [local(7, None, 3)];
        d.received(3, &beat(7, 3, 5), start);
        assert_eq!(
            d.turn(start, &locals),
            vec![Action::Ask { node: 3, group: 7 }]
        );
    }

    #[test]
    fn a_leaderless_group_elects_in_placement_order() {
        let start = Instant::now();
        let locals = [local(7, None, 3)];
        let mut d = Detector::new(ME, half);
        let second = first_election(&mut d, start, Duration::from_secs(10), &locals, |_, _| {})
            .expect("elects");
        // Node 2 is second among [1, 2, 3].
        assert!(second >= LEADERLESS_WAIT + LEADERLESS_STAGGER, "{second:?}");
        // With node 1 gone, node 2 is first: it goes earlier for the same random share.
        let mut d = Detector::new(ME, half);
        let first = first_election(&mut d, start, Duration::from_secs(10), &locals, |d, now| {
            d.sent(1, Sent::Refused, now);
        })
        .expect("elects");
        assert!(first < second, "{first:?} {second:?}");
    }

    #[test]
    fn the_leader_and_non_voters_never_elect() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        let mut outsider = local(8, None, 1);
        outsider.voter = false;
        let locals = [local(7, Some(ME), 3), outsider];
        let elected = first_election(&mut d, start, Duration::from_secs(30), &locals, |_, _| {});
        assert_eq!(elected, None);
    }

    proptest! {
        /// Beats survive the codec; garbage is an error, never a panic.
        #[test]
        fn beats_round_trip(
            leads in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<Option<u64>>()), 0..50),
            asks in proptest::collection::vec(any::<u64>(), 0..20),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let beat = Beat {
                leads: leads.into_iter().map(|(group, term, applied)| Led { group, term, applied }).collect(),
                asks,
            };
            let back: Beat = decode(&encode(&beat).unwrap()).unwrap();
            prop_assert_eq!(back, beat);
            let _ = decode::<Beat>(&garbage);
        }
    }
}
