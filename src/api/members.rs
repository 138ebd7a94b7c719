//! `POST /cluster/nodes`, `DELETE /cluster/nodes/{id}` and `POST
//! /cluster/nodes/{id}/replace`: adding a node to the cluster's voters, removing one, and
//! replacing one by another (see [`crate::cluster::membership`]). Any node takes the
//! request and forwards it to the metadata group's leader. With `--auth`, only the admin
//! may.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::auth::Caller;
use super::error::{ApiError, body_bytes};
use super::schema::Errors;
use super::state::HttpState;
use crate::broker::BrokerError;
use crate::cluster::Cluster;
use crate::cluster::types::{Change, Command};

/// `POST /cluster/nodes`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"id": 4, "cluster": "127.0.0.1:7104"}))]
pub struct NodeBody {
    /// The new node's id (integer >= 1, not used before).
    pub id: u64,
    /// Its cluster listener, `HOST:PORT` (its `--cluster`).
    pub cluster: String,
}

/// The cluster of this node, or 404 `not_clustered`.
fn clustered(state: &HttpState) -> Result<&Cluster, ApiError> {
    state.cluster.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_clustered",
            "this node runs alone (started without --peers)",
        )
    })
}

/// With auth on, only the admin changes the cluster.
fn admin_only(state: &HttpState, caller: &Caller) -> Result<(), ApiError> {
    let Some(store) = state.auth.as_deref() else {
        return Ok(());
    };
    match caller.0.as_deref() {
        Some(user) if store.is_admin(user) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the admin adds, removes or replaces cluster nodes",
        )),
    }
}

/// Runs `change` through the metadata group's leader.
async fn run(cluster: &Cluster, change: Change) -> Result<(), ApiError> {
    let reply = cluster.execute(Command::Members(change), 0).await;
    reply
        .result
        .map(|_| ())
        .map_err(|e| BrokerError::from(e).into())
}

/// `POST /cluster/nodes`: adds a node as a voter once it caught up.
#[utoipa::path(post, path = "/cluster/nodes", tag = "operations", description = "Adds a node to the cluster: it catches up with the metadata as a learner, then votes. The node runs already (started with `--join`, or waiting). Admin only with `--auth`. 409 `membership_conflict` when the id is taken at another address, or the address by another member; 503 `no_leader` when it did not catch up in time.", request_body = NodeBody, responses((status = 200, description = "Added (or was a voter at that address already); the cluster now", body = crate::cluster::view::ClusterView), Errors))]
pub(super) async fn add_node(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    body: Result<bytes::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let cluster = clustered(&s)?;
    admin_only(&s, &caller)?;
    let bytes = body_bytes(body)?;
    let request: NodeBody = super::object::parse(&bytes)?;
    run(
        cluster,
        Change::Add {
            id: request.id,
            cluster: request.cluster,
        },
    )
    .await?;
    Ok(Json(cluster.view()).into_response())
}

/// A node id in a path.
fn node_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::bad_request(format!("`{id}` is not a node id")))
}

/// `DELETE /cluster/nodes/{id}`: removes a node from the voters.
#[utoipa::path(delete, path = "/cluster/nodes/{id}", tag = "operations", description = "Removes a node from the cluster's voters: it is marked as leaving (placement leaves it out), its queue groups move off it (by rendezvous) and, once it holds no replica, it leaves the metadata group. Admin only with `--auth`. 409 `membership_conflict` when fewer than 3 voters would be left; 404 `node_not_found` for a node that is no member; 503 `no_leader` when the moves took longer than 90 s (they go on: ask again to finish). Stop the node afterwards.", params(("id" = u64, Path, description = "Node id")), responses((status = 204, description = "Removed"), Errors))]
pub(super) async fn remove_node(
    State(s): State<HttpState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let cluster = clustered(&s)?;
    admin_only(&s, &caller)?;
    let id = node_id(&id)?;
    run(cluster, Change::Remove { id }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /cluster/nodes/{id}/replace`: replaces node `id` by the node in the body.
#[utoipa::path(post, path = "/cluster/nodes/{id}/replace", tag = "operations", description = "Replaces node `id` (typically one that lost its data, or is dead) by a new node, in one request: the new node (running, started with `--join`) is added as a learner, catches up and votes (a no-op when it joined by itself already), then node `id` is marked as leaving, its queue groups move off it (by rendezvous, onto the new node where it ranks) and it is removed. The same as `qit serve --replaces`, run from any node. Admin only with `--auth`. 400 `bad_request` for a malformed body or the same id; 404 `node_not_found` when node `id` is no member; 409 `membership_conflict` when the new id is a member at another address, or the address is another member's (node `id`'s included: the new node needs its own); 503 `no_leader` when the new node did not catch up in time, or the moves took longer than 90 s (they go on: ask again, or remove the old node, to finish). Asking again after the replacement is done answers 200.", params(("id" = u64, Path, description = "The id of the node replaced")), request_body = NodeBody, responses((status = 200, description = "Replaced: the new node votes, the old one is no member; the cluster now", body = crate::cluster::view::ClusterView), Errors))]
pub(super) async fn replace_node(
    State(s): State<HttpState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Result<bytes::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let cluster = clustered(&s)?;
    admin_only(&s, &caller)?;
    let old = node_id(&id)?;
    let bytes = body_bytes(body)?;
    let request: NodeBody = super::object::parse(&bytes)?;
    run(
        cluster,
        Change::Replace {
            old,
            id: request.id,
            cluster: request.cluster,
        },
    )
    .await?;
    Ok(Json(cluster.view()).into_response())
}
