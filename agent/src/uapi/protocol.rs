//! The protocol, without I/O: the answer to `get=1` ([`render_get`]) and the configuration a
//! `set=1` request asks for ([`apply_set`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::UNIX_EPOCH;

use ipnet::IpNet;
use meshlink_proto::{Key, PublicKey};

use super::{clip, DeviceStatus, PeerStatus, UapiError};
use crate::settings::{DeviceConfig, PeerConfig, PrivateKey};

// ---------------------------------------------------------------------------------------------
// get=1

/// Renders the response to `get=1`: the device's keys and settings from `config`, endpoints and
/// statistics from `status`, ending with `errno=0` and an empty line.
///
/// Peers are listed in configuration order; a configured peer the data plane does not (yet) know
/// shows the configured endpoint and zero statistics. A peer's live endpoint wins over the
/// configured one, since the peer may have roamed; IPv4-mapped IPv6 endpoints are shown as IPv4.
/// `listen_port` is the port actually bound, or the configured one while nothing is bound.
pub fn render_get(config: &DeviceConfig, status: &DeviceStatus) -> String {
    let live: HashMap<&PublicKey, &PeerStatus> =
        status.peers.iter().map(|p| (&p.public_key, p)).collect();
    let listen_port = if status.listen_port != 0 {
        status.listen_port
    } else {
        config.listen_port
    };

    let mut out = String::with_capacity(128 + 400 * config.peers.len());
    line(
        &mut out,
        "private_key",
        config.private_key.to_key().to_hex(),
    );
    line(&mut out, "listen_port", listen_port);
    if let Some(mark) = config.fwmark.filter(|m| *m != 0) {
        line(&mut out, "fwmark", mark);
    }
    for peer in &config.peers {
        let stats = live.get(&peer.public_key).copied();
        line(&mut out, "public_key", Key(peer.public_key.0).to_hex());
        if let Some(psk) = peer.preshared_key.filter(|k| !k.is_zero()) {
            line(&mut out, "preshared_key", psk.to_hex());
        }
        line(&mut out, "protocol_version", 1);
        if let Some(endpoint) = stats.and_then(|s| s.endpoint).or(peer.endpoint) {
            line(&mut out, "endpoint", display_endpoint(endpoint));
        }
        let handshake = stats
            .and_then(|s| s.last_handshake)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        line(&mut out, "last_handshake_time_sec", handshake.as_secs());
        line(
            &mut out,
            "last_handshake_time_nsec",
            handshake.subsec_nanos(),
        );
        line(&mut out, "tx_bytes", stats.map_or(0, |s| s.tx_bytes));
        line(&mut out, "rx_bytes", stats.map_or(0, |s| s.rx_bytes));
        line(
            &mut out,
            "persistent_keepalive_interval",
            peer.persistent_keepalive.unwrap_or(0),
        );
        for net in &peer.allowed_ips {
            line(&mut out, "allowed_ip", net);
        }
    }
    out.push_str("errno=0\n\n");
    out
}

fn line(out: &mut String, key: &str, value: impl std::fmt::Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{key}={value}");
}

/// `a.b.c.d:port` or `[v6]:port`, with IPv4-mapped IPv6 addresses unmapped.
fn display_endpoint(endpoint: SocketAddr) -> String {
    match endpoint {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()).to_string(),
            None => endpoint.to_string(),
        },
        SocketAddr::V4(_) => endpoint.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// set=1

/// The peer section a `set=1` request is in: which peer later peer keys change.
struct PeerSection {
    /// Index of the peer in the new configuration; `None` when the section is ignored (the peer
    /// was removed, is `update_only` and absent, or is this device itself).
    index: Option<usize>,
    /// Whether this section created the peer.
    created: bool,
}

/// Applies the body of a `set=1` request (the lines after `set=1`, up to the empty line) to a copy
/// of `current` and returns the new desired configuration. Empty lines are skipped.
///
/// Device keys: `private_key` (hex; all-zero is refused), `listen_port`, `fwmark` (0 = none),
/// `replace_peers=true`. Then `public_key=HEX` opens a peer section (creating the peer if new),
/// whose keys are `remove=true`, `update_only=true` (drop the section if the peer is new),
/// `preshared_key` (all-zero = none), `endpoint` (`a.b.c.d:port` or `[v6]:port`),
/// `persistent_keepalive_interval` (0 = off), `replace_allowed_ips=true`, `allowed_ip=CIDR`
/// (host bits cleared, duplicates skipped, and taken away from any other peer that had it, as the
/// kernel's routing table does) and `protocol_version=1`. A section for this device's own public
/// key is ignored, and setting a private key removes the peer with the matching public key, both as
/// the kernel module does.
///
/// # Errors
/// The first unknown key, malformed line or unparsable value; `current` is never modified.
pub fn apply_set(current: &DeviceConfig, request: &str) -> Result<DeviceConfig, UapiError> {
    let mut new = current.clone();
    let mut section: Option<PeerSection> = None;
    for text in request.split('\n') {
        if text.is_empty() {
            continue;
        }
        let (key, value) = text.split_once('=').ok_or_else(|| {
            UapiError::Malformed(format!(
                "a line without '=' (starting {})",
                crate::untrusted::key_name(text.split(' ').next().unwrap_or(""))
            ))
        })?;
        if key == "public_key" {
            let public_key = PublicKey(parse_hex_key(key, value)?.0);
            section = Some(open_peer(&mut new, public_key));
            continue;
        }
        match section.as_mut() {
            None => set_device_key(&mut new, key, value)?,
            Some(s) => set_peer_key(&mut new, s, key, value)?,
        }
    }
    Ok(new)
}

fn open_peer(config: &mut DeviceConfig, public_key: PublicKey) -> PeerSection {
    if public_key == config.private_key.public_key() {
        return PeerSection {
            index: None,
            created: false,
        };
    }
    if let Some(index) = config.peers.iter().position(|p| p.public_key == public_key) {
        return PeerSection {
            index: Some(index),
            created: false,
        };
    }
    config.peers.push(PeerConfig {
        public_key,
        preshared_key: None,
        endpoint: None,
        allowed_ips: Vec::new(),
        persistent_keepalive: None,
    });
    PeerSection {
        index: Some(config.peers.len() - 1),
        created: true,
    }
}

fn set_device_key(config: &mut DeviceConfig, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "private_key" => {
            let k = parse_hex_key(key, value)?;
            if k.is_zero() {
                return Err(UapiError::RemovePrivateKey);
            }
            config.private_key = PrivateKey::from_bytes(k.0);
            let own = config.private_key.public_key();
            config.peers.retain(|p| p.public_key != own);
        }
        "listen_port" => config.listen_port = parse_uint(key, value)?,
        "fwmark" => {
            let mark: u32 = parse_uint(key, value)?;
            config.fwmark = (mark != 0).then_some(mark);
        }
        "replace_peers" => {
            expect_true(key, value)?;
            config.peers.clear();
        }
        _ => {
            return Err(UapiError::UnknownKey {
                scope: "device",
                key: crate::untrusted::key_name(key),
            })
        }
    }
    Ok(())
}

fn set_peer_key(
    config: &mut DeviceConfig,
    section: &mut PeerSection,
    key: &str,
    value: &str,
) -> Result<(), UapiError> {
    match key {
        "remove" => {
            expect_true(key, value)?;
            if let Some(index) = section.index.take() {
                config.peers.remove(index);
            }
        }
        "update_only" => {
            expect_true(key, value)?;
            if section.created {
                if let Some(index) = section.index.take() {
                    config.peers.remove(index);
                }
            }
        }
        "preshared_key" => {
            let k = parse_hex_key(key, value)?;
            if let Some(peer) = section_peer(config, section) {
                peer.preshared_key = (!k.is_zero()).then_some(k);
            }
        }
        "endpoint" => {
            let endpoint = SocketAddr::from_str(value).map_err(|_| {
                UapiError::invalid(
                    key,
                    format!("{:?} is not IP:PORT or [IPv6]:PORT", clip(value)),
                )
            })?;
            if let Some(peer) = section_peer(config, section) {
                peer.endpoint = Some(endpoint);
            }
        }
        "persistent_keepalive_interval" => {
            let seconds: u16 = parse_uint(key, value)?;
            if let Some(peer) = section_peer(config, section) {
                peer.persistent_keepalive = (seconds != 0).then_some(seconds);
            }
        }
        "replace_allowed_ips" => {
            expect_true(key, value)?;
            if let Some(peer) = section_peer(config, section) {
                peer.allowed_ips.clear();
            }
        }
        "allowed_ip" => {
            let net = IpNet::from_str(value)
                .map_err(|_| UapiError::invalid(key, format!("{:?} is not a CIDR", clip(value))))?
                .trunc();
            if let Some(index) = section.index {
                for (i, peer) in config.peers.iter_mut().enumerate() {
                    if i == index {
                        if !peer.allowed_ips.contains(&net) {
                            peer.allowed_ips.push(net);
                        }
                    } else {
                        peer.allowed_ips.retain(|n| *n != net);
                    }
                }
            }
        }
        "protocol_version" => {
            if value != "1" {
                return Err(UapiError::ProtocolVersion(clip(value)));
            }
        }
        _ => {
            return Err(UapiError::UnknownKey {
                scope: "peer",
                key: crate::untrusted::key_name(key),
            })
        }
    }
    Ok(())
}

fn section_peer<'a>(
    config: &'a mut DeviceConfig,
    section: &PeerSection,
) -> Option<&'a mut PeerConfig> {
    section.index.and_then(|i| config.peers.get_mut(i))
}

/// 64 hex digits. The message never repeats the value: it may be a secret.
fn parse_hex_key(key: &str, value: &str) -> Result<Key, UapiError> {
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(UapiError::invalid(key, "a key is 64 hex digits"));
    }
    Key::from_hex(value).map_err(|_| UapiError::invalid(key, "a key is 64 hex digits"))
}

/// A decimal unsigned integer: digits only (no sign, no spaces).
fn parse_uint<T: FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    let bad = || UapiError::invalid(key, format!("{:?} is not an integer in range", clip(value)));
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse().map_err(|_| bad())
}

fn expect_true(key: &str, value: &str) -> Result<(), UapiError> {
    if value == "true" {
        Ok(())
    } else {
        Err(UapiError::invalid(
            key,
            format!("the only accepted value is true, got {:?}", clip(value)),
        ))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::uapi::DropCounts;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    pub(crate) fn key_hex(byte: u8) -> String {
        format!("{byte:02x}").repeat(32)
    }

    pub(crate) fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    pub(crate) fn peer(byte: u8, nets: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: PublicKey([byte; 32]),
            preshared_key: None,
            endpoint: None,
            allowed_ips: nets.iter().map(|s| net(s)).collect(),
            persistent_keepalive: None,
        }
    }

    pub(crate) fn sample_config() -> DeviceConfig {
        let mut a = peer(2, &["10.0.0.2/32", "fd00::2/128"]);
        a.preshared_key = Some(Key([9; 32]));
        a.endpoint = Some("192.0.2.1:51820".parse().unwrap());
        a.persistent_keepalive = Some(25);
        let mut b = peer(3, &["10.0.1.0/24"]);
        b.endpoint = Some("[2001:db8::1]:4000".parse().unwrap());
        DeviceConfig {
            private_key: PrivateKey::from_bytes([1; 32]),
            listen_port: 0,
            fwmark: Some(0x42),
            peers: vec![a, b],
        }
    }

    pub(crate) fn sample_status() -> DeviceStatus {
        DeviceStatus {
            listen_port: 51820,
            peers: vec![
                PeerStatus {
                    public_key: PublicKey([2; 32]),
                    // roamed, and reported through a dual-stack socket
                    endpoint: Some(SocketAddr::new(
                        IpAddr::V6(Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped()),
                        1234,
                    )),
                    last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                    tx_bytes: 100,
                    rx_bytes: 200,
                    tx_packets: 0,
                    rx_packets: 0,
                    handshakes: 0,
                    drops: DropCounts::default(),
                },
                PeerStatus {
                    public_key: PublicKey([3; 32]),
                    endpoint: None,
                    last_handshake: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    tx_packets: 0,
                    rx_packets: 0,
                    handshakes: 0,
                    drops: DropCounts::default(),
                },
            ],
        }
    }

    #[test]
    fn render_get_exact_text() {
        // PrivateKey::from_bytes clamps [1; 32] to 00 01 .. 01 41.
        let private = format!("00{}41", "01".repeat(30));
        let expected = format!(
            "private_key={private}\n\
             listen_port=51820\n\
             fwmark=66\n\
             public_key={}\n\
             preshared_key={}\n\
             protocol_version=1\n\
             endpoint=198.51.100.7:1234\n\
             last_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\n\
             tx_bytes=100\n\
             rx_bytes=200\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=10.0.0.2/32\n\
             allowed_ip=fd00::2/128\n\
             public_key={}\n\
             protocol_version=1\n\
             endpoint=[2001:db8::1]:4000\n\
             last_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=0\n\
             rx_bytes=0\n\
             persistent_keepalive_interval=0\n\
             allowed_ip=10.0.1.0/24\n\
             errno=0\n\n",
            key_hex(2),
            key_hex(9),
            key_hex(3),
        );
        assert_eq!(render_get(&sample_config(), &sample_status()), expected);
    }

    #[test]
    fn render_get_without_status_uses_config() {
        let mut config = sample_config();
        config.listen_port = 7000;
        config.fwmark = Some(0);
        let text = render_get(&config, &DeviceStatus::default());
        assert!(text.contains("listen_port=7000\n"));
        assert!(!text.contains("fwmark"));
        assert!(text.contains("endpoint=192.0.2.1:51820\n"));
        assert!(text.ends_with("errno=0\n\n"));
    }

    #[test]
    fn set_adds_peer() {
        let current = sample_config();
        let req = format!(
            "public_key={}\nendpoint=[::1]:9\npersistent_keepalive_interval=10\n\
             allowed_ip=10.9.0.77/16\nallowed_ip=10.9.1.1/16\nprotocol_version=1\n",
            key_hex(4)
        );
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers.len(), 3);
        let p = &new.peers[2];
        assert_eq!(p.public_key, PublicKey([4; 32]));
        assert_eq!(
            p.endpoint,
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 9))
        );
        assert_eq!(p.persistent_keepalive, Some(10));
        assert_eq!(p.allowed_ips, vec![net("10.9.0.0/16")]);
        assert_eq!(new.peers[..2], current.peers[..]);
    }

    #[test]
    fn set_device_keys() {
        let current = sample_config();
        let req = format!("private_key={}\nlisten_port=1234\nfwmark=0\n", key_hex(7));
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.private_key, PrivateKey::from_bytes([7; 32]));
        assert_eq!(new.listen_port, 1234);
        assert_eq!(new.fwmark, None);
        assert_eq!(new.peers, current.peers);
    }

    #[test]
    fn update_only_on_absent_peer_is_ignored() {
        let current = sample_config();
        let req = format!(
            "public_key={}\nupdate_only=true\nallowed_ip=10.0.0.2/32\n",
            key_hex(5)
        );
        assert_eq!(apply_set(&current, &req).unwrap(), current);

        // ...but it updates a peer that exists.
        let req = format!(
            "public_key={}\nupdate_only=true\nendpoint=1.2.3.4:5\n",
            key_hex(3)
        );
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers[1].endpoint, Some("1.2.3.4:5".parse().unwrap()));
    }

    #[test]
    fn remove_peer() {
        let current = sample_config();
        let req = format!(
            "public_key={}\nremove=true\nallowed_ip=10.0.0.2/32\n",
            key_hex(2)
        );
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers, vec![current.peers[1].clone()]);
        // Removing an absent peer is a no-op.
        let req = format!("public_key={}\nremove=true\n", key_hex(8));
        assert_eq!(apply_set(&current, &req).unwrap(), current);
    }

    #[test]
    fn replace_peers() {
        let current = sample_config();
        let req = format!(
            "replace_peers=true\npublic_key={}\nallowed_ip=10.0.0.3/32\n",
            key_hex(3)
        );
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers, vec![peer(3, &["10.0.0.3/32"])]);
    }

    #[test]
    fn replace_allowed_ips() {
        let current = sample_config();
        let req = format!(
            "public_key={}\nreplace_allowed_ips=true\nallowed_ip=10.5.0.0/24\nallowed_ip=10.5.0.0/24\n",
            key_hex(2)
        );
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers[0].allowed_ips, vec![net("10.5.0.0/24")]);
        assert_eq!(new.peers[0].endpoint, current.peers[0].endpoint);
    }

    #[test]
    fn allowed_ip_moves_between_peers() {
        let current = sample_config();
        let req = format!("public_key={}\nallowed_ip=10.0.0.2/32\n", key_hex(3));
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers[0].allowed_ips, vec![net("fd00::2/128")]);
        assert_eq!(
            new.peers[1].allowed_ips,
            vec![net("10.0.1.0/24"), net("10.0.0.2/32")]
        );
    }

    #[test]
    fn zero_preshared_key_clears_it() {
        let current = sample_config();
        let req = format!("public_key={}\npreshared_key={}\n", key_hex(2), key_hex(0));
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers[0].preshared_key, None);
    }

    #[test]
    fn own_public_key_is_not_a_peer() {
        let current = sample_config();
        let own = Key(current.private_key.public_key().0).to_hex();
        let req = format!("public_key={own}\nallowed_ip=10.7.0.0/16\n");
        assert_eq!(apply_set(&current, &req).unwrap(), current);
    }

    #[test]
    fn errors_leave_config_unchanged() {
        let current = sample_config();
        let snapshot = current.clone();
        let cases: Vec<(String, i32)> = vec![
            (
                format!(
                    "public_key={}\nendpoint=1.2.3.4:5\npreshared_key=zz\n",
                    key_hex(2)
                ),
                libc::EINVAL,
            ),
            (format!("public_key={}\n", &key_hex(2)[..62]), libc::EINVAL),
            (format!("public_key=+{}\n", &key_hex(2)[1..]), libc::EINVAL),
            ("listen_port=1\nbogus=1\n".to_string(), libc::EINVAL),
            ("endpoint=1.2.3.4:5\n".to_string(), libc::EINVAL),
            (
                format!("public_key={}\nlisten_port=5\n", key_hex(2)),
                libc::EINVAL,
            ),
            ("listen_port=65536\n".to_string(), libc::EINVAL),
            ("listen_port=+5\n".to_string(), libc::EINVAL),
            ("fwmark=-1\n".to_string(), libc::EINVAL),
            ("replace_peers=false\n".to_string(), libc::EINVAL),
            (format!("private_key={}\n", key_hex(0)), libc::EOPNOTSUPP),
            (
                format!("public_key={}\nendpoint=host:51820\n", key_hex(2)),
                libc::EINVAL,
            ),
            (
                format!("public_key={}\nallowed_ip=10.0.0.1\n", key_hex(2)),
                libc::EINVAL,
            ),
            (
                format!("public_key={}\nprotocol_version=2\n", key_hex(2)),
                libc::EPROTO,
            ),
            (
                "replace_peers=true\nno equals sign\n".to_string(),
                libc::EPROTO,
            ),
        ];
        for (req, errno) in cases {
            let err = apply_set(&current, &req).expect_err(&req);
            assert_eq!(err.errno(), errno, "{req}: {err}");
            assert_eq!(current, snapshot);
        }
    }

    #[test]
    fn secrets_stay_out_of_errors() {
        let secret = format!("{}q", &key_hex(0xab)[..63]);
        let err = apply_set(&sample_config(), &format!("private_key={secret}\n")).unwrap_err();
        assert!(!err.to_string().contains("abab"), "{err}");
    }
}
