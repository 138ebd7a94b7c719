//! Authentication and authorization at the API edge, for HTTP and gRPC alike.
//!
//! The whole route policy lives in [`required`]: which action on which resource a request
//! needs. With auth off, every check passes and behaviour is as without this module.
//! Ownership is recorded when a create succeeds and forgotten when a delete does.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::state::HttpState;
use crate::auth::{Action, AuthError, AuthStore, ErrorClass, Permission, Resource};
use crate::broker::Broker;

/// The authenticated caller of a request (`None` when auth is off).
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<String>);

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        let (status, code) = match error.class() {
            ErrorClass::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorClass::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ErrorClass::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ErrorClass::NotFound => (StatusCode::NOT_FOUND, "user_not_found"),
            ErrorClass::Conflict => (StatusCode::CONFLICT, "user_exists"),
            ErrorClass::TooManyRequests => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ErrorClass::Internal => {
                tracing::error!(%error, "auth storage error");
                (StatusCode::SERVICE_UNAVAILABLE, "storage_error")
            }
        };
        ApiError::new(status, code, error.to_string())
    }
}

/// The action and resource a request needs, from its method and path.
pub fn required(method: &Method, path: &str) -> Option<(Action, Resource)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let write = |m: &Method| m != Method::GET;
    match segments.as_slice() {
        ["queues", q] if *method == Method::POST => Some((Action::Create, Resource::queue(q))),
        ["queues", q] if *method == Method::DELETE => Some((Action::Manage, Resource::queue(q))),
        ["queues", q, "messages"] | ["queues", q, "messages", "batch"] if write(method) => {
            Some((Action::Publish, Resource::queue(q)))
        }
        ["queues", q, "redrive"] | ["queues", q, "grants"] => {
            Some((Action::Manage, Resource::queue(q)))
        }
        ["queues", q, "messages", ..] | ["queues", q, "log"] | ["queues", q, "groups", ..] => {
            Some((Action::Consume, Resource::queue(q)))
        }
        ["exchanges", x] if *method == Method::POST => {
            Some((Action::Create, Resource::exchange(x)))
        }
        ["exchanges", x] if *method == Method::DELETE => {
            Some((Action::Manage, Resource::exchange(x)))
        }
        ["exchanges", x, "bindings"] => Some((Action::Manage, Resource::exchange(x))),
        _ => None,
    }
}

/// The user named by a bearer token (`Authorization: Bearer ...`).
pub fn authenticate(store: &AuthStore, authorization: Option<&str>) -> Result<String, ApiError> {
    let token = authorization
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "a bearer token is required",
            )
        })?;
    Ok(store.verify_token(token)?.sub)
}

/// Checks the bearer token and the route policy; records owners after creates/deletes.
pub async fn middleware(
    State(state): State<HttpState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(store) = state.auth.clone() else {
        request.extensions_mut().insert(Caller(None));
        return next.run(request).await;
    };
    let path = request.uri().path().to_string();
    if path == "/healthz" || path.starts_with("/auth/") {
        request.extensions_mut().insert(Caller(None));
        return next.run(request).await;
    }
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let user = match authenticate(&store, header) {
        Ok(user) => user,
        Err(error) => return error.into_response(),
    };
    let method = request.method().clone();
    let need = required(&method, &path);
    if let Some((action, resource)) = &need
        && let Err(error) = store.authorize(&user, *action, resource)
    {
        return ApiError::from(error).into_response();
    }
    request.extensions_mut().insert(Caller(Some(user.clone())));
    let response = next.run(request).await;
    if let Some((action, resource)) = need {
        let outcome = Outcome {
            action,
            resource: &resource,
            method: &method,
            path: &path,
            status: response.status(),
        };
        record_ownership(&store, &state.broker, &user, outcome);
    }
    response
}

/// What a request changed about ownership.
struct Outcome<'a> {
    action: Action,
    resource: &'a Resource,
    method: &'a Method,
    path: &'a str,
    status: StatusCode,
}

fn record_ownership(store: &AuthStore, broker: &Broker, user: &str, outcome: Outcome<'_>) {
    let Outcome {
        action,
        resource,
        method,
        path,
        status,
    } = outcome;
    let result = match (action, status) {
        (Action::Create, StatusCode::CREATED) => {
            let owned = store.set_owner(resource, user);
            // The dead-letter queue made with a queue belongs to the same owner.
            if let Resource::Queue(name) = resource
                && let Ok(info) = broker.queue_info(name)
                && info.settings.max_deliveries > 0
            {
                let dlq = Resource::queue(&info.settings.dead_letter_name(name));
                if store.owner(&dlq).is_none() {
                    let _ = store.set_owner(&dlq, user);
                }
            }
            owned
        }
        // Deleting the queue or exchange itself (not a binding) forgets owner and grants.
        (Action::Manage, StatusCode::NO_CONTENT)
            if *method == Method::DELETE && path.trim_matches('/').split('/').count() == 2 =>
        {
            store.remove_resource(resource)
        }
        _ => Ok(()),
    };
    if let Err(error) = result {
        tracing::error!(%error, "recording ownership failed");
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Credentials {
    username: String,
    password: String,
}

fn store(state: &HttpState) -> Result<Arc<AuthStore>, ApiError> {
    state.auth.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "auth_disabled",
            "authentication is off on this server",
        )
    })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))
}

/// `POST /auth/register`.
pub async fn register(
    State(state): State<HttpState>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let credentials: Credentials = parse(&body)?;
    let username = credentials.username.clone();
    tokio::task::spawn_blocking(move || {
        store.register(&credentials.username, &credentials.password)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_error",
            e.to_string(),
        )
    })??;
    Ok((StatusCode::CREATED, Json(json!({"username": username}))).into_response())
}

/// `POST /auth/login`.
pub async fn login(
    State(state): State<HttpState>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let credentials: Credentials = parse(&body)?;
    let token = tokio::task::spawn_blocking(move || {
        store.login(&credentials.username, &credentials.password)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_error",
            e.to_string(),
        )
    })??;
    Ok((
        StatusCode::OK,
        Json(json!({"token": token, "token_type": "Bearer"})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantBody {
    user: String,
    permissions: Vec<Permission>,
}

/// `POST /queues/{q}/grants`: the owner (or admin) lets `user` publish and/or consume;
/// an empty list revokes.
pub async fn grant(
    State(state): State<HttpState>,
    axum::extract::Path(queue): axum::extract::Path<String>,
    Extension(caller): Extension<Caller>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let request: GrantBody = parse(&body)?;
    state.broker.queue_info(&queue)?;
    let by = caller.0.unwrap_or_default();
    let resource = Resource::queue(&queue);
    if request.permissions.is_empty() {
        store.revoke(&by, &resource, &request.user)?;
    } else {
        store.grant(&by, &resource, &request.user, &request.permissions)?;
    }
    let now: Vec<Permission> = store.permissions(&resource, &request.user);
    Ok((
        StatusCode::OK,
        Json(json!({"queue": queue, "user": request.user, "permissions": now})),
    )
        .into_response())
}

/// Checks that the caller may publish into the queue a binding targets.
pub fn check_bind_target(state: &HttpState, caller: &Caller, queue: &str) -> Result<(), ApiError> {
    match (&state.auth, &caller.0) {
        (Some(store), Some(user)) => {
            Ok(store.authorize(user, Action::Publish, &Resource::queue(queue))?)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_table() {
        let q = |a| Some((a, Resource::queue("jobs")));
        assert_eq!(required(&Method::POST, "/queues/jobs"), q(Action::Create));
        assert_eq!(required(&Method::DELETE, "/queues/jobs"), q(Action::Manage));
        assert_eq!(required(&Method::GET, "/queues/jobs"), None);
        assert_eq!(
            required(&Method::POST, "/queues/jobs/messages"),
            q(Action::Publish)
        );
        assert_eq!(
            required(&Method::POST, "/queues/jobs/messages/batch"),
            q(Action::Publish)
        );
        assert_eq!(
            required(&Method::GET, "/queues/jobs/messages"),
            q(Action::Consume)
        );
        assert_eq!(
            required(&Method::DELETE, "/queues/jobs/messages/0-1"),
            q(Action::Consume)
        );
        assert_eq!(
            required(&Method::POST, "/queues/jobs/messages/0-1/nack"),
            q(Action::Consume)
        );
        assert_eq!(
            required(&Method::GET, "/queues/jobs/log"),
            q(Action::Consume)
        );
        assert_eq!(
            required(&Method::PUT, "/queues/jobs/groups/g/offset"),
            q(Action::Consume)
        );
        assert_eq!(
            required(&Method::POST, "/queues/jobs/redrive"),
            q(Action::Manage)
        );
        assert_eq!(
            required(&Method::POST, "/queues/jobs/grants"),
            q(Action::Manage)
        );
        assert_eq!(
            required(&Method::POST, "/exchanges/x/bindings"),
            Some((Action::Manage, Resource::exchange("x")))
        );
        assert_eq!(required(&Method::GET, "/queues"), None);
        let x = |a| Some((a, Resource::exchange("x")));
        assert_eq!(required(&Method::POST, "/exchanges/x"), x(Action::Create));
        assert_eq!(required(&Method::DELETE, "/exchanges/x"), x(Action::Manage));
        assert_eq!(required(&Method::GET, "/exchanges/x"), None);
        assert_eq!(required(&Method::GET, "/exchanges"), None);
    }
}
