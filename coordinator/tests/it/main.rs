//! Integration tests of the coordinator, in one binary: handlers over a temporary store, the
//! admin API on loopback, and QUIC sessions on loopback.

mod admin;
mod common;
mod fencing;
mod ha;
mod handlers;
mod quic;
mod service;
mod simulation;
mod store;
mod workloads;
