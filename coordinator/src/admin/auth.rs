//! Who may do what on the admin API, and the audit log of what was done.
//!
//! Every request carries `Authorization: Bearer TOKEN`: the coordinator's bootstrap token (in
//! its state directory; role admin, every network) or an admin token made with
//! `POST /v1/admin-tokens` (role read, operator or admin; every network or one). The route
//! decides the role it needs ([`required_role`]); a token limited to one network may only make
//! requests that name that network (path, `?network=` or the body's `network`), and none of the
//! routes that span networks.
//!
//! Every request that needs more than the read role, and every refused request (401, 403), is
//! recorded in the audit log with who made it, what, when, from where and the outcome; reads
//! that succeed are not (they change nothing). Request bodies are never recorded (they may
//! hold a policy file or, in answers, a secret); refusals record their one-line reason.

use std::net::SocketAddr;

use axum::body::{to_bytes, Body};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::{AppState, HttpError};
use crate::handlers::{constant_time_eq, hash_secret};
use crate::store::{AuditRecord, Role};

/// The largest request body accepted (a policy file of 1 MiB, JSON-escaped, fits).
pub(super) const MAX_BODY: usize = 4 << 20;

/// The largest error answer read back to record its text.
const MAX_ANSWER: usize = 64 << 10;

/// Who made a request: set by [`authorize`] for the route handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Actor {
    /// As the audit log names it: `admin:bootstrap`, `admin:NAME`.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The one network it may act on; `None`: every network.
    pub network: Option<String>,
}

/// The role a route needs.
pub(crate) fn required_role(method: &Method, path: &str) -> Role {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["v1", "audit"] | ["v1", "admin-tokens", ..]) => Role::Admin,
        ("GET", _) => Role::Read,
        ("POST", ["v1", "policy", "test"]) => Role::Read,
        ("POST", ["v1", "workloads", _, "attach" | "move" | "detach"]) => Role::Operator,
        ("POST", ["v1", "tokens"]) | ("DELETE", ["v1", "tokens", _]) => Role::Operator,
        _ => Role::Admin,
    }
}

/// Routes a token limited to one network may never use: they span every network.
fn spans_networks(method: &Method, segments: &[&str]) -> bool {
    matches!(
        (method.as_str(), segments),
        (_, ["v1", "networks"])
            | (_, ["metrics"])
            | ("GET", ["v1", "tokens"])
            | (_, ["v1", "admin-tokens", ..])
            | (_, ["v1", "audit"])
    )
}

/// What the audit log records of a request besides who and the outcome.
struct Described {
    action: String,
    /// The network the request names (path, then query, then body).
    network: Option<String>,
    /// Every network the request names anywhere: a limited token must match all of them, so
    /// that a query cannot vouch for a body that names another.
    networks: Vec<String>,
    node: Option<String>,
}

fn describe(method: &Method, path: &str, query: Option<&str>, body: &[u8]) -> Described {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    // Every `network` of the query, its key and value decoded as the handlers' `Query`
    // decodes them (`%6Eetwork=prod` is `network=prod` to them, and must be to the gate).
    let from_query: Vec<String> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let key = percent_decode(k).unwrap_or_else(|| k.to_string());
            (key == "network").then(|| percent_decode(v).unwrap_or_else(|| v.to_string()))
        })
        .collect();
    let from_path = match segments.as_slice() {
        ["v1", "networks", n, ..] => Some((*n).to_string()),
        _ => None,
    };
    let networks: Vec<String> = from_path
        .into_iter()
        .chain(from_query)
        .chain(field("network"))
        .collect();
    let network = networks.first().cloned();
    let node = match segments.as_slice() {
        ["v1", "nodes", n, ..] => Some((*n).to_string()),
        ["v1", "workloads", _, "attach"] => field("node"),
        ["v1", "workloads", _, "move"] => field("node"),
        _ => None,
    };
    Described {
        action: format!("{method} {path}"),
        network,
        networks,
        node,
    }
}

/// A query value as a form encodes it: `+` for a space, `%XX` for a byte; `None` when it is
/// not UTF-8 then.
fn percent_decode(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

fn bearer(req: &Request) -> Option<String> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_string())
}

/// Who presents `token`: the bootstrap token, or an admin token that is not revoked.
async fn identify(state: &AppState, token: &str) -> Result<Option<Actor>, HttpError> {
    if constant_time_eq(&Sha256::digest(token.as_bytes()), &state.token_hash) {
        return Ok(Some(Actor {
            name: "admin:bootstrap".into(),
            role: Role::Admin,
            network: None,
        }));
    }
    // The store is looked up by the secret's hash; an attacker learns nothing from timing
    // that the hash does not hide.
    let found = state
        .service
        .store()
        .admin_token_by_hash(&hash_secret(token))
        .await
        .map_err(|e| {
            HttpError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot check the admin token now ({e}); the bootstrap token still works"),
            )
        })?;
    Ok(found.filter(|t| t.revoked_at.is_none()).map(|t| Actor {
        name: format!("admin:{}", t.name),
        role: t.role,
        network: t.network,
    }))
}

/// Whether a token limited to `scope` may make this request; the refusal's reason if not.
async fn in_scope(
    state: &AppState,
    scope: &str,
    method: &Method,
    path: &str,
    networks: &[String],
) -> Result<(), String> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if spans_networks(method, &segments) {
        return Err(format!(
            "this token may act on network {scope} only, and {method} {path} spans every network"
        ));
    }
    if let ("GET", ["v1", "relays"]) = (method.as_str(), segments.as_slice()) {
        // The relays serve every network, this token's among them (its nodes are granted
        // them): it may read the list without naming a network.
        return Ok(());
    }
    if let ("DELETE", ["v1", "tokens", id]) = (method.as_str(), segments.as_slice()) {
        // The route takes no network: the token's own decides.
        let id: u64 = id.parse().map_err(|_| "no such join token".to_string())?;
        let tokens = state
            .service
            .store()
            .tokens()
            .await
            .map_err(|e| format!("cannot check the join token now: {e}"))?;
        return match tokens.iter().find(|t| t.id == id) {
            Some(t) if t.network == scope => Ok(()),
            _ => Err(format!(
                "this token may act on network {scope} only, and join token {id} is not one of it"
            )),
        };
    }
    match networks.iter().find(|n| *n != scope) {
        Some(n) => Err(format!(
            "this token may act on network {scope} only, not {n}"
        )),
        None if networks.is_empty() => Err(format!(
            "this token may act on network {scope} only: name it (?network={scope})"
        )),
        None => Ok(()),
    }
}

/// The admin API's gate: authenticates, checks role and network, runs the route, and records
/// what the audit log keeps.
pub(super) async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let token = bearer(&req);
    let need = required_role(&method, &path);
    let (parts, body) = req.into_parts();
    let bytes = match to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return HttpError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over {MAX_BODY} bytes"),
            )
            .into_response()
        }
    };
    let what = describe(&method, &path, query.as_deref(), &bytes);
    let record = |actor: &str, status: StatusCode, result: String| AuditRecord {
        id: 0,
        at: state.service.now(),
        actor: actor.to_string(),
        action: what.action.clone(),
        network: what.network.clone(),
        node: what.node.clone(),
        status: status.as_u16(),
        result,
        source: source.clone(),
    };

    let actor = match token.as_deref() {
        None => None,
        Some(t) => match identify(&state, t).await {
            Ok(a) => a,
            Err(e) => return e.into_response(),
        },
    };
    let Some(actor) = actor else {
        let reason = "missing or wrong admin token (Authorization: Bearer ...)".to_string();
        audit(
            &state,
            record("unauthenticated", StatusCode::UNAUTHORIZED, reason.clone()),
        )
        .await;
        return HttpError(StatusCode::UNAUTHORIZED, reason).into_response();
    };
    if actor.role < need {
        let reason = format!(
            "{} has the {} role; {method} {path} needs {}",
            actor.name,
            actor.role.as_str(),
            need.as_str()
        );
        audit(
            &state,
            record(&actor.name, StatusCode::FORBIDDEN, reason.clone()),
        )
        .await;
        return HttpError(StatusCode::FORBIDDEN, reason).into_response();
    }
    if let Some(scope) = actor.network.as_deref() {
        if let Err(reason) = in_scope(&state, scope, &method, &path, &what.networks).await {
            audit(
                &state,
                record(&actor.name, StatusCode::FORBIDDEN, reason.clone()),
            )
            .await;
            return HttpError(StatusCode::FORBIDDEN, reason).into_response();
        }
    }

    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(actor.clone());
    let response = next.run(req).await;
    if need == Role::Read {
        return response;
    }
    let status = response.status();
    if status.is_success() {
        // The answer goes out untouched, however large (a policy with its source).
        audit(&state, record(&actor.name, status, "ok".to_string())).await;
        return response;
    }
    // An error's body is one short line of JSON: read back for the log.
    let (parts, body) = response.into_parts();
    let answer = to_bytes(body, MAX_ANSWER).await.unwrap_or_default();
    let result = serde_json::from_slice::<meshlink_api::ErrorBody>(&answer)
        .map(|e| e.error)
        .unwrap_or_else(|_| status.to_string());
    audit(&state, record(&actor.name, status, result)).await;
    Response::from_parts(parts, Body::from(answer))
}

/// Appends to the audit log; a database failure is logged, not turned into the answer (the
/// action itself is done or refused already).
pub(crate) async fn audit(state: &AppState, mut entry: AuditRecord) {
    entry.result.truncate(
        entry
            .result
            .char_indices()
            .nth(300)
            .map_or(entry.result.len(), |(i, _)| i),
    );
    if let Err(e) = state.service.store().record_audit(entry).await {
        tracing::warn!("cannot write the audit log: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_roles_the_docs_say() {
        let r = |m: &str, p: &str| required_role(&m.parse().unwrap(), p);
        assert_eq!(r("GET", "/v1/nodes"), Role::Read);
        assert_eq!(r("GET", "/metrics"), Role::Read);
        assert_eq!(r("GET", "/v1/networks/prod/policy"), Role::Read);
        assert_eq!(r("POST", "/v1/policy/test"), Role::Read);
        assert_eq!(r("POST", "/v1/workloads/chat/move"), Role::Operator);
        assert_eq!(r("POST", "/v1/tokens"), Role::Operator);
        assert_eq!(r("DELETE", "/v1/tokens/3"), Role::Operator);
        assert_eq!(r("POST", "/v1/admin-tokens"), Role::Admin);
        assert_eq!(r("GET", "/v1/admin-tokens"), Role::Admin);
        assert_eq!(r("GET", "/v1/audit"), Role::Admin);
        assert_eq!(r("POST", "/v1/workloads"), Role::Admin);
        assert_eq!(r("POST", "/v1/networks/prod/policy"), Role::Admin);
        assert_eq!(r("POST", "/v1/nodes/vm-a/tags"), Role::Admin);
        assert_eq!(r("DELETE", "/v1/nodes/vm-a"), Role::Admin);
        assert_eq!(r("PATCH", "/v1/anything"), Role::Admin);
    }

    #[test]
    fn the_network_and_node_of_a_request() {
        let get: Method = "POST".parse().unwrap();
        let d = describe(
            &get,
            "/v1/workloads/chat/move",
            Some("network=prod%2Deu"),
            br#"{"node":"vm-c"}"#,
        );
        assert_eq!(d.action, "POST /v1/workloads/chat/move");
        assert_eq!(d.network.as_deref(), Some("prod-eu"));
        assert_eq!(d.node.as_deref(), Some("vm-c"));
        let d = describe(&get, "/v1/tokens", None, br#"{"network":"lab","tags":[]}"#);
        assert_eq!(d.network.as_deref(), Some("lab"));
        let d = describe(&get, "/v1/networks/prod/policy", Some("network=x"), b"");
        assert_eq!(d.network.as_deref(), Some("prod"), "the path wins");
        assert_eq!(d.networks, ["prod", "x"], "and every other one is kept");
        let d = describe(&get, "/v1/nodes/vm-a/revoke", None, b"not json");
        assert_eq!((d.network, d.node.as_deref()), (None, Some("vm-a")));
    }

    #[test]
    fn a_network_named_in_an_encoded_query_key_is_seen() {
        // The handlers' Query decodes the key: the gate must see what they see, or a token
        // limited to `lab` could name `lab` in the body and read `prod` through the query.
        let get: Method = "GET".parse().unwrap();
        let d = describe(
            &get,
            "/v1/topology",
            Some("%6Eetwork=prod"),
            br#"{"network":"lab"}"#,
        );
        assert_eq!(d.networks, ["prod", "lab"]);
        let d = describe(&get, "/v1/nodes", Some("network=lab&netw%6Frk=prod"), b"");
        assert_eq!(d.networks, ["lab", "prod"]);
        let d = describe(&get, "/v1/nodes", Some("networks=prod&x=network"), b"");
        assert!(d.networks.is_empty(), "{:?}", d.networks);
    }
}
