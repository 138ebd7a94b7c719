//! Group commit of publishes on a queue's leader: publishes to one queue that arrive while
//! its group already has [`WRITERS`] entries on the way are proposed together as one Raft
//! entry (one `Op::Publish` with all their messages, stamped with the latest of their
//! times), and each caller gets back its own share of the offsets.
//!
//! openraft appends (and, with `--fsync always`, syncs) each entry on its own, so one entry
//! per publish would bound a queue to about one publish per fsync; a batch of publishes
//! shares one. Under a light load every publish is still its own entry, written at once.
//!
//! A batch whose apply fails (a message too large, say: a publish is checked when it is
//! applied, before anything is written) is proposed again one publish at a time, so each
//! caller gets its own answer; a batch that was not committed (no leader, no quorum) is
//! answered "no leader" to every caller, who may retry as after any lost answer.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::propose_entry;
use super::types::{Command, Raft};
use crate::broker::BrokerError;
use crate::broker::replicate::{Op, OpResult, WireError, WireMessage};

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
    /// Proposes a publish of `messages` to `queue` in `raft`'s group `group` (this node
    /// leads it), alone or with others.
    pub async fn publish(
        self: &Arc<Self>,
        raft: &Raft,
        group: u64,
        queue: String,
        messages: Vec<WireMessage>,
        now_ms: i64,
    ) -> Proposed {
        let (answer, answered) = oneshot::channel();
        let start_writer = {
            let mut groups = self.groups.lock();
            let pending = groups.entry(group).or_default();
            pending.waiting.push(Waiter {
                queue,
                messages,
                now_ms,
                answer,
            });
            if pending.writers < WRITERS {
                pending.writers += 1;
                true
            } else {
                false
            }
        };
        if start_writer {
            tokio::spawn(Arc::clone(self).write(raft.clone(), group));
        }
        answered.await.unwrap_or_else(|_| {
            Err(BrokerError::NoLeader(
                "the publish was dropped unanswered".into(),
            ))
        })
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
    async fn write(self: Arc<Self>, raft: Raft, group: u64) {
        while let Some(batch) = self.take(group) {
            write_batch(&raft, group, batch).await;
        }
    }
}

fn publish(queue: String, messages: Vec<WireMessage>, now_ms: i64) -> Command {
    Command::Broker(Op::Publish {
        queue,
        messages,
        now_ms,
    })
}

/// Proposes one waiter's publish alone and answers it.
async fn write_alone(raft: &Raft, group: u64, w: Waiter) {
    let result = propose_entry(raft, group, publish(w.queue, w.messages, w.now_ms)).await;
    let _ = w.answer.send(result);
}

/// Proposes `batch` as one entry and gives each waiter its share of the offsets.
async fn write_batch(raft: &Raft, group: u64, mut batch: Vec<Waiter>) {
    if batch.len() == 1
        && let Some(w) = batch.pop()
    {
        return write_alone(raft, group, w).await;
    }
    let Some(queue) = batch.first().map(|w| w.queue.clone()) else {
        return;
    };
    let now_ms = batch.iter().map(|w| w.now_ms).max().unwrap_or_default();
    let total: usize = batch.iter().map(|w| w.messages.len()).sum();
    // The waiters keep their messages (bodies are shared, not copied) in case the batch is
    // refused and each has to go alone.
    let messages: Vec<WireMessage> = batch
        .iter()
        .flat_map(|w| w.messages.iter().cloned())
        .collect();
    match propose_entry(raft, group, publish(queue, messages, now_ms)).await {
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
                write_alone(raft, group, w).await;
            }
        }
    }
}
