//! `meshlink-chat`: a small TCP chat room, the application in the workload-migration demo.
//!
//! The server listens on a workload address. When the address moves to another VM, either a
//! new server is started there and the clients, which reconnect on their own, carry on; or,
//! with live migration, the server hands its room over to a server waiting there, with the
//! clients' TCP connections, and the clients notice nothing.
//!
//! - [`protocol`]: the line protocol (nicks, line limits, reading lines).
//! - [`room`]: membership and broadcast with bounded per-member outboxes.
//! - [`server`]: the accept loop and one task per connection, which can pause at a clean
//!   point.
//! - [`handover`]: live migration, the chat's part (pausing the room, looking the members
//!   over, taking them back) of [`meshlink_tcp_migrate::handover`]'s flow.
//! - [`migrate`]: what travels per member in a handover.
//! - [`client`]: the reconnecting client.
//!
//! `main.rs` only parses arguments, sets up logging and signals, and wires stdin and stdout
//! to [`client::run`].

pub mod client;
pub mod handover;
pub mod migrate;
pub mod protocol;
pub mod room;
pub mod server;
