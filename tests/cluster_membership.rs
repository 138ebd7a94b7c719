//! Membership changes (issue 14) on real `qit` processes, under publish and consume load:
//! a fourth node joins (`--join`: learner, then voter), serves, survives a restart as a
//! voter, and the voter set survives the restart of a node started with the initial
//! `--peers`; `qit cluster add-node` is idempotent, refusals are 409 with a reason; the
//! node is removed again (`DELETE /cluster/nodes/{id}`). Every publish answered 2xx is
//! delivered and acked exactly once, and the replicas' logs are identical.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::cluster::{Cluster, Node, create_queue, log_bodies, partition, view};
use common::{eventually, http};
use parking_lot::Mutex;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// What the load saw.
#[derive(Default)]
struct Seen {
    /// Bodies whose publish was answered 2xx.
    answered: BTreeSet<String>,
    /// Bodies acked (answered 2xx).
    acked: BTreeSet<String>,
    /// Bodies delivered again after their ack was answered.
    redelivered_after_ack: Vec<String>,
    /// Deliveries per body.
    deliveries: BTreeMap<String, usize>,
}

/// Publishers and a consumer of queue `q` going through the nodes of `bases` in turn.
struct Load {
    bases: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    /// Loop turns of the publisher and of the consumer.
    turns: [Arc<AtomicUsize>; 2],
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(bases: Vec<String>, queue: &'static str) -> Self {
        let bases = Arc::new(Mutex::new(bases));
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let turns: [Arc<AtomicUsize>; 2] = Default::default();
        let publisher = {
            let (bases, seen, stop) = (Arc::clone(&bases), Arc::clone(&seen), Arc::clone(&stop));
            let turns = Arc::clone(&turns[0]);
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    turns.fetch_add(1, Ordering::Relaxed);
                    let base = {
                        let b = bases.lock();
                        b[i % b.len()].clone()
                    };
                    let body = format!("m-{i}");
                    i += 1;
                    let sent = http()
                        .post(format!("{base}/queues/{queue}/messages"))
                        .body(body.clone())
                        .timeout(Duration::from_secs(20))
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status().is_success()) {
                        seen.lock().answered.insert(body);
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        };
        let consumer = {
            let (bases, seen, stop) = (Arc::clone(&bases), Arc::clone(&seen), Arc::clone(&stop));
            let turns = Arc::clone(&turns[1]);
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    turns.fetch_add(1, Ordering::Relaxed);
                    let base = {
                        let b = bases.lock();
                        b[i % b.len()].clone()
                    };
                    i += 1;
                    consume_once(&base, queue, &seen).await;
                }
            })
        };
        Self {
            bases,
            seen,
            stop,
            turns,
            tasks: vec![publisher, consumer],
        }
    }

    /// Stops sending through `base` and waits until no request through it is under way.
    async fn avoid(&self, base: &str) {
        self.bases.lock().retain(|b| b != base);
        let at = self.turns.each_ref().map(|t| t.load(Ordering::Relaxed));
        eventually("the load left the node", || async {
            self.turns
                .iter()
                .zip(at)
                .all(|(t, at)| t.load(Ordering::Relaxed) >= at + 2)
        })
        .await;
    }

    /// Stops publishing and consuming (what was answered stays recorded).
    async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks.drain(..) {
            task.await.expect("a load task panicked");
        }
    }
}

/// One receive through `base` and an ack of each message received, recorded in `seen`.
async fn consume_once(base: &str, queue: &str, seen: &Mutex<Seen>) {
    let url = format!("{base}/queues/{queue}/messages?max=20&wait=1&visibility=30");
    let Ok(response) = http()
        .get(url)
        .timeout(Duration::from_secs(20))
        .send()
        .await
    else {
        tokio::time::sleep(Duration::from_millis(50)).await;
        return;
    };
    if !response.status().is_success() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        return;
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    for m in body["messages"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (m["id"].as_str(), m["body"].as_str()) else {
            continue;
        };
        {
            let mut seen = seen.lock();
            *seen.deliveries.entry(text.to_string()).or_default() += 1;
            if seen.acked.contains(text) {
                seen.redelivered_after_ack.push(text.to_string());
            }
        }
        let acked = http()
            .delete(format!("{base}/queues/{queue}/messages/{id}"))
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if acked {
            seen.lock().acked.insert(text.to_string());
        }
    }
}

/// The ids of the nodes in node `base`'s view.
async fn node_ids(base: &str) -> Option<Vec<u64>> {
    let v = view(&format!("{base}/cluster")).await?;
    Some(
        v["nodes"]
            .as_array()?
            .iter()
            .filter_map(|n| n["id"].as_u64())
            .collect(),
    )
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("the node answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qit"))
        .args(args)
        .output()
        .expect("run qit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joins_and_leaves_under_load_without_losing_a_message() {
    let mut cluster = Cluster::start().await;
    let base = |c: &Cluster, id: u64| c.http(id).to_string();
    create_queue(&base(&cluster, 1), "work", json!({"partitions": 1})).await;
    let mut load = Load::start((1..=3).map(|id| base(&cluster, id)).collect(), "work");
    eventually("the load runs", || async {
        load.seen.lock().acked.len() >= 20
    })
    .await;

    // Node 4 joins: started with --join and --peers naming the members and itself.
    let mut four = Node::new(4, cluster.root().join("node-4"));
    let peers4 = format!("{},{}", cluster.peers, four.peer());
    four.start(&peers4, &["--join".to_string()]);
    for id in 1..=3 {
        let b = base(&cluster, id);
        eventually(&format!("node {id} lists node 4"), || async {
            node_ids(&b).await == Some(vec![1, 2, 3, 4])
        })
        .await;
    }
    let b4 = four.http.clone();
    eventually("node 4 votes and sees the metadata leader", || async {
        node_ids(&b4).await == Some(vec![1, 2, 3, 4])
            && view(&format!("{b4}/cluster"))
                .await
                .is_some_and(|v| v["leader"].is_u64() && partition(&v, "work").is_some())
    })
    .await;
    load.bases.lock().push(b4.clone());

    // Adding it again is harmless (the CLI, through another node); another address for
    // its id is refused.
    let cluster_addr = format!("127.0.0.1:{}", four.cluster_port);
    let out = cli(&[
        "cluster",
        "--server",
        cluster.http(2),
        "add-node",
        &format!("4={cluster_addr}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = send(
        http()
            .post(format!("{}/cluster/nodes", cluster.http(3)))
            .json(&json!({"id": 4, "cluster": "127.0.0.1:1"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "membership_conflict", "{body}");

    // A queue created now is placed over the four voters; node 4 serves it.
    create_queue(&b4, "after", json!({"partitions": 1})).await;
    common::cluster::publish(&b4, "after", "one").await;
    eventually("node 4 reads the new queue", || async {
        log_bodies(&b4, "after", 0).await == Some(vec!["one".to_string()])
    })
    .await;

    // The voter set survives restarts: node 4 (started with --join again) is a voter at
    // once, and a node started with the initial --peers learns node 4 from the log.
    load.avoid(&b4).await;
    four.kill();
    four.start(&peers4, &["--join".to_string()]);
    let work = view(&format!("{}/cluster", cluster.http(1)))
        .await
        .and_then(|v| partition(&v, "work").cloned())
        .expect("work is in the view");
    let restart = (1..=3)
        .find(|id| {
            Some(*id) != work["leader"].as_u64() && Some(*id) != work["replicas"][0].as_u64()
        })
        .expect("a node that neither leads nor is preferred for work");
    let b = base(&cluster, restart);
    load.avoid(&b).await;
    cluster.kill(restart);
    cluster.restart(restart);
    eventually("the restarted node lists node 4", || async {
        node_ids(&b).await == Some(vec![1, 2, 3, 4])
    })
    .await;
    eventually("node 4 is back as a voter", || async {
        node_ids(&b4).await == Some(vec![1, 2, 3, 4])
            && view(&format!("{b4}/cluster"))
                .await
                .is_some_and(|v| v["leader"].is_u64())
    })
    .await;

    // Removing: refused for a node holding replicas and when too few voters would be left.
    let (status, body) = send(http().delete(format!("{}/cluster/nodes/2", cluster.http(1)))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("work"),
        "{body}"
    );
    // Queues placed on node 4 (made after it joined, with their dead-letter queues) keep
    // it from leaving until they are deleted.
    let on_four: Vec<String> = view(&format!("{}/cluster", cluster.http(1)))
        .await
        .expect("a view")["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().any(|n| n == 4))
        })
        .filter_map(|p| p["queue"].as_str().map(String::from))
        .collect();
    if !on_four.is_empty() {
        let (status, body) =
            send(http().delete(format!("{}/cluster/nodes/4", cluster.http(1)))).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        for queue in &on_four {
            assert!(queue.starts_with("after"), "{queue} on node 4");
            let url = format!("{}/queues/{queue}", cluster.http(1));
            let (status, body) = common::cluster::retrying("delete", || http().delete(&url)).await;
            assert!(
                status.is_success() || status == StatusCode::NOT_FOUND,
                "{status} {body}"
            );
        }
        eventually("every node forgot the queues on node 4", || async {
            let mut gone = true;
            for id in 1..=3 {
                gone &= view(&format!("{}/cluster", cluster.http(id)))
                    .await
                    .is_some_and(|v| on_four.iter().all(|q| partition(&v, q).is_none()));
            }
            gone
        })
        .await;
    }
    let out = cli(&["cluster", "--server", cluster.http(3), "remove-node", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in 1..=3 {
        let b = base(&cluster, id);
        eventually(&format!("node {id} lists three nodes"), || async {
            node_ids(&b).await == Some(vec![1, 2, 3])
        })
        .await;
    }
    four.terminate();
    let (status, body) = send(http().delete(format!("{}/cluster/nodes/1", cluster.http(2)))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = send(http().delete(format!("{}/cluster/nodes/9", cluster.http(2)))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Every answered publish is delivered and acked exactly once; the logs agree.
    eventually("the load went on after the changes", || async {
        load.seen.lock().acked.len() >= 60
    })
    .await;
    load.stop().await;
    let answered = load.seen.lock().answered.clone();
    eventually("every answered publish is acked", || async {
        consume_once(cluster.http(1), "work", &load.seen).await;
        let seen = load.seen.lock();
        answered.iter().all(|b| seen.acked.contains(b))
    })
    .await;
    let seen = load.seen.lock();
    assert!(
        seen.redelivered_after_ack.is_empty(),
        "delivered again after an ack: {:?}",
        seen.redelivered_after_ack
    );
    let twice: Vec<_> = seen.deliveries.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    drop(seen);
    let first = log_bodies(cluster.http(1), "work", 0)
        .await
        .expect("log on 1");
    for id in 2..=3 {
        let b = base(&cluster, id);
        eventually(&format!("node {id}'s log equals node 1's"), || async {
            log_bodies(&b, "work", 0).await.as_ref() == Some(&first)
        })
        .await;
    }
    println!(
        "{} publishes answered, {} stored, every answered one acked once; restarted node {restart}; queues on node 4: {on_four:?}",
        answered.len(),
        first.len()
    );
    let stored: BTreeSet<String> = first.into_iter().collect();
    assert!(answered.is_subset(&stored));
}
