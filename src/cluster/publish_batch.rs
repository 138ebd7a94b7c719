//! A publish as a queue group's Raft entry carries it ([`EncodedPublish`]): the messages
//! encoded once, by the node that proposes them, into one buffer ([`MessageBatch`]).
//!
//! An entry's payload is written to the Raft log, sent to each follower, kept in memory for
//! the reads that replicate and apply it, and decoded by every replica. Encoded as a list
//! of structured messages, each of those steps walked every message again (three encodings
//! and four deep copies per message on a leader with two followers, a decode with an
//! allocation per body on each follower). As one buffer, they copy bytes or count a
//! reference, and each replica decodes the messages once, when it applies the entry, the
//! bodies as slices of the buffer.
//!
//! ```text
//! batch   = count u32 | message*
//! message = body_len u32 | body | flags u8 | [key] | [content_type] | [idempotency_key] | [headers]
//!           | [partition u32]
//!           (each bracketed part present when its flag bit is set: 1, 2, 4, 8, 16; any other
//!           bit is refused)
//! string  = len u32 | UTF-8 bytes        key, content_type, idempotency_key are strings
//! headers = n u32 | (string name | string value)*
//! ```
//! A Kafka producer's append is carried the same way ([`EncodedAppend`], [`RecordBatch`]):
//!
//! ```text
//! batch  = count u32 | record*
//! record = timestamp_ms i64 | flags u8 | [key_len u32 | key] | headers_n u32 |
//!          (string name | value_len u32 | value)* | value_len u32 | value   (key: flag bit 1)
//! ```
//! `partition` is the turn the proposing leader gave a message without a key
//! ([`WireMessage::partition`]); entries written before leaders chose turns have no such
//! bit, and their replicas place those messages as they did then. All integers
//! little-endian. Decoding checks every length against what is left and every string's
//! UTF-8: a malformed batch is an error, never a panic.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::broker::replicate::{Op, WireMessage, WireRecord};
use crate::log::Record;

const KEY: u8 = 1;
const CONTENT_TYPE: u8 = 2;
const IDEMPOTENCY_KEY: u8 = 4;
const HEADERS: u8 = 8;
const PARTITION: u8 = 16;
/// Every flag bit a message may carry.
const MESSAGE_FLAGS: u8 = KEY | CONTENT_TYPE | IDEMPOTENCY_KEY | HEADERS | PARTITION;

/// Why a batch could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    /// The bytes end before what they announce.
    #[error("an encoded batch ends early, at byte {0}")]
    Truncated(usize),
    /// A key, content type, idempotency key or header is not UTF-8.
    #[error("an encoded batch holds a string that is not UTF-8, at byte {0}")]
    NotUtf8(usize),
    /// Bytes are left after the last message or record.
    #[error("an encoded batch has {0} bytes after its last message or record")]
    Trailing(usize),
    /// A message carries a flag bit this version does not know (written by a later one).
    #[error("an encoded batch holds a message with unknown flags {flags:#04x}, at byte {at}")]
    UnknownFlags {
        /// The flags byte.
        flags: u8,
        /// Where it is.
        at: usize,
    },
    /// A length does not fit the format (more than 4 GiB).
    #[error("a part of a batch is too large to encode ({0} bytes)")]
    TooLarge(usize),
}

/// A batch that cannot be encoded or decoded is a bad argument to the broker (every
/// replica decodes the same bytes, so every one answers alike).
impl From<BatchError> for crate::broker::BrokerError {
    fn from(error: BatchError) -> Self {
        Self::InvalidArgument(error.to_string())
    }
}

/// Messages encoded as one buffer (see the module doc); a clone shares the buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageBatch {
    #[serde(with = "raw_bytes")]
    raw: Bytes,
}

impl MessageBatch {
    /// Encodes `messages` into one buffer.
    pub fn encode<'a>(
        messages: impl IntoIterator<Item = &'a WireMessage> + Clone,
    ) -> Result<Self, BatchError> {
        let (count, size) = messages
            .clone()
            .into_iter()
            .fold((0, 0), |(n, size), m| (n + 1, size + encoded_size(m)));
        let mut out = BytesMut::with_capacity(4 + size);
        out.put_u32_le(len32(count)?);
        for m in messages {
            put_message(&mut out, m)?;
        }
        Ok(Self { raw: out.freeze() })
    }

    /// The messages, their bodies slices of this batch's buffer.
    pub fn decode(&self) -> Result<Vec<WireMessage>, BatchError> {
        // Each message takes at least 5 bytes.
        decode_all(&self.raw, 5, Reader::message)
    }

    /// The number of messages (0 for a batch too short to say).
    pub fn len(&self) -> usize {
        count(&self.raw)
    }

    /// True when the batch holds no message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A batch's buffer as the Raft codec carries it: one byte string (a length and the bytes),
/// decoded into one allocation.
mod raw_bytes {
    use bytes::Bytes;

    pub fn serialize<S: serde::Serializer>(raw: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(raw)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Bytes, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an encoded batch")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes::copy_from_slice(v))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from(v))
            }
        }
        deserializer.deserialize_byte_buf(Visit)
    }
}

/// A publish to `queue` as one entry: its messages encoded once, stamped `now_ms` by the
/// node that proposed it (see [`crate::broker::replicate::Op::Publish`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedPublish {
    /// The queue.
    pub queue: String,
    /// The messages.
    pub messages: MessageBatch,
    /// Publish time.
    pub now_ms: i64,
}

impl EncodedPublish {
    /// `messages` to `queue`, encoded.
    pub fn new<'a>(
        queue: String,
        messages: impl IntoIterator<Item = &'a WireMessage> + Clone,
        now_ms: i64,
    ) -> Result<Self, BatchError> {
        Ok(Self {
            queue,
            messages: MessageBatch::encode(messages)?,
            now_ms,
        })
    }

    /// The publish as the broker applies it.
    pub fn into_op(self) -> Result<Op, BatchError> {
        Ok(Op::Publish {
            queue: self.queue,
            messages: self.messages.decode()?,
            now_ms: self.now_ms,
        })
    }
}

/// Records encoded as one buffer (see the module doc); a clone shares the buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RecordBatch {
    #[serde(with = "raw_bytes")]
    raw: Bytes,
}

/// A record as [`RecordBatch::encode`] reads it: one travelling in an op ([`WireRecord`])
/// or one as the log stores it ([`Record`], a leader's sequenced records), so that neither
/// is copied into the other first.
pub trait EncodableRecord {
    /// Milliseconds since the Unix epoch.
    fn timestamp_ms(&self) -> i64;
    /// Key bytes.
    fn key(&self) -> Option<&Bytes>;
    /// Headers in order.
    fn headers(&self) -> &[(String, Bytes)];
    /// The payload.
    fn value(&self) -> &Bytes;
}

/// [`EncodableRecord`] for a record type with the fields of that name.
macro_rules! encodable_record {
    ($record:ty) => {
        impl EncodableRecord for $record {
            fn timestamp_ms(&self) -> i64 {
                self.timestamp_ms
            }
            fn key(&self) -> Option<&Bytes> {
                self.key.as_ref()
            }
            fn headers(&self) -> &[(String, Bytes)] {
                &self.headers
            }
            fn value(&self) -> &Bytes {
                &self.value
            }
        }
    };
}

encodable_record!(WireRecord);
encodable_record!(Record);

impl RecordBatch {
    /// Encodes `records` into one buffer.
    pub fn encode<R: EncodableRecord>(records: &[R]) -> Result<Self, BatchError> {
        let size: usize = records.iter().map(record_size).sum();
        let mut out = BytesMut::with_capacity(4 + size);
        out.put_u32_le(len32(records.len())?);
        for r in records {
            out.put_i64_le(r.timestamp_ms());
            out.put_u8(if r.key().is_some() { KEY } else { 0 });
            if let Some(key) = r.key() {
                put_bytes(&mut out, key)?;
            }
            out.put_u32_le(len32(r.headers().len())?);
            for (name, value) in r.headers() {
                put_bytes(&mut out, name.as_bytes())?;
                put_bytes(&mut out, value)?;
            }
            put_bytes(&mut out, r.value())?;
        }
        Ok(Self { raw: out.freeze() })
    }

    /// The records, their keys and values slices of this batch's buffer.
    pub fn decode(&self) -> Result<Vec<WireRecord>, BatchError> {
        // Each record takes at least 17 bytes.
        decode_all(&self.raw, 17, Reader::record)
    }

    /// The number of records (0 for a batch too short to say).
    pub fn len(&self) -> usize {
        count(&self.raw)
    }

    /// True when the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Kafka producer's append to one partition as one entry, its records encoded once (see
/// [`crate::broker::replicate::Op::AppendRecords`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedAppend {
    /// The queue.
    pub queue: String,
    /// The partition.
    pub partition: u32,
    /// The records.
    pub records: RecordBatch,
    /// The batch's idempotence key, if any.
    pub batch_key: Option<String>,
    /// Append time.
    pub now_ms: i64,
}

impl EncodedAppend {
    /// An append of `records` to `partition` of `queue`, encoded.
    pub fn new(
        queue: String,
        partition: u32,
        records: &[WireRecord],
        batch_key: Option<String>,
        now_ms: i64,
    ) -> Result<Self, BatchError> {
        Ok(Self {
            queue,
            partition,
            records: RecordBatch::encode(records)?,
            batch_key,
            now_ms,
        })
    }

    /// The append as the broker applies it.
    pub fn into_op(self) -> Result<Op, BatchError> {
        Ok(Op::AppendRecords {
            queue: self.queue,
            partition: self.partition,
            records: self.records.decode()?,
            batch_key: self.batch_key,
            now_ms: self.now_ms,
        })
    }
}

fn record_size<R: EncodableRecord>(r: &R) -> usize {
    let headers: usize = r.headers().iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    8 + 1 + r.key().map_or(0, |k| 4 + k.len()) + 4 + headers + 4 + r.value().len()
}

/// The items of batch `raw`: its count, then that many read by `item`, each at least
/// `least` bytes long (a count past what the bytes can hold is a lie, not a reason to
/// reserve memory), and nothing after them.
fn decode_all<'r, T>(
    raw: &'r Bytes,
    least: usize,
    item: impl Fn(&mut Reader<'r>) -> Result<T, BatchError>,
) -> Result<Vec<T>, BatchError> {
    let mut reader = Reader { raw, at: 0 };
    let count = reader.u32()? as usize;
    let mut items = Vec::with_capacity(count.min(raw.len() / least));
    for _ in 0..count {
        items.push(item(&mut reader)?);
    }
    match raw.len() - reader.at {
        0 => Ok(items),
        left => Err(BatchError::Trailing(left)),
    }
}

/// The count at the head of a batch (0 for a batch too short to say).
fn count(raw: &[u8]) -> usize {
    raw.get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

fn encoded_size(m: &WireMessage) -> usize {
    let string = |s: &Option<String>| s.as_ref().map_or(0, |s| 4 + s.len());
    let headers = if m.headers.is_empty() {
        0
    } else {
        4 + m
            .headers
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>()
    };
    4 + m.body.len()
        + 1
        + string(&m.key)
        + string(&m.content_type)
        + string(&m.idempotency_key)
        + headers
        + m.partition.map_or(0, |_| 4)
}

fn len32(len: usize) -> Result<u32, BatchError> {
    u32::try_from(len).map_err(|_| BatchError::TooLarge(len))
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) -> Result<(), BatchError> {
    out.put_u32_le(len32(bytes.len())?);
    out.put_slice(bytes);
    Ok(())
}

fn put_message(out: &mut BytesMut, m: &WireMessage) -> Result<(), BatchError> {
    put_bytes(out, &m.body)?;
    let flag = |present: bool, bit: u8| if present { bit } else { 0 };
    out.put_u8(
        flag(m.key.is_some(), KEY)
            | flag(m.content_type.is_some(), CONTENT_TYPE)
            | flag(m.idempotency_key.is_some(), IDEMPOTENCY_KEY)
            | flag(!m.headers.is_empty(), HEADERS)
            | flag(m.partition.is_some(), PARTITION),
    );
    for s in [&m.key, &m.content_type, &m.idempotency_key]
        .into_iter()
        .flatten()
    {
        put_bytes(out, s.as_bytes())?;
    }
    if !m.headers.is_empty() {
        out.put_u32_le(len32(m.headers.len())?);
        for (name, value) in &m.headers {
            put_bytes(out, name.as_bytes())?;
            put_bytes(out, value.as_bytes())?;
        }
    }
    if let Some(partition) = m.partition {
        out.put_u32_le(partition);
    }
    Ok(())
}

/// Reads a batch front to back.
struct Reader<'a> {
    raw: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, BatchError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.raw.len())
            .ok_or(BatchError::Truncated(self.at))?;
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }

    fn u8(&mut self) -> Result<u8, BatchError> {
        let range = self.take(1)?;
        Ok(self.raw[range.start])
    }

    fn i64(&mut self) -> Result<i64, BatchError> {
        let range = self.take(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.raw[range]);
        Ok(i64::from_le_bytes(b))
    }

    fn record(&mut self) -> Result<WireRecord, BatchError> {
        let timestamp_ms = self.i64()?;
        let flags = self.u8()?;
        let key = if flags & KEY != 0 {
            Some(self.bytes()?)
        } else {
            None
        };
        let n = self.u32()?;
        let mut headers = Vec::with_capacity((n as usize).min(64));
        for _ in 0..n {
            let name = self.string()?;
            headers.push((name, self.bytes()?));
        }
        let value = self.bytes()?;
        Ok(WireRecord {
            timestamp_ms,
            key,
            headers,
            value,
        })
    }

    fn u32(&mut self) -> Result<u32, BatchError> {
        let range = self.take(4)?;
        let b = &self.raw[range];
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self) -> Result<Bytes, BatchError> {
        let len = self.u32()? as usize;
        let range = self.take(len)?;
        Ok(self.raw.slice(range))
    }

    fn string(&mut self) -> Result<String, BatchError> {
        let at = self.at;
        let len = self.u32()? as usize;
        let range = self.take(len)?;
        std::str::from_utf8(&self.raw[range])
            .map(str::to_owned)
            .map_err(|_| BatchError::NotUtf8(at))
    }

    fn optional(&mut self, flags: u8, bit: u8) -> Result<Option<String>, BatchError> {
        if flags & bit == 0 {
            return Ok(None);
        }
        self.string().map(Some)
    }

    fn message(&mut self) -> Result<WireMessage, BatchError> {
        let body = self.bytes()?;
        let at = self.at;
        let flags = self.u8()?;
        if flags & !MESSAGE_FLAGS != 0 {
            return Err(BatchError::UnknownFlags { flags, at });
        }
        let key = self.optional(flags, KEY)?;
        let content_type = self.optional(flags, CONTENT_TYPE)?;
        let idempotency_key = self.optional(flags, IDEMPOTENCY_KEY)?;
        let mut headers = BTreeMap::new();
        if flags & HEADERS != 0 {
            let n = self.u32()?;
            for _ in 0..n {
                let name = self.string()?;
                let value = self.string()?;
                headers.insert(name, value);
            }
        }
        let partition = match flags & PARTITION {
            0 => None,
            _ => Some(self.u32()?),
        };
        Ok(WireMessage {
            key,
            headers,
            content_type,
            body,
            idempotency_key,
            partition,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::replicate::tests::arb_message as message;
    use proptest::prelude::*;

    proptest! {
        /// Any messages come back as they went in.
        #[test]
        fn messages_round_trip(messages in proptest::collection::vec(message(), 0..8)) {
            let batch = MessageBatch::encode(&messages).unwrap();
            prop_assert_eq!(batch.len(), messages.len());
            prop_assert_eq!(&batch.decode().unwrap(), &messages);
        }

        /// Any cut or changed byte decodes to messages or to an error, never a panic.
        #[test]
        fn damaged_batches_never_panic(
            messages in proptest::collection::vec(message(), 1..4),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            value in any::<u8>(),
        ) {
            let raw = MessageBatch::encode(&messages).unwrap().raw;
            let cut_at = cut.index(raw.len());
            let cut = MessageBatch { raw: raw.slice(..cut_at) };
            prop_assert!(cut.decode().is_err(), "a batch cut at {} decoded", cut_at);
            let mut changed = raw.to_vec();
            let at = flip.index(changed.len());
            changed[at] = value;
            let _ = MessageBatch { raw: Bytes::from(changed) }.decode();
        }

        /// Any records come back as they went in, and a cut batch is an error.
        #[test]
        fn records_round_trip(
            records in proptest::collection::vec(record(), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let batch = RecordBatch::encode(&records).unwrap();
            prop_assert_eq!(batch.len(), records.len());
            prop_assert_eq!(&batch.decode().unwrap(), &records);
            let cut_at = cut.index(batch.raw.len());
            let cut = RecordBatch { raw: batch.raw.slice(..cut_at) };
            prop_assert!(cut.decode().is_err(), "a batch cut at {} decoded", cut_at);
        }
    }

    fn record() -> impl Strategy<Value = WireRecord> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..32).prop_map(Bytes::from);
        (
            any::<i64>(),
            proptest::option::of(bytes()),
            proptest::collection::vec((".{0,8}", bytes()), 0..3),
            bytes(),
        )
            .prop_map(|(timestamp_ms, key, headers, value)| WireRecord {
                timestamp_ms,
                key,
                headers,
                value,
            })
    }

    #[test]
    fn bodies_are_slices_of_the_batch() {
        let messages = vec![WireMessage {
            key: None,
            headers: BTreeMap::new(),
            content_type: None,
            body: Bytes::from_static(b"hello"),
            idempotency_key: None,
            partition: None,
        }];
        let batch = MessageBatch::encode(&messages).unwrap();
        let back = batch.decode().unwrap();
        let inside = batch.raw.as_ptr_range();
        assert!(inside.contains(&back[0].body.as_ptr()));
        // 4 (count) + 4 (length) + 5 (body) + 1 (flags).
        assert_eq!(batch.raw.len(), 14);
    }

    /// A batch as entries were written before leaders took turns (no partition bit)
    /// decodes with no turn; one with a turn carries it after the other parts.
    #[test]
    fn turns_are_optional_and_last() {
        let old = MessageBatch {
            raw: Bytes::from_static(b"\x01\0\0\0\x02\0\0\0hi\0"),
        };
        let decoded = old.decode().unwrap();
        assert_eq!(decoded[0].partition, None);
        assert_eq!(&decoded[0].body[..], b"hi");
        let turned = WireMessage {
            partition: Some(5),
            ..decoded[0].clone()
        };
        let batch = MessageBatch::encode([&turned]).unwrap();
        assert_eq!(&batch.raw[..], b"\x01\0\0\0\x02\0\0\0hi\x10\x05\0\0\0");
        assert_eq!(batch.decode().unwrap(), vec![turned]);
    }

    #[test]
    fn malformed_batches_are_errors() {
        let batch = |raw: &'static [u8]| MessageBatch {
            raw: Bytes::from_static(raw),
        };
        assert_eq!(batch(b"").decode(), Err(BatchError::Truncated(0)));
        assert_eq!(
            batch(b"\x01\0\0\0\xff\xff\xff\xff").decode(),
            Err(BatchError::Truncated(8))
        );
        assert_eq!(
            batch(b"\x01\0\0\0\0\0\0\0\x01\x01\0\0\0\xff").decode(),
            Err(BatchError::NotUtf8(9))
        );
        assert_eq!(batch(b"\0\0\0\0\0").decode(), Err(BatchError::Trailing(1)));
        assert!(batch(b"\xff\xff\xff\xff").decode().is_err());
        assert_eq!(
            batch(b"\x01\0\0\0\0\0\0\0\x20").decode(),
            Err(BatchError::UnknownFlags { flags: 0x20, at: 8 })
        );
        assert_eq!(batch(b"\x00\x00\x00\x00").decode(), Ok(Vec::new()));
    }
}
