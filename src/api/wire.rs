//! Conversions between broker types and the generated protobuf types, and the permit a
//! stream holds: shared by the unary gRPC service ([`super::grpc`]) and the receive stream
//! ([`super::receive`]) so neither imports the other.

use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tonic::Status;

use super::limits::ClientPermit;
use crate::broker::{Delivery, MessageId, NewMessage, Published};
use crate::proto;

/// A stream's slots in the server-wide and per-client caps.
pub type StreamPermit = (OwnedSemaphorePermit, Option<ClientPermit>);

/// A delivery as the protobuf message.
pub fn message(d: Delivery) -> proto::Message {
    proto::Message {
        id: d.id.to_string(),
        queue: d.queue,
        partition: d.id.partition,
        offset: d.id.offset,
        timestamp_ms: d.timestamp_ms,
        key: d.key,
        headers: d.headers.into_iter().collect(),
        delivery_count: d.delivery_count,
        body: d.body,
        content_type: d.content_type,
    }
}

/// Parses a `"{partition}-{offset}"` id, as an `INVALID_ARGUMENT` status when malformed.
pub fn message_id(raw: &str) -> Result<MessageId, Status> {
    raw.parse::<MessageId>().map_err(Status::from)
}

/// Milliseconds of the wire as a duration.
pub fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A message to publish, from its protobuf form (header names checked).
pub fn new_message(m: proto::OutgoingMessage) -> Result<NewMessage, Status> {
    for name in m.headers.keys() {
        crate::api::json::check_header_name(name).map_err(Status::from)?;
    }
    if let Some(key) = &m.idempotency_key {
        crate::api::json::check_idempotency_key(key).map_err(Status::from)?;
    }
    Ok(NewMessage {
        key: m.key,
        headers: m.headers.into_iter().collect(),
        content_type: m.content_type,
        body: m.body,
        idempotency_key: m.idempotency_key,
    })
}

/// Where a published message was stored, in protobuf form.
pub fn message_ref(p: Published) -> proto::MessageRef {
    proto::MessageRef {
        id: p.id.to_string(),
        partition: p.partition,
        offset: p.offset,
    }
}
