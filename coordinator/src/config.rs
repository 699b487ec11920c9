//! Configuration: a TOML file, `MESHLINK_*` environment variables and flags become one
//! validated [`Settings`].
//!
//! # Precedence
//!
//! For each setting on its own: flag > environment variable > file > default. Flags and
//! variables arrive together as [`Overrides`] (clap reads both, the flag winning); the file
//! fills what they leave unset.
//!
//! # Keys
//!
//! Every key, its variable, flag and default is documented in
//! `configs/coordinator.example.toml`. Unknown keys are refused. A relative `state_dir` in a
//! file is relative to the file's directory.
//!
//! # Errors
//!
//! Every [`ConfigError`] is one line naming the file and line or key at fault
//! (`/etc/meshlink/coordinator.toml: message_rate: must be at least 1`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshlink_proto::toml_error::{self, TomlProblem};
use serde::Deserialize;

use crate::server::Limits;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshlink-coordinator";
/// Default QUIC listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Default admin API listen address: loopback, so other hosts cannot reach it.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7444";

/// The largest configuration file read, in bytes.
const CONFIG_FILE_LIMIT: u64 = 1 << 20;

/// The coordinator's validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where the database, TLS identity and admin token live.
    pub state_dir: PathBuf,
    /// QUIC (UDP) listen address for agents.
    pub listen: SocketAddr,
    /// Where agents that cannot use UDP reach the coordinator: TLS over TCP.
    pub tcp_listen: TcpListen,
    /// HTTP listen address of the admin API.
    pub admin_listen: SocketAddr,
    /// `host:port` put in join tokens. `None`: derived at start ([`default_advertise`]).
    pub advertise: Option<String>,
    /// Every coordinator of the mesh (`host:port`), put in join tokens after `advertise` and
    /// told to agents at each session, so they can fail over. Empty: only this one.
    pub coordinators: Vec<String>,
    /// Where the durable state lives.
    pub store: StoreLocation,
    /// Where the reflexive address responder listens (UDP).
    pub reflect_listen: ReflectListen,
    /// Whether agents' sessions relay WireGuard datagrams between the nodes of a network.
    pub relay: bool,
    /// The standalone relays (`meshlink-relay`) registered with this coordinator: told to
    /// every agent with a ticket for them (file only: `[[relays]]`). Empty: none.
    pub relays: Vec<meshlink_proto::relay::RelayInfo>,
    /// How long a relay ticket is good for (`relay_ticket_secs`).
    pub relay_ticket: Duration,
    /// Protection limits.
    pub limits: Limits,
    /// Key rotation and node expiry.
    pub keys: crate::keys::KeySettings,
}

impl Settings {
    /// The defaults, with `state_dir` replaced (handy in tests).
    pub fn with_state_dir(state_dir: PathBuf) -> Self {
        Settings {
            state_dir,
            listen: parse_default(DEFAULT_LISTEN),
            tcp_listen: TcpListen::AtListen,
            admin_listen: parse_default(DEFAULT_ADMIN_LISTEN),
            advertise: None,
            coordinators: Vec::new(),
            store: StoreLocation::Sqlite,
            reflect_listen: ReflectListen::NextToListen,
            relay: true,
            relays: Vec::new(),
            relay_ticket: meshlink_relay::ticket::DEFAULT_TTL,
            limits: Limits::default(),
            keys: crate::keys::KeySettings::default(),
        }
    }
}

/// Where the control server over TLS over TCP (`crate::tcp`) listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpListen {
    /// The bound QUIC listen address, IP and port, over TCP (TCP 7443 beside UDP 7443): where
    /// agents fall back to when QUIC fails. The default.
    AtListen,
    /// This address. Agents try only the QUIC address's port: another port needs a TCP
    /// forward from that one.
    At(SocketAddr),
    /// No TCP listener: agents behind a UDP block cannot reach this coordinator.
    Off,
}

impl TcpListen {
    /// Parses a socket address or `off`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<TcpListen, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(TcpListen::Off);
        }
        text.parse()
            .map(TcpListen::At)
            .map_err(|_| format!("{text:?} is not an address such as 0.0.0.0:7443, or off"))
    }

    /// The address to bind, given the bound QUIC address; `None` when off.
    pub fn resolve(&self, quic: SocketAddr) -> Option<SocketAddr> {
        match self {
            TcpListen::AtListen => Some(quic),
            TcpListen::At(a) => Some(*a),
            TcpListen::Off => None,
        }
    }
}

/// Where the reflexive address responder (`crate::reflect`) listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReflectListen {
    /// The QUIC listen address with the next port (UDP 7444 beside the default 7443); an
    /// ephemeral port when the listen port is 0. The default.
    NextToListen,
    /// This address.
    At(SocketAddr),
    /// No responder: agents learn their NAT-mapped address from peers only.
    Off,
}

impl ReflectListen {
    /// Parses a socket address or `off`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<ReflectListen, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(ReflectListen::Off);
        }
        text.parse()
            .map(ReflectListen::At)
            .map_err(|_| format!("{text:?} is not an address such as 0.0.0.0:7444, or off"))
    }

    /// The address to bind beside the QUIC `listen` address; `None` when off, or when the
    /// default has no port to take (`listen` on port 65535).
    pub fn resolve(&self, listen: SocketAddr) -> Option<SocketAddr> {
        match self {
            ReflectListen::Off => None,
            ReflectListen::At(a) => Some(*a),
            ReflectListen::NextToListen if listen.port() == 0 => Some(listen),
            ReflectListen::NextToListen => listen
                .port()
                .checked_add(1)
                .map(|p| SocketAddr::new(listen.ip(), p)),
        }
    }
}

/// `on` or `off` (also `true`/`false`), as flags and variables give it.
fn parse_switch(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{:?} is not on or off", text.trim())),
    }
}

fn parse_default(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
}

/// Where the coordinator keeps its durable state.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded SQLite database in the state directory: one coordinator.
    Sqlite,
    /// A PostgreSQL database (`postgres://USER@HOST[:PORT]/DB`), which several coordinators
    /// share. The password, when one is needed, comes from `PGPASSWORD` or `~/.pgpass`, or
    /// the URL in the file or `MESHLINK_STORE` (never shown: see [`StoreLocation::redacted`]).
    Postgres(String),
}

impl StoreLocation {
    /// Parses `sqlite` or a PostgreSQL URL.
    ///
    /// # Errors
    /// A message saying what is wrong (without the text, which may hold a password).
    pub fn parse(text: &str) -> Result<StoreLocation, String> {
        let text = text.trim();
        if text == "sqlite" {
            return Ok(StoreLocation::Sqlite);
        }
        let Some(rest) = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))
        else {
            return Err(
                "must be `sqlite` or a URL such as postgres://meshlink@db.example/meshlink".into(),
            );
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let database = path.split('?').next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        if database.is_empty() || (host.is_empty() && !path.contains("host=")) {
            return Err(
                "a PostgreSQL URL needs a host and a database: postgres://USER@HOST[:PORT]/DB"
                    .into(),
            );
        }
        Ok(StoreLocation::Postgres(text.to_string()))
    }

    /// For logs and errors: the URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        match self {
            StoreLocation::Sqlite => "sqlite".into(),
            StoreLocation::Postgres(url) => redact_url(url),
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `scheme://user:secret@host/...` becomes `scheme://user:***@host/...`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    // A password may also come as a query parameter (`?password=...`, which sqlx takes).
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn passwords_are_hidden_in_the_authority_and_the_query() {
        assert_eq!(
            redact_url("postgres://ml:s3cret@db:5432/mesh"),
            "postgres://ml:***@db:5432/mesh"
        );
        assert_eq!(
            redact_url("postgres://ml@db/mesh?sslmode=require&password=s3cret"),
            "postgres://ml@db/mesh?sslmode=require&password=***"
        );
        assert_eq!(redact_url("postgres://db/mesh"), "postgres://db/mesh");
    }
}

/// Values from flags or environment variables; `None`: neither gave one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--state-dir` / `MESHLINK_STATE_DIR`.
    pub state_dir: Option<PathBuf>,
    /// `--listen` / `MESHLINK_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `--tcp-listen` / `MESHLINK_TCP_LISTEN`: an address or `off`.
    pub tcp_listen: Option<String>,
    /// `--admin-listen` / `MESHLINK_ADMIN_LISTEN`.
    pub admin_listen: Option<SocketAddr>,
    /// `--admin-insecure` / `MESHLINK_ADMIN_INSECURE`: the admin API may listen beyond
    /// loopback in plain HTTP.
    pub admin_insecure: Option<bool>,
    /// `--advertise` / `MESHLINK_ADVERTISE`.
    pub advertise: Option<String>,
    /// `--coordinators` / `MESHLINK_COORDINATORS`: comma-separated `host:port` list.
    pub coordinators: Option<String>,
    /// `--store` / `MESHLINK_STORE`.
    pub store: Option<String>,
    /// `--reflect-listen` / `MESHLINK_REFLECT_LISTEN`: an address or `off`.
    pub reflect_listen: Option<String>,
    /// `--relay` / `MESHLINK_RELAY`: `on` or `off`.
    pub relay: Option<String>,
    /// `--relay-rate` / `MESHLINK_RELAY_RATE`.
    pub relay_rate: Option<u64>,
    /// `--hello-timeout-secs` / `MESHLINK_HELLO_TIMEOUT_SECS`.
    pub hello_timeout_secs: Option<u64>,
    /// `--audit-retention-days` / `MESHLINK_AUDIT_RETENTION_DAYS`.
    pub audit_retention_days: Option<u64>,
    /// `--message-rate` / `MESHLINK_MESSAGE_RATE`.
    pub message_rate: Option<u32>,
    /// `--message-burst` / `MESHLINK_MESSAGE_BURST`.
    pub message_burst: Option<u32>,
    /// `--session-queue` / `MESHLINK_SESSION_QUEUE`.
    pub session_queue: Option<usize>,
    /// `--max-connections` / `MESHLINK_MAX_CONNECTIONS`.
    pub max_connections: Option<usize>,
    /// `--max-unauthenticated` / `MESHLINK_MAX_UNAUTHENTICATED`.
    pub max_unauthenticated: Option<usize>,
    /// `--max-unauthenticated-per-ip` / `MESHLINK_MAX_UNAUTHENTICATED_PER_IP`.
    pub max_unauthenticated_per_ip: Option<usize>,
    /// `--endpoint-interval-secs` / `MESHLINK_ENDPOINT_INTERVAL_SECS`.
    pub endpoint_interval_secs: Option<u64>,
    /// `--endpoint-burst` / `MESHLINK_ENDPOINT_BURST`.
    pub endpoint_burst: Option<u32>,
    /// `--idle-timeout-secs` / `MESHLINK_IDLE_TIMEOUT_SECS`.
    pub idle_timeout_secs: Option<u64>,
    /// `--workload-lease-ms` / `MESHLINK_WORKLOAD_LEASE_MS`.
    pub workload_lease_ms: Option<u64>,
    /// `--workload-grace-ms` / `MESHLINK_WORKLOAD_GRACE_MS`.
    pub workload_grace_ms: Option<u64>,
    /// `--key-rotation-secs` / `MESHLINK_KEY_ROTATION_SECS` (0: no schedule).
    pub key_rotation_secs: Option<u64>,
    /// `--key-rotation-grace-ms` / `MESHLINK_KEY_ROTATION_GRACE_MS`.
    pub key_rotation_grace_ms: Option<u64>,
    /// `--node-expiry-secs` / `MESHLINK_NODE_EXPIRY_SECS` (0: never).
    pub node_expiry_secs: Option<u64>,
}

/// Where a bad value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A flag or its environment variable.
    Flag(&'static str, &'static str),
    /// A key in a file.
    File(PathBuf, &'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag, var) => write!(f, "{flag} (or {var})"),
            Origin::File(path, key) => write!(f, "{}: {key}", path.display()),
        }
    }
}

/// Why the configuration cannot become [`Settings`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("{path} line {line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong, naming the key where possible.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("{origin}: {message}")]
    Value {
        /// Where it came from.
        origin: Origin,
        /// What is wrong.
        message: String,
    },
}

/// The TOML file's keys. See `configs/coordinator.example.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    listen: Option<String>,
    tcp_listen: Option<String>,
    admin_listen: Option<String>,
    admin_insecure: Option<bool>,
    advertise: Option<String>,
    coordinators: Option<Vec<String>>,
    store: Option<String>,
    reflect_listen: Option<String>,
    relay: Option<Switch>,
    relay_rate: Option<u64>,
    relays: Option<Vec<RelayEntry>>,
    relay_ticket_secs: Option<u64>,
    hello_timeout_secs: Option<u64>,
    audit_retention_days: Option<u64>,
    message_rate: Option<u32>,
    message_burst: Option<u32>,
    session_queue: Option<usize>,
    max_connections: Option<usize>,
    max_unauthenticated: Option<usize>,
    max_unauthenticated_per_ip: Option<usize>,
    endpoint_interval_secs: Option<u64>,
    endpoint_burst: Option<u32>,
    idle_timeout_secs: Option<u64>,
    workload_lease_ms: Option<u64>,
    workload_grace_ms: Option<u64>,
    key_rotation_secs: Option<u64>,
    key_rotation_grace_ms: Option<u64>,
    node_expiry_secs: Option<u64>,
    key_rotation_networks: Option<std::collections::BTreeMap<String, u64>>,
}

/// One `[[relays]]` entry: a standalone relay agents are told of.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayEntry {
    name: String,
    addr: String,
    fingerprint: String,
    #[serde(default)]
    region: String,
    #[serde(default)]
    provider: String,
}

/// The `[[relays]]` entries, checked: names unique and short, `host:port` addresses,
/// SHA-256 fingerprints, at most `MAX_LISTED_RELAYS`.
fn relays(entries: Vec<RelayEntry>) -> Result<Vec<meshlink_proto::relay::RelayInfo>, String> {
    use meshlink_proto::relay::MAX_LISTED_RELAYS;
    if entries.len() > MAX_LISTED_RELAYS {
        return Err(format!(
            "{} relays listed; at most {MAX_LISTED_RELAYS}",
            entries.len()
        ));
    }
    let mut out: Vec<meshlink_proto::relay::RelayInfo> = Vec::new();
    for e in entries {
        // Bounded so that a grant listing the most relays fits the frames of the smallest
        // QUIC datagram (crate::relay's tests).
        let short = |what: &str, v: &str, max: usize| {
            if v.len() > max || v.chars().any(char::is_control) {
                Err(format!(
                    "relay {:?}: {what} longer than {max} bytes or not printable",
                    e.name
                ))
            } else {
                Ok(())
            }
        };
        short("name", &e.name, crate::relay::MAX_NAME)?;
        short("region", &e.region, crate::relay::MAX_NAME)?;
        short("provider", &e.provider, crate::relay::MAX_NAME)?;
        short("addr", &e.addr, crate::relay::MAX_ADDR)?;
        if e.name.is_empty() {
            return Err("a relay without a name".into());
        }
        if e.name.starts_with(crate::relay::COORDINATOR_RELAY_PREFIX) {
            return Err(format!(
                "relay {:?}: names beginning {:?} are the coordinators' own (a mesh of several \
                 lists each as a relay)",
                e.name,
                crate::relay::COORDINATOR_RELAY_PREFIX
            ));
        }
        if out.iter().any(|r| r.name == e.name) {
            return Err(format!("relay {:?} listed twice", e.name));
        }
        validate_advertise(&e.addr).map_err(|m| format!("relay {:?}: addr: {m}", e.name))?;
        let fingerprint = e.fingerprint.to_ascii_lowercase();
        if fingerprint.len() != 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "relay {:?}: fingerprint must be 64 hex digits (meshlink-relay prints it)",
                e.name
            ));
        }
        out.push(meshlink_proto::relay::RelayInfo {
            name: e.name,
            addr: e.addr,
            fingerprint,
            region: e.region,
            provider: e.provider,
        });
    }
    Ok(out)
}

/// A switch in the file: `true`/`false`, or `"on"`/`"off"` as the flag takes it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Switch {
    Bool(bool),
    Text(String),
}

/// Builds [`Settings`] from an optional file and the overrides.
///
/// # Errors
/// [`ConfigError`], naming the file and key or the flag.
pub fn load(file: Option<&Path>, over: Overrides) -> Result<Settings, ConfigError> {
    let (cfg, path) = match file {
        Some(path) => (read_file(path)?, Some(path.to_path_buf())),
        None => (FileConfig::default(), None),
    };
    let file_origin = |key: &'static str| Origin::File(path.clone().unwrap_or_default(), key);
    let bad = |origin: Origin, message: String| ConfigError::Value { origin, message };
    let keys = key_settings(&over, &cfg, &file_origin)?;

    let state_dir = match (over.state_dir, cfg.state_dir) {
        (Some(d), _) => d,
        (None, Some(d)) => match path.as_deref().and_then(Path::parent) {
            Some(base) if d.is_relative() => base.join(d),
            _ => d,
        },
        (None, None) => PathBuf::from(DEFAULT_STATE_DIR),
    };
    if state_dir.as_os_str().is_empty() {
        return Err(bad(file_origin("state_dir"), "must not be empty".into()));
    }

    let addr = |flag: Option<SocketAddr>,
                text: Option<String>,
                key: &'static str,
                default: &str|
     -> Result<SocketAddr, ConfigError> {
        match (flag, text) {
            (Some(a), _) => Ok(a),
            (None, Some(t)) => t.parse().map_err(|_| {
                bad(
                    file_origin(key),
                    format!("{t:?} is not an address such as 0.0.0.0:7443"),
                )
            }),
            (None, None) => Ok(parse_default(default)),
        }
    };
    let listen = addr(over.listen, cfg.listen, "listen", DEFAULT_LISTEN)?;
    let tcp_listen = match (over.tcp_listen, cfg.tcp_listen) {
        (Some(t), _) => TcpListen::parse(&t)
            .map_err(|m| bad(Origin::Flag("--tcp-listen", "MESHLINK_TCP_LISTEN"), m))?,
        (None, Some(t)) => TcpListen::parse(&t).map_err(|m| bad(file_origin("tcp_listen"), m))?,
        (None, None) => TcpListen::AtListen,
    };
    let admin_from_flag = over.admin_listen.is_some();
    let admin_listen = addr(
        over.admin_listen,
        cfg.admin_listen,
        "admin_listen",
        DEFAULT_ADMIN_LISTEN,
    )?;
    // The admin API speaks plain HTTP with a bearer token: beyond loopback, the token and
    // every answer cross the network in the clear unless the operator put TLS in front.
    let insecure = over.admin_insecure.or(cfg.admin_insecure).unwrap_or(false);
    if !admin_listen.ip().is_loopback() && !insecure {
        let origin = if admin_from_flag {
            Origin::Flag("--admin-listen", "MESHLINK_ADMIN_LISTEN")
        } else {
            file_origin("admin_listen")
        };
        return Err(bad(
            origin,
            format!(
                "{admin_listen} is not a loopback address, and the admin API speaks plain HTTP: \
                 keep it on loopback (behind a TLS proxy for remote use), or accept plain HTTP \
                 on the network with --admin-insecure (admin_insecure = true)"
            ),
        ));
    }

    let advertise = match (over.advertise, cfg.advertise) {
        (Some(a), _) => Some(
            validate_advertise(&a)
                .map_err(|m| bad(Origin::Flag("--advertise", "MESHLINK_ADVERTISE"), m))?,
        ),
        (None, Some(a)) => {
            Some(validate_advertise(&a).map_err(|m| bad(file_origin("advertise"), m))?)
        }
        (None, None) => None,
    };

    let coordinators = match (over.coordinators, cfg.coordinators) {
        (Some(list), _) => list
            .split(',')
            .filter(|a| !a.trim().is_empty())
            .map(|a| {
                validate_advertise(a)
                    .map_err(|m| bad(Origin::Flag("--coordinators", "MESHLINK_COORDINATORS"), m))
            })
            .collect::<Result<Vec<_>, _>>()?,
        (None, Some(list)) => list
            .iter()
            .map(|a| validate_advertise(a).map_err(|m| bad(file_origin("coordinators"), m)))
            .collect::<Result<Vec<_>, _>>()?,
        (None, None) => Vec::new(),
    };
    let store = match (over.store, cfg.store) {
        (Some(t), _) => StoreLocation::parse(&t)
            .map_err(|m| bad(Origin::Flag("--store", "MESHLINK_STORE"), m))?,
        (None, Some(t)) => StoreLocation::parse(&t).map_err(|m| bad(file_origin("store"), m))?,
        (None, None) => StoreLocation::Sqlite,
    };
    let reflect_listen = match (over.reflect_listen, cfg.reflect_listen) {
        (Some(t), _) => ReflectListen::parse(&t).map_err(|m| {
            bad(
                Origin::Flag("--reflect-listen", "MESHLINK_REFLECT_LISTEN"),
                m,
            )
        })?,
        (None, Some(t)) => {
            ReflectListen::parse(&t).map_err(|m| bad(file_origin("reflect_listen"), m))?
        }
        (None, None) => {
            if ReflectListen::NextToListen.resolve(listen).is_none() {
                let origin = if path.is_some() {
                    file_origin("reflect_listen")
                } else {
                    Origin::Flag("--reflect-listen", "MESHLINK_REFLECT_LISTEN")
                };
                return Err(bad(
                    origin,
                    format!(
                        "the default (the listen port + 1) does not exist for listen {listen}: \
                         set an address, or off"
                    ),
                ));
            }
            ReflectListen::NextToListen
        }
    };
    let relay = match (over.relay, cfg.relay) {
        (Some(t), _) => {
            parse_switch(&t).map_err(|m| bad(Origin::Flag("--relay", "MESHLINK_RELAY"), m))?
        }
        (None, Some(Switch::Bool(b))) => b,
        (None, Some(Switch::Text(t))) => {
            parse_switch(&t).map_err(|m| bad(file_origin("relay"), m))?
        }
        (None, None) => true,
    };

    let d = Limits::default();
    let at_least_one = |v: u64, origin: Origin| -> Result<u64, ConfigError> {
        if v == 0 {
            Err(bad(origin, "must be at least 1".into()))
        } else {
            Ok(v)
        }
    };
    macro_rules! pick {
        ($name:ident, $flag:literal, $var:literal, $default:expr) => {
            match (over.$name, cfg.$name) {
                (Some(v), _) => at_least_one(v as u64, Origin::Flag($flag, $var)).map(|_| v)?,
                (None, Some(v)) => {
                    at_least_one(v as u64, file_origin(stringify!($name))).map(|_| v)?
                }
                (None, None) => $default,
            }
        };
    }
    let hello_timeout_secs = pick!(
        hello_timeout_secs,
        "--hello-timeout-secs",
        "MESHLINK_HELLO_TIMEOUT_SECS",
        d.hello_timeout.as_secs()
    );
    let endpoint_interval_secs = pick!(
        endpoint_interval_secs,
        "--endpoint-interval-secs",
        "MESHLINK_ENDPOINT_INTERVAL_SECS",
        d.endpoint_interval.as_secs()
    );
    let idle_timeout_secs = pick!(
        idle_timeout_secs,
        "--idle-timeout-secs",
        "MESHLINK_IDLE_TIMEOUT_SECS",
        d.idle_timeout.as_secs()
    );
    let workload_lease_ms = pick!(
        workload_lease_ms,
        "--workload-lease-ms",
        "MESHLINK_WORKLOAD_LEASE_MS",
        u64::try_from(d.workload_lease.as_millis()).unwrap_or(u64::MAX)
    );
    if !(100..=600_000).contains(&workload_lease_ms) {
        let origin = if over.workload_lease_ms.is_some() {
            Origin::Flag("--workload-lease-ms", "MESHLINK_WORKLOAD_LEASE_MS")
        } else {
            file_origin("workload_lease_ms")
        };
        return Err(bad(
            origin,
            format!("{workload_lease_ms} is outside 100..=600000 milliseconds"),
        ));
    }
    let workload_grace_ms = pick!(
        workload_grace_ms,
        "--workload-grace-ms",
        "MESHLINK_WORKLOAD_GRACE_MS",
        u64::try_from(d.workload_grace.as_millis()).unwrap_or(u64::MAX)
    );
    if !(100..=600_000).contains(&workload_grace_ms) {
        let origin = if over.workload_grace_ms.is_some() {
            Origin::Flag("--workload-grace-ms", "MESHLINK_WORKLOAD_GRACE_MS")
        } else {
            file_origin("workload_grace_ms")
        };
        return Err(bad(
            origin,
            format!("{workload_grace_ms} is outside 100..=600000 milliseconds"),
        ));
    }
    let limits = Limits {
        hello_timeout: Duration::from_secs(hello_timeout_secs),
        message_rate: pick!(
            message_rate,
            "--message-rate",
            "MESHLINK_MESSAGE_RATE",
            d.message_rate
        ),
        message_burst: pick!(
            message_burst,
            "--message-burst",
            "MESHLINK_MESSAGE_BURST",
            d.message_burst
        ),
        session_queue: pick!(
            session_queue,
            "--session-queue",
            "MESHLINK_SESSION_QUEUE",
            d.session_queue
        ),
        max_connections: pick!(
            max_connections,
            "--max-connections",
            "MESHLINK_MAX_CONNECTIONS",
            d.max_connections
        ),
        max_unauthenticated: pick!(
            max_unauthenticated,
            "--max-unauthenticated",
            "MESHLINK_MAX_UNAUTHENTICATED",
            d.max_unauthenticated
        ),
        max_unauthenticated_per_ip: pick!(
            max_unauthenticated_per_ip,
            "--max-unauthenticated-per-ip",
            "MESHLINK_MAX_UNAUTHENTICATED_PER_IP",
            d.max_unauthenticated_per_ip
        ),
        relay_rate: pick!(
            relay_rate,
            "--relay-rate",
            "MESHLINK_RELAY_RATE",
            d.relay_rate
        ),
        audit_retention: Duration::from_secs(
            pick!(
                audit_retention_days,
                "--audit-retention-days",
                "MESHLINK_AUDIT_RETENTION_DAYS",
                d.audit_retention.as_secs() / 86_400
            )
            .min(36_500)
                * 86_400,
        ),
        endpoint_interval: Duration::from_secs(endpoint_interval_secs),
        endpoint_burst: pick!(
            endpoint_burst,
            "--endpoint-burst",
            "MESHLINK_ENDPOINT_BURST",
            d.endpoint_burst
        ),
        write_timeout: d.write_timeout,
        idle_timeout: Duration::from_secs(idle_timeout_secs.max(3)),
        workload_lease: Duration::from_millis(workload_lease_ms),
        workload_grace: Duration::from_millis(workload_grace_ms),
    };
    let relay_list =
        relays(cfg.relays.unwrap_or_default()).map_err(|m| bad(file_origin("relays"), m))?;
    let relay_ticket = match cfg.relay_ticket_secs {
        None => meshlink_relay::ticket::DEFAULT_TTL,
        Some(s) if (60..=meshlink_relay::ticket::MAX_TTL.as_secs()).contains(&s) => {
            Duration::from_secs(s)
        }
        Some(s) => {
            return Err(bad(
                file_origin("relay_ticket_secs"),
                format!(
                    "{s}: from 60 to {} (relays refuse longer tickets)",
                    meshlink_relay::ticket::MAX_TTL.as_secs()
                ),
            ))
        }
    };
    Ok(Settings {
        state_dir,
        listen,
        tcp_listen,
        admin_listen,
        advertise,
        coordinators,
        store,
        reflect_listen,
        relay,
        relays: relay_list,
        relay_ticket,
        limits,
        keys,
    })
}

/// The settings of key rotation and node expiry: an interval of 0 seconds (or none) is off;
/// a network's own interval replaces the default one.
fn key_settings(
    over: &Overrides,
    cfg: &FileConfig,
    file_origin: &dyn Fn(&'static str) -> Origin,
) -> Result<crate::keys::KeySettings, ConfigError> {
    let secs = |v: u64| (v > 0).then(|| Duration::from_secs(v));
    let d = crate::keys::KeySettings::default();
    let grace_ms = match (over.key_rotation_grace_ms, cfg.key_rotation_grace_ms) {
        (Some(v), _) => (
            v,
            Origin::Flag("--key-rotation-grace-ms", "MESHLINK_KEY_ROTATION_GRACE_MS"),
        ),
        (None, Some(v)) => (v, file_origin("key_rotation_grace_ms")),
        (None, None) => (
            u64::try_from(d.grace.as_millis()).unwrap_or(u64::MAX),
            file_origin("key_rotation_grace_ms"),
        ),
    };
    let max = meshlink_proto::control::MAX_KEY_SWITCH_GRACE_MS;
    if !(100..=max).contains(&grace_ms.0) {
        return Err(ConfigError::Value {
            origin: grace_ms.1,
            message: format!("{} is outside 100..={max} milliseconds", grace_ms.0),
        });
    }
    let mut networks = std::collections::BTreeMap::new();
    for (name, every) in cfg.key_rotation_networks.iter().flatten() {
        if crate::handlers::validate_name("network", name).is_err() {
            return Err(ConfigError::Value {
                origin: file_origin("key_rotation_networks"),
                message: format!("{name:?} is not a network name ([a-z0-9-]{{1,63}})"),
            });
        }
        networks.insert(name.clone(), secs(*every));
    }
    Ok(crate::keys::KeySettings {
        rotation: over
            .key_rotation_secs
            .or(cfg.key_rotation_secs)
            .and_then(secs),
        networks,
        grace: Duration::from_millis(grace_ms.0),
        node_expiry: over
            .node_expiry_secs
            .or(cfg.node_expiry_secs)
            .and_then(secs),
    })
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    use std::io::Read;
    let read_err = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(CONFIG_FILE_LIMIT)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    toml::from_str(&text).map_err(|e| {
        let TomlProblem { line, message } = toml_error::describe(&text, &e);
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            message,
        }
    })
}

/// Checks an advertised address: `host:port` with a non-zero port, IPv6 in brackets.
///
/// # Errors
/// A message saying what is wrong.
pub fn validate_advertise(text: &str) -> Result<String, String> {
    let text = text.trim();
    let err =
        || format!("{text:?} is not host:port (such as 198.18.0.1:7443 or coord.example:7443)");
    if let Ok(sa) = text.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(err());
        }
        return Ok(sa.to_string());
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(err)?;
    let port: u16 = port.parse().map_err(|_| err())?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if port == 0 || !host_ok {
        return Err(err());
    }
    Ok(format!("{host}:{port}"))
}

/// The address to advertise when none is configured: the listen address itself when it is a
/// specific one, otherwise the host's first non-loopback IPv4 address, with the bound port.
/// Falls back to loopback (with a warning) on a host with no such address.
pub fn default_advertise(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let ip = host_ipv4().unwrap_or_else(|| {
        tracing::warn!("no non-loopback IPv4 address found; advertising 127.0.0.1 (set advertise)");
        Ipv4Addr::LOCALHOST
    });
    SocketAddr::new(IpAddr::V4(ip), bound.port()).to_string()
}

/// The host's first non-loopback IPv4 address of an interface that is up (by `getifaddrs`),
/// else the source address the kernel would use towards 198.18.0.1 (a UDP `connect`, which
/// sends nothing).
pub fn host_ipv4() -> Option<Ipv4Addr> {
    let from_interfaces = nix::ifaddrs::getifaddrs().ok().and_then(|addrs| {
        let candidates = addrs.filter_map(|a| {
            let up = a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
            let v4 = a.address.as_ref()?.as_sockaddr_in()?.ip();
            Some((up, v4))
        });
        pick_ipv4(candidates)
    });
    from_interfaces.or_else(|| {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
        sock.connect((Ipv4Addr::new(198, 18, 0, 1), 9)).ok()?;
        match sock.local_addr().ok()?.ip() {
            IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified() => Some(v4),
            _ => None,
        }
    })
}

/// The first address of an up interface that is not loopback, link-local or unspecified.
pub fn pick_ipv4(candidates: impl IntoIterator<Item = (bool, Ipv4Addr)>) -> Option<Ipv4Addr> {
    candidates
        .into_iter()
        .find(|(up, a)| *up && !a.is_loopback() && !a.is_link_local() && !a.is_unspecified())
        .map(|(_, a)| a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration file in its own scratch directory, removed on drop.
    struct TestFile(PathBuf);

    impl std::ops::Deref for TestFile {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn file(name: &str, text: &str) -> TestFile {
        let dir = std::env::temp_dir().join(format!(
            "meshlink-coord-config-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        TestFile(p)
    }

    #[test]
    fn defaults() {
        let s = load(None, Overrides::default()).unwrap();
        assert_eq!(s.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(s.listen.to_string(), "0.0.0.0:7443");
        assert_eq!(s.admin_listen.to_string(), "127.0.0.1:7444");
        assert_eq!(s.advertise, None);
        assert_eq!(s.limits, Limits::default());
    }

    #[test]
    fn the_example_file_documents_the_defaults() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/coordinator.example.toml");
        let s = load(Some(&example), Overrides::default()).unwrap();
        assert_eq!(s, load(None, Overrides::default()).unwrap());
    }

    #[test]
    fn relays_are_listed_and_checked() {
        let fp = "AB".repeat(32);
        let entry = |name: &str, addr: &str, fp: &str| {
            format!("[[relays]]\nname = \"{name}\"\naddr = \"{addr}\"\nfingerprint = \"{fp}\"\nregion = \"eu\"\n")
        };
        let p = file(
            "relays.toml",
            &format!(
                "relay_ticket_secs = 120\n{}",
                entry("eu-1", "198.18.0.11:7450", &fp)
            ),
        );
        let s = load(Some(&p), Overrides::default()).unwrap();
        assert_eq!(s.relay_ticket, Duration::from_secs(120));
        assert_eq!(s.relays.len(), 1);
        assert_eq!(
            (
                s.relays[0].fingerprint.as_str(),
                s.relays[0].region.as_str()
            ),
            ("ab".repeat(32).as_str(), "eu"),
            "fingerprints are kept in lowercase"
        );
        for (name, text, wants) in [
            (
                "dup.toml",
                format!(
                    "{}{}",
                    entry("a", "198.18.0.11:7450", &fp),
                    entry("a", "198.18.0.12:7450", &fp)
                ),
                "listed twice",
            ),
            (
                "fp.toml",
                entry("a", "198.18.0.11:7450", "abcd"),
                "fingerprint",
            ),
            ("addr.toml", entry("a", "nope", &fp), "addr"),
            (
                "taken.toml",
                entry("coordinator-2", "198.18.0.11:7450", &fp),
                "the coordinators' own",
            ),
            (
                "ttl.toml",
                "relay_ticket_secs = 10\n".to_string(),
                "relay_ticket_secs",
            ),
        ] {
            let e = load(Some(&file(name, &text)), Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(wants), "{name}: {e}");
        }
        let many: String = (0..9)
            .map(|i| entry(&format!("r{i}"), "198.18.0.11:7450", &fp))
            .collect();
        let e = load(Some(&file("many.toml", &many)), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 8"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let p = file("a.toml", "state_dir = \"state\"\nlisten = \"127.0.0.1:9000\"\nmessage_rate = 5\nadvertise = \"coord.example:9000\"\n");
        let over = Overrides {
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            message_burst: Some(7),
            ..Overrides::default()
        };
        let s = load(Some(&p), over).unwrap();
        assert_eq!(
            s.state_dir,
            p.parent().unwrap().join("state"),
            "relative to the file"
        );
        assert_eq!(s.listen.port(), 9001);
        assert_eq!((s.limits.message_rate, s.limits.message_burst), (5, 7));
        assert_eq!(s.advertise.as_deref(), Some("coord.example:9000"));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let p = file("b.toml", "listen = \"0.0.0.0:7443\"\nbogus = 1\n");
        let e = load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.toml line 2") && e.contains("bogus"), "{e}");
        let p = file("c.toml", "message_rate = 0\n");
        let e = load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.toml: message_rate: must be at least 1"),
            "{e}"
        );
        let p = file("d.toml", "admin_listen = \"localhost\"\n");
        let e = load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.toml: admin_listen"), "{e}");
        let p = file("e.toml", "message_rate = \"fast\"\n");
        let e = load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("e.toml line 1") && e.contains("message_rate"),
            "{e}"
        );
        let e = load(
            None,
            Overrides {
                advertise: Some("nope".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--advertise"), "{e}");
    }

    #[test]
    fn advertise_rules() {
        assert_eq!(
            validate_advertise("198.18.0.1:7443").unwrap(),
            "198.18.0.1:7443"
        );
        assert_eq!(
            validate_advertise("[fd00::1]:7443").unwrap(),
            "[fd00::1]:7443"
        );
        assert!(validate_advertise("coord.example").is_err());
        assert!(validate_advertise("coord.example:0").is_err());
        assert!(validate_advertise("a b:1").is_err());
        assert_eq!(
            default_advertise("198.18.0.7:7443".parse().unwrap()),
            "198.18.0.7:7443"
        );
        assert!(default_advertise("0.0.0.0:7443".parse().unwrap()).ends_with(":7443"));
    }

    #[test]
    fn picks_the_first_usable_ipv4() {
        let lo = (true, Ipv4Addr::LOCALHOST);
        let down = (false, Ipv4Addr::new(10, 0, 0, 1));
        let ll = (true, Ipv4Addr::new(169, 254, 1, 1));
        let good = (true, Ipv4Addr::new(198, 18, 0, 5));
        assert_eq!(pick_ipv4([lo, down, ll, good]), Some(good.1));
        assert_eq!(pick_ipv4([lo]), None);
    }

    #[test]
    fn store_locations_parse_and_never_show_a_password() {
        assert_eq!(StoreLocation::parse("sqlite"), Ok(StoreLocation::Sqlite));
        let pg = StoreLocation::parse("postgres://meshlink:hunter2@db.example:5433/mesh").unwrap();
        assert_eq!(
            pg.redacted(),
            "postgres://meshlink:***@db.example:5433/mesh"
        );
        assert!(!format!("{pg:?}").contains("hunter2"));
        assert!(StoreLocation::parse("postgres://meshlink@/mesh?host=/run/postgresql").is_ok());
        for bad in [
            "mysql://x/y",
            "postgres://db.example",
            "postgres:///",
            "",
            "/var/db",
        ] {
            let e = StoreLocation::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        let e = load(
            None,
            Overrides {
                store: Some("postgres://u:secret@db".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--store (or MESHLINK_STORE)"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn coordinator_lists_are_checked_entry_by_entry() {
        let s = load(
            None,
            Overrides {
                coordinators: Some("198.18.0.1:7443, coord-b.example:7443".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(s.coordinators, ["198.18.0.1:7443", "coord-b.example:7443"]);
        let e = load(
            None,
            Overrides {
                coordinators: Some("198.18.0.1:7443,nope".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--coordinators") && e.contains("nope"), "{e}");
    }

    #[test]
    fn the_reflect_port_is_next_to_the_listen_port_by_default() {
        let s = load(None, Overrides::default()).unwrap();
        assert_eq!(s.reflect_listen, ReflectListen::NextToListen);
        assert_eq!(
            s.reflect_listen.resolve(s.listen),
            Some("0.0.0.0:7444".parse().unwrap()),
            "UDP 7444: the admin API's 7444 is TCP"
        );
        assert!(s.relay);
        assert_eq!(s.limits.relay_rate, crate::relay::DEFAULT_RATE);
        let s = load(
            None,
            Overrides {
                listen: Some("127.0.0.1:0".parse().unwrap()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(
            s.reflect_listen.resolve(s.listen),
            Some("127.0.0.1:0".parse().unwrap()),
            "an ephemeral QUIC port: an ephemeral reflect port"
        );
        let p = file("r1.toml", "listen = \"198.18.0.1:9000\"\n");
        let s = load(Some(&p), Overrides::default()).unwrap();
        assert_eq!(
            s.reflect_listen.resolve(s.listen),
            Some("198.18.0.1:9001".parse().unwrap())
        );
        // No port after 65535: the default cannot be, and the error says what to set.
        let e = load(
            None,
            Overrides {
                listen: Some("0.0.0.0:65535".parse().unwrap()),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--reflect-listen (or MESHLINK_REFLECT_LISTEN)"),
            "{e}"
        );
        let e = load(
            Some(&file("r2.toml", "listen = \"0.0.0.0:65535\"\n")),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("r2.toml: reflect_listen"), "{e}");
    }

    #[test]
    fn tcp_listen_is_the_quic_address_by_default_an_address_or_off() {
        let s = load(None, Overrides::default()).unwrap();
        assert_eq!(s.tcp_listen, TcpListen::AtListen);
        let bound: SocketAddr = "0.0.0.0:7443".parse().unwrap();
        assert_eq!(
            s.tcp_listen.resolve(bound),
            Some(bound),
            "TCP 7443 beside UDP 7443"
        );
        let p = file("t1.toml", "tcp_listen = \"0.0.0.0:443\"\n");
        let s = load(Some(&p), Overrides::default()).unwrap();
        assert_eq!(
            s.tcp_listen.resolve(bound),
            Some("0.0.0.0:443".parse().unwrap())
        );
        let over = Overrides {
            tcp_listen: Some("off".into()),
            ..Overrides::default()
        };
        let s = load(Some(&p), over).unwrap();
        assert_eq!(
            (s.tcp_listen, s.tcp_listen.resolve(bound)),
            (TcpListen::Off, None)
        );
        let e = load(
            Some(&file("t2.toml", "tcp_listen = \"443\"\n")),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t2.toml: tcp_listen") && e.contains("or off"),
            "{e}"
        );
        let e = load(
            None,
            Overrides {
                tcp_listen: Some("anywhere".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--tcp-listen (or MESHLINK_TCP_LISTEN)"),
            "{e}"
        );
    }

    #[test]
    fn reflect_listen_takes_an_address_or_off() {
        let p = file("r3.toml", "reflect_listen = \"off\"\nrelay = false\n");
        let s = load(Some(&p), Overrides::default()).unwrap();
        assert_eq!(s.reflect_listen, ReflectListen::Off);
        assert_eq!(s.reflect_listen.resolve(s.listen), None);
        assert!(!s.relay);
        let over = Overrides {
            reflect_listen: Some("198.18.0.1:3478".into()),
            relay: Some("on".into()),
            relay_rate: Some(1_000_000),
            ..Overrides::default()
        };
        let s = load(Some(&p), over).unwrap();
        assert_eq!(
            s.reflect_listen,
            ReflectListen::At("198.18.0.1:3478".parse().unwrap())
        );
        assert!(s.relay, "the flag wins");
        assert_eq!(s.limits.relay_rate, 1_000_000);
        let p = file("r4.toml", "relay = \"off\"\nrelay_rate = 5000\n");
        let s = load(Some(&p), Overrides::default()).unwrap();
        assert!(!s.relay);
        assert_eq!(s.limits.relay_rate, 5000);
    }

    #[test]
    fn bad_traversal_settings_name_their_key() {
        let e = load(
            Some(&file("r5.toml", "reflect_listen = \"7444\"\n")),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("r5.toml: reflect_listen") && e.contains("or off"),
            "{e}"
        );
        let e = load(
            None,
            Overrides {
                reflect_listen: Some("nowhere".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--reflect-listen (or MESHLINK_REFLECT_LISTEN)"),
            "{e}"
        );
        let e = load(
            Some(&file("r6.toml", "relay = \"maybe\"\n")),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("r6.toml: relay: \"maybe\" is not on or off"),
            "{e}"
        );
        let e = load(
            None,
            Overrides {
                relay: Some("yes please".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--relay (or MESHLINK_RELAY)"), "{e}");
        let e = load(
            Some(&file("r7.toml", "relay_rate = 0\n")),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("r7.toml: relay_rate: must be at least 1"), "{e}");
        let e = load(Some(&file("r8.toml", "relay = 3\n")), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("r8.toml line 1") && e.contains("relay"), "{e}");
    }

    #[test]
    fn the_caps_before_the_hello_are_set_per_key_and_never_zero() {
        let p = file(
            "u1.toml",
            "max_unauthenticated = 50\nmax_unauthenticated_per_ip = 4\n",
        );
        let over = Overrides {
            max_unauthenticated_per_ip: Some(8),
            ..Overrides::default()
        };
        let s = load(Some(&p), over).unwrap();
        assert_eq!(
            (
                s.limits.max_unauthenticated,
                s.limits.max_unauthenticated_per_ip
            ),
            (50, 8)
        );
        let e = load(
            Some(&file("u2.toml", "max_unauthenticated_per_ip = 0\n")),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("u2.toml: max_unauthenticated_per_ip: must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn endpoint_pacing_is_set_per_key_and_never_zero() {
        let p = file(
            "ep1.toml",
            "endpoint_interval_secs = 30\nendpoint_burst = 2\n",
        );
        let over = Overrides {
            endpoint_burst: Some(5),
            ..Overrides::default()
        };
        let s = load(Some(&p), over).unwrap();
        assert_eq!(
            (s.limits.endpoint_interval, s.limits.endpoint_burst),
            (Duration::from_secs(30), 5)
        );
        let e = load(
            Some(&file("ep2.toml", "endpoint_burst = 0\n")),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ep2.toml: endpoint_burst: must be at least 1"),
            "{e}"
        );
    }

    /// The admin API speaks plain HTTP: listening beyond loopback needs saying so.
    #[test]
    fn key_rotation_and_expiry_are_off_by_default_and_set_per_network() {
        let s = load(None, Overrides::default()).unwrap();
        assert_eq!(s.keys, crate::keys::KeySettings::default());
        let p = file(
            "keys.toml",
            "key_rotation_secs = 2592000\nnode_expiry_secs = 604800\n\
             key_rotation_grace_ms = 500\n[key_rotation_networks]\nprod = 86400\nlab = 0\n",
        );
        let s = load(Some(&p), Overrides::default()).unwrap();
        let day = Duration::from_secs(86_400);
        assert_eq!(s.keys.rotation_of("prod"), Some(day));
        assert_eq!(s.keys.rotation_of("lab"), None);
        assert_eq!(s.keys.rotation_of("other"), Some(30 * day));
        assert_eq!(s.keys.node_expiry, Some(7 * day));
        assert_eq!(s.keys.grace, Duration::from_millis(500));
        let over = Overrides {
            key_rotation_secs: Some(0),
            ..Overrides::default()
        };
        assert_eq!(load(Some(&p), over).unwrap().keys.rotation, None);
        let bad = file("badkeys.toml", "key_rotation_grace_ms = 5\n");
        let e = load(Some(&bad), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_rotation_grace_ms"), "{e}");
        let bad = file("badnet.toml", "[key_rotation_networks]\nNope = 5\n");
        let e = load(Some(&bad), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_rotation_networks"), "{e}");
    }

    #[test]
    fn a_non_loopback_admin_listener_must_be_asked_for() {
        let over = |insecure| Overrides {
            admin_listen: Some("0.0.0.0:7444".parse().unwrap()),
            admin_insecure: insecure,
            ..Overrides::default()
        };
        let e = load(None, over(None)).unwrap_err().to_string();
        assert!(
            e.starts_with("--admin-listen (or MESHLINK_ADMIN_LISTEN)")
                && e.contains("--admin-insecure"),
            "{e}"
        );
        assert!(load(None, over(Some(true))).is_ok());
        let p = file(
            "i.toml",
            "admin_listen = \"198.18.0.1:7444\"\nadmin_insecure = true\n",
        );
        assert!(load(Some(&p), Overrides::default()).is_ok());
        let p = file("j.toml", "admin_listen = \"[::1]:7444\"\n");
        assert!(
            load(Some(&p), Overrides::default()).is_ok(),
            "loopback needs nothing"
        );
    }
}
