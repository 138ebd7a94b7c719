//! The HTTP API against a real server on ephemeral ports.

mod common;

use std::time::Duration;

use common::{TestServer, http};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn send(s: &TestServer, queue: &str, body: &str) -> Value {
    let r = http()
        .post(format!("{}/queues/{queue}/messages", s.http))
        .header("content-type", "text/plain")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json().await.unwrap()
}

async fn get(s: &TestServer, path: &str) -> (StatusCode, Value) {
    let r = http()
        .get(format!("{}{path}", s.http))
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post(s: &TestServer, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut r = http().post(format!("{}{path}", s.http));
    if let Some(body) = body {
        r = r.json(&body);
    }
    let r = r.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// DELETEs `path`; the status.
async fn delete(s: &TestServer, path: &str) -> StatusCode {
    http()
        .delete(format!("{}{path}", s.http))
        .send()
        .await
        .unwrap()
        .status()
}

async fn create(s: &TestServer, queue: &str, settings: Value) {
    let (status, _) = post(s, &format!("/queues/{queue}"), Some(settings)).await;
    assert_eq!(status, StatusCode::CREATED);
}

/// The seed's own usage, verbatim.
#[tokio::test]
async fn seed_flow_verbatim() {
    let s = TestServer::start().await;
    let (status, info) = post(&s, "/queues/email-jobs", None).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(info["name"], "email-jobs");
    assert_eq!(info["settings"]["dead_letter"], "email-jobs.dlq");
    let (again, _) = post(&s, "/queues/email-jobs", None).await;
    assert_eq!(again, StatusCode::OK, "same settings: idempotent");
    let (again, _) = post(
        &s,
        "/queues/email-jobs",
        Some(json!({"dead_letter": "email-jobs.dlq", "partitions": 1})),
    )
    .await;
    assert_eq!(
        again,
        StatusCode::OK,
        "the defaults spelled out are the same settings"
    );
    let (status, dlq) = get(&s, "/queues/email-jobs.dlq").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the dead-letter queue comes with the queue"
    );
    assert_eq!(dlq["settings"]["max_deliveries"], 0);
    let r = http()
        .post(format!("{}/queues/email-jobs/messages", s.http))
        .header("Content-Type", "application/json")
        .body(r#"{"to": "user@example.com", "subject": "Hello!"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let published: Value = r.json().await.unwrap();
    assert_eq!(published["id"], "0-0");
    let (status, got) = get(&s, "/queues/email-jobs/messages").await;
    assert_eq!(status, StatusCode::OK);
    let m = &got["messages"][0];
    assert_eq!(
        m["body"],
        json!({"to": "user@example.com", "subject": "Hello!"})
    );
    assert_eq!(m["delivery_count"], 1);
    assert_eq!(m["queue"], "email-jobs");
    assert!(m["timestamp"].as_i64().unwrap() > 1_600_000_000_000);
    let id = m["id"].as_str().unwrap();
    let r = http()
        .delete(format!("{}/queues/email-jobs/messages/{id}", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (_, info) = get(&s, "/queues/email-jobs").await;
    assert_eq!(info["groups"][0]["backlog"], 0);
    assert_eq!(info["partitions"][0]["next_offset"], 1);
    let (_, empty) = get(&s, "/queues/email-jobs/messages").await;
    assert_eq!(empty["messages"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn long_poll_wakes_on_publish() {
    let s = TestServer::start().await;
    create(&s, "lp", json!({})).await;
    let url = format!("{}/queues/lp/messages?wait=20", s.http);
    let waiter = tokio::spawn(async move {
        http()
            .get(url)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    common::wait_for_long_polls(&s.http, 1).await;
    send(&s, "lp", "wake up").await;
    let got = waiter.await.unwrap();
    // A wait that ran out would have answered empty: the publish woke it.
    assert_eq!(got["messages"][0]["body"], "wake up");
    let (_, empty) = get(&s, "/queues/lp/messages?wait=0.2").await;
    assert_eq!(empty["messages"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn bad_inputs_get_clear_errors() {
    let s = TestServer::start().await;
    create(&s, "q", json!({"max_message_bytes": 16})).await;
    let client = http();
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            client.post(format!("{}/queues/bad name!", s.http)),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            client
                .post(format!("{}/queues/x", s.http))
                .body("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            client
                .post(format!("{}/queues/x", s.http))
                .json(&json!({"partitons": 2})),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            client
                .post(format!("{}/queues/x", s.http))
                .json(&json!({"partitions": 0})),
            StatusCode::BAD_REQUEST,
            "invalid_setting",
        ),
        (
            client
                .post(format!("{}/queues/q", s.http))
                .json(&json!({"partitions": 3})),
            StatusCode::CONFLICT,
            "queue_exists",
        ),
        (
            client.get(format!("{}/queues/missing", s.http)),
            StatusCode::NOT_FOUND,
            "queue_not_found",
        ),
        (
            client.get(format!("{}/queues/q/messages?max=5000", s.http)),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            client.get(format!("{}/queues/q/messages?max=abc", s.http)),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            client.get(format!("{}/queues/q/messages?wait=61", s.http)),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            client.get(format!("{}/queues/q/messages?visibility=-1", s.http)),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            client.delete(format!("{}/queues/q/messages/notanid", s.http)),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            client.delete(format!("{}/queues/q/messages/0-99", s.http)),
            StatusCode::NOT_FOUND,
            "message_not_found",
        ),
        (
            client.delete(format!("{}/queues/q/messages/0-0?group=nogroup", s.http)),
            StatusCode::NOT_FOUND,
            "group_not_found",
        ),
        // A group name no group can have is bad input, wherever it is named.
        (
            client.delete(format!("{}/queues/q/messages/0-0?group=a%20b", s.http)),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            client.post(format!("{}/queues/q/messages/0-0/nack?group=a%20b", s.http)),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            client.post(format!(
                "{}/queues/q/messages/0-0/extend?group=a%20b&visibility=5",
                s.http
            )),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            client.get(format!("{}/queues/q/groups/a%20b", s.http)),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            client
                .post(format!("{}/queues/q/messages", s.http))
                .body("x".repeat(17)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
        ),
        (
            client
                .post(format!("{}/queues/q/messages", s.http))
                .header("content-type", "application/json")
                .body("{oops"),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            client
                .post(format!("{}/queues/q/messages", s.http))
                .header("Qit-Header-qit-internal", "v")
                .body("x"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            client
                .post(format!("{}/queues/q/messages/batch", s.http))
                .json(&json!({"messages": []})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            client
                .post(format!("{}/queues/q/messages/batch", s.http))
                .json(&json!({"messages": [{"key": "k"}]})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            client
                .put(format!("{}/queues/q/groups/default/offset", s.http))
                .json(&json!({"to": "middle"})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            client.get(format!("{}/queues/q/log?from_time=yesterday", s.http)),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            client
                .post(format!("{}/exchanges/x", s.http))
                .json(&json!({"type": "weird"})),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            client
                .post(format!("{}/exchanges/none/bindings", s.http))
                .json(&json!({"queue": "q"})),
            StatusCode::NOT_FOUND,
            "exchange_not_found",
        ),
        (
            client.get(format!("{}/no/such/route", s.http)),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            client.patch(format!("{}/queues/q", s.http)),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (i, (request, status, code)) in cases.into_iter().enumerate() {
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), status, "case {i}");
        let body: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("case {i}: not JSON: {e}"));
        assert_eq!(body["error"]["code"], code, "case {i}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Nothing half-written was stored.
    let (_, info) = get(&s, "/queues/q").await;
    assert_eq!(info["partitions"][0]["next_offset"], 0);
    s.stop().await;
}

#[tokio::test]
async fn oversized_bodies_beyond_any_queue_limit_get_json_413() {
    let s = TestServer::start().await;
    create(&s, "big", json!({})).await;
    let r = http()
        .post(format!("{}/queues/big/messages", s.http))
        .body(vec![b'x'; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "message_too_large");
    s.stop().await;
}

/// A redrive never takes a dead letter for a repeat of another message: not of a client's
/// publish under a made-up key (clients may not use qit's key prefixes), nor of an earlier
/// redrive from a dead-letter queue that was deleted and made again (its ids start over).
#[tokio::test]
async fn a_redrive_stores_every_dead_letter_it_moves() {
    let s = TestServer::start().await;
    create(&s, "r", json!({"max_deliveries": 1})).await;
    for key in ["qit-redrive:r.dlq:0-0", "QIT-x", "kafka:7:0:0:0-0"] {
        let status = http()
            .post(format!("{}/queues/r/messages", s.http))
            .header("idempotency-key", key)
            .body("junk")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key}");
    }
    let (status, _) = post(
        &s,
        "/queues/r/messages/batch",
        Some(json!({"messages": [{"body": 1, "idempotency_key": "qit-redrive:r.dlq:0-0"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    send(&s, "r", "precious").await;
    for round in 1..=2 {
        let (_, got) = get(&s, "/queues/r/messages?wait=5").await;
        let id = got["messages"][0]["id"].as_str().unwrap().to_string();
        let (status, _) = post(&s, &format!("/queues/r/messages/{id}/nack"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (_, moved) = post(&s, "/queues/r/redrive", None).await;
        assert_eq!(moved["moved"], 1, "round {round}");
        let (_, log) = get(&s, "/queues/r/log?max=10").await;
        let bodies: Vec<&Value> = log["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| &m["body"])
            .collect();
        assert_eq!(bodies.len(), 1 + round, "round {round}: {log}");
        assert!(bodies.iter().all(|b| *b == "precious"), "{log}");
        // The dead-letter queue made again starts its ids over.
        let status = delete(&s, "/queues/r.dlq").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    s.stop().await;
}

/// A queue deleted and made again starts its ids over, while its dead-letter queue (not
/// deleted with it) still remembers the dead letters of the old one: a message of the new
/// queue dead-lettered under an old one's id is stored all the same, not taken for a
/// repeat of the old one and dropped.
#[tokio::test]
async fn a_queue_made_again_dead_letters_its_messages_again() {
    let s = TestServer::start().await;
    for round in 0..3 {
        create(&s, "again", json!({"max_deliveries": 1})).await;
        send(&s, "again", &format!("job-{round}")).await;
        let (_, leased) = get(&s, "/queues/again/messages").await;
        let id = leased["messages"][0]["id"].as_str().unwrap().to_string();
        assert_eq!(id, "0-0", "a queue made again starts its ids over");
        let (status, _) = post(
            &s,
            &format!("/queues/again/messages/{id}/nack?delay=0"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (_, log) = get(&s, "/queues/again.dlq/log?max=10").await;
        let bodies: Vec<&str> = log["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["body"].as_str())
            .collect();
        let want: Vec<String> = (0..=round).map(|r| format!("job-{r}")).collect();
        assert_eq!(bodies, want, "the dead letters after round {round}");
        assert_eq!(delete(&s, "/queues/again").await, StatusCode::NO_CONTENT);
    }
    s.stop().await;
}

#[tokio::test]
async fn expiry_nack_dead_letter_and_redrive() {
    let s = TestServer::start().await;
    create(&s, "w", json!({"max_deliveries": 2, "ack_timeout": 1})).await;
    send(&s, "w", "job").await;
    let (_, first) = get(&s, "/queues/w/messages?visibility=0.2").await;
    assert_eq!(first["messages"][0]["delivery_count"], 1);
    let (_, second) = get(&s, "/queues/w/messages?wait=5").await;
    assert_eq!(
        second["messages"][0]["delivery_count"], 2,
        "redelivered after expiry"
    );
    let id = second["messages"][0]["id"].as_str().unwrap().to_string();
    let (status, _) = post(
        &s,
        &format!("/queues/w/messages/{id}/extend?visibility=30"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = post(&s, &format!("/queues/w/messages/{id}/nack?delay=0"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, again) = post(&s, &format!("/queues/w/messages/{id}/nack"), None).await;
    assert_eq!(
        (status, again["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("not_leased"))
    );
    // The nack answered once the dead letter was in the dead-letter queue.
    let (_, log) = get(&s, "/queues/w.dlq/log").await;
    assert_eq!(log["messages"].as_array().map(Vec::len), Some(1), "{log}");
    // Looking at the DLQ with its default group leases the dead letter; redrive still moves it.
    let (_, dead) = get(&s, "/queues/w.dlq/messages?wait=5").await;
    let m = &dead["messages"][0];
    assert_eq!(m["body"], "job");
    assert_eq!(m["headers"]["qit-original-queue"], "w");
    assert_eq!(m["headers"]["qit-dead-letter-reason"], "nacked");
    let (_, group) = get(&s, "/queues/w/groups/default").await;
    assert_eq!(group["dead_lettered"], 1);
    assert_eq!(group["partitions"][0]["committed_offset"], 1);
    let (status, moved) = post(&s, "/queues/w/redrive", Some(json!({"max": 10}))).await;
    assert_eq!((status, moved["moved"].clone()), (StatusCode::OK, json!(1)));
    let (status, moved) = post(&s, "/queues/w/redrive", None).await;
    assert_eq!((status, moved["moved"].clone()), (StatusCode::OK, json!(0)));
    let (_, dlq) = get(&s, "/queues/w.dlq/groups/default").await;
    assert_eq!(
        (dlq["backlog"].clone(), dlq["in_flight"].clone()),
        (json!(0), json!(0))
    );
    let (_, back) = get(&s, "/queues/w/messages").await;
    assert_eq!(back["messages"][0]["body"], "job");
    assert_eq!(back["messages"][0]["delivery_count"], 1);
    s.stop().await;
}

#[tokio::test]
async fn batch_headers_keys_idempotency_and_binary_bodies() {
    let s = TestServer::start().await;
    create(&s, "b", json!({"partitions": 2})).await;
    let (status, ids) = post(
        &s,
        "/queues/b/messages/batch",
        Some(json!({"messages": [
            {"body": {"n": 1}, "key": "k1", "headers": {"h": "v"}},
            {"body": "text"},
            {"body_base64": "/wA="}
        ]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(ids["ids"].as_array().unwrap().len(), 3);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (_, page) = get(&s, "/queues/b/messages?max=10").await;
        seen.extend(page["messages"].as_array().unwrap().clone());
    }
    assert_eq!(seen.len(), 3);
    let first = seen.iter().find(|m| m["key"] == "k1").unwrap();
    assert_eq!(first["body"], json!({"n": 1}));
    assert_eq!(first["headers"]["h"], "v");
    assert!(seen.iter().any(|m| m["body"] == "text"));
    assert!(seen.iter().any(|m| m["body_base64"] == "/wA="));
    let publish = |key: &'static str| {
        http()
            .post(format!("{}/queues/b/messages?key=user-7", s.http))
            .header("Idempotency-Key", key)
            .header("Qit-Header-trace", "abc")
            .body("once")
    };
    let a: Value = publish("same").send().await.unwrap().json().await.unwrap();
    let b: Value = publish("same").send().await.unwrap().json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    // Two idempotency keys (or content types) are refused, not one of them picked; a
    // message header on two lines is one comma-separated value.
    let (_, before) = get(&s, "/queues/b").await;
    for name in ["Idempotency-Key", "Content-Type"] {
        let r = http()
            .post(format!("{}/queues/b/messages", s.http))
            .header(name, "text/one")
            .header(name, "text/two")
            .body("twice")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{name}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "bad_request", "{name}");
    }
    let (_, after) = get(&s, "/queues/b").await;
    assert_eq!(before["partitions"], after["partitions"], "nothing stored");
    let r = http()
        .post(format!("{}/queues/b/messages", s.http))
        .header("Qit-Header-tag", "a")
        .header("Qit-Header-tag", "b")
        .body("listed")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id: Value = r.json().await.unwrap();
    let (_, log) = get(
        &s,
        &format!(
            "/queues/b/log?partition={}&from={}",
            id["partition"], id["offset"]
        ),
    )
    .await;
    assert_eq!(log["messages"][0]["headers"]["tag"], "a, b", "{log}");
    // A key that is not UTF-8 once decoded, or given twice, is refused: it used to become
    // U+FFFD (two keys made one) or the last of the two.
    for query in ["key=%fe", "key=%c3", "key=a&key=b"] {
        let r = http()
            .post(format!("{}/queues/b/messages?{query}", s.http))
            .body("k")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    let (_, unchanged) = get(&s, "/queues/b").await;
    let p = id["partition"].as_u64().unwrap() as usize;
    assert_eq!(
        unchanged["partitions"][p]["next_offset"].as_u64(),
        Some(id["offset"].as_u64().unwrap() + 1)
    );
    // HEAD on the receive route leases nothing.
    let before = get(&s, "/queues/b/groups/default").await.1["in_flight"].clone();
    let r = http()
        .head(format!("{}/queues/b/messages?max=10", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let after = get(&s, "/queues/b/groups/default").await.1["in_flight"].clone();
    assert_eq!(before, after);
    // `"body": null` is a JSON body like any other (a missing body is the error).
    let (status, ids) = post(
        &s,
        "/queues/b/messages/batch",
        Some(json!({"messages": [{"body": null, "key": "nothing"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{ids}");
    let (p, offset) = ids["ids"][0].as_str().unwrap().split_once('-').unwrap();
    let (_, log) = get(&s, &format!("/queues/b/log?partition={p}&from={offset}")).await;
    assert_eq!(log["messages"][0]["body"], Value::Null, "{log}");
    assert_eq!(
        log["messages"][0]["content_type"], "application/json",
        "{log}"
    );
    let (status, _) = post(
        &s,
        "/queues/b/messages/batch",
        Some(json!({"messages": [{"key": "k"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no body at all");
    s.stop().await;
}

#[tokio::test]
async fn exchanges_seek_and_log_replay() {
    let s = TestServer::start().await;
    create(&s, "orders", json!({})).await;
    create(&s, "audit", json!({})).await;
    let (status, _) = post(&s, "/exchanges/events", Some(json!({"type": "topic"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = post(&s, "/exchanges/events", Some(json!({"type": "topic"}))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = post(&s, "/exchanges/events", Some(json!({"type": "fanout"}))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    for (queue, key) in [("orders", "order.*"), ("audit", "#")] {
        let (status, _) = post(
            &s,
            "/exchanges/events/bindings",
            Some(json!({"queue": queue, "key": key})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let r: Value = http()
        .post(format!(
            "{}/exchanges/events/messages?key=order.created",
            s.http
        ))
        .body("o1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let routed: Vec<&str> = r["routed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["queue"].as_str().unwrap())
        .collect();
    assert_eq!(routed, vec!["orders", "audit"]);
    let r: Value = http()
        .post(format!(
            "{}/exchanges/events/messages?key=user.signup",
            s.http
        ))
        .body("u1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["routed"].as_array().unwrap().len(), 1);
    let unbind = http()
        .delete(format!("{}/exchanges/events/bindings", s.http))
        .json(&json!({"queue": "audit", "key": "#"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unbind.status(), StatusCode::NO_CONTENT);
    let (status, info) = get(&s, "/exchanges/events").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["type"], "topic");
    assert_eq!(
        info["bindings"],
        json!([{"queue": "orders", "key": "order.*"}])
    );
    let (_, list) = get(&s, "/exchanges").await;
    assert_eq!(list["exchanges"][0]["name"], "events");
    // Deleting the exchange keeps its queues; publishing through it is then a 404.
    let (status, _) = post(&s, "/exchanges/gone", Some(json!({"type": "fanout"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let r = http()
        .delete(format!("{}/exchanges/gone", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, body) = get(&s, "/exchanges/gone").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("exchange_not_found"))
    );
    let r = http()
        .delete(format!("{}/exchanges/gone", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Replay and seek on audit.
    let (_, log) = get(&s, "/queues/audit/log?from=1&max=10").await;
    assert_eq!(log["messages"][0]["body"], "u1");
    assert_eq!(log["next_offset"], 2);
    let (_, log) = get(&s, "/queues/audit/log?from_time=1970-01-01T00:00:00Z").await;
    assert_eq!(log["messages"].as_array().unwrap().len(), 2);
    let r = http()
        .put(format!("{}/queues/audit/groups/default/offset", s.http))
        .json(&json!({"partition": 0, "offset": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (_, got) = get(&s, "/queues/audit/messages?max=10").await;
    assert_eq!(got["messages"].as_array().unwrap().len(), 1);
    assert_eq!(got["messages"][0]["body"], "u1");
    let r = http()
        .put(format!("{}/queues/audit/groups/default/offset", s.http))
        .json(&json!({"to": "latest"}))
        .send()
        .await
        .unwrap();
    let group: Value = r.json().await.unwrap();
    assert_eq!(group["backlog"], 0);
    let r = http()
        .delete(format!("{}/queues/orders", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, _) = get(&s, "/queues/orders").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = get(&s, "/queues").await;
    assert!(
        list["queues"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["name"] != "orders")
    );
    s.stop().await;
}

#[tokio::test]
async fn health_and_metrics() {
    let s = TestServer::start().await;
    create(&s, "m", json!({})).await;
    send(&s, "m", "x").await;
    send(&s, "m", "y").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, _) = get(&s, "/queues/m/messages").await;
    assert_eq!(status, StatusCode::OK);
    let (status, health) = get(&s, "/healthz").await;
    assert_eq!((status, health), (StatusCode::OK, json!({"status": "ok"})));
    let text = common::metrics_text(&s.http).await;
    assert!(
        text.contains("qit_messages_published_total{queue=\"m\"}"),
        "{text}"
    );
    assert!(
        text.contains("qit_backlog_messages{queue=\"m\",group=\"default\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("qit_in_flight_messages{queue=\"m\",group=\"default\"} 1"),
        "{text}"
    );
    for series in [
        "qit_messages_delivered_total{queue=\"m\",group=\"default\"} 1",
        "qit_publish_latency_seconds_count{queue=\"m\"}",
        "qit_end_to_end_latency_seconds_count{queue=\"m\",group=\"default\"} 1",
        "qit_connections_open{protocol=\"http\"}",
        "qit_stored_bytes{queue=\"m\",partition=\"0\"}",
        "qit_segments{queue=\"m\",partition=\"0\"} 1",
    ] {
        assert!(text.contains(series), "{series} missing in\n{text}");
    }
    // The oldest pending message is the first one, published at least 20 ms ago.
    let age: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("qit_oldest_unacked_age_seconds{queue=\"m\",group=\"default\"} ")
        })
        .expect("oldest unacked age")
        .parse()
        .unwrap();
    assert!((0.02..60.0).contains(&age), "age {age}");
    // The log reports its fsyncs upward (an observer, not an import of metrics): under
    // `fsync = interval` the sync thread runs shortly after a write.
    common::eventually("a segment fsync is in the latency histogram", || async {
        let text = common::metrics_text(&s.http).await;
        text.contains("qit_fsync_latency_seconds_count")
    })
    .await;
    // A deleted group's series go with it; the queue's other groups keep theirs.
    let (status, got) = get(&s, "/queues/m/messages?group=g2&max=2").await;
    assert_eq!(status, StatusCode::OK);
    for m in got["messages"].as_array().expect("messages") {
        let id = m["id"].as_str().expect("id");
        let status = delete(&s, &format!("/queues/m/messages/{id}?group=g2")).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let text = common::metrics_text(&s.http).await;
    assert!(
        text.contains("qit_messages_acked_total{queue=\"m\",group=\"g2\"} 2"),
        "{text}"
    );
    let status = delete(&s, "/queues/m/groups/g2").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let text = common::metrics_text(&s.http).await;
    assert!(!text.contains("group=\"g2\""), "{text}");
    assert!(
        text.contains("qit_messages_delivered_total{queue=\"m\",group=\"default\"} 1"),
        "{text}"
    );
    // A deleted queue's series go with it, its counters and histograms too (a scrape
    // would otherwise grow with every queue name ever used); its DLQ's stay.
    let status = delete(&s, "/queues/m").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let text = common::metrics_text(&s.http).await;
    for gone in [
        "qit_backlog_messages{queue=\"m\"",
        "qit_in_flight_messages{queue=\"m\"",
        "qit_stored_bytes{queue=\"m\"",
        "qit_segments{queue=\"m\"",
        "qit_oldest_unacked_age_seconds{queue=\"m\"",
        "qit_messages_published_total{queue=\"m\"",
        "qit_messages_delivered_total{queue=\"m\"",
        "qit_publish_latency_seconds_count{queue=\"m\"",
        "queue=\"m\"",
    ] {
        assert!(!text.contains(gone), "{gone} still in\n{text}");
    }
    assert!(
        text.contains("qit_stored_bytes{queue=\"m.dlq\",partition=\"0\"}"),
        "{text}"
    );
    // Only `m.dlq` is left, and the family is typed once.
    assert!(
        text.contains("# TYPE qit_queues gauge\nqit_queues 1\n"),
        "{text}"
    );
    assert_eq!(text.matches("# TYPE qit_queues ").count(), 1, "{text}");
    s.stop().await;
}

#[tokio::test]
async fn long_polls_are_capped_per_client() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), |c| c.max_per_client = 1).await;
    create(&s, "capped", json!({})).await;
    let url = format!("{}/queues/capped/messages?wait=5", s.http);
    let first = tokio::spawn({
        let url = url.clone();
        async move { http().get(url).send().await.unwrap().status() }
    });
    // The first long-poll holds the client's one slot before the second asks.
    common::wait_for_long_polls(&s.http, 1).await;
    let second = http().get(&url).send().await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["code"], "limit_reached");
    // Receives without waiting are never capped.
    let (status, _) = get(&s, "/queues/capped/messages").await;
    assert_eq!(status, StatusCode::OK);
    send(&s, "capped", "release").await;
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    s.stop().await;
}

/// A start over a damaged data directory serves what it could open and names what it
/// could not; deleting the damaged queue clears it.
#[tokio::test]
async fn a_damaged_queue_is_named_while_the_others_serve() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(dir.path(), qit::log::FsyncPolicy::Interval).await;
    for queue in ["good", "bad"] {
        create(&s, queue, json!({"segment_bytes": 4096})).await;
        for i in 0..100 {
            send(
                &s,
                queue,
                &format!("message {i} with some padding to fill segments"),
            )
            .await;
        }
    }
    s.stop().await;
    let sealed = dir.path().join("queues/bad/0/00000000000000000000.log");
    let bytes = std::fs::read(&sealed).unwrap();
    std::fs::write(&sealed, &bytes[..bytes.len() - 5]).unwrap();
    let s = TestServer::start_in(dir.path(), qit::log::FsyncPolicy::Interval).await;
    let (status, got) = get(&s, "/queues/good/messages?max=100").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["messages"].as_array().unwrap().len(), 100);
    let (status, body) = get(&s, "/queues/bad/messages").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "queue_damaged");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("00000000000000000000.log"), "{message}");
    let (status, health) = get(&s, "/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    let (status, _) = post(&s, "/queues/bad", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let r = http()
        .delete(format!("{}/queues/bad", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(!dir.path().join("queues/bad").exists());
    let (status, _) = get(&s, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    create(&s, "bad", json!({})).await;
    s.stop().await;
}

/// A single node holds one copy: `replicas` 1 is taken (and shown), more or 0 is a 400
/// naming the setting, and nothing is created.
#[tokio::test]
async fn a_single_node_takes_one_replica() {
    let s = TestServer::start().await;
    create(&s, "solo", json!({"replicas": 1})).await;
    let (status, info) = get(&s, "/queues/solo").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["settings"]["replicas"], 1, "{info}");
    create(&s, "plain", json!({})).await;
    let (_, plain) = get(&s, "/queues/plain").await;
    assert!(plain["settings"].get("replicas").is_none(), "{plain}");
    // One replica spelled out is the default: creating again either way is the same
    // queue (it was a 409 queue_exists, found by the contract helper).
    for (queue, again) in [("solo", json!({})), ("plain", json!({"replicas": 1}))] {
        let (status, body) = post(&s, &format!("/queues/{queue}"), Some(again)).await;
        assert_eq!(status, StatusCode::OK, "{queue}: {body}");
    }
    for bad in [json!({"replicas": 3}), json!({"replicas": 0})] {
        let (status, body) = post(&s, "/queues/many", Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("replicas"), "{bad}: {body}");
    }
    let (status, _) = get(&s, "/queues/many").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// JSON bodies come back with every digit they were sent with, published one at a time or
/// in a batch, received or read from the log: numbers beyond f64 and u64 were rounded on
/// the way out (and, in a batch, stored rounded), so 123456789012345678901234567890 came
/// back as 1.2345678901234568e29 (found by the contract helper).
#[tokio::test]
async fn json_numbers_keep_every_digit() {
    let s = TestServer::start().await;
    create(&s, "digits", json!({})).await;
    let one = r#"{"id":123456789012345678901234567890,"f":0.10000000000000000555,"e":1e400}"#;
    let response = http()
        .post(format!("{}/queues/digits/messages", s.http))
        .header("content-type", "application/json")
        .body(one)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let response = http()
        .post(format!("{}/queues/digits/messages/batch", s.http))
        .header("content-type", "application/json")
        .body(r#"{"messages":[{"body":{"u":18446744073709551617}}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    for path in [
        "/queues/digits/log?max=10",
        "/queues/digits/messages?max=10",
    ] {
        let text = http()
            .get(format!("{}{path}", s.http))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains(&format!(r#""body":{one}"#)), "{path}: {text}");
        assert!(
            text.contains(r#""body":{"u":18446744073709551617}"#),
            "{path}: {text}"
        );
    }
}

/// A headers binding on `Tenant` matches a message published over HTTP with
/// `Qit-Header-Tenant` (HTTP hands header names over in lower case): it never matched,
/// and only a lower-case binding did (found by the contract helper).
#[tokio::test]
async fn header_bindings_match_header_names_in_any_case() {
    let s = TestServer::start().await;
    create(&s, "tenant-a", json!({})).await;
    let (status, _) = post(&s, "/exchanges/tenants", Some(json!({"type": "headers"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = post(
        &s,
        "/exchanges/tenants/bindings",
        Some(json!({"queue": "tenant-a", "headers": {"Tenant": "A"}, "match": "all"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let routed = |value: &'static str| {
        let url = format!("{}/exchanges/tenants/messages", s.http);
        async move {
            let r: Value = http()
                .post(url)
                .header("Qit-Header-Tenant", value)
                .body("m")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["routed"].as_array().unwrap().len()
        }
    };
    assert_eq!(routed("A").await, 1, "the name matches in any case");
    assert_eq!(routed("a").await, 0, "the value must be equal");
    // So one header named in two cases is refused: it could never match both values.
    let (status, body) = post(
        &s,
        "/exchanges/tenants/bindings",
        Some(json!({"queue": "tenant-a", "headers": {"Tenant": "A", "tenant": "B"}})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_binding", "{body}");
}

/// A name no queue can have is a 400 `invalid_name` on every route, not a 404
/// `queue_not_found` as if it might exist (found by the contract helper).
#[tokio::test]
async fn invalid_queue_names_are_400_everywhere() {
    let s = TestServer::start().await;
    for (method, path) in [
        ("GET", "/queues/a%20b"),
        ("GET", "/queues/a%20b/messages"),
        ("POST", "/queues/a%20b/messages"),
        ("GET", "/queues/.x/log"),
        ("GET", "/queues/a%20b/groups/default"),
        ("GET", "/exchanges/a%20b"),
        ("DELETE", "/exchanges/a%20b"),
    ] {
        let response = http()
            .request(method.parse().unwrap(), format!("{}{path}", s.http))
            .body("x")
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or_default();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_name", "{method} {path}");
    }
    let (status, body) = get(&s, "/queues/no-such-queue").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

/// A queue name of 197-200 characters cannot have the default dead-letter queue (its
/// `.dlq` would pass 200): the 400 says so and how to get past it, and naming one, or no
/// dead letters, creates the queue.
#[tokio::test]
async fn a_longest_name_needs_a_named_dead_letter_queue() {
    let s = TestServer::start().await;
    let name = "q".repeat(200);
    let (status, body) = post(&s, &format!("/queues/{name}"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_setting");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("name one with `dead_letter`"), "{message}");
    let (status, body) = post(
        &s,
        &format!("/queues/{name}"),
        Some(json!({"dead_letter": "long-dlq"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let other = "r".repeat(199);
    create(&s, &other, json!({"max_deliveries": 0})).await;
}

/// `DELETE /queues/{q}/groups/{g}`: 409 `group_in_use` while a lease is out, 204 once it
/// is acked, then 404 `group_not_found`; the queue no longer lists the group and a new
/// receive under its name starts again at the earliest message.
#[tokio::test]
async fn a_group_is_deleted_once_nothing_is_in_flight() {
    let s = TestServer::start().await;
    create(&s, "g", json!({})).await;
    send(&s, "g", "first").await;
    let deleted = |path: &'static str| {
        let url = format!("{}{path}", s.http);
        async move {
            let r = http().delete(url).send().await.unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    let (_, leased) = get(&s, "/queues/g/messages?group=reports").await;
    let id = leased["messages"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        deleted("/queues/g/groups/reports").await,
        (StatusCode::CONFLICT, "group_in_use".to_string())
    );
    assert_eq!(
        delete(&s, &format!("/queues/g/messages/{id}?group=reports")).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        deleted("/queues/g/groups/reports").await,
        (StatusCode::NO_CONTENT, String::new())
    );
    for (path, status, code) in [
        (
            "/queues/g/groups/reports",
            StatusCode::NOT_FOUND,
            "group_not_found",
        ),
        (
            "/queues/nope/groups/reports",
            StatusCode::NOT_FOUND,
            "queue_not_found",
        ),
        (
            "/queues/g/groups/a%20b",
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
    ] {
        assert_eq!(deleted(path).await, (status, code.to_string()), "{path}");
    }
    let (status, _) = get(&s, "/queues/g/groups/reports").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, info) = get(&s, "/queues/g").await;
    let names: Vec<&str> = info["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(names, vec!["default"]);
    let (_, again) = get(&s, "/queues/g/messages?group=reports").await;
    assert_eq!(
        again["messages"][0]["body"], "first",
        "a new group starts at the start"
    );
    assert_eq!(again["messages"][0]["delivery_count"], 1);
    // Group `default`, which every queue has, starts again at once: a reset.
    let (_, got) = get(&s, "/queues/g/messages").await;
    let id = got["messages"][0]["id"].as_str().unwrap().to_string();
    delete(&s, &format!("/queues/g/messages/{id}")).await;
    let (_, before) = get(&s, "/queues/g/groups/default").await;
    assert_eq!(before["partitions"][0]["committed_offset"], 1, "{before}");
    for _ in 0..2 {
        assert_eq!(
            deleted("/queues/g/groups/default").await,
            (StatusCode::NO_CONTENT, String::new())
        );
        let (status, after) = get(&s, "/queues/g/groups/default").await;
        assert_eq!(status, StatusCode::OK, "{after}");
        assert_eq!(after["partitions"][0]["committed_offset"], 0, "{after}");
        assert_eq!(after["backlog"], 1, "{after}");
    }
}

/// A redrive reads the shared dead-letter queue instead of leasing it: the other queue's
/// dead letters ahead of this queue's, more of them than the dead-letter queue's group may
/// lease at once, used to fill that limit and end the redrive with nothing moved. A
/// consumer's lease on one of the other queue's dead letters is left alone.
#[tokio::test]
async fn a_redrive_gets_past_more_foreign_dead_letters_than_may_be_in_flight() {
    let s = TestServer::start().await;
    create(&s, "shared", json!({"max_in_flight": 2})).await;
    let letters = [("a", 3), ("b", 2)];
    for (q, n) in letters {
        create(&s, q, json!({"max_deliveries": 1, "dead_letter": "shared"})).await;
        for i in 0..n {
            send(&s, q, &format!("{q}-{i}")).await;
        }
        let (_, got) = get(&s, &format!("/queues/{q}/messages?max=10")).await;
        for m in got["messages"].as_array().unwrap() {
            let id = m["id"].as_str().unwrap();
            let (status, _) = post(&s, &format!("/queues/{q}/messages/{id}/nack"), None).await;
            assert_eq!(status, StatusCode::NO_CONTENT);
        }
    }
    let (_, shared) = get(&s, "/queues/shared/groups/default").await;
    assert_eq!(shared["backlog"], 5, "{shared}");
    // Somebody works on the first of a's dead letters.
    let (_, held) = get(&s, "/queues/shared/messages?max=1").await;
    let held = held["messages"][0]["id"].as_str().unwrap().to_string();

    let (status, moved) = post(&s, "/queues/b/redrive", None).await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!(moved["moved"], 2, "{moved}");
    let (_, log) = get(&s, "/queues/b/log?max=10").await;
    assert_eq!(log["messages"].as_array().unwrap().len(), 4, "{log}");
    let (_, shared) = get(&s, "/queues/shared/groups/default").await;
    assert_eq!(shared["backlog"], 3, "a's stay: {shared}");
    assert_eq!(shared["in_flight"], 1, "the lease on a's is kept: {shared}");
    let nack = format!("/queues/shared/messages/{held}/nack?delay=0");
    let (status, body) = post(&s, &nack, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "still the holder's: {body}");

    let (_, moved) = post(&s, "/queues/a/redrive", Some(json!({"max": 1}))).await;
    assert_eq!(moved["moved"], 1, "{moved}");
    let (_, moved) = post(&s, "/queues/a/redrive", None).await;
    assert_eq!(moved["moved"], 2, "the rest: {moved}");
    let (_, shared) = get(&s, "/queues/shared/groups/default").await;
    assert_eq!(shared["backlog"], 0, "{shared}");
    s.stop().await;
}

/// Two queues that share a dead-letter queue: each one's redrive moves back its own dead
/// letters only (it used to move every dead letter of the shared queue into the queue it
/// was called on), and leaves the other's where they are.
#[tokio::test]
async fn a_redrive_moves_only_its_own_queues_dead_letters() {
    let s = TestServer::start().await;
    for q in ["a", "b"] {
        create(&s, q, json!({"max_deliveries": 1, "dead_letter": "shared"})).await;
        send(&s, q, &format!("from-{q}")).await;
        let (_, got) = get(&s, &format!("/queues/{q}/messages")).await;
        let id = got["messages"][0]["id"].as_str().unwrap().to_string();
        let (status, _) = post(&s, &format!("/queues/{q}/messages/{id}/nack"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (_, shared) = get(&s, "/queues/shared/groups/default").await;
    assert_eq!(shared["backlog"], 2, "{shared}");
    let bodies = |log: Value| -> Vec<String> {
        log["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["body"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    for (q, left) in [("a", 1), ("b", 0)] {
        let (status, moved) = post(&s, &format!("/queues/{q}/redrive"), None).await;
        assert_eq!(status, StatusCode::OK, "{moved}");
        assert_eq!(moved["moved"], 1, "{q}: {moved}");
        let (_, log) = get(&s, &format!("/queues/{q}/log?max=10")).await;
        let want = format!("from-{q}");
        assert_eq!(bodies(log), vec![want.clone(), want], "{q}");
        let (_, shared) = get(&s, "/queues/shared/groups/default").await;
        assert_eq!(shared["backlog"], left, "after {q}'s redrive: {shared}");
        assert_eq!(
            shared["in_flight"], 0,
            "the other's are offered again: {shared}"
        );
    }
    s.stop().await;
}
