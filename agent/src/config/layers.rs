//! The layers and their merging: what each source (flags, environment variables, a file)
//! gives, each value with where it came from, and the precedence that makes one
//! [`Settings`] of them (flag > environment variable > file > default, setting by setting).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::values::{
    check_duplicate_addresses, check_mtu, check_path, parse_address_list, parse_bool,
    parse_dns_listen, parse_dns_suffix, parse_fwmark, parse_interface, parse_map_age,
    parse_metrics_listen, parse_mtu, parse_port,
};
use super::{
    ConfigError, Origin, Overrides, ENV_ADDRESSES, ENV_CONFIG, ENV_DNS, ENV_DNS_LISTEN,
    ENV_DNS_SUFFIX, ENV_FAIL_CLOSED, ENV_FWMARK, ENV_INTERFACE, ENV_LISTEN_PORT,
    ENV_MAX_CACHED_MAP_AGE, ENV_METRICS_LISTEN, ENV_MTU, ENV_PRIVATE_KEY_FILE, ENV_UAPI_DIR,
    ENV_WG_QUICK, MIN_MTU_IPV6,
};
use crate::keyfile;
use crate::settings::{
    DeviceConfig, DnsSettings, MetricsListen, PeerConfig, PrivateKey, Settings, DEFAULT_DNS_SUFFIX,
    DEFAULT_INTERFACE, DEFAULT_MAX_CACHED_MAP_AGE, DEFAULT_MTU, DEFAULT_UAPI_DIR,
};

/// A value and where it came from.
#[derive(Debug, Clone)]
pub(super) struct Val<T> {
    pub(super) value: T,
    pub(super) origin: Origin,
}

impl<T> Val<T> {
    pub(super) fn new(value: T, origin: Origin) -> Self {
        Val { value, origin }
    }
}

/// Where the private key comes from.
#[derive(Debug, Clone)]
pub(super) enum KeySource {
    /// A key file, read when this source wins.
    File(PathBuf),
    /// A key written in the configuration (wg-quick's `PrivateKey`).
    Inline(PrivateKey),
}

/// The settings one source gives; `None` means the source does not give that setting.
#[derive(Debug, Default)]
pub(super) struct Layer {
    pub(super) interface: Option<Val<String>>,
    pub(super) private_key: Option<Val<KeySource>>,
    pub(super) listen_port: Option<Val<u16>>,
    pub(super) addresses: Option<Val<Vec<IpNet>>>,
    pub(super) mtu: Option<Val<u16>>,
    pub(super) fwmark: Option<Val<u32>>,
    pub(super) uapi_dir: Option<Val<PathBuf>>,
    /// `Some(None)`: `never`.
    pub(super) max_cached_map_age: Option<Val<Option<Duration>>>,
    pub(super) fail_closed: Option<Val<bool>>,
    pub(super) metrics_listen: Option<Val<MetricsListen>>,
    pub(super) dns: Option<Val<bool>>,
    pub(super) dns_listen: Option<Val<SocketAddr>>,
    pub(super) dns_suffix: Option<Val<String>>,
}

/// A file's settings and its peers, each peer with where its public key was given.
#[derive(Debug, Default)]
pub(super) struct FileLayer {
    pub(super) layer: Layer,
    pub(super) peers: Vec<(PeerConfig, Origin)>,
    /// Why the interface name the file implies (a wg-quick file's name) is invalid; an error
    /// only when no flag or variable gives the name instead.
    pub(super) interface_error: Option<ConfigError>,
}

/// Which kind of file to read.
pub(super) enum FileKind {
    Toml,
    WgQuick,
}

/// Picks the configuration file: flags first, then variables. Returns the kind, the path and
/// where it was named.
pub(super) fn choose_file(
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
pub(super) fn merge(flags: Layer, env: Layer, file: FileLayer) -> Result<Settings, ConfigError> {
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

/// The settings given as flags, checked.
pub(super) fn flag_layer(o: &Overrides) -> Result<Layer, ConfigError> {
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
pub(super) fn env_layer(env: &dyn Fn(&str) -> Option<String>) -> Result<Layer, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{b64, env_from, fake_resolve, no_env, Fixture};
    use super::super::{
        load_with, ENV_ADDRESSES, ENV_CONFIG, ENV_DNS, ENV_DNS_LISTEN, ENV_DNS_SUFFIX,
        ENV_FAIL_CLOSED, ENV_FWMARK, ENV_INTERFACE, ENV_LISTEN_PORT, ENV_MAX_CACHED_MAP_AGE,
        ENV_METRICS_LISTEN, ENV_MTU, ENV_PRIVATE_KEY_FILE, ENV_UAPI_DIR, ENV_WG_QUICK,
    };
    use super::*;

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
    fn no_private_key_anywhere() {
        let err = load_with(None, None, &Overrides::default(), &no_env, &fake_resolve)
            .expect_err("no key");
        assert!(matches!(err, ConfigError::MissingPrivateKey));
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
}
