//! Command-line types (clap): `serve`, the client subcommands and `bench`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;
use crate::log::FsyncPolicy;

/// qit: a message broker on a durable log.
#[derive(Debug, Parser)]
#[command(name = "qit", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Where client commands find the server, and how they print.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// HTTP endpoint of the server.
    #[arg(
        long,
        global = true,
        env = "QIT_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// gRPC endpoint of the server.
    #[arg(
        long,
        global = true,
        env = "QIT_GRPC_SERVER",
        default_value = "http://127.0.0.1:9090"
    )]
    pub grpc_server: String,
    /// Bearer token (when the server has auth on).
    #[arg(long, global = true, env = "QIT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Manage queues.
    Queue {
        /// Client options.
        #[command(flatten)]
        client: ClientArgs,
        /// What to do.
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Look at, move or delete consumer groups.
    Group {
        /// Client options.
        #[command(flatten)]
        client: ClientArgs,
        /// What to do.
        #[command(subcommand)]
        action: GroupAction,
    },
    /// Publish one message.
    Send(SendArgs),
    /// Receive (lease) messages.
    Recv(RecvArgs),
    /// Acknowledge a message.
    Ack(SettleArgs),
    /// Return a message for redelivery.
    Nack(NackArgs),
    /// Print a partition from an offset or time (replay), optionally following it.
    Tail(TailArgs),
    /// Load-test a running server.
    Bench(BenchArgs),
    /// Look at a cluster.
    Cluster {
        /// Client options.
        #[command(flatten)]
        client: ClientArgs,
        /// What to do.
        #[command(subcommand)]
        action: ClusterAction,
    },
}

/// `qit cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// The nodes, the metadata leader and every partition's leader and replicas.
    Status,
    /// Add a node (running, started with `--join` or waiting to be added) as a voter.
    AddNode {
        /// `ID=HOST:PORT`: the node's id and cluster listener.
        node: String,
    },
    /// Remove a node from the voters (refused while it holds queue replicas, or when
    /// fewer than three voters would be left).
    RemoveNode {
        /// The node's id.
        id: u64,
    },
    /// Replace node OLD (dead, or lost its data) by a new node (running, started with
    /// `--join`): the new node is added as a voter once it caught up, OLD's queues move
    /// off it and OLD is removed.
    ReplaceNode {
        /// The id of the node replaced.
        old: u64,
        /// `ID=HOST:PORT`: the new node's id and cluster listener.
        node: String,
    },
}

/// `qit serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Data directory.
    #[arg(long, env = "QIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP listen address.
    #[arg(long, env = "QIT_HTTP")]
    pub http: Option<SocketAddr>,
    /// gRPC listen address.
    #[arg(long, env = "QIT_GRPC")]
    pub grpc: Option<SocketAddr>,
    /// Kafka protocol listen address, or `off` (default 127.0.0.1:9092).
    #[arg(long, env = "QIT_KAFKA")]
    pub kafka: Option<crate::config::KafkaListen>,
    /// TOML configuration file.
    #[arg(long, env = "QIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// When to fsync appends and acks: always, interval or never.
    #[arg(long, env = "QIT_FSYNC", value_parser = parse_fsync)]
    pub fsync: Option<FsyncPolicy>,
    /// Require authentication.
    #[arg(long, env = "QIT_AUTH")]
    pub auth: bool,
    /// Log format.
    #[arg(long, env = "QIT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// This node's id in a cluster (integer >= 1).
    #[arg(long, env = "QIT_NODE_ID")]
    pub node_id: Option<u64>,
    /// This node's cluster (replication) listener, HOST:PORT.
    #[arg(long, env = "QIT_CLUSTER")]
    pub cluster: Option<SocketAddr>,
    /// Every initial voter as ID=HOST:PORT,... (the same list on every node); without it
    /// qit runs as a single node.
    #[arg(long, env = "QIT_PEERS")]
    pub peers: Option<String>,
    /// Join a running cluster: `--peers` names some of its members and this node, and a
    /// member adds this node (it catches up as a learner, then votes).
    #[arg(long, env = "QIT_JOIN")]
    pub join: bool,
    /// Replace node ID (one that lost its data, or is gone for good) with this one, which
    /// has a new `--node-id`: implies `--join`; once this node votes, node ID is removed
    /// and its replicas move. Repeating it (a restart with the same command) is harmless.
    #[arg(long, env = "QIT_REPLACES", value_name = "ID")]
    pub replaces: Option<u64>,
    /// The secret every node of the cluster shares (at least 16 bytes).
    #[arg(long, env = "QIT_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
}

/// `qit queue ...`.
#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// Create a queue.
    Create {
        /// Queue name.
        name: String,
        /// Partitions.
        #[arg(long)]
        partitions: Option<u32>,
        /// Visibility timeout in seconds.
        #[arg(long)]
        ack_timeout: Option<u64>,
        /// Deliveries before dead-lettering (0 = unlimited).
        #[arg(long)]
        max_deliveries: Option<u32>,
        /// Nodes holding a copy of each partition in a cluster (default min(3, nodes)).
        #[arg(long)]
        replicas: Option<u32>,
        /// Any settings as JSON (merged under the flags).
        #[arg(long)]
        settings: Option<String>,
    },
    /// Delete a queue and its data.
    Delete {
        /// Queue name.
        name: String,
    },
    /// List queues.
    List,
    /// Show a queue.
    Info {
        /// Queue name.
        name: String,
    },
}

/// `qit group ...`.
#[derive(Debug, Subcommand)]
pub enum GroupAction {
    /// A queue's groups: backlog and messages in flight of each.
    List {
        /// Queue name.
        queue: String,
    },
    /// A group's committed offset, backlog and messages in flight per partition.
    Info {
        /// Queue name.
        queue: String,
        /// Group name.
        group: String,
    },
    /// Move a group (its next receive starts there): give exactly one of `--to`,
    /// `--offset` or `--time`.
    Seek {
        /// Queue name.
        queue: String,
        /// Group name.
        group: String,
        /// `earliest` or `latest`, in every partition.
        #[arg(long, value_parser = ["earliest", "latest"])]
        to: Option<String>,
        /// An offset of `--partition`.
        #[arg(long)]
        offset: Option<u64>,
        /// The partition of `--offset`.
        #[arg(long, default_value_t = 0, requires = "offset")]
        partition: u32,
        /// The first message at or after this time (RFC 3339 or unix ms), in every
        /// partition.
        #[arg(long)]
        time: Option<String>,
    },
    /// Delete a group (refused while it has messages in flight).
    Delete {
        /// Queue name.
        queue: String,
        /// Group name.
        group: String,
    },
}

/// `qit send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Client options.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Queue name.
    pub queue: String,
    /// The body; read from `--file` or standard input when absent.
    pub body: Option<String>,
    /// Read the body from a file.
    #[arg(long, conflicts_with = "body")]
    pub file: Option<PathBuf>,
    /// Message key.
    #[arg(long)]
    pub key: Option<String>,
    /// A header `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Content type of the body; without it, a body that is a JSON object or array is sent
    /// as `application/json` and anything else as `text/plain`.
    #[arg(long)]
    pub content_type: Option<String>,
    /// Idempotency key.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// `qit recv`.
#[derive(Debug, Args)]
pub struct RecvArgs {
    /// Client options.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Queue name.
    pub queue: String,
    /// Consumer group.
    #[arg(long, default_value = "default")]
    pub group: String,
    /// Most messages.
    #[arg(long, default_value_t = 1)]
    pub max: u32,
    /// Seconds to wait for a message.
    #[arg(long, default_value_t = 0.0)]
    pub wait: f64,
    /// Visibility timeout in seconds.
    #[arg(long)]
    pub visibility: Option<f64>,
    /// Acknowledge what was received.
    #[arg(long)]
    pub ack: bool,
}

/// `qit ack`.
#[derive(Debug, Args)]
pub struct SettleArgs {
    /// Client options.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Queue name.
    pub queue: String,
    /// Message id (`partition-offset`).
    pub id: String,
    /// Consumer group.
    #[arg(long, default_value = "default")]
    pub group: String,
}

/// `qit nack`.
#[derive(Debug, Args)]
pub struct NackArgs {
    /// Which message.
    #[command(flatten)]
    pub message: SettleArgs,
    /// Redeliver after this many seconds.
    #[arg(long)]
    pub delay: Option<f64>,
}

/// `qit tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Client options.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Queue name.
    pub queue: String,
    /// Start at this offset, RFC 3339 time or unix ms (`t:` prefix forces a time).
    #[arg(long, default_value = "0")]
    pub from: String,
    /// Partition.
    #[arg(long, default_value_t = 0)]
    pub partition: u32,
    /// Keep following new messages.
    #[arg(long)]
    pub follow: bool,
    /// Stop after this many messages.
    #[arg(long)]
    pub max: Option<u64>,
}

/// `qit bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Client options.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Messages to publish.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Publish for this many seconds instead.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Publish at most this many messages per second in all (latency at a given load).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Messages per publish request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Publish requests each producer keeps outstanding at once.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// How gRPC producers publish: `unary` (SendMessage) or `stream` (one Publish stream each).
    #[arg(long, value_enum, default_value_t = BenchMode::Unary)]
    pub mode: BenchMode,
    /// Concurrent producers (0: only consume `--messages` from an existing `--queue`).
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Concurrent consumers (0: only publish).
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// Partitions of the bench queue.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Credit per consumer stream.
    #[arg(long, default_value_t = 1000)]
    pub credit: u32,
    /// Use an existing queue instead of a fresh one.
    #[arg(long)]
    pub queue: Option<String>,
    /// Use HTTP instead of gRPC.
    #[arg(long)]
    pub http: bool,
    /// Many-queues mode: create this many queues (each with a dead-letter queue), put a
    /// message through each, and report create rate, cold-publish latency and the idle
    /// server's threads, descriptors, memory and CPU.
    #[arg(long)]
    pub queues: Option<usize>,
    /// Requests in flight at once in many-queues mode.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// The server's process id for `/proc` figures (default: the local `qit serve`).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Seconds to let the server idle before sampling it (past the server's
    /// `idle_close_secs`, 10 by default, and one idle sweep after it).
    #[arg(long, default_value_t = 15.0)]
    pub idle_secs: f64,
    /// Delete the many-queues mode's queues at the end.
    #[arg(long)]
    pub cleanup: bool,
}

/// `qit bench --mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    /// One unary `SendMessage` call per publish.
    Unary,
    /// One `Publish` stream per producer.
    Stream,
}

/// Parses `always`, `interval` or `never`.
pub fn parse_fsync(raw: &str) -> Result<FsyncPolicy, String> {
    match raw {
        "always" => Ok(FsyncPolicy::Always),
        "interval" => Ok(FsyncPolicy::Interval),
        "never" => Ok(FsyncPolicy::Never),
        other => Err(format!("`{other}` is not one of always, interval, never")),
    }
}
