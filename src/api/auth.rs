//! Authentication and authorization at the API edge, for HTTP and gRPC alike: the one
//! policy of who may move messages where.
//!
//! Every decision is made on the same decoded names the handlers use: the HTTP middleware
//! takes the route that matched and its percent-decoded path parameters (so
//! `/queues/%69nvoices` is decided, served and owned as `invoices`), and the rules that need
//! a request's body or routing (a queue's `dead_letter`, a binding's target, the queues an
//! exchange routes to) are functions here that the HTTP and gRPC handlers call before they
//! change anything:
//!
//! - [`required`]: the action and resource a route needs (publish, consume, manage);
//!   redrive needs publish on the queue and consume on its dead-letter queue ([`needs`]).
//! - [`check_dead_letter`]: a new queue's dead-letter queue must be one the caller may
//!   publish to and consume from, or one this create makes.
//! - [`check_bind_target`], [`check_route_targets`]: binding a queue, and publishing
//!   through an exchange, need publish on the queue(s).
//! - [`creator`]: ownership is only ever given for queues and exchanges a call created,
//!   recorded with the creation ([`check_created_queue`] checks a new queue's dead-letter
//!   queue again); a queue without an owner belongs to the admin alone.
//! - [`refusal`]: a refused call on a queue or exchange that does not exist is its 404.
//!
//! With auth off, every check passes and behaviour is as without this module.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

use super::error::ApiError;
use super::state::HttpState;
use crate::auth::{Action, AuthError, AuthStore, ErrorClass, Permission, Resource};
use crate::broker::{Broker, CreatedQueue, QueueSettings};

/// Largest body of `/auth/register` and `/auth/login`.
pub const AUTH_BODY_LIMIT: usize = 4096;
/// How long a login or registration waits for a password-hashing slot before 429.
const HASHING_WAIT: Duration = Duration::from_secs(2);

/// The authenticated caller of a request (`None` when auth is off).
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<String>);

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        if error.class() == ErrorClass::Internal {
            tracing::error!(%error, "auth storage error");
        }
        let (status, code) = super::error::auth_status(error.class());
        ApiError::new(status, code, error.to_string())
    }
}

/// The action and resource a route needs: `route` is the route as registered (say
/// `/queues/{queue}/messages`), `name` the decoded `{queue}` or `{exchange}` of the request.
pub fn required(method: &Method, route: &str, name: &str) -> Option<(Action, Resource)> {
    let queue = |action| Some((action, Resource::queue(name)));
    let exchange = |action| Some((action, Resource::exchange(name)));
    match (route, method.clone()) {
        ("/queues/{queue}", Method::POST) => queue(Action::Create),
        ("/queues/{queue}", Method::GET) => queue(Action::View),
        ("/queues/{queue}", Method::DELETE) => queue(Action::Manage),
        ("/queues/{queue}/messages" | "/queues/{queue}/messages/batch", Method::POST) => {
            queue(Action::Publish)
        }
        ("/queues/{queue}/redrive", _) => queue(Action::Publish),
        ("/queues/{queue}/grants", _) => queue(Action::Manage),
        (
            "/queues/{queue}/messages"
            | "/queues/{queue}/messages/{id}"
            | "/queues/{queue}/messages/{id}/nack"
            | "/queues/{queue}/messages/{id}/extend"
            | "/queues/{queue}/log"
            | "/queues/{queue}/groups/{group}"
            | "/queues/{queue}/groups/{group}/offset",
            _,
        ) => queue(Action::Consume),
        ("/exchanges/{exchange}", Method::POST) => exchange(Action::Create),
        ("/exchanges/{exchange}", Method::DELETE) => exchange(Action::Manage),
        ("/exchanges/{exchange}/bindings", _) => exchange(Action::Manage),
        _ => None,
    }
}

/// Everything a request needs: [`required`], plus consume on the dead-letter queue for a
/// redrive (it takes messages out of it). Seeing a queue that does not exist needs
/// nothing: the answer is its 404, as to the admin.
pub fn needs(broker: &Broker, method: &Method, route: &str, name: &str) -> Vec<(Action, Resource)> {
    let mut all: Vec<_> = required(method, route, name)
        .into_iter()
        .filter(|(action, _)| *action != Action::View || broker.queue_settings(name).is_ok())
        .collect();
    if route == "/queues/{queue}/redrive"
        && let Ok(settings) = broker.queue_settings(name)
    {
        all.push((
            Action::Consume,
            Resource::queue(&settings.dead_letter_name(name)),
        ));
    }
    all
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

/// True for routes anyone may call: the health check, `/auth/*`, and the console's static
/// files and the API document (they hold no data; the console logs in through the API).
fn is_public(route: Option<&str>) -> bool {
    route.is_some_and(|r| {
        matches!(r, "/healthz" | "/" | "/openapi.json")
            || r.starts_with("/auth/")
            || r.starts_with("/ui/")
    })
}

/// Checks the bearer token and the route policy on the decoded path parameters.
pub async fn middleware(
    State(state): State<HttpState>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    mut request: Request,
    next: Next,
) -> Response {
    let route = matched.as_ref().map(MatchedPath::as_str);
    let Some(store) = state.auth.clone().filter(|_| !is_public(route)) else {
        request.extensions_mut().insert(Caller(None));
        return next.run(request).await;
    };
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let user = match authenticate(&store, header) {
        Ok(user) => user,
        Err(error) => return error.into_response(),
    };
    if let Some(route) = route {
        let params = match params {
            Ok(params) => params,
            Err(rejection) => return ApiError::bad_request(rejection.body_text()).into_response(),
        };
        let name = params
            .iter()
            .find(|(key, _)| matches!(*key, "queue" | "exchange"))
            .map_or("", |(_, value)| value);
        for (action, resource) in needs(&state.broker, request.method(), route, name) {
            if let Err(error) = store.authorize(&user, action, &resource) {
                return refusal(&state.broker, action, &resource, error).into_response();
            }
        }
    }
    request.extensions_mut().insert(Caller(Some(user)));
    next.run(request).await
}

/// The answer to a refused `action` on `resource`: the 404 of a queue or exchange that
/// does not exist (no one but the admin holds rights on it, and a missing queue is no
/// secret: seeing one answers 404 too), else the refusal. Decided after the check failed,
/// so a resource made meanwhile is never used unchecked.
pub fn refusal(
    broker: &Broker,
    action: Action,
    resource: &Resource,
    refused: AuthError,
) -> ApiError {
    if action != Action::Create && matches!(refused, AuthError::Forbidden { .. }) {
        let missing = match resource {
            Resource::Queue(name) => broker.queue_settings(name).err(),
            Resource::Exchange(name) => broker.exchange_info(name).err(),
        };
        if let Some(missing) = missing {
            return missing.into();
        }
    }
    refused.into()
}

/// Whether `user` may see queue `queue` (in lists, its info); always with auth off.
pub fn may_view(auth: Option<&AuthStore>, user: Option<&str>, queue: &str) -> bool {
    allow(auth, user, &[Action::View], &Resource::queue(queue)).is_ok()
}

/// Before creating `queue`: one that exists already is answered (its info, or a 409
/// naming different settings) only to whoever may see it; others get 403.
pub fn check_existing_visible(
    auth: Option<&AuthStore>,
    user: Option<&str>,
    broker: &Broker,
    queue: &str,
) -> Result<(), ApiError> {
    if broker.queue_settings(queue).is_ok() {
        allow(auth, user, &[Action::View], &Resource::queue(queue))?;
    }
    Ok(())
}

/// `info` as `user` may see it: an exchange's owner (and the admin) sees every binding,
/// anyone else only the bindings to queues they may see.
pub fn visible_bindings(
    auth: Option<&AuthStore>,
    user: Option<&str>,
    mut info: crate::broker::ExchangeInfo,
) -> crate::broker::ExchangeInfo {
    if allow(
        auth,
        user,
        &[Action::Manage],
        &Resource::exchange(&info.name),
    )
    .is_err()
    {
        info.bindings.retain(|b| may_view(auth, user, &b.queue));
    }
    info
}

/// `Ok` if `user` may do every one of `actions` on `resource` (always with auth off).
fn allow(
    auth: Option<&AuthStore>,
    user: Option<&str>,
    actions: &[Action],
    resource: &Resource,
) -> Result<(), AuthError> {
    if let (Some(store), Some(user)) = (auth, user) {
        for action in actions {
            store.authorize(user, *action, resource)?;
        }
    }
    Ok(())
}

/// Before creating `queue` with `settings`: its dead-letter queue (named or the default
/// `{queue}.dlq`, also with `max_deliveries: 0`, since redrive reads it) must be one the
/// caller may publish to and consume from, unless it does not exist yet (the create makes
/// it and the caller owns it). An existing `queue` is not checked: creating it again
/// changes nothing.
pub fn check_dead_letter(
    auth: Option<&AuthStore>,
    user: Option<&str>,
    broker: &Broker,
    queue: &str,
    settings: &QueueSettings,
) -> Result<(), AuthError> {
    if broker.queue_settings(queue).is_ok() {
        return Ok(());
    }
    let dlq = settings.dead_letter_name(queue);
    if broker.queue_settings(&dlq).is_err() {
        return Ok(());
    }
    allow(
        auth,
        user,
        &[Action::Publish, Action::Consume],
        &Resource::queue(&dlq),
    )
}

/// The owner to record for what a create makes ([`Broker::create_queue_owned`],
/// [`Broker::create_exchange_owned`]): the caller, with authentication on.
pub fn creator<'u>(auth: Option<&AuthStore>, user: Option<&'u str>) -> Option<&'u str> {
    auth.and(user)
}

/// Checks a queue this call created, and its owner recorded with it, again: if the
/// dead-letter queue appeared meanwhile (made by someone else between the check and the
/// create) and the caller may not use it, the new queue is deleted again and the create
/// refused.
pub async fn check_created_queue(
    auth: Option<&AuthStore>,
    user: Option<&str>,
    broker: &Broker,
    queue: &str,
    created: &CreatedQueue,
) -> Result<(), ApiError> {
    let (Some(_), Some(user), true) = (auth, user, created.created) else {
        return Ok(());
    };
    let dlq_name = created.info.settings.dead_letter_name(queue);
    if created.dead_letter_created.is_none() && broker.queue_settings(&dlq_name).is_ok() {
        let dlq = Resource::queue(&dlq_name);
        if let Err(error) = allow(auth, Some(user), &[Action::Publish, Action::Consume], &dlq) {
            // The delete forgets the queue's owner in the same step.
            broker.delete_queue(queue).await?;
            return Err(error.into());
        }
    }
    Ok(())
}

/// The broker's dead-letter guard with auth on: dead letters of a queue may go into an
/// existing queue only if the source's owner may publish to and consume from it (a queue
/// without owner is the admin's). This holds the rule of [`check_dead_letter`] also when
/// the dead-letter queue was deleted and made again by someone else later.
pub fn dead_letter_guard(store: Arc<AuthStore>) -> crate::broker::DeadLetterGuard {
    Box::new(
        move |source, target| match store.owner(&Resource::queue(source)) {
            None => true,
            Some(owner) => allow(
                Some(&store),
                Some(&owner),
                &[Action::Publish, Action::Consume],
                &Resource::queue(target),
            )
            .is_ok(),
        },
    )
}

/// Checks that the caller may publish into the queue a binding targets.
pub fn check_bind_target(state: &HttpState, caller: &Caller, queue: &str) -> Result<(), ApiError> {
    Ok(allow(
        state.auth.as_deref(),
        caller.0.as_deref(),
        &[Action::Publish],
        &Resource::queue(queue),
    )?)
}

/// Checks that the caller may publish into every queue a message routes to (publishing
/// through an exchange needs no grant on the exchange itself). A target the caller may
/// not see is not named in the refusal: an exchange shows others only its bindings to
/// queues they may see.
pub fn check_route_targets(
    state: &HttpState,
    caller: &Caller,
    exchange: &str,
    targets: &[String],
) -> Result<(), ApiError> {
    for queue in targets {
        let Err(refused) = check_bind_target(state, caller, queue) else {
            continue;
        };
        let (auth, user) = (state.auth.as_deref(), caller.0.as_deref());
        return Err(if may_view(auth, user, queue) {
            refused
        } else {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "user `{}` may not publish to every queue exchange `{exchange}` routes this message to",
                    user.unwrap_or_default()
                ),
            )
        });
    }
    Ok(())
}

/// Runs password hashing (register, login) on the blocking pool, at most as many at once
/// as `state.hashing` allows; a request that waits longer than [`HASHING_WAIT`] for a slot
/// gets 429.
async fn hashing<T: Send + 'static>(
    state: &HttpState,
    work: impl FnOnce() -> Result<T, AuthError> + Send + 'static,
) -> Result<T, ApiError> {
    with_hashing_slot(&state.hashing, work).await
}

/// Runs `work` on the blocking pool once one of `slots` is free; 429 after [`HASHING_WAIT`].
async fn with_hashing_slot<T: Send + 'static>(
    slots: &Arc<Semaphore>,
    work: impl FnOnce() -> Result<T, AuthError> + Send + 'static,
) -> Result<T, ApiError> {
    let busy = || {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many logins and registrations at once; retry shortly",
        )
    };
    let permit = tokio::time::timeout(HASHING_WAIT, Arc::clone(slots).acquire_owned())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_error",
            e.to_string(),
        )
    })?;
    Ok(result?)
}

/// Body of register and login.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"username": "alice", "password": "correct horse battery"}))]
pub(crate) struct Credentials {
    /// User name.
    username: String,
    /// Password.
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
    super::object::parse(body)
}

/// `POST /auth/register`.
#[utoipa::path(post, path = "/auth/register", tag = "auth", description = "Create a user (with `--auth`).", request_body = Credentials, responses((status = 201, body = super::schema::Registered), super::schema::Errors))]
pub async fn register(
    State(state): State<HttpState>,
    body: Result<bytes::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let credentials: Credentials = parse(&super::error::body_bytes(body)?)?;
    crate::auth::check_username(&credentials.username)?;
    let username = credentials.username.clone();
    let record = hashing(&state, move || {
        store.new_user(&credentials.username, &credentials.password)
    })
    .await?;
    state.broker.create_user(&username, record).await?;
    Ok((StatusCode::CREATED, Json(json!({"username": username}))).into_response())
}

/// `POST /auth/login`.
#[utoipa::path(post, path = "/auth/login", tag = "auth", description = "Get a token (with `--auth`).", request_body = Credentials, responses((status = 200, body = super::schema::Token), super::schema::Errors))]
pub async fn login(
    State(state): State<HttpState>,
    client: Option<Extension<axum::extract::ConnectInfo<super::conn::ClientAddr>>>,
    body: Result<bytes::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let credentials: Credentials = parse(&super::error::body_bytes(body)?)?;
    crate::auth::check_username(&credentials.username)?;
    let client = client.map(|Extension(axum::extract::ConnectInfo(addr))| addr.0.ip());
    let token = hashing(&state, move || {
        store.login_from(&credentials.username, &credentials.password, client)
    })
    .await?;
    Ok((
        StatusCode::OK,
        Json(json!({"token": token, "token_type": "Bearer"})),
    )
        .into_response())
}

/// Body of a grant.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"user": "bob", "permissions": ["publish", "consume"]}))]
pub(crate) struct GrantBody {
    /// Who gets the permissions.
    user: String,
    /// `publish` and/or `consume`; empty revokes.
    #[schema(value_type = Vec<String>)]
    permissions: Vec<Permission>,
}

/// `POST /queues/{q}/grants`: the owner (or admin) lets `user` publish and/or consume;
/// an empty list revokes.
#[utoipa::path(post, path = "/queues/{queue}/grants", tag = "auth", params(("queue" = String, Path, description = "Queue name")), request_body = GrantBody, responses((status = 200, body = super::schema::Granted), super::schema::Errors))]
pub async fn grant(
    State(state): State<HttpState>,
    axum::extract::Path(queue): axum::extract::Path<String>,
    Extension(caller): Extension<Caller>,
    body: Result<bytes::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let request: GrantBody = parse(&super::error::body_bytes(body)?)?;
    state.broker.queue_info(&queue)?;
    let by = caller.0.unwrap_or_default();
    let resource = Resource::queue(&queue);
    if request.permissions.is_empty() {
        state.broker.revoke(&by, &resource, &request.user).await?;
    } else {
        state
            .broker
            .grant(&by, &resource, &request.user, &request.permissions)
            .await?;
    }
    let now: Vec<Permission> = store.permissions(&resource, &request.user);
    Ok((
        StatusCode::OK,
        Json(json!({"queue": queue, "user": request.user, "permissions": now})),
    )
        .into_response())
}

/// What the caller may do on a queue or an exchange, so that a client (the console) offers
/// only what will be allowed. With auth off everything is.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"user": "alice", "publish": true, "consume": true, "manage": false}))]
pub(crate) struct Allowed {
    /// The caller (`null` with auth off).
    user: Option<String>,
    /// May publish (for an exchange: always, the target queues decide).
    publish: bool,
    /// May receive, ack, replay, seek (never on an exchange).
    consume: bool,
    /// May delete, grant, bind.
    manage: bool,
}

fn may(state: &HttpState, caller: &Caller, action: Action, resource: &Resource) -> bool {
    allow(
        state.auth.as_deref(),
        caller.0.as_deref(),
        &[action],
        resource,
    )
    .is_ok()
}

/// `GET /queues/{q}/permissions`.
#[utoipa::path(get, path = "/queues/{queue}/permissions", tag = "auth", description = "What the caller may do on this queue.", params(("queue" = String, Path, description = "Queue name")), responses((status = 200, body = Allowed), super::schema::Errors))]
pub async fn queue_permissions(
    State(state): State<HttpState>,
    axum::extract::Path(queue): axum::extract::Path<String>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    state.broker.queue_settings(&queue)?;
    let resource = Resource::queue(&queue);
    let allowed = Allowed {
        user: caller.0.clone(),
        publish: may(&state, &caller, Action::Publish, &resource),
        consume: may(&state, &caller, Action::Consume, &resource),
        manage: may(&state, &caller, Action::Manage, &resource),
    };
    Ok(Json(allowed).into_response())
}

/// `GET /exchanges/{x}/permissions`.
#[utoipa::path(get, path = "/exchanges/{exchange}/permissions", tag = "auth", description = "What the caller may do on this exchange.", params(("exchange" = String, Path, description = "Exchange name")), responses((status = 200, body = Allowed), super::schema::Errors))]
pub async fn exchange_permissions(
    State(state): State<HttpState>,
    axum::extract::Path(exchange): axum::extract::Path<String>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    state.broker.exchange_info(&exchange)?;
    let resource = Resource::exchange(&exchange);
    let allowed = Allowed {
        user: caller.0.clone(),
        publish: true,
        consume: false,
        manage: may(&state, &caller, Action::Manage, &resource),
    };
    Ok(Json(allowed).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 19 item 8: password hashing never runs on more threads than it has slots; a
    /// login that finds every slot taken for [`HASHING_WAIT`] gets 429 instead of a thread.
    #[tokio::test]
    async fn hashing_waits_for_a_slot_then_gets_429() {
        let slots = Arc::new(Semaphore::new(1));
        let held = Arc::clone(&slots).acquire_owned().await.unwrap();
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        let refused = with_hashing_slot(&slots, move || {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
        .await
        .unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        drop(held);
        let value = with_hashing_slot(&slots, || Ok(7)).await.unwrap();
        assert_eq!(value, 7);
        assert_eq!(slots.available_permits(), 1);
    }

    #[test]
    fn policy_table() {
        let q = |a| Some((a, Resource::queue("jobs")));
        let need = |m: Method, route: &str| required(&m, route, "jobs");
        assert_eq!(need(Method::POST, "/queues/{queue}"), q(Action::Create));
        assert_eq!(need(Method::DELETE, "/queues/{queue}"), q(Action::Manage));
        assert_eq!(need(Method::GET, "/queues/{queue}"), q(Action::View));
        for route in ["/queues/{queue}/messages", "/queues/{queue}/messages/batch"] {
            assert_eq!(need(Method::POST, route), q(Action::Publish));
        }
        for (method, route) in [
            (Method::GET, "/queues/{queue}/messages"),
            (Method::DELETE, "/queues/{queue}/messages/{id}"),
            (Method::POST, "/queues/{queue}/messages/{id}/nack"),
            (Method::POST, "/queues/{queue}/messages/{id}/extend"),
            (Method::GET, "/queues/{queue}/log"),
            (Method::GET, "/queues/{queue}/groups/{group}"),
            (Method::DELETE, "/queues/{queue}/groups/{group}"),
            (Method::PUT, "/queues/{queue}/groups/{group}/offset"),
        ] {
            assert_eq!(need(method, route), q(Action::Consume), "{route}");
        }
        assert_eq!(
            need(Method::POST, "/queues/{queue}/redrive"),
            q(Action::Publish)
        );
        assert_eq!(
            need(Method::POST, "/queues/{queue}/grants"),
            q(Action::Manage)
        );
        assert_eq!(need(Method::GET, "/queues"), None);
        let x = |a| Some((a, Resource::exchange("jobs")));
        assert_eq!(
            need(Method::POST, "/exchanges/{exchange}"),
            x(Action::Create)
        );
        assert_eq!(
            need(Method::DELETE, "/exchanges/{exchange}"),
            x(Action::Manage)
        );
        assert_eq!(
            need(Method::POST, "/exchanges/{exchange}/bindings"),
            x(Action::Manage)
        );
        assert_eq!(need(Method::GET, "/exchanges/{exchange}"), None);
        assert_eq!(need(Method::POST, "/exchanges/{exchange}/messages"), None);
        assert_eq!(need(Method::GET, "/exchanges"), None);
    }
}
