//! The value parsers shared by the layers: each turns one written value (from a flag, a
//! variable, a TOML key or a wg-quick key) into a checked value, or into a reason that the
//! caller prefixes with where the value came from.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::{Resolver, MAX_MAP_AGE, MAX_MTU, MIN_MTU, MIN_MTU_IPV6};
use crate::settings::{MetricsListen, DEFAULT_DNS_PORT};

/// Checks an interface name: 1 to 15 bytes of `[A-Za-z0-9_.-]`, not `.` or `..`.
pub(super) fn parse_interface(name: &str) -> Result<String, String> {
    meshlink_uapi::parse_interface_name(name).map_err(|e| e.to_string())
}

/// Checks that a path is not empty.
pub(super) fn check_path(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        Err("the path is empty".to_string())
    } else {
        Ok(())
    }
}

/// Parses a port number.
pub(super) fn parse_port(s: &str) -> Result<u16, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{:?} is not a port number (0..=65535)", s.trim()))
}

/// Parses an MTU.
pub(super) fn parse_mtu(s: &str) -> Result<u16, String> {
    let n: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{:?} is not a number", s.trim()))?;
    check_mtu(n)
}

/// Checks an MTU against `MIN_MTU..=MAX_MTU`.
pub(super) fn check_mtu(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(mtu) if (MIN_MTU..=MAX_MTU).contains(&mtu) => Ok(mtu),
        _ => Err(format!(
            "MTU {n} is out of range {MIN_MTU}..={MAX_MTU} (IPv6 needs at least {MIN_MTU_IPV6})"
        )),
    }
}

/// Parses a firewall mark: decimal, `0x` hexadecimal, or `off` (no mark), as `wg` accepts.
pub(super) fn parse_fwmark(s: &str) -> Result<u32, String> {
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
pub(super) fn parse_bool(s: &str) -> Result<bool, String> {
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
pub(super) fn parse_dns_listen(s: &str) -> Result<SocketAddr, String> {
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
pub(super) fn parse_keepalive(s: &str) -> Result<Option<u16>, String> {
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
pub(super) fn check_keepalive(n: i64) -> Result<Option<u16>, String> {
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
pub(super) fn parse_address(s: &str) -> Result<IpNet, String> {
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
pub(super) fn parse_address_list(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(parse_address)
        .collect()
}

/// Refuses the same address given twice.
pub(super) fn check_duplicate_addresses(addresses: &[IpNet]) -> Result<(), String> {
    for (i, a) in addresses.iter().enumerate() {
        if addresses[..i].iter().any(|b| b.addr() == a.addr()) {
            return Err(format!("address {} is given twice", a.addr()));
        }
    }
    Ok(())
}

/// Parses an allowed-IPs entry: a network, or a bare address meaning /32 or /128. Host bits
/// are cleared, as `wg` does (`10.0.0.1/24` becomes `10.0.0.0/24`).
pub(super) fn parse_allowed_ip(s: &str) -> Result<IpNet, String> {
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
pub(super) fn parse_endpoint(s: &str, resolve: &Resolver) -> Result<SocketAddr, String> {
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
}
