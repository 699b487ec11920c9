//! The control channel's QUIC client configuration: the coordinator's certificate pinned by
//! the fingerprint the join token carries (see `meshlink-tls`), plus keepalives so that a lost
//! or restarted coordinator is noticed within about a second.
//!
//! A restarted coordinator answers a packet of a connection it no longer knows with a
//! stateless reset (its reset key survives restarts), so the agent learns of a restart from
//! its next packet: a keepalive every [`KEEPALIVE`], and a holder's heartbeats (several per
//! lease) in between. A coordinator that is gone sends nothing; the connection then ends after
//! [`IDLE_TIMEOUT`] without a packet.

use std::sync::Arc;
use std::time::Duration;

pub use meshlink_tls::SERVER_NAME;

/// QUIC keepalive on the control connection.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// The control connection counts as lost after this long without a packet.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// The round-trip time assumed before one is measured. quinn's default (333 ms) makes a
/// handshake whose first packet went to a coordinator that was down wait about a second
/// before trying again; with this, about 300 ms.
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// A QUIC client configuration that trusts only the pinned coordinator.
///
/// # Errors
/// When the fingerprint is not 64 hex digits.
pub fn client_config(pin: &str) -> Result<quinn::ClientConfig, String> {
    let mut config = meshlink_tls::client_config(pin).map_err(|e| e.to_string())?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEPALIVE));
    transport.initial_rtt(INITIAL_RTT);
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(|e| format!("{e}"))?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
