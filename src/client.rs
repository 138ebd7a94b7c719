//! A small HTTP client for the CLI subcommands: one request helper that turns the server's
//! JSON error shape into [`ClientError::Server`].

use reqwest::Method;
use serde_json::Value;

use crate::cli::ClientArgs;

/// Errors of a client command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request did not reach the server or the answer was unreadable.
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered with an error.
    #[error("{message} ({status} {code})")]
    Server {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Error message.
        message: String,
    },
    /// Bad local input.
    #[error("{0}")]
    Invalid(String),
}

/// The content type `qit send` gives a body when none is named: `application/json` for a
/// JSON object or array (what the HTTP route would take as JSON), `text/plain` otherwise.
pub fn content_type_of(body: &[u8]) -> &'static str {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) if value.is_object() || value.is_array() => "application/json",
        _ => "text/plain",
    }
}

/// A body to send.
#[derive(Clone)]
pub enum Body {
    /// JSON.
    Json(Value),
    /// Raw bytes with a content type and extra headers.
    Raw {
        /// The bytes.
        bytes: Vec<u8>,
        /// Content type.
        content_type: String,
        /// Extra request headers.
        headers: Vec<(String, String)>,
    },
}

/// How often a request answered "no leader" is tried again.
pub const NO_LEADER_RETRIES: u32 = 10;

/// The client.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client for the server in `args`.
    pub fn new(args: &ClientArgs) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: args.server.trim_end_matches('/').to_string(),
            token: args.token.clone(),
        }
    }

    /// Sends a request; `Ok(None)` for an empty (204) answer. A cluster without a leader
    /// for the request (503 `no_leader`), or a node still catching up with the cluster
    /// (503 `catching_up`), is asked again, after its `Retry-After`, for up to
    /// [`NO_LEADER_RETRIES`] times: an election takes a second or two.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Body>,
    ) -> Result<Option<Value>, ClientError> {
        let mut tries = 0;
        loop {
            match self
                .request_once(method.clone(), path, query, body.clone())
                .await
            {
                Err(ClientError::Server { code, .. })
                    if matches!(code.as_str(), "no_leader" | "catching_up")
                        && tries < NO_LEADER_RETRIES =>
                {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                other => return other,
            }
        }
    }

    async fn request_once(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Body>,
    ) -> Result<Option<Value>, ClientError> {
        let mut request = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .query(query);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request = match body {
            Some(Body::Json(value)) => request.json(&value),
            Some(Body::Raw {
                bytes,
                content_type,
                headers,
            }) => {
                let mut r = request.header("content-type", content_type).body(bytes);
                for (name, value) in headers {
                    r = r.header(name, value);
                }
                r
            }
            None => request,
        };
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            return Err(ClientError::Server {
                status: status.as_u16(),
                code: parsed["error"]["code"]
                    .as_str()
                    .unwrap_or("error")
                    .to_string(),
                message: parsed["error"]["message"]
                    .as_str()
                    .map_or(text.clone(), str::to_string),
            });
        }
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ClientError::Invalid(format!("unreadable answer: {e}")))
    }
}

/// Percent-encodes one path segment.
pub fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::content_type_of;

    #[test]
    fn json_objects_and_arrays_are_sent_as_json_and_the_rest_as_text() {
        assert_eq!(content_type_of(br#"{"a":1}"#), "application/json");
        assert_eq!(content_type_of(b" [1, 2] "), "application/json");
        assert_eq!(content_type_of(b"42"), "text/plain");
        assert_eq!(content_type_of(br#""quoted""#), "text/plain");
        assert_eq!(content_type_of(b"{not json"), "text/plain");
        assert_eq!(content_type_of(b""), "text/plain");
    }
}
