//! The `qit` binary as a process: clean shutdown on SIGTERM with a long-poll open, and
//! `kill -9` under `--fsync always` losing no acknowledged work.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Process, get_json, http};
use serde_json::Value;

async fn publish(base: &str, queue: &str, body: &str) -> String {
    let r: Value = http()
        .post(format!("{base}/queues/{queue}/messages"))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["id"].as_str().unwrap().to_string()
}

async fn receive(base: &str, queue: &str, max: usize) -> Vec<Value> {
    let r: Value = get_json(format!(
        "{base}/queues/{queue}/messages?max={max}&visibility=60"
    ))
    .await;
    r["messages"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_open_long_polls_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut qit = Process::start(dir.path(), &[]);
    create(&qit.http, "jobs").await;
    publish(&qit.http, "jobs", "kept").await;
    // Drain the group first so that the long-poll really waits.
    receive(&qit.http, "jobs", 10).await;
    let url = format!("{}/queues/jobs/messages?wait=30", qit.http);
    let waiter = tokio::spawn(async move { http().get(url).send().await });
    common::wait_for_long_polls(&qit.http, 1).await;
    qit.signal("TERM");
    let answer = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the long-poll is answered")
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["messages"], serde_json::json!([]));
    let status = qit
        .wait(Duration::from_secs(10))
        .expect("qit exits within a few seconds");
    assert!(status.success(), "exit status {status:?}");
    // A restart sees the data.
    let qit = Process::start(dir.path(), &[]);
    let r: Value = get_json(format!("{}/queues/jobs/log?from=0", qit.http)).await;
    assert_eq!(r["messages"][0]["body"], "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acked_message_and_forgets_no_unacked_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = BTreeSet::new();
    let mut published = BTreeSet::new();
    {
        let qit = Process::start(dir.path(), &["--fsync", "always"]);
        create(&qit.http, "crash").await;
        for i in 0..30 {
            published.insert(publish(&qit.http, "crash", &format!("m{i}")).await);
        }
        for m in receive(&qit.http, "crash", 20).await {
            let id = m["id"].as_str().unwrap().to_string();
            if acked.len() < 12 {
                let r = http()
                    .delete(format!("{}/queues/crash/messages/{id}", qit.http))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 204);
                acked.insert(id);
            }
        }
        qit.signal("KILL");
    }
    let qit = Process::start(dir.path(), &["--fsync", "always"]);
    let mut redelivered = BTreeSet::new();
    for _ in 0..5 {
        for m in receive(&qit.http, "crash", 100).await {
            redelivered.insert(m["id"].as_str().unwrap().to_string());
        }
    }
    assert!(
        redelivered.is_disjoint(&acked),
        "no acked message comes back"
    );
    let expected: BTreeSet<String> = published.difference(&acked).cloned().collect();
    assert_eq!(redelivered, expected, "every unacked message comes back");
}

/// Creates `queue` on the server at `base`.
async fn create(base: &str, queue: &str) {
    let status = http()
        .post(format!("{base}/queues/{queue}"))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "create {queue}: {status}");
}

/// Runs `qit` with `args` (off the async threads) and returns what it did.
async fn qit_output(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_qit"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Runs `qit` with `args`, which must succeed, and returns its standard output.
async fn run_qit(args: Vec<String>) -> String {
    let output = qit_output(args).await;
    assert!(
        output.status.success(),
        "qit {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Regression (issue 11, item 6): `qit send q '{"a":1}'` stored the JSON body as
/// `text/plain`, so receivers got it back as a string. Without `--content-type` a JSON object
/// or array now goes as `application/json`; `--content-type` still wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qit_send_stores_a_json_body_as_json_and_takes_a_content_type() {
    let s = common::TestServer::start().await;
    create(&s.http, "cli").await;
    for (extra, body) in [
        (vec![], r#"{"a":1}"#),
        (vec![], "plain words"),
        (vec!["--content-type", "application/xml"], "<a/>"),
    ] {
        let mut args: Vec<String> = vec!["send".into(), "--server".into(), s.http.clone()];
        args.extend(extra.into_iter().map(String::from));
        args.extend(["cli".to_string(), body.to_string()]);
        run_qit(args).await;
    }
    let log: Value = get_json(format!("{}/queues/cli/log?from=0&max=10", s.http)).await;
    let m = &log["messages"];
    assert_eq!(m[0]["content_type"], "application/json", "{log}");
    assert_eq!(m[0]["body"], serde_json::json!({"a": 1}), "{log}");
    assert_eq!(m[1]["content_type"], "text/plain", "{log}");
    assert_eq!(m[1]["body"], "plain words", "{log}");
    assert_eq!(m[2]["content_type"], "application/xml", "{log}");
    s.stop().await;
}

/// `qit recv --ack` and `qit tail` whose output nobody reads (the reader closed the pipe,
/// as `| head -1` does) stop quietly instead of panicking, and `recv --ack` acks only what
/// it wrote out: it used to ack every message first and then panic printing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_stops_the_cli_quietly_and_acks_nothing_unseen() {
    let s = common::TestServer::start().await;
    create(&s.http, "pipe").await;
    for i in 0..5 {
        publish(&s.http, "pipe", &format!("m{i}")).await;
    }
    let server = s.http.clone();
    let commands: Vec<Vec<String>> = vec![
        ["recv", "--server", &server, "--max", "5", "--ack", "pipe"]
            .map(String::from)
            .to_vec(),
        ["tail", "--server", &server, "--from", "0", "pipe"]
            .map(String::from)
            .to_vec(),
    ];
    for args in commands {
        let status = tokio::task::spawn_blocking(move || {
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qit"))
                .args(&args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // The read end closes before the command has anything to write.
            drop(child.stdout.take());
            child.wait().unwrap()
        })
        .await
        .unwrap();
        assert_ne!(status.code(), Some(101), "no panic");
    }
    let group: Value = get_json(format!("{}/queues/pipe/groups/default", s.http)).await;
    assert_eq!(group["in_flight"], 5, "{group}");
    assert_eq!(group["partitions"][0]["committed_offset"], 0, "{group}");
    s.stop().await;
}

/// `qit bench` counts each message consumed once: a consumer that stops hands its last
/// acks over before its stream ends, so no acked message goes back to the group to be
/// consumed (and counted) again by the other consumer. It removes what it created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qit_bench_consumes_as_many_as_it_publishes() {
    let s = common::TestServer::start().await;
    for _ in 0..3 {
        let out = run_qit(
            [
                "bench",
                "--server",
                &s.http,
                "--grpc-server",
                &s.grpc,
                "--messages",
                "3000",
                "--producers",
                "2",
                "--consumers",
                "2",
                "--json",
            ]
            .map(String::from)
            .to_vec(),
        )
        .await;
        let summary: Value = out
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .expect("a JSON summary line");
        assert_eq!(summary["published"], 3000, "{summary}");
        assert_eq!(summary["consumed"], 3000, "{summary}");
    }
    // It leaves nothing behind: its queue and that queue's dead-letter queue are gone.
    let left: Value = get_json(format!("{}/queues", s.http)).await;
    assert_eq!(left["queues"], serde_json::json!([]), "{left}");
    s.stop().await;
}

/// Regression (issue 11, item 6): log lines carried ANSI colour codes when written to a file
/// or a pipe. They are coloured only on a terminal.
#[test]
fn log_lines_carry_no_colour_codes_when_stderr_is_a_pipe() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qit"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .args(["--kafka", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    // Wait for the "serving" line (the deadline only guards against a hang).
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("qit is serving")) {
        match received.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l.contains("qit is serving")),
        "no serving line in {seen:?}"
    );
    let text = seen.join("\n");
    assert!(
        !text.contains("\u{1b}["),
        "colour codes in a pipe: {text:?}"
    );
}

/// A second server started on a data directory in use stops before it touches anything
/// there (it would cut the first one's open segments as torn tails), and names the reason;
/// the first one serves on with its data. Once the first one is gone, even by `kill -9`,
/// the directory is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_data_directory_in_use_stops_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Process::start(dir.path(), &["--fsync", "always"]);
    create(&first.http, "jobs").await;
    publish(&first.http, "jobs", "before").await;

    let (status, stderr) = common::refused_start(common::serve_command(dir.path()));
    assert!(!status.success(), "{status:?}: {stderr}");
    assert!(stderr.contains("in use by another qit process"), "{stderr}");

    publish(&first.http, "jobs", "after").await;
    let log: Value = get_json(format!("{}/queues/jobs/log?from=0", first.http)).await;
    assert_eq!(common::bodies(&log), ["before", "after"], "{log}");

    first.signal("KILL");
    first.wait(Duration::from_secs(10)).expect("killed");
    let again = Process::start(dir.path(), &[]);
    let log: Value = get_json(format!("{}/queues/jobs/log?from=0", again.http)).await;
    assert_eq!(log["messages"].as_array().map(Vec::len), Some(2), "{log}");
}

/// `qit group`: list a queue's groups, show one, seek it, and delete it (refused while it
/// has a message in flight, with the server's reason and a failing exit status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qit_group_lists_shows_seeks_and_deletes_groups() {
    let s = common::TestServer::start().await;
    create(&s.http, "cg").await;
    for i in 0..3 {
        publish(&s.http, "cg", &format!("m{i}")).await;
    }
    let leased = receive_group(&s.http, "cg", "audit").await;
    let qit = |args: &[&str]| {
        let mut all: Vec<String> = vec!["group".into(), "--server".into(), s.http.clone()];
        all.extend(args.iter().map(|a| a.to_string()));
        all
    };
    let listed = run_qit(qit(&["list", "cg"])).await;
    assert!(
        listed.contains("audit  backlog 3  in flight 1") && listed.contains("default  backlog 3"),
        "{listed}"
    );
    let shown = run_qit(qit(&["info", "cg", "audit"])).await;
    assert!(shown.contains("partition 0  committed 0"), "{shown}");
    let moved: Value = serde_json::from_str(
        &run_qit(qit(&["--json", "seek", "cg", "default", "--offset", "2"])).await,
    )
    .unwrap();
    assert_eq!(moved["partitions"][0]["committed_offset"], 2, "{moved}");
    let refused = qit_output(qit(&["delete", "cg", "audit"])).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("in flight"), "{stderr}");
    let id = leased["messages"][0]["id"].as_str().unwrap().to_string();
    let acked = http()
        .delete(format!("{}/queues/cg/messages/{id}?group=audit", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(acked.status(), 204);
    let deleted = run_qit(qit(&["delete", "cg", "audit"])).await;
    assert!(deleted.contains("deleted group audit of cg"), "{deleted}");
    let listed = run_qit(qit(&["list", "cg"])).await;
    assert!(!listed.contains("audit"), "{listed}");
    s.stop().await;
}

/// Leases one message of `queue` for `group` (60 s).
async fn receive_group(base: &str, queue: &str, group: &str) -> Value {
    get_json(format!(
        "{base}/queues/{queue}/messages?group={group}&visibility=60"
    ))
    .await
}

/// The server turns transparent huge pages off for itself: with them, every 2 MiB region
/// its allocator touches is resident, and a cluster node with 1,500 idle queues held
/// 3.9 GiB instead of a few hundred MiB. Linux shows the setting in `/proc/PID/status`
/// (`THP_enabled`, kernels from 6.x); where it does not, there is nothing to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Process::start(dir.path(), &[]);
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())) else {
        return;
    };
    if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    }
}
