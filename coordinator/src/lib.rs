//! The meshlink coordinator: it admits nodes with join tokens, gives each an identity and an
//! overlay address, keeps one network map per network and pushes every change to the agents
//! as one delta, over QUIC (or TLS over TCP where UDP is blocked). Operators drive it through an HTTP admin API (`meshctl`).
//!
//! Code map (see `coordinator/ARCHITECTURE.md` for the invariants):
//!
//! - [`config`]: file, environment and flags become [`config::Settings`].
//! - [`identity`]: state directory, TLS identity, admin token, random secrets.
//! - [`store`]: the [`store::Store`] trait and [`store::SqlStore`].
//! - [`handlers`]: every operation as a plain function of (store, now, caller, request).
//! - [`hub`]: live maps and sessions; deltas encoded once and fanned out.
//! - [`service`]: handlers + hub under one write lock, as both front ends call them.
//! - [`endpoint_pace`]: how often one node's endpoint reports may change its peers' maps.
//! - [`keys`]: key rotation (the schedule, operators' requests) and node expiry.
//! - [`follow`]: replays what other coordinators sharing the store committed.
//! - [`session`]: one agent session, whatever transport carries it.
//! - [`server`]: the QUIC control server (one session per agent connection).
//! - [`tcp`]: the control server over TLS over TCP, for networks that block UDP.
//! - [`relay`]: the relay, WireGuard datagrams between the nodes of a network on their
//!   sessions' connections.
//! - [`reflect`]: the reflexive address responder (the address a NAT mapped a socket to).
//! - [`paths`]: what agents last reported of their paths to their peers.
//! - [`admin`]: the admin HTTP API (and `GET /metrics`).
//! - [`telemetry`]: what the coordinator measures of itself, for Prometheus.
//! - [`logging`]: the log format (`MESHLINK_LOG_FORMAT`) and the subscriber `main` installs.
//! - [`pin`]: the agent-side pinned-certificate verifier (used by tests; a model for the agent).
//! - [`run`]: start-up and shutdown ([`Coordinator`]).

pub mod access;
pub mod admin;
pub mod config;
pub mod dispatch;
pub mod endpoint_pace;
pub mod external;
pub mod follow;
pub mod handlers;
pub mod hub;
pub mod identity;
pub mod keys;
pub mod logging;
pub mod migrate;
pub mod paths;
pub mod pin;
pub mod ratelimit;
pub mod reflect;
pub mod relay;
pub mod run;
pub mod server;
pub mod service;
pub mod session;
pub mod stop_record;
pub mod store;
pub mod talkers;
pub mod tcp;
pub mod telemetry;

pub use config::Settings;
pub use run::{Coordinator, StartError};
