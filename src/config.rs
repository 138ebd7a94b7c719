//! Server configuration: defaults, an optional TOML file, `QIT_*` environment variables and
//! flags, in rising precedence (flags and environment are merged by clap).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::log::FsyncPolicy;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the Kafka listener binds, or `off` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaListen(pub Option<SocketAddr>);

impl std::str::FromStr for KafkaListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|addr| Self(Some(addr)))
            .map_err(|_| format!("`{s}` is neither HOST:PORT nor `off`"))
    }
}

impl std::fmt::Display for KafkaListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("off"),
        }
    }
}

impl Serialize for KafkaListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KafkaListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything `qit serve` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Root of all state.
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub http: SocketAddr,
    /// gRPC listen address.
    pub grpc: SocketAddr,
    /// Kafka protocol listen address (`off`: no listener).
    pub kafka: KafkaListen,
    /// Durability policy.
    pub fsync: FsyncPolicy,
    /// Require authentication.
    pub auth: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Most queues (dead-letter queues count).
    pub max_queues: usize,
    /// Most concurrent long-poll receivers.
    pub max_waiters: usize,
    /// Most concurrent gRPC streams.
    pub max_streams: usize,
    /// Most concurrent long-polls and most gRPC streams per client address.
    pub max_per_client: usize,
    /// Largest HTTP request body in bytes.
    pub max_body_bytes: usize,
    /// Secret for signing tokens (else generated and kept in the data directory).
    #[serde(skip_serializing)]
    pub jwt_secret: Option<String>,
    /// Token lifetime in seconds.
    pub token_ttl_secs: u64,
    /// A user who may do everything.
    pub admin: Option<String>,
    /// Seconds between retention and compaction passes.
    pub maintenance_interval_secs: u64,
    /// Seconds compaction keeps tombstones (empty values) before dropping them.
    pub delete_retention_secs: u64,
    /// Most bytes per second compaction rewrites.
    pub compaction_bytes_per_sec: u64,
    /// Password of the admin user, created on start when given.
    #[serde(skip_serializing)]
    pub admin_password: Option<String>,
    /// Threads that run the fsyncs of every file (group commit).
    pub sync_threads: usize,
    /// Queues that get per-queue series in `/metrics` (the busiest by messages; 0 = none).
    pub metrics_queues: usize,
    /// Most consumer groups per queue.
    pub max_groups_per_queue: usize,
    /// Most open connections, HTTP and gRPC together; past it new connections wait.
    pub max_connections: usize,
    /// Seconds an HTTP/1 client has to send a request's headers (also how long an idle
    /// keep-alive connection stays open).
    pub header_timeout_secs: u64,
    /// Seconds a connection may pass without a byte read or written before it is closed.
    pub idle_timeout_secs: u64,
    /// Seconds a stop waits for the listeners to finish the requests in flight, and again
    /// for the background tasks to end, before it cuts them off.
    pub drain_timeout_secs: u64,
    /// Most long-lived files (active segments, group journals) kept open; the least
    /// recently used are closed past it and reopened on use.
    pub max_open_files: usize,
    /// Most sealed segment files (`.log`, `.index`, `.timeindex`) kept mapped; the least
    /// recently used maps are dropped past it and mapped again on use.
    pub max_mapped_files: usize,
    /// Seconds a long-lived file stays open (and a sealed segment's file mapped) unused
    /// before it is closed (unmapped).
    pub idle_close_secs: u64,
    /// This node's id in a cluster (integer >= 1; with `peers`).
    pub node_id: Option<u64>,
    /// This node's cluster (replication) listener (with `peers`).
    pub cluster: Option<SocketAddr>,
    /// Every initial voter as `ID=HOST:PORT,...`, the same on every node; without it qit
    /// is a single node.
    pub peers: Option<String>,
    /// This node joins a running cluster: `peers` names members to ask and this node, and
    /// a member adds it (learner, then voter) instead of it forming a cluster with `peers`.
    pub join: bool,
    /// This node replaces node `replaces`, which lost its data or is gone for good: it
    /// joins (as with `join`) and, once it votes, has the old node removed, so that its
    /// replicas move (most of them onto this node).
    pub replaces: Option<u64>,
    /// The secret every node of the cluster is started with.
    #[serde(skip_serializing)]
    pub cluster_secret: Option<String>,
    /// A queue's Raft group snapshots the queue's data after this many entries and purges
    /// its Raft log below the snapshot (0: never, the log grows without bound).
    pub raft_snapshot_entries: u64,
    /// A queue's Raft group also snapshots, and purges its Raft log, once the log's files
    /// hold more than this many bytes (0: no bound but `raft_snapshot_entries`).
    pub raft_log_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("qit-data"),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc: SocketAddr::from(([127, 0, 0, 1], 9090)),
            kafka: KafkaListen(Some(SocketAddr::from(([127, 0, 0, 1], 9092)))),
            fsync: FsyncPolicy::Interval,
            auth: false,
            log_format: LogFormat::Text,
            max_queues: 10_000,
            max_waiters: 10_000,
            max_streams: 10_000,
            max_per_client: 1000,
            max_body_bytes: 80 * 1024 * 1024,
            jwt_secret: None,
            token_ttl_secs: 3600,
            admin: None,
            maintenance_interval_secs: 10,
            delete_retention_secs: 24 * 3600,
            compaction_bytes_per_sec: 64 * 1024 * 1024,
            admin_password: None,
            sync_threads: crate::commit::DEFAULT_SYNC_THREADS,
            metrics_queues: crate::metrics::DEFAULT_GAUGED_QUEUES,
            max_groups_per_queue: 1000,
            max_connections: 1000,
            header_timeout_secs: 30,
            idle_timeout_secs: 120,
            drain_timeout_secs: 5,
            max_open_files: crate::storage::cache::DEFAULT_MAX_OPEN_FILES,
            max_mapped_files: crate::storage::maps::DEFAULT_MAX_MAPPED_FILES,
            idle_close_secs: crate::storage::cache::DEFAULT_IDLE_CLOSE.as_secs(),
            node_id: None,
            cluster: None,
            peers: None,
            join: false,
            replaces: None,
            cluster_secret: None,
            raft_snapshot_entries: 20_000,
            raft_log_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("invalid config file {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A value is out of range.
    #[error("invalid setting `{field}`: {reason}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl ServerConfig {
    /// Reads a TOML file (unknown keys are errors).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        if self.http == self.grpc && self.http.port() != 0 {
            return invalid("grpc", "must differ from the HTTP address");
        }
        if let Some(kafka) = self.kafka_listener()
            && kafka.port() != 0
            && (kafka == self.http || kafka == self.grpc)
        {
            return invalid("kafka", "must differ from the HTTP and gRPC addresses");
        }
        if self.max_queues == 0 {
            return invalid("max_queues", "must be positive");
        }
        if self.max_waiters == 0 || self.max_streams == 0 || self.max_per_client == 0 {
            return invalid("max_waiters", "caps must be positive");
        }
        if self.sync_threads == 0 || self.sync_threads > 64 {
            return invalid("sync_threads", "must be within 1..=64");
        }
        if self.max_open_files < crate::storage::cache::MIN_OPEN_FILES {
            return invalid("max_open_files", "must be at least 16");
        }
        if self.max_mapped_files < crate::storage::maps::MIN_MAPPED_FILES {
            return invalid("max_mapped_files", "must be at least 16");
        }
        if self.idle_close_secs == 0 {
            return invalid("idle_close_secs", "must be positive");
        }
        if self.max_body_bytes < 1024 {
            return invalid("max_body_bytes", "must be at least 1024");
        }
        if self.maintenance_interval_secs == 0 || self.compaction_bytes_per_sec == 0 {
            return invalid(
                "maintenance_interval_secs",
                "intervals and rates must be positive",
            );
        }
        if self.max_groups_per_queue == 0 || self.max_connections == 0 {
            return invalid("max_connections", "caps must be positive");
        }
        if self.header_timeout_secs == 0 {
            return invalid("header_timeout_secs", "must be positive");
        }
        if self.drain_timeout_secs == 0 {
            return invalid("drain_timeout_secs", "must be positive");
        }
        if self.idle_timeout_secs <= 60 {
            return invalid(
                "idle_timeout_secs",
                "must exceed 60 s, the longest long-poll",
            );
        }
        if self.auth && self.admin.is_some() && self.admin_password.is_none() {
            return invalid(
                "admin_password",
                "an `admin` needs an `admin_password`, or anyone could register the name first",
            );
        }
        if self.token_ttl_secs == 0 {
            return invalid("token_ttl_secs", "must be positive");
        }
        self.validate_cluster()?;
        if self
            .jwt_secret
            .as_ref()
            .is_some_and(|s| s.len() < crate::auth::MIN_SECRET_LEN)
        {
            return invalid("jwt_secret", "must be at least 32 bytes");
        }
        Ok(())
    }
}

impl ServerConfig {
    /// The voters of `peers` by id (`None` without `peers`: a single node).
    pub fn peer_map(&self) -> Result<Option<BTreeMap<u64, String>>, ConfigError> {
        let Some(peers) = self.peers.as_deref() else {
            return Ok(None);
        };
        let bad = |reason: String| ConfigError::Invalid {
            field: "peers",
            reason,
        };
        let mut map: BTreeMap<u64, String> = BTreeMap::new();
        for item in peers.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (id, addr) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("`{item}` is not ID=HOST:PORT")))?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| bad(format!("`{id}` is not a node id")))?;
            if id == 0 {
                return Err(bad("node ids start at 1".into()));
            }
            let addr = addr.trim();
            if addr
                .rsplit_once(':')
                .is_none_or(|(_, port)| port.parse::<u16>().is_err())
            {
                return Err(bad(format!("`{addr}` is not HOST:PORT")));
            }
            if let Some((other, _)) = map.iter().find(|(_, known)| known.as_str() == addr) {
                return Err(bad(format!(
                    "nodes {other} and {id} have the same address {addr}: each node listens on its own"
                )));
            }
            if map.insert(id, addr.to_string()).is_some() {
                return Err(bad(format!("node {id} appears twice")));
            }
        }
        if map.is_empty() {
            return Err(bad("lists no node".into()));
        }
        Ok(Some(map))
    }

    /// Where the Kafka listener opens, if it does. A cluster node opens it only at an
    /// address other than the single node's default: nodes sharing a host would all want
    /// 127.0.0.1:9092 (which is also the second node's gRPC port in a 9091..9093 set), so
    /// each node is given its own `--kafka`.
    pub fn kafka_listener(&self) -> Option<SocketAddr> {
        let default = Self::default().kafka.0;
        self.kafka
            .0
            .filter(|addr| self.peers.is_none() || Some(*addr) != default)
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        let Some(peers) = self.peer_map()? else {
            return Ok(());
        };
        let Some(id) = self.node_id else {
            return invalid("node_id", "a cluster node needs --node-id");
        };
        if !peers.contains_key(&id) {
            return invalid("node_id", "must be one of --peers");
        }
        if self.replaces == Some(id) {
            return invalid(
                "replaces",
                "names the node being replaced: the new node needs a new --node-id",
            );
        }
        if self.replaces == Some(0) {
            return invalid("replaces", "node ids start at 1");
        }
        if self.cluster.is_none() {
            return invalid("cluster", "a cluster node needs --cluster HOST:PORT");
        }
        match &self.cluster_secret {
            None => invalid(
                "cluster_secret",
                "a cluster node needs --cluster-secret (or QIT_CLUSTER_SECRET)",
            ),
            Some(secret) if secret.len() < crate::cluster::auth::MIN_SECRET_LEN => {
                invalid("cluster_secret", "must be at least 16 bytes")
            }
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qit.toml");
        std::fs::write(&path, "data_dir = \"/tmp/q\"\nfsync = \"always\"\n").unwrap();
        let config = ServerConfig::from_file(&path).unwrap();
        assert_eq!(config.fsync, FsyncPolicy::Always);
        assert_eq!(config.http, ServerConfig::default().http);
        config.validate().unwrap();
        std::fs::write(&path, "kafka = \"off\"\n").unwrap();
        assert_eq!(
            ServerConfig::from_file(&path).unwrap().kafka,
            KafkaListen(None)
        );
        std::fs::write(&path, "kafka = \"127.0.0.1:19092\"\n").unwrap();
        let config = ServerConfig::from_file(&path).unwrap();
        assert_eq!(config.kafka.to_string(), "127.0.0.1:19092");
        std::fs::write(&path, "dta_dir = \"/tmp/q\"\n").unwrap();
        assert!(ServerConfig::from_file(&path).is_err());
        std::fs::write(&path, "drain_timeout_secs = 25\n").unwrap();
        let config = ServerConfig::from_file(&path).unwrap();
        assert_eq!(config.drain_timeout_secs, 25);
        config.validate().unwrap();
        std::fs::write(&path, "drain_timeout_secs = 0\n").unwrap();
        let error = ServerConfig::from_file(&path)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(error.to_string().contains("drain_timeout_secs"), "{error}");
    }

    /// A cluster node's gRPC port may be the Kafka default (nodes on 9091..9093): a cluster
    /// node does not open the listener at the default address, so the clash is not one.
    #[test]
    fn a_cluster_node_may_use_the_kafka_default_port_for_grpc() {
        let grpc: SocketAddr = "127.0.0.1:9092".parse().unwrap();
        let mut config = ServerConfig {
            grpc,
            kafka: ServerConfig::default().kafka,
            ..ServerConfig::default()
        };
        assert_eq!(
            config.kafka.0,
            Some(grpc),
            "the Kafka default is 127.0.0.1:9092"
        );
        assert!(config.validate().is_err());
        config.node_id = Some(2);
        config.cluster = Some("127.0.0.1:7102".parse().unwrap());
        config.peers = Some("1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103".into());
        config.cluster_secret = Some("a-secret-long-enough-for-the-check".into());
        config.validate().unwrap();
        assert_eq!(
            config.kafka_listener(),
            None,
            "no Kafka listener at the default address on a cluster node"
        );
        let own: SocketAddr = "127.0.0.1:19102".parse().unwrap();
        config.kafka = KafkaListen(Some(own));
        config.validate().unwrap();
        assert_eq!(
            config.kafka_listener(),
            Some(own),
            "a cluster node given its own address listens there"
        );
    }

    /// Regression (issue 19, item 5): an `admin` without `admin_password` under auth is
    /// refused at start (anyone could register the name first).
    #[test]
    fn an_admin_needs_a_password_with_auth() {
        let mut config = ServerConfig {
            auth: true,
            admin: Some("root".into()),
            ..ServerConfig::default()
        };
        assert!(config.validate().is_err());
        config.admin_password = Some("admin-password".into());
        config.validate().unwrap();
        config.auth = false;
        config.admin_password = None;
        config.validate().unwrap();
    }

    #[test]
    fn cluster_settings_are_checked() {
        let mut config = ServerConfig {
            peers: Some("1=127.0.0.1:7101, 2=127.0.0.1:7102,3=127.0.0.1:7103".into()),
            ..ServerConfig::default()
        };
        assert!(config.validate().is_err(), "node id missing");
        config.node_id = Some(2);
        config.cluster = Some("127.0.0.1:7102".parse().unwrap());
        assert!(config.validate().is_err(), "secret missing");
        config.cluster_secret = Some("short".into());
        assert!(config.validate().is_err(), "secret too short");
        config.cluster_secret = Some("a-long-enough-cluster-secret".into());
        config.validate().unwrap();
        assert_eq!(config.peer_map().unwrap().unwrap().len(), 3);
        config.replaces = Some(2);
        assert!(config.validate().is_err(), "replaces itself");
        config.replaces = Some(0);
        assert!(config.validate().is_err(), "replaces node 0");
        config.replaces = Some(3);
        config.validate().unwrap();
        config.replaces = None;
        config.node_id = Some(4);
        assert!(config.validate().is_err(), "not a peer");
        for bad in [
            "1=nowhere",
            "0=127.0.0.1:1",
            "1=a:1,1=b:2",
            "x=a:1",
            "",
            "1=127.0.0.1:7101,2=127.0.0.1:7101",
        ] {
            config.peers = Some(bad.into());
            assert!(config.peer_map().is_err(), "{bad}");
        }
        let secret = ServerConfig {
            cluster_secret: Some("never-shown-in-output".into()),
            ..ServerConfig::default()
        };
        assert!(!toml::to_string(&secret).unwrap().contains("never-shown"));
    }
}
