//! The operator's policy file (TOML) -> [`PolicyFile`].
//!
//! The file is parsed once into toml's spanned document ([`toml::de::DeTable`]), then walked by
//! hand rather than through `serde`: every value keeps its byte span, so that every error names
//! the line of the offending value and its field path (`rule[2].ports[1]`, indices 1-based),
//! and an unknown key anywhere is refused by name.
//!
//! ```toml
//! [[rule]]
//! description = "web servers reach the database"   # optional
//! from = ["tag:web"]
//! to = ["tag:db", "workload:chat"]
//! ports = ["tcp:5432", "udp:53", "icmp"]
//!
//! [[test]]
//! from = "vm-a"            # a node or workload name; node:NAME / workload:NAME disambiguate
//! to = "chat"
//! port = "tcp:7070"
//! expect = "allow"         # or "deny"
//! ```
//!
//! When a file has several problems, the one nearest its start is reported.

use std::ops::Range;
use std::str::FromStr;

use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

use super::{valid_name, FlowPort, Policy, Ports, Rule, Selector};

/// The largest policy file accepted, in bytes.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// The most `[[rule]]` tables in one file.
pub const MAX_RULES: usize = 10_000;
/// The most `[[test]]` tables in one file.
pub const MAX_TESTS: usize = 1_000;
/// The most entries of one `from`, `to` or `ports` array.
pub const MAX_ENTRIES: usize = 256;

/// A parsed policy file: its rules and the flows it asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    /// The rules, in file order.
    pub rules: Vec<Rule>,
    /// The `[[test]]` flows, in file order.
    pub tests: Vec<FlowTest>,
}

/// One `[[test]]` of a policy file: a flow that must be allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowTest {
    /// The line where the test starts.
    pub line: u32,
    /// The source, as written (`vm-a`, `node:vm-a`, `workload:chat`).
    pub from: String,
    /// The destination, as written.
    pub to: String,
    /// The flow's protocol and port.
    pub port: super::FlowPort,
    /// Whether the flow must be allowed (`expect = "allow"`) or denied (`"deny"`).
    pub allow: bool,
}

/// Why a policy file was refused: the line and field at fault, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {field}: {message}")]
pub struct PolicyError {
    /// The line (1-based) of the offending value.
    pub line: u32,
    /// The field (`rule[2].ports[1]`, `test[1].expect`, ...).
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Parses a policy file.
///
/// # Errors
/// [`PolicyError`] naming the line and field of the first problem: a TOML syntax error (field
/// `toml`), an unknown key, a value of the wrong type, a missing or empty `from`/`to`/`ports`,
/// a selector or port that does not parse, or a limit exceeded ([`MAX_FILE_BYTES`],
/// [`MAX_RULES`], [`MAX_TESTS`], [`MAX_ENTRIES`]).
pub fn parse(text: &str) -> Result<PolicyFile, PolicyError> {
    let lines = Lines::new(text);
    if text.len() > MAX_FILE_BYTES {
        return Err(lines.error(
            MAX_FILE_BYTES,
            "file".to_string(),
            format!(
                "the file is {} bytes; a policy file is at most {MAX_FILE_BYTES} bytes (1 MiB)",
                text.len()
            ),
        ));
    }
    let doc = DeTable::parse(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        lines.error(at, "toml".to_string(), e.message().to_string())
    })?;

    let mut file = PolicyFile {
        rules: Vec::new(),
        tests: Vec::new(),
    };
    // Problems are kept by position so that the one nearest the start of the file wins, however
    // the document's keys are ordered.
    let mut first: Option<Problem> = None;
    for (key, value) in by_position(doc.get_ref()) {
        let name: &str = key.get_ref();
        let outcome = match name {
            "rule" => tables(value, "rule", MAX_RULES, "rules").map(|items| {
                for (i, (table, span)) in items.into_iter().enumerate() {
                    match rule(table, span.start, i + 1) {
                        Ok(body) => file.rules.push(Rule {
                            line: lines.line(span.start),
                            ..body
                        }),
                        Err(p) => keep_first(&mut first, p),
                    }
                }
            }),
            "test" => tables(value, "test", MAX_TESTS, "tests").map(|items| {
                for (i, (table, span)) in items.into_iter().enumerate() {
                    match test(table, span.start, i + 1) {
                        Ok(t) => file.tests.push(FlowTest {
                            line: lines.line(span.start),
                            ..t
                        }),
                        Err(p) => keep_first(&mut first, p),
                    }
                }
            }),
            other => Err(Problem::new(
                key.span().start,
                other,
                format!("unknown key {other:?}: a policy file has [[rule]] and [[test]] tables"),
            )),
        };
        if let Err(p) = outcome {
            keep_first(&mut first, p);
        }
    }
    match first {
        Some(p) => Err(lines.error(p.at, p.field, p.message)),
        None => Ok(file),
    }
}

impl PolicyFile {
    /// The rules as version `version` of the network's policy.
    pub fn into_policy(self, version: u64) -> Policy {
        Policy {
            version,
            rules: self.rules,
        }
    }
}

/// One problem, at a byte offset; becomes a [`PolicyError`] once its line is known.
#[derive(Debug)]
struct Problem {
    at: usize,
    field: String,
    message: String,
}

impl Problem {
    fn new(at: usize, field: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            at,
            field: field.into(),
            message: message.into(),
        }
    }
}

fn keep_first(first: &mut Option<Problem>, p: Problem) {
    if first.as_ref().is_none_or(|f| p.at < f.at) {
        *first = Some(p);
    }
}

/// Byte offsets -> 1-based line numbers.
struct Lines {
    /// The offset where each line after the first starts.
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Lines {
        let scanned = &text.as_bytes()[..text.len().min(MAX_FILE_BYTES + 1)];
        let starts = scanned
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'\n')
            .map(|(i, _)| i + 1)
            .collect();
        Lines { starts }
    }

    fn line(&self, at: usize) -> u32 {
        let n = self.starts.partition_point(|&s| s <= at) + 1;
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn error(&self, at: usize, field: String, message: String) -> PolicyError {
        PolicyError {
            line: self.line(at),
            field,
            message,
        }
    }
}

/// A table's entries in the order they appear in the file.
fn by_position<'a, 'i>(
    table: &'a DeTable<'i>,
) -> Vec<(
    &'a Spanned<std::borrow::Cow<'i, str>>,
    &'a Spanned<DeValue<'i>>,
)> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    entries
}

/// The tables of an array of tables (`[[rule]]`), with the span of each one's header.
fn tables<'a, 'i>(
    value: &'a Spanned<DeValue<'i>>,
    key: &str,
    max: usize,
    what: &str,
) -> Result<Vec<(&'a DeTable<'i>, Range<usize>)>, Problem> {
    let DeValue::Array(items) = value.get_ref() else {
        return Err(Problem::new(
            value.span().start,
            key,
            format!(
                "expected [[{key}]] tables, found {}",
                value.get_ref().type_str()
            ),
        ));
    };
    if let Some(extra) = items.get(max) {
        return Err(Problem::new(
            extra.span().start,
            format!("{key}[{}]", max + 1),
            format!("too many {what}: a policy file has at most {max}"),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.get_ref() {
            DeValue::Table(t) => Ok((t, item.span())),
            other => Err(Problem::new(
                item.span().start,
                format!("{key}[{}]", i + 1),
                format!("expected a [[{key}]] table, found {}", other.type_str()),
            )),
        })
        .collect()
}

/// The body of `[[rule]]` number `n` (its line is filled in by the caller).
fn rule(table: &DeTable<'_>, header: usize, n: usize) -> Result<Rule, Problem> {
    let mut from = None;
    let mut to = None;
    let mut ports = None;
    for (key, value) in by_position(table) {
        let name: &str = key.get_ref();
        let field = format!("rule[{n}].{name}");
        match name {
            "description" => {
                string(value, &field)?;
            }
            "from" => from = Some(list::<Selector>(value, &field, "selector")?),
            "to" => to = Some(list::<Selector>(value, &field, "selector")?),
            "ports" => ports = Some(list::<Ports>(value, &field, "port")?),
            other => {
                return Err(Problem::new(
                    key.span().start,
                    field,
                    format!("unknown key {other:?}: a rule has description, from, to and ports"),
                ))
            }
        }
    }
    let missing = |what: &str| {
        Problem::new(
            header,
            format!("rule[{n}].{what}"),
            format!("missing: every rule needs from, to and ports (no {what} given)"),
        )
    };
    Ok(Rule {
        line: 0,
        from: from.ok_or_else(|| missing("from"))?,
        to: to.ok_or_else(|| missing("to"))?,
        ports: ports.ok_or_else(|| missing("ports"))?,
    })
}

/// The body of `[[test]]` number `n` (its line is filled in by the caller).
fn test(table: &DeTable<'_>, header: usize, n: usize) -> Result<FlowTest, Problem> {
    let mut from = None;
    let mut to = None;
    let mut port = None;
    let mut allow = None;
    for (key, value) in by_position(table) {
        let name: &str = key.get_ref();
        let field = format!("test[{n}].{name}");
        match name {
            "from" => from = Some(party(value, &field)?),
            "to" => to = Some(party(value, &field)?),
            "port" => {
                let s = string(value, &field)?;
                let p = FlowPort::from_str(s)
                    .map_err(|e| Problem::new(value.span().start, &field, e.0))?;
                port = Some(p);
            }
            "expect" => {
                allow = Some(match string(value, &field)? {
                    "allow" => true,
                    "deny" => false,
                    other => {
                        return Err(Problem::new(
                            value.span().start,
                            field,
                            format!("{other:?}: expected \"allow\" or \"deny\""),
                        ))
                    }
                })
            }
            other => {
                return Err(Problem::new(
                    key.span().start,
                    field,
                    format!("unknown key {other:?}: a test has from, to, port and expect"),
                ))
            }
        }
    }
    let missing = |what: &str| {
        Problem::new(
            header,
            format!("test[{n}].{what}"),
            format!("missing: every test needs from, to, port and expect (no {what} given)"),
        )
    };
    Ok(FlowTest {
        line: 0,
        from: from.ok_or_else(|| missing("from"))?,
        to: to.ok_or_else(|| missing("to"))?,
        port: port.ok_or_else(|| missing("port"))?,
        allow: allow.ok_or_else(|| missing("expect"))?,
    })
}

/// A string value.
fn string<'a>(value: &'a Spanned<DeValue<'_>>, field: &str) -> Result<&'a str, Problem> {
    match value.get_ref() {
        DeValue::String(s) => Ok(s),
        other => Err(Problem::new(
            value.span().start,
            field,
            format!("expected a string, found {}", other.type_str()),
        )),
    }
}

/// A test's `from` or `to`: one node or workload, by name (`NAME`, `node:NAME`,
/// `workload:NAME`). Whether anybody has that name is for [`PolicyFile::run_tests`].
fn party(value: &Spanned<DeValue<'_>>, field: &str) -> Result<String, Problem> {
    let s = string(value, field)?;
    let name = match s.split_once(':') {
        None => s,
        Some(("node" | "workload", name)) => name,
        Some(_) => {
            return Err(Problem::new(
                value.span().start,
                field,
                format!(
                    "{s:?}: a test names one node or workload: \"NAME\", \"node:NAME\" or \
                     \"workload:NAME\""
                ),
            ))
        }
    };
    if !valid_name(name) {
        return Err(Problem::new(
            value.span().start,
            field,
            format!("{s:?}: a name is 1 to 63 of a-z, 0-9, '-', '_' and '.'"),
        ));
    }
    Ok(s.to_string())
}

/// A non-empty array of at most [`MAX_ENTRIES`] strings, each parsed as a `T`.
fn list<T: FromStr<Err = super::SyntaxError>>(
    value: &Spanned<DeValue<'_>>,
    field: &str,
    what: &str,
) -> Result<Vec<T>, Problem> {
    let items: &DeArray<'_> = match value.get_ref() {
        DeValue::Array(a) => a,
        other => {
            return Err(Problem::new(
                value.span().start,
                field,
                format!("expected an array of {what}s, found {}", other.type_str()),
            ))
        }
    };
    if items.is_empty() {
        return Err(Problem::new(
            value.span().start,
            field,
            format!("empty: give at least one {what}"),
        ));
    }
    if let Some(extra) = items.get(MAX_ENTRIES) {
        return Err(Problem::new(
            extra.span().start,
            format!("{field}[{}]", MAX_ENTRIES + 1),
            format!("too many entries: an array has at most {MAX_ENTRIES}"),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = format!("{field}[{}]", i + 1);
            let s = string(item, &field)?;
            T::from_str(s).map_err(|e| Problem::new(item.span().start, field, e.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"# a comment
[[rule]]
description = "web servers reach the database"
from = ["tag:web"]
to = ["tag:db", "workload:chat"]
ports = ["tcp:5432", "udp:53", "icmp"]

[[test]]
from = "vm-a"
to = "workload:chat"
port = "tcp:7070"
expect = "deny"

[[rule]]
from = ["*"]
to = [
  "node:vm-b",
]
ports = ["tcp:8000-8100"]
"#;

    fn err(text: &str) -> PolicyError {
        parse(text).expect_err("the file should be refused")
    }

    fn at(e: &PolicyError, line: u32, field: &str, needle: &str) {
        assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
        assert!(e.message.contains(needle), "{e}");
    }

    #[test]
    fn parses_rules_and_tests_in_order_with_lines() {
        let f = parse(GOOD).unwrap();
        assert_eq!(f.rules.len(), 2);
        let r = &f.rules[0];
        assert_eq!(r.line, 2);
        assert_eq!(r.from, vec![Selector::Tag("web".into())]);
        assert_eq!(
            r.to,
            vec![
                Selector::Tag("db".into()),
                Selector::Workload("chat".into())
            ]
        );
        assert_eq!(
            r.ports,
            vec![Ports::Tcp(5432, 5432), Ports::Udp(53, 53), Ports::Icmp]
        );
        assert_eq!(f.rules[1].line, 14);
        assert_eq!(f.rules[1].from, vec![Selector::Any]);
        assert_eq!(f.rules[1].to, vec![Selector::Node("vm-b".into())]);
        assert_eq!(
            f.tests,
            vec![FlowTest {
                line: 8,
                from: "vm-a".into(),
                to: "workload:chat".into(),
                port: FlowPort {
                    proto: super::super::ip_proto::TCP,
                    port: 7070
                },
                allow: false,
            }]
        );
        let p = f.into_policy(7);
        assert_eq!((p.version, p.rules.len()), (7, 2));
        assert_eq!(parse("").unwrap().rules, vec![]);
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let e = err("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"*\"]\ncolour = \"red\"\n");
        at(&e, 5, "rule[1].colour", "unknown key \"colour\"");
        let e =
            err("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"*\"]\n[[rule]]\n[rule.x]\n");
        at(&e, 6, "rule[2].x", "unknown key");
        let e = err("version = 3\n");
        at(&e, 1, "version", "unknown key \"version\"");
        let e = err(
            "[[test]]\nfrom = \"a\"\nto = \"b\"\nport = \"icmp\"\nexpect = \"deny\"\nwhy = 1\n",
        );
        at(&e, 6, "test[1].why", "unknown key");
    }

    #[test]
    fn bad_selectors_and_ports_reuse_their_messages() {
        let e = err("[[rule]]\nfrom = [\"tag:web\",\n  \"web\"]\nto = [\"*\"]\nports = [\"*\"]\n");
        at(&e, 3, "rule[1].from[2]", "is not a selector");
        let e = err("[[rule]]\nfrom = [\"*\"]\nto = [\"host:x\"]\nports = [\"*\"]\n");
        at(&e, 3, "rule[1].to[1]", "unknown selector kind");
        let e = err("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"*\"]\n\n[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:80\", \"tcp:9-1\"]\n");
        at(&e, 9, "rule[2].ports[2]", "runs backwards");
        let e = err("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"sctp:1\"]\n");
        at(&e, 4, "rule[1].ports[1]", "is not a port");
        let e = err("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [80]\n");
        at(
            &e,
            4,
            "rule[1].ports[1]",
            "expected a string, found integer",
        );
        let e = err("[[test]]\nfrom = \"a\"\nto = \"b\"\nport = \"tcp:x\"\nexpect = \"deny\"\n");
        at(&e, 4, "test[1].port", "is not a flow");
        let e = err("[[test]]\nfrom = \"a\"\nto = \"b\"\nport = \"icmp\"\nexpect = \"maybe\"\n");
        at(&e, 5, "test[1].expect", "expected \"allow\" or \"deny\"");
        let e =
            err("[[test]]\nfrom = \"tag:web\"\nto = \"b\"\nport = \"icmp\"\nexpect = \"deny\"\n");
        at(&e, 2, "test[1].from", "one node or workload");
        let e = err("[[test]]\nfrom = \"a\"\nto = \"B\"\nport = \"icmp\"\nexpect = \"deny\"\n");
        at(&e, 3, "test[1].to", "a name is");
    }

    #[test]
    fn arrays_must_be_given_non_empty_and_short() {
        let e = err("[[rule]]\nfrom = [\"*\"]\nto = []\nports = [\"*\"]\n");
        at(&e, 3, "rule[1].to", "empty");
        let e = err("[[rule]]\nfrom = [\"*\"]\nports = [\"*\"]\n");
        at(&e, 1, "rule[1].to", "missing");
        let e = err("[[rule]]\nfrom = \"*\"\nto = [\"*\"]\nports = [\"*\"]\n");
        at(
            &e,
            2,
            "rule[1].from",
            "expected an array of selectors, found string",
        );
        let e = err("[[test]]\nfrom = \"a\"\nto = \"b\"\nport = \"icmp\"\n");
        at(&e, 1, "test[1].expect", "missing");
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("\"tcp:{i}\"")).collect();
        let text = format!(
            "[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\n{}\n]\n",
            many.join(",\n")
        );
        at(
            &err(&text),
            5 + MAX_ENTRIES as u32,
            "rule[1].ports[257]",
            "at most 256",
        );
        let e = err("rule = 3\n");
        at(&e, 1, "rule", "expected [[rule]] tables, found integer");
        let e = err("[rule]\nfrom = [\"*\"]\n");
        at(&e, 1, "rule", "expected [[rule]] tables, found table");
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let e = err("[[rule]]\nfrom = [\"*\"\nto = [\"*\"]\n");
        // A newline may continue an array: the missing comma is found on line 3.
        assert_eq!((e.line, e.field.as_str()), (3, "toml"), "{e}");
        let e = err("\n\n[[rule]]\nfrom = [\"*\"]\nfrom = [\"*\"]\n");
        assert_eq!((e.line, e.field.as_str()), (5, "toml"), "{e}");
        assert!(e.to_string().starts_with("line 5: toml: "), "{e}");
    }

    #[test]
    fn limits_are_enforced() {
        let one = "[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"*\"]\n";
        let text = one.repeat(MAX_RULES + 1);
        at(
            &err(&text),
            4 * MAX_RULES as u32 + 1,
            "rule[10001]",
            "at most 10000",
        );
        assert_eq!(
            parse(&one.repeat(MAX_RULES)).unwrap().rules.len(),
            MAX_RULES
        );
        let t = "[[test]]\nfrom = \"a\"\nto = \"b\"\nport = \"icmp\"\nexpect = \"deny\"\n";
        at(
            &err(&t.repeat(MAX_TESTS + 1)),
            5 * MAX_TESTS as u32 + 1,
            "test[1001]",
            "at most 1000",
        );
        let big = format!("{one}{}", "#".repeat(MAX_FILE_BYTES));
        at(&err(&big), 5, "file", "at most 1048576 bytes");
    }

    #[test]
    fn the_example_file_parses() {
        let f = parse(include_str!("../../../configs/policy.example.toml")).unwrap();
        assert_eq!((f.rules.len(), f.tests.len()), (5, 3));
        assert!(f.rules.iter().all(|r| r.line > 1));
    }

    #[test]
    fn the_first_problem_in_the_file_is_reported() {
        // `test` sorts after `rule` but comes first in the file.
        let e = err("[[test]]\nfrom = \"a\"\nto = \"b\"\nport = \"x\"\nexpect = \"deny\"\n[[rule]]\nfrom = []\n");
        at(&e, 4, "test[1].port", "is not a flow");
        // Within a table, keys in file order, not in sorted order.
        let e = err("[[rule]]\nto = []\nfrom = []\nports = [\"*\"]\n");
        at(&e, 2, "rule[1].to", "empty");
    }
}
