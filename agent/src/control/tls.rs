//! The control channel's QUIC client configuration: the coordinator's certificate pinned by
//! the fingerprint the join token carries (see `meshlink-tls`), plus keepalives so that a lost
//! coordinator is noticed within seconds.

use std::sync::Arc;
use std::time::Duration;

pub use meshlink_tls::SERVER_NAME;

/// QUIC keepalive on the control connection.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// The control connection counts as lost after this long without a packet.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// A QUIC client configuration that trusts only the pinned coordinator.
///
/// # Errors
/// When the fingerprint is not 64 hex digits.
pub fn client_config(pin: &str) -> Result<quinn::ClientConfig, String> {
    let mut config = meshlink_tls::client_config(pin).map_err(|e| e.to_string())?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEPALIVE));
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(|e| format!("{e}"))?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
