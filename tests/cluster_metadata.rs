//! The metadata group's snapshot and log purge (issue 13): with a small
//! `raft_snapshot_entries`, queues, exchanges, users and grants made and removed through
//! every node are snapshotted with their group ids and the metadata log is purged below the
//! snapshot; a restarted node rebuilds from its own snapshot, a node that missed the purged
//! entries is sent the snapshot over its old state, a wiped node's replacement over nothing, and every
//! node ends with the same metadata; and a create that commits after its answer was lost
//! leaves what it made owned by its creator. Three `qit` processes on loopback with auth
//! on; every wait is on a condition (the deadlines only guard against hangs).

mod common;

use std::path::Path;

use common::cluster::{Cluster, Node, retrying};
use common::{eventually, http};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Metadata entries between two snapshots of the metadata group (and of queue groups).
const SNAPSHOT_ENTRIES: u64 = 20;
const ADMIN: &str = "root";
const PASSWORD: &str = "a long enough password";

/// Three nodes started with auth on and a small snapshot interval; the admin's token.
struct Nodes {
    cluster: Cluster,
    admin: String,
}

impl Nodes {
    async fn start() -> Self {
        let cluster = Cluster::start_with_config(&format!(
            "raft_snapshot_entries = {SNAPSHOT_ENTRIES}\nauth = true\nadmin = \"{ADMIN}\"\nadmin_password = \"{PASSWORD}\"\n"
        ))
        .await;
        let admin = login(cluster.http(1), ADMIN).await;
        Self { cluster, admin }
    }

    fn node(&self, id: u64) -> &Node {
        self.cluster.node(id)
    }

    fn http(&self, id: u64) -> &str {
        self.cluster.http(id)
    }

    fn kill(&mut self, id: u64) {
        self.cluster.kill(id);
    }

    async fn restart(&mut self, id: u64) {
        self.cluster.restart(id);
        self.wait_serving(id).await;
    }

    /// Starts a new node (the next id) that replaces node `old` (`--replaces`), waits until
    /// it serves; its id.
    async fn replace(&mut self, old: u64) -> u64 {
        self.cluster.replace(old).await
    }

    /// Waits until node `id` answers `/healthz` (part of a working quorum).
    async fn wait_serving(&self, id: u64) {
        self.cluster.wait_serving(id).await;
    }

    /// GET `path` on node `id` as the admin, `None` unless 2xx.
    async fn get(&self, id: u64, path: &str) -> Option<Value> {
        let response = http()
            .get(format!("{}{path}", self.http(id)))
            .bearer_auth(&self.admin)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// Node `id`'s metadata as its API shows it: queues with their settings, exchanges
    /// with their bindings, and each queue's Raft group.
    async fn metadata(&self, id: u64) -> Option<Value> {
        let mut queues: Vec<Value> = self.get(id, "/queues?local=true").await?["queues"]
            .as_array()?
            .iter()
            .map(|q| json!([q["name"], q["settings"]]))
            .collect();
        queues.sort_by_key(|q| q[0].to_string());
        let mut exchanges = self.get(id, "/exchanges").await?["exchanges"]
            .as_array()?
            .clone();
        exchanges.sort_by_key(|x| x["name"].to_string());
        let mut groups: Vec<Value> = self.get(id, "/cluster").await?["partitions"]
            .as_array()?
            .iter()
            .map(|p| json!([p["queue"], p["partition"], p["group"]]))
            .collect();
        groups.sort_by_key(|g| g.to_string());
        Some(json!({"queues": queues, "exchanges": exchanges, "groups": groups}))
    }

    /// Node `id`'s `/metrics` (as the admin: auth is on); empty when it does not answer.
    async fn metrics(&self, id: u64) -> String {
        let response = http()
            .get(format!("{}/metrics", self.http(id)))
            .bearer_auth(&self.admin)
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => {
                response.text().await.unwrap_or_default()
            }
            _ => String::new(),
        }
    }

    /// A metric series of the metadata group on node `id` (0 when absent).
    async fn meta_metric(&self, id: u64, name: &str) -> f64 {
        self.metrics(id)
            .await
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains("group=\"0\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// A counter of node `id` without labels (0 when absent).
    async fn counter(&self, id: u64, name: &str) -> f64 {
        self.metrics(id)
            .await
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Logs `user` in at `base`; the token.
async fn login(base: &str, user: &str) -> String {
    let (status, body) = retrying(&format!("{user} logs in at {base}"), || {
        http()
            .post(format!("{base}/auth/login"))
            .json(&json!({"username": user, "password": PASSWORD}))
    })
    .await;
    assert!(status.is_success(), "login {user}: {status} {body}");
    body["token"].as_str().expect("a token").to_string()
}

async fn register(base: &str, user: &str) {
    common::cluster::register(base, user, PASSWORD).await;
}

/// Sends a request as `token` (a 503 is asked again); the status.
async fn status(token: &str, make: impl Fn() -> reqwest::RequestBuilder) -> StatusCode {
    retrying("request", || make().bearer_auth(token)).await.0
}

async fn must(token: &str, what: &str, make: impl Fn() -> reqwest::RequestBuilder) {
    let (status, body) = retrying(what, || make().bearer_auth(token)).await;
    assert!(status.is_success(), "{what}: {status} {body}");
}

/// Chunk files of the metadata group's Raft log in a node's data directory.
fn meta_log_chunks(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("raft").join("0"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("log."))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_log_is_snapshotted_purged_and_restored() {
    let mut cluster = Nodes::start().await;
    let bases: Vec<String> = (1..=3).map(|id| cluster.http(id).to_string()).collect();
    let base = |id: u64| bases[(id - 1) as usize].clone();
    for (user, at) in [("alice", 1), ("bob", 2), ("dave", 3)] {
        register(&base(at), user).await;
    }
    let alice = login(&base(1), "alice").await;

    // Many queues made and removed through every node (every fourth with a dead-letter
    // queue made with it), exchanges, bindings and a grant: far more entries than one
    // snapshot interval.
    for i in 0..24u64 {
        let at = base(i % 3 + 1);
        let settings = json!({"max_deliveries": if i % 4 == 0 { 3 } else { 0 }});
        must(&alice, &format!("create q{i}"), || {
            http().post(format!("{at}/queues/q{i}")).json(&settings)
        })
        .await;
    }
    for i in 0..16u64 {
        let at = base(i % 3 + 1);
        must(&alice, &format!("delete q{i}"), || {
            http().delete(format!("{at}/queues/q{i}"))
        })
        .await;
    }
    for (name, kind) in [("events", "fanout"), ("gone", "direct")] {
        must(&alice, &format!("create exchange {name}"), || {
            http()
                .post(format!("{}/exchanges/{name}", base(2)))
                .json(&json!({"type": kind}))
        })
        .await;
    }
    // Bound through the node that created the exchange: it applied the ownership before
    // answering; another node may not have yet, and would answer 403 for a moment.
    for queue in ["q16", "q17", "q21"] {
        must(&alice, &format!("bind {queue}"), || {
            http()
                .post(format!("{}/exchanges/events/bindings", base(2)))
                .json(&json!({"queue": queue}))
        })
        .await;
    }
    must(&alice, "delete exchange gone", || {
        http().delete(format!("{}/exchanges/gone", base(1)))
    })
    .await;
    must(&alice, "grant bob publish on q20", || {
        http()
            .post(format!("{}/queues/q20/grants", base(2)))
            .json(&json!({"user": "bob", "permissions": ["publish"]}))
    })
    .await;
    must(&alice, "publish to q23", || {
        http()
            .post(format!("{}/queues/q23/messages", base(1)))
            .body("kept")
    })
    .await;
    // The deleted queues' groups leave every node, and their series leave `/metrics` with
    // them (state is read at scrape time; counters stay); the kept queues' series stay.
    for id in 1..=3 {
        let cluster = &cluster;
        eventually(
            &format!("node {id} shows the state of kept queues only"),
            || async move {
                let text = cluster.metrics(id).await;
                let state_of = |queue: &str| {
                    let label = format!("queue=\"{queue}\"");
                    text.lines()
                        .filter(|l| !l.starts_with('#') && l.contains(&label))
                        // The series' name, before its labels (`name{labels} value`).
                        .filter(|l| !l.split(['{', ' ']).next().unwrap_or("").ends_with("_total"))
                        .filter(|l| !l.contains("_seconds"))
                        .count()
                };
                state_of("q23") > 0 && (0..16).all(|i| state_of(&format!("q{i}")) == 0)
            },
        )
        .await;
    }

    // Every node snapshots the metadata and purges its log below the snapshot: a few
    // chunks of 16 entries (a quarter of the interval, at least 16) stay, not the whole
    // history (over 100 entries by now).
    for id in 1..=3 {
        let dir = cluster.node(id).dir.clone();
        eventually(
            &format!("node {id} snapshots and purges its metadata log"),
            || {
                let dir = dir.clone();
                let cluster = &cluster;
                async move {
                    cluster.meta_metric(id, "qit_cluster_snapshot_index").await > 0.0
                        && dir.join("raft/0/purged").is_file()
                        && dir.join("raft/0/meta-snapshot").is_file()
                        && meta_log_chunks(&dir) <= 5
                }
            },
        )
        .await;
    }

    // Node 3 misses more changes than the others keep in their logs: on its return it is
    // sent the snapshot, over the metadata it had.
    let behind = cluster.meta_metric(3, "qit_cluster_last_log_index").await;
    cluster.kill(3);
    for i in 16..20u64 {
        must(&alice, &format!("delete q{i}"), || {
            http().delete(format!("{}/queues/q{i}", base(1)))
        })
        .await;
    }
    for i in 0..20u64 {
        let at = base(i % 2 + 1);
        must(&alice, &format!("create r{i}"), || {
            http()
                .post(format!("{at}/queues/r{i}"))
                .json(&json!({"max_deliveries": 0}))
        })
        .await;
    }
    register(&base(2), "erin").await;
    must(&alice, "grant dave consume on r3", || {
        http()
            .post(format!("{}/queues/r3/grants", base(1)))
            .json(&json!({"user": "dave", "permissions": ["consume"]}))
    })
    .await;
    let purged_past = behind + 2.0 * SNAPSHOT_ENTRIES as f64 + 1.0;
    // openraft starts a snapshot only when a commit finds the last one SNAPSHOT_ENTRIES
    // behind and none is being built: the writes above can end while one is built and
    // leave the latest snapshot short of the mark for good. Each check that finds it short
    // commits one more entry (a user nothing else uses).
    let padding = std::sync::atomic::AtomicU64::new(0);
    eventually("nodes 1 and 2 snapshot past what node 3 has", || async {
        let past = cluster.meta_metric(1, "qit_cluster_snapshot_index").await >= purged_past
            && cluster.meta_metric(2, "qit_cluster_snapshot_index").await >= purged_past;
        if !past {
            let n = padding.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            register(&base(2), &format!("padding{n}")).await;
        }
        past
    })
    .await;
    cluster.restart(3).await;
    // The leader is usually past its purge and sends the snapshot. openraft's leader
    // purges only entries no replication is using, though: when a send to node 3 was in
    // flight as it died, the entries stay and node 3 catches up from the log. Either way it
    // must end with the same metadata (checked below); which way it went is printed.
    eventually("node 3 catches up with the metadata log", || async {
        cluster.meta_metric(3, "qit_cluster_last_log_index").await
            >= cluster.meta_metric(1, "qit_cluster_last_log_index").await
            && cluster.meta_metric(3, "qit_cluster_last_log_index").await >= purged_past
    })
    .await;
    let installed = cluster
        .counter(3, "qit_cluster_meta_snapshots_installed_total")
        .await;
    eprintln!("node 3 caught up by {installed} metadata snapshot install(s)");

    // Node 2 restarts from its own snapshot and log; node 1 loses its data directory and
    // is replaced by one under a new id (`--replaces 1`; it may also rejoin under its old
    // one, see `cluster_membership`), sent the metadata snapshot over nothing.
    cluster.kill(2);
    cluster.restart(2).await;
    cluster.kill(1);
    std::fs::remove_dir_all(&cluster.node(1).dir).expect("wipe node 1");
    let new = cluster.replace(1).await;
    let wiped = cluster.http(new).to_string();
    cluster.admin = login(&base(2), ADMIN).await;
    // The replacement is done once node 1 left and every queue moved off it (a guard of
    // 240 s against a hang: some 30 groups move).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    loop {
        let nodes: Option<Vec<u64>> = cluster.get(new, "/cluster").await.and_then(|v| {
            let ids = v["nodes"]
                .as_array()?
                .iter()
                .filter_map(|n| n["id"].as_u64());
            Some(ids.collect())
        });
        if nodes == Some(vec![2, 3, new]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 1 not replaced: {nodes:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Every node holds the same metadata, as made.
    eventually("every node holds the same metadata", || async {
        let mut all = Vec::new();
        for id in [2, 3, new] {
            all.push(cluster.metadata(id).await);
        }
        all.iter().all(|m| m.is_some() && *m == all[0])
    })
    .await;
    let metadata = cluster
        .metadata(new)
        .await
        .expect("the new node's metadata");
    let names: Vec<&str> = metadata["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .filter_map(|q| q[0].as_str())
        .collect();
    for present in ["q20", "q21", "q22", "q23", "q0.dlq", "q20.dlq", "r0", "r19"] {
        assert!(names.contains(&present), "{present} in {names:?}");
    }
    for absent in ["q0", "q15", "q16", "q19", "q21.dlq"] {
        assert!(!names.contains(&absent), "{absent} in {names:?}");
    }
    let exchanges: Vec<&str> = metadata["exchanges"]
        .as_array()
        .expect("exchanges")
        .iter()
        .filter_map(|x| x["name"].as_str())
        .collect();
    assert_eq!(exchanges, vec!["events"]);
    let groups = metadata["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), names.len(), "one group per queue: {groups:?}");

    // Users and grants on the wiped node: everyone logs in, bob may publish to q20 only,
    // dave may consume r3; the message published before is still in q23.
    let bob = login(&wiped, "bob").await;
    let dave = login(&wiped, "dave").await;
    let erin = login(&wiped, "erin").await;
    let publish = |queue: &'static str| {
        let url = format!("{}/queues/{queue}/messages", wiped);
        move || http().post(&url).body("from bob")
    };
    assert!(status(&bob, publish("q20")).await.is_success());
    assert_eq!(status(&bob, publish("q21")).await, StatusCode::FORBIDDEN);
    let receive = format!("{}/queues/r3/messages?max=1", wiped);
    assert!(status(&dave, || http().get(&receive)).await.is_success());
    // `/cluster` shows each user the partitions of the queues they may see, as
    // `GET /queues` does: dave only r3's (a grant), bob only q20's, erin none.
    for (token, shown) in [(&dave, vec!["r3"]), (&bob, vec!["q20"]), (&erin, vec![])] {
        let url = format!("{wiped}/cluster");
        let (status, view) = retrying("GET /cluster", || http().get(&url).bearer_auth(token)).await;
        assert!(status.is_success(), "{status} {view}");
        let mut queues: Vec<&str> = view["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .filter_map(|p| p["queue"].as_str())
            .collect();
        queues.dedup();
        assert_eq!(queues, shown, "{view}");
        assert_eq!(view["nodes"].as_array().map(Vec::len), Some(3), "{view}");
    }
    let log = format!("{}/queues/q23/log?partition=0&from=0&max=10", wiped);
    let bodies = retrying("read q23", || http().get(&log).bearer_auth(&alice))
        .await
        .1;
    assert_eq!(bodies["messages"][0]["body"], "kept", "{bodies}");
}

/// A create whose answer was lost and that committed after it leaves what it made owned
/// by its creator: the metadata leader, cut off from both followers (SIGSTOP), answers 503
/// when its commit wait ends, and the entry commits once one follower is back (only the
/// leader, which holds it, can then be elected). Sent again, the create answers 200, and
/// the creator may delete the queue, its dead-letter queue and the exchange. While the
/// owner was recorded by a second entry after the create's answer, the create sent again
/// found them without owner, and the delete was refused (403).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_commits_after_its_answer_is_owned_by_its_creator() {
    let cluster = Nodes::start().await;
    register(cluster.http(1), "alice").await;
    let alice = login(cluster.http(1), "alice").await;
    let creates = [
        ("/queues/lost", json!({"max_deliveries": 3})),
        ("/exchanges/lost-x", json!({"type": "fanout"})),
    ];
    for (path, body) in &creates {
        for attempt in 1.. {
            for id in 1..=3 {
                cluster.wait_serving(id).await;
            }
            let leader = common::eventually_some("a metadata leader", || async {
                cluster.get(1, "/cluster").await?["leader"].as_u64()
            })
            .await;
            let followers: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
            let at = cluster.http(leader).to_string();
            for &follower in &followers {
                cluster.node(follower).signal("STOP");
            }
            let answer = http()
                .post(format!("{at}{path}"))
                .bearer_auth(&alice)
                .json(body)
                .send()
                .await
                .expect("the leader answers");
            assert_eq!(
                answer.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{path} without a quorum"
            );
            cluster.node(followers[0]).signal("CONT");
            // A write after it: once committed, so is the create, if the leader took it
            // (the entries commit in order, and only the leader holding it can be elected).
            let marker = format!("{at}/queues/marker-{attempt}");
            assert!(
                status(&cluster.admin, || http().post(&marker))
                    .await
                    .is_success(),
                "the marker queue is made"
            );
            cluster.node(followers[1]).signal("CONT");
            if cluster.get(leader, path).await.is_some() {
                break;
            }
            // The leader's lease lapsed before the create came: it refused to propose it.
            assert!(
                attempt < 5,
                "{path}: the leader never took the create in 5 attempts"
            );
        }
        let at = cluster.http(1).to_string();
        must(&alice, &format!("{path} sent again"), || {
            http().post(format!("{at}{path}")).json(body)
        })
        .await;
    }
    for path in ["/queues/lost", "/queues/lost.dlq", "/exchanges/lost-x"] {
        // Every node applies the create (and its owner) in its own time: one was stopped.
        for id in 1..=3 {
            let url = format!("{}{path}", cluster.http(id));
            let alice = &alice;
            eventually(&format!("alice sees {path} through node {id}"), || {
                let url = url.clone();
                async move {
                    let answer = http().get(&url).bearer_auth(alice).send().await;
                    answer.is_ok_and(|a| a.status().is_success())
                }
            })
            .await;
        }
        let at = cluster.http(2).to_string();
        must(&alice, &format!("delete {path}"), || {
            http().delete(format!("{at}{path}"))
        })
        .await;
    }
}
