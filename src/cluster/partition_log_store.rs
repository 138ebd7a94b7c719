//! A Raft group's log kept in a partition's own segment log ([`RaftLogStorage`] over a
//! [`PartitionLog`]): one entry, one batch, stamped with the entry's term, index and type,
//! so that the log a partition group replicates and the log its consumers read can be one
//! and the same bytes instead of every message written twice (the Raft log's chunk files
//! of [`super::log_store`], then the partition on apply).
//!
//! ```text
//! {partition dir}/{base:020}.log / .index / .timeindex   the segments: one batch per entry
//! {side dir}/
//!   raft-leaders      crc32 u32 LE | bincode Vec<(term, node)>: who led each term
//!   raft-vote         crc32 u32 LE | bincode Vote
//!   raft-committed    crc32 u32 LE | bincode Option<LogId>
//!   raft-purged       crc32 u32 LE | bincode (LogId, offset of the entry after it)
//! ```
//!
//! A batch's header holds the entry's term (`leader_epoch`), index (`raft_index`) and type
//! (blank, membership, command; data for records); openraft's log id also names the
//! leader of the term, which the small `raft-leaders` table keeps (Kafka's leader-epoch
//! checkpoint: one line per term, written before the term's first entry counts as
//! durable). A blank entry is one empty record; a membership or a command is one record
//! whose value is the bincode-encoded payload. Readers of messages pass over all three.
//!
//! Appends are written at once (one batch each, never merged) and acknowledged to
//! openraft once durable under the partition's fsync policy, in order. Under
//! `fsync = always` a batch is readable from the segments only after its sync, so the
//! entries appended and not yet readable are kept in memory until they are. Truncation
//! cuts the segment log at the first removed entry's offset. A purge records the purge
//! point and the offset after it and forgets the entries up to it; it deletes nothing:
//! the segments hold the partition's messages, which retention removes (at most up to the
//! purge point, so that every entry openraft may still send stays).
//!
//! Records for the log's own partition ([`Command::Records`], or [`Command::RecordBatch`],
//! read back as `Records`) are a data batch of those records: the messages consumers read,
//! written once. Consumers never read an entry that may still be truncated: the store puts a commit gate on the partition log at the end of
//! the committed entries (at open, from the saved committed id and purge point) and moves
//! it on as openraft saves a later committed id.
//!
//! No group uses this store yet, though a split queue's group's leader already decides its
//! publishes first and proposes the records ([`crate::broker::sequencer`]): the groups
//! still keep chunk logs and append on apply. Until they move, the store is exercised by
//! openraft's storage suite and its own tests.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::log_store::{io_err, read_small, write_small};
use super::types::{
    Command, Entry, EntryPayload, LeaderId, LogId, Membership, PartitionRecords, TypeConfig, Vote,
};
use super::types::{decode, encode};
use crate::broker::replicate::WireRecord;
use crate::log::record::{self, EntryType, Stamp};
use crate::log::{LogError, PartitionLog, Record};

/// The side file of who led each term.
const LEADERS: &str = "raft-leaders";
/// The side file of the vote.
const VOTE: &str = "raft-vote";
/// The side file of the committed id.
const COMMITTED: &str = "raft-committed";
/// The side file of the purge point.
const PURGED: &str = "raft-purged";
/// Batches read from the segments at a time while opening.
const SCAN_BATCHES: usize = 1024;

/// Where one entry lies in the segment log: its batch's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    /// The batch's first offset.
    base: u64,
    /// One past its last.
    next: u64,
}

struct Inner {
    dir: PathBuf,
    /// The queue and partition whose log this is: their records entries are data batches.
    queue: String,
    partition: u32,
    /// Every entry past the purge point, by index.
    spans: BTreeMap<u64, Span>,
    /// Entries appended whose batches are not readable yet (written, not yet synced).
    unsynced: BTreeMap<u64, Entry>,
    /// term -> the node that led it.
    leaders: BTreeMap<u64, u64>,
    last_log_id: Option<LogId>,
    /// The purge point and the offset of the entry after it.
    purged: Option<(LogId, u64)>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

/// An append waiting to become durable before openraft is told.
struct Flush {
    durable: BoxFuture<'static, Result<(), LogError>>,
    done: IOFlushed<TypeConfig>,
}

/// A Raft group's log in a partition's segment log (cheap to clone: clones share it).
#[derive(Clone)]
pub struct PartitionLogStore {
    log: PartitionLog,
    inner: Arc<Mutex<Inner>>,
    /// Tells openraft of durable appends, in order.
    flusher: mpsc::UnboundedSender<Flush>,
}

impl Inner {
    /// The log id of the entry stamped `term` and `index`.
    fn log_id(&self, term: u64, index: u64) -> std::io::Result<LogId> {
        let node = self.leaders.get(&term).copied().ok_or_else(|| {
            io_err(
                format!("reading entry {index}"),
                format!("no leader recorded for term {term}"),
            )
        })?;
        Ok(LogId {
            leader_id: LeaderId {
                term,
                node_id: node,
            },
            index,
        })
    }

    /// The last entry's id, or the purge point when no entry follows it.
    fn last_id(&self, log: &PartitionLog) -> std::io::Result<Option<LogId>> {
        match self.spans.last_key_value() {
            Some((index, span)) => {
                if let Some(entry) = self.unsynced.get(index) {
                    return Ok(Some(entry.log_id));
                }
                let batches = log
                    .batches_from(span.base, 1)
                    .map_err(|e| io_err(format!("reading entry {index}"), e))?;
                let (header, _) = batches
                    .first()
                    .ok_or_else(|| io_err(format!("reading entry {index}"), "its batch is gone"))?;
                Ok(Some(self.log_id(header.leader_epoch, header.raft_index)?))
            }
            None => Ok(self.purged.map(|(id, _)| id)),
        }
    }

    /// Where the committed entries end in the segment log: the commit gate, below which
    /// readers of messages see the partition. Everything up to the purge point is
    /// committed; without a committed id or a purge point nothing is.
    fn committed_end(&self, log: &PartitionLog) -> u64 {
        let purged_end = self.purged.map(|(_, after)| after);
        let Some(committed) = self.committed else {
            return purged_end.unwrap_or_else(|| log.first_offset());
        };
        match self.spans.get(&committed.index) {
            Some(span) => span.next,
            None => match self.spans.first_key_value() {
                // Below the entries kept: at or below the purge point.
                Some((first, span)) if committed.index < *first => purged_end.unwrap_or(span.base),
                // Past the last entry (it was truncated since the id was saved, which
                // Raft never does to a committed entry; or nothing follows a purge).
                _ => purged_end.unwrap_or_else(|| log.first_offset()),
            },
        }
    }

    /// One past the last offset written to `log` (readable or not).
    fn end(&self, log: &PartitionLog) -> u64 {
        self.spans
            .last_key_value()
            .map_or_else(|| log.written_end(), |(_, s)| s.next)
    }

    /// Forgets unsynced entries whose batches have become readable.
    fn prune_unsynced(&mut self, readable_end: u64) {
        while let Some((&index, _)) = self.unsynced.first_key_value() {
            match self.spans.get(&index) {
                Some(span) if span.next <= readable_end => {
                    self.unsynced.remove(&index);
                }
                _ => break,
            }
        }
    }
}

impl PartitionLogStore {
    /// The Raft log of partition `partition` of `queue`, kept in `log`, with its side files
    /// in `dir` (made if missing; kept apart from the partition's directory, which a
    /// snapshot replaces whole). Spawns the task that tells openraft of durable appends:
    /// call it on a Tokio runtime.
    pub fn open(
        log: PartitionLog,
        dir: &Path,
        queue: &str,
        partition: u32,
    ) -> std::io::Result<Self> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let leaders: Vec<(u64, u64)> = read_small(&dir, LEADERS)?.unwrap_or_default();
        let purged: Option<(LogId, u64)> = read_small(&dir, PURGED)?;
        let mut inner = Inner {
            vote: read_small(&dir, VOTE)?,
            committed: read_small::<Option<LogId>>(&dir, COMMITTED)?.flatten(),
            dir,
            queue: queue.to_string(),
            partition,
            spans: BTreeMap::new(),
            unsynced: BTreeMap::new(),
            leaders: leaders.into_iter().collect(),
            last_log_id: None,
            purged,
        };
        inner.spans = scan_spans(&log, purged)?;
        inner.last_log_id = inner.last_id(&log)?;
        log.set_commit_gate(Some(inner.committed_end(&log)));
        let (flusher, flushes) = mpsc::unbounded_channel();
        tokio::spawn(run_flusher(flushes));
        Ok(Self {
            log,
            inner: Arc::new(Mutex::new(inner)),
            flusher,
        })
    }

    /// The partition log this Raft log lives in.
    pub fn partition_log(&self) -> &PartitionLog {
        &self.log
    }

    /// Reads the entries `wanted` (consecutive) back: from the segments in one read, and
    /// the last ones from memory while their batches are not readable yet.
    fn read_entries(&self, inner: &Inner, wanted: &[(u64, Span)]) -> std::io::Result<Vec<Entry>> {
        // The unsynced entries are the log's last ones.
        let on_disk = wanted.partition_point(|(index, _)| !inner.unsynced.contains_key(index));
        let mut out = Vec::with_capacity(wanted.len());
        if let Some((first, span)) = wanted.first().filter(|_| on_disk > 0) {
            let subject = || format!("reading entries from {first}");
            let batches = self
                .log
                .batches_from(span.base, on_disk)
                .map_err(|e| io_err(subject(), e))?;
            if batches.len() != on_disk {
                return Err(io_err(
                    subject(),
                    format!("{} of {on_disk} batches are there", batches.len()),
                ));
            }
            for ((index, _), (header, bytes)) in wanted.iter().zip(&batches) {
                if header.raft_index != *index {
                    return Err(io_err(
                        format!("reading entry {index}"),
                        format!("the batch there holds entry {}", header.raft_index),
                    ));
                }
                out.push(entry_of(inner, header, bytes)?);
            }
        }
        for (index, _) in &wanted[on_disk..] {
            let entry = inner.unsynced.get(index).cloned();
            out.push(
                entry.ok_or_else(|| io_err(format!("reading entry {index}"), "not in memory"))?,
            );
        }
        Ok(out)
    }
}

/// The spans of the entries after the purge point, from the segments.
fn scan_spans(
    log: &PartitionLog,
    purged: Option<(LogId, u64)>,
) -> std::io::Result<BTreeMap<u64, Span>> {
    let mut spans = BTreeMap::new();
    let mut at = purged.map_or(log.first_offset(), |(_, next)| next);
    let mut expected = purged.map(|(id, _)| id.index + 1);
    loop {
        let batches = log
            .batches_from(at, SCAN_BATCHES)
            .map_err(|e| io_err(format!("opening the log at offset {at}"), e))?;
        let Some((last, _)) = batches.last() else {
            return Ok(spans);
        };
        at = last.next_offset();
        for (header, _) in &batches {
            let index = header.raft_index;
            if expected.is_some_and(|e| e != index) {
                return Err(io_err(
                    "opening the log",
                    format!(
                        "the batch at offset {} holds entry {index}, {expected:?} was expected",
                        header.base_offset
                    ),
                ));
            }
            expected = Some(index + 1);
            spans.insert(
                index,
                Span {
                    base: header.base_offset,
                    next: header.next_offset(),
                },
            );
        }
    }
}

/// The batch an entry is written as: its stamp and records. Records for this log's
/// partition are a data batch of them; anything else is one record of its own kind.
fn batch_of(inner: &Inner, entry: &Entry) -> std::io::Result<(Stamp, Vec<Record>)> {
    let subject = || format!("writing entry {}", entry.log_id);
    let stamp = |entry_type| Stamp {
        leader_epoch: entry.log_id.leader_id.term,
        raft_index: entry.log_id.index,
        entry_type,
    };
    let decoded;
    let payload = match &entry.payload {
        // Records as one buffer are the same records (read back as `Command::Records`).
        EntryPayload::Normal(Command::RecordBatch(batch)) => {
            let records = batch.decode().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", subject()),
                )
            })?;
            decoded = EntryPayload::Normal(Command::Records(records));
            &decoded
        }
        payload => payload,
    };
    let (entry_type, value) = match payload {
        EntryPayload::Normal(Command::Records(r))
            if r.queue == inner.queue
                && r.partition == inner.partition
                && !r.records.is_empty() =>
        {
            let records = r.records.iter().cloned().map(Record::from).collect();
            return Ok((stamp(EntryType::Data), records));
        }
        EntryPayload::Blank => (EntryType::Blank, Vec::new()),
        EntryPayload::Membership(m) => (
            EntryType::Membership,
            encode(m).map_err(|e| io_err(subject(), e))?,
        ),
        EntryPayload::Normal(command) => (
            EntryType::Command,
            encode(command).map_err(|e| io_err(subject(), e))?,
        ),
    };
    // Timestamp 0: every replica writes the same bytes.
    let record = Record {
        value: Bytes::from(value),
        ..Record::default()
    };
    Ok((stamp(entry_type), vec![record]))
}

/// The entry a batch holds.
fn entry_of(inner: &Inner, header: &record::BatchHeader, bytes: &Bytes) -> std::io::Result<Entry> {
    let index = header.raft_index;
    let subject = || format!("reading entry {index}");
    let log_id = inner.log_id(header.leader_epoch, index)?;
    let value = || -> std::io::Result<Bytes> {
        let records = record::decode_records(header, bytes).map_err(|e| io_err(subject(), e))?;
        let [record] = <[_; 1]>::try_from(records)
            .map_err(|r| io_err(subject(), format!("{} records, not one", r.len())))?;
        Ok(record.value)
    };
    let payload = match header.entry_type {
        EntryType::Blank => EntryPayload::Blank,
        EntryType::Membership => EntryPayload::Membership(
            decode::<Membership>(&value()?).map_err(|e| io_err(subject(), e))?,
        ),
        EntryType::Command => {
            EntryPayload::Normal(decode::<Command>(&value()?).map_err(|e| io_err(subject(), e))?)
        }
        EntryType::Data => {
            let records =
                record::decode_records(header, bytes).map_err(|e| io_err(subject(), e))?;
            EntryPayload::Normal(Command::Records(PartitionRecords {
                queue: inner.queue.clone(),
                partition: inner.partition,
                records: records.into_iter().map(WireRecord::from).collect(),
            }))
        }
    };
    Ok(Entry { log_id, payload })
}

/// Tells openraft of each append once it is durable, in the order they came.
async fn run_flusher(mut flushes: mpsc::UnboundedReceiver<Flush>) {
    while let Some(flush) = flushes.recv().await {
        let result = flush.durable.await.map_err(std::io::Error::other);
        flush.done.io_completed(result);
    }
}

impl RaftLogReader<TypeConfig> for PartitionLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> std::io::Result<Vec<Entry>> {
        let mut inner = self.inner.lock();
        inner.prune_unsynced(self.log.written_end());
        let wanted: Vec<(u64, Span)> = inner.spans.range(range).map(|(i, s)| (*i, *s)).collect();
        self.read_entries(&inner, &wanted)
    }

    async fn read_vote(&mut self) -> std::io::Result<Option<Vote>> {
        Ok(self.inner.lock().vote)
    }
}

impl RaftLogStorage<TypeConfig> for PartitionLogStore {
    type LogReader = PartitionLogStore;

    async fn get_log_state(&mut self) -> std::io::Result<LogState<TypeConfig>> {
        let inner = self.inner.lock();
        Ok(LogState {
            last_purged_log_id: inner.purged.map(|(id, _)| id),
            last_log_id: inner.last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        write_small(&inner.dir, VOTE, vote, true).map_err(|e| io_err("saving the vote", e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        // Synced with the next vote or append: a lost committed id is learnt again.
        write_small(&inner.dir, COMMITTED, &committed, false)
            .map_err(|e| io_err("saving the committed id", e))?;
        inner.committed = committed;
        // Consumers read what is committed.
        self.log.commit_to(inner.committed_end(&self.log));
        Ok(())
    }

    async fn read_committed(&mut self) -> std::io::Result<Option<LogId>> {
        Ok(self.inner.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> std::io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let written = {
            let mut inner = self.inner.lock();
            inner.prune_unsynced(self.log.written_end());
            append_locked(&self.log, &mut inner, entries)
        };
        match written {
            Ok(end) => {
                let flush = Flush {
                    durable: Box::pin(self.log.durable(end)),
                    done: callback,
                };
                if let Err(mpsc::error::SendError(flush)) = self.flusher.send(flush) {
                    flush
                        .done
                        .io_completed(Err(std::io::Error::other("raft log: the flusher stopped")));
                }
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(std::io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> std::io::Result<()> {
        let from = last.map_or(0, |l| l.index + 1);
        let cut = self.inner.lock().spans.get(&from).map(|s| s.base);
        let Some(offset) = cut else {
            return Ok(());
        };
        self.log
            .truncate_suffix(offset)
            .await
            .map_err(|e| io_err(format!("truncating after {last:?}"), e))?;
        let mut inner = self.inner.lock();
        inner.spans.split_off(&from);
        inner.unsynced.split_off(&from);
        inner.last_log_id = inner.last_id(&self.log)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        let after = match inner.spans.get(&log_id.index) {
            Some(span) => span.next,
            // Past the last entry (a snapshot installed): the next entry comes at the end.
            None => inner
                .spans
                .range(log_id.index..)
                .next()
                .map_or_else(|| inner.end(&self.log), |(_, s)| s.base),
        };
        write_small(&inner.dir, PURGED, &(log_id, after), true)
            .map_err(|e| io_err(format!("purging up to {log_id}"), e))?;
        inner.purged = Some((log_id, after));
        // Only committed entries are purged.
        self.log.commit_to(after);
        let kept = inner.spans.split_off(&(log_id.index + 1));
        inner.spans = kept;
        let kept = inner.unsynced.split_off(&(log_id.index + 1));
        inner.unsynced = kept;
        if inner
            .last_log_id
            .is_none_or(|last| last.index < log_id.index)
        {
            inner.last_log_id = Some(log_id);
        }
        Ok(())
    }
}

/// Writes `entries` at the end of the log, one batch each; returns the end offset to wait
/// for before they count as durable.
fn append_locked<I>(log: &PartitionLog, inner: &mut Inner, entries: I) -> std::io::Result<u64>
where
    I: IntoIterator<Item = Entry>,
{
    let mut end = inner.end(log);
    for entry in entries {
        let subject = || format!("writing entry {}", entry.log_id);
        let term = entry.log_id.leader_id.term;
        let node = entry.log_id.leader_id.node_id;
        match inner.leaders.get(&term) {
            Some(known) if *known != node => {
                return Err(io_err(
                    subject(),
                    format!("term {term} was led by node {known}, not {node}"),
                ));
            }
            Some(_) => {}
            None => {
                // Durable before any entry of the term is: synced now.
                inner.leaders.insert(term, node);
                let table: Vec<(u64, u64)> = inner.leaders.iter().map(|(t, n)| (*t, *n)).collect();
                write_small(&inner.dir, LEADERS, &table, true).map_err(|e| io_err(subject(), e))?;
            }
        }
        let (stamp, records) = batch_of(inner, &entry)?;
        let (base, next) = log
            .append_entry(stamp, &records)
            .map_err(|e| io_err(subject(), e))?;
        let index = entry.log_id.index;
        inner.spans.insert(index, Span { base, next });
        inner.last_log_id = Some(entry.log_id);
        inner.unsynced.insert(index, entry);
        end = next;
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::super::types::log_id;
    use super::*;
    use crate::broker::replicate::Op;
    use crate::log::{FsyncPolicy, LogConfig};
    use openraft::type_config::TypeConfigExt;
    use proptest::prelude::*;

    fn open(dir: &Path, fsync: FsyncPolicy) -> PartitionLogStore {
        let config = LogConfig {
            fsync,
            // Small segments: logs span several.
            segment_bytes: 256,
            ..LogConfig::default()
        };
        let log = PartitionLog::open(&dir.join("partition"), config).unwrap();
        PartitionLogStore::open(log, &dir.join("raft"), "q", 1).unwrap()
    }

    /// `n` records (one at least) made from `seed`: keys, headers and values of varied
    /// shapes, the empty ones included.
    fn records(seed: u64, n: usize) -> Vec<WireRecord> {
        (0..n.max(1) as u64)
            .map(|i| {
                let x = seed.wrapping_mul(31).wrapping_add(i);
                WireRecord {
                    timestamp_ms: 1_700_000_000_000 + x as i64 % 5_000,
                    key: match x % 3 {
                        0 => None,
                        1 => Some(Bytes::new()),
                        _ => Some(Bytes::from(format!("k{x}"))),
                    },
                    headers: (0..x % 3)
                        .map(|h| (format!("h{h}"), Bytes::from(vec![h as u8; h as usize])))
                        .collect(),
                    value: Bytes::from("v".repeat((x % 40) as usize)),
                }
            })
            .collect()
    }

    /// Entry `index` of `term` (led by node `term % 3 + 1`), of kind `kind % 5`: blank,
    /// membership, command, records for the log's partition (a data batch), records for
    /// another partition (a command).
    fn entry(kind: u8, term: u64, index: u64) -> Entry {
        let payload = match kind % 5 {
            0 => EntryPayload::Blank,
            1 => EntryPayload::Membership(Membership::from(
                [
                    (1u64, openraft::BasicNode::new("a")),
                    (index, openraft::BasicNode::new("b")),
                ]
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            )),
            2 => EntryPayload::Normal(Command::Broker(Op::DeleteQueue {
                name: format!("q{index}"),
            })),
            kind => EntryPayload::Normal(Command::Records(PartitionRecords {
                queue: "q".into(),
                partition: if kind == 3 { 1 } else { 2 },
                records: records(index, index as usize % 4),
            })),
        };
        Entry {
            log_id: log_id(term, term % 3 + 1, index),
            payload,
        }
    }

    /// The records an entry puts in the log's partition (data), if any.
    fn data_of(entry: &Entry) -> Vec<WireRecord> {
        match &entry.payload {
            EntryPayload::Normal(Command::Records(r)) if r.partition == 1 => r.records.clone(),
            _ => Vec::new(),
        }
    }

    /// What readers of messages see of the partition.
    fn messages(store: &PartitionLogStore) -> Vec<WireRecord> {
        store
            .partition_log()
            .read(0, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(WireRecord::from)
            .collect()
    }

    async fn append(store: &mut PartitionLogStore, entries: Vec<Entry>) {
        let (tx, rx) = TypeConfig::oneshot();
        store.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }

    async fn all(store: &mut PartitionLogStore) -> Vec<Entry> {
        store.try_get_log_entries(..).await.unwrap()
    }

    /// Records sent as one buffer ([`Command::RecordBatch`], what leaders propose) are the
    /// same data batch as records sent as a list, and read back as the list.
    #[tokio::test]
    async fn a_record_batch_is_a_data_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), FsyncPolicy::Never);
        let listed = entry(3, 1, 2);
        let EntryPayload::Normal(Command::Records(records)) = &listed.payload else {
            panic!("entry kind 3 is records for the log's partition");
        };
        let batch = Entry {
            log_id: listed.log_id,
            payload: EntryPayload::Normal(Command::RecordBatch(
                super::super::types::EncodedRecords {
                    queue: records.queue.clone(),
                    partition: records.partition,
                    records: super::super::publish_batch::RecordBatch::encode(&records.records)
                        .unwrap(),
                },
            )),
        };
        append(&mut store, vec![batch]).await;
        assert_eq!(all(&mut store).await, std::slice::from_ref(&listed));
        store.save_committed(Some(listed.log_id)).await.unwrap();
        assert_eq!(messages(&store), data_of(&listed));
        assert_eq!(messages(&store).len(), 2);
    }

    /// Under `fsync = always` an entry appended and not yet synced is read back from
    /// memory (its batch is not readable yet), and from the segments once synced.
    #[tokio::test]
    async fn an_unsynced_entry_is_read_from_memory_until_synced() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), FsyncPolicy::Always);
        append(&mut store, vec![entry(0, 1, 1)]).await;
        let end = {
            let mut inner = store.inner.lock();
            append_locked(&store.log, &mut inner, [entry(3, 1, 2)]).unwrap()
        };
        let log = store.partition_log().clone();
        assert_eq!(log.written_end(), 1, "the second batch is not readable yet");
        assert_eq!(all(&mut store).await, [entry(0, 1, 1), entry(3, 1, 2)]);
        log.durable(end).await.unwrap();
        assert_eq!(log.written_end(), end);
        assert_eq!(all(&mut store).await, [entry(0, 1, 1), entry(3, 1, 2)]);
        assert!(store.inner.lock().unsynced.is_empty());
    }

    /// A data entry's records are read by consumers once committed, not before; a
    /// reopened log keeps the gate where the saved committed id puts it.
    #[tokio::test]
    async fn records_are_read_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), FsyncPolicy::Never);
        append(
            &mut store,
            vec![entry(0, 1, 1), entry(3, 1, 2), entry(3, 1, 3)],
        )
        .await;
        assert!(messages(&store).is_empty(), "nothing is committed");
        store.save_committed(Some(log_id(1, 2, 2))).await.unwrap();
        assert_eq!(messages(&store), data_of(&entry(3, 1, 2)));
        drop(store);
        let mut store = open(dir.path(), FsyncPolicy::Never);
        assert_eq!(messages(&store), data_of(&entry(3, 1, 2)));
        store.truncate_after(Some(log_id(1, 2, 2))).await.unwrap();
        append(&mut store, vec![entry(3, 2, 3)]).await;
        store.save_committed(Some(log_id(2, 3, 3))).await.unwrap();
        let mut want = data_of(&entry(3, 1, 2));
        want.extend(data_of(&entry(3, 2, 3)));
        assert_eq!(messages(&store), want);
    }

    /// A term has one leader: an entry naming another is refused, and nothing is written.
    #[tokio::test]
    async fn a_term_has_one_leader() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), FsyncPolicy::Never);
        append(&mut store, vec![entry(0, 4, 1)]).await;
        let mut other = entry(0, 4, 2);
        other.log_id.leader_id.node_id = 9;
        let (tx, _rx) = TypeConfig::oneshot();
        assert!(store.append([other], IOFlushed::signal(tx)).await.is_err());
        assert_eq!(all(&mut store).await, [entry(0, 4, 1)]);
    }

    /// What a model of the log does to a test.
    #[derive(Debug, Clone)]
    enum Step {
        /// Appends entries of these kinds, in a later term first when `new_term`.
        Append { kinds: Vec<u8>, new_term: bool },
        /// Keeps the entries up to `back` before the last (never a committed one).
        Truncate { back: u64 },
        /// Purges up to `back` before the committed entry, or `past` entries past the last
        /// one (a snapshot installed, committed first).
        Purge { back: u64, past: u64 },
        /// Closes the log and opens it again.
        Reopen,
        /// Saves a vote, and the last entry as committed.
        Commit { term: u64 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (proptest::collection::vec(any::<u8>(), 1..5), any::<bool>())
                .prop_map(|(kinds, new_term)| Step::Append { kinds, new_term }),
            1 => (0u64..4).prop_map(|back| Step::Truncate { back }),
            1 => (0u64..4, prop_oneof![3 => Just(0u64), 1 => 1u64..3])
                .prop_map(|(back, past)| Step::Purge { back, past }),
            1 => Just(Step::Reopen),
            2 => (1u64..5).prop_map(|term| Step::Commit { term }),
        ]
    }

    /// The log against a model (a purge point, the entries after it, a committed id and
    /// the records written) over random appends, truncations, purges (also past the last
    /// entry), commits and reopens, under both durability policies: the same entries,
    /// log state, vote and committed id each time, and readers of messages see exactly the
    /// records of the committed data entries.
    #[test]
    fn the_log_follows_a_model() {
        let config = ProptestConfig {
            cases: 48,
            ..ProptestConfig::default()
        };
        proptest!(config, |(steps in proptest::collection::vec(step(), 1..24), always in any::<bool>())| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let policy = if always { FsyncPolicy::Always } else { FsyncPolicy::Never };
                let dir = tempfile::tempdir().unwrap();
                let mut store = open(dir.path(), policy);
                let mut model: Vec<Entry> = Vec::new();
                // Every data entry written and not truncated: (index, its records).
                let mut written: Vec<(u64, Vec<WireRecord>)> = Vec::new();
                let mut purged: Option<LogId> = None;
                let mut committed: Option<LogId> = None;
                let mut vote: Option<Vote> = None;
                let mut term = 1;
                for step in steps {
                    let last = model.last().map(|e| e.log_id).or(purged);
                    let next = last.map_or(1, |l| l.index + 1);
                    let committed_index = committed.map_or(0, |c| c.index);
                    match step {
                        Step::Append { kinds, new_term } => {
                            term = term.max(last.map_or(1, |l| l.leader_id.term)) + u64::from(new_term);
                            let entries: Vec<Entry> = kinds
                                .iter()
                                .enumerate()
                                .map(|(i, k)| entry(*k, term, next + i as u64))
                                .collect();
                            append(&mut store, entries.clone()).await;
                            written.extend(entries.iter().map(|e| (e.log_id.index, data_of(e))));
                            model.extend(entries);
                        }
                        Step::Truncate { back } => {
                            let keep = (model.len() as u64).saturating_sub(back) as usize;
                            // Raft never truncates a committed entry, nor at the purge point.
                            let Some(at) = keep.checked_sub(1).map(|k| model[k].log_id) else {
                                continue;
                            };
                            if at.index < committed_index {
                                continue;
                            }
                            store.truncate_after(Some(at)).await.unwrap();
                            model.truncate(keep);
                            written.retain(|(i, _)| *i <= at.index);
                        }
                        Step::Purge { back, past } => {
                            let target = if past > 0 {
                                // A snapshot past the last entry: committed, the log starts after it.
                                let target = log_id(term, term % 3 + 1, next - 1 + past);
                                store.save_committed(Some(target)).await.unwrap();
                                committed = Some(target);
                                Some(target)
                            } else {
                                model
                                    .iter()
                                    .rev()
                                    .filter(|e| e.log_id.index <= committed_index)
                                    .nth(back as usize)
                                    .map(|e| e.log_id)
                            };
                            let Some(target) = target else { continue };
                            store.purge(target).await.unwrap();
                            model.retain(|e| e.log_id.index > target.index);
                            purged = Some(target);
                        }
                        Step::Reopen => {
                            drop(store);
                            store = open(dir.path(), policy);
                        }
                        Step::Commit { term: t } => {
                            let v = Vote::new(t, t % 3 + 1);
                            store.save_vote(&v).await.unwrap();
                            if last.is_some_and(|l| l.index >= committed_index) {
                                store.save_committed(last).await.unwrap();
                                committed = last;
                            }
                            vote = Some(v);
                        }
                    }
                    let state = store.get_log_state().await.unwrap();
                    assert_eq!(state.last_purged_log_id, purged);
                    assert_eq!(state.last_log_id, model.last().map(|e| e.log_id).or(purged));
                    assert_eq!(all(&mut store).await, model);
                    if let Some(first) = model.first() {
                        let index = first.log_id.index;
                        let some = store.try_get_log_entries(index + 1..index + 3).await.unwrap();
                        assert_eq!(some, model.get(1..3.min(model.len())).unwrap_or_default());
                    }
                    assert_eq!(store.read_vote().await.unwrap(), vote);
                    assert_eq!(store.read_committed().await.unwrap(), committed);
                    let committed_index = committed.map_or(0, |c| c.index);
                    let want: Vec<WireRecord> = written
                        .iter()
                        .filter(|(i, _)| *i <= committed_index)
                        .flat_map(|(_, r)| r.clone())
                        .collect();
                    assert_eq!(messages(&store), want);
                }
            });
        });
    }
}
