//! A snapshot's way to a follower, in chunks that survive a cut connection, a new attempt
//! of openraft's replication and a restart of the follower: only the bytes' transport,
//! the snapshot itself is openraft's (installed with [`Raft::install_full_snapshot`]).
//!
//! The leader ([`send`], behind `RaftNetwork::full_snapshot`) first asks the follower
//! how many bytes of this snapshot (by its id) it holds ([`HeldRequest`]), then sends
//! chunks from there ([`ChunkRequest`]: vote, snapshot meta, offset, bytes, done), one
//! call each. A failed call (the follower away, a deadline) is followed by a pause and the
//! question again, never by a start from 0; after [`MAX_FAILURES`] in a row without
//! progress the attempt ends and openraft's replication starts the next one, which asks
//! again too. A follower that holds a higher vote answers so, which ends the transfer as
//! openraft's own transport does.
//!
//! The follower ([`Receiver`]) writes the chunks to `snapshot/receiving-{hex id}.pack` in
//! the group's directory ([`super::snapshot::receiving_pack`]), each exactly at the length
//! it holds: a chunk beyond it is refused with that length ([`TransferReply::Gap`]), one
//! below it cuts the file there first; a chunk of another snapshot removes the older
//! partial file. Each chunk is synced before it is acknowledged, and the file is kept when
//! the node restarts. After the last chunk the follower checks the whole stream (every
//! file's length and CRC, [`super::snapshot::verify_pack`]): a damaged one is removed (the
//! next attempt starts at 0) and never reaches openraft; a sound one is installed and
//! then removed. Memory: one chunk at a time on either side.

use std::collections::HashMap;
use std::future::Future;
use std::io::SeekFrom;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::OptionalSend;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{NetworkError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::SnapshotResponse;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::snapshot::{
    MAX_SNAPSHOT_ID, Snapshot, SnapshotData, SnapshotError, is_receiving_pack, receiving_pack,
    verify_pack,
};
use super::state_machine::Raft;
use super::types::{SnapshotMeta, TypeConfig, Vote};

/// Bytes of snapshots a leader did not send again because the follower already held them
/// from a cut transfer (counter; counted each time a transfer starts again after asking).
pub const RESUMED_BYTES: &str = "qit_cluster_snapshot_resumed_bytes_total";
/// Bytes of partly received snapshots a follower threw away (counter): a chunk below what
/// it held cut the file, or a chunk of another snapshot replaced it. A transfer that goes
/// on after a cut, by asking or because the leader's next chunk found the restarted
/// follower, throws nothing away.
pub const DISCARDED_BYTES: &str = "qit_cluster_snapshot_discarded_bytes_total";
/// Chunk size when openraft names none (it names its `snapshot_max_chunk_size`, 3 MiB).
const DEFAULT_CHUNK: usize = 3 * 1024 * 1024;
/// Calls in a row that move nothing forward before an attempt gives up (openraft's
/// replication then starts the next one, which resumes too).
pub const MAX_FAILURES: u32 = 10;
/// The first pause after a failed call; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// The longest pause after a failed call.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Errors of the follower's side.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The partial file could not be read or written.
    #[error("snapshot transfer {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot id that names no file (empty or too long).
    #[error("snapshot id of {0} bytes (1 to {MAX_SNAPSHOT_ID} accepted)")]
    BadId(usize),
    /// A chunk whose end does not fit in 64 bits.
    #[error("chunk at {0} overflows")]
    Overflow(u64),
    /// The received stream is damaged (or not the announced snapshot).
    #[error(transparent)]
    Damaged(#[from] SnapshotError),
}

impl TransferError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The leader asks how much of a snapshot the follower holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldRequest {
    /// The leader's vote.
    pub vote: Vote,
    /// The snapshot.
    pub snapshot_id: String,
}

/// One chunk of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkRequest {
    /// The leader's vote.
    pub vote: Vote,
    /// The snapshot's id (of its manifest: it names exactly these bytes).
    pub snapshot_id: String,
    /// What the snapshot covers.
    pub meta: SnapshotMeta,
    /// Where the bytes go in the stream.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
    /// The last chunk: the follower installs the snapshot.
    pub done: bool,
}

/// The follower's answer to both calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferReply {
    /// Bytes of the snapshot held (after the chunk, for a chunk).
    Held(u64),
    /// The chunk would leave a hole: the bytes held.
    Gap(u64),
    /// The follower holds a higher vote: the sender leads no more.
    HigherVote(Vote),
    /// The snapshot is installed (or the follower's state covers it); the follower's vote.
    Installed(Vote),
    /// The received stream did not check and was removed; the next attempt starts at 0.
    Damaged(String),
    /// The follower could not store or install it now (its disk, its Raft group stopping).
    Failed(String),
}

/// The partial packs in one group's snapshot directory (blocking file operations).
#[derive(Debug, Clone)]
pub struct Partial {
    dir: PathBuf,
}

impl Partial {
    /// The partial packs in `dir` (created by the first chunk).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The file of snapshot `id`.
    pub fn path(&self, id: &str) -> Result<PathBuf, TransferError> {
        receiving_pack(&self.dir, id).ok_or(TransferError::BadId(id.len()))
    }

    /// Bytes of snapshot `id` held (0 when none).
    pub fn held(&self, id: &str) -> Result<u64, TransferError> {
        let path = self.path(id)?;
        match std::fs::metadata(&path) {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(TransferError::io(&path)(e)),
        }
    }

    /// Writes `data` at `offset` of snapshot `id`'s file, which must hold at least
    /// `offset` bytes (else [`TransferReply::Gap`] with what it holds); what it holds
    /// beyond `offset` is cut first. Another snapshot's file is removed. The file is synced;
    /// [`TransferReply::Held`] with its new length.
    pub fn write(
        &self,
        id: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<TransferReply, TransferError> {
        let path = self.path(id)?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(TransferError::Overflow(offset))?;
        std::fs::create_dir_all(&self.dir).map_err(TransferError::io(&self.dir))?;
        self.remove_others(&path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(TransferError::io(&path))?;
        let held = file.metadata().map_err(TransferError::io(&path))?.len();
        if offset > held {
            return Ok(TransferReply::Gap(held));
        }
        if offset < held {
            tracing::info!(
                path = %path.display(),
                offset,
                held,
                "a chunk below what is held cuts the partial snapshot"
            );
            file.set_len(offset).map_err(TransferError::io(&path))?;
            metrics::counter!(DISCARDED_BYTES).increment(held - offset);
        }
        file.write_all_at(data, offset)
            .and_then(|()| file.sync_data())
            .map_err(TransferError::io(&path))?;
        Ok(TransferReply::Held(end))
    }

    /// Checks snapshot `id`'s whole stream (see [`verify_pack`]); a damaged one is removed.
    pub fn verify(&self, id: &str, meta: &SnapshotMeta) -> Result<PathBuf, TransferError> {
        let path = self.path(id)?;
        let checked = std::fs::File::open(&path)
            .map_err(TransferError::io(&path))
            .and_then(|file| {
                let mut reader = std::io::BufReader::with_capacity(1024 * 1024, file);
                verify_pack(&mut reader, id, meta.last_log_id).map_err(TransferError::from)
            });
        match checked {
            Ok(_) => Ok(path),
            Err(error) => {
                self.remove(id);
                Err(error)
            }
        }
    }

    /// Removes snapshot `id`'s file, if any.
    pub fn remove(&self, id: &str) {
        if let Ok(path) = self.path(id)
            && let Err(error) = std::fs::remove_file(&path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), %error, "cannot remove a received snapshot");
        }
    }

    /// Removes every partial pack but `keep`.
    fn remove_others(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path != keep && is_receiving_pack(&name) {
                tracing::info!(path = %path.display(), "a newer snapshot replaces a partial transfer");
                let len = entry.metadata().map_or(0, |m| m.len());
                match std::fs::remove_file(&path) {
                    Ok(()) => metrics::counter!(DISCARDED_BYTES).increment(len),
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "cannot remove a partial snapshot");
                    }
                }
            }
        }
    }
}

/// Runs a blocking file operation off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The follower's side, for every group of this node: calls of one group run one at a
/// time (a stale attempt's call and a new one's never interleave their writes).
#[derive(Debug)]
pub struct Receiver {
    raft_dir: PathBuf,
    /// Per group: the id of the snapshot last installed by a transfer (its last chunk
    /// sent again, or the question asked again, is answered "installed").
    groups: parking_lot::Mutex<HashMap<u64, Arc<tokio::sync::Mutex<Option<String>>>>>,
}

impl Receiver {
    /// The receiver of the groups under `raft_dir` (`{raft_dir}/{group}/snapshot/`).
    pub fn new(raft_dir: PathBuf) -> Self {
        Self {
            raft_dir,
            groups: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    fn partial(&self, group: u64) -> Partial {
        Partial::new(self.raft_dir.join(group.to_string()).join("snapshot"))
    }

    fn slot(&self, group: u64) -> Arc<tokio::sync::Mutex<Option<String>>> {
        Arc::clone(self.groups.lock().entry(group).or_default())
    }

    /// The follower's vote when it is higher than the leader's `vote` (as openraft
    /// checks a chunk).
    fn higher_vote(raft: &Raft, vote: &Vote) -> Option<Vote> {
        let mine = raft.metrics().borrow_watched().vote;
        if *vote >= mine { None } else { Some(mine) }
    }

    /// Answers how much of a snapshot this node holds for group `group`.
    pub async fn held(&self, raft: &Raft, group: u64, request: HeldRequest) -> TransferReply {
        if let Some(higher) = Self::higher_vote(raft, &request.vote) {
            return TransferReply::HigherVote(higher);
        }
        let slot = self.slot(group);
        let installed = slot.lock().await;
        if installed.as_deref() == Some(request.snapshot_id.as_str()) {
            return TransferReply::Installed(raft.metrics().borrow_watched().vote);
        }
        let partial = self.partial(group);
        let id = request.snapshot_id;
        match blocking(move || partial.held(&id)).await {
            Ok(held) => TransferReply::Held(held),
            Err(error) => TransferReply::Failed(error),
        }
    }

    /// Takes one chunk for group `group`; after the last, checks and installs the
    /// snapshot.
    pub async fn chunk(&self, raft: &Raft, group: u64, request: ChunkRequest) -> TransferReply {
        if let Some(higher) = Self::higher_vote(raft, &request.vote) {
            return TransferReply::HigherVote(higher);
        }
        let slot = self.slot(group);
        let mut installed = slot.lock().await;
        let id = request.snapshot_id.clone();
        if installed.as_deref() == Some(id.as_str()) {
            return TransferReply::Installed(raft.metrics().borrow_watched().vote);
        }
        let partial = self.partial(group);
        let ChunkRequest {
            vote,
            snapshot_id: _,
            meta,
            offset,
            data,
            done,
        } = request;
        let writer = partial.clone();
        let written_id = id.clone();
        let written = blocking(move || writer.write(&written_id, offset, &data)).await;
        match written {
            Ok(TransferReply::Held(_)) if done => {}
            Ok(reply) => return reply,
            Err(error) => return TransferReply::Failed(error),
        }
        let checker = partial.clone();
        let checked_meta = meta.clone();
        let checked_id = id.clone();
        let path = match blocking(move || checker.verify(&checked_id, &checked_meta)).await {
            Ok(path) => path,
            Err(error) => {
                tracing::warn!(group, %error, "a received snapshot is damaged; removed");
                return TransferReply::Damaged(error);
            }
        };
        let data = match SnapshotData::received(&id, path).await {
            Ok(data) => data,
            Err(error) => return TransferReply::Failed(error.to_string()),
        };
        let snapshot = Snapshot {
            meta: meta.clone(),
            snapshot: data,
        };
        let result = raft.install_full_snapshot(vote, snapshot).await;
        // Installed (the state machine read it), or not needed: either way it is done.
        let remover = partial.clone();
        let removed_id = id.clone();
        let _ = blocking(move || {
            remover.remove(&removed_id);
            Ok(())
        })
        .await;
        match result {
            Ok(response) => {
                if response.vote <= vote {
                    *installed = Some(id);
                }
                TransferReply::Installed(response.vote)
            }
            Err(fatal) => TransferReply::Failed(fatal.to_string()),
        }
    }
}

/// The leader's way to the follower's [`Receiver`]: the two calls, each with a deadline;
/// `Err` when the call did not get an answer.
pub trait Link: Send {
    /// Asks how much of a snapshot the follower holds.
    fn held(
        &mut self,
        request: HeldRequest,
        ttl: Duration,
    ) -> impl Future<Output = Result<TransferReply, String>> + Send;

    /// Sends one chunk.
    fn chunk(
        &mut self,
        request: ChunkRequest,
        ttl: Duration,
    ) -> impl Future<Output = Result<TransferReply, String>> + Send;
}

/// What ends an attempt that made no progress for too long.
fn gave_up(why: &str) -> StreamingError<TypeConfig> {
    StreamingError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
        "snapshot transfer: {why}"
    ))))
}

/// How a transfer paces its calls.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Every call's deadline.
    pub ttl: Duration,
    /// Bytes per chunk.
    pub chunk: usize,
    /// The first pause after a failed call; it doubles up to [`BACKOFF_MAX`].
    pub pause: Duration,
}

impl Pace {
    /// openraft's: its deadline per call (`install_snapshot_timeout`) and its chunk size.
    pub fn of(option: &RPCOption) -> Self {
        Self {
            ttl: option.hard_ttl(),
            chunk: option.snapshot_chunk_size().unwrap_or(DEFAULT_CHUNK),
            pause: BACKOFF_FIRST,
        }
    }
}

/// Sends `snapshot` over `link` (see the module docs): resumes at what the follower
/// holds, pauses and asks again after a failed call, honours `cancel` and the per-call
/// deadline. The follower's answer once it installed the snapshot (or holds a higher vote,
/// which the caller checks).
pub async fn send<L: Link>(
    link: &mut L,
    vote: Vote,
    mut snapshot: Snapshot,
    cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
    pace: Pace,
) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
    let meta = snapshot.meta.clone();
    let id = snapshot.snapshot.id().to_string();
    // Not a storage error (openraft would stop the group for it): the usual cause is a
    // newer snapshot that replaced this one (its files removed) while it was being sent;
    // the next attempt sends the current one.
    let read_error = |e: std::io::Error| {
        tracing::info!(snapshot = %id, error = %e, "snapshot no longer readable");
        gave_up(&format!("reading snapshot {id}: {e}"))
    };
    let end = snapshot
        .snapshot
        .seek(SeekFrom::End(0))
        .await
        .map_err(read_error)?;
    let chunk_size = pace.chunk.max(1) as u64;
    let ttl = pace.ttl;
    let mut cancel = std::pin::pin!(cancel);
    let mut failures = 0u32;
    let mut last_failure = String::new();
    // `None`: ask the follower where to go on.
    let mut offset: Option<u64> = None;
    loop {
        if failures > 0 {
            if failures >= MAX_FAILURES {
                return Err(gave_up(&format!(
                    "{failures} calls in a row failed, the last: {last_failure}"
                )));
            }
            let pause = pace
                .pause
                .saturating_mul(1 << (failures - 1).min(5))
                .min(BACKOFF_MAX);
            tokio::select! {
                // A cancel that is due wins over a call that is ready too.
                biased;
                closed = cancel.as_mut() => return Err(closed.into()),
                () = tokio::time::sleep(pause) => {}
            }
        }
        let Some(at) = offset else {
            let request = HeldRequest {
                vote,
                snapshot_id: id.clone(),
            };
            let answer = tokio::select! {
                // A cancel that is due wins over a call that is ready too.
                biased;
                closed = cancel.as_mut() => return Err(closed.into()),
                answer = tokio::time::timeout(ttl, link.held(request, ttl)) => answer,
            };
            match answer.unwrap_or_else(|_| Err("no answer in time".into())) {
                Ok(TransferReply::Held(held)) => {
                    // More than the stream: not this stream's bytes; start over.
                    let at = if held <= end { held } else { 0 };
                    if at > 0 {
                        metrics::counter!(RESUMED_BYTES).increment(at);
                        tracing::info!(
                            snapshot = %id,
                            resumed = at,
                            of = end,
                            "snapshot transfer resumes"
                        );
                    }
                    offset = Some(at);
                }
                Ok(TransferReply::HigherVote(higher) | TransferReply::Installed(higher)) => {
                    return Ok(SnapshotResponse::new(higher));
                }
                Ok(other) => {
                    failures += 1;
                    last_failure = format!("{other:?}");
                }
                Err(error) => {
                    failures += 1;
                    last_failure = error;
                }
            }
            continue;
        };
        snapshot
            .snapshot
            .seek(SeekFrom::Start(at))
            .await
            .map_err(read_error)?;
        let mut data = Vec::with_capacity(usize::try_from(chunk_size.min(end - at)).unwrap_or(0));
        (&mut snapshot.snapshot)
            .take(chunk_size)
            .read_to_end(&mut data)
            .await
            .map_err(read_error)?;
        let sent = data.len() as u64;
        if sent == 0 && at < end {
            return Err(read_error(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the snapshot ends at {at}, not {end}"),
            )));
        }
        let done = at + sent == end;
        let request = ChunkRequest {
            vote,
            snapshot_id: id.clone(),
            meta: meta.clone(),
            offset: at,
            data,
            done,
        };
        let answer = tokio::select! {
            biased;
            closed = cancel.as_mut() => return Err(closed.into()),
            answer = tokio::time::timeout(ttl, link.chunk(request, ttl)) => answer,
        };
        match answer.unwrap_or_else(|_| Err("no answer in time".into())) {
            Ok(TransferReply::Held(held)) if held == at + sent && !done => {
                failures = 0;
                offset = Some(held);
            }
            Ok(TransferReply::HigherVote(higher) | TransferReply::Installed(higher)) => {
                return Ok(SnapshotResponse::new(higher));
            }
            Ok(TransferReply::Damaged(why)) => {
                let error = std::io::Error::other(format!("node refused snapshot {id}: {why}"));
                return Err(NetworkError::new(&error).into());
            }
            Ok(other) => {
                failures += 1;
                last_failure = format!("{other:?}");
                offset = None;
            }
            Err(error) => {
                failures += 1;
                last_failure = error;
                offset = None;
            }
        }
        if failures > 0 {
            tracing::debug!(snapshot = %id, at, failures, last = %last_failure, "a chunk was not taken; asking again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::types::{StoredMembership, log_id};

    fn vote(term: u64) -> Vote {
        Vote::new_committed(term, 1)
    }

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(log_id(2, 1, 7)),
            last_membership: StoredMembership::default(),
        }
    }

    /// The receiver's file state: writes land at exactly the held length, a gap is
    /// refused with it, a lower offset cuts the file, another id discards the older file,
    /// and what is held survives reopening (a restart).
    #[test]
    fn partial_packs_hold_exactly_what_arrived() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("snapshot");
        let partial = Partial::new(dir.clone());
        assert_eq!(partial.held("a-1").unwrap(), 0);
        assert_eq!(
            partial.write("a-1", 0, b"hello ").unwrap(),
            TransferReply::Held(6)
        );
        assert_eq!(
            partial.write("a-1", 6, b"world").unwrap(),
            TransferReply::Held(11)
        );
        // A gap: refused, with the held length; nothing changes.
        assert_eq!(
            partial.write("a-1", 20, b"late").unwrap(),
            TransferReply::Gap(11)
        );
        assert_eq!(partial.held("a-1").unwrap(), 11);
        // Lower: cut there, then written.
        assert_eq!(
            partial.write("a-1", 6, b"there").unwrap(),
            TransferReply::Held(11)
        );
        assert_eq!(
            std::fs::read(partial.path("a-1").unwrap()).unwrap(),
            b"hello there"
        );
        assert_eq!(
            partial.write("a-1", 3, b"p!").unwrap(),
            TransferReply::Held(5)
        );
        assert_eq!(
            std::fs::read(partial.path("a-1").unwrap()).unwrap(),
            b"help!"
        );
        // Survives reopening, and the snapshot directory's open keeps it.
        let reopened = Partial::new(dir.clone());
        assert_eq!(reopened.held("a-1").unwrap(), 5);
        std::fs::write(dir.join("incoming-1.pack"), b"leftover").unwrap();
        std::fs::create_dir_all(dir.join("build-1")).unwrap();
        super::super::snapshot::SnapshotDir::open(&dir).unwrap();
        assert_eq!(reopened.held("a-1").unwrap(), 5);
        assert!(!dir.join("incoming-1.pack").exists());
        assert!(!dir.join("build-1").exists());
        // Another snapshot of the group: the older partial file goes.
        assert_eq!(partial.held("b-2").unwrap(), 0);
        assert_eq!(partial.held("a-1").unwrap(), 5, "asking discards nothing");
        assert_eq!(
            partial.write("b-2", 0, b"x").unwrap(),
            TransferReply::Held(1)
        );
        assert_eq!(partial.held("a-1").unwrap(), 0);
        assert!(!partial.path("a-1").unwrap().exists());
        // Ids are peer input: a path in one stays a name inside the directory.
        let odd = partial.path("../../etc/passwd").unwrap();
        assert_eq!(odd.parent(), Some(dir.as_path()));
        assert!(matches!(partial.path(""), Err(TransferError::BadId(0))));
        assert!(partial.path(&"x".repeat(MAX_SNAPSHOT_ID + 1)).is_err());
        assert_eq!(
            std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(Result::ok)
                .filter(|e| is_receiving_pack(&e.file_name().to_string_lossy()))
                .count(),
            1
        );
    }

    /// A damaged stream is removed after the last chunk, so the next attempt starts at 0.
    #[test]
    fn a_damaged_stream_is_dropped() {
        let temp = tempfile::tempdir().unwrap();
        let partial = Partial::new(temp.path().to_path_buf());
        partial.write("s-1", 0, b"QSNP not really").unwrap();
        assert!(partial.verify("s-1", &meta()).is_err());
        assert_eq!(partial.held("s-1").unwrap(), 0);
    }

    /// A follower in memory over a real [`Partial`]: answers like [`Receiver`] (the last
    /// chunk "installs" by keeping the bytes), and fails every call after `fail_after`
    /// chunks until `failing` calls failed.
    struct Fake {
        partial: Partial,
        vote: Vote,
        chunks: usize,
        fail_after: usize,
        failing: usize,
        failed: usize,
        offsets: Vec<u64>,
        installed: Option<Vec<u8>>,
    }

    impl Fake {
        /// A follower holding `vote`, keeping its partial files in `dir`, whose calls fail
        /// `failing` times in a row once `fail_after` chunks arrived.
        fn new(dir: &Path, vote: Vote, fail_after: usize, failing: usize) -> Self {
            Self {
                partial: Partial::new(dir.to_path_buf()),
                vote,
                chunks: 0,
                fail_after,
                failing,
                failed: 0,
                offsets: Vec::new(),
                installed: None,
            }
        }

        fn fails(&mut self) -> bool {
            if self.chunks >= self.fail_after && self.failed < self.failing {
                self.failed += 1;
                return true;
            }
            false
        }
    }

    impl Link for Fake {
        async fn held(
            &mut self,
            request: HeldRequest,
            _: Duration,
        ) -> Result<TransferReply, String> {
            if self.fails() {
                return Err("cut".into());
            }
            if request.vote < self.vote {
                return Ok(TransferReply::HigherVote(self.vote));
            }
            Ok(TransferReply::Held(
                self.partial.held(&request.snapshot_id).unwrap(),
            ))
        }

        async fn chunk(
            &mut self,
            request: ChunkRequest,
            _: Duration,
        ) -> Result<TransferReply, String> {
            if self.fails() {
                return Err("cut".into());
            }
            self.chunks += 1;
            self.offsets.push(request.offset);
            let id = &request.snapshot_id;
            let reply = self
                .partial
                .write(id, request.offset, &request.data)
                .unwrap();
            if request.done && matches!(reply, TransferReply::Held(_)) {
                self.installed = Some(std::fs::read(self.partial.path(id).unwrap()).unwrap());
                self.partial.remove(id);
                return Ok(TransferReply::Installed(request.vote));
            }
            Ok(reply)
        }
    }

    fn snapshot(id: &str, bytes: &[u8]) -> Snapshot {
        Snapshot {
            meta: meta(),
            snapshot: SnapshotData::memory(id, bytes.to_vec()),
        }
    }

    const CHUNK: usize = 1000;

    fn pace() -> Pace {
        Pace {
            ttl: Duration::from_secs(5),
            chunk: CHUNK,
            pause: Duration::from_millis(1),
        }
    }

    fn never() -> impl Future<Output = ReplicationClosed> + Send + 'static {
        std::future::pending()
    }

    /// A transfer cut after N chunks: the attempt gives up; the next one asks, starts at
    /// the held offset (the chunks before it are not sent again) and the installed bytes
    /// equal the original.
    #[tokio::test]
    async fn a_cut_transfer_resumes_at_the_held_offset() {
        let temp = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(CHUNK * 5 + 234)).map(|i| (i % 251) as u8).collect();
        let mut fake = Fake::new(temp.path(), vote(3), 2, usize::MAX);
        let first = send(
            &mut fake,
            vote(3),
            snapshot("7-1-99", &bytes),
            never(),
            pace(),
        )
        .await;
        assert!(
            matches!(first, Err(StreamingError::Unreachable(_))),
            "{first:?}"
        );
        assert_eq!(fake.failed, MAX_FAILURES as usize);
        let held = fake.partial.held("7-1-99").unwrap();
        assert_eq!(held, 2 * CHUNK as u64);
        assert!(fake.installed.is_none());

        // The connection is back: the next attempt of the replication layer.
        fake.failing = 0;
        fake.offsets.clear();
        let second = send(
            &mut fake,
            vote(3),
            snapshot("7-1-99", &bytes),
            never(),
            pace(),
        )
        .await
        .unwrap();
        assert_eq!(second.vote, vote(3));
        assert_eq!(
            fake.offsets.first(),
            Some(&held),
            "resumed where it stopped"
        );
        assert_eq!(fake.offsets.len(), 4, "only the chunks it lacked");
        assert!(
            fake.installed.as_ref() == Some(&bytes),
            "installed bytes differ"
        );
        assert_eq!(fake.partial.held("7-1-99").unwrap(), 0);
    }

    /// Failures within one attempt: after each, the sender asks again and goes on from
    /// the held offset, never from 0.
    #[tokio::test]
    async fn a_failed_call_is_followed_by_the_question_not_a_restart() {
        let temp = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(CHUNK * 3 + 5)).map(|i| (i % 13) as u8).collect();
        let mut fake = Fake::new(temp.path(), vote(3), 1, 3);
        send(
            &mut fake,
            vote(3),
            snapshot("9-2-1", &bytes),
            never(),
            pace(),
        )
        .await
        .unwrap();
        assert_eq!(fake.failed, 3);
        let c = CHUNK as u64;
        assert_eq!(fake.offsets, vec![0, c, 2 * c, 3 * c]);
        assert!(fake.installed.as_ref() == Some(&bytes));
    }

    /// A snapshot whose files went (a newer one replaced it) ends the attempt as a
    /// transient failure, not as a storage error (openraft would stop the group).
    #[tokio::test]
    async fn an_unreadable_snapshot_is_no_storage_error() {
        use super::super::snapshot::{FileEntry, FileKind, Manifest, Stored};
        let temp = tempfile::tempdir().unwrap();
        let mut manifest = Manifest::bare(
            "5-1-1".into(),
            meta().last_log_id,
            StoredMembership::default(),
        );
        manifest.files.push(FileEntry {
            path: "0/00.log".into(),
            len: 10,
            crc: 0,
            kind: FileKind::Immutable,
            inode: 0,
        });
        let gone = Stored {
            dir: temp.path().join("snap-gone"),
            manifest,
        };
        let mut fake = Fake::new(&temp.path().join("receiver"), vote(3), usize::MAX, 0);
        let snapshot = Snapshot {
            meta: meta(),
            snapshot: SnapshotData::pack("5-1-1", gone.reader().unwrap()),
        };
        let answer = send(&mut fake, vote(3), snapshot, never(), pace()).await;
        assert!(
            matches!(answer, Err(StreamingError::Unreachable(_))),
            "{answer:?}"
        );
    }

    /// A higher vote on the follower ends the transfer with that vote; a cancel ends it
    /// with `Closed`.
    #[tokio::test]
    async fn a_higher_vote_or_a_cancel_ends_it() {
        let temp = tempfile::tempdir().unwrap();
        let mut fake = Fake::new(temp.path(), vote(5), usize::MAX, 0);
        let answer = send(
            &mut fake,
            vote(3),
            snapshot("1-1-1", b"QSNPbytes"),
            never(),
            pace(),
        )
        .await
        .unwrap();
        assert_eq!(answer.vote, vote(5));
        assert!(fake.offsets.is_empty());

        let closed = send(
            &mut fake,
            vote(5),
            snapshot("1-1-1", b"QSNPbytes"),
            std::future::ready(ReplicationClosed::new("test")),
            pace(),
        )
        .await;
        assert!(
            matches!(closed, Err(StreamingError::Closed(_))),
            "{closed:?}"
        );
    }
}
