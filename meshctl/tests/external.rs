//! External devices through the built `meshctl` against a real coordinator in process
//! ([`real::Mesh`]): `node add-external`, `node external-config` and `node rotate-key` of an
//! external node. The configurations printed are read line by line as wg-quick reads them, and
//! a private key meshctl made is checked against the public key the coordinator stored.

mod real;

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;

use meshlink_api::{Node, PublicKey};
use meshlink_proto::Key;
use real::{failure, Mesh};
use x25519_dalek::StaticSecret;

/// vm-a's public key, as [`Mesh::join`] makes it for key byte 1.
const VM_A_KEY: &str = "QgEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// A device's own key pair: its public key, as a device that made its pair gives it.
const DEVICE_KEY: &str = "QgkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";

/// A wg-quick file as read: each section's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WgQuick {
    interface: BTreeMap<String, String>,
    peer: BTreeMap<String, String>,
}

/// Reads `text` strictly: every line is empty, a comment, a section header or a known
/// `Key = value` of its section, set once; `[Interface]` first, then exactly one `[Peer]`. The
/// values are checked for their form: keys are 32 bytes of base64 (or the private key left
/// empty), the address one /32, the endpoint `HOST:PORT`.
fn parse(text: &str) -> WgQuick {
    assert!(text.ends_with('\n'), "{text}");
    let mut interface = BTreeMap::new();
    let mut peer = BTreeMap::new();
    let mut section: Option<&str> = None;
    let mut peers = 0;
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line {
            "[Interface]" => {
                assert_eq!(section, None, "line {n}: a second [Interface]");
                section = Some("Interface");
            }
            "[Peer]" => {
                assert_eq!(section, Some("Interface"), "line {n}: [Peer] out of place");
                section = Some("Peer");
                peers += 1;
            }
            _ => {
                let (key, value) = line
                    .split_once(" = ")
                    .unwrap_or_else(|| panic!("line {n} is not `Key = value`: {line:?}"));
                let known: &[&str] = match section {
                    Some("Interface") => &["PrivateKey", "Address"],
                    Some("Peer") => &["PublicKey", "Endpoint", "AllowedIPs", "PersistentKeepalive"],
                    _ => panic!("line {n} is outside a section: {line:?}"),
                };
                assert!(known.contains(&key), "line {n}: unknown key {key:?}");
                let settings = if section == Some("Peer") {
                    &mut peer
                } else {
                    &mut interface
                };
                assert!(
                    settings.insert(key.to_owned(), value.to_owned()).is_none(),
                    "line {n}: {key} set twice"
                );
            }
        }
    }
    assert_eq!(peers, 1, "{text}");
    let private = &interface["PrivateKey"];
    assert!(
        private.is_empty() || Key::from_base64(private).is_ok(),
        "{private}"
    );
    let (address, len) = interface["Address"].split_once('/').unwrap();
    address.parse::<Ipv4Addr>().unwrap();
    assert_eq!(len, "32");
    peer["PublicKey"].parse::<PublicKey>().unwrap();
    let (host, port) = peer["Endpoint"].rsplit_once(':').unwrap();
    assert!(!host.is_empty() && port.parse::<u16>().unwrap() > 0);
    assert_eq!(peer["PersistentKeepalive"], "25");
    assert_eq!(peer.len(), 4, "{text}");
    WgQuick { interface, peer }
}

/// The public key of the private key in a configuration.
fn public_of(config: &WgQuick) -> PublicKey {
    let private = Key::from_base64(&config.interface["PrivateKey"]).unwrap();
    PublicKey(x25519_dalek::PublicKey::from(&StaticSecret::from(private.0)).to_bytes())
}

/// A node as the coordinator has it.
fn stored(mesh: &Mesh, name: &str) -> Node {
    mesh.client().node(name, Some("prod")).unwrap().value
}

/// Whether `text` is a QR code as meshctl draws it: lines of half and full blocks and spaces,
/// all as wide, at least a version 1 code (21 modules) with its quiet zone.
fn is_qr_code(text: &str) -> bool {
    let lines: Vec<&str> = text.lines().collect();
    let width = lines.first().map_or(0, |l| l.chars().count());
    width >= 29
        && lines.iter().all(|l| l.chars().count() == width)
        && text
            .chars()
            .all(|c| " \u{2580}\u{2584}\u{2588}\n".contains(c))
}

/// A mesh with network `prod` (100.64.0.0/24) and the gateway `vm-a` (online, endpoints
/// `198.18.0.1:51820` reported and `198.18.7.7:51820` observed).
fn mesh_with_gateway() -> Mesh {
    let mesh = Mesh::start();
    mesh.run(&["network", "create", "prod", "--cidr", "100.64.0.0/24"]);
    mesh.join("prod", 1, "vm-a", true);
    mesh
}

#[test]
fn add_external_prints_a_configuration_with_a_key_made_here() {
    let mesh = mesh_with_gateway();
    let output = mesh.meshctl(&[
        "node",
        "add-external",
        "phone",
        "--network",
        "prod",
        "--via",
        "vm-a",
        "--tag",
        "mobile",
    ]);
    assert!(output.status.success(), "{output:?}");
    assert!(output.stderr.is_empty(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let config = parse(&text);
    assert_eq!(config.interface["Address"], "100.64.0.2/32");
    assert_eq!(
        config.peer,
        BTreeMap::from([
            ("PublicKey".into(), VM_A_KEY.into()),
            ("Endpoint".into(), "198.18.0.1:51820".into()),
            ("AllowedIPs".into(), "100.64.0.0/24".into()),
            ("PersistentKeepalive".into(), "25".into()),
        ])
    );
    // The private key printed is the one whose public key the coordinator has.
    let phone = stored(&mesh, "phone");
    assert_eq!(public_of(&config), phone.public_key);
    assert_eq!(phone.via.as_deref(), Some("vm-a"));
    assert_eq!(phone.tags, ["mobile"]);
    assert!(!mesh
        .get("/v1/nodes/phone")
        .to_string()
        .contains(&config.interface["PrivateKey"]));

    // The node list and the node name the gateway.
    let list = mesh.run(&["node", "list", "--network", "prod"]);
    let row = list.lines().find(|l| l.starts_with("phone ")).unwrap();
    assert_eq!(
        row.split_whitespace().take(6).collect::<Vec<_>>(),
        ["phone", "2", "prod", "100.64.0.2", "vm-a", "-"],
        "{list}"
    );
    let shown = mesh.run(&["node", "show", "phone"]);
    assert!(shown.contains("\nVIA         vm-a (external: "), "{shown}");

    // Printed again: the same peer, the private key left to fill in.
    let again = mesh.run(&["node", "external-config", "phone", "--network", "prod"]);
    let reprinted = parse(&again);
    assert_eq!(reprinted.peer, config.peer);
    assert_eq!(reprinted.interface["Address"], "100.64.0.2/32");
    assert_eq!(reprinted.interface["PrivateKey"], "");
    assert!(
        again.contains("# The device's own private key goes here"),
        "{again}"
    );
    // With another endpoint for the gateway.
    let elsewhere = parse(&mesh.run(&[
        "node",
        "external-config",
        "2",
        "--endpoint",
        "gw.example.com:443",
    ]));
    assert_eq!(elsewhere.peer["Endpoint"], "gw.example.com:443");

    // JSON: the coordinator's answer and the text.
    let json = mesh.run_json(&["node", "external-config", "phone"]);
    assert_eq!(json["external_node"], mesh.get("/v1/external-nodes/phone"));
    assert_eq!(json["wg_quick"].as_str(), Some(again.as_str()));
    assert_eq!(json["external_node"]["gateway"]["name"], "vm-a");
}

#[test]
fn out_files_and_qr_codes() {
    let mesh = mesh_with_gateway();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tablet.conf");
    let out = path.to_str().unwrap();

    // The device made its pair: the file has the line for its private key.
    let summary = mesh.run(&[
        "node",
        "add-external",
        "tablet",
        "--network",
        "prod",
        "--via",
        "vm-a",
        "--public-key",
        DEVICE_KEY,
        "--out",
        out,
    ]);
    assert_eq!(
        summary,
        format!(
            "external node tablet registered: 100.64.0.2 in prod, through vm-a at \
             198.18.0.1:51820; its WireGuard configuration is in {out}\n"
        )
    );
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let config = parse(&fs::read_to_string(&path).unwrap());
    assert_eq!(config.interface["PrivateKey"], "");
    assert_eq!(config.peer["PublicKey"], VM_A_KEY);
    assert_eq!(stored(&mesh, "tablet").public_key.to_string(), DEVICE_KEY);

    // An existing file is not overwritten, and nothing is registered.
    let before = fs::read(&path).unwrap();
    let refused = failure(&mesh.meshctl(&[
        "node",
        "add-external",
        "tablet-2",
        "--network",
        "prod",
        "--via",
        "vm-a",
        "--out",
        out,
    ]));
    assert_eq!(
        refused,
        format!(
            "meshctl: {out}: the file exists; meshctl does not overwrite it: name a new file\n"
        )
    );
    assert_eq!(fs::read(&path).unwrap(), before);
    assert!(mesh.client().node("tablet-2", Some("prod")).is_err());

    // A QR code instead of the text; with a key made here, nothing on stderr.
    let output = mesh.meshctl(&[
        "node",
        "add-external",
        "phone",
        "--network",
        "prod",
        "--via",
        "vm-a",
        "--qr",
    ]);
    assert!(output.status.success(), "{output:?}");
    assert!(output.stderr.is_empty(), "{output:?}");
    let qr = String::from_utf8(output.stdout).unwrap();
    assert!(is_qr_code(&qr), "{qr}");

    // With --out, the file and the QR code. Without the private key, a note says what the
    // code lacks.
    let path = dir.path().join("tablet-again.conf");
    let output = mesh.meshctl(&[
        "node",
        "external-config",
        "tablet",
        "--out",
        path.to_str().unwrap(),
        "--qr",
    ]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let (line, qr) = text.split_once('\n').unwrap();
    assert!(
        line.starts_with("external node tablet: 100.64.0.2 in prod"),
        "{line}"
    );
    assert!(is_qr_code(qr), "{qr}");
    let note = String::from_utf8(output.stderr).unwrap();
    assert!(note.contains("the QR code has no private key"), "{note}");
    assert_eq!(parse(&fs::read_to_string(&path).unwrap()), config);

    let refused =
        failure(&mesh.meshctl(&["node", "external-config", "tablet", "--qr", "-o", "json"]));
    assert!(refused.contains("--qr"), "{refused}");
}

#[test]
fn rotating_an_external_nodes_key() {
    let mesh = mesh_with_gateway();
    let first = parse(&mesh.run(&[
        "node",
        "add-external",
        "phone",
        "--network",
        "prod",
        "--via",
        "vm-a",
    ]));
    let old = stored(&mesh, "phone").public_key;

    // An external node's rotation needs its new key: the coordinator says so.
    let refused = failure(&mesh.meshctl(&["node", "rotate-key", "phone"]));
    assert!(
        refused.starts_with("meshctl: the coordinator answered 400 Bad Request: public_key: "),
        "{refused}"
    );
    assert_eq!(stored(&mesh, "phone").public_key, old);

    // A pair made here, its configuration in a new private file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.conf");
    let summary = mesh.run(&[
        "node",
        "rotate-key",
        "phone",
        "--network",
        "prod",
        "--new-key",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(
        summary.starts_with("external node phone has a new key: "),
        "{summary}"
    );
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let rotated = parse(&fs::read_to_string(&path).unwrap());
    let new = stored(&mesh, "phone").public_key;
    assert_ne!(new, old);
    assert_eq!(public_of(&rotated), new);
    assert_eq!(rotated.peer, first.peer);
    assert_eq!(rotated.interface["Address"], first.interface["Address"]);

    // In JSON, the answer shows the new key.
    let json = mesh.run_json(&["node", "rotate-key", "phone", "--new-key"]);
    let config = parse(json["wg_quick"].as_str().unwrap());
    let newer = stored(&mesh, "phone").public_key;
    assert_eq!(public_of(&config), newer);
    assert_eq!(
        json["external_node"]["node"]["public_key"],
        newer.to_string()
    );

    // The device made the new pair.
    let shown = mesh.run(&["node", "rotate-key", "phone", "--public-key", DEVICE_KEY]);
    assert!(
        shown.contains(&format!("\nPUBLIC KEY  {DEVICE_KEY}\n")),
        "{shown}"
    );
    assert_eq!(stored(&mesh, "phone").public_key.to_string(), DEVICE_KEY);

    // A node with an agent makes its own pair: a new key for it is refused before anything
    // changes, and its rotation is asked as before.
    let vm_a = stored(&mesh, "vm-a");
    let refused = failure(&mesh.meshctl(&["node", "rotate-key", "vm-a", "--new-key"]));
    assert!(refused.contains("400 Bad Request"), "{refused}");
    let refused =
        failure(&mesh.meshctl(&["node", "rotate-key", "vm-a", "--public-key", DEVICE_KEY]));
    assert!(refused.contains("public_key: "), "{refused}");
    assert_eq!(stored(&mesh, "vm-a").public_key, vm_a.public_key);
    let asked = mesh.run(&["node", "rotate-key", "vm-a"]);
    assert!(asked.contains("\nROTATION    asked "), "{asked}");
}

#[test]
fn refusals_name_what_is_wrong() {
    let mesh = mesh_with_gateway();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ghost.conf");
    let add = |name: &str, extra: &[&str]| {
        let mut args = vec!["node", "add-external", name, "--network", "prod"];
        args.extend(extra);
        mesh.meshctl(&args)
    };

    // No such gateway: the coordinator names `via`, and the file claimed first is gone again.
    let refused = failure(&add(
        "phone",
        &["--via", "ghost", "--out", path.to_str().unwrap()],
    ));
    assert!(
        refused.starts_with("meshctl: the coordinator answered 404 Not Found: via: "),
        "{refused}"
    );
    assert!(!path.exists());

    // A key no tunnel would be private with; a key that is not one.
    let zero = Key([0; 32]).to_base64();
    let refused = failure(&add("phone", &["--via", "vm-a", "--public-key", &zero]));
    assert!(
        refused.starts_with("meshctl: the coordinator answered 400 Bad Request: public_key: "),
        "{refused}"
    );
    let output = add("phone", &["--via", "vm-a", "--public-key", "not-a-key"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--public-key"));

    // A name taken, by a node with an agent or an external one; the same key twice.
    let refused = failure(&add("vm-a", &["--via", "vm-a"]));
    assert!(
        refused.starts_with("meshctl: the coordinator answered 409 Conflict: name: "),
        "{refused}"
    );
    mesh.run(&[
        "node",
        "add-external",
        "phone",
        "--network",
        "prod",
        "--via",
        "vm-a",
        "--public-key",
        DEVICE_KEY,
    ]);
    let refused = failure(&add("phone", &["--via", "vm-a"]));
    assert!(refused.contains("409 Conflict: name: "), "{refused}");
    let refused = failure(&add(
        "tablet",
        &["--via", "vm-a", "--public-key", DEVICE_KEY],
    ));
    assert!(refused.contains("409 Conflict: public_key: "), "{refused}");

    // A gateway that is external itself; a node with an agent has no configuration to print.
    let refused = failure(&add("tablet", &["--via", "phone"]));
    assert!(refused.contains("400 Bad Request: via: "), "{refused}");
    let refused = failure(&mesh.meshctl(&["node", "external-config", "vm-a"]));
    assert!(refused.contains("400 Bad Request: "), "{refused}");
    let refused = failure(&mesh.meshctl(&["node", "external-config", "ghost"]));
    assert!(refused.contains("404 Not Found: "), "{refused}");
}

#[test]
fn a_gateway_without_an_endpoint_needs_one_given() {
    let mesh = Mesh::start();
    mesh.run(&["network", "create", "prod", "--cidr", "100.64.0.0/24"]);
    mesh.join_reporting("prod", 1, "vm-a", true, &[]);
    assert!(stored(&mesh, "vm-a").endpoints.is_empty());

    // The device's own key: registered, and the way to print the file is named.
    let refused = failure(&mesh.meshctl(&[
        "node",
        "add-external",
        "tablet",
        "--network",
        "prod",
        "--via",
        "vm-a",
        "--public-key",
        DEVICE_KEY,
    ]));
    assert_eq!(
        refused,
        "meshctl: external node tablet is registered, but its gateway vm-a has no known \
         endpoint; pass --endpoint HOST:PORT, where the device reaches vm-a; print its \
         configuration with `meshctl node external-config tablet --network prod --endpoint \
         HOST:PORT`\n"
    );
    let config = parse(&mesh.run(&[
        "node",
        "external-config",
        "tablet",
        "--network",
        "prod",
        "--endpoint",
        "203.0.113.10:51820",
    ]));
    assert_eq!(config.peer["Endpoint"], "203.0.113.10:51820");

    // A key made here is not kept: the way named makes a new one. No file is left behind.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.conf");
    let refused = failure(&mesh.meshctl(&[
        "node",
        "add-external",
        "phone",
        "--network",
        "prod",
        "--via",
        "vm-a",
        "--out",
        path.to_str().unwrap(),
    ]));
    assert!(
        refused.ends_with(
            "the key pair made for it was not kept: make a new one and print the configuration \
             with `meshctl node rotate-key phone --network prod --new-key --endpoint HOST:PORT`\n"
        ),
        "{refused}"
    );
    assert!(!path.exists());
    let old = stored(&mesh, "phone").public_key;

    // Rotating needs the endpoint too, and without it changes nothing.
    let refused = failure(&mesh.meshctl(&["node", "rotate-key", "phone", "--new-key"]));
    assert!(refused.contains("--endpoint HOST:PORT"), "{refused}");
    assert!(refused.ends_with("its key was not changed\n"), "{refused}");
    assert_eq!(stored(&mesh, "phone").public_key, old);
    let config = parse(&mesh.run(&[
        "node",
        "rotate-key",
        "phone",
        "--network",
        "prod",
        "--new-key",
        "--endpoint",
        "[2001:db8::1]:51820",
    ]));
    assert_eq!(config.peer["Endpoint"], "[2001:db8::1]:51820");
    assert_eq!(public_of(&config), stored(&mesh, "phone").public_key);
    assert!(dir.path().read_dir().unwrap().next().is_none());
}
