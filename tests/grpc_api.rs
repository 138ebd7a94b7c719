//! The gRPC API against a real server, with the client generated from the proto.

mod common;

use std::time::Duration;

use common::TestServer;
use qit::proto::broker_client::BrokerClient;
use qit::proto::{self, receive_request, receive_response, subscribe_request};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

async fn client(s: &TestServer) -> BrokerClient<Channel> {
    BrokerClient::connect(s.grpc.clone()).await.unwrap()
}

async fn create(c: &mut BrokerClient<Channel>, queue: &str) {
    c.create_queue(proto::CreateQueueRequest {
        queue: queue.into(),
        settings: None,
    })
    .await
    .unwrap();
}

async fn send(c: &mut BrokerClient<Channel>, queue: &str, bodies: &[&str]) -> Vec<String> {
    let messages = bodies
        .iter()
        .map(|b| proto::OutgoingMessage {
            body: bytes::Bytes::copy_from_slice(b.as_bytes()),
            content_type: Some("text/plain".into()),
            ..Default::default()
        })
        .collect();
    c.send_message(proto::SendMessageRequest {
        queue: queue.into(),
        messages,
    })
    .await
    .unwrap()
    .into_inner()
    .messages
    .into_iter()
    .map(|m| m.id)
    .collect()
}

fn open(queue: &str, credit: u32) -> proto::ReceiveRequest {
    proto::ReceiveRequest {
        request: Some(receive_request::Request::Open(proto::OpenStream {
            queue: queue.into(),
            group: String::new(),
            max_in_flight: credit,
            visibility_ms: None,
        })),
    }
}

/// Opens a `ReceiveMessages` stream on `queue` with `credit`: the request sender and the
/// answers.
async fn open_stream(
    c: &mut BrokerClient<Channel>,
    queue: &str,
    credit: u32,
) -> (
    mpsc::Sender<proto::ReceiveRequest>,
    tonic::Streaming<proto::ReceiveResponse>,
) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(open(queue, credit)).await.unwrap();
    let stream = c
        .receive_messages(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

fn ack(id: &str) -> proto::ReceiveRequest {
    proto::ReceiveRequest {
        request: Some(receive_request::Request::Ack(proto::StreamAck {
            id: id.into(),
        })),
    }
}

async fn next_message(
    stream: &mut tonic::Streaming<proto::ReceiveResponse>,
    wait: Duration,
) -> Option<proto::Message> {
    match tokio::time::timeout(wait, stream.next()).await {
        Ok(Some(Ok(proto::ReceiveResponse {
            response: Some(receive_response::Response::Message(m)),
        }))) => Some(m),
        Ok(Some(Ok(other))) => panic!("unexpected response {other:?}"),
        Ok(Some(Err(status))) => panic!("stream failed: {status}"),
        Ok(None) | Err(_) => None,
    }
}

#[tokio::test]
async fn send_receive_ack_then_subscribe_replays_and_follows() {
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    create(&mut c, "g").await;
    let ids = send(&mut c, "g", &["one", "two"]).await;
    assert_eq!(ids, vec!["0-0", "0-1"]);
    let (tx, mut stream) = open_stream(&mut c, "g", 10).await;
    for want in ["one", "two"] {
        let m = next_message(&mut stream, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(&m.body[..], want.as_bytes());
        assert_eq!(m.delivery_count, 1);
        tx.send(ack(&m.id)).await.unwrap();
    }
    // A live message arrives on the open stream.
    send(&mut c, "g", &["three"]).await;
    let m = next_message(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&m.body[..], b"three");
    tx.send(ack(&m.id)).await.unwrap();
    drop(tx);
    // Acks were applied: the group is done.
    common::eventually("the stream's acks are applied", || {
        let mut c = c.clone();
        async move {
            let info = c
                .get_queue(proto::GetQueueRequest { queue: "g".into() })
                .await
                .unwrap()
                .into_inner();
            info.groups[0].backlog == 0
        }
    })
    .await;
    // Subscribe replays from offset 1, then follows.
    let mut sub = c
        .subscribe(proto::SubscribeRequest {
            queue: "g".into(),
            partition: 0,
            start: Some(subscribe_request::Start::FromOffset(1)),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = sub.next().await.unwrap().unwrap().message.unwrap();
        got.push(String::from_utf8(m.body.to_vec()).unwrap());
    }
    assert_eq!(got, vec!["two", "three"]);
    send(&mut c, "g", &["four"]).await;
    let live = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&live.message.unwrap().body[..], b"four");
    let mut by_time = c
        .subscribe(proto::SubscribeRequest {
            queue: "g".into(),
            partition: 0,
            start: Some(subscribe_request::Start::FromTimeMs(0)),
        })
        .await
        .unwrap()
        .into_inner();
    let first = by_time.next().await.unwrap().unwrap().message.unwrap();
    assert_eq!(first.offset, 0);
    s.stop().await;
}

#[tokio::test]
async fn credit_is_never_exceeded_and_a_dropped_stream_returns_its_leases() {
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    create(&mut c, "credit").await;
    send(&mut c, "credit", &["a", "b", "c", "d", "e"]).await;
    let (tx, mut stream) = open_stream(&mut c, "credit", 2).await;
    let first = next_message(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    let _second = next_message(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        next_message(&mut stream, Duration::from_millis(700))
            .await
            .is_none(),
        "a third message would exceed the credit of 2"
    );
    tx.send(ack(&first.id)).await.unwrap();
    let third = next_message(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&third.body[..], b"c");
    tx.send(proto::ReceiveRequest {
        request: Some(receive_request::Request::Credit(proto::Credit { add: 1 })),
    })
    .await
    .unwrap();
    let fourth = next_message(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&fourth.body[..], b"d");
    // A bad ack answers an error on the stream and keeps it open.
    tx.send(ack("0-999")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
        Ok(Some(Ok(proto::ReceiveResponse {
            response: Some(receive_response::Response::Error(e)),
        }))) => assert_eq!(e.id, "0-999"),
        other => panic!("expected a stream error, got {other:?}"),
    }
    drop(tx);
    drop(stream);
    // b, c, d go back to the group at once; e was never delivered.
    let mut left = Vec::new();
    for _ in 0..50 {
        let (tx, rx) = mpsc::channel(16);
        tx.send(open("credit", 10)).await.unwrap();
        let mut again = c
            .receive_messages(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        left.clear();
        while let Some(m) = next_message(&mut again, Duration::from_millis(500)).await {
            left.push(String::from_utf8(m.body.to_vec()).unwrap());
        }
        if left.len() == 4 {
            break;
        }
    }
    left.sort();
    assert_eq!(left, vec!["b", "c", "d", "e"]);
    s.stop().await;
}

/// A consumer may settle what its stream leased with unary calls (over any connection, or
/// HTTP): an ack frees the stream's credit at once, not when the lease would have run out.
#[tokio::test]
async fn a_unary_ack_frees_the_credit_of_the_stream_that_leased_the_message() {
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    create(&mut c, "unary").await;
    send(&mut c, "unary", &["a", "b", "c"]).await;
    let (tx, mut stream) = open_stream(&mut c, "unary", 1).await;
    let first = next_message(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&first.body[..], b"a");
    c.ack_message(proto::AckMessageRequest {
        queue: "unary".into(),
        group: String::new(),
        id: first.id,
    })
    .await
    .unwrap();
    // The lease would run out only after the queue's ack_timeout (30 s).
    let second = next_message(&mut stream, Duration::from_secs(10))
        .await
        .expect("the unary ack freed the stream's only credit");
    assert_eq!(&second.body[..], b"b");
    let acked = reqwest::Client::new()
        .delete(format!("{}/queues/unary/messages/{}", s.http, second.id))
        .send()
        .await
        .unwrap();
    assert!(acked.status().is_success(), "{}", acked.status());
    let third = next_message(&mut stream, Duration::from_secs(10))
        .await
        .expect("the HTTP ack freed the stream's only credit");
    assert_eq!(&third.body[..], b"c");
    drop(tx);
    s.stop().await;
}

#[tokio::test]
async fn errors_use_fitting_status_codes() {
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    create(&mut c, "e").await;
    let code = |r: Result<tonic::Response<proto::CreateQueueResponse>, tonic::Status>| {
        r.unwrap_err().code()
    };
    let conflicting = c
        .create_queue(proto::CreateQueueRequest {
            queue: "e".into(),
            settings: Some(proto::QueueSettings {
                partitions: Some(4),
                ..Default::default()
            }),
        })
        .await;
    assert_eq!(code(conflicting), Code::AlreadyExists);
    let invalid = c
        .create_queue(proto::CreateQueueRequest {
            queue: "no spaces".into(),
            settings: None,
        })
        .await;
    assert_eq!(code(invalid), Code::InvalidArgument);
    let missing = c
        .send_message(proto::SendMessageRequest {
            queue: "nope".into(),
            messages: vec![proto::OutgoingMessage::default()],
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad_id = c
        .ack_message(proto::AckMessageRequest {
            queue: "e".into(),
            group: String::new(),
            id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_id.code(), Code::InvalidArgument);
    send(&mut c, "e", &["m"]).await;
    let not_leased = c
        .nack_message(proto::NackMessageRequest {
            queue: "e".into(),
            group: String::new(),
            id: "0-0".into(),
            delay_ms: None,
        })
        .await
        .unwrap_err();
    assert_eq!(not_leased.code(), Code::FailedPrecondition);
    let (tx, rx) = mpsc::channel(1);
    tx.send(ack("0-0")).await.unwrap();
    let not_open = c
        .receive_messages(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(not_open.code(), Code::InvalidArgument);
    s.stop().await;
}

fn group_request(queue: &str, group: &str) -> proto::GetGroupRequest {
    proto::GetGroupRequest {
        queue: queue.into(),
        group: group.into(),
    }
}

fn seek(group: &str, target: proto::seek_group_request::Target) -> proto::SeekGroupRequest {
    proto::SeekGroupRequest {
        queue: "gq".into(),
        group: group.into(),
        target: Some(target),
    }
}

/// `GetGroup`, `SeekGroup` and `DeleteGroup` do over gRPC what the HTTP group routes do: a
/// group's offsets and leases, a move to an offset, a time or either end, and a delete
/// refused while a message is in flight and done once none is.
#[tokio::test]
async fn groups_are_read_moved_and_deleted() {
    use proto::seek_group_request::Target;
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    create(&mut c, "gq").await;
    send(&mut c, "gq", &["a", "b", "c"]).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(proto::ReceiveRequest {
        request: Some(receive_request::Request::Open(proto::OpenStream {
            queue: "gq".into(),
            group: "workers".into(),
            max_in_flight: 1,
            visibility_ms: None,
        })),
    })
    .await
    .unwrap();
    let mut stream = c
        .receive_messages(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = next_message(&mut stream, Duration::from_secs(10))
        .await
        .expect("a message");
    let group = c
        .get_group(group_request("gq", "workers"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (group.name.as_str(), group.in_flight, group.backlog),
        ("workers", 1, 3),
        "{group:?}"
    );
    assert_eq!(group.partitions[0].committed_offset, 0, "{group:?}");
    let delete = proto::DeleteGroupRequest {
        queue: "gq".into(),
        group: "workers".into(),
    };
    let in_use = c.delete_group(delete.clone()).await.unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition, "{in_use:?}");
    // Closing the stream returns its lease at once.
    drop((tx, stream));
    common::eventually("the closed stream's lease returns", || {
        let mut c = c.clone();
        async move {
            c.get_group(group_request("gq", "workers"))
                .await
                .is_ok_and(|g| g.into_inner().in_flight == 0)
        }
    })
    .await;
    let latest = c
        .seek_group(seek("workers", Target::To("latest".into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (latest.backlog, latest.partitions[0].committed_offset),
        (0, 3)
    );
    let one = c
        .seek_group(seek(
            "workers",
            Target::Offset(proto::PartitionOffset {
                partition: 0,
                offset: 1,
            }),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((one.backlog, one.partitions[0].committed_offset), (2, 1));
    let from_start = c
        .seek_group(seek("workers", Target::FromTimeMs(first.timestamp_ms)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(from_start.backlog, 3, "{from_start:?}");
    for bad in [
        Some(Target::To("sideways".into())),
        Some(Target::FromTimeMs(-1)),
        None,
    ] {
        let request = proto::SeekGroupRequest {
            queue: "gq".into(),
            group: "workers".into(),
            target: bad.clone(),
        };
        let refused = c.seek_group(request).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{bad:?}: {refused:?}"
        );
    }
    c.delete_group(delete.clone()).await.unwrap();
    for (queue, group) in [("gq", "workers"), ("nope", "workers")] {
        let missing = c.get_group(group_request(queue, group)).await.unwrap_err();
        assert_eq!(missing.code(), Code::NotFound, "{queue}/{group}");
    }
    let again = c.delete_group(delete).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    // An empty name means `default`, which every queue has.
    let default = c
        .get_group(group_request("gq", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((default.name.as_str(), default.backlog), ("default", 3));
    s.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_broker_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let s = TestServer::start().await;
    let channel = Channel::from_shared(s.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = c
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"qit.v1.Broker".to_string()), "{names:?}");
    s.stop().await;
}

/// Regression: competing streams of one group must see every message exactly once when
/// nothing fails, and every ack sent on a stream must land (no message left unacked).
#[tokio::test]
async fn competing_streams_deliver_each_message_once_and_every_ack_lands() {
    const MESSAGES: usize = 20_000;
    const CONSUMERS: usize = 4;
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    c.create_queue(proto::CreateQueueRequest {
        queue: "work".into(),
        settings: Some(proto::QueueSettings {
            partitions: Some(4),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        u32,
    >::new()));
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let mut c = client(&s).await;
        let seen = std::sync::Arc::clone(&seen);
        consumers.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(4096);
            tx.send(open("work", 500)).await.unwrap();
            let mut stream = c
                .receive_messages(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            // Consume until every message was seen by some consumer (not until the stream
            // is idle for a while: a busy machine can pause the publisher for longer).
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            while seen.lock().unwrap().len() < MESSAGES && std::time::Instant::now() < deadline {
                if let Some(m) = next_message(&mut stream, Duration::from_millis(200)).await {
                    *seen.lock().unwrap().entry(m.id.clone()).or_default() += 1;
                    tx.send(ack(&m.id)).await.unwrap();
                }
            }
            // The caller keeps the stream open until every ack was applied.
            (tx, stream)
        }));
    }
    for chunk in 0..MESSAGES / 500 {
        let bodies: Vec<String> = (0..500).map(|i| format!("m{}", chunk * 500 + i)).collect();
        let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
        send(&mut c, "work", &refs).await;
    }
    let mut open_streams = Vec::new();
    for consumer in consumers {
        open_streams.push(consumer.await.unwrap());
    }
    {
        let seen = seen.lock().unwrap();
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "delivered more than once: {twice:?}");
        assert_eq!(seen.len(), MESSAGES);
    }
    common::eventually("every ack sent on the streams is applied", || {
        let mut c = c.clone();
        async move {
            let info = c
                .get_queue(proto::GetQueueRequest {
                    queue: "work".into(),
                })
                .await
                .unwrap()
                .into_inner();
            info.groups[0].backlog == 0
        }
    })
    .await;
    drop(open_streams);
    s.stop().await;
}

/// Regression (issue 11, item 6): background tasks (the broker's timer and dead-letter
/// worker, every gRPC stream, the listeners) were spawned and never joined, so work could
/// outlive shutdown. They are tracked now, and a stop joins every one of them, even with
/// streams still open on the client side.
#[tokio::test]
async fn stop_joins_every_background_task_with_streams_open() {
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    create(&mut c, "joined").await;
    // The server answered over gRPC: its listeners and timers were spawned before.
    let before = s.broker.tasks().len();
    let (tx, rx) = mpsc::channel(16);
    tx.send(open("joined", 10)).await.unwrap();
    let receiving = c
        .receive_messages(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let subscribed = c
        .subscribe(proto::SubscribeRequest {
            queue: "joined".into(),
            partition: 0,
            start: Some(subscribe_request::Start::FromOffset(0)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.broker.tasks().len(),
        before + 2,
        "each stream runs as a tracked task"
    );
    let broker = std::sync::Arc::clone(&s.broker);
    s.stop().await;
    assert!(broker.tasks().is_closed(), "shutdown closed the tracker");
    assert!(
        broker.tasks().is_empty(),
        "{} tasks outlived the server",
        broker.tasks().len()
    );
    drop((tx, receiving, subscribed));
}
