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

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use meshlink_proto::{Key, PublicKey};
use serde::Deserialize;

use crate::keyfile::{self, KeyFileError};
use crate::settings::{
    DeviceConfig, DnsSettings, MetricsListen, PeerConfig, PrivateKey, Settings, DEFAULT_DNS_PORT,
    DEFAULT_DNS_SUFFIX, DEFAULT_INTERFACE, DEFAULT_MAX_CACHED_MAP_AGE, DEFAULT_MTU,
    DEFAULT_UAPI_DIR,
};

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
pub const MAX_INTERFACE_LEN: usize = 15;

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
    let raw: TomlFile = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
    Ok(raw.private_key_file.is_some() || !raw.peers.is_empty())
}

/// A TOML configuration file's text.
fn read_toml_text(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        line: line_of(e.as_bytes(), e.utf8_error().valid_up_to()),
        message: "the file is not UTF-8 text".to_string(),
    })
}

/// Resolves a host name and port to addresses.
type Resolver = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>>;

/// Resolves with the operating system (`getaddrinfo`).
fn system_resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    (host, port).to_socket_addrs().map(Iterator::collect)
}

/// A value and where it came from.
#[derive(Debug, Clone)]
struct Val<T> {
    value: T,
    origin: Origin,
}

impl<T> Val<T> {
    fn new(value: T, origin: Origin) -> Self {
        Val { value, origin }
    }
}

/// Where the private key comes from.
#[derive(Debug, Clone)]
enum KeySource {
    /// A key file, read when this source wins.
    File(PathBuf),
    /// A key written in the configuration (wg-quick's `PrivateKey`).
    Inline(PrivateKey),
}

/// The settings one source gives; `None` means the source does not give that setting.
#[derive(Debug, Default)]
struct Layer {
    interface: Option<Val<String>>,
    private_key: Option<Val<KeySource>>,
    listen_port: Option<Val<u16>>,
    addresses: Option<Val<Vec<IpNet>>>,
    mtu: Option<Val<u16>>,
    fwmark: Option<Val<u32>>,
    uapi_dir: Option<Val<PathBuf>>,
    /// `Some(None)`: `never`.
    max_cached_map_age: Option<Val<Option<Duration>>>,
    fail_closed: Option<Val<bool>>,
    metrics_listen: Option<Val<MetricsListen>>,
    dns: Option<Val<bool>>,
    dns_listen: Option<Val<SocketAddr>>,
    dns_suffix: Option<Val<String>>,
}

/// A file's settings and its peers, each peer with where its public key was given.
#[derive(Debug, Default)]
struct FileLayer {
    layer: Layer,
    peers: Vec<(PeerConfig, Origin)>,
    /// Why the interface name the file implies (a wg-quick file's name) is invalid; an error
    /// only when no flag or variable gives the name instead.
    interface_error: Option<ConfigError>,
}

/// Which kind of file to read.
enum FileKind {
    Toml,
    WgQuick,
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
            let bytes = keyfile::read_secret_file(&path, CONFIG_FILE_LIMIT).map_err(|source| {
                ConfigError::KeyFile {
                    at: named_by,
                    source,
                }
            })?;
            let text = String::from_utf8(bytes).map_err(|e| ConfigError::Syntax {
                path: path.clone(),
                line: line_of(e.as_bytes(), e.utf8_error().valid_up_to()),
                message: "the file is not UTF-8 text".to_string(),
            })?;
            parse_wg_quick(&path, &text, resolve)?
        }
    };
    let env_layer = env_layer(&env)?;
    let flag_layer = flag_layer(overrides)?;
    merge(flag_layer, env_layer, file)
}

/// Picks the configuration file: flags first, then variables. Returns the kind, the path and
/// where it was named.
fn choose_file(
    config: Option<&Path>,
    wg_quick: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(FileKind, PathBuf, Origin)>, ConfigError> {
    let chosen = match (config, wg_quick) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::ConflictingSources {
                first: "--config",
                second: "--wg-quick",
            })
        }
        (Some(c), None) => Some((FileKind::Toml, c.to_path_buf(), Origin::Flag("--config"))),
        (None, Some(w)) => Some((
            FileKind::WgQuick,
            w.to_path_buf(),
            Origin::Flag("--wg-quick"),
        )),
        (None, None) => match (env(ENV_CONFIG), env(ENV_WG_QUICK)) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::ConflictingSources {
                    first: ENV_CONFIG,
                    second: ENV_WG_QUICK,
                })
            }
            (Some(c), None) => Some((FileKind::Toml, PathBuf::from(c), Origin::Env(ENV_CONFIG))),
            (None, Some(w)) => Some((
                FileKind::WgQuick,
                PathBuf::from(w),
                Origin::Env(ENV_WG_QUICK),
            )),
            (None, None) => None,
        },
    };
    Ok(chosen)
}

/// Combines the layers, reads the private key, applies defaults and checks the whole.
fn merge(flags: Layer, env: Layer, file: FileLayer) -> Result<Settings, ConfigError> {
    let FileLayer {
        layer: file_layer,
        peers,
        interface_error,
    } = file;
    let interface = match (flags.interface.or(env.interface), interface_error) {
        (Some(v), _) => v.value,
        (None, Some(err)) => return Err(err),
        (None, None) => file_layer
            .interface
            .map_or_else(|| DEFAULT_INTERFACE.to_string(), |v| v.value),
    };
    let listen_port = flags
        .listen_port
        .or(env.listen_port)
        .or(file_layer.listen_port)
        .map_or(0, |v| v.value);
    let addresses = flags.addresses.or(env.addresses).or(file_layer.addresses);
    let mtu = flags
        .mtu
        .or(env.mtu)
        .or(file_layer.mtu)
        .unwrap_or_else(|| Val::new(DEFAULT_MTU, Origin::Default("mtu")));
    let fwmark = flags
        .fwmark
        .or(env.fwmark)
        .or(file_layer.fwmark)
        .map(|v| v.value)
        .filter(|mark| *mark != 0);
    let uapi_dir = flags
        .uapi_dir
        .or(env.uapi_dir)
        .or(file_layer.uapi_dir)
        .map_or_else(|| PathBuf::from(DEFAULT_UAPI_DIR), |v| v.value);
    let max_cached_map_age = flags
        .max_cached_map_age
        .or(env.max_cached_map_age)
        .or(file_layer.max_cached_map_age)
        .map_or(Some(DEFAULT_MAX_CACHED_MAP_AGE), |v| v.value);
    let fail_closed = flags
        .fail_closed
        .or(env.fail_closed)
        .or(file_layer.fail_closed)
        .is_some_and(|v| v.value);
    let metrics_listen = flags
        .metrics_listen
        .or(env.metrics_listen)
        .or(file_layer.metrics_listen)
        .map(|v| v.value);
    let dns = DnsSettings {
        enabled: flags
            .dns
            .or(env.dns)
            .or(file_layer.dns)
            .is_none_or(|v| v.value),
        listen: flags
            .dns_listen
            .or(env.dns_listen)
            .or(file_layer.dns_listen)
            .map(|v| v.value),
        suffix: flags
            .dns_suffix
            .or(env.dns_suffix)
            .or(file_layer.dns_suffix)
            .map_or_else(|| DEFAULT_DNS_SUFFIX.to_string(), |v| v.value),
    };
    let key_source = flags
        .private_key
        .or(env.private_key)
        .or(file_layer.private_key)
        .ok_or(ConfigError::MissingPrivateKey)?;

    if let Some(addresses) = &addresses {
        if mtu.value < MIN_MTU_IPV6 {
            if let Some(v6) = addresses.value.iter().find(|a| matches!(a, IpNet::V6(_))) {
                return Err(ConfigError::Invalid {
                    at: mtu.origin,
                    reason: format!(
                        "{} is below {MIN_MTU_IPV6}, the minimum MTU for IPv6, and IPv6 \
                         address {v6} is assigned ({})",
                        mtu.value, addresses.origin
                    ),
                });
            }
        }
    }

    let private_key = match key_source.value {
        KeySource::Inline(key) => key,
        KeySource::File(path) => {
            keyfile::read_private_key(&path).map_err(|source| ConfigError::KeyFile {
                at: key_source.origin.clone(),
                source,
            })?
        }
    };
    let own = private_key.public_key();
    if let Some((_, at)) = peers.iter().find(|(p, _)| p.public_key == own) {
        return Err(ConfigError::Invalid {
            at: at.clone(),
            reason: format!(
                "{own} is this device's own public key (from {}); a device cannot be its \
                 own peer",
                key_source.origin
            ),
        });
    }

    Ok(Settings {
        interface,
        addresses: addresses.map(|v| v.value).unwrap_or_default(),
        mtu: mtu.value,
        uapi_dir,
        device: DeviceConfig {
            private_key,
            listen_port,
            fwmark,
            peers: peers.into_iter().map(|(p, _)| p).collect(),
        },
        max_cached_map_age,
        fail_closed,
        install_routes: true,
        metrics_listen,
        dns,
    })
}

// ---------------------------------------------------------------------------------------
// Flags and environment variables
// ---------------------------------------------------------------------------------------

/// The settings given as flags, checked.
fn flag_layer(o: &Overrides) -> Result<Layer, ConfigError> {
    let invalid = |flag: &'static str| {
        move |reason: String| ConfigError::Invalid {
            at: Origin::Flag(flag),
            reason,
        }
    };
    let mut layer = Layer::default();
    if let Some(name) = &o.interface {
        let value = parse_interface(name).map_err(invalid("--interface"))?;
        layer.interface = Some(Val::new(value, Origin::Flag("--interface")));
    }
    if let Some(path) = &o.private_key_file {
        check_path(path).map_err(invalid("--private-key-file"))?;
        layer.private_key = Some(Val::new(
            KeySource::File(path.clone()),
            Origin::Flag("--private-key-file"),
        ));
    }
    if let Some(port) = o.listen_port {
        layer.listen_port = Some(Val::new(port, Origin::Flag("--listen-port")));
    }
    if let Some(items) = &o.addresses {
        let mut addresses = Vec::new();
        for item in items {
            addresses.extend(parse_address_list(item).map_err(invalid("--address"))?);
        }
        check_duplicate_addresses(&addresses).map_err(invalid("--address"))?;
        layer.addresses = Some(Val::new(addresses, Origin::Flag("--address")));
    }
    if let Some(mtu) = o.mtu {
        let mtu = check_mtu(i64::from(mtu)).map_err(invalid("--mtu"))?;
        layer.mtu = Some(Val::new(mtu, Origin::Flag("--mtu")));
    }
    if let Some(mark) = o.fwmark {
        layer.fwmark = Some(Val::new(mark, Origin::Flag("--fwmark")));
    }
    if let Some(dir) = &o.uapi_dir {
        check_path(dir).map_err(invalid("--uapi-dir"))?;
        layer.uapi_dir = Some(Val::new(dir.clone(), Origin::Flag("--uapi-dir")));
    }
    if let Some(age) = &o.max_cached_map_age {
        let value = parse_map_age(age).map_err(invalid("--max-cached-map-age"))?;
        layer.max_cached_map_age = Some(Val::new(value, Origin::Flag("--max-cached-map-age")));
    }
    if let Some(on) = o.fail_closed {
        layer.fail_closed = Some(Val::new(on, Origin::Flag("--fail-closed")));
    }
    if let Some(at) = &o.metrics_listen {
        let value = parse_metrics_listen(at).map_err(invalid("--metrics-listen"))?;
        layer.metrics_listen = Some(Val::new(value, Origin::Flag("--metrics-listen")));
    }
    if let Some(on) = o.dns {
        layer.dns = Some(Val::new(on, Origin::Flag("--dns")));
    }
    if let Some(at) = &o.dns_listen {
        let value = parse_dns_listen(at).map_err(invalid("--dns-listen"))?;
        layer.dns_listen = Some(Val::new(value, Origin::Flag("--dns-listen")));
    }
    if let Some(suffix) = &o.dns_suffix {
        let value = parse_dns_suffix(suffix).map_err(invalid("--dns-suffix"))?;
        layer.dns_suffix = Some(Val::new(value, Origin::Flag("--dns-suffix")));
    }
    Ok(layer)
}

/// The settings given as environment variables, checked. `env` already maps empty values to
/// `None`.
fn env_layer(env: &dyn Fn(&str) -> Option<String>) -> Result<Layer, ConfigError> {
    let invalid = |var: &'static str| {
        move |reason: String| ConfigError::Invalid {
            at: Origin::Env(var),
            reason,
        }
    };
    let mut layer = Layer::default();
    if let Some(name) = env(ENV_INTERFACE) {
        let value = parse_interface(&name).map_err(invalid(ENV_INTERFACE))?;
        layer.interface = Some(Val::new(value, Origin::Env(ENV_INTERFACE)));
    }
    if let Some(path) = env(ENV_PRIVATE_KEY_FILE) {
        layer.private_key = Some(Val::new(
            KeySource::File(PathBuf::from(path)),
            Origin::Env(ENV_PRIVATE_KEY_FILE),
        ));
    }
    if let Some(port) = env(ENV_LISTEN_PORT) {
        let value = parse_port(&port).map_err(invalid(ENV_LISTEN_PORT))?;
        layer.listen_port = Some(Val::new(value, Origin::Env(ENV_LISTEN_PORT)));
    }
    if let Some(list) = env(ENV_ADDRESSES) {
        let addresses = parse_address_list(&list).map_err(invalid(ENV_ADDRESSES))?;
        check_duplicate_addresses(&addresses).map_err(invalid(ENV_ADDRESSES))?;
        layer.addresses = Some(Val::new(addresses, Origin::Env(ENV_ADDRESSES)));
    }
    if let Some(mtu) = env(ENV_MTU) {
        let value = parse_mtu(&mtu).map_err(invalid(ENV_MTU))?;
        layer.mtu = Some(Val::new(value, Origin::Env(ENV_MTU)));
    }
    if let Some(mark) = env(ENV_FWMARK) {
        let value = parse_fwmark(&mark).map_err(invalid(ENV_FWMARK))?;
        layer.fwmark = Some(Val::new(value, Origin::Env(ENV_FWMARK)));
    }
    if let Some(dir) = env(ENV_UAPI_DIR) {
        layer.uapi_dir = Some(Val::new(PathBuf::from(dir), Origin::Env(ENV_UAPI_DIR)));
    }
    if let Some(age) = env(ENV_MAX_CACHED_MAP_AGE) {
        let value = parse_map_age(&age).map_err(invalid(ENV_MAX_CACHED_MAP_AGE))?;
        layer.max_cached_map_age = Some(Val::new(value, Origin::Env(ENV_MAX_CACHED_MAP_AGE)));
    }
    if let Some(on) = env(ENV_FAIL_CLOSED) {
        let value = parse_bool(&on).map_err(invalid(ENV_FAIL_CLOSED))?;
        layer.fail_closed = Some(Val::new(value, Origin::Env(ENV_FAIL_CLOSED)));
    }
    if let Some(at) = env(ENV_METRICS_LISTEN) {
        let value = parse_metrics_listen(&at).map_err(invalid(ENV_METRICS_LISTEN))?;
        layer.metrics_listen = Some(Val::new(value, Origin::Env(ENV_METRICS_LISTEN)));
    }
    if let Some(on) = env(ENV_DNS) {
        let value = parse_bool(&on).map_err(invalid(ENV_DNS))?;
        layer.dns = Some(Val::new(value, Origin::Env(ENV_DNS)));
    }
    if let Some(at) = env(ENV_DNS_LISTEN) {
        let value = parse_dns_listen(&at).map_err(invalid(ENV_DNS_LISTEN))?;
        layer.dns_listen = Some(Val::new(value, Origin::Env(ENV_DNS_LISTEN)));
    }
    if let Some(suffix) = env(ENV_DNS_SUFFIX) {
        let value = parse_dns_suffix(&suffix).map_err(invalid(ENV_DNS_SUFFIX))?;
        layer.dns_suffix = Some(Val::new(value, Origin::Env(ENV_DNS_SUFFIX)));
    }
    Ok(layer)
}

// ---------------------------------------------------------------------------------------
// TOML files
// ---------------------------------------------------------------------------------------

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

/// Parses and checks a TOML configuration file's text; `path` is for messages and for
/// resolving relative paths.
fn parse_toml(path: &Path, text: &str, resolve: &Resolver) -> Result<FileLayer, ConfigError> {
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
    let start = err.span().map_or(0, |s| s.start);
    let line = line_of(text.as_bytes(), start);
    let mut message = err
        .message()
        .trim()
        .replace('\n', " ")
        .replace("expected i64", "expected an integer");
    // Only the unknown- and missing-field messages name a key: take others' from the line.
    if !message.contains("field `") {
        if let Some(key) = key_on_line(text, start) {
            message = format!("{key}: {message}");
        }
    }
    ConfigError::Syntax {
        path: path.to_path_buf(),
        line,
        message,
    }
}

/// The key of the `key = value` line (or `[table]` header) holding byte `offset`, when it
/// is a plain key.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let line_start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text
        .get(offset..)?
        .find('\n')
        .map_or(text.len(), |i| offset + i);
    let line = text.get(line_start..line_end)?.trim();
    let key = match line.strip_prefix('[') {
        Some(header) => header.trim_matches(|c| c == '[' || c == ']').trim(),
        None => line.split_once('=')?.0.trim(),
    };
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    plain.then(|| key.to_string())
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &[u8], offset: usize) -> usize {
    let end = offset.min(text.len());
    1 + text[..end].iter().filter(|b| **b == b'\n').count()
}

// ---------------------------------------------------------------------------------------
// wg-quick files
// ---------------------------------------------------------------------------------------

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

/// The section being read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    Interface,
    Peer,
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
    /// Single-valued keys seen so far, with their lines.
    seen: HashMap<&'static str, usize>,
}

/// Parses and checks a wg-quick file's text; `path` is for messages and the interface name.
fn parse_wg_quick(path: &Path, text: &str, resolve: &Resolver) -> Result<FileLayer, ConfigError> {
    let mut layer = Layer::default();
    let stem = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".conf").unwrap_or(n))
        .unwrap_or_default();
    let stem_origin = Origin::File {
        path: path.to_path_buf(),
        line: None,
        key: "interface name taken from the file name".to_string(),
    };
    // An invalid name is an error only if it is used (a flag or variable may give another).
    let stem_name = parse_interface(stem);

    let mut section = Section::None;
    let mut interface_line: Option<usize> = None;
    let mut interface_seen: HashMap<&'static str, usize> = HashMap::new();
    let mut addresses: Vec<IpNet> = Vec::new();
    let mut address_line: Option<usize> = None;
    let mut peers: Vec<WgPeer> = Vec::new();

    for (index, raw_line) in text.lines().enumerate() {
        let line = index + 1;
        let syntax = |message: String| ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            message,
        };
        let content = raw_line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if let Some(header) = content.strip_prefix('[') {
            let name = header
                .strip_suffix(']')
                .ok_or_else(|| syntax("a section header lacks `]`".to_string()))?
                .trim();
            if name.eq_ignore_ascii_case("interface") {
                if let Some(first) = interface_line {
                    return Err(syntax(format!(
                        "second [Interface] section (the first is at line {first})"
                    )));
                }
                interface_line = Some(line);
                section = Section::Interface;
            } else if name.eq_ignore_ascii_case("peer") {
                peers.push(WgPeer {
                    line,
                    public_key: None,
                    preshared_key: None,
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    persistent_keepalive: None,
                    seen: HashMap::new(),
                });
                section = Section::Peer;
            } else {
                return Err(syntax(format!(
                    "unknown section [{name}]; expected [Interface] or [Peer]"
                )));
            }
            continue;
        }
        let Some((key, value)) = content.split_once('=') else {
            return Err(syntax(format!(
                "expected `Key = Value` or a [Section], found `{}`",
                first_word(content)
            )));
        };
        let key = key.trim();
        let value = value.trim();
        let lower = key.to_ascii_lowercase();
        if WG_QUICK_UNSUPPORTED.contains(&lower.as_str()) {
            return Err(ConfigError::Unsupported {
                path: path.to_path_buf(),
                line,
                key: key.to_string(),
            });
        }
        let unknown = |section: &'static str| ConfigError::UnknownKey {
            path: path.to_path_buf(),
            line,
            key: crate::untrusted::key_name(key),
            section,
        };
        let at = |canonical: &str| Origin::File {
            path: path.to_path_buf(),
            line: Some(line),
            key: canonical.to_string(),
        };
        let invalid = |canonical: &str| {
            let origin = at(canonical);
            move |reason: String| ConfigError::Invalid { at: origin, reason }
        };
        match section {
            Section::None => {
                return Err(syntax(format!(
                    "`{key}` comes before any [Interface] or [Peer] section"
                )))
            }
            Section::Interface => {
                let canonical = match lower.as_str() {
                    "privatekey" => "PrivateKey",
                    "listenport" => "ListenPort",
                    "address" => "Address",
                    "mtu" => "MTU",
                    "fwmark" => "FwMark",
                    _ => return Err(unknown("Interface")),
                };
                if canonical != "Address" {
                    if let Some(first) = interface_seen.insert(canonical, line) {
                        return Err(syntax(format!(
                            "{canonical} is given twice (first at line {first})"
                        )));
                    }
                }
                match canonical {
                    "PrivateKey" => {
                        // Never echo the value: it is the secret.
                        let key = Key::from_base64(value)
                            .map_err(|e| format!("not a private key: {e}"))
                            .map_err(invalid(canonical))?;
                        layer.private_key = Some(Val::new(
                            KeySource::Inline(PrivateKey::from_bytes(key.0)),
                            at(canonical),
                        ));
                    }
                    "ListenPort" => {
                        let port = parse_port(value).map_err(invalid(canonical))?;
                        layer.listen_port = Some(Val::new(port, at(canonical)));
                    }
                    "Address" => {
                        addresses.extend(parse_address_list(value).map_err(invalid(canonical))?);
                        check_duplicate_addresses(&addresses).map_err(invalid(canonical))?;
                        address_line.get_or_insert(line);
                    }
                    "MTU" => {
                        let mtu = parse_mtu(value).map_err(invalid(canonical))?;
                        layer.mtu = Some(Val::new(mtu, at(canonical)));
                    }
                    _ => {
                        let mark = parse_fwmark(value).map_err(invalid(canonical))?;
                        layer.fwmark = Some(Val::new(mark, at(canonical)));
                    }
                }
            }
            Section::Peer => {
                let canonical = match lower.as_str() {
                    "publickey" => "PublicKey",
                    "presharedkey" => "PresharedKey",
                    "endpoint" => "Endpoint",
                    "allowedips" => "AllowedIPs",
                    "persistentkeepalive" => "PersistentKeepalive",
                    _ => return Err(unknown("Peer")),
                };
                let Some(peer) = peers.last_mut() else {
                    return Err(syntax("key outside a [Peer] section".to_string()));
                };
                if canonical != "AllowedIPs" {
                    if let Some(first) = peer.seen.insert(canonical, line) {
                        return Err(syntax(format!(
                            "{canonical} is given twice in this [Peer] (first at line {first})"
                        )));
                    }
                }
                match canonical {
                    "PublicKey" => {
                        let key: PublicKey = value
                            .parse()
                            .map_err(|e| format!("not a public key: {e}"))
                            .map_err(invalid(canonical))?;
                        peer.public_key = Some((key, at(canonical)));
                    }
                    "PresharedKey" => {
                        let key = Key::from_base64(value)
                            .map_err(|e| format!("not a preshared key: {e}"))
                            .map_err(invalid(canonical))?;
                        peer.preshared_key = Some(key);
                    }
                    "Endpoint" => {
                        peer.endpoint =
                            Some(parse_endpoint(value, resolve).map_err(invalid(canonical))?);
                    }
                    "AllowedIPs" => {
                        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                            let net = parse_allowed_ip(item).map_err(invalid(canonical))?;
                            if !peer.allowed_ips.contains(&net) {
                                peer.allowed_ips.push(net);
                            }
                        }
                    }
                    _ => {
                        peer.persistent_keepalive =
                            parse_keepalive(value).map_err(invalid(canonical))?;
                    }
                }
            }
        }
    }

    if interface_line.is_none() {
        return Err(ConfigError::Syntax {
            path: path.to_path_buf(),
            line: 1,
            message: "no [Interface] section".to_string(),
        });
    }
    let mut interface_error = None;
    match stem_name {
        Ok(name) => layer.interface = Some(Val::new(name, stem_origin)),
        Err(reason) => {
            interface_error = Some(ConfigError::Invalid {
                at: stem_origin,
                reason,
            })
        }
    }
    if let Some(line) = address_line {
        layer.addresses = Some(Val::new(
            addresses,
            Origin::File {
                path: path.to_path_buf(),
                line: Some(line),
                key: "Address".to_string(),
            },
        ));
    }

    let mut out: Vec<(PeerConfig, Origin)> = Vec::with_capacity(peers.len());
    for peer in peers {
        let Some((public_key, origin)) = peer.public_key else {
            return Err(ConfigError::Syntax {
                path: path.to_path_buf(),
                line: peer.line,
                message: "this [Peer] has no PublicKey".to_string(),
            });
        };
        if let Some((_, first)) = out.iter().find(|(p, _)| p.public_key == public_key) {
            return Err(ConfigError::Invalid {
                at: origin,
                reason: format!("duplicate peer {public_key}, already given at {first}"),
            });
        }
        out.push((
            PeerConfig {
                public_key,
                preshared_key: peer.preshared_key,
                endpoint: peer.endpoint,
                allowed_ips: peer.allowed_ips,
                persistent_keepalive: peer.persistent_keepalive,
            },
            origin,
        ));
    }
    Ok(FileLayer {
        layer,
        peers: out,
        interface_error,
    })
}

/// The first word of a line, for messages (a whole line could hold a secret).
fn first_word(s: &str) -> String {
    crate::untrusted::key_name(s.split_whitespace().next().unwrap_or(""))
}

// ---------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------

/// Checks an interface name: 1 to 15 bytes of `[A-Za-z0-9_.-]`, not `.` or `..`.
fn parse_interface(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("the interface name is empty".to_string());
    }
    if name.len() > MAX_INTERFACE_LEN {
        return Err(format!(
            "interface name {name:?} is {} bytes long; the limit is {MAX_INTERFACE_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "interface name {name:?} holds {c:?}; only letters, digits, `_`, `.` and `-` are allowed"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(name.to_string())
}

/// Checks that a path is not empty.
fn check_path(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        Err("the path is empty".to_string())
    } else {
        Ok(())
    }
}

/// Parses a port number.
fn parse_port(s: &str) -> Result<u16, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{:?} is not a port number (0..=65535)", s.trim()))
}

/// Parses an MTU.
fn parse_mtu(s: &str) -> Result<u16, String> {
    let n: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{:?} is not a number", s.trim()))?;
    check_mtu(n)
}

/// Checks an MTU against `MIN_MTU..=MAX_MTU`.
fn check_mtu(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(mtu) if (MIN_MTU..=MAX_MTU).contains(&mtu) => Ok(mtu),
        _ => Err(format!(
            "MTU {n} is out of range {MIN_MTU}..={MAX_MTU} (IPv6 needs at least {MIN_MTU_IPV6})"
        )),
    }
}

/// Parses a firewall mark: decimal, `0x` hexadecimal, or `off` (no mark), as `wg` accepts.
fn parse_fwmark(s: &str) -> Result<u32, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| {
        format!("{s:?} is not a firewall mark (a number up to 4294967295, 0x hex, or off)")
    })
}

/// Parses a duration for `max_cached_map_age`: a whole number with a unit, `s`, `m`, `h` or
/// `d` (`90s`, `30m`, `12h`, `7d`; a bare number is seconds), up to ten years, or `never`
/// (`None`: no limit).
pub fn parse_map_age(s: &str) -> Result<Option<Duration>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let unit_secs: u64 = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        _ => u64::MAX,
    };
    let n: Option<u64> = number.parse().ok();
    match n.zip((unit_secs != u64::MAX).then_some(unit_secs)) {
        Some((n, unit)) => match n.checked_mul(unit).map(Duration::from_secs) {
            Some(d) if d <= MAX_MAP_AGE => Ok(Some(d)),
            _ => Err(format!(
                "{s:?} is longer than ten years; write never for no limit"
            )),
        },
        None => Err(format!(
            "{s:?} is not a duration such as 90s, 30m, 12h or 7d, or never"
        )),
    }
}

/// Writes a duration as [`parse_map_age`] reads it, in the largest unit that divides it.
pub fn format_map_age(age: Option<Duration>) -> String {
    let Some(age) = age else {
        return "never".to_string();
    };
    let secs = age.as_secs();
    for (unit, size) in [("d", 24 * 3600), ("h", 3600), ("m", 60)] {
        if secs >= size && secs % size == 0 {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// Parses a yes/no setting: `true`, `1`, `yes` or `on`, or `false`, `0`, `no` or `off`.
fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(format!("{other:?} is not true or false")),
    }
}

/// Parses where metrics are served: a loopback `ADDR:PORT`, or a Unix socket path (anything
/// with a `/`, or `unix:PATH`). Any other IP address is refused: the metrics name the peers
/// and their traffic, which only the host's operator should see.
pub fn parse_metrics_listen(s: &str) -> Result<MetricsListen, String> {
    let s = s.trim();
    if let Some(path) = s.strip_prefix("unix:") {
        check_path(Path::new(path))?;
        return Ok(MetricsListen::Unix(PathBuf::from(path)));
    }
    if s.contains('/') {
        return Ok(MetricsListen::Unix(PathBuf::from(s)));
    }
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!(
            "{s:?} is neither ADDR:PORT on loopback (127.0.0.1:9586, [::1]:9586) nor a Unix \
             socket path"
        )
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address: metrics are served only on loopback (127.0.0.0/8, \
             ::1) or on a Unix socket path",
            addr.ip()
        ));
    }
    Ok(MetricsListen::Tcp(addr))
}

/// Parses where the DNS server listens: `ADDR:PORT`, or `ADDR` for port 53.
fn parse_dns_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let addr = match s.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => s
            .parse::<IpAddr>()
            .map(|ip| SocketAddr::new(ip, DEFAULT_DNS_PORT))
            .map_err(|_| format!("{s:?} is not ADDR:PORT or ADDR"))?,
    };
    if addr.ip().is_unspecified() {
        // Every address would include the underlay's: the names are for this host.
        return Err(format!(
            "{s:?}: not every address; give one of this node's (its overlay address or loopback)"
        ));
    }
    Ok(addr)
}

/// Parses the suffix of mesh names: DNS labels (letters, digits, `-`; 1 to 63 bytes each)
/// joined by dots, at most 100 bytes, lower-cased; a dot at either end is dropped.
pub fn parse_dns_suffix(s: &str) -> Result<String, String> {
    let suffix = s.trim().trim_matches('.').to_ascii_lowercase();
    if suffix.is_empty() || suffix.len() > 100 {
        return Err(format!("{s:?} is not a DNS suffix of 1 to 100 bytes"));
    }
    for label in suffix.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{s:?}: {label:?} is not a DNS label (letters, digits and inner hyphens, 1 to \
                 63 bytes)"
            ));
        }
    }
    Ok(suffix)
}

/// Parses a persistent keepalive: seconds, with 0 or `off` meaning none.
fn parse_keepalive(s: &str) -> Result<Option<u16>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let n: i64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds or off"))?;
    check_keepalive(n)
}

/// Checks a persistent keepalive interval: 0 is off, otherwise 1..=65535 seconds.
fn check_keepalive(n: i64) -> Result<Option<u16>, String> {
    match u16::try_from(n) {
        Ok(0) => Ok(None),
        Ok(secs) => Ok(Some(secs)),
        Err(_) => Err(format!(
            "{n} is out of range: seconds 1..=65535, or 0 for off"
        )),
    }
}

/// Parses an interface address: `ADDR/LEN`, or a bare address meaning /32 or /128. Host bits
/// are kept: they are the address.
fn parse_address(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|_| format!("invalid address {s:?} (expected ADDRESS/PREFIX)"))
    } else {
        s.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("invalid address {s:?}"))
    }
}

/// Parses a comma-separated list of addresses, skipping empty items.
fn parse_address_list(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(parse_address)
        .collect()
}

/// Refuses the same address given twice.
fn check_duplicate_addresses(addresses: &[IpNet]) -> Result<(), String> {
    for (i, a) in addresses.iter().enumerate() {
        if addresses[..i].iter().any(|b| b.addr() == a.addr()) {
            return Err(format!("address {} is given twice", a.addr()));
        }
    }
    Ok(())
}

/// Parses an allowed-IPs entry: a network, or a bare address meaning /32 or /128. Host bits
/// are cleared, as `wg` does (`10.0.0.1/24` becomes `10.0.0.0/24`).
fn parse_allowed_ip(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = if s.contains('/') {
        s.parse::<IpNet>().ok()
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    };
    net.map(|n| n.trunc())
        .ok_or_else(|| format!("invalid network {s:?}"))
}

/// Parses an endpoint `HOST:PORT` (IPv6 as `[ADDR]:PORT`), resolving a host name with
/// `resolve` and taking its first address.
fn parse_endpoint(s: &str, resolve: &Resolver) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("endpoint {s:?} has port 0"));
        }
        return Ok(addr);
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        rest.split_once("]:")
            .ok_or_else(|| format!("endpoint {s:?} is not [ADDRESS]:PORT"))?
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("endpoint {s:?} is not HOST:PORT"))?;
        if host.contains(':') {
            return Err(format!(
                "endpoint {s:?}: write an IPv6 endpoint as [ADDRESS]:PORT"
            ));
        }
        (host, port)
    };
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => return Err(format!("endpoint {s:?} has no valid port (1..=65535)")),
    };
    if host.is_empty() {
        return Err(format!("endpoint {s:?} has no host"));
    }
    match resolve(host, port) {
        Ok(addrs) => addrs
            .into_iter()
            .next()
            .ok_or_else(|| format!("host {host:?} resolves to no address")),
        Err(e) => Err(format!("cannot resolve host {host:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::test_support::{write_with_mode, TempDir};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

    /// Base64 of 32 bytes of `b`.
    fn b64(b: u8) -> String {
        Key([b; 32]).to_base64()
    }

    /// A peer public key derived from a private key made of `b` bytes.
    fn pubkey(b: u8) -> PublicKey {
        PrivateKey::from_bytes([b; 32]).public_key()
    }

    /// Resolves `peer.example` to 192.0.2.7 and refuses every other name, without DNS.
    fn fake_resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        match host {
            "peer.example" => Ok(vec![SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(192, 0, 2, 7),
                port,
            ))]),
            "empty.example" => Ok(Vec::new()),
            _ => Err(io::Error::new(io::ErrorKind::NotFound, "no such host")),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_from(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    /// A temporary directory with a private key file `private.key` (key of bytes 1).
    struct Fixture {
        dir: TempDir,
        key_path: PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = TempDir::new("config");
            let key_path = dir.path("private.key");
            write_with_mode(&key_path, &b64(1), 0o600);
            Fixture { dir, key_path }
        }

        fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
            let path = self.dir.path(name);
            write_with_mode(&path, text, mode);
            path
        }

        /// Loads a TOML file whose text may use `KEY` for the key file path.
        fn toml(
            &self,
            text: &str,
            overrides: &Overrides,
            env: &dyn Fn(&str) -> Option<String>,
        ) -> Result<Settings, ConfigError> {
            let text = text.replace("KEY", &self.key_path.display().to_string());
            let path = self.write("agent.toml", &text, 0o644);
            load_with(Some(&path), None, overrides, env, &fake_resolve)
        }

        fn toml_err(&self, text: &str) -> String {
            self.toml(text, &Overrides::default(), &no_env)
                .expect_err("configuration refused")
                .to_string()
        }

        fn wg(&self, name: &str, text: &str) -> Result<Settings, ConfigError> {
            let path = self.write(name, text, 0o600);
            load_with(
                None,
                Some(&path),
                &Overrides::default(),
                &no_env,
                &fake_resolve,
            )
        }
    }

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
    fn defaults() {
        let f = Fixture::new();
        let s = f
            .toml(
                "private_key_file = \"KEY\"\n",
                &Overrides::default(),
                &no_env,
            )
            .expect("valid");
        assert_eq!(s.interface, DEFAULT_INTERFACE);
        assert_eq!(s.device.listen_port, 0);
        assert!(s.addresses.is_empty());
        assert_eq!(s.mtu, DEFAULT_MTU);
        assert_eq!(s.device.fwmark, None);
        assert_eq!(s.uapi_dir, PathBuf::from(DEFAULT_UAPI_DIR));
        assert!(s.device.peers.is_empty());
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
    fn no_private_key_anywhere() {
        let err = load_with(None, None, &Overrides::default(), &no_env, &fake_resolve)
            .expect_err("no key");
        assert!(matches!(err, ConfigError::MissingPrivateKey));
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
    fn precedence_flag_env_file_default() {
        let f = Fixture::new();
        let other_key = f.write("other.key", &b64(5), 0o600);
        let file = "private_key_file = \"KEY\"\ninterface = \"file0\"\nlisten_port = 1000\n\
                    mtu = 1300\naddresses = [\"10.0.0.1/24\"]\nuapi_dir = \"/file\"\n";
        let other = other_key.display().to_string();
        let env = env_from(&[
            (ENV_INTERFACE, "env0"),
            (ENV_LISTEN_PORT, "2000"),
            (ENV_MTU, "1350"),
            (ENV_FWMARK, "0x10"),
            (ENV_ADDRESSES, "10.0.0.2/24, fd00::2/64"),
            (ENV_PRIVATE_KEY_FILE, &other),
            (ENV_UAPI_DIR, ""),
            ("MESHLINK_COORDINATOR", "ignored"),
        ]);

        // File over defaults.
        let s = f.toml(file, &Overrides::default(), &no_env).expect("valid");
        assert_eq!(s.interface, "file0");
        assert_eq!(s.device.listen_port, 1000);
        assert_eq!(s.mtu, 1300);
        assert_eq!(s.uapi_dir, PathBuf::from("/file"));
        assert_eq!(s.device.fwmark, None);

        // Environment over file (an empty variable is unset).
        let s = f.toml(file, &Overrides::default(), &env).expect("valid");
        assert_eq!(s.interface, "env0");
        assert_eq!(s.device.listen_port, 2000);
        assert_eq!(s.mtu, 1350);
        assert_eq!(s.device.fwmark, Some(16));
        assert_eq!(s.addresses.len(), 2);
        assert_eq!(s.device.private_key, PrivateKey::from_bytes([5; 32]));
        assert_eq!(s.uapi_dir, PathBuf::from("/file"));

        // Flags over environment.
        let flags = Overrides {
            interface: Some("flag0".into()),
            private_key_file: Some(f.key_path.clone()),
            listen_port: Some(3000),
            addresses: Some(vec!["10.0.0.3/24".into(), "10.0.1.3/24,10.0.2.3".into()]),
            mtu: Some(1280),
            fwmark: Some(0),
            uapi_dir: Some("/flag".into()),
            max_cached_map_age: None,
            fail_closed: None,
            ..Overrides::default()
        };
        let s = f.toml(file, &flags, &env).expect("valid");
        assert_eq!(s.interface, "flag0");
        assert_eq!(s.device.listen_port, 3000);
        assert_eq!(s.mtu, 1280);
        assert_eq!(s.device.fwmark, None);
        assert_eq!(s.addresses.len(), 3);
        assert_eq!(s.device.private_key, PrivateKey::from_bytes([1; 32]));
        assert_eq!(s.uapi_dir, PathBuf::from("/flag"));

        // No file at all: environment and flags alone.
        let s = load_with(None, None, &Overrides::default(), &env, &fake_resolve).expect("valid");
        assert_eq!(s.interface, "env0");
        assert_eq!(s.mtu, 1350);
        assert_eq!(s.uapi_dir, PathBuf::from(DEFAULT_UAPI_DIR));
        assert!(s.device.peers.is_empty());
    }

    #[test]
    fn metrics_listen_from_each_source_and_loopback_only() {
        let f = Fixture::new();
        let file = "private_key_file = \"KEY\"\n";
        let s = f.toml(file, &Overrides::default(), &no_env).expect("valid");
        assert_eq!(s.metrics_listen, None, "off by default");
        let in_file = format!("{file}metrics_listen = \"127.0.0.1:9586\"\n");
        let s = f.toml(&in_file, &Overrides::default(), &no_env).unwrap();
        assert_eq!(
            s.metrics_listen,
            Some(MetricsListen::Tcp("127.0.0.1:9586".parse().unwrap()))
        );
        // A relative socket path in the file is relative to the file.
        let s = f
            .toml(
                &format!("{file}metrics_listen = \"run/metrics.sock\"\n"),
                &Overrides::default(),
                &no_env,
            )
            .unwrap();
        assert_eq!(
            s.metrics_listen,
            Some(MetricsListen::Unix(f.dir.path("run/metrics.sock")))
        );
        let env = env_from(&[(ENV_METRICS_LISTEN, "[::1]:9000")]);
        let s = f.toml(&in_file, &Overrides::default(), &env).unwrap();
        assert_eq!(
            s.metrics_listen,
            Some(MetricsListen::Tcp("[::1]:9000".parse().unwrap()))
        );
        let flags = Overrides {
            metrics_listen: Some("unix:/run/meshlink/metrics.sock".into()),
            ..Overrides::default()
        };
        let s = f.toml(&in_file, &flags, &env).unwrap();
        assert_eq!(
            s.metrics_listen,
            Some(MetricsListen::Unix("/run/meshlink/metrics.sock".into()))
        );

        // Anything but loopback is refused, naming where it came from.
        let msg = f.toml_err(&format!("{file}metrics_listen = \"0.0.0.0:9586\"\n"));
        assert!(msg.contains("agent.toml: metrics_listen"), "{msg}");
        assert!(msg.contains("0.0.0.0 is not a loopback address"), "{msg}");
        let env = env_from(&[(ENV_METRICS_LISTEN, "198.18.0.1:9586")]);
        let msg = f
            .toml(file, &Overrides::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(&format!("environment variable {ENV_METRICS_LISTEN}:")),
            "{msg}"
        );
        let flags = Overrides {
            metrics_listen: Some("[fd00::1]:9586".into()),
            ..Overrides::default()
        };
        let msg = f.toml(file, &flags, &no_env).unwrap_err().to_string();
        assert!(msg.contains("--metrics-listen"), "{msg}");
        assert!(msg.contains("not a loopback"), "{msg}");
        let msg = f.toml_err(&format!("{file}metrics_listen = \"localhost\"\n"));
        assert!(msg.contains("metrics_listen"), "{msg}");
    }

    #[test]
    fn dns_settings_from_each_source() {
        let f = Fixture::new();
        let file = "private_key_file = \"KEY\"\n";
        let s = f.toml(file, &Overrides::default(), &no_env).expect("valid");
        assert_eq!(s.dns, DnsSettings::default());
        assert!(s.dns.enabled, "on by default");
        assert_eq!(s.dns.suffix, "mesh");
        let in_file = format!(
            "{file}dns = false\ndns_listen = \"127.0.0.1\"\ndns_suffix = \"Corp.Internal.\"\n"
        );
        let s = f.toml(&in_file, &Overrides::default(), &no_env).unwrap();
        assert!(!s.dns.enabled);
        assert_eq!(s.dns.listen, Some("127.0.0.1:53".parse().unwrap()));
        assert_eq!(s.dns.suffix, "corp.internal");
        let env = env_from(&[
            (ENV_DNS, "on"),
            (ENV_DNS_LISTEN, "127.0.0.2:5353"),
            (ENV_DNS_SUFFIX, "m"),
        ]);
        let s = f.toml(&in_file, &Overrides::default(), &env).unwrap();
        assert!(s.dns.enabled);
        assert_eq!(s.dns.listen, Some("127.0.0.2:5353".parse().unwrap()));
        assert_eq!(s.dns.suffix, "m");
        let flags = Overrides {
            dns: Some(false),
            dns_listen: Some("[::1]:53".into()),
            dns_suffix: Some("x".into()),
            ..Overrides::default()
        };
        let s = f.toml(&in_file, &flags, &env).unwrap();
        assert!(!s.dns.enabled);
        assert_eq!(s.dns.listen, Some("[::1]:53".parse().unwrap()));
        assert_eq!(s.dns.suffix, "x");

        for (text, expected) in [
            ("dns_suffix = \"a..b\"", "dns_suffix"),
            ("dns_suffix = \"under_score\"", "dns_suffix"),
            ("dns_suffix = \"-x\"", "dns_suffix"),
            ("dns_listen = \"somewhere\"", "dns_listen"),
            ("dns_listen = \"0.0.0.0\"", "dns_listen"),
            ("dns_listen = \"[::]:53\"", "dns_listen"),
            ("dns = \"yes\"", "dns"),
        ] {
            let msg = f.toml_err(&format!("{file}{text}\n"));
            assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
        }
        let env = env_from(&[(ENV_DNS_SUFFIX, "a b")]);
        let msg = f
            .toml(file, &Overrides::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(&format!("environment variable {ENV_DNS_SUFFIX}:")),
            "{msg}"
        );
    }

    #[test]
    fn max_cached_map_age_from_each_source() {
        let f = Fixture::new();
        let file = "private_key_file = \"KEY\"\n";
        let day = Duration::from_secs(24 * 3600);
        let s = f.toml(file, &Overrides::default(), &no_env).expect("valid");
        assert_eq!(s.max_cached_map_age, Some(7 * day), "the default is a week");
        let with_key = format!("{file}max_cached_map_age = \"36h\"\n");
        let s = f
            .toml(&with_key, &Overrides::default(), &no_env)
            .expect("valid");
        assert_eq!(s.max_cached_map_age, Some(Duration::from_secs(36 * 3600)));
        let env = env_from(&[(ENV_MAX_CACHED_MAP_AGE, "never")]);
        let s = f
            .toml(&with_key, &Overrides::default(), &env)
            .expect("valid");
        assert_eq!(s.max_cached_map_age, None, "the variable beats the file");
        let flags = Overrides {
            max_cached_map_age: Some("90s".into()),
            ..Overrides::default()
        };
        let s = f.toml(&with_key, &flags, &env).expect("valid");
        assert_eq!(s.max_cached_map_age, Some(Duration::from_secs(90)));

        let msg = f.toml_err(&format!("{file}max_cached_map_age = \"a week\"\n"));
        assert!(
            msg.contains("agent.toml: max_cached_map_age: \"a week\" is not a duration"),
            "{msg}"
        );
        let env = env_from(&[(ENV_MAX_CACHED_MAP_AGE, "5y")]);
        let msg = f
            .toml(file, &Overrides::default(), &env)
            .expect_err("refused")
            .to_string();
        assert!(
            msg.contains("environment variable MESHLINK_MAX_CACHED_MAP_AGE"),
            "{msg}"
        );
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

    #[test]
    fn fail_closed_from_each_source() {
        let f = Fixture::new();
        let file = "private_key_file = \"KEY\"\n";
        let s = f.toml(file, &Overrides::default(), &no_env).expect("valid");
        assert!(!s.fail_closed, "off by default");
        let on = format!("{file}fail_closed = true\n");
        assert!(
            f.toml(&on, &Overrides::default(), &no_env)
                .unwrap()
                .fail_closed
        );
        for (value, expected) in [("0", false), ("no", false), ("ON", true), ("yes", true)] {
            let env = env_from(&[(ENV_FAIL_CLOSED, value)]);
            let s = f.toml(&on, &Overrides::default(), &env).expect("valid");
            assert_eq!(s.fail_closed, expected, "{value}");
        }
        let env = env_from(&[(ENV_FAIL_CLOSED, "false")]);
        let flags = Overrides {
            fail_closed: Some(true),
            ..Overrides::default()
        };
        assert!(
            f.toml(file, &flags, &env).unwrap().fail_closed,
            "the flag wins"
        );

        let env = env_from(&[(ENV_FAIL_CLOSED, "maybe")]);
        let msg = f
            .toml(file, &Overrides::default(), &env)
            .expect_err("refused")
            .to_string();
        assert!(
            msg.contains("environment variable MESHLINK_FAIL_CLOSED: \"maybe\""),
            "{msg}"
        );
        let msg = f.toml_err(&format!("{file}fail_closed = \"yes\"\n"));
        assert!(msg.contains("fail_closed"), "{msg}");
    }

    #[test]
    fn map_ages_parse_and_print() {
        for (text, secs) in [
            ("45", Some(45)),
            ("45s", Some(45)),
            ("30m", Some(1800)),
            (" 12h ", Some(43200)),
            ("7d", Some(604_800)),
            ("0s", Some(0)),
            ("NEVER", None),
        ] {
            let age = parse_map_age(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(age, secs.map(Duration::from_secs), "{text}");
        }
        for bad in [
            "",
            "d",
            "7w",
            "-1d",
            "1.5h",
            "3651d",
            "99999999999999999999d",
        ] {
            assert!(parse_map_age(bad).is_err(), "{bad:?} accepted");
        }
        for (secs, text) in [(604_800, "7d"), (90, "90s"), (7200, "2h"), (120, "2m")] {
            assert_eq!(format_map_age(Some(Duration::from_secs(secs))), text);
            assert_eq!(
                parse_map_age(text).unwrap(),
                Some(Duration::from_secs(secs))
            );
        }
        assert_eq!(format_map_age(None), "never");
    }

    #[test]
    fn config_file_from_environment() {
        let f = Fixture::new();
        let text = format!(
            "private_key_file = \"{}\"\nmtu = 1300\n",
            f.key_path.display()
        );
        let toml_path = f.write("from-env.toml", &text, 0o644);
        let toml_str = toml_path.display().to_string();
        let env = env_from(&[(ENV_CONFIG, &toml_str)]);
        let s = load_with(None, None, &Overrides::default(), &env, &fake_resolve).expect("valid");
        assert_eq!(s.mtu, 1300);

        let wg = f.write(
            "wg7.conf",
            &format!("[Interface]\nPrivateKey = {}\n", b64(1)),
            0o600,
        );
        let wg_str = wg.display().to_string();
        let both = env_from(&[(ENV_CONFIG, &toml_str), (ENV_WG_QUICK, &wg_str)]);
        let msg = load_with(None, None, &Overrides::default(), &both, &fake_resolve)
            .expect_err("two files")
            .to_string();
        assert!(
            msg.contains(ENV_CONFIG) && msg.contains(ENV_WG_QUICK),
            "{msg}"
        );
        // A flag naming a file wins over the variables.
        let s = load_with(None, Some(&wg), &Overrides::default(), &both, &fake_resolve)
            .expect("flag wins");
        assert_eq!(s.interface, "wg7");
        let msg = load_with(
            Some(&toml_path),
            Some(&wg),
            &Overrides::default(),
            &no_env,
            &fake_resolve,
        )
        .expect_err("two flags")
        .to_string();
        assert!(
            msg.contains("--config") && msg.contains("--wg-quick"),
            "{msg}"
        );
    }

    #[test]
    fn invalid_env_and_flags_are_named() {
        let f = Fixture::new();
        let file = "private_key_file = \"KEY\"\n";
        let cases: Vec<((&str, &str), &str)> = vec![
            (
                (ENV_LISTEN_PORT, "x"),
                "environment variable MESHLINK_LISTEN_PORT: \"x\" is not a port number",
            ),
            (
                (ENV_MTU, "99999"),
                "environment variable MESHLINK_MTU: MTU 99999 is out of range",
            ),
            (
                (ENV_MTU, "abc"),
                "environment variable MESHLINK_MTU: \"abc\"",
            ),
            ((ENV_FWMARK, "0xzz"), "environment variable MESHLINK_FWMARK"),
            (
                (ENV_INTERFACE, "a/b"),
                "environment variable MESHLINK_INTERFACE: interface name \"a/b\"",
            ),
            (
                (ENV_ADDRESSES, "10.0.0.1/24,nope"),
                "environment variable MESHLINK_ADDRESSES: invalid address \"nope\"",
            ),
        ];
        for ((var, value), expected) in cases {
            let env = env_from(&[(var, value)]);
            let msg = f
                .toml(file, &Overrides::default(), &env)
                .expect_err("refused")
                .to_string();
            assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
        }
        let flag_cases: Vec<(Overrides, &str)> = vec![
            (
                Overrides {
                    interface: Some("x".repeat(16)),
                    ..Overrides::default()
                },
                "flag --interface: interface name",
            ),
            (
                Overrides {
                    mtu: Some(500),
                    ..Overrides::default()
                },
                "flag --mtu: MTU 500 is out of range",
            ),
            (
                Overrides {
                    addresses: Some(vec!["1.2.3".into()]),
                    ..Overrides::default()
                },
                "flag --address: invalid address \"1.2.3\"",
            ),
            (
                Overrides {
                    private_key_file: Some(PathBuf::new()),
                    ..Overrides::default()
                },
                "flag --private-key-file: the path is empty",
            ),
            (
                Overrides {
                    mtu: Some(1200),
                    addresses: Some(vec!["fd00::1/64".into()]),
                    ..Overrides::default()
                },
                "flag --mtu: 1200 is below 1280",
            ),
        ];
        for (flags, expected) in flag_cases {
            let msg = f
                .toml(file, &flags, &no_env)
                .expect_err("refused")
                .to_string();
            assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
        }
        // The IPv6 MTU check names both sides when they come from different sources.
        let env = env_from(&[(ENV_ADDRESSES, "fd00::1/64")]);
        let msg = f
            .toml(&format!("{file}mtu = 1000\n"), &Overrides::default(), &env)
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("agent.toml: mtu: 1000 is below 1280"), "{msg}");
        assert!(
            msg.contains("environment variable MESHLINK_ADDRESSES"),
            "{msg}"
        );
    }

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
