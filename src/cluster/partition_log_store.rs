//! A Raft group's log kept in a partition's own segment log ([`RaftLogStorage`] over a
//! [`PartitionLog`]), so that the log a partition group replicates and the log its
//! consumers read are one and the same bytes: each message is written once per replica,
//! as its entry is appended (applying it only takes note, see `state_machine`). Every
//! partition group made since 2026-12-07 keeps its log here ([`super::group_log`]).
//!
//! ```text
//! {partition dir}/{base:020}.log / .index / .timeindex   the segments: one data batch per
//!                                                        entry holding records
//! {side dir}/
//!   raft-entries      crc32 u32 LE | bincode Vec<Entry>: every other entry
//!   raft-leaders      crc32 u32 LE | bincode Vec<(term, node)>: who led each term
//!   raft-vote         crc32 u32 LE | bincode Vote
//!   raft-committed    crc32 u32 LE | bincode Option<LogId>
//!   raft-purged       crc32 u32 LE | bincode (LogId, offset of the records after it)
//! ```
//!
//! An entry holding records for the log's own partition ([`Command::Records`], or
//! [`Command::RecordBatch`], read back as `Records`) is a data batch of exactly those
//! records, whose header holds the entry's term (`leader_epoch`) and index (`raft_index`);
//! openraft's log id also names the leader of the term, which the small `raft-leaders`
//! table keeps (Kafka's leader-epoch checkpoint: one line per term, written before the
//! term's first entry counts as durable). Every other entry (blank, membership, any other
//! command: one per election or membership change, not per message) is kept in the side
//! file `raft-entries`, rewritten whole by rename and synced before its append counts, so
//! that it takes no offset: the partition's offsets count its messages only, from 0.
//!
//! Appends are written at once (one batch each, never merged) and acknowledged to
//! openraft once durable under the partition's fsync policy, in order. Under
//! `fsync = always` a batch is readable from the segments only after its sync, so the
//! entries appended and not yet readable are kept in memory until they are. Opening checks
//! that the batches and the side entries together hold every index after the purge point,
//! and ends the log at the first missing one (an append whose side entry was not saved
//! when the node stopped). Truncation drops the side entries, then cuts the segment log at
//! the first removed batch. A purge records the purge point and the offset after it and
//! forgets the entries up to it; it deletes nothing: the segments hold the partition's
//! messages, which retention removes, only below the purge point
//! ([`PartitionLog::keep_from`]: every entry openraft may still send stays).
//!
//! Consumers never read an entry that may still be truncated: the store puts a commit gate
//! on the partition log at the end of the records of the committed entries (at open, from
//! the saved committed id and purge point) and moves it on as openraft saves a later
//! committed id, which it does before it applies.

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

use super::log_store::{InPlaceFile, io_err, read_small, write_marker, write_small};
use super::types::decode;
use super::types::{
    Command, Entry, EntryPayload, LeaderId, LogId, Membership, PartitionRecords, TypeConfig, Vote,
};
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
/// Where a partition group's records live when its log is its partition's segment log:
/// `segments/` in the group's directory (which the start of a node keeps, unlike the
/// broker's `queues/`, and which a lost group's clearing takes along; see
/// [`super::group_log`]).
pub const SEGMENTS: &str = "segments";
/// The side file of the entries that hold no records for the partition.
const ENTRIES: &str = "raft-entries";
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
    /// Every entry past the purge point that holds the partition's records (a data
    /// batch), by index.
    spans: BTreeMap<u64, Span>,
    /// Every other entry past the purge point (blank, membership, any other command), by
    /// index: kept in the side file [`ENTRIES`], not in the segments, so that they take no
    /// offset of the partition's messages.
    side: BTreeMap<u64, Entry>,
    /// Entries appended whose batches are not readable yet (written, not yet synced).
    unsynced: BTreeMap<u64, Entry>,
    /// term -> the node that led it.
    leaders: BTreeMap<u64, u64>,
    last_log_id: Option<LogId>,
    /// The purge point and the offset of the entry after it.
    purged: Option<(LogId, u64)>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    /// The `raft-committed` file, rewritten in place at every commit.
    committed_file: InPlaceFile,
    /// The marker that this node held the log, while it is still to be written (before
    /// the first vote or entry; see [`PartitionLogStore::mark_held`]).
    held_marker: Option<PathBuf>,
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
        let data_last = self.spans.last_key_value().map(|(index, _)| *index);
        if let Some((index, entry)) = self.side.last_key_value()
            && data_last.is_none_or(|last| *index > last)
        {
            return Ok(Some(entry.log_id));
        }
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

    /// Where the records of the entries up to the purge point end in the segment log:
    /// where those of the entries after it begin.
    fn start(&self, log: &PartitionLog) -> u64 {
        match (self.purged, self.spans.first_key_value()) {
            (Some((_, after)), _) => after,
            (None, Some((_, span))) => span.base,
            (None, None) => log.first_offset(),
        }
    }

    /// Where the records of the entries up to `index` end in the segment log.
    fn data_end_through(&self, index: u64, log: &PartitionLog) -> u64 {
        match self.spans.range(..=index).next_back() {
            Some((_, span)) => span.next,
            None => self.start(log),
        }
    }

    /// Where the committed entries end in the segment log: the commit gate, below which
    /// readers of messages see the partition. Everything up to the purge point is
    /// committed; without a committed id or a purge point nothing is.
    fn committed_end(&self, log: &PartitionLog) -> u64 {
        match self.committed {
            Some(committed) => self.data_end_through(committed.index, log),
            None => self.start(log),
        }
    }

    /// Writes the side entries to their file (by rename; synced when `sync`).
    fn save_side(&self, sync: bool) -> std::io::Result<()> {
        let entries: Vec<&Entry> = self.side.values().collect();
        write_small(&self.dir, ENTRIES, &entries, sync)
            .map_err(|e| io_err("saving the log's entries without records", e))
    }

    /// True when the log holds nothing a voter must remember (no vote, no entry, no purge
    /// point).
    fn is_blank(&self) -> bool {
        self.vote.is_none()
            && self.spans.is_empty()
            && self.side.is_empty()
            && self.purged.is_none()
    }

    /// Writes the held marker, if it is still to be written, durably.
    fn write_held_marker(&mut self) -> std::io::Result<()> {
        let Some(marker) = self.held_marker.take() else {
            return Ok(());
        };
        if let Err(error) = write_marker(&marker, true) {
            self.held_marker = Some(marker);
            return Err(io_err("writing the held marker", error));
        }
        Ok(())
    }

    /// Where openraft may still read: the first offset after the purge point (the log's
    /// first without one). Retention and compaction keep to below it.
    fn floor(&self, log: &PartitionLog) -> u64 {
        self.purged
            .map_or_else(|| log.first_offset(), |(_, after)| after)
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
        let side: Vec<Entry> = read_small(&dir, ENTRIES)?.unwrap_or_default();
        let purged_index = purged.map(|(id, _)| id.index);
        let committed_file = InPlaceFile::new(dir.join(COMMITTED));
        let mut inner = Inner {
            vote: read_small(&dir, VOTE)?,
            committed: committed_file.read::<Option<LogId>>().flatten(),
            committed_file,
            dir,
            queue: queue.to_string(),
            partition,
            side: side
                .into_iter()
                .filter(|e| purged_index.is_none_or(|p| e.log_id.index > p))
                .map(|e| (e.log_id.index, e))
                .collect(),
            spans: BTreeMap::new(),
            unsynced: BTreeMap::new(),
            leaders: leaders.into_iter().collect(),
            last_log_id: None,
            purged,
            held_marker: None,
        };
        inner.spans = scan_spans(&log, purged)?;
        cut_at_gap(&log, &mut inner)?;
        inner.last_log_id = inner.last_id(&log)?;
        log.set_commit_gate(Some(inner.committed_end(&log)));
        log.keep_from(inner.floor(&log));
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

    /// True when the log holds nothing a voter must remember (no vote, no entry, no purge
    /// point): a new replica's, or one whose files were lost.
    pub fn is_blank(&self) -> bool {
        self.inner.lock().is_blank()
    }

    /// Makes `marker` (a file outside the log's directory) the lasting sign that this node
    /// held the log: written now when the log holds state, else before its first vote or
    /// entry is written (as `LogStore::mark_held`).
    pub fn mark_held(&self, marker: PathBuf) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        inner.held_marker = Some(marker);
        if inner.is_blank() {
            return Ok(());
        }
        inner.write_held_marker()
    }

    /// The id of the last entry written (or the purge point of an empty log).
    pub fn tip(&self) -> Option<LogId> {
        self.inner.lock().last_log_id
    }

    /// Writes `membership` as the first entry of an empty log, as if `leader` had written
    /// it with openraft's `initialize` (see `LogStore::seed`), durably; returns whether it
    /// wrote it (not when the log holds entries or a purge point).
    pub async fn seed(&self, leader: u64, membership: Membership) -> std::io::Result<bool> {
        let end = {
            let mut inner = self.inner.lock();
            if inner.last_log_id.is_some() {
                return Ok(false);
            }
            inner.write_held_marker()?;
            let entry = Entry {
                log_id: super::types::log_id(0, leader, 0),
                payload: EntryPayload::Membership(membership),
            };
            append_locked(&self.log, &mut inner, [entry])?
        };
        self.log
            .durable(end)
            .await
            .map_err(|e| io_err("writing the initial membership", e))?;
        Ok(true)
    }

    /// The purge point's index (`None`: nothing purged).
    pub fn purged_index(&self) -> Option<u64> {
        self.inner.lock().purged.map(|(id, _)| id.index)
    }

    /// The offsets of entry `index`'s batch (first, one past the last), while the log
    /// holds it.
    pub fn span_of(&self, index: u64) -> Option<(u64, u64)> {
        self.inner
            .lock()
            .spans
            .get(&index)
            .map(|span| (span.base, span.next))
    }

    /// Where the records of the entries up to `index` end in the segment log, while the
    /// log holds entry `index` (or it is the purge point).
    pub fn end_of(&self, index: u64) -> Option<u64> {
        let inner = self.inner.lock();
        let held = inner.spans.contains_key(&index)
            || inner.side.contains_key(&index)
            || inner.purged.is_some_and(|(id, _)| id.index == index);
        held.then(|| inner.data_end_through(index, &self.log))
    }

    /// Where the partition's records are (the directory the broker's partition directory
    /// links to, see `cluster::group_log`).
    pub fn segments_dir(&self) -> PathBuf {
        self.inner.lock().dir.join(SEGMENTS)
    }

    /// True when the log holds entry `log_id` itself (same index and term).
    pub fn holds(&self, log_id: &LogId) -> std::io::Result<bool> {
        let inner = self.inner.lock();
        if inner.purged.is_some_and(|(id, _)| id == *log_id) {
            return Ok(true);
        }
        if let Some(entry) = inner
            .unsynced
            .get(&log_id.index)
            .or_else(|| inner.side.get(&log_id.index))
        {
            return Ok(entry.log_id == *log_id);
        }
        let Some(span) = inner.spans.get(&log_id.index) else {
            return Ok(false);
        };
        let batches = self
            .log
            .batches_from(span.base, 1)
            .map_err(|e| io_err(format!("reading entry {}", log_id.index), e))?;
        match batches.first() {
            Some((header, _)) => {
                Ok(inner.log_id(header.leader_epoch, header.raft_index)? == *log_id)
            }
            None => Ok(false),
        }
    }

    /// Starts the log over after the partition was replaced by a snapshot's records, which
    /// cover the entries up to `last` and end where the partition now ends: every entry up
    /// to `last` counts as purged (and committed: readers see the whole partition), none
    /// follows.
    pub fn reset_to_snapshot(&self, last: LogId) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        let end = self.log.written_end();
        write_small(&inner.dir, PURGED, &(last, end), true)
            .map_err(|e| io_err(format!("starting over at snapshot {last}"), e))?;
        inner.purged = Some((last, end));
        inner.spans.clear();
        inner.unsynced.clear();
        inner.side.clear();
        inner.save_side(true)?;
        inner.last_log_id = Some(last);
        inner
            .leaders
            .entry(last.leader_id.term)
            .or_insert(last.leader_id.node_id);
        self.log.set_commit_gate(Some(end));
        self.log.keep_from(end);
        Ok(())
    }

    /// Reads the entries `wanted` (consecutive indexes) back: those without records from
    /// memory, those with records from the segments in one read (their batches follow one
    /// another), the last of them from memory while their batches are not readable yet.
    fn read_entries(&self, inner: &Inner, wanted: &[u64]) -> std::io::Result<Vec<Entry>> {
        let on_disk: Vec<(u64, Span)> = wanted
            .iter()
            .filter(|index| !inner.unsynced.contains_key(index))
            .filter_map(|index| inner.spans.get(index).map(|span| (*index, *span)))
            .collect();
        let mut batches = Vec::new();
        if let Some((first, span)) = on_disk.first() {
            let subject = || format!("reading entries from {first}");
            batches = self
                .log
                .batches_from(span.base, on_disk.len())
                .map_err(|e| io_err(subject(), e))?;
            if batches.len() != on_disk.len() {
                return Err(io_err(
                    subject(),
                    format!("{} of {} batches are there", batches.len(), on_disk.len()),
                ));
            }
        }
        let mut batches = batches.into_iter();
        let mut out = Vec::with_capacity(wanted.len());
        for index in wanted {
            if let Some(entry) = inner.side.get(index).or_else(|| inner.unsynced.get(index)) {
                out.push(entry.clone());
                continue;
            }
            let (header, bytes) = batches
                .next()
                .ok_or_else(|| io_err(format!("reading entry {index}"), "not in the log"))?;
            if header.raft_index != *index {
                return Err(io_err(
                    format!("reading entry {index}"),
                    format!("the batch there holds entry {}", header.raft_index),
                ));
            }
            out.push(entry_of(inner, &header, &bytes)?);
        }
        Ok(out)
    }
}

/// The spans of the entries with records after the purge point, from the segments (in
/// index order: each batch's index is above its predecessor's, or opening fails naming
/// the offset).
fn scan_spans(
    log: &PartitionLog,
    purged: Option<(LogId, u64)>,
) -> std::io::Result<BTreeMap<u64, Span>> {
    let mut spans = BTreeMap::new();
    let mut at = purged.map_or(log.first_offset(), |(_, next)| next);
    let mut above = purged.map(|(id, _)| id.index);
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
            if above.is_some_and(|above| index <= above) {
                return Err(io_err(
                    "opening the log",
                    format!(
                        "the batch at offset {} holds entry {index}, after entry {above:?}",
                        header.base_offset
                    ),
                ));
            }
            above = Some(index);
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

/// Cuts the log at its first missing entry: an entry without records whose side file was
/// not saved yet when the node stopped leaves the entries written after it without their
/// predecessor (none of them was reported durable: the side file is saved before an
/// append is). A missing entry at or below the saved committed one is damage, not such a
/// tail: opening fails.
fn cut_at_gap(log: &PartitionLog, inner: &mut Inner) -> std::io::Result<()> {
    let mut expected = inner.purged.map(|(id, _)| id.index + 1);
    let mut gap = None;
    let indexes = {
        let mut all: Vec<u64> = inner
            .spans
            .keys()
            .chain(inner.side.keys())
            .copied()
            .collect();
        all.sort_unstable();
        all
    };
    for index in indexes {
        if expected.is_some_and(|e| e != index) {
            gap = expected;
            break;
        }
        expected = Some(index + 1);
    }
    let Some(gap) = gap else {
        return Ok(());
    };
    if inner.committed.is_some_and(|c| c.index >= gap) {
        return Err(io_err(
            "opening the log",
            format!(
                "entry {gap} is missing, and the entries up to {:?} were committed",
                inner.committed.map(|c| c.index)
            ),
        ));
    }
    tracing::warn!(dir = %inner.dir.display(), entry = gap, "the log ends where an entry is missing: the entries written after it are dropped");
    if inner.side.range(gap..).next().is_some() {
        inner.side.split_off(&gap);
        inner.save_side(true)?;
    }
    if let Some((_, span)) = inner.spans.range(gap..).next() {
        let cut = span.base;
        log.truncate_suffix_now(cut)
            .map_err(|e| io_err(format!("cutting the log at entry {gap}"), e))?;
        inner.spans.split_off(&gap);
    }
    Ok(())
}

/// The batch an entry is written as, when it holds records for this log's partition (a
/// `Records` or `RecordBatch` command): a data batch of exactly those records, stamped
/// with the entry's term and index. `None` for any other entry (kept in the side file).
fn batch_of(inner: &Inner, entry: &Entry) -> std::io::Result<Option<(Stamp, Vec<Record>)>> {
    let subject = || format!("writing entry {}", entry.log_id);
    let records = match &entry.payload {
        EntryPayload::Normal(Command::Records(r)) => Some(r.clone()),
        // Records as one buffer are the same records (read back as `Command::Records`).
        EntryPayload::Normal(Command::RecordBatch(batch)) => Some(batch.decode().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", subject()),
            )
        })?),
        _ => None,
    };
    let Some(r) = records.filter(|r| {
        r.queue == inner.queue && r.partition == inner.partition && !r.records.is_empty()
    }) else {
        return Ok(None);
    };
    let stamp = Stamp {
        leader_epoch: entry.log_id.leader_id.term,
        raft_index: entry.log_id.index,
        entry_type: EntryType::Data,
    };
    Ok(Some((
        stamp,
        r.records.into_iter().map(Record::from).collect(),
    )))
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
        let mut wanted: Vec<u64> = inner
            .spans
            .range(range.clone())
            .map(|(i, _)| *i)
            .chain(inner.side.range(range).map(|(i, _)| *i))
            .collect();
        wanted.sort_unstable();
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
        inner.write_held_marker()?;
        write_small(&inner.dir, VOTE, vote, true).map_err(|e| io_err("saving the vote", e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        // Synced with the next vote or append: a lost committed id is learnt again.
        inner
            .committed_file
            .write(&committed)
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
            inner
                .write_held_marker()
                .and_then(|()| append_locked(&self.log, &mut inner, entries))
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
        let cut = {
            let mut inner = self.inner.lock();
            // The side entries first: a crash in between leaves later records without
            // their predecessor, which opening cuts.
            if inner.side.range(from..).next().is_some() {
                inner.side.split_off(&from);
                inner.save_side(true)?;
            }
            inner.spans.range(from..).next().map(|(_, s)| s.base)
        };
        if let Some(offset) = cut {
            self.log
                .truncate_suffix(offset)
                .await
                .map_err(|e| io_err(format!("truncating after {last:?}"), e))?;
        }
        let mut inner = self.inner.lock();
        inner.spans.split_off(&from);
        inner.unsynced.split_off(&from);
        inner.last_log_id = inner.last_id(&self.log)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        // Where the records after the purge point begin (past the last entry, a snapshot
        // installed: at the end).
        let after = inner
            .spans
            .range(log_id.index + 1..)
            .next()
            .map_or_else(|| inner.end(&self.log), |(_, s)| s.base);
        write_small(&inner.dir, PURGED, &(log_id, after), true)
            .map_err(|e| io_err(format!("purging up to {log_id}"), e))?;
        inner.purged = Some((log_id, after));
        // Only committed entries are purged.
        self.log.commit_to(after);
        self.log.keep_from(after);
        let kept = inner.spans.split_off(&(log_id.index + 1));
        inner.spans = kept;
        let kept = inner.unsynced.split_off(&(log_id.index + 1));
        inner.unsynced = kept;
        if inner.side.range(..=log_id.index).next().is_some() {
            let kept = inner.side.split_off(&(log_id.index + 1));
            inner.side = kept;
            // Not synced: entries at or below the purge point are passed over on open.
            inner.save_side(false)?;
        }
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
    let mut side_changed = false;
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
        let index = entry.log_id.index;
        inner.last_log_id = Some(entry.log_id);
        let Some((stamp, records)) = batch_of(inner, &entry)? else {
            inner.side.insert(index, entry);
            side_changed = true;
            continue;
        };
        let (base, next) = log
            .append_entry(stamp, &records)
            .map_err(|e| io_err(subject(), e))?;
        inner.spans.insert(index, Span { base, next });
        inner.unsynced.insert(index, entry);
        end = next;
    }
    if side_changed {
        // Synced before the append counts as durable.
        inner.save_side(true)?;
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
        assert_eq!(log.written_end(), 0, "the data batch is not readable yet");
        assert_eq!(all(&mut store).await, [entry(0, 1, 1), entry(3, 1, 2)]);
        log.durable(end).await.unwrap();
        assert_eq!(log.written_end(), end);
        assert_eq!(all(&mut store).await, [entry(0, 1, 1), entry(3, 1, 2)]);
        assert!(store.inner.lock().unsynced.is_empty());
    }

    /// Entries without records (membership, blank, commands) take no offset: a new
    /// group's first message is at offset 0 after its initial membership and its first
    /// leader's blank entry, and the partition's offsets count its messages only.
    #[tokio::test]
    async fn entries_without_records_take_no_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), FsyncPolicy::Never);
        let entries = vec![
            entry(1, 1, 1),
            entry(0, 1, 2),
            entry(3, 1, 3),
            entry(2, 1, 4),
        ];
        let count = data_of(&entries[2]).len() as u64;
        append(&mut store, entries.clone()).await;
        store.save_committed(Some(log_id(1, 2, 4))).await.unwrap();
        let log = store.partition_log().clone();
        assert_eq!((log.first_offset(), log.next_offset()), (0, count));
        assert_eq!(store.span_of(3), Some((0, count)));
        assert_eq!(store.end_of(2), Some(0));
        assert_eq!(store.end_of(4), Some(count));
        drop(store);
        let mut store = open(dir.path(), FsyncPolicy::Never);
        assert_eq!(all(&mut store).await, entries);
        assert_eq!(messages(&store), data_of(&entries[2]));
    }

    /// A log whose side file lost its last entries (the node stopped before it was
    /// saved) ends where the first one is missing: the records written after it are cut
    /// off, never read as entries that do not follow their predecessor. Below the
    /// committed entry a missing entry is damage: opening fails.
    #[tokio::test]
    async fn a_missing_entry_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), FsyncPolicy::Never);
        append(&mut store, vec![entry(3, 1, 1)]).await;
        let saved = std::fs::read(dir.path().join("raft").join(ENTRIES)).ok();
        append(&mut store, vec![entry(0, 1, 2), entry(3, 1, 3)]).await;
        drop(store);
        let side = dir.path().join("raft").join(ENTRIES);
        match &saved {
            Some(bytes) => std::fs::write(&side, bytes).unwrap(),
            None => std::fs::remove_file(&side).unwrap(),
        }
        let mut store = open(dir.path(), FsyncPolicy::Never);
        assert_eq!(all(&mut store).await, [entry(3, 1, 1)]);
        assert_eq!(
            store.get_log_state().await.unwrap().last_log_id,
            Some(log_id(1, 2, 1))
        );
        append(&mut store, vec![entry(0, 2, 2), entry(3, 2, 3)]).await;
        store.save_committed(Some(log_id(2, 0, 3))).await.unwrap();
        drop(store);
        std::fs::remove_file(&side).unwrap();
        let log = PartitionLog::open(
            &dir.path().join("partition"),
            LogConfig {
                segment_bytes: 256,
                ..LogConfig::default()
            },
        )
        .unwrap();
        let opened = PartitionLogStore::open(log, &dir.path().join("raft"), "q", 1);
        assert!(opened.is_err(), "a committed entry is missing");
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
