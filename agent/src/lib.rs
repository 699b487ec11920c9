//! The meshlink agent: WireGuard tunnels between overlay addresses, through a TUN device.
//!
//! See `ARCHITECTURE.md` at the top of the repository for the map of this crate.

pub mod config;
pub mod control;
pub mod dataplane;
pub mod dns;
pub mod keyfile;
pub mod metrics;
pub mod platform;
pub mod run;
pub mod settings;
pub mod token_source;
pub mod uapi;
pub mod untrusted;
