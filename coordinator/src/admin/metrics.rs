//! `GET /metrics`: the coordinator's metrics in Prometheus's text format, behind the token
//! check like every route (the read role suffices; a token limited to one network may not:
//! the metrics span every network). Prometheus sends the token with `authorization` in its
//! scrape configuration (README, "Metrics").
//!
//! Most values are kept as they happen (`crate::telemetry`); the counts of each network, the
//! open connections and the relay's and reflect port's counters are read here, at each scrape.
//!
//! [`count_request`] counts every admin request by route template, method and status.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics::{counter, gauge, histogram};

use super::{AppState, HttpError};
use crate::telemetry::{self, names};

/// The media type of Prometheus's text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The route, behind the token check.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

async fn scrape(State(s): State<AppState>) -> Response {
    let Some(handle) = telemetry::handle() else {
        return HttpError(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are off: another metrics recorder is installed in this process".into(),
        )
        .into_response();
    };
    for n in s.service.hub().census() {
        let network = n.network;
        gauge!(names::NODES, "network" => network.clone()).set(n.nodes as f64);
        gauge!(names::NODES_ONLINE, "network" => network.clone()).set(n.online as f64);
        gauge!(names::MAP_VERSION, "network" => network.clone()).set(n.version as f64);
        gauge!(names::WORKLOADS, "network" => network).set(n.workloads as f64);
    }
    if let Some(c) = &s.ctx.connections {
        gauge!(names::CONNECTIONS).set(c.open() as f64);
    }
    if let Some(r) = s.ctx.relay_stats() {
        counter!(names::RELAY_FRAMES).absolute(r.frames);
        counter!(names::RELAY_BYTES).absolute(r.bytes);
        for (reason, n) in r.dropped() {
            counter!(names::RELAY_DROPPED, "reason" => reason).absolute(n);
        }
    }
    if let Some(sessions) = &s.ctx.relay_sessions {
        let by = sessions.relay().sessions_by_transport();
        gauge!(names::RELAY_SESSIONS, "transport" => "quic").set(by.quic as f64);
        gauge!(names::RELAY_SESSIONS, "transport" => "tcp").set(by.tcp as f64);
    }
    if let Some((_, counters)) = &s.ctx.reflect {
        let r = counters.stats();
        for (outcome, n) in [
            ("answered", r.answered),
            ("refused", r.refused),
            ("ignored", r.ignored),
        ] {
            counter!(names::REFLECT, "outcome" => outcome).absolute(n);
        }
    }
    // Histogram samples recorded since the last upkeep are drained by the rendering itself.
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], handle.render()).into_response()
}

/// Counts an admin request once answered (outermost layer: refusals by the token check count
/// too) under its route's template.
pub(super) async fn count_request(req: Request, next: Next) -> Response {
    let route = route_label(
        req.extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    );
    let method = method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    counter!(names::ADMIN_REQUESTS, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    histogram!(names::ADMIN_DURATION, "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The `route` label: the template the router matched (`/v1/nodes/{reference}`), never the
/// path asked for, so that names and ids in paths (anyone's, also unauthenticated callers')
/// cannot grow the number of series; `unmatched` for a path no route has.
fn route_label(matched: Option<&str>) -> String {
    matched.unwrap_or("unmatched").to_string()
}

/// The `method` label: the methods the API knows, `other` for any other.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_fixed_sets() {
        assert_eq!(
            route_label(Some("/v1/nodes/{reference}")),
            "/v1/nodes/{reference}"
        );
        assert_eq!(route_label(None), "unmatched");
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::DELETE), "DELETE");
        let made_up = Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&made_up), "other");
    }
}
