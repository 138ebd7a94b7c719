//! Kafka record batches (magic 2) to and from qit log records.
//!
//! Decoding is written here rather than taken from the kafka-protocol crate because every
//! byte comes from the network: counts are checked against the bytes present before any
//! allocation, decompression stops at [`MAX_DECOMPRESSED`], and the CRC-32C is checked
//! before anything else is read. Nothing here panics on any input (the proptests at the end
//! and `tests/kafka_frames.rs` feed it garbage).
//!
//! Batch header (big-endian), 61 bytes:
//!
//! | at | size | field |
//! |---|---|---|
//! | 0 | 8 | base offset |
//! | 8 | 4 | batch length (bytes after this field) |
//! | 12 | 4 | partition leader epoch |
//! | 16 | 1 | magic (2) |
//! | 17 | 4 | CRC-32C of everything from `attributes` to the end |
//! | 21 | 2 | attributes: compression (bits 0-2), timestamp type (3), transactional (4), control (5) |
//! | 23 | 4 | last offset delta |
//! | 27 | 8 | base timestamp |
//! | 35 | 8 | max timestamp |
//! | 43 | 8 | producer id |
//! | 51 | 2 | producer epoch |
//! | 53 | 4 | base sequence |
//! | 57 | 4 | record count |
//!
//! then the records (possibly compressed), each: length varint, attributes i8, timestamp
//! delta varlong, offset delta varint, key (varint length, -1 = null), value (likewise),
//! header count varint, headers (key varint length + UTF-8, value varint length + bytes).

use std::io::Read;

use bytes::{BufMut, Bytes, BytesMut};

use super::KafkaError;
use crate::broker::message::{IDEMPOTENCY_HEADER, NULL_VALUE_HEADER, is_tombstone};
use crate::log::{Record, StoredRecord};

/// Size of a batch header.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Most bytes one batch may decompress to (a bomb stops here).
pub const MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;
/// The smallest a record can be on the wire (seven one-byte fields).
const MIN_RECORD_BYTES: usize = 7;

/// One decoded batch of a produce request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedBatch {
    /// Producer id (-1 without idempotence).
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
    /// Sequence of the first record (-1 without idempotence).
    pub base_sequence: i32,
    /// True for a transactional batch (not supported by qit).
    pub transactional: bool,
    /// True for a control batch (transaction markers).
    pub control: bool,
    /// The records, timestamps resolved.
    pub records: Vec<Record>,
}

fn malformed(what: impl Into<String>) -> KafkaError {
    KafkaError::Malformed(what.into())
}

/// A cursor over untrusted bytes: every read checks what is left.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.at)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], KafkaError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| malformed("record data ends early"))?;
        let slice = self.bytes.get(self.at..end).unwrap_or_default();
        self.at = end;
        Ok(slice)
    }

    fn i8(&mut self) -> Result<i8, KafkaError> {
        Ok(self.take(1)?.first().map_or(0, |b| *b as i8))
    }

    fn varlong(&mut self) -> Result<i64, KafkaError> {
        let mut value: u64 = 0;
        for shift in (0..70).step_by(7) {
            let byte = u64::from(self.take(1)?.first().copied().unwrap_or(0));
            if shift == 63 && byte > 1 {
                return Err(malformed("varint too long"));
            }
            value |= (byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err(malformed("varint too long"))
    }

    fn varint(&mut self) -> Result<i32, KafkaError> {
        i32::try_from(self.varlong()?).map_err(|_| malformed("varint out of range"))
    }

    /// A length-prefixed field: `None` for -1, an error below that.
    fn nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, KafkaError> {
        match self.varint()? {
            -1 => Ok(None),
            n if n < 0 => Err(malformed(format!("negative length {n}"))),
            n => Ok(Some(self.take(n as usize)?)),
        }
    }
}

fn be_i16(bytes: &[u8], at: usize) -> i16 {
    let mut b = [0u8; 2];
    if let Some(s) = bytes.get(at..at + 2) {
        b.copy_from_slice(s);
    }
    i16::from_be_bytes(b)
}

fn be_i32(bytes: &[u8], at: usize) -> i32 {
    let mut b = [0u8; 4];
    if let Some(s) = bytes.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    i32::from_be_bytes(b)
}

fn be_i64(bytes: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    if let Some(s) = bytes.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    i64::from_be_bytes(b)
}

/// Decodes every batch of a produce request's `records` field. `now_ms` stands in for
/// missing timestamps and for batches that ask for log-append time.
pub fn decode_batches(mut data: &[u8], now_ms: i64) -> Result<Vec<ProducedBatch>, KafkaError> {
    let mut batches = Vec::new();
    while !data.is_empty() {
        if data.len() < 12 {
            return Err(malformed("a batch shorter than its length field"));
        }
        let length = be_i32(data, 8);
        let total = usize::try_from(length)
            .ok()
            .and_then(|l| l.checked_add(12))
            .filter(|t| *t >= BATCH_HEADER_BYTES)
            .ok_or_else(|| malformed(format!("batch length {length}")))?;
        let batch = data
            .get(..total)
            .ok_or_else(|| malformed("batch truncated"))?;
        batches.push(decode_batch(batch, now_ms)?);
        data = data.get(total..).unwrap_or_default();
    }
    Ok(batches)
}

/// Decodes one whole batch (its exact bytes).
fn decode_batch(batch: &[u8], now_ms: i64) -> Result<ProducedBatch, KafkaError> {
    let magic = batch.get(16).copied().unwrap_or(0);
    if magic != 2 {
        return Err(malformed(format!(
            "record batch magic {magic} (only 2 is supported)"
        )));
    }
    let stored_crc = be_i32(batch, 17) as u32;
    let covered = batch.get(21..).unwrap_or_default();
    let actual = crc32c::crc32c(covered);
    if stored_crc != actual {
        return Err(KafkaError::Corrupt(format!(
            "record batch CRC {stored_crc:#010x}, computed {actual:#010x}"
        )));
    }
    let attributes = be_i16(batch, 21);
    let log_append_time = attributes & 0x08 != 0;
    let base_timestamp = be_i64(batch, 27);
    let count = be_i32(batch, 57);
    let body = batch.get(BATCH_HEADER_BYTES..).unwrap_or_default();
    let count = usize::try_from(count).map_err(|_| malformed("negative record count"))?;
    let decompressed;
    let records_bytes: &[u8] = match attributes & 0x07 {
        0 => body,
        codec => {
            decompressed = decompress(codec, body)?;
            &decompressed
        }
    };
    if count > records_bytes.len() / MIN_RECORD_BYTES {
        return Err(malformed(format!(
            "{count} records cannot fit in {} bytes",
            records_bytes.len()
        )));
    }
    let mut cursor = Cursor::new(records_bytes);
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let mut record = decode_record(&mut cursor, base_timestamp)?;
        if log_append_time || record.timestamp_ms < 0 {
            record.timestamp_ms = now_ms;
        }
        records.push(record);
    }
    if cursor.remaining() != 0 {
        return Err(malformed("bytes left after the last record"));
    }
    Ok(ProducedBatch {
        producer_id: be_i64(batch, 43),
        producer_epoch: be_i16(batch, 51),
        base_sequence: be_i32(batch, 53),
        transactional: attributes & 0x10 != 0,
        control: attributes & 0x20 != 0,
        records,
    })
}

fn decode_record(cursor: &mut Cursor<'_>, base_timestamp: i64) -> Result<Record, KafkaError> {
    let length = cursor.varint()?;
    let length = usize::try_from(length).map_err(|_| malformed("negative record length"))?;
    let mut inner = Cursor::new(cursor.take(length)?);
    let _attributes = inner.i8()?;
    let timestamp_delta = inner.varlong()?;
    let _offset_delta = inner.varint()?;
    let key = inner.nullable_bytes()?.map(Bytes::copy_from_slice);
    let value = inner.nullable_bytes()?.map(Bytes::copy_from_slice);
    let header_count = inner.varint()?;
    let header_count =
        usize::try_from(header_count).map_err(|_| malformed("negative header count"))?;
    if header_count > inner.remaining() / 2 {
        return Err(malformed("more headers than bytes"));
    }
    let mut headers = Vec::with_capacity(header_count);
    for _ in 0..header_count {
        let name = inner
            .nullable_bytes()?
            .ok_or_else(|| malformed("a null header key"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| malformed("a header key that is not UTF-8"))?
            .to_string();
        let value = inner
            .nullable_bytes()?
            .map(Bytes::copy_from_slice)
            .unwrap_or_default();
        headers.push((name, value));
    }
    if inner.remaining() != 0 {
        return Err(malformed("bytes left inside a record"));
    }
    // A null value (a tombstone) is kept as an empty one with a marker.
    if value.is_none() {
        headers.push((NULL_VALUE_HEADER.to_string(), Bytes::new()));
    }
    Ok(Record {
        timestamp_ms: base_timestamp.saturating_add(timestamp_delta),
        key,
        headers,
        value: value.unwrap_or_default(),
    })
}

/// Decompresses a batch body, stopping at [`MAX_DECOMPRESSED`].
fn decompress(codec: i16, body: &[u8]) -> Result<Vec<u8>, KafkaError> {
    let bad = |name: &str, e: std::io::Error| malformed(format!("{name} data: {e}"));
    match codec {
        1 => read_bounded(flate2::read::GzDecoder::new(body)).map_err(|e| bad("gzip", e)),
        2 => snappy(body),
        3 => {
            let decoder = lz4::Decoder::new(body).map_err(|e| bad("lz4", e))?;
            read_bounded(decoder).map_err(|e| bad("lz4", e))
        }
        4 => {
            let decoder = zstd::stream::read::Decoder::new(body).map_err(|e| bad("zstd", e))?;
            read_bounded(decoder).map_err(|e| bad("zstd", e))
        }
        other => Err(malformed(format!("compression codec {other}"))),
    }
}

fn read_bounded(reader: impl Read) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    reader
        .take(MAX_DECOMPRESSED as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > MAX_DECOMPRESSED {
        return Err(std::io::Error::other(format!(
            "decompresses past {MAX_DECOMPRESSED} bytes"
        )));
    }
    Ok(out)
}

/// The xerial framing Java clients use: a 16-byte magic header, then blocks of a 4-byte
/// big-endian length and raw snappy data. librdkafka sends the same; plain raw snappy is
/// accepted too.
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";

fn snappy(body: &[u8]) -> Result<Vec<u8>, KafkaError> {
    let mut out = Vec::new();
    if body.starts_with(XERIAL_MAGIC) {
        let mut cursor = Cursor::new(body.get(16..).unwrap_or_default());
        while cursor.remaining() > 0 {
            let length = cursor.take(4)?;
            let length = be_i32(length, 0);
            let length = usize::try_from(length).map_err(|_| malformed("snappy block length"))?;
            snappy_block(cursor.take(length)?, &mut out)?;
        }
    } else {
        snappy_block(body, &mut out)?;
    }
    Ok(out)
}

fn snappy_block(block: &[u8], out: &mut Vec<u8>) -> Result<(), KafkaError> {
    let bad = |e: snap::Error| malformed(format!("snappy data: {e}"));
    let length = snap::raw::decompress_len(block).map_err(bad)?;
    if out.len().saturating_add(length) > MAX_DECOMPRESSED {
        return Err(malformed(format!(
            "snappy data decompresses past {MAX_DECOMPRESSED} bytes"
        )));
    }
    let at = out.len();
    out.resize(at + length, 0);
    let written = snap::raw::Decoder::new()
        .decompress(block, out.get_mut(at..).unwrap_or_default())
        .map_err(bad)?;
    out.truncate(at + written);
    Ok(())
}

fn put_varlong(buf: &mut BytesMut, value: i64) {
    let mut v = ((value << 1) ^ (value >> 63)) as u64;
    while v >= 0x80 {
        buf.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn put_bytes(buf: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varlong(buf, -1),
        Some(b) => {
            put_varlong(buf, b.len() as i64);
            buf.put_slice(b);
        }
    }
}

/// Encodes stored records (ascending offsets, gaps allowed) as one uncompressed batch
/// with create-time timestamps, appended to `out`. Internal headers (the idempotency key)
/// are left out; the content type travels as the `qit-content-type` header.
pub fn encode_batch(out: &mut BytesMut, records: &[StoredRecord]) {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return;
    };
    let base_offset = first.offset;
    let base_timestamp = first.timestamp_ms;
    let max_timestamp = records
        .iter()
        .map(|r| r.timestamp_ms)
        .max()
        .unwrap_or(base_timestamp);
    let start = out.len();
    out.put_i64(base_offset as i64);
    out.put_i32(0); // batch length, patched below
    out.put_i32(-1); // partition leader epoch
    out.put_i8(2); // magic
    out.put_u32(0); // CRC, patched below
    out.put_i16(0); // attributes: no compression, create time
    out.put_i32((last.offset - base_offset) as i32);
    out.put_i64(base_timestamp);
    out.put_i64(max_timestamp);
    out.put_i64(-1); // producer id
    out.put_i16(-1); // producer epoch
    out.put_i32(-1); // base sequence
    out.put_i32(records.len() as i32);
    let mut body = BytesMut::new();
    for record in records {
        body.clear();
        body.put_i8(0);
        put_varlong(&mut body, record.timestamp_ms - base_timestamp);
        put_varlong(&mut body, (record.offset - base_offset) as i64);
        put_bytes(&mut body, record.key.as_deref());
        let tombstone = is_tombstone(record);
        put_bytes(&mut body, (!tombstone).then_some(&record.value[..]));
        let headers = record
            .headers
            .iter()
            .filter(|(name, _)| name != IDEMPOTENCY_HEADER && name != NULL_VALUE_HEADER);
        put_varlong(&mut body, headers.clone().count() as i64);
        for (name, value) in headers {
            put_bytes(&mut body, Some(name.as_bytes()));
            put_bytes(&mut body, Some(value));
        }
        put_varlong(out, body.len() as i64);
        out.put_slice(&body);
    }
    let length = (out.len() - start - 12) as i32;
    if let Some(slot) = out.get_mut(start + 8..start + 12) {
        slot.copy_from_slice(&length.to_be_bytes());
    }
    let crc = crc32c::crc32c(out.get(start + 21..).unwrap_or_default());
    if let Some(slot) = out.get_mut(start + 17..start + 21) {
        slot.copy_from_slice(&crc.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stored(offset: u64, key: Option<&str>, value: &str, ts: i64) -> StoredRecord {
        StoredRecord {
            offset,
            timestamp_ms: ts,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            headers: vec![("h".into(), Bytes::from_static(b"v"))],
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    #[test]
    fn an_encoded_batch_decodes_to_the_same_records() {
        let records = vec![
            stored(5, Some("k"), "one", 1000),
            stored(7, None, "two", 990),
        ];
        let mut out = BytesMut::new();
        encode_batch(&mut out, &records);
        let batches = decode_batches(&out, 0).unwrap();
        assert_eq!(batches.len(), 1);
        let got = &batches[0].records;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(got[1].timestamp_ms, 990);
        assert_eq!(got[1].headers, records[1].headers);
        // The crate's own decoder agrees (offsets, CRC).
        let mut bytes = out.freeze();
        let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes).unwrap();
        assert_eq!(set.records[1].offset, 7);
    }

    /// A record as a Kafka producer makes it (the crate's type).
    fn produced(
        offset: i64,
        timestamp: i64,
        key: &[u8],
        value: Option<Bytes>,
    ) -> kafka_protocol::records::Record {
        kafka_protocol::records::Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: kafka_protocol::records::TimestampType::Creation,
            offset,
            sequence: -1,
            timestamp,
            key: Some(Bytes::copy_from_slice(key)),
            value,
            headers: Default::default(),
        }
    }

    /// A batch of such records as the crate encodes it.
    fn produced_batch(
        records: &[kafka_protocol::records::Record],
        compression: kafka_protocol::records::Compression,
    ) -> BytesMut {
        let mut buf = BytesMut::new();
        let options = kafka_protocol::records::RecordEncodeOptions {
            version: 2,
            compression,
        };
        kafka_protocol::records::RecordBatchEncoder::encode(&mut buf, records, &options).unwrap();
        buf
    }

    /// A null value (a tombstone) comes back null, and an empty value empty: the two
    /// differ only by the marker header, which a fetch does not show.
    #[test]
    fn a_null_value_stays_null_and_an_empty_one_empty() {
        let records = [
            produced(0, 1000, b"k", None),
            produced(1, 1000, b"k", Some(Bytes::new())),
        ];
        let buf = produced_batch(&records, kafka_protocol::records::Compression::None);
        let records: Vec<Record> = decode_batches(&buf, 0)
            .unwrap()
            .into_iter()
            .flat_map(|b| b.records)
            .collect();
        assert_eq!(records.len(), 2);
        assert!(records.iter().all(|r| r.value.is_empty()));
        assert_eq!(
            records[0].headers,
            vec![(NULL_VALUE_HEADER.to_string(), Bytes::new())]
        );
        assert!(records[1].headers.is_empty());
        let stored: Vec<StoredRecord> = records
            .into_iter()
            .enumerate()
            .map(|(i, r)| StoredRecord {
                offset: i as u64,
                timestamp_ms: r.timestamp_ms,
                key: r.key,
                headers: r.headers,
                value: r.value,
            })
            .collect();
        let mut out = BytesMut::new();
        encode_batch(&mut out, &stored);
        let mut bytes = out.freeze();
        let fetched = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes).unwrap();
        let values: Vec<_> = fetched.records.iter().map(|r| r.value.clone()).collect();
        assert_eq!(values, vec![None, Some(Bytes::new())]);
        assert!(fetched.records.iter().all(|r| r.headers.is_empty()));
    }

    #[test]
    fn a_flipped_bit_fails_the_crc() {
        let mut out = BytesMut::new();
        encode_batch(&mut out, &[stored(0, None, "x", 1)]);
        let last = out.len() - 1;
        out[last] ^= 1;
        assert!(matches!(
            decode_batches(&out, 0),
            Err(KafkaError::Corrupt(_))
        ));
    }

    #[test]
    fn compressed_batches_from_the_crate_decode() {
        use kafka_protocol::records::Compression;
        for compression in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let records: Vec<_> = (0..50)
                .map(|i| {
                    let key = format!("key-{i}");
                    produced(
                        i,
                        1000 + i,
                        key.as_bytes(),
                        Some(Bytes::from(vec![b'x'; 100])),
                    )
                })
                .collect();
            let buf = produced_batch(&records, compression);
            let batches = decode_batches(&buf, 0).unwrap();
            let decoded: Vec<_> = batches.iter().flat_map(|b| &b.records).collect();
            assert_eq!(decoded.len(), 50, "{compression:?}");
            assert_eq!(decoded[49].timestamp_ms, 1049);
            assert_eq!(decoded[3].key.as_deref(), Some(&b"key-3"[..]));
        }
    }

    proptest! {
        /// Any bytes: an error or batches, never a panic.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_batches(&bytes, 0);
        }

        /// A valid batch with a byte changed, cut short or grown: an error or records,
        /// never a panic; with the CRC fixed up the record decoder itself is exercised.
        #[test]
        fn damaged_batches_never_panic(
            values in proptest::collection::vec(".{0,20}", 1..5),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
            fix_crc in any::<bool>(),
        ) {
            let records: Vec<_> = values
                .iter()
                .enumerate()
                .map(|(i, v)| stored(i as u64, Some("k"), v, 10))
                .collect();
            let mut out = BytesMut::new();
            encode_batch(&mut out, &records);
            let i = at.index(out.len());
            out[i] = byte;
            if fix_crc {
                let crc = crc32c::crc32c(&out[21..]);
                out[17..21].copy_from_slice(&crc.to_be_bytes());
            }
            let _ = decode_batches(&out, 0);
            let n = cut.index(out.len());
            let _ = decode_batches(&out[..n], 0);
        }
    }
}
