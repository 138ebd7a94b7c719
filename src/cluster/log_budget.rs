//! A queue group's copies of its messages outside the queue's segments kept bounded: its
//! Raft log within a byte budget (`raft_log_bytes`), and neither the log nor the group's
//! snapshot holding on to data that retention or compaction removed from the queue.
//!
//! Every message is in its group's Raft log as well as in the queue's segments until the
//! log is purged below a snapshot, and a snapshot hard-links the queue's segments, so a
//! segment removed from the queue stays on disk while the snapshot holds it. Two things
//! start a round here (a snapshot at the applied point, then a purge of the log below it):
//!
//! - **Size.** A snapshot every `raft_snapshot_entries` entries bounds the log in entries
//!   only, and an entry may carry anything from one small message to 4 MiB of them: 1,215
//!   entries of 100 publishes of 1 KB each made a 327 MB log beside 301 MB of segments,
//!   and 20,000 such entries would have been 5 GB. So each replica watches its log's files
//!   ([`LogStore::size_alarm`]): past the budget, it snapshots (once the entries above the
//!   last snapshot alone take three quarters of the budget) and purges, keeping the last
//!   entries below the snapshot (at most [`KEEP_ENTRIES`] and a quarter of the budget) so
//!   that a follower a little behind still catches up from the log.
//! - **Removal.** Every [`LOOK_EVERY`], each replica compares the partitions its group
//!   holds (all of a queue's in a queue's only group; partition 0 in a queue group; its
//!   own in a partition group) with the last look: when a partition's first offset rose
//!   or its bytes fell (retention or compaction removed segments), it snapshots, which
//!   lets go of the removed segments, and purges the whole log below the snapshot, which
//!   may hold the removed messages too. A quiet queue would otherwise keep them for good:
//!   it may never reach either bound again.
//!
//! - **Held.** A partition group whose Raft log is its partition's segment log
//!   ([`GroupLog::Partition`]) has no copy to bound, but retention may delete its
//!   segments only below the purge point (a follower may still be sent the entries
//!   above it, see `PartitionLog::keep_from`). Every [`LOOK_EVERY`], when retention was
//!   held back there, the replica snapshots and purges the whole log below the snapshot,
//!   and retention's next pass deletes the segments. A quiet partition would otherwise
//!   keep them for good. Removals start rounds there too (the snapshot lets go of them).
//!
//! A group is looked at again at most once per [`ROUND_SPACING`]; a purge waits while the
//! leader still sends those entries to a follower (openraft defers it).

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::metrics::WaitError;

use super::group_log::GroupLog;
use super::log_store;
use super::state_machine::Raft;
use crate::broker::Broker;
use crate::broker::queue::DataPart;

/// Entries kept below a snapshot at most (the group's `max_in_snapshot_log_to_keep`).
pub const KEEP_ENTRIES: u64 = 1000;
/// The shortest time between two rounds of one group.
pub const ROUND_SPACING: Duration = Duration::from_secs(1);
/// How often a replica looks whether its queue's data lost segments.
pub const LOOK_EVERY: Duration = Duration::from_secs(15);
/// How long a round waits for the snapshot it asked for.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);

/// Rounds that snapshotted and purged a queue group, by what started them (`reason`:
/// `size` or `removal`; counter).
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

/// Why a round runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// The log's files passed the budget.
    Size,
    /// The queue's data lost segments since the last look.
    Removal,
    /// Retention was held back at the purge point of a partition's own segment log.
    Held,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Self::Size => "size",
            Self::Removal => "removal",
            Self::Held => "held",
        }
    }
}

/// One group's log, its queue, and what is watched.
pub struct Watched {
    /// The group's id.
    pub group: u64,
    /// The group.
    pub raft: Raft,
    /// Its Raft log.
    pub log: GroupLog,
    /// The broker holding its queue's data here, the queue's name, and the part of the
    /// queue's data the group holds (only removals from that part start rounds).
    pub queue: (Arc<Broker>, String, DataPart),
    /// The log's byte budget; `None`: only removals start rounds.
    pub budget: Option<Budget>,
}

/// Watches `watched` on a task that ends with the group.
pub fn watch(watched: Watched) {
    let Watched {
        group,
        raft,
        log,
        queue: (broker, queue, part),
        budget,
    } = watched;
    let alarm = match (&log, budget) {
        (GroupLog::Chunks(chunks), Some(b)) => {
            chunks.set_chunk_bytes(b.chunk_bytes());
            Some(chunks.size_alarm(b.bytes))
        }
        _ => None,
    };
    let mut server = raft.server_metrics();
    tokio::spawn(async move {
        let mut looked = footprint(&broker, &queue, part);
        let mut look = tokio::time::interval(LOOK_EVERY);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let reason = tokio::select! {
                () = async {
                    match &alarm {
                        Some(alarm) => alarm.notified().await,
                        None => std::future::pending().await,
                    }
                } => Reason::Size,
                _ = look.tick() => Reason::Removal,
                changed = server.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let (due, reason) = match (reason, budget, &log) {
                (Reason::Size, Some(budget), GroupLog::Chunks(chunks)) => {
                    (chunks.disk_bytes() > budget.bytes, reason)
                }
                (Reason::Size, ..) => (false, reason),
                (Reason::Removal | Reason::Held, ..) => {
                    let now = footprint(&broker, &queue, part);
                    let removed = lost_data(&looked, &now);
                    looked = now;
                    match &log {
                        GroupLog::Partition(store) if store.partition_log().held_back() => {
                            (true, Reason::Held)
                        }
                        _ => (removed, Reason::Removal),
                    }
                }
            };
            if !due {
                continue;
            }
            if let Err(error) = round(&raft, &log, budget, reason).await {
                tracing::debug!(group, %error, "the group stopped: its log is no longer watched");
                return;
            }
            tokio::time::sleep(ROUND_SPACING).await;
        }
    });
}

/// The first offset and bytes of segments here of each partition in `part` (empty once
/// the queue is gone). A removal from a partition of another group's part starts no round
/// here: that group's snapshot and log hold the removed data, not this one's.
fn footprint(broker: &Broker, queue: &str, part: DataPart) -> Vec<(u64, u64)> {
    broker
        .partition_infos(queue)
        .map(|parts| {
            parts
                .iter()
                .filter(|p| part.holds_partition(p.partition))
                .map(|p| (p.first_offset, p.bytes))
                .collect()
        })
        .unwrap_or_default()
}

/// True when a partition of `now` starts later or holds fewer bytes than in `before`
/// (segments were removed in between).
fn lost_data(before: &[(u64, u64)], now: &[(u64, u64)]) -> bool {
    before.len() == now.len()
        && before
            .iter()
            .zip(now)
            .any(|((first, bytes), (first_now, bytes_now))| first_now > first || bytes_now < bytes)
}

/// Snapshots the group at its applied point when `reason` calls for it, then purges its
/// log below the snapshot: for size, keeping the last entries under it; for a removal,
/// all of it.
async fn round(
    raft: &Raft,
    log: &GroupLog,
    budget: Option<Budget>,
    reason: Reason,
) -> Result<(), String> {
    let (applied, snapshot) = applied_and_snapshot(raft);
    if let (Reason::Held, GroupLog::Partition(store)) = (reason, log)
        && applied == snapshot
        && store.purged_index() == snapshot
    {
        // Snapshotted and purged up to the applied entry already: the purge point moves on
        // with later entries (or once openraft no longer defers the purge for a follower
        // that still needs the entries).
        return Ok(());
    }
    let snapshot_now = match (reason, budget, log) {
        (Reason::Removal | Reason::Held, ..) => true,
        (Reason::Size, Some(b), GroupLog::Chunks(chunks)) => {
            applied > snapshot && chunks.bytes_above(snapshot) > b.bytes - b.keep_bytes()
        }
        (Reason::Size, ..) => false,
    };
    if snapshot_now {
        raft.trigger().snapshot().await.map_err(|e| e.to_string())?;
        // A snapshot at the same applied point replaces the last one (letting go of the
        // segments it linked) without moving the index: nothing to wait for then.
        if applied > snapshot {
            let built = raft
                .wait(Some(SNAPSHOT_WAIT))
                .metrics(
                    |m| m.snapshot.map(|s| s.index) >= applied,
                    "a snapshot that bounds the raft log",
                )
                .await;
            match built {
                Ok(_) => {}
                Err(WaitError::ShuttingDown) => return Err("the group stopped".into()),
                Err(error) => {
                    // Looked at again at the next alarm or look.
                    tracing::warn!(%error, "no snapshot to bound the raft log");
                    return Ok(());
                }
            }
        }
    }
    let (_, snapshot) = applied_and_snapshot(raft);
    let (keep_entries, keep_bytes) = match (reason, budget) {
        (Reason::Size, Some(b)) => (KEEP_ENTRIES, b.keep_bytes()),
        _ => (0, 0),
    };
    let upto = match log {
        GroupLog::Chunks(chunks) => {
            snapshot.and_then(|top| chunks.purge_point(top, keep_entries, keep_bytes))
        }
        // The whole log below the snapshot: its records stay in the segments.
        GroupLog::Partition(_) => snapshot,
    };
    if let Some(upto) = upto {
        raft.trigger()
            .purge_log(upto)
            .await
            .map_err(|e| e.to_string())?;
    }
    metrics::counter!(ROUNDS, "reason" => reason.label()).increment(1);
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

    #[test]
    fn data_is_lost_when_a_partition_starts_later_or_shrinks() {
        let before = [(0, 1000), (5, 300)];
        assert!(!lost_data(&before, &[(0, 1000), (5, 300)]));
        assert!(!lost_data(&before, &[(0, 2000), (5, 300)]), "growth");
        assert!(lost_data(&before, &[(10, 1500), (5, 300)]), "retention");
        assert!(lost_data(&before, &[(0, 1000), (5, 200)]), "compaction");
        assert!(!lost_data(&before, &[]), "the queue is gone");
        assert!(!lost_data(&[], &before), "the queue was not there");
    }

    #[tokio::test]
    async fn a_group_looks_only_at_its_own_partitions() {
        let (_dir, broker) = crate::broker::replicate::tests::broker_with_queue(3).await;
        for i in 0..30 {
            let message = crate::broker::NewMessage {
                key: Some(format!("k{i}")),
                body: bytes::Bytes::from(vec![b'x'; 10 * (i + 1)]),
                ..crate::broker::NewMessage::default()
            };
            broker.publish("q", vec![message]).await.unwrap();
        }
        let all: Vec<(u64, u64)> = broker
            .partition_infos("q")
            .unwrap()
            .iter()
            .map(|p| (p.first_offset, p.bytes))
            .collect();
        assert_eq!(all.len(), 3);
        assert!(
            all[0].1 != all[1].1 && all[1].1 != all[2].1,
            "partitions tell apart: {all:?}"
        );
        assert_eq!(footprint(&broker, "q", DataPart::All), all);
        assert_eq!(footprint(&broker, "q", DataPart::Head), vec![all[0]]);
        assert_eq!(
            footprint(&broker, "q", DataPart::Partition(1)),
            vec![all[1]]
        );
        assert_eq!(
            footprint(&broker, "q", DataPart::Partition(2)),
            vec![all[2]]
        );
        assert!(footprint(&broker, "gone", DataPart::All).is_empty());
    }
}
