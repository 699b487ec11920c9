//! The control channel's QUIC client configuration: the coordinator's certificate pinned by
//! the fingerprint the join token carries (see `meshlink-tls`), plus keepalives and an idle
//! timeout ([`Liveness`]) so that a lost or restarted coordinator is noticed in time.
//!
//! A restarted coordinator answers a packet of a connection it no longer knows with a
//! stateless reset (its reset key survives restarts), so the agent learns of a restart from
//! its next packet: a keepalive, or a holder's heartbeats (several per lease) in between. A
//! coordinator that is gone sends nothing; the connection then ends after the idle timeout
//! without a packet, and the agent tries the next coordinator.
//!
//! With a lone coordinator there is nowhere else to go: [`Liveness::LONE`] keeps the connection
//! through a restart (keepalive 1 s, idle timeout 4 s), and the restarted coordinator's reset
//! ends it at the next packet. With several, every node notices a dead coordinator within
//! about a third of a lease, so that changes reach it again within a second through another
//! coordinator ([`Liveness::for_node`]; idle timeout 500 ms at the default lease of 1.5 s):
//! - A node that holds no workload address loses nothing while its coordinator is away (its
//!   tunnels run on the last map): keepalive a third of the idle timeout (six small packets a
//!   second per agent on its coordinator).
//! - A holder must renew its lease through another coordinator before the lease runs out: its
//!   keepalive is a quarter of the idle timeout ([`Liveness::holder`]), so three may be lost in
//!   a row. QUIC restarts the idle timer at every packet
//!   received and at the first ack-eliciting packet sent after one, so a dead coordinator is
//!   noticed at most a keepalive plus the idle timeout after its last packet (625 ms at the
//!   default lease), while a heartbeat answered 300 ms earlier left at least 1.2 s of lease.
//!   QUIC never times out sooner than three probe timeouts (`max(idle, 3 * PTO)`), so a slow or
//!   lossy path stretches the timeout rather than breaking a live connection.
//!
//! The negotiated idle timeout is the smaller of the two sides', so the coordinator then also
//! closes a holder's connection after that long without a packet from it; the holder's
//! keepalives (four per idle timeout, each drawing an acknowledgement) keep it open. The
//! choice is made when a connection opens; a node that becomes a holder during a session is
//! covered by `coordinators::renewal_overdue`.

use std::sync::Arc;
use std::time::Duration;

pub use meshlink_tls::SERVER_NAME;

/// No connection waits longer than this without a packet, whatever the lease; the idle
/// timeout of a node with a lone coordinator.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// The keepalive of a node with a lone coordinator.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// The shortest idle timeout of a holder's connection, whatever the lease (quinn still waits
/// at least three probe timeouts).
pub const MIN_HOLDER_IDLE: Duration = Duration::from_millis(200);
/// Keepalives per idle timeout on a holder's connection: three may be lost in a row.
const KEEPALIVES_PER_IDLE: u32 = 4;
/// The round-trip time assumed before one is measured. quinn's default (333 ms) makes a
/// handshake whose first packet went to a coordinator that was down wait about a second
/// before trying again; with this, about 300 ms.
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// How a control connection notices that the coordinator is gone: see the module
/// documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A keepalive is sent after this long without sending anything.
    pub keepalive: Duration,
    /// The connection is lost after this long without receiving anything.
    pub idle: Duration,
}

impl Liveness {
    /// For a holder of workload addresses whose lease is `lease`: idle timeout a third of the
    /// lease (at least [`MIN_HOLDER_IDLE`], at most [`IDLE_TIMEOUT`]), four keepalives per
    /// idle timeout.
    pub fn holder(lease: Duration) -> Liveness {
        let idle = (lease / 3).clamp(MIN_HOLDER_IDLE, IDLE_TIMEOUT);
        Liveness {
            keepalive: idle / KEEPALIVES_PER_IDLE,
            idle,
        }
    }

    /// A node with a lone coordinator: there is nowhere else to go, and a connection kept
    /// through an outage learns of the restart from the coordinator's stateless reset at its
    /// next packet (a holder's overdue heartbeats come every 50 ms), sooner than a new
    /// handshake would: keepalive [`KEEPALIVE`], idle timeout [`IDLE_TIMEOUT`].
    pub const LONE: Liveness = Liveness {
        keepalive: KEEPALIVE,
        idle: IDLE_TIMEOUT,
    };

    /// For a node that `holds` (or not) addresses under a lease of `lease`, with
    /// `elsewhere` another coordinator to go to: the holder's idle timeout for both, three
    /// keepalives per idle timeout for a node holding nothing; [`Liveness::LONE`] without.
    pub fn for_node(holds: bool, lease: Duration, elsewhere: bool) -> Liveness {
        if !elsewhere {
            return Liveness::LONE;
        }
        let holder = Liveness::holder(lease);
        if holds {
            holder
        } else {
            Liveness {
                keepalive: holder.idle / 3,
                idle: holder.idle,
            }
        }
    }
}

/// A QUIC client configuration that trusts only the pinned coordinator.
///
/// # Errors
/// When the fingerprint is not 64 hex digits.
pub fn client_config(pin: &str, liveness: Liveness) -> Result<quinn::ClientConfig, String> {
    let mut config = meshlink_tls::client_config(pin).map_err(|e| e.to_string())?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(liveness.keepalive));
    transport.initial_rtt(INITIAL_RTT);
    transport.max_idle_timeout(Some(liveness.idle.try_into().map_err(|e| format!("{e}"))?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlink_proto::workload::{DEFAULT_LEASE, HEARTBEATS_PER_LEASE};

    #[test]
    fn a_holder_notices_a_dead_coordinator_well_within_its_lease() {
        let l = Liveness::holder(DEFAULT_LEASE);
        assert_eq!(l.idle, Duration::from_millis(500));
        assert_eq!(l.keepalive, Duration::from_millis(125));
        // The worst case: the last packet came right after a heartbeat was answered, the lease
        // then had `lease - interval` left; noticing takes a keepalive plus the idle timeout.
        let left = DEFAULT_LEASE - DEFAULT_LEASE / HEARTBEATS_PER_LEASE;
        let noticed = l.keepalive + l.idle;
        assert!(
            left.saturating_sub(noticed) >= Duration::from_millis(500),
            "{noticed:?} of {left:?}"
        );
    }

    #[test]
    fn every_node_notices_a_dead_coordinator_within_a_lease_third() {
        let quiet = Liveness::for_node(false, DEFAULT_LEASE, true);
        assert_eq!(quiet.idle, Duration::from_millis(500));
        assert!(quiet.keepalive * 3 <= quiet.idle, "{quiet:?}");
        assert_eq!(
            Liveness::for_node(true, DEFAULT_LEASE, true),
            Liveness::holder(DEFAULT_LEASE)
        );
        // With a lone coordinator, the connection outlives a restart (the reset comes sooner
        // than a new handshake).
        assert_eq!(
            Liveness::for_node(true, DEFAULT_LEASE, false),
            Liveness::LONE
        );
    }

    #[test]
    fn keepalives_come_well_inside_the_idle_timeout() {
        for ms in [1, 100, 600, 1500, 3000, 10_000, 60_000] {
            let l = Liveness::holder(Duration::from_millis(ms));
            assert!(l.keepalive * 4 <= l.idle, "{l:?}");
            assert!(l.idle >= MIN_HOLDER_IDLE && l.idle <= IDLE_TIMEOUT, "{l:?}");
        }
        // A long lease never makes a connection slower to notice than the longest idle.
        assert_eq!(Liveness::holder(Duration::from_secs(60)).idle, IDLE_TIMEOUT);
    }

    #[test]
    fn configurations_are_built_for_both() {
        let pin = "ab".repeat(32);
        assert!(client_config(&pin, Liveness::for_node(false, DEFAULT_LEASE, true)).is_ok());
        assert!(client_config(&pin, Liveness::LONE).is_ok());
        assert!(client_config(&pin, Liveness::holder(DEFAULT_LEASE)).is_ok());
        assert!(client_config("nope", Liveness::holder(DEFAULT_LEASE)).is_err());
    }
}
