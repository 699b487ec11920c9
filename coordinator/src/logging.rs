//! How the coordinator logs: the format (`MESHLINK_LOG_FORMAT`: `text`, the default, or
//! `json`, one JSON object a line for log collectors), the filter (`MESHLINK_LOG`, a
//! `tracing` filter such as `info` or `meshlink_coordinator=debug`), and the subscriber that
//! `main` installs (library code never installs one).
//!
//! A JSON line holds `timestamp`, `level`, `target`, `fields` (the event's fields, `message`
//! among them) and `span` (the current span's fields, such as a session's `node`), as
//! `tracing-subscriber`'s JSON format writes them.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The variable that chooses the format.
pub const FORMAT_VAR: &str = "MESHLINK_LOG_FORMAT";

/// The variable that holds the filter.
pub const FILTER_VAR: &str = "MESHLINK_LOG";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// For people: one line per event, coloured on a terminal.
    #[default]
    Text,
    /// For log collectors: one JSON object per line.
    Json,
}

/// A value of [`FORMAT_VAR`] that is no format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{FORMAT_VAR}={0:?} is not a log format: use text or json")]
pub struct LogFormatError(pub String);

impl LogFormat {
    /// The format a value of [`FORMAT_VAR`] names; unset or empty is [`LogFormat::Text`].
    /// Case and surrounding spaces do not matter.
    ///
    /// # Errors
    /// [`LogFormatError`] for any other value.
    pub fn parse(value: Option<&str>) -> Result<Self, LogFormatError> {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(LogFormat::Text);
        };
        match v.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(LogFormatError(v.to_string())),
        }
    }

    /// The format [`FORMAT_VAR`] names in this process's environment.
    ///
    /// # Errors
    /// As [`LogFormat::parse`]; a value that is not UTF-8 is refused too.
    pub fn from_env() -> Result<Self, LogFormatError> {
        match std::env::var(FORMAT_VAR) {
            Ok(v) => LogFormat::parse(Some(&v)),
            Err(std::env::VarError::NotPresent) => Ok(LogFormat::Text),
            Err(std::env::VarError::NotUnicode(v)) => {
                Err(LogFormatError(v.to_string_lossy().into_owned()))
            }
        }
    }
}

/// Installs the process's subscriber: `format` to standard error, filtered by
/// [`FILTER_VAR`] (default `info`). For `main` only; a second call does nothing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env(FILTER_VAR).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Set only once: a second subscriber would be refused, and the first keeps logging.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_is_text_unless_json_is_asked_for() {
        assert_eq!(LogFormat::parse(None), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("")), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("text")), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some(" JSON ")), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse(Some("json")), Ok(LogFormat::Json));
        let e = LogFormat::parse(Some("logfmt")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "MESHLINK_LOG_FORMAT=\"logfmt\" is not a log format: use text or json"
        );
    }
}
