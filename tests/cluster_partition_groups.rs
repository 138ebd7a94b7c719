//! A queue of several partitions on a cluster: every partition after the first has a Raft
//! group of its own, led by the next replica in turn, so the leaders of one queue's
//! partitions spread over the nodes, and each partition fails over on its own. Three real
//! `qit` processes on loopback; every wait is on a condition (deadlines only guard against
//! hangs).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::cluster::{
    Cluster, create_queue, log_bodies, partition_leaders, receive, retrying, view,
};
use common::{eventually, http};
use serde_json::{Value, json};

/// The leader of each partition of `queue` as node `base` sees it, once each has one.
async fn leaders(base: &str, queue: &str) -> Vec<u64> {
    common::eventually_some(
        &format!("{base} sees a leader of every partition"),
        || async {
            let v = view(&format!("{base}/cluster")).await?;
            let leaders = partition_leaders(&v, queue);
            (!leaders.is_empty() && leaders.iter().all(Option::is_some))
                .then(|| leaders.into_iter().flatten().collect())
        },
    )
    .await
}

/// Publishes `body` to `queue` through `base` (again while the cluster answers 503); its
/// id.
async fn publish_via(base: &str, queue: &str, body: &str) -> String {
    let (status, answer) = retrying(&format!("publish {body}"), || {
        http()
            .post(format!("{base}/queues/{queue}/messages"))
            .body(body.to_string())
    })
    .await;
    assert!(status.is_success(), "publish {body}: {status} {answer}");
    answer["id"].as_str().expect("an id").to_string()
}

/// Receives and acks through `base` until `want` distinct bodies came; each body with the
/// number of times it was delivered.
async fn drain(base: &str, queue: &str, want: usize) -> BTreeMap<String, usize> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while seen.len() < want {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {want} delivered",
            seen.len()
        );
        for m in receive(base, queue, 100).await {
            let body = m["body"].as_str().unwrap_or_default().to_string();
            *seen.entry(body).or_default() += 1;
            let id = m["id"].as_str().unwrap_or_default().to_string();
            let (status, answer) = retrying("ack", || {
                http().delete(format!("{base}/queues/{queue}/messages/{id}"))
            })
            .await;
            assert!(status.is_success(), "ack {id}: {status} {answer}");
        }
    }
    seen
}

/// Three partitions on three nodes: each node leads one, as every node sees it. Keyless
/// publishes through one node land in every partition, each in its partition's group; a
/// retry with the same idempotency key through another node finds the first. The leader
/// of partition 1 is killed: the others go on, partition 1 elects another leader, every
/// answered publish is delivered once and acked; the killed node comes back, catches up
/// to identical logs, and leads its partition again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_leaders_spread_and_fail_over_one_by_one() {
    let mut cluster = Cluster::start().await;
    create_queue(cluster.http(2), "spread", json!({"partitions": 3})).await;
    let mut first = Vec::new();
    for id in 1..=3 {
        let seen = leaders(cluster.http(id), "spread").await;
        let distinct: BTreeSet<u64> = seen.iter().copied().collect();
        // A partition first led elsewhere is handed to its preferred replica soon after.
        if distinct.len() < 3 {
            eventually("every node leads one partition", || async {
                let v = view(&format!("{}/cluster", cluster.http(id))).await;
                v.is_some_and(|v| {
                    let leaders: BTreeSet<Option<u64>> =
                        partition_leaders(&v, "spread").into_iter().collect();
                    leaders == BTreeSet::from([Some(1), Some(2), Some(3)])
                })
            })
            .await;
        }
        first = leaders(cluster.http(id), "spread").await;
    }
    let mut published = BTreeSet::new();
    let mut partitions = BTreeSet::new();
    for i in 0..30 {
        let body = format!("before-{i}");
        let id = publish_via(cluster.http(3), "spread", &body).await;
        partitions.insert(id.split('-').next().unwrap_or_default().to_string());
        published.insert(body);
    }
    assert_eq!(
        partitions.len(),
        3,
        "keyless messages go to every partition"
    );
    // A retry through another node finds the first (it goes by its idempotency key's hash).
    let mut ids = Vec::new();
    for via in [1, 2] {
        let base = cluster.http(via).to_string();
        let (status, answer) = retrying("publish with a key", || {
            http()
                .post(format!("{base}/queues/spread/messages"))
                .header("Idempotency-Key", "once")
                .body("once")
        })
        .await;
        assert!(status.is_success(), "{status} {answer}");
        ids.push(answer["id"].clone());
    }
    assert_eq!(ids[0], ids[1], "the retry answers the first one's id");
    published.insert("once".to_string());

    let victim = first[1];
    assert_ne!(
        victim, first[0],
        "partition 1 is not led by partition 0's leader"
    );
    cluster.kill(victim);
    let survivor = (1..=3).find(|id| *id != victim).unwrap();
    let moved = common::eventually_some("partition 1 elects another leader", || async {
        let v = view(&format!("{}/cluster", cluster.http(survivor))).await?;
        let leaders = partition_leaders(&v, "spread");
        leaders
            .get(1)
            .copied()
            .flatten()
            .filter(|l| *l != victim)
            .map(|_| leaders)
    })
    .await;
    assert_eq!(moved[0], Some(first[0]), "partition 0 kept its leader");
    for i in 0..30 {
        let body = format!("after-{i}");
        publish_via(cluster.http(survivor), "spread", &body).await;
        published.insert(body);
    }
    let delivered = drain(cluster.http(survivor), "spread", published.len()).await;
    assert_eq!(
        delivered.keys().cloned().collect::<BTreeSet<_>>(),
        published
    );
    let twice: Vec<&String> = delivered
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(b, _)| b)
        .collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");

    cluster.restart(victim);
    for partition in 0..3 {
        let reference = log_bodies(cluster.http(survivor), "spread", partition).await;
        assert!(reference.as_ref().is_some_and(|r| !r.is_empty()));
        let base = cluster.http(victim).to_string();
        eventually("the restarted node holds the same logs", || async {
            log_bodies(&base, "spread", partition).await == reference
        })
        .await;
    }
    eventually("the restarted node leads its partition again", || async {
        let v: Option<Value> = view(&format!("{}/cluster", cluster.http(survivor))).await;
        v.is_some_and(|v| partition_leaders(&v, "spread").get(1) == Some(&Some(victim)))
    })
    .await;
}

/// Publishes `body` with idempotency key `key` to `queue` through `base` (again while the
/// cluster answers 503); its id.
async fn publish_once(base: &str, queue: &str, key: &str, body: &str) -> String {
    let (status, answer) = retrying(&format!("publish {key}"), || {
        http()
            .post(format!("{base}/queues/{queue}/messages"))
            .header("Idempotency-Key", key)
            .body(body.to_string())
    })
    .await;
    assert!(status.is_success(), "publish {key}: {status} {answer}");
    answer["id"].as_str().expect("an id").to_string()
}

/// A partition group's leader decides about repeated idempotency keys before it
/// replicates a publish: each key, published at once through all three nodes, is stored
/// once and all three get its id, whichever partition it goes to; once the leader of a
/// partition that holds keys is killed, its successor answers every key with the same id
/// again and stores nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_is_stored_once_by_its_partitions_leader() {
    let mut cluster = Cluster::start().await;
    create_queue(cluster.http(1), "keys", json!({"partitions": 3})).await;
    leaders(cluster.http(1), "keys").await;
    let keys: Vec<String> = (0..24).map(|i| format!("key-{i}")).collect();
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    for key in &keys {
        let body = format!("body-{key}");
        let sent = [1, 2, 3].map(|via| {
            let (base, key, body) = (cluster.http(via).to_string(), key.clone(), body.clone());
            tokio::spawn(async move { publish_once(&base, "keys", &key, &body).await })
        });
        let mut answers = BTreeSet::new();
        for answer in sent {
            answers.insert(answer.await.unwrap());
        }
        assert_eq!(answers.len(), 1, "{key} answered with {answers:?}");
        ids.insert(key.clone(), answers.into_iter().next().unwrap());
    }
    let partition_of = |id: &String| id.split('-').next().unwrap_or_default().to_string();
    let used: BTreeSet<String> = ids.values().map(partition_of).collect();
    assert!(
        used.iter().any(|p| p != "0"),
        "some key goes to a partition group: {used:?}"
    );
    let sequenced = common::cluster::metric_sum(
        &cluster
            .nodes
            .iter()
            .map(|n| n.http.clone())
            .collect::<Vec<_>>(),
        "qit_cluster_publishes_sequenced_total",
    )
    .await;
    assert!(
        sequenced > 0.0,
        "no publish was sequenced by a partition leader"
    );
    // Every node's copies hold each body once.
    let want: BTreeSet<String> = keys.iter().map(|k| format!("body-{k}")).collect();
    for node in 1..=3u64 {
        let base = cluster.http(node).to_string();
        eventually(&format!("node {node} holds each body once"), || async {
            let mut bodies = Vec::new();
            for partition in 0..3 {
                match log_bodies(&base, "keys", partition).await {
                    Some(b) => bodies.extend(b),
                    None => return false,
                }
            }
            bodies.len() == want.len() && bodies.into_iter().collect::<BTreeSet<_>>() == want
        })
        .await;
    }

    // The leader of a partition group that holds keys goes; its successor knows them.
    let (partition, _) = ids
        .values()
        .map(partition_of)
        .filter(|p| p != "0")
        .map(|p| (p.parse::<usize>().unwrap(), ()))
        .next()
        .unwrap();
    let victim = leaders(cluster.http(1), "keys").await[partition];
    cluster.kill(victim);
    let survivor = (1..=3).find(|id| *id != victim).unwrap();
    for key in &keys {
        let again = publish_once(cluster.http(survivor), "keys", key, "again").await;
        assert_eq!(
            again, ids[key],
            "{key} answered another id after the failover"
        );
    }
    // Read at each partition's leader, which applied every answered publish.
    let base = cluster.http(survivor).to_string();
    let mut bodies = Vec::new();
    for partition in 0..3 {
        let url = format!("{base}/queues/keys/log?partition={partition}&from=0&max=10000");
        let (status, log) = retrying("read the log", || http().get(&url)).await;
        assert!(status.is_success(), "{status} {log}");
        let messages = log["messages"].as_array().cloned().unwrap_or_default();
        bodies.extend(
            messages
                .iter()
                .filter_map(|m| m["body"].as_str().map(String::from)),
        );
    }
    assert_eq!(bodies.len(), want.len(), "nothing new stored: {bodies:?}");
    assert_eq!(bodies.into_iter().collect::<BTreeSet<_>>(), want);
}

/// A message as large as the queue allows (body and idempotency key, as a single node
/// counts it), is taken by every partition's group: its leader checks it as a single node
/// does, and the replicas do not check the stored record again (there the key is a header
/// whose name counts too: such a publish was once written, then refused when applied).
/// One byte more is refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_at_the_size_limit_is_taken_by_every_partition() {
    let cluster = Cluster::start().await;
    let settings = json!({"partitions": 3, "max_message_bytes": 64});
    create_queue(cluster.http(1), "full", settings).await;
    leaders(cluster.http(1), "full").await;
    // Keys of two bytes: 62 + 2 is the limit.
    let body = "x".repeat(62);
    let mut partitions = BTreeSet::new();
    for i in 0..6 {
        let id = publish_once(cluster.http(1 + i % 3), "full", &format!("k{i}"), &body).await;
        partitions.insert(id.split('-').next().unwrap_or_default().to_string());
    }
    assert!(
        partitions.iter().any(|p| p != "0"),
        "some went to a partition group: {partitions:?}"
    );
    let (status, answer) = retrying("publish one byte too many", || {
        http()
            .post(format!("{}/queues/full/messages", cluster.http(2)))
            .header("Idempotency-Key", "k9")
            .body("x".repeat(63))
    })
    .await;
    assert_eq!(status, 413, "{answer}");
    // Each of the six is stored once, the refused one nowhere (node 1 replicates every
    // partition).
    eventually("node 1 holds the six messages", || async {
        let mut stored = 0;
        for partition in 0..3 {
            match log_bodies(cluster.http(1), "full", partition).await {
                Some(log) => stored += log.len(),
                None => return false,
            }
        }
        stored == 6
    })
    .await;
}

/// Partition 0 of a queue made with groups per partition (a queue of one partition here)
/// lives in the queue group, whose leader sequences its publishes too: a key published
/// again, through another node, answers the first id from the leader's dedup window before
/// anything is replicated, and is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_groups_leader_sequences_partition_zero() {
    let cluster = Cluster::start().await;
    create_queue(cluster.http(1), "solo", json!({"partitions": 1})).await;
    leaders(cluster.http(1), "solo").await;
    let first = publish_once(cluster.http(1), "solo", "once", "body-once").await;
    let again = publish_once(cluster.http(2), "solo", "once", "body-again").await;
    assert_eq!(first, again);
    let known = sequenced(&cluster, "known").await;
    assert!(
        known >= 1.0,
        "the repeat was not answered by the leader's sequencer"
    );
    for node in 1..=3u64 {
        let base = cluster.http(node).to_string();
        eventually(&format!("node {node} holds the body once"), || async {
            log_bodies(&base, "solo", 0).await == Some(vec!["body-once".to_string()])
        })
        .await;
    }
}

/// Publishes the leaders' sequencers decided with `outcome` (`written`, `known`), over
/// every node.
async fn sequenced(cluster: &Cluster, outcome: &str) -> f64 {
    let label = format!("outcome=\"{outcome}\"");
    let name = "qit_cluster_publishes_sequenced_total";
    common::cluster::labeled_metric_sum(cluster, name, &label).await
}

/// A gRPC Publish stream on the leader of a split queue's group goes through the leader's
/// sequencer too, as a publish over HTTP or one forwarded from another node does: a key it
/// carries is held pending by the leader while its entry is on the way, and a repeat
/// through another node answers its id. (The stream's publishes once went to the group as
/// publishes for the replicas to decide, unseen by the leader's sequencer until applied.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stream_on_the_leader_is_sequenced() {
    let cluster = Cluster::start().await;
    create_queue(cluster.http(1), "streamed", json!({"partitions": 1})).await;
    let leader = leaders(cluster.http(1), "streamed").await[0];
    let before = sequenced(&cluster, "written").await;
    let mut client = qit::proto::broker_client::BrokerClient::connect(cluster.node(leader).grpc())
        .await
        .expect("connect to the leader's gRPC listener");
    let message = |body: &str, key: &str| qit::proto::OutgoingMessage {
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        idempotency_key: Some(key.into()),
        ..Default::default()
    };
    let requests = vec![
        qit::proto::PublishRequest {
            seq: 1,
            queue: "streamed".into(),
            messages: vec![message("s1", "stream-1")],
        },
        qit::proto::PublishRequest {
            seq: 2,
            queue: "streamed".into(),
            messages: vec![message("s2", "stream-2")],
        },
    ];
    let mut answers = client
        .publish(tokio_stream::iter(requests))
        .await
        .expect("a publish stream")
        .into_inner();
    let mut ids = BTreeMap::new();
    while let Some(answer) = tokio_stream::StreamExt::next(&mut answers).await {
        let answer = answer.expect("a publish answer");
        assert!(
            answer.error.is_none(),
            "publish {}: {:?}",
            answer.seq,
            answer.error
        );
        ids.insert(answer.seq, answer.messages[0].id.clone());
    }
    assert_eq!(ids.len(), 2, "both publishes answered");
    assert!(
        sequenced(&cluster, "written").await > before,
        "the stream's publishes were not sequenced by the leader"
    );
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    let again = publish_once(cluster.http(follower), "streamed", "stream-1", "repeat").await;
    assert_eq!(
        Some(&again),
        ids.get(&1),
        "a repeated key answers the stream's id"
    );
    for node in 1..=3u64 {
        let base = cluster.http(node).to_string();
        eventually(&format!("node {node} holds each body once"), || async {
            log_bodies(&base, "streamed", 0).await == Some(vec!["s1".into(), "s2".into()])
        })
        .await;
    }
}

/// Messages stored in `queue` as node `base` answers its info: the sum over its
/// partitions.
async fn stored(base: &str, queue: &str) -> u64 {
    let info = common::cluster::ok("queue info", || {
        http().get(format!("{base}/queues/{queue}"))
    })
    .await;
    let partitions = info["partitions"].as_array().cloned().unwrap_or_default();
    partitions
        .iter()
        .map(|p| {
            let next = p["next_offset"].as_u64().unwrap_or(0);
            next.saturating_sub(p["first_offset"].as_u64().unwrap_or(0))
        })
        .sum()
}

/// A queue's info, read right after a publish was answered, holds that publish whichever
/// node leads its partitions: the info is read at the queue group's leader, which first
/// applies each other partition as far as that partition's leader has committed it. (It
/// once answered each partition as far as it had applied it, behind the partition's
/// leader for a moment after every publish.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queues_info_holds_every_answered_publish() {
    let cluster = Cluster::start().await;
    create_queue(cluster.http(1), "counted", json!({"partitions": 3})).await;
    let first: Vec<Option<u64>> =
        common::eventually_some("every node leads one partition", || async {
            let v = view(&format!("{}/cluster", cluster.http(1))).await?;
            let leaders = partition_leaders(&v, "counted");
            let distinct: BTreeSet<&Option<u64>> = leaders.iter().collect();
            (distinct.len() == 3 && leaders.iter().all(Option::is_some)).then_some(leaders)
        })
        .await;
    let reader = first[0].expect("partition 0 has a leader");
    let mut total = 0u64;
    for i in 0..30u64 {
        // Through the other two nodes, the leaders of partitions 1 and 2.
        let via = first[1 + (i % 2) as usize].expect("a leader");
        let messages: Vec<Value> = (0..400)
            .map(|j| json!({"body": format!("m{i}-{j}"), "key": format!("k{i}-{j}")}))
            .collect();
        let base = cluster.http(via).to_string();
        let (status, answer) = retrying("batch publish", || {
            http()
                .post(format!("{base}/queues/counted/messages/batch"))
                .json(&json!({ "messages": messages }))
        })
        .await;
        assert!(status.is_success(), "batch {i}: {status} {answer}");
        total += 400;
        assert_eq!(
            stored(cluster.http(reader), "counted").await,
            total,
            "the info read at node {reader} right after batch {i} was answered through node {via}"
        );
    }
}
