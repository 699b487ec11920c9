//! The wire format, pinned: answers exactly as the coordinator sent them before these types
//! were shared (taken from a coordinator on loopback) read into the types and written back
//! byte for byte, field order included; requests as `meshctl` sends them.

use meshlink_api::{
    CreateNetwork, CreateToken, CreateWorkload, CreatedToken, ErrorBody, Generation, MoveWorkload,
    MovedWorkload, Network, Node, NodeId, Status, Token, TokenId, TokenLifetime, TokenUses,
    UnixTime, Workload, WorkloadNode, WorkloadState,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Reads `text` as `T` and checks that writing it back gives `text` again.
fn round_trip<T: Serialize + DeserializeOwned>(text: &str) -> T {
    let value: T = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(serde_json::to_string(&value).unwrap(), text);
    value
}

#[test]
fn networks() {
    let list: Vec<Network> = round_trip(
        r#"[{"name":"dev","cidr":"100.64.1.0/24","version":1,"nodes":1,"online":0,"created_at":1796431330},{"name":"prod","cidr":"100.64.0.0/24","version":3,"nodes":3,"online":1,"created_at":1796431330}]"#,
    );
    assert_eq!(list[1].cidr.to_string(), "100.64.0.0/24");
    assert_eq!(list[1].created_at, UnixTime(1_796_431_330));
}

#[test]
fn tokens() {
    let created: CreatedToken = round_trip(
        r#"{"id":1,"token":"mlj1_eyJjIjoiMTI3LjAuMC4xOjUyNjUyIn0","network":"prod","tags":["role=web"],"expires_at":1796434930,"uses":3,"used":0}"#,
    );
    assert_eq!(created.id, TokenId(1));
    let list: Vec<Token> = round_trip(
        r#"[{"id":1,"network":"prod","tags":["role=web"],"expires_at":1796434930,"uses":3,"used":0,"revoked":true,"expired":false,"created_at":1796431330},{"id":2,"network":"prod","tags":[],"expires_at":null,"uses":null,"used":0,"revoked":false,"expired":false,"created_at":1796431330}]"#,
    );
    assert_eq!((list[1].expires_at, list[1].uses), (None, None));
}

#[test]
fn nodes() {
    let node: Node = round_trip(
        r#"{"id":1,"name":"vm-a","network":"prod","address":"100.64.0.1","public_key":"QgEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","labels":{"provider":"test","zone":"eu"},"tags":["web"],"endpoints":["198.18.0.1:51820","[2001:db8::1]:51820"],"online":true,"last_seen":1796431330,"revoked":false,"created_at":1796431330}"#,
    );
    assert_eq!(node.id, NodeId(1));
    assert_eq!(node.endpoints[1].port(), 51820);
    assert_eq!(node.labels["zone"], "eu");
}

#[test]
fn workloads() {
    let w: Workload = round_trip(
        r#"{"name":"db","network":"prod","address":"100.64.0.50","holder":null,"generation":3,"previous":{"id":3,"name":null},"standby":[{"id":2,"name":"vm-b"},{"id":3,"name":null}],"allowed":[{"id":3,"name":null},{"id":2,"name":"vm-b"}],"tags":[],"state":"detached","created_at":1796431330,"moved_at":1796431330}"#,
    );
    assert_eq!(
        w.previous,
        Some(WorkloadNode {
            id: NodeId(3),
            name: None
        })
    );
    assert_eq!(w.state, WorkloadState::Detached);
    let moved: MovedWorkload = round_trip(
        r#"{"name":"db","network":"prod","address":"100.64.0.50","holder":{"id":2,"name":"vm-b"},"generation":1,"previous":null,"standby":[{"id":2,"name":"vm-b"},{"id":3,"name":"vm-c"}],"allowed":[{"id":3,"name":"vm-c"},{"id":2,"name":"vm-b"}],"tags":[],"state":"holder-offline","created_at":1796431330,"moved_at":1796431330,"changed":true,"prepared_ms":null,"took_ms":1.109}"#,
    );
    assert_eq!(moved.workload.generation, Generation(1));
    assert_eq!(moved.workload.state, WorkloadState::HolderOffline);
    let moved: MovedWorkload = round_trip(
        r#"{"name":"chat","network":"prod","address":"100.64.0.4","holder":{"id":1,"name":"vm-a"},"generation":1,"previous":null,"standby":[],"allowed":[],"tags":[],"state":"held","created_at":1796431330,"moved_at":1796431331,"changed":true,"prepared_ms":3.25,"took_ms":0.0}"#,
    );
    assert_eq!(moved.prepared_ms, Some(3.25));
}

#[test]
fn status() {
    let status: Status = round_trip(
        r#"{"version":"0.1.0","networks":2,"nodes":2,"online":1,"uptime_secs":0,"quic_listen":"127.0.0.1:52652","advertise":"127.0.0.1:52652","fingerprint":"f5b43b83","coordinators":[{"address":"127.0.0.1:52652","sessions":1,"up":true}]}"#,
    );
    assert_eq!(status.coordinators.len(), 1);
}

#[test]
fn answers_tolerate_what_an_older_or_newer_coordinator_sends() {
    // Before 2026-12 there was no list of coordinators; a newer one may add fields.
    let status: Status = serde_json::from_str(
        r#"{"version":"0.1.0","networks":0,"nodes":0,"online":0,"uptime_secs":5,"quic_listen":"[::]:7443","advertise":"a:7443","fingerprint":"f","brand_new":[1]}"#,
    )
    .unwrap();
    assert!(status.coordinators.is_empty());
    // A move answer without `prepared_ms` reads as "not asked".
    let moved: MovedWorkload = serde_json::from_str(
        r#"{"name":"chat","network":"prod","address":"100.64.0.4","holder":null,"generation":2,"previous":null,"standby":[],"allowed":[],"state":"detached","created_at":1,"moved_at":null,"changed":false,"took_ms":0.5,"brand_new":true}"#,
    )
    .unwrap();
    assert_eq!(moved.prepared_ms, None);
}

#[test]
fn requests() {
    let network = CreateNetwork {
        name: "prod".parse().unwrap(),
        cidr: "100.64.0.0/16".into(),
        cidr6: None,
    };
    assert_eq!(
        serde_json::to_string(&network).unwrap(),
        r#"{"name":"prod","cidr":"100.64.0.0/16"}"#
    );
    // Absent options are left out, so the coordinator's defaults apply.
    let token = CreateToken {
        network: "prod".parse().unwrap(),
        tags: vec![],
        expires_in_secs: None,
        uses: Some(TokenUses::Limit(1)),
    };
    assert_eq!(
        serde_json::to_string(&token).unwrap(),
        r#"{"network":"prod","tags":[],"uses":1}"#
    );
    // No limit is asked for in words.
    let open = CreateToken {
        network: "prod".parse().unwrap(),
        tags: vec![],
        expires_in_secs: Some(TokenLifetime::Never),
        uses: Some(TokenUses::Unlimited),
    };
    assert_eq!(
        serde_json::to_string(&open).unwrap(),
        r#"{"network":"prod","tags":[],"expires_in_secs":"never","uses":"unlimited"}"#
    );
    let read: CreateToken =
        round_trip(r#"{"network":"prod","tags":[],"expires_in_secs":"never","uses":"unlimited"}"#);
    assert_eq!(read, open);
    let read: CreateToken =
        round_trip(r#"{"network":"prod","tags":[],"expires_in_secs":3600,"uses":10}"#);
    assert_eq!(
        (read.expires_in_secs, read.uses),
        (Some(TokenLifetime::Secs(3600)), Some(TokenUses::Limit(10)))
    );
    let workload = CreateWorkload {
        name: "chat".parse().unwrap(),
        network: "prod".parse().unwrap(),
        address: None,
        standby: vec!["vm-d".into()],
        allowed: vec![],
        tags: vec![],
    };
    assert_eq!(
        serde_json::to_string(&workload).unwrap(),
        r#"{"name":"chat","network":"prod","standby":["vm-d"],"allowed":[]}"#
    );
    let workload: CreateWorkload = round_trip(
        r#"{"name":"db","network":"prod","address":"100.64.0.50","standby":["vm-b","vm-c"],"allowed":["vm-c","2"]}"#,
    );
    assert_eq!(workload.address, Some("100.64.0.50".parse().unwrap()));
    round_trip::<MoveWorkload>(r#"{"node":"vm-c"}"#);
    round_trip::<ErrorBody>(r#"{"error":"no such route"}"#);
}

#[test]
fn requests_with_defaults_and_refusals() {
    // What a hand-written request may leave out or set to null.
    // Absent and null limits both mean the coordinator's default (one use, one hour).
    let token: CreateToken =
        serde_json::from_str(r#"{"network":"prod","expires_in_secs":null,"uses":null}"#).unwrap();
    assert_eq!(
        (token.tags.len(), token.expires_in_secs, token.uses),
        (0, None, None)
    );
    for (text, says) in [
        (r#"{"network":"p","uses":"lots"}"#, r#""unlimited""#),
        (r#"{"network":"p","uses":-1}"#, r#""unlimited""#),
        (r#"{"network":"p","uses":1.5}"#, r#""unlimited""#),
        (
            r#"{"network":"p","expires_in_secs":"forever"}"#,
            r#""never""#,
        ),
        (r#"{"network":"p","expires_in_secs":"Never"}"#, r#""never""#),
    ] {
        let err = serde_json::from_str::<CreateToken>(text).unwrap_err();
        assert!(err.to_string().contains(says), "{text}: {err}");
    }
    let workload: CreateWorkload =
        serde_json::from_str(r#"{"name":"x","network":"prod","address":null}"#).unwrap();
    assert_eq!(workload.address, None);
    // Unknown fields and malformed values are refused, naming the field.
    for (text, says) in [
        (r#"{"name":"x","network":"p","holder":"vm-a"}"#, "`holder`"),
        (
            r#"{"name":"x","network":"p","address":"10.0.0.1/32"}"#,
            "IPv4",
        ),
        (r#"{"name":"x"}"#, "`network`"),
        (
            r#"{"name":"X","network":"p"}"#,
            r#"workload name "X" is not valid"#,
        ),
        (
            r#"{"name":"x","network":"p/q"}"#,
            r#"network name "p/q" is not valid"#,
        ),
    ] {
        let err = serde_json::from_str::<CreateWorkload>(text).unwrap_err();
        assert!(err.to_string().contains(says), "{text}: {err}");
    }
    assert!(serde_json::from_str::<MoveWorkload>(r#"{"to":"vm-a"}"#).is_err());
    assert!(serde_json::from_str::<CreateNetwork>(r#"{"name":"a","cidr":"b","z":1}"#).is_err());
}
