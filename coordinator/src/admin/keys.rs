//! The admin route of key rotation: `POST /v1/nodes/{ref}/rotate-key` (`?network=` when the
//! name is in several networks). It needs the admin role (every route not named otherwise in
//! `auth::required_role` does). For a node with an agent there is no body (or `{}`): the answer
//! is the node, with `rotation_asked` set; its agent is told at once when it has a session (see
//! `crate::keys`). For an external node the body names its new key
//! ([`api::RotateKey::public_key`]), which is its key at once.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::post;
use axum::{Json, Router};
use meshlink_api::{self as api, NetworkFilter};

use super::{detached, node_answer, AppState, HttpResult};
use crate::handlers::ApiError;

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/nodes/{reference}/rotate-key", post(rotate_key))
}

async fn rotate_key(
    State(s): State<AppState>,
    Path(reference): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
    body: Bytes,
) -> HttpResult<Json<api::Node>> {
    let Query(q) = q?;
    let body: api::RotateKey = if body.iter().all(u8::is_ascii_whitespace) {
        api::RotateKey::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::Invalid(format!("the request body: {e}")))?
    };
    let node = detached(&s, move |svc| async move {
        match body.public_key {
            Some(key) => {
                svc.rotate_external_key(&reference, q.network.as_deref(), key)
                    .await
            }
            None => svc.rotate_key(&reference, q.network.as_deref()).await,
        }
    })
    .await?;
    Ok(node_answer(&s, &node).await)
}
