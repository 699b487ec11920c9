//! `GET /v1/relays`: the relays this coordinator's agents relay through: its own embedded relay
//! (on or off, where agents reach it, over what), the standalone relays of its `[[relays]]`
//! configuration and, in a mesh of several, the coordinators, which its grants vouch for. The read role suffices (the default of a `GET`
//! in `auth::required_role`).
//!
//! Read from the configuration the coordinator started with: no store access, no I/O.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use meshlink_api::{self as api, RelayTransport};
use meshlink_proto::relay::MAX_LISTED_RELAYS;

use super::{AdminContext, AppState};

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/relays", get(list))
}

async fn list(State(s): State<AppState>) -> Json<api::Relays> {
    Json(relays_view(&s.ctx))
}

/// The answer, from the admin context.
fn relays_view(ctx: &AdminContext) -> api::Relays {
    let on = ctx.relay.is_some();
    let transports = if !on {
        Vec::new()
    } else if ctx.tcp_listen.is_some() {
        vec![RelayTransport::Udp, RelayTransport::Tcp]
    } else {
        vec![RelayTransport::Udp]
    };
    api::Relays {
        embedded: api::EmbeddedRelay {
            on,
            addr: ctx.advertise.clone(),
            transports,
        },
        standalone: ctx.relays.iter().map(|r| listed(r, on)).collect(),
        // After the standalone relays (there are none when coordinators are listed), and
        // granted only up to the grants' limit.
        coordinators: ctx
            .coordinator_relays
            .iter()
            .enumerate()
            .map(|(i, r)| listed(r, on && ctx.relays.len() + i < MAX_LISTED_RELAYS))
            .collect(),
    }
}

/// A relay of the grants, as listed: every relay agents are told of serves both transports
/// on one port.
fn listed(r: &meshlink_proto::relay::RelayInfo, on: bool) -> api::StandaloneRelay {
    let label = |text: &str| (!text.is_empty()).then(|| text.to_string());
    api::StandaloneRelay {
        name: r.name.clone(),
        addr: r.addr.clone(),
        transports: vec![RelayTransport::Udp, RelayTransport::Tcp],
        fingerprint: r.fingerprint.clone(),
        region: label(&r.region),
        provider: label(&r.provider),
        // Grants ride the embedded relay's channel (`run.rs`): without it, none.
        granted: on,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use meshlink_proto::relay::RelayInfo;

    use super::*;
    use crate::relay::Relay;

    fn context(relay: bool, tcp: bool) -> AdminContext {
        AdminContext {
            admin_token: "secret".into(),
            quic_listen: "127.0.0.1:7443".parse().unwrap(),
            advertise: "coord.example:7443".into(),
            others: Vec::new(),
            fingerprint: "ab".repeat(32),
            started: Instant::now(),
            relay: relay.then(|| Arc::new(Relay::new(1_000_000))),
            reflect: None,
            connections: None,
            tcp_listen: tcp.then(|| "127.0.0.1:7443".parse().unwrap()),
            relays: vec![
                RelayInfo {
                    name: "eu-1".into(),
                    addr: "relay-eu-1.example:7450".into(),
                    fingerprint: "3f".repeat(32),
                    region: "eu-west".into(),
                    provider: "hetzner".into(),
                },
                RelayInfo {
                    name: "bare".into(),
                    addr: "198.51.100.9:7450".into(),
                    fingerprint: "4e".repeat(32),
                    region: String::new(),
                    provider: String::new(),
                },
            ],
            coordinator_relays: crate::relay::coordinator_relays(
                &["coord.example:7443".into(), "coord-b.example:7443".into()],
                &"ab".repeat(32),
            ),
            relay_sessions: None,
        }
    }

    #[test]
    fn the_embedded_relay_and_the_configured_ones() {
        let view = relays_view(&context(true, true));
        assert_eq!(
            view.embedded,
            api::EmbeddedRelay {
                on: true,
                addr: "coord.example:7443".into(),
                transports: vec![RelayTransport::Udp, RelayTransport::Tcp],
            }
        );
        assert_eq!(view.standalone.len(), 2);
        let eu = &view.standalone[0];
        assert_eq!(
            (eu.name.as_str(), eu.addr.as_str(), eu.granted),
            ("eu-1", "relay-eu-1.example:7450", true)
        );
        assert_eq!(
            eu.transports,
            vec![RelayTransport::Udp, RelayTransport::Tcp]
        );
        assert_eq!(
            (eu.region.as_deref(), eu.provider.as_deref()),
            (Some("eu-west"), Some("hetzner"))
        );
        // Labels not given are null, not empty text.
        assert_eq!(
            (
                view.standalone[1].region.as_deref(),
                view.standalone[1].provider.as_deref()
            ),
            (None, None)
        );
        // The mesh's coordinators after them, named by their place, granted with the relay on.
        let names: Vec<(&str, &str, bool)> = view
            .coordinators
            .iter()
            .map(|c| (c.name.as_str(), c.addr.as_str(), c.granted))
            .collect();
        assert_eq!(
            names,
            [
                ("coordinator-1", "coord.example:7443", true),
                ("coordinator-2", "coord-b.example:7443", true)
            ]
        );
        // Without the TCP listener, QUIC datagrams only.
        assert_eq!(
            relays_view(&context(true, false)).embedded.transports,
            vec![RelayTransport::Udp]
        );
    }

    /// With the embedded relay off nothing is relayed by it, and no grant announces the
    /// standalone relays: they are listed, not granted.
    #[test]
    fn without_the_embedded_relay_none_is_granted() {
        let view = relays_view(&context(false, true));
        assert!(!view.embedded.on);
        assert!(view.embedded.transports.is_empty());
        assert_eq!(view.standalone.len(), 2);
        assert!(view.standalone.iter().all(|r| !r.granted));
    }
}
