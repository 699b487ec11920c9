//! Need to know at the coordinator, on both stores: while a network has a policy, each
//! session's map holds only its node and the peers the policy lets it exchange packets with
//! (every workload, the policy and tags as they are), at attach, in full map requests and in
//! every delta, also on a second coordinator following the change log; without a policy,
//! one shared frame per change as before.
//!
//! Every session here is an agent's map as `Netmap::apply` builds it from what was queued
//! (a gap fails the test), checked after each step against the hub's whole map cut by
//! `visible_peers`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlink_coordinator::access::PolicyEdit;
use meshlink_coordinator::handlers::networks::CreateNetwork;
use meshlink_coordinator::handlers::workloads::CreateWorkload;
use meshlink_coordinator::hub::{Features, Frame, FullMapAnswer, Hub, Outbound};
use meshlink_coordinator::service::{Service, Session, SystemClock};
use meshlink_proto::control::ServerMessage;
use meshlink_proto::policy::{relevant_rules, visible_peers};
use meshlink_proto::{Netmap, NetmapDelta, NodeId, PeerInfo, PolicyChange, PublicKey};

use crate::common::{decode_frame, join_tagged, TestDb};

/// web talks to db; clients to the workload chat, wherever it is held.
const POLICY: &str = r#"
[[rule]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[rule]]
from = ["tag:client"]
to = ["workload:chat"]
ports = ["tcp:7070"]
"#;

/// The nodes of the test network: name, tag.
const NODES: [(&str, &str); 5] = [
    ("web-1", "web"),
    ("db-1", "db"),
    ("client-1", "client"),
    ("spare-1", "spare"),
    ("spare-2", "spare"),
];

fn remote() -> IpAddr {
    "198.18.3.3".parse().unwrap()
}

async fn service(db: &TestDb) -> Service {
    let s = Service::load(Arc::new(db.open().await), Arc::new(SystemClock), 64)
        .await
        .unwrap();
    s.set_endpoint_pace(Duration::from_millis(1), 1_000);
    s
}

/// One agent: its session and the map it has built from what the session was sent.
struct Agent {
    session: Session,
    map: Netmap,
}

impl Agent {
    fn new(session: Session) -> Agent {
        let map = match decode_frame(&session.attached.full_map) {
            ServerMessage::FullMap(m) => m,
            other => panic!("a session starts with its full map, not {other:?}"),
        };
        Agent { session, map }
    }

    fn id(&self) -> NodeId {
        self.session.node
    }

    /// Applies every frame queued so far; returns the deltas, with the frames they came in.
    fn drain(&mut self) -> Vec<(NetmapDelta, Frame)> {
        let mut out = Vec::new();
        while let Ok(Outbound::Frame(f)) = self.session.attached.rx.try_recv() {
            match decode_frame(&f) {
                ServerMessage::FullMap(m) => self.map = m,
                ServerMessage::Delta(d) => {
                    self.map
                        .apply(d.clone())
                        .unwrap_or_else(|gap| panic!("{}: {gap}", self.session.name));
                    out.push((d, f));
                }
                _ => {}
            }
        }
        out
    }

    /// The names of the peers in its map, itself left out.
    fn peers(&self) -> BTreeSet<String> {
        self.map
            .peers
            .values()
            .filter(|p| p.node_id != self.id())
            .map(|p| p.name.clone())
            .collect()
    }
}

/// The agents of one coordinator, by node name.
struct Mesh {
    agents: BTreeMap<String, Agent>,
}

impl Mesh {
    fn agent(&mut self, name: &str) -> &mut Agent {
        self.agents.get_mut(name).unwrap()
    }

    /// Drains every agent; returns each one's deltas.
    fn drain(&mut self) -> BTreeMap<String, Vec<(NetmapDelta, Frame)>> {
        self.agents
            .iter_mut()
            .map(|(name, a)| (name.clone(), a.drain()))
            .collect()
    }

    /// Drains every agent, then checks each one's map against the hub's whole map as its
    /// node may see it.
    fn sync(&mut self, s: &Service) -> BTreeMap<String, Vec<(NetmapDelta, Frame)>> {
        let got = self.drain();
        let whole = s.hub().map("prod").unwrap();
        for (name, a) in &self.agents {
            assert_eq!(
                a.map,
                need_to_know(&whole, a.id()),
                "{name}'s map is the whole map cut to what it may see"
            );
        }
        got
    }
}

/// `map` as node `me` may see it: itself, its visible peers, everything else whole.
fn need_to_know(map: &Netmap, me: NodeId) -> Netmap {
    let visible = visible_peers(map.policy.as_ref(), map, me);
    let mut cut = map.clone();
    cut.peers.retain(|id, _| *id == me || visible.contains(id));
    // Of the policy, the rules that concern the node.
    if let Some(p) = &mut cut.policy {
        let keep = relevant_rules(p, map, me);
        p.rules = keep.iter().map(|&i| p.rules[i].clone()).collect();
    }
    cut
}

async fn join(s: &Service, name: &str, tag: &str, key: u8) -> Agent {
    Agent::new(join_tagged(s, "prod", name, tag, key, false).await)
}

async fn create_network(s: &Service) {
    s.create_network(CreateNetwork {
        name: "prod".into(),
        cidr: "100.64.0.0/24".into(),
        cidr6: None,
    })
    .await
    .unwrap();
}

/// The network with [`NODES`] joined, and the policy set when `policy`.
async fn mesh(s: &Service, policy: bool) -> Mesh {
    create_network(s).await;
    let mut agents = BTreeMap::new();
    for (i, (name, tag)) in NODES.into_iter().enumerate() {
        agents.insert(name.to_string(), join(s, name, tag, i as u8 + 1).await);
    }
    let mut mesh = Mesh { agents };
    if policy {
        set_policy(s, POLICY).await;
    }
    mesh.sync(s);
    mesh
}

async fn set_policy(s: &Service, text: &str) {
    s.edit_policy("prod", PolicyEdit::Set(text.into()), "test")
        .await
        .unwrap();
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| n.to_string()).collect()
}

fn endpoint(n: u8) -> SocketAddr {
    format!("203.0.113.{n}:51820").parse().unwrap()
}

/// Whether any delta of `deltas` upserts or removes peer `id`.
fn mentions(deltas: &[(NetmapDelta, Frame)], id: NodeId) -> bool {
    deltas
        .iter()
        .any(|(d, _)| d.upsert.iter().any(|p| p.node_id == id) || d.remove.contains(&id))
}

async fn strangers_are_not_in_each_others_maps(db: &TestDb) {
    let s = service(db).await;
    let mut mesh = mesh(&s, true).await;
    assert_eq!(mesh.agent("web-1").peers(), names(&["db-1"]));
    assert_eq!(mesh.agent("db-1").peers(), names(&["web-1"]));
    for lonely in ["client-1", "spare-1", "spare-2"] {
        assert!(mesh.agent(lonely).peers().is_empty(), "{lonely}");
    }
    // Of the policy, each agent gets the rules that concern it: web-1 the web -> db rule
    // (line 2), client-1 the client -> chat rule (line 7), a node no rule names none.
    let lines = |m: &Netmap| -> Vec<u32> {
        m.policy
            .as_ref()
            .unwrap()
            .rules
            .iter()
            .map(|r| r.line)
            .collect()
    };
    assert_eq!(lines(&mesh.agent("web-1").map), [2]);
    assert_eq!(lines(&mesh.agent("client-1").map), [7]);
    assert_eq!(lines(&mesh.agent("spare-1").map), Vec::<u32>::new());

    // A session attached now gets the cut full map too, and so does a full map request.
    let client = mesh.agent("client-1").session.node;
    let fresh = s.hub().attach("prod", client, Features::default()).unwrap();
    match decode_frame(&fresh.full_map) {
        ServerMessage::FullMap(m) => {
            assert_eq!(m.peers.keys().copied().collect::<Vec<_>>(), [client])
        }
        other => panic!("{other:?}"),
    }
    let web = mesh.agent("web-1");
    let web_id = web.id();
    s.report_endpoints(web_id, remote(), &[endpoint(1)])
        .await
        .unwrap();
    let serial = mesh.agent("web-1").session.attached.serial;
    match s.hub().full_map_for("prod", web_id, serial) {
        FullMapAnswer::Send(f) => match decode_frame(&f) {
            ServerMessage::FullMap(m) => {
                let names: BTreeSet<String> = m.peers.values().map(|p| p.name.clone()).collect();
                assert_eq!(names, self::names(&["web-1", "db-1"]));
                assert_eq!(m.workloads, s.hub().map("prod").unwrap().workloads);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    s.hub().detach("prod", client, fresh.serial);
}

async fn policy_changes_bring_and_take_peers(db: &TestDb) {
    let s = service(db).await;
    let mut mesh = mesh(&s, true).await;
    let db_id = mesh.agent("db-1").id();
    let client_id = mesh.agent("client-1").id();

    // Clients may reach db now: each gets the other as an upsert, nobody else anything.
    let wider = format!(
        "{POLICY}\n[[rule]]\nfrom = [\"tag:client\"]\nto = [\"tag:db\"]\nports = [\"tcp:5432\"]\n"
    );
    set_policy(&s, &wider).await;
    let got = mesh.sync(&s);
    let upserted = |name: &str| -> Vec<NodeId> {
        got[name]
            .iter()
            .flat_map(|(d, _)| d.upsert.iter().map(|p| p.node_id))
            .collect()
    };
    assert_eq!(upserted("client-1"), [db_id]);
    assert_eq!(upserted("db-1"), [client_id]);
    for (name, deltas) in &got {
        assert_eq!(
            deltas.len(),
            1,
            "{name}: one delta per version, peers or not"
        );
        assert!(matches!(deltas[0].0.policy, Some(PolicyChange::Set(_))));
    }
    assert_eq!(mesh.agent("client-1").peers(), names(&["db-1"]));

    // Back to the narrower one: removed again, on both sides.
    set_policy(&s, POLICY).await;
    let got = mesh.sync(&s);
    assert_eq!(got["client-1"][0].0.remove, [db_id]);
    assert_eq!(got["db-1"][0].0.remove, [client_id]);
    assert!(got["web-1"][0].0.remove.is_empty());

    // Cleared: everyone sees everyone.
    s.edit_policy("prod", PolicyEdit::Clear, "test")
        .await
        .unwrap();
    mesh.sync(&s);
    assert_eq!(mesh.agent("spare-2").peers().len(), NODES.len() - 1);

    // A policy that lets nobody talk: every peer removed from every map.
    set_policy(
        &s,
        "[[rule]]\nfrom = [\"tag:nobody\"]\nto = [\"tag:nobody\"]\nports = [\"*\"]\n",
    )
    .await;
    let got = mesh.sync(&s);
    for (name, deltas) in &got {
        assert_eq!(deltas[0].0.remove.len(), NODES.len() - 1, "{name}");
        assert!(mesh.agents[name].peers().is_empty(), "{name}");
    }
}

async fn hidden_changes_reach_nobody_who_may_not_see_them(db: &TestDb) {
    let s = service(db).await;
    let mut mesh = mesh(&s, true).await;
    let spare = mesh.agent("spare-1").id();
    let db_id = mesh.agent("db-1").id();

    s.report_endpoints(spare, remote(), &[endpoint(9)])
        .await
        .unwrap();
    let got = mesh.sync(&s);
    for (name, deltas) in &got {
        assert_eq!(deltas.len(), 1, "{name}: every session gets every version");
        let seen = mentions(deltas, spare);
        assert_eq!(seen, name == "spare-1", "{name} and spare-1's endpoints");
        // Not even the bytes pass through another node's queue.
        let text = String::from_utf8_lossy(&deltas[0].1[4..]).into_owned();
        assert_eq!(
            text.contains("203.0.113.9"),
            name == "spare-1",
            "{name}: {text}"
        );
    }
    // Those who may not see it share one encoding of the version.
    let empty: Vec<&Frame> = ["web-1", "db-1", "client-1", "spare-2"]
        .iter()
        .map(|n| &got[*n][0].1)
        .collect();
    assert!(empty.iter().all(|f| Frame::ptr_eq(f, empty[0])));

    // db-1's change reaches web-1 (and itself) only.
    s.report_endpoints(db_id, remote(), &[endpoint(2)])
        .await
        .unwrap();
    let got = mesh.sync(&s);
    for (name, deltas) in &got {
        assert_eq!(
            mentions(deltas, db_id),
            name == "web-1" || name == "db-1",
            "{name}"
        );
    }

    // Tags: spare-1 becomes a web node and web-1 a spare: db-1 swaps one for the other.
    s.tag_node("spare-1", Some("prod"), &["+web".into(), "-spare".into()])
        .await
        .unwrap();
    s.tag_node("web-1", Some("prod"), &["+spare".into(), "-web".into()])
        .await
        .unwrap();
    mesh.sync(&s);
    assert_eq!(mesh.agent("db-1").peers(), names(&["spare-1"]));
    assert_eq!(mesh.agent("web-1").peers(), names(&[]));

    // A node removed reaches only those who saw it.
    s.revoke_node("spare-1", Some("prod")).await.unwrap();
    mesh.agents.remove("spare-1");
    let got = mesh.sync(&s);
    for (name, deltas) in &got {
        assert_eq!(mentions(deltas, spare), name == "db-1", "{name}");
    }
}

async fn a_moved_workload_shows_its_holder_to_those_who_talk_to_it(db: &TestDb) {
    let s = service(db).await;
    let mut mesh = mesh(&s, true).await;
    let spare1 = mesh.agent("spare-1").id();
    let spare2 = mesh.agent("spare-2").id();
    let client = mesh.agent("client-1").id();

    // A standby may hold chat: the client sees it from the workload's creation on.
    s.create_workload(CreateWorkload {
        name: "chat".into(),
        network: "prod".into(),
        standby: vec!["spare-1".into()],
        ..CreateWorkload::default()
    })
    .await
    .unwrap();
    mesh.sync(&s);
    assert_eq!(mesh.agent("client-1").peers(), names(&["spare-1"]));
    assert_eq!(mesh.agent("spare-1").peers(), names(&["client-1"]));
    assert!(mesh.agent("web-1").map.workloads.contains_key("chat"));

    // Moved to a node that was no candidate: the client gets it in the very delta that makes
    // it one (nothing earlier told it of the move).
    s.move_workload("prod", "chat", Some("spare-2"))
        .await
        .unwrap();
    let got = mesh.sync(&s);
    let first_candidate = got["client-1"]
        .iter()
        .position(|(d, _)| {
            d.upsert_workloads.iter().any(|w| {
                w.holder == Some(spare2)
                    || w.previous == Some(spare2)
                    || w.candidates.contains(&spare2)
            })
        })
        .expect("the move reached the client");
    assert!(
        got["client-1"][..=first_candidate]
            .iter()
            .any(|(d, _)| d.upsert.iter().any(|p| p.node_id == spare2)),
        "spare-2 reached the client no later than becoming chat's candidate"
    );
    assert!(got["spare-2"]
        .iter()
        .any(|(d, _)| d.upsert.iter().any(|p| p.node_id == client)));
    assert_eq!(
        mesh.agent("client-1").peers(),
        names(&["spare-1", "spare-2"])
    );
    assert!(!mentions(&got["web-1"], spare2) && !mentions(&got["db-1"], spare2));

    // Deleted: nobody may hold it, so the client sees neither spare any more.
    s.delete_workload("prod", "chat").await.unwrap();
    let got = mesh.sync(&s);
    let removed: BTreeSet<NodeId> = got["client-1"]
        .iter()
        .flat_map(|(d, _)| d.remove.iter().copied())
        .collect();
    assert_eq!(removed, BTreeSet::from([spare1, spare2]));
    assert!(mesh.agent("client-1").peers().is_empty());
}

async fn without_a_policy_every_session_shares_one_frame(db: &TestDb) {
    let s = service(db).await;
    let mut mesh = mesh(&s, false).await;
    assert_eq!(mesh.agent("spare-1").peers().len(), NODES.len() - 1);
    let web = mesh.agent("web-1").id();
    let shared = |got: &BTreeMap<String, Vec<(NetmapDelta, Frame)>>| {
        let frames: Vec<&Frame> = got.values().map(|d| &d[0].1).collect();
        assert_eq!(frames.len(), NODES.len());
        frames.iter().all(|f| Frame::ptr_eq(f, frames[0]))
    };
    s.report_endpoints(web, remote(), &[endpoint(1)])
        .await
        .unwrap();
    assert!(shared(&mesh.sync(&s)), "one encoding for every session");

    // With a policy the frames differ (web-1's change reaches db-1, not client-1) ...
    set_policy(&s, POLICY).await;
    mesh.sync(&s);
    s.report_endpoints(web, remote(), &[endpoint(2)])
        .await
        .unwrap();
    assert!(!shared(&mesh.sync(&s)));
    // ... and once it is cleared, one shared frame again.
    s.edit_policy("prod", PolicyEdit::Clear, "test")
        .await
        .unwrap();
    mesh.sync(&s);
    s.report_endpoints(web, remote(), &[endpoint(3)])
        .await
        .unwrap();
    assert!(shared(&mesh.sync(&s)));
}

async fn a_following_coordinator_cuts_maps_the_same_way(db: &TestDb) {
    let first = service(db).await;
    create_network(&first).await;
    set_policy(&first, POLICY).await;
    // The second coordinator serves every session; the first makes the changes.
    let second = service(db).await;
    let mut agents = BTreeMap::new();
    for (i, (name, tag)) in NODES.into_iter().enumerate() {
        agents.insert(
            name.to_string(),
            join(&second, name, tag, i as u8 + 1).await,
        );
    }
    let mut mesh = Mesh { agents };
    mesh.sync(&second);
    assert_eq!(mesh.agent("web-1").peers(), names(&["db-1"]));
    assert!(mesh.agent("client-1").peers().is_empty());
    let spare = mesh.agent("spare-1").id();

    // Several changes made elsewhere, replayed here as one delta: a hidden node's endpoints,
    // a tag that opens web-1 to spare-2, a node that joins as a db.
    first.follow("prod").await.unwrap();
    first
        .report_endpoints(spare, remote(), &[endpoint(7)])
        .await
        .unwrap();
    first
        .tag_node("spare-2", Some("prod"), &["+db".into()])
        .await
        .unwrap();
    let db2 = join(&first, "db-2", "db", 9).await;
    second.follow("prod").await.unwrap();
    let got = mesh.sync(&second);
    for (name, deltas) in &got {
        assert_eq!(mentions(deltas, spare), name == "spare-1", "{name}");
    }
    assert_eq!(
        mesh.agent("web-1").peers(),
        names(&["db-1", "db-2", "spare-2"])
    );
    assert!(!mentions(&got["client-1"], db2.id()));

    // A policy change made elsewhere.
    first
        .edit_policy("prod", PolicyEdit::Clear, "test")
        .await
        .unwrap();
    second.follow("prod").await.unwrap();
    mesh.sync(&second);
    assert_eq!(mesh.agent("client-1").peers().len(), NODES.len());
}

crate::on_both_stores!(
    strangers_are_not_in_each_others_maps,
    policy_changes_bring_and_take_peers,
    hidden_changes_reach_nobody_who_may_not_see_them,
    a_moved_workload_shows_its_holder_to_those_who_talk_to_it,
    without_a_policy_every_session_shares_one_frame,
    a_following_coordinator_cuts_maps_the_same_way,
);

/// Figures for the hub's need to know (no assertions on time): 1,000 nodes in 100 tags, a
/// policy of 1,000 rules between tags, 1,000 sessions. Prints the time per endpoint change
/// fanned out (with and without the policy), per join, per tag change and per policy change.
/// Run it with `cargo test -p meshlink-coordinator --release --test it -- --ignored
/// --nocapture need_to_know::fan_out_figures`.
#[test]
#[ignore = "a measurement: run it by hand, in release"]
fn fan_out_figures() {
    const NODES: u64 = 1_000;
    const TAGS: u64 = 100;
    let tag = |i: u64| format!("svc-{}", i % TAGS);
    let peer = |id: u64, tag: String| PeerInfo {
        node_id: id,
        name: format!("vm-{id}"),
        public_key: PublicKey([(id % 251) as u8; 32]),
        next_key: None,
        addresses: vec![format!("100.64.{}.{}/32", id / 250, id % 250 + 1)
            .parse()
            .unwrap()],
        allowed_ips: vec![],
        endpoints: vec![format!("198.18.{}.{}:51820", id / 250, id % 250 + 1)
            .parse()
            .unwrap()],
        labels: BTreeMap::new(),
        tags: vec![tag],
        via: None,
    };
    let rules = |salt: u64| -> String {
        (0..1_000u64)
            .map(|k| {
                format!(
                    "[[rule]]\nfrom = [\"tag:svc-{}\"]\nto = [\"tag:svc-{}\"]\nports = [\"tcp:{}\"]\n",
                    k % TAGS,
                    (k % TAGS + 1 + (k / TAGS + salt) * 7) % TAGS,
                    1_000 + k
                )
            })
            .collect()
    };
    let policy = |salt: u64, version: u64| {
        meshlink_proto::policy::parse(&rules(salt))
            .unwrap()
            .into_policy(version)
    };
    let mut map = Netmap {
        version: 1,
        policy: Some(policy(0, 1)),
        ..Netmap::default()
    };
    for id in 1..=NODES {
        map.peers.insert(id, peer(id, tag(id)));
    }
    let seen = visible_peers(map.policy.as_ref(), &map, 1).len();

    for with_policy in [false, true] {
        let hub = Hub::new(4_096);
        let mut m = map.clone();
        if !with_policy {
            m.policy = None;
        }
        hub.set_map("n", m);
        let t = Instant::now();
        let mut sessions: Vec<_> = (1..=NODES)
            .map(|id| hub.attach("n", id, Features::default()).unwrap())
            .collect();
        let attach = t.elapsed() / NODES as u32;
        let drain = |sessions: &mut Vec<meshlink_coordinator::hub::Attached>| {
            for s in sessions.iter_mut() {
                while s.rx.try_recv().is_ok() {}
            }
        };
        let mut version = hub.version("n").unwrap();
        let mut next = || {
            version += 1;
            version
        };

        const ROUNDS: u32 = 200;
        let t = Instant::now();
        let mut frames = 0;
        for r in 0..ROUNDS {
            let id = 1 + u64::from(r) % NODES;
            let mut p = peer(id, tag(id));
            p.endpoints = vec![format!("203.0.113.{}:{}", r % 250, 1_000 + r)
                .parse()
                .unwrap()];
            frames += hub.apply("n", next(), vec![p], vec![]).unwrap().frames;
        }
        let endpoint = t.elapsed() / ROUNDS;
        drain(&mut sessions);

        let t = Instant::now();
        for r in 0..ROUNDS {
            let id = 1 + u64::from(r) % NODES;
            hub.apply(
                "n",
                next(),
                vec![peer(id, tag(id + 1 + u64::from(r)))],
                vec![],
            );
        }
        let retag = t.elapsed() / ROUNDS;
        drain(&mut sessions);

        let t = Instant::now();
        for r in 0..ROUNDS {
            hub.apply(
                "n",
                next(),
                vec![peer(NODES + 1 + u64::from(r), tag(u64::from(r)))],
                vec![],
            );
        }
        let join = t.elapsed() / ROUNDS;
        drain(&mut sessions);

        print!(
            "{} policy: attach {attach:?}/session; endpoint change {endpoint:?} ({:.1} encodings); \
             tag change {retag:?}; join {join:?}",
            if with_policy { "with a" } else { "without a" },
            f64::from(frames as u32) / f64::from(ROUNDS),
        );
        if with_policy {
            const CHANGES: u32 = 5;
            let t = Instant::now();
            let mut bytes = 0;
            for r in 0..CHANGES {
                let delta = NetmapDelta {
                    to_version: next(),
                    policy: Some(PolicyChange::Set(policy(
                        u64::from(r) + 1,
                        u64::from(r) + 2,
                    ))),
                    ..NetmapDelta::default()
                };
                let f = hub.apply_delta("n", delta).unwrap();
                bytes += f.bytes;
                drain(&mut sessions);
            }
            print!(
                "; policy change {:?} ({} MB encoded each); {seen} of {NODES} peers seen by vm-1",
                t.elapsed() / CHANGES,
                bytes / CHANGES as usize / 1_000_000
            );
        }
        println!();
    }
}
