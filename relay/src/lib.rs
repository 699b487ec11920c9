//! meshlink's relays: the forwarding core ([`forward`]) that the coordinator's embedded relay
//! and the standalone `meshlink-relay` share, the tickets by which a coordinator vouches for a
//! node at a standalone relay ([`ticket`]), the sessions opened with them ([`sessions`]: the
//! standalone relay's, and a coordinator's of a mesh of several), and the standalone relay
//! itself ([`server`]), with its counts ([`outcome`]) and Prometheus metrics ([`metrics`]).

pub mod admission;
pub mod forward;
pub mod metrics;
pub mod outcome;
pub mod ratelimit;
pub mod server;
pub mod sessions;
pub mod ticket;

pub use forward::{Dropped, Link, Relay, RelayStats, Route, SessionLink, Source};
