//! Integration tests of the coordinator, in one binary: handlers over a temporary store, the
//! admin API on loopback, QUIC and TLS/TCP sessions on loopback, and the relay and the
//! reflexive address responder with real sockets.

mod admin;
mod common;
mod fencing;
mod ha;
mod handlers;
mod hostile;
mod keys;
mod need_to_know;
mod policy;
mod quic;
mod relay;
mod roles;
mod service;
mod simulation;
mod store;
mod tcp;
mod workloads;
