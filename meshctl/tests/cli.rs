//! The built `meshctl` binary against a fake coordinator.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use support::{closed_url, meshctl, stderr, stdout, Canned, FakeCoordinator};

const NETWORKS: &str = r#"[{"name":"prod","cidr":"100.64.0.0/16","version":7,"nodes":3,
    "online":2,"created_at":"2024-05-01T12:00:00Z"},{"name":"lab","cidr":"10.9.0.0/24",
    "version":1,"nodes":0,"online":0,"created_at":1714564800}]"#;

#[test]
fn network_list_json_is_the_server_json() {
    let fake = FakeCoordinator::start(vec![Canned::new(200, NETWORKS)]);
    let output = meshctl(&fake.url(), &["network", "list", "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let sent: serde_json::Value = serde_json::from_str(NETWORKS).unwrap();
    assert_eq!(printed, sent);
    assert!(stdout(&output).contains("\n  {"), "not pretty-printed");
    let request = fake.request();
    assert_eq!(request.target, "/v1/networks");
    assert_eq!(request.header("authorization"), Some("Bearer cli-secret"));
}

#[test]
fn network_list_table() {
    let fake = FakeCoordinator::start(vec![Canned::new(200, NETWORKS)]);
    let output = meshctl(&fake.url(), &["network", "list"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "NAME  CIDR           NODES  ONLINE  VERSION  CREATED\n\
         prod  100.64.0.0/16  3      2       7        2024-05-01T12:00:00Z\n\
         lab   10.9.0.0/24    0      0       1        2024-05-01T12:00:00Z\n"
    );
}

#[test]
fn node_list_table_has_the_columns() {
    let nodes = r#"[{"id":"n1","name":"web-1","network":"prod","address":"100.64.0.1",
        "online":true,"last_seen":null,"endpoints":["203.0.113.5:51820"],
        "labels":{"role":"web"}}]"#;
    let fake = FakeCoordinator::start(vec![Canned::new(200, nodes)]);
    let output = meshctl(&fake.url(), &["node", "list", "--network", "prod"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("NAME   ID  NETWORK  ADDRESS     ONLINE  LAST SEEN  ENDPOINTS          LABELS")
    );
    assert_eq!(
        lines.next(),
        Some("web-1  n1  prod     100.64.0.1  yes     -          203.0.113.5:51820  role=web")
    );
    assert_eq!(fake.request().target, "/v1/nodes?network=prod");
}

#[test]
fn token_create_prints_the_token_last_or_as_json() {
    let answer = r#"{"id":"t1","token":"mlj1_secret","network":"prod","tags":["web"],
        "expires_at":null,"uses":1,"used":0}"#;
    let fake = FakeCoordinator::start(vec![Canned::new(201, answer), Canned::new(201, answer)]);
    let args = [
        "token",
        "create",
        "--network",
        "prod",
        "--tag",
        "web",
        "--expires",
        "2d",
        "--uses",
        "1",
    ];
    let output = meshctl(&fake.url(), &args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).lines().last(), Some("mlj1_secret"));
    let sent: serde_json::Value = serde_json::from_str(&fake.request().body).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({"network": "prod", "tags": ["web"], "expires_in_secs": 172800, "uses": 1})
    );

    let mut json_args = args.to_vec();
    json_args.extend(["-o", "json"]);
    let output = meshctl(&fake.url(), &json_args);
    let printed: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(printed["token"], "mlj1_secret");
}

#[test]
fn unauthorized_is_one_line_and_a_failure() {
    let fake = FakeCoordinator::start(vec![Canned::new(401, r#"{"error":"nope"}"#)]);
    let output = meshctl(&fake.url(), &["status"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "meshctl: the coordinator refused the admin token (401)\n"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn server_error_message_is_shown() {
    let fake = FakeCoordinator::start(vec![Canned::new(404, r#"{"error":"no such node"}"#)]);
    let output = meshctl(&fake.url(), &["node", "delete", "ghost"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "meshctl: the coordinator answered 404 Not Found: no such node\n"
    );
}

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
fn token_file_is_used_and_must_be_private() {
    let private = token_file("private", 0o600);
    let fake = FakeCoordinator::start(vec![Canned::new(200, "[]")]);
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env_clear()
        .args(["--coordinator", &fake.url(), "token", "list"])
        .arg("--admin-token-file")
        .arg(&private)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "ID  NETWORK  TAGS  USES  EXPIRES  STATE\n");
    assert_eq!(
        fake.request().header("authorization"),
        Some("Bearer file-secret")
    );

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
