//! The route table: the one list that both the HTTP router and the OpenAPI document
//! (`GET /openapi.json`) are built from, so neither can have a route the other lacks.
//!
//! Each entry is a `routes!(...)` of handlers annotated with `#[utoipa::path]`: the path and
//! methods in the annotation are the ones the router serves, and the annotation's parameters,
//! bodies and responses are the document's. `tests/openapi.rs` checks against a running
//! server that every documented operation is served and every other method on a documented
//! path answers 405, and that no route is added outside this table.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, SecurityRequirement};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use super::state::HttpState;
use super::{auth, console, http, members};

/// The document's fixed parts; the paths come from [`table`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "qit",
        description = "qit's HTTP API: queues, messages, consumer groups, exchanges, auth. \
            Errors are `{\"error\": {\"code\", \"message\"}}`. With `--auth`, every route but \
            `/healthz`, `/auth/*` and the console needs `Authorization: Bearer <token>`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    components(schemas(super::schema::ErrorBody, super::schema::ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "queues", description = "Create, inspect and delete queues; redrive dead letters"),
        (name = "messages", description = "Publish, receive, ack, nack, replay"),
        (name = "groups", description = "Consumer group state, seeking and deletion"),
        (name = "exchanges", description = "Routers that publish into bound queues"),
        (name = "auth", description = "Users, tokens, grants (with `--auth`)"),
        (name = "operations", description = "Health and metrics"),
        (name = "console", description = "The web console and this document"),
    )
)]
struct ApiDoc;

/// Adds the bearer-token scheme; security is optional (`{}`) since auth is off by default.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        doc.security = Some(vec![
            SecurityRequirement::default(),
            SecurityRequirement::new("bearer", Vec::<String>::new()),
        ]);
    }
}

/// POST routes whose body may be left out: a queue's settings, a redrive's limit, and a
/// message (an empty payload is a message too).
const OPTIONAL_BODIES: &[&str] = &[
    "/queues/{queue}",
    "/queues/{queue}/redrive",
    "/queues/{queue}/messages",
    "/exchanges/{exchange}/messages",
];

/// Marks the bodies of [`OPTIONAL_BODIES`] as not required (utoipa marks every body
/// required unless its type is an `Option`, which would also allow a JSON `null`).
struct OptionalBodies;

impl Modify for OptionalBodies {
    fn modify(&self, doc: &mut Document) {
        for path in OPTIONAL_BODIES {
            let body = doc
                .paths
                .paths
                .get_mut(*path)
                .and_then(|item| item.post.as_mut())
                .and_then(|op| op.request_body.as_mut());
            if let Some(utoipa::openapi::RefOr::T(body)) = body {
                body.required = Some(utoipa::openapi::Required::False);
            }
        }
    }
}

/// Every route: handlers sharing a path go in one `routes!`.
fn table() -> Vec<UtoipaMethodRouter<HttpState>> {
    vec![
        routes!(console::root),
        routes!(console::index),
        routes!(console::asset),
        routes!(openapi_json),
        routes!(http::healthz),
        routes!(http::cluster_view),
        routes!(members::add_node),
        routes!(members::remove_node),
        routes!(members::replace_node),
        routes!(http::metrics),
        routes!(http::list_queues),
        routes!(http::create_queue, http::queue_info, http::delete_queue),
        routes!(http::publish, http::receive),
        routes!(http::publish_batch),
        routes!(http::ack),
        routes!(http::nack),
        routes!(http::extend),
        routes!(http::redrive),
        routes!(http::read_log),
        routes!(http::group_info, http::delete_group),
        routes!(http::seek),
        routes!(auth::grant),
        routes!(auth::queue_permissions),
        routes!(http::list_exchanges),
        routes!(
            http::create_exchange,
            http::exchange_info,
            http::delete_exchange
        ),
        routes!(http::bind, http::unbind),
        routes!(http::publish_to_exchange),
        routes!(auth::exchange_permissions),
        small_body(routes!(auth::register)),
        small_body(routes!(auth::login)),
    ]
}

/// Login and registration bodies are small: a flood of big ones costs nothing.
fn small_body(
    (schemas, paths, router): UtoipaMethodRouter<HttpState>,
) -> UtoipaMethodRouter<HttpState> {
    let router = router.layer(DefaultBodyLimit::max(auth::AUTH_BODY_LIMIT));
    (schemas, paths, router)
}

/// The router and the document, both from [`table`].
fn build() -> (Router<HttpState>, Document) {
    let (router, mut doc) = table()
        .into_iter()
        .fold(
            OpenApiRouter::with_openapi(ApiDoc::openapi()),
            OpenApiRouter::routes,
        )
        .split_for_parts();
    // After the paths are in: `ApiDoc`'s own modifiers run before.
    OptionalBodies.modify(&mut doc);
    (router, doc)
}

/// The OpenAPI document of every route (built once).
pub fn openapi() -> &'static Document {
    static DOC: OnceLock<Document> = OnceLock::new();
    DOC.get_or_init(|| build().1)
}

/// `(METHOD, path)` of every route the router serves, as the table registers them.
pub fn route_list() -> Vec<(String, String)> {
    let mut list = Vec::new();
    for (_, paths, _) in table() {
        for (path, item) in paths.paths {
            for method in methods_of(&item) {
                list.push((method.to_string(), path.clone()));
            }
        }
    }
    list.sort();
    list
}

/// The methods a path item has operations for.
pub fn methods_of(item: &utoipa::openapi::PathItem) -> Vec<&'static str> {
    [
        ("GET", &item.get),
        ("PUT", &item.put),
        ("POST", &item.post),
        ("DELETE", &item.delete),
        ("PATCH", &item.patch),
        ("HEAD", &item.head),
        ("OPTIONS", &item.options),
        ("TRACE", &item.trace),
    ]
    .into_iter()
    .filter(|(_, op)| op.is_some())
    .map(|(name, _)| name)
    .collect()
}

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "console",
    description = "This document: OpenAPI 3.1 of every route, generated from the handlers.",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object), super::schema::Errors))]
pub(super) async fn openapi_json() -> Response {
    match openapi().to_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(error) => super::error::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "internal_error",
            error.to_string(),
        )
        .into_response(),
    }
}

/// The router with every route of [`table`], the JSON fallbacks, auth, a starting cluster
/// node's wait for the metadata ([`super::catch_up`]) and the body limit.
pub fn router(state: HttpState, max_body_bytes: usize) -> Router {
    build()
        .0
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(axum::middleware::map_response(super::error::json_errors))
        .layer(axum::middleware::from_fn(super::request_checks::middleware))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::middleware,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::catch_up::middleware,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}
