//! Sealed segments are mapped on demand through a bounded map cache (issue 17): reading
//! more sealed segments than the limit keeps the maps bounded (counted by the cache and in
//! `/proc/self/maps`), through the log and through a server, and every record reads back
//! right; a reader holding records keeps their maps, and a reopened log maps nothing until
//! read.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{get_json, http};
use qit::log::{FsyncPolicy, LogConfig, PartitionLog, Record};
use qit::storage::CachedStorage;
use serde_json::{Value, json};

/// The map cache's limit in these tests.
const LIMIT: usize = 16;

/// Segments big enough that their `.log` is mapped, not read (the disk reads files of at
/// most 8 KiB, such as these segments' indexes, into memory instead).
const SEGMENT_BYTES: u64 = 16 * 1024;

/// Lines of `/proc/self/maps` naming a file under `dir` (one per map).
fn maps_under(dir: &Path) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let dir = dir.to_str().unwrap();
    maps.lines().filter(|line| line.contains(dir)).count()
}

fn value(offset: u64) -> Bytes {
    Bytes::from(format!("record {offset:05} {}", "v".repeat(300)))
}

fn timestamp(offset: u64) -> i64 {
    1_700_000_000_000 + offset as i64 * 10
}

fn record(offset: u64) -> Vec<Record> {
    vec![Record {
        timestamp_ms: timestamp(offset),
        value: value(offset),
        ..Record::default()
    }]
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A partition in a fresh directory on the real disk, through a file cache whose map cache
/// keeps [`LIMIT`] maps and never drops one for idleness.
fn setup() -> (tempfile::TempDir, PathBuf, Arc<CachedStorage>, LogConfig) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().canonicalize().unwrap().join("q").join("0");
    let storage = Arc::new(
        CachedStorage::new(qit::storage::disk(), 64, Duration::from_secs(3600))
            .with_max_mapped_files(LIMIT),
    );
    let config = LogConfig {
        storage: Arc::clone(&storage) as _,
        segment_bytes: SEGMENT_BYTES,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    };
    (temp, dir, storage, config)
}

/// Checks `records` are offsets `from..` with their values.
fn check(records: &[qit::log::StoredRecord], from: u64) {
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.offset, from + i as u64);
        assert_eq!(r.value, value(r.offset), "offset {}", r.offset);
    }
}

#[test]
fn reading_more_sealed_segments_than_the_limit_keeps_the_maps_bounded() {
    const N: u64 = 2400;
    let (_temp, dir, storage, config) = setup();
    let rt = rt();
    let log = PartitionLog::open(&dir, config.clone()).unwrap();
    for offset in 0..N {
        rt.block_on(log.append(record(offset))).unwrap();
    }
    let sealed = log.segments().iter().filter(|s| s.sealed).count();
    // Their logs alone are several times the limit.
    assert!(sealed >= 3 * LIMIT, "{sealed} sealed segments");
    assert_eq!(storage.mapped_files(), 0, "a roll maps nothing");

    // Sequentially, a few records at a time.
    let mut from = 0;
    while from < N {
        let records = log.read(from, 7, usize::MAX).unwrap();
        check(&records, from);
        from += records.len() as u64;
        assert!(
            storage.mapped_files() <= LIMIT,
            "{}",
            storage.mapped_files()
        );
    }
    assert!(storage.mapped_files() > 0);
    assert!(maps_under(&dir) <= LIMIT, "{} maps", maps_under(&dir));

    // In a scattered order, one record at a time, and by timestamp (the time indexes).
    for k in 0..N {
        let offset = (k * 7_919) % N;
        let records = log.read(offset, 1, usize::MAX).unwrap();
        assert_eq!(records.len(), 1);
        check(&records, offset);
        assert!(storage.mapped_files() <= LIMIT);
    }
    for offset in [0, 1, N / 3, N / 2 + 1, N - 1] {
        let found = log.offset_for_timestamp(timestamp(offset)).unwrap();
        assert_eq!(found, Some(offset));
        assert!(storage.mapped_files() <= LIMIT);
    }
    assert!(maps_under(&dir) <= LIMIT, "{} maps", maps_under(&dir));

    // Records read out borrow their segment's map: the cache drops its own references, the
    // maps stay until the reader lets go.
    let all = log.read(0, usize::MAX, usize::MAX).unwrap();
    check(&all, 0);
    assert_eq!(all.len() as u64, N);
    assert!(storage.mapped_files() <= LIMIT);
    assert!(maps_under(&dir) > LIMIT, "the records keep their maps");
    drop(all);
    assert!(maps_under(&dir) <= LIMIT, "{} maps", maps_under(&dir));

    // Retention: the dropped segments' maps go with them; the rest still reads.
    let dropped = log.drop_segments_before(N / 2).unwrap();
    assert!(dropped > 0);
    let first = log.first_offset();
    let rest = log.read(first, usize::MAX, usize::MAX).unwrap();
    check(&rest, first);
    drop(rest);
    assert!(maps_under(&dir) <= LIMIT);

    // A reopened log checks its segments but maps none until read.
    drop(log);
    assert_eq!(storage.mapped_files(), 0);
    assert_eq!(maps_under(&dir), 0);
    let log = PartitionLog::open(&dir, config).unwrap();
    assert_eq!(storage.mapped_files(), 0);
    assert_eq!(maps_under(&dir), 0);
    let mut from = first;
    while from < N {
        let records = log.read(from, 11, usize::MAX).unwrap();
        check(&records, from);
        from += records.len() as u64;
        assert!(storage.mapped_files() <= LIMIT);
    }
}

/// Readers of scattered offsets on two threads while the writer keeps rolling segments:
/// every read is right and the count stays bounded.
#[test]
fn concurrent_readers_and_a_rolling_writer_through_a_small_map_cache() {
    const N: u64 = 1800;
    let (_temp, dir, storage, config) = setup();
    let rt = rt();
    let log = PartitionLog::open(&dir, config).unwrap();
    for offset in 0..N / 3 {
        rt.block_on(log.append(record(offset))).unwrap();
    }
    std::thread::scope(|scope| {
        for t in 0..2u64 {
            let log = log.clone();
            let storage = Arc::clone(&storage);
            scope.spawn(move || {
                let mut k = t;
                while log.next_offset() < N {
                    let next = log.next_offset();
                    let offset = (k * 7_919) % next;
                    let records = log.read(offset, 3, usize::MAX).unwrap();
                    check(&records, offset);
                    assert!(!records.is_empty());
                    // Each thread may map one file past the limit before it trims.
                    assert!(storage.mapped_files() <= LIMIT + 2);
                    k += 2;
                }
            });
        }
        for offset in N / 3..N {
            rt.block_on(log.append(record(offset))).unwrap();
        }
    });
    let all = log.read(0, usize::MAX, usize::MAX).unwrap();
    check(&all, 0);
    assert_eq!(all.len() as u64, N);
}

/// Through a server: a consumer reading a backlog spread over many sealed segments, with
/// `max_mapped_files` at 16; `qit_mapped_files` in `/metrics` and the process's maps of the
/// data directory stay within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_keeps_its_maps_within_max_mapped_files() {
    const N: usize = 1600;
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().canonicalize().unwrap();
    let server = common::TestServer::start_with(&data, |c| {
        c.max_mapped_files = LIMIT;
        c.idle_close_secs = 3600;
    })
    .await;
    let base = server.http.clone();
    let created = http()
        .post(format!("{base}/queues/backlog"))
        .json(&json!({"segment_bytes": SEGMENT_BYTES, "max_deliveries": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let body = |i: usize| format!("message {i:04} {}", "m".repeat(300));
    for chunk in (0..N).collect::<Vec<_>>().chunks(8) {
        let messages: Vec<Value> = chunk.iter().map(|i| json!({"body": body(*i)})).collect();
        let published = http()
            .post(format!("{base}/queues/backlog/messages/batch"))
            .json(&json!({ "messages": messages }))
            .send()
            .await
            .unwrap();
        assert_eq!(published.status(), 201);
    }
    let info: Value = get_json(format!("{base}/queues/backlog")).await;
    let segments = info["partitions"][0]["segments"].as_u64().unwrap();
    assert!(segments as usize >= 2 * LIMIT, "{info}");
    let mut received = Vec::new();
    while received.len() < N {
        let page: Value = get_json(format!(
            "{base}/queues/backlog/messages?max=100&visibility=3600"
        ))
        .await;
        let messages = page["messages"].as_array().unwrap();
        assert!(!messages.is_empty(), "{page}");
        received.extend(
            messages
                .iter()
                .map(|m| m["body"].as_str().unwrap().to_string()),
        );
    }
    let expected: Vec<String> = (0..N).map(body).collect();
    assert_eq!(received, expected);
    let metrics = common::metrics_text(&base).await;
    let mapped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("qit_mapped_files "))
        .expect("qit_mapped_files in /metrics")
        .parse()
        .unwrap();
    assert!(mapped >= 1.0 && mapped <= LIMIT as f64, "{mapped}");
    // Response bodies still on their way out may hold a dropped map a moment longer.
    common::eventually(
        &format!("at most {LIMIT} maps of the data directory"),
        || async { maps_under(&data) <= LIMIT },
    )
    .await;
    server.stop().await;
}
