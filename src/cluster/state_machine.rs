//! The state machine of a group ([`RaftStateMachine`]): applying a committed entry is the
//! broker's own apply path ([`crate::broker::Broker::apply_op`]), so a leader, a follower
//! and a restarted node reach the same queues, offsets and group state from the same log.
//!
//! The broker's data directory is the state these machines build; a cluster node clears it
//! at start (see `mod.rs`). The metadata group installs its latest snapshot and replays
//! the entries after it, and so creates every queue again, empty. A queue group's machine then
//! restores the queue's data from the group's latest snapshot ([`super::snapshot`]) before
//! openraft replays only the entries after it. A partition group whose Raft log is its
//! partition's segment log ([`super::partition_log_store`]) is the exception: its records
//! are written once, as their entries are appended, and are not cleared; its machine takes
//! note of them as it applies (idempotency keys, waiters), builds snapshots cut at the
//! applied entry, and installs one only where the log does not hold its last entry.
//!
//! A queue group's snapshot carries the queue's data: the files are captured between two
//! applies ([`RaftStateMachine::get_snapshot_builder`] runs on the apply task) and the
//! CRCs, fsyncs and manifest are done by the builder on its own task. Installing one (a
//! far-behind or wiped follower) unpacks it, checks it and swaps it into the broker.
//! A snapshot of the metadata group carries the metadata ([`super::metadata`]): installed
//! into the empty broker at start before the entries after it replay, or over a follower's
//! state when its leader sends it. Snapshots of the storage suite's bare machine hold only
//! the applied log id and membership.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use openraft::RaftSnapshotBuilder;
use openraft::storage::{EntryResponder, RaftStateMachine};

use super::metadata::{MetaHooks, MetaImage, QueueOpening, SNAPSHOT_FILE, write_durably};
use super::partition_log_store::PartitionLogStore;
use super::publish_batch::BatchError;
use super::snapshot::{
    Captured, Manifest, Snapshot, SnapshotData, SnapshotDir, SnapshotError, Stored, pack_bare,
    snapshot_id, unpack_bare,
};
use super::types::{
    Applied, Command, EntryPayload, LogId, PartitionRecords, SnapshotMeta, StoredMembership,
    TypeConfig,
};
use crate::broker::Broker;
use crate::broker::queue::DataPart;
use crate::broker::replicate::{Op, OpResult, WireError};
use crate::log::record::Stamp;

/// Snapshots built by queue groups (counter).
pub const SNAPSHOTS_BUILT: &str = "qit_cluster_snapshots_built_total";
/// Snapshots installed from a leader by queue groups (counter).
pub const SNAPSHOTS_INSTALLED: &str = "qit_cluster_snapshots_installed_total";
/// Snapshots of the metadata group installed from a leader (counter).
pub const META_SNAPSHOTS_INSTALLED: &str = "qit_cluster_meta_snapshots_installed_total";

impl Role {
    /// The queue whose data the group holds, and which part of it.
    pub fn data(&self) -> Option<(&str, DataPart)> {
        match self {
            Role::Queue(name, part) => Some((name, *part)),
            Role::Partition(name, partition) => Some((name, DataPart::of_partition(*partition))),
            Role::Meta(_) | Role::Bare => None,
        }
    }
}

/// A Raft group handle (every group's state machine is a [`StateMachine`]).
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// Which group a machine belongs to.
#[derive(Clone)]
pub enum Role {
    /// The metadata group: creating and deleting a queue opens and closes its group.
    Meta(Arc<dyn MetaHooks>),
    /// The group of the named queue: its consumer groups and every partition
    /// ([`DataPart::All`], a queue made before partitions had groups of their own) or
    /// partition 0 ([`DataPart::Head`]).
    Queue(String, DataPart),
    /// The group of one further partition of the named queue (its messages only).
    Partition(String, u32),
    /// A machine with no broker behind it, for openraft's storage suite: entries only move
    /// the applied id and the membership.
    Bare,
}

/// The last index a group applied here, and the requests waiting for an index: each is
/// woken once, when its index is applied (not at every change of the group's metrics, as
/// openraft's `wait()` does).
#[derive(Default)]
pub struct AppliedIndex {
    inner: parking_lot::Mutex<AppliedWaiters>,
}

#[derive(Default)]
struct AppliedWaiters {
    index: Option<u64>,
    waiting: std::collections::BTreeMap<u64, Vec<tokio::sync::oneshot::Sender<()>>>,
    /// The group stopped here: it applies nothing more.
    closed: bool,
}

impl AppliedIndex {
    /// `index` was applied: wakes whoever waits for it or an earlier one.
    pub fn advance(&self, index: u64) {
        let ready = {
            let mut inner = self.inner.lock();
            if inner.index.is_some_and(|i| i >= index) {
                return;
            }
            inner.index = Some(index);
            let later = inner.waiting.split_off(&(index + 1));
            std::mem::replace(&mut inner.waiting, later)
        };
        for sender in ready.into_values().flatten() {
            let _ = sender.send(());
        }
    }

    /// The last index applied (`None`: none yet).
    pub fn current(&self) -> Option<u64> {
        self.inner.lock().index
    }

    /// The group stopped here (its queue was deleted, or it moved off this node): every
    /// wait ends at once, unapplied, instead of at its limit.
    pub fn close(&self) {
        let waiting = {
            let mut inner = self.inner.lock();
            inner.closed = true;
            std::mem::take(&mut inner.waiting)
        };
        drop(waiting);
    }

    /// Waits until `index` is applied, at most `limit` and no longer than the group runs
    /// here; true if it was.
    pub async fn wait(&self, index: u64, limit: std::time::Duration) -> bool {
        let applied = {
            let mut inner = self.inner.lock();
            if inner.index.is_some_and(|i| i >= index) {
                return true;
            }
            if inner.closed {
                return false;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            inner.waiting.entry(index).or_default().push(tx);
            rx
        };
        matches!(tokio::time::timeout(limit, applied).await, Ok(Ok(())))
    }
}

/// A snapshot without data, as kept in memory: its meta, id and packed bytes.
type InMemory = (SnapshotMeta, String, Vec<u8>);

/// The I/O error openraft's storage traits return for `error`, with what was being done.
fn storage_error(context: &str, error: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{context}: {error}"))
}

fn meta_of(manifest: &Manifest) -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: manifest.last_log_id,
        last_membership: manifest.membership.clone(),
    }
}

/// One group's state machine.
pub struct StateMachine {
    role: Role,
    broker: Option<Arc<Broker>>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// The last snapshot without data built or installed (shared with the builders).
    in_memory: Arc<parking_lot::Mutex<Option<InMemory>>>,
    /// A queue group's snapshots.
    store: Option<SnapshotDir>,
    snapshots_built: u64,
    /// Entries applied by this machine (and its clones); read after start-up, it is how
    /// many the start replayed.
    applied: Arc<AtomicU64>,
    /// The last applied index, for requests that wait for one.
    applied_index: Arc<AppliedIndex>,
    /// A builder's files, captured between two applies.
    captured: Option<Result<Captured, String>>,
    /// The metadata group's directory (its snapshot file is there).
    meta_dir: Option<std::path::PathBuf>,
    /// A metadata builder's image, captured between two applies.
    captured_meta: Option<MetaImage>,
    /// A partition group's Raft log when it is the partition's own segment log: an
    /// entry's records are in the partition once it is written, so applying it only takes
    /// note of them, and the group's snapshots are cut at the applied entry.
    partition_log: Option<PartitionLogStore>,
}

impl StateMachine {
    /// A machine applying into `broker` (none for [`Role::Bare`]) whose snapshots carry no
    /// data.
    pub fn new(role: Role, broker: Option<Arc<Broker>>) -> Self {
        Self {
            role,
            broker,
            last_applied: None,
            membership: StoredMembership::default(),
            in_memory: Arc::default(),
            store: None,
            snapshots_built: 0,
            applied: Arc::default(),
            applied_index: Arc::default(),
            captured: None,
            meta_dir: None,
            captured_meta: None,
            partition_log: None,
        }
    }

    /// The machine of the metadata group, its snapshot in `dir`: the metadata of the latest
    /// snapshot is installed into `broker` (empty at start) and the machine starts at the
    /// log id it covers.
    pub async fn for_meta(
        hooks: Arc<dyn MetaHooks>,
        broker: Arc<Broker>,
        dir: &std::path::Path,
    ) -> Result<Self, String> {
        let mut machine = Self::new(Role::Meta(hooks), Some(broker));
        machine.meta_dir = Some(dir.to_path_buf());
        let path = dir.join(SNAPSHOT_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(machine),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let manifest =
            unpack_bare(&mut bytes.as_slice()).map_err(|e| format!("{}: {e}", path.display()))?;
        machine.install_meta(&manifest, bytes).await?;
        tracing::info!(last = ?manifest.last_log_id, "metadata restored from its snapshot");
        Ok(machine)
    }

    /// Installs a metadata snapshot (its manifest and packed bytes): its image into the
    /// broker and the groups, then the applied point and the snapshot kept.
    async fn install_meta(&mut self, manifest: &Manifest, bytes: Vec<u8>) -> Result<(), String> {
        let (Role::Meta(hooks), Some(broker)) = (&self.role, &self.broker) else {
            return Err("not the metadata group".into());
        };
        let image: MetaImage = match &manifest.meta {
            Some(value) => serde_json::from_value(value.clone())
                .map_err(|e| format!("the snapshot's metadata: {e}"))?,
            None => return Err("a metadata snapshot without its metadata".into()),
        };
        // The voters as of the snapshot's point first: placement and the leaving marks
        // that the image installs are read against them, as every node read them when it
        // applied the same entries (the voters this node had may be its stale `--peers` at
        // start, or an older membership when a leader sends the snapshot).
        hooks.set_members(manifest.membership.membership());
        image
            .install(broker, hooks.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        self.applied_up_to(manifest.last_log_id);
        self.membership = manifest.membership.clone();
        *self.in_memory.lock() = Some((meta_of(manifest), manifest.snapshot_id.clone(), bytes));
        Ok(())
    }

    /// Builds the metadata group's snapshot from the image captured at the applied point
    /// and stores it (replacing the previous one).
    async fn build_meta(&mut self, image: MetaImage) -> Result<Snapshot, std::io::Error> {
        let fail = |e: String| {
            tracing::error!(error = %e, "building the metadata snapshot failed");
            storage_error("building the metadata snapshot", e)
        };
        let id = snapshot_id(
            self.last_applied.map_or(0, |l| l.index),
            self.snapshots_built,
        );
        let mut manifest = Manifest::bare(id, self.last_applied, self.membership.clone());
        manifest.meta = Some(serde_json::to_value(&image).map_err(|e| fail(e.to_string()))?);
        let bytes = pack_bare(&manifest).map_err(|e| fail(e.to_string()))?;
        self.store_meta(&bytes).await.map_err(fail)?;
        let meta = meta_of(&manifest);
        let id = manifest.snapshot_id;
        *self.in_memory.lock() = Some((meta.clone(), id.clone(), bytes.clone()));
        metrics::counter!(SNAPSHOTS_BUILT).increment(1);
        tracing::debug!(last = ?manifest.last_log_id, "metadata snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData::memory(&id, bytes),
        })
    }

    /// Writes a metadata snapshot's bytes to its file, durably, on a blocking thread.
    async fn store_meta(&self, bytes: &[u8]) -> Result<(), String> {
        let Some(dir) = self.meta_dir.clone() else {
            return Ok(());
        };
        let bytes = bytes.to_vec();
        tokio::task::spawn_blocking(move || write_durably(&dir, SNAPSHOT_FILE, &bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing the metadata snapshot: {e}"))
    }

    /// The machine of a group holding queue data (`role` is [`Role::Queue`] or
    /// [`Role::Partition`]), its snapshots in `dir`: its part of the queue's data (just
    /// created empty by the metadata replay) is replaced by the latest snapshot's, and the
    /// machine starts at the log id that snapshot covers. A partition whose Raft log is its
    /// segment log (`partition_log`) holds its records already: the machine only starts
    /// at the snapshot's log id (the entries after it apply again, taking note of their
    /// records).
    pub async fn for_queue(
        role: Role,
        broker: Arc<Broker>,
        dir: &std::path::Path,
        partition_log: Option<PartitionLogStore>,
    ) -> Result<Self, SnapshotError> {
        let store = SnapshotDir::open(dir)?;
        let mut machine = Self::new(role, Some(broker));
        machine.partition_log = partition_log;
        match store.current() {
            // The partition holds its records already.
            Some(stored) if machine.partition_log.is_some() => {
                machine.applied_up_to(stored.manifest.last_log_id);
                machine.membership = stored.manifest.membership.clone();
            }
            Some(stored) => {
                machine.restore(&stored).await?;
                let (queue, part) = machine.role.data().unwrap_or(("", DataPart::All));
                tracing::info!(queue, ?part, last = ?stored.manifest.last_log_id, files = stored.manifest.files.len(), "queue restored from its snapshot");
            }
            None => {}
        }
        machine.store = Some(store);
        Ok(machine)
    }

    /// Entries applied so far (see the field).
    pub fn applied_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.applied)
    }

    /// The last applied index, to wait on.
    pub fn applied_index(&self) -> Arc<AppliedIndex> {
        Arc::clone(&self.applied_index)
    }

    /// Moves to `last` (a snapshot's applied point) and wakes who waits for it.
    fn applied_up_to(&mut self, last: Option<LogId>) {
        self.last_applied = last;
        if let Some(last) = last {
            self.applied_index.advance(last.index);
        }
    }

    /// Swaps a stored snapshot's data into the broker and moves to the log id it covers.
    async fn restore(&mut self, stored: &Stored) -> Result<(), SnapshotError> {
        if let Some(log) = self.partition_log.clone() {
            return self.restore_partition_log(stored, &log).await;
        }
        if let (Some((name, part)), Some(broker)) = (self.role.data(), &self.broker) {
            let source = stored.clone();
            // Alone: the queue's other groups apply once the part is replaced.
            let gate = broker.queue_gate(name);
            let _alone = gate.write().await;
            broker
                .replace_queue_data(name, part, move |dir| {
                    source.restore_into(dir).map_err(std::io::Error::from)
                })
                .await
                .map_err(|e| SnapshotError::Invalid {
                    path: stored.dir.clone(),
                    reason: format!("the broker cannot open it: {e}"),
                })?;
        }
        self.applied_up_to(stored.manifest.last_log_id);
        self.membership = stored.manifest.membership.clone();
        Ok(())
    }

    /// Makes a partition whose Raft log is its segment log hold a received snapshot: the
    /// partition's records are replaced by the snapshot's (durably: they are the log), and
    /// the log starts over after the snapshot's last entry, unless it holds that entry
    /// already (then it holds the same records up to it, and the entries after it, which
    /// openraft keeps).
    async fn restore_partition_log(
        &mut self,
        stored: &Stored,
        log: &PartitionLogStore,
    ) -> Result<(), SnapshotError> {
        let invalid = |reason: String| SnapshotError::Invalid {
            path: stored.dir.clone(),
            reason,
        };
        let last = stored
            .manifest
            .last_log_id
            .ok_or_else(|| invalid("a partition's snapshot without a last entry".into()))?;
        let held = log
            .holds(&last)
            .map_err(|e| invalid(format!("reading the log: {e}")))?;
        if let (false, Some((name, part)), Some(broker)) = (held, self.role.data(), &self.broker) {
            let source = stored.clone();
            let segments = log.segments_dir();
            let DataPart::Partition(partition) = part else {
                return Err(invalid(format!("the log of {part:?} is not a partition's")));
            };
            let emptied = segments.clone();
            super::group_log::relink_partition(broker, name, partition, segments, move |dir| {
                clear_dir(&emptied)?;
                source.restore_durably(dir).map_err(std::io::Error::from)
            })
            .await
            .map_err(|e| invalid(format!("the broker cannot open it: {e}")))?;
            log.reset_to_snapshot(last)
                .map_err(|e| invalid(format!("starting the log over: {e}")))?;
        }
        self.applied_up_to(Some(last));
        self.membership = stored.manifest.membership.clone();
        Ok(())
    }

    async fn apply_command(&mut self, log_id: LogId, command: Command) -> Applied {
        match command {
            // Membership changes run on the metadata leader, and a node asks another to
            // await an index, or the leader for its read index, directly: never entries.
            Command::Members(_)
            | Command::AwaitMeta(_)
            | Command::MetaReadIndex
            | Command::ReadIndex(_) => Applied(Ok(OpResult::Done)),
            Command::Placed(placed) => {
                if let Role::Meta(groups) = &self.role {
                    groups.set_replicas(&placed).await;
                }
                Applied(Ok(OpResult::Done))
            }
            Command::Draining(node) => {
                if let Role::Meta(groups) = &self.role {
                    groups.set_draining(node);
                }
                Applied(Ok(OpResult::Done))
            }
            Command::Node(addrs) => {
                if let Role::Meta(groups) = &self.role {
                    groups.set_node(addrs);
                }
                Applied(Ok(OpResult::Done))
            }
            Command::Kafka(addr) => {
                if let Role::Meta(groups) = &self.role {
                    groups.set_kafka(addr);
                }
                Applied(Ok(OpResult::Done))
            }
            Command::Fenced(change) => {
                if let Role::Meta(groups) = &self.role {
                    groups.set_fenced(change);
                }
                Applied(Ok(OpResult::Done))
            }
            Command::Broker(op) => self.apply_op(log_id, op).await,
            Command::Publish(publish) => self.apply_decoded(log_id, publish.into_op()).await,
            Command::AppendRecords(append) => self.apply_decoded(log_id, append.into_op()).await,
            Command::Records(records) => self.apply_entry(log_id, Apply::Records(records)).await,
            Command::RecordBatch(batch) => match batch.decode() {
                Ok(records) => self.apply_entry(log_id, Apply::Records(records)).await,
                Err(error) => Applied(Err(WireError {
                    code: "internal".into(),
                    message: error.to_string(),
                })),
            },
        }
    }

    /// Applies an op decoded from an entry's encoded batch, or answers why it could not be
    /// decoded (every replica decodes the same bytes, so every one answers the same).
    async fn apply_decoded(&mut self, log_id: LogId, decoded: Result<Op, BatchError>) -> Applied {
        match decoded {
            Ok(op) => self.apply_op(log_id, op).await,
            Err(error) => Applied(Err(WireError {
                code: "internal".into(),
                message: error.to_string(),
            })),
        }
    }

    /// Applies a broker op.
    async fn apply_op(&mut self, log_id: LogId, op: Op) -> Applied {
        self.apply_entry(log_id, Apply::Op(op)).await
    }

    /// Applies a broker op or sequenced records; a queue made or deleted opens or closes
    /// its group here.
    async fn apply_entry(&mut self, log_id: LogId, apply: Apply) -> Applied {
        let Some(broker) = &self.broker else {
            return Applied(Ok(OpResult::Done));
        };
        let deleted = match apply.op() {
            Some(Op::DeleteQueue { name }) => Some(name.clone()),
            _ => None,
        };
        let created_name = match apply.op() {
            Some(Op::CreateQueue { name, .. }) => Some((name.clone(), false)),
            Some(Op::CreateSplitQueue { name, .. } | Op::CreateOwnedQueue { name, .. }) => {
                Some((name.clone(), true))
            }
            _ => None,
        };
        if let (Role::Meta(groups), Some(name)) = (&self.role, &deleted) {
            // Stop the queue's group before its data goes.
            groups.close_queue(name).await;
        }
        let result = match self.role.data() {
            Some((queue, part)) => {
                let partitions = broker
                    .queue_settings(queue)
                    .map_or(1, |settings| settings.partitions);
                if let Err(refused) = check_part(&apply, queue, part, partitions) {
                    return Applied(Err(refused));
                }
                // Shared with the queue's other groups; never while one replaces its part.
                let gate = broker.queue_gate(queue);
                let _applying = gate.read().await;
                // What this entry appends carries its term and index, on every replica
                // alike.
                let stamp = Stamp {
                    leader_epoch: log_id.leader_id.term,
                    raft_index: log_id.index,
                    ..Stamp::default()
                };
                match &self.partition_log {
                    Some(log) => apply.note(broker, log, log_id).await,
                    None => {
                        broker.set_stamp(queue, part, stamp);
                        apply.run(broker).await
                    }
                }
            }
            None => apply.run(broker).await,
        };
        if let Role::Meta(groups) = &self.role
            && let (
                Some((name, split)),
                Ok(OpResult::Created {
                    created: true,
                    dead_letter_created,
                }),
            ) = (created_name, &result)
        {
            let id = super::group_id::queue_group_id(log_id.index, split);
            groups.open_queue(&name, id, QueueOpening::Created).await;
            if let Some(dlq) = dead_letter_created {
                groups.open_queue(dlq, id + 1, QueueOpening::Created).await;
            }
        }
        Applied(result.map_err(|e| WireError::from(&e)))
    }

    /// Links the queue's files for a snapshot at the applied point (on the apply task).
    fn capture(&self) -> Option<Result<Captured, String>> {
        let (Some((name, part)), Some(store), Some(broker)) =
            (self.role.data(), &self.store, &self.broker)
        else {
            return None;
        };
        let id = snapshot_id(
            self.last_applied.map_or(0, |l| l.index),
            self.snapshots_built,
        );
        let manifest = Manifest::bare(id, self.last_applied, self.membership.clone());
        let image = match &self.partition_log {
            // The records of the entries up to the applied one, not those written since.
            Some(log) => match self.last_applied.and_then(|l| log.end_of(l.index)) {
                Some(end) => broker.queue_image_until(name, part, end),
                None => {
                    return Some(Err(format!(
                        "no end of the applied entry {:?} in the log",
                        self.last_applied
                    )));
                }
            },
            None => broker.queue_image(name, part),
        };
        Some(
            image
                .map_err(|e| e.to_string())
                .and_then(|image| store.capture(&image, manifest).map_err(|e| e.to_string())),
        )
    }

    /// Completes a captured snapshot on a blocking thread.
    async fn finish(&self, captured: Captured) -> Result<Stored, String> {
        if let (Some((name, _)), Some(broker)) = (self.role.data(), &self.broker) {
            broker
                .flush_queue(name)
                .await
                .map_err(|e| format!("flushing the queue: {e}"))?;
        }
        let store = self.store.clone().ok_or("no snapshot directory")?;
        tokio::task::spawn_blocking(move || store.finish(captured))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// A snapshot without data of the applied point, kept in memory.
    fn build_in_memory(&mut self) -> Result<Snapshot, std::io::Error> {
        let id = snapshot_id(
            self.last_applied.map_or(0, |l| l.index),
            self.snapshots_built,
        );
        let manifest = Manifest::bare(id, self.last_applied, self.membership.clone());
        let bytes = pack_bare(&manifest).map_err(|e| storage_error("building a snapshot", e))?;
        let meta = meta_of(&manifest);
        let id = manifest.snapshot_id;
        *self.in_memory.lock() = Some((meta.clone(), id.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData::memory(&id, bytes),
        })
    }

    fn stored_snapshot(stored: &Stored) -> Result<Snapshot, std::io::Error> {
        let meta = meta_of(&stored.manifest);
        let id = &stored.manifest.snapshot_id;
        let reader = stored
            .reader()
            .map_err(|e| storage_error(&format!("reading snapshot {id}"), e))?;
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData::pack(id, reader),
        })
    }

    /// Installs a received snapshot of a queue group: unpacked and checked on a blocking
    /// thread, then swapped into the broker.
    async fn install_queue(
        &mut self,
        store: SnapshotDir,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), String> {
        let expected = meta.last_log_id;
        let stored = tokio::task::spawn_blocking(move || {
            let (mut reader, received) = snapshot.into_reader().map_err(|e| e.to_string())?;
            let unpacked = store
                .unpack(&mut reader, expected)
                .map_err(|e| e.to_string());
            if let Some(path) = received {
                let _ = std::fs::remove_file(path);
            }
            unpacked
        })
        .await
        .map_err(|e| e.to_string())??;
        self.restore(&stored).await.map_err(|e| e.to_string())?;
        metrics::counter!(SNAPSHOTS_INSTALLED).increment(1);
        tracing::info!(last = ?meta.last_log_id, files = stored.manifest.files.len(), "queue snapshot installed");
        Ok(())
    }
}

/// What an entry asks a group's machine to apply.
enum Apply {
    /// A broker op, applied as the broker applies it ([`Broker::apply_op`]).
    Op(Op),
    /// Records a partition's leader sequenced ([`Command::Records`]), appended as they are
    /// ([`Broker::append_sequenced_local`]).
    Records(PartitionRecords),
}

/// Empties directory `dir` (made if missing).
fn clear_dir(dir: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::create_dir_all(dir)
}

impl Apply {
    /// Applies it where the partition's Raft log is its segment log (`log`), entry
    /// `log_id` written there already: records for the partition are in it, and only
    /// noted ([`Broker::note_stored`]); any other append would write outside the log's
    /// entries, and is refused (only a leader of an earlier release proposes one: upgrade
    /// a cluster's nodes together).
    async fn note(
        self,
        broker: &Broker,
        log: &PartitionLogStore,
        log_id: LogId,
    ) -> Result<OpResult, crate::broker::BrokerError> {
        use crate::broker::BrokerError;
        match self {
            Apply::Records(PartitionRecords {
                queue,
                partition,
                records,
            }) if !records.is_empty() => {
                let (first, _) = log.span_of(log_id.index).ok_or_else(|| {
                    BrokerError::InvalidArgument(format!(
                        "entry {log_id} is not in partition {partition}'s log"
                    ))
                })?;
                let records: Vec<crate::log::Record> =
                    records.into_iter().map(crate::log::Record::from).collect();
                broker
                    .note_stored(&queue, partition, first, &records)
                    .await?;
                Ok(OpResult::Published(vec![(partition, first)]))
            }
            Apply::Op(Op::Publish { .. } | Op::AppendRecords { .. }) => {
                Err(BrokerError::InvalidArgument(
                    "a publish entry of an earlier release reached a partition whose Raft \
                     log is its segment log"
                        .into(),
                ))
            }
            other => other.run(broker).await,
        }
    }

    /// The op, when it is one.
    fn op(&self) -> Option<&Op> {
        match self {
            Apply::Op(op) => Some(op),
            Apply::Records(_) => None,
        }
    }

    /// Applies it to `broker`'s own state.
    async fn run(self, broker: &Broker) -> Result<OpResult, crate::broker::BrokerError> {
        match self {
            Apply::Op(op) => broker.apply_op(op).await,
            Apply::Records(PartitionRecords {
                queue,
                partition,
                records,
            }) => {
                let records = records.into_iter().map(crate::log::Record::from).collect();
                let first = broker
                    .append_sequenced_local(&queue, partition, records)
                    .await?;
                Ok(OpResult::Published(vec![(partition, first)]))
            }
        }
    }
}

/// Refuses an op that is not for `part` of `queue`, a queue of `partitions`: a
/// partition's group takes only appends to its partition (everything else of the queue is
/// its queue group's), and on a queue of several partitions every message of a publish
/// names its partition (the proposer routed it by that, see `cluster::partitions`).
/// Every replica refuses alike; a proposer routes ops so that none is refused.
fn check_part(
    apply: &Apply,
    queue: &str,
    part: DataPart,
    partitions: u32,
) -> Result<(), WireError> {
    let refused = |what: String| WireError {
        code: "internal".into(),
        message: format!("{what} does not belong to this group of queue {queue} ({part:?})"),
    };
    let named: Vec<Option<u32>> = match apply {
        Apply::Records(records) => vec![Some(records.partition)],
        Apply::Op(Op::Publish { messages, .. }) => messages.iter().map(|m| m.partition).collect(),
        Apply::Op(Op::AppendRecords { partition, .. }) => vec![Some(*partition)],
        _ if part.holds_groups() => return Ok(()),
        Apply::Op(other) => return Err(refused(format!("{other:?}"))),
    };
    if part == DataPart::All || (partitions <= 1 && part == DataPart::Head) {
        return Ok(());
    }
    match named
        .into_iter()
        .find(|p| !p.is_some_and(|p| part.holds_partition(p)))
    {
        Some(Some(p)) => Err(refused(format!("partition {p}"))),
        Some(None) => Err(refused("a message without its partition".into())),
        None => Ok(()),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, std::io::Error> {
        if let Some(image) = self.captured_meta.take() {
            return self.build_meta(image).await;
        }
        match self.captured.take() {
            None => self.build_in_memory(),
            Some(captured) => {
                let stored = match captured {
                    Ok(captured) => self.finish(captured).await,
                    Err(error) => Err(error),
                };
                let stored = stored.map_err(|e| {
                    tracing::error!(error = %e, "building a queue snapshot failed");
                    storage_error("building a queue snapshot", e)
                })?;
                metrics::counter!(SNAPSHOTS_BUILT).increment(1);
                tracing::debug!(last = ?stored.manifest.last_log_id, "queue snapshot built");
                Self::stored_snapshot(&stored)
            }
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), std::io::Error> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), std::io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>>
            + Unpin
            + Send,
    {
        while let Some(next) = entries.next().await {
            let (entry, responder) = next?;
            let log_id = entry.log_id;
            let reply = match entry.payload {
                EntryPayload::Blank => Applied(Ok(OpResult::Done)),
                EntryPayload::Membership(membership) => {
                    if let Role::Meta(groups) = &self.role {
                        groups.set_members(&membership);
                    }
                    self.membership = StoredMembership::new(Some(log_id), membership);
                    Applied(Ok(OpResult::Done))
                }
                EntryPayload::Normal(command) => self.apply_command(log_id, command).await,
            };
            if let Err(failed) = &reply.0
                && failed.code == "storage_error"
            {
                // This replica's disk failed, not the entry: the other replicas applied it.
                // Going on would leave this copy without it, so the group stops here
                // (openraft ends it; the node forwards to the replicas that go on) and
                // the entry applies again once the node restarts.
                return Err(std::io::Error::other(format!(
                    "applying entry {log_id}: {}",
                    failed.message
                )));
            }
            self.last_applied = Some(log_id);
            self.applied.fetch_add(1, Ordering::Relaxed);
            if let Some(responder) = responder {
                responder.send(reply);
            }
            // Woken per entry: the stream may wait for more before it ends.
            self.applied_index.advance(log_id.index);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots_built += 1;
        let captured = self.capture();
        let captured_meta = match (&self.role, &self.broker) {
            (Role::Meta(hooks), Some(broker)) => Some(MetaImage::capture(broker, hooks.as_ref())),
            _ => None,
        };
        StateMachine {
            role: self.role.clone(),
            broker: self.broker.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            in_memory: Arc::clone(&self.in_memory),
            store: self.store.clone(),
            snapshots_built: self.snapshots_built,
            applied: Arc::clone(&self.applied),
            applied_index: Arc::clone(&self.applied_index),
            captured,
            meta_dir: self.meta_dir.clone(),
            captured_meta,
            partition_log: self.partition_log.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), std::io::Error> {
        let subject = format!("installing snapshot {}", snapshot.id());
        if let Some(store) = self.store.clone() {
            self.install_queue(store, meta, snapshot)
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "installing a queue snapshot failed");
                    storage_error(&subject, e)
                })?;
        } else {
            let (mut reader, _) = snapshot
                .into_reader()
                .map_err(|e| storage_error(&subject, e))?;
            let manifest = unpack_bare(&mut reader).map_err(|e| storage_error(&subject, e))?;
            let bytes = pack_bare(&manifest).map_err(|e| storage_error(&subject, e))?;
            if matches!(self.role, Role::Meta(_)) {
                // Stored first: a start rebuilds the metadata from this file.
                self.store_meta(&bytes)
                    .await
                    .map_err(|e| storage_error(&subject, e))?;
                self.install_meta(&manifest, bytes.clone())
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "installing a metadata snapshot failed");
                        storage_error(&subject, e)
                    })?;
                metrics::counter!(META_SNAPSHOTS_INSTALLED).increment(1);
                tracing::info!(last = ?meta.last_log_id, "metadata snapshot installed");
            }
            *self.in_memory.lock() = Some((meta.clone(), manifest.snapshot_id, bytes));
        }
        self.applied_up_to(meta.last_log_id);
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, std::io::Error> {
        if let Some(store) = &self.store {
            return store
                .current()
                .as_ref()
                .map(Self::stored_snapshot)
                .transpose();
        }
        Ok(self
            .in_memory
            .lock()
            .as_ref()
            .map(|(meta, id, bytes)| Snapshot {
                meta: meta.clone(),
                snapshot: SnapshotData::memory(id, bytes.clone()),
            }))
    }
}

#[cfg(test)]
mod part_tests {
    use super::*;
    use crate::broker::replicate::WireMessage;

    fn publish(partitions: &[Option<u32>]) -> Apply {
        Apply::Op(Op::Publish {
            queue: "q".into(),
            messages: partitions
                .iter()
                .map(|partition| WireMessage {
                    key: None,
                    headers: Default::default(),
                    content_type: None,
                    body: bytes::Bytes::from_static(b"x"),
                    idempotency_key: None,
                    partition: *partition,
                })
                .collect(),
            now_ms: 0,
        })
    }

    fn records(partition: u32) -> Apply {
        Apply::Records(PartitionRecords {
            queue: "q".into(),
            partition,
            records: Vec::new(),
        })
    }

    /// A partition's group takes only publishes naming its partition; a queue group of a
    /// split queue publishes to partition 0 and everything else; the group of a queue made
    /// before holds everything.
    #[test]
    fn each_group_takes_only_its_part() {
        let ack = Apply::Op(Op::Ack {
            queue: "q".into(),
            group: "g".into(),
            ids: vec![(1, 0)],
        });
        let p1 = DataPart::Partition(1);
        assert!(check_part(&publish(&[Some(1), Some(1)]), "q", p1, 3).is_ok());
        assert!(check_part(&publish(&[Some(1), Some(2)]), "q", p1, 3).is_err());
        assert!(check_part(&publish(&[None]), "q", p1, 3).is_err());
        assert!(check_part(&ack, "q", p1, 3).is_err());
        assert!(check_part(&records(1), "q", p1, 3).is_ok());
        assert!(check_part(&records(2), "q", p1, 3).is_err());
        let head = DataPart::Head;
        assert!(check_part(&publish(&[Some(0)]), "q", head, 3).is_ok());
        assert!(check_part(&publish(&[Some(1)]), "q", head, 3).is_err());
        assert!(check_part(&publish(&[None]), "q", head, 3).is_err());
        assert!(check_part(&publish(&[None]), "q", head, 1).is_ok());
        assert!(check_part(&ack, "q", head, 3).is_ok());
        let all = DataPart::All;
        assert!(check_part(&publish(&[Some(2), None]), "q", all, 3).is_ok());
        assert!(check_part(&ack, "q", all, 3).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use futures_util::future::BoxFuture;
    use openraft::BasicNode;
    use parking_lot::Mutex;

    use super::*;
    use crate::broker::{BrokerConfig, QueueSettings};
    use crate::cluster::types::{Fencing, KafkaAddr, Membership, NodeAddrs, Placed, log_id};

    /// A request waiting for an entry of a group that stops here (its queue deleted) goes
    /// on at once, unapplied; before, it waited out its limit (a publish forwarded while
    /// its queue was deleted through another node was answered after 5 s).
    #[tokio::test]
    async fn closing_an_applied_index_ends_its_waits() {
        let applied = Arc::new(AppliedIndex::default());
        applied.advance(3);
        assert!(applied.wait(3, Duration::ZERO).await);
        let waiter = {
            let applied = Arc::clone(&applied);
            tokio::spawn(async move { applied.wait(10, Duration::from_secs(3600)).await })
        };
        tokio::task::yield_now().await;
        applied.close();
        let ended = tokio::time::timeout(Duration::from_secs(10), waiter).await;
        assert!(!ended.expect("the wait ends when the group stops").unwrap());
        assert!(!applied.wait(11, Duration::from_secs(3600)).await);
        assert!(
            applied.wait(2, Duration::ZERO).await,
            "what was applied stays applied"
        );
    }

    /// Hooks that keep the voters and leaving marks as `Groups` does (a node not among
    /// the voters cannot be marked leaving) and note the voters each queue was opened with.
    #[derive(Default)]
    struct Hooks {
        voters: Mutex<BTreeSet<u64>>,
        draining: Mutex<BTreeSet<u64>>,
        opened: Mutex<Vec<(String, BTreeSet<u64>)>>,
    }

    impl MetaHooks for Hooks {
        fn set_node(&self, _: NodeAddrs) {}
        fn set_members(&self, membership: &Membership) {
            *self.voters.lock() = membership.voter_ids().collect();
        }
        fn open_queue<'a>(&'a self, name: &'a str, _: u64, _: QueueOpening) -> BoxFuture<'a, ()> {
            let voters = self.voters.lock().clone();
            self.opened.lock().push((name.to_string(), voters));
            Box::pin(async {})
        }
        fn set_replicas<'a>(&'a self, _: &'a Placed) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }
        fn set_draining(&self, node: u64) {
            if self.voters.lock().contains(&node) {
                self.draining.lock().insert(node);
            }
        }
        fn close_queue<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }
        fn queue_groups(&self) -> Vec<(String, u64)> {
            Vec::new()
        }
        fn nodes(&self) -> Vec<NodeAddrs> {
            Vec::new()
        }
        fn queue_replicas(&self) -> Vec<Placed> {
            Vec::new()
        }
        fn draining(&self) -> Vec<u64> {
            self.draining.lock().iter().copied().collect()
        }
        fn set_kafka(&self, _: KafkaAddr) {}
        fn kafka_addrs(&self) -> BTreeMap<u64, String> {
            BTreeMap::new()
        }
        fn set_fenced(&self, _: Fencing) {}
        fn replace_fenced(&self, _: &[u64]) {}
        fn fenced(&self) -> Vec<u64> {
            Vec::new()
        }
    }

    /// A metadata snapshot taken after node 4 joined, node 1 left and node 4 was marked
    /// leaving, installed by a node whose voters are its stale `--peers` (1, 2, 3): its
    /// queues are opened against the snapshot's voters and node 4's mark is kept, as on
    /// the nodes that applied those entries (else placement would differ between nodes).
    #[tokio::test]
    async fn a_metadata_snapshot_sets_its_voters_before_its_queues_and_leaving_marks() {
        let temp = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig {
            data_dir: temp.path().join("data"),
            ..BrokerConfig::default()
        })
        .await
        .unwrap();
        let nodes: BTreeMap<u64, BasicNode> = [2, 3, 4]
            .into_iter()
            .map(|id| (id, BasicNode::new(format!("127.0.0.1:710{id}"))))
            .collect();
        let last = log_id(2, 2, 40);
        let mut image = MetaImage {
            draining: vec![4],
            ..MetaImage::default()
        };
        image
            .registry
            .queues
            .insert("q".into(), QueueSettings::default());
        image.groups.insert("q".into(), 20);
        let mut manifest = Manifest::bare(
            snapshot_id(40, 1),
            Some(last),
            StoredMembership::new(Some(last), Membership::from(nodes)),
        );
        manifest.meta = Some(serde_json::to_value(&image).unwrap());
        let meta_dir = temp.path().join("raft");
        std::fs::create_dir_all(&meta_dir).unwrap();
        std::fs::write(meta_dir.join(SNAPSHOT_FILE), pack_bare(&manifest).unwrap()).unwrap();

        let hooks = Arc::new(Hooks::default());
        *hooks.voters.lock() = BTreeSet::from([1, 2, 3]);
        let machine = StateMachine::for_meta(Arc::clone(&hooks) as _, broker, &meta_dir)
            .await
            .unwrap();

        assert_eq!(machine.last_applied, Some(last));
        assert_eq!(
            *hooks.opened.lock(),
            vec![("q".to_string(), BTreeSet::from([2, 3, 4]))]
        );
        assert_eq!(*hooks.draining.lock(), BTreeSet::from([4]));
    }

    /// Records entries are appended as they are, timestamps and keys included, each time
    /// (the leader that proposed them decided about duplicates); records for a partition
    /// the group does not hold are refused and leave the queue alone.
    #[tokio::test]
    async fn records_are_appended_as_they_are() {
        use super::super::types::{Entry, PartitionRecords};
        use crate::broker::ReadFrom;
        use crate::broker::replicate::WireRecord;

        let temp = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig {
            data_dir: temp.path().join("data"),
            ..BrokerConfig::default()
        })
        .await
        .unwrap();
        let broker = Arc::new(broker);
        let mut machine = StateMachine::for_queue(
            Role::Queue("q".into(), DataPart::Head),
            Arc::clone(&broker),
            &temp.path().join("raft"),
            None,
        )
        .await
        .unwrap();
        let create = Op::CreateQueue {
            name: "q".into(),
            settings: QueueSettings {
                partitions: 2,
                ..QueueSettings::default()
            },
        };
        let record = |value: &'static str, ts: i64| WireRecord {
            timestamp_ms: ts,
            key: Some(bytes::Bytes::from_static(b"k")),
            headers: vec![("h".into(), bytes::Bytes::from_static(b"v"))],
            value: bytes::Bytes::from_static(value.as_bytes()),
        };
        let records = |partition, values: &[(&'static str, i64)]| {
            Command::Records(PartitionRecords {
                queue: "q".into(),
                partition,
                records: values.iter().map(|(v, ts)| record(v, *ts)).collect(),
            })
        };
        let entries = [
            Command::Broker(create),
            records(0, &[("a", 5), ("b", 3)]),
            records(0, &[("a", 5)]),
            records(1, &[("elsewhere", 1)]),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, command)| {
            Ok((
                Entry {
                    log_id: log_id(1, 1, i as u64 + 1),
                    payload: EntryPayload::Normal(command),
                },
                None,
            ))
        });
        machine
            .apply(futures_util::stream::iter(entries))
            .await
            .unwrap();
        let read = |partition| {
            broker
                .read_log("q", partition, ReadFrom::Offset(0), 100)
                .unwrap()
                .0
                .into_iter()
                .map(|d| (d.id.offset, d.timestamp_ms, d.key, d.headers, d.body))
                .collect::<Vec<_>>()
        };
        let headers: BTreeMap<String, String> = [("h".to_string(), "v".to_string())].into();
        let got = read(0);
        let want: Vec<_> = [(0, 5, "a"), (1, 3, "b"), (2, 5, "a")]
            .into_iter()
            .map(|(offset, ts, body)| {
                (
                    offset,
                    ts,
                    Some("k".to_string()),
                    headers.clone(),
                    bytes::Bytes::from_static(body.as_bytes()),
                )
            })
            .collect();
        assert_eq!(got, want);
        assert!(read(1).is_empty(), "partition 1 is another group's");
    }

    /// A publish this replica's disk cannot take (the other replicas applied it) stops the
    /// machine before the entry: `apply` fails and the applied point stays where it was,
    /// so the entry applies again at restart instead of this copy going on without it.
    #[tokio::test]
    async fn an_entry_this_replica_cannot_store_stops_the_machine_before_it() {
        use super::super::types::Entry;
        use crate::broker::replicate::WireMessage;
        use crate::storage::SimDisk;

        let disk = SimDisk::new();
        let broker = Broker::open(BrokerConfig {
            data_dir: "/data".into(),
            storage: Arc::new(disk.clone()),
            ..BrokerConfig::default()
        })
        .await
        .unwrap();
        let broker = Arc::new(broker);
        let temp = tempfile::tempdir().unwrap();
        let mut machine = StateMachine::for_queue(
            Role::Queue("q".into(), DataPart::All),
            Arc::clone(&broker),
            temp.path(),
            None,
        )
        .await
        .unwrap();
        let entry = |index: u64, op: Op| Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Normal(Command::Broker(op)),
        };
        let publish = |body: &str| Op::Publish {
            queue: "q".into(),
            messages: vec![WireMessage {
                key: None,
                headers: BTreeMap::new(),
                content_type: None,
                body: bytes::Bytes::from(body.to_string()),
                idempotency_key: None,
                partition: None,
            }],
            now_ms: 1_700_000_000_000,
        };
        let create = Op::CreateQueue {
            name: "q".into(),
            settings: QueueSettings::default(),
        };
        let entries = [entry(1, create), entry(2, publish("kept"))];
        machine
            .apply(futures_util::stream::iter(entries.map(|e| Ok((e, None)))))
            .await
            .unwrap();
        assert_eq!(machine.last_applied, Some(log_id(1, 1, 2)));

        disk.set_space(Some(disk.used() + 10));
        let big = "x".repeat(10_000);
        let failed = machine
            .apply(futures_util::stream::iter([Ok((
                entry(3, publish(&big)),
                None,
            ))]))
            .await;
        let error = failed.expect_err("a publish the disk cannot take stops the machine");
        assert!(error.to_string().contains("entry"), "{error}");
        assert_eq!(machine.last_applied, Some(log_id(1, 1, 2)));
    }
}
