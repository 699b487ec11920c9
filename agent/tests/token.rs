//! The built agent reading its join token, where no root is needed: `meshlink-agent up` reads
//! the token (a file, standard input, the environment or the command line) before it touches
//! the system, and a bad one is an error that names where it came from, never its text.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A token with the right prefix and a body that does not decode.
const DAMAGED: &str = "mlj1_c2VjcmV0LWJ1dC1icm9rZW4";

struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Self {
        Scratch(
            tempfile::Builder::new()
                .prefix("meshlink-agent-token-")
                .tempdir()
                .expect("a temporary directory"),
        )
    }

    fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.0.path().join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// A state directory that does not exist yet: the agent must not create it when the token
    /// cannot be read.
    fn state_dir(&self) -> PathBuf {
        self.0.path().join("state")
    }
}

/// Runs `meshlink-agent up ARGS --state-dir STATE` with only `env` set and `stdin` on its
/// standard input.
fn up(scratch: &Scratch, args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let state = scratch.state_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshlink-agent"))
        .env_clear()
        .envs(env.iter().copied())
        .arg("up")
        .args(args)
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the agent binary starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        !state.exists(),
        "the state directory was made before the token was read"
    );
    output
}

/// The agent failed (status 1) and said so on stderr, without the token's text.
fn failure(output: &Output, secret: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains(secret),
        "the token's text is echoed: {stderr}"
    );
    stderr
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn a_damaged_token_file_is_named() {
    let scratch = Scratch::new();
    let path = scratch.file("join.token", &format!("{DAMAGED}\n"), 0o600);
    let stderr = failure(
        &up(&scratch, &["--token-file", &shown(&path)], &[], ""),
        DAMAGED,
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("meshlink-agent: ") && last.contains(&shown(&path)),
        "{stderr}"
    );
    assert!(last.contains("damaged"), "{stderr}");
    assert!(
        !stderr.contains("WARN"),
        "a 0600 file is not warned about: {stderr}"
    );
}

#[test]
fn a_token_file_others_can_read_is_warned_about() {
    let scratch = Scratch::new();
    let path = scratch.file("join.token", DAMAGED, 0o644);
    let stderr = failure(
        &up(&scratch, &["--token-file", &shown(&path)], &[], ""),
        DAMAGED,
    );
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    assert!(
        warning.contains(&shown(&path))
            && warning.contains("0644")
            && warning.contains("chmod 600"),
        "{warning}"
    );
}

#[test]
fn a_missing_or_empty_token_file_is_named() {
    let scratch = Scratch::new();
    let missing = scratch.0.path().join("nowhere.token");
    let stderr = failure(
        &up(&scratch, &["--token-file", &shown(&missing)], &[], ""),
        DAMAGED,
    );
    assert!(stderr.contains(&shown(&missing)), "{stderr}");
    let empty = scratch.file("empty.token", "\n", 0o600);
    let stderr = failure(
        &up(&scratch, &["--token-file", &shown(&empty)], &[], ""),
        DAMAGED,
    );
    assert!(
        stderr.contains(&shown(&empty)) && stderr.contains("empty"),
        "{stderr}"
    );
}

#[test]
fn a_damaged_token_on_standard_input_is_named() {
    let scratch = Scratch::new();
    let stderr = failure(&up(&scratch, &["--token", "-"], &[], DAMAGED), DAMAGED);
    assert!(stderr.contains("standard input"), "{stderr}");
    assert!(
        !stderr.contains("/proc"),
        "stdin is not the command line: {stderr}"
    );
}

#[test]
fn a_damaged_token_in_the_environment_is_named() {
    let scratch = Scratch::new();
    let stderr = failure(
        &up(&scratch, &[], &[("MESHLINK_TOKEN", DAMAGED)], ""),
        DAMAGED,
    );
    assert!(stderr.contains("MESHLINK_TOKEN"), "{stderr}");
    let path = scratch.file("env.token", DAMAGED, 0o600);
    let stderr = failure(
        &up(&scratch, &[], &[("MESHLINK_TOKEN_FILE", &shown(&path))], ""),
        DAMAGED,
    );
    assert!(stderr.contains(&shown(&path)), "{stderr}");
}

#[test]
fn a_token_on_the_command_line_still_works_but_is_warned_about() {
    let scratch = Scratch::new();
    let stderr = failure(&up(&scratch, &["--token", DAMAGED], &[], ""), DAMAGED);
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    assert!(
        warning.contains("/proc/") && warning.contains("--token-file"),
        "{warning}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("--token") && last.contains("damaged"),
        "{stderr}"
    );
}

#[test]
fn a_token_in_the_environment_does_not_mix_with_static_peers() {
    let scratch = Scratch::new();
    // A file naming a key (or peers) is a static node's; one without holds a mesh node's
    // local settings, which a token may come with.
    let config = scratch.file("agent.toml", "private_key_file = \"private.key\"\n", 0o600);
    let output = up(
        &scratch,
        &["--config", &shown(&config)],
        &[("MESHLINK_TOKEN", DAMAGED)],
        "",
    );
    let stderr = failure(&output, DAMAGED);
    assert!(
        stderr.contains("MESHLINK_TOKEN") && stderr.contains("--config"),
        "{stderr}"
    );
    // A mesh node's file goes with the token: the token is read (and found damaged).
    let local = scratch.file("mesh.toml", "mtu = 1380\n", 0o600);
    let output = up(
        &scratch,
        &["--config", &shown(&local)],
        &[("MESHLINK_TOKEN", DAMAGED)],
        "",
    );
    let stderr = failure(&output, DAMAGED);
    assert!(stderr.contains("damaged"), "{stderr}");
}
