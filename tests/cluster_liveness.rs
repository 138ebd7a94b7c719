//! Liveness of a three-node cluster whose groups share one beat per node (issue 13):
//! openraft's per-group heartbeats and election timers are off, so these check what they
//! used to provide. A follower learns what the leader committed, with nothing written
//! after it; a stopped leader of several groups is replaced for all of them and follows
//! the new leaders once it runs again; a killed node is replaced and catches up after a
//! restart. Three real `qit` processes on loopback; every wait is on a condition (the
//! deadlines only guard against hangs), nothing here measures time.

mod common;

use common::cluster::{Cluster, common_leader, log_bodies, publish, sees_fenced, view};
use common::eventually;
use serde_json::json;

async fn create_queue(base: &str, queue: &str) {
    let settings = json!({"partitions": 1, "max_deliveries": 0});
    common::cluster::create_queue(base, queue, settings).await;
}

/// Waits until node `base` holds exactly `expected` in `queue`'s log.
async fn holds(base: &str, queue: &str, expected: &[String], who: &str) {
    eventually(&format!("{who} holds {expected:?} in {queue}"), || async {
        log_bodies(base, queue, 0).await.as_deref() == Some(expected)
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
        let url = format!("{base}/queues/ryw?local=true");
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
        let log = log_bodies(base, "ryw", 0)
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
/// writes again (leader balance may give it its preferred groups back meanwhile: the test
/// checks that it agrees with the survivors on one leader, whichever).
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
    let (old_view, survivor_view) = (
        format!("{old}/cluster"),
        format!("{}/cluster", cluster.node(survivors[0]).http),
    );
    for q in &queues {
        // The resumed node agrees with the survivors on one leader: a survivor, or the
        // resumed node itself once leader balance gave it its preferred groups back (in a
        // later term than the one it was deposed in).
        eventually(
            &format!(
                "node {stopped} and node {} see one leader of {q}",
                survivors[0]
            ),
            || async {
                let seen = view(&old_view).await.and_then(|v| common_leader(&v, q));
                seen.is_some()
                    && seen
                        == view(&survivor_view)
                            .await
                            .and_then(|v| common_leader(&v, q))
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

/// Whether `/metrics` at `base` counts a leader change of `queue`'s group.
async fn leader_changes(base: &str, queue: &str) -> bool {
    let text = common::metrics_text(base).await;
    let label = format!("queue=\"{queue}\"");
    text.lines().any(|l| {
        l.starts_with("qit_cluster_leader_changes_total{")
            && l.contains(&label)
            && l.rsplit(' ').next().is_some_and(|v| v != "0")
    })
}

/// kill -9 of a node that leads queues: a survivor serves publishes to every queue (the
/// groups elect new leaders), and the killed node, restarted, catches up on all of them.
/// Meanwhile the metadata leader fences the killed node (every survivor's `/cluster`
/// says so) and unfences it once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_catches_up_after_restart() {
    let mut cluster = Cluster::start().await;
    let queues: Vec<String> = (0..4).map(|i| format!("kill-{i}")).collect();
    for q in &queues {
        create_queue(&cluster.node(2).http, q).await;
        publish(&cluster.node(2).http, q, "before").await;
    }
    let victim = cluster.leader_of(2, &queues[0], None).await;
    cluster.kill(victim);
    let survivor = if victim == 1 { 2 } else { 1 };
    for q in &queues {
        publish(&cluster.node(survivor).http, q, "during").await;
    }
    let new = cluster.leader_of(survivor, &queues[0], Some(victim)).await;
    assert_ne!(new, victim);
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != victim).collect();
    let base = cluster.node(new).http.clone();
    eventually(&format!("node {new} counts the leader change"), || {
        leader_changes(&base, &queues[0])
    })
    .await;
    for id in &survivors {
        let (base, gone) = (cluster.node(*id).http.clone(), [victim]);
        eventually(&format!("node {id} sees node {victim} fenced"), || {
            sees_fenced(&base, &gone, true)
        })
        .await;
        assert!(
            sees_fenced(&base, &survivors, false).await,
            "survivors unfenced"
        );
    }
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
    for id in 1..=3 {
        let base = cluster.node(id).http.clone();
        eventually(&format!("node {id} sees every node unfenced"), || {
            sees_fenced(&base, &[1, 2, 3], false)
        })
        .await;
    }
}
