//! Resource limits against hostile clients (issue 19): slow or silent HTTP clients are cut
//! off, connections are capped, and the groups of a queue are capped, over HTTP and gRPC.

mod common;

use std::time::Duration;

use common::{TestServer, http};
use qit::proto::broker_client::BrokerClient;
use qit::proto::{self, receive_request};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::StreamExt;

/// A failure guard only: what the tests wait for happens long before.
const GUARD: Duration = Duration::from_secs(20);

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Regression (issue 19, item 9): a client that never finishes its request headers
/// (slowloris) held its connection forever; now it is closed after the header timeout.
#[tokio::test]
async fn unfinished_headers_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), |c| c.header_timeout_secs = 1).await;
    let mut slow = TcpStream::connect(addr(&s.http)).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: qit\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(GUARD, slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was not closed");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    s.stop().await;
}

/// Regression (issue 19, item 9): idle sockets took every descriptor. Connections are
/// capped: past the cap a new one waits until an open one closes.
#[tokio::test]
async fn connections_over_the_cap_wait_for_a_free_slot() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), |c| {
        c.max_connections = 2;
        c.header_timeout_secs = 600;
    })
    .await;
    let idle_one = TcpStream::connect(addr(&s.http)).await.unwrap();
    let _idle_two = TcpStream::connect(addr(&s.http)).await.unwrap();
    let url = format!("{}/healthz", s.http);
    let health = tokio::spawn(async move { http().get(url).send().await.unwrap().status() });
    let mut health = std::pin::pin!(health);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut health)
            .await
            .is_err(),
        "a third connection was served while two held the cap"
    );
    drop(idle_one);
    let status = tokio::time::timeout(GUARD, health).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    s.stop().await;
}

/// Regression (issue 19, item 13): `?group=gN` receives added groups (each a journal and
/// state) without bound. Groups per queue are capped: 429 over HTTP, RESOURCE_EXHAUSTED
/// over gRPC; existing groups keep working.
#[tokio::test]
async fn groups_per_queue_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), |c| c.max_groups_per_queue = 3).await;
    let c = http();
    let created = c.post(format!("{}/queues/q", s.http)).send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    // `default` is the first group.
    for (group, status) in [
        ("g1", StatusCode::OK),
        ("g2", StatusCode::OK),
        ("g3", StatusCode::TOO_MANY_REQUESTS),
        ("g1", StatusCode::OK),
        ("default", StatusCode::OK),
    ] {
        let r = c
            .get(format!("{}/queues/q/messages?group={group}", s.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{group}");
        if status == StatusCode::TOO_MANY_REQUESTS {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "limit_reached");
        }
    }
    let mut grpc = BrokerClient::connect(s.grpc.clone()).await.unwrap();
    let open = proto::ReceiveRequest {
        request: Some(receive_request::Request::Open(proto::OpenStream {
            queue: "q".into(),
            group: "g4".into(),
            max_in_flight: 1,
            visibility_ms: None,
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(open).await.unwrap();
    let status = match grpc
        .receive_messages(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            tokio::time::timeout(GUARD, stream.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap_err()
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    s.stop().await;
}
