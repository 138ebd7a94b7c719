//! Per-client caps (by IP address) on long-lived requests: long-polls and gRPC streams, so
//! one client cannot take every slot of the server-wide caps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

/// Counts of open long-lived requests per client.
#[derive(Debug)]
pub struct ClientLimits {
    per_client: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open slot; released on drop.
#[derive(Debug)]
pub struct ClientPermit {
    limits: Arc<ClientLimits>,
    client: IpAddr,
}

impl ClientLimits {
    /// Allows `per_client` open slots per address.
    pub fn new(per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            per_client,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `client`, unless it holds `per_client` already.
    pub fn acquire(self: &Arc<Self>, client: IpAddr) -> Option<ClientPermit> {
        let mut open = self.open.lock();
        let count = open.entry(client).or_default();
        if *count >= self.per_client {
            return None;
        }
        *count += 1;
        Some(ClientPermit {
            limits: Arc::clone(self),
            client,
        })
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock();
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_client_and_frees_on_drop() {
        let limits = ClientLimits::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limits.acquire(a).unwrap();
        let _second = limits.acquire(a).unwrap();
        assert!(limits.acquire(a).is_none());
        assert!(limits.acquire(b).is_some());
        drop(first);
        assert!(limits.acquire(a).is_some());
    }
}
