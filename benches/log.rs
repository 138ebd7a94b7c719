//! Partition log benchmarks: append (fsync never / always with 8 and 64 appenders),
//! sequential read, offset lookup. 100-byte values.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qit::log::{FsyncPolicy, LogConfig, PartitionLog, Record};

fn batch(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            timestamp_ms: 1_700_000_000_000 + i as i64,
            key: None,
            headers: Vec::new(),
            value: Bytes::from(vec![b'x'; 100]),
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Elements(100));
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    };
    let log = PartitionLog::open(dir.path(), config).unwrap();
    let records = batch(100);
    group.bench_function("batches_of_100_fsync_never", |b| {
        b.to_async(&rt).iter(|| log.append(records.clone()))
    });
    // fsync = always: N appenders, each appending batches of 100 back to back and waiting
    // for each to be durable; one iteration is one batch from each. With 8 appenders at most
    // 800 records (~88 KB) wait for any one fsync, so the fsync latency bounds throughput;
    // 64 appenders show what group commit does with more writers.
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let durable = PartitionLog::open(dir.path(), config).unwrap();
    for appenders in [8u64, 64] {
        group.throughput(Throughput::Elements(100 * appenders));
        let name = format!("{appenders}_appenders_batches_of_100_fsync_always");
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let log = durable.clone();
                let records = records.clone();
                async move {
                    let started = Instant::now();
                    let tasks: Vec<_> = (0..appenders)
                        .map(|_| {
                            let (log, records) = (log.clone(), records.clone());
                            tokio::spawn(async move {
                                for _ in 0..iters {
                                    log.append(records.clone()).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                    started.elapsed()
                }
            })
        });
    }
    group.finish();
}

fn read(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    // 4 MiB segments: most of the 22 MB below is in sealed (mapped) segments. Through the
    // storage the server uses: the disk behind its file cache (and map cache).
    let storage = std::sync::Arc::new(qit::storage::CachedStorage::new(
        qit::storage::disk(),
        qit::storage::cache::DEFAULT_MAX_OPEN_FILES,
        qit::storage::cache::DEFAULT_IDLE_CLOSE,
    ));
    let log = PartitionLog::open(
        dir.path(),
        LogConfig {
            storage,
            fsync: FsyncPolicy::Never,
            segment_bytes: 4 * 1024 * 1024,
            ..LogConfig::default()
        },
    )
    .unwrap();
    rt.block_on(async {
        for _ in 0..2_000 {
            log.append(batch(100)).await.unwrap();
        }
    });
    let total = log.next_offset();
    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Elements(total));
    group.bench_function("sequential_200k_records_warm", |b| {
        b.iter(|| {
            let mut from = 0;
            while from < total {
                let records = log.read(from, 10_000, 16 * 1024 * 1024).unwrap();
                from = records.last().map_or(total, |r| r.offset + 1);
            }
        })
    });
    group.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    // The lookup alone: segment list, then the sparse index (binary search in its map).
    group.bench_function("offset_lookup", |b| {
        b.iter(|| {
            i = (i + 7_919) % total;
            log.locate(i).unwrap()
        })
    });
    // One record by offset: the lookup plus reading and CRC-checking its batch (~11 KB here).
    group.bench_function("read_one_record_by_offset", |b| {
        b.iter(|| {
            i = (i + 7_919) % total;
            log.read(i, 1, usize::MAX).unwrap()
        })
    });
    group.finish();
}

/// Prints the disk's own durable bandwidth for comparison with the fsync=always figure.
fn disk_baseline(_: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dd");
    let started = Instant::now();
    let status = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", path.display()),
            "bs=1M",
            "count=512",
            "conv=fdatasync",
        ])
        .stderr(std::process::Stdio::null())
        .status();
    if status.is_ok_and(|s| s.success()) {
        let secs = started.elapsed().as_secs_f64();
        println!(
            "disk baseline (dd 512 MiB, fdatasync): {:.0} MB/s",
            512.0 * 1.048_576 / secs
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = append, read, disk_baseline
}
criterion_main!(benches);
