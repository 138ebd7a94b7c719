//! Journal entries of a group and checkpoint snapshots: their bytes.
//!
//! An entry is one or more 17-byte events: kind u8 | partition u32 | offset u64 | count u32
//! (little-endian; count is 0 where unused). A snapshot is: magic `QGS1` | dead_lettered u64
//! | partition count u32 | per partition: floor u64, done-range count u32, ranges
//! (start u64, end u64)*, count entries u32, (offset u64, delivery count u32)*.
#![deny(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use bytes::{BufMut, Bytes, BytesMut};

const EVENT_LEN: usize = 17;
const LEASED: u8 = 1;
const DONE: u8 = 2;
const DEAD_LETTERED: u8 = 3;
const SEEK: u8 = 4;
const SNAPSHOT_MAGIC: &[u8; 4] = b"QGS1";

/// A change of group state worth journaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A delivery (so delivery counts survive a restart).
    Leased {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// Delivery count of this delivery.
        delivery_count: u32,
    },
    /// Acknowledged.
    Done {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
    },
    /// Appended to the dead-letter queue; done for the group.
    DeadLettered {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
    },
    /// The partition was moved to `offset`.
    Seek {
        /// Partition.
        partition: u32,
        /// Target offset.
        offset: u64,
    },
}

/// Malformed journal or snapshot bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed group state: {0}")]
pub struct DecodeError(pub String);

/// Encodes events into one journal entry.
pub fn encode_events(events: &[Event]) -> Bytes {
    let mut out = BytesMut::with_capacity(events.len().saturating_mul(EVENT_LEN));
    for event in events {
        let (kind, partition, offset, count) = match *event {
            Event::Leased {
                partition,
                offset,
                delivery_count,
            } => (LEASED, partition, offset, delivery_count),
            Event::Done { partition, offset } => (DONE, partition, offset, 0),
            Event::DeadLettered { partition, offset } => (DEAD_LETTERED, partition, offset, 0),
            Event::Seek { partition, offset } => (SEEK, partition, offset, 0),
        };
        out.put_u8(kind);
        out.put_u32_le(partition);
        out.put_u64_le(offset);
        out.put_u32_le(count);
    }
    out.freeze()
}

/// Decodes a journal entry.
pub fn decode_events(bytes: &[u8]) -> Result<Vec<Event>, DecodeError> {
    if !bytes.len().is_multiple_of(EVENT_LEN) {
        return Err(DecodeError(format!("entry of {} bytes", bytes.len())));
    }
    bytes
        .chunks_exact(EVENT_LEN)
        .map(|chunk| {
            let mut r = Reader {
                bytes: chunk,
                at: 0,
            };
            let kind = r.u8()?;
            let partition = r.u32()?;
            let offset = r.u64()?;
            let count = r.u32()?;
            Ok(match kind {
                LEASED => Event::Leased {
                    partition,
                    offset,
                    delivery_count: count,
                },
                DONE => Event::Done { partition, offset },
                DEAD_LETTERED => Event::DeadLettered { partition, offset },
                SEEK => Event::Seek { partition, offset },
                other => return Err(DecodeError(format!("unknown event kind {other}"))),
            })
        })
        .collect()
}

/// The durable state of one partition of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionSnapshot {
    /// Ack floor.
    pub floor: u64,
    /// Done ranges above the floor, `[start, end)`.
    pub done: Vec<(u64, u64)>,
    /// Delivery counts of messages not done.
    pub counts: Vec<(u64, u32)>,
}

/// The durable state of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Messages dead-lettered so far.
    pub dead_lettered: u64,
    /// Per partition.
    pub partitions: Vec<PartitionSnapshot>,
}

impl Snapshot {
    /// Its bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_slice(SNAPSHOT_MAGIC);
        out.put_u64_le(self.dead_lettered);
        out.put_u32_le(self.partitions.len() as u32);
        for p in &self.partitions {
            out.put_u64_le(p.floor);
            out.put_u32_le(p.done.len() as u32);
            for (start, end) in &p.done {
                out.put_u64_le(*start);
                out.put_u64_le(*end);
            }
            out.put_u32_le(p.counts.len() as u32);
            for (offset, count) in &p.counts {
                out.put_u64_le(*offset);
                out.put_u32_le(*count);
            }
        }
        out.freeze()
    }

    /// Parses bytes written by [`Snapshot::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != SNAPSHOT_MAGIC {
            return Err(DecodeError("bad snapshot magic".into()));
        }
        let dead_lettered = r.u64()?;
        let partitions = (0..r.u32()?)
            .map(|_| {
                let floor = r.u64()?;
                let done = (0..r.u32()?)
                    .map(|_| Ok((r.u64()?, r.u64()?)))
                    .collect::<Result<_, DecodeError>>()?;
                let counts = (0..r.u32()?)
                    .map(|_| Ok((r.u64()?, r.u32()?)))
                    .collect::<Result<_, DecodeError>>()?;
                Ok(PartitionSnapshot {
                    floor,
                    done,
                    counts,
                })
            })
            .collect::<Result<_, DecodeError>>()?;
        if r.at != bytes.len() {
            return Err(DecodeError("trailing bytes after snapshot".into()));
        }
        Ok(Snapshot {
            dead_lettered,
            partitions,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let slice = self
            .bytes
            .get(self.at..self.at.saturating_add(n))
            .ok_or_else(|| DecodeError("truncated".into()))?;
        self.at = self.at.saturating_add(n);
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let mut a = [0; 1];
        a.copy_from_slice(self.take(1)?);
        Ok(a[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
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

    proptest! {
        /// Events and snapshots decode arbitrary bytes to an error or a value, never a panic.
        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_events(&bytes);
            let _ = Snapshot::decode(&bytes);
            let mut with_magic = Snapshot::default().encode().to_vec();
            with_magic.truncate(5);
            with_magic.extend_from_slice(&bytes);
            let _ = Snapshot::decode(&with_magic);
        }

        /// A valid snapshot or event entry with one byte changed or cut short: never a panic.
        #[test]
        fn decoders_never_panic_on_mutated_bytes(
            floors in proptest::collection::vec((any::<u64>(), 0u64..100, 0u64..100), 1..5),
            position in any::<prop::sample::Index>(),
            xor in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let snapshot = Snapshot {
                dead_lettered: 3,
                partitions: floors
                    .iter()
                    .map(|&(floor, a, b)| PartitionSnapshot {
                        floor,
                        done: vec![(a, a + b)],
                        counts: vec![(b, 2)],
                    })
                    .collect(),
            };
            let events: Vec<Event> = floors
                .iter()
                .map(|&(offset, a, _)| Event::Leased { partition: a as u32, offset, delivery_count: 1 })
                .collect();
            for encoded in [snapshot.encode().to_vec(), encode_events(&events).to_vec()] {
                let mut mutated = encoded.clone();
                let at = position.index(mutated.len());
                mutated[at] ^= xor;
                let _ = Snapshot::decode(&mutated);
                let _ = decode_events(&mutated);
                let short = &encoded[..cut.index(encoded.len())];
                let _ = Snapshot::decode(short);
                let _ = decode_events(short);
            }
        }
    }

    #[test]
    fn events_and_snapshots_round_trip() {
        let events = vec![
            Event::Leased {
                partition: 1,
                offset: 9,
                delivery_count: 3,
            },
            Event::Done {
                partition: 0,
                offset: u64::MAX,
            },
            Event::DeadLettered {
                partition: 2,
                offset: 4,
            },
            Event::Seek {
                partition: 0,
                offset: 7,
            },
        ];
        assert_eq!(decode_events(&encode_events(&events)).unwrap(), events);
        let snapshot = Snapshot {
            dead_lettered: 5,
            partitions: vec![PartitionSnapshot {
                floor: 10,
                done: vec![(12, 20)],
                counts: vec![(11, 2)],
            }],
        };
        assert_eq!(Snapshot::decode(&snapshot.encode()).unwrap(), snapshot);
        assert!(Snapshot::decode(b"QGS1\x01").is_err());
        assert!(decode_events(&[1, 2, 3]).is_err());
    }
}
