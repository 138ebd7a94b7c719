//! The Kafka listener on every node of a three-node cluster: real Kafka clients
//! (confluent-kafka/librdkafka, installed by `tools/kafka-clients.sh`, scenarios in
//! `tests/kafka/cluster.py`) produce through one node to a topic another node leads and
//! read over HTTP on a third; a group whose members bootstrap on different nodes shares
//! the partitions; the node that leads the topic and coordinates the group is killed while
//! they run, and no acknowledged record is lost. Raw frames check what a client library
//! hides: a produce sent to a node that does not lead is forwarded (an idempotent batch
//! retried through another node is stored once), a fetch on a follower reads its committed
//! copy, Metadata names every node, and a group request to a node that does not
//! coordinate the group is answered `NOT_COORDINATOR`, and an offset fetch of every topic
//! (no topic list) on a node without a replica of the topic still finds the group's commit. Every wait is on a condition; the
//! deadlines only guard against hangs.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, FetchRequest, FetchResponse, FindCoordinatorRequest, FindCoordinatorResponse,
    HeartbeatRequest, HeartbeatResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, RequestHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use common::cluster::{Cluster, create_queue, log_bodies, partition_leaders, view};
use common::{eventually, kafka_python};
use qit::kafka::brokers::{Layout, NodeState};

/// A guard against a hang: every read must answer or close within this.
const ANSWER: Duration = Duration::from_secs(60);

/// `python tests/kafka/cluster.py SCENARIO ARGS...`, stdin and stdout piped.
async fn scenario(name: &str, args: &[&str]) -> tokio::process::Child {
    let python = tokio::task::spawn_blocking(kafka_python).await.unwrap();
    let script = format!("{}/tests/kafka/cluster.py", env!("CARGO_MANIFEST_DIR"));
    tokio::process::Command::new(python)
        .arg(script)
        .arg(name)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the scenario")
}

/// Waits for a scenario to end (a guard of 300 s against a hang); its stdout, or a panic
/// with its output when it failed.
async fn finished(child: tokio::process::Child, name: &str) -> String {
    common::scenario_output(child, name, Duration::from_secs(300)).await
}

/// Every node's bootstrap address, comma-separated.
fn bootstrap_all(cluster: &Cluster) -> String {
    cluster
        .nodes
        .iter()
        .map(|n| n.kafka())
        .collect::<Vec<_>>()
        .join(",")
}

/// The cluster as the Kafka adapter sees it with every node up, from node 1.
fn layout(cluster: &Cluster) -> Layout {
    Layout {
        me: 1,
        local: cluster.node(1).kafka().parse::<SocketAddr>().unwrap(),
        nodes: cluster
            .nodes
            .iter()
            .map(|n| {
                let state = NodeState {
                    kafka: Some(n.kafka()),
                    up: true,
                    fenced: false,
                };
                (n.id, state)
            })
            .collect(),
        controller: None,
    }
}

/// `cluster` once every node sees every node unfenced: the metadata leader fences a node
/// that was slow to start (its coordinators move off it until it is unfenced), and the
/// tests pick group ids by the coordinator they have with no node fenced.
async fn settled(cluster: Cluster) -> Cluster {
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    for node in &cluster.nodes {
        eventually(&format!("node {} sees no node fenced", node.id), || {
            common::cluster::sees_fenced(&node.http, &ids, false)
        })
        .await;
    }
    cluster
}

/// A group id that node `node` coordinates while no node is fenced.
fn group_on(cluster: &Cluster, node: u64, prefix: &str) -> String {
    let layout = layout(cluster);
    (0..1000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|g| layout.coordinator(g) == node)
        .expect("a group id for the node")
}

/// A queue name whose preferred leader (first replica) is `node` among nodes 1..=3.
fn queue_led_by(node: u64, prefix: &str) -> String {
    (0..1000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|q| qit::cluster::placement::replicas(q, &[1, 2, 3], 3).first() == Some(&node))
        .expect("a queue name for the node")
}

async fn connect(addr: &str) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// Sends one request and reads its answer body (after the correlation id and, for a
/// flexible version, the header's tagged fields).
async fn call(stream: &mut TcpStream, api: ApiKey, version: i16, body: &impl Encodable) -> Bytes {
    let mut frame = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(StrBytes::from_static_str("cluster-test")))
        .encode(&mut frame, api.request_header_version(version))
        .unwrap();
    body.encode(&mut frame, version).unwrap();
    let mut sized = BytesMut::new();
    sized.put_i32(frame.len() as i32);
    sized.put_slice(&frame);
    stream.write_all(&sized).await.unwrap();
    let read = async {
        let size = stream.read_i32().await.unwrap();
        let mut body = vec![0u8; usize::try_from(size).unwrap()];
        stream.read_exact(&mut body).await.unwrap();
        Bytes::from(body)
    };
    let mut answer = tokio::time::timeout(ANSWER, read)
        .await
        .expect("the node answers");
    assert_eq!(answer.get_i32(), 7);
    if api.response_header_version(version) >= 1 {
        let _tagged = answer.get_u8();
    }
    answer
}

fn batch(producer_id: i64, sequence: i32, values: &[&str]) -> Bytes {
    let records: Vec<Record> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: sequence + i as i32,
            // Now, as producers stamp records (a batch stamped more than the queue's
            // dedup window ago is not matched across nodes).
            timestamp: qit::clock::Clock::system().now_ms(),
            key: Some(Bytes::from(format!("key-{v}"))),
            value: Some(Bytes::copy_from_slice(v.as_bytes())),
            headers: [(
                StrBytes::from_static_str("origin"),
                Some(Bytes::from(format!("h-{v}"))),
            )]
            .into_iter()
            .collect(),
        })
        .collect();
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut buf, &records, &options).unwrap();
    buf.freeze()
}

fn topic(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_string()))
}

/// Produces `records` to `partition` of `name`; (error code, base offset).
async fn produce(stream: &mut TcpStream, name: &str, partition: i32, records: Bytes) -> (i16, i64) {
    let mut body = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000);
    body.topic_data = vec![
        TopicProduceData::default()
            .with_name(topic(name))
            .with_partition_data(vec![
                PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(records)),
            ]),
    ];
    let mut answer = call(stream, ApiKey::Produce, 9, &body).await;
    let response = ProduceResponse::decode(&mut answer, 9).unwrap();
    let p = &response.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

/// Fetches `partition` of `name` from offset 0 without waiting: (error code, values).
async fn fetch(stream: &mut TcpStream, name: &str, partition: i32) -> (i16, Vec<String>) {
    let mut body = FetchRequest::default()
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(1 << 20);
    body.topics = vec![
        FetchTopic::default()
            .with_topic(topic(name))
            .with_partitions(vec![
                FetchPartition::default()
                    .with_partition(partition)
                    .with_fetch_offset(0)
                    .with_partition_max_bytes(1 << 20),
            ]),
    ];
    let mut answer = call(stream, ApiKey::Fetch, 12, &body).await;
    let response = FetchResponse::decode(&mut answer, 12).unwrap();
    let p = &response.responses[0].partitions[0];
    let mut values = Vec::new();
    let mut records = p.records.clone().unwrap_or_default();
    while records.has_remaining() {
        let set = RecordBatchDecoder::decode(&mut records).unwrap();
        values.extend(
            set.records.iter().map(|r| {
                String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).to_string()
            }),
        );
    }
    (p.error_code, values)
}

/// The term of each partition of `queue` in a `GET /cluster` view, by partition.
fn partition_terms(view: &serde_json::Value, queue: &str) -> Vec<u64> {
    let mut terms: Vec<(u64, u64)> = view["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["queue"] == queue)
        .map(|p| {
            (
                p["partition"].as_u64().unwrap_or(0),
                p["term"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    terms.sort_unstable();
    terms.into_iter().map(|(_, term)| term).collect()
}

async fn metadata(stream: &mut TcpStream, name: &str) -> MetadataResponse {
    let body = MetadataRequest::default().with_topics(Some(vec![
        kafka_protocol::messages::metadata_request::MetadataRequestTopic::default()
            .with_name(Some(topic(name))),
    ]));
    let mut answer = call(stream, ApiKey::Metadata, 9, &body).await;
    MetadataResponse::decode(&mut answer, 9).unwrap()
}

/// Raw frames: Metadata on every node names all three brokers under their node ids and
/// the leader the cluster reports; a produce to a node that does not lead is forwarded,
/// an idempotent batch sent again through another node is stored once, and a fetch on a
/// follower reads the committed records; FindCoordinator names the same node everywhere,
/// and the other nodes answer that group's heartbeat with `NOT_COORDINATOR`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_produce_fetch_metadata_and_finds_the_coordinator() {
    let cluster = settled(Cluster::start().await).await;
    let name = queue_led_by(1, "frames");
    create_queue(cluster.http(1), &name, json!({"partitions": 2})).await;
    cluster.preferred_leader(1, &name).await;
    // Each partition has a group of its own, led by the next replica in turn.
    let leaders: Vec<u64> = common::eventually_some("every partition has a leader", || async {
        let v = view(&format!("{}/cluster", cluster.http(1))).await?;
        let leaders: Option<Vec<u64>> = partition_leaders(&v, &name).into_iter().collect();
        leaders.filter(|l| l.len() == 2 && l[0] != l[1])
    })
    .await;
    // Produce and fetch go to partition 1: through nodes that do not lead it.
    let leader = leaders[1];
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let (via, reader) = (others[0], others[1]);

    let want: Vec<(i32, String)> = cluster
        .nodes
        .iter()
        .map(|n| (n.id as i32, n.kafka()))
        .collect();
    for node in 1..=3 {
        let addr = cluster.node(node).kafka();
        let http = cluster.http(node).to_string();
        let (addr, http, name, want, leaders) = (&addr, &http, &name, &want, &leaders);
        eventually(
            &format!("node {node}'s Metadata names every node, the leaders and their terms"),
            || async move {
                // Each partition's leader epoch is its group's term, as GET /cluster tells.
                let Some(v) = view(&format!("{http}/cluster")).await else {
                    return false;
                };
                let terms = partition_terms(&v, name);
                let m = metadata(&mut connect(addr).await, name).await;
                let mut brokers: Vec<(i32, String)> = m
                    .brokers
                    .iter()
                    .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
                    .collect();
                brokers.sort();
                let partitions = &m.topics[0].partitions;
                brokers == *want
                    && partitions.len() == 2
                    && partitions
                        .iter()
                        .zip(leaders)
                        .zip(&terms)
                        .all(|((p, leader), term)| {
                            p.leader_id.0 == *leader as i32
                                && p.replica_nodes.len() == 3
                                && *term > 0
                                && i64::from(p.leader_epoch) == *term as i64
                        })
            },
        )
        .await;
    }

    // GET /cluster names each node's Kafka listener too.
    let view = common::get_json(format!("{}/cluster", cluster.http(via))).await;
    for node in view["nodes"].as_array().expect("nodes") {
        let id = node["id"].as_u64().expect("an id");
        assert_eq!(node["kafka"], json!(cluster.node(id).kafka()), "{node}");
    }

    // Produce through a node that does not lead: forwarded; again through the third node
    // (the client "failed over"): the same batch is answered with its offset, not stored.
    let mut producer = connect(&cluster.node(via).kafka()).await;
    assert_eq!(
        produce(&mut producer, &name, 1, batch(-1, -1, &["plain"])).await,
        (0, 0)
    );
    let first = produce(&mut producer, &name, 1, batch(4242, 0, &["x", "y"])).await;
    assert_eq!(first, (0, 1));
    let mut elsewhere = connect(&cluster.node(reader).kafka()).await;
    assert_eq!(
        produce(&mut elsewhere, &name, 1, batch(4242, 0, &["x", "y"])).await,
        (0, 1),
        "a retried batch is stored once, whichever node takes it"
    );
    // The partition's leader answered the retried batch from its dedup window before
    // anything was replicated (`broker::sequencer`), as it answers a repeated publish.
    let metric = "qit_cluster_publishes_sequenced_total";
    let known = common::cluster::labeled_metric_sum(&cluster, metric, "outcome=\"known\"").await;
    assert!(
        known >= 1.0,
        "the retried batch was not answered by the leader's sequencer"
    );
    assert_eq!(
        produce(&mut elsewhere, &name, 1, batch(4242, 2, &["z"])).await,
        (0, 3)
    );
    // The follower's fetch reads its own committed copy.
    let reader_addr = cluster.node(reader).kafka();
    let want: Vec<String> = ["plain", "x", "y", "z"].map(String::from).to_vec();
    eventually("the follower fetches every committed record, once", || {
        let (addr, name, want) = (&reader_addr, &name, &want);
        async move { fetch(&mut connect(addr).await, name, 1).await == (0, want.clone()) }
    })
    .await;
    assert_eq!(
        log_bodies(cluster.http(leader), &name, 1).await.unwrap(),
        ["plain", "x", "y", "z"]
    );
    // Every replica's own copy holds the records as produced, keys and headers too (the
    // entry carries them encoded once, and each replica decodes them).
    let mut copies = Vec::new();
    for node in 1..=3 {
        let url = format!(
            "{}/queues/{name}/log?partition=1&from=0&max=100&local=true",
            cluster.http(node)
        );
        let four = |log: &serde_json::Value| log["messages"].as_array().map(Vec::len) == Some(4);
        eventually(&format!("node {node} holds the four records"), || async {
            four(&common::get_json(url.clone()).await)
        })
        .await;
        copies.push(common::get_json(url).await["messages"].clone());
    }
    assert_eq!(copies[0], copies[1], "nodes 1 and 2 differ");
    assert_eq!(copies[0], copies[2], "nodes 1 and 3 differ");
    for (m, v) in copies[0]
        .as_array()
        .unwrap()
        .iter()
        .zip(["plain", "x", "y", "z"])
    {
        assert_eq!(m["key"], format!("key-{v}"), "{m}");
        assert_eq!(m["headers"]["origin"], format!("h-{v}"), "{m}");
    }

    // Topics made and deleted through followers: metadata entries, seen on every node.
    {
        use kafka_protocol::messages::create_topics_request::CreatableTopic;
        use kafka_protocol::messages::{
            CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
        };
        let mut create = CreateTopicsRequest::default().with_timeout_ms(30_000);
        create.topics = vec![
            CreatableTopic::default()
                .with_name(topic("made"))
                .with_num_partitions(3)
                .with_replication_factor(3),
        ];
        let mut answer = call(&mut producer, ApiKey::CreateTopics, 7, &create).await;
        let made = CreateTopicsResponse::decode(&mut answer, 7).unwrap();
        assert_eq!(made.topics[0].error_code, 0, "{made:?}");
        assert_eq!(made.topics[0].replication_factor, 3);
        // The node that answered has applied the creation.
        let info = common::get_json(format!("{}/queues/made", cluster.http(via))).await;
        assert_eq!(info["partitions"].as_array().map(Vec::len), Some(3));
        let mut delete = DeleteTopicsRequest::default().with_timeout_ms(30_000);
        delete.topic_names = vec![topic("made")];
        let mut answer = call(&mut elsewhere, ApiKey::DeleteTopics, 5, &delete).await;
        let deleted = DeleteTopicsResponse::decode(&mut answer, 5).unwrap();
        assert_eq!(deleted.responses[0].error_code, 0, "{deleted:?}");
        for node in 1..=3 {
            let url = format!("{}/queues/made", cluster.http(node));
            eventually(&format!("node {node} dropped the topic"), || async {
                common::http().get(&url).send().await.unwrap().status() == 404
            })
            .await;
        }
    }

    // One coordinator for a group, named by every node; the others send members there.
    let group = group_on(&cluster, via, "raw");
    for node in 1..=3 {
        let mut stream = connect(&cluster.node(node).kafka()).await;
        let body = FindCoordinatorRequest::default().with_key(StrBytes::from_string(group.clone()));
        let mut answer = call(&mut stream, ApiKey::FindCoordinator, 3, &body).await;
        let found = FindCoordinatorResponse::decode(&mut answer, 3).unwrap();
        assert_eq!((found.error_code, found.node_id.0), (0, via as i32));
        assert_eq!(found.port, i32::from(cluster.node(via).kafka_port));
        let body = HeartbeatRequest::default()
            .with_group_id(kafka_protocol::messages::GroupId(StrBytes::from_string(
                group.clone(),
            )))
            .with_generation_id(1)
            .with_member_id(StrBytes::from_static_str("nobody"));
        let mut answer = call(&mut stream, ApiKey::Heartbeat, 4, &body).await;
        let beat = HeartbeatResponse::decode(&mut answer, 4).unwrap();
        let expected = if node == via { 25 } else { 16 }; // UNKNOWN_MEMBER_ID, NOT_COORDINATOR
        assert_eq!(beat.error_code, expected, "node {node}");
    }
}

/// librdkafka bootstrapped on node 2 produces (idempotent, explicit partitions) to a topic
/// another node leads; node 1 serves the records over HTTP. Then a group of two whose
/// members bootstrap on nodes 1 and 3 splits the four partitions of a topic, consumes
/// every record and commits, and the commits are the qit group's floors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_clients_produce_and_consume_in_groups_through_any_node() {
    let cluster = settled(Cluster::start().await).await;
    let name = queue_led_by(3, "through");
    create_queue(cluster.http(1), &name, json!({"partitions": 2})).await;
    let leader = cluster.leader_of(1, &name, None).await;
    let out = finished(
        scenario(
            "produce_elsewhere",
            &[&cluster.node(2).kafka(), cluster.http(1), &name, "2000"],
        )
        .await,
        "produce_elsewhere",
    )
    .await;
    assert!(out.contains("\"acked\": 2000"), "{out}");
    assert_ne!(leader, 2, "the producer's bootstrap node did not lead");

    let shared = "shared";
    create_queue(cluster.http(2), shared, json!({"partitions": 4})).await;
    cluster.leader_of(2, shared, None).await;
    let group = "two-nodes";
    let out = finished(
        scenario(
            "group",
            &[
                &cluster.node(1).kafka(),
                &cluster.node(3).kafka(),
                cluster.http(2),
                shared,
                group,
                "1000",
            ],
        )
        .await,
        "group",
    )
    .await;
    assert!(out.contains("\"consumed\": 1000"), "{out}");
}

/// The node that leads the topic and coordinates the group is killed (-9) while an
/// idempotent producer and a group of two run: they go on through the survivors, every
/// acknowledged record is consumed, and each is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_go_on_when_the_leader_and_coordinator_is_killed() {
    let mut cluster = settled(Cluster::start().await).await;
    let name = queue_led_by(2, "survive");
    create_queue(cluster.http(1), &name, json!({"partitions": 2})).await;
    let victim = cluster.leader_of(1, &name, None).await;
    let group = group_on(&cluster, victim, "failover");
    let survivor = if victim == 1 { 3 } else { 1 };
    let bootstrap = bootstrap_all(&cluster);
    let http = cluster.http(survivor).to_string();
    let mut child = scenario("failover", &[&bootstrap, &http, &name, &group, "4000"]).await;
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(240), lines.next_line())
            .await
            .expect("the scenario reaches the kill")
            .unwrap();
        let Some(line) = line else {
            let out = child.wait_with_output().await.unwrap();
            panic!(
                "the scenario ended before the kill: {seen:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if line.trim() == "kill" {
            break;
        }
        seen.push(line);
    }
    let before = metadata(&mut connect(&cluster.node(survivor).kafka()).await, &name).await;
    cluster.kill(victim);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"killed\n").await.unwrap();
    stdin.flush().await.unwrap();
    let mut rest = String::new();
    let mut stdout = lines.into_inner();
    let reading = stdout.read_to_string(&mut rest);
    tokio::time::timeout(Duration::from_secs(300), reading)
        .await
        .expect("the scenario ends")
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "the failover scenario failed:\n{rest}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("failover: {rest}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(rest.contains("\"acked\": 4000"), "{rest}");
    assert!(
        rest.contains("\"stored\": 4000"),
        "each record stored once: {rest}"
    );
    // The partitions the killed node led have a new leader in a later epoch: a client
    // holding the old leader's answer can tell it is stale.
    let addr = cluster.node(survivor).kafka();
    let (addr, name, before) = (&addr, &name, &before);
    eventually("a new leader in a later epoch", || async move {
        let after = metadata(&mut connect(addr).await, name).await;
        let (old, new) = (&before.topics[0].partitions, &after.topics[0].partitions);
        old.len() == new.len()
            && old.iter().zip(new).all(|(old, new)| {
                old.leader_id.0 != victim as i32
                    || (new.leader_id.0 != victim as i32 && new.leader_epoch > old.leader_epoch)
            })
    })
    .await;
}

/// A node without a replica of the topic (four nodes, three replicas): its Metadata names
/// a replica as the leader, a produce through it is forwarded, a fetch on it answers
/// `NOT_LEADER_OR_FOLLOWER` (clients go to the leader), and as a group's coordinator it
/// commits offsets through the replicated path and reads them back from the leader, and
/// lists, describes and deletes the group there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_replica_forwards_produce_and_commits() {
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
    use kafka_protocol::messages::{
        DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest, DescribeGroupsResponse,
        GroupId, ListGroupsRequest, ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse,
        OffsetFetchRequest, OffsetFetchResponse,
    };
    let cluster = settled(Cluster::start_with(4, &[]).await).await;
    let name = (0..1000)
        .map(|i| format!("elsewhere-{i}"))
        .find(|q| !qit::cluster::placement::replicas(q, &[1, 2, 3, 4], 3).contains(&4))
        .expect("a queue without a replica on node 4");
    create_queue(cluster.http(1), &name, json!({"partitions": 1})).await;
    let leader = cluster.leader_of(1, &name, None).await;
    let outside = cluster.node(4).kafka();
    eventually("node 4 knows every node's listener", || {
        let (outside, name) = (&outside, &name);
        async move {
            let m = metadata(&mut connect(outside).await, name).await;
            m.brokers.len() == 4
        }
    })
    .await;
    let m = metadata(&mut connect(&outside).await, &name).await;
    let p = &m.topics[0].partitions[0];
    assert_ne!(p.leader_id.0, 4, "a replica leads");
    assert!(!p.replica_nodes.iter().any(|r| r.0 == 4));
    let mut stream = connect(&outside).await;
    assert_eq!(
        produce(&mut stream, &name, 0, batch(-1, -1, &["a", "b"])).await,
        (0, 0)
    );
    assert_eq!(
        fetch(&mut stream, &name, 0).await.0,
        6,
        "NOT_LEADER_OR_FOLLOWER"
    );
    assert_eq!(
        log_bodies(cluster.http(leader), &name, 0).await.unwrap(),
        ["a", "b"]
    );

    let mut layout = layout(&cluster);
    layout.me = 4;
    let group = (0..1000)
        .map(|i| format!("outside-{i}"))
        .find(|g| layout.coordinator(g) == 4)
        .expect("a group node 4 coordinates");
    let group_id = GroupId(StrBytes::from_string(group.clone()));
    let mut commit = OffsetCommitRequest::default()
        .with_group_id(group_id.clone())
        .with_generation_id_or_member_epoch(-1);
    commit.topics = vec![
        OffsetCommitRequestTopic::default()
            .with_name(topic(&name))
            .with_partitions(vec![
                OffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(1),
            ]),
    ];
    let mut answer = call(&mut stream, ApiKey::OffsetCommit, 8, &commit).await;
    let committed = OffsetCommitResponse::decode(&mut answer, 8).unwrap();
    assert_eq!(committed.topics[0].partitions[0].error_code, 0);
    let asked = OffsetFetchRequest::default()
        .with_group_id(group_id.clone())
        .with_topics(Some(vec![
            OffsetFetchRequestTopic::default()
                .with_name(topic(&name))
                .with_partition_indexes(vec![0]),
        ]));
    let mut answer = call(&mut stream, ApiKey::OffsetFetch, 7, &asked).await;
    let fetched = OffsetFetchResponse::decode(&mut answer, 7).unwrap();
    assert_eq!(fetched.error_code, 0);
    let p = &fetched.topics[0].partitions[0];
    assert_eq!((p.error_code, p.committed_offset), (0, 1));
    // Without a list of topics (as `kafka-consumer-groups --describe` asks): every topic
    // the group committed on, also one this node holds no replica of.
    let all = OffsetFetchRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.clone())))
        .with_topics(None);
    let mut answer = call(&mut stream, ApiKey::OffsetFetch, 7, &all).await;
    let fetched = OffsetFetchResponse::decode(&mut answer, 7).unwrap();
    assert_eq!(fetched.error_code, 0);
    let topics: Vec<(String, i32, i64)> = fetched
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|p| (t.name.0.to_string(), p.partition_index, p.committed_offset))
        })
        .collect();
    assert_eq!(topics, [(name.clone(), 0, 1)]);
    let info = common::get_json(format!(
        "{}/queues/{name}/groups/{group}",
        cluster.http(leader)
    ))
    .await;
    assert_eq!(info["partitions"][0]["committed_offset"], 1);

    // The admin calls find the group on the leader too (this node's copy of the queue is
    // empty): listed and described as Empty, and deleted there.
    let mut answer = call(
        &mut stream,
        ApiKey::ListGroups,
        4,
        &ListGroupsRequest::default(),
    )
    .await;
    let listed = ListGroupsResponse::decode(&mut answer, 4).unwrap();
    let states: Vec<(String, String)> = listed
        .groups
        .iter()
        .map(|g| (g.group_id.0.to_string(), g.group_state.to_string()))
        .collect();
    assert!(
        states.contains(&(group.clone(), "Empty".to_string())),
        "{states:?}"
    );
    let asked = DescribeGroupsRequest::default().with_groups(vec![group_id.clone()]);
    let mut answer = call(&mut stream, ApiKey::DescribeGroups, 5, &asked).await;
    let described = DescribeGroupsResponse::decode(&mut answer, 5).unwrap();
    let g = &described.groups[0];
    assert_eq!((g.error_code, g.group_state.as_str()), (0, "Empty"));
    let asked = DeleteGroupsRequest::default().with_groups_names(vec![group_id]);
    let mut answer = call(&mut stream, ApiKey::DeleteGroups, 2, &asked).await;
    let deleted = DeleteGroupsResponse::decode(&mut answer, 2).unwrap();
    assert_eq!(deleted.results[0].error_code, 0, "{deleted:?}");
    let gone = reqwest::get(format!(
        "{}/queues/{name}/groups/{group}",
        cluster.http(leader)
    ))
    .await
    .unwrap();
    assert_eq!(gone.status(), reqwest::StatusCode::NOT_FOUND);
}
