//! `meshctl`'s library half: the admin client and the rendering, kept apart from `main` so that
//! the integration tests can drive the client directly.
//!
//! The crate holds no business logic. The coordinator decides everything (what a valid CIDR or
//! node name is, whether a token is expired, who may hold a workload); `meshctl` parses
//! arguments, sends them, and shows what comes back.
//!
//! - [`client`]: [`AdminClient`](client::AdminClient), one typed method per admin route, and
//!   [`ClientError`](client::ClientError).
//! - [`claim`]: `workload claim`, which asks the local agent over its unix socket rather than
//!   the coordinator.
//! - [`admin_token`]: the bearer token, read from a flag or from a private file.
//! - [`duration`]: `--expires` durations (`90s`, `30m`, `1h`, `2d`) in and out.
//! - [`external`]: an external device's WireGuard configuration (text, QR code, private
//!   file) and the key pair made for it when it did not make its own.
//! - [`render`]: aligned tables, field listings, times.

pub mod admin_token;
pub mod claim;
pub mod client;
pub mod duration;
pub mod external;
pub mod render;
