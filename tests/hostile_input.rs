//! Regression tests for issue 19 items 7, 11, 12, 14 and 15 ("hostile users and hostile
//! input"): dead-letter loops, whole-record size limits and key caps, binding caps, lease
//! caps on gRPC, and all-or-nothing exchange publish — over HTTP and gRPC where both apply.

mod common;

use common::{TestServer, http};
use qit::proto::{self, broker_client::BrokerClient, receive_request, receive_response};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

async fn post(s: &TestServer, path: &str, body: Value) -> (StatusCode, Value) {
    let r = http()
        .post(format!("{}{path}", s.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn grpc(s: &TestServer) -> BrokerClient<Channel> {
    BrokerClient::connect(s.grpc.clone()).await.unwrap()
}

fn settings(max_deliveries: u32, dead_letter: &str) -> proto::QueueSettings {
    proto::QueueSettings {
        max_deliveries: Some(max_deliveries),
        dead_letter: Some(dead_letter.into()),
        ..Default::default()
    }
}

async fn log_len(s: &TestServer, queue: &str) -> usize {
    let r = http()
        .get(format!("{}/queues/{queue}/log?max=1000", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    body["messages"].as_array().map_or(0, Vec::len)
}

/// Request bodies that hold settings, a binding, a batch or a seek are JSON objects: an
/// array, which serde's derive alone reads field by field (`[3, 60]` made a queue with 3
/// partitions and a 60 s ack timeout), is refused with 400 `invalid_json` and changes
/// nothing, nested ones included (`retention`, each batch message).
#[tokio::test]
async fn bodies_are_objects_not_arrays_read_field_by_field() {
    let s = TestServer::start().await;
    let (status, _) = post(&s, "/queues/kept", json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = post(&s, "/exchanges/fan", json!({"type": "fanout"})).await;
    assert_eq!(status, StatusCode::CREATED);
    for (path, body) in [
        ("/queues/arr", json!([3, 60])),
        ("/queues/arr", json!([])),
        ("/queues/arr", json!({"retention": [60]})),
        ("/exchanges/arrx", json!(["fanout"])),
        ("/exchanges/fan/bindings", json!(["kept"])),
        ("/queues/kept/messages/batch", json!([[{"body": 1}]])),
        ("/queues/kept/messages/batch", json!({"messages": [["x"]]})),
        ("/queues/kept/redrive", json!([5])),
    ] {
        let (status, answer) = post(&s, path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
        assert_eq!(
            answer["error"]["code"], "invalid_json",
            "{path} {body}: {answer}"
        );
    }
    let seek = http()
        .put(format!("{}/queues/kept/groups/default/offset", s.http))
        .json(&json!([0, 0]))
        .send()
        .await
        .unwrap();
    assert_eq!(seek.status(), StatusCode::BAD_REQUEST);
    for (path, gone) in [("/queues/arr", true), ("/exchanges/arrx", true)] {
        let r = http()
            .get(format!("{}{path}", s.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status() == StatusCode::NOT_FOUND, gone, "{path}");
    }
    let bindings = common::get_json(format!("{}/exchanges/fan", s.http)).await;
    assert_eq!(bindings["bindings"], json!([]), "{bindings}");
    assert_eq!(log_len(&s, "kept").await, 0);
    s.stop().await;
}

/// Issue 19.7: a queue that is its own dead-letter queue made `redrive` loop forever.
#[tokio::test]
async fn a_queue_cannot_be_its_own_dead_letter_queue() {
    let s = TestServer::start().await;
    for max_deliveries in [0, 3] {
        let (status, body) = post(
            &s,
            "/queues/s",
            json!({"max_deliveries": max_deliveries, "dead_letter": "s"}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["code"], "invalid_setting");
    }
    let mut c = grpc(&s).await;
    let refused = c
        .create_queue(proto::CreateQueueRequest {
            queue: "s".into(),
            settings: Some(settings(0, "s")),
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let (status, _) = post(&s, "/queues/s/redrive", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was created");
    s.stop().await;
}

/// Issue 19.7: a dead-letter chain that comes back (A -> B -> A) is refused too.
#[tokio::test]
async fn a_dead_letter_loop_is_refused() {
    let s = TestServer::start().await;
    let (status, _) = post(
        &s,
        "/queues/a",
        json!({"max_deliveries": 0, "dead_letter": "b"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = post(
        &s,
        "/queues/c",
        json!({"max_deliveries": 0, "dead_letter": "a"}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "c -> a -> b is a chain, not a loop"
    );
    let (status, body) = post(
        &s,
        "/queues/b",
        json!({"max_deliveries": 2, "dead_letter": "c"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("b -> c -> a -> b"), "{message}");
    let mut c = grpc(&s).await;
    let refused = c
        .create_queue(proto::CreateQueueRequest {
            queue: "b".into(),
            settings: Some(settings(0, "a")),
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let (status, _) = post(
        &s,
        "/queues/b",
        json!({"max_deliveries": 0, "dead_letter": "x"}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "b itself is fine without the loop"
    );
    s.stop().await;
}

/// Issue 19.7: a self-dead-lettering queue stored by an earlier version makes `redrive`
/// answer at once instead of re-publishing its own messages forever. Multi-threaded so that
/// the timeout guard still fires if a redrive hogs its worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_of_a_stored_self_dead_letter_queue_ends() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("registry.json"),
        serde_json::to_vec(&json!({"version": 1, "queues": {
            "s": {"max_deliveries": 0, "dead_letter": "s"}
        }}))
        .unwrap(),
    )
    .unwrap();
    let s = TestServer::start_in(dir.path(), qit::log::FsyncPolicy::Interval).await;
    for i in 0..3 {
        let r = http()
            .post(format!("{}/queues/s/messages", s.http))
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    // The request runs on its own thread and runtime and the guard is an OS-level wait, so
    // that a redrive that never yields cannot starve the guard too.
    let url = format!("{}/queues/s/redrive", s.http);
    let (done, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let result = runtime.block_on(async {
            let r = http().post(url).json(&json!({})).send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        });
        let _ = done.send(result);
    });
    let (status, body) = tokio::task::block_in_place(|| {
        answer
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| {
                // A task that never yields cannot be cancelled, so the runtime could not shut
                // down after a panic here: end the test process with a clear message instead.
                eprintln!("FAILED: redrive of a self-dead-lettering queue did not end in 60 s");
                std::process::exit(1)
            })
    });
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(log_len(&s, "s").await, 3, "nothing was re-published");
    s.stop().await;
}

/// Issue 19.11: only the body counted against `max_message_bytes`; keys, headers and
/// idempotency keys of any size were stored. HTTP single and batch publish.
#[tokio::test]
async fn the_whole_record_counts_and_keys_are_capped_over_http() {
    let s = TestServer::start().await;
    let (status, _) = post(&s, "/queues/small", json!({"max_message_bytes": 64})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = post(&s, "/queues/big", json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let publish = |queue: &str, key: &str, header: &str| {
        http()
            .post(format!("{}/queues/{queue}/messages", s.http))
            .query(&[("key", key)])
            .header("qit-header-h", header)
            .body("x")
            .send()
    };
    // Key and header together over the 64-byte limit: 413.
    let r = publish("small", &"k".repeat(40), &"v".repeat(40))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "message_too_large");
    // A key over the cap, whatever the queue's limit: 400.
    let r = publish("big", &"k".repeat(2000), "v").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Within everything: stored.
    let r = publish("small", "k", "v").await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let cases = [
        (
            json!({"body": "x", "key": "k".repeat(60)}),
            "small",
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            json!({"body": "x", "headers": {"h": "v".repeat(60)}}),
            "small",
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            json!({"body": "x", "idempotency_key": "i".repeat(300)}),
            "big",
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"body": "x", "idempotency_key": ""}),
            "big",
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"body": "x", "key": "k".repeat(2000)}),
            "big",
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"body": "x", "headers": {"h": "v".repeat(9000)}}),
            "big",
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (message, queue, expected) in cases {
        let (status, body) = post(
            &s,
            &format!("/queues/{queue}/messages/batch"),
            json!({"messages": [{"body": "fine"}, message]}),
        )
        .await;
        assert_eq!(status, expected, "{message} -> {body}");
    }
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("h{i}"), json!("v"))).collect();
    let (status, _) = post(
        &s,
        "/queues/big/messages/batch",
        json!({"messages": [{"body": "x", "headers": many}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "65 headers");
    assert_eq!(log_len(&s, "small").await, 1, "only the one that fits");
    assert_eq!(
        log_len(&s, "big").await,
        0,
        "a refused batch stores nothing"
    );
    s.stop().await;
}

/// Issue 19.11 over gRPC `SendMessage`.
#[tokio::test]
async fn the_whole_record_counts_and_keys_are_capped_over_grpc() {
    let s = TestServer::start().await;
    let (status, _) = post(&s, "/queues/small", json!({"max_message_bytes": 64})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = post(&s, "/queues/big", json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut c = grpc(&s).await;
    let message = |key: Option<String>, header: Option<String>, idem: Option<String>| {
        proto::OutgoingMessage {
            body: bytes::Bytes::from_static(b"x"),
            key,
            headers: header.map(|v| ("h".to_string(), v)).into_iter().collect(),
            content_type: None,
            idempotency_key: idem,
        }
    };
    let cases = [
        (
            "small",
            message(Some("k".repeat(70)), None, None),
            Code::ResourceExhausted,
        ),
        (
            "small",
            message(None, Some("v".repeat(70)), None),
            Code::ResourceExhausted,
        ),
        (
            "small",
            message(None, None, Some("i".repeat(70))),
            Code::ResourceExhausted,
        ),
        (
            "big",
            message(Some("k".repeat(2000)), None, None),
            Code::InvalidArgument,
        ),
        (
            "big",
            message(None, None, Some("i".repeat(300))),
            Code::InvalidArgument,
        ),
        (
            "big",
            message(None, None, Some(String::new())),
            Code::InvalidArgument,
        ),
        (
            "big",
            message(None, Some("v".repeat(9000)), None),
            Code::InvalidArgument,
        ),
    ];
    for (queue, m, expected) in cases {
        let refused = c
            .send_message(proto::SendMessageRequest {
                queue: queue.into(),
                messages: vec![message(None, None, None), m.clone()],
            })
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(refused.code(), expected, "{queue} {m:?}");
    }
    assert_eq!(log_len(&s, "small").await, 0);
    assert_eq!(log_len(&s, "big").await, 0);
    s.stop().await;
}

/// Issue 19.12: binding header values of any size made `registry.json` huge.
#[tokio::test]
async fn binding_sizes_are_capped() {
    let s = TestServer::start().await;
    let (status, _) = post(&s, "/queues/q", json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = post(&s, "/exchanges/h", json!({"type": "headers"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("h{i}"), json!("v"))).collect();
    for binding in [
        json!({"queue": "q", "headers": {"h": "v".repeat(40_000)}}),
        json!({"queue": "q", "headers": {"h".repeat(200): "v"}}),
        json!({"queue": "q", "headers": many}),
        json!({"queue": "q", "key": "k".repeat(300), "headers": {"h": "v"}}),
    ] {
        let (status, body) = post(&s, "/exchanges/h/bindings", binding).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["code"], "invalid_binding");
        assert!(
            body["error"]["message"].as_str().unwrap_or_default().len() < 300,
            "the error does not repeat the input: {body}"
        );
    }
    let registry = std::fs::metadata(s.dir.join("registry.journal"))
        .unwrap()
        .len();
    assert!(registry < 4096, "registry.journal is {registry} bytes");
    let (status, _) = post(
        &s,
        "/exchanges/h/bindings",
        json!({"queue": "q", "headers": {"h": "v".repeat(1024)}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "at the cap is fine");
    s.stop().await;
}

async fn one_lease(s: &TestServer, c: &mut BrokerClient<Channel>, queue: &str) -> String {
    let (status, _) = post(s, &format!("/queues/{queue}"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    c.send_message(proto::SendMessageRequest {
        queue: queue.into(),
        messages: vec![proto::OutgoingMessage {
            body: bytes::Bytes::from_static(b"x"),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    let r = http()
        .get(format!("{}/queues/{queue}/messages", s.http))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    body["messages"][0]["id"].as_str().unwrap().to_string()
}

/// Issue 19.14: gRPC `NackMessage.delay_ms` and `ExtendLease.visibility_ms` accepted
/// 2^64-1 where HTTP caps at 12 h.
#[tokio::test]
async fn grpc_lease_durations_are_capped_like_http() {
    let s = TestServer::start().await;
    let mut c = grpc(&s).await;
    let id = one_lease(&s, &mut c, "q").await;
    for visibility_ms in [u64::MAX, 43_200_001] {
        let refused = c
            .extend_lease(proto::ExtendLeaseRequest {
                queue: "q".into(),
                group: String::new(),
                id: id.clone(),
                visibility_ms,
            })
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{visibility_ms}");
    }
    for delay_ms in [u64::MAX, 43_200_001] {
        let refused = c
            .nack_message(proto::NackMessageRequest {
                queue: "q".into(),
                group: String::new(),
                id: id.clone(),
                delay_ms: Some(delay_ms),
            })
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{delay_ms}");
    }
    c.extend_lease(proto::ExtendLeaseRequest {
        queue: "q".into(),
        group: String::new(),
        id: id.clone(),
        visibility_ms: 43_200_000,
    })
    .await
    .expect("12 h is allowed");
    // HTTP says the same.
    let r = http()
        .post(format!(
            "{}/queues/q/messages/{id}/extend?visibility=43201",
            s.http
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    s.stop().await;
}

/// Issue 19.14 on the `ReceiveMessages` stream: the open's `visibility_ms` and a stream
/// nack's `delay_ms` / extend's `visibility_ms` get the same cap.
#[tokio::test]
async fn receive_stream_lease_durations_are_capped() {
    let s = TestServer::start().await;
    let mut c = grpc(&s).await;
    let _ = one_lease(&s, &mut c, "q").await;
    c.send_message(proto::SendMessageRequest {
        queue: "q".into(),
        messages: vec![proto::OutgoingMessage {
            body: bytes::Bytes::from_static(b"y"),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    let open = |visibility_ms| proto::ReceiveRequest {
        request: Some(receive_request::Request::Open(proto::OpenStream {
            queue: "q".into(),
            group: String::new(),
            max_in_flight: 1,
            visibility_ms,
        })),
    };
    let refused = c
        .receive_messages(tokio_stream::iter(vec![open(Some(u64::MAX))]))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    let (tx, rx) = mpsc::channel(8);
    tx.send(open(Some(30_000))).await.unwrap();
    let mut inbound = c
        .receive_messages(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let id = match inbound.next().await.unwrap().unwrap().response {
        Some(receive_response::Response::Message(m)) => m.id,
        other => panic!("expected a message, got {other:?}"),
    };
    for request in [
        receive_request::Request::Nack(proto::StreamNack {
            id: id.clone(),
            delay_ms: Some(u64::MAX),
        }),
        receive_request::Request::Extend(proto::StreamExtend {
            id: id.clone(),
            visibility_ms: u64::MAX,
        }),
    ] {
        tx.send(proto::ReceiveRequest {
            request: Some(request),
        })
        .await
        .unwrap();
        match inbound.next().await.unwrap().unwrap().response {
            Some(receive_response::Response::Error(e)) => {
                assert_eq!(
                    (e.id.as_str(), e.code.as_str()),
                    (id.as_str(), "InvalidArgument")
                );
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
    s.stop().await;
}

/// Issue 19.15: a fanout to a queue that accepts and one that refuses answered 413 after
/// storing into the first.
#[tokio::test]
async fn exchange_publish_is_all_or_nothing() {
    let s = TestServer::start().await;
    let (status, _) = post(&s, "/queues/roomy", json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = post(&s, "/queues/tiny", json!({"max_message_bytes": 16})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = post(&s, "/exchanges/all", json!({"type": "fanout"})).await;
    assert_eq!(status, StatusCode::CREATED);
    for queue in ["roomy", "tiny"] {
        let (status, _) = post(&s, "/exchanges/all/bindings", json!({"queue": queue})).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let r = http()
        .post(format!("{}/exchanges/all/messages", s.http))
        .body("x".repeat(100))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(log_len(&s, "roomy").await, 0, "nothing stored anywhere");
    assert_eq!(log_len(&s, "tiny").await, 0);
    let r = http()
        .post(format!("{}/exchanges/all/messages", s.http))
        .body("small")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        (log_len(&s, "roomy").await, log_len(&s, "tiny").await),
        (1, 1)
    );
    s.stop().await;
}
