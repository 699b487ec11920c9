//! The coordinator's topology page in a real browser: headless Chromium, driven through
//! ChromeDriver (`meshlink_tests::browser`), loads the page from the coordinator's admin
//! listener, refuses a wrong token in the page's form (and says why), logs in with a read-only
//! admin token, shows the nodes of two providers, and follows a workload move made through
//! the admin API.
//!
//! Topology (`meshlink_tests::Providers`, two providers): the coordinator, vm-a1 and vm-a2 on
//! A (label `provider=aws`), vm-b1 on B (`provider=gcp`). The workload `chat` (100.64.50.10)
//! is attached to vm-a1 and moved to vm-b1 while the page is open. ChromeDriver and Chromium
//! run in the coordinator's namespace, whose loopback the admin API listens on.
//!
//! Screenshots (before, during and after the move) are written to
//! `target/test-artefacts/topology_page/` (or `$MESHLINK_TEST_ARTEFACTS/topology_page/`), and
//! their paths printed.
//!
//! Needs root (skips with one line otherwise) and Debian's `chromium` and `chromium-driver`
//! (skips without them, but fails under CI), and the binaries: `cargo build -p meshlink-agent
//! -p meshlink-coordinator -p meshctl` first.

use std::time::{Duration, Instant};

use meshlink_tests::browser::{artefacts_dir, require_browser, Browser};
use meshlink_tests::coordinator::ADMIN_PORT;
use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, Coordinator, MeshAgent, Provider,
    Providers, ScratchDir,
};
use serde_json::Value;

const NETWORK: &str = "prod";
/// How long the page may take to show what the coordinator knows.
const FOLLOW: Duration = Duration::from_secs(5);

/// Every node the page draws: `[{name, provider, online}]`, provider from the group it is
/// drawn in.
const NODES_SHOWN: &str = r#"
    const nodes = [...document.querySelectorAll('g.provider g.node')];
    if (nodes.length === 0) return null;
    return nodes.map((n) => ({
        name: n.dataset.node,
        provider: n.closest('g.provider').dataset.provider,
        online: n.dataset.online === 'true',
    }));
"#;

/// Where the workload `chat` is drawn: the node whose card holds its pill (by geometry, not
/// only by attribute), whether it is still gliding, and how many moves the page animated.
const CHAT_SHOWN: &str = r#"
    const pill = document.querySelector('g.workload[data-workload="chat"]');
    if (!pill) return null;
    const p = pill.getBoundingClientRect();
    const inside = [...document.querySelectorAll('g.node')].filter((n) => {
        const c = n.querySelector('rect.card').getBoundingClientRect();
        return p.left >= c.left && p.right <= c.right && p.top >= c.top && p.bottom <= c.bottom;
    }).map((n) => n.dataset.node);
    return {
        holder: pill.dataset.holder,
        inside,
        moving: pill.dataset.moving === 'true',
        animated: Number(document.body.dataset.movesAnimated || 0),
    };
"#;

struct Bed {
    // Field order is drop order: the browser and processes before the namespaces they run
    // in, and the scratch directory last.
    browser: Browser,
    agents: Vec<MeshAgent>,
    coord: Coordinator,
    _hosts: Vec<meshlink_tests::ProviderHost>,
    _providers: Providers,
    _dir: ScratchDir,
}

fn shot(bed: &Bed, name: &str) {
    let path = artefacts_dir("topology_page").join(name);
    bed.browser.screenshot(&path);
    eprintln!("topology_page: screenshot {}", path.display());
}

fn chat_shown(browser: &Browser) -> Value {
    browser.execute(CHAT_SHOWN, &[])
}

#[test]
fn the_page_shows_the_mesh_and_follows_a_move() {
    if !require_root() || !require_browser() {
        return;
    }
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    let dir = ScratchDir::create("topology-page");
    let mut providers = Providers::create(2);
    let coord_host = providers.add_host(Provider::A);
    let hosts = [
        (providers.add_host(Provider::A), "vm-a1", "aws"),
        (providers.add_host(Provider::A), "vm-a2", "aws"),
        (providers.add_host(Provider::B), "vm-b1", "gcp"),
    ];
    let coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
    let ctl = coord.meshctl();
    ctl.network_create(NETWORK, "100.64.0.0/16");
    let token = ctl.token_create(NETWORK, Some(3), Some("1h"));
    let mut agents: Vec<MeshAgent> = hosts
        .iter()
        .map(|(h, name, provider)| {
            MeshAgent::spawn_join(&h.ns, &dir, &token, name, &[("provider", provider)])
        })
        .collect();
    for a in &mut agents {
        a.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    }
    ctl.run(&[
        "workload",
        "create",
        "chat",
        "--network",
        NETWORK,
        "--address",
        "100.64.50.10",
        "--allow",
        "vm-a1,vm-b1",
    ]);
    ctl.run(&["workload", "attach", "chat", "--node", "vm-a1"]);
    // A read-only token: watching needs no more.
    let made = ctl.json(&["admin-token", "create", "--name", "wall", "--role", "read"]);
    let read_token = made["token"]
        .as_str()
        .unwrap_or_else(|| panic!("admin-token create printed no `.token`: {made}"))
        .to_owned();

    let browser = Browser::start(coord.ns(), &dir, 1280, 800);
    let mut kept: Vec<meshlink_tests::ProviderHost> =
        hosts.into_iter().map(|(h, _, _)| h).collect();
    kept.push(coord_host);
    let mut bed = Bed {
        browser,
        agents,
        coord,
        _hosts: kept,
        _providers: providers,
        _dir: dir,
    };
    let browser = &bed.browser;

    let url = format!("http://127.0.0.1:{ADMIN_PORT}/topology");
    browser.goto(&url);
    assert!(
        browser.find("form#login").is_some(),
        "the page asks for a token first"
    );
    assert!(
        browser.find("g.node").is_none(),
        "and shows nothing without one"
    );
    // A wrong token: the form says why and stays.
    browser.type_into("#token", "mla1_not-a-token");
    browser.click("#connect");
    let refused = browser.wait_for(
        FOLLOW,
        "const e = document.getElementById('login-error').textContent; return e || null;",
    );
    assert!(
        refused
            .as_ref()
            .is_ok_and(|e| e.as_str().is_some_and(|e| e.contains("wrong admin token"))),
        "no refusal shown for a wrong token: {refused:?}"
    );
    browser.type_into("#token", &read_token);
    browser.click("#connect");

    // The nodes, grouped under their provider, online.
    let shown = browser
        .wait_for(FOLLOW, NODES_SHOWN)
        .unwrap_or_else(|last| panic!("no nodes shown within {FOLLOW:?}: {last}"));
    let mut nodes: Vec<(String, String, bool)> = shown
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_owned(),
                n["provider"].as_str().unwrap_or_default().to_owned(),
                n["online"] == true,
            )
        })
        .collect();
    nodes.sort();
    let want = |name: &str, provider: &str| (name.to_owned(), provider.to_owned(), true);
    let want = vec![
        want("vm-a1", "aws"),
        want("vm-a2", "aws"),
        want("vm-b1", "gcp"),
    ];
    if nodes != want {
        // Sessions may still be settling: give the page its few seconds to show them online.
        let online = browser.wait_for(
            FOLLOW,
            &format!(
                "const n = (() => {{ {NODES_SHOWN} }})(); \
                 return n && n.length === 3 && n.every((x) => x.online) ? n : null;"
            ),
        );
        assert!(online.is_ok(), "nodes shown: {nodes:?}, wanted {want:?}");
    }
    let heading = browser.execute(
        "return document.querySelector('section.network h2').textContent;",
        &[],
    );
    assert!(
        heading
            .as_str()
            .is_some_and(|h| h.starts_with(NETWORK) && h.contains("3/3 online")),
        "network heading: {heading}"
    );
    // The token is kept in the tab's session storage, never in the address.
    let where_kept = browser.execute(
        "return [location.href, sessionStorage.getItem('meshlink.topology.token')];",
        &[],
    );
    assert_eq!(where_kept[0].as_str(), Some(url.as_str()));
    assert_eq!(where_kept[1].as_str(), Some(read_token.as_str()));

    // The workload on vm-a1's card.
    let on_a1 = browser.wait_for(
        FOLLOW,
        &format!(
            "const c = (() => {{ {CHAT_SHOWN} }})(); \
             return c && c.holder === 'vm-a1' && c.inside.join() === 'vm-a1' ? c : null;"
        ),
    );
    assert!(
        on_a1.is_ok(),
        "chat not shown on vm-a1: {}",
        chat_shown(browser)
    );
    // Paths, once the agents have reported them (their traversal decides when): drawn between
    // nodes the page shows. Not required: the picture is complete without them.
    let links = browser.wait_for(
        FOLLOW,
        "const l = [...document.querySelectorAll('path.link')]; \
         return l.length ? l.map((x) => [x.dataset.between, x.dataset.kind]) : null;",
    );
    match &links {
        Ok(l) => eprintln!("topology_page: paths drawn: {l}"),
        Err(_) => eprintln!("topology_page: no path reported within {FOLLOW:?}"),
    }
    shot(&bed, "1-before-move.png");

    // The move, through the admin API; the page follows it.
    let started = Instant::now();
    bed.coord
        .meshctl()
        .run(&["workload", "move", "chat", "--to", "vm-b1"]);
    let mut seen_moving = false;
    let mut moving_shot = false;
    let deadline = started + FOLLOW;
    let last = loop {
        let c = chat_shown(browser);
        if c["moving"] == true {
            seen_moving = true;
            if !moving_shot {
                // Some way along its glide, not at its start.
                std::thread::sleep(Duration::from_millis(400));
                shot(&bed, "2-moving.png");
                moving_shot = true;
            }
        }
        let arrived = c["holder"] == "vm-b1"
            && c["inside"] == serde_json::json!(["vm-b1"])
            && c["moving"] == false;
        if arrived || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(30));
    };
    assert!(
        last["holder"] == "vm-b1" && last["inside"] == serde_json::json!(["vm-b1"]),
        "the page did not follow the move within {FOLLOW:?}: {last}"
    );
    eprintln!(
        "topology_page: move shown on the page {:.2?} after it was asked",
        started.elapsed()
    );
    assert_eq!(last["animated"], 1, "one move animated: {last}");
    assert!(seen_moving, "the address was never seen gliding: {last}");
    shot(&bed, "3-after-move.png");

    // vm-a2's agent stops: the page shows it offline, the others still online.
    bed.agents
        .iter_mut()
        .find(|a| a.name() == "vm-a2")
        .expect("vm-a2")
        .terminate();
    let browser = &bed.browser;
    let offline = browser.wait_for(
        FOLLOW,
        &format!(
            "const n = (() => {{ {NODES_SHOWN} }})() || []; \
             const off = n.filter((x) => !x.online).map((x) => x.name); \
             return off.join() === 'vm-a2' && n.length === 3 ? n : null;"
        ),
    );
    assert!(
        offline.is_ok(),
        "vm-a2 not shown offline alone within {FOLLOW:?}: {}",
        browser.execute(NODES_SHOWN, &[])
    );
    shot(&bed, "4-vm-a2-offline.png");

    // Nothing went wrong in the page: no script error, no load refused by its content
    // security policy. The one refusal expected is the wrong token's 401.
    let console = browser.console_log();
    eprintln!("topology_page: console: {console:?}");
    let errors: Vec<Value> = console
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .filter(|e| !e["message"].as_str().is_some_and(|m| m.contains("401")))
        .collect();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");

    // The holder the page shows is the coordinator's.
    let held = bed.coord.meshctl().json(&["workload", "show", "chat"]);
    assert_eq!(
        held.pointer("/holder/name").and_then(Value::as_str),
        Some("vm-b1")
    );
}
