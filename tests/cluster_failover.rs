//! Elections converge when the replica first in turn has the shorter log (issue 13, the
//! failover stall): openraft refuses such a candidate's vote request without moving the
//! refusing node's term, so if the behind replica kept going first, every candidacy of the
//! up-to-date one would land in a term the behind one had already taken. The liveness loop
//! leaves the election to the replica whose log is ahead. Three `qit` processes on
//! loopback; every wait is on a condition (deadlines only guard against hangs). The
//! decision itself is unit-tested in `src/cluster/liveness.rs`.

mod common;

use common::cluster::{Cluster, create_queue, log_bodies, partition, publish, view};
use common::eventually;
use serde_json::json;

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
        let base = cluster.http(node).to_string();
        let acked = acked.clone();
        eventually(
            &format!("node {node} holds every acknowledged publish"),
            || {
                let base = base.clone();
                let acked = acked.clone();
                async move {
                    log_bodies(&base, "f", 0)
                        .await
                        .is_some_and(|bodies| acked.iter().all(|b| bodies.contains(b)))
                }
            },
        )
        .await;
    }
}
