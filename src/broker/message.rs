//! Between broker messages and log records: internal headers, ids, key hashes — and the
//! idempotent-publish window.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use bytes::Bytes;

use super::types::{BrokerError, Delivery, MessageId, NewMessage};
use crate::log::{Record, StoredRecord};

/// Internal header holding the publisher's content type.
pub const CONTENT_TYPE_HEADER: &str = "qit-content-type";
/// Internal header holding the idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "qit-idempotency-key";
/// Internal header marking a record produced over Kafka with a null value (a tombstone):
/// its value is stored empty, HTTP and gRPC consumers see an empty body, and a Kafka fetch
/// gives the null back.
pub const NULL_VALUE_HEADER: &str = "qit-null-value";
/// Dead-letter headers (visible to users).
pub const ORIGINAL_QUEUE_HEADER: &str = "qit-original-queue";
/// Id of the message in its original queue.
pub const ORIGINAL_ID_HEADER: &str = "qit-original-id";
/// Group that dead-lettered it.
pub const ORIGINAL_GROUP_HEADER: &str = "qit-original-group";
/// Deliveries it had.
pub const DELIVERY_COUNT_HEADER: &str = "qit-delivery-count";
/// `expired` or `nacked`.
pub const REASON_HEADER: &str = "qit-dead-letter-reason";

/// Headers added when dead-lettering, dropped again on redrive.
pub const DEAD_LETTER_HEADERS: [&str; 5] = [
    ORIGINAL_QUEUE_HEADER,
    ORIGINAL_ID_HEADER,
    ORIGINAL_GROUP_HEADER,
    DELIVERY_COUNT_HEADER,
    REASON_HEADER,
];

/// Longest message key in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest idempotency key in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Most user headers on one message.
pub const MAX_HEADERS: usize = 64;
/// Longest header name in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 128;
/// Longest header value in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;
/// Longest content type in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 256;

/// The bytes of a message counted against a queue's `max_message_bytes`: the whole record
/// as the publisher gave it (body, key, header names and values, content type and
/// idempotency key).
pub fn message_size(message: &NewMessage) -> u64 {
    record_size(
        &message.body,
        message.key.as_deref(),
        &message.headers,
        message.content_type.as_deref(),
        message.idempotency_key.as_deref(),
    )
}

/// [`message_size`] of a message's parts (also of one as it travels in a cluster op).
pub fn record_size(
    body: &[u8],
    key: Option<&str>,
    headers: &BTreeMap<String, String>,
    content_type: Option<&str>,
    idempotency_key: Option<&str>,
) -> u64 {
    let headers: usize = headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    (body.len()
        + key.map_or(0, str::len)
        + headers
        + content_type.map_or(0, str::len)
        + idempotency_key.map_or(0, str::len)) as u64
}

/// Checks records appended as they are (a Kafka producer's): each within `limit` bytes,
/// counted as [`stored_record_size`] (413 otherwise).
pub fn check_record_sizes(records: &[Record], limit: u64) -> Result<(), BrokerError> {
    match records.iter().map(stored_record_size).find(|s| *s > limit) {
        Some(size) => Err(BrokerError::MessageTooLarge { size, limit }),
        None => Ok(()),
    }
}

/// The bytes of a record counted against `max_message_bytes`: value, key, and header names
/// and values.
pub fn stored_record_size(record: &Record) -> u64 {
    let headers: usize = record
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    (record.value.len() + record.key.as_ref().map_or(0, |k| k.len()) + headers) as u64
}

/// Checks a message from a publisher: key, headers, content type and idempotency key within
/// their caps (400), and the whole record within `max_message_bytes` (413). `index` is its
/// place in a batch, for the message.
pub fn check_new_message(
    message: &NewMessage,
    index: usize,
    max_message_bytes: u64,
) -> Result<(), BrokerError> {
    let bad = |what: String| {
        Err(BrokerError::InvalidArgument(format!(
            "message {index}: {what}"
        )))
    };
    if let Some(key) = &message.key
        && key.len() > MAX_KEY_BYTES
    {
        return bad(format!(
            "key of {} bytes, at most {MAX_KEY_BYTES}",
            key.len()
        ));
    }
    if let Some(key) = &message.idempotency_key
        && !(1..=MAX_IDEMPOTENCY_KEY_BYTES).contains(&key.len())
    {
        return bad(format!(
            "idempotency key of {} bytes, must be 1..={MAX_IDEMPOTENCY_KEY_BYTES}",
            key.len()
        ));
    }
    if let Some(content_type) = &message.content_type
        && content_type.len() > MAX_CONTENT_TYPE_BYTES
    {
        return bad(format!(
            "content type of {} bytes, at most {MAX_CONTENT_TYPE_BYTES}",
            content_type.len()
        ));
    }
    if message.headers.len() > MAX_HEADERS {
        return bad(format!(
            "{} headers, at most {MAX_HEADERS}",
            message.headers.len()
        ));
    }
    for (name, value) in &message.headers {
        if name.is_empty() || name.len() > MAX_HEADER_NAME_BYTES {
            return bad(format!(
                "a header name of {} bytes, must be 1..={MAX_HEADER_NAME_BYTES}",
                name.len()
            ));
        }
        if value.len() > MAX_HEADER_VALUE_BYTES {
            return bad(format!(
                "header `{name}` has a value of {} bytes, at most {MAX_HEADER_VALUE_BYTES}",
                value.len()
            ));
        }
    }
    let size = message_size(message);
    if size > max_message_bytes {
        return Err(BrokerError::MessageTooLarge {
            size,
            limit: max_message_bytes,
        });
    }
    Ok(())
}

/// The log record for a published message.
pub fn to_record(message: &NewMessage, timestamp_ms: i64) -> Record {
    let mut headers: Vec<(String, Bytes)> = message
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Bytes::copy_from_slice(v.as_bytes())))
        .collect();
    if let Some(content_type) = &message.content_type {
        headers.push((
            CONTENT_TYPE_HEADER.into(),
            Bytes::copy_from_slice(content_type.as_bytes()),
        ));
    }
    if let Some(key) = &message.idempotency_key {
        headers.push((
            IDEMPOTENCY_HEADER.into(),
            Bytes::copy_from_slice(key.as_bytes()),
        ));
    }
    Record {
        timestamp_ms,
        key: message
            .key
            .as_ref()
            .map(|k| Bytes::copy_from_slice(k.as_bytes())),
        headers,
        value: message.body.clone(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The delivery for a stored record.
pub fn to_delivery(
    queue: &str,
    partition: u32,
    record: StoredRecord,
    delivery_count: u32,
) -> Delivery {
    let mut headers = BTreeMap::new();
    let mut content_type = None;
    for (name, value) in &record.headers {
        match name.as_str() {
            CONTENT_TYPE_HEADER => content_type = Some(text(value)),
            IDEMPOTENCY_HEADER | NULL_VALUE_HEADER => {}
            _ => {
                headers.insert(name.clone(), text(value));
            }
        }
    }
    Delivery {
        queue: queue.to_string(),
        id: MessageId {
            partition,
            offset: record.offset,
        },
        timestamp_ms: record.timestamp_ms,
        key: record.key.as_deref().map(text),
        headers,
        content_type,
        body: record.value,
        delivery_count,
    }
}

/// A message as it was published, rebuilt from its record (for dead-lettering, redrive).
pub fn to_new_message(record: &StoredRecord) -> NewMessage {
    let delivery = to_delivery("", 0, record.clone(), 0);
    let mut headers = delivery.headers;
    // A tombstone stays one in the dead-letter queue and back.
    if is_tombstone(record) {
        headers.insert(NULL_VALUE_HEADER.to_string(), String::new());
    }
    NewMessage {
        key: delivery.key,
        headers,
        content_type: delivery.content_type,
        body: delivery.body,
        idempotency_key: None,
    }
}

/// Whether a record is a Kafka tombstone (produced with a null value, see
/// [`NULL_VALUE_HEADER`]).
pub fn is_tombstone(record: &StoredRecord) -> bool {
    record
        .headers
        .iter()
        .any(|(name, _)| name == NULL_VALUE_HEADER)
}

/// The idempotency key a redrive gives dead letter `id` of `dlq` (first dead-lettered as
/// `original`, at `timestamp_ms`): the same for a retried redrive of it, another for any
/// other dead letter, and short whatever the names.
pub fn redrive_key(dlq: &str, id: MessageId, original: &str, timestamp_ms: i64) -> String {
    let id = id.to_string();
    let hash = crate::hash::fnv1a(&[
        dlq.as_bytes(),
        id.as_bytes(),
        original.as_bytes(),
        &timestamp_ms.to_le_bytes(),
    ]);
    format!("qit-redrive:{hash:016x}")
}

/// The idempotency key under which group `group` of `queue` dead-letters message `id`
/// (published at `timestamp_ms`) after `delivery_count` deliveries: the same when the move
/// is tried again (after a failed append, or by a new cluster leader that finds the
/// delivery interrupted), so the dead-letter queue stores it once within its dedup window.
/// A queue deleted and made again reuses ids; its publish time keeps a message of the new
/// queue apart from the old one's, which the dead-letter queue would otherwise take for
/// a repeat and drop (as [`redrive_key`] does for a dead-letter queue made again).
pub fn dead_letter_key(
    queue: &str,
    group: &str,
    id: MessageId,
    delivery_count: u32,
    timestamp_ms: i64,
) -> String {
    let id = id.to_string();
    let hash = crate::hash::fnv1a(&[
        queue.as_bytes(),
        &[0],
        group.as_bytes(),
        &[0],
        id.as_bytes(),
        &delivery_count.to_le_bytes(),
        &timestamp_ms.to_le_bytes(),
    ]);
    format!("qit-dead-letter:{hash:016x}")
}

/// The idempotency key of a stored record, if it has one.
pub fn idempotency_key(record: &StoredRecord) -> Option<String> {
    idempotency_key_in(&record.headers)
}

/// The idempotency key among a record's `headers`, if any.
pub fn idempotency_key_in(headers: &[(String, Bytes)]) -> Option<String> {
    headers
        .iter()
        .find(|(name, _)| name == IDEMPOTENCY_HEADER)
        .map(|(_, value)| text(value))
}

/// A stable 64-bit hash of a key, for per-key ordering (in memory only).
pub fn key_hash(key: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

/// The partition of a keyed message: CRC-32 of the key, stable across versions.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    crc32fast::hash(key) % partitions.max(1)
}

/// Idempotency keys seen within the dedup window, with the id they got, and the keys a
/// partition's leader holds pending (decided, being replicated, offset not known yet: see
/// `broker::sequencer`).
#[derive(Debug, Default)]
pub struct DedupWindow {
    ids: HashMap<String, (MessageId, i64)>,
    /// Pending keys, each with what its release wakes.
    pending: HashMap<String, std::sync::Arc<tokio::sync::Notify>>,
    /// `(time, key)` in time order (not insertion order: a Kafka producer's timestamps
    /// need not rise, and one far ahead must not hold the older keys back).
    order: BTreeSet<(i64, String)>,
}

impl DedupWindow {
    /// The id a key got, if it was published at or after `now - window` (every key older
    /// than that is evicted first, whatever order the times were inserted in). A window
    /// of 0 remembers nothing: `dedup_window: 0` turns deduplication off (it used to
    /// match a repeat within the same millisecond only, so by chance).
    pub fn get(&mut self, key: &str, now_ms: i64, window_ms: i64) -> Option<MessageId> {
        if window_ms <= 0 {
            self.ids.clear();
            self.order.clear();
            return None;
        }
        self.evict(now_ms - window_ms);
        self.ids.get(key).map(|(id, _)| *id)
    }

    /// Remembers that `key` got `id` at `at_ms`.
    pub fn insert(&mut self, key: String, id: MessageId, at_ms: i64) {
        if let Some((_, old)) = self.ids.insert(key.clone(), (id, at_ms)) {
            self.order.remove(&(old, key.clone()));
        }
        self.order.insert((at_ms, key));
    }

    fn evict(&mut self, before_ms: i64) {
        while let Some((at, _)) = self.order.first() {
            if *at >= before_ms {
                break;
            }
            if let Some((_, key)) = self.order.pop_first() {
                self.ids.remove(&key);
            }
        }
    }

    /// What the release of pending key `key` wakes, when another publish holds it.
    pub fn pending(&self, key: &str) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        self.pending.get(key).cloned()
    }

    /// Holds `key` pending: a publish decided it and replicates it.
    pub fn hold(&mut self, key: String) {
        self.pending.entry(key).or_default();
    }

    /// Releases pending key `key` (remembered with its id first when it got one), waking
    /// whoever waits for it.
    pub fn release(&mut self, key: &str) {
        if let Some(released) = self.pending.remove(key) {
            released.notify_waiters();
        }
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redrive key is stable for one dead letter, differs when anything about it does,
    /// and stays short for the longest names.
    #[test]
    fn redrive_keys_are_stable_distinct_and_short() {
        let id = MessageId {
            partition: 0,
            offset: 0,
        };
        let key = redrive_key("q.dlq", id, "0-0", 1000);
        assert_eq!(key, redrive_key("q.dlq", id, "0-0", 1000));
        let other = MessageId {
            partition: 0,
            offset: 1,
        };
        for different in [
            redrive_key("r.dlq", id, "0-0", 1000),
            redrive_key("q.dlq", other, "0-0", 1000),
            redrive_key("q.dlq", id, "0-1", 1000),
            redrive_key("q.dlq", id, "0-0", 1001),
        ] {
            assert_ne!(key, different);
        }
        let long = "x".repeat(204);
        assert!(redrive_key(&long, id, &long, i64::MAX).len() <= 64);
        assert!(key.starts_with("qit-"));
    }

    #[test]
    fn dead_letter_keys_are_stable_and_distinct() {
        let id = MessageId {
            partition: 1,
            offset: 7,
        };
        let key = dead_letter_key("q", "g", id, 5, 1000);
        assert_eq!(key, dead_letter_key("q", "g", id, 5, 1000));
        let other = MessageId {
            partition: 1,
            offset: 8,
        };
        for different in [
            dead_letter_key("r", "g", id, 5, 1000),
            dead_letter_key("q", "h", id, 5, 1000),
            dead_letter_key("q", "g", other, 5, 1000),
            dead_letter_key("q", "g", id, 6, 1000),
            // The same id in a queue made again: another publish time.
            dead_letter_key("q", "g", id, 5, 1001),
            // The separators keep names that run together apart.
            dead_letter_key("qg", "", id, 5, 1000),
        ] {
            assert_ne!(key, different);
        }
        assert!(key.starts_with("qit-dead-letter:"));
    }

    #[test]
    fn internal_headers_round_trip_hidden() {
        let message = NewMessage {
            key: Some("k".into()),
            headers: [("a".to_string(), "1".to_string())].into_iter().collect(),
            content_type: Some("application/json".into()),
            body: Bytes::from_static(b"{}"),
            idempotency_key: Some("idem".into()),
        };
        let record = to_record(&message, 5);
        let stored = StoredRecord {
            offset: 3,
            timestamp_ms: record.timestamp_ms,
            key: record.key.clone(),
            headers: record.headers.clone(),
            value: record.value.clone(),
        };
        assert_eq!(idempotency_key(&stored).as_deref(), Some("idem"));
        let delivery = to_delivery("q", 1, stored, 2);
        assert_eq!(delivery.id.to_string(), "1-3");
        assert_eq!(delivery.headers.len(), 1);
        assert_eq!(delivery.content_type.as_deref(), Some("application/json"));
        assert_eq!(delivery.key.as_deref(), Some("k"));
    }

    /// Issue 19.11: the whole record counts, not the body alone.
    #[test]
    fn the_whole_record_counts_against_the_limit() {
        let message = NewMessage {
            key: Some("kk".into()),
            headers: [("h".to_string(), "vvv".to_string())].into_iter().collect(),
            content_type: Some("t/t".into()),
            body: Bytes::from_static(b"12345"),
            idempotency_key: Some("i".into()),
        };
        assert_eq!(message_size(&message), 5 + 2 + 4 + 3 + 1);
        check_new_message(&message, 0, 15).unwrap();
        assert!(matches!(
            check_new_message(&message, 0, 14),
            Err(BrokerError::MessageTooLarge {
                size: 15,
                limit: 14
            })
        ));
        let long_key = NewMessage {
            key: Some("k".repeat(MAX_KEY_BYTES + 1)),
            ..NewMessage::default()
        };
        assert!(matches!(
            check_new_message(&long_key, 3, u64::MAX),
            Err(BrokerError::InvalidArgument(m)) if m.starts_with("message 3: key")
        ));
    }

    #[test]
    fn a_window_of_zero_matches_nothing() {
        let mut window = DedupWindow::default();
        let id = MessageId {
            partition: 0,
            offset: 1,
        };
        window.insert("a".into(), id, 1_000);
        assert_eq!(
            window.get("a", 1_000, 0),
            None,
            "not even in the same millisecond"
        );
        assert!(window.is_empty());
    }

    #[test]
    fn dedup_window_forgets_old_keys() {
        let mut window = DedupWindow::default();
        let id = MessageId {
            partition: 0,
            offset: 1,
        };
        window.insert("a".into(), id, 1_000);
        assert_eq!(window.get("a", 1_500, 1_000), Some(id));
        assert_eq!(window.get("a", 2_001, 1_000), None);
        assert!(window.is_empty());
    }

    /// A key inserted with an older time after a newer one is forgotten at its own time,
    /// not when the newer one goes.
    #[test]
    fn dedup_window_forgets_a_key_at_its_own_time_whatever_the_order() {
        let mut window = DedupWindow::default();
        let id = MessageId {
            partition: 0,
            offset: 1,
        };
        window.insert("new".into(), id, 5_000);
        window.insert("old".into(), id, 1_000);
        assert_eq!(window.get("old", 1_500, 1_000), Some(id));
        assert_eq!(window.get("old", 2_001, 1_000), None);
        assert_eq!(window.get("new", 2_001, 1_000), Some(id));
        assert_eq!(
            window.len(),
            1,
            "the old key is gone, not held behind the new one"
        );
        // Remembered again later: the newer time counts.
        window.insert("new".into(), id, 9_000);
        assert_eq!(window.get("new", 6_500, 1_000), Some(id));
        assert_eq!(window.len(), 1);
    }
}
