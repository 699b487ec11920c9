//! Rendering for `-o table`: aligned tables, field listings, and the cells inside them.
//!
//! Every function here is pure: it is given the answer and the current time (unix seconds)
//! and returns text, so the tests pin the output exactly. Lists become a [`Table`] with a
//! header row; single objects become a [`Fields`] listing, one `NAME  value` per line.
//!
//! # Security
//!
//! Cells come from the coordinator, which relays names and labels that agents chose. Control
//! characters in them are replaced by `?` so that no cell can move the cursor, recolour the
//! terminal or forge extra lines.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use crate::client::{MovedWorkload, Network, Node, NodeName, Status, Token, Workload};
use crate::duration;

/// Columns are separated by this many spaces.
const GAP: usize = 2;

/// What an empty or absent cell shows.
const NONE: &str = "-";

/// A table with a header row; columns are as wide as their widest cell. The last column is
/// not padded, so no line ends in spaces.
#[derive(Debug, Clone, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| clean(h)).collect()],
        }
    }

    /// Adds a row; missing cells are blank and extra cells are dropped.
    pub fn row<I, S>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let columns = self.rows[0].len();
        let mut row: Vec<String> = cells.into_iter().map(|c| clean(c.as_ref())).collect();
        row.resize(columns, String::new());
        self.rows.push(row);
        self
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let columns = self.rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|row| width(&row[i]))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str(&" ".repeat(GAP));
                }
                line.push_str(cell);
                if i + 1 < columns {
                    line.push_str(&" ".repeat(widths[i] - width(cell)));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// One object as `NAME  value` lines, names aligned.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    rows: Vec<(String, String)>,
}

impl Fields {
    /// An empty listing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a line.
    pub fn field(&mut self, name: &str, value: impl AsRef<str>) -> &mut Self {
        self.rows.push((clean(name), clean(value.as_ref())));
        self
    }
}

impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_width = self.rows.iter().map(|(n, _)| width(n)).max().unwrap_or(0);
        for (name, value) in &self.rows {
            let pad = " ".repeat(name_width - width(name) + GAP);
            writeln!(f, "{}", format!("{name}{pad}{value}").trim_end())?;
        }
        Ok(())
    }
}

/// Display width of a cell; one column per character is close enough for names and
/// addresses.
fn width(cell: &str) -> usize {
    cell.chars().count()
}

/// Replaces control characters, which could drive the terminal, with `?`.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A JSON value as cell text: strings bare, lists joined with `,`, objects as `key=value`
/// pairs, and `null` or empty as `-`.
pub fn value(json: &Value) -> String {
    let text = match json {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(value).collect::<Vec<_>>().join(","),
        Value::Object(fields) => fields
            .iter()
            .map(|(k, v)| format!("{k}={}", value(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    or_none(text)
}

/// A list of strings as cell text.
pub fn list(items: &[String]) -> String {
    or_none(items.join(","))
}

/// `-` for empty text.
fn or_none(text: String) -> String {
    if text.is_empty() {
        NONE.to_owned()
    } else {
        text
    }
}

/// Reads a time that came as unix seconds (a number or a string of digits) or RFC 3339 text.
pub fn unix_seconds(json: &Value) -> Option<i64> {
    match json {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f.floor() as i64)),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        Value::String(s) => parse_rfc3339(s),
        _ => None,
    }
}

/// A time as `2024-05-01T12:00:00Z`; text that is not a time is shown as it came.
pub fn time(json: &Value) -> String {
    match unix_seconds(json) {
        Some(seconds) => format_utc(seconds),
        None => value(json),
    }
}

/// A time relative to `now`: `5m ago`, `in 2h`; `-` when absent.
pub fn relative(json: &Value, now: i64) -> String {
    match unix_seconds(json) {
        Some(seconds) if seconds <= now => {
            format!("{} ago", duration::format(now.abs_diff(seconds)))
        }
        Some(seconds) => format!("in {}", duration::format(seconds.abs_diff(now))),
        None => value(json),
    }
}

/// A time both ways: `2024-05-01T12:00:00Z (5m ago)`; `-` when absent.
pub fn time_and_relative(json: &Value, now: i64) -> String {
    match unix_seconds(json) {
        Some(_) => format!("{} ({})", time(json), relative(json, now)),
        None => value(json),
    }
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
fn format_utc(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3_600,
        of_day % 3_600 / 60,
        of_day % 60
    )
}

/// Parses `YYYY-MM-DD(T| )HH:MM:SS[.fraction](Z|±HH:MM)` into unix seconds, dropping the
/// fraction.
fn parse_rfc3339(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let number = |from: usize, to: usize| -> Option<i64> {
        let part = bytes.get(from..to)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    let at = |i: usize, allowed: &[u8]| bytes.get(i).is_some_and(|b| allowed.contains(b));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    if !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if civil_from_days(days) != (year, month, day) {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    let offset = match rest.as_bytes() {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let (hours, minutes) = (two(*h1, *h2)?, two(*m1, *m2)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 3_600 + minutes * 60;
            if *sign == b'-' {
                -offset
            } else {
                offset
            }
        }
        _ => return None,
    };
    // A leap second is shown as the last second of its minute.
    let second = second.min(59);
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second - offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date. Years are counted from March so that
/// the leap day falls at the end of the counting year.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day counted from 1970-01-01; the inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `network list` and `network create`.
pub fn networks(networks: &[Network]) -> String {
    let mut table = Table::new(&["NAME", "CIDR", "NODES", "ONLINE", "VERSION", "CREATED"]);
    for network in networks {
        table.row([
            or_none(network.name.clone()),
            or_none(network.cidr.clone()),
            network.nodes.to_string(),
            network.online.to_string(),
            or_none(network.version.clone()),
            time(&network.created_at),
        ]);
    }
    table.to_string()
}

/// How many times a token was used, out of how many: `1/5`, or `3/-` without a limit.
fn token_uses(token: &Token) -> String {
    match token.uses {
        Some(limit) => format!("{}/{limit}", token.used),
        None => format!("{}/{NONE}", token.used),
    }
}

/// When a token expires, relative to now; `never` when it does not.
fn token_expiry(token: &Token, now: i64) -> String {
    if token.expires_at.is_null() {
        "never".to_owned()
    } else {
        relative(&token.expires_at, now)
    }
}

/// `token list`.
pub fn tokens(tokens: &[Token], now: i64) -> String {
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
            or_none(token.id.clone()),
            or_none(token.network.clone()),
            list(&token.tags),
            token_uses(token),
            token_expiry(token, now),
            state.to_owned(),
        ]);
    }
    table.to_string()
}

/// `token create`: the token's fields, a blank line, and the token text alone on the last
/// line, so that both a reader and `tail -n 1` find it.
pub fn created_token(token: &Token, secret: &str, now: i64) -> String {
    let expires = if token.expires_at.is_null() {
        "never".to_owned()
    } else {
        time_and_relative(&token.expires_at, now)
    };
    let mut fields = Fields::new();
    fields
        .field("ID", or_none(token.id.clone()))
        .field("NETWORK", or_none(token.network.clone()))
        .field("TAGS", list(&token.tags))
        .field("EXPIRES", expires)
        .field("USES", token_uses(token));
    format!("{fields}\n{}\n", clean(secret))
}

/// A node's state in one word.
fn node_state(node: &Node) -> &'static str {
    if node.revoked {
        "revoked"
    } else if node.online {
        "yes"
    } else {
        "no"
    }
}

/// `node list`.
pub fn nodes(nodes: &[Node], now: i64) -> String {
    let mut table = Table::new(&[
        "NAME",
        "ID",
        "NETWORK",
        "ADDRESS",
        "ONLINE",
        "LAST SEEN",
        "ENDPOINTS",
        "LABELS",
    ]);
    for node in nodes {
        table.row([
            or_none(node.name.clone()),
            or_none(node.id.clone()),
            or_none(node.network.clone()),
            or_none(node.address.clone()),
            node_state(node).to_owned(),
            relative(&node.last_seen, now),
            value(&node.endpoints),
            value(&node.labels),
        ]);
    }
    table.to_string()
}

/// `node show` and `node revoke`.
pub fn node(node: &Node, now: i64) -> String {
    let mut fields = Fields::new();
    fields
        .field("NAME", or_none(node.name.clone()))
        .field("ID", or_none(node.id.clone()))
        .field("NETWORK", or_none(node.network.clone()))
        .field("ADDRESS", or_none(node.address.clone()))
        .field("PUBLIC KEY", or_none(node.public_key.clone()))
        .field("ONLINE", node_state(node))
        .field("LAST SEEN", time_and_relative(&node.last_seen, now))
        .field("ENDPOINTS", value(&node.endpoints))
        .field("TAGS", list(&node.tags))
        .field("LABELS", value(&node.labels))
        .field("CREATED", time(&node.created_at));
    fields.to_string()
}

/// A node named by a workload: its name, or `#ID (deleted)` when it no longer exists.
fn node_name(node: &NodeName) -> String {
    match &node.name {
        Some(name) if !name.is_empty() => name.clone(),
        _ => format!("#{} (deleted)", node.id),
    }
}

/// An optional node as cell text.
fn maybe_node(node: Option<&NodeName>) -> String {
    node.map_or_else(|| NONE.to_owned(), node_name)
}

/// Nodes as cell text, in order.
fn node_names(nodes: &[NodeName]) -> String {
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
            or_none(w.address.clone()),
            maybe_node(w.holder.as_ref()),
            or_none(w.generation.clone()),
            or_none(w.state.clone()),
            node_names(&w.standby),
        ]);
    }
    table.to_string()
}

/// `workload show` and `workload create`.
pub fn workload(w: &Workload, now: i64) -> String {
    let mut fields = Fields::new();
    fields
        .field("NAME", or_none(w.name.clone()))
        .field("NETWORK", or_none(w.network.clone()))
        .field("ADDRESS", or_none(w.address.clone()))
        .field("STATE", or_none(w.state.clone()))
        .field("HOLDER", maybe_node(w.holder.as_ref()))
        .field("GENERATION", or_none(w.generation.clone()))
        .field("PREVIOUS", maybe_node(w.previous.as_ref()))
        .field("STANDBY", node_names(&w.standby))
        .field("ALLOWED", node_names(&w.allowed))
        .field("MOVED", time_and_relative(&w.moved_at, now))
        .field("CREATED", time(&w.created_at));
    fields.to_string()
}

/// Which change of holder was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `workload attach`.
    Attach,
    /// `workload move`.
    Move,
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
    let generation = or_none(w.generation.clone());
    let took = reply
        .took_ms
        .map(|ms| format!(" in {}", millis(ms)))
        .unwrap_or_default();
    let holder = maybe_node(w.holder.as_ref());
    let line = match (change, reply.changed) {
        (Change::Attach | Change::Move, true) => {
            let verb = if change == Change::Attach {
                "attached"
            } else {
                "moved"
            };
            let readiness = match (reply.prepared_ms, w.state.as_str()) {
                (Some(ms), _) => format!(" (destination ready in {})", millis(ms)),
                (None, "holder-offline") => format!(" ({holder} is offline)"),
                (None, "held") => " (destination did not report ready in time)".to_owned(),
                (None, _) => String::new(),
            };
            format!("{name} {verb} to {holder} (generation {generation}){took}{readiness}")
        }
        (Change::Attach | Change::Move, false) => {
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

/// `status`.
pub fn status(status: &Status) -> String {
    let mut fields = Fields::new();
    fields
        .field("VERSION", or_none(status.version.clone()))
        .field("UPTIME", duration::format(status.uptime_secs))
        .field("NETWORKS", status.networks.to_string())
        .field("NODES", status.nodes.to_string())
        .field("ONLINE", status.online.to_string())
        .field("QUIC LISTEN", or_none(status.quic_listen.clone()))
        .field("ADVERTISE", value(&status.advertise))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// 2024-05-01T12:00:00Z.
    const NOW: i64 = 1_714_564_800;

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
    fn wide_characters_count_as_one_column() {
        let mut table = Table::new(&["N", "X"]);
        table.row(["é", "1"]);
        assert_eq!(table.to_string(), "N  X\né  1\n");
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
    fn values_as_cells() {
        assert_eq!(value(&Value::Null), "-");
        assert_eq!(value(&json!("")), "-");
        assert_eq!(value(&json!([])), "-");
        assert_eq!(
            value(&json!(["1.2.3.4:51820", "[::1]:51820"])),
            "1.2.3.4:51820,[::1]:51820"
        );
        assert_eq!(
            value(&json!({"role": "db", "zone": "eu"})),
            "role=db,zone=eu"
        );
        assert_eq!(value(&json!(42)), "42");
        assert_eq!(list(&[]), "-");
    }

    #[test]
    fn times_in_both_encodings() {
        assert_eq!(time(&json!(NOW)), "2024-05-01T12:00:00Z");
        assert_eq!(time(&json!("1714564800")), "2024-05-01T12:00:00Z");
        assert_eq!(time(&json!("2024-05-01T12:00:00Z")), "2024-05-01T12:00:00Z");
        assert_eq!(
            time(&json!("2024-05-01T14:00:00.123456+02:00")),
            "2024-05-01T12:00:00Z"
        );
        assert_eq!(
            time(&json!("2024-05-01 07:30:00-04:30")),
            "2024-05-01T12:00:00Z"
        );
        assert_eq!(time(&json!(0)), "1970-01-01T00:00:00Z");
        assert_eq!(time(&json!(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(time(&json!(-86_400)), "1969-12-31T00:00:00Z");
        assert_eq!(time(&Value::Null), "-");
        assert_eq!(time(&json!("yesterday")), "yesterday");
        assert_eq!(time(&json!("2023-02-29T00:00:00Z")), "2023-02-29T00:00:00Z");
        assert_eq!(unix_seconds(&json!("2023-02-29T00:00:00Z")), None);
        assert_eq!(unix_seconds(&json!("2024-05-01T12:00:00")), None);
    }

    #[test]
    fn calendar_round_trips() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(&json!(NOW - 90), NOW), "1m30s ago");
        assert_eq!(relative(&json!(NOW), NOW), "0s ago");
        assert_eq!(relative(&json!(NOW + 7_200), NOW), "in 2h");
        assert_eq!(relative(&Value::Null, NOW), "-");
        assert_eq!(
            time_and_relative(&json!("2024-05-01T11:55:00Z"), NOW),
            "2024-05-01T11:55:00Z (5m ago)"
        );
    }

    fn sample_nodes() -> Vec<Node> {
        serde_json::from_value(json!([
            {"id": "n_1", "name": "web-1", "network": "prod", "address": "100.64.0.1",
             "online": true, "last_seen": NOW - 5, "endpoints": ["203.0.113.5:51820"],
             "labels": {"role": "web"}},
            {"id": "n_2", "name": "db", "network": "prod", "address": "100.64.0.2",
             "online": false, "revoked": true, "last_seen": null, "endpoints": [],
             "labels": {}},
        ]))
        .unwrap()
    }

    #[test]
    fn node_table() {
        assert_eq!(
            nodes(&sample_nodes(), NOW),
            "NAME   ID   NETWORK  ADDRESS     ONLINE   LAST SEEN  ENDPOINTS          LABELS\n\
             web-1  n_1  prod     100.64.0.1  yes      5s ago     203.0.113.5:51820  role=web\n\
             db     n_2  prod     100.64.0.2  revoked  -          -                  -\n"
        );
    }

    #[test]
    fn node_fields() {
        let text = node(&sample_nodes()[0], NOW);
        assert!(
            text.starts_with("NAME        web-1\nID          n_1\n"),
            "{text}"
        );
        assert!(
            text.contains("LAST SEEN   2024-05-01T11:59:55Z (5s ago)\n"),
            "{text}"
        );
    }

    #[test]
    fn network_table() {
        let list: Vec<Network> = serde_json::from_value(json!([
            {"name": "prod", "cidr": "100.64.0.0/16", "version": 12, "nodes": 3, "online": 2,
             "created_at": "2024-04-01T00:00:00Z"},
        ]))
        .unwrap();
        assert_eq!(
            networks(&list),
            "NAME  CIDR           NODES  ONLINE  VERSION  CREATED\n\
             prod  100.64.0.0/16  3      2       12       2024-04-01T00:00:00Z\n"
        );
    }

    #[test]
    fn token_table_and_creation() {
        let list: Vec<Token> = serde_json::from_value(json!([
            {"id": "t1", "network": "prod", "tags": ["web"], "expires_at": NOW + 3_600,
             "uses": 1, "used": 0},
            {"id": "t2", "network": "prod", "tags": [], "expires_at": null, "used": 4,
             "revoked": true},
        ]))
        .unwrap();
        assert_eq!(
            tokens(&list, NOW),
            "ID  NETWORK  TAGS  USES  EXPIRES  STATE\n\
             t1  prod     web   0/1   in 1h    active\n\
             t2  prod     -     4/-   never    revoked\n"
        );
        let text = created_token(&list[0], "mlj1_secret", NOW);
        assert_eq!(text.lines().last(), Some("mlj1_secret"));
        assert!(
            text.contains("EXPIRES  2024-05-01T13:00:00Z (in 1h)\n"),
            "{text}"
        );
    }

    fn sample_workloads() -> Vec<Workload> {
        serde_json::from_value(json!([
            {"name": "chat", "network": "prod", "address": "100.64.0.9",
             "holder": {"id": 3, "name": "vm-c"}, "generation": 3,
             "previous": {"id": 1, "name": null}, "state": "held",
             "standby": [{"id": 4, "name": "vm-d"}, {"id": 5, "name": "vm-e"}],
             "allowed": [{"id": 3, "name": "vm-c"}],
             "created_at": NOW - 3_600, "moved_at": NOW - 60},
            {"name": "db", "network": "prod", "address": "100.64.0.10", "holder": null,
             "generation": 0, "previous": null, "state": "detached", "standby": [],
             "allowed": [], "created_at": NOW, "moved_at": null},
        ]))
        .unwrap()
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
             MOVED       2024-05-01T11:59:00Z (1m ago)\n\
             CREATED     2024-05-01T11:00:00Z\n"
        );
    }

    fn moved_reply(answer: Value) -> MovedWorkload {
        serde_json::from_value(answer).unwrap()
    }

    #[test]
    fn changes_of_holder_in_one_line() {
        let held = moved_reply(json!({
            "name": "chat", "holder": {"id": 3, "name": "vm-c"}, "generation": 3,
            "state": "held", "changed": true, "prepared_ms": 3.12, "took_ms": 12.44,
        }));
        assert_eq!(
            moved(&held, Change::Move),
            "chat moved to vm-c (generation 3) in 12.4 ms (destination ready in 3.1 ms)\n"
        );
        let offline = moved_reply(json!({
            "name": "chat", "holder": {"id": 1, "name": "vm-a"}, "generation": 1,
            "state": "holder-offline", "changed": true, "prepared_ms": null, "took_ms": 0.8,
        }));
        assert_eq!(
            moved(&offline, Change::Attach),
            "chat attached to vm-a (generation 1) in 0.8 ms (vm-a is offline)\n"
        );
        let silent = moved_reply(json!({
            "name": "chat", "holder": {"id": 1, "name": "vm-a"}, "generation": 2,
            "state": "held", "changed": true, "took_ms": 501.0,
        }));
        assert_eq!(
            moved(&silent, Change::Move),
            "chat moved to vm-a (generation 2) in 501.0 ms \
             (destination did not report ready in time)\n"
        );
        let same = moved_reply(json!({
            "name": "chat", "holder": {"id": 1, "name": "vm-a"}, "generation": 2,
            "state": "held", "changed": false, "took_ms": 0.1,
        }));
        assert_eq!(
            moved(&same, Change::Move),
            "chat is already held by vm-a (generation 2)\n"
        );
        let detached = moved_reply(json!({
            "name": "chat", "holder": null, "previous": {"id": 1, "name": "vm-a"},
            "generation": 3, "state": "detached", "changed": true, "took_ms": 1.23,
        }));
        assert_eq!(
            moved(&detached, Change::Detach),
            "chat detached from vm-a (generation 3) in 1.2 ms\n"
        );
        let again = MovedWorkload {
            changed: false,
            ..detached
        };
        assert_eq!(
            moved(&again, Change::Detach),
            "chat is already detached (generation 3)\n"
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
        let answer: Status = serde_json::from_value(json!({
            "version": "0.1.0", "networks": 1, "nodes": 3, "online": 2, "uptime_secs": 93_784,
            "quic_listen": "0.0.0.0:7443", "advertise": ["198.51.100.1:7443"],
            "fingerprint": "sha256:ab",
            "coordinators": [
                {"address": "198.51.100.1:7443", "sessions": 2, "up": true},
                {"address": "198.51.100.2:7443", "sessions": 1, "up": false},
            ],
        }))
        .unwrap();
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
