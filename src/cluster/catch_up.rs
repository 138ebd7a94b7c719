//! A replica that forgot a group's log catches up before it votes in that group again.
//!
//! Raft's safety rests on every voter remembering what it acknowledged: a voter whose log
//! is gone could vote in a replica that lacks committed entries, and they would be undone.
//! This node forgets a group's log in two ways:
//!
//! - its whole data directory was lost and it starts again under its old id: its peers
//!   know it as a member that ran ([`super::rejoin`]), so the node is marked
//!   [`REJOINING`], and every group it opens with a blank log (the metadata group first,
//!   then each queue group as the metadata log replays) has lost its log;
//! - one group's directory was lost while the rest is intact: the group's held marker
//!   (`LogStore::mark_held`, beside the directory) is still there.
//!
//! Such a group opens as a follower that neither votes nor stands for election (it answers
//! vote and campaign requests "unavailable"), in two steps:
//!
//! 1. **It learns the term floor** before it takes a single entry: it asks every other
//!    replica of the group for its term ([`GroupTerm`], [`learn_floor`]), and takes appends
//!    and snapshots only from a leader of the highest of them or later ([`floor_of`]).
//!    A blank log forgot the terms it promised: without the floor it would take entries
//!    from a leader that others deposed (one that restarted and restored its leadership,
//!    or that was paused), help it commit them at its stale term, and the entries the
//!    newer leader had committed with this replica's help before it lost its log would
//!    be overwritten. Every majority that counted this replica's lost promises holds
//!    another replica that remembers them, so once every other replica has answered, the
//!    floor is at least every term this replica promised in. Until then it takes nothing:
//!    the group needs its other replicas for a quorum meanwhile (a stricter wait than a
//!    group larger than three needs, and the one a three-replica group needs).
//! 2. **It catches up** ([`caught_up`]): it follows a leader that has committed an entry
//!    of its own term, and has applied the log up to that leader's commit point. Every
//!    entry committed before that leader was elected precedes an entry of its term, and
//!    every entry committed since is at or below its commit point, so the log holds all
//!    of them again. Then it votes.
//!
//! The state is on disk, so a crash while catching up does not let a half-filled log vote
//! at the next start:
//!
//! - `raft/rejoining` ([`REJOINING`]): written before the node opens any group, removed
//!   once the metadata group has caught up (by then every queue group it had replicas of
//!   is open and marked);
//! - `raft/{group}.catching-up` ([`marker`]): written before the group opens, removed once
//!   it has caught up. A group that finds its marker at open was catching up when the node
//!   stopped: its directory is emptied and it starts over ([`clear`]), since what it holds
//!   may lack committed entries and the commit point it had seen is gone with the process
//!   (the condition is checked only against what a leader tells it after it opened).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::log_store::sync_dir;
use super::network::{KIND_GROUP_TERM, Peers};
use super::types::{RaftMetrics, decode, encode};

/// How long a replica that lost a group's log waits for each other replica's term.
const ASK_WAIT: Duration = Duration::from_secs(2);
/// How long it waits between two rounds of asking.
const ASK_AGAIN: Duration = Duration::from_millis(500);
/// How often it says whom it still waits for.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// The node-level marker (in the Raft directory): this node lost its data and rejoins.
pub const REJOINING: &str = "rejoining";

/// What opening a group found on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Found {
    /// The group's log holds no vote, entry or purge point.
    pub blank: bool,
    /// The group's held marker is there: this node held the log before.
    pub held: bool,
    /// The group's catching-up marker is there: it was catching up when the node stopped.
    pub catching_up: bool,
    /// The node rejoins after losing its data ([`REJOINING`]).
    pub rejoining: bool,
}

/// True when the group has lost its log here and must catch up before it votes.
pub fn has_lost(found: Found) -> bool {
    found.catching_up || (found.blank && (found.held || found.rejoining))
}

/// True once a group that lost its log here has caught up (see the module docs): it
/// follows a leader whose commit point is of that leader's term, and has applied up to it.
pub fn caught_up(metrics: &RaftMetrics) -> bool {
    let term = metrics.vote.leader_id.term;
    metrics.vote.is_committed()
        && metrics.cluster_committed.is_some_and(|committed| {
            committed.leader_id.term == term
                && metrics
                    .last_applied
                    .is_some_and(|applied| applied.index >= committed.index)
        })
}

/// What a replica that lost a group's log asks another replica (call kind
/// `KIND_GROUP_TERM`): the group's term, and, once it knows its floor, that the group's
/// leader send it a heartbeat now. A leader believes the replica still holds what it
/// acknowledged; only an append or a heartbeat finds the blank log (openraft then sends it
/// the log from the start), and an idle group sends neither by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermRequest {
    /// Send the asker a heartbeat, if the callee leads the group.
    pub replicate: bool,
}

/// How often a replica that knows its floor but has not caught up asks again for a
/// heartbeat (a leader elected since, or a heartbeat that came too early, is met so).
pub const NUDGE_EVERY: Duration = Duration::from_secs(1);

/// A replica's answer to one that lost the group's log: the group's term here (of the
/// latest vote this replica made or took) and its voters as this replica knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupTerm {
    /// The term.
    pub term: u64,
    /// The group's voters (its membership's).
    pub voters: Vec<u64>,
}

/// The term floor and the other replicas once every one of them has answered, else the
/// replicas still to hear from. Who they are: the voters the answers name (so a replica
/// removed since the node last knew the group is not waited for), or `seed` (the replicas
/// placement names) while none has answered.
pub fn floor_of(
    me: u64,
    seed: &[u64],
    answers: &BTreeMap<u64, GroupTerm>,
) -> Result<(u64, Vec<u64>), Vec<u64>> {
    let mut others: BTreeSet<u64> = if answers.is_empty() {
        seed.iter().copied().collect()
    } else {
        answers
            .values()
            .flat_map(|a| a.voters.iter().copied())
            .collect()
    };
    others.remove(&me);
    let missing: Vec<u64> = others
        .iter()
        .copied()
        .filter(|o| !answers.contains_key(o))
        .collect();
    if !missing.is_empty() {
        return Err(missing);
    }
    let floor = others
        .iter()
        .filter_map(|o| answers.get(o).map(|a| a.term))
        .max()
        .unwrap_or(0);
    Ok((floor, others.into_iter().collect()))
}

/// Asks the other replicas of `group` for their term until every one has answered
/// ([`floor_of`]); the floor, and those replicas. `None` once `still_lost` says the group
/// no longer waits (closed, or moved off this node).
pub async fn learn_floor(
    peers: &Peers,
    me: u64,
    group: u64,
    seed: &[u64],
    still_lost: impl Fn() -> bool,
) -> Option<(u64, Vec<u64>)> {
    let mut answers: BTreeMap<u64, GroupTerm> = BTreeMap::new();
    let mut said: Option<Instant> = None;
    loop {
        if !still_lost() {
            return None;
        }
        let missing = match floor_of(me, seed, &answers) {
            Ok(known) => return Some(known),
            Err(missing) => missing,
        };
        let asks = missing.iter().map(|peer| async move {
            let answer = ask(peers, *peer, group, TermRequest { replicate: false }).await?;
            decode::<Option<GroupTerm>>(&answer)
                .ok()
                .flatten()
                .map(|a| (*peer, a))
        });
        let heard: Vec<(u64, GroupTerm)> = futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        let progressed = !heard.is_empty();
        answers.extend(heard);
        if progressed {
            continue;
        }
        if said.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            said = Some(Instant::now());
            tracing::warn!(
                group,
                waiting_for = ?missing,
                "this node lost the group's log: it takes no entry before every other replica \
                 has told it the group's term (down, starting, or lost it too)"
            );
        }
        tokio::time::sleep(ASK_AGAIN).await;
    }
}

/// Asks `others` (the group's leader among them acts) to send this replica a heartbeat
/// in `group` ([`TermRequest::replicate`]).
pub async fn nudge(peers: &Peers, group: u64, others: &[u64]) {
    let asks = others
        .iter()
        .map(|peer| ask(peers, *peer, group, TermRequest { replicate: true }));
    futures_util::future::join_all(asks).await;
}

/// One [`TermRequest`] to `peer`; its answer's bytes, `None` when it did not answer.
async fn ask(peers: &Peers, peer: u64, group: u64, request: TermRequest) -> Option<bytes::Bytes> {
    let body = encode(&request).ok()?;
    peers
        .raft(peer, group, KIND_GROUP_TERM, body, ASK_WAIT)
        .await
        .ok()
}

/// The catching-up marker of group `group` under `raft_dir` (beside the group's directory,
/// so that losing the directory leaves it).
pub fn marker(raft_dir: &Path, group: u64) -> PathBuf {
    raft_dir.join(format!("{group}.catching-up"))
}

/// Writes the marker file `path`, durably (the file and its directory synced), before the
/// state it guards is used.
pub fn mark(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    File::create(path)?.sync_all()?;
    sync_parent(path)
}

/// Removes the marker file `path` (gone already is fine), durably.
pub fn unmark(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Empties a group's directory `dir` (missing is fine): a log that was catching up starts
/// over.
pub fn clear(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => sync_parent(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    path.parent().map_or(Ok(()), sync_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_log_has_lost_its_state_only_where_the_node_held_it() {
        let blank = Found {
            blank: true,
            ..Found::default()
        };
        // A new replica (a queue made now, a group moved here): it votes at once.
        assert!(!has_lost(blank));
        // The group's own directory was lost, its held marker left.
        assert!(has_lost(Found {
            held: true,
            ..blank
        }));
        // The node's whole directory was lost: every blank group it opens.
        assert!(has_lost(Found {
            rejoining: true,
            ..blank
        }));
        // A log that holds state is intact...
        let kept = Found {
            held: true,
            rejoining: true,
            ..Found::default()
        };
        assert!(!has_lost(kept));
        // ...unless it was still catching up when the node stopped: half filled.
        assert!(has_lost(Found {
            catching_up: true,
            ..kept
        }));
    }

    #[test]
    fn caught_up_once_applied_to_a_commit_point_of_the_leaders_term() {
        use crate::cluster::types::{Vote, log_id};
        let mut m = RaftMetrics::new_initial(3);
        assert!(!caught_up(&m), "no leader known");
        m.vote = Vote::new_committed(5, 1);
        m.cluster_committed = Some(log_id(4, 2, 90));
        m.last_applied = Some(log_id(4, 2, 90));
        assert!(
            !caught_up(&m),
            "the commit point is of an earlier term: entries committed since may follow it"
        );
        m.cluster_committed = Some(log_id(5, 1, 120));
        m.last_applied = Some(log_id(5, 1, 119));
        assert!(!caught_up(&m), "one committed entry not applied yet");
        m.last_applied = Some(log_id(5, 1, 120));
        assert!(caught_up(&m));
        m.vote = Vote::new(6, 2);
        assert!(!caught_up(&m), "a candidate's vote, no leader");
    }

    fn answer(term: u64, voters: &[u64]) -> GroupTerm {
        GroupTerm {
            term,
            voters: voters.to_vec(),
        }
    }

    #[test]
    fn the_floor_is_the_highest_term_once_every_other_replica_answered() {
        let mut answers = BTreeMap::new();
        assert_eq!(floor_of(3, &[1, 2, 3], &answers), Err(vec![1, 2]));
        // A restarted old leader of term 2 answers; the newer leader's term is not known.
        answers.insert(1, answer(2, &[1, 2, 3]));
        assert_eq!(floor_of(3, &[1, 2, 3], &answers), Err(vec![2]));
        answers.insert(2, answer(3, &[1, 2, 3]));
        assert_eq!(floor_of(3, &[1, 2, 3], &answers), Ok((3, vec![1, 2])));
    }

    #[test]
    fn the_replicas_asked_are_the_voters_the_answers_name() {
        // Placement (as this node knew it) names 4, which left the group since.
        let mut answers = BTreeMap::new();
        answers.insert(1, answer(7, &[1, 2, 3]));
        assert_eq!(floor_of(3, &[1, 3, 4], &answers), Err(vec![2]));
        answers.insert(2, answer(6, &[1, 2, 3]));
        assert_eq!(floor_of(3, &[1, 3, 4], &answers), Ok((7, vec![1, 2])));
        // A group of one other replica, or none.
        assert_eq!(floor_of(3, &[3], &BTreeMap::new()), Ok((0, vec![])));
    }

    #[test]
    fn markers_are_written_and_removed_durably() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let raft = dir.path().join("raft");
        let path = marker(&raft, 8);
        assert_eq!(path, raft.join("8.catching-up"));
        mark(&path).expect("marked");
        assert!(path.exists());
        mark(&path).expect("marking twice is fine");
        unmark(&path).expect("unmarked");
        assert!(!path.exists());
        unmark(&path).expect("unmarking twice is fine");
    }
}
