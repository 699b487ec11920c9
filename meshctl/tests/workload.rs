//! `meshctl workload ...`: the admin commands against a fake coordinator, and `workload claim`
//! against a fake agent listening on a unix socket in a scratch directory.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{closed_url, meshctl, stderr, stdout, Canned, FakeCoordinator};

const CHAT: &str = r#"{"name":"chat","network":"prod","address":"100.64.50.10",
    "holder":{"id":3,"name":"vm-c"},"generation":3,"previous":{"id":1,"name":"vm-a"},
    "standby":[{"id":4,"name":"vm-d"}],"allowed":[{"id":3,"name":"vm-c"}],"state":"held",
    "created_at":1714564800,"moved_at":1714564860}"#;

/// `CHAT` as the answer to a move: with the change's fields.
fn moved(changed: bool, prepared_ms: Option<f64>, took_ms: f64) -> String {
    let mut v: serde_json::Value = serde_json::from_str(CHAT).unwrap();
    v["changed"] = json!(changed);
    v["prepared_ms"] = json!(prepared_ms);
    v["took_ms"] = json!(took_ms);
    v.to_string()
}

#[test]
fn create_sends_the_lists_and_the_address() {
    let fake = FakeCoordinator::start(vec![Canned::new(201, CHAT), Canned::new(201, CHAT)]);
    let output = meshctl(
        &fake.url(),
        &[
            "workload",
            "create",
            "chat",
            "--network",
            "prod",
            "--address",
            "100.64.50.10",
            "--standby",
            "vm-d,vm-e",
            "--allow",
            "vm-c",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).starts_with("NAME        chat\n"),
        "{}",
        stdout(&output)
    );
    let request = fake.request();
    assert_eq!(
        (request.method.as_str(), request.target.as_str()),
        ("POST", "/v1/workloads")
    );
    let sent: serde_json::Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(
        sent,
        json!({"name": "chat", "network": "prod", "address": "100.64.50.10",
               "standby": ["vm-d", "vm-e"], "allowed": ["vm-c"]})
    );

    let output = meshctl(
        &fake.url(),
        &["workload", "create", "chat", "--network", "prod"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let sent: serde_json::Value = serde_json::from_str(&fake.request().body).unwrap();
    assert_eq!(
        sent,
        json!({"name": "chat", "network": "prod", "standby": [], "allowed": []}),
        "no address: the coordinator picks one"
    );
}

#[test]
fn list_table_has_the_columns() {
    let list = format!(
        r#"[{CHAT},{{"name":"db","network":"prod","address":"100.64.0.9","holder":null,
        "generation":0,"previous":null,"standby":[],"allowed":[],"state":"detached",
        "created_at":1714564800,"moved_at":null}}]"#
    );
    let fake = FakeCoordinator::start(vec![Canned::new(200, list)]);
    let output = meshctl(&fake.url(), &["workload", "list", "--network", "prod"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "NAME  NETWORK  ADDRESS       HOLDER  GENERATION  STATE     STANDBY\n\
         chat  prod     100.64.50.10  vm-c    3           held      vm-d\n\
         db    prod     100.64.0.9    -       0           detached  -\n"
    );
    assert_eq!(fake.request().target, "/v1/workloads?network=prod");
}

#[test]
fn show_json_is_the_server_json() {
    let fake = FakeCoordinator::start(vec![Canned::new(200, CHAT)]);
    let output = meshctl(&fake.url(), &["workload", "show", "chat", "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(
        printed,
        serde_json::from_str::<serde_json::Value>(CHAT).unwrap()
    );
    assert_eq!(fake.request().target, "/v1/workloads/chat");
}

#[test]
fn attach_move_and_detach_say_what_happened() {
    let fake = FakeCoordinator::start(vec![
        Canned::new(200, moved(true, Some(3.1), 12.4)),
        Canned::new(200, moved(true, None, 0.5)),
        Canned::new(200, moved(false, None, 0.1)),
        Canned::new(
            200,
            r#"{"name":"chat","holder":null,"previous":{"id":3,"name":"vm-c"},"generation":4,
               "state":"detached","changed":true,"prepared_ms":null,"took_ms":1.04}"#,
        ),
        Canned::new(204, ""),
    ]);
    let output = meshctl(&fake.url(), &["workload", "move", "chat", "--to", "vm-c"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "chat moved to vm-c (generation 3) in 12.4 ms (destination ready in 3.1 ms)\n"
    );
    let request = fake.request();
    assert_eq!(
        (request.method.as_str(), request.target.as_str()),
        ("POST", "/v1/workloads/chat/move")
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&request.body).unwrap(),
        json!({"node": "vm-c"})
    );

    let output = meshctl(
        &fake.url(),
        &[
            "workload",
            "attach",
            "chat",
            "--node",
            "vm-c",
            "--network",
            "prod",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "chat attached to vm-c (generation 3) in 0.5 ms (destination did not report ready in time)\n"
    );
    assert_eq!(
        fake.request().target,
        "/v1/workloads/chat/attach?network=prod"
    );

    let output = meshctl(&fake.url(), &["workload", "move", "chat", "--to", "vm-c"]);
    assert_eq!(
        stdout(&output),
        "chat is already held by vm-c (generation 3)\n"
    );
    fake.request();

    let output = meshctl(&fake.url(), &["workload", "detach", "chat"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "chat detached from vm-c (generation 4) in 1.0 ms\n"
    );
    let request = fake.request();
    assert_eq!(request.target, "/v1/workloads/chat/detach");
    assert_eq!(request.body, "");

    let output = meshctl(&fake.url(), &["workload", "delete", "chat"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "workload chat deleted\n");
    let request = fake.request();
    assert_eq!(
        (request.method.as_str(), request.target.as_str()),
        ("DELETE", "/v1/workloads/chat")
    );
}

#[test]
fn an_ambiguous_name_is_the_coordinators_message() {
    let fake = FakeCoordinator::start(vec![Canned::new(
        409,
        r#"{"error":"workload name \"chat\" exists in networks prod, dev; say which with ?network="}"#,
    )]);
    let output = meshctl(&fake.url(), &["workload", "detach", "chat"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "meshctl: the coordinator answered 409 Conflict: workload name \"chat\" exists in \
         networks prod, dev; say which with ?network=\n"
    );
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("meshctl-claim-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake agent on `<dir>/<interface>.sock`: serves one connection, reads the request up to its
/// empty line, then answers `reply` (or stays silent until the client leaves). Returns the
/// request.
fn fake_agent(
    dir: &Path,
    interface: &str,
    reply: Option<&'static str>,
) -> thread::JoinHandle<String> {
    let listener = UnixListener::bind(dir.join(format!("{interface}.sock"))).unwrap();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\n\n") && stream.read(&mut byte).unwrap() == 1 {
            request.push(byte[0]);
        }
        match reply {
            Some(reply) => stream.write_all(reply.as_bytes()).unwrap(),
            None => while stream.read(&mut byte).unwrap_or(0) == 1 {},
        }
        String::from_utf8(request).unwrap()
    })
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
    let dir = Scratch::new();
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
    let dir = Scratch::new();
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
    let dir = Scratch::new();
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
    let dir = Scratch::new();
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
