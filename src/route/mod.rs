//! Exchange routing rules: direct, fanout, topic and headers matching.
//!
//! - direct: the routing key equals the binding key (no key matches a binding without key);
//! - fanout: every bound queue;
//! - topic: dot-separated words, `*` matches exactly one word, `#` zero or more (AMQP);
//! - headers: the binding's headers all (`all`) or at least one (`any`) equal the message's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Exchange type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HeaderMatch {
    /// Every binding header must match.
    #[default]
    All,
    /// At least one must.
    Any,
}

/// A binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// Longest binding key or routing key.
pub const MAX_KEY_LEN: usize = 255;
/// Most headers one headers-exchange binding may match on.
pub const MAX_BINDING_HEADERS: usize = 32;
/// Longest header name in a binding.
pub const MAX_BINDING_HEADER_NAME: usize = 128;
/// Longest header value in a binding.
pub const MAX_BINDING_HEADER_VALUE: usize = 1024;

/// A binding that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The target queue name is malformed (why, with the name cut short).
    #[error("binding: {0}")]
    InvalidQueue(String),
    /// The key or pattern is malformed.
    #[error("invalid binding key `{key}`: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// A headers exchange binding without headers.
    #[error("a headers exchange binding needs `headers`")]
    MissingHeaders,
    /// A binding's headers are too many or too long.
    #[error("binding headers: {0}")]
    HeadersTooLarge(String),
    /// A binding names one header twice, in two cases (names match in any case).
    #[error(
        "binding headers name `{0}` and `{1}`, the same header (names match in any case): give it once"
    )]
    DuplicateHeader(String, String),
}

/// True when a topic `pattern` matches `routing_key` (`*` one word, `#` zero or more).
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = split_words(pattern);
    let key: Vec<&str> = split_words(routing_key);
    // reachable[j]: pattern prefix matched against the first j words of the key.
    let mut reachable = vec![false; key.len() + 1];
    reachable[0] = true;
    for word in &pattern {
        let mut next = vec![false; key.len() + 1];
        match *word {
            "#" => {
                let mut any = false;
                for j in 0..=key.len() {
                    any |= reachable[j];
                    next[j] = any;
                }
            }
            "*" => {
                next[1..].copy_from_slice(&reachable[..key.len()]);
            }
            literal => {
                for j in 0..key.len() {
                    next[j + 1] = reachable[j] && key[j] == literal;
                }
            }
        }
        reachable = next;
    }
    reachable[key.len()]
}

/// Words of a dotted key; the empty key has no words.
fn split_words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// True when `headers` satisfy a headers binding under `mode`. Header names match
/// whatever their case (HTTP sends them in lower case: `Qit-Header-Tenant` arrives as
/// `tenant`); values must be equal.
pub fn headers_match(
    binding: &BTreeMap<String, String>,
    mode: HeaderMatch,
    headers: &BTreeMap<String, String>,
) -> bool {
    let hit = |(name, value): (&String, &String)| {
        headers.get(name) == Some(value)
            || headers
                .iter()
                .any(|(n, v)| v == value && n.eq_ignore_ascii_case(name))
    };
    match mode {
        HeaderMatch::All => binding.iter().all(hit),
        HeaderMatch::Any => binding.iter().any(hit),
    }
}

/// The distinct queues (in binding order) a message goes to.
pub fn route(
    kind: ExchangeKind,
    bindings: &[Binding],
    routing_key: Option<&str>,
    headers: &BTreeMap<String, String>,
) -> Vec<String> {
    let key = routing_key.unwrap_or("");
    let mut out: Vec<String> = Vec::new();
    for binding in bindings {
        let matched = match kind {
            ExchangeKind::Direct => binding.key.as_deref().unwrap_or("") == key,
            ExchangeKind::Fanout => true,
            ExchangeKind::Topic => topic_matches(binding.key.as_deref().unwrap_or(""), key),
            ExchangeKind::Headers => binding
                .headers
                .as_ref()
                .is_some_and(|h| headers_match(h, binding.match_mode.unwrap_or_default(), headers)),
        };
        if matched && !out.contains(&binding.queue) {
            out.push(binding.queue.clone());
        }
    }
    out
}

/// Checks that a binding can be used on an exchange of `kind`.
pub fn validate_binding(kind: ExchangeKind, binding: &Binding) -> Result<(), RouteError> {
    if let Err(e) = crate::name::check(&binding.queue) {
        return Err(RouteError::InvalidQueue(e.to_string()));
    }
    if let Some(key) = &binding.key {
        let bad = |reason| {
            Err(RouteError::InvalidKey {
                key: key.clone(),
                reason,
            })
        };
        if key.len() > MAX_KEY_LEN {
            return Err(RouteError::InvalidKey {
                key: key.chars().take(32).chain("…".chars()).collect(),
                reason: "longer than 255 bytes",
            });
        }
        if kind == ExchangeKind::Topic && !key.is_empty() && key.split('.').any(str::is_empty) {
            return bad("empty word between dots");
        }
    }
    if kind == ExchangeKind::Headers && binding.headers.as_ref().is_none_or(|h| h.is_empty()) {
        return Err(RouteError::MissingHeaders);
    }
    check_binding_headers(binding.headers.as_ref())
}

/// Checks what a new binding asks for beyond [`validate_binding`]: no header named twice
/// in two cases (`Tenant` and `tenant` are one header, so an `all` binding with two values
/// could never match). Only for bindings being made: one stored before the check is
/// still applied as it is (a replayed entry must do what it did when it was written).
pub fn check_new_binding(binding: &Binding) -> Result<(), RouteError> {
    let Some(headers) = &binding.headers else {
        return Ok(());
    };
    let mut seen: BTreeMap<String, &String> = BTreeMap::new();
    for name in headers.keys() {
        if let Some(first) = seen.insert(name.to_ascii_lowercase(), name) {
            return Err(RouteError::DuplicateHeader(first.clone(), name.clone()));
        }
    }
    Ok(())
}

/// Caps a binding's headers: count, name and value lengths.
fn check_binding_headers(headers: Option<&BTreeMap<String, String>>) -> Result<(), RouteError> {
    let Some(headers) = headers else {
        return Ok(());
    };
    let too_large = |what: String| Err(RouteError::HeadersTooLarge(what));
    if headers.len() > MAX_BINDING_HEADERS {
        return too_large(format!(
            "{} headers, at most {MAX_BINDING_HEADERS}",
            headers.len()
        ));
    }
    for (name, value) in headers {
        if name.is_empty() || name.len() > MAX_BINDING_HEADER_NAME {
            return too_large(format!(
                "a header name of {} bytes, must be 1..={MAX_BINDING_HEADER_NAME}",
                name.len()
            ));
        }
        if value.len() > MAX_BINDING_HEADER_VALUE {
            return too_large(format!(
                "a value of {} bytes, at most {MAX_BINDING_HEADER_VALUE}",
                value.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topic_pattern_table() {
        let rows = [
            ("a.b.c", "a.b.c", true),
            ("a.b.c", "a.b", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.*", "a.b", true),
            ("a.*", "a.b.c", false),
            ("*", "a", true),
            ("*", "", false),
            ("#", "", true),
            ("#", "a.b.c", true),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("a.#", "b.a", false),
            ("#.a", "a", true),
            ("#.a", "x.y.a", true),
            ("#.a", "a.x", false),
            ("a.#.b", "a.b", true),
            ("a.#.b", "a.x.y.b", true),
            ("a.#.b", "a.x.y", false),
            ("#.#", "a.b", true),
            ("*.#", "", false),
            ("*.#", "a", true),
            ("#.*.#", "a", true),
            ("stock.*.nyse", "stock.ibm.nyse", true),
            ("stock.*.nyse", "stock.ibm.nasdaq", false),
            ("", "", true),
            ("", "a", false),
        ];
        for (pattern, key, want) in rows {
            assert_eq!(topic_matches(pattern, key), want, "{pattern} vs {key}");
        }
    }

    fn bind(queue: &str, key: Option<&str>) -> Binding {
        Binding {
            queue: queue.into(),
            key: key.map(Into::into),
            headers: None,
            match_mode: None,
        }
    }

    #[test]
    fn routes_by_kind() {
        let none = BTreeMap::new();
        let bindings = vec![
            bind("q1", Some("red")),
            bind("q2", Some("blue")),
            bind("q1", Some("red")),
        ];
        assert_eq!(
            route(ExchangeKind::Direct, &bindings, Some("red"), &none),
            vec!["q1"]
        );
        assert!(route(ExchangeKind::Direct, &bindings, Some("green"), &none).is_empty());
        assert_eq!(
            route(ExchangeKind::Fanout, &bindings, None, &none),
            vec!["q1", "q2"]
        );
        let mut headers = BTreeMap::new();
        headers.insert("x".to_string(), "1".to_string());
        let hb = Binding {
            headers: Some(
                [
                    ("x".to_string(), "1".to_string()),
                    ("y".to_string(), "2".to_string()),
                ]
                .into_iter()
                .collect(),
            ),
            match_mode: Some(HeaderMatch::Any),
            ..bind("h", None)
        };
        assert_eq!(
            route(
                ExchangeKind::Headers,
                std::slice::from_ref(&hb),
                None,
                &headers
            ),
            vec!["h"]
        );
        let all = Binding {
            match_mode: Some(HeaderMatch::All),
            ..hb
        };
        assert!(route(ExchangeKind::Headers, &[all], None, &headers).is_empty());
        // Names match whatever their case; values do not.
        let upper: BTreeMap<String, String> = [("X".to_string(), "1".to_string())].into();
        assert!(headers_match(&upper, HeaderMatch::All, &headers));
        assert!(headers_match(&headers, HeaderMatch::All, &upper));
        let other_value: BTreeMap<String, String> = [("X".to_string(), "01".to_string())].into();
        assert!(!headers_match(&other_value, HeaderMatch::All, &headers));
    }

    #[test]
    fn bindings_are_validated() {
        assert!(validate_binding(ExchangeKind::Topic, &bind("q", Some("a..b"))).is_err());
        assert!(validate_binding(ExchangeKind::Topic, &bind("q", Some("a.*.#"))).is_ok());
        assert!(validate_binding(ExchangeKind::Direct, &bind("bad name", None)).is_err());
        assert!(validate_binding(ExchangeKind::Headers, &bind("q", None)).is_err());
        let with = |names: &[&str]| Binding {
            headers: Some(
                names
                    .iter()
                    .map(|n| (n.to_string(), "v".to_string()))
                    .collect(),
            ),
            ..bind("q", None)
        };
        assert!(check_new_binding(&with(&["Tenant", "region"])).is_ok());
        assert!(check_new_binding(&bind("q", None)).is_ok());
        let twice = check_new_binding(&with(&["Tenant", "tenant"])).unwrap_err();
        assert!(
            twice.to_string().contains("`Tenant` and `tenant`"),
            "{twice}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn literal_patterns_match_only_themselves(
            a in "[a-c]{1,2}(\\.[a-c]{1,2}){0,3}",
            b in "[a-c]{1,2}(\\.[a-c]{1,2}){0,3}",
        ) {
            prop_assert!(topic_matches(&a, &a));
            prop_assert!(topic_matches("#", &a));
            prop_assert_eq!(topic_matches(&a, &b), a == b);
        }
    }
}
