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
use serde::Deserialize;
use serde_json::{Map, Value, json};

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

/// The body as JSON, when it was published as JSON: with a JSON content type, or with none
/// (or curl's default form type, which a JSON text never is) and a JSON object or array.
fn json_body(content_type: Option<&str>, body: &[u8]) -> Option<Value> {
    let untyped = content_type.is_none_or(|t| {
        t.split(';').next().is_some_and(|e| {
            e.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    });
    match content_type {
        Some(t) if is_json_type(t) => serde_json::from_slice(body).ok(),
        _ if untyped => serde_json::from_slice::<Value>(body)
            .ok()
            .filter(|v| v.is_object() || v.is_array()),
        _ => None,
    }
}

/// The JSON object of a delivered or replayed message.
pub fn delivery(d: &Delivery) -> Value {
    let mut obj = Map::new();
    obj.insert("id".into(), json!(d.id.to_string()));
    obj.insert("queue".into(), json!(d.queue));
    obj.insert("partition".into(), json!(d.id.partition));
    obj.insert("offset".into(), json!(d.id.offset));
    obj.insert("timestamp".into(), json!(d.timestamp_ms));
    if let Some(key) = &d.key {
        obj.insert("key".into(), json!(key));
    }
    obj.insert("headers".into(), json!(d.headers));
    obj.insert("delivery_count".into(), json!(d.delivery_count));
    if let Some(content_type) = &d.content_type {
        obj.insert("content_type".into(), json!(content_type));
    }
    let as_json = json_body(d.content_type.as_deref(), &d.body);
    match (as_json, std::str::from_utf8(&d.body)) {
        (Some(value), _) => obj.insert("body".into(), value),
        (None, Ok(text)) => obj.insert("body".into(), json!(text)),
        (None, Err(_)) => obj.insert("body_base64".into(), json!(BASE64.encode(&d.body))),
    };
    Value::Object(obj)
}

/// `{"messages": [...]}` for a list of deliveries.
pub fn deliveries(list: &[Delivery]) -> Value {
    json!({ "messages": list.iter().map(delivery).collect::<Vec<_>>() })
}

/// One message of a batch publish.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchMessage {
    /// Any JSON value, stored as JSON (`null` too: only a missing `body` is none).
    #[serde(default, deserialize_with = "present")]
    pub body: Option<Value>,
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
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// `{"messages": [...]}` for a batch publish.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchPublish {
    /// The messages.
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
                Bytes::from(value.to_string()),
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
        let json_body = delivery(&d(br#"{"to":"a"}"#, Some("application/json")));
        assert_eq!(json_body["body"], json!({"to": "a"}));
        assert_eq!(json_body["id"], "0-7");
        let text = delivery(&d(b"hello", Some("text/plain")));
        assert_eq!(text["body"], "hello");
        let not_json = delivery(&d(b"{oops", Some("application/json")));
        assert_eq!(not_json["body"], "{oops");
        let binary = delivery(&d(&[0xff, 0x00], None));
        assert_eq!(binary["body_base64"], "/wA=");
        assert!(is_json_type("application/vnd.api+json; charset=utf-8"));
        // `curl -d '{...}'` without a content type header sends the form type.
        let form = "application/x-www-form-urlencoded";
        assert_eq!(
            delivery(&d(br#"{"a":1}"#, Some(form)))["body"],
            json!({"a": 1})
        );
        assert_eq!(delivery(&d(b"a=1&b=2", Some(form)))["body"], "a=1&b=2");
        assert_eq!(delivery(&d(b"[1,2]", None))["body"], json!([1, 2]));
        // Scalars stay text unless the publisher said JSON.
        assert_eq!(delivery(&d(b"123", None))["body"], "123");
        assert_eq!(delivery(&d(b"123", Some("application/json")))["body"], 123);
        assert_eq!(
            delivery(&d(br#"{"a":1}"#, Some("text/plain")))["body"],
            r#"{"a":1}"#
        );
    }
}
