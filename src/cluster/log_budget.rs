//! A queue group's Raft log kept within a byte budget (`raft_log_bytes`).
//!
//! Every message is in its group's Raft log as well as in the queue's segments until the
//! log is purged below a snapshot. A snapshot every `raft_snapshot_entries` entries bounds
//! the log in entries only, and an entry may carry anything from one small message to
//! 4 MiB of them: 1,215 entries of 100 publishes of 1 KB each made a 327 MB log beside
//! 301 MB of segments, and 20,000 such entries would have been 5 GB, whatever the queue's
//! retention. So each replica also watches its log's files ([`LogStore::size_alarm`]):
//! once they hold more than the budget, it snapshots the group (cheap: the snapshot
//! hard-links the queue's segments) and purges the log below the snapshot, keeping the
//! last entries under it (at most [`KEEP_ENTRIES`] of them and a quarter of the budget) so
//! that a follower a little behind still catches up from the log. A log that stays above
//! the budget (a purge waits while the leader still sends those entries to a follower) is
//! looked at again at most once per [`ROUND_SPACING`], and snapshotted again only once the
//! entries above its snapshot alone take three quarters of the budget.

use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::metrics::WaitError;

use super::log_store::{self, LogStore};
use super::state_machine::Raft;

/// Entries kept below a snapshot at most (the group's `max_in_snapshot_log_to_keep`).
pub const KEEP_ENTRIES: u64 = 1000;
/// The shortest time between two rounds of one group.
pub const ROUND_SPACING: Duration = Duration::from_secs(1);
/// How long a round waits for the snapshot it asked for.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);

/// Rounds that brought a group's log back within its budget: snapshots asked for and
/// purges (counter).
pub const ROUNDS: &str = "qit_cluster_log_budget_rounds_total";

/// A log's budget: above `bytes`, snapshot and purge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes of chunk files above which the group snapshots and purges.
    pub bytes: u64,
}

impl Budget {
    /// Bytes of records kept below the snapshot at most.
    pub fn keep_bytes(self) -> u64 {
        self.bytes / 4
    }

    /// Bytes of one chunk of the log (a purge frees whole chunks): an eighth of the
    /// budget, at least 64 KiB, at most [`log_store::CHUNK_BYTES`].
    pub fn chunk_bytes(self) -> u64 {
        (self.bytes / 8).clamp(64 * 1024, log_store::CHUNK_BYTES)
    }
}

/// Keeps group `group`'s log (`log`, of `raft`) within `budget`, on a task that ends with
/// the group.
pub fn watch(group: u64, raft: Raft, log: LogStore, budget: Budget) {
    log.set_chunk_bytes(budget.chunk_bytes());
    let alarm = log.size_alarm(budget.bytes);
    let mut server = raft.server_metrics();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = alarm.notified() => {}
                changed = server.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
            if log.disk_bytes() <= budget.bytes {
                continue;
            }
            if let Err(error) = round(&raft, &log, budget).await {
                tracing::debug!(group, %error, "the group stopped: its log budget is not kept");
                return;
            }
            tokio::time::sleep(ROUND_SPACING).await;
        }
    });
}

/// Snapshots the group at its applied point (unless its snapshot is there already) and
/// purges its log below the snapshot, keeping the last entries under it.
async fn round(raft: &Raft, log: &LogStore, budget: Budget) -> Result<(), String> {
    let (applied, snapshot) = applied_and_snapshot(raft);
    if applied > snapshot && log.bytes_above(snapshot) > budget.bytes - budget.keep_bytes() {
        raft.trigger().snapshot().await.map_err(|e| e.to_string())?;
        let built = raft
            .wait(Some(SNAPSHOT_WAIT))
            .metrics(
                |m| m.snapshot.map(|s| s.index) >= applied,
                "a snapshot for the log budget",
            )
            .await;
        match built {
            Ok(_) => {}
            Err(WaitError::ShuttingDown) => return Err("the group stopped".into()),
            Err(error) => {
                // Looked at again at the next append above the budget.
                tracing::warn!(%error, "no snapshot for the log budget");
                return Ok(());
            }
        }
    }
    let (_, snapshot) = applied_and_snapshot(raft);
    if let Some(upto) =
        snapshot.and_then(|top| log.purge_point(top, KEEP_ENTRIES, budget.keep_bytes()))
    {
        raft.trigger()
            .purge_log(upto)
            .await
            .map_err(|e| e.to_string())?;
    }
    metrics::counter!(ROUNDS).increment(1);
    Ok(())
}

/// The group's last applied index and its snapshot's last index.
fn applied_and_snapshot(raft: &Raft) -> (Option<u64>, Option<u64>) {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    (m.last_applied.map(|l| l.index), m.snapshot.map(|s| s.index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_keeps_a_quarter_in_chunks_of_an_eighth() {
        let budget = Budget {
            bytes: 64 * 1024 * 1024,
        };
        assert_eq!(budget.keep_bytes(), 16 * 1024 * 1024);
        assert_eq!(budget.chunk_bytes(), 8 * 1024 * 1024);
        assert_eq!(Budget { bytes: 1 << 20 }.chunk_bytes(), 128 * 1024);
        assert_eq!(
            Budget { bytes: 1000 }.chunk_bytes(),
            64 * 1024,
            "at least 64 KiB"
        );
        assert_eq!(
            Budget { bytes: 1 << 40 }.chunk_bytes(),
            log_store::CHUNK_BYTES,
            "at most the default chunk"
        );
    }
}
