//! A deterministic simulation of the coordinator's logic with a few hundred agents in one
//! process: no sockets, no wall clock, no threads of its own. The real [`Service`] (handlers,
//! a SQLite store in a scratch directory, the hub) is driven by a seeded PRNG through joins,
//! leaves, revocations, agent crashes and reconnections, NAT rebinding, coordinator restarts,
//! and lost, duplicated and reordered messages, while the test moves the clock.
//!
//! Each agent runs the real agent's session state machine, [`AgentSession`] from
//! `meshlink_proto`, driven as its I/O shell drives it (`agent/src/control/mod.rs`,
//! `MeshControl::serve`): `connected` with the welcome's full map and the node's endpoints,
//! every frame read into `handle_message`, `set_endpoints` when the endpoints change,
//! `handle_timeout` when `poll_timeout` says, `disconnected` when the session ends; what
//! `poll_transmit` yields is carried to the coordinator (`Endpoints` to
//! `Service::report_endpoints`, `FullMapRequest` answered with `Hub::full_map_for` as `dispatch.rs`
//! answers it), and the agent's map is `AgentSession::map`. Its time is a fixed `Instant` plus
//! the simulated seconds. `Revoked` ends the session and the agent forgets its credentials and
//! its map; a refused hello stops it (it keeps its cached map, as the real agent does). A crash
//! restarts the agent's process from its cached map and keeps its credentials, and the agent
//! comes back with `Auth::Node`; a lost connection keeps the process.
//!
//! Between the hub and an agent sits a model of one session ([`Link`]): the hub's queue, the
//! frames the server task has written but the agent has not read (`wire`), and the full-map
//! requests the server has not answered yet. Server and agent advance in small random steps,
//! so they interleave as they would over a real stream. A session the agent dropped but the
//! server has not noticed yet is a zombie: it is detached (with its own serial) later.
//!
//! An oracle follows every action (which nodes exist and are revoked, the address each must
//! hold, which tokens can still be used, which version each network must be at) and every
//! outcome is checked against it at once; invariants are checked after every step. The agents
//! are checked too: a gap only where a frame was lost or reordered, one full-map request per
//! gap, no delta applied while it waits for that map. Then the faults stop and the system
//! heals: every session is drained, dropped agents reconnect, and one more change per network
//! shows a gap to any agent that lost the last frame of its session (it cannot know
//! otherwise). Every live agent must then hold exactly the hub's map.
//!
//! A failure names its seed; each seed is its own test (`cargo test -p meshlink-coordinator
//! --test it simulation::seed_3` replays one run).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng};

use ipnet::Ipv4Net;
use meshlink_coordinator::handlers::networks::CreateNetwork;
use meshlink_coordinator::handlers::nodes::netmap;
use meshlink_coordinator::handlers::tokens::CreateToken;
use meshlink_coordinator::handlers::ApiError;
use meshlink_coordinator::hub::{CloseReason, Frame, FullMapAnswer, Outbound};
use meshlink_coordinator::service::{Clock, Service, Session};
use meshlink_coordinator::store::{SqlStore, Store, TokenId, UnixTime};
use meshlink_proto::agent_session::{AgentSession, Event, SessionError};
use meshlink_proto::control::{
    Auth, ClientMessage, Hello, ServerMessage, Welcome, PROTOCOL_VERSION,
};
use meshlink_proto::{DeltaError, Netmap, NodeId, PublicKey};
use tokio::sync::mpsc::{self, error::TryRecvError};

use crate::common::{decode_frame, TempDir};

/// The networks: a large one, a small one, and one of 30 addresses that fills up.
const NETWORKS: [(&str, &str); 3] = [
    ("prod", "100.64.0.0/16"),
    ("lab", "10.20.0.0/24"),
    ("edge", "192.168.7.0/27"),
];
/// The simulated clock's start, in Unix seconds.
const EPOCH: UnixTime = 1_700_000_000;
/// Per mille of frames the agent never reads (lost). A full map is never lost: the only ones on
/// the wire answer the agent's request, and the real agent waits for that answer for the rest
/// of the session (the stream is reliable; it does not ask again).
const LOSS: u64 = 50;
/// Per mille of maps and deltas the agent handles twice.
const DUPLICATE: u64 = 10;
/// Per mille of deltas read after the delta behind them.
const REORDER: u64 = 10;
/// Sessions the network advances per step.
const VISITS: usize = 6;
/// Frames the server writes, and the agent reads, per visit.
const BURST: usize = 24;

/// One run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seed: u64,
    /// Agents in the pool, each with its own key.
    agents: usize,
    /// Members to enroll before the random steps.
    initial: usize,
    /// Random steps.
    steps: usize,
    /// Session queue depth: small, so that an agent that reads slowly is dropped as lagging.
    queue: usize,
}

fn plan(seed: u64) -> Plan {
    Plan {
        seed,
        agents: 240,
        initial: 200,
        steps: 2_000,
        queue: 32,
    }
}

/// The run's randomness: rand's seeded `StdRng`, so that a seed replays exactly.
struct Rng(StdRng);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(StdRng::seed_from_u64(seed))
    }

    /// Uniform in `0..n`; `n` is not 0.
    fn below(&mut self, n: usize) -> usize {
        self.0.gen_range(0..n)
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.0.gen_range(0..1000) < per_mille
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len())])
    }
}

/// Whole simulated seconds since [`EPOCH`], and the same as monotonic time from `t0`.
struct SimClock {
    secs: AtomicI64,
    t0: Instant,
}

impl Clock for SimClock {
    fn now(&self) -> UnixTime {
        self.secs.load(Ordering::Relaxed)
    }

    fn instant(&self) -> Instant {
        let secs = u64::try_from(self.now() - EPOCH).expect("the clock only moves forward");
        self.t0 + Duration::from_secs(secs)
    }

    /// Nothing here waits on the clock (no workloads move): a sleep that has not ended yet
    /// is a test failure, not a hang.
    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        assert!(
            at <= self.instant(),
            "the simulation does not wait on the service's clock"
        );
        Box::pin(std::future::ready(()))
    }
}

/// What the oracle knows of a node that exists (revoked or not).
#[derive(Debug, Clone)]
struct NodeFact {
    network: usize,
    agent: usize,
    name: String,
    address: Ipv4Addr,
    secret: String,
    revoked: bool,
    /// What the coordinator recorded from the agent: reported endpoints and source address.
    endpoints: Vec<SocketAddr>,
    remote: IpAddr,
}

impl NodeFact {
    /// The endpoints its peers must see: the reported ones, then the observed one.
    fn peer_endpoints(&self) -> Vec<SocketAddr> {
        let mut out = self.endpoints.clone();
        let observed = SocketAddr::new(self.remote, self.endpoints[0].port());
        if !out.contains(&observed) {
            out.push(observed);
        }
        out
    }
}

#[derive(Debug, Clone)]
struct TokenFact {
    id: TokenId,
    secret: String,
    network: usize,
    expires_at: Option<UnixTime>,
    max_uses: Option<u64>,
    used: u64,
    revoked: bool,
}

impl TokenFact {
    /// Why a join with it must be refused now, in the handler's order.
    fn refusal(&self, now: UnixTime) -> Option<&'static str> {
        if self.revoked {
            Some("join.refused.token-revoked")
        } else if self.expires_at.is_some_and(|at| at <= now) {
            Some("join.refused.token-expired")
        } else if self.max_uses.is_some_and(|max| self.used >= max) {
            Some("join.refused.token-used-up")
        } else {
            None
        }
    }
}

#[derive(Debug, Clone)]
struct Creds {
    node: NodeId,
    secret: String,
    network: usize,
}

/// One session, both ends: the hub's queue as the server task reads it, what the server wrote
/// and the agent has not read, and the agent's unanswered full-map requests.
struct Link {
    agent: usize,
    network: String,
    node: NodeId,
    serial: u64,
    rx: mpsc::Receiver<Outbound>,
    wire: VecDeque<Frame>,
    /// Full-map requests the server has not answered yet.
    requests: u32,
    /// The agent asked for a full map and has not read one since.
    awaiting_full_map: bool,
    /// The server task ended: nothing more is written after `wire`.
    server_done: bool,
    /// A frame of this session was lost or reordered since the agent last got a full map, so
    /// a gap is expected; a gap on an untainted session would be the coordinator's fault.
    tainted: bool,
}

impl Link {
    fn new(agent: usize, session: Session) -> Self {
        Link {
            agent,
            network: session.network,
            node: session.node,
            serial: session.attached.serial,
            rx: session.attached.rx,
            wire: VecDeque::new(),
            requests: 0,
            awaiting_full_map: false,
            server_done: false,
            tainted: false,
        }
    }
}

/// One simulated agent: its process's state and the test's view of it.
struct Agent {
    key: PublicKey,
    creds: Option<Creds>,
    link: Option<Link>,
    /// When an agent with credentials and no session tries again.
    reconnect_at: Option<UnixTime>,
    /// The real agent's session state, from its join on; its map is the agent's map (and
    /// cache). `None` before the first join and after a revocation (the agent forgot it all).
    session: Option<AgentSession>,
    /// The highest version held during the current membership.
    high: u64,
    endpoints: Vec<SocketAddr>,
    remote: IpAddr,
    moves: u32,
    rebinds: u32,
}

impl Agent {
    fn session(&mut self) -> &mut AgentSession {
        self.session
            .as_mut()
            .expect("an agent with credentials has a session state")
    }

    /// The connection ended (the process lives on).
    fn disconnected(&mut self) {
        self.link = None;
        if let Some(s) = &mut self.session {
            s.disconnected();
        }
    }

    /// Refused: the agent stops holding anything and exits; its cached map stays. An operator
    /// would enroll it again.
    fn refused(&mut self) {
        self.session().stop();
        self.creds = None;
        self.high = 0;
        self.reconnect_at = None;
    }

    /// Revoked: the agent forgets its credentials and its map, and exits.
    fn revoked(&mut self) {
        self.session = None;
        self.creds = None;
        self.high = 0;
        self.reconnect_at = None;
    }
}

/// A decoded server frame. The hub shares one encoding among all sessions, so it is decoded
/// once per frame.
type Msg = Rc<ServerMessage>;

fn decode(cache: &mut HashMap<usize, (Frame, Msg)>, frame: &Frame) -> Msg {
    // The cache holds the frame, so its address cannot be reused while it is a key.
    let key = frame.as_ptr() as usize;
    if let Some((_, msg)) = cache.get(&key) {
        return msg.clone();
    }
    if cache.len() >= 4096 {
        cache.clear();
    }
    let msg = Rc::new(decode_frame(frame));
    cache.insert(key, (frame.clone(), msg.clone()));
    msg
}

/// The first map of a session, read after the welcome.
fn first_map(cache: &mut HashMap<usize, (Frame, Msg)>, frame: &Frame) -> Netmap {
    match &*decode(cache, frame) {
        ServerMessage::FullMap(m) => m.clone(),
        _ => panic!("the first map is not a full map"),
    }
}

fn welcome_of(frame: &Frame) -> Welcome {
    match decode_frame(frame) {
        ServerMessage::Welcome(w) => w,
        other => panic!("expected a welcome, got {other:?}"),
    }
}

fn agent_key(a: usize) -> PublicKey {
    let mut k = [0x5e; 32];
    k[1] = (a >> 8) as u8;
    k[2] = a as u8;
    PublicKey(k)
}

/// An agent's local endpoints after `moves` changes.
fn endpoints_of(a: usize, moves: u32) -> Vec<SocketAddr> {
    let port = 51_820 + (moves % 4_000) as u16;
    let (hi, lo) = ((a >> 8) as u8, a as u8);
    let public = SocketAddr::new(Ipv4Addr::new(198, 18, hi, lo).into(), port);
    if moves % 3 == 2 {
        let private = SocketAddr::new(Ipv4Addr::new(172, 31, hi, lo).into(), port);
        vec![public, private]
    } else {
        vec![public]
    }
}

/// The source address the coordinator sees for an agent after `rebinds` NAT rebindings.
fn remote_of(a: usize, rebinds: u32) -> IpAddr {
    Ipv4Addr::new(203, (rebinds % 250) as u8, (a >> 8) as u8, a as u8).into()
}

fn bump(counts: &mut BTreeMap<&'static str, u64>, what: &'static str) {
    *counts.entry(what).or_default() += 1;
}

#[derive(Debug)]
enum Expect {
    Ok,
    Unauthorized(&'static str),
    Refused(&'static str),
    Conflict(&'static str),
    NotFound(&'static str),
}

impl Expect {
    fn matches(&self, e: &ApiError) -> bool {
        matches!(
            (self, e),
            (Expect::Unauthorized(_), ApiError::Unauthorized(_))
                | (Expect::Refused(_), ApiError::Refused(_))
                | (Expect::Conflict(_), ApiError::Conflict(_))
                | (Expect::NotFound(_), ApiError::NotFound(_))
        )
    }

    fn label(&self) -> &'static str {
        match self {
            Expect::Ok => "ok",
            Expect::Unauthorized(l)
            | Expect::Refused(l)
            | Expect::Conflict(l)
            | Expect::NotFound(l) => l,
        }
    }
}

/// What a run leaves behind, to compare runs of one seed.
#[derive(Debug, PartialEq)]
struct Report {
    counts: BTreeMap<&'static str, u64>,
    maps: Vec<Netmap>,
}

struct Sim {
    plan: Plan,
    rng: Rng,
    clock: Arc<SimClock>,
    dir: TempDir,
    store: Arc<SqlStore>,
    svc: Service,
    cidrs: Vec<Ipv4Net>,
    /// The version each network must be at.
    versions: Vec<u64>,
    /// The version at which each hub map was last compared with the oracle.
    checked: Vec<u64>,
    tokens: Vec<TokenFact>,
    nodes: BTreeMap<NodeId, NodeFact>,
    /// Deleted nodes: their secret and agent, to check they stay out.
    deleted: BTreeMap<NodeId, (String, usize)>,
    last_id: NodeId,
    agents: Vec<Agent>,
    zombies: Vec<Link>,
    decoded: HashMap<usize, (Frame, Msg)>,
    faults: bool,
    counts: BTreeMap<&'static str, u64>,
    step: usize,
}

impl Sim {
    async fn new(plan: Plan) -> Sim {
        let dir = TempDir::new(&format!("sim-{}", plan.seed));
        let clock = Arc::new(SimClock {
            secs: AtomicI64::new(EPOCH),
            t0: Instant::now(),
        });
        let store = Arc::new(
            SqlStore::open_sqlite(&dir.path().join("coordinator.db"))
                .await
                .unwrap(),
        );
        let svc = Service::load(store.clone(), clock.clone(), plan.queue)
            .await
            .unwrap();
        unpaced(&svc);
        let mut cidrs = Vec::new();
        let mut versions = Vec::new();
        for (name, cidr) in NETWORKS {
            let net = svc
                .create_network(CreateNetwork {
                    name: name.into(),
                    cidr: cidr.into(),
                    cidr6: None,
                })
                .await
                .unwrap();
            cidrs.push(net.cidr);
            versions.push(net.version);
        }
        let agents = (0..plan.agents)
            .map(|a| Agent {
                key: agent_key(a),
                creds: None,
                link: None,
                reconnect_at: None,
                session: None,
                high: 0,
                endpoints: endpoints_of(a, 0),
                remote: remote_of(a, 0),
                moves: 0,
                rebinds: 0,
            })
            .collect();
        let mut sim = Sim {
            plan,
            rng: Rng::new(plan.seed),
            clock,
            dir,
            store,
            svc,
            checked: versions.clone(),
            cidrs,
            versions,
            tokens: Vec::new(),
            nodes: BTreeMap::new(),
            deleted: BTreeMap::new(),
            last_id: 0,
            agents,
            zombies: Vec::new(),
            decoded: HashMap::new(),
            faults: true,
            counts: BTreeMap::new(),
            step: 0,
        };
        // prod: open, short-lived, few uses; lab: expires mid-run; edge: open but small.
        for (net, expires, uses) in [
            (0, None, None),
            (0, Some(900), None),
            (0, None, Some(25)),
            (1, Some(2_400), None),
            (2, None, None),
        ] {
            sim.create_token(net, expires, uses).await;
        }
        sim
    }

    fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// The agents' `now`: the clock's start plus the simulated seconds, so that a run does
    /// not depend on the wall clock.
    fn instant(&self) -> Instant {
        self.clock.instant()
    }

    fn advance(&self, secs: UnixTime) {
        self.clock.secs.fetch_add(secs, Ordering::Relaxed);
    }

    fn count(&mut self, what: &'static str) {
        bump(&mut self.counts, what);
    }

    fn linked(&self) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&a| self.agents[a].link.as_ref().is_some_and(|l| !l.server_done))
            .collect()
    }

    /// The address the next join to `net` must get: the lowest free host address.
    fn lowest_free(&self, net: usize) -> Option<Ipv4Addr> {
        let used: BTreeSet<Ipv4Addr> = self
            .nodes
            .values()
            .filter(|f| f.network == net)
            .map(|f| f.address)
            .collect();
        let cidr = self.cidrs[net];
        let (first, last) = (
            u32::from(cidr.network()) + 1,
            u32::from(cidr.broadcast()) - 1,
        );
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|a| !used.contains(a))
    }

    // ---------------------------------------------------------------- operator actions

    async fn create_token(&mut self, net: usize, expires: Option<u64>, uses: Option<u64>) {
        let now = self.now();
        let (record, secret) = self
            .svc
            .create_token(CreateToken {
                network: NETWORKS[net].0.into(),
                tags: vec![],
                expires_in_secs: expires,
                uses,
            })
            .await
            .unwrap();
        assert_eq!(record.expires_at, expires.map(|s| now + s as UnixTime));
        self.tokens.push(TokenFact {
            id: record.id,
            secret,
            network: net,
            expires_at: record.expires_at,
            max_uses: uses,
            used: 0,
            revoked: false,
        });
    }

    async fn token_admin(&mut self) {
        if self.rng.chance(600) {
            let net = self.rng.below(NETWORKS.len());
            let expires = self
                .rng
                .chance(500)
                .then(|| 300 + self.rng.below(2_400) as u64);
            let uses = self.rng.chance(500).then(|| 1 + self.rng.below(20) as u64);
            self.create_token(net, expires, uses).await;
            self.count("op.token-created");
        } else {
            // The first token stays usable, so that joins keep succeeding.
            let t = 1 + self.rng.below(self.tokens.len() - 1);
            self.svc.revoke_token(self.tokens[t].id).await.unwrap();
            self.tokens[t].revoked = true;
            self.count("op.token-revoked");
        }
    }

    /// Revokes (or deletes) a random node, by id or by name.
    async fn remove_node(&mut self, delete: bool) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let Some(id) = self.rng.pick(&ids) else {
            return;
        };
        let fact = self.nodes[&id].clone();
        let net = NETWORKS[fact.network].0;
        let (reference, network) = match self.rng.below(3) {
            0 => (id.to_string(), None),
            1 => (id.to_string(), Some(net)),
            _ => (fact.name.clone(), Some(net)),
        };
        let record = if delete {
            self.svc.delete_node(&reference, network).await
        } else {
            self.svc.revoke_node(&reference, network).await
        }
        .unwrap_or_else(|e| {
            panic!(
                "seed {} step {}: removing node {id} ({reference}): {e}",
                self.plan.seed, self.step
            )
        });
        assert_eq!(record.id, id);
        if !fact.revoked {
            self.versions[fact.network] += 1;
        }
        self.count(match (delete, fact.revoked) {
            (false, false) => "op.revoke",
            (false, true) => "op.revoke-again",
            (true, false) => "op.delete",
            (true, true) => "op.delete-revoked",
        });
        if delete {
            self.nodes.remove(&id);
            self.deleted.insert(id, (fact.secret, fact.agent));
        } else {
            assert!(record.revoked);
            self.nodes.get_mut(&id).unwrap().revoked = true;
        }
    }

    /// Requests that must fail and must disturb nobody.
    async fn mistake(&mut self) {
        match self.rng.below(3) {
            0 => {
                let e = self.svc.revoke_node("999999", None).await.unwrap_err();
                assert!(matches!(e, ApiError::NotFound(_)), "{e}");
            }
            1 => {
                let ids: Vec<NodeId> = self.deleted.keys().copied().collect();
                let Some(id) = self.rng.pick(&ids) else {
                    return;
                };
                let e = self
                    .svc
                    .delete_node(&id.to_string(), None)
                    .await
                    .unwrap_err();
                assert!(matches!(e, ApiError::NotFound(_)), "{e}");
            }
            _ => {
                // Someone with a node's id and key but not its secret.
                let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
                let Some(id) = self.rng.pick(&ids) else {
                    return;
                };
                let fact = &self.nodes[&id];
                let net = NETWORKS[fact.network].0;
                let online = self.svc.hub().is_online(net, id);
                let hello = self.node_hello(fact.agent, id, "not-the-secret");
                let e = self
                    .svc
                    .hello(&hello, remote_of(fact.agent, 999))
                    .await
                    .unwrap_err();
                assert!(matches!(e, ApiError::Unauthorized(_)), "{e}");
                assert_eq!(
                    self.svc.hub().is_online(net, id),
                    online,
                    "seed {} step {}: a refused hello changed node {id}'s session",
                    self.plan.seed,
                    self.step
                );
            }
        }
        self.count("op.refused-as-expected");
    }

    async fn restart_coordinator(&mut self) {
        let before: Vec<Netmap> = NETWORKS
            .iter()
            .map(|(n, _)| self.svc.hub().map(n).unwrap())
            .collect();
        // Every connection dies with the process; the old hub's queues go with it.
        let now = self.now();
        for agent in &mut self.agents {
            if agent.link.is_some() {
                agent.disconnected();
                agent.reconnect_at = Some(now + 1 + self.rng.below(10) as UnixTime);
            }
        }
        self.zombies.clear();
        self.store.close().await;
        self.store = Arc::new(
            SqlStore::open_sqlite(&self.dir.path().join("coordinator.db"))
                .await
                .unwrap(),
        );
        self.svc = Service::load(self.store.clone(), self.clock.clone(), self.plan.queue)
            .await
            .unwrap();
        unpaced(&self.svc);
        for (i, (n, _)) in NETWORKS.iter().enumerate() {
            assert_eq!(
                self.svc.hub().map(n).unwrap(),
                before[i],
                "seed {} step {}: network {n} reloads to another map",
                self.plan.seed,
                self.step
            );
        }
        self.count("coordinator.restart");
    }

    // ---------------------------------------------------------------- agent actions

    fn node_hello(&self, a: usize, node: NodeId, secret: &str) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            auth: Auth::Node {
                node_id: node,
                secret: secret.into(),
            },
            public_key: self.agents[a].key,
            key_rotation: false,
            policy_edits: false,
            compression: false,
            name: None,
            labels: BTreeMap::new(),
            endpoints: self.agents[a].endpoints.clone(),
            handover: false,
        }
    }

    /// An agent without credentials joins with a random token (sometimes a bogus one, or a
    /// name already taken).
    async fn join(&mut self, a: usize) {
        let now = self.now();
        let t = self.rng.below(self.tokens.len());
        let bogus = self.rng.chance(30);
        let net = self.tokens[t].network;
        let secret = if bogus {
            format!("bogus-{}", self.step)
        } else {
            self.tokens[t].secret.clone()
        };
        let roll = self.rng.below(100);
        let name = if roll < 5 {
            let taken: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(_, f)| f.network == net)
                .map(|(id, _)| *id)
                .collect();
            self.rng.pick(&taken).map(|id| self.nodes[&id].name.clone())
        } else if roll < 60 {
            Some(format!("vm-{a}-{}", self.step))
        } else {
            None
        };
        let key = self.agents[a].key;
        let address = self.lowest_free(net);
        let expect = if bogus {
            Expect::Unauthorized("join.refused.unknown-token")
        } else if let Some(why) = self.tokens[t].refusal(now) {
            Expect::Refused(why)
        } else if name.as_ref().is_some_and(|n| {
            self.nodes
                .values()
                .any(|f| f.network == net && f.name == *n)
        }) {
            Expect::Conflict("join.conflict.name")
        } else if self
            .nodes
            .values()
            .any(|f| f.network == net && self.agents[f.agent].key == key)
        {
            Expect::Conflict("join.conflict.key")
        } else if address.is_none() {
            Expect::Refused("join.refused.network-full")
        } else {
            Expect::Ok
        };
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            auth: Auth::JoinToken { secret },
            public_key: key,
            key_rotation: false,
            policy_edits: false,
            compression: false,
            name: name.clone(),
            labels: BTreeMap::new(),
            endpoints: self.agents[a].endpoints.clone(),
            handover: false,
        };
        let remote = self.agents[a].remote;
        let session = match (self.svc.hello(&hello, remote).await, &expect) {
            (Ok(session), Expect::Ok) => session,
            (Err(e), expect) if expect.matches(&e) => {
                self.count(expect.label());
                return;
            }
            (got, expect) => panic!(
                "seed {} step {}: agent {a} joining {} with token {t} (name {name:?}): expected {expect:?}, got {got:?}",
                self.plan.seed, self.step, NETWORKS[net].0
            ),
        };
        let welcome = welcome_of(&session.welcome);
        let id = welcome.node_id;
        let address = address.unwrap();
        assert!(session.joined && session.node == id);
        assert!(id > self.last_id, "node ids are never reused");
        self.last_id = id;
        assert_eq!(welcome.network, NETWORKS[net].0);
        assert_eq!(
            welcome.addresses[0].addr(),
            IpAddr::V4(address),
            "seed {} step {}: node {id} did not get the lowest free address",
            self.plan.seed,
            self.step
        );
        if let Some(n) = &name {
            assert_eq!(&welcome.name, n);
        }
        let secret = welcome
            .node_secret
            .clone()
            .expect("a join's welcome carries a secret");
        self.tokens[t].used += 1;
        self.versions[net] += 1;
        self.nodes.insert(
            id,
            NodeFact {
                network: net,
                agent: a,
                name: welcome.name.clone(),
                address,
                secret: secret.clone(),
                revoked: false,
                endpoints: self.agents[a].endpoints.clone(),
                remote,
            },
        );
        let full = first_map(&mut self.decoded, &session.attached.full_map);
        assert_eq!(full.version, self.versions[net]);
        assert!(
            full.peers.contains_key(&id),
            "a new node is in its first map"
        );
        let now = self.instant();
        let agent = &mut self.agents[a];
        agent.creds = Some(Creds {
            node: id,
            secret,
            network: net,
        });
        agent.high = full.version;
        agent.reconnect_at = None;
        agent.link = Some(Link::new(a, session));
        // A new agent process: its state starts from the map of the join.
        let mut state = AgentSession::new(id, full.clone(), now);
        state.welcomed(&welcome);
        state.connected(now, full, agent.endpoints.clone());
        agent.session = Some(state);
        self.count("join.ok");
        self.flush(a).await;
    }

    /// An agent with credentials and no session says hello again.
    async fn reconnect(&mut self, a: usize) {
        let creds = self.agents[a].creds.clone().expect("credentials");
        let net = NETWORKS[creds.network].0;
        let fact = self.nodes.get(&creds.node).cloned();
        let (endpoints, remote) = (self.agents[a].endpoints.clone(), self.agents[a].remote);
        let expect = match &fact {
            None => Expect::Unauthorized("reconnect.refused.deleted"),
            Some(f) if f.revoked => Expect::Refused("reconnect.refused.revoked"),
            Some(_) => Expect::Ok,
        };
        let replaced = self.svc.hub().is_online(net, creds.node);
        let hello = self.node_hello(a, creds.node, &creds.secret);
        let session = match (self.svc.hello(&hello, remote).await, &expect) {
            (Ok(session), Expect::Ok) => session,
            (Err(e), expect) if expect.matches(&e) => {
                // The real agent exits here; an operator would enroll it again.
                self.agents[a].refused();
                self.count(expect.label());
                return;
            }
            (got, expect) => panic!(
                "seed {} step {}: agent {a} reconnecting as node {}: expected {expect:?}, got {got:?}",
                self.plan.seed, self.step, creds.node
            ),
        };
        let fact = fact.unwrap();
        let welcome = welcome_of(&session.welcome);
        assert_eq!(welcome.node_id, creds.node);
        assert!(welcome.node_secret.is_none() && !session.joined);
        assert_eq!(
            welcome.addresses[0].addr(),
            IpAddr::V4(fact.address),
            "a node keeps its address"
        );
        if fact.endpoints != endpoints || fact.remote != remote {
            self.versions[creds.network] += 1;
            let f = self.nodes.get_mut(&creds.node).unwrap();
            f.endpoints = endpoints;
            f.remote = remote;
            self.count("reconnect.moved");
        }
        let full = first_map(&mut self.decoded, &session.attached.full_map);
        assert_eq!(full.version, self.versions[creds.network]);
        let (seed, step) = (self.plan.seed, self.step);
        let now = self.instant();
        let agent = &mut self.agents[a];
        assert!(
            full.version >= agent.high,
            "seed {seed} step {step}: agent {a} reconnected to map version {} after holding {}",
            full.version,
            agent.high
        );
        agent.high = full.version;
        agent.reconnect_at = None;
        agent.link = Some(Link::new(a, session));
        let endpoints = agent.endpoints.clone();
        agent.session().welcomed(&welcome);
        agent.session().connected(now, full, endpoints);
        self.count(if replaced {
            "reconnect.ok-replacing"
        } else {
            "reconnect.ok"
        });
        self.flush(a).await;
    }

    /// Reconnects up to `max` agents whose backoff is over.
    async fn reconnect_due(&mut self, max: usize) {
        let now = self.now();
        let n = self.agents.len();
        let start = self.rng.below(n);
        let mut done = 0;
        for k in 0..n {
            let a = (start + k) % n;
            let agent = &self.agents[a];
            if agent.creds.is_some()
                && agent.link.is_none()
                && agent.reconnect_at.is_some_and(|at| at <= now)
            {
                self.reconnect(a).await;
                done += 1;
                if done == max {
                    break;
                }
            }
        }
    }

    /// An agent's local endpoints change (or are found unchanged): the agent's session state
    /// decides whether to report them.
    async fn change_endpoints(&mut self, a: usize, moves: bool) {
        let agent = &mut self.agents[a];
        if agent.link.as_ref().is_none_or(|l| l.server_done) {
            return;
        }
        if moves {
            agent.moves += 1;
            agent.endpoints = endpoints_of(a, agent.moves);
        }
        let endpoints = agent.endpoints.clone();
        agent.session().set_endpoints(endpoints);
        self.flush(a).await;
    }

    /// The server's side of an `Endpoints` message on `a`'s session: `report_endpoints` from
    /// the session's source address; a refusal ends the session.
    async fn deliver_endpoints(&mut self, a: usize, endpoints: Vec<SocketAddr>) {
        let agent = &self.agents[a];
        let Some(link) = agent.link.as_ref().filter(|l| !l.server_done) else {
            // Nobody reads the stream any more.
            return;
        };
        let (node, remote) = (link.node, agent.remote);
        let network = agent
            .creds
            .as_ref()
            .expect("a linked agent has credentials")
            .network;
        let fact = self.nodes.get(&node);
        let expect = match fact {
            None => Expect::NotFound("endpoints.refused-deleted"),
            Some(f) if f.revoked => Expect::Refused("endpoints.refused-revoked"),
            Some(_) => Expect::Ok,
        };
        let moved = fact.is_some_and(|f| f.endpoints != endpoints || f.remote != remote);
        match (
            self.svc.report_endpoints(node, remote, &endpoints).await,
            &expect,
        ) {
            (Ok(()), Expect::Ok) if moved => {
                self.versions[network] += 1;
                self.nodes.get_mut(&node).unwrap().endpoints = endpoints;
                self.count("endpoints.changed");
            }
            (Ok(()), Expect::Ok) => self.count("endpoints.same"),
            (Err(e), expect) if expect.matches(&e) => {
                // The server ends the session; what was not written yet is lost.
                let link = self.agents[a].link.as_mut().unwrap();
                link.server_done = true;
                let (net, node, serial) = (link.network.clone(), link.node, link.serial);
                self.svc.session_closed(&net, node, serial).await;
                self.count(expect.label());
            }
            (got, expect) => panic!(
                "seed {} step {}: node {node} reporting endpoints: expected {expect:?}, got {got:?}",
                self.plan.seed, self.step
            ),
        }
    }

    /// The agent loses its connection (`restart`: its process dies, and comes back from its
    /// cached map); the server notices later.
    fn crash(&mut self, a: usize, back_in: UnixTime, restart: bool) {
        let now = self.now();
        let instant = self.instant();
        let agent = &mut self.agents[a];
        if let Some(link) = agent.link.take() {
            if !link.server_done {
                self.zombies.push(link);
            }
        }
        if restart {
            let node = agent.creds.as_ref().expect("credentials").node;
            let cached = agent.session().map().clone();
            agent.session = Some(AgentSession::new(node, cached, instant));
        } else {
            agent.disconnected();
        }
        agent.reconnect_at = Some(now + back_in);
    }

    /// Carries out what `a`'s session state asks for, as the agent's shell does after every
    /// input: messages go to the server, events are acted on.
    async fn flush(&mut self, a: usize) {
        let (seed, step) = (self.plan.seed, self.step);
        loop {
            let Some(state) = self.agents[a].session.as_mut() else {
                return;
            };
            let Some(msg) = state.poll_transmit() else {
                break;
            };
            match msg {
                ClientMessage::FullMapRequest => self.full_map_requested(a),
                ClientMessage::Endpoints { endpoints } => {
                    self.deliver_endpoints(a, endpoints).await;
                }
                other => panic!(
                    "seed {seed} step {step}: agent {a} sent {other:?}, but the simulation runs no workloads"
                ),
            }
        }
        let state = self.agents[a].session();
        while let Some(event) = state.poll_event() {
            match event {
                // The map is read from the session state when it is checked.
                Event::MapChanged | Event::HoldingsChanged => {}
                // Checked where the full-map request it comes with is sent.
                Event::DeltaRefused(DeltaError::Gap(_)) => {}
                other => panic!(
                    "seed {seed} step {step}: agent {a}'s session state asked for {other:?}, but the simulation runs no workloads"
                ),
            }
        }
    }

    /// The agent sent `FullMapRequest`: the server answers it when it gets to it.
    fn full_map_requested(&mut self, a: usize) {
        let (seed, step) = (self.plan.seed, self.step);
        let agent = &mut self.agents[a];
        let version = agent.session.as_ref().map_or(0, |s| s.map().version);
        let link = agent
            .link
            .as_mut()
            .expect("a full-map request is sent on a session");
        assert!(
            !link.awaiting_full_map,
            "seed {seed} step {step}: agent {a} (map version {version}) asked for a full map again before the one it asked for came"
        );
        assert!(
            link.tainted,
            "seed {seed} step {step}: agent {a} (map version {version}) saw a gap on a session that lost and reordered nothing"
        );
        link.awaiting_full_map = true;
        link.requests += 1;
        bump(&mut self.counts, "fullmap.requested");
    }

    // ---------------------------------------------------------------- the network

    /// The server task of `a`'s session writes up to `budget` frames: queued ones, or full
    /// maps the agent asked for. Returns whether anything happened.
    async fn pump(&mut self, a: usize, budget: usize) -> bool {
        let mut progress = false;
        for _ in 0..budget {
            let Some(link) = self.agents[a].link.as_mut() else {
                break;
            };
            if link.server_done {
                break;
            }
            if link.requests == 0 || !self.rng.chance(500) {
                let ended = match link.rx.try_recv() {
                    Ok(Outbound::Frame(f)) => {
                        link.wire.push_back(f);
                        progress = true;
                        continue;
                    }
                    Ok(Outbound::Close(reason)) => {
                        assert_ne!(
                            reason,
                            CloseReason::Replaced,
                            "seed {} step {}: agent {a}'s only session was replaced",
                            self.plan.seed,
                            self.step
                        );
                        "session.closed-by-hub"
                    }
                    // Dropped for a full queue. A revoked or deleted node's session whose
                    // queue was full ends the same way: `Revoked` did not fit.
                    Err(TryRecvError::Disconnected)
                        if self.nodes.get(&link.node).is_some_and(|f| !f.revoked) =>
                    {
                        "session.lagging"
                    }
                    Err(TryRecvError::Disconnected) => "session.removed-while-lagging",
                    Err(TryRecvError::Empty) if link.requests == 0 => break,
                    Err(TryRecvError::Empty) => "",
                };
                if !ended.is_empty() {
                    link.server_done = true;
                    let (net, node, serial) = (link.network.clone(), link.node, link.serial);
                    self.svc.session_closed(&net, node, serial).await;
                    bump(&mut self.counts, ended);
                    progress = true;
                    break;
                }
            }
            link.requests -= 1;
            // As `Service::on_agent_message` answers: once per version and session. An agent
            // asks only after a gap, so it never asks for a version it was given already.
            match self
                .svc
                .hub()
                .full_map_for(&link.network, link.node, link.serial)
            {
                FullMapAnswer::Send(full) => {
                    link.wire.push_back(full);
                    bump(&mut self.counts, "fullmap.answered");
                }
                FullMapAnswer::Nothing => bump(&mut self.counts, "fullmap.not-answered"),
                FullMapAnswer::NoNetwork => panic!("seed {}: the network is gone", self.plan.seed),
            }
            progress = true;
        }
        progress
    }

    /// The agent reads up to `budget` frames, some lost, duplicated or reordered on the way.
    /// Returns whether anything happened.
    async fn read(&mut self, a: usize, budget: usize) -> bool {
        let mut progress = false;
        for _ in 0..budget {
            let now = self.now();
            let Some(link) = self.agents[a].link.as_mut() else {
                break;
            };
            let Some(frame) = link.wire.pop_front() else {
                if link.server_done {
                    // The stream ended: back off, then reconnect.
                    let agent = &mut self.agents[a];
                    agent.disconnected();
                    agent.reconnect_at = Some(now + 1 + self.rng.below(4) as UnixTime);
                    bump(&mut self.counts, "session.end-seen");
                    progress = true;
                    self.flush(a).await;
                }
                break;
            };
            progress = true;
            let mut msg = decode(&mut self.decoded, &frame);
            if self.faults {
                if !matches!(*msg, ServerMessage::FullMap(_)) && self.rng.chance(LOSS) {
                    link.tainted = true;
                    bump(&mut self.counts, "frames.lost");
                    continue;
                }
                if self.rng.chance(REORDER) {
                    if let Some(next) = link.wire.front() {
                        let next_msg = decode(&mut self.decoded, next);
                        let both_deltas = matches!(*msg, ServerMessage::Delta(_))
                            && matches!(*next_msg, ServerMessage::Delta(_));
                        if both_deltas {
                            link.wire[0] = frame;
                            msg = next_msg;
                            link.tainted = true;
                            bump(&mut self.counts, "frames.reordered");
                        }
                    }
                }
            }
            bump(&mut self.counts, "frames.read");
            let twice = self.faults
                && matches!(*msg, ServerMessage::FullMap(_) | ServerMessage::Delta(_))
                && self.rng.chance(DUPLICATE);
            self.handle(a, &msg).await;
            if twice {
                bump(&mut self.counts, "frames.duplicated");
                self.handle(a, &msg).await;
            }
        }
        progress
    }

    /// One server message read on `a`'s session goes into the agent's session state, and
    /// what that asks for is carried out.
    async fn handle(&mut self, a: usize, msg: &ServerMessage) {
        let (seed, step) = (self.plan.seed, self.step);
        let now = self.instant();
        let agent = &mut self.agents[a];
        let link = agent.link.as_mut().expect("a message is read on a session");
        let awaiting = link.awaiting_full_map;
        match msg {
            ServerMessage::FullMap(m) => {
                assert!(
                    m.version >= agent.high,
                    "seed {seed} step {step}: agent {a} got full map version {} after holding {}",
                    m.version,
                    agent.high
                );
                link.tainted = false;
                link.awaiting_full_map = false;
                bump(&mut self.counts, "fullmap.received");
            }
            ServerMessage::Revoked { .. } => {
                let node = agent.creds.as_ref().expect("credentials").node;
                assert!(
                    self.deleted.contains_key(&node)
                        || self.nodes.get(&node).is_some_and(|f| f.revoked),
                    "seed {seed} step {step}: node {node} was told it is revoked, but it is not"
                );
            }
            ServerMessage::Lease { .. }
            | ServerMessage::Prepare { .. }
            | ServerMessage::Handover { .. }
            | ServerMessage::HandoverAborted { .. }
            | ServerMessage::ClaimResult { .. }
            | ServerMessage::RotateKey { .. } => panic!(
                "seed {seed} step {step}: agent {a} got a {}, but the simulation runs no workloads",
                msg.kind()
            ),
            ServerMessage::Delta(_)
            | ServerMessage::Welcome(_)
            | ServerMessage::Refused { .. }
            | ServerMessage::Unavailable { .. } => {
                // The session state decides.
            }
        }
        let before = agent.session().map().version;
        match agent.session().handle_message(now, msg.clone()) {
            Ok(()) => {}
            Err(SessionError::Revoked(_)) => {
                // The agent closes the connection, forgets its credentials and its map, and
                // exits.
                let link = agent.link.take().unwrap();
                if !link.server_done {
                    self.zombies.push(link);
                }
                agent.session().disconnected();
                agent.revoked();
                bump(&mut self.counts, "session.revoked-seen");
                return;
            }
            // The real agent would drop the connection and reconnect; the coordinator must
            // never make it.
            Err(e) => panic!(
                "seed {seed} step {step}: agent {a}'s session state ended its session on a {}: {e}",
                msg.kind()
            ),
        }
        let after = agent.session().map().version;
        assert!(
            after >= agent.high,
            "seed {seed} step {step}: agent {a} went back from map version {} to {after}",
            agent.high
        );
        agent.high = after;
        self.flush(a).await;
        if let ServerMessage::Delta(d) = msg {
            let asked = self.agents[a]
                .link
                .as_ref()
                .is_some_and(|l| l.awaiting_full_map);
            let what = if awaiting {
                assert_eq!(
                    after, before,
                    "seed {seed} step {step}: agent {a} applied delta {}->{} while it waited for the full map it asked for",
                    d.from_version, d.to_version
                );
                "delta.skipped-awaiting-full-map"
            } else if after > before {
                "delta.applied"
            } else if asked {
                // A gap: counted as `fullmap.requested`.
                ""
            } else {
                "delta.stale"
            };
            if !what.is_empty() {
                bump(&mut self.counts, what);
            }
        }
    }

    /// Time passes for `a`'s session state: `handle_timeout` when `poll_timeout` is due.
    async fn timers(&mut self, a: usize) {
        let now = self.instant();
        let Some(state) = self.agents[a].session.as_mut() else {
            return;
        };
        if state.poll_timeout().is_some_and(|at| at <= now) {
            state.handle_timeout(now);
            self.flush(a).await;
        }
    }

    /// A few sessions move along; some servers notice their dead connections.
    async fn tick(&mut self) {
        let linked: Vec<usize> = (0..self.agents.len())
            .filter(|&a| self.agents[a].link.is_some())
            .collect();
        for _ in 0..VISITS {
            let Some(a) = self.rng.pick(&linked) else {
                break;
            };
            self.pump(a, BURST).await;
            self.read(a, BURST).await;
            self.timers(a).await;
        }
        let mut i = 0;
        while i < self.zombies.len() {
            if self.rng.chance(300) {
                let z = self.zombies.swap_remove(i);
                self.close_zombie(z).await;
            } else {
                i += 1;
            }
        }
    }

    /// The server of a dropped session notices and detaches it, with its own serial: a newer
    /// session of the same node must stay.
    async fn close_zombie(&mut self, z: Link) {
        let newer = self.agents[z.agent]
            .link
            .as_ref()
            .is_some_and(|l| l.node == z.node && !l.server_done);
        let online = self.svc.hub().is_online(&z.network, z.node);
        self.svc.session_closed(&z.network, z.node, z.serial).await;
        if newer {
            assert_eq!(
                self.svc.hub().is_online(&z.network, z.node),
                online,
                "seed {} step {}: closing an old session of node {} detached its new one",
                self.plan.seed,
                self.step,
                z.node
            );
        }
        self.count("session.zombie-closed");
    }

    // ---------------------------------------------------------------- steps and checks

    async fn random_step(&mut self) {
        let pause = self.rng.below(3) as UnixTime;
        self.advance(pause);
        let linked = self.linked();
        let roll = self.rng.below(1000);
        match roll {
            0..=119 => {
                if let Some(a) = self.rng.pick(&linked) {
                    let moves = !self.rng.chance(250);
                    self.change_endpoints(a, moves).await;
                }
            }
            120..=199 => {
                let outsiders: Vec<usize> = (0..self.agents.len())
                    .filter(|&a| self.agents[a].creds.is_none())
                    .collect();
                if let Some(a) = self.rng.pick(&outsiders) {
                    self.join(a).await;
                }
            }
            200..=224 => self.remove_node(false).await,
            225..=249 => self.remove_node(true).await,
            250..=289 => {
                if let Some(a) = self.rng.pick(&linked) {
                    let back_in = 1 + self.rng.below(20) as UnixTime;
                    self.crash(a, back_in, true);
                    self.count("agent.crash");
                }
            }
            290..=309 => {
                // The agent gives up on a connection the server still thinks alive.
                if let Some(a) = self.rng.pick(&linked) {
                    self.crash(a, 0, false);
                    self.reconnect(a).await;
                    self.count("agent.flap");
                }
            }
            310..=324 => {
                if let Some(a) = self.rng.pick(&linked) {
                    let agent = &mut self.agents[a];
                    agent.rebinds += 1;
                    agent.remote = remote_of(a, agent.rebinds);
                    let back_in = 1 + self.rng.below(5) as UnixTime;
                    self.crash(a, back_in, false);
                    self.count("agent.rebind");
                }
            }
            325..=334 => self.token_admin().await,
            335..=344 => self.mistake().await,
            _ => {}
        }
        self.reconnect_due(4).await;
    }

    /// Cheap invariants, after every step.
    fn check_step(&mut self) {
        let (seed, step) = (self.plan.seed, self.step);
        let mut addresses = HashSet::with_capacity(self.nodes.len());
        for (id, f) in &self.nodes {
            assert!(
                addresses.insert((f.network, f.address)),
                "seed {seed} step {step}: node {id} shares address {} in {}",
                f.address,
                NETWORKS[f.network].0
            );
        }
        for (i, (name, _)) in NETWORKS.iter().enumerate() {
            let v = self.svc.hub().version(name).unwrap();
            assert_eq!(
                v, self.versions[i],
                "seed {seed} step {step}: network {name} is at version {v}, the oracle expects {}",
                self.versions[i]
            );
            // Comparing whole maps costs a copy of each; every few steps is enough to catch
            // a wrong entry, which stays until something fixes it.
            if self.checked[i] == v || (self.faults && !self.step.is_multiple_of(8)) {
                continue;
            }
            self.checked[i] = v;
            let map = self.svc.hub().map(name).unwrap();
            let want: BTreeMap<NodeId, (Ipv4Addr, Vec<SocketAddr>)> = self
                .nodes
                .iter()
                .filter(|(_, f)| f.network == i && !f.revoked)
                .map(|(id, f)| (*id, (f.address, f.peer_endpoints())))
                .collect();
            let have: BTreeMap<NodeId, (Ipv4Addr, Vec<SocketAddr>)> = map
                .peers
                .iter()
                .map(|(id, p)| {
                    let IpAddr::V4(addr) = p.addresses[0].addr() else {
                        panic!("an IPv6 overlay address");
                    };
                    (*id, (addr, p.endpoints.clone()))
                })
                .collect();
            assert_eq!(
                have, want,
                "seed {seed} step {step}: the hub's map of {name} differs from the oracle's"
            );
        }
    }

    /// The hub against the store, and the store against the oracle.
    async fn check_store(&mut self) {
        let (seed, step) = (self.plan.seed, self.step);
        for (i, (name, _)) in NETWORKS.iter().enumerate() {
            let net = self.store.network(name).await.unwrap().unwrap();
            assert_eq!(net.version, self.versions[i]);
            let records = self.store.nodes(Some(name)).await.unwrap();
            assert_eq!(
                netmap(net.version, &records, &[], None),
                self.svc.hub().map(name).unwrap(),
                "seed {seed} step {step}: the hub's map of {name} is not the one the store would load"
            );
            let mut addresses = BTreeSet::new();
            for r in &records {
                assert!(
                    addresses.insert(r.address),
                    "seed {seed} step {step}: address {} is held twice in {name}",
                    r.address
                );
                let fact = self.nodes.get(&r.id).unwrap_or_else(|| {
                    panic!(
                        "seed {seed} step {step}: the store holds node {} the oracle deleted",
                        r.id
                    )
                });
                assert_eq!((fact.revoked, fact.address), (r.revoked, r.address));
            }
            let count = self.nodes.values().filter(|f| f.network == i).count();
            assert_eq!(
                records.len(),
                count,
                "seed {seed} step {step}: nodes of {name}"
            );
        }
    }

    /// Faults stop: every server and agent runs until nothing moves, dropped agents come back,
    /// and a gap asks for a full map.
    async fn settle(&mut self) {
        for _ in 0..100 {
            self.advance(60);
            let mut progress = false;
            for z in std::mem::take(&mut self.zombies) {
                self.close_zombie(z).await;
                progress = true;
            }
            for a in 0..self.agents.len() {
                if self.agents[a].creds.is_some() && self.agents[a].link.is_none() {
                    self.reconnect(a).await;
                    self.count("heal.reconnect");
                    progress = true;
                }
            }
            for a in 0..self.agents.len() {
                loop {
                    let wrote = self.pump(a, usize::MAX).await;
                    let read = self.read(a, usize::MAX).await;
                    if !(wrote || read) {
                        break;
                    }
                    progress = true;
                }
            }
            self.check_step();
            if !progress {
                return;
            }
            self.count("heal.round");
        }
        panic!("seed {}: the simulation does not settle", self.plan.seed);
    }

    async fn heal(&mut self) {
        self.faults = false;
        self.settle().await;
        // An agent that lost the last frame of its session cannot know it; the next change
        // shows it a gap. One endpoint change per network is that change.
        let gaps = self.counts.get("fullmap.requested").copied().unwrap_or(0);
        for net in 0..NETWORKS.len() {
            let member = self.linked().into_iter().find(|&a| {
                self.agents[a]
                    .creds
                    .as_ref()
                    .is_some_and(|c| c.network == net)
            });
            if let Some(a) = member {
                let v = self.versions[net];
                self.change_endpoints(a, true).await;
                assert_eq!(self.versions[net], v + 1, "the probe changes the map");
            }
        }
        self.settle().await;
        let after = self.counts.get("fullmap.requested").copied().unwrap_or(0);
        *self.counts.entry("heal.gaps-found-by-probe").or_default() += after - gaps;
    }

    /// After healing: every live agent holds its network's map; revoked and deleted nodes are
    /// gone from every map and cannot come back.
    async fn check_final(&mut self) -> Vec<Netmap> {
        self.check_step();
        self.check_store().await;
        let seed = self.plan.seed;
        let maps: Vec<Netmap> = NETWORKS
            .iter()
            .map(|(n, _)| self.svc.hub().map(n).unwrap())
            .collect();
        let mut live: HashSet<NodeId> = HashSet::new();
        for (a, agent) in self.agents.iter().enumerate() {
            let Some(c) = &agent.creds else {
                // Stopped (refused: it keeps its cached map) or gone (revoked, or never in).
                assert!(agent.link.is_none());
                assert!(agent
                    .session
                    .as_ref()
                    .is_none_or(|s| !s.is_connected() && !s.holdings().is_holder()));
                continue;
            };
            let link = agent.link.as_ref().unwrap_or_else(|| {
                panic!("seed {seed}: live agent {a} has no session after healing")
            });
            assert!(!link.server_done && link.wire.is_empty() && link.requests == 0);
            assert!(!link.awaiting_full_map);
            let state = agent
                .session
                .as_ref()
                .expect("a live agent's session state");
            assert!(state.is_connected());
            let fact = &self.nodes[&c.node];
            assert!(!fact.revoked && fact.agent == a);
            assert_eq!(
                *state.map(),
                maps[c.network],
                "seed {seed}: agent {a} (node {}) holds another map than {}'s",
                c.node,
                NETWORKS[c.network].0
            );
            live.insert(c.node);
        }
        assert_eq!(
            self.svc.hub().online(),
            live,
            "seed {seed}: the hub's sessions are not the live agents'"
        );
        for (id, f) in &self.nodes {
            assert_eq!(
                live.contains(id),
                !f.revoked,
                "seed {seed}: node {id} (revoked: {}) has the wrong liveness",
                f.revoked
            );
        }
        let gone: BTreeSet<NodeId> = self
            .deleted
            .keys()
            .copied()
            .chain(
                self.nodes
                    .iter()
                    .filter(|(_, f)| f.revoked)
                    .map(|(id, _)| *id),
            )
            .collect();
        for map in &maps {
            assert!(map.peers.keys().all(|id| !gone.contains(id)));
        }
        let revoked: Vec<(NodeId, String, usize)> = self
            .nodes
            .iter()
            .filter(|(_, f)| f.revoked)
            .map(|(id, f)| (*id, f.secret.clone(), f.agent))
            .collect();
        for (id, secret, a) in revoked {
            let hello = self.node_hello(a, id, &secret);
            let e = self.svc.hello(&hello, remote_of(a, 0)).await.unwrap_err();
            assert!(
                matches!(e, ApiError::Refused(_)),
                "seed {seed}: revoked node {id}: {e}"
            );
        }
        let deleted: Vec<(NodeId, String, usize)> = self
            .deleted
            .iter()
            .map(|(id, (s, a))| (*id, s.clone(), *a))
            .collect();
        for (id, secret, a) in deleted {
            let hello = self.node_hello(a, id, &secret);
            let e = self.svc.hello(&hello, remote_of(a, 0)).await.unwrap_err();
            assert!(
                matches!(e, ApiError::Unauthorized(_)),
                "seed {seed}: deleted node {id}: {e}"
            );
            assert!(self.store.node(id).await.unwrap().is_none());
        }
        assert!(self
            .svc
            .hub()
            .online()
            .is_disjoint(&gone.iter().copied().collect()));
        self.counts.insert("end.live", live.len() as u64);
        self.counts.insert(
            "end.revoked",
            self.nodes.values().filter(|f| f.revoked).count() as u64,
        );
        self.counts.insert("end.deleted", self.deleted.len() as u64);
        maps
    }
}

async fn run(plan: Plan) -> Report {
    println!("simulation seed {}: {plan:?}", plan.seed);
    let started = Instant::now();
    let mut sim = Sim::new(plan).await;
    while sim.agents.iter().filter(|a| a.creds.is_some()).count() < plan.initial {
        sim.step += 1;
        assert!(sim.step < 10 * plan.initial, "enrollment does not progress");
        let outsiders: Vec<usize> = (0..plan.agents)
            .filter(|&a| sim.agents[a].creds.is_none())
            .collect();
        let a = sim.rng.pick(&outsiders).expect("agents left to enroll");
        sim.join(a).await;
        sim.advance(1);
        sim.tick().await;
        sim.check_step();
    }
    // One coordinator restart, somewhere in the middle: every session ends at once.
    let restart_at = plan.steps / 4 + sim.rng.below(plan.steps / 2);
    for i in 0..plan.steps {
        sim.step += 1;
        if i == restart_at {
            sim.restart_coordinator().await;
        }
        sim.random_step().await;
        sim.tick().await;
        sim.check_step();
        if sim.step.is_multiple_of(500) {
            sim.check_store().await;
        }
    }
    sim.heal().await;
    let maps = sim.check_final().await;
    let summary: Vec<String> = sim.counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "simulation seed {}: passed in {:.1?}, {} simulated seconds, versions {:?}\n  {}",
        plan.seed,
        started.elapsed(),
        sim.now() - EPOCH,
        sim.versions,
        summary.join(" ")
    );
    Report {
        counts: sim.counts,
        maps,
    }
}

#[tokio::test]
async fn seed_1() {
    run(plan(1)).await;
}

#[tokio::test]
async fn seed_2() {
    run(plan(2)).await;
}

#[tokio::test]
async fn seed_3() {
    run(plan(3)).await;
}

#[tokio::test]
async fn seed_4() {
    run(plan(4)).await;
}

#[tokio::test]
async fn seed_5() {
    run(plan(5)).await;
}

/// One seed, one run: the same events and the same maps every time.
#[tokio::test]
async fn a_seed_replays_exactly() {
    let small = Plan {
        seed: 6,
        agents: 40,
        initial: 30,
        steps: 400,
        queue: 16,
    };
    let first = run(small).await;
    let second = run(small).await;
    assert_eq!(first, second);
}

/// Every endpoint report lands at once, as the oracle expects: how often one node may change
/// its endpoints is tested on its own (`hostile.rs`, `endpoint_pace.rs`).
fn unpaced(svc: &Service) {
    svc.set_endpoint_pace(Duration::ZERO, 1);
}
