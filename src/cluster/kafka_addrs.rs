//! The nodes' Kafka listeners, as the metadata group recorded them ([`Command::Kafka`]
//! entries, and the `kafka` map of its snapshot): what the Kafka adapter advertises as the
//! cluster's brokers. A node announces its listener after its other addresses; one
//! started without a Kafka listener announces none.
//!
//! [`Command::Kafka`]: super::types::Command::Kafka

use std::collections::BTreeMap;

use parking_lot::RwLock;

use super::types::KafkaAddr;

/// Every node's Kafka listener, by node id.
#[derive(Debug, Default)]
pub struct KafkaAddrs(RwLock<BTreeMap<u64, String>>);

impl KafkaAddrs {
    /// Records (or replaces) a node's listener.
    pub fn set(&self, addr: KafkaAddr) {
        self.0.write().insert(addr.id, addr.kafka);
    }

    /// A node's listener, if it announced one.
    pub fn get(&self, id: u64) -> Option<String> {
        self.0.read().get(&id).cloned()
    }

    /// Every announced listener.
    pub fn all(&self) -> BTreeMap<u64, String> {
        self.0.read().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_announcement_of_a_node_wins() {
        let addrs = KafkaAddrs::default();
        addrs.set(KafkaAddr {
            id: 2,
            kafka: "127.0.0.1:1".into(),
        });
        addrs.set(KafkaAddr {
            id: 2,
            kafka: "127.0.0.1:2".into(),
        });
        assert_eq!(addrs.get(2).as_deref(), Some("127.0.0.1:2"));
        assert_eq!(addrs.get(1), None);
        assert_eq!(addrs.all().len(), 1);
    }
}
