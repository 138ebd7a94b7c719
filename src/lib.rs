//! qit: a message broker on a durable, segmented log.
//!
//! Layers (data flows down on publish, up on receive; nothing calls upward):
//!
//! ```text
//! api::http  api::grpc  cli/client      thin adapters: parse, call the broker, map errors
//!         \      |      /
//!          broker                        queue registry, exchanges, dedup, the shared state
//!         /      |      \
//!    route     group     log             routing rules; consumer-group state machines and
//!                                        their journal; the partition log (segments, indexes)
//! ```
//!
//! - [`log`]: the partition log — batches, segments, sparse indexes, recovery.
//! - [`group`]: per-group delivery state (ack floor, leases, redelivery, DLQ decisions) as a
//!   pure state machine, and its durable journal.
//! - [`commit`]: group commit of fsyncs on a shared pool of sync threads, for every log and
//!   journal.
//! - [`journal`]: a checksummed append-only journal with checkpoints (group state).
//! - [`storage`]: the I/O seam under the log, the journal, the registry and the auth files
//!   (the real disk, and a simulated one for crash and fault tests).
//! - [`name`]: the rule for queue, group, exchange and user names, and the only way a name
//!   becomes a path under the data directory.
//! - [`route`]: exchange routing rules (direct, fanout, topic, headers).
//! - [`broker`]: queues, partitions, groups and exchanges wired together.
//! - [`api`]: the HTTP (axum) and gRPC (tonic) adapters.
//! - [`server`]: binds listeners, runs timers, drains on shutdown.
//! - [`maintenance`]: retention and key compaction in the background.
//! - [`auth`]: users, tokens, ownership and grants.
//! - [`metrics`]: Prometheus series; [`bench`]: the `qit bench` load generator;
//!   [`bench_queues`]: `qit bench --queues N`, many queues on one node.
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod bench;
pub mod bench_queues;
pub mod broker;
pub mod cli;
pub mod client;
pub mod commit;
pub mod config;
pub mod group;
pub mod journal;
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
}
