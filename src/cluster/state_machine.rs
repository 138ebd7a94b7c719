//! The state machine of a group ([`RaftStateMachine`]): applying a committed entry is the
//! broker's own apply path ([`crate::broker::Broker::apply_op`]), so a leader, a follower
//! and a restarted node reach the same queues, offsets and group state from the same log.
//!
//! The broker's data directory is the state this machine builds. A cluster node clears it
//! at start and replays the committed Raft log into it (see `mod.rs`), so `applied_state`
//! starts empty and nothing is ever applied twice. Snapshots hold only the applied log id
//! and membership: qit never purges a Raft log, so openraft never has to ship one.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, StorageError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::types::{Applied, Command, NodeAddrs, TypeConfig, decode, encode};
use crate::broker::Broker;
use crate::broker::replicate::{Op, OpResult, WireError};

/// Counter of the snapshots this node installed from a leader (a `/metrics` series).
pub const SNAPSHOT_INSTALLS: &str = "qit_cluster_snapshot_installs_total";

/// What applying metadata does beyond the broker: the cluster's groups follow the queues
/// (implemented by [`super::groups::Groups`]; a trait so that the two files do not import
/// each other).
pub trait MetaHooks: Send + Sync {
    /// A node announced its addresses.
    fn set_node(&self, addrs: NodeAddrs);
    /// Queue `name` was created by the entry that gives it group `id`.
    fn open_queue<'a>(&'a self, name: &'a str, id: u64) -> futures_util::future::BoxFuture<'a, ()>;
    /// Queue `name` is about to be deleted.
    fn close_queue<'a>(&'a self, name: &'a str) -> futures_util::future::BoxFuture<'a, ()>;
}

/// Which group a machine belongs to.
#[derive(Clone)]
pub enum Role {
    /// The metadata group: creating and deleting a queue opens and closes its group.
    Meta(Arc<dyn MetaHooks>),
    /// A queue's group.
    Queue,
    /// A machine with no broker behind it, for openraft's storage suite: entries only move
    /// the applied id and the membership.
    Bare,
}

/// What a snapshot holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
}

/// A snapshot as kept: its meta and bytes.
type Stored = (SnapshotMeta<u64, BasicNode>, Vec<u8>);

/// One group's state machine.
pub struct StateMachine {
    role: Role,
    broker: Option<Arc<Broker>>,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    /// The last snapshot built or installed (shared with the builders).
    snapshot: Arc<parking_lot::Mutex<Option<Stored>>>,
    snapshots_built: u64,
}

impl StateMachine {
    /// A machine applying into `broker` (none for [`Role::Bare`]).
    pub fn new(role: Role, broker: Option<Arc<Broker>>) -> Self {
        Self {
            role,
            broker,
            last_applied: None,
            membership: StoredMembership::default(),
            snapshot: Arc::default(),
            snapshots_built: 0,
        }
    }

    async fn apply_command(&mut self, log_id: LogId<u64>, command: Command) -> Applied {
        match command {
            Command::Node(addrs) => {
                if let Role::Meta(groups) = &self.role {
                    groups.set_node(addrs);
                }
                Applied(Ok(OpResult::Done))
            }
            Command::Broker(op) => {
                let Some(broker) = &self.broker else {
                    return Applied(Ok(OpResult::Done));
                };
                let deleted = match &op {
                    Op::DeleteQueue { name } => Some(name.clone()),
                    _ => None,
                };
                let created_name = match &op {
                    Op::CreateQueue { name, .. } => Some(name.clone()),
                    _ => None,
                };
                if let (Role::Meta(groups), Some(name)) = (&self.role, &deleted) {
                    // Stop the queue's group before its data goes.
                    groups.close_queue(name).await;
                }
                let result = broker.apply_op(op).await;
                if let Role::Meta(groups) = &self.role
                    && let (
                        Some(name),
                        Ok(OpResult::Created {
                            created: true,
                            dead_letter_created,
                        }),
                    ) = (created_name, &result)
                {
                    groups.open_queue(&name, log_id.index * 2).await;
                    if let Some(dlq) = dead_letter_created {
                        groups.open_queue(dlq, log_id.index * 2 + 1).await;
                    }
                }
                Applied(result.map_err(|e| WireError::from(&e)))
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let body = SnapshotBody {
            last_applied: self.last_applied,
            membership: self.membership.clone(),
        };
        let bytes = encode(&body).map_err(|e| {
            StorageError::from_io_error(
                openraft::ErrorSubject::StateMachine,
                openraft::ErrorVerb::Write,
                std::io::Error::other(e),
            )
        })?;
        self.snapshots_built += 1;
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                self.last_applied.map_or(0, |l| l.index),
                self.snapshots_built
            ),
        };
        *self.snapshot.lock() = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => Applied(Ok(OpResult::Done)),
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Applied(Ok(OpResult::Done))
                }
                EntryPayload::Normal(command) => self.apply_command(entry.log_id, command).await,
            };
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachine {
            role: self.role.clone(),
            broker: self.broker.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            snapshot: Arc::clone(&self.snapshot),
            snapshots_built: self.snapshots_built,
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let body: SnapshotBody = decode(&bytes).map_err(|e| {
            StorageError::from_io_error(
                openraft::ErrorSubject::Snapshot(Some(meta.signature())),
                openraft::ErrorVerb::Read,
                std::io::Error::other(e),
            )
        })?;
        if self.broker.is_some() {
            // The broker's data below the snapshot is not in it: only a log that was never
            // purged can be followed, and qit never purges. Say so loudly if it happens.
            tracing::error!(last = ?meta.last_log_id, "installing a snapshot without its data: the replica misses what it covers");
        }
        self.last_applied = body.last_applied;
        self.membership = body.membership;
        *self.snapshot.lock() = Some((meta.clone(), bytes));
        metrics::counter!(SNAPSHOT_INSTALLS).increment(1);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        Ok(self.snapshot.lock().as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(bytes.clone())),
        }))
    }
}
