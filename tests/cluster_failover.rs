//! Elections converge when the replica first in turn has the shorter log (issue 13, the
//! failover stall): openraft refuses such a candidate's vote request without moving the
//! refusing node's term, so if the behind replica kept going first, every candidacy of the
//! up-to-date one would land in a term the behind one had already taken. The liveness loop
//! leaves the election to the replica whose log is ahead. Three `qit` processes on
//! loopback; every wait is on a condition (deadlines only guard against hangs). The
//! decision itself is unit-tested in `src/cluster/liveness.rs`.

mod common;

use common::cluster::{Cluster, create_queue, log_bodies, partition, publish, receive, view};
use common::eventually;
use qit::proto::broker_client::BrokerClient;
use qit::proto::{self, receive_request, receive_response};
use serde_json::json;
use tokio_stream::StreamExt;

/// The leader of a queue is killed while the survivor first in turn after it has missed
/// the last publishes (it was down and restarts right after the kill): the other survivor,
/// which has them all, leads, and every acknowledged publish is on both survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_with_the_longer_log_is_elected() {
    let mut cluster = Cluster::start().await;
    create_queue(cluster.http(1), "f", json!({"partitions": 1})).await;
    let leader = cluster.leader_of(1, "f", None).await;
    let placement: Vec<u64> = {
        let url = format!("{}/cluster", cluster.http(leader));
        let v = view(&url).await.expect("the leader's view");
        partition(&v, "f").expect("partition of f")["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .filter_map(|r| r.as_u64())
            .collect()
    };
    let survivors: Vec<u64> = placement.into_iter().filter(|n| *n != leader).collect();
    let [behind, ahead] = survivors[..] else {
        panic!("three replicas expected: {survivors:?}");
    };

    // `behind` is first in turn after the leader; it misses the last publishes.
    publish(cluster.http(ahead), "f", "first").await;
    cluster.kill(behind);
    let mut acked = vec!["first".to_string()];
    for i in 0..5 {
        let body = format!("while {behind} is down {i}");
        publish(cluster.http(ahead), "f", &body).await;
        acked.push(body);
    }
    cluster.kill(leader);
    cluster.restart(behind);

    // A publish through the replica that was behind is answered: a leader was elected.
    publish(cluster.http(behind), "f", "after").await;
    acked.push("after".to_string());
    assert_eq!(
        cluster.leader_of(behind, "f", Some(leader)).await,
        ahead,
        "only the survivor with every entry can lead"
    );
    for node in [behind, ahead] {
        holds_all(&cluster, node, "f", &acked).await;
    }
}

/// Waits until node `node` holds every one of `acked` in partition 0 of `queue`.
async fn holds_all(cluster: &Cluster, node: u64, queue: &str, acked: &[String]) {
    let base = cluster.http(node).to_string();
    eventually(
        &format!("node {node} holds every acknowledged publish"),
        || {
            let base = base.clone();
            async move {
                log_bodies(&base, queue, 0)
                    .await
                    .is_some_and(|bodies| acked.iter().all(|b| bodies.contains(b)))
            }
        },
    )
    .await;
}

/// A queue group's replicas other than its first leader cast their vote for it but never
/// received its first entry, and it dies for good (the state a group was left in when its
/// preferred leader won its first election and died at once; openraft refuses to
/// initialize a node that has voted, so such a group stayed without a leader). Every
/// replica now writes the group's initial membership itself when the queue is created:
/// the two survivors, restarted with their votes and empty group logs, elect one of them
/// and take publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_that_voted_for_a_dead_first_leader_elect_one_of_them() {
    let mut cluster = Cluster::start().await;
    create_queue(cluster.http(1), "v", json!({"partitions": 1})).await;
    let first = cluster.leader_of(1, "v", None).await;
    let group = cluster.group_of(1, "v").await;
    let survivors: Vec<u64> = (1..=3).filter(|n| *n != first).collect();
    // Every node has opened the group and heard a leader.
    for id in 1..=3 {
        cluster.leader_of(id, "v", None).await;
    }
    for id in 1..=3 {
        cluster.kill(id);
    }

    // Each survivor keeps a vote (its own, or the other's where it never wrote one: a
    // follower that only received the leader's entries) and nothing else of the group.
    let dir = |id: u64| {
        cluster
            .root()
            .join(format!("node-{id}"))
            .join("raft")
            .join(group.to_string())
    };
    let votes: Vec<Option<Vec<u8>>> = survivors
        .iter()
        .map(|&id| std::fs::read(dir(id).join("vote")).ok())
        .collect();
    let any_vote = votes
        .iter()
        .flatten()
        .next()
        .unwrap_or_else(|| panic!("a survivor holds a vote in group {group}"))
        .clone();
    for (&id, vote) in survivors.iter().zip(votes) {
        let dir = dir(id);
        std::fs::remove_dir_all(&dir).expect("remove the group's log");
        std::fs::create_dir_all(&dir).expect("recreate the group's dir");
        std::fs::write(dir.join("vote"), vote.unwrap_or_else(|| any_vote.clone()))
            .expect("put the vote back");
    }
    for &id in &survivors {
        cluster.restart(id);
    }
    for &id in &survivors {
        cluster.wait_serving(id).await;
    }

    publish(cluster.http(survivors[0]), "v", "after").await;
    let leader = cluster.leader_of(survivors[1], "v", Some(first)).await;
    assert!(survivors.contains(&leader), "leader {leader} is a survivor");
    let got = receive(cluster.http(survivors[1]), "v", 10).await;
    let bodies: Vec<&str> = got.iter().filter_map(|m| m["body"].as_str()).collect();
    assert_eq!(bodies, ["after"]);
}

/// The term of `queue`'s group as node `base` knows it.
async fn term(base: &str, queue: &str) -> Option<u64> {
    let v = view(&format!("{base}/cluster")).await?;
    partition(&v, queue)?["term"].as_u64()
}

/// A replica loses its copy of one queue's group (that group's directory only; the rest of
/// the node is intact) after it helped commit publishes the third replica never saw. It
/// must not vote until it has caught up: its blank log granted its vote to the replica
/// that lacked the publishes, which then led, and acknowledged publishes were gone from
/// every node (found by the cluster fault helper, 2 of 2). Now the group waits without a
/// leader until the replica holding them returns, and every node ends up with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_a_groups_log_does_not_vote_until_caught_up() {
    let mut cluster = Cluster::start().await;
    create_queue(cluster.http(1), "amn", json!({"partitions": 1})).await;
    let leader = cluster.leader_of(1, "amn", None).await;
    let group = cluster.group_of(1, "amn").await;
    for id in 1..=3 {
        cluster.leader_of(id, "amn", None).await;
    }
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let [behind, forgetful] = others[..] else {
        panic!("three replicas expected");
    };

    // `behind` misses 20 publishes; `forgetful` helps commit them, then loses the group.
    cluster.kill(behind);
    let acked: Vec<String> = (0..20).map(|i| format!("acked {i}")).collect();
    for body in &acked {
        publish(cluster.http(leader), "amn", body).await;
    }
    cluster.kill(forgetful);
    lose_group_log(&cluster, forgetful, group);
    let old_term = term(cluster.http(leader), "amn").await.expect("a term");
    cluster.kill(leader);
    cluster.restart(forgetful);
    cluster.restart(behind);
    cluster.wait_serving(behind).await;
    cluster.wait_serving(forgetful).await;

    // Both have the group open; `behind` campaigns twice more after that, and its vote
    // requests reach `forgetful`, which refuses them: no leader, no publish.
    for id in [behind, forgetful] {
        let base = cluster.http(id).to_string();
        eventually(&format!("node {id} has the group open"), || {
            let base = base.clone();
            async move { term(&base, "amn").await.is_some() }
        })
        .await;
    }
    let base = cluster.http(behind).to_string();
    let seen = term(&base, "amn").await.unwrap_or(old_term).max(old_term);
    eventually(
        "the survivor behind campaigns twice (or is elected)",
        || {
            let base = base.clone();
            async move {
                let elected = view(&format!("{base}/cluster"))
                    .await
                    .is_some_and(|v| partition(&v, "amn").is_some_and(|p| p["leader"].is_u64()));
                elected || term(&base, "amn").await.is_some_and(|t| t >= seen + 2)
            }
        },
    )
    .await;
    let answer = common::http()
        .post(format!("{base}/queues/amn/messages"))
        .body("while leaderless")
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .expect("an answer");
    assert_eq!(
        answer.status(),
        reqwest::StatusCode::SERVICE_UNAVAILABLE,
        "no leader may be elected without the replica that holds the publishes"
    );

    // The replica holding them returns: it leads, and every node holds every publish.
    cluster.restart(leader);
    publish(cluster.http(forgetful), "amn", "after").await;
    let mut want = acked.clone();
    want.push("after".to_string());
    for node in 1..=3 {
        holds_all(&cluster, node, "amn", &want).await;
    }
}

/// A long-poll receive through a follower goes on at the next leader when the leader it
/// waits at is killed, and gets the message published after the failover. It was answered
/// 503 `no_leader` at once ("node N: transport error"; found by the cluster fault helper,
/// 3 of 3), as if the group had no leader for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_through_a_follower_outlives_the_leader() {
    let mut cluster = Cluster::start().await;
    create_queue(cluster.http(1), "lp", json!({"partitions": 1})).await;
    let leader = cluster.leader_of(1, "lp", None).await;
    for id in 1..=3 {
        cluster.leader_of(id, "lp", None).await;
    }
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let [via, publisher] = others[..] else {
        panic!("three replicas expected");
    };
    let base = cluster.http(via).to_string();
    let poll = tokio::spawn(async move {
        let response = common::http()
            .get(format!("{base}/queues/lp/messages?wait=30"))
            .timeout(std::time::Duration::from_secs(60))
            .send()
            .await
            .expect("an answer");
        let status = response.status();
        (
            status,
            response
                .json::<serde_json::Value>()
                .await
                .unwrap_or_default(),
        )
    });
    let via_base = cluster.http(via).to_string();
    eventually("the long-poll waits", || {
        let via_base = via_base.clone();
        async move { common::cluster::metric(&via_base, "qit_long_poll_waiters").await >= 1.0 }
    })
    .await;
    cluster.kill(leader);
    publish(cluster.http(publisher), "lp", "after the failover").await;
    let (status, body) = poll.await.expect("the long-poll task");
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let bodies: Vec<&str> = body["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["body"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(bodies, ["after the failover"], "{body}");
}

/// A message whose one allowed delivery was under way when its leader was killed is
/// dead-lettered by the next leader, never delivered a second time: the new leader has
/// the count its predecessor replicated, not the lease that died with it, and a delivery
/// cut off that way failed (as at a single node's restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_used_up_its_count_is_dead_lettered_after_a_leader_kill() {
    use common::cluster::{index_past, labeled_metric, ok};
    use qit::cluster::view::{APPLIED_INDEX, LAST_LOG_INDEX};
    let mut cluster = Cluster::start().await;
    create_queue(
        cluster.http(1),
        "once",
        json!({"partitions": 1, "max_deliveries": 1}),
    )
    .await;
    let leader = cluster.leader_of(1, "once", None).await;
    publish(cluster.http(leader), "once", "only-once").await;
    let label = "queue=\"once\"";
    let before = labeled_metric(cluster.http(leader), LAST_LOG_INDEX, label)
        .await
        .expect("the leader's log index") as u64;
    let lease = |base: String| {
        move || common::http().get(format!("{base}/queues/once/messages?wait=1&visibility=60"))
    };
    let leased = ok("receive", lease(cluster.http(leader).to_string())).await;
    assert_eq!(leased["messages"][0]["delivery_count"], 1, "{leased}");
    // The delivery's count goes to the replicas after the receive answers: wait for the
    // leader's entry of it, and for both others to apply it.
    let counted = index_past(cluster.http(leader), LAST_LOG_INDEX, "once", before).await;
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    for id in &others {
        index_past(cluster.http(*id), APPLIED_INDEX, "once", counted - 1).await;
    }
    cluster.kill(leader);
    let survivor = cluster.http(others[0]).to_string();
    let dead_letters = format!("{survivor}/queues/once.dlq/log?max=10");
    eventually("the new leader dead-letters the message", || async {
        let again = ok("receive", lease(survivor.clone())).await;
        assert_eq!(
            again["messages"].as_array().map(Vec::len),
            Some(0),
            "delivered again beyond max_deliveries: {again}"
        );
        view(&dead_letters).await.is_some_and(|log| {
            log["messages"][0]["body"] == "only-once"
                && log["messages"][0]["headers"]["qit-dead-letter-reason"] == "expired"
        })
    })
    .await;
}

/// A one-replica queue whose node lost the group's log has no other replica to catch up
/// from: the group starts empty and serves again rather than wait for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_single_replica_group_starts_empty() {
    let mut cluster = Cluster::start().await;
    create_queue(
        cluster.http(1),
        "solo",
        json!({"partitions": 1, "replicas": 1}),
    )
    .await;
    let group = cluster.group_of(1, "solo").await;
    let holder = {
        let v = view(&format!("{}/cluster", cluster.http(1)))
            .await
            .expect("a view");
        partition(&v, "solo").expect("solo")["replicas"][0]
            .as_u64()
            .expect("its replica")
    };
    publish(cluster.http(holder), "solo", "before").await;
    cluster.kill(holder);
    lose_group_log(&cluster, holder, group);
    cluster.restart(holder);
    cluster.wait_serving(holder).await;
    publish(cluster.http(holder), "solo", "after").await;
    assert_eq!(
        log_bodies(cluster.http(holder), "solo", 0).await,
        Some(vec!["after".to_string()])
    );
}

/// Deletes group `group`'s Raft log directory on (stopped) node `node`, as an operator's
/// mistake or a damaged disk would, leaving the rest of its data directory.
fn lose_group_log(cluster: &Cluster, node: u64, group: u64) {
    let dir = cluster
        .root()
        .join(format!("node-{node}"))
        .join("raft")
        .join(group.to_string());
    std::fs::remove_dir_all(&dir).expect("remove the group's log");
}

/// `qit bench` goes on when the leader of its queue is killed under it and comes back (the
/// contract: "qit's own CLI and bench retry"), over gRPC: unary publishes answered
/// `UNAVAILABLE` are sent again, and a consumer whose `ReceiveMessages` stream ends in
/// `UNAVAILABLE` opens another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qit_bench_over_grpc_goes_on_when_the_leader_is_killed() {
    bench_through_a_leader_kill(&["--mode", "unary"]).await;
}

/// As [`qit_bench_over_grpc_goes_on_when_the_leader_is_killed`], over HTTP. Here the node
/// that forwards follows the leader itself (this run passed without the bench's retry of
/// 503, which `bench::tests` covers): it guards the HTTP side of any-node serving under
/// two changes of leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qit_bench_over_http_goes_on_when_the_leader_is_killed() {
    bench_through_a_leader_kill(&["--http"]).await;
}

/// Runs `qit bench` (with `mode` flags) through a node that does not lead its queue,
/// rate-limited to last about 12 s; kills the queue's leader once messages are in the
/// queue, restarts it, and lets it take the queue back as its preferred leader. The bench
/// must end with every message published and consumed.
async fn bench_through_a_leader_kill(mode: &[&str]) {
    let mut cluster = Cluster::start().await;
    create_queue(cluster.http(1), "bq", json!({"partitions": 1})).await;
    let leader = cluster.leader_of(1, "bq", None).await;
    let via = if leader == 1 { 2 } else { 1 };
    let (http, grpc) = (cluster.http(via).to_string(), cluster.node(via).grpc());
    let bench = tokio::process::Command::new(env!("CARGO_BIN_EXE_qit"))
        .args([
            "bench",
            "--server",
            &http,
            "--grpc-server",
            &grpc,
            "--queue",
            "bq",
        ])
        .args(["--partitions", "1", "--messages", "6000", "--rate", "500"])
        .args(["--producers", "2", "--consumers", "2", "--batch", "1"])
        .args(["--window", "10", "--json"])
        .args(mode)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("qit bench starts");
    let info = format!("{http}/queues/bq");
    eventually("the bench publishes", || async {
        view(&info)
            .await
            .is_some_and(|v| v["partitions"][0]["next_offset"].as_u64() > Some(0))
    })
    .await;
    kill_and_take_back(&mut cluster, leader, via, "bq").await;
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        bench.wait_with_output(),
    )
    .await
    .expect("the bench ends")
    .expect("the bench's output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON summary line");
    assert_eq!(summary["published"], 6000, "{summary}");
    assert_eq!(summary["consumed"], 6000, "{summary}");
}

/// A `ReceiveMessages` stream on a node that does not lead its queue outlives a leader's
/// kill, the election after it, and the killed node's return, when it takes the queue
/// back as its preferred leader: the stream's forwarded receives follow the leader (the
/// node that handed the group back answers that it no longer leads; the stream ended
/// there with `UNAVAILABLE`). One message is published through the follower before the
/// kill and one after the hand-back; the same stream delivers both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_stream_through_a_follower_outlives_a_hand_back() {
    let mut cluster = Cluster::start().await;
    create_queue(cluster.http(1), "rs", json!({"partitions": 1})).await;
    let leader = cluster.leader_of(1, "rs", None).await;
    let via = if leader == 1 { 2 } else { 1 };
    let mut client = BrokerClient::connect(cluster.node(via).grpc())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let open = proto::OpenStream {
        queue: "rs".into(),
        group: String::new(),
        max_in_flight: 10,
        visibility_ms: None,
    };
    tx.send(proto::ReceiveRequest {
        request: Some(receive_request::Request::Open(open)),
    })
    .await
    .unwrap();
    let mut stream = client
        .receive_messages(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    publish(cluster.http(via), "rs", "before").await;
    let (id, body) = next_body(&mut stream).await;
    assert_eq!(body, "before");
    tx.send(proto::ReceiveRequest {
        request: Some(receive_request::Request::Ack(proto::StreamAck { id })),
    })
    .await
    .unwrap();

    kill_and_take_back(&mut cluster, leader, via, "rs").await;
    publish(cluster.http(via), "rs", "after").await;
    let (_, body) = next_body(&mut stream).await;
    assert_eq!(body, "after");
}

/// The next message `stream` delivers, as its id and body (an end or an error fails the
/// test).
async fn next_body(stream: &mut tonic::Streaming<proto::ReceiveResponse>) -> (String, String) {
    let next = tokio::time::timeout(std::time::Duration::from_secs(60), stream.next())
        .await
        .expect("the stream delivers within the guard");
    match next {
        Some(Ok(proto::ReceiveResponse {
            response: Some(receive_response::Response::Message(m)),
        })) => (m.id, String::from_utf8_lossy(&m.body).into_owned()),
        other => panic!("the stream ended or failed: {other:?}"),
    }
}

/// Two changes of `queue`'s leader, as node `via` sees them: `leader` is killed and
/// another replica is elected; `leader` is restarted and, as the queue's preferred leader,
/// takes the group back.
async fn kill_and_take_back(cluster: &mut Cluster, leader: u64, via: u64, queue: &str) {
    cluster.kill(leader);
    let other = cluster.leader_of(via, queue, Some(leader)).await;
    cluster.restart(leader);
    eventually("the restarted node leads the queue again", || async {
        cluster.leader_of(via, queue, Some(other)).await == leader
    })
    .await;
}
