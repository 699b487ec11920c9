//! Live migration through the library, on loopback with a fake agent (a unix socket speaking
//! the agent's handover protocol) and the test playing the other server. Needs root (TCP
//! repair mode); without it the tests fail under `CI=true` and are skipped otherwise.
//!
//! A whole move between two servers cannot run on one host (the restored socket would share
//! its addresses with the parked one), so each test plays one side: the source against a
//! destination that stays silent, says ready, or never sees left; the destination against a
//! source that ships a real frozen connection, or a stranger.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use meshlink_chat::client::ClientEvent;
use meshlink_chat::handover::{self, MigrateConfig};
use meshlink_chat::migrate::{self, Connection, Final, Reply, State};
use meshlink_chat::protocol::Nick;
use meshlink_chat::server::ServerConfig;
use meshlink_tcp_migrate::{freeze, restore};
use meshlink_uapi::handover::{AgentEvent, AppAnswer};

mod support;
use support::{is_connected, is_disconnected, Client, WAIT};

const WORKLOAD: &str = "chat";
const HERE: &str = "127.0.0.1";
/// The destination's (or a stranger's) address: loopback, but not the server's.
const THERE: &str = "127.0.0.2";

fn root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("1");
    if euid == "0" {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "TCP repair mode needs root, and CI forbids skipping"
    );
    eprintln!("skipped: TCP repair mode needs root");
    false
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The agent's side of one registration.
struct FakeAgent {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl FakeAgent {
    /// Accepts the server's registration for [`WORKLOAD`] and tells it who holds it.
    async fn accept(listener: &UnixListener, holder: &str) -> FakeAgent {
        let (stream, _) = timeout(WAIT, listener.accept()).await.unwrap().unwrap();
        let (read, writer) = stream.into_split();
        let mut agent = FakeAgent {
            reader: BufReader::new(read),
            writer,
        };
        assert_eq!(agent.message().await, format!("handover={WORKLOAD}\n"));
        agent.writer.write_all(b"errno=0\n\n").await.unwrap();
        agent
            .send(AgentEvent::Holder {
                workload: WORKLOAD.into(),
                generation: 1,
                holder: Some(("vm-a".into(), ip(holder))),
            })
            .await;
        agent
    }

    async fn message(&mut self) -> String {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = timeout(WAIT, self.reader.read_line(&mut line))
                .await
                .expect("the server answers in time")
                .unwrap();
            assert!(n > 0, "the server closed the agent's connection");
            if line == "\n" {
                return text;
            }
            text.push_str(&line);
        }
    }

    async fn send(&mut self, event: AgentEvent) {
        self.writer
            .write_all(event.render().as_bytes())
            .await
            .unwrap();
    }

    /// The server's answer to a handover: its error, if any.
    async fn handed_over(&mut self, generation: u64) -> Option<String> {
        let text = self.message().await;
        match AppAnswer::parse(&text).unwrap() {
            AppAnswer::HandedOver {
                workload,
                generation: g,
                error,
            } => {
                assert_eq!((workload.as_str(), g), (WORKLOAD, generation));
                error
            }
        }
    }

    async fn handover(&mut self, generation: u64) {
        self.send(AgentEvent::Handover {
            workload: WORKLOAD.into(),
            generation,
            to: "vm-c".into(),
            address: ip(THERE),
        })
        .await;
    }
}

/// A migrating server on loopback with its fake agent.
struct Node {
    addr: SocketAddr,
    handover_port: u16,
    agents: UnixListener,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(listen: &str, name: &str, tune: impl FnOnce(&mut MigrateConfig)) -> Node {
        // The server's log lines, shown for a failing test.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let dir = tempfile::tempdir().unwrap();
        let socket: PathBuf = dir.path().join("mesh0.sock");
        let agents = UnixListener::bind(&socket).unwrap();
        let listener = handover::bind_freebind(listen.parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let handovers = TcpListener::bind((ip(HERE), 0)).await.unwrap();
        let handover_port = handovers.local_addr().unwrap().port();
        let mut config = MigrateConfig::new(WORKLOAD, &socket);
        config.handover_timeout = Duration::from_millis(1000);
        tune(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            handover::run(
                listener,
                handovers,
                ServerConfig::new(name),
                config,
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
        });
        Node {
            addr,
            handover_port,
            agents,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn agent(&self, holder: &str) -> FakeAgent {
        FakeAgent::accept(&self.agents, holder).await
    }

    /// Where this node sends handovers: [`THERE`] at its own handover port.
    fn destination(&self) -> SocketAddr {
        SocketAddr::new(ip(THERE), self.handover_port)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        timeout(WAIT, self.task).await.unwrap().unwrap();
    }
}

/// A client speaking the protocol by hand, to leave half a line in the server.
struct Raw {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    async fn join(addr: SocketAddr, nick: &str) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read, writer) = stream.into_split();
        let mut raw = Raw {
            reader: BufReader::new(read),
            writer,
        };
        raw.write(&format!("NICK {nick}\n")).await;
        assert!(raw.line().await.starts_with("* welcome to the room on "));
        raw
    }

    async fn write(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).await.unwrap();
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        timeout(WAIT, self.reader.read_line(&mut line))
            .await
            .expect("a line in time")
            .unwrap();
        line
    }
}

/// Two library clients and one by hand, in the room, having talked.
async fn room_of_three(addr: SocketAddr) -> (Client, Client, Raw) {
    let mut alice = Client::start(addr, "alice");
    alice.expect(is_connected).await;
    let mut bob = Client::start(addr, "bob");
    bob.expect(is_connected).await;
    alice.expect_line("* bob joined").await;
    alice.say("hello").await;
    bob.expect_line("alice: hello").await;
    let carol = Raw::join(addr, "carol").await;
    alice.expect_line("* carol joined").await;
    bob.expect_line("* carol joined").await;
    (alice, bob, carol)
}

/// A destination at [`THERE`]: reads the state and hands it to the test, then answers as
/// told (`None`: never), then hands over the final frame.
fn destination(
    at: SocketAddr,
    reply: Option<Reply>,
) -> (mpsc::UnboundedReceiver<Vec<u8>>, JoinHandle<()>) {
    let (tx, frames) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let listener = TcpListener::bind(at).await.unwrap();
        let (mut stream, _) = listener.accept().await.unwrap();
        let Ok(body) = read_frame(&mut stream).await else {
            return;
        };
        let _ = tx.send(body);
        let Some(reply) = reply else {
            // Holds the connection open without a word.
            let _ = stream.read(&mut [0u8; 1]).await;
            return;
        };
        stream
            .write_all(&migrate::frame(&reply.encode()))
            .await
            .unwrap();
        if let Ok(body) = read_frame(&mut stream).await {
            let _ = tx.send(body);
        }
    });
    (frames, task)
}

async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let mut body = vec![0; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

async fn next_frame(frames: &mut mpsc::UnboundedReceiver<Vec<u8>>) -> Vec<u8> {
    timeout(WAIT, frames.recv())
        .await
        .expect("a frame in time")
        .expect("a frame")
}

/// Nothing between `before` and now was a reconnection.
fn no_reconnect(before: &[ClientEvent]) {
    assert!(
        !before.iter().any(|e| is_connected(e) || is_disconnected(e)),
        "the client reconnected: {before:?}"
    );
}

fn nicks(state: &State) -> Vec<Option<String>> {
    let mut nicks: Vec<_> = state
        .connections
        .iter()
        .map(|c| c.nick.as_ref().map(|n| n.to_string()))
        .collect();
    nicks.sort();
    nicks
}

#[tokio::test]
async fn a_destination_that_does_not_answer_leaves_the_room_here() {
    if !root() {
        return;
    }
    let node = Node::start("127.0.0.1:0", "vm-a", |_| {}).await;
    let mut agent = node.agent(HERE).await;
    let (mut alice, mut bob, mut carol) = room_of_three(node.addr).await;
    carol.write("half a li").await;

    let (mut frames, silent) = destination(node.destination(), None);
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent.handover(2).await;
    let state = State::decode(&next_frame(&mut frames).await).unwrap();
    assert_eq!((state.workload.as_str(), state.generation), (WORKLOAD, 2));
    assert_eq!(state.from, "vm-a");
    assert_eq!(
        nicks(&state),
        [
            Some("alice".into()),
            Some("bob".into()),
            Some("carol".into())
        ]
    );
    let carols = state
        .connections
        .iter()
        .find(|c| c.nick.as_ref().is_some_and(|n| n.as_str() == "carol"))
        .unwrap();
    assert_eq!(
        carols.unread, b"half a li",
        "the line in progress is shipped"
    );
    // Said while frozen: the socket keeps it.
    alice.say("while frozen").await;

    let error = agent.handed_over(2).await.expect("the handover failed");
    assert!(error.contains("no answer from vm-c"), "{error}");
    silent.abort();

    let before = bob.expect_line("alice: while frozen").await;
    no_reconnect(&before);
    carol.write("ne\n").await;
    let before = bob.expect_line("carol: half a line").await;
    no_reconnect(&before);
    bob.say("still here").await;
    let before = alice.expect_line("bob: still here").await;
    no_reconnect(&before);
    for line in ["alice: while frozen\n", "bob: still here\n"] {
        assert_eq!(carol.line().await, line);
    }

    alice.finish().await;
    bob.finish().await;
    node.stop().await;
}

#[tokio::test]
async fn after_left_the_final_state_has_what_came_in_and_the_server_stands_by() {
    if !root() {
        return;
    }
    let node = Node::start("127.0.0.1:0", "vm-a", |_| {}).await;
    let mut agent = node.agent(HERE).await;
    let (alice, mut bob, carol) = room_of_three(node.addr).await;

    let (mut frames, _ready) = destination(node.destination(), Some(Reply::Ready));
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent.handover(2).await;
    let state = State::decode(&next_frame(&mut frames).await).unwrap();
    assert_eq!(agent.handed_over(2).await, None, "handed over");

    // Said after the freeze: the parked socket takes it in, so only the final state has it.
    alice.say("after the freeze").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent
        .send(AgentEvent::Left {
            workload: WORKLOAD.into(),
            generation: 1,
        })
        .await;
    let last = Final::decode(&next_frame(&mut frames).await, state.connections.len()).unwrap();
    let alices = state
        .connections
        .iter()
        .position(|c| c.nick.as_ref().is_some_and(|n| n.as_str() == "alice"))
        .unwrap();
    let shipped = &state.connections[alices].socket;
    let fresh = &last.sockets[alices];
    assert_eq!((fresh.local, fresh.peer), (shipped.local, shipped.peer));
    assert!(!shipped.recv_queue.ends_with(b"after the freeze\n"));
    assert!(
        fresh.recv_queue.ends_with(b"after the freeze\n"),
        "{:?}",
        String::from_utf8_lossy(&fresh.recv_queue)
    );

    // The server stands by: it serves a newcomer, in an empty room.
    let mut dave = Raw::join(node.addr, "dave").await;
    let ((), last_words) = tokio::join!(node.stop(), async move { dave.line().await });
    assert_eq!(last_words, "* server shutting down\n");

    // The test takes bob's connection on where the server left it: he notices nothing.
    let bobs = state
        .connections
        .iter()
        .position(|c| c.nick.as_ref().is_some_and(|n| n.as_str() == "bob"))
        .unwrap();
    let mut taken = restore(&last.sockets[bobs]).unwrap();
    std::io::Write::write_all(&mut taken, &state.connections[bobs].pending).unwrap();
    std::io::Write::write_all(&mut taken, b"test: after the move\n").unwrap();
    let before = bob.expect_line("test: after the move").await;
    no_reconnect(&before);
    drop(carol);
    alice.finish().await;
    drop(taken);
    bob.finish().await;
}

#[tokio::test]
async fn without_left_the_connections_go_on_here() {
    if !root() {
        return;
    }
    let node = Node::start("127.0.0.1:0", "vm-a", |c| {
        c.outcome_timeout = Duration::from_millis(500);
    })
    .await;
    let mut agent = node.agent(HERE).await;
    let (mut alice, mut bob, mut carol) = room_of_three(node.addr).await;
    let (mut frames, _ready) = destination(node.destination(), Some(Reply::Ready));
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent.handover(2).await;
    next_frame(&mut frames).await;
    assert_eq!(agent.handed_over(2).await, None);
    alice.say("while parked").await;
    // No left comes: the move did not happen, and the room goes on here.
    let before = bob.expect_line("alice: while parked").await;
    no_reconnect(&before);
    bob.say("back").await;
    let before = alice.expect_line("bob: back").await;
    no_reconnect(&before);
    assert_eq!(carol.line().await, "alice: while parked\n");
    alice.finish().await;
    bob.finish().await;
    node.stop().await;
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
async fn hand_in(from: &str, node: &Node, body: &[u8]) -> (TcpStream, Reply) {
    let to = SocketAddr::new(ip(HERE), node.handover_port);
    for _ in 0..50 {
        let mut stream = connect_from(from, to).await;
        if stream.write_all(body).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        match read_frame(&mut stream).await {
            Ok(reply) => return (stream, Reply::decode(&reply).unwrap()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("no reply from the node's handover port");
}

#[tokio::test]
async fn handovers_come_only_from_the_holder_and_bad_ones_are_named() {
    if !root() {
        return;
    }
    let node = Node::start("127.0.0.1:0", "vm-c", |_| {}).await;
    // The holder is at THERE; HERE is a stranger.
    let _agent = node.agent(THERE).await;
    let handovers = SocketAddr::new(ip(HERE), node.handover_port);

    let state = State {
        workload: WORKLOAD.into(),
        generation: 2,
        from: "vm-x".into(),
        connections: Vec::new(),
    };
    let refusal = |body: Vec<u8>| {
        let node = &node;
        async move {
            match hand_in(THERE, node, &body).await.1 {
                Reply::Refused(why) => why,
                Reply::Ready => panic!("ready for a bad handover"),
            }
        }
    };
    let why = refusal(migrate::frame(b"{\"kind\":\"state\"}")).await;
    assert_eq!(why, "version: missing");
    let other = State {
        workload: "kv".into(),
        ..state.clone()
    };
    let why = refusal(migrate::frame(&other.encode())).await;
    assert!(why.starts_with("workload: \"kv\""), "{why}");
    let why = refusal(((migrate::MAX_MESSAGE + 1) as u32).to_be_bytes().to_vec()).await;
    assert!(why.contains("over the limit"), "{why}");

    // The node knows the holder now. A stranger gets no answer, even with a good state.
    let mut stranger = connect_from(HERE, handovers).await;
    let _ = stranger.write_all(&migrate::frame(&state.encode())).await;
    let mut rest = Vec::new();
    let read = timeout(WAIT, stranger.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(
        read.is_err() || rest.is_empty(),
        "a stranger gets no answer: {rest:?}"
    );

    // The same state from the holder is taken (an empty room).
    let (_, reply) = hand_in(THERE, &node, &migrate::frame(&state.encode())).await;
    assert_eq!(reply, Reply::Ready);
    node.stop().await;
}

#[tokio::test]
async fn a_destination_serves_a_connection_on_arrival_with_what_reached_the_source_late() {
    if !root() {
        return;
    }
    // The test plays the source: a connection to 127.0.0.1:P, frozen; then dave says
    // something that the parked socket takes in, and its state is read again (as the source
    // does on left) and it is let go.
    let first = TcpListener::bind((ip(HERE), 0)).await.unwrap();
    let addr = first.local_addr().unwrap();
    let mut dave = TcpStream::connect(addr).await.unwrap();
    let (served, _) = first.accept().await.unwrap();
    let (at_freeze, parked) = freeze(served.into_std().unwrap()).unwrap();
    dave.write_all(b"lo\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let at_left = parked.state().unwrap();
    assert!(
        at_left.recv_queue.ends_with(b"lo\n"),
        "the parked socket took it in"
    );
    parked.discard();
    drop(first);

    // The destination listens on the same address and port, as on the workload address.
    let node = Node::start(&addr.to_string(), "vm-c", |_| {}).await;
    let mut agent = node.agent(HERE).await;
    let mut erin = Client::start(node.addr, "erin");
    erin.expect_line("* welcome to the room on vm-c").await;

    let state = State {
        workload: WORKLOAD.into(),
        generation: 2,
        from: "vm-a".into(),
        connections: vec![Connection {
            socket: at_freeze,
            nick: Some(Nick::parse("dave").unwrap()),
            unread: b"hel".to_vec(),
            pending: b"* welcome to the room on vm-a\n".to_vec(),
        }],
    };
    let (mut source, reply) = hand_in(HERE, &node, &migrate::frame(&state.encode())).await;
    assert_eq!(reply, Reply::Ready);
    let last = Final {
        sockets: vec![at_left],
    };
    source
        .write_all(&migrate::frame(&last.encode()))
        .await
        .unwrap();
    agent
        .send(AgentEvent::Arrived {
            workload: WORKLOAD.into(),
            generation: 2,
        })
        .await;

    let mut dave = BufReader::new(dave);
    let mut line = String::new();
    timeout(WAIT, dave.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        line, "* welcome to the room on vm-a\n",
        "pending output first"
    );
    let before = erin.expect_line("dave: hello").await;
    assert!(
        !before.contains(&ClientEvent::Line("* dave joined".into())),
        "dave rejoins without a word: {before:?}"
    );
    erin.say("hi dave").await;
    line.clear();
    timeout(WAIT, dave.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "erin: hi dave\n");
    erin.finish().await;
    node.stop().await;
}

#[tokio::test]
async fn without_arrival_held_connections_are_let_go() {
    if !root() {
        return;
    }
    let first = TcpListener::bind((ip(HERE), 0)).await.unwrap();
    let addr = first.local_addr().unwrap();
    let mut dave = TcpStream::connect(addr).await.unwrap();
    let (served, _) = first.accept().await.unwrap();
    let (socket, parked) = freeze(served.into_std().unwrap()).unwrap();
    parked.discard();
    drop(first);
    let node = Node::start(&addr.to_string(), "vm-c", |c| {
        c.outcome_timeout = Duration::from_millis(300);
    })
    .await;
    let _agent = node.agent(HERE).await;
    let state = State {
        workload: WORKLOAD.into(),
        generation: 2,
        from: "vm-a".into(),
        connections: vec![Connection {
            socket,
            nick: Some(Nick::parse("dave").unwrap()),
            unread: Vec::new(),
            pending: Vec::new(),
        }],
    };
    let (_source, reply) = hand_in(HERE, &node, &migrate::frame(&state.encode())).await;
    assert_eq!(reply, Reply::Ready);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Nothing holds the connection here any more: the listener's port answers with a reset.
    dave.write_all(b"anyone?\n").await.unwrap();
    let mut buf = [0u8; 16];
    let read = timeout(WAIT, dave.read(&mut buf)).await.unwrap();
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    node.stop().await;
}
