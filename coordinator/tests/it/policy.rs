//! Access policies and tags through the service, on both stores: validation before anything
//! changes, versions and rollback, the change reaching every session as one delta, tags, a
//! restarted coordinator and a second coordinator following the change log.

use std::sync::Arc;

use meshlink_coordinator::access::PolicyEdit;
use meshlink_coordinator::handlers::networks::CreateNetwork;
use meshlink_coordinator::handlers::workloads::CreateWorkload;
use meshlink_coordinator::handlers::ApiError;
use meshlink_coordinator::hub::Outbound;
use meshlink_coordinator::service::{Service, Session, SystemClock};
use meshlink_proto::control::ServerMessage;
use meshlink_proto::{Netmap, NetmapDelta, PolicyChange};

use crate::common::{decode_frame, join_tagged, TestDb};

const POLICY: &str = r#"
[[rule]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[test]]
from = "web-1"
to = "db-1"
port = "tcp:5432"
expect = "allow"

[[test]]
from = "db-1"
to = "web-1"
port = "tcp:22"
expect = "deny"
"#;

async fn service(db: &TestDb) -> Service {
    Service::load(Arc::new(db.open().await), Arc::new(SystemClock), 64)
        .await
        .unwrap()
}

/// Applies every delta queued to each session to its map; returns how each delta's policy
/// came ("set", "edit", "clear"), session by session.
fn apply_deltas(sessions: &mut [Session], maps: &mut [Netmap]) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    for (session, map) in sessions.iter_mut().zip(maps) {
        for d in deltas(session) {
            match &d.policy {
                Some(PolicyChange::Set(_)) => kinds.push("set"),
                Some(PolicyChange::Edit(_)) => kinds.push("edit"),
                Some(PolicyChange::Clear) => kinds.push("clear"),
                None => {}
            }
            map.apply(d).unwrap();
        }
    }
    kinds
}

/// Every session's map (as its agent applied what it was sent) is at the coordinator's version
/// with exactly the rules the coordinator gives its node.
fn assert_agents_have_their_rules(s: &Service, sessions: &[Session], maps: &[Netmap], when: &str) {
    let whole = s.hub().map("prod").unwrap();
    for (session, map) in sessions.iter().zip(maps) {
        assert_eq!(map.version, whole.version, "{} {when}", session.name);
        assert_eq!(
            map.policy,
            whole
                .policy
                .as_ref()
                .map(|p| p.for_node(&whole, session.node)),
            "{} {when}",
            session.name
        );
    }
}

/// Network prod, 100.64.0.0/24.
async fn create_prod(s: &Service) {
    s.create_network(CreateNetwork {
        name: "prod".into(),
        cidr: "100.64.0.0/24".into(),
        cidr6: None,
    })
    .await
    .unwrap();
}

/// A network with nodes web-1 (tag web) and db-1 (tag db), joined as sessions.
async fn mesh(s: &Service) -> Vec<Session> {
    create_prod(s).await;
    let mut sessions = Vec::new();
    for (i, (name, tag)) in [("web-1", "web"), ("db-1", "db")].into_iter().enumerate() {
        sessions.push(join_prod(s, name, tag, i as u8 + 1, false).await.0);
    }
    sessions
}

/// Every delta queued to a session so far.
fn deltas(session: &mut Session) -> Vec<NetmapDelta> {
    let mut out = Vec::new();
    while let Ok(Outbound::Frame(f)) = session.attached.rx.try_recv() {
        if let ServerMessage::Delta(d) = decode_frame(&f) {
            out.push(d);
        }
    }
    out
}

async fn a_bad_policy_changes_nothing_and_names_line_and_field(db: &TestDb) {
    let s = service(db).await;
    let mut sessions = mesh(&s).await;
    deltas(&mut sessions[0]);
    let version = s.hub().version("prod").unwrap();

    let bad = "[[rule]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"tcp:5432\", \"tcp:99999\"]\n";
    let e = s
        .edit_policy("prod", PolicyEdit::Set(bad.into()), "admin")
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, ApiError::Invalid(_)), "{e}");
    assert!(
        text.contains("line 4") && text.contains("rule[1].ports[2]"),
        "{text}"
    );

    // A test the rules do not meet: refused, with the test's line.
    let failing = POLICY.replace(
        "tcp:5432\"\nexpect = \"allow\"",
        "tcp:80\"\nexpect = \"allow\"",
    );
    let e = s
        .edit_policy("prod", PolicyEdit::Set(failing), "admin")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("policy tests failed") && e.to_string().contains("line 7"),
        "{e}"
    );

    let e = s
        .edit_policy("nope", PolicyEdit::Set(POLICY.into()), "admin")
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::NotFound(_)), "{e}");

    assert_eq!(
        s.hub().version("prod"),
        Some(version),
        "no version was taken"
    );
    assert!(s.policy_history("prod").await.unwrap().is_empty());
    assert!(s.hub().map("prod").unwrap().policy.is_none());
    assert!(deltas(&mut sessions[0]).is_empty(), "nothing was sent");
}

async fn policies_are_versioned_sent_rolled_back_and_cleared(db: &TestDb) {
    let s = service(db).await;
    let mut sessions = mesh(&s).await;
    for session in &mut sessions {
        deltas(session);
    }

    let set = s
        .edit_policy("prod", PolicyEdit::Set(POLICY.into()), "alice")
        .await
        .unwrap();
    assert_eq!(set.record.version, 1);
    assert_eq!(set.record.author, "alice");
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    for session in &mut sessions {
        let got = deltas(session);
        assert_eq!(got.len(), 1, "one delta per change");
        match &got[0].policy {
            Some(PolicyChange::Set(p)) => {
                assert_eq!(p.version, 1);
                assert_eq!(p.rules.len(), 1);
            }
            other => panic!("expected the policy, got {other:?}"),
        }
    }

    // A second version that names nobody yet: accepted, with a warning.
    let v2 = "[[rule]]\nfrom = [\"tag:web\"]\nto = [\"tag:cache\"]\nports = [\"*\"]\n";
    let second = s
        .edit_policy("prod", PolicyEdit::Set(v2.into()), "alice")
        .await
        .unwrap();
    assert_eq!(second.record.version, 2);
    assert!(
        second.warnings.iter().any(|w| w.contains("tag:cache")),
        "{:?}",
        second.warnings
    );

    let back = s
        .edit_policy("prod", PolicyEdit::Rollback(1), "bob")
        .await
        .unwrap();
    assert_eq!(back.record.version, 3);
    assert_eq!(back.record.restored, Some(1));
    assert_eq!(back.record.source.as_deref(), Some(POLICY));
    let map = s.hub().map("prod").unwrap();
    assert_eq!(map.policy.as_ref().unwrap().version, 3);
    assert_eq!(map.policy.as_ref().unwrap().rules[0].ports.len(), 1);

    let e = s
        .edit_policy("prod", PolicyEdit::Rollback(9), "bob")
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::NotFound(_)), "{e}");

    let cleared = s
        .edit_policy("prod", PolicyEdit::Clear, "bob")
        .await
        .unwrap();
    assert_eq!(cleared.record.version, 4);
    assert!(s.hub().map("prod").unwrap().policy.is_none());
    let got = deltas(&mut sessions[1]);
    assert!(matches!(
        got.last().and_then(|d| d.policy.as_ref()),
        Some(PolicyChange::Clear)
    ));
    let history = s.policy_history("prod").await.unwrap();
    let versions: Vec<u64> = history.iter().map(|p| p.version).collect();
    assert_eq!(versions, [1, 2, 3, 4]);
    assert!(history[3].source.is_none());

    // Rolling back to version 3 brings the policy back after a clear.
    s.edit_policy("prod", PolicyEdit::Rollback(3), "bob")
        .await
        .unwrap();
    assert_eq!(s.hub().map("prod").unwrap().policy.unwrap().version, 5);
}

async fn tags_reach_the_map_and_policies_follow_them(db: &TestDb) {
    let s = service(db).await;
    let mut sessions = mesh(&s).await;
    for session in &mut sessions {
        deltas(session);
    }
    let node = s
        .tag_node("web-1", Some("prod"), &["+db".into(), "-web".into()])
        .await
        .unwrap();
    assert_eq!(node.tags, ["db"]);
    let got = deltas(&mut sessions[1]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].upsert[0].tags, ["db"]);
    let e = s.tag_node("web-1", None, &["db".into()]).await.unwrap_err();
    assert!(e.to_string().contains("+TAG"), "{e}");
    let e = s
        .tag_node("web-1", None, &["+Not Valid".into()])
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Invalid(_)), "{e}");

    s.create_workload(CreateWorkload {
        name: "chat".into(),
        network: "prod".into(),
        tags: vec!["app".into()],
        ..CreateWorkload::default()
    })
    .await
    .unwrap();
    let w = s
        .tag_workload("prod", "chat", &["+public".into()])
        .await
        .unwrap();
    assert_eq!(w.tags, ["app", "public"]);
    let map = s.hub().map("prod").unwrap();
    assert_eq!(map.workloads["chat"].tags, ["app", "public"]);
}

async fn a_restarted_or_second_coordinator_has_the_policy(db: &TestDb) {
    let first = service(db).await;
    mesh(&first).await;
    // A second coordinator on the same store, loaded before the change: it follows the log.
    let second = service(db).await;
    first
        .edit_policy("prod", PolicyEdit::Set(POLICY.into()), "alice")
        .await
        .unwrap();
    second.follow("prod").await.unwrap();
    let followed = second.hub().map("prod").unwrap();
    assert_eq!(followed, first.hub().map("prod").unwrap());
    assert_eq!(followed.policy.unwrap().version, 1);
    first
        .edit_policy("prod", PolicyEdit::Clear, "alice")
        .await
        .unwrap();
    second.follow("prod").await.unwrap();
    assert!(second.hub().map("prod").unwrap().policy.is_none());
    first
        .edit_policy("prod", PolicyEdit::Rollback(1), "alice")
        .await
        .unwrap();
    // A third, loaded from the store afresh.
    let third = service(db).await;
    assert_eq!(
        third.hub().map("prod").unwrap().policy,
        first.hub().map("prod").unwrap().policy
    );
}

/// A node `name` tagged `tag` joined to network prod with key byte `key`, its agent taking
/// policy edits or not, and the full map it got.
async fn join_prod(s: &Service, name: &str, tag: &str, key: u8, edits: bool) -> (Session, Netmap) {
    let session = join_tagged(s, "prod", name, tag, key, edits).await;
    let map = match decode_frame(&session.attached.full_map) {
        ServerMessage::FullMap(m) => m,
        other => panic!("{other:?}"),
    };
    (session, map)
}

/// An operator's edit of a few rules of a large policy: agents whose hello says they take
/// edits get the change as an edit of the rules they have; an older agent gets its rules
/// whole; both end with the rules that concern them.
async fn an_edited_policy_reaches_agents_as_an_edit_or_whole(db: &TestDb) {
    let s = service(db).await;
    create_prod(&s).await;
    let (mut sessions, mut maps) = (Vec::new(), Vec::new());
    for (i, name) in ["new-1", "old-1"].into_iter().enumerate() {
        let (session, map) = join_prod(&s, name, "web", i as u8 + 1, i == 0).await;
        sessions.push(session);
        maps.push(map);
    }
    let policy = |ports: &[u16]| -> String {
        ports
            .iter()
            .map(|p| {
                format!(
                    "[[rule]]\nfrom = [\"tag:web\"]\nto = [\"tag:web\"]\nports = [\"tcp:{p}\"]\n"
                )
            })
            .collect()
    };
    let mut ports: Vec<u16> = (1000..1300).collect();
    let mut versions = Vec::new();
    for round in 0..3 {
        if round == 1 {
            ports[7] = 7;
            ports.remove(200);
        }
        if round == 2 {
            ports.insert(0, 9);
        }
        s.edit_policy("prod", PolicyEdit::Set(policy(&ports)), "alice")
            .await
            .unwrap();
        // (The old agent's join reached the new one before: no policy in it.)
        versions.push(apply_deltas(&mut sessions, &mut maps));
        assert_agents_have_their_rules(&s, &sessions, &maps, &format!("round {round}"));
    }
    // The first version is whole to both; then the new agent gets edits, the old one the
    // rules whole.
    assert_eq!(versions, [["set", "set"], ["edit", "set"], ["edit", "set"]]);
}

/// Six agents, each with a tag of its own, so each has its own part of the policy: a change
/// of a few rules, and a node's tags changed under the same policy, reach each as an edit of
/// the part it has (made from one alignment of the policy per change), exactly the rules the
/// coordinator gives its node.
async fn distinct_parts_of_a_policy_each_get_their_own_edit(db: &TestDb) {
    let s = service(db).await;
    create_prod(&s).await;
    let (mut sessions, mut maps) = (Vec::new(), Vec::new());
    for i in 0..6u8 {
        let (session, map) = join_prod(&s, &format!("vm-{i}"), &format!("t{i}"), i + 1, true).await;
        sessions.push(session);
        maps.push(map);
    }
    // The rule of port p concerns tag t(p mod 6); every seventh port's, everyone.
    let policy = |ports: &[u16]| -> String {
        ports
            .iter()
            .map(|p| {
                let to = if p % 7 == 0 {
                    "*".to_string()
                } else {
                    format!("tag:t{}", p % 6)
                };
                format!(
                    "[[rule]]\nfrom = [\"tag:t{}\"]\nto = [\"{to}\"]\nports = [\"tcp:{p}\"]\n",
                    p % 6
                )
            })
            .collect()
    };
    let mut ports: Vec<u16> = (2000..2600).collect();
    let mut rounds = Vec::new();
    for round in 0..4 {
        match round {
            0 => {}
            1 => {
                for k in [3, 100, 101, 350, 599] {
                    ports[k] += 1000;
                }
            }
            2 => {
                ports.insert(40, 9);
                ports.remove(500);
            }
            _ => {}
        }
        if round == 3 {
            // The same policy, another part: vm-2 takes t3's rules too.
            s.tag_node("vm-2", Some("prod"), &["+t3".into()])
                .await
                .unwrap();
        } else {
            s.edit_policy("prod", PolicyEdit::Set(policy(&ports)), "alice")
                .await
                .unwrap();
        }
        rounds.push(apply_deltas(&mut sessions, &mut maps));
        let whole = s.hub().map("prod").unwrap();
        let parts: std::collections::BTreeSet<u64> = sessions
            .iter()
            .map(|session| {
                let p = whole.policy.as_ref().unwrap();
                p.for_node(&whole, session.node).digest()
            })
            .collect();
        assert_eq!(parts.len(), 6, "each node has a part of its own");
        assert_agents_have_their_rules(&s, &sessions, &maps, &format!("round {round}"));
    }
    assert_eq!(rounds[0], ["set"; 6]);
    assert_eq!(rounds[1], ["edit"; 6]);
    assert_eq!(rounds[2], ["edit"; 6]);
    assert_eq!(rounds[3], ["edit"], "vm-2 alone, its part edited");
}

/// A policy set, cleared and set again: the agents get it whole, then the clear, then whole
/// again (nothing they had is a base any more), and end with the coordinator's rules.
async fn a_policy_set_again_after_a_clear_goes_whole(db: &TestDb) {
    let s = service(db).await;
    create_prod(&s).await;
    let (mut sessions, mut maps) = (Vec::new(), Vec::new());
    for i in 0..2u8 {
        let (session, map) = join_prod(&s, &format!("vm-{i}"), "web", i + 1, true).await;
        sessions.push(session);
        maps.push(map);
    }
    let rules = |port: u16| -> String {
        (0..50)
            .map(|k| {
                format!(
                    "[[rule]]\nfrom = [\"tag:web\"]\nto = [\"*\"]\nports = [\"tcp:{}\"]\n",
                    port + k
                )
            })
            .collect()
    };
    let mut rounds = Vec::new();
    for step in [Some(1000), None, Some(1000), Some(1001)] {
        match step {
            Some(port) => {
                s.edit_policy("prod", PolicyEdit::Set(rules(port)), "alice")
                    .await
            }
            None => s.edit_policy("prod", PolicyEdit::Clear, "alice").await,
        }
        .unwrap();
        rounds.push(apply_deltas(&mut sessions, &mut maps));
        assert_agents_have_their_rules(&s, &sessions, &maps, &format!("{step:?}"));
    }
    assert_eq!(
        rounds,
        [
            ["set", "set"],
            ["clear", "clear"],
            ["set", "set"],
            ["edit", "edit"]
        ]
    );
}

crate::on_both_stores!(
    a_policy_set_again_after_a_clear_goes_whole,
    distinct_parts_of_a_policy_each_get_their_own_edit,
    an_edited_policy_reaches_agents_as_an_edit_or_whole,
    a_bad_policy_changes_nothing_and_names_line_and_field,
    policies_are_versioned_sent_rolled_back_and_cleared,
    tags_reach_the_map_and_policies_follow_them,
    a_restarted_or_second_coordinator_has_the_policy,
);
