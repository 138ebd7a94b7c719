//! The byte format is frozen by a golden fixture (`tests/fixtures/golden-v1/`), and
//! `qit-inspect` is checked as a user runs it.
//!
//! To change the format deliberately: bump the version in `storage-format.md`, run
//! `cargo test --test log_format -- --ignored regenerate` and commit the new fixture.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use qit::log::record::encode_batch;
use qit::log::{Compression, FsyncPolicy, LogConfig, PartitionLog, Record};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden-v1")
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
    for (records, compression) in golden_batches() {
        let log = PartitionLog::open(
            &dir,
            LogConfig {
                compression,
                fsync: FsyncPolicy::Always,
                ..LogConfig::default()
            },
        )
        .unwrap();
        log.append(records).await.unwrap();
    }
}

#[test]
fn encoder_still_writes_the_golden_bytes() {
    let mut bytes = Vec::new();
    let mut next = 0;
    for (records, compression) in golden_batches() {
        encode_batch(&mut bytes, next, 0, &records, compression);
        next += records.len() as u64;
    }
    let golden = std::fs::read(fixture_dir().join("00000000000000000000.log")).unwrap();
    assert_eq!(
        bytes, golden,
        "the batch format changed: see storage-format.md"
    );
}

#[test]
fn golden_fixture_reads_back_exactly() {
    let temp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir(), temp.path());
    let log = PartitionLog::open(temp.path(), LogConfig::default()).unwrap();
    let got = log.read(0, 100, usize::MAX).unwrap();
    let want: Vec<Record> = golden_batches().into_iter().flat_map(|(r, _)| r).collect();
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
