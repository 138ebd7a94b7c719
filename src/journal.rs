//! An append-only, checksummed journal of opaque entries with checkpoints: the durable
//! store behind consumer-group state (and any other small state machine).
//!
//! CONTRACT STUB: the public API below is fixed; bodies are filled in by the journal work.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::log::FsyncPolicy;

/// What a journal held when it was opened.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The latest checkpoint's snapshot, if one was written.
    pub checkpoint: Option<Bytes>,
    /// Entries appended after that checkpoint, in order.
    pub entries: Vec<Bytes>,
    /// Bytes of torn or corrupt tail that recovery cut off (0 when clean).
    pub truncated_bytes: u64,
}

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O error.
    #[error("journal I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Damage that recovery may not repair (e.g. a bad checkpoint header).
    #[error("corrupt journal {path} at byte {position}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte position.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// The journal was closed.
    #[error("the journal is closed")]
    Closed,
}

/// Completion of an enqueued append or checkpoint.
pub struct Ticket {}

impl Ticket {
    /// Resolves once the operation is written, and under [`FsyncPolicy::Always`] durable.
    pub async fn wait(self) -> Result<(), JournalError> {
        todo!()
    }
}

/// A journal file. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Journal {}

impl Journal {
    /// Opens or creates the journal at `path` and replays it.
    pub fn open(_path: &Path, _fsync: FsyncPolicy) -> Result<(Journal, Replay), JournalError> {
        todo!()
    }
    /// Enqueues entries now (order = call order across all callers); await the ticket for
    /// durability. Concurrent appends are group-committed.
    pub fn append(&self, _entries: Vec<Bytes>) -> Ticket {
        todo!()
    }
    /// Enqueues a checkpoint now: `snapshot` replaces everything appended before this call;
    /// entries appended after it are kept after it. Atomic against crashes.
    pub fn checkpoint(&self, _snapshot: Bytes) -> Ticket {
        todo!()
    }
    /// Bytes in the journal file since the last checkpoint (to decide when to checkpoint).
    pub fn bytes_since_checkpoint(&self) -> u64 {
        todo!()
    }
    /// Writes and fsyncs everything enqueued so far.
    pub async fn flush(&self) -> Result<(), JournalError> {
        todo!()
    }
}
