//! Sessions with the standalone relays the coordinator grants (`meshlink-relay`).
//!
//! The coordinator's grant lists the relays and carries this node's ticket
//! ([`meshlink_proto::relay::Grant`]). This node keeps a session with **every** listed relay
//! (at most [`meshlink_proto::relay::MAX_LISTED_RELAYS`]), so a peer can reach it through any
//! of them, and sends its own relayed datagrams through one, its **home** ([`HomeChoice`]: the
//! nearest by round trip). Every peer does the same, so the sender's home is normally a relay
//! both use; no map of who is homed where is needed. A home that dies is noticed within the
//! session's idle timeout ([`IDLE`]) and replaced by the next nearest at once; the data plane
//! never learns of it (the shims stay the peers' endpoints), so WireGuard sessions survive.
//!
//! Each session opens over QUIC (frames as datagrams) or, when QUIC is not up within
//! [`TCP_AFTER`], TLS over TCP to the same address (frames as records), pinning the relay's
//! certificate from the grant, and says a [`RelayHello`] with the ticket and its proof: the
//! connection's TLS exporter value signed with the ticket's proof key, whose secret only the
//! grant carries ([`meshlink_proto::relay`], "Tickets are bound to their sessions"), so that no
//! relay can present this node's ticket at another. Before the ticket
//! expires (once a grant brought a ticket that expires later: [`step`]), or as soon as a
//! grant vouches for another key (the node rotated its key), a new session is opened with the
//! newest ticket and takes over, then the old one is closed (make before break). Without a
//! newer ticket (no coordinator answers), the session is read until its ticket expires, then
//! closed and counted down, so that datagrams go through the coordinator's relay again once
//! one is reachable. A session that fails is tried again with backoff (jittered, as the control
//! session's: `meshlink_proto::reconnect`), a session lost is opened again after a random pause
//! below a second (every agent lost it at once when a relay or coordinator restarted), and no
//! relay is tried more than once per [`MIN_RECONNECT`].
//!
//! A peer that is not on the home relay (it cannot reach that relay, or has not opened its
//! session there yet) draws a notice from the relay for the frames sent to it
//! ([`meshlink_proto::relay::unreachable_notice`]); the peer is then reached through the next
//! relay ([`Relays::links`]: the home first, then the others nearest first) for
//! [`UNREACHABLE_FOR`], and through the coordinator's relay when no standalone one has it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use meshlink_proto::control::{encode, Decoder, Record, RelayTransport};
use meshlink_proto::relay::{
    session_proof_message, Grant, ProofSecret, RelayAnswer, RelayHello, RelayInfo, Ticket,
    EXPORTER_LABEL, EXPORTER_LEN, MAX_RELAY_MESSAGE, RELAY_ALPN, RELAY_PROTOCOL, RELAY_SERVER_NAME,
};
use meshlink_proto::PublicKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use super::home::{Candidate, HomeChoice};
use crate::control::fraction;
use crate::control::transport::{tls_over_tcp, LinkConn, StreamWriter, Tls};
use meshlink_proto::reconnect::{Reconnect, ReconnectPolicy};

/// How long QUIC has before TLS/TCP is tried.
pub const TCP_AFTER: Duration = Duration::from_secs(2);
/// How long a connection, its hello and the answer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(6);
/// A session with no packet for this long is over (QUIC idle timeout; TCP user timeout).
pub const IDLE: Duration = Duration::from_secs(4);
/// The keepalive of a session.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// A session is renewed this long before its ticket expires (at least).
pub const RENEW_BEFORE: Duration = Duration::from_secs(30);
/// The longest wait between tries of a relay that fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a session whose renewal failed tries again.
pub const RENEW_RETRY: Duration = Duration::from_secs(5);
/// The least time between two connection attempts to one relay, whatever happens to them.
pub const MIN_RECONNECT: Duration = Duration::from_secs(1);
/// How long a relay's notice that a peer is not there keeps that peer's datagrams away from it.
pub const UNREACHABLE_FOR: Duration = Duration::from_secs(30);
/// The most (peer, relay) notices kept; beyond it new ones are ignored until old ones expire.
const MAX_MARKS: usize = 4096;
/// How often round trips are read and the home chosen again.
pub const CHOOSE_EVERY: Duration = Duration::from_secs(1);

/// The home relay's session, as the relay client sends on it.
#[derive(Debug, Clone)]
pub struct HomeLink {
    /// The relay's name.
    pub name: String,
    /// What frames go out on.
    pub conn: LinkConn,
    /// The relay's address.
    pub remote: SocketAddr,
    /// What frames run over.
    pub transport: RelayTransport,
}

/// What `status` shows of one relay.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayStatus {
    /// Its name.
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its provider.
    pub provider: String,
    /// Its address as listed.
    pub addr: String,
    /// Whether a session is up.
    pub up: bool,
    /// Over what.
    pub over: Option<RelayTransport>,
    /// Its round trip, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Whether it is home.
    pub home: bool,
}

/// One relay's session as the manager keeps it.
struct Up {
    conn: LinkConn,
    quic: Option<quinn::Connection>,
    remote: SocketAddr,
    transport: RelayTransport,
    /// Measured at the hello (TCP); QUIC's own estimate replaces it.
    rtt: Duration,
    /// Since when the relay has had a session (a renewal keeps it).
    since: Instant,
}

enum Event {
    Up(String, Up),
    Down(String),
}

/// The peers relays said they do not have, per relay, until when; only peers of the map
/// ([`Unreachable::set_peers`]), so that a relay's notices naming made-up keys take no room
/// from the real ones.
///
/// A mark moves its peer's frames to another relay, and its wearing off moves them back: both
/// are told ([`Unreachable::noticed`], [`Unreachable::next_expiry`]), so that the path report
/// names the relay in use within moments rather than at its next periodic refresh.
#[derive(Debug, Default)]
pub struct Unreachable {
    marks: Mutex<HashMap<(PublicKey, String), Instant>>,
    peers: Mutex<HashSet<PublicKey>>,
    /// Changed by every new mark (not by a notice repeating one that is still on).
    noticed: watch::Sender<()>,
}

impl Unreachable {
    /// The peers of the map now: marks of others are forgotten, and none are taken.
    pub fn set_peers(&self, peers: &[PublicKey]) {
        let peers: HashSet<PublicKey> = peers.iter().copied().collect();
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(peer, _), _| peers.contains(peer));
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// `relay` said at `now` that `peer` has no session there (ignored unless `peer` is a
    /// peer of the map).
    pub fn mark(&self, peer: PublicKey, relay: &str, now: Instant) {
        if !self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&peer)
        {
            return;
        }
        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_MARKS {
            m.retain(|_, until| *until > now);
            if m.len() >= MAX_MARKS {
                return;
            }
        }
        let earlier = m.insert((peer, relay.to_string()), now + UNREACHABLE_FOR);
        drop(m);
        // A relay repeats its notice for every frame sent meanwhile: only the first one moves
        // the peer's frames elsewhere.
        if earlier.is_none_or(|until| until <= now) {
            self.noticed.send_replace(());
        }
    }

    /// Changes with every new mark (a peer's frames go through another relay from then on).
    #[must_use]
    pub fn noticed(&self) -> watch::Receiver<()> {
        self.noticed.subscribe()
    }

    /// When the next mark wears off after `now` (its peer's frames go back to that relay);
    /// marks that wore off by `now` are forgotten.
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, until| *until > now);
        m.values().min().copied()
    }

    /// Whether `relay` said lately that `peer` is not there.
    #[must_use]
    pub fn is_marked(&self, peer: &PublicKey, relay: &str, now: Instant) -> bool {
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(*peer, relay.to_string()))
            .is_some_and(|until| *until > now)
    }
}

/// Something named after its relay.
pub trait Named {
    /// The relay's name.
    fn name(&self) -> &str;
}

impl Named for HomeLink {
    fn name(&self) -> &str {
        &self.name
    }
}

/// The first of `links` (in order of preference) not marked unreachable for `peer` at `now`.
pub fn pick<'a, T: Named>(
    links: &'a [T],
    unreachable: &Unreachable,
    peer: &PublicKey,
    now: Instant,
) -> Option<&'a T> {
    links
        .iter()
        .find(|l| !unreachable.is_marked(peer, l.name(), now))
}

/// The standalone relays: sessions, the home, and what status shows.
#[derive(Debug)]
pub struct Relays {
    home: watch::Sender<Option<HomeLink>>,
    links: watch::Sender<Vec<HomeLink>>,
    unreachable: Arc<Unreachable>,
    status: Mutex<Vec<RelayStatus>>,
}

impl Relays {
    /// No relays yet.
    #[must_use]
    pub fn new() -> Self {
        Self {
            home: watch::channel(None).0,
            links: watch::channel(Vec::new()).0,
            unreachable: Arc::new(Unreachable::default()),
            status: Mutex::new(Vec::new()),
        }
    }

    /// The relays to send through, in order of preference: the home, then the other relays
    /// up for [`super::home::SETTLE`], nearest first.
    #[must_use]
    pub fn links(&self) -> watch::Receiver<Vec<HomeLink>> {
        self.links.subscribe()
    }

    /// What relays said of peers not there.
    #[must_use]
    pub fn unreachable(&self) -> Arc<Unreachable> {
        self.unreachable.clone()
    }

    /// The home's session, while there is one.
    #[must_use]
    pub fn home(&self) -> watch::Receiver<Option<HomeLink>> {
        self.home.subscribe()
    }

    /// The relays as status shows them.
    #[must_use]
    pub fn status(&self) -> Vec<RelayStatus> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The relays to send through now, the home first ([`Relays::links`], [`Relays::home`]):
    /// their watchers are woken only when something changed, which may be the session alone
    /// (a renewed one) with the same relays.
    fn publish(&self, links: Vec<HomeLink>) {
        let home = links.first().cloned();
        self.home.send_if_modified(|h| {
            let same = match (&*h, &home) {
                (None, None) => true,
                (Some(a), Some(b)) => same_link(a, b),
                _ => false,
            };
            if !same {
                *h = home;
            }
            !same
        });
        self.links.send_if_modified(|l| {
            let same = l.len() == links.len() && l.iter().zip(&links).all(|(a, b)| same_link(a, b));
            if !same {
                *l = links;
            }
            !same
        });
    }

    /// Sets the relays to send through, the home first, as the session manager would.
    #[cfg(test)]
    pub(crate) fn set_links(&self, links: Vec<HomeLink>) {
        self.publish(links);
    }

    /// Keeps sessions with the relays of the newest grant in `grants`, puts what they deliver
    /// in `inbound`, and the home in [`Relays::home`]. Runs until `grants`' sender is gone.
    pub async fn run(
        self: Arc<Self>,
        mut grants: watch::Receiver<Option<Grant>>,
        inbound: mpsc::Sender<Vec<u8>>,
    ) {
        let (events_tx, mut events) = mpsc::channel::<Event>(64);
        let mut tasks: HashMap<RelayInfo, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut up: HashMap<String, Up> = HashMap::new();
        let mut listed: Vec<RelayInfo> = Vec::new();
        let mut choice = HomeChoice::new();
        let mut tick = tokio::time::interval(CHOOSE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = grants.changed() => {
                    if r.is_err() {
                        break;
                    }
                    let relays = grants.borrow_and_update().as_ref().map(|g| g.relays.clone()).unwrap_or_default();
                    if relays != listed {
                        tasks.retain(|info, task| {
                            let keep = relays.contains(info);
                            if !keep {
                                task.abort();
                                up.remove(&info.name);
                            }
                            keep
                        });
                        for info in &relays {
                            tasks.entry(info.clone()).or_insert_with(|| {
                                tokio::spawn(session(info.clone(), grants.clone(), events_tx.clone(), Inbound { tx: inbound.clone(), unreachable: self.unreachable.clone() }))
                            });
                        }
                        info!(relays = ?relays.iter().map(|r| &r.name).collect::<Vec<_>>(), "standalone relays granted");
                        listed = relays;
                    }
                }
                Some(e) = events.recv() => match e {
                    Event::Up(name, mut u) => {
                        if let Some(old) = up.get(&name) {
                            u.since = old.since;
                        }
                        up.insert(name, u);
                    }
                    Event::Down(name) => { up.remove(&name); }
                },
                _ = tick.tick() => {}
            }
            // QUIC's round-trip estimate, fresh from the keepalives.
            for u in up.values_mut() {
                if let Some(q) = &u.quic {
                    u.rtt = q.rtt();
                }
            }
            let candidates: Vec<Candidate<'_>> = up
                .iter()
                .map(|(name, u)| Candidate {
                    name,
                    rtt: Some(u.rtt),
                    since: u.since,
                })
                .collect();
            let changed = choice.update(&candidates, Instant::now());
            let home = choice.home().and_then(|name| {
                up.get(name).map(|u| HomeLink {
                    name: name.to_string(),
                    conn: u.conn.clone(),
                    remote: u.remote,
                    transport: u.transport,
                })
            });
            if changed {
                info!(home = ?choice.home(), "home relay");
            }
            // The others after the home, nearest first, once settled as a home would be.
            let now = Instant::now();
            let mut others: Vec<(&String, &Up)> = up
                .iter()
                .filter(|(name, u)| {
                    Some(name.as_str()) != choice.home()
                        && now.saturating_duration_since(u.since) >= super::home::SETTLE
                })
                .collect();
            others.sort_by(|a, b| a.1.rtt.cmp(&b.1.rtt).then_with(|| a.0.cmp(b.0)));
            let links: Vec<HomeLink> = home
                .iter()
                .cloned()
                .chain(others.into_iter().map(|(name, u)| HomeLink {
                    name: name.clone(),
                    conn: u.conn.clone(),
                    remote: u.remote,
                    transport: u.transport,
                }))
                .collect();
            self.publish(links);
            let status = listed
                .iter()
                .map(|info| {
                    let u = up.get(&info.name);
                    RelayStatus {
                        name: info.name.clone(),
                        region: info.region.clone(),
                        provider: info.provider.clone(),
                        addr: info.addr.clone(),
                        up: u.is_some(),
                        over: u.map(|u| u.transport),
                        rtt_ms: u.map(|u| u.rtt.as_secs_f64() * 1000.0),
                        home: choice.home() == Some(info.name.as_str()),
                    }
                })
                .collect();
            *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
        }
        for (_, t) in tasks {
            t.abort();
        }
    }
}

impl Default for Relays {
    fn default() -> Self {
        Self::new()
    }
}

fn same_link(a: &HomeLink, b: &HomeLink) -> bool {
    a.name == b.name && a.remote == b.remote && same_conn(&a.conn, &b.conn)
}

fn same_conn(a: &LinkConn, b: &LinkConn) -> bool {
    match (a, b) {
        (LinkConn::Quic(a), LinkConn::Quic(b)) => a.stable_id() == b.stable_id(),
        (LinkConn::Stream(a), LinkConn::Stream(b)) => a.same(b),
        _ => false,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a session is opened with: the ticket, the secret of its proof key, its expiry.
#[derive(Debug, Clone)]
struct Credentials {
    ticket: String,
    secret: ProofSecret,
    expires: u64,
}

impl Credentials {
    fn of(grant: &Grant) -> Self {
        Credentials {
            ticket: grant.ticket.clone(),
            secret: grant.proof_secret.clone(),
            expires: grant.expires,
        }
    }
}

/// The newest ticket of a grant that lists `info`; waits for one.
async fn ticket(
    info: &RelayInfo,
    grants: &mut watch::Receiver<Option<Grant>>,
) -> Option<Credentials> {
    loop {
        {
            let g = grants.borrow_and_update();
            if let Some(g) = g.as_ref() {
                if g.relays.contains(info) && g.expires > unix_now() {
                    return Some(Credentials::of(g));
                }
            }
        }
        grants.changed().await.ok()?;
    }
}

/// The hello of a connection whose TLS exporter value is `exporter`: the ticket, and the
/// exporter value signed with the ticket's proof key.
///
/// # Errors
/// When the grant carried no usable secret (an older coordinator's): the relay would refuse.
fn hello(creds: &Credentials, exporter: &[u8; EXPORTER_LEN]) -> Result<Vec<u8>, String> {
    let seed = creds
        .secret
        .seed()
        .ok_or("the grant carries no proof key secret (is the coordinator older?)")?;
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|e| format!("proof key: {e}"))?;
    let proof = pair.sign(&session_proof_message(exporter));
    Ok(encode(&RelayHello {
        protocol: RELAY_PROTOCOL,
        ticket: creds.ticket.clone(),
        proof: URL_SAFE_NO_PAD.encode(proof.as_ref()),
    }))
}

/// One open session: its link for the manager and what reads from it.
struct Open {
    up: Up,
    reader: Reader,
    /// Dropping it ends a QUIC session's stream (the relay takes that as the end).
    _keep: Option<(quinn::Endpoint, quinn::SendStream, quinn::RecvStream)>,
    expires: u64,
    /// The node key its ticket vouches for.
    key: Option<PublicKey>,
}

/// The node key a ticket vouches for (read, not verified: the relay verifies).
fn ticket_key(ticket: &str) -> Option<PublicKey> {
    Ticket::parse(ticket).ok().map(|t| t.body.key)
}

enum Reader {
    Quic(quinn::Connection),
    Tcp(ReadHalf<Tls>, Decoder),
}

/// What a session does next, given the time (Unix seconds), when it is due for renewal
/// ([`renew_at`]), its ticket's expiry, and the expiry of the newest ticket granted for its
/// relay. Pure, so that tests drive it through hours of tickets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Keep reading the session until `until`, or until a grant comes.
    Read {
        /// Unix seconds.
        until: u64,
    },
    /// Open a session with the newest ticket, then close this one (make before break).
    Renew,
    /// Its ticket expired with no newer one to renew with: the session is over (the relay
    /// ends it too), and datagrams go another way.
    Expired,
}

/// When a session opened at `opened` with a ticket expiring at `expires` is due for renewal: a
/// quarter of its remaining life early, at least [`RENEW_BEFORE`].
fn renew_at(opened: u64, expires: u64) -> u64 {
    let left = expires.saturating_sub(opened);
    expires.saturating_sub(RENEW_BEFORE.as_secs().max(left / 4))
}

/// See [`Step`]. Renewal needs a newer ticket: the same one again would open an identical
/// session, again and again, until it expired.
fn step(now: u64, renew_at: u64, expires: u64, newest: Option<u64>) -> Step {
    if now >= expires {
        Step::Expired
    } else if now < renew_at {
        Step::Read { until: renew_at }
    } else if newest.is_some_and(|n| n > expires) {
        Step::Renew
    } else {
        Step::Read { until: expires }
    }
}

/// How a session held by [`hold`] ended.
enum Held {
    /// The connection ended.
    Lost(String),
    /// The ticket expired with no newer one.
    Expired,
    /// A new session took over.
    Renewed(Box<Open>),
}

/// Waits until [`MIN_RECONNECT`] after the previous try (if any), and records this one.
async fn pace(last_try: &mut Option<tokio::time::Instant>) {
    if let Some(t) = *last_try {
        tokio::time::sleep_until(t + MIN_RECONNECT).await;
    }
    *last_try = Some(tokio::time::Instant::now());
}

/// Keeps a session with one relay (see the module documentation).
async fn session(
    info: RelayInfo,
    mut grants: watch::Receiver<Option<Grant>>,
    events: mpsc::Sender<Event>,
    inbound: Inbound,
) {
    // The control session's pauses: jittered, so that a fleet whose relay (a coordinator, say)
    // restarted does not come back in step.
    let mut pauses = Reconnect::new(ReconnectPolicy {
        max_backoff: MAX_BACKOFF,
        ..ReconnectPolicy::default()
    });
    let mut current: Option<Open> = None;
    let mut last_try = None;
    loop {
        let open = match current.take() {
            Some(o) => o,
            None => {
                let Some(creds) = ticket(&info, &mut grants).await else {
                    return;
                };
                pace(&mut last_try).await;
                match connect(&info, &creds).await {
                    Ok(o) => {
                        pauses.connected();
                        info!(relay = %info.name, over = ?o.up.transport, "relay session open");
                        o
                    }
                    Err(e) => {
                        debug!(relay = %info.name, "relay session failed: {e}");
                        let _ = events.send(Event::Down(info.name.clone())).await;
                        tokio::time::sleep(pauses.after_failure(false, fraction())).await;
                        continue;
                    }
                }
            }
        };
        let _ = events
            .send(Event::Up(info.name.clone(), clone_up(&open.up)))
            .await;
        let Open {
            up: _,
            mut reader,
            _keep,
            expires,
            key,
        } = open;
        let due = renew_at(unix_now(), expires);
        let held = hold(
            &info,
            &mut grants,
            &mut reader,
            &inbound,
            (due, expires, key),
            &mut last_try,
        )
        .await;
        match held {
            Held::Renewed(next) => current = Some(*next),
            Held::Lost(why) => {
                info!(relay = %info.name, "relay session lost: {why}");
                let _ = events.send(Event::Down(info.name.clone())).await;
                // Up to a second, at random (every peer of the mesh lost it at once).
                tokio::time::sleep(pauses.after_session(false, usize::MAX, fraction())).await;
            }
            Held::Expired => {
                info!(relay = %info.name, "relay ticket expired and no newer one was granted");
                let _ = events.send(Event::Down(info.name.clone())).await;
            }
        }
        drop(_keep);
    }
}

/// Delivers what the session `reader` reads until it ends, its ticket (`ticket`: when it is
/// due for renewal, its expiry, the key it vouches for) expires, or a new session takes over:
/// once due, with a newer ticket, or at once with a ticket for another key (the node rotated
/// its key: a session opened as the old key no longer receives what peers send to the new
/// one). A renewal that fails is tried again every [`RENEW_RETRY`], the old session read
/// meanwhile.
async fn hold(
    info: &RelayInfo,
    grants: &mut watch::Receiver<Option<Grant>>,
    reader: &mut Reader,
    inbound: &Inbound,
    ticket: (u64, u64, Option<PublicKey>),
    last_try: &mut Option<tokio::time::Instant>,
) -> Held {
    let (due, expires, key) = ticket;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let newest = grants
            .borrow_and_update()
            .as_ref()
            .filter(|g| g.relays.contains(info))
            .map(|g| (Credentials::of(g), ticket_key(&g.ticket)));
        let now = unix_now();
        let rotated = newest
            .as_ref()
            .is_some_and(|(c, k)| k.is_some() && *k != key && c.expires > now);
        let next = if rotated && now < expires {
            Step::Renew
        } else {
            step(now, due, expires, newest.as_ref().map(|(c, _)| c.expires))
        };
        let until = match next {
            Step::Expired => return Held::Expired,
            Step::Renew if retry_at.is_none_or(|t| t <= tokio::time::Instant::now()) => {
                let Some((creds, _)) = newest else {
                    return Held::Lost("no grant to renew with".into());
                };
                if rotated {
                    info!(relay = %info.name, "the node's key changed; a session for the new key");
                }
                let attempt = async {
                    pace(last_try).await;
                    connect(info, &creds).await
                };
                tokio::select! {
                    why = read_frames(reader, inbound, &info.name) => return Held::Lost(why),
                    r = attempt => match r {
                        Ok(n) => return Held::Renewed(Box::new(n)),
                        Err(e) => {
                            debug!(relay = %info.name, "relay session renewal failed: {e}");
                            retry_at = Some(tokio::time::Instant::now() + RENEW_RETRY);
                            continue;
                        }
                    },
                }
            }
            // A renewal failed lately: the next try, or the expiry if sooner.
            Step::Renew => expires,
            Step::Read { until } => until,
        };
        let mut wake = tokio::time::Instant::now()
            + Duration::from_secs(until.saturating_sub(unix_now()).max(1));
        if let Some(t) = retry_at {
            wake = wake.min(t);
        }
        tokio::select! {
            why = read_frames(reader, inbound, &info.name) => return Held::Lost(why),
            () = tokio::time::sleep_until(wake) => {}
            r = grants.changed() => {
                if r.is_err() {
                    return Held::Lost("no more grants".into());
                }
            }
        }
    }
}

fn clone_up(u: &Up) -> Up {
    Up {
        conn: u.conn.clone(),
        quic: u.quic.clone(),
        remote: u.remote,
        transport: u.transport,
        rtt: u.rtt,
        since: u.since,
    }
}

/// Where a session delivers what its relay sends: frames from peers to the relay client, the
/// relay's notices to the marks.
#[derive(Clone)]
struct Inbound {
    tx: mpsc::Sender<Vec<u8>>,
    unreachable: Arc<Unreachable>,
}

impl Inbound {
    /// One frame from relay `relay`.
    fn deliver(&self, relay: &str, frame: Vec<u8>) {
        if let Ok((h, payload)) = meshlink_proto::relay::parse(&frame) {
            if h.peer == meshlink_proto::relay::RELAY_SELF {
                // The relay's own word, never a peer's datagram: a notice, or nothing.
                if let Some(peer) = meshlink_proto::relay::parse_unreachable(payload) {
                    debug!(relay, peer = %peer.short(), "the relay does not have this peer");
                    self.unreachable.mark(peer, relay, Instant::now());
                }
                return;
            }
        }
        // A full inbox drops the frame (WireGuard retransmits what matters).
        let _ = self.tx.try_send(frame);
    }
}

/// Delivers what the relay sends until the session ends; why it ended.
async fn read_frames(reader: &mut Reader, inbound: &Inbound, relay: &str) -> String {
    match reader {
        Reader::Quic(conn) => loop {
            match conn.read_datagram().await {
                Ok(d) => inbound.deliver(relay, d.to_vec()),
                Err(e) => return e.to_string(),
            }
        },
        Reader::Tcp(read, decoder) => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                loop {
                    match decoder.decode_record::<serde_json::Value>() {
                        Ok(Some(Record::Relay(f))) => inbound.deliver(relay, f),
                        Ok(Some(Record::Message(_))) => return "a message from the relay".into(),
                        Ok(None) => break,
                        Err(e) => return e.to_string(),
                    }
                }
                match read.read(&mut buf).await {
                    Ok(0) => return "the relay closed".into(),
                    Ok(n) => {
                        if let Err(e) = decoder.push(&buf[..n]) {
                            return e.to_string();
                        }
                    }
                    Err(e) => return e.to_string(),
                }
            }
        }
    }
}

fn tls(pin: &str) -> Result<rustls::ClientConfig, String> {
    let mut c = meshlink_tls::rustls_client_config(pin).map_err(|e| e.to_string())?;
    c.alpn_protocols = vec![RELAY_ALPN.to_vec()];
    Ok(c)
}

/// Opens a session with `info` and says hello with `creds`: QUIC, or TLS/TCP when QUIC is not
/// up within [`TCP_AFTER`].
async fn connect(info: &RelayInfo, creds: &Credentials) -> Result<Open, String> {
    let target = tokio::net::lookup_host(&info.addr)
        .await
        .map_err(|e| format!("{}: {e}", info.addr))?
        .next()
        .ok_or_else(|| format!("{}: no address", info.addr))?;
    let key = ticket_key(&creds.ticket);
    let quic = tokio::time::timeout(TCP_AFTER, open_quic(info, target, creds)).await;
    let quic_err = match quic {
        Ok(Ok(o)) => return Ok(Open { key, ..o }),
        Ok(Err(e)) => e,
        Err(_) => "timed out".into(),
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, open_tcp(info, target, creds)).await {
        Ok(Ok(o)) => Ok(Open { key, ..o }),
        Ok(Err(e)) => Err(format!("QUIC: {quic_err}; TCP: {e}")),
        Err(_) => Err(format!("QUIC: {quic_err}; TCP: timed out")),
    }
}

async fn answer<R: tokio::io::AsyncRead + Unpin>(
    read: &mut R,
    decoder: &mut Decoder,
) -> Result<(), String> {
    let mut buf = [0u8; 2048];
    loop {
        match decoder.decode::<RelayAnswer>().map_err(|e| e.to_string())? {
            Some(RelayAnswer::Accepted { .. }) => return Ok(()),
            Some(RelayAnswer::Refused { reason }) => return Err(format!("refused: {reason}")),
            None => {}
        }
        let n = read.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before answering".into());
        }
        decoder.push(&buf[..n]).map_err(|e| e.to_string())?;
    }
}

async fn open_quic(
    info: &RelayInfo,
    target: SocketAddr,
    creds: &Credentials,
) -> Result<Open, String> {
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls(&info.fingerprint)?)
        .map_err(|e| e.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEPALIVE));
    transport.initial_rtt(Duration::from_millis(100));
    transport.max_idle_timeout(Some(IDLE.try_into().map_err(|e| format!("{e}"))?));
    config.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(target, RELAY_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let mut exporter = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .map_err(|_| "no TLS exporter".to_string())?;
    let hello = hello(creds, &exporter)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&hello).await.map_err(|e| e.to_string())?;
    let mut decoder = Decoder::new(MAX_RELAY_MESSAGE);
    answer(&mut recv, &mut decoder).await?;
    Ok(Open {
        up: Up {
            conn: LinkConn::Quic(conn.clone()),
            quic: Some(conn.clone()),
            remote: target,
            transport: RelayTransport::Udp,
            rtt: conn.rtt(),
            since: Instant::now(),
        },
        reader: Reader::Quic(conn),
        _keep: Some((endpoint, send, recv)),
        expires: creds.expires,
        key: None,
    })
}

async fn open_tcp(
    info: &RelayInfo,
    target: SocketAddr,
    creds: &Credentials,
) -> Result<Open, String> {
    let mut tls = tls_over_tcp(
        target,
        tls(&info.fingerprint)?,
        RELAY_SERVER_NAME,
        KEEPALIVE,
        IDLE,
    )
    .await?;
    let exporter = tls
        .get_ref()
        .1
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, Some(b"".as_slice()))
        .map_err(|e| e.to_string())?;
    let hello = hello(creds, &exporter)?;
    let sent = Instant::now();
    tls.write_all(&hello).await.map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    let mut decoder = Decoder::new(MAX_RELAY_MESSAGE);
    answer(&mut tls, &mut decoder).await?;
    let rtt = sent.elapsed();
    let (read, write) = tokio::io::split(tls);
    Ok(Open {
        up: Up {
            conn: LinkConn::Stream(StreamWriter::new(write)),
            quic: None,
            remote: target,
            transport: RelayTransport::Tcp,
            rtt,
            since: Instant::now(),
        },
        reader: Reader::Tcp(read, decoder),
        _keep: None,
        expires: creds.expires,
        key: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Named for &str {
        fn name(&self) -> &str {
            self
        }
    }

    #[test]
    fn a_peer_a_relay_lacks_goes_through_the_next_for_a_while() {
        let u = Unreachable::default();
        let t0 = Instant::now();
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        u.set_peers(&[a, b]);
        let links = ["home", "next"];
        assert_eq!(pick(&links, &u, &a, t0), Some(&"home"));
        u.mark(a, "home", t0);
        assert_eq!(pick(&links, &u, &a, t0), Some(&"next"));
        assert_eq!(pick(&links, &u, &b, t0), Some(&"home"), "other peers stay");
        u.mark(a, "next", t0);
        assert_eq!(
            pick(&links, &u, &a, t0),
            None,
            "the coordinator's relay then"
        );
        // The notice wears off: the home is tried again.
        assert_eq!(pick(&links, &u, &a, t0 + UNREACHABLE_FOR), Some(&"home"));
    }

    /// A first notice is told (the peer's frames move), one repeating it while it is on is
    /// not; the next wearing off is known ahead, and worn-off marks are forgotten.
    #[test]
    fn new_notices_are_told_and_their_wearing_off_known() {
        let u = Unreachable::default();
        let mut noticed = u.noticed();
        let t0 = Instant::now();
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        u.set_peers(&[a, b]);
        assert_eq!(u.next_expiry(t0), None);
        u.mark(a, "home", t0);
        assert!(noticed.has_changed().unwrap(), "a new notice is told");
        noticed.mark_unchanged();
        let later = t0 + Duration::from_secs(5);
        u.mark(a, "home", later);
        assert!(!noticed.has_changed().unwrap(), "a repeated one is not");
        u.mark(b, "next", t0 + Duration::from_secs(2));
        assert!(noticed.has_changed().unwrap(), "another pair is new");
        noticed.mark_unchanged();
        // The repeat kept a's mark on longer: b's wears off first.
        assert_eq!(
            u.next_expiry(later),
            Some(t0 + Duration::from_secs(2) + UNREACHABLE_FOR)
        );
        assert_eq!(u.next_expiry(later + UNREACHABLE_FOR), None);
        assert!(u.marks.lock().unwrap().is_empty(), "worn off: forgotten");
        // Once worn off, a notice is new again; a stranger's never is.
        u.mark(a, "home", later + UNREACHABLE_FOR);
        assert!(noticed.has_changed().unwrap());
        noticed.mark_unchanged();
        u.mark(PublicKey([3; 32]), "home", later + UNREACHABLE_FOR);
        assert!(!noticed.has_changed().unwrap());
    }

    #[test]
    fn notices_are_bounded() {
        let u = Unreachable::default();
        let t0 = Instant::now();
        let keys: Vec<PublicKey> = (0..(MAX_MARKS + 100))
            .map(|i| {
                let mut k = [0u8; 32];
                k[..8].copy_from_slice(&(i as u64).to_le_bytes());
                PublicKey(k)
            })
            .chain([PublicKey([9; 32])])
            .collect();
        u.set_peers(&keys);
        for k in &keys[..MAX_MARKS + 100] {
            u.mark(*k, "r", t0);
        }
        assert_eq!(u.marks.lock().unwrap().len(), MAX_MARKS);
        // Once expired, room again.
        u.mark(PublicKey([9; 32]), "r", t0 + UNREACHABLE_FOR);
        assert_eq!(u.marks.lock().unwrap().len(), 1);
    }

    /// Notices naming keys that are no peers take no room; a peer that left the map loses
    /// its marks.
    #[test]
    fn only_peers_of_the_map_are_marked() {
        let u = Unreachable::default();
        let t0 = Instant::now();
        let (peer, stranger) = (PublicKey([1; 32]), PublicKey([2; 32]));
        u.set_peers(&[peer]);
        u.mark(stranger, "r", t0);
        assert!(!u.is_marked(&stranger, "r", t0));
        assert!(u.marks.lock().unwrap().is_empty());
        u.mark(peer, "r", t0);
        assert!(u.is_marked(&peer, "r", t0));
        u.set_peers(&[stranger]);
        assert!(!u.is_marked(&peer, "r", t0), "forgotten with the peer");
    }

    /// A hello carries the ticket and a proof that only the grant's secret makes, over this
    /// connection's exporter value only; without a secret there is no hello to send.
    #[test]
    fn a_hello_proves_the_ticket_key_over_its_connection() {
        use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
        let seed = [3u8; 32];
        let creds = Credentials {
            ticket: "t.s".into(),
            secret: ProofSecret::from_seed(&seed),
            expires: 1,
        };
        let exporter = [9u8; EXPORTER_LEN];
        let mut d = Decoder::new(MAX_RELAY_MESSAGE);
        d.push(&hello(&creds, &exporter).unwrap()).unwrap();
        let h: RelayHello = d.decode().unwrap().unwrap();
        assert_eq!((h.protocol, h.ticket.as_str()), (RELAY_PROTOCOL, "t.s"));
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        let key = UnparsedPublicKey::new(&ED25519, pair.public_key().as_ref().to_vec());
        let proof = URL_SAFE_NO_PAD.decode(&h.proof).unwrap();
        assert!(key
            .verify(&session_proof_message(&exporter), &proof)
            .is_ok());
        assert!(key
            .verify(&session_proof_message(&[8; EXPORTER_LEN]), &proof)
            .is_err());
        let none = Credentials {
            secret: ProofSecret::default(),
            ..creds
        };
        assert!(hello(&none, &exporter).is_err());
    }

    /// Renewal needs a newer ticket: with the same one the session is read until it expires
    /// (before, the last 30 s of every ticket were a loop of new sessions), then it is over.
    #[test]
    fn a_session_renews_only_with_a_newer_ticket_and_ends_at_expiry() {
        assert_eq!(renew_at(0, 600), 450, "a quarter of its life early");
        assert_eq!(renew_at(580, 600), 570, "at least RENEW_BEFORE");
        // Not yet due, whatever was granted.
        assert_eq!(step(100, 450, 600, Some(900)), Step::Read { until: 450 });
        // Due, with a newer ticket: renewed.
        assert_eq!(step(450, 450, 600, Some(750)), Step::Renew);
        // Due, with the same ticket only (the last 30 s included): read on until the expiry.
        for now in [450, 575, 599] {
            assert_eq!(step(now, 450, 600, Some(600)), Step::Read { until: 600 });
            assert_eq!(step(now, 450, 600, None), Step::Read { until: 600 });
        }
        assert_eq!(step(600, 450, 600, Some(600)), Step::Expired);
        assert_eq!(
            step(601, 450, 600, Some(900)),
            Step::Expired,
            "too late to renew"
        );
    }

    /// Driven through time second by second: with grants every 150 s (tickets of 600 s) a
    /// session is renewed once per grant at most, never in a loop; once the coordinator is
    /// gone, the last ticket's session ends at its expiry.
    #[test]
    fn renewals_follow_the_grants_and_stop_at_the_last_expiry() {
        let ttl = 600;
        // Grants at 0, 150, ... until `last`; the session as (due, expires).
        let run = |last: u64, until: u64| {
            let newest = |now: u64| Some((now.min(last) / 150) * 150 + ttl);
            let (mut due, mut expires) = (renew_at(0, ttl), ttl);
            let (mut renewals, mut ended) = (Vec::new(), None);
            for now in 0..until {
                match step(now, due, expires, newest(now)) {
                    Step::Read { until } => assert!(until > now),
                    Step::Renew => {
                        renewals.push(now);
                        expires = newest(now).unwrap();
                        due = renew_at(now, expires);
                        assert_eq!(
                            step(now, due, expires, newest(now)),
                            Step::Read { until: due }
                        );
                    }
                    Step::Expired => {
                        ended = Some(now);
                        break;
                    }
                }
            }
            (renewals, ended)
        };
        let (renewals, ended) = run(u64::MAX, 3600);
        assert_eq!(ended, None);
        assert_eq!(renewals.len(), 7, "{renewals:?}");
        assert!(
            renewals.windows(2).all(|w| w[1] - w[0] >= 300),
            "{renewals:?}"
        );
        // The coordinator's last grant at 150 (expires 750).
        let (renewals, ended) = run(150, 3600);
        assert_eq!(renewals, [450]);
        assert_eq!(ended, Some(750));
    }
}
