//! Which APIs and versions the listener serves, and the way from a request frame to a
//! response frame: header peek, decode (kafka-protocol), route, encode.
//!
//! A request for an API or version not served gets an error frame with its correlation id
//! and `UNSUPPORTED_VERSION` (for ApiVersions, the full v0 answer that KIP-511 asks for, so
//! the client can pick a version it shares) and the connection stays open. A request that
//! cannot be decoded closes the connection, as Kafka does.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind,
};
use kafka_protocol::protocol::{Decodable, Encodable};

use super::session::Session;
use super::{Kafka, KafkaError};

/// The APIs served, with the versions of each (what kafka-python 3 and librdkafka 2
/// negotiate; topic ids, KIP-848 groups and transactions are left out).
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 9),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::SaslHandshake, 1, 1),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::SaslAuthenticate, 0, 2),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
];

/// The first fields of every request header: key, version, correlation id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peek {
    /// API key.
    pub key: i16,
    /// API version.
    pub version: i16,
    /// Correlation id, echoed in the response.
    pub correlation_id: i32,
}

/// Reads the fixed first eight bytes of a request (the frame is at least that long).
pub fn peek(frame: &[u8]) -> Option<Peek> {
    let b: &[u8; 8] = frame.get(..8)?.try_into().ok()?;
    Some(Peek {
        key: i16::from_be_bytes([b[0], b[1]]),
        version: i16::from_be_bytes([b[2], b[3]]),
        correlation_id: i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    })
}

/// The served version range of `key`, if served.
pub fn served(key: i16) -> Option<(ApiKey, i16, i16)> {
    SUPPORTED
        .iter()
        .copied()
        .find(|(api, _, _)| *api as i16 == key)
}

/// A decoded request.
pub struct Request {
    /// Which API.
    pub api: ApiKey,
    /// Its version.
    pub version: i16,
    /// Its header (client id, correlation id).
    pub header: RequestHeader,
    /// The body.
    pub body: RequestKind,
}

/// What to do with a frame.
pub enum Decoded {
    /// Serve it.
    Request(Box<Request>),
    /// Answer with this frame at once (not served API or version).
    Answer(BytesMut),
}

/// Decodes a frame (size prefix removed).
pub fn decode(frame: Bytes) -> Result<Decoded, KafkaError> {
    let peek = peek(&frame).ok_or_else(|| KafkaError::Malformed("request too short".into()))?;
    let Some((api, min, max)) = served(peek.key) else {
        return Ok(Decoded::Answer(unsupported(peek)));
    };
    if !(min..=max).contains(&peek.version) {
        if api == ApiKey::ApiVersions {
            return Ok(Decoded::Answer(api_versions_fallback(peek)?));
        }
        return Ok(Decoded::Answer(unsupported(peek)));
    }
    let mut buf = frame;
    let malformed = |e: anyhow::Error| KafkaError::Malformed(format!("{api:?}: {e}"));
    let header = RequestHeader::decode(&mut buf, api.request_header_version(peek.version))
        .map_err(malformed)?;
    let body = RequestKind::decode(api, &mut buf, peek.version).map_err(malformed)?;
    Ok(Decoded::Request(Box::new(Request {
        api,
        version: peek.version,
        header,
        body,
    })))
}

/// An error frame for an API or version not served: the correlation id, then the error
/// code where every response's first field would be.
fn unsupported(peek: Peek) -> BytesMut {
    let mut out = BytesMut::with_capacity(10);
    out.put_i32(6);
    out.put_i32(peek.correlation_id);
    out.put_i16(ResponseError::UnsupportedVersion.code());
    out
}

/// The ApiVersions answer to a version too new: v0 with `UNSUPPORTED_VERSION` and the
/// full list (KIP-511), so the client retries with a version both sides know.
fn api_versions_fallback(peek: Peek) -> Result<BytesMut, KafkaError> {
    let mut response = api_versions();
    response.error_code = ResponseError::UnsupportedVersion.code();
    encode(
        ApiKey::ApiVersions,
        0,
        peek.correlation_id,
        &ResponseKind::ApiVersions(response),
    )
}

/// The ApiVersions response listing [`SUPPORTED`].
pub fn api_versions() -> ApiVersionsResponse {
    let mut response = ApiVersionsResponse::default();
    response.api_keys = SUPPORTED
        .iter()
        .map(|(api, min, max)| {
            ApiVersion::default()
                .with_api_key(*api as i16)
                .with_min_version(*min)
                .with_max_version(*max)
        })
        .collect();
    response
}

/// Encodes a response frame: size prefix, header, body.
pub fn encode(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    response: &ResponseKind,
) -> Result<BytesMut, KafkaError> {
    let mut out = BytesMut::with_capacity(256);
    out.put_i32(0);
    let failed = |e: anyhow::Error| KafkaError::Encode(format!("{api:?} v{version}: {e}"));
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut out, api.response_header_version(version))
        .map_err(failed)?;
    response.encode(&mut out, version).map_err(failed)?;
    let size = (out.len() - 4) as i32;
    if let Some(slot) = out.get_mut(..4) {
        slot.copy_from_slice(&size.to_be_bytes());
    }
    Ok(out)
}

/// Serves one decoded request; `None` when no response is sent (produce with `acks=0`).
pub async fn serve(
    kafka: &Kafka,
    session: &mut Session,
    request: Request,
) -> Result<Option<ResponseKind>, KafkaError> {
    let user = session.user.clone();
    let user = user.as_deref();
    let version = request.version;
    if kafka.cluster.is_some()
        && let Some(group) = super::coordinator::group_of(&request.body)
        && !kafka.layout(session.local).coordinates(group)
    {
        return Ok(super::coordinator::not_coordinator(request.body, version));
    }
    let response = match request.body {
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(api_versions()),
        RequestKind::SaslHandshake(r) => ResponseKind::SaslHandshake(session.handshake(&r)),
        RequestKind::SaslAuthenticate(r) => {
            ResponseKind::SaslAuthenticate(session.authenticate(kafka, r).await)
        }
        RequestKind::Metadata(r) => {
            ResponseKind::Metadata(super::topics::metadata(kafka, session, user, r, version).await)
        }
        RequestKind::CreateTopics(r) => {
            ResponseKind::CreateTopics(super::topics::create(kafka, user, r).await)
        }
        RequestKind::DeleteTopics(r) => {
            ResponseKind::DeleteTopics(super::topics::delete(kafka, user, r).await)
        }
        RequestKind::DescribeConfigs(r) => {
            ResponseKind::DescribeConfigs(super::topics::describe_configs(kafka, user, r))
        }
        RequestKind::ListOffsets(r) => {
            ResponseKind::ListOffsets(super::topics::list_offsets(kafka, user, r, version))
        }
        RequestKind::Produce(r) => {
            let acks = r.acks;
            let response = super::data::produce(kafka, user, r).await;
            if acks == 0 {
                return Ok(None);
            }
            ResponseKind::Produce(response)
        }
        RequestKind::Fetch(r) => ResponseKind::Fetch(super::data::fetch(kafka, user, r).await),
        RequestKind::InitProducerId(r) => ResponseKind::InitProducerId(kafka.producers.init(&r)),
        RequestKind::FindCoordinator(r) => {
            let layout = kafka.layout(session.local);
            ResponseKind::FindCoordinator(super::coordinator::find(&layout, r, version))
        }
        RequestKind::JoinGroup(r) => {
            let client = super::coordinator::Client {
                id: request
                    .header
                    .client_id
                    .as_ref()
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
                host: format!("/{}", session.peer.ip()),
            };
            ResponseKind::JoinGroup(kafka.groups.join(r, client).await)
        }
        RequestKind::ListGroups(r) => {
            let layout = kafka.layout(session.local);
            ResponseKind::ListGroups(super::group_listing::list(kafka, &layout, user, &r).await)
        }
        RequestKind::DescribeGroups(r) => {
            let layout = kafka.layout(session.local);
            let described = super::group_listing::describe(kafka, &layout, user, &r).await;
            ResponseKind::DescribeGroups(described)
        }
        RequestKind::DeleteGroups(r) => {
            let layout = kafka.layout(session.local);
            ResponseKind::DeleteGroups(super::group_listing::delete(kafka, &layout, user, &r).await)
        }
        RequestKind::SyncGroup(r) => ResponseKind::SyncGroup(kafka.groups.sync(r).await),
        RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(kafka.groups.heartbeat(&r)),
        RequestKind::LeaveGroup(r) => ResponseKind::LeaveGroup(kafka.groups.leave(&r, version)),
        RequestKind::OffsetCommit(r) => {
            ResponseKind::OffsetCommit(super::offsets::commit(kafka, user, r).await)
        }
        RequestKind::OffsetFetch(r) => {
            ResponseKind::OffsetFetch(super::offsets::fetch(kafka, user, r, version).await)
        }
        other => {
            return Err(KafkaError::Malformed(format!(
                "no handler for {:?}",
                std::mem::discriminant(&other)
            )));
        }
    };
    Ok(Some(response))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes after a served key and version: a request or an error, never a panic
        /// nor a giant allocation (array counts are checked against the bytes present).
        #[test]
        fn any_request_body_decodes_or_fails(
            which in 0..SUPPORTED.len(),
            version in 0i16..20,
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let (api, _, _) = SUPPORTED[which];
            let mut frame = BytesMut::new();
            frame.put_i16(api as i16);
            frame.put_i16(version);
            frame.put_i32(1);
            frame.extend_from_slice(&body);
            let _ = decode(frame.freeze());
        }

        /// A count of 2^31 elements in a few bytes is refused, not allocated.
        #[test]
        fn huge_counts_are_refused(which in 0..SUPPORTED.len(), version in 0i16..13) {
            let (api, _, _) = SUPPORTED[which];
            let mut frame = BytesMut::new();
            frame.put_i16(api as i16);
            frame.put_i16(version);
            frame.put_i32(1);
            frame.put_i16(-1); // null client id
            for _ in 0..8 {
                frame.put_i32(i32::MAX);
            }
            let _ = decode(frame.freeze());
        }
    }

    #[test]
    fn every_served_version_is_one_the_crate_knows() {
        for (api, min, max) in SUPPORTED {
            let known = api.valid_versions();
            assert!(
                known.min <= *min && *max <= known.max,
                "{api:?} {min}..={max}"
            );
        }
    }

    #[test]
    fn an_unknown_key_gets_unsupported_version_with_its_correlation_id() {
        let mut frame = BytesMut::new();
        frame.put_i16(9999);
        frame.put_i16(0);
        frame.put_i32(77);
        let Ok(Decoded::Answer(answer)) = decode(frame.freeze()) else {
            panic!("expected an answer");
        };
        assert_eq!(&answer[..], &[0, 0, 0, 6, 0, 0, 0, 77, 0, 35]);
    }

    mod group_requests {
        use super::*;
        use kafka_protocol::messages::offset_commit_request::{
            OffsetCommitRequestPartition, OffsetCommitRequestTopic,
        };
        use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
        use kafka_protocol::messages::{
            GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, OffsetCommitRequest,
            OffsetFetchRequest, SyncGroupRequest, TopicName,
        };
        use kafka_protocol::protocol::StrBytes;

        fn group() -> GroupId {
            GroupId(StrBytes::from_static_str("g"))
        }

        /// Every group request gets NOT_COORDINATOR in a frame its version can carry.
        #[test]
        fn not_coordinator_answers_encode_at_every_served_version() {
            let topic = TopicName(StrBytes::from_static_str("t"));
            let requests = || -> Vec<(ApiKey, RequestKind)> {
                vec![
                    (
                        ApiKey::JoinGroup,
                        RequestKind::JoinGroup(JoinGroupRequest::default().with_group_id(group())),
                    ),
                    (
                        ApiKey::SyncGroup,
                        RequestKind::SyncGroup(SyncGroupRequest::default().with_group_id(group())),
                    ),
                    (
                        ApiKey::Heartbeat,
                        RequestKind::Heartbeat(HeartbeatRequest::default().with_group_id(group())),
                    ),
                    (
                        ApiKey::LeaveGroup,
                        RequestKind::LeaveGroup(
                            LeaveGroupRequest::default().with_group_id(group()),
                        ),
                    ),
                    (
                        ApiKey::OffsetCommit,
                        RequestKind::OffsetCommit(
                            OffsetCommitRequest::default()
                                .with_group_id(group())
                                .with_topics(vec![
                                    OffsetCommitRequestTopic::default()
                                        .with_name(topic.clone())
                                        .with_partitions(vec![
                                            OffsetCommitRequestPartition::default()
                                                .with_partition_index(1),
                                        ]),
                                ]),
                        ),
                    ),
                    (
                        ApiKey::OffsetFetch,
                        RequestKind::OffsetFetch(
                            OffsetFetchRequest::default()
                                .with_group_id(group())
                                .with_topics(Some(vec![
                                    OffsetFetchRequestTopic::default()
                                        .with_name(topic.clone())
                                        .with_partition_indexes(vec![1]),
                                ])),
                        ),
                    ),
                ]
            };
            for (api, min, max) in SUPPORTED {
                for version in *min..=*max {
                    for (key, request) in requests() {
                        if key != *api {
                            continue;
                        }
                        assert_eq!(crate::kafka::coordinator::group_of(&request), Some("g"));
                        let answer = crate::kafka::coordinator::not_coordinator(request, version)
                            .expect("a group request");
                        let frame = encode(*api, version, 1, &answer);
                        assert!(frame.is_ok(), "{api:?} v{version}: {frame:?}");
                    }
                }
            }
            let other = RequestKind::ApiVersions(Default::default());
            assert_eq!(crate::kafka::coordinator::group_of(&other), None);
            assert!(crate::kafka::coordinator::not_coordinator(other, 3).is_none());
        }
    }
}
