//! The admin routes of external nodes (devices that run stock WireGuard, see
//! `crate::handlers::external`): `POST /v1/external-nodes` registers one (admin role),
//! `GET /v1/external-nodes/{ref}` (`?network=` when the name is in several networks) gives what
//! its WireGuard configuration needs (read role). Both answer [`api::ExternalNode`]; no
//! private key is ever part of either.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use meshlink_api::{self as api, NetworkFilter};

use super::{detached, names_by_id, node_view, AppState, HttpResult};
use crate::handlers::external::{External, NewExternal};
use crate::handlers::nodes::peer_info;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/external-nodes", post(create))
        .route("/v1/external-nodes/{reference}", get(show))
}

async fn create(
    State(s): State<AppState>,
    body: Result<Json<api::CreateExternalNode>, JsonRejection>,
) -> HttpResult<(StatusCode, Json<api::ExternalNode>)> {
    let Json(body) = body?;
    let req = NewExternal {
        network: body.network.to_string(),
        name: body.name.to_string(),
        public_key: body.public_key,
        via: body.via,
        tags: body.tags,
    };
    let added = detached(&s, move |svc| async move { svc.add_external(req).await }).await?;
    Ok((StatusCode::CREATED, Json(answer(&s, &added).await)))
}

async fn show(
    State(s): State<AppState>,
    Path(reference): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Json<api::ExternalNode>> {
    let Query(q) = q?;
    let found = s.service.external(&reference, q.network.as_deref()).await?;
    Ok(Json(answer(&s, &found).await))
}

/// `e` as the API shows it.
async fn answer(s: &AppState, e: &External) -> api::ExternalNode {
    let all = s
        .service
        .store()
        .nodes(Some(&e.node.network))
        .await
        .unwrap_or_default();
    let online = s.service.online_anywhere().await;
    let names = names_by_id(&all);
    api::ExternalNode {
        node: node_view(&e.node, &online, &s.service, &names),
        network_cidr: e.network.cidr,
        gateway: api::Gateway {
            id: api::NodeId(e.gateway.id),
            name: e.gateway.name.clone(),
            public_key: e.gateway.public_key,
            address: e.gateway.address,
            endpoints: peer_info(&e.gateway).endpoints,
            online: online.contains(&e.gateway.id),
        },
        network_cidr6: e.network.cidr6,
    }
}
