//! The admin routes of access control: a network's policy (set, show, clear, history,
//! rollback), the verdict on one flow, and tag edits of nodes and workloads.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use meshlink_api::{self as api, NetworkFilter};
use meshlink_proto::policy::{Entity, Policy};

use super::auth::Actor;
use super::{detached, node_answer, time, workload_network, workload_view, AppState, HttpResult};
use crate::access::PolicyEdit;
use crate::handlers::policy::{self, Accepted};
use crate::handlers::{ApiError, Caller};
use crate::store::PolicyRecord;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/networks/{network}/policy",
            get(show_policy).post(set_policy).delete(clear_policy),
        )
        .route("/v1/networks/{network}/policy/history", get(history))
        .route("/v1/networks/{network}/policy/rollback", post(rollback))
        .route("/v1/policy/test", post(test_flow))
        .route("/v1/nodes/{reference}/tags", post(tag_node))
        .route("/v1/workloads/{name}/tags", post(tag_workload))
}

fn version_view(r: &PolicyRecord) -> api::PolicyVersion {
    let rules = r
        .source
        .as_deref()
        .and_then(|s| meshlink_proto::policy::parse(s).ok())
        .map_or(0, |f| f.rules.len() as u64);
    api::PolicyVersion {
        network: r.network.clone(),
        version: r.version,
        source: r.source.clone(),
        rules,
        author: r.author.clone(),
        created_at: time(r.created_at),
        restored: r.restored,
    }
}

fn changed_view(a: Accepted) -> api::PolicyChanged {
    api::PolicyChanged {
        policy: version_view(&a.record),
        map_version: api::MapVersion(a.map_version),
        warnings: a.warnings,
    }
}

async fn edit(
    s: &AppState,
    actor: Actor,
    network: String,
    edit: PolicyEdit,
) -> HttpResult<api::PolicyChanged> {
    let accepted = detached(s, move |svc| async move {
        svc.edit_policy(&network, edit, &actor.name).await
    })
    .await?;
    Ok(changed_view(accepted))
}

async fn set_policy(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(network): Path<String>,
    body: Result<Json<api::SetPolicy>, JsonRejection>,
) -> HttpResult<Json<api::PolicyChanged>> {
    let Json(body) = body?;
    Ok(Json(
        edit(&s, actor, network, PolicyEdit::Set(body.source)).await?,
    ))
}

async fn clear_policy(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(network): Path<String>,
) -> HttpResult<Json<api::PolicyChanged>> {
    Ok(Json(edit(&s, actor, network, PolicyEdit::Clear).await?))
}

async fn rollback(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(network): Path<String>,
    body: Result<Json<api::RollbackPolicy>, JsonRejection>,
) -> HttpResult<Json<api::PolicyChanged>> {
    let Json(body) = body?;
    Ok(Json(
        edit(&s, actor, network, PolicyEdit::Rollback(body.version)).await?,
    ))
}

async fn show_policy(
    State(s): State<AppState>,
    Path(network): Path<String>,
) -> HttpResult<Json<api::PolicyVersion>> {
    let history = s.service.policy_history(&network).await?;
    let current = history.last().ok_or_else(|| {
        ApiError::NotFound(format!(
            "network {network} has never had a policy: it is open"
        ))
    })?;
    Ok(Json(version_view(current)))
}

async fn history(
    State(s): State<AppState>,
    Path(network): Path<String>,
) -> HttpResult<Json<Vec<api::PolicyVersion>>> {
    let history = s.service.policy_history(&network).await?;
    Ok(Json(history.iter().map(version_view).collect()))
}

async fn test_flow(
    State(s): State<AppState>,
    body: Result<Json<api::TestFlow>, JsonRejection>,
) -> HttpResult<Json<api::FlowVerdict>> {
    let Json(body) = body?;
    let network = match body.network {
        Some(n) => String::from(n),
        None => network_of(&s, &body.from)?,
    };
    let map = s
        .service
        .hub()
        .map(&network)
        .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))?;
    let verdict = policy::test_flow(&Caller::Admin, &map, &body.from, &body.to, &body.port)?;
    let flow = format!("{} from {} to {}", body.port, body.from, body.to);
    Ok(Json(match verdict {
        None => api::FlowVerdict {
            network: network.clone(),
            allowed: true,
            policy_version: None,
            rule: None,
            reason: format!("allowed: network {network} has no policy, every flow is allowed"),
        },
        Some((p, Some(i))) => {
            let rule = rule_view(&p, i);
            let reason = format!(
                "allowed: {flow} by rule {} (line {}) of policy version {}",
                rule.number, rule.line, p.version
            );
            api::FlowVerdict {
                network,
                allowed: true,
                policy_version: Some(p.version),
                rule: Some(rule),
                reason,
            }
        }
        Some((p, None)) => api::FlowVerdict {
            network,
            allowed: false,
            policy_version: Some(p.version),
            rule: None,
            reason: format!(
                "denied: no rule of policy version {} allows {flow}",
                p.version
            ),
        },
    }))
}

fn rule_view(p: &Policy, index: usize) -> api::RuleView {
    let r = &p.rules[index];
    api::RuleView {
        number: index as u64 + 1,
        line: u64::from(r.line),
        from: r.from.iter().map(ToString::to_string).collect(),
        to: r.to.iter().map(ToString::to_string).collect(),
        ports: r.ports.iter().map(ToString::to_string).collect(),
    }
}

/// The one network where `name` is a node or workload.
fn network_of(s: &AppState, name: &str) -> Result<String, ApiError> {
    let mut found: Vec<String> = s
        .service
        .hub()
        .networks()
        .into_iter()
        .filter(|n| {
            s.service
                .hub()
                .map(n)
                .is_some_and(|m| Entity::resolve(&m, name).is_ok())
        })
        .collect();
    match found.len() {
        0 => Err(ApiError::NotFound(format!(
            "no network has a node or workload named {name:?}"
        ))),
        1 => Ok(found.remove(0)),
        _ => Err(ApiError::Conflict(format!(
            "{name:?} exists in networks {}: say which with --network",
            found.join(", ")
        ))),
    }
}

async fn tag_node(
    State(s): State<AppState>,
    Path(reference): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
    body: Result<Json<api::EditTags>, JsonRejection>,
) -> HttpResult<Json<api::Node>> {
    let Query(q) = q?;
    let Json(body) = body?;
    let node = detached(&s, move |svc| async move {
        svc.tag_node(&reference, q.network.as_deref(), &body.edits)
            .await
    })
    .await?;
    Ok(node_answer(&s, &node).await)
}

async fn tag_workload(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
    body: Result<Json<api::EditTags>, JsonRejection>,
) -> HttpResult<Json<api::Workload>> {
    let Query(q) = q?;
    let Json(body) = body?;
    let network = workload_network(&s, &name, q.network.map(String::from)).await?;
    let w = detached(&s, move |svc| async move {
        svc.tag_workload(&network, &name, &body.edits).await
    })
    .await?;
    Ok(Json(workload_view(&s, &w).await?))
}
