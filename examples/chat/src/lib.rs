//! `meshlink-chat`: a small TCP chat room, the application in the workload-migration demo.
//!
//! The server listens on a workload address; when the address moves to another VM, a new
//! server is started there on the same address and the clients, which reconnect on their
//! own, carry on.
//!
//! - [`protocol`]: the line protocol (nicks, line limits, reading lines).
//! - [`room`]: membership and broadcast with bounded per-member outboxes.
//! - [`server`]: the accept loop and one task per connection.
//! - [`client`]: the reconnecting client.
//!
//! `main.rs` only parses arguments, sets up logging and signals, and wires stdin and stdout
//! to [`client::run`].

pub mod client;
pub mod protocol;
pub mod room;
pub mod server;
