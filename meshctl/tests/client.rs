//! The admin client against a fake coordinator on 127.0.0.1.

mod support;

use meshctl::admin_token::AdminToken;
use meshctl::client::{AdminClient, ClientError, NewNetwork, NewToken};
use serde_json::json;
use support::{closed_url, Canned, FakeCoordinator};

fn client(url: &str) -> AdminClient {
    AdminClient::new(
        url.parse().unwrap(),
        AdminToken::new("admin-secret", "test").unwrap(),
    )
}

#[test]
fn sends_the_bearer_token_and_reads_the_list() {
    let body = r#"[{"name":"prod","cidr":"100.64.0.0/16","version":3,"nodes":2,"online":1,
                   "created_at":"2024-05-01T12:00:00Z","shiny_new_field":true}]"#;
    let fake = FakeCoordinator::start(vec![Canned::new(200, body)]);
    let reply = client(&fake.url()).networks().unwrap();
    let request = fake.request();
    assert_eq!(request.method, "GET");
    assert_eq!(request.target, "/v1/networks");
    assert_eq!(request.header("authorization"), Some("Bearer admin-secret"));
    assert_eq!(reply.value.len(), 1);
    assert_eq!(reply.value[0].name, "prod");
    assert_eq!(reply.value[0].version, "3");
    assert_eq!(reply.json[0]["shiny_new_field"], json!(true));
}

#[test]
fn posts_json_bodies() {
    let fake = FakeCoordinator::start(vec![
        Canned::new(201, r#"{"name":"prod","cidr":"100.64.0.0/16"}"#),
        Canned::new(
            201,
            r#"{"id":"t1","token":"mlj1_abc","network":"prod","tags":["web"],
                "expires_at":1714568400,"uses":1,"used":0}"#,
        ),
    ]);
    let client = client(&fake.url());
    client
        .create_network(&NewNetwork {
            name: "prod".into(),
            cidr: "100.64.0.0/16".into(),
        })
        .unwrap();
    let request = fake.request();
    assert_eq!(
        (request.method.as_str(), request.target.as_str()),
        ("POST", "/v1/networks")
    );
    assert!(request
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let sent: serde_json::Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(sent, json!({"name": "prod", "cidr": "100.64.0.0/16"}));

    let reply = client
        .create_token(&NewToken {
            network: "prod".into(),
            tags: vec!["web".into()],
            expires_in_secs: Some(3_600),
            uses: None,
        })
        .unwrap();
    assert_eq!(reply.value.token.as_deref(), Some("mlj1_abc"));
    let request = fake.request();
    let sent: serde_json::Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(
        sent,
        json!({"network": "prod", "tags": ["web"], "expires_in_secs": 3600})
    );
}

#[test]
fn node_routes_escape_the_reference_and_pass_the_network() {
    let node = r#"{"id":"n1","name":"web 1","network":"prod","revoked":true}"#;
    let fake = FakeCoordinator::start(vec![
        Canned::new(200, node),
        Canned::new(200, node),
        Canned::new(204, ""),
        Canned::new(204, ""),
        Canned::new(200, "[]"),
    ]);
    let client = client(&fake.url());
    client.node("web 1", Some("prod/eu")).unwrap();
    assert_eq!(fake.request().target, "/v1/nodes/web%201?network=prod%2Feu");
    let revoked = client.revoke_node("n1", None).unwrap();
    assert!(revoked.value.revoked);
    let request = fake.request();
    assert_eq!(
        (request.method.as_str(), request.target.as_str()),
        ("POST", "/v1/nodes/n1/revoke")
    );
    client.delete_node("n1", None).unwrap();
    let request = fake.request();
    assert_eq!(
        (request.method.as_str(), request.target.as_str()),
        ("DELETE", "/v1/nodes/n1")
    );
    client.revoke_token("t1").unwrap();
    assert_eq!(fake.request().target, "/v1/tokens/t1");
    client.nodes(Some("prod")).unwrap();
    assert_eq!(fake.request().target, "/v1/nodes?network=prod");
}

#[test]
fn unauthorized_is_its_own_error() {
    let fake = FakeCoordinator::start(vec![Canned::new(401, r#"{"error":"bad token"}"#)]);
    let err = client(&fake.url()).status().unwrap_err();
    assert!(matches!(err, ClientError::Unauthorized), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the coordinator refused the admin token (401)"
    );
    assert_eq!(err.status(), Some(401));
}

#[test]
fn error_json_becomes_the_message() {
    let fake = FakeCoordinator::start(vec![
        Canned::new(404, r#"{"error":"no node \"ghost\" in network \"prod\""}"#),
        Canned::new(409, r#"{"error":"network \"prod\" already exists"}"#),
        Canned::new(500, "internal failure, not JSON"),
    ]);
    let client = client(&fake.url());
    let err = client.node("ghost", Some("prod")).unwrap_err();
    assert!(
        matches!(err, ClientError::Api { status: 404, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        r#"the coordinator answered 404 Not Found: no node "ghost" in network "prod""#
    );
    let err = client
        .create_network(&NewNetwork {
            name: "prod".into(),
            cidr: "10.0.0.0/8".into(),
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"the coordinator answered 409 Conflict: network "prod" already exists"#
    );
    let err = client.tokens().unwrap_err();
    assert_eq!(
        err.to_string(),
        "the coordinator answered 500 Internal Server Error: internal failure, not JSON"
    );
}

#[test]
fn unexpected_success_body_is_a_bad_response() {
    let fake = FakeCoordinator::start(vec![Canned::new(200, r#"{"not":"a list"}"#)]);
    let err = client(&fake.url()).networks().unwrap_err();
    assert!(
        matches!(err, ClientError::BadResponse { status: 200, .. }),
        "{err:?}"
    );
}

#[test]
fn connection_refused_names_the_coordinator() {
    let url = closed_url();
    let err = client(&url).status().unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("cannot reach the coordinator at {url}: ")),
        "{message}"
    );
    assert!(message.to_lowercase().contains("refused"), "{message}");
    assert_eq!(err.status(), None);
}
