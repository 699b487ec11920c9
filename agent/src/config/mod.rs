//! Configuration loading: a TOML file or a wg-quick file, `MESHLINK_*` environment variables
//! and command-line flags become one validated [`Settings`].
//!
//! # Precedence
//!
//! For each setting on its own: flag > environment variable > file > default. A list setting
//! (`addresses`) is taken whole from the first source that gives it; lists are not merged.
//! Peers come only from a file.
//!
//! # Sources
//!
//! * At most one file: a TOML file (`--config` or `MESHLINK_CONFIG`, format documented in
//!   `configs/agent.static.example.toml`) or a wg-quick file (`--wg-quick` or
//!   `MESHLINK_WG_QUICK`). A flag naming a file wins over both variables; two flags, or two
//!   variables and no flag, are an error. With no file, the settings come from the
//!   environment and flags alone, and there are no peers.
//! * Environment variables: `MESHLINK_INTERFACE`, `MESHLINK_PRIVATE_KEY_FILE`,
//!   `MESHLINK_LISTEN_PORT`, `MESHLINK_ADDRESSES` (comma-separated), `MESHLINK_MTU`,
//!   `MESHLINK_FWMARK`, `MESHLINK_UAPI_DIR`, `MESHLINK_MAX_CACHED_MAP_AGE`,
//!   `MESHLINK_FAIL_CLOSED`, `MESHLINK_METRICS_LISTEN`, `MESHLINK_DNS`, `MESHLINK_DNS_LISTEN`,
//!   `MESHLINK_DNS_SUFFIX`. A variable that is empty counts as unset. Other `MESHLINK_*`
//!   variables are ignored here.
//! * Flags, as [`Overrides`].
//!
//! Relative paths inside a TOML file (`private_key_file`, `preshared_key_file`, `uapi_dir`)
//! are relative to the directory of that file; relative paths from flags and variables are
//! relative to the working directory.
//!
//! # wg-quick files
//!
//! The `[Interface]` keys `PrivateKey`, `ListenPort`, `Address`, `MTU`, `FwMark` and the
//! `[Peer]` keys `PublicKey`, `PresharedKey`, `Endpoint`, `AllowedIPs`, `PersistentKeepalive`
//! are read; key names are case-insensitive and `Address`/`AllowedIPs` may repeat. The
//! wg-quick-only keys `DNS`, `Table`, `PreUp`, `PostUp`, `PreDown`, `PostDown` and `SaveConfig`
//! are refused rather than ignored, as is any unknown key. The interface name defaults to the
//! file name without `.conf`. Since the file holds the private key inline, it must have mode
//! `0600` or stricter, like a key file (wg-quick only warns; meshlink-agent refuses).
//!
//! # Errors
//!
//! Every [`ConfigError`] is one line naming where the bad value came from: the file and key
//! (`/etc/meshlink/agent.toml: peers[1].allowed_ips: invalid network "10.0.0.300/32"`), the
//! file and line (wg-quick), the environment variable or the flag. In TOML key paths,
//! `peers[N]` counts `[[peers]]` tables from 0. Secrets are never echoed.
//!
//! # Where things are
//!
//! * This module: the public API ([`Overrides`], [`Origin`], [`ConfigError`], the `ENV_*`
//!   names and limits) and the entry points that read the files ([`load_settings`],
//!   [`load_api_configured`], [`names_static_peers`]).
//! * `layers`: what flags, environment variables and a file each give, and the precedence
//!   that merges them into [`Settings`].
//! * `toml_file`: the TOML format and its error positions (file, line, key).
//! * `wg_quick`: the wg-quick format, read line by line.
//! * `test_support` (tests only): the keys, resolver, environments and files the tests share.
//! * `values`: the value parsers the layers share (interface names, ports, MTUs, addresses,
//!   endpoints, durations, ...).

mod layers;
#[cfg(test)]
mod test_support;
mod toml_file;
mod values;
mod wg_quick;

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use layers::{
    choose_file, env_layer, flag_layer, merge, FileKind, FileLayer, KeySource, Layer, Val,
};
use toml_file::{names_key_or_peers, parse_toml};
use values::parse_interface;
use wg_quick::parse_wg_quick;

use meshlink_proto::toml_error;

use crate::keyfile::{self, KeyFileError};
use crate::settings::{PrivateKey, Settings};

pub use values::{format_map_age, parse_dns_suffix, parse_map_age, parse_metrics_listen};

/// Environment variable naming a TOML configuration file.
pub const ENV_CONFIG: &str = "MESHLINK_CONFIG";
/// Environment variable naming a wg-quick configuration file.
pub const ENV_WG_QUICK: &str = "MESHLINK_WG_QUICK";
/// Environment variable for the interface name.
pub const ENV_INTERFACE: &str = "MESHLINK_INTERFACE";
/// Environment variable for the private key file.
pub const ENV_PRIVATE_KEY_FILE: &str = "MESHLINK_PRIVATE_KEY_FILE";
/// Environment variable for the UDP listen port.
pub const ENV_LISTEN_PORT: &str = "MESHLINK_LISTEN_PORT";
/// Environment variable for the overlay addresses, comma-separated.
pub const ENV_ADDRESSES: &str = "MESHLINK_ADDRESSES";
/// Environment variable for the MTU.
pub const ENV_MTU: &str = "MESHLINK_MTU";
/// Environment variable for the firewall mark.
pub const ENV_FWMARK: &str = "MESHLINK_FWMARK";
/// Environment variable for the userspace API socket directory.
pub const ENV_UAPI_DIR: &str = "MESHLINK_UAPI_DIR";
/// Environment variable for the longest trust in an unconfirmed network map.
pub const ENV_MAX_CACHED_MAP_AGE: &str = "MESHLINK_MAX_CACHED_MAP_AGE";
/// Environment variable for keeping blackhole routes for the overlay while the agent is down.
pub const ENV_FAIL_CLOSED: &str = "MESHLINK_FAIL_CLOSED";

/// Environment variable for where Prometheus metrics are served (loopback or a Unix socket).
pub const ENV_METRICS_LISTEN: &str = "MESHLINK_METRICS_LISTEN";
/// Environment variable turning a mesh node's DNS server on or off.
pub const ENV_DNS: &str = "MESHLINK_DNS";
/// Environment variable for where a mesh node's DNS server listens.
pub const ENV_DNS_LISTEN: &str = "MESHLINK_DNS_LISTEN";
/// Environment variable for the suffix of mesh names.
pub const ENV_DNS_SUFFIX: &str = "MESHLINK_DNS_SUFFIX";

/// The smallest MTU accepted.
pub const MIN_MTU: u16 = 576;
/// The smallest MTU accepted when an IPv6 address is assigned (IPv6 requires 1280).
pub const MIN_MTU_IPV6: u16 = 1280;
/// The largest MTU accepted.
pub const MAX_MTU: u16 = 9000;
/// The longest interface name Linux accepts, in bytes.
pub use meshlink_uapi::MAX_INTERFACE_LEN;

/// The longest `max_cached_map_age` accepted short of `never`: ten years.
pub const MAX_MAP_AGE: Duration = Duration::from_secs(3650 * 24 * 3600);

/// The largest wg-quick or TOML file read, in bytes.
const CONFIG_FILE_LIMIT: u64 = 1 << 20;

/// Settings given as command-line flags; `None` means the flag was not given.
///
/// Each field wins over the matching environment variable and file key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--interface`.
    pub interface: Option<String>,
    /// `--private-key-file`.
    pub private_key_file: Option<PathBuf>,
    /// `--listen-port`.
    pub listen_port: Option<u16>,
    /// `--address`, repeatable; each item may also hold a comma-separated list.
    pub addresses: Option<Vec<String>>,
    /// `--mtu`.
    pub mtu: Option<u16>,
    /// `--fwmark`.
    pub fwmark: Option<u32>,
    /// `--uapi-dir`.
    pub uapi_dir: Option<PathBuf>,
    /// `--max-cached-map-age`: a duration (`90s`, `12h`, `7d`) or `never`.
    pub max_cached_map_age: Option<String>,
    /// `--fail-closed[=BOOL]`.
    pub fail_closed: Option<bool>,
    /// `--metrics-listen`: a loopback `ADDR:PORT` or a Unix socket path.
    pub metrics_listen: Option<String>,
    /// `--dns[=BOOL]`.
    pub dns: Option<bool>,
    /// `--dns-listen`: `ADDR:PORT`.
    pub dns_listen: Option<String>,
    /// `--dns-suffix`.
    pub dns_suffix: Option<String>,
}

/// Where a configuration value came from; errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag, such as `--mtu`.
    Flag(&'static str),
    /// An environment variable, such as `MESHLINK_MTU`.
    Env(&'static str),
    /// A key in a configuration file.
    File {
        /// The file.
        path: PathBuf,
        /// The line, when known (wg-quick files).
        line: Option<usize>,
        /// The key, such as `peers[1].allowed_ips` or `AllowedIPs`.
        key: String,
    },
    /// The built-in default of the named setting.
    Default(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "flag {flag}"),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::File {
                path,
                line: Some(line),
                key,
            } => write!(f, "{} line {line}: {key}", path.display()),
            Origin::File {
                path,
                line: None,
                key,
            } => write!(f, "{}: {key}", path.display()),
            Origin::Default(setting) => write!(f, "default {setting}"),
        }
    }
}

/// Why the configuration cannot become [`Settings`]. Each message is one line naming the
/// file and key, the environment variable or the flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Two configuration files were named (`first` and `second` are flags or variables).
    #[error("both {first} and {second} name a configuration file; use only one")]
    ConflictingSources {
        /// The first flag or variable.
        first: &'static str,
        /// The second flag or variable.
        second: &'static str,
    },
    /// A configuration file cannot be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// A file is not well-formed, or (TOML) has an unknown key or a value of the wrong type.
    #[error("{path} line {line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The line, counted from 1.
        line: usize,
        /// What is wrong, naming the key when there is one.
        message: String,
    },
    /// A wg-quick key that meshlink-agent does not implement.
    #[error(
        "{path} line {line}: `{key}` is a wg-quick setting not supported by meshlink-agent; \
         remove it and do its job another way"
    )]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The line, counted from 1.
        line: usize,
        /// The key as written.
        key: String,
    },
    /// A wg-quick key that is not known in its section.
    #[error("{path} line {line}: unknown key `{key}` in [{section}]")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The line, counted from 1.
        line: usize,
        /// The key as written.
        key: String,
        /// `Interface` or `Peer`.
        section: &'static str,
    },
    /// A value that is well-formed but not acceptable.
    #[error("{at}: {reason}")]
    Invalid {
        /// Where the value came from.
        at: Origin,
        /// What is wrong with it.
        reason: String,
    },
    /// A key file (or the wg-quick file, which holds a key) cannot be used.
    #[error("{at}: {source}")]
    KeyFile {
        /// Where the file was named.
        at: Origin,
        /// What is wrong with the file.
        #[source]
        source: KeyFileError,
    },
    /// No private key was configured anywhere.
    #[error(
        "no private key: set private_key_file in the configuration file, PrivateKey in a \
         wg-quick file, {ENV_PRIVATE_KEY_FILE}, or --private-key-file"
    )]
    MissingPrivateKey,
}

/// Reads an environment variable of this process, for [`load_settings`]. A value that is not
/// valid Unicode is converted lossily (and then fails validation, naming the variable).
pub fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// Builds the validated [`Settings`] from at most one file, the environment and flags.
///
/// `config` and `wg_quick` are the `--config` and `--wg-quick` flags; when neither is given,
/// `MESHLINK_CONFIG` and `MESHLINK_WG_QUICK` are looked up through `env`. `env` is how
/// variables are read: pass [`process_env`] for the real environment. Endpoints that are host
/// names are resolved with the system resolver; key files are read and checked.
///
/// # Errors
/// [`ConfigError`] naming the file and key, variable or flag whose value is wrong, or
/// [`ConfigError::MissingPrivateKey`] when no source gives a private key.
pub fn load_settings(
    config: Option<&Path>,
    wg_quick: Option<&Path>,
    overrides: &Overrides,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    load_with(config, wg_quick, overrides, env, &system_resolve)
}

/// The settings of a device that is configured through its userspace API once it runs
/// (`meshlink-agent INTERFACE`, wg-quick's userspace hook): the interface `interface`
/// (argument `argument`, for errors), the environment variables read as [`load_settings`]
/// reads them, and no file. Without `MESHLINK_PRIVATE_KEY_FILE` the device starts with
/// `placeholder_key` (a fresh key that no peer knows) until the configurer sets its own.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the argument or the variable at fault; a key file that
/// cannot be used.
pub fn load_api_configured(
    argument: &'static str,
    interface: &str,
    env: &impl Fn(&str) -> Option<String>,
    placeholder_key: PrivateKey,
) -> Result<Settings, ConfigError> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let mut flags = Layer::default();
    let name = parse_interface(interface).map_err(|reason| ConfigError::Invalid {
        at: Origin::Flag(argument),
        reason,
    })?;
    flags.interface = Some(Val::new(name, Origin::Flag(argument)));
    let mut defaults = FileLayer::default();
    defaults.layer.private_key = Some(Val::new(
        KeySource::Inline(placeholder_key),
        Origin::Default("private key"),
    ));
    merge(flags, env_layer(&env)?, defaults)
}

/// Whether the TOML configuration file at `path` describes a node with static peers (it names
/// a private key or peers), rather than only the local settings of a mesh node (interface,
/// MTU, socket directory, ...), whose key and peers come from its state directory and the
/// coordinator.
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Syntax`], as [`load_settings`] would report them.
pub fn names_static_peers(path: &Path) -> Result<bool, ConfigError> {
    let text = read_toml_text(path)?;
    names_key_or_peers(path, &text)
}

/// A TOML configuration file's text.
fn read_toml_text(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    utf8_text(path, text)
}

/// A wg-quick file's text; the file holds the private key, so it is read as a key file is
/// (`named_by` says where the file was named, for errors).
fn read_wg_quick_text(path: &Path, named_by: Origin) -> Result<String, ConfigError> {
    let bytes = keyfile::read_secret_file(path, CONFIG_FILE_LIMIT).map_err(|source| {
        ConfigError::KeyFile {
            at: named_by,
            source,
        }
    })?;
    utf8_text(path, bytes)
}

/// A file's bytes as text, or the line of the first byte that is not UTF-8.
fn utf8_text(path: &Path, bytes: Vec<u8>) -> Result<String, ConfigError> {
    String::from_utf8(bytes).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        line: toml_error::line_of(e.as_bytes(), e.utf8_error().valid_up_to()),
        message: "the file is not UTF-8 text".to_string(),
    })
}

/// Resolves a host name and port to addresses.
type Resolver = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>>;

/// Resolves with the operating system (`getaddrinfo`).
fn system_resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    (host, port).to_socket_addrs().map(Iterator::collect)
}

/// [`load_settings`] with the resolver passed in, so that tests need no DNS.
fn load_with(
    config: Option<&Path>,
    wg_quick: Option<&Path>,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
    resolve: &Resolver,
) -> Result<Settings, ConfigError> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let file = match choose_file(config, wg_quick, &env)? {
        None => FileLayer::default(),
        Some((FileKind::Toml, path, _)) => {
            let text = read_toml_text(&path)?;
            parse_toml(&path, &text, resolve)?
        }
        Some((FileKind::WgQuick, path, named_by)) => {
            let text = read_wg_quick_text(&path, named_by)?;
            parse_wg_quick(&path, &text, resolve)?
        }
    };
    let env_layer = env_layer(&env)?;
    let flag_layer = flag_layer(overrides)?;
    merge(flag_layer, env_layer, file)
}

#[cfg(test)]
mod tests {
    use super::test_support::{env_from, fake_resolve, no_env, pubkey, Fixture};
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let f = Fixture::new();
        let absent = f.dir.path("absent.toml");
        let msg = load_with(
            Some(&absent),
            None,
            &Overrides::default(),
            &no_env,
            &fake_resolve,
        )
        .expect_err("missing")
        .to_string();
        assert!(msg.contains(&absent.display().to_string()), "{msg}");
        let msg = f.toml_err("private_key_file = \"/nonexistent/meshlink.key\"\n");
        assert!(msg.contains("/nonexistent/meshlink.key"), "{msg}");
        assert!(msg.contains("agent.toml: private_key_file"), "{msg}");
        let absent = f.dir.path("wg9.conf");
        let msg = load_with(
            None,
            Some(&absent),
            &Overrides::default(),
            &no_env,
            &fake_resolve,
        )
        .expect_err("missing")
        .to_string();
        assert!(msg.contains("flag --wg-quick"), "{msg}");
        assert!(msg.contains(&absent.display().to_string()), "{msg}");
    }

    #[test]
    fn api_configured_device_takes_the_argument_the_variables_and_a_placeholder_key() {
        let placeholder = PrivateKey::from_bytes([9; 32]);
        let env = env_from(&[
            ("MESHLINK_LISTEN_PORT", "51820"),
            ("MESHLINK_INTERFACE", "x0"),
        ]);
        let s = load_api_configured("INTERFACE", "wg0", &env, placeholder.clone()).unwrap();
        assert_eq!(s.interface, "wg0");
        assert_eq!(s.device.listen_port, 51820);
        assert_eq!(s.device.private_key, placeholder);
        assert!(s.device.peers.is_empty() && s.addresses.is_empty());

        let f = Fixture::new();
        let path = f.key_path.display().to_string();
        let env = env_from(&[("MESHLINK_PRIVATE_KEY_FILE", &path)]);
        let s = load_api_configured("INTERFACE", "wg0", &env, placeholder.clone()).unwrap();
        assert_eq!(s.device.private_key, PrivateKey::from_bytes([1; 32]));

        let msg = load_api_configured("INTERFACE", "wg/0", &no_env, placeholder.clone())
            .expect_err("bad name")
            .to_string();
        assert!(msg.contains("INTERFACE") && msg.contains("wg/0"), "{msg}");
        let env = env_from(&[("MESHLINK_LISTEN_PORT", "banana")]);
        let msg = load_api_configured("INTERFACE", "wg0", &env, placeholder)
            .expect_err("bad port")
            .to_string();
        assert!(msg.contains("MESHLINK_LISTEN_PORT"), "{msg}");
    }

    #[test]
    fn a_file_without_key_and_peers_is_a_mesh_nodes() {
        let f = Fixture::new();
        let mesh = f.write(
            "mesh.toml",
            "mtu = 1380\nmax_cached_map_age = \"1d\"\n",
            0o644,
        );
        assert!(!names_static_peers(&mesh).unwrap());
        let keyed = f.write("keyed.toml", "private_key_file = \"k\"\n", 0o644);
        assert!(names_static_peers(&keyed).unwrap());
        let peers = format!("[[peers]]\npublic_key = \"{}\"\n", pubkey(2));
        let peers = f.write("peers.toml", &peers, 0o644);
        assert!(names_static_peers(&peers).unwrap());
        let bad = f.write("bad.toml", "mtu = \n", 0o644);
        let msg = names_static_peers(&bad).unwrap_err().to_string();
        assert!(msg.contains("bad.toml line 1"), "{msg}");
    }
}
