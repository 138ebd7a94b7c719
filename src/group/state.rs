//! The delivery state of one consumer group: a pure state machine.
//!
//! It takes events (lease, ack, nack, extend, expiry, seek) with the current time `now` (ms)
//! and returns what happened plus the [`Event`]s to journal. It does no I/O: the broker reads
//! candidate records from the log and offers them, appends events to the journal, and
//! appends dead letters to the DLQ.
//!
//! Per partition every offset in `[floor, cursor)` is in exactly one of: `done` (acked or
//! dead-lettered), `leases` (in flight), `waiting` (to be redelivered at a time), or `parked`
//! (skipped by `ordering = key` because its key was busy). Offsets below `floor` are all
//! done; offsets from `cursor` on were never delivered since the last restart or seek.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::event::Event;
use super::ranges::RangeSet;

/// Most parked offsets per partition before new reads wait (bounds memory).
pub const MAX_PARKED: usize = 10_000;
/// `due_ms` of a message whose dead-lettering is under way (never due by time).
const DEAD_LETTERING: i64 = i64::MAX;

/// Delivery ordering within a group (the queue setting `ordering`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Any number of messages in flight, of any key.
    #[default]
    None,
    /// At most one message per key in flight.
    Key,
}

/// The queue settings a group obeys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// Deliveries before dead-lettering (0 = unlimited).
    pub max_deliveries: u32,
    /// Redelivery delays (s) by delivery count; the last repeats; empty = at once.
    pub backoff_secs: Vec<u64>,
    /// Most leases at once across partitions.
    pub max_in_flight: u32,
    /// Per-key ordering.
    pub ordering: Ordering,
}

impl GroupConfig {
    fn backoff_ms(&self, delivery_count: u32) -> i64 {
        let index = delivery_count.max(1) as usize - 1;
        let secs = self
            .backoff_secs
            .get(index)
            .or(self.backoff_secs.last())
            .copied()
            .unwrap_or(0);
        (secs.min(i64::MAX as u64 / 1000) * 1000) as i64
    }

    fn exhausted(&self, delivery_count: u32) -> bool {
        exhausts(self.max_deliveries, delivery_count)
    }
}

/// True when `delivery_count` deliveries use up `max_deliveries` (0 = unlimited).
fn exhausts(max_deliveries: u32, delivery_count: u32) -> bool {
    max_deliveries > 0 && delivery_count >= max_deliveries
}

/// A record offered for leasing: its offset and the hash of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Offset in the partition.
    pub offset: u64,
    /// Hash of the key, if the record has one.
    pub key: Option<u64>,
}

/// A lease handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// 1 on first delivery.
    pub delivery_count: u32,
}

/// Why a message left its lease without an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The consumer nacked it.
    Nacked,
    /// Its visibility timeout passed.
    Expired,
}

impl Reason {
    /// The name used in dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Nacked => "nacked",
            Reason::Expired => "expired",
        }
    }
}

/// What became of a message after nack or expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It will be offered again from `due_ms`.
    Redeliver {
        /// When.
        due_ms: i64,
        /// Deliveries it had.
        delivery_count: u32,
    },
    /// It ran out of deliveries: the broker must append it to the DLQ, then call
    /// [`GroupState::complete_dead_letter`]; until then it is not offered again (a failed
    /// append is retried), unless the DLQ refuses it ([`GroupState::abort_dead_letter`]).
    DeadLetter {
        /// Deliveries it had.
        delivery_count: u32,
        /// Why the last one failed.
        reason: Reason,
    },
}

/// A lease that ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// What happens next.
    pub outcome: Outcome,
}

/// Errors of group operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The partition does not exist.
    #[error("no partition {0}")]
    NoPartition(u32),
    /// The offset was never delivered to this group.
    #[error("offset {0} was never delivered")]
    NeverDelivered(u64),
    /// The offset is not leased now (acked, waiting for redelivery, or dead-lettering).
    #[error("offset {0} is not leased")]
    NotLeased(u64),
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    deadline_ms: i64,
    delivery_count: u32,
    key: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Waiting {
    due_ms: i64,
    delivery_count: u32,
    key: Option<u64>,
}

/// One partition's share of a group's state.
#[derive(Debug, Clone, Default)]
pub struct PartitionState {
    floor: u64,
    cursor: u64,
    leases: BTreeMap<u64, Lease>,
    deadlines: BTreeSet<(i64, u64)>,
    waiting: BTreeMap<u64, Waiting>,
    parked: BTreeMap<u64, Option<u64>>,
    done: RangeSet,
    /// Delivery counts of not-done offsets from before a restart.
    counts: HashMap<u64, u32>,
}

impl PartitionState {
    fn starting_at(offset: u64) -> Self {
        Self {
            floor: offset,
            cursor: offset,
            ..Self::default()
        }
    }

    /// Marks `offset` done and advances the floor over contiguous done offsets.
    fn mark_done(&mut self, offset: u64) -> bool {
        if offset < self.floor || !self.done.insert(offset) {
            return false;
        }
        self.counts.remove(&offset);
        while let Some(end) = self.done.take_range_at(self.floor) {
            self.floor = end;
        }
        self.cursor = self.cursor.max(self.floor);
        true
    }

    /// Marks `[start, end)` done (offsets the log does not hold, or a restored snapshot).
    fn mark_done_range(&mut self, start: u64, end: u64) {
        let start = start.max(self.floor);
        if start >= end {
            return;
        }
        self.done.insert_range(start, end);
        self.counts.retain(|o, _| *o < start || *o >= end);
        while let Some(end) = self.done.take_range_at(self.floor) {
            self.floor = end;
        }
        self.cursor = self.cursor.max(self.floor);
    }

    fn is_done(&self, offset: u64) -> bool {
        offset < self.floor || self.done.contains(offset)
    }

    fn remove_lease(&mut self, offset: u64) -> Option<Lease> {
        let lease = self.leases.remove(&offset)?;
        self.deadlines.remove(&(lease.deadline_ms, offset));
        Some(lease)
    }

    fn add_lease(&mut self, offset: u64, lease: Lease) {
        self.deadlines.insert((lease.deadline_ms, offset));
        self.leases.insert(offset, lease);
    }

    /// Ends the delivery of `offset` that used up its deliveries (`delivery_count`) and
    /// was cut off without an outcome: it failed, as if its lease had expired. It gets a
    /// lease that is already over, so the next [`GroupState::expire`] sends it to the
    /// dead-letter queue instead of delivering it again.
    /// `key` is the message's key when known: the caller holds it, so that with key
    /// ordering the next message of the key waits until this one reached the DLQ.
    fn end_delivery(&mut self, offset: u64, delivery_count: u32, key: Option<u64>) {
        self.counts.remove(&offset);
        self.add_lease(
            offset,
            Lease {
                deadline_ms: i64::MIN,
                delivery_count,
                key,
            },
        );
    }
}

/// A group's whole state: one [`PartitionState`] per partition plus shared limits.
#[derive(Debug, Clone)]
pub struct GroupState {
    config: GroupConfig,
    partitions: Vec<PartitionState>,
    /// Keys with a message leased or waiting (ordering = key), with how many.
    busy_keys: HashMap<u64, u32>,
    in_flight: usize,
    /// Deliveries beyond the first, since this state was built.
    pub redelivered: u64,
    /// Messages dead-lettered (kept across restarts).
    pub dead_lettered: u64,
    /// Leases that expired, since this state was built.
    pub expired: u64,
}

impl GroupState {
    /// A fresh group whose partition `i` starts at `starts[i]`.
    pub fn new(config: GroupConfig, starts: &[u64]) -> Self {
        Self {
            config,
            partitions: starts
                .iter()
                .map(|s| PartitionState::starting_at(*s))
                .collect(),
            busy_keys: HashMap::new(),
            in_flight: 0,
            redelivered: 0,
            dead_lettered: 0,
            expired: 0,
        }
    }

    /// Replaces the settings (after a queue's settings change on restart).
    pub fn set_config(&mut self, config: GroupConfig) {
        self.config = config;
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    fn part(&self, partition: u32) -> Result<&PartitionState, GroupError> {
        self.partitions
            .get(partition as usize)
            .ok_or(GroupError::NoPartition(partition))
    }

    fn part_mut(&mut self, partition: u32) -> Result<&mut PartitionState, GroupError> {
        self.partitions
            .get_mut(partition as usize)
            .ok_or(GroupError::NoPartition(partition))
    }

    /// Where new candidates of `partition` should be read from.
    pub fn cursor(&self, partition: u32) -> u64 {
        self.part(partition).map_or(0, |p| p.cursor)
    }

    /// The ack floor of `partition`.
    pub fn floor(&self, partition: u32) -> u64 {
        self.part(partition).map_or(0, |p| p.floor)
    }

    /// Whether `offset` of `partition` is done (acked, dead-lettered, or below the floor).
    pub fn is_done(&self, partition: u32, offset: u64) -> bool {
        self.part(partition).is_ok_and(|p| p.is_done(offset))
    }

    /// Leases held on `partition`.
    pub fn in_flight_on(&self, partition: u32) -> u64 {
        self.part(partition).map_or(0, |p| p.leases.len() as u64)
    }

    /// Leases held in all.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Messages of `partition` not yet done, given the log's next offset `end`.
    pub fn backlog(&self, partition: u32, end: u64) -> u64 {
        self.part(partition).map_or(0, |p| {
            end.saturating_sub(p.floor).saturating_sub(p.done.len())
        })
    }

    /// How many more leases `max_in_flight` allows.
    pub fn capacity(&self) -> usize {
        (self.config.max_in_flight as usize).saturating_sub(self.in_flight)
    }

    /// True when `partition` may hand out a redelivery now or a parked message.
    pub fn has_ready(&self, partition: u32, now: i64) -> bool {
        self.part(partition).is_ok_and(|p| {
            p.waiting.values().any(|w| w.due_ms <= now)
                || p.parked.values().any(|k| !self.key_busy(*k))
        })
    }

    /// True while something may change by itself (a lease or a waiting redelivery).
    pub fn has_timers(&self) -> bool {
        self.partitions
            .iter()
            .any(|p| !p.deadlines.is_empty() || !p.waiting.is_empty())
    }

    /// The earliest time something changes by itself (a lease expiry or a redelivery).
    pub fn next_wakeup(&self) -> Option<i64> {
        self.partitions
            .iter()
            .flat_map(|p| {
                let lease = p.deadlines.first().map(|(d, _)| *d);
                let due = p
                    .waiting
                    .values()
                    .map(|w| w.due_ms)
                    .filter(|d| *d != DEAD_LETTERING)
                    .min();
                lease.into_iter().chain(due)
            })
            .min()
    }

    fn key_busy(&self, key: Option<u64>) -> bool {
        self.config.ordering == Ordering::Key
            && key.is_some_and(|k| self.busy_keys.get(&k).is_some_and(|n| *n > 0))
    }

    fn hold_key(&mut self, key: Option<u64>) {
        if self.config.ordering == Ordering::Key
            && let Some(k) = key
        {
            *self.busy_keys.entry(k).or_default() += 1;
        }
    }

    /// Ends a delivery of `partition` that used up `max_deliveries` and was cut off
    /// without an outcome ([`PartitionState::end_delivery`]) as the lease paths reach it:
    /// until it expires into the dead-letter queue it holds its key and a place in flight,
    /// as the lease it stands for did.
    fn end_used_up_delivery(
        &mut self,
        partition: u32,
        offset: u64,
        delivery_count: u32,
        key: Option<u64>,
    ) -> Result<(), GroupError> {
        self.part_mut(partition)?
            .end_delivery(offset, delivery_count, key);
        self.hold_key(key);
        self.in_flight += 1;
        Ok(())
    }

    fn release_key(&mut self, key: Option<u64>) {
        if let Some(k) = key
            && let Some(n) = self.busy_keys.get_mut(&k)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.busy_keys.remove(&k);
            }
        }
    }

    /// Leases up to `max` messages of `partition`: due redeliveries and unblocked parked
    /// messages first (lowest offset first), then `fresh` candidates read from
    /// [`Self::cursor`] on. Returns the grants and the events to journal.
    pub fn lease(
        &mut self,
        partition: u32,
        now: i64,
        visibility_ms: i64,
        max: usize,
        fresh: &[Candidate],
    ) -> Result<(Vec<Grant>, Vec<Event>), GroupError> {
        let budget = max.min(self.capacity());
        let mut grants = Vec::new();
        if budget == 0 {
            self.part(partition)?;
            return Ok((grants, Vec::new()));
        }
        self.lease_old(partition, now, visibility_ms, budget, &mut grants)?;
        self.lease_fresh(partition, now, visibility_ms, budget, fresh, &mut grants)?;
        let events = grants
            .iter()
            .map(|g| Event::Leased {
                partition,
                offset: g.offset,
                delivery_count: g.delivery_count,
            })
            .collect();
        Ok((grants, events))
    }

    /// Due redeliveries and parked messages whose key is free.
    fn lease_old(
        &mut self,
        partition: u32,
        now: i64,
        visibility_ms: i64,
        budget: usize,
        grants: &mut Vec<Grant>,
    ) -> Result<(), GroupError> {
        let p = self.part(partition)?;
        let mut ready: Vec<(u64, bool)> = p
            .waiting
            .iter()
            .filter(|(_, w)| w.due_ms <= now)
            .map(|(o, _)| (*o, true))
            .take(budget)
            .collect();
        let mut free_keys: HashMap<u64, ()> = HashMap::new();
        for (offset, key) in &p.parked {
            if ready.len() >= budget * 2 {
                break;
            }
            // One parked message per key: the next one waits for this one's ack.
            let first_of_key = key.is_none_or(|k| free_keys.insert(k, ()).is_none());
            if first_of_key && !self.key_busy(*key) {
                ready.push((*offset, false));
            }
        }
        ready.sort_unstable();
        let max_deliveries = self.config.max_deliveries;
        for (offset, was_waiting) in ready.into_iter().take(budget) {
            // A delivery ended below holds a place in flight until it expires.
            if self.capacity() == 0 {
                break;
            }
            let p = self.part_mut(partition)?;
            let (count, key) = if was_waiting {
                let Some(w) = p.waiting.remove(&offset) else {
                    continue;
                };
                (w.delivery_count, w.key)
            } else {
                let Some(key) = p.parked.remove(&offset) else {
                    continue;
                };
                let count = p.counts.get(&offset).copied().unwrap_or(0);
                if exhausts(max_deliveries, count) {
                    // Its last delivery was cut off (see `lease_fresh`).
                    self.end_used_up_delivery(partition, offset, count, key)?;
                    continue;
                }
                p.counts.remove(&offset);
                (count, key)
            };
            let delivery_count = count + 1;
            p.add_lease(
                offset,
                Lease {
                    deadline_ms: now.saturating_add(visibility_ms),
                    delivery_count,
                    key,
                },
            );
            if !was_waiting {
                self.hold_key(key);
            }
            if delivery_count > 1 {
                self.redelivered += 1;
            }
            self.in_flight += 1;
            grants.push(Grant {
                partition,
                offset,
                delivery_count,
            });
        }
        Ok(())
    }

    /// New messages from the cursor on.
    fn lease_fresh(
        &mut self,
        partition: u32,
        now: i64,
        visibility_ms: i64,
        budget: usize,
        fresh: &[Candidate],
        grants: &mut Vec<Grant>,
    ) -> Result<(), GroupError> {
        let max_deliveries = self.config.max_deliveries;
        // The last offset leased or waiting. Normally all of them lie before the cursor and
        // one comparison per candidate says so; only a delivery a restart ended (on its way
        // to the DLQ, see `end_interrupted_deliveries`) can lie at or past it.
        let tracked_to = {
            let p = self.part(partition)?;
            let last_lease = p.leases.last_key_value().map(|(o, _)| *o);
            last_lease.max(p.waiting.last_key_value().map(|(o, _)| *o))
        };
        for candidate in fresh {
            if grants.len() >= budget || self.capacity() == 0 {
                break;
            }
            let busy = self.key_busy(candidate.key);
            let p = self.part_mut(partition)?;
            if candidate.offset < p.cursor {
                continue;
            }
            if tracked_to.is_some_and(|last| candidate.offset <= last)
                && (p.leases.contains_key(&candidate.offset)
                    || p.waiting.contains_key(&candidate.offset))
            {
                // Already tracked (a delivery a restart ended, on its way to the DLQ).
                p.cursor = candidate.offset + 1;
                continue;
            }
            // Offsets the log no longer has (compacted away) count as done.
            p.mark_done_range(p.cursor, candidate.offset);
            if p.is_done(candidate.offset) {
                p.cursor = p.cursor.max(candidate.offset + 1);
                continue;
            }
            if busy {
                if p.parked.len() >= MAX_PARKED {
                    break;
                }
                p.parked.insert(candidate.offset, candidate.key);
                p.cursor = candidate.offset + 1;
                continue;
            }
            let prior = p.counts.get(&candidate.offset).copied().unwrap_or(0);
            if exhausts(max_deliveries, prior) {
                // Its last delivery used up `max_deliveries` and was cut off without an
                // outcome: a cluster leader that took the group over knows the count its
                // predecessor replicated, but not the lease, which died with it. It
                // failed, as at a restart (`end_interrupted_deliveries`): to the DLQ,
                // never delivered once more than allowed.
                p.cursor = candidate.offset + 1;
                self.end_used_up_delivery(partition, candidate.offset, prior, candidate.key)?;
                continue;
            }
            p.counts.remove(&candidate.offset);
            let delivery_count = prior + 1;
            p.add_lease(
                candidate.offset,
                Lease {
                    deadline_ms: now.saturating_add(visibility_ms),
                    delivery_count,
                    key: candidate.key,
                },
            );
            p.cursor = candidate.offset + 1;
            self.hold_key(candidate.key);
            if delivery_count > 1 {
                self.redelivered += 1;
            }
            self.in_flight += 1;
            grants.push(Grant {
                partition,
                offset: candidate.offset,
                delivery_count,
            });
        }
        Ok(())
    }

    /// Acknowledges `offset`. `Ok(false)` when it was already done (harmless repeat).
    ///
    /// A message need not be leased now to be acked: a consumer that received it before a
    /// broker restart (which drops leases) may still finish it. The broker checks that the
    /// offset exists in the log.
    pub fn ack(&mut self, partition: u32, offset: u64) -> Result<(bool, Vec<Event>), GroupError> {
        let p = self.part_mut(partition)?;
        if p.is_done(offset) {
            return Ok((false, Vec::new()));
        }
        let key = if let Some(lease) = p.remove_lease(offset) {
            self.in_flight -= 1;
            lease.key
        } else if let Some(waiting) = p.waiting.remove(&offset) {
            waiting.key
        } else {
            // Parked or not delivered since the restart: no key is held for it.
            p.parked.remove(&offset);
            None
        };
        let p = self.part_mut(partition)?;
        p.mark_done(offset);
        self.release_key(key);
        Ok((true, vec![Event::Done { partition, offset }]))
    }

    /// Ends a lease without an ack: redeliver after `delay_ms` (default: the backoff for
    /// its delivery count), or dead-letter it when it has had `max_deliveries`.
    pub fn nack(
        &mut self,
        partition: u32,
        offset: u64,
        now: i64,
        delay_ms: Option<i64>,
    ) -> Result<Outcome, GroupError> {
        let p = self.part_mut(partition)?;
        let Some(lease) = p.remove_lease(offset) else {
            return Err(if p.is_done(offset) || offset < p.cursor {
                GroupError::NotLeased(offset)
            } else {
                GroupError::NeverDelivered(offset)
            });
        };
        self.in_flight -= 1;
        Ok(self.after_failure(partition, offset, lease, now, delay_ms, Reason::Nacked))
    }

    fn after_failure(
        &mut self,
        partition: u32,
        offset: u64,
        lease: Lease,
        now: i64,
        delay_ms: Option<i64>,
        reason: Reason,
    ) -> Outcome {
        let exhausted = self.config.exhausted(lease.delivery_count);
        let due_ms = if exhausted {
            DEAD_LETTERING
        } else {
            now.saturating_add(
                delay_ms
                    .unwrap_or_else(|| self.config.backoff_ms(lease.delivery_count))
                    .max(0),
            )
        };
        if let Some(p) = self.partitions.get_mut(partition as usize) {
            p.waiting.insert(
                offset,
                Waiting {
                    due_ms,
                    delivery_count: lease.delivery_count,
                    key: lease.key,
                },
            );
        }
        if exhausted {
            Outcome::DeadLetter {
                delivery_count: lease.delivery_count,
                reason,
            }
        } else {
            Outcome::Redeliver {
                due_ms,
                delivery_count: lease.delivery_count,
            }
        }
    }

    /// Ends every lease at once without counting a failed delivery: the messages wait for
    /// redelivery from `now` with the delivery counts they had (used before a redrive takes
    /// everything out of a dead-letter queue). Returns how many leases ended.
    pub fn release_leases(&mut self, now: i64) -> usize {
        let mut released = 0;
        for p in &mut self.partitions {
            let leases = std::mem::take(&mut p.leases);
            p.deadlines.clear();
            for (offset, lease) in leases {
                p.waiting.insert(
                    offset,
                    Waiting {
                        due_ms: now,
                        delivery_count: lease.delivery_count,
                        key: lease.key,
                    },
                );
                released += 1;
            }
        }
        self.in_flight -= released;
        released
    }

    /// Moves a lease's deadline to `now + visibility_ms`.
    pub fn extend(
        &mut self,
        partition: u32,
        offset: u64,
        now: i64,
        visibility_ms: i64,
    ) -> Result<(), GroupError> {
        let p = self.part_mut(partition)?;
        let Some(mut lease) = p.remove_lease(offset) else {
            return Err(GroupError::NotLeased(offset));
        };
        lease.deadline_ms = now.saturating_add(visibility_ms);
        p.add_lease(offset, lease);
        Ok(())
    }

    /// Ends every lease whose deadline is at or before `now`.
    pub fn expire(&mut self, now: i64) -> Vec<Expired> {
        let mut expired = Vec::new();
        for partition in 0..self.partitions.len() as u32 {
            while let Some(p) = self.partitions.get_mut(partition as usize) {
                let Some(&(deadline, offset)) = p.deadlines.first() else {
                    break;
                };
                if deadline > now {
                    break;
                }
                let Some(lease) = p.remove_lease(offset) else {
                    break;
                };
                self.in_flight -= 1;
                self.expired += 1;
                let outcome =
                    self.after_failure(partition, offset, lease, now, None, Reason::Expired);
                expired.push(Expired {
                    partition,
                    offset,
                    outcome,
                });
            }
        }
        expired
    }

    /// Records that a dead-lettered message reached the DLQ: it is done for this group.
    pub fn complete_dead_letter(&mut self, partition: u32, offset: u64) -> Vec<Event> {
        let Some(p) = self.partitions.get_mut(partition as usize) else {
            return Vec::new();
        };
        let key = p.waiting.remove(&offset).and_then(|w| w.key);
        if !p.mark_done(offset) {
            return Vec::new();
        }
        self.release_key(key);
        self.dead_lettered += 1;
        vec![Event::DeadLettered { partition, offset }]
    }

    /// The DLQ refused the message: offer it again now.
    pub fn abort_dead_letter(&mut self, partition: u32, offset: u64, now: i64) {
        if let Some(w) = self
            .partitions
            .get_mut(partition as usize)
            .and_then(|p| p.waiting.get_mut(&offset))
        {
            w.due_ms = now;
        }
    }

    /// Moves `partition` to `offset`: everything before it counts as done, everything from
    /// it on is delivered again. Leases on the partition are dropped.
    pub fn seek(&mut self, partition: u32, offset: u64) -> Result<Vec<Event>, GroupError> {
        let p = self.part_mut(partition)?;
        let old = std::mem::replace(p, PartitionState::starting_at(offset));
        self.in_flight -= old.leases.len();
        for key in old
            .leases
            .values()
            .map(|l| l.key)
            .chain(old.waiting.values().map(|w| w.key))
        {
            self.release_key(key);
        }
        Ok(vec![Event::Seek { partition, offset }])
    }

    /// Retention removed everything below `first`: skip there. Returns how many messages
    /// that were not done were skipped.
    pub fn skip_to(&mut self, partition: u32, first: u64) -> u64 {
        let Some(p) = self.partitions.get_mut(partition as usize) else {
            return 0;
        };
        if p.floor >= first {
            return 0;
        }
        let mut done_below = 0;
        for (start, end) in p.done.iter() {
            if start < first {
                done_below += end.min(first) - start;
            }
        }
        let skipped = (first - p.floor).saturating_sub(done_below);
        p.done.remove_below(first);
        p.floor = first;
        while let Some(end) = p.done.take_range_at(p.floor) {
            p.floor = end;
        }
        p.cursor = p.cursor.max(p.floor);
        p.parked.retain(|o, _| *o >= first);
        p.counts.retain(|o, _| *o >= first);
        let dropped: Vec<Option<u64>> = p.waiting.range(..first).map(|(_, w)| w.key).collect();
        p.waiting.retain(|o, _| *o >= first);
        for key in dropped {
            self.release_key(key);
        }
        skipped
    }

    /// The partition's log ends at `end` (recovery cut a torn tail the group had seen):
    /// whatever the group recorded at or past it is forgotten, so that the messages stored
    /// at those offsets next are new to it. Call on a state without leases (after
    /// [`Self::reset_after_restart`]). True when the state changed.
    pub fn cut_to(&mut self, partition: u32, end: u64) -> bool {
        let Some(p) = self.partitions.get_mut(partition as usize) else {
            return false;
        };
        let beyond = p.floor > end
            || p.done.iter().any(|(_, e)| e > end)
            || p.counts.keys().any(|o| *o >= end);
        if !beyond {
            return false;
        }
        p.floor = p.floor.min(end);
        p.cursor = p.cursor.min(end);
        p.done.remove_from(end);
        p.counts.retain(|o, _| *o < end);
        true
    }

    /// Replays one journaled event into a state being rebuilt.
    pub fn apply(&mut self, event: &Event) {
        match *event {
            Event::Leased {
                partition,
                offset,
                delivery_count,
            } => {
                if let Some(p) = self.partitions.get_mut(partition as usize)
                    && !p.is_done(offset)
                {
                    p.counts.insert(offset, delivery_count);
                }
            }
            Event::Done { partition, offset } => {
                if let Some(p) = self.partitions.get_mut(partition as usize) {
                    p.mark_done(offset);
                }
            }
            Event::DeadLettered { partition, offset } => {
                if let Some(p) = self.partitions.get_mut(partition as usize)
                    && p.mark_done(offset)
                {
                    self.dead_lettered += 1;
                }
            }
            Event::Seek { partition, offset } => {
                if let Some(p) = self.partitions.get_mut(partition as usize) {
                    *p = PartitionState::starting_at(offset);
                }
            }
        }
    }

    /// Learns that `offset` has had `delivery_count` deliveries (a cluster replicates the
    /// counts of deliveries from the leader, so that a new leader goes on counting).
    /// Counts only grow; a done message is left alone. True when the state changed (the
    /// caller journals it as [`Event::Leased`]).
    pub fn note_delivery_count(
        &mut self,
        partition: u32,
        offset: u64,
        delivery_count: u32,
    ) -> bool {
        let Some(p) = self.partitions.get_mut(partition as usize) else {
            return false;
        };
        if p.is_done(offset) {
            return false;
        }
        if let Some(lease) = p.leases.get_mut(&offset) {
            let grew = lease.delivery_count < delivery_count;
            lease.delivery_count = lease.delivery_count.max(delivery_count);
            return grew;
        }
        if let Some(waiting) = p.waiting.get_mut(&offset) {
            let grew = waiting.delivery_count < delivery_count;
            waiting.delivery_count = waiting.delivery_count.max(delivery_count);
            return grew;
        }
        let count = p.counts.entry(offset).or_insert(0);
        let grew = *count < delivery_count;
        *count = (*count).max(delivery_count);
        grew
    }

    /// After a restart nothing is leased: every not-done message is offered again, from the
    /// floor, with the delivery counts it had.
    pub fn reset_after_restart(&mut self) {
        for p in &mut self.partitions {
            p.cursor = p.floor;
            p.leases.clear();
            p.deadlines.clear();
            p.waiting.clear();
            p.parked.clear();
        }
        self.busy_keys.clear();
        self.in_flight = 0;
    }

    /// After [`Self::reset_after_restart`]: a message whose last delivery had used up
    /// `max_deliveries` when the restart ended its lease failed that delivery, as if its
    /// lease had expired. It gets a lease that is already over, so the next
    /// [`Self::expire`] sends it to the dead-letter queue instead of delivering it again.
    pub fn end_interrupted_deliveries(&mut self) {
        let config = &self.config;
        let mut ended = 0;
        for p in &mut self.partitions {
            let exhausted: Vec<(u64, u32)> = p
                .counts
                .iter()
                .filter(|(_, count)| config.exhausted(**count))
                .map(|(o, c)| (*o, *c))
                .collect();
            for (offset, delivery_count) in exhausted {
                p.end_delivery(offset, delivery_count, None);
                ended += 1;
            }
        }
        self.in_flight += ended;
    }

    /// The durable part of the state, for a checkpoint: floors, done ranges, delivery
    /// counts of messages not done, and the dead-letter counter.
    pub fn snapshot(&self) -> super::event::Snapshot {
        super::event::Snapshot {
            dead_lettered: self.dead_lettered,
            partitions: self
                .partitions
                .iter()
                .map(|p| {
                    let mut counts: Vec<(u64, u32)> =
                        p.counts.iter().map(|(o, c)| (*o, *c)).collect();
                    counts.extend(p.leases.iter().map(|(o, l)| (*o, l.delivery_count)));
                    counts.extend(p.waiting.iter().map(|(o, w)| (*o, w.delivery_count)));
                    counts.sort_unstable();
                    super::event::PartitionSnapshot {
                        floor: p.floor,
                        done: p.done.iter().collect(),
                        counts,
                    }
                })
                .collect(),
        }
    }

    /// Rebuilds a state from a snapshot (partitions beyond it start at `starts`).
    pub fn restore(config: GroupConfig, snapshot: &super::event::Snapshot, starts: &[u64]) -> Self {
        let mut state = Self::new(config, starts);
        state.dead_lettered = snapshot.dead_lettered;
        for (p, snap) in state.partitions.iter_mut().zip(&snapshot.partitions) {
            *p = PartitionState::starting_at(snap.floor);
            for (start, end) in &snap.done {
                p.mark_done_range(*start, *end);
            }
            p.counts = snap.counts.iter().copied().collect();
        }
        state
    }

    /// Approximate heap bytes held (for tests and metrics).
    pub fn approx_bytes(&self) -> usize {
        self.partitions
            .iter()
            .map(|p| {
                p.leases.len() * 64
                    + p.waiting.len() * 48
                    + p.parked.len() * 40
                    + p.done.range_count() * 32
                    + p.counts.len() * 24
            })
            .sum::<usize>()
            + self.busy_keys.len() * 24
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GroupConfig {
        GroupConfig {
            max_deliveries: 0,
            backoff_secs: vec![60],
            max_in_flight: 100,
            ordering: Ordering::None,
        }
    }

    fn fresh(offsets: std::ops::Range<u64>) -> Vec<Candidate> {
        offsets
            .map(|offset| Candidate { offset, key: None })
            .collect()
    }

    /// A replica that learned a message's failed deliveries (cluster mode) delivers it with
    /// the next count when it leads; counts never shrink and done messages stay done.
    #[test]
    fn noted_delivery_counts_carry_over_to_the_next_delivery() {
        let mut follower = GroupState::new(config(), &[0]);
        assert!(follower.note_delivery_count(0, 1, 2));
        assert!(
            !follower.note_delivery_count(0, 1, 1),
            "counts never shrink"
        );
        follower.ack(0, 0).unwrap();
        assert!(
            !follower.note_delivery_count(0, 0, 5),
            "a done message stays done"
        );
        assert!(!follower.note_delivery_count(9, 0, 5), "no such partition");
        let (grants, _) = follower.lease(0, 0, 30_000, 10, &fresh(0..3)).unwrap();
        let counts: Vec<(u64, u32)> = grants
            .iter()
            .map(|g| (g.offset, g.delivery_count))
            .collect();
        assert_eq!(counts, vec![(1, 3), (2, 1)]);
        // On the leader, the count it replicated itself changes nothing.
        let outcome = follower.nack(0, 1, 0, Some(0)).unwrap();
        assert_eq!(
            outcome,
            Outcome::Redeliver {
                due_ms: 0,
                delivery_count: 3
            }
        );
        assert!(!follower.note_delivery_count(0, 1, 3));
        assert!(
            follower.note_delivery_count(0, 2, 4),
            "a lease learns a higher count"
        );
    }

    /// A replica that leads after a leader died knows, from the counts that leader
    /// replicated, which messages had used up `max_deliveries` when their leases died with
    /// it: it never delivers those again but dead-letters them (as expired), fresh or
    /// parked behind a busy key alike, while the others go out with their next count.
    #[test]
    fn a_new_leader_dead_letters_deliveries_that_had_used_up_their_count() {
        let dead = |delivery_count| Outcome::DeadLetter {
            delivery_count,
            reason: Reason::Expired,
        };
        for ordering in [Ordering::None, Ordering::Key] {
            let config = GroupConfig {
                max_deliveries: 2,
                ordering,
                ..config()
            };
            let mut follower = GroupState::new(config, &[0]);
            assert!(follower.note_delivery_count(0, 0, 2));
            assert!(follower.note_delivery_count(0, 1, 1));
            assert!(follower.note_delivery_count(0, 2, 2));
            // Offsets 1 and 2 share a key: with key ordering, 2 waits for 1's ack.
            let candidates = [
                Candidate {
                    offset: 0,
                    key: None,
                },
                Candidate {
                    offset: 1,
                    key: Some(7),
                },
                Candidate {
                    offset: 2,
                    key: Some(7),
                },
                Candidate {
                    offset: 3,
                    key: None,
                },
            ];
            let (grants, _) = follower.lease(0, 100, 30_000, 10, &candidates).unwrap();
            let counts: Vec<(u64, u32)> = grants
                .iter()
                .map(|g| (g.offset, g.delivery_count))
                .collect();
            assert_eq!(counts, vec![(1, 2), (3, 1)], "{ordering:?}");
            let ended = |state: &mut GroupState| -> Vec<(u64, Outcome)> {
                state
                    .expire(100)
                    .iter()
                    .map(|e| (e.offset, e.outcome))
                    .collect()
            };
            if ordering == Ordering::Key {
                assert_eq!(ended(&mut follower), vec![(0, dead(2))]);
                follower.ack(0, 1).unwrap();
                let (grants, _) = follower.lease(0, 100, 30_000, 10, &[]).unwrap();
                assert!(grants.is_empty(), "{grants:?}");
                assert_eq!(ended(&mut follower), vec![(2, dead(2))]);
            } else {
                assert_eq!(ended(&mut follower), vec![(0, dead(2)), (2, dead(2))]);
            }
        }
    }

    #[test]
    fn released_leases_are_offered_again_at_once_with_their_counts() {
        let mut state = GroupState::new(config(), &[0]);
        let (grants, _) = state.lease(0, 0, 30_000, 10, &fresh(0..3)).unwrap();
        assert_eq!(grants.len(), 3);
        state.ack(0, 1).unwrap();
        assert_eq!(state.release_leases(5), 2);
        assert_eq!(state.in_flight(), 0);
        assert_eq!(state.next_wakeup(), Some(5), "no lease deadline is left");
        let (again, _) = state.lease(0, 5, 30_000, 10, &[]).unwrap();
        let offsets: Vec<(u64, u32)> = again.iter().map(|g| (g.offset, g.delivery_count)).collect();
        assert_eq!(offsets, vec![(0, 2), (2, 2)]);
        assert_eq!(state.release_leases(6), 2);
        assert_eq!(state.release_leases(7), 0);
    }
}
