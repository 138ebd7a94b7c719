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
//!   [`LEADERLESS_WAIT`] and its shares, again in placement order; the random share grows
//!   with each election of the group this node started in vain ([`BACKOFF_MAX`]). In a
//!   group that never had a leader, the replicas other than the preferred leader wait
//!   [`FIRST_WAIT`] more, so that the first leaders spread as placement says.
//! - While a group's leadership is in question here (no leader, or its leader's node
//!   refuses beats or fell silent), the beat also carries this node's last log id in it
//!   (a [`LogTip`]). A replica whose log is behind a live peer's never starts an election:
//!   it cannot win one (the peer refuses its vote), and its failed candidacy would still
//!   raise its term above the peer's, so the peer's next candidacy would fail too (a vote
//!   request refused for its log does not move the refusing node's term). That was the
//!   failover stall of a survivor with a shorter log going first in every term. Peers
//!   known to be behind do not count in the turn order either, so the most up-to-date
//!   replica goes first.
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
use openraft::async_runtime::watch::WatchReceiver;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Cluster;
use super::groups::META_GROUP;
use super::placement;
use super::types::{LogId, decode, encode};
use crate::clock::Ticks;

/// How often a node sends its beat to each peer.
///
/// Beats and the loop's turns are most of an idle node's CPU (100 queues x 3 partitions:
/// 3.5-3.7 % of a core at 150 ms against 4.7-5.2 % at 100 ms); a dead leader's node is
/// found gone after [`REFUSALS`] beats, so failover takes about one beat longer (p50
/// 0.51-0.53 s against 0.39 s).
pub const BEAT_EVERY: Duration = Duration::from_millis(150);
/// Deadline of one beat call.
pub const BEAT_DEADLINE: Duration = Duration::from_millis(500);
/// A loop turn later than this after the previous one means this node was paused or
/// starved: every wait starts again.
pub const STALL: Duration = Duration::from_millis(400);
/// Silence of a live-looking leader before the first replica in turn elects.
pub const SLOW_WAIT: Duration = Duration::from_millis(1_000);
/// How long a leader's claim of a group (in its beats) names the leader of a group this
/// node holds no replica of: the wait before the group's own replicas elect.
pub const CLAIM_FRESH: Duration = SLOW_WAIT;
/// Added per rank to [`SLOW_WAIT`].
pub const SLOW_STAGGER: Duration = Duration::from_millis(500);
/// Largest random share added to [`SLOW_WAIT`].
pub const SLOW_JITTER: Duration = Duration::from_millis(300);
/// Refused beats in a row (and nothing heard since) that make a node count as gone.
pub const REFUSALS: u32 = 2;
/// Wait of the first replica in turn once a leader's node counts as gone: one beat, so
/// that the survivors' log tips (sent since the first refusal) have arrived.
pub const GONE_WAIT: Duration = BEAT_EVERY;
/// Added per rank after a leader's node counts as gone.
pub const GONE_STAGGER: Duration = Duration::from_millis(250);
/// Largest random share added after a leader's node counts as gone.
pub const GONE_JITTER: Duration = Duration::from_millis(50);
/// How long a group without any leader waits before the first replica in turn elects
/// (also the retry of a failed election).
pub const LEADERLESS_WAIT: Duration = Duration::from_millis(300);
/// Added per rank to [`LEADERLESS_WAIT`].
pub const LEADERLESS_STAGGER: Duration = Duration::from_millis(150);
/// Largest random share added to [`LEADERLESS_WAIT`] (before back-off).
pub const LEADERLESS_JITTER: Duration = Duration::from_millis(300);
/// Added to the wait of a replica other than the first in turn while its group never had
/// a leader (its log holds only the initial membership, index 0, which every replica
/// writes at creation): the preferred leader wins the first election, as placement
/// spreads leaders, unless it is gone (then the next in turn is first, without this).
pub const FIRST_WAIT: Duration = Duration::from_secs(2);
/// The random share of a leaderless group's wait doubles with each election this node
/// started for it in vain, up to this factor.
pub const BACKOFF_MAX: u32 = 8;
/// How long a peer's log tip counts after it arrived (a few beats: a peer that stops
/// sending them, being gone, no longer holds the others back).
pub const TIP_FRESH: Duration = Duration::from_millis(600);
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

/// The last log id of a replica in one group (ordered as openraft orders them when it
/// compares a candidate's log with a voter's).
pub type Tip = Option<LogId>;

/// The sender's last log id in a group whose leadership is in question at the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTip {
    /// The group.
    pub group: u64,
    /// The sender's last log id in it.
    pub last: Tip,
}

/// What a node tells each peer every [`BEAT_EVERY`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// The groups the sender leads.
    pub leads: Vec<Led>,
    /// Groups whose leader (the receiver) should send the sender a heartbeat.
    pub asks: Vec<u64>,
    /// The sender's log tips in the groups whose leadership is in question there.
    pub tips: Vec<LogTip>,
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
    /// This node's last log id in it (what its vote requests carry).
    pub last_log: Tip,
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
    /// The peers' log tips in this group, and when each arrived.
    tips: HashMap<u64, (Tip, Instant)>,
    /// Elections of this group this node started since it last saw a leader.
    tries: u32,
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
    /// The latest claim of every group some peer leads, open here or not.
    claims: HashMap<u64, Claim>,
    peers: HashMap<u64, PeerWatch>,
    last_turn: Option<Instant>,
    draw: fn() -> f64,
}

/// True while `claim` was heard within [`CLAIM_FRESH`] of `now`.
fn fresh(claim: &Claim, now: Instant) -> bool {
    now.saturating_duration_since(claim.at) <= CLAIM_FRESH
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
            claims: HashMap::new(),
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
            tips: HashMap::new(),
            tries: 0,
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
            let claim = Claim {
                node: from,
                term: led.term,
                applied: led.applied,
                at: now,
            };
            let watch = self.watch(led.group, now);
            if watch.claim.is_none_or(|c| led.term >= c.term) {
                watch.claim = Some(claim);
            }
            let latest = self.claims.entry(led.group).or_insert(claim);
            if led.term >= latest.term || !fresh(latest, now) {
                *latest = claim;
            }
        }
        for tip in &beat.tips {
            self.watch(tip.group, now)
                .tips
                .insert(from, (tip.last, now));
        }
    }

    /// The node that claimed to lead `group` in its beats within [`CLAIM_FRESH`], and in
    /// which term: the latest term claimed.
    pub fn claimed(&self, group: u64, now: Instant) -> Option<(u64, u64)> {
        self.claims
            .get(&group)
            .filter(|claim| fresh(claim, now))
            .map(|claim| (claim.node, claim.term))
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
    /// `except` (the leader in question), without nodes that count as gone and without
    /// nodes in `behind` (they wait for this one).
    fn rank(&self, replicas: &[u64], except: Option<u64>, behind: &HashSet<u64>) -> usize {
        replicas
            .iter()
            .filter(|r| {
                **r == self.node
                    || (Some(**r) != except && self.gone(**r).is_none() && !behind.contains(*r))
            })
            .position(|r| *r == self.node)
            .unwrap_or(replicas.len())
    }

    /// The live peers whose fresh log tip in `group` is ahead of `mine` (this node must
    /// not elect: it cannot win) and those behind it (they wait for this node).
    fn compare_tips(&self, group: u64, mine: Tip, now: Instant) -> (bool, HashSet<u64>) {
        let Some(watch) = self.groups.get(&group) else {
            return (false, HashSet::new());
        };
        let mut ahead = false;
        let mut behind = HashSet::new();
        for (node, (tip, at)) in &watch.tips {
            if *node == self.node
                || now.saturating_duration_since(*at) >= TIP_FRESH
                || self.gone(*node).is_some()
            {
                continue;
            }
            if *tip > mine {
                ahead = true;
            } else if *tip < mine {
                behind.insert(*node);
            }
        }
        (ahead, behind)
    }

    /// The log tips this node sends with its beats: those of the groups whose
    /// leadership is in question here (no leader, or its leader's node refused a beat or
    /// has not claimed the group for half of [`SLOW_WAIT`]).
    pub fn tips(&self, locals: &[Local], now: Instant) -> Vec<LogTip> {
        locals
            .iter()
            .filter(|l| l.voter && !l.leading)
            .filter(|l| match l.leader {
                None => true,
                Some(leader) if leader == self.node => true,
                Some(leader) => {
                    let refused = self.peers.get(&leader).is_some_and(|p| p.refusals > 0);
                    let quiet = self.groups.get(&l.group).is_none_or(|w| {
                        w.claim.is_none_or(|c| {
                            c.node != leader
                                || now.saturating_duration_since(c.at.max(w.since)) >= SLOW_WAIT / 2
                        })
                    });
                    refused || quiet
                }
            })
            .map(|l| LogTip {
                group: l.group,
                last: l.last_log,
            })
            .collect()
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
        self.claims.retain(|_, claim| fresh(claim, now));
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
            if local.leader.is_some() {
                watch.tries = 0;
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
                    watch.tries = watch.tries.saturating_add(1);
                }
                actions.push(action);
            }
        }
        actions
    }

    /// A group whose leader is `leader`, another node.
    fn follow(&mut self, local: &Local, leader: u64, now: Instant) -> Option<Action> {
        let (ahead, behind) = self.compare_tips(local.group, local.last_log, now);
        let rank = self.rank(&local.replicas, Some(leader), &behind);
        let gone = self.gone(leader);
        let watch = self.groups.get_mut(&local.group)?;
        let claim = watch
            .claim
            .filter(|c| c.node == leader && c.term >= local.term);
        if let Some(gone) = gone {
            let at = gone.max(watch.since)
                + GONE_WAIT
                + times(GONE_STAGGER, rank)
                + scaled(GONE_JITTER, watch.share);
            return (now >= at).then(|| elect_unless(ahead, local)).flatten();
        }
        let last = claim.map_or(watch.since, |c| c.at.max(watch.since));
        let wait = SLOW_WAIT + times(SLOW_STAGGER, rank) + scaled(SLOW_JITTER, watch.share);
        if now.saturating_duration_since(last) >= wait {
            return elect_unless(ahead, local);
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
        let (ahead, behind) = self.compare_tips(local.group, local.last_log, now);
        let rank = self.rank(&local.replicas, None, &behind);
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
        let backoff = 1u32 << watch.tries.min(BACKOFF_MAX.trailing_zeros());
        let never_led = local.last_log.is_some_and(|l| l.index == 0);
        let first = if never_led && rank > 0 {
            FIRST_WAIT
        } else {
            Duration::ZERO
        };
        let wait = LEADERLESS_WAIT
            + first
            + times(LEADERLESS_STAGGER, rank)
            + scaled(LEADERLESS_JITTER * backoff, watch.share);
        (now.saturating_duration_since(watch.since) >= wait)
            .then(|| elect_unless(ahead, local))
            .flatten()
    }
}

/// An election of `local`'s group, unless a live peer's log is `ahead`: that peer goes
/// (this node cannot win, and its candidacy would only delay the peer's).
fn elect_unless(ahead: bool, local: &Local) -> Option<Action> {
    if ahead {
        tracing::debug!(
            group = local.group,
            last = ?local.last_log,
            "a live peer's log is ahead: leaving the election to it"
        );
        return None;
    }
    Some(Action::Elect(local.group))
}

/// The loop's state: the detector and which peers have a beat under way.
pub struct Liveness {
    node: u64,
    detector: Mutex<Detector>,
    /// Per voter: a beat to it is under way (voters come and go with membership changes).
    sending: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    /// The groups this node led at its last beat: only for those does a peer's claim to
    /// lead one need a look ([`Cluster::beat_received`]).
    leading: Mutex<std::collections::HashSet<u64>>,
}

impl Liveness {
    /// The liveness of `node` among `peers`.
    pub fn new(node: u64, peers: impl IntoIterator<Item = u64>) -> Self {
        Self {
            node,
            detector: Mutex::new(Detector::new(node, rand::random::<f64>)),
            leading: Mutex::default(),
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
    /// The leader of a group this node holds no replica of, and its term: the node that
    /// claims it in its beats ([`Detector::claimed`]), while that node is up.
    pub fn claimed_leader(&self, group: u64) -> Option<(u64, u64)> {
        let claimed = self.liveness.detector.lock().claimed(group, Instant::now());
        claimed.filter(|(node, _)| self.peers().is_up(*node))
    }

    /// Every open group as the loop sees it.
    fn locals(&self) -> Vec<Local> {
        let me = self.node_id();
        let voters: Vec<u64> = self.groups().voter_ids();
        let meta_replicas = placement::replicas("", &voters, voters.len());
        self.groups()
            .open_groups()
            .iter()
            .map(|open| {
                let m = open.raft.metrics();
                let m = m.borrow_watched();
                let replicas = match (&open.replicas, open.id) {
                    (Some(replicas), _) => replicas.clone(),
                    (None, META_GROUP) => meta_replicas.clone(),
                    (None, _) => voters.clone(),
                };
                Local {
                    group: open.id,
                    replicas,
                    // Looked up in each config as it is: `voter_ids` collects every
                    // voter into a new set, for each of hundreds of groups ten times a
                    // second, which was a tenth of an idle node's CPU.
                    voter: m
                        .membership_config
                        .membership()
                        .get_joint_config()
                        .iter()
                        .any(|config| config.contains(&me)),
                    leading: m.state == ServerState::Leader,
                    leader: m.current_leader,
                    term: m.current_term,
                    applied: m.last_applied.map(|l| l.index),
                    last_log: open.log.as_ref().and_then(super::group_log::GroupLog::tip),
                }
            })
            .collect()
    }

    /// Sends beats and starts elections until `stop` (run in the background).
    pub async fn run_liveness(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut ticks = Ticks::new(BEAT_EVERY, stop);
        while ticks.next().await {
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
            *self.liveness.leading.lock() = leads.iter().map(|l| l.group).collect();
            let (actions, tips) = {
                let mut detector = self.liveness.detector.lock();
                let now = Instant::now();
                let actions = detector.turn(now, &locals);
                (actions, detector.tips(&locals, now))
            };
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
                    tips: tips.clone(),
                };
                self.send_beat(peer, busy, &beat);
            }
        }
    }

    async fn elect(&self, group: u64) {
        let Some(raft) = self.groups().raft(group) else {
            return;
        };
        if self.groups().has_lost(group) {
            // Its log was lost here: it waits for a leader among the other replicas.
            return;
        }
        tracing::info!(
            group,
            last = ?self.groups().last_log_id(group),
            "no word from the group's leader: starting an election"
        );
        if let Err(error) = raft.trigger().elect(false).await {
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
        // A claim to lead a group matters only where this node leads it too (a deposed
        // leader that missed the election; its beat tells it so).
        let stale: Vec<(u64, Option<u64>)> = {
            let leading = self.liveness.leading.lock();
            beat.leads
                .iter()
                .filter(|l| leading.contains(&l.group))
                .map(|l| (l.group, Some(l.term)))
                .collect()
        };
        let asked = beat.asks.iter().map(|g| (*g, None));
        for (group, their_term) in stale.into_iter().chain(asked) {
            let Some(raft) = self.groups().raft(group) else {
                continue;
            };
            let (leading, term) = {
                let m = raft.metrics();
                let m = m.borrow_watched();
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
    use super::super::types::log_id;
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
            last_log: tip(term, 5),
        }
    }

    fn tip(term: u64, index: u64) -> Tip {
        Some(log_id(term, 1, index))
    }

    fn beat(group: u64, term: u64, applied: u64) -> Beat {
        Beat {
            leads: vec![Led {
                group,
                term,
                applied: Some(applied),
            }],
            asks: vec![],
            tips: vec![],
        }
    }

    /// A beat of a follower that questions group `group`'s leadership with log tip `last`.
    fn tip_beat(group: u64, last: Tip) -> Beat {
        Beat {
            tips: vec![LogTip { group, last }],
            ..Beat::default()
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

    /// A group this node holds no replica of is named led by whoever claims it in the
    /// latest term, until the claims stop for longer than [`CLAIM_FRESH`] (a turn then
    /// forgets them); a late claim of an older term does not win back.
    #[test]
    fn claims_name_the_leader_of_groups_not_held_here() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        assert_eq!(d.claimed(9, start), None);
        d.received(1, &beat(9, 3, 5), start);
        assert_eq!(d.claimed(9, start), Some((1, 3)));
        // No replica here: a turn keeps the claim.
        d.turn(start, &[]);
        assert_eq!(d.claimed(9, start + BEAT_EVERY), Some((1, 3)));
        d.received(3, &beat(9, 4, 6), start + BEAT_EVERY);
        d.received(1, &beat(9, 3, 5), start + BEAT_EVERY * 2);
        assert_eq!(d.claimed(9, start + BEAT_EVERY * 2), Some((3, 4)));
        let silent = start + BEAT_EVERY + CLAIM_FRESH + BEAT_EVERY;
        assert_eq!(d.claimed(9, silent), None);
        d.turn(silent, &[]);
        // A new claim after the silence counts, whatever its term.
        d.received(1, &beat(9, 3, 7), silent);
        assert_eq!(d.claimed(9, silent), Some((1, 3)));
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

    /// A group that never had a leader (only the initial membership in the log) waits
    /// for its preferred leader: the others add `FIRST_WAIT`, unless it is gone.
    #[test]
    fn a_new_group_leaves_the_first_election_to_its_preferred_leader() {
        let start = Instant::now();
        let mut new = local(7, None, 1);
        new.last_log = Some(log_id(0, 1, 0));
        let locals = [new];
        let mut d = Detector::new(ME, half);
        let waited = first_election(&mut d, start, Duration::from_secs(10), &locals, |_, _| {})
            .expect("elects");
        assert!(
            waited >= FIRST_WAIT + LEADERLESS_WAIT + LEADERLESS_STAGGER,
            "{waited:?}"
        );
        // Node 1, the preferred leader, gone: node 2 is first and does not wait for it.
        let mut d = Detector::new(ME, half);
        let first = first_election(&mut d, start, Duration::from_secs(10), &locals, |d, now| {
            d.sent(1, Sent::Refused, now);
        })
        .expect("elects");
        assert!(first < FIRST_WAIT, "{first:?}");
        // A group that had a leader (a blank entry after the membership) waits as before.
        let mut led = local(7, None, 1);
        led.last_log = Some(log_id(1, 1, 1));
        let mut d = Detector::new(ME, half);
        let waited = first_election(&mut d, start, Duration::from_secs(10), &[led], |_, _| {})
            .expect("elects");
        assert!(waited < FIRST_WAIT, "{waited:?}");
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

    /// The failover stall: node 2 is first in turn once leader 1 is gone, but node 3's log
    /// is longer. Node 2 must leave the election to node 3 for as long as node 3 keeps
    /// telling its tip (its own candidacy would fail and raise its term over node 3's), and
    /// elect only once node 3 falls silent too.
    #[test]
    fn a_replica_behind_a_live_peer_does_not_elect() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        d.received(1, &beat(7, 3, 5), start);
        let locals = [local(7, Some(1), 3)];
        let ahead = tip(3, 9);
        let elected = first_election(&mut d, start, Duration::from_secs(30), &locals, |d, now| {
            d.sent(1, Sent::Refused, now);
            d.received(3, &tip_beat(7, ahead), now);
        });
        assert_eq!(elected, None);
        // Leaderless after node 3's attempt: still not node 2's turn while 3 is ahead.
        let mut leaderless = [local(7, None, 4)];
        leaderless[0].last_log = tip(3, 5);
        let later = start + Duration::from_secs(31);
        let elected = first_election(
            &mut d,
            later,
            Duration::from_secs(30),
            &leaderless,
            |d, now| {
                d.received(3, &tip_beat(7, ahead), now);
            },
        );
        assert_eq!(elected, None);
        // Node 3 stops telling: its tip goes stale and node 2 elects.
        let silent = start + Duration::from_secs(62);
        let elected = first_election(
            &mut d,
            silent,
            Duration::from_secs(30),
            &leaderless,
            |_, _| {},
        );
        assert!(elected.is_some());
    }

    /// The same tip does not hold a replica back, and a higher term beats a longer log
    /// (openraft's order of log ids).
    #[test]
    fn an_equal_or_older_tip_does_not_hold_back() {
        for other in [tip(3, 5), tip(2, 50), None] {
            let mut d = Detector::new(ME, half);
            let start = Instant::now();
            d.received(1, &beat(7, 3, 5), start);
            let locals = [local(7, Some(1), 3)];
            let elected =
                first_election(&mut d, start, Duration::from_secs(30), &locals, |d, now| {
                    d.sent(1, Sent::Refused, now);
                    d.received(3, &tip_beat(7, other), now);
                });
            assert!(elected.is_some(), "{other:?}");
        }
    }

    /// A replica whose log is ahead goes first even where placement puts it second: the
    /// one before it waits for it anyway.
    #[test]
    fn the_replica_ahead_goes_first() {
        let start = Instant::now();
        let mut locals = [local(7, Some(1), 3)];
        // Placement [1, 3, 2]: with 1 gone, node 3 is first in turn and node 2 second.
        locals[0].replicas = vec![1, 3, 2];
        let run = |their: Tip| {
            let mut d = Detector::new(ME, half);
            d.received(1, &beat(7, 3, 5), start);
            first_election(&mut d, start, Duration::from_secs(30), &locals, |d, now| {
                d.sent(1, Sent::Refused, now);
                d.received(3, &tip_beat(7, their), now);
            })
            .expect("elects")
        };
        let behind_me = run(tip(3, 2));
        let level = run(tip(3, 5));
        assert!(behind_me < level, "{behind_me:?} {level:?}");
        // In the first slot: before the second in turn's would open. Node 1 counts as
        // gone from its `REFUSALS`th refused beat, one beat apart from the first.
        let gone = BEAT_EVERY * (REFUSALS - 1);
        assert!(behind_me < gone + GONE_WAIT + GONE_STAGGER, "{behind_me:?}");
    }

    /// Tips are sent only for groups whose leadership is in question here.
    #[test]
    fn tips_go_only_with_groups_in_question() {
        let mut d = Detector::new(ME, half);
        let start = Instant::now();
        let locals = [
            local(7, Some(1), 3),
            local(8, None, 3),
            local(9, Some(ME), 3),
        ];
        d.received(1, &beat(7, 3, 5), start);
        d.sent(1, Sent::Delivered, start);
        let _ = d.turn(start, &locals);
        let groups: Vec<u64> = d.tips(&locals, start).iter().map(|t| t.group).collect();
        assert_eq!(groups, vec![8]);
        // The leader's node refused a beat: group 7 is in question too.
        d.sent(1, Sent::Refused, start);
        let groups: Vec<u64> = d.tips(&locals, start).iter().map(|t| t.group).collect();
        assert_eq!(groups, vec![7, 8]);
    }

    /// Every election this node starts in vain for a leaderless group makes its next wait
    /// longer (for the same random share), up to the cap. (The share is large enough that
    /// each doubling of it is more than a turn, as elections happen on turns.)
    #[test]
    fn failed_elections_back_off() {
        fn most() -> f64 {
            0.9
        }
        let mut d = Detector::new(ME, most);
        let start = Instant::now();
        let locals = [local(7, None, 3)];
        let mut waits = Vec::new();
        let mut from = start;
        for _ in 0..6 {
            let wait = first_election(&mut d, from, Duration::from_secs(60), &locals, |_, _| {})
                .expect("elects");
            waits.push(wait);
            from += wait + BEAT_EVERY;
        }
        assert!(waits.windows(2).take(3).all(|w| w[0] < w[1]), "{waits:?}");
        let cap = LEADERLESS_WAIT
            + LEADERLESS_STAGGER * 2
            + LEADERLESS_JITTER * BACKOFF_MAX
            + BEAT_EVERY * 2;
        assert!(waits.iter().all(|w| *w <= cap), "{waits:?}");
        // A leader seen resets it.
        let _ = d.turn(from, &[local(7, Some(1), 4)]);
        let again = first_election(
            &mut d,
            from + BEAT_EVERY,
            Duration::from_secs(60),
            &locals,
            |_, _| {},
        )
        .expect("elects");
        assert!(again <= waits[0] + BEAT_EVERY, "{again:?} {waits:?}");
    }

    proptest! {
        /// Beats survive the codec; garbage is an error, never a panic.
        #[test]
        fn beats_round_trip(
            leads in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<Option<u64>>()), 0..50),
            asks in proptest::collection::vec(any::<u64>(), 0..20),
            tips in proptest::collection::vec((any::<u64>(), any::<Option<(u64, u64, u64)>>()), 0..20),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let beat = Beat {
                leads: leads.into_iter().map(|(group, term, applied)| Led { group, term, applied }).collect(),
                asks,
                tips: tips.into_iter().map(|(group, last)| LogTip {
                    group,
                    last: last.map(|(t, n, i)| log_id(t, n, i)),
                }).collect(),
            };
            let back: Beat = decode(&encode(&beat).unwrap()).unwrap();
            prop_assert_eq!(back, beat);
            let _ = decode::<Beat>(&garbage);
        }
    }
}
