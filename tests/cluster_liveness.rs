//! Liveness of a three-node cluster whose groups share one beat per node (issue 13):
//! openraft's per-group heartbeats and election timers are off, so these check what they
//! used to provide. A follower learns what the leader committed, with nothing written
//! after it; a stopped leader of several groups is replaced for all of them and follows
//! the new leaders once it runs again; a killed node is replaced and catches up after a
//! restart. Three real `qit` processes on loopback; every wait is on a condition (the
//! deadlines only guard against hangs), nothing here measures time.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, free_port, http};
use serde_json::{Value, json};

const SECRET: &str = "liveness-test-secret-0123456789";

/// One node of a test cluster.
struct Node {
    id: u64,
    dir: PathBuf,
    http: String,
    http_port: u16,
    grpc_port: u16,
    cluster_port: u16,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self, peers: &str) {
        let child = Command::new(env!("CARGO_BIN_EXE_qit"))
            .arg("serve")
            .args(["--node-id", &self.id.to_string()])
            .args(["--cluster", &format!("127.0.0.1:{}", self.cluster_port)])
            .args(["--peers", peers])
            .args(["--cluster-secret", SECRET])
            .args(["--http", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--grpc", &format!("127.0.0.1:{}", self.grpc_port)])
            .arg("--data-dir")
            .arg(&self.dir)
            .env("RUST_LOG", "error,openraft=off")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A stopped process must run again to die of SIGKILL's reaping in time.
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

struct Cluster {
    nodes: Vec<Node>,
    peers: String,
    _temp: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let mut nodes: Vec<Node> = (1..=3)
            .map(|id| {
                let http_port = free_port();
                Node {
                    id,
                    dir: temp.path().join(format!("node-{id}")),
                    http: format!("http://127.0.0.1:{http_port}"),
                    http_port,
                    grpc_port: free_port(),
                    cluster_port: free_port(),
                    child: None,
                }
            })
            .collect();
        let peers = nodes
            .iter()
            .map(|n| format!("{}=127.0.0.1:{}", n.id, n.cluster_port))
            .collect::<Vec<_>>()
            .join(",");
        for node in &mut nodes {
            node.start(&peers);
        }
        for node in &nodes {
            let url = format!("{}/cluster", node.http);
            eventually("every node sees a metadata leader", || async {
                view(&url).await.is_some_and(|v| v["leader"].is_u64())
            })
            .await;
        }
        Self {
            nodes,
            peers,
            _temp: temp,
        }
    }

    fn node(&self, id: u64) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    fn restart(&mut self, id: u64) {
        let peers = self.peers.clone();
        self.nodes[(id - 1) as usize].start(&peers);
    }

    /// Waits until node `on` sees a leader of `queue` other than `not`; returns it.
    async fn leader_of(&self, on: u64, queue: &str, not: Option<u64>) -> u64 {
        let url = format!("{}/cluster", self.node(on).http);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = view(&url).await
                && let Some(leader) = partition(&v, queue).and_then(|p| p["leader"].as_u64())
                && Some(leader) != not
            {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "node {on} sees no leader of {queue} (other than {not:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn partition<'a>(view: &'a Value, queue: &str) -> Option<&'a Value> {
    view["partitions"]
        .as_array()?
        .iter()
        .find(|p| p["queue"] == queue)
}

async fn view(url: &str) -> Option<Value> {
    let response = http()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// Retries a request while the cluster answers "no leader" (503) or a node is down.
async fn retrying(
    what: &str,
    mut make: impl FnMut() -> reqwest::RequestBuilder,
) -> (reqwest::StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = make().timeout(Duration::from_secs(30)).send().await {
            let status = response.status();
            if status != reqwest::StatusCode::SERVICE_UNAVAILABLE {
                let body = response.json().await.unwrap_or(Value::Null);
                return (status, body);
            }
        }
        assert!(Instant::now() < deadline, "{what}: no answer in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create_queue(base: &str, queue: &str) {
    let (status, body) = retrying("create", || {
        http()
            .post(format!("{base}/queues/{queue}"))
            .json(&json!({"partitions": 1, "max_deliveries": 0}))
    })
    .await;
    assert!(status.is_success(), "create {queue}: {status} {body}");
}

async fn publish(base: &str, queue: &str, body: &str) {
    let (status, answer) = retrying("publish", || {
        http()
            .post(format!("{base}/queues/{queue}/messages"))
            .body(body.to_string())
    })
    .await;
    assert!(status.is_success(), "publish {body}: {status} {answer}");
}

/// The bodies of `queue`'s committed log as node `base` holds it.
async fn log_bodies(base: &str, queue: &str) -> Option<Vec<String>> {
    let url = format!("{base}/queues/{queue}/log?partition=0&from=0&max=10000");
    let v = view(&url).await?;
    Some(
        v["messages"]
            .as_array()?
            .iter()
            .filter_map(|m| m["body"].as_str().map(String::from))
            .collect(),
    )
}

/// Waits until node `base` holds exactly `expected` in `queue`'s log.
async fn holds(base: &str, queue: &str, expected: &[String], who: &str) {
    eventually(&format!("{who} holds {expected:?} in {queue}"), || async {
        log_bodies(base, queue).await.as_deref() == Some(expected)
    })
    .await;
}

/// The leader commits and nothing is written after: the followers still learn the commit
/// (no heartbeat carries it any more) and serve the data from `/log` and `GET
/// /queues/{q}`; a publish answered by a follower is readable there at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_serve_what_the_leader_committed() {
    let cluster = Cluster::start().await;
    create_queue(&cluster.node(1).http, "ryw").await;
    let leader = cluster.leader_of(1, "ryw", None).await;
    let followers: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let mut expected = Vec::new();
    for i in 0..3 {
        let body = format!("via-leader-{i}");
        publish(&cluster.node(leader).http, "ryw", &body).await;
        expected.push(body);
    }
    for id in &followers {
        let base = &cluster.node(*id).http;
        holds(base, "ryw", &expected, &format!("follower {id}")).await;
        let url = format!("{base}/queues/ryw");
        eventually(&format!("follower {id} counts the messages"), || async {
            view(&url)
                .await
                .is_some_and(|v| v["partitions"][0]["next_offset"].as_u64() == Some(3))
        })
        .await;
    }
    // Read-your-writes on the node that answered: it applied the entry before answering.
    for id in &followers {
        let base = &cluster.node(*id).http;
        let body = format!("via-follower-{id}");
        publish(base, "ryw", &body).await;
        expected.push(body.clone());
        let log = log_bodies(base, "ryw")
            .await
            .expect("the follower serves /log");
        assert!(
            log.contains(&body),
            "follower {id} answered the publish of {body} but does not show it: {log:?}"
        );
    }
    for id in 1..=3 {
        holds(
            &cluster.node(id).http,
            "ryw",
            &expected,
            &format!("node {id}"),
        )
        .await;
    }
}

/// SIGSTOP of the node leading the metadata group and queue groups: the others elect new
/// leaders for every one of them and serve through any survivor; after SIGCONT the old node
/// steps down everywhere, follows, serves reads of what was written meanwhile, and takes
/// writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_is_replaced_for_all_its_groups_and_follows_after() {
    let cluster = Cluster::start().await;
    let queues: Vec<String> = (0..6).map(|i| format!("stop-{i}")).collect();
    for q in &queues {
        create_queue(&cluster.node(1).http, q).await;
    }
    // The node that leads the most groups (leaders spread by placement).
    let mut leaders = Vec::new();
    for q in &queues {
        leaders.push(cluster.leader_of(1, q, None).await);
    }
    let stopped = (1..=3u64)
        .max_by_key(|n| leaders.iter().filter(|l| *l == n).count())
        .unwrap();
    let led: Vec<&String> = queues
        .iter()
        .zip(&leaders)
        .filter(|(_, l)| **l == stopped)
        .map(|(q, _)| q)
        .collect();
    assert!(!led.is_empty());
    for q in &queues {
        publish(&cluster.node(1).http, q, "before").await;
    }
    cluster.node(stopped).signal("STOP");
    let survivors: Vec<u64> = (1..=3).filter(|n| *n != stopped).collect();
    for q in &led {
        for s in &survivors {
            let new = cluster.leader_of(*s, q, Some(stopped)).await;
            assert_ne!(new, stopped);
        }
    }
    for (i, q) in queues.iter().enumerate() {
        let via = survivors[i % 2];
        publish(&cluster.node(via).http, q, "during").await;
    }
    cluster.node(stopped).signal("CONT");
    let old = &cluster.node(stopped).http;
    let expected = vec!["before".to_string(), "during".to_string()];
    for q in &queues {
        let leader = cluster.leader_of(survivors[0], q, Some(stopped)).await;
        let url = format!("{old}/cluster");
        eventually(
            &format!("node {stopped} follows {leader} in {q}"),
            || async {
                view(&url)
                    .await
                    .as_ref()
                    .and_then(|v| partition(v, q).map(|p| p["leader"].as_u64() == Some(leader)))
                    .unwrap_or(false)
            },
        )
        .await;
        holds(old, q, &expected, &format!("the resumed node {stopped}")).await;
    }
    for q in &queues {
        publish(old, q, "after").await;
    }
    let expected = vec![
        "before".to_string(),
        "during".to_string(),
        "after".to_string(),
    ];
    for q in &queues {
        for id in 1..=3 {
            holds(&cluster.node(id).http, q, &expected, &format!("node {id}")).await;
        }
    }
}

/// kill -9 of a node that leads queues: a survivor serves publishes to every queue (the
/// groups elect new leaders), and the killed node, restarted, catches up on all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_catches_up_after_restart() {
    let mut cluster = Cluster::start().await;
    let queues: Vec<String> = (0..4).map(|i| format!("kill-{i}")).collect();
    for q in &queues {
        create_queue(&cluster.node(2).http, q).await;
        publish(&cluster.node(2).http, q, "before").await;
    }
    let victim = cluster.leader_of(2, &queues[0], None).await;
    cluster.nodes[(victim - 1) as usize].kill();
    let survivor = if victim == 1 { 2 } else { 1 };
    for q in &queues {
        publish(&cluster.node(survivor).http, q, "during").await;
    }
    let new = cluster.leader_of(survivor, &queues[0], Some(victim)).await;
    assert_ne!(new, victim);
    cluster.restart(victim);
    let expected = vec!["before".to_string(), "during".to_string()];
    for q in &queues {
        holds(
            &cluster.node(victim).http,
            q,
            &expected,
            &format!("the restarted node {victim}"),
        )
        .await;
    }
}
