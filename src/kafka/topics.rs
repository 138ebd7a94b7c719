//! Topics as queues: Metadata (with auto-creation, as a Kafka broker does by default),
//! CreateTopics, DeleteTopics, DescribeConfigs and ListOffsets.

use kafka_protocol::ResponseError;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    DescribeConfigsRequest, DescribeConfigsResponse, ListOffsetsRequest, ListOffsetsResponse,
    MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::brokers::Layout;
use super::session::Session;
use super::{Kafka, KafkaError};
use crate::auth::Action;
use crate::broker::{QueueSettings, RetentionPolicy};

/// Configs a topic creation accepts and ignores (replication is not Kafka's here).
const IGNORED_CONFIGS: &[&str] = &[
    "min.insync.replicas",
    "unclean.leader.election.enable",
    "compression.type",
    "message.timestamp.type",
];

fn text(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

fn topic_name(name: &str) -> TopicName {
    TopicName(text(name))
}

/// The Metadata response: the brokers ([`super::brokers`]), and the asked topics (all
/// when none are named: with auth on, all the user may see, as Kafka lists only topics
/// one may describe).
pub async fn metadata(
    kafka: &Kafka,
    session: &Session,
    user: Option<&str>,
    request: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    let mut response = MetadataResponse::default();
    let layout = kafka.layout(session.local);
    response.brokers = layout
        .brokers()
        .into_iter()
        .map(|b| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(b.id))
                .with_host(text(&b.host))
                .with_port(b.port)
        })
        .collect();
    response.cluster_id = Some(StrBytes::from_static_str("qit"));
    response.controller_id = BrokerId(layout.controller());
    let names: Option<Vec<String>> = request.topics.map(|topics| {
        topics
            .into_iter()
            .filter_map(|t| t.name.map(|n| n.0.to_string()))
            .collect()
    });
    let names = match names {
        // v0 says "all" with an empty list.
        Some(names) if !(names.is_empty() && version == 0) => names,
        _ => kafka
            .broker
            .queue_names()
            .into_iter()
            .filter(|name| kafka.allow(user, Action::View, name).is_ok())
            .collect(),
    };
    let auto_create = version < 4 || request.allow_auto_topic_creation;
    for name in names {
        response
            .topics
            .push(topic_metadata(kafka, &layout, user, &name, auto_create).await);
    }
    response
}

async fn topic_metadata(
    kafka: &Kafka,
    layout: &Layout,
    user: Option<&str>,
    name: &str,
    auto_create: bool,
) -> MetadataResponseTopic {
    let mut topic = MetadataResponseTopic::default().with_name(Some(topic_name(name)));
    let mut partitions = kafka.broker.partition_count(name).map_err(KafkaError::from);
    if partitions.is_err() && auto_create {
        let created = create_queue(kafka, user, name, QueueSettings::default()).await;
        partitions = created.and_then(|()| Ok(kafka.broker.partition_count(name)?));
    }
    // A topic the user may not see: TOPIC_AUTHORIZATION_FAILED, as Kafka answers without
    // Describe.
    let partitions = partitions.and_then(|n| kafka.allow(user, Action::View, name).map(|()| n));
    match partitions {
        Ok(n) => {
            let ids = |ids: &[i32]| ids.iter().map(|id| BrokerId(*id)).collect::<Vec<_>>();
            topic.partitions = (0..n as i32)
                .map(|p| {
                    let (raft_leader, replicas) =
                        kafka.topic_replicas(name, p as u32).unwrap_or_default();
                    let placed = layout.placement(raft_leader, &replicas);
                    MetadataResponsePartition::default()
                        .with_partition_index(p)
                        .with_leader_id(BrokerId(placed.leader))
                        .with_leader_epoch(placed.leader_epoch)
                        .with_replica_nodes(ids(&placed.replicas))
                        .with_isr_nodes(ids(&placed.isr))
                })
                .collect();
        }
        Err(error) => topic.error_code = error.code(),
    }
    topic
}

/// Creates a queue for `user` (its owner with auth on, and of its dead-letter queue).
async fn create_queue(
    kafka: &Kafka,
    user: Option<&str>,
    name: &str,
    settings: QueueSettings,
) -> Result<(), KafkaError> {
    kafka.allow(user, Action::Create, name)?;
    crate::api::auth::check_dead_letter(
        kafka.auth.as_deref(),
        user,
        &kafka.broker,
        name,
        &settings,
    )
    .map_err(|e| KafkaError::Forbidden(e.to_string()))?;
    let owner = crate::api::auth::creator(kafka.auth.as_deref(), user);
    let created = kafka
        .broker
        .create_queue_owned(name, settings, owner)
        .await?;
    crate::api::auth::check_created_queue(
        kafka.auth.as_deref(),
        user,
        &kafka.broker,
        name,
        &created,
    )
    .await
    .map_err(|e| KafkaError::Forbidden(e.message))
}

/// CreateTopics: a topic that exists is `TOPIC_ALREADY_EXISTS`, as in Kafka.
pub async fn create(
    kafka: &Kafka,
    user: Option<&str>,
    request: CreateTopicsRequest,
) -> CreateTopicsResponse {
    let mut response = CreateTopicsResponse::default();
    let (replication, nodes) = replication_factor(kafka);
    for topic in request.topics {
        let name = topic.name.0.to_string();
        let mut result = CreatableTopicResult::default().with_name(topic.name.clone());
        let outcome = match settings_of(&topic, nodes) {
            Err((error, why)) => Err((error.code(), why)),
            Ok(settings) => {
                result.num_partitions = settings.partitions as i32;
                result.replication_factor = settings
                    .replicas
                    .and_then(|r| i16::try_from(r).ok())
                    .unwrap_or(replication);
                if kafka.broker.partition_count(&name).is_ok() {
                    Err((
                        ResponseError::TopicAlreadyExists.code(),
                        format!("topic `{name}` already exists"),
                    ))
                } else if request.validate_only {
                    Ok(())
                } else {
                    create_queue(kafka, user, &name, settings)
                        .await
                        .map_err(|e| (e.code(), e.to_string()))
                }
            }
        };
        if let Err((code, why)) = outcome {
            result.error_code = code;
            result.error_message = Some(text(&why));
        }
        response.topics.push(result);
    }
    response
}

/// How many replicas a topic gets by default (1 on a single node; on a cluster node as
/// many as placement gives a queue group, at most 3 and at most the voters), and the most
/// it may ask for (the nodes placement may use).
fn replication_factor(kafka: &Kafka) -> (i16, i16) {
    kafka.cluster.as_ref().map_or((1, 1), |cluster| {
        let nodes = cluster.groups().eligible().len();
        let default = nodes.min(crate::cluster::groups::REPLICAS);
        (
            i16::try_from(default).unwrap_or(1),
            i16::try_from(nodes).unwrap_or(i16::MAX),
        )
    })
}

/// Queue settings from a topic creation's partitions, replication and configs. A
/// replication factor becomes the queue's `replicas` (1 up to the `nodes` there are);
/// -1 leaves qit's default.
fn settings_of(
    topic: &CreatableTopic,
    nodes: i16,
) -> Result<QueueSettings, (ResponseError, String)> {
    let mut settings = QueueSettings::default();
    match topic.num_partitions {
        -1 => {}
        n if n >= 1 => settings.partitions = n as u32,
        n => return Err((ResponseError::InvalidPartitions, format!("{n} partitions"))),
    }
    match topic.replication_factor {
        -1 => {}
        factor if (1..=nodes).contains(&factor) => settings.replicas = Some(factor as u32),
        factor => {
            return Err((
                ResponseError::InvalidReplicationFactor,
                format!("replication factor {factor}: there are {nodes} nodes to hold copies"),
            ));
        }
    }
    for config in &topic.configs {
        let name = config.name.as_str();
        let value = config.value.as_ref().map(|v| v.as_str()).unwrap_or("");
        apply_config(&mut settings, name, value)
            .map_err(|why| (ResponseError::InvalidConfig, why))?;
    }
    settings
        .validate()
        .map_err(|e| (ResponseError::InvalidConfig, e.to_string()))?;
    Ok(settings)
}

fn apply_config(settings: &mut QueueSettings, name: &str, value: &str) -> Result<(), String> {
    let number = || {
        value
            .parse::<i64>()
            .map_err(|_| format!("`{name}` must be a number, not `{value}`"))
    };
    let limit = |n: i64| u64::try_from(n).ok();
    match name {
        "retention.ms" => settings.retention.max_age = limit(number()?).map(|ms| ms.div_ceil(1000)),
        "retention.bytes" => settings.retention.max_bytes = limit(number()?),
        "cleanup.policy" => {
            settings.compaction = value.split(',').any(|p| p.trim() == "compact");
            settings.retention.policy = RetentionPolicy::Limits;
        }
        "max.message.bytes" => {
            settings.max_message_bytes = limit(number()?).ok_or("must not be negative")?
        }
        "segment.bytes" => {
            settings.segment_bytes = limit(number()?).ok_or("must not be negative")?
        }
        "message.timestamp.type" if value != "CreateTime" => {
            return Err("only CreateTime timestamps are kept".into());
        }
        other if IGNORED_CONFIGS.contains(&other) => {}
        other => return Err(format!("config `{other}` is not supported")),
    }
    Ok(())
}

/// DeleteTopics: deletes the queues (their dead-letter queues stay).
pub async fn delete(
    kafka: &Kafka,
    user: Option<&str>,
    request: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let mut response = DeleteTopicsResponse::default();
    for name in request.topic_names {
        let topic = name.0.to_string();
        let mut result = DeletableTopicResult::default().with_name(Some(name));
        let outcome = match kafka.allow(user, Action::Manage, &topic) {
            Ok(()) => kafka
                .broker
                .delete_queue(&topic)
                .await
                .map_err(KafkaError::from),
            Err(error) => Err(error),
        };
        // The delete forgets the topic's owner and grants in the same step.
        if let Err(error) = outcome {
            result.error_code = error.code();
            result.error_message = Some(text(&error.to_string()));
        }
        response.responses.push(result);
    }
    response
}

/// Resource type numbers of DescribeConfigs.
const TOPIC_RESOURCE: i8 = 2;
const BROKER_RESOURCE: i8 = 4;

/// DescribeConfigs: a topic's settings in Kafka's names; a few broker defaults.
pub fn describe_configs(
    kafka: &Kafka,
    user: Option<&str>,
    request: DescribeConfigsRequest,
) -> DescribeConfigsResponse {
    let mut response = DescribeConfigsResponse::default();
    for resource in request.resources {
        let name = resource.resource_name.to_string();
        let mut result = DescribeConfigsResult::default()
            .with_resource_type(resource.resource_type)
            .with_resource_name(resource.resource_name.clone());
        let configs = match resource.resource_type {
            TOPIC_RESOURCE => kafka
                .allow(user, Action::Consume, &name)
                .and_then(|()| Ok(kafka.broker.queue_settings(&name)?))
                .map(|s| topic_configs(&s)),
            BROKER_RESOURCE => Ok(vec![
                ("auto.create.topics.enable", "true".to_string()),
                ("message.max.bytes", "1048576".to_string()),
                ("num.partitions", "1".to_string()),
            ]),
            other => Err(KafkaError::Malformed(format!("resource type {other}"))),
        };
        match configs {
            Ok(configs) => {
                // No keys (null, or an empty list as kafka-python sends) means all.
                let wanted = resource
                    .configuration_keys
                    .as_ref()
                    .filter(|keys| !keys.is_empty());
                // A value other than qit's default was set for this topic (source 1,
                // DYNAMIC_TOPIC_CONFIG); the rest are defaults (5, DEFAULT_CONFIG).
                let defaults = topic_configs(&QueueSettings::default());
                result.configs = configs
                    .into_iter()
                    .filter(|(k, _)| wanted.is_none_or(|w| w.iter().any(|x| x.as_str() == *k)))
                    .map(|(k, v)| {
                        let default = defaults.iter().any(|(dk, dv)| *dk == k && *dv == v);
                        DescribeConfigsResourceResult::default()
                            .with_name(text(k))
                            .with_value(Some(text(&v)))
                            .with_config_source(if default { 5 } else { 1 })
                    })
                    .collect();
            }
            Err(error) => {
                result.error_code = error.code();
                result.error_message = Some(text(&error.to_string()));
            }
        }
        response.results.push(result);
    }
    response
}

fn topic_configs(settings: &QueueSettings) -> Vec<(&'static str, String)> {
    let retention_ms = settings
        .retention
        .max_age
        .map_or(-1, |s| s.saturating_mul(1000) as i64);
    let retention_bytes = settings.retention.max_bytes.map_or(-1, |b| b as i64);
    vec![
        (
            "cleanup.policy",
            if settings.compaction {
                "compact"
            } else {
                "delete"
            }
            .to_string(),
        ),
        ("retention.ms", retention_ms.to_string()),
        ("retention.bytes", retention_bytes.to_string()),
        ("max.message.bytes", settings.max_message_bytes.to_string()),
        ("segment.bytes", settings.segment_bytes.to_string()),
        ("message.timestamp.type", "CreateTime".to_string()),
    ]
}

/// The timestamps of ListOffsets that name a position rather than a time.
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;

/// ListOffsets: earliest, latest, or the first offset at or after a time.
pub fn list_offsets(
    kafka: &Kafka,
    user: Option<&str>,
    request: ListOffsetsRequest,
    version: i16,
) -> ListOffsetsResponse {
    let mut response = ListOffsetsResponse::default();
    for topic in request.topics {
        let name = topic.name.0.to_string();
        let allowed = kafka.allow(user, Action::Consume, &name);
        let mut result = ListOffsetsTopicResponse::default().with_name(topic.name);
        for partition in topic.partitions {
            let mut out = ListOffsetsPartitionResponse::default()
                .with_partition_index(partition.partition_index)
                .with_timestamp(-1)
                .with_offset(-1);
            let found = allowed.as_ref().map_err(|e| e.code()).and_then(|()| {
                offset_at(kafka, &name, partition.partition_index, partition.timestamp)
                    .map_err(|e| e.code())
            });
            match found {
                Ok(Some((offset, timestamp))) => {
                    out.offset = offset as i64;
                    out.timestamp = timestamp;
                    if version >= 4 {
                        out.leader_epoch = 0;
                    }
                }
                Ok(None) => {}
                Err(code) => out.error_code = code,
            }
            result.partitions.push(out);
        }
        response.topics.push(result);
    }
    response
}

/// The offset (and timestamp, -1 for positions) a ListOffsets entry asks for.
fn offset_at(
    kafka: &Kafka,
    topic: &str,
    partition: i32,
    timestamp: i64,
) -> Result<Option<(u64, i64)>, KafkaError> {
    let partition = u32::try_from(partition)
        .map_err(|_| KafkaError::Broker(crate::broker::BrokerError::QueueNotFound(topic.into())))?;
    kafka.check_replica(topic)?;
    let bounds = kafka
        .broker
        .partition_bounds(topic, partition)
        .map_err(|e| match e {
            crate::broker::BrokerError::InvalidArgument(_) => {
                KafkaError::Broker(crate::broker::BrokerError::QueueNotFound(topic.into()))
            }
            other => other.into(),
        })?;
    Ok(match timestamp {
        LATEST => Some((bounds.next, -1)),
        EARLIEST => Some((bounds.first, -1)),
        t if t >= 0 => kafka.broker.offset_for_time(topic, partition, t)?,
        _ => Some((bounds.next, -1)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creating(factor: i16) -> CreatableTopic {
        CreatableTopic::default()
            .with_name(TopicName(StrBytes::from_static_str("t")))
            .with_num_partitions(2)
            .with_replication_factor(factor)
    }

    /// A replication factor from 1 up to the nodes is the queue's `replicas`; -1 keeps the
    /// default; 0, negative or above the nodes is `INVALID_REPLICATION_FACTOR`.
    #[test]
    fn the_replication_factor_is_the_queues_replicas() {
        let replicas = |factor, nodes| settings_of(&creating(factor), nodes).map(|s| s.replicas);
        assert_eq!(replicas(-1, 3), Ok(None));
        assert_eq!(replicas(1, 3), Ok(Some(1)));
        assert_eq!(replicas(3, 3), Ok(Some(3)));
        assert_eq!(replicas(1, 1), Ok(Some(1)));
        for (factor, nodes) in [(4, 3), (2, 1), (0, 3), (-2, 3)] {
            let refused = settings_of(&creating(factor), nodes).map(|_| ());
            assert!(
                matches!(refused, Err((ResponseError::InvalidReplicationFactor, _))),
                "factor {factor} on {nodes} nodes: {refused:?}"
            );
        }
    }
}
