//! `meshctl` against the real admin API: a coordinator started in process on loopback
//! ([`real::Mesh`]), driven through the built binary (tables and `-o json`) and through the
//! library client (typed answers, errors). What `-o json` prints is checked against what the
//! server itself answers the same request, so the CLI's JSON is the server's JSON.

mod real;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use meshctl::client::ClientError;
use meshlink_api::{
    CreateNetwork, CreateWorkload, Generation, NodeId, TokenId, WorkloadNode, WorkloadState,
};
use meshlink_proto::token::JoinToken;
use real::{failure, mask, Mesh};
use serde_json::{json, Value};

/// Each line of `text`, masked ([`mask`]) and with runs of spaces made one, so that a table
/// whose column widths follow a volatile cell can be compared.
fn squeeze(text: &str) -> String {
    mask(text)
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The sorted keys of a JSON object.
fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// `list`, sorted.
fn sorted<'a>(list: &[&'a str]) -> Vec<&'a str> {
    let mut list = list.to_vec();
    list.sort_unstable();
    list
}

const NETWORK_KEYS: &[&str] = &["name", "cidr", "version", "nodes", "online", "created_at"];
const NODE_KEYS: &[&str] = &[
    "id",
    "name",
    "network",
    "address",
    "public_key",
    "labels",
    "tags",
    "endpoints",
    "online",
    "last_seen",
    "revoked",
    "created_at",
    "key_since",
];
const WORKLOAD_KEYS: &[&str] = &[
    "name",
    "network",
    "address",
    "holder",
    "generation",
    "previous",
    "standby",
    "allowed",
    "tags",
    "state",
    "created_at",
    "moved_at",
];

/// `network create --cidr6`: a prefix given, or `auto` (a random ULA /48 made by meshctl),
/// shown in the list; one outside fd00::/8 refused naming `cidr6`.
#[test]
fn networks_with_an_ipv6_prefix() {
    let mesh = Mesh::start();
    // An IPv6 prefix beside: given, or `auto` (a random ULA /48 made here).
    let v6 = mesh.run_json(&[
        "network",
        "create",
        "v6",
        "--cidr",
        "10.10.0.0/24",
        "--cidr6",
        "fd7a:115c:a1e0::/48",
    ]);
    assert_eq!(v6["cidr6"], json!("fd7a:115c:a1e0::/48"));
    let auto = mesh.run_json(&[
        "network",
        "create",
        "v6b",
        "--cidr",
        "10.11.0.0/24",
        "--cidr6",
        "auto",
    ]);
    let auto6 = auto["cidr6"].as_str().unwrap();
    assert!(
        auto6.starts_with("fd") && auto6.ends_with("::/48"),
        "{auto6}"
    );
    let err = failure(&mesh.meshctl(&[
        "network",
        "create",
        "v6c",
        "--cidr",
        "10.12.0.0/24",
        "--cidr6",
        "2001:db8::/48",
    ]));
    assert!(
        err.contains("cidr6") && err.contains("unique local"),
        "{err}"
    );
    assert_eq!(
        squeeze(&mask(&mesh.run(&["network", "list"]))),
        format!(
            "NAME CIDR NODES ONLINE VERSION CREATED\n\
             v6 10.10.0.0/24 fd7a:115c:a1e0::/48 0 0 0 <time>\n\
             v6b 10.11.0.0/24 {auto6} 0 0 0 <time>"
        )
    );
}

#[test]
fn networks_and_status() {
    let mesh = Mesh::start();
    let c = mesh.coordinator();
    assert_eq!(
        mask(&mesh.run(&["network", "create", "prod", "--cidr", "100.64.0.0/24"])),
        "NAME  CIDR           NODES  ONLINE  VERSION  CREATED\n\
         prod  100.64.0.0/24  0      0       0        <time>\n"
    );
    let lab = mesh.run_json(&["network", "create", "lab", "--cidr", "10.9.0.0/24"]);
    assert_eq!(keys(&lab), sorted(NETWORK_KEYS));
    assert_eq!(
        (&lab["name"], &lab["cidr"], &lab["version"], &lab["nodes"]),
        (&json!("lab"), &json!("10.9.0.0/24"), &json!(0), &json!(0))
    );
    assert!(lab["created_at"].as_i64().unwrap() > 1_600_000_000);
    assert!(
        lab.get("cidr6").is_none(),
        "an IPv4-only network's answer is as before"
    );

    let taken = failure(&mesh.meshctl(&["network", "create", "prod", "--cidr", "10.1.0.0/24"]));
    assert!(
        taken.starts_with("meshctl: the coordinator answered 409 Conflict: ")
            && taken.contains("prod"),
        "{taken}"
    );
    let bad = failure(&mesh.meshctl(&["network", "create", "x", "--cidr", "100.64.0.0/99"]));
    assert!(
        bad.starts_with("meshctl: the coordinator answered 400 Bad Request: "),
        "{bad}"
    );

    assert_eq!(
        mask(&mesh.run(&["network", "list"])),
        "NAME  CIDR           NODES  ONLINE  VERSION  CREATED\n\
         lab   10.9.0.0/24    0      0       0        <time>\n\
         prod  100.64.0.0/24  0      0       0        <time>\n"
    );
    let list = mesh.run_json(&["network", "list"]);
    assert_eq!(
        list,
        mesh.get("/v1/networks"),
        "-o json is the server's JSON"
    );
    assert_eq!(keys(&list[0]), sorted(NETWORK_KEYS));

    assert_eq!(
        squeeze(&mesh.run(&["status"])),
        format!(
            "VERSION {}\nUPTIME <dur>\nNETWORKS 2\nNODES 0\nONLINE 0\nQUIC LISTEN {}\n\
             ADVERTISE {}\nFINGERPRINT {}\nCOORDINATOR {} up 0 sessions",
            env!("CARGO_PKG_VERSION"),
            c.quic_addr(),
            c.advertise(),
            c.fingerprint(),
            c.advertise(),
        )
    );
    let mut status = mesh.run_json(&["status"]);
    let mut direct = mesh.get("/v1/status");
    assert!(status["uptime_secs"].is_u64() && status["tasks"].is_u64());
    // Both change from one answer to the next.
    for answer in [&mut status, &mut direct] {
        answer.as_object_mut().unwrap().remove("uptime_secs");
        answer.as_object_mut().unwrap().remove("tasks");
    }
    assert_eq!(status, direct, "-o json is the server's JSON");

    // The typed answers, through the library.
    let client = mesh.client();
    let networks = client.networks().unwrap().value;
    assert_eq!(networks[1].cidr.to_string(), "100.64.0.0/24");
    let status = client.status().unwrap().value;
    assert_eq!(status.quic_listen, c.quic_addr());
    assert_eq!(status.coordinators.len(), 1);
    assert!(status.coordinators[0].up);
    let err = client
        .create_network(&CreateNetwork {
            name: "prod".parse().unwrap(),
            cidr: "10.2.0.0/24".into(),
            cidr6: None,
        })
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Api { status: 409, .. }),
        "{err:?}"
    );
}

/// `token create` without `--uses` or `--expires` makes a token for one join within an hour;
/// `--uses N`, `--uses unlimited`, `--expires 30d` and `--expires never` ask for more.
#[test]
fn token_defaults_and_explicit_limits() {
    let mesh = Mesh::start();
    mesh.run(&["network", "create", "prod", "--cidr", "100.64.0.0/24"]);
    let created_at = |id: &Value| {
        let list = mesh.get("/v1/tokens");
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| &t["id"] == id)
            .unwrap_or_else(|| panic!("token {id} in {list}"))["created_at"]
            .as_i64()
            .unwrap()
    };

    let default = mesh.run_json(&["token", "create", "--network", "prod"]);
    assert_eq!(default["uses"], json!(1), "{default}");
    assert_eq!(
        default["expires_at"].as_i64(),
        Some(created_at(&default["id"]) + 3600),
        "{default}"
    );

    let more = mesh.run_json(&[
        "token",
        "create",
        "--network",
        "prod",
        "--uses",
        "10",
        "--expires",
        "30d",
    ]);
    assert_eq!(more["uses"], json!(10), "{more}");
    assert_eq!(
        more["expires_at"].as_i64(),
        Some(created_at(&more["id"]) + 30 * 86_400),
        "{more}"
    );

    let open = mesh.run_json(&[
        "token",
        "create",
        "--network",
        "prod",
        "--uses",
        "unlimited",
        "--expires",
        "never",
    ]);
    assert_eq!(
        (&open["uses"], &open["expires_at"]),
        (&Value::Null, &Value::Null),
        "{open}"
    );
    assert_eq!(
        squeeze(&mesh.run(&["token", "list"])),
        "ID NETWORK TAGS USES EXPIRES STATE\n\
         1 prod - 0/1 in <dur> active\n\
         2 prod - 0/10 in <dur> active\n\
         3 prod - 0/- never active"
    );
}

#[test]
fn tokens() {
    let mesh = Mesh::start();
    mesh.run(&["network", "create", "prod", "--cidr", "100.64.0.0/24"]);
    let args = [
        "token",
        "create",
        "--network",
        "prod",
        "--tag",
        "web",
        "--expires",
        "1h",
        "--uses",
        "1",
    ];
    let text = mesh.run(&args);
    let (fields, secret) = text.trim_end().rsplit_once('\n').unwrap();
    assert_eq!(
        mask(fields),
        "ID       1\n\
         NETWORK  prod\n\
         TAGS     web\n\
         EXPIRES  <time> (in <dur>)\n\
         USES     0/1\n"
    );
    let token = JoinToken::decode(secret).expect("the last line is the token");
    assert_eq!(token.fingerprint, mesh.coordinator().fingerprint());
    assert_eq!(token.coordinator, mesh.coordinator().advertise());

    let created = mesh.run_json(&[
        "token",
        "create",
        "--network",
        "prod",
        "--uses",
        "unlimited",
        "--expires",
        "never",
    ]);
    assert_eq!(
        keys(&created),
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
        (
            &created["id"],
            &created["expires_at"],
            &created["uses"],
            &created["tags"]
        ),
        (&json!(2), &Value::Null, &Value::Null, &json!([]))
    );
    assert!(created["token"].as_str().unwrap().starts_with("mlj1_"));

    assert_eq!(
        squeeze(&mesh.run(&["token", "list"])),
        "ID NETWORK TAGS USES EXPIRES STATE\n\
         1 prod web 0/1 in <dur> active\n\
         2 prod - 0/- never active"
    );
    assert_eq!(mesh.run(&["token", "revoke", "1"]), "token 1 revoked\n");
    assert_eq!(
        failure(&mesh.meshctl(&["token", "revoke", "99"])),
        "meshctl: the coordinator answered 404 Not Found: no join token with id 99\n"
    );
    assert_eq!(
        squeeze(&mesh.run(&["token", "list"])),
        "ID NETWORK TAGS USES EXPIRES STATE\n\
         1 prod web 0/1 in <dur> revoked\n\
         2 prod - 0/- never active"
    );
    let list = mesh.run_json(&["token", "list"]);
    assert_eq!(list, mesh.get("/v1/tokens"), "-o json is the server's JSON");
    assert!(
        !list.to_string().contains(secret),
        "a secret is never listed"
    );
    // JSON mode prints nothing for a change without an answer.
    assert_eq!(mesh.run(&["token", "revoke", "2", "-o", "json"]), "");

    let client = mesh.client();
    let tokens = client.tokens().unwrap().value;
    assert_eq!(
        tokens.iter().map(|t| (t.id, t.revoked)).collect::<Vec<_>>(),
        [(TokenId(1), true), (TokenId(2), true)]
    );
    assert!(tokens[0].expires_at.unwrap() > tokens[0].created_at);
}

#[test]
fn the_admin_token_from_a_private_file_or_refused() {
    let mesh = Mesh::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.token");
    fs::write(&path, format!("{}\n", mesh.admin_token())).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env_clear()
        .args(["--coordinator", &mesh.url(), "token", "list"])
        .arg("--admin-token-file")
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        "ID  NETWORK  TAGS  USES  EXPIRES  STATE\n"
    );

    let output = mesh.meshctl_as("wrong-token-wrong-token", &["status"]);
    assert_eq!(
        failure(&output),
        "meshctl: the coordinator refused the admin token (401)\n"
    );
    let err = meshctl::client::AdminClient::new(
        mesh.url().parse().unwrap(),
        meshctl::admin_token::AdminToken::new("wrong-token-wrong-token", "test").unwrap(),
    )
    .networks()
    .unwrap_err();
    assert!(matches!(err, ClientError::Unauthorized), "{err:?}");
}

#[test]
fn nodes() {
    let mesh = Mesh::start();
    mesh.run(&["network", "create", "prod", "--cidr", "100.64.0.0/24"]);
    mesh.run(&["network", "create", "dev", "--cidr", "100.64.1.0/24"]);
    let vm_a = mesh.join("prod", 1, "vm-a", true);
    let vm_b = mesh.join("prod", 2, "vm-b", false);
    mesh.join("dev", 3, "vm-a", false);
    assert_eq!((vm_a, vm_b), (NodeId(1), NodeId(2)));

    assert_eq!(
        squeeze(&mesh.run(&["node", "list", "--network", "prod"])),
        "NAME ID NETWORK ADDRESS VIA ONLINE LAST SEEN EXPIRES ENDPOINTS PATHS LABELS\n\
         vm-a 1 prod 100.64.0.1 - yes <dur> ago - 198.18.0.1:51820,198.18.7.7:51820 - provider=test\n\
         vm-b 2 prod 100.64.0.2 - no <dur> ago - 198.18.0.2:51820,198.18.7.7:51820 - provider=test"
    );
    let list = mesh.run_json(&["node", "list"]);
    assert_eq!(list, mesh.get("/v1/nodes"), "-o json is the server's JSON");
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert_eq!(keys(&list[0]), sorted(NODE_KEYS));

    assert_eq!(
        failure(&mesh.meshctl(&["node", "show", "vm-a"])),
        "meshctl: the coordinator answered 409 Conflict: node name \"vm-a\" exists in networks \
         prod, dev; say which with ?network=\n"
    );
    assert_eq!(
        mask(&mesh.run(&["node", "show", "vm-a", "--network", "dev"])),
        "NAME        vm-a\n\
         ID          3\n\
         NETWORK     dev\n\
         ADDRESS     100.64.1.1\n\
         PUBLIC KEY  QgMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=\n\
         ONLINE      no\n\
         LAST SEEN   <time> (<dur> ago)\n\
         ENDPOINTS   198.18.0.3:51820,198.18.7.7:51820\n\
         TAGS        -\n\
         LABELS      provider=test\n\
         CREATED     <time>\n\
         KEY SINCE   <time> (<dur> ago)\n"
    );
    let shown = mesh.run_json(&["node", "show", "2"]);
    assert_eq!(shown, mesh.get("/v1/nodes/2"));

    // A rotation asked: the answer says when; its agent makes the key (no agent here).
    let asked = mesh.run(&["node", "rotate-key", "vm-b", "--network", "prod"]);
    assert!(asked.contains("\nROTATION    asked "), "{asked}");
    let json = mesh.run_json(&["node", "rotate-key", "2"]);
    assert!(json["rotation_asked"].is_i64(), "{json}");
    assert_eq!(
        failure(&mesh.meshctl(&["node", "rotate-key", "ghost"])),
        "meshctl: the coordinator answered 404 Not Found: no node named \"ghost\"\n"
    );

    let revoked = mesh.run(&["node", "revoke", "vm-b", "--network", "prod"]);
    assert!(revoked.contains("\nONLINE      revoked\n"), "{revoked}");
    assert_eq!(
        mesh.run(&["node", "delete", "vm-b", "--network", "prod"]),
        "node vm-b deleted\n"
    );
    assert_eq!(
        failure(&mesh.meshctl(&["node", "delete", "ghost"])),
        "meshctl: the coordinator answered 404 Not Found: no node named \"ghost\"\n"
    );

    // The typed answers, and a reference and network that need escaping in the URL.
    let client = mesh.client();
    let nodes = client.nodes(Some("prod")).unwrap().value;
    assert_eq!(nodes.len(), 1);
    let node = &nodes[0];
    assert_eq!((node.id, node.online), (vm_a, true));
    assert_eq!(
        node.endpoints,
        [
            "198.18.0.1:51820".parse().unwrap(),
            "198.18.7.7:51820".parse().unwrap()
        ]
    );
    assert_eq!(node.labels["provider"], "test");
    assert!(node.last_seen.is_some());
    // Text that needs encoding reaches the coordinator whole: a node name it does not
    // know (404), a network name it refuses by the name rule (400), each named back.
    let err = client.node("web 1", Some("prod")).unwrap_err();
    assert!(
        matches!(err, ClientError::Api { status: 404, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("web 1"), "{err}");
    let err = client.node("web-1", Some("prod/eu")).unwrap_err();
    assert!(
        matches!(err, ClientError::Api { status: 400, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("network name \"prod/eu\" is not valid"),
        "{err}"
    );
}

#[test]
fn workloads() {
    let mesh = Mesh::start();
    mesh.run(&["network", "create", "prod", "--cidr", "100.64.0.0/24"]);
    mesh.run(&["network", "create", "dev", "--cidr", "100.64.1.0/24"]);
    let vm_a = mesh.join("prod", 1, "vm-a", true);
    let vm_c = mesh.join("prod", 3, "vm-c", false);
    mesh.join("prod", 4, "vm-d", false);

    let args = [
        "workload",
        "create",
        "chat",
        "--network",
        "prod",
        "--address",
        "100.64.0.50",
        "--standby",
        "vm-d",
        "--allow",
        "vm-c",
        "--tag",
        "app",
    ];
    assert_eq!(
        mask(&mesh.run(&args)),
        "NAME        chat\n\
         NETWORK     prod\n\
         ADDRESS     100.64.0.50\n\
         STATE       detached\n\
         HOLDER      -\n\
         GENERATION  0\n\
         PREVIOUS    -\n\
         STANDBY     vm-d\n\
         ALLOWED     vm-c\n\
         TAGS        app\n\
         MOVED       -\n\
         CREATED     <time>\n"
    );
    let db = mesh.run_json(&["workload", "create", "db", "--network", "prod"]);
    assert_eq!(keys(&db), sorted(WORKLOAD_KEYS));
    assert_eq!(
        db["address"], "100.64.0.4",
        "the lowest address no node uses"
    );
    mesh.run(&["workload", "create", "chat", "--network", "dev"]);

    assert_eq!(
        mask(&mesh.run(&[
            "workload",
            "attach",
            "chat",
            "--node",
            "vm-c",
            "--network",
            "prod"
        ])),
        "chat attached to vm-c (generation 1) in <ms> (vm-c is offline)\n"
    );
    assert_eq!(
        mask(&mesh.run(&[
            "workload",
            "move",
            "chat",
            "--to",
            "vm-a",
            "--network",
            "prod"
        ])),
        "chat moved to vm-a (generation 2) in <ms> (destination ready in <ms>)\n"
    );
    assert_eq!(
        mesh.run(&["workload", "move", "chat", "--to", "1", "--network", "prod"]),
        "chat is already held by vm-a (generation 2)\n"
    );
    assert_eq!(
        mesh.run(&["workload", "list", "--network", "prod"]),
        "NAME  NETWORK  ADDRESS      HOLDER  GENERATION  STATE     STANDBY\n\
         chat  prod     100.64.0.50  vm-a    2           held      vm-d\n\
         db    prod     100.64.0.4   -       0           detached  -\n"
    );
    assert_eq!(
        failure(&mesh.meshctl(&["workload", "show", "chat"])),
        "meshctl: the coordinator answered 409 Conflict: workload name \"chat\" exists in \
         networks prod, dev; say which with ?network=\n"
    );
    assert_eq!(
        mask(&mesh.run(&["workload", "show", "chat", "--network", "prod"])),
        "NAME        chat\n\
         NETWORK     prod\n\
         ADDRESS     100.64.0.50\n\
         STATE       held\n\
         HOLDER      vm-a\n\
         GENERATION  2\n\
         PREVIOUS    vm-c\n\
         STANDBY     vm-d\n\
         ALLOWED     vm-c\n\
         TAGS        app\n\
         MOVED       <time> (<dur> ago)\n\
         CREATED     <time>\n"
    );
    let shown = mesh.run_json(&["workload", "show", "chat", "--network", "prod"]);
    assert_eq!(shown, mesh.get("/v1/workloads/chat?network=prod"));

    assert_eq!(
        mask(&mesh.run(&["workload", "detach", "chat", "--network", "prod"])),
        "chat detached from vm-a (generation 3) in <ms>\n"
    );
    assert_eq!(
        mesh.run(&["workload", "detach", "chat", "--network", "prod"]),
        "chat is already detached (generation 3)\n"
    );
    let moved = mesh.run_json(&["workload", "attach", "db", "--node", "vm-a"]);
    let mut moved_keys = WORKLOAD_KEYS.to_vec();
    moved_keys.extend(["changed", "prepared_ms", "took_ms"]);
    assert_eq!(keys(&moved), sorted(&moved_keys));
    assert_eq!(
        (&moved["changed"], &moved["state"]),
        (&json!(true), &json!("held"))
    );
    assert!(moved["prepared_ms"].as_f64().unwrap() <= moved["took_ms"].as_f64().unwrap());

    // Deleting the other "chat" makes the name unique again; a deleted node keeps its id.
    assert_eq!(
        mesh.run(&["workload", "delete", "chat", "--network", "dev"]),
        "workload chat deleted\n"
    );
    mesh.run(&["node", "delete", "vm-c"]);
    let shown = mesh.run(&["workload", "show", "chat"]);
    assert!(shown.contains("\nALLOWED     #2 (deleted)\n"), "{shown}");
    let list = mesh.run_json(&["workload", "list"]);
    assert_eq!(
        list,
        mesh.get("/v1/workloads"),
        "-o json is the server's JSON"
    );

    // The typed answers, through the library.
    let client = mesh.client();
    let chat = client.workload("chat", None).unwrap().value;
    assert_eq!(chat.state, WorkloadState::Detached);
    assert_eq!(chat.generation, Generation(3));
    assert_eq!(
        chat.allowed,
        [WorkloadNode {
            id: vm_c,
            name: None
        }]
    );
    let moved = client.move_workload("chat", "vm-a", None).unwrap().value;
    assert!(moved.changed);
    assert_eq!(moved.workload.holder.map(|h| h.id), Some(vm_a));
    assert!(moved.prepared_ms.is_some(), "vm-a answers Prepare");
    let request = CreateWorkload {
        name: "web".parse().unwrap(),
        network: "prod".parse().unwrap(),
        address: Some("10.1.2.3".parse().unwrap()),
        standby: Vec::new(),
        allowed: Vec::new(),
        tags: Vec::new(),
    };
    let err = client.create_workload(&request).unwrap_err();
    assert!(
        matches!(err, ClientError::Api { status: 400, .. }),
        "{err:?}"
    );
}

#[test]
fn policies_and_tags() {
    let mesh = Mesh::start();
    mesh.run(&["network", "create", "prod", "--cidr", "100.64.0.0/24"]);
    mesh.join("prod", 1, "vm-a", true);
    mesh.join("prod", 2, "vm-b", true);
    mesh.run(&[
        "workload",
        "create",
        "chat",
        "--network",
        "prod",
        "--tag",
        "app",
    ]);
    // Edits may start with '-', so options come before them.
    let tagged = mesh.run(&["-o", "json", "node", "tag", "vm-a", "+web", "+eu"]);
    let tagged: Value = serde_json::from_str(&tagged).unwrap();
    assert_eq!(tagged["tags"], serde_json::json!(["web", "eu"]));
    let tagged = mesh.run(&["node", "tag", "vm-a", "-eu"]);
    assert!(tagged.contains("\nTAGS        web\n"), "{tagged}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    // No policy yet: open.
    assert_eq!(
        mesh.run(&["policy", "test", "--from", "vm-b", "--to", "vm-a", "--port", "tcp:22"]),
        "allowed: network prod has no policy, every flow is allowed\n"
    );
    assert_eq!(
        failure(&mesh.meshctl(&["policy", "get", "prod"])),
        "meshctl: the coordinator answered 404 Not Found: network prod has never had a policy: \
         it is open\n"
    );

    // A bad file: nothing changes, the error names the line and field.
    std::fs::write(
        &file,
        "[[rule]]\nfrom = [\"tag:web\"]\nto = [\"workload:chat\"]\nports = [\"tcp:70000\"]\n",
    )
    .unwrap();
    let err = failure(&mesh.meshctl(&["policy", "set", "prod", file.to_str().unwrap()]));
    assert!(
        err.contains("400") && err.contains("line 4") && err.contains("rule[1].ports[1]"),
        "{err}"
    );

    std::fs::write(
        &file,
        "[[rule]]\nfrom = [\"tag:web\"]\nto = [\"workload:chat\"]\nports = [\"tcp:7070\"]\n\n\
         [[test]]\nfrom = \"vm-a\"\nto = \"chat\"\nport = \"tcp:7070\"\nexpect = \"allow\"\n",
    )
    .unwrap();
    assert_eq!(
        mesh.run(&["policy", "set", "prod", file.to_str().unwrap()]),
        "policy version 1 of network prod in force (1 rule, map version 6)\n"
    );
    assert_eq!(
        mesh.run(&["policy", "test", "--from", "vm-a", "--to", "chat", "--port", "tcp:7070"]),
        "allowed: tcp:7070 from vm-a to chat by rule 1 (line 1) of policy version 1\n\
         rule 1 (line 1): from tag:web to workload:chat ports tcp:7070\n"
    );
    let verdict = mesh.run_json(&[
        "policy", "test", "--from", "vm-b", "--to", "chat", "--port", "tcp:7070",
    ]);
    assert_eq!(verdict["allowed"], false);
    assert_eq!(verdict["rule"], serde_json::Value::Null);
    assert_eq!(verdict["policy_version"], 1);
    assert_eq!(
        failure(&mesh.meshctl(&["policy", "test", "--from", "vm-z", "--to", "chat", "--port", "tcp:1"])),
        "meshctl: the coordinator answered 404 Not Found: no network has a node or workload named \"vm-z\"\n"
    );

    assert!(mesh
        .run(&["policy", "clear", "prod"])
        .starts_with("policy cleared in network prod (version 2)"));
    assert!(mesh
        .run(&["policy", "rollback", "prod", "1"])
        .starts_with("policy version 3 of network prod in force"));
    let shown = mesh.run(&["policy", "get", "prod"]);
    assert!(
        shown.contains("VERSION   3\n")
            && shown.contains("RESTORED  version 1\n")
            && shown.contains("[[test]]"),
        "{shown}"
    );
    assert_eq!(
        squeeze(&mask(&mesh.run(&["policy", "history", "prod"]))),
        "VERSION RULES AUTHOR SET NOTE\n\
         1 1 admin:bootstrap <time> -\n\
         2 0 admin:bootstrap <time> cleared (open)\n\
         3 1 admin:bootstrap <time> rollback to version 1"
    );
    let history = mesh.run_json(&["policy", "history", "prod"]);
    assert_eq!(history, mesh.get("/v1/networks/prod/policy/history"));
    // Standard input works as a file.
    let source = std::fs::read_to_string(&file).unwrap();
    let out = mesh.meshctl_stdin(&["policy", "set", "prod", "-"], &source);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("policy version 4 "),
        "{out:?}"
    );
}

#[test]
fn admin_tokens_with_roles_and_the_audit_log() {
    let mesh = Mesh::start();
    mesh.run(&["network", "create", "prod", "--cidr", "100.64.0.0/24"]);
    let created = mesh.run(&[
        "admin-token",
        "create",
        "--name",
        "ci",
        "--role",
        "operator",
        "--network",
        "prod",
    ]);
    let secret = created.lines().last().unwrap().to_string();
    assert!(secret.starts_with("mla1_"), "{created}");
    assert!(created.contains("ROLE     operator\n"), "{created}");
    assert_eq!(
        squeeze(&mask(&mesh.run(&["admin-token", "list"]))),
        "ID NAME ROLE NETWORK CREATED BY STATE\n1 ci operator prod admin:bootstrap active"
    );

    // The operator token, through meshctl: join tokens in prod, not admin tokens.
    let as_operator = |args: &[&str]| mesh.meshctl_as(&secret, args);
    let ok = as_operator(&["token", "create", "--network", "prod"]);
    assert!(ok.status.success(), "{ok:?}");
    let refused = failure(&as_operator(&[
        "admin-token",
        "create",
        "--name",
        "mine",
        "--role",
        "admin",
    ]));
    assert!(
        refused.contains("403") && refused.contains("needs admin"),
        "{refused}"
    );

    let log = mesh.run(&["audit"]);
    assert!(log.contains("admin:ci"), "{log}");
    let json = mesh.run_json(&["audit", "--since", "1h"]);
    let entries = json.as_array().unwrap();
    assert!(entries.iter().any(|e| e["actor"] == "admin:ci"
        && e["action"] == "POST /v1/tokens"
        && e["status"] == 201));
    assert!(entries.iter().any(|e| e["actor"] == "admin:ci"
        && e["action"] == "POST /v1/admin-tokens"
        && e["status"] == 403));
    assert_eq!(
        mesh.run(&["admin-token", "revoke", "1"]),
        "admin token 1 revoked\n"
    );
    let refused = failure(&as_operator(&["node", "list", "--network", "prod"]));
    assert!(refused.contains("401"), "{refused}");
    assert!(
        mesh.run_json(&["audit", "--since", "0", "--limit", "1"])
            .as_array()
            .unwrap()
            .len()
            == 1
    );
}
