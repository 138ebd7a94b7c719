//! The state every HTTP handler shares. Its own module so that the route table
//! ([`super::http`]) and the auth handlers ([`super::auth`]) both use it without importing
//! each other.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::broker::Broker;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Permits for concurrent long-polls (hardening against connection floods).
    pub waiters: Arc<Semaphore>,
    /// The number of permits `waiters` started with.
    pub max_waiters: usize,
    /// Users and grants, when auth is on.
    pub auth: Option<Arc<crate::auth::AuthStore>>,
    /// Long-polls per client address.
    pub per_client: Arc<super::limits::ClientLimits>,
    /// Slots for password hashing (logins, registrations): one per core, so a login flood
    /// cannot take every thread and all memory.
    pub hashing: Arc<Semaphore>,
    /// Queues given per-queue gauges in `/metrics` (the busiest ones).
    pub metrics_queues: usize,
    /// The cluster this node belongs to (`None`: a single node).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl HttpState {
    /// State for `broker` allowing `max_waiters` concurrent long-polls.
    pub fn new(broker: Arc<Broker>, max_waiters: usize) -> Self {
        Self {
            broker,
            waiters: Arc::new(Semaphore::new(max_waiters)),
            max_waiters,
            auth: None,
            per_client: super::limits::ClientLimits::new(max_waiters),
            hashing: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(1, usize::from),
            )),
            metrics_queues: crate::metrics::DEFAULT_GAUGED_QUEUES,
            cluster: None,
        }
    }
}
