//! Workload fencing end to end in simulated time: the real coordinator [`Service`] (its
//! SQLite store, hub, leases, moves, claims and `failover_tick`, dispatching agent messages
//! through [`Service::on_agent_message`] as the QUIC server does) and agents running the real
//! [`AgentSession`] and [`Reconnect`], joined by ordered links with delay. Meanwhile workloads
//! are moved, detached and claimed, agents crash and are cut off, and the coordinator
//! restarts. The service reads time only from the simulation's [`Clock`].
//!
//! Checked at every simulated millisecond:
//! - never two live holders of one workload at once, at one generation or at two: a new holder
//!   answers only once the coordinator confirms the handover (the old holder acknowledged the
//!   change, or its lease has surely run out), whatever was planned, failed over, cut off or
//!   crashed;
//!
//! and after the chaos ends, that every agent converges to the store's generation of every
//! workload, with exactly its holder answering for it.
//!
//! The same chaos with three coordinators sharing one PostgreSQL database (the private test
//! cluster): agents move between them as their sessions break, a coordinator crashes and
//! stays down for a while, notifications are lost (a coordinator misses some and catches up
//! from the change log), and leases are renewed through whichever coordinator an agent has;
//! the same invariants hold.
//!
//! Single scenes on the same bed: two moves racing on one generation (one commits, the other
//! is a conflict); a quiet holder revoked while its standby is online (the standby takes over,
//! prepared, only after the holder's lease has surely ended); a planned move away from a
//! holder cut off just before it (the new holder answers only after the old lease), and one
//! between connected holders (the new holder answers as soon as the old one acknowledged);
//! orderly restarts of a lone coordinator, whose stop lease a holder keeps even once it has
//! renewed with the next run.
//!
//! A failing run explains itself: when two holders are first seen, the trail of the workload,
//! the coordinators and both nodes (`trail.rs`) is printed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshlink_coordinator::dispatch::SessionRef;
use meshlink_coordinator::handlers::networks::CreateNetwork;
use meshlink_coordinator::handlers::tokens::CreateToken;
use meshlink_coordinator::handlers::workloads::CreateWorkload;
use meshlink_coordinator::handlers::ApiError;
use meshlink_coordinator::hub::{Frame, Outbound};
use meshlink_coordinator::service::{Clock, Service, WorkloadTiming, STOP_LINGER};
use meshlink_coordinator::stop_record;
use meshlink_coordinator::store::{LeaseClock, SqlStore, Store, UnixTime};
use meshlink_proto::agent_session::{AgentSession, ClaimId, Event};
use meshlink_proto::control::{ClientMessage, ServerMessage};
use meshlink_proto::reconnect::{Reconnect, ReconnectPolicy};
use meshlink_proto::NodeId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::common::{decode_frame, join_hello, node_hello, TempDir, TestDb};

mod trail;
use trail::Trail;

const NETWORK: &str = "prod";
const AGENTS: usize = 6;
const WORKLOADS: usize = 3;
const MAX_LATENCY_MS: u64 = 30;
/// How long after a cut or a crash each end notices that the connection is dead (the QUIC
/// idle timeout, a third of the lease, plus a keepalive).
const IDLE_MS: u64 = 700;
/// With several coordinators: how often each follows the change log (its notifications), and
/// the chance that it misses one round (a lost notification; the next round catches up).
const FOLLOW_MS: u64 = 20;
const MISSED_NOTIFICATION: f64 = 0.2;
const CHAOS_MS: u64 = 30_000;
/// How long a planned change may take from the request to the new holder's first answer: a
/// quiet holder's lease waited out (1.6 s), the destination's preparation (up to 500 ms), the
/// links.
const PLANNED_WITHIN_MS: u64 = 2_500;
const HEAL_MS: u64 = 10_000;

/// Simulated time: milliseconds since `t0`, moved by the simulation only.
struct SimClock {
    t0: Instant,
    ms: AtomicU64,
    tick: watch::Sender<u64>,
}

impl SimClock {
    fn new() -> Self {
        SimClock {
            t0: Instant::now(),
            ms: AtomicU64::new(0),
            tick: watch::channel(0).0,
        }
    }

    fn set(&self, ms: u64) {
        self.ms.store(ms, Ordering::SeqCst);
        self.tick.send_replace(ms);
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }
}

impl Clock for SimClock {
    fn now(&self) -> UnixTime {
        1_800_000_000 + i64::try_from(self.ms.load(Ordering::SeqCst) / 1000).unwrap_or(0)
    }

    fn instant(&self) -> Instant {
        self.at(self.ms.load(Ordering::SeqCst))
    }

    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let target =
            u64::try_from(at.saturating_duration_since(self.t0).as_millis()).unwrap_or(u64::MAX);
        let mut rx = self.tick.subscribe();
        Box::pin(async move {
            while *rx.borrow_and_update() < target {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}

/// An ordered link with delay: what is sent arrives in order, unless the link is cut.
struct Link<T> {
    queue: VecDeque<(u64, T)>,
    last: u64,
}

impl<T> Link<T> {
    fn new() -> Self {
        Link {
            queue: VecDeque::new(),
            last: 0,
        }
    }

    /// Sends at `now`, arriving `latency` later, or that long after `blocked_until`.
    fn send(&mut self, now: u64, latency: u64, blocked_until: Option<u64>, msg: T) {
        let at = (blocked_until.map_or(now, |b| b.max(now)) + latency).max(self.last);
        self.last = at;
        self.queue.push_back((at, msg));
    }

    fn due(&mut self, now: u64) -> Option<T> {
        if self.queue.front().is_some_and(|(at, _)| *at <= now) {
            self.queue.pop_front().map(|(_, m)| m)
        } else {
            None
        }
    }

    fn cut(&mut self) {
        self.queue.clear();
    }
}

/// The coordinator's end of an agent's session.
struct CoordEnd {
    serial: u64,
    rx: mpsc::Receiver<Outbound>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// The process is dead until then.
    Dead(u64),
    /// Not connected; the next attempt then.
    Offline(u64),
    Online,
}

struct Agent {
    id: NodeId,
    key: u8,
    secret: String,
    session: AgentSession,
    reconnect: Reconnect,
    life: Life,
    /// Cut off from the coordinator until then.
    cut_until: Option<u64>,
    /// When the current session is found dead (a cut, a crash, a coordinator restart).
    lost_at: Option<u64>,
    /// When a cut that is still on kills the connection (the idle timeout).
    idle_at: Option<u64>,
    coord: Option<CoordEnd>,
    up: Link<ClientMessage>,
    down: Link<Frame>,
    /// Moves being prepared here: (ready at, workload, generation).
    preparing: Vec<(u64, String, u64)>,
    claims: BTreeMap<ClaimId, String>,
    /// The coordinator of the current session.
    at: usize,
    /// The coordinator the next attempt goes to.
    next: usize,
}

/// A coordinator granting its stop lease: it stops `STOP_LINGER` after every holder has it
/// (`all_at`), or at `until`.
#[derive(Debug, Clone, Copy)]
struct Stopping {
    until: u64,
    all_at: Option<u64>,
}

/// Changes of holder whose new generation an operator or a claim asked for.
type Planned = Arc<Mutex<BTreeSet<(String, u64)>>>;

struct Sim {
    seed: u64,
    rng: StdRng,
    clock: Arc<SimClock>,
    /// The store as the checks read it; a lone coordinator's (SQLite) is opened again at each
    /// of its starts, as a new process would.
    store: Arc<SqlStore>,
    /// The coordinators; one on SQLite, or several on one PostgreSQL database (`url`).
    services: Vec<Arc<Service>>,
    url: Option<String>,
    /// Per coordinator: down (crashed or stopped) until then.
    down_until: Vec<Option<u64>>,
    /// A lone coordinator's timings.
    timing: WorkloadTiming,
    /// Its state directory, where it records its stop lease (`stop_record`).
    state: std::path::PathBuf,
    /// Per coordinator: stopping (granting its stop lease).
    stopping: Vec<Option<Stopping>>,
    /// Per coordinator: the work it runs (failover ticks, operators' changes), ended with it.
    tasks: Vec<JoinSet<()>>,
    agents: Vec<Agent>,
    workloads: Vec<String>,
    /// Each workload's address, kept when it is created again.
    addresses: Vec<Ipv4Addr>,
    planned: Planned,
    /// The generations workloads had reached when the operator deleted them (to create them
    /// again), counted with the live ones' among the changes a run made.
    retired: Arc<AtomicU64>,
    now: u64,
    /// Per workload, overlaps seen: (older generation, newer generation) -> (from, to, newer
    /// holder).
    overlaps: BTreeMap<(String, u64, u64), (u64, u64, NodeId)>,
    /// Planned changes asked for: (workload, destination) -> when (last asked). A planned
    /// change whose answer was lost (a session or a coordinator gone in between) is known by
    /// these.
    asked: BTreeMap<(String, Option<NodeId>), u64>,
    stats: BTreeMap<&'static str, u64>,
    /// What happened, told when two holders are first seen.
    trail: Trail,
    /// The service's log goes to the trail while the simulation runs.
    _log: tracing::subscriber::DefaultGuard,
    /// As last written to the trail, by agent (`'a'`, index) and coordinator (`'c'`, index):
    /// each workload's state there.
    noted: BTreeMap<(char, usize), BTreeMap<String, Noted>>,
}

/// One workload as an agent (its map's entry, what it answers, its life) or a coordinator (its
/// map's entry) last saw it, for the trail.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Noted {
    generation: u64,
    holder: Option<NodeId>,
    id: u64,
    answers: Option<u64>,
    held_back: bool,
    life: Option<Life>,
}

/// Workload `w{k}`: held first by vm-(k+1), its standbys vm-(k+2) and vm-(k+3), all three
/// allowed; at `address` (created again at its old one) or the lowest free.
fn workload_request(k: usize, address: Option<Ipv4Addr>) -> CreateWorkload {
    let standby = vec![format!("vm-{}", 2 + k), format!("vm-{}", 3 + k)];
    let mut allowed = standby.clone();
    allowed.push(format!("vm-{}", 1 + k));
    CreateWorkload {
        name: format!("w{k}"),
        network: NETWORK.into(),
        address,
        standby,
        allowed,
        tags: Vec::new(),
    }
}

fn remote(key: u8) -> IpAddr {
    IpAddr::from([198, 18, 0, key])
}

/// A lone coordinator's timings, as `run.rs` sets them for `lease`: a stop lease when it
/// stops.
fn lone_timing(lease: Duration) -> WorkloadTiming {
    WorkloadTiming {
        lease,
        stop_lease: Some(WorkloadTiming::lone_stop_lease(lease)),
        ..WorkloadTiming::default()
    }
}

/// A coordinator's service on the shared PostgreSQL store, its leases on simulated time.
async fn shared_service(url: &str, clock: &Arc<SimClock>) -> Arc<Service> {
    let c = clock.clone();
    let store = SqlStore::connect_postgres(url)
        .await
        .unwrap()
        .with_lease_clock(LeaseClock(Arc::new(move || {
            i64::try_from(c.ms.load(Ordering::SeqCst)).unwrap_or(i64::MAX)
        })));
    let service = Arc::new(
        Service::load_with(
            Arc::new(store.clone()),
            clock.clone(),
            1024,
            WorkloadTiming::default(),
        )
        .await
        .unwrap(),
    );
    service.share_leases(store);
    service
}

/// A node joined to the network through `service` with a token of its own (key `key`, name
/// `name`), its session closed at once: an agent offline since `now`, to connect to
/// coordinator 0.
async fn join_agent(
    service: &Service,
    clock: &Arc<SimClock>,
    key: u8,
    name: &str,
    now: u64,
) -> Agent {
    let (_, token) = service
        .create_token(CreateToken {
            network: NETWORK.into(),
            tags: vec![],
            expires_in_secs: None,
            uses: None,
        })
        .await
        .unwrap();
    let s = service
        .hello(&join_hello(&token, key, Some(name)), remote(key))
        .await
        .unwrap();
    let ServerMessage::Welcome(w) = decode_frame(&s.welcome) else {
        panic!("no welcome")
    };
    service
        .session_closed(NETWORK, s.node, s.attached.serial)
        .await;
    Agent {
        id: s.node,
        key,
        secret: w.node_secret.expect("a join gives a secret"),
        session: AgentSession::new(s.node, Default::default(), clock.instant()),
        reconnect: Reconnect::new(ReconnectPolicy::default()),
        life: Life::Offline(now),
        cut_until: None,
        lost_at: None,
        idle_at: None,
        coord: None,
        up: Link::new(),
        down: Link::new(),
        preparing: Vec::new(),
        claims: BTreeMap::new(),
        at: 0,
        next: 0,
    }
}

impl Sim {
    /// [`Sim::new`], run calmly (no chaos) to `until` ms, when every workload is held by its
    /// first holder.
    async fn new_calm(
        dir: &TempDir,
        seed: u64,
        url: Option<&str>,
        coordinators: usize,
        until: u64,
    ) -> Sim {
        let mut sim = Sim::new(dir, seed, url, coordinators).await;
        assert!(calm_until::<()>(&mut sim, until, "w0", 0, 0, None)
            .await
            .is_some());
        sim
    }

    /// One coordinator on SQLite in `dir`, or `coordinators` on the PostgreSQL database `url`.
    async fn new(dir: &TempDir, seed: u64, url: Option<&str>, coordinators: usize) -> Sim {
        Sim::with_lease(
            dir,
            seed,
            url,
            coordinators,
            WorkloadTiming::default().lease,
        )
        .await
    }

    /// As [`Sim::new`], a lone coordinator's lease `lease`.
    async fn with_lease(
        dir: &TempDir,
        seed: u64,
        url: Option<&str>,
        coordinators: usize,
        lease: Duration,
    ) -> Sim {
        let clock = Arc::new(SimClock::new());
        let trail = Trail::new(clock.clone());
        let log = tracing::subscriber::set_default(trail.subscriber());
        let (store, services): (Arc<SqlStore>, Vec<Arc<Service>>) = match url {
            None => {
                // As `run.rs` records at each start, on the simulated wall clock (at 0 ms).
                let wall = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
                stop_record::record_running(dir.path(), wall, lease, Duration::ZERO).unwrap();
                let store = Arc::new(
                    SqlStore::open_sqlite(&dir.path().join("coordinator.db"))
                        .await
                        .unwrap(),
                );
                let service = Arc::new(
                    Service::load_with(store.clone(), clock.clone(), 1024, lone_timing(lease))
                        .await
                        .unwrap(),
                );
                (store, vec![service])
            }
            Some(url) => {
                let mut services = Vec::new();
                for _ in 0..coordinators {
                    services.push(shared_service(url, &clock).await);
                }
                let store = Arc::new(SqlStore::connect_postgres(url).await.unwrap());
                (store, services)
            }
        };
        let service = services[0].clone();
        service
            .create_network(CreateNetwork {
                name: NETWORK.into(),
                cidr: "100.64.0.0/16".into(),
                cidr6: None,
            })
            .await
            .unwrap();
        let mut agents = Vec::new();
        for n in 1..=AGENTS {
            let key = u8::try_from(n).unwrap();
            let mut a = join_agent(&service, &clock, key, &format!("vm-{n}"), 0).await;
            a.next = n % services.len();
            agents.push(a);
        }
        let (mut workloads, mut addresses) = (Vec::new(), Vec::new());
        for k in 0..WORKLOADS {
            let name = format!("w{k}");
            let rec = service
                .create_workload(workload_request(k, None))
                .await
                .unwrap();
            addresses.push(rec.address);
            service
                .move_workload(NETWORK, &name, Some(&format!("vm-{}", 1 + k)))
                .await
                .unwrap();
            workloads.push(name);
        }
        for s in &services[1..] {
            s.follow_all().await.unwrap();
        }
        let n = services.len();
        let mut sim = Sim {
            timing: lone_timing(lease),
            state: dir.path().to_path_buf(),
            seed,
            rng: StdRng::seed_from_u64(seed),
            clock,
            store,
            services,
            url: url.map(str::to_string),
            down_until: vec![None; n],
            stopping: vec![None; n],
            tasks: (0..n).map(|_| JoinSet::new()).collect(),
            agents,
            workloads,
            addresses,
            planned: Arc::new(Mutex::new(BTreeSet::new())),
            retired: Arc::new(AtomicU64::new(0)),
            now: 0,
            overlaps: BTreeMap::new(),
            asked: BTreeMap::new(),
            stats: BTreeMap::new(),
            trail,
            _log: log,
            noted: BTreeMap::new(),
        };
        for w in &sim.workloads {
            let g = sim.generation(w).await;
            sim.planned.lock().unwrap().insert((w.clone(), g));
        }
        for k in 0..n {
            sim.start_failover_loop(k);
        }
        sim
    }

    /// The first coordinator (the only one on SQLite).
    fn service(&self) -> Arc<Service> {
        self.services[0].clone()
    }

    /// The simulated wall clock.
    fn wall(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(self.now)
    }

    fn is_up(&self, k: usize) -> bool {
        self.down_until[k].is_none()
    }

    /// The store's generation of workload `name`.
    async fn generation(&self, name: &str) -> u64 {
        let w = self.store.workload(NETWORK, name).await.unwrap();
        w.expect("the workload exists").generation
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn start_failover_loop(&mut self, k: usize) {
        let (service, clock) = (self.services[k].clone(), self.clock.clone());
        self.tasks[k].spawn(async move {
            let mut next = clock.instant();
            loop {
                next += Duration::from_millis(50);
                clock.sleep_until(next).await;
                service.failover_tick().await;
            }
        });
    }

    fn latency(&mut self) -> u64 {
        1 + self.rng.gen_range(0..MAX_LATENCY_MS)
    }

    /// Coordinator `k` crashes. Alone (SQLite), it starts again at once on the same store:
    /// every session dies, and agents learn of it from the stateless reset their next packet
    /// draws. One of several stays down for a while: its agents notice after the idle timeout
    /// and go to the next coordinator; its leadership (a database connection) goes with it.
    async fn crash_coordinator(&mut self, k: usize) {
        self.count("coordinator crashes");
        self.trail.coordinator(format!("coordinator {k} crashes"));
        let alone = self.services.len() == 1;
        self.end_sessions(k, |sim| {
            if alone {
                sim.now + 1 + sim.rng.gen_range(0..300)
            } else {
                sim.now + IDLE_MS
            }
        })
        .await;
        if alone {
            self.start_coordinator(k).await;
        } else {
            self.down_until[k] = Some(self.now + 1_000 + self.rng.gen_range(0..3_000));
        }
    }

    /// The lone coordinator is told to stop (SIGTERM, to restart): it grants its stop lease
    /// to the holders' next heartbeats, and stops once all have it or its wait is over
    /// ([`Sim::step`] looks), to start again after an outage of up to 2.5 s.
    fn begin_stop(&mut self, k: usize) {
        self.count("coordinator stops");
        self.trail
            .coordinator(format!("coordinator {k} begins to stop"));
        // Recorded first, as `run.rs` does, on the simulated wall clock.
        let longest = self.services[k]
            .stop_record_length()
            .expect("a lone coordinator has a stop lease");
        stop_record::record(&self.state, self.wall(), longest).unwrap();
        let most = self.services[k]
            .begin_stop()
            .expect("a lone coordinator has a stop lease");
        self.stopping[k] = Some(Stopping {
            until: self.now + u64::try_from(most.as_millis()).unwrap(),
            all_at: None,
        });
    }

    /// The stopping coordinator `k` closes every session (its agents learn of it at once)
    /// and stays down for a while.
    async fn stopped(&mut self, k: usize) {
        if self.services[k].without_stop_lease() > 0 {
            self.count("stops before every holder had its stop lease");
        }
        self.stopping[k] = None;
        self.end_sessions(k, |sim| sim.now + sim.latency()).await;
        self.down_until[k] = Some(self.now + self.rng.gen_range(0..2_500));
        self.trail.coordinator(format!(
            "coordinator {k} stopped, down until {:?}",
            self.down_until[k]
        ));
    }

    /// Coordinator `k`'s work ends and its sessions with it; each agent online on it notices
    /// at `noticed`.
    async fn end_sessions(&mut self, k: usize, mut noticed: impl FnMut(&mut Sim) -> u64) {
        self.tasks[k].abort_all();
        self.services[k].abort_tasks();
        while self.tasks[k].join_next().await.is_some() {}
        for i in 0..self.agents.len() {
            let soon = noticed(self);
            let a = &mut self.agents[i];
            if a.at != k || a.coord.is_none() {
                continue;
            }
            a.coord = None;
            a.up.cut();
            a.down.cut();
            if a.life == Life::Online {
                a.lost_at = Some(a.lost_at.map_or(soon, |t| t.min(soon)));
            }
        }
    }

    /// Coordinator `k` starts (again) on the store.
    async fn start_coordinator(&mut self, k: usize) {
        self.services[k] = match &self.url {
            None => {
                // A new process: the previous run's store is closed first, so that a
                // transaction the crash interrupted (still finishing on SQLite's own thread)
                // settles one way or the other before this run reads, as it does when a real
                // process dies.
                self.store.close().await;
                self.store = Arc::new(
                    SqlStore::open_sqlite(&self.state.join("coordinator.db"))
                        .await
                        .unwrap(),
                );
                // What the previous run recorded of its stop lease, as `run.rs` reads it.
                let (previous_stop_left, previous_stop_longest) =
                    stop_record::read(&self.state, self.wall()).unwrap();
                // As `run.rs` records at each start.
                stop_record::record_running(
                    &self.state,
                    self.wall(),
                    self.timing.lease,
                    previous_stop_left,
                )
                .unwrap();
                let timing = WorkloadTiming {
                    previous_stop_left,
                    previous_stop_longest,
                    ..self.timing
                };
                Arc::new(
                    Service::load_with(self.store.clone(), self.clock.clone(), 1024, timing)
                        .await
                        .unwrap(),
                )
            }
            Some(url) => shared_service(url, &self.clock).await,
        };
        self.down_until[k] = None;
        self.trail.coordinator(format!("coordinator {k} starts"));
        self.start_failover_loop(k);
    }

    /// An operator moves, detaches or attaches a workload, or (one time in eight) deletes it
    /// and creates it again at its address before attaching it, all through the service, as the
    /// admin API does. A change planned on the old workload (a claim, a failover) may still be
    /// on its way: it must not land on the new one.
    fn operator(&mut self) {
        if (0..self.services.len()).all(|k| !self.is_up(k)) {
            // A lone coordinator restarting: nothing to ask.
            return;
        }
        let k = self.rng.gen_range(0..WORKLOADS);
        let name = self.workloads[k].clone();
        let to = match self.rng.gen_range(0..8) {
            0 => None,
            n => Some(format!("vm-{}", 1 + (n as usize % AGENTS))),
        };
        let recreate = self.rng.gen_ratio(1, 8);
        self.count(if recreate {
            "operator recreations"
        } else {
            "operator changes"
        });
        let to_id = to
            .as_ref()
            .map(|n| self.agents[n[3..].parse::<usize>().unwrap() - 1].id);
        self.asked.insert((name.clone(), to_id), self.now);
        // Through any coordinator that is up.
        let up: Vec<usize> = (0..self.services.len())
            .filter(|k| self.is_up(*k))
            .collect();
        let c = up[self.rng.gen_range(0..up.len())];
        let (service, planned) = (self.services[c].clone(), self.planned.clone());
        let (retired, address) = (self.retired.clone(), self.addresses[k]);
        let trail = self.trail.clone();
        trail.workload(
            &name,
            format!("operator asks: to {to:?}, recreate {recreate}, via coordinator {c}"),
        );
        self.tasks[c].spawn(async move {
            if recreate {
                match service.delete_workload(NETWORK, &name).await {
                    Ok(old) => {
                        retired.fetch_add(old.generation, Ordering::Relaxed);
                    }
                    // Deleted by a recreation a coordinator's crash cut short: created now.
                    Err(ApiError::NotFound(_)) => {}
                    Err(_) => return,
                }
                if service
                    .create_workload(workload_request(k, Some(address)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let moved = service.move_workload(NETWORK, &name, to.as_deref()).await;
            trail.workload(
                &name,
                format!(
                    "operator's change: {:?}",
                    moved
                        .as_ref()
                        .map(|o| (o.workload.generation, o.workload.holder, o.changed))
                ),
            );
            if let Ok(o) = moved {
                planned
                    .lock()
                    .unwrap()
                    .insert((o.workload.name.clone(), o.workload.generation));
            }
        });
    }

    /// The operator creates again the workloads whose recreation a coordinator's crash cut
    /// short (deleted, not created yet), detached.
    async fn finish_recreations(&mut self) {
        // A lone coordinator may be restarting: calm until it is back.
        while (0..self.services.len()).all(|c| !self.is_up(c) || self.stopping[c].is_some()) {
            let now = self.now + 1;
            self.step(now, false).await;
        }
        for k in 0..WORKLOADS {
            let name = &self.workloads[k];
            if self.store.workload(NETWORK, name).await.unwrap().is_some() {
                continue;
            }
            let c = (0..self.services.len())
                .find(|c| self.is_up(*c) && self.stopping[*c].is_none())
                .expect("a coordinator is up");
            match self.services[c]
                .create_workload(workload_request(k, Some(self.addresses[k])))
                .await
            {
                Ok(_) => {}
                // The operator's own recreation, still on its way a moment ago, landed.
                Err(ApiError::Conflict(e))
                    if self.store.workload(NETWORK, name).await.unwrap().is_some() =>
                {
                    eprintln!("seed {}: {name} was created meanwhile ({e})", self.seed);
                }
                Err(e) => panic!("seed {}: cannot create {name} again: {e}", self.seed),
            }
        }
    }

    /// Ends agent `i`'s session on both sides.
    async fn lose(&mut self, i: usize) {
        let pause_fraction: f64 = self.rng.gen();
        let a = &mut self.agents[i];
        a.session.disconnected();
        a.up.cut();
        a.down.cut();
        a.lost_at = None;
        a.idle_at = None;
        let at = a.at;
        // The next attempt goes to the next coordinator.
        a.next = (at + 1) % self.services.len();
        if let Some(c) = a.coord.take() {
            if self.down_until[at].is_none() {
                self.services[at]
                    .session_closed(NETWORK, a.id, c.serial)
                    .await;
            }
        }
        let a = &mut self.agents[i];
        let holder = a.session.holdings().is_holder();
        let pause = a.reconnect.after_session(holder, AGENTS, pause_fraction);
        a.life = Life::Offline(self.now + u64::try_from(pause.as_millis()).unwrap());
        let line = format!("session lost; {:?}", a.life);
        self.trail.node(a.id, line);
    }

    async fn connect(&mut self, i: usize) {
        let now_i = self.clock.instant();
        let k = self.agents[i].next;
        if !self.is_up(k) {
            // Nothing answers: the attempt gives up after its patience (a few seconds at
            // most while other coordinators are left to try) and the next goes elsewhere.
            let f: f64 = self.rng.gen();
            let now = self.now;
            let n = self.services.len();
            let a = &mut self.agents[i];
            let holder = a.session.holdings().is_holder();
            let patience = a.reconnect.patience(holder).min(Duration::from_secs(3));
            let wait = patience + a.reconnect.after_failure(holder, f);
            a.next = (k + 1) % n;
            a.life = Life::Offline(now + u64::try_from(wait.as_millis()).unwrap());
            let line = format!("attempt to dead coordinator {k}; {:?}", a.life);
            self.trail.node(a.id, line);
            self.count("attempts to a dead coordinator");
            return;
        }
        let a = &self.agents[i];
        let hello = node_hello(a.id, &a.secret, a.key);
        match self.services[k].hello(&hello, remote(a.key)).await {
            Ok(s) => {
                let ServerMessage::FullMap(map) = decode_frame(&s.attached.full_map) else {
                    panic!("seed {}: no full map after the welcome", self.seed)
                };
                let ServerMessage::Welcome(welcome) = decode_frame(&s.welcome) else {
                    panic!("seed {}: no welcome", self.seed)
                };
                self.trail.node(
                    self.agents[i].id,
                    format!(
                        "connected to coordinator {k}, serial {}, welcome confirms {}; {}",
                        s.attached.serial,
                        welcome.confirms_handovers,
                        trail::server_message(&ServerMessage::FullMap(map.clone()), &map)
                    ),
                );
                let a = &mut self.agents[i];
                a.session.welcomed(&welcome);
                a.session.connected(now_i, map, vec![]);
                a.reconnect.connected();
                a.at = k;
                a.coord = Some(CoordEnd {
                    serial: s.attached.serial,
                    rx: s.attached.rx,
                });
                a.life = Life::Online;
                self.count("sessions");
            }
            Err(e) => panic!("seed {}: vm-{} refused: {e}", self.seed, i + 1),
        }
    }

    async fn agent_step(&mut self, i: usize, chaos: bool) {
        let now = self.now;
        let now_i = self.clock.instant();
        if let Some(until) = self.agents[i].cut_until {
            if now >= until {
                // A cut shorter than the idle timeout leaves the connection up: what is sent
                // from now on arrives again.
                let a = &mut self.agents[i];
                a.cut_until = None;
                a.idle_at = None;
            }
        }
        match self.agents[i].life {
            Life::Dead(until) if now < until => return,
            Life::Dead(_) => {
                // Restarted from its cached map, with fresh state.
                let a = &mut self.agents[i];
                a.session = AgentSession::new(a.id, a.session.map().clone(), now_i);
                a.reconnect = Reconnect::new(ReconnectPolicy::default());
                a.preparing.clear();
                a.claims.clear();
                a.lost_at = None;
                a.idle_at = None;
                a.life = Life::Offline(now);
                let line = format!("restarts, map {}", trail::workloads(a.session.map()));
                self.trail.node(a.id, line);
            }
            Life::Offline(at) if now >= at => {
                if let Some(until) = self.agents[i].cut_until {
                    let f: f64 = self.rng.gen();
                    let a = &mut self.agents[i];
                    let holder = a.session.holdings().is_holder();
                    let patience = a.reconnect.patience(holder);
                    let patience_ms = u64::try_from(patience.as_millis()).unwrap();
                    a.life = if until <= now + patience_ms {
                        // The handshake's retransmissions get through once the cut ends.
                        Life::Offline(until)
                    } else {
                        // The attempt times out after its patience, then backs off.
                        let wait = patience + a.reconnect.after_failure(holder, f);
                        Life::Offline(now + u64::try_from(wait.as_millis()).unwrap())
                    };
                } else {
                    self.connect(i).await;
                }
            }
            _ => {}
        }
        if chaos && self.agents[i].life == Life::Online {
            if self.rng.gen_ratio(1, 8_000) {
                self.count("crashes");
                let until = now + 500 + self.rng.gen_range(0..2_500);
                let a = &mut self.agents[i];
                self.trail
                    .node(a.id, format!("crashes, dead until {until}"));
                a.life = Life::Dead(until);
                a.up.cut();
                a.down.cut();
                // The coordinator notices the dead connection after the idle timeout.
                if let Some(c) = a.coord.take() {
                    let k = a.at;
                    let (service, clock, node) =
                        (self.services[k].clone(), self.clock.clone(), a.id);
                    let at = clock.at(now + IDLE_MS);
                    self.tasks[k].spawn(async move {
                        clock.sleep_until(at).await;
                        service.session_closed(NETWORK, node, c.serial).await;
                    });
                }
                return;
            }
            if self.agents[i].cut_until.is_none() && self.rng.gen_ratio(1, 10_000) {
                self.count("cuts");
                let until = now + 500 + self.rng.gen_range(0..5_000);
                // Nothing gets through until the cut ends; what is in flight or sent
                // meanwhile arrives after it (QUIC retransmits), unless the connection dies
                // of the idle timeout first.
                let a = &mut self.agents[i];
                self.trail.node(a.id, format!("cut off until {until}"));
                a.cut_until = Some(until);
                a.idle_at = Some(now + IDLE_MS);
            }
        }
        let a = &self.agents[i];
        if a.lost_at.into_iter().chain(a.idle_at).any(|t| now >= t) {
            self.lose(i).await;
        }
        let online = self.agents[i].life == Life::Online;
        if online {
            self.carry(i).await;
        }
        // Time, and what the session asks for.
        let a = &mut self.agents[i];
        if a.session.poll_timeout().is_some_and(|t| t <= now_i) {
            a.session.handle_timeout(now_i);
        }
        let ready: Vec<(String, u64)> = a
            .preparing
            .iter()
            .filter(|(at, _, _)| *at <= now)
            .map(|(_, w, g)| (w.clone(), *g))
            .collect();
        a.preparing.retain(|(at, _, _)| *at > now);
        for (w, g) in ready {
            self.trail.node(a.id, format!("tunnels ready for {w} g{g}"));
            a.session.prepared(w, g);
        }
        if chaos && online && self.rng.gen_ratio(1, 4_000) {
            let name = self.workloads[self.rng.gen_range(0..WORKLOADS)].clone();
            let a = &mut self.agents[i];
            let id = a
                .session
                .claim(now_i, name.clone(), now_i + Duration::from_secs(10));
            a.claims.insert(id, name.clone());
            let me = a.id;
            self.trail
                .workload(&name, format!("vm-{me} claims it (claim {id})"));
            self.asked.insert((name, Some(me)), self.now);
            self.count("claims");
        }
        while let Some(msg) = self.agents[i].session.poll_transmit() {
            let lat = self.latency();
            let a = &mut self.agents[i];
            if let Some(line) = trail::client_message(&msg) {
                let line = format!("-> {line} (online {})", a.life == Life::Online);
                self.trail.node(a.id, line);
            }
            if a.life == Life::Online {
                a.up.send(now, lat, a.cut_until, msg);
            }
        }
        while let Some(event) = self.agents[i].session.poll_event() {
            match event {
                Event::Prepare {
                    workload,
                    generation,
                    ..
                } => {
                    // Warming tunnels takes a while, sometimes longer than the coordinator
                    // waits (500 ms): failovers commit 0-600 ms after their decision.
                    let warm = self.rng.gen_range(0..600);
                    self.agents[i]
                        .preparing
                        .push((now + warm, workload, generation));
                }
                Event::ClaimAnswered { id, result } => {
                    let line = format!("claim {id} answered: {result:?}");
                    self.trail.node(self.agents[i].id, line);
                    if let (Some(name), Ok(g)) = (self.agents[i].claims.remove(&id), result) {
                        self.planned.lock().unwrap().insert((name, g));
                    }
                }
                Event::Handover { .. } | Event::HandoverAborted { .. } => {
                    panic!("no live migration in the fencing simulation")
                }
                Event::MapChanged | Event::HoldingsChanged | Event::DeltaRefused(_) => {}
            }
        }
    }

    /// Moves agent `i`'s messages both ways and hands what arrived to each side.
    async fn carry(&mut self, i: usize) {
        let now = self.now;
        let now_i = self.clock.instant();
        // The coordinator's queue onto the link.
        loop {
            let lat = self.latency();
            let a = &mut self.agents[i];
            let Some(c) = a.coord.as_mut() else { break };
            match c.rx.try_recv() {
                Ok(Outbound::Frame(f)) => a.down.send(now, lat, a.cut_until, f),
                Ok(Outbound::Close(_)) | Err(mpsc::error::TryRecvError::Disconnected) => {
                    a.lost_at = Some(now + lat);
                    a.coord = None;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
            }
        }
        while let Some(frame) = self.agents[i].down.due(now) {
            let msg = decode_frame(&frame);
            let a = &self.agents[i];
            let line = trail::server_message(&msg, a.session.map());
            self.trail.node(a.id, line);
            if let Err(e) = self.agents[i].session.handle_message(now_i, msg) {
                panic!("seed {}: vm-{}: {e}", self.seed, i + 1);
            }
        }
        while let Some(msg) = self.agents[i].up.due(now) {
            let a = &self.agents[i];
            let Some(serial) = a.coord.as_ref().map(|c| c.serial) else {
                continue;
            };
            let from = SessionRef {
                node: a.id,
                network: NETWORK,
                remote: remote(a.key),
                serial,
            };
            let k = a.at;
            if let Some(line) = trail::client_message(&msg) {
                self.trail
                    .node(a.id, format!("=> coordinator {k} takes {line}"));
            }
            match self.services[k].on_agent_message(from, msg).await {
                Ok(Some(frame)) => {
                    let lat = self.latency();
                    let a = &mut self.agents[i];
                    a.down.send(now, lat, a.cut_until, frame);
                }
                Ok(None) => {}
                Err(e) => panic!("seed {}: vm-{}'s session ended: {e}", self.seed, i + 1),
            }
        }
    }

    /// Writes to the trail what changed since the last step: each agent's holdings of each
    /// workload (its map's entry, whether it answers or is held back, its lease), and each
    /// coordinator's map entry of each workload.
    fn note_states(&mut self) {
        let now_i = self.clock.instant();
        let mut changed = Vec::new();
        for (i, a) in self.agents.iter().enumerate() {
            let h = a.session.holdings();
            let (held, back) = (h.held_named(now_i), h.held_back());
            let noted = self.noted.entry(('a', i)).or_default();
            for w in a.session.map().workloads.values() {
                let state = Noted {
                    generation: w.generation,
                    holder: w.holder,
                    id: w.id,
                    answers: held.get(&w.name).map(|x| x.generation),
                    held_back: back.contains(&w.name),
                    life: Some(a.life),
                };
                if noted.get(&w.name) == Some(&state) {
                    continue;
                }
                // The lease where it matters (and not as a change of its own): when it ends,
                // the first instant it is not valid.
                let lease = (w.holder == Some(a.id) && h.lease_valid(now_i)).then(|| {
                    let (mut lo, mut hi) = (0u64, 60_000u64);
                    while lo + 1 < hi {
                        let mid = (lo + hi) / 2;
                        if h.lease_valid(now_i + Duration::from_millis(mid)) {
                            lo = mid;
                        } else {
                            hi = mid;
                        }
                    }
                    self.now + hi
                });
                let line = format!("vm-{} holdings: {state:?}, lease until {lease:?}", a.id);
                changed.push((w.name.clone(), Some(a.id), line));
                noted.insert(w.name.clone(), state);
            }
        }
        for (k, service) in self.services.iter().enumerate() {
            let noted = self.noted.entry(('c', k)).or_default();
            for w in service.hub().network_workloads(NETWORK, None) {
                let state = Noted {
                    generation: w.generation,
                    holder: w.holder,
                    id: w.id,
                    answers: None,
                    held_back: false,
                    life: None,
                };
                if noted.get(&w.name) == Some(&state) {
                    continue;
                }
                let version = service.hub().version(NETWORK);
                let line = format!("coordinator {k}'s map v{version:?}: {state:?}");
                changed.push((w.name.clone(), None, line));
                noted.insert(w.name.clone(), state);
            }
        }
        for (name, node, line) in changed {
            match node {
                Some(n) => self.trail.node(n, line.clone()),
                None => self.trail.coordinator(line.clone()),
            }
            self.trail.workload(&name, line);
        }
    }

    /// The invariants that hold at every instant.
    fn check(&mut self) {
        let now_i = self.clock.instant();
        let mut by_workload: BTreeMap<String, Vec<(NodeId, u64)>> = BTreeMap::new();
        for a in &self.agents {
            if matches!(a.life, Life::Dead(_)) {
                continue; // a dead process answers for nothing
            }
            let names: BTreeMap<_, _> = a
                .session
                .map()
                .workloads
                .values()
                .map(|w| (w.address, w.name.clone()))
                .collect();
            for h in a.session.holdings().held(now_i) {
                let name = names.get(&h.address).cloned().unwrap_or_default();
                by_workload
                    .entry(name)
                    .or_default()
                    .push((a.id, h.generation));
            }
        }
        for (name, holders) in by_workload {
            let gens: BTreeSet<u64> = holders.iter().map(|(_, g)| *g).collect();
            if gens.len() != holders.len() {
                let nodes: Vec<NodeId> = holders.iter().map(|(n, _)| *n).collect();
                eprintln!("the trail:\n{}", self.trail.report(&name, &nodes));
            }
            assert_eq!(
                gens.len(),
                holders.len(),
                "seed {}, t={} ms: two holders of {name} at one generation: {holders:?}",
                self.seed,
                self.now
            );
            if holders.len() > 1 {
                let (lo, hi) = (gens.first().copied(), gens.last().copied());
                let newer = holders
                    .iter()
                    .max_by_key(|(_, g)| *g)
                    .map_or(0, |(n, _)| *n);
                let key = (name, lo.unwrap_or(0), hi.unwrap_or(0));
                let now = self.now;
                if !self.overlaps.contains_key(&key) {
                    let nodes: Vec<NodeId> = holders.iter().map(|(n, _)| *n).collect();
                    eprintln!(
                        "seed {}, t={now} ms: {} held by {holders:?} (node, generation) at once; \
                         the trail:\n{}",
                        self.seed,
                        key.0,
                        self.trail.report(&key.0, &nodes)
                    );
                }
                self.overlaps
                    .entry(key)
                    .and_modify(|(_, to, _)| *to = now)
                    .or_insert((now, now, newer));
            }
        }
    }

    /// After the chaos: no two live holders of one workload at any instant.
    fn judge_overlaps(&self) {
        assert!(
            self.overlaps.is_empty(),
            "seed {}: two live holders at once (workload, older and newer generation -> from, \
             to, newer holder): {:?}",
            self.seed,
            self.overlaps
        );
        let planned = self.planned.lock().unwrap();
        let bound = WorkloadTiming::default().lease.as_millis() as u64 + 2 * MAX_LATENCY_MS + 100;
        for ((name, old, new), (from, to, holder)) in &self.overlaps {
            let asked = self
                .asked
                .get(&(name.clone(), Some(*holder)))
                .is_some_and(|at| at <= from && from - at <= PLANNED_WITHIN_MS);
            assert!(
                planned.contains(&(name.clone(), *new)) || asked,
                "seed {}: {name} held at generations {old} and {new} (by vm-{holder}) at once \
                 ({from}-{to} ms), across a failover",
                self.seed
            );
            assert!(
                to - from <= bound,
                "seed {}: {name} held at generations {old} and {new} at once for {} ms",
                self.seed,
                to - from
            );
        }
    }

    /// Whether every agent has the store's generation of every workload, with exactly its
    /// holder answering for it; otherwise what differs.
    async fn converged(&self) -> Result<(), String> {
        let now_i = self.clock.instant();
        for name in &self.workloads {
            // An operator's recreation may be between its deletion and its creation.
            let Some(w) = self.store.workload(NETWORK, name).await.unwrap() else {
                return Err(format!("{name} is not in the store"));
            };
            for a in &self.agents {
                let seen = a.session.map().workloads.get(name).map(|x| x.generation);
                if seen != Some(w.generation) {
                    return Err(format!(
                        "vm-{} has {name} at generation {seen:?}, the store at {}: life {:?}, \
                         cut {:?}, connected {}, map version {}, hub version {:?}",
                        a.id,
                        w.generation,
                        a.life,
                        a.cut_until,
                        a.session.is_connected(),
                        a.session.map().version,
                        self.services
                            .iter()
                            .map(|s| s.hub().version(NETWORK))
                            .collect::<Vec<_>>()
                    ));
                }
                let holds = a
                    .session
                    .holdings()
                    .held(now_i)
                    .iter()
                    .any(|h| h.address.addr() == IpAddr::V4(w.address));
                if holds != (w.holder == Some(a.id)) {
                    return Err(format!(
                        "vm-{} answers for {name}: {holds}; the store: {w:?}; its map: {:?} at \
                         version {}; connected {} to coordinator {}, lease valid {}, held back \
                         {:?}",
                        a.id,
                        a.session.map().workloads.get(name),
                        a.session.map().version,
                        a.session.is_connected(),
                        a.at,
                        a.session.holdings().lease_valid(now_i),
                        a.session.holdings().held_back(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// One simulated millisecond.
    async fn step(&mut self, now: u64, chaos: bool) {
        self.now = now;
        self.clock.set(now);
        // Let spawned work (moves, failovers) see the new time.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        for k in 0..self.services.len() {
            if self.down_until[k].is_some_and(|t| now >= t) {
                self.start_coordinator(k).await;
            }
            if let Some(s) = &mut self.stopping[k] {
                if s.all_at.is_none() && self.services[k].without_stop_lease() == 0 {
                    s.all_at = Some(now);
                }
                let linger = u64::try_from(STOP_LINGER.as_millis()).unwrap();
                if now >= s.until || s.all_at.is_some_and(|t| now >= t + linger) {
                    self.stopped(k).await;
                }
            }
        }
        // At most one coordinator of several down at a time: agents always have one left. With
        // several, one crash happens in every run at least (halfway, if none happened by then).
        let due = self.services.len() > 1
            && now == CHAOS_MS / 2
            && !self.stats.contains_key("coordinator crashes");
        if chaos
            && (self.rng.gen_ratio(1, 12_000) || due)
            && self.down_until.iter().all(Option::is_none)
            && self.stopping.iter().all(Option::is_none)
        {
            let k = self.rng.gen_range(0..self.services.len());
            // Alone, half the restarts are orderly (an upgrade): a stop lease first.
            if self.services.len() == 1 && self.rng.gen_bool(0.5) {
                self.begin_stop(k);
            } else {
                self.crash_coordinator(k).await;
            }
        }
        if self.url.is_some() {
            for k in 0..self.services.len() {
                if !self.is_up(k) {
                    continue;
                }
                if now.is_multiple_of(FOLLOW_MS) && !self.rng.gen_bool(MISSED_NOTIFICATION) {
                    let _ = self.services[k].follow_all().await;
                }
                if now.is_multiple_of(1_000) {
                    self.services[k].refresh_presence().await;
                }
            }
        }
        if chaos && self.rng.gen_ratio(1, 700) {
            self.operator();
        }
        for i in 0..self.agents.len() {
            self.agent_step(i, chaos).await;
        }
        self.note_states();
        self.check();
    }

    /// The chaos, then calm until every agent has converged (checked every 100 ms, for at
    /// most `HEAL_MS`): a change the service is still committing when the chaos ends lands
    /// during the calm.
    async fn run(&mut self) {
        for now in 1..=CHAOS_MS {
            self.step(now, true).await;
        }
        self.finish_recreations().await;
        let mut last = Err(String::new());
        for now in CHAOS_MS + 1..=CHAOS_MS + HEAL_MS {
            self.step(now, false).await;
            if now % 100 == 0 {
                last = self.converged().await;
                if last.is_ok() {
                    break;
                }
            }
        }
        self.judge_overlaps();
        if let Err(e) = last {
            panic!(
                "seed {}: not converged {HEAL_MS} ms after the chaos: {e}",
                self.seed
            );
        }
    }
}

async fn simulate(
    seed: u64,
    url: Option<&str>,
    coordinators: usize,
) -> BTreeMap<&'static str, u64> {
    let dir = TempDir::new(&format!("fencing-{seed}"));
    let mut sim = Sim::new(&dir, seed, url, coordinators).await;
    sim.run().await;
    let gens: u64 = {
        let mut total = sim.retired.load(Ordering::Relaxed);
        for w in &sim.workloads {
            total += sim.generation(w).await;
        }
        total
    };
    let mut stats = sim.stats.clone();
    stats.insert("generations", gens);
    stats.insert("overlaps", sim.overlaps.len() as u64);
    stats.insert("planned", sim.planned.lock().unwrap().len() as u64);
    for t in &mut sim.tasks {
        t.abort_all();
    }
    stats
}

/// The seeds to simulate: `default`, or `MESHLINK_FENCING_SEEDS` (`FIRST-LAST`) to look for a
/// rare failure.
fn seeds(default: std::ops::RangeInclusive<u64>) -> std::ops::RangeInclusive<u64> {
    let Ok(v) = std::env::var("MESHLINK_FENCING_SEEDS") else {
        return default;
    };
    let parsed = v
        .split_once('-')
        .and_then(|(a, b)| Some(a.trim().parse().ok()?..=b.trim().parse().ok()?));
    parsed.unwrap_or_else(|| panic!("MESHLINK_FENCING_SEEDS={v:?}: expected FIRST-LAST"))
}

#[tokio::test(flavor = "current_thread")]
async fn fencing_holds_through_moves_claims_crashes_cuts_and_coordinator_restarts() {
    for seed in seeds(1..=4) {
        let stats = simulate(seed, None, 1).await;
        eprintln!("fencing seed {seed}: {stats:?}");
        assert!(
            stats["generations"] > 3 * WORKLOADS as u64,
            "seed {seed}: too few changes: {stats:?}"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn fencing_holds_with_three_coordinators_sharing_postgresql() {
    for seed in seeds(11..=13) {
        let Some(TestDb::Postgres(url)) = TestDb::postgres() else {
            return;
        };
        let stats = simulate(seed, Some(&url), 3).await;
        eprintln!("fencing (3 coordinators) seed {seed}: {stats:?}");
        assert!(
            stats["generations"] > 3 * WORKLOADS as u64,
            "seed {seed}: too few changes: {stats:?}"
        );
        assert!(
            stats.get("coordinator crashes").copied().unwrap_or(0) > 0,
            "seed {seed}: no coordinator crashed: {stats:?}"
        );
    }
}

/// Two planned changes of one workload started together: when both computed their change from
/// the same generation (the usual case), the store's compare-and-set lets exactly one of them
/// commit the next generation and the other is refused as a conflict; when one finished before
/// the other read the workload (the store's queries run on a thread of their own, so the
/// interleaving is not forced), both commit, one generation each. Never one generation
/// twice, and what every session was told matches the store.
#[tokio::test(flavor = "current_thread")]
async fn two_moves_racing_on_one_generation_commit_once() {
    let dir = TempDir::new("fencing-race");
    let sim = Sim::new(&dir, 7, None, 1).await;
    let before = sim.generation("w0").await;
    // Both destinations are offline: no preparation, both go straight to the commit.
    let service = sim.service();
    let (a, b) = tokio::join!(
        service.move_workload(NETWORK, "w0", Some("vm-4")),
        service.move_workload(NETWORK, "w0", Some("vm-5")),
    );
    let won: Vec<_> = [&a, &b]
        .into_iter()
        .filter_map(|r| r.as_ref().ok())
        .collect();
    let lost: Vec<_> = [&a, &b]
        .into_iter()
        .filter_map(|r| r.as_ref().err())
        .collect();
    let w = sim.store.workload(NETWORK, "w0").await.unwrap().unwrap();
    match (won.len(), &lost[..]) {
        (1, [meshlink_coordinator::handlers::ApiError::Conflict(_)]) => {
            assert_eq!(w.generation, before + 1);
            assert_eq!(w.holder, won[0].workload.holder);
        }
        (2, []) => {
            let mut generations: Vec<u64> = won.iter().map(|m| m.workload.generation).collect();
            generations.sort_unstable();
            assert_eq!(generations, [before + 1, before + 2], "{a:?} / {b:?}");
            let last = won
                .iter()
                .max_by_key(|m| m.workload.generation)
                .expect("two");
            assert_eq!(w.generation, before + 2);
            assert_eq!(w.holder, last.workload.holder);
        }
        _ => panic!("one commits and the other conflicts, or both in turn: {a:?} / {b:?}"),
    }
    let map = sim
        .service()
        .hub()
        .full_map(NETWORK)
        .expect("the network is loaded");
    let ServerMessage::FullMap(map) = decode_frame(&map) else {
        panic!("not a full map")
    };
    assert_eq!(map.workloads["w0"].generation, w.generation);
    assert_eq!(map.workloads["w0"].holder, w.holder);
}

/// A holder revoked while its standby is online, and not answering (it may be cut off, and
/// then cannot learn that it was revoked): the workload moves to the standby, prepared first,
/// but only once the revoked holder's lease has surely run out.
#[tokio::test(flavor = "current_thread")]
async fn a_quiet_revoked_holder_hands_over_to_its_standby_after_its_lease() {
    let dir = TempDir::new("fencing-revoke");
    let mut sim = Sim::new(&dir, 8, None, 1).await;
    // Only the revocation moves anything here.
    sim.tasks[0].abort_all();
    // w0 was given to vm-1 at 0 ms; vm-1 never answers. Its standbys are vm-2, then vm-3;
    // only vm-2 connects, at 1 s, when vm-1 has been quiet for longer than two heartbeats.
    let (holder_quiet_at, standby) = (1_000, 1);
    sim.now = holder_quiet_at;
    sim.clock.set(holder_quiet_at);
    sim.connect(standby).await;
    let before = sim.generation("w0").await;
    let service = sim.service();
    let revoke = tokio::spawn(async move { service.revoke_node("vm-1", Some(NETWORK)).await });
    let mut now = holder_quiet_at;
    let mut prepared_at = None;
    while !revoke.is_finished() {
        now += 10;
        sim.now = now;
        sim.clock.set(now);
        // A real millisecond per simulated 10: the store works on its own thread, and a
        // loaded machine must not see simulated seconds pass while one write is on its way.
        tokio::time::sleep(Duration::from_millis(1)).await;
        sim.carry(standby).await;
        while let Some(e) = sim.agents[standby].session.poll_event() {
            if let Event::Prepare {
                workload,
                generation,
                ..
            } = e
            {
                prepared_at.get_or_insert(now);
                sim.agents[standby].session.prepared(workload, generation);
            }
        }
        while let Some(m) = sim.agents[standby].session.poll_transmit() {
            sim.agents[standby].up.send(now, 1, None, m);
        }
        assert!(now < 10_000, "the revocation did not finish");
    }
    revoke.await.unwrap().unwrap();
    let w = sim.store.workload(NETWORK, "w0").await.unwrap().unwrap();
    assert_eq!(w.holder, Some(sim.agents[standby].id), "{w:?}");
    assert_eq!(w.generation, before + 1);
    // vm-1's lease could last until the grant (0 ms) plus a lease and the margin.
    let timing = WorkloadTiming::default();
    let lease_end = (timing.lease + timing.margin).as_millis() as u64;
    let prepared_at = prepared_at.expect("the standby was asked to prepare");
    assert!(
        prepared_at >= lease_end,
        "the standby was prepared at {prepared_at} ms, before the revoked holder's lease ended ({lease_end} ms)"
    );
}

/// What `Sim::check` saw of one workload after a scene: the overlaps, and when (simulated ms)
/// `node` first answered for it.
fn first_answer(sim: &Sim, name: &str, node: usize) -> Option<u64> {
    let now_i = sim.clock.instant();
    let a = &sim.agents[node];
    let w = a.session.map().workloads.get(name)?;
    a.session
        .holdings()
        .held(now_i)
        .iter()
        .any(|h| h.address == w.address)
        .then_some(sim.now)
}

/// Steps a calm mesh (no chaos) until `until` ms; returns when `node` first answered for
/// `name` after `from` ms, if it did. While `pending` (a change the service is making) runs,
/// every simulated millisecond also lasts a real one: its store works on its own thread, and a
/// loaded machine must not see simulated time run ahead of a write on its way (a planned move
/// then looked as slow as a lease).
async fn calm_until<T>(
    sim: &mut Sim,
    until: u64,
    name: &str,
    node: usize,
    from: u64,
    pending: Option<&tokio::task::JoinHandle<T>>,
) -> Option<u64> {
    let mut first = None;
    while sim.now < until {
        let now = sim.now + 1;
        if pending.is_some_and(|p| !p.is_finished()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sim.step(now, false).await;
        if now > from && first.is_none() {
            first = first_answer(sim, name, node);
        }
    }
    first
}

/// The chaos tests' bug, in simulated time: vm-1 holds w0; its link to the coordinator is cut
/// and at once an operator moves w0 to vm-2 (connected). vm-1 keeps its lease and answers
/// until it ends; vm-2 must not answer before then, and answers after. Then a move between
/// two connected holders: the new holder answers within a few link delays of the commit
/// (the old holder's acknowledgement, not its lease).
#[tokio::test(flavor = "current_thread")]
async fn a_move_away_from_a_holder_cut_off_just_before_never_leaves_two_holders() {
    let dir = TempDir::new("fencing-cut-move");
    // Everyone connects; vm-1 holds w0 with a fresh lease.
    let mut sim = Sim::new_calm(&dir, 9, None, 1, 3_000).await;
    assert!(sim.overlaps.is_empty());
    // The cut, and the move at once (vm-1's last heartbeat was answered under 300 ms ago).
    let cut_at = sim.now;
    sim.agents[0].cut_until = Some(cut_at + 4_000);
    sim.agents[0].idle_at = Some(cut_at + IDLE_MS);
    let service = sim.service();
    let moved =
        tokio::spawn(async move { service.move_workload(NETWORK, "w0", Some("vm-2")).await });
    let answered = calm_until(&mut sim, cut_at + 3_000, "w0", 1, cut_at, Some(&moved)).await;
    let outcome = moved.await.unwrap().unwrap();
    assert_eq!(outcome.workload.holder, Some(sim.agents[1].id));
    assert!(
        sim.overlaps.is_empty(),
        "two holders after a move away from a cut-off holder: {:?}",
        sim.overlaps
    );
    let answered = answered.expect("vm-2 answers once vm-1's lease has surely run out");
    let lease = WorkloadTiming::default().lease.as_millis() as u64;
    assert!(
        answered >= cut_at + lease - 300 && answered <= cut_at + lease + 500,
        "vm-2 answered {} ms after the cut",
        answered - cut_at
    );

    // Between connected nodes: w1 from vm-2 to vm-4, answered at once after the commit.
    let start = sim.now;
    let service = sim.service();
    let moved =
        tokio::spawn(async move { service.move_workload(NETWORK, "w1", Some("vm-4")).await });
    let answered = calm_until(&mut sim, start + 3_000, "w1", 3, start, Some(&moved)).await;
    let outcome = moved.await.unwrap().unwrap();
    assert_eq!(outcome.workload.holder, Some(sim.agents[3].id));
    assert!(sim.overlaps.is_empty(), "{:?}", sim.overlaps);
    let answered = answered.expect("vm-4 answers") - start;
    // The preparation (tunnels up in 0-600 ms, waited for up to 500 ms), the commit, the
    // delta to vm-2, its acknowledgement and the confirmation: a few 30 ms links, no lease.
    assert!(
        answered < 500 + 6 * MAX_LATENCY_MS + 100,
        "vm-4 answered after {answered} ms"
    );
    eprintln!("fencing: new holder answered {answered} ms after a planned move's request");
}

/// Steps a calm lone coordinator through an orderly stop (its stop lease granted to every
/// holder) and a restart `outage` ms after it stopped. Returns when it stopped.
async fn orderly_restart(sim: &mut Sim, outage: u64) -> u64 {
    sim.begin_stop(0);
    while sim.stopping[0].is_some() {
        let now = sim.now + 1;
        sim.step(now, false).await;
        assert!(sim.now < 100_000, "the stop did not end");
    }
    assert_eq!(
        sim.stats
            .get("stops before every holder had its stop lease"),
        None,
        "a holder had no stop lease"
    );
    let stopped = sim.now;
    sim.down_until[0] = Some(stopped + outage);
    stopped
}

/// An orderly restart of a lone coordinator (an upgrade) that lasts a little less than a
/// lease: 1.45 s, which a crash leaves holders no lease to ride out (they have 1.2-1.5 s left
/// at any moment). The stop lease carries vm-1 through: it answers for w0 at every simulated
/// millisecond, and is back on the restarted coordinator afterwards.
#[tokio::test(flavor = "current_thread")]
async fn an_orderly_restart_shorter_than_a_lease_silences_no_workload() {
    let dir = TempDir::new("fencing-orderly-restart");
    let mut sim = Sim::new_calm(&dir, 10, None, 1, 3_000).await;
    let began = sim.now;
    let stopped = orderly_restart(&mut sim, 1_450).await;
    let mut silent = Vec::new();
    while sim.now < stopped + 4_000 {
        let now = sim.now + 1;
        sim.step(now, false).await;
        if first_answer(&sim, "w0", 0).is_none() {
            silent.push(now);
        }
    }
    assert!(
        silent.is_empty(),
        "vm-1 did not answer for w0 for {} ms across the restart (stop began at {began} ms, \
         stopped at {stopped} ms): from {:?} to {:?}",
        silent.len(),
        silent.first(),
        silent.last()
    );
    assert!(sim.overlaps.is_empty(), "{:?}", sim.overlaps);
    assert_eq!(sim.agents[0].life, Life::Online, "vm-1 is not back");
}

/// A holder with a stop lease that cannot reach the restarted coordinator (cut off at the
/// stop): the restarted coordinator, which has not heard from it, fails its workload over only
/// once that stop lease has surely ended. A lease of 3 s makes the stop lease (7 s) longer than
/// a lease and the start-up grace (6 s), so that only the stop lease the next run inherits
/// keeps the standby back; the restart is immediate.
#[tokio::test(flavor = "current_thread")]
async fn a_restarted_coordinator_waits_out_the_stop_lease_of_a_holder_it_cannot_reach() {
    let dir = TempDir::new("fencing-stop-lease-failover");
    let lease = Duration::from_secs(3);
    let mut sim = Sim::with_lease(&dir, 11, None, 1, lease).await;
    // Long enough for w0's first move to be older than what a restart counts as recent (its
    // next holder then waits a stop lease from the start whoever held it).
    assert!(calm_until::<()>(&mut sim, 15_000, "w0", 0, 0, None)
        .await
        .is_some());
    let before = sim.generation("w0").await;
    let stopped = orderly_restart(&mut sim, 10).await;
    sim.agents[0].cut_until = Some(stopped + 60_000);
    let mut vm1_last = None;
    let mut vm2_first = None;
    while sim.now < stopped + 12_000 && vm2_first.is_none() {
        let now = sim.now + 1;
        sim.step(now, false).await;
        if first_answer(&sim, "w0", 0).is_some() {
            vm1_last = Some(now);
        }
        if vm2_first.is_none() {
            vm2_first = first_answer(&sim, "w0", 1);
        }
    }
    assert!(sim.overlaps.is_empty(), "two holders: {:?}", sim.overlaps);
    let vm1_last = vm1_last.expect("vm-1 answered on its stop lease") - stopped;
    let stop_lease = WorkloadTiming::lone_stop_lease(lease).as_millis() as u64;
    assert!(
        vm1_last + 500 >= stop_lease,
        "vm-1 answered only until {vm1_last} ms after the stop (stop lease {stop_lease} ms)"
    );
    let vm2_first = vm2_first.expect("the standby vm-2 took w0 over") - stopped;
    assert!(
        vm2_first > vm1_last,
        "vm-2 at {vm2_first} ms, vm-1 until {vm1_last} ms"
    );
    assert_eq!(sim.generation("w0").await, before + 1);
    eprintln!(
        "fencing: after an orderly restart, vm-1 answered until {vm1_last} ms, the standby from \
         {vm2_first} ms"
    );
}

/// A holder that renews its lease with the restarted coordinator keeps the stop lease the
/// previous run gave it (its lease only grows): vm-1 holds w0, the lone coordinator stops in
/// order (vm-1 has its stop lease, to about 4 s after the stop began) and is back 10 ms after;
/// vm-1 reconnects and renews, and is then cut off for good. The restarted coordinator, which
/// has heard from it, must count its lease to the stop lease's end, not a lease after that
/// renewal: the standby vm-2 takes w0 over (a failover) only after vm-1 has stopped answering.
/// The same with a planned move at the cut, whose new holder must wait for that end too.
#[tokio::test(flavor = "current_thread")]
async fn a_holder_renewed_after_an_orderly_restart_keeps_its_stop_lease_and_is_not_answered_over() {
    for planned in [false, true] {
        let dir = TempDir::new(&format!("fencing-renewed-stop-lease-{planned}"));
        // Long enough after w0 was given to vm-1 that the restarted coordinator does not wait
        // for that change's old holders (there were none) anyway.
        let mut sim = Sim::new_calm(&dir, 12, None, 1, 10_000).await;
        let began = sim.now;
        let stopped = orderly_restart(&mut sim, 10).await;
        // vm-1 back on the restarted coordinator, its first heartbeat there answered.
        let serial = |sim: &Sim| sim.agents[0].coord.as_ref().map(|c| c.serial);
        let before = serial(&sim);
        while sim.agents[0].life != Life::Online || serial(&sim) == before {
            let now = sim.now + 1;
            sim.step(now, false).await;
            assert!(sim.now < stopped + 3_000, "vm-1 did not come back");
        }
        let back = sim.now;
        calm_until::<()>(&mut sim, back + 100, "w0", 0, 0, None).await;
        let cut_at = sim.now;
        sim.agents[0].cut_until = Some(cut_at + 60_000);
        sim.agents[0].idle_at = Some(cut_at + IDLE_MS);
        let moved = planned.then(|| {
            let service = sim.service();
            tokio::spawn(async move { service.move_workload(NETWORK, "w0", Some("vm-2")).await })
        });
        let mut vm1_last = None;
        let mut vm2_first = None;
        while sim.now < cut_at + 8_000 {
            let now = sim.now + 1;
            if moved.as_ref().is_some_and(|m| !m.is_finished()) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            sim.step(now, false).await;
            if first_answer(&sim, "w0", 0).is_some() {
                vm1_last = Some(now);
            }
            if vm2_first.is_none() {
                vm2_first = first_answer(&sim, "w0", 1);
            }
        }
        if let Some(m) = moved {
            m.await.unwrap().unwrap();
        }
        let vm1_last = vm1_last.expect("vm-1 answered on its stop lease");
        let vm2_first = vm2_first.expect("vm-2 took w0 over");
        eprintln!(
            "fencing (planned {planned}): stop began at {began} ms, stopped at {stopped} ms, \
             vm-1 back at {back} ms, cut at {cut_at} ms, answered until {vm1_last} ms; vm-2 \
             from {vm2_first} ms"
        );
        assert!(
            vm1_last + 500
                >= began
                    + WorkloadTiming::lone_stop_lease(WorkloadTiming::default().lease).as_millis()
                        as u64,
            "vm-1 did not keep its stop lease (answered until {vm1_last} ms, the stop began at \
             {began} ms)"
        );
        assert!(sim.overlaps.is_empty(), "two holders: {:?}", sim.overlaps);
        assert!(
            vm2_first > vm1_last,
            "vm-2 at {vm2_first} ms, vm-1 until {vm1_last} ms"
        );
    }
}

/// Attaches w0 to agent `to` through `service` while vm-1, cut off at `cut_at` holding it,
/// still answers on its last lease, and steps the simulation to 4 s after the cut: (vm-1's
/// last answer, `to`'s first), in ms after the cut.
async fn attach_under_a_cut_off_holder(
    sim: &mut Sim,
    service: Arc<Service>,
    cut_at: u64,
    to: usize,
) -> (u64, u64) {
    let name = format!("vm-{}", to + 1);
    let dest = name.clone();
    let attached =
        tokio::spawn(async move { service.move_workload(NETWORK, "w0", Some(&dest)).await });
    let (old_last, new_first) = watch_w0(
        sim,
        cut_at,
        cut_at + 4_000,
        to,
        Some(&attached),
        (None, None),
    )
    .await;
    let o = attached.await.unwrap().unwrap();
    assert_eq!(o.workload.holder, Some(sim.agents[to].id));
    (
        old_last.expect("vm-1 answered on its lease"),
        new_first.unwrap_or_else(|| panic!("{name} answered")),
    )
}

/// A lone coordinator's simulation (`seed`) run calmly to 10 s, vm-1 holding w0, then vm-1
/// cut off for a minute (it keeps its lease and learns of nothing): the simulation and the
/// cut's time.
async fn vm1_cut_off_holding_w0(dir: &TempDir, seed: u64) -> (Sim, u64) {
    let mut sim = Sim::new_calm(dir, seed, None, 1, 10_000).await;
    let cut_at = sim.now;
    sim.agents[0].cut_until = Some(cut_at + 60_000);
    sim.agents[0].idle_at = Some(cut_at + IDLE_MS);
    (sim, cut_at)
}

/// A scene's end: no two holders of w0, and its new holder's first answer (`new_first`) after
/// the cut-off vm-1's last (`old_last`), both in ms after the cut; `scene` says what happened.
fn assert_w0_answered_in_turn(sim: &Sim, scene: &str, old_last: u64, new_first: u64) {
    let w0: Vec<_> = sim
        .overlaps
        .iter()
        .filter(|((n, ..), _)| n == "w0")
        .collect();
    eprintln!(
        "fencing ({scene}): vm-1 answered until +{old_last} ms after the cut, the new holder \
         from +{new_first} ms; overlaps of w0 {w0:?}"
    );
    assert!(w0.is_empty(), "{scene}: two holders: {w0:?}");
    assert!(
        new_first > old_last,
        "{scene}: the new holder from +{new_first} ms, vm-1 until +{old_last} ms"
    );
}

/// vm-1 holds w0 and is cut off (it keeps its lease, and cannot learn of any change); at once
/// the lone coordinator detaches w0 (or, with `recreate`, deletes it and creates it again,
/// detached, at its address) and crashes right after. The next run attaches w0 to vm-2. vm-1
/// answers on its last lease for up to a lease after the cut: vm-2 must not answer before
/// then (two holders for 1.15 s before the next run counted detached and created workloads as
/// recently changed).
async fn detached_before_a_crash_then_attached(recreate: bool) {
    let dir = TempDir::new(&format!("fencing-detach-crash-{recreate}"));
    let (mut sim, cut_at) = vm1_cut_off_holding_w0(&dir, 13).await;
    let service = sim.service();
    if recreate {
        service.delete_workload(NETWORK, "w0").await.unwrap();
        service
            .create_workload(workload_request(0, Some(sim.addresses[0])))
            .await
            .unwrap();
    } else {
        let o = service.move_workload(NETWORK, "w0", None).await.unwrap();
        assert_eq!(o.workload.holder, None);
    }
    // The crash, right after; the next run starts at once.
    sim.crash_coordinator(0).await;
    let service = sim.service();
    let (vm1_last, vm2_first) = attach_under_a_cut_off_holder(&mut sim, service, cut_at, 1).await;
    let scene = format!("recreate {recreate}, then a crash, attached by the next run");
    assert_w0_answered_in_turn(&sim, &scene, vm1_last, vm2_first);
}

/// See [`detached_before_a_crash_then_attached`]: a detach.
#[tokio::test(flavor = "current_thread")]
async fn a_workload_detached_just_before_a_crash_is_not_attached_over_its_cut_off_holder() {
    detached_before_a_crash_then_attached(false).await;
}

/// See [`detached_before_a_crash_then_attached`]: a deletion and a creation at the address.
#[tokio::test(flavor = "current_thread")]
async fn a_workload_recreated_just_before_a_crash_is_not_attached_over_its_cut_off_holder() {
    detached_before_a_crash_then_attached(true).await;
}

/// Three coordinators sharing a new PostgreSQL database (`None` without PostgreSQL, where
/// that is allowed), their simulation (`seed`) run calmly to 3 s: its directory, the
/// database's URL and the simulation.
async fn three_sharing_calm(tag: &str, seed: u64) -> Option<(TempDir, String, Sim)> {
    let Some(TestDb::Postgres(url)) = TestDb::postgres() else {
        return None;
    };
    let dir = TempDir::new(&format!("fencing-shared-{tag}"));
    let sim = Sim::new_calm(&dir, seed, Some(&url), 3, 3_000).await;
    Some((dir, url, sim))
}

/// Three coordinators sharing PostgreSQL. vm-1 holds w0; coordinator 2 (B) crashes. vm-1 is
/// cut off (it keeps its lease) and at once coordinator 0 (A) deletes w0; B starts again
/// (its map has no w0, so nothing of w0's holders), A creates w0 again, detached, at its
/// address, and B follows that creation on its own. vm-3, whose session is now on B, gets w0
/// (through `via`): vm-1 answers on its last lease for up to a lease after the cut, and vm-3
/// must not answer before then, whichever coordinator made the change.
async fn recreated_while_a_coordinator_restarted_then_attached_through(via: usize) {
    let Some((_dir, _, mut sim)) = three_sharing_calm(&format!("recreate-{via}"), 21).await else {
        return;
    };
    // B down (it comes back when told).
    sim.crash_coordinator(2).await;
    sim.down_until[2] = Some(u64::MAX);
    let until = sim.now + 200;
    calm_until::<()>(&mut sim, until, "w0", 0, 0, None).await;
    let cut_at = sim.now;
    sim.agents[0].cut_until = Some(cut_at + 60_000);
    sim.agents[0].idle_at = Some(cut_at + IDLE_MS);
    sim.services[0]
        .delete_workload(NETWORK, "w0")
        .await
        .unwrap();
    sim.start_coordinator(2).await;
    sim.services[0]
        .create_workload(workload_request(0, Some(sim.addresses[0])))
        .await
        .unwrap();
    sim.services[2].follow_all().await.unwrap();
    // vm-3 moves its session to B.
    sim.lose(2).await;
    sim.agents[2].next = 2;
    sim.agents[2].life = Life::Offline(sim.now);
    let until = sim.now + 5;
    calm_until::<()>(&mut sim, until, "w0", 0, 0, None).await;
    assert_eq!((sim.agents[2].life, sim.agents[2].at), (Life::Online, 2));
    let service = sim.services[via].clone();
    let (vm1_last, vm3_first) = attach_under_a_cut_off_holder(&mut sim, service, cut_at, 2).await;
    let scene = format!("shared, recreated while B restarted, attached via {via}");
    assert_w0_answered_in_turn(&sim, &scene, vm1_last, vm3_first);
}

/// See [`recreated_while_a_coordinator_restarted_then_attached_through`]: attached through A,
/// which knows of vm-1.
#[tokio::test(flavor = "current_thread")]
async fn shared_a_workload_recreated_while_a_coordinator_restarted_is_not_answered_over_its_cut_off_holder_via_a(
) {
    recreated_while_a_coordinator_restarted_then_attached_through(0).await;
}

/// See [`recreated_while_a_coordinator_restarted_then_attached_through`]: attached through B.
#[tokio::test(flavor = "current_thread")]
async fn shared_a_workload_recreated_while_a_coordinator_restarted_is_not_answered_over_its_cut_off_holder_via_b(
) {
    recreated_while_a_coordinator_restarted_then_attached_through(2).await;
}

/// A change of holder committed while a lone coordinator stops in order: vm-1 holds w0 and has
/// its stop lease (7 s for a lease of 3 s), is cut off at once, and w0 is detached (`how`
/// "detach"), moved to the offline vm-5 (`"move"`), or deleted and created again at its
/// address (`"recreate"`) before the coordinator stops. The change's wait for vm-1 lives in
/// memory only. The next run starts late enough that the change looks older than what a
/// restart counts as recent (a lease, the margin and what is left of the stop lease), yet
/// before vm-1's stop lease ends; it attaches w0 to vm-2 (or vm-5 comes back with it): the new
/// holder must not answer while vm-1 still does.
async fn changed_during_an_orderly_stop(how: &str) {
    let dir = TempDir::new(&format!("fencing-stop-window-{how}"));
    let lease = Duration::from_secs(3);
    let mut sim = Sim::with_lease(&dir, 14, None, 1, lease).await;
    assert!(calm_until::<()>(&mut sim, 15_000, "w0", 0, 0, None)
        .await
        .is_some());
    // vm-5 offline for now (it comes back to the next run).
    if how == "move" {
        sim.lose(4).await;
        sim.agents[4].life = Life::Offline(u64::MAX);
    }
    let began = sim.now;
    sim.begin_stop(0);
    // vm-1's next heartbeat gets the stop lease.
    let stop_lease = WorkloadTiming::lone_stop_lease(lease).as_millis() as u64;
    let lease_ms = lease.as_millis() as u64;
    while !sim.agents[0]
        .session
        .holdings()
        .lease_valid(sim.clock.at(sim.now + lease_ms + 500))
    {
        let now = sim.now + 1;
        sim.step(now, false).await;
        assert!(
            sim.stopping[0].is_some(),
            "stopped before vm-1 had its stop lease"
        );
    }
    let cut_at = sim.now;
    sim.agents[0].cut_until = Some(cut_at + 60_000);
    sim.agents[0].idle_at = Some(cut_at + IDLE_MS);
    let service = sim.service();
    match how {
        "detach" => {
            service.move_workload(NETWORK, "w0", None).await.unwrap();
        }
        "move" => {
            service
                .move_workload(NETWORK, "w0", Some("vm-5"))
                .await
                .unwrap();
        }
        _ => {
            service.delete_workload(NETWORK, "w0").await.unwrap();
            service
                .create_workload(workload_request(0, Some(sim.addresses[0])))
                .await
                .unwrap();
        }
    }
    let moved_at = sim.store.workload(NETWORK, "w0").await.unwrap().unwrap();
    let moved_at = moved_at
        .moved_at
        .unwrap_or(moved_at.created_at)
        .max(moved_at.created_at);
    while sim.stopping[0].is_some() {
        let now = sim.now + 1;
        sim.step(now, false).await;
    }
    let stopped = sim.now;
    // The next run counts a change as recent from (lease + margin, what is left of the stop
    // lease if longer: under 3.1 s here) and 2 s before its start, in whole seconds: it starts
    // at the first whole second where the change is older than that.
    let restart = (u64::try_from(moved_at - 1_800_000_000).unwrap() + 6) * 1000;
    assert!(
        restart > stopped && restart >= began + 4_950,
        "{restart} {began}"
    );
    sim.down_until[0] = Some(restart);
    let mut vm1_last = None;
    let mut new_first = None;
    let to = if how == "move" { 4 } else { 1 };
    let mut attach = None;
    while sim.now < cut_at + stop_lease + 4_000 {
        let now = sim.now + 1;
        if attach
            .as_ref()
            .is_some_and(|a: &tokio::task::JoinHandle<_>| !a.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sim.step(now, false).await;
        if now == restart {
            // The new holder's agent tries the restarted coordinator at once.
            sim.agents[to].next = 0;
            if sim.agents[to].life != Life::Online {
                sim.agents[to].life = Life::Offline(now);
            }
            if how != "move" {
                let service = sim.service();
                attach = Some(tokio::spawn(async move {
                    service.move_workload(NETWORK, "w0", Some("vm-2")).await
                }));
            }
        }
        if first_answer(&sim, "w0", 0).is_some() {
            vm1_last = Some(now);
        }
        if new_first.is_none() {
            new_first = first_answer(&sim, "w0", to);
        }
    }
    if let Some(a) = attach {
        a.await.unwrap().unwrap();
    }
    eprintln!(
        "fencing ({how} during an orderly stop): stop began at {began} ms, vm-1 cut and w0 \
         changed at {cut_at} ms (moved_at {moved_at}), stopped at {stopped} ms, restarted at \
         {restart} ms, new holder vm-{}",
        to + 1
    );
    let vm1_last = vm1_last.expect("vm-1 answered on its stop lease");
    assert!(
        vm1_last > restart,
        "vm-1's stop lease did not outlast the restart"
    );
    let new_first = new_first.expect("the new holder answered");
    let scene = format!("{how} during an orderly stop");
    assert_w0_answered_in_turn(&sim, &scene, vm1_last - cut_at, new_first - cut_at);
}

/// See [`changed_during_an_orderly_stop`]: a detach, attached by the next run.
#[tokio::test(flavor = "current_thread")]
async fn a_workload_detached_during_an_orderly_stop_is_not_attached_over_its_cut_off_holder() {
    changed_during_an_orderly_stop("detach").await;
}

/// See [`changed_during_an_orderly_stop`]: a move to a node that is offline, which comes back to
/// the next run.
#[tokio::test(flavor = "current_thread")]
async fn a_workload_moved_during_an_orderly_stop_is_not_answered_over_its_cut_off_holder() {
    changed_during_an_orderly_stop("move").await;
}

/// See [`changed_during_an_orderly_stop`]: a deletion and a creation at its address, attached
/// by the next run.
#[tokio::test(flavor = "current_thread")]
async fn a_workload_recreated_during_an_orderly_stop_is_not_attached_over_its_cut_off_holder() {
    changed_during_an_orderly_stop("recreate").await;
}

/// vm-1 holds w0 on a lone coordinator whose lease is 3 s, and is cut off just after a renewal;
/// the coordinator crashes and starts again at once with a lease of 1.5 s (its configuration
/// changed meanwhile), and at once w0 is moved to vm-2 (so soon after the start that vm-1 does
/// not count as quiet). vm-1 answers on its 3 s lease: vm-2 must not answer before it ends.
#[tokio::test(flavor = "current_thread")]
async fn a_lease_shortened_across_a_crash_still_waits_for_the_longer_lease() {
    let dir = TempDir::new("fencing-lease-shortened");
    let mut sim = Sim::with_lease(&dir, 15, None, 1, Duration::from_secs(3)).await;
    assert!(calm_until::<()>(&mut sim, 10_000, "w0", 0, 0, None)
        .await
        .is_some());
    // Just after a renewal of vm-1's 3 s lease.
    while !sim.agents[0]
        .session
        .holdings()
        .lease_valid(sim.clock.at(sim.now + 2_900))
    {
        let now = sim.now + 1;
        sim.step(now, false).await;
    }
    let cut_at = sim.now;
    sim.agents[0].cut_until = Some(cut_at + 60_000);
    sim.agents[0].idle_at = Some(cut_at + IDLE_MS);
    sim.timing = lone_timing(WorkloadTiming::default().lease);
    sim.crash_coordinator(0).await;
    let service = sim.service();
    let (vm1_last, vm2_first) = attach_under_a_cut_off_holder(&mut sim, service, cut_at, 1).await;
    assert_w0_answered_in_turn(
        &sim,
        "lease 3 s, then 1.5 s after a crash",
        vm1_last,
        vm2_first,
    );
}

/// Steps the simulation to `until` ms, while `pending` runs (a real millisecond per simulated
/// one), watching w0: (vm-1's last answer, agent `to`'s first), in ms after `cut_at`.
async fn watch_w0<T>(
    sim: &mut Sim,
    cut_at: u64,
    until: u64,
    to: usize,
    pending: Option<&tokio::task::JoinHandle<T>>,
    (mut old_last, mut new_first): (Option<u64>, Option<u64>),
) -> (Option<u64>, Option<u64>) {
    while sim.now < until {
        let now = sim.now + 1;
        if pending.is_some_and(|p| !p.is_finished()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sim.step(now, false).await;
        if first_answer(sim, "w0", 0).is_some() {
            old_last = Some(now - cut_at);
        }
        if new_first.is_none() {
            new_first = first_answer(sim, "w0", to).map(|t| t - cut_at);
        }
    }
    (old_last, new_first)
}

/// An operator deletes vm-1 (`how` "delete") or revokes it (anything else) through
/// `service`, on a task of its own (it fails if the change does).
fn remove_vm1(service: Arc<Service>, how: &str) -> tokio::task::JoinHandle<()> {
    let delete = how == "delete";
    tokio::spawn(async move {
        if delete {
            service.delete_node("vm-1", Some(NETWORK)).await.unwrap();
        } else {
            service.revoke_node("vm-1", Some(NETWORK)).await.unwrap();
        }
    })
}

/// vm-1 holds w0 and is cut off (it keeps its lease, and never learns that it was removed:
/// it stays cut off); at once an operator revokes it (`how` "revoke") or deletes it
/// ("delete"): w0 goes to its standby vm-2, online. With "revoke-crash-after" the lone
/// coordinator crashes right after the release; with "revoke-crash-before" once the
/// revocation is in the store but before the release committed (the next run fails w0 over to
/// vm-2). vm-2 must not answer while vm-1 still does.
async fn removed_while_cut_off(how: &str) {
    let dir = TempDir::new(&format!("fencing-removed-{how}"));
    let (mut sim, cut_at) = vm1_cut_off_holding_w0(&dir, 16).await;
    let removed = remove_vm1(sim.service(), how);
    let vm1 = sim.agents[0].id;
    let mut seen = (None, None);
    if how == "revoke-crash-before" {
        loop {
            let until = sim.now + 1;
            seen = watch_w0(&mut sim, cut_at, until, 1, Some(&removed), seen).await;
            let n = sim.store.node(vm1).await.unwrap().unwrap();
            if n.revoked {
                break;
            }
            assert!(!removed.is_finished(), "revoked before a step");
        }
        let w = sim.store.workload(NETWORK, "w0").await.unwrap().unwrap();
        assert_eq!(w.holder, Some(vm1), "released already: {w:?}");
        removed.abort();
        sim.crash_coordinator(0).await;
    } else {
        while !removed.is_finished() {
            let until = sim.now + 1;
            seen = watch_w0(&mut sim, cut_at, until, 1, Some(&removed), seen).await;
            assert!(sim.now < cut_at + 10_000, "the removal did not end");
        }
        removed.await.unwrap();
        let w = sim.store.workload(NETWORK, "w0").await.unwrap().unwrap();
        assert_eq!(w.holder, Some(sim.agents[1].id), "{w:?}");
        if how == "revoke-crash-after" {
            sim.crash_coordinator(0).await;
        }
    }
    let (old_last, new_first) =
        watch_w0::<()>(&mut sim, cut_at, cut_at + 8_000, 1, None, seen).await;
    let w = sim.store.workload(NETWORK, "w0").await.unwrap().unwrap();
    assert_eq!(w.holder, Some(sim.agents[1].id), "{w:?}");
    assert_w0_answered_in_turn(
        &sim,
        &format!("vm-1 cut off, then {how}"),
        old_last.expect("vm-1 answered on its lease"),
        new_first.expect("vm-2 answered"),
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_revoked_cut_off_holder_is_not_answered_over_by_its_standby() {
    removed_while_cut_off("revoke").await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_deleted_cut_off_holder_is_not_answered_over_by_its_standby() {
    removed_while_cut_off("delete").await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_revoked_cut_off_holder_released_just_before_a_crash_is_not_answered_over() {
    removed_while_cut_off("revoke-crash-after").await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_revoked_cut_off_holder_not_yet_released_at_a_crash_is_not_answered_over() {
    removed_while_cut_off("revoke-crash-before").await;
}

/// vm-1 holds w0 and is cut off; its standbys vm-2 and vm-3 are down, so deleting vm-1 leaves
/// w0 held by the deleted id. A node joins again under the name vm-1 (a new id, a new key)
/// and the operator moves w0 to "vm-1", now the new node. With `crash`, the lone coordinator
/// crashes between the deletion and the join. The new vm-1 must not answer while the old one
/// (cut off, unaware) still does.
async fn rejoined_under_the_name_of_a_deleted_cut_off_holder(crash: bool) {
    let dir = TempDir::new(&format!("fencing-rejoin-{crash}"));
    let mut sim = Sim::new_calm(&dir, 17, None, 1, 10_000).await;
    for i in [1, 2] {
        let a = &mut sim.agents[i];
        a.life = Life::Dead(u64::MAX);
        a.up.cut();
        a.down.cut();
        if let Some(c) = a.coord.take() {
            let id = a.id;
            sim.services[0].session_closed(NETWORK, id, c.serial).await;
        }
    }
    let cut_at = sim.now;
    sim.agents[0].cut_until = Some(cut_at + 60_000);
    sim.agents[0].idle_at = Some(cut_at + IDLE_MS);
    let service = sim.service();
    service.delete_node("vm-1", Some(NETWORK)).await.unwrap();
    let w = sim.store.workload(NETWORK, "w0").await.unwrap().unwrap();
    assert_eq!(w.holder, Some(sim.agents[0].id), "{w:?}");
    if crash {
        sim.crash_coordinator(0).await;
    }
    let service = sim.service();
    let joined = join_agent(&service, &sim.clock, 7, "vm-1", sim.now).await;
    assert_ne!(joined.id, sim.agents[0].id);
    sim.agents.push(joined);
    let to = sim.agents.len() - 1;
    let until = sim.now + 50;
    let seen = watch_w0::<()>(&mut sim, cut_at, until, to, None, (None, None)).await;
    let moved =
        tokio::spawn(async move { service.move_workload(NETWORK, "w0", Some("vm-1")).await });
    let (old_last, new_first) =
        watch_w0(&mut sim, cut_at, cut_at + 6_000, to, Some(&moved), seen).await;
    let o = moved.await.unwrap().unwrap();
    assert_eq!(o.workload.holder, Some(sim.agents[to].id));
    assert_w0_answered_in_turn(
        &sim,
        &format!("vm-1 cut off, deleted, joined again (crash {crash}), moved to"),
        old_last.expect("the old vm-1 answered on its lease"),
        new_first.expect("the new vm-1 answered"),
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_joined_under_the_name_of_a_deleted_cut_off_holder_does_not_answer_over_it() {
    rejoined_under_the_name_of_a_deleted_cut_off_holder(false).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_joined_under_a_deleted_cut_off_holders_name_after_a_crash_does_not_answer_over_it()
{
    rejoined_under_the_name_of_a_deleted_cut_off_holder(true).await;
}

/// When a coordinator last renewed `node`'s lease in the shared database (simulated ms).
async fn heard_ms(pool: &sqlx::AnyPool, node: NodeId) -> Option<i64> {
    use sqlx::Row;
    sqlx::query("SELECT heard_ms FROM leases WHERE node = $1")
        .bind(i64::try_from(node).unwrap())
        .fetch_optional(pool)
        .await
        .unwrap()
        .map(|r| r.try_get::<i64, _>("heard_ms").unwrap())
}

/// Three coordinators sharing PostgreSQL: vm-1 holds w0 with its session on B (coordinator
/// 1); its standby vm-2 has its session on `vm2_at` (0: A, 2: C). Right after a heartbeat of
/// vm-1 renewed its lease through B in the database (and its answer reached vm-1), vm-1 is
/// cut off (it keeps that lease, and never learns of anything) and an operator revokes
/// (`how` "revoke") or deletes ("delete") it through A: w0 goes to vm-2, which must not answer
/// while vm-1 still does, whichever coordinator confirms it.
async fn shared_removed_while_cut_off(how: &str, vm2_at: usize) {
    let Some((_dir, url, mut sim)) =
        three_sharing_calm(&format!("removed-{how}-{vm2_at}"), 23).await
    else {
        return;
    };
    assert_eq!((sim.agents[0].life, sim.agents[0].at), (Life::Online, 1));
    if sim.agents[1].at != vm2_at {
        sim.lose(1).await;
        sim.agents[1].next = vm2_at;
        sim.agents[1].life = Life::Offline(sim.now);
        // Long enough for every coordinator's presence to show vm-2's new session.
        let until = sim.now + 1_500;
        calm_until::<()>(&mut sim, until, "w0", 0, 0, None).await;
    }
    assert_eq!(
        (sim.agents[1].life, sim.agents[1].at),
        (Life::Online, vm2_at)
    );
    // vm-3, w0's other standby, is gone for good: w0 can only go to vm-2 (a coordinator's
    // view of where sessions are may lag, and it gives w0 to the first standby online).
    let a = &mut sim.agents[2];
    a.life = Life::Dead(u64::MAX);
    a.up.cut();
    a.down.cut();
    if let Some(c) = a.coord.take() {
        let (id, at) = (a.id, a.at);
        sim.services[at].session_closed(NETWORK, id, c.serial).await;
    }
    let vm1 = sim.agents[0].id;
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    // The next renewal of vm-1 through B, then its answer's way to vm-1.
    let before = heard_ms(&pool, vm1).await;
    let mut seen = (None, None);
    while heard_ms(&pool, vm1).await == before {
        let until = sim.now + 1;
        seen = watch_w0::<()>(&mut sim, 0, until, 1, None, seen).await;
        assert!(sim.now < 10_000, "vm-1 was not renewed");
    }
    let renewed = heard_ms(&pool, vm1).await.unwrap();
    let until = sim.now + MAX_LATENCY_MS;
    watch_w0::<()>(&mut sim, 0, until, 1, None, (None, None)).await;
    let cut_at = sim.now;
    sim.agents[0].cut_until = Some(cut_at + 60_000);
    sim.agents[0].idle_at = Some(cut_at + IDLE_MS);
    // Every coordinator knows where vm-2's session is (A releases w0 to the first standby
    // online anywhere: vm-2, not vm-3).
    for k in [0, 1, 2, 0] {
        sim.services[k].refresh_presence().await;
    }
    let removed = remove_vm1(sim.services[0].clone(), how);
    let mut seen = (None, None);
    while !removed.is_finished() {
        let until = sim.now + 1;
        seen = watch_w0(&mut sim, cut_at, until, 1, Some(&removed), seen).await;
        assert!(sim.now < cut_at + 10_000, "the removal did not end");
    }
    removed.await.unwrap();
    let released_at = sim.now - cut_at;
    let (old_last, new_first) =
        watch_w0::<()>(&mut sim, cut_at, cut_at + 8_000, 1, None, seen).await;
    let w = sim.store.workload(NETWORK, "w0").await.unwrap().unwrap();
    assert_eq!(w.holder, Some(sim.agents[1].id), "{w:?}");
    let scene = format!(
        "shared, vm-1 on B renewed at {renewed} ms, cut off at {cut_at} ms, {how} via A \
         (done +{released_at} ms), vm-2 on coordinator {vm2_at}"
    );
    assert_w0_answered_in_turn(
        &sim,
        &scene,
        old_last.expect("vm-1 answered on its lease"),
        new_first.expect("vm-2 answered"),
    );
}

/// See [`shared_removed_while_cut_off`]: revoked or deleted, vm-2 on A or on C.
#[tokio::test(flavor = "current_thread")]
async fn shared_a_revoked_or_deleted_cut_off_holder_is_not_answered_over_by_its_standby() {
    for how in ["revoke", "delete"] {
        for vm2_at in [0, 2] {
            shared_removed_while_cut_off(how, vm2_at).await;
        }
    }
}
