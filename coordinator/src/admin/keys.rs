//! The admin route of key rotation: `POST /v1/nodes/{ref}/rotate-key` (`?network=` when the
//! name is in several networks). It needs the admin role (every route not named otherwise in
//! `auth::required_role` does). The answer is the node, with `rotation_asked` set; its agent
//! is told at once when it has a session (see `crate::keys`).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::post;
use axum::{Json, Router};
use meshlink_api::{self as api, NetworkFilter};

use super::{detached, node_answer, AppState, HttpResult};

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/nodes/{reference}/rotate-key", post(rotate_key))
}

async fn rotate_key(
    State(s): State<AppState>,
    Path(reference): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Json<api::Node>> {
    let Query(q) = q?;
    let node = detached(&s, move |svc| async move {
        svc.rotate_key(&reference, q.network.as_deref()).await
    })
    .await?;
    Ok(node_answer(&s, &node).await)
}
