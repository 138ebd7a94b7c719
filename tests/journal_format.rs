//! The group journal and snapshot formats are frozen by golden fixtures
//! (`tests/fixtures/journal-v1/default.journal` and `group.snapshot`, described in
//! `storage-format.md`): today's encoder must write exactly those bytes, and today's decoder
//! must read them back.
//!
//! To change the format deliberately: bump the version in `storage-format.md`, run
//! `cargo test --test journal_format -- --ignored regenerate` and commit the new fixtures.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use qit::group::event::{Event, PartitionSnapshot, Snapshot, decode_events, encode_events};
use qit::journal::Journal;
use qit::log::FsyncPolicy;
use qit::storage::{SharedStorage, SimDisk, Storage};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journal-v1")
}

fn golden_snapshot() -> Snapshot {
    Snapshot {
        dead_lettered: 2,
        partitions: vec![
            PartitionSnapshot {
                floor: 10,
                done: vec![(12, 15), (20, 21)],
                counts: vec![(10, 3), (11, 1)],
            },
            PartitionSnapshot {
                floor: 0,
                done: vec![],
                counts: vec![],
            },
        ],
    }
}

fn golden_entries() -> Vec<Vec<Event>> {
    vec![
        vec![
            Event::Leased {
                partition: 0,
                offset: 15,
                delivery_count: 1,
            },
            Event::Leased {
                partition: 1,
                offset: 0,
                delivery_count: 1,
            },
        ],
        vec![Event::Done {
            partition: 0,
            offset: 15,
        }],
        vec![
            Event::DeadLettered {
                partition: 0,
                offset: 10,
            },
            Event::Seek {
                partition: 1,
                offset: 7,
            },
        ],
    ]
}

/// The journal file today's code writes: a checkpoint of the golden snapshot, then the
/// golden entries.
async fn written_journal() -> Vec<u8> {
    let disk = SimDisk::new();
    let storage: SharedStorage = Arc::new(disk.clone());
    let path = Path::new("/g/default.journal");
    let (journal, _) = Journal::open(storage, path, FsyncPolicy::Never).unwrap();
    journal
        .append(vec![encode_events(&[Event::Done {
            partition: 0,
            offset: 1,
        }])])
        .wait()
        .await
        .unwrap();
    journal
        .checkpoint(golden_snapshot().encode())
        .wait()
        .await
        .unwrap();
    for events in golden_entries() {
        journal
            .append(vec![encode_events(&events)])
            .wait()
            .await
            .unwrap();
    }
    journal.flush().await.unwrap();
    disk.read(path).unwrap()
}

#[tokio::test]
#[ignore = "rewrites the golden fixtures; run only for a deliberate format change"]
async fn regenerate() {
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("default.journal"), written_journal().await).unwrap();
    std::fs::write(dir.join("group.snapshot"), golden_snapshot().encode()).unwrap();
}

#[tokio::test]
async fn encoders_still_write_the_golden_bytes() {
    let journal = std::fs::read(fixture_dir().join("default.journal")).unwrap();
    assert_eq!(written_journal().await, journal, "journal bytes changed");
    let snapshot = std::fs::read(fixture_dir().join("group.snapshot")).unwrap();
    assert_eq!(
        golden_snapshot().encode(),
        Bytes::from(snapshot),
        "snapshot bytes changed"
    );
}

#[tokio::test]
async fn golden_journal_reads_back_exactly() {
    let bytes = std::fs::read(fixture_dir().join("default.journal")).unwrap();
    let disk = SimDisk::new();
    disk.create_dir_all(Path::new("/g")).unwrap();
    let path = Path::new("/g/default.journal");
    disk.open(path, qit::storage::OpenMode::Create)
        .unwrap()
        .append(&bytes)
        .unwrap();
    let (_, replay) = Journal::open(Arc::new(disk.clone()), path, FsyncPolicy::Never).unwrap();
    assert_eq!(replay.truncated_bytes, 0);
    let snapshot = Snapshot::decode(&replay.checkpoint.unwrap()).unwrap();
    assert_eq!(snapshot, golden_snapshot());
    let entries: Vec<Vec<Event>> = replay
        .entries
        .iter()
        .map(|e| decode_events(e).unwrap())
        .collect();
    assert_eq!(entries, golden_entries());
    // Opening left the file as it was.
    assert_eq!(disk.read(path).unwrap(), bytes);
}

#[test]
fn golden_snapshot_reads_back_exactly() {
    let bytes = std::fs::read(fixture_dir().join("group.snapshot")).unwrap();
    assert_eq!(Snapshot::decode(&bytes).unwrap(), golden_snapshot());
}
