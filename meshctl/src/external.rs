//! External devices (`node add-external`, `node external-config`, `node rotate-key
//! --new-key`): the WireGuard configuration a device that runs stock WireGuard needs, in the
//! wg-quick format that `wg-quick` and the phone apps read, as text or as a QR code; the key
//! pair `meshctl` makes when the device did not make its own; the private file it may go to.
//!
//! The configuration is one peer, the device's gateway, with `AllowedIPs` the network's
//! prefix: the gateway's agent forwards the device's packets to and from the rest of the mesh,
//! so nodes that join or move never call for a new file. Everything in it comes from the
//! coordinator's [`ExternalNode`] answer, except the private key (never sent to the
//! coordinator) and an endpoint the operator names.
//!
//! # Security
//!
//! A private key made here comes from the operating system's random source and goes only into
//! the configuration text, which is wiped from memory when dropped; `Debug` never shows it.
//! A file for it is created new with mode 0600, never over an existing file (nor through a
//! symbolic link). Names in the answer are the coordinator's text: the configuration carries
//! them only in comments, with anything but letters, digits, `-`, `_` and `.` replaced, so no
//! name can add a line to the file.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use meshlink_api::{ExternalNode, PublicKey};
use meshlink_proto::Key;
use qrcode::render::unicode::Dense1x2;
use qrcode::{EcLevel, QrCode};
use rand_core::{OsRng, RngCore};
use x25519_dalek::StaticSecret;
use zeroize::{Zeroize, Zeroizing};

/// Seconds between the keepalives the device sends its gateway: they keep the mapping of a
/// NAT in front of the device open, so that the gateway can reach it at any time.
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;

/// The mode of a file that holds a configuration: its owner's only.
const PRIVATE_MODE: u32 = 0o600;

/// The longest name a comment of the configuration carries (node names are shorter).
const COMMENT_NAME_LIMIT: usize = 63;

/// A device's private key, made here. `Debug` shows its public key only.
pub struct DeviceKey(StaticSecret);

/// The operating system's random source failed: no key was made.
#[derive(Debug, thiserror::Error)]
#[error("cannot make a key pair: the operating system's random source failed: {0}")]
pub struct RandomError(rand_core::Error);

impl DeviceKey {
    /// A fresh key from the operating system's random source, clamped as `wg genkey` prints
    /// it.
    ///
    /// # Errors
    /// [`RandomError`] when the random source cannot be read.
    pub fn generate() -> Result<Self, RandomError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        OsRng.try_fill_bytes(bytes.as_mut()).map_err(RandomError)?;
        Ok(Self::from_bytes(*bytes))
    }

    /// The key from its 32 bytes, clamped as `wg genkey` clamps.
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        bytes[0] &= 248;
        bytes[31] = (bytes[31] & 127) | 64;
        let key = Self(StaticSecret::from(bytes));
        bytes.zeroize();
        key
    }

    /// The matching public key: what the coordinator is told.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// The private key's base64 text, as `wg genkey` prints it.
    fn to_base64(&self) -> Zeroizing<String> {
        let mut bytes = self.0.to_bytes();
        let text = Zeroizing::new(Key(bytes).to_base64());
        bytes.zeroize();
        text
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceKey(public {})", self.public_key().short())
    }
}

/// Where the device reaches its gateway: `HOST:PORT`, the host an IPv4 address, an IPv6
/// address in brackets or a DNS name (wg-quick resolves it when it starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint(String);

/// Why text is not an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// No port, or an IPv6 address without brackets.
    #[error(
        "write HOST:PORT, for example 203.0.113.10:51820 or gw.example.com:51820 \
         ([2001:db8::1]:51820 for an IPv6 address)"
    )]
    Form,
    /// The port is not a number from 1 to 65535.
    #[error("the port must be a number from 1 to 65535")]
    Port,
    /// The host is neither an address nor a DNS name.
    #[error(
        "the host must be an IPv4 address, an IPv6 address in brackets, or a DNS name of \
         letters, digits, - and ."
    )]
    Host,
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(text: &str) -> Result<Self, EndpointError> {
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (v6, port) = rest.split_once("]:").ok_or(EndpointError::Form)?;
            v6.parse::<Ipv6Addr>().map_err(|_| EndpointError::Host)?;
            (&text[..v6.len() + 2], port)
        } else {
            let (host, port) = text.rsplit_once(':').ok_or(EndpointError::Form)?;
            if host.contains(':') {
                return Err(EndpointError::Form);
            }
            if host.parse::<Ipv4Addr>().is_err() && !is_dns_name(host) {
                return Err(EndpointError::Host);
            }
            (host, port)
        };
        match port.parse::<u16>() {
            Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {
                Ok(Self(format!("{host}:{p}")))
            }
            _ => Err(EndpointError::Port),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Self(addr.to_string())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `host` is a DNS name: dot-separated labels of 1 to 63 letters, digits and `-`, not
/// starting or ending with `-`, 253 characters at most.
fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The gateway has no endpoint to put in the configuration, and none was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("its gateway {gateway} has no known endpoint; pass --endpoint HOST:PORT, where the device reaches {gateway}")]
pub struct NoEndpoint {
    /// The gateway's name, as the coordinator sent it (cleaned as in comments).
    pub gateway: String,
}

/// A device's wg-quick configuration. Its text is wiped from memory when dropped, since it may
/// hold a private key.
pub struct DeviceConfig {
    text: Zeroizing<String>,
    private_key: bool,
    endpoint: Endpoint,
}

impl fmt::Debug for DeviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("private_key", &self.private_key)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl DeviceConfig {
    /// The configuration of the external node `external`: `key` is the device's private key
    /// when `meshctl` made it (else the file has a line for the user to fill in), and
    /// `endpoint` where it reaches its gateway (else the gateway's first endpoint).
    ///
    /// # Errors
    /// [`NoEndpoint`] when no endpoint is given and the gateway has none.
    pub fn new(
        external: &ExternalNode,
        key: Option<&DeviceKey>,
        endpoint: Option<&Endpoint>,
    ) -> Result<Self, NoEndpoint> {
        let gateway = &external.gateway;
        let endpoint = match (endpoint, gateway.endpoints.first()) {
            (Some(given), _) => given.clone(),
            (None, Some(first)) => Endpoint::from(*first),
            (None, None) => {
                return Err(NoEndpoint {
                    gateway: comment_name(&gateway.name),
                })
            }
        };
        let node = &external.node;
        let mut text = Zeroizing::new(String::with_capacity(640));
        text.push_str(&format!(
            "# meshlink external node {} of network {}, reached through node {}.\n[Interface]\n",
            comment_name(&node.name),
            comment_name(&node.network),
            comment_name(&gateway.name),
        ));
        match key {
            Some(key) => {
                text.push_str("PrivateKey = ");
                text.push_str(&key.to_base64());
                text.push('\n');
            }
            None => text.push_str(
                "# The device's own private key goes here: the one whose public key was\n\
                 # registered (meshctl keeps no private key).\n\
                 PrivateKey = \n",
            ),
        }
        // With an IPv6 prefix, both families: the device's two addresses, both prefixes.
        let address = match node.address6 {
            Some(v6) => format!("{}/32, {v6}/128", node.address),
            None => format!("{}/32", node.address),
        };
        let allowed = match external.network_cidr6 {
            Some(v6) => format!("{}, {}", external.network_cidr.trunc(), v6.trunc()),
            None => external.network_cidr.trunc().to_string(),
        };
        text.push_str(&format!(
            "Address = {address}\n\
             \n\
             [Peer]\n\
             # {}, the gateway: it forwards to and from the rest of the network.\n\
             PublicKey = {}\n\
             Endpoint = {endpoint}\n\
             AllowedIPs = {allowed}\n\
             PersistentKeepalive = {PERSISTENT_KEEPALIVE_SECS}\n",
            comment_name(&gateway.name),
            gateway.public_key.to_base64(),
        ));
        Ok(Self {
            text,
            private_key: key.is_some(),
            endpoint,
        })
    }

    /// The file's text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the text holds the private key (else the user fills it in).
    pub fn has_private_key(&self) -> bool {
        self.private_key
    }

    /// The gateway's endpoint in it.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The configuration as a QR code drawn with Unicode half blocks, light modules as blocks
    /// (for a terminal with a dark background, as `qrencode -t utf8` draws), with its quiet
    /// zone. It encodes the text without its comment lines, which are for people reading the
    /// file: a smaller code scans more easily.
    ///
    /// # Errors
    /// [`QrError`] when the text does not fit in a QR code (it always does: it is a few
    /// hundred bytes).
    pub fn qr_code(&self) -> Result<String, QrError> {
        let mut data = Zeroizing::new(String::with_capacity(self.text.len()));
        for line in self.text.lines().filter(|l| !l.starts_with('#')) {
            data.push_str(line);
            data.push('\n');
        }
        let code =
            QrCode::with_error_correction_level(data.as_bytes(), EcLevel::L).map_err(QrError)?;
        Ok(code
            .render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build())
    }
}

/// The configuration does not fit in a QR code.
#[derive(Debug, thiserror::Error)]
#[error("the configuration does not fit in a QR code: {0}")]
pub struct QrError(qrcode::types::QrError);

/// A name from the coordinator as a comment may carry it: letters, digits, `-`, `_` and `.`,
/// anything else `?`, cut at [`COMMENT_NAME_LIMIT`] characters.
fn comment_name(name: &str) -> String {
    name.chars()
        .take(COMMENT_NAME_LIMIT)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// A new file for a configuration: created with mode 0600, never over an existing file, and
/// removed again if it is dropped before [`PrivateFile::write`] filled it, so that a failed
/// command leaves no empty file behind. Made before the coordinator is asked anything, so that
/// a path that cannot be used stops the command before it changes anything.
#[derive(Debug)]
pub struct PrivateFile {
    path: PathBuf,
    file: Option<File>,
}

/// Why a configuration file cannot be made or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Something is there already.
    #[error("{}: the file exists; meshctl does not overwrite it: name a new file", .path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Creating or writing it failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

impl PrivateFile {
    /// Creates `path`, empty, readable and writable by its owner only.
    ///
    /// # Errors
    /// [`FileError::Exists`] when anything (a symbolic link too) is at `path`;
    /// [`FileError::Io`] when it cannot be created.
    pub fn create(path: &Path) -> Result<Self, FileError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_MODE)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => FileError::Exists {
                    path: path.to_owned(),
                },
                _ => FileError::Io {
                    path: path.to_owned(),
                    source,
                },
            })?;
        Ok(Self {
            path: path.to_owned(),
            file: Some(file),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` and keeps the file.
    ///
    /// # Errors
    /// [`FileError::Io`]; the file is removed then.
    pub fn write(mut self, text: &str) -> Result<(), FileError> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_all());
        match written {
            Ok(()) => Ok(()),
            Err(source) => {
                self.file = Some(file);
                Err(FileError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }
}

impl Drop for PrivateFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Best effort: the file was made by this command and holds nothing yet.
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// The answer of a coordinator for external node `phone` in `prod`, reached through `vm-a`.
    fn answer(gateway_endpoints: &[&str]) -> ExternalNode {
        serde_json::from_value(serde_json::json!({
            "node": {
                "id": 7, "name": "phone", "network": "prod", "address": "100.64.0.7",
                "public_key": "QgcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
                "labels": {}, "tags": ["mobile"], "endpoints": [], "online": false,
                "last_seen": null, "revoked": false, "created_at": 1_714_564_800,
                "via": "vm-a"
            },
            "network_cidr": "100.64.0.0/16",
            "gateway": {
                "id": 1, "name": "vm-a",
                "public_key": "QgEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                "address": "100.64.0.1", "endpoints": gateway_endpoints, "online": true
            }
        }))
        .unwrap()
    }

    #[test]
    fn in_a_network_with_an_ipv6_prefix_both_families() {
        let mut a = answer(&["203.0.113.10:51820"]);
        a.node.address6 = Some("fd7a:115c:a1e0::6440:7".parse().unwrap());
        a.network_cidr6 = Some("fd7a:115c:a1e0::/48".parse().unwrap());
        let config = DeviceConfig::new(&a, None, None).unwrap();
        let text = config.text();
        assert!(
            text.contains("\nAddress = 100.64.0.7/32, fd7a:115c:a1e0::6440:7/128\n"),
            "{text}"
        );
        assert!(
            text.contains("\nAllowedIPs = 100.64.0.0/16, fd7a:115c:a1e0::/48\n"),
            "{text}"
        );
    }

    #[test]
    fn with_the_private_key_meshctl_made() {
        let key = DeviceKey::from_bytes([9; 32]);
        let private = Key(key.0.to_bytes()).to_base64();
        let config = DeviceConfig::new(
            &answer(&["203.0.113.10:51820", "198.51.100.1:51820"]),
            Some(&key),
            None,
        )
        .unwrap();
        assert!(config.has_private_key());
        assert_eq!(
            config.text(),
            format!(
                "# meshlink external node phone of network prod, reached through node vm-a.\n\
                 [Interface]\n\
                 PrivateKey = {private}\n\
                 Address = 100.64.0.7/32\n\
                 \n\
                 [Peer]\n\
                 # vm-a, the gateway: it forwards to and from the rest of the network.\n\
                 PublicKey = QgEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n\
                 Endpoint = 203.0.113.10:51820\n\
                 AllowedIPs = 100.64.0.0/16\n\
                 PersistentKeepalive = 25\n"
            )
        );
        assert_eq!(config.endpoint().to_string(), "203.0.113.10:51820");
    }

    #[test]
    fn without_a_private_key_the_line_is_left_to_fill_in() {
        let given: Endpoint = "gw.example.com:443".parse().unwrap();
        let config = DeviceConfig::new(&answer(&[]), None, Some(&given)).unwrap();
        assert!(!config.has_private_key());
        assert_eq!(
            config.text(),
            "# meshlink external node phone of network prod, reached through node vm-a.\n\
             [Interface]\n\
             # The device's own private key goes here: the one whose public key was\n\
             # registered (meshctl keeps no private key).\n\
             PrivateKey = \n\
             Address = 100.64.0.7/32\n\
             \n\
             [Peer]\n\
             # vm-a, the gateway: it forwards to and from the rest of the network.\n\
             PublicKey = QgEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n\
             Endpoint = gw.example.com:443\n\
             AllowedIPs = 100.64.0.0/16\n\
             PersistentKeepalive = 25\n"
        );
        // An endpoint given beats the gateway's own.
        let config =
            DeviceConfig::new(&answer(&["[2001:db8::1]:51820"]), None, Some(&given)).unwrap();
        assert_eq!(config.endpoint(), &given);
        let config = DeviceConfig::new(&answer(&["[2001:db8::1]:51820"]), None, None).unwrap();
        assert!(config.text().contains("\nEndpoint = [2001:db8::1]:51820\n"));
    }

    #[test]
    fn no_endpoint_names_the_gateway_and_the_flag() {
        let err = DeviceConfig::new(&answer(&[]), None, None).unwrap_err();
        assert_eq!(err.gateway, "vm-a");
        assert!(err.to_string().contains("--endpoint HOST:PORT"), "{err}");
    }

    #[test]
    fn names_cannot_add_lines() {
        let mut external = answer(&["203.0.113.10:51820"]);
        external.node.name = "x\n[Peer]\nPublicKey = evil".into();
        external.gateway.name = "gw\r\nEndpoint = 192.0.2.66:1".into();
        let config = DeviceConfig::new(&external, None, None).unwrap();
        let settings: Vec<&str> = config
            .text()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect();
        assert_eq!(
            settings,
            [
                "[Interface]",
                "PrivateKey = ",
                "Address = 100.64.0.7/32",
                "",
                "[Peer]",
                "PublicKey = QgEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                "Endpoint = 203.0.113.10:51820",
                "AllowedIPs = 100.64.0.0/16",
                "PersistentKeepalive = 25",
            ],
            "{}",
            config.text()
        );
        assert!(config.text().starts_with(
            "# meshlink external node x??Peer??PublicKey???evil of network prod, reached \
             through node gw??Endpoint???192.0.2.66?1.\n"
        ));
    }

    #[test]
    fn generated_keys_are_clamped_and_differ() {
        let a = DeviceKey::generate().unwrap();
        let b = DeviceKey::generate().unwrap();
        assert_ne!(a.public_key(), b.public_key());
        let bytes = a.0.to_bytes();
        assert_eq!((bytes[0] & 7, bytes[31] & 0xc0), (0, 0x40));
        // The public key is X25519's: the same as the one of the key read back from its text.
        let text = a.to_base64();
        let back = DeviceKey::from_bytes(Key::from_base64(&text).unwrap().0);
        assert_eq!(back.public_key(), a.public_key());
        assert!(!format!("{a:?}").contains(text.as_str()));
    }

    #[test]
    fn endpoints() {
        let parse = |s: &str| s.parse::<Endpoint>().map(|e| e.to_string());
        assert_eq!(parse("203.0.113.10:51820"), Ok("203.0.113.10:51820".into()));
        assert_eq!(parse("gw.example.com:443"), Ok("gw.example.com:443".into()));
        assert_eq!(
            parse("[2001:db8::1]:51820"),
            Ok("[2001:db8::1]:51820".into())
        );
        assert_eq!(parse("gw:5182a"), Err(EndpointError::Port));
        assert_eq!(parse("gw:0"), Err(EndpointError::Port));
        assert_eq!(parse("gw:65536"), Err(EndpointError::Port));
        assert_eq!(parse("gw:+1"), Err(EndpointError::Port));
        assert_eq!(parse("gw"), Err(EndpointError::Form));
        assert_eq!(parse("2001:db8::1:51820"), Err(EndpointError::Form));
        assert_eq!(parse("[2001:db8::1]"), Err(EndpointError::Form));
        assert_eq!(parse("[gw]:1"), Err(EndpointError::Host));
        assert_eq!(parse(":1"), Err(EndpointError::Host));
        assert_eq!(parse("gw\nx:1"), Err(EndpointError::Host));
        assert_eq!(parse("-gw:1"), Err(EndpointError::Host));
        assert_eq!(parse("a b:1"), Err(EndpointError::Host));
    }

    #[test]
    fn qr_code_is_half_blocks_with_a_quiet_zone() {
        let key = DeviceKey::from_bytes([9; 32]);
        let config = DeviceConfig::new(&answer(&["203.0.113.10:51820"]), Some(&key), None).unwrap();
        let qr = config.qr_code().unwrap();
        assert!(
            qr.chars()
                .all(|c| " \u{2580}\u{2584}\u{2588}\n".contains(c)),
            "{qr}"
        );
        let lines: Vec<&str> = qr.lines().collect();
        let width = lines[0].chars().count();
        // Version 1 is 21 modules, and the quiet zone adds 4 on each side.
        assert!(width >= 29, "{width}");
        assert!(lines.iter().all(|l| l.chars().count() == width));
        // Two modules a line: as many lines as half the width, rounded up.
        assert_eq!(lines.len(), width.div_ceil(2));
        // The quiet zone is light, drawn as full blocks.
        assert!(lines[0].chars().all(|c| c == '\u{2588}'));
        // A terminal 80 columns wide shows it whole.
        assert!(width <= 80, "{width}");
        // Read back as a camera sees a dark terminal (blocks light, spaces dark), it is the
        // configuration without its comments.
        let settings: String = config
            .text()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(read_back(&qr), settings);
    }

    /// The text of the one QR code drawn in `qr`, each module 4 pixels wide.
    fn read_back(qr: &str) -> String {
        const SCALE: usize = 4;
        let mut light: Vec<Vec<bool>> = Vec::new();
        for line in qr.lines() {
            let (top, bottom): (Vec<bool>, Vec<bool>) = line
                .chars()
                .map(|c| match c {
                    '\u{2588}' => (true, true),
                    '\u{2580}' => (true, false),
                    '\u{2584}' => (false, true),
                    _ => (false, false),
                })
                .unzip();
            light.push(top);
            light.push(bottom);
        }
        let (width, height) = (light[0].len() * SCALE, light.len() * SCALE);
        let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| {
            if light[y / SCALE][x / SCALE] {
                255
            } else {
                0
            }
        });
        let grids = image.detect_grids();
        assert_eq!(grids.len(), 1, "{qr}");
        grids[0].decode().expect("a readable QR code").1
    }

    #[test]
    fn files_are_new_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("phone.conf");
        let file = PrivateFile::create(&path).unwrap();
        assert_eq!(file.path(), path);
        file.write("[Interface]\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "[Interface]\n");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // An existing file is never overwritten, and the error names it.
        let err = PrivateFile::create(&path).unwrap_err();
        assert!(matches!(err, FileError::Exists { .. }), "{err:?}");
        assert!(err
            .to_string()
            .starts_with(&format!("{}: the file exists", path.display())));
        assert_eq!(fs::read_to_string(&path).unwrap(), "[Interface]\n");

        // Nor a symbolic link, even to a file that does not exist yet.
        let link = dir.path().join("link.conf");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
        assert!(matches!(
            PrivateFile::create(&link),
            Err(FileError::Exists { .. })
        ));
        assert!(!dir.path().join("elsewhere").exists());

        // Dropped before it was written (the command failed): it is gone.
        let unused = dir.path().join("unused.conf");
        drop(PrivateFile::create(&unused).unwrap());
        assert!(!unused.exists());

        let err = PrivateFile::create(&dir.path().join("no/such/dir.conf")).unwrap_err();
        assert!(matches!(err, FileError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("no/such/dir.conf"), "{err}");
    }
}
