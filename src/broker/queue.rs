//! One queue at run time: its partition logs, its consumer groups (state + journal), the
//! waiters' wake-up signal and the idempotent-publish window.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering as AtomicOrdering,
};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, watch};

use super::alarms;

/// The broker's timer list of groups.
pub type Alarms = alarms::Alarms<Group>;
use super::message::{self, DedupWindow};
use super::settings::QueueSettings;
use super::types::{
    BrokerError, Delivery, GroupInfo, GroupPartitionInfo, GroupSummary, MessageId, NewMessage,
    PartitionInfo, Published, QueueInfo,
};
use crate::clock::Clock;
use crate::group::event::{decode_events, encode_events};
use crate::group::{
    Candidate, Event, GroupConfig, GroupError, GroupState, Outcome, Reason, Snapshot,
};
use crate::journal::{Journal, Ticket};
use crate::log::record::Stamp;
use crate::log::{FsyncObserver, FsyncPolicy, LogConfig, PartitionLog, StoredRecord};
use crate::metrics::{GroupSeries, QueueSeries};
use crate::storage::SharedStorage;

/// A group checkpoints its journal after this many journaled bytes.
const CHECKPOINT_BYTES: u64 = 4 * 1024 * 1024;
/// Bytes a journal frame adds to its payload.
const FRAME_OVERHEAD: u64 = 9;
/// The group every queue has.
pub const DEFAULT_GROUP: &str = "default";
/// Most bytes read from a partition for one lease call.
const LEASE_READ_BYTES: usize = 8 * 1024 * 1024;

/// How one publish spreads its messages without a key over the partitions, in turn.
///
/// Each keyless message of a publish takes the next turn of a counter the queue keeps in
/// memory ([`Queue::next_turn`]), also one that is then not stored (a repeat within the
/// dedup window): on a single node as it appends; in a cluster, on the queue group's
/// leader as it proposes the entry, which carries the turns (`turns`), so that every
/// replica appends each message where the leader counted and a cluster places messages as
/// a single node does. An entry written before leaders took turns carries none: its
/// keyless messages start their turn where every replica can read it from its own data,
/// the number of messages the queue's partitions hold ([`Queue::appended`]). That count
/// also moves with every keyed message, so keyless messages that alternated with keyed
/// ones all fell into the same partition; and a counter kept by each replica would start
/// at 0 whenever the queue was opened (a restored or restarted replica), so the same id
/// would name different messages on different replicas.
struct Spread<'a> {
    /// The turn of each message by index (`None` for keyed messages); empty when a
    /// replicated entry carries none.
    turns: &'a [Option<u32>],
    /// The next turn counted from the log, for an entry without turns (read from the
    /// log when first needed: a publish with turns never needs it).
    from_log: Option<u64>,
}

/// A message that must go to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterJob {
    /// The queue it is in.
    pub queue: String,
    /// The group that gave up on it.
    pub group: String,
    /// Its id.
    pub id: MessageId,
    /// Deliveries it had.
    pub delivery_count: u32,
    /// Why the last one failed.
    pub reason: Reason,
    /// Moves of it tried before and failed (each waits longer before the next).
    pub attempt: u32,
}

/// Leases that ended without an ack (expired or nacked), and what follows from them.
#[derive(Debug, Default)]
pub struct Ended {
    /// Messages out of deliveries: to move to the dead-letter queue.
    pub dead_letters: Vec<DeadLetterJob>,
    /// `(partition, offset, delivery count)` of every lease that ended: a cluster replicates
    /// them, so that a new leader goes on counting.
    pub counts: Vec<(u32, u64, u32)>,
}

impl Ended {
    /// Adds what `other` ended.
    fn append(&mut self, mut other: Ended) {
        self.dead_letters.append(&mut other.dead_letters);
        self.counts.append(&mut other.counts);
    }

    fn push(
        &mut self,
        queue: &Queue,
        group: &Group,
        partition: u32,
        offset: u64,
        outcome: Outcome,
    ) {
        match outcome {
            Outcome::Redeliver { delivery_count, .. } => {
                self.counts.push((partition, offset, delivery_count));
            }
            Outcome::DeadLetter {
                delivery_count,
                reason,
            } => {
                self.counts.push((partition, offset, delivery_count));
                self.dead_letters
                    .push(queue.job(group, partition, offset, delivery_count, reason));
            }
        }
    }
}

/// A consumer group at run time.
pub struct Group {
    /// Group name.
    pub name: String,
    state: Mutex<GroupState>,
    /// On the broker's timer list ([`super::alarms`]).
    armed: AtomicBool,
    alarms: Arc<Alarms>,
    queue: String,
    me: Weak<Group>,
    journal: Journal,
    /// Journaled bytes since the last checkpoint this group asked for.
    journaled: AtomicU64,
    rotation: AtomicUsize,
    /// Set while a cluster leader proposes the group's delete ([`Queue::close_group`]): it
    /// grants no lease meanwhile (the delete drops every lease when it is applied).
    closing: AtomicBool,
    /// The group's counters and histograms, which go with it ([`GroupSeries`]).
    pub series: GroupSeries,
    /// Counts changes that made messages done (acks, dead letters, seeks), for a
    /// receive stream whose credit they free (see [`Group::watch_done`]).
    done: watch::Sender<u64>,
}

/// A group's state, locked; when released with a deadline pending, the group goes on the
/// broker's timer list.
pub struct StateGuard<'a> {
    group: &'a Group,
    state: parking_lot::MutexGuard<'a, GroupState>,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = GroupState;
    fn deref(&self) -> &GroupState {
        &self.state
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut GroupState {
        &mut self.state
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        if !self.group.armed.load(AtomicOrdering::Acquire) && self.state.has_timers() {
            self.group.arm();
        }
    }
}

impl Group {
    /// Locks the state (see [`StateGuard`]).
    fn lock_state(&self) -> StateGuard<'_> {
        StateGuard {
            group: self,
            state: self.state.lock(),
        }
    }

    /// Wakes when messages of this group become done (acked, dead-lettered, sought past),
    /// except by a stream's acks on a single node ([`Queue::ack_many`]'s `tell_streams`):
    /// a stream's credit counts its leases until they are settled, also by a unary ack or
    /// another node's.
    pub fn watch_done(&self) -> watch::Receiver<u64> {
        self.done.subscribe()
    }

    /// Which of `ids` are done for this group (acked, dead-lettered or below its floor).
    pub fn done_among(&self, ids: &[MessageId]) -> Vec<MessageId> {
        let state = self.state.lock();
        ids.iter()
            .copied()
            .filter(|id| state.is_done(id.partition, id.offset))
            .collect()
    }

    /// Tells [`Group::watch_done`]'s watchers that messages became done.
    fn note_done(&self) {
        if self.done.receiver_count() > 0 {
            self.done
                .send_modify(|changes| *changes = changes.wrapping_add(1));
        }
    }

    /// Messages leased and not yet acked, nacked or expired.
    pub fn in_flight(&self) -> usize {
        self.state.lock().in_flight()
    }

    fn arm(&self) {
        if !self.armed.swap(true, AtomicOrdering::AcqRel)
            && let Some(me) = self.me.upgrade()
        {
            self.alarms.arm(&self.queue, me);
        }
    }

    /// Whether this group, taken off the timer list by a timer pass, stays on it: disarms
    /// it, then arms it again if it still has a deadline. True when this call re-armed it
    /// (the caller keeps it); false when it is idle or a concurrent change already put it
    /// back on the list.
    pub fn still_armed(&self) -> bool {
        self.armed.store(false, AtomicOrdering::Release);
        self.has_timers() && !self.armed.swap(true, AtomicOrdering::AcqRel)
    }

    /// True while a lease or a delayed redelivery is pending.
    pub fn has_timers(&self) -> bool {
        self.state.lock().has_timers()
    }

    /// Appends events to the journal; checkpoints when it has grown. Call with the state
    /// locked so that journal order is state order.
    fn journal(&self, state: &GroupState, events: &[Event]) -> Option<Ticket> {
        if events.is_empty() {
            return None;
        }
        let entry = encode_events(events);
        let size = entry.len() as u64 + FRAME_OVERHEAD;
        let ticket = self.journal.append(vec![entry]);
        if self.journaled.fetch_add(size, AtomicOrdering::Relaxed) + size > CHECKPOINT_BYTES {
            self.journaled.store(0, AtomicOrdering::Relaxed);
            // A failed checkpoint leaves the previous journal in place: nothing is lost.
            let _ = self.journal.checkpoint(state.snapshot().encode());
        }
        Some(ticket)
    }

    /// The earliest time (ms) this group changes by itself.
    pub fn next_wakeup(&self) -> Option<i64> {
        self.state.lock().next_wakeup()
    }
}

/// A file of a queue's data as an image of the queue names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    /// Path relative to the queue's directory (`{partition}/{file}`).
    pub relative: PathBuf,
    /// The live file.
    pub path: PathBuf,
    /// Bytes that belong to the image (an active segment grows past it).
    pub len: u64,
    /// Never modified in place (a sealed segment and its indexes): may be hard-linked.
    pub immutable: bool,
}

/// A queue's data at one instant: its segment files and each group's state as a journal
/// file holding one checkpoint. Taken while nothing appends (a cluster takes it between
/// two applies); the files are only named, the caller links or copies them at once.
#[derive(Debug, Clone, Default)]
pub struct QueueImage {
    /// Segment files, partition by partition, oldest first. The active segment's indexes
    /// are left out (opening rebuilds them).
    pub files: Vec<ImageFile>,
    /// `(relative path, bytes)` of each group journal.
    pub journals: Vec<(PathBuf, Vec<u8>)>,
}

/// The part of a queue's data that one cluster group replicates: the queue group holds
/// partition 0 and the state of every consumer group, each further partition has a group
/// of its own (see `cluster::groups::QueueGroup`). A snapshot of a group carries its part
/// ([`Queue::image`]), and installing one replaces only that part
/// ([`super::Broker::replace_queue_data`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPart {
    /// Everything: every partition and every group.
    All,
    /// Partition 0 and the groups' state.
    Head,
    /// One partition after the first, messages only.
    Partition(u32),
}

impl DataPart {
    /// The part of a queue's data that the cluster group of `partition` holds.
    pub fn of_partition(partition: u32) -> Self {
        match partition {
            0 => Self::Head,
            p => Self::Partition(p),
        }
    }

    /// True when the part holds partition `p`.
    pub fn holds_partition(self, p: u32) -> bool {
        match self {
            Self::All => true,
            Self::Head => p == 0,
            Self::Partition(mine) => mine == p,
        }
    }

    /// True when the part holds the groups' state.
    pub fn holds_groups(self) -> bool {
        !matches!(self, Self::Partition(_))
    }

    /// The directories of the part, relative to the queue's directory (`None`: the whole
    /// directory).
    pub fn dirs(self) -> Option<Vec<PathBuf>> {
        match self {
            Self::All => None,
            Self::Head => Some(vec![PathBuf::from("0"), PathBuf::from("groups")]),
            Self::Partition(p) => Some(vec![PathBuf::from(p.to_string())]),
        }
    }
}

/// One queue.
pub struct Queue {
    /// Queue name.
    pub name: String,
    /// Its settings.
    pub settings: QueueSettings,
    dir: PathBuf,
    fsync: FsyncPolicy,
    storage: SharedStorage,
    /// Partition logs, by partition number.
    pub partitions: Vec<PartitionLog>,
    groups: RwLock<BTreeMap<String, Arc<Group>>>,
    /// Serializes group creation.
    group_creation: Mutex<()>,
    /// Woken on publish, redelivery, freed keys, shutdown and delete.
    pub notify: Notify,
    /// Where the next message without a key goes: on a single node as it appends, on a
    /// cluster leader as it proposes (see [`Spread`]).
    round_robin: AtomicU32,
    /// The idempotency keys of the dedup window, read back from the log by the first
    /// publish with a key (a queue never given one never reads its log for them): one
    /// window for the whole queue (`None`, a single node's publishes) and one per
    /// partition (a cluster's publishes and the Kafka adapter's appends, see
    /// [`DedupScope`]).
    dedup: tokio::sync::Mutex<HashMap<Option<u32>, DedupWindow>>,
    deleted: AtomicBool,
    /// Where "now" comes from.
    clock: Clock,
    /// The queue's counters and histograms, which go with it ([`QueueSeries`]).
    pub series: QueueSeries,
    /// The broker's timer list, for this queue's groups.
    alarms: Arc<Alarms>,
}

fn storage(path: &Path) -> impl FnOnce(std::io::Error) -> BrokerError + '_ {
    move |source| BrokerError::Storage {
        path: path.to_path_buf(),
        source,
    }
}

/// What a broker opens each of its queues with, the same for all of them.
#[derive(Clone)]
pub struct QueueEnv {
    /// The directory holding the queues' directories.
    pub root: PathBuf,
    /// When appends are synced.
    pub fsync: FsyncPolicy,
    /// The file system the queues' files are on.
    pub storage: SharedStorage,
    /// Where "now" comes from.
    pub clock: Clock,
    /// The broker's timer list, for the queues' groups.
    pub alarms: Arc<Alarms>,
}

impl Queue {
    /// Opens (or creates) the queue's directory under `env.root`.
    pub fn open(env: &QueueEnv, name: &str, settings: QueueSettings) -> Result<Self, BrokerError> {
        Self::open_keeping(env, name, settings, Vec::new())
    }

    /// [`Self::open`], taking over the open logs `kept` names by partition (`None`, or
    /// past its end: opened here) instead of opening their directories again: a cluster
    /// replica replacing its queue group's part of the queue keeps the partitions other
    /// groups write ([`DataPart::Head`]).
    pub fn open_keeping(
        env: &QueueEnv,
        name: &str,
        settings: QueueSettings,
        mut kept: Vec<Option<PartitionLog>>,
    ) -> Result<Self, BrokerError> {
        let QueueEnv {
            root,
            fsync,
            storage,
            clock,
            alarms,
        } = env.clone();
        let dir = crate::name::child(&root, name, "")?;
        let log_config = LogConfig {
            storage: Arc::clone(&storage),
            segment_bytes: settings.segment_bytes,
            fsync,
            on_fsync: Some(FsyncObserver::new(|took| {
                crate::metrics::observe_seconds(crate::metrics::FSYNC_LATENCY, took.as_secs_f64());
            })),
            ..LogConfig::default()
        };
        kept.resize(settings.partitions as usize, None);
        let partitions = kept
            .into_iter()
            .enumerate()
            .map(|(p, kept)| match kept {
                Some(log) => Ok(log),
                None => PartitionLog::open(&dir.join(p.to_string()), log_config.clone()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue = Self {
            name: name.to_string(),
            settings,
            dir,
            fsync,
            storage,
            partitions,
            groups: RwLock::new(BTreeMap::new()),
            group_creation: Mutex::new(()),
            notify: Notify::new(),
            round_robin: AtomicU32::new(0),
            dedup: tokio::sync::Mutex::new(HashMap::new()),
            deleted: AtomicBool::new(false),
            clock,
            series: QueueSeries::default(),
            alarms,
        };
        queue.load_groups()?;
        queue.group_or_create(DEFAULT_GROUP)?;
        Ok(queue)
    }

    /// Sets the stamp (Raft term and index) of the batches appended from now on to the
    /// partitions `part` holds ([`PartitionLog::set_stamp`]).
    pub fn set_stamp(&self, part: DataPart, stamp: Stamp) {
        for (p, log) in self.partitions.iter().enumerate() {
            if u32::try_from(p).is_ok_and(|p| part.holds_partition(p)) {
                log.set_stamp(stamp);
            }
        }
    }

    /// Replaces the records of partition `partition` with what `fill` writes into the
    /// queue's directory (a cluster replica installing a snapshot of that partition's
    /// group), keeping the consumer groups, their leases and the other partitions as they
    /// are. The partition's dedup window is read back from the new records by the next
    /// publish with a key; waiting receives look again.
    pub async fn replace_partition<F>(&self, partition: u32, fill: F) -> Result<(), BrokerError>
    where
        F: FnOnce(&Path) -> std::io::Result<()> + Send + 'static,
    {
        let log = usize::try_from(partition)
            .ok()
            .and_then(|p| self.partitions.get(p))
            .cloned()
            .ok_or_else(|| {
                BrokerError::InvalidArgument(format!(
                    "queue {} has no partition {partition}",
                    self.name
                ))
            })?;
        // Held across the swap: no publish looks a key up in the old records' window.
        let mut windows = self.dedup.lock().await;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || log.replace(|_| fill(&dir)))
            .await
            .map_err(|e| {
                BrokerError::InvalidArgument(format!("replacing a partition failed: {e}"))
            })??;
        windows.remove(&Some(partition));
        drop(windows);
        self.notify.notify_waiters();
        Ok(())
    }

    fn groups_dir(&self) -> PathBuf {
        self.dir.join("groups")
    }

    fn group_config(&self) -> GroupConfig {
        GroupConfig {
            max_deliveries: self.settings.max_deliveries,
            backoff_secs: self.settings.backoff.clone(),
            max_in_flight: self.settings.max_in_flight,
            ordering: self.settings.ordering,
        }
    }

    fn load_groups(&self) -> Result<(), BrokerError> {
        let dir = self.groups_dir();
        let entries = match self.storage.read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(storage(&dir)(e)),
        };
        for path in entries {
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".journal"))
            else {
                continue;
            };
            if crate::name::is_valid(name) {
                self.open_group(name)?;
            } else {
                tracing::warn!(queue = %self.name, file = %path.display(), "ignoring a group journal whose name is not a valid group name");
            }
        }
        Ok(())
    }

    /// Opens a group's journal and rebuilds its state.
    fn open_group(&self, name: &str) -> Result<Arc<Group>, BrokerError> {
        let path = crate::name::child(&self.groups_dir(), name, ".journal")?;
        let (journal, replay) = Journal::open(Arc::clone(&self.storage), &path, self.fsync)?;
        let corrupt = |reason: String| BrokerError::Corrupt {
            path: path.clone(),
            reason,
        };
        let starts: Vec<u64> = self
            .partitions
            .iter()
            .map(PartitionLog::first_offset)
            .collect();
        let mut state = match &replay.checkpoint {
            Some(bytes) => {
                let snapshot = Snapshot::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
                GroupState::restore(self.group_config(), &snapshot, &starts)
            }
            None => GroupState::new(self.group_config(), &starts),
        };
        for entry in &replay.entries {
            for event in decode_events(entry).map_err(|e| corrupt(e.to_string()))? {
                state.apply(&event);
            }
        }
        state.reset_after_restart();
        let mut cut = false;
        for (p, log) in self.partitions.iter().enumerate() {
            state.skip_to(p as u32, log.first_offset());
            cut |= state.cut_to(p as u32, log.next_offset());
        }
        state.end_interrupted_deliveries();
        if cut {
            // The log lost a tail this group had seen (and maybe acked): what it knew of
            // those offsets must not stick to the messages stored there next.
            tracing::warn!(queue = %self.name, group = name, "the group had seen offsets past the end of the recovered log: forgetting them");
            journal.checkpoint_now(&state.snapshot().encode())?;
        }
        let group = Arc::new_cyclic(|me| Group {
            name: name.to_string(),
            state: Mutex::new(state),
            armed: AtomicBool::new(false),
            alarms: Arc::clone(&self.alarms),
            queue: self.name.clone(),
            me: Weak::clone(me),
            journal,
            journaled: AtomicU64::new(0),
            rotation: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            series: GroupSeries::default(),
            done: watch::channel(0).0,
        });
        // A restarted group may hold redeliveries: the timer must see it.
        drop(group.lock_state());
        self.groups
            .write()
            .insert(name.to_string(), Arc::clone(&group));
        if self.is_deleted() {
            // Made while the queue was being deleted: see `mark_deleted`.
            group.journal.close();
        }
        Ok(group)
    }

    /// A group, if it exists.
    pub fn group(&self, name: &str) -> Option<Arc<Group>> {
        self.groups.read().get(name).cloned()
    }

    /// A group, created (starting at the earliest retained offsets) if needed.
    pub fn group_or_create(&self, name: &str) -> Result<Arc<Group>, BrokerError> {
        self.group_or_create_within(name, usize::MAX)
    }

    /// [`Self::group_or_create`], refusing to create a group beyond `max_groups`
    /// ([`BrokerError::LimitReached`]); existing groups are always returned.
    pub fn group_or_create_within(
        &self,
        name: &str,
        max_groups: usize,
    ) -> Result<Arc<Group>, BrokerError> {
        if let Some(group) = self.group(name) {
            return Ok(group);
        }
        crate::name::check(name)?;
        let _creating = self.group_creation.lock();
        if let Some(group) = self.group(name) {
            return Ok(group);
        }
        if self.groups.read().len() >= max_groups {
            return Err(BrokerError::LimitReached(format!(
                "at most {max_groups} groups on queue `{}`",
                self.name
            )));
        }
        self.open_group(name)
    }

    /// Deletes group `name`: its state and journal go, so it no longer counts against the
    /// queue's group limit or holds back retention, and the next receive under the name
    /// starts a new group at the earliest retained message. Group `default`, which every
    /// queue has, starts again at once as a new group. With `only_idle`, a group
    /// with leases in flight is refused ([`BrokerError::GroupInUse`]) and a missing one
    /// is [`BrokerError::GroupNotFound`]; without it (a replica applying a delete its
    /// leader checked) a missing group is no error and its leases are dropped.
    pub fn remove_group(&self, name: &str, only_idle: bool) -> Result<(), BrokerError> {
        let _creating = self.group_creation.lock();
        let Some(group) = self.group(name) else {
            if only_idle {
                return Err(BrokerError::GroupNotFound {
                    queue: self.name.clone(),
                    group: name.to_string(),
                });
            }
            return Ok(());
        };
        {
            // Under the state lock, so that no lease is granted between the check and
            // the removal (a receive holding the old group sees it gone, see `is_current`).
            let state = group.lock_state();
            if only_idle {
                self.refuse_in_flight(name, state.in_flight())?;
            }
            self.groups.write().remove(name);
        }
        // Receives waiting on the old group go on with a new one of the name.
        self.notify.notify_waiters();
        group.journal.close();
        let dir = self.groups_dir();
        let path = crate::name::child(&dir, name, ".journal")?;
        match self.storage.remove(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(storage(&path)(e)),
        }
        match self.storage.sync_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(storage(&dir)(e)),
            _ => {}
        }
        if name == DEFAULT_GROUP {
            // Every queue has it: deleting it starts it again, as a new group.
            self.open_group(DEFAULT_GROUP)?;
        }
        Ok(())
    }

    /// Closes group `name` for a delete that a cluster leader is about to propose: refused
    /// while it has messages in flight (as [`Self::remove_group`] with `only_idle`), else
    /// it grants no lease until it is removed or [`Self::reopen_group`] (a lease granted
    /// between this check and the delete's apply would be dropped with the group).
    pub fn close_group(&self, name: &str) -> Result<Arc<Group>, BrokerError> {
        let group = self.group(name).ok_or_else(|| BrokerError::GroupNotFound {
            queue: self.name.clone(),
            group: name.to_string(),
        })?;
        let state = group.lock_state();
        self.refuse_in_flight(name, state.in_flight())?;
        group.closing.store(true, AtomicOrdering::Relaxed);
        drop(state);
        Ok(group)
    }

    /// Lets a group closed by [`Self::close_group`] grant leases again (its delete did not
    /// go through), and wakes the receives that wait on the queue.
    pub fn reopen_group(&self, group: &Group) {
        group.closing.store(false, AtomicOrdering::Relaxed);
        self.notify.notify_waiters();
    }

    /// Refuses deleting group `name` while `in_flight` of its messages are leased
    /// ([`BrokerError::GroupInUse`]).
    pub fn refuse_in_flight(&self, name: &str, in_flight: usize) -> Result<(), BrokerError> {
        if in_flight == 0 {
            return Ok(());
        }
        Err(BrokerError::GroupInUse {
            queue: self.name.clone(),
            group: name.to_string(),
            in_flight: in_flight as u64,
        })
    }

    /// True while `group` is the queue's group of its name (not deleted, not replaced by
    /// a new group of the same name).
    pub fn is_current(&self, group: &Group) -> bool {
        self.group(&group.name)
            .is_some_and(|current| std::ptr::eq(Arc::as_ptr(&current), group))
    }

    /// All groups.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.read().values().cloned().collect()
    }

    /// The lowest ack floor of all groups on `partition` (`None` without groups).
    pub fn min_group_floor(&self, partition: u32) -> Option<u64> {
        self.groups()
            .iter()
            .map(|g| g.lock_state().floor(partition))
            .min()
    }

    /// Moves every group whose floor fell below a partition's first offset up to it.
    pub fn skip_groups_to_start(&self) {
        for group in self.groups() {
            let mut state = group.lock_state();
            for (p, log) in self.partitions.iter().enumerate() {
                let skipped = state.skip_to(p as u32, log.first_offset());
                if skipped > 0 {
                    group.series.retention_skipped.increment(skipped);
                }
            }
        }
    }

    /// Marks the queue deleted, closes its logs and journals (so that work still in flight
    /// cannot create its directory again once it is removed) and wakes its waiters.
    pub fn mark_deleted(&self) {
        self.mark_deleted_in(DataPart::All);
    }

    /// [`Self::mark_deleted`], closing only the logs of the partitions `part` holds (the
    /// others are taken over by the queue opened in its place, [`Self::open_keeping`]).
    pub fn mark_deleted_in(&self, part: DataPart) {
        self.deleted.store(true, AtomicOrdering::Release);
        for (p, log) in self.partitions.iter().enumerate() {
            if part.holds_partition(p as u32) {
                log.close();
            }
        }
        for group in self.groups() {
            group.journal.close();
        }
        self.notify.notify_waiters();
    }

    /// True once deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(AtomicOrdering::Acquire)
    }

    /// The queue's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The dedup window of `scope` (a partition, or the whole queue: `None`), locked; read
    /// back from the log (as of `now_ms`) the first time.
    pub(super) async fn dedup_window(
        &self,
        scope: Option<u32>,
        now_ms: i64,
    ) -> Result<tokio::sync::MappedMutexGuard<'_, DedupWindow>, BrokerError> {
        let mut windows = self.dedup.lock().await;
        if let std::collections::hash_map::Entry::Vacant(vacant) = windows.entry(scope) {
            vacant.insert(self.rebuild_dedup(scope, now_ms)?);
        }
        Ok(tokio::sync::MutexGuard::map(windows, |w| {
            w.entry(scope).or_default()
        }))
    }

    /// The dedup window of `scope` as of `now_ms`, read back from the log.
    fn rebuild_dedup(&self, scope: Option<u32>, now_ms: i64) -> Result<DedupWindow, BrokerError> {
        let mut window = DedupWindow::default();
        let since = now_ms - self.settings.dedup_window as i64 * 1000;
        for (p, log) in self.partitions.iter().enumerate() {
            if scope.is_some_and(|scope| scope as usize != p) {
                continue;
            }
            let Some(mut from) = log.offset_for_timestamp(since)? else {
                continue;
            };
            loop {
                let records = log.read(from, 1024, 16 * 1024 * 1024)?;
                let Some(last) = records.last() else { break };
                from = last.offset + 1;
                for record in &records {
                    if let Some(key) = message::idempotency_key(record) {
                        let id = MessageId {
                            partition: p as u32,
                            offset: record.offset,
                        };
                        window.insert(key, id, record.timestamp_ms);
                    }
                }
            }
        }
        Ok(window)
    }

    /// The dedup window a publish looks its idempotency keys up in: a single node's
    /// (`replicated` false) the whole queue's; a replicated publish's the window of its
    /// partition when all of its messages go to one (as every publish of a cluster does:
    /// each partition's group applies its own publishes, in an order no other partition's
    /// applies on a replica keep, so a window across partitions would decide differently
    /// on each replica), else the whole queue's (entries written before).
    fn dedup_scope(
        &self,
        messages: &[NewMessage],
        replicated: bool,
        turns: &[Option<u32>],
    ) -> Option<u32> {
        if !replicated {
            return None;
        }
        let mut partitions = messages
            .iter()
            .enumerate()
            .map(|(i, m)| self.named_partition(i, m, turns));
        let first = partitions.next().flatten()?;
        partitions.all(|p| p == Some(first)).then_some(first)
    }

    /// The partition that `message`, the `index`th of its publish, is bound to: its key's
    /// hash, else its proposer's turn (`turns`), else its idempotency key's hash (a retry
    /// lands where the first try did, and that partition's window knows it); `None`: it
    /// goes in turn.
    fn named_partition(
        &self,
        index: usize,
        message: &NewMessage,
        turns: &[Option<u32>],
    ) -> Option<u32> {
        let n = self.partitions.len() as u32;
        let hash = |key: &String| message::partition_for_key(key.as_bytes(), n);
        message
            .key
            .as_ref()
            .map(hash)
            .or(turns.get(index).copied().flatten())
            .or(message.idempotency_key.as_ref().map(hash))
    }

    /// The partition of `message`, the `index`th of its publish: by its key's hash, else
    /// the next one in turn.
    fn partition_for(&self, index: usize, message: &NewMessage, spread: &mut Spread) -> u32 {
        if let Some(partition) = self.named_partition(index, message, spread.turns) {
            return partition;
        }
        let n = self.partitions.len() as u32;
        let next = spread.from_log.get_or_insert_with(|| self.appended());
        let partition = (*next % u64::from(n.max(1))) as u32;
        *next += 1;
        partition
    }

    /// The partition of the next message without a key, in turn: a single node's publish
    /// takes it as it appends, a cluster's leader as it proposes (see [`Spread`]).
    pub fn next_turn(&self) -> u32 {
        let n = self.partitions.len() as u32;
        self.round_robin.fetch_add(1, AtomicOrdering::Relaxed) % n.max(1)
    }

    /// Messages appended to the queue so far: the sum of its partitions' next offsets
    /// (retention and compaction do not lower it).
    fn appended(&self) -> u64 {
        self.partitions.iter().map(|log| log.next_offset()).sum()
    }

    /// Appends `records` to partition `partition` as one run, once per `key` within the
    /// dedup window as of `now_ms` (a replicated append carries its proposer's clock): a
    /// key seen there answers the offset its first append got and stores nothing. The key
    /// is kept as the first record's idempotency header and remembered at that record's
    /// own timestamp, which is what a window rebuilt from the log (after a restart, on
    /// any replica) reads back, so every replica decides alike. (A batch stamped by its
    /// producer more than the window in the past is therefore never matched.)
    pub async fn append_once(
        &self,
        partition: u32,
        mut records: Vec<crate::log::Record>,
        key: &str,
        now_ms: i64,
    ) -> Result<u64, BrokerError> {
        let log = self.partitions.get(partition as usize).ok_or_else(|| {
            BrokerError::InvalidArgument(format!(
                "queue `{}` has no partition {partition}",
                self.name
            ))
        })?;
        let window_ms = self.settings.dedup_window as i64 * 1000;
        let mut window = self.dedup_window(Some(partition), now_ms).await?;
        if let Some(id) = window.get(key, now_ms, window_ms) {
            return Ok(id.offset);
        }
        if let Some(first) = records.first_mut() {
            first.headers.push((
                message::IDEMPOTENCY_HEADER.to_string(),
                bytes::Bytes::copy_from_slice(key.as_bytes()),
            ));
        }
        let stamped = records.first().map_or(now_ms, |r| r.timestamp_ms);
        let first = log.append(records).await?;
        window.insert(
            key.to_string(),
            MessageId {
                partition,
                offset: first,
            },
            stamped,
        );
        Ok(first)
    }

    /// Appends messages: one batch per partition; a repeated idempotency key within the
    /// dedup window returns the first message's id and stores nothing.
    pub async fn publish(&self, messages: Vec<NewMessage>) -> Result<Vec<Published>, BrokerError> {
        self.publish_at(messages, None).await
    }

    /// [`Self::publish`] stamped with `now_ms` when given (a replicated publish carries the
    /// proposer's clock so that every replica stores the same timestamps and makes the same
    /// dedup decisions), else with the clock's now.
    pub async fn publish_at(
        &self,
        messages: Vec<NewMessage>,
        now_ms: Option<i64>,
    ) -> Result<Vec<Published>, BrokerError> {
        self.publish_placed(messages, now_ms, &[]).await
    }

    /// [`Self::publish_at`] where a replicated publish (`now_ms` given) puts the `i`th
    /// message without a key in partition `turns[i]` when that is given: its proposer's
    /// turn (see [`Spread`]). A turn past the queue's partitions refuses the publish.
    pub async fn publish_placed(
        &self,
        messages: Vec<NewMessage>,
        now_ms: Option<i64>,
        turns: &[Option<u32>],
    ) -> Result<Vec<Published>, BrokerError> {
        if self.is_deleted() {
            return Err(BrokerError::QueueNotFound(self.name.clone()));
        }
        self.check_sizes(&messages)?;
        let now = now_ms.unwrap_or_else(|| self.clock.now_ms());
        let window_ms = self.settings.dedup_window as i64 * 1000;
        let mut dedup = if messages.iter().any(|m| m.idempotency_key.is_some()) {
            let scope = self.dedup_scope(&messages, now_ms.is_some(), turns);
            Some(self.dedup_window(scope, now).await?)
        } else {
            None
        };
        let mut results: Vec<Option<MessageId>> = vec![None; messages.len()];
        let mut same_as: Vec<Option<usize>> = vec![None; messages.len()];
        let mut first_with_key: HashMap<&str, usize> = HashMap::new();
        let mut by_partition: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        let partitions = self.partitions.len();
        if let Some(turn) = turns.iter().flatten().find(|t| **t as usize >= partitions) {
            return Err(BrokerError::InvalidArgument(format!(
                "a publish names partition {turn}, but queue {} has {partitions}",
                self.name
            )));
        }
        let local_turns: Vec<Option<u32>>;
        let turns = match now_ms {
            Some(_) => turns,
            None => {
                local_turns = messages
                    .iter()
                    .map(|m| {
                        (m.key.is_none() && m.idempotency_key.is_none()).then(|| self.next_turn())
                    })
                    .collect();
                &local_turns
            }
        };
        let mut spread = Spread {
            turns,
            from_log: None,
        };
        for (i, m) in messages.iter().enumerate() {
            if let (Some(key), Some(window)) = (m.idempotency_key.as_deref(), dedup.as_mut()) {
                if let Some(id) = window.get(key, now, window_ms) {
                    results[i] = Some(id);
                    continue;
                }
                if let Some(&first) = first_with_key.get(key) {
                    same_as[i] = Some(first);
                    continue;
                }
                first_with_key.insert(key, i);
            }
            by_partition
                .entry(self.partition_for(i, m, &mut spread))
                .or_default()
                .push(i);
        }
        let appends = by_partition.iter().map(|(p, indices)| {
            let records = indices
                .iter()
                .map(|i| message::to_record(&messages[*i], now))
                .collect();
            let log = &self.partitions[*p as usize];
            async move { log.append(records).await.map(|first| (*p, first)) }
        });
        let firsts = match futures_util::future::try_join_all(appends).await {
            Ok(firsts) => firsts,
            // Deleted while this publish ran: its logs were closed.
            Err(_) if self.is_deleted() => {
                return Err(BrokerError::QueueNotFound(self.name.clone()));
            }
            Err(error) => return Err(error.into()),
        };
        for ((_, indices), (p, first)) in by_partition.iter().zip(firsts) {
            for (k, i) in indices.iter().enumerate() {
                results[*i] = Some(MessageId {
                    partition: p,
                    offset: first + k as u64,
                });
            }
        }
        for (i, first) in same_as.iter().enumerate() {
            if let Some(first) = first {
                results[i] = results[*first];
            }
        }
        if let Some(window) = dedup.as_mut() {
            for (key, i) in first_with_key {
                if let Some(id) = results[i] {
                    window.insert(key.to_string(), id, now);
                }
            }
        }
        drop(dedup);
        self.notify.notify_waiters();
        // Messages stored: a repeat of a key within the dedup window stores nothing.
        let stored: usize = by_partition.values().map(Vec::len).sum();
        self.series.published.increment(stored as u64);
        Ok(results
            .into_iter()
            .flatten()
            .map(|id| Published {
                id,
                partition: id.partition,
                offset: id.offset,
            })
            .collect())
    }

    /// Refuses a publish with a body larger than the queue's `max_message_bytes`.
    pub(super) fn check_sizes(&self, messages: &[NewMessage]) -> Result<(), BrokerError> {
        let limit = self.settings.max_message_bytes;
        match messages
            .iter()
            .map(|m| m.body.len() as u64)
            .find(|size| *size > limit)
        {
            Some(size) => Err(BrokerError::MessageTooLarge { size, limit }),
            None => Ok(()),
        }
    }

    /// Ends expired leases of `group`; returns what ended.
    pub fn expire(&self, group: &Group, now: i64) -> Ended {
        let expired = group.lock_state().expire(now);
        if !expired.is_empty() {
            group.series.expired.increment(expired.len() as u64);
        }
        let mut ended = Ended::default();
        for e in expired {
            ended.push(self, group, e.partition, e.offset, e.outcome);
        }
        ended
    }

    fn job(
        &self,
        group: &Group,
        partition: u32,
        offset: u64,
        delivery_count: u32,
        reason: Reason,
    ) -> DeadLetterJob {
        DeadLetterJob {
            queue: self.name.clone(),
            group: group.name.clone(),
            id: MessageId { partition, offset },
            delivery_count,
            reason,
            attempt: 0,
        }
    }

    /// Leases up to `max` messages for `group`, visiting partitions round-robin.
    pub fn lease(
        &self,
        group: &Group,
        max: usize,
        visibility_ms: i64,
    ) -> Result<(Vec<Delivery>, Ended), BrokerError> {
        let now = self.clock.now_ms();
        let ended = self.expire(group, now);
        let n = self.partitions.len();
        let start = group.rotation.fetch_add(1, AtomicOrdering::Relaxed);
        let mut out = Vec::new();
        let mut refetch = Vec::new();
        let mut state = group.lock_state();
        if group.closing.load(AtomicOrdering::Relaxed) || !self.is_current(group) {
            // Removed (a receive that held it on the way here goes on with the new group
            // of the name), or about to be: no lease that would be dropped with it.
            return Ok((Vec::new(), ended));
        }
        let mut events = Vec::new();
        for i in 0..n {
            let p = ((start + i) % n) as u32;
            let remaining = max.saturating_sub(out.len() + refetch.len());
            if remaining == 0 || state.capacity() == 0 {
                break;
            }
            let log = &self.partitions[p as usize];
            let skipped = state.skip_to(p, log.first_offset());
            if skipped > 0 {
                group.series.retention_skipped.increment(skipped);
            }
            let records = self.candidates(&state, p, remaining)?;
            let fresh: Vec<Candidate> = records
                .iter()
                .map(|r| Candidate {
                    offset: r.offset,
                    key: r.key.as_deref().map(message::key_hash),
                })
                .collect();
            let (grants, leased) = state
                .lease(p, now, visibility_ms, remaining, &fresh)
                .map_err(|e| self.group_error(p, e))?;
            events.extend(leased);
            let mut by_offset: HashMap<u64, StoredRecord> =
                records.into_iter().map(|r| (r.offset, r)).collect();
            for grant in grants {
                match by_offset.remove(&grant.offset) {
                    Some(record) => out.push(message::to_delivery(
                        &self.name,
                        p,
                        record,
                        grant.delivery_count,
                    )),
                    None => refetch.push(grant),
                }
            }
        }
        let _ = group.journal(&state, &events);
        drop(state);
        for grant in refetch {
            let log = &self.partitions[grant.partition as usize];
            if let Some(record) = log
                .read(grant.offset, 1, usize::MAX)?
                .into_iter()
                .find(|r| r.offset == grant.offset)
            {
                out.push(message::to_delivery(
                    &self.name,
                    grant.partition,
                    record,
                    grant.delivery_count,
                ));
            }
        }
        self.count_deliveries(group, &out);
        Ok((out, ended))
    }

    /// Records from the group's cursor that may be leased now.
    fn candidates(
        &self,
        state: &GroupState,
        partition: u32,
        remaining: usize,
    ) -> Result<Vec<StoredRecord>, BrokerError> {
        let log = &self.partitions[partition as usize];
        let cursor = state.cursor(partition);
        if cursor >= log.next_offset() {
            return Ok(Vec::new());
        }
        let want = match self.settings.ordering {
            // Look ahead past busy keys, within bounds.
            super::settings::Ordering::Key => remaining.saturating_mul(8).clamp(64, 4096),
            super::settings::Ordering::None => remaining,
        };
        Ok(log.read(cursor, want, LEASE_READ_BYTES)?)
    }

    /// The messages of `partition` in `from..end` that `group` has not done (acked or
    /// dead-lettered), also those leased or waiting, read without leasing: up to `max`
    /// records looked at from `from` (or the group's floor, or the log's start, whichever
    /// is later). Returns them and where to go on; `end` when nothing is left below it.
    pub fn not_done(
        &self,
        group: &Group,
        partition: u32,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<(Vec<Delivery>, u64), BrokerError> {
        let log = self
            .partitions
            .get(partition as usize)
            .ok_or_else(|| self.group_error(partition, GroupError::NoPartition(partition)))?;
        let floor = group.lock_state().floor(partition);
        let start = from.max(floor).max(log.first_offset());
        if start >= end {
            return Ok((Vec::new(), end));
        }
        let records = log.read(start, max.max(1), LEASE_READ_BYTES)?;
        let Some(last) = records.last() else {
            return Ok((Vec::new(), end));
        };
        let next = (last.offset + 1).min(end);
        let state = group.lock_state();
        let open = records
            .into_iter()
            .filter(|r| r.offset < end && !state.is_done(partition, r.offset))
            .map(|r| message::to_delivery(&self.name, partition, r, 0))
            .collect();
        Ok((open, next))
    }

    fn count_deliveries(&self, group: &Group, out: &[Delivery]) {
        if out.is_empty() {
            return;
        }
        let now = self.clock.now_ms();
        let latency = &group.series.end_to_end_latency;
        for d in out.iter().filter(|d| d.delivery_count == 1) {
            latency.record(now.saturating_sub(d.timestamp_ms).max(0) as f64 / 1000.0);
        }
        let redelivered = out.iter().filter(|d| d.delivery_count > 1).count() as u64;
        group.series.delivered.increment(out.len() as u64);
        if redelivered > 0 {
            group.series.redelivered.increment(redelivered);
        }
    }

    fn group_error(&self, partition: u32, error: GroupError) -> BrokerError {
        match error {
            GroupError::NoPartition(_) => BrokerError::InvalidArgument(format!(
                "queue `{}` has no partition {partition}",
                self.name
            )),
            GroupError::NeverDelivered(offset) | GroupError::NotLeased(offset) => {
                let id = MessageId { partition, offset };
                let exists = self
                    .partitions
                    .get(partition as usize)
                    .is_some_and(|log| offset < log.next_offset());
                if exists {
                    BrokerError::NotLeased(id)
                } else {
                    BrokerError::MessageNotFound(id)
                }
            }
        }
    }

    fn check_exists(&self, id: MessageId) -> Result<(), BrokerError> {
        match self.holds_message(id) {
            true => Ok(()),
            false => Err(BrokerError::MessageNotFound(id)),
        }
    }

    /// True when `id` names a message this queue's log has had (a partition it has, an
    /// offset below that partition's end).
    pub fn holds_message(&self, id: MessageId) -> bool {
        self.partitions
            .get(id.partition as usize)
            .is_some_and(|log| id.offset < log.next_offset())
    }

    /// [`Self::holds_message`], waiting until `deadline` for the partition's end to pass
    /// `id` (a cluster replica applies a partition's own group a little after another
    /// group's entry that names its message).
    pub async fn holds_message_by(&self, id: MessageId, deadline: tokio::time::Instant) -> bool {
        let Some(log) = self.partitions.get(id.partition as usize) else {
            return false;
        };
        let mut end = log.watch_next_offset();
        let reached = end.wait_for(|next| id.offset < *next);
        matches!(tokio::time::timeout_at(deadline, reached).await, Ok(Ok(_)))
    }

    async fn wait_durable(&self, ticket: Option<Ticket>) -> Result<(), BrokerError> {
        match ticket {
            Some(ticket) if self.fsync == FsyncPolicy::Always => Ok(ticket.wait().await?),
            _ => Ok(()),
        }
    }

    /// Acknowledges a message for `group`; repeating an ack is harmless.
    pub async fn ack(&self, group: &Group, id: MessageId) -> Result<(), BrokerError> {
        self.ack_many(group, &[id], true, true)
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Acknowledges messages for `group` under one lock and one journal write; one result
    /// per id, in order. Repeating an ack is harmless. `tell_streams`: signal
    /// [`Group::watch_done`] (not for a stream's acks of its own leases: it knows).
    /// `checked`: refuse an id past its partition's end (a cluster replica takes the ids
    /// its proposer checked, see `Broker::check_ids`).
    pub async fn ack_many(
        &self,
        group: &Group,
        ids: &[MessageId],
        tell_streams: bool,
        checked: bool,
    ) -> Vec<Result<(), BrokerError>> {
        let mut results = Vec::with_capacity(ids.len());
        let mut fresh = 0u64;
        let was_full;
        let ticket = {
            let mut state = group.lock_state();
            was_full = state.capacity() == 0;
            let mut events = Vec::new();
            for id in ids {
                let exists = match checked {
                    true => self.check_exists(*id),
                    false => Ok(()),
                };
                let result = exists.and_then(|()| {
                    state
                        .ack(id.partition, id.offset)
                        .map_err(|e| self.group_error(id.partition, e))
                });
                results.push(result.map(|(was_fresh, acked)| {
                    fresh += u64::from(was_fresh);
                    events.extend(acked);
                }));
            }
            group.journal(&state, &events)
        };
        if fresh > 0 {
            group.series.acked.increment(fresh);
            if tell_streams {
                group.note_done();
            }
            // A waiting receive may lease again: the next of a key, or a group that was
            // at max_in_flight.
            if was_full || self.settings.ordering == super::settings::Ordering::Key {
                self.notify.notify_waiters();
            }
        }
        if let Err(error) = self.wait_durable(ticket).await {
            let reason = error.to_string();
            for result in results.iter_mut().filter(|r| r.is_ok()) {
                *result = Err(BrokerError::Journal(crate::journal::JournalError::Failed(
                    reason.clone(),
                )));
            }
        }
        results
    }

    /// Ends a lease without an ack; what ended holds a dead-letter job when deliveries ran
    /// out.
    pub fn nack(
        &self,
        group: &Group,
        id: MessageId,
        delay_ms: Option<i64>,
    ) -> Result<Ended, BrokerError> {
        self.check_exists(id)?;
        let outcome = group
            .state
            .lock()
            .nack(id.partition, id.offset, self.clock.now_ms(), delay_ms)
            .map_err(|e| self.group_error(id.partition, e))?;
        group.series.nacked.increment(1);
        if matches!(outcome, Outcome::Redeliver { .. }) {
            self.notify.notify_waiters();
        }
        let mut ended = Ended::default();
        ended.push(self, group, id.partition, id.offset, outcome);
        Ok(ended)
    }

    /// Gives leases of `group` back for redelivery at once, as nacks without delay do;
    /// ids that are not leased now are skipped. What the nacks ended, together.
    pub fn release(&self, group: &Group, ids: &[MessageId]) -> Ended {
        let mut ended = Ended::default();
        for id in ids {
            if let Ok(one) = self.nack(group, *id, Some(0)) {
                ended.append(one);
            }
        }
        ended
    }

    /// Applies delivery counts replicated from the leader (see
    /// [`GroupState::note_delivery_count`]); journals those that changed the state.
    pub async fn note_delivery_counts(
        &self,
        group: &Group,
        counts: &[(u32, u64, u32)],
    ) -> Result<(), BrokerError> {
        let ticket = {
            let mut state = group.lock_state();
            let events: Vec<Event> = counts
                .iter()
                .filter(|(p, offset, count)| state.note_delivery_count(*p, *offset, *count))
                .map(|(p, offset, count)| Event::Leased {
                    partition: *p,
                    offset: *offset,
                    delivery_count: *count,
                })
                .collect();
            group.journal(&state, &events)
        };
        self.wait_durable(ticket).await
    }

    /// Moves a lease's deadline to `visibility_ms` from now.
    pub fn extend(
        &self,
        group: &Group,
        id: MessageId,
        visibility_ms: i64,
    ) -> Result<(), BrokerError> {
        self.check_exists(id)?;
        group
            .state
            .lock()
            .extend(id.partition, id.offset, self.clock.now_ms(), visibility_ms)
            .map_err(|e| self.group_error(id.partition, e))
    }

    /// Records that a dead letter reached the DLQ.
    pub async fn complete_dead_letter(
        &self,
        group: &Group,
        id: MessageId,
    ) -> Result<(), BrokerError> {
        let ticket = {
            let mut state = group.lock_state();
            let events = state.complete_dead_letter(id.partition, id.offset);
            group.journal(&state, &events)
        };
        group.series.dead_lettered.increment(1);
        group.note_done();
        self.notify.notify_waiters();
        self.wait_durable(ticket).await
    }

    /// Ends every lease of `group` now, keeping delivery counts (see
    /// [`GroupState::release_leases`]).
    pub fn release_leases(&self, group: &Group) -> usize {
        let released = group.lock_state().release_leases(self.clock.now_ms());
        if released > 0 {
            self.notify.notify_waiters();
        }
        released
    }

    /// The DLQ refused the dead letter (see [`BrokerError::is_transient`]): offer the
    /// message again now.
    pub fn abort_dead_letter(&self, group: &Group, id: MessageId) {
        group
            .state
            .lock()
            .abort_dead_letter(id.partition, id.offset, self.clock.now_ms());
        self.notify.notify_waiters();
    }

    /// Moves `group` to the given offsets (partition, offset) and waits until journaled.
    pub async fn seek(&self, group: &Group, targets: &[(u32, u64)]) -> Result<(), BrokerError> {
        let ticket = {
            let mut state = group.lock_state();
            let mut events = Vec::new();
            for (p, offset) in targets {
                events.extend(
                    state
                        .seek(*p, *offset)
                        .map_err(|e| self.group_error(*p, e))?,
                );
            }
            group.journal(&state, &events)
        };
        group.note_done();
        self.notify.notify_waiters();
        match ticket {
            Some(ticket) => Ok(ticket.wait().await?),
            None => Ok(()),
        }
    }

    /// Partition summaries.
    pub fn partition_infos(&self) -> Vec<PartitionInfo> {
        self.partitions
            .iter()
            .enumerate()
            .map(|(p, log)| {
                let segments = log.segments();
                PartitionInfo {
                    partition: p as u32,
                    first_offset: log.first_offset(),
                    next_offset: log.next_offset(),
                    segments: segments.len() as u32,
                    bytes: segments.iter().map(|s| s.bytes).sum(),
                }
            })
            .collect()
    }

    /// Detailed state of a group.
    pub fn group_info(&self, group: &Group) -> GroupInfo {
        let state = group.lock_state();
        let partitions: Vec<GroupPartitionInfo> = self
            .partitions
            .iter()
            .enumerate()
            .map(|(p, log)| GroupPartitionInfo {
                partition: p as u32,
                committed_offset: state.floor(p as u32),
                backlog: state.backlog(p as u32, log.next_offset()),
                in_flight: state.in_flight_on(p as u32),
            })
            .collect();
        GroupInfo {
            queue: self.name.clone(),
            name: group.name.clone(),
            backlog: partitions.iter().map(|p| p.backlog).sum(),
            in_flight: partitions.iter().map(|p| p.in_flight).sum(),
            partitions,
            redelivered: state.redelivered,
            dead_lettered: state.dead_lettered,
        }
    }

    /// Age (ms) of `group`'s oldest message not yet done: the one at its ack floor of each
    /// partition (one small log read per partition). `None` when nothing is pending.
    pub fn oldest_pending_age_ms(&self, group: &Group, now: i64) -> Option<i64> {
        let floors: Vec<u64> = {
            let state = group.lock_state();
            (0..self.partitions.len() as u32)
                .map(|p| state.floor(p))
                .collect()
        };
        self.partitions
            .iter()
            .zip(floors)
            .filter(|(log, floor)| *floor < log.next_offset())
            .filter_map(|(log, floor)| log.read(floor, 1, 1).ok()?.first().map(|r| r.timestamp_ms))
            .map(|ts| now.saturating_sub(ts).max(0))
            .max()
    }

    /// Messages retained over all partitions (cheap: no lock, no file access).
    pub fn stored_messages(&self) -> u64 {
        self.partitions
            .iter()
            .map(|log| log.next_offset().saturating_sub(log.first_offset()))
            .sum()
    }

    /// Queue info.
    pub fn info(&self) -> QueueInfo {
        QueueInfo {
            name: self.name.clone(),
            settings: self.settings.clone(),
            partitions: self.partition_infos(),
            groups: self
                .groups()
                .iter()
                .map(|g| {
                    let info = self.group_info(g);
                    GroupSummary {
                        name: info.name,
                        backlog: info.backlog,
                        in_flight: info.in_flight,
                        dead_lettered: info.dead_lettered,
                    }
                })
                .collect(),
        }
    }

    /// The queue's data now, as much of it as `part` holds (see [`QueueImage`]).
    pub fn image(&self, part: DataPart) -> QueueImage {
        // Without a cut no segment is looked into.
        self.image_until(part, None).unwrap_or_default()
    }

    /// [`Self::image`], the partitions `part` holds cut at offset `until` (a batch
    /// boundary): their records up to it, as when it was their end (a snapshot of a
    /// partition whose Raft log is its segment log, at the entry that ends there).
    pub fn image_until(
        &self,
        part: DataPart,
        until: Option<u64>,
    ) -> Result<QueueImage, crate::log::LogError> {
        let mut image = QueueImage::default();
        for (p, log) in self.partitions.iter().enumerate() {
            if !part.holds_partition(p as u32) {
                continue;
            }
            let segments = match until {
                Some(end) => log.segments_until(end)?,
                None => log.segments(),
            };
            for segment in segments {
                let paths = crate::log::segment::SegmentPaths::new(log.dir(), segment.base_offset);
                let mut files = vec![(paths.log, Some(segment.bytes))];
                if segment.sealed {
                    files.push((paths.index, None));
                    files.push((paths.time_index, None));
                }
                for (path, len) in files {
                    let len = match len {
                        Some(len) => len,
                        None => match std::fs::metadata(&path) {
                            Ok(meta) => meta.len(),
                            // Opening rebuilds a missing index.
                            Err(_) => continue,
                        },
                    };
                    let Some(file) = path.file_name() else {
                        continue;
                    };
                    image.files.push(ImageFile {
                        relative: PathBuf::from(p.to_string()).join(file),
                        path: path.clone(),
                        len,
                        immutable: segment.sealed,
                    });
                }
            }
        }
        for group in self.groups().into_iter().filter(|_| part.holds_groups()) {
            let snapshot = group.state.lock().snapshot().encode();
            image.journals.push((
                PathBuf::from("groups").join(format!("{}.journal", group.name)),
                Journal::checkpoint_file(&snapshot),
            ));
        }
        Ok(image)
    }

    /// Writes and fsyncs every partition and journal.
    pub async fn flush(&self) -> Result<(), BrokerError> {
        for log in &self.partitions {
            log.flush().await?;
        }
        for group in self.groups() {
            group.journal.flush().await?;
        }
        Ok(())
    }
}
