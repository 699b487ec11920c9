//! `meshctl workload claim` against a fake agent listening on a unix socket in a scratch
//! directory. The admin workload commands run against a real coordinator in `tests/admin.rs`.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use meshlink_uapi::socket_path;
use meshlink_uapi::test_support::serve_once;
use serde_json::json;
use support::{closed_url, meshctl, stderr, stdout};

/// A fake agent on `<dir>/<interface>.sock`: serves one connection, reads the request up to its
/// empty line, then answers `reply` (or stays silent until the client leaves). Returns the
/// request.
fn fake_agent(
    dir: &Path,
    interface: &str,
    reply: Option<&'static str>,
) -> thread::JoinHandle<String> {
    serve_once(&socket_path(dir, interface), reply.map(str::as_bytes))
}

/// Runs `meshctl workload claim` with no coordinator and no admin token at all.
fn claim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env_clear()
        .args(["workload", "claim"])
        .args(args)
        .output()
        .expect("run meshctl")
}

#[test]
fn claim_asks_the_local_agent_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let agent = fake_agent(dir.path(), "mesh0", Some("generation=7\nerrno=0\n\n"));
    let output = claim(&["chat", "--uapi-dir", dir_arg]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with("claimed chat (generation 7) in "),
        "{text}"
    );
    assert!(text.ends_with(" ms\n"), "{text}");
    assert_eq!(agent.join().unwrap(), "claim=chat\n\n");

    let agent = fake_agent(dir.path(), "wg1", Some("generation=8\nerrno=0\n\n"));
    let output = claim(&[
        "chat",
        "--uapi-dir",
        dir_arg,
        "--interface",
        "wg1",
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(
        (&printed["workload"], &printed["generation"]),
        (&json!("chat"), &json!(8))
    );
    assert!(printed["took_ms"].is_number());
    agent.join().unwrap();
}

#[test]
fn a_refused_claim_prints_the_agents_message() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(
        dir.path(),
        "mesh0",
        Some("message=node vm-b is not an allowed holder of workload chat\nerrno=-1\n\n"),
    );
    let output = claim(&["chat", "--uapi-dir", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "meshctl: cannot claim chat: node vm-b is not an allowed holder of workload chat (errno -1)\n"
    );
    assert!(output.stdout.is_empty());
    agent.join().unwrap();
}

#[test]
fn a_silent_agent_times_out_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), "mesh0", None);
    let started = Instant::now();
    let output = claim(&[
        "chat",
        "--uapi-dir",
        dir.path().to_str().unwrap(),
        "--timeout",
        "1s",
    ]);
    let elapsed = started.elapsed();
    assert_eq!(output.status.code(), Some(1));
    let socket = dir.path().join("mesh0.sock");
    assert_eq!(
        stderr(&output),
        format!(
            "meshctl: the agent at {} did not answer within 1 s\n",
            socket.display()
        )
    );
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    agent.join().unwrap();
}

#[test]
fn no_agent_is_one_line_saying_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let output = claim(&["chat", "--uapi-dir", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    let socket = dir.path().join("mesh0.sock");
    assert!(
        message.starts_with(&format!(
            "meshctl: cannot reach the agent at {}: ",
            socket.display()
        )),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
}

#[test]
fn admin_workload_commands_still_need_a_token() {
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env_clear()
        .args(["--coordinator", &closed_url(), "workload", "list"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("no admin token"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn help_lists_the_workload_commands() {
    let output = meshctl("http://127.0.0.1:1", &["workload", "--help"]);
    assert!(output.status.success());
    let text = stdout(&output);
    for command in [
        "create", "list", "show", "attach", "move", "detach", "delete", "claim",
    ] {
        assert!(text.contains(&format!("  {command} ")), "{command}: {text}");
    }
}
