//! A partition group's Raft log is its partition's segment log (issue 13: "the segment log
//! is the partition's Raft log ... do not write every message twice"): three real `qit`
//! processes on loopback, a queue of three partitions whose partitions 1 and 2 have groups
//! of their own. Each message is written once per replica, into the partition's segments;
//! the replicas hold the same batches (term, index, offsets, bytes); the log survives a
//! kill -9 and a wiped node is sent it back. Tests wait on conditions (deadlines only guard
//! against hangs).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, metric, publish_spread, retrying};
use common::{eventually, http};
use qit::cluster::group_id::partition_group;
use qit::log::{LogConfig, PartitionLog};
use serde_json::{Value, json};

/// Entries between two snapshots of a group, in these tests (so that logs are purged).
const SNAPSHOT_ENTRIES: u64 = 40;
/// Partitions of the queue.
const PARTITIONS: u32 = 3;

fn body(i: usize) -> String {
    format!("m-{i:05}-{}", "x".repeat(600))
}

async fn start() -> Cluster {
    Cluster::start_with_config(&format!("raft_snapshot_entries = {SNAPSHOT_ENTRIES}\n")).await
}

async fn create(cluster: &Cluster, queue: &str) -> u64 {
    let settings = json!({"partitions": PARTITIONS, "segment_bytes": 16384});
    common::cluster::create_queue(cluster.http(1), queue, settings).await;
    cluster.group_of(1, queue).await
}

/// Group `group`'s directory on the node whose data directory is `dir`.
fn group_dir(dir: &Path, group: u64) -> PathBuf {
    dir.join("raft").join(group.to_string())
}

/// One batch as a replica holds it: base offset, next offset, term, Raft index, bytes.
type Batch = (u64, u64, u64, u64, Vec<u8>);

/// Every batch of the segments in `segments`, read from a copy (the node keeps writing its
/// own); none while the directory is missing.
fn batches(segments: &Path) -> Vec<Batch> {
    let copy = tempfile::tempdir().unwrap();
    let Ok(files) = std::fs::read_dir(segments) else {
        // Not made yet (a node starting).
        return Vec::new();
    };
    for entry in files.filter_map(Result::ok) {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".log") {
            std::fs::copy(entry.path(), copy.path().join(name)).unwrap();
        }
    }
    let log = PartitionLog::open(copy.path(), LogConfig::default()).unwrap();
    let mut out = Vec::new();
    let mut at = log.first_offset();
    loop {
        let read = log.batches_from(at, 256).unwrap();
        let Some((last, _)) = read.last() else {
            return out;
        };
        at = last.next_offset();
        out.extend(read.into_iter().map(|(h, bytes)| {
            (
                h.base_offset,
                h.next_offset(),
                h.leader_epoch,
                h.raft_index,
                bytes.to_vec(),
            )
        }));
    }
}

/// Checks how partition `p` of `queue` (group `group`) is stored on every node: no Raft
/// log chunk files, the records in the group's `segments/`, which the broker's partition
/// directory links to.
fn stored_once(cluster: &Cluster, queue: &str, group: u64, p: u32) {
    for node in &cluster.nodes {
        let dir = group_dir(&node.dir, group);
        let chunks: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name == "log" || name.starts_with("log."))
            .collect();
        assert!(
            chunks.is_empty(),
            "node {}: group {group} has Raft log chunks {chunks:?}",
            node.id
        );
        let link = node.dir.join("queues").join(queue).join(p.to_string());
        let target = std::fs::read_link(&link)
            .unwrap_or_else(|e| panic!("node {}: {} is not a link: {e}", node.id, link.display()));
        assert_eq!(
            target,
            std::path::absolute(dir.join("segments")).unwrap(),
            "node {}",
            node.id
        );
    }
}

/// Waits until every node holds the same batches of partition `p` (group `group`), with
/// `messages` messages in all; returns them.
async fn alike(cluster: &Cluster, group: u64, p: u32, messages: u64) -> Vec<Batch> {
    let dirs: Vec<(u64, PathBuf)> = cluster
        .nodes
        .iter()
        .map(|n| (n.id, group_dir(&n.dir, group).join("segments")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all: Vec<Vec<Batch>> = dirs.iter().map(|(_, d)| batches(d)).collect();
        let counts: Vec<u64> = all
            .iter()
            .map(|b| b.iter().map(|(base, next, ..)| next - base).sum())
            .collect();
        if all.windows(2).all(|w| w[0] == w[1]) && counts[0] == messages {
            return all.into_iter().next().unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "partition {p}: the replicas hold {counts:?} messages in {:?} batches, not the same {messages}",
            all.iter().map(Vec::len).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `first_offset`/`next_offset` of each partition of `queue`, as node `base` answers.
async fn offsets(base: &str, queue: &str) -> Vec<(u64, u64)> {
    let info = common::cluster::ok("queue info", || {
        http().get(format!("{base}/queues/{queue}"))
    })
    .await;
    info["partitions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p["first_offset"].as_u64().unwrap_or(0),
                p["next_offset"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Messages in each partition of `queue`, which holds `total` in all, from its info: the
/// partitions' offsets count messages only (from 0, the groups' own entries take none).
async fn counts(cluster: &Cluster, queue: &str, total: usize) -> Vec<u64> {
    let offsets = offsets(cluster.http(1), queue).await;
    assert!(offsets.iter().all(|(first, _)| *first == 0), "{offsets:?}");
    let counts: Vec<u64> = offsets.iter().map(|(_, next)| *next).collect();
    assert_eq!(counts.iter().sum::<u64>(), total as u64, "{offsets:?}");
    assert_eq!(counts.len(), PARTITIONS as usize);
    counts
}

/// Receives and acks through `base` until `want` distinct messages came; returns their
/// bodies.
async fn drain(base: &str, queue: &str, want: usize) -> BTreeSet<String> {
    let mut bodies = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while bodies.len() < want {
        assert!(Instant::now() < deadline, "{} of {want}", bodies.len());
        let got = common::cluster::ok("receive", || {
            http().get(format!(
                "{base}/queues/{queue}/messages?max=100&wait=1&visibility=30"
            ))
        })
        .await;
        for m in got["messages"].as_array().cloned().unwrap_or_default() {
            let id = m["id"].as_str().expect("an id");
            let (status, answer) = retrying("ack", || {
                http().delete(format!("{base}/queues/{queue}/messages/{id}"))
            })
            .await;
            assert!(status.is_success(), "ack {id}: {status} {answer}");
            let body: Value = m["body"].clone();
            assert!(
                bodies.insert(body.as_str().unwrap_or_default().to_string()),
                "{id} delivered twice"
            );
        }
    }
    bodies
}

/// Each message of partitions 1 and 2 is written once per replica, into the partition's
/// segments (no Raft log chunks), as the same batches on every replica; the partitions'
/// offsets count messages only (the groups' own entries take none); a node killed with
/// SIGKILL opens the same log again and serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitions_messages_are_written_once_and_alike_on_every_replica() {
    let mut cluster = start().await;
    let queue_group = create(&cluster, "once").await;
    let total = 240;
    publish_spread(&cluster, "once", 0..total, [2, 3], body).await;
    let counts = counts(&cluster, "once", total).await;
    let mut held = Vec::new();
    for p in 1..PARTITIONS {
        let group = partition_group(queue_group, p);
        stored_once(&cluster, "once", group, p);
        let count = counts[p as usize];
        let batches = alike(&cluster, group, p, count).await;
        assert_eq!(
            batches.first().map(|b| b.0),
            Some(0),
            "the first message is offset 0"
        );
        let indexes: Vec<u64> = batches.iter().map(|b| b.3).collect();
        assert!(
            indexes.windows(2).all(|w| w[0] < w[1]),
            "indexes rise: {indexes:?}"
        );
        // Snapshots were taken: the log is purged below them, the records stay.
        for node in &cluster.nodes {
            let current = group_dir(&node.dir, group).join("snapshot").join("current");
            eventually(
                &format!("node {} snapshots group {group}", node.id),
                || async { current.is_file() },
            )
            .await;
        }
        held.push((group, p, count, batches));
    }

    cluster.kill(3);
    cluster.restart(3);
    cluster.wait_serving(3).await;
    for (group, p, count, before) in &held {
        stored_once(&cluster, "once", *group, *p);
        assert_eq!(&alike(&cluster, *group, *p, *count).await, before);
    }
    let bodies = drain(cluster.http(3), "once", total).await;
    let want: BTreeSet<String> = (0..total).map(body).collect();
    assert_eq!(bodies, want);
}

/// A node whose data directory was wiped rejoins under its id: the partition groups'
/// leaders send it their snapshots (their logs were purged below them) and the entries
/// after, and it ends up with the same batches as the others, serving every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_is_sent_the_partitions_log_back() {
    let mut cluster = start().await;
    let queue_group = create(&cluster, "back").await;
    // Far more entries per group than the snapshot interval: the logs are purged below
    // the snapshots (keeping `SNAPSHOT_ENTRIES` entries), so a blank replica needs them.
    let total = 600;
    publish_spread(&cluster, "back", 0..480, [1, 2], body).await;
    cluster.kill(3);
    std::fs::remove_dir_all(&cluster.node(3).dir).expect("wipe node 3");
    publish_spread(&cluster, "back", 480..total, [1, 2], body).await;
    cluster.restart(3);
    let counts = counts(&cluster, "back", total).await;
    for p in 1..PARTITIONS {
        let group = partition_group(queue_group, p);
        alike(&cluster, group, p, counts[p as usize]).await;
        stored_once(&cluster, "back", group, p);
    }
    // The queue group's snapshot and both partition groups'. The queue group catches up
    // on its own time (partition 0's messages are not what `alike` waited for above).
    eventually("node 3 installs the queue's three snapshots", || async {
        metric(cluster.http(3), "qit_cluster_snapshots_installed_total").await >= 3.0
    })
    .await;
    let bodies = drain(cluster.http(3), "back", total).await;
    assert_eq!(bodies.len(), total);
}

/// Retention deletes a quiet partition's old segments on every replica although they are
/// its group's Raft log: retention may delete only below the purge point (a follower may
/// still be sent the entries above it), so the replica, held back, snapshots and purges,
/// and the next pass deletes. (Without that, a partition group that never reaches
/// `raft_snapshot_entries` entries kept every segment for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_a_quiet_partitions_segments() {
    // Retention every second: what is waited for is the log budget's look (every 15 s)
    // between two passes.
    let cluster = Cluster::start_with_config("maintenance_interval_secs = 1\n").await;
    let settings = json!({
        "partitions": PARTITIONS,
        "segment_bytes": 16384,
        "retention": {"max_bytes": 32768},
    });
    common::cluster::create_queue(cluster.http(1), "kept", settings).await;
    let total = 300;
    publish_spread(&cluster, "kept", 0..total, [1, 3], body).await;
    for node in &cluster.nodes {
        for p in 1..PARTITIONS {
            let url = format!("{}/queues/kept?local=true", node.http);
            let (first, next) = common::eventually_some(
                &format!("node {} deletes old segments of partition {p}", node.id),
                || async {
                    let info = common::cluster::view(&url).await?;
                    let part = &info["partitions"][p as usize];
                    let first = part["first_offset"].as_u64()?;
                    (first > 0).then(|| (first, part["next_offset"].as_u64().unwrap_or(0)))
                },
            )
            .await;
            let kept = common::cluster::view(&format!(
                "{}/queues/kept/log?partition={p}&from={first}&max=10000&local=true",
                node.http
            ))
            .await
            .expect("the log");
            let kept = kept["messages"].as_array().map_or(0, Vec::len) as u64;
            assert_eq!(kept, next - first, "node {} partition {p}", node.id);
        }
    }
}
