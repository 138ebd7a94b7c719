//! Conversions between broker types and the generated protobuf types, and the permit a
//! stream holds: shared by the unary gRPC service ([`super::grpc`]) and the receive stream
//! ([`super::receive`]) so neither imports the other.

use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tonic::Status;

use super::limits::ClientPermit;
use crate::broker::{Delivery, MessageId};
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
        body: d.body.to_vec(),
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
