//! The standalone relay: its identity, and its listeners for agents' sessions over QUIC and
//! TLS over TCP on one address, each admitted (at most max_sessions at once, of them
//! max_unauthenticated before their hello and max_unauthenticated_per_ip from one source:
//! [`crate::admission`]; else refused at once) and handed after its handshake to
//! [`Sessions`] ([`crate::sessions`]: the hello with its ticket, then forwarding by the same
//! [`Relay`] as the coordinator's).
//!
//! Refusals and ends are typed ([`crate::outcome`]) and counted once, where they are decided;
//! with the forwarding core's and the admission caps' counters they are what `--metrics-listen`
//! serves ([`crate::metrics`]).
//!
//! Its security (no open relay, bounded queues, per-node caps): [`crate::sessions`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshlink_proto::relay::{RELAY_ALPN, RELAY_SERVER_NAME};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout_at;
use tracing::{debug, info, Instrument};

use crate::admission::{Admission, Connections};
use crate::forward::{Relay, DATAGRAM_RECEIVE_BUFFER, DATAGRAM_SEND_BUFFER};
use crate::metrics::{Snapshot, SnapshotFn};
pub use crate::sessions::Sessions;
use crate::ticket::Verifier;

/// Certificate file (PEM) in the state directory.
pub const CERT_FILE: &str = "relay.crt";
/// Private key file (PEM, 0600) in the state directory.
pub const KEY_FILE: &str = "relay.key";

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

/// What the listeners share: the sessions they hand connections to, and their admission.
struct Shared {
    sessions: Sessions,
    connections: Connections,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// Every counter now.
    fn snapshot(&self) -> Snapshot {
        let relay = self.sessions.relay();
        Snapshot {
            relay: relay.stats(),
            sessions: relay.sessions_by_transport(),
            nodes: relay.routes(),
            connections: self.connections.open(),
            before_hello: self.connections.unauthenticated(),
            refused: self.connections.refused(),
            outcomes: self.sessions.outcomes().counts(),
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
        sessions: Sessions::new(
            relay.clone(),
            verifier,
            settings.hello_timeout,
            shutdown_rx.clone(),
        ),
        connections: Connections::new(
            settings.max_sessions,
            settings.max_unauthenticated,
            settings.max_unauthenticated_per_ip,
        )
        .with_max_sessions_per_source(settings.max_sessions_per_ip),
        shutdown: shutdown_rx.clone(),
    });
    info!(
        %addr,
        fingerprint = %identity.fingerprint,
        coordinator = %shared.sessions.coordinator_fingerprint(),
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

async fn quic_session(incoming: quinn::Incoming, shared: Arc<Shared>, admission: Admission) {
    let Admission {
        slot: _slot,
        before_hello,
    } = admission;
    let deadline = tokio::time::Instant::now() + shared.sessions.hello_timeout();
    let Ok(connecting) = incoming.accept() else {
        return;
    };
    let conn = match timeout_at(deadline, connecting).await {
        Ok(Ok(c)) => c,
        _ => return,
    };
    shared
        .sessions
        .serve_quic(conn, deadline, before_hello)
        .await;
}

async fn tcp_session(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    idle: Duration,
    admission: Admission,
) {
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
    let deadline = tokio::time::Instant::now() + shared.sessions.hello_timeout();
    let tls = match timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(t)) => t,
        _ => return,
    };
    shared.sessions.serve_tls(tls, deadline, before_hello).await;
}
