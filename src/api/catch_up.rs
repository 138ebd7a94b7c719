//! On a cluster node, a request is served from a confirmed view of the metadata: on a node
//! that has just started, or was paused or cut off, it waits until the node has caught up
//! (bounded; see `cluster::metadata_catch_up`), so that none is served from the queues,
//! bindings, users and grants of before: over HTTP a middleware, over gRPC a layer (per
//! call: a stream's later messages go on as they are). A node still known to be behind at
//! the end of the wait answers 503 `catching_up` (gRPC `UNAVAILABLE`) with `Retry-After`.
//! `/healthz` and `/metrics` answer at once.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;

use super::error::ApiError;
use super::state::HttpState;
use crate::cluster::Cluster;

/// Routes that answer at once: they report on the node, catching up included.
const AT_ONCE: &[&str] = &["/healthz", "/metrics"];

/// The HTTP middleware: waits for the node to catch up, then runs the route.
pub async fn middleware(
    State(state): State<HttpState>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched.as_ref().map(MatchedPath::as_str);
    if let Some(cluster) = &state.cluster
        && !route.is_some_and(|r| AT_ONCE.contains(&r))
        && let Err(behind) = cluster.metadata_ready().await
    {
        return ApiError::from(behind).into_response();
    }
    next.run(request).await
}

/// The gRPC layer of a cluster node: every call waits for the node to catch up (a single
/// node has no such layer).
#[derive(Clone)]
pub struct CatchUpLayer(pub Arc<Cluster>);

impl<S> tower::Layer<S> for CatchUpLayer {
    type Service = CatchUp<S>;

    fn layer(&self, inner: S) -> CatchUp<S> {
        CatchUp {
            inner,
            cluster: Arc::clone(&self.0),
        }
    }
}

/// A service behind [`CatchUpLayer`].
#[derive(Clone)]
pub struct CatchUp<S> {
    inner: S,
    cluster: Arc<Cluster>,
}

impl<S, R, B> tower::Service<R> for CatchUp<S>
where
    S: tower::Service<R, Response = axum::http::Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    R: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        // The service made ready is the one to call; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Boxed on its own, so that the async block below holds no deep future (the
        // router's and the wait's together overflowed the compiler's query depth in a
        // release build). It does nothing before it is polled, after the wait.
        let call: BoxFuture<'static, Result<S::Response, S::Error>> = Box::pin(inner.call(request));
        let cluster = Arc::clone(&self.cluster);
        Box::pin(async move {
            match cluster.metadata_ready().await {
                Ok(()) => call.await,
                Err(behind) => Ok(tonic::Status::from(ApiError::from(behind)).into_http()),
            }
        })
    }
}
