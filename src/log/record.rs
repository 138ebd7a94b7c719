//! The batch and record codec: the only place that lays out batch bytes.
//!
//! A batch is a header (68 bytes in format v2, which this code writes; 60 in format v1,
//! still read) followed by the records section (optionally LZ4 compressed). All integers
//! are little-endian; record fields use LEB128 varints (zigzag for the signed timestamp
//! delta). `storage-format.md` has the byte tables.
//!
//! Decoding never panics: [`classify`] tells a whole batch from a torn one (not enough bytes)
//! and a corrupt one (bad magic, length or CRC), and recovery and `qit-inspect` both use it.
#![deny(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use bytes::{BufMut, Bytes};

use super::{Compression, Record, StoredRecord};

/// `"QITB"`: the first four bytes of every batch.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"QITB");
/// Format version written by this code.
pub const FORMAT_VERSION: u8 = 2;
/// Size of the batch header this code writes (format v2), in bytes.
pub const HEADER_LEN: usize = 68;
/// Size of a format v1 batch header, in bytes: v2's without the Raft index.
pub const HEADER_LEN_V1: usize = 60;
/// Largest batch accepted when decoding (guards against absurd lengths).
pub const MAX_BATCH_LEN: usize = 256 * 1024 * 1024;

// Field positions in the header.
/// u32 magic `QITB`.
const MAGIC_AT: usize = 0;
/// u32 CRC-32 (IEEE, `crc32fast`) over bytes `[8, batch_len)`: everything after this field.
const CRC_AT: usize = 4;
/// u32 total batch length in bytes, header included.
const LEN_AT: usize = 8;
/// u8 format version.
const VERSION_AT: usize = 12;
/// u8 attributes: bits 0-2 compression (0 none, 1 LZ4); other bits 0.
const ATTR_AT: usize = 13;
/// u8 entry type ([`EntryType`]; v2, reserved 0 in v1, whose batches are all data).
const ENTRY_TYPE_AT: usize = 14;
/// u8 reserved, 0 (v1: with the byte before it, a u16 reserved 0).
const RESERVED_AT: usize = 15;
/// u64 offset of the first record slot of the batch.
const BASE_OFFSET_AT: usize = 16;
/// u64 leader epoch of the writer (0 on a single node; for replication).
const EPOCH_AT: usize = 24;
/// u32 offset of the last record slot minus base offset (kept when compaction removes
/// records, so a batch keeps covering its original offsets).
const LAST_DELTA_AT: usize = 32;
/// u32 number of records present.
const COUNT_AT: usize = 36;
/// i64 timestamp (ms) of the first record; record timestamps are deltas from it.
const FIRST_TS_AT: usize = 40;
/// i64 largest record timestamp (ms).
const MAX_TS_AT: usize = 48;
/// u32 size of the records section before compression.
const RAW_SIZE_AT: usize = 56;
/// u64 Raft log index of the entry that wrote the batch (v2; 0 on a single node).
const RAFT_INDEX_AT: usize = 60;

/// The header length of a format version, `None` for a version this code does not know.
pub fn header_len(version: u8) -> Option<usize> {
    match version {
        1 => Some(HEADER_LEN_V1),
        2 => Some(HEADER_LEN),
        _ => None,
    }
}

/// What kind of entry a batch is (the v2 header's entry type). A queue's partition holds
/// data only; a partition log that is a Raft group's log (see `cluster::partition_log_store`)
/// also holds the group's own entries, one batch each, which readers of records pass over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryType {
    /// Records (code 0). Every v1 batch is data.
    #[default]
    Data,
    /// A Raft blank entry (code 1): one empty record.
    Blank,
    /// A Raft membership entry (code 2): one record holding the encoded membership.
    Membership,
    /// Any other Raft entry of the group (code 3): one record holding the encoded command.
    Command,
}

impl EntryType {
    /// The type's code in the header.
    pub fn code(self) -> u8 {
        match self {
            EntryType::Data => 0,
            EntryType::Blank => 1,
            EntryType::Membership => 2,
            EntryType::Command => 3,
        }
    }

    /// The type a header code names, `None` for a code this version does not know.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(EntryType::Data),
            1 => Some(EntryType::Blank),
            2 => Some(EntryType::Membership),
            3 => Some(EntryType::Command),
            _ => None,
        }
    }

    /// The type's name: `data`, `blank`, `membership` or `command`.
    pub fn name(self) -> &'static str {
        match self {
            EntryType::Data => "data",
            EntryType::Blank => "blank",
            EntryType::Membership => "membership",
            EntryType::Command => "command",
        }
    }

    /// True for records that consumers read; false for a Raft group's own entries.
    pub fn is_data(self) -> bool {
        self == EntryType::Data
    }
}

/// Where a batch comes from, as its header records it: on a cluster replica, the Raft
/// term (Kafka's leader epoch) and log index of the entry that wrote it, the same on every
/// replica (both 0 on a single node), and what kind of entry it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stamp {
    /// The Raft term of the entry (header `leader_epoch`).
    pub leader_epoch: u64,
    /// The Raft log index of the entry (header `raft_index`, v2).
    pub raft_index: u64,
    /// The kind of entry (header `entry_type`, v2): data unless the log is a Raft log.
    pub entry_type: EntryType,
}

/// Attribute bits for compression.
const COMPRESSION_MASK: u8 = 0b111;
const COMPRESSION_LZ4: u8 = 1;
/// Records sections smaller than this are never compressed (not worth it).
const COMPRESS_MIN_BYTES: usize = 512;

/// The decoded header of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Total batch length in bytes, header included.
    pub batch_len: u32,
    /// Format version.
    pub version: u8,
    /// Compression of the records section.
    pub compression: Compression,
    /// First offset slot.
    pub base_offset: u64,
    /// Leader epoch of the writer: the Raft term of the entry that wrote it (0 on a
    /// single node).
    pub leader_epoch: u64,
    /// Raft log index of the entry that wrote it (0 on a single node and in v1 batches).
    pub raft_index: u64,
    /// What the batch holds (data in v1 batches).
    pub entry_type: EntryType,
    /// Last offset slot minus `base_offset`.
    pub last_offset_delta: u32,
    /// Records present.
    pub record_count: u32,
    /// Timestamp of the first record (ms).
    pub first_timestamp_ms: i64,
    /// Largest timestamp (ms).
    pub max_timestamp_ms: i64,
    /// Uncompressed size of the records section.
    pub raw_size: u32,
    /// The stored CRC.
    pub crc: u32,
}

impl BatchHeader {
    /// Bytes of this batch's header (by its format version; the records section follows).
    pub fn header_len(&self) -> usize {
        header_len(self.version).unwrap_or(HEADER_LEN)
    }

    /// The term, index and entry type the batch was stamped with.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            leader_epoch: self.leader_epoch,
            raft_index: self.raft_index,
            entry_type: self.entry_type,
        }
    }

    /// One past the last offset this batch covers.
    /// [`classify`] refuses a batch whose offsets would overflow, so this saturates only
    /// for headers that were never checked.
    pub fn next_offset(&self) -> u64 {
        self.base_offset
            .saturating_add(u64::from(self.last_offset_delta))
            .saturating_add(1)
    }
}

/// What the bytes at a position hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole batch whose CRC matches.
    Batch(BatchHeader),
    /// Fewer bytes than the batch needs: a torn write (or the end of the data).
    Torn {
        /// Bytes available.
        available: usize,
        /// Bytes the header says the batch has (or the header size, if unreadable).
        needed: usize,
    },
    /// Bytes that cannot be a valid batch.
    Corrupt {
        /// What is wrong.
        reason: String,
    },
}

/// Errors decoding the records inside a batch whose CRC matched (a writer bug or a format
/// mismatch, never a torn write).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed records section: {0}")]
pub struct RecordError(pub String);

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Reads a header without checking the CRC (cheap: for skipping and index checks). `None`
/// when `bytes` are shorter than the header of the version they name, or the entry type
/// is unknown to this version.
pub fn peek_header(bytes: &[u8]) -> Option<BatchHeader> {
    let attributes = *bytes.get(ATTR_AT)?;
    let version = *bytes.get(VERSION_AT)?;
    let (raft_index, entry_type) = match version {
        1 => (0, EntryType::Data),
        _ => (
            u64_at(bytes, RAFT_INDEX_AT)?,
            EntryType::from_code(*bytes.get(ENTRY_TYPE_AT)?)?,
        ),
    };
    Some(BatchHeader {
        batch_len: u32_at(bytes, LEN_AT)?,
        version,
        raft_index,
        entry_type,
        compression: if attributes & COMPRESSION_MASK == COMPRESSION_LZ4 {
            Compression::Lz4
        } else {
            Compression::None
        },
        base_offset: u64_at(bytes, BASE_OFFSET_AT)?,
        leader_epoch: u64_at(bytes, EPOCH_AT)?,
        last_offset_delta: u32_at(bytes, LAST_DELTA_AT)?,
        record_count: u32_at(bytes, COUNT_AT)?,
        first_timestamp_ms: u64_at(bytes, FIRST_TS_AT)? as i64,
        max_timestamp_ms: u64_at(bytes, MAX_TS_AT)? as i64,
        raw_size: u32_at(bytes, RAW_SIZE_AT)?,
        crc: u32_at(bytes, CRC_AT)?,
    })
}

/// Classifies the bytes at the start of `bytes` (which may run past the batch).
pub fn classify(bytes: &[u8]) -> Decoded {
    if bytes.len() < HEADER_LEN_V1 {
        return Decoded::Torn {
            available: bytes.len(),
            needed: HEADER_LEN_V1,
        };
    }
    let corrupt = |reason: String| Decoded::Corrupt { reason };
    if u32_at(bytes, MAGIC_AT) != Some(BATCH_MAGIC) {
        return corrupt("bad magic".into());
    }
    let version = bytes.get(VERSION_AT).copied().unwrap_or_default();
    let Some(header_len) = header_len(version) else {
        return corrupt(format!("unknown format version {version}"));
    };
    if bytes.len() < header_len {
        return Decoded::Torn {
            available: bytes.len(),
            needed: header_len,
        };
    }
    let Some(header) = peek_header(bytes) else {
        let code = bytes.get(ENTRY_TYPE_AT).copied().unwrap_or_default();
        return corrupt(format!("unknown entry type {code}"));
    };
    let len = header.batch_len as usize;
    if !(header_len..=MAX_BATCH_LEN).contains(&len) {
        return corrupt(format!("impossible batch length {len}"));
    }
    if bytes.len() < len {
        return Decoded::Torn {
            available: bytes.len(),
            needed: len,
        };
    }
    let Some(covered) = bytes.get(LEN_AT..len) else {
        return corrupt("length out of range".into());
    };
    let actual = crc32fast::hash(covered);
    if actual != header.crc {
        return corrupt(format!(
            "CRC mismatch: stored {:#010x}, computed {actual:#010x}",
            header.crc
        ));
    }
    // v1 reserves the entry type's byte too; v2 only the one after it.
    let reserved = match version {
        1 => ENTRY_TYPE_AT..RESERVED_AT + 1,
        _ => RESERVED_AT..RESERVED_AT + 1,
    };
    if bytes
        .get(reserved)
        .is_none_or(|r| r.iter().any(|b| *b != 0))
    {
        return corrupt("reserved bytes are not zero".into());
    }
    if header.record_count > header.last_offset_delta.saturating_add(1) {
        return corrupt("more records than offset slots".into());
    }
    if header
        .base_offset
        .checked_add(u64::from(header.last_offset_delta))
        .and_then(|last| last.checked_add(1))
        .is_none()
    {
        return corrupt("offsets run past u64::MAX".into());
    }
    Decoded::Batch(header)
}

fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ ((value & 1) as i64).wrapping_neg()
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// Bytes a varint of `value` takes.
// Encoder: sizes come from records in memory (bounded by the request limits), not from disk.
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// Appends one record's encoding (length-prefixed) to `buf`, without temporary buffers.
// Encoder: sizes come from records in memory (bounded by the request limits), not from disk.
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
fn encode_record(buf: &mut Vec<u8>, offset_delta: u32, timestamp_delta: i64, record: &Record) {
    let key_tag = record.key.as_ref().map_or(0, |k| k.len() as u64 + 1);
    let headers_len: usize = record
        .headers
        .iter()
        .map(|(n, v)| varint_len(n.len() as u64) + n.len() + varint_len(v.len() as u64) + v.len())
        .sum();
    let body_len = varint_len(u64::from(offset_delta))
        + varint_len(zigzag(timestamp_delta))
        + varint_len(key_tag)
        + record.key.as_ref().map_or(0, Bytes::len)
        + varint_len(record.headers.len() as u64)
        + headers_len
        + varint_len(record.value.len() as u64)
        + record.value.len();
    buf.reserve(body_len + 10);
    put_varint(buf, body_len as u64);
    put_varint(buf, u64::from(offset_delta));
    put_varint(buf, zigzag(timestamp_delta));
    put_varint(buf, key_tag);
    if let Some(key) = &record.key {
        buf.extend_from_slice(key);
    }
    put_varint(buf, record.headers.len() as u64);
    for (name, value) in &record.headers {
        put_bytes(buf, name.as_bytes());
        put_bytes(buf, value);
    }
    put_bytes(buf, &record.value);
}

/// A record to encode together with its offset slot relative to the batch base.
pub struct Slot<'a> {
    /// Offset minus the batch's base offset.
    pub offset_delta: u32,
    /// The record.
    pub record: &'a Record,
}

/// Encodes a batch of records at consecutive offsets from `base_offset` into `out`.
pub fn encode_batch(
    out: &mut Vec<u8>,
    base_offset: u64,
    stamp: Stamp,
    records: &[Record],
    compression: Compression,
) {
    let slots: Vec<Slot<'_>> = records
        .iter()
        .enumerate()
        .map(|(i, record)| Slot {
            offset_delta: i as u32,
            record,
        })
        .collect();
    let last = records.len().saturating_sub(1) as u32;
    encode_slots(out, base_offset, stamp, last, &slots, compression);
}

/// Encodes a batch of records at given offset slots (gaps allowed, as after compaction).
/// `last_offset_delta` is the last slot the batch covers, present or not.
// Encoder: sizes come from records in memory (bounded by the request limits), not from disk.
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
pub fn encode_slots(
    out: &mut Vec<u8>,
    base_offset: u64,
    stamp: Stamp,
    last_offset_delta: u32,
    slots: &[Slot<'_>],
    compression: Compression,
) {
    let first_ts = slots.first().map_or(0, |s| s.record.timestamp_ms);
    let max_ts = slots
        .iter()
        .map(|s| s.record.timestamp_ms)
        .max()
        .unwrap_or(first_ts);
    let mut raw = Vec::with_capacity(slots.iter().map(|s| s.record.value.len() + 24).sum());
    for slot in slots {
        let delta = slot.record.timestamp_ms.wrapping_sub(first_ts);
        encode_record(&mut raw, slot.offset_delta, delta, slot.record);
    }
    let raw_size = raw.len() as u32;
    let (attributes, section) = match compression {
        Compression::Lz4 if raw.len() >= COMPRESS_MIN_BYTES => {
            let packed = lz4_flex::block::compress(&raw);
            if packed.len() < raw.len() {
                (COMPRESSION_LZ4, packed)
            } else {
                (0, raw)
            }
        }
        _ => (0, raw),
    };
    let start = out.len();
    let batch_len = (HEADER_LEN + section.len()) as u32;
    out.put_u32_le(BATCH_MAGIC);
    out.put_u32_le(0); // CRC, patched below.
    out.put_u32_le(batch_len);
    out.put_u8(FORMAT_VERSION);
    out.put_u8(attributes);
    out.put_u8(stamp.entry_type.code());
    out.put_u8(0);
    out.put_u64_le(base_offset);
    out.put_u64_le(stamp.leader_epoch);
    out.put_u32_le(last_offset_delta);
    out.put_u32_le(slots.len() as u32);
    out.put_i64_le(first_ts);
    out.put_i64_le(max_ts);
    out.put_u32_le(raw_size);
    out.put_u64_le(stamp.raft_index);
    debug_assert_eq!(out.len() - start, HEADER_LEN);
    out.extend_from_slice(&section);
    let crc = crc32fast::hash(&out[start + LEN_AT..]);
    out[start + CRC_AT..start + CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// A cursor over a records section that never reads out of bounds.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn varint(&mut self) -> Result<u64, RecordError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| RecordError("truncated varint".into()))?;
            self.at = self.at.saturating_add(1);
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(RecordError("varint too long".into()))
    }

    fn take(&mut self, len: u64) -> Result<std::ops::Range<usize>, RecordError> {
        let len = usize::try_from(len).map_err(|_| RecordError("length overflow".into()))?;
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| RecordError("field runs past the section".into()))?;
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }
}

/// Decodes the records of a whole, CRC-checked batch. `batch` holds exactly the batch's
/// bytes; returned fields share its memory when it is not compressed.
pub fn decode_records(
    header: &BatchHeader,
    batch: &Bytes,
) -> Result<Vec<StoredRecord>, RecordError> {
    decode_records_from(header, batch, 0, usize::MAX)
}

/// Decodes at most `limit` records with offset >= `from`; records below `from` are skipped
/// without being materialized.
pub fn decode_records_from(
    header: &BatchHeader,
    batch: &Bytes,
    from: u64,
    limit: usize,
) -> Result<Vec<StoredRecord>, RecordError> {
    let section = batch.slice(header.header_len().min(batch.len())..);
    let section = match header.compression {
        Compression::None => section,
        Compression::Lz4 => {
            // The size to allocate comes from disk: cap it by what LZ4 can expand to (at
            // most 255 bytes per input byte) and by the largest batch.
            let raw_size = usize::try_from(header.raw_size).unwrap_or(usize::MAX);
            let most = section.len().saturating_mul(255).min(MAX_BATCH_LEN);
            if raw_size > most {
                return Err(RecordError(format!(
                    "LZ4 raw size {raw_size} exceeds what {} compressed bytes can hold",
                    section.len()
                )));
            }
            Bytes::from(
                lz4_flex::block::decompress(&section, raw_size)
                    .map_err(|e| RecordError(format!("LZ4: {e}")))?,
            )
        }
    };
    let wanted = (header.record_count as usize).min(limit);
    let mut records = Vec::with_capacity(wanted.min(1024));
    let mut cursor = Cursor {
        bytes: &section,
        at: 0,
    };
    for _ in 0..header.record_count {
        if records.len() >= limit {
            return Ok(records);
        }
        let len = cursor.varint()?;
        let body = cursor.take(len)?;
        let mut peek = Cursor {
            bytes: section.get(..body.end).unwrap_or_default(),
            at: body.start,
        };
        let offset = header
            .base_offset
            .checked_add(peek.varint()?)
            .ok_or_else(|| RecordError("offset delta overflows".into()))?;
        if offset < from {
            continue;
        }
        records.push(decode_record(header, &section, body)?);
    }
    if cursor.at != section.len() {
        return Err(RecordError("trailing bytes after the last record".into()));
    }
    Ok(records)
}

fn decode_record(
    header: &BatchHeader,
    section: &Bytes,
    body: std::ops::Range<usize>,
) -> Result<StoredRecord, RecordError> {
    let mut cursor = Cursor {
        bytes: section.get(..body.end).unwrap_or_default(),
        at: body.start,
    };
    let offset_delta = cursor.varint()?;
    if offset_delta > u64::from(header.last_offset_delta) {
        return Err(RecordError("offset delta past the batch".into()));
    }
    let timestamp_delta = unzigzag(cursor.varint()?);
    let key = match cursor.varint()? {
        0 => None,
        n => Some(section.slice(cursor.take(n.saturating_sub(1))?)),
    };
    let header_count = cursor.varint()?;
    let mut headers = Vec::with_capacity(header_count.min(64) as usize);
    for _ in 0..header_count {
        let name_len = cursor.varint()?;
        let name = section
            .get(cursor.take(name_len)?)
            .map(std::str::from_utf8)
            .ok_or_else(|| RecordError("header name runs past the section".into()))?
            .map_err(|_| RecordError("header name is not UTF-8".into()))?
            .to_owned();
        let value_len = cursor.varint()?;
        headers.push((name, section.slice(cursor.take(value_len)?)));
    }
    let value_len = cursor.varint()?;
    let value = section.slice(cursor.take(value_len)?);
    if cursor.at != body.end {
        return Err(RecordError("record length mismatch".into()));
    }
    Ok(StoredRecord {
        offset: header
            .base_offset
            .checked_add(offset_delta)
            .ok_or_else(|| RecordError("offset delta overflows".into()))?,
        timestamp_ms: header.first_timestamp_ms.wrapping_add(timestamp_delta),
        key,
        headers,
        value,
    })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record_strategy() -> impl Strategy<Value = Record> {
        (
            any::<i64>().prop_map(|t| t / 4),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            proptest::collection::vec(
                ("[a-z-]{0,8}", proptest::collection::vec(any::<u8>(), 0..8)),
                0..4,
            ),
            proptest::collection::vec(any::<u8>(), 0..700),
        )
            .prop_map(|(timestamp_ms, key, headers, value)| Record {
                timestamp_ms,
                key: key.map(Bytes::from),
                headers: headers
                    .into_iter()
                    .map(|(n, v)| (n, Bytes::from(v)))
                    .collect(),
                value: Bytes::from(value),
            })
    }

    fn decode_one(buf: &[u8]) -> (BatchHeader, Vec<StoredRecord>) {
        let Decoded::Batch(header) = classify(buf) else {
            panic!("not a batch: {:?}", classify(buf));
        };
        let bytes = Bytes::copy_from_slice(&buf[..header.batch_len as usize]);
        (header, decode_records(&header, &bytes).unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn batches_round_trip(
            records in proptest::collection::vec(record_strategy(), 1..20),
            base in 0u64..1_000_000_000,
            lz4 in any::<bool>(),
            leader_epoch in any::<u64>(),
            raft_index in any::<u64>(),
            code in 0u8..4,
            v1 in any::<bool>(),
        ) {
            let compression = if lz4 { Compression::Lz4 } else { Compression::None };
            let mut buf = Vec::new();
            // v1 has no entry type: only data is written in it.
            let entry_type = EntryType::from_code(if v1 { 0 } else { code }).unwrap();
            let stamp = Stamp { leader_epoch, raft_index, entry_type };
            encode_batch(&mut buf, base, stamp, &records, compression);
            if v1 {
                buf = as_v1(&buf);
            }
            let (header, decoded) = decode_one(&buf);
            prop_assert_eq!(header.base_offset, base);
            prop_assert_eq!(header.leader_epoch, leader_epoch);
            prop_assert_eq!(header.raft_index, if v1 { 0 } else { raft_index });
            prop_assert_eq!(header.version, if v1 { 1 } else { 2 });
            prop_assert_eq!(header.entry_type, entry_type);
            prop_assert_eq!(header.stamp(), Stamp { raft_index: header.raft_index, ..stamp });
            prop_assert_eq!(header.next_offset(), base + records.len() as u64);
            prop_assert_eq!(decoded.len(), records.len());
            for (i, (got, want)) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(got.offset, base + i as u64);
                prop_assert_eq!(got.timestamp_ms, want.timestamp_ms);
                prop_assert_eq!(&got.key, &want.key);
                prop_assert_eq!(&got.headers, &want.headers);
                prop_assert_eq!(&got.value, &want.value);
            }
        }

        #[test]
        fn classify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&bytes);
        }

        /// The records decoder behind a CRC that matches (a writer bug, a format mismatch
        /// or a crafted file): arbitrary header fields and records sections give an error
        /// or records, never a panic or a huge allocation.
        #[test]
        fn decode_records_never_panics_on_arbitrary_sections(
            section in proptest::collection::vec(any::<u8>(), 0..300),
            base in prop_oneof![Just(u64::MAX - 3), any::<u64>(), 0u64..10],
            last_delta in prop_oneof![Just(u32::MAX), 0u32..50],
            count in 0u32..60,
            raw_size in prop_oneof![Just(u32::MAX), any::<u32>(), 0u32..2000],
            lz4 in any::<bool>(),
        ) {
            let bytes = resealed(base, last_delta, count, raw_size, lz4, &section);
            if let Decoded::Batch(header) = classify(&bytes) {
                let batch = Bytes::from(bytes);
                let _ = decode_records(&header, &batch);
                let _ = decode_records_from(&header, &batch, base.wrapping_add(3), 5);
            }
        }

        /// A valid batch with one byte changed and its CRC fixed up: never a panic.
        #[test]
        fn decode_records_never_panics_on_mutated_batches(
            records in proptest::collection::vec(record_strategy(), 1..6),
            lz4 in any::<bool>(),
            position in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let compression = if lz4 { Compression::Lz4 } else { Compression::None };
            let mut buf = Vec::new();
            encode_batch(&mut buf, 100, Stamp::default(), &records, compression);
            let at = LEN_AT + 4 + position.index(buf.len() - LEN_AT - 4);
            buf[at] ^= xor;
            fix_crc(&mut buf);
            if let Decoded::Batch(header) = classify(&buf) {
                let _ = decode_records(&header, &Bytes::from(buf));
            }
        }

        #[test]
        fn any_flipped_byte_is_caught(
            records in proptest::collection::vec(record_strategy(), 1..5),
            position in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            v1 in any::<bool>(),
        ) {
            let mut buf = Vec::new();
            encode_batch(&mut buf, 0, Stamp { leader_epoch: 3, raft_index: 9, ..Stamp::default() }, &records, Compression::None);
            if v1 {
                buf = as_v1(&buf);
            }
            let at = position.index(buf.len());
            buf[at] ^= flip;
            prop_assert!(!matches!(classify(&buf), Decoded::Batch(_)));
        }
    }

    /// The format v1 form of the v2 batch `v2`: no Raft index, version 1, CRC redone.
    fn as_v1(v2: &[u8]) -> Vec<u8> {
        let mut out = v2[..HEADER_LEN_V1].to_vec();
        out.extend_from_slice(&v2[HEADER_LEN..]);
        out[VERSION_AT] = 1;
        let len = out.len() as u32;
        out[LEN_AT..LEN_AT + 4].copy_from_slice(&len.to_le_bytes());
        fix_crc(&mut out);
        out
    }

    /// Writes the CRC that matches the rest of the batch `bytes`.
    fn fix_crc(bytes: &mut [u8]) {
        let crc = crc32fast::hash(&bytes[LEN_AT..]);
        bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// A v1 batch is cut torn anywhere short of its 60-byte header, a v2 one short of its
    /// 68 bytes; a version or entry type this code does not know is corrupt.
    #[test]
    fn header_lengths_and_unknown_codes() {
        let records = vec![Record {
            value: Bytes::from_static(b"hello"),
            ..Record::default()
        }];
        let mut v2 = Vec::new();
        encode_batch(&mut v2, 0, Stamp::default(), &records, Compression::None);
        let v1 = as_v1(&v2);
        assert_eq!(v2.len(), v1.len() + 8);
        for (bytes, len) in [(&v1, HEADER_LEN_V1), (&v2, HEADER_LEN)] {
            match classify(&bytes[..len - 1]) {
                Decoded::Torn { needed, .. } => assert_eq!(needed, len),
                other => panic!("{other:?}"),
            }
        }
        for (at, value, reason) in [
            (VERSION_AT, 3, "unknown format version 3"),
            (ENTRY_TYPE_AT, 4, "unknown entry type 4"),
        ] {
            let mut bytes = v2.clone();
            bytes[at] = value;
            fix_crc(&mut bytes);
            assert_eq!(
                classify(&bytes),
                Decoded::Corrupt {
                    reason: reason.into()
                }
            );
        }
        // v1 reserved the entry type's byte: not zero there is corrupt, not a type.
        let mut bytes = v1.clone();
        bytes[ENTRY_TYPE_AT] = 1;
        fix_crc(&mut bytes);
        assert!(matches!(classify(&bytes), Decoded::Corrupt { .. }));
    }

    /// A batch with the given header fields around `section`, with a matching CRC.
    fn resealed(
        base: u64,
        last_delta: u32,
        count: u32,
        raw_size: u32,
        lz4: bool,
        section: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u32_le(BATCH_MAGIC);
        out.put_u32_le(0);
        out.put_u32_le((HEADER_LEN + section.len()) as u32);
        out.put_u8(FORMAT_VERSION);
        out.put_u8(if lz4 { COMPRESSION_LZ4 } else { 0 });
        out.put_u16_le(0);
        out.put_u64_le(base);
        out.put_u64_le(0);
        out.put_u32_le(last_delta);
        out.put_u32_le(count);
        out.put_i64_le(i64::MAX);
        out.put_i64_le(i64::MAX);
        out.put_u32_le(raw_size);
        out.put_u64_le(0);
        out.extend_from_slice(section);
        fix_crc(&mut out);
        out
    }

    /// Regression (issue 11): an LZ4 batch's `raw_size` comes from disk and was allocated
    /// as is; a crafted 4 GiB one must be refused before allocating.
    #[test]
    fn lz4_raw_size_is_capped_before_allocating() {
        let bytes = resealed(0, 0, 1, u32::MAX, true, &[0x10, 0x41]);
        let Decoded::Batch(header) = classify(&bytes) else {
            panic!("not a batch");
        };
        let error = decode_records(&header, &Bytes::from(bytes)).unwrap_err();
        assert!(error.0.contains("raw size"), "{error}");
    }

    /// Regression (issue 11): offsets from disk near `u64::MAX` overflowed `base + delta`.
    #[test]
    fn offsets_past_u64_max_are_corrupt_not_a_panic() {
        let bytes = resealed(u64::MAX - 1, 5, 0, 0, false, &[]);
        assert!(matches!(classify(&bytes), Decoded::Corrupt { .. }));
    }

    #[test]
    fn varint_lengths_match_encoding() {
        for value in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            assert_eq!(buf.len(), varint_len(value), "{value}");
        }
    }

    #[test]
    fn every_cut_is_torn() {
        let records = vec![Record {
            value: Bytes::from_static(b"hello"),
            ..Record::default()
        }];
        let mut buf = Vec::new();
        encode_batch(&mut buf, 5, Stamp::default(), &records, Compression::None);
        for cut in 0..buf.len() {
            assert!(
                matches!(classify(&buf[..cut]), Decoded::Torn { .. }),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn gaps_survive_round_trip() {
        let a = Record {
            value: Bytes::from_static(b"a"),
            ..Record::default()
        };
        let slots = [Slot {
            offset_delta: 3,
            record: &a,
        }];
        let mut buf = Vec::new();
        encode_slots(&mut buf, 10, Stamp::default(), 9, &slots, Compression::None);
        let (header, decoded) = decode_one(&buf);
        assert_eq!(header.next_offset(), 20);
        assert_eq!(decoded[0].offset, 13);
    }
}
