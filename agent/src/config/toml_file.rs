//! The TOML configuration file (format documented in `configs/agent.static.example.toml`):
//! its keys as written, their checks, and errors that name the file, the line and the key.

use std::path::Path;

use meshlink_proto::toml_error::{self, TomlProblem};
use meshlink_proto::PublicKey;
use serde::Deserialize;

use super::layers::{FileLayer, KeySource, Layer, Val};
use super::values::{
    check_duplicate_addresses, check_keepalive, check_mtu, check_path, parse_address,
    parse_allowed_ip, parse_dns_listen, parse_dns_suffix, parse_endpoint, parse_interface,
    parse_map_age, parse_metrics_listen,
};
use super::{ConfigError, Origin, Resolver};
use crate::keyfile;
use crate::settings::{MetricsListen, PeerConfig};

/// A TOML configuration file as written. Numbers are read wide and range-checked here so
/// that the error names the key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    interface: Option<String>,
    private_key_file: Option<String>,
    listen_port: Option<i64>,
    addresses: Option<Vec<String>>,
    mtu: Option<i64>,
    fwmark: Option<i64>,
    uapi_dir: Option<String>,
    max_cached_map_age: Option<String>,
    fail_closed: Option<bool>,
    metrics_listen: Option<String>,
    dns: Option<bool>,
    dns_listen: Option<String>,
    dns_suffix: Option<String>,
    #[serde(default)]
    peers: Vec<TomlPeer>,
}

/// One `[[peers]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlPeer {
    public_key: String,
    preshared_key_file: Option<String>,
    endpoint: Option<String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    persistent_keepalive: Option<i64>,
}

/// Whether a TOML configuration file's text names a private key or peers (see
/// [`super::names_static_peers`]); `path` is for messages.
pub(super) fn names_key_or_peers(path: &Path, text: &str) -> Result<bool, ConfigError> {
    let raw: TomlFile = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    Ok(raw.private_key_file.is_some() || !raw.peers.is_empty())
}

/// Parses and checks a TOML configuration file's text; `path` is for messages and for
/// resolving relative paths.
pub(super) fn parse_toml(
    path: &Path,
    text: &str,
    resolve: &Resolver,
) -> Result<FileLayer, ConfigError> {
    let raw: TomlFile = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    let base = path.parent().unwrap_or_else(|| Path::new(""));
    let at = |key: String| Origin::File {
        path: path.to_path_buf(),
        line: None,
        key,
    };
    let invalid = |key: &str| {
        let origin = at(key.to_string());
        move |reason: String| ConfigError::Invalid { at: origin, reason }
    };

    let mut layer = Layer::default();
    if let Some(name) = &raw.interface {
        let value = parse_interface(name).map_err(invalid("interface"))?;
        layer.interface = Some(Val::new(value, at("interface".into())));
    }
    if let Some(key_file) = &raw.private_key_file {
        check_path(Path::new(key_file)).map_err(invalid("private_key_file"))?;
        layer.private_key = Some(Val::new(
            KeySource::File(base.join(key_file)),
            at("private_key_file".into()),
        ));
    }
    if let Some(port) = raw.listen_port {
        let value = u16::try_from(port)
            .map_err(|_| format!("{port} is not a port number (0..=65535)"))
            .map_err(invalid("listen_port"))?;
        layer.listen_port = Some(Val::new(value, at("listen_port".into())));
    }
    if let Some(items) = &raw.addresses {
        let mut addresses = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            addresses.push(parse_address(item).map_err(invalid(&format!("addresses[{i}]")))?);
        }
        check_duplicate_addresses(&addresses).map_err(invalid("addresses"))?;
        layer.addresses = Some(Val::new(addresses, at("addresses".into())));
    }
    if let Some(mtu) = raw.mtu {
        let value = check_mtu(mtu).map_err(invalid("mtu"))?;
        layer.mtu = Some(Val::new(value, at("mtu".into())));
    }
    if let Some(mark) = raw.fwmark {
        let value = u32::try_from(mark)
            .map_err(|_| format!("{mark} is not a firewall mark (0..=4294967295)"))
            .map_err(invalid("fwmark"))?;
        layer.fwmark = Some(Val::new(value, at("fwmark".into())));
    }
    if let Some(dir) = &raw.uapi_dir {
        check_path(Path::new(dir)).map_err(invalid("uapi_dir"))?;
        layer.uapi_dir = Some(Val::new(base.join(dir), at("uapi_dir".into())));
    }
    if let Some(age) = &raw.max_cached_map_age {
        let value = parse_map_age(age).map_err(invalid("max_cached_map_age"))?;
        layer.max_cached_map_age = Some(Val::new(value, at("max_cached_map_age".into())));
    }
    if let Some(on) = raw.fail_closed {
        layer.fail_closed = Some(Val::new(on, at("fail_closed".into())));
    }
    if let Some(listen) = &raw.metrics_listen {
        let value = parse_metrics_listen(listen).map_err(invalid("metrics_listen"))?;
        // A relative socket path is relative to the file, as the other paths are.
        let value = match value {
            MetricsListen::Unix(path) => MetricsListen::Unix(base.join(path)),
            tcp => tcp,
        };
        layer.metrics_listen = Some(Val::new(value, at("metrics_listen".into())));
    }
    if let Some(on) = raw.dns {
        layer.dns = Some(Val::new(on, at("dns".into())));
    }
    if let Some(listen) = &raw.dns_listen {
        let value = parse_dns_listen(listen).map_err(invalid("dns_listen"))?;
        layer.dns_listen = Some(Val::new(value, at("dns_listen".into())));
    }
    if let Some(suffix) = &raw.dns_suffix {
        let value = parse_dns_suffix(suffix).map_err(invalid("dns_suffix"))?;
        layer.dns_suffix = Some(Val::new(value, at("dns_suffix".into())));
    }

    let mut peers: Vec<(PeerConfig, Origin)> = Vec::with_capacity(raw.peers.len());
    for (i, p) in raw.peers.iter().enumerate() {
        let field = |name: &str| format!("peers[{i}].{name}");
        let public_key: PublicKey = p
            .public_key
            .parse()
            .map_err(|e| format!("not a public key: {e}"))
            .map_err(invalid(&field("public_key")))?;
        if let Some((_, first)) = peers.iter().find(|(q, _)| q.public_key == public_key) {
            return Err(ConfigError::Invalid {
                at: at(field("public_key")),
                reason: format!("duplicate peer {public_key}, already given as {first}"),
            });
        }
        let preshared_key = match &p.preshared_key_file {
            None => None,
            Some(psk) => {
                check_path(Path::new(psk)).map_err(invalid(&field("preshared_key_file")))?;
                Some(
                    keyfile::read_preshared_key(&base.join(psk)).map_err(|source| {
                        ConfigError::KeyFile {
                            at: at(field("preshared_key_file")),
                            source,
                        }
                    })?,
                )
            }
        };
        let endpoint = match &p.endpoint {
            None => None,
            Some(e) => Some(parse_endpoint(e, resolve).map_err(invalid(&field("endpoint")))?),
        };
        let mut allowed_ips = Vec::with_capacity(p.allowed_ips.len());
        for (j, net) in p.allowed_ips.iter().enumerate() {
            let net =
                parse_allowed_ip(net).map_err(invalid(&format!("peers[{i}].allowed_ips[{j}]")))?;
            if !allowed_ips.contains(&net) {
                allowed_ips.push(net);
            }
        }
        let persistent_keepalive = match p.persistent_keepalive {
            None => None,
            Some(secs) => check_keepalive(secs).map_err(invalid(&field("persistent_keepalive")))?,
        };
        peers.push((
            PeerConfig {
                public_key,
                preshared_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
            },
            at(field("public_key")),
        ));
    }
    Ok(FileLayer {
        layer,
        peers,
        interface_error: None,
    })
}

/// Turns a TOML error into one line naming the file, line and (when it can) the key.
fn toml_error(path: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    let TomlProblem { line, message } = toml_error::describe(text, err);
    ConfigError::Syntax {
        path: path.to_path_buf(),
        line,
        message,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};
    use std::path::PathBuf;

    use ipnet::IpNet;
    use meshlink_proto::Key;

    use super::super::test_support::{b64, fake_resolve, no_env, pubkey, Fixture};
    use super::super::{load_with, Overrides};
    use crate::keyfile::test_support::write_with_mode;
    use crate::settings::PrivateKey;

    #[test]
    fn toml_every_key() {
        let f = Fixture::new();
        let psk = f.write("peer.psk", &format!("{}\n", b64(9)), 0o600);
        let text = format!(
            r#"
interface = "wg-test.0"
private_key_file = "KEY"
listen_port = 51821
addresses = ["100.64.0.1/24", "fd00::1/64", "10.1.1.1"]
mtu = 1400
fwmark = 51
uapi_dir = "/run/meshlink"

[[peers]]
public_key = "{}"
preshared_key_file = "{}"
endpoint = "192.0.2.1:51820"
allowed_ips = ["100.64.0.2/32", "10.9.9.9/24", "fd00::2"]
persistent_keepalive = 25

[[peers]]
public_key = "{}"
endpoint = "[2001:db8::1]:4000"
persistent_keepalive = 0

[[peers]]
public_key = "{}"
endpoint = "peer.example:7000"
"#,
            pubkey(2),
            psk.display(),
            pubkey(3),
            pubkey(4),
        );
        let s = f
            .toml(&text, &Overrides::default(), &no_env)
            .expect("valid");
        assert_eq!(s.interface, "wg-test.0");
        assert_eq!(s.device.private_key, PrivateKey::from_bytes([1; 32]));
        assert_eq!(s.device.listen_port, 51821);
        assert_eq!(
            s.addresses,
            vec![
                "100.64.0.1/24".parse::<IpNet>().unwrap(),
                "fd00::1/64".parse().unwrap(),
                "10.1.1.1/32".parse().unwrap(),
            ]
        );
        assert_eq!(s.mtu, 1400);
        assert_eq!(s.device.fwmark, Some(51));
        assert_eq!(s.uapi_dir, PathBuf::from("/run/meshlink"));
        let peers = &s.device.peers;
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[0].public_key, pubkey(2));
        assert_eq!(peers[0].preshared_key, Some(Key([9; 32])));
        assert_eq!(peers[0].endpoint, Some("192.0.2.1:51820".parse().unwrap()));
        assert_eq!(
            peers[0].allowed_ips,
            vec![
                "100.64.0.2/32".parse::<IpNet>().unwrap(),
                "10.9.9.0/24".parse().unwrap(),
                "fd00::2/128".parse().unwrap(),
            ]
        );
        assert_eq!(peers[0].persistent_keepalive, Some(25));
        assert_eq!(
            peers[1].endpoint,
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                4000
            ))
        );
        assert_eq!(peers[1].persistent_keepalive, None);
        assert!(peers[1].allowed_ips.is_empty());
        assert_eq!(peers[1].preshared_key, None);
        assert_eq!(peers[2].endpoint, Some("192.0.2.7:7000".parse().unwrap()));
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let f = Fixture::new();
        let s = f
            .toml(
                "private_key_file = \"private.key\"\nuapi_dir = \"sockets\"\n",
                &Overrides::default(),
                &no_env,
            )
            .expect("valid");
        assert_eq!(s.device.private_key, PrivateKey::from_bytes([1; 32]));
        assert_eq!(s.uapi_dir, f.dir.path("sockets"));
    }

    #[test]
    fn unknown_key_is_named() {
        let f = Fixture::new();
        let msg = f.toml_err("private_key_file = \"KEY\"\nlisten_prot = 5\n");
        assert!(msg.contains("listen_prot"), "{msg}");
        assert!(msg.contains("agent.toml line 2"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let msg = f.toml_err(&format!(
            "private_key_file = \"KEY\"\n[[peers]]\npublic_key = \"{}\"\nendpont = \"x\"\n",
            pubkey(2)
        ));
        assert!(msg.contains("endpont"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn wrong_types_are_named() {
        let f = Fixture::new();
        let msg = f.toml_err("private_key_file = \"KEY\"\nmtu = \"big\"\n");
        assert!(msg.contains("mtu"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let msg = f.toml_err("private_key_file = \"KEY\"\naddresses = \"10.0.0.1/24\"\n");
        assert!(msg.contains("addresses"), "{msg}");
        let msg = f.toml_err("private_key_file = \"KEY\"\n[[peers]]\nendpoint = \"x:1\"\n");
        assert!(msg.contains("public_key"), "{msg}");
        let msg = f.toml_err("private_key_file = \"KEY\"\nmtu = = 3\n");
        assert!(msg.contains("agent.toml line 2: mtu:"), "{msg}");
        let msg = f.toml_err("private_key_file = \"KEY\"\nmtu = 1.5\n");
        assert!(msg.contains("line 2: mtu: invalid type"), "{msg}");
        assert!(msg.contains("expected an integer"), "{msg}");
        let msg = f.toml_err("private_key_file = \"KEY\"\nmtu = 1400\nmtu = 1400\n");
        assert!(msg.contains("line 3: mtu: duplicate key"), "{msg}");
        let msg = f.toml_err("private_key_file = \"KEY\"\n[peers]\n");
        assert!(msg.contains("line 2: peers: invalid type"), "{msg}");
    }

    #[test]
    fn invalid_values_are_named() {
        let f = Fixture::new();
        let key = "private_key_file = \"KEY\"\n";
        let peer = |extra: &str| {
            format!(
                "{key}[[peers]]\npublic_key = \"{}\"\n[[peers]]\npublic_key = \"{}\"\n{extra}\n",
                pubkey(2),
                pubkey(3)
            )
        };
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{key}interface = \"way-too-long-name0\""),
                "agent.toml: interface: interface name \"way-too-long-name0\" is 18 bytes",
            ),
            (
                format!("{key}interface = \"me sh\""),
                "agent.toml: interface: interface name \"me sh\" holds ' '",
            ),
            (
                format!("{key}interface = \"\""),
                "interface: the interface name is empty",
            ),
            (
                format!("{key}listen_port = 70000"),
                "listen_port: 70000 is not a port number",
            ),
            (format!("{key}mtu = 100"), "mtu: MTU 100 is out of range"),
            (format!("{key}mtu = 9001"), "mtu: MTU 9001 is out of range"),
            (
                format!("{key}fwmark = -1"),
                "fwmark: -1 is not a firewall mark",
            ),
            (
                format!("{key}addresses = [\"10.0.0.1/24\", \"10.0.0.256/24\"]"),
                "addresses[1]: invalid address \"10.0.0.256/24\"",
            ),
            (
                format!("{key}addresses = [\"10.0.0.1/24\", \"10.0.0.1/16\"]"),
                "addresses: address 10.0.0.1 is given twice",
            ),
            (
                format!("{key}addresses = [\"fd00::1/64\"]\nmtu = 1000"),
                "agent.toml: mtu: 1000 is below 1280",
            ),
            (
                "private_key_file = \"\"".to_string(),
                "private_key_file: the path is empty",
            ),
            (
                peer("allowed_ips = [\"10.0.0.300/32\"]"),
                "agent.toml: peers[1].allowed_ips[0]: invalid network \"10.0.0.300/32\"",
            ),
            (
                peer("endpoint = \"nowhere.invalid:51820\""),
                "peers[1].endpoint: cannot resolve host \"nowhere.invalid\"",
            ),
            (
                peer("endpoint = \"empty.example:51820\""),
                "peers[1].endpoint: host \"empty.example\" resolves to no address",
            ),
            (
                peer("endpoint = \"192.0.2.1\""),
                "peers[1].endpoint: endpoint \"192.0.2.1\" is not HOST:PORT",
            ),
            (
                peer("endpoint = \"192.0.2.1:0\""),
                "peers[1].endpoint: endpoint \"192.0.2.1:0\" has port 0",
            ),
            (
                peer("endpoint = \"2001:db8::1:51820\""),
                "write an IPv6 endpoint as [ADDRESS]:PORT",
            ),
            (
                peer("persistent_keepalive = 70000"),
                "peers[1].persistent_keepalive: 70000 is out of range",
            ),
            (
                peer("persistent_keepalive = -5"),
                "peers[1].persistent_keepalive: -5 is out of range",
            ),
            (
                format!("{key}[[peers]]\npublic_key = \"abc\""),
                "peers[0].public_key: not a public key",
            ),
        ];
        for (text, expected) in cases {
            let msg = f.toml_err(&text);
            assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn duplicate_and_own_peers_refused() {
        let f = Fixture::new();
        let msg = f.toml_err(&format!(
            "private_key_file = \"KEY\"\n[[peers]]\npublic_key = \"{0}\"\n[[peers]]\npublic_key = \"{1}\"\n[[peers]]\npublic_key = \"{0}\"\n",
            pubkey(2),
            pubkey(3)
        ));
        assert!(msg.contains("peers[2].public_key: duplicate peer"), "{msg}");
        assert!(msg.contains("peers[0].public_key"), "{msg}");
        let msg = f.toml_err(&format!(
            "private_key_file = \"KEY\"\n[[peers]]\npublic_key = \"{}\"\n",
            pubkey(1)
        ));
        assert!(msg.contains("peers[0].public_key"), "{msg}");
        assert!(msg.contains("own public key"), "{msg}");
    }

    #[test]
    fn key_file_mode_refused() {
        let f = Fixture::new();
        write_with_mode(&f.key_path, &b64(1), 0o644);
        let msg = f.toml_err("private_key_file = \"KEY\"\n");
        assert!(msg.contains("agent.toml: private_key_file"), "{msg}");
        assert!(msg.contains("0644"), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");

        let f = Fixture::new();
        let psk = f.write("peer.psk", &b64(9), 0o640);
        let msg = f.toml_err(&format!(
            "private_key_file = \"KEY\"\n[[peers]]\npublic_key = \"{}\"\npreshared_key_file = \"{}\"\n",
            pubkey(2),
            psk.display()
        ));
        assert!(msg.contains("peers[0].preshared_key_file"), "{msg}");
        assert!(msg.contains("0640"), "{msg}");
    }

    #[test]
    fn example_file_parses() {
        let f = Fixture::new();
        let psk = f.write("peer.psk", &b64(9), 0o600);
        let text = include_str!("../../../configs/agent.static.example.toml")
            .replace(
                "/etc/meshlink/private.key",
                &f.key_path.display().to_string(),
            )
            .replace("/etc/meshlink/peer-b.psk", &psk.display().to_string());
        let path = f.write("example.toml", &text, 0o644);
        let s = load_with(
            Some(&path),
            None,
            &Overrides::default(),
            &no_env,
            &fake_resolve,
        )
        .expect("the example file is valid");
        assert_eq!(s.interface, "mesh0");
        assert!(!s.addresses.is_empty());
        assert!(!s.device.peers.is_empty());
        assert!(s.device.peers.iter().any(|p| p.preshared_key.is_some()));
    }
}
