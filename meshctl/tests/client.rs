//! The admin client where the real coordinator cannot go (`tests/admin.rs` covers everything
//! it answers): a success answer that is not what the route answers, and nobody listening.

mod support;

use meshctl::admin_token::AdminToken;
use meshctl::client::{AdminClient, ClientError};
use support::{closed_url, Canned, FakeCoordinator};

fn client(url: &str) -> AdminClient {
    AdminClient::new(
        url.parse().unwrap(),
        AdminToken::new("admin-secret", "test").unwrap(),
    )
}

#[test]
fn unexpected_success_body_is_a_bad_response() {
    let fake = FakeCoordinator::start(vec![
        Canned::new(200, r#"{"not":"a list"}"#),
        Canned::new(200, r#"[{"name":"prod","cidr":"not a prefix"}]"#),
        Canned::new(200, "<html>"),
    ]);
    let client = client(&fake.url());
    for _ in 0..2 {
        let err = client.networks().unwrap_err();
        assert!(
            matches!(err, ClientError::BadResponse { status: 200, .. }),
            "{err:?}"
        );
        assert!(
            std::error::Error::source(&err).is_some(),
            "the cause is kept"
        );
    }
    let err = client.networks().unwrap_err();
    assert!(
        matches!(err, ClientError::NotJson { status: 200, .. }),
        "{err:?}"
    );
    assert_eq!(
        fake.request().header("authorization"),
        Some("Bearer admin-secret")
    );
}

#[test]
fn connection_refused_names_the_coordinator() {
    let url = closed_url();
    let err = client(&url).status().unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("cannot reach the coordinator at {url}: ")),
        "{message}"
    );
    assert!(message.to_lowercase().contains("refused"), "{message}");
    assert_eq!(err.status(), None);
}
