//! The server and the client through the library, on 127.0.0.1 with ephemeral ports.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use meshlink_chat::client::ClientEvent;
use meshlink_chat::protocol::MAX_LINE;
use meshlink_chat::server::{self, ServerConfig};

mod support;
use support::{is_connected, is_disconnected, Client, WAIT};

struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(addr: &str, config: ServerConfig) -> Server {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async {
            let _ = stopped.await;
        }));
        Server { addr, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        timeout(WAIT, self.task).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn two_clients_talk() {
    let server = Server::start("127.0.0.1:0", ServerConfig::new("test")).await;
    let mut alice = Client::start(server.addr, "alice");
    alice.expect(is_connected).await;
    alice.expect_line("* welcome to the room on test").await;
    let mut bob = Client::start(server.addr, "bob");
    bob.expect_line("* welcome to the room on test").await;
    alice.expect_line("* bob joined").await;

    alice.say("hello bob").await;
    bob.expect_line("alice: hello bob").await;
    bob.say("hi alice").await;
    let before = alice.expect_line("bob: hi alice").await;
    assert!(before.is_empty(), "alice does not hear herself: {before:?}");

    alice.finish().await;
    bob.expect_line("* alice left").await;
    bob.finish().await;
    server.stop().await;
}

#[tokio::test]
async fn client_follows_the_server_to_a_new_start() {
    let first = Server::start("127.0.0.1:0", ServerConfig::new("one")).await;
    let addr = first.addr;
    let mut alice = Client::start(addr, "alice");
    alice.expect_line("* welcome to the room on one").await;

    first.stop().await;
    alice.expect_line("* server shutting down").await;
    alice.expect(is_disconnected).await;

    // The same address, as when the workload address has moved to another VM.
    let second = Server::start(&addr.to_string(), ServerConfig::new("two")).await;
    alice.expect(is_connected).await;
    alice.expect_line("* welcome to the room on two").await;
    let mut bob = Client::start(addr, "bob");
    bob.expect_line("* welcome to the room on two").await;
    alice.expect_line("* bob joined").await;
    alice.say("back again").await;
    bob.expect_line("alice: back again").await;
    bob.say("welcome back").await;
    alice.expect_line("bob: welcome back").await;

    alice.finish().await;
    bob.finish().await;
    second.stop().await;
}

#[tokio::test]
async fn lines_typed_while_away_are_sent_after_connecting() {
    // Find a free port, then leave it closed for a while.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut alice = Client::start(addr, "alice");
    alice
        .expect(|e| matches!(e, ClientEvent::ConnectFailed { attempt: 1, .. }))
        .await;
    alice.say("one").await;
    alice.say("two").await;

    let listener = TcpListener::bind(addr).await.unwrap();
    let (stream, _) = timeout(WAIT, listener.accept()).await.unwrap().unwrap();
    let mut lines = BufReader::new(stream).lines();
    for expected in ["NICK alice", "one", "two"] {
        let line = timeout(WAIT, lines.next_line()).await.unwrap().unwrap();
        assert_eq!(line.as_deref(), Some(expected));
    }
    alice.expect(is_connected).await;
    alice.finish().await;
}

/// Sends `first` on a new connection and returns what the server says until it closes.
async fn refused(addr: SocketAddr, first: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(first).await.unwrap();
    let mut answer = String::new();
    timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    answer
}

#[tokio::test]
async fn bad_nicks_are_refused() {
    let server = Server::start("127.0.0.1:0", ServerConfig::new("test")).await;
    for first in [
        "NICK bad nick!\n",
        "NICK \n",
        "hello\n",
        &format!("NICK {}\n", "n".repeat(33)),
    ] {
        assert_eq!(
            refused(server.addr, first.as_bytes()).await,
            "ERR bad nick\n",
            "{first:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn over_long_lines_are_refused() {
    let server = Server::start("127.0.0.1:0", ServerConfig::new("test")).await;
    let mut bob = Client::start(server.addr, "bob");
    bob.expect_line("* welcome to the room on test").await;

    let longest = "x".repeat(MAX_LINE);
    let hello = format!("NICK carol\n{longest}\n{longest}y\nnever seen\n");
    let answer = refused(server.addr, hello.as_bytes()).await;
    assert_eq!(answer, "* welcome to the room on test\nERR line too long\n");
    bob.expect_line("* carol joined").await;
    bob.expect_line(&format!("carol: {longest}")).await;
    let before = bob.expect_line("* carol left").await;
    assert!(before.is_empty(), "{before:?}");

    bob.finish().await;
    server.stop().await;
}

#[tokio::test]
async fn a_reader_too_slow_is_dropped_and_the_room_goes_on() {
    let mut config = ServerConfig::new("test");
    config.outbox_len = 8;
    let server = Server::start("127.0.0.1:0", config).await;
    // Joins and never reads.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"NICK slow\n").await.unwrap();
    let mut alice = Client::start(server.addr, "alice");
    alice.expect_line("* welcome to the room on test").await;
    let mut bob = Client::start(server.addr, "bob");
    bob.expect_line("* welcome to the room on test").await;

    // Enough to fill the socket buffers on both sides and then the outbox.
    let line = "z".repeat(4000);
    let sender = tokio::spawn({
        let input = alice.input.clone().unwrap();
        async move {
            for _ in 0..2000 {
                input.send(line.clone()).await.unwrap();
            }
            input.send("done".into()).await.unwrap();
        }
    });
    bob.expect_line("* slow left").await;
    bob.expect_line("alice: done").await;
    timeout(WAIT, sender).await.unwrap().unwrap();

    alice.finish().await;
    bob.finish().await;
    server.stop().await;
}
