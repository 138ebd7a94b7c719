//! Shared helpers for integration tests: a real server on ephemeral ports, in-process or as
//! the `qit` binary.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod cluster;

use qit::config::ServerConfig;
use qit::log::FsyncPolicy;
use qit::server::Server;
use tokio::sync::oneshot;

/// A server running in this process.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`
    pub http: String,
    /// `http://127.0.0.1:PORT`
    pub grpc: String,
    /// `127.0.0.1:PORT` of the Kafka listener (`None` when the config turned it off).
    pub kafka: Option<String>,
    /// Its data directory.
    pub dir: PathBuf,
    /// The broker behind the listeners (its task tracker shows what still runs).
    pub broker: std::sync::Arc<qit::broker::Broker>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _temp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server on a fresh temp dir.
    pub async fn start() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let mut server = Self::start_in(temp.path(), FsyncPolicy::Interval).await;
        server._temp = Some(temp);
        server
    }

    /// Starts a server on `dir`.
    pub async fn start_in(dir: &Path, fsync: FsyncPolicy) -> Self {
        Self::start_with(dir, |c| c.fsync = fsync).await
    }

    /// Starts a server on `dir` with a config adjusted by `adjust`.
    pub async fn start_with(dir: &Path, adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let mut config = ServerConfig {
            data_dir: dir.to_path_buf(),
            http: "127.0.0.1:0".parse().unwrap(),
            grpc: "127.0.0.1:0".parse().unwrap(),
            kafka: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        };
        adjust(&mut config);
        let server = Server::bind(config).await.unwrap();
        let http = format!("http://{}", server.http_addr());
        let grpc = format!("http://{}", server.grpc_addr());
        let kafka = server.kafka_addr().map(|a| a.to_string());
        let broker = server.broker();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            http,
            grpc,
            kafka,
            dir: dir.to_path_buf(),
            broker,
            stop: Some(stop),
            task: Some(task),
            _temp: None,
        }
    }

    /// Stops gracefully and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            // A guard against a hang, not a measure: the drain alone may take 5 s.
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("server stops")
                .unwrap();
        }
    }
}

/// A free TCP port on the loopback for a server a test starts.
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// First port [`free_port_on`] hands out: below Linux's ephemeral range (32768-60999 by
/// default), so no outgoing connection (a test's client, a node's peer connection) can be
/// given the port between the check here and the server's own bind, as with a port the
/// kernel picks for `bind(0)`.
const PORTS_FROM: u32 = 20_000;
/// Ports [`free_port_on`] cycles through.
const PORTS_SPAN: u32 = 12_000;

/// A free TCP port on `ip` for a server a test starts. Never the same port twice in one
/// test process (tests of one binary run in parallel); the start differs per process, and
/// a port some other process holds is skipped.
pub fn free_port_on(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % PORTS_SPAN;
    for _ in 0..PORTS_SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = PORTS_FROM + (start + n) % PORTS_SPAN;
        let port = u16::try_from(port).expect("ports below 32768");
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free port on {ip} in {PORTS_FROM}..{}",
        PORTS_FROM + PORTS_SPAN
    )
}

/// The `qit` binary running as a child process.
pub struct Process {
    /// The child.
    pub child: Child,
    /// HTTP base URL.
    pub http: String,
    /// gRPC base URL.
    pub grpc: String,
    /// `127.0.0.1:PORT` of the Kafka listener.
    pub kafka: String,
}

impl Process {
    /// Starts `qit serve` on `dir` with extra flags and waits until it is healthy.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let (http_port, grpc_port, kafka_port) = (free_port(), free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_qit"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .args(["--http", &format!("127.0.0.1:{http_port}")])
            .args(["--grpc", &format!("127.0.0.1:{grpc_port}")])
            .args(["--kafka", &format!("127.0.0.1:{kafka_port}")])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let process = Self {
            child,
            http: format!("http://127.0.0.1:{http_port}"),
            grpc: format!("http://127.0.0.1:{grpc_port}"),
            kafka: format!("127.0.0.1:{kafka_port}"),
        };
        process.wait_healthy();
        process
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = self.http.trim_start_matches("http://").to_string();
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("qit did not start listening on {addr}");
    }

    /// Sends a signal (`TERM`, `KILL`, ...); `STOP` returns once every thread stopped
    /// ([`wait_stopped`]).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        if name == "STOP" {
            wait_stopped(self.child.id());
        }
    }

    /// Waits for the exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qit serve` on `dir` with free ports for its listeners, output not captured yet (for
/// a start expected to fail: see [`refused_start`]).
pub fn serve_command(dir: &Path) -> Command {
    let port = || format!("127.0.0.1:{}", free_port());
    let mut command = Command::new(env!("CARGO_BIN_EXE_qit"));
    command.arg("serve").arg("--data-dir").arg(dir).args([
        "--http",
        &port(),
        "--grpc",
        &port(),
        "--kafka",
        &port(),
    ]);
    command
}

/// Runs `command` (a `qit serve` expected to refuse to start) to its exit, with a guard
/// of 30 s against one that serves instead; returns its exit status and what it wrote to
/// stderr.
pub fn refused_start(mut command: Command) -> (std::process::ExitStatus, String) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qit");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for qit") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("qit started on a data directory it should refuse and kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    (status, stderr)
}

/// A reqwest client.
pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// The text bodies of the messages of a receive or log answer, in order.
pub fn bodies(answer: &serde_json::Value) -> Vec<&str> {
    answer["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["body"].as_str())
        .collect()
}

/// GETs `url` and parses the answer as JSON (whatever its status).
pub async fn get_json(url: String) -> serde_json::Value {
    http().get(url).send().await.unwrap().json().await.unwrap()
}

/// Waits until `check` holds, polling. The deadline is a guard against a hang, never what a
/// test measures: a test waits on a condition, not on the scheduler of a busy machine.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_some(what, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
}

/// What `check` gives once it gives something, polling as [`eventually`] does.
pub async fn eventually_some<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `/metrics` text of the server at `base`.
pub async fn metrics_text(base: &str) -> String {
    http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until the server at `base` holds `n` long-polls (its `qit_long_poll_waiters`
/// gauge), i.e. the requests reached the server and took their slots.
pub async fn wait_for_long_polls(base: &str, n: usize) {
    eventually(&format!("{n} long-polls are open"), || async {
        let text = metrics_text(base).await;
        text.lines().any(|line| {
            line.strip_prefix("qit_long_poll_waiters ")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|v| v == n as f64)
        })
    })
    .await;
}

/// Waits for the Kafka client scenario `child` (stdout and stderr piped) to end, `guard`
/// at most (against a hang, not a measure); its stdout, or a panic with its output when
/// it failed.
pub async fn scenario_output(child: tokio::process::Child, name: &str, guard: Duration) -> String {
    let out = tokio::time::timeout(guard, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("scenario {name} hung"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "scenario {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The Python of the Kafka clients' venv (`tools/kafka-clients.sh` installs it the first
/// time), once per test binary.
pub fn kafka_python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let root = env!("CARGO_MANIFEST_DIR");
        let out = std::process::Command::new("bash")
            .arg(format!("{root}/tools/kafka-clients.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run tools/kafka-clients.sh");
        assert!(out.status.success(), "installing the Kafka clients failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("the script names the python")
            .trim()
            .to_string()
    })
}

/// Waits until every thread of process `pid` is stopped (state `T` in
/// `/proc/{pid}/task/*/stat`). `kill -STOP` returns before that: the thread that takes
/// the signal stops the others once it runs, and on a busy machine another thread of the
/// process may meanwhile go on for a while (a "stopped" follower acked an entry so, and a
/// create meant to find no quorum was committed).
pub fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process runs");
        let running = tasks.flatten().any(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // `pid (comm) state ...`: the state follows the last `)`.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            state.is_some_and(|s| s != 'T' && s != 't')
        });
        if !running {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} did not stop in 30 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
