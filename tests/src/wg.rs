//! Reading a WireGuard device's state with the stock `wg` tool, which speaks the standard
//! userspace API: the same reader works for `meshlink-agent` and `wireguard-go`.

use crate::netns::NsRef;

/// Whether `wg show IFACE` answers: the device's UAPI socket is up.
pub fn answers(ns: &NsRef, iface: &str) -> bool {
    ns.succeeds("wg", &["show", iface])
}

/// `wg show IFACE FIELD` (e.g. `endpoints`, `latest-handshakes`, `transfer`) as
/// `(peer public key, rest of the line)` pairs.
///
/// # Panics
/// When `wg` fails.
pub fn show(ns: &NsRef, iface: &str, field: &str) -> Vec<(String, String)> {
    ns.run("wg", &["show", iface, field])
        .lines()
        .filter_map(|line| {
            let (peer, rest) = line.split_once('\t')?;
            Some((peer.to_owned(), rest.trim().to_owned()))
        })
        .collect()
}

/// The Unix time of the latest handshake with `peer`, `None` if there has been none (or the
/// peer is unknown).
///
/// # Panics
/// When `wg` fails.
pub fn latest_handshake(ns: &NsRef, iface: &str, peer: &str) -> Option<u64> {
    show(ns, iface, "latest-handshakes")
        .into_iter()
        .find(|(key, _)| key == peer)
        .and_then(|(_, secs)| secs.parse().ok())
        .filter(|&secs| secs != 0)
}

/// The endpoint the device currently sends to for `peer`, `None` when it has none.
///
/// # Panics
/// When `wg` fails.
pub fn endpoint(ns: &NsRef, iface: &str, peer: &str) -> Option<String> {
    show(ns, iface, "endpoints")
        .into_iter()
        .find(|(key, _)| key == peer)
        .map(|(_, endpoint)| endpoint)
        .filter(|endpoint| endpoint != "(none)")
}

/// Bytes received from and sent to `peer`, as `wg show IFACE transfer` reports them.
///
/// # Panics
/// When `wg` fails.
pub fn transfer(ns: &NsRef, iface: &str, peer: &str) -> Option<(u64, u64)> {
    show(ns, iface, "transfer")
        .into_iter()
        .find(|(key, _)| key == peer)
        .and_then(|(_, counts)| {
            let mut it = counts.split_whitespace().map(str::parse::<u64>);
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
}
