//! One API on every node, over gRPC (issue 13): a script of gRPC calls, good and bad,
//! unary and streaming, gets the same answers from each node of a three-node cluster as
//! from a single node. As in `cluster_parity.rs` (the HTTP script), timestamps, sizes on
//! disk and the wording of errors are left out of the comparison (status codes and stream
//! error codes are compared); ids, partitions, offsets and delivery counts are compared.

mod common;

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use common::TestServer;
use common::cluster::Cluster;
use qit::proto::broker_client::BrokerClient;
use qit::proto::{self, receive_request, receive_response, seek_group_request, subscribe_request};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long a stream may take to yield a message the script knows is there.
const STREAM_WAIT: Duration = Duration::from_secs(30);

/// The queue the lease script consumes.
const LEASED: &str = "gl";

/// The answers a server gave, one line per call.
struct Transcript {
    client: BrokerClient<Channel>,
    lines: Vec<String>,
    /// The HTTP base of the server when it is a cluster node.
    cluster_http: Option<String>,
}

impl Transcript {
    async fn new(grpc: &str, cluster_http: Option<String>) -> Self {
        Self {
            client: BrokerClient::connect(grpc.to_string())
                .await
                .expect("connect"),
            lines: Vec::new(),
            cluster_http,
        }
    }

    /// On a cluster node: waits until every partition of `queue` is led by its preferred
    /// replica, as the node sees it. The cluster hands each partition to its preferred
    /// replica soon after the queue is made; a handover in the middle of the script can
    /// answer a call 503 after its entry was written, and the retry then stores it again
    /// (at least once, as the API says), so the transcript would no longer match a single
    /// node's.
    async fn settle_leaders(&self, queue: &str) {
        let Some(base) = &self.cluster_http else {
            return;
        };
        let url = format!("{base}/cluster");
        common::eventually(
            &format!("{queue} is led by its preferred replicas"),
            || async {
                let Some(view) = common::cluster::view(&url).await else {
                    return false;
                };
                let mine: Vec<&serde_json::Value> = view["partitions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["queue"] == queue)
                    .collect();
                !mine.is_empty()
                    && mine
                        .iter()
                        .all(|p| p["leader"].as_u64().is_some() && p["leader"] == p["replicas"][0])
            },
        )
        .await;
    }

    /// Every node's own copy of each partition of `queue` ends at the same offset. A queue's
    /// info is read at the leader of its queue group, which follows the groups of the other
    /// partitions and applies their last entries a moment after a publish to them was
    /// answered (by the node that took it, once applied there): read at once, it may lack
    /// those (see the closing note of this change; not what this test compares).
    async fn settle_replicas(&self, queue: &str) {
        let Some(base) = &self.cluster_http else {
            return;
        };
        let url = format!("{base}/cluster");
        let offsets = |view: &serde_json::Value| -> Vec<(u64, u64)> {
            let mut offsets: Vec<(u64, u64)> = view["partitions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["queue"] == queue)
                .map(|p| {
                    let at = |field: &str| p[field].as_u64().unwrap_or(u64::MAX);
                    (at("partition"), at("committed_offset"))
                })
                .collect();
            offsets.sort_unstable();
            offsets
        };
        common::eventually(
            &format!("every node holds {queue} to the same offsets"),
            || async {
                let Some(view) = common::cluster::view(&url).await else {
                    return false;
                };
                let nodes: Vec<String> = view["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n["http"].as_str().map(|h| format!("http://{h}/cluster")))
                    .collect();
                let mut first: Option<Vec<(u64, u64)>> = None;
                for node in nodes {
                    let Some(view) = common::cluster::view(&node).await else {
                        return false;
                    };
                    let here = offsets(&view);
                    match &first {
                        None => first = Some(here),
                        Some(first) if *first != here => return false,
                        Some(_) => {}
                    }
                }
                first.is_some_and(|f| !f.is_empty())
            },
        )
        .await;
    }

    /// Runs a unary call (again while the cluster has no leader for it) and records its
    /// answer; returns it when it succeeded.
    async fn call<T, F, Fut>(&mut self, what: &str, mut make: F) -> Option<T>
    where
        T: Debug,
        F: FnMut(BrokerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        let answer = loop {
            match make(self.client.clone()).await {
                Err(status) if status.code() == Code::Unavailable => {
                    assert!(Instant::now() < deadline, "{what}: no answer in time");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other.map(tonic::Response::into_inner),
            }
        };
        match answer {
            Ok(value) => {
                self.record(what, &value);
                Some(value)
            }
            Err(status) => {
                self.lines
                    .push(format!("{what}: error {:?}", status.code()));
                None
            }
        }
    }

    fn record(&mut self, what: &str, value: &impl Debug) {
        self.lines
            .push(format!("{what}: {}", comparable(&format!("{value:?}"))));
    }
}

/// `text` (a message's debug form) with what differs between any two servers blanked
/// out: timestamps, sizes on disk and error wording.
fn comparable(text: &str) -> String {
    let mut out = text.to_string();
    for field in ["timestamp_ms: ", "bytes: ", "segments: "] {
        out = blank_numbers_after(&out, field);
    }
    blank_strings_after(&out, "message: \"")
}

fn blank_numbers_after(text: &str, field: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(field) {
        let (head, tail) = rest.split_at(at + field.len());
        out.push_str(head);
        out.push('_');
        rest = tail.trim_start_matches(|c: char| c.is_ascii_digit() || c == '-');
    }
    out.push_str(rest);
    out
}

fn blank_strings_after(text: &str, field: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(field) {
        let (head, tail) = rest.split_at(at + field.len());
        out.push_str(head);
        out.push('_');
        rest = tail.find('"').map_or("", |end| &tail[end..]);
    }
    out.push_str(rest);
    out
}

fn message(body: &str) -> proto::OutgoingMessage {
    proto::OutgoingMessage {
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        content_type: Some("text/plain".into()),
        ..Default::default()
    }
}

fn keyed(body: &str, key: &str) -> proto::OutgoingMessage {
    proto::OutgoingMessage {
        key: Some(key.into()),
        ..message(body)
    }
}

fn once(body: &str, idempotency_key: &str) -> proto::OutgoingMessage {
    proto::OutgoingMessage {
        idempotency_key: Some(idempotency_key.into()),
        ..message(body)
    }
}

fn send(queue: &str, messages: Vec<proto::OutgoingMessage>) -> proto::SendMessageRequest {
    proto::SendMessageRequest {
        queue: queue.into(),
        messages,
    }
}

fn request(request: receive_request::Request) -> proto::ReceiveRequest {
    proto::ReceiveRequest {
        request: Some(request),
    }
}

/// Queues made, misused, published to one message at a time, in a batch and on the
/// Publish stream, and read back by Subscribe.
async fn publish_script(t: &mut Transcript) {
    let settings = proto::QueueSettings {
        partitions: Some(3),
        max_deliveries: Some(2),
        backoff_secs: vec![0],
        ..Default::default()
    };
    for (what, queue, settings) in [
        ("create", "gq", Some(settings.clone())),
        ("create again", "gq", Some(settings)),
        (
            "create other settings",
            "gq",
            Some(proto::QueueSettings {
                partitions: Some(2),
                ..Default::default()
            }),
        ),
        ("create bad name", "bad/name", None),
        ("create dot dot", "..", None),
        (
            "create zero partitions",
            "gz",
            Some(proto::QueueSettings {
                partitions: Some(0),
                ..Default::default()
            }),
        ),
        (
            "create own dead letter",
            "gz",
            Some(proto::QueueSettings {
                dead_letter: Some("gz".into()),
                ..Default::default()
            }),
        ),
    ] {
        t.call(what, |mut c| {
            let settings = settings.clone();
            async move {
                c.create_queue(proto::CreateQueueRequest {
                    queue: queue.into(),
                    settings,
                })
                .await
            }
        })
        .await;
    }
    t.settle_leaders("gq").await;
    t.call("get missing", |mut c| async move {
        c.get_queue(proto::GetQueueRequest {
            queue: "nope".into(),
        })
        .await
    })
    .await;
    let sends = [
        ("send keyed", vec![keyed("k1-a", "k1")]),
        ("send keyless", vec![message("x1"), message("x2")]),
        ("send once", vec![once("o1", "i1")]),
        ("send once again", vec![once("o1", "i1")]),
        (
            "send mixed",
            vec![
                keyed("k2-a", "k2"),
                message("x3"),
                proto::OutgoingMessage {
                    headers: [("h".to_string(), "v".to_string())].into(),
                    content_type: None,
                    ..keyed("k1-b", "k1")
                },
            ],
        ),
        ("send nothing", vec![]),
    ];
    for (what, messages) in sends {
        t.call(what, |mut c| {
            let messages = messages.clone();
            async move { c.send_message(send("gq", messages)).await }
        })
        .await;
    }
    t.call("send to missing", |mut c| async move {
        c.send_message(send("nope", vec![message("lost")])).await
    })
    .await;
    // Three publishes, one of them to a missing queue.
    let requests = vec![
        ("gq", vec![message("s1"), message("s2")]),
        ("nope", vec![message("s-lost")]),
        ("gq", vec![keyed("k2-b", "k2")]),
    ];
    publish_stream(t, "publish stream", requests).await;
    // Then, on a stream of its own, a message too large and an idempotency key first sent
    // by `SendMessage` (on a cluster node that leads the key's partition, its sequencer
    // answers it): neither stores anything, so their answers do not depend on order.
    let too_large = proto::OutgoingMessage {
        body: bytes::Bytes::from(vec![b'x'; 1024 * 1024 + 1]),
        ..message("")
    };
    let requests = vec![
        ("gq", vec![too_large]),
        ("gq", vec![once("o1-again", "i1")]),
    ];
    publish_stream(t, "publish stream, nothing stored", requests).await;
    t.settle_replicas("gq").await;
    t.call("get", |mut c| async move {
        c.get_queue(proto::GetQueueRequest { queue: "gq".into() })
            .await
    })
    .await;
    // Every message each partition holds (as a single node places them), then from an
    // offset within. The counts are exact: asking for more waits out STREAM_WAIT.
    for (partition, from, count) in [(0, 0, 4), (1, 0, 4), (2, 0, 1), (1, 2, 2)] {
        subscribe(t, partition, from, count).await;
    }
    t.call("subscribe missing partition", |mut c| async move {
        c.subscribe(proto::SubscribeRequest {
            queue: "gq".into(),
            partition: 9,
            start: None,
        })
        .await
        .map(|r| r.map(|_| ()))
    })
    .await;
}

/// Publishes `requests` on one Publish stream and records their answers as one line `what`.
/// The contract orders the messages of one request only: requests read in different bursts
/// may be stored in either order by a cluster node, so a stream whose requests store
/// messages in the same partition is kept to a few small ones, which arrive together.
async fn publish_stream(
    t: &mut Transcript,
    what: &str,
    requests: Vec<(&'static str, Vec<proto::OutgoingMessage>)>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stream = tokio_stream::iter(requests.clone().into_iter().zip(1..).map(
            |((queue, messages), seq)| proto::PublishRequest {
                seq,
                queue: queue.into(),
                messages,
            },
        ));
        let mut answers = match t.client.clone().publish(stream).await {
            Ok(answers) => answers.into_inner(),
            Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(status) => panic!("publish stream: {status}"),
        };
        let mut got = Vec::new();
        while let Some(answer) = answers.next().await {
            got.push(answer.expect("publish answer"));
        }
        // A seq answered "no leader" cannot be sent again without moving the offsets of
        // the others: the calls before were all answered, so the queue has a leader, and
        // losing it here is a failure to report as such.
        let unavailable = got
            .iter()
            .any(|a| a.error.as_ref().is_some_and(|e| e.code == 503));
        assert!(!unavailable, "publish stream met no leader: {got:?}");
        got.sort_by_key(|a| a.seq);
        t.record(what, &got);
        return;
    }
}

/// Reads `count` messages of `partition` from `from` on a Subscribe stream.
async fn subscribe(t: &mut Transcript, partition: u32, from: u64, count: usize) {
    let mut stream = t
        .client
        .subscribe(proto::SubscribeRequest {
            queue: "gq".into(),
            partition,
            start: Some(subscribe_request::Start::FromOffset(from)),
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut got = Vec::new();
    while got.len() < count {
        match tokio::time::timeout(STREAM_WAIT, stream.next()).await {
            Ok(Some(Ok(answer))) => got.push(answer.message),
            Ok(Some(Err(status))) => {
                got.push(None);
                t.lines
                    .push(format!("subscribe {partition}: error {:?}", status.code()));
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    t.record(&format!("subscribe {partition} from {from}"), &got);
}

/// Leases on a ReceiveMessages stream, settled on the stream and by unary calls, and the
/// group looked at, moved and deleted. The queue has one partition: which partition a
/// lease visits first turns with every receive, and how many receives a stream makes
/// while it waits depends on timing.
async fn lease_script(t: &mut Transcript) {
    let settings = proto::QueueSettings {
        partitions: Some(1),
        max_deliveries: Some(2),
        backoff_secs: vec![0],
        ..Default::default()
    };
    t.call("create leased", |mut c| {
        let settings = settings.clone();
        async move {
            c.create_queue(proto::CreateQueueRequest {
                queue: LEASED.into(),
                settings: Some(settings),
            })
            .await
        }
    })
    .await;
    t.settle_leaders(LEASED).await;
    t.call("send leased", |mut c| async move {
        let messages = (0..8).map(|i| message(&format!("l{i}"))).collect();
        c.send_message(send(LEASED, messages)).await
    })
    .await;
    let (tx, rx) = mpsc::channel(16);
    tx.send(request(receive_request::Request::Open(proto::OpenStream {
        queue: LEASED.into(),
        group: "g1".into(),
        max_in_flight: 4,
        // Longer than the script takes: no lease runs out and comes back on its own.
        visibility_ms: Some(600_000),
    })))
    .await
    .expect("open");
    let mut stream = t
        .client
        .receive_messages(ReceiverStream::new(rx))
        .await
        .expect("receive stream")
        .into_inner();
    let leased = next_answers(t, &mut stream, "leased", 4).await;
    let ids: Vec<String> = leased.iter().filter_map(leased_id).collect();
    assert_eq!(ids.len(), 4, "four leases: {leased:?}");
    // Settled by unary calls, each answered once it is done.
    let acks = [
        ("ack", ids[0].as_str()),
        ("ack again", ids[0].as_str()),
        ("ack bad id", "garbage"),
        ("ack unknown id", "0-999"),
    ];
    for (what, id) in acks {
        t.call(what, |mut c| async move {
            c.ack_message(proto::AckMessageRequest {
                queue: LEASED.into(),
                group: "g1".into(),
                id: id.into(),
            })
            .await
        })
        .await;
    }
    // The unary ack freed one of the stream's four credits: it leases one more.
    next_answers(t, &mut stream, "leased after a unary ack", 1).await;
    t.call("extend", |mut c| {
        let id = ids[1].clone();
        async move {
            c.extend_lease(proto::ExtendLeaseRequest {
                queue: LEASED.into(),
                group: "g1".into(),
                id,
                visibility_ms: 60_000,
            })
            .await
        }
    })
    .await;
    t.call("nack", |mut c| {
        let id = ids[2].clone();
        async move {
            c.nack_message(proto::NackMessageRequest {
                queue: LEASED.into(),
                group: "g1".into(),
                id,
                delay_ms: Some(0),
            })
            .await
        }
    })
    .await;
    t.call("group after unary settles", |mut c| async move {
        c.get_group(proto::GetGroupRequest {
            queue: LEASED.into(),
            group: "g1".into(),
        })
        .await
    })
    .await;
    // A nack by a unary call frees no credit (the message is not done): two more come by
    // credit. The nacked message comes again among them, and as the stream already
    // counted it, a third comes too.
    tx.send(request(receive_request::Request::Credit(proto::Credit {
        add: 2,
    })))
    .await
    .expect("credit");
    let more = next_answers(t, &mut stream, "leased by credit", 3).await;
    // A bad id on the stream is answered with a stream error, before the acks after it
    // make room for more.
    tx.send(request(receive_request::Request::Nack(proto::StreamNack {
        id: "garbage".into(),
        delay_ms: None,
    })))
    .await
    .expect("stream nack");
    for id in more.iter().filter_map(leased_id) {
        tx.send(request(receive_request::Request::Ack(proto::StreamAck {
            id,
        })))
        .await
        .expect("stream ack");
    }
    next_answers(t, &mut stream, "stream error", 1).await;
    // The acks made room for the last message; it comes before the stream closes (else
    // whether it was leased would depend on timing).
    next_answers(t, &mut stream, "leased after stream acks", 1).await;
    drop(tx);
    // The stream's end returns its leases before the answers end.
    while stream.next().await.is_some() {}
    t.call("group after the stream", |mut c| async move {
        c.get_group(proto::GetGroupRequest {
            queue: LEASED.into(),
            group: "g1".into(),
        })
        .await
    })
    .await;
    group_calls(t).await;
}

/// The id of a leased message.
fn leased_id(answer: &proto::ReceiveResponse) -> Option<String> {
    match &answer.response {
        Some(receive_response::Response::Message(m)) => Some(m.id.clone()),
        _ => None,
    }
}

/// The next `count` answers of a receive stream, recorded in id order (a stream may
/// interleave its partitions differently from one server to another).
async fn next_answers(
    t: &mut Transcript,
    stream: &mut tonic::Streaming<proto::ReceiveResponse>,
    what: &str,
    count: usize,
) -> Vec<proto::ReceiveResponse> {
    let mut got = Vec::new();
    while got.len() < count {
        match tokio::time::timeout(STREAM_WAIT, stream.next()).await {
            Ok(Some(Ok(answer))) => got.push(answer),
            Ok(Some(Err(status))) => panic!("{what}: the stream failed: {status}"),
            Ok(None) | Err(_) => break,
        }
    }
    let mut sorted = got.clone();
    sorted.sort_by_key(|a| leased_id(a).unwrap_or_default());
    t.record(what, &sorted);
    got
}

async fn group_calls(t: &mut Transcript) {
    let seeks = [
        (
            "seek earliest",
            seek_group_request::Target::To("earliest".into()),
        ),
        (
            "seek nowhere",
            seek_group_request::Target::To("middle".into()),
        ),
        (
            "seek offset",
            seek_group_request::Target::Offset(proto::PartitionOffset {
                partition: 0,
                offset: 1,
            }),
        ),
        (
            "seek missing partition",
            seek_group_request::Target::Offset(proto::PartitionOffset {
                partition: 7,
                offset: 0,
            }),
        ),
        (
            "seek from time 0",
            seek_group_request::Target::FromTimeMs(0),
        ),
        (
            "seek latest",
            seek_group_request::Target::To("latest".into()),
        ),
    ];
    for (what, target) in seeks {
        t.call(what, |mut c| {
            let target = target.clone();
            async move {
                c.seek_group(proto::SeekGroupRequest {
                    queue: LEASED.into(),
                    group: "g1".into(),
                    target: Some(target),
                })
                .await
            }
        })
        .await;
    }
    for (what, queue, group) in [
        ("group", LEASED, "g1"),
        ("missing group", LEASED, "nope"),
        ("group of missing queue", "nope", "g1"),
    ] {
        t.call(what, |mut c| async move {
            c.get_group(proto::GetGroupRequest {
                queue: queue.into(),
                group: group.into(),
            })
            .await
        })
        .await;
    }
    for (what, group) in [("delete group", "g1"), ("delete group again", "g1")] {
        t.call(what, |mut c| async move {
            c.delete_group(proto::DeleteGroupRequest {
                queue: LEASED.into(),
                group: group.into(),
            })
            .await
        })
        .await;
    }
    for (what, queue) in [
        ("delete", "gq"),
        ("delete leased", LEASED),
        ("delete again", LEASED),
        ("delete dot dot", ".."),
        // Dead-letter queues stay when their queue goes; the script leaves nothing.
        ("delete dead letters", "gq.dlq"),
        ("delete leased dead letters", "gl.dlq"),
    ] {
        t.call(what, |mut c| async move {
            c.delete_queue(proto::DeleteQueueRequest {
                queue: queue.into(),
            })
            .await
        })
        .await;
    }
    t.call("list", |mut c| async move {
        c.list_queues(proto::ListQueuesRequest {}).await
    })
    .await;
}

/// The whole script's answers from the server at `grpc`.
async fn answers(grpc: &str, cluster_http: Option<String>) -> Vec<String> {
    let mut t = Transcript::new(grpc, cluster_http).await;
    publish_script(&mut t).await;
    lease_script(&mut t).await;
    t.lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_answers_grpc_as_a_single_node() {
    let single = TestServer::start().await;
    let cluster = Cluster::start().await;
    let want = answers(&single.grpc, None).await;
    assert!(
        want.iter()
            .any(|line| line.contains("error InvalidArgument"))
            && want.iter().any(|line| line.starts_with("leased:")),
        "the script leases messages and is refused some: {want:#?}"
    );
    // Each node runs the script in turn; the queue is led by whichever node the
    // placement picks, so some nodes serve it as followers.
    for node in &cluster.nodes {
        let got = answers(&node.grpc(), Some(node.http.clone())).await;
        assert_eq!(want.len(), got.len(), "node {}: {got:#?}", node.id);
        for (want, got) in want.iter().zip(&got) {
            assert_eq!(want, got, "node {} answered unlike a single node", node.id);
        }
    }
}
