//! Handler tests, each run on a temporary SQLite store and on a database of the private
//! PostgreSQL cluster: no sockets, time passed in.

use std::net::IpAddr;
use std::sync::Arc;

use meshlink_coordinator::handlers::networks::{create_network, list_networks, CreateNetwork};
use meshlink_coordinator::handlers::nodes::{
    authenticate, delete_node, find_node, join, list_nodes, netmap, revoke_node, update_endpoints,
    HelloEndpoints, Joined,
};
use meshlink_coordinator::handlers::tokens::{
    create_token, list_tokens, revoke_token, CreateToken,
};
use meshlink_coordinator::handlers::{ApiError, Caller};
use meshlink_coordinator::store::{Store, TokenRecord};

use crate::common::{join_hello, node_hello, TestDb};

const ADMIN: Caller = Caller::Admin;

fn agent() -> Caller {
    Caller::Agent {
        remote: "198.18.5.5".parse().unwrap(),
    }
}

async fn network(store: &dyn Store, name: &str, cidr: &str) {
    create_network(
        store,
        1000,
        &ADMIN,
        CreateNetwork {
            name: name.into(),
            cidr: cidr.into(),
            cidr6: None,
        },
    )
    .await
    .unwrap();
}

async fn token(
    store: &dyn Store,
    net: &str,
    secret: &str,
    expires: Option<u64>,
    uses: Option<u64>,
) -> TokenRecord {
    let req = CreateToken {
        network: net.into(),
        tags: vec!["web".into()],
        expires_in_secs: expires,
        uses,
    };
    create_token(store, 1000, &ADMIN, req, secret)
        .await
        .unwrap()
}

async fn join_ok(store: &dyn Store, secret: &str, key: u8, name: Option<&str>) -> Joined {
    join(
        store,
        1001,
        &agent(),
        &join_hello(secret, key, name),
        secret,
        &format!("node-secret-{key}"),
    )
    .await
    .unwrap()
}

async fn join_allocates_lowest_addresses_and_counts_uses(db: &TestDb) {
    let store = db.open().await;
    network(&store, "prod", "100.64.0.0/24").await;
    token(&store, "prod", "tok", None, Some(2)).await;

    let a = join_ok(&store, "tok", 1, Some("web-1")).await;
    assert_eq!(
        (
            a.node.id,
            a.node.name.as_str(),
            a.node.address.to_string().as_str()
        ),
        (1, "web-1", "100.64.0.1")
    );
    assert_eq!(a.node.tags, vec!["web".to_string()]);
    assert_eq!(a.node.observed, Some("198.18.5.5:51820".parse().unwrap()));
    assert_eq!(a.version, 1);
    let b = join_ok(&store, "tok", 2, None).await;
    assert_eq!(
        (b.node.name.as_str(), b.node.address.to_string().as_str()),
        ("node-2", "100.64.0.2")
    );
    assert_eq!(b.version, 2);

    let e = join(
        &store,
        1001,
        &agent(),
        &join_hello("tok", 3, None),
        "tok",
        "s",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("no uses left")),
        "{e}"
    );
    let tokens = list_tokens(&store, &ADMIN).await.unwrap();
    assert_eq!((tokens[0].used, tokens[0].max_uses), (2, Some(2)));
    assert!(!tokens[0].secret_hash.contains("tok"));

    let unknown = join(
        &store,
        1001,
        &agent(),
        &join_hello("nope", 4, None),
        "nope",
        "s",
    )
    .await
    .unwrap_err();
    assert!(matches!(unknown, ApiError::Unauthorized(_)));
}

async fn expired_and_revoked_tokens_are_refused(db: &TestDb) {
    let store = db.open().await;
    network(&store, "prod", "100.64.0.0/24").await;
    token(&store, "prod", "short", Some(60), None).await;
    let e = join(
        &store,
        1060,
        &agent(),
        &join_hello("short", 1, None),
        "short",
        "s",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("expired")),
        "{e}"
    );
    join(
        &store,
        1059,
        &agent(),
        &join_hello("short", 1, None),
        "short",
        "s",
    )
    .await
    .unwrap();

    let t = token(&store, "prod", "revoked", None, None).await;
    revoke_token(&store, &ADMIN, t.id).await.unwrap();
    let e = join(
        &store,
        1001,
        &agent(),
        &join_hello("revoked", 2, None),
        "revoked",
        "s",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("revoked")),
        "{e}"
    );
    assert!(matches!(
        revoke_token(&store, &ADMIN, 999).await,
        Err(ApiError::NotFound(_))
    ));

    let e = create_token(
        &store,
        0,
        &ADMIN,
        CreateToken {
            network: "nope".into(),
            tags: vec![],
            expires_in_secs: None,
            uses: None,
        },
        "x",
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ApiError::NotFound(_)));
}

/// A token asked for over the admin API with neither `uses` nor `expires_in_secs` (what
/// `meshctl token create --network N` sends) allows one join, within one hour.
async fn default_tokens_allow_one_join_within_an_hour(db: &TestDb) {
    let store = db.open().await;
    network(&store, "prod", "100.64.0.0/24").await;
    let default = || {
        CreateToken::from(meshlink_api::CreateToken {
            network: "prod".parse().unwrap(),
            tags: vec![],
            expires_in_secs: None,
            uses: None,
        })
    };
    let t = create_token(&store, 1000, &ADMIN, default(), "once")
        .await
        .unwrap();
    assert_eq!((t.max_uses, t.expires_at), (Some(1), Some(1000 + 3600)));
    join(
        &store,
        1001,
        &agent(),
        &join_hello("once", 1, None),
        "once",
        "s1",
    )
    .await
    .unwrap();
    let e = join(
        &store,
        1002,
        &agent(),
        &join_hello("once", 2, None),
        "once",
        "s2",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("no uses left")),
        "a second join with a default token: {e}"
    );

    create_token(&store, 1000, &ADMIN, default(), "hour")
        .await
        .unwrap();
    let e = join(
        &store,
        4600,
        &agent(),
        &join_hello("hour", 3, None),
        "hour",
        "s3",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("expired")),
        "a default token an hour later: {e}"
    );
    join(
        &store,
        4599,
        &agent(),
        &join_hello("hour", 3, None),
        "hour",
        "s3",
    )
    .await
    .unwrap();
}

async fn addresses_are_stable_across_authentication_and_reopening(db: &TestDb) {
    let (id, address) = {
        let store = db.open().await;
        network(&store, "prod", "100.64.0.0/24").await;
        token(&store, "prod", "tok", None, None).await;
        join_ok(&store, "tok", 1, None).await;
        let b = join_ok(&store, "tok", 2, None).await;
        let again = authenticate(
            &store,
            2000,
            &agent(),
            &node_hello(b.node.id, "node-secret-2", 2),
            b.node.id,
            "node-secret-2",
            HelloEndpoints::Record,
        )
        .await
        .unwrap();
        assert_eq!(again.node.address, b.node.address);
        assert_eq!(again.node.last_seen, Some(2000));
        assert_eq!(again.version, None, "same endpoints: no change");
        store.close().await;
        (b.node.id, b.node.address)
    };
    let store = db.open().await;
    let again = authenticate(
        &store,
        3000,
        &agent(),
        &node_hello(id, "node-secret-2", 2),
        id,
        "node-secret-2",
        HelloEndpoints::Record,
    )
    .await
    .unwrap();
    assert_eq!((again.node.id, again.node.address), (id, address));
    // Endpoints left for later: checked, not recorded.
    let mut moved = node_hello(id, "node-secret-2", 2);
    moved.endpoints = vec!["198.18.7.7:51820".parse().unwrap()];
    let left = authenticate(
        &store,
        3000,
        &agent(),
        &moved,
        id,
        "node-secret-2",
        HelloEndpoints::Leave,
    )
    .await
    .unwrap();
    assert_eq!(left.version, None);
    assert_eq!(left.node.endpoints, again.node.endpoints);
    let recorded = authenticate(
        &store,
        3000,
        &agent(),
        &moved,
        id,
        "node-secret-2",
        HelloEndpoints::Record,
    )
    .await
    .unwrap();
    assert!(recorded.version.is_some());
    assert_eq!(recorded.node.endpoints, moved.endpoints);
    let wrong = authenticate(
        &store,
        3000,
        &agent(),
        &node_hello(id, "bad", 2),
        id,
        "bad",
        HelloEndpoints::Record,
    )
    .await
    .unwrap_err();
    assert!(matches!(wrong, ApiError::Unauthorized(_)));
    let other_key = authenticate(
        &store,
        3000,
        &agent(),
        &node_hello(id, "node-secret-2", 9),
        id,
        "node-secret-2",
        HelloEndpoints::Record,
    )
    .await
    .unwrap_err();
    assert!(matches!(other_key, ApiError::Refused(_)));
}

async fn deleted_addresses_are_reused_but_ids_are_not(db: &TestDb) {
    let store = db.open().await;
    network(&store, "prod", "100.64.0.0/24").await;
    token(&store, "prod", "tok", None, None).await;
    let a = join_ok(&store, "tok", 1, Some("a")).await;
    join_ok(&store, "tok", 2, Some("b")).await;
    let deleted = delete_node(&store, &ADMIN, "a", None).await.unwrap();
    assert_eq!(deleted.node.id, a.node.id);
    let c = join_ok(&store, "tok", 3, Some("a")).await;
    assert_eq!(
        c.node.address, a.node.address,
        "the lowest free address is the freed one"
    );
    assert_eq!(c.node.id, 3, "ids are never reused");
    let gone = authenticate(
        &store,
        2000,
        &agent(),
        &node_hello(a.node.id, "node-secret-1", 1),
        a.node.id,
        "node-secret-1",
        HelloEndpoints::Record,
    )
    .await
    .unwrap_err();
    assert!(matches!(gone, ApiError::Unauthorized(_)));
}

async fn revoked_nodes_are_refused_and_leave_the_map(db: &TestDb) {
    let store = db.open().await;
    network(&store, "prod", "100.64.0.0/24").await;
    token(&store, "prod", "tok", None, None).await;
    let a = join_ok(&store, "tok", 1, Some("a")).await;
    join_ok(&store, "tok", 2, Some("b")).await;
    let r = revoke_node(&store, &ADMIN, &a.node.id.to_string(), None)
        .await
        .unwrap();
    assert!(r.node.revoked);
    assert!(r.version.is_some());
    let again = revoke_node(&store, &ADMIN, "a", None).await.unwrap();
    assert_eq!(again.version, None, "revoking twice changes nothing");
    let e = authenticate(
        &store,
        2000,
        &agent(),
        &node_hello(a.node.id, "node-secret-1", 1),
        a.node.id,
        "node-secret-1",
        HelloEndpoints::Record,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("revoked")),
        "{e}"
    );
    let nodes = list_nodes(&store, &ADMIN, Some("prod")).await.unwrap();
    assert_eq!(
        netmap(9, &nodes, &[], None)
            .peers
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![2]
    );
    let e = update_endpoints(
        &store,
        &Caller::Node {
            id: a.node.id,
            remote: IpAddr::from([198, 18, 0, 1]),
        },
        &[],
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ApiError::Refused(_)));
    // A revoked node keeps its address until deleted; deleting it changes no map.
    let d = delete_node(&store, &ADMIN, "a", Some("prod"))
        .await
        .unwrap();
    assert_eq!(d.version, None);
}

async fn names_conflict_within_a_network_only(db: &TestDb) {
    let store = db.open().await;
    network(&store, "prod", "100.64.0.0/24").await;
    network(&store, "dev", "100.64.1.0/24").await;
    token(&store, "prod", "p", None, None).await;
    token(&store, "dev", "d", None, None).await;
    join_ok(&store, "p", 1, Some("web")).await;
    let e = join(
        &store,
        1001,
        &agent(),
        &join_hello("p", 2, Some("web")),
        "p",
        "s",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Conflict(m) if m.contains("web") && m.contains("already used")),
        "{e}"
    );
    let e = join(
        &store,
        1001,
        &agent(),
        &join_hello("p", 1, Some("other")),
        "p",
        "s",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Conflict(m) if m.contains("public key")),
        "{e}"
    );
    let e = join(
        &store,
        1001,
        &agent(),
        &join_hello("p", 3, Some("Bad_Name")),
        "p",
        "s",
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ApiError::Invalid(_)));
    let dev = join_ok(&store, "d", 4, Some("web")).await;
    assert_eq!(dev.node.address.to_string(), "100.64.1.1");
    assert!(matches!(
        find_node(&store, &ADMIN, "web", None).await,
        Err(ApiError::Conflict(_))
    ));
    assert_eq!(
        find_node(&store, &ADMIN, "web", Some("dev"))
            .await
            .unwrap()
            .id,
        dev.node.id
    );
    assert!(matches!(
        find_node(&store, &ADMIN, "ghost", None).await,
        Err(ApiError::NotFound(_))
    ));
    assert!(matches!(
        find_node(&store, &ADMIN, "1", Some("dev")).await,
        Err(ApiError::NotFound(_))
    ));
    // Refused joins used no token uses and no addresses.
    let tokens = list_tokens(&store, &ADMIN).await.unwrap();
    assert_eq!(
        tokens.iter().map(|t| t.used).collect::<Vec<_>>(),
        vec![1, 1]
    );
}

async fn versions_only_grow_even_across_reopening(db: &TestDb) {
    let mut seen = Vec::new();
    let a_id;
    {
        let store = db.open().await;
        network(&store, "prod", "100.64.0.0/24").await;
        token(&store, "prod", "tok", None, None).await;
        let a = join_ok(&store, "tok", 1, Some("a")).await;
        a_id = a.node.id;
        seen.push(a.version);
        seen.push(join_ok(&store, "tok", 2, Some("b")).await.version);
        let node = Caller::Node {
            id: a_id,
            remote: "198.18.9.9".parse().unwrap(),
        };
        let ep = [
            "198.18.0.1:51820".parse().unwrap(),
            "10.0.0.1:51820".parse().unwrap(),
        ];
        let changed = update_endpoints(&store, &node, &ep).await.unwrap();
        seen.push(changed.version.unwrap());
        assert_eq!(
            update_endpoints(&store, &node, &ep).await.unwrap().version,
            None,
            "no change, no bump"
        );
        seen.push(
            revoke_node(&store, &ADMIN, "b", None)
                .await
                .unwrap()
                .version
                .unwrap(),
        );
        store.close().await;
    }
    let store = db.open().await;
    let net = &list_networks(&store, &ADMIN).await.unwrap()[0];
    assert_eq!(net.version, *seen.last().unwrap());
    seen.push(
        delete_node(&store, &ADMIN, "a", None)
            .await
            .unwrap()
            .version
            .unwrap(),
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(
        list_networks(&store, &ADMIN).await.unwrap()[0].version,
        *seen.last().unwrap()
    );
}

async fn network_rules(db: &TestDb) {
    let store = db.open().await;
    network(&store, "prod", "100.64.0.0/16").await;
    let mk = |name: &str, cidr: &str| CreateNetwork {
        name: name.into(),
        cidr: cidr.into(),
        cidr6: None,
    };
    let e = create_network(&store, 0, &ADMIN, mk("prod", "10.0.0.0/24"))
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Conflict(_)));
    let e = create_network(&store, 0, &ADMIN, mk("other", "100.64.3.0/24"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::Conflict(m) if m.contains("overlaps")),
        "{e}"
    );
    let e = create_network(&store, 0, &ADMIN, mk("wide", "100.64.0.0/10"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ApiError::Conflict(_)),
        "a wider prefix overlaps too"
    );
    let e = create_network(&store, 0, &ADMIN, mk("Bad", "10.0.0.0/24"))
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Invalid(_)));
    let e = create_network(&store, 0, &agent(), mk("x", "10.0.0.0/24"))
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Forbidden(_)));
    create_network(&store, 0, &ADMIN, mk("lab", "10.9.0.0/30"))
        .await
        .unwrap();
    token(&store, "lab", "lab", None, None).await;
    join_ok(&store, "lab", 1, None).await;
    join_ok(&store, "lab", 2, None).await;
    let e = join(
        &store,
        1001,
        &agent(),
        &join_hello("lab", 3, None),
        "lab",
        "s",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("no free address")),
        "{e}"
    );
}

async fn the_store_trait_is_object_safe(db: &TestDb) {
    let store: Arc<dyn Store> = Arc::new(db.open().await);
    network(store.as_ref(), "prod", "100.64.0.0/24").await;
    assert_eq!(store.networks().await.unwrap().len(), 1);
}

/// A network with an IPv6 prefix: every node and workload has the /48 with its IPv4 address
/// in the low 32 bits, in the store's records, the map and the welcome; a bad prefix is
/// refused naming `cidr6`, and two networks cannot share one.
async fn ipv6_addresses_go_with_the_ipv4_ones(db: &TestDb) {
    use meshlink_coordinator::handlers::nodes::welcome;
    use meshlink_coordinator::handlers::workloads::{create_workload, info, CreateWorkload};
    let store = db.open().await;
    let mk = |name: &str, cidr: &str, cidr6: Option<&str>| CreateNetwork {
        name: name.into(),
        cidr: cidr.into(),
        cidr6: cidr6.map(Into::into),
    };
    for (bad, why) in [
        ("fd7a:115c:a1e0::/64", "not a /48"),
        ("2001:db8:7::/48", "unique local"),
        ("not-a-prefix", "not an IPv6 prefix"),
    ] {
        let e = create_network(&store, 0, &ADMIN, mk("v6", "100.64.0.0/16", Some(bad)))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid(m) if m.starts_with("cidr6: ") && m.contains(why)),
            "{bad}: {e}"
        );
    }
    assert!(
        store.networks().await.unwrap().is_empty(),
        "nothing was created"
    );
    let net = create_network(
        &store,
        0,
        &ADMIN,
        mk("v6", "100.64.0.0/16", Some("fd7a:115c:a1e0::/48")),
    )
    .await
    .unwrap();
    assert_eq!(net.cidr6, Some("fd7a:115c:a1e0::/48".parse().unwrap()));
    let e = create_network(
        &store,
        0,
        &ADMIN,
        mk("other", "10.1.0.0/16", Some("fd7a:115c:a1e0::/48")),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Conflict(m) if m.contains("cidr6")),
        "{e}"
    );
    network(&store, "v4", "10.2.0.0/16").await;

    token(&store, "v6", "tok", None, Some(5)).await;
    let a = join_ok(&store, "tok", 1, Some("a")).await;
    assert_eq!(a.node.address.to_string(), "100.64.0.1");
    assert_eq!(
        a.node.address6,
        Some("fd7a:115c:a1e0::6440:1".parse().unwrap())
    );
    let w = welcome(&a.node, &a.network, None, vec![]);
    assert_eq!(
        w.addresses,
        vec![
            "100.64.0.1/16".parse().unwrap(),
            "fd7a:115c:a1e0::6440:1/48".parse().unwrap()
        ]
    );
    assert_eq!(
        w.network_cidr6,
        Some("fd7a:115c:a1e0::/48".parse().unwrap())
    );
    let (wl, _) = create_workload(
        &store,
        1002,
        &ADMIN,
        CreateWorkload {
            name: "web".into(),
            network: "v6".into(),
            address: Some("100.64.50.10".parse().unwrap()),
            standby: vec![],
            allowed: vec!["a".into()],
            tags: vec![],
        },
    )
    .await
    .unwrap();
    assert_eq!(
        info(&wl).address6,
        Some("fd7a:115c:a1e0::6440:320a/128".parse().unwrap())
    );
    // Read back: the same, from the store.
    let nodes = store.nodes(Some("v6")).await.unwrap();
    let workloads = store.workloads(Some("v6")).await.unwrap();
    assert_eq!(workloads[0].address6, wl.address6);
    let map = netmap(1, &nodes, &workloads, None);
    assert_eq!(
        map.peers[&a.node.id].addresses,
        vec![
            "100.64.0.1/32".parse().unwrap(),
            "fd7a:115c:a1e0::6440:1/128".parse().unwrap()
        ]
    );
    assert_eq!(map.workloads["web"].address6, info(&wl).address6);
    // An IPv4-only network's nodes have none.
    token(&store, "v4", "tok4", None, Some(1)).await;
    let b = join_ok(&store, "tok4", 2, Some("b")).await;
    assert_eq!(b.node.address6, None);
    assert_eq!(
        welcome(&b.node, &b.network, None, vec![]).addresses.len(),
        1
    );
}

/// External nodes: registered through a gateway (the rules of `via`, names and keys), in the
/// map with `via`, never a session, never due for rotation or expiry, never a workload's
/// holder or candidate; their configuration refused once the gateway is revoked.
async fn external_nodes_follow_their_rules(db: &TestDb) {
    use meshlink_coordinator::handlers::external::{add, show, NewExternal};
    use meshlink_coordinator::handlers::nodes::{expires_at, rotation_due};
    use meshlink_coordinator::handlers::workloads::{create_workload, plan_move, CreateWorkload};
    let store = db.open().await;
    network(&store, "prod", "100.64.0.0/24").await;
    token(&store, "prod", "tok", None, Some(5)).await;
    let gw = join_ok(&store, "tok", 1, Some("gw")).await;
    let req = |name: &str, key: u8, via: &str| NewExternal {
        network: "prod".into(),
        name: name.into(),
        public_key: crate::common::key(key),
        via: via.into(),
        tags: vec!["phone".into()],
    };
    let invalid = |e: ApiError, field: &str| {
        assert!(
            matches!(&e, ApiError::Invalid(m) | ApiError::NotFound(m) | ApiError::Conflict(m)
                if m.starts_with(&format!("{field}: "))),
            "{field}: {e}"
        );
    };
    invalid(
        add(&store, &ADMIN, 1002, req("phone", 9, "nope"))
            .await
            .unwrap_err(),
        "via",
    );
    invalid(
        add(&store, &ADMIN, 1002, req("gw", 9, "gw"))
            .await
            .unwrap_err(),
        "name",
    );
    invalid(
        add(&store, &ADMIN, 1002, req("phone", 1, "gw"))
            .await
            .unwrap_err(),
        "public_key",
    );
    let mut small = req("phone", 9, "gw");
    small.public_key = meshlink_proto::PublicKey([0; 32]);
    invalid(
        add(&store, &ADMIN, 1002, small).await.unwrap_err(),
        "public_key",
    );
    assert!(matches!(
        add(&store, &agent(), 1002, req("phone", 9, "gw")).await,
        Err(ApiError::Forbidden(_))
    ));
    let phone = add(&store, &ADMIN, 1002, req("phone", 9, "gw"))
        .await
        .unwrap();
    assert_eq!(phone.node.via, Some(gw.node.id));
    assert_eq!(phone.node.address.to_string(), "100.64.0.2");
    invalid(
        add(&store, &ADMIN, 1002, req("tablet", 10, "phone"))
            .await
            .unwrap_err(),
        "via",
    );
    let nodes = store.nodes(Some("prod")).await.unwrap();
    let map = netmap(3, &nodes, &[], None);
    assert_eq!(map.peers[&phone.node.id].via, Some(gw.node.id));
    assert!(map.peers[&phone.node.id].endpoints.is_empty());
    // No session: a hello as it is refused whatever the secret; no schedule, no expiry.
    let e = authenticate(
        &store,
        1003,
        &agent(),
        &node_hello(phone.node.id, "", 9),
        phone.node.id,
        "",
        HelloEndpoints::Record,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Unauthorized(m) if m.contains("external")),
        "{e}"
    );
    assert!(!rotation_due(
        &phone.node,
        std::time::Duration::from_secs(1),
        i64::MAX / 2
    ));
    assert_eq!(
        expires_at(&phone.node, Some(std::time::Duration::from_secs(1)), false),
        None
    );
    // Never a workload's holder or candidate.
    let mk = |allowed: &str| CreateWorkload {
        name: "web".into(),
        network: "prod".into(),
        address: None,
        standby: vec![],
        allowed: vec![allowed.into()],
        tags: vec![],
    };
    let e = create_workload(&store, 1004, &ADMIN, mk("phone"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::Invalid(m) if m.contains("external")),
        "{e}"
    );
    create_workload(&store, 1004, &ADMIN, mk("gw"))
        .await
        .unwrap();
    let e = plan_move(&store, &ADMIN, "prod", "web", Some("phone"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::Invalid(m) if m.contains("external")),
        "{e}"
    );
    // Its configuration, until the gateway is revoked.
    let shown = show(&store, &ADMIN, "phone", None).await.unwrap();
    assert_eq!(shown.gateway.id, gw.node.id);
    revoke_node(&store, &ADMIN, "gw", None).await.unwrap();
    let e = show(&store, &ADMIN, "phone", None).await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("revoked")),
        "{e}"
    );
}

/// Fencing across a workload's deletion: a move planned on a workload that is then deleted and
/// created again under its name (and attached, so at the generation the plan expects) commits
/// nothing on the new workload. It would give the new workload a second holder that waits for
/// nobody: the new workload's own holder is not the planned move's old holder.
async fn a_move_planned_before_a_recreation_commits_nothing(db: &TestDb) {
    use meshlink_coordinator::handlers::workloads::{
        commit_holder, create_workload, delete_workload, plan_move, CreateWorkload,
    };
    let store = db.open().await;
    network(&store, "prod", "100.64.0.0/24").await;
    token(&store, "prod", "tok", None, Some(3)).await;
    for (key, name) in [(1, "n1"), (2, "n2"), (3, "n3")] {
        join_ok(&store, "tok", key, Some(name)).await;
    }
    let req = |address| CreateWorkload {
        name: "web".into(),
        network: "prod".into(),
        address,
        standby: vec![],
        allowed: vec!["n1".into(), "n2".into(), "n3".into()],
        tags: vec![],
    };
    let (old, _) = create_workload(&store, 1002, &ADMIN, req(None))
        .await
        .unwrap();
    let to_n1 = plan_move(&store, &ADMIN, "prod", "web", Some("n1"))
        .await
        .unwrap();
    commit_holder(&store, 1003, &to_n1).await.unwrap();
    // A move to n2 decided now, at generation 1 of the first workload...
    let stale = plan_move(&store, &ADMIN, "prod", "web", Some("n2"))
        .await
        .unwrap();
    assert_eq!(stale.workload.generation, 1);
    // ... commits after the workload was deleted, created again at its address and attached
    // to n3: generation 1 again, of another workload.
    delete_workload(&store, &ADMIN, "prod", "web")
        .await
        .unwrap();
    let (new, _) = create_workload(&store, 1004, &ADMIN, req(Some(old.address)))
        .await
        .unwrap();
    assert_ne!(new.id, old.id);
    let to_n3 = plan_move(&store, &ADMIN, "prod", "web", Some("n3"))
        .await
        .unwrap();
    let (held, _) = commit_holder(&store, 1005, &to_n3).await.unwrap();
    assert_eq!((held.id, held.generation), (new.id, 1));
    let e = commit_holder(&store, 1006, &stale).await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Conflict(m) if m.contains("created again")),
        "{e}"
    );
    let now = store.workload("prod", "web").await.unwrap().unwrap();
    assert_eq!(
        (now.id, now.generation, now.holder),
        (new.id, 1, Some(to_n3.to.as_ref().unwrap().id)),
        "{now:?}"
    );
}

crate::on_both_stores!(
    a_move_planned_before_a_recreation_commits_nothing,
    external_nodes_follow_their_rules,
    ipv6_addresses_go_with_the_ipv4_ones,
    join_allocates_lowest_addresses_and_counts_uses,
    expired_and_revoked_tokens_are_refused,
    default_tokens_allow_one_join_within_an_hour,
    addresses_are_stable_across_authentication_and_reopening,
    deleted_addresses_are_reused_but_ids_are_not,
    revoked_nodes_are_refused_and_leave_the_map,
    names_conflict_within_a_network_only,
    versions_only_grow_even_across_reopening,
    network_rules,
    the_store_trait_is_object_safe,
);
