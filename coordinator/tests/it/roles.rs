//! Admin tokens with roles and network scopes, and the audit log, over the admin API.

use serde_json::{json, Value};

use crate::common::{http, start, TempDir};

async fn create_token(
    addr: std::net::SocketAddr,
    by: &str,
    name: &str,
    role: &str,
    network: Option<&str>,
) -> (u16, Value) {
    let mut body = json!({"name": name, "role": role});
    if let Some(n) = network {
        body["network"] = json!(n);
    }
    http(
        addr,
        "POST",
        "/v1/admin-tokens",
        Some(by),
        Some(&body.to_string()),
    )
    .await
}

#[tokio::test]
async fn roles_and_network_scopes_decide_and_the_audit_log_records() {
    let dir = TempDir::new("admin-roles");
    let c = start(dir.path()).await;
    let addr = c.admin_addr();
    let boot = c.admin_token().value.clone();
    for (name, cidr) in [("prod", "100.64.0.0/24"), ("lab", "100.64.1.0/24")] {
        let body = json!({"name": name, "cidr": cidr}).to_string();
        let (status, _) = http(addr, "POST", "/v1/networks", Some(&boot), Some(&body)).await;
        assert_eq!(status, 201);
    }

    let (status, read) = create_token(addr, &boot, "dashboards", "read", None).await;
    assert_eq!(status, 201, "{read}");
    let read = read["token"].as_str().unwrap().to_string();
    assert!(read.starts_with("mla1_"));
    let (_, op) = create_token(addr, &boot, "ci-prod", "operator", Some("prod")).await;
    let op_id = op["id"].as_u64().unwrap();
    assert_eq!(op["network"], "prod");
    assert_eq!(op["created_by"], "admin:bootstrap");
    let op = op["token"].as_str().unwrap().to_string();
    let (_, admin) = create_token(addr, &boot, "alice", "admin", None).await;
    let admin = admin["token"].as_str().unwrap().to_string();
    let (status, body) = create_token(addr, &boot, "alice", "read", None).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = create_token(addr, &boot, "x", "read", Some("nope")).await;
    assert_eq!(status, 404, "{body}");

    // read: lists, nothing more.
    let (status, _) = http(addr, "GET", "/v1/nodes", Some(&read), None).await;
    assert_eq!(status, 200);
    let body = json!({"name": "more", "cidr": "100.64.9.0/24"}).to_string();
    let (status, err) = http(addr, "POST", "/v1/networks", Some(&read), Some(&body)).await;
    assert_eq!(status, 403, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("admin:dashboards has the read role"),
        "{err}"
    );

    // operator, limited to prod: join tokens and moves there, nothing else.
    let prod_token = json!({"network": "prod"}).to_string();
    let (status, t) = http(addr, "POST", "/v1/tokens", Some(&op), Some(&prod_token)).await;
    assert_eq!(status, 201, "{t}");
    let lab_token = json!({"network": "lab"}).to_string();
    let (status, err) = http(addr, "POST", "/v1/tokens", Some(&op), Some(&lab_token)).await;
    assert_eq!(status, 403, "{err}");
    let (status, err) = http(
        addr,
        "POST",
        "/v1/tokens?network=prod",
        Some(&op),
        Some(&lab_token),
    )
    .await;
    assert_eq!(status, 403, "a query cannot vouch for the body: {err}");
    let (status, err) = create_token(addr, &op, "mine", "admin", None).await;
    assert_eq!(status, 403, "an operator cannot make admin tokens: {err}");
    let (status, err) = http(addr, "GET", "/v1/nodes", Some(&op), None).await;
    assert_eq!(status, 403, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("?network=prod"),
        "{err}"
    );
    let (status, _) = http(addr, "GET", "/v1/nodes?network=prod", Some(&op), None).await;
    assert_eq!(status, 200);
    let (status, _) = http(addr, "GET", "/v1/tokens", Some(&op), None).await;
    assert_eq!(status, 403, "the token list spans networks");
    let move_body = json!({"node": "vm-a"}).to_string();
    let (status, _) = http(
        addr,
        "POST",
        "/v1/workloads/chat/move?network=prod",
        Some(&op),
        Some(&move_body),
    )
    .await;
    assert_eq!(status, 404, "allowed to try; there is no such workload");
    let policy =
        json!({"source": "[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"*\"]\n"}).to_string();
    let (status, _) = http(
        addr,
        "POST",
        "/v1/networks/prod/policy",
        Some(&op),
        Some(&policy),
    )
    .await;
    assert_eq!(status, 403, "policies need the admin role");

    // admin (every network): anything, and the policy names it as the author.
    let (status, body) = http(
        addr,
        "POST",
        "/v1/networks/prod/policy",
        Some(&admin),
        Some(&policy),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["policy"]["author"], "admin:alice");
    let (status, _) = create_token(addr, &admin, "bob", "read", Some("lab")).await;
    assert_eq!(status, 201);

    // A revoked token no longer works.
    let (status, _) = http(
        addr,
        "DELETE",
        &format!("/v1/admin-tokens/{op_id}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = http(addr, "GET", "/v1/nodes?network=prod", Some(&op), None).await;
    assert_eq!(status, 401);
    let (status, _) = http(addr, "GET", "/v1/status", Some("mla1_guessed"), None).await;
    assert_eq!(status, 401);

    // The audit log: every change and every refusal, who, what and the outcome.
    let (status, log) = http(addr, "GET", "/v1/audit?limit=1000", Some(&boot), None).await;
    assert_eq!(status, 200, "{log}");
    let log = log.as_array().unwrap();
    let find = |actor: &str, action: &str, status: u64| {
        log.iter()
            .find(|e| e["actor"] == actor && e["action"] == action && e["status"] == status)
            .unwrap_or_else(|| panic!("no {actor} {action} {status} in {log:#?}"))
    };
    find("admin:bootstrap", "POST /v1/networks", 201);
    find("admin:bootstrap", "POST /v1/admin-tokens", 201);
    let refused = find("admin:dashboards", "POST /v1/networks", 403);
    assert!(refused["result"].as_str().unwrap().contains("read role"));
    let e = find("admin:ci-prod", "POST /v1/tokens", 201);
    assert_eq!(e["network"], "prod");
    find("admin:ci-prod", "POST /v1/tokens", 403);
    find("admin:ci-prod", "POST /v1/admin-tokens", 403);
    let moved = find("admin:ci-prod", "POST /v1/workloads/chat/move", 404);
    assert_eq!(moved["node"], "vm-a");
    assert!(
        moved["result"].as_str().unwrap().contains("chat"),
        "{moved}"
    );
    find("admin:alice", "POST /v1/networks/prod/policy", 200);
    find(
        "admin:alice",
        &format!("DELETE /v1/admin-tokens/{op_id}"),
        204,
    );
    find("unauthenticated", "GET /v1/nodes", 401);
    find("unauthenticated", "GET /v1/status", 401);
    assert!(
        log.iter().all(|e| e["source"] == "127.0.0.1"),
        "every entry names the client"
    );
    assert!(
        !log.iter()
            .any(|e| e["status"] == 200 && e["action"] == "GET /v1/nodes"),
        "successful reads are not recorded"
    );
    let text = serde_json::to_string(log).unwrap();
    for secret in [&read, &op, &admin] {
        assert!(!text.contains(secret.as_str()), "a secret in the audit log");
    }
    // Filters.
    let (_, by_node) = http(addr, "GET", "/v1/audit?node=vm-a", Some(&boot), None).await;
    assert_eq!(by_node.as_array().unwrap().len(), 1, "{by_node}");
    let (_, last) = http(addr, "GET", "/v1/audit?limit=2", Some(&boot), None).await;
    let last = last.as_array().unwrap();
    assert_eq!(last.len(), 2);
    assert!(
        last[0]["id"].as_u64() < last[1]["id"].as_u64(),
        "oldest first"
    );
    let (status, _) = http(addr, "GET", "/v1/audit", Some(&read), None).await;
    assert_eq!(status, 403, "reading the audit log needs the admin role");
    let (status, _) = http(addr, "GET", "/v1/audit?limit=0", Some(&boot), None).await;
    assert_eq!(status, 400);
    c.shutdown().await;
}

#[tokio::test]
async fn a_large_answer_comes_through_the_gate_whole() {
    let dir = TempDir::new("admin-large");
    let c = start(dir.path()).await;
    let addr = c.admin_addr();
    let boot = c.admin_token().value.clone();
    let body = json!({"name": "prod", "cidr": "100.64.0.0/24"}).to_string();
    let (status, _) = http(addr, "POST", "/v1/networks", Some(&boot), Some(&body)).await;
    assert_eq!(status, 201);
    // About 200 KB of policy: its answer carries the source, far over what the gate reads
    // back for the audit log.
    let mut source = String::new();
    for i in 0..2000 {
        source.push_str(&format!(
            "[[rule]]\nfrom = [\"tag:team-{i}\"]\nto = [\"tag:svc-{i}\"]\nports = [\"tcp:{}\"]\n\n",
            1000 + i
        ));
    }
    let body = json!({ "source": source }).to_string();
    let (status, answer) = http(
        addr,
        "POST",
        "/v1/networks/prod/policy",
        Some(&boot),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        answer["policy"]["rules"],
        2000,
        "{}",
        &answer.to_string()[..200.min(answer.to_string().len())]
    );
    assert_eq!(answer["policy"]["source"].as_str(), Some(source.as_str()));
    c.shutdown().await;
}
