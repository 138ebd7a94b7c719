//! qit: a message broker on a durable, segmented log.
//!
//! Layers (data flows down on publish, up on receive; nothing calls upward — a module uses
//! only its own layer and those below it, which `tests/layers.rs` checks on every
//! `cargo test`):
//!
//! ```text
//! 6  server                              binds listeners, runs timers, joins tasks, drains
//! 5  config  cli  client  bench          the edge: settings, command line, client, load
//! 4  api (http, grpc, receive, auth, …)  thin adapters: parse, call the broker, map errors
//!    kafka                               (kafka: the Kafka wire protocol over the queues)
//! 3  maintenance  cluster                retention and compaction over the broker's queues;
//!                                        replication (openraft groups), forwarding, placement
//! 2  broker                              queue registry, exchanges, dedup, the shared state
//! 1  group  route  metrics  auth  clock  state machines (take `now`), routing rules, metric
//!    name  hash                          names, users and grants, the clock the broker reads,
//!                                        the name rule, a stable hash
//! 0  log  journal  commit  proto         storage: partition log, group journal, group
//!                                        commit of fsyncs; generated protobuf types
//! ```
//!
//! Lower layers report upward through data or callbacks, never by importing: the log tells
//! the broker each fsync's duration through [`log::FsyncObserver`]; the metrics take their
//! own plain structs ([`metrics::QueueGauges`]) that the broker fills. Within [`api`], the
//! shared pieces sit in their own modules ([`api::state`], [`api::wire`]) so that no two
//! adapter files import each other.
//!
//! - [`log`]: the partition log — batches, segments, sparse indexes, recovery.
//! - [`journal`]: a checksummed append-only journal with checkpoints (group state).
//! - [`commit`]: group commit of fsyncs on a shared pool of sync threads, for every log and
//!   journal.
//! - [`storage`]: the I/O seam under the log, the journal, the registry and the auth files
//!   (the real disk, and a simulated one for crash and fault tests).
//! - [`name`]: the rule for queue, group, exchange and user names, and the only way a name
//!   becomes a path under the data directory.
//! - [`group`]: per-group delivery state (ack floor, leases, redelivery, DLQ decisions) as a
//!   pure state machine taking `now`, its journal events and snapshots.
//! - [`route`]: exchange routing rules (direct, fanout, topic, headers).
//! - [`clock`]: where the broker reads "now" (a manual clock in tests).
//! - [`hash`]: a stable hash (placement, redrive keys).
//! - [`metrics`]: Prometheus series; [`auth`]: users, tokens, ownership and grants.
//! - [`broker`]: queues, partitions, groups and exchanges wired together.
//! - [`maintenance`]: retention and key compaction in the background.
//! - [`cluster`]: the three-node cluster: openraft groups for metadata and queues, the
//!   internal service, forwarding to leaders, placement and the `/cluster` view.
//! - [`api`]: the HTTP (axum) and gRPC (tonic) adapters.
//! - [`server`]: binds listeners, runs timers, joins background tasks, drains on shutdown.
//! - [`config`], [`cli`], [`client`], [`bench`], [`bench_queues`]: settings, the command
//!   line, its HTTP client, the `qit bench` load generator and its many-queues mode.
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod bench;
pub mod bench_queues;
pub mod broker;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod commit;
pub mod config;
pub mod group;
pub mod hash;
pub mod journal;
pub mod kafka;
pub mod log;
pub mod maintenance;
pub mod metrics;
pub mod name;
pub mod route;
pub mod server;
pub mod storage;

/// Generated protobuf and gRPC types for `qit.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("qit.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("qit_descriptor");

    /// The cluster's internal service (`qit.cluster.v1`), between nodes only.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod cluster {
        tonic::include_proto!("qit.cluster.v1");
    }
}
