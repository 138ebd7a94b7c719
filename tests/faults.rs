//! Fault tests over the storage seam (issue 11): an fsync that fails with EIO, a disk that
//! runs out of space halfway through a batch, on the partition log, the group journal and
//! the broker on top of them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use qit::broker::{Broker, BrokerConfig, BrokerError, NewMessage, QueueSettings};
use qit::journal::Journal;
use qit::log::{FsyncPolicy, LogConfig, LogError, PartitionLog, Record};
use qit::storage::sim::{Errno, Fault, Op};
use qit::storage::{SharedStorage, SimDisk};

fn config(disk: &SimDisk, fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        storage: Arc::new(disk.clone()) as SharedStorage,
        fsync,
        ..LogConfig::default()
    }
}

fn records(n: usize, size: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            timestamp_ms: 1_700_000_000_000,
            value: Bytes::from(format!("{i:04}{}", "v".repeat(size))),
            ..Record::default()
        })
        .collect()
}

fn values(log: &PartitionLog) -> Vec<Bytes> {
    log.read(0, usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| r.value)
        .collect()
}

/// EIO on fsync fails that partition for good (its appends get a clear error, even once
/// the disk answers again: the fsync is never retried and reported as success), while
/// another partition on the same disk serves; reopening recovers what was durable.
#[tokio::test]
async fn eio_on_fsync_fails_that_partition_only() {
    let disk = SimDisk::new();
    let p0 = PartitionLog::open(Path::new("/q/0"), config(&disk, FsyncPolicy::Always)).unwrap();
    let p1 = PartitionLog::open(Path::new("/q/1"), config(&disk, FsyncPolicy::Always)).unwrap();
    p0.append(records(3, 10)).await.unwrap();
    disk.inject(Fault::new(Op::Sync, "/q/0/", Errno::Eio).times(1));
    let error = p0.append(records(2, 10)).await.unwrap_err();
    assert!(matches!(error, LogError::Failed(_)), "{error}");
    assert!(error.to_string().contains("fsync"), "{error}");
    // The fault is gone, but the partition stays failed.
    let again = p0.append(records(1, 10)).await.unwrap_err();
    assert!(matches!(again, LogError::Failed(_)), "{again}");
    assert!(p0.flush().await.is_err());
    // The other partition serves; reads of the failed one go on.
    assert_eq!(p1.append(records(2, 10)).await.unwrap(), 0);
    assert_eq!(values(&p1).len(), 2);
    assert_eq!(values(&p0).len(), 3);
    drop(p0);
    let reopened =
        PartitionLog::open(Path::new("/q/0"), config(&disk, FsyncPolicy::Always)).unwrap();
    assert!(values(&reopened).len() >= 3);
    reopened.append(records(1, 10)).await.unwrap();
}

/// Regression (issue 11, fsyncgate): `flush` after a failed fsync called fsync again and
/// reported success, though the kernel may have dropped the unwritten pages.
#[tokio::test]
async fn a_failed_flush_is_never_retried_into_success() {
    let disk = SimDisk::new();
    let log = PartitionLog::open(Path::new("/q/0"), config(&disk, FsyncPolicy::Never)).unwrap();
    log.append(records(2, 10)).await.unwrap();
    disk.inject(Fault::new(Op::Sync, "/q/0/", Errno::Eio).times(1));
    assert!(log.flush().await.is_err());
    let second = log.flush().await;
    assert!(second.is_err(), "second flush after EIO reported success");
    let append = log.append(records(1, 10)).await;
    assert!(matches!(append, Err(LogError::Failed(_))), "{append:?}");
}

/// Regression (issue 11, fsyncgate): the journal's flush likewise.
#[tokio::test]
async fn a_failed_journal_flush_is_never_retried_into_success() {
    let disk = SimDisk::new();
    let storage: SharedStorage = Arc::new(disk.clone());
    let path = Path::new("/q/groups/g.journal");
    let (journal, _) = Journal::open(storage, path, FsyncPolicy::Never).unwrap();
    journal
        .append(vec![Bytes::from_static(b"ack 1")])
        .wait()
        .await
        .unwrap();
    disk.inject(Fault::new(Op::Sync, "g.journal", Errno::Eio).times(1));
    assert!(journal.flush().await.is_err());
    assert!(
        journal.flush().await.is_err(),
        "second flush after EIO reported success"
    );
    assert!(
        journal
            .append(vec![Bytes::from_static(b"ack 2")])
            .wait()
            .await
            .is_err()
    );
}

/// ENOSPC halfway through a batch: the batch is cut back whole, the append gets a clear
/// error, reads go on, appends resume when space returns, and nothing of the failed batch
/// is ever seen (not now, not after reopening).
#[tokio::test]
async fn enospc_mid_batch_cuts_the_batch_back_and_appends_resume() {
    let disk = SimDisk::new();
    let log = PartitionLog::open(Path::new("/q/0"), config(&disk, FsyncPolicy::Always)).unwrap();
    log.append(records(5, 20)).await.unwrap();
    let used = disk.used();
    disk.set_space(Some(used + 300));
    let error = log.append(records(50, 100)).await.unwrap_err();
    assert!(
        error.to_string().contains("No space left on device"),
        "{error}"
    );
    assert_eq!(disk.used(), used, "the partial batch was cut back");
    assert_eq!(values(&log).len(), 5);
    assert_eq!(log.next_offset(), 5);
    // Space returns: appends resume at the next offset.
    disk.set_space(None);
    assert_eq!(log.append(records(2, 20)).await.unwrap(), 5);
    drop(log);
    let reopened =
        PartitionLog::open(Path::new("/q/0"), config(&disk, FsyncPolicy::Always)).unwrap();
    let got = values(&reopened);
    assert_eq!(got.len(), 7);
    assert!(got.iter().all(|v| v.len() == 24));
}

/// ENOSPC on the journal: the frame is cut back, the append fails, later ones succeed.
#[tokio::test]
async fn enospc_on_the_journal_cuts_the_frame_back() {
    let disk = SimDisk::new();
    let storage: SharedStorage = Arc::new(disk.clone());
    let path = Path::new("/q/groups/g.journal");
    let (journal, _) = Journal::open(Arc::clone(&storage), path, FsyncPolicy::Always).unwrap();
    journal
        .append(vec![Bytes::from_static(b"one")])
        .wait()
        .await
        .unwrap();
    disk.set_space(Some(disk.used() + 10));
    assert!(
        journal
            .append(vec![Bytes::from(vec![7; 100])])
            .wait()
            .await
            .is_err()
    );
    disk.set_space(None);
    journal
        .append(vec![Bytes::from_static(b"two")])
        .wait()
        .await
        .unwrap();
    drop(journal);
    let (_, replay) = Journal::open(storage, path, FsyncPolicy::Always).unwrap();
    assert_eq!(
        replay.entries,
        vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")]
    );
}

/// Regression (issue 11): when cutting back a failed write failed too, the partition took
/// further appends behind the partial batch, where reopening would cut them off as a torn
/// tail after they were acknowledged. Now it takes no more appends.
#[tokio::test]
async fn a_failed_cut_back_fails_the_partition() {
    let disk = SimDisk::new();
    let log = PartitionLog::open(Path::new("/q/0"), config(&disk, FsyncPolicy::Never)).unwrap();
    log.append(records(1, 10)).await.unwrap();
    disk.set_space(Some(disk.used() + 50));
    disk.inject(Fault::new(Op::SetLen, "/q/0/", Errno::Eio).times(1));
    assert!(log.append(records(10, 100)).await.is_err());
    disk.set_space(None);
    let next = log.append(records(1, 10)).await;
    assert!(matches!(next, Err(LogError::Failed(_))), "{next:?}");
}

fn message(body: &str) -> NewMessage {
    NewMessage {
        body: Bytes::copy_from_slice(body.as_bytes()),
        content_type: Some("text/plain".into()),
        ..NewMessage::default()
    }
}

/// A broker on `disk` that syncs every write.
async fn broker_on(disk: &SimDisk) -> Arc<Broker> {
    Broker::open(BrokerConfig {
        data_dir: "/data".into(),
        fsync: FsyncPolicy::Always,
        max_queues: 10,
        storage: Arc::new(disk.clone()),
        ..BrokerConfig::default()
    })
    .await
    .unwrap()
}

/// The broker on a full disk: the publish gets a storage error, receives and acks go on
/// (they need only a small journal frame), and publishing resumes when space returns.
#[tokio::test]
async fn broker_publish_on_a_full_disk_fails_cleanly_and_resumes() {
    let disk = SimDisk::new();
    let broker = broker_on(&disk).await;
    broker
        .create_queue("jobs", QueueSettings::default())
        .await
        .unwrap();
    for body in ["a", "b", "c"] {
        broker.publish("jobs", vec![message(body)]).await.unwrap();
    }
    disk.set_space(Some(disk.used() + 1024));
    let big = message(&"x".repeat(64 * 1024));
    let error = broker.publish("jobs", vec![big.clone()]).await.unwrap_err();
    assert!(matches!(error, BrokerError::Log(_)), "{error}");
    assert!(error.to_string().contains("No space left"), "{error}");
    let got = broker
        .receive("jobs", "default", 10, Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(got.len(), 3, "the failed publish left nothing behind");
    for delivery in &got {
        broker.ack("jobs", "default", delivery.id).await.unwrap();
    }
    disk.set_space(None);
    broker.publish("jobs", vec![big]).await.unwrap();
    let got = broker
        .receive("jobs", "default", 10, Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body.len(), 64 * 1024);
}

/// A dead letter whose move to the dead-letter queue fails (the DLQ's disk is full) is not
/// offered again (it used up its deliveries): the move is tried again and stores it once.
/// It was offered again at once, and so delivered past `max_deliveries`.
#[tokio::test]
async fn a_failed_dead_letter_move_is_tried_again_not_delivered_again() {
    let disk = SimDisk::new();
    let broker = broker_on(&disk).await;
    let settings = QueueSettings {
        max_deliveries: 1,
        ..QueueSettings::default()
    };
    broker.create_queue("jobs", settings).await.unwrap();
    broker
        .publish("jobs", vec![message("poison")])
        .await
        .unwrap();
    let got = broker
        .receive("jobs", "default", 10, Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    disk.inject(Fault::new(Op::Write, "jobs.dlq", Errno::Enospc).times(1));
    broker
        .nack("jobs", "default", got[0].id, Some(Duration::ZERO))
        .await
        .unwrap();
    let again = broker
        .receive("jobs", "default", 10, Duration::ZERO, None)
        .await
        .unwrap();
    assert!(again.is_empty(), "delivered again: {again:?}");
    // The retry (a quarter second later) moves it.
    let dead = broker
        .receive("jobs.dlq", "default", 10, Duration::from_secs(30), None)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].body[..], b"poison");
    let info = broker.group_info("jobs", "default").unwrap();
    assert_eq!((info.backlog, info.in_flight), (0, 0), "{info:?}");
    let (stored, _) = broker
        .read_log("jobs.dlq", 0, qit::broker::ReadFrom::Offset(0), 10)
        .unwrap();
    assert_eq!(stored.len(), 1, "stored once: {stored:?}");
    let again = broker
        .receive("jobs", "default", 10, Duration::ZERO, None)
        .await
        .unwrap();
    assert!(again.is_empty(), "delivered again: {again:?}");
}
