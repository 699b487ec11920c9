//! Several coordinators: the admin client against real TCP listeners on 127.0.0.1 (a closed
//! port, coordinators that answer, and ones that take a request and never answer it).

mod support;

use std::time::Duration;

use meshctl::admin_token::AdminToken;
use meshctl::client::{AdminClient, ClientError, CoordinatorUrls};
use meshlink_api::CreateNetwork;
use support::{closed_url, meshctl, stderr, stdout, Canned, FakeCoordinator, Mute, Silence};

fn client(urls: &[&str]) -> AdminClient {
    AdminClient::new(urls.join(",").parse().unwrap(), token())
}

fn token() -> AdminToken {
    AdminToken::new("admin-secret", "test").unwrap()
}

fn network() -> CreateNetwork {
    CreateNetwork {
        name: "prod".parse().unwrap(),
        cidr: "100.64.0.0/16".into(),
        cidr6: None,
    }
}

/// What a coordinator answers `POST /v1/networks` and `GET /v1/networks`.
const CREATED: &str = r#"{"name":"prod","cidr":"100.64.0.0/16","version":0,"nodes":0,
    "online":0,"created_at":1714564800}"#;
const NETWORKS: &str = r#"[{"name":"prod","cidr":"100.64.0.0/16","version":0,"nodes":0,
    "online":0,"created_at":1714564800}]"#;

#[test]
fn a_read_goes_to_the_next_coordinator_when_one_is_down() {
    let up = FakeCoordinator::start(vec![Canned::new(200, NETWORKS)]);
    let reply = client(&[&closed_url(), &up.url()]).networks().unwrap();
    assert_eq!(reply.value[0].name, "prod");
    assert_eq!(up.request().target, "/v1/networks");
}

#[test]
fn a_write_goes_to_the_next_coordinator_when_it_never_left() {
    let up = FakeCoordinator::start(vec![Canned::new(201, CREATED)]);
    client(&[&closed_url(), &up.url()])
        .create_network(&network())
        .unwrap();
    let request = up.request();
    assert_eq!(
        (request.method.as_str(), request.target.as_str()),
        ("POST", "/v1/networks")
    );
}

#[test]
fn a_write_that_may_have_arrived_is_not_sent_again() {
    let mute = Mute::start(Silence::HangUp);
    let up = FakeCoordinator::start(vec![Canned::new(201, CREATED)]);
    let err = client(&[&mute.url(), &up.url()])
        .create_network(&network())
        .unwrap_err();
    assert!(matches!(err, ClientError::Unanswered { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "no answer from the coordinator at {} (",
            mute.url()
        )),
        "{message}"
    );
    assert!(message.contains("unknown"), "{message}");
    assert_eq!(err.status(), None);
    assert_eq!(mute.request_line(), "POST /v1/networks HTTP/1.1");
    assert!(up.received_nothing(), "the write was sent twice");

    // The same for a delete, and for a request that stalls until the client gives up.
    let mute = Mute::start(Silence::Stall);
    let up = FakeCoordinator::start(vec![Canned::new(204, "")]);
    let impatient = AdminClient::with_timeouts(
        format!("{},{}", mute.url(), up.url()).parse().unwrap(),
        token(),
        Duration::from_secs(5),
        Duration::from_millis(300),
    );
    let err = impatient.delete_node("vm-b", None).unwrap_err();
    assert!(matches!(err, ClientError::Unanswered { .. }), "{err:?}");
    assert!(err.to_string().contains("timeout"), "{err}");
    assert_eq!(mute.request_line(), "DELETE /v1/nodes/vm-b HTTP/1.1");
    assert!(up.received_nothing(), "the write was sent twice");
}

#[test]
fn a_read_that_got_no_answer_is_asked_again_elsewhere() {
    let hangup = Mute::start(Silence::HangUp);
    let stall = Mute::start(Silence::Stall);
    let up = FakeCoordinator::start(vec![Canned::new(200, NETWORKS)]);
    let impatient = AdminClient::with_timeouts(
        [hangup.url(), stall.url(), up.url()]
            .join(",")
            .parse()
            .unwrap(),
        token(),
        Duration::from_secs(5),
        Duration::from_millis(300),
    );
    let reply = impatient.networks().unwrap();
    assert_eq!(reply.value.len(), 1);
    assert_eq!(hangup.request_line(), "GET /v1/networks HTTP/1.1");
    assert_eq!(stall.request_line(), "GET /v1/networks HTTP/1.1");
    assert_eq!(up.request().target, "/v1/networks");
}

#[test]
fn an_error_answer_is_the_answer() {
    for status in [400, 404, 409, 500] {
        let first = FakeCoordinator::start(vec![Canned::new(status, r#"{"error":"no"}"#)]);
        let second = FakeCoordinator::start(vec![Canned::new(200, "{}")]);
        let err = client(&[&first.url(), &second.url()])
            .delete_node("ghost", None)
            .unwrap_err();
        assert_eq!(err.status(), Some(status), "{err:?}");
        first.request();
        assert!(
            second.received_nothing(),
            "{status} was not taken as an answer"
        );
        let first = FakeCoordinator::start(vec![Canned::new(status, r#"{"error":"no"}"#)]);
        let second = FakeCoordinator::start(vec![Canned::new(200, "{}")]);
        let err = client(&[&first.url(), &second.url()])
            .node("ghost", None)
            .unwrap_err();
        assert_eq!(err.status(), Some(status), "{err:?}");
        assert!(
            second.received_nothing(),
            "{status} was not taken as an answer"
        );
    }
}

#[test]
fn when_none_answers_every_coordinator_is_named() {
    let (a, b) = (closed_url(), closed_url());
    let err = client(&[&a, &b]).create_network(&network()).unwrap_err();
    let ClientError::Unavailable { attempts } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(attempts.len(), 2);
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "no coordinator answered: cannot reach the coordinator at {a}: "
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!("; cannot reach the coordinator at {b}: ")),
        "{message}"
    );
    assert_eq!(err.status(), None);
}

#[test]
fn urls_are_listed_once_in_order() {
    let urls: CoordinatorUrls = "http://a:1, b:2/,http://a:1".parse().unwrap();
    assert_eq!(urls.to_string(), "http://a:1,http://b:2");
    assert_eq!(urls.first().to_string(), "http://a:1");
    assert!("http://a:1,,http://b:2".parse::<CoordinatorUrls>().is_err());
    assert!("".parse::<CoordinatorUrls>().is_err());
    assert!("http://a:1,https://b:2".parse::<CoordinatorUrls>().is_err());
}

#[test]
fn the_cli_takes_several_coordinators_from_the_variable_and_the_flag() {
    let up = FakeCoordinator::start(vec![Canned::new(200, NETWORKS)]);
    let output = meshctl(
        &format!("{},{}", closed_url(), up.url()),
        &["network", "list"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("prod"));
    up.request();

    let up = FakeCoordinator::start(vec![Canned::new(200, NETWORKS)]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env_clear()
        .env("MESHLINK_ADMIN_TOKEN", "cli-secret")
        .args(["--coordinator", &closed_url(), "--coordinator", &up.url()])
        .args(["network", "list"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    up.request();

    let (a, b) = (closed_url(), closed_url());
    let output = meshctl(&format!("{a},{b}"), &["network", "list"]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(message.contains(&a) && message.contains(&b), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
}
