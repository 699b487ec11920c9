//! The control loop fails over between coordinators: `MeshControl::run` over real QUIC
//! sessions to fake coordinators on 127.0.0.1. Each fake is a quinn server with a test-only
//! identity (`fixtures/coordinator.*.der`, a self-signed P-256 certificate that nothing else
//! trusts) speaking the control protocol of `meshlink_proto::control`; it reports the hellos
//! and heartbeats it receives. Nothing is measured by time: each test waits, with a generous
//! limit, for what it expects to happen.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshlink_agent::control::coordinators::Coordinators;
use meshlink_agent::control::state::{NodeState, StateDir};
use meshlink_agent::control::workloads::{PeerKeys, Shared, Tunnels};
use meshlink_agent::control::MeshControl;
use meshlink_proto::control::{
    self, Auth, ClientMessage, Decoder, Hello, ServerMessage, Welcome, ALPN, MAX_CLIENT_MESSAGE,
};
use meshlink_proto::workload::WorkloadInfo;
use meshlink_proto::Netmap;
use quinn::rustls;
use tokio::sync::{mpsc, watch};

const CERT: &[u8] = include_bytes!("fixtures/coordinator.cert.der");
const KEY: &[u8] = include_bytes!("fixtures/coordinator.key.der");
/// How long a test waits for what it expects before it fails.
const PATIENCE: Duration = Duration::from_secs(30);
const NODE: u64 = 1;

/// How a fake coordinator treats the sessions it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Welcome, full map, and a lease for every heartbeat.
    Serve,
    /// Like `Serve`, but only the first heartbeat of each session is answered: the
    /// connection stays alive for QUIC, the lease is not renewed.
    RenewOnce,
    /// Every connection is closed as soon as the handshake is done.
    CloseAtOnce,
    /// Like `Serve`, the full map sent compressed (to a hello that says it takes that).
    Compressed,
    /// Like `Compressed`, but the compressed record is corrupt: its DEFLATE stream cut short.
    CorruptCompressed,
}

/// What a fake coordinator received.
#[derive(Debug)]
enum Received {
    Hello(Hello),
    Heartbeat,
}

struct FakeCoordinator {
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    received: mpsc::UnboundedReceiver<Received>,
    connections: Arc<AtomicUsize>,
}

impl FakeCoordinator {
    /// A fake on a free port of 127.0.0.1 whose welcomes list `listed` (read at each welcome,
    /// so that a test can fill it once every fake has its address) and whose maps are `map`.
    fn start(behaviour: Behaviour, listed: Arc<Mutex<Vec<String>>>, map: Netmap) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from(CERT.to_vec())],
                rustls::pki_types::PrivateKeyDer::Pkcs8(KEY.to_vec().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let endpoint =
            quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).expect("bind");
        let addr = endpoint.local_addr().unwrap();
        let (tx, received) = mpsc::unbounded_channel();
        let connections = Arc::new(AtomicUsize::new(0));
        let accepting = endpoint.clone();
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let Ok(conn) = incoming.await else { continue };
                counted.fetch_add(1, Ordering::SeqCst);
                if behaviour == Behaviour::CloseAtOnce {
                    conn.close(0u32.into(), b"not now");
                    continue;
                }
                let (tx, listed, map) = (tx.clone(), listed.clone(), map.clone());
                tokio::spawn(async move {
                    let _ = session(conn, behaviour, tx, listed, map).await;
                });
            }
        });
        FakeCoordinator {
            addr,
            endpoint,
            received,
            connections,
        }
    }

    fn address(&self) -> String {
        self.addr.to_string()
    }

    /// The next hello received (heartbeats before it are skipped).
    async fn hello(&mut self) -> Hello {
        loop {
            match self.next().await {
                Received::Hello(h) => return h,
                Received::Heartbeat => {}
            }
        }
    }

    /// Waits for the next heartbeat.
    async fn heartbeat(&mut self) {
        while !matches!(self.next().await, Received::Heartbeat) {}
    }

    async fn next(&mut self) -> Received {
        tokio::time::timeout(PATIENCE, self.received.recv())
            .await
            .unwrap_or_else(|_| panic!("the coordinator at {} heard nothing", self.addr))
            .expect("the fake coordinator stopped")
    }

    /// Closes every connection, as a coordinator that shuts down does.
    fn stop(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// One session: hello, welcome and full map, then leases for heartbeats as `behaviour` says.
async fn session(
    conn: quinn::Connection,
    behaviour: Behaviour,
    tx: mpsc::UnboundedSender<Received>,
    listed: Arc<Mutex<Vec<String>>>,
    map: Netmap,
) -> Option<()> {
    let (mut send, mut recv) = conn.accept_bi().await.ok()?;
    let mut decoder = Decoder::new(MAX_CLIENT_MESSAGE);
    let mut buf = [0u8; 4096];
    let mut answered = 0;
    loop {
        while let Some(message) = decoder.decode::<ClientMessage>().ok()? {
            match message {
                ClientMessage::Hello(hello) => {
                    let hello_compression = hello.compression;
                    let _ = tx.send(Received::Hello(hello));
                    let welcome = Welcome {
                        talker_reports: false,
                        node_id: NODE,
                        name: "vm-a".into(),
                        network: "prod".into(),
                        network_cidr: "100.64.0.0/16".parse().unwrap(),
                        addresses: vec!["100.64.0.1/16".parse().unwrap()],
                        node_secret: None,
                        coordinators: listed.lock().unwrap().clone(),
                        reflect_port: None,
                        relay: false,
                        path_reports: false,
                        handover: false,
                        confirms_handovers: false,
                        network_cidr6: None,
                    };
                    send.write_all(&control::encode(&ServerMessage::Welcome(welcome)))
                        .await
                        .ok()?;
                    let full = control::encode(&ServerMessage::FullMap(map.clone()));
                    let full = match behaviour {
                        Behaviour::Compressed | Behaviour::CorruptCompressed
                            if hello_compression =>
                        {
                            let mut c = control::compress(&full).expect("a large map");
                            if behaviour == Behaviour::CorruptCompressed {
                                let len = c.len() / 2;
                                c.truncate(len);
                                let prefix = control::COMPRESSED_RECORD | (len as u32 - 4);
                                c[..4].copy_from_slice(&prefix.to_be_bytes());
                            }
                            c
                        }
                        _ => full,
                    };
                    send.write_all(&full).await.ok()?;
                }
                ClientMessage::Heartbeat { seq, .. } => {
                    let _ = tx.send(Received::Heartbeat);
                    if behaviour != Behaviour::RenewOnce || answered == 0 {
                        answered += 1;
                        let lease = ServerMessage::Lease {
                            seq,
                            lease_ms: 1500,
                            version: map.version,
                            confirmed: None,
                        };
                        send.write_all(&control::encode(&lease)).await.ok()?;
                    }
                }
                _ => {}
            }
        }
        let n = recv.read(&mut buf).await.ok()??;
        decoder.push(&buf[..n]).ok()?;
    }
}

/// A data plane with nothing to warm up.
struct NoTunnels;

impl Tunnels for NoTunnels {
    fn warm(
        &self,
        _only: Option<PeerKeys>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }

    fn all_fresh(&self, _only: Option<&PeerKeys>) -> bool {
        true
    }

    fn talkers(
        &self,
        _address: std::net::IpAddr,
        _within: Duration,
        _max: usize,
    ) -> Vec<meshlink_proto::PublicKey> {
        Vec::new()
    }
}

/// A map at version 1, with `chat` held by this node when `holder`.
fn map(holder: bool) -> Netmap {
    let mut map = Netmap {
        version: 1,
        ..Netmap::default()
    };
    if holder {
        map.workloads.insert(
            "chat".into(),
            WorkloadInfo {
                id: 1,
                name: "chat".into(),
                address: "100.64.50.10/32".parse().unwrap(),
                holder: Some(NODE),
                generation: 1,
                previous: None,
                candidates: vec![NODE],
                grace_ms: None,
                tags: Vec::new(),
                address6: None,
            },
        );
    }
    map
}

/// A joined node whose state directory knows `coordinators` (only `coordinator` when it
/// holds one address: a node file from before the list), running its control loop with
/// `cached` as its map.
struct Agent {
    shared: Arc<Shared>,
    /// The maps its control loop publishes.
    maps: watch::Receiver<Netmap>,
    state: StateDir,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start(coordinators: &[String], cached: Netmap) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let key = state.private_key().unwrap();
        let node = NodeState {
            coordinator: coordinators[0].clone(),
            coordinators: if coordinators.len() > 1 {
                coordinators.to_vec()
            } else {
                Vec::new()
            },
            fingerprint: meshlink_tls::fingerprint(CERT),
            node_id: NODE,
            node_secret: "node-secret".into(),
            name: "vm-a".into(),
            network: "prod".into(),
            network_cidr: "100.64.0.0/16".parse().unwrap(),
            addresses: vec!["100.64.0.1/16".parse().unwrap()],
            listen_port: None,
            network_cidr6: None,
        };
        state.save_node(&node).unwrap();
        let shared = Arc::new(Shared::new(
            NODE,
            cached.clone(),
            Instant::now(),
            Coordinators::new(node.coordinators()).unwrap(),
        ));
        let (maps, maps_rx) = watch::channel(cached);
        let (_claims_tx, claims) = mpsc::channel(4);
        let control = MeshControl::new(
            state.clone(),
            node,
            key.public_key(),
            maps,
            None,
            shared.clone(),
            claims,
        );
        let task = tokio::spawn(async move {
            let _ = control
                .run(51820, "mltest0".into(), Arc::new(NoTunnels))
                .await;
        });
        Agent {
            shared,
            maps: maps_rx,
            state,
            task,
            _dir: dir,
        }
    }

    fn session(&self) -> Option<String> {
        self.shared.coordinators().session().map(str::to_string)
    }

    fn known(&self) -> Vec<String> {
        self.shared.coordinators().addresses().to_vec()
    }

    fn stored(&self) -> Vec<String> {
        self.state.node().unwrap().unwrap().coordinators()
    }

    /// Waits until `what` holds.
    async fn until(&self, what: &str, mut check: impl FnMut(&Agent) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !check(self) {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn node_auth(hello: &Hello) -> bool {
    matches!(&hello.auth, Auth::Node { node_id, secret } if *node_id == NODE && secret == "node-secret")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_moves_on_to_a_coordinator_learnt_from_the_welcome() {
    let listed = Arc::new(Mutex::new(Vec::new()));
    let mut a = FakeCoordinator::start(Behaviour::Serve, listed.clone(), map(false));
    let mut b = FakeCoordinator::start(Behaviour::Serve, listed.clone(), map(false));
    *listed.lock().unwrap() = vec![a.address(), b.address()];

    // The node knows only `a`, as from a token of one coordinator.
    let agent = Agent::start(&[a.address()], map(false));
    assert!(node_auth(&a.hello().await));
    agent
        .until("connected to a, knowing both", |g| {
            g.session() == Some(a.address()) && g.known() == [a.address(), b.address()]
        })
        .await;
    agent
        .until("both stored in node.json", |g| {
            g.stored() == [a.address(), b.address()]
        })
        .await;

    a.stop();
    assert!(node_auth(&b.hello().await));
    agent
        .until("connected to b", |g| g.session() == Some(b.address()))
        .await;
    assert_eq!(agent.known(), [a.address(), b.address()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_fails_the_connection_is_skipped() {
    // `b` does not know the mesh's coordinators (an older coordinator): the list is kept.
    let mut a = FakeCoordinator::start(
        Behaviour::CloseAtOnce,
        Arc::new(Mutex::new(Vec::new())),
        map(false),
    );
    let mut b = FakeCoordinator::start(
        Behaviour::Serve,
        Arc::new(Mutex::new(Vec::new())),
        map(false),
    );
    let both = [a.address(), b.address()];
    let agent = Agent::start(&both, map(false));
    assert!(node_auth(&b.hello().await));
    assert!(a.connections.load(Ordering::SeqCst) >= 1);
    agent
        .until("connected to b", |g| g.session() == Some(b.address()))
        .await;
    assert_eq!(agent.known(), both);
    assert_eq!(agent.stored(), both);
    a.stop();
    assert!(a.received.try_recv().is_err(), "a never got a hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_leaves_a_coordinator_that_stops_renewing_its_lease() {
    let listed = Arc::new(Mutex::new(Vec::new()));
    let mut a = FakeCoordinator::start(Behaviour::RenewOnce, listed.clone(), map(true));
    let mut b = FakeCoordinator::start(Behaviour::Serve, listed.clone(), map(true));
    *listed.lock().unwrap() = vec![a.address(), b.address()];

    // A holder from its cached map: it renews its lease at once on every session.
    let agent = Agent::start(&[a.address(), b.address()], map(true));
    a.hello().await;
    a.heartbeat().await;
    agent
        .until("a lease through a", |g| {
            g.shared.lock().holdings().lease_valid(Instant::now())
        })
        .await;
    // `a` keeps the connection open but renews nothing more: the holder goes to `b`.
    assert!(node_auth(&b.hello().await));
    b.heartbeat().await;
    agent
        .until("connected to b", |g| g.session() == Some(b.address()))
        .await;
    agent
        .until("a lease through b", |g| {
            g.shared.lock().holdings().lease_valid(Instant::now())
        })
        .await;
    assert_eq!(
        a.connections.load(Ordering::SeqCst),
        1,
        "the session to a was left, not lost"
    );
}

/// A map at version 2 with `n` peers: some 250 bytes of JSON each.
fn large_map(n: u64) -> Netmap {
    let mut m = map(false);
    m.version = 2;
    for id in 2..2 + n {
        m.peers.insert(
            id,
            meshlink_proto::PeerInfo {
                node_id: id,
                name: format!("node-{id}"),
                public_key: meshlink_proto::PublicKey([id as u8; 32]),
                next_key: None,
                addresses: vec![format!("100.64.1.{id}/32").parse().unwrap()],
                allowed_ips: vec![],
                endpoints: vec![format!("198.18.1.{id}:51820").parse().unwrap()],
                labels: Default::default(),
                tags: vec!["web".into()],
                via: None,
            },
        );
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_full_map_is_taken_and_a_corrupt_one_ends_the_session() {
    let listed = Arc::new(Mutex::new(Vec::new()));
    let big = large_map(100);
    assert!(
        control::encode(&ServerMessage::FullMap(big.clone())).len() > 4 * control::COMPRESS_MIN
    );
    let mut a = FakeCoordinator::start(Behaviour::Compressed, listed.clone(), big.clone());
    *listed.lock().unwrap() = vec![a.address()];
    let agent = Agent::start(&[a.address()], map(false));
    let hello = a.hello().await;
    assert!(node_auth(&hello) && hello.compression, "{hello:?}");
    agent
        .until("the compressed map applied", |g| *g.maps.borrow() == big)
        .await;
    assert_eq!(
        a.connections.load(Ordering::SeqCst),
        1,
        "one session throughout"
    );
    drop(agent);
    a.stop();

    // A corrupt record: the session ends (as on any malformed message) and the agent comes
    // back with a new one; its map is never the corrupt one's.
    let mut b = FakeCoordinator::start(Behaviour::CorruptCompressed, listed.clone(), big.clone());
    *listed.lock().unwrap() = vec![b.address()];
    let agent = Agent::start(&[b.address()], map(false));
    assert!(b.hello().await.compression);
    assert!(
        b.hello().await.compression,
        "a second session after the corrupt record"
    );
    assert!(b.connections.load(Ordering::SeqCst) >= 2);
    assert_eq!(agent.maps.borrow().version, 1);
}
