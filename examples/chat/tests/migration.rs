//! The chat's part of live migration through the library, on loopback with the stand-in
//! agent of `meshlink_tcp_migrate::handover::testing` and the test playing the other server.
//! Needs root (TCP repair mode); without it the tests fail under `CI=true` and are skipped
//! otherwise. What is not the chat's (handovers only from the holder, held connections let
//! go without an arrival, the wire format) is tested in `meshlink-tcp-migrate`.
//!
//! A whole move between two servers cannot run on one host (the restored socket would share
//! its addresses with the parked one), so each test plays one side: the source against a
//! destination that stays silent, says ready, or never sees left; the destination against a
//! source that ships a real frozen connection.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use meshlink_chat::client::ClientEvent;
use meshlink_chat::handover::{self, Config};
use meshlink_chat::migrate::Chat;
use meshlink_chat::protocol::Nick;
use meshlink_chat::server::{ServerConfig, Session};
use meshlink_tcp_migrate::handover::testing::{
    destination, next_frame, root, AgentSocket, FakeAgent,
};
use meshlink_tcp_migrate::handover::wire::{self, Connection, Final, Reply, State};
use meshlink_tcp_migrate::handover::Application;
use meshlink_tcp_migrate::{freeze, restore};

mod support;
use support::{is_connected, is_disconnected, Client, WAIT};

const WORKLOAD: &str = "chat";
const HERE: &str = "127.0.0.1";
/// The destination's (or a stranger's) address: loopback, but not the server's.
const THERE: &str = "127.0.0.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A migrating server on loopback with its fake agent.
struct Node {
    addr: SocketAddr,
    handover_port: u16,
    agents: AgentSocket,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(listen: &str, name: &str, tune: impl FnOnce(&mut Config)) -> Node {
        // The server's log lines, shown for a failing test.
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
        self.agents.accept(WORKLOAD, ("vm-a", ip(holder))).await
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

/// Nothing between `before` and now was a reconnection.
fn no_reconnect(before: &[ClientEvent]) {
    assert!(
        !before.iter().any(|e| is_connected(e) || is_disconnected(e)),
        "the client reconnected: {before:?}"
    );
}

/// Each connection's session in a state, decoded as the destination would.
fn sessions(state: &State) -> Vec<Session> {
    state
        .connections
        .iter()
        .map(|c| Chat::decode_session(&c.session).unwrap())
        .collect()
}

/// The index of `nick`'s connection in `sessions`.
fn position(sessions: &[Session], nick: &str) -> usize {
    sessions
        .iter()
        .position(|s| s.nick.as_ref().is_some_and(|n| n.as_str() == nick))
        .unwrap_or_else(|| panic!("no session of {nick}"))
}

fn nicks(sessions: &[Session]) -> Vec<Option<String>> {
    let mut nicks: Vec<_> = sessions
        .iter()
        .map(|s| s.nick.as_ref().map(|n| n.to_string()))
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
    // The server reads it as a line in progress (not left in the socket's queue).
    tokio::time::sleep(Duration::from_millis(50)).await;

    let (mut frames, silent) = destination(node.destination(), None);
    agent.handover(2, "vm-c", ip(THERE)).await;
    let state = State::decode(&next_frame(&mut frames).await).unwrap();
    assert_eq!(
        (
            state.format.as_str(),
            state.workload.as_str(),
            state.generation
        ),
        (Chat::FORMAT, WORKLOAD, 2)
    );
    let shipped = sessions(&state);
    assert_eq!(
        nicks(&shipped),
        [
            Some("alice".into()),
            Some("bob".into()),
            Some("carol".into())
        ]
    );
    assert_eq!(
        shipped[position(&shipped, "carol")].unread,
        b"half a li",
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
    agent.handover(2, "vm-c", ip(THERE)).await;
    let state = State::decode(&next_frame(&mut frames).await).unwrap();
    assert_eq!(agent.handed_over(2).await, None, "handed over");
    let shipped = sessions(&state);

    // Said after the freeze: the parked socket takes it in, so only the final state has it.
    alice.say("after the freeze").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent.left(1).await;
    let last = Final::decode(&next_frame(&mut frames).await, state.connections.len()).unwrap();
    let alices = position(&shipped, "alice");
    let frozen = &state.connections[alices].socket;
    let fresh = &last.sockets[alices];
    assert_eq!((fresh.local, fresh.peer), (frozen.local, frozen.peer));
    assert!(!frozen.recv_queue.ends_with(b"after the freeze\n"));
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
    let bobs = position(&shipped, "bob");
    let mut taken = restore(&last.sockets[bobs]).unwrap();
    std::io::Write::write_all(&mut taken, &shipped[bobs].pending).unwrap();
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
    agent.handover(2, "vm-c", ip(THERE)).await;
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

/// Sends `body` (frames) to a node's handover port from [`HERE`] and reads the reply. Until
/// the node has read the agent's holder event it refuses everyone (closing without a
/// word), so this tries again for a while.
async fn hand_in(node: &Node, body: &[u8]) -> (TcpStream, Reply) {
    let to = SocketAddr::new(ip(HERE), node.handover_port);
    for _ in 0..50 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(ip(HERE), 0)).unwrap();
        let mut stream = socket.connect(to).await.unwrap();
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

    let session = Session {
        nick: Some(Nick::parse("dave").unwrap()),
        membership: None,
        unread: b"hel".to_vec(),
        pending: b"* welcome to the room on vm-a\n".to_vec(),
    };
    let mut state = State {
        format: Chat::FORMAT.into(),
        workload: WORKLOAD.into(),
        generation: 2,
        state: Vec::new(),
        connections: vec![Connection {
            socket: at_freeze,
            session: Chat::encode_session(&session),
        }],
    };
    // A session the chat cannot read is refused, naming the field.
    let good = std::mem::replace(&mut state.connections[0].session, b"\x01!".to_vec());
    let (_, reply) = hand_in(&node, &wire::frame(&state.encode())).await;
    assert_eq!(
        reply,
        Reply::Refused(
            "connections[0].session.nick: a nick is 1-32 characters of A-Z, a-z, 0-9, '_' and '-'"
                .into()
        )
    );
    state.connections[0].session = good;
    let (mut source, reply) = hand_in(&node, &wire::frame(&state.encode())).await;
    assert_eq!(reply, Reply::Ready);
    let last = Final {
        sockets: vec![at_left],
    };
    source
        .write_all(&wire::frame(&last.encode()))
        .await
        .unwrap();
    agent.arrived(2).await;

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
