//! The pinned-certificate client configuration, from `meshlink-tls`: the coordinator's own
//! tests use it as clients.

pub use meshlink_tls::{client_config, rustls_client_config, PinError, PinnedServerCert};
