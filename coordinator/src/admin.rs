//! The admin HTTP API (axum), for `meshctl` and operators.
//!
//! Every route needs `Authorization: Bearer <admin token>` (the bootstrap token, or one made
//! with `POST /v1/admin-tokens`, whose role and network decide what it may do: see
//! [`auth`]); bodies are JSON; errors are `{"error": "message"}` with status 400 (invalid
//! request), 401 (missing or wrong token), 403 (the token's role or network does not allow
//! it), 404 (no such thing), 409 (conflict or refused by state) or 500. Changes and refusals
//! are recorded in the audit log. Times are Unix seconds
//! (integers); absent times are `null`.
//!
//! Request bodies and answers are the types of [`meshlink_api`], which `meshctl` reads too;
//! this module only converts store records into them.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/networks` [`api::CreateNetwork`] | 201 [`api::Network`] |
//! | `GET /v1/networks` | `[`[`api::Network`]`]` |
//! | `POST /v1/tokens` [`api::CreateToken`] | 201 [`api::CreatedToken`] (the only time the token text is shown); without `uses` or `expires_in_secs` a token allows one join within an hour, `"uses": "unlimited"` and `"expires_in_secs": "never"` lift them |
//! | `GET /v1/tokens` | `[`[`api::Token`]`]` |
//! | `DELETE /v1/tokens/{id}` | 204 |
//! | `GET /v1/nodes[?network=N]` | `[`[`api::Node`]`]` |
//! | `GET /v1/nodes/{ref}[?network=N]` | [`api::Node`]; `ref` is an id or a name |
//! | `POST /v1/nodes/{ref}/revoke[?network=N]` | [`api::Node`] |
//! | `POST /v1/nodes/{ref}/rotate-key[?network=N]` [[`api::RotateKey`]] | [`api::Node`] with `rotation_asked`; its agent makes a new key pair and switches to it (see `crate::keys`); an external node's body names its new public key, its key at once |
//! | `POST /v1/external-nodes` [`api::CreateExternalNode`] | 201 [`api::ExternalNode`]: a device that runs stock WireGuard, reached through its gateway `via` (see `crate::handlers::external`) |
//! | `GET /v1/external-nodes/{ref}[?network=N]` | [`api::ExternalNode`]: what its WireGuard configuration needs |
//! | `DELETE /v1/nodes/{ref}[?network=N]` | 204 |
//! | `POST /v1/workloads` [`api::CreateWorkload`] | 201 [`api::Workload`] |
//! | `GET /v1/workloads[?network=N]` | `[`[`api::Workload`]`]` |
//! | `GET /v1/workloads/{name}[?network=N]` | [`api::Workload`] |
//! | `DELETE /v1/workloads/{name}[?network=N]` | 204 |
//! | `POST /v1/workloads/{name}/attach[?network=N]` [`api::MoveWorkload`] | [`api::MovedWorkload`] |
//! | `POST /v1/workloads/{name}/move[?network=N]` [`api::MoveWorkload`] | [`api::MovedWorkload`] (the same operation as attach) |
//! | `POST /v1/workloads/{name}/detach[?network=N]` | [`api::MovedWorkload`] |
//! | `GET /v1/status` | [`api::Status`] |
//! | `POST /v1/networks/{network}/policy` [`api::SetPolicy`] | [`api::PolicyChanged`]; 400 names the line and field of a bad file, or the `[[test]]`s that fail |
//! | `GET /v1/networks/{network}/policy` | [`api::PolicyVersion`] in force; 404 when the network never had one |
//! | `DELETE /v1/networks/{network}/policy` | [`api::PolicyChanged`]: a new version with no policy (open) |
//! | `GET /v1/networks/{network}/policy/history` | `[`[`api::PolicyVersion`]`]`, oldest first |
//! | `POST /v1/networks/{network}/policy/rollback` [`api::RollbackPolicy`] | [`api::PolicyChanged`] |
//! | `POST /v1/policy/test` [`api::TestFlow`] | [`api::FlowVerdict`] |
//! | `POST /v1/nodes/{ref}/tags[?network=N]` [`api::EditTags`] | [`api::Node`] |
//! | `POST /v1/workloads/{name}/tags[?network=N]` [`api::EditTags`] | [`api::Workload`] |
//! | `POST /v1/admin-tokens` [`api::CreateAdminToken`] | 201 [`api::CreatedAdminToken`] (the only time the secret is shown) |
//! | `GET /v1/admin-tokens` | `[`[`api::AdminToken`]`]` |
//! | `DELETE /v1/admin-tokens/{id}` | 204 |
//! | `GET /v1/audit[?since=T&node=N&limit=L]` | `[`[`api::AuditEntry`]`]`, oldest first |
//! | `GET /v1/relays` | [`api::Relays`]: the embedded relay (on or off, address, transports) and the standalone relays of `[[relays]]` (name, address, fingerprint, region, provider, whether granted) |
//! | `GET /metrics` | the metrics in Prometheus's text format (read role, every network; see [`crate::telemetry`]) |
//!
//! `?network=` ([`api::NetworkFilter`]) may be left out on the routes of one node or one
//! workload when the name exists in exactly one network; a name used in several networks is a
//! 409 that names them.
//!
//! Each route is a thin adapter: it calls a handler from [`crate::handlers`] (through
//! [`Service`] when live sessions must learn of the change) and converts the result.

mod audit;
mod auth;
mod external;
mod keys;
mod metrics;
mod policy;
mod relays;
mod topology;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use meshlink_api::{self as api, NetworkFilter};
use meshlink_proto::token::JoinToken;
use meshlink_proto::NodeId;
use sha2::{Digest, Sha256};

use crate::handlers::networks::{self, CreateNetwork};
use crate::handlers::nodes::{self, peer_info};
use crate::handlers::tokens::{self, is_expired, CreateToken};
use crate::handlers::workloads::{self, CreateWorkload};
use crate::handlers::{ApiError, Caller};
use crate::reflect::ReflectCounters;
use crate::relay::{Relay, RelayStats};
use crate::service::{MoveOutcome, Service};
use crate::session::Connections;
use crate::store::{NetworkRecord, NodeRecord, TokenId, TokenRecord, UnixTime, WorkloadRecord};

/// What the admin API needs besides the service.
#[derive(Debug, Clone)]
pub struct AdminContext {
    /// The admin token.
    pub admin_token: String,
    /// The QUIC address the coordinator listens on.
    pub quic_listen: SocketAddr,
    /// The `host:port` put in join tokens.
    pub advertise: String,
    /// The mesh's other coordinators (`host:port`), put in join tokens after `advertise`.
    pub others: Vec<String>,
    /// The certificate fingerprint put in join tokens.
    pub fingerprint: String,
    /// When the coordinator started.
    pub started: Instant,
    /// The relay, when on.
    pub relay: Option<Arc<Relay>>,
    /// The reflexive address responder's bound address and counters, when on.
    pub reflect: Option<(SocketAddr, Arc<ReflectCounters>)>,
    /// The agent connections, for the metrics; `None`: not counted.
    pub connections: Option<Arc<Connections>>,
    /// The address of the TCP (TLS) listener for agents, when it is on.
    pub tcp_listen: Option<SocketAddr>,
    /// The standalone relays of the configuration's `[[relays]]`.
    pub relays: Vec<meshlink_proto::relay::RelayInfo>,
    /// The mesh's coordinators as relays (a mesh of several; empty otherwise:
    /// [`crate::relay::coordinator_relays`]).
    pub coordinator_relays: Vec<meshlink_proto::relay::RelayInfo>,
    /// The relay sessions served on this coordinator's port (a mesh of several).
    pub relay_sessions: Option<Arc<meshlink_relay::sessions::Sessions>>,
}

impl AdminContext {
    /// What this coordinator relayed: its relay's counts and, in a mesh of several, those of
    /// the relay sessions on its port, together; `None` when its relay is off.
    pub fn relay_stats(&self) -> Option<RelayStats> {
        let own = self.relay.as_ref()?.stats();
        Some(
            self.relay_sessions
                .as_ref()
                .map_or(own, |s| own + s.relay().stats()),
        )
    }
}

#[derive(Debug, Clone)]
struct AppState {
    service: Arc<Service>,
    token_hash: [u8; 32],
    ctx: Arc<AdminContext>,
}

/// Runs a change through the service on its own task, so that a client that goes away mid-
/// request (which drops the handler) cannot cut a change between its database commit and
/// the delta that tells the agents.
async fn detached<T, F>(s: &AppState, op: impl FnOnce(Arc<Service>) -> F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
{
    tokio::spawn(op(s.service.clone()))
        .await
        .unwrap_or_else(|e| Err(ApiError::Refused(format!("the operation failed: {e}"))))
}

/// An error on its way to becoming a JSON response.
#[derive(Debug)]
struct HttpError(StatusCode, String);

/// The HTTP status an [`ApiError`] is answered with (and recorded with in the audit log).
pub fn status_of(e: &ApiError) -> u16 {
    let status = match e {
        ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
        ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::Conflict(_) | ApiError::Refused(_) => StatusCode::CONFLICT,
        ApiError::Internal(inner) if inner.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    status.as_u16()
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        match &e {
            ApiError::Internal(inner) if inner.is_unavailable() => {
                tracing::warn!("admin request refused: {inner}");
            }
            ApiError::Internal(inner) => tracing::error!("admin request failed: {inner}"),
            _ => {}
        }
        let status =
            StatusCode::from_u16(status_of(&e)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        HttpError(status, e.public_message())
    }
}

impl From<JsonRejection> for HttpError {
    fn from(e: JsonRejection) -> Self {
        HttpError(StatusCode::BAD_REQUEST, e.body_text())
    }
}

impl From<QueryRejection> for HttpError {
    fn from(e: QueryRejection) -> Self {
        HttpError(StatusCode::BAD_REQUEST, e.body_text())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(api::ErrorBody { error: self.1 })).into_response()
    }
}

type HttpResult<T> = Result<T, HttpError>;

/// The admin API's router, with the bearer-token check on every route.
pub fn router(service: Arc<Service>, ctx: AdminContext) -> Router {
    let token_hash: [u8; 32] = Sha256::digest(ctx.admin_token.as_bytes()).into();
    let state = AppState {
        service,
        token_hash,
        ctx: Arc::new(ctx),
    };
    let api = Router::new()
        .route("/v1/networks", post(create_network).get(list_networks))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{reference}", get(show_node).delete(delete_node))
        .route("/v1/nodes/{reference}/revoke", post(revoke_node))
        .route("/v1/workloads", post(create_workload).get(list_workloads))
        .route(
            "/v1/workloads/{name}",
            get(show_workload).delete(delete_workload),
        )
        .route("/v1/workloads/{name}/attach", post(move_workload))
        .route("/v1/workloads/{name}/move", post(move_workload))
        .route("/v1/workloads/{name}/detach", post(detach_workload))
        .route("/v1/status", get(status))
        .merge(policy::routes())
        .merge(audit::routes())
        .merge(keys::routes())
        .merge(external::routes())
        .merge(relays::routes())
        .merge(metrics::routes())
        .merge(topology::routes())
        .fallback(|| async { HttpError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        // The gate reads the body itself (up to its own limit), for the audit log.
        .layer(axum::extract::DefaultBodyLimit::max(auth::MAX_BODY))
        .with_state(state.clone());
    topology::page_routes()
        .with_state(state)
        .merge(api)
        // Outermost, so that refusals count too; applied per route, so it sees the template.
        .layer(middleware::from_fn(metrics::count_request))
}

async fn create_network(
    State(s): State<AppState>,
    body: Result<Json<api::CreateNetwork>, JsonRejection>,
) -> HttpResult<(StatusCode, Json<api::Network>)> {
    let Json(body) = body?;
    let req = CreateNetwork::from(body);
    let net = detached(&s, |svc| async move { svc.create_network(req).await }).await?;
    Ok((StatusCode::CREATED, Json(network_view(&s, &net, 0, 0))))
}

async fn list_networks(State(s): State<AppState>) -> HttpResult<Json<Vec<api::Network>>> {
    let store = s.service.store();
    let nets = networks::list_networks(store, &Caller::Admin).await?;
    let all = nodes::list_nodes(store, &Caller::Admin, None).await?;
    let online = s.service.online_anywhere().await;
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for n in all.iter().filter(|n| !n.revoked) {
        let c = counts.entry(n.network.as_str()).or_default();
        c.0 += 1;
        c.1 += usize::from(online.contains(&n.id));
    }
    let views = nets
        .iter()
        .map(|net| {
            let (nodes, online) = counts.get(net.name.as_str()).copied().unwrap_or((0, 0));
            network_view(&s, net, nodes, online)
        })
        .collect();
    Ok(Json(views))
}

fn network_view(s: &AppState, net: &NetworkRecord, nodes: usize, online: usize) -> api::Network {
    // The hub's version is the live one; the record's may be older in a list.
    let version = s
        .service
        .hub()
        .version(&net.name)
        .unwrap_or(net.version)
        .max(net.version);
    api::Network {
        name: net.name.clone(),
        cidr: net.cidr,
        cidr6: net.cidr6,
        version: api::MapVersion(version),
        nodes: count(nodes),
        online: count(online),
        created_at: time(net.created_at),
    }
}

async fn create_token(
    State(s): State<AppState>,
    body: Result<Json<api::CreateToken>, JsonRejection>,
) -> HttpResult<(StatusCode, Json<api::CreatedToken>)> {
    let Json(body) = body?;
    let req = CreateToken::from(body);
    let (t, secret) = detached(&s, |svc| async move { svc.create_token(req).await }).await?;
    let text = JoinToken::new(
        std::iter::once(s.ctx.advertise.clone()).chain(s.ctx.others.iter().cloned()),
        s.ctx.fingerprint.clone(),
        secret,
    )
    .ok_or_else(|| {
        HttpError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no coordinator address to put in the token".into(),
        )
    })?
    .encode();
    let view = api::CreatedToken {
        id: api::TokenId(t.id),
        token: text,
        network: t.network,
        tags: t.tags,
        expires_at: t.expires_at.map(time),
        uses: t.max_uses,
        used: t.used,
    };
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list_tokens(State(s): State<AppState>) -> HttpResult<Json<Vec<api::Token>>> {
    let now = s.service.now();
    let list = tokens::list_tokens(s.service.store(), &Caller::Admin).await?;
    Ok(Json(list.iter().map(|t| token_view(t, now)).collect()))
}

fn token_view(t: &TokenRecord, now: UnixTime) -> api::Token {
    api::Token {
        id: api::TokenId(t.id),
        network: t.network.clone(),
        tags: t.tags.clone(),
        expires_at: t.expires_at.map(time),
        uses: t.max_uses,
        used: t.used,
        revoked: t.revoked,
        expired: is_expired(t, now),
        created_at: time(t.created_at),
    }
}

async fn revoke_token(State(s): State<AppState>, Path(id): Path<String>) -> HttpResult<StatusCode> {
    let id: TokenId = id.parse().map_err(|_| {
        HttpError(
            StatusCode::BAD_REQUEST,
            format!("token id {id:?} is not a number"),
        )
    })?;
    detached(&s, move |svc| async move { svc.revoke_token(id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_nodes(
    State(s): State<AppState>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Json<Vec<api::Node>>> {
    let Query(q) = q?;
    let list = nodes::list_nodes(s.service.store(), &Caller::Admin, q.network.as_deref()).await?;
    let online = s.service.online_anywhere().await;
    let names = names_by_id(&list);
    Ok(Json(
        list.iter()
            .map(|n| node_view(n, &online, &s.service, &names))
            .collect(),
    ))
}

async fn show_node(
    State(s): State<AppState>,
    Path(reference): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Json<api::Node>> {
    let Query(q) = q?;
    let node = nodes::find_node(
        s.service.store(),
        &Caller::Admin,
        &reference,
        q.network.as_deref(),
    )
    .await?;
    Ok(node_answer(&s, &node).await)
}

async fn revoke_node(
    State(s): State<AppState>,
    Path(reference): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Json<api::Node>> {
    let Query(q) = q?;
    let node = detached(&s, move |svc| async move {
        svc.revoke_node(&reference, q.network.as_deref()).await
    })
    .await?;
    Ok(node_answer(&s, &node).await)
}

async fn delete_node(
    State(s): State<AppState>,
    Path(reference): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<StatusCode> {
    let Query(q) = q?;
    detached(&s, move |svc| async move {
        svc.delete_node(&reference, q.network.as_deref()).await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A node as an answer: its view, with the names of its network's nodes for its path report.
async fn node_answer(s: &AppState, node: &NodeRecord) -> Json<api::Node> {
    let all = s
        .service
        .store()
        .nodes(Some(&node.network))
        .await
        .unwrap_or_default();
    Json(node_view(
        node,
        &s.service.online_anywhere().await,
        &s.service,
        &names_by_id(&all),
    ))
}

/// Node names by id, for the peers named in path reports.
fn names_by_id(all: &[NodeRecord]) -> HashMap<NodeId, &str> {
    all.iter().map(|n| (n.id, n.name.as_str())).collect()
}

/// `n` as the API shows it; `names` names the peers in its path report.
fn node_view(
    n: &NodeRecord,
    online: &HashSet<NodeId>,
    service: &Service,
    names: &HashMap<NodeId, &str>,
) -> api::Node {
    let paths = service.paths().get(n.id).map(|r| api::NodePaths {
        reported_at: time(r.at),
        peers: r
            .paths
            .into_iter()
            .map(|p| api::PeerPath {
                peer: api::NodeId(p.peer),
                peer_name: names.get(&p.peer).map(|n| (*n).to_owned()),
                kind: p.kind,
                via: p.via,
                over: p.over,
                relay: p.relay,
                rtt_us: p.rtt_us,
                changed_secs_ago: p.changed_secs_ago,
            })
            .collect(),
    });
    api::Node {
        id: api::NodeId(n.id),
        name: n.name.clone(),
        network: n.network.clone(),
        address: n.address,
        public_key: n.public_key,
        labels: n.labels.clone(),
        tags: n.tags.clone(),
        endpoints: peer_info(n).endpoints,
        online: online.contains(&n.id),
        last_seen: n.last_seen.map(time),
        revoked: n.revoked,
        created_at: time(n.created_at),
        key_since: Some(time(n.key_since)),
        next_key: n.next_key,
        rotation_asked: n.rotation_asked.map(time),
        expires_at: nodes::expires_at(
            n,
            service.key_settings().node_expiry,
            online.contains(&n.id),
        )
        .map(time),
        expired_at: n.expired_at.map(time),
        paths,
        via: n.via.map(|v| {
            names
                .get(&v)
                .map_or_else(|| v.to_string(), |n| (*n).to_owned())
        }),
        address6: n.address6,
    }
}

async fn create_workload(
    State(s): State<AppState>,
    body: Result<Json<api::CreateWorkload>, JsonRejection>,
) -> HttpResult<(StatusCode, Json<api::Workload>)> {
    let Json(body) = body?;
    let req = CreateWorkload::from(body);
    let w = detached(&s, |svc| async move { svc.create_workload(req).await }).await?;
    let view = workload_view(&s, &w).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list_workloads(
    State(s): State<AppState>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Json<Vec<api::Workload>>> {
    let Query(q) = q?;
    let store = s.service.store();
    if let Some(name) = q.network.as_deref() {
        // As for nodes: an unknown network is a 404, not an empty list.
        if store.network(name).await.map_err(ApiError::from)?.is_none() {
            return Err(ApiError::NotFound(format!("no network named {name:?}")).into());
        }
    }
    let list = workloads::list_workloads(store, &Caller::Admin, q.network.as_deref()).await?;
    let names = node_names(&s, q.network.as_deref()).await?;
    let online = s.service.online_anywhere().await;
    Ok(Json(
        list.iter()
            .map(|w| render_workload(w, &names, &online))
            .collect(),
    ))
}

async fn show_workload(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Json<api::Workload>> {
    let Query(q) = q?;
    let network = workload_network(&s, &name, q.network.map(String::from)).await?;
    let w = workloads::find_workload(s.service.store(), &network, &name).await?;
    Ok(Json(workload_view(&s, &w).await?))
}

async fn delete_workload(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<StatusCode> {
    let Query(q) = q?;
    let network = workload_network(&s, &name, q.network.map(String::from)).await?;
    let (net, n) = (network.clone(), name.clone());
    detached(
        &s,
        move |svc| async move { svc.delete_workload(&net, &n).await },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Attach and move: both give the workload to the node in the body.
async fn move_workload(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
    body: Result<Json<api::MoveWorkload>, JsonRejection>,
) -> HttpResult<Json<api::MovedWorkload>> {
    let Query(q) = q?;
    let Json(body) = body?;
    let network = workload_network(&s, &name, q.network.map(String::from)).await?;
    let (net, n) = (network.clone(), name.clone());
    let outcome = detached(&s, move |svc| async move {
        if body.live {
            svc.migrate_workload(&net, &n, &body.node).await
        } else {
            svc.move_workload(&net, &n, Some(&body.node)).await
        }
    })
    .await?;
    Ok(Json(moved_view(&s, outcome).await?))
}

async fn detach_workload(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Json<api::MovedWorkload>> {
    let Query(q) = q?;
    let network = workload_network(&s, &name, q.network.map(String::from)).await?;
    let (net, n) = (network.clone(), name.clone());
    let outcome = detached(&s, move |svc| async move {
        svc.move_workload(&net, &n, None).await
    })
    .await?;
    Ok(Json(moved_view(&s, outcome).await?))
}

/// The network of the workload `name`: the one given, or else the only network that has a
/// workload of that name.
///
/// # Errors
/// 404 when no network has it, 409 naming the networks when several do.
async fn workload_network(s: &AppState, name: &str, network: Option<String>) -> HttpResult<String> {
    if let Some(network) = network {
        return Ok(network);
    }
    let all = workloads::list_workloads(s.service.store(), &Caller::Admin, None).await?;
    let mut found: Vec<String> = all
        .into_iter()
        .filter(|w| w.name == name)
        .map(|w| w.network)
        .collect();
    match found.len() {
        0 => Err(ApiError::NotFound(format!("no workload named {name:?}")).into()),
        1 => Ok(found.remove(0)),
        _ => Err(ApiError::Conflict(format!(
            "workload name {name:?} exists in networks {}; say which with ?network=",
            found.join(", ")
        ))
        .into()),
    }
}

/// Names of the nodes of one network (or of all), by id, for rendering workloads.
async fn node_names(s: &AppState, network: Option<&str>) -> HttpResult<HashMap<NodeId, String>> {
    let list = s
        .service
        .store()
        .nodes(network)
        .await
        .map_err(ApiError::from)?;
    Ok(list.into_iter().map(|n| (n.id, n.name)).collect())
}

async fn workload_view(s: &AppState, w: &WorkloadRecord) -> HttpResult<api::Workload> {
    let names = node_names(s, Some(&w.network)).await?;
    Ok(render_workload(
        w,
        &names,
        &s.service.online_anywhere().await,
    ))
}

async fn moved_view(s: &AppState, outcome: MoveOutcome) -> HttpResult<api::MovedWorkload> {
    Ok(api::MovedWorkload {
        workload: workload_view(s, &outcome.workload).await?,
        changed: outcome.changed,
        prepared_ms: outcome.prepared_in.map(millis),
        handed_over_ms: outcome.handed_over_in.map(millis),
        took_ms: millis(outcome.took),
    })
}

/// A duration in milliseconds, to the microsecond.
fn millis(d: Duration) -> f64 {
    // Microseconds fit an f64 exactly for any duration a request can take.
    d.as_micros() as f64 / 1000.0
}

fn render_workload(
    w: &WorkloadRecord,
    names: &HashMap<NodeId, String>,
    online: &HashSet<NodeId>,
) -> api::Workload {
    let named = |id: &NodeId| api::WorkloadNode {
        id: api::NodeId(*id),
        name: names.get(id).cloned(),
    };
    let state = match w.holder {
        None => api::WorkloadState::Detached,
        Some(h) if online.contains(&h) => api::WorkloadState::Held,
        Some(_) => api::WorkloadState::HolderOffline,
    };
    api::Workload {
        name: w.name.clone(),
        network: w.network.clone(),
        address: w.address,
        holder: w.holder.as_ref().map(named),
        generation: api::Generation(w.generation),
        previous: w.previous.as_ref().map(named),
        standby: w.standby.iter().map(named).collect(),
        allowed: w.allowed.iter().map(named).collect(),
        tags: w.tags.clone(),
        state,
        created_at: time(w.created_at),
        moved_at: w.moved_at.map(time),
        address6: w.address6,
    }
}

async fn status(State(s): State<AppState>) -> HttpResult<Json<api::Status>> {
    let store = s.service.store();
    let nets = networks::list_networks(store, &Caller::Admin).await?;
    let all = nodes::list_nodes(store, &Caller::Admin, None).await?;
    let coordinators: Vec<api::CoordinatorStatus> = s
        .service
        .coordinators_status()
        .await
        .into_iter()
        .map(|(address, sessions, up)| api::CoordinatorStatus {
            address,
            sessions,
            up,
        })
        .collect();
    let online = coordinators
        .iter()
        .filter(|c| c.up)
        .map(|c| usize::try_from(c.sessions).unwrap_or(usize::MAX))
        .sum::<usize>()
        .max(s.service.hub().online().len());
    Ok(Json(api::Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        networks: count(nets.len()),
        nodes: count(all.iter().filter(|n| !n.revoked).count()),
        online: count(online),
        coordinators,
        uptime_secs: s.ctx.started.elapsed().as_secs(),
        quic_listen: s.ctx.quic_listen,
        advertise: s.ctx.advertise.clone(),
        fingerprint: s.ctx.fingerprint.clone(),
        relay: s.ctx.relay_stats().map(relay_view),
        reflect: s.ctx.reflect.as_ref().map(|(listen, counters)| {
            let r = counters.stats();
            api::ReflectStatus {
                listen: *listen,
                answered: r.answered,
                refused: r.refused,
                ignored: r.ignored,
            }
        }),
        tasks: Some(count(
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
        )),
    }))
}

fn relay_view(r: RelayStats) -> api::RelayStatus {
    api::RelayStatus {
        frames: r.frames,
        bytes: r.bytes,
        dropped: api::RelayDrops {
            unauthenticated: r.unauthenticated,
            rate_limited: r.rate_limited,
            malformed: r.malformed,
            no_route: r.no_route,
            other_network: r.other_network,
            too_large: r.too_large,
            unsupported: r.unsupported,
            congested: r.congested,
        },
    }
}

/// A store time as the API writes it.
fn time(seconds: UnixTime) -> api::UnixTime {
    api::UnixTime(seconds)
}

/// A count as the API writes it.
fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl From<api::CreateNetwork> for CreateNetwork {
    fn from(body: api::CreateNetwork) -> Self {
        let api::CreateNetwork { name, cidr, cidr6 } = body;
        CreateNetwork {
            cidr6,
            name: name.into(),
            cidr,
        }
    }
}

impl From<api::CreateWorkload> for CreateWorkload {
    fn from(body: api::CreateWorkload) -> Self {
        let api::CreateWorkload {
            name,
            network,
            address,
            standby,
            allowed,
            tags,
        } = body;
        CreateWorkload {
            name: name.into(),
            network: network.into(),
            address,
            standby,
            allowed,
            tags,
        }
    }
}
