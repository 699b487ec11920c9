//! TOML errors as one line that says where and which key: the agent's and the coordinator's
//! configuration files both report a bad file this way.
//!
//! The `toml` crate names the key only in its unknown-field and missing-field messages; for the
//! others (a wrong type, a bad value) the key is taken from the line the error points at.

/// A TOML error located in its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlProblem {
    /// The 1-based line the error points at.
    pub line: usize,
    /// The error on one line, starting with the key when the line has a plain one.
    pub message: String,
}

/// Locates `err`, raised while reading `text`, and names its key.
pub fn describe(text: &str, err: &toml::de::Error) -> TomlProblem {
    let start = err.span().map_or(0, |s| s.start).min(text.len());
    let mut message = err
        .message()
        .trim()
        .replace('\n', " ")
        .replace("expected i64", "expected an integer");
    if !message.contains("field `") {
        if let Some(key) = key_on_line(text, start) {
            message = format!("{key}: {message}");
        }
    }
    TomlProblem {
        line: line_of(text.as_bytes(), start),
        message,
    }
}

/// The 1-based line of byte `offset` of `text` (the last line when past the end).
pub fn line_of(text: &[u8], offset: usize) -> usize {
    let end = offset.min(text.len());
    1 + text[..end].iter().filter(|b| **b == b'\n').count()
}

/// The key of the `key = value` line (or `[table]` header) holding byte `offset`, when it is
/// a plain key (letters, digits, `_`, `-`, dots).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        port: Option<u16>,
        name: Option<String>,
        #[serde(default)]
        limits: Limits,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limits {
        rate: Option<u64>,
    }

    fn problem(text: &str) -> TomlProblem {
        describe(text, &toml::from_str::<File>(text).unwrap_err())
    }

    #[test]
    fn a_bad_value_names_its_key_and_line() {
        let p = problem("name = \"a\"\nport = \"x\"\n");
        assert_eq!(p.line, 2);
        assert!(p.message.starts_with("port: "), "{}", p.message);
        assert!(!p.message.contains('\n'));
    }

    #[test]
    fn an_integer_is_called_an_integer_and_a_table_key_is_named() {
        let p = problem("[limits]\nrate = true\n");
        assert_eq!(p.line, 2);
        assert!(p.message.starts_with("rate: "), "{}", p.message);
        let p = problem("[limits]\nrate = -1\n");
        assert!(!p.message.contains("i64"), "{}", p.message);
    }

    #[test]
    fn unknown_fields_keep_the_crates_message_and_syntax_errors_their_line() {
        let p = problem("prot = 1\n");
        assert!(p.message.contains("unknown field `prot`"), "{}", p.message);
        assert!(!p.message.starts_with("prot: "));
        let p = problem("name = \"a\"\n\n[limits\n");
        assert_eq!(p.line, 3);
    }

    #[test]
    fn keys_are_taken_only_when_plain() {
        assert_eq!(key_on_line("a.b-c_d = 1", 3), Some("a.b-c_d".into()));
        assert_eq!(key_on_line("[[peer]]\n", 2), Some("peer".into()));
        assert_eq!(key_on_line("\"quoted key\" = 1", 3), None);
        assert_eq!(key_on_line("no equals sign", 3), None);
        assert_eq!(key_on_line("x = 1", 99), None);
        assert_eq!(line_of(b"a\nb\nc", 100), 3);
    }
}
