//! Publishes to a queue of several partitions, split by partition: every partition after
//! the first has a Raft group of its own (see [`super::groups::QueueGroup`]), so the node
//! that takes a publish names each message's partition and sends each partition's messages
//! to that partition's leader; the answers are put back in the order of the messages.
//!
//! A message goes by the hash of its key, as on a single node; one without a key by the
//! hash of its idempotency key, so that a retry lands where the first try did and the
//! partition's dedup window finds it (each partition's group applies its own publishes,
//! so a window that matched keys across partitions would decide differently on each
//! replica); any other in turn (the taking node's round robin).

use std::collections::BTreeMap;

use crate::broker::message::partition_for_key;
use crate::broker::replicate::{OpResult, WireMessage, unexpected};
use crate::broker::{Broker, BrokerError};

/// The messages of a publish that go to one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The partition.
    pub partition: u32,
    /// Where each message stood in the publish.
    pub positions: Vec<usize>,
    /// The messages, each naming `partition`.
    pub messages: Vec<WireMessage>,
}

/// The partition of a message of a queue of `partitions` by its key or idempotency key
/// (`None`: neither, it goes in turn).
pub fn hashed_partition(message: &WireMessage, partitions: u32) -> Option<u32> {
    message
        .key
        .as_deref()
        .or(message.idempotency_key.as_deref())
        .map(|key| partition_for_key(key.as_bytes(), partitions))
}

/// Splits the messages of a publish to `queue`, a queue of `partitions`, by partition, in
/// partition order; a message that names its partition already keeps it.
pub fn split(
    broker: &Broker,
    queue: &str,
    partitions: u32,
    mut messages: Vec<WireMessage>,
) -> Vec<Part> {
    for m in messages.iter_mut().filter(|m| m.partition.is_none()) {
        m.partition = hashed_partition(m, partitions);
    }
    broker.take_turns(queue, &mut messages);
    let mut parts: BTreeMap<u32, Part> = BTreeMap::new();
    for (position, message) in messages.into_iter().enumerate() {
        let partition = message.partition.unwrap_or(0);
        let part = parts.entry(partition).or_insert_with(|| Part {
            partition,
            positions: Vec::new(),
            messages: Vec::new(),
        });
        part.positions.push(position);
        part.messages.push(message);
    }
    parts.into_values().collect()
}

/// True when the messages name one partition, all of them: a part of a split publish.
pub fn is_part(messages: &[WireMessage]) -> bool {
    let first = messages.first().and_then(|m| m.partition);
    first.is_some() && messages.iter().all(|m| m.partition == first)
}

/// A part's answer, with the positions of its messages in their publish.
pub type PartAnswer = (Vec<usize>, Result<OpResult, BrokerError>);

/// The answer to a publish of `len` messages from the answers of its parts (each with the
/// positions of its messages): the ids in the order of the messages, or the first error
/// (the parts that succeeded are stored all the same, as a single node's publish that
/// fails in one partition keeps what it appended to the others).
pub fn merge(len: usize, answers: Vec<PartAnswer>) -> Result<OpResult, BrokerError> {
    let mut ids = vec![(0, 0); len];
    for (positions, answer) in answers {
        let published = match answer? {
            OpResult::Published(published) => published,
            other => return Err(unexpected(&other)),
        };
        if published.len() != positions.len() {
            return Err(BrokerError::InvalidArgument(format!(
                "a partition answered {} ids for {} messages",
                published.len(),
                positions.len()
            )));
        }
        for (position, id) in positions.into_iter().zip(published) {
            if let Some(slot) = ids.get_mut(position) {
                *slot = id;
            }
        }
    }
    Ok(OpResult::Published(ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(key: Option<&str>, idempotency_key: Option<&str>) -> WireMessage {
        WireMessage {
            key: key.map(str::to_string),
            headers: Default::default(),
            content_type: None,
            body: Bytes::from_static(b"x"),
            idempotency_key: idempotency_key.map(str::to_string),
            partition: None,
        }
    }

    /// Keys and idempotency keys pick the partition a single node's hash picks; the parts
    /// come in partition order with the positions of their messages; the answers merge
    /// back into the order of the messages.
    #[tokio::test]
    async fn a_publish_splits_by_partition_and_merges_in_order() {
        let (_dir, broker) = crate::broker::replicate::tests::broker_with_queue(4).await;
        let messages = vec![
            message(Some("a"), None),
            message(None, Some("retry-me")),
            message(None, None),
            message(Some("b"), Some("other")),
            message(None, None),
        ];
        let parts = split(&broker, "q", 4, messages.clone());
        let mut seen: Vec<usize> = parts.iter().flat_map(|p| p.positions.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        assert!(parts.windows(2).all(|w| w[0].partition < w[1].partition));
        let partition_of = |position: usize| {
            parts
                .iter()
                .find(|p| p.positions.contains(&position))
                .unwrap()
                .partition
        };
        assert_eq!(partition_of(0), partition_for_key(b"a", 4));
        assert_eq!(partition_of(1), partition_for_key(b"retry-me", 4));
        assert_eq!(partition_of(3), partition_for_key(b"b", 4));
        // Keyless messages go in turn: two in a row take two partitions.
        assert_ne!(partition_of(2), partition_of(4));
        for part in &parts {
            assert!(is_part(&part.messages));
        }
        let answers = parts
            .iter()
            .map(|part| {
                let ids = part
                    .positions
                    .iter()
                    .map(|p| (part.partition, *p as u64 * 10))
                    .collect();
                (part.positions.clone(), Ok(OpResult::Published(ids)))
            })
            .collect();
        let OpResult::Published(ids) = merge(5, answers).unwrap() else {
            panic!("not published");
        };
        let offsets: Vec<u64> = ids.iter().map(|(_, o)| *o).collect();
        assert_eq!(offsets, [0, 10, 20, 30, 40]);
        assert_eq!(ids[0].0, partition_of(0));
    }

    /// A failed part fails the publish; a part that answers the wrong count is refused.
    #[test]
    fn a_failed_or_short_part_fails_the_publish() {
        let failed = merge(
            2,
            vec![
                (vec![0], Ok(OpResult::Published(vec![(0, 1)]))),
                (vec![1], Err(BrokerError::NoLeader("gone".into()))),
            ],
        );
        assert_eq!(failed.unwrap_err().code(), "no_leader");
        let short = merge(2, vec![(vec![0, 1], Ok(OpResult::Published(vec![(0, 1)])))]);
        assert!(short.is_err());
        assert!(!is_part(&[message(None, None)]));
    }
}
