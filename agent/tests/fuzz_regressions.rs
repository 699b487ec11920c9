//! What the fuzz targets of `fuzz/` found in the agent, one test each, with the target and the
//! input that found it (see `fuzz/README.md`).
//!
//! Each test failed before its fix (found by the fuzz targets of `fuzz/`).
//! Run them with `cargo test -p meshlink-agent --test fuzz_regressions`.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;

use meshlink_agent::config::{load_settings, Overrides};
use meshlink_agent::dataplane::{Device, NetBatch, TunBatch};
use meshlink_agent::settings::{DeviceConfig, PeerConfig, PrivateKey};
use meshlink_agent::uapi::apply_set;

fn underlay(host: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, host], 51820))
}

/// Device `i` (key `i + 1`, underlay 198.18.0.`i + 1`) with the other as its only peer.
fn device(i: u8, peer: u8, allowed: &str) -> Device {
    Device::new(
        DeviceConfig {
            private_key: PrivateKey::from_bytes([i + 1; 32]),
            listen_port: 51820,
            fwmark: None,
            peers: vec![PeerConfig {
                public_key: PrivateKey::from_bytes([peer + 1; 32]).public_key(),
                preshared_key: None,
                endpoint: Some(underlay(peer + 1)),
                allowed_ips: vec![allowed.parse().unwrap()],
                persistent_keepalive: None,
            }],
        },
        u32::from(i) * 1000,
    )
}

/// Found by `dataplane_inbound`: a peer sealed an IPv4 packet whose total-length field says
/// 0. boringtun cuts a decrypted packet to its length field without checking that the field
/// covers the header, and `Device::inbound` put the empty packet in the TUN batch. On a TUN
/// device with offload, tun-rs then refuses the whole batch (`handle_gro`: "invalid offset"),
/// so one such packet from any peer drops every packet of every peer received with it
/// (logged at debug only); a length of 1 to 19 hands the kernel a torn header.
#[test]
fn a_packet_shorter_than_its_ip_header_never_reaches_the_tun_device() {
    let a = device(0, 1, "100.64.0.2/32");
    let b = device(1, 0, "0.0.0.0/0");
    for total_length in [0u16, 1, 19] {
        let mut packet = vec![0u8; 20];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&total_length.to_be_bytes());
        packet[8] = 64;
        packet[9] = 17;
        packet[12..16].copy_from_slice(&Ipv4Addr::new(100, 64, 0, 2).octets());
        packet[16..20].copy_from_slice(&Ipv4Addr::new(100, 64, 0, 1).octets());

        // B seals it (a handshake first, the first time); the datagrams go back and forth
        // until the wire is quiet.
        let mut net = NetBatch::with_capacity(4096);
        b.outbound(&packet, &mut net);
        let mut wire: Vec<(usize, Vec<u8>)> = net
            .items()
            .iter()
            .map(|it| (0, net.bytes(it.start, it.len).to_vec()))
            .collect();
        let mut delivered = Vec::new();
        while let Some((to, bytes)) = wire.pop() {
            let (dev, from, other) = if to == 0 {
                (&a, underlay(2), 1)
            } else {
                (&b, underlay(1), 0)
            };
            let mut tun = TunBatch::new(4, 16, 2048);
            let mut net = NetBatch::with_capacity(4096);
            dev.inbound(from, &bytes, &mut tun, &mut net);
            if to == 0 {
                delivered.extend(tun.packets().map(<[u8]>::to_vec));
            }
            wire.extend(
                net.items()
                    .iter()
                    .map(|it| (other, net.bytes(it.start, it.len).to_vec())),
            );
        }
        for p in &delivered {
            assert!(
                p.len() >= 20,
                "a packet of {} bytes (length field {total_length}) reached the TUN device",
                p.len()
            );
        }
    }
}

/// A wg-quick file (mode 0600) named `wg0.conf` in a fresh directory, loaded.
fn load_wg_quick(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wg0.conf");
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    match load_settings(None, Some(&path), &Overrides::default(), &|_: &str| None) {
        Ok(_) => panic!("a malformed file loaded"),
        Err(e) => e.to_string(),
    }
}

/// Found by `agent_config`: a `PrivateKey` line whose `=` was left out (or replaced by `:`)
/// splits at the key's own base64 padding, and the "unknown key" error repeats the line up
/// to there: 43 of the key's 44 characters, enough to rebuild the whole key, in the agent's
/// error output and logs. The module promises that secrets are never echoed.
#[test]
fn a_wg_quick_key_line_without_its_equals_sign_does_not_echo_the_key() {
    let key = "IV7qqsBi/ViVTOQOqwUkrFpG1qrLDDQ8B2Gju/JnSVY=";
    for line in [format!("PrivateKey {key}"), format!("PrivateKey: {key}")] {
        let message = load_wg_quick(&format!("[Interface]\n{line}\n"));
        assert!(!message.contains(&key[..16]), "{message}");
    }
    let message = load_wg_quick(&format!(
        "[Interface]\nPrivateKey = {key}\n[Peer]\nPresharedKey {key}\n"
    ));
    assert!(!message.contains(&key[..16]), "{message}");
}

/// Found by `agent_config` (2026-12-06): the same key line before any section. The error
/// saying that the key comes before `[Interface]` repeated the key as read, which for
/// `PrivateKey<base64>=` (its `=` left out, so the line splits at the key's padding) is the
/// name and 43 of the key's 44 characters.
#[test]
fn a_wg_quick_key_line_before_any_section_does_not_echo_the_key() {
    let key = "IV7qqsBi/ViVTOQOqwUkrFpG1qrLDDQ8B2Gju/JnSVY=";
    for line in [format!("PrivateKey{key}"), format!("PrivateKey {key}")] {
        let message = load_wg_quick(&format!("{line}\n[Interface]\n"));
        assert!(message.contains("comes before any"), "{message}");
        assert!(!message.contains(&key[..16]), "{message}");
    }
}

/// Found by `uapi_set`: a `set=1` line without `=` is refused as malformed with up to 64
/// characters of the line in the error, which the server logs at warn: for
/// `private_key <64 hex digits>` that is 52 digits of the private key.
#[test]
fn a_uapi_key_line_without_its_equals_sign_does_not_echo_the_key() {
    let current = DeviceConfig {
        private_key: PrivateKey::from_bytes([1; 32]),
        listen_port: 51820,
        fwmark: None,
        peers: Vec::new(),
    };
    let secret = "3f".repeat(32);
    for request in [
        format!("private_key {secret}\n"),
        format!("public_key={}\npreshared_key {secret}\n", "ab".repeat(32)),
    ] {
        let e = apply_set(&current, &request).expect_err(&request);
        let message = e.to_string();
        assert!(!message.contains("3f3f3f3f3f3f3f3f"), "{message}");
    }
}

/// Found by `uapi_set` (2026-12-06): the same line with the space left out too, the key cut
/// short. Text that looks like a key name (32 characters at most, letters, digits, `_`, `-`)
/// was shown as the unknown key or the start of the malformed line, so `private_key` glued to
/// the first 21 hex digits of the key passed, and so did `preshared_key` with 19.
#[test]
fn a_uapi_key_glued_to_its_name_is_not_echoed() {
    let current = DeviceConfig {
        private_key: PrivateKey::from_bytes([1; 32]),
        listen_port: 51820,
        fwmark: None,
        peers: Vec::new(),
    };
    let digits = "0123456789abcdef0123456789";
    let peer = format!("public_key={}\n", "ab".repeat(32));
    for request in [
        format!("private_key{}=1\n", &digits[..21]),
        format!("private_key{}\n", &digits[..21]),
        format!("{peer}preshared_key{}=1\n", &digits[..19]),
        format!("{peer}PRESHARED_KEY{}\n", &digits[..19]),
    ] {
        let e = apply_set(&current, &request).expect_err(&request);
        let message = e.to_string();
        assert!(!message.contains(&digits[..16]), "{message}");
    }
}
