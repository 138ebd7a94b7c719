//! The JSON shapes of messages: a delivered message, and batch-publish input.
//!
//! A body comes back as JSON when it was published as JSON (its content type is
//! `application/json` or `*+json` and it parses, or it has no content type, or curl's
//! default form type, and is a JSON object or array), as a string when it is other UTF-8
//! text, and base64-encoded in `body_base64` otherwise.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::ApiError;
use crate::broker::{Delivery, NewMessage};

/// True for `application/json` and `application/*+json` (parameters ignored).
pub fn is_json_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// True when `body` is one JSON text in UTF-8 (any number in JSON's syntax, whatever its
/// size or digits: it is stored and sent back as it is, never converted).
pub fn is_json_text(body: &[u8]) -> bool {
    json_text(body).is_some()
}

/// `body` as one JSON text in UTF-8, unconverted ([`is_json_text`]).
fn json_text(body: &[u8]) -> Option<&RawValue> {
    serde_json::from_str(std::str::from_utf8(body).ok()?).ok()
}

/// The body as JSON, when it was published as JSON: with a JSON content type, or with none
/// (or curl's default form type, which a JSON text never is) and a JSON object or array.
/// The stored text itself, never re-encoded: a number keeps every digit it was sent with.
fn json_body<'a>(content_type: Option<&str>, body: &'a [u8]) -> Option<&'a RawValue> {
    let untyped = content_type.is_none_or(|t| {
        t.split(';').next().is_some_and(|e| {
            e.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    });
    match content_type {
        Some(t) if is_json_type(t) => json_text(body),
        _ if untyped => json_text(body).filter(|v| v.get().starts_with(['{', '['])),
        _ => None,
    }
}

/// A body as it goes out: its JSON text as stored, or text.
enum Body<'a> {
    Json(&'a RawValue),
    Text(&'a str),
}

impl Serialize for Body<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Body::Json(raw) => raw.serialize(serializer),
            Body::Text(text) => text.serialize(serializer),
        }
    }
}

/// The JSON object of a delivered or replayed message.
#[derive(Serialize)]
pub struct DeliveryJson<'a> {
    id: String,
    queue: &'a str,
    partition: u32,
    offset: u64,
    timestamp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    headers: &'a BTreeMap<String, String>,
    delivery_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Body<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

/// A delivered or replayed message as JSON.
pub fn delivery(d: &Delivery) -> DeliveryJson<'_> {
    let (body, body_base64) = match (
        json_body(d.content_type.as_deref(), &d.body),
        std::str::from_utf8(&d.body),
    ) {
        (Some(raw), _) => (Some(Body::Json(raw)), None),
        (None, Ok(text)) => (Some(Body::Text(text)), None),
        (None, Err(_)) => (None, Some(BASE64.encode(&d.body))),
    };
    DeliveryJson {
        id: d.id.to_string(),
        queue: &d.queue,
        partition: d.id.partition,
        offset: d.id.offset,
        timestamp: d.timestamp_ms,
        key: d.key.as_deref(),
        headers: &d.headers,
        delivery_count: d.delivery_count,
        content_type: d.content_type.as_deref(),
        body,
        body_base64,
    }
}

/// `{"messages": [...]}` for a list of deliveries (with `next_offset` for a log read).
#[derive(Serialize)]
pub struct Deliveries<'a> {
    messages: Vec<DeliveryJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_offset: Option<u64>,
}

/// [`Deliveries`] of `list`, and `next_offset` when given.
pub fn deliveries(list: &[Delivery], next_offset: Option<u64>) -> Deliveries<'_> {
    Deliveries {
        messages: list.iter().map(delivery).collect(),
        next_offset,
    }
}

/// One message of a batch publish.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchMessage {
    /// Any JSON value, stored as JSON text as it was sent (`null` too: only a missing
    /// `body` is none).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub body: Option<Box<RawValue>>,
    /// Raw bytes, base64-encoded.
    #[serde(default)]
    pub body_base64: Option<String>,
    /// Partitioning / ordering / compaction key.
    #[serde(default)]
    pub key: Option<String>,
    /// Message headers.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// Content type for `body_base64` bodies.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Idempotency key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A field that is present, whatever its value (`null` included), is `Some`.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

/// `{"messages": [...]}` for a batch publish.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchPublish {
    /// The messages.
    #[serde(deserialize_with = "super::object::deserialize_each")]
    pub messages: Vec<BatchMessage>,
}

impl BatchMessage {
    /// The message to publish, or why not.
    pub fn into_message(self, index: usize) -> Result<NewMessage, ApiError> {
        let (body, content_type) = match (self.body, self.body_base64) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(format!(
                    "message {index}: give `body` or `body_base64`, not both"
                )));
            }
            (Some(value), None) => (
                Bytes::copy_from_slice(value.get().as_bytes()),
                Some("application/json".to_string()),
            ),
            (None, Some(encoded)) => (
                Bytes::from(BASE64.decode(encoded.as_bytes()).map_err(|e| {
                    ApiError::bad_request(format!("message {index}: body_base64: {e}"))
                })?),
                Some(
                    self.content_type
                        .unwrap_or_else(|| "application/octet-stream".to_string()),
                ),
            ),
            (None, None) => {
                return Err(ApiError::bad_request(format!(
                    "message {index}: `body` or `body_base64` is required"
                )));
            }
        };
        let headers = self.headers.unwrap_or_default();
        for name in headers.keys() {
            check_header_name(name)?;
        }
        if let Some(key) = &self.idempotency_key {
            check_idempotency_key(key)?;
        }
        Ok(NewMessage {
            key: self.key,
            headers,
            content_type,
            body,
            idempotency_key: self.idempotency_key,
        })
    }
}

/// Header names: 1-128 chars of `[A-Za-z0-9._-]`, not starting with the reserved `qit-`.
pub fn check_header_name(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(ApiError::bad_request(format!(
            "invalid header name `{name}`"
        )));
    }
    if name.to_ascii_lowercase().starts_with("qit-") {
        return Err(ApiError::bad_request(format!(
            "header name `{name}` uses the reserved prefix `qit-`"
        )));
    }
    Ok(())
}

/// Prefixes of the idempotency keys qit gives messages itself (a redrive's, a Kafka
/// producer's batches): a client's key may not start with one, or a client could make qit
/// drop a message it moves as a repeat of the client's.
pub const RESERVED_KEY_PREFIXES: [&str; 2] = ["qit-", "kafka:"];

/// Checks a client's idempotency key: 1-256 bytes, not under a reserved prefix.
pub fn check_idempotency_key(key: &str) -> Result<(), ApiError> {
    use crate::broker::message::MAX_IDEMPOTENCY_KEY_BYTES;
    if !(1..=MAX_IDEMPOTENCY_KEY_BYTES).contains(&key.len()) {
        return Err(ApiError::bad_request(
            "an idempotency key must be 1-256 characters",
        ));
    }
    let lower = key.to_ascii_lowercase();
    if let Some(prefix) = RESERVED_KEY_PREFIXES.iter().find(|p| lower.starts_with(*p)) {
        return Err(ApiError::bad_request(format!(
            "idempotency key `{key}` uses the reserved prefix `{prefix}`"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::MessageId;
    use serde_json::{Value, json};

    /// The delivery's JSON as a client parses it.
    fn out(d: &Delivery) -> Value {
        serde_json::from_str(&serde_json::to_string(&delivery(d)).unwrap()).unwrap()
    }

    fn d(body: &[u8], content_type: Option<&str>) -> Delivery {
        Delivery {
            queue: "q".into(),
            id: MessageId {
                partition: 0,
                offset: 7,
            },
            timestamp_ms: 1,
            key: None,
            headers: BTreeMap::new(),
            content_type: content_type.map(Into::into),
            body: Bytes::copy_from_slice(body),
            delivery_count: 1,
        }
    }

    #[test]
    fn bodies_come_back_in_their_kind() {
        let json_body = out(&d(br#"{"to":"a"}"#, Some("application/json")));
        assert_eq!(json_body["body"], json!({"to": "a"}));
        assert_eq!(json_body["id"], "0-7");
        let text = out(&d(b"hello", Some("text/plain")));
        assert_eq!(text["body"], "hello");
        let not_json = out(&d(b"{oops", Some("application/json")));
        assert_eq!(not_json["body"], "{oops");
        let binary = out(&d(&[0xff, 0x00], None));
        assert_eq!(binary["body_base64"], "/wA=");
        assert!(is_json_type("application/vnd.api+json; charset=utf-8"));
        // `curl -d '{...}'` without a content type header sends the form type.
        let form = "application/x-www-form-urlencoded";
        assert_eq!(out(&d(br#"{"a":1}"#, Some(form)))["body"], json!({"a": 1}));
        assert_eq!(out(&d(b"a=1&b=2", Some(form)))["body"], "a=1&b=2");
        assert_eq!(out(&d(b"[1,2]", None))["body"], json!([1, 2]));
        // Scalars stay text unless the publisher said JSON.
        assert_eq!(out(&d(b"123", None))["body"], "123");
        assert_eq!(out(&d(b"123", Some("application/json")))["body"], 123);
        assert_eq!(
            out(&d(br#"{"a":1}"#, Some("text/plain")))["body"],
            r#"{"a":1}"#
        );
    }

    /// A JSON body goes out as the text it was stored as: numbers beyond f64 or u64 keep
    /// every digit (they came back rounded: 1.2345678901234568e29).
    #[test]
    fn json_bodies_go_out_as_stored() {
        let text = r#"{"id":123456789012345678901234567890,"f":0.10000000000000000555,"g":1.50,"e":1e400,"z":-0}"#;
        let one = d(text.as_bytes(), Some("application/json"));
        let sent = serde_json::to_string(&deliveries(&[one], Some(9))).unwrap();
        assert!(sent.contains(&format!(r#""body":{text}"#)), "{sent}");
        assert!(sent.ends_with(r#""next_offset":9}"#), "{sent}");
        let untyped = d(b"  [18446744073709551617]  ", None);
        let sent = serde_json::to_string(&delivery(&untyped)).unwrap();
        assert!(sent.contains(r#""body":[18446744073709551617]"#), "{sent}");
    }

    /// A batch message's JSON body is stored as the text it was sent as.
    #[test]
    fn batch_bodies_are_stored_as_sent() {
        let batch: BatchPublish = serde_json::from_str(
            r#"{"messages":[{"body":{"n":123456789012345678901234567890}},{"body":null}]}"#,
        )
        .unwrap();
        let stored: Vec<NewMessage> = batch
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_message(i).unwrap())
            .collect();
        assert_eq!(
            &stored[0].body[..],
            br#"{"n":123456789012345678901234567890}"#
        );
        assert_eq!(&stored[1].body[..], b"null");
    }
}
