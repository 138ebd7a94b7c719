//! Membership changes (issue 14) on real `qit` processes, under publish and consume load:
//! a fourth node joins (`--join`: learner, then voter) and the queue's group moves a
//! replica onto it as placement says; the node survives a restart as a voter, and the
//! voter set survives the restart of a node started with the initial `--peers`; `qit
//! cluster add-node` is idempotent, refusals are 409 with a reason; the node is removed
//! again (`qit cluster remove-node`) and the replica moves back. Every publish answered
//! 2xx is stored once (the publisher sends idempotency keys, as an exactly-once producer
//! does) and delivered; no message is delivered again after its ack was answered (one
//! whose ack failed, its lease dropped by a leader change, is); the replicas' logs are
//! identical. A node that lost its data is replaced with one command (`--replaces`), or
//! rejoins under its old id and votes only once caught up; only the admin adds and removes
//! nodes (`--auth`);
//! queues created while a node leaves, or is down, are placed on the others; a queue of
//! three partitions moves every partition's group onto a joining node and off it again.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::cluster::{Cluster, Node, create_queue, holds_exactly, log_bodies, partition, view};
use common::{eventually, eventually_some, http};
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
    /// Message ids acked (answered 2xx).
    acked_ids: BTreeSet<String>,
    /// Bodies delivered again (same message id) after their ack was answered.
    redelivered_after_ack: Vec<String>,
    /// Deliveries per body.
    deliveries: BTreeMap<String, usize>,
    /// Bodies whose ack was refused or lost (a leader change drops the leases: the message
    /// is delivered again, as after any lost ack).
    ack_failed: BTreeSet<String>,
    /// What happened to each body, in order (printed when a check fails).
    history: BTreeMap<String, Vec<String>>,
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
                        .header("Idempotency-Key", body.clone())
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
        // A turn may legitimately last minutes (a receive and up to 20 acks, each with a
        // 20 s timeout, while a group moves), so the guard against a hang is that long;
        // it measures nothing.
        let deadline = std::time::Instant::now() + Duration::from_secs(480);
        while !self
            .turns
            .iter()
            .zip(at)
            .all(|(t, at)| t.load(Ordering::Relaxed) >= at + 2)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the load never left the node"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
            let at = format!(
                "{:?} delivered as {id} through {base} ({m})",
                std::time::Instant::now()
            );
            seen.history.entry(text.to_string()).or_default().push(at);
            *seen.deliveries.entry(text.to_string()).or_default() += 1;
            if seen.acked_ids.contains(id) {
                seen.redelivered_after_ack.push(text.to_string());
            }
        }
        let answer = http()
            .delete(format!("{base}/queues/{queue}/messages/{id}"))
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        let acked = answer.as_ref().is_ok_and(|r| r.status().is_success());
        seen.lock()
            .history
            .entry(text.to_string())
            .or_default()
            .push(format!(
                "{:?} ack through {base}: {:?}",
                std::time::Instant::now(),
                answer.map(|r| r.status())
            ));
        if acked {
            let mut seen = seen.lock();
            seen.acked.insert(text.to_string());
            seen.acked_ids.insert(id.to_string());
        } else {
            seen.lock().ack_failed.insert(text.to_string());
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
        .timeout(Duration::from_secs(200))
        .send()
        .await
        .expect("the node answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn cli(args: &[&str]) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_qit"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run qit");
    // A guard against a hang (a command that never ends fails the test instead): the
    // output is read on a thread, the process killed when it runs past the deadline.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(CLI_DEADLINE) {
        Ok(output) => output.expect("run qit"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("`qit {}` ran past {CLI_DEADLINE:?}", args.join(" "));
        }
    }
}

/// How long a `qit` command of these tests may run (a guard against hangs only).
const CLI_DEADLINE: Duration = Duration::from_secs(300);

/// A queue name whose best replicas over nodes 1..=4 include node 4 (so that the join
/// moves a replica of it onto node 4).
fn queue_for_node_four() -> String {
    (0..)
        .map(|i| format!("work-{i}"))
        .find(|q| qit::cluster::placement::replicas(q, &[1, 2, 3, 4], 3).contains(&4))
        .expect("some name")
}

/// The replicas of `queue` in node `base`'s view.
async fn replicas(base: &str, queue: &str) -> Option<Vec<u64>> {
    let v = view(&format!("{base}/cluster")).await?;
    let p = partition(&v, queue)?;
    Some(
        p["replicas"]
            .as_array()?
            .iter()
            .filter_map(Value::as_u64)
            .collect(),
    )
}

/// Waits until every node of `bases` holds the same committed log of `queue` (partition
/// 0); returns it.
async fn same_logs(bases: &[String], queue: &str) -> Vec<String> {
    let log: Mutex<Option<Vec<String>>> = Mutex::new(None);
    eventually(&format!("{queue}'s logs agree on {bases:?}"), || async {
        let mut logs = Vec::new();
        for b in bases {
            logs.push(log_bodies(b, queue, 0).await);
        }
        let agree = logs[0].is_some() && logs.iter().all(|l| *l == logs[0]);
        if agree {
            *log.lock() = logs[0].clone();
        }
        agree
    })
    .await;
    log.into_inner().unwrap_or_default()
}

/// Waits until the nodes of `bases` agree on `queue`'s committed log (partition 0) while a
/// load still publishes to it. Reading the nodes one after another, a publish committed in
/// between makes the later reads longer, so whole logs may not compare equal for as long as
/// the load runs (seen in CI). Committed logs only grow: each node's must hold at least what
/// the first held when the wait began (a replica that just joined has caught up), and on
/// what every node holds they must be identical. Full equality is checked once the load
/// stopped ([`same_logs`]).
async fn logs_agree_under_load(bases: &[String], queue: &str) {
    let floor = eventually_some(&format!("{} reads {queue}'s log", bases[0]), || async {
        log_bodies(&bases[0], queue, 0).await.map(|l| l.len())
    })
    .await;
    eventually(
        &format!("{queue}'s logs agree on {bases:?} up to at least {floor} messages"),
        || async {
            let mut logs = Vec::new();
            for b in bases {
                match log_bodies(b, queue, 0).await {
                    Some(log) => logs.push(log),
                    None => return false,
                }
            }
            let common = logs.iter().map(Vec::len).min().unwrap_or(0);
            common >= floor && logs.iter().all(|l| l[..common] == logs[0][..common])
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joins_and_leaves_under_load_without_losing_a_message() {
    let mut cluster = Cluster::start().await;
    let base = |c: &Cluster, id: u64| c.http(id).to_string();
    let work: &'static str = Box::leak(queue_for_node_four().into_boxed_str());
    create_queue(&base(&cluster, 1), work, json!({"partitions": 1})).await;
    let mut load = Load::start((1..=3).map(|id| base(&cluster, id)).collect(), work);
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
                .is_some_and(|v| v["leader"].is_u64() && partition(&v, work).is_some())
    })
    .await;
    load.bases.lock().push(b4.clone());
    println!("{:?} node 4 joined", std::time::Instant::now());

    // The queue moves a replica onto node 4, under load, as placement says.
    let wanted = qit::cluster::placement::replicas(work, &[1, 2, 3, 4], 3);
    for id in 1..=3 {
        let b = base(&cluster, id);
        eventually(&format!("node {id} sees {work} on {wanted:?}"), || async {
            replicas(&b, work).await.as_ref() == Some(&wanted)
        })
        .await;
    }
    let holders: Vec<String> = wanted
        .iter()
        .map(|id| match id {
            4 => b4.clone(),
            id => base(&cluster, *id),
        })
        .collect();
    logs_agree_under_load(&holders, work).await;
    println!("{:?} moved onto {wanted:?}", std::time::Instant::now());

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

    // The voter set survives restarts: node 4 (started with --join again) is a voter at
    // once, and a node started with the initial --peers learns node 4 from the log.
    load.avoid(&b4).await;
    println!("{:?} restarting node 4", std::time::Instant::now());
    four.terminate();
    four.start(&peers4, &["--join".to_string()]);
    let restart = (1..=3)
        .find(|id| !wanted.contains(id))
        .expect("a node that is no replica of the queue now");
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
    load.bases.lock().push(b.clone());

    println!("{:?} removing node 4", std::time::Instant::now());
    // Node 4 leaves (the CLI, through node 3): its replica moves back, under load.
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
                && replicas(&b, work).await.is_some_and(|r| !r.contains(&4))
        })
        .await;
    }
    four.terminate();
    // Too few voters would be left; an unknown node.
    let (status, body) = send(http().delete(format!("{}/cluster/nodes/1", cluster.http(2)))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "membership_conflict", "{body}");
    let (status, body) = send(http().delete(format!("{}/cluster/nodes/9", cluster.http(2)))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Every answered publish is delivered and acked exactly once; the logs agree.
    let acked = load.seen.lock().acked.len();
    eventually("the load went on after the changes", || async {
        load.seen.lock().acked.len() >= acked + 20
    })
    .await;
    load.stop().await;
    let answered = load.seen.lock().answered.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        consume_once(cluster.http(1), work, &load.seen).await;
        // An ack answered 503 may still have been committed: delivered is what counts.
        let missing: Vec<String> = {
            let seen = load.seen.lock();
            answered
                .iter()
                .filter(|b| !seen.deliveries.contains_key(*b))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            for body in &missing {
                println!("missing {body}: {:#?}", load.seen.lock().history.get(body));
            }
            for id in 1..=3 {
                println!(
                    "node {id}: {:?}",
                    view(&format!("{}/queues/{work}", cluster.http(id))).await
                );
                println!(
                    "node {id} log: {:?}",
                    log_bodies(cluster.http(id), work, 0).await
                );
            }
            panic!("answered publishes never delivered: {missing:?}");
        }
    }
    let redelivered = {
        let seen = load.seen.lock();
        for body in &seen.redelivered_after_ack {
            println!("{body}: {:#?}", seen.history.get(body));
        }
        assert!(
            seen.redelivered_after_ack.is_empty(),
            "delivered again after an ack: {:?}",
            seen.redelivered_after_ack
        );
        // A message is delivered again only when its ack did not go through.
        let twice: Vec<&String> = seen
            .deliveries
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(b, _)| b)
            .collect();
        let unexplained: Vec<_> = twice
            .iter()
            .filter(|b| !seen.ack_failed.contains(**b))
            .collect();
        assert!(
            unexplained.is_empty(),
            "delivered again though acked: {unexplained:?}"
        );
        twice.len()
    };
    let all: Vec<String> = (1..=3).map(|id| base(&cluster, id)).collect();
    let log = same_logs(&all, work).await;
    println!(
        "{work}: {} publishes answered, {} stored, every answered one delivered, {redelivered} delivered again after a failed ack (leases dropped by a leader change); moved onto {wanted:?} and back",
        answered.len(),
        log.len()
    );
    let stored: BTreeSet<String> = log.iter().cloned().collect();
    assert!(answered.is_subset(&stored));
    assert_eq!(
        stored.len(),
        log.len(),
        "a publish stored twice (idempotency keys)"
    );
}

/// Waits until `check` holds, like [`eventually`], with a hang guard long enough for
/// membership changes that move several queue groups on a busy machine (it measures
/// nothing).
async fn eventually_slow<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Queues `names` with one partition each, `count` messages published in each (bodies
/// `{queue}-{i}`) through nodes 1 and 2, and `acked` of each received and acked; the
/// acked bodies.
async fn queues_with_acks(
    cluster: &Cluster,
    names: &[&str],
    count: usize,
    acked: usize,
) -> BTreeSet<String> {
    let mut done = BTreeSet::new();
    for queue in names {
        create_queue(cluster.http(1), queue, json!({"partitions": 1})).await;
        for i in 0..count {
            let via = cluster.http(1 + (i % 2) as u64);
            common::cluster::publish(via, queue, &format!("{queue}-{i}")).await;
        }
        let mut mine = BTreeSet::new();
        while mine.len() < acked {
            for m in common::cluster::receive(cluster.http(2), queue, acked - mine.len()).await {
                let (Some(id), Some(body)) = (m["id"].as_str(), m["body"].as_str()) else {
                    panic!("a delivery without id or body: {m}");
                };
                let base = cluster.http(2);
                common::cluster::ok("ack", || {
                    http().delete(format!("{base}/queues/{queue}/messages/{id}"))
                })
                .await;
                mine.insert(body.to_string());
            }
        }
        done.extend(mine);
    }
    done
}

/// Receives and acks `queue` through `base` until `want` distinct bodies came, then
/// checks that nothing more comes; the bodies delivered.
async fn deliver_rest(base: &str, queue: &str, want: usize) -> BTreeSet<String> {
    let mut bodies = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while bodies.len() < want {
        assert!(
            std::time::Instant::now() < deadline,
            "{queue}: {} of {want} delivered through {base}",
            bodies.len()
        );
        for m in common::cluster::receive(base, queue, 50).await {
            let (Some(id), Some(body)) = (m["id"].as_str(), m["body"].as_str()) else {
                panic!("a delivery without id or body: {m}");
            };
            common::cluster::ok("ack", || {
                http().delete(format!("{base}/queues/{queue}/messages/{id}"))
            })
            .await;
            bodies.insert(body.to_string());
        }
    }
    let more = common::cluster::receive(base, queue, 50).await;
    assert!(more.is_empty(), "{queue}: delivered more: {more:?}");
    bodies
}

/// Issue 14: a node that lost its data comes back under a new id with one command
/// (`--replaces OLD`): it joins, the old node is removed, its replicas move (onto the new
/// node, the only other one), and nothing is lost or delivered again after its ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_lost_its_data_is_replaced_with_one_command() {
    let mut cluster = Cluster::start().await;
    let names = ["keep-a", "keep-b", "keep-c"];
    let (count, acked_each) = (30, 10);
    let acked = queues_with_acks(&cluster, &names, count, acked_each).await;
    let all: Vec<String> = (1..=3).map(|id| cluster.http(id).to_string()).collect();
    for queue in names {
        assert_eq!(same_logs(&all, queue).await.len(), count);
    }

    // Node 3 loses its data.
    cluster.kill(3);
    std::fs::remove_dir_all(&cluster.node(3).dir).expect("wipe node 3");
    let mut four = Node::new(4, cluster.root().join("node-4"));
    let peers4 = format!("{},{}", cluster.peers, four.peer());
    four.start(&peers4, &["--replaces".to_string(), "3".to_string()]);

    let bases = [
        cluster.http(1).to_string(),
        cluster.http(2).to_string(),
        four.http.clone(),
    ];
    replaced_without_loss(&bases, &names, count, acked_each, &acked).await;
    // Starting it again with the same command is harmless.
    four.terminate();
    four.start(&peers4, &["--replaces".to_string(), "3".to_string()]);
    eventually_slow("node 4 is back as a voter", || async {
        node_ids(&four.http).await == Some(vec![1, 2, 4])
            && http()
                .get(format!("{}/healthz", four.http))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
    })
    .await;
}

/// After node 3 was replaced by node 4 (the last of `bases`): every node of `bases` lists
/// nodes 1, 2 and 4 and places each queue of `names` on them; the replicas' logs are
/// identical and whole (`count` messages each); every message not among `acked` (`acked_each`
/// per queue) is delivered through node 4, none of `acked` is.
async fn replaced_without_loss(
    bases: &[String],
    names: &[&str],
    count: usize,
    acked_each: usize,
    acked: &BTreeSet<String>,
) {
    for b in bases {
        eventually_slow(&format!("{b} lists nodes 1, 2 and 4"), || async {
            node_ids(b).await == Some(vec![1, 2, 4])
        })
        .await;
    }
    for queue in names {
        for b in bases {
            eventually_slow(&format!("{b} places {queue} on 1, 2 and 4"), || async {
                replicas(b, queue).await.is_some_and(|mut r| {
                    r.sort_unstable();
                    r == [1, 2, 4]
                })
            })
            .await;
        }
        let log = same_logs(bases, queue).await;
        let want: Vec<String> = (0..count).map(|i| format!("{queue}-{i}")).collect();
        assert_eq!(log, want, "{queue}'s log on nodes 1, 2 and 4");
    }
    // Every message not acked is delivered (through the new node), no acked one.
    let four = bases.last().expect("node 4");
    for queue in names {
        let rest = deliver_rest(four, queue, count - acked_each).await;
        let again: Vec<&String> = rest.intersection(acked).collect();
        assert!(
            again.is_empty(),
            "acked messages delivered again: {again:?}"
        );
        let every: BTreeSet<String> = (0..count).map(|i| format!("{queue}-{i}")).collect();
        let seen: BTreeSet<String> = acked
            .iter()
            .filter(|b| b.starts_with(&format!("{queue}-")))
            .chain(&rest)
            .cloned()
            .collect();
        assert_eq!(seen, every, "{queue}: every message delivered");
    }
}

/// A `qit serve` process, killed when dropped (a failed test leaves none behind).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `qit serve` as `node` with `peers` and `extra`, its log (warnings and up) going to
/// `log`.
fn serve_logged(node: &Node, peers: &str, extra: &[&str], log: &std::path::Path) -> Running {
    let file = std::fs::File::create(log).expect("create the node's log file");
    node.serve_command(peers, extra, "warn,openraft=off")
        .stderr(file)
        .spawn()
        .map(Running)
        .expect("spawn qit")
}

/// How many times the log at `path` says the node waits for its peers (see
/// `cluster::rejoin`).
fn waiting_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(qit::cluster::rejoin::WAITING)
        .count()
}

/// Waits until node `id`, which lost its data, has caught up with every group it
/// replicates: its `rejoining` marker and every group's `catching-up` marker are gone
/// (see `cluster::catch_up`). Until then a group it is catching up counts on its other
/// replicas for a quorum.
async fn caught_up(cluster: &Cluster, id: u64) {
    let raft = cluster.node(id).dir.join("raft");
    eventually(
        &format!("node {id} has caught up with every group"),
        || async {
            let markers = std::fs::read_dir(&raft).map(|entries| {
                entries.filter_map(Result::ok).any(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name == "rejoining" || name.ends_with(".catching-up")
                })
            });
            markers.is_ok_and(|any| !any)
        },
    )
    .await;
}

/// Three nodes holding queue `kept` with one message, once node 1 knows node 3's
/// addresses (node 3 announced itself: it is a member that ran, so a wiped node 3
/// rejoins under its id and catches up before it votes).
async fn holding_kept_with_node_3_announced() -> Cluster {
    let cluster = Cluster::start().await;
    create_queue(cluster.http(1), "kept", json!({"partitions": 1})).await;
    common::cluster::publish(cluster.http(1), "kept", "before").await;
    let b1 = cluster.http(1).to_string();
    eventually("node 1 knows node 3's addresses", || async {
        view(&format!("{b1}/cluster")).await.is_some_and(|v| {
            v["nodes"]
                .as_array()
                .is_some_and(|ns| ns.iter().any(|n| n["id"] == 3 && n["http"].is_string()))
        })
    })
    .await;
    cluster
}

/// Issue 13: a wiped node started while none of the peers that know it runs does not
/// start as a voter with an empty log: it waits for them (and says so), writing nothing.
/// Once one is back it rejoins under its id, takes the logs from the groups' leaders, and
/// once caught up it votes: with another node down, it makes the quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_started_alone_waits_then_rejoins_under_its_id() {
    let mut cluster = holding_kept_with_node_3_announced().await;
    for id in 1..=3 {
        cluster.node_mut(id).terminate();
    }
    std::fs::remove_dir_all(&cluster.node(3).dir).expect("wipe node 3");

    // Node 3 alone: it waits for nodes 1 and 2, and says so again and again.
    let log = cluster.root().join("node-3.log");
    let mut three = serve_logged(cluster.node(3), &cluster.peers, &[], &log);
    eventually_slow("node 3 says twice that it waits for its peers", || async {
        waiting_lines(&log) >= 2
    })
    .await;
    assert!(
        three.0.try_wait().expect("wait for qit").is_none(),
        "node 3 exited while waiting"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("no answer from [1, 2]"), "{text}");
    let raft = cluster.node(3).dir.join("raft").join("0");
    assert!(
        std::fs::read_dir(&raft).map_or(true, |mut d| d.next().is_none()),
        "node 3 wrote a metadata log while waiting"
    );

    // Node 1 is back (it knows node 3 ran): node 3 rejoins under its id.
    cluster.restart(1);
    eventually("node 3 says it rejoins", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("node 1 knows it as a member that ran: it lost its data and rejoins")
    })
    .await;
    // Node 2 is back: nodes 1 and 2 lead, node 3 catches up with every group.
    cluster.restart(2);
    common::cluster::publish(cluster.http(2), "kept", "after").await;
    for node in 1..=3 {
        holds_exactly(&cluster, node, "kept", &["before", "after"]).await;
    }
    caught_up(&cluster, 3).await;

    // Caught up with every group, node 3 votes again: with node 1 down, nodes 2 and 3 are
    // the quorum.
    cluster.kill(1);
    let b3 = cluster.http(3).to_string();
    common::cluster::publish(&b3, "kept", "with node 1 down").await;
    create_queue(&b3, "made-later", json!({"partitions": 1})).await;
    common::cluster::publish(&b3, "made-later", "new").await;
    for node in [2, 3] {
        holds_exactly(
            &cluster,
            node,
            "kept",
            &["before", "after", "with node 1 down"],
        )
        .await;
    }
    let _ = three.0.kill();
    let _ = three.0.wait();
}

/// Issue 14: the nodes of a new cluster form it when they start one at a time (each
/// waits until every other node of `--peers` runs, then they start together).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_cluster_forms_when_its_nodes_start_one_at_a_time() {
    let temp = tempfile::tempdir().expect("temp dir");
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::new(id, temp.path().join(format!("node-{id}"))))
        .collect();
    let peers = nodes.iter().map(Node::peer).collect::<Vec<_>>().join(",");
    let log = temp.path().join("node-1.log");
    let mut one = serve_logged(&nodes[0], &peers, &[], &log);
    eventually_slow("node 1 waits for nodes 2 and 3", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("no answer from [2, 3]")
    })
    .await;
    nodes[1].start(&peers, &[]);
    // Node 2 runs and holds nothing either: node 1 now waits for node 3 only.
    eventually_slow("node 1 waits for node 3 only", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("no answer from [3]")
    })
    .await;
    assert!(
        one.0.try_wait().expect("wait for qit").is_none(),
        "node 1 exited"
    );
    nodes[2].start(&peers, &[]);
    let bases: Vec<String> = nodes.iter().map(|n| n.http.clone()).collect();
    for b in &bases {
        eventually_slow(
            &format!("{b} serves in a cluster of 1, 2 and 3"),
            || async {
                node_ids(b).await == Some(vec![1, 2, 3])
                    && http()
                        .get(format!("{b}/healthz"))
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
    }
    create_queue(&bases[0], "formed", json!({"partitions": 1})).await;
    common::cluster::publish(&bases[2], "formed", "one").await;
    for b in &bases {
        eventually(&format!("{b} holds the message"), || async {
            log_bodies(b, "formed", 0).await == Some(vec!["one".into()])
        })
        .await;
    }
    drop(one);
}

/// Issue 14: `qit cluster replace-node OLD NEW=HOST:PORT` replaces a dead node by a node
/// started with a plain `--join`, from an operator's shell against any node: the new node
/// votes, the old one's replicas move onto it, the old one leaves; nothing acked is lost
/// or delivered again. Asking again is harmless; refusals are 4xx with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_node_is_replaced_from_the_shell() {
    let mut cluster = Cluster::start().await;
    let names = ["shell-a", "shell-b", "shell-c"];
    let (count, acked_each) = (30, 10);
    let acked = queues_with_acks(&cluster, &names, count, acked_each).await;
    let all: Vec<String> = (1..=3).map(|id| cluster.http(id).to_string()).collect();
    for queue in names {
        assert_eq!(same_logs(&all, queue).await.len(), count);
    }

    cluster.kill(3);
    let mut four = Node::new(4, cluster.root().join("node-4"));
    let peers4 = format!("{},{}", cluster.peers, four.peer());
    four.start(&peers4, &["--join".to_string()]);
    let four_addr = format!("127.0.0.1:{}", four.cluster_port);
    let out = cli(&[
        "cluster",
        "--server",
        cluster.http(1),
        "replace-node",
        "3",
        &format!("4={four_addr}"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    assert!(stdout.contains("node 3 replaced by node 4"), "{stdout}");
    let bases = [
        cluster.http(1).to_string(),
        cluster.http(2).to_string(),
        four.http.clone(),
    ];
    replaced_without_loss(&bases, &names, count, acked_each, &acked).await;

    // Again, through another node: done already.
    let out = cli(&[
        "cluster",
        "--server",
        cluster.http(2),
        "replace-node",
        "3",
        &format!("4={four_addr}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Refusals: no such node; the new id is a member elsewhere; another member's address.
    let b2 = cluster.http(2).to_string();
    let replace = |old: u64, body: Value| {
        http()
            .post(format!("{b2}/cluster/nodes/{old}/replace"))
            .json(&body)
    };
    let (status, body) = send(replace(9, json!({"id": 5, "cluster": "127.0.0.1:1"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "node_not_found", "{body}");
    let (status, body) = send(replace(1, json!({"id": 2, "cluster": "127.0.0.1:1"}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "membership_conflict", "{body}");
    let taken = format!("127.0.0.1:{}", cluster.node(2).cluster_port);
    let (status, body) = send(replace(1, json!({"id": 5, "cluster": taken}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "membership_conflict", "{body}");
    let (status, body) = send(replace(1, json!({"id": 1, "cluster": "127.0.0.1:1"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // The CLI exits non-zero with the server's reason.
    let out = cli(&[
        "cluster",
        "--server",
        &b2,
        "replace-node",
        "9",
        "5=127.0.0.1:1",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node 9 is not a member"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing changed: nodes 1, 2 and 4.
    assert_eq!(node_ids(&b2).await, Some(vec![1, 2, 4]));
}

/// Issue 13: the common case of a lost disk: a follower (of the metadata and of the
/// queue) is killed, its data directory wiped, and it is started again with the same
/// command beside a running, idle cluster. Nothing is written meanwhile, so no append
/// would tell the leaders that its log is blank: it asks them for a heartbeat, and takes
/// every group's log from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_follower_restarted_beside_an_idle_cluster_catches_up() {
    let mut cluster = holding_kept_with_node_3_announced().await;
    let b1 = cluster.http(1).to_string();
    let meta_leader = common::eventually_some("a metadata leader", || async {
        view(&format!("{b1}/cluster"))
            .await
            .and_then(|v| v["leader"].as_u64())
    })
    .await;
    let kept_leader = cluster.leader_of(1, "kept", None).await;
    let victim = (1..=3)
        .find(|n| *n != meta_leader && *n != kept_leader)
        .expect("a node that leads neither");
    // Every node holds the message before the victim goes.
    for node in 1..=3 {
        holds_exactly(&cluster, node, "kept", &["before"]).await;
    }

    cluster.kill(victim);
    std::fs::remove_dir_all(&cluster.node(victim).dir).expect("wipe the victim");
    cluster.restart(victim);
    holds_exactly(&cluster, victim, "kept", &["before"]).await;
    caught_up(&cluster, victim).await;
}

/// Issue 13: a node whose data was lost rejoins under its old id, and neither takes
/// entries from a deposed leader nor votes before it has caught up. Node 3 helps commit a
/// metadata entry (queue `late`) that node 1 never saw, then loses its data; node 2, the
/// only other holder, is down. Had node 3 voted with its blank log, or taken node 1's
/// entries at node 1's old term, nodes 1 and 3 would have committed without `late` (its
/// creation answered 201), and it would be gone from every node. Nothing commits until
/// node 2 is back; then `late` is everywhere, and with node 1 down nodes 2 and 3 serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_rejoins_under_its_id_and_votes_only_once_caught_up() {
    let mut cluster = holding_kept_with_node_3_announced().await;

    // Node 1 misses the creation of `late`, which nodes 2 and 3 commit.
    cluster.kill(1);
    create_queue(cluster.http(2), "late", json!({"partitions": 1})).await;
    common::cluster::publish(cluster.http(2), "late", "acked").await;
    cluster.kill(3);
    std::fs::remove_dir_all(&cluster.node(3).dir).expect("wipe node 3");
    cluster.kill(2);
    cluster.restart(1);
    cluster.restart(3);

    // Node 3 rejoins (node 1 knows it) and has its metadata group open: its listener
    // answers. Node 1 (which may have restored its old leadership at once) cannot commit:
    // node 3 takes no entry before node 2 told it the newer term, and votes for nobody.
    let b1 = cluster.http(1).to_string();
    let b3 = cluster.http(3).to_string();
    eventually("node 3 serves its view", || async {
        http()
            .get(format!("{b3}/cluster"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_ok()
    })
    .await;
    let answer = http()
        .post(format!("{b1}/queues/while-node-2-is-down"))
        .json(&json!({}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("an answer");
    assert_eq!(
        answer.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "node 1 committed a metadata entry with the blank log of node 3: {}",
        answer.text().await.unwrap_or_default()
    );
    let meta_catching_up = |base: String| async move {
        common::cluster::labeled_metric(&base, "qit_cluster_catching_up", "group=\"0\"").await
    };
    assert_eq!(
        meta_catching_up(b3.clone()).await,
        Some(1.0),
        "node 3 shows its metadata group catching up"
    );

    // Node 2 is back: it leads, and every node has `late` and its message.
    cluster.restart(2);
    for node in 1..=3 {
        holds_exactly(&cluster, node, "late", &["acked"]).await;
    }
    caught_up(&cluster, 3).await;
    assert_eq!(meta_catching_up(b3.clone()).await, Some(0.0));

    // Caught up with every group, node 3 votes again: with node 1 down, nodes 2 and 3 serve.
    cluster.kill(1);
    common::cluster::publish(&b3, "late", "after").await;
    common::cluster::publish(&b3, "kept", "after").await;
    for node in [2, 3] {
        holds_exactly(&cluster, node, "late", &["acked", "after"]).await;
        holds_exactly(&cluster, node, "kept", &["before", "after"]).await;
    }
}

/// Logs `user` in at `base` with `password`; the token.
async fn login(base: &str, user: &str, password: &str) -> String {
    let body = common::cluster::ok(&format!("{user} logs in"), || {
        http()
            .post(format!("{base}/auth/login"))
            .json(&json!({"username": user, "password": password}))
    })
    .await;
    body["token"].as_str().expect("a token").to_string()
}

/// With `--auth`, adding, removing and replacing cluster nodes is the admin's: 401 without a valid
/// token, 403 for another user, done for the admin (who may not give a new id a member's
/// address).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_admin_adds_and_removes_nodes() {
    const PASSWORD: &str = "a long enough password";
    let cluster = Cluster::start_with_config(&format!(
        "auth = true\nadmin = \"root\"\nadmin_password = \"{PASSWORD}\"\n"
    ))
    .await;
    let b2 = cluster.http(2).to_string();
    common::cluster::register(&b2, "bob", PASSWORD).await;
    let bob = login(&b2, "bob", PASSWORD).await;
    let root = login(&b2, "root", PASSWORD).await;

    let mut four = Node::new(4, cluster.root().join("node-4"));
    let peers4 = format!("{},{}", cluster.peers, four.peer());
    let add = json!({"id": 4, "cluster": format!("127.0.0.1:{}", four.cluster_port)});
    let post = || http().post(format!("{b2}/cluster/nodes")).json(&add);
    let delete = || http().delete(format!("{b2}/cluster/nodes/4"));
    let replace = || {
        http()
            .post(format!("{b2}/cluster/nodes/3/replace"))
            .json(&add)
    };
    for (what, request) in [
        ("add", post()),
        ("remove", delete()),
        ("replace", replace()),
    ] {
        let (status, body) = send(request).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{what} without a token: {body}"
        );
    }
    for (what, request) in [
        ("add", post()),
        ("remove", delete()),
        ("replace", replace()),
    ] {
        let (status, body) = send(request.bearer_auth("not-a-token")).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{what} with a bad token: {body}"
        );
    }
    for (what, request) in [
        ("add", post()),
        ("remove", delete()),
        ("replace", replace()),
    ] {
        let (status, body) = send(request.bearer_auth(&bob)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what} as bob: {body}");
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
    }
    let ids = |v: &Value| -> Vec<u64> {
        v["nodes"]
            .as_array()
            .map(|ns| ns.iter().filter_map(|n| n["id"].as_u64()).collect())
            .unwrap_or_default()
    };
    let b1 = cluster.http(1).to_string();
    let members = || async {
        common::cluster::view_as(&format!("{b1}/cluster"), Some(&root))
            .await
            .map(|v| ids(&v))
    };
    assert_eq!(members().await, Some(vec![1, 2, 3]), "bob changed nothing");

    // The admin adds node 4 (running with --join, which asks too: either way it is a
    // member once the answer came) and removes it again.
    let mut extra = cluster.extra.clone();
    extra.push("--join".to_string());
    four.start(&peers4, &extra);
    // A 503 (no leader, or its lease not renewed on a busy machine) says to retry.
    let (status, body) = common::cluster::retrying("add", || post().bearer_auth(&root)).await;
    assert_eq!(status, StatusCode::OK, "add as the admin: {body}");
    eventually("node 4 is a member", || async {
        members().await == Some(vec![1, 2, 3, 4])
    })
    .await;
    // A member's address for another id is refused: one process would be two voters.
    let (status, body) = common::cluster::retrying("add 5", || {
        http()
            .post(format!("{b2}/cluster/nodes"))
            .bearer_auth(&root)
            .json(
                &json!({"id": 5, "cluster": format!("127.0.0.1:{}", cluster.node(1).cluster_port)}),
            )
    })
    .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "node 1's address for node 5: {body}"
    );
    assert_eq!(body["error"]["code"], "membership_conflict", "{body}");
    let (status, body) = common::cluster::retrying("remove", || delete().bearer_auth(&root)).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "remove as the admin: {body}"
    );
    eventually("node 4 left", || async {
        members().await == Some(vec![1, 2, 3])
    })
    .await;
    four.terminate();
}

/// Issue 14: queues created while a node is leaving are not placed on it and serve at
/// once. The removal is held in progress by stopping (SIGSTOP) the node that a queue on
/// the leaving node must move to: its catch-up cannot finish until the node continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queues_made_while_a_node_leaves_are_not_placed_on_it() {
    let cluster = Cluster::start_with(4, &[]).await;
    let b = |id: u64| cluster.http(id).to_string();
    let leader = common::cluster::metadata_leader(&cluster).await;
    // `stopped`: neither the metadata leader nor the leaving node 4; `via` takes the
    // requests.
    let stopped = (1..=3).find(|n| *n != leader).expect("a node");
    let via = (1..=3).find(|n| *n != stopped).expect("another node");
    let others: Vec<u64> = (1..=4).filter(|n| *n != stopped).collect();
    let moving = (0..)
        .map(|i| format!("moving-{i}"))
        .find(|q| {
            let mut r = qit::cluster::placement::replicas(q, &[1, 2, 3, 4], 3);
            r.sort_unstable();
            r == others
        })
        .expect("some name");
    create_queue(&b(via), &moving, json!({"partitions": 1})).await;
    common::cluster::publish(&b(via), &moving, "m").await;

    cluster.node(stopped).signal("STOP");
    let remove = {
        let url = format!("{}/cluster/nodes/4", b(via));
        tokio::spawn(async move {
            let mut asked = false;
            loop {
                let (status, body) = send(http().delete(&url)).await;
                match status {
                    StatusCode::NO_CONTENT => return,
                    StatusCode::NOT_FOUND if asked => return,
                    StatusCode::SERVICE_UNAVAILABLE => asked = true,
                    other => panic!("remove-node 4: {other} {body}"),
                }
            }
        })
    };
    // The removal is under way once the moving queue's group records its new replica.
    eventually(&format!("{moving} starts moving off node 4"), || async {
        replicas(&b(via), &moving)
            .await
            .is_some_and(|r| r.contains(&stopped))
    })
    .await;

    let made: Vec<String> = (0..4).map(|i| format!("made-while-leaving-{i}")).collect();
    for queue in &made {
        create_queue(&b(via), queue, json!({"partitions": 1})).await;
        let placed = replicas(&b(via), queue).await.expect("placed");
        assert!(
            !placed.contains(&4),
            "{queue} placed on the leaving node: {placed:?}"
        );
        for i in 0..5 {
            common::cluster::publish(&b(via), queue, &format!("{queue}-{i}")).await;
        }
        let got = deliver_rest(&b(via), queue, 5).await;
        assert_eq!(got.len(), 5, "{queue} serves while node 4 leaves");
    }
    assert!(
        !remove.is_finished(),
        "the removal cannot finish while node {stopped} is stopped"
    );

    cluster.node(stopped).signal("CONT");
    tokio::time::timeout(Duration::from_secs(300), remove)
        .await
        .expect("remove-node 4 answers (guard against a hang)")
        .expect("the removal task");
    let three: Vec<String> = (1..=3).map(b).collect();
    for base in &three {
        eventually_slow(&format!("{base} lists nodes 1 to 3"), || async {
            node_ids(base).await == Some(vec![1, 2, 3])
        })
        .await;
    }
    for queue in made.iter().chain([&moving]) {
        let r = replicas(&b(via), queue).await.expect("placed");
        assert!(!r.contains(&4), "{queue} on {r:?}");
        same_logs(&three, queue).await;
    }
}

/// A queue kept on one node (`replicas` 1) moves, with its messages, off that node when it
/// is removed, and stays on one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_replica_queue_moves_off_a_removed_node() {
    let cluster = Cluster::start_with(4, &[]).await;
    let b = |id: u64| cluster.http(id).to_string();
    let lone = (0..)
        .map(|i| format!("lone-{i}"))
        .find(|q| qit::cluster::placement::replicas(q, &[1, 2, 3, 4], 1) == [4])
        .expect("some name");
    create_queue(&b(1), &lone, json!({"replicas": 1, "max_deliveries": 0})).await;
    eventually(&format!("{lone} is on node 4 alone"), || async {
        replicas(&b(1), &lone).await == Some(vec![4])
    })
    .await;
    let sent: BTreeSet<String> = (0..3).map(|i| format!("kept-{i}")).collect();
    for body in &sent {
        common::cluster::publish(&b(2), &lone, body).await;
    }

    let (status, body) = common::cluster::retrying("remove node 4", || {
        http().delete(format!("{}/cluster/nodes/4", b(1)))
    })
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "remove-node 4: {body}");
    for id in 1..=3 {
        eventually_slow(&format!("node {id} lists nodes 1 to 3"), || async {
            node_ids(&b(id)).await == Some(vec![1, 2, 3])
        })
        .await;
    }
    let placed = replicas(&b(1), &lone).await.expect("placed");
    assert_eq!(placed.len(), 1, "{lone} keeps one copy: {placed:?}");
    assert_ne!(placed, [4], "{lone} left node 4");
    let got = deliver_rest(&b(3), &lone, sent.len()).await;
    assert_eq!(got, sent, "every message moved with {lone}");
}

/// A queue made while a node is down (fenced) is placed on the nodes that are up, as Kafka
/// places a new topic on live brokers: a one-replica queue that hashes onto the down node
/// serves at once, and a two-replica one has both replicas up. Once the node is back (and
/// unfenced), each group moves to its hashed placement, its messages with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_made_while_a_node_is_down_are_placed_on_live_nodes() {
    use common::cluster::{retrying, sees_fenced};
    use qit::cluster::placement;
    let mut cluster = Cluster::start().await;
    let down = 3;
    let named = |prefix: &str, n: usize| {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|q| placement::replicas(q, &[1, 2, 3], n).contains(&down))
            .expect("some name")
    };
    let queues = [(named("solo", 1), 1), (named("pair", 2), 2)];
    cluster.kill(down);
    let b1 = cluster.http(1).to_string();
    eventually("node 3 is fenced", || sees_fenced(&b1, &[3], true)).await;
    for (queue, n) in &queues {
        create_queue(&b1, queue, json!({"replicas": n})).await;
        let placed = replicas(&b1, queue).await.expect("placed");
        assert_eq!(placed.len(), *n, "{queue}: {placed:?}");
        assert!(
            !placed.contains(&down),
            "{queue} is placed on live nodes: {placed:?}"
        );
        let (status, body) = retrying(&format!("a publish to {queue}"), || {
            http()
                .post(format!("{}/queues/{queue}/messages", cluster.http(2)))
                .body("kept")
        })
        .await;
        assert_eq!(status, 201, "{queue}: {body}");
    }

    cluster.restart(down);
    cluster.wait_serving(down).await;
    for (queue, n) in &queues {
        let mut hashed = placement::replicas(queue, &[1, 2, 3], *n);
        hashed.sort_unstable();
        eventually(&format!("{queue} moves to {hashed:?}"), || async {
            replicas(&b1, queue).await.is_some_and(|mut r| {
                r.sort_unstable();
                r == hashed
            })
        })
        .await;
        for node in &hashed {
            holds_exactly(&cluster, *node, queue, &["kept"]).await;
        }
    }
}

/// A queue of three partitions on a joining node: every partition's group takes the new
/// placement (each partition group's leader adds node 4 and changes its voters; the queue
/// group records the placement once all have), node 4 ends holding each partition's log
/// as the other replicas do and leads partitions, and every message published before,
/// during and after the move is delivered once; removing node 4 moves every partition off
/// it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partition_of_a_queue_moves_onto_a_joining_node_and_back() {
    let cluster = Cluster::start().await;
    let queue = queue_for_node_four();
    let queue = queue.as_str();
    let settings = json!({"partitions": 3, "max_deliveries": 0});
    create_queue(cluster.http(1), queue, settings).await;
    for i in 0..30 {
        common::cluster::publish(cluster.http(i % 3 + 1), queue, &format!("before-{i}")).await;
    }
    let mut four = Node::new(4, cluster.root().join("node-4"));
    let peers4 = format!("{},{}", cluster.peers, four.peer());
    four.start(&peers4, &["--join".to_string()]);
    let b4 = four.http.clone();
    let wanted: BTreeSet<u64> = qit::cluster::placement::replicas(queue, &[1, 2, 3, 4], 3)
        .into_iter()
        .collect();
    assert!(wanted.contains(&4));
    let mut bases: Vec<String> = (1..=3).map(|id| cluster.http(id).to_string()).collect();
    bases.push(b4.clone());
    // Every node sees every partition on the new replicas, each led by its preferred
    // replica (the first listed), so that no hand-off moves leases while the messages are
    // drained below.
    for base in &bases {
        eventually_slow(
            &format!("{base} sees every partition on {wanted:?}"),
            || async {
                partition_replicas(base, queue).await.is_some_and(|parts| {
                    parts.len() == 3
                        && parts
                            .iter()
                            .all(|(set, preferred)| *set == wanted && *preferred)
                })
            },
        )
        .await;
    }
    for i in 0..30 {
        common::cluster::publish(&b4, queue, &format!("after-{i}")).await;
    }
    // Node 4's copy of every partition is the others' copy, every publish stored once.
    let holders: Vec<&String> = bases
        .iter()
        .zip(1u64..)
        .filter(|(_, id)| wanted.contains(id))
        .map(|(b, _)| b)
        .collect();
    eventually("the replicas hold the same 60 messages", || async {
        let mut copies = Vec::new();
        for holder in &holders {
            let mut parts = Vec::new();
            for p in 0..3 {
                parts.push(log_bodies(holder, queue, p).await);
            }
            copies.push(parts);
        }
        let stored: usize = copies[0].iter().flatten().map(Vec::len).sum();
        stored == 60
            && copies[0].iter().all(Option::is_some)
            && copies.iter().all(|c| *c == copies[0])
    })
    .await;
    // Every message delivered once, through node 4 (the deadline only guards a hang).
    let mut delivered = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while delivered.len() < 60 {
        assert!(
            std::time::Instant::now() < deadline,
            "delivered {} of 60",
            delivered.len()
        );
        for m in common::cluster::receive(&b4, queue, 100).await {
            let (id, body) = (m["id"].as_str().unwrap(), m["body"].as_str().unwrap());
            let (status, answer) = common::cluster::retrying("ack", || {
                http().delete(format!("{b4}/queues/{queue}/messages/{id}"))
            })
            .await;
            assert!(status.is_success(), "ack {id}: {status} {answer}");
            let first = delivered.insert(body.to_string(), id.to_string());
            assert!(first.is_none(), "{body} delivered twice");
        }
    }
    assert!(common::cluster::receive(&b4, queue, 100).await.is_empty());
    // Node 4 leaves: every partition moves off it.
    let (status, body) = send(http().delete(format!("{}/cluster/nodes/4", cluster.http(2)))).await;
    assert!(status.is_success(), "remove node 4: {status} {body}");
    for base in &bases[..3] {
        eventually_slow(&format!("{base} sees no partition on node 4"), || async {
            partition_replicas(base, queue).await.is_some_and(|parts| {
                parts.len() == 3
                    && parts
                        .iter()
                        .all(|(set, preferred)| !set.contains(&4) && set.len() == 3 && *preferred)
            })
        })
        .await;
    }
    four.terminate();
}

/// Each partition of `queue` in node `base`'s view: its replicas, and whether the first
/// of them (its preferred leader) leads it.
async fn partition_replicas(base: &str, queue: &str) -> Option<Vec<(BTreeSet<u64>, bool)>> {
    let v = view(&format!("{base}/cluster")).await?;
    Some(
        v["partitions"]
            .as_array()?
            .iter()
            .filter(|p| p["queue"] == queue)
            .map(|p| {
                let replicas: Vec<u64> = p["replicas"]
                    .as_array()
                    .map(|r| r.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                let preferred = p["leader"].as_u64().is_some()
                    && p["leader"].as_u64() == replicas.first().copied();
                (replicas.into_iter().collect(), preferred)
            })
            .collect(),
    )
}
