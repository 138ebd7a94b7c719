//! Publishes a partition's leader decides before it replicates them: which messages are
//! new (their idempotency keys unseen within the dedup window) and the exact records they
//! are stored as. A partition group whose Raft log is its partition's segment log
//! (`cluster::partition_log_store`) writes an entry's records when the entry is appended,
//! before it is applied, so the replicas cannot decide about duplicates when they apply
//! it, as they do for a publish proposed as a command (`Queue::publish_placed`): the
//! leader decides first and proposes the records.
//!
//! The leader's view of the window is what is applied plus what it holds pending: a
//! publish holds the keys of its new messages pending from [`Queue::sequence`] until
//! [`Queue::settle`] (with the offsets its records got, or without when the entry was not
//! committed). A publish whose key another one holds pending waits for that one to settle,
//! then decides again: so a key repeated by concurrent publishes is stored once. Every
//! replica that applies records remembers their keys ([`Queue::note_keys`]), so a
//! replica that becomes leader knows them once it has applied its log (a new leader must
//! apply every entry of its log before it sequences: the entries of the previous term may
//! hold keys).

use std::collections::HashMap;

use super::Broker;
use super::message;
use super::queue::Queue;
use super::types::{BrokerError, MessageId, NewMessage};
use crate::log::Record;

/// A publish to one partition as its leader decided it.
#[derive(Debug)]
pub struct Sequenced {
    /// The partition.
    pub partition: u32,
    /// The records to append, in order: the publish's new messages, stored as they are.
    pub records: Vec<Record>,
    /// What each message of the publish answers, in the publish's order.
    pub answers: Vec<Answer>,
    /// The keys this publish holds pending, with the index of their record.
    held: Vec<(String, usize)>,
    /// The time of the publish (the dedup window is read as of then).
    now_ms: i64,
    /// The time its keys are remembered with: the publish time its records carry, or an
    /// append's first record's timestamp.
    keys_at_ms: i64,
}

/// What one message of a sequenced publish answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// It is the `n`th of the new records: its offset is the records' first plus `n`.
    Record(usize),
    /// Its key was published before, within the dedup window: that message's id.
    Known(MessageId),
}

impl Sequenced {
    /// The id of each message, once the records were appended from offset `first`.
    pub fn ids(&self, first: u64) -> Vec<MessageId> {
        self.answers
            .iter()
            .map(|answer| match answer {
                Answer::Record(n) => MessageId {
                    partition: self.partition,
                    offset: first + *n as u64,
                },
                Answer::Known(id) => *id,
            })
            .collect()
    }
}

impl Queue {
    /// Decides a publish of `messages` to `partition` at `now_ms` (see the module doc):
    /// checks their sizes, answers a message whose key the window knows with that id,
    /// and makes a record of every other one (a key repeated within the publish is stored
    /// once, and the repeat answers the same record), holding their keys pending. Waits
    /// while another publish holds one of the keys pending. Every `Sequenced` must be
    /// settled ([`Self::settle`]).
    pub async fn sequence(
        &self,
        partition: u32,
        messages: &[NewMessage],
        now_ms: i64,
    ) -> Result<Sequenced, BrokerError> {
        self.check_sequenced(partition)?;
        self.check_sizes(messages)?;
        let window_ms = self.settings.dedup_window as i64 * 1000;
        loop {
            let mut window = self.dedup_window(Some(partition), now_ms).await?;
            // A key another publish holds: wait for it to settle, then decide again.
            let held_elsewhere = messages
                .iter()
                .filter_map(|m| m.idempotency_key.as_deref())
                .find_map(|key| window.pending(key));
            if let Some(released) = held_elsewhere {
                let settled = released.notified();
                drop(window);
                settled.await;
                continue;
            }
            let mut sequenced = Sequenced {
                partition,
                records: Vec::new(),
                answers: Vec::with_capacity(messages.len()),
                held: Vec::new(),
                now_ms,
                keys_at_ms: now_ms,
            };
            let mut first_with_key: HashMap<&str, usize> = HashMap::new();
            for m in messages {
                if let Some(key) = m.idempotency_key.as_deref() {
                    if let Some(id) = window.get(key, now_ms, window_ms) {
                        sequenced.answers.push(Answer::Known(id));
                        continue;
                    }
                    if let Some(&n) = first_with_key.get(key) {
                        sequenced.answers.push(Answer::Record(n));
                        continue;
                    }
                    let n = sequenced.records.len();
                    first_with_key.insert(key, n);
                    if window_ms > 0 {
                        window.hold(key.to_string());
                        sequenced.held.push((key.to_string(), n));
                    }
                }
                sequenced
                    .answers
                    .push(Answer::Record(sequenced.records.len()));
                sequenced.records.push(message::to_record(m, now_ms));
            }
            return Ok(sequenced);
        }
    }

    /// Decides an append of `records` to `partition` (a Kafka producer's batch), once per
    /// `batch_key` within the dedup window when one is given, as [`Queue::append_once`]
    /// does on a single node: a key the window knows answers the offset of the first
    /// record that append stored, and nothing is stored; otherwise the records are stored
    /// as they are, the first carrying the key, which is held pending. Checks the records'
    /// sizes as a single node does. Every `Sequenced` must be settled ([`Self::settle`]).
    pub async fn sequence_records(
        &self,
        partition: u32,
        mut records: Vec<Record>,
        batch_key: Option<&str>,
        now_ms: i64,
    ) -> Result<Sequenced, BrokerError> {
        self.check_sequenced(partition)?;
        if records.is_empty() {
            return Err(BrokerError::InvalidArgument("no records to append".into()));
        }
        message::check_record_sizes(&records, self.settings.max_message_bytes)?;
        let keys_at_ms = records.first().map_or(now_ms, |r| r.timestamp_ms);
        let mut sequenced = Sequenced {
            partition,
            records: Vec::new(),
            answers: vec![Answer::Record(0)],
            held: Vec::new(),
            now_ms,
            keys_at_ms,
        };
        let Some(key) = batch_key else {
            sequenced.records = records;
            return Ok(sequenced);
        };
        let window_ms = self.settings.dedup_window as i64 * 1000;
        loop {
            let mut window = self.dedup_window(Some(partition), now_ms).await?;
            if let Some(released) = window.pending(key) {
                let settled = released.notified();
                drop(window);
                settled.await;
                continue;
            }
            if let Some(id) = window.get(key, now_ms, window_ms) {
                sequenced.answers = vec![Answer::Known(id)];
                return Ok(sequenced);
            }
            if window_ms > 0 {
                window.hold(key.to_string());
                sequenced.held.push((key.to_string(), 0));
            }
            if let Some(first) = records.first_mut() {
                first.headers.push((
                    message::IDEMPOTENCY_HEADER.to_string(),
                    bytes::Bytes::copy_from_slice(key.as_bytes()),
                ));
            }
            sequenced.records = records;
            return Ok(sequenced);
        }
    }

    /// Refuses to sequence for a queue being deleted or a partition it lacks.
    fn check_sequenced(&self, partition: u32) -> Result<(), BrokerError> {
        if self.is_deleted() {
            return Err(BrokerError::QueueNotFound(self.name.clone()));
        }
        if partition as usize >= self.partitions.len() {
            return Err(BrokerError::InvalidArgument(format!(
                "queue `{}` has no partition {partition}",
                self.name
            )));
        }
        Ok(())
    }

    /// Ends what `sequenced` holds pending: with `first`, the offset its records were
    /// appended from (their keys are remembered with their ids), or `None` when they were
    /// not (the entry was not committed: a retry decides again). Wakes the publishes that
    /// wait for its keys.
    pub async fn settle(
        &self,
        sequenced: &Sequenced,
        first: Option<u64>,
    ) -> Result<(), BrokerError> {
        if sequenced.held.is_empty() {
            return Ok(());
        }
        let mut window = self
            .dedup_window(Some(sequenced.partition), sequenced.now_ms)
            .await?;
        for (key, n) in &sequenced.held {
            if let Some(first) = first {
                let id = MessageId {
                    partition: sequenced.partition,
                    offset: first + *n as u64,
                };
                window.insert(key.clone(), id, sequenced.keys_at_ms);
            }
            window.release(key);
        }
        Ok(())
    }

    /// Remembers the keys of records appended to `partition` from offset `first` (a
    /// replica applying records its leader sequenced), taken from them by [`keys_of`],
    /// when the partition's window is in memory (one read back from the log later finds
    /// them there anyway).
    pub async fn note_keys(
        &self,
        partition: u32,
        first: u64,
        keys: Vec<RecordKey>,
    ) -> Result<(), BrokerError> {
        let Some(now_ms) = keys.iter().map(|k| k.at_ms).max() else {
            return Ok(());
        };
        let mut window = self.dedup_window(Some(partition), now_ms).await?;
        for key in keys {
            let id = MessageId {
                partition,
                offset: first + key.index as u64,
            };
            window.insert(key.key, id, key.at_ms);
        }
        Ok(())
    }
}

/// The idempotency key of one of a run of records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordKey {
    /// The record's place in the run.
    pub index: usize,
    /// The key.
    pub key: String,
    /// The record's timestamp.
    pub at_ms: i64,
}

/// The idempotency keys `records` carry (before they are appended: see
/// [`Queue::note_keys`]).
pub fn keys_of(records: &[Record]) -> Vec<RecordKey> {
    records
        .iter()
        .enumerate()
        .filter_map(|(index, record)| {
            Some(RecordKey {
                index,
                key: message::idempotency_key_in(&record.headers)?,
                at_ms: record.timestamp_ms,
            })
        })
        .collect()
}

impl Broker {
    /// [`Queue::sequence`] on queue `queue`.
    pub async fn sequence(
        &self,
        queue: &str,
        partition: u32,
        messages: &[NewMessage],
        now_ms: i64,
    ) -> Result<Sequenced, BrokerError> {
        self.queue(queue)?
            .sequence(partition, messages, now_ms)
            .await
    }

    /// [`Queue::sequence_records`] on queue `queue`.
    pub async fn sequence_records(
        &self,
        queue: &str,
        partition: u32,
        records: Vec<Record>,
        batch_key: Option<&str>,
        now_ms: i64,
    ) -> Result<Sequenced, BrokerError> {
        self.queue(queue)?
            .sequence_records(partition, records, batch_key, now_ms)
            .await
    }

    /// [`Queue::settle`] on queue `queue` (nothing to do once it is deleted: its window
    /// went with it).
    pub async fn settle(
        &self,
        queue: &str,
        sequenced: &Sequenced,
        first: Option<u64>,
    ) -> Result<(), BrokerError> {
        match self.queue(queue) {
            Ok(q) => q.settle(sequenced, first).await,
            Err(BrokerError::QueueNotFound(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::QueueSettings;
    use std::sync::Arc;

    const NOW: i64 = 1_700_000_000_000;

    async fn queue(dir: &std::path::Path) -> (Arc<crate::broker::Broker>, Arc<Queue>) {
        let config = crate::broker::BrokerConfig {
            data_dir: dir.to_path_buf(),
            ..crate::broker::BrokerConfig::default()
        };
        let broker = crate::broker::Broker::open(config).await.unwrap();
        let settings = QueueSettings {
            partitions: 2,
            max_message_bytes: 100,
            ..QueueSettings::default()
        };
        broker.create_queue("q", settings).await.unwrap();
        let queue = broker.queue("q").unwrap();
        (broker, queue)
    }

    fn message(body: &str, key: Option<&str>) -> NewMessage {
        NewMessage {
            body: bytes::Bytes::from(body.to_string()),
            idempotency_key: key.map(str::to_string),
            ..NewMessage::default()
        }
    }

    /// Appends what `sequenced` decided to its partition, and settles it.
    async fn append(queue: &Queue, sequenced: &Sequenced) -> Vec<MessageId> {
        let log = &queue.partitions[sequenced.partition as usize];
        let first = log.append(sequenced.records.clone()).await.unwrap();
        queue.settle(sequenced, Some(first)).await.unwrap();
        sequenced.ids(first)
    }

    /// New messages become records as a publish stores them; a key repeated within the
    /// publish is one record; a key settled before answers its id and stores nothing; a
    /// dedup window of 0 remembers nothing.
    #[tokio::test]
    async fn keys_seen_answer_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, queue) = queue(dir.path()).await;
        let first = [
            message("a", Some("k1")),
            message("b", None),
            message("a again", Some("k1")),
        ];
        let sequenced = queue.sequence(1, &first, NOW).await.unwrap();
        assert_eq!(sequenced.records.len(), 2);
        assert_eq!(
            sequenced.records[0],
            message::to_record(&first[0], NOW),
            "stored as a publish stores it"
        );
        let ids = append(&queue, &sequenced).await;
        let at = |offset| MessageId {
            partition: 1,
            offset,
        };
        assert_eq!(ids, [at(0), at(1), at(0)]);

        let again = queue
            .sequence(
                1,
                &[message("a", Some("k1")), message("c", Some("k2"))],
                NOW + 1,
            )
            .await
            .unwrap();
        assert_eq!(again.answers, [Answer::Known(at(0)), Answer::Record(0)]);
        assert_eq!(append(&queue, &again).await, [at(0), at(2)]);
        // Past the window, a key is new again.
        let later = NOW + queue.settings.dedup_window as i64 * 1000 + 10;
        let late = queue
            .sequence(1, &[message("a", Some("k1"))], later)
            .await
            .unwrap();
        assert_eq!(late.answers, [Answer::Record(0)]);
        queue.settle(&late, None).await.unwrap();
    }

    /// A key another publish holds pending makes a publish wait until that one settles:
    /// then it answers the id the first got, or, when the first was not appended, stores
    /// the message itself.
    #[tokio::test]
    async fn a_pending_key_waits_for_its_publish() {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, queue) = queue(dir.path()).await;
        let first = queue
            .sequence(0, &[message("a", Some("k"))], NOW)
            .await
            .unwrap();
        let waiting = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move {
                queue
                    .sequence(0, &[message("b", None), message("a", Some("k"))], NOW)
                    .await
            }
        });
        // It cannot decide while `k` is pending (whatever the scheduler does meanwhile).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        // Not appended (no commit): the waiting publish stores the message itself.
        queue.settle(&first, None).await.unwrap();
        let second = waiting.await.unwrap().unwrap();
        assert_eq!(second.answers, [Answer::Record(0), Answer::Record(1)]);
        let ids = append(&queue, &second).await;
        let third = queue
            .sequence(0, &[message("a", Some("k"))], NOW)
            .await
            .unwrap();
        assert_eq!(third.answers, [Answer::Known(ids[1])]);
    }

    /// A replica that applies records remembers their keys, so it answers them once it
    /// leads; a window read back from the log after a restart knows them too.
    #[tokio::test]
    async fn applied_records_teach_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, queue) = queue(dir.path()).await;
        // Warm the window, as a replica that served before would have.
        let warm = queue.sequence(1, &[], NOW).await.unwrap();
        queue.settle(&warm, None).await.unwrap();
        let records = vec![
            message::to_record(&message("x", Some("kx")), NOW),
            message::to_record(&message("y", None), NOW),
        ];
        let keys = keys_of(&records);
        let first = queue.partitions[1].append(records).await.unwrap();
        queue.note_keys(1, first, keys).await.unwrap();
        let id = MessageId {
            partition: 1,
            offset: first,
        };
        let sequenced = queue
            .sequence(1, &[message("x", Some("kx"))], NOW + 5)
            .await
            .unwrap();
        assert_eq!(sequenced.answers, [Answer::Known(id)]);
        drop((broker, queue, sequenced));
        let (_broker, queue) = {
            let config = crate::broker::BrokerConfig {
                data_dir: dir.path().to_path_buf(),
                ..crate::broker::BrokerConfig::default()
            };
            let broker = crate::broker::Broker::open(config).await.unwrap();
            let queue = broker.queue("q").unwrap();
            (broker, queue)
        };
        let sequenced = queue
            .sequence(1, &[message("x", Some("kx"))], NOW + 5)
            .await
            .unwrap();
        assert_eq!(sequenced.answers, [Answer::Known(id)]);
    }

    /// An append with a batch key is stored once within the window: its first record
    /// carries the key (as `append_once` stores it on a single node), a repeat answers
    /// the first record's offset and stores nothing, and a repeat while the first is
    /// pending waits for it. Without a key the records are stored as given; a record too
    /// large is refused before anything is held.
    #[tokio::test]
    async fn appends_are_stored_once_per_batch_key() {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, queue) = queue(dir.path()).await;
        let batch = |values: &[&str]| -> Vec<Record> {
            values
                .iter()
                .map(|v| message::to_record(&message(v, None), NOW - 7))
                .collect()
        };
        let plain = queue
            .sequence_records(1, batch(&["p"]), None, NOW)
            .await
            .unwrap();
        assert_eq!(plain.records, batch(&["p"]));
        assert_eq!(append(&queue, &plain).await.len(), 1);

        let first = queue
            .sequence_records(1, batch(&["x", "y"]), Some("kafka:1"), NOW)
            .await
            .unwrap();
        assert_eq!(first.answers, [Answer::Record(0)]);
        assert_eq!(
            message::idempotency_key_in(&first.records[0].headers).as_deref(),
            Some("kafka:1")
        );
        assert_eq!(
            first.records[1],
            batch(&["y"])[0],
            "only the first carries it"
        );
        let retry = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move {
                let records = batch(&["x", "y"]);
                queue
                    .sequence_records(1, records, Some("kafka:1"), NOW + 1)
                    .await
            }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !retry.is_finished(),
            "a pending batch key makes a retry wait"
        );
        let ids = append(&queue, &first).await;
        let at = MessageId {
            partition: 1,
            offset: 1,
        };
        assert_eq!(ids, [at]);
        let retry = retry.await.unwrap().unwrap();
        assert_eq!(retry.answers, [Answer::Known(at)]);
        assert!(retry.records.is_empty(), "nothing stored again");
        queue.settle(&retry, None).await.unwrap();

        let big = "x".repeat(101);
        assert!(matches!(
            queue
                .sequence_records(1, batch(&[&big]), Some("kafka:2"), NOW)
                .await,
            Err(BrokerError::MessageTooLarge { .. })
        ));
        let after = queue
            .sequence_records(1, batch(&["z"]), Some("kafka:2"), NOW)
            .await
            .unwrap();
        assert_eq!(after.answers, [Answer::Record(0)], "nothing was held");
        queue.settle(&after, None).await.unwrap();
    }

    /// One step of the sequencer's model test.
    #[derive(Debug, Clone)]
    enum Step {
        /// A publish of messages with these keys (`None`: no key).
        Publish(Vec<Option<u8>>),
        /// Settles the `n`th outstanding publish (modulo their number), its records
        /// appended (`true`) or not.
        Settle(usize, bool),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::collection::vec(proptest::option::of(0u8..6), 1..5).prop_map(Step::Publish),
            (any::<usize>(), any::<bool>()).prop_map(|(n, done)| Step::Settle(n, done)),
        ]
    }

    /// The sequencer against a model over random publishes and settlements (single
    /// threaded, so a publish that would wait is seen waiting): a key the window knows
    /// answers its id, a key repeated in a publish is one record, a key another publish
    /// holds makes a publish wait, a key settled without its records is new again, and
    /// every id a key answers holds a record with that key.
    #[test]
    fn the_sequencer_follows_a_model() {
        use futures_util::FutureExt;
        use proptest::prelude::*;
        let config = ProptestConfig {
            cases: 64,
            ..ProptestConfig::default()
        };
        proptest!(config, |(steps in proptest::collection::vec(step(), 1..40))| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let (_broker, queue) = queue(dir.path()).await;
                let mut known: HashMap<String, MessageId> = HashMap::new();
                let mut pending: HashMap<String, usize> = HashMap::new();
                let mut outstanding: Vec<(usize, Sequenced)> = Vec::new();
                for (serial, step) in steps.into_iter().enumerate() {
                    match step {
                        Step::Publish(keys) => {
                            let keys: Vec<Option<String>> =
                                keys.iter().map(|k| k.map(|k| format!("k{k}"))).collect();
                            let messages: Vec<NewMessage> = keys
                                .iter()
                                .map(|k| message("m", k.as_deref()))
                                .collect();
                            let blocked = keys.iter().flatten().any(|k| pending.contains_key(k));
                            let decided = queue.sequence(1, &messages, NOW).now_or_never();
                            if blocked {
                                assert!(decided.is_none(), "a held key did not make it wait");
                                continue;
                            }
                            let sequenced = decided.expect("decides at once").unwrap();
                            let mut first_of: HashMap<&String, usize> = HashMap::new();
                            let mut records = 0;
                            for (key, answer) in keys.iter().zip(&sequenced.answers) {
                                let want = match key {
                                    Some(k) if known.contains_key(k) => Answer::Known(known[k]),
                                    Some(k) if first_of.contains_key(k) => Answer::Record(first_of[k]),
                                    _ => {
                                        if let Some(k) = key {
                                            first_of.insert(k, records);
                                        }
                                        records += 1;
                                        Answer::Record(records - 1)
                                    }
                                };
                                assert_eq!(*answer, want);
                            }
                            assert_eq!(sequenced.records.len(), records);
                            for k in first_of.keys() {
                                pending.insert((*k).clone(), serial);
                            }
                            outstanding.push((serial, sequenced));
                        }
                        Step::Settle(n, appended) => {
                            if outstanding.is_empty() {
                                continue;
                            }
                            let (serial, sequenced) = outstanding.remove(n % outstanding.len());
                            let first = if appended && !sequenced.records.is_empty() {
                                let log = &queue.partitions[1];
                                Some(log.append(sequenced.records.clone()).await.unwrap())
                            } else {
                                None
                            };
                            queue.settle(&sequenced, first).await.unwrap();
                            pending.retain(|_, holder| *holder != serial);
                            if let Some(first) = first {
                                for m in sequenced.ids(first) {
                                    let record = &queue.partitions[1]
                                        .read(m.offset, 1, usize::MAX)
                                        .unwrap()[0];
                                    if let Some(k) = message::idempotency_key(record) {
                                        known.insert(k, m);
                                    }
                                }
                            }
                        }
                    }
                }
                // Every id a key answers holds a record with that key.
                for (key, id) in &known {
                    let record = &queue.partitions[1].read(id.offset, 1, usize::MAX).unwrap()[0];
                    assert_eq!(record.offset, id.offset);
                    assert_eq!(message::idempotency_key(record).as_deref(), Some(key.as_str()));
                }
            });
        });
    }

    /// Sizes are checked before anything is held, and a partition the queue lacks is
    /// refused.
    #[tokio::test]
    async fn bad_publishes_hold_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, queue) = queue(dir.path()).await;
        let big = "x".repeat(101);
        let refused = queue
            .sequence(0, &[message("a", Some("k")), message(&big, None)], NOW)
            .await;
        assert!(matches!(refused, Err(BrokerError::MessageTooLarge { .. })));
        assert!(matches!(
            queue.sequence(2, &[message("a", None)], NOW).await,
            Err(BrokerError::InvalidArgument(_))
        ));
        // Nothing held: `k` decides at once.
        let sequenced = queue
            .sequence(0, &[message("a", Some("k"))], NOW)
            .await
            .unwrap();
        assert_eq!(sequenced.answers, [Answer::Record(0)]);
    }
}
