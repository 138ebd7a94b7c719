//! Many queues on one node (issue 17): the server's threads and open descriptors stay
//! bounded however many queues it holds (a shared sync pool, a bounded file cache), `GET
//! /queues` pages, and a restart after `kill -9` finds every queue created in bulk with its
//! message.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Process, TestServer, get_json, http};
use serde_json::Value;

/// Threads and open descriptors of process `pid` (counts read from `/proc`, no timing).
fn threads_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (threads, fds)
}

/// Runs `op(i)` for `i < n`, `concurrency` at a time.
async fn each<F, Fut>(n: usize, concurrency: usize, op: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let op = Arc::new(op);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, op) = (Arc::clone(&next), Arc::clone(&op));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    op(i).await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
}

async fn create_and_fill(base: &str, n: usize) {
    let base = base.to_string();
    each(n, 16, move |i| {
        let base = base.clone();
        async move {
            let created = http()
                .post(format!("{base}/queues/tenant-{i:04}"))
                .json(&serde_json::json!({"max_deliveries": 3}))
                .send()
                .await
                .unwrap();
            assert_eq!(created.status(), 201);
            let published = http()
                .post(format!("{base}/queues/tenant-{i:04}/messages"))
                .body(format!("hello {i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(published.status(), 201);
        }
    })
    .await;
}

/// Open files the servers of these tests keep (the file cache's limit).
const MAX_OPEN_FILES: usize = 64;

/// Starts `qit serve` on `dir` with a small file cache that closes idle files after 1 s.
fn start_small_cache(dir: &std::path::Path, extra: &[&str]) -> Process {
    let config = dir.join("qit.toml");
    std::fs::write(
        &config,
        format!("max_open_files = {MAX_OPEN_FILES}\nidle_close_secs = 1\n"),
    )
    .unwrap();
    let data = dir.join("data");
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    Process::start(&data, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_queues_cost_no_thread_and_no_descriptor_each() {
    let dir = tempfile::tempdir().unwrap();
    let qit = start_small_cache(dir.path(), &[]);
    let pid = qit.child.id();
    let (threads_before, fds_before) = threads_and_fds(pid);
    // 500 queues and their 500 dead-letter queues: 1,000 partitions, 1,000 journals.
    create_and_fill(&qit.http, 500).await;
    let (threads, fds) = threads_and_fds(pid);
    eprintln!("threads {threads_before} -> {threads}, descriptors {fds_before} -> {fds}");
    // Before the shared sync pool: two sync threads per queue (2,000 threads here).
    assert!(
        threads <= threads_before + 32,
        "{threads} threads (were {threads_before})"
    );
    // Before the file cache: four descriptors per partition (4,000 here). Files with
    // unsynced bytes (the indexes written by the publishes) stay open until the idle sweep
    // syncs and closes them; then the cache's limit holds, plus the clients' connections.
    let bound = fds_before + MAX_OPEN_FILES + 32;
    common::eventually(&format!("at most {bound} descriptors"), || async {
        threads_and_fds(pid).1 <= bound
    })
    .await;
    // Every queue still works through reopened files: read a message back from a few.
    for i in [0, 250, 499] {
        let received: Value = get_json(format!("{}/queues/tenant-{i:04}/messages", qit.http)).await;
        assert_eq!(received["messages"][0]["body"], format!("hello {i}"));
    }
    let listed: Value = get_json(format!("{}/queues?limit=1000", qit.http)).await;
    assert_eq!(listed["queues"].as_array().unwrap().len(), 1000);
    assert!(listed["next"].is_null());
    let metrics = common::metrics_text(&qit.http).await;
    let open_files: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("qit_open_files "))
        .expect("qit_open_files in /metrics")
        .parse()
        .unwrap();
    assert!(
        open_files <= (MAX_OPEN_FILES + 8 * 4) as f64,
        "{open_files}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_created_in_bulk_survive_kill_9_with_their_messages() {
    let dir = tempfile::tempdir().unwrap();
    // A small file cache: most files are closed and reopened on the way.
    let qit = start_small_cache(dir.path(), &["--fsync", "always"]);
    create_and_fill(&qit.http, 100).await;
    // An answered creation is durable: the registry's group commit fsynced it.
    qit.signal("KILL");
    drop(qit);
    let qit = start_small_cache(dir.path(), &["--fsync", "always"]);
    let listed: Value = get_json(format!("{}/queues", qit.http)).await;
    assert_eq!(listed["queues"].as_array().unwrap().len(), 200);
    for i in [0, 42, 99] {
        let received: Value = get_json(format!("{}/queues/tenant-{i:04}/messages", qit.http)).await;
        assert_eq!(received["messages"][0]["body"], format!("hello {i}"));
    }
}

#[tokio::test]
async fn get_queues_pages_by_name() {
    let server = TestServer::start().await;
    for i in 0..25 {
        http()
            .post(format!("{}/queues/p{i:02}", server.http))
            .json(&serde_json::json!({"max_deliveries": 0}))
            .send()
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let url = match &after {
            Some(a) => format!("{}/queues?limit=10&after={a}", server.http),
            None => format!("{}/queues?limit=10", server.http),
        };
        let page: Value = get_json(url).await;
        pages += 1;
        names.extend(
            page["queues"]
                .as_array()
                .unwrap()
                .iter()
                .map(|q| q["name"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|i| format!("p{i:02}")).collect();
    assert_eq!(names, expected);
    // Unpaged: the same shape as before, every queue, no cursor.
    let all: Value = get_json(format!("{}/queues", server.http)).await;
    assert_eq!(all["queues"].as_array().unwrap().len(), 25);
    assert!(all.get("next").is_none());
    for bad in ["limit=0", "limit=1001", "limit=x", "after=p01"] {
        let response = http()
            .get(format!("{}/queues?{bad}", server.http))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"]["code"].is_string());
    }
}

async fn open_broker(dir: &std::path::Path, max_queues: usize) -> Arc<qit::broker::Broker> {
    qit::broker::Broker::open(qit::broker::BrokerConfig {
        data_dir: dir.to_path_buf(),
        fsync: qit::log::FsyncPolicy::Always,
        max_queues,
        ..qit::broker::BrokerConfig::default()
    })
    .await
    .unwrap()
}

/// Creations and deletions running side by side (sharing the registry's fsyncs) are all
/// durable once answered: a reopened broker finds exactly the queues left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_and_deletes_are_durable_when_answered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open_broker(dir.path(), 1000).await;
    let settings = || qit::broker::QueueSettings {
        max_deliveries: 3,
        ..Default::default()
    };
    let creates: Vec<_> = (0..100)
        .map(|i| {
            let broker = Arc::clone(&broker);
            tokio::spawn(async move { broker.create_queue(&format!("c{i:03}"), settings()).await })
        })
        .collect();
    for create in creates {
        assert!(create.await.unwrap().unwrap().1, "created");
    }
    let deletes: Vec<_> = (0..100)
        .step_by(2)
        .map(|i| {
            let broker = Arc::clone(&broker);
            tokio::spawn(async move { broker.delete_queue(&format!("c{i:03}")).await })
        })
        .collect();
    for delete in deletes {
        delete.await.unwrap().unwrap();
    }
    drop(broker);
    let reopened = open_broker(dir.path(), 1000).await;
    let names: Vec<String> = reopened.list_queues().into_iter().map(|q| q.name).collect();
    // 50 queues left and the 100 dead-letter queues (deleting a queue keeps its DLQ).
    assert_eq!(names.len(), 150, "{names:?}");
    assert!(names.contains(&"c001".to_string()));
    assert!(!names.contains(&"c000".to_string()));
    assert!(names.contains(&"c000.dlq".to_string()));
    // A deleted queue's directory is gone; a new queue of that name starts empty.
    assert!(!dir.path().join("queues/c000").exists());
}

/// A queue whose dead-letter queue would pass `max_queues` is refused whole: no queue
/// without its dead-letter queue is left behind.
#[tokio::test]
async fn a_queue_and_its_dead_letter_queue_fit_the_limit_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open_broker(dir.path(), 3).await;
    let settings = qit::broker::QueueSettings::default();
    broker.create_queue("a", settings.clone()).await.unwrap();
    let refused = broker.create_queue("b", settings).await.unwrap_err();
    assert!(
        matches!(refused, qit::broker::BrokerError::LimitReached(_)),
        "{refused}"
    );
    let names: Vec<String> = broker.list_queues().into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["a", "a.dlq"]);
    let plain = qit::broker::QueueSettings {
        max_deliveries: 0,
        ..Default::default()
    };
    broker.create_queue("b", plain).await.unwrap();
    assert_eq!(broker.queue_count(), 3);
}

fn message(body: &str) -> qit::broker::NewMessage {
    qit::broker::NewMessage {
        body: bytes::Bytes::from(body.to_string()),
        ..Default::default()
    }
}

/// Issue 17: a queue costs no directory, file or descriptor until its first message, and its
/// dead-letter queue, listed and answering from creation, none until a message is
/// dead-lettered; neither a read nor a restart creates any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_and_dead_letter_queues_cost_no_directory_until_written() {
    let dir = tempfile::tempdir().unwrap();
    let queues = dir.path().join("queues");
    let broker = open_broker(dir.path(), 100).await;
    let settings = qit::broker::QueueSettings {
        max_deliveries: 1,
        ..Default::default()
    };
    broker.create_queue("jobs", settings).await.unwrap();
    let names: Vec<String> = broker.list_queues().into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["jobs", "jobs.dlq"]);
    let dlq = broker.queue_info("jobs.dlq").unwrap();
    assert_eq!(dlq.partitions[0].next_offset, 0);
    let none = std::time::Duration::ZERO;
    let empty = broker.receive("jobs.dlq", "default", 10, none, None).await;
    assert!(empty.unwrap().is_empty());
    assert!(!queues.join("jobs").exists(), "created a directory");
    assert!(!queues.join("jobs.dlq").exists(), "created a directory");
    // Nor does a restart.
    drop(broker);
    let broker = open_broker(dir.path(), 100).await;
    assert_eq!(broker.queue_count(), 2);
    assert!(!queues.join("jobs").exists() && !queues.join("jobs.dlq").exists());
    // The first message creates the queue's files; the DLQ stays without any.
    broker.publish("jobs", vec![message("one")]).await.unwrap();
    assert!(queues.join("jobs/0").is_dir());
    assert!(!queues.join("jobs.dlq").exists());
    let lease = std::time::Duration::from_secs(60);
    let delivered = broker
        .receive("jobs", "default", 1, none, Some(lease))
        .await
        .unwrap();
    assert_eq!(delivered.len(), 1);
    // The only delivery allowed failed: the message goes to the DLQ, which now has files.
    broker
        .nack("jobs", "default", delivered[0].id, None)
        .await
        .unwrap();
    common::eventually("the message in the dead-letter queue", || async {
        broker.queue_info("jobs.dlq").unwrap().partitions[0].next_offset == 1
    })
    .await;
    assert!(queues.join("jobs.dlq/0").is_dir());
    broker.shutdown().await.unwrap();
    drop(broker);
    let broker = open_broker(dir.path(), 100).await;
    let moved = broker
        .receive("jobs.dlq", "default", 10, none, Some(lease))
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].body, "one");
}
