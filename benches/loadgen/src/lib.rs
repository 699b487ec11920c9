//! meshlink's control-plane load generator: one coordinator or several sharing PostgreSQL
//! (in-process), or an external one, and N simulated agents, each with its own QUIC
//! connection over loopback, to measure how one change to a network's map reaches every
//! agent, and at what cost in bytes.
//!
//! Code map:
//!
//! - [`agent`]: one simulated agent (join, hello, welcome, full map, deltas, gaps).
//! - [`table`]: the map an agent keeps, whole or as digests.
//! - [`fleet`]: the agents together: client sockets, the join ramp, commands, shutdown.
//! - [`scoreboard`]: what agents report while running (versions, arrival instants, counters,
//!   QUIC statistics).
//! - [`coordinators`]: the in-process coordinators, their store (SQLite, a PostgreSQL URL or
//!   a private cluster), and the cleanup of what a run leaves outside the process.
//! - [`admin`]: the admin API calls the benchmark makes.
//! - [`sys`]: memory, CPU per thread group and UDP drops, from `/proc`.
//! - [`report`]: per-change figures, the summary table, markdown and JSON.
//!
//! `main.rs` parses flags, starts the coordinator and runs the phases: ramp, drain, changes.

pub mod admin;
pub mod agent;
pub mod coordinators;
pub mod fleet;
pub mod report;
pub mod scoreboard;
pub mod sys;
pub mod table;
