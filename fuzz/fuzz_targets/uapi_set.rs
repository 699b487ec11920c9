//! UAPI `set=1` requests: `meshlink_agent::uapi::apply_set`, the pure function that turns the
//! lines of a request from `wg(8)` (or anything that can open the socket) into a new desired
//! `DeviceConfig`, and `render_get`, its `get=1` counterpart.
//!
//! Input: the request body (lossily UTF-8), applied to a device with two peers. An accepted
//! request must leave a configuration the data plane can take as it is: one entry per public
//! key, never the device's own, each allowed IP with its host bits cleared and held by one peer
//! only, no zero keepalive, fwmark or preshared key. And `get=1` must say all of it: its lines,
//! less the statistics and with `replace_peers=true`, set on another device, give the same
//! configuration (endpoints as `get=1` shows them, IPv4-mapped IPv6 as IPv4). A refused
//! request's error (which the server logs) never repeats a key from a `private_key` or
//! `preshared_key` line.

#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshlink_agent::settings::{DeviceConfig, PeerConfig, PrivateKey};
use meshlink_agent::uapi::{apply_set, render_get, DeviceStatus};

fuzz_target!(|data: &[u8]| {
    let request = String::from_utf8_lossy(data);
    let new = match apply_set(base(), &request) {
        Ok(new) => new,
        Err(e) => {
            secret_not_repeated(&request, &e.to_string());
            return;
        }
    };
    check(&new);

    let get = render_get(&new, &DeviceStatus::default());
    assert!(get.ends_with("errno=0\n\n"));
    let mut set = String::new();
    let mut replaced = false;
    for line in get.lines() {
        let key = line.split('=').next().unwrap_or("");
        if line.is_empty()
            || matches!(
                key,
                "errno"
                    | "last_handshake_time_sec"
                    | "last_handshake_time_nsec"
                    | "tx_bytes"
                    | "rx_bytes"
            )
        {
            continue;
        }
        if key == "public_key" && !replaced {
            set.push_str("replace_peers=true\n");
            replaced = true;
        }
        set.push_str(line);
        set.push('\n');
    }
    if !replaced {
        set.push_str("replace_peers=true\n");
    }
    let again = apply_set(other(), &set)
        .unwrap_or_else(|e| panic!("get=1 output does not set: {e}\n{set}"));
    let mut want = new.clone();
    for p in &mut want.peers {
        p.endpoint = p.endpoint.map(shown);
    }
    assert_eq!(
        again, want,
        "get=1 then set=1 does not give the configuration back\n{set}"
    );
});

/// A key given on a `private_key` or `preshared_key` line is not in the error (the server logs
/// errors): wherever a run of 16 hex digits of such a line appears in the request, it is on
/// such lines only, and then the message must not hold it. Errors quote other values
/// escaped (`{:?}`), so a run is also elsewhere when another line's escaped form holds it:
/// `\0` before `000...` shows one more `0` than the line has.
fn secret_not_repeated(request: &str, message: &str) {
    for line in request.lines() {
        if !(line.starts_with("private_key") || line.starts_with("preshared_key")) {
            continue;
        }
        let digits: Vec<char> = line.chars().collect();
        for w in digits.windows(16) {
            if !w.iter().all(char::is_ascii_hexdigit) {
                continue;
            }
            let run: String = w.iter().collect();
            let elsewhere = request.lines().any(|l| {
                (l.contains(&run) || format!("{l:?}").contains(&run))
                    && !(l.starts_with("private_key") || l.starts_with("preshared_key"))
            });
            if !elsewhere {
                assert!(
                    !message.contains(&run),
                    "an error repeats a secret: {message:?}"
                );
            }
        }
    }
}

/// What the data plane relies on in a configuration.
fn check(c: &DeviceConfig) {
    let own = c.private_key.public_key();
    assert_ne!(c.fwmark, Some(0));
    for (i, p) in c.peers.iter().enumerate() {
        assert_ne!(p.public_key, own, "the device is its own peer");
        assert!(
            c.peers[..i].iter().all(|q| q.public_key != p.public_key),
            "two peers with one key"
        );
        assert_ne!(p.persistent_keepalive, Some(0));
        assert!(!p.preshared_key.is_some_and(|k| k.is_zero()));
        for (j, net) in p.allowed_ips.iter().enumerate() {
            assert_eq!(net.trunc(), *net, "host bits left in an allowed IP");
            assert!(
                !p.allowed_ips[..j].contains(net),
                "an allowed IP twice in a peer"
            );
            for q in &c.peers[..i] {
                assert!(
                    !q.allowed_ips.contains(net),
                    "an allowed IP held by two peers"
                );
            }
        }
    }
}

/// An endpoint as `get=1` shows it.
fn shown(e: SocketAddr) -> SocketAddr {
    match e {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => e,
        },
        SocketAddr::V4(_) => e,
    }
}

fn peer(seed: u8, nets: &[&str]) -> PeerConfig {
    PeerConfig {
        public_key: PrivateKey::from_bytes([seed; 32]).public_key(),
        preshared_key: None,
        endpoint: Some(SocketAddr::from(([198, 18, 0, seed], 51820))),
        allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
        persistent_keepalive: Some(25),
    }
}

/// A device with key 1 and peers 2 and 3.
fn base() -> &'static DeviceConfig {
    static BASE: OnceLock<DeviceConfig> = OnceLock::new();
    BASE.get_or_init(|| DeviceConfig {
        private_key: PrivateKey::from_bytes([1; 32]),
        listen_port: 51820,
        fwmark: None,
        peers: vec![
            peer(2, &["100.64.0.2/32", "10.2.0.0/16"]),
            peer(3, &["100.64.0.3/32", "fd00::3/128"]),
        ],
    })
}

/// Another device, which `get=1` of the first, set on it, must turn into the first.
fn other() -> &'static DeviceConfig {
    static OTHER: OnceLock<DeviceConfig> = OnceLock::new();
    OTHER.get_or_init(|| DeviceConfig {
        private_key: PrivateKey::from_bytes([9; 32]),
        listen_port: 1,
        fwmark: None,
        peers: vec![peer(9, &["10.9.0.0/16"])],
    })
}
