//! The admin routes of admin tokens (`/v1/admin-tokens`) and of the audit log (`/v1/audit`).
//! Only an admin token for every network reaches them (see [`super::auth`]).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use meshlink_api as api;

use super::auth::Actor;
use super::{time, AppState, HttpResult};
use crate::handlers::{hash_secret, validate_name, ApiError};
use crate::identity::random_secret;
use crate::store::{AdminTokenRecord, AuditQuery, AuditRecord, NewAdminToken, Role, StoreError};

/// The prefix of admin token secrets, so that one is recognised in a leak scan.
const SECRET_PREFIX: &str = "mla1_";

/// Entries `GET /v1/audit` returns without `limit`, and at most.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 10_000;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/admin-tokens", get(list).post(create))
        .route("/v1/admin-tokens/{id}", delete(revoke))
        .route("/v1/audit", get(audit_log))
}

fn role_of(r: api::Role) -> Role {
    match r {
        api::Role::Read => Role::Read,
        api::Role::Operator => Role::Operator,
        api::Role::Admin => Role::Admin,
    }
}

fn role_view(r: Role) -> api::Role {
    match r {
        Role::Read => api::Role::Read,
        Role::Operator => api::Role::Operator,
        Role::Admin => api::Role::Admin,
    }
}

fn token_view(t: &AdminTokenRecord) -> api::AdminToken {
    api::AdminToken {
        id: t.id,
        name: t.name.clone(),
        role: role_view(t.role),
        network: t.network.clone(),
        created_at: time(t.created_at),
        created_by: t.created_by.clone(),
        revoked_at: t.revoked_at.map(time),
    }
}

fn entry_view(e: AuditRecord) -> api::AuditEntry {
    api::AuditEntry {
        id: e.id,
        at: time(e.at),
        actor: e.actor,
        action: e.action,
        network: e.network,
        node: e.node,
        status: e.status,
        result: e.result,
        source: e.source,
    }
}

async fn create(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    body: Result<Json<api::CreateAdminToken>, JsonRejection>,
) -> HttpResult<(StatusCode, Json<api::CreatedAdminToken>)> {
    let Json(body) = body?;
    validate_name("admin token", &body.name)?;
    if body.name == "bootstrap" {
        return Err(
            ApiError::Conflict("the name bootstrap is the coordinator's own".into()).into(),
        );
    }
    if let Some(n) = &body.network {
        if s.service
            .store()
            .network(n)
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::NotFound(format!("no network named {n:?}")).into());
        }
    }
    let secret = format!("{SECRET_PREFIX}{}", random_secret());
    let record = s
        .service
        .store()
        .create_admin_token(NewAdminToken {
            name: body.name.clone(),
            secret_hash: hash_secret(&secret),
            role: role_of(body.role),
            network: body.network.map(String::from),
            created_at: s.service.now(),
            created_by: actor.name,
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                ApiError::Conflict(format!("an admin token named {:?} exists", body.name))
            }
            e => ApiError::from(e),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(api::CreatedAdminToken {
            admin_token: token_view(&record),
            token: secret,
        }),
    ))
}

async fn list(State(s): State<AppState>) -> HttpResult<Json<Vec<api::AdminToken>>> {
    let tokens = s
        .service
        .store()
        .admin_tokens()
        .await
        .map_err(ApiError::from)?;
    Ok(Json(tokens.iter().map(token_view).collect()))
}

async fn revoke(State(s): State<AppState>, Path(id): Path<String>) -> HttpResult<StatusCode> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::Invalid(format!("admin token id {id:?} is not a number")))?;
    let done = s
        .service
        .store()
        .revoke_admin_token(id, s.service.now())
        .await
        .map_err(ApiError::from)?;
    if done {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no admin token {id} that is not revoked already")).into())
    }
}

async fn audit_log(
    State(s): State<AppState>,
    q: Result<Query<api::AuditFilter>, QueryRejection>,
) -> HttpResult<Json<Vec<api::AuditEntry>>> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::Invalid(format!("limit: 1 to {MAX_LIMIT}")).into());
    }
    let entries = s
        .service
        .store()
        .audit(AuditQuery {
            since: q.since,
            node: q.node,
            limit,
        })
        .await
        .map_err(ApiError::from)?;
    Ok(Json(entries.into_iter().map(entry_view).collect()))
}
