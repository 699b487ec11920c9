//! The topology page: a live picture of the mesh served on the admin listener.
//!
//! [`page_routes`] serves the page and its assets (public: they carry no data, only the code
//! that asks for it); [`routes`] serves the data and its live updates behind the admin token
//! check like every other route, so a read-only token is enough to watch:
//!
//! | route | answer |
//! |---|---|
//! | `GET /topology` | the page (HTML); `/topology/app.js`, `/topology/style.css` its assets |
//! | `GET /v1/topology[?network=N]` | one [`api::Topology`] |
//! | `GET /v1/topology/stream[?network=N]` | `text/event-stream`: an event `topology` whose data is an [`api::Topology`] at once, then again whenever it changes; a comment every [`KEEP_ALIVE`] |
//!
//! The page asks for the admin token in a form and keeps it in the tab's `sessionStorage`; it
//! sends it as `Authorization: Bearer` with `fetch`, whose body it reads as the event stream
//! (`EventSource` cannot send headers, and a token in a URL ends up in logs and history).
//!
//! # Bounds
//! - One task per coordinator builds the picture, every [`TICK`] and only while someone
//!   watches: from memory (hub versions, sessions, path reports) at each tick, from the store
//!   only when a network's map version moved or [`STORE_REFRESH`] passed. It publishes on a
//!   `watch` channel only when the picture differs from the last one.
//! - Each stream holds the newest picture only: a slow reader skips the ones it had no time
//!   for, and nothing queues up for it beyond what the socket holds.
//! - At most [`MAX_STREAMS`] streams at once (503 past them), each at most
//!   [`STREAM_LIFETIME`] long: the page then connects again, which checks the token again (a
//!   token revoked meanwhile is refused then).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use meshlink_api::{self as api, NetworkFilter};
use meshlink_proto::control::PathReport;
use meshlink_proto::NodeId;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::auth::Actor;
use super::{AppState, HttpError, HttpResult};
use crate::handlers::ApiError;
use crate::service::Service;
use crate::store::{NetworkRecord, NodeRecord, StoreError, WorkloadRecord};

/// How often the picture is built while someone watches.
pub const TICK: Duration = Duration::from_millis(200);
/// How long the store's lists are reused when no map version moved (a new network, a node's
/// labels: changes that reach no map).
pub const STORE_REFRESH: Duration = Duration::from_secs(2);
/// How often an idle stream sends a comment, so that proxies do not cut it.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long one stream lasts at most; the page connects again (and is authorised again).
pub const STREAM_LIFETIME: Duration = Duration::from_secs(300);
/// How many streams may be open at once.
pub const MAX_STREAMS: usize = 32;

const PAGE: &str = include_str!("../../assets/topology/index.html");
const SCRIPT: &str = include_str!("../../assets/topology/app.js");
const STYLE: &str = include_str!("../../assets/topology/style.css");

/// What the page may load: its own script, style and data, nothing from elsewhere, no inline
/// script, no framing.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The page and its assets, outside the token check.
pub(super) fn page_routes() -> Router<AppState> {
    Router::new()
        .route("/topology", get(|| async { asset(PAGE, "text/html") }))
        .route(
            "/topology/app.js",
            get(|| async { asset(SCRIPT, "text/javascript") }),
        )
        .route(
            "/topology/style.css",
            get(|| async { asset(STYLE, "text/css") }),
        )
}

/// The page's data and live updates, behind the token check.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/topology", get(snapshot))
        .route("/v1/topology/stream", get(stream))
        .layer(Extension(Arc::new(Feed::new(MAX_STREAMS))))
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&format!("{kind}; charset=utf-8"))
            .unwrap_or(HeaderValue::from_static("text/plain")),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The one network a request may see: the one it names, else the one its token is limited to
/// (the gate has already refused a limited token that names another); `None`: every network.
async fn scope(
    s: &AppState,
    actor: Option<&Actor>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Option<String>> {
    let Query(q) = q?;
    let network = q
        .network
        .map(String::from)
        .or_else(|| actor.and_then(|a| a.network.clone()));
    if let Some(name) = network.as_deref() {
        // As for the node and workload lists: an unknown network is a 404.
        if s.service
            .store()
            .network(name)
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::NotFound(format!("no network named {name:?}")).into());
        }
    }
    Ok(network)
}

async fn snapshot(
    State(s): State<AppState>,
    actor: Option<Extension<Actor>>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Json<api::Topology>> {
    let network = scope(&s, actor.as_ref().map(|a| &a.0), q).await?;
    let mut reader = Reader::default();
    let all = reader.read(&s.service).await.map_err(ApiError::from)?;
    Ok(Json(match network {
        Some(name) => all.only(&name),
        None => all,
    }))
}

async fn stream(
    State(s): State<AppState>,
    Extension(feed): Extension<Arc<Feed>>,
    actor: Option<Extension<Actor>>,
    q: Result<Query<NetworkFilter>, QueryRejection>,
) -> HttpResult<Response> {
    let network = scope(&s, actor.as_ref().map(|a| &a.0), q).await?;
    let permit = feed.streams.clone().try_acquire_owned().map_err(|_| {
        HttpError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} topology streams are open already; try again later"),
        )
    })?;
    let viewer = Viewer {
        pictures: feed.subscribe(&s.service),
        network,
        last: None,
        until: Instant::now() + STREAM_LIFETIME,
        _permit: permit,
    };
    let events = futures::stream::unfold(viewer, |mut viewer| async move {
        let picture = viewer.next().await?;
        let event = Event::default().event("topology").json_data(&picture);
        Some((event, viewer))
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
        .into_response();
    // nginx and the like would otherwise hold the events back to fill their buffers.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The picture as it was last built, shared by every stream of one coordinator.
type Picture = Option<Arc<api::Topology>>;

/// Who watches, and the task that builds the picture while anyone does.
#[derive(Debug)]
struct Feed {
    /// One permit per open stream.
    streams: Arc<Semaphore>,
    /// A receiver of the building task's channel while the task runs. The task ends when
    /// this is the only receiver left, and takes it away under the same lock.
    current: Mutex<Option<watch::Receiver<Picture>>>,
}

impl Feed {
    fn new(max_streams: usize) -> Feed {
        Feed {
            streams: Arc::new(Semaphore::new(max_streams)),
            current: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<watch::Receiver<Picture>>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver of the pictures, starting the task that builds them if none runs.
    fn subscribe(self: &Arc<Self>, service: &Arc<Service>) -> watch::Receiver<Picture> {
        let mut current = self.lock();
        if let Some(rx) = current.as_ref() {
            // Closed: the task was aborted with the service's other tasks.
            if rx.has_changed().is_ok() {
                return rx.clone();
            }
        }
        let (tx, rx) = watch::channel(None);
        *current = Some(rx.clone());
        let (feed, svc) = (self.clone(), service.clone());
        service.spawn(async move { feed.build(svc, tx).await });
        rx
    }

    /// Builds the picture every [`TICK`] and publishes it when it changed, until nobody
    /// watches.
    async fn build(self: Arc<Self>, service: Arc<Service>, tx: watch::Sender<Picture>) {
        let mut reader = Reader::default();
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            {
                let mut current = self.lock();
                if tx.receiver_count() <= 1 {
                    *current = None;
                    return;
                }
            }
            match reader.read(&service).await {
                Ok(picture) => {
                    publish(&tx, picture);
                }
                Err(e) => tracing::debug!("topology: cannot read the store now: {e}"),
            }
        }
    }
}

/// Sends `picture` unless it equals the last one sent; whether it sent.
fn publish(tx: &watch::Sender<Picture>, picture: api::Topology) -> bool {
    tx.send_if_modified(|last| {
        if last.as_deref() == Some(&picture) {
            return false;
        }
        *last = Some(Arc::new(picture));
        true
    })
}

/// One stream's side: the newest picture, cut to its network, when it differs from the last
/// one this stream sent.
struct Viewer {
    pictures: watch::Receiver<Picture>,
    network: Option<String>,
    last: Option<api::Topology>,
    until: Instant,
    _permit: OwnedSemaphorePermit,
}

impl Viewer {
    /// The next picture to send; `None`: the stream ends (its lifetime is up, or the
    /// coordinator is going away).
    async fn next(&mut self) -> Option<api::Topology> {
        loop {
            let newest = self.pictures.borrow_and_update().clone();
            if let Some(all) = newest {
                let view = match self.network.as_deref() {
                    Some(name) => all.only(name),
                    None => (*all).clone(),
                };
                if self.last.as_ref() != Some(&view) {
                    self.last = Some(view.clone());
                    return Some(view);
                }
            }
            tokio::select! {
                changed = self.pictures.changed() => changed.ok()?,
                () = tokio::time::sleep_until(self.until) => return None,
            }
        }
    }
}

/// Reads what the picture is made of, keeping the store's lists while no map moved.
#[derive(Debug, Default)]
struct Reader {
    /// When the store was last read, and every network's map version then.
    read_at: Option<(Instant, Vec<(String, u64)>)>,
    networks: Vec<NetworkRecord>,
    nodes: Vec<NodeRecord>,
    workloads: Vec<WorkloadRecord>,
}

impl Reader {
    async fn read(&mut self, service: &Service) -> Result<api::Topology, StoreError> {
        let hub = service.hub();
        let versions: Vec<(String, u64)> = hub
            .networks()
            .into_iter()
            .filter_map(|n| hub.version(&n).map(|v| (n, v)))
            .collect();
        let fresh = self
            .read_at
            .as_ref()
            .is_some_and(|(at, seen)| *seen == versions && at.elapsed() < STORE_REFRESH);
        if !fresh {
            let store = service.store();
            self.networks = store.networks().await?;
            self.nodes = store.nodes(None).await?;
            self.workloads = store.workloads(None).await?;
            self.read_at = Some((Instant::now(), versions.clone()));
        }
        let online = service.online_anywhere().await;
        let paths: HashMap<NodeId, Vec<PathReport>> = self
            .nodes
            .iter()
            .filter(|n| !n.revoked)
            .filter_map(|n| service.paths().get(n.id).map(|r| (n.id, r.paths)))
            .collect();
        Ok(build(&Inputs {
            networks: &self.networks,
            versions: &versions.into_iter().collect(),
            nodes: &self.nodes,
            workloads: &self.workloads,
            online: &online,
            paths: &paths,
        }))
    }
}

/// What a picture is made of.
#[derive(Debug)]
pub(crate) struct Inputs<'a> {
    /// Every network.
    pub networks: &'a [NetworkRecord],
    /// The hub's live map versions (a record's may be older).
    pub versions: &'a HashMap<String, u64>,
    /// Every node, revoked ones included (they still name a workload's holder).
    pub nodes: &'a [NodeRecord],
    /// Every workload.
    pub workloads: &'a [WorkloadRecord],
    /// The nodes with a live session.
    pub online: &'a HashSet<NodeId>,
    /// Each node's last path report.
    pub paths: &'a HashMap<NodeId, Vec<PathReport>>,
}

/// The picture: networks by name, each network's nodes (not revoked) grouped by provider,
/// the paths the online ones last reported to peers of their own network, and its workloads
/// with their holders.
pub(crate) fn build(inputs: &Inputs<'_>) -> api::Topology {
    let names: HashMap<NodeId, &NodeRecord> = inputs.nodes.iter().map(|n| (n.id, n)).collect();
    let mut networks: Vec<&NetworkRecord> = inputs.networks.iter().collect();
    networks.sort_by(|a, b| a.name.cmp(&b.name));
    let networks = networks
        .into_iter()
        .map(|net| {
            let mut members: Vec<&NodeRecord> = inputs
                .nodes
                .iter()
                .filter(|n| n.network == net.name && !n.revoked)
                .collect();
            members.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
            let ids: HashSet<NodeId> = members.iter().map(|n| n.id).collect();

            // BTreeMap: providers by name; `None` sorts first, so it is moved last below.
            let mut groups: BTreeMap<Option<&str>, Vec<api::TopologyNode>> = BTreeMap::new();
            for n in &members {
                let provider = n
                    .labels
                    .get(api::PROVIDER_LABEL)
                    .map(String::as_str)
                    .filter(|p| !p.is_empty());
                groups.entry(provider).or_default().push(api::TopologyNode {
                    id: api::NodeId(n.id),
                    name: n.name.clone(),
                    address: n.address,
                    online: inputs.online.contains(&n.id),
                });
            }
            let unlabelled = groups.remove(&None);
            let providers = groups
                .into_iter()
                .map(|(p, nodes)| (p.map(str::to_owned), nodes))
                .chain(unlabelled.map(|nodes| (None, nodes)))
                .map(|(provider, nodes)| api::ProviderGroup { provider, nodes })
                .collect();

            let ids = &ids;
            let mut paths: Vec<api::TopologyPath> = members
                .iter()
                // An offline node's last report is stale: its paths are not shown.
                .filter(|n| inputs.online.contains(&n.id))
                .filter_map(|n| inputs.paths.get(&n.id).map(|r| (n.id, r)))
                .flat_map(|(from, reports)| {
                    reports
                        .iter()
                        .filter(move |p| ids.contains(&p.peer) && p.peer != from)
                        .map(move |p| api::TopologyPath {
                            from: api::NodeId(from),
                            to: api::NodeId(p.peer),
                            kind: p.kind,
                            via: p.via,
                            over: p.over,
                            rtt_us: p.rtt_us,
                        })
                })
                .collect();
            paths.sort_by_key(|p| (p.from, p.to));
            paths.dedup_by_key(|p| (p.from, p.to));

            let mut workloads: Vec<api::TopologyWorkload> = inputs
                .workloads
                .iter()
                .filter(|w| w.network == net.name)
                .map(|w| {
                    let holder = w.holder.filter(|h| names.contains_key(h));
                    let state = match holder {
                        None => api::WorkloadState::Detached,
                        Some(h) if inputs.online.contains(&h) => api::WorkloadState::Held,
                        Some(_) => api::WorkloadState::HolderOffline,
                    };
                    api::TopologyWorkload {
                        name: w.name.clone(),
                        address: w.address,
                        holder: holder.map(api::NodeId),
                        holder_name: holder.and_then(|h| names.get(&h)).map(|n| n.name.clone()),
                        generation: api::Generation(w.generation),
                        state,
                    }
                })
                .collect();
            workloads.sort_by(|a, b| a.name.cmp(&b.name));

            let live = inputs.versions.get(&net.name).copied().unwrap_or(0);
            api::TopologyNetwork {
                name: net.name.clone(),
                cidr: net.cidr,
                version: api::MapVersion(live.max(net.version)),
                providers,
                paths,
                workloads,
            }
        })
        .collect();
    api::Topology { networks }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlink_api::{PathKind, WorkloadState};
    use meshlink_proto::PublicKey;

    fn network(name: &str, version: u64) -> NetworkRecord {
        NetworkRecord {
            name: name.into(),
            cidr: "100.64.0.0/16".parse().unwrap(),
            version,
            created_at: 0,
            cidr6: None,
        }
    }

    fn node(id: NodeId, network: &str, name: &str, provider: Option<&str>) -> NodeRecord {
        NodeRecord {
            id,
            network: network.into(),
            name: name.into(),
            public_key: PublicKey([u8::try_from(id).unwrap(); 32]),
            address: std::net::Ipv4Addr::new(100, 64, 0, u8::try_from(id).unwrap()),
            secret_hash: String::new(),
            labels: provider
                .map(|p| (api::PROVIDER_LABEL.to_string(), p.to_string()))
                .into_iter()
                .collect(),
            tags: Vec::new(),
            endpoints: Vec::new(),
            observed: None,
            revoked: false,
            created_at: 0,
            last_seen: None,
            next_key: None,
            key_since: 0,
            rotation_asked: None,
            expired_at: None,
            via: None,
            address6: None,
        }
    }

    fn workload(network: &str, name: &str, holder: Option<NodeId>) -> WorkloadRecord {
        WorkloadRecord {
            id: 1,
            network: network.into(),
            name: name.into(),
            address: "100.64.50.10".parse().unwrap(),
            holder,
            generation: 4,
            previous: None,
            standby: Vec::new(),
            allowed: Vec::new(),
            tags: Vec::new(),
            created_at: 0,
            moved_at: None,
            address6: None,
        }
    }

    fn path(peer: NodeId, kind: PathKind) -> PathReport {
        PathReport {
            relay: None,
            peer,
            kind,
            via: None,
            over: None,
            rtt_us: Some(900),
            changed_secs_ago: Some(1),
        }
    }

    /// prod: vm-a1 (aws, online), vm-b1 (gcp), vm-x (no provider), vm-gone (revoked, aws);
    /// lab: vm-l (aws). Workloads: chat on vm-a1, db on vm-b1, spare detached, old on the
    /// revoked node.
    fn picture(online: &[NodeId], paths: &HashMap<NodeId, Vec<PathReport>>) -> api::Topology {
        let mut gone = node(4, "prod", "vm-gone", Some("aws"));
        gone.revoked = true;
        let nodes = vec![
            node(2, "prod", "vm-b1", Some("gcp")),
            node(3, "prod", "vm-x", None),
            node(1, "prod", "vm-a1", Some("aws")),
            gone,
            node(5, "lab", "vm-l", Some("aws")),
        ];
        let workloads = vec![
            workload("prod", "db", Some(2)),
            workload("prod", "chat", Some(1)),
            workload("prod", "spare", None),
            workload("prod", "old", Some(4)),
            workload("prod", "lost", Some(99)),
        ];
        build(&Inputs {
            networks: &[network("prod", 3), network("lab", 1)],
            versions: &[("prod".to_string(), 9)].into_iter().collect(),
            nodes: &nodes,
            workloads: &workloads,
            online: &online.iter().copied().collect(),
            paths,
        })
    }

    /// A provider group as (provider, [(node, online)]).
    type Group<'a> = (Option<&'a str>, Vec<(&'a str, bool)>);

    #[test]
    fn nodes_are_grouped_by_provider_and_workloads_named_by_holder() {
        let t = picture(&[1, 5], &HashMap::new());
        let names: Vec<&str> = t.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["lab", "prod"]);
        let prod = &t.networks[1];
        assert_eq!(prod.version, api::MapVersion(9), "the hub's live version");
        assert_eq!(t.networks[0].version, api::MapVersion(1), "the record's");
        let groups: Vec<Group<'_>> = prod
            .providers
            .iter()
            .map(|g| {
                let nodes = g
                    .nodes
                    .iter()
                    .map(|n| (n.name.as_str(), n.online))
                    .collect();
                (g.provider.as_deref(), nodes)
            })
            .collect();
        assert_eq!(
            groups,
            [
                (Some("aws"), vec![("vm-a1", true)]),
                (Some("gcp"), vec![("vm-b1", false)]),
                (None, vec![("vm-x", false)]),
            ],
            "revoked nodes left out, the unlabelled group last"
        );
        let held: Vec<(&str, Option<&str>, WorkloadState)> = prod
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w.holder_name.as_deref(), w.state))
            .collect();
        assert_eq!(
            held,
            [
                ("chat", Some("vm-a1"), WorkloadState::Held),
                ("db", Some("vm-b1"), WorkloadState::HolderOffline),
                ("lost", None, WorkloadState::Detached),
                ("old", Some("vm-gone"), WorkloadState::HolderOffline),
                ("spare", None, WorkloadState::Detached),
            ]
        );
        assert_eq!(prod.workloads[0].holder, Some(api::NodeId(1)));
        assert_eq!(prod.workloads[0].generation, api::Generation(4));
    }

    #[test]
    fn paths_are_kept_between_nodes_of_one_network_only() {
        let paths: HashMap<NodeId, Vec<PathReport>> = [
            (
                1,
                vec![
                    path(2, PathKind::Direct),
                    path(2, PathKind::Relay),
                    path(4, PathKind::Direct),
                    path(5, PathKind::Direct),
                    path(1, PathKind::Direct),
                ],
            ),
            (2, vec![path(1, PathKind::Relay)]),
            (3, vec![path(1, PathKind::Direct)]),
            (4, vec![path(1, PathKind::Direct)]),
        ]
        .into_iter()
        .collect();
        let t = picture(&[1, 2], &paths);
        let prod = &t.networks[1];
        let seen: Vec<(u64, u64, PathKind)> = prod
            .paths
            .iter()
            .map(|p| (p.from.0, p.to.0, p.kind))
            .collect();
        assert_eq!(
            seen,
            [(1, 2, PathKind::Direct), (2, 1, PathKind::Relay)],
            "no path to a revoked node, another network's node or itself, none from an \
             offline node (vm-x); one per pair"
        );
        assert_eq!(prod.paths[0].rtt_us, Some(900));
        assert!(t.networks[0].paths.is_empty());
    }

    #[test]
    fn a_picture_is_published_only_when_it_changed() {
        let (tx, mut rx) = watch::channel(None);
        let a = picture(&[1], &HashMap::new());
        assert!(publish(&tx, a.clone()));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(!publish(&tx, a.clone()), "the same picture again");
        assert!(!rx.has_changed().unwrap());
        assert!(
            publish(&tx, picture(&[1, 2], &HashMap::new())),
            "vm-b1 came online"
        );
        assert!(rx.has_changed().unwrap());
    }

    fn viewer(rx: watch::Receiver<Picture>, network: Option<&str>) -> Viewer {
        Viewer {
            pictures: rx,
            network: network.map(str::to_owned),
            last: None,
            until: Instant::now() + Duration::from_secs(60),
            _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
        }
    }

    #[tokio::test]
    async fn a_slow_viewer_gets_the_newest_picture_only() {
        let (tx, rx) = watch::channel(None);
        let mut v = viewer(rx, None);
        publish(&tx, picture(&[], &HashMap::new()));
        publish(&tx, picture(&[1], &HashMap::new()));
        let newest = picture(&[1, 2], &HashMap::new());
        publish(&tx, newest.clone());
        assert_eq!(v.next().await, Some(newest));
        let nothing = tokio::time::timeout(Duration::from_millis(100), v.next()).await;
        assert!(nothing.is_err(), "nothing new: nothing sent");
    }

    #[tokio::test]
    async fn a_viewer_of_one_network_is_sent_its_changes_only() {
        let (tx, rx) = watch::channel(None);
        let mut v = viewer(rx, Some("lab"));
        publish(&tx, picture(&[], &HashMap::new()));
        let first = v.next().await.unwrap();
        let names: Vec<&str> = first.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["lab"]);
        // vm-a1 (prod) comes online: nothing for lab.
        publish(&tx, picture(&[1], &HashMap::new()));
        let nothing = tokio::time::timeout(Duration::from_millis(100), v.next()).await;
        assert!(nothing.is_err(), "a change elsewhere is not sent");
        // vm-l (lab) comes online.
        publish(&tx, picture(&[1, 5], &HashMap::new()));
        let next = v.next().await.unwrap();
        assert!(next.networks[0].providers[0].nodes[0].online);
        // The sender goes away (the coordinator stops): the stream ends.
        drop(tx);
        assert_eq!(v.next().await, None);
    }

    #[tokio::test]
    async fn a_stream_ends_when_its_lifetime_is_up() {
        let (tx, rx) = watch::channel(None);
        let mut v = viewer(rx, None);
        v.until = Instant::now() + Duration::from_millis(50);
        publish(&tx, picture(&[], &HashMap::new()));
        assert!(v.next().await.is_some());
        assert_eq!(v.next().await, None);
    }

    /// One request over HTTP/1.1 with the answer's head and whatever body came within
    /// `wait` (a stream is cut there).
    async fn request(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        s
    }

    /// Reads from `s` until `done` holds for what came so far, or `wait` passes.
    async fn read_until(
        s: &mut tokio::net::TcpStream,
        wait: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        use tokio::io::AsyncReadExt;
        let mut text = Vec::new();
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 8192];
        while !done(&String::from_utf8_lossy(&text)) {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => text.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// The `topology` events' pictures in a stream's text so far (chunked framing and all:
    /// each event's data is one line).
    fn pictures(text: &str) -> Vec<api::Topology> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn the_page_is_public_and_its_data_needs_a_token_a_read_one_is_enough() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::config::Settings::with_state_dir(dir.path().to_path_buf());
        settings.listen = "127.0.0.1:0".parse().unwrap();
        settings.admin_listen = "127.0.0.1:0".parse().unwrap();
        let c = crate::run::Coordinator::start(&settings).await.unwrap();
        let addr = c.admin_addr();
        let boot = c.admin_token().value.clone();
        let wait = Duration::from_secs(5);

        let mut s = request(addr, "GET", "/topology", None, "").await;
        let page = read_until(&mut s, wait, |_| false).await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(
            page.contains("content-security-policy: default-src 'none'"),
            "{page}"
        );
        assert!(page.contains("topology/app.js"));
        let mut s = request(addr, "GET", "/topology/app.js", None, "").await;
        let script = read_until(&mut s, wait, |_| false).await;
        assert!(script.contains("text/javascript") && script.contains("Bearer"));

        for (token, status) in [(None, "401"), (Some("mla1_wrong"), "401")] {
            let mut s = request(addr, "GET", "/v1/topology/stream", token, "").await;
            let answer = read_until(&mut s, wait, |_| false).await;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{answer}"
            );
        }

        let net = r#"{"name": "prod", "cidr": "100.64.0.0/24"}"#;
        let mut s = request(addr, "POST", "/v1/networks", Some(&boot), net).await;
        assert!(read_until(&mut s, wait, |_| false)
            .await
            .starts_with("HTTP/1.1 201"));
        let body = r#"{"name": "wall", "role": "read"}"#;
        let mut s = request(addr, "POST", "/v1/admin-tokens", Some(&boot), body).await;
        let made = read_until(&mut s, wait, |_| false).await;
        let json = made.split_once("\r\n\r\n").unwrap().1;
        let read: serde_json::Value = serde_json::from_str(json).unwrap();
        let read = read["token"].as_str().unwrap().to_string();

        let mut stream = request(addr, "GET", "/v1/topology/stream", Some(&read), "").await;
        let text = read_until(&mut stream, wait, |t| !pictures(t).is_empty()).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("content-type: text/event-stream"), "{text}");
        let first = pictures(&text);
        let names: Vec<&str> = first[0].networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["prod"]);

        // A change arrives on the open stream.
        let net = r#"{"name": "lab", "cidr": "100.64.1.0/24"}"#;
        let mut s = request(addr, "POST", "/v1/networks", Some(&boot), net).await;
        assert!(read_until(&mut s, wait, |_| false)
            .await
            .starts_with("HTTP/1.1 201"));
        let text = read_until(&mut stream, wait, |t| !pictures(t).is_empty()).await;
        let next = pictures(&text);
        let names: Vec<&str> = next[0].networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["lab", "prod"]);

        let mut s = request(addr, "GET", "/v1/topology?network=lab", Some(&read), "").await;
        let one = read_until(&mut s, wait, |_| false).await;
        let one: api::Topology =
            serde_json::from_str(one.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(one.networks.len(), 1);
        let mut s = request(addr, "GET", "/v1/topology?network=nope", Some(&read), "").await;
        assert!(read_until(&mut s, wait, |_| false)
            .await
            .starts_with("HTTP/1.1 404"));

        // A token limited to one network sees that network, and must name it.
        let body = r#"{"name": "lab-wall", "role": "read", "network": "lab"}"#;
        let mut s = request(addr, "POST", "/v1/admin-tokens", Some(&boot), body).await;
        let made = read_until(&mut s, wait, |_| false).await;
        let lab: serde_json::Value =
            serde_json::from_str(made.split_once("\r\n\r\n").unwrap().1).unwrap();
        let lab = lab["token"].as_str().unwrap().to_string();
        let mut s = request(addr, "GET", "/v1/topology/stream", Some(&lab), "").await;
        let refused = read_until(&mut s, wait, |_| false).await;
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        let path = "/v1/topology/stream?network=lab";
        let mut s = request(addr, "GET", path, Some(&lab), "").await;
        let text = read_until(&mut s, wait, |t| !pictures(t).is_empty()).await;
        let names: Vec<String> = pictures(&text)[0]
            .networks
            .iter()
            .map(|n| n.name.clone())
            .collect();
        assert_eq!(names, ["lab"]);
        // Nor can it name another network in a disguise the handlers decode (an encoded
        // key), vouched for by a body that names its own.
        for path in [
            "/v1/topology?network=prod",
            "/v1/topology?%6Eetwork=prod",
            "/v1/topology/stream?%6Eetwork=prod",
        ] {
            let body = r#"{"network": "lab"}"#;
            let mut r = request(addr, "GET", path, Some(&lab), body).await;
            let refused = read_until(&mut r, wait, |_| false).await;
            assert!(refused.starts_with("HTTP/1.1 403"), "{path}: {refused}");
            assert!(
                !refused.contains("vm-"),
                "{path}: no node of prod: {refused}"
            );
        }

        // Two streams are open; up to the limit more may open, then none.
        let mut open = vec![stream, s];
        while open.len() < MAX_STREAMS {
            let mut s = request(addr, "GET", "/v1/topology/stream", Some(&read), "").await;
            let text = read_until(&mut s, wait, |t| !pictures(t).is_empty()).await;
            assert!(
                text.starts_with("HTTP/1.1 200"),
                "stream {}: {text}",
                open.len()
            );
            open.push(s);
        }
        let mut s = request(addr, "GET", "/v1/topology/stream", Some(&read), "").await;
        let refused = read_until(&mut s, wait, |_| false).await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        drop(open);
        c.shutdown().await;
    }
}
