//! A cluster of real `qit` processes on loopback for integration tests: each node has its
//! own data directory and ephemeral ports; nodes can be killed (SIGKILL), stopped and
//! continued (SIGSTOP/SIGCONT), terminated (SIGTERM) and restarted on the same directory.
//! Also the HTTP helpers the cluster tests share. Every wait is on a condition; the
//! deadlines only guard against hangs and measure nothing.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use super::{eventually, free_port, free_port_on, http};

/// The secret every node of a test cluster shares.
pub const SECRET: &str = "cluster-test-secret-0123456789";

/// One node of a test cluster.
pub struct Node {
    /// Its node id (1-based).
    pub id: u64,
    /// Its data directory.
    pub dir: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub http: String,
    /// Its HTTP port.
    pub http_port: u16,
    /// Its gRPC port.
    pub grpc_port: u16,
    /// Its cluster (Raft and forwarding) port.
    pub cluster_port: u16,
    /// Its Kafka listener's port.
    pub kafka_port: u16,
    /// The IP its cluster listener binds, and its connections to the peers go out from
    /// (`127.0.0.1` unless made with [`Node::new_at`]).
    pub cluster_ip: String,
    child: Option<Child>,
    /// Everything the process wrote to stderr (its log) since it was made, also passed on
    /// to this process's stderr.
    log: Arc<Mutex<String>>,
}

impl Node {
    /// A node that is not running yet, with fresh ports and `dir` as its data directory.
    pub fn new(id: u64, dir: PathBuf) -> Self {
        let http_port = free_port();
        Self {
            id,
            dir,
            http: format!("http://127.0.0.1:{http_port}"),
            http_port,
            grpc_port: free_port(),
            cluster_port: free_port(),
            kafka_port: free_port(),
            cluster_ip: "127.0.0.1".to_string(),
            child: None,
            log: Arc::default(),
        }
    }

    /// `ID=127.0.0.1:PORT`, as `--peers` names this node.
    pub fn peer(&self) -> String {
        format!("{}={}:{}", self.id, self.cluster_ip, self.cluster_port)
    }

    /// `127.0.0.1:PORT` of its Kafka listener (a bootstrap server).
    pub fn kafka(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    /// `http://127.0.0.1:PORT` of its gRPC listener.
    pub fn grpc(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// `qit serve` for this node with the cluster's `peers` and `extra` flags, its log
    /// filtered by `log_filter`, standard output discarded (the caller picks stderr).
    pub fn serve_command(&self, peers: &str, extra: &[&str], log_filter: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_qit"));
        command
            .arg("serve")
            .args(["--node-id", &self.id.to_string()])
            .args([
                "--cluster",
                &format!("{}:{}", self.cluster_ip, self.cluster_port),
            ])
            .args(["--peers", peers])
            .args(["--cluster-secret", SECRET])
            .args(["--http", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--grpc", &format!("127.0.0.1:{}", self.grpc_port)])
            .args(["--kafka", &self.kafka()])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(extra)
            .env("RUST_LOG", log_filter)
            .stdout(Stdio::null());
        command
    }

    /// Starts `qit serve` for this node with the cluster's `peers` and `extra` flags.
    pub fn start(&mut self, peers: &str, extra: &[String]) {
        assert!(self.child.is_none(), "node {} runs already", self.id);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        // QIT_TEST_LOG: the nodes' log filter when a test is looked into. By default the
        // node logs at info (kept, and shown when the test fails: see `Drop`), and only
        // errors and qit::server's warnings (an unclean stop) are passed on at once.
        let filter = std::env::var("QIT_TEST_LOG").ok();
        let echo_all = filter.is_some();
        let filter = filter.unwrap_or_else(|| "info,openraft=warn".into());
        let mut child = self
            .serve_command(peers, &extra, &filter)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qit");
        if let Some(stderr) = child.stderr.take() {
            let log = Arc::clone(&self.log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if echo_all || is_alarm(&line) {
                        eprintln!("{line}");
                    }
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        self.child = Some(child);
    }

    /// What the node logged (stderr) so far, over all its runs.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the process was started and not killed or terminated since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id of the running node.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the node runs").id()
    }

    /// Sends signal `name` (`STOP`, `CONT`, `TERM`, ...) to the running node; `STOP` returns
    /// once every thread of it stopped ([`super::wait_stopped`]).
    pub fn signal(&self, name: &str) {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}");
        if name == "STOP" {
            super::wait_stopped(self.pid());
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for the exit (a guard of 60 s against a hang).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().expect("the node runs");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait for qit") {
                return status;
            }
            assert!(Instant::now() < deadline, "node {} did not stop", self.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether a node's log line is an error, or a warning of `qit::server` (an unclean stop):
/// the lines passed on to the test's output as they come.
fn is_alarm(line: &str) -> bool {
    // `{time} {LEVEL} {target}: {message}` (text format, no colours on a pipe).
    let mut words = line.split_whitespace().skip(1);
    match (words.next(), words.next()) {
        (Some("ERROR"), _) => true,
        (Some("WARN"), Some(target)) => target.starts_with("qit::server"),
        _ => false,
    }
}

/// Lines of each node's log shown when a test fails.
const LOG_TAIL_ON_FAILURE: usize = 400;

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: what the node logged tells why more often than not.
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..];
            eprintln!(
                "--- node {} log, last {} of {} lines ---\n{}\n--- end of node {} log ---",
                self.id,
                tail.len(),
                lines.len(),
                tail.join("\n"),
                self.id
            );
        }
        // A stopped process is continued first, so that SIGKILL's reaping does not wait.
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// A test cluster: nodes `1..=n` in one temp directory, each started with the same
/// `--peers` and extra flags.
pub struct Cluster {
    /// The nodes, `nodes[i]` has id `i + 1`.
    pub nodes: Vec<Node>,
    /// The `--peers` value every node was started with.
    pub peers: String,
    /// Extra `qit serve` flags every node is started with.
    pub extra: Vec<String>,
    temp: tempfile::TempDir,
}

impl Cluster {
    /// Three nodes with the default configuration, each serving (`/healthz`: part of a
    /// working quorum).
    pub async fn start() -> Self {
        Self::start_with(3, &[]).await
    }

    /// Three nodes whose config file holds `toml` (passed with `--config`).
    pub async fn start_with_config(toml: &str) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let config = temp.path().join("qit.toml");
        std::fs::write(&config, toml).expect("write config");
        let extra = vec!["--config".to_string(), config.display().to_string()];
        Self::launch(temp, 3, extra).await
    }

    /// `size` nodes started with `extra` flags, each serving.
    pub async fn start_with(size: u64, extra: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let extra = extra.iter().map(|s| s.to_string()).collect();
        Self::launch(temp, size, extra).await
    }

    async fn launch(temp: tempfile::TempDir, size: u64, extra: Vec<String>) -> Self {
        let mut nodes: Vec<Node> = (1..=size)
            .map(|id| Node::new(id, temp.path().join(format!("node-{id}"))))
            .collect();
        let peers = nodes.iter().map(Node::peer).collect::<Vec<_>>().join(",");
        for node in &mut nodes {
            node.start(&peers, &extra);
        }
        let cluster = Self {
            nodes,
            peers,
            extra,
            temp,
        };
        for node in &cluster.nodes {
            cluster.wait_serving(node.id).await;
        }
        // A node the metadata leader found down while the nodes started (a busy machine)
        // is fenced until it has been up a while, and queues made meanwhile avoid it.
        // (With `--auth`, `/cluster` needs a token the cluster has none of yet: not waited.)
        let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
        let first = cluster.http(1).to_string();
        let open = http()
            .get(format!("{first}/cluster"))
            .send()
            .await
            .is_ok_and(|r| {
                ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&r.status())
            });
        if open {
            eventually("no node is fenced", || sees_fenced(&first, &ids, false)).await;
        }
        cluster
    }

    /// The temp directory holding every node's data directory.
    pub fn root(&self) -> &std::path::Path {
        self.temp.path()
    }

    /// Node `id`.
    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    /// Node `id`, to kill or signal it.
    pub fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    /// HTTP base URL of node `id`.
    pub fn http(&self, id: u64) -> &str {
        &self.node(id).http
    }

    /// SIGKILL of node `id`.
    pub fn kill(&mut self, id: u64) {
        self.node_mut(id).kill();
    }

    /// Starts node `id` again on its data directory, with its old ports.
    pub fn restart(&mut self, id: u64) {
        let (peers, extra) = (self.peers.clone(), self.extra.clone());
        self.node_mut(id).start(&peers, &extra);
    }

    /// Starts a new node (the next id) that replaces node `old` (`--replaces old`, with the
    /// cluster's extra flags; `old` should be down) and waits until it serves; its id.
    /// (Its `--peers` name it too: [`Cluster::restart`] does not restart it.)
    pub async fn replace(&mut self, old: u64) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let mut node = Node::new(id, self.temp.path().join(format!("node-{id}")));
        let peers = format!("{},{}", self.peers, node.peer());
        let mut extra = self.extra.clone();
        extra.extend(["--replaces".to_string(), old.to_string()]);
        node.start(&peers, &extra);
        self.nodes.push(node);
        self.wait_serving(id).await;
        id
    }

    /// Waits until node `id` sees a metadata leader.
    pub async fn wait_metadata_leader(&self, id: u64) {
        let url = format!("{}/cluster", self.node(id).http);
        eventually(&format!("node {id} sees a metadata leader"), || async {
            view(&url).await.is_some_and(|v| v["leader"].is_u64())
        })
        .await;
    }

    /// Waits until node `id` answers `/healthz` (part of a working quorum).
    pub async fn wait_serving(&self, id: u64) {
        let url = format!("{}/healthz", self.node(id).http);
        eventually(&format!("node {id} serves"), || async {
            http()
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
    }

    /// Waits until node `on` sees one leader, other than `not`, for every partition of
    /// `queue`; returns it.
    pub async fn leader_of(&self, on: u64, queue: &str, not: Option<u64>) -> u64 {
        let url = format!("{}/cluster", self.node(on).http);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = view(&url).await
                && let Some(leader) = common_leader(&v, queue)
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

    /// Waits until node `on` sees `queue` led by its preferred replica (its first); returns
    /// it. A group first led elsewhere is handed to that replica a few seconds later (leader
    /// balance), and leases held by the old leader go with it: a test that takes leases
    /// and then counts them waits for this first.
    pub async fn preferred_leader(&self, on: u64, queue: &str) -> u64 {
        let url = format!("{}/cluster", self.node(on).http);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = view(&url).await
                && let Some(leader) = common_leader(&v, queue)
                && partition(&v, queue).is_some_and(|p| p["replicas"][0] == leader)
            {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "node {on} does not see {queue} led by its preferred replica"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until node `on` sees a leader for `queue`; returns its Raft group (of the
    /// first partition).
    pub async fn group_of(&self, on: u64, queue: &str) -> u64 {
        let url = format!("{}/cluster", self.node(on).http);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let group = view(&url).await.and_then(|v| {
                partition(&v, queue)
                    .filter(|p| p["leader"].is_u64())?
                    .get("group")?
                    .as_u64()
            });
            if let Some(group) = group {
                return group;
            }
            assert!(
                Instant::now() < deadline,
                "node {on} sees no group for {queue}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The leader of `queue`'s group (its partition 0's, which holds the leases) in a
/// `GET /cluster` view, once every partition of the queue has a leader (each partition
/// after the first has a group of its own, led by the next replica in turn).
pub fn common_leader(view: &Value, queue: &str) -> Option<u64> {
    let leaders: Vec<Option<u64>> = partition_leaders(view, queue);
    let first = (*leaders.first()?)?;
    leaders.iter().all(Option::is_some).then_some(first)
}

/// The leader of each partition of `queue` in a `GET /cluster` view, in partition order.
pub fn partition_leaders(view: &Value, queue: &str) -> Vec<Option<u64>> {
    let mut leaders: Vec<(u64, Option<u64>)> = view["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["queue"] == queue)
        .map(|p| (p["partition"].as_u64().unwrap_or(0), p["leader"].as_u64()))
        .collect();
    leaders.sort_unstable();
    leaders.into_iter().map(|(_, leader)| leader).collect()
}

/// The first partition of `queue` in a `GET /cluster` view.
pub fn partition<'a>(view: &'a Value, queue: &str) -> Option<&'a Value> {
    view["partitions"]
        .as_array()?
        .iter()
        .find(|p| p["queue"] == queue)
}

/// True when node `base`'s `/cluster` says of every node in `nodes` that it is fenced
/// as `fenced` (the metadata's record, the same on every node).
pub async fn sees_fenced(base: &str, nodes: &[u64], fenced: bool) -> bool {
    view(&format!("{base}/cluster")).await.is_some_and(|v| {
        nodes.iter().all(|id| {
            v["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|n| n["id"] == *id && n["fenced"] == fenced)
        })
    })
}

/// GET `url` as JSON, `None` unless 2xx.
pub async fn view(url: &str) -> Option<Value> {
    view_as(url, None).await
}

/// GET `url` as JSON with an optional bearer token, `None` unless 2xx.
pub async fn view_as(url: &str, token: Option<&str>) -> Option<Value> {
    let mut request = http().get(url).timeout(Duration::from_secs(5));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// Sends a request again while the cluster answers 503 (no leader; it must carry
/// `Retry-After`) or a node is out of reach; the first other answer.
pub async fn retrying(
    what: &str,
    mut make: impl FnMut() -> reqwest::RequestBuilder,
) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match make().timeout(Duration::from_secs(30)).send().await {
            Ok(response) => {
                let status = response.status();
                if status != StatusCode::SERVICE_UNAVAILABLE {
                    let body = response.json().await.unwrap_or(Value::Null);
                    return (status, body);
                }
                assert!(
                    response.headers().contains_key("retry-after"),
                    "{what}: a 503 carries Retry-After"
                );
                eprintln!("{what}: 503, sent again");
            }
            Err(error) => eprintln!("{what}: {error}, sent again"),
        }
        assert!(Instant::now() < deadline, "{what}: no answer in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers `user` with `password` through node `base`. A 503 or a lost answer may
/// come after the registration was committed (an answer cut by a busy machine, as any
/// client can meet), so after one the user's 409 `user_exists` counts as registered;
/// without one the answer must be 201.
pub async fn register(base: &str, user: &str, password: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unsure = false;
    loop {
        let sent = http()
            .post(format!("{base}/auth/register"))
            .json(&serde_json::json!({"username": user, "password": password}))
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        match sent {
            Ok(response) if response.status() != StatusCode::SERVICE_UNAVAILABLE => {
                let status = response.status();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let taken_by_us = unsure
                    && status == StatusCode::CONFLICT
                    && body["error"]["code"] == "user_exists";
                assert!(
                    status == StatusCode::CREATED || taken_by_us,
                    "register {user}: {status} {body}"
                );
                return;
            }
            _ => unsure = true,
        }
        assert!(
            Instant::now() < deadline,
            "register {user}: no answer in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `retrying`, and the answer must be a success; its body.
pub async fn ok(what: &str, make: impl FnMut() -> reqwest::RequestBuilder) -> Value {
    let (status, body) = retrying(what, make).await;
    assert!(status.is_success(), "{what}: {status} {body}");
    body
}

/// Creates `queue` through node `base` with `settings`.
pub async fn create_queue(base: &str, queue: &str, settings: Value) {
    create_queue_as(base, None, queue, settings).await;
}

/// Creates `queue` through node `base` with `settings`, as the user of `token`.
pub async fn create_queue_as(base: &str, token: Option<&str>, queue: &str, settings: Value) {
    ok(&format!("create {queue}"), || {
        let request = http()
            .post(format!("{base}/queues/{queue}"))
            .json(&settings);
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    })
    .await;
}

/// Publishes one message with `body` to `queue` through node `base`.
pub async fn publish(base: &str, queue: &str, body: &str) {
    ok(&format!("publish {body}"), || {
        http()
            .post(format!("{base}/queues/{queue}/messages"))
            .body(body.to_string())
    })
    .await;
}

/// Publishes message `body(i)` for each `i` in `range`, one per request (one Raft entry
/// each), from two tasks: even `i` through node `via[0]`, odd through `via[1]`.
pub async fn publish_spread(
    cluster: &Cluster,
    queue: &str,
    range: std::ops::Range<usize>,
    via: [u64; 2],
    body: fn(usize) -> String,
) {
    let bases = via.map(|id| cluster.node(id).http.clone());
    let mut tasks = Vec::new();
    for (lane, base) in bases.into_iter().enumerate() {
        let queue = queue.to_string();
        let mine: Vec<usize> = range.clone().filter(|i| i % 2 == lane).collect();
        tasks.push(tokio::spawn(async move {
            for i in mine {
                let (status, answer) = retrying("publish", || {
                    http()
                        .post(format!("{base}/queues/{queue}/messages"))
                        .body(body(i))
                })
                .await;
                assert!(status.is_success(), "publish {i}: {status} {answer}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Receives up to `max` messages of `queue` through node `base` (long-poll of 1 s,
/// visibility 5 s).
pub async fn receive(base: &str, queue: &str, max: usize) -> Vec<Value> {
    let body = ok("receive", || {
        http().get(format!(
            "{base}/queues/{queue}/messages?max={max}&wait=1&visibility=5"
        ))
    })
    .await;
    body["messages"].as_array().cloned().unwrap_or_default()
}

/// The bodies of partition `partition` of `queue`'s committed log as node `base` holds it.
pub async fn log_bodies(base: &str, queue: &str, partition: u32) -> Option<Vec<String>> {
    let url =
        format!("{base}/queues/{queue}/log?partition={partition}&from=0&max=10000&local=true");
    let v = view(&url).await?;
    Some(
        v["messages"]
            .as_array()?
            .iter()
            .filter_map(|m| m["body"].as_str().map(String::from))
            .collect(),
    )
}

/// Waits until node `node`'s own copy of `queue`'s partition 0 holds exactly `bodies`, in
/// order.
pub async fn holds_exactly(cluster: &Cluster, node: u64, queue: &str, bodies: &[&str]) {
    let base = cluster.http(node).to_string();
    let want: Vec<String> = bodies.iter().map(|b| b.to_string()).collect();
    eventually(&format!("node {node} holds {want:?} in {queue}"), || {
        let base = base.clone();
        let want = want.clone();
        async move { log_bodies(&base, queue, 0).await == Some(want) }
    })
    .await;
}

/// The sum of every series of metric `name` (any labels) on node `base`; 0 when absent
/// or when the node does not answer.
pub async fn metric(base: &str, name: &str) -> f64 {
    let Ok(response) = http().get(format!("{base}/metrics")).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of series `name` on node `base` whose labels include `label` (such as
/// `queue="q"`), if the node answers and has it.
pub async fn labeled_metric(base: &str, name: &str, label: &str) -> Option<f64> {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let prefix = format!("{name}{{");
    text.lines()
        .find(|line| line.starts_with(&prefix) && line.contains(label))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// The value of Raft-index metric `name` of `queue`'s group on node `base`, once the node
/// reports one past `after` (the metrics are refreshed now and then).
pub async fn index_past(base: &str, name: &str, queue: &str, after: u64) -> u64 {
    let label = format!("queue=\"{queue}\"");
    let what = format!("{name} of {queue} at {base} is past {after}");
    super::eventually_some(&what, || async {
        let index = labeled_metric(base, name, &label).await? as u64;
        (index > after).then_some(index)
    })
    .await
}

/// The sum of metric `name` over the nodes at `bases`.
pub async fn metric_sum(bases: &[String], name: &str) -> f64 {
    let mut sum = 0.0;
    for base in bases {
        sum += metric(base, name).await;
    }
    sum
}

/// Metric `name`'s series with `label` summed over every node of `cluster` (a node without
/// it counts 0).
pub async fn labeled_metric_sum(cluster: &Cluster, name: &str, label: &str) -> f64 {
    let mut sum = 0.0;
    for node in &cluster.nodes {
        sum += labeled_metric(&node.http, name, label).await.unwrap_or(0.0);
    }
    sum
}

impl Node {
    /// A node like [`Node::new`] whose cluster listener is on `cluster_ip` (another loopback
    /// address, such as `127.0.0.3`, so that a firewall rule on it cuts the node off from
    /// its peers while its HTTP and gRPC listeners stay on `127.0.0.1`).
    pub fn new_at(id: u64, dir: PathBuf, cluster_ip: &str) -> Self {
        let mut node = Self::new(id, dir);
        node.cluster_ip = cluster_ip.to_string();
        node.cluster_port = free_port_on(cluster_ip);
        node
    }
}

impl Cluster {
    /// `ips.len()` nodes with the default configuration, node `i + 1`'s cluster listener on
    /// `ips[i]` (see [`Node::new_at`]), each seeing a metadata leader.
    pub async fn start_at(ips: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut nodes: Vec<Node> = ips
            .iter()
            .zip(1u64..)
            .map(|(ip, id)| Node::new_at(id, temp.path().join(format!("node-{id}")), ip))
            .collect();
        let peers = nodes.iter().map(Node::peer).collect::<Vec<_>>().join(",");
        for node in &mut nodes {
            node.start(&peers, &[]);
        }
        let cluster = Self {
            nodes,
            peers,
            extra: Vec::new(),
            temp,
        };
        for node in &cluster.nodes {
            cluster.wait_metadata_leader(node.id).await;
        }
        cluster
    }
}

/// The metadata group's leader, once node 1 knows one.
pub async fn metadata_leader(cluster: &Cluster) -> u64 {
    let url = format!("{}/cluster", cluster.http(1));
    super::eventually_some("a metadata leader", || async {
        view(&url).await.and_then(|v| v["leader"].as_u64())
    })
    .await
}

/// Makes the direct exchange `name` through `base`.
pub async fn create_direct_exchange(base: &str, name: &str) {
    let client = http();
    ok("create the exchange", || {
        client
            .post(format!("{base}/exchanges/{name}"))
            .json(&serde_json::json!({"type": "direct"}))
    })
    .await;
}
