//! Binds the HTTP, gRPC and Kafka listeners, serves until told to stop, then drains: the broker
//! stops first (open long-polls answer empty, new work gets 503), the listeners finish
//! in-flight requests, every background task (tracked by one `TaskTracker`) is joined, and
//! logs and journals are flushed and fsynced last.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::clock::Ticks;

use crate::api::conn::{self, ConnLimits};
use crate::api::grpc::GrpcApi;
use crate::api::http::HttpState;
use crate::broker::{Broker, BrokerConfig, BrokerError};
use crate::config::{ConfigError, ServerConfig};
use crate::storage::CachedStorage;

/// How often raw histogram samples are folded into buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);
/// How often idle long-lived files are looked for (a fraction of `idle_close_secs`).
const IDLE_SWEEPS_PER_CLOSE: u32 = 4;

/// Errors of starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The broker failed to open or to flush.
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    /// Metrics could not be set up.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// Users and grants could not be opened.
    #[error("auth: {0}")]
    Auth(#[from] crate::auth::AuthError),
    /// gRPC reflection could not be set up.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The cluster could not start.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The data directory is in use by another server, or could not be locked.
    #[error(transparent)]
    DataDir(#[from] crate::storage::DirLockError),
    /// The data directory holds the other kind of server's data: a cluster node's without
    /// `--peers`, or a single server's with them.
    #[error("data directory {}: {reason}", dir.display())]
    OtherKind {
        /// The data directory.
        dir: std::path::PathBuf,
        /// What it holds and what to do.
        reason: String,
    },
}

/// Refuses a data directory that holds the other kind of server's data, before anything
/// reads or changes it. A single server keeps its queues at the top (`registry.journal`,
/// `queues/`); a cluster node keeps its Raft logs in `raft/` and, beside them, the state
/// they rebuild at every start in the same places as a single server's. Started the other
/// way, a single server would serve a copy that the cluster's logs outlive, and a cluster
/// node would clear a single server's queues (a directory with queues and no `raft/`).
fn check_data_dir_kind(dir: &std::path::Path, cluster: bool) -> Result<(), ServerError> {
    let other = |reason: String| ServerError::OtherKind {
        dir: dir.to_path_buf(),
        reason,
    };
    if !cluster && dir.join("raft").is_dir() {
        return Err(other(
            "it holds a cluster node's data (raft/): start it with the cluster's --node-id \
             and --peers (or QIT_NODE_ID and QIT_PEERS, or the config file), or give this \
             server another --data-dir. To serve on its own what the node held, copy its \
             queues/, registry.journal and auth/ to a new directory and serve that"
                .to_string(),
        ));
    }
    let single = (dir.join("registry.journal").exists() || dir.join("queues").is_dir())
        && !dir.join("raft").is_dir();
    if cluster && single {
        return Err(other(
            "it holds a single server's queues (registry.journal, queues/): a cluster node \
             does not take them over, it gets its queues from the cluster. Start the node \
             on another --data-dir (the single server's data stays where it is)"
                .to_string(),
        ));
    }
    Ok(())
}

/// A bound, not yet running server.
pub struct Server {
    config: ServerConfig,
    broker: Arc<Broker>,
    /// The broker's storage: the disk behind a bounded set of open files.
    files: Arc<CachedStorage>,
    auth: Option<Arc<crate::auth::AuthStore>>,
    http: TcpListener,
    grpc: TcpListener,
    kafka: Option<TcpListener>,
    /// The cluster listener's address and this node's cluster, with `--peers` (the
    /// listener serves from `bind` on).
    cluster: Option<(SocketAddr, Arc<crate::cluster::Cluster>)>,
    /// Stops every listener and background task.
    stop: CancellationToken,
    /// This server's hold on its data directory, released when it is dropped.
    _dir_lock: crate::storage::DirLock,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

impl Server {
    /// Opens the broker (recovering the data directory) and binds both listeners.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        config.validate()?;
        // Before anything reads or changes the data directory.
        let dir_lock = crate::storage::DirLock::acquire(&config.data_dir)?;
        // The process-wide sync pool takes its size from the first server of the process
        // (later ones, e.g. in tests, share it).
        crate::commit::SyncPool::configure_shared(config.sync_threads);
        crate::metrics::install()?;
        let files = Arc::new(
            CachedStorage::new(
                crate::storage::disk(),
                config.max_open_files,
                Duration::from_secs(config.idle_close_secs),
            )
            .with_max_mapped_files(config.max_mapped_files),
        );
        let peers = config.peer_map()?;
        check_data_dir_kind(&config.data_dir, peers.is_some())?;
        if let (Some(_), Some(node)) = (&peers, config.node_id) {
            crate::cluster::identity::claim(&config.data_dir.join("raft"), node)?;
        }
        // A cluster node's broker data is the state its Raft logs rebuild (cleared here,
        // replayed by the groups as they start).
        if peers.is_some() {
            crate::cluster::clear_rebuilt_state(&config.data_dir)?;
        }
        // A cluster node's broker data is rebuilt from the Raft logs at every start, and
        // those are what `--fsync` makes durable: syncing the rebuilt copy too would only
        // double the fsyncs of every write.
        let broker_fsync = match &peers {
            Some(_) => crate::log::FsyncPolicy::Never,
            None => config.fsync,
        };
        let broker = Broker::open(BrokerConfig {
            data_dir: config.data_dir.clone(),
            fsync: broker_fsync,
            max_queues: config.max_queues,
            max_groups_per_queue: config.max_groups_per_queue,
            storage: Arc::clone(&files) as crate::storage::SharedStorage,
            ..BrokerConfig::default()
        })
        .await?;
        // A cluster node's users and grants are replicated metadata: like the broker's data
        // they live in the state its Raft logs rebuild.
        let auth = if config.auth {
            Some(Arc::new(open_auth(&config)?))
        } else {
            None
        };
        if let Some(store) = &auth {
            broker.set_dead_letter_guard(crate::api::auth::dead_letter_guard(Arc::clone(store)));
            broker.set_auth(Arc::clone(store));
        }
        let http = bind(config.http).await?;
        let grpc = bind(config.grpc).await?;
        if peers.is_some() && config.kafka.0.is_some() && config.kafka_listener().is_none() {
            tracing::info!(
                "a cluster node's Kafka listener opens at an address given with --kafka, not at the default: not started"
            );
        }
        let kafka = match config.kafka_listener() {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        // The cluster listener serves from here on (see `cluster::service`): a node that
        // holds no data answers its peers' start-up question while it asks them the same.
        let stop = CancellationToken::new();
        let stop_on_error = stop.clone().drop_guard();
        let cluster = match (peers, config.cluster, config.node_id) {
            (Some(peers), Some(addr), Some(node_id)) => {
                let listener = bind(addr).await?;
                let cluster_addr = listener.local_addr().unwrap_or(addr);
                let secret = config.cluster_secret.as_deref().unwrap_or_default();
                let cluster_config = crate::cluster::ClusterConfig {
                    node_id,
                    peers,
                    secret: crate::cluster::auth::Secret::new(secret),
                    data_dir: config.data_dir.clone(),
                    sync: config.fsync == crate::log::FsyncPolicy::Always,
                    snapshot_entries: config.raft_snapshot_entries,
                    log_bytes: config.raft_log_bytes,
                    join: config.join || config.replaces.is_some(),
                    replaces: config.replaces,
                    cluster_addr,
                    http_addr: http.local_addr().unwrap_or(config.http),
                    grpc_addr: grpc.local_addr().unwrap_or(config.grpc),
                    kafka_addr: kafka.as_ref().and_then(|k| k.local_addr().ok()),
                };
                let local = crate::cluster::Cluster::prepare(&cluster_config)?;
                broker
                    .tasks()
                    .spawn(serve_cluster(listener, Arc::clone(&local), stop.clone()));
                let cluster =
                    crate::cluster::Cluster::start(cluster_config, Arc::clone(&broker), &local)
                        .await?;
                broker.set_replicator(cluster.clone());
                local.set_phase(crate::cluster::rejoin::Phase::Running(Arc::clone(&cluster)));
                Some((cluster_addr, cluster))
            }
            _ => None,
        };
        stop_on_error.disarm();
        Ok(Self {
            config,
            broker,
            files,
            auth,
            http,
            grpc,
            kafka,
            cluster,
            stop,
            _dir_lock: dir_lock,
        })
    }

    /// The bound HTTP address (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().unwrap_or(self.config.http)
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.config.grpc)
    }

    /// The bound Kafka address, if the listener is on.
    pub fn kafka_addr(&self) -> Option<SocketAddr> {
        let listener = self.kafka.as_ref()?;
        listener.local_addr().ok().or(self.config.kafka.0)
    }

    /// The broker behind the listeners.
    pub fn broker(&self) -> Arc<Broker> {
        Arc::clone(&self.broker)
    }

    /// Serves until `shutdown` resolves, then drains and flushes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let stop = self.stop.clone();
        let http_addr = self.http_addr();
        let grpc_addr = self.grpc_addr();
        let kafka_addr = self.kafka_addr();
        let mut state = HttpState::new(Arc::clone(&self.broker), self.config.max_waiters);
        state.auth = self.auth.clone();
        state.per_client = crate::api::limits::ClientLimits::new(self.config.max_per_client);
        state.metrics_queues = self.config.metrics_queues;
        state.cluster = self.cluster.as_ref().map(|(_, c)| Arc::clone(c));
        let router = crate::api::routes::router(state, self.config.max_body_bytes);
        // One tracker for every task: the broker's own (timer, dead letters), the streams
        // the adapters serve, the listeners and the upkeep below. Shutdown joins them all.
        let tasks = self.broker.tasks().clone();
        let limits = ConnLimits {
            slots: Arc::new(tokio::sync::Semaphore::new(self.config.max_connections)),
            header_timeout: Duration::from_secs(self.config.header_timeout_secs),
            idle_timeout: Duration::from_secs(self.config.idle_timeout_secs),
        };
        let http_stop = stop.clone();
        let http_limits = limits.clone();
        let http_task = tasks.spawn(async move {
            conn::serve_http(self.http, router, http_limits, http_stop).await;
            Ok::<(), std::io::Error>(())
        });
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let api = GrpcApi::new(Arc::clone(&self.broker), self.config.max_streams)
            .with_auth(self.auth.clone())
            .with_per_client(self.config.max_per_client);
        let grpc_stop = stop.clone();
        let grpc_task = tasks.spawn(
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(conn::KEEPALIVE_INTERVAL))
                .layer(tower::util::option_layer(self.cluster.as_ref().map(
                    |(_, cluster)| crate::api::catch_up::CatchUpLayer(Arc::clone(cluster)),
                )))
                .add_service(api.into_server())
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .serve_with_incoming_shutdown(
                    conn::grpc_incoming(self.grpc, limits),
                    grpc_stop.cancelled_owned(),
                ),
        );
        if let Some(listener) = self.kafka {
            let mut kafka = crate::kafka::Kafka::new(
                Arc::clone(&self.broker),
                self.auth.clone(),
                crate::kafka::KafkaConfig {
                    max_connections: self.config.max_connections,
                    ..crate::kafka::KafkaConfig::default()
                },
            );
            if let Some((_, cluster)) = &self.cluster {
                kafka = kafka.with_cluster(Arc::clone(cluster));
            }
            let kafka = Arc::new(kafka);
            let (groups, groups_stop) = (Arc::clone(&kafka), stop.clone());
            tasks.spawn(async move { groups.groups.run(groups_stop).await });
            tasks.spawn(crate::kafka::conn::serve(
                listener,
                kafka,
                tasks.clone(),
                stop.clone(),
            ));
        }
        let maintenance = crate::maintenance::MaintenanceConfig {
            interval: Duration::from_secs(self.config.maintenance_interval_secs),
            delete_retention: Duration::from_secs(self.config.delete_retention_secs),
            bytes_per_sec: self.config.compaction_bytes_per_sec,
        };
        let upkeep_stop = stop.clone();
        tasks.spawn(async move {
            let mut ticks = Ticks::new(METRICS_UPKEEP, upkeep_stop);
            while ticks.next().await {
                crate::metrics::upkeep();
            }
        });
        tasks.spawn(close_idle_files(
            Arc::clone(&self.files),
            Duration::from_secs(self.config.idle_close_secs) / IDLE_SWEEPS_PER_CLOSE,
            stop.clone(),
        ));
        let cluster = match self.cluster {
            Some((addr, cluster)) => {
                tasks.spawn(Arc::clone(&cluster).catch_up_metadata(stop.clone()));
                tasks.spawn(Arc::clone(&cluster).watch_stalls(stop.clone()));
                tasks.spawn(Arc::clone(&cluster).announce(stop.clone()));
                tasks.spawn(Arc::clone(&cluster).run_metrics(stop.clone()));
                tasks.spawn(Arc::clone(&cluster).run_balance(stop.clone()));
                tasks.spawn(Arc::clone(&cluster).run_fencing(stop.clone()));
                tasks.spawn(Arc::clone(&cluster).run_moves(stop.clone()));
                tasks.spawn(Arc::clone(&cluster).run_liveness(stop.clone()));
                tracing::info!(node_id = cluster.node_id(), cluster = %addr, "cluster node started");
                Some(cluster)
            }
            None => None,
        };
        tasks.spawn(crate::maintenance::run(
            Arc::downgrade(&self.broker),
            maintenance,
            stop.clone(),
        ));
        tracing::info!(%http_addr, %grpc_addr, kafka_addr = ?kafka_addr, data_dir = %self.config.data_dir.display(), fsync = ?self.config.fsync, "qit is serving");
        shutdown.await;
        tracing::info!("shutting down: draining requests");
        if let Some(cluster) = &cluster {
            // Leaders hand their groups to up-to-date followers first (requests keep being
            // served meanwhile), so that a clean stop costs no election timeout.
            cluster.hand_off_all().await;
            // Stop replicating and applying before the broker's data is flushed.
            cluster.shutdown().await;
        }
        // Stop the broker first so that open long-polls answer at once.
        if let Err(error) = self.broker.shutdown().await {
            tracing::error!(%error, "flush during shutdown failed");
        }
        stop.cancel();
        let drain = Duration::from_secs(self.config.drain_timeout_secs);
        let listeners = [http_task.abort_handle(), grpc_task.abort_handle()];
        for (name, task) in [
            ("http", http_task),
            (
                "grpc",
                tasks.spawn(async move {
                    grpc_task
                        .await
                        .map(|r| r.map_err(|e| std::io::Error::other(e.to_string())))?
                }),
            ),
        ] {
            match tokio::time::timeout(drain, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => {
                    tracing::warn!(listener = name, %error, "listener ended with an error")
                }
                Ok(Err(error)) => tracing::warn!(listener = name, %error, "listener task failed"),
                Err(_) => tracing::warn!(listener = name, "listener did not drain in time"),
            }
        }
        // A listener past the drain deadline (say, a client that stopped reading its stream)
        // is cut off: nothing outlives the server. A no-op for those that drained.
        for listener in listeners {
            listener.abort();
        }
        // Every background task has seen the stop by now; wait for them to end, so that
        // nothing runs on after `run` returns.
        if tokio::time::timeout(drain, self.broker.join_tasks())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.broker.tasks().len(),
                "background tasks did not end in time"
            );
        }
        // Anything appended while draining is made durable last.
        self.broker.shutdown().await?;
        tracing::info!("qit stopped cleanly");
        Ok(())
    }
}

/// Serves the cluster listener for `local` (see `cluster::service`) until `stop`.
async fn serve_cluster(
    listener: TcpListener,
    local: Arc<crate::cluster::rejoin::Local>,
    stop: CancellationToken,
) {
    let service = crate::cluster::service::Service::server(local);
    // tonic's own `tcp_nodelay` applies only to listeners it binds: each accepted peer
    // connection is set here, or Nagle's algorithm holds the small frames of an answer for
    // the peer's delayed ACK (tens of ms).
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "TCP_NODELAY on a peer connection");
            }
        })
    });
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(incoming);
    // Ends at the stop without draining: the stop comes after this node's groups were
    // handed off and shut down, so its peers' calls have nothing left to reach, and the
    // append streams their leaders keep open would hold a graceful drain for the whole
    // deadline (5 s per restart).
    tokio::select! {
        served = server => {
            if let Err(error) = served {
                tracing::error!(%error, "cluster listener failed");
            }
        }
        () = stop.cancelled() => {}
    }
}

/// Closes the long-lived files and drops the maps left idle, every `every`, until `stop`.
async fn close_idle_files(files: Arc<CachedStorage>, every: Duration, stop: CancellationToken) {
    let mut ticks = Ticks::new(every.max(Duration::from_millis(100)), stop);
    while ticks.next().await {
        let sweep = Arc::clone(&files);
        // It may fsync files with unsynced bytes: off the async threads.
        match tokio::task::spawn_blocking(move || sweep.close_idle()).await {
            Ok(closed) if closed > 0 => {
                tracing::debug!(closed, open = files.open_files(), "closed idle files")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "closing idle files failed"),
        }
        crate::metrics::set_open_files(files.open_files());
        crate::metrics::set_mapped_files(files.mapped_files());
    }
}

/// Opens users and grants under the data directory. A cluster node without a configured JWT secret
/// signs with one derived from the cluster secret, so that a token from one node verifies
/// on every node (and after a restart).
fn open_auth(config: &ServerConfig) -> Result<crate::auth::AuthStore, ServerError> {
    let mut auth_config = crate::auth::AuthConfig {
        admin: config.admin.clone(),
        admin_password: config.admin_password.clone(),
        jwt_secret: config.jwt_secret.clone(),
        token_ttl: Duration::from_secs(config.token_ttl_secs),
        ..crate::auth::AuthConfig::default()
    }
    .with_env_secret();
    if auth_config.jwt_secret.is_none()
        && config.peers.is_some()
        && let Some(secret) = &config.cluster_secret
    {
        auth_config.jwt_secret =
            Some(crate::cluster::auth::Secret::new(secret).derive_key(b"qit jwt signing key"));
    }
    Ok(crate::auth::AuthStore::open(&config.data_dir, auth_config)?)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
