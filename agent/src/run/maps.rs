//! Which maps reach the data plane: the control loop's, while a coordinator has confirmed one
//! recently enough (`MapTrust`); past that, the map without its peers.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::control::sleep_until;
use crate::control::state::{MapTrust, StateDir};
use crate::control::workloads::Shared;
use meshlink_proto::{Netmap, NodeId};

use super::RunError;

/// The longest pause between two refreshes of the cached map's date while a control session
/// is up (a shorter `max_cached_map_age` refreshes it every eighth of that, at least every
/// second).
pub(super) const MAP_DATE_REFRESH: Duration = Duration::from_secs(3600);

/// How often the cached map's date is refreshed while a session is up.
pub(super) fn map_date_refresh(max_age: Option<Duration>) -> Duration {
    max_age.map_or(MAP_DATE_REFRESH, |max| {
        (max / 8).clamp(Duration::from_secs(1), MAP_DATE_REFRESH)
    })
}

/// `map` as the data plane sees it once it is no longer trusted: this node alone, no peers
/// and no workloads.
pub(super) fn without_peers(map: &Netmap, self_id: NodeId) -> Netmap {
    Netmap {
        version: map.version,
        peers: map
            .peers
            .iter()
            .filter(|(id, _)| **id == self_id)
            .map(|(id, p)| (*id, p.clone()))
            .collect(),
        workloads: Default::default(),
        policy: map.policy.clone(),
    }
}

/// Passes the control loop's maps (`from`) on to the data plane (`to`) while they are
/// trusted: a map is current while a control session is up, and trusted for
/// `max_cached_map_age` after the last instant one was (after the cached map's date at start).
/// Past that, the data plane gets the map without its peers until a session is up again, so
/// a node cut off from every coordinator stops trusting peers that may have been revoked
/// meanwhile. While a session is up, the cached map's date is kept current (see
/// [`map_date_refresh`]), so that a restart trusts it for as long as a running agent would.
pub(super) async fn trusted_maps(
    mut from: watch::Receiver<Netmap>,
    to: watch::Sender<Netmap>,
    shared: Arc<Shared>,
    state: StateDir,
    mut trust: MapTrust,
    self_id: NodeId,
) -> Result<(), RunError> {
    let mut link = shared.link.subscribe();
    let refresh = map_date_refresh(trust.max_age());
    let mut dated: Option<Instant> = None;
    let mut dropped = trust.expired(Instant::now());
    let mut from_open = true;
    loop {
        let now = Instant::now();
        let connected = link.borrow_and_update().is_some();
        trust.set_connected(connected, now);
        if connected && dated.is_none_or(|at| now.duration_since(at) >= refresh) {
            dated = Some(now);
            let (state, version) = (state.clone(), shared.lock().map().version);
            let confirmed = tokio::task::spawn_blocking(move || {
                state.confirm_netmap(SystemTime::now(), version)
            })
            .await;
            if let Ok(Err(e)) = confirmed {
                warn!("dating the cached network map: {e}");
            }
        }
        let expired = trust.expired(now);
        if expired && !dropped {
            let peers = from.borrow().peers.len().saturating_sub(1);
            warn!(
                peers,
                max_cached_map_age = %crate::config::format_map_age(trust.max_age()),
                "no coordinator has confirmed the network map for max_cached_map_age: \
                 its peers are dropped until one answers"
            );
            to.send_replace(without_peers(&from.borrow(), self_id));
            dropped = true;
        } else if !expired && dropped {
            info!("a coordinator answers: peers follow its network map again");
            to.send_replace(shared.lock().map().clone());
            dropped = false;
        }
        let wake = match (trust.poll_timeout(now), dated.filter(|_| connected)) {
            (Some(a), Some(b)) => Some(a.min(b + refresh)),
            (a, b) => a.or(b.map(|b| b + refresh)),
        };
        tokio::select! {
            r = from.changed(), if from_open => match r {
                // A map arrives from a session, so it is current.
                Ok(()) => {
                    let now = Instant::now();
                    trust.confirmed(now);
                    dated = Some(now);
                    to.send_replace(from.borrow_and_update().clone());
                    dropped = false;
                }
                // The control loop ended; it reports why.
                Err(_) => from_open = false,
            },
            _ = link.changed() => {}
            () = sleep_until(wake) => {}
        }
    }
}
