//! The data path: Produce (with idempotent producers) and Fetch (long-poll), plus
//! InitProducerId.
//!
//! Idempotence keeps, per producer id and partition, the epoch and the sequence ranges of
//! the last five batches with their offsets, in memory (as Kafka's producer state, less its
//! snapshot: after a restart a producer starts afresh). A batch seen again answers with
//! its first offset and stores nothing; a gap in the sequence is
//! `OUT_OF_ORDER_SEQUENCE_NUMBER`; an older epoch is `INVALID_PRODUCER_EPOCH`.
//!
//! On a cluster node that state is this node's only: a producer whose leader moved sends
//! its next batches (and its retries) to another node, which has not seen them. So there
//! every idempotent append carries a batch key (producer id, epoch, partition, sequence
//! range) that the replicated append stores once per the queue's dedup window
//! ([`crate::broker::Broker::append_records_once`]): a batch retried through any node
//! within it is answered with its first offset and not stored again, as an HTTP publish
//! with an idempotency key (a batch stamped by its producer more than the window in the
//! past is not matched: the key is remembered at the batch's own timestamp, which every
//! replica reads back alike). A sequence past the next one is accepted there (the batches
//! in between went through another node), unless a batch before it failed on this node
//! lately; producer ids end in the node id, so no two nodes hand out the same one.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    BrokerId, FetchRequest, FetchResponse, InitProducerIdRequest, InitProducerIdResponse,
    ProduceRequest, ProduceResponse, ProducerId,
};
use kafka_protocol::protocol::StrBytes;
use parking_lot::Mutex;

use super::records;
use super::{Kafka, KafkaError};
use crate::auth::Action;
use crate::broker::BrokerError;

/// Gauge of Fetch requests waiting for records now.
pub const FETCH_WAITERS: &str = "qit_kafka_fetch_waiters";

/// Counts one waiting Fetch in [`FETCH_WAITERS`] while it lives (also when cancelled).
struct Waiting;

impl Waiting {
    fn new() -> Self {
        metrics::gauge!(FETCH_WAITERS).increment(1.0);
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!(FETCH_WAITERS).decrement(1.0);
    }
}

/// Longest Fetch long-poll the broker grants.
const MAX_FETCH_WAIT: Duration = Duration::from_secs(30);
/// Batches remembered per producer and partition (Kafka keeps five in flight).
const REMEMBERED_BATCHES: usize = 5;
/// Most producer-partition states kept; past it the least recently used goes.
const MAX_PRODUCER_STATES: usize = 100_000;

/// What an idempotent producer sent to one partition lately.
#[derive(Debug, Default)]
struct SequenceState {
    epoch: i16,
    /// `(first sequence, last sequence, first offset)` of the latest batches.
    recent: VecDeque<(i32, i32, u64)>,
    last_used: Option<Instant>,
    /// The first sequence of a batch whose append failed here, and when: later batches
    /// must not overtake it (see [`check_sequence`]).
    failed: Option<(i32, Instant)>,
}

/// How long a failed batch holds back the batches after it on a cluster node, where
/// sequence gaps are otherwise accepted.
const FAILED_HOLD: Duration = Duration::from_secs(10);

/// A producer's state on one partition, locked across its check and append.
type SharedSequence = Arc<tokio::sync::Mutex<SequenceState>>;

/// Idempotent producers: id allocation and per-partition sequence state.
pub struct Producers {
    next_id: AtomicI64,
    /// An id is `next_id × stride + node` (stride 1 and node 0 on a single node).
    stride: i64,
    node: i64,
    /// By (producer id, topic, partition).
    states: Mutex<HashMap<(i64, String, u32), SharedSequence>>,
    /// On a cluster node: appends carry a batch key, so that a batch retried through
    /// another node (whose sequence state here is empty) is stored once.
    keyed: bool,
}

fn clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as i64)
}

impl Default for Producers {
    fn default() -> Self {
        // Ids differ across restarts: they start from the clock.
        Self {
            next_id: AtomicI64::new(clock_ms().saturating_mul(1024)),
            stride: 1,
            node: 0,
            states: Mutex::new(HashMap::new()),
            keyed: false,
        }
    }
}

/// Node ids apart by this much or more may share producer ids.
const NODE_ID_SPAN: i64 = 1024;

impl Producers {
    /// The producers of cluster node `node`: ids end in the node id (modulo
    /// [`NODE_ID_SPAN`]), so no two nodes hand out the same one, and differ across
    /// restarts (64 per millisecond of the clock); appends carry their batch key.
    pub fn for_node(node: u64) -> Self {
        Self {
            next_id: AtomicI64::new(clock_ms().saturating_mul(64)),
            stride: NODE_ID_SPAN,
            node: (node % NODE_ID_SPAN as u64) as i64,
            keyed: true,
            ..Self::default()
        }
    }

    fn allocate(&self) -> i64 {
        self.next_id
            .fetch_add(1, Ordering::Relaxed)
            .saturating_mul(self.stride)
            .saturating_add(self.node)
    }
}

impl Producers {
    /// InitProducerId: a fresh id, or the same id with the next epoch when the client
    /// names its current one. Transactions are not supported.
    pub fn init(&self, request: &InitProducerIdRequest) -> InitProducerIdResponse {
        let mut response = InitProducerIdResponse::default();
        if request.transactional_id.is_some() {
            response.error_code = ResponseError::TransactionalIdAuthorizationFailed.code();
            response.producer_id = ProducerId(-1);
            response.producer_epoch = -1;
            return response;
        }
        if request.producer_id.0 >= 0 && request.producer_epoch >= 0 {
            response.producer_id = request.producer_id;
            response.producer_epoch = request.producer_epoch.saturating_add(1);
        } else {
            response.producer_id = ProducerId(self.allocate());
            response.producer_epoch = 0;
        }
        response
    }

    fn state(
        &self,
        id: i64,
        topic: &str,
        partition: u32,
    ) -> Arc<tokio::sync::Mutex<SequenceState>> {
        let mut states = self.states.lock();
        let key = (id, topic.to_string(), partition);
        if let Some(state) = states.get(&key) {
            return Arc::clone(state);
        }
        if states.len() >= MAX_PRODUCER_STATES {
            let oldest = states
                .iter()
                .filter_map(|(k, s)| s.try_lock().ok().map(|s| (k.clone(), s.last_used)))
                .min_by_key(|(_, used)| *used)
                .map(|(k, _)| k);
            if let Some(oldest) = oldest {
                states.remove(&oldest);
            }
        }
        Arc::clone(states.entry(key).or_default())
    }
}

/// What to do with an idempotent batch.
enum Sequence {
    Append,
    Duplicate(u64),
    Refuse(ResponseError),
}

/// The idempotence fields of a partition's first batch.
struct Idempotence {
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
}

/// Most record bytes one partition takes from one request: a log batch stays well within
/// the log's own limit.
const MAX_APPEND_BYTES: usize = records::MAX_DECOMPRESSED;

fn record_bytes(record: &crate::log::Record) -> usize {
    let headers: usize = record.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    record.value.len() + record.key.as_ref().map_or(0, |k| k.len()) + headers
}

/// What to do with an idempotent batch of `count` records, given what the producer sent
/// here lately. `gaps`: a cluster node, where a producer may have sent the batches in
/// between through another node (its leader then): a sequence past the next one is
/// appended too, unless a batch before it failed here within [`FAILED_HOLD`] (it must be
/// retried first, or the partition would hold the batches out of order).
fn check_sequence(
    state: &SequenceState,
    batch: &Idempotence,
    count: i32,
    gaps: bool,
    now: Instant,
) -> Sequence {
    let first = batch.base_sequence;
    let last = first.wrapping_add(count - 1);
    if state.recent.is_empty() || batch.producer_epoch > state.epoch {
        return Sequence::Append;
    }
    if batch.producer_epoch < state.epoch {
        return Sequence::Refuse(ResponseError::InvalidProducerEpoch);
    }
    if let Some((_, _, offset)) = state
        .recent
        .iter()
        .find(|(f, l, _)| *f == first && *l == last)
    {
        return Sequence::Duplicate(*offset);
    }
    let held = |first: i32| {
        state
            .failed
            .is_some_and(|(failed, at)| first > failed && now.duration_since(at) < FAILED_HOLD)
    };
    match state.recent.back() {
        Some((_, previous, _)) if previous.wrapping_add(1) == first => Sequence::Append,
        Some((_, previous, _)) if gaps && first > *previous && !held(first) => Sequence::Append,
        _ => Sequence::Refuse(ResponseError::OutOfOrderSequenceNumber),
    }
}

/// Produce: every partition's batches are decoded, checked and appended as one run.
pub async fn produce(
    kafka: &Kafka,
    user: Option<&str>,
    request: ProduceRequest,
) -> ProduceResponse {
    let now = kafka.broker.clock().now_ms();
    let mut response = ProduceResponse::default();
    for topic in request.topic_data {
        let name = topic.name.0.to_string();
        let allowed = kafka
            .allow(user, Action::Publish, &name)
            .map_err(|e| e.code());
        let partitions = topic.partition_data.into_iter().map(|p| {
            let name = name.as_str();
            async move {
                let mut out = PartitionProduceResponse::default()
                    .with_index(p.index)
                    .with_base_offset(-1)
                    .with_log_append_time_ms(-1)
                    .with_log_start_offset(-1);
                let result = match allowed {
                    Ok(()) => produce_partition(kafka, name, p.index, p.records, now).await,
                    Err(code) => Err((code, "not authorized".to_string())),
                };
                match result {
                    Ok((base, start)) => {
                        out.base_offset = base as i64;
                        out.log_start_offset = start as i64;
                    }
                    Err((code, why)) => {
                        out.error_code = code;
                        out.error_message = Some(StrBytes::from_string(why));
                    }
                }
                out
            }
        });
        let partition_responses = futures_util::future::join_all(partitions).await;
        response.responses.push(
            TopicProduceResponse::default()
                .with_name(topic.name)
                .with_partition_responses(partition_responses),
        );
    }
    response
}

type Refusal = (i16, String);

fn refusal(error: KafkaError) -> Refusal {
    (error.code(), error.to_string())
}

/// Checks a partition index against the topic: `UNKNOWN_TOPIC_OR_PARTITION` outside it.
fn partition_of(kafka: &Kafka, topic: &str, index: i32) -> Result<u32, KafkaError> {
    let count = kafka.broker.partition_count(topic)?;
    u32::try_from(index)
        .ok()
        .filter(|p| *p < count)
        .ok_or_else(|| KafkaError::Broker(BrokerError::QueueNotFound(format!("{topic}/{index}"))))
}

async fn produce_partition(
    kafka: &Kafka,
    topic: &str,
    index: i32,
    data: Option<Bytes>,
    now: i64,
) -> Result<(u64, u64), Refusal> {
    let partition = partition_of(kafka, topic, index).map_err(refusal)?;
    let data = data.unwrap_or_default();
    let batches = records::decode_batches(&data, now).map_err(refusal)?;
    if batches.iter().any(|b| b.transactional || b.control) {
        return Err((
            ResponseError::InvalidTxnState.code(),
            "transactions are not supported".into(),
        ));
    }
    let Some(first) = batches.first() else {
        return Err((ResponseError::InvalidRecord.code(), "no records".into()));
    };
    let first = Idempotence {
        producer_id: first.producer_id,
        producer_epoch: first.producer_epoch,
        base_sequence: first.base_sequence,
    };
    let count: usize = batches.iter().map(|b| b.records.len()).sum();
    if count == 0 {
        return Err((ResponseError::InvalidRecord.code(), "no records".into()));
    }
    let start = |kafka: &Kafka| {
        kafka
            .broker
            .partition_bounds(topic, partition)
            .map_or(0, |b| b.first)
    };
    let records: Vec<_> = batches.into_iter().flat_map(|b| b.records).collect();
    let bytes: usize = records.iter().map(record_bytes).sum();
    if bytes > MAX_APPEND_BYTES {
        return Err((
            ResponseError::MessageTooLarge.code(),
            format!("{bytes} bytes of records for one partition, at most {MAX_APPEND_BYTES}"),
        ));
    }
    if first.producer_id < 0 {
        let base = append(kafka, topic, partition, records, None).await?;
        return Ok((base, start(kafka)));
    }
    let count = i32::try_from(count).unwrap_or(i32::MAX);
    let key = kafka
        .producers
        .keyed
        .then(|| batch_key(&first, partition, count));
    let state = kafka.producers.state(first.producer_id, topic, partition);
    let mut state = state.lock().await;
    state.last_used = Some(Instant::now());
    let now = Instant::now();
    match check_sequence(&state, &first, count, kafka.producers.keyed, now) {
        Sequence::Duplicate(base) => Ok((base, start(kafka))),
        Sequence::Refuse(error) => Err((error.code(), format!("{error:?}"))),
        Sequence::Append => {
            let appended = append(kafka, topic, partition, records, key).await;
            let base = match appended {
                Ok(base) => base,
                Err(refused) => {
                    if state.failed.is_none() {
                        state.failed = Some((first.base_sequence, now));
                    }
                    return Err(refused);
                }
            };
            state.failed = None;
            if first.producer_epoch != state.epoch {
                state.recent.clear();
                state.epoch = first.producer_epoch;
            }
            let last = first.base_sequence.wrapping_add(count - 1);
            state.recent.push_back((first.base_sequence, last, base));
            while state.recent.len() > REMEMBERED_BATCHES {
                state.recent.pop_front();
            }
            Ok((base, start(kafka)))
        }
    }
}

/// The key an idempotent batch is stored under on a cluster node: producer id, epoch,
/// partition and sequence range. The same batch retried (through this node or another,
/// within the queue's dedup window) has the same key and is stored once.
fn batch_key(batch: &Idempotence, partition: u32, count: i32) -> String {
    let last = batch.base_sequence.wrapping_add(count - 1);
    format!(
        "kafka:{}:{}:{partition}:{}-{last}",
        batch.producer_id, batch.producer_epoch, batch.base_sequence
    )
}

async fn append(
    kafka: &Kafka,
    topic: &str,
    partition: u32,
    records: Vec<crate::log::Record>,
    key: Option<String>,
) -> Result<u64, Refusal> {
    kafka
        .broker
        .append_records_once(topic, partition, records, key)
        .await
        .map_err(|e| refusal(e.into()))
}

/// One partition a Fetch asks for.
struct Wanted {
    topic: String,
    partition: i32,
    offset: i64,
    max_bytes: usize,
}

/// Fetch: reads every asked partition; while fewer than `min_bytes` came back and the
/// wait has not passed, waits for any of them to grow.
pub async fn fetch(kafka: &Kafka, user: Option<&str>, request: FetchRequest) -> FetchResponse {
    let wait =
        Duration::from_millis(u64::try_from(request.max_wait_ms).unwrap_or(0)).min(MAX_FETCH_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let min_bytes = usize::try_from(request.min_bytes).unwrap_or(0);
    let max_bytes = usize::try_from(request.max_bytes).unwrap_or(usize::MAX);
    let mut wanted = Vec::new();
    let mut denied = HashMap::new();
    for topic in &request.topics {
        let name = topic.topic.0.to_string();
        if let Err(error) = kafka.allow(user, Action::Consume, &name) {
            denied.insert(name.clone(), error.code());
        }
        for p in &topic.partitions {
            wanted.push(Wanted {
                topic: name.clone(),
                partition: p.partition,
                offset: p.fetch_offset,
                max_bytes: usize::try_from(p.partition_max_bytes).unwrap_or(0),
            });
        }
    }
    loop {
        let (response, bytes, errors) = fetch_once(kafka, &wanted, &denied, max_bytes);
        let now = tokio::time::Instant::now();
        // `min_bytes` 0 answers at once, as in Kafka; otherwise wait for that much.
        let enough = bytes >= min_bytes;
        if enough || errors || now >= deadline || kafka.broker.is_shutting_down() {
            return response;
        }
        tracing::trace!(
            partitions = wanted.len(),
            offsets = ?wanted.iter().map(|w| w.offset).collect::<Vec<_>>(),
            bytes,
            min_bytes,
            "fetch waits"
        );
        let _waiting = Waiting::new();
        wait_for_any(kafka, &wanted, deadline - now).await;
    }
}

/// Resolves when any wanted partition holds its fetch offset, or after `timeout`.
async fn wait_for_any(kafka: &Kafka, wanted: &[Wanted], timeout: Duration) {
    let waits: Vec<_> = wanted
        .iter()
        .filter_map(|w| {
            let partition = u32::try_from(w.partition).ok()?;
            let offset = u64::try_from(w.offset).ok()?;
            Some(
                kafka
                    .broker
                    .wait_for_offset(&w.topic, partition, offset, timeout)
                    .boxed(),
            )
        })
        .collect();
    if waits.is_empty() {
        tokio::time::sleep(timeout).await;
        return;
    }
    let _ = futures_util::future::select_all(waits).await;
}

/// One pass over the wanted partitions: the response, its record bytes, and whether any
/// partition answered with an error.
fn fetch_once(
    kafka: &Kafka,
    wanted: &[Wanted],
    denied: &HashMap<String, i16>,
    max_bytes: usize,
) -> (FetchResponse, usize, bool) {
    let mut response = FetchResponse::default();
    let mut total = 0usize;
    let mut errors = false;
    for w in wanted {
        let mut data = PartitionData::default()
            .with_partition_index(w.partition)
            .with_high_watermark(-1)
            .with_last_stable_offset(-1)
            .with_log_start_offset(-1)
            .with_preferred_read_replica(BrokerId(-1))
            .with_records(Some(Bytes::new()));
        let budget = w.max_bytes.min(max_bytes.saturating_sub(total));
        let read = match denied.get(&w.topic) {
            Some(code) => Err(*code),
            None => read_partition(kafka, w, budget, total == 0).map_err(|e| e.code()),
        };
        match read {
            Ok((records, first, next)) => {
                total += records.len();
                data.high_watermark = next as i64;
                data.last_stable_offset = next as i64;
                data.log_start_offset = first as i64;
                data.records = Some(records);
            }
            Err(code) => {
                errors = true;
                data.error_code = code;
            }
        }
        push_partition(&mut response, &w.topic, data);
    }
    (response, total, errors)
}

fn push_partition(response: &mut FetchResponse, topic: &str, data: PartitionData) {
    match response.responses.last_mut() {
        Some(last) if last.topic.0.as_str() == topic => last.partitions.push(data),
        _ => response.responses.push(
            FetchableTopicResponse::default()
                .with_topic(kafka_protocol::messages::TopicName(StrBytes::from_string(
                    topic.to_string(),
                )))
                .with_partitions(vec![data]),
        ),
    }
}

/// Reads one partition from its fetch offset within `budget` bytes (at least one record
/// when `first_in_response`, so a record larger than the budget still gets through).
fn read_partition(
    kafka: &Kafka,
    wanted: &Wanted,
    budget: usize,
    first_in_response: bool,
) -> Result<(Bytes, u64, u64), KafkaError> {
    let partition = partition_of(kafka, &wanted.topic, wanted.partition)?;
    kafka.check_replica(&wanted.topic)?;
    let bounds = kafka.broker.partition_bounds(&wanted.topic, partition)?;
    let offset = u64::try_from(wanted.offset).unwrap_or(u64::MAX);
    if offset < bounds.first || offset > bounds.next {
        return Err(KafkaError::OffsetOutOfRange);
    }
    if offset == bounds.next || (budget == 0 && !first_in_response) {
        return Ok((Bytes::new(), bounds.first, bounds.next));
    }
    let stored =
        kafka
            .broker
            .read_records(&wanted.topic, partition, offset, 1_000_000, budget.max(1))?;
    let mut out = BytesMut::new();
    records::encode_batch(&mut out, &stored);
    Ok((out.freeze(), bounds.first, bounds.next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(batches: &[(i32, i32)]) -> SequenceState {
        SequenceState {
            recent: batches
                .iter()
                .enumerate()
                .map(|(i, (first, last))| (*first, *last, i as u64 * 10))
                .collect(),
            ..SequenceState::default()
        }
    }

    fn batch(base_sequence: i32) -> Idempotence {
        Idempotence {
            producer_id: 7,
            producer_epoch: 0,
            base_sequence,
        }
    }

    fn check(state: &SequenceState, first: i32, count: i32, gaps: bool) -> &'static str {
        match check_sequence(state, &batch(first), count, gaps, Instant::now()) {
            Sequence::Append => "append",
            Sequence::Duplicate(_) => "duplicate",
            Sequence::Refuse(ResponseError::OutOfOrderSequenceNumber) => "out of order",
            Sequence::Refuse(_) => "refused",
        }
    }

    #[test]
    fn a_single_node_refuses_a_gap_and_a_cluster_node_takes_one_forward() {
        let state = sent(&[(0, 4), (5, 9)]);
        assert_eq!(check(&state, 10, 5, false), "append");
        assert_eq!(check(&state, 5, 5, false), "duplicate");
        assert_eq!(check(&state, 20, 5, false), "out of order");
        // On a cluster node the batches 10..19 may have gone through another node.
        assert_eq!(check(&state, 20, 5, true), "append");
        assert_eq!(check(&state, 5, 5, true), "duplicate");
        // Never backwards: an older batch not remembered here.
        assert_eq!(check(&state, 3, 1, true), "out of order");
    }

    #[test]
    fn a_batch_that_failed_here_holds_the_later_ones_back() {
        let now = Instant::now();
        let mut state = sent(&[(0, 4)]);
        state.failed = Some((5, now));
        let later = check_sequence(&state, &batch(10), 5, true, now);
        assert!(matches!(
            later,
            Sequence::Refuse(ResponseError::OutOfOrderSequenceNumber)
        ));
        // Its retry goes through; a hold long past no longer counts.
        assert!(matches!(
            check_sequence(&state, &batch(5), 5, true, now),
            Sequence::Append
        ));
        let much_later = now + FAILED_HOLD + Duration::from_secs(1);
        assert!(matches!(
            check_sequence(&state, &batch(10), 5, true, much_later),
            Sequence::Append
        ));
    }

    #[test]
    fn batch_keys_name_producer_epoch_partition_and_sequences() {
        let key = batch_key(&batch(5), 1, 3);
        assert_eq!(key, "kafka:7:0:1:5-7");
        assert_ne!(key, batch_key(&batch(5), 0, 3), "another partition");
        assert_ne!(key, batch_key(&batch(5), 1, 4), "another batch");
    }

    #[test]
    fn cluster_nodes_hand_out_distinct_producer_ids() {
        let (one, two) = (Producers::for_node(1), Producers::for_node(2));
        let ids: Vec<i64> = (0..100)
            .flat_map(|_| [one.allocate(), two.allocate()])
            .collect();
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ids.len());
        assert!(ids.iter().all(|id| *id > 0));
        assert_eq!(one.allocate() % NODE_ID_SPAN, 1);
    }
}
