//! One simulated agent: the real agent's control session ([`AgentSession`]) in a small QUIC
//! shell, without a data plane.
//!
//! The shell does what `MeshControl` does with the session and nothing more: it opens a QUIC
//! connection (the coordinator's certificate pinned), says hello (a join token the first time,
//! the node's credentials after that), hands every message and the passing of time to the
//! session, writes what the session asks to send in order, and answers `Prepare` once its
//! (pretend) tunnels are up, after a random 0-300 ms. All session logic is the session's.
//!
//! The soak's operator drives it with [`Command`]s: leave for a while (the connection closed,
//! the session kept, as after a network cut), crash (the session dropped: a dead process
//! answers for nothing; it restarts from its cached map), claim a workload. A revoked or
//! deleted node forgets its credentials and joins again as a new node with a new key.
//!
//! The session lives in [`Slot::view`], behind a mutex the fencing checker also takes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use meshlink_proto::agent_session::{AgentSession, ClaimError, Event, SessionError};
use meshlink_proto::control::{
    encode, Auth, ClientMessage, Decoder, Hello, ServerMessage, Welcome, MAX_SERVER_MESSAGE,
    PROTOCOL_VERSION, SERVER_NAME,
};
use meshlink_proto::{Netmap, NodeId, PublicKey};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long connecting plus hello, welcome and the first map may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);
/// The pause before trying again after a session was lost unasked, or a connection failed.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long a claim may wait for a connection.
const CLAIM_DEADLINE: Duration = Duration::from_secs(10);
/// The longest pretend tunnel warm-up before answering `Prepare`.
const MAX_WARM_UP_MS: u64 = 300;

/// `e` and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Orders from the operator to one simulated agent.
#[derive(Debug, Clone)]
pub enum Command {
    /// Close the connection, keep the session, come back after the pause.
    Leave(Duration),
    /// Die: the connection closed, the session dropped; restart from the cached map after the
    /// pause.
    Crash(Duration),
    /// Claim this workload.
    Claim(String),
    /// The churn is over: come back now if away, and stay.
    Settle,
}

/// What the checker and the operator see of an agent.
#[derive(Debug, Default)]
pub struct View {
    /// The node this agent is now (none before its first join, or after a revocation).
    pub node: Option<NodeId>,
    /// Its name, as the coordinator gave it.
    pub name: Option<String>,
    /// The session; `None` while the process is "dead" or not joined.
    pub session: Option<AgentSession>,
}

/// Counters of the whole fleet.
#[derive(Debug, Default)]
pub struct Counters {
    /// Joins that succeeded (new nodes).
    pub joins: AtomicU64,
    /// Sessions opened with node credentials.
    pub reconnects: AtomicU64,
    /// Sessions lost without being asked to leave.
    pub lost: AtomicU64,
    /// Connection or hello attempts that failed.
    pub failed_attempts: AtomicU64,
    /// Leaves and crashes carried out.
    pub leaves: AtomicU64,
    /// Crashes carried out.
    pub crashes: AtomicU64,
    /// Revocations (or deletions) received.
    pub revoked: AtomicU64,
    /// Prepares answered.
    pub prepared: AtomicU64,
    /// Claims sent.
    pub claims: AtomicU64,
    /// Claims granted.
    pub claims_granted: AtomicU64,
    /// Claims refused by the coordinator.
    pub claims_refused: AtomicU64,
    /// Claims lost with their session, or expired.
    pub claims_lost: AtomicU64,
    /// Deltas that did not apply (each asked for a full map).
    pub deltas_refused: AtomicU64,
    /// Sessions ended because the coordinator broke the protocol (as the session judged).
    pub protocol_errors: AtomicU64,
}

/// What every agent shares.
#[derive(Debug)]
pub struct Shared {
    /// The coordinator's QUIC address.
    pub server: SocketAddr,
    /// The join token's secret.
    pub token_secret: String,
    /// Counters.
    pub counters: Counters,
    /// Set when the run ends: agents close their sessions and stop.
    pub stopping: AtomicBool,
}

/// One agent's place in the fleet.
#[derive(Debug)]
pub struct Slot {
    /// Its index.
    pub index: usize,
    /// What the checker and the operator see.
    pub view: Mutex<View>,
    /// Orders.
    pub commands: mpsc::Sender<Command>,
}

impl Slot {
    /// The view, locked (a poisoned lock is taken anyway: the view stays consistent).
    pub fn lock(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum End {
    /// The connection broke or could not be made.
    #[error("connection: {0}")]
    Connection(String),
    /// The coordinator refused or revoked the node.
    #[error("refused or revoked: {0}")]
    Gone(String),
    /// The coordinator cannot serve now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Something undecodable or out of order.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The operator said to leave or crash.
    #[error("told to leave")]
    Told(Command),
    /// The run is over.
    #[error("stopping")]
    Stopping,
}

/// The node's credentials after its join.
#[derive(Debug, Clone)]
struct Credentials {
    node: NodeId,
    secret: String,
    key: PublicKey,
}

/// An open connection with its stream and decoder.
struct Conn {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: Decoder,
}

impl Conn {
    async fn open(endpoint: &quinn::Endpoint, server: SocketAddr) -> Result<Conn, End> {
        let conn = endpoint
            .connect(server, SERVER_NAME)
            .map_err(|e| End::Connection(chain(&e)))?
            .await
            .map_err(|e| End::Connection(chain(&e)))?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| End::Connection(chain(&e)))?;
        Ok(Conn {
            conn,
            send,
            recv,
            decoder: Decoder::new(MAX_SERVER_MESSAGE),
        })
    }

    async fn send(&mut self, msg: &ClientMessage) -> Result<(), End> {
        self.send
            .write_all(&encode(msg))
            .await
            .map_err(|e| End::Connection(chain(&e)))
    }

    /// The next whole message already received.
    fn decoded(&mut self) -> Result<Option<ServerMessage>, End> {
        self.decoder
            .decode::<ServerMessage>()
            .map_err(|e| End::Protocol(e.to_string()))
    }

    /// Reads more bytes into the decoder. Cancel-safe (`read_chunk` is).
    async fn fill(&mut self) -> Result<(), End> {
        match self.recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => self
                .decoder
                .push(&chunk.bytes)
                .map_err(|e| End::Protocol(e.to_string())),
            Ok(None) => Err(End::Connection(
                "the coordinator finished the stream".into(),
            )),
            Err(e) => Err(End::Connection(chain(&e))),
        }
    }

    async fn next(&mut self) -> Result<ServerMessage, End> {
        loop {
            if let Some(m) = self.decoded()? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    /// Hello, welcome, first map.
    async fn hello(&mut self, hello: Hello) -> Result<(Welcome, Netmap), End> {
        self.send(&ClientMessage::Hello(hello)).await?;
        let welcome = match self.next().await? {
            ServerMessage::Welcome(w) => w,
            ServerMessage::Refused { reason } | ServerMessage::Revoked { reason } => {
                return Err(End::Gone(reason))
            }
            ServerMessage::Unavailable { reason } => return Err(End::Unavailable(reason)),
            other => return Err(End::Protocol(format!("expected a welcome, got {other:?}"))),
        };
        match self.next().await? {
            ServerMessage::FullMap(map) => Ok((welcome, map)),
            _ => Err(End::Protocol(
                "expected a full map after the welcome".into(),
            )),
        }
    }

    fn close(&self, why: &'static [u8]) {
        self.conn.close(0u32.into(), why);
    }
}

/// One simulated agent's task: joins, serves, obeys, rejoins, until the run stops.
pub async fn run(
    slot: Arc<Slot>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut creds: Option<Credentials> = None;
    // The map a crashed agent restarts from (its cache).
    let mut cached = Netmap::default();
    let mut settled = false;
    while !shared.stopping.load(Ordering::Relaxed) {
        let attempt = tokio::time::timeout(
            HELLO_TIMEOUT,
            open(&endpoint, &shared, creds.as_ref(), slot.index),
        )
        .await
        .unwrap_or_else(|_| Err(End::Connection("no welcome in time".into())));
        let pause = match attempt {
            Ok((mut conn, welcome, map, new_creds)) => {
                let joined = creds.is_none();
                let c = creds.get_or_insert(new_creds);
                let counter = if joined {
                    &shared.counters.joins
                } else {
                    &shared.counters.reconnects
                };
                counter.fetch_add(1, Ordering::Relaxed);
                {
                    let now = Instant::now().into_std();
                    let mut v = slot.lock();
                    v.node = Some(c.node);
                    v.name = Some(welcome.name.clone());
                    let session = v
                        .session
                        .get_or_insert_with(|| AgentSession::new(c.node, cached.clone(), now));
                    session.welcomed(&welcome);
                    session.connected(now, map, Vec::new());
                }
                let end = serve(&slot, &shared, &mut conn, &mut commands, settled).await;
                conn.close(b"bye");
                let mut v = slot.lock();
                if let Some(s) = v.session.as_mut() {
                    s.disconnected();
                    cached = s.map().clone();
                }
                match end {
                    _ if shared.stopping.load(Ordering::Relaxed) => break,
                    End::Told(Command::Leave(pause)) => {
                        shared.counters.leaves.fetch_add(1, Ordering::Relaxed);
                        pause
                    }
                    End::Told(Command::Crash(pause)) => {
                        shared.counters.crashes.fetch_add(1, Ordering::Relaxed);
                        v.session = None;
                        pause
                    }
                    End::Told(_) => Duration::ZERO,
                    End::Gone(reason) => {
                        shared.counters.revoked.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(agent = slot.index, "gone: {reason}; joining again");
                        *v = View::default();
                        creds = None;
                        cached = Netmap::default();
                        RETRY_PAUSE
                    }
                    e => {
                        shared.counters.lost.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(agent = slot.index, "session lost: {e}");
                        RETRY_PAUSE
                    }
                }
            }
            Err(End::Gone(reason)) if creds.is_none() => {
                shared
                    .counters
                    .failed_attempts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(agent = slot.index, "join refused: {reason}");
                RETRY_PAUSE
            }
            Err(End::Gone(reason)) => {
                // Refused at hello: revoked or deleted while away.
                shared.counters.revoked.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(agent = slot.index, "refused: {reason}; joining again");
                *slot.lock() = View::default();
                creds = None;
                cached = Netmap::default();
                RETRY_PAUSE
            }
            Err(e) => {
                shared
                    .counters
                    .failed_attempts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(agent = slot.index, "attempt failed: {e}");
                RETRY_PAUSE
            }
        };
        // Away: wait out the pause, unless told to settle or stop.
        let until = Instant::now() + pause;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Settle) => { settled = true; break }
                    Some(_) => {} // away: nothing to leave, crash or claim with
                },
            }
            if shared.stopping.load(Ordering::Relaxed) {
                return;
            }
        }
        let mut v = slot.lock();
        if v.session.is_none() {
            if let Some(c) = &creds {
                // Restarted: the cached map, fresh state.
                v.session = Some(AgentSession::new(
                    c.node,
                    cached.clone(),
                    Instant::now().into_std(),
                ));
            }
        }
    }
}

/// Opens a connection and says hello: with the node's credentials, or joins with the token
/// under a new random key.
async fn open(
    endpoint: &quinn::Endpoint,
    shared: &Shared,
    creds: Option<&Credentials>,
    index: usize,
) -> Result<(Conn, Welcome, Netmap, Credentials), End> {
    let key = creds.map_or_else(|| PublicKey(rand::random()), |c| c.key);
    let auth = match creds {
        Some(c) => Auth::Node {
            node_id: c.node,
            secret: c.secret.clone(),
        },
        None => Auth::JoinToken {
            secret: shared.token_secret.clone(),
        },
    };
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        auth,
        public_key: key,
        key_rotation: false,
        policy_edits: false,
        compression: false,
        name: None,
        labels: BTreeMap::from([("soak".to_string(), index.to_string())]),
        endpoints: Vec::new(),
        handover: false,
    };
    let mut conn = Conn::open(endpoint, shared.server).await?;
    let (welcome, map) = conn.hello(hello).await?;
    let new = match (creds, &welcome.node_secret) {
        (Some(c), _) => c.clone(),
        (None, Some(secret)) => Credentials {
            node: welcome.node_id,
            secret: secret.clone(),
            key,
        },
        (None, None) => {
            return Err(End::Protocol(
                "no node secret in the welcome of a join".into(),
            ))
        }
    };
    Ok((conn, welcome, map, new))
}

/// Pretend tunnel warm-ups waiting to answer `Prepare`.
type Warming = Vec<(Instant, String, u64)>;

/// One connection: messages, the session's timer, warm-ups and commands, until it ends.
async fn serve(
    slot: &Slot,
    shared: &Shared,
    conn: &mut Conn,
    commands: &mut mpsc::Receiver<Command>,
    mut settled: bool,
) -> End {
    let mut warming: Warming = Vec::new();
    loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return End::Stopping;
        }
        // What the session asks for.
        let (frames, events, timer) = {
            let mut v = slot.lock();
            let Some(s) = v.session.as_mut() else {
                return End::Protocol("no session while connected".into());
            };
            let frames: Vec<ClientMessage> = std::iter::from_fn(|| s.poll_transmit()).collect();
            let events: Vec<Event> = std::iter::from_fn(|| s.poll_event()).collect();
            (frames, events, s.poll_timeout())
        };
        for f in &frames {
            if let Err(e) = conn.send(f).await {
                return e;
            }
        }
        for e in events {
            on_event(shared, &mut warming, e);
        }
        let warm = warming.iter().map(|(at, _, _)| *at).min();
        let wake = [timer.map(Instant::from_std), warm]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        // Messages already in the decoder first: the chunk that carried the hello's map may
        // have carried the next deltas too, and nothing more need ever come to wake `fill`
        // (an agent that held nothing then stayed a version behind for good).
        if let Err(e) = handle_buffered(slot, shared, conn) {
            return e;
        }
        tokio::select! {
            filled = conn.fill() => {
                if let Err(e) = filled.and_then(|()| handle_buffered(slot, shared, conn)) {
                    return e;
                }
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                let mut v = slot.lock();
                let Some(s) = v.session.as_mut() else { continue };
                s.handle_timeout(now.into_std());
                let (due, later): (Warming, Warming) =
                    warming.drain(..).partition(|(at, _, _)| *at <= now);
                warming = later;
                for (_, w, g) in due {
                    shared.counters.prepared.fetch_add(1, Ordering::Relaxed);
                    s.prepared(w, g);
                }
            }
            cmd = commands.recv() => match cmd {
                None => return End::Stopping,
                Some(Command::Settle) => settled = true,
                Some(c @ (Command::Leave(_) | Command::Crash(_))) if !settled => return End::Told(c),
                Some(Command::Claim(w)) if !settled => {
                    let now = Instant::now().into_std();
                    let mut v = slot.lock();
                    if let Some(s) = v.session.as_mut() {
                        shared.counters.claims.fetch_add(1, Ordering::Relaxed);
                        s.claim(now, w, now + CLAIM_DEADLINE);
                    }
                }
                Some(_) => {}
            },
        }
    }
}

/// Hands every whole message in the decoder to the session.
fn handle_buffered(slot: &Slot, shared: &Shared, conn: &mut Conn) -> Result<(), End> {
    while let Some(msg) = conn.decoded()? {
        let now = Instant::now().into_std();
        let mut v = slot.lock();
        let Some(s) = v.session.as_mut() else { break };
        if let Err(e) = s.handle_message(now, msg) {
            return Err(match e {
                SessionError::Revoked(r) | SessionError::Refused(r) => End::Gone(r),
                SessionError::Unavailable(r) => End::Unavailable(r),
                SessionError::Protocol(r) => {
                    shared
                        .counters
                        .protocol_errors
                        .fetch_add(1, Ordering::Relaxed);
                    End::Protocol(r)
                }
            });
        }
    }
    Ok(())
}

fn on_event(shared: &Shared, warming: &mut Warming, event: Event) {
    let c = &shared.counters;
    match event {
        Event::Prepare {
            workload,
            generation,
            ..
        } => {
            let ms = rand::thread_rng().gen_range(0..=MAX_WARM_UP_MS);
            warming.push((
                Instant::now() + Duration::from_millis(ms),
                workload,
                generation,
            ));
        }
        Event::ClaimAnswered { result, .. } => {
            let counter = match result {
                Ok(_) => &c.claims_granted,
                Err(ClaimError::Refused(_) | ClaimError::NoResult) => &c.claims_refused,
                Err(ClaimError::SessionLost | ClaimError::Expired) => &c.claims_lost,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Event::DeltaRefused(_) => {
            c.deltas_refused.fetch_add(1, Ordering::Relaxed);
        }
        // Never asked: its hello offers no live migration (the coordinator would time out).
        Event::Handover { .. }
        | Event::HandoverAborted { .. }
        | Event::MapChanged
        | Event::HoldingsChanged => {}
    }
}
