//! Checks every HTTP request passes before its route sees it: a query string whose
//! parameters each come once and decode to UTF-8, and no HEAD on a route whose GET
//! changes state (receiving leases messages; a HEAD must not).

use axum::extract::{MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// Routes whose GET is not safe: a HEAD there is 405 rather than a GET without a body.
const UNSAFE_GETS: &[&str] = &["/queues/{queue}/messages"];

/// The middleware: refuses a request that fails a check, else runs the route.
pub async fn middleware(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    if request.method() == Method::HEAD
        && matched
            .as_ref()
            .is_some_and(|m| UNSAFE_GETS.contains(&m.as_str()))
    {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "HEAD is not served here: a GET of this route leases messages",
        )
        .into_response();
    }
    if let Some(query) = request.uri().query()
        && let Err(message) = check_query(query)
    {
        return ApiError::bad_request(message).into_response();
    }
    next.run(request).await
}

/// A query string's parameters must each be given once, with names and values that
/// decode (percent escapes, `+` for space) to UTF-8: otherwise one value would be
/// picked silently, or bytes replaced by U+FFFD (two different keys made one).
pub fn check_query(query: &str) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name)
            .ok_or_else(|| "a query parameter name is not UTF-8 once decoded".to_string())?;
        if decode(value).is_none() {
            return Err(format!(
                "query parameter `{name}` is not UTF-8 once decoded"
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(format!("query parameter `{name}` is given more than once"));
        }
    }
    Ok(())
}

/// Percent-decodes `text` (`+` is a space, as in a form); `None` when the bytes are not
/// UTF-8. A `%` not followed by two hex digits stays as it is.
fn decode(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_passes_or_says_why() {
        for ok in [
            "",
            "key=a",
            "key=a&max=3",
            "key=%C3%A9",
            "key=a+b",
            "key=%",
            "key=%zz",
            "a&b",
            "key=%e2%82%ac",
        ] {
            assert_eq!(check_query(ok), Ok(()), "{ok}");
        }
        for bad in [
            "key=%fe",
            "key=%ff",
            "key=%c3",
            "%ff=1",
            "key=a&key=b",
            "key=a&key=a",
            "max=1&max",
        ] {
            assert!(check_query(bad).is_err(), "{bad}");
        }
    }
}
