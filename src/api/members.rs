//! `POST /cluster/nodes` and `DELETE /cluster/nodes/{id}`: adding a node to the cluster's
//! voters and removing one (see [`crate::cluster::membership`]). Any node takes the request
//! and forwards it to the metadata group's leader. With `--auth`, only the admin may.

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
            "only the admin adds or removes cluster nodes",
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
    let request: NodeBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))?;
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

/// `DELETE /cluster/nodes/{id}`: removes a node from the voters.
#[utoipa::path(delete, path = "/cluster/nodes/{id}", tag = "operations", description = "Removes a node from the cluster's voters. Admin only with `--auth`. 409 `membership_conflict` while the node holds queue replicas (they are not moved yet) or when fewer than 3 voters would be left; 404 `node_not_found` for a node that is no member. Stop the node afterwards.", params(("id" = u64, Path, description = "Node id")), responses((status = 204, description = "Removed"), Errors))]
pub(super) async fn remove_node(
    State(s): State<HttpState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let cluster = clustered(&s)?;
    admin_only(&s, &caller)?;
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{id}` is not a node id")))?;
    run(cluster, Change::Remove { id }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
