//! `MESHLINK_LOG_FORMAT=json`: the real binary writes its log as JSON lines, the reason it
//! stopped included; without it the log stays text.

use std::process::Command;

fn up_with_missing_config(format: Option<&str>) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("ml-json-logs-{}", std::process::id()));
    let missing = dir.join("no-such-agent.toml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshlink-agent"));
    cmd.args(["up", "--config"]).arg(&missing);
    cmd.env_remove("MESHLINK_LOG")
        .env_remove("MESHLINK_LOG_FORMAT");
    if let Some(format) = format {
        cmd.env("MESHLINK_LOG_FORMAT", format);
    }
    let out = cmd.output().expect("the agent binary runs");
    (
        out.status.success(),
        String::from_utf8(out.stderr).expect("UTF-8 log"),
    )
}

#[test]
fn json_log_lines_parse_and_name_the_error() {
    let (ok, stderr) = up_with_missing_config(Some("json"));
    assert!(!ok, "a missing configuration file stops the agent");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "nothing logged");
    // Every line is a JSON object: nothing else is written to standard error.
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect();
    let stop = events
        .iter()
        .find(|e| e["message"] == "meshlink-agent stopped")
        .unwrap_or_else(|| panic!("no stop event in {stderr}"));
    assert_eq!(stop["level"], "ERROR", "{stop}");
    let error = stop["error"].as_str().expect("the error is a field");
    assert!(
        error.contains("cannot read configuration file") && error.contains("no-such-agent.toml"),
        "{error}"
    );
    assert!(stop["timestamp"].is_string(), "{stop}");
}

#[test]
fn text_is_the_default_and_an_unknown_format_is_refused() {
    let (ok, stderr) = up_with_missing_config(None);
    assert!(!ok);
    assert!(
        stderr.starts_with("meshlink-agent: cannot read configuration file"),
        "{stderr}"
    );
    let (ok, stderr) = up_with_missing_config(Some("yaml"));
    assert!(!ok);
    assert!(stderr.contains("MESHLINK_LOG_FORMAT: \"yaml\""), "{stderr}");
}
