//! A network partition (issue 14), on three real `qit` processes: each node's cluster
//! listener is on its own loopback address, and iptables drops every packet to or from the
//! leader's address, cutting it off from the other two (its HTTP listener, on 127.0.0.1,
//! still answers the test). The cut-off node answers writes with 503 `no_leader` and
//! `Retry-After` and still serves the committed reads it holds; the majority elects a leader
//! and keeps serving; after healing, the cut-off node catches up to identical logs. Never
//! two leaders in one term, as every node's `GET /cluster` reports it throughout. And a
//! restarted node that its peers cannot reach (only new connections to its listener
//! dropped) knows it is behind and answers 503 `catching_up` rather than serve the
//! metadata of before.
//!
//! Needs root and iptables (installed by `tools/netfault.sh` when missing): without them
//! the test prints `SKIPPED: needs root/iptables` and returns.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::cluster::{
    Cluster, create_direct_exchange, create_queue, log_bodies, metadata_leader, ok, partition,
    publish, view,
};
use common::{eventually, http};
use parking_lot::Mutex;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The comment every rule of this test carries (to find leftovers by hand).
const RULE_COMMENT: &str = "qit-cluster-partition-test";

/// Makes sure iptables can be used here (installing it if needed); the reason if not.
fn iptables_ready() -> Result<(), String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/netfault.sh");
    let out = Command::new(script)
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn iptables(action: &str, direction: &str, ip: &str) -> Result<(), String> {
    let out = Command::new("iptables")
        .args(["-w", action, "INPUT", direction, ip])
        .args(["-m", "comment", "--comment", RULE_COMMENT, "-j", "DROP"])
        .output()
        .map_err(|e| format!("iptables: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// Every packet to or from one address dropped, until this is dropped (also when the test
/// fails: the rules never outlive it).
struct Cut {
    ip: String,
}

impl Cut {
    fn new(ip: &str) -> Self {
        let cut = Self { ip: ip.to_string() };
        iptables("-A", "-d", ip).expect("add the rule dropping packets to the node");
        iptables("-A", "-s", ip).expect("add the rule dropping packets from the node");
        cut
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for direction in ["-d", "-s"] {
            if let Err(error) = iptables("-D", direction, &self.ip) {
                eprintln!(
                    "removing the iptables rule {direction} {}: {error}",
                    self.ip
                );
            }
        }
    }
}

/// Loopback addresses for three nodes, distinct per test process (two runs at once do not
/// cut each other's nodes off) and per `test` (nor two tests of one run).
fn addresses(test: u8) -> [String; 3] {
    let b = std::process::id() % 250 + 1;
    [1, 2, 3].map(|n| format!("127.{}.{b}.{n}", 77 + test))
}

/// New connections to one node's cluster listener dropped (its own connections to its
/// peers, and their answers, go through), until this is dropped.
struct Inbound {
    rule: Vec<String>,
}

impl Inbound {
    fn block(node: &common::cluster::Node) -> Self {
        let rule = [
            "INPUT",
            "-p",
            "tcp",
            "-d",
            &node.cluster_ip,
            "--dport",
            &node.cluster_port.to_string(),
            "-m",
            "comment",
            "--comment",
            RULE_COMMENT,
            "-j",
            "DROP",
        ]
        .map(String::from)
        .to_vec();
        let added = Command::new("iptables")
            .args(["-w", "-A"])
            .args(&rule)
            .status()
            .expect("iptables");
        assert!(added.success(), "add the rule blocking the node's listener");
        Self { rule }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        let removed = Command::new("iptables")
            .args(["-w", "-D"])
            .args(&self.rule)
            .status();
        if !removed.is_ok_and(|s| s.success()) {
            eprintln!("removing the iptables rule {:?} failed", self.rule);
        }
    }
}

/// Every `(group, term)` → leaders reported by any node's `GET /cluster` (the metadata
/// group as `u64::MAX`).
type Claims = Arc<Mutex<BTreeMap<(u64, u64), BTreeSet<u64>>>>;

fn record(claims: &Claims, v: &Value) {
    let mut claims = claims.lock();
    if let (Some(leader), Some(term)) = (v["leader"].as_u64(), v["term"].as_u64()) {
        claims.entry((u64::MAX, term)).or_default().insert(leader);
    }
    for p in v["partitions"].as_array().into_iter().flatten() {
        if let (Some(group), Some(leader), Some(term)) = (
            p["group"].as_u64(),
            p["leader"].as_u64(),
            p["term"].as_u64(),
        ) {
            claims.entry((group, term)).or_default().insert(leader);
        }
    }
}

/// Polls every node's view until `stop`, recording the leaders they report.
fn watch_leaders(urls: Vec<String>, claims: Claims) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for url in &urls {
                if let Some(v) = view(url).await {
                    record(&claims, &v);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// One request, no retry: its status, whether it carried `Retry-After`, and its body.
async fn once(request: reqwest::RequestBuilder) -> (StatusCode, bool, Value) {
    let response = request
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the cut-off node's HTTP listener answers");
    let status = response.status();
    let retry_after = response.headers().contains_key("retry-after");
    (
        status,
        retry_after,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// `qit_cluster_follower_lag_entries` of `follower` in `group` on node `base` (-1 when
/// absent).
async fn follower_lag(base: &str, group: u64, follower: u64) -> f64 {
    let Ok(response) = http().get(format!("{base}/metrics")).send().await else {
        return -1.0;
    };
    let text = response.text().await.unwrap_or_default();
    let (group, follower) = (
        format!("group=\"{group}\""),
        format!("follower=\"{follower}\""),
    );
    text.lines()
        .filter(|l| l.starts_with("qit_cluster_follower_lag_entries{"))
        .filter(|l| l.contains(&group) && l.contains(&follower))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

fn assert_no_leader(what: &str, (status, retry_after, body): (StatusCode, bool, Value)) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {body}");
    assert_eq!(body["error"]["code"], "no_leader", "{what}: {body}");
    assert!(retry_after, "{what}: a 503 carries Retry-After");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_leader_refuses_writes_serves_reads_and_catches_up() {
    if let Err(reason) = iptables_ready() {
        println!("SKIPPED: needs root/iptables ({reason})");
        return;
    }
    let ips = addresses(0);
    let cluster = Cluster::start_at(&ips.each_ref().map(String::as_str)).await;
    let base = |id: u64| cluster.http(id).to_string();
    let claims: Claims = Arc::default();
    let watcher = watch_leaders(
        (1..=3).map(|id| format!("{}/cluster", base(id))).collect(),
        Arc::clone(&claims),
    );

    create_queue(&base(1), "p", json!({})).await;
    let before: Vec<String> = (0..20).map(|i| format!("before-{i}")).collect();
    for body in &before {
        publish(&base(1), "p", body).await;
    }
    let victim = cluster.leader_of(1, "p", None).await;
    let others: Vec<u64> = (1..=3).filter(|id| *id != victim).collect();
    eventually("every replica holds the first 20", || async {
        let mut all = true;
        for id in 1..=3 {
            all &= log_bodies(&base(id), "p", 0).await.as_ref() == Some(&before);
        }
        all
    })
    .await;

    let cut = Cut::new(&ips[(victim - 1) as usize]);

    // The majority elects a leader of its own and keeps serving writes.
    let majority = base(others[0]);
    let new_leader = cluster.leader_of(others[0], "p", Some(victim)).await;
    assert!(others.contains(&new_leader), "leader {new_leader}");
    let during: Vec<String> = (0..20).map(|i| format!("during-{i}")).collect();
    for body in &during {
        publish(&majority, "p", body).await;
    }
    create_queue(&majority, "made-during", json!({})).await;
    // The new leader reports what the cut-off follower lacks.
    let group = cluster.group_of(others[0], "p").await;
    let leader_url = base(new_leader);
    eventually("the leader reports the cut-off follower's lag", || async {
        follower_lag(&leader_url, group, victim).await > 0.0
    })
    .await;

    // The cut-off node answers writes 503 no_leader with Retry-After ...
    let url = base(victim);
    assert_no_leader(
        "publish on the cut-off node",
        once(
            http()
                .post(format!("{url}/queues/p/messages"))
                .body("minority-write"),
        )
        .await,
    );
    assert_no_leader(
        "create on the cut-off node",
        once(
            http()
                .post(format!("{url}/queues/minority"))
                .json(&json!({})),
        )
        .await,
    );
    // ... and serves the committed reads it holds.
    let info = ok("queue info on the cut-off node", || {
        http().get(format!("{url}/queues/p"))
    })
    .await;
    assert_eq!(info["name"], "p", "{info}");
    assert_eq!(log_bodies(&url, "p", 0).await, Some(before.clone()));
    let seen = view(&format!("{url}/cluster")).await.expect("its view");
    assert!(partition(&seen, "made-during").is_none(), "{seen}");

    drop(cut);

    // Healed: the cut-off node catches up, data and metadata, and serves writes again.
    let all: Vec<String> = before.iter().chain(&during).cloned().collect();
    eventually("the healed node holds the majority's log", || async {
        log_bodies(&url, "p", 0).await.as_ref() == Some(&all)
    })
    .await;
    eventually("the healed node knows the queue made meanwhile", || async {
        view(&format!("{url}/cluster"))
            .await
            .is_some_and(|v| partition(&v, "made-during").is_some())
    })
    .await;
    publish(&url, "p", "after").await;
    let mut last = all.clone();
    last.push("after".to_string());
    for id in 1..=3 {
        let u = base(id);
        eventually(&format!("node {id} holds the final log"), || async {
            log_bodies(&u, "p", 0).await.as_ref() == Some(&last)
        })
        .await;
    }

    eventually(
        "the leader reports the healed follower caught up",
        || async { follower_lag(&leader_url, group, victim).await == 0.0 },
    )
    .await;

    watcher.abort();
    let claims = claims.lock();
    assert!(!claims.is_empty());
    for ((group, term), leaders) in claims.iter() {
        assert_eq!(
            leaders.len(),
            1,
            "group {group} had leaders {leaders:?} in term {term}"
        );
    }
}

/// A node restarted after metadata changed while it was down, whose peers cannot reach it
/// (new connections to its cluster listener dropped) while it reaches them: it learns
/// from the metadata leader how far the metadata is, cannot catch up, and so answers every
/// request 503 `catching_up` with `Retry-After` (gRPC `UNAVAILABLE`) rather than serve the
/// view of before (a publish through an exchange routed by the old bindings: the new
/// queue never gets it). Once reachable, it catches up and routes by the new bindings.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_known_to_be_behind_answers_catching_up() {
    if let Err(reason) = iptables_ready() {
        println!("SKIPPED: needs root/iptables ({reason})");
        return;
    }
    let ips = addresses(1);
    let mut cluster = Cluster::start_at(&ips.each_ref().map(String::as_str)).await;
    let leader = metadata_leader(&cluster).await;
    let behind = leader % 3 + 1;
    let on = cluster.http(leader).to_string();
    let client = http();
    create_direct_exchange(&on, "routes").await;
    create_queue(&on, "old", json!({})).await;
    let bind = |queue: &'static str| json!({"queue": queue, "key": "k"});
    ok("bind old", || {
        client
            .post(format!("{on}/exchanges/routes/bindings"))
            .json(&bind("old"))
    })
    .await;
    cluster.kill(behind);
    create_queue(&on, "new", json!({})).await;
    ok("bind new", || {
        client
            .post(format!("{on}/exchanges/routes/bindings"))
            .json(&bind("new"))
    })
    .await;
    ok("unbind old", || {
        client
            .delete(format!("{on}/exchanges/routes/bindings"))
            .json(&bind("old"))
    })
    .await;

    let blocked = Inbound::block(cluster.node(behind));
    cluster.restart(behind);
    let base = cluster.http(behind).to_string();
    let publish = || {
        once(
            client
                .post(format!("{base}/exchanges/routes/messages?key=k"))
                .body("routed"),
        )
    };
    // Its first requests (sent once its port opens) wait for a confirmation that the
    // leader's answer makes impossible, then are refused.
    let addr = base.trim_start_matches("http://").to_string();
    eventually("the restarted node's port opens", || async {
        tokio::net::TcpStream::connect(&addr).await.is_ok()
    })
    .await;
    for round in 0..3 {
        let (status, retry_after, body) = publish().await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "round {round}: {body}"
        );
        assert_eq!(
            body["error"]["code"], "catching_up",
            "round {round}: {body}"
        );
        assert!(retry_after, "a 503 carries Retry-After");
    }
    let mut grpc = qit::proto::broker_client::BrokerClient::connect(cluster.node(behind).grpc())
        .await
        .expect("gRPC");
    let refused = grpc
        .get_queue(qit::proto::GetQueueRequest {
            queue: "new".into(),
        })
        .await
        .expect_err("refused while behind");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // Not serving: cut off from its peers' beats as well, it says `no_quorum` first.
    let (status, _, body) = once(client.get(format!("{base}/healthz"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    drop(blocked);
    cluster.wait_serving(behind).await;
    let (status, _, body) = publish().await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["routed"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["routed"][0]["queue"], "new", "{body}");
    let found = grpc
        .get_queue(qit::proto::GetQueueRequest {
            queue: "new".into(),
        })
        .await;
    assert!(found.is_ok(), "{found:?}");
}
