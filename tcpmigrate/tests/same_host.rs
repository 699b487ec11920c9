//! A connection frozen and restored on the same host (loopback): the client's socket never
//! notices, in either direction, including bytes that were queued on both sides at the
//! freeze. Needs root (TCP repair mode); without it the test fails under `CI=true` and
//! says so otherwise.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use meshlink_tcp_migrate::{freeze, restore, restore_held, Frozen, MigrateError};

use meshlink_tcp_migrate::handover::testing::root;

fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    (client, server)
}

fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn a_connection_survives_freeze_and_restore() {
    if !root() {
        return;
    }
    let (mut client, mut server) = pair();
    client.write_all(b"before").unwrap();
    assert_eq!(read_exact(&mut server, 6), b"before");
    // Bytes in the server's receive queue at the freeze: shipped and read after it.
    client.write_all(b"unread").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (frozen, parked) = freeze(server).unwrap();
    assert_eq!(frozen.recv_queue, b"unread");
    let shipped = Frozen::decode(&frozen.encode()).unwrap();
    parked.discard();
    let mut server = restore(&shipped).unwrap();
    assert_eq!(server.local_addr().unwrap(), frozen.local);
    assert_eq!(server.peer_addr().unwrap(), frozen.peer);
    assert_eq!(read_exact(&mut server, 6), b"unread");
    // Both directions go on, in bulk.
    let bulk: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let expect = bulk.clone();
    let writer = std::thread::spawn(move || {
        server.write_all(&bulk).unwrap();
        let echoed = read_exact(&mut server, 5);
        (server, echoed)
    });
    assert_eq!(read_exact(&mut client, expect.len()), expect);
    client.write_all(b"after").unwrap();
    let (_server, echoed) = writer.join().unwrap();
    assert_eq!(echoed, b"after");
}

#[test]
fn a_connection_resumed_where_it_was_goes_on() {
    if !root() {
        return;
    }
    let (mut client, server) = pair();
    let (_frozen, parked) = freeze(server).unwrap();
    let mut server = parked.resume().unwrap();
    client.write_all(b"ping").unwrap();
    assert_eq!(read_exact(&mut server, 4), b"ping");
    server.write_all(b"pong").unwrap();
    assert_eq!(read_exact(&mut client, 4), b"pong");
}

#[test]
fn only_an_established_connection_freezes() {
    if !root() {
        return;
    }
    let (client, mut server) = pair();
    drop(client);
    let mut buf = [0u8; 1];
    assert_eq!(server.read(&mut buf).unwrap(), 0);
    match freeze(server) {
        Err(MigrateError::NotEstablished(state)) => assert_ne!(state, 1),
        other => panic!("expected NotEstablished, got {other:?}"),
    }
}

/// A connection restored but held in repair mode draws no reset: what the client sends
/// meanwhile is not lost (the held socket takes it in, as any socket in repair mode does),
/// and is read once it goes live.
#[test]
fn a_held_restore_is_silent_until_it_goes() {
    if !root() {
        return;
    }
    let (mut client, server) = pair();
    let (frozen, parked) = freeze(server).unwrap();
    parked.discard();
    let held = restore_held(&frozen).unwrap();
    client.write_all(b"while held").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut server = held.go().unwrap();
    assert_eq!(read_exact(&mut server, 10), b"while held");
    server.write_all(b"live").unwrap();
    assert_eq!(read_exact(&mut client, 4), b"live");
}

/// A held copy discarded says nothing to the client (no FIN, no reset): a copy restored
/// after it carries the connection on. (On one host two sockets cannot share the
/// connection's addresses, so the copies come one after the other.)
#[test]
fn a_discarded_held_restore_says_nothing_to_the_client() {
    if !root() {
        return;
    }
    let (mut client, server) = pair();
    let (frozen, parked) = freeze(server).unwrap();
    parked.discard();
    restore_held(&frozen).unwrap().discard();
    std::thread::sleep(Duration::from_millis(100));
    let mut server = restore(&frozen).unwrap();
    client.write_all(b"still here").unwrap();
    assert_eq!(read_exact(&mut server, 10), b"still here");
    server.write_all(b"yes").unwrap();
    assert_eq!(read_exact(&mut client, 3), b"yes");
}

/// What the client sends after the freeze, the parked socket takes in and acknowledges (the
/// client will not send it again): `Parked::state` has it, and a restore from that state
/// carries it on; resumed instead, the parked socket reads it.
#[test]
fn data_sent_after_the_freeze_is_in_the_parked_state() {
    if !root() {
        return;
    }
    for resume in [false, true] {
        let (mut client, server) = pair();
        let (frozen, parked) = freeze(server).unwrap();
        client.write_all(b"late").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            unacknowledged(&client),
            0,
            "acknowledged by the parked socket"
        );
        let last = parked.state().unwrap();
        assert_eq!(last.recv_queue, b"late");
        assert_eq!(last.recv_seq, frozen.recv_seq.wrapping_add(4));
        let mut server = if resume {
            parked.resume().unwrap()
        } else {
            parked.discard();
            restore(&last).unwrap()
        };
        assert_eq!(read_exact(&mut server, 4), b"late");
        server.write_all(b"ok").unwrap();
        assert_eq!(read_exact(&mut client, 2), b"ok");
    }
}

/// Bytes in a socket's send queue not acknowledged yet: the Send-Q column of `ss` for the
/// connection from its local port.
fn unacknowledged(s: &TcpStream) -> usize {
    let port = s.local_addr().unwrap().port();
    let out = std::process::Command::new("ss")
        .args([
            "-tnH",
            "state",
            "established",
            "src",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no connection from port {port}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A destination restores while its own listener holds the port (a standby server listening
/// on the workload address): the restore binds all the same.
#[test]
fn a_restore_binds_beside_a_listener_on_the_port() {
    if !root() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (server, _) = listener.accept().unwrap();
    let (frozen, parked) = freeze(server).unwrap();
    parked.discard();
    let mut server = restore_held(&frozen).unwrap().go().unwrap();
    client.write_all(b"hi").unwrap();
    assert_eq!(read_exact(&mut server, 2), b"hi");
    drop(listener);
}

/// While the client keeps sending into a parked socket, every state read has a receive
/// sequence number that matches its queue (the queue starts where it started at the freeze:
/// nobody reads it), however the segments fall between the reads.
#[test]
fn a_parked_state_read_under_incoming_data_is_consistent() {
    if !root() {
        return;
    }
    let (mut client, server) = pair();
    let (frozen, parked) = freeze(server).unwrap();
    let start = |f: &Frozen| {
        f.recv_seq
            .wrapping_sub(u32::try_from(f.recv_queue.len()).unwrap())
    };
    let base = start(&frozen);
    let sender = std::thread::spawn(move || {
        for i in 0..2000u32 {
            client.write_all(&[(i % 251) as u8]).unwrap();
            std::thread::sleep(Duration::from_micros(100));
        }
        client
    });
    let mut grew = 0;
    let mut last = 0;
    while !sender.is_finished() {
        let f = parked.state().unwrap();
        assert_eq!(start(&f), base, "a receive sequence number off its queue");
        if f.recv_queue.len() > last {
            grew += 1;
            last = f.recv_queue.len();
        }
    }
    let _client = sender.join().unwrap();
    assert!(grew > 10, "the queue grew while it was read ({grew} times)");
    parked.discard();
}

/// A held copy restored from the freeze takes in, in place, what the parked socket received
/// after it (its last state): nothing the client saw acknowledged is lost. A state of another
/// connection, or an older one, is refused with the field named.
#[test]
fn a_held_copy_catches_up_with_the_last_state() {
    if !root() {
        return;
    }
    let (mut client, server) = pair();
    let (frozen, parked) = freeze(server).unwrap();
    client.write_all(b"late").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let last = parked.state().unwrap();
    parked.discard();
    let mut held = restore_held(&frozen).unwrap();
    let mut other = last.clone();
    other.peer.set_port(other.peer.port().wrapping_add(1));
    let err = held.catch_up(&other).unwrap_err().to_string();
    assert!(err.contains("local/peer"), "{err}");
    assert_eq!(
        held.catch_up(&frozen).unwrap(),
        0,
        "nothing new in the same state"
    );
    assert_eq!(held.catch_up(&last).unwrap(), 4);
    let err = held.catch_up(&frozen).unwrap_err().to_string();
    assert!(err.contains("recv_seq"), "an older state: {err}");
    let mut server = held.go().unwrap();
    assert_eq!(read_exact(&mut server, 4), b"late");
    server.write_all(b"ok").unwrap();
    assert_eq!(read_exact(&mut client, 2), b"ok");
}

/// A held copy takes in, as sent, whatever the parked socket sent after the freeze, however
/// much that is: writing the send queue in repair mode never waits for room in the
/// send buffer (it would wait for ever: nothing drains a held socket). The peer's small MSS
/// keeps the copy's own send buffer small, as on a tunnel.
#[test]
fn a_held_copy_catches_up_with_much_sent_after_the_freeze() {
    if !root() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let small = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    small.set_tcp_mss(536).unwrap();
    small
        .connect(&listener.local_addr().unwrap().into())
        .unwrap();
    let mut client: TcpStream = small.into();
    let (mut server, _) = listener.accept().unwrap();
    drop(listener);
    socket2::SockRef::from(&server)
        .set_send_buffer_size(1 << 20)
        .unwrap();
    server.set_nonblocking(true).unwrap();
    let chunk = vec![3u8; 64 * 1024];
    let mut written = 0usize;
    loop {
        match server.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    server.set_nonblocking(false).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (frozen, parked) = freeze(server).unwrap();
    // The client reads what it has: its window opens, and the parked socket sends what the
    // window lets it.
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = client.read(&mut buf) {
        if n == 0 {
            break;
        }
        got += n;
    }
    let last = parked.state().unwrap();
    assert!(
        frozen.unsent - last.unsent > 128 << 10,
        "{} bytes counted as sent after the freeze",
        frozen.unsent - last.unsent
    );
    parked.discard();
    let mut held = restore_held(&frozen).unwrap();
    let (done, caught_up) = std::sync::mpsc::channel();
    let catching = std::thread::spawn(move || {
        let result = held.catch_up(&last).map(|_| ());
        let _ = done.send(());
        result.map(|()| held)
    });
    assert!(
        caught_up.recv_timeout(Duration::from_secs(5)).is_ok(),
        "catch_up waited for room in the send buffer"
    );
    let mut server = catching.join().unwrap().unwrap().go().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let rest = written - got;
    assert_eq!(read_exact(&mut client, rest).len(), rest);
    server.write_all(b"end").unwrap();
    assert_eq!(read_exact(&mut client, 3), b"end");
}
