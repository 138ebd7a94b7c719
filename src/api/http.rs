//! The HTTP API (axum): every route of the contract. Handlers parse, call the broker and
//! map errors through [`ApiError`]; every rejection (bad JSON, bad query, body too large,
//! unknown route) answers the JSON error shape too.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::auth::Caller;
use super::error::{ApiError, body_bytes};
use super::json::{self, BatchPublish};
use super::schema::*;
use crate::broker::{
    Binding, ExchangeInfo, ExchangeKind, GroupInfo, MessageId, NewMessage, Published, QueueInfo,
    QueueSettings, ReadFrom, SeekTarget,
};

/// Prefix of request headers that become message headers.
const HEADER_PREFIX: &str = "qit-header-";
/// Longest long-poll wait in seconds.
const MAX_WAIT_SECS: f64 = 60.0;
/// Longest visibility timeout or nack delay in seconds (12 h).
const MAX_DURATION_SECS: f64 = 43_200.0;

pub use super::state::HttpState;

type Query_ = Result<Query<BTreeMap<String, String>>, QueryRejection>;
type Body = Result<Bytes, BytesRejection>;
type ApiResult = Result<Response, ApiError>;

/// The JSON 404 for a path no route matches.
pub(super) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The JSON 405 for a method a route does not serve.
pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

fn query(query: Query_) -> Result<BTreeMap<String, String>, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

/// Parses a JSON body; an empty body gives `T::default()` when `empty_ok`.
fn json_body<T: DeserializeOwned + Default>(bytes: &[u8], empty_ok: bool) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(T::default())
        } else {
            Err(ApiError::bad_request("a JSON body is required"))
        };
    }
    super::object::parse(bytes)
}

/// A create's settings: a JSON object (or nothing) whose `retention`, when given, is an
/// object too. (The settings' own derive would read an array there field by field; it
/// stays as it is, since settings also travel in Raft entries, where a struct is a
/// sequence.)
fn settings_body(bytes: &[u8]) -> Result<QueueSettings, ApiError> {
    let settings: QueueSettings = json_body(bytes, true)?;
    if !bytes.iter().all(u8::is_ascii_whitespace) {
        let fields: serde_json::Map<String, Value> = super::object::parse(bytes)?;
        if fields.get("retention").is_some_and(|r| !r.is_object()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "`retention` must be a JSON object",
            ));
        }
    }
    Ok(settings)
}

fn param<T: FromStr>(q: &BTreeMap<String, String>, name: &str) -> Result<Option<T>, ApiError> {
    q.get(name)
        .map(|raw| {
            raw.parse::<T>()
                .map_err(|_| ApiError::bad_request(format!("`{name}` has a bad value `{raw}`")))
        })
        .transpose()
}

/// A duration in (possibly fractional) seconds, within `0..=max`.
fn seconds(
    q: &BTreeMap<String, String>,
    name: &str,
    max: f64,
) -> Result<Option<Duration>, ApiError> {
    match param::<f64>(q, name)? {
        None => Ok(None),
        Some(s) if s.is_finite() && (0.0..=max).contains(&s) => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        Some(_) => Err(ApiError::bad_request(format!(
            "`{name}` must be between 0 and {max} seconds"
        ))),
    }
}

fn group(q: &BTreeMap<String, String>) -> String {
    q.get("group").cloned().unwrap_or_else(|| "default".into())
}

fn message_id(raw: &str) -> Result<MessageId, ApiError> {
    raw.parse::<MessageId>().map_err(ApiError::from)
}

fn created(value: Value) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

fn ok(value: Value) -> Response {
    (StatusCode::OK, Json(value)).into_response()
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

#[utoipa::path(get, path = "/healthz", tag = "operations", description = "Liveness and storage check.", responses((status = 200, body = Health), Errors))]
pub(super) async fn healthz(State(s): State<HttpState>) -> ApiResult {
    s.broker.check_storage().await?;
    if let Some(cluster) = &s.cluster
        && !cluster.healthy()
    {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_quorum",
            "this node is not part of a working quorum",
        ));
    }
    if let Some(cluster) = &s.cluster
        && !cluster.metadata_caught_up()
    {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "catching_up",
            "this node started a moment ago and is catching up with the cluster's metadata",
        ));
    }
    Ok(ok(json!({"status": "ok"})))
}

/// `GET /cluster`: the nodes, the metadata leader and every partition's leader and replicas.
/// With auth on, only the partitions of queues the caller may see, as in `GET /queues`.
#[utoipa::path(get, path = "/cluster", tag = "operations", description = "The cluster: nodes, the metadata leader, every partition's leader and replicas (404 `not_clustered` on a single node). With auth on, only the partitions of the queues the caller may see (as `GET /queues`).", responses((status = 200, body = crate::cluster::view::ClusterView), Errors))]
pub(super) async fn cluster_view(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    match &s.cluster {
        Some(cluster) => {
            let mut view = cluster.current_view().await;
            let (auth, user) = (s.auth.as_deref(), caller.0.as_deref());
            view.partitions
                .retain(|p| super::auth::may_view(auth, user, &p.queue));
            Ok(ok(json!(view)))
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_clustered",
            "this node runs alone (started without --peers)",
        )),
    }
}

/// `GET /metrics`: the Prometheus text format. With auth on, the per-queue series of a
/// user's scrape are those of the queues the user may see, as in `GET /queues` (the admin
/// sees all).
#[utoipa::path(get, path = "/metrics", tag = "operations", description = "Prometheus text format. With auth on, the per-queue series are those of the queues the caller may see (as `GET /queues`).", responses((status = 200, content_type = "text/plain", body = String), Errors))]
pub(super) async fn metrics(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let mut state = match (s.auth.clone(), caller.0) {
        (Some(auth), Some(user)) if !auth.is_admin(&user) => {
            crate::metrics::ScrapeSeries::only_queues(move |queue| {
                super::auth::may_view(Some(&auth), Some(&user), queue)
            })
        }
        _ => crate::metrics::ScrapeSeries::default(),
    };
    let busiest: Vec<_> = s
        .broker
        .busiest_queues(s.metrics_queues)
        .iter()
        .map(QueueInfo::gauges)
        .collect();
    crate::metrics::queue_gauges(&mut state, s.broker.queue_count(), &busiest);
    crate::metrics::pending_ages(&mut state, &s.broker.oldest_pending_ages_ms());
    s.broker.owned_series(&mut state);
    if let Some(cluster) = &s.cluster {
        cluster.group_gauges(&mut state);
    }
    if let Some(maps) = s.broker.config().storage.map_cache() {
        crate::metrics::set_mapped_files(maps.mapped());
    }
    let in_use = s.max_waiters.saturating_sub(s.waiters.available_permits());
    ::metrics::gauge!(crate::metrics::LONG_POLL_WAITERS).set(in_use as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&state),
    )
        .into_response()
}

/// Most queues one page of `GET /queues` may ask for.
const MAX_PAGE: usize = 1000;

/// `GET /queues`: every queue, or with `?limit=` (1..=1000) a page of them by name after
/// `?after=`, with `next` (the `after` of the next page, `null` on the last one). With
/// auth on, only the queues the caller may see (owns, or holds a grant on; the admin
/// sees all), paged over those.
#[utoipa::path(get, path = "/queues", tag = "queues", params(("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size; without it every queue"), ("after" = Option<String>, Query, description = "Name after which the page starts (needs `limit`)"), ("local" = Option<bool>, Query, description = "On a cluster node: each queue as this node's own copy holds it (where `in_flight` counts only the leases this node granted, and a queue without a replica here is empty) instead of as the leader of its group does (default false)")), responses((status = 200, body = QueueList), Errors))]
pub(super) async fn list_queues(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    q: Query_,
) -> ApiResult {
    let q = query(q)?;
    let limit: Option<usize> = param(&q, "limit")?;
    let after = q.get("after").map(String::as_str);
    let (auth, user) = (s.auth.as_deref(), caller.0.as_deref());
    let shown = |name: &str| super::auth::may_view(auth, user, name);
    let (queues, page) = match limit {
        None if after.is_some() => return Err(ApiError::bad_request("`after` needs `limit`")),
        None => {
            let mut queues = s.broker.list_queues();
            queues.retain(|info| shown(&info.name));
            (queues, None)
        }
        Some(limit) if !(1..=MAX_PAGE).contains(&limit) => {
            return Err(ApiError::bad_request(format!(
                "`limit` must be 1..={MAX_PAGE}"
            )));
        }
        Some(limit) => {
            // Paged over the queues the caller may see: `next` names one of them.
            let (queues, next) = s.broker.list_queues_page(after, limit, shown);
            (queues, Some(next))
        }
    };
    let queues = if local(&q)? {
        queues
    } else {
        s.broker.current_queue_infos(queues).await
    };
    Ok(ok(match page {
        None => json!({"queues": to_json(&queues)}),
        Some(next) => json!({"queues": to_json(&queues), "next": next}),
    }))
}

#[utoipa::path(post, path = "/queues/{queue}", tag = "queues", description = "Create a queue (and its dead-letter queue). The same settings again: 200; other settings: 409.", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), request_body(content = QueueSettings, description = "Optional: an empty body means every default", example = json!({"partitions": 2, "max_deliveries": 3, "backoff": [1, 5, 30]})), responses((status = 201, description = "Created", body = QueueInfo), (status = 200, description = "Existed with the same settings", body = QueueInfo), Errors))]
pub(super) async fn create_queue(
    State(s): State<HttpState>,
    Path(queue): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> ApiResult {
    let settings = settings_body(&body_bytes(body)?)?;
    let (auth, user) = (s.auth.as_deref(), caller.0.as_deref());
    super::auth::check_existing_visible(auth, user, &s.broker, &queue)?;
    super::auth::check_dead_letter(auth, user, &s.broker, &queue, &settings)?;
    let owner = super::auth::creator(auth, user);
    let created = s.broker.create_queue_owned(&queue, settings, owner).await?;
    super::auth::check_created_queue(auth, user, &s.broker, &queue, &created).await?;
    let (info, was_created) = (created.info, created.created);
    let status = if was_created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(to_json(&info))).into_response())
}

#[utoipa::path(get, path = "/queues/{queue}", tag = "queues", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("local" = Option<bool>, Query, description = "On a cluster node that holds a replica of the queue: answer from this node's own committed copy (where `in_flight` counts only the leases this node granted: the leader's) instead of asking the leader of the queue's group (default false)")), responses((status = 200, body = QueueInfo), Errors))]
pub(super) async fn queue_info(
    State(s): State<HttpState>,
    Path(queue): Path<String>,
    q: Query_,
) -> ApiResult {
    let info = if local(&query(q)?)? {
        s.broker.queue_info(&queue)?
    } else {
        s.broker.current_queue_info(&queue).await?
    };
    Ok(ok(to_json(&info)))
}

/// The `local` query flag: read this node's own copy of a replicated queue.
fn local(q: &BTreeMap<String, String>) -> Result<bool, ApiError> {
    Ok(param(q, "local")?.unwrap_or(false))
}

#[utoipa::path(delete, path = "/queues/{queue}", tag = "queues", description = "Delete a queue and its data.", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), responses((status = 204, description = "Deleted"), Errors))]
pub(super) async fn delete_queue(
    State(s): State<HttpState>,
    Path(queue): Path<String>,
) -> ApiResult {
    // The delete forgets the queue's owner and grants in the same step.
    s.broker.delete_queue(&queue).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The value of header `name`, which may be given once at most: two values (say two
/// idempotency keys) are a 400 rather than one of them picked.
fn single_header<'h>(
    headers: &'h HeaderMap,
    name: &str,
) -> Result<Option<&'h axum::http::HeaderValue>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::bad_request(format!(
            "header `{name}` is given more than once"
        )));
    }
    Ok(first)
}

/// The message of a raw-body publish: body, content type, `?key=`, `Qit-Header-*`,
/// `Idempotency-Key`.
fn raw_message(
    headers: &HeaderMap,
    q: &BTreeMap<String, String>,
    body: Bytes,
) -> Result<NewMessage, ApiError> {
    let text = |value: &axum::http::HeaderValue, name: &str| {
        value
            .to_str()
            .map(str::to_string)
            .map_err(|_| ApiError::bad_request(format!("header `{name}` is not visible ASCII")))
    };
    let mut message_headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        if let Some(short) = name.as_str().strip_prefix(HEADER_PREFIX) {
            json::check_header_name(short)?;
            let value = text(value, name.as_str())?;
            // A header sent on several lines is one list (RFC 9110, 5.3).
            message_headers
                .entry(short.to_string())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert(value);
        }
    }
    let content_type = single_header(headers, header::CONTENT_TYPE.as_str())?
        .map(|v| text(v, "content-type"))
        .transpose()?;
    let idempotency_key = single_header(headers, "idempotency-key")?
        .map(|v| text(v, "idempotency-key"))
        .transpose()?;
    if let Some(key) = &idempotency_key {
        json::check_idempotency_key(key)?;
    }
    if content_type.as_deref().is_some_and(json::is_json_type) && !json::is_json_text(&body) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body is not valid JSON but its Content-Type says JSON",
        ));
    }
    Ok(NewMessage {
        key: q.get("key").cloned(),
        headers: message_headers,
        content_type,
        body,
        idempotency_key,
    })
}

#[utoipa::path(post, path = "/queues/{queue}/messages", tag = "messages", description = "Publish one message. Headers `Qit-Header-{name}: value` become message headers.", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("key" = Option<String>, Query, description = "Partitioning / ordering / compaction key"), ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 256, description = "A repeat within the dedup window returns the first id and stores nothing")), request_body(description = "The payload, kept byte for byte with its Content-Type", content((Value = "application/json", example = json!({"to": "user@example.com", "subject": "Hello!"})), (String = "text/plain"), (Vec<u8> = "application/octet-stream"))), responses((status = 201, body = Published, example = json!({"id": "0-7", "partition": 0, "offset": 7})), Errors))]
pub(super) async fn publish(
    State(s): State<HttpState>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    q: Query_,
    body: Body,
) -> ApiResult {
    let message = raw_message(&headers, &query(q)?, body_bytes(body)?)?;
    let published = s.broker.publish(&queue, vec![message]).await?;
    let first = published
        .first()
        .ok_or_else(|| ApiError::bad_request("nothing was published"))?;
    Ok(created(to_json(first)))
}

#[utoipa::path(post, path = "/queues/{queue}/messages/batch", tag = "messages", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), request_body(content = BatchPublish, example = json!({"messages": [{"body": {"n": 1}, "key": "a"}, {"body_base64": "/wA=", "headers": {"kind": "raw"}}]})), responses((status = 201, body = BatchIds), Errors))]
pub(super) async fn publish_batch(
    State(s): State<HttpState>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    let bytes = body_bytes(body)?;
    let batch: BatchPublish = super::object::parse(&bytes)?;
    if batch.messages.is_empty() || batch.messages.len() > 10_000 {
        return Err(ApiError::bad_request(
            "`messages` must hold 1..=10000 messages",
        ));
    }
    let messages = batch
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.into_message(i))
        .collect::<Result<Vec<_>, _>>()?;
    let published = s.broker.publish(&queue, messages).await?;
    let ids: Vec<String> = published.iter().map(|p| p.id.to_string()).collect();
    Ok(created(json!({"ids": ids})))
}

#[utoipa::path(get, path = "/queues/{queue}/messages", tag = "messages", description = "Receive (lease) messages for a group.", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("group" = Option<String>, Query, description = "Consumer group (default `default`)", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("max" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Most messages (default 1)"), ("wait" = Option<f64>, Query, minimum = 0, maximum = 60, description = "Long-poll seconds (default 0)"), ("visibility" = Option<f64>, Query, exclusive_minimum = 0, maximum = 43200, description = "Lease seconds (default: the queue's `ack_timeout`)")), responses((status = 200, body = Messages), Errors))]
pub(super) async fn receive(
    State(s): State<HttpState>,
    Path(queue): Path<String>,
    client: Option<axum::Extension<axum::extract::ConnectInfo<super::conn::ClientAddr>>>,
    q: Query_,
) -> ApiResult {
    let q = query(q)?;
    let max: usize = param(&q, "max")?.unwrap_or(1);
    if !(1..=1000).contains(&max) {
        return Err(ApiError::bad_request("`max` must be 1..=1000"));
    }
    let wait = seconds(&q, "wait", MAX_WAIT_SECS)?.unwrap_or(Duration::ZERO);
    let visibility = seconds(&q, "visibility", MAX_DURATION_SECS)?;
    if visibility.is_some_and(|v| v.is_zero()) {
        return Err(ApiError::bad_request("`visibility` must be positive"));
    }
    let too_many = |what: &str| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "limit_reached",
            format!("too many long-polling receivers {what}"),
        )
    };
    let _permits = if wait.is_zero() {
        None
    } else {
        let total = s
            .waiters
            .clone()
            .try_acquire_owned()
            .map_err(|_| too_many("on this server"))?;
        let mine = match client {
            Some(axum::Extension(axum::extract::ConnectInfo(super::conn::ClientAddr(addr)))) => {
                Some(
                    s.per_client
                        .acquire(addr.ip())
                        .ok_or_else(|| too_many("from this client"))?,
                )
            }
            None => None,
        };
        Some((total, mine))
    };
    let list = s
        .broker
        .receive(&queue, &group(&q), max, wait, visibility)
        .await?;
    Ok((StatusCode::OK, Json(json::deliveries(&list, None))).into_response())
}

#[utoipa::path(delete, path = "/queues/{queue}/messages/{id}", tag = "messages", description = "Ack: the message is done for the group. Repeating an ack is harmless.", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("id" = String, Path, description = "Message id `{partition}-{offset}`", example = "0-7", pattern = "^[0-9]{1,9}-[0-9]{1,19}$"), ("group" = Option<String>, Query, description = "Consumer group (default `default`)", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), responses((status = 204, description = "Acked"), Errors))]
pub(super) async fn ack(
    State(s): State<HttpState>,
    Path((queue, id)): Path<(String, String)>,
    q: Query_,
) -> ApiResult {
    let q = query(q)?;
    s.broker.ack(&queue, &group(&q), message_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/queues/{queue}/messages/{id}/nack", tag = "messages", description = "Redeliver, optionally after a delay.", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("id" = String, Path, description = "Message id `{partition}-{offset}`", example = "0-7", pattern = "^[0-9]{1,9}-[0-9]{1,19}$"), ("group" = Option<String>, Query, description = "Consumer group (default `default`)", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("delay" = Option<f64>, Query, minimum = 0, maximum = 43200, description = "Seconds before redelivery (default: the queue's backoff)")), responses((status = 204, description = "Released"), Errors))]
pub(super) async fn nack(
    State(s): State<HttpState>,
    Path((queue, id)): Path<(String, String)>,
    q: Query_,
) -> ApiResult {
    let q = query(q)?;
    let delay = seconds(&q, "delay", MAX_DURATION_SECS)?;
    s.broker
        .nack(&queue, &group(&q), message_id(&id)?, delay)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/queues/{queue}/messages/{id}/extend", tag = "messages", description = "Extend a lease.", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("id" = String, Path, description = "Message id `{partition}-{offset}`", example = "0-7", pattern = "^[0-9]{1,9}-[0-9]{1,19}$"), ("group" = Option<String>, Query, description = "Consumer group (default `default`)", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("visibility" = Option<f64>, Query, minimum = 0, maximum = 43200, description = "New lease seconds from now")), responses((status = 204, description = "Extended"), Errors))]
pub(super) async fn extend(
    State(s): State<HttpState>,
    Path((queue, id)): Path<(String, String)>,
    q: Query_,
) -> ApiResult {
    let q = query(q)?;
    let visibility = match seconds(&q, "visibility", MAX_DURATION_SECS)? {
        Some(v) => v,
        None => Duration::from_secs(s.broker.queue_info(&queue)?.settings.ack_timeout),
    };
    s.broker
        .extend(&queue, &group(&q), message_id(&id)?, visibility)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Body of a redrive.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RedriveBody {
    /// Most messages to move (default: all).
    #[schema(minimum = 0)]
    max: Option<usize>,
}

#[utoipa::path(post, path = "/queues/{queue}/redrive", tag = "queues", description = "Move dead letters back into the queue.", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), request_body(content = RedriveBody, description = "Optional: an empty body moves every dead letter", example = json!({"max": 100})), responses((status = 200, body = Moved), Errors))]
pub(super) async fn redrive(
    State(s): State<HttpState>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    let request: RedriveBody = json_body(&body_bytes(body)?, true)?;
    let moved = s.broker.redrive(&queue, request.max).await?;
    Ok(ok(json!({"moved": moved})))
}

/// A time as RFC 3339 (`Z` or a numeric offset, either case of `T` and `Z`; a time
/// without either is taken as UTC) or unix milliseconds.
pub fn parse_time(raw: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = raw.parse::<i64>() {
        return Ok(ms);
    }
    rfc3339_ms(raw)
        .or_else(|| rfc3339_ms(&format!("{raw}Z")))
        .ok_or_else(|| ApiError::bad_request(format!("`{raw}` is neither RFC 3339 nor unix ms")))
}

/// Unix milliseconds of an RFC 3339 time. humantime reads UTC times only, so a numeric
/// offset (`+02:00`) is taken off first and applied after.
fn rfc3339_ms(raw: &str) -> Option<i64> {
    let upper = raw.to_ascii_uppercase();
    let (local, offset_ms) = match upper.strip_suffix('Z') {
        Some(local) => (local.to_string(), 0),
        None => {
            let (local, offset) = upper.split_at_checked(upper.len().checked_sub(6)?)?;
            (local.to_string(), offset_ms(offset.as_bytes())?)
        }
    };
    let utc = humantime::parse_rfc3339_weak(&format!("{local}Z")).ok()?;
    let ms = match utc.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).ok()?,
        Err(e) => -i64::try_from(e.duration().as_millis()).ok()?,
    };
    Some(ms - offset_ms)
}

/// Milliseconds of an RFC 3339 numeric offset, exactly `+HH:MM` or `-HH:MM`.
fn offset_ms(offset: &[u8]) -> Option<i64> {
    let &[sign, h1, h2, b':', m1, m2] = offset else {
        return None;
    };
    let two = |a: u8, b: u8| {
        (a.is_ascii_digit() && b.is_ascii_digit()).then(|| i64::from((a - b'0') * 10 + b - b'0'))
    };
    let hours = two(h1, h2).filter(|h| *h < 24)?;
    let minutes = two(m1, m2).filter(|m| *m < 60)?;
    let sign = match sign {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    Some(sign * (hours * 60 + minutes) * 60_000)
}

#[utoipa::path(get, path = "/queues/{queue}/log", tag = "messages", description = "Read without leasing (replay).", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("partition" = Option<u32>, Query, description = "Partition (default 0)"), ("from" = Option<u64>, Query, description = "Start offset (default 0)"), ("from_time" = Option<String>, Query, description = "Start time: RFC 3339 or unix ms"), ("max" = Option<u32>, Query, minimum = 1, maximum = 10000, description = "Most messages (default 100)"), ("local" = Option<bool>, Query, description = "On a cluster node: read this node's own copy (a follower's may lag the leader's by a moment; empty on a node without a replica of the queue) instead of asking the leader of the queue's group (default false)")), responses((status = 200, body = LogPage), Errors))]
pub(super) async fn read_log(
    State(s): State<HttpState>,
    Path(queue): Path<String>,
    q: Query_,
) -> ApiResult {
    let q = query(q)?;
    let partition: u32 = param(&q, "partition")?.unwrap_or(0);
    let max: usize = param(&q, "max")?.unwrap_or(100);
    if !(1..=10_000).contains(&max) {
        return Err(ApiError::bad_request("`max` must be 1..=10000"));
    }
    let from = match (param::<u64>(&q, "from")?, q.get("from_time")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give `from` or `from_time`, not both",
            ));
        }
        (Some(offset), None) => ReadFrom::Offset(offset),
        (None, Some(time)) => ReadFrom::Time(parse_time(time)?),
        (None, None) => ReadFrom::Offset(0),
    };
    let (list, next) = if local(&q)? {
        s.broker.read_log(&queue, partition, from, max)?
    } else {
        s.broker
            .read_current_log(&queue, partition, from, max)
            .await?
    };
    Ok((StatusCode::OK, Json(json::deliveries(&list, Some(next)))).into_response())
}

#[utoipa::path(get, path = "/queues/{queue}/groups/{group}", tag = "groups", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("group" = String, Path, description = "Consumer group name", example = "default", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("local" = Option<bool>, Query, description = "On a cluster node that holds a replica of the queue: answer from this node's own committed copy (where `in_flight` counts only the leases this node granted: the leader's) instead of asking the leader of the queue's group (default false)")), responses((status = 200, body = GroupInfo), Errors))]
pub(super) async fn group_info(
    State(s): State<HttpState>,
    Path((queue, group)): Path<(String, String)>,
    q: Query_,
) -> ApiResult {
    let info = if local(&query(q)?)? {
        s.broker.group_info(&queue, &group)?
    } else {
        s.broker.current_group_info(&queue, &group).await?
    };
    Ok(ok(to_json(&info)))
}

#[utoipa::path(delete, path = "/queues/{queue}/groups/{group}", tag = "groups", description = "Delete a consumer group: its committed offsets and state go, it no longer counts against `max_groups_per_queue` or holds back retention, and the next receive under its name starts a new group at the earliest retained message (group `default`, which every queue has, starts again at once: a reset). Refused with 409 `group_in_use` while it has messages in flight.", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("group" = String, Path, description = "Consumer group name", example = "reports", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), responses((status = 204, description = "Deleted"), Errors))]
pub(super) async fn delete_group(
    State(s): State<HttpState>,
    Path((queue, group)): Path<(String, String)>,
) -> ApiResult {
    s.broker.delete_group(&queue, &group).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Body of a seek: exactly one of `offset` (with `partition`), `from_time` or `to`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SeekBody {
    /// Partition of `offset` (default 0).
    partition: Option<u32>,
    /// Offset to move to.
    offset: Option<u64>,
    /// RFC 3339 or unix ms: the first message at or after it, in every partition.
    #[schema(value_type = Option<String>)]
    from_time: Option<Value>,
    /// `earliest` or `latest`.
    #[schema(pattern = "^(earliest|latest)$")]
    to: Option<String>,
}

impl SeekBody {
    fn target(self) -> Result<SeekTarget, ApiError> {
        match (self.offset, self.from_time, self.to.as_deref()) {
            (Some(offset), None, None) => Ok(SeekTarget::Offset {
                partition: self.partition.unwrap_or(0),
                offset,
            }),
            (None, Some(time), None) => {
                let raw = match time {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    _ => {
                        return Err(ApiError::bad_request(
                            "`from_time` must be a string or number",
                        ));
                    }
                };
                Ok(SeekTarget::Time(parse_time(&raw)?))
            }
            (None, None, Some("earliest")) => Ok(SeekTarget::Earliest),
            (None, None, Some("latest")) => Ok(SeekTarget::Latest),
            _ => Err(ApiError::bad_request(
                "give exactly one of `offset`, `from_time` or `to` (earliest|latest)",
            )),
        }
    }
}

#[utoipa::path(put, path = "/queues/{queue}/groups/{group}/offset", tag = "groups", description = "Move a group: to an offset, a time, or the earliest or latest message.", params(("queue" = String, Path, description = "Queue name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "jobs", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("group" = String, Path, description = "Consumer group name", example = "default", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), request_body(content = SeekBody, example = json!({"to": "earliest"})), responses((status = 200, body = GroupInfo), Errors))]
pub(super) async fn seek(
    State(s): State<HttpState>,
    Path((queue, group)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let request: SeekBody = json_body(&body_bytes(body)?, false)?;
    let info = s.broker.seek(&queue, &group, request.target()?).await?;
    Ok(ok(to_json(&info)))
}

/// Body of an exchange create.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ExchangeBody {
    /// Routing type.
    #[serde(rename = "type")]
    kind: ExchangeKind,
}

impl Default for ExchangeBody {
    fn default() -> Self {
        Self {
            kind: ExchangeKind::Direct,
        }
    }
}

#[utoipa::path(post, path = "/exchanges/{exchange}", tag = "exchanges", params(("exchange" = String, Path, description = "Exchange name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "events", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), request_body(content = ExchangeBody, example = json!({"type": "topic"})), responses((status = 201, description = "Created", body = ExchangeCreated), (status = 200, description = "Existed with the same type", body = ExchangeCreated), Errors))]
pub(super) async fn create_exchange(
    State(s): State<HttpState>,
    Path(exchange): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> ApiResult {
    let request: ExchangeBody = json_body(&body_bytes(body)?, false)?;
    let owner = super::auth::creator(s.auth.as_deref(), caller.0.as_deref());
    let was_created = s
        .broker
        .create_exchange_owned(&exchange, request.kind, owner)
        .await?;
    let status = if was_created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({"name": exchange, "type": request.kind})),
    )
        .into_response())
}

#[utoipa::path(get, path = "/exchanges", tag = "exchanges", responses((status = 200, body = ExchangeList), Errors))]
pub(super) async fn list_exchanges(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    let (auth, user) = (s.auth.as_deref(), caller.0.as_deref());
    let exchanges: Vec<ExchangeInfo> = s
        .broker
        .list_exchanges()
        .into_iter()
        .map(|info| super::auth::visible_bindings(auth, user, info))
        .collect();
    Ok(ok(json!({"exchanges": to_json(&exchanges)})))
}

#[utoipa::path(get, path = "/exchanges/{exchange}", tag = "exchanges", params(("exchange" = String, Path, description = "Exchange name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "events", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), responses((status = 200, body = ExchangeInfo), Errors))]
pub(super) async fn exchange_info(
    State(s): State<HttpState>,
    Path(exchange): Path<String>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    let info = s.broker.exchange_info(&exchange)?;
    let (auth, user) = (s.auth.as_deref(), caller.0.as_deref());
    Ok(ok(to_json(&super::auth::visible_bindings(
        auth, user, info,
    ))))
}

#[utoipa::path(delete, path = "/exchanges/{exchange}", tag = "exchanges", params(("exchange" = String, Path, description = "Exchange name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "events", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), responses((status = 204, description = "Deleted"), Errors))]
pub(super) async fn delete_exchange(
    State(s): State<HttpState>,
    Path(exchange): Path<String>,
) -> ApiResult {
    // The delete forgets the exchange's owner and grants in the same step.
    s.broker.delete_exchange(&exchange).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn binding(body: Body) -> Result<Binding, ApiError> {
    super::object::parse(&body_bytes(body)?)
}

#[utoipa::path(post, path = "/exchanges/{exchange}/bindings", tag = "exchanges", params(("exchange" = String, Path, description = "Exchange name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "events", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), request_body(content = Binding, example = json!({"queue": "audit", "key": "orders.*"})), responses((status = 201, body = Binding), Errors))]
pub(super) async fn bind(
    State(s): State<HttpState>,
    Path(exchange): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> ApiResult {
    let binding = binding(body)?;
    super::auth::check_bind_target(&s, &caller, &binding.queue)?;
    s.broker.bind(&exchange, binding.clone()).await?;
    Ok(created(to_json(&binding)))
}

#[utoipa::path(delete, path = "/exchanges/{exchange}/bindings", tag = "exchanges", params(("exchange" = String, Path, description = "Exchange name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "events", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")), request_body(content = Binding, example = json!({"queue": "audit", "key": "orders.*"})), responses((status = 204, description = "Unbound"), Errors))]
pub(super) async fn unbind(
    State(s): State<HttpState>,
    Path(exchange): Path<String>,
    body: Body,
) -> ApiResult {
    s.broker.unbind(&exchange, binding(body)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/exchanges/{exchange}/messages", tag = "exchanges", description = "Publish through an exchange to every matching bound queue.", params(("exchange" = String, Path, description = "Exchange name: 1-200 chars of `[A-Za-z0-9._-]`, not starting with `.`", example = "events", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"), ("key" = Option<String>, Query, description = "Routing key"), ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 256, description = "Per target queue: a repeat within its dedup window stores nothing")), request_body(description = "The payload, kept byte for byte with its Content-Type", content((Value = "application/json", example = json!({"to": "user@example.com", "subject": "Hello!"})), (String = "text/plain"), (Vec<u8> = "application/octet-stream"))), responses((status = 201, body = RoutedList), Errors))]
pub(super) async fn publish_to_exchange(
    State(s): State<HttpState>,
    Path(exchange): Path<String>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    q: Query_,
    body: Body,
) -> ApiResult {
    let q = query(q)?;
    let message = raw_message(&headers, &q, body_bytes(body)?)?;
    let routing_key = q.get("key").map(String::as_str);
    let routed = s
        .broker
        .publish_to_exchange_checked(&exchange, routing_key, message, |targets| {
            super::auth::check_route_targets(&s, &caller, &exchange, targets)
        })
        .await?;
    Ok(created(json!({"routed": to_json(&routed)})))
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn times_in_any_rfc3339_offset_are_the_same_instant() {
        let utc = parse_time("2026-12-04T04:00:00Z").unwrap();
        assert_eq!(utc, 1_796_356_800_000);
        for same in [
            "2026-12-04T04:00:00+00:00",
            "2026-12-04T06:00:00+02:00",
            "2026-12-03T23:00:00-05:00",
            "2026-12-04T09:30:00+05:30",
            "2026-12-04t04:00:00z",
            "1796356800000",
        ] {
            assert_eq!(parse_time(same).unwrap(), utc, "{same}");
        }
        assert_eq!(
            parse_time("2026-12-04T05:00:00.5+01:00").unwrap(),
            utc + 500
        );
        assert_eq!(
            parse_time("2026-12-04T04:00:00").unwrap(),
            utc,
            "no offset: UTC"
        );
        for bad in [
            "2026-12-04T04:00:00+24:00",
            "2026-12-04T04:00:00+0a:00",
            "2026-12-04T04:00:00+1:000",
            "soon",
            "+01:00",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
