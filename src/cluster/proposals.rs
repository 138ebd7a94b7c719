//! Group commit of publishes on a queue's leader: publishes to one queue that arrive while
//! its group already has [`WRITERS`] entries on the way are proposed together as one Raft
//! entry (one [`Command::Publish`] with all their messages, encoded once, stamped with the
//! latest of their times), and each caller gets back its own share of the offsets.
//!
//! Every entry is a Raft round of its own (a write, with `--fsync always` a sync, and an
//! AppendEntries to each follower), so one entry per publish would bound a queue to about
//! one publish per round; a batch of publishes shares one. Under a light load every
//! publish is still its own entry, written at once.
//!
//! A batch whose apply fails (a message too large, say: a publish is checked when it is
//! applied, before anything is written) is proposed again one publish at a time, so each
//! caller gets its own answer; a batch that was not committed (no leader, no quorum) is
//! answered "no leader" to every caller, who may retry as after any lost answer.
//!
//! The same batching serves a node that forwards publishes to the queue's leader: the
//! publishes to one queue that arrive while [`WRITERS`] forwards are on the way go as one
//! forwarded publish (one call to the leader instead of one per publish). Where a batch
//! goes is the caller's [`Sink`].

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use openraft::async_runtime::watch::WatchReceiver;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::propose_entry;
use super::publish_batch::{EncodedPublish, RecordBatch};
use super::state_machine::Raft;
use super::types::{Command, EncodedRecords};
use crate::broker::replicate::{OpResult, WireError, WireMessage, WireRecord};
use crate::broker::sequencer::Sequenced;
use crate::broker::{Broker, BrokerError, NewMessage};
use crate::log::Record;

/// Where a batch of publishes goes (one [`Command::Publish`]), and what it answered.
pub type Sink = Arc<dyn Fn(Command) -> BoxFuture<'static, Proposed> + Send + Sync>;

/// The sink of a group this node leads: proposed as one entry.
pub fn propose_to(raft: &Raft, group: u64) -> Sink {
    let raft = raft.clone();
    Arc::new(move |command| {
        let raft = raft.clone();
        Box::pin(async move { propose_entry(&raft, group, command).await })
    })
}

/// The sink of a split queue's group this node leads (a partition group, or the queue
/// group for partition 0), whose leader decides its publishes before they are replicated
/// (see [`crate::broker::sequencer`]): once every entry of its log from before its term is
/// applied here (the last leader's entries may hold keys, see `ready_to_sequence`), the
/// publish is sequenced, and its new messages are proposed as the records they are stored
/// as ([`Command::RecordBatch`]). The write goes on when its caller stops waiting for it
/// (after [`super::COMMIT_WAIT`]): the keys it holds stay pending until it is known whether the
/// entry was committed, so a retry of the publish waits for that instead of storing the
/// messages twice.
pub fn sequence_to(raft: &Raft, group: u64, broker: Arc<Broker>, partition: u32) -> Sink {
    let raft = raft.clone();
    Arc::new(move |command| {
        let (raft, broker) = (raft.clone(), Arc::clone(&broker));
        Box::pin(async move { sequence(raft, group, broker, partition, command).await })
    })
}

/// Publishes and record appends a split queue's group's leader sequenced (see
/// [`sequence_to`], [`sequence_append`]), with label `outcome`: `written` (records
/// proposed), `known` (every message published before, nothing written) (counter).
pub const SEQUENCED: &str = "qit_cluster_publishes_sequenced_total";

/// Sequences a publish and proposes its records (see [`sequence_to`]).
async fn sequence(
    raft: Raft,
    group: u64,
    broker: Arc<Broker>,
    partition: u32,
    command: Command,
) -> Proposed {
    let (queue, messages, now_ms) = super::publish_parts(command)?;
    if let Some(other) = messages
        .iter()
        .find_map(|m| m.partition.filter(|p| *p != partition))
    {
        return Err(BrokerError::InvalidArgument(format!(
            "a publish to partition {other} reached the group of partition {partition}"
        )));
    }
    ready_to_sequence(&raft, group).await?;
    let messages: Vec<NewMessage> = messages.into_iter().map(NewMessage::from).collect();
    let sequenced = tokio::time::timeout(
        super::COMMIT_WAIT,
        broker.sequence(&queue, partition, &messages, now_ms),
    )
    .await
    .map_err(|_| super::not_committed(group))??;
    write_sequenced(raft, group, broker, queue, sequenced).await
}

/// An append of records (a Kafka producer's batch) to partition `partition`, whose group
/// `group` this node leads: sequenced by this leader, once per `batch_key` within the
/// dedup window (see [`Broker::sequence_records`]), then proposed as the records they are
/// stored as, as a publish is ([`sequence_to`]).
pub async fn sequence_append(
    raft: &Raft,
    group: u64,
    broker: Arc<Broker>,
    partition: u32,
    append: AppendParts,
) -> Proposed {
    let AppendParts {
        queue,
        partition: named,
        records,
        batch_key,
        now_ms,
    } = append;
    if named != partition {
        return Err(BrokerError::InvalidArgument(format!(
            "an append to partition {named} reached the group of partition {partition}"
        )));
    }
    ready_to_sequence(raft, group).await?;
    let records: Vec<Record> = records.into_iter().map(Record::from).collect();
    let sequenced = tokio::time::timeout(
        super::COMMIT_WAIT,
        broker.sequence_records(&queue, partition, records, batch_key.as_deref(), now_ms),
    )
    .await
    .map_err(|_| super::not_committed(group))??;
    write_sequenced(raft.clone(), group, broker, queue, sequenced).await
}

/// Waits until this leader may sequence: every entry of its log from before its term
/// applied here, since those may hold keys its dedup window must know (the entries of its
/// own term are ones it sequenced itself: their keys are pending or settled here). Once an
/// entry of its term is applied, every earlier one is: no wait, which is every publish but
/// the first few after an election. Before, openraft's read index ([`super::confirm_read`])
/// confirms the leadership and waits for what was committed.
async fn ready_to_sequence(raft: &Raft, group: u64) -> Result<(), BrokerError> {
    if applied_own_term(raft) {
        return Ok(());
    }
    super::confirm_read(raft, super::LEADER_WAIT)
        .await
        .map_err(|lost| super::no_leader(format!("group {group}: {}", lost.reason)))
}

/// This node leads `raft`'s group and has applied an entry of its own term.
fn applied_own_term(raft: &Raft) -> bool {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    m.state == openraft::ServerState::Leader
        && m.last_applied.is_some_and(|applied| {
            applied.leader_id.term == m.current_term && applied.leader_id.node_id == m.id
        })
}

/// An append of records as [`sequence_append`] takes it.
pub struct AppendParts {
    /// The queue.
    pub queue: String,
    /// The partition it names.
    pub partition: u32,
    /// The records.
    pub records: Vec<WireRecord>,
    /// Stored once per this key within the dedup window, when given.
    pub batch_key: Option<String>,
    /// When it was made.
    pub now_ms: i64,
}

/// Proposes the records of a sequenced publish or append as one [`Command::RecordBatch`]
/// entry, settles it with the outcome and answers where each message went (nothing is
/// written when every message was known: each answers the id it got before).
async fn write_sequenced(
    raft: Raft,
    group: u64,
    broker: Arc<Broker>,
    queue: String,
    sequenced: Sequenced,
) -> Proposed {
    if sequenced.records.is_empty() {
        // Every message was published before: nothing to write.
        metrics::counter!(SEQUENCED, "outcome" => "known").increment(1);
        let places = places(&sequenced, 0);
        return Ok((OpResult::Published(places), None));
    }
    // Encoded from the records themselves, not from a copy of them.
    let records = match RecordBatch::encode(&sequenced.records) {
        Ok(records) => Command::RecordBatch(EncodedRecords {
            queue: queue.clone(),
            partition: sequenced.partition,
            records,
        }),
        Err(error) => {
            // Nothing written: its keys are free again.
            if let Err(error) = broker.settle(&queue, &sequenced, None).await {
                tracing::warn!(%error, queue, "settling a sequenced publish failed");
            }
            return Err(BrokerError::from(error));
        }
    };
    metrics::counter!(SEQUENCED, "outcome" => "written").increment(1);
    let write = tokio::spawn(async move {
        let written = super::write_entry(&raft, group, records).await;
        let first = match &written {
            Ok((OpResult::Published(at), _)) => at.first().map(|(_, offset)| *offset),
            _ => None,
        };
        if let Err(error) = broker.settle(&queue, &sequenced, first).await {
            tracing::warn!(%error, queue, "settling a sequenced publish failed");
        }
        match (written, first) {
            (Ok((_, applied)), Some(first)) => {
                Ok((OpResult::Published(places(&sequenced, first)), applied))
            }
            (Ok((other, _)), None) => Err(BrokerError::from(WireError {
                code: "internal".into(),
                message: format!("records were answered with {other:?}"),
            })),
            (Err(error), _) => Err(error),
        }
    });
    match tokio::time::timeout(super::COMMIT_WAIT, write).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(join)) => Err(super::no_leader(format!("group {group}: {join}"))),
        Err(_) => Err(super::not_committed(group)),
    }
}

/// Where each message of a sequenced publish went, its new records appended from `first`.
fn places(sequenced: &Sequenced, first: u64) -> Vec<(u32, u64)> {
    sequenced
        .ids(first)
        .into_iter()
        .map(|id| (id.partition, id.offset))
        .collect()
}

/// Entries of one group on the way at once (more publishes wait and go as one entry).
pub const WRITERS: usize = 4;
/// Most messages in one entry.
pub const MAX_MESSAGES: usize = 10_000;
/// Most body bytes in one entry (a single larger publish still goes alone).
pub const MAX_BYTES: usize = 4 * 1024 * 1024;

/// What a proposal answers: the outcome and the committed entry's `(group, index)`.
pub type Proposed = Result<(OpResult, Option<(u64, u64)>), BrokerError>;

/// One caller's publish.
struct Waiter {
    queue: String,
    messages: Vec<WireMessage>,
    now_ms: i64,
    answer: oneshot::Sender<Proposed>,
}

impl Waiter {
    /// A publish waiting to be written, and where its answer arrives.
    fn new(
        queue: String,
        messages: Vec<WireMessage>,
        now_ms: i64,
    ) -> (Self, oneshot::Receiver<Proposed>) {
        let (answer, answered) = oneshot::channel();
        let waiter = Self {
            queue,
            messages,
            now_ms,
            answer,
        };
        (waiter, answered)
    }

    fn bytes(&self) -> usize {
        self.messages.iter().map(|m| m.body.len()).sum()
    }
}

#[derive(Default)]
struct Pending {
    waiting: Vec<Waiter>,
    writers: usize,
}

/// The publishes waiting, per group.
#[derive(Default)]
pub struct Proposals {
    groups: Mutex<HashMap<u64, Pending>>,
}

impl Proposals {
    /// Sends a publish of `messages` to `queue` (group `group`) to the `sink` (made only
    /// when a new writer starts), alone or with others.
    pub async fn publish(
        self: &Arc<Self>,
        sink: impl FnOnce() -> Sink,
        group: u64,
        queue: String,
        messages: Vec<WireMessage>,
        now_ms: i64,
    ) -> Proposed {
        let (waiter, answered) = Waiter::new(queue, messages, now_ms);
        self.enqueue(sink, group, vec![waiter]);
        answer(answered).await
    }

    /// Sends several publishes to `queue` (group `group`) that arrived together, each with
    /// its own answer (in order), as [`Self::publish`] sends one: they queue at once, under
    /// one lock, so they go in the same entry unless it is full.
    pub async fn publish_many(
        self: &Arc<Self>,
        sink: impl FnOnce() -> Sink,
        group: u64,
        queue: String,
        publishes: Vec<Vec<WireMessage>>,
        now_ms: i64,
    ) -> Vec<Proposed> {
        let (waiters, answers): (Vec<Waiter>, Vec<_>) = publishes
            .into_iter()
            .map(|messages| Waiter::new(queue.clone(), messages, now_ms))
            .unzip();
        self.enqueue(sink, group, waiters);
        futures_util::future::join_all(answers.into_iter().map(answer)).await
    }

    /// Queues `waiters` on `group` and starts a writer for them when fewer than
    /// [`WRITERS`] are at work.
    fn enqueue(self: &Arc<Self>, sink: impl FnOnce() -> Sink, group: u64, waiters: Vec<Waiter>) {
        let start_writer = {
            let mut groups = self.groups.lock();
            let pending = groups.entry(group).or_default();
            let some = !waiters.is_empty();
            pending.waiting.extend(waiters);
            if some && pending.writers < WRITERS {
                pending.writers += 1;
                true
            } else {
                false
            }
        };
        if start_writer {
            tokio::spawn(Arc::clone(self).write(sink(), group));
        }
    }

    /// The next batch of `group`, or `None` (and one writer fewer) when none waits.
    fn take(&self, group: u64) -> Option<Vec<Waiter>> {
        let mut groups = self.groups.lock();
        let pending = groups.get_mut(&group)?;
        if pending.waiting.is_empty() {
            pending.writers = pending.writers.saturating_sub(1);
            if pending.writers == 0 {
                groups.remove(&group);
            }
            return None;
        }
        let (mut messages, mut bytes, mut n) = (0, 0, 0);
        for w in &pending.waiting {
            if n > 0
                && (messages + w.messages.len() > MAX_MESSAGES || bytes + w.bytes() > MAX_BYTES)
            {
                break;
            }
            messages += w.messages.len();
            bytes += w.bytes();
            n += 1;
        }
        Some(pending.waiting.drain(..n).collect())
    }

    /// Writes batches of `group` until none waits.
    async fn write(self: Arc<Self>, sink: Sink, group: u64) {
        while let Some(batch) = self.take(group) {
            write_batch(&sink, batch).await;
        }
    }
}

/// A waiter's answer, or "no leader" when its writer dropped it unanswered.
async fn answer(answered: oneshot::Receiver<Proposed>) -> Proposed {
    answered.await.unwrap_or_else(|_| {
        Err(BrokerError::NoLeader(
            "the publish was dropped unanswered".into(),
        ))
    })
}

/// The command of a publish of `messages` to `queue`: encoded once, here, as one buffer
/// that the Raft log, the followers and every apply share (see [`super::publish_batch`]).
fn publish<'a>(
    queue: String,
    messages: impl IntoIterator<Item = &'a WireMessage> + Clone,
    now_ms: i64,
) -> Result<Command, BrokerError> {
    Ok(Command::Publish(EncodedPublish::new(
        queue, messages, now_ms,
    )?))
}

/// Sends one waiter's publish alone and answers it.
async fn write_alone(sink: &Sink, w: Waiter) {
    let result = match publish(w.queue, &w.messages, w.now_ms) {
        Ok(command) => sink(command).await,
        Err(error) => Err(error),
    };
    let _ = w.answer.send(result);
}

/// Sends `batch` as one publish and gives each waiter its share of the offsets.
async fn write_batch(sink: &Sink, mut batch: Vec<Waiter>) {
    if batch.len() == 1
        && let Some(w) = batch.pop()
    {
        return write_alone(sink, w).await;
    }
    let Some(queue) = batch.first().map(|w| w.queue.clone()) else {
        return;
    };
    let now_ms = batch.iter().map(|w| w.now_ms).max().unwrap_or_default();
    let total: usize = batch.iter().map(|w| w.messages.len()).sum();
    // Encoded from the waiters' messages, which they keep in case the batch is refused
    // and each has to go alone.
    let command = match publish(queue, batch.iter().flat_map(|w| &w.messages), now_ms) {
        Ok(command) => command,
        Err(error) => {
            // One publish too large to encode fails the batch: each goes alone, so only
            // that one is refused (with the encoder's own words).
            tracing::debug!(%error, "a batch of publishes did not encode; proposing each alone");
            for w in batch {
                write_alone(sink, w).await;
            }
            return;
        }
    };
    match sink(command).await {
        Ok((OpResult::Published(places), applied)) if places.len() == total => {
            let mut places = places.into_iter();
            for w in batch {
                let mine: Vec<(u32, u64)> = places.by_ref().take(w.messages.len()).collect();
                let _ = w.answer.send(Ok((OpResult::Published(mine), applied)));
            }
        }
        Ok((other, _)) => {
            tracing::error!(
                ?other,
                total,
                "a batch of publishes answered something else"
            );
            let error = WireError {
                code: "internal".into(),
                message: "a batch of publishes was answered without one place per message".into(),
            };
            for w in batch {
                let _ = w.answer.send(Err(BrokerError::from(error.clone())));
            }
        }
        Err(BrokerError::NoLeader(why)) => {
            for w in batch {
                let _ = w.answer.send(Err(BrokerError::NoLeader(why.clone())));
            }
        }
        Err(error) => {
            // Applying refused the batch before writing anything (one bad message fails a
            // whole publish): each publish goes alone, for its own answer.
            tracing::debug!(%error, "a batch of publishes was refused; proposing each alone");
            for w in batch {
                write_alone(sink, w).await;
            }
        }
    }
}
