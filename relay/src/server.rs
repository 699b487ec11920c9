//! The standalone relay: agents' sessions over QUIC (frames as datagrams) and TLS over TCP
//! (frames as relay records of the stream) on one address, each opened with a ticket
//! ([`crate::ticket`]) and then forwarded by the same [`Relay`] as the coordinator's.
//!
//! Pipeline of a session:
//!
//! ```text
//! admitted (at most max_sessions at once, of them max_unauthenticated before their hello and
//!   max_unauthenticated_per_ip from one source: crate::admission; else refused at once)
//!   ─> TLS 1.3 handshake, ALPN meshlink-relay/1     within hello_timeout, with the hello
//!   ─> RelayHello (one control-framed message, at most MAX_RELAY_MESSAGE bytes)
//!   ─> Verifier::verify(ticket, now)                refused: RelayAnswer::Refused, close
//!   ─> check_proof(ticket, this connection's TLS exporter value, proof)
//!                                                   refused: a replayed or foreign ticket
//!   ─> at most max_sessions_per_ip sessions from one source  refused: RelayAnswer::Refused
//!   ─> route for (key, network) (at most 2 sessions each: a third closes the oldest; one
//!      byte cap for the node's sessions), RelayAnswer::Accepted { expires }
//!   ─> loop: frames from the agent ─> Relay::forward (rate cap, network, queue caps); one for
//!            a node with no session here draws a notice back (relay_one, capped)
//!            frames for the agent (a QUIC datagram, or records the writer batches)
//!      until the agent closes, the connection dies, the ticket expires (the agent opens
//!      a new session with a fresh ticket before that), or two newer sessions of the node
//!      displaced it
//! ```
//!
//! Refusals and ends are typed ([`crate::outcome`]) and counted once, where they are decided;
//! with the forwarding core's and the admission caps' counters they are what `--metrics-listen`
//! serves ([`crate::metrics`]).
//!
//! # Security
//! No open relay: frames are read only after a ticket signed by the mesh's coordinators was
//! verified and proved the presenter's own (the hello signs this connection's exporter value
//! with the ticket's proof key: a ticket seen elsewhere cannot be replayed here), and go only
//! to nodes of the ticket's network. Nothing before that is buffered
//! beyond one hello; every queue is bounded (quinn's datagram buffers, [`STREAM_SEND_BUFFER`]);
//! each node is capped in bytes per second, over all its sessions, of which it has at most
//! [`crate::forward::MAX_SESSIONS_PER_NODE`]; one source address holds at most
//! `max_sessions_per_ip` sessions, so neither many sessions of one node nor many nodes behind
//! one address can take the relay. The relay reads no plaintext: frames carry
//! WireGuard ciphertext.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshlink_proto::control::{encode, encode_relay, Decoder, Record, RELAY_RECORD};
use meshlink_proto::relay::{
    RelayAnswer, RelayHello, TicketBody, EXPORTER_LABEL, EXPORTER_LEN, MAX_RELAY_MESSAGE,
    RELAY_ALPN, RELAY_SERVER_NAME,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout_at;
use tracing::{debug, info, Instrument};

use crate::admission::{Admission, AfterHello, BeforeHello, Connections};
use crate::metrics::{Snapshot, SnapshotFn};
use crate::outcome::{HelloRefusal, Outcomes, SessionEnd};
use crate::ratelimit::TokenBucket;
use meshlink_proto::relay::unreachable_notice;

use crate::forward::{
    stream_link, Dropped, Link, Relay, SessionLink, StreamQueue, DATAGRAM_RECEIVE_BUFFER,
    DATAGRAM_SEND_BUFFER, STREAM_SEND_BUFFER,
};
use crate::ticket::Verifier;

/// Certificate file (PEM) in the state directory.
pub const CERT_FILE: &str = "relay.crt";
/// Private key file (PEM, 0600) in the state directory.
pub const KEY_FILE: &str = "relay.key";
/// The most bytes of relay records a TLS/TCP session writes at once.
const RELAY_BATCH: usize = 64 * 1024;

/// What the relay needs to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where QUIC (UDP) and TLS (TCP) listen.
    pub listen: SocketAddr,
    /// Where the relay's TLS identity lives (made on first start).
    pub state_dir: PathBuf,
    /// The coordinators' certificate (`coordinator.crt`): tickets are checked against its key.
    pub coordinator_cert: PathBuf,
    /// Bytes per second one node may send.
    pub rate: u64,
    /// Sessions at once (before and after their hello).
    pub max_sessions: usize,
    /// Of them, before their hello.
    pub max_unauthenticated: usize,
    /// Of those, from one source (an IPv4 address or an IPv6 /64).
    pub max_unauthenticated_per_ip: usize,
    /// Sessions after their hello from one source (an IPv4 address or an IPv6 /64).
    pub max_sessions_per_ip: usize,
    /// How long a new connection has for its handshake and hello.
    pub hello_timeout: Duration,
    /// A connection without a packet for this long is closed (QUIC idle timeout; TCP
    /// keepalives and `TCP_USER_TIMEOUT`).
    pub idle_timeout: Duration,
    /// Where the Prometheus metrics are served (`GET /metrics`, plain HTTP, no token:
    /// [`crate::metrics`]); `None`, the default: nowhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// Why the relay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file of the state directory or the coordinator certificate.
    #[error("{path}: {reason}")]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The coordinator certificate cannot check tickets.
    #[error(transparent)]
    Certificate(#[from] crate::ticket::KeyError),
    /// TLS or QUIC configuration.
    #[error("TLS: {0}")]
    Tls(String),
    /// A listener cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metrics listener cannot be bound.
    #[error("cannot listen on {addr} (--metrics-listen): {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The relay's TLS identity: its certificate (agents pin its SHA-256) and key.
pub struct Identity {
    /// The self-signed certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Its key.
    pub key: PrivateKeyDer<'static>,
    /// Lowercase hex SHA-256 of `cert`: what `[[relays]]` entries name as `fingerprint`.
    pub fingerprint: String,
    /// Whether this call made it.
    pub created: bool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Loads the identity from `dir`, or makes one (ECDSA P-256, self-signed, SAN
/// [`RELAY_SERVER_NAME`]) when neither file exists. The directory is made 0700, the key 0600;
/// a key that group or others may read is refused.
///
/// # Errors
/// [`StartError::File`]; also when only one of the two files exists.
pub fn load_or_create_identity(dir: &Path) -> Result<Identity, StartError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |path: &Path, reason: String| StartError::File {
        path: path.to_path_buf(),
        reason,
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| fail(dir, e.to_string()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(dir, e.to_string()))?;
    }
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let created = match (cert_path.exists(), key_path.exists()) {
        (false, false) => {
            let make = || -> Result<(String, String), rcgen::Error> {
                let key = rcgen::KeyPair::generate()?;
                let mut params =
                    rcgen::CertificateParams::new(vec![RELAY_SERVER_NAME.to_string()])?;
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, RELAY_SERVER_NAME);
                Ok((params.self_signed(&key)?.pem(), key.serialize_pem()))
            };
            let (cert_pem, key_pem) = make().map_err(|e| fail(dir, e.to_string()))?;
            let write = |path: &Path, bytes: &[u8], mode: u32| -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(path)?;
                std::io::Write::write_all(&mut f, bytes)?;
                f.sync_all()
            };
            write(&key_path, key_pem.as_bytes(), 0o600)
                .map_err(|e| fail(&key_path, e.to_string()))?;
            write(&cert_path, cert_pem.as_bytes(), 0o644)
                .map_err(|e| fail(&cert_path, e.to_string()))?;
            true
        }
        (true, true) => false,
        (cert, _) => {
            let missing = if cert { &key_path } else { &cert_path };
            return Err(fail(
                missing,
                "missing while the other half of the identity exists; restore it \
                 (a new identity changes the fingerprint every coordinator lists)"
                    .into(),
            ));
        }
    };
    let mode = std::fs::metadata(&key_path)
        .map_err(|e| fail(&key_path, e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(fail(
            &key_path,
            format!(
                "mode {:o}: the key must not be readable by group or others (chmod 600)",
                mode & 0o777
            ),
        ));
    }
    let cert =
        CertificateDer::from_pem_file(&cert_path).map_err(|e| fail(&cert_path, e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_file(&key_path).map_err(|e| fail(&key_path, e.to_string()))?;
    Ok(Identity {
        fingerprint: meshlink_tls::fingerprint(&cert),
        cert,
        key,
        created,
    })
}

/// The TLS configuration of both transports: TLS 1.3 only, ring, ALPN [`RELAY_ALPN`].
fn tls_config(identity: &Identity) -> Result<rustls::ServerConfig, StartError> {
    meshlink_tls::server_config(identity.cert.clone(), identity.key.clone_key(), RELAY_ALPN)
        .map_err(|e| StartError::Tls(e.to_string()))
}

/// A running relay: its addresses, counters and stop switch.
pub struct Running {
    /// Where it listens (QUIC and TCP).
    pub addr: SocketAddr,
    /// Where its metrics are served, when they are.
    pub metrics_addr: Option<SocketAddr>,
    /// Its certificate's fingerprint (what `[[relays]]` entries name).
    pub fingerprint: String,
    /// Its forwarding core (counters, routes).
    pub relay: Arc<Relay>,
    snapshot: SnapshotFn,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Every counter now: what the metrics show.
    pub fn snapshot(&self) -> Snapshot {
        (self.snapshot)()
    }

    /// What reads every counter, for a task of its own.
    pub fn counters(&self) -> SnapshotFn {
        self.snapshot.clone()
    }

    /// Stops accepting and ends every session.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What each session shares.
struct Shared {
    relay: Arc<Relay>,
    verifier: Verifier,
    serial: AtomicU64,
    outcomes: Outcomes,
    connections: Connections,
    hello_timeout: Duration,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// Counts and logs how a session ended, whatever its transport.
    fn session_ended(&self, node: u64, why: &SessionEnd) {
        self.outcomes.ended(why);
        info!(node, reason = why.reason(), "session closed: {why}");
    }
}

impl Shared {
    /// Every counter now.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            relay: self.relay.stats(),
            sessions: self.relay.sessions_by_transport(),
            nodes: self.relay.routes(),
            connections: self.connections.open(),
            before_hello: self.connections.unauthenticated(),
            refused: self.connections.refused(),
            outcomes: self.outcomes.counts(),
        }
    }
}

/// Binds both listeners and starts serving.
///
/// # Errors
/// [`StartError`].
pub async fn start(settings: &Settings) -> Result<Running, StartError> {
    let identity = load_or_create_identity(&settings.state_dir)?;
    let verifier = Verifier::from_pem_file(&settings.coordinator_cert)?;
    let tls = tls_config(&identity)?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls.clone())
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_SEND_BUFFER)
        .keep_alive_interval(Some(settings.idle_timeout / 3))
        .max_idle_timeout(settings.idle_timeout.try_into().ok());
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    let bind = |source| StartError::Bind {
        addr: settings.listen,
        source,
    };
    let endpoint = quinn::Endpoint::server(config, settings.listen).map_err(bind)?;
    let addr = endpoint.local_addr().map_err(bind)?;
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let metrics = match settings.metrics_listen {
        Some(at) => {
            let fail = |source| StartError::Metrics { addr: at, source };
            let listener = TcpListener::bind(at).await.map_err(fail)?;
            let bound = listener.local_addr().map_err(fail)?;
            Some((listener, bound))
        }
        None => None,
    };
    let relay = Arc::new(Relay::new(settings.rate));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        relay: relay.clone(),
        verifier,
        serial: AtomicU64::new(0),
        outcomes: Outcomes::default(),
        connections: Connections::new(
            settings.max_sessions,
            settings.max_unauthenticated,
            settings.max_unauthenticated_per_ip,
        )
        .with_max_sessions_per_source(settings.max_sessions_per_ip),
        hello_timeout: settings.hello_timeout,
        shutdown: shutdown_rx.clone(),
    });
    info!(
        %addr,
        fingerprint = %identity.fingerprint,
        coordinator = %shared.verifier.fingerprint(),
        "relay listening (QUIC and TLS/TCP)"
    );
    let snapshot: SnapshotFn = {
        let shared = shared.clone();
        Arc::new(move || shared.snapshot())
    };
    let mut tasks = JoinSet::new();
    let metrics_addr = metrics.map(|(listener, bound)| {
        info!(addr = %bound, "metrics at http://{bound}/metrics");
        tasks.spawn(crate::metrics::serve(
            listener,
            snapshot.clone(),
            shutdown_rx,
        ));
        bound
    });
    tasks.spawn(accept_quic(endpoint, shared.clone()));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tasks.spawn(accept_tcp(tcp, acceptor, shared, settings.idle_timeout));
    Ok(Running {
        addr,
        metrics_addr,
        fingerprint: identity.fingerprint.clone(),
        relay,
        snapshot,
        shutdown,
        tasks,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn accept_quic(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut sessions = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = shutdown.changed() => break,
        };
        while sessions.try_join_next().is_some() {}
        // A source proves its address before it costs a handshake.
        if !incoming.remote_address_validated() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        let Ok(admission) = shared.connections.admit(incoming.remote_address().ip()) else {
            incoming.refuse();
            continue;
        };
        let span =
            tracing::info_span!("session", remote = %incoming.remote_address(), transport = "quic");
        sessions.spawn(quic_session(incoming, shared.clone(), admission).instrument(span));
    }
    endpoint.close(0u32.into(), b"relay shutting down");
    sessions.abort_all();
}

async fn accept_tcp(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    idle: Duration,
) {
    let mut shutdown = shared.shutdown.clone();
    let mut sessions = JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    debug!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        while sessions.try_join_next().is_some() {}
        let Ok(admission) = shared.connections.admit(remote.ip()) else {
            continue;
        };
        let span = tracing::info_span!("session", %remote, transport = "tls");
        sessions.spawn(
            tcp_session(stream, acceptor.clone(), shared.clone(), idle, admission).instrument(span),
        );
    }
    sessions.abort_all();
}

/// Reads the hello from `read` by `deadline` and checks its ticket, and that the ticket is
/// proved over this connection, whose TLS exporter value is `exporter`.
async fn hello<R: AsyncRead + Unpin>(
    read: &mut R,
    decoder: &mut Decoder,
    shared: &Shared,
    exporter: &[u8; EXPORTER_LEN],
    deadline: tokio::time::Instant,
) -> Result<Result<TicketBody, HelloRefusal>, &'static str> {
    let mut buf = [0u8; 4096];
    // The first record's length prefix: a relay record there is refused at once, so that
    // nothing beyond one hello (MAX_RELAY_MESSAGE) is buffered before it is verified.
    let mut prefix = [0u8; 4];
    let mut seen = 0;
    let hello = loop {
        match decoder.decode::<RelayHello>() {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(_) => return Err("malformed hello"),
        }
        match timeout_at(deadline, read.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err("closed before its hello"),
            Err(_) => return Err("no hello in time"),
            Ok(Ok(n)) => {
                if seen < prefix.len() {
                    let take = (prefix.len() - seen).min(n);
                    prefix[seen..seen + take].copy_from_slice(&buf[..take]);
                    seen += take;
                    if seen == prefix.len() && u32::from_be_bytes(prefix) & RELAY_RECORD != 0 {
                        return Err("a relay record before the hello");
                    }
                }
                decoder.push(&buf[..n]).map_err(|_| "oversized hello")?;
            }
        }
    };
    if hello.protocol != meshlink_proto::relay::RELAY_PROTOCOL {
        return Ok(Err(HelloRefusal::Protocol(hello.protocol)));
    }
    Ok(shared
        .verifier
        .verify(&hello.ticket, unix_now())
        .and_then(|body| {
            crate::ticket::check_proof(&body, exporter, &hello.proof)?;
            Ok(body)
        })
        .map_err(HelloRefusal::from))
}

/// A verified hello takes its place among its source's sessions, or is refused.
fn accept(
    verdict: Result<TicketBody, HelloRefusal>,
    before_hello: BeforeHello,
) -> (Result<TicketBody, HelloRefusal>, Option<AfterHello>) {
    match verdict {
        Ok(body) => match before_hello.accept() {
            Ok(after) => (Ok(body), Some(after)),
            // The one cap after the hello: max_sessions_per_ip.
            Err(_) => (Err(HelloRefusal::SessionsPerSource), None),
        },
        Err(e) => (Err(e), None),
    }
}

/// Writes the answer; the accepted ticket's body once the answer is written (the hello
/// counted as accepted), or `None` when refused (counted, logged) or unwritten.
async fn answer<W: AsyncWrite + Unpin>(
    write: &mut W,
    verdict: Result<TicketBody, HelloRefusal>,
    shared: &Shared,
) -> Option<TicketBody> {
    let (msg, body) = match verdict {
        Ok(body) => (
            RelayAnswer::Accepted {
                expires: body.expires,
            },
            Some(body),
        ),
        Err(why) => {
            shared.outcomes.refused(&why);
            info!(reason = why.reason(), "hello refused: {why}");
            (
                RelayAnswer::Refused {
                    reason: why.to_string(),
                },
                None,
            )
        }
    };
    let written = async {
        write.write_all(&encode(&msg)).await?;
        write.flush().await
    };
    match tokio::time::timeout(Duration::from_secs(5), written).await {
        Ok(Ok(())) => {
            if body.is_some() {
                shared.outcomes.accepted();
            }
            body
        }
        _ => None,
    }
}

/// When the session of a ticket expiring at `expires` (Unix seconds) must end.
fn expiry(expires: u64) -> tokio::time::Instant {
    let left = expires
        .saturating_add(crate::ticket::CLOCK_SKEW)
        .saturating_sub(unix_now());
    tokio::time::Instant::now() + Duration::from_secs(left)
}

async fn quic_session(incoming: quinn::Incoming, shared: Arc<Shared>, admission: Admission) {
    let shared = &*shared;
    let Admission {
        slot: _slot,
        before_hello,
    } = admission;
    let deadline = tokio::time::Instant::now() + shared.hello_timeout;
    let Ok(connecting) = incoming.accept() else {
        return;
    };
    let conn = match timeout_at(deadline, connecting).await {
        Ok(Ok(c)) => c,
        _ => return,
    };
    let (mut send, mut recv) = match timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => return,
    };
    let mut exporter = [0u8; EXPORTER_LEN];
    if conn
        .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .is_err()
    {
        conn.close(1u32.into(), b"no exporter");
        return;
    }
    let mut decoder = Decoder::new(MAX_RELAY_MESSAGE);
    // Datagrams before the hello are not read: quinn's bounded buffer drops them.
    let verdict = match hello(&mut recv, &mut decoder, shared, &exporter, deadline).await {
        Ok(v) => v,
        Err(why) => {
            debug!("{why}");
            conn.close(1u32.into(), why.as_bytes());
            return;
        }
    };
    // A node now: it no longer counts among the connections before their hello.
    let (verdict, _after_hello) = accept(verdict, before_hello);
    let Some(body) = answer(&mut send, verdict, shared).await else {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        conn.close(2u32.into(), b"refused");
        return;
    };
    let serial = shared.serial.fetch_add(1, Ordering::Relaxed);
    let route = shared.relay.register(
        body.key,
        &body.network,
        serial,
        SessionLink::Quic(conn.clone()),
    );
    let mut source = shared.relay.source(body.key, &body.network, Instant::now());
    let mut notices = Notices::new(SessionLink::Quic(conn.clone()));
    info!(node = body.node, network = %body.network, "session open");
    let ends = expiry(body.expires);
    let mut shutdown = shared.shutdown.clone();
    let mut rest = [0u8; 64];
    let why = loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(d) => {
                    // Dropped frames are counted by the relay; none is logged.
                    relay_one(shared, &mut source, &mut notices, d.to_vec());
                }
                Err(
                    quinn::ConnectionError::ApplicationClosed(_)
                    | quinn::ConnectionError::ConnectionClosed(_),
                ) => break SessionEnd::AgentClosed,
                Err(e) => break SessionEnd::ConnectionLost(e.to_string()),
            },
            // The agent says nothing more on the stream; its end is the session's.
            r = recv.read(&mut rest) => match r {
                Ok(Some(_)) => break SessionEnd::ProtocolError("a message after the hello"),
                _ => break SessionEnd::AgentClosed,
            },
            () = tokio::time::sleep_until(ends) => break SessionEnd::TicketExpired,
            () = route.displaced() => break SessionEnd::Displaced,
            _ = shutdown.changed() => break SessionEnd::Shutdown,
        }
    };
    shared.session_ended(body.node, &why);
    conn.close(0u32.into(), b"done");
}

async fn tcp_session(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    idle: Duration,
    admission: Admission,
) {
    let shared = &*shared;
    let Admission {
        slot: _slot,
        before_hello,
    } = admission;
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(&stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle / 3)
        .with_interval(idle / 3)
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(idle));
    let deadline = tokio::time::Instant::now() + shared.hello_timeout;
    let tls = match timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(t)) => t,
        _ => return,
    };
    if tls.get_ref().1.alpn_protocol() != Some(RELAY_ALPN) {
        return;
    }
    let Ok(exporter) = tls.get_ref().1.export_keying_material(
        [0u8; EXPORTER_LEN],
        EXPORTER_LABEL,
        Some(b"".as_slice()),
    ) else {
        return;
    };
    let (mut read, mut write) = tokio::io::split(tls);
    // Frames from the agent are whole WireGuard datagrams: records up to MAX_RELAY_RECORD.
    let mut decoder = Decoder::new(MAX_RELAY_MESSAGE);
    let verdict = match hello(&mut read, &mut decoder, shared, &exporter, deadline).await {
        Ok(v) => v,
        Err(why) => {
            debug!("{why}");
            return;
        }
    };
    let (verdict, _after_hello) = accept(verdict, before_hello);
    let Some(body) = answer(&mut write, verdict, shared).await else {
        let _ = write.shutdown().await;
        return;
    };
    let (link, mut queue) = stream_link();
    let mut notices = Notices::new(SessionLink::Stream(link.clone()));
    let serial = shared.serial.fetch_add(1, Ordering::Relaxed);
    let route = shared
        .relay
        .register(body.key, &body.network, serial, SessionLink::Stream(link));
    let mut source = shared.relay.source(body.key, &body.network, Instant::now());
    info!(node = body.node, network = %body.network, "session open");
    let ends = expiry(body.expires);
    let mut shutdown = shared.shutdown.clone();
    let mut buf = vec![0u8; 16 * 1024];
    // Frames that came with the hello.
    let mut first = drain(&mut decoder, shared, &mut source, &mut notices).err();
    let why = loop {
        if let Some(e) = first.take() {
            break SessionEnd::ProtocolError(e);
        }
        tokio::select! {
            r = read.read(&mut buf) => match r {
                Ok(0) | Err(_) => break SessionEnd::AgentClosed,
                Ok(n) => {
                    if decoder.push(&buf[..n]).is_err() {
                        break SessionEnd::ProtocolError("an oversized record");
                    }
                    if let Err(e) = drain(&mut decoder, shared, &mut source, &mut notices) {
                        break SessionEnd::ProtocolError(e);
                    }
                }
            },
            frame = queue_next(&mut queue) => {
                let batch = batch(frame, &mut queue);
                let w = async { write.write_all(&batch).await?; write.flush().await };
                if tokio::time::timeout(Duration::from_secs(10), w).await.map_or(true, |r| r.is_err()) {
                    break SessionEnd::Stalled;
                }
            },
            () = tokio::time::sleep_until(ends) => break SessionEnd::TicketExpired,
            () = route.displaced() => break SessionEnd::Displaced,
            _ = shutdown.changed() => break SessionEnd::Shutdown,
        }
    };
    shared.session_ended(body.node, &why);
    let _ = write.shutdown().await;
}

/// Forwards every whole relay record the decoder holds.
fn drain(
    decoder: &mut Decoder,
    shared: &Shared,
    source: &mut crate::forward::Source,
    notices: &mut Notices,
) -> Result<(), &'static str> {
    loop {
        match decoder.decode_record::<serde_json::Value>() {
            Ok(Some(Record::Relay(frame))) => relay_one(shared, source, notices, frame),
            Ok(Some(Record::Message(_))) => return Err("a message after the hello"),
            Ok(None) => return Ok(()),
            Err(_) => return Err("a malformed record"),
        }
    }
}

/// The most notices a session is sent per second (and at once).
pub const NOTICES_PER_SECOND: u32 = 20;

/// A session's notices back to its agent: where they go, and their cap.
struct Notices {
    link: SessionLink,
    bucket: TokenBucket,
}

impl Notices {
    fn new(link: SessionLink) -> Self {
        Notices {
            link,
            bucket: TokenBucket::new(NOTICES_PER_SECOND, NOTICES_PER_SECOND, Instant::now()),
        }
    }
}

/// Relays one frame from `source`; a frame for a node with no session here draws a notice
/// back ([`unreachable_notice`]), at most [`NOTICES_PER_SECOND`], so that the sender reaches
/// that peer another way. Drops are counted by the relay; none is logged.
fn relay_one(
    shared: &Shared,
    source: &mut crate::forward::Source,
    notices: &mut Notices,
    frame: Vec<u8>,
) {
    let to = meshlink_proto::relay::parse(&frame)
        .ok()
        .map(|(h, _)| h.peer);
    let now = Instant::now();
    if shared.relay.forward(source, frame, now) == Err(Dropped::NoRoute) {
        if let Some(to) = to.filter(|to| *to != source.key()) {
            if notices.bucket.allow(now) {
                // A full queue loses the notice; the next frame for that peer draws another.
                let _ = notices.link.send(unreachable_notice(&to));
            }
        }
    }
}

async fn queue_next(queue: &mut StreamQueue) -> Vec<u8> {
    match queue.recv().await {
        Some(f) => f,
        None => std::future::pending().await,
    }
}

/// `first` and whatever else is queued now, up to [`RELAY_BATCH`] bytes, as relay records.
fn batch(first: Vec<u8>, queue: &mut StreamQueue) -> Vec<u8> {
    let mut out = Vec::with_capacity(RELAY_BATCH.min(8 * first.len() + 64));
    out.extend(encode_relay(&first).unwrap_or_default());
    while out.len() < RELAY_BATCH.min(STREAM_SEND_BUFFER) {
        let Some(f) = queue.try_recv() else { break };
        out.extend(encode_relay(&f).unwrap_or_default());
    }
    out
}
