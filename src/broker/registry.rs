//! The broker's metadata — queues with their settings, exchanges with their bindings — as
//! one JSON file (`{data_dir}/registry.json`), replaced atomically on every change.
//!
//! Every change is a [`MetaCommand`] applied by [`Registry::apply`], a pure function of the
//! current state: the same commands could later come from a replicated log.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::settings::QueueSettings;
use super::types::BrokerError;
use crate::route::{Binding, ExchangeKind};
use crate::storage::Storage;

/// Registry file format version.
const VERSION: u32 = 1;
/// Largest registry file a change that adds something may write (16 MiB): the whole file is
/// rewritten on every change, so its size bounds the cost of every create and bind.
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Disk;
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
}
