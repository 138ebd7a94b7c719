//! The Raft log of one group on disk ([`RaftLogStorage`]): a file of checksummed records
//! and small files for the vote, the committed id and the purge point.
//!
//! ```text
//! log:   record*      record = len u32 LE | crc32(payload) u32 LE | payload (an encoded Entry)
//! vote, committed, purged:     crc32(payload) u32 LE | payload (encoded), replaced by rename
//! ```
//! Opening scans the log file; a torn or corrupt tail (a crash mid-append) is cut off, which
//! Raft allows for entries this node never acknowledged. Truncation cuts the file; a purge
//! only records the purge point (the bytes below it stay until the file is rewritten — this
//! first version never rewrites it, and qit never purges: see `mod.rs`).
//!
//! Appends are written at once and, with `--fsync always`, synced before openraft is told
//! they are durable; with `interval`/`never` they are acknowledged from the page cache, as a
//! single node's publishes are.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, StorageError, StorageIOError, Vote};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::types::{TypeConfig, decode, encode};

/// Bytes of a record header: length and CRC.
const HEADER: usize = 8;

/// Where an entry lies in the log file.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Offset of the record header.
    pos: u64,
    /// Payload length.
    len: u32,
}

struct Inner {
    dir: PathBuf,
    file: File,
    /// Length of the valid log file.
    end: u64,
    slots: BTreeMap<u64, Slot>,
    last_log_id: Option<LogId<u64>>,
    purged: Option<LogId<u64>>,
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
    sync: bool,
}

/// One group's Raft log (cheap to clone: clones share the files).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

fn io_err(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<u64> {
    StorageError::IO {
        source: StorageIOError::new(subject, verb, openraft::AnyError::new(&e)),
    }
}

fn write_small<T: Serialize>(dir: &Path, name: &str, value: &T, sync: bool) -> std::io::Result<()> {
    let payload = encode(value).map_err(std::io::Error::other)?;
    let mut bytes = crc32fast::hash(&payload).to_le_bytes().to_vec();
    bytes.extend_from_slice(&payload);
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        if sync {
            file.sync_data()?;
        }
    }
    std::fs::rename(&tmp, dir.join(name))?;
    if sync {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_small<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> std::io::Result<Option<T>> {
    let mut bytes = Vec::new();
    match File::open(dir.join(name)) {
        Ok(mut file) => file.read_to_end(&mut bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let corrupt =
        || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{name}: corrupt"));
    let (crc, payload) = bytes.split_at_checked(4).ok_or_else(corrupt)?;
    let crc = u32::from_le_bytes(crc.try_into().map_err(|_| corrupt())?);
    if crc32fast::hash(payload) != crc {
        return Err(corrupt());
    }
    decode(payload).map(Some).map_err(|_| corrupt())
}

/// Scans the log file: the valid records and where they end.
fn scan(bytes: &[u8]) -> (Vec<(LogId<u64>, Slot)>, u64) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while let Some(header) = bytes.get(pos..pos + HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(payload) = bytes.get(pos + HEADER..pos + HEADER + len as usize) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(entry) = decode::<Entry<TypeConfig>>(payload) else {
            break;
        };
        out.push((
            entry.log_id,
            Slot {
                pos: pos as u64,
                len,
            },
        ));
        pos += HEADER + len as usize;
    }
    (out, pos as u64)
}

impl LogStore {
    /// Opens (or creates) the log in `dir`; `sync` makes every append durable before it is
    /// acknowledged.
    pub fn open(dir: &Path, sync: bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("log");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes)?;
        let (records, end) = scan(&bytes);
        if end < bytes.len() as u64 {
            tracing::warn!(path = %path.display(), valid = end, len = bytes.len(), "raft log: cutting a torn tail");
            file.set_len(end)?;
            file.sync_all()?;
        }
        let purged: Option<LogId<u64>> = read_small(dir, "purged")?;
        let mut slots = BTreeMap::new();
        let mut last_log_id = purged;
        for (log_id, slot) in records {
            if purged.is_some_and(|p| log_id.index <= p.index) {
                continue;
            }
            slots.insert(log_id.index, slot);
            last_log_id = Some(log_id);
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                dir: dir.to_path_buf(),
                file,
                end,
                slots,
                last_log_id,
                purged,
                vote: read_small(dir, "vote")?,
                committed: read_small(dir, "committed")?,
                sync,
            })),
        })
    }

    // openraft's own error type, as its traits return it.
    #[allow(clippy::result_large_err)]
    fn read_entry(
        inner: &Inner,
        index: u64,
        slot: Slot,
    ) -> Result<Entry<TypeConfig>, StorageError<u64>> {
        let subject = ErrorSubject::Log(LogId::new(openraft::CommittedLeaderId::new(0, 0), index));
        let mut buf = vec![0u8; slot.len as usize];
        inner
            .file
            .read_exact_at(&mut buf, slot.pos + HEADER as u64)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?;
        decode(&buf).map_err(|e| io_err(subject, ErrorVerb::Read, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let inner = self.inner.lock();
        let mut entries = Vec::new();
        for (index, slot) in inner.slots.range(range) {
            entries.push(Self::read_entry(&inner, *index, *slot)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let inner = self.inner.lock();
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: inner.last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let mut inner = self.inner.lock();
        write_small(&inner.dir, "vote", vote, true)
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(self.inner.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        let mut inner = self.inner.lock();
        // Not synced: a lost committed id is learnt again from the leader.
        let saved = match &committed {
            Some(id) => write_small(&inner.dir, "committed", id, false),
            None => match std::fs::remove_file(inner.dir.join("committed")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        saved.map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.inner.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.inner.lock();
        let mut bytes = Vec::new();
        let mut added = Vec::new();
        let mut pos = inner.end;
        for entry in entries {
            let subject = ErrorSubject::Log(entry.log_id);
            let payload =
                encode(&entry).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
            let len =
                u32::try_from(payload.len()).map_err(|e| io_err(subject, ErrorVerb::Write, e))?;
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            bytes.extend_from_slice(&payload);
            added.push((entry.log_id, Slot { pos, len }));
            pos += (HEADER + payload.len()) as u64;
        }
        let written = inner.file.write_all_at(&bytes, inner.end).and_then(|()| {
            if inner.sync {
                inner.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            let message = e.to_string();
            callback.log_io_completed(Err(std::io::Error::other(message)));
            return Err(io_err(ErrorSubject::Logs, ErrorVerb::Write, e));
        }
        inner.end = pos;
        for (log_id, slot) in added {
            inner.slots.insert(log_id.index, slot);
            inner.last_log_id = Some(log_id);
        }
        drop(inner);
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut inner = self.inner.lock();
        let removed = inner.slots.split_off(&log_id.index);
        let Some(first) = removed.values().next().copied() else {
            return Ok(());
        };
        inner
            .file
            .set_len(first.pos)
            .and_then(|()| inner.file.sync_data())
            .map_err(|e| io_err(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))?;
        inner.end = first.pos;
        let last = match inner.slots.iter().next_back() {
            Some((index, slot)) => Some(Self::read_entry(&inner, *index, *slot)?.log_id),
            None => inner.purged,
        };
        inner.last_log_id = last;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut inner = self.inner.lock();
        write_small(&inner.dir, "purged", &log_id, true)
            .map_err(|e| io_err(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))?;
        inner.purged = Some(log_id);
        let kept = inner.slots.split_off(&(log_id.index + 1));
        inner.slots = kept;
        if inner
            .last_log_id
            .is_none_or(|last| last.index < log_id.index)
        {
            inner.last_log_id = Some(log_id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A log file cut at any byte opens with exactly the whole records before the cut.
        #[test]
        fn a_torn_tail_keeps_the_whole_records(n in 1usize..6, cut_back in 0usize..64) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            for i in 0..n {
                let entry: Entry<TypeConfig> = Entry {
                    log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i as u64),
                    payload: openraft::EntryPayload::Blank,
                };
                let payload = encode(&entry).unwrap();
                bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
                bytes.extend_from_slice(&payload);
                ends.push(bytes.len() as u64);
            }
            let cut = bytes.len().saturating_sub(cut_back);
            let (records, end) = scan(&bytes[..cut]);
            let whole = ends.iter().filter(|e| **e <= cut as u64).count();
            prop_assert_eq!(records.len(), whole);
            prop_assert_eq!(end, if whole == 0 { 0 } else { ends[whole - 1] });
        }

        /// Garbage never panics the scan.
        #[test]
        fn scanning_garbage_does_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = scan(&bytes);
        }
    }
}
