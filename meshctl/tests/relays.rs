//! `meshctl relay list` against a real coordinator in process ([`real::Mesh`]) configured with
//! `[[relays]]` entries: the table, `-o json` as the server's own answer, a read token, and
//! what a coordinator whose embedded relay is off says.

mod real;

use meshlink_proto::relay::RelayInfo;
use real::Mesh;
use serde_json::json;

/// Two `[[relays]]` entries: one with both labels, one with none.
fn relays() -> Vec<RelayInfo> {
    vec![
        RelayInfo {
            name: "eu-1".into(),
            addr: "relay-eu-1.example:7450".into(),
            fingerprint: "3f".repeat(32),
            region: "eu-west".into(),
            provider: "hetzner".into(),
        },
        RelayInfo {
            name: "us-1".into(),
            addr: "198.51.100.9:7450".into(),
            fingerprint: "4e".repeat(32),
            region: String::new(),
            provider: String::new(),
        },
    ]
}

/// Each line of `text` with its runs of spaces made one (column widths follow the
/// coordinator's ephemeral port).
fn squeeze(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn relay_list_shows_the_embedded_relay_and_the_configured_ones() {
    let mesh = Mesh::start_with(|s| s.relays = relays());
    let advertise = mesh.get("/v1/status")["advertise"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        squeeze(&mesh.run(&["relay", "list"])),
        [
            "NAME KIND ADDRESS OVER REGION PROVIDER STATE".to_string(),
            format!("- embedded {advertise} udp,tcp - - on"),
            "eu-1 standalone relay-eu-1.example:7450 udp,tcp eu-west hetzner granted".into(),
            "us-1 standalone 198.51.100.9:7450 udp,tcp - - granted".into(),
        ]
    );

    // The JSON is the server's, field for field.
    let served = mesh.get("/v1/relays");
    assert_eq!(mesh.run_json(&["relay", "list"]), served);
    assert_eq!(
        served,
        json!({
            "embedded": {"on": true, "addr": advertise, "transports": ["udp", "tcp"]},
            "standalone": [
                {"name": "eu-1", "addr": "relay-eu-1.example:7450",
                 "transports": ["udp", "tcp"], "fingerprint": "3f".repeat(32),
                 "region": "eu-west", "provider": "hetzner", "granted": true},
                {"name": "us-1", "addr": "198.51.100.9:7450",
                 "transports": ["udp", "tcp"], "fingerprint": "4e".repeat(32),
                 "region": null, "provider": null, "granted": true},
            ],
            // A lone coordinator: its agents meet on its embedded relay.
            "coordinators": []
        })
    );
    // The library client reads the same.
    let typed = mesh.client().relays().expect("an answer").value;
    assert_eq!(typed.standalone.len(), 2);
    assert_eq!(typed.standalone[1].region, None);

    // A read token may list them.
    let created = mesh.run_json(&[
        "admin-token",
        "create",
        "--name",
        "reader",
        "--role",
        "read",
    ]);
    let out = mesh.meshctl_as(
        created["token"].as_str().unwrap(),
        &["relay", "list", "-o", "json"],
    );
    assert!(out.status.success(), "{out:?}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, served);

    // So may a token limited to one network, without naming it: the relays serve them all.
    mesh.run(&["network", "create", "prod", "--cidr", "100.64.0.0/16"]);
    let limited = mesh.run_json(&[
        "admin-token",
        "create",
        "--name",
        "prod-reader",
        "--role",
        "read",
        "--network",
        "prod",
    ]);
    let out = mesh.meshctl_as(
        limited["token"].as_str().unwrap(),
        &["relay", "list", "-o", "json"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        served
    );
}

/// A coordinator whose own relay is off relays nothing and announces no standalone relay (the
/// grants ride its relay's channel): they are listed, not granted.
#[test]
fn with_the_embedded_relay_off_none_is_granted() {
    let mesh = Mesh::start_with(|s| {
        s.relay = false;
        s.relays = relays();
    });
    let table = squeeze(&mesh.run(&["relay", "list"]));
    assert!(table[1].starts_with("- embedded ") && table[1].ends_with(" - - - off"));
    assert_eq!(
        table[2],
        "eu-1 standalone relay-eu-1.example:7450 udp,tcp eu-west hetzner not granted"
    );
    let served = mesh.get("/v1/relays");
    assert_eq!(served["embedded"]["on"], json!(false));
    assert_eq!(served["embedded"]["transports"], json!([]));
    assert_eq!(served["standalone"][1]["granted"], json!(false));
}
