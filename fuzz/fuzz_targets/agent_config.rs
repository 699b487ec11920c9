//! Agent configuration: `meshlink_agent::config::load_settings`, the one public entry point of
//! the agent's TOML and wg-quick parsers (`parse_toml`, `parse_wg_quick`) and of the
//! environment-variable and flag layers.
//!
//! Input: `flags | env set | env values | overrides set | file`. Flag bit 0 picks a wg-quick
//! file (else TOML); bits 1-2 its name (the interface name comes from it). The file is written
//! (mode 0600) to a scratch directory holding a good key file `key`, a preshared key file `psk`
//! and a key file `open.key` of mode 0644, then loaded, with environment variables and flags
//! chosen from small menus of good and bad values.
//!
//! Checked: settings that load are valid as `Settings` documents them; every error is one
//! line; a private or preshared key written on a `PrivateKey`/`PresharedKey` line is never
//! repeated in an error.
//!
//! Host names are never resolved: `getaddrinfo` is replaced in this binary by one that knows no
//! host, so an `Endpoint = name:port` costs no DNS query (and sends nothing off the machine).

#![no_main]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshlink_agent::config::{self, load_settings, Overrides};
use meshlink_agent::settings::Settings;

/// The private key in `key` and in the seeds' `PrivateKey` lines.
const PRIVATE: &str = "IV7qqsBi/ViVTOQOqwUkrFpG1qrLDDQ8B2Gju/JnSVY=";
/// The preshared key in `psk` and in the seeds' `PresharedKey` lines.
const PRESHARED: &str = "42THzN3tT9mpis2OSKT+kr3IcGOlvtBMxda6wztZQDM=";

/// Resolves nothing: every host name is unknown (see the module documentation).
#[no_mangle]
pub extern "C" fn getaddrinfo(
    _node: *const libc::c_char,
    _service: *const libc::c_char,
    _hints: *const libc::addrinfo,
    _res: *mut *mut libc::addrinfo,
) -> libc::c_int {
    libc::EAI_NONAME
}

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        use std::net::ToSocketAddrs;
        assert!(
            ("localhost", 1).to_socket_addrs().is_err(),
            "getaddrinfo is not replaced: this target would resolve host names"
        );
        let dir = meshlink_fuzz::scratch_dir("agent-config");
        meshlink_fuzz::write_private(&dir.join("key"), format!("{PRIVATE}\n").as_bytes());
        meshlink_fuzz::write_private(&dir.join("psk"), format!("{PRESHARED}\n").as_bytes());
        let open = dir.join("open.key");
        meshlink_fuzz::write_private(&open, format!("{PRIVATE}\n").as_bytes());
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        dir
    })
}

const WG_NAMES: [&str; 4] = [
    "wg0.conf",
    "mesh-1.conf",
    "bad name.conf",
    "interfacenametoolong.conf",
];

/// Each variable with a good and a bad value.
const ENV: [(&str, [&str; 2]); 7] = [
    (config::ENV_INTERFACE, ["mesh7", "bad/name"]),
    (config::ENV_PRIVATE_KEY_FILE, ["key", "open.key"]),
    (config::ENV_LISTEN_PORT, ["51821", "70000"]),
    (
        config::ENV_ADDRESSES,
        ["100.64.0.9/10, fd00::9/64", "100.64.0.9/10,100.64.0.9/24"],
    ),
    (config::ENV_MTU, ["1280", "1000"]),
    (config::ENV_FWMARK, ["0x10", "off"]),
    (config::ENV_UAPI_DIR, ["uapi", " "]),
];

fuzz_target!(|data: &[u8]| {
    let [flags, env_set, env_values, over_set, file @ ..] = data else {
        return;
    };
    let dir = dir();
    let wg_quick = flags & 1 != 0;
    let name = if wg_quick {
        WG_NAMES[usize::from(flags >> 1) % WG_NAMES.len()]
    } else {
        "agent.toml"
    };
    let path = dir.join(name);
    meshlink_fuzz::write_private(&path, file);

    let env = |var: &str| -> Option<String> {
        let i = ENV.iter().position(|(v, _)| *v == var)?;
        if env_set & (1 << i) == 0 {
            return None;
        }
        let value = ENV[i].1[usize::from(env_values >> i) & 1];
        Some(match var {
            config::ENV_PRIVATE_KEY_FILE | config::ENV_UAPI_DIR => {
                dir.join(value).display().to_string()
            }
            _ => value.to_string(),
        })
    };
    let o = |bit: u8| over_set & (1 << bit) != 0;
    let overrides = Overrides {
        interface: o(0).then(|| "flag0".to_string()),
        private_key_file: o(1).then(|| dir.join("key")),
        listen_port: o(2).then_some(0),
        addresses: o(3).then(|| vec!["10.1.2.3/24".to_string(), "fd00::1".to_string()]),
        mtu: o(4).then_some(576),
        fwmark: o(5).then_some(0),
        uapi_dir: o(6).then(PathBuf::new),
        ..Overrides::default()
    };
    let (toml, wg) = if wg_quick {
        (None, Some(path.as_path()))
    } else {
        (Some(path.as_path()), None)
    };
    match load_settings(toml, wg, &overrides, &env) {
        Ok(s) => check(&s),
        Err(e) => {
            let message = e.to_string();
            assert!(
                !message.contains('\n'),
                "an error of more than one line: {message:?}"
            );
            for secret in [PRIVATE, PRESHARED] {
                let head = &secret[..16];
                if only_on_key_lines(file, head) {
                    assert!(
                        !message.contains(head),
                        "an error repeats a secret: {message:?}"
                    );
                }
            }
        }
    }
});

/// Whether `needle` occurs in `file` only on lines that give a key (`PrivateKey`,
/// `PresharedKey`), i.e. wherever it is, it is a secret.
fn only_on_key_lines(file: &[u8], needle: &str) -> bool {
    let text = String::from_utf8_lossy(file);
    let mut seen = false;
    for line in text.lines() {
        if line.contains(needle) {
            let lower = line.trim_start().to_ascii_lowercase();
            if !(lower.starts_with("privatekey") || lower.starts_with("presharedkey")) {
                return false;
            }
            seen = true;
        }
    }
    seen
}

/// What `Settings` promises.
fn check(s: &Settings) {
    assert!(!s.interface.is_empty() && s.interface.len() <= config::MAX_INTERFACE_LEN);
    assert!(s
        .interface
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')));
    assert!((config::MIN_MTU..=config::MAX_MTU).contains(&s.mtu));
    if s.addresses
        .iter()
        .any(|a| matches!(a.addr(), IpAddr::V6(_)))
    {
        assert!(s.mtu >= config::MIN_MTU_IPV6, "IPv6 with an MTU below 1280");
    }
    for (i, a) in s.addresses.iter().enumerate() {
        assert!(
            s.addresses[..i].iter().all(|b| b.addr() != a.addr()),
            "an address twice"
        );
    }
    let d = &s.device;
    assert_ne!(d.fwmark, Some(0));
    let own = d.private_key.public_key();
    for (i, p) in d.peers.iter().enumerate() {
        assert_ne!(p.public_key, own, "the device is its own peer");
        assert!(d.peers[..i].iter().all(|q| q.public_key != p.public_key));
        assert_ne!(p.persistent_keepalive, Some(0));
        if let Some(e) = p.endpoint {
            assert_ne!(e.port(), 0, "an endpoint with port 0");
        }
        for (j, net) in p.allowed_ips.iter().enumerate() {
            assert_eq!(net.trunc(), *net, "host bits left in an allowed IP");
            assert!(
                !p.allowed_ips[..j].contains(net),
                "an allowed IP twice in a peer"
            );
        }
    }
}
