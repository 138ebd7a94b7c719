//! OffsetCommit and OffsetFetch on qit's own consumer groups.
//!
//! A Kafka group `g` consuming topic `q` is qit's group `g` on queue `q`: a commit of
//! offset N on a partition moves the group's ack floor there (the same seek as
//! `PUT /queues/{q}/groups/{g}/offset`), so `GET /queues/{q}/groups/{g}` shows it as
//! `committed_offset`, and a fetch of the committed offset reads the floor back. A group
//! qit does not have yet has no committed offset (-1: the client's `auto.offset.reset`
//! decides); one that HTTP or gRPC consumers use reports the floor their acks reached.
//! Commit metadata strings are not kept.
//!
//! On a cluster node a commit or a fetch of the floors that finds the topic's group without
//! a leader (an election) answers `COORDINATOR_LOAD_IN_PROGRESS`, which clients retry,
//! rather than an error they would take as final (and fall back to `auto.offset.reset`).

use futures_util::StreamExt;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::{Kafka, KafkaError};
use crate::auth::Action;
use crate::broker::BrokerError;

/// OffsetCommit: each partition's offset becomes the group's ack floor there.
pub async fn commit(
    kafka: &Kafka,
    user: Option<&str>,
    request: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let group = request.group_id.0.to_string();
    let refused = if !crate::name::is_valid(&group) {
        Some(ResponseError::InvalidGroupId.code())
    } else {
        kafka
            .groups
            .check_commit(
                &group,
                request.member_id.as_str(),
                request.generation_id_or_member_epoch,
            )
            .map(|e| e.code())
    };
    let mut response = OffsetCommitResponse::default();
    for topic in request.topics {
        let name = topic.name.0.to_string();
        let allowed = kafka.allow(user, Action::Consume, &name);
        let mut out = OffsetCommitResponseTopic::default().with_name(topic.name.clone());
        for p in topic.partitions {
            let code = match (&refused, &allowed) {
                (Some(code), _) => *code,
                (None, Err(error)) => error.code(),
                (None, Ok(())) => {
                    commit_one(kafka, &name, &group, p.partition_index, p.committed_offset)
                        .await
                        .map_or_else(|e| group_code(&e), |()| 0)
                }
            };
            out.partitions.push(
                OffsetCommitResponsePartition::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(code),
            );
        }
        response.topics.push(out);
    }
    response
}

async fn commit_one(
    kafka: &Kafka,
    topic: &str,
    group: &str,
    partition: i32,
    offset: i64,
) -> Result<(), KafkaError> {
    let count = kafka.broker.partition_count(topic)?;
    let (Some(partition), Ok(offset)) = (
        u32::try_from(partition).ok().filter(|p| *p < count),
        u64::try_from(offset),
    ) else {
        return Err(KafkaError::OffsetOutOfRange);
    };
    kafka
        .broker
        .commit_offset(topic, group, partition, offset)
        .await?;
    Ok(())
}

/// A topic's committed offsets for a group, read on its leader: `None` where the group
/// does not exist there.
type Floors = Result<Option<Vec<(u32, u64)>>, KafkaError>;

/// OffsetFetch (v1-7): the group's ack floor per partition, -1 where qit has no such
/// group yet. On a cluster node the floors are read on the leader of the topic's group (so
/// that a coordinator that just took over reads every commit made through the old one).
/// Without a list of topics, every topic on which the group has committed offsets is
/// answered, also those this node holds no replica of.
pub async fn fetch(
    kafka: &Kafka,
    user: Option<&str>,
    request: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    let group = request.group_id.0.to_string();
    let mut response = OffsetFetchResponse::default();
    if !crate::name::is_valid(&group) {
        response.error_code = ResponseError::InvalidGroupId.code();
        return response;
    }
    let asked: Vec<(String, Option<Vec<i32>>, Floors)> = match request.topics {
        Some(topics) => {
            let mut asked = Vec::with_capacity(topics.len());
            for t in topics {
                let name = t.name.0.to_string();
                let floors = match kafka.allow(user, Action::Consume, &name) {
                    Ok(()) => floors(kafka, &name, &group).await,
                    Err(error) => Err(error),
                };
                asked.push((name, Some(t.partition_indexes), floors));
            }
            asked
        }
        None => match every_floor(kafka, user, &group).await {
            Ok(every) => every
                .into_iter()
                .map(|(name, floors)| (name, None, Ok(Some(floors))))
                .collect(),
            Err(code) => {
                response.error_code = code;
                return response;
            }
        },
    };
    for (name, partitions, floors) in asked {
        let partitions = partitions.unwrap_or_else(|| match &floors {
            Ok(Some(floors)) => floors.iter().map(|(p, _)| *p as i32).collect(),
            _ => Vec::new(),
        });
        let mut out = OffsetFetchResponseTopic::default()
            .with_name(TopicName(StrBytes::from_string(name.clone())));
        for index in partitions {
            let mut p = OffsetFetchResponsePartition::default()
                .with_partition_index(index)
                .with_committed_offset(-1)
                .with_committed_leader_epoch(-1)
                .with_metadata(Some(StrBytes::default()));
            match &floors {
                Ok(Some(floors)) => {
                    if let Some((_, floor)) = floors
                        .iter()
                        .find(|(partition, _)| i64::from(*partition) == i64::from(index))
                    {
                        p.committed_offset = *floor as i64;
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    p.error_code = group_code(error);
                    if version >= 2
                        && p.error_code == ResponseError::CoordinatorLoadInProgress.code()
                    {
                        response.error_code = p.error_code;
                    }
                }
            }
            out.partitions.push(p);
        }
        response.topics.push(out);
    }
    response
}

/// Floor reads of an OffsetFetch of all topics under way at once.
const FLOOR_READS: usize = 32;

/// The floors of `group` on every topic the user may consume where the group exists, read
/// on each topic's leader ([`FLOOR_READS`] side by side: on a cluster node most are other
/// nodes' reads).
/// A topic whose group cannot be read now (an election) makes the whole answer
/// `COORDINATOR_LOAD_IN_PROGRESS`, for the client to ask again, rather than a list that
/// silently lacks it; a topic deleted meanwhile, or that cannot be read at all (a damaged
/// queue, logged), is left out.
async fn every_floor(
    kafka: &Kafka,
    user: Option<&str>,
    group: &str,
) -> Result<Vec<(String, Vec<(u32, u64)>)>, i16> {
    let names: Vec<String> = kafka
        .broker
        .queue_names()
        .into_iter()
        .filter(|name| kafka.allow(user, Action::Consume, name).is_ok())
        .collect();
    let read: Vec<Floors> = futures_util::stream::iter(names.clone())
        .map(|name| async move { floors(kafka, &name, group).await })
        .buffered(FLOOR_READS)
        .collect()
        .await;
    let mut every = Vec::new();
    for (name, floors) in names.into_iter().zip(read) {
        match floors {
            Ok(Some(floors)) => every.push((name, floors)),
            Ok(None) | Err(KafkaError::Broker(BrokerError::QueueNotFound(_))) => {}
            Err(error) => {
                let code = group_code(&error);
                if code == ResponseError::CoordinatorLoadInProgress.code() {
                    return Err(code);
                }
                tracing::warn!(topic = %name, group, %error, "offset fetch: topic left out");
            }
        }
    }
    Ok(every)
}

/// The code of a failed commit or floor read: one clients retry while the topic's group
/// elects a leader, else the error's own.
fn group_code(error: &KafkaError) -> i16 {
    match error {
        KafkaError::Broker(BrokerError::NoLeader(_) | BrokerError::ShuttingDown) => {
            ResponseError::CoordinatorLoadInProgress.code()
        }
        other => other.code(),
    }
}

/// The group's committed offset per partition of a topic, `None` when qit has no such
/// group there.
async fn floors(
    kafka: &Kafka,
    topic: &str,
    group: &str,
) -> Result<Option<Vec<(u32, u64)>>, KafkaError> {
    match kafka.broker.committed_offsets_at_leader(topic, group).await {
        Ok(floors) => Ok(floors),
        Err(BrokerError::GroupNotFound { .. }) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_without_a_leader_is_retried_not_final() {
        let electing = KafkaError::Broker(BrokerError::NoLeader("group 4".into()));
        assert_eq!(
            group_code(&electing),
            ResponseError::CoordinatorLoadInProgress.code()
        );
        let missing = KafkaError::Broker(BrokerError::QueueNotFound("q".into()));
        assert_eq!(
            group_code(&missing),
            ResponseError::UnknownTopicOrPartition.code()
        );
    }
}
