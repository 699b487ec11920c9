//! The handover module on loopback, with the stand-in agent and the test playing both the
//! application (it drives the [`Migrator`] and hands it plain connections) and the other
//! side. Needs root (TCP repair mode); without it the tests fail under `CI=true` and are
//! skipped otherwise.
//!
//! A whole move cannot run on one host (the restored socket would share its addresses with
//! the parked one), so each test plays one side: the source against a destination that stays
//! silent, says ready, or never sees left; the destination against a source that ships a real
//! frozen connection, a bad state, or is a stranger.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use meshlink_tcp_migrate::handover::testing::{
    destination, next_frame, root, AgentSocket, FakeAgent, WAIT,
};
use meshlink_tcp_migrate::handover::wire::{self, Connection, Final, Reply, State};
use meshlink_tcp_migrate::handover::{
    self, Application, Config, Event, FormatError, Migrator, Outcome, Paused, Shipment,
};
use meshlink_tcp_migrate::{freeze, restore, Frozen, Window, FORMAT_VERSION};

const WORKLOAD: &str = "web";
const HERE: &str = "127.0.0.1";
/// The destination's (or a stranger's) address: loopback, but not the server's.
const THERE: &str = "127.0.0.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The test's application: a number as its state, a note of up to 16 bytes per connection.
struct Counter;

impl Application for Counter {
    const FORMAT: &'static str = "counter/1";
    type State = u32;
    type Session = Vec<u8>;

    fn encode_state(state: &u32) -> Vec<u8> {
        state.to_be_bytes().to_vec()
    }

    fn decode_state(bytes: &[u8]) -> Result<u32, FormatError> {
        <[u8; 4]>::try_from(bytes)
            .map(u32::from_be_bytes)
            .map_err(|_| FormatError::invalid("", format!("{} bytes, expected 4", bytes.len())))
    }

    fn encode_session(note: &Vec<u8>) -> Vec<u8> {
        note.clone()
    }

    fn decode_session(bytes: &[u8]) -> Result<Vec<u8>, FormatError> {
        if bytes.len() > 16 {
            return Err(FormatError::invalid("note", "over 16 bytes"));
        }
        Ok(bytes.to_vec())
    }
}

/// A migrating server on loopback: its listener, its migrator and the agent's socket.
struct Node {
    migrator: Migrator<Counter>,
    listener: TcpListener,
    addr: SocketAddr,
    handover_port: u16,
    agents: AgentSocket,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(listen: &str, tune: impl FnOnce(&mut Config)) -> Node {
        // The migrator's log lines, shown for a failing test.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let dir = tempfile::tempdir().unwrap();
        let agents = AgentSocket::bind(&dir.path().join("mesh0.sock"));
        let listener = handover::listen(listen.parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let handovers = TcpListener::bind((ip(HERE), 0)).await.unwrap();
        let handover_port = handovers.local_addr().unwrap().port();
        let mut config = Config::new(WORKLOAD, agents.path());
        config.handover_timeout = Duration::from_millis(1000);
        tune(&mut config);
        let migrator = Migrator::start(config, addr, handovers).unwrap();
        Node {
            migrator,
            listener,
            addr,
            handover_port,
            agents,
            _dir: dir,
        }
    }

    async fn agent(&self, holder: &str) -> FakeAgent {
        self.agents.accept(WORKLOAD, ("vm-a", ip(holder))).await
    }

    /// A client's connection: the client's end and the server's, paused with `note`.
    async fn connect(&self, note: &[u8]) -> (TcpStream, Paused<Vec<u8>>) {
        let client = TcpStream::connect(self.addr).await.unwrap();
        let (stream, peer) = self.listener.accept().await.unwrap();
        (
            client,
            Paused {
                stream,
                peer,
                session: note.to_vec(),
            },
        )
    }

    /// Where this node sends handovers: [`THERE`] at its own handover port.
    fn destination(&self) -> SocketAddr {
        SocketAddr::new(ip(THERE), self.handover_port)
    }

    async fn next(&mut self) -> Event<Counter> {
        timeout(WAIT, self.migrator.next())
            .await
            .expect("an event in time")
    }

    /// Runs the migrator on a task of its own (for the destination's side, where the test
    /// only watches), its events sent to the test.
    fn drive(self) -> Driven {
        let (tx, events) = mpsc::unbounded_channel();
        let Node {
            mut migrator,
            listener,
            addr,
            handover_port,
            agents,
            _dir,
        } = self;
        let task = tokio::spawn(async move {
            loop {
                let event = migrator.next().await;
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        Driven {
            events,
            task,
            _listener: listener,
            addr,
            handover_port,
            agents,
            _dir,
        }
    }
}

/// A node whose migrator runs on its own task.
struct Driven {
    events: mpsc::UnboundedReceiver<Event<Counter>>,
    task: JoinHandle<()>,
    _listener: TcpListener,
    addr: SocketAddr,
    handover_port: u16,
    agents: AgentSocket,
    _dir: tempfile::TempDir,
}

impl Driven {
    async fn agent(&self, holder: &str) -> FakeAgent {
        self.agents.accept(WORKLOAD, ("vm-a", ip(holder))).await
    }

    async fn next(&mut self) -> Event<Counter> {
        timeout(WAIT, self.events.recv())
            .await
            .expect("an event in time")
            .expect("the migrator runs")
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .expect("the bytes in time")
        .unwrap();
    buf
}

/// Every connection handed to `hand_over`, shipped as frozen, with `state` 7.
fn ship_all(freeze: handover::Freeze<Vec<u8>>) -> Shipment<Counter> {
    Shipment {
        state: 7,
        connections: freeze.frozen,
    }
}

#[tokio::test]
async fn a_silent_destination_gives_every_connection_back() {
    if !root() {
        return;
    }
    let mut node = Node::start("127.0.0.1:0", |_| {}).await;
    let mut agent = node.agent(HERE).await;
    let (mut client, alice) = node.connect(b"alice").await;
    // A client that closes before the freeze: its connection is gone, not shipped.
    let (closing, bob) = node.connect(b"bob").await;
    drop(closing);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let (mut frames, silent) = destination(node.destination(), None);
    agent.handover(2, "vm-c", ip(THERE)).await;
    let Event::HandOver(request) = node.next().await else {
        panic!("a handover request");
    };
    assert_eq!(
        (request.generation(), request.to(), request.address()),
        (2, "vm-c", ip(THERE))
    );
    let mut gone = Vec::new();
    let handing = node
        .migrator
        .hand_over(request, vec![alice, bob], |freeze| {
            gone.extend(freeze.gone.iter().map(|g| g.session.clone()));
            ship_all(freeze)
        });
    let watching = async {
        let state = State::decode(&next_frame(&mut frames).await).unwrap();
        // Sent while frozen: the socket keeps it.
        client.write_all(b"while frozen").await.unwrap();
        state
    };
    let (outcome, state) = tokio::join!(handing, watching);
    assert_eq!(gone, [b"bob".to_vec()]);
    assert_eq!(
        (state.format.as_str(), state.workload.as_str()),
        ("counter/1", WORKLOAD)
    );
    assert_eq!(
        (state.generation, state.state.clone()),
        (2, vec![0, 0, 0, 7])
    );
    assert_eq!(state.connections.len(), 1);
    assert_eq!(state.connections[0].session, b"alice");

    let Outcome::Failed(mut back) = outcome else {
        panic!("the handover should fail");
    };
    let error = agent
        .handed_over(2)
        .await
        .expect("the agent hears the error");
    assert!(error.contains("no answer from vm-c"), "{error}");
    silent.abort();
    assert!(back.gone.is_empty());
    assert_eq!(back.connections.len(), 1);
    let mut alice = back.connections.pop().unwrap();
    assert_eq!(alice.session, b"alice");
    assert!(!node.migrator.parked());
    assert_eq!(read_exact(&mut alice.stream, 12).await, b"while frozen");
    alice.stream.write_all(b"still here").await.unwrap();
    assert_eq!(read_exact(&mut client, 10).await, b"still here");
}

#[tokio::test]
async fn after_left_the_final_state_has_what_came_in_and_the_sessions_are_released() {
    if !root() {
        return;
    }
    let mut node = Node::start("127.0.0.1:0", |_| {}).await;
    let mut agent = node.agent(HERE).await;
    let (mut client, alice) = node.connect(b"alice").await;
    let (mut frames, _ready) = destination(node.destination(), Some(Reply::Ready));
    agent.handover(2, "vm-c", ip(THERE)).await;
    let Event::HandOver(request) = node.next().await else {
        panic!("a handover request");
    };
    let outcome = node
        .migrator
        .hand_over(request, vec![alice], ship_all)
        .await;
    assert!(matches!(outcome, Outcome::HandedOver), "{outcome:?}");
    assert_eq!(agent.handed_over(2).await, None, "handed over");
    assert!(node.migrator.parked(), "new clients wait meanwhile");
    let state = State::decode(&next_frame(&mut frames).await).unwrap();

    // Sent after the freeze: the parked socket takes it in, so only the final state has it.
    client.write_all(b"late").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent.left(1).await;
    let Event::Released(sessions) = node.next().await else {
        panic!("the sessions released");
    };
    assert_eq!(sessions, [b"alice".to_vec()]);
    assert!(!node.migrator.parked());
    let last = Final::decode(&next_frame(&mut frames).await, 1).unwrap();
    let shipped = &state.connections[0].socket;
    let fresh = &last.sockets[0];
    assert_eq!((fresh.local, fresh.peer), (shipped.local, shipped.peer));
    assert!(shipped.recv_queue.is_empty());
    assert_eq!(fresh.recv_queue, b"late");

    // The test takes the connection on where the migrator left it: the client notices
    // nothing.
    let mut taken = restore(fresh).unwrap();
    let mut got = [0u8; 4];
    std::io::Read::read_exact(&mut taken, &mut got).unwrap();
    assert_eq!(&got, b"late");
    std::io::Write::write_all(&mut taken, b"moved").unwrap();
    assert_eq!(read_exact(&mut client, 5).await, b"moved");
}

#[tokio::test]
async fn without_left_or_on_an_abort_the_connections_come_back() {
    for abort in [false, true] {
        come_back(abort).await;
    }
}

/// No `left` within the outcome timeout, or (`abort`) the coordinator calls the move off
/// at once (and a lease that ran out on the way is no `left`): the parked connections go on
/// here.
async fn come_back(abort: bool) {
    if !root() {
        return;
    }
    // With an abort, only the abort can bring them back in time.
    let mut node = Node::start("127.0.0.1:0", |c| {
        c.outcome_timeout = Duration::from_millis(if abort { 60_000 } else { 500 });
    })
    .await;
    let mut agent = node.agent(HERE).await;
    let (mut client, alice) = node.connect(b"alice").await;
    let (_frames, _ready) = destination(node.destination(), Some(Reply::Ready));
    agent.handover(2, "vm-c", ip(THERE)).await;
    let Event::HandOver(request) = node.next().await else {
        panic!("a handover request");
    };
    let outcome = node
        .migrator
        .hand_over(request, vec![alice], ship_all)
        .await;
    assert!(matches!(outcome, Outcome::HandedOver), "{outcome:?}");
    assert_eq!(agent.handed_over(2).await, None);
    client.write_all(b"while parked").await.unwrap();
    if abort {
        agent
            .send(meshlink_uapi::handover::AgentEvent::Left {
                workload: WORKLOAD.into(),
                generation: 1,
                moved: false,
            })
            .await;
        agent
            .send(meshlink_uapi::handover::AgentEvent::Aborted {
                workload: WORKLOAD.into(),
                generation: 2,
            })
            .await;
    }
    // No left comes (or the move is called off): it did not happen, and the connection
    // goes on here.
    let next = tokio::time::timeout(Duration::from_secs(10), node.next()).await;
    let Ok(Event::Resume(mut back)) = next else {
        panic!("the connections resumed");
    };
    assert!(!node.migrator.parked());
    let mut alice = back.connections.pop().expect("alice resumed");
    assert_eq!(alice.session, b"alice");
    assert_eq!(read_exact(&mut alice.stream, 12).await, b"while parked");
    alice.stream.write_all(b"back").await.unwrap();
    assert_eq!(read_exact(&mut client, 4).await, b"back");
}

/// Connects to `to` from `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(from), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends `body` (frames) to a node's handover port from `from` and reads the reply. Until
/// the node has read the agent's holder event it refuses everyone (closing without a
/// word), so this tries again for a while.
async fn hand_in(from: &str, handover_port: u16, body: &[u8]) -> (TcpStream, Reply) {
    let to = SocketAddr::new(ip(HERE), handover_port);
    for _ in 0..50 {
        let mut stream = connect_from(from, to).await;
        if stream.write_all(body).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        match wire::read_frame(&mut stream, wire::MAX_REPLY).await {
            Ok(reply) => return (stream, Reply::decode(&reply).unwrap()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("no reply from the node's handover port");
}

/// A frozen connection as a source would ship it, for states that never get restored.
fn made_up_socket(local: SocketAddr) -> Frozen {
    Frozen {
        version: FORMAT_VERSION,
        local,
        peer: "127.0.0.1:40000".parse().unwrap(),
        send_seq: 1,
        recv_seq: 1,
        send_queue: Vec::new(),
        unsent: 0,
        recv_queue: Vec::new(),
        mss: 1380,
        window_scale: None,
        sack: false,
        timestamp: None,
        window: Some(Window {
            snd_wl1: 1,
            snd_wnd: 1,
            max_window: 1,
            rcv_wnd: 1,
            rcv_wup: 1,
        }),
    }
}

fn state(connections: Vec<Connection>) -> State {
    State {
        format: Counter::FORMAT.into(),
        workload: WORKLOAD.into(),
        generation: 2,
        state: vec![0, 0, 0, 9],
        connections,
    }
}

#[tokio::test]
async fn handovers_come_only_from_the_holder_and_bad_ones_are_named() {
    if !root() {
        return;
    }
    let node = Node::start("127.0.0.1:0", |_| {}).await.drive();
    // The holder is at THERE; HERE is a stranger.
    let _agent = node.agent(THERE).await;
    let port = node.handover_port;
    let refusal = |body: Vec<u8>| async move {
        match hand_in(THERE, port, &body).await.1 {
            Reply::Refused(why) => why,
            Reply::Ready => panic!("ready for a bad handover"),
        }
    };
    let why = refusal(wire::frame(b"{\"kind\":\"state\"}")).await;
    assert_eq!(why, "version: missing");
    let other = State {
        format: "chat/1".into(),
        ..state(Vec::new())
    };
    let why = refusal(wire::frame(&other.encode())).await;
    assert!(why.starts_with("format: \"chat/1\""), "{why}");
    let other = State {
        workload: "kv".into(),
        ..state(Vec::new())
    };
    let why = refusal(wire::frame(&other.encode())).await;
    assert!(why.starts_with("workload: \"kv\""), "{why}");
    let other = State {
        state: vec![1, 2, 3],
        ..state(Vec::new())
    };
    let why = refusal(wire::frame(&other.encode())).await;
    assert_eq!(why, "state: 3 bytes, expected 4");
    let long_note = state(vec![Connection {
        socket: made_up_socket(node.addr),
        session: vec![b'x'; 17],
    }]);
    let why = refusal(wire::frame(&long_note.encode())).await;
    assert_eq!(why, "connections[0].session.note: over 16 bytes");
    let elsewhere = state(vec![Connection {
        socket: made_up_socket("127.0.0.1:1".parse().unwrap()),
        session: Vec::new(),
    }]);
    let why = refusal(wire::frame(&elsewhere.encode())).await;
    assert!(
        why.starts_with("connections[0].socket.local: 127.0.0.1:1 is not this server's address"),
        "{why}"
    );
    let why = refusal(((wire::MAX_MESSAGE + 1) as u32).to_be_bytes().to_vec()).await;
    assert!(why.contains("over the limit"), "{why}");

    // The node knows the holder now. A stranger gets no answer, even with a good state.
    let handovers = SocketAddr::new(ip(HERE), port);
    let mut stranger = connect_from(HERE, handovers).await;
    let _ = stranger
        .write_all(&wire::frame(&state(Vec::new()).encode()))
        .await;
    let mut rest = Vec::new();
    let read = timeout(WAIT, stranger.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(
        read.is_err() || rest.is_empty(),
        "a stranger gets no answer: {rest:?}"
    );

    // The same state from the holder is taken (no connections).
    let (_, reply) = hand_in(THERE, port, &wire::frame(&state(Vec::new()).encode())).await;
    assert_eq!(reply, Reply::Ready);
}

/// Plays the source of one connection to a listener at `127.0.0.1:0`: the client's end,
/// the state at the freeze, and, after the client sent `late`, the parked state again. The
/// listener is closed, so that a node can listen on its address and port.
async fn frozen_elsewhere(late: &[u8]) -> (TcpStream, Frozen, Frozen) {
    let first = TcpListener::bind((ip(HERE), 0)).await.unwrap();
    let mut client = TcpStream::connect(first.local_addr().unwrap())
        .await
        .unwrap();
    let (served, _) = first.accept().await.unwrap();
    let (at_freeze, parked) = freeze(served.into_std().unwrap()).unwrap();
    client.write_all(late).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let at_left = parked.state().unwrap();
    parked.discard();
    (client, at_freeze, at_left)
}

#[tokio::test]
async fn a_destination_takes_connections_live_on_arrival_with_what_reached_the_source_late() {
    if !root() {
        return;
    }
    let (mut client, at_freeze, at_left) = frozen_elsewhere(b"late").await;
    assert_eq!(at_left.recv_queue, b"late", "the parked socket took it in");
    // The destination listens on the same address and port, as on the workload address.
    let mut node = Node::start(&at_freeze.local.to_string(), |_| {})
        .await
        .drive();
    let mut agent = node.agent(HERE).await;
    let shipped = state(vec![Connection {
        socket: at_freeze,
        session: b"dave".to_vec(),
    }]);
    let (mut source, reply) =
        hand_in(HERE, node.handover_port, &wire::frame(&shipped.encode())).await;
    assert_eq!(reply, Reply::Ready);
    let last = Final {
        sockets: vec![at_left],
    };
    source
        .write_all(&wire::frame(&last.encode()))
        .await
        .unwrap();
    agent.arrived(2).await;

    let Event::Arrived(arrival) = node.next().await else {
        panic!("an arrival");
    };
    assert_eq!((arrival.from.as_str(), arrival.state), ("vm-a", 9));
    let mut dave = arrival.connections.into_iter().next().expect("dave");
    assert_eq!(dave.session, b"dave");
    assert_eq!(dave.peer, client.local_addr().unwrap());
    assert_eq!(read_exact(&mut dave.stream, 4).await, b"late");
    dave.stream.write_all(b"hi dave").await.unwrap();
    assert_eq!(read_exact(&mut client, 7).await, b"hi dave");
    client.write_all(b"hello").await.unwrap();
    assert_eq!(read_exact(&mut dave.stream, 5).await, b"hello");
}

#[tokio::test]
async fn arrived_without_a_final_frame_goes_live_with_the_state_of_the_freeze() {
    if !root() {
        return;
    }
    let (mut client, at_freeze, _) = frozen_elsewhere(b"").await;
    let mut node = Node::start(&at_freeze.local.to_string(), |c| {
        c.final_wait = Duration::from_millis(200);
    })
    .await
    .drive();
    let mut agent = node.agent(HERE).await;
    let shipped = state(vec![Connection {
        socket: at_freeze,
        session: b"erin".to_vec(),
    }]);
    // The source stays connected and says nothing more.
    let (_source, reply) = hand_in(HERE, node.handover_port, &wire::frame(&shipped.encode())).await;
    assert_eq!(reply, Reply::Ready);
    agent.arrived(2).await;
    let Event::Arrived(arrival) = node.next().await else {
        panic!("an arrival");
    };
    let mut erin = arrival.connections.into_iter().next().expect("erin");
    client.write_all(b"there?").await.unwrap();
    assert_eq!(read_exact(&mut erin.stream, 6).await, b"there?");
    erin.stream.write_all(b"yes").await.unwrap();
    assert_eq!(read_exact(&mut client, 3).await, b"yes");
}

#[tokio::test]
async fn without_arrival_held_connections_are_let_go() {
    if !root() {
        return;
    }
    let (mut client, at_freeze, _) = frozen_elsewhere(b"").await;
    let node = Node::start(&at_freeze.local.to_string(), |c| {
        c.outcome_timeout = Duration::from_millis(300);
    })
    .await
    .drive();
    let _agent = node.agent(HERE).await;
    let shipped = state(vec![Connection {
        socket: at_freeze,
        session: Vec::new(),
    }]);
    let (_source, reply) = hand_in(HERE, node.handover_port, &wire::frame(&shipped.encode())).await;
    assert_eq!(reply, Reply::Ready);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Nothing holds the connection here any more: the listener's port answers with a reset.
    client.write_all(b"anyone?").await.unwrap();
    let mut buf = [0u8; 16];
    let read = timeout(WAIT, client.read(&mut buf)).await.unwrap();
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
}
