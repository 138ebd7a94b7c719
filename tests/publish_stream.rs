//! The `Publish` stream against a real server: pipelined requests matched by `seq`, each
//! request's messages contiguous and in order, per-request errors that keep the stream
//! open, durability under `--fsync always` (answered only once readable, i.e. synced),
//! and flow control of a producer that stops reading responses.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
use qit::log::FsyncPolicy;
use qit::proto::broker_client::BrokerClient;
use qit::proto::{self, PublishRequest, PublishResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

async fn client(s: &TestServer) -> BrokerClient<Channel> {
    BrokerClient::connect(s.grpc.clone()).await.unwrap()
}

async fn create(c: &mut BrokerClient<Channel>, queue: &str, settings: proto::QueueSettings) {
    c.create_queue(proto::CreateQueueRequest {
        queue: queue.into(),
        settings: Some(settings),
    })
    .await
    .unwrap();
}

fn body(text: String) -> proto::OutgoingMessage {
    proto::OutgoingMessage {
        body: Bytes::from(text),
        ..Default::default()
    }
}

fn request(seq: u64, queue: &str, bodies: Vec<String>) -> PublishRequest {
    PublishRequest {
        seq,
        queue: queue.into(),
        messages: bodies.into_iter().map(body).collect(),
    }
}

/// Opens a `Publish` stream fed by the returned sender.
async fn open(
    c: &mut BrokerClient<Channel>,
    buffer: usize,
) -> (mpsc::Sender<PublishRequest>, Streaming<PublishResponse>) {
    let (tx, rx) = mpsc::channel(buffer);
    let responses = c
        .publish(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

/// Every message of partition 0 from offset 0, as (offset, body).
async fn stored(c: &mut BrokerClient<Channel>, queue: &str, count: usize) -> Vec<(u64, String)> {
    let mut sub = c
        .subscribe(proto::SubscribeRequest {
            queue: queue.into(),
            partition: 0,
            start: Some(proto::subscribe_request::Start::FromOffset(0)),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while out.len() < count {
        let m = sub.message().await.unwrap().unwrap().message.unwrap();
        out.push((m.offset, String::from_utf8(m.body.to_vec()).unwrap()));
    }
    out
}

async fn next_offset(c: &mut BrokerClient<Channel>, queue: &str) -> u64 {
    let info = c
        .get_queue(proto::GetQueueRequest {
            queue: queue.into(),
        })
        .await
        .unwrap()
        .into_inner();
    info.partitions[0].next_offset
}

#[tokio::test]
async fn pipelined_requests_are_answered_once_each_with_contiguous_runs() {
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    create(&mut c, "p", proto::QueueSettings::default()).await;
    let (tx, mut responses) = open(&mut c, 1024).await;
    let sizes: HashMap<u64, usize> = (1..=300u64)
        .map(|seq| (seq, 1 + seq as usize % 3))
        .collect();
    for seq in 1..=300u64 {
        let bodies = (0..sizes[&seq]).map(|i| format!("{seq}/{i}")).collect();
        tx.send(request(seq, "p", bodies)).await.unwrap();
    }
    drop(tx);
    let mut answered: HashMap<u64, Vec<u64>> = HashMap::new();
    while let Some(r) = responses.message().await.unwrap() {
        assert!(r.error.is_none(), "seq {}: {:?}", r.seq, r.error);
        let offsets = r.messages.iter().map(|m| m.offset).collect();
        assert!(
            answered.insert(r.seq, offsets).is_none(),
            "seq {} twice",
            r.seq
        );
    }
    assert_eq!(answered.len(), 300);
    let total: usize = sizes.values().sum();
    let log = stored(&mut c, "p", total).await;
    for (seq, offsets) in &answered {
        assert_eq!(offsets.len(), sizes[seq]);
        for (i, offset) in offsets.iter().enumerate() {
            assert_eq!(*offset, offsets[0] + i as u64, "seq {seq} not contiguous");
            assert_eq!(log[*offset as usize].1, format!("{seq}/{i}"));
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn a_bad_request_gets_an_error_and_the_stream_stays_open() {
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    let small = proto::QueueSettings {
        max_message_bytes: Some(16),
        ..Default::default()
    };
    create(&mut c, "b", small).await;
    let (tx, mut responses) = open(&mut c, 16).await;
    let mut bad_header = request(5, "b", vec!["h".into()]);
    bad_header.messages[0]
        .headers
        .insert("bad name\n".into(), "v".into());
    let requests = vec![
        request(1, "b", vec!["first".into()]),
        request(2, "nope", vec!["lost".into()]),
        request(3, "b", vec!["x".repeat(17)]),
        request(4, "b", vec![]),
        bad_header,
        request(6, "", vec!["no queue".into()]),
        request(7, "b", vec!["last".into()]),
    ];
    for r in requests {
        tx.send(r).await.unwrap();
    }
    let mut got = HashMap::new();
    for _ in 0..7 {
        let r = responses.message().await.unwrap().unwrap();
        got.insert(r.seq, r);
    }
    let code = |seq: u64| got[&seq].error.as_ref().map(|e| Code::from(e.code as i32));
    assert_eq!(code(1), None);
    assert_eq!(code(2), Some(Code::NotFound));
    assert!(matches!(
        code(3),
        Some(Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange)
    ));
    assert_eq!(code(4), Some(Code::InvalidArgument));
    assert_eq!(code(5), Some(Code::InvalidArgument));
    assert!(code(6).is_some());
    assert_eq!(code(7), None);
    assert!(got[&2].messages.is_empty());
    // Nothing of the bad requests was stored; the good ones were, in order.
    assert_eq!(got[&1].messages[0].offset, 0);
    assert_eq!(got[&7].messages[0].offset, 1);
    assert_eq!(next_offset(&mut c, "b").await, 2);
    // Still open: one more request after the errors.
    tx.send(request(8, "b", vec!["more".into()])).await.unwrap();
    let r = responses.message().await.unwrap().unwrap();
    assert_eq!((r.seq, r.error), (8, None));
    drop(tx);
    assert!(responses.message().await.unwrap().is_none());
    s.stop().await;
}

/// Under `--fsync always` a message is readable only once it is synced, so a response that
/// came before the sync would name offsets not yet readable.
#[tokio::test]
async fn under_fsync_always_every_answered_message_is_already_synced() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(dir.path(), FsyncPolicy::Always).await;
    let mut c = client(&s).await;
    create(&mut c, "d", proto::QueueSettings::default()).await;
    let (tx, mut responses) = open(&mut c, 256).await;
    for seq in 1..=200u64 {
        tx.send(request(seq, "d", vec![format!("m{seq}")]))
            .await
            .unwrap();
    }
    for _ in 0..200 {
        let r = responses.message().await.unwrap().unwrap();
        assert!(r.error.is_none());
        let end = r.messages[0].offset + 1;
        assert!(
            next_offset(&mut c, "d").await >= end,
            "seq {} answered before offset {} was synced",
            r.seq,
            end - 1
        );
    }
    drop(tx);
    s.stop().await;
    // And it is all there after a restart.
    let s = TestServer::start_in(dir.path(), FsyncPolicy::Always).await;
    let mut c = client(&s).await;
    assert_eq!(next_offset(&mut c, "d").await, 200);
    s.stop().await;
}

/// A producer that stops reading responses is held back (bounded buffering), and once it
/// reads again every request it managed to send is answered. The client's small windows
/// make the bound come soon; the server's own bound is `MAX_PENDING` requests being stored
/// plus `RESPONSE_BUFFER` responses plus the HTTP/2 windows.
#[tokio::test]
async fn a_producer_that_stops_reading_is_flow_controlled() {
    let s = TestServer::start().await;
    let channel = Endpoint::from_shared(s.grpc.clone())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut c = BrokerClient::new(channel);
    create(&mut c, "f", proto::QueueSettings::default()).await;
    let (tx, mut responses) = open(&mut c, 1).await;
    let limit = 50_000u64;
    let mut sent = 0u64;
    // 20 messages per request: requests and responses are frames of at least 256 bytes,
    // which h2 (0.4.20) does not count against its budget for small unread DATA frames (a
    // client that leaves thousands of tiny frames unread is disconnected by its own h2).
    while sent < limit {
        let r = request(
            sent + 1,
            "f",
            (0..20).map(|i| format!("body-{i}")).collect(),
        );
        // The guard only decides when to stop trying: a server that buffered without bound
        // would take all `limit` requests and fail the assertion below.
        match tokio::time::timeout(Duration::from_secs(3), tx.send(r)).await {
            Ok(sent_ok) => sent_ok.unwrap(),
            Err(_) => break,
        }
        sent += 1;
    }
    assert!(
        sent < limit,
        "the server took {sent} requests without being read"
    );
    drop(tx);
    let mut answered = 0;
    while let Some(r) = responses.message().await.unwrap() {
        assert!(r.error.is_none());
        answered += 1;
    }
    // A send that timed out was cancelled and sent nothing.
    assert_eq!(answered, sent);
    s.stop().await;
}
