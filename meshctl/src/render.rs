//! Rendering for `-o table`: aligned tables, field listings, and the cells inside them.
//!
//! Every function here is pure: it is given the answer (the [`meshlink_api`] types) and the
//! current time and returns text, so the tests pin the output exactly. Lists become a
//! [`Table`] with a header row; single objects become a [`Fields`] listing, one `NAME  value`
//! per line.
//!
//! # Security
//!
//! Cells come from the coordinator, which relays names and labels that agents chose. Control
//! characters in them are replaced by `?` so that no cell can move the cursor, recolour the
//! terminal or forge extra lines.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use meshlink_api::{
    AdminToken, AuditEntry, CreatedAdminToken, CreatedToken, ExternalNode, FlowVerdict,
    MovedWorkload, Network, Node, PathKind, PeerPath, PolicyChanged, PolicyVersion, RelayTransport,
    Relays, Status, Token, UnixTime, Workload, WorkloadNode, WorkloadState,
};

use crate::duration;

/// Columns are separated by this many spaces.
const GAP: u16 = 2;

/// What an empty or absent cell shows.
const NONE: &str = "-";

/// A table with a header row; columns are as wide as their widest cell (in terminal columns, so
/// wide characters count twice), two spaces apart, and no line ends in spaces.
#[derive(Debug, Clone)]
pub struct Table {
    table: comfy_table::Table,
    columns: usize,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        let mut table = plain();
        table.set_header(headers.iter().map(|h| clean(h)));
        space_columns(&mut table);
        Self {
            table,
            columns: headers.len(),
        }
    }

    /// Adds a row; missing cells are blank and extra cells are dropped.
    pub fn row<I, S>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut row: Vec<String> = cells
            .into_iter()
            .take(self.columns)
            .map(|c| clean(c.as_ref()))
            .collect();
        row.resize(self.columns, String::new());
        self.table.add_row(row);
        self
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.table.trim_fmt())
    }
}

/// One object as `NAME  value` lines, names aligned.
#[derive(Debug, Clone)]
pub struct Fields {
    table: comfy_table::Table,
    empty: bool,
}

impl Default for Fields {
    fn default() -> Self {
        Self {
            table: plain(),
            empty: true,
        }
    }
}

impl Fields {
    /// An empty listing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a line.
    pub fn field(&mut self, name: &str, value: impl AsRef<str>) -> &mut Self {
        self.table.add_row([clean(name), clean(value.as_ref())]);
        space_columns(&mut self.table);
        self.empty = false;
        self
    }
}

impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.empty {
            return Ok(());
        }
        writeln!(f, "{}", self.table.trim_fmt())
    }
}

/// A table drawn with no lines at all: cells, spaces, and a header row only if one is set. The
/// content is never wrapped to the terminal's width (comfy-table's default), so a script reads
/// one line per row whatever the terminal.
fn plain() -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table
}

/// Puts [`GAP`] spaces after each column (the last one's are trimmed with the line's end)
/// instead of comfy-table's one space each side.
fn space_columns(table: &mut comfy_table::Table) {
    for column in table.column_iter_mut() {
        column.set_padding((0, GAP));
    }
}

/// Replaces control characters, which could drive the terminal, with `?`.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A list of strings as cell text.
pub fn list(items: &[String]) -> String {
    or_none(items.join(","))
}

/// Endpoints as cell text: `ip:port` joined with `,`.
pub fn endpoints(endpoints: &[SocketAddr]) -> String {
    or_none(
        endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// Labels as cell text: `key=value` pairs joined with `,`, in key order.
pub fn labels(labels: &BTreeMap<String, String>) -> String {
    or_none(
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// `-` for empty text.
fn or_none(text: String) -> String {
    if text.is_empty() {
        NONE.to_owned()
    } else {
        text
    }
}

/// A time as `2024-05-01T12:00:00Z`, in UTC; `@SECONDS` past the years 9999 either side of
/// year 0, which only a wrong clock or a hostile answer can send.
pub fn time(at: UnixTime) -> String {
    match jiff::Timestamp::from_second(at.0) {
        Ok(t) => t.to_string(),
        Err(_) => format!("@{}", at.0),
    }
}

/// A time relative to `now`: `5m ago`, `in 2h`; `-` when absent.
pub fn relative(at: Option<UnixTime>, now: UnixTime) -> String {
    match at {
        Some(UnixTime(seconds)) if seconds <= now.0 => {
            format!("{} ago", duration::format(now.0.abs_diff(seconds)))
        }
        Some(UnixTime(seconds)) => format!("in {}", duration::format(seconds.abs_diff(now.0))),
        None => NONE.to_owned(),
    }
}

/// A time both ways: `2024-05-01T12:00:00Z (5m ago)`; `-` when absent.
pub fn time_and_relative(at: Option<UnixTime>, now: UnixTime) -> String {
    match at {
        Some(t) => format!("{} ({})", time(t), relative(at, now)),
        None => NONE.to_owned(),
    }
}

/// An IPv4 address and the IPv6 one that goes with it, if any.
fn both(v4: std::net::Ipv4Addr, v6: Option<std::net::Ipv6Addr>) -> String {
    match v6 {
        Some(v6) => format!("{v4} {v6}"),
        None => v4.to_string(),
    }
}

/// `network list` and `network create`.
pub fn networks(networks: &[Network]) -> String {
    let mut table = Table::new(&["NAME", "CIDR", "NODES", "ONLINE", "VERSION", "CREATED"]);
    for network in networks {
        table.row([
            or_none(network.name.clone()),
            match network.cidr6 {
                Some(v6) => format!("{} {v6}", network.cidr),
                None => network.cidr.to_string(),
            },
            network.nodes.to_string(),
            network.online.to_string(),
            network.version.to_string(),
            time(network.created_at),
        ]);
    }
    table.to_string()
}

/// How many times a token was used, out of how many: `1/5`, or `3/-` without a limit.
fn token_uses(used: u64, uses: Option<u64>) -> String {
    match uses {
        Some(limit) => format!("{used}/{limit}"),
        None => format!("{used}/{NONE}"),
    }
}

/// When a token expires, relative to now; `never` when it does not.
fn token_expiry(expires_at: Option<UnixTime>, now: UnixTime) -> String {
    match expires_at {
        Some(_) => relative(expires_at, now),
        None => "never".to_owned(),
    }
}

/// `token list`.
pub fn tokens(tokens: &[Token], now: UnixTime) -> String {
    let mut table = Table::new(&["ID", "NETWORK", "TAGS", "USES", "EXPIRES", "STATE"]);
    for token in tokens {
        let state = if token.revoked {
            "revoked"
        } else if token.expired {
            "expired"
        } else {
            "active"
        };
        table.row([
            token.id.to_string(),
            or_none(token.network.clone()),
            list(&token.tags),
            token_uses(token.used, token.uses),
            token_expiry(token.expires_at, now),
            state.to_owned(),
        ]);
    }
    table.to_string()
}

/// `token create`: the token's fields, a blank line, and the token text alone on the last
/// line, so that both a reader and `tail -n 1` find it.
pub fn created_token(token: &CreatedToken, now: UnixTime) -> String {
    let expires = match token.expires_at {
        Some(_) => time_and_relative(token.expires_at, now),
        None => "never".to_owned(),
    };
    let mut fields = Fields::new();
    fields
        .field("ID", token.id.to_string())
        .field("NETWORK", or_none(token.network.clone()))
        .field("TAGS", list(&token.tags))
        .field("EXPIRES", expires)
        .field("USES", token_uses(token.used, token.uses));
    format!("{fields}\n{}\n", clean(&token.token))
}

/// A node's state in one word. An external node has no session, so whether it is up is not
/// known here: `-`.
fn node_state(node: &Node) -> &'static str {
    if node.expired_at.is_some() {
        "expired"
    } else if node.revoked {
        "revoked"
    } else if node.via.is_some() {
        NONE
    } else if node.online {
        "yes"
    } else {
        "no"
    }
}

/// `node list`. VIA is an external node's gateway (`-` for a node with an agent).
pub fn nodes(nodes: &[Node], now: UnixTime) -> String {
    let mut table = Table::new(&[
        "NAME",
        "ID",
        "NETWORK",
        "ADDRESS",
        "VIA",
        "ONLINE",
        "LAST SEEN",
        "EXPIRES",
        "ENDPOINTS",
        "PATHS",
        "LABELS",
    ]);
    for node in nodes {
        table.row([
            or_none(node.name.clone()),
            node.id.to_string(),
            or_none(node.network.clone()),
            node.address.to_string(),
            or_none(node.via.clone().unwrap_or_default()),
            node_state(node).to_owned(),
            relative(node.last_seen, now),
            expires(node, now),
            endpoints(&node.endpoints),
            path_counts(node.paths.as_ref().map(|p| p.peers.as_slice())),
            labels(&node.labels),
        ]);
    }
    table.to_string()
}

/// When a node away expires: `in 3d`, `due` (the coordinator's next look revokes it),
/// `expired` (revoked for staying away), `-` (it does not: expiry off, online, revoked).
fn expires(node: &Node, now: UnixTime) -> String {
    match (node.expired_at, node.expires_at) {
        (Some(_), _) => "expired".to_owned(),
        (None, Some(at)) if at.0 <= now.0 => "due".to_owned(),
        (None, Some(at)) => relative(Some(at), now),
        (None, None) => NONE.to_owned(),
    }
}

/// `node show`, `node revoke` and `node rotate-key`.
pub fn node(node: &Node, now: UnixTime) -> String {
    let mut fields = Fields::new();
    fields
        .field("NAME", or_none(node.name.clone()))
        .field("ID", node.id.to_string())
        .field("NETWORK", or_none(node.network.clone()))
        .field("ADDRESS", both(node.address, node.address6));
    if let Some(gateway) = &node.via {
        fields.field(
            "VIA",
            format!("{gateway} (external: a device with stock WireGuard, reached through it)"),
        );
    }
    fields
        .field("PUBLIC KEY", node.public_key.to_base64())
        .field("ONLINE", node_state(node))
        .field("LAST SEEN", time_and_relative(node.last_seen, now))
        .field("ENDPOINTS", endpoints(&node.endpoints))
        .field("TAGS", list(&node.tags))
        .field("LABELS", labels(&node.labels))
        .field("CREATED", time(node.created_at));
    if node.key_since.is_some() {
        fields.field("KEY SINCE", time_and_relative(node.key_since, now));
    }
    if let Some(next) = node.next_key {
        fields.field(
            "NEXT KEY",
            format!(
                "{} (peers accept both until the node switches)",
                next.to_base64()
            ),
        );
    }
    if node.rotation_asked.is_some() {
        fields.field(
            "ROTATION",
            format!(
                "asked {}, waiting for the node",
                relative(node.rotation_asked, now)
            ),
        );
    }
    match (node.expired_at, node.expires_at) {
        (Some(at), _) => {
            fields.field("EXPIRED", time_and_relative(Some(at), now));
        }
        (None, Some(at)) => {
            fields.field("EXPIRES", time_and_relative(Some(at), now));
        }
        (None, None) => {}
    }
    if let Some(paths) = &node.paths {
        fields.field(
            "PATHS",
            format!(
                "{} (reported {})",
                peer_paths(&paths.peers),
                time_and_relative(Some(paths.reported_at), now)
            ),
        );
    }
    fields.to_string()
}

/// How many of a node's peers it reaches each way, as its last report said: `2 direct, 1
/// relay/tcp`; `-` without a report (`node show` names them).
fn path_counts(peers: Option<&[PeerPath]>) -> String {
    let Some(peers) = peers.filter(|p| !p.is_empty()) else {
        return NONE.to_owned();
    };
    let kinds = [
        ("direct", PathKind::Direct, None),
        ("relay/udp", PathKind::Relay, Some(RelayTransport::Udp)),
        ("relay/tcp", PathKind::Relay, Some(RelayTransport::Tcp)),
        ("relay", PathKind::Relay, None),
        ("unconfirmed", PathKind::Unconfirmed, None),
        ("none", PathKind::None, None),
    ];
    kinds
        .iter()
        .filter_map(|(label, kind, over)| {
            let n = peers
                .iter()
                .filter(|p| p.kind == *kind && (*kind != PathKind::Relay || p.over == *over))
                .count();
            (n > 0).then(|| format!("{n} {label}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A node's paths to its peers: `vm-b direct 203.0.113.7:51820 1.2 ms, vm-c relay
/// 198.51.100.5:7443/tcp`.
fn peer_paths(peers: &[PeerPath]) -> String {
    if peers.is_empty() {
        return "-".into();
    }
    peers
        .iter()
        .map(|p| {
            let name = p
                .peer_name
                .clone()
                .unwrap_or_else(|| format!("#{}", p.peer));
            let kind = match p.kind {
                PathKind::Direct => "direct",
                PathKind::Relay => "relay",
                PathKind::Unconfirmed => "unconfirmed",
                PathKind::None => "none",
            };
            let mut s = format!("{name} {kind}");
            if let Some(relay) = &p.relay {
                s.push_str(&format!(" {}", clean(relay)));
            }
            if let Some(via) = p.via {
                s.push_str(&format!(" {via}"));
            }
            match p.over {
                Some(RelayTransport::Udp) => s.push_str("/udp"),
                Some(RelayTransport::Tcp) => s.push_str("/tcp"),
                None => {}
            }
            if let Some(us) = p.rtt_us {
                s.push_str(&format!(" {:.1} ms", us as f64 / 1000.0));
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A node named by a workload: its name, or `#ID (deleted)` when it no longer exists.
fn node_name(node: &WorkloadNode) -> String {
    match &node.name {
        Some(name) if !name.is_empty() => name.clone(),
        _ => format!("#{} (deleted)", node.id),
    }
}

/// An optional node as cell text.
fn maybe_node(node: Option<&WorkloadNode>) -> String {
    node.map_or_else(|| NONE.to_owned(), node_name)
}

/// Nodes as cell text, in order.
fn node_names(nodes: &[WorkloadNode]) -> String {
    or_none(nodes.iter().map(node_name).collect::<Vec<_>>().join(","))
}

/// `workload list`.
pub fn workloads(workloads: &[Workload]) -> String {
    let mut table = Table::new(&[
        "NAME",
        "NETWORK",
        "ADDRESS",
        "HOLDER",
        "GENERATION",
        "STATE",
        "STANDBY",
    ]);
    for w in workloads {
        table.row([
            or_none(w.name.clone()),
            or_none(w.network.clone()),
            w.address.to_string(),
            maybe_node(w.holder.as_ref()),
            w.generation.to_string(),
            w.state.to_string(),
            node_names(&w.standby),
        ]);
    }
    table.to_string()
}

/// `workload show` and `workload create`.
pub fn workload(w: &Workload, now: UnixTime) -> String {
    let mut fields = Fields::new();
    fields
        .field("NAME", or_none(w.name.clone()))
        .field("NETWORK", or_none(w.network.clone()))
        .field("ADDRESS", both(w.address, w.address6))
        .field("STATE", w.state.as_str())
        .field("HOLDER", maybe_node(w.holder.as_ref()))
        .field("GENERATION", w.generation.to_string())
        .field("PREVIOUS", maybe_node(w.previous.as_ref()))
        .field("STANDBY", node_names(&w.standby))
        .field("ALLOWED", node_names(&w.allowed))
        .field("TAGS", list(&w.tags))
        .field("MOVED", time_and_relative(w.moved_at, now))
        .field("CREATED", time(w.created_at));
    fields.to_string()
}

/// `admin-token list`.
pub fn admin_tokens(tokens: &[AdminToken], now: UnixTime) -> String {
    let mut table = Table::new(&["ID", "NAME", "ROLE", "NETWORK", "CREATED BY", "STATE"]);
    for t in tokens {
        let state = match t.revoked_at {
            Some(_) => format!("revoked {}", relative(t.revoked_at, now)),
            None => "active".to_owned(),
        };
        table.row([
            t.id.to_string(),
            t.name.clone(),
            t.role.to_string(),
            t.network.clone().unwrap_or_else(|| "(all)".to_owned()),
            t.created_by.clone(),
            state,
        ]);
    }
    table.to_string()
}

/// `admin-token create`: the fields, a blank line, the secret alone on the last line.
pub fn created_admin_token(t: &CreatedAdminToken) -> String {
    let mut fields = Fields::new();
    fields
        .field("ID", t.admin_token.id.to_string())
        .field("NAME", t.admin_token.name.clone())
        .field("ROLE", t.admin_token.role.to_string())
        .field(
            "NETWORK",
            t.admin_token
                .network
                .clone()
                .unwrap_or_else(|| "(all)".to_owned()),
        );
    format!("{fields}\n{}\n", clean(&t.token))
}

/// `audit`.
pub fn audit(entries: &[AuditEntry]) -> String {
    let mut table = Table::new(&[
        "TIME", "ACTOR", "ACTION", "NETWORK", "NODE", "STATUS", "RESULT",
    ]);
    for e in entries {
        table.row([
            time(e.at),
            e.actor.clone(),
            e.action.clone(),
            or_none(e.network.clone().unwrap_or_default()),
            or_none(e.node.clone().unwrap_or_default()),
            e.status.to_string(),
            e.result.clone(),
        ]);
    }
    table.to_string()
}

/// `policy get`: the version's fields, a blank line, and the file as it was set.
pub fn policy(p: &PolicyVersion) -> String {
    let mut fields = Fields::new();
    fields
        .field("NETWORK", or_none(p.network.clone()))
        .field("VERSION", p.version.to_string())
        .field("RULES", p.rules.to_string())
        .field("AUTHOR", or_none(p.author.clone()))
        .field("SET", time(p.created_at))
        .field(
            "RESTORED",
            p.restored
                .map_or(NONE.to_owned(), |v| format!("version {v}")),
        );
    match &p.source {
        // The file is the operator's own text; still no control characters but newlines.
        Some(source) => {
            let lines: Vec<String> = source.lines().map(clean).collect();
            format!("{fields}\n{}\n", lines.join("\n"))
        }
        None => format!("{fields}\nno policy: every flow in the network is allowed\n"),
    }
}

/// `policy history`.
pub fn policy_history(versions: &[PolicyVersion]) -> String {
    let mut table = Table::new(&["VERSION", "RULES", "AUTHOR", "SET", "NOTE"]);
    for p in versions {
        let note = match (&p.source, p.restored) {
            (None, _) => "cleared (open)".to_owned(),
            (Some(_), Some(v)) => format!("rollback to version {v}"),
            (Some(_), None) => NONE.to_owned(),
        };
        table.row([
            p.version.to_string(),
            p.rules.to_string(),
            or_none(p.author.clone()),
            time(p.created_at),
            note,
        ]);
    }
    table.to_string()
}

/// `policy set`, `policy rollback` and `policy clear`: one line, then warnings.
pub fn policy_changed(c: &PolicyChanged) -> String {
    let mut out = match c.policy.source {
        Some(_) => format!(
            "policy version {} of network {} in force ({} rule{}, map version {})\n",
            c.policy.version,
            clean(&c.policy.network),
            c.policy.rules,
            if c.policy.rules == 1 { "" } else { "s" },
            c.map_version.0
        ),
        None => format!(
            "policy cleared in network {} (version {}): every flow is allowed\n",
            clean(&c.policy.network),
            c.policy.version
        ),
    };
    for w in &c.warnings {
        out.push_str(&format!("warning: {}\n", clean(w)));
    }
    out
}

/// `policy test`: the verdict, and the rule that decided it.
pub fn verdict(v: &FlowVerdict) -> String {
    let mut out = format!("{}\n", clean(&v.reason));
    if let Some(r) = &v.rule {
        out.push_str(&format!(
            "rule {} (line {}): from {} to {} ports {}\n",
            r.number,
            r.line,
            list(&r.from),
            list(&r.to),
            list(&r.ports)
        ));
    }
    out
}

/// Which change of holder was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `workload attach`.
    Attach,
    /// `workload move`.
    Move,
    /// `workload migrate`.
    Migrate,
    /// `workload detach`.
    Detach,
}

/// Milliseconds as `12.4 ms`.
fn millis(ms: f64) -> String {
    format!("{ms:.1} ms")
}

/// `workload attach`, `move` and `detach`: one line saying what happened, for example
/// `chat moved to vm-c (generation 3) in 12.4 ms (destination ready in 3.1 ms)`.
pub fn moved(reply: &MovedWorkload, change: Change) -> String {
    let w = &reply.workload;
    let name = or_none(w.name.clone());
    let generation = w.generation;
    let took = format!(" in {}", millis(reply.took_ms));
    let holder = maybe_node(w.holder.as_ref());
    let line = match (change, reply.changed) {
        (Change::Attach | Change::Move | Change::Migrate, true) => {
            let verb = match change {
                Change::Attach => "attached",
                Change::Migrate => "migrated",
                _ => "moved",
            };
            let readiness = match (reply.prepared_ms, w.state) {
                (Some(ms), _) => format!(" (destination ready in {})", millis(ms)),
                (None, WorkloadState::HolderOffline) => format!(" ({holder} is offline)"),
                (None, WorkloadState::Held) => {
                    " (destination did not report ready in time)".to_owned()
                }
                (None, WorkloadState::Detached) => String::new(),
            };
            let handover = reply
                .handed_over_ms
                .map(|ms| format!(" (application handed over in {})", millis(ms)))
                .unwrap_or_default();
            format!(
                "{name} {verb} to {holder} (generation {generation}){took}{readiness}{handover}"
            )
        }
        (Change::Attach | Change::Move | Change::Migrate, false) => {
            format!("{name} is already held by {holder} (generation {generation})")
        }
        (Change::Detach, true) => match &w.previous {
            Some(previous) => format!(
                "{name} detached from {} (generation {generation}){took}",
                node_name(previous)
            ),
            None => format!("{name} detached (generation {generation}){took}"),
        },
        (Change::Detach, false) => {
            format!("{name} is already detached (generation {generation})")
        }
    };
    format!("{}\n", clean(&line))
}

/// `workload claim`: `claimed chat (generation 4) in 2.0 ms`.
pub fn claimed(name: &str, generation: u64, took: Duration) -> String {
    let ms = took.as_secs_f64() * 1000.0;
    format!(
        "claimed {} (generation {generation}) in {}\n",
        clean(name),
        millis(ms)
    )
}

/// What an external device's configuration that went to a file follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChange {
    /// `node add-external`.
    Registered,
    /// `node rotate-key --new-key`.
    NewKey,
    /// `node external-config`: nothing changed.
    None,
}

/// `node add-external --out FILE` and the like: one line, for example `external node phone
/// registered: 100.64.0.7 in prod, through vm-a at 203.0.113.10:51820; its WireGuard
/// configuration is in phone.conf`.
pub fn device_config_saved(
    external: &ExternalNode,
    change: DeviceChange,
    endpoint: &impl fmt::Display,
    path: &Path,
) -> String {
    let node = &external.node;
    let what = match change {
        DeviceChange::Registered => " registered",
        DeviceChange::NewKey => " has a new key",
        DeviceChange::None => "",
    };
    let line = format!(
        "external node {}{what}: {} in {}, through {} at {endpoint}; its WireGuard \
         configuration is in {}",
        or_none(node.name.clone()),
        node.address,
        or_none(node.network.clone()),
        or_none(external.gateway.name.clone()),
        path.display(),
    );
    format!("{}\n", clean(&line))
}

/// `status`.
pub fn status(status: &Status) -> String {
    let mut fields = Fields::new();
    fields
        .field("VERSION", or_none(status.version.clone()))
        .field("UPTIME", duration::format(status.uptime_secs))
        .field("NETWORKS", status.networks.to_string())
        .field("NODES", status.nodes.to_string())
        .field("ONLINE", status.online.to_string())
        .field("QUIC LISTEN", status.quic_listen.to_string())
        .field("ADVERTISE", or_none(status.advertise.clone()))
        .field("FINGERPRINT", or_none(status.fingerprint.clone()));
    for c in &status.coordinators {
        let sessions = match c.sessions {
            1 => "1 session".to_string(),
            n => format!("{n} sessions"),
        };
        let state = if c.up { "up" } else { "down" };
        fields.field("COORDINATOR", format!("{}  {state}  {sessions}", c.address));
    }
    fields.to_string()
}

/// `relay list`: the coordinator's own relay first, then the standalone relays it vouches for,
/// then (a mesh of several) the coordinators as relays, in the order agents are told of them.
pub fn relays(relays: &Relays) -> String {
    let mut table = Table::new(&[
        "NAME", "KIND", "ADDRESS", "OVER", "REGION", "PROVIDER", "STATE",
    ]);
    let embedded = &relays.embedded;
    table.row([
        NONE.to_owned(),
        "embedded".to_owned(),
        or_none(embedded.addr.clone()),
        transports(&embedded.transports),
        NONE.to_owned(),
        NONE.to_owned(),
        if embedded.on { "on" } else { "off" }.to_owned(),
    ]);
    let listed = (relays.standalone.iter().map(|r| (r, "standalone")))
        .chain(relays.coordinators.iter().map(|r| (r, "coordinator")));
    for (relay, kind) in listed {
        table.row([
            or_none(relay.name.clone()),
            kind.to_owned(),
            or_none(relay.addr.clone()),
            transports(&relay.transports),
            or_none(relay.region.clone().unwrap_or_default()),
            or_none(relay.provider.clone().unwrap_or_default()),
            if relay.granted {
                "granted"
            } else {
                "not granted"
            }
            .to_owned(),
        ]);
    }
    table.to_string()
}

/// Transports as `udp,tcp`; `-` for none.
fn transports(over: &[RelayTransport]) -> String {
    let names: Vec<&str> = over
        .iter()
        .map(|t| match t {
            RelayTransport::Udp => "udp",
            RelayTransport::Tcp => "tcp",
        })
        .collect();
    or_none(names.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    /// 2024-05-01T12:00:00Z.
    const NOW: UnixTime = UnixTime(1_714_564_800);

    /// An answer as the coordinator would send it, read into its type.
    fn answer<T: DeserializeOwned>(json: serde_json::Value) -> T {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn table_aligns_columns_without_trailing_space() {
        let mut table = Table::new(&["NAME", "ADDRESS", "LABELS"]);
        table.row(["web-1", "100.64.0.1", ""]);
        table.row(["db", "100.64.0.20", "role=db"]);
        assert_eq!(
            table.to_string(),
            "NAME   ADDRESS      LABELS\n\
             web-1  100.64.0.1\n\
             db     100.64.0.20  role=db\n"
        );
    }

    #[test]
    fn empty_table_is_its_header() {
        assert_eq!(Table::new(&["A", "B"]).to_string(), "A  B\n");
    }

    #[test]
    fn short_rows_are_padded_and_long_rows_cut() {
        let mut table = Table::new(&["A", "B"]);
        table.row(["1"]).row(["x", "y", "z"]);
        assert_eq!(table.to_string(), "A  B\n1\nx  y\n");
    }

    #[test]
    fn cells_cannot_drive_the_terminal() {
        let mut table = Table::new(&["NAME"]);
        table.row(["evil\x1b[2J\nline"]);
        assert_eq!(table.to_string(), "NAME\nevil?[2J?line\n");
    }

    #[test]
    fn columns_are_as_wide_as_the_terminal_shows_them() {
        let mut table = Table::new(&["N", "X"]);
        table.row(["é", "1"]);
        assert_eq!(table.to_string(), "N  X\né  1\n");
        let mut table = Table::new(&["N", "X"]);
        table.row(["日本", "1"]);
        assert_eq!(table.to_string(), "N     X\n日本  1\n");
    }

    #[test]
    fn long_cells_are_not_wrapped() {
        let long = "x".repeat(500);
        let mut table = Table::new(&["A", "B"]);
        table.row([long.as_str(), "1"]);
        assert_eq!(
            table.to_string(),
            format!("A{}B\n{long}  1\n", " ".repeat(501))
        );
    }

    #[test]
    fn fields_cannot_drive_the_terminal() {
        let mut fields = Fields::new();
        fields.field("NAME\r", "a\x1b]0;title\x07\nb\tc");
        assert_eq!(fields.to_string(), "NAME?  a?]0;title??b?c\n");
        assert_eq!(Fields::new().to_string(), "");
    }

    #[test]
    fn fields_align_names() {
        let mut fields = Fields::new();
        fields
            .field("ID", "n1")
            .field("PUBLIC KEY", "abc=")
            .field("EMPTY", "");
        assert_eq!(
            fields.to_string(),
            "ID          n1\nPUBLIC KEY  abc=\nEMPTY\n"
        );
    }

    #[test]
    fn lists_as_cells() {
        assert_eq!(endpoints(&[]), "-");
        assert_eq!(
            endpoints(&[
                "1.2.3.4:51820".parse().unwrap(),
                "[::1]:51820".parse().unwrap()
            ]),
            "1.2.3.4:51820,[::1]:51820"
        );
        let map = BTreeMap::from([
            ("zone".to_owned(), "eu".to_owned()),
            ("role".to_owned(), "db".to_owned()),
        ]);
        assert_eq!(labels(&map), "role=db,zone=eu");
        assert_eq!(labels(&BTreeMap::new()), "-");
        assert_eq!(list(&[]), "-");
        assert_eq!(list(&["a".into(), "b".into()]), "a,b");
    }

    #[test]
    fn times_in_utc() {
        assert_eq!(time(NOW), "2024-05-01T12:00:00Z");
        assert_eq!(time(UnixTime(0)), "1970-01-01T00:00:00Z");
        assert_eq!(time(UnixTime(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(time(UnixTime(951_868_800)), "2000-03-01T00:00:00Z");
        assert_eq!(time(UnixTime(4_107_542_399)), "2100-02-28T23:59:59Z");
        assert_eq!(time(UnixTime(4_107_542_400)), "2100-03-01T00:00:00Z");
        assert_eq!(time(UnixTime(-86_400)), "1969-12-31T00:00:00Z");
        assert_eq!(time(UnixTime(-62_135_596_800)), "0001-01-01T00:00:00Z");
        assert_eq!(time(UnixTime(i64::MAX)), "@9223372036854775807");
        assert_eq!(time(UnixTime(i64::MIN)), "@-9223372036854775808");
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(Some(UnixTime(NOW.0 - 90)), NOW), "1m30s ago");
        assert_eq!(relative(Some(NOW), NOW), "0s ago");
        assert_eq!(relative(Some(UnixTime(NOW.0 + 7_200)), NOW), "in 2h");
        assert_eq!(relative(None, NOW), "-");
        assert_eq!(
            relative(Some(UnixTime(i64::MIN)), UnixTime(i64::MAX)),
            "18446744073709551615s ago"
        );
        assert_eq!(
            time_and_relative(Some(UnixTime(NOW.0 - 300)), NOW),
            "2024-05-01T11:55:00Z (5m ago)"
        );
        assert_eq!(time_and_relative(None, NOW), "-");
    }

    fn sample_nodes() -> Vec<Node> {
        answer(json!([
            {"id": 1, "name": "web-1", "network": "prod", "address": "100.64.0.1",
             "public_key": "QgEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
             "labels": {"role": "web"}, "tags": ["web"], "endpoints": ["203.0.113.5:51820"],
             "online": true, "last_seen": NOW.0 - 5, "revoked": false, "created_at": NOW.0},
            {"id": 2, "name": "db", "network": "prod", "address": "100.64.0.2",
             "public_key": "QgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
             "labels": {}, "tags": [], "endpoints": [], "online": false, "last_seen": null,
             "revoked": true, "created_at": NOW.0},
            {"id": 3, "name": "phone", "network": "prod", "address": "100.64.0.3",
             "public_key": "QgMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=",
             "labels": {}, "tags": ["mobile"], "endpoints": [], "online": false,
             "last_seen": null, "revoked": false, "created_at": NOW.0, "via": "web-1"},
        ]))
    }

    #[test]
    fn paths_name_the_peer_the_kind_the_address_and_the_transport() {
        let peers = vec![
            PeerPath {
                relay: None,
                peer: meshlink_api::NodeId(2),
                peer_name: Some("vm-b".into()),
                kind: PathKind::Direct,
                via: Some("203.0.113.7:51820".parse().unwrap()),
                over: None,
                rtt_us: Some(1234),
                changed_secs_ago: Some(4),
            },
            PeerPath {
                relay: Some("r1\u{1b}[2J".into()),
                peer: meshlink_api::NodeId(3),
                peer_name: None,
                kind: PathKind::Relay,
                via: Some("198.51.100.5:7443".parse().unwrap()),
                over: Some(RelayTransport::Tcp),
                rtt_us: None,
                changed_secs_ago: None,
            },
        ];
        assert_eq!(
            peer_paths(&peers),
            "vm-b direct 203.0.113.7:51820 1.2 ms, #3 relay r1?[2J 198.51.100.5:7443/tcp"
        );
        assert_eq!(peer_paths(&[]), "-");
        assert_eq!(path_counts(Some(&peers)), "1 direct, 1 relay/tcp");
        assert_eq!(path_counts(Some(&[])), "-");
        assert_eq!(path_counts(None), "-");
    }

    #[test]
    fn node_table() {
        assert_eq!(
            nodes(&sample_nodes(), NOW),
            "NAME   ID  NETWORK  ADDRESS     VIA    ONLINE   LAST SEEN  EXPIRES  ENDPOINTS          PATHS  LABELS\n\
             web-1  1   prod     100.64.0.1  -      yes      5s ago     -        203.0.113.5:51820  -      role=web\n\
             db     2   prod     100.64.0.2  -      revoked  -          -        -                  -      -\n\
             phone  3   prod     100.64.0.3  web-1  -        -          -        -                  -      -\n"
        );
    }

    #[test]
    fn nodes_away_show_when_they_expire_and_rotations_show_both_keys() {
        let list: Vec<Node> = answer(json!([
            {"id": 3, "name": "away", "network": "prod", "address": "100.64.0.3",
             "public_key": "QgMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=",
             "labels": {}, "tags": [], "endpoints": [], "online": false,
             "last_seen": NOW.0 - 86_400, "revoked": false, "created_at": NOW.0 - 90_000,
             "key_since": NOW.0 - 90_000, "expires_at": NOW.0 + 2 * 86_400,
             "next_key": "QgQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=",
             "rotation_asked": NOW.0 - 60},
            {"id": 4, "name": "late", "network": "prod", "address": "100.64.0.4",
             "public_key": "QgQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=",
             "labels": {}, "tags": [], "endpoints": [], "online": false,
             "last_seen": NOW.0 - 86_400, "revoked": false, "created_at": NOW.0 - 90_000,
             "expires_at": NOW.0 - 1},
            {"id": 5, "name": "gone", "network": "prod", "address": "100.64.0.5",
             "public_key": "QgUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU=",
             "labels": {}, "tags": [], "endpoints": [], "online": false,
             "last_seen": NOW.0 - 86_400, "revoked": true, "created_at": NOW.0 - 90_000,
             "expired_at": NOW.0 - 10},
        ]));
        let table = nodes(&list, NOW);
        let expiry: Vec<&str> = table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().nth(8).unwrap())
            .collect();
        assert_eq!(expiry, ["in", "due", "expired"], "{table}");
        assert!(table.lines().nth(1).unwrap().contains("in 2d"), "{table}");
        assert!(
            table.lines().nth(3).unwrap().contains(" expired "),
            "{table}"
        );
        let shown = node(&list[0], NOW);
        assert!(shown.contains("NEXT KEY    QgQEBAQE"), "{shown}");
        assert!(shown.contains("ROTATION    asked 1m ago"), "{shown}");
        assert!(
            shown.contains("EXPIRES     2024-05-03T12:00:00Z (in 2d)"),
            "{shown}"
        );
        assert!(shown.contains("KEY SINCE   "), "{shown}");
        assert!(node(&list[2], NOW).contains("EXPIRED "));
    }

    #[test]
    fn node_fields() {
        assert_eq!(
            node(&sample_nodes()[0], NOW),
            "NAME        web-1\n\
             ID          1\n\
             NETWORK     prod\n\
             ADDRESS     100.64.0.1\n\
             PUBLIC KEY  QgEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n\
             ONLINE      yes\n\
             LAST SEEN   2024-05-01T11:59:55Z (5s ago)\n\
             ENDPOINTS   203.0.113.5:51820\n\
             TAGS        web\n\
             LABELS      role=web\n\
             CREATED     2024-05-01T12:00:00Z\n"
        );
        // An external node names its gateway; whether it is up is not known.
        let shown = node(&sample_nodes()[2], NOW);
        assert!(
            shown.contains(
                "\nVIA         web-1 (external: a device with stock WireGuard, reached through it)\n"
            ),
            "{shown}"
        );
        assert!(shown.contains("\nONLINE      -\n"), "{shown}");
        let revoked = Node {
            revoked: true,
            ..sample_nodes().remove(2)
        };
        assert!(node(&revoked, NOW).contains("\nONLINE      revoked\n"));
    }

    #[test]
    fn device_config_saved_names_the_node_the_gateway_and_the_file() {
        let external: ExternalNode = answer(json!({
            "node": sample_nodes().remove(2),
            "network_cidr": "100.64.0.0/16",
            "gateway": {"id": 1, "name": "web-1\u{1b}[2J",
                        "public_key": "QgEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                        "address": "100.64.0.1", "endpoints": [], "online": true}
        }));
        let endpoint = "203.0.113.5:51820";
        let path = Path::new("/tmp/phone.conf");
        assert_eq!(
            device_config_saved(&external, DeviceChange::Registered, &endpoint, path),
            "external node phone registered: 100.64.0.3 in prod, through web-1?[2J at \
             203.0.113.5:51820; its WireGuard configuration is in /tmp/phone.conf\n"
        );
        assert!(
            device_config_saved(&external, DeviceChange::NewKey, &endpoint, path)
                .starts_with("external node phone has a new key: 100.64.0.3 in prod")
        );
        assert!(
            device_config_saved(&external, DeviceChange::None, &endpoint, path)
                .starts_with("external node phone: 100.64.0.3 in prod")
        );
    }

    #[test]
    fn relay_table() {
        let list: Relays = answer(json!({
            "embedded": {"on": true, "addr": "coord.example:7443", "transports": ["udp", "tcp"]},
            "standalone": [
                {"name": "eu-1", "addr": "relay-eu-1.example:7450", "transports": ["udp", "tcp"],
                 "fingerprint": "3f", "region": "eu-west", "provider": "hetzner",
                 "granted": true},
                {"name": "us\u{1b}[2J", "addr": "198.51.100.9:7450", "transports": ["udp", "tcp"],
                 "fingerprint": "4e", "region": null, "provider": null, "granted": true},
            ],
            "coordinators": [
                {"name": "coordinator-2", "addr": "coord-b.example:7443",
                 "transports": ["udp", "tcp"], "fingerprint": "ab", "region": null,
                 "provider": null, "granted": true},
            ]
        }));
        assert_eq!(
            relays(&list),
            "NAME           KIND         ADDRESS                  OVER     REGION   PROVIDER  STATE\n\
             -              embedded     coord.example:7443       udp,tcp  -        -         on\n\
             eu-1           standalone   relay-eu-1.example:7450  udp,tcp  eu-west  hetzner   granted\n\
             us?[2J         standalone   198.51.100.9:7450        udp,tcp  -        -         granted\n\
             coordinator-2  coordinator  coord-b.example:7443     udp,tcp  -        -         granted\n"
        );
        let off: Relays = answer(json!({
            "embedded": {"on": false, "addr": "coord.example:7443", "transports": []},
            "standalone": [
                {"name": "eu-1", "addr": "relay-eu-1.example:7450", "transports": ["udp", "tcp"],
                 "fingerprint": "3f", "region": "eu-west", "provider": null, "granted": false},
            ]
        }));
        assert_eq!(
            relays(&off),
            "NAME  KIND        ADDRESS                  OVER     REGION   PROVIDER  STATE\n\
             -     embedded    coord.example:7443       -        -        -         off\n\
             eu-1  standalone  relay-eu-1.example:7450  udp,tcp  eu-west  -         not granted\n"
        );
    }

    #[test]
    fn token_table_and_creation() {
        let list: Vec<Token> = answer(json!([
            {"id": 1, "network": "prod", "tags": ["web"], "expires_at": NOW.0 + 3_600,
             "uses": 1, "used": 0, "revoked": false, "expired": false, "created_at": NOW.0},
            {"id": 2, "network": "prod", "tags": [], "expires_at": null, "uses": null,
             "used": 4, "revoked": true, "expired": false, "created_at": NOW.0},
            {"id": 3, "network": "lab", "tags": [], "expires_at": NOW.0 - 60, "uses": null,
             "used": 0, "revoked": false, "expired": true, "created_at": NOW.0 - 120},
        ]));
        assert_eq!(
            tokens(&list, NOW),
            "ID  NETWORK  TAGS  USES  EXPIRES  STATE\n\
             1   prod     web   0/1   in 1h    active\n\
             2   prod     -     4/-   never    revoked\n\
             3   lab      -     0/-   1m ago   expired\n"
        );
        let created: CreatedToken = answer(json!(
            {"id": 1, "token": "mlj1_secret", "network": "prod", "tags": ["web"],
             "expires_at": NOW.0 + 3_600, "uses": 1, "used": 0}
        ));
        assert_eq!(
            created_token(&created, NOW),
            "ID       1\n\
             NETWORK  prod\n\
             TAGS     web\n\
             EXPIRES  2024-05-01T13:00:00Z (in 1h)\n\
             USES     0/1\n\
             \n\
             mlj1_secret\n"
        );
    }

    fn sample_workloads() -> Vec<Workload> {
        answer(json!([
            {"name": "chat", "network": "prod", "address": "100.64.0.9",
             "holder": {"id": 3, "name": "vm-c"}, "generation": 3,
             "previous": {"id": 1, "name": null}, "state": "held",
             "standby": [{"id": 4, "name": "vm-d"}, {"id": 5, "name": "vm-e"}],
             "allowed": [{"id": 3, "name": "vm-c"}], "tags": ["app"],
             "created_at": NOW.0 - 3_600, "moved_at": NOW.0 - 60},
            {"name": "db", "network": "prod", "address": "100.64.0.10", "holder": null,
             "generation": 0, "previous": null, "state": "detached", "standby": [],
             "allowed": [], "created_at": NOW.0, "moved_at": null},
        ]))
    }

    #[test]
    fn workload_table() {
        assert_eq!(
            workloads(&sample_workloads()),
            "NAME  NETWORK  ADDRESS      HOLDER  GENERATION  STATE     STANDBY\n\
             chat  prod     100.64.0.9   vm-c    3           held      vm-d,vm-e\n\
             db    prod     100.64.0.10  -       0           detached  -\n"
        );
    }

    #[test]
    fn workload_fields() {
        assert_eq!(
            workload(&sample_workloads()[0], NOW),
            "NAME        chat\n\
             NETWORK     prod\n\
             ADDRESS     100.64.0.9\n\
             STATE       held\n\
             HOLDER      vm-c\n\
             GENERATION  3\n\
             PREVIOUS    #1 (deleted)\n\
             STANDBY     vm-d,vm-e\n\
             ALLOWED     vm-c\n\
             TAGS        app\n\
             MOVED       2024-05-01T11:59:00Z (1m ago)\n\
             CREATED     2024-05-01T11:00:00Z\n"
        );
    }

    /// The answer to a change of holder: `sample_workloads()[0]` with these fields changed.
    fn moved_reply(changes: serde_json::Value) -> MovedWorkload {
        let mut json = serde_json::to_value(&sample_workloads()[0]).unwrap();
        json["prepared_ms"] = serde_json::Value::Null;
        for (key, value) in changes.as_object().unwrap() {
            json[key] = value.clone();
        }
        answer(json)
    }

    #[test]
    fn changes_of_holder_in_one_line() {
        // The cases the real router cannot be made to answer on cue: a destination that
        // reported ready, and one that did not in time. `tests/admin.rs` runs the others
        // against a real coordinator.
        let held = moved_reply(json!({"changed": true, "prepared_ms": 3.12, "took_ms": 12.44}));
        assert_eq!(
            moved(&held, Change::Move),
            "chat moved to vm-c (generation 3) in 12.4 ms (destination ready in 3.1 ms)\n"
        );
        let silent = moved_reply(json!({"changed": true, "took_ms": 501.0}));
        assert_eq!(
            moved(&silent, Change::Attach),
            "chat attached to vm-c (generation 3) in 501.0 ms \
             (destination did not report ready in time)\n"
        );
        let detached = moved_reply(json!({
            "holder": null, "previous": null, "state": "detached", "changed": true,
            "took_ms": 1.23,
        }));
        assert_eq!(
            moved(&detached, Change::Detach),
            "chat detached (generation 3) in 1.2 ms\n"
        );
    }

    #[test]
    fn claims_in_one_line() {
        assert_eq!(
            claimed("chat", 4, Duration::from_micros(2_040)),
            "claimed chat (generation 4) in 2.0 ms\n"
        );
    }

    #[test]
    fn status_fields() {
        let answer: Status = answer(json!({
            "version": "0.1.0", "networks": 1, "nodes": 3, "online": 2, "uptime_secs": 93_784,
            "quic_listen": "0.0.0.0:7443", "advertise": "198.51.100.1:7443",
            "fingerprint": "sha256:ab",
            "coordinators": [
                {"address": "198.51.100.1:7443", "sessions": 2, "up": true},
                {"address": "198.51.100.2:7443", "sessions": 1, "up": false},
            ],
        }));
        assert_eq!(
            status(&answer),
            "VERSION      0.1.0\n\
             UPTIME       1d2h\n\
             NETWORKS     1\n\
             NODES        3\n\
             ONLINE       2\n\
             QUIC LISTEN  0.0.0.0:7443\n\
             ADVERTISE    198.51.100.1:7443\n\
             FINGERPRINT  sha256:ab\n\
             COORDINATOR  198.51.100.1:7443  up  2 sessions\n\
             COORDINATOR  198.51.100.2:7443  down  1 session\n"
        );
    }
}
