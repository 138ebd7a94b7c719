//! Crash tests over the storage seam (issue 11): the log, the group journal, compaction
//! rewrites and retention run on a simulated disk that "crashes" at the Nth sync, keeping
//! only synced bytes plus an arbitrary prefix of the unsynced ones. After every crash point
//! the data is reopened: every acknowledged append and journal entry is there, in order,
//! and nothing unacknowledged is half there (a batch is whole or absent). The log runs
//! once more through the file cache (issue 17), closing and reopening its files between
//! appends, and reading back through a map cache smaller than its sealed files.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use qit::journal::Journal;
use qit::log::{FsyncPolicy, LogConfig, PartitionLog, Record};
use qit::storage::{CachedStorage, SharedStorage, SimDisk, Storage};

const DIR: &str = "/data/q/0";

fn config(storage: &SimDisk, segment_bytes: u64) -> LogConfig {
    config_on(Arc::new(storage.clone()), segment_bytes)
}

fn config_on(storage: SharedStorage, segment_bytes: u64) -> LogConfig {
    LogConfig {
        storage,
        segment_bytes,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    }
}

fn batch(id: usize, len: usize) -> Vec<Record> {
    (0..len)
        .map(|i| Record {
            timestamp_ms: 1_700_000_000_000 + id as i64,
            value: Bytes::from(format!("batch {id} record {i} {}", "x".repeat(id % 7 * 10))),
            ..Record::default()
        })
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Appends `batches` one after the other (each acknowledged before the next); returns how
/// many were acknowledged before the first error.
fn append_all(log: &PartitionLog, batches: &[Vec<Record>]) -> usize {
    append_all_then(log, batches, || {})
}

/// [`append_all`], running `after_each` after every acknowledged append.
fn append_all_then(
    log: &PartitionLog,
    batches: &[Vec<Record>],
    mut after_each: impl FnMut(),
) -> usize {
    let rt = rt();
    batches
        .iter()
        .take_while(|b| {
            let ok = rt.block_on(log.append((*b).clone())).is_ok();
            after_each();
            ok
        })
        .count()
}

/// Every value in the log, in offset order, checking offsets are consecutive.
fn values(log: &PartitionLog) -> Vec<Bytes> {
    let records = log.read(0, usize::MAX, usize::MAX).unwrap();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.offset, log.first_offset() + i as u64);
    }
    records.into_iter().map(|r| r.value).collect()
}

fn flat(batches: &[Vec<Record>]) -> Vec<Bytes> {
    batches.iter().flatten().map(|r| r.value.clone()).collect()
}

/// Runs `batches` on a fresh disk crashing at sync `crash_at` (never when 0); reopens what
/// survived and checks it: the acknowledged batches, then possibly the one that was in
/// flight, whole. Returns the syncs the run made.
fn crash_appends(batches: &[Vec<Record>], segment_bytes: u64, crash_at: u64, seed: u64) -> u64 {
    crash_appends_on(batches, segment_bytes, crash_at, seed, false)
}

/// [`crash_appends`]; with `cached`, the log runs through a file cache that closes every
/// idle file (syncing those with unsynced bytes) after each append, so every append after
/// the first reopens the segment's files.
fn crash_appends_on(
    batches: &[Vec<Record>],
    segment_bytes: u64,
    crash_at: u64,
    seed: u64,
    cached: bool,
) -> u64 {
    let disk = SimDisk::new();
    if crash_at > 0 {
        disk.crash_at_sync(crash_at, seed);
    }
    let cache = Arc::new(CachedStorage::new(
        Arc::new(disk.clone()),
        16,
        std::time::Duration::ZERO,
    ));
    let storage: SharedStorage = if cached {
        Arc::clone(&cache) as SharedStorage
    } else {
        Arc::new(disk.clone())
    };
    let acked = match PartitionLog::open(Path::new(DIR), config_on(storage, segment_bytes)) {
        Ok(log) => append_all_then(&log, batches, || {
            if cached {
                cache.close_idle();
            }
        }),
        Err(_) => 0,
    };
    let syncs = disk.syncs();
    let after = SimDisk::restore(&disk.crash_image(seed));
    // Through the caches too: the read-back maps more sealed files than the map cache
    // keeps, so it drops and maps them again on the way.
    let after_cache = cached.then(|| {
        Arc::new(
            CachedStorage::new(Arc::new(after.clone()), 16, std::time::Duration::ZERO)
                .with_max_mapped_files(16),
        )
    });
    let after_storage: SharedStorage = match &after_cache {
        Some(cache) => Arc::clone(cache) as SharedStorage,
        None => Arc::new(after.clone()),
    };
    let log = PartitionLog::open(Path::new(DIR), config_on(after_storage, segment_bytes))
        .unwrap_or_else(|e| panic!("crash at sync {crash_at} (seed {seed}): reopen failed: {e}"));
    let got = values(&log);
    if let Some(cache) = &after_cache {
        // Every map dropped (the first sweep marks the time, the second drops what was not
        // used since): a second read maps them all again and finds the same.
        cache.close_idle();
        cache.close_idle();
        assert_eq!(cache.mapped_files(), 0);
        assert_eq!(values(&log), got);
    }
    let with_acked = flat(&batches[..acked]);
    let with_next = flat(&batches[..(acked + 1).min(batches.len())]);
    assert!(
        got == with_acked || got == with_next,
        "crash at sync {crash_at} (seed {seed}): {} acked batches ({} records), found {} records",
        acked,
        with_acked.len(),
        got.len()
    );
    // The recovered log takes appends again, after what survived.
    let rt = rt();
    let next = rt.block_on(log.append(batch(99, 2))).unwrap();
    assert_eq!(next, got.len() as u64);
    syncs
}

#[test]
fn log_appends_survive_a_crash_at_every_sync_point() {
    let batches: Vec<Vec<Record>> = (0..12).map(|i| batch(i, 1 + i % 4)).collect();
    // Small segments: the run rolls several times (sync of the old segment, new files,
    // directory sync) as well as appending.
    let total = crash_appends(&batches, 400, 0, 0);
    assert!(total > 12, "{total} syncs");
    for crash_at in 1..=total + 1 {
        for seed in 0..4 {
            crash_appends(&batches, 400, crash_at, seed);
        }
    }
}

#[test]
fn log_appends_through_the_file_cache_survive_a_crash_at_every_sync_point() {
    let batches: Vec<Vec<Record>> = (0..12).map(|i| batch(i, 1 + i % 4)).collect();
    let total = crash_appends_on(&batches, 400, 0, 0, true);
    assert!(total > 12, "{total} syncs");
    for crash_at in 1..=total + 1 {
        for seed in 0..4 {
            crash_appends_on(&batches, 400, crash_at, seed, true);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random batch sequences, segment sizes, crash points and torn tails.
    #[test]
    fn log_appends_survive_random_crashes(
        sizes in proptest::collection::vec(1usize..6, 1..16),
        segment_bytes in 200u64..2000,
        crash_at in 1u64..60,
        seed in any::<u64>(),
    ) {
        let batches: Vec<Vec<Record>> = sizes.iter().enumerate().map(|(i, n)| batch(i, *n)).collect();
        crash_appends(&batches, segment_bytes, crash_at, seed);
    }
}

/// Fills a log with sealed segments on `disk`; returns the log and what it holds.
fn filled(disk: &SimDisk) -> (PartitionLog, Vec<Bytes>) {
    let log = PartitionLog::open(Path::new(DIR), config(disk, 400)).unwrap();
    let batches: Vec<Vec<Record>> = (0..10).map(|i| batch(i, 3)).collect();
    assert_eq!(append_all(&log, &batches), batches.len());
    assert!(log.segments().len() > 3);
    (log, flat(&batches))
}

#[test]
fn retention_survives_a_crash_at_every_sync_point() {
    for crash_at in 1.. {
        let disk = SimDisk::new();
        let (log, all) = filled(&disk);
        let drop_before = log.segments()[2].base_offset;
        disk.crash_at_sync(disk.syncs() + crash_at, crash_at);
        let result = log.drop_segments_before(drop_before);
        let crashed = disk.crashed();
        drop(log);
        let after = SimDisk::restore(&disk.crash_image(0));
        let log = PartitionLog::open(Path::new(DIR), config(&after, 400)).unwrap();
        let first = log.first_offset();
        assert!(
            first == 0 || first == drop_before,
            "crash {crash_at}: first {first}"
        );
        if result.is_ok() && !crashed {
            assert_eq!(first, drop_before);
        }
        // What is retained is exactly the tail of what was written.
        assert_eq!(
            values(&log),
            all[first as usize..].to_vec(),
            "crash {crash_at}"
        );
        if !crashed {
            break;
        }
    }
}

#[test]
fn compaction_rewrite_survives_a_crash_at_every_sync_point() {
    let keep = |r: &qit::log::StoredRecord| r.offset.is_multiple_of(2);
    for crash_at in 1.. {
        let disk = SimDisk::new();
        let (log, all) = filled(&disk);
        let target = log.segments()[1].clone();
        disk.crash_at_sync(disk.syncs() + crash_at, crash_at);
        let result = log.rewrite_sealed(target.base_offset, &mut |r| keep(r));
        let crashed = disk.crashed();
        drop(log);
        let after = SimDisk::restore(&disk.crash_image(crash_at));
        let log = PartitionLog::open(Path::new(DIR), config(&after, 400)).unwrap();
        let records = log.read(0, usize::MAX, usize::MAX).unwrap();
        let in_target = |o: u64| (target.base_offset..target.next_offset).contains(&o);
        let old: Vec<u64> = (0..all.len() as u64).collect();
        let new: Vec<u64> = old
            .iter()
            .copied()
            .filter(|o| !in_target(*o) || o.is_multiple_of(2))
            .collect();
        let got: Vec<u64> = records.iter().map(|r| r.offset).collect();
        assert!(
            got == old || got == new,
            "crash {crash_at}: offsets {got:?}"
        );
        if result.is_ok() && !crashed {
            assert_eq!(got, new);
        }
        for r in &records {
            assert_eq!(r.value, all[r.offset as usize], "crash {crash_at}");
        }
        // Offsets never move: the log ends where it ended.
        assert_eq!(log.next_offset(), all.len() as u64);
        if !crashed {
            break;
        }
    }
}

/// Journal operations of a test run.
#[derive(Debug, Clone)]
enum JournalOp {
    Append(u8),
    Checkpoint,
}

/// Runs `ops` on a journal crashing at sync `crash_at` (never when 0): each checkpoint's
/// snapshot is the list of every entry so far, so a replay rebuilds the whole list. Checks
/// that the reopened journal holds the acknowledged entries and at most the one in flight.
fn crash_journal(ops: &[JournalOp], crash_at: u64, seed: u64) -> u64 {
    let path = Path::new("/data/q/groups/default.journal");
    let disk = SimDisk::new();
    if crash_at > 0 {
        disk.crash_at_sync(crash_at, seed);
    }
    let storage: SharedStorage = Arc::new(disk.clone());
    let rt = rt();
    let mut acked: Vec<u8> = Vec::new();
    let mut in_flight: Option<Vec<u8>> = None;
    if let Ok((journal, _)) = Journal::open(storage, path, FsyncPolicy::Always) {
        for op in ops {
            let mut next = acked.clone();
            let ticket = match op {
                JournalOp::Append(v) => {
                    next.push(*v);
                    journal.append(vec![Bytes::from(vec![*v])])
                }
                JournalOp::Checkpoint => journal.checkpoint(Bytes::from(acked.clone())),
            };
            if rt.block_on(ticket.wait()).is_err() {
                in_flight = Some(next);
                break;
            }
            acked = next;
        }
    }
    let syncs = disk.syncs();
    let after: SharedStorage = Arc::new(SimDisk::restore(&disk.crash_image(seed)));
    let (journal, replay) = Journal::open(Arc::clone(&after), path, FsyncPolicy::Always)
        .unwrap_or_else(|e| panic!("crash at sync {crash_at}: reopen failed: {e}"));
    let mut got: Vec<u8> = replay.checkpoint.map(|c| c.to_vec()).unwrap_or_default();
    got.extend(replay.entries.iter().flat_map(|e| e.to_vec()));
    assert!(
        got == acked || Some(&got) == in_flight.as_ref(),
        "crash at sync {crash_at} (seed {seed}): acked {acked:?}, in flight {in_flight:?}, found {got:?}"
    );
    rt.block_on(journal.append(vec![Bytes::from_static(b"z")]).wait())
        .unwrap();
    syncs
}

fn journal_ops() -> Vec<JournalOp> {
    (0..20u8)
        .map(|i| {
            if i % 6 == 5 {
                JournalOp::Checkpoint
            } else {
                JournalOp::Append(i)
            }
        })
        .collect()
}

#[test]
fn journal_and_checkpoints_survive_a_crash_at_every_sync_point() {
    let ops = journal_ops();
    let total = crash_journal(&ops, 0, 0);
    assert!(total > 20, "{total} syncs");
    for crash_at in 1..=total + 1 {
        for seed in 0..4 {
            crash_journal(&ops, crash_at, seed);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn journal_survives_random_crashes(
        ops in proptest::collection::vec(
            prop_oneof![4 => any::<u8>().prop_map(JournalOp::Append), 1 => Just(JournalOp::Checkpoint)],
            1..30,
        ),
        crash_at in 1u64..50,
        seed in any::<u64>(),
    ) {
        crash_journal(&ops, crash_at, seed);
    }
}

/// The simulated disk itself: a file that was never synced may be missing after a crash;
/// one whose entry was synced keeps its synced bytes.
#[test]
fn the_simulation_keeps_only_what_was_synced() {
    let disk = SimDisk::new();
    disk.create_dir_all(Path::new("/d")).unwrap();
    let file = disk
        .open(Path::new("/d/f"), qit::storage::OpenMode::Append)
        .unwrap();
    file.append(b"abc").unwrap();
    assert!(disk.crash_image(0).files.is_empty());
    file.sync_data().unwrap();
    disk.sync_dir(Path::new("/d")).unwrap();
    assert_eq!(disk.crash_image(0).files[Path::new("/d/f")], b"abc");
}

/// Runs "create a queue, publish to it, receive and ack" on a broker over a disk crashing
/// at sync `crash_at` (never when 0); reopens what survived and checks that every answered
/// step is there. Returns the syncs the run made.
fn crash_queue_lifecycle(crash_at: u64, seed: u64) -> u64 {
    use qit::broker::{Broker, BrokerConfig, NewMessage, QueueSettings};
    let disk = SimDisk::new();
    if crash_at > 0 {
        disk.crash_at_sync(crash_at, seed);
    }
    let config = |storage: SharedStorage| BrokerConfig {
        data_dir: "/data".into(),
        fsync: FsyncPolicy::Always,
        storage,
        ..BrokerConfig::default()
    };
    let none = std::time::Duration::ZERO;
    let rt = rt();
    // Steps answered: 1 created, 2 published, 3 acked.
    let answered = rt.block_on(async {
        let Ok(broker) = Broker::open(config(Arc::new(disk.clone()))).await else {
            return 0;
        };
        let settings = QueueSettings {
            max_deliveries: 0,
            ..QueueSettings::default()
        };
        if broker.create_queue("q", settings).await.is_err() {
            return 0;
        }
        let message = NewMessage {
            body: Bytes::from_static(b"one"),
            ..NewMessage::default()
        };
        if broker.publish("q", vec![message]).await.is_err() {
            return 1;
        }
        let Ok(got) = broker.receive("q", "default", 1, none, None).await else {
            return 2;
        };
        let Some(delivery) = got.first() else {
            return 2;
        };
        if broker.ack("q", "default", delivery.id).await.is_err() {
            return 2;
        }
        3
    });
    let syncs = disk.syncs();
    let after: SharedStorage = Arc::new(SimDisk::restore(&disk.crash_image(seed)));
    let broker = rt
        .block_on(Broker::open(config(after)))
        .unwrap_or_else(|e| panic!("crash at sync {crash_at} (seed {seed}): reopen failed: {e}"));
    let at = format!("crash at sync {crash_at} (seed {seed}), {answered} steps answered");
    if answered >= 1 {
        let info = broker
            .queue_info("q")
            .unwrap_or_else(|e| panic!("{at}: {e}"));
        if answered >= 2 {
            assert_eq!(info.partitions[0].next_offset, 1, "{at}");
        }
        let left = rt
            .block_on(broker.receive("q", "default", 1, none, None))
            .unwrap_or_else(|e| panic!("{at}: {e}"));
        if answered == 3 {
            assert!(left.is_empty(), "{at}: an answered ack was lost");
        }
    }
    syncs
}

/// Issue 17: a queue's directories and files are created by its first write (a message, a
/// group's first journal entry), not with the queue; its creation is only a registry
/// entry. A crash at any sync of create, publish, receive and ack loses no answered step.
#[test]
fn a_new_queue_written_for_the_first_time_survives_a_crash_at_every_sync_point() {
    let total = crash_queue_lifecycle(0, 0);
    assert!(total >= 3, "{total} syncs");
    for crash_at in 1..=total + 1 {
        for seed in 0..4 {
            crash_queue_lifecycle(crash_at, seed);
        }
    }
}
