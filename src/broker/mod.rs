//! The broker: queues -> partitions -> {log, groups}, exchanges, idempotent publish.
//!
//! - [`types`]: what adapters send and receive (ids, messages, infos, [`BrokerError`]).
//! - [`settings`]: queue settings and their validation.
//! - [`registry`]: the persisted metadata and the commands that change it.
//! - [`queue`]: one queue at run time (partitions, groups, waiters).
//! - [`message`]: records <-> messages, internal headers, the dedup window.
//!
//! Background work started by [`Broker::open`]: a timer that expires leases and wakes
//! waiters when redeliveries come due, and a worker that moves dead letters to their DLQ.

pub mod access;
pub mod alarms;
pub mod message;
pub mod queue;
mod records;
pub mod registry;
pub mod replicate;
pub mod sequencer;
pub mod settings;
#[cfg(test)]
pub(crate) mod testing;
pub mod types;
pub mod unanswered;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, Ticks};

pub use crate::name::MAX_NAME_LEN;
pub use crate::route::{Binding, ExchangeKind, HeaderMatch};
pub use records::PartitionBounds;
pub use settings::{InvalidSetting, Ordering, QueueSettings, Retention, RetentionPolicy};
pub use types::*;

use crate::journal::Ticket;
use queue::{DeadLetterJob, Ended, Group, Queue, QueueEnv};
use registry::{MetaCommand, MetaLog, Registry};

/// Threads that open queues at start: each queue's recovery is mostly small file reads and
/// directory lookups, waiting on the file system (and, on a cold cache, on the disk), so
/// a few more threads than cores overlap them.
const OPEN_THREADS: usize = 4;

/// Opens every queue of the registry, on a few threads; a queue whose data cannot be opened
/// is set aside with the reason (logged), so that the others serve.
fn open_queues(
    env: &QueueEnv,
    specs: Vec<(String, QueueSettings)>,
) -> (HashMap<String, Arc<Queue>>, HashMap<String, String>) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |cores| usize::from(cores) * 2)
        .clamp(2, OPEN_THREADS);
    let chunk = specs.len().div_ceil(threads).max(1);
    let results: Vec<(String, Result<Queue, BrokerError>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = specs
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|(name, settings)| {
                            let opened = Queue::open(env, name, settings.clone());
                            (name.clone(), opened)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| match worker.join() {
                Ok(results) => results,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    let mut opened = HashMap::new();
    let mut damaged = HashMap::new();
    for (name, result) in results {
        match result {
            Ok(queue) => {
                opened.insert(name, Arc::new(queue));
            }
            Err(error) => {
                tracing::error!(queue = %name, %error, "queue is unavailable: its data could not be opened");
                damaged.insert(name, error.to_string());
            }
        }
    }
    (opened, damaged)
}

/// How often the timer looks for expired leases and due redeliveries.
const TICK: Duration = Duration::from_millis(50);
/// Most messages one receive may ask for.
pub const MAX_RECEIVE: usize = 1000;

/// Longest lease (visibility timeout) or nack delay: 12 hours, as for `ack_timeout`.
pub const MAX_LEASE_DURATION: Duration = Duration::from_secs(43_200);

/// Checks a visibility timeout or nack delay given by a client: at most
/// [`MAX_LEASE_DURATION`]. `what` names the field in the error.
pub fn check_lease_duration(what: &str, duration: Duration) -> Result<(), BrokerError> {
    if duration > MAX_LEASE_DURATION {
        return Err(BrokerError::InvalidArgument(format!(
            "`{what}` must be at most {} ms (12 h)",
            MAX_LEASE_DURATION.as_millis()
        )));
    }
    Ok(())
}

/// A publish's messages checked before a cluster proposes them, against this node's copy
/// of the queue's `max_message_bytes` (when it has the queue): a refused publish would
/// otherwise still cost a Raft entry of its size on every replica (and a client retrying
/// it would grow every log). The apply checks again, on the settings as of the entry.
fn check_publish(
    messages: &[NewMessage],
    max_message_bytes: Option<u64>,
) -> Result<(), BrokerError> {
    if messages.is_empty() {
        return Err(BrokerError::InvalidArgument(
            "no messages to publish".into(),
        ));
    }
    if let Some(max) = max_message_bytes {
        for (index, m) in messages.iter().enumerate() {
            message::check_new_message(m, index, max)?;
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), BrokerError> {
    crate::name::check(name).map_err(BrokerError::from)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The broker. Shared as `Arc<Broker>` by every adapter.
pub struct Broker {
    config: BrokerConfig,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    /// Queues whose data could not be opened at start, with what opening reported.
    damaged: RwLock<HashMap<String, String>>,
    registry: RwLock<Registry>,
    /// The registry's durable form (a journal of changes, group-committed).
    meta_log: MetaLog,
    /// Serializes metadata changes (create/delete queue, exchanges, bindings).
    meta: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    dead_letters: mpsc::UnboundedSender<DeadLetterJob>,
    /// Delivery counts of leases granted and ended, for the cluster to replicate (sent only
    /// with a replicator installed).
    delivery_counts: mpsc::UnboundedSender<CountsJob>,
    /// Held while delivery counts of one group are checked and replicated, and while a
    /// group delete is checked and proposed ([`Broker::propose_group_delete`]): counts
    /// checked to belong to a live group are committed before its delete, never after (on
    /// the replicas a late counts entry would make the deleted group again).
    counts_gate: tokio::sync::Mutex<()>,
    /// Users, ownership and grants that access ops change (installed with auth on).
    auth: std::sync::OnceLock<Arc<crate::auth::AuthStore>>,
    /// Every background task of the broker and of its streams, joined at shutdown.
    tasks: TaskTracker,
    /// Decides whether dead letters of a queue may go into an existing queue (set by the
    /// server when auth is on); `None` lets every move through.
    dead_letter_guard: std::sync::OnceLock<DeadLetterGuard>,
    /// Groups with leases or delayed redeliveries: all the timer looks at.
    alarms: Arc<queue::Alarms>,
    /// The cluster's way to run state changes (absent on a single node).
    replicator: std::sync::OnceLock<Arc<dyn replicate::Replicator>>,
    /// Per queue, what a cluster group holds while it applies entries to the queue (shared)
    /// or replaces part of its data (alone): see [`Self::queue_gate`].
    gates: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
}

/// Where a seek to `target` moves each partition of `q`, by its logs.
fn seek_targets(q: &Queue, target: &SeekTarget) -> Result<Vec<(u32, u64)>, BrokerError> {
    let mut targets = Vec::new();
    for (p, log) in q.partitions.iter().enumerate() {
        let p = p as u32;
        let offset = match target {
            SeekTarget::Earliest => log.first_offset(),
            SeekTarget::Latest => log.next_offset(),
            SeekTarget::Offset { partition, offset } if *partition == p => {
                (*offset).clamp(log.first_offset(), log.next_offset())
            }
            SeekTarget::Offset { .. } => continue,
            SeekTarget::Time(ms) => log
                .offset_for_timestamp(*ms)?
                .unwrap_or_else(|| log.next_offset()),
        };
        targets.push((p, offset));
    }
    if let SeekTarget::Offset { partition, .. } = target
        && targets.is_empty()
    {
        return Err(BrokerError::InvalidArgument(format!(
            "queue `{}` has no partition {partition}",
            q.name
        )));
    }
    Ok(targets)
}

/// `(partition, offset, delivery count)` of leases granted or ended, to replicate.
type Counts = Vec<(u32, u64, u32)>;
/// `(queue, group, counts)`: delivery counts of leases granted or ended, to replicate.
type CountsJob = (String, String, Counts);

/// `guard(source, target)`: may dead letters of queue `source` be appended to the
/// existing queue `target`?
pub type DeadLetterGuard = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

impl Broker {
    fn queues_dir(&self) -> PathBuf {
        self.config.data_dir.join("queues")
    }

    /// What this broker opens its queues with.
    fn queue_env(&self) -> QueueEnv {
        QueueEnv {
            root: self.queues_dir(),
            fsync: self.config.fsync,
            storage: Arc::clone(&self.config.storage),
            clock: self.config.clock.clone(),
            alarms: Arc::clone(&self.alarms),
        }
    }

    /// Opens the data directory: loads queues, exchanges and group state, recovering logs.
    pub async fn open(config: BrokerConfig) -> Result<Arc<Broker>, BrokerError> {
        let data_dir = config.data_dir.clone();
        let storage = Arc::clone(&config.storage);
        storage
            .create_dir_all(&data_dir.join("queues"))
            .map_err(|source| BrokerError::Storage {
                path: data_dir.clone(),
                source,
            })?;
        let (meta_log, registry) = MetaLog::open(Arc::clone(&storage), &data_dir).await?;
        let specs: Vec<(String, QueueSettings)> = registry
            .queues
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let alarms = Arc::new(queue::Alarms::default());
        let env = QueueEnv {
            root: data_dir.join("queues"),
            fsync: config.fsync,
            storage,
            clock: config.clock.clone(),
            alarms: Arc::clone(&alarms),
        };
        let (opened, damaged) = tokio::task::spawn_blocking(move || open_queues(&env, specs))
            .await
            .map_err(|e| BrokerError::InvalidArgument(format!("opening queues failed: {e}")))?;
        let (dead_letters, jobs) = mpsc::unbounded_channel();
        let (delivery_counts, counts) = mpsc::unbounded_channel();
        let broker = Arc::new(Broker {
            config,
            queues: RwLock::new(opened),
            damaged: RwLock::new(damaged),
            registry: RwLock::new(registry),
            meta_log,
            meta: tokio::sync::Mutex::new(()),
            shutdown: CancellationToken::new(),
            dead_letters,
            delivery_counts,
            counts_gate: tokio::sync::Mutex::new(()),
            auth: std::sync::OnceLock::new(),
            tasks: TaskTracker::new(),
            dead_letter_guard: std::sync::OnceLock::new(),
            alarms,
            replicator: std::sync::OnceLock::new(),
            gates: parking_lot::Mutex::new(HashMap::new()),
        });
        broker
            .tasks
            .spawn(run_timer(Arc::downgrade(&broker), broker.shutdown.clone()));
        broker.tasks.spawn(run_dead_letters(
            Arc::downgrade(&broker),
            jobs,
            broker.shutdown.clone(),
        ));
        broker.tasks.spawn(run_delivery_counts(
            Arc::downgrade(&broker),
            counts,
            broker.shutdown.clone(),
        ));
        Ok(broker)
    }

    /// Installs the check every dead-letter move into an existing queue passes (once; a
    /// second call is ignored). A refused move leaves the message in its queue, to be
    /// delivered and tried again, and is logged.
    pub fn set_dead_letter_guard(&self, guard: DeadLetterGuard) {
        let _ = self.dead_letter_guard.set(guard);
    }

    fn check_running(&self) -> Result<(), BrokerError> {
        if self.shutdown.is_cancelled() {
            Err(BrokerError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    fn queue(&self, name: &str) -> Result<Arc<Queue>, BrokerError> {
        if let Some(queue) = self.queues.read().get(name) {
            return Ok(Arc::clone(queue));
        }
        Err(self.missing(name))
    }

    /// `settings` as two creates of one queue compare them: on a single node, one replica
    /// spelled out is the default (the only copy there is).
    fn comparable(&self, settings: QueueSettings) -> QueueSettings {
        match settings.replicas {
            Some(1) if self.replicator().is_none() => QueueSettings {
                replicas: None,
                ..settings
            },
            _ => settings,
        }
    }

    /// Why `name` is not an open queue: damaged at start, not a queue name at all, or
    /// unknown.
    fn missing(&self, name: &str) -> BrokerError {
        if let Err(error) = crate::name::check(name) {
            return BrokerError::InvalidName(error);
        }
        match self.damaged.read().get(name) {
            Some(reason) => BrokerError::QueueDamaged {
                queue: name.to_string(),
                reason: reason.clone(),
            },
            None => BrokerError::QueueNotFound(name.to_string()),
        }
    }

    /// Queues whose data could not be opened at start, with what opening reported.
    pub fn damaged_queues(&self) -> Vec<(String, String)> {
        let mut list: Vec<_> = self
            .damaged
            .read()
            .iter()
            .map(|(q, r)| (q.clone(), r.clone()))
            .collect();
        list.sort();
        list
    }

    fn existing_group(queue: &Queue, name: &str) -> Result<Arc<Group>, BrokerError> {
        // A name no group can have is bad input (400), not an unknown group (404).
        crate::name::check(name)?;
        queue.group(name).ok_or_else(|| BrokerError::GroupNotFound {
            queue: queue.name.clone(),
            group: name.to_string(),
        })
    }

    /// Applies a metadata change (call under the metadata lock) and writes it to the
    /// registry's journal; the ticket resolves once it is durable. Waiting for it after
    /// releasing the lock lets concurrent changes share one fsync.
    fn apply(&self, command: MetaCommand) -> Result<Ticket, BrokerError> {
        let mut registry = self.registry.write();
        self.meta_log
            .check_room(&command, &registry, registry::MAX_REGISTRY_BYTES)?;
        registry.apply(&command);
        self.meta_log.record(&command, &registry)
    }

    /// [`Self::apply`] and wait until the change is durable.
    async fn commit(&self, command: MetaCommand) -> Result<(), BrokerError> {
        self.apply(command)?.wait().await?;
        Ok(())
    }

    /// Creates a queue (and its dead-letter queue). `Ok(true)` if created, `Ok(false)` if it
    /// existed with equal settings.
    pub async fn create_queue(
        &self,
        name: &str,
        settings: QueueSettings,
    ) -> Result<(QueueInfo, bool), BrokerError> {
        let created = self.create_queue_reporting(name, settings).await?;
        Ok((created.info, created.created))
    }

    /// [`Self::create_queue`], also saying whether its dead-letter queue was made by this
    /// call (ownership is only ever given for queues a call created).
    pub async fn create_queue_reporting(
        &self,
        name: &str,
        settings: QueueSettings,
    ) -> Result<CreatedQueue, BrokerError> {
        self.create_queue_owned(name, settings, None).await
    }

    /// [`Self::create_queue_reporting`] by `owner` (with authentication on): the queue and
    /// a dead-letter queue made with it are recorded as the owner's together with the
    /// creation (one metadata entry in a cluster), never those of a queue that existed.
    pub async fn create_queue_owned(
        &self,
        name: &str,
        settings: QueueSettings,
        owner: Option<&str>,
    ) -> Result<CreatedQueue, BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = match owner {
                Some(owner) => replicate::Op::CreateOwnedQueue {
                    name: name.to_string(),
                    settings,
                    owner: owner.to_string(),
                },
                None => replicate::Op::CreateSplitQueue {
                    name: name.to_string(),
                    settings,
                },
            };
            return match replicator.submit(op).await? {
                replicate::OpResult::Created {
                    created,
                    dead_letter_created,
                } => Ok(CreatedQueue {
                    info: self.created_queue_info(name, created).await?,
                    created,
                    dead_letter_created,
                }),
                other => Err(replicate::unexpected(&other)),
            };
        }
        if let Some(replicas) = settings.replicas
            && replicas > 1
        {
            return Err(BrokerError::InvalidSetting(InvalidSetting {
                field: "replicas",
                reason: format!(
                    "{replicas} copies need a cluster of {replicas} nodes; this server is a single node"
                ),
            }));
        }
        let created = self.create_queue_local(name, settings).await?;
        if let Some(owner) = owner {
            self.own_created_queue(name, &created, owner)?;
        }
        Ok(created)
    }

    /// A queue's info once its creation is committed. A queue made now has no leases yet:
    /// this node's copy has it as it is (the replicator waits for this node to apply the
    /// entry), unless this node's replica of the metadata is behind or stopped, where the
    /// cluster is asked. A queue that existed is read as its leader holds it, with the
    /// leases its groups have out (a follower's own copy knows none).
    async fn created_queue_info(
        &self,
        name: &str,
        created: bool,
    ) -> Result<QueueInfo, BrokerError> {
        if !created {
            return self.current_queue_info(name).await;
        }
        match self.queue_info(name) {
            Err(BrokerError::QueueNotFound(_)) => self.current_queue_info(name).await,
            found => found,
        }
    }

    async fn create_queue_local(
        &self,
        name: &str,
        settings: QueueSettings,
    ) -> Result<CreatedQueue, BrokerError> {
        check_name(name)?;
        settings.validate()?;
        let dlq = settings.dead_letter_name(name);
        let bad_dlq = |reason: String| {
            BrokerError::InvalidSetting(InvalidSetting {
                field: "dead_letter",
                reason,
            })
        };
        if dlq == name {
            return Err(bad_dlq(format!(
                "`{dlq}` cannot be its own dead-letter queue"
            )));
        }
        if settings.max_deliveries > 0
            && let Err(e) = crate::name::check(&dlq)
        {
            if settings.dead_letter.is_none() {
                // The default name, not one the caller gave: say how to get past it.
                return Err(bad_dlq(format!(
                    "the default dead-letter queue `{{queue}}.dlq` of a {}-character name \
                     would be over {MAX_NAME_LEN} characters: name one with `dead_letter` \
                     (or set `max_deliveries` to 0)",
                    name.len()
                )));
            }
            return Err(bad_dlq(e.to_string()));
        }
        let (info, tickets, dead_letter_created) = {
            let _meta = self.meta.lock().await;
            if self.damaged.read().contains_key(name) {
                return Err(self.missing(name));
            }
            if let Some(chain) = self.dead_letter_loop(name, &dlq) {
                return Err(bad_dlq(format!(
                    "dead letters would go round in a loop: {}",
                    chain.join(" -> ")
                )));
            }
            if settings.max_deliveries > 0
                && !self.queues.read().contains_key(name)
                && let Some(limit) = self.smaller_message_cap(&dlq, settings.max_message_bytes)
            {
                return Err(bad_dlq(format!(
                    "`{dlq}` takes messages of at most {limit} bytes, fewer than this queue's \
                     max_message_bytes ({}): a larger dead letter could never be moved there",
                    settings.max_message_bytes
                )));
            }
            let dead_letter = (settings.max_deliveries > 0).then_some(dlq);
            self.create_with_dead_letter(name, settings, dead_letter)
                .await?
        };
        // Outside the lock: creations running side by side share the registry's fsync.
        let created = !tickets.is_empty();
        for ticket in tickets {
            ticket.wait().await?;
        }
        Ok(CreatedQueue {
            info,
            created,
            dead_letter_created,
        })
    }

    /// The `max_message_bytes` of existing queue `dlq` when it is below `max_message_bytes`
    /// (a dead letter that large would be refused there, and offered again for ever).
    fn smaller_message_cap(&self, dlq: &str, max_message_bytes: u64) -> Option<u64> {
        let queues = self.queues.read();
        let limit = queues.get(dlq)?.settings.max_message_bytes;
        (limit < max_message_bytes).then_some(limit)
    }

    /// The dead-letter chain `name -> dlq -> ...` through existing queues when it comes back
    /// to `name` (a loop), else `None`. Call with `meta` held.
    fn dead_letter_loop(&self, name: &str, dlq: &str) -> Option<Vec<String>> {
        let queues = self.queues.read();
        let mut chain = vec![name.to_string(), dlq.to_string()];
        let mut current = dlq.to_string();
        while let Some(queue) = queues.get(&current) {
            let next = queue.settings.dead_letter_name(&current);
            if next == name {
                chain.push(next);
                return Some(chain);
            }
            if chain.contains(&next) {
                // A loop among other queues (made before loops were refused): not ours.
                return None;
            }
            chain.push(next.clone());
            current = next;
        }
        None
    }

    /// Creates one queue under the metadata lock; the ticket (`None` when the queue existed
    /// with these settings) resolves once the registry holds it durably.
    async fn create_locked(
        &self,
        name: &str,
        settings: QueueSettings,
    ) -> Result<(QueueInfo, Option<Ticket>), BrokerError> {
        let (info, tickets, _) = self.create_with_dead_letter(name, settings, None).await?;
        Ok((info, tickets.into_iter().next()))
    }

    /// Creates queue `name` under the metadata lock and, when it is new and `dead_letter`
    /// names a queue that does not exist, that dead-letter queue with it: both opened on one
    /// blocking thread, both refused when they would pass `max_queues`. Returns the queue's
    /// info, the registry tickets (none when the queue existed with these settings) and the
    /// dead-letter queue made, if one was.
    async fn create_with_dead_letter(
        &self,
        name: &str,
        settings: QueueSettings,
        dead_letter: Option<String>,
    ) -> Result<(QueueInfo, Vec<Ticket>, Option<String>), BrokerError> {
        // Compared and stored with name-dependent defaults filled in, so that spelling them
        // out is the same settings.
        let settings = settings.effective(name);
        if let Some(existing) = self.queues.read().get(name).cloned() {
            let same = self.comparable(existing.settings.clone().effective(name))
                == self.comparable(settings.clone());
            return if same {
                Ok((existing.info(), Vec::new(), None))
            } else {
                Err(BrokerError::QueueExists(name.to_string()))
            };
        }
        let dead_letter = dead_letter.filter(|dlq| !self.queues.read().contains_key(dlq));
        let dead_letter_spec = dead_letter
            .as_ref()
            .map(|dlq| (dlq.clone(), dead_letter_settings(&settings).effective(dlq)));
        let mut specs = vec![(name.to_string(), settings)];
        specs.extend(dead_letter_spec);
        if self.queues.read().len() + specs.len() > self.config.max_queues {
            return Err(BrokerError::LimitReached(format!(
                "at most {} queues",
                self.config.max_queues
            )));
        }
        let opened = self.open_new_queues(specs.clone()).await?;
        let mut tickets = Vec::with_capacity(opened.len());
        let mut info = None;
        for (queue, (queue_name, queue_settings)) in opened.into_iter().zip(specs) {
            tickets.push(self.apply(MetaCommand::CreateQueue {
                name: queue_name.clone(),
                settings: queue_settings,
            })?);
            let queue = Arc::new(queue);
            info.get_or_insert_with(|| queue.info());
            self.queues.write().insert(queue_name.clone(), queue);
            tracing::debug!(queue = queue_name, "queue created");
        }
        let info = info.ok_or_else(|| self.missing(name))?;
        Ok((info, tickets, dead_letter))
    }

    /// Opens new queues (their directories cleared first) on one blocking thread.
    async fn open_new_queues(
        &self,
        specs: Vec<(String, QueueSettings)>,
    ) -> Result<Vec<Queue>, BrokerError> {
        let env = self.queue_env();
        tokio::task::spawn_blocking(move || {
            specs
                .into_iter()
                .map(|(name, settings)| {
                    // A directory the registry does not name is left over from a creation
                    // or a deletion a crash cut short: the new queue starts empty.
                    crate::name::remove_child_dir(&*env.storage, &env.root, &name)?;
                    Queue::open(&env, &name, settings)
                })
                .collect()
        })
        .await
        .map_err(|e| BrokerError::InvalidArgument(format!("creating queue failed: {e}")))?
    }

    /// Every queue's name, sorted (without inspecting the queues, as [`Self::list_queues`]
    /// does).
    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.queues.read().keys().cloned().collect();
        names.sort();
        names
    }

    /// The names of a queue's groups in this node's copy (cheap, unlike
    /// [`Self::queue_info`]).
    pub fn group_names(&self, queue: &str) -> Result<Vec<String>, BrokerError> {
        Ok(self
            .queue(queue)?
            .groups()
            .iter()
            .map(|g| g.name.clone())
            .collect())
    }

    /// All queues, by name.
    pub fn list_queues(&self) -> Vec<QueueInfo> {
        let mut queues: Vec<Arc<Queue>> = self.queues.read().values().cloned().collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        queues.iter().map(|q| q.info()).collect()
    }

    /// Up to `limit` queues by name, those after `after` (exclusive); with the name to pass
    /// as `after` for the next page when more remain. Only the page's queues are inspected.
    pub fn list_queues_page(
        &self,
        after: Option<&str>,
        limit: usize,
        shown: impl Fn(&str) -> bool,
    ) -> (Vec<QueueInfo>, Option<String>) {
        let mut queues: Vec<Arc<Queue>> = self
            .queues
            .read()
            .iter()
            .filter(|(name, _)| after.is_none_or(|after| name.as_str() > after))
            .filter(|(name, _)| shown(name))
            .map(|(_, q)| Arc::clone(q))
            .collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        let more = queues.len() > limit;
        queues.truncate(limit);
        let next = more
            .then(|| queues.last().map(|q| q.name.clone()))
            .flatten();
        (queues.iter().map(|q| q.info()).collect(), next)
    }

    /// The number of queues (dead-letter queues included).
    pub fn queue_count(&self) -> usize {
        self.queues.read().len()
    }

    /// Up to `n` queues holding the most messages, busiest first (for per-queue metrics;
    /// ranked by a cheap count, only the chosen ones are inspected).
    pub fn busiest_queues(&self, n: usize) -> Vec<QueueInfo> {
        let mut ranked: Vec<(u64, Arc<Queue>)> = self
            .queues
            .read()
            .values()
            .map(|q| (q.stored_messages(), Arc::clone(q)))
            .collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
        ranked.truncate(n);
        ranked.iter().map(|(_, q)| q.info()).collect()
    }

    /// One queue's info.
    pub fn queue_info(&self, name: &str) -> Result<QueueInfo, BrokerError> {
        Ok(self.queue(name)?.info())
    }

    /// A queue's partitions (cheap, unlike [`Self::queue_info`]: no group is looked at).
    pub fn partition_infos(&self, name: &str) -> Result<Vec<PartitionInfo>, BrokerError> {
        Ok(self.queue(name)?.partition_infos())
    }

    /// A queue's settings (cheap, unlike [`Self::queue_info`]).
    pub fn queue_settings(&self, name: &str) -> Result<QueueSettings, BrokerError> {
        Ok(self.queue(name)?.settings.clone())
    }

    /// Deletes a queue and its data.
    pub async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::DeleteQueue {
                name: name.to_string(),
            };
            return replicator.submit(op).await?.done();
        }
        self.delete_queue_local(name).await
    }

    async fn delete_queue_local(&self, name: &str) -> Result<(), BrokerError> {
        self.remove_queue(name).await?;
        // Its owner and grants go in the same step, on every replica: a grant must not
        // outlive its queue into one made again under the name (a cluster node that had
        // applied the deletion but not yet a later forget let the grantee in, and its
        // publish reached the new queue through the metadata leader).
        if let Some(store) = self.auth.get()
            && let Err(error) = store.remove_resource(&crate::auth::Resource::queue(name))
        {
            tracing::error!(queue = name, %error, "forgetting a deleted queue's grants failed");
        }
        Ok(())
    }

    /// Removes a queue, its data and its registry entry.
    async fn remove_queue(&self, name: &str) -> Result<(), BrokerError> {
        check_name(name)?;
        let ticket = {
            let _meta = self.meta.lock().await;
            if self.damaged.read().contains_key(name) {
                return self.delete_damaged(name).await;
            }
            let queue = self.queue(name)?;
            let ticket = self.apply(MetaCommand::DeleteQueue {
                name: name.to_string(),
            })?;
            self.queues.write().remove(name);
            queue.mark_deleted();
            drop(queue);
            // A crash before the deletion is durable finds the queue registered without its
            // directory: it opens empty (the deletion was not answered).
            self.remove_queue_dir(name).await?;
            ticket
        };
        // Outside the lock: deletions running side by side share the registry's fsync.
        ticket.wait().await?;
        tracing::debug!(queue = name, "queue deleted");
        Ok(())
    }

    /// The queue's data now, for a replica's snapshot (see [`queue::QueueImage`]): call it
    /// where nothing else appends to the queue (a cluster's apply task).
    pub fn queue_image(
        &self,
        name: &str,
        part: queue::DataPart,
    ) -> Result<queue::QueueImage, BrokerError> {
        Ok(self.queue(name)?.image(part))
    }

    /// [`Self::queue_image`] with the partitions `part` holds cut at offset `until`
    /// ([`queue::Queue::image_until`]).
    pub fn queue_image_until(
        &self,
        name: &str,
        part: queue::DataPart,
        until: u64,
    ) -> Result<queue::QueueImage, BrokerError> {
        Ok(self.queue(name)?.image_until(part, Some(until))?)
    }

    /// The gate of queue `name` on a cluster node, where several Raft groups apply to one
    /// queue (its queue group and one group per further partition): each holds it shared
    /// while it applies, and a group installing a snapshot holds it alone while it replaces
    /// its part of the data ([`Self::replace_queue_data`] reopens the queue or a
    /// partition's log, which an apply running meanwhile would find missing or moving).
    pub fn queue_gate(&self, name: &str) -> Arc<tokio::sync::RwLock<()>> {
        Arc::clone(self.gates.lock().entry(name.to_string()).or_default())
    }

    /// Stamps the batches appended from now on to the partitions of `name` that `part`
    /// holds with `stamp` (a cluster replica applying the entry of that Raft term and
    /// index); a queue that does not exist is left alone (the op applied next answers for
    /// it).
    pub fn set_stamp(&self, name: &str, part: queue::DataPart, stamp: crate::log::record::Stamp) {
        if let Ok(queue) = self.queue(name) {
            queue.set_stamp(part, stamp);
        }
    }

    /// Writes and fsyncs every partition and journal of a queue.
    pub async fn flush_queue(&self, name: &str) -> Result<(), BrokerError> {
        self.queue(name)?.flush().await
    }

    /// Replaces a queue's data, as much of it as `part` holds: `fill` writes the new
    /// content into the queue's directory (on a blocking thread) once the part's
    /// directories are emptied. One partition after the first is replaced in the open
    /// queue ([`Queue::replace_partition`]), which keeps the consumer groups' state and
    /// leases; any other part closes the queue (its waiters woken, as on deletion) and
    /// opens it again over the new content with the settings it had. The registry is not
    /// touched. For a cluster replica, whose data directory is derived from its Raft
    /// snapshots and logs: a crash halfway is repaired at the next start. The caller keeps
    /// the queue's other groups from applying meanwhile ([`Self::queue_gate`]).
    pub async fn replace_queue_data<F>(
        &self,
        name: &str,
        part: queue::DataPart,
        fill: F,
    ) -> Result<(), BrokerError>
    where
        F: FnOnce(&std::path::Path) -> std::io::Result<()> + Send + 'static,
    {
        let _meta = self.meta.lock().await;
        if let queue::DataPart::Partition(partition) = part
            && let Ok(queue) = self.queue(name)
        {
            return queue.replace_partition(partition, fill).await;
        }
        let settings = self
            .registry
            .read()
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::QueueNotFound(name.to_string()))?;
        let old = self.queues.write().remove(name);
        // The partitions the part does not hold stay as they are, open (other groups
        // write them, one through its Raft log: see `cluster::group_log`).
        let kept: Vec<Option<crate::log::PartitionLog>> = old
            .as_ref()
            .map(|old| {
                old.partitions
                    .iter()
                    .enumerate()
                    .map(|(p, log)| (!part.holds_partition(p as u32)).then(|| log.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(old) = old {
            old.mark_deleted_in(part);
        }
        let env = self.queue_env();
        let owned = name.to_string();
        let opened = tokio::task::spawn_blocking(move || {
            let (root, storage) = (&env.root, &env.storage);
            let dir = crate::name::child(root, &owned, "")?;
            let io = |source| BrokerError::Storage {
                path: dir.clone(),
                source,
            };
            match part.dirs() {
                None => {
                    crate::name::remove_child_dir(&**storage, root, &owned)?;
                }
                Some(dirs) => {
                    for sub in dirs {
                        match storage.remove_dir_all(&dir.join(sub)) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                                return Err(io(e));
                            }
                            _ => {}
                        }
                    }
                }
            }
            storage.create_dir_all(&dir).map_err(io)?;
            fill(&dir).map_err(io)?;
            Queue::open_keeping(&env, &owned, settings, kept)
        })
        .await
        .map_err(|e| BrokerError::InvalidArgument(format!("replacing a queue failed: {e}")));
        match opened.and_then(|r| r) {
            Ok(queue) => {
                self.damaged.write().remove(name);
                self.queues
                    .write()
                    .insert(name.to_string(), Arc::new(queue));
                Ok(())
            }
            Err(error) => {
                tracing::error!(queue = name, %error, "queue is unavailable: its new data could not be opened");
                self.damaged
                    .write()
                    .insert(name.to_string(), error.to_string());
                Err(error)
            }
        }
    }

    /// Deletes a queue whose data could not be opened (the operator's way out).
    async fn delete_damaged(&self, name: &str) -> Result<(), BrokerError> {
        self.commit(MetaCommand::DeleteQueue {
            name: name.to_string(),
        })
        .await?;
        self.damaged.write().remove(name);
        self.remove_queue_dir(name).await?;
        tracing::warn!(queue = name, "damaged queue deleted with its data");
        Ok(())
    }

    /// Removes `{data_dir}/queues/{name}` and only that: a symlink there is removed, never
    /// followed.
    async fn remove_queue_dir(&self, name: &str) -> Result<(), BrokerError> {
        let (root, name) = (self.queues_dir(), name.to_string());
        let storage = Arc::clone(&self.config.storage);
        tokio::task::spawn_blocking(move || crate::name::remove_child_dir(&*storage, &root, &name))
            .await
            .map_err(|e| BrokerError::InvalidArgument(format!("deleting failed: {e}")))??;
        Ok(())
    }

    /// Publishes messages (one batch per partition); one result per message.
    pub async fn publish(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Published>, BrokerError> {
        self.check_running()?;
        let started = Instant::now();
        // Looked up once: for the checks, the local append and the latency.
        let found = self.queue(queue).ok();
        let published = match self.replicator() {
            Some(replicator) => {
                check_publish(
                    &messages,
                    found.as_ref().map(|q| q.settings.max_message_bytes),
                )?;
                let op = replicate::Op::Publish {
                    queue: queue.to_string(),
                    messages: messages.into_iter().map(Into::into).collect(),
                    now_ms: self.config.clock.now_ms(),
                };
                replicator.submit(op).await?.published()
            }
            None => {
                self.publish_found(queue, found.as_ref(), messages, None, &[])
                    .await
            }
        };
        if published.is_ok() {
            record_publish_latency(found.as_ref(), started, 1);
        }
        published
    }

    /// Several publishes to `queue` that arrived together (a producer's pipelined
    /// requests), each answered on its own, in order, as [`Self::publish`] would answer
    /// it. In a cluster the valid ones go to the replicator together, which commits them
    /// in one entry instead of each paying its own way to the queue's leader; on a single
    /// node they are published side by side (the partition's appends merge anyway).
    pub async fn publish_many(
        &self,
        queue: &str,
        publishes: Vec<Vec<NewMessage>>,
    ) -> Vec<Result<Vec<Published>, BrokerError>> {
        let Some(replicator) = self.replicator() else {
            let each = publishes.into_iter().map(|m| self.publish(queue, m));
            return futures_util::future::join_all(each).await;
        };
        let found = self.queue(queue).ok();
        let settings = found.as_ref().map(|q| q.settings.max_message_bytes);
        let mut answers: Vec<Option<Result<Vec<Published>, BrokerError>>> = Vec::new();
        let mut valid = Vec::new();
        for messages in publishes {
            match self
                .check_running()
                .and_then(|()| check_publish(&messages, settings))
            {
                Ok(()) => {
                    answers.push(None);
                    valid.push(messages.into_iter().map(Into::into).collect());
                }
                Err(e) => answers.push(Some(Err(e))),
            }
        }
        let now_ms = self.config.clock.now_ms();
        let started = Instant::now();
        let mut results = replicator
            .submit_publishes(queue.to_string(), valid, now_ms)
            .await
            .into_iter();
        let answers: Vec<Result<Vec<Published>, BrokerError>> = answers
            .into_iter()
            .map(|answer| match answer {
                Some(refused) => refused,
                None => match results.next() {
                    Some(result) => result.and_then(replicate::OpResult::published),
                    None => Err(BrokerError::NoLeader("a publish went unanswered".into())),
                },
            })
            .collect();
        let served = answers.iter().filter(|a| a.is_ok()).count();
        record_publish_latency(found.as_ref(), started, served);
        answers
    }

    /// Appends a replicated publish on this node, stamped `now_ms`, its keyless messages
    /// in its proposer's `turns` (see [`Queue::publish_placed`]).
    async fn publish_local(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
        now_ms: Option<i64>,
        turns: &[Option<u32>],
    ) -> Result<Vec<Published>, BrokerError> {
        let found = self.queue(queue).ok();
        self.publish_found(queue, found.as_ref(), messages, now_ms, turns)
            .await
    }

    /// [`Self::publish_local`] to `queue` as the caller looked it up (`found`).
    async fn publish_found(
        &self,
        queue: &str,
        found: Option<&Arc<Queue>>,
        messages: Vec<NewMessage>,
        now_ms: Option<i64>,
        turns: &[Option<u32>],
    ) -> Result<Vec<Published>, BrokerError> {
        if messages.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "no messages to publish".into(),
            ));
        }
        let q = found.ok_or_else(|| self.missing(queue))?;
        for (index, m) in messages.iter().enumerate() {
            message::check_new_message(m, index, q.settings.max_message_bytes)?;
        }
        q.publish_placed(messages, now_ms, turns).await
    }

    /// Leases up to `max` messages for `group`, waiting up to `wait` for the first one.
    /// Returns early with what it has; returns empty on shutdown.
    pub async fn receive(
        &self,
        queue: &str,
        group: &str,
        max: usize,
        wait: Duration,
        visibility: Option<Duration>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::Receive {
                queue: queue.to_string(),
                group: group.to_string(),
                max,
                wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                visibility_ms: visibility.map(|v| u64::try_from(v.as_millis()).unwrap_or(u64::MAX)),
            };
            return replicator.submit(op).await?.delivered();
        }
        self.receive_local(queue, group, max, wait, visibility)
            .await
    }

    async fn receive_local(
        &self,
        queue: &str,
        group: &str,
        max: usize,
        wait: Duration,
        visibility: Option<Duration>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        if !(1..=MAX_RECEIVE).contains(&max) {
            return Err(BrokerError::InvalidArgument(format!(
                "max must be 1..={MAX_RECEIVE}"
            )));
        }
        if let Some(visibility) = visibility {
            check_lease_duration("visibility", visibility)?;
        }
        let q = self.queue(queue)?;
        let existed = q.group(group).is_some();
        let mut g = q.group_or_create_within(group, self.config.max_groups_per_queue)?;
        if !existed {
            self.replicate_new_group(queue, group).await?;
        }
        let visibility_ms = visibility
            .map(millis)
            .unwrap_or(q.settings.ack_timeout as i64 * 1000);
        if visibility_ms <= 0 {
            return Err(BrokerError::InvalidArgument(
                "visibility must be positive".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = q.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !q.is_current(&g) {
                // Deleted while this receive waited: the name now means a new group.
                g = q.group_or_create_within(group, self.config.max_groups_per_queue)?;
            }
            let (out, mut ended) = q.lease(&g, max, visibility_ms)?;
            if self.replicator().is_some() {
                // A cluster replicates each delivery's count too (coalesced, off this
                // path), so a new leader counts a delivery that was in flight when its
                // predecessor died, as a single node counts one across a restart.
                ended.counts.extend(
                    out.iter()
                        .map(|d| (d.id.partition, d.id.offset, d.delivery_count)),
                );
            }
            self.dispatch(&q, &g, ended);
            if !out.is_empty() {
                return Ok(out);
            }
            if q.is_deleted() {
                return Err(BrokerError::QueueNotFound(queue.to_string()));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || self.shutdown.is_cancelled() {
                return Ok(Vec::new());
            }
            let wake = g
                .next_wakeup()
                .map(|at| {
                    now + Duration::from_millis(
                        at.saturating_sub(self.config.clock.now_ms()).max(1) as u64,
                    )
                })
                .map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// Hands what ended to the dead-letter worker and, in a cluster, the delivery counts to
    /// the worker that replicates them (coalesced, off the receive path).
    fn dispatch(&self, q: &Queue, g: &Group, ended: Ended) {
        self.dispatch_dead_letters(ended.dead_letters);
        if self.replicator().is_some() && !ended.counts.is_empty() {
            // Like the dead-letter worker, it lives as long as the broker.
            let _ = self
                .delivery_counts
                .send((q.name.clone(), g.name.clone(), ended.counts));
        }
    }

    fn dispatch_dead_letters(&self, jobs: Vec<DeadLetterJob>) {
        for job in jobs {
            // The worker lives as long as the broker; a send can only fail during teardown.
            let _ = self.dead_letters.send(job);
        }
    }

    /// Acknowledges a message for a group; repeating an ack is harmless.
    pub async fn ack(&self, queue: &str, group: &str, id: MessageId) -> Result<(), BrokerError> {
        self.check_running()?;
        if self.replicator().is_some() {
            return self
                .ack_many(queue, group, &[id])
                .await?
                .pop()
                .unwrap_or(Ok(()));
        }
        let q = self.queue(queue)?;
        let g = Self::existing_group(&q, group)?;
        q.ack(&g, id).await
    }

    /// Acknowledges several messages of a group with one journal write (a streaming
    /// consumer's acks); one result per id, in order. `Err` when the queue or group is gone.
    pub async fn ack_many(
        &self,
        queue: &str,
        group: &str,
        ids: &[MessageId],
    ) -> Result<Vec<Result<(), BrokerError>>, BrokerError> {
        self.ack_many_telling(queue, group, ids, true).await
    }

    /// [`Broker::ack_many`] for a `ReceiveMessages` stream acking what it leased: on a
    /// single node the acks wake no stream (the acking one knows; another stream's lease
    /// acked so is found by its next look, see `api::receive`). Replicated acks wake the
    /// streams of every node, as any ack applied from the log does.
    pub async fn ack_many_from_stream(
        &self,
        queue: &str,
        group: &str,
        ids: &[MessageId],
    ) -> Result<Vec<Result<(), BrokerError>>, BrokerError> {
        self.ack_many_telling(queue, group, ids, false).await
    }

    /// Acks through the replicator, or here, waking the group's streams when
    /// `tell_streams` (a replicated ack always wakes them, where it is applied).
    async fn ack_many_telling(
        &self,
        queue: &str,
        group: &str,
        ids: &[MessageId],
        tell_streams: bool,
    ) -> Result<Vec<Result<(), BrokerError>>, BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::Ack {
                queue: queue.to_string(),
                group: group.to_string(),
                ids: replicate::wire_ids(ids),
            };
            return replicator.submit(op).await?.acked();
        }
        self.ack_many_local(queue, group, ids, false, tell_streams)
            .await
    }

    /// Acks on this node; a replica applying a replicated ack creates the group (it never
    /// leased from it).
    async fn ack_many_local(
        &self,
        queue: &str,
        group: &str,
        ids: &[MessageId],
        create_group: bool,
        tell_streams: bool,
    ) -> Result<Vec<Result<(), BrokerError>>, BrokerError> {
        let q = self.queue(queue)?;
        // A replica applying a committed ack (`create_group`) takes it as its proposer
        // checked it ([`Self::check_ids`]): on a cluster a partition's messages come
        // through the partition's own group, which this replica may apply later than the
        // queue group's ack of them.
        let (g, checked) = if create_group {
            (q.group_or_create(group)?, false)
        } else {
            (Self::existing_group(&q, group)?, true)
        };
        Ok(q.ack_many(&g, ids, tell_streams, checked).await)
    }

    /// Returns a leased message for redelivery after `delay` (default: the queue's backoff).
    pub async fn nack(
        &self,
        queue: &str,
        group: &str,
        id: MessageId,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::Nack {
                queue: queue.to_string(),
                group: group.to_string(),
                partition: id.partition,
                offset: id.offset,
                delay_ms: delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            };
            return replicator.submit(op).await?.done();
        }
        self.nack_local(queue, group, id, delay).await
    }

    async fn nack_local(
        &self,
        queue: &str,
        group: &str,
        id: MessageId,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        if let Some(delay) = delay {
            check_lease_duration("delay", delay)?;
        }
        let q = self.queue(queue)?;
        let g = Self::existing_group(&q, group)?;
        let ended = q.nack(&g, id, delay.map(millis))?;
        self.settle_ended(queue, group, ended).await;
        Ok(())
    }

    /// Gives leases back to the group for redelivery at once, as nacks without delay do,
    /// with one delivery-count entry for all of them on a cluster: a consumer that went
    /// away hands back what it held. Ids that are no longer leased are skipped.
    pub async fn release(
        &self,
        queue: &str,
        group: &str,
        ids: &[MessageId],
    ) -> Result<(), BrokerError> {
        self.check_running()?;
        if ids.is_empty() {
            return Ok(());
        }
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::Release {
                queue: queue.to_string(),
                group: group.to_string(),
                ids: replicate::wire_ids(ids),
            };
            return replicator.submit(op).await?.done();
        }
        self.release_local(queue, group, ids).await
    }

    async fn release_local(
        &self,
        queue: &str,
        group: &str,
        ids: &[MessageId],
    ) -> Result<(), BrokerError> {
        let q = self.queue(queue)?;
        let g = Self::existing_group(&q, group)?;
        let ended = q.release(&g, ids);
        self.settle_ended(queue, group, ended).await;
        Ok(())
    }

    /// On a cluster's leader, a group that a receive made here is made on the replicas
    /// before the receive answers (an entry of no delivery counts, whose apply makes the
    /// group): a leader killed right after would otherwise leave its successor without the
    /// group, which would then refuse the consumer's ack of the message it got as
    /// `group_not_found`. A single node has nothing to do.
    async fn replicate_new_group(&self, queue: &str, group: &str) -> Result<(), BrokerError> {
        let Some(replicator) = self.replicator() else {
            return Ok(());
        };
        // As for delivery counts: a delete of the group may not pass between the check
        // that it is there and the commit, which would make it again on the replicas.
        let _gate = self.counts_gate.lock().await;
        if self.queue(queue)?.group(group).is_none() {
            return Ok(());
        }
        let op = replicate::Op::DeliveryCounts {
            queue: queue.to_string(),
            group: group.to_string(),
            counts: Vec::new(),
        };
        replicator.submit(op).await?.done()
    }

    /// What follows leases that a nack or release ended: their delivery counts are
    /// committed first on a cluster, then dead letters move.
    async fn settle_ended(&self, queue: &str, group: &str, ended: Ended) {
        if let Some(replicator) = self.replicator()
            && !ended.counts.is_empty()
        {
            // The nack is answered once its delivery count is replicated: a leader killed
            // right after still leaves the count to its successor, which then dead-letters
            // a message that used up its deliveries rather than delivering it again. So the
            // count goes first, before a dead letter's move. A failure here does not undo
            // the nack (it happened); the count is lost with this leader only.
            let op = replicate::Op::DeliveryCounts {
                queue: queue.to_string(),
                group: group.to_string(),
                counts: ended.counts,
            };
            if let Err(error) = replicator
                .submit(op)
                .await
                .and_then(replicate::OpResult::done)
            {
                tracing::warn!(%error, queue, group, "replicating a delivery count failed");
            }
        }
        // A nack that dead-letters answers once the message is in the dead-letter queue
        // (a script that nacks and then reads or redrives the dead letters finds it there),
        // rather than handing it to the worker that takes expired leases' dead letters. A
        // move that fails is retried in the background.
        for job in ended.dead_letters {
            self.dead_letter(job).await;
        }
    }

    /// Applies delivery counts replicated from a queue's leader.
    async fn note_delivery_counts_local(
        &self,
        queue: &str,
        group: &str,
        counts: &[(u32, u64, u32)],
    ) -> Result<(), BrokerError> {
        let q = self.queue(queue)?;
        let g = q.group_or_create(group)?;
        q.note_delivery_counts(&g, counts).await
    }

    /// Extends a lease to `visibility` from now.
    pub async fn extend(
        &self,
        queue: &str,
        group: &str,
        id: MessageId,
        visibility: Duration,
    ) -> Result<(), BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::Extend {
                queue: queue.to_string(),
                group: group.to_string(),
                partition: id.partition,
                offset: id.offset,
                visibility_ms: u64::try_from(visibility.as_millis()).unwrap_or(u64::MAX),
            };
            return replicator.submit(op).await?.done();
        }
        self.extend_local(queue, group, id, visibility).await
    }

    async fn extend_local(
        &self,
        queue: &str,
        group: &str,
        id: MessageId,
        visibility: Duration,
    ) -> Result<(), BrokerError> {
        check_lease_duration("visibility", visibility)?;
        let q = self.queue(queue)?;
        let g = Self::existing_group(&q, group)?;
        let visibility_ms = millis(visibility);
        if visibility_ms <= 0 {
            return Err(BrokerError::InvalidArgument(
                "visibility must be positive".into(),
            ));
        }
        q.extend(&g, id, visibility_ms)
    }

    /// Moves a dead letter to its DLQ, then marks it done for its group; either step failing
    /// for a passing reason has the whole move tried again later.
    async fn dead_letter(&self, job: DeadLetterJob) {
        let Ok(q) = self.queue(&job.queue) else {
            return;
        };
        let Some(g) = q.group(&job.group) else { return };
        let moved = match self.append_dead_letter(&q, &job).await {
            Ok(()) => match self.replicator() {
                Some(replicator) => replicator
                    .submit(replicate::Op::DeadLetterDone {
                        queue: job.queue.clone(),
                        group: job.group.clone(),
                        partition: job.id.partition,
                        offset: job.id.offset,
                    })
                    .await
                    .and_then(replicate::OpResult::done),
                None => q.complete_dead_letter(&g, job.id).await,
            },
            Err(error) => Err(error),
        };
        match moved {
            Ok(()) => {}
            Err(error) if error.is_transient() => self.retry_dead_letter_later(job, &error),
            Err(error) => {
                // Trying again would be refused again: the queue keeps the message and
                // offers it again, so that it is not held out of reach for ever.
                tracing::warn!(%error, queue = %job.queue, id = %job.id, "the dead-letter queue refused a dead letter; it is offered again");
                q.abort_dead_letter(&g, job.id);
            }
        }
    }

    /// A dead letter's move failed (the dead-letter queue's group has no leader, its disk
    /// is full, ..): the message stays out of delivery (it used up its deliveries) and the
    /// worker tries the move again after a pause that grows with each failure. Its
    /// idempotency key makes a retried append that had in fact been stored harmless.
    fn retry_dead_letter_later(&self, job: DeadLetterJob, error: &BrokerError) {
        let pause = dead_letter_retry_pause(job.attempt);
        tracing::warn!(%error, queue = %job.queue, id = %job.id, attempt = job.attempt, retry_in_ms = pause.as_millis() as u64, "dead-lettering failed; will retry");
        let jobs = self.dead_letters.clone();
        let job = DeadLetterJob {
            attempt: job.attempt.saturating_add(1),
            ..job
        };
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            // The worker lives as long as the broker: after it, nothing is left to retry
            // (a restart delivers the message again, and dead-letters it again).
            let _ = jobs.send(job);
        });
    }

    /// Records on this node that a dead letter reached its dead-letter queue.
    async fn dead_letter_done_local(
        &self,
        queue: &str,
        group: &str,
        id: MessageId,
    ) -> Result<(), BrokerError> {
        let q = self.queue(queue)?;
        let g = q.group_or_create(group)?;
        q.complete_dead_letter(&g, id).await
    }

    async fn append_dead_letter(&self, q: &Queue, job: &DeadLetterJob) -> Result<(), BrokerError> {
        let log = q
            .partitions
            .get(job.id.partition as usize)
            .ok_or(BrokerError::MessageNotFound(job.id))?;
        let Some(record) = log
            .read(job.id.offset, 1, usize::MAX)?
            .into_iter()
            .find(|r| r.offset == job.id.offset)
        else {
            // Retention removed it already: nothing left to move.
            return Ok(());
        };
        let mut dead = message::to_new_message(&record);
        dead.idempotency_key = Some(message::dead_letter_key(
            &job.queue,
            &job.group,
            job.id,
            job.delivery_count,
            record.timestamp_ms,
        ));
        for (name, value) in [
            (message::ORIGINAL_QUEUE_HEADER, job.queue.clone()),
            (message::ORIGINAL_ID_HEADER, job.id.to_string()),
            (message::ORIGINAL_GROUP_HEADER, job.group.clone()),
            (
                message::DELIVERY_COUNT_HEADER,
                job.delivery_count.to_string(),
            ),
            (message::REASON_HEADER, job.reason.as_str().to_string()),
        ] {
            dead.headers.insert(name.to_string(), value);
        }
        let dlq_name = q.settings.dead_letter_name(&q.name);
        if self.replicator().is_some() {
            // Cluster: the dead-letter queue's own group stores it (created through the
            // metadata group when missing).
            if self.queue(&dlq_name).is_err() {
                self.create_queue(&dlq_name, dead_letter_settings(&q.settings))
                    .await?;
            } else if self
                .dead_letter_guard
                .get()
                .is_some_and(|allowed| !allowed(&q.name, &dlq_name))
            {
                return Err(BrokerError::LimitReached(format!(
                    "dead letters of `{}` may not go to `{dlq_name}`",
                    q.name
                )));
            }
            return self.publish(&dlq_name, vec![dead]).await.map(|_| ());
        }
        let dlq = match self.queue(&dlq_name) {
            Ok(_)
                if self
                    .dead_letter_guard
                    .get()
                    .is_some_and(|allowed| !allowed(&q.name, &dlq_name)) =>
            {
                return Err(BrokerError::LimitReached(format!(
                    "dead letters of `{}` may not go to `{dlq_name}`",
                    q.name
                )));
            }
            Ok(dlq) => dlq,
            Err(_) => {
                let ticket = {
                    let _meta = self.meta.lock().await;
                    self.create_locked(&dlq_name, dead_letter_settings(&q.settings))
                        .await?
                        .1
                };
                if let Some(ticket) = ticket {
                    ticket.wait().await?;
                }
                self.queue(&dlq_name)?
            }
        };
        dlq.publish(vec![dead]).await.map(|_| ())
    }

    /// Moves up to `max` (default all) dead-lettered messages back into `queue`: at most the
    /// messages that were in the dead-letter queue when the redrive started (dead letters
    /// that arrive meanwhile stay for the next one). Stops with
    /// [`BrokerError::ShuttingDown`] when the broker shuts down; what moved until then stays
    /// moved.
    ///
    /// In a cluster it runs on the leader of the dead-letter queue (where its group is);
    /// the moves are replicated publishes into `queue` and acks in the dead-letter queue.
    /// Each moved message carries an idempotency key naming its dead letter, so a redrive
    /// run again after one cut short between the publish and the ack (a leader change)
    /// stores it only once within the queue's dedup window.
    pub async fn redrive(&self, queue: &str, max: Option<usize>) -> Result<usize, BrokerError> {
        self.check_running()?;
        let q = self.queue(queue)?;
        let dlq_name = q.settings.dead_letter_name(queue);
        if dlq_name == queue {
            return Err(BrokerError::InvalidArgument(format!(
                "queue `{queue}` is its own dead-letter queue: nothing to redrive"
            )));
        }
        if let Some(replicator) = self.replicator() {
            self.queue(&dlq_name)?;
            let op = replicate::Op::Redrive {
                queue: queue.to_string(),
                dead_letter: dlq_name,
                max: max.map(|m| u64::try_from(m).unwrap_or(u64::MAX)),
            };
            return replicator.submit(op).await?.moved();
        }
        self.redrive_local(queue, &dlq_name, max).await
    }

    /// [`Self::redrive`] on this node: the single node, or the dead-letter queue's leader.
    ///
    /// The dead-letter queue's partitions are read, not leased: a dead-letter queue that
    /// several queues share may hold more of the others' dead letters than its group may
    /// lease at once (`max_in_flight`), and those must neither stop the redrive nor be
    /// taken from whoever has them leased. A letter of `queue` moves even while it is
    /// leased or waiting (its ack later is a harmless repeat).
    async fn redrive_local(
        &self,
        queue: &str,
        dlq_name: &str,
        max: Option<usize>,
    ) -> Result<usize, BrokerError> {
        let target = self.queue(queue)?;
        let dlq = self.queue(dlq_name)?;
        let group = dlq.group_or_create(queue::DEFAULT_GROUP)?;
        // The end of every partition now: later dead letters are not this redrive's.
        let ends: Vec<u64> = dlq.partitions.iter().map(|p| p.next_offset()).collect();
        let limit = max.unwrap_or(usize::MAX);
        let mut moved = 0;
        for (partition, end) in (0u32..).zip(ends) {
            let mut from = 0;
            while moved < limit && from < end {
                if self.shutdown.is_cancelled() {
                    return Err(BrokerError::ShuttingDown);
                }
                let (open, next) = dlq.not_done(&group, partition, from, end, MAX_RECEIVE)?;
                from = next;
                let (ids, again): (Vec<MessageId>, Vec<NewMessage>) = open
                    .into_iter()
                    .filter(|d| dead_letter_of(d, queue))
                    .take(limit - moved)
                    .map(|d| (d.id, redriven(dlq_name, d)))
                    .unzip();
                if ids.is_empty() {
                    continue;
                }
                // Through the replicator in a cluster: the target's group stores them, the
                // dead-letter queue's group records the acks.
                match self.replicator() {
                    Some(_) => self.publish(queue, again).await?,
                    None => target.publish(again).await?,
                };
                for acked in self.ack_many(dlq_name, queue::DEFAULT_GROUP, &ids).await? {
                    acked?;
                }
                moved += ids.len();
            }
        }
        Ok(moved)
    }

    fn partition<'a>(
        &self,
        q: &'a Queue,
        partition: u32,
    ) -> Result<&'a crate::log::PartitionLog, BrokerError> {
        q.partitions.get(partition as usize).ok_or_else(|| {
            BrokerError::InvalidArgument(format!("queue `{}` has no partition {partition}", q.name))
        })
    }

    /// Reads a partition without leasing; returns messages and the next offset to read.
    pub fn read_log(
        &self,
        queue: &str,
        partition: u32,
        from: ReadFrom,
        max: usize,
    ) -> Result<(Vec<Delivery>, u64), BrokerError> {
        let q = self.queue(queue)?;
        let log = self.partition(&q, partition)?;
        let start = match from {
            ReadFrom::Offset(offset) => offset,
            ReadFrom::Time(ms) => log
                .offset_for_timestamp(ms)?
                .unwrap_or_else(|| log.next_offset()),
        };
        let records = log.read(start, max.clamp(1, 10_000), 16 * 1024 * 1024)?;
        let next = records
            .last()
            .map_or(start.max(log.first_offset()), |r| r.offset + 1);
        let deliveries = records
            .into_iter()
            .map(|r| message::to_delivery(&q.name, partition, r, 0))
            .collect();
        Ok((deliveries, next))
    }

    /// Waits until partition `partition` of `queue` has an offset >= `offset` or `timeout`
    /// passes or the broker shuts down (for streaming subscribers).
    pub async fn wait_for_offset(
        &self,
        queue: &str,
        partition: u32,
        offset: u64,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let q = self.queue(queue)?;
        let mut next = self.partition(&q, partition)?.watch_next_offset();
        drop(q);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            if *next.borrow_and_update() > offset {
                return Ok(());
            }
            tokio::select! {
                changed = next.changed() => if changed.is_err() { return Ok(()) },
                _ = &mut deadline => return Ok(()),
                _ = self.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Checks a publish's messages against `queue`'s `max_message_bytes` on this node: a
    /// cluster leader asks before it proposes them, since the node that took the publish
    /// checked only when it knew the queue (its metadata may lag a creation), and a refused
    /// publish must not cost an entry of its size on every replica.
    pub fn check_sizes(
        &self,
        queue: &str,
        messages: &[replicate::WireMessage],
    ) -> Result<(), BrokerError> {
        let Ok(q) = self.queue(queue) else {
            return Ok(());
        };
        let limit = q.settings.max_message_bytes;
        match messages
            .iter()
            .map(replicate::WireMessage::size)
            .find(|s| *s > limit)
        {
            Some(size) => Err(BrokerError::MessageTooLarge { size, limit }),
            None => Ok(()),
        }
    }

    /// Gives each keyless message of a publish to `queue` its partition, as a cluster
    /// proposes it: every replica then appends it there (see [`Queue::publish_placed`]).
    /// One with an idempotency key goes by its hash (a retry lands where the first try
    /// did, as on a single node), any other in turn. Messages with a key, or with a
    /// partition already, are left as they are; so is every message when this node does
    /// not know the queue (the apply refuses the publish on every replica alike).
    pub fn take_turns(&self, queue: &str, messages: &mut [replicate::WireMessage]) {
        let Ok(q) = self.queue(queue) else {
            return;
        };
        let n = q.partitions.len() as u32;
        for m in messages
            .iter_mut()
            .filter(|m| m.key.is_none() && m.partition.is_none())
        {
            m.partition = Some(match &m.idempotency_key {
                Some(key) => message::partition_for_key(key.as_bytes(), n),
                None => q.next_turn(),
            });
        }
    }

    /// Whether each of `ids` is a message of `queue` on this node, waiting up to `wait`
    /// for those its copy of their partition has not reached yet: a cluster leader asks
    /// before it proposes an ack, whose replicas take it as checked (see
    /// [`Self::ack_many_local`]).
    pub async fn check_ids(
        &self,
        queue: &str,
        ids: &[MessageId],
        wait: Duration,
    ) -> Result<Vec<bool>, BrokerError> {
        let q = self.queue(queue)?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut held = Vec::with_capacity(ids.len());
        for id in ids {
            held.push(q.holds_message_by(*id, deadline).await);
        }
        Ok(held)
    }

    /// Where a seek of `group` of `queue` to `target` moves each partition, by this node's
    /// logs: a cluster leader resolves it before it proposes it, so that every replica
    /// moves to the same offsets ([`replicate::Op::SeekTo`]).
    pub fn resolve_seek(
        &self,
        queue: &str,
        target: &SeekTarget,
    ) -> Result<Vec<(u32, u64)>, BrokerError> {
        let q = self.queue(queue)?;
        seek_targets(&q, target)
    }

    /// Checks that `group` of `queue` exists on this node: a cluster leader asks before it
    /// proposes an ack, whose apply creates the group on a replica that has not seen it
    /// yet (so an ack naming an unknown group must be refused before it is an entry).
    pub fn check_group(&self, queue: &str, group: &str) -> Result<(), BrokerError> {
        let q = self.queue(queue)?;
        Self::existing_group(&q, group).map(|_| ())
    }

    /// Wakes when messages of a group become done on this node (see
    /// [`queue::Group::watch_done`]); on a cluster every replica applies the acks.
    pub fn watch_done(
        &self,
        queue: &str,
        group: &str,
    ) -> Result<tokio::sync::watch::Receiver<u64>, BrokerError> {
        let q = self.queue(queue)?;
        Ok(Self::existing_group(&q, group)?.watch_done())
    }

    /// Which of `ids` are done for a group, as this node has applied it.
    pub fn done_among(
        &self,
        queue: &str,
        group: &str,
        ids: &[MessageId],
    ) -> Result<Vec<MessageId>, BrokerError> {
        let q = self.queue(queue)?;
        Ok(Self::existing_group(&q, group)?.done_among(ids))
    }

    /// Detailed state of a group.
    pub fn group_info(&self, queue: &str, group: &str) -> Result<GroupInfo, BrokerError> {
        let q = self.queue(queue)?;
        let g = Self::existing_group(&q, group)?;
        Ok(q.group_info(&g))
    }

    /// Deletes a consumer group of `queue`: its committed offsets, leases and journal go
    /// (Kafka's DeleteGroups). Refused while it has messages in flight
    /// ([`BrokerError::GroupInUse`]); the next receive under the name starts a new group
    /// at the earliest retained message.
    pub async fn delete_group(&self, queue: &str, group: &str) -> Result<(), BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::DeleteGroup {
                queue: queue.to_string(),
                group: group.to_string(),
            };
            return replicator.submit(op).await?.done();
        }
        self.delete_group_local(queue, group, true)
    }

    /// Proposes a delete of `group` of `queue` on a cluster leader: checks that the group
    /// exists here and has nothing in flight, then runs `propose` (the entry every replica
    /// applies as is). The group grants no lease meanwhile ([`Queue::close_group`]; again
    /// when `propose` fails). Delivery counts of the group that this node is replicating
    /// are committed first, and none are proposed for it until `propose` is done.
    pub async fn propose_group_delete<T>(
        &self,
        queue: &str,
        group: &str,
        propose: impl std::future::Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        let _gate = self.counts_gate.lock().await;
        crate::name::check(group)?;
        let q = self.queue(queue)?;
        let closed = q.close_group(group)?;
        let proposed = propose.await;
        if proposed.is_err() {
            q.reopen_group(&closed);
        }
        proposed
    }

    /// Deletes a group on this node ([`Queue::remove_group`]).
    fn delete_group_local(
        &self,
        queue: &str,
        group: &str,
        only_idle: bool,
    ) -> Result<(), BrokerError> {
        crate::name::check(group)?;
        self.queue(queue)?.remove_group(group, only_idle)
    }

    /// Moves a group's position.
    pub async fn seek(
        &self,
        queue: &str,
        group: &str,
        target: SeekTarget,
    ) -> Result<GroupInfo, BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::Seek {
                queue: queue.to_string(),
                group: group.to_string(),
                target: target.into(),
            };
            replicator.submit(op).await?.done()?;
            // As the leader of the queue's group holds it: a follower's own copy knows
            // no leases, so it would show none in flight and nothing redelivered.
            return self.current_group_info(queue, group).await;
        }
        self.seek_local(queue, group, target).await
    }

    async fn seek_local(
        &self,
        queue: &str,
        group: &str,
        target: SeekTarget,
    ) -> Result<GroupInfo, BrokerError> {
        let q = self.queue(queue)?;
        let g = q.group_or_create_within(group, self.config.max_groups_per_queue)?;
        let targets = seek_targets(&q, &target)?;
        q.seek(&g, &targets).await?;
        Ok(q.group_info(&g))
    }

    /// Moves `group` of `queue` to `targets` as resolved by the proposer of a replicated
    /// seek ([`Self::resolve_seek`]).
    async fn seek_to_local(
        &self,
        queue: &str,
        group: &str,
        targets: &[(u32, u64)],
    ) -> Result<(), BrokerError> {
        let q = self.queue(queue)?;
        let g = q.group_or_create_within(group, self.config.max_groups_per_queue)?;
        q.seek(&g, targets).await
    }

    /// Creates an exchange; `Ok(true)` if created, `Ok(false)` if it existed with this type.
    pub async fn create_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
    ) -> Result<bool, BrokerError> {
        self.create_exchange_owned(name, kind, None).await
    }

    /// [`Self::create_exchange`] by `owner` (with authentication on), who owns the exchange
    /// if this creates it, recorded together with the creation (one metadata entry in a
    /// cluster).
    pub async fn create_exchange_owned(
        &self,
        name: &str,
        kind: ExchangeKind,
        owner: Option<&str>,
    ) -> Result<bool, BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = match owner {
                Some(owner) => replicate::Op::CreateOwnedExchange {
                    name: name.to_string(),
                    kind,
                    owner: owner.to_string(),
                },
                None => replicate::Op::CreateExchange {
                    name: name.to_string(),
                    kind,
                },
            };
            return match replicator.submit(op).await? {
                replicate::OpResult::ExchangeCreated(created) => Ok(created),
                other => Err(replicate::unexpected(&other)),
            };
        }
        let created = self.create_exchange_local(name, kind).await?;
        if let Some(owner) = owner {
            self.own_created_exchange(name, created, owner)?;
        }
        Ok(created)
    }

    async fn create_exchange_local(
        &self,
        name: &str,
        kind: ExchangeKind,
    ) -> Result<bool, BrokerError> {
        check_name(name)?;
        let _meta = self.meta.lock().await;
        if let Some(existing) = self.registry.read().exchanges.get(name) {
            return if existing.kind == kind {
                Ok(false)
            } else {
                Err(BrokerError::ExchangeExists(name.to_string()))
            };
        }
        self.commit(MetaCommand::CreateExchange {
            name: name.to_string(),
            kind,
        })
        .await?;
        Ok(true)
    }

    /// Deletes an exchange and its bindings (the queues stay).
    pub async fn delete_exchange(&self, name: &str) -> Result<(), BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::DeleteExchange {
                name: name.to_string(),
            };
            return replicator.submit(op).await?.done();
        }
        self.delete_exchange_local(name).await
    }

    async fn delete_exchange_local(&self, name: &str) -> Result<(), BrokerError> {
        let _meta = self.meta.lock().await;
        self.exchange_kind(name)?;
        self.commit(MetaCommand::DeleteExchange {
            name: name.to_string(),
        })
        .await?;
        // Its owner goes in the same step, as a queue's does (see `delete_queue_local`):
        // a delete whose answer was lost and that a client sent again (a 404 then) never
        // reaches the separate forget after it.
        if let Some(store) = self.auth.get()
            && let Err(error) = store.remove_resource(&crate::auth::Resource::exchange(name))
        {
            tracing::error!(exchange = name, %error, "forgetting a deleted exchange's owner failed");
        }
        Ok(())
    }

    /// One exchange: its type and bindings.
    pub fn exchange_info(&self, name: &str) -> Result<ExchangeInfo, BrokerError> {
        let registry = self.registry.read();
        let record = registry
            .exchanges
            .get(name)
            .ok_or_else(|| missing_exchange(name))?;
        Ok(ExchangeInfo::of(name, record))
    }

    /// Every exchange, by name.
    pub fn list_exchanges(&self) -> Vec<ExchangeInfo> {
        self.registry
            .read()
            .exchanges
            .iter()
            .map(|(name, record)| ExchangeInfo::of(name, record))
            .collect()
    }

    fn exchange_kind(&self, name: &str) -> Result<ExchangeKind, BrokerError> {
        self.registry
            .read()
            .exchanges
            .get(name)
            .map(|x| x.kind)
            .ok_or_else(|| missing_exchange(name))
    }

    /// Binds a queue to an exchange (idempotent).
    pub async fn bind(&self, exchange: &str, binding: Binding) -> Result<(), BrokerError> {
        self.check_running()?;
        crate::route::check_new_binding(&binding)?;
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::Bind {
                exchange: exchange.to_string(),
                binding,
            };
            return replicator.submit(op).await?.done();
        }
        self.bind_local(exchange, binding).await
    }

    async fn bind_local(&self, exchange: &str, binding: Binding) -> Result<(), BrokerError> {
        let _meta = self.meta.lock().await;
        let kind = self.exchange_kind(exchange)?;
        crate::route::validate_binding(kind, &binding)?;
        self.queue(&binding.queue)?;
        self.commit(MetaCommand::Bind {
            exchange: exchange.to_string(),
            binding,
        })
        .await
    }

    /// Removes a binding.
    pub async fn unbind(&self, exchange: &str, binding: Binding) -> Result<(), BrokerError> {
        self.check_running()?;
        if let Some(replicator) = self.replicator() {
            let op = replicate::Op::Unbind {
                exchange: exchange.to_string(),
                binding,
            };
            return replicator.submit(op).await?.done();
        }
        self.unbind_local(exchange, binding).await
    }

    async fn unbind_local(&self, exchange: &str, binding: Binding) -> Result<(), BrokerError> {
        let _meta = self.meta.lock().await;
        self.exchange_kind(exchange)?;
        self.commit(MetaCommand::Unbind {
            exchange: exchange.to_string(),
            binding,
        })
        .await
    }

    /// Publishes through an exchange into every matching queue.
    pub async fn publish_to_exchange(
        &self,
        exchange: &str,
        routing_key: Option<&str>,
        message: NewMessage,
    ) -> Result<Vec<Routed>, BrokerError> {
        self.publish_to_exchange_checked(exchange, routing_key, message, |_| Ok(()))
            .await
    }

    /// [`Self::publish_to_exchange`], calling `check` with the names of the queues the
    /// message routes to before anything is appended: an `Err` from it publishes nothing.
    /// The message goes to exactly the queues `check` saw.
    pub async fn publish_to_exchange_checked<E: From<BrokerError>>(
        &self,
        exchange: &str,
        routing_key: Option<&str>,
        message: NewMessage,
        check: impl FnOnce(&[String]) -> Result<(), E>,
    ) -> Result<Vec<Routed>, E> {
        self.check_running()?;
        let (kind, bindings) = {
            let registry = self.registry.read();
            let record = registry
                .exchanges
                .get(exchange)
                .ok_or_else(|| missing_exchange(exchange))?;
            (record.kind, record.bindings.clone())
        };
        let targets = crate::route::route(kind, &bindings, routing_key, &message.headers);
        let queues: Vec<Arc<Queue>> = targets
            .iter()
            .filter_map(|name| self.queue(name).ok())
            .collect();
        // The caller's check and every target's limits pass before any target stores it:
        // a refusal stores nothing.
        let names: Vec<String> = queues.iter().map(|q| q.name.clone()).collect();
        check(&names)?;
        for q in &queues {
            message::check_new_message(&message, 0, q.settings.max_message_bytes)?;
        }
        let mut routed = Vec::new();
        for q in queues {
            let published = if self.replicator().is_some() {
                self.publish(&q.name, vec![message.clone()]).await?
            } else {
                q.publish(vec![message.clone()]).await?
            };
            if let Some(published) = published.first() {
                routed.push(Routed {
                    queue: q.name.clone(),
                    id: published.id,
                });
            }
        }
        Ok(routed)
    }

    /// Checks that storage is writable (health check).
    pub async fn check_storage(&self) -> Result<(), BrokerError> {
        self.check_running()?;
        if let Some((queue, reason)) = self.damaged_queues().into_iter().next() {
            return Err(BrokerError::QueueDamaged { queue, reason });
        }
        let path = self.config.data_dir.join(".healthcheck");
        let storage = Arc::clone(&self.config.storage);
        tokio::task::spawn_blocking(move || {
            let result = storage
                .open(&path, crate::storage::OpenMode::Create)
                .and_then(|f| f.append(b"ok").and_then(|()| f.sync_data()))
                .and_then(|()| storage.remove(&path));
            result.map_err(|source| BrokerError::Storage { path, source })
        })
        .await
        .map_err(|e| BrokerError::InvalidArgument(format!("health check failed: {e}")))?
    }

    /// Stops: wakes every waiting receiver with an empty answer, refuses new work with
    /// [`BrokerError::ShuttingDown`], flushes and fsyncs logs and journals.
    pub async fn shutdown(&self) -> Result<(), BrokerError> {
        self.shutdown.cancel();
        let queues: Vec<Arc<Queue>> = self.queues.read().values().cloned().collect();
        for q in &queues {
            q.notify.notify_waiters();
        }
        for q in &queues {
            q.flush().await?;
        }
        Ok(())
    }

    /// True once [`Broker::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub async fn until_shutdown(&self) {
        self.shutdown.cancelled().await
    }

    /// The tracker of the broker's background tasks (timer, dead-letter worker) and of the
    /// streams adapters serve on its behalf: spawn such tasks here so that shutdown can
    /// join them ([`Broker::join_tasks`]).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Waits until every tracked task has ended. Call after [`Broker::shutdown`] (tasks
    /// end when they see it); no new task can be tracked afterwards.
    pub async fn join_tasks(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Where the broker reads "now".
    pub fn clock(&self) -> &Clock {
        &self.config.clock
    }

    /// Queues at run time (for background maintenance).
    /// Per queue and group, the age in ms of the oldest message not yet done (for metrics).
    pub fn oldest_pending_ages_ms(&self) -> Vec<(String, String, i64)> {
        let now = self.config.clock.now_ms();
        self.queue_handles()
            .iter()
            .flat_map(|q| {
                q.groups().into_iter().map(move |g| {
                    let age = q.oldest_pending_age_ms(&g, now).unwrap_or(0);
                    (q.name.clone(), g.name.clone(), age)
                })
            })
            .collect()
    }

    /// Adds the counters and histograms of every queue and consumer group to `out`, queues
    /// by name (they own them: a deleted queue's series go with it).
    pub fn owned_series(&self, out: &mut crate::metrics::ScrapeSeries) {
        let mut queues = self.queue_handles();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        for q in &queues {
            q.series.render(&q.name, out);
            for g in q.groups() {
                g.series.render(&q.name, &g.name, out);
            }
        }
    }

    pub(crate) fn queue_handles(&self) -> Vec<Arc<Queue>> {
        self.queues.read().values().cloned().collect()
    }

    /// The broker's configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }
}

/// Counts `publishes` answered by this node in queue `q`'s publish latency histogram (none
/// when the queue is not known here): the time from their arrival to their answer,
/// replication included. A replica applying a committed publish serves no one and records
/// nothing, so the histogram counts each publish once, on the node that answered it.
pub(crate) fn record_publish_latency(q: Option<&Arc<Queue>>, started: Instant, publishes: usize) {
    let Some(q) = q else {
        return;
    };
    let took = started.elapsed().as_secs_f64();
    for _ in 0..publishes {
        q.series.publish_latency.record(took);
    }
}

/// Settings of an automatically created dead-letter queue.
/// Settings of a dead-letter queue made for a queue with `source` settings: no dead
/// letters of its own, and room for every message the source accepted (else a dead letter
/// larger than the default cap could never be moved, and its worker would retry it for
/// ever), and as many copies in a cluster as the source.
fn dead_letter_settings(source: &QueueSettings) -> QueueSettings {
    let defaults = QueueSettings::default();
    QueueSettings {
        max_deliveries: 0,
        max_message_bytes: source.max_message_bytes.max(defaults.max_message_bytes),
        replicas: source.replicas,
        ..defaults
    }
}

/// Why `name` is not an exchange: not an exchange name at all (400), or unknown (404).
fn missing_exchange(name: &str) -> BrokerError {
    match crate::name::check(name) {
        Err(error) => BrokerError::InvalidName(error),
        Ok(()) => BrokerError::ExchangeNotFound(name.to_string()),
    }
}

/// The first pause before a failed dead letter's move is tried again.
const DEAD_LETTER_RETRY_FIRST: Duration = Duration::from_millis(250);
/// The longest pause between two tries of a dead letter's move.
const DEAD_LETTER_RETRY_MAX: Duration = Duration::from_secs(30);

/// A dead letter of `dlq` made again as a message of its original queue: the dead-letter
/// headers go, and an idempotency key names the dead letter, stable across a retried
/// redrive of it and apart from any other (a dead-letter queue made again reuses ids, but
/// not with the same message dead-lettered at the same time). Clients may not use the
/// key's prefix.
fn redriven(dlq: &str, delivery: Delivery) -> NewMessage {
    let mut headers = delivery.headers;
    let original = headers
        .get(message::ORIGINAL_ID_HEADER)
        .cloned()
        .unwrap_or_default();
    let key = message::redrive_key(dlq, delivery.id, &original, delivery.timestamp_ms);
    for name in message::DEAD_LETTER_HEADERS {
        headers.remove(name);
    }
    NewMessage {
        key: delivery.key,
        headers,
        content_type: delivery.content_type,
        body: delivery.body,
        idempotency_key: Some(key),
    }
}

/// True when dead letter `d` is `queue`'s to redrive: it came from `queue`, or its
/// original queue is not recorded (a message published into the dead-letter queue by
/// hand). A dead letter of another queue that shares the dead-letter queue stays there,
/// for that queue's own redrive.
fn dead_letter_of(d: &Delivery, queue: &str) -> bool {
    d.headers
        .get(message::ORIGINAL_QUEUE_HEADER)
        .is_none_or(|original| original == queue)
}

/// The pause before try `attempt + 1` of a dead letter's move: doubling from
/// [`DEAD_LETTER_RETRY_FIRST`] up to [`DEAD_LETTER_RETRY_MAX`].
fn dead_letter_retry_pause(attempt: u32) -> Duration {
    DEAD_LETTER_RETRY_FIRST
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(DEAD_LETTER_RETRY_MAX)
}

/// Expires leases and wakes waiters of groups whose redeliveries came due.
async fn run_timer(broker: Weak<Broker>, shutdown: CancellationToken) {
    let mut ticks = Ticks::new(TICK, shutdown);
    while ticks.next().await {
        let Some(broker) = broker.upgrade() else {
            return;
        };
        let now = broker.config.clock.now_ms();
        // Only groups with a lease or a delayed redelivery: idle queues cost nothing here.
        let mut keep = Vec::new();
        for (name, g) in broker.alarms.take() {
            let Some(q) = broker.queues.read().get(&name).cloned() else {
                continue;
            };
            if !q.is_current(&g) {
                continue;
            }
            if g.next_wakeup().is_some_and(|at| at <= now) {
                let ended = q.expire(&g, now);
                broker.dispatch(&q, &g, ended);
                q.notify.notify_waiters();
            }
            if g.still_armed() {
                keep.push((name, g));
            }
        }
        broker.alarms.keep(keep);
    }
}

/// Replicates the delivery counts of granted and expired leases (cluster mode), coalescing
/// what piled up into one op per group, until shutdown. Best effort, as a single node's
/// journal of leases is: a count lost here (its leader died before it was committed) is
/// one delivery a new leader does not count.
async fn run_delivery_counts(
    broker: Weak<Broker>,
    mut jobs: mpsc::UnboundedReceiver<CountsJob>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            job = jobs.recv() => job,
        };
        let Some(first) = first else { return };
        let mut by_group: HashMap<(String, String), Counts> = HashMap::new();
        let mut add = |(queue, group, counts): CountsJob| {
            by_group.entry((queue, group)).or_default().extend(counts);
        };
        add(first);
        while let Ok(job) = jobs.try_recv() {
            add(job);
        }
        let Some(broker) = broker.upgrade() else {
            return;
        };
        let Some(replicator) = broker.replicator().cloned() else {
            continue;
        };
        for ((queue, group), counts) in by_group {
            // A group deleted meanwhile stays deleted: its replicas would make it again
            // to note the counts. The gate keeps a delete from passing between this check
            // and the commit.
            let _gate = broker.counts_gate.lock().await;
            if broker
                .queue(&queue)
                .ok()
                .and_then(|q| q.group(&group))
                .is_none()
            {
                continue;
            }
            let op = replicate::Op::DeliveryCounts {
                queue: queue.clone(),
                group: group.clone(),
                counts,
            };
            if let Err(error) = replicator.submit(op).await {
                tracing::debug!(%error, %queue, %group, "replicating delivery counts failed");
            }
        }
    }
}

/// Moves dead letters to their DLQs, one at a time, until shutdown. A move under way is
/// finished; a job still queued at shutdown loses nothing: its message was never acked, so
/// after a restart it is delivered (and dead-lettered) again.
async fn run_dead_letters(
    broker: Weak<Broker>,
    mut jobs: mpsc::UnboundedReceiver<DeadLetterJob>,
    shutdown: CancellationToken,
) {
    loop {
        let job = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            job = jobs.recv() => job,
        };
        let Some(job) = job else { return };
        let Some(broker) = broker.upgrade() else {
            return;
        };
        broker.dead_letter(job).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replicator that runs every op here, as a cluster's leader applies it, and
    /// records it.
    struct Recording {
        broker: Weak<Broker>,
        ops: parking_lot::Mutex<Vec<replicate::Op>>,
    }

    impl replicate::Replicator for Recording {
        fn submit(
            &self,
            op: replicate::Op,
        ) -> futures_util::future::BoxFuture<'_, Result<replicate::OpResult, BrokerError>> {
            self.ops.lock().push(op.clone());
            let broker = self.broker.upgrade();
            Box::pin(async move {
                match broker {
                    Some(broker) => broker.apply_op(op).await,
                    None => Err(BrokerError::ShuttingDown),
                }
            })
        }
    }

    /// A receive that makes its group on a cluster's leader has the group made on the
    /// replicas first (an op of no delivery counts for it; the counts of what it leased
    /// follow apart); a receive of a group that exists replicates nothing of the kind.
    #[tokio::test]
    async fn a_receive_that_makes_its_group_replicates_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let b = testing::broker_with_queue(dir.path(), "q", 1).await;
        let recording = Arc::new(Recording {
            broker: Arc::downgrade(&b),
            ops: parking_lot::Mutex::new(Vec::new()),
        });
        b.set_replicator(Arc::clone(&recording) as Arc<dyn replicate::Replicator>);
        let receive = |group: &str| replicate::Op::Receive {
            queue: "q".into(),
            group: group.into(),
            max: 10,
            wait_ms: 0,
            visibility_ms: None,
        };
        let made = |ops: &[replicate::Op], name: &str| {
            ops.iter()
                .filter(|op| {
                    matches!(op, replicate::Op::DeliveryCounts { queue, group, counts }
                        if queue == "q" && group == name && counts.is_empty())
                })
                .count()
        };
        b.apply_op(receive("fresh")).await.unwrap();
        assert_eq!(made(&recording.ops.lock(), "fresh"), 1);
        assert!(b.queue("q").unwrap().group("fresh").is_some());
        b.apply_op(receive("fresh")).await.unwrap();
        b.apply_op(receive(queue::DEFAULT_GROUP)).await.unwrap();
        let ops = recording.ops.lock();
        assert_eq!(made(&ops, "fresh"), 1, "{ops:?}");
        assert_eq!(made(&ops, queue::DEFAULT_GROUP), 0, "{ops:?}");
    }

    /// A receive that took a group just before the group was deleted leases nothing from
    /// it (the lease would go with the group, its consumer unable to ack it): a lease
    /// checks, under the group's state lock that the delete holds, that the group is still
    /// the queue's group of its name.
    #[tokio::test]
    async fn a_removed_group_grants_no_lease() {
        let dir = tempfile::tempdir().unwrap();
        let b = testing::broker_with_queue(dir.path(), "q", 1).await;
        let q = b.queue("q").unwrap();
        let taken = q.group_or_create("g").unwrap();
        q.remove_group("g", true).unwrap();
        let (leased, _) = q.lease(&taken, 10, 30_000).unwrap();
        assert!(leased.is_empty(), "leased from a deleted group: {leased:?}");
        let got = b.receive("q", "g", 10, Duration::ZERO, None).await.unwrap();
        assert_eq!(got.len(), 1, "the new group of the name has the message");
    }

    /// `qit_messages_published_total` counts the messages stored: a repeat of an
    /// idempotency key within the dedup window (in the same publish or a later one) answers
    /// the first id and is not counted again, as a cluster's replicas count what they store.
    #[tokio::test]
    async fn a_repeated_key_is_not_counted_as_published() {
        let dir = tempfile::tempdir().unwrap();
        let b = testing::broker_with_queue(dir.path(), "counted", 1).await;
        let once = |key: &str| NewMessage {
            idempotency_key: Some(key.into()),
            body: bytes::Bytes::from_static(b"once"),
            ..NewMessage::default()
        };
        b.publish("counted", vec![once("a"), once("a"), once("b")])
            .await
            .unwrap();
        b.publish("counted", vec![once("b"), NewMessage::default()])
            .await
            .unwrap();
        let mut series = crate::metrics::ScrapeSeries::default();
        b.owned_series(&mut series);
        let text = series.render();
        // One by the helper, then a, b and the keyless one.
        let expected = r#"qit_messages_published_total{queue="counted"} 4"#;
        assert!(text.contains(expected), "no {expected} in {text}");
    }

    /// A queue's and its groups' counters and histograms are its own: a scrape shows them
    /// from the queue, the process-wide recorder (which keeps a series until the process
    /// ends) never holds them, and they go when the queue is deleted.
    #[tokio::test]
    async fn a_deleted_queue_takes_its_series_with_it() {
        let recorder = crate::metrics::install().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let b = testing::broker_with_queue(dir.path(), "series-q", 2).await;
        let got = b.receive("series-q", "g", 10, Duration::ZERO, None).await;
        let got = got.unwrap();
        b.ack("series-q", "g", got[0].id).await.unwrap();
        let scrape = |b: &Broker| {
            let mut series = crate::metrics::ScrapeSeries::default();
            b.owned_series(&mut series);
            series.render()
        };
        let text = scrape(&b);
        for expected in [
            r#"qit_messages_published_total{queue="series-q"} 2"#,
            r#"qit_publish_latency_seconds_count{queue="series-q"} 1"#,
            r#"qit_messages_delivered_total{queue="series-q",group="g"} 2"#,
            r#"qit_messages_acked_total{queue="series-q",group="g"} 1"#,
            r#"qit_end_to_end_latency_seconds_count{queue="series-q",group="g"} 2"#,
        ] {
            assert!(text.contains(expected), "no {expected} in {text}");
        }
        let recorded = recorder.render();
        assert!(!recorded.contains("series-q"), "recorded: {recorded}");
        b.delete_queue("series-q").await.unwrap();
        let text = scrape(&b);
        assert!(!text.contains(r#"queue="series-q""#), "{text}");
    }

    /// A replicated publish that carries no turns (an entry written before leaders took
    /// them) spreads messages without a key from the number of messages the queue holds,
    /// so a queue reopened on its data (a replica restored from its snapshot) goes on where
    /// it was; a local publish keeps its in-memory turn.
    #[tokio::test]
    async fn replicated_publishes_take_their_turn_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let open = || async {
            let config = BrokerConfig {
                data_dir: dir.path().to_path_buf(),
                ..BrokerConfig::default()
            };
            Broker::open(config).await.unwrap()
        };
        let message = || NewMessage {
            body: bytes::Bytes::from_static(b"m"),
            ..NewMessage::default()
        };
        let settings = QueueSettings {
            partitions: 3,
            ..QueueSettings::default()
        };
        let partitions = |published: Vec<Published>| -> Vec<u32> {
            published.iter().map(|p| p.id.partition).collect()
        };
        let b = open().await;
        b.create_queue("q", settings).await.unwrap();
        let q = b.queue("q").unwrap();
        let first = q.publish_at(vec![message()], Some(1)).await.unwrap();
        assert_eq!(partitions(first), [0], "none held: partition 0");
        let more = q.publish_at(vec![message(); 4], Some(1)).await.unwrap();
        assert_eq!(
            partitions(more),
            [1, 2, 0, 1],
            "1 held: from partition 1 on"
        );
        b.shutdown().await.unwrap();
        drop((q, b));
        let b = open().await;
        let q = b.queue("q").unwrap();
        let after = q.publish_at(vec![message(); 2], Some(1)).await.unwrap();
        assert_eq!(
            partitions(after),
            [2, 0],
            "5 messages held: the turn goes on at 5 % 3"
        );
        let local = q.publish(vec![message(); 2]).await.unwrap();
        assert_eq!(
            partitions(local),
            [0, 1],
            "a local publish: the counter, from 0"
        );
    }

    /// A keyless message with an idempotency key goes to the partition of that key's hash
    /// (on a single node, and as a cluster's proposer names it), so a retry finds the
    /// first; a replicated publish looks its key up in its partition's window only.
    #[tokio::test]
    async fn idempotency_keys_pick_the_partition_and_their_window() {
        let (_dir, b) = replicate::tests::broker_with_queue(4).await;
        let keyed_once = |key: &str| NewMessage {
            idempotency_key: Some(key.into()),
            body: bytes::Bytes::from_static(b"once"),
            ..NewMessage::default()
        };
        let want = message::partition_for_key(b"retry", 4);
        let first = b.publish("q", vec![keyed_once("retry")]).await.unwrap();
        assert_eq!(first[0].partition, want);
        let again = b.publish("q", vec![keyed_once("retry")]).await.unwrap();
        assert_eq!(again[0].id, first[0].id, "the repeat answers the first id");
        let mut wire = vec![replicate::WireMessage::from(keyed_once("other"))];
        b.take_turns("q", &mut wire);
        assert_eq!(
            wire[0].partition,
            Some(message::partition_for_key(b"other", 4))
        );
        // Replicated: the window of the partition the publish goes to.
        let q = b.queue("q").unwrap();
        let elsewhere = (want + 1) % 4;
        let placed = q
            .publish_placed(vec![keyed_once("retry")], Some(1), &[Some(elsewhere)])
            .await
            .unwrap();
        assert_eq!(placed[0].partition, elsewhere, "another partition's window");
        let placed = q
            .publish_placed(vec![keyed_once("retry")], Some(2), &[Some(want)])
            .await
            .unwrap();
        assert_eq!(placed[0].id, first[0].id, "its own partition's window");
    }

    /// An id this node's copy does not hold yet is waited for until its partition reaches
    /// it; one it never reaches is answered false once the wait is over.
    #[tokio::test]
    async fn checking_ids_waits_for_the_partition_to_reach_them() {
        let (_dir, b) = replicate::tests::broker_with_queue(2).await;
        let later = MessageId {
            partition: 1,
            offset: 0,
        };
        let never = MessageId {
            partition: 0,
            offset: 5,
        };
        assert_eq!(
            b.check_ids("q", &[later, never], Duration::ZERO)
                .await
                .unwrap(),
            [false, false]
        );
        let waiting = {
            let b = Arc::clone(&b);
            // The deadline only guards a hang: the publish below ends the wait.
            tokio::spawn(async move { b.check_ids("q", &[later], Duration::from_secs(600)).await })
        };
        // The test's one thread runs the check until it waits.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let key = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| message::partition_for_key(k.as_bytes(), 2) == 1)
            .unwrap();
        let m = NewMessage {
            key: Some(key),
            body: bytes::Bytes::from_static(b"later"),
            ..NewMessage::default()
        };
        b.publish("q", vec![m]).await.unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), [true]);
        let bounded = b
            .check_ids("q", &[later, never], Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!(bounded, [true, false]);
        assert!(b.check_ids("gone", &[later], Duration::ZERO).await.is_err());
    }

    /// Publishes `n` messages with keys `k0`.. (spread over the partitions by key) to
    /// queue `q`.
    async fn publish_keyed(b: &Broker, n: usize) {
        for i in 0..n {
            let m = NewMessage {
                key: Some(format!("k{i}")),
                body: bytes::Bytes::from(format!("m{i}")),
                ..NewMessage::default()
            };
            b.publish("q", vec![m]).await.unwrap();
        }
    }

    /// Replacing one part of a queue's data (a cluster group installing its snapshot)
    /// leaves the other parts as they were; the image of a part holds only its files.
    #[tokio::test]
    async fn replacing_a_part_keeps_the_others() {
        let (_dir, b) = replicate::tests::broker_with_queue(3).await;
        publish_keyed(&b, 30).await;
        b.receive("q", "g", 1, Duration::ZERO, None).await.unwrap();
        let before = b.queue_info("q").unwrap().partitions;
        assert!(before.iter().all(|p| p.next_offset > 0), "{before:?}");
        let image = b.queue_image("q", queue::DataPart::Partition(1)).unwrap();
        assert!(image.journals.is_empty());
        assert!(image.files.iter().all(|f| f.relative.starts_with("1")));
        let head = b.queue_image("q", queue::DataPart::Head).unwrap();
        assert!(head.files.iter().all(|f| f.relative.starts_with("0")));
        assert_eq!(head.journals.len(), 2, "default and g");
        b.replace_queue_data("q", queue::DataPart::Partition(1), |_| Ok(()))
            .await
            .unwrap();
        let after = b.queue_info("q").unwrap().partitions;
        assert_eq!(after[0], before[0]);
        assert_eq!(after[2], before[2]);
        assert_eq!(after[1].next_offset, 0, "partition 1 replaced by nothing");
        assert!(b.group_info("q", "g").is_ok(), "the groups stay");
    }

    /// A partition after the first is replaced in the open queue: messages leased before
    /// stay leased (a far-behind replica that leads the queue group installs a partition's
    /// snapshot without delivering its in-flight messages again), they ack, and the new
    /// copy's records are delivered from where the group stood.
    #[tokio::test]
    async fn replacing_a_partition_keeps_the_leases() {
        let (dir, b) = replicate::tests::broker_with_queue(3).await;
        publish_keyed(&b, 30).await;
        // The copy to install: partition 1 as it is now, then 5 more records on it.
        let copy = tempfile::tempdir().unwrap();
        let live = dir.path().join("queues").join("q").join("1");
        for file in std::fs::read_dir(&live).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, copy.path().join(file.file_name().unwrap())).unwrap();
        }
        let ahead =
            crate::log::PartitionLog::open(copy.path(), crate::log::LogConfig::default()).unwrap();
        let extra: Vec<crate::log::Record> = (0..5)
            .map(|i| crate::log::Record {
                timestamp_ms: 1,
                key: None,
                headers: Vec::new(),
                value: bytes::Bytes::from(format!("extra{i}")),
            })
            .collect();
        ahead.append(extra).await.unwrap();
        ahead.flush().await.unwrap();
        drop(ahead);
        let leased = b
            .receive("q", "g", 100, Duration::ZERO, None)
            .await
            .unwrap();
        assert_eq!(leased.len(), 30);
        let source = copy.path().to_path_buf();
        b.replace_queue_data("q", queue::DataPart::Partition(1), move |queue_dir| {
            std::fs::create_dir_all(queue_dir.join("1"))?;
            for file in std::fs::read_dir(&source)? {
                let file = file?.path();
                if let Some(name) = file.file_name() {
                    std::fs::copy(&file, queue_dir.join("1").join(name))?;
                }
            }
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(b.group_info("q", "g").unwrap().in_flight, 30, "leases kept");
        let more = b
            .receive("q", "g", 100, Duration::ZERO, None)
            .await
            .unwrap();
        let bodies: Vec<_> = more.iter().map(|m| m.body.clone()).collect();
        assert_eq!(bodies.len(), 5, "only the new records: {bodies:?}");
        assert!(
            more.iter()
                .all(|m| m.id.partition == 1 && m.delivery_count == 1)
        );
        let ids: Vec<MessageId> = leased.iter().chain(&more).map(|m| m.id).collect();
        let acked = b.ack_many("q", "g", &ids).await.unwrap();
        assert_eq!(acked.len(), 35);
        assert!(acked.iter().all(Result::is_ok), "{acked:?}");
        assert_eq!(b.group_info("q", "g").unwrap().in_flight, 0);
    }

    /// A replicated publish whose proposer took turns puts each keyless message where its
    /// turn says, keyed ones by their key, and refuses a turn past the partitions; the
    /// leader's turns come from its counter, so keyless messages that alternate with keyed
    /// ones still spread (counted from the log they all went to one partition).
    #[tokio::test]
    async fn replicated_publishes_go_where_their_proposer_turned() {
        let dir = tempfile::tempdir().unwrap();
        let config = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            ..BrokerConfig::default()
        };
        let b = Broker::open(config).await.unwrap();
        let settings = QueueSettings {
            partitions: 2,
            ..QueueSettings::default()
        };
        b.create_queue("q", settings).await.unwrap();
        let q = b.queue("q").unwrap();
        let keyed = || NewMessage {
            key: Some("k".into()),
            body: bytes::Bytes::from_static(b"keyed"),
            ..NewMessage::default()
        };
        let keyless = || {
            replicate::WireMessage::from(NewMessage {
                body: bytes::Bytes::from_static(b"keyless"),
                ..NewMessage::default()
            })
        };
        let key_partition = message::partition_for_key(b"k", 2);
        let mut keyless_in = [0u32; 2];
        for _ in 0..6 {
            let on = q.publish_at(vec![keyed()], Some(1)).await.unwrap();
            assert_eq!(on[0].partition, key_partition);
            let mut one = [keyless()];
            b.take_turns("q", &mut one);
            let turns = [one[0].partition];
            let [one] = one;
            let on = q
                .publish_placed(vec![one.into()], Some(1), &turns)
                .await
                .unwrap();
            assert_eq!(Some(on[0].partition), turns[0]);
            keyless_in[on[0].partition as usize] += 1;
        }
        assert_eq!(keyless_in, [3, 3], "keyless messages spread in turn");
        let mut stamped = [keyless(), replicate::WireMessage::from(keyed())];
        b.take_turns("q", &mut stamped);
        assert_eq!(stamped[1].partition, None, "a keyed message takes no turn");
        let refused = q
            .publish_placed(vec![keyed(), keyed()], Some(1), &[None, Some(2)])
            .await;
        assert!(
            matches!(refused, Err(BrokerError::InvalidArgument(_))),
            "{refused:?}"
        );
    }

    #[test]
    fn dead_letter_retries_back_off_to_a_cap() {
        assert_eq!(dead_letter_retry_pause(0), DEAD_LETTER_RETRY_FIRST);
        assert_eq!(dead_letter_retry_pause(1), Duration::from_millis(500));
        assert_eq!(dead_letter_retry_pause(6), Duration::from_secs(16));
        for attempt in [7, 16, 17, u32::MAX] {
            assert_eq!(dead_letter_retry_pause(attempt), DEAD_LETTER_RETRY_MAX);
        }
    }
}
