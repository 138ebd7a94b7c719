//! The `qit` binary as a process: clean shutdown on SIGTERM with a long-poll open, and
//! `kill -9` under `--fsync always` losing no acknowledged work.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Process, http};
use serde_json::Value;

async fn publish(base: &str, queue: &str, body: &str) -> String {
    let r: Value = http()
        .post(format!("{base}/queues/{queue}/messages"))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["id"].as_str().unwrap().to_string()
}

async fn receive(base: &str, queue: &str, max: usize) -> Vec<Value> {
    let r: Value = http()
        .get(format!(
            "{base}/queues/{queue}/messages?max={max}&visibility=60"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["messages"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_open_long_polls_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut qit = Process::start(dir.path(), &[]);
    http()
        .post(format!("{}/queues/jobs", qit.http))
        .send()
        .await
        .unwrap();
    publish(&qit.http, "jobs", "kept").await;
    // Drain the group first so that the long-poll really waits.
    receive(&qit.http, "jobs", 10).await;
    let url = format!("{}/queues/jobs/messages?wait=30", qit.http);
    let waiter = tokio::spawn(async move { http().get(url).send().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    qit.signal("TERM");
    let answer = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the long-poll is answered")
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["messages"], serde_json::json!([]));
    let status = qit
        .wait(Duration::from_secs(10))
        .expect("qit exits within a few seconds");
    assert!(status.success(), "exit status {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A restart sees the data.
    let qit = Process::start(dir.path(), &[]);
    let r: Value = http()
        .get(format!("{}/queues/jobs/log?from=0", qit.http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["messages"][0]["body"], "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acked_message_and_forgets_no_unacked_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = BTreeSet::new();
    let mut published = BTreeSet::new();
    {
        let qit = Process::start(dir.path(), &["--fsync", "always"]);
        http()
            .post(format!("{}/queues/crash", qit.http))
            .send()
            .await
            .unwrap();
        for i in 0..30 {
            published.insert(publish(&qit.http, "crash", &format!("m{i}")).await);
        }
        for m in receive(&qit.http, "crash", 20).await {
            let id = m["id"].as_str().unwrap().to_string();
            if acked.len() < 12 {
                let r = http()
                    .delete(format!("{}/queues/crash/messages/{id}", qit.http))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 204);
                acked.insert(id);
            }
        }
        qit.signal("KILL");
    }
    let qit = Process::start(dir.path(), &["--fsync", "always"]);
    let mut redelivered = BTreeSet::new();
    for _ in 0..5 {
        for m in receive(&qit.http, "crash", 100).await {
            redelivered.insert(m["id"].as_str().unwrap().to_string());
        }
    }
    assert!(
        redelivered.is_disjoint(&acked),
        "no acked message comes back"
    );
    let expected: BTreeSet<String> = published.difference(&acked).cloned().collect();
    assert_eq!(redelivered, expected, "every unacked message comes back");
}
