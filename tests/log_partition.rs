//! The partition log end to end: appends, reads, rolls, reopen, recovery of torn tails,
//! corruption detection, concurrent readers, retention drops and suffix truncation.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use proptest::prelude::*;
use qit::log::record::Stamp;
use qit::log::{Compression, FsyncPolicy, LogConfig, LogError, PartitionLog, Record};

fn config(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

fn rec(i: u64) -> Record {
    Record {
        timestamp_ms: 1_000 + i as i64,
        key: i
            .is_multiple_of(3)
            .then(|| Bytes::from(format!("k{}", i % 7))),
        headers: vec![("n".into(), Bytes::from(i.to_string()))],
        value: Bytes::from(format!("value-{i}-{}", "x".repeat((i % 50) as usize))),
    }
}

fn values(log: &PartitionLog, from: u64) -> Vec<(u64, Bytes)> {
    log.read(from, usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| (r.offset, r.value))
        .collect()
}

fn log_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

fn assert_prefix(got: &[(u64, Bytes)], len: usize) {
    assert_eq!(got.len(), len);
    for (i, (offset, value)) in got.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(*value, rec(i as u64).value);
    }
}

#[tokio::test]
async fn append_then_read_back_everything() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(64 * 1024 * 1024)).unwrap();
    assert_eq!(log.append(vec![rec(0), rec(1)]).await.unwrap(), 0);
    assert_eq!(log.append(vec![rec(2)]).await.unwrap(), 2);
    assert_eq!(log.next_offset(), 3);
    let records = log.read(0, 100, usize::MAX).unwrap();
    assert_eq!(records.len(), 3);
    for (i, r) in records.iter().enumerate() {
        let want = rec(i as u64);
        assert_eq!(r.offset, i as u64);
        assert_eq!(r.value, want.value);
        assert_eq!(r.key, want.key);
        assert_eq!(r.headers, want.headers);
        assert_eq!(r.timestamp_ms, want.timestamp_ms);
    }
    // From the middle of a batch, and budgets.
    assert_eq!(log.read(1, 100, usize::MAX).unwrap()[0].offset, 1);
    assert_eq!(log.read(0, 2, usize::MAX).unwrap().len(), 2);
    assert_eq!(log.read(0, 100, 1).unwrap().len(), 1, "at least one record");
    assert!(log.read(3, 100, usize::MAX).unwrap().is_empty());
}

#[tokio::test]
async fn rolls_segments_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = PartitionLog::open(dir.path(), config(4096)).unwrap();
        for i in 0..200 {
            log.append(vec![rec(i)]).await.unwrap();
        }
        assert!(log.segments().len() > 3);
        assert!(log.segments().iter().rev().skip(1).all(|s| s.sealed));
    }
    let log = PartitionLog::open(dir.path(), config(4096)).unwrap();
    assert_eq!(log.next_offset(), 200);
    assert_prefix(&values(&log, 0), 200);
    assert_eq!(log.append(vec![rec(200)]).await.unwrap(), 200);
    // `locate` names the segment holding an offset and a batch at or before it.
    let segments = log.segments();
    for offset in [0, 57, 120, 200] {
        let (base, position) = log.locate(offset).unwrap().unwrap();
        let segment = segments.iter().find(|s| s.base_offset == base).unwrap();
        assert!(
            base <= offset && offset < segment.next_offset,
            "offset {offset}"
        );
        assert!(position < segment.bytes);
    }
    assert_eq!(log.locate(201).unwrap(), None);
}

/// A batch carries the stamp (leader epoch and Raft index) set when it was appended
/// (zeros until one is set), and keeps it across a reopen; reading is not affected.
#[tokio::test]
async fn batches_carry_the_stamp_set_when_they_were_appended() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(1 << 20)).unwrap();
    let stamp = |leader_epoch, raft_index| Stamp {
        leader_epoch,
        raft_index,
        ..Stamp::default()
    };
    log.append(vec![rec(0)]).await.unwrap();
    log.set_stamp(stamp(3, 11));
    log.append(vec![rec(1), rec(2)]).await.unwrap();
    log.set_stamp(stamp(7, 12));
    log.append(vec![rec(3)]).await.unwrap();
    drop(log);
    let stamps = |dir: &Path| -> Vec<(u64, u64, u64)> {
        qit::log::inspect::inspect(dir, false)
            .unwrap()
            .iter()
            .flat_map(|s| {
                s.batches
                    .iter()
                    .map(|b| (b.base_offset, b.leader_epoch, b.raft_index))
            })
            .collect()
    };
    assert_eq!(stamps(dir.path()), [(0, 0, 0), (1, 3, 11), (3, 7, 12)]);
    let log = PartitionLog::open(dir.path(), config(1 << 20)).unwrap();
    assert_prefix(&values(&log, 0), 4);
    // A reopened log starts at zeros again until told: the stamp is the writer's, not the
    // file's.
    log.append(vec![rec(4)]).await.unwrap();
    drop(log);
    assert_eq!(stamps(dir.path()).last(), Some(&(4, 0, 0)));
}

/// A log that is a Raft group's log: each entry is a batch of its own with its type, term
/// and index; readers of records pass over the group's own entries (their offsets are
/// gaps), `batches_from` gives every batch back whole, and compaction and a reopen keep
/// them.
#[tokio::test]
async fn raft_entries_are_batches_readers_of_records_pass_over() {
    use qit::log::record::EntryType;
    let dir = tempfile::tempdir().unwrap();
    // Small segments: every entry past the first rolls, so reads cross segments.
    let log = PartitionLog::open(dir.path(), config(64)).unwrap();
    let entry = |term, index, entry_type| Stamp {
        leader_epoch: term,
        raft_index: index,
        entry_type,
    };
    let control = |value: &'static [u8]| Record {
        value: Bytes::from_static(value),
        ..Record::default()
    };
    let appended = [
        log.append_entry(entry(1, 1, EntryType::Blank), &[control(b"")]),
        log.append_entry(entry(1, 2, EntryType::Data), &[rec(0), rec(1)]),
        log.append_entry(entry(1, 3, EntryType::Membership), &[control(b"m")]),
        log.append_entry(entry(2, 4, EntryType::Command), &[control(b"c")]),
        log.append_entry(entry(2, 5, EntryType::Data), &[rec(2)]),
    ]
    .map(Result::unwrap);
    assert_eq!(appended, [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6)]);
    // Nothing merges or splits an entry, and an empty one writes nothing.
    assert_eq!(
        log.append_entry(entry(2, 6, EntryType::Data), &[]).unwrap(),
        (6, 6)
    );
    let check = |log: &PartitionLog| {
        let read: Vec<(u64, Bytes)> = values(log, 0);
        let want = [(1, rec(0).value), (2, rec(1).value), (5, rec(2).value)];
        assert_eq!(read, want);
        assert_eq!(values(log, 3), want[2..]);
        let batches = log.batches_from(0, usize::MAX).unwrap();
        let shape: Vec<(u64, u64, u64, EntryType, u32)> = batches
            .iter()
            .map(|(h, _)| {
                (
                    h.base_offset,
                    h.leader_epoch,
                    h.raft_index,
                    h.entry_type,
                    h.record_count,
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (0, 1, 1, EntryType::Blank, 1),
                (1, 1, 2, EntryType::Data, 2),
                (3, 1, 3, EntryType::Membership, 1),
                (4, 2, 4, EntryType::Command, 1),
                (5, 2, 5, EntryType::Data, 1),
            ]
        );
        let (header, bytes) = &log.batches_from(3, 1).unwrap()[0];
        let records = qit::log::record::decode_records(header, bytes).unwrap();
        assert_eq!(records[0].value, Bytes::from_static(b"m"));
        assert_eq!(log.batches_from(4, 10).unwrap().len(), 2);
        assert!(log.batches_from(6, 10).unwrap().is_empty());
        // Offset 2 lies inside the data batch at 1: no entry starts there.
        assert!(matches!(
            log.batches_from(2, 1),
            Err(LogError::Corrupt { .. })
        ));
    };
    check(&log);
    drop(log);
    let log = PartitionLog::open(dir.path(), config(64)).unwrap();
    check(&log);
    // Compaction that drops every message keeps the group's own entries as they were.
    for segment in log.segments().into_iter().filter(|s| s.sealed) {
        log.rewrite_sealed(segment.base_offset, &mut |_| false)
            .unwrap();
    }
    assert_eq!(values(&log, 0), [(5, rec(2).value)]);
    let kept: Vec<(u64, EntryType)> = log
        .batches_from(0, usize::MAX)
        .unwrap()
        .iter()
        .filter(|(h, _)| h.record_count > 0)
        .map(|(h, _)| (h.base_offset, h.entry_type))
        .collect();
    assert_eq!(
        kept,
        [
            (0, EntryType::Blank),
            (3, EntryType::Membership),
            (4, EntryType::Command),
            (5, EntryType::Data),
        ]
    );
}

/// Under a commit gate, readers of records (reads, the next offset and its watchers,
/// lookups by offset and time) see only what lies below it, whatever is written; the Raft
/// reader sees everything written; the gate only moves on, and a truncation of the
/// uncommitted suffix changes nothing readers see.
#[tokio::test]
async fn a_commit_gate_holds_readers_back() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(1 << 20)).unwrap();
    log.append(vec![rec(0), rec(1)]).await.unwrap();
    log.set_commit_gate(Some(2));
    let mut watch = log.watch_next_offset();
    watch.mark_unchanged();
    let stamp = Stamp::default();
    assert_eq!(log.append_entry(stamp, &[rec(2), rec(3)]).unwrap(), (2, 4));
    assert_eq!(log.append_entry(stamp, &[rec(4)]).unwrap(), (4, 5));
    assert_eq!(log.next_offset(), 2);
    assert_eq!(log.written_end(), 5);
    assert_prefix(&values(&log, 0), 2);
    assert!(values(&log, 2).is_empty());
    assert_eq!(log.locate(2).unwrap(), None);
    assert_eq!(log.offset_for_timestamp(1_002).unwrap(), None);
    assert!(!watch.has_changed().unwrap(), "nothing new for readers");
    assert_eq!(log.batches_from(2, 10).unwrap().len(), 2);

    log.commit_to(4);
    assert!(watch.has_changed().unwrap());
    assert_eq!(*watch.borrow_and_update(), 4);
    assert_prefix(&values(&log, 0), 4);
    assert_eq!(log.offset_for_timestamp(1_002).unwrap(), Some(2));
    log.commit_to(3);
    assert_eq!(log.next_offset(), 4, "the gate never moves back");

    // The entry past the gate is cut (a new leader's log wins): readers see no change.
    log.truncate_suffix(4).await.unwrap();
    assert_eq!((log.written_end(), log.next_offset()), (4, 4));
    assert!(!watch.has_changed().unwrap());
    assert_eq!(log.append_entry(stamp, &[rec(4), rec(5)]).unwrap(), (4, 6));
    assert_eq!(log.next_offset(), 4);
    log.commit_to(6);
    assert_prefix(&values(&log, 0), 6);

    // Without a gate readers see what is written again.
    log.set_commit_gate(Some(6));
    log.append(vec![rec(6)]).await.unwrap();
    assert_eq!(log.next_offset(), 6);
    log.set_commit_gate(None);
    assert_prefix(&values(&log, 0), 7);
}

/// Appends and gate moves racing on two threads: what readers see never goes back, and
/// ends at the smaller of the two ends, watchers included.
#[test]
fn a_racing_commit_never_leaves_readers_behind() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(1 << 20)).unwrap();
    log.set_commit_gate(Some(0));
    let watch = log.watch_next_offset();
    const N: u64 = 2_000;
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut seen = 0;
            while !done.load(Ordering::Acquire) {
                let now = log.next_offset();
                assert!(now >= seen, "readers went back from {seen} to {now}");
                seen = now;
                std::thread::yield_now();
            }
        });
        let appender = scope.spawn(|| {
            for i in 0..N {
                log.append_entry(Stamp::default(), &[rec(i)]).unwrap();
            }
        });
        let committer = scope.spawn(|| {
            for end in 1..=N {
                log.commit_to(end);
            }
        });
        appender.join().unwrap();
        committer.join().unwrap();
        done.store(true, Ordering::Release);
    });
    assert_eq!(log.next_offset(), N);
    assert_eq!(*watch.borrow(), N);
}

/// Under `fsync = always` an entry is readable once durable, and `durable` waits for
/// the sync that covers it.
#[tokio::test]
async fn an_entry_is_read_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        fsync: FsyncPolicy::Always,
        ..config(1 << 20)
    };
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    let stamp = Stamp {
        leader_epoch: 1,
        raft_index: 1,
        ..Stamp::default()
    };
    let (first, end) = log.append_entry(stamp, &[rec(0)]).unwrap();
    assert_eq!((first, end), (0, 1));
    log.durable(end).await.unwrap();
    assert_eq!(log.batches_from(0, 1).unwrap().len(), 1);
    assert_prefix(&values(&log, 0), 1);
}

#[tokio::test]
async fn lz4_batches_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        compression: Compression::Lz4,
        ..config(1 << 20)
    };
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    let batch: Vec<Record> = (0..100).map(rec).collect();
    log.append(batch.clone()).await.unwrap();
    let got = log.read(0, 1000, usize::MAX).unwrap();
    assert_eq!(got.len(), 100);
    assert!(got.iter().zip(&batch).all(|(g, w)| g.value == w.value));
    let size: u64 = log.segments().iter().map(|s| s.bytes).sum();
    let raw: usize = batch.iter().map(|r| r.value.len()).sum();
    assert!((size as usize) < raw, "compressed {size} < raw {raw}");
}

#[tokio::test]
async fn finds_offsets_by_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
    for i in 0..300 {
        log.append(vec![rec(i)]).await.unwrap();
    }
    // rec(i) has timestamp 1000 + i.
    assert_eq!(log.offset_for_timestamp(0).unwrap(), Some(0));
    assert_eq!(log.offset_for_timestamp(1_150).unwrap(), Some(150));
    assert_eq!(log.offset_for_timestamp(1_299).unwrap(), Some(299));
    assert_eq!(log.offset_for_timestamp(1_300).unwrap(), None);
}

/// Cutting the active segment anywhere inside its last batch recovers exactly the batches
/// before it, and the log keeps working.
#[tokio::test]
async fn torn_tail_is_cut_at_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let before_last = {
        let log = PartitionLog::open(&path, config(1 << 20)).unwrap();
        for i in 0..4 {
            log.append(vec![rec(2 * i), rec(2 * i + 1)]).await.unwrap();
        }
        let before_last = log.segments()[0].bytes as usize;
        log.append(vec![rec(8), rec(9)]).await.unwrap();
        before_last
    };
    let file = log_files(&path).pop().unwrap();
    let whole = std::fs::read(&file).unwrap();
    for cut in before_last..whole.len() {
        std::fs::write(&file, &whole[..cut]).unwrap();
        let log = PartitionLog::open(&path, config(1 << 20)).unwrap();
        assert_eq!(log.next_offset(), 8, "cut at {cut}");
        assert_prefix(&values(&log, 0), 8);
        assert_eq!(log.append(vec![rec(8)]).await.unwrap(), 8);
        drop(log);
        std::fs::write(&file, &whole).unwrap();
    }
    let log = PartitionLog::open(&path, config(1 << 20)).unwrap();
    assert_eq!(log.next_offset(), 10, "the uncut file is whole");
}

#[tokio::test]
async fn flipped_byte_in_sealed_segment_is_an_error_on_read() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of several index intervals: opening checks only the tail of a sealed
    // segment, so damage early in it must be caught by the read's CRC check.
    let cfg = || config(16 * 1024);
    {
        let log = PartitionLog::open(dir.path(), cfg()).unwrap();
        for i in 0..600 {
            log.append(vec![rec(i)]).await.unwrap();
        }
        assert!(log.segments().len() > 1);
    }
    let first = log_files(dir.path()).remove(0);
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&first, &bytes).unwrap();
    let log = PartitionLog::open(dir.path(), cfg()).unwrap();
    match log.read(0, 1000, usize::MAX) {
        Err(LogError::Corrupt { path, position, .. }) => {
            assert_eq!(path, first);
            assert!(
                position <= 100,
                "the damaged batch starts at or before byte 100"
            );
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
    // Reads that do not touch the damaged batch still work.
    let later = log.segments()[1].base_offset;
    assert_eq!(log.read(later, 1, usize::MAX).unwrap()[0].offset, later);
}

#[tokio::test]
async fn torn_sealed_segment_fails_open_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
        for i in 0..100 {
            log.append(vec![rec(i)]).await.unwrap();
        }
    }
    let first = log_files(dir.path()).remove(0);
    let bytes = std::fs::read(&first).unwrap();
    std::fs::write(&first, &bytes[..bytes.len() - 3]).unwrap();
    let err = PartitionLog::open(dir.path(), config(2048)).unwrap_err();
    assert!(
        err.to_string().contains(&first.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn missing_indexes_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = PartitionLog::open(dir.path(), config(8192)).unwrap();
        for i in 0..300 {
            log.append(vec![rec(i)]).await.unwrap();
        }
    }
    for file in log_files(dir.path()) {
        std::fs::remove_file(file.with_extension("index")).unwrap();
        std::fs::write(file.with_extension("timeindex"), b"garbage").unwrap();
    }
    let log = PartitionLog::open(dir.path(), config(8192)).unwrap();
    assert_prefix(&values(&log, 0), 300);
    assert_eq!(log.read(250, 1, usize::MAX).unwrap()[0].offset, 250);
    assert_eq!(log.offset_for_timestamp(1_250).unwrap(), Some(250));
    for file in log_files(dir.path()) {
        assert!(std::fs::metadata(file.with_extension("index")).is_ok());
    }
}

/// Regression: opening checks only the last index entry of a sealed segment against the
/// log, so a stale entry earlier in the index must be caught when a read uses it, never
/// followed to the wrong batch (which would skip records silently).
#[tokio::test]
async fn a_stale_index_entry_is_an_error_on_read_not_a_silent_skip() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || LogConfig {
        index_interval_bytes: 256,
        ..config(16 * 1024)
    };
    {
        let log = PartitionLog::open(dir.path(), cfg()).unwrap();
        for i in 0..600 {
            log.append(vec![rec(i)]).await.unwrap();
        }
        assert!(log.segments().len() > 1);
    }
    let first = log_files(dir.path()).remove(0);
    let index_path = first.with_extension("index");
    let mut index = std::fs::read(&index_path).unwrap();
    // Entries are (relative offset u32, position u32); one per few one-record batches.
    let rel =
        |index: &[u8], i: usize| u32::from_le_bytes(index[8 * i..8 * i + 4].try_into().unwrap());
    assert!(index.len() >= 3 * 8 && rel(&index, 1) >= 2 && rel(&index, 2) > rel(&index, 1));
    // Entry 1 now claims one offset less than the batch it points at: still ascending, but
    // stale. Followed blindly, a read of that offset would return the next one instead.
    let claimed = rel(&index, 1) - 1;
    index[8..12].copy_from_slice(&claimed.to_le_bytes());
    std::fs::write(&index_path, &index).unwrap();
    let log = PartitionLog::open(dir.path(), cfg()).unwrap();
    let second_offset = u64::from(claimed);
    match log.read(second_offset, 1, usize::MAX) {
        Err(LogError::Corrupt { path, .. }) => assert_eq!(path, index_path),
        other => panic!("expected an index error, got {other:?}"),
    }
}

/// Regression (issue 11): this test asserted that each reader thread had run at least once
/// by the time the writer finished, which a busy machine does not promise. It now waits until
/// every reader has checked at least one read (a deadline only guards against a hang), and
/// asserts on what the readers saw, not on how they were scheduled.
#[tokio::test]
async fn readers_see_a_consistent_prefix_while_writing() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(8192)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let checks: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let readers: Vec<_> = checks
        .iter()
        .map(|checks| {
            let log = log.clone();
            let stop = Arc::clone(&stop);
            let checks = Arc::clone(checks);
            std::thread::spawn(move || {
                let mut longest = 0;
                while !stop.load(Ordering::Relaxed) {
                    let got = log.read(0, usize::MAX, usize::MAX).unwrap();
                    for (i, r) in got.iter().enumerate() {
                        assert_eq!(r.offset, i as u64);
                        assert_eq!(r.value, rec(i as u64).value);
                    }
                    assert!(got.len() >= longest, "a later read never sees less");
                    longest = got.len();
                    checks.fetch_add(1, Ordering::Relaxed);
                }
                longest
            })
        })
        .collect();
    for i in 0..100 {
        log.append(vec![rec(2 * i), rec(2 * i + 1)]).await.unwrap();
    }
    // Wait on the condition, not on the scheduler: every reader has checked a read.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while checks.iter().any(|c| c.load(Ordering::Relaxed) == 0) {
        if readers.iter().any(|r| r.is_finished()) {
            break; // a reader panicked: its join below reports why
        }
        assert!(std::time::Instant::now() < deadline, "readers never ran");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.join().unwrap() <= 200);
    }
    assert_eq!(log.read(0, usize::MAX, usize::MAX).unwrap().len(), 200);
}

#[tokio::test]
async fn dropping_segments_is_safe_for_readers_holding_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
    for i in 0..100 {
        log.append(vec![rec(i)]).await.unwrap();
    }
    let held = log.read(0, 10, usize::MAX).unwrap();
    let second_base = log.segments()[1].base_offset;
    assert_eq!(log.drop_segments_before(second_base).unwrap(), 1);
    assert_eq!(log.first_offset(), second_base);
    assert_eq!(
        held[0].value,
        rec(0).value,
        "bytes of a dropped segment stay readable"
    );
    assert_eq!(log.read(0, 1, usize::MAX).unwrap()[0].offset, second_base);
    // Never the active segment.
    log.drop_segments_before(u64::MAX).unwrap();
    assert_eq!(log.segments().len(), 1);
    assert_eq!(log.next_offset(), 100);
    drop(log);
    let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
    assert_eq!(log.next_offset(), 100);
}

#[tokio::test]
async fn truncate_suffix_removes_the_tail_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
    for i in 0..50 {
        log.append(vec![rec(2 * i), rec(2 * i + 1)]).await.unwrap();
    }
    log.truncate_suffix(37).await.unwrap();
    assert_eq!(log.next_offset(), 37);
    assert_prefix(&values(&log, 0), 37);
    assert_eq!(log.append(vec![rec(37)]).await.unwrap(), 37);
    drop(log);
    let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
    assert_eq!(log.next_offset(), 38);
    assert_prefix(&values(&log, 0), 38);
}

/// Copies every file of directory `from` into directory `to`.
fn copy_files(from: &Path, to: &Path) -> std::io::Result<()> {
    for file in std::fs::read_dir(from)? {
        let file = file?.path();
        if let Some(name) = file.file_name() {
            std::fs::copy(&file, to.join(name))?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn replace_swaps_in_another_copy_and_appends_go_on_after_it() {
    // The source: 60 records over several segments (a replica further ahead).
    let source = tempfile::tempdir().unwrap();
    let ahead = PartitionLog::open(source.path(), config(2048)).unwrap();
    for i in 0..30 {
        ahead
            .append(vec![rec(2 * i), rec(2 * i + 1)])
            .await
            .unwrap();
    }
    ahead.flush().await.unwrap();
    // The copy replaced: 10 other records, one of its segments being read meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
    for i in 0..10 {
        log.append(vec![Record {
            value: Bytes::from(format!("old-{i}")),
            ..rec(i)
        }])
        .await
        .unwrap();
    }
    let held = log.read(0, usize::MAX, usize::MAX).unwrap();
    let mut next = log.watch_next_offset();
    log.replace(|into| copy_files(source.path(), into)).unwrap();
    assert_eq!(held.len(), 10, "a reader keeps what it read");
    assert_eq!(held[9].value, Bytes::from("old-9"));
    assert!(next.has_changed().unwrap(), "watchers see the new end");
    assert_eq!(*next.borrow_and_update(), 60);
    assert_eq!(log.next_offset(), 60);
    assert_prefix(&values(&log, 0), 60);
    assert_eq!(log.append(vec![rec(60)]).await.unwrap(), 60);
    // A closed log (its queue deleted) is not filled again, nor its directory made.
    log.close();
    std::fs::remove_dir_all(dir.path()).unwrap();
    assert!(matches!(log.replace(|_| Ok(())), Err(LogError::Closed)));
    assert!(!dir.path().exists());
    std::fs::create_dir(dir.path()).unwrap();
}

#[tokio::test]
async fn replace_keeps_what_it_replaced_when_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
    for i in 0..30 {
        log.append(vec![rec(2 * i), rec(2 * i + 1)]).await.unwrap();
    }
    let copy = tempfile::tempdir().unwrap();
    log.flush().await.unwrap();
    copy_files(dir.path(), copy.path()).unwrap();
    // Filled with a copy of itself: nothing lost, appends go on after it, and a reopen
    // finds the same.
    log.replace(|into| copy_files(copy.path(), into)).unwrap();
    assert_prefix(&values(&log, 0), 60);
    assert_eq!(log.append(vec![rec(60)]).await.unwrap(), 60);
    drop(log);
    let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
    assert_prefix(&values(&log, 0), 61);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_under_fsync_always_get_distinct_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        fsync: FsyncPolicy::Always,
        ..config(64 * 1024)
    };
    let log = PartitionLog::open(dir.path(), cfg).unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut firsts = Vec::new();
                for i in 0..20 {
                    let batch = (0..10).map(|j| rec(t * 1000 + i * 10 + j)).collect();
                    firsts.push(log.append(batch).await.unwrap());
                }
                firsts
            })
        })
        .collect();
    let mut firsts = Vec::new();
    for task in tasks {
        firsts.extend(task.await.unwrap());
    }
    firsts.sort_unstable();
    assert_eq!(firsts, (0..160).map(|i| i * 10).collect::<Vec<u64>>());
    assert_eq!(log.read(0, usize::MAX, usize::MAX).unwrap().len(), 1600);
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<u16>),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => proptest::collection::vec(any::<u16>(), 1..6).prop_map(Op::Append),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Random appends, rolls (tiny segments) and reopens behave like a `Vec`.
    #[test]
    fn log_matches_a_vec_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut log = PartitionLog::open(dir.path(), config(512)).unwrap();
            let mut model: Vec<Bytes> = Vec::new();
            for op in ops {
                match op {
                    Op::Append(sizes) => {
                        let batch: Vec<Record> = sizes
                            .iter()
                            .map(|s| Record {
                                value: Bytes::from(vec![(*s % 251) as u8; (*s % 300) as usize]),
                                ..Record::default()
                            })
                            .collect();
                        let first = log.append(batch.clone()).await.unwrap();
                        assert_eq!(first, model.len() as u64);
                        model.extend(batch.into_iter().map(|r| r.value));
                    }
                    Op::Reopen => {
                        drop(log);
                        log = PartitionLog::open(dir.path(), config(512)).unwrap();
                    }
                }
                assert_eq!(log.next_offset(), model.len() as u64);
            }
            let from = model.len() as u64 / 2;
            let got = values(&log, from);
            assert_eq!(got.len(), model.len() - from as usize);
            for (offset, value) in got {
                assert_eq!(&value, &model[offset as usize]);
            }
        });
    }
}

/// A Raft floor (`keep_from`) keeps retention and compaction off the segments holding an
/// offset at or past it, and says when retention was held back there; below it they work
/// as before.
#[tokio::test]
async fn the_raft_floor_holds_retention_and_compaction_back() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
    for i in 0..100 {
        log.append(vec![rec(i)]).await.unwrap();
    }
    let segments = log.segments();
    assert!(segments.len() >= 4, "{segments:?}");
    let (second, third) = (segments[1].base_offset, segments[2].base_offset);
    log.keep_from(second);
    assert!(!log.held_back());
    // Retention asks for more than the floor allows: only the first segment goes.
    assert_eq!(log.drop_segments_before(third).unwrap(), 1);
    assert_eq!(log.first_offset(), second);
    assert!(log.held_back(), "retention was held back");
    // Compaction leaves a sealed segment past the floor as it is.
    let mut drop_all = |_: &qit::log::StoredRecord| false;
    let stats = log.rewrite_sealed(second, &mut drop_all).unwrap();
    assert_eq!(stats.records_removed, 0);
    // The floor moves on (a purge): retention goes on, nothing is held back any more.
    log.keep_from(u64::MAX);
    assert!(!log.held_back());
    assert_eq!(log.drop_segments_before(third).unwrap(), 1);
    assert_eq!(log.first_offset(), third);
    assert_eq!(values(&log, 0).first().map(|(o, _)| *o), Some(third));
}

/// `segments_until` names the partition as it was when an offset was its end: the
/// segments below it, the last one cut where the batch at that offset starts, which reads
/// back as exactly the records below it. An offset inside a batch is refused.
#[tokio::test]
async fn segments_until_cuts_at_a_batch_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), config(2048)).unwrap();
    for i in 0..60u64 {
        // Batches of two records: offsets 0, 2, 4, ... start batches.
        log.append(vec![rec(2 * i), rec(2 * i + 1)]).await.unwrap();
    }
    let all = log.segments();
    let cut_at = all[1].base_offset + 4;
    let until = log.segments_until(cut_at).unwrap();
    assert_eq!(until.len(), 2);
    assert_eq!(until[0], all[0]);
    assert_eq!(until[1].base_offset, all[1].base_offset);
    assert_eq!(until[1].next_offset, cut_at);
    assert!(until[1].bytes < all[1].bytes && !until[1].sealed);
    // The cut files hold the records below the cut, whole.
    let copy = tempfile::tempdir().unwrap();
    for segment in &until {
        let name = format!("{:020}.log", segment.base_offset);
        let bytes = std::fs::read(dir.path().join(&name)).unwrap();
        std::fs::write(copy.path().join(&name), &bytes[..segment.bytes as usize]).unwrap();
    }
    let cut = PartitionLog::open(copy.path(), config(2048)).unwrap();
    assert_eq!(cut.next_offset(), cut_at);
    assert_prefix(&values(&cut, 0), cut_at as usize);
    // The end, and a whole segment's start, are boundaries too.
    assert_eq!(log.segments_until(120).unwrap(), all);
    assert_eq!(
        log.segments_until(all[1].base_offset).unwrap(),
        all[..1].to_vec()
    );
    assert!(log.segments_until(cut_at + 1).is_err(), "inside a batch");
}
