//! Admin API tests against a coordinator on loopback: authentication and response shapes.

use meshlink_proto::token::JoinToken;
use serde_json::{json, Value};

use crate::common::{http, keys, sorted, start, TempDir};

#[tokio::test]
async fn every_route_needs_the_admin_token() {
    let dir = TempDir::new("admin-auth");
    let c = start(dir.path()).await;
    let addr = c.admin_addr();
    for (method, path) in [
        ("GET", "/v1/status"),
        ("GET", "/v1/networks"),
        ("POST", "/v1/tokens"),
        ("DELETE", "/v1/nodes/1"),
        ("GET", "/nope"),
    ] {
        let (status, body) = http(addr, method, path, None, None).await;
        assert_eq!(status, 401, "{method} {path}");
        assert!(body["error"].as_str().unwrap().contains("admin token"));
        let (status, _) = http(addr, method, path, Some("wrong-token-wrong-token"), None).await;
        assert_eq!(status, 401, "{method} {path} with a wrong token");
    }
    let (status, _) = http(
        addr,
        "GET",
        "/v1/status",
        Some(&c.admin_token().value),
        None,
    )
    .await;
    assert_eq!(status, 200);
    c.shutdown().await;
}

#[tokio::test]
async fn join_tokens_default_to_one_use_and_one_hour() {
    let dir = TempDir::new("admin-token-defaults");
    let c = start(dir.path()).await;
    let addr = c.admin_addr();
    let t = c.admin_token().value.clone();
    let t = Some(t.as_str());
    let (status, net) = http(
        addr,
        "POST",
        "/v1/networks",
        t,
        Some(r#"{"name":"prod","cidr":"100.64.0.0/24"}"#),
    )
    .await;
    assert_eq!(status, 201, "{net}");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let create = |body: &'static str| async move {
        let before = now();
        let (status, tok) = http(addr, "POST", "/v1/tokens", t, Some(body)).await;
        (status, tok, before, now())
    };

    // Absent and null both mean the default: one join, within one hour.
    for body in [
        r#"{"network":"prod"}"#,
        r#"{"network":"prod","uses":null,"expires_in_secs":null}"#,
    ] {
        let (status, tok, before, after) = create(body).await;
        assert_eq!(status, 201, "{body}: {tok}");
        assert_eq!(tok["uses"], json!(1), "{body}");
        let expires_at = tok["expires_at"].as_i64().expect("an expiry");
        assert!(
            (before + 3600..=after + 3600).contains(&expires_at),
            "{body}: expires at {expires_at}, asked between {before} and {after}"
        );
    }

    // More is asked for explicitly.
    let (status, tok, _, _) =
        create(r#"{"network":"prod","uses":"unlimited","expires_in_secs":"never"}"#).await;
    assert_eq!(status, 201, "{tok}");
    assert_eq!(
        (&tok["uses"], &tok["expires_at"]),
        (&Value::Null, &Value::Null)
    );
    let (status, tok, before, _) =
        create(r#"{"network":"prod","uses":10,"expires_in_secs":2592000}"#).await;
    assert_eq!(status, 201, "{tok}");
    assert_eq!(tok["uses"], json!(10));
    assert!(tok["expires_at"].as_i64().unwrap() >= before + 2_592_000);

    // Zero, and words other than the two, are refused and named.
    for (body, says) in [
        (r#"{"network":"prod","uses":0}"#, "uses"),
        (
            r#"{"network":"prod","expires_in_secs":0}"#,
            "expires_in_secs",
        ),
        (r#"{"network":"prod","uses":"lots"}"#, "unlimited"),
        (r#"{"network":"prod","expires_in_secs":"forever"}"#, "never"),
        (r#"{"network":"prod","uses":-1}"#, "uses"),
    ] {
        let (status, e, _, _) = create(body).await;
        assert_eq!(status, 400, "{body}: {e}");
        let message = e["error"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    c.shutdown().await;
}

#[tokio::test]
async fn shapes_of_networks_tokens_and_status() {
    let dir = TempDir::new("admin-shapes");
    let c = start(dir.path()).await;
    let addr = c.admin_addr();
    let t = c.admin_token().value.clone();
    let t = Some(t.as_str());

    let (status, net) = http(
        addr,
        "POST",
        "/v1/networks",
        t,
        Some(r#"{"name":"prod","cidr":"100.64.0.0/24"}"#),
    )
    .await;
    assert_eq!(status, 201, "{net}");
    assert_eq!(
        keys(&net),
        sorted(&["name", "cidr", "version", "nodes", "online", "created_at"])
    );
    assert_eq!(
        (
            net["name"].as_str(),
            net["cidr"].as_str(),
            net["version"].as_u64()
        ),
        (Some("prod"), Some("100.64.0.0/24"), Some(0))
    );
    assert!(
        net["created_at"].as_i64().unwrap() > 1_600_000_000,
        "unix seconds"
    );

    let (status, e) = http(
        addr,
        "POST",
        "/v1/networks",
        t,
        Some(r#"{"name":"dev","cidr":"100.64.0.128/25"}"#),
    )
    .await;
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("overlaps"));
    let (status, e) = http(
        addr,
        "POST",
        "/v1/networks",
        t,
        Some(r#"{"name":"Dev","cidr":"100.64.1.0/24"}"#),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    let (status, e) = http(addr, "POST", "/v1/networks", t, Some("{not json")).await;
    assert_eq!(status, 400);
    assert!(e["error"].is_string());

    let (status, list) = http(addr, "GET", "/v1/networks", t, None).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(keys(&list[0]), keys(&net));

    let body =
        json!({"network": "prod", "tags": ["web"], "expires_in_secs": 3600, "uses": 3}).to_string();
    let (status, tok) = http(addr, "POST", "/v1/tokens", t, Some(&body)).await;
    assert_eq!(status, 201, "{tok}");
    assert_eq!(
        keys(&tok),
        sorted(&[
            "id",
            "token",
            "network",
            "tags",
            "expires_at",
            "uses",
            "used"
        ])
    );
    assert_eq!(
        (tok["uses"].as_u64(), tok["used"].as_u64()),
        (Some(3), Some(0))
    );
    assert_eq!(tok["tags"], json!(["web"]));
    let text = tok["token"].as_str().unwrap();
    assert!(text.starts_with("mlj1_"));
    let parsed = JoinToken::decode(text).unwrap();
    assert_eq!(parsed.coordinator, c.advertise());
    assert_eq!(
        parsed.coordinator,
        c.quic_addr().to_string(),
        "a specific listen address is advertised as is"
    );
    assert_eq!(parsed.fingerprint, c.fingerprint());

    let (status, _) = http(addr, "POST", "/v1/tokens", t, Some(r#"{"network":"prod"}"#)).await;
    assert_eq!(status, 201, "tags, expiry and uses are optional");
    let (status, e) = http(
        addr,
        "POST",
        "/v1/tokens",
        t,
        Some(r#"{"network":"ghost"}"#),
    )
    .await;
    assert_eq!(status, 404, "{e}");

    let (status, list) = http(addr, "GET", "/v1/tokens", t, None).await;
    assert_eq!(status, 200);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        keys(&list[0]),
        sorted(&[
            "id",
            "network",
            "tags",
            "expires_at",
            "uses",
            "used",
            "revoked",
            "expired",
            "created_at"
        ])
    );
    assert!(
        !list[0].to_string().contains(&parsed.secret),
        "the secret is never listed"
    );
    assert_eq!(
        (&list[1]["expires_at"], &list[1]["uses"]),
        (
            &json!(list[1]["created_at"].as_i64().unwrap() + 3600),
            &json!(1)
        ),
        "a token asked for without uses or expiry is good for one join within an hour"
    );

    let id = tok["id"].as_u64().unwrap();
    let (status, body) = http(addr, "DELETE", &format!("/v1/tokens/{id}"), t, None).await;
    assert_eq!((status, body), (204, Value::Null));
    let (status, _) = http(addr, "DELETE", "/v1/tokens/999", t, None).await;
    assert_eq!(status, 404);
    let (status, _) = http(addr, "DELETE", "/v1/tokens/abc", t, None).await;
    assert_eq!(status, 400);
    let (_, list) = http(addr, "GET", "/v1/tokens", t, None).await;
    assert_eq!(list[0]["revoked"], json!(true));
    assert_eq!(list[0]["expired"], json!(false));

    let (status, nodes) = http(addr, "GET", "/v1/nodes", t, None).await;
    assert_eq!((status, nodes), (200, json!([])));
    let (status, _) = http(addr, "GET", "/v1/nodes?network=ghost", t, None).await;
    assert_eq!(status, 404);
    let (status, _) = http(addr, "GET", "/v1/nodes/ghost", t, None).await;
    assert_eq!(status, 404);
    let (status, _) = http(addr, "GET", "/v1/nothing-here", t, None).await;
    assert_eq!(status, 404);

    let (status, st) = http(addr, "GET", "/v1/status", t, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        keys(&st),
        sorted(&[
            "version",
            "networks",
            "nodes",
            "online",
            "uptime_secs",
            "quic_listen",
            "advertise",
            "fingerprint",
            "coordinators",
            "relay",
            "reflect",
            "tasks"
        ])
    );
    assert_eq!(st["version"], json!(env!("CARGO_PKG_VERSION")));
    // The runtime's tasks: at least this request's and the listeners'.
    assert!(st["tasks"].as_u64().is_some_and(|n| n >= 2), "{st}");
    // A lone coordinator lists itself, up, with its sessions.
    assert_eq!(
        st["coordinators"],
        json!([{"address": c.advertise(), "sessions": 0, "up": true}])
    );
    assert_eq!(
        (
            st["networks"].as_u64(),
            st["nodes"].as_u64(),
            st["online"].as_u64()
        ),
        (Some(1), Some(0), Some(0))
    );
    assert_eq!(st["fingerprint"].as_str(), Some(c.fingerprint()));
    assert_eq!(
        st["quic_listen"].as_str(),
        Some(c.quic_addr().to_string().as_str())
    );
    c.shutdown().await;
}

/// Runs the built `meshlink-coordinator serve` on loopback in `dir` until it prints its
/// fingerprint, and returns everything it printed on stdout by then.
fn serve_until_ready(dir: &std::path::Path) -> String {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshlink-coordinator"))
        .env_clear()
        .env("MESHLINK_LOG", "warn")
        .args(["serve", "--state-dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--advertise", "127.0.0.1:7443"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the coordinator binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut printed = String::new();
    let ready = loop {
        match rx.recv_timeout(crate::common::WAIT) {
            Ok(line) => {
                printed.push_str(&line);
                printed.push('\n');
                if line.starts_with("coordinator fingerprint: ") {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ready, "no fingerprint line; stdout:\n{printed}");
    printed
}

/// The admin token never goes to stdout (which journald keeps, readable to whoever may read
/// the journal): `serve` and `init` print where it was written.
#[test]
fn the_admin_token_is_never_printed() {
    let dir = TempDir::new("admin-token-print");
    let state = dir.path().join("serve");
    let first = serve_until_ready(&state);
    let path = state.join("admin.token");
    let token = std::fs::read_to_string(&path).unwrap().trim().to_owned();
    assert!(token.len() >= 16);
    assert!(
        !first.contains(&token),
        "the admin token is printed:\n{first}"
    );
    assert!(
        first.contains(&format!(
            "admin token written to {} (0600)\n",
            path.display()
        )),
        "{first}"
    );
    let again = serve_until_ready(&state);
    assert!(
        !again.contains("admin token"),
        "a token made before is not mentioned again:\n{again}"
    );

    let state = dir.path().join("init");
    let init = std::process::Command::new(env!("CARGO_BIN_EXE_meshlink-coordinator"))
        .env_clear()
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let printed = String::from_utf8(init.stdout).unwrap();
    let path = state.join("admin.token");
    let token = std::fs::read_to_string(&path).unwrap().trim().to_owned();
    assert!(!printed.contains(&token), "{printed}");
    assert!(
        printed.contains(&format!(
            "admin token written to {} (0600)\n",
            path.display()
        )),
        "{printed}"
    );
}
