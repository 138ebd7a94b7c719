//! Model test of the group state machine: random publish, receive, ack, nack, extend,
//! expiry and restart (snapshot + journal replay) against a simple reference model.
//!
//! Checked: no acked or dead-lettered message is delivered again; none is lost (in the end
//! each is acked or dead-lettered); delivery counts are right; with `ordering = key` a
//! message is delivered only when every earlier message of its key is done, and at most one
//! message per key is out at once.

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;
use qit::broker::Ordering;
use qit::group::{Candidate, Event, GroupConfig, GroupState, Outcome, Snapshot};

const VISIBILITY: i64 = 1_000;

#[derive(Debug, Clone)]
enum Op {
    Publish(Vec<Option<u8>>),
    Receive(usize),
    Ack(usize),
    Nack(usize, Option<u8>),
    Extend(usize),
    Advance(u16),
    Checkpoint,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => proptest::collection::vec(proptest::option::of(0u8..4), 1..5).prop_map(Op::Publish),
        4 => (1usize..6).prop_map(Op::Receive),
        4 => any::<usize>().prop_map(Op::Ack),
        2 => (any::<usize>(), proptest::option::of(0u8..3)).prop_map(|(i, d)| Op::Nack(i, d)),
        1 => any::<usize>().prop_map(Op::Extend),
        2 => (0u16..2_500).prop_map(Op::Advance),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Restart),
    ]
}

/// The reference: what the log holds and what became of each message.
#[derive(Default)]
struct Model {
    keys: Vec<Option<u64>>,
    done: BTreeSet<u64>,
    dead: BTreeSet<u64>,
    deliveries: HashMap<u64, u32>,
    out: BTreeSet<u64>,
}

struct Harness {
    config: GroupConfig,
    state: GroupState,
    journal: Vec<Event>,
    snapshot: Option<Snapshot>,
    now: i64,
    model: Model,
}

impl Harness {
    fn new(ordering: Ordering, max_deliveries: u32) -> Self {
        let config = GroupConfig {
            max_deliveries,
            backoff_secs: vec![0, 1],
            max_in_flight: 4,
            ordering,
        };
        Self {
            state: GroupState::new(config.clone(), &[0]),
            config,
            journal: Vec::new(),
            snapshot: None,
            now: 0,
            model: Model::default(),
        }
    }

    fn candidates(&self) -> Vec<Candidate> {
        let cursor = self.state.cursor(0) as usize;
        self.model
            .keys
            .iter()
            .enumerate()
            .skip(cursor)
            .take(16)
            .map(|(o, k)| Candidate {
                offset: o as u64,
                key: *k,
            })
            .collect()
    }

    fn receive(&mut self, max: usize) {
        let fresh = self.candidates();
        let (grants, events) = self
            .state
            .lease(0, self.now, VISIBILITY, max, &fresh)
            .unwrap();
        self.journal.extend(events);
        for grant in grants {
            let o = grant.offset;
            assert!(!self.model.done.contains(&o), "acked {o} delivered again");
            assert!(!self.model.out.contains(&o), "{o} delivered while out");
            let count = self.model.deliveries.entry(o).or_default();
            *count += 1;
            assert_eq!(grant.delivery_count, *count, "delivery count of {o}");
            if self.config.ordering == Ordering::Key
                && let Some(key) = self.model.keys[o as usize]
            {
                for earlier in 0..o {
                    if self.model.keys[earlier as usize] == Some(key) {
                        assert!(
                            self.model.done.contains(&earlier),
                            "{o} of key {key} delivered before {earlier} was done"
                        );
                    }
                }
            }
            self.model.out.insert(o);
        }
        assert!(self.state.in_flight() <= self.config.max_in_flight as usize);
    }

    fn pick(&self, i: usize) -> Option<u64> {
        let out: Vec<u64> = self.model.out.iter().copied().collect();
        (!out.is_empty()).then(|| out[i % out.len()])
    }

    fn settle(&mut self, offset: u64, outcome: Outcome) {
        self.model.out.remove(&offset);
        if let Outcome::DeadLetter { delivery_count, .. } = outcome {
            assert!(delivery_count >= self.config.max_deliveries);
            let events = self.state.complete_dead_letter(0, offset);
            self.journal.extend(events);
            self.model.done.insert(offset);
            self.model.dead.insert(offset);
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Publish(keys) => self
                .model
                .keys
                .extend(keys.into_iter().map(|k| k.map(u64::from))),
            Op::Receive(max) => self.receive(max),
            Op::Ack(i) => {
                if let Some(o) = self.pick(i) {
                    let (fresh, events) = self.state.ack(0, o).unwrap();
                    assert!(fresh);
                    self.journal.extend(events);
                    self.model.out.remove(&o);
                    self.model.done.insert(o);
                    // Repeating an ack is harmless.
                    assert!(!self.state.ack(0, o).unwrap().0);
                }
            }
            Op::Nack(i, delay) => {
                if let Some(o) = self.pick(i) {
                    let delay = delay.map(|d| i64::from(d) * 500);
                    let outcome = self.state.nack(0, o, self.now, delay).unwrap();
                    self.settle(o, outcome);
                }
            }
            Op::Extend(i) => {
                if let Some(o) = self.pick(i) {
                    self.state.extend(0, o, self.now, VISIBILITY).unwrap();
                }
            }
            Op::Advance(ms) => {
                self.now += i64::from(ms);
                for expired in self.state.expire(self.now) {
                    self.settle(expired.offset, expired.outcome);
                }
            }
            Op::Checkpoint => {
                self.snapshot = Some(self.state.snapshot());
                self.journal.clear();
            }
            Op::Restart => self.restart(),
        }
    }

    fn restart(&mut self) {
        let snapshot =
            Snapshot::decode(&self.snapshot.clone().unwrap_or_default().encode()).unwrap();
        let mut state = if self.snapshot.is_some() {
            GroupState::restore(self.config.clone(), &snapshot, &[0])
        } else {
            GroupState::new(self.config.clone(), &[0])
        };
        let bytes = qit::group::event::encode_events(&self.journal);
        for event in qit::group::event::decode_events(&bytes).unwrap() {
            state.apply(&event);
        }
        state.reset_after_restart();
        self.state = state;
        // Whatever was out is offered again; nothing done comes back.
        self.model.out.clear();
    }

    /// Delivers and acks everything left; every message ends acked or dead-lettered.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if self.model.done.len() == self.model.keys.len() {
                break;
            }
            self.receive(4);
            let out: Vec<u64> = self.model.out.iter().copied().collect();
            for o in out {
                let (_, events) = self.state.ack(0, o).unwrap();
                self.journal.extend(events);
                self.model.out.remove(&o);
                self.model.done.insert(o);
            }
            self.now += 2_000;
            for expired in self.state.expire(self.now) {
                self.settle(expired.offset, expired.outcome);
            }
        }
        assert_eq!(
            self.model.done.len(),
            self.model.keys.len(),
            "every message is acked or dead-lettered"
        );
        assert_eq!(self.state.floor(0), self.model.keys.len() as u64);
        assert_eq!(self.state.dead_lettered, self.model.dead.len() as u64);
    }
}

fn run(ops: Vec<Op>, ordering: Ordering, max_deliveries: u32) {
    let mut harness = Harness::new(ordering, max_deliveries);
    for op in ops {
        harness.apply(op);
    }
    harness.drain();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn unordered_group_matches_model(ops in proptest::collection::vec(op(), 1..80), max in 0u32..4) {
        run(ops, Ordering::None, max);
    }

    #[test]
    fn key_ordered_group_matches_model(ops in proptest::collection::vec(op(), 1..80), max in 0u32..4) {
        run(ops, Ordering::Key, max);
    }
}

#[test]
fn a_million_acks_around_a_straggler_stay_small() {
    let config = GroupConfig {
        max_deliveries: 0,
        backoff_secs: vec![],
        max_in_flight: 2_000_000,
        ordering: Ordering::None,
    };
    let mut state = GroupState::new(config, &[0]);
    let fresh: Vec<Candidate> = (0..1_000_001)
        .map(|offset| Candidate { offset, key: None })
        .collect();
    for chunk in fresh.chunks(10_000) {
        state.lease(0, 0, 60_000, chunk.len(), chunk).unwrap();
    }
    for offset in 1..1_000_001 {
        state.ack(0, offset).unwrap();
    }
    assert_eq!(state.floor(0), 0, "the straggler holds the floor");
    assert!(
        state.approx_bytes() < 1_000_000,
        "{} bytes",
        state.approx_bytes()
    );
    assert!(state.snapshot().encode().len() < 1_000, "snapshot is tiny");
    state.ack(0, 0).unwrap();
    assert_eq!(state.floor(0), 1_000_001);
}

#[test]
fn parked_keys_resume_in_order() {
    let config = GroupConfig {
        max_deliveries: 0,
        backoff_secs: vec![],
        max_in_flight: 100,
        ordering: Ordering::Key,
    };
    let mut state = GroupState::new(config, &[0]);
    let fresh: Vec<Candidate> = [1, 1, 2, 1, 2]
        .iter()
        .enumerate()
        .map(|(o, k)| Candidate {
            offset: o as u64,
            key: Some(*k),
        })
        .collect();
    let (grants, _) = state.lease(0, 0, 1000, 10, &fresh).unwrap();
    let offsets: Vec<u64> = grants.iter().map(|g| g.offset).collect();
    assert_eq!(offsets, vec![0, 2], "one per key");
    state.ack(0, 0).unwrap();
    let (grants, _) = state.lease(0, 0, 1000, 10, &[]).unwrap();
    assert_eq!(grants.iter().map(|g| g.offset).collect::<Vec<_>>(), vec![1]);
}
