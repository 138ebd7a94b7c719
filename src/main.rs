//! The `qit` binary: parse the command line, set up logging, run. `anyhow` lives only here.

use std::io::{IsTerminal, Read};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use reqwest::Method;
use serde_json::{Value, json};

use qit::cli::{
    BenchArgs, Cli, ClientArgs, ClusterAction, Command, GroupAction, QueueAction, RecvArgs,
    SendArgs, ServeArgs, TailArgs,
};
use qit::client::{Body, Client, segment};
use qit::config::{LogFormat, ServerConfig};
use qit::server::{Server, shutdown_signal};

/// mimalloc: the broker allocates many small, short-lived buffers on every request, where
/// glibc's allocator spent a fifth of the server's time in a profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process, whatever the system's setting. The
/// allocator's memory is sparse: with huge pages every 2 MiB region it touches becomes
/// resident, and a cluster node with 1,500 idle queues held 3.9 GiB instead of a few
/// hundred MiB. (mimalloc's own request for them is compiled out by its `no_thp` feature;
/// this also covers systems where the kernel gives them unasked, `enabled = always`.)
#[cfg(target_os = "linux")]
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes nothing but a
    // flag of this process; a kernel without it answers EINVAL, which is harmless.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(not(target_os = "linux"))]
fn no_transparent_huge_pages() {}

fn main() -> std::process::ExitCode {
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli.command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The causes in one line, never a backtrace: this is for people, not debuggers.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Queue { client, action } => queue(&client, action).await,
        Command::Group { client, action } => group(&client, action).await,
        Command::Send(args) => send(args).await,
        Command::Recv(args) => recv(args).await,
        Command::Ack(args) => {
            let path = format!(
                "/queues/{}/messages/{}",
                segment(&args.queue),
                segment(&args.id)
            );
            let client = Client::new(&args.client);
            client
                .request(Method::DELETE, &path, &[("group", args.group)], None)
                .await?;
            done(&args.client, "acked")
        }
        Command::Nack(args) => {
            let m = args.message;
            let path = format!(
                "/queues/{}/messages/{}/nack",
                segment(&m.queue),
                segment(&m.id)
            );
            let mut query = vec![("group", m.group)];
            if let Some(delay) = args.delay {
                query.push(("delay", delay.to_string()));
            }
            Client::new(&m.client)
                .request(Method::POST, &path, &query, None)
                .await?;
            done(&m.client, "nacked")
        }
        Command::Tail(args) => tail(args).await,
        Command::Bench(args) => bench(args).await,
        Command::Cluster {
            client,
            action: ClusterAction::Status,
        } => cluster_status(&client).await,
        Command::Cluster {
            client,
            action: ClusterAction::AddNode { node },
        } => add_node(&client, &node).await,
        Command::Cluster {
            client,
            action: ClusterAction::RemoveNode { id },
        } => {
            let path = format!("/cluster/nodes/{id}");
            Client::new(&client)
                .request(Method::DELETE, &path, &[], None)
                .await?;
            println!("node {id} removed");
            Ok(())
        }
        Command::Cluster {
            client,
            action: ClusterAction::ReplaceNode { old, node },
        } => replace_node(&client, old, &node).await,
    }
}

/// `ID=HOST:PORT` of `qit cluster add-node` and `replace-node`.
fn node_arg(node: &str) -> Result<(u64, String)> {
    let Some((id, cluster)) = node.split_once('=') else {
        bail!("`{node}` is not ID=HOST:PORT");
    };
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("`{id}` is not a node id"))?;
    Ok((id, cluster.trim().to_string()))
}

/// `qit cluster add-node ID=HOST:PORT`.
async fn add_node(client_args: &ClientArgs, node: &str) -> Result<()> {
    let (id, cluster) = node_arg(node)?;
    let body = json!({"id": id, "cluster": cluster});
    Client::new(client_args)
        .request(Method::POST, "/cluster/nodes", &[], Some(Body::Json(body)))
        .await?;
    println!("node {id} added");
    Ok(())
}

/// How often `qit cluster replace-node` looks at the cluster while the replacement runs.
const REPLACE_PROGRESS: Duration = Duration::from_secs(3);

/// `qit cluster replace-node OLD ID=HOST:PORT`: one request does the replacement (on the
/// metadata leader); meanwhile the cluster is looked at every few seconds and what changed
/// is printed.
async fn replace_node(client_args: &ClientArgs, old: u64, node: &str) -> Result<()> {
    let (id, cluster) = node_arg(node)?;
    // With --json only the answer is printed, no progress.
    if !client_args.json {
        println!(
            "replacing node {old} by node {id} ({cluster}) through {}",
            client_args.server
        );
    }
    let client = Client::new(client_args);
    let path = format!("/cluster/nodes/{old}/replace");
    let body = json!({"id": id, "cluster": cluster});
    let replace = client.request(Method::POST, &path, &[], Some(Body::Json(body)));
    tokio::pin!(replace);
    let mut progress = tokio::time::interval(REPLACE_PROGRESS);
    progress.tick().await;
    let mut said = String::new();
    let answer = loop {
        tokio::select! {
            answer = &mut replace => break answer?,
            _ = progress.tick() => {
                if client_args.json {
                    continue;
                }
                let now = replace_progress(&client, old, id).await;
                if now != said {
                    println!("  {now}");
                    said = now;
                }
            }
        }
    };
    if client_args.json {
        println!("{}", answer.unwrap_or(Value::Null));
        return Ok(());
    }
    let view: qit::cluster::view::ClusterView =
        serde_json::from_value(answer.unwrap_or(Value::Null))?;
    let nodes: Vec<String> = view.nodes.iter().map(|n| n.id.to_string()).collect();
    println!(
        "node {old} replaced by node {id}: the cluster's nodes are {}",
        nodes.join(", ")
    );
    Ok(())
}

/// One line on how a replacement of `old` by `new` stands, as `GET /cluster` shows it.
async fn replace_progress(client: &Client, old: u64, new: u64) -> String {
    let view = tokio::time::timeout(
        Duration::from_secs(2),
        client.request(Method::GET, "/cluster", &[], None),
    )
    .await;
    let Ok(Ok(Some(view))) = view else {
        return "waiting (the cluster view did not answer)".to_string();
    };
    let Ok(view) = serde_json::from_value::<qit::cluster::view::ClusterView>(view) else {
        return "waiting (the cluster view is unreadable)".to_string();
    };
    let member = |id: u64| view.nodes.iter().any(|n| n.id == id);
    let on_old: std::collections::BTreeSet<&str> = view
        .partitions
        .iter()
        .filter(|p| p.replicas.contains(&old))
        .map(|p| p.queue.as_str())
        .collect();
    match (member(new), member(old)) {
        (false, _) => format!("node {new} is being added (catching up with the metadata)"),
        (true, true) => format!(
            "node {new} is a member; {} queue(s) still have a replica on node {old}",
            on_old.len()
        ),
        (true, false) => format!("node {old} is no member any more"),
    }
}

async fn cluster_status(client_args: &ClientArgs) -> Result<()> {
    let client = Client::new(client_args);
    let view = client
        .request(reqwest::Method::GET, "/cluster", &[], None)
        .await?
        .unwrap_or(Value::Null);
    if client_args.json {
        println!("{view}");
        return Ok(());
    }
    let view: qit::cluster::view::ClusterView = serde_json::from_value(view)?;
    // Only a group's leader knows how far its followers lag: ask the other nodes too.
    let mut others = Vec::new();
    for node in view.nodes.iter().filter(|n| n.up && n.id != view.node_id) {
        let Some(http) = &node.http else { continue };
        let mut peer = client_args.clone();
        peer.server = format!("http://{http}");
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            Client::new(&peer).request(reqwest::Method::GET, "/cluster", &[], None),
        )
        .await;
        if let Ok(Ok(Some(other))) = answer
            && let Ok(other) = serde_json::from_value(other)
        {
            others.push(other);
        }
    }
    println!("{}", qit::cluster::view::status_table(&view, &others));
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // openraft logs every refused connection to a down peer as an error, several times
        // a second per group: qit reports a group's failure itself (see `cluster::view`).
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=off"));
    // Colour codes only on a terminal: in a file or a pipe they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.http {
        config.http = v;
    }
    if let Some(v) = args.grpc {
        config.grpc = v;
    }
    if let Some(v) = args.kafka {
        config.kafka = v;
    }
    if let Some(v) = args.fsync {
        config.fsync = v;
    }
    if args.auth {
        config.auth = true;
    }
    if let Some(v) = args.log_format {
        config.log_format = v;
    }
    if let Some(v) = args.node_id {
        config.node_id = Some(v);
    }
    if let Some(v) = args.cluster {
        config.cluster = Some(v);
    }
    if let Some(v) = args.peers {
        config.peers = Some(v);
    }
    if args.join {
        config.join = true;
    }
    if let Some(v) = args.replaces {
        config.replaces = Some(v);
    }
    if let Some(v) = args.cluster_secret {
        config.cluster_secret = Some(v);
    }
    if let Ok(secret) = std::env::var("QIT_JWT_SECRET") {
        config.jwt_secret = Some(secret);
    }
    init_tracing(config.log_format);
    let server = match Server::bind(config).await {
        Ok(server) => server,
        Err(error) => {
            tracing::error!(%error, "qit could not start");
            bail!("qit could not start: {error}");
        }
    };
    server.run(shutdown_signal()).await?;
    Ok(())
}

/// Prints `value` (as JSON with `--json`, else as `human` renders it). False when stdout
/// is gone (a reader such as `head` closed the pipe): the command then stops quietly
/// rather than panicking, and does nothing that depended on the output being seen.
fn print(client: &ClientArgs, value: &Value, human: impl FnOnce(&Value) -> String) -> bool {
    if client.json {
        say(&value.to_string())
    } else {
        say(&human(value))
    }
}

/// Writes one line to stdout and flushes it; false when that failed.
fn say(line: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

fn done(client: &ClientArgs, what: &str) -> Result<()> {
    print(client, &json!({"ok": true}), |_| what.to_string());
    Ok(())
}

fn queue_line(q: &Value) -> String {
    let messages: u64 = q["partitions"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    p["next_offset"].as_u64().unwrap_or(0) - p["first_offset"].as_u64().unwrap_or(0)
                })
                .sum()
        })
        .unwrap_or(0);
    let groups: Vec<String> = q["groups"]
        .as_array()
        .map(|gs| {
            gs.iter()
                .map(|g| {
                    format!(
                        "{} (backlog {}, in flight {})",
                        g["name"].as_str().unwrap_or("?"),
                        g["backlog"],
                        g["in_flight"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{}  partitions {}  messages {}  groups: {}",
        q["name"].as_str().unwrap_or("?"),
        q["settings"]["partitions"],
        messages,
        groups.join(", ")
    )
}

async fn queue(client: &ClientArgs, action: QueueAction) -> Result<()> {
    let http = Client::new(client);
    match action {
        QueueAction::Create {
            name,
            partitions,
            ack_timeout,
            max_deliveries,
            replicas,
            settings,
        } => {
            let mut body: Value = match settings {
                Some(text) => serde_json::from_str(&text).context("--settings is not JSON")?,
                None => json!({}),
            };
            for (field, value) in [
                ("partitions", partitions.map(u64::from)),
                ("ack_timeout", ack_timeout),
                ("max_deliveries", max_deliveries.map(u64::from)),
                ("replicas", replicas.map(u64::from)),
            ] {
                if let Some(v) = value {
                    body[field] = json!(v);
                }
            }
            let info = http
                .request(
                    Method::POST,
                    &format!("/queues/{}", segment(&name)),
                    &[],
                    Some(Body::Json(body)),
                )
                .await?
                .unwrap_or(Value::Null);
            print(client, &info, |q| format!("created {}", queue_line(q)));
        }
        QueueAction::Delete { name } => {
            http.request(
                Method::DELETE,
                &format!("/queues/{}", segment(&name)),
                &[],
                None,
            )
            .await?;
            done(client, &format!("deleted {name}"))?;
        }
        QueueAction::List => {
            let list = http
                .request(Method::GET, "/queues", &[], None)
                .await?
                .unwrap_or(Value::Null);
            print(client, &list, |l| {
                l["queues"]
                    .as_array()
                    .map(|qs| qs.iter().map(queue_line).collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default()
            });
        }
        QueueAction::Info { name } => {
            let info = http
                .request(
                    Method::GET,
                    &format!("/queues/{}", segment(&name)),
                    &[],
                    None,
                )
                .await?
                .unwrap_or(Value::Null);
            print(client, &info, |q| {
                serde_json::to_string_pretty(q).unwrap_or_default()
            });
        }
    }
    Ok(())
}

async fn group(client: &ClientArgs, action: GroupAction) -> Result<()> {
    let http = Client::new(client);
    let path =
        |queue: &str, group: &str| format!("/queues/{}/groups/{}", segment(queue), segment(group));
    match action {
        GroupAction::List { queue } => {
            let info = http
                .request(
                    Method::GET,
                    &format!("/queues/{}", segment(&queue)),
                    &[],
                    None,
                )
                .await?
                .unwrap_or(Value::Null);
            let groups = json!({"groups": info["groups"]});
            print(client, &groups, |g| {
                g["groups"]
                    .as_array()
                    .map(|gs| gs.iter().map(group_line).collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default()
            });
        }
        GroupAction::Info { queue, group } => {
            let info = http
                .request(Method::GET, &path(&queue, &group), &[], None)
                .await?
                .unwrap_or(Value::Null);
            print(client, &info, group_text);
        }
        GroupAction::Seek {
            queue,
            group,
            to,
            offset,
            partition,
            time,
        } => {
            let body = match (to, offset, time) {
                (Some(to), None, None) => json!({ "to": to }),
                (None, Some(offset), None) => json!({ "partition": partition, "offset": offset }),
                (None, None, Some(time)) => json!({ "from_time": time }),
                _ => anyhow::bail!("give exactly one of --to, --offset or --time"),
            };
            let info = http
                .request(
                    Method::PUT,
                    &format!("{}/offset", path(&queue, &group)),
                    &[],
                    Some(Body::Json(body)),
                )
                .await?
                .unwrap_or(Value::Null);
            print(client, &info, group_text);
        }
        GroupAction::Delete { queue, group } => {
            http.request(Method::DELETE, &path(&queue, &group), &[], None)
                .await?;
            done(client, &format!("deleted group {group} of {queue}"))?;
        }
    }
    Ok(())
}

/// One group of a queue's info, as a line.
fn group_line(g: &Value) -> String {
    format!(
        "{}  backlog {}  in flight {}  dead-lettered {}",
        g["name"].as_str().unwrap_or("?"),
        g["backlog"],
        g["in_flight"],
        g["dead_lettered"]
    )
}

/// A group's state: a line for the group, one per partition.
fn group_text(g: &Value) -> String {
    let mut lines = vec![group_line(g)];
    for p in g["partitions"].as_array().into_iter().flatten() {
        lines.push(format!(
            "  partition {}  committed {}  backlog {}  in flight {}",
            p["partition"], p["committed_offset"], p["backlog"], p["in_flight"]
        ));
    }
    lines.join("\n")
}

async fn send(args: SendArgs) -> Result<()> {
    let bytes = match (&args.body, &args.file) {
        (Some(body), _) => body.clone().into_bytes(),
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, None) => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading standard input")?;
            buf
        }
    };
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once('=')
            .with_context(|| format!("--header `{h}` is not NAME=VALUE"))?;
        headers.push((format!("Qit-Header-{name}"), value.to_string()));
    }
    if let Some(key) = &args.idempotency_key {
        headers.push(("Idempotency-Key".into(), key.clone()));
    }
    let mut query = Vec::new();
    if let Some(key) = &args.key {
        query.push(("key", key.clone()));
    }
    let body = Body::Raw {
        content_type: args
            .content_type
            .clone()
            .unwrap_or_else(|| qit::client::content_type_of(&bytes).to_string()),
        bytes,
        headers,
    };
    let answer = Client::new(&args.client)
        .request(
            Method::POST,
            &format!("/queues/{}/messages", segment(&args.queue)),
            &query,
            Some(body),
        )
        .await?
        .unwrap_or(Value::Null);
    print(&args.client, &answer, |a| {
        format!("sent {}", a["id"].as_str().unwrap_or("?"))
    });
    Ok(())
}

fn message_line(m: &Value) -> String {
    let body = match (&m["body"], &m["body_base64"]) {
        (Value::String(s), _) => s.clone(),
        (Value::Null, Value::String(b)) => format!("base64:{b}"),
        (other, _) => other.to_string(),
    };
    format!(
        "{}  delivery {}  {}",
        m["id"].as_str().unwrap_or("?"),
        m["delivery_count"],
        body
    )
}

async fn recv(args: RecvArgs) -> Result<()> {
    let client = Client::new(&args.client);
    let path = format!("/queues/{}/messages", segment(&args.queue));
    let mut query = vec![
        ("group", args.group.clone()),
        ("max", args.max.to_string()),
        ("wait", args.wait.to_string()),
    ];
    if let Some(v) = args.visibility {
        query.push(("visibility", v.to_string()));
    }
    let answer = client
        .request(Method::GET, &path, &query, None)
        .await?
        .unwrap_or(Value::Null);
    let messages = answer["messages"].as_array().cloned().unwrap_or_default();
    // Printed first, acked after: a message is acked only once it was written out.
    let printed = print(&args.client, &answer, |_| {
        if messages.is_empty() {
            "no messages".to_string()
        } else {
            messages
                .iter()
                .map(message_line)
                .collect::<Vec<_>>()
                .join("\n")
        }
    });
    if args.ack && printed {
        for m in &messages {
            let id = m["id"].as_str().unwrap_or_default();
            client
                .request(
                    Method::DELETE,
                    &format!("{path}/{}", segment(id)),
                    &[("group", args.group.clone())],
                    None,
                )
                .await?;
        }
    }
    Ok(())
}

async fn tail(args: TailArgs) -> Result<()> {
    let client = Client::new(&args.client);
    let path = format!("/queues/{}/log", segment(&args.queue));
    let (mut param, mut value) = match args.from.strip_prefix("t:") {
        Some(time) => ("from_time", time.to_string()),
        None if args.from.parse::<u64>().is_ok() => ("from", args.from.clone()),
        None => ("from_time", args.from.clone()),
    };
    let mut printed = 0u64;
    loop {
        let query = [
            ("partition", args.partition.to_string()),
            (param, value.clone()),
            ("max", "500".to_string()),
        ];
        let page = client
            .request(Method::GET, &path, &query, None)
            .await?
            .unwrap_or(Value::Null);
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        for m in &messages {
            let line = if args.client.json {
                m.to_string()
            } else {
                message_line(m)
            };
            if !say(&line) {
                return Ok(());
            }
            printed += 1;
            if args.max.is_some_and(|max| printed >= max) {
                return Ok(());
            }
        }
        param = "from";
        value = page["next_offset"].as_u64().unwrap_or(0).to_string();
        if messages.is_empty() {
            if !args.follow {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn bench(args: BenchArgs) -> Result<()> {
    if let Some(queues) = args.queues {
        return bench_queues(args, queues).await;
    }
    let options = qit::bench::BenchOptions {
        http_url: args.client.server.trim_end_matches('/').to_string(),
        grpc_url: args.client.grpc_server.clone(),
        use_http: args.http,
        queue: args.queue,
        messages: args.messages,
        duration: args
            .duration
            .map(Duration::try_from_secs_f64)
            .transpose()
            .context("--duration must be a non-negative number of seconds")?,
        rate: args.rate,
        size: args.size,
        batch: args.batch,
        window: args.window,
        mode: match args.mode {
            qit::cli::BenchMode::Unary => qit::bench::PublishMode::Unary,
            qit::cli::BenchMode::Stream => qit::bench::PublishMode::Stream,
        },
        producers: args.producers,
        consumers: args.consumers,
        partitions: args.partitions,
        credit: args.credit,
        progress: !args.client.json,
    };
    let report = qit::bench::run(options).await?;
    if args.client.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.human());
    }
    Ok(())
}

async fn bench_queues(args: BenchArgs, queues: usize) -> Result<()> {
    let options = qit::bench_queues::ManyQueuesOptions {
        http_url: args.client.server.trim_end_matches('/').to_string(),
        queues,
        concurrency: args.concurrency,
        prefix: args
            .queue
            .unwrap_or_else(|| format!("many-{}", std::process::id())),
        server_pid: args.server_pid,
        idle_wait: Duration::try_from_secs_f64(args.idle_secs)
            .context("--idle-secs must be a non-negative number of seconds")?,
        cpu_window: Duration::from_secs(5),
        cleanup: args.cleanup,
    };
    let report = qit::bench_queues::run(options).await?;
    if args.client.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.human());
    }
    Ok(())
}
