//! A group's Raft log, whichever way it is kept: in chunk files of its own
//! ([`LogStore`]), or, for a partition group made since 2026-12-07, in its partition's
//! segment log ([`PartitionLogStore`]), so that each message is written once per replica.
//!
//! A partition group's directory says which: chunk files (`log.*`, or the single `log` of
//! the first layout) keep the chunked log they hold; any other partition group keeps its
//! log in `segments/` there, which the broker's partition directory links to.

use std::path::{Path, PathBuf};

use super::log_store::LogStore;
use super::partition_log_store::PartitionLogStore;
use super::types::{LogId, Membership};
use crate::broker::queue::DataPart;
use crate::broker::{Broker, BrokerError};

pub use super::partition_log_store::SEGMENTS;

/// A group's Raft log (cheap to clone: clones share it).
#[derive(Clone)]
pub enum GroupLog {
    /// Chunk files of its own (the metadata group, queue groups, partition groups made
    /// before 2026-12-07).
    Chunks(LogStore),
    /// Its partition's segment log.
    Partition(PartitionLogStore),
}

impl GroupLog {
    /// True when the log holds nothing a voter must remember (no vote, no entry, no
    /// purge point).
    pub fn is_blank(&self) -> bool {
        match self {
            Self::Chunks(log) => log.is_blank(),
            Self::Partition(log) => log.is_blank(),
        }
    }

    /// Makes `marker` the lasting sign that this node held the log (see
    /// [`LogStore::mark_held`]).
    pub fn mark_held(&self, marker: PathBuf) -> std::io::Result<()> {
        match self {
            Self::Chunks(log) => log.mark_held(marker),
            Self::Partition(log) => log.mark_held(marker),
        }
    }

    /// The id of the last entry written (or the purge point of an empty log).
    pub fn tip(&self) -> Option<LogId> {
        match self {
            Self::Chunks(log) => log.tip(),
            Self::Partition(log) => log.tip(),
        }
    }

    /// Writes the initial membership of a new group into an empty log (see
    /// [`LogStore::seed`]); returns whether it did.
    pub async fn seed(&self, leader: u64, membership: Membership) -> std::io::Result<bool> {
        match self {
            Self::Chunks(log) => log.seed(leader, membership),
            Self::Partition(log) => log.seed(leader, membership).await,
        }
    }
}

/// Makes partition `partition`'s directory in the queue directory `queue_dir` a link to
/// `segments` (a partition group's records, see [`SEGMENTS`]), in place of the empty
/// directory the broker left there.
pub fn link_partition(queue_dir: &Path, partition: u32, segments: &Path) -> std::io::Result<()> {
    let link = queue_dir.join(partition.to_string());
    match std::fs::symlink_metadata(&link) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir(&link)?,
        Ok(_) => std::fs::remove_file(&link)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let target = std::path::absolute(segments)?;
    std::os::unix::fs::symlink(target, &link)
}

/// Replaces partition `partition` of queue `name` in `broker` by the records in
/// `segments`: its directory becomes a link to them ([`link_partition`]), `then` fills them
/// (given the queue's directory; nothing to fill when they are the group's own), and the
/// partition's log opens them again, as the queue's other groups wait (they apply once
/// the partition is in place).
pub async fn relink_partition<F>(
    broker: &Broker,
    name: &str,
    partition: u32,
    segments: PathBuf,
    then: F,
) -> Result<(), BrokerError>
where
    F: FnOnce(&Path) -> std::io::Result<()> + Send + 'static,
{
    let gate = broker.queue_gate(name);
    let _alone = gate.write().await;
    broker
        .replace_queue_data(name, DataPart::Partition(partition), move |queue_dir| {
            link_partition(queue_dir, partition, &segments)?;
            then(queue_dir)
        })
        .await
}

/// True when the group directory `dir` holds a chunked Raft log (`log.{seq}` files, or the
/// first layout's single `log`).
pub fn holds_chunks(dir: &Path) -> std::io::Result<bool> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name == "log" || name.starts_with("log.") {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_files_say_a_log_is_chunked() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!holds_chunks(&dir.path().join("missing")).unwrap());
        assert!(!holds_chunks(dir.path()).unwrap());
        std::fs::create_dir(dir.path().join(SEGMENTS)).unwrap();
        std::fs::write(dir.path().join("raft-vote"), b"").unwrap();
        assert!(!holds_chunks(dir.path()).unwrap());
        std::fs::write(dir.path().join("log.0000000000"), b"").unwrap();
        assert!(holds_chunks(dir.path()).unwrap());
        let first = tempfile::tempdir().unwrap();
        std::fs::write(first.path().join("log"), b"").unwrap();
        assert!(holds_chunks(first.path()).unwrap());
    }
}
