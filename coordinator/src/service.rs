//! The coordinator's operations as the QUIC server and the admin API call them: a handler
//! from [`crate::handlers`] is run against the store, and what it changed is applied to the
//! [`Hub`] (a delta to every session, a session closed).
//!
//! Architecture invariant: every operation that changes a network's map runs under one write
//! lock, from the store write to the hub update, so deltas are queued in version order and a
//! node revoked or deleted can never slip into an attached session (authentication and attach
//! happen under the same lock). Reads do not take it.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(crate) use meshlink_proto::control::encode;
use meshlink_proto::control::{Auth, Hello, ServerMessage};
use meshlink_proto::workload::{
    failover_target, Confirmation, LeaseTable, DEFAULT_LEASE, HEARTBEATS_PER_LEASE,
};
use meshlink_proto::{NetmapDelta, NodeId};
use tokio::sync::{oneshot, Mutex};
use tokio::task::JoinSet;

use crate::endpoint_pace::{EndpointPace, Report};
use crate::handlers::networks::{self, CreateNetwork};
use crate::handlers::nodes::{self, peer_info, welcome, HelloEndpoints};
use crate::handlers::policy;
use crate::handlers::tokens::{self, CreateToken};
use crate::handlers::workloads::{self, CreateWorkload, PlannedMove};
use crate::handlers::{ApiError, Caller};
use crate::hub::{Attached, CloseReason, Frame, Hub};
use crate::identity::random_secret;
use crate::store::{
    Leadership, LeaseFence, NetworkRecord, NodeRecord, PrepareNote, SqlStore, Store, StoreError,
    TokenId, TokenRecord, UnixTime, WorkloadRecord, PREPARED_CHANNEL, PREPARE_CHANNEL,
};
use crate::telemetry::{self, MoveCause};

/// Timings of workload moves and leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadTiming {
    /// The lease a holder gets with each answered heartbeat.
    pub lease: Duration,
    /// Extra time the coordinator waits past a silent holder's lease before failing over.
    pub margin: Duration,
    /// How long a move waits for the destination to report its tunnels ready.
    pub prepare_timeout: Duration,
    /// How long a live migration waits for the holder's application to hand over.
    pub handover_timeout: Duration,
    /// How long a former holder forwards for a moved address (told to agents in maps).
    pub grace: Duration,
    /// The lease a stopping coordinator answers heartbeats with ([`Service::begin_stop`]), so
    /// that holders ride out a restart; recorded first ([`Service::stop_record_length`]), the
    /// next run waits it out. `None`: no stop lease (coordinators sharing leases: holders
    /// renew through another one).
    pub stop_lease: Option<Duration>,
    /// What the previous run's recorded stop leases had left at this start
    /// ([`crate::stop_record::left`]): waited out. Zero after a crash (nothing recorded, or
    /// long over): the previous run granted only leases.
    pub previous_stop_left: Duration,
    /// While some is left: how long the previous run's recorded stop leases could run in all
    /// ([`crate::stop_record::read`]). A change of holder it made while stopping, up to that
    /// long before they end, may have left the old holder answering on a stop lease granted
    /// just before: the change counts as recent that long. Zero otherwise.
    pub previous_stop_longest: Duration,
}

impl WorkloadTiming {
    /// A lone coordinator's stop lease for `lease`: twice the lease and a second, so that a
    /// restart shorter than a lease leaves a holder more than a lease and a second to
    /// reconnect and renew.
    pub fn lone_stop_lease(lease: Duration) -> Duration {
        2 * lease + Duration::from_secs(1)
    }

    /// The longest lease a previous run on the store may have granted, counted from this
    /// run's start: a lease, or what is left of its recorded stop leases.
    fn inherited(&self) -> Duration {
        self.lease.max(self.previous_stop_left)
    }
}

impl Default for WorkloadTiming {
    fn default() -> Self {
        WorkloadTiming {
            lease: DEFAULT_LEASE,
            margin: Duration::from_millis(100),
            prepare_timeout: Duration::from_millis(500),
            handover_timeout: Duration::from_secs(10),
            grace: meshlink_proto::workload::DEFAULT_GRACE,
            stop_lease: None,
            previous_stop_left: Duration::ZERO,
            previous_stop_longest: Duration::ZERO,
        }
    }
}

/// How often `run.rs` calls [`Service::endpoint_tick`]: how late, at most, beyond its turn a
/// waiting endpoint report is written.
pub const ENDPOINT_TICK: Duration = Duration::from_millis(100);

/// How much longer than a heartbeat interval a stopping coordinator waits for every holder's
/// heartbeat (the links' delay, a heartbeat sent late).
const STOP_HEARTBEAT_SLACK: Duration = Duration::from_millis(100);

/// Recorded beyond a stop lease's longest run: the time between the record and the stop.
const STOP_RECORD_SLACK: Duration = Duration::from_millis(100);

/// How long a stopping coordinator keeps its sessions open after the last stop lease was
/// granted, so that the answers leave before the connections close (a close abandons what
/// is still queued).
pub const STOP_LINGER: Duration = Duration::from_millis(50);

/// How long a heartbeat waits for the database to record a shared lease renewal before the
/// coordinator answers on its own word (the database is away, or slow).
const SHARED_RENEWAL_WAIT: Duration = Duration::from_millis(100);

/// What a change of holder did.
#[derive(Debug, Clone)]
pub struct MoveOutcome {
    /// The workload after the change.
    pub workload: WorkloadRecord,
    /// False when nothing had to change (the node already held it).
    pub changed: bool,
    /// How long the destination took to report its tunnels ready; `None` when it was not
    /// asked (offline, detach) or did not answer in time.
    pub prepared_in: Option<Duration>,
    /// How long the holder's application took to hand over (a live migration).
    pub handed_over_in: Option<Duration>,
    /// Time from the request to the change being queued to every session.
    pub took: Duration,
}

pub(crate) type PrepareKey = (NodeId, String, u64);

/// A node that held a workload before a change of holder and may still answer for it: until
/// it acknowledges the change (a heartbeat at `version` or later) or `until` passes (its lease
/// has surely run out), the workload's holder is not confirmed.
#[derive(Debug, Clone, Copy)]
struct Release {
    /// The node; 0 (no node's id) after a start: whoever held it in the previous run.
    node: NodeId,
    version: u64,
    until: Instant,
}

impl Release {
    /// Whether the node may still answer at `now`: it has not acknowledged `version` and its
    /// time is not up.
    fn waiting(&self, acked: &HashMap<NodeId, u64>, now: Instant) -> bool {
        now < self.until && acked.get(&self.node).is_none_or(|v| *v < self.version)
    }
}

/// The handovers this coordinator knows of (see `Service::confirmed_for`).
#[derive(Debug, Default)]
struct Handovers {
    /// By (network, workload name): the former holders not yet done answering.
    pending: HashMap<(String, String), Vec<Release>>,
    /// By (network, address): the holders of deleted workloads not yet done answering for
    /// their addresses, which a new workload may take at once.
    freed: HashMap<(String, IpAddr), Vec<Release>>,
    /// By network: the nodes that may still answer under a lease the previous run granted,
    /// until they acknowledge the map as this run loaded it (which has every deletion of the
    /// previous run) or a lease and the margin after the start. A workload the previous run
    /// deleted may have left such a holder answering for its address, and this run does not
    /// know which addresses: a workload created meanwhile waits for them all
    /// (`Service::create_workload`).
    started_wait: HashMap<String, Vec<Release>>,
    /// The newest map version each node acknowledged.
    acked: HashMap<NodeId, u64>,
    /// By (network, workload name): the (id, generation) last confirmed to its holder
    /// unasked, so that each is sent once.
    told: HashMap<(String, String), (u64, u64)>,
    /// By (network, workload name): when the change of holder not confirmed yet began, for
    /// the metrics of moves and failovers.
    started: HashMap<(String, String), Started>,
}

/// When a change of holder to a node began (the request, or for a failover the silent
/// holder's last heartbeat), and why, until its new holder is confirmed.
#[derive(Debug, Clone, Copy)]
struct Started {
    /// The workload's id and the generation of the change.
    id: u64,
    generation: u64,
    at: Instant,
    cause: MoveCause,
}

/// How long a change of holder waits for its confirmation in the metrics' book before it is
/// forgotten (a new holder that never comes back is confirmed by nobody).
const STARTED_KEPT: Duration = Duration::from_secs(3600);

impl Handovers {
    /// Drops the releases that are over at `now`; whether none is left for the workload
    /// named by `key`, nor for its address.
    fn settled(&mut self, key: &(String, String), address: IpAddr, now: Instant) -> bool {
        let by_name = settle(&mut self.pending, key, &self.acked, now);
        let by_address = settle(&mut self.freed, &(key.0.clone(), address), &self.acked, now);
        by_name && by_address
    }

    /// Drops every release that is over at `now`, wherever no workload asks.
    fn prune(&mut self, now: Instant) {
        self.started
            .retain(|_, s| now.saturating_duration_since(s.at) < STARTED_KEPT);
        let acked = &self.acked;
        self.pending.retain(|_, list| {
            list.retain(|r| r.waiting(acked, now));
            !list.is_empty()
        });
        self.freed.retain(|_, list| {
            list.retain(|r| r.waiting(acked, now));
            !list.is_empty()
        });
    }
}

/// Drops the releases of `map[key]` that are over at `now` (the node acknowledged their
/// version, or their time is up); whether none is left.
fn settle<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, Vec<Release>>,
    key: &K,
    acked: &HashMap<NodeId, u64>,
    now: Instant,
) -> bool {
    let Some(list) = map.get_mut(key) else {
        return true;
    };
    list.retain(|r| r.waiting(acked, now));
    if list.is_empty() {
        map.remove(key);
        true
    } else {
        false
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Keeps a node fenced (see `LeaseTable::fence`) until dropped, also when the operation is
/// cancelled half-way.
struct Fence<'a> {
    service: &'a Service,
    node: Option<NodeId>,
}

impl Drop for Fence<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            self.service.leases().unfence(n);
        }
    }
}

/// A holder fenced in the shared database (see [`SqlStore::fence_lease`]) by this
/// coordinator: lifted by [`DbFence::lift`], or, when the operation is cancelled half-way, by
/// a task left behind (or else when the fence times out).
struct DbFence {
    store: SqlStore,
    fence: Option<LeaseFence>,
}

impl DbFence {
    async fn lift(mut self) {
        if let Some(f) = self.fence.take() {
            if let Err(e) = self.store.unfence_lease(&f).await {
                tracing::warn!(node = f.node, "cannot lift the fence (it times out): {e}");
            }
        }
    }
}

impl Drop for DbFence {
    fn drop(&mut self) {
        if let Some(f) = self.fence.take() {
            let store = self.store.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = store.unfence_lease(&f).await {
                        tracing::warn!(node = f.node, "cannot lift the fence (it times out): {e}");
                    }
                });
            }
        }
    }
}

/// What a database fence lasts beyond the wait, the preparing and the commit it covers, should
/// its owner never lift it: the commit's turn at the write lock and its statements.
const FENCE_SLACK: Duration = Duration::from_secs(10);

/// The service's only source of time: the wall clock for records, and the monotonic clock
/// (and sleeping on it) for leases, failovers and moves. A simulation passes its own and
/// drives a whole mesh through minutes in milliseconds.
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> UnixTime;
    /// Monotonic time.
    fn instant(&self) -> Instant;
    /// Resolves once [`Clock::instant`] has reached `at`.
    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// `rx`'s value, unless `deadline` comes first.
pub(crate) async fn answer_within<T>(
    rx: oneshot::Receiver<T>,
    deadline: impl Future<Output = ()>,
) -> Result<Result<T, oneshot::error::RecvError>, ()> {
    tokio::select! {
        r = rx => Ok(r),
        () = deadline => Err(()),
    }
}

/// The system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }

    fn instant(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(at)))
    }
}

/// What this coordinator offers agents for NAT traversal, told in each welcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traversal {
    /// The UDP port of the reflexive address responder (`crate::reflect`); `None`: off.
    pub reflect_port: Option<u16>,
    /// Whether sessions relay datagrams (`crate::relay`).
    pub relay: bool,
}

/// An agent's session after an accepted hello.
#[derive(Debug)]
pub struct Session {
    /// The node.
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// Its network.
    pub network: String,
    /// Whether the hello was a join.
    pub joined: bool,
    /// The encoded `Welcome`.
    pub welcome: Frame,
    /// The session's place in the hub: the full map and the queue that follows.
    pub attached: Attached,
}

/// What a holder's heartbeat is answered with ([`Service::heartbeat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatLease {
    /// The lease to grant; zero while the node's workloads are being taken from it.
    pub lease: Duration,
    /// With shared leases, the network's version in the database now: changes up to it that
    /// this coordinator has not pushed yet are to be followed before the answer.
    pub database: Option<u64>,
    /// With shared leases, the version the holder's map must reach before the lease counts,
    /// at least: the database's now, or while it is away, the one at the last renewal
    /// recorded there (the lease is bounded by that renewal).
    pub floor: Option<u64>,
}

/// See the module documentation.
pub struct Service {
    store: Arc<dyn Store>,
    hub: Hub,
    pub(crate) clock: Arc<dyn Clock>,
    write: Mutex<()>,
    timing: WorkloadTiming,
    leases: std::sync::Mutex<LeaseTable>,
    prepares: std::sync::Mutex<HashMap<PrepareKey, Vec<oneshot::Sender<()>>>>,
    /// Live migrations waiting for the holder's answer, by (holder, workload, generation).
    pub(crate) live_migrations: crate::migrate::Waiting,
    /// Workloads whose holder is silent with no standby online: when to look again (and
    /// whether that was already logged).
    stranded: std::sync::Mutex<HashMap<(String, String, u64), Instant>>,
    /// Work the service started apart from its callers (claims), ended with it.
    tasks: std::sync::Mutex<JoinSet<()>>,
    /// Every coordinator of the mesh, told to agents in each welcome.
    coordinators: std::sync::Mutex<Vec<String>>,
    /// This coordinator's own address in that list.
    advertise: std::sync::Mutex<String>,
    /// Told to agents in each welcome.
    traversal: std::sync::Mutex<Traversal>,
    /// What agents last reported of their paths.
    paths: crate::paths::PathBook,
    /// Who talks to each workload, as its holder reported (for moves' warm-up lists).
    talkers: crate::talkers::TalkerBook,
    /// How often each node may change its endpoints, and the reports waiting their turn.
    endpoint_pace: std::sync::Mutex<EndpointPace>,
    /// With several coordinators on one PostgreSQL store: leases kept in the database, and
    /// this coordinator's claim to decide failovers (see `store/leases.rs`).
    pub(crate) shared: std::sync::OnceLock<SqlStore>,
    leadership: Mutex<Leadership>,
    /// This process among the coordinators (random, for the presence table).
    me: String,
    /// With shared leases: the nodes with a session on any coordinator, as last read.
    present: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    /// With shared leases: when each holder's lease was last recorded in the database by this
    /// coordinator, and the network's version there then. While the database is away a lease
    /// is granted no further than a lease past that, which is what the failover leader,
    /// reading the database, counts from, and counts only on a map at that version.
    recorded: std::sync::Mutex<HashMap<NodeId, (Instant, u64)>>,
    /// Changes of holder not confirmed yet to their new holders (see `Service::confirmed_for`).
    handovers: std::sync::Mutex<Handovers>,
    /// Key rotation and node expiry (`crate::keys`).
    pub(crate) keys: crate::keys::KeyState,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("hub", &self.hub)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Loads every network's map from the store into a new hub whose session queues hold
    /// `queue_depth` messages.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read.
    pub async fn load(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        queue_depth: usize,
    ) -> Result<Self, StoreError> {
        Self::load_with(store, clock, queue_depth, WorkloadTiming::default()).await
    }

    /// As [`Service::load`], with workload timings.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read.
    pub async fn load_with(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        queue_depth: usize,
        timing: WorkloadTiming,
    ) -> Result<Self, StoreError> {
        let hub = Hub::new(queue_depth);
        // Changes of holder the previous run made less than a lease (and the margin, and the
        // wall clock's seconds) ago, and workloads it created as recently: their old holders
        // (of the workload, or of a deleted one at its address) may not have acknowledged them,
        // and this run does not know, so their holders, present or to come (a detached
        // workload attached now), are confirmed a lease after the start.
        let mut recent = Vec::new();
        let mut members_at_start = Vec::new();
        // A change the previous run made while stopping may have left its old holder a stop
        // lease granted just before it: recent for as long as the stop leases could run.
        let window = timing.inherited().max(timing.previous_stop_longest) + timing.margin;
        let recently = clock.now() - i64::try_from(window.as_secs()).unwrap_or(i64::MAX) - 2;
        for net in store.networks().await? {
            let members = store.nodes(Some(&net.name)).await?;
            members_at_start.push((
                net.name.clone(),
                net.version,
                members.iter().map(|n| n.id).collect::<Vec<_>>(),
            ));
            let wls = store.workloads(Some(&net.name)).await?;
            recent.extend(
                wls.iter()
                    .filter(|w| w.moved_at.unwrap_or(w.created_at).max(w.created_at) >= recently)
                    .map(|w| (w.network.clone(), w.name.clone())),
            );
            let policy = policy::current(store.as_ref(), &net.name).await?;
            let mut map = nodes::netmap(net.version, &members, &wls, policy);
            for w in map.workloads.values_mut() {
                w.grace_ms = Some(millis(timing.grace));
            }
            hub.set_map(&net.name, map);
        }
        let started = clock.instant();
        // Holders of the previous run may hold leases it granted, up to its stop lease.
        let until = started + timing.inherited() + timing.margin;
        let mut handovers = Handovers {
            started_wait: members_at_start
                .into_iter()
                .map(|(net, version, nodes)| {
                    let wait = nodes
                        .into_iter()
                        .map(|node| Release {
                            node,
                            version,
                            until,
                        })
                        .collect();
                    (net, wait)
                })
                .collect(),
            ..Handovers::default()
        };
        for key in recent {
            let wait = Release {
                node: 0,
                version: u64::MAX,
                until,
            };
            handovers.pending.insert(key, vec![wait]);
        }
        Ok(Service {
            store,
            hub,
            clock,
            write: Mutex::new(()),
            timing,
            // Holders of the previous run may hold leases it granted: they count from now.
            leases: std::sync::Mutex::new(
                LeaseTable::new(timing.lease, timing.margin, started).inherit(timing.inherited()),
            ),
            prepares: std::sync::Mutex::new(HashMap::new()),
            live_migrations: crate::migrate::Waiting::default(),
            stranded: std::sync::Mutex::new(HashMap::new()),
            tasks: std::sync::Mutex::new(JoinSet::new()),
            coordinators: std::sync::Mutex::new(Vec::new()),
            advertise: std::sync::Mutex::new(String::new()),
            traversal: std::sync::Mutex::new(Traversal::default()),
            paths: crate::paths::PathBook::new(),
            talkers: crate::talkers::TalkerBook::new(),
            endpoint_pace: std::sync::Mutex::new(EndpointPace::default()),
            shared: std::sync::OnceLock::new(),
            leadership: Mutex::new(Leadership::default()),
            me: random_secret(),
            present: std::sync::Mutex::new(std::collections::HashSet::new()),
            recorded: std::sync::Mutex::new(HashMap::new()),
            handovers: std::sync::Mutex::new(handovers),
            keys: crate::keys::KeyState::default(),
        })
    }

    /// Runs `work` apart from the caller, as part of the service: [`Service::abort_tasks`]
    /// ends it.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Reap what has finished, so that the set does not grow.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(work);
    }

    /// Ends the work started by [`Service::spawn`] (the service is going away: a simulated
    /// crash, or a shutdown).
    pub fn abort_tasks(&self) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .abort_all();
    }

    /// Shares workload leases with the other coordinators of this PostgreSQL store: renewals
    /// are written to it, and failovers are decided by one coordinator at a time.
    pub fn share_leases(&self, store: SqlStore) {
        let _ = self.shared.set(store);
    }

    /// Gives up the failover leadership (at shutdown: its connection must go back to the
    /// pool before the pool can close, and another coordinator takes over at once).
    pub async fn resign(&self) {
        *self.leadership.lock().await = Leadership::default();
    }

    /// Sets the coordinator addresses (`host:port`) told to agents in each welcome.
    pub fn set_coordinators(&self, advertise: &str, list: Vec<String>) {
        *self.advertise.lock().unwrap_or_else(|p| p.into_inner()) = advertise.to_string();
        *self.coordinators.lock().unwrap_or_else(|p| p.into_inner()) = list;
    }

    /// What agents last reported of their paths to their peers.
    pub fn paths(&self) -> &crate::paths::PathBook {
        &self.paths
    }

    /// A holder's report of who talks to `workload` (kept only if `node` holds it now).
    pub fn record_talkers(&self, network: &str, node: NodeId, workload: &str, nodes: Vec<NodeId>) {
        let kept = self.talkers.record(node, workload, nodes, |name| {
            self.hub.holder_of(network, name) == Some(node)
        });
        if !kept {
            tracing::debug!(
                node,
                workload,
                "a talker report from a node that does not hold the workload, ignored"
            );
        }
    }

    /// Sets what the welcome tells agents of NAT traversal (nothing until set).
    pub fn set_traversal(&self, traversal: Traversal) {
        *self.traversal.lock().unwrap_or_else(|p| p.into_inner()) = traversal;
    }

    /// Lets each node change its endpoints `burst` times at once, then once per `interval`
    /// (see [`crate::endpoint_pace`]; the defaults until set). Reports waiting are dropped.
    pub fn set_endpoint_pace(&self, interval: Duration, burst: u32) {
        *self.pace() = EndpointPace::new(interval, burst);
    }

    fn pace(&self) -> std::sync::MutexGuard<'_, EndpointPace> {
        self.endpoint_pace.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The workload timings.
    pub fn timing(&self) -> WorkloadTiming {
        self.timing
    }

    /// The coordinator is about to stop: from now on heartbeats are answered with the stop
    /// lease ([`WorkloadTiming::stop_lease`]). Returns how long to keep serving at most so
    /// that every holder's next heartbeat gets it (a heartbeat interval and a bit), or `None`
    /// when there is no stop lease. Wait until [`Service::without_stop_lease`] is zero (and
    /// then [`STOP_LINGER`]) or that time has passed, then stop.
    pub fn begin_stop(&self) -> Option<Duration> {
        let lease = self.timing.stop_lease?;
        let mut leases = self.leases();
        // Read under the lock: a heartbeat answered with the usual lease is stamped before.
        let now = self.clock.instant();
        leases.stop(lease, now);
        Some(self.stop_wait())
    }

    /// How long a stopping coordinator serves at most for every holder's next heartbeat to
    /// get the stop lease: a heartbeat interval and a bit.
    pub fn stop_wait(&self) -> Duration {
        self.timing.lease / HEARTBEATS_PER_LEASE + STOP_HEARTBEAT_SLACK
    }

    /// What to record ([`crate::stop_record::record`]) before [`Service::begin_stop`]: how
    /// long from now a stop lease granted during the stop may run (the wait, the linger, the
    /// stop lease and a slack for the time between the record and the stop). `None`: no stop
    /// lease.
    ///
    /// Never shorter than what is left of the leases this run inherited (a predecessor's stop
    /// lease, longer when it ran with a longer lease): the record replaces its predecessor's.
    pub fn stop_record_length(&self) -> Option<Duration> {
        let lease = self.timing.stop_lease?;
        let own = self.stop_wait() + STOP_LINGER + lease + STOP_RECORD_SLACK;
        let inherited = self
            .leases()
            .inherited_until()
            .saturating_duration_since(self.clock.instant());
        Some(own.max(inherited))
    }

    /// While stopping: the holders with a running lease that have not had the stop lease yet.
    pub fn without_stop_lease(&self) -> usize {
        self.leases().without_stop_lease()
    }

    /// How long a database fence lasts unless lifted: past the longest wait for a lease to
    /// run out, the preparing of the destination and the commit.
    fn fence_ms(&self) -> u64 {
        millis(self.timing.lease + self.timing.margin + self.timing.prepare_timeout + FENCE_SLACK)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, LeaseTable> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A holder's heartbeat arrived: the lease to grant and, with shared leases, the versions
    /// it goes with.
    pub async fn heartbeat(&self, node: NodeId, network: &str) -> HeartbeatLease {
        let sent = self.clock.instant();
        let local = self.leases().heartbeat(node, sent);
        let Some(store) = self.shared.get() else {
            return HeartbeatLease {
                lease: local,
                database: None,
                floor: None,
            };
        };
        // A database that does not answer must not hold the answer back past the holder's
        // next heartbeat: then this coordinator answers on its own word.
        let deadline = self.clock.instant() + SHARED_RENEWAL_WAIT;
        let renewed = tokio::select! {
            r = store.renew_lease(node, network) => Some(r),
            () = self.clock.sleep_until(deadline) => None,
        };
        let mut recorded = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
        match renewed {
            Some(Ok(r)) if r.renewed => {
                recorded.insert(node, (sent, r.version));
                HeartbeatLease {
                    lease: local,
                    database: Some(r.version),
                    floor: Some(r.version),
                }
            }
            Some(Ok(r)) => HeartbeatLease {
                lease: Duration::ZERO,
                database: Some(r.version),
                floor: Some(r.version),
            },
            failed => {
                // Not recorded: the failover leader, which counts from the database, may fail
                // this holder over a lease (plus margin) after the last renewal it can see. So
                // the lease granted here ends no later than a lease after that renewal: a
                // database outage shorter than a lease goes unnoticed, a longer one silences
                // the holder before anyone else can take its addresses.
                if let Some(Err(e)) = failed {
                    tracing::debug!(node, "cannot renew the lease in the database: {e}");
                } else {
                    tracing::debug!(node, "the database did not renew the lease in time");
                }
                // And it counts only on a map with every change that renewal could see
                // (another coordinator's, which this one may not have followed).
                let (bound, floor) =
                    recorded
                        .get(&node)
                        .map_or((Duration::ZERO, None), |&(at, version)| {
                            (
                                (at + self.timing.lease).saturating_duration_since(sent),
                                Some(version),
                            )
                        });
                HeartbeatLease {
                    lease: local.min(bound),
                    database: None,
                    floor,
                }
            }
        }
    }

    /// The nodes with a session here or (shared store) on any coordinator, read from the
    /// database now (as last read when it cannot be).
    pub async fn online_anywhere(&self) -> std::collections::HashSet<NodeId> {
        let mut all = self.hub.online();
        if let Some(store) = self.shared.get() {
            match store.present().await {
                Ok(p) => {
                    all.extend(p.iter().copied());
                    *self.present.lock().unwrap_or_else(|p| p.into_inner()) = p;
                }
                Err(_) => all.extend(
                    self.present
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .copied(),
                ),
            }
        }
        all
    }

    /// Whether `node` has a session here or (shared leases) on another coordinator.
    fn is_online_anywhere(&self, network: &str, node: NodeId) -> bool {
        self.hub.is_online(network, node)
            || (self.shared.get().is_some()
                && self
                    .present
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&node))
    }

    /// With shared leases: records in the database that this coordinator still has its
    /// sessions (call it every second or so).
    pub async fn refresh_presence(&self) {
        let Some(store) = self.shared.get() else {
            return;
        };
        let mine: Vec<NodeId> = self.hub.online().into_iter().collect();
        if let Err(e) = store.presence_refresh(&self.me, &mine).await {
            tracing::debug!("cannot record this coordinator's sessions: {e}");
        }
        let advertise = self.advertise();
        if !advertise.is_empty() {
            if let Err(e) = store.report_coordinator(&advertise, mine.len()).await {
                tracing::debug!("cannot report this coordinator: {e}");
            }
        }
    }

    /// The address this coordinator puts first in join tokens (empty until set).
    fn advertise(&self) -> String {
        self.advertise
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every coordinator of the mesh with its session count and whether it is up: from the
    /// database with a shared store (as each reported itself), else this one alone.
    pub async fn coordinators_status(&self) -> Vec<(String, u64, bool)> {
        if let Some(store) = self.shared.get() {
            match store.coordinators().await {
                Ok(list) => return list,
                Err(e) => tracing::warn!("cannot read the coordinators: {e}"),
            }
        }
        let online = self.hub.online().len();
        vec![(
            self.advertise(),
            u64::try_from(online).unwrap_or(u64::MAX),
            true,
        )]
    }

    /// With shared leases: takes every renewal any coordinator recorded into the table this
    /// coordinator decides from, and who is online where.
    async fn refresh_leases(&self) {
        let Some(store) = self.shared.get() else {
            return;
        };
        match store.present().await {
            Ok(p) => *self.present.lock().unwrap_or_else(|p| p.into_inner()) = p,
            Err(e) => tracing::debug!("cannot read who is online: {e}"),
        }
        match store.lease_ages().await {
            Ok(ages) => {
                let now = self.clock.instant();
                let mut l = self.leases();
                for (node, ago) in ages {
                    if let Some(at) = now.checked_sub(Duration::from_millis(ago)) {
                        l.granted(node, at);
                    }
                }
            }
            Err(e) => tracing::debug!("cannot read the shared leases: {e}"),
        }
    }

    /// A node of this coordinator's sessions reports it is ready to take a workload: wakes
    /// the move waiting for it here, and (shared store) tells the other coordinators, one of
    /// which may be the one waiting.
    pub async fn prepared_here(
        &self,
        node: NodeId,
        network: &str,
        workload: &str,
        generation: u64,
    ) {
        self.prepared(node, workload, generation);
        if let Some(store) = self.shared.get() {
            let note = PrepareNote {
                node,
                network: network.to_string(),
                workload: workload.to_string(),
                generation,
                warm: None,
                handover_to: None,
                attempt: None,
                abort: false,
                handed_over: None,
            };
            let payload = serde_json::to_string(&note).unwrap_or_default();
            if let Err(e) = store.notify(PREPARED_CHANNEL, &payload).await {
                tracing::debug!(node, "cannot pass on a Prepared: {e}");
            }
        }
    }

    /// Another coordinator asks for a `Prepare` to be sent to a node: sent when the node's
    /// session is here.
    pub fn prepare_requested(self: &Arc<Self>, note: &PrepareNote) {
        if note.handover_to.is_some() || note.abort {
            self.handover_requested(note);
            return;
        }
        let frame: Frame = encode(&ServerMessage::Prepare {
            workload: note.workload.clone(),
            generation: note.generation,
            warm: note.warm.clone(),
        })
        .into();
        self.hub.send_to(&note.network, note.node, frame);
    }

    /// A node reports it is ready to take a workload (answer to `Prepare`).
    pub fn prepared(&self, node: NodeId, workload: &str, generation: u64) {
        let waiter = self
            .prepares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(node, workload.to_string(), generation));
        for tx in waiter.into_iter().flatten() {
            let _ = tx.send(());
        }
    }

    /// Asks the destination of a move to bring its tunnels up and waits (bounded) for it.
    async fn prepare(&self, w: &WorkloadRecord, to: NodeId) -> Option<Duration> {
        let here = self.hub.is_online(&w.network, to);
        // With a shared store the destination may have its session with another coordinator.
        if !here && !self.is_online_anywhere(&w.network, to) {
            return None;
        }
        let started = self.clock.instant();
        let generation = w.generation + 1;
        let key = (to, w.name.clone(), generation);
        let (tx, rx) = oneshot::channel();
        self.prepares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(tx);
        // The peers that matter: the holder and those it says talk to the workload.
        let warm = self.talkers.warm_list(&w.name, w.holder, to);
        let frame: Frame = encode(&ServerMessage::Prepare {
            workload: w.name.clone(),
            generation,
            warm: warm.clone(),
        })
        .into();
        let sent = match (here, self.shared.get()) {
            (true, _) => self.hub.send_to(&w.network, to, frame),
            (false, Some(store)) => {
                let note = PrepareNote {
                    node: to,
                    network: w.network.clone(),
                    workload: w.name.clone(),
                    generation,
                    warm,
                    handover_to: None,
                    attempt: None,
                    abort: false,
                    handed_over: None,
                };
                let payload = serde_json::to_string(&note).unwrap_or_default();
                store.notify(PREPARE_CHANNEL, &payload).await.is_ok()
            }
            (false, None) => false,
        };
        let answered = sent
            && matches!(
                answer_within(
                    rx,
                    self.clock
                        .sleep_until(started + self.timing.prepare_timeout)
                )
                .await,
                Ok(Ok(()))
            );
        {
            let mut p = self.prepares.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(waiters) = p.get_mut(&key) {
                waiters.retain(|t| !t.is_closed());
                if waiters.is_empty() {
                    p.remove(&key);
                }
            }
        }
        if answered {
            Some(self.clock.instant().saturating_duration_since(started))
        } else if !sent {
            tracing::info!(workload = %w.name, node = to, "could not ask the destination to prepare (its queue is full); moving anyway");
            None
        } else {
            tracing::info!(workload = %w.name, node = to, "the destination did not report ready in time; moving anyway");
            None
        }
    }

    /// Carries out a checked change of holder: prepare the destination, then commit the new
    /// generation and queue it to every session, under the write lock.
    ///
    /// `fenced`: the old holder, already fenced by a failover (unfenced here when done). A
    /// planned change away from a holder that has not sent a heartbeat for two heartbeat
    /// intervals fences it too and waits until its lease has surely run out: a holder that is
    /// cut off cannot learn of the change, and must have stopped answering before the new
    /// holder starts. Any other change commits at once, and its new holder answers only once
    /// the old one has acknowledged it or its lease has surely run out (`handed_over`).
    ///
    /// `cause` and `since` (when the change began, if before this call: a silent holder's
    /// last heartbeat) are for the metrics, which time the change until its new holder is
    /// confirmed (`tell_confirmed`).
    async fn execute(
        &self,
        plan: PlannedMove,
        why: &str,
        fenced: Option<NodeId>,
        cause: MoveCause,
        since: Option<Instant>,
    ) -> Result<MoveOutcome, ApiError> {
        let started = self.clock.instant();
        let since = since.unwrap_or(started);
        let mut fence = Fence {
            service: self,
            node: fenced,
        };
        if plan.is_noop() {
            return Ok(MoveOutcome {
                workload: plan.workload,
                changed: false,
                prepared_in: None,
                handed_over_in: None,
                took: self.clock.instant().saturating_duration_since(started),
            });
        }
        if fence.node.is_none() && self.shared.get().is_some() {
            self.refresh_leases().await;
        }
        // A quiet holder fenced here in the database (shared store): lifted once committed, or
        // on any way out before.
        let mut fenced_in_db = None;
        if fence.node.is_none() {
            if let Some(old) = plan
                .workload
                .holder
                .filter(|h| Some(*h) != plan.to.as_ref().map(|n| n.id))
            {
                let silent = 2 * (self.leases().lease() / HEARTBEATS_PER_LEASE);
                let mut until = {
                    let mut l = self.leases();
                    let quiet = l.heard_ago(old, self.clock.instant()) > silent;
                    quiet.then(|| {
                        l.fence(old);
                        l.expires(old)
                    })
                };
                if let (Some(store), Some(_)) = (self.shared.get(), until) {
                    // Fenced here alone, the holder could still be renewed by the coordinator
                    // its heartbeats reach (it may just have come back): fence it in the
                    // database, where renewals are decided, and count its lease from the last
                    // renewal any coordinator recorded (as of the fence, read with it). The
                    // fence outlasts the wait, the preparing and the commit. Renewed
                    // meanwhile: not quiet after all, an ordinary handover.
                    match store
                        .fence_lease(old, millis(silent), self.fence_ms())
                        .await
                    {
                        Ok(Some(f)) => {
                            fenced_in_db = Some(DbFence {
                                store: store.clone(),
                                fence: Some(f),
                            });
                            let left = (self.timing.lease + self.timing.margin)
                                .saturating_sub(Duration::from_millis(f.renewed_ago_ms));
                            let ends = self.clock.instant() + left;
                            until = Some(self.leases().expires(old).max(ends));
                        }
                        Ok(None) => {
                            self.leases().unfence(old);
                            until = None;
                        }
                        Err(e) => {
                            self.leases().unfence(old);
                            telemetry::move_failed(cause);
                            return Err(ApiError::Internal(e));
                        }
                    }
                }
                if let Some(until) = until {
                    fence.node = Some(old);
                    tracing::info!(workload = %plan.workload.name, holder = old, "the holder is not answering: waiting for its lease to run out before moving");
                    self.clock.sleep_until(until).await;
                }
            }
        }
        let prepared_in = match &plan.to {
            Some(to) => self.prepare(&plan.workload, to.id).await,
            None => None,
        };
        // A live migration commits only once the holder's application handed its state over.
        let handover = match (plan.live, plan.workload.holder, &plan.to) {
            (true, Some(holder), Some(to)) => Some(
                self.ask_handover(&plan.workload, holder, to)
                    .await
                    .inspect_err(|_| telemetry::move_failed(cause))?,
            ),
            _ => None,
        };
        let handed_over_in = handover.as_ref().map(|(took, _)| *took);
        let _w = self.write.lock().await;
        let committed = workloads::commit_holder(self.store(), self.clock.now(), &plan).await;
        if let Some(f) = fenced_in_db {
            // Its later heartbeats get leases that count only once its map has the change.
            f.lift().await;
        }
        let (rec, version) = match committed {
            Ok(c) => c,
            Err(e) => {
                telemetry::move_failed(cause);
                if let Some((_, asked)) = handover {
                    // Handed over, but the move did not commit: the application carries on.
                    self.abort_handover(asked).await;
                }
                return Err(e);
            }
        };
        if let Some(h) = rec.holder {
            self.leases().granted(h, self.clock.instant());
            telemetry::move_committed(cause);
            // Before the change can be confirmed (`handed_over`, on another thread too).
            self.handovers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .started
                .insert(
                    (rec.network.clone(), rec.name.clone()),
                    Started {
                        id: rec.id,
                        generation: rec.generation,
                        at: since,
                        cause,
                    },
                );
        }
        // The holder it leaves may answer until it acknowledges the change or its lease has
        // surely run out; not one whose lease was waited out (fenced) before the commit.
        // Recorded before the change reaches any session: the new holder's first heartbeat
        // may be answered (on another thread) before the publishing returns.
        let old = plan.workload.holder.filter(|_| fence.node.is_none());
        self.handed_over(&rec, old, version, false);
        self.upsert_workload(&rec, version).await;
        self.tell_confirmed(&rec.network, std::slice::from_ref(&rec.name));
        let took = self.clock.instant().saturating_duration_since(started);
        tracing::info!(
            workload = %rec.name,
            network = %rec.network,
            from = ?rec.previous,
            to = ?rec.holder,
            generation = rec.generation,
            prepared_ms = prepared_in.map(|d| d.as_secs_f64() * 1000.0),
            took_ms = took.as_secs_f64() * 1000.0,
            "workload {why}"
        );
        drop(fence);
        Ok(MoveOutcome {
            workload: rec,
            changed: true,
            prepared_in,
            handed_over_in,
            took,
        })
    }

    /// A change of `rec`'s holder at map `version`, published: `old`, the holder it took the
    /// workload from (`None`: nobody, or one whose lease has surely run out), may answer until
    /// it acknowledges a version at least `version` or until a lease plus the margin from now
    /// (any lease it holds without knowing of the change was granted before the change was
    /// published: later answers carry its version, which the holder's map must reach first).
    /// With `tell` (the change is in the hub's map), the new holder is told at once when
    /// nothing is left to wait for.
    fn handed_over(&self, rec: &WorkloadRecord, old: Option<NodeId>, version: u64, tell: bool) {
        {
            let mut h = self.handovers.lock().unwrap_or_else(|p| p.into_inner());
            // Read under the lock that a heartbeat's answer checks for this release (see
            // `Service::unacknowledged_release`): a renewal either counts here or is answered
            // at `version`.
            let until = self.may_answer_until(old);
            // The new holder's answers for a deleted workload at the same address are no
            // second holder.
            if let Some(freed) = h
                .freed
                .get_mut(&(rec.network.clone(), IpAddr::V4(rec.address)))
            {
                freed.retain(|r| Some(r.node) != rec.holder);
            }
            let key = (rec.network.clone(), rec.name.clone());
            let list = h.pending.entry(key).or_default();
            // Nor its own earlier answers.
            list.retain(|r| Some(r.node) != rec.holder);
            if let Some(o) = old.filter(|o| Some(*o) != rec.holder) {
                list.push(Release {
                    node: o,
                    version,
                    until,
                });
            }
        }
        if tell {
            self.tell_confirmed(&rec.network, std::slice::from_ref(&rec.name));
        }
    }

    /// `rec` was deleted at map `version`: whoever may still answer for it (its holder, until
    /// it acknowledges `version` or its lease has surely run out, and former holders not done
    /// yet) holds up the first holder of any workload that takes its address.
    fn address_freed(&self, rec: &WorkloadRecord, version: u64) {
        self.free_address(&rec.network, &rec.name, IpAddr::V4(rec.address), || {
            rec.holder.map(|o| Release {
                node: o,
                version,
                until: self.may_answer_until(Some(o)),
            })
        });
    }

    /// Until when `old`, a holder this coordinator just took a workload from (or nobody), may
    /// still answer for it: a lease (the stop lease while stopping) plus the margin from
    /// now, or (alone, hearing every
    /// heartbeat) when its lease runs out, if earlier.
    fn may_answer_until(&self, old: Option<NodeId>) -> Instant {
        let (granting, inherited) = {
            let l = self.leases();
            (l.granting(), l.inherited_until())
        };
        // Never before what the previous run may have granted (its stop lease).
        let until = (self.clock.instant() + granting + self.timing.margin).max(inherited);
        match old {
            Some(o) if self.shared.get().is_none() => until.min(self.leases().expires(o)),
            _ => until,
        }
    }

    /// Workload `name` of `network` is gone: whoever was waited for before its holder answers
    /// (and the `release` made under the lock, as in `Service::handed_over`) now holds up its
    /// address instead.
    fn free_address(
        &self,
        network: &str,
        name: &str,
        address: IpAddr,
        release: impl FnOnce() -> Option<Release>,
    ) {
        let mut h = self.handovers.lock().unwrap_or_else(|p| p.into_inner());
        let key = (network.to_string(), name.to_string());
        h.started.remove(&key);
        let mut list = h.pending.remove(&key).unwrap_or_default();
        list.extend(release());
        if !list.is_empty() {
            h.freed
                .entry((network.to_string(), address))
                .or_default()
                .extend(list);
        }
    }

    /// Another coordinator deleted workload `name` of `network` (read from the change log,
    /// before the hub forgets it): this one does not know the version to acknowledge, so
    /// whoever held it here, or anyone in between, is waited for until a lease plus the margin
    /// has passed before a new workload's first holder answers for its address.
    pub(crate) fn deleted_elsewhere(&self, network: &str, name: &str) {
        let Some(w) = self
            .workloads_of(network)
            .into_iter()
            .find(|w| w.name == name)
        else {
            return;
        };
        self.free_address(network, name, w.address.addr(), || {
            Some(Release {
                node: 0,
                version: u64::MAX,
                until: self.may_answer_until(None),
            })
        });
    }

    /// The workloads of `network`'s map in the hub.
    fn workloads_of(&self, network: &str) -> Vec<meshlink_proto::WorkloadInfo> {
        self.hub.network_workloads(network, None)
    }

    /// The workloads `node` holds in `network`'s map and may answer for, with their
    /// generations: those with no former holder left that may still answer (none that has
    /// neither acknowledged the change nor surely lost its lease; after a start, none moved
    /// by the previous run less than a lease before it, until a lease after the start).
    pub fn confirmed_for(&self, network: &str, node: NodeId) -> Vec<Confirmation> {
        let now = self.clock.instant();
        // Only the node's own workloads: this runs for every heartbeat.
        let workloads = self.hub.network_workloads(network, Some(node));
        let mut h = self.handovers.lock().unwrap_or_else(|p| p.into_inner());
        workloads
            .iter()
            .filter(|w| {
                h.settled(
                    &(network.to_string(), w.name.clone()),
                    w.address.addr(),
                    now,
                )
            })
            .map(|w| Confirmation {
                workload: w.id,
                generation: w.generation,
            })
            .collect()
    }

    /// The newest change of `network` that took a workload (or a deleted workload's address)
    /// from `node` and that it has not acknowledged yet, if any. A lease granted to it now must
    /// count only once its map has that change: the next holder's wait for it was fixed when
    /// the change was made, and a renewal answered at an older version, between the change and
    /// its publishing, would let it answer past that wait.
    pub fn unacknowledged_release(&self, network: &str, node: NodeId) -> Option<u64> {
        let h = self.handovers.lock().unwrap_or_else(|p| p.into_inner());
        let acked = h.acked.get(&node).copied().unwrap_or(0);
        let newest = |list: &Vec<Release>| {
            list.iter()
                .filter(|r| r.node == node && r.version > acked)
                .map(|r| r.version)
                .max()
        };
        let by_name = h.pending.iter().filter(|((net, _), _)| net == network);
        let by_address = h.freed.iter().filter(|((net, _), _)| net == network);
        by_name
            .filter_map(|(_, list)| newest(list))
            .chain(by_address.filter_map(|(_, list)| newest(list)))
            .max()
    }

    /// `node` acknowledged map `version` (a heartbeat): the workloads it held before a change
    /// that `version` includes are confirmed to their new holders.
    pub fn acknowledged(&self, network: &str, node: NodeId, version: u64) {
        let waiting: Vec<String> = {
            let mut h = self.handovers.lock().unwrap_or_else(|p| p.into_inner());
            let acked = h.acked.entry(node).or_insert(0);
            if *acked >= version {
                return;
            }
            *acked = version;
            let mine =
                |list: &Vec<Release>| list.iter().any(|r| r.node == node && r.version <= version);
            let mut names: Vec<String> = h
                .pending
                .iter()
                .filter(|((net, _), list)| net == network && mine(list))
                .map(|((_, name), _)| name.clone())
                .collect();
            let addresses: Vec<IpAddr> = h
                .freed
                .iter()
                .filter(|((net, _), list)| net == network && mine(list))
                .map(|((_, a), _)| *a)
                .collect();
            if !addresses.is_empty() {
                names.extend(
                    self.workloads_of(network)
                        .into_iter()
                        .filter(|w| addresses.contains(&w.address.addr()))
                        .map(|w| w.name),
                );
            }
            names
        };
        if !waiting.is_empty() {
            self.tell_confirmed(network, &waiting);
        }
    }

    /// Tells the holder of each of `names` (in `network`) that it may answer, unasked (a lease
    /// message answering no heartbeat), once nothing is left to wait for; at most once per
    /// generation.
    fn tell_confirmed(&self, network: &str, names: &[String]) {
        let now = self.clock.instant();
        let workloads = self.workloads_of(network);
        let mut holders = Vec::new();
        let mut confirmed = Vec::new();
        {
            let mut h = self.handovers.lock().unwrap_or_else(|p| p.into_inner());
            for name in names {
                let Some(w) = workloads.iter().find(|w| &w.name == name) else {
                    continue;
                };
                let Some(holder) = w.holder else { continue };
                let key = (network.to_string(), name.clone());
                if h.told.get(&key) == Some(&(w.id, w.generation))
                    || !h.settled(&key, w.address.addr(), now)
                {
                    continue;
                }
                // The start of this very generation's change: a later change's start, written
                // before its generation reached this map, stays for its own confirmation.
                if h.started
                    .get(&key)
                    .is_some_and(|s| (s.id, s.generation) == (w.id, w.generation))
                {
                    if let Some(s) = h.started.remove(&key) {
                        confirmed.push((s.cause, now.saturating_duration_since(s.at)));
                    }
                }
                h.told.insert(key, (w.id, w.generation));
                holders.push(holder);
            }
        }
        for (cause, took) in confirmed {
            telemetry::handover_confirmed(cause, took);
        }
        holders.sort_unstable();
        holders.dedup();
        for holder in holders {
            let frame: Frame = encode(&ServerMessage::Lease {
                seq: 0,
                lease_ms: 0,
                version: self.hub.version(network).unwrap_or(0),
                confirmed: Some(self.confirmed_for(network, holder)),
            })
            .into();
            self.hub.send_to(network, holder, frame);
        }
    }

    /// Confirms every handover whose wait is over by time alone (an old holder's lease, the
    /// start); called by `failover_tick`.
    fn confirm_tick(&self) {
        let now = self.clock.instant();
        self.handovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .prune(now);
        let mut by_network: HashMap<String, Vec<String>> = HashMap::new();
        for (network, w) in self.hub.workloads() {
            if w.holder.is_some() {
                by_network.entry(network).or_default().push(w.name);
            }
        }
        for (network, names) in by_network {
            self.tell_confirmed(&network, &names);
        }
    }

    /// A workload as agents see it, with this coordinator's grace period.
    pub(crate) fn info(&self, rec: &WorkloadRecord) -> meshlink_proto::WorkloadInfo {
        let mut i = workloads::info(rec);
        i.grace_ms = self.info_grace_ms();
        i
    }

    /// The grace period told to agents in maps.
    pub(crate) fn info_grace_ms(&self) -> Option<u64> {
        Some(millis(self.timing.grace))
    }

    /// The write lock every change of a map is made under (see the module documentation).
    pub(crate) async fn lock_writes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.write.lock().await
    }

    /// A workload this run had not seen before (created here, or by another coordinator
    /// sharing the store): soon after a start, its address may still be answered for under a
    /// lease of the previous run, or of a holder of a workload deleted before this run loaded
    /// the map (a deletion this run never saw): its first holder waits for `started_wait`.
    fn wait_for_start(&self, rec: &WorkloadRecord) {
        let now = self.clock.instant();
        let mut h = self.handovers.lock().unwrap_or_else(|p| p.into_inner());
        let h = &mut *h;
        if let Some(wait) = h.started_wait.get_mut(&rec.network) {
            wait.retain(|r| r.waiting(&h.acked, now));
            if !wait.is_empty() {
                h.freed
                    .entry((rec.network.clone(), IpAddr::V4(rec.address)))
                    .or_default()
                    .extend(wait.iter().copied());
            }
        }
    }

    /// A workload's record as read from the store: when its holder changed since this
    /// coordinator last saw it (another coordinator moved it), the new holder's lease counts
    /// from now here, as it does where the change was made.
    pub(crate) fn holder_changed(&self, rec: &WorkloadRecord) {
        // The workload's id and generation in the hub's map, as far as this one goes (a
        // workload deleted and created again under its name is another one).
        let known = self
            .hub
            .workload_generation(&rec.network, &rec.name)
            .filter(|(id, _)| *id == rec.id)
            .map(|(_, g)| g);
        if known.is_none_or(|g| g < rec.generation) {
            if known.is_none() {
                // First seen by this run (created elsewhere, or while it was down).
                self.wait_for_start(rec);
            }
            if let Some(h) = rec.holder {
                self.leases().granted(h, self.clock.instant());
            }
            // The holder it had here may still answer: another coordinator made the change,
            // and this one does not know the version to acknowledge, so the new holder is
            // confirmed here once the old holder's lease has surely run out. When this
            // coordinator missed generations in between (several changes read at once, or a
            // whole map reloaded), any node may have held them, the new holder included
            // (moved away and back): whoever it was (0) is waited for.
            let old = if known.is_some_and(|g| g + 1 == rec.generation) {
                self.workloads_of(&rec.network)
                    .into_iter()
                    .find(|w| w.name == rec.name)
                    .and_then(|w| w.holder)
            } else if self
                .hub
                .workload_generation(&rec.network, &rec.name)
                .is_none()
                && rec.generation <= 1
            {
                None // its first holder: nobody held it before
            } else {
                Some(0)
            };
            self.handed_over(rec, old, u64::MAX, false);
        }
    }

    /// Queues a change this coordinator committed at `delta.to_version` to the network's
    /// sessions. When the hub is not at the version before it (another coordinator sharing
    /// the store committed in between), the change log is replayed up to it instead, so
    /// that nothing is skipped. Call it with the write lock held.
    pub(crate) async fn publish(&self, network: &str, delta: NetmapDelta) {
        match self.hub.version(network) {
            Some(v) if v + 1 == delta.to_version => {
                self.hub
                    .apply_delta_at(network, delta, self.clock.instant());
            }
            Some(v) if v >= delta.to_version => {}
            _ => {
                if let Err(e) = self.catch_up_locked(network).await {
                    tracing::warn!(
                        network,
                        "cannot read the change log (the next poll retries): {e}"
                    );
                }
            }
        }
    }

    /// Tells every session of the node's network its new entry, at `version` (see
    /// [`Service::publish`]).
    pub(crate) async fn publish_node(&self, node: &NodeRecord, version: u64) {
        self.publish(
            &node.network,
            NetmapDelta {
                to_version: version,
                upsert: vec![peer_info(node)],
                ..NetmapDelta::default()
            },
        )
        .await;
    }

    /// Tells every session of the workload's network its new state, at `version`.
    async fn upsert_workload(&self, rec: &WorkloadRecord, version: u64) {
        self.publish(
            &rec.network,
            NetmapDelta {
                to_version: version,
                upsert_workloads: vec![self.info(rec)],
                ..NetmapDelta::default()
            },
        )
        .await;
    }

    /// Creates a workload (admin).
    ///
    /// # Errors
    /// As [`workloads::create_workload`].
    pub async fn create_workload(&self, req: CreateWorkload) -> Result<WorkloadRecord, ApiError> {
        let _w = self.write.lock().await;
        let (rec, version) =
            workloads::create_workload(self.store(), self.clock.now(), &Caller::Admin, req).await?;
        self.wait_for_start(&rec);
        self.upsert_workload(&rec, version).await;
        Ok(rec)
    }

    /// Deletes a workload (admin).
    ///
    /// # Errors
    /// As [`workloads::delete_workload`].
    pub async fn delete_workload(
        &self,
        network: &str,
        name: &str,
    ) -> Result<WorkloadRecord, ApiError> {
        let _w = self.write.lock().await;
        let (rec, version) =
            workloads::delete_workload(self.store(), &Caller::Admin, network, name).await?;
        // Its address is free for a new workload at once, but its holder (and any former
        // holder still answering) may answer for it until it has the deletion.
        self.address_freed(&rec, version);
        self.publish(
            network,
            NetmapDelta {
                to_version: version,
                remove_workloads: vec![rec.name.clone()],
                ..NetmapDelta::default()
            },
        )
        .await;
        Ok(rec)
    }

    /// Attaches, moves (`to: Some`) or detaches (`to: None`) a workload (admin).
    ///
    /// # Errors
    /// As [`workloads::plan_move`] and [`workloads::commit_holder`].
    pub async fn move_workload(
        &self,
        network: &str,
        name: &str,
        to: Option<&str>,
    ) -> Result<MoveOutcome, ApiError> {
        let plan = workloads::plan_move(self.store(), &Caller::Admin, network, name, to).await?;
        let why = if to.is_some() {
            "moved by an operator"
        } else {
            "detached by an operator"
        };
        self.execute(plan, why, None, MoveCause::Operator, None)
            .await
    }

    /// Moves a workload with its application's state (admin): the holder's application hands
    /// its connections and data over to the same application on `to` before the move
    /// commits (see `migrate.rs`).
    ///
    /// # Errors
    /// As [`Service::move_workload`]; [`ApiError::Conflict`] when the workload has no holder,
    /// its holder is offline, or its application did not hand over (nothing moved then).
    pub async fn migrate_workload(
        &self,
        network: &str,
        name: &str,
        to: &str,
    ) -> Result<MoveOutcome, ApiError> {
        let mut plan =
            workloads::plan_move(self.store(), &Caller::Admin, network, name, Some(to)).await?;
        if plan.is_noop() {
            return Err(ApiError::Conflict(format!(
                "workload {name} is already held by {to}"
            )));
        }
        let Some(holder) = plan.workload.holder else {
            return Err(ApiError::Conflict(format!(
                "workload {name} has no holder: there is nothing to migrate (attach it with `workload move`)"
            )));
        };
        if !self.hub.is_online(network, holder) && self.shared.get().is_some() {
            // Who is online at the other coordinators, as the database has it now.
            self.refresh_leases().await;
        }
        if !self.is_online_anywhere(network, holder) {
            return Err(ApiError::Conflict(format!(
                "the holder of workload {name} is offline: a live migration needs its application"
            )));
        }
        plan.live = true;
        let _busy = self.start_live_migration(network, name)?;
        self.execute(
            plan,
            "migrated live by an operator",
            None,
            MoveCause::Operator,
            None,
        )
        .await
    }

    /// A node claims a workload for itself, from its own agent.
    ///
    /// # Errors
    /// As [`workloads::plan_claim`] and [`workloads::commit_holder`].
    pub async fn claim(
        &self,
        node: NodeId,
        remote: IpAddr,
        name: &str,
    ) -> Result<MoveOutcome, ApiError> {
        let outcome =
            match workloads::plan_claim(self.store(), &Caller::Node { id: node, remote }, name)
                .await
            {
                Ok(plan) => {
                    self.execute(
                        plan,
                        "claimed by its destination",
                        None,
                        MoveCause::Claim,
                        None,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
        self.audit_claim(node, remote, name, &outcome).await;
        outcome
    }

    /// Records a node's claim, granted or refused, in the audit log.
    async fn audit_claim(
        &self,
        node: NodeId,
        remote: IpAddr,
        name: &str,
        outcome: &Result<MoveOutcome, ApiError>,
    ) {
        let rec = self.store().node(node).await.ok().flatten();
        let node_name = rec.as_ref().map_or(node.to_string(), |n| n.name.clone());
        let (status, result) = match outcome {
            Ok(o) => (200, format!("ok: generation {}", o.workload.generation)),
            Err(e) => (crate::admin::status_of(e), e.public_message()),
        };
        let entry = crate::store::AuditRecord {
            id: 0,
            at: self.now(),
            actor: format!("node:{node_name}"),
            action: format!("claim {name}"),
            network: rec.map(|n| n.network),
            node: Some(node_name),
            status,
            result,
            source: Some(remote.to_string()),
        };
        if let Err(e) = self.store().record_audit(entry).await {
            tracing::warn!("cannot write the audit log: {e}");
        }
    }

    /// Fails over every workload whose holder went silent for longer than its lease to the
    /// first online standby. Call it often (every 50 ms or so); it reads only memory unless a
    /// holder is silent (and then, while no standby is online, once a second).
    pub async fn failover_tick(&self) {
        // Every coordinator, leader or not, confirms handovers to the holders it serves.
        self.confirm_tick();
        if let Some(store) = self.shared.get() {
            if !store.lead(&mut *self.leadership.lock().await).await {
                return;
            }
            self.refresh_leases().await;
        }
        let now = self.clock.instant();
        let silent: Vec<(String, String, u64, NodeId)> = {
            let leases = self.leases();
            self.hub
                .workloads()
                .into_iter()
                .filter_map(|(net, w)| {
                    let h = w.holder?;
                    leases
                        .is_silent(h, now)
                        .then_some((net, w.name, w.generation, h))
                })
                .collect()
        };
        {
            let mut stranded = self.stranded.lock().unwrap_or_else(|p| p.into_inner());
            stranded.retain(|k, _| {
                silent
                    .iter()
                    .any(|(n, w, g, _)| (n, w, g) == (&k.0, &k.1, &k.2))
            });
        }
        for (network, name, generation, holder) in silent {
            let key = (network.clone(), name.clone(), generation);
            if self
                .stranded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .is_some_and(|next| now < *next)
            {
                continue;
            }
            let rec = match self.store.workload(&network, &name).await {
                Ok(Some(r)) if r.generation == generation => r,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(workload = %name, "failover: cannot read the workload: {e}");
                    continue;
                }
            };
            // Decide and fence at once: no heartbeat may renew the holder's lease from here
            // until the change is committed.
            let (target, lost_at) = {
                let mut leases = self.leases();
                let decided = self.clock.instant();
                // The holder was last heard from (or became the holder) then.
                let lost_at = decided
                    .checked_sub(leases.heard_ago(holder, decided))
                    .unwrap_or(decided);
                let t = failover_target(
                    &workloads::info(&rec),
                    &rec.standby,
                    &leases,
                    |n| self.is_online_anywhere(&network, n),
                    self.clock.instant(),
                );
                if t.is_some() {
                    leases.fence(holder);
                }
                (t, lost_at)
            };
            let Some(target) = target else {
                let mut stranded = self.stranded.lock().unwrap_or_else(|p| p.into_inner());
                if !stranded.contains_key(&key) && !rec.standby.is_empty() {
                    tracing::warn!(workload = %name, holder, "holder is silent and no standby is online");
                }
                stranded.insert(key, now + Duration::from_secs(1));
                continue;
            };
            let node = match self.store.node(target).await {
                Ok(Some(n)) if !n.revoked => n,
                _ => {
                    self.leases().unfence(holder);
                    continue;
                }
            };
            // Shared leases: fence it in the database too, unless another coordinator renewed
            // its lease meanwhile (then it is not silent).
            let mut fenced_in_db = None;
            if let Some(store) = self.shared.get() {
                let silent = millis(self.timing.lease + self.timing.margin);
                match store.fence_lease(holder, silent, self.fence_ms()).await {
                    Ok(Some(f)) => {
                        fenced_in_db = Some(DbFence {
                            store: store.clone(),
                            fence: Some(f),
                        });
                    }
                    Ok(None) => {
                        self.leases().unfence(holder);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(workload = %name, "failover: cannot fence the holder: {e}");
                        self.leases().unfence(holder);
                        continue;
                    }
                }
            }
            let plan = PlannedMove {
                workload: rec,
                to: Some(node),
                live: false,
            };
            if let Err(e) = self
                .execute(
                    plan,
                    "failed over: its holder went silent",
                    Some(holder),
                    MoveCause::Failover,
                    Some(lost_at),
                )
                .await
            {
                tracing::warn!(workload = %name, "failover: {e}");
            }
            if let Some(f) = fenced_in_db {
                f.lift().await;
            }
        }
    }

    /// After a node of `network` was revoked or deleted: every workload whose holder is gone
    /// moves to its first online standby. With no standby online it stays for
    /// `failover_tick` to move once one is (a removed node sends no heartbeats, so it goes
    /// silent); with no standby left at all (each deleted or revoked) it is detached. A holder
    /// that was not answering (it may be cut off, and unaware) keeps its workloads until its
    /// lease has surely run out (see `execute`).
    pub(crate) async fn release_orphans(&self, network: &str) {
        let all = match self.store.workloads(Some(network)).await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(network, "cannot read workloads: {e}");
                return;
            }
        };
        let live = |n: Option<NodeRecord>| n.filter(|n| !n.revoked);
        for w in all {
            let Some(holder) = w.holder else { continue };
            match self.store.node(holder).await {
                Ok(Some(n)) if !n.revoked => continue,
                Ok(_) => {}
                Err(_) => continue,
            }
            let mut to = None;
            let mut standby_left = false;
            for s in w.standby.iter().filter(|s| **s != holder) {
                let Ok(n) = self.store.node(*s).await else {
                    continue;
                };
                let Some(n) = live(n) else { continue };
                standby_left = true;
                if self.is_online_anywhere(network, n.id) {
                    to = Some(n);
                    break;
                }
            }
            if to.is_none() && standby_left {
                tracing::info!(workload = %w.name, "its holder was removed; it moves when a standby is online");
                continue;
            }
            let name = w.name.clone();
            if let Err(e) = self
                .execute(
                    PlannedMove {
                        workload: w,
                        to,
                        live: false,
                    },
                    "released from a removed node",
                    None,
                    MoveCause::Release,
                    None,
                )
                .await
            {
                tracing::warn!(workload = %name, "{e}");
            }
        }
    }

    /// The store, for reads.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The hub, for reads (who is online, full maps).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Now, by the service's clock.
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// Now, by the service's monotonic clock (the one [`crate::hub::Frame::published`]
    /// counts by).
    pub fn instant(&self) -> Instant {
        self.clock.instant()
    }

    /// Accepts or refuses an agent's hello: a join (creating the node and telling its peers)
    /// or an authentication (recording its endpoints), then attaches its session.
    ///
    /// # Errors
    /// The handler's [`ApiError`], to be sent as `Refused`.
    ///
    /// # Security
    /// The credential (join token or node secret) is checked with reads first, without the
    /// write lock: a stream of bad hellos is refused without queueing behind changes or
    /// holding them up. The whole check runs again under the lock, where the join or
    /// authentication and the attach happen (a node revoked in between is refused).
    pub async fn hello(&self, hello: &Hello, remote: IpAddr) -> Result<Session, ApiError> {
        let caller = Caller::Agent { remote };
        nodes::check_credentials(self.store(), self.clock.now(), &caller, hello).await?;
        let _w = self.write.lock().await;
        let now = self.clock.now();
        let at = self.clock.instant();
        let (node, network, version, secret) = match &hello.auth {
            Auth::JoinToken { secret } => {
                let node_secret = random_secret();
                let j =
                    nodes::join(self.store(), now, &caller, hello, secret, &node_secret).await?;
                self.pace().wrote(j.node.id, at);
                (j.node, j.network, Some(j.version), Some(node_secret))
            }
            Auth::Node { node_id, secret } => {
                // A node that changed its endpoints too often just now: its hello's wait
                // their turn, like a report (asked before, decided after authenticating, all
                // under the write lock: nobody but the node itself can make one wait).
                let record = if self.pace().allows(*node_id, at) {
                    HelloEndpoints::Record
                } else {
                    HelloEndpoints::Leave
                };
                let a = nodes::authenticate(
                    self.store(),
                    now,
                    &caller,
                    hello,
                    *node_id,
                    secret,
                    record,
                )
                .await?;
                let report = Report {
                    endpoints: hello.endpoints.clone(),
                    remote,
                };
                let mut pace = self.pace();
                let _ = pace.offer(a.node.id, at, report);
                if a.version.is_some() {
                    pace.wrote(a.node.id, at);
                }
                drop(pace);
                (a.node, a.network, a.version, None)
            }
        };
        let joined = secret.is_some();
        let mut welcome = welcome(
            &node,
            &network,
            secret,
            self.coordinators
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        );
        let traversal = *self.traversal.lock().unwrap_or_else(|p| p.into_inner());
        welcome.reflect_port = traversal.reflect_port;
        welcome.relay = traversal.relay;
        welcome.path_reports = true;
        welcome.talker_reports = true;
        welcome.handover = true;
        welcome.confirms_handovers = true;
        let welcome: Frame = encode(&ServerMessage::Welcome(welcome)).into();
        match version {
            Some(v) => {
                self.publish_node(&node, v).await;
            }
            // A network another coordinator created, not yet followed here.
            None if self.hub.version(&network.name).is_none() => {
                if let Err(e) = self.catch_up_locked(&network.name).await {
                    tracing::warn!(network = %network.name, "cannot load the network: {e}");
                }
            }
            None => {}
        }
        let attached = self
            .hub
            .attach(&network.name, node.id, crate::hub::Features::of(hello))
            .ok_or_else(|| ApiError::Refused(format!("network {} is not loaded", network.name)))?;
        if let Some(store) = self.shared.get() {
            if let Err(e) = store.presence_attach(node.id, &self.me).await {
                tracing::debug!(node = node.id, "cannot record the session: {e}");
            }
        }
        self.keys_on_hello(&node, hello).await;
        Ok(Session {
            node: node.id,
            name: node.name,
            network: network.name,
            joined,
            welcome,
            attached,
        })
    }

    /// Records endpoints reported by a node's session and tells its peers when they changed.
    /// A node that changed its endpoints too often just now ([`crate::endpoint_pace`]) has
    /// its report wait, without taking the write lock: [`Service::endpoint_tick`] writes the
    /// latest one when its turn comes.
    ///
    /// # Errors
    /// The handler's [`ApiError`] (endpoints that are not allowed are refused at once, also
    /// when the report would wait); the session should end.
    pub async fn report_endpoints(
        &self,
        node: NodeId,
        remote: IpAddr,
        endpoints: &[SocketAddr],
    ) -> Result<(), ApiError> {
        nodes::clean_endpoints(endpoints)?;
        let report = Report {
            endpoints: endpoints.to_vec(),
            remote,
        };
        let Some(report) = self.pace().offer(node, self.clock.instant(), report) else {
            return Ok(());
        };
        let _w = self.write.lock().await;
        // Asked again under the lock: another write of this node may have come first.
        let at = self.clock.instant();
        let Some(report) = self.pace().offer(node, at, report) else {
            return Ok(());
        };
        self.write_endpoints(node, report, at).await
    }

    /// Writes the endpoint reports whose turn has come (see [`Service::report_endpoints`]);
    /// `run.rs` calls it every [`ENDPOINT_TICK`]. A report of a node revoked or deleted
    /// meanwhile is dropped.
    pub async fn endpoint_tick(&self) {
        let due = self
            .pace()
            .poll_timeout()
            .is_some_and(|at| at <= self.clock.instant());
        if !due {
            return;
        }
        let _w = self.write.lock().await;
        let at = self.clock.instant();
        let reports = self.pace().take_due(at);
        for (node, report) in reports {
            if let Err(e) = self.write_endpoints(node, report, at).await {
                tracing::debug!(node, "a delayed endpoint report was not recorded: {e}");
            }
        }
    }

    /// Writes one report of `node`'s endpoints and publishes the change, if any. Call under
    /// the write lock.
    async fn write_endpoints(
        &self,
        node: NodeId,
        report: Report,
        at: Instant,
    ) -> Result<(), ApiError> {
        let caller = Caller::Node {
            id: node,
            remote: report.remote,
        };
        let changed = nodes::update_endpoints(self.store(), &caller, &report.endpoints).await?;
        if let Some(v) = changed.version {
            self.pace().wrote(node, at);
            self.publish_node(&changed.node, v).await;
        }
        Ok(())
    }

    /// A session ended: detach it and record when the node was last seen. Errors are logged,
    /// not returned (the session is gone either way).
    pub async fn session_closed(&self, network: &str, node: NodeId, serial: u64) {
        if self.hub.detach(network, node, serial) {
            if let Some(store) = self.shared.get() {
                if let Err(e) = store.presence_detach(node, &self.me).await {
                    tracing::debug!(node, "cannot record the end of the session: {e}");
                }
            }
            if let Err(e) = self.store.touch_node(node, self.clock.now()).await {
                tracing::warn!(node, "cannot record last_seen: {e}");
            }
        }
    }

    /// Creates a network (admin).
    ///
    /// # Errors
    /// As [`networks::create_network`].
    pub async fn create_network(&self, req: CreateNetwork) -> Result<NetworkRecord, ApiError> {
        let _w = self.write.lock().await;
        let net =
            networks::create_network(self.store(), self.clock.now(), &Caller::Admin, req).await?;
        self.hub
            .set_map(&net.name, nodes::netmap(net.version, &[], &[], None));
        Ok(net)
    }

    /// Creates a join token (admin); returns it with its secret, which is not kept.
    ///
    /// # Errors
    /// As [`tokens::create_token`].
    pub async fn create_token(&self, req: CreateToken) -> Result<(TokenRecord, String), ApiError> {
        let secret = random_secret();
        let token =
            tokens::create_token(self.store(), self.clock.now(), &Caller::Admin, req, &secret)
                .await?;
        Ok((token, secret))
    }

    /// Revokes a join token (admin).
    ///
    /// # Errors
    /// As [`tokens::revoke_token`].
    pub async fn revoke_token(&self, id: TokenId) -> Result<(), ApiError> {
        tokens::revoke_token(self.store(), &Caller::Admin, id).await
    }

    /// Revokes a node (admin): its session gets `Revoked` and is closed, its peers a delta
    /// removing it.
    ///
    /// # Errors
    /// As [`nodes::revoke_node`].
    pub async fn revoke_node(
        &self,
        reference: &str,
        network: Option<&str>,
    ) -> Result<NodeRecord, ApiError> {
        let _w = self.write.lock().await;
        let changed = nodes::revoke_node(self.store(), &Caller::Admin, reference, network).await?;
        self.warn_orphans(&changed.node).await;
        self.remove(
            &changed.node,
            changed.version,
            CloseReason::Revoked,
            "revoked by an operator",
        )
        .await;
        drop(_w);
        self.release_orphans(&changed.node.network).await;
        Ok(changed.node)
    }

    /// Deletes a node (admin), freeing its address: as [`Service::revoke_node`] for its
    /// session and peers.
    ///
    /// # Errors
    /// As [`nodes::delete_node`].
    pub async fn delete_node(
        &self,
        reference: &str,
        network: Option<&str>,
    ) -> Result<NodeRecord, ApiError> {
        let _w = self.write.lock().await;
        let changed = nodes::delete_node(self.store(), &Caller::Admin, reference, network).await?;
        self.warn_orphans(&changed.node).await;
        self.remove(
            &changed.node,
            changed.version,
            CloseReason::Deleted,
            "deleted by an operator",
        )
        .await;
        drop(_w);
        self.release_orphans(&changed.node.network).await;
        Ok(changed.node)
    }

    /// Logs the external nodes that reached the mesh through `gateway`, revoked or deleted:
    /// they reach nothing now, until registered again with another gateway.
    async fn warn_orphans(&self, gateway: &NodeRecord) {
        let Ok(all) = self.store().nodes(Some(&gateway.network)).await else {
            return;
        };
        let orphans: Vec<&str> = crate::handlers::external::served_by(&all, gateway.id)
            .into_iter()
            .map(|n| n.name.as_str())
            .collect();
        if !orphans.is_empty() {
            tracing::warn!(
                gateway = %gateway.name,
                external = ?orphans,
                "the gateway of these external nodes is gone: they reach nothing until \
                 registered again with another --via"
            );
        }
    }

    /// Closes a node's session, if it has one, with a last `Revoked { reason: text }` so that
    /// it learns why; returns whether it had one.
    pub(crate) fn close_session(
        &self,
        network: &str,
        node: NodeId,
        reason: CloseReason,
        text: String,
    ) -> bool {
        let last: Frame = encode(&ServerMessage::Revoked { reason: text }).into();
        self.paths.forget(node);
        self.hub.close(network, node, reason, Some(last))
    }

    /// Forgets what this coordinator keeps per node about a node revoked or deleted: it
    /// never comes back under its id (a revoked node joins again as a new one), and the
    /// tables would otherwise keep every node a coordinator ever served. Its lease stays
    /// in the lease table (a revoked holder's workloads wait for it to run out; the table
    /// forgets long silent nodes itself), and releases waiting for it run to their end.
    pub(crate) fn forget_node(&self, node: NodeId) {
        self.pace().forget(node);
        self.handovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .acked
            .remove(&node);
        self.keys_forget(node);
        self.talkers.forget(node);
        self.recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
    }

    pub(crate) async fn remove(
        &self,
        node: &NodeRecord,
        version: Option<u64>,
        reason: CloseReason,
        why: &str,
    ) {
        let text = format!("node {} ({}) was {why}", node.id, node.name);
        self.forget_node(node.id);
        if self.close_session(&node.network, node.id, reason, text) {
            tracing::info!(node = node.id, network = %node.network, "closing the session of a node {why}");
        }
        if let Some(v) = version {
            self.publish(
                &node.network,
                NetmapDelta {
                    to_version: v,
                    remove: vec![node.id],
                    ..NetmapDelta::default()
                },
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshlink_proto::control::PROTOCOL_VERSION;
    use meshlink_proto::PublicKey;

    use super::*;

    fn hello(auth: Auth, key: u8) -> Hello {
        let mut public_key = [key; 32];
        public_key[0] = 0x42;
        Hello {
            protocol: PROTOCOL_VERSION,
            auth,
            public_key: PublicKey(public_key),
            key_rotation: false,
            policy_edits: false,
            compression: false,
            name: None,
            labels: BTreeMap::new(),
            endpoints: vec![SocketAddr::from(([198, 18, 0, key], 51820))],
            handover: false,
        }
    }

    /// A service on a SQLite store in `dir` with network `prod` (100.64.0.0/24).
    async fn prod_service(dir: &std::path::Path) -> Service {
        let store = SqlStore::open_sqlite(&dir.join("coordinator.db"))
            .await
            .unwrap();
        let svc = Service::load(Arc::new(store), Arc::new(SystemClock), 16)
            .await
            .unwrap();
        svc.create_network(CreateNetwork {
            name: "prod".into(),
            cidr: "100.64.0.0/24".into(),
            cidr6: None,
        })
        .await
        .unwrap();
        svc
    }

    /// A node joined to `prod` with a token of its own and key `key` (see [`hello`]).
    async fn join(svc: &Service, key: u8) -> NodeId {
        let (_, token) = svc
            .create_token(CreateToken {
                network: "prod".into(),
                tags: vec![],
                expires_in_secs: None,
                uses: None,
            })
            .await
            .unwrap();
        let remote: IpAddr = "198.18.0.1".parse().unwrap();
        svc.hello(&hello(Auth::JoinToken { secret: token }, key), remote)
            .await
            .unwrap()
            .node
    }

    /// A node revoked or deleted never comes back under its id: what the service kept about
    /// it (its acknowledged map version, its session's rotation requests, its recorded lease
    /// renewals) goes with it, or the tables would keep every node ever served.
    #[tokio::test]
    async fn a_removed_node_leaves_nothing_behind_in_the_services_tables() {
        let dir = tempfile::tempdir().unwrap();
        let svc = prod_service(dir.path()).await;
        let nodes = [join(&svc, 1).await, join(&svc, 2).await];
        let kept = |node: NodeId| {
            [
                svc.handovers.lock().unwrap().acked.contains_key(&node),
                svc.keys.sessions().contains_key(&node),
                svc.recorded.lock().unwrap().contains_key(&node),
            ]
        };
        for node in &nodes {
            svc.handovers.lock().unwrap().acked.insert(*node, 3);
            svc.keys.sessions().insert(*node, None);
            svc.recorded
                .lock()
                .unwrap()
                .insert(*node, (svc.instant(), 1));
            assert_eq!(kept(*node), [true; 3]);
        }
        svc.revoke_node(&nodes[0].to_string(), Some("prod"))
            .await
            .unwrap();
        assert_eq!(kept(nodes[0]), [false; 3], "revoked");
        svc.delete_node(&nodes[1].to_string(), Some("prod"))
            .await
            .unwrap();
        assert_eq!(kept(nodes[1]), [false; 3], "deleted");
    }

    /// A workload deleted just before a crash may have left its holder answering under a lease
    /// the previous run granted (the deletion never reached it). A workload created again at
    /// its address soon after the restart is not confirmed to its first holder until a lease
    /// and the margin after the start; later creations are not held back.
    #[tokio::test]
    async fn a_workload_created_soon_after_a_start_waits_out_the_previous_runs_leases() {
        let dir = tempfile::tempdir().unwrap();
        let web = |address| CreateWorkload {
            name: "web".into(),
            network: "prod".into(),
            address,
            standby: vec![],
            allowed: vec![],
            tags: vec![],
        };
        let (old_holder, new_holder, address) = {
            let svc = prod_service(dir.path()).await;
            let (a, b) = (join(&svc, 1).await, join(&svc, 2).await);
            let rec = svc.create_workload(web(None)).await.unwrap();
            svc.move_workload("prod", "web", Some(&a.to_string()))
                .await
                .unwrap();
            svc.delete_workload("prod", "web").await.unwrap();
            (a, b, rec.address)
        };
        // The crash: the service is gone; another starts on the same store.
        let store = SqlStore::open_sqlite(&dir.path().join("coordinator.db"))
            .await
            .unwrap();
        let svc = Service::load(Arc::new(store), Arc::new(SystemClock), 16)
            .await
            .unwrap();
        let started = svc.instant();
        svc.create_workload(web(Some(address))).await.unwrap();
        svc.move_workload("prod", "web", Some(&new_holder.to_string()))
            .await
            .unwrap();
        let wait = svc.timing.lease + svc.timing.margin;
        assert!(
            svc.instant() < started + wait,
            "the move took too long to test"
        );
        assert_eq!(
            svc.confirmed_for("prod", new_holder),
            vec![],
            "confirmed at once"
        );
        tokio::time::sleep((started + wait).saturating_duration_since(svc.instant())).await;
        let w = svc.store().workload("prod", "web").await.unwrap().unwrap();
        assert_eq!(
            svc.confirmed_for("prod", new_holder),
            vec![Confirmation {
                workload: w.id,
                generation: w.generation
            }]
        );
        assert_ne!(w.holder, Some(old_holder));
        // Later, a workload created at a free address is confirmed at once.
        svc.delete_workload("prod", "web").await.unwrap();
        svc.create_workload(web(Some(address))).await.unwrap();
        svc.move_workload("prod", "web", Some(&new_holder.to_string()))
            .await
            .unwrap();
        assert_eq!(svc.confirmed_for("prod", new_holder).len(), 1);
    }

    /// A holder's heartbeat answered after a change took its workload but before the change
    /// reached the hub (another thread's move, between `handed_over` and the publishing) is
    /// answered at the change's version: the lease it grants counts only once the holder has
    /// the change, so it cannot outlast the wait fixed for the next holder. Once the holder
    /// acknowledges the change, answers carry the hub's version again.
    #[tokio::test]
    async fn a_heartbeat_answered_before_a_change_is_published_counts_from_the_change() {
        use meshlink_proto::control::{ClientMessage, Decoder, ServerMessage};

        use crate::dispatch::SessionRef;
        let dir = tempfile::tempdir().unwrap();
        let svc = Arc::new(prod_service(dir.path()).await);
        let (old, new) = (join(&svc, 1).await, join(&svc, 2).await);
        let mut rec = svc
            .create_workload(CreateWorkload {
                name: "web".into(),
                network: "prod".into(),
                address: None,
                standby: vec![],
                allowed: vec![],
                tags: vec![],
            })
            .await
            .unwrap();
        let published = svc.hub.version("prod").unwrap();
        // Committed at the next version, recorded, not published yet.
        rec.holder = Some(new);
        rec.generation += 1;
        svc.handed_over(&rec, Some(old), published + 1, false);
        let answer = |applied: u64| {
            let svc = svc.clone();
            async move {
                let from = SessionRef {
                    node: old,
                    network: "prod",
                    remote: "198.18.0.1".parse().unwrap(),
                    serial: 0,
                };
                let heartbeat = ClientMessage::Heartbeat {
                    seq: 1,
                    version: Some(applied),
                };
                let frame = svc
                    .on_agent_message(from, heartbeat)
                    .await
                    .unwrap()
                    .unwrap();
                let mut d = Decoder::new(1 << 20);
                d.push(frame.bytes(false)).unwrap();
                match d.decode::<ServerMessage>().unwrap().unwrap() {
                    ServerMessage::Lease {
                        version, lease_ms, ..
                    } => {
                        assert!(lease_ms > 0);
                        version
                    }
                    other => panic!("{other:?}"),
                }
            }
        };
        assert_eq!(answer(published).await, published + 1);
        assert_eq!(svc.unacknowledged_release("prod", new), None);
        // Acknowledged: nothing left to wait for.
        assert_eq!(answer(published + 1).await, published);
        assert_eq!(svc.unacknowledged_release("prod", old), None);
    }

    /// A hello with a wrong token or node secret is refused from a read of the store: it does
    /// not queue for the write lock behind changes (nor hold it up for them).
    #[tokio::test]
    async fn a_bad_credential_is_refused_without_the_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let svc = prod_service(dir.path()).await;
        let remote: IpAddr = "198.18.0.1".parse().unwrap();
        let node = join(&svc, 1).await;

        let held = svc.write.lock().await;
        let wrong_secret = hello(
            Auth::Node {
                node_id: node,
                secret: "not the secret".into(),
            },
            1,
        );
        let unknown_token = hello(
            Auth::JoinToken {
                secret: "not a token".into(),
            },
            2,
        );
        for bad in [wrong_secret, unknown_token] {
            let answer = tokio::time::timeout(Duration::from_secs(2), svc.hello(&bad, remote))
                .await
                .expect("a refusal waited for the write lock");
            assert!(
                matches!(answer, Err(ApiError::Unauthorized(_))),
                "{answer:?}"
            );
        }
        drop(held);
    }
}
