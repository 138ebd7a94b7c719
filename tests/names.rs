//! Regression tests for issue 18 ("a queue named `..` deletes every queue: names must never
//! be paths"): hostile names over raw HTTP (paths sent as-is, like `curl --path-as-is`) and
//! gRPC are refused, and after every attempt, including deletes, another queue's messages
//! are all still there; a registry that holds such a name is refused at start; no accepted
//! name resolves outside `{data-dir}/queues`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{TestServer, http};
use proptest::prelude::*;
use qit::broker::{Broker, BrokerConfig, NewMessage, QueueSettings};
use qit::log::FsyncPolicy;
use qit::proto::{self, broker_client::BrokerClient};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// Messages put into the victim queue before the attacks.
const VICTIM_MESSAGES: usize = 5;

/// Sends `method path` over a fresh TCP connection exactly as written (no normalisation of
/// `.`/`..` or re-encoding) and returns the status and the JSON body, if any.
async fn raw(s: &TestServer, method: &str, path: &str) -> (u16, Value) {
    let addr = s.http.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = if path.ends_with("/messages") {
        "hello"
    } else {
        ""
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

async fn victim(s: &TestServer) {
    let r = http()
        .post(format!("{}/queues/victim", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for i in 0..VICTIM_MESSAGES {
        let r = http()
            .post(format!("{}/queues/victim/messages", s.http))
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
}

/// The victim's messages as read from its log, and that the data dir still holds it.
async fn assert_victim_intact(s: &TestServer, after: &str) {
    let r = http()
        .get(format!("{}/queues/victim/log?max=100", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "victim gone after {after}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["messages"].as_array().map(Vec::len),
        Some(VICTIM_MESSAGES),
        "victim lost messages after {after}"
    );
    assert!(
        s.dir.join("queues/victim/0").is_dir(),
        "victim's data dir gone after {after}"
    );
    assert!(
        s.dir.join("registry.journal").is_file(),
        "registry gone after {after}"
    );
}

/// Names under `{data_dir}/queues` and at the top of the data dir.
fn listing(dir: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let names = |d: &Path| {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect::<BTreeSet<_>>()
    };
    (names(&dir.join("queues")), names(dir))
}

/// Hostile names as they appear in a raw request path (already percent-encoded where a raw
/// byte could not be sent).
fn hostile_paths() -> Vec<String> {
    let mut names: Vec<String> = [
        ".",
        "..",
        "...",
        ".dlq",
        ".hidden",
        "%2E",
        "%2e%2e",
        "%2E%2E",
        ".%2e",
        "%2F",
        "%2f..",
        "..%2F..",
        "%2E%2E%2Fvictim",
        "%5C",
        "..%5C..",
        "a%00b",
        "%00",
        "victim%2F..",
        "a%20b",
        // Unicode look-alikes: fullwidth full stops, one-dot leader, fullwidth solidus,
        // Cyrillic `а` in `victim`.
        "%EF%BC%8E%EF%BC%8E",
        "%E2%80%A4%E2%80%A4",
        "%EF%BC%8F",
        "vict%D0%B8m",
        // Not UTF-8 at all.
        "%FF%FE",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    names.push("a".repeat(201));
    names.push("x".repeat(5000));
    names
}

#[tokio::test]
async fn hostile_names_over_http_are_refused_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(dir.path(), FsyncPolicy::Interval).await;
    victim(&s).await;
    let before = listing(&s.dir);
    for name in hostile_paths() {
        for (method, path) in [
            ("POST", format!("/queues/{name}")),
            ("POST", format!("/queues/{name}/messages")),
            ("GET", format!("/queues/{name}/messages?group=victim")),
            ("POST", format!("/queues/{name}/redrive")),
            ("POST", format!("/exchanges/{name}")),
            ("GET", format!("/queues/victim/messages?group={name}")),
            ("PUT", format!("/queues/victim/groups/{name}/offset")),
            ("DELETE", format!("/exchanges/{name}")),
            ("DELETE", format!("/queues/{name}")),
        ] {
            let (status, body) = raw(&s, method, &path).await;
            let what = format!("{method} {path}");
            assert!(
                (400..500).contains(&status),
                "{what} answered {status} {body}"
            );
            if status == 400 && !body.is_null() && method != "PUT" {
                let code = body["error"]["code"].as_str().unwrap_or("");
                assert!(
                    ["invalid_name", "bad_request"].contains(&code),
                    "{what}: {body}"
                );
            }
            assert_victim_intact(&s, &what).await;
        }
    }
    assert_eq!(listing(&s.dir), before, "nothing was created or removed");
    // Raw single-segment `..`, `.` and `...` get the clear name error.
    for name in [".", "..", "...", ".dlq", "%2e%2e"] {
        let (status, body) = raw(&s, "POST", &format!("/queues/{name}")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_name")),
            "{name}"
        );
        let (status, body) = raw(&s, "DELETE", &format!("/queues/{name}")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_name")),
            "{name}"
        );
    }
    s.stop().await;
    let s = TestServer::start_in(dir.path(), FsyncPolicy::Interval).await;
    assert_victim_intact(&s, "a restart").await;
    s.stop().await;
}

#[tokio::test]
async fn hostile_names_over_grpc_are_refused_and_lose_nothing() {
    let s = TestServer::start().await;
    victim(&s).await;
    let before = listing(&s.dir);
    let mut c = BrokerClient::connect(s.grpc.clone()).await.unwrap();
    let mut names: Vec<String> = [
        ".",
        "..",
        "...",
        ".dlq",
        "/",
        "\\",
        "a/b",
        "../victim",
        "..\\..",
        "a\0b",
        "\0",
        "%2F",
        "%2e%2e",
        "．．",
        "․․",
        "／",
        "victіm",
        "",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    names.push("a".repeat(201));
    for name in &names {
        let created = c
            .create_queue(proto::CreateQueueRequest {
                queue: name.clone(),
                settings: None,
            })
            .await;
        assert_eq!(
            created.map(|_| ()).unwrap_err().code(),
            Code::InvalidArgument,
            "CreateQueue {name:?}"
        );
        let deleted = c
            .delete_queue(proto::DeleteQueueRequest {
                queue: name.clone(),
            })
            .await;
        assert_eq!(
            deleted.map(|_| ()).unwrap_err().code(),
            Code::InvalidArgument,
            "DeleteQueue {name:?}"
        );
        let sent = c
            .send_message(proto::SendMessageRequest {
                queue: name.clone(),
                messages: vec![proto::OutgoingMessage {
                    body: bytes::Bytes::from_static(b"x"),
                    ..Default::default()
                }],
            })
            .await;
        assert!(sent.is_err(), "SendMessage {name:?}");
        let nacked = c
            .nack_message(proto::NackMessageRequest {
                queue: "victim".into(),
                group: name.clone(),
                id: "0-0".into(),
                delay_ms: None,
            })
            .await;
        assert!(nacked.is_err(), "NackMessage group {name:?}");
        assert_victim_intact(&s, &format!("gRPC {name:?}")).await;
    }
    assert_eq!(listing(&s.dir), before, "nothing was created or removed");
    s.stop().await;
}

/// A registry written by an earlier version that accepted `..` is refused at start, and the
/// error names the offending queue.
#[tokio::test]
async fn registry_with_a_bad_name_is_refused_at_start() {
    for bad in ["..", ".", "a/b", ".hidden"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("queues/victim/0")).unwrap();
        let mut queues = serde_json::Map::new();
        queues.insert("victim".into(), json!({}));
        queues.insert(bad.into(), json!({}));
        std::fs::write(
            dir.path().join("registry.json"),
            serde_json::to_vec(&json!({"version": 1, "queues": queues})).unwrap(),
        )
        .unwrap();
        let error = match Broker::open(BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            ..BrokerConfig::default()
        })
        .await
        {
            Ok(_) => panic!("a registry holding `{bad}` was served"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains(&format!("queue `{bad}`")), "{error}");
        assert!(error.contains("registry.json"), "{error}");
        assert!(
            dir.path().join("queues/victim/0").is_dir(),
            "refusing touched nothing"
        );
    }
}

/// A queue directory that is a symlink (an operator's doing) is deleted as a link: its
/// target, wherever it is, stays. (Defence in depth: this held before issue 18 too, because
/// `std::fs::remove_dir_all` does not follow a symlink; it now rests on an explicit check.)
#[cfg(unix)]
#[tokio::test]
async fn deleting_a_symlinked_queue_keeps_the_link_target() {
    let s = TestServer::start().await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("precious"), b"keep me").unwrap();
    let r = http()
        .post(format!("{}/queues/linked", s.http))
        .json(&json!({"max_deliveries": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A queue has a directory from its first message on.
    let r = http()
        .post(format!("{}/queues/linked/messages", s.http))
        .body("data")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Swap the queue's directory for a link to a directory outside the data dir.
    let dir = s.dir.join("queues/linked");
    let moved = outside.path().join("linked-data");
    std::fs::rename(&dir, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &dir).unwrap();
    let r = http()
        .delete(format!("{}/queues/linked", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(std::fs::symlink_metadata(&dir).is_err(), "the link is gone");
    assert!(outside.path().join("precious").is_file());
    assert!(
        moved.join("0").is_dir(),
        "the link's target was not followed"
    );
    s.stop().await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// No name the broker accepts resolves outside `{data-dir}/queues`: the queue's
    /// directory is a direct child of it, nothing else appears in the data dir, and deleting
    /// it leaves another queue whole.
    #[test]
    fn accepted_names_stay_inside_the_queues_dir(
        name in "[A-Za-z0-9._/\\\\%-]{1,8}|\\.{1,4}[a-z]{0,3}|\\PC{1,6}"
    ) {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let broker = Broker::open(BrokerConfig {
                data_dir: dir.path().to_path_buf(),
                ..BrokerConfig::default()
            })
            .await
            .unwrap();
            let plain = QueueSettings { max_deliveries: 0, ..QueueSettings::default() };
            broker.create_queue("victim", plain.clone()).await.unwrap();
            broker
                .publish("victim", vec![NewMessage { body: "v".into(), ..NewMessage::default() }])
                .await
                .unwrap();
            let queues = dir.path().join("queues");
            let top_before = listing(dir.path()).1;
            if broker.create_queue(&name, plain).await.is_ok() {
                // A queue has a directory from its first message on.
                broker
                    .publish(&name, vec![NewMessage { body: "n".into(), ..NewMessage::default() }])
                    .await
                    .unwrap();
                let path = queues.join(&name);
                assert_eq!(path.parent(), Some(queues.as_path()), "{name:?}");
                assert!(path.is_dir(), "{name:?}");
                assert_eq!(
                    std::fs::canonicalize(&path).unwrap().parent(),
                    Some(std::fs::canonicalize(&queues).unwrap().as_path()),
                    "{name:?}"
                );
                assert_eq!(listing(dir.path()).1, top_before, "{name:?}");
                broker.delete_queue(&name).await.unwrap();
            } else {
                assert!(broker.delete_queue(&name).await.is_err());
            }
            assert_eq!(listing(dir.path()).0, BTreeSet::from(["victim".to_string()]), "{name:?}");
            let (log, _) = broker
                .read_log("victim", 0, qit::broker::ReadFrom::Offset(0), 10)
                .unwrap();
            assert_eq!(log.len(), 1, "{name:?}");
            broker.shutdown().await.unwrap();
        });
    }
}
