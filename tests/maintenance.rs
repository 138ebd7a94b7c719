//! Retention and key compaction: by size, by age, by "all groups acked"; compaction against
//! a model; a crash at each step of a rewrite; groups and replay after compaction.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use qit::broker::{
    Broker, BrokerConfig, NewMessage, QueueSettings, ReadFrom, Retention, RetentionPolicy,
};
use qit::log::compaction::Step;
use qit::log::{FsyncPolicy, LogConfig, PartitionLog, Record, StoredRecord};
use qit::maintenance::{self, MaintenanceConfig, compaction};

async fn broker(dir: &Path) -> Arc<Broker> {
    Broker::open(BrokerConfig {
        data_dir: dir.to_path_buf(),
        fsync: FsyncPolicy::Never,
        max_queues: 100,
        ..BrokerConfig::default()
    })
    .await
    .unwrap()
}

fn small_segments(retention: Retention) -> QueueSettings {
    QueueSettings {
        segment_bytes: 4096,
        retention,
        max_deliveries: 0,
        ..QueueSettings::default()
    }
}

async fn fill(b: &Broker, queue: &str, n: usize) {
    for i in 0..n {
        let m = NewMessage {
            body: Bytes::from(format!("{i:04}-{}", "x".repeat(200))),
            ..NewMessage::default()
        };
        b.publish(queue, vec![m]).await.unwrap();
    }
}

#[tokio::test]
async fn retention_by_size_keeps_the_newest_and_skips_groups_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let retention = Retention {
        max_bytes: Some(10_000),
        ..Retention::default()
    };
    b.create_queue("sized", small_segments(retention))
        .await
        .unwrap();
    fill(&b, "sized", 200).await;
    let before = b.queue_info("sized").unwrap().partitions[0].clone();
    assert!(before.bytes > 40_000);
    let stats = maintenance::run_once(&b, &MaintenanceConfig::default());
    assert!(stats.segments_deleted > 0);
    let after = b.queue_info("sized").unwrap().partitions[0].clone();
    assert!(after.bytes <= 10_000 + 4096 + 300, "{after:?}");
    assert!(after.first_offset > 0);
    assert_eq!(after.next_offset, 200);
    // The default group skipped to the new start.
    let got = b
        .receive("sized", "default", 1, Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(got[0].id.offset, after.first_offset);
    let group = b.group_info("sized", "default").unwrap();
    assert_eq!(group.partitions[0].committed_offset, after.first_offset);
}

#[tokio::test]
async fn retention_by_age_and_the_active_segment_stays() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let retention = Retention {
        max_age: Some(60),
        ..Retention::default()
    };
    b.create_queue("aged", small_segments(retention))
        .await
        .unwrap();
    fill(&b, "aged", 100).await;
    let config = MaintenanceConfig::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert_eq!(
        maintenance::run_once_at(&b, &config, now).segments_deleted,
        0,
        "nothing is a minute old"
    );
    let stats = maintenance::run_once_at(&b, &config, now + 3_600_000);
    assert!(stats.segments_deleted > 0);
    let info = b.queue_info("aged").unwrap().partitions[0].clone();
    assert_eq!(info.segments, 1, "only the active segment is left");
    assert_eq!(info.next_offset, 100);
}

#[tokio::test]
async fn acked_policy_deletes_only_what_every_group_acked() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let retention = Retention {
        policy: RetentionPolicy::Acked,
        ..Retention::default()
    };
    b.create_queue("work", small_segments(retention))
        .await
        .unwrap();
    fill(&b, "work", 100).await;
    // A second group that acks nothing holds everything.
    b.seek("work", "slow", qit::broker::SeekTarget::Earliest)
        .await
        .unwrap();
    let drain = |group: &'static str| {
        let b = Arc::clone(&b);
        async move {
            loop {
                let got = b
                    .receive("work", group, 100, Duration::ZERO, None)
                    .await
                    .unwrap();
                if got.is_empty() {
                    break;
                }
                for d in got {
                    b.ack("work", group, d.id).await.unwrap();
                }
            }
        }
    };
    drain("default").await;
    assert_eq!(
        maintenance::run_once(&b, &MaintenanceConfig::default()).segments_deleted,
        0
    );
    drain("slow").await;
    assert!(maintenance::run_once(&b, &MaintenanceConfig::default()).segments_deleted > 0);
    let info = b.queue_info("work").unwrap();
    assert_eq!(info.partitions[0].segments, 1);
    assert!(info.groups.iter().all(|g| g.backlog == 0));
}

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes: 1024,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

/// (key, value): key None = keyless; empty value = tombstone.
fn record(key: Option<u8>, value: &str, ts: i64) -> Record {
    Record {
        timestamp_ms: ts,
        key: key.map(|k| Bytes::from(format!("key-{k}"))),
        headers: Vec::new(),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

fn all(log: &PartitionLog) -> Vec<StoredRecord> {
    log.read(0, usize::MAX, usize::MAX).unwrap()
}

fn assert_sound(dir: &Path) {
    let reports = qit::log::inspect::inspect(dir, false).unwrap();
    let problems: Vec<_> = reports.iter().flat_map(|r| r.problems.clone()).collect();
    assert!(problems.is_empty(), "{problems:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Compaction keeps exactly: every keyless record, every record of the active segment,
    /// and in sealed segments the newest record of each key (tombstones until they age out).
    #[test]
    fn compaction_matches_a_model(
        writes in proptest::collection::vec((proptest::option::of(0u8..6), 0usize..3), 5..120),
        tombstones_expire in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let log = PartitionLog::open(dir.path(), log_config()).unwrap();
            let mut written = Vec::new();
            for (i, (key, kind)) in writes.iter().enumerate() {
                let value = if *kind == 0 && key.is_some() { String::new() } else { format!("v{i}-{}", "p".repeat(40)) };
                let r = record(*key, &value, 1_000 + i as i64);
                log.append(vec![r.clone()]).await.unwrap();
                written.push(r);
            }
            let before = all(&log);
            let active_base = log.segments().last().unwrap().base_offset;
            let newest: HashMap<Bytes, u64> = compaction::newest_offsets(&log).unwrap();
            let retention = if tombstones_expire { Duration::ZERO } else { Duration::from_secs(3600) };
            let now = 1_000_000;
            compaction::compact(&log, now, retention, &mut |_| {}).unwrap();
            let after = all(&log);
            let expected: Vec<u64> = before
                .iter()
                .filter(|r| {
                    r.offset >= active_base
                        || match &r.key {
                            None => true,
                            Some(k) => newest[k] == r.offset && !(r.value.is_empty() && tombstones_expire),
                        }
                })
                .map(|r| r.offset)
                .collect();
            let got: Vec<u64> = after.iter().map(|r| r.offset).collect();
            assert_eq!(got, expected);
            for r in &after {
                assert_eq!(r.value, written[r.offset as usize].value, "offsets keep their records");
            }
            assert_eq!(log.next_offset(), written.len() as u64);
            drop(log);
            assert_sound(dir.path());
            let reopened = PartitionLog::open(dir.path(), log_config()).unwrap();
            assert_eq!(all(&reopened).iter().map(|r| r.offset).collect::<Vec<_>>(), expected);
        });
    }
}

async fn compactable(dir: &Path) -> (PartitionLog, Vec<u64>) {
    let log = PartitionLog::open(dir, log_config()).unwrap();
    for i in 0..60 {
        log.append(vec![record(
            Some((i % 3) as u8),
            &format!("v{i}-{}", "q".repeat(40)),
            i,
        )])
        .await
        .unwrap();
    }
    let offsets = all(&log).iter().map(|r| r.offset).collect();
    (log, offsets)
}

/// A crash after any step of a rewrite leaves either the old or the new segment, sound.
#[tokio::test]
async fn crash_at_each_step_of_a_rewrite_leaves_old_or_new() {
    for step in [Step::WroteTemp, Step::Renamed, Step::Indexed] {
        let dir = tempfile::tempdir().unwrap();
        let (log, before) = compactable(dir.path()).await;
        let newest = compaction::newest_offsets(&log).unwrap();
        let first = log.segments()[0].base_offset;
        let mut keep = |r: &StoredRecord| compaction::keeps(r, &newest, 0, Duration::ZERO);
        log.rewrite_sealed_until(first, &mut keep, step).unwrap();
        drop(log);
        let reopened = PartitionLog::open(dir.path(), log_config()).unwrap();
        let after: Vec<u64> = all(&reopened).iter().map(|r| r.offset).collect();
        drop(reopened);
        assert_sound(dir.path());
        match step {
            Step::WroteTemp => assert_eq!(after, before, "the old segment survives"),
            _ => assert!(
                after.len() < before.len(),
                "the new segment is in place ({step:?})"
            ),
        }
        assert!(!dir.path().join("00000000000000000000.log.tmp").exists());
    }
}

#[tokio::test]
async fn groups_and_replay_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let settings = QueueSettings {
        compaction: true,
        ..small_segments(Retention::default())
    };
    b.create_queue("state", settings).await.unwrap();
    for i in 0..100 {
        let m = NewMessage {
            key: Some(format!("user-{}", i % 5)),
            body: Bytes::from(format!("{i}-{}", "s".repeat(100))),
            ..NewMessage::default()
        };
        b.publish("state", vec![m]).await.unwrap();
    }
    let stats = maintenance::run_once(&b, &MaintenanceConfig::default());
    assert!(stats.records_compacted > 0);
    let (replay, _) = b.read_log("state", 0, ReadFrom::Offset(0), 1000).unwrap();
    assert!(replay.len() < 100);
    assert!(
        replay.windows(2).all(|w| w[0].id.offset < w[1].id.offset),
        "order kept"
    );
    // A group reads the compacted log and its floor passes the gaps.
    let mut seen = 0;
    loop {
        let got = b
            .receive("state", "default", 100, Duration::ZERO, None)
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        for d in got {
            b.ack("state", "default", d.id).await.unwrap();
            seen += 1;
        }
    }
    assert_eq!(seen, replay.len());
    let group = b.group_info("state", "default").unwrap();
    assert_eq!(group.partitions[0].committed_offset, 100);
    assert_eq!(group.backlog, 0);
    assert_sound(&dir.path().join("queues/state/0"));
}
