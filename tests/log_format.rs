//! The byte format is frozen by golden fixtures: `tests/fixtures/golden-v2/` is what this
//! code writes, `tests/fixtures/golden-v1/` what format v1 wrote (still read, and appended
//! to). `qit-inspect` is checked as a user runs it.
//!
//! To change the format deliberately: bump the version in `storage-format.md`, run
//! `cargo test --test log_format -- --ignored regenerate` and commit the new fixture (the
//! fixtures of earlier versions stay as they are).

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use qit::log::record::{HEADER_LEN, HEADER_LEN_V1, Stamp, encode_batch};
use qit::log::{Compression, FsyncPolicy, LogConfig, PartitionLog, Record};

/// The fixture of what this code writes.
fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden-v2")
}

/// The fixture format v1 wrote: the same records, 60-byte headers without Raft index.
fn v1_fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden-v1")
}

/// The stamp of each fixture batch: the first as a single node writes (zeros), the second
/// as a cluster replica applying Raft entry 9 of term 2 does (v1 wrote epoch 0 only).
fn golden_stamps() -> [Stamp; 2] {
    [
        Stamp::default(),
        Stamp {
            leader_epoch: 2,
            raft_index: 9,
            ..Stamp::default()
        },
    ]
}

/// The records of the fixture: batch one uncompressed, batch two LZ4.
fn golden_batches() -> Vec<(Vec<Record>, Compression)> {
    let first = vec![
        Record {
            timestamp_ms: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"user-1")),
            headers: vec![("trace".into(), Bytes::from_static(b"abc"))],
            value: Bytes::from_static(br#"{"to":"user@example.com","subject":"Hello!"}"#),
        },
        Record {
            timestamp_ms: 1_700_000_000_005,
            key: None,
            headers: vec![],
            value: Bytes::from_static(b""),
        },
    ];
    let second = (0..20)
        .map(|i| Record {
            timestamp_ms: 1_700_000_001_000 + i,
            key: Some(Bytes::from(format!("k{}", i % 3))),
            headers: vec![],
            value: Bytes::from("compressible ".repeat(8)),
        })
        .collect();
    vec![(first, Compression::None), (second, Compression::Lz4)]
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

#[tokio::test]
#[ignore = "rewrites the golden fixture; run only for a deliberate format change"]
async fn regenerate() {
    let dir = fixture_dir();
    let _ = std::fs::remove_dir_all(&dir);
    for ((records, compression), stamp) in golden_batches().into_iter().zip(golden_stamps()) {
        let log = PartitionLog::open(
            &dir,
            LogConfig {
                compression,
                fsync: FsyncPolicy::Always,
                ..LogConfig::default()
            },
        )
        .unwrap();
        log.set_stamp(stamp);
        log.append(records).await.unwrap();
    }
}

#[test]
fn encoder_still_writes_the_golden_bytes() {
    let mut bytes = Vec::new();
    let mut next = 0;
    for ((records, compression), stamp) in golden_batches().into_iter().zip(golden_stamps()) {
        encode_batch(&mut bytes, next, stamp, &records, compression);
        next += records.len() as u64;
    }
    let golden = std::fs::read(fixture_dir().join("00000000000000000000.log")).unwrap();
    assert_eq!(
        bytes, golden,
        "the batch format changed: see storage-format.md"
    );
}

/// Both fixtures (this version's and v1's) read back as the records they were written
/// from, and their batches name their version and stamp.
#[test]
fn golden_fixtures_read_back_exactly() {
    let want: Vec<Record> = golden_batches().into_iter().flat_map(|(r, _)| r).collect();
    for (dir, version) in [(fixture_dir(), 2), (v1_fixture_dir(), 1)] {
        let temp = tempfile::tempdir().unwrap();
        copy_dir(&dir, temp.path());
        let log = PartitionLog::open(temp.path(), LogConfig::default()).unwrap();
        let got = log.read(0, 100, usize::MAX).unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.offset, i as u64);
            assert_eq!(
                (&g.key, &g.headers, &g.value, g.timestamp_ms),
                (&w.key, &w.headers, &w.value, w.timestamp_ms)
            );
        }
        assert_eq!(
            log.offset_for_timestamp(1_700_000_001_000).unwrap(),
            Some(2)
        );
        drop(log);
        let batches: Vec<_> = qit::log::inspect::inspect(temp.path(), false)
            .unwrap()
            .into_iter()
            .flat_map(|s| s.batches)
            .map(|b| (b.version, b.leader_epoch, b.raft_index))
            .collect();
        let stamps = golden_stamps().map(|s| match version {
            1 => (1, 0, 0),
            _ => (2, s.leader_epoch, s.raft_index),
        });
        assert_eq!(batches, stamps, "{}", dir.display());
    }
}

/// A partition written by format v1 takes appends: the new batches are v2 and follow the
/// v1 ones in the same segment, and all of it reads back (also after a reopen).
#[tokio::test]
async fn a_v1_partition_takes_v2_appends() {
    let temp = tempfile::tempdir().unwrap();
    copy_dir(&v1_fixture_dir(), temp.path());
    let log = PartitionLog::open(temp.path(), LogConfig::default()).unwrap();
    log.set_stamp(Stamp {
        leader_epoch: 4,
        raft_index: 40,
        ..Stamp::default()
    });
    let more = Record {
        timestamp_ms: 1_700_000_002_000,
        key: None,
        headers: vec![],
        value: Bytes::from_static(b"after v1"),
    };
    assert_eq!(log.append(vec![more.clone()]).await.unwrap(), 22);
    drop(log);
    let log = PartitionLog::open(temp.path(), LogConfig::default()).unwrap();
    let got = log.read(0, 100, usize::MAX).unwrap();
    assert_eq!(got.len(), 23);
    assert_eq!(got[0].key.as_deref(), Some(&b"user-1"[..]));
    assert_eq!((got[22].offset, &got[22].value), (22, &more.value));
    drop(log);
    let segments = qit::log::inspect::inspect(temp.path(), false).unwrap();
    assert_eq!(segments.len(), 1, "one segment holds both versions");
    let batches: Vec<_> = segments[0]
        .batches
        .iter()
        .map(|b| (b.version, b.raft_index))
        .collect();
    assert_eq!(batches, [(1, 0), (1, 0), (2, 40)]);
    let (ok, text) = inspect(&["verify"], temp.path());
    assert!(ok, "{text}");
}

fn inspect(args: &[&str], path: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qit-inspect"))
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn inspect_verifies_dumps_and_summarizes_a_sound_partition() {
    let dir = fixture_dir();
    let (ok, text) = inspect(&["verify"], &dir);
    assert!(ok, "{text}");
    let (ok, text) = inspect(&["dump"], &dir);
    assert!(
        ok && text.contains("user-1") && text.contains("trace=abc") && text.contains("lz4"),
        "{text}"
    );
    let (ok, text) = inspect(&["stats", "--json"], &dir);
    let stats: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert!(ok);
    assert_eq!(stats["records"], 22);
    assert_eq!(stats["batches"], 2);
    assert!(stats["compression_ratio"].as_f64().unwrap() > 1.0);
    let (ok, text) = inspect(&["dump", "--json"], &dir.join("00000000000000000000.log"));
    assert!(ok);
    assert_eq!(text.lines().count(), 22);
}

#[test]
fn inspect_reports_damage_with_file_and_position() {
    let temp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir(), temp.path());
    let log = temp.path().join("00000000000000000000.log");
    let whole = std::fs::read(&log).unwrap();
    let first_batch = u32::from_le_bytes(whole[8..12].try_into().unwrap()) as usize;

    // A flipped byte in the second batch.
    let mut flipped = whole.clone();
    flipped[first_batch + 70] ^= 0x01;
    std::fs::write(&log, &flipped).unwrap();
    let (ok, text) = inspect(&["verify"], temp.path());
    assert!(!ok);
    assert!(
        text.contains("00000000000000000000.log")
            && text.contains(&format!("byte {first_batch}"))
            && text.contains("CRC"),
        "{text}"
    );
    let (_, json) = inspect(&["verify", "--json"], temp.path());
    let report: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["problems"][0]["position"], first_batch);

    // A torn tail.
    std::fs::write(&log, &whole[..whole.len() - 10]).unwrap();
    let (ok, text) = inspect(&["verify"], temp.path());
    assert!(!ok && text.contains("torn tail"), "{text}");

    // An index entry that points nowhere.
    std::fs::write(&log, &whole).unwrap();
    let index = temp.path().join("00000000000000000000.index");
    let mut entries = std::fs::read(&index).unwrap();
    entries.extend_from_slice(&5u32.to_le_bytes());
    entries.extend_from_slice(&7u32.to_le_bytes());
    std::fs::write(&index, &entries).unwrap();
    let (ok, text) = inspect(&["verify"], temp.path());
    assert!(!ok && text.contains(".index"), "{text}");
}

/// `v2` (one batch this code encoded) as format v1 wrote it: no Raft index after the
/// 60-byte header, version 1 (byte 12), length (bytes 8-11) and CRC (bytes 4-7) redone.
fn as_v1(v2: &[u8]) -> Vec<u8> {
    let mut out = v2[..HEADER_LEN_V1].to_vec();
    out.extend_from_slice(&v2[HEADER_LEN..]);
    out[12] = 1;
    let len = out.len() as u32;
    out[8..12].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A v1 segment whose last batch is shorter than a v2 header (one empty record) reads
/// back whole: a reader must not ask for a v2 header's bytes past the end of the data.
#[tokio::test]
async fn a_v1_segment_ending_in_a_batch_shorter_than_a_v2_header_reads() {
    let temp = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    let mut last_len = 0;
    for (offset, value) in [(0u64, &b"first"[..]), (1, &b""[..])] {
        let mut v2 = Vec::new();
        let record = Record {
            value: Bytes::copy_from_slice(value),
            ..Record::default()
        };
        encode_batch(
            &mut v2,
            offset,
            Stamp::default(),
            &[record],
            Compression::None,
        );
        let v1 = as_v1(&v2);
        last_len = v1.len();
        bytes.extend(v1);
    }
    assert!(
        last_len < HEADER_LEN,
        "the last batch is shorter than a v2 header"
    );
    std::fs::write(temp.path().join("00000000000000000000.log"), &bytes).unwrap();
    let log = PartitionLog::open(temp.path(), LogConfig::default()).unwrap();
    let got = log.read(0, 10, usize::MAX).unwrap();
    let values: Vec<&[u8]> = got.iter().map(|r| &r.value[..]).collect();
    assert_eq!(values, [&b"first"[..], &b""[..]]);
    assert_eq!(log.read(1, 10, usize::MAX).unwrap().len(), 1);
}

/// Compaction of a sealed v1 segment rewrites its batches as v2 (Raft index 0): the kept
/// records read back at their offsets, the batches keep their offset ranges, and the
/// partition verifies.
#[tokio::test]
async fn compaction_rewrites_a_v1_segment_as_v2() {
    let temp = tempfile::tempdir().unwrap();
    copy_dir(&v1_fixture_dir(), temp.path());
    let config = LogConfig {
        segment_bytes: 100,
        ..LogConfig::default()
    };
    let log = PartitionLog::open(temp.path(), config).unwrap();
    // The v1 segment is past 100 bytes: this append rolls, sealing it.
    log.append(vec![Record::default()]).await.unwrap();
    let ranges = |dir: &Path| -> Vec<(u8, u64, u64, u64)> {
        qit::log::inspect::inspect(dir, false).unwrap()[0]
            .batches
            .iter()
            .map(|b| (b.version, b.base_offset, b.next_offset, b.raft_index))
            .collect()
    };
    assert_eq!(ranges(temp.path()), [(1, 0, 2, 0), (1, 2, 22, 0)]);
    let keyed = |r: &qit::log::StoredRecord| r.key.as_deref() != Some(&b"k1"[..]);
    let stats = log.rewrite_sealed(0, &mut |r| keyed(r)).unwrap();
    assert!(stats.records_removed > 0, "{stats:?}");
    let got = log.read(0, 100, usize::MAX).unwrap();
    let want: Vec<u64> = golden_batches()
        .into_iter()
        .flat_map(|(r, _)| r)
        .enumerate()
        .filter(|(_, r)| r.key.as_deref() != Some(&b"k1"[..]))
        .map(|(i, _)| i as u64)
        .chain([22])
        .collect();
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), want);
    drop(log);
    assert_eq!(ranges(temp.path()), [(2, 0, 2, 0), (2, 2, 22, 0)]);
    let (ok, text) = inspect(&["verify"], temp.path());
    assert!(ok, "{text}");
}

/// `qit-inspect stats` counts each batch's own header in the uncompressed size: a
/// partition of uncompressed batches of both versions has a compression ratio of exactly 1.
#[tokio::test]
async fn stats_of_uncompressed_batches_of_both_versions_show_no_compression() {
    let temp = tempfile::tempdir().unwrap();
    let mut v2 = Vec::new();
    let record = Record {
        value: Bytes::from_static(b"v1 batch"),
        ..Record::default()
    };
    encode_batch(&mut v2, 0, Stamp::default(), &[record], Compression::None);
    std::fs::write(temp.path().join("00000000000000000000.log"), as_v1(&v2)).unwrap();
    let log = PartitionLog::open(temp.path(), LogConfig::default()).unwrap();
    log.append(vec![Record::default()]).await.unwrap();
    drop(log);
    let (ok, text) = inspect(&["stats", "--json"], temp.path());
    assert!(ok, "{text}");
    let stats: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(stats["batches"], 2);
    assert_eq!(stats["compression_ratio"].as_f64(), Some(1.0), "{text}");
}
