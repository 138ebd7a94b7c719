//! Which node a data directory belongs to: `raft/node-id` names it, written when the node
//! first starts on the directory. Started under another `--node-id` (two nodes' directories
//! swapped, a typo), a node would take the other's votes and markers as its own, and could
//! vote twice in one term; it stops instead, as Kafka does when a log directory's
//! `meta.properties` names another broker.

use std::path::Path;

use super::ClusterError;
use super::metadata::write_durably;

/// The file, in the `raft/` directory, that names the directory's node.
pub const FILE: &str = "node-id";

/// Claims `raft_dir` for node `node`: names it there when nothing does yet (a new
/// directory, a lost one, or one from before the file was kept), and refuses a directory
/// that names another node.
pub fn claim(raft_dir: &Path, node: u64) -> Result<(), ClusterError> {
    let path = raft_dir.join(FILE);
    let io = |source| ClusterError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(owner) if owner == node => Ok(()),
            Ok(owner) => Err(ClusterError::Config(format!(
                "data directory {} belongs to node {owner}, not to node {node}: start node \
                 {owner} on it, or node {node} on its own directory (a new node on an empty \
                 one)",
                raft_dir.parent().unwrap_or(raft_dir).display()
            ))),
            Err(_) => Err(ClusterError::Config(format!(
                "{} should name the node the directory belongs to, but holds {:?}",
                path.display(),
                text.chars().take(40).collect::<String>()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_durably(raft_dir, FILE, format!("{node}\n").as_bytes()).map_err(io)
        }
        Err(source) => Err(io(source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory is named by the first node that claims it, claimed again by that node,
    /// and refused to any other; garbage in the file is refused, not overwritten.
    #[test]
    fn a_directory_belongs_to_the_node_that_claimed_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let raft = dir.path().join("raft");
        claim(&raft, 2).unwrap();
        assert_eq!(std::fs::read_to_string(raft.join(FILE)).unwrap(), "2\n");
        claim(&raft, 2).unwrap();
        let refused = claim(&raft, 3).unwrap_err().to_string();
        assert!(
            refused.contains("belongs to node 2, not to node 3"),
            "{refused}"
        );
        std::fs::write(raft.join(FILE), "x").unwrap();
        let garbage = claim(&raft, 2).unwrap_err().to_string();
        assert!(garbage.contains("should name the node"), "{garbage}");
        assert_eq!(std::fs::read_to_string(raft.join(FILE)).unwrap(), "x");
    }
}
