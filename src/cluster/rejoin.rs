//! A node that lost its data rejoins under its old id, and catches up before it votes.
//!
//! Raft's safety rests on every voter remembering what it acknowledged: a voter whose log
//! is gone could vote for a candidate that lacks committed entries, or make up a majority
//! for one, and committed writes would be undone. So a node whose metadata group holds no
//! state at start (a first start, or a wiped data directory) asks its peers (its initial
//! `--peers`), before it opens any group, whether they know its id as a member that ran
//! before (the node is in the metadata group's membership and announced its addresses,
//! which it does once it has joined and holds the log). Each peer answers one of
//! [`Acquaintance`], and [`decide`] rules on one round of answers:
//!
//! - one peer answers [`Acquaintance::Known`]: the node lost its data. It rejoins under its
//!   old id: it writes the [`catch_up::REJOINING`] marker before it opens anything, so every
//!   group it opens with a blank log (the metadata group, then each queue group as the
//!   metadata log replays) neither votes nor stands for election until it has caught up
//!   from that group's leader ([`catch_up`]). The leaders send it their logs or snapshots
//!   again (openraft's `allow_log_reversion`). `--replaces` (a new id) remains the way to
//!   replace a node for good ([`super::membership`]);
//! - else one answers [`Acquaintance::NotKnown`] (a running cluster, confirmed by its
//!   metadata leader, that never saw this id run: a node started with `--join` or
//!   `--replaces`, or a node of a new cluster whose peers started before it): it starts;
//! - else every initial peer answers [`Acquaintance::NoStateEither`] (it is in this same
//!   check, or runs with nothing but the initial membership in its metadata log: a
//!   brand-new cluster starting together, some of it a moment earlier): it starts;
//! - else (a peer is down, starting, or cannot confirm its answer with a metadata leader)
//!   it asks again, every [`ASK_AGAIN`], and says every [`LOG_EVERY`] which peers it waits
//!   for and why. It does not serve meanwhile.
//!
//! So a wiped node started while every peer that knows it is down waits for one of them;
//! a new cluster forms once every node of `--peers` has started (in any order, at any
//! time). A peer answers "not known" only when its metadata leader confirms it (the leader
//! after a quorum read, a follower by asking the leader): a node whose own log lacks the
//! entry in which the asking node announced itself would otherwise let it in as new, and
//! it would vote with a blank log.
//!
//! The cluster listener serves these questions from the moment the listener is bound
//! ([`Local`]), before the node's groups are open: a node in this check
//! answers "no state either", a node opening its groups "unsure", and Raft calls find no
//! group until the node runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::watch::WatchReceiver;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::catch_up;
use super::network::{KIND_KNOWN, Peers};
use super::types::{decode, encode};
use super::{Cluster, ClusterError, META_GROUP};

/// How long a starting node without data waits for each peer's answer.
pub const ASK_WAIT: Duration = Duration::from_secs(2);
/// How long a starting node without data waits between two rounds of questions.
pub const ASK_AGAIN: Duration = Duration::from_secs(1);
/// How often a node that waits for its peers says so.
pub const LOG_EVERY: Duration = Duration::from_secs(5);
/// How long a peer's metadata leader may take to confirm an answer.
const CONFIRM_WAIT: Duration = Duration::from_millis(1500);
/// The index of the metadata log's first entry, the initial membership (written by every
/// node of a new cluster, see `LogStore::seed`); a node that was elected appends a blank
/// entry after it.
const INITIAL_ENTRY: u64 = 0;
/// The start of the line a node that waits for its peers logs (tests look for it).
pub const WAITING: &str = "holds no cluster data and waits for its peers";

/// The question a starting node without data asks its peers (call kind `KIND_KNOWN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// The asking node.
    pub node: u64,
    /// Asked by a follower on the asking node's behalf, of the metadata leader it knows
    /// (which answers itself, never relays again).
    pub relayed: bool,
}

/// A peer's answer to [`Question`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acquaintance {
    /// The node is a member that ran: it lost its data (and rejoins, catching up).
    Known,
    /// The cluster never saw the node run (confirmed by the metadata leader).
    NotKnown,
    /// The peer holds no cluster data either and is in this same check.
    NoStateEither,
    /// The peer cannot tell now: it is opening its groups, or sees no metadata leader to
    /// confirm that it does not know the node.
    Unsure,
}

/// Why a node without data may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ground {
    /// This peer's cluster never saw the node run.
    NotKnownBy(u64),
    /// Every initial peer holds no data either (or there is none): a new cluster.
    NewCluster,
    /// This peer knows the node as a member that ran: it lost its data, and rejoins under
    /// its id, catching up before it votes ([`catch_up`]).
    Rejoin(u64),
}

/// The peers a node without data waits for, by what they answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Waiting {
    /// Gave no answer (down, not started, or slow).
    pub silent: Vec<u64>,
    /// Could not tell yet ([`Acquaintance::Unsure`]).
    pub unsure: Vec<u64>,
    /// Hold no state either.
    pub no_state: Vec<u64>,
}

/// What a node without data does after a round of answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It starts.
    Start(Ground),
    /// It asks again.
    Wait(Waiting),
}

/// Rules on one round of answers: `answers` holds every initial peer, `None` for one that
/// did not answer (see the module docs).
pub fn decide(answers: &BTreeMap<u64, Option<Acquaintance>>) -> Decision {
    let with = |wanted: Acquaintance| {
        answers
            .iter()
            .filter(move |(_, a)| **a == Some(wanted))
            .map(|(peer, _)| *peer)
    };
    if let Some(peer) = with(Acquaintance::Known).next() {
        return Decision::Start(Ground::Rejoin(peer));
    }
    if let Some(peer) = with(Acquaintance::NotKnown).next() {
        return Decision::Start(Ground::NotKnownBy(peer));
    }
    let no_state: Vec<u64> = with(Acquaintance::NoStateEither).collect();
    if no_state.len() == answers.len() {
        return Decision::Start(Ground::NewCluster);
    }
    Decision::Wait(Waiting {
        silent: answers
            .iter()
            .filter(|(_, a)| a.is_none())
            .map(|(peer, _)| *peer)
            .collect(),
        unsure: with(Acquaintance::Unsure).collect(),
        no_state,
    })
}

/// True when the metadata group's directory under `raft_dir` holds nothing: this node
/// never took part in a cluster, or its data was lost.
pub fn holds_no_state(raft_dir: &Path) -> Result<bool, ClusterError> {
    let dir = raft_dir.join(META_GROUP.to_string());
    match std::fs::read_dir(&dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(ClusterError::Io { path: dir, source }),
    }
}

/// Asks `peer` `question`; `None` when it does not answer within `wait`.
async fn ask(peers: &Peers, peer: u64, question: Question, wait: Duration) -> Option<Acquaintance> {
    let body = match encode(&question) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%error, "encoding the question to the peers");
            return None;
        }
    };
    match peers.raft(peer, META_GROUP, KIND_KNOWN, body, wait).await {
        Ok(bytes) => match decode::<Acquaintance>(&bytes) {
            Ok(answer) => Some(answer),
            Err(error) => {
                tracing::warn!(peer, %error, "undecodable answer whether the peer knows this node");
                None
            }
        },
        Err(status) => {
            tracing::debug!(peer, error = %status.message(), "the peer did not answer whether it knows this node");
            None
        }
    }
}

/// One round: every initial peer asked at once.
async fn ask_all(peers: &Peers, node: u64) -> BTreeMap<u64, Option<Acquaintance>> {
    let question = Question {
        node,
        relayed: false,
    };
    let asks = peers
        .ids()
        .into_iter()
        .map(|peer| async move { (peer, ask(peers, peer, question, ASK_WAIT).await) });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .collect()
}

/// Holds node `node` back while it holds no state under `raft_dir`, until its peers let
/// it start; marks it rejoining when they know it (see the module docs). `local` answers the peers' same
/// question meanwhile.
pub async fn check(local: &Local, node: u64, raft_dir: &Path) -> Result<(), ClusterError> {
    if !holds_no_state(raft_dir)? {
        return Ok(());
    }
    local.set_phase(Phase::Checking);
    let decided = wait_for_peers(local.peers(), node, raft_dir).await;
    local.set_phase(Phase::Opening);
    decided
}

async fn wait_for_peers(peers: &Peers, node: u64, raft_dir: &Path) -> Result<(), ClusterError> {
    let mut said: Option<Instant> = None;
    loop {
        match decide(&ask_all(peers, node).await) {
            Decision::Start(Ground::Rejoin(peer)) => {
                let marker = raft_dir.join(catch_up::REJOINING);
                catch_up::mark(&marker).map_err(|source| ClusterError::Io {
                    path: marker,
                    source,
                })?;
                tracing::warn!(
                    peer,
                    "node {node} holds no cluster data ({} is empty), but node {peer} knows it as a member \
                     that ran: it lost its data and rejoins under its id; each of its groups takes the log \
                     from its leader and does not vote until it has caught up",
                    raft_dir.join(META_GROUP.to_string()).display()
                );
                return Ok(());
            }
            Decision::Start(Ground::NotKnownBy(peer)) => {
                tracing::info!(
                    peer,
                    "node {node} holds no cluster data and is new to the cluster (node {peer} does not know it): starting"
                );
                return Ok(());
            }
            Decision::Start(Ground::NewCluster) => {
                tracing::info!(
                    "node {node} holds no cluster data, nor does any of its peers: starting a new cluster"
                );
                return Ok(());
            }
            Decision::Wait(waiting) => {
                if said.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                    said = Some(Instant::now());
                    tracing::warn!(
                        silent = ?waiting.silent,
                        unsure = ?waiting.unsure,
                        no_state = ?waiting.no_state,
                        "node {node} {WAITING} before it starts (a node that lost its data must not vote before it has caught up): \
                         no answer from {:?}, not sure yet (starting, or no metadata leader) {:?}, no data either {:?}; \
                         it starts once a peer says its cluster does not know node {node}, or once every peer holds no data either",
                        waiting.silent,
                        waiting.unsure,
                        waiting.no_state
                    );
                }
                tokio::time::sleep(ASK_AGAIN).await;
            }
        }
    }
}

impl Cluster {
    /// True when `node` is a member of the metadata group and announced its addresses:
    /// it ran, and holds (or held) the cluster's log.
    pub fn knows_member(&self, node: u64) -> bool {
        self.meta_membership().get_node(&node).is_some() && self.groups().node(node).is_some()
    }

    /// This running node's answer to `question`: "known" from its own metadata; "no state
    /// either" while its metadata log holds nothing but the initial membership (it never saw
    /// a leader: a new cluster's node that started first); "not known" only as the metadata
    /// leader confirms it (here after a quorum read, or asked of the leader this node
    /// knows); else "unsure".
    pub async fn acquaintance(&self, question: Question) -> Acquaintance {
        if self.knows_member(question.node) {
            return Acquaintance::Known;
        }
        let (leader, last) = {
            let metrics = self.meta().metrics();
            let metrics = metrics.borrow_watched();
            (metrics.current_leader, metrics.last_log_index)
        };
        if last.is_none_or(|index| index == INITIAL_ENTRY) {
            // Nothing but the initial membership: this node never saw an entry committed
            // (a node of a new cluster that started before the others), and knows no more
            // than one in the check.
            return Acquaintance::NoStateEither;
        }
        match leader {
            Some(leader) if leader == self.node_id() => {
                let read = tokio::time::timeout(
                    CONFIRM_WAIT,
                    self.meta()
                        .ensure_linearizable(openraft::ReadPolicy::ReadIndex),
                );
                match read.await {
                    Ok(Ok(_)) if self.knows_member(question.node) => Acquaintance::Known,
                    Ok(Ok(_)) => Acquaintance::NotKnown,
                    _ => Acquaintance::Unsure,
                }
            }
            Some(leader) if !question.relayed => {
                let relayed = Question {
                    relayed: true,
                    ..question
                };
                ask(self.peers(), leader, relayed, CONFIRM_WAIT)
                    .await
                    .unwrap_or(Acquaintance::Unsure)
            }
            _ => Acquaintance::Unsure,
        }
    }
}

/// Where this node is in its start, as its cluster listener answers for it.
#[derive(Clone)]
pub enum Phase {
    /// It holds no data and asks its peers whether it may start ([`super::rejoin`]).
    Checking,
    /// It opens its groups (or has not started to check yet).
    Opening,
    /// It runs.
    Running(Arc<Cluster>),
}

/// This node as its cluster listener sees it: its peers (whose secret checks the calls)
/// and its [`Phase`].
pub struct Local {
    peers: Arc<Peers>,
    phase: RwLock<Phase>,
}

impl Local {
    /// A node about to start, talking to `peers`.
    pub fn new(peers: Arc<Peers>) -> Self {
        Self {
            peers,
            phase: RwLock::new(Phase::Opening),
        }
    }

    /// The peers.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Moves this node to `phase`.
    pub fn set_phase(&self, phase: Phase) {
        *self.phase.write() = phase;
    }

    /// The running cluster, once it runs.
    pub(super) fn cluster(&self) -> Option<Arc<Cluster>> {
        match &*self.phase.read() {
            Phase::Running(cluster) => Some(Arc::clone(cluster)),
            _ => None,
        }
    }

    /// The answer to a peer's start-up question in the current phase.
    pub(super) async fn acquaintance(&self, question: Question) -> Acquaintance {
        let phase = self.phase.read().clone();
        match phase {
            Phase::Checking => Acquaintance::NoStateEither,
            Phase::Opening => Acquaintance::Unsure,
            Phase::Running(cluster) => cluster.acquaintance(question).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Acquaintance::*;

    fn round(answers: &[(u64, Option<Acquaintance>)]) -> Decision {
        decide(&answers.iter().copied().collect())
    }

    #[test]
    fn an_empty_or_missing_metadata_directory_holds_no_state() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(holds_no_state(dir.path()).unwrap());
        let meta = dir.path().join("0");
        std::fs::create_dir_all(&meta).unwrap();
        assert!(holds_no_state(dir.path()).unwrap());
        std::fs::write(meta.join("vote"), b"x").unwrap();
        assert!(!holds_no_state(dir.path()).unwrap());
    }

    #[test]
    fn one_peer_that_knows_the_node_makes_it_rejoin() {
        assert_eq!(
            round(&[(1, Some(NotKnown)), (2, Some(Known)), (4, None)]),
            Decision::Start(Ground::Rejoin(2))
        );
        assert_eq!(
            round(&[(1, Some(NoStateEither)), (2, Some(Known))]),
            Decision::Start(Ground::Rejoin(2))
        );
    }

    #[test]
    fn a_cluster_that_does_not_know_the_node_lets_it_start() {
        assert_eq!(
            round(&[(1, None), (2, Some(NotKnown)), (3, Some(Unsure))]),
            Decision::Start(Ground::NotKnownBy(2))
        );
    }

    #[test]
    fn a_new_cluster_starts_once_every_peer_holds_nothing() {
        assert_eq!(
            round(&[(1, Some(NoStateEither)), (2, Some(NoStateEither))]),
            Decision::Start(Ground::NewCluster)
        );
        // A node alone (no peers) is a new cluster of one.
        assert_eq!(round(&[]), Decision::Start(Ground::NewCluster));
    }

    /// The case the check exists for: the peers that know the node are down.
    #[test]
    fn silent_or_unsure_peers_keep_the_node_waiting() {
        assert_eq!(
            round(&[(1, None), (2, None)]),
            Decision::Wait(Waiting {
                silent: vec![1, 2],
                ..Waiting::default()
            })
        );
        assert_eq!(
            round(&[(1, Some(NoStateEither)), (2, None), (3, Some(Unsure))]),
            Decision::Wait(Waiting {
                silent: vec![2],
                unsure: vec![3],
                no_state: vec![1],
            })
        );
        assert_eq!(
            round(&[(1, Some(Unsure)), (2, Some(Unsure))]),
            Decision::Wait(Waiting {
                unsure: vec![1, 2],
                ..Waiting::default()
            })
        );
    }

    #[test]
    fn answers_travel_in_the_codec() {
        for answer in [Known, NotKnown, NoStateEither, Unsure] {
            let bytes = encode(&answer).unwrap();
            assert_eq!(decode::<Acquaintance>(&bytes).unwrap(), answer);
        }
        let question = Question {
            node: 3,
            relayed: true,
        };
        assert_eq!(
            decode::<Question>(&encode(&question).unwrap()).unwrap(),
            question
        );
    }
}
