//! The wg-quick file format (`wg-quick(8)`): an `[Interface]` section and `[Peer]` sections
//! of `Key = Value` lines. Errors name the file, the line and the key.
//!
//! A file is read in one pass. [`WgQuick::read_line`] sorts each line into a comment, a
//! section header ([`WgQuick::start_section`]) or a key ([`WgQuick::read_key`]); a key is
//! applied to the section it is in ([`WgQuick::set_interface_key`], [`WgPeer::set`]); and
//! [`WgQuick::finish`] makes the checks that need the whole file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use ipnet::IpNet;
use meshlink_proto::{Key, PublicKey};

use super::layers::{FileLayer, KeySource, Layer, Val};
use super::values::{
    check_duplicate_addresses, parse_address_list, parse_allowed_ip, parse_endpoint, parse_fwmark,
    parse_interface, parse_keepalive, parse_mtu, parse_port,
};
use super::{ConfigError, Origin, Resolver};
use crate::settings::{PeerConfig, PrivateKey};

/// wg-quick keys that meshlink-agent refuses instead of ignoring.
const WG_QUICK_UNSUPPORTED: [&str; 7] = [
    "dns",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
];

/// The `[Interface]` keys read, spelled as errors name them; only `Address` may repeat.
const INTERFACE_KEYS: [&str; 5] = ["PrivateKey", "ListenPort", "Address", "MTU", "FwMark"];

/// The `[Peer]` keys read, spelled as errors name them; only `AllowedIPs` may repeat.
const PEER_KEYS: [&str; 5] = [
    "PublicKey",
    "PresharedKey",
    "Endpoint",
    "AllowedIPs",
    "PersistentKeepalive",
];

/// Parses and checks a wg-quick file's text; `path` is for messages and the interface name.
pub(super) fn parse_wg_quick(
    path: &Path,
    text: &str,
    resolve: &Resolver,
) -> Result<FileLayer, ConfigError> {
    let mut file = WgQuick::new(path, resolve);
    for (index, raw_line) in text.lines().enumerate() {
        let at = Place {
            path,
            line: index + 1,
        };
        file.read_line(&at, raw_line)?;
    }
    file.finish()
}

/// A line of the file, which errors and origins name.
struct Place<'a> {
    path: &'a Path,
    /// Counted from 1.
    line: usize,
}

impl Place<'_> {
    /// A syntax error on this line.
    fn syntax(&self, message: String) -> ConfigError {
        ConfigError::Syntax {
            path: self.path.to_path_buf(),
            line: self.line,
            message,
        }
    }

    /// Where the value of key `canonical` on this line came from.
    fn origin(&self, canonical: &str) -> Origin {
        Origin::File {
            path: self.path.to_path_buf(),
            line: Some(self.line),
            key: canonical.to_string(),
        }
    }

    /// Turns the reason a value of key `canonical` on this line is refused into the error.
    fn invalid(&self, canonical: &str) -> impl FnOnce(String) -> ConfigError {
        let at = self.origin(canonical);
        move |reason| ConfigError::Invalid { at, reason }
    }
}

/// The single-valued keys of a section seen so far, with the lines they are on.
#[derive(Default)]
struct SeenKeys(HashMap<&'static str, usize>);

impl SeenKeys {
    /// Notes key `canonical` on this line; a key given a second time is refused (`within`
    /// is empty or names the section, such as ` in this [Peer]`).
    fn first_time(
        &mut self,
        at: &Place,
        canonical: &'static str,
        within: &str,
    ) -> Result<(), ConfigError> {
        match self.0.insert(canonical, at.line) {
            None => Ok(()),
            Some(first) => Err(at.syntax(format!(
                "{canonical} is given twice{within} (first at line {first})"
            ))),
        }
    }
}

/// The section being read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    Interface,
    Peer,
}

/// A wg-quick file being read: what its lines have given so far.
struct WgQuick<'a> {
    path: &'a Path,
    resolve: &'a Resolver,
    section: Section,
    /// The `[Interface]` settings, except the addresses.
    layer: Layer,
    /// The line of the `[Interface]` header, once seen.
    interface_line: Option<usize>,
    /// Single-valued `[Interface]` keys seen so far.
    interface_seen: SeenKeys,
    /// The addresses of every `Address` line so far.
    addresses: Vec<IpNet>,
    /// The line of the first `Address`.
    address_line: Option<usize>,
    peers: Vec<WgPeer>,
}

impl<'a> WgQuick<'a> {
    fn new(path: &'a Path, resolve: &'a Resolver) -> Self {
        WgQuick {
            path,
            resolve,
            section: Section::None,
            layer: Layer::default(),
            interface_line: None,
            interface_seen: SeenKeys::default(),
            addresses: Vec::new(),
            address_line: None,
            peers: Vec::new(),
        }
    }

    /// Reads one line: blank or a comment, a section header, or `Key = Value`.
    fn read_line(&mut self, at: &Place, raw_line: &str) -> Result<(), ConfigError> {
        let content = raw_line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            return Ok(());
        }
        if let Some(header) = content.strip_prefix('[') {
            return self.start_section(at, header);
        }
        let Some((key, value)) = content.split_once('=') else {
            return Err(at.syntax(format!(
                "expected `Key = Value` or a [Section], found `{}`",
                first_word(content)
            )));
        };
        self.read_key(at, key.trim(), value.trim())
    }

    /// Opens the section that a header (the text after its `[`) names. There is one
    /// `[Interface]`; each `[Peer]` starts a new peer.
    fn start_section(&mut self, at: &Place, header: &str) -> Result<(), ConfigError> {
        let name = header
            .strip_suffix(']')
            .ok_or_else(|| at.syntax("a section header lacks `]`".to_string()))?
            .trim();
        if name.eq_ignore_ascii_case("interface") {
            if let Some(first) = self.interface_line {
                return Err(at.syntax(format!(
                    "second [Interface] section (the first is at line {first})"
                )));
            }
            self.interface_line = Some(at.line);
            self.section = Section::Interface;
        } else if name.eq_ignore_ascii_case("peer") {
            self.peers.push(WgPeer::new(at.line));
            self.section = Section::Peer;
        } else {
            return Err(at.syntax(format!(
                "unknown section [{name}]; expected [Interface] or [Peer]"
            )));
        }
        Ok(())
    }

    /// Applies `key = value` to the section it is in. Key names are case-insensitive; the
    /// wg-quick-only keys and keys unknown in the section are refused.
    fn read_key(&mut self, at: &Place, key: &str, value: &str) -> Result<(), ConfigError> {
        if WG_QUICK_UNSUPPORTED
            .iter()
            .any(|unsupported| unsupported.eq_ignore_ascii_case(key))
        {
            return Err(ConfigError::Unsupported {
                path: at.path.to_path_buf(),
                line: at.line,
                key: key.to_string(),
            });
        }
        match self.section {
            // Shown only if it looks like a key name: a key line whose `=` is missing splits
            // at a base64 key's own padding, and then `key` holds the key.
            Section::None => Err(at.syntax(format!(
                "`{}` comes before any [Interface] or [Peer] section",
                crate::untrusted::key_name(key)
            ))),
            Section::Interface => {
                let canonical = known_key(&INTERFACE_KEYS, "Interface", at, key)?;
                self.set_interface_key(at, canonical, value)
            }
            Section::Peer => {
                let canonical = known_key(&PEER_KEYS, "Peer", at, key)?;
                let Some(peer) = self.peers.last_mut() else {
                    return Err(at.syntax("key outside a [Peer] section".to_string()));
                };
                peer.set(at, canonical, value, self.resolve)
            }
        }
    }

    /// Applies an `[Interface]` key (`canonical`, one of [`INTERFACE_KEYS`]). A repeated
    /// `Address` adds its addresses; any other key given twice is refused.
    fn set_interface_key(
        &mut self,
        at: &Place,
        canonical: &'static str,
        value: &str,
    ) -> Result<(), ConfigError> {
        if canonical != "Address" {
            self.interface_seen.first_time(at, canonical, "")?;
        }
        let layer = &mut self.layer;
        match canonical {
            "PrivateKey" => {
                // Never echo the value: it is the secret.
                let key = Key::from_base64(value)
                    .map_err(|e| format!("not a private key: {e}"))
                    .map_err(at.invalid(canonical))?;
                layer.private_key = Some(Val::new(
                    KeySource::Inline(PrivateKey::from_bytes(key.0)),
                    at.origin(canonical),
                ));
            }
            "ListenPort" => {
                let port = parse_port(value).map_err(at.invalid(canonical))?;
                layer.listen_port = Some(Val::new(port, at.origin(canonical)));
            }
            "Address" => {
                let addresses = parse_address_list(value).map_err(at.invalid(canonical))?;
                self.addresses.extend(addresses);
                check_duplicate_addresses(&self.addresses).map_err(at.invalid(canonical))?;
                self.address_line.get_or_insert(at.line);
            }
            "MTU" => {
                let mtu = parse_mtu(value).map_err(at.invalid(canonical))?;
                layer.mtu = Some(Val::new(mtu, at.origin(canonical)));
            }
            _ => {
                let mark = parse_fwmark(value).map_err(at.invalid(canonical))?;
                layer.fwmark = Some(Val::new(mark, at.origin(canonical)));
            }
        }
        Ok(())
    }

    /// The checks that need the whole file (an `[Interface]`, each peer's public key, once),
    /// and the settings and peers the file gives.
    fn finish(self) -> Result<FileLayer, ConfigError> {
        if self.interface_line.is_none() {
            return Err(ConfigError::Syntax {
                path: self.path.to_path_buf(),
                line: 1,
                message: "no [Interface] section".to_string(),
            });
        }
        let mut layer = self.layer;
        let interface_error = match interface_from_file_name(self.path) {
            Ok(name) => {
                layer.interface = Some(name);
                None
            }
            Err(err) => Some(err),
        };
        if let Some(line) = self.address_line {
            layer.addresses = Some(Val::new(
                self.addresses,
                Origin::File {
                    path: self.path.to_path_buf(),
                    line: Some(line),
                    key: "Address".to_string(),
                },
            ));
        }
        Ok(FileLayer {
            layer,
            peers: finish_peers(self.path, self.peers)?,
            interface_error,
        })
    }
}

/// The spelling in `keys` (those of `[section]`) of `key`, which may be written in any case;
/// a key not among them is refused.
fn known_key(
    keys: &[&'static str],
    section: &'static str,
    at: &Place,
    key: &str,
) -> Result<&'static str, ConfigError> {
    keys.iter()
        .copied()
        .find(|known| known.eq_ignore_ascii_case(key))
        .ok_or_else(|| ConfigError::UnknownKey {
            path: at.path.to_path_buf(),
            line: at.line,
            key: crate::untrusted::key_name(key),
            section,
        })
}

/// The interface name a wg-quick file implies: its file name without `.conf`. An invalid
/// name comes back as the error to report only if the name is used (a flag or variable may
/// give another).
fn interface_from_file_name(path: &Path) -> Result<Val<String>, ConfigError> {
    let stem = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".conf").unwrap_or(n))
        .unwrap_or_default();
    let origin = Origin::File {
        path: path.to_path_buf(),
        line: None,
        key: "interface name taken from the file name".to_string(),
    };
    match parse_interface(stem) {
        Ok(name) => Ok(Val::new(name, origin)),
        Err(reason) => Err(ConfigError::Invalid { at: origin, reason }),
    }
}

/// The file's peers in order, each with where its public key was given; a public key given
/// by two peers is refused.
fn finish_peers(path: &Path, peers: Vec<WgPeer>) -> Result<Vec<(PeerConfig, Origin)>, ConfigError> {
    let mut out: Vec<(PeerConfig, Origin)> = Vec::with_capacity(peers.len());
    for peer in peers {
        let (peer, origin) = peer.finish(path)?;
        let public_key = peer.public_key;
        if let Some((_, first)) = out.iter().find(|(p, _)| p.public_key == public_key) {
            return Err(ConfigError::Invalid {
                at: origin,
                reason: format!("duplicate peer {public_key}, already given at {first}"),
            });
        }
        out.push((peer, origin));
    }
    Ok(out)
}

/// A `[Peer]` section being read.
struct WgPeer {
    /// The line of its `[Peer]` header.
    line: usize,
    public_key: Option<(PublicKey, Origin)>,
    preshared_key: Option<Key>,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<u16>,
    /// Single-valued keys seen so far.
    seen: SeenKeys,
}

impl WgPeer {
    /// A peer whose `[Peer]` header is at `line`.
    fn new(line: usize) -> Self {
        WgPeer {
            line,
            public_key: None,
            preshared_key: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
            seen: SeenKeys::default(),
        }
    }

    /// Applies a `[Peer]` key (`canonical`, one of [`PEER_KEYS`]); a host name in `Endpoint`
    /// is resolved with `resolve`. A repeated `AllowedIPs` adds its networks (each once);
    /// any other key given twice is refused.
    fn set(
        &mut self,
        at: &Place,
        canonical: &'static str,
        value: &str,
        resolve: &Resolver,
    ) -> Result<(), ConfigError> {
        if canonical != "AllowedIPs" {
            self.seen.first_time(at, canonical, " in this [Peer]")?;
        }
        match canonical {
            "PublicKey" => {
                let key: PublicKey = value
                    .parse()
                    .map_err(|e| format!("not a public key: {e}"))
                    .map_err(at.invalid(canonical))?;
                self.public_key = Some((key, at.origin(canonical)));
            }
            "PresharedKey" => {
                let key = Key::from_base64(value)
                    .map_err(|e| format!("not a preshared key: {e}"))
                    .map_err(at.invalid(canonical))?;
                self.preshared_key = Some(key);
            }
            "Endpoint" => {
                let endpoint = parse_endpoint(value, resolve).map_err(at.invalid(canonical))?;
                self.endpoint = Some(endpoint);
            }
            "AllowedIPs" => {
                for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let net = parse_allowed_ip(item).map_err(at.invalid(canonical))?;
                    if !self.allowed_ips.contains(&net) {
                        self.allowed_ips.push(net);
                    }
                }
            }
            _ => {
                self.persistent_keepalive =
                    parse_keepalive(value).map_err(at.invalid(canonical))?;
            }
        }
        Ok(())
    }

    /// The peer read, and where its public key was given; a `[Peer]` without `PublicKey` is
    /// refused, naming the line of its header (`path` is the file).
    fn finish(self, path: &Path) -> Result<(PeerConfig, Origin), ConfigError> {
        let Some((public_key, origin)) = self.public_key else {
            return Err(ConfigError::Syntax {
                path: path.to_path_buf(),
                line: self.line,
                message: "this [Peer] has no PublicKey".to_string(),
            });
        };
        let peer = PeerConfig {
            public_key,
            preshared_key: self.preshared_key,
            endpoint: self.endpoint,
            allowed_ips: self.allowed_ips,
            persistent_keepalive: self.persistent_keepalive,
        };
        Ok((peer, origin))
    }
}

/// The first word of a line, for messages (a whole line could hold a secret).
fn first_word(s: &str) -> String {
    crate::untrusted::key_name(s.split_whitespace().next().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::test_support::{b64, env_from, fake_resolve, no_env, pubkey, Fixture};
    use super::super::{load_with, Overrides, ENV_INTERFACE};
    use super::*;
    use crate::settings::DEFAULT_UAPI_DIR;

    #[test]
    fn wg_quick_full() {
        let f = Fixture::new();
        let text = format!(
            "# a comment\n\
             [Interface]\n\
             PrivateKey = {}   # inline key\n\
             listenport = 51820\n\
             Address = 10.0.0.1/24, fd00::1/64\n\
             ADDRESS = 10.0.1.1\n\
             MTU = 1380\n\
             FwMark = 0x20\n\
             \n\
             [Peer]\n\
             PublicKey = {}\n\
             PresharedKey = {}\n\
             Endpoint = peer.example:51820\n\
             AllowedIPs = 10.0.0.2/32, 10.7.0.1/16\n\
             allowedips = fd00::2/128\n\
             PersistentKeepalive = off\n\
             \n\
             [peer]\n\
             publickey = {}\n\
             Endpoint = [2001:db8::5]:51820\n\
             AllowedIPs =\n\
             PersistentKeepalive = 15\n",
            b64(1),
            pubkey(2),
            b64(9),
            pubkey(3),
        );
        let s = f.wg("wg0.conf", &text).expect("valid");
        assert_eq!(s.interface, "wg0");
        assert_eq!(s.device.private_key, PrivateKey::from_bytes([1; 32]));
        assert_eq!(s.device.listen_port, 51820);
        assert_eq!(
            s.addresses,
            vec![
                "10.0.0.1/24".parse::<IpNet>().unwrap(),
                "fd00::1/64".parse().unwrap(),
                "10.0.1.1/32".parse().unwrap(),
            ]
        );
        assert_eq!(s.mtu, 1380);
        assert_eq!(s.device.fwmark, Some(32));
        assert_eq!(s.uapi_dir, PathBuf::from(DEFAULT_UAPI_DIR));
        let p = &s.device.peers;
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].public_key, pubkey(2));
        assert_eq!(p[0].preshared_key, Some(Key([9; 32])));
        assert_eq!(p[0].endpoint, Some("192.0.2.7:51820".parse().unwrap()));
        assert_eq!(
            p[0].allowed_ips,
            vec![
                "10.0.0.2/32".parse::<IpNet>().unwrap(),
                "10.7.0.0/16".parse().unwrap(),
                "fd00::2/128".parse().unwrap(),
            ]
        );
        assert_eq!(p[0].persistent_keepalive, None);
        assert_eq!(p[1].public_key, pubkey(3));
        assert_eq!(p[1].endpoint, Some("[2001:db8::5]:51820".parse().unwrap()));
        assert!(p[1].allowed_ips.is_empty());
        assert_eq!(p[1].persistent_keepalive, Some(15));
    }

    #[test]
    fn wg_quick_interface_name_and_overrides() {
        let f = Fixture::new();
        let text = format!("[Interface]\nPrivateKey = {}\n", b64(1));
        assert_eq!(
            f.wg("office-vpn.conf", &text).expect("valid").interface,
            "office-vpn"
        );
        // A file name that is not a valid interface name is an error naming the file...
        let msg = f
            .wg("this-name-is-too-long.conf", &text)
            .expect_err("bad name")
            .to_string();
        assert!(msg.contains("this-name-is-too-long.conf"), "{msg}");
        assert!(msg.contains("file name"), "{msg}");
        // ...unless a flag or variable gives the name.
        let path = f.dir.path("this-name-is-too-long.conf");
        let flags = Overrides {
            interface: Some("mesh7".into()),
            private_key_file: Some(f.key_path.clone()),
            ..Overrides::default()
        };
        let s = load_with(None, Some(&path), &flags, &no_env, &fake_resolve).expect("valid");
        assert_eq!(s.interface, "mesh7");
        let env = env_from(&[(ENV_INTERFACE, "mesh8")]);
        let s = load_with(
            None,
            Some(&path),
            &Overrides::default(),
            &env,
            &fake_resolve,
        )
        .expect("valid");
        assert_eq!(s.interface, "mesh8");
    }

    #[test]
    fn wg_quick_refusals() {
        let f = Fixture::new();
        let head = format!("[Interface]\nPrivateKey = {}\n", b64(1));
        let peer = format!("[Peer]\nPublicKey = {}\n", pubkey(2));
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{head}DNS = 1.1.1.1\n"),
                "line 3: `DNS` is a wg-quick setting not supported by meshlink-agent",
            ),
            (
                format!("{head}postup = iptables -A\n"),
                "line 3: `postup` is a wg-quick setting not supported",
            ),
            (
                format!("{head}Table = off\n"),
                "`Table` is a wg-quick setting not supported",
            ),
            (format!("{head}SaveConfig = true\n"), "`SaveConfig`"),
            (
                format!("{head}Frobnicate = 1\n"),
                "line 3: unknown key `Frobnicate` in [Interface]",
            ),
            (
                format!("{head}{peer}Address = 10.0.0.1\n"),
                "line 5: unknown key `Address` in [Peer]",
            ),
            (
                format!("{head}[Peers]\n"),
                "line 3: unknown section [Peers]",
            ),
            (
                format!("ListenPort = 1\n{head}"),
                "line 1: `ListenPort` comes before any",
            ),
            (
                format!("{head}just words\n"),
                "line 3: expected `Key = Value`",
            ),
            (
                format!("{head}ListenPort = 1\nListenPort = 2\n"),
                "line 4: ListenPort is given twice (first at line 3)",
            ),
            (
                format!("{head}{head}"),
                "line 3: second [Interface] section",
            ),
            (
                format!("{head}MTU = 1000\nAddress = fd00::1/64\n"),
                "line 3: MTU: 1000 is below 1280",
            ),
            (
                format!("{head}ListenPort = 65536\n"),
                "wg0.conf line 3: ListenPort: \"65536\" is not a port number",
            ),
            (
                format!("{head}{peer}AllowedIPs = 10.0.0.1/32, 10.0.0.300/32\n"),
                "line 5: AllowedIPs: invalid network \"10.0.0.300/32\"",
            ),
            (
                format!("{head}{peer}PersistentKeepalive = sometimes\n"),
                "line 5: PersistentKeepalive: \"sometimes\" is not a number",
            ),
            (
                format!("{head}{peer}Endpoint = nowhere.invalid:1\n"),
                "line 5: Endpoint: cannot resolve host \"nowhere.invalid\"",
            ),
            (
                format!("{head}[Peer]\nEndpoint = 192.0.2.1:1\n"),
                "line 3: this [Peer] has no PublicKey",
            ),
            (
                format!("{head}{peer}{peer}"),
                "line 6: PublicKey: duplicate peer",
            ),
            (
                format!("{head}[Peer]\nPublicKey = {}\n", pubkey(1)),
                "line 4: PublicKey: ",
            ),
            ("[Peer]\n".to_string(), "no [Interface] section"),
            (
                format!("{head}{peer}PresharedKey = c2VjcmV0\n"),
                "line 5: PresharedKey: not a preshared key",
            ),
        ];
        for (text, expected) in cases {
            let msg = f.wg("wg0.conf", &text).expect_err("refused").to_string();
            assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
            assert!(msg.contains("wg0.conf"), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        // A malformed inline key is refused without echoing it.
        let msg = f
            .wg("wg0.conf", "[Interface]\nPrivateKey = sekrit-sekrit\n")
            .expect_err("refused")
            .to_string();
        assert!(
            msg.contains("line 2: PrivateKey: not a private key"),
            "{msg}"
        );
        assert!(!msg.contains("sekrit"), "{msg}");
    }

    #[test]
    fn wg_quick_file_mode_refused() {
        let f = Fixture::new();
        let path = f.write(
            "wg0.conf",
            &format!("[Interface]\nPrivateKey = {}\n", b64(1)),
            0o644,
        );
        let msg = load_with(
            None,
            Some(&path),
            &Overrides::default(),
            &no_env,
            &fake_resolve,
        )
        .expect_err("refused")
        .to_string();
        assert!(msg.contains("0644"), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn example_wg_quick_file_parses() {
        let f = Fixture::new();
        let text = include_str!("../../../configs/example.wg-quick.conf");
        let s = f
            .wg("wg0.conf", text)
            .expect("the example wg-quick file is valid");
        assert_eq!(s.interface, "wg0");
        assert!(!s.device.peers.is_empty());
    }
}
