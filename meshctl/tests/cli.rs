//! The built `meshctl` binary where no coordinator is needed: usage, the admin token's
//! sources, a coordinator that cannot be reached. `tests/admin.rs` runs the commands against a
//! real coordinator.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use support::{closed_url, meshctl, stderr, stdout};

#[test]
fn unreachable_coordinator_is_named() {
    let url = closed_url();
    let output = meshctl(&url, &["network", "list"]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.starts_with(&format!("meshctl: cannot reach the coordinator at {url}: ")),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
}

#[test]
fn missing_token_says_how_to_pass_one() {
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env_clear()
        .args(["--coordinator", &closed_url(), "status"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(message.contains("--admin-token-file"), "{message}");
    assert!(message.contains("MESHLINK_ADMIN_TOKEN"), "{message}");
}

fn token_file(name: &str, mode: u32) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshctl-cli-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    fs::write(&path, "file-secret\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn a_token_file_others_can_read_is_refused() {
    // `tests/admin.rs` uses a private one against a real coordinator.
    let shared = token_file("shared", 0o644);
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env_clear()
        .env("MESHLINK_ADMIN_TOKEN_FILE", &shared)
        .args(["--coordinator", &closed_url(), "status"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(message.contains("chmod 600"), "{message}");
    assert!(!message.contains("file-secret"), "{message}");
}

#[test]
fn help_does_not_show_the_token_from_the_environment() {
    let output = meshctl("http://127.0.0.1:1", &["--help"]);
    assert!(output.status.success());
    assert!(!stdout(&output).contains("cli-secret"));
}

#[test]
fn token_create_refuses_zero_and_unknown_limits() {
    for (args, says) in [
        (["--uses", "0"], "unlimited"),
        (["--uses", "lots"], "unlimited"),
        (["--uses", "-1"], "unlimited"),
        (["--expires", "0s"], "zero"),
        (["--expires", "forever"], "never"),
    ] {
        let mut all = vec!["token", "create", "--network", "prod"];
        all.extend(args);
        let output = meshctl(&closed_url(), &all);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        let message = stderr(&output);
        assert!(message.contains(args[0]), "{args:?}: {message}");
        assert!(message.contains(says), "{args:?}: {message}");
    }
}
