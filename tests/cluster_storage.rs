//! Cluster storage (issue 13, "storage"): queue groups snapshot their data and purge their
//! Raft logs, a restarted node restores its queues from the snapshots and replays only the
//! entries after them, and the replacement of a wiped node is sent the snapshots. Three real `qit` processes
//! on loopback with a small `raft_snapshot_entries`; tests wait on conditions (deadlines
//! only guard against hangs).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, log_bodies, metric, publish_spread, retrying, view};
use common::{eventually, http, refused_start};
use serde_json::{Value, json};

/// Entries between two snapshots of a queue group, in these tests.
const SNAPSHOT_ENTRIES: u64 = 40;
/// Bytes of each message body.
const BODY_BYTES: usize = 2048;

/// Three nodes that snapshot every [`SNAPSHOT_ENTRIES`] entries.
async fn start() -> Cluster {
    Cluster::start_with_config(&format!("raft_snapshot_entries = {SNAPSHOT_ENTRIES}\n")).await
}

/// Creates queue `queue` with one partition and small segments (so that snapshots hold
/// sealed, hard-linked segments and an active one).
async fn create_queue(base: &str, queue: &str) {
    let settings = json!({"partitions": 1, "max_deliveries": 0, "segment_bytes": 32768});
    common::cluster::create_queue(base, queue, settings).await;
}

fn body(i: usize) -> String {
    let head = format!("m-{i:05}-");
    format!("{head}{}", "x".repeat(BODY_BYTES - head.len()))
}

/// Receives and acks through node `id` until `want` messages were delivered; with `last`,
/// checks that nothing more is delivered then. Returns the bodies delivered.
async fn drain(cluster: &Cluster, id: u64, queue: &str, want: usize, last: bool) -> Vec<String> {
    let base = cluster.node(id).http.clone();
    let mut bodies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while bodies.len() < want {
        let messages = receive(&base, queue, (want - bodies.len()).min(100)).await;
        assert!(
            Instant::now() < deadline,
            "node {id} delivered {} of {want}",
            bodies.len()
        );
        for m in messages {
            let (Some(id), Some(text)) = (m["id"].as_str(), m["body"].as_str()) else {
                panic!("a delivery without id or body: {m}");
            };
            let (status, answer) = retrying("ack", || {
                http().delete(format!("{base}/queues/{queue}/messages/{id}"))
            })
            .await;
            assert!(status.is_success(), "ack {id}: {status} {answer}");
            bodies.push(text.to_string());
        }
    }
    if last {
        let more = receive(&base, queue, 100).await;
        assert!(
            more.is_empty(),
            "node {id} delivered more than the {want} expected"
        );
    }
    bodies
}

/// One receive through `base` (waits up to a second).
async fn receive(base: &str, queue: &str, max: usize) -> Vec<Value> {
    let (status, answer) = retrying("receive", || {
        http().get(format!(
            "{base}/queues/{queue}/messages?max={max}&wait=1&visibility=15"
        ))
    })
    .await;
    assert!(status.is_success(), "receive: {status} {answer}");
    answer["messages"].as_array().cloned().unwrap_or_default()
}

/// The committed log of every partition, one after the other, as node `base` reads it
/// locally.
async fn log(base: &str, queue: &str) -> Option<Vec<Value>> {
    let info = view(&format!("{base}/queues/{queue}?local=true")).await?;
    let mut all = Vec::new();
    for partition in 0..info["partitions"].as_array()?.len() {
        let url =
            format!("{base}/queues/{queue}/log?partition={partition}&from=0&max=10000&local=true");
        all.extend(view(&url).await?["messages"].as_array()?.iter().cloned());
    }
    Some(all)
}

/// The replicated part of the default group's state in node `base`'s own copy: per partition,
/// the ack floor and backlog.
async fn group_state(base: &str, queue: &str) -> Option<Vec<(u64, u64)>> {
    let v = view(&format!("{base}/queues/{queue}/groups/default?local=true")).await?;
    Some(
        v["partitions"]
            .as_array()?
            .iter()
            .map(|p| {
                (
                    p["committed_offset"].as_u64().unwrap_or(u64::MAX),
                    p["backlog"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect(),
    )
}

/// Waits until node `id` holds the same committed log and group state as node `like`.
async fn converged(cluster: &Cluster, id: u64, like: u64, queue: &str, messages: usize) {
    let (base, reference) = (
        cluster.node(id).http.clone(),
        cluster.node(like).http.clone(),
    );
    eventually(&format!("node {id} holds node {like}'s log"), || async {
        let mine = log(&base, queue).await;
        mine.as_ref().is_some_and(|m| m.len() == messages) && mine == log(&reference, queue).await
    })
    .await;
    eventually(
        &format!("node {id} holds node {like}'s group state"),
        || async {
            let mine = group_state(&base, queue).await;
            mine.is_some() && mine == group_state(&reference, queue).await
        },
    )
    .await;
}

/// Bytes of the Raft log chunk files of `group` under node data dir `dir`.
fn raft_log_bytes(dir: &Path, group: u64) -> u64 {
    let group_dir = dir.join("raft").join(group.to_string());
    std::fs::read_dir(&group_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("log"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Far more entries than the snapshot interval: every node's Raft log of the queue stays
/// a fraction of what was published (purged below its snapshots), each message is
/// delivered exactly once, and a restarted node serves the same log and group state while
/// replaying only the entries after its snapshot, not the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_bound_the_raft_log_and_restarts_replay_only_the_suffix() {
    let mut cluster = start().await;
    create_queue(&cluster.node(1).http, "bounded").await;
    let group = cluster.group_of(1, "bounded").await;
    let total = 400;
    publish_spread(&cluster, "bounded", 0..total, [1, 3], body).await;
    let first = drain(&cluster, 2, "bounded", 150, false).await;
    assert_eq!(first.len(), 150);
    for id in 2..=3 {
        converged(&cluster, id, 1, "bounded", total).await;
    }
    let published_bytes = (total * BODY_BYTES) as u64;
    for node in &cluster.nodes {
        // Purging follows the snapshots, a little after the last entries are applied.
        eventually(&format!("node {} purges its raft log", node.id), || async {
            raft_log_bytes(&node.dir, group) < published_bytes / 2
        })
        .await;
        let bytes = raft_log_bytes(&node.dir, group);
        eprintln!(
            "node {}: raft log of group {group}: {bytes} bytes for {published_bytes} published",
            node.id
        );
        assert!(
            node.dir
                .join("raft")
                .join(group.to_string())
                .join("snapshot")
                .join("current")
                .is_file(),
            "node {} has a snapshot",
            node.id
        );
    }

    // Restart node 2: it restores the snapshot and replays only the suffix.
    cluster.kill(2);
    cluster.restart(2);
    converged(&cluster, 2, 1, "bounded", total).await;
    let replayed = metric(
        &cluster.node(2).http,
        "qit_cluster_start_replayed_entries_total",
    )
    .await;
    let entries = (total + first.len()) as f64;
    eprintln!("restart replayed {replayed} of about {entries} queue entries");
    assert!(
        replayed <= 2.0 * SNAPSHOT_ENTRIES as f64 + 10.0,
        "a restart replayed {replayed} entries of about {entries}"
    );

    // Every message is delivered once: the rest now, through the restarted node.
    let rest = drain(&cluster, 2, "bounded", total - first.len(), true).await;
    let mut seen = BTreeSet::new();
    for text in first.iter().chain(&rest) {
        assert!(seen.insert(text.clone()), "delivered twice: {}", &text[..8]);
    }
    let expected: BTreeSet<String> = (0..total).map(body).collect();
    assert_eq!(seen.len(), expected.len());
    assert!(seen == expected, "delivered a different set of messages");
    for id in [1, 3] {
        converged(&cluster, id, 2, "bounded", total).await;
    }
}

/// With snapshots by entries off, the byte budget alone bounds each node's Raft log of a
/// queue: 12.8 MB published in 32 KiB messages leave at most a couple of MiB of log files
/// on every node (the budget, plus what is kept below the snapshot and a chunk), a node
/// restarted afterwards restores the budget's snapshot and serves the same log, and every
/// message is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_budget_bounds_the_raft_log() {
    const BUDGET: u64 = 1024 * 1024;
    const BIG_BODY: usize = 32 * 1024;
    fn big(i: usize) -> String {
        format!("b-{i:05}-{}", "y".repeat(BIG_BODY - 8))
    }
    let mut cluster = Cluster::start_with_config(&format!(
        "raft_snapshot_entries = 0\nraft_log_bytes = {BUDGET}\n"
    ))
    .await;
    create_queue(&cluster.node(1).http, "budget").await;
    let group = cluster.group_of(1, "budget").await;
    let total = 400;
    publish_spread(&cluster, "budget", 0..total, [1, 3], big).await;
    let published_bytes = (total * BIG_BODY) as u64;
    for node in &cluster.nodes {
        eventually(
            &format!("node {} keeps its raft log within the budget", node.id),
            || async { raft_log_bytes(&node.dir, group) <= 2 * BUDGET },
        )
        .await;
        eprintln!(
            "node {}: raft log of group {group}: {} bytes for {published_bytes} published",
            node.id,
            raft_log_bytes(&node.dir, group)
        );
    }
    assert!(metric(&cluster.node(1).http, "qit_cluster_log_budget_rounds_total").await > 0.0);

    cluster.kill(3);
    cluster.restart(3);
    converged(&cluster, 3, 1, "budget", total).await;
    let bodies = drain(&cluster, 3, "budget", total, true).await;
    let seen: BTreeSet<String> = bodies.iter().cloned().collect();
    assert_eq!(seen.len(), total, "a message was delivered twice");
    assert_eq!(seen, (0..total).map(big).collect::<BTreeSet<_>>());
}

/// Every `.log` file (segment) held by group `group`'s snapshots under node data dir `dir`,
/// with its link count (2 or more while the queue holds it too).
fn snapshot_segment_links(dir: &Path, group: u64) -> Vec<(std::path::PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    fn walk(path: &Path, out: &mut Vec<(std::path::PathBuf, u64)>) {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "log") {
                out.push((path, meta.nlink()));
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &dir.join("raft").join(group.to_string()).join("snapshot"),
        &mut out,
    );
    out
}

/// Retention removes old segments on every replica; each replica then lets go of them:
/// its snapshot no longer links them and its Raft log, which held the removed messages
/// too, is purged. A quiet queue reaches neither `raft_snapshot_entries` nor
/// `raft_log_bytes`, so without this its replicas kept every message ever published in
/// their Raft logs, whatever retention removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_also_frees_the_raft_log_and_the_snapshot() {
    let cluster = Cluster::start().await;
    let settings = json!({
        "partitions": 1,
        "segment_bytes": 32768,
        "retention": {"max_bytes": 65536},
    });
    common::cluster::create_queue(&cluster.node(1).http, "kept", settings).await;
    let group = cluster.group_of(1, "kept").await;
    let total = 200;
    publish_spread(&cluster, "kept", 0..total, [1, 3], body).await;
    let published_bytes = (total * BODY_BYTES) as u64;
    for node in &cluster.nodes {
        eventually(
            &format!("node {} lets go of what retention removed", node.id),
            || async {
                let links = snapshot_segment_links(&node.dir, group);
                raft_log_bytes(&node.dir, group) < published_bytes / 8
                    && !links.is_empty()
                    && links.iter().all(|(_, nlink)| *nlink >= 2)
            },
        )
        .await;
        eprintln!(
            "node {}: raft log of group {group}: {} bytes for {published_bytes} published",
            node.id,
            raft_log_bytes(&node.dir, group)
        );
        // What retention kept is still served, the last messages included.
        let info = view(&format!("{}/queues/kept?local=true", node.http))
            .await
            .unwrap();
        let first = info["partitions"][0]["first_offset"].as_u64().unwrap();
        assert!(first > 0, "node {}: retention removed nothing", node.id);
        let kept = view(&format!(
            "{}/queues/kept/log?partition=0&from={first}&max=10000&local=true",
            node.http
        ))
        .await
        .unwrap();
        let kept: Vec<&str> = kept["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["body"].as_str())
            .collect();
        assert_eq!(kept.len() as u64, total as u64 - first);
        // Two lanes publish (even and odd numbers), each one after the other: the log
        // ends with the last message of the lane that finished last.
        let last = kept.last().copied().unwrap_or_default();
        assert!(last == body(total - 2) || last == body(total - 1));
    }
}

/// A replica restored from its snapshot puts messages without a key in the partitions the
/// others put them in. Every publish after the first carries three messages to a queue of
/// three partitions, so every snapshot lies one message past a full turn: a replica that
/// restarted its turn at the restored point (as an in-memory counter did) put each later
/// message one partition off, and the same id named different messages on its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_replica_spreads_messages_like_the_others() {
    let mut cluster = Cluster::start_with_config("raft_snapshot_entries = 10\n").await;
    let base = cluster.node(1).http.clone();
    let settings = json!({"partitions": 3, "max_deliveries": 0});
    common::cluster::create_queue(&base, "turns", settings).await;
    let group = cluster.group_of(1, "turns").await;
    let publish = |via: String, bodies: Vec<String>| async move {
        let messages: Vec<Value> = bodies.iter().map(|b| json!({"body": b})).collect();
        let (status, answer) = retrying("publish", || {
            http()
                .post(format!("{via}/queues/turns/messages/batch"))
                .json(&json!({ "messages": messages }))
        })
        .await;
        assert!(status.is_success(), "publish: {status} {answer}");
    };
    publish(base.clone(), vec!["first".into()]).await;
    for round in 0..30 {
        let bodies = (0..3).map(|i| format!("before-{round}-{i}")).collect();
        publish(base.clone(), bodies).await;
    }
    let node2 = cluster.node(2).dir.clone();
    eventually("node 2 has a snapshot of the queue", || async {
        node2
            .join("raft")
            .join(group.to_string())
            .join("snapshot")
            .join("current")
            .is_file()
    })
    .await;
    cluster.kill(2);
    cluster.restart(2);
    for round in 0..5 {
        let bodies = (0..3).map(|i| format!("after-{round}-{i}")).collect();
        publish(base.clone(), bodies).await;
    }
    let restarted = cluster.node(2).http.clone();
    for partition in 0..3 {
        let reference = log_bodies(&base, "turns", partition).await.unwrap();
        assert!(reference.iter().any(|b| b.starts_with("after-")));
        eventually(
            &format!("node 2's partition {partition} holds node 1's messages"),
            || async {
                log_bodies(&restarted, "turns", partition).await.as_ref() == Some(&reference)
            },
        )
        .await;
    }
}

/// A node whose data directory was wiped is replaced by a new node (`--replaces`): the
/// leaders' logs are purged, so the new replica is sent the snapshots of the queue's
/// groups (the queue group's with partition 0 and the consumer groups, and partition 1's),
/// installs them and then follows the logs; its committed logs and group state end
/// identical to the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_is_sent_the_snapshot() {
    let mut cluster = start().await;
    let settings = json!({"partitions": 2, "max_deliveries": 0, "segment_bytes": 32768});
    common::cluster::create_queue(&cluster.node(1).http, "wiped", settings).await;
    let group = cluster.group_of(1, "wiped").await;
    publish_spread(&cluster, "wiped", 0..200, [1, 3], body).await;
    let acked = drain(&cluster, 1, "wiped", 50, false).await;
    assert_eq!(acked.len(), 50);
    converged(&cluster, 3, 1, "wiped", 200).await;

    cluster.kill(3);
    std::fs::remove_dir_all(&cluster.node(3).dir).unwrap();
    // Entries while it is away, so that the snapshot the replacement gets is not the one
    // node 3 had.
    publish_spread(&cluster, "wiped", 200..300, [1, 2], body).await;
    // It is replaced under a new id (it may also rejoin under its old one, see
    // `cluster_membership`): node 4 replaces it, and the queue's group moves onto node 4,
    // which is sent the snapshot (the log below it is purged).
    let new = cluster.replace(3).await;
    converged(&cluster, new, 1, "wiped", 300).await;
    let installed = metric(
        &cluster.node(new).http,
        "qit_cluster_snapshots_installed_total",
    )
    .await;
    assert!(
        installed >= 2.0,
        "node {new} installed {installed} snapshots, not one of each group"
    );
    assert!(
        cluster
            .node(new)
            .dir
            .join("raft")
            .join(group.to_string())
            .join("snapshot")
            .join("current")
            .is_file()
    );
    // It follows the log from there.
    publish_spread(&cluster, "wiped", 300..320, [1, new], body).await;
    converged(&cluster, new, 1, "wiped", 320).await;
    let rest = drain(&cluster, new, "wiped", 320 - acked.len(), true).await;
    let all: BTreeSet<&String> = acked.iter().chain(&rest).collect();
    assert_eq!(all.len(), 320, "every message delivered exactly once");
    assert_eq!(acked.len() + rest.len(), 320);
}

/// A data directory serves only the server that wrote it: a cluster node's started without
/// `--peers` or under another node's id, or a single server's started with `--peers`, stop
/// at once with the reason (each would have served an empty broker beside the data, or
/// taken another node's votes) and change nothing: the node and the single server then
/// serve their messages again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_serves_only_the_server_that_wrote_it() {
    // A cluster node's directory, served alone.
    let mut cluster = Cluster::start().await;
    common::cluster::create_queue(cluster.http(1), "kinds", json!({"partitions": 1})).await;
    common::cluster::publish(cluster.http(1), "kinds", "in the cluster").await;
    common::cluster::holds_exactly(&cluster, 3, "kinds", &["in the cluster"]).await;
    cluster.kill(3);
    let dir = cluster.root().join("node-3");
    // Its queues lie where a single server's would (`qit-inspect` finds them alike).
    assert!(dir.join("queues/kinds/0").is_dir(), "{}", dir.display());
    let before = files_of(&dir);
    let (status, stderr) = refused_start(common::serve_command(&dir));
    assert!(!status.success(), "{status:?}: {stderr}");
    assert!(
        stderr.contains("holds a cluster node's data") && stderr.contains("--peers"),
        "{stderr}"
    );
    let after = files_of(&dir);
    let changed: Vec<_> = after
        .iter()
        .filter(|file| !before.contains(file))
        .map(|(path, _)| path)
        .collect();
    assert!(
        changed.is_empty() && after.len() == before.len(),
        "the refused server changed nothing: {changed:?}"
    );
    // Node 3's directory, served as node 2 (its own directory mixed up): it would take
    // node 3's votes as its own.
    let impostor = common::cluster::Node::new(2, dir.clone());
    let (status, stderr) = refused_start(impostor.serve_command(&cluster.peers, &[], "warn"));
    assert!(!status.success(), "{status:?}: {stderr}");
    assert!(
        stderr.contains("belongs to node 3, not to node 2"),
        "{stderr}"
    );
    cluster.restart(3);
    cluster.wait_serving(3).await;
    common::cluster::holds_exactly(&cluster, 3, "kinds", &["in the cluster"]).await;

    // A single server's directory, served as a cluster node.
    let single_dir = cluster.root().join("single");
    let mut single = common::Process::start(&single_dir, &[]);
    let created = http()
        .post(format!("{}/queues/alone", single.http))
        .json(&json!({"partitions": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    common::cluster::publish(&single.http, "alone", "on its own").await;
    single.signal("KILL");
    single.wait(Duration::from_secs(10)).expect("killed");
    drop(single);
    let node = common::cluster::Node::new(9, single_dir.clone());
    let (status, stderr) = refused_start(node.serve_command(&node.peer(), &[], "warn"));
    assert!(!status.success(), "{status:?}: {stderr}");
    assert!(
        stderr.contains("holds a single server's queues"),
        "{stderr}"
    );
    assert!(
        !single_dir.join("raft").exists(),
        "the refused node wrote nothing"
    );
    let again = common::Process::start(&single_dir, &[]);
    let log: Value = common::get_json(format!("{}/queues/alone/log?from=0", again.http)).await;
    assert_eq!(common::bodies(&log), ["on its own"], "{log}");
}

/// Every file under `dir` but the lock (which names the last process that took it) with
/// its contents, sorted (to tell that nothing changed).
fn files_of(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n != ".lock") {
                let bytes = std::fs::read(&path).unwrap_or_default();
                files.push((path, bytes));
            }
        }
    }
    files.sort();
    files
}

/// A small tmpfs mounted over a directory, its contents kept; unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs with `spare` bytes free over `dir` (a stopped node's data), copying
    /// what `dir` holds onto it (needs root, as the iptables tests do).
    fn over(dir: &Path, spare: u64) -> Self {
        let saved = dir.with_extension("saved");
        let run = |cmd: &str, args: &[&str]| {
            let out = std::process::Command::new(cmd).args(args).output().unwrap();
            assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
        };
        run(
            "cp",
            &["-a", dir.to_str().unwrap(), saved.to_str().unwrap()],
        );
        let used: u64 = walk_bytes(&saved);
        let size = format!("size={}", used + spare);
        run(
            "mount",
            &["-t", "tmpfs", "-o", &size, "tmpfs", dir.to_str().unwrap()],
        );
        let disk = Self(dir.to_path_buf());
        run(
            "cp",
            &[
                "-a",
                &format!("{}/.", saved.display()),
                dir.to_str().unwrap(),
            ],
        );
        disk
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", self.0.to_str().unwrap_or_default()])
            .status();
    }
}

/// Bytes of the files under `dir` (with a block for each, as tmpfs counts them).
fn walk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk_bytes(&e.path()) + 4096,
                    Ok(m) => m.len().div_ceil(4096) * 4096 + 4096,
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A leader whose disk fills stops its group (its copy could not take what the others
/// applied); the other replicas go on under a new leader, and the full node still serves
/// the queue by forwarding to it. Every publish answered 201 is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_fills_hands_its_queue_over_and_forwards() {
    let mut cluster = Cluster::start().await;
    common::cluster::create_queue(cluster.http(1), "full", json!({"partitions": 1})).await;
    // The preferred replica: after its restart the group is handed back to it.
    let leader = cluster.preferred_leader(1, "full").await;
    cluster.node_mut(leader).terminate();
    let dir = cluster.node(leader).dir.clone();
    let _disk = SmallDisk::over(&dir, 12 << 20);
    cluster.restart(leader);
    cluster.wait_serving(leader).await;
    assert_eq!(
        cluster.preferred_leader(leader, "full").await,
        leader,
        "the restarted node leads its queue again"
    );

    let base = cluster.http(leader).to_string();
    let client = http();
    let body = "x".repeat(60_000);
    let (mut acked, mut refused) = (Vec::new(), 0);
    for _ in 0..2_000 {
        let answer = client
            .post(format!("{base}/queues/full/messages"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        if answer.status() == 201 {
            let v: Value = answer.json().await.unwrap();
            acked.push(v["offset"].as_u64().unwrap());
        } else {
            assert_eq!(answer.status(), 503, "a full disk is a 503");
            // The other replicas may have stored it: never "not stored" (storage_error),
            // and the full copy stops rather than go on without it.
            let v: Value = answer.json().await.unwrap();
            assert_eq!(v["error"]["code"], "no_leader", "{v}");
            refused += 1;
            if refused == 3 {
                break;
            }
        }
    }
    assert_eq!(
        refused,
        3,
        "the disk never filled ({} publishes)",
        acked.len()
    );
    eventually("the full node's group stopped", || async {
        cluster.node(leader).log().contains("a raft group stopped")
    })
    .await;
    // Through the full node, publishes reach the queue's new leader.
    let (status, after) = retrying("a publish through the full node", || {
        client
            .post(format!("{base}/queues/full/messages"))
            .body("after")
    })
    .await;
    assert_eq!(status, 201, "{after}");
    let other = (1..=3).find(|&n| n != leader).unwrap();
    let new_leader = cluster.leader_of(other, "full", Some(leader)).await;
    assert_ne!(new_leader, leader);
    // Every acknowledged publish is in the new leader's log, and so is the last one.
    let log = common::get_json(format!(
        "{}/queues/full/log?partition=0&from=0&max=1000",
        cluster.http(new_leader)
    ))
    .await;
    let offsets: BTreeSet<u64> = log["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["offset"].as_u64())
        .collect();
    for offset in &acked {
        assert!(
            offsets.contains(offset),
            "acknowledged offset {offset} lost"
        );
    }
    assert!(offsets.contains(&after["offset"].as_u64().unwrap()));
}

/// Writes `path` until the disk under it is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 * 1024];
    for size in [block.len(), 4096, 512, 1] {
        while file.write_all(&block[..size]).is_ok() {}
    }
    let _ = file.sync_all();
}

/// A node whose replica of the metadata stopped (its disk filled) still serves metadata
/// calls, forwarding them to the other voters, and its `/healthz` says it is not part of a
/// working quorum, also once the disk has room again: a stopped replica stays stopped
/// until the node restarts, and its last metrics name the leader it knew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_metadata_stopped_forwards_it_and_is_not_healthy() {
    let mut cluster = Cluster::start().await;
    // Shown only while node 1 hears from it: waited for, not read once.
    let leader = common::cluster::metadata_leader(&cluster).await;
    let full = (1..=3).find(|&n| n != leader).unwrap();
    cluster.node_mut(full).terminate();
    let dir = cluster.node(full).dir.clone();
    let _disk = SmallDisk::over(&dir, 4 << 20);
    cluster.restart(full);
    cluster.wait_serving(full).await;

    let filler = dir.join("filler");
    fill(&filler);
    let stopped = || {
        cluster
            .node(full)
            .log()
            .lines()
            .any(|l| l.contains("a raft group stopped") && l.contains("group=0 "))
    };
    let client = http();
    for i in 0.. {
        if stopped() {
            break;
        }
        assert!(i < 500, "the full node's metadata never stopped");
        let (status, body) = retrying("an exchange made elsewhere", || {
            client
                .post(format!("{}/exchanges/x{i}", cluster.http(leader)))
                .json(&json!({"type": "fanout"}))
        })
        .await;
        assert_eq!(status, 201, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::remove_file(&filler).unwrap();

    let health = client
        .get(format!("{}/healthz", cluster.http(full)))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["error"]["code"], "no_quorum", "{health}");
    // A metadata call through the stopped node reaches the others' leader.
    let (status, body) = retrying("a queue made through the stopped node", || {
        client
            .post(format!("{}/queues/made-through", cluster.http(full)))
            .json(&json!({"partitions": 1}))
    })
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["settings"]["partitions"], 1, "{body}");
    // So does a call to that queue, which the stopped node never heard of.
    let (status, body) = retrying("a publish through the stopped node", || {
        client
            .post(format!(
                "{}/queues/made-through/messages",
                cluster.http(full)
            ))
            .body("through")
    })
    .await;
    assert_eq!(status, 201, "{body}");
    let log = common::get_json(format!(
        "{}/queues/made-through/log?from=0",
        cluster.http(full)
    ))
    .await;
    assert_eq!(common::bodies(&log), ["through"], "{log}");
}
