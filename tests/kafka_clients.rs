//! Issue 16: unmodified Kafka clients against a real server — kafka-python and
//! confluent-kafka (librdkafka) from PyPI, and Debian's `kcat`. The scenarios live in
//! `tests/kafka/clients.py`; `tools/kafka-clients.sh` installs the clients when missing
//! (a venv under `target/`, and kcat as root). A client that cannot be installed fails
//! the test: nothing here is skipped.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{TestServer, eventually, get_json, kafka_python};

/// Runs one scenario of `clients.py` against `server`; panics with its output on failure.
async fn scenario(server: &TestServer, name: &str, extra: &[&str]) -> String {
    let python = tokio::task::spawn_blocking(kafka_python).await.unwrap();
    let script = format!("{}/tests/kafka/clients.py", env!("CARGO_MANIFEST_DIR"));
    let bootstrap = server.kafka.clone().expect("the Kafka listener is on");
    let child = tokio::process::Command::new(python)
        .arg(script)
        .args([name, bootstrap.as_str(), server.http.as_str()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the scenario");
    common::scenario_output(child, name, Duration::from_secs(240)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_through_a_group_of_two_with_commits_and_a_restart() {
    let server = TestServer::start().await;
    let out = scenario(&server, "group", &[]).await;
    assert!(out.contains("\"consumed\": 10000"), "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_pythons_group_consumer_commits_into_the_qit_group() {
    let server = TestServer::start().await;
    scenario(&server, "kafka_python_group", &[]).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_are_kept_and_seekable() {
    let server = TestServer::start().await;
    scenario(&server, "timestamps", &[]).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_batches_from_both_clients() {
    let server = TestServer::start().await;
    scenario(&server, "compression", &[]).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producers_store_each_message_once() {
    let server = TestServer::start().await;
    scenario(&server, "idempotent", &[]).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_described_and_deleted() {
    let server = TestServer::start().await;
    scenario(&server, "topics", &[]).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_and_http_read_each_others_messages() {
    use qit::proto::broker_client::BrokerClient;
    use qit::proto::{SubscribeRequest, subscribe_request::Start};
    use tokio_stream::StreamExt;
    let server = TestServer::start().await;
    scenario(&server, "cross", &[]).await;
    // The Kafka-produced record over gRPC too: key, headers and timestamp as sent.
    let mut grpc = BrokerClient::connect(server.grpc.clone()).await.unwrap();
    let mut stream = grpc
        .subscribe(SubscribeRequest {
            queue: "bridge".into(),
            partition: 0,
            start: Some(Start::FromOffset(0)),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap().message.unwrap();
    assert_eq!(first.key.as_deref(), Some("user-7"));
    assert_eq!(first.headers.get("trace").map(String::as_str), Some("abc"));
    let http_view = get_json(format!(
        "{}/queues/bridge/log?partition=0&from=0",
        server.http
    ))
    .await;
    assert_eq!(http_view["messages"][0]["timestamp"], first.timestamp_ms);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_with_qits_users_and_grants() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| c.auth = true).await;
    let out = scenario(&server, "sasl", &["a-long-enough-password"]).await;
    assert!(out.contains("TOPIC_AUTHORIZATION_FAILED"), "{out}");
    server.stop().await;
}

/// kcat (librdkafka's command-line client, from Debian): keys and headers in, the same out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_produces_and_consumes() {
    let server = TestServer::start().await;
    tokio::task::spawn_blocking(kafka_python).await.unwrap();
    let broker = server.kafka.clone().unwrap();
    let kcat = |args: Vec<String>, input: &'static str| {
        let mut child = std::process::Command::new("kcat")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kcat is installed (tools/kafka-clients.sh, as root)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let args = |extra: &[&str]| {
        let mut all = vec!["-b".to_string(), broker.clone()];
        all.extend(extra.iter().map(|s| s.to_string()));
        all
    };
    let produce = args(&["-P", "-t", "cats", "-K", ":", "-H", "breed=tabby"]);
    let out = tokio::task::spawn_blocking(move || kcat(produce, "tom:meow\nfelix:purr\n"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let consume = args(&["-C", "-t", "cats", "-e", "-f", "%k=%s %h %o\n"]);
    let out = tokio::task::spawn_blocking(move || kcat(consume, ""))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(text, "tom=meow breed=tabby 0\nfelix=purr breed=tabby 1\n");
    // The same two over HTTP.
    let base = server.http.clone();
    eventually("kcat's messages are in the log", || {
        let url = format!("{base}/queues/cats/log?partition=0&from=0");
        async move { get_json(url).await["messages"].as_array().map(Vec::len) == Some(2) }
    })
    .await;
    let log = get_json(format!(
        "{}/queues/cats/log?partition=0&from=0",
        server.http
    ))
    .await;
    assert_eq!(log["messages"][1]["key"], "felix");
    assert_eq!(log["messages"][1]["headers"]["breed"], "tabby");
    server.stop().await;
}
