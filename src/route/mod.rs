//! Exchange routing rules: direct, fanout, topic and headers matching.
//!
//! CONTRACT STUB: the types below are fixed; the functions are filled in by the route work:
//! `topic_matches(pattern, key)`, `headers_match(binding_headers, mode, headers)`,
//! `route(kind, bindings, routing_key, headers) -> Vec<String>`, `validate_binding(kind, binding)`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Exchange type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// Every bound queue.
    Fanout,
    /// Dot-separated words with `*` (one word) and `#` (zero or more).
    Topic,
    /// Header values match the binding's (`all` or `any`).
    Headers,
}

/// `all` or `any` for headers exchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderMatch {
    /// Every binding header must match.
    #[default]
    All,
    /// At least one must.
    Any,
}

/// A binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// Target queue.
    pub queue: String,
    /// Binding key (direct) or pattern (topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Headers to match (headers exchange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    /// `all` or `any` (headers exchange).
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_mode: Option<HeaderMatch>,
}
