//! Living with the three-node cluster (issues 13 and 14), end to end on three real `qit`
//! processes: users, grants and ownership replicated through the metadata group, redrive
//! through the replicator, delivery counts that survive a leader's kill, leadership handed
//! off on SIGTERM and given back when the node returns, and `qit cluster status` as a
//! table. Tests wait on conditions (generous deadlines guard against hangs; they measure
//! nothing).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{
    Cluster, create_queue, create_queue_as, index_past, log_bodies, metric_sum, ok, publish,
    retrying, view, view_as,
};
use common::{eventually, http};
use parking_lot::Mutex;
use reqwest::StatusCode;
use serde_json::{Value, json};

const PASSWORD: &str = "correct-horse-battery";

/// Logs in at `base` (the node must know the user: failed logins are rate-limited); the
/// token.
async fn login(base: &str, user: &str) -> String {
    let body = ok(&format!("{user} logs in at {base}"), || {
        http()
            .post(format!("{base}/auth/login"))
            .json(&json!({"username": user, "password": PASSWORD}))
    })
    .await;
    body["token"].as_str().expect("a token").to_string()
}

/// Waits until node `base` knows the user of `token` (it verifies the token: no login is
/// tried, so no failed login counts against the user).
async fn wait_known(base: &str, token: &str) {
    let url = format!("{base}/queues");
    eventually(&format!("{base} knows the token's user"), || async {
        view_as(&url, Some(token)).await.is_some()
    })
    .await;
}

/// The status of a request with a bearer token (a 503 is asked again).
async fn status_of(make: impl Fn() -> reqwest::RequestBuilder, token: &str) -> StatusCode {
    retrying("request", || make().bearer_auth(token)).await.0
}

/// Users registered on one node log in on the others, a token from one node works on the
/// others (and after a restart), grants made on one node hold on the others, and the
/// creator of a queue or exchange owns it on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_grants_and_ownership_are_replicated() {
    let mut cluster = Cluster::start_with(3, &["--auth"]).await;
    let bases: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
    let base = |id: u64| bases[(id - 1) as usize].clone();
    for (user, at) in [("alice", 1), ("bob", 3)] {
        common::cluster::register(&base(at), user, PASSWORD).await;
    }
    // Registered on node 1, alice logs in on node 3; a token from node 1 works on node 2.
    let alice1 = login(&base(1), "alice").await;
    wait_known(&base(2), &alice1).await;
    wait_known(&base(3), &alice1).await;
    let alice3 = login(&base(3), "alice").await;
    // Taken by node 1 already: the name is taken on every node.
    let (status, _) = retrying("register again", || {
        http()
            .post(format!("{}/auth/register", base(2)))
            .json(&json!({"username": "alice", "password": PASSWORD}))
    })
    .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // alice creates a queue on node 2 and an exchange on node 1: she owns both everywhere.
    create_queue_as(
        &base(2),
        Some(&alice3),
        "jobs",
        json!({"max_deliveries": 0}),
    )
    .await;
    ok("create exchange", || {
        http()
            .post(format!("{}/exchanges/events", base(1)))
            .bearer_auth(&alice3)
            .json(&json!({"type": "fanout"}))
    })
    .await;
    let bob3 = login(&base(3), "bob").await;
    wait_known(&base(1), &bob3).await;
    let bob1 = login(&base(1), "bob").await;
    let publish = |at: u64| {
        let url = format!("{}/queues/jobs/messages", base(at));
        move || http().post(&url).body("hello")
    };
    assert_eq!(status_of(publish(1), &bob1).await, StatusCode::FORBIDDEN);
    // A grant made on node 2 holds on node 1.
    let grants = |at: u64| format!("{}/queues/jobs/grants", base(at));
    ok("grant publish", || {
        http()
            .post(grants(2))
            .bearer_auth(&alice1)
            .json(&json!({"user": "bob", "permissions": ["publish"]}))
    })
    .await;
    let publish_on_1 = publish(1);
    eventually("bob may publish on node 1", || async {
        status_of(&publish_on_1, &bob1).await.is_success()
    })
    .await;
    // alice owns `jobs` on node 3 (she manages its grants there), bob does not.
    eventually("alice manages her queue on node 3", || async {
        retrying("alice grants on node 3", || {
            http()
                .post(grants(3))
                .bearer_auth(&alice1)
                .json(&json!({"user": "bob", "permissions": ["publish", "consume"]}))
        })
        .await
        .0
        .is_success()
    })
    .await;
    let (status, _) = retrying("bob grants", || {
        http()
            .post(grants(3))
            .bearer_auth(&bob1)
            .json(&json!({"user": "bob", "permissions": ["consume"]}))
    })
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Exchange ownership: alice binds on node 3, bob may not.
    let bind = |token: &str| {
        let url = format!("{}/exchanges/events/bindings", base(3));
        let token = token.to_string();
        move || {
            http()
                .post(&url)
                .bearer_auth(&token)
                .json(&json!({"queue": "jobs"}))
        }
    };
    let alice_binds = bind(&alice1);
    eventually("alice manages her exchange on node 3", || async {
        retrying("alice binds", &alice_binds).await.0.is_success()
    })
    .await;
    assert_eq!(
        retrying("bob binds", bind(&bob1)).await.0,
        StatusCode::FORBIDDEN
    );

    // Revoked on node 1: bob's publish on node 2 is refused again.
    ok("revoke", || {
        http()
            .post(grants(1))
            .bearer_auth(&alice1)
            .json(&json!({"user": "bob", "permissions": []}))
    })
    .await;
    let publish_on_2 = publish(2);
    eventually("the revoke holds on node 2", || async {
        status_of(&publish_on_2, &bob1).await == StatusCode::FORBIDDEN
    })
    .await;

    // A node killed and restarted rebuilds users and grants from the metadata log, and
    // verifies the tokens it issued before (the signing key is derived from the cluster
    // secret, the same on every node and after a restart).
    cluster.node_mut(3).kill();
    cluster.restart(3);
    cluster.wait_serving(3).await;
    let jobs3 = format!("{}/queues/jobs", base(3));
    eventually("node 3 knows alice's token and queue again", || async {
        view_as(&jobs3, Some(&alice3)).await.is_some()
    })
    .await;
    let publish_on_3 = publish(3);
    eventually("the revoke holds on the restarted node", || async {
        status_of(&publish_on_3, &bob1).await == StatusCode::FORBIDDEN
    })
    .await;
    assert!(status_of(publish(3), &alice3).await.is_success());
}

/// Receives up to `max` messages of `queue` at `base` (leases of 30 s).
async fn receive(base: &str, queue: &str, max: usize) -> Vec<Value> {
    let body = ok("receive", || {
        http().get(format!(
            "{base}/queues/{queue}/messages?max={max}&wait=1&visibility=30"
        ))
    })
    .await;
    body["messages"].as_array().cloned().unwrap_or_default()
}

/// The backlog of `queue`'s default group in node `base`'s own copy.
async fn backlog(base: &str, queue: &str) -> Option<u64> {
    let v = view(&format!("{base}/queues/{queue}?local=true")).await?;
    v["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == "default")?["backlog"]
        .as_u64()
}

/// Redrive in a cluster: the dead letters go back into the queue exactly once, as
/// replicated publishes, and are acked in the dead-letter queue on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_moves_dead_letters_back_once() {
    let cluster = Cluster::start().await;
    let base = |id: u64| cluster.node(id).http.clone();
    create_queue_as(
        &base(1),
        None,
        "jobs",
        json!({"partitions": 1, "max_deliveries": 1}),
    )
    .await;
    let sent: BTreeSet<String> = (0..5).map(|i| format!("job-{i}")).collect();
    for body in &sent {
        ok("publish", || {
            http()
                .post(format!("{}/queues/jobs/messages", base(2)))
                .body(body.clone())
        })
        .await;
    }
    // One delivery each, nacked: out of deliveries, they go to `jobs.dlq`.
    let mut nacked = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while nacked < 5 {
        assert!(Instant::now() < deadline, "only {nacked} of 5 delivered");
        for m in receive(&base(3), "jobs", 10).await {
            let id = m["id"].as_str().unwrap().to_string();
            ok("nack", || {
                http().post(format!(
                    "{}/queues/jobs/messages/{id}/nack?delay=0",
                    base(3)
                ))
            })
            .await;
            nacked += 1;
        }
    }
    for id in 1..=3 {
        let b = base(id);
        eventually(&format!("node {id} holds the 5 dead letters"), || async {
            log_bodies(&b, "jobs.dlq", 0).await.map(|l| l.len()) == Some(5)
                && backlog(&b, "jobs").await == Some(0)
        })
        .await;
    }
    let moved = ok("redrive", || {
        http()
            .post(format!("{}/queues/jobs/redrive", base(2)))
            .json(&json!({}))
    })
    .await;
    assert_eq!(moved["moved"], 5, "{moved}");
    for id in 1..=3 {
        let b = base(id);
        eventually(&format!("node {id} holds the moves"), || async {
            log_bodies(&b, "jobs", 0).await.map(|l| l.len()) == Some(10)
                && backlog(&b, "jobs.dlq").await == Some(0)
                && backlog(&b, "jobs").await == Some(5)
        })
        .await;
    }
    let log = log_bodies(&base(1), "jobs", 0).await.unwrap();
    let redriven: Vec<String> = log[5..].to_vec();
    assert_eq!(
        redriven.iter().cloned().collect::<BTreeSet<_>>(),
        sent,
        "each dead letter once: {redriven:?}"
    );
    let mut delivered = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.len() < 5 {
        assert!(Instant::now() < deadline, "only {delivered:?} delivered");
        for m in receive(&base(1), "jobs", 10).await {
            assert_eq!(
                m["delivery_count"], 1,
                "a redriven message starts counting again"
            );
            delivered.push(m["body"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(delivered.iter().cloned().collect::<BTreeSet<_>>(), sent);
    assert_eq!(delivered.len(), 5);
    let again = ok("redrive again", || {
        http()
            .post(format!("{}/queues/jobs/redrive", base(3)))
            .json(&json!({}))
    })
    .await;
    assert_eq!(again["moved"], 0, "{again}");
}

/// The next message of `queue` received through `base` (one at a time, retried for up to
/// a minute while none comes, as across an election).
async fn next_delivery(base: &str, queue: &str) -> Value {
    let what = format!("a delivery of {queue}");
    common::eventually_some(&what, || async { receive(base, queue, 1).await.pop() }).await
}

/// Nacks `message` of `queue` through `base` at once, and waits until it is the only dead
/// letter, with `body`, in the queue's dead-letter queue.
async fn nack_into_dead_letters(base: &str, queue: &str, message: &Value, body: &str) {
    let id = message["id"].as_str().expect("an id").to_string();
    ok("nack", || {
        http().post(format!("{base}/queues/{queue}/messages/{id}/nack?delay=0"))
    })
    .await;
    eventually("the message reaches the dead-letter queue", || async {
        log_bodies(base, &format!("{queue}.dlq"), 0)
            .await
            .is_some_and(|l| l == [body])
    })
    .await;
}

/// A delivery still in flight when its queue's leader is killed counts: the receive's
/// delivery count is replicated (an entry of its own, proposed after the receive), so the
/// new leader delivers the message with count 2, and at `max_deliveries: 2` a nack then
/// dead-letters it, as a single node does across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_delivery_counts_after_a_leader_kill() {
    let mut cluster = Cluster::start().await;
    let settings = json!({"partitions": 1, "max_deliveries": 2});
    create_queue_as(&cluster.node(1).http, None, "inflight", settings).await;
    let leader = cluster.preferred_leader(1, "inflight").await;
    let leader_base = cluster.node(leader).http.clone();
    let survivor = if leader == 1 { 2 } else { 1 };
    let base = cluster.node(survivor).http.clone();
    ok("publish", || {
        http()
            .post(format!("{base}/queues/inflight/messages"))
            .body("slow")
    })
    .await;
    // openraft reports a leader's last log index before the entry can commit, so once the
    // publish is answered the leader's metric holds the publish's index.
    let published = index_past(&leader_base, "qit_cluster_last_log_index", "inflight", 0).await;
    // A lease long enough not to expire during the test (an expiry is counted anyway).
    let first = ok("receive", || {
        http().get(format!(
            "{base}/queues/inflight/messages?max=1&visibility=300"
        ))
    })
    .await;
    assert_eq!(first["messages"][0]["delivery_count"], 1, "{first}");
    // The count is committed once the survivor applied an entry after the publish: the
    // only entry proposed since is the count (the queue's leader did not change).
    index_past(&base, "qit_cluster_applied_index", "inflight", published).await;
    cluster.node_mut(leader).kill();
    let again = next_delivery(&base, "inflight").await;
    assert_eq!(
        again["delivery_count"], 2,
        "the delivery in flight at the kill counted: {again}"
    );
    nack_into_dead_letters(&base, "inflight", &again, "slow").await;
}

/// A message nacked twice, then its queue's leader killed: the new leader delivers it with
/// count 3 and dead-letters it at `max_deliveries: 3`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_counts_survive_a_leader_kill() {
    let mut cluster = Cluster::start().await;
    create_queue_as(
        &cluster.node(1).http,
        None,
        "poison",
        json!({"partitions": 1, "max_deliveries": 3}),
    )
    .await;
    let leader = cluster.leader_of(1, "poison", None).await;
    let survivor = if leader == 1 { 2 } else { 1 };
    let base = cluster.node(survivor).http.clone();
    ok("publish", || {
        http()
            .post(format!("{base}/queues/poison/messages"))
            .body("bad")
    })
    .await;
    for count in 1..=2 {
        let m = next_delivery(&base, "poison").await;
        assert_eq!(m["delivery_count"], count);
        let id = m["id"].as_str().unwrap().to_string();
        ok("nack", || {
            http().post(format!("{base}/queues/poison/messages/{id}/nack?delay=0"))
        })
        .await;
    }
    cluster.node_mut(leader).kill();
    // The dead-letter queue has its own group: let it have a live leader too, so that the
    // move below does not meet an election (a failed move offers the message again).
    eventually("both groups have a live leader", || async {
        leaders(&base).await.is_some_and(|l| {
            ["poison", "poison.dlq"].iter().all(|q| {
                l.get(*q)
                    .is_some_and(|(lead, _)| lead.is_some_and(|n| n != leader))
            })
        })
    })
    .await;
    let m = next_delivery(&base, "poison").await;
    assert_eq!(
        m["delivery_count"], 3,
        "the new leader goes on counting: {m}"
    );
    nack_into_dead_letters(&base, "poison", &m, "bad").await;
    let letters = view(&format!(
        "{base}/queues/poison.dlq/log?partition=0&from=0&max=10"
    ))
    .await
    .unwrap();
    assert_eq!(
        letters["messages"][0]["headers"]["qit-delivery-count"], "3",
        "{letters}"
    );
    eventually("the queue is done with it", || async {
        backlog(&base, "poison").await == Some(0)
    })
    .await;
}

/// The queues each node leads, by `/cluster` of node `via`: queue -> (leader, preferred).
async fn leaders(base: &str) -> Option<BTreeMap<String, (Option<u64>, u64)>> {
    let v = view(&format!("{base}/cluster")).await?;
    Some(
        v["partitions"]
            .as_array()?
            .iter()
            .filter_map(|p| {
                Some((
                    p["queue"].as_str()?.to_string(),
                    (p["leader"].as_u64(), p["replicas"][0].as_u64()?),
                ))
            })
            .collect(),
    )
}

/// Preferred leaders per node among `placed` (queue -> (leader, preferred)), every node
/// of 1..=3 counted.
fn preferences(placed: &BTreeMap<String, (Option<u64>, u64)>) -> BTreeMap<u64, usize> {
    let mut led: BTreeMap<u64, usize> = (1..=3).map(|id| (id, 0)).collect();
    for (_, preferred) in placed.values() {
        *led.entry(*preferred).or_default() += 1;
    }
    led
}

/// Deleting queues leaves preferences uneven (six queues 2/2/2, then node 3's two deleted:
/// 2/2/0); the metadata leader moves one preference to node 3 and the queue's leadership
/// follows, so that every node leads its share again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferences_even_out_after_deletes() {
    let cluster = Cluster::start().await;
    let base = cluster.node(1).http.clone();
    for i in 0..6 {
        let queue = format!("q{i}");
        create_queue(&base, &queue, json!({"partitions": 1, "max_deliveries": 0})).await;
        cluster.leader_of(1, &queue, None).await;
    }
    let placed = leaders(&base).await.unwrap();
    assert_eq!(
        preferences(&placed).values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{placed:?}"
    );
    for (queue, _) in placed.iter().filter(|(_, (_, preferred))| *preferred == 3) {
        let deleted = http()
            .delete(format!("{base}/queues/{queue}"))
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), StatusCode::NO_CONTENT, "deleting {queue}");
    }
    eventually("preferences even out and leaders follow", || async {
        leaders(&base).await.is_some_and(|l| {
            let led = preferences(&l);
            let (most, least) = (led.values().max(), led.values().min());
            l.len() == 4
                && most.zip(least).is_some_and(|(m, n)| m - n <= 1)
                && l.values()
                    .all(|(lead, preferred)| *lead == Some(*preferred))
        })
    })
    .await;
}

/// SIGTERM on a node leading queues under a light publish load: it hands its groups to the
/// others first, no publish gets an error other than a retried 503, and it stops cleanly.
/// Once it is back, the queues it is the preferred leader of move back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_off_and_leadership_returns() {
    // The stop's drain deadline is raised from 5 s so that only a drain that never ends
    // (what the log check below catches) meets it, not a node slowed by a busy machine.
    let mut cluster = Cluster::start_with_config("drain_timeout_secs = 25").await;
    let queues: Vec<String> = (0..6).map(|i| format!("q{i}")).collect();
    for q in &queues {
        create_queue_as(
            &cluster.node(1).http,
            None,
            q,
            json!({"partitions": 1, "max_deliveries": 0}),
        )
        .await;
        cluster.leader_of(1, q, None).await;
    }
    // Wait until placement holds: every queue led by its preferred replica.
    let base1 = cluster.node(1).http.clone();
    eventually("every queue is led by its preferred leader", || async {
        leaders(&base1)
            .await
            .is_some_and(|l| l.len() == 6 && l.values().all(|(lead, pref)| *lead == Some(*pref)))
    })
    .await;
    let placed = leaders(&base1).await.unwrap();
    let mut led: BTreeMap<u64, usize> = BTreeMap::new();
    for (lead, _) in placed.values() {
        *led.entry(lead.unwrap()).or_default() += 1;
    }
    // Placement counts the leaders it has given out: six queues, two on each node
    // (hashing alone put q0..q5 4/2/0).
    assert_eq!(
        led.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "preferred leaders spread evenly: {placed:?}"
    );
    let (&stopping, &groups) = led.iter().max_by_key(|(_, n)| **n).unwrap();
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != stopping).collect();
    let survivor_bases: Vec<String> = survivors
        .iter()
        .map(|id| cluster.node(*id).http.clone())
        .collect();

    // A light publish load through the survivors, into every queue.
    let stop = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let published = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, errors, published) = (
            Arc::clone(&stop),
            Arc::clone(&errors),
            Arc::clone(&published),
        );
        let (bases, queues) = (survivor_bases.clone(), queues.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let (base, queue) = (&bases[i % bases.len()], &queues[i % queues.len()]);
                let (status, body) = retrying("publish", || {
                    http()
                        .post(format!("{base}/queues/{queue}/messages"))
                        .body(format!("m-{i}"))
                })
                .await;
                if status.is_success() {
                    published.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors
                        .lock()
                        .push(format!("{queue} via {base}: {status} {body}"));
                }
                i += 1;
            }
        })
    };
    let before = published.load(Ordering::Relaxed);
    eventually("the load makes progress", || async {
        published.load(Ordering::Relaxed) >= before + 20
    })
    .await;
    let requested = metric_sum(&survivor_bases, "qit_cluster_elections_requested_total").await;
    let status = cluster.node_mut(stopping).terminate();
    assert!(
        status.success(),
        "node {stopping} stopped cleanly: {status:?}"
    );
    // Nothing was left running or cut off at its stop: its peers' append streams (it
    // follows the other queues) did not hold the cluster listener open.
    let log = cluster.node(stopping).log();
    assert!(
        !log.contains("did not end in time") && !log.contains("did not drain in time"),
        "node {stopping} stopped without waiting out a deadline: {log}"
    );
    let asked = metric_sum(&survivor_bases, "qit_cluster_elections_requested_total").await;
    assert!(
        asked >= requested + groups as f64,
        "node {stopping} asked the others to take its {groups} queues (campaigns {requested} -> {asked})"
    );
    let after_stop = published.load(Ordering::Relaxed);
    eventually("the load goes on without the stopped node", || async {
        published.load(Ordering::Relaxed) >= after_stop + 20
    })
    .await;

    // Back: its preferred queues return to it once it caught up.
    cluster.restart(stopping);
    cluster.wait_serving(stopping).await;
    let survivor = survivor_bases[0].clone();
    eventually("leadership returns to the restarted node", || async {
        leaders(&survivor)
            .await
            .is_some_and(|l| l.values().all(|(lead, pref)| *lead == Some(*pref)))
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        errors.lock().is_empty(),
        "client-visible errors: {:?}",
        errors.lock()
    );

    // `qit cluster status` draws the table: every node up, leaders and lag per partition.
    let out = Command::new(env!("CARGO_BIN_EXE_qit"))
        .args([
            "cluster",
            "--server",
            &cluster.node(stopping).http,
            "status",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(table.contains("NODE") && table.contains("LAG"), "{table}");
    for id in 1..=3u64 {
        assert!(
            table.lines().any(|l| l
                .split_whitespace()
                .take(2)
                .eq([id.to_string().as_str(), "up"])),
            "node {id} up in:\n{table}"
        );
    }
    for q in &queues {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{q}/0 ")))
            .unwrap_or_else(|| panic!("{q} in:\n{table}"));
        let lag = row.split_whitespace().last().unwrap();
        assert!(
            lag.parse::<u64>().is_ok(),
            "the leader reports {q}'s lag: {row}"
        );
    }
}

/// The partitions of `queue` in a `GET /cluster` view.
fn partitions_of(view: &Value, queue: &str) -> Vec<Value> {
    view["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["queue"] == queue)
        .cloned()
        .collect()
}

/// `GET /cluster` on a node that holds no replica of a queue names the queue's leader and
/// term as the replicas do (from the leaders' beats), not null, and its committed offsets
/// (asked of the replicas), not its own empty copy's; once that leader is down (and the
/// other of two replicas cannot elect alone), it names none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_replica_names_the_leader() {
    let mut cluster = Cluster::start().await;
    create_queue(
        cluster.http(1),
        "pair",
        json!({"replicas": 2, "partitions": 2}),
    )
    .await;
    let urls: Vec<String> = (1..=3)
        .map(|id| format!("{}/cluster", cluster.http(id)))
        .collect();
    let url = |id: u64| urls[(id - 1) as usize].clone();
    let replicas: Vec<u64> =
        common::eventually_some("node 1 knows the queue's replicas", || async {
            let v = view(&url(1)).await?;
            let first = partitions_of(&v, "pair").into_iter().next()?;
            serde_json::from_value(first["replicas"].clone()).ok()
        })
        .await;
    assert_eq!(replicas.len(), 2, "the queue is placed on two nodes");
    let outsider = (1..=3).find(|id| !replicas.contains(id)).unwrap();
    let leader = cluster.leader_of(replicas[0], "pair", None).await;
    for i in 0..6 {
        publish(cluster.http(outsider), "pair", &format!("m{i}")).await;
    }
    // The queue group's leader holds a follower's copy of a partition another node leads:
    // it shows a publish once it learns of its commit, a moment after the answer.
    let at_leader = common::eventually_some("the leader's view holds every publish", || async {
        let parts = partitions_of(&view(&url(leader)).await?, "pair");
        let total: u64 = parts
            .iter()
            .filter_map(|p| p["committed_offset"].as_u64())
            .sum();
        (total == 6).then_some(parts)
    })
    .await;
    // Each partition's leader, term and committed offset.
    let state = |parts: &[Value]| -> Vec<(Value, Value, Value)> {
        parts
            .iter()
            .map(|p| {
                (
                    p["leader"].clone(),
                    p["term"].clone(),
                    p["committed_offset"].clone(),
                )
            })
            .collect()
    };
    let led = state(&at_leader);
    let total: u64 = led.iter().filter_map(|(_, _, o)| o.as_u64()).sum();
    assert_eq!(total, 6, "{at_leader:?}");
    assert!(led.iter().all(|(l, _, _)| l.is_u64()), "{at_leader:?}");
    // Its leaders, terms and committed offsets are the leaders' own.
    eventually("the node without a replica names the leaders", || async {
        view(&url(outsider)).await.is_some_and(|v| {
            let parts = partitions_of(&v, "pair");
            parts.len() == 2 && state(&parts) == led
        })
    })
    .await;
    cluster.kill(leader);
    eventually("with the leader down it names none", || async {
        view(&url(outsider)).await.is_some_and(|v| {
            let parts = partitions_of(&v, "pair");
            parts.len() == 2 && parts.iter().all(|p| p["leader"].is_null())
        })
    })
    .await;
}
