//! A node that lost its data does not come back under its old id.
//!
//! Raft's safety rests on every voter remembering what it acknowledged: a voter whose log
//! is gone could vote for a candidate that lacks committed entries, or make up a majority
//! for one, and committed writes would be undone. So a node whose metadata group holds no
//! state at start (a first start, or a wiped data directory) asks its peers, before it
//! opens any group, whether they know its id as a member that ran before (the node is in
//! the metadata group's membership and announced its addresses, which it does once it has
//! joined and holds the log). If one does, the node refuses to start and tells the
//! operator to start it under a new id with `--replaces` ([`super::membership`]).
//!
//! On a first start of a cluster the peers are starting too: they are not listening yet,
//! or do not answer within [`ASK_WAIT`], or hold a membership in which the node never
//! announced itself; the node then starts. The limit: a wiped node restarted while none
//! of its peers that know it answers is not caught.

use std::path::Path;
use std::time::Duration;

use super::network::{KIND_KNOWN, Peers};
use super::types::{decode, encode};
use super::{Cluster, ClusterError, META_GROUP};

/// How long a starting node without data waits for each peer's answer.
pub const ASK_WAIT: Duration = Duration::from_secs(2);

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

/// The refusal of a node that lost its data, known to `peer` as a member.
fn refusal(node: u64, peer: u64, raft_dir: &Path) -> ClusterError {
    ClusterError::LostData(format!(
        "node {node} holds no cluster data ({} is empty), but node {peer} knows node {node} as a \
         member that ran before: a node that lost its data must not rejoin under its old id \
         (it could vote with an empty log and undo committed writes). Start it under a new id \
         with `--replaces {node}` (README, \"Membership\")",
        raft_dir.join(META_GROUP.to_string()).display()
    ))
}

/// Refuses to start node `node` when it holds no state under `raft_dir` and one of its
/// peers knows it as a member that ran (see the module docs).
pub async fn check(peers: &Peers, node: u64, raft_dir: &Path) -> Result<(), ClusterError> {
    if !holds_no_state(raft_dir)? {
        return Ok(());
    }
    let body = encode(&node).map_err(|e| ClusterError::Config(e.to_string()))?;
    let asks = peers.ids().into_iter().map(|peer| {
        let body = body.clone();
        async move {
            let answer = peers
                .raft(peer, META_GROUP, KIND_KNOWN, body, ASK_WAIT)
                .await;
            (peer, answer)
        }
    });
    for (peer, answer) in futures_util::future::join_all(asks).await {
        match answer.map(|bytes| decode::<bool>(&bytes)) {
            Ok(Ok(true)) => return Err(refusal(node, peer, raft_dir)),
            Ok(Ok(false)) => tracing::debug!(peer, "the peer does not know this node as a member"),
            Ok(Err(error)) => {
                tracing::warn!(peer, %error, "asking whether the peer knows this node")
            }
            Err(status) => {
                tracing::debug!(peer, error = %status.message(), "the peer did not answer whether it knows this node")
            }
        }
    }
    Ok(())
}

impl Cluster {
    /// True when `node` is a member of the metadata group and announced its addresses:
    /// it ran, and holds (or held) the cluster's log.
    pub fn knows_member(&self, node: u64) -> bool {
        self.meta_membership().get_node(&node).is_some() && self.groups().node(node).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
