//! The metadata group's snapshot: the registry (queues with their settings, exchanges with
//! their bindings), users and grants, the nodes' addresses and the Raft group id of every
//! queue, as of one applied log id. With it the metadata group's log is purged like a
//! queue group's (see `storage_policy` in [`super::groups`]) instead of growing with every
//! queue, user and grant ever made.
//!
//! A queue's group id comes from the metadata log index that created it, which a purged log
//! no longer holds: the snapshot carries the ids.
//!
//! The snapshot is one file, `raft/0/meta-snapshot` (the packed stream of
//! [`super::snapshot`]: a manifest without files whose `meta` field is the [`MetaImage`]),
//! replaced by rename. At start the image is installed into the empty broker before the
//! entries after it are replayed; a follower sent a snapshot by its leader (it was wiped, or
//! lagged past the purge point) installs the image over what it has: queues it does not
//! name (or name with another group id) are closed and deleted, the missing ones created
//! with their groups, exchanges and bindings made equal, users and grants replaced.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::types::{Fencing, KafkaAddr, Membership, NodeAddrs, Placed};
use crate::broker::registry::Registry;
use crate::broker::replicate::{AccessImage, Op};
use crate::broker::{Broker, BrokerError};

/// Where the opening of a queue's group comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOpening {
    /// Applying the entry that created the queue: placement picks the replicas it picked
    /// then, the group's initial membership, which a replica with an empty log writes as
    /// its first entry.
    Created,
    /// Installing a metadata snapshot: placement may have changed since the queue was
    /// created, so this node only joins the group, whose leader sends it the log.
    Restored,
}

/// What applying metadata does beyond the broker: the cluster's groups follow the queues
/// (implemented by [`super::groups::Groups`]; a trait so that the two files do not import
/// each other).
pub trait MetaHooks: Send + Sync {
    /// A node announced its addresses.
    fn set_node(&self, addrs: NodeAddrs);
    /// The metadata group's membership changed (its voters are the cluster's voters).
    fn set_members(&self, membership: &Membership);
    /// Queue `name` was created by the entry that gives it group `id`.
    fn open_queue<'a>(
        &'a self,
        name: &'a str,
        id: u64,
        opening: QueueOpening,
    ) -> futures_util::future::BoxFuture<'a, ()>;
    /// A queue's group moved to other replicas: opened here if this node is one now,
    /// closed and cleared if it no longer is.
    fn set_replicas<'a>(&'a self, placed: &'a Placed) -> futures_util::future::BoxFuture<'a, ()>;
    /// A node is leaving: placement leaves it out from now on.
    fn set_draining(&self, node: u64);
    /// Queue `name` is about to be deleted.
    fn close_queue<'a>(&'a self, name: &'a str) -> futures_util::future::BoxFuture<'a, ()>;
    /// Every queue's group id.
    fn queue_groups(&self) -> Vec<(String, u64)>;
    /// Every node's announced addresses.
    fn nodes(&self) -> Vec<NodeAddrs>;
    /// Every queue group's replicas, as this node knows them.
    fn queue_replicas(&self) -> Vec<Placed>;
    /// Voters marked as leaving.
    fn draining(&self) -> Vec<u64>;
    /// A node announced its Kafka listener.
    fn set_kafka(&self, addr: KafkaAddr);
    /// Every node's announced Kafka listener.
    fn kafka_addrs(&self) -> BTreeMap<u64, String>;
    /// A node was fenced or unfenced ([`super::fencing`]).
    fn set_fenced(&self, change: Fencing);
    /// The fenced nodes, all of them (installing a snapshot).
    fn replace_fenced(&self, nodes: &[u64]);
    /// The fenced nodes.
    fn fenced(&self) -> Vec<u64>;
}

/// The file holding the metadata group's snapshot.
pub const SNAPSHOT_FILE: &str = "meta-snapshot";

/// The metadata a snapshot of the metadata group holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetaImage {
    /// Queues and exchanges.
    pub registry: Registry,
    /// Each queue's Raft group id.
    pub groups: BTreeMap<String, u64>,
    /// Users and grants (`None` where auth is off).
    pub access: Option<AccessImage>,
    /// The nodes' addresses.
    pub nodes: Vec<NodeAddrs>,
    /// Each queue group's replicas as the metadata last recorded them (they differ from
    /// placement at creation once a membership change moved the group).
    #[serde(default)]
    pub replicas: BTreeMap<String, Vec<u64>>,
    /// Voters marked as leaving (placement leaves them out).
    #[serde(default)]
    pub draining: Vec<u64>,
    /// The nodes' Kafka listeners (absent from snapshots written before they were kept).
    #[serde(default)]
    pub kafka: BTreeMap<u64, String>,
    /// The fenced nodes (absent from snapshots written before they were kept).
    #[serde(default)]
    pub fenced: Vec<u64>,
}

/// Errors of installing a metadata image.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The broker refused a change.
    #[error("{what}: {source}")]
    Broker {
        /// The change.
        what: String,
        /// The cause.
        #[source]
        source: BrokerError,
    },
    /// The image names a group for a queue it does not hold.
    #[error("the snapshot gives queue `{0}` a group but no settings")]
    Inconsistent(String),
}

fn refused(what: impl Into<String>) -> impl FnOnce(BrokerError) -> MetadataError {
    let what = what.into();
    move |source| MetadataError::Broker { what, source }
}

impl MetaImage {
    /// The metadata now (call between two applies of the metadata group, so that it is
    /// the state at the last applied entry).
    pub fn capture(broker: &Broker, hooks: &dyn MetaHooks) -> Self {
        Self {
            registry: broker.registry_image(),
            groups: hooks.queue_groups().into_iter().collect(),
            access: broker.access_image(),
            nodes: hooks.nodes(),
            replicas: hooks
                .queue_replicas()
                .into_iter()
                .map(|p| (p.queue, p.replicas))
                .collect(),
            draining: hooks.draining(),
            kafka: hooks.kafka_addrs(),
            fenced: hooks.fenced(),
        }
    }

    /// Makes `broker` and the groups hold exactly this metadata.
    pub async fn install(
        &self,
        broker: &Broker,
        hooks: &dyn MetaHooks,
    ) -> Result<(), MetadataError> {
        for node in &self.draining {
            hooks.set_draining(*node);
        }
        // Before the queues: placement reads it.
        hooks.replace_fenced(&self.fenced);
        self.install_queues(broker, hooks).await?;
        self.install_replicas(hooks).await;
        self.install_exchanges(broker).await?;
        if let Some(access) = &self.access {
            broker
                .restore_access(access)
                .map_err(refused("restoring users and grants"))?;
        }
        for node in &self.nodes {
            hooks.set_node(node.clone());
        }
        for (id, kafka) in &self.kafka {
            hooks.set_kafka(KafkaAddr {
                id: *id,
                kafka: kafka.clone(),
            });
        }
        Ok(())
    }

    /// Queues: those not named here with the same group id go (group first, then data);
    /// the missing ones are created in the order they were made, each with its group.
    async fn install_queues(
        &self,
        broker: &Broker,
        hooks: &dyn MetaHooks,
    ) -> Result<(), MetadataError> {
        let have: BTreeMap<String, u64> = hooks.queue_groups().into_iter().collect();
        let mut present: Vec<String> = broker.registry_image().queues.into_keys().collect();
        // Kept only where this node's group and the image's are the same one.
        present.retain(|name| {
            have.get(name)
                .is_none_or(|id| self.groups.get(name) != Some(id))
        });
        for name in present {
            hooks.close_queue(&name).await;
            broker
                .apply_op(Op::DeleteQueue { name: name.clone() })
                .await
                .map_err(refused(format!("deleting queue {name}")))?;
        }
        let mut wanted: Vec<(u64, &String)> = self.groups.iter().map(|(n, id)| (*id, n)).collect();
        wanted.sort();
        for (id, name) in wanted {
            if have.get(name) == Some(&id) {
                continue;
            }
            let settings = self
                .registry
                .queues
                .get(name)
                .ok_or_else(|| MetadataError::Inconsistent(name.clone()))?;
            broker
                .restore_queue(name, settings.clone())
                .await
                .map_err(refused(format!("creating queue {name}")))?;
            hooks.open_queue(name, id, QueueOpening::Restored).await;
        }
        Ok(())
    }

    /// Queue groups whose recorded replicas differ from what this node holds move to them
    /// (opened here if this node is one, closed if it no longer is).
    async fn install_replicas(&self, hooks: &dyn MetaHooks) {
        let have: BTreeMap<String, Placed> = hooks
            .queue_replicas()
            .into_iter()
            .map(|p| (p.queue.clone(), p))
            .collect();
        for (queue, replicas) in &self.replicas {
            let Some(current) = have.get(queue) else {
                continue;
            };
            if &current.replicas != replicas {
                let placed = Placed {
                    queue: queue.clone(),
                    group: current.group,
                    replicas: replicas.clone(),
                };
                hooks.set_replicas(&placed).await;
            }
        }
    }

    /// Exchanges: those missing or of another type go, the others get exactly the
    /// bindings named here, in their order.
    async fn install_exchanges(&self, broker: &Broker) -> Result<(), MetadataError> {
        let current = broker.registry_image().exchanges;
        for (name, record) in &current {
            let want = self.registry.exchanges.get(name);
            if want.is_some_and(|w| w.kind == record.kind && w.bindings == record.bindings) {
                continue;
            }
            broker
                .apply_op(Op::DeleteExchange { name: name.clone() })
                .await
                .map_err(refused(format!("deleting exchange {name}")))?;
        }
        let current = broker.registry_image().exchanges;
        for (name, want) in &self.registry.exchanges {
            if current.contains_key(name) {
                continue;
            }
            broker
                .apply_op(Op::CreateExchange {
                    name: name.clone(),
                    kind: want.kind,
                })
                .await
                .map_err(refused(format!("creating exchange {name}")))?;
            for binding in &want.bindings {
                broker
                    .apply_op(Op::Bind {
                        exchange: name.clone(),
                        binding: binding.clone(),
                    })
                    .await
                    .map_err(refused(format!("binding exchange {name}")))?;
            }
        }
        Ok(())
    }
}

/// Writes `bytes` as `dir/name`, durably (temp file, fsync, rename, fsync of the directory).
pub fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_data()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot written before the Kafka listeners and the fenced nodes were kept (no
    /// `kafka` or `fenced` field) still installs, with none known; one written now keeps
    /// them.
    #[test]
    fn snapshots_with_and_without_kafka_listeners_decode() {
        let mut old = serde_json::to_value(MetaImage::default()).unwrap();
        old.as_object_mut().unwrap().remove("kafka");
        old.as_object_mut().unwrap().remove("fenced");
        let image: MetaImage = serde_json::from_value(old).unwrap();
        assert!(image.kafka.is_empty() && image.fenced.is_empty());
        let image = MetaImage {
            kafka: BTreeMap::from([(2, "127.0.0.1:19092".to_string())]),
            fenced: vec![3],
            ..MetaImage::default()
        };
        let back: MetaImage =
            serde_json::from_value(serde_json::to_value(&image).unwrap()).unwrap();
        assert_eq!(back.kafka, image.kafka);
        assert_eq!(back.fenced, [3]);
    }
}
