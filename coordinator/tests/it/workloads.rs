//! The workload routes of the admin API against a coordinator on loopback, on SQLite and on
//! PostgreSQL: creation and its
//! checks, attach, move, detach and delete, the `state` a holder's session gives, and finding
//! the network of a workload by its name.
//!
//! Nodes join through the service directly (no QUIC), so a test decides which of them have a
//! live session.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use meshlink_coordinator::config::StoreLocation;
use meshlink_coordinator::dispatch::SessionRef;
use meshlink_coordinator::handlers::tokens::CreateToken;
use meshlink_coordinator::hub::Outbound;
use meshlink_coordinator::service::Session;
use meshlink_coordinator::Coordinator;
use meshlink_proto::control::{ClientMessage, Decoder, ServerMessage, MAX_SERVER_MESSAGE};
use meshlink_proto::NodeId;
use serde_json::{json, Value};

use crate::common::{http, join_hello, keys, loopback_settings, sorted, TempDir, TestDb, WAIT};

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

/// A coordinator with its admin address and token, for short calls.
struct Admin {
    c: Coordinator,
    addr: SocketAddr,
    token: String,
    _dir: TempDir,
}

impl Admin {
    /// A coordinator on `db` (its state directory for the identity is its own).
    async fn start(db: &TestDb) -> Admin {
        let dir = TempDir::new("wl");
        let mut settings = loopback_settings(dir.path());
        if let TestDb::Postgres(url) = db {
            settings.store = StoreLocation::Postgres(url.clone());
        }
        let c = Coordinator::start(&settings).await.unwrap();
        let addr = c.admin_addr();
        let token = c.admin_token().value.clone();
        Admin {
            c,
            addr,
            token,
            _dir: dir,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(Value::to_string);
        http(self.addr, method, path, Some(&self.token), body.as_deref()).await
    }

    async fn network(&self, name: &str, cidr: &str) {
        let body = json!({"name": name, "cidr": cidr});
        let (status, e) = self.call("POST", "/v1/networks", Some(&body)).await;
        assert_eq!(status, 201, "{e}");
    }

    /// Joins a node named `name` to `network`; it stays online while the session is kept.
    async fn join(&self, network: &str, key: u8, name: &str) -> Session {
        self.join_as(network, key, name, false).await
    }

    /// Joins a node whose agent takes part in live migrations when `handover`.
    async fn join_as(&self, network: &str, key: u8, name: &str, handover: bool) -> Session {
        let (_, secret) = self
            .c
            .service()
            .create_token(CreateToken {
                network: network.into(),
                tags: vec![],
                expires_in_secs: None,
                uses: Some(1),
            })
            .await
            .unwrap();
        let remote: IpAddr = "198.18.7.7".parse().unwrap();
        self.c
            .service()
            .hello(
                &meshlink_proto::control::Hello {
                    handover,
                    ..join_hello(&secret, key, Some(name))
                },
                remote,
            )
            .await
            .unwrap()
    }

    /// Joins a node and ends its session at once: it exists but is offline.
    async fn join_offline(&self, network: &str, key: u8, name: &str) -> NodeId {
        let s = self.join(network, key, name).await;
        self.c
            .service()
            .session_closed(&s.network, s.node, s.attached.serial)
            .await;
        assert!(!self.c.service().hub().is_online(&s.network, s.node));
        s.node
    }

    async fn create(&self, body: Value) -> (u16, Value) {
        self.call("POST", "/v1/workloads", Some(&body)).await
    }
}

fn named(id: NodeId, name: &str) -> Value {
    json!({"id": id, "name": name})
}

async fn create_checks_its_request_and_picks_the_lowest_free_address(db: &TestDb) {
    let a = Admin::start(db).await;
    a.network("prod", "100.64.0.0/24").await;
    let vm_a = a.join_offline("prod", 1, "vm-a").await;
    let vm_b = a.join_offline("prod", 2, "vm-b").await;
    let vm_c = a.join_offline("prod", 3, "vm-c").await;
    let (_, nodes) = a.call("GET", "/v1/nodes?network=prod", None).await;
    let node_addrs: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["address"].as_str().unwrap())
        .collect();
    assert_eq!(node_addrs, ["100.64.0.1", "100.64.0.2", "100.64.0.3"]);

    let (status, w) = a.create(json!({"name": "chat", "network": "prod"})).await;
    assert_eq!(status, 201, "{w}");
    assert_eq!(keys(&w), sorted(WORKLOAD_KEYS));
    assert_eq!(
        w["address"], "100.64.0.4",
        "the lowest address no node uses"
    );
    assert_eq!(
        (&w["name"], &w["network"], &w["state"]),
        (&json!("chat"), &json!("prod"), &json!("detached"))
    );
    assert_eq!(w["generation"], 0);
    assert_eq!(
        (&w["holder"], &w["previous"], &w["moved_at"]),
        (&Value::Null, &Value::Null, &Value::Null)
    );
    assert_eq!((&w["standby"], &w["allowed"]), (&json!([]), &json!([])));
    assert!(
        w["created_at"].as_i64().unwrap() > 1_600_000_000,
        "unix seconds"
    );

    let body = json!({"name": "db", "network": "prod", "address": "100.64.0.50",
                      "standby": ["vm-b", "vm-c"], "allowed": ["vm-c", vm_a.to_string()]});
    let (status, w) = a.create(body).await;
    assert_eq!(status, 201, "{w}");
    assert_eq!(w["address"], "100.64.0.50");
    assert_eq!(
        w["standby"],
        json!([named(vm_b, "vm-b"), named(vm_c, "vm-c")])
    );
    assert_eq!(
        w["allowed"],
        json!([named(vm_c, "vm-c"), named(vm_a, "vm-a")]),
        "nodes may be named by id"
    );

    // The next automatic address skips workloads as well as nodes.
    let (status, w) = a.create(json!({"name": "web", "network": "prod"})).await;
    assert_eq!((status, &w["address"]), (201, &json!("100.64.0.5")), "{w}");

    for (body, want, says) in [
        (
            json!({"name": "x1", "network": "prod", "address": "10.1.2.3"}),
            400,
            "not a usable address",
        ),
        (
            json!({"name": "x2", "network": "prod", "address": "100.64.0.0"}),
            400,
            "not a usable address",
        ),
        (
            json!({"name": "x3", "network": "prod", "address": "100.64.0.2"}),
            409,
            "already taken",
        ),
        (
            json!({"name": "x4", "network": "prod", "address": "100.64.0.50"}),
            409,
            "already taken",
        ),
        (json!({"name": "chat", "network": "prod"}), 409, "chat"),
        (json!({"name": "Chat", "network": "prod"}), 400, "not valid"),
        (json!({"name": "x5", "network": "ghost"}), 404, "ghost"),
        (
            json!({"name": "x6", "network": "prod", "standby": ["ghost"]}),
            404,
            "standby",
        ),
        (
            json!({"name": "x7", "network": "prod", "allowed": ["ghost"]}),
            404,
            "allowed",
        ),
        // Malformed requests name the field at fault.
        (
            json!({"name": "x8", "network": "prod", "address": "100.64.0.9/32"}),
            400,
            "address",
        ),
        (
            json!({"name": "x9", "network": "prod", "holder": "vm-a"}),
            400,
            "`holder`",
        ),
        (json!({"name": "x10"}), 400, "`network`"),
        (
            json!({"name": "x11", "network": "prod", "standby": "vm-b"}),
            400,
            "standby",
        ),
    ] {
        let (status, e) = a.create(body.clone()).await;
        assert_eq!(status, want, "{body} -> {e}");
        let message = e["error"].as_str().unwrap();
        assert!(message.contains(says), "{body} -> {message}");
    }
    let (status, e) = http(
        a.addr,
        "POST",
        "/v1/workloads",
        Some(&a.token),
        Some("{not json"),
    )
    .await;
    assert_eq!(status, 400, "{e}");

    let (status, list) = a.call("GET", "/v1/workloads", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["chat", "db", "web"],
        "failed requests created nothing"
    );
    assert_eq!(keys(&list[0]), sorted(WORKLOAD_KEYS));
    let (status, one) = a.call("GET", "/v1/workloads/db", None).await;
    assert_eq!(status, 200);
    assert_eq!(one, list[1]);
    a.c.shutdown().await;
}

async fn attach_move_detach_and_delete(db: &TestDb) {
    let a = Admin::start(db).await;
    a.network("prod", "100.64.0.0/24").await;
    let vm_a = a.join_offline("prod", 1, "vm-a").await;
    let vm_b = a.join_offline("prod", 2, "vm-b").await;
    let (status, _) = a.create(json!({"name": "chat", "network": "prod"})).await;
    assert_eq!(status, 201);

    let to = |node: &str| json!({ "node": node });
    let (status, w) = a
        .call("POST", "/v1/workloads/chat/attach", Some(&to("vm-a")))
        .await;
    assert_eq!(status, 200, "{w}");
    let mut moved_keys = WORKLOAD_KEYS.to_vec();
    moved_keys.extend(["changed", "prepared_ms", "took_ms"]);
    assert_eq!(keys(&w), sorted(&moved_keys));
    assert_eq!(w["changed"], true);
    assert_eq!(w["generation"], 1);
    assert_eq!(w["holder"], named(vm_a, "vm-a"));
    assert_eq!(w["previous"], Value::Null);
    assert_eq!(w["state"], "holder-offline", "vm-a has no session");
    assert_eq!(
        w["prepared_ms"],
        Value::Null,
        "an offline node is not asked"
    );
    assert!(w["took_ms"].as_f64().unwrap() >= 0.0);
    assert!(w["moved_at"].as_i64().unwrap() > 1_600_000_000);

    let (status, shown) = a.call("GET", "/v1/workloads/chat", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        (&shown["generation"], &shown["holder"], &shown["state"]),
        (&json!(1), &named(vm_a, "vm-a"), &json!("holder-offline"))
    );

    let (status, w) = a
        .call("POST", "/v1/workloads/chat/move", Some(&to("vm-b")))
        .await;
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["changed"], true);
    assert_eq!(w["generation"], 2);
    assert_eq!(w["holder"], named(vm_b, "vm-b"));
    assert_eq!(w["previous"], named(vm_a, "vm-a"));

    // The node is named by id here; it already holds the workload.
    let (status, w) = a
        .call(
            "POST",
            "/v1/workloads/chat/move",
            Some(&to(&vm_b.to_string())),
        )
        .await;
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["changed"], false);
    assert_eq!(w["generation"], 2, "no change takes no generation");
    assert_eq!(w["prepared_ms"], Value::Null);

    for (path, body, want, says) in [
        ("/v1/workloads/chat/move", Some(to("ghost")), 404, "ghost"),
        (
            "/v1/workloads/chat/move",
            Some(json!({"to": "vm-a"})),
            400,
            "`to`",
        ),
        ("/v1/workloads/chat/attach", None, 400, "Content-Type"),
        ("/v1/workloads/ghost/move", Some(to("vm-a")), 404, "ghost"),
        ("/v1/workloads/ghost/detach", None, 404, "ghost"),
    ] {
        let (status, e) = a.call("POST", path, body.as_ref()).await;
        assert_eq!(status, want, "{path} {body:?} -> {e}");
        let message = e["error"].as_str().unwrap();
        assert!(message.contains(says), "{path} -> {message}");
    }

    let (status, w) = a.call("POST", "/v1/workloads/chat/detach", None).await;
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["changed"], true);
    assert_eq!(w["generation"], 3);
    assert_eq!(w["holder"], Value::Null);
    assert_eq!(w["previous"], named(vm_b, "vm-b"));
    assert_eq!(w["state"], "detached");
    let (status, w) = a.call("POST", "/v1/workloads/chat/detach", None).await;
    assert_eq!(status, 200, "{w}");
    assert_eq!(
        (&w["changed"], &w["generation"]),
        (&json!(false), &json!(3))
    );

    let (status, body) = a.call("DELETE", "/v1/workloads/chat", None).await;
    assert_eq!((status, body), (204, Value::Null));
    let (status, _) = a.call("GET", "/v1/workloads/chat", None).await;
    assert_eq!(status, 404);
    let (status, _) = a
        .call("DELETE", "/v1/workloads/chat?network=prod", None)
        .await;
    assert_eq!(status, 404);
    let (status, list) = a.call("GET", "/v1/workloads", None).await;
    assert_eq!((status, list), (200, json!([])));

    // The address is free again.
    let (status, w) = a.create(json!({"name": "chat2", "network": "prod"})).await;
    assert_eq!((status, &w["address"]), (201, &json!("100.64.0.3")), "{w}");
    a.c.shutdown().await;
}

/// Answers the first `Prepare` on a session's queue, as an agent would once its tunnels are
/// up; returns its warm-up list.
async fn answer_prepare(c: &Coordinator, session: &mut Session) -> Option<Vec<NodeId>> {
    loop {
        let out = tokio::time::timeout(WAIT, session.attached.rx.recv())
            .await
            .expect("a Prepare in time")
            .expect("the session stays attached");
        let Outbound::Frame(frame) = out else {
            panic!("the session was closed");
        };
        let mut d = Decoder::new(MAX_SERVER_MESSAGE);
        d.push(&frame).unwrap();
        if let Some(ServerMessage::Prepare {
            workload,
            generation,
            warm,
        }) = d.decode().unwrap()
        {
            c.service().prepared(session.node, &workload, generation);
            return warm;
        }
    }
}

async fn state_follows_the_holder_session_and_deleted_nodes_lose_their_name(db: &TestDb) {
    let a = Admin::start(db).await;
    a.network("prod", "100.64.0.0/24").await;
    let mut online = a.join("prod", 1, "vm-a").await;
    let vm_a = online.node;
    let vm_d = a.join_offline("prod", 4, "vm-d").await;
    let body = json!({"name": "chat", "network": "prod", "standby": ["vm-d"]});
    let (status, _) = a.create(body).await;
    assert_eq!(status, 201);

    let to_a = json!({"node": "vm-a"});
    let (moved, _) = tokio::join!(
        a.call("POST", "/v1/workloads/chat/attach", Some(&to_a)),
        answer_prepare(&a.c, &mut online),
    );
    let (status, w) = moved;
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["state"], "held");
    let prepared = w["prepared_ms"].as_f64().expect("the destination answered");
    assert!(prepared <= w["took_ms"].as_f64().unwrap(), "{w}");

    a.c.service()
        .session_closed("prod", vm_a, online.attached.serial)
        .await;
    let (_, w) = a.call("GET", "/v1/workloads/chat", None).await;
    assert_eq!(w["state"], "holder-offline");

    // Deleting the holder releases the workload (its standby is offline: detached); the
    // deleted nodes keep their ids and lose their names.
    let (status, _) = a.call("DELETE", "/v1/nodes/vm-a", None).await;
    assert_eq!(status, 204);
    let (status, _) = a.call("DELETE", "/v1/nodes/vm-d", None).await;
    assert_eq!(status, 204);
    let (_, w) = a.call("GET", "/v1/workloads/chat", None).await;
    assert_eq!(w["state"], "detached", "{w}");
    assert_eq!(w["generation"], 2, "{w}");
    assert_eq!(w["previous"], json!({"id": vm_a, "name": null}));
    assert_eq!(w["standby"], json!([{"id": vm_d, "name": null}]));
    a.c.shutdown().await;
}

async fn the_network_may_be_left_out_when_the_name_is_unique(db: &TestDb) {
    let a = Admin::start(db).await;
    a.network("prod", "100.64.0.0/24").await;
    a.network("dev", "100.64.1.0/24").await;
    let dev_node = a.join_offline("dev", 1, "vm-a").await;
    a.join_offline("prod", 2, "vm-a").await;
    for (name, network) in [("chat", "prod"), ("chat", "dev"), ("solo", "dev")] {
        let (status, e) = a.create(json!({"name": name, "network": network})).await;
        assert_eq!(status, 201, "{e}");
    }

    let (status, e) = a.call("GET", "/v1/workloads/chat", None).await;
    assert_eq!(status, 409, "{e}");
    let message = e["error"].as_str().unwrap();
    assert!(
        message.contains("prod") && message.contains("dev") && message.contains("?network="),
        "{message}"
    );
    let (status, e) = a.call("POST", "/v1/workloads/chat/detach", None).await;
    assert_eq!(status, 409, "{e}");
    let (status, w) = a.call("GET", "/v1/workloads/chat?network=dev", None).await;
    assert_eq!((status, &w["network"]), (200, &json!("dev")));

    // The node name is looked up in the workload's network, although it exists in both.
    let body = json!({"node": "vm-a"});
    let (status, w) = a
        .call("POST", "/v1/workloads/solo/attach", Some(&body))
        .await;
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["network"], "dev");
    assert_eq!(w["holder"], named(dev_node, "vm-a"));

    let (status, e) = a.call("GET", "/v1/workloads/ghost", None).await;
    assert_eq!(status, 404, "{e}");
    let (status, _) = a.call("GET", "/v1/workloads/solo?network=prod", None).await;
    assert_eq!(status, 404);

    let count = |v: &Value| v.as_array().unwrap().len();
    let (status, all) = a.call("GET", "/v1/workloads", None).await;
    assert_eq!((status, count(&all)), (200, 3));
    let (status, dev) = a.call("GET", "/v1/workloads?network=dev", None).await;
    assert_eq!((status, count(&dev)), (200, 2));
    let (status, _) = a.call("GET", "/v1/workloads?network=ghost", None).await;
    assert_eq!(status, 404);
    let (status, e) = a.call("GET", "/v1/workloads?net=dev", None).await;
    assert_eq!(status, 400, "{e}");

    let (status, _) = a.call("DELETE", "/v1/workloads/chat", None).await;
    assert_eq!(status, 409);
    let (status, _) = a
        .call("DELETE", "/v1/workloads/chat?network=prod", None)
        .await;
    assert_eq!(status, 204);
    let (status, w) = a.call("GET", "/v1/workloads/chat", None).await;
    assert_eq!(
        (status, &w["network"]),
        (200, &json!("dev")),
        "unique again"
    );
    a.c.shutdown().await;
}

async fn workload_routes_need_the_admin_token(db: &TestDb) {
    let a = Admin::start(db).await;
    a.network("prod", "100.64.0.0/24").await;
    let (status, _) = a.create(json!({"name": "chat", "network": "prod"})).await;
    assert_eq!(status, 201);
    for (method, path) in [
        ("POST", "/v1/workloads"),
        ("GET", "/v1/workloads"),
        ("GET", "/v1/workloads/chat"),
        ("DELETE", "/v1/workloads/chat"),
        ("POST", "/v1/workloads/chat/attach"),
        ("POST", "/v1/workloads/chat/move"),
        ("POST", "/v1/workloads/chat/detach"),
    ] {
        let body = Some(r#"{"node":"vm-a"}"#).filter(|_| method == "POST");
        let (status, e) = http(a.addr, method, path, None, body).await;
        assert_eq!(status, 401, "{method} {path}");
        assert!(e["error"].as_str().unwrap().contains("admin token"));
        let (status, _) = http(a.addr, method, path, Some("wrong-token-wrong"), body).await;
        assert_eq!(status, 401, "{method} {path} with a wrong token");
    }
    let (status, w) = a.call("GET", "/v1/workloads/chat", None).await;
    assert_eq!(
        (status, &w["state"]),
        (200, &json!("detached")),
        "untouched"
    );
    a.c.shutdown().await;
}

/// A move to a node that does not answer `Prepare` still happens, after the bounded wait.
async fn a_silent_destination_does_not_block_the_move(db: &TestDb) {
    let a = Admin::start(db).await;
    a.network("prod", "100.64.0.0/24").await;
    let _online = a.join("prod", 1, "vm-a").await;
    let (status, _) = a.create(json!({"name": "chat", "network": "prod"})).await;
    assert_eq!(status, 201);
    let (status, w) = a
        .call(
            "POST",
            "/v1/workloads/chat/attach",
            Some(&json!({"node": "vm-a"})),
        )
        .await;
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["state"], "held");
    assert_eq!(w["prepared_ms"], Value::Null);
    let took = Duration::from_secs_f64(w["took_ms"].as_f64().unwrap() / 1000.0);
    assert!(took < WAIT, "{took:?}");
    a.c.shutdown().await;
}

/// The holder's talker report reaches the next destination's `Prepare`: it warms the holder and
/// the peers that talk to the workload, not every peer. Reports from other nodes are ignored.
async fn a_move_warms_the_holder_and_the_workloads_talkers(db: &TestDb) {
    let a = Admin::start(db).await;
    a.network("prod", "100.64.0.0/24").await;
    let mut vm_a = a.join("prod", 1, "vm-a").await;
    let mut vm_b = a.join("prod", 2, "vm-b").await;
    let vm_c = a.join("prod", 3, "vm-c").await;
    let _vm_d = a.join("prod", 4, "vm-d").await;
    let (status, _) = a.create(json!({"name": "chat", "network": "prod"})).await;
    assert_eq!(status, 201);
    let to = |name: &str| json!({ "node": name });
    let (to_a, to_b) = (to("vm-a"), to("vm-b"));
    let (attached, warm) = tokio::join!(
        a.call("POST", "/v1/workloads/chat/attach", Some(&to_a)),
        answer_prepare(&a.c, &mut vm_a),
    );
    assert_eq!(attached.0, 200, "{}", attached.1);
    assert_eq!(warm, None, "no holder yet, no report: every peer");

    let talkers = |from: &Session, nodes: Vec<NodeId>| {
        let msg = ClientMessage::Talkers {
            workload: "chat".into(),
            nodes,
        };
        let at = SessionRef {
            node: from.node,
            network: "prod",
            remote: "198.18.7.7".parse().unwrap(),
            serial: from.attached.serial,
        };
        let service = a.c.service().clone();
        async move { service.on_agent_message(at, msg).await.unwrap() }
    };
    // vm-c does not hold chat: its report is not used.
    talkers(&vm_c, vec![99]).await;
    // The holder's is (itself and repeats left out).
    talkers(&vm_a, vec![vm_c.node, vm_a.node, vm_c.node]).await;
    let (moved, warm) = tokio::join!(
        a.call("POST", "/v1/workloads/chat/move", Some(&to_b)),
        answer_prepare(&a.c, &mut vm_b),
    );
    assert_eq!(moved.0, 200, "{}", moved.1);
    assert_eq!(warm, Some(vec![vm_a.node, vm_c.node]));
    a.c.shutdown().await;
}

/// The next message of `kind` on a session's queue (others skipped).
async fn next_of(session: &mut Session, kind: &str) -> ServerMessage {
    loop {
        let out = tokio::time::timeout(WAIT, session.attached.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("a {kind} in time"))
            .expect("the session stays attached");
        let Outbound::Frame(frame) = out else {
            panic!("the session was closed");
        };
        let mut d = Decoder::new(MAX_SERVER_MESSAGE);
        d.push(&frame).unwrap();
        if let Some(msg) = d.decode::<ServerMessage>().unwrap() {
            if msg.kind() == kind {
                return msg;
            }
        }
    }
}

/// A live migration asks the holder to hand over once the destination prepared, and commits
/// only on its answer: a failure (or an agent that cannot take part) moves nothing and says
/// why.
async fn a_live_migration_commits_only_once_the_holder_hands_over(db: &TestDb) {
    let a = Admin::start(db).await;
    a.network("prod", "100.64.0.0/24").await;
    let mut vm_a = a.join_as("prod", 1, "vm-a", true).await;
    let mut vm_b = a.join("prod", 2, "vm-b").await;
    let (status, _) = a.create(json!({"name": "chat", "network": "prod"})).await;
    assert_eq!(status, 201);
    let to = |n: &str| json!({"node": n});
    let live = |n: &str| json!({"node": n, "live": true});
    let (to_a, live_a, live_b) = (to("vm-a"), live("vm-a"), live("vm-b"));
    let (attached, _) = tokio::join!(
        a.call("POST", "/v1/workloads/chat/attach", Some(&to_a)),
        answer_prepare(&a.c, &mut vm_a),
    );
    assert_eq!(attached.0, 200, "{}", attached.1);

    // The holder's application answers for `generation` (an error, or handed over).
    let answer = |from: &Session, generation: u64, attempt: u64, error: Option<&str>| {
        let msg = ClientMessage::HandedOver {
            workload: "chat".into(),
            generation,
            attempt,
            error: error.map(str::to_string),
        };
        let at = SessionRef {
            node: from.node,
            network: "prod",
            remote: "198.18.7.7".parse().unwrap(),
            serial: from.attached.serial,
        };
        let service = a.c.service().clone();
        async move { service.on_agent_message(at, msg).await.unwrap() }
    };
    let vm_b_id = vm_b.node;
    for (error, status) in [(Some("the destination refused the room"), 409), (None, 200)] {
        let holder = async {
            answer_prepare(&a.c, &mut vm_b).await;
            let ServerMessage::Handover {
                workload,
                generation,
                to,
                attempt,
            } = next_of(&mut vm_a, "handover").await
            else {
                unreachable!()
            };
            assert_eq!((workload.as_str(), generation, to), ("chat", 2, vm_b_id));
            // While the holder has not answered, nothing moved, and no second live
            // migration of the workload starts.
            let (_, w) = a.call("GET", "/v1/workloads/chat", None).await;
            assert_eq!(
                (&w["holder"]["name"], &w["generation"]),
                (&json!("vm-a"), &json!(1))
            );
            let (status, e) = a
                .call("POST", "/v1/workloads/chat/move", Some(&live_b))
                .await;
            assert_eq!(status, 409, "{e}");
            assert!(e["error"].as_str().unwrap().contains("under way"), "{e}");
            // An answer to another attempt (a late one to an earlier request) is no answer.
            answer(&vm_a, generation, attempt.wrapping_add(1), None).await;
            answer(&vm_a, generation, attempt, error).await;
            if error.is_some() {
                // Refused: the holder is told the migration is off.
                let ServerMessage::HandoverAborted {
                    attempt: called_off,
                    ..
                } = next_of(&mut vm_a, "handover abort").await
                else {
                    unreachable!()
                };
                assert_eq!(called_off, attempt);
            }
        };
        let (moved, ()) = tokio::join!(
            a.call("POST", "/v1/workloads/chat/move", Some(&live_b)),
            holder,
        );
        assert_eq!(moved.0, status, "{}", moved.1);
        let (_, w) = a.call("GET", "/v1/workloads/chat", None).await;
        if let Some(e) = error {
            let message = moved.1["error"].as_str().unwrap();
            assert!(
                message.contains(e) && message.contains("did not happen"),
                "{message}"
            );
            assert_eq!(
                (&w["holder"]["name"], &w["generation"]),
                (&json!("vm-a"), &json!(1)),
                "nothing moved: {w}"
            );
        } else {
            assert!(moved.1["handed_over_ms"].as_f64().is_some(), "{}", moved.1);
            assert_eq!(
                (&w["holder"]["name"], &w["generation"]),
                (&json!("vm-b"), &json!(2)),
                "{w}"
            );
        }
    }

    // vm-b's agent does not take part in live migrations: refused at once, nothing moves.
    let (moved, _) = tokio::join!(
        a.call("POST", "/v1/workloads/chat/move", Some(&live_a)),
        answer_prepare(&a.c, &mut vm_a),
    );
    assert_eq!(moved.0, 409, "{}", moved.1);
    assert!(
        moved.1["error"].as_str().unwrap().contains("too old"),
        "{}",
        moved.1
    );
    // Nothing to migrate without a holder; and the holder must be online.
    let (status, e) = a.call("POST", "/v1/workloads/chat/detach", None).await;
    assert_eq!(status, 200, "{e}");
    let (status, e) = a
        .call("POST", "/v1/workloads/chat/move", Some(&live_a))
        .await;
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("no holder"), "{e}");
    a.c.shutdown().await;
}

crate::on_both_stores!(
    a_live_migration_commits_only_once_the_holder_hands_over,
    a_move_warms_the_holder_and_the_workloads_talkers,
    create_checks_its_request_and_picks_the_lowest_free_address,
    attach_move_detach_and_delete,
    state_follows_the_holder_session_and_deleted_nodes_lose_their_name,
    the_network_may_be_left_out_when_the_name_is_unique,
    workload_routes_need_the_admin_token,
    a_silent_destination_does_not_block_the_move,
);

/// A lone coordinator records its stop lease before it grants any (`stop-lease` in its state
/// directory); the next run there waits out what was recorded even when it is started with a
/// shorter lease (whose own stop lease would be shorter than the one its holders have).
#[tokio::test]
async fn the_next_run_waits_out_the_recorded_stop_lease() {
    use meshlink_coordinator::stop_record;
    use std::time::SystemTime;
    let dir = TempDir::new("stop-record");
    let mut settings = loopback_settings(dir.path());
    settings.limits.workload_lease = Duration::from_secs(5);
    let c = Coordinator::start(&settings).await.unwrap();
    assert_eq!(c.service().timing().previous_stop_left, Duration::ZERO);
    // While it runs, the record holds its lease: what a crash would leave the next run.
    assert_eq!(
        stop_record::left(dir.path(), SystemTime::now()).unwrap(),
        Duration::from_secs(5)
    );
    c.shutdown().await;
    // 11 s of stop lease, the 1.1 s drain, the linger and the slack.
    let left = stop_record::left(dir.path(), SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(11) && left <= Duration::from_millis(12_250),
        "{left:?}"
    );
    settings.limits.workload_lease = Duration::from_millis(1500);
    let c = Coordinator::start(&settings).await.unwrap();
    let t = c.service().timing();
    assert_eq!(t.stop_lease, Some(Duration::from_secs(4)));
    assert!(t.previous_stop_left > Duration::from_secs(10), "{t:?}");
    // Stopped at once, it records no less than what is left of its predecessor's stop lease,
    // though its own is shorter.
    c.shutdown().await;
    let left = stop_record::left(dir.path(), SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(9), "{left:?}");
}
