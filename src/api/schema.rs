//! OpenAPI schemas of the JSON shapes that handlers build by hand (with `json!`), and the
//! error responses every route shares. The shapes serialized straight from broker types
//! (`QueueInfo`, `GroupInfo`, `ExchangeInfo`, ...) derive their schema where they are
//! defined; this file only covers the rest. Schemathesis checks every response against
//! these, so a shape that drifts from its handler fails CI.

use std::collections::BTreeMap;

use serde_json::Value;
use utoipa::{IntoResponses, ToSchema};

use crate::broker::QueueInfo;

/// The error shape of every route.
#[derive(ToSchema)]
#[schema(example = json!({"error": {"code": "queue_not_found", "message": "queue `jobs` not found"}}))]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable, snake_case (`queue_not_found`, `invalid_json`, ...).
    pub code: String,
    /// Human-readable text.
    pub message: String,
}

/// The errors any route may answer: bad input, auth, unknown names, conflicts, size and
/// rate limits, and an unavailable store.
#[derive(IntoResponses)]
pub enum Errors {
    /// Bad input: a malformed name, parameter or body.
    #[response(status = 400)]
    BadRequest(#[to_schema] ErrorBody),
    /// With `--auth`: no token, or an invalid or expired one.
    #[response(status = 401)]
    Unauthenticated(ErrorBody),
    /// With `--auth`: the caller may not do this.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// Unknown queue, group, exchange, message or user.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// Not allowed on this route.
    #[response(status = 405)]
    MethodNotAllowed(ErrorBody),
    /// Conflicts with existing state (other settings, a lease that is gone, ...).
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The body is larger than allowed.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// A limit was reached (long-polls, logins, groups); retry later.
    #[response(status = 429)]
    TooMany(ErrorBody),
    /// Shutting down, or the storage is unavailable.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// `GET /healthz`.
#[derive(ToSchema)]
#[schema(example = json!({"status": "ok"}))]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `GET /queues`.
#[derive(ToSchema)]
pub struct QueueList {
    /// The queues (a page of them with `limit`).
    pub queues: Vec<QueueInfo>,
    /// With `limit`: the `after` of the next page, `null` on the last one.
    #[schema(nullable)]
    pub next: Option<String>,
}

/// A delivered (leased) or replayed message.
#[derive(ToSchema)]
#[schema(example = json!({"id": "0-7", "queue": "jobs", "partition": 0, "offset": 7,
    "timestamp": 1_767_225_600_000_i64, "headers": {"trace": "abc"}, "delivery_count": 1,
    "content_type": "application/json",
    "body": {"to": "user@example.com", "subject": "Hello!"}}))]
pub struct Message {
    /// `"{partition}-{offset}"`.
    pub id: String,
    /// The queue it belongs to.
    pub queue: String,
    /// Partition number.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
    /// Publish time, ms since the Unix epoch.
    pub timestamp: i64,
    /// Key, if it was published with one.
    pub key: Option<String>,
    /// Message headers.
    pub headers: BTreeMap<String, String>,
    /// 1 on the first delivery; 0 in a replay.
    pub delivery_count: u32,
    /// The `Content-Type` it was published with.
    pub content_type: Option<String>,
    /// The payload as JSON (published as JSON) or as a string (other UTF-8 text).
    pub body: Option<Value>,
    /// The payload, base64-encoded, when it is not UTF-8.
    pub body_base64: Option<String>,
}

/// `GET /queues/{queue}/messages`.
#[derive(ToSchema)]
pub struct Messages {
    /// Leased messages; empty when nothing arrived within `wait`.
    pub messages: Vec<Message>,
}

/// `GET /queues/{queue}/log`.
#[derive(ToSchema)]
pub struct LogPage {
    /// Messages from the start offset on, oldest first.
    pub messages: Vec<Message>,
    /// The offset to read from next.
    pub next_offset: u64,
}

/// `POST /queues/{queue}/messages/batch`.
#[derive(ToSchema)]
#[schema(example = json!({"ids": ["0-7", "0-8"]}))]
pub struct BatchIds {
    /// Ids of the stored messages, in order.
    pub ids: Vec<String>,
}

/// `POST /queues/{queue}/redrive`.
#[derive(ToSchema)]
#[schema(example = json!({"moved": 3}))]
pub struct Moved {
    /// How many dead letters were moved back.
    pub moved: u64,
}

/// `GET /exchanges`.
#[derive(ToSchema)]
pub struct ExchangeList {
    /// Every exchange with its bindings.
    pub exchanges: Vec<crate::broker::ExchangeInfo>,
}

/// `POST /exchanges/{exchange}`.
#[derive(ToSchema)]
#[schema(example = json!({"name": "events", "type": "topic"}))]
pub struct ExchangeCreated {
    /// Name.
    pub name: String,
    /// Routing type.
    #[schema(rename = "type")]
    pub kind: crate::route::ExchangeKind,
}

/// `POST /exchanges/{exchange}/messages`.
#[derive(ToSchema)]
#[schema(example = json!({"routed": [{"queue": "audit", "id": "0-3"}]}))]
pub struct RoutedList {
    /// Every queue the message went to; empty when no binding matched.
    pub routed: Vec<crate::broker::Routed>,
}

/// `POST /auth/register`.
#[derive(ToSchema)]
pub struct Registered {
    /// The new user.
    pub username: String,
}

/// `POST /auth/login`.
#[derive(ToSchema)]
pub struct Token {
    /// A JWT for `Authorization: Bearer <token>`.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
}

/// `POST /queues/{queue}/grants`.
#[derive(ToSchema)]
pub struct Granted {
    /// The queue.
    pub queue: String,
    /// The user the grant is for.
    pub user: String,
    /// What the user may do now (`publish`, `consume`).
    pub permissions: Vec<String>,
}
