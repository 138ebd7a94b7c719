//! The broker's metadata — queues with their settings, exchanges with their bindings — kept
//! in a journal of changes with checkpoints (`{data_dir}/registry.journal`, see
//! `storage-format.md`): a change costs one small append, and concurrent changes share one
//! fsync (group commit) instead of each rewriting and fsyncing the whole registry.
//!
//! Every change is a [`MetaCommand`] applied by [`Registry::apply`], a pure function of the
//! current state: the same commands could later come from a replicated log. A registry of
//! the previous format (`registry.json`, rewritten whole on every change) is taken over on
//! open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::settings::QueueSettings;
use super::types::BrokerError;
use crate::journal::{Journal, Ticket};
use crate::log::FsyncPolicy;
use crate::route::{Binding, ExchangeKind};
use crate::storage::{SharedStorage, Storage};

/// Registry file format version.
const VERSION: u32 = 1;
/// Largest registry a change that adds something may leave (16 MiB of JSON): every
/// checkpoint rewrites it whole, so its size bounds the cost of checkpoints and of a start.
pub const MAX_REGISTRY_BYTES: usize = 16 * 1024 * 1024;

/// An exchange and its bindings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeRecord {
    /// Routing type.
    #[serde(rename = "type")]
    pub kind: ExchangeKind,
    /// Bindings in the order they were made.
    pub bindings: Vec<Binding>,
}

impl super::types::ExchangeInfo {
    /// The API view of exchange `name` as recorded.
    pub fn of(name: &str, record: &ExchangeRecord) -> Self {
        Self {
            name: name.to_string(),
            kind: record.kind,
            bindings: record.bindings.clone(),
        }
    }
}

/// Everything the registry file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Format version.
    #[serde(default)]
    pub version: u32,
    /// Queues by name.
    #[serde(default)]
    pub queues: BTreeMap<String, QueueSettings>,
    /// Exchanges by name.
    #[serde(default)]
    pub exchanges: BTreeMap<String, ExchangeRecord>,
}

/// A change of broker metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MetaCommand {
    /// Add a queue.
    CreateQueue {
        /// Name.
        name: String,
        /// Settings.
        settings: QueueSettings,
    },
    /// Remove a queue (and its bindings).
    DeleteQueue {
        /// Name.
        name: String,
    },
    /// Add an exchange.
    CreateExchange {
        /// Name.
        name: String,
        /// Type.
        kind: ExchangeKind,
    },
    /// Remove an exchange and its bindings.
    DeleteExchange {
        /// Name.
        name: String,
    },
    /// Add a binding (no-op when present).
    Bind {
        /// Exchange.
        exchange: String,
        /// Binding.
        binding: Binding,
    },
    /// Remove a binding.
    Unbind {
        /// Exchange.
        exchange: String,
        /// Binding.
        binding: Binding,
    },
}

impl Registry {
    /// Loads the registry at `path`; a missing file is an empty registry.
    pub fn load(storage: &dyn Storage, path: &Path) -> Result<Self, BrokerError> {
        let bytes = match crate::storage::read_if_exists(storage, path) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(Self::default()),
            Err(source) => {
                return Err(BrokerError::Storage {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| BrokerError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Checks every name the file holds (queues, their dead-letter queues, exchanges, bound
    /// queues) against the name rule, so that a file written by an earlier version that
    /// accepted `..` is refused rather than served. The error names the offender.
    pub fn check_names(&self, path: &Path) -> Result<(), BrokerError> {
        let refuse = |what: String, error: crate::name::NameError| BrokerError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "{what}: {error}; the broker will not serve it: remove it from the file (and its directory under queues/) or restore a backup"
            ),
        };
        for (name, settings) in &self.queues {
            crate::name::check(name).map_err(|e| refuse(format!("queue `{name}`"), e))?;
            if let Some(dlq) = &settings.dead_letter {
                crate::name::check(dlq)
                    .map_err(|e| refuse(format!("dead_letter of queue `{name}`"), e))?;
            }
        }
        for (name, exchange) in &self.exchanges {
            crate::name::check(name).map_err(|e| refuse(format!("exchange `{name}`"), e))?;
            for binding in &exchange.bindings {
                crate::name::check(&binding.queue)
                    .map_err(|e| refuse(format!("a binding of exchange `{name}`"), e))?;
            }
        }
        Ok(())
    }

    /// Writes the registry to `path` atomically (temp file, fsync, rename, fsync dir).
    pub fn save(&self, storage: &dyn Storage, path: &Path) -> Result<(), BrokerError> {
        self.save_within(storage, path, usize::MAX)
    }

    /// [`Self::save`], refused with [`BrokerError::LimitReached`] (nothing written) when the
    /// file would be larger than `max_bytes`.
    pub fn save_within(
        &self,
        storage: &dyn Storage,
        path: &Path,
        max_bytes: usize,
    ) -> Result<(), BrokerError> {
        let mut record = self.clone();
        record.version = VERSION;
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| BrokerError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if bytes.len() > max_bytes {
            return Err(BrokerError::LimitReached(format!(
                "the registry of queues, exchanges and bindings would grow to {} bytes, over its limit of {max_bytes} bytes",
                bytes.len()
            )));
        }
        crate::storage::atomic_replace(storage, path, &bytes, false).map_err(|e| {
            BrokerError::Storage {
                path: e.path,
                source: e.source,
            }
        })
    }

    /// Applies a command. Validation (names, conflicts) happens before; applying a command
    /// twice is harmless.
    pub fn apply(&mut self, command: &MetaCommand) {
        match command {
            MetaCommand::CreateQueue { name, settings } => {
                self.queues.insert(name.clone(), settings.clone());
            }
            MetaCommand::DeleteQueue { name } => {
                self.queues.remove(name);
                for exchange in self.exchanges.values_mut() {
                    exchange.bindings.retain(|b| &b.queue != name);
                }
            }
            MetaCommand::CreateExchange { name, kind } => {
                self.exchanges
                    .entry(name.clone())
                    .or_insert_with(|| ExchangeRecord {
                        kind: *kind,
                        bindings: Vec::new(),
                    });
            }
            MetaCommand::DeleteExchange { name } => {
                self.exchanges.remove(name);
            }
            MetaCommand::Bind { exchange, binding } => {
                if let Some(record) = self.exchanges.get_mut(exchange)
                    && !record.bindings.contains(binding)
                {
                    record.bindings.push(binding.clone());
                }
            }
            MetaCommand::Unbind { exchange, binding } => {
                if let Some(record) = self.exchanges.get_mut(exchange) {
                    record.bindings.retain(|b| b != binding);
                }
            }
        }
    }
}

impl MetaCommand {
    /// True for commands that add to the registry (and so are held to its size limit);
    /// removals always go through, also over the limit.
    pub fn grows(&self) -> bool {
        matches!(
            self,
            Self::CreateQueue { .. } | Self::CreateExchange { .. } | Self::Bind { .. }
        )
    }
}

/// A registry checkpoint is written once the entries since the last one outgrow this, or
/// twice the last checkpoint (so rewriting the registry costs O(1) per change).
const MIN_CHECKPOINT_BYTES: u64 = 256 * 1024;

/// The registry's durable form: a journal of [`MetaCommand`]s (JSON, one per entry) with
/// checkpoints of the whole [`Registry`] (JSON), always fsynced before a change is answered;
/// concurrent changes share an fsync.
pub struct MetaLog {
    path: PathBuf,
    journal: Journal,
    /// Size of the last checkpoint.
    checkpoint_bytes: AtomicU64,
    /// An upper bound of the registry's JSON size: the last checkpoint (or the size at
    /// open) plus every growing change since; a checkpoint makes it exact again.
    estimated_bytes: AtomicU64,
}

fn corrupt(path: &Path, reason: impl ToString) -> BrokerError {
    BrokerError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl MetaLog {
    /// The journal's file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("registry.journal")
    }

    /// The registry file of the previous format in `data_dir`.
    pub fn legacy_path(data_dir: &Path) -> PathBuf {
        data_dir.join("registry.json")
    }

    /// Opens (or creates) the registry of `data_dir` on `storage` and replays it. A
    /// `registry.json` of the previous format is taken over when the journal holds nothing:
    /// its names are checked (a bad one refused, naming that file), it is written as the
    /// journal's first checkpoint, then removed.
    pub async fn open(
        storage: SharedStorage,
        data_dir: &Path,
    ) -> Result<(MetaLog, Registry), BrokerError> {
        let path = Self::path(data_dir);
        let legacy = Self::legacy_path(data_dir);
        let (journal, replay) = Journal::open(Arc::clone(&storage), &path, FsyncPolicy::Always)?;
        let log = MetaLog {
            path: path.clone(),
            journal,
            checkpoint_bytes: AtomicU64::new(0),
            estimated_bytes: AtomicU64::new(0),
        };
        let taken_over = replay.checkpoint.is_none() && replay.entries.is_empty();
        let legacy_registry = if taken_over {
            Some(Registry::load(&*storage, &legacy)?)
        } else {
            None
        };
        let registry = match legacy_registry {
            Some(registry) if registry != Registry::default() => {
                registry.check_names(&legacy)?;
                log.checkpoint(&registry)?.wait().await?;
                tracing::info!(from = %legacy.display(), to = %path.display(), "registry taken over");
                registry
            }
            _ => log.replay(&replay)?,
        };
        // A taken-over (or, after a crash, already taken-over) registry.json goes.
        match storage.remove(&legacy) {
            Ok(()) => storage
                .sync_dir(data_dir)
                .map_err(|source| BrokerError::Storage {
                    path: data_dir.to_path_buf(),
                    source,
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(BrokerError::Storage {
                    path: legacy,
                    source,
                });
            }
        }
        registry.check_names(&path)?;
        let size = serde_json::to_vec(&registry).map_or(0, |b| b.len() as u64);
        log.estimated_bytes.store(size, Ordering::Relaxed);
        Ok((log, registry))
    }

    /// The registry the journal's checkpoint and entries make.
    fn replay(&self, replay: &crate::journal::Replay) -> Result<Registry, BrokerError> {
        let mut registry = match &replay.checkpoint {
            Some(bytes) => {
                self.checkpoint_bytes
                    .store(bytes.len() as u64, Ordering::Relaxed);
                serde_json::from_slice(bytes).map_err(|e| corrupt(&self.path, e))?
            }
            None => Registry::default(),
        };
        for entry in &replay.entries {
            let command: MetaCommand =
                serde_json::from_slice(entry).map_err(|e| corrupt(&self.path, e))?;
            registry.apply(&command);
        }
        Ok(registry)
    }

    /// Refuses with [`BrokerError::LimitReached`] a `command` that adds to the registry
    /// when the registry (`before` it) would grow past `max_bytes` ([`MAX_REGISTRY_BYTES`]
    /// for the broker); removals always go through. Cheap: the exact size is computed only
    /// near the limit.
    pub fn check_room(
        &self,
        command: &MetaCommand,
        before: &Registry,
        max_bytes: usize,
    ) -> Result<(), BrokerError> {
        if !command.grows() {
            return Ok(());
        }
        let entry = serde_json::to_vec(command).map_or(0, |b| b.len() as u64);
        let estimate = self.estimated_bytes.load(Ordering::Relaxed) + entry;
        if estimate <= max_bytes as u64 {
            self.estimated_bytes.store(estimate, Ordering::Relaxed);
            return Ok(());
        }
        let mut after = before.clone();
        after.apply(command);
        let exact = serde_json::to_vec(&after).map_or(u64::MAX, |b| b.len() as u64);
        if exact > max_bytes as u64 {
            return Err(BrokerError::LimitReached(format!(
                "the registry of queues, exchanges and bindings would grow to {exact} bytes, over its limit of {max_bytes} bytes"
            )));
        }
        self.estimated_bytes.store(exact, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `command` (already applied to `after`, which the caller holds still, e.g.
    /// under its metadata lock); checkpoints `after` when the journal has grown. Await the
    /// ticket for durability.
    pub fn record(&self, command: &MetaCommand, after: &Registry) -> Result<Ticket, BrokerError> {
        let entry = serde_json::to_vec(command).map_err(|e| corrupt(&self.path, e))?;
        let ticket = self.journal.append(vec![Bytes::from(entry)]);
        let limit = (2 * self.checkpoint_bytes.load(Ordering::Relaxed)).max(MIN_CHECKPOINT_BYTES);
        if self.journal.bytes_since_checkpoint() > limit {
            // The checkpoint covers the command just written; its ticket is durable once the
            // checkpoint is.
            return self.checkpoint(after);
        }
        Ok(ticket)
    }

    fn checkpoint(&self, registry: &Registry) -> Result<Ticket, BrokerError> {
        let mut record = registry.clone();
        record.version = VERSION;
        let bytes = serde_json::to_vec(&record).map_err(|e| corrupt(&self.path, e))?;
        self.checkpoint_bytes
            .store(bytes.len() as u64, Ordering::Relaxed);
        self.estimated_bytes
            .store(bytes.len() as u64, Ordering::Relaxed);
        Ok(self.journal.checkpoint(Bytes::from(bytes)))
    }

    /// fsyncs every change recorded so far.
    pub async fn flush(&self) -> Result<(), BrokerError> {
        Ok(self.journal.flush().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Disk, SimDisk, disk};
    use std::fs;

    #[test]
    fn saves_and_loads_with_commands_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        let mut registry = Registry::load(&Disk, &path).unwrap();
        let binding = Binding {
            queue: "q".into(),
            key: Some("k".into()),
            headers: None,
            match_mode: None,
        };
        for command in [
            MetaCommand::CreateQueue {
                name: "q".into(),
                settings: QueueSettings::default(),
            },
            MetaCommand::CreateExchange {
                name: "x".into(),
                kind: ExchangeKind::Direct,
            },
            MetaCommand::Bind {
                exchange: "x".into(),
                binding: binding.clone(),
            },
            MetaCommand::Bind {
                exchange: "x".into(),
                binding,
            },
        ] {
            registry.apply(&command);
        }
        registry.save(&Disk, &path).unwrap();
        let loaded = Registry::load(&Disk, &path).unwrap();
        assert_eq!(loaded.exchanges["x"].bindings.len(), 1);
        assert!(loaded.queues.contains_key("q"));
        let mut deleted = loaded;
        deleted.apply(&MetaCommand::DeleteQueue { name: "q".into() });
        assert!(deleted.exchanges["x"].bindings.is_empty());
    }

    /// Issue 19.12: the registry's size is capped; a refused save leaves the file as it was.
    #[test]
    fn a_save_over_the_limit_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        let mut registry = Registry::default();
        registry.apply(&MetaCommand::CreateQueue {
            name: "q".into(),
            settings: QueueSettings::default(),
        });
        registry.save(&Disk, &path).unwrap();
        let before = fs::read(&path).unwrap();
        registry.apply(&MetaCommand::CreateQueue {
            name: "r".into(),
            settings: QueueSettings::default(),
        });
        let refused = registry
            .save_within(&Disk, &path, before.len())
            .unwrap_err();
        assert!(matches!(refused, BrokerError::LimitReached(_)), "{refused}");
        assert_eq!(fs::read(&path).unwrap(), before);
        assert!(!dir.path().join("registry.json.tmp").exists());
        assert!(
            MetaCommand::Bind {
                exchange: "x".into(),
                binding: Binding {
                    queue: "q".into(),
                    key: None,
                    headers: None,
                    match_mode: None
                }
            }
            .grows()
        );
        assert!(!MetaCommand::DeleteQueue { name: "q".into() }.grows());
    }

    /// Issue 18: a stored name that breaks the rule is named in the refusal.
    #[test]
    fn stored_bad_names_are_named() {
        let path = Path::new("/d/registry.json");
        let mut registry = Registry::default();
        registry.apply(&MetaCommand::CreateExchange {
            name: "..".into(),
            kind: ExchangeKind::Fanout,
        });
        let error = registry.check_names(path).unwrap_err().to_string();
        assert!(error.contains("exchange `..`"), "{error}");
    }

    fn queue(name: &str) -> MetaCommand {
        MetaCommand::CreateQueue {
            name: name.into(),
            settings: QueueSettings::default(),
        }
    }

    /// Applies `command` and records it, as the broker does (durable when the ticket of
    /// this or any later change resolves).
    fn change(log: &MetaLog, registry: &mut Registry, command: MetaCommand) -> Ticket {
        registry.apply(&command);
        log.record(&command, registry).unwrap()
    }

    #[tokio::test]
    async fn the_journal_replays_changes_across_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut registry) = MetaLog::open(disk(), dir.path()).await.unwrap();
        // Enough changes for several checkpoints (each entry ~150 bytes, first at 256 KiB).
        for i in 0..4000 {
            change(&log, &mut registry, queue(&format!("q{i}")));
        }
        let mut last = None;
        for i in (0..4000).step_by(2) {
            let name = format!("q{i}");
            last = Some(change(
                &log,
                &mut registry,
                MetaCommand::DeleteQueue { name },
            ));
        }
        last.unwrap().wait().await.unwrap();
        drop(log);
        let (_, reopened) = MetaLog::open(disk(), dir.path()).await.unwrap();
        assert_eq!(reopened.queues, registry.queues);
        assert_eq!(reopened.queues.len(), 2000);
        // Checkpoints kept the file near the registry's size, not the history's.
        let size = fs::metadata(MetaLog::path(dir.path())).unwrap().len();
        assert!(size < 2_000_000, "{size} bytes");
    }

    #[tokio::test]
    async fn a_registry_json_of_the_previous_format_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut legacy = Registry::default();
        legacy.apply(&queue("old"));
        legacy
            .save(&Disk, &MetaLog::legacy_path(dir.path()))
            .unwrap();
        let (log, mut registry) = MetaLog::open(disk(), dir.path()).await.unwrap();
        assert!(registry.queues.contains_key("old"));
        assert!(!MetaLog::legacy_path(dir.path()).exists());
        change(&log, &mut registry, queue("new"))
            .wait()
            .await
            .unwrap();
        drop(log);
        let (_, reopened) = MetaLog::open(disk(), dir.path()).await.unwrap();
        assert_eq!(reopened.queues.keys().collect::<Vec<_>>(), ["new", "old"]);
    }

    /// A crash at every sync point of a take-over and of the changes after it leaves the
    /// old registry or the new one, never neither, and every answered change.
    #[tokio::test]
    async fn a_crash_during_take_over_or_changes_loses_nothing_answered() {
        let data = Path::new("/data");
        let mut legacy = Registry::default();
        legacy.apply(&queue("old"));
        for crash_at in 1..=12 {
            let sim = SimDisk::new();
            sim.create_dir_all(data).unwrap();
            legacy.save(&sim, &MetaLog::legacy_path(data)).unwrap();
            sim.crash_at_sync(sim.syncs() + crash_at, crash_at);
            let mut answered = Vec::new();
            if let Ok((log, mut registry)) = MetaLog::open(Arc::new(sim.clone()), data).await {
                for i in 0..4 {
                    let name = format!("new{i}");
                    if change(&log, &mut registry, queue(&name))
                        .wait()
                        .await
                        .is_err()
                    {
                        break;
                    }
                    answered.push(name);
                }
            }
            let after = SimDisk::restore(&sim.crash_image(crash_at));
            let (_, reopened) = MetaLog::open(Arc::new(after), data).await.unwrap();
            assert!(reopened.queues.contains_key("old"), "crash at {crash_at}");
            for name in &answered {
                assert!(
                    reopened.queues.contains_key(name),
                    "crash at {crash_at}: {name}"
                );
            }
        }
    }

    /// Issue 19.12, with the journal: a change over the registry's limit is refused.
    #[tokio::test]
    async fn a_change_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut registry) = MetaLog::open(disk(), dir.path()).await.unwrap();
        let first = queue("a");
        log.check_room(&first, &registry, 10_000).unwrap();
        change(&log, &mut registry, first).wait().await.unwrap();
        let big = MetaCommand::CreateQueue {
            name: "b".repeat(200),
            settings: QueueSettings::default(),
        };
        let refused = log.check_room(&big, &registry, 200).unwrap_err();
        assert!(matches!(refused, BrokerError::LimitReached(_)), "{refused}");
        // Removals always go through.
        let delete = MetaCommand::DeleteQueue { name: "a".into() };
        log.check_room(&delete, &registry, 1).unwrap();
    }
}
